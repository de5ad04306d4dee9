//! The configuration file (`herald.toml`) and how it is layered under the environment and
//! the flags.
//!
//! Which keys exist follows from the clap definition of [`Config`], so that a new flag is a
//! new key without anything else to write:
//! - a flag's table is its `help_heading` in lowercase (`Server`: `[server]`); its key is its
//!   field name, less the table's name as a prefix (`redis_url`: `url` in `[redis]`);
//! - the key's TOML type follows the flag: a switch takes a boolean, a repeatable or
//!   comma-separated flag an array of strings, a number an integer, anything else a string;
//!   the value then goes through the flag's own parser (ranges, addresses);
//! - a secret (a flag whose environment value is hidden) may be given as `<key>_file`
//!   instead: a path whose contents are the value (for a list, items one per line or
//!   separated by commas);
//! - relative paths are relative to the file's directory;
//! - `[[auth.api_key_digests]]` exists only in the file; `[orchestrator]` and `[[models]]`
//!   are the model part ([`ModelsFile`]).
//!
//! Layering: the file's values become the flags' defaults and clap parses the command line
//! again, so the environment and the flags override the file exactly as they override the
//! built-in defaults.

use std::any::TypeId;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Args, CommandFactory, FromArgMatches};
use serde::Deserialize;

use super::{ApiKeyDigest, Cli, Command, Config, ConfigCommand, ConfigError, Effective};
use crate::orchestrator::config::{ModelConfig, ModelsFile, OrchestratorSettings};

/// The tables that hold flags: a flag's `help_heading`, and its table in the file.
pub(super) const TABLES: [(&str, &str); 4] = [
    ("Server", "server"),
    ("Limits", "limits"),
    ("Redis", "redis"),
    ("Auth", "auth"),
];

/// The outcome of [`Cli::load`]: the command line with every layer applied.
#[derive(Debug)]
pub struct Loaded {
    pub cli: Cli,
    /// For a command that runs with a [`Config`]: its settings and where each came from.
    pub effective: Option<Effective>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A bad command line, or `--help` / `--version`: `clap::Error::exit` prints it.
    #[error(transparent)]
    Args(#[from] clap::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl Cli {
    /// Parses the process's command line and environment, reading the configuration file
    /// they name (once) under them.
    pub fn load() -> Result<Loaded, LoadError> {
        Self::load_from(std::env::args_os())
    }

    /// [`Cli::load`] with these arguments (the first is the program name) and the process's
    /// environment.
    pub fn load_from<I, T>(args: I) -> Result<Loaded, LoadError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let mut matches = Cli::command().try_get_matches_from(&args)?;
        let mut cli = Cli::from_arg_matches(&matches)?;
        let mut file = None;
        if let Some(path) = cli.config_file().map(Path::to_owned) {
            let read = ConfigFile::read(&path)?;
            let layer = read.layer()?;
            // The same command line again, with the file's values as the defaults.
            let subcommands = leaf(&matches).0;
            let command = at_path(Cli::command(), &subcommands, |c| layer.apply(c));
            matches = command.try_get_matches_from(&args)?;
            cli = Cli::from_arg_matches(&matches)?;
            file = Some((read, layer));
        }
        if let Command::Config(ConfigCommand::Check(check)) = &mut cli.command {
            check.config.config_file = Some(check.file.clone());
        }
        let effective = cli.config_mut().map(|config| {
            let (layer, digests, models) = match file {
                Some((read, layer)) => (layer, read.api_key_digests, read.models),
                None => (Layer::default(), Vec::new(), ModelsFile::builtin()),
            };
            config.api_key_digests = digests;
            config.models = Some(models);
            Effective::new(leaf(&matches).1, config, &layer)
        });
        Ok(Loaded { cli, effective })
    }

    /// The settings of a command that runs with them.
    fn config_mut(&mut self) -> Option<&mut Config> {
        match &mut self.command {
            Command::Serve(config) => Some(config),
            Command::Config(ConfigCommand::Check(check)) => Some(&mut check.config),
            Command::Demo(_) | Command::Token(_) => None,
        }
    }

    /// The configuration file the command reads.
    fn config_file(&self) -> Option<&Path> {
        match &self.command {
            Command::Serve(config) => config.config_file.as_deref(),
            Command::Config(ConfigCommand::Check(check)) => Some(&check.file),
            Command::Demo(_) | Command::Token(_) => None,
        }
    }
}

