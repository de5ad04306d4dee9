//! One connected subscriber, whatever its transport: who it is, what it follows, and the
//! limits it is held to (SPEC §5). Socket.IO sockets and plain WebSocket connections both
//! hand their `subscribe` / `unsubscribe` requests here, so the two cannot drift apart;
//! an SSE stream is a subscriber with exactly one subscription.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;
use serde_json::{Value, json};

use crate::auth::{Auth, AuthError, Denied, Principal, Scope};
use crate::delivery::Sink;
use crate::error::ErrorCode;
use crate::event::{InvalidSessionId, now_timestamp, validate_session_id};
use crate::feed::WatchId;
use crate::hub::{Hub, HubError, Resume, Subscribed};
use crate::log::Epoch;

/// Limits applied to each subscriber connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_subscriptions: usize,
    /// Subscribe/unsubscribe requests per second; bursts of twice that are allowed.
    pub requests_per_sec: u32,
    /// Refused requests per second answered with an `error` event (bursts of twice that);
    /// see [`Subscriber::spend_refusal`].
    pub invalid_per_sec: u32,
    /// Messages queued for an SSE or plain WebSocket subscriber before it counts as slow.
    pub queue: usize,
    /// How often an idle SSE stream gets a comment and a WebSocket a ping.
    pub heartbeat: std::time::Duration,
}

/// How far (in seconds of its refusal rate) a subscriber may run past its refusal budget
/// before its connection is closed.
const REFUSALS_OVER_BUDGET_SECS: f64 = 4.0;

/// A connected subscriber's state. It counts in the `connections` gauge, and its
/// subscriptions in `subscriptions`, for exactly as long as it lives.
pub struct Subscriber {
    principal: Principal,
    limits: Limits,
    /// A std mutex: touched briefly by the connection's own requests, never across an await.
    inner: Mutex<Budget>,
    hub: Hub,
}

struct Budget {
    sessions: HashSet<String>,
    tokens: f64,
    refilled: Instant,
    /// The refusal budget: answered while positive, may go down to the closing threshold.
    refusal_tokens: f64,
    refusals_refilled: Instant,
    /// Set when herald closes the connection: requests still in line are dropped unanswered.
    closed: bool,
    /// Its place in the session feed, while it watches.
    watch: Option<WatchId>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let (subscriptions, watch) = self.inner.get_mut().map_or((0, None), |inner| {
            (inner.sessions.len(), inner.watch.take())
        });
        if let Some(watch) = watch {
            self.hub.feed().unwatch(watch);
        }
        let metrics = self.hub.metrics();
        for _ in 0..subscriptions {
            metrics.subscriptions.dec();
        }
        metrics.connections.dec();
    }
}

/// Whether a refused request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Yes,
    /// Over the budget: no `error` event and no ack.
    No,
    /// Far over it: the connection is closed.
    Close,
}

impl Subscriber {
    pub fn new(hub: Hub, limits: Limits, principal: Principal) -> Self {
        hub.metrics().connections.inc();
        Self {
            principal,
            limits,
            inner: Mutex::new(Budget {
                sessions: HashSet::new(),
                tokens: f64::from(limits.requests_per_sec) * 2.0,
                refilled: Instant::now(),
                refusal_tokens: f64::from(limits.invalid_per_sec) * 2.0,
                refusals_refilled: Instant::now(),
                closed: false,
                watch: None,
            }),
            hub,
        }
    }

    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Whether herald has closed this subscriber for flooding it with bad requests.
    pub fn is_closed(&self) -> bool {
        self.inner.lock().unwrap().closed
    }

    /// A `subscribe` request (`"id"`, `{ sessionId, lastSeq?, epoch? }` or
    /// `{ feed: "sessions" }`): the ack.
    pub async fn subscribe(&self, sink: &dyn Sink, data: Value) -> Result<Value, Refusal> {
        self.take_token()?;
        if parse_feed(&data)? {
            let count = self.watch_sessions(sink).await?;
            return Ok(json!({ "ok": true, "feed": FEED_SESSIONS, "sessions": count }));
        }
        let (session_id, resume) = parse_subscribe(data)?;
        let reply = self.follow(sink, session_id, resume).await?;
        let mut ack = json!({
            "ok": true,
            "sessionId": reply.session_id,
            "lastSeq": reply.last_seq,
            "epoch": Epoch::wire(reply.epoch.as_ref()),
        });
        if let Some(recovered) = reply.recovered {
            ack["recovered"] = Value::Bool(recovered);
        }
        Ok(ack)
    }

