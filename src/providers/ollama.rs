//! Ollama's chat API: `POST {base}/api/chat`, streamed as NDJSON.

use async_trait::async_trait;
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::{ChatMessage, Provider, ProviderError, TokenStream, check_status, lines};

pub struct Ollama {
    http: reqwest::Client,
    url: String,
    model: String,
}

impl Ollama {
    pub fn new(http: reqwest::Client, base_url: String, model: &str) -> Self {
        let url = format!("{}/api/chat", base_url.trim_end_matches('/'));
        Self {
            http,
            url,
            model: model.to_owned(),
        }
    }
}

#[async_trait]
impl Provider for Ollama {
    async fn chat(&self, messages: Vec<ChatMessage>) -> Result<TokenStream, ProviderError> {
        let body = json!({ "model": self.model, "messages": messages, "stream": true });
        let response = check_status(self.http.post(&self.url).json(&body).send().await?).await?;
        let pieces = lines(response.bytes_stream()).filter_map(|line| async move {
            let line = match line {
                Ok(line) if line.trim().is_empty() => return None,
                Ok(line) => line,
                Err(error) => return Some(Err(error)),
            };
            Some(parse_line(&line))
        });
        Ok(Box::pin(pieces))
    }
}

/// One NDJSON line: `{ message: { content }, done }`, or `{ error }`.
pub(super) fn parse_line(line: &str) -> Result<String, ProviderError> {
    let value: Value =
        serde_json::from_str(line).map_err(|e| ProviderError::Malformed(format!("{e}: {line}")))?;
    if let Some(error) = value.get("error").and_then(Value::as_str) {
        return Err(ProviderError::Status {
            status: 200,
            message: error.to_owned(),
        });
    }
    Ok(value
        .pointer("/message/content")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::parse_line;

    #[test]
    fn ndjson_lines_give_content_or_errors() {
        let line = r#"{"model":"m","message":{"role":"assistant","content":"Hel"},"done":false}"#;
        assert_eq!(parse_line(line).unwrap(), "Hel");
        assert_eq!(parse_line(r#"{"model":"m","done":true}"#).unwrap(), "");
        assert!(
            parse_line(r#"{"error":"model not found"}"#)
                .unwrap_err()
                .to_string()
                .contains("model not found")
        );
        assert!(parse_line("not json").is_err());
    }
}