/// The names of the subcommands parsed, and the innermost one's matches.
fn leaf(matches: &ArgMatches) -> (Vec<String>, &ArgMatches) {
    let mut names = Vec::new();
    let mut matches = matches;
    while let Some((name, sub)) = matches.subcommand() {
        names.push(name.to_owned());
        matches = sub;
    }
    (names, matches)
}

/// Changes the subcommand at `path` with `change`.
fn at_path(
    command: clap::Command,
    path: &[String],
    change: impl FnOnce(clap::Command) -> clap::Command,
) -> clap::Command {
    match path.split_first() {
        None => change(command),
        Some((name, rest)) => command.mut_subcommand(name, |sub| at_path(sub, rest, change)),
    }
}

/// The flags of [`Config`] that are keys in the file.
pub(super) fn flags() -> Vec<Arg> {
    Config::augment_args(clap::Command::new("herald"))
        .get_arguments()
        .filter(|arg| table(arg).is_some())
        .cloned()
        .collect()
}

/// The table a flag is a key of.
pub(super) fn table(arg: &Arg) -> Option<&'static str> {
    let heading = arg.get_help_heading()?;
    TABLES
        .iter()
        .find(|(h, _)| *h == heading)
        .map(|(_, table)| *table)
}

/// The flag's key in its table.
pub(super) fn key(arg: &Arg) -> String {
    let id = arg.get_id().as_str();
    table(arg)
        .and_then(|table| id.strip_prefix(table)?.strip_prefix('_'))
        .unwrap_or(id)
        .to_owned()
}

/// A secret: a value never shown (its environment value is hidden from `--help` too).
pub(super) fn is_secret(arg: &Arg) -> bool {
    arg.is_hide_env_values_set()
}

/// What a flag takes, hence the TOML type of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Switch,
    List,
    Integer,
    Text,
}

impl Kind {
    pub(super) fn of(arg: &Arg) -> Self {
        match arg.get_action() {
            ArgAction::SetTrue | ArgAction::SetFalse => Kind::Switch,
            ArgAction::Append => Kind::List,
            _ if produces::<u16>(arg) || produces::<u32>(arg) => Kind::Integer,
            _ if produces::<u64>(arg) || produces::<usize>(arg) => Kind::Integer,
            _ => Kind::Text,
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Kind::Switch => "a boolean",
            Kind::List => "an array of strings",
            Kind::Integer => "an integer",
            Kind::Text => "a string",
        }
    }
}

/// Whether the flag's parser produces a `T`.
fn produces<T: 'static>(arg: &Arg) -> bool {
    arg.get_value_parser().type_id() == TypeId::of::<T>()
}

/// The file's values for the flags, each as the flag's parser takes it.
#[derive(Debug, Default)]
pub(super) struct Layer {
    /// (flag id, values, the key that gave them).
    values: Vec<(String, Vec<String>, String)>,
}

impl Layer {
    /// The key that set flag `id`, when the file did.
    pub(super) fn key_of(&self, id: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(flag, _, _)| flag == id)
            .map(|(_, _, key)| key.as_str())
    }

    /// Makes the file's values the flags' defaults.
    fn apply(&self, command: clap::Command) -> clap::Command {
        self.values
            .iter()
            .fold(command, |command, (id, values, _)| {
                command.mut_arg(id, |arg| arg.default_values(values.clone()))
            })
    }
}

/// The configuration file, read and parsed; the model part checked.
pub(crate) struct ConfigFile {
    path: PathBuf,
    /// The tables that hold flags, `[[auth.api_key_digests]]` taken out.
    tables: Vec<(&'static str, toml::Table)>,
    api_key_digests: Vec<ApiKeyDigest>,
    pub(crate) models: ModelsFile,
}

/// The file as TOML has it: unknown tables are refused here, unknown keys by [`ConfigFile::layer`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    server: toml::Table,
    #[serde(default)]
    limits: toml::Table,
    #[serde(default)]
    redis: toml::Table,
    #[serde(default)]
    auth: toml::Table,
    #[serde(default)]
    orchestrator: OrchestratorSettings,
    #[serde(default)]
    models: Vec<ModelConfig>,
}