    /// An `unsubscribe` request: the session it named (or [`FEED_SESSIONS`]).
    pub fn unsubscribe(&self, sink: &dyn Sink, data: &Value) -> Result<Unsubscribed, Refusal> {
        self.take_token()?;
        if parse_feed(data)? {
            self.unwatch_sessions();
            return Ok(Unsubscribed::Feed);
        }
        let session_id = parse_session_ref(data)?;
        if self.inner.lock().unwrap().sessions.remove(&session_id) {
            self.hub.metrics().subscriptions.dec();
        }
        self.hub.unsubscribe(sink, &session_id);
        Ok(Unsubscribed::Session(session_id))
    }

    /// Stops following the session feed, if it does. A Socket.IO socket calls this when it
    /// disconnects: the feed holds a handle on the socket, which would otherwise keep it
    /// (and this subscriber) alive until the next change found it gone.
    pub fn unwatch_sessions(&self) {
        let watch = self.inner.lock().unwrap().watch.take();
        if let Some(watch) = watch {
            self.hub.feed().unwatch(watch);
        }
    }

    /// Starts following the session feed (SPEC §6): `sessions` now, `session` on changes.
    /// Watching again sends a fresh list. Returns how many sessions the list held.
    pub async fn watch_sessions(&self, sink: &dyn Sink) -> Result<usize, Refusal> {
        if !self.principal.has(Scope::Read) {
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                "the session feed needs the `read` scope",
            ));
        }
        self.unwatch_sessions();
        let (watch, count) = self
            .hub
            .feed()
            .watch(sink.to_shared(), self.principal.clone())
            .await
            .map_err(|error| {
                tracing::warn!(%error, "session feed: watch failed");
                Refusal::from_hub(&error)
            })?;
        let replaced = self.inner.lock().unwrap().watch.replace(watch);
        if let Some(replaced) = replaced {
            self.hub.feed().unwatch(replaced);
        }
        Ok(count)
    }

    /// Authorizes, counts and performs one subscription (replay, then live).
    pub async fn follow(
        &self,
        sink: &dyn Sink,
        session_id: String,
        resume: Option<Resume>,
    ) -> Result<Subscribed, Refusal> {
        authorize_read(&self.hub, &self.principal, &session_id).await?;
        {
            let mut inner = self.inner.lock().unwrap();
            if !inner.sessions.contains(&session_id)
                && inner.sessions.len() >= self.limits.max_subscriptions
            {
                return Err(Refusal::new(
                    ErrorCode::TooManySubscriptions,
                    format!(
                        "a connection may follow at most {} sessions at once",
                        self.limits.max_subscriptions
                    ),
                )
                .for_session(&session_id));
            }
            // Counted as it joins the set, under the same lock: the gauge is the set's size
            // whatever happens next. (Counting only once the subscribe had succeeded lost
            // the count when the request was dropped mid-way: a /ws reader whose writer
            // ended, and `Drop` then took one off that was never added.)
            let added = inner.sessions.insert(session_id.clone());
            if added {
                self.hub.metrics().subscriptions.inc();
            }
        }
        match self.hub.subscribe(sink, &session_id, resume).await {
            Ok(reply) => Ok(reply),
            Err(error) => {
                // A failed subscribe leaves the subscriber out of the session (`Hub::subscribe`),
                // also when it followed the session before: its count must say so.
                if self.inner.lock().unwrap().sessions.remove(&session_id) {
                    self.hub.metrics().subscriptions.dec();
                }
                tracing::warn!(session_id, %error, "subscribe failed");
                Err(Refusal::from_hub(&error).for_session(&session_id))
            }
        }
    }

    /// Token bucket: refills continuously at `requests_per_sec`, holds twice that.
    fn take_token(&self) -> Result<(), Refusal> {
        let rate = f64::from(self.limits.requests_per_sec);
        let mut inner = self.inner.lock().unwrap();
        let now = Instant::now();
        let refill = now.duration_since(inner.refilled).as_secs_f64() * rate;
        inner.tokens = (inner.tokens + refill).min(rate * 2.0);
        inner.refilled = now;
        if inner.tokens < 1.0 {
            return Err(Refusal::new(
                ErrorCode::RateLimited,
                format!("too many subscribe/unsubscribe requests: at most {rate} per second"),
            ));
        }
        inner.tokens -= 1.0;
        Ok(())
    }

    /// The refusal budget (`--invalid-event-rate`), a token bucket: `invalid_per_sec`
    /// refusals a second are answered (bursts of twice as many); beyond that they go
    /// unanswered, and a subscriber [`REFUSALS_OVER_BUDGET_SECS`] seconds' worth past the
    /// budget is closed. A flood of bad requests thus costs herald a bounded number of
    /// answers. Refusals that are herald's doing (its backend down, the connection dropped)
    /// are always answered and cost nothing.
    pub fn spend_refusal(&self, code: ErrorCode) -> Answer {
        if matches!(
            code,
            ErrorCode::BackendUnavailable | ErrorCode::SocketGone | ErrorCode::SlowConsumer
        ) {
            return Answer::Yes;
        }
        let rate = f64::from(self.limits.invalid_per_sec);
        let mut inner = self.inner.lock().unwrap();
        let now = Instant::now();
        let refill = now.duration_since(inner.refusals_refilled).as_secs_f64() * rate;
        inner.refusal_tokens = (inner.refusal_tokens + refill).min(rate * 2.0) - 1.0;
        inner.refusals_refilled = now;
        if inner.refusal_tokens >= 0.0 {
            Answer::Yes
        } else if inner.refusal_tokens >= -rate * REFUSALS_OVER_BUDGET_SECS {
            Answer::No
        } else {
            inner.closed = true;
            Answer::Close
        }
    }
}

