//! Model providers: one trait, one implementation per wire format.
//!
//! A provider turns a conversation into a stream of text pieces. Everything else (retries,
//! timeouts, throttled partial updates, clarifications) is the orchestrator's, so each
//! provider stays a thin translation of its wire format.

mod ollama;
mod openai;
mod simulated;

use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::Stream;
use serde::Serialize;

use crate::orchestrator::config::{ModelConfig, ProviderKind};

/// The line a model answers with when it needs more information.
pub const CLARIFICATION_MARKER: &str = "CLARIFICATION_NEEDED:";

/// Sent first in every conversation with a real model: how to ask for clarification.
pub const SYSTEM_PROMPT: &str = "You are one of several models answering the user's prompt. \
If the prompt is too ambiguous to answer well, do not guess: reply with exactly one line \
`CLARIFICATION_NEEDED: <your question>` and nothing else. Otherwise answer directly.";

/// The question in a model's output, if the output is a clarification request.
pub fn clarification_question(output: &str) -> Option<&str> {
    let rest = output.trim_start().strip_prefix(CLARIFICATION_MARKER)?;
    let question = rest.trim();
    Some(if question.is_empty() {
        "Could you clarify the prompt?"
    } else {
        question
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    #[error("request failed: {0}")]
    Transport(String),
    #[error("provider answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("simulated failure")]
    Simulated,
    #[error("missing API key: set {0}")]
    MissingKey(String),
}

impl ProviderError {
    /// What clients are told (`model_result.error`): short, stable, and free of what the
    /// provider or the transport said, which may hold URLs, keys or echoed prompts. The
    /// full error is for the server log (the orchestrator logs it with `tracing::warn!`).
    pub fn public_message(&self) -> String {
        match self {
            ProviderError::Transport(_) => "the provider could not be reached".into(),
            // Ollama and OpenAI report some failures inside a 200 stream.
            ProviderError::Status { status: 200, .. } => {
                "the provider reported an error in its stream".into()
            }
            ProviderError::Status { status, .. } => {
                format!("the provider answered with HTTP {status}")
            }
            ProviderError::Malformed(_) => "the provider's stream was malformed".into(),
            ProviderError::Simulated => "simulated failure".into(),
            ProviderError::MissingKey(_) => "the model's API key is not configured".into(),
        }
    }
}

impl From<reqwest::Error> for ProviderError {
    fn from(error: reqwest::Error) -> Self {
        ProviderError::Transport(error.to_string())
    }
}

/// The reply, piece by piece.
pub type TokenStream = Pin<Box<dyn Stream<Item = Result<String, ProviderError>> + Send>>;

#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Starts the model on `messages`; the stream yields the reply as it is produced.
    async fn chat(&self, messages: Vec<ChatMessage>) -> Result<TokenStream, ProviderError>;
}

/// Builds the provider a model's configuration names.
pub fn build(model: &ModelConfig, http: &reqwest::Client) -> Arc<dyn Provider> {
    let base_url = model.base_url.clone().unwrap_or_default();
    match model.provider {
        ProviderKind::Simulated => Arc::new(simulated::Simulated::new(model)),
        ProviderKind::Ollama => Arc::new(ollama::Ollama::new(
            http.clone(),
            base_url,
            model.provider_model(),
        )),
        ProviderKind::Openai => Arc::new(openai::OpenAi::new(
            http.clone(),
            base_url,
            model.provider_model(),
            model.api_key_env.clone(),
        )),
    }
}

/// Bytes of an error body read for the log; the rest is not read.
const MAX_ERROR_BODY: usize = 4096;

/// Longest line of a streamed reply: one token's chunk, or a whole reply from a provider
/// that ignores `stream`. A longer line is a malformed stream, so a provider that never
/// sends a newline cannot grow a buffer without end.
const MAX_LINE: usize = 4 * 1024 * 1024;

/// Fails with the body's error message when the status is not a success.
async fn check_status(mut response: reqwest::Response) -> Result<reqwest::Response, ProviderError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let mut raw = Vec::new();
    while raw.len() < MAX_ERROR_BODY {
        match response.chunk().await {
            Ok(Some(chunk)) => raw.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    raw.truncate(MAX_ERROR_BODY);
    let body = String::from_utf8_lossy(&raw);
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("error"))
                .and_then(|e| e.as_str().map(str::to_owned))
        })
        .unwrap_or_else(|| body.chars().take(200).collect());
    Err(ProviderError::Status {
        status: status.as_u16(),
        message,
    })
}

