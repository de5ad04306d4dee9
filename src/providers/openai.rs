//! The OpenAI chat-completions API (also spoken by vLLM, llama.cpp's server, LM Studio and
//! most hosted providers): `POST {base}/chat/completions`, streamed as server-sent events.

use async_trait::async_trait;
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::{ChatMessage, Provider, ProviderError, TokenStream, check_status, lines};

pub struct OpenAi {
    http: reqwest::Client,
    url: String,
    model: String,
    api_key_env: Option<String>,
}

impl OpenAi {
    pub fn new(
        http: reqwest::Client,
        base_url: String,
        model: &str,
        api_key_env: Option<String>,
    ) -> Self {
        let url = format!("{}/chat/completions", base_url.trim_end_matches('/'));
        Self {
            http,
            url,
            model: model.to_owned(),
            api_key_env,
        }
    }

    /// The key is read at each request, so rotating it needs no restart.
    fn api_key(&self) -> Result<Option<String>, ProviderError> {
        match &self.api_key_env {
            None => Ok(None),
            Some(var) => std::env::var(var)
                .map(Some)
                .map_err(|_| ProviderError::MissingKey(var.clone())),
        }
    }
}

/// What one SSE line contributes.
pub(super) enum Line {
    Piece(String),
    Done,
    Skip,
}

#[async_trait]
impl Provider for OpenAi {
    async fn chat(&self, messages: Vec<ChatMessage>) -> Result<TokenStream, ProviderError> {
        let body = json!({ "model": self.model, "messages": messages, "stream": true });
        let mut request = self.http.post(&self.url).json(&body);
        if let Some(key) = self.api_key()? {
            request = request.bearer_auth(key);
        }
        let response = check_status(request.send().await?).await?;
        let pieces = lines(response.bytes_stream())
            .map(|line| line.and_then(|l| parse_line(&l)))
            .take_while(|line| std::future::ready(!matches!(line, Ok(Line::Done))))
            .filter_map(|line| async move {
                match line {
                    Ok(Line::Piece(piece)) => Some(Ok(piece)),
                    Ok(Line::Done | Line::Skip) => None,
                    Err(error) => Some(Err(error)),
                }
            });
        Ok(Box::pin(pieces))
    }
}

/// `data: {choices:[{delta:{content}}]}`, `data: [DONE]`, or anything else an SSE stream
/// may carry (comments, `event:` lines, blank separators).
pub(super) fn parse_line(line: &str) -> Result<Line, ProviderError> {
    let Some(data) = line.strip_prefix("data:") else {
        return Ok(Line::Skip);
    };
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(Line::Done);
    }
    let value: Value =
        serde_json::from_str(data).map_err(|e| ProviderError::Malformed(format!("{e}: {data}")))?;
    if let Some(message) = value.pointer("/error/message").and_then(Value::as_str) {
        return Err(ProviderError::Status {
            status: 200,
            message: message.to_owned(),
        });
    }
    let piece = value
        .pointer("/choices/0/delta/content")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Ok(Line::Piece(piece.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::{Line, parse_line};

    #[test]
    fn sse_lines_give_deltas_done_or_nothing() {
        let chunk =
            r#"data: {"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":null}]}"#;
        assert!(matches!(parse_line(chunk), Ok(Line::Piece(p)) if p == "lo"));
        assert!(matches!(parse_line("data: [DONE]"), Ok(Line::Done)));
        assert!(matches!(parse_line(": keep-alive"), Ok(Line::Skip)));
        assert!(matches!(parse_line(""), Ok(Line::Skip)));
        let role_only = r#"data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#;
        assert!(matches!(parse_line(role_only), Ok(Line::Piece(p)) if p.is_empty()));
        assert!(parse_line(r#"data: {"error":{"message":"rate limited"}}"#).is_err());
    }
}
