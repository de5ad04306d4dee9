//! `herald demo`: creates a session on a running server and prints its events as they
//! are logged, answering clarifications itself, so a newcomer sees the whole flow in one
//! terminal. It follows the session through the HTTP history route (the polling fallback
//! of SPEC §2), which needs no Socket.IO client.

use std::io::Write;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::event::{ClarificationStatus, EventKind, SessionStatus};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// The herald to talk to.
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:3000")]
    pub url: String,
    /// A prompt (repeat for several). `[clarify]` in a prompt makes simulated models ask first.
    #[arg(long = "prompt")]
    pub prompts: Vec<String>,
    /// A model to use (repeat for several); default: every configured model.
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// `all` or `fallback`.
    #[arg(long, default_value = "all")]
    pub strategy: String,
    /// The answer given to every clarification question.
    #[arg(long, default_value = "Keep it short, please.")]
    pub answer: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    /// Credential for a herald with auth on: a token with `create` (e.g. from `herald token
    /// --sub me --scope 'read answer create'`) or an API key.
    #[arg(long, env = "HERALD_TOKEN", hide_env_values = true)]
    pub token: Option<crate::config::Secret>,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot reach herald at {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("herald refused the request ({status}): {body}")]
    Refused { status: u16, body: String },
    #[error("the session ended {0}")]
    Ended(String),
    #[error("gave up after {0} s")]
    Timeout(u64),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

/// How a demo session ended, when it ended well.
#[derive(Debug, PartialEq, Eq)]
pub struct Finished {
    pub session_id: String,
    pub events: u64,
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<crate::config::Secret>,
}

impl Client {
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, DemoError> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token.expose()),
            None => request,
        };
        let response = request
            .send()
            .await
            .map_err(|source| DemoError::Unreachable {
                url: self.base.clone(),
                source,
            })?;
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        if !(200..300).contains(&status) {
            return Err(DemoError::Refused { status, body });
        }
        Ok(serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value, DemoError> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    async fn get(&self, path: &str) -> Result<Value, DemoError> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }
}

/// Runs the demo, writing a line per event to `out`.
pub async fn run(args: DemoArgs, out: &mut (dyn Write + Send)) -> Result<Finished, DemoError> {
    let client = Client {
        http: reqwest::Client::new(),
        base: args.url.trim_end_matches('/').to_owned(),
        token: args.token.clone(),
    };
    let prompts = if args.prompts.is_empty() {
        vec![
            "Summarise the history of the printing press in two sentences.".to_owned(),
            "Write a haiku about [clarify] the sea.".to_owned(),
        ]
    } else {
        args.prompts.clone()
    };
    let mut request = json!({ "prompts": prompts, "strategy": args.strategy });
    if !args.models.is_empty() {
        request["models"] = json!(args.models);
    }
    let created = client.post("/api/wizard/sessions", &request).await?;
    let session_id = created["sessionId"].as_str().unwrap_or_default().to_owned();
    writeln!(out, "session {session_id} created; following its events")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut after = 0;
    loop {
        let page = client
            .get(&format!(
                "/api/wizard/session/{session_id}/events?after={after}&limit=1000"
            ))
            .await?;
        for item in page["events"].as_array().into_iter().flatten() {
            after = item["seq"].as_u64().unwrap_or(after);
            let data = &item["data"];
            // The log holds the five session events only.
            let Some(kind) = item["event"].as_str().and_then(EventKind::parse) else {
                continue;
            };
            writeln!(out, "{}", describe(kind, data))?;
            match kind {
                EventKind::Clarification if status(data) == Some(ClarificationStatus::Pending) => {
                    let answer = json!({ "sessionId": session_id, "clarificationId": data["clarificationId"], "answer": args.answer });
                    client
                        .post("/api/wizard/clarifications/respond", &answer)
                        .await?;
                    writeln!(out, "      answered: {}", args.answer)?;
                }
                EventKind::Completed => {
                    return Ok(Finished {
                        session_id,
                        events: after,
                    });
                }
                EventKind::Error => {
                    return Err(DemoError::Ended(format!(
                        "with an error: {}",
                        data["error"]
                    )));
                }
                EventKind::Progress if status(data) == Some(SessionStatus::Expired) => {
                    return Err(DemoError::Ended(SessionStatus::Expired.to_string()));
                }
                _ => {}
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DemoError::Timeout(args.timeout_secs));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An event's `status`, as the status enum of its kind.
fn status<S: DeserializeOwned>(data: &Value) -> Option<S> {
    S::deserialize(&data["status"]).ok()
}

/// One line for one event.
fn describe(kind: EventKind, data: &Value) -> String {
    let seq = data["seq"].as_u64().unwrap_or(0);
    let text = |key: &str| data[key].as_str().unwrap_or("").to_owned();
    let detail = match kind {
        EventKind::Progress => format!(
            "{} {}% prompts {}/{} done{}",
            text("status"),
            data["progress"],
            data["prompts"]["completed"],
            data["prompts"]["total"],
            if data["hasClarifications"] == true {
                ", waiting for an answer"
            } else {
                ""
            }
        ),
        EventKind::ModelResult => {
            let result = text("result");
            let shown: String = result.chars().take(70).collect();
            let more = if result.chars().count() > 70 {
                "…"
            } else {
                ""
            };
            format!(
                "{} {} on {}: {shown}{more}",
                text("status"),
                text("modelName"),
                text("promptId")
            )
        }
        EventKind::Clarification => format!("{} {}", text("status"), text("question")),
        EventKind::Completed => "the session completed".to_owned(),
        EventKind::Error => format!("{} ({})", text("error"), text("code")),
    };
    format!("{seq:>4} {:<13} {detail}", kind.as_str())
}
