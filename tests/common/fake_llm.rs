//! Fake model providers on a loopback port, speaking the real wire formats herald's
//! `ollama` and `openai` providers use:
//!
//! - Ollama: `POST /api/chat` → `200 application/x-ndjson`, one JSON object per line
//!   (`{"message":{"role":"assistant","content":..},"done":false}` … then a `"done":true`
//!   line); errors as non-2xx with `{"error":".."}`.
//! - OpenAI: `POST /v1/chat/completions` → `200 text/event-stream` with
//!   `data: {"object":"chat.completion.chunk","choices":[{"delta":{..}}]}` events, a final
//!   chunk with `finish_reason: "stop"`, then `data: [DONE]`; errors as non-2xx with
//!   `{"error":{"message":..}}`; `Authorization: Bearer <key>` checked when a key is set.
//!
//! Replies are deterministic ([`expected_reply`], [`clarify_question`]) and the fake
//! counts what it saw, so tests can assert retries, the conversation herald sent, and that
//! a dropped request really stopped streaming.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// How a fake answers. Shared by both wire formats of one fake; change it with
/// [`FakeLlm::set`].
#[derive(Debug, Clone)]
pub struct FakeBehavior {
    /// Tokens in a normal reply (at least 1).
    pub tokens: usize,
    /// Pause before every token after the first.
    pub token_delay: Duration,
    /// Answer 500 to the first N requests per (model, first user prompt), then succeed.
    pub fail_first: usize,
    /// Answer 500 to every request whose prompt contains this text.
    pub fail_marker: Option<String>,
    /// Accept requests and never answer them.
    pub hang: bool,
    /// Answer 200 with a body that is not the provider's stream format.
    pub malformed: bool,
    /// When the last user message contains this text and the conversation has no
    /// assistant message yet, reply `CLARIFICATION_NEEDED: <question>`.
    pub clarify_marker: Option<String>,
    /// The OpenAI route requires `Authorization: Bearer <key>` when set (401 otherwise).
    pub api_key: Option<String>,
    /// The status of the failures above (500 when unset).
    pub fail_status: Option<u16>,
    /// The error message of the failures above (`fake failure (attempt N)` when unset).
    pub fail_message: Option<String>,
    /// Stream tokens without end (each `token_delay` apart), never finishing the reply.
    pub endless: bool,
}

impl Default for FakeBehavior {
    fn default() -> Self {
        Self {
            tokens: 5,
            token_delay: Duration::ZERO,
            fail_first: 0,
            fail_marker: None,
            hang: false,
            malformed: false,
            clarify_marker: None,
            api_key: None,
            fail_status: None,
            fail_message: None,
            endless: false,
        }
    }
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// `"ollama"` or `"openai"`.
    pub wire: &'static str,
    pub model: String,
    /// The first user message: what the fake counts requests by.
    pub prompt: String,
    pub body: Value,
    pub authorization: Option<String>,
    /// The status the fake answered with.
    pub status: u16,
    /// When it arrived.
    pub at: std::time::Instant,
}

/// What the fake has seen so far.
#[derive(Debug, Clone, Default)]
pub struct FakeStats {
    pub requests: Vec<SeenRequest>,
    /// Streaming replies (and hanging requests) begun.
    pub started: usize,
    /// Streaming replies that produced their last chunk.
    pub finished: usize,
    /// Streaming replies (or hanging requests) dropped before their last chunk: the client
    /// went away.
    pub aborted: usize,
    /// Streaming replies (or hanging requests) currently open.
    pub in_flight: usize,
    /// The most streaming replies (or hanging requests) open at once.
    pub max_in_flight: usize,
    /// Requests to a path the fake does not serve.
    pub unmatched: Vec<String>,
}

impl FakeStats {
    /// Requests for `prompt` (the first user message) by any model.
    pub fn requests_for(&self, prompt: &str) -> usize {
        self.requests.iter().filter(|r| r.prompt == prompt).count()
    }

    /// Requests for `prompt` to provider model id `model`.
    pub fn requests_for_model(&self, model: &str, prompt: &str) -> usize {
        self.requests
            .iter()
            .filter(|r| r.model == model && r.prompt == prompt)
            .count()
    }
}

struct Shared {
    behavior: Mutex<FakeBehavior>,
    stats: Mutex<FakeStats>,
    changed: Notify,
    counter: Mutex<HashMap<(String, String), usize>>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut FakeStats)) {
        f(&mut self.stats.lock().unwrap());
        self.changed.notify_waiters();
    }
}