impl ConfigFile {
    pub(crate) fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let invalid = |message: String| ConfigError::Invalid {
            path: shown.clone(),
            message,
        };
        let mut raw: Raw = toml::from_str(text).map_err(|e| invalid(toml_error(text, &e)))?;
        let api_key_digests = match raw.auth.remove("api_key_digests") {
            Some(value) => api_key_digests(value).map_err(invalid)?,
            None => Vec::new(),
        };
        let models = ModelsFile::new(raw.orchestrator, raw.models).map_err(invalid)?;
        Ok(Self {
            path: path.to_owned(),
            tables: vec![
                ("server", raw.server),
                ("limits", raw.limits),
                ("redis", raw.redis),
                ("auth", raw.auth),
            ],
            api_key_digests,
            models,
        })
    }

    fn invalid(&self, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.display().to_string(),
            message,
        }
    }

    /// The file's values for the flags, checked by the flags' parsers; unknown keys refused.
    fn layer(&self) -> Result<Layer, ConfigError> {
        let flags = flags();
        let mut layer = Layer::default();
        for (name, entries) in &self.tables {
            let mut rest = entries.clone();
            for flag in flags.iter().filter(|flag| table(flag) == Some(*name)) {
                let key = key(flag);
                let plain = rest.remove(&key);
                let from_file = match is_secret(flag) {
                    true => rest.remove(&format!("{key}_file")),
                    false => None,
                };
                let (values, used) = match (plain, from_file) {
                    (None, None) => continue,
                    (Some(_), Some(_)) => {
                        let both = format!("[{name}] sets both {key} and {key}_file: keep one");
                        return Err(self.invalid(both));
                    }
                    (Some(value), None) => (self.values(flag, value), key.clone()),
                    (None, Some(path)) => (self.secret_file(flag, path), format!("{key}_file")),
                };
                let values = values
                    .and_then(|values| parses(flag, &values).map(|()| values))
                    .map_err(|problem| self.invalid(format!("[{name}] {used} {problem}")))?;
                let id = flag.get_id().to_string();
                layer.values.push((id, values, used));
            }
            if !rest.is_empty() {
                let unknown: Vec<&str> = rest.keys().map(String::as_str).collect();
                let mut known: Vec<String> = flags
                    .iter()
                    .filter(|flag| table(flag) == Some(*name))
                    .flat_map(|flag| {
                        let key = key(flag);
                        let file = is_secret(flag).then(|| format!("{key}_file"));
                        std::iter::once(key).chain(file)
                    })
                    .collect();
                if *name == "auth" {
                    known.push("api_key_digests".into());
                }
                return Err(self.invalid(format!(
                    "unknown key `{}` in [{name}] (known: {})",
                    unknown.join("`, `"),
                    known.join(", ")
                )));
            }
        }
        Ok(layer)
    }

    /// A key's value as the flag's parser takes it; the problem when its type is wrong.
    fn values(&self, flag: &Arg, value: toml::Value) -> Result<Vec<String>, String> {
        let kind = Kind::of(flag);
        let wrong = |found: &toml::Value| {
            let mut problem = format!("must be {}, not {}", kind.expected(), a(found.type_str()));
            if flag.get_id() == "api_keys" {
                problem.push_str(" (`name:secret:scopes`; digests go in [[auth.api_key_digests]])");
            }
            problem
        };
        match (kind, value) {
            (Kind::Switch, toml::Value::Boolean(on)) => Ok(vec![on.to_string()]),
            (Kind::Integer, toml::Value::Integer(n)) => Ok(vec![n.to_string()]),
            (Kind::Text, toml::Value::String(text)) => Ok(vec![self.path_or_text(flag, text)]),
            (Kind::List, toml::Value::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    toml::Value::String(text) => Ok(text),
                    other => Err(wrong(&other)),
                })
                .collect(),
            (_, other) => Err(wrong(&other)),
        }
    }

    /// A secret's value read from the file `path` names.
    fn secret_file(&self, flag: &Arg, path: toml::Value) -> Result<Vec<String>, String> {
        let toml::Value::String(path) = path else {
            return Err(format!("must be a path, not {}", a(path.type_str())));
        };
        let path = self.resolve(&path);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot be read ({}): {e}", path.display()))?;
        let values: Vec<String> = match Kind::of(flag) {
            Kind::List => text
                .split([',', '\n'])
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect(),
            _ => vec![text.trim_end_matches(['\r', '\n']).to_owned()],
        };
        if values.iter().all(String::is_empty) {
            return Err(format!("names an empty file ({})", path.display()));
        }
        Ok(values)
    }

    /// A string key's value: paths are relative to the file's directory.
    fn path_or_text(&self, flag: &Arg, text: String) -> String {
        match produces::<PathBuf>(flag) {
            true => self.resolve(&text).display().to_string(),
            false => text,
        }
    }

    fn resolve(&self, path: &str) -> PathBuf {
        let dir = self.path.parent().unwrap_or(Path::new(""));
        dir.join(path)
    }
}