/// A request refused, with the code clients match on.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub session_id: Option<String>,
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            session_id: None,
            code,
            message: message.into(),
        }
    }

    pub fn for_session(mut self, session_id: &str) -> Self {
        self.session_id = Some(session_id.to_owned());
        self
    }

    /// Why a subscribe failed, in words for clients (the backend's own text is for the log).
    pub fn from_hub(error: &HubError) -> Self {
        let (code, message) = match error {
            HubError::SocketGone => (ErrorCode::SocketGone, error.to_string()),
            HubError::SlowConsumer => (ErrorCode::SlowConsumer, error.to_string()),
            HubError::Log(_) | HubError::Store(_) => (
                ErrorCode::BackendUnavailable,
                "the session backend is unavailable; subscribe again".to_owned(),
            ),
        };
        Self::new(code, format!("could not subscribe: {message}"))
    }

    /// The `error` event's payload.
    pub fn event(&self) -> ErrorEvent<'_> {
        ErrorEvent {
            session_id: self.session_id.as_deref(),
            error: &self.message,
            code: self.code,
            timestamp: now_timestamp(),
        }
    }

    /// The failing ack's payload.
    pub fn ack(&self) -> Value {
        json!({ "ok": false, "error": { "code": self.code, "message": self.message } })
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorEvent<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<&'a str>,
    pub error: &'a str,
    pub code: ErrorCode,
    pub timestamp: String,
}

/// A subscriber's principal from its credential: it must hold the `read` scope.
pub fn authenticate(auth: &Auth, credential: Option<&str>) -> Result<Principal, AuthError> {
    if !auth.is_enabled() {
        return Ok(Principal::anonymous());
    }
    let principal = auth.authenticate(credential)?;
    if !principal.has(Scope::Read) {
        return Err(AuthError::Forbidden(
            "this credential lacks the `read` scope a subscriber needs".into(),
        ));
    }
    Ok(principal)
}

