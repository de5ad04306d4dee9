//! The settings a command runs with and where each came from, as `herald config check`
//! prints them: TOML that herald reads back, with every secret as `***`.

use std::fmt::{self, Write as _};
use std::path::PathBuf;

use clap::{Arg, ArgMatches};
use serde_json::Value;

use super::file::{self, Kind, Layer, Origin};
use super::{ApiKeyDigest, Config};
use crate::orchestrator::config::ModelsFile;

/// What a secret is shown as.
const MASK: &str = "***";

#[derive(Debug, Clone)]
pub struct Effective {
    file: Option<PathBuf>,
    /// The tables that hold flags, in the file's order, each with its settings.
    tables: Vec<(&'static str, Vec<Setting>)>,
    api_key_digests: Vec<ApiKeyDigest>,
    models: Option<ModelsFile>,
}

#[derive(Debug, Clone)]
struct Setting {
    key: String,
    /// `None`: unset. A secret's value is already [`MASK`]ed.
    value: Option<Value>,
    origin: Origin,
}

impl Effective {
    /// From the command line as parsed (`matches`: the subcommand's, with the file's values
    /// as defaults) and the configuration built from it.
    pub(super) fn new(matches: &ArgMatches, config: &Config, layer: &Layer) -> Self {
        let mut tables: Vec<(&'static str, Vec<Setting>)> = file::TABLES
            .iter()
            .map(|(_, table)| (*table, Vec::new()))
            .collect();
        for flag in file::flags() {
            let setting = Setting {
                key: file::key(&flag),
                value: value(&flag, matches),
                origin: Origin::of(&flag, matches, layer),
            };
            if let Some((_, settings)) = tables
                .iter_mut()
                .find(|(t, _)| Some(*t) == file::table(&flag))
            {
                settings.push(setting);
            }
        }
        Self {
            file: config.config_file.clone(),
            tables,
            api_key_digests: config.api_key_digests.clone(),
            models: config.models.clone(),
        }
    }
}

/// A flag's value as parsed, as it would be written in the file.
fn value(flag: &Arg, matches: &ArgMatches) -> Option<Value> {
    let id = flag.get_id().as_str();
    let kind = Kind::of(flag);
    if kind == Kind::Switch {
        return Some(Value::Bool(matches.get_flag(id)));
    }
    let raw = matches.get_raw(id).into_iter().flatten();
    let mut raw = raw.map(|value| value.to_string_lossy().into_owned());
    let shown = |text: String| match file::is_secret(flag) {
        true => Value::String(MASK.into()),
        false if id == "redis_url" => Value::String(super::redact_url(&text)),
        false => Value::String(text),
    };
    match kind {
        Kind::List => Some(Value::Array(raw.map(shown).collect())),
        Kind::Integer => raw
            .next()
            .map(|n| n.parse::<u64>().map_or(Value::String(n), Value::from)),
        _ => raw.next().map(shown),
    }
}

impl fmt::Display for Effective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = match &self.file {
            Some(path) => path.display().to_string(),
            None => "no file".into(),
        };
        writeln!(
            f,
            "# herald's settings: built-in defaults < {file} < HERALD_* environment < flags."
        )?;
        writeln!(
            f,
            "# A comment says where a value not the default came from. Secrets show as \"{MASK}\"."
        )?;
        for (table, settings) in &self.tables {
            writeln!(f, "\n[{table}]")?;
            for setting in settings {
                setting.fmt(f)?;
            }
            if *table == "auth" {
                for digest in &self.api_key_digests {
                    writeln!(f, "\n[[auth.api_key_digests]]")?;
                    let strings = |items: &[String]| items.iter().map(|s| quoted(s)).collect();
                    writeln!(f, "name = {}", quoted(&digest.name))?;
                    writeln!(f, "sha256 = {}", quoted(MASK))?;
                    writeln!(f, "scopes = {}", list(strings(&digest.scopes)))?;
                    if !digest.sessions.is_empty() {
                        writeln!(f, "sessions = {}", list(strings(&digest.sessions)))?;
                    }
                }
            }
        }
        if let Some(models) = &self.models {
            writeln!(f, "\n[orchestrator]")?;
            keys(f, &models.orchestrator)?;
            for model in &models.models {
                writeln!(f, "\n[[models]]")?;
                keys(f, model)?;
            }
        }
        Ok(())
    }
}

impl Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = &self.key;
        let Some(value) = &self.value else {
            return writeln!(f, "# {key} is unset");
        };
        let line = format!("{key} = {}", toml(value));
        let from = match &self.origin {
            Origin::Default => return writeln!(f, "{line}"),
            Origin::File(used) if used == key => "the file",
            Origin::File(used) | Origin::Env(used) | Origin::Flag(used) => used,
        };
        writeln!(f, "{line:<34} # from {from}")
    }
}

/// A struct's fields as `key = value` lines; unset ones are left out.
fn keys(f: &mut fmt::Formatter<'_>, item: &impl serde::Serialize) -> fmt::Result {
    let Ok(Value::Object(fields)) = serde_json::to_value(item) else {
        return Err(fmt::Error);
    };
    for (key, value) in fields.iter().filter(|(_, value)| !value.is_null()) {
        writeln!(f, "{key} = {}", toml(value))?;
    }
    Ok(())
}

/// A JSON value written as TOML (no nulls: TOML has none).
fn toml(value: &Value) -> String {
    match value {
        Value::String(text) => quoted(text),
        Value::Array(items) => list(items.iter().map(toml).collect()),
        Value::Object(fields) => {
            let fields = fields.iter().filter(|(_, value)| !value.is_null());
            let fields: Vec<String> = fields.map(|(k, v)| format!("{k} = {}", toml(v))).collect();
            format!("{{ {} }}", fields.join(", "))
        }
        other => other.to_string(),
    }
}

fn list(items: Vec<String>) -> String {
    format!("[{}]", items.join(", "))
}

/// A TOML basic string.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
