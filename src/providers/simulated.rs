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
    /// Failed attempts per prompt, for `fail_attempts`: only while `fail_attempts` is set,
    /// only for prompts still failing (a prompt's entry goes when it succeeds), and at most
    /// [`MAX_TRACKED_PROMPTS`] of them, so a long-running server does not keep every prompt
    /// it was ever given.
    attempts: Mutex<HashMap<String, u32>>,
}

/// Prompts whose failed attempts are remembered at once; when full, the oldest counts are
/// forgotten (those prompts start failing afresh), which a test model can live with.
const MAX_TRACKED_PROMPTS: usize = 1024;

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
        if self.fail_attempts == 0 {
            return false;
        }
        let mut attempts = self.attempts.lock().unwrap();
        let failed = attempts.get(prompt).copied().unwrap_or(0);
        if failed >= self.fail_attempts {
            // This attempt succeeds: nothing to remember about the prompt any more.
            attempts.remove(prompt);
            return false;
        }
        if failed == 0 && attempts.len() >= MAX_TRACKED_PROMPTS {
            attempts.clear();
        }
        attempts.insert(prompt.to_owned(), failed + 1);
        true
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orchestrator::config::ProviderKind;

    fn model(fail_attempts: u32) -> Simulated {
        Simulated::new(&ModelConfig {
            name: "sim".into(),
            provider: ProviderKind::Simulated,
            base_url: None,
            model: None,
            api_key_env: None,
            timeout_secs: 1,
            retries: 0,
            max_concurrency: 1,
            latency_ms: 0,
            tokens_per_sec: 1000,
            fail_attempts,
        })
    }

    fn tracked(sim: &Simulated) -> usize {
        sim.attempts.lock().unwrap().len()
    }

    #[test]
    fn prompts_are_not_kept() {
        let sim = model(0);
        for i in 0..100 {
            assert!(!sim.should_fail(&format!("prompt {i}")));
        }
        assert_eq!(tracked(&sim), 0, "nothing to count without fail_attempts");

        let sim = model(2);
        assert!(sim.should_fail("p") && sim.should_fail("p"));
        assert!(!sim.should_fail("p"), "the third attempt succeeds");
        assert_eq!(tracked(&sim), 0, "a prompt that succeeded is forgotten");

        for i in 0..MAX_TRACKED_PROMPTS * 3 {
            assert!(sim.should_fail(&format!("still failing {i}")));
        }
        assert!(tracked(&sim) <= MAX_TRACKED_PROMPTS, "{}", tracked(&sim));
    }
}