/// How long until the principal's token expires; `None` when it does not (API keys, no auth).
pub fn time_left(principal: &Principal) -> Option<std::time::Duration> {
    let until = principal.valid_until()?;
    Some(
        until
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// The `error` a subscriber gets when its token runs out, just before it is disconnected.
pub fn token_expired() -> Refusal {
    Refusal::new(
        ErrorCode::TokenExpired,
        "the token has expired; connect again with a fresh one",
    )
}

pub async fn authorize_read(
    hub: &Hub,
    principal: &Principal,
    session_id: &str,
) -> Result<(), Refusal> {
    principal
        .authorize(hub, Scope::Read, session_id)
        .await
        .map_err(|denied| {
            let refusal = match denied {
                Denied::Forbidden(message) => Refusal::new(ErrorCode::Forbidden, message),
                Denied::Backend(error) => {
                    tracing::warn!(session_id, %error, "could not look up a session's owner");
                    Refusal::new(
                        ErrorCode::BackendUnavailable,
                        "the session backend is unavailable; subscribe again",
                    )
                }
            };
            refusal.for_session(session_id)
        })
}

/// The one feed there is: `{ "feed": "sessions" }`.
pub const FEED_SESSIONS: &str = "sessions";

/// What an `unsubscribe` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsubscribed {
    Session(String),
    Feed,
}

impl Unsubscribed {
    /// `sessionId` or `feed`, then `timestamp`: the `unsubscribed` event's payload.
    pub fn reply(&self) -> Value {
        match self {
            Unsubscribed::Session(id) => json!({ "sessionId": id, "timestamp": now_timestamp() }),
            Unsubscribed::Feed => json!({ "feed": FEED_SESSIONS, "timestamp": now_timestamp() }),
        }
    }

    pub fn ack(&self) -> Value {
        match self {
            Unsubscribed::Session(id) => json!({ "ok": true, "sessionId": id }),
            Unsubscribed::Feed => json!({ "ok": true, "feed": FEED_SESSIONS }),
        }
    }
}

/// Whether a `subscribe` / `unsubscribe` payload names a feed (`{ "feed": "sessions" }`).
fn parse_feed(data: &Value) -> Result<bool, Refusal> {
    match data.get("feed") {
        None => Ok(false),
        Some(Value::String(feed)) if feed == FEED_SESSIONS => Ok(true),
        Some(_) => Err(Refusal::new(
            ErrorCode::InvalidPayload,
            "`feed` must be \"sessions\", the one feed herald has",
        )),
    }
}

/// `"id"` or `{ sessionId, lastSeq?, epoch? }`.
pub fn parse_subscribe(data: Value) -> Result<(String, Option<Resume>), Refusal> {
    let session_id = parse_session_ref(&data)?;
    let Value::Object(fields) = data else {
        return Ok((session_id, None));
    };
    let last_seq = match fields.get("lastSeq") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            Refusal::new(
                ErrorCode::InvalidPayload,
                "`lastSeq` must be a non-negative integer",
            )
            .for_session(&session_id)
        })?),
    };
    let epoch = match fields.get("epoch") {
        None | Some(Value::Null) => None,
        Some(Value::String(e)) => Epoch::parse(e),
        Some(_) => {
            return Err(
                Refusal::new(ErrorCode::InvalidPayload, "`epoch` must be a string")
                    .for_session(&session_id),
            );
        }
    };
    let resume = last_seq.map(|last_seq| Resume { last_seq, epoch });
    Ok((session_id, resume))
}

/// The session id of a `"id"` or `{ sessionId }` payload, validated.
pub fn parse_session_ref(data: &Value) -> Result<String, Refusal> {
    let id = match data {
        Value::String(id) => id,
        Value::Object(fields) => match fields.get("sessionId") {
            Some(Value::String(id)) => id,
            Some(_) => {
                return Err(Refusal::new(
                    ErrorCode::InvalidPayload,
                    "`sessionId` must be a string",
                ));
            }
            None => {
                return Err(Refusal::new(
                    ErrorCode::InvalidPayload,
                    "`sessionId` is required",
                ));
            }
        },
        _ => {
            return Err(Refusal::new(
                ErrorCode::InvalidPayload,
                "expected a session id string or { sessionId, lastSeq?, epoch? }",
            ));
        }
    };
    validate_session_id(id).map_err(|e: InvalidSessionId| {
        let refusal = Refusal::new(ErrorCode::InvalidSessionId, e.to_string());
        // Echo the id only when it is short enough to be worth echoing.
        if id.len() <= crate::event::MAX_SESSION_ID_LEN {
            refusal.for_session(id)
        } else {
            refusal
        }
    })?;
    Ok(id.clone())
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzzing::Fuzz;

    /// A `subscribe` / `unsubscribe` payload is a valid session reference or a refusal with
    /// a short message and a payload code: never a panic, never the whole input echoed.
    #[test]
    fn fuzz_subscribe_payloads() {
        let seeds: &[&[u8]] = &[
            br#""sess-1""#,
            br#"{"sessionId":"sess-1","lastSeq":41,"epoch":"0123456789abcdef"}"#,
            br#"{"sessionId":"sess-1","lastSeq":null}"#,
        ];
        Fuzz::new("subscribe payload").run(seeds, |input| {
            let value = serde_json::from_slice(input)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(input).into_owned()));
            match parse_subscribe(value) {
                Ok((session_id, _)) => assert!(validate_session_id(&session_id).is_ok()),
                Err(refusal) => {
                    assert!(
                        matches!(
                            refusal.code,
                            ErrorCode::InvalidPayload | ErrorCode::InvalidSessionId
                        ),
                        "{refusal:?}"
                    );
                    assert!(refusal.message.len() <= 300, "{refusal:?}");
                    assert!(
                        refusal
                            .session_id
                            .as_ref()
                            .is_none_or(|id| id.len() <= crate::event::MAX_SESSION_ID_LEN)
                    );
                }
            }
        });
    }
}
