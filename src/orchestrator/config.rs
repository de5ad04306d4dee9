//! Model and orchestrator settings: the `[orchestrator]` and `[[models]]` tables of the
//! configuration file (`crate::config` reads the file, and hands this part over).

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::config::ConfigError;

/// The providers herald can talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Simulated,
    Ollama,
    Openai,
}

impl ProviderKind {
    /// Every kind: the `provider` label's values in `/metrics`.
    pub const ALL: [ProviderKind; 3] = [Self::Simulated, Self::Ollama, Self::Openai];

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Simulated => "simulated",
            ProviderKind::Ollama => "ollama",
            ProviderKind::Openai => "openai",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients select the model by.
    pub name: String,
    pub provider: ProviderKind,
    /// Provider endpoint (ollama: `http://host:11434`; openai: `https://host/v1`).
    #[serde(default)]
    pub base_url: Option<String>,
    /// The provider's own model id; defaults to `name`.
    #[serde(default)]
    pub model: Option<String>,
    /// Environment variable holding the API key (openai).
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default = "defaults::timeout_secs")]
    pub timeout_secs: u64,
    #[serde(default = "defaults::retries")]
    pub retries: u32,
    #[serde(default = "defaults::model_concurrency")]
    pub max_concurrency: usize,
    /// Simulated only: delay before the first token.
    #[serde(default = "defaults::latency_ms")]
    pub latency_ms: u64,
    /// Simulated only: tokens streamed per second.
    #[serde(default = "defaults::tokens_per_sec")]
    pub tokens_per_sec: u32,
    /// Simulated only: attempts per prompt that fail before one succeeds.
    #[serde(default)]
    pub fail_attempts: u32,
}

impl ModelConfig {
    pub fn provider_model(&self) -> &str {
        self.model.as_deref().unwrap_or(&self.name)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs.max(1))
    }

    fn simulated(name: &str, latency_ms: u64, tokens_per_sec: u32) -> Self {
        Self {
            name: name.to_owned(),
            provider: ProviderKind::Simulated,
            base_url: None,
            model: None,
            api_key_env: None,
            timeout_secs: defaults::timeout_secs(),
            retries: defaults::retries(),
            max_concurrency: defaults::model_concurrency(),
            latency_ms,
            tokens_per_sec,
            fail_attempts: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OrchestratorSettings {
    /// Model calls in flight across all sessions.
    #[serde(default = "defaults::global_concurrency")]
    pub max_concurrency: usize,
    #[serde(default = "defaults::clarification_timeout_secs")]
    pub clarification_timeout_secs: u64,
    /// At most one partial `model_result` per model and prompt per interval.
    #[serde(default = "defaults::update_interval_ms")]
    pub update_interval_ms: u64,
    /// First retry delay; doubles with each further attempt.
    #[serde(default = "defaults::retry_backoff_ms")]
    pub retry_backoff_ms: u64,
}

impl Default for OrchestratorSettings {
    fn default() -> Self {
        Self {
            max_concurrency: defaults::global_concurrency(),
            clarification_timeout_secs: defaults::clarification_timeout_secs(),
            update_interval_ms: defaults::update_interval_ms(),
            retry_backoff_ms: defaults::retry_backoff_ms(),
        }
    }
}

/// The model part of the configuration file.
#[derive(Debug, Clone)]
pub struct ModelsFile {
    pub orchestrator: OrchestratorSettings,
    pub models: Vec<ModelConfig>,
}

impl ModelsFile {
    /// Three simulated models, so that a server with no configuration works out of the box.
    pub fn builtin() -> Self {
        Self {
            orchestrator: OrchestratorSettings::default(),
            models: vec![
                ModelConfig::simulated("sim-fast", 20, 200),
                ModelConfig::simulated("sim-balanced", 100, 80),
                ModelConfig::simulated("sim-slow", 300, 30),
            ],
        }
    }

    /// The model part of the configuration file at `path` (the file's other tables are
    /// `crate::config`'s, which reads the whole file once when loading the command line), or
    /// the built-in models when there is no file.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            Some(path) => Ok(crate::config::ConfigFile::read(path)?.models),
            None => Ok(Self::builtin()),
        }
    }

    /// Checks the file's `[orchestrator]` and `[[models]]`; no models means the built-in ones.
    pub(crate) fn new(
        orchestrator: OrchestratorSettings,
        models: Vec<ModelConfig>,
    ) -> Result<Self, String> {
        let mut file = Self {
            orchestrator,
            models,
        };
        if file.models.is_empty() {
            file.models = Self::builtin().models;
        }
        file.validate()?;
        Ok(file)
    }

    fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for model in &self.models {
            if model.name.trim().is_empty() {
                return Err("a model has an empty name".into());
            }
            if !seen.insert(model.name.as_str()) {
                return Err(format!("model `{}` is configured twice", model.name));
            }
            if model.provider != ProviderKind::Simulated && model.base_url.is_none() {
                return Err(format!("model `{}` needs a base_url", model.name));
            }
            if model.max_concurrency == 0 {
                return Err(format!(
                    "model `{}`: max_concurrency must be at least 1",
                    model.name
                ));
            }
        }
        if self.orchestrator.max_concurrency == 0 {
            return Err("orchestrator.max_concurrency must be at least 1".into());
        }
        Ok(())
    }
}

mod defaults {
    pub fn timeout_secs() -> u64 {
        120
    }
    pub fn retries() -> u32 {
        2
    }
    pub fn model_concurrency() -> usize {
        4
    }
    pub fn latency_ms() -> u64 {
        50
    }
    pub fn tokens_per_sec() -> u32 {
        100
    }
    pub fn global_concurrency() -> usize {
        16
    }
    pub fn clarification_timeout_secs() -> u64 {
        300
    }
    pub fn update_interval_ms() -> u64 {
        100
    }
    pub fn retry_backoff_ms() -> u64 {
        250
    }
}