/// Where and what, without the line itself: it may hold a secret.
fn toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end();
    let Some(start) = error.span().map(|span| span.start.min(text.len())) else {
        return message.to_owned();
    };
    let before = text.get(..start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.chars().rev().take_while(|c| *c != '\n').count() + 1;
    format!("line {line}, column {column}: {message}")
}

/// "a string", "an integer", "an array".
fn a(noun: &str) -> String {
    match noun.starts_with(['a', 'e', 'i', 'o', 'u']) {
        true => format!("an {noun}"),
        false => format!("a {noun}"),
    }
}

/// Whether the flag's own parser takes every value; its complaint when not.
fn parses(flag: &Arg, values: &[String]) -> Result<(), String> {
    let Some(long) = flag.get_long().filter(|_| Kind::of(flag) != Kind::Switch) else {
        return Ok(()); // a switch's values are the file's own booleans
    };
    // The flag alone, so that only the value is judged.
    let probe = flag.clone().env(None::<&str>).default_value(None::<&str>);
    let probe = clap::Command::new("herald").no_binary_name(true).arg(probe);
    for value in values {
        if let Err(error) = probe
            .clone()
            .try_get_matches_from([format!("--{long}={value}")])
        {
            let reason = std::error::Error::source(&error)
                .map(ToString::to_string)
                .unwrap_or_else(|| error.kind().to_string());
            return Err(format!("is invalid: {reason}"));
        }
    }
    Ok(())
}

fn api_key_digests(value: toml::Value) -> Result<Vec<ApiKeyDigest>, String> {
    let entries = match value {
        toml::Value::Array(entries) => entries,
        other => {
            return Err(format!(
                "[[auth.api_key_digests]] must be an array of tables, not {}",
                a(other.type_str())
            ));
        }
    };
    let mut digests: Vec<ApiKeyDigest> = Vec::with_capacity(entries.len());
    for (index, entry) in entries.into_iter().enumerate() {
        let problem =
            |message: String| format!("[[auth.api_key_digests]] #{}: {message}", index + 1);
        let mut digest = ApiKeyDigest::deserialize(entry).map_err(|e| problem(e.to_string()))?;
        digest.validate().map_err(problem)?;
        if digests.iter().any(|known| known.name == digest.name) {
            return Err(problem(format!(
                "key `{}` is configured twice",
                digest.name
            )));
        }
        digests.push(digest);
    }
    Ok(digests)
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Origin {
    Default,
    /// The file, through this key.
    File(String),
    /// This environment variable.
    Env(String),
    /// This flag.
    Flag(String),
}

impl Origin {
    pub(super) fn of(flag: &Arg, matches: &ArgMatches, layer: &Layer) -> Self {
        let id = flag.get_id().as_str();
        match matches.value_source(id) {
            Some(ValueSource::CommandLine) => {
                Origin::Flag(format!("--{}", flag.get_long().unwrap_or(id)))
            }
            Some(ValueSource::EnvVariable) => Origin::Env(
                flag.get_env()
                    .map(|env| env.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
            _ => match layer.key_of(id) {
                Some(key) => Origin::File(key.to_owned()),
                None => Origin::Default,
            },
        }
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzzing::Fuzz;

    /// A configuration file, however broken, is read or refused with a message that says
    /// where: never a panic.
    #[test]
    fn fuzz_config_files() {
        let example = include_bytes!("../../examples/herald.toml");
        let seeds: &[&[u8]] = &[
            example,
            b"[limits]\nmax_batch = 10\n[[models]]\nname = \"m\"\nprovider = \"simulated\"\n",
            b"[auth]\napi_key_digests = [{ name = \"w\", sha256 = \"00\", scope = \"publish\", sessions = [\"a*\"] }]\n",
        ];
        Fuzz::new("config file").run(seeds, |input| {
            let text = String::from_utf8_lossy(input);
            if let Err(error) = ConfigFile::parse(Path::new("herald.toml"), &text) {
                assert!(error.to_string().contains("herald.toml"), "{error}");
            }
        });
    }
}