/// Splits a byte stream into lines, across chunk boundaries.
fn lines(
    bytes: impl Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Send + 'static,
) -> impl Stream<Item = Result<String, ProviderError>> + Send {
    use futures_util::StreamExt;
    futures_util::stream::unfold(
        (Box::pin(bytes), Vec::<u8>::new(), false),
        |(mut bytes, mut buffer, mut ended)| async move {
            loop {
                if let Some(end) = buffer.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=end).collect();
                    let line = String::from_utf8_lossy(&line)
                        .trim_end_matches(['\r', '\n'])
                        .to_owned();
                    return Some((Ok(line), (bytes, buffer, ended)));
                }
                if buffer.len() > MAX_LINE {
                    let error = ProviderError::Malformed(format!("a line over {MAX_LINE} bytes"));
                    return Some((Err(error), (bytes, Vec::new(), true)));
                }
                if ended {
                    if buffer.is_empty() {
                        return None;
                    }
                    let line = String::from_utf8_lossy(&std::mem::take(&mut buffer)).into_owned();
                    return Some((Ok(line), (bytes, buffer, ended)));
                }
                match bytes.next().await {
                    Some(Ok(chunk)) => buffer.extend_from_slice(&chunk),
                    Some(Err(error)) => return Some((Err(error.into()), (bytes, buffer, true))),
                    None => ended = true,
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::clarification_question;

    #[test]
    fn clarification_marker_is_detected_at_the_start_only() {
        assert_eq!(
            clarification_question("  CLARIFICATION_NEEDED: Which year?\n"),
            Some("Which year?")
        );
        assert_eq!(
            clarification_question("The answer. CLARIFICATION_NEEDED: no"),
            None
        );
        assert_eq!(
            clarification_question("CLARIFICATION_NEEDED:"),
            Some("Could you clarify the prompt?")
        );
    }
}

#[cfg(test)]
mod line_tests {
    use futures_util::StreamExt;

    #[tokio::test]
    async fn lines_are_reassembled_across_chunks() {
        let chunks: Vec<Result<bytes::Bytes, reqwest::Error>> =
            ["{\"a\":", "1}\n{\"b\"", ":2}\r\n", "tail"]
                .into_iter()
                .map(|c| Ok(bytes::Bytes::from(c)))
                .collect();
        let lines: Vec<String> = super::lines(futures_util::stream::iter(chunks))
            .map(Result::unwrap)
            .collect()
            .await;
        assert_eq!(lines, ["{\"a\":1}", "{\"b\":2}", "tail"]);
    }

    #[tokio::test]
    async fn a_line_without_end_is_malformed_not_buffered() {
        let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
        let endless = futures_util::stream::repeat_with(move || Ok(chunk.clone()));
        let mut lines = Box::pin(super::lines(endless));
        let first = lines.next().await.expect("an item");
        assert!(
            matches!(first, Err(super::ProviderError::Malformed(_))),
            "{first:?}"
        );
        assert!(lines.next().await.is_none());
    }
}

#[cfg(test)]
mod fuzz {
    use futures_util::StreamExt;

    use crate::fuzzing::Fuzz;

    const STREAMS: &[&[u8]] = &[
        b"data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\ndata: [DONE]\n",
        b"{\"message\":{\"content\":\"hi\"},\"done\":false}\r\n{\"done\":true}\n",
        b"{\"error\":\"model 'x' not found, see https://provider.example/docs?key=sk-SECRET\"}\n",
    ];

    /// However a provider's bytes are cut into chunks, the lines that come out are the
    /// lines that went in; every line then parses to a piece or an error whose client-facing
    /// text holds nothing the provider sent.
    #[test]
    fn fuzz_provider_streams() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        Fuzz::new("provider stream").run(STREAMS, |input| {
            let chunks = chunked(input);
            let lines: Vec<String> = runtime.block_on(
                super::lines(futures_util::stream::iter(chunks))
                    .map(|line| line.expect("lines under the limit"))
                    .collect(),
            );
            assert_eq!(lines, expected_lines(input));
            for line in &lines {
                for parsed in [
                    super::openai::parse_line(line).map(|_| ()),
                    super::ollama::parse_line(line).map(|_| ()),
                ] {
                    if let Err(error) = parsed {
                        let public = error.public_message();
                        assert!(
                            !public.contains("SECRET") && !public.contains("http"),
                            "{public}"
                        );
                        assert!(public.len() <= 80, "{public}");
                    }
                }
            }
        });
    }

    /// Chunk boundaries chosen from the input itself, so a failure replays exactly.
    fn chunked(input: &[u8]) -> Vec<Result<bytes::Bytes, reqwest::Error>> {
        let mut rng = fastrand::Rng::with_seed(
            input.len() as u64 ^ u64::from(input.first().copied().unwrap_or(0)),
        );
        let mut chunks = Vec::new();
        let mut rest = input;
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(rng.usize(1..=rest.len().min(16)));
            chunks.push(Ok(bytes::Bytes::copy_from_slice(chunk)));
            rest = tail;
        }
        chunks
    }

    fn expected_lines(input: &[u8]) -> Vec<String> {
        let mut lines: Vec<String> = input
            .split_inclusive(|&b| b == b'\n')
            .map(|line| String::from_utf8_lossy(line).into_owned())
            .collect();
        for line in &mut lines {
            if line.ends_with('\n') {
                let kept = line.trim_end_matches(['\r', '\n']).len();
                line.truncate(kept);
            }
        }
        lines
    }
}