/// A fake provider server on `127.0.0.1:<random port>`; stops when dropped.
pub struct FakeLlm {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    handle: JoinHandle<()>,
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

impl FakeLlm {
    pub async fn start(behavior: FakeBehavior) -> FakeLlm {
        let shared = Arc::new(Shared {
            behavior: Mutex::new(behavior),
            stats: Mutex::new(FakeStats::default()),
            changed: Notify::new(),
            counter: Mutex::new(HashMap::new()),
        });
        let app = Router::new()
            .route("/api/chat", post(ollama_chat))
            .route("/v1/chat/completions", post(openai_chat))
            .fallback(unmatched)
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake provider binds");
        let addr = listener.local_addr().unwrap();
        let handle = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeLlm {
            addr,
            shared,
            handle,
        }
    }

    /// `base_url` for an `ollama` model.
    pub fn ollama_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `base_url` for an `openai` model (herald posts to `{base_url}/chat/completions`).
    pub fn openai_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn set(&self, f: impl FnOnce(&mut FakeBehavior)) {
        f(&mut self.shared.behavior.lock().unwrap());
    }

    pub fn stats(&self) -> FakeStats {
        self.shared.stats.lock().unwrap().clone()
    }

    /// Waits (at most `limit`) until `cond` holds for the stats; returns them, or panics
    /// with `what` and the last stats.
    pub async fn wait_until(
        &self,
        what: &str,
        limit: Duration,
        cond: impl Fn(&FakeStats) -> bool,
    ) -> FakeStats {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let stats = self.stats();
            if cond(&stats) {
                return stats;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let stats = self.stats();
                if cond(&stats) {
                    return stats;
                }
                panic!(
                    "fake provider: {what} did not happen within {limit:?}; \
                     started {} finished {} aborted {} in flight {} requests {}",
                    stats.started,
                    stats.finished,
                    stats.aborted,
                    stats.in_flight,
                    stats.requests.len()
                );
            }
        }
    }
}

/// The normal reply of `model` to `prompt` with `tokens` tokens, as the client sees it
/// once concatenated.
pub fn expected_reply(model: &str, prompt: &str, tokens: usize) -> String {
    reply_tokens(model, prompt, None, tokens).concat()
}

/// The question a fake asks about `prompt` (the text after `CLARIFICATION_NEEDED: `).
pub fn clarify_question(prompt: &str) -> String {
    format!("Which part of \"{prompt}\" matters most?")
}

fn reply_tokens(model: &str, prompt: &str, answer: Option<&str>, tokens: usize) -> Vec<String> {
    let mut out = vec![format!("{model} answers \"{prompt}\":")];
    for i in 1..tokens.max(1) {
        out.push(format!(" w{i}"));
    }
    if let Some(answer) = answer {
        out.push(format!(" (answer: {answer})"));
    }
    out
}

fn clarify_tokens(prompt: &str) -> Vec<String> {
    let line = format!("CLARIFICATION_NEEDED: {}", clarify_question(prompt));
    // Split after every space so the marker itself arrives in pieces, as a real model's
    // tokens would.
    let mut out = Vec::new();
    let mut current = String::new();
    for c in line.chars() {
        current.push(c);
        if c == ' ' {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Wire {
    Ollama,
    OpenAi,
}

impl Wire {
    fn name(self) -> &'static str {
        match self {
            Wire::Ollama => "ollama",
            Wire::OpenAi => "openai",
        }
    }

    fn error(self, status: StatusCode, message: &str) -> Response {
        let body = match self {
            Wire::Ollama => json!({ "error": message }),
            Wire::OpenAi => {
                let (kind, code) = match status {
                    StatusCode::UNAUTHORIZED => ("invalid_request_error", json!("invalid_api_key")),
                    StatusCode::BAD_REQUEST => ("invalid_request_error", Value::Null),
                    _ => ("server_error", Value::Null),
                };
                json!({ "error": { "message": message, "type": kind, "param": null, "code": code } })
            }
        };
        (status, axum::Json(body)).into_response()
    }
}

async fn unmatched(State(shared): State<Arc<Shared>>, uri: axum::http::Uri) -> Response {
    shared.update(|s| s.unmatched.push(uri.to_string()));
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({ "error": format!("no route for {uri}") })),
    )
        .into_response()
}

async fn ollama_chat(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    chat(shared, Wire::Ollama, headers, body).await
}

async fn openai_chat(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    chat(shared, Wire::OpenAi, headers, body).await
}

/// Counts open streams; a stream dropped before its last chunk counts as aborted.
struct StreamGuard {
    shared: Arc<Shared>,
    finished: bool,
}

