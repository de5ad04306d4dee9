//! The built-in simulated provider: deterministic, no network.
//!
//! It follows the same clarification convention as real models (see `docs/orchestrator.md`):
//! a prompt containing `[clarify]` gets a `CLARIFICATION_NEEDED:` question first; `[fail]`
//! (or `[fail:<model>]`) makes it fail.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::{CLARIFICATION_MARKER, ChatMessage, Provider, ProviderError, Role, TokenStream};
use crate::orchestrator::config::ModelConfig;

pub struct Simulated {
    name: String,
    latency: Duration,
    token_gap: Duration,
    fail_attempts: u32,
    /// Attempts seen per prompt, for `fail_attempts`.
    attempts: Mutex<HashMap<String, u32>>,
}

impl Simulated {
    pub fn new(model: &ModelConfig) -> Self {
        Self {
            name: model.name.clone(),
            latency: Duration::from_millis(model.latency_ms),
            token_gap: Duration::from_secs_f64(1.0 / f64::from(model.tokens_per_sec.max(1))),
            fail_attempts: model.fail_attempts,
            attempts: Mutex::default(),
        }
    }

    fn should_fail(&self, prompt: &str) -> bool {
        if prompt.contains("[fail]") || prompt.contains(&format!("[fail:{}]", self.name)) {
            return true;
        }
        let mut attempts = self.attempts.lock().unwrap();
        let seen = attempts.entry(prompt.to_owned()).or_insert(0);
        *seen += 1;
        *seen <= self.fail_attempts
    }

    /// The deterministic reply to a conversation.
    fn reply(&self, messages: &[ChatMessage]) -> String {
        let prompt = first_user(messages);
        let answered = messages.iter().any(|m| m.role == Role::Assistant);
        if prompt.contains("[clarify]") && !answered {
            return format!("{CLARIFICATION_MARKER} What should I focus on for \"{prompt}\"?");
        }
        let mut reply = format!(
            "{} answers \"{prompt}\": this is a simulated response, streamed word by word.",
            self.name
        );
        if answered && let Some(answer) = messages.last().filter(|m| m.role == Role::User) {
            reply.push_str(&format!(" (clarified: {})", answer.content));
        }
        reply
    }
}

fn first_user(messages: &[ChatMessage]) -> &str {
    messages
        .iter()
        .find(|m| m.role == Role::User)
        .map_or("", |m| m.content.as_str())
}

#[async_trait]
impl Provider for Simulated {
    async fn chat(&self, messages: Vec<ChatMessage>) -> Result<TokenStream, ProviderError> {
        tokio::time::sleep(self.latency).await;
        if self.should_fail(first_user(&messages)) {
            return Err(ProviderError::Simulated);
        }
        let reply = self.reply(&messages);
        let words: Vec<String> = reply.split_inclusive(' ').map(str::to_owned).collect();
        let gap = self.token_gap;
        let stream = futures_util::stream::unfold(words.into_iter(), move |mut words| async move {
            let word = words.next()?;
            tokio::time::sleep(gap).await;
            Some((Ok(word), words))
        });
        Ok(Box::pin(stream))
    }
}