impl StreamGuard {
    fn new(shared: Arc<Shared>) -> Self {
        shared.update(|s| {
            s.started += 1;
            s.in_flight += 1;
            s.max_in_flight = s.max_in_flight.max(s.in_flight);
        });
        Self {
            shared,
            finished: false,
        }
    }

    /// The last chunk is produced: the stream is no longer in flight, even before the
    /// server has written that chunk and dropped the body.
    fn finish(&mut self) {
        if !self.finished {
            self.finished = true;
            self.shared.update(|s| {
                s.finished += 1;
                s.in_flight -= 1;
            });
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let finished = self.finished;
        if !finished {
            self.shared.update(|s| {
                s.in_flight -= 1;
                s.aborted += 1;
            });
        }
    }
}

async fn chat(shared: Arc<Shared>, wire: Wire, headers: HeaderMap, body: Bytes) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return wire.error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")),
    };
    let model = parsed["model"].as_str().unwrap_or_default().to_owned();
    let messages: Vec<(String, String)> = parsed["messages"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|m| {
                    (
                        m["role"].as_str().unwrap_or_default().to_owned(),
                        m["content"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let prompt = messages
        .iter()
        .find(|(role, _)| role == "user")
        .map(|(_, c)| c.clone())
        .unwrap_or_default();
    let behavior = shared.behavior.lock().unwrap().clone();

    let record = |status: StatusCode| {
        let seen = SeenRequest {
            wire: wire.name(),
            model: model.clone(),
            prompt: prompt.clone(),
            body: parsed.clone(),
            authorization: authorization.clone(),
            status: status.as_u16(),
            at: std::time::Instant::now(),
        };
        shared.update(|s| s.requests.push(seen));
    };

    // Requests herald must never send.
    let bad_request = if model.is_empty() {
        Some("model is required".to_owned())
    } else if messages.is_empty() || prompt.is_empty() {
        Some("messages must hold a user message".to_owned())
    } else {
        match (wire, parsed.get("stream")) {
            // Ollama streams unless told otherwise; OpenAI only when asked to.
            (Wire::Ollama, None | Some(Value::Bool(true))) => None,
            (Wire::OpenAi, Some(Value::Bool(true))) => None,
            (_, other) => Some(format!("this fake only streams; stream = {other:?}")),
        }
    };
    if let Some(message) = bad_request {
        record(StatusCode::BAD_REQUEST);
        return wire.error(StatusCode::BAD_REQUEST, &message);
    }

    if wire == Wire::OpenAi
        && let Some(key) = &behavior.api_key
        && authorization.as_deref() != Some(&format!("Bearer {key}"))
    {
        record(StatusCode::UNAUTHORIZED);
        return wire.error(StatusCode::UNAUTHORIZED, "Incorrect API key provided");
    }

    let attempt = {
        let mut counter = shared.counter.lock().unwrap();
        let n = counter.entry((model.clone(), prompt.clone())).or_insert(0);
        *n += 1;
        *n
    };
    let marked = behavior
        .fail_marker
        .as_deref()
        .is_some_and(|m| prompt.contains(m));
    if attempt <= behavior.fail_first || marked {
        let status = behavior
            .fail_status
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        record(status);
        let message = behavior
            .fail_message
            .clone()
            .unwrap_or_else(|| format!("fake failure (attempt {attempt})"));
        return wire.error(status, &message);
    }

    if behavior.malformed {
        record(StatusCode::OK);
        let (content_type, body) = match wire {
            Wire::Ollama => ("application/x-ndjson", "this is not JSON\n{\"done\":\n"),
            Wire::OpenAi => ("text/event-stream", "data: {not json}\n\n"),
        };
        return (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body).into_response();
    }

    if behavior.hang {
        record(StatusCode::OK);
        let _guard = StreamGuard::new(shared.clone());
        return std::future::pending::<Response>().await;
    }

    if behavior.endless {
        record(StatusCode::OK);
        return stream_endless(shared, wire, model, behavior.token_delay);
    }

    let last_user = messages
        .iter()
        .rev()
        .find(|(role, _)| role == "user")
        .map(|(_, c)| c.clone())
        .unwrap_or_default();
    let has_assistant = messages.iter().any(|(role, _)| role == "assistant");
    let tokens = match &behavior.clarify_marker {
        Some(marker) if last_user.contains(marker.as_str()) && !has_assistant => {
            clarify_tokens(&prompt)
        }
        Some(_) if has_assistant => {
            reply_tokens(&model, &prompt, Some(&last_user), behavior.tokens)
        }
        _ => reply_tokens(&model, &prompt, None, behavior.tokens),
    };
    record(StatusCode::OK);
    stream_reply(shared, wire, model, tokens, behavior.token_delay)
}

struct StreamState {
    guard: StreamGuard,
    wire: Wire,
    model: String,
    tokens: std::vec::IntoIter<String>,
    delay: Duration,
    sent: usize,
    /// 0: role chunk (OpenAI) / tokens; 1: final chunk sent; 2: ended.
    phase: u8,
}

fn stream_reply(
    shared: Arc<Shared>,
    wire: Wire,
    model: String,
    tokens: Vec<String>,
    delay: Duration,
) -> Response {
    let state = StreamState {
        guard: StreamGuard::new(shared),
        wire,
        model,
        tokens: tokens.into_iter(),
        delay,
        sent: 0,
        phase: 0,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        if st.phase == 2 {
            return None;
        }
        if st.phase == 1 {
            st.phase = 2;
            st.guard.finish();
            return match st.wire {
                Wire::OpenAi => Some((Ok::<_, Infallible>(Bytes::from("data: [DONE]\n\n")), st)),
                Wire::Ollama => None,
            };
        }
        if st.wire == Wire::OpenAi && st.sent == 0 {
            st.sent += 1;
            // OpenAI opens every stream with the role and empty content.
            let chunk = openai_chunk(
                &st.model,
                json!({ "role": "assistant", "content": "" }),
                None,
            );
            return Some((Ok(chunk), st));
        }
        match st.tokens.next() {
            Some(token) => {
                let first = st.sent == 0 || (st.wire == Wire::OpenAi && st.sent == 1);
                if !first && !st.delay.is_zero() {
                    tokio::time::sleep(st.delay).await;
                }
                st.sent += 1;
                let chunk = match st.wire {
                    Wire::Ollama => ollama_line(&st.model, &token, false),
                    Wire::OpenAi => openai_chunk(&st.model, json!({ "content": token }), None),
                };
                Some((Ok(chunk), st))
            }
            None => {
                st.phase = 1;
                let chunk = match st.wire {
                    Wire::Ollama => {
                        st.phase = 2;
                        st.guard.finish();
                        ollama_line(&st.model, "", true)
                    }
                    Wire::OpenAi => openai_chunk(&st.model, json!({}), Some("stop")),
                };
                Some((Ok(chunk), st))
            }
        }
    });
    let content_type = match wire {
        Wire::Ollama => "application/x-ndjson",
        Wire::OpenAi => "text/event-stream",
    };
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// A reply that never ends: one token after another, until the client goes away (the
/// stream's guard then counts it aborted).
fn stream_endless(shared: Arc<Shared>, wire: Wire, model: String, delay: Duration) -> Response {
    let guard = StreamGuard::new(shared);
    let stream = futures_util::stream::unfold((guard, 0u64), move |(guard, n)| {
        let model = model.clone();
        async move {
            if n > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let token = format!(" w{n}");
            let chunk = match wire {
                Wire::Ollama => ollama_line(&model, &token, false),
                Wire::OpenAi => openai_chunk(&model, json!({ "content": token }), None),
            };
            Some((Ok::<_, Infallible>(chunk), (guard, n + 1)))
        }
    });
    let content_type = match wire {
        Wire::Ollama => "application/x-ndjson",
        Wire::OpenAi => "text/event-stream",
    };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(stream),
    )
        .into_response()
}

const CREATED_AT: &str = "2026-01-02T03:04:05.678901234Z";

fn ollama_line(model: &str, content: &str, done: bool) -> Bytes {
    let mut line = if done {
        json!({
            "model": model,
            "created_at": CREATED_AT,
            "message": { "role": "assistant", "content": content },
            "done": true,
            "done_reason": "stop",
            "total_duration": 1_234_567,
            "load_duration": 1_000,
            "prompt_eval_count": 12,
            "eval_count": 34,
            "eval_duration": 1_000_000
        })
        .to_string()
    } else {
        json!({
            "model": model,
            "created_at": CREATED_AT,
            "message": { "role": "assistant", "content": content },
            "done": false
        })
        .to_string()
    };
    line.push('\n');
    Bytes::from(line)
}

fn openai_chunk(model: &str, delta: Value, finish_reason: Option<&str>) -> Bytes {
    let chunk = json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1_767_323_045,
        "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [{
            "index": 0,
            "delta": delta,
            "logprobs": null,
            "finish_reason": finish_reason
        }]
    });
    Bytes::from(format!("data: {chunk}\n\n"))
}
