//! The Socket.IO surface (SPEC §1): `connected`, `subscribe`, `unsubscribe` and the
//! structured `error` event for bad input.
//!
//! Handlers are registered in the connect *middleware*, which socketioxide runs before it
//! sends the CONNECT packet. Registering them in the connect handler instead (which runs
//! after CONNECT) leaves a window in which a client's first `subscribe` is dropped.
//! One fallback handler serves every event name, so a socket costs one boxed handler.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use serde::Serialize;
use serde_json::{Value, json};
use socketioxide::SocketIo;
use socketioxide::extract::{AckSender, Event, SocketRef, TryData};
use socketioxide::handler::ConnectHandler;

use crate::auth::{self, Auth, AuthError, Denied, Principal, Scope};
use crate::error::ErrorCode;
use crate::event::{InvalidSessionId, now_timestamp, validate_session_id};
use crate::hub::{Hub, HubError, Resume};
use crate::log::Epoch;

/// Limits applied to each socket.
#[derive(Debug, Clone, Copy)]
pub struct SocketLimits {
    pub max_subscriptions: usize,
    /// Subscribe/unsubscribe requests per second; bursts of twice that are allowed.
    pub requests_per_sec: u32,
    /// Refused requests per second answered with an `error` event (bursts of twice that);
    /// see [`spend_refusal`].
    pub invalid_per_sec: u32,
}

/// How far (in seconds of its refusal rate) a socket may run past its refusal budget
/// before its transport is closed.
const REFUSALS_OVER_BUDGET_SECS: f64 = 4.0;

/// Per-socket state, owned by the socket's handlers.
struct SocketState {
    /// Who connected: every request is checked against it.
    principal: Principal,
    /// Cancels the token-expiry timer when the socket goes first (only tokens expire).
    expiry: Option<CancellationToken>,
    /// A std mutex: touched briefly by this socket's own handlers, never across an await.
    inner: Mutex<StateInner>,
    /// For the gauges: see the `Drop` impl.
    hub: Hub,
}

/// The connection and its subscriptions are counted for exactly as long as this state lives
/// (it is created with the socket's handlers and dropped with them). Counting in the connect
/// and disconnect handlers instead went negative: socketioxide may run a socket's disconnect
/// handler without its connect handler, when the socket closes in between.
impl Drop for SocketState {
    fn drop(&mut self) {
        let subscriptions = self.inner.get_mut().map_or(0, |inner| inner.sessions.len());
        let metrics = self.hub.metrics();
        for _ in 0..subscriptions {
            metrics.subscriptions.dec();
        }
        metrics.connections.dec();
    }
}

struct StateInner {
    sessions: HashSet<String>,
    tokens: f64,
    refilled: Instant,
    /// The refusal budget: answered while positive, may go down to the closing threshold.
    refusal_tokens: f64,
    refusals_refilled: Instant,
    /// Set when herald closed the transport: requests still in line are dropped unanswered.
    closed: bool,
    /// Done when the socket's latest request is: the next one waits for it.
    latest: Option<oneshot::Receiver<()>>,
}

/// A request's place in its socket's line: requests run one at a time, in arrival order.
struct Turn {
    after: Option<oneshot::Receiver<()>>,
    /// Dropped when the request is done, which lets the next one go.
    _done: oneshot::Sender<()>,
}

impl SocketState {
    /// Takes the next place in line. Called synchronously when a packet arrives (socketioxide
    /// calls the handler in arrival order, then spawns the future it returns), so the line
    /// follows the order the client sent its requests in.
    fn take_turn(&self) -> Turn {
        let (done, next) = oneshot::channel();
        let after = self.inner.lock().unwrap().latest.replace(next);
        Turn { after, _done: done }
    }
}

impl Turn {
    async fn wait(&mut self) {
        if let Some(previous) = self.after.take() {
            // An error only means the previous request's task ended: it is done either way.
            let _ = previous.await;
        }
    }
}

/// A request refused, with the code clients match on.
#[derive(Debug, Clone)]
struct Refusal {
    session_id: Option<String>,
    code: ErrorCode,
    message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            session_id: None,
            code,
            message: message.into(),
        }
    }

    fn for_session(mut self, session_id: &str) -> Self {
        self.session_id = Some(session_id.to_owned());
        self
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorEvent<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<&'a str>,
    error: &'a str,
    code: ErrorCode,
    timestamp: String,
}

/// Registers the `/` namespace on `io`.
pub fn register(io: &SocketIo, hub: Hub, limits: SocketLimits, auth: Auth) {
    let on_connect = move |socket: SocketRef| async move {
        let payload = json!({ "socketId": socket.id.to_string(), "timestamp": now_timestamp() });
        socket.emit("connected", &payload).ok();
    };
    // Authentication runs here, before CONNECT: a refusal is the client's `connect_error`,
    // whose message starts with the code (`TOKEN_EXPIRED: ...`).
    let install_handlers = move |socket: SocketRef, TryData(payload): TryData<Value>| {
        let hub = hub.clone();
        let auth = auth.clone();
        async move {
            let principal =
                authenticate(&auth, &socket, payload.ok().as_ref()).inspect_err(|error| {
                    hub.metrics().auth_refusals.inc(error.code());
                    tracing::debug!(%error, "socket refused");
                })?;
            install(&socket, hub, limits, principal);
            Ok::<(), AuthError>(())
        }
    };
    io.ns("/", on_connect.with(install_handlers));
}

/// The handshake's credential: socket.io's `auth: { token }` first, then the handshake
/// request's `Authorization`, `X-Api-Key` or `?token=`.
fn authenticate(
    auth: &Auth,
    socket: &SocketRef,
    payload: Option<&Value>,
) -> Result<Principal, AuthError> {
    if !auth.is_enabled() {
        return Ok(Principal::anonymous());
    }
    let from_payload = payload
        .and_then(|p| p.get("token"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let credential = from_payload.or_else(|| {
        let parts = socket.req_parts();
        auth::credential(&parts.headers, parts.uri.query())
    });
    let principal = auth.authenticate(credential.as_deref())?;
    if !principal.has(Scope::Read) {
        return Err(AuthError::Forbidden(
            "this credential lacks the `read` scope a subscriber needs".into(),
        ));
    }
    Ok(principal)
}

/// Ends the socket when its token does: it is told why (`TOKEN_EXPIRED`), then
/// disconnected for good, since reconnecting with the same token cannot succeed. A client
/// whose `auth` is a callback fetches a fresh token when it connects again.
fn expire_at(socket: &SocketRef, state: &SocketState) {
    let Some(until) = state.principal.valid_until() else {
        return;
    };
    let left = until
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    let Some(cancelled) = state.expiry.clone() else {
        return;
    };
    let socket = socket.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = cancelled.cancelled() => {}
            () = tokio::time::sleep(left) => {
                let event = ErrorEvent {
                    session_id: None,
                    error: "the token has expired; connect again with a fresh one",
                    code: ErrorCode::TokenExpired,
                    timestamp: now_timestamp(),
                };
                socket.emit("error", &event).ok();
                socket.disconnect().ok();
            }
        }
    });
}

fn install(socket: &SocketRef, hub: Hub, limits: SocketLimits, principal: Principal) {
    let principal_expires = principal.valid_until().is_some();
    let state = Arc::new(SocketState {
        principal,
        expiry: principal_expires.then(CancellationToken::new),
        inner: Mutex::new(StateInner {
            sessions: HashSet::new(),
            tokens: f64::from(limits.requests_per_sec) * 2.0,
            refilled: Instant::now(),
            refusal_tokens: f64::from(limits.invalid_per_sec) * 2.0,
            refusals_refilled: Instant::now(),
            closed: false,
            latest: None,
        }),
        hub: hub.clone(),
    });
    hub.metrics().connections.inc();
    let on_event = {
        let hub = hub.clone();
        let state = state.clone();
        move |socket: SocketRef,
              Event(name): Event,
              TryData(data): TryData<Value>,
              ack: AckSender| {
            let hub = hub.clone();
            let state = state.clone();
            let mut turn = state.take_turn();
            async move {
                // One request at a time per socket: a subscribe and an unsubscribe of the same
                // socket never interleave, so its subscription count is always exact.
                turn.wait().await;
                if state.inner.lock().unwrap().closed || !until_connected(&socket).await {
                    return;
                }
                let result = match data {
                    Err(_) => Err(Refusal::new(
                        ErrorCode::InvalidPayload,
                        format!(
                            "`{name}` needs one JSON argument: a session id or {{ sessionId, lastSeq?, epoch? }}"
                        ),
                    )),
                    Ok(data) => dispatch(&socket, &hub, &state, limits, &name, data).await,
                };
                match result {
                    Ok(reply) => {
                        ack.send(&reply).ok();
                    }
                    Err(refusal) => match spend_refusal(&state, limits, refusal.code) {
                        Answer::Yes => refuse(&socket, &hub, ack, &refusal),
                        Answer::No => hub.metrics().socket_errors.inc(),
                        Answer::Close => {
                            hub.metrics().socket_errors.inc();
                            tracing::info!(
                                socket = %socket.id,
                                "closing a socket that keeps sending invalid requests"
                            );
                            socket.close_transport();
                        }
                    },
                }
            }
        }
    };
    socket.on_fallback(on_event);
    expire_at(socket, &state);
    socket.on_disconnect(move |_socket: SocketRef| {
        let state = state.clone();
        async move {
            if let Some(expiry) = &state.expiry {
                expiry.cancel();
            }
        }
    });
}

async fn dispatch(
    socket: &SocketRef,
    hub: &Hub,
    state: &SocketState,
    limits: SocketLimits,
    name: &str,
    data: Value,
) -> Result<Value, Refusal> {
    match name {
        "subscribe" => {
            take_token(state, limits)?;
            let (session_id, resume) = parse_subscribe(data)?;
            subscribe(socket, hub, state, limits, session_id, resume).await
        }
        "unsubscribe" => {
            take_token(state, limits)?;
            let session_id = parse_session_ref(&data)?;
            if state.inner.lock().unwrap().sessions.remove(&session_id) {
                hub.metrics().subscriptions.dec();
            }
            hub.unsubscribe(socket, &session_id);
            let reply = json!({ "sessionId": session_id, "timestamp": now_timestamp() });
            socket.emit("unsubscribed", &reply).ok();
            Ok(json!({ "ok": true, "sessionId": session_id }))
        }
        other => Err(Refusal::new(
            ErrorCode::UnknownEvent,
            format!("unknown event `{other}`: herald accepts subscribe and unsubscribe"),
        )),
    }
}

async fn subscribe(
    socket: &SocketRef,
    hub: &Hub,
    state: &SocketState,
    limits: SocketLimits,
    session_id: String,
    resume: Option<Resume>,
) -> Result<Value, Refusal> {
    authorize_read(hub, &state.principal, &session_id).await?;
    let newly_added = {
        let mut inner = state.inner.lock().unwrap();
        if !inner.sessions.contains(&session_id) && inner.sessions.len() >= limits.max_subscriptions
        {
            return Err(Refusal::new(
                ErrorCode::TooManySubscriptions,
                format!(
                    "a socket may follow at most {} sessions at once",
                    limits.max_subscriptions
                ),
            )
            .for_session(&session_id));
        }
        inner.sessions.insert(session_id.clone())
    };
    match hub.subscribe(socket, &session_id, resume).await {
        Ok(reply) => {
            if newly_added {
                hub.metrics().subscriptions.inc();
            }
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
        Err(error) => {
            // A failed subscribe leaves the socket out of the room (`Hub::subscribe`), also
            // when it followed the session before: its count must say so.
            state.inner.lock().unwrap().sessions.remove(&session_id);
            if !newly_added {
                hub.metrics().subscriptions.dec();
            }
            let (code, message) = match error {
                HubError::SocketGone => (ErrorCode::SocketGone, error.to_string()),
                HubError::SlowConsumer => (ErrorCode::SlowConsumer, error.to_string()),
                // The backend's own text is for the log, not for clients.
                HubError::Log(_) | HubError::Store(_) => (
                    ErrorCode::BackendUnavailable,
                    "the session backend is unavailable; subscribe again".to_owned(),
                ),
            };
            tracing::warn!(session_id, %error, "subscribe failed");
            Err(
                Refusal::new(code, format!("could not subscribe: {message}"))
                    .for_session(&session_id),
            )
        }
    }
}

async fn authorize_read(hub: &Hub, principal: &Principal, session_id: &str) -> Result<(), Refusal> {
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

/// How long a handler waits for socketioxide to mark a fresh socket connected.
const CONNECT_SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits (briefly) until the socket counts as connected; false if it never does.
///
/// socketioxide sends CONNECT and only then flags the socket connected, so a client that
/// emits the instant it sees CONNECT can reach this handler in between, when every emit
/// to the socket still fails as if it were closed. The window is microseconds wide.
async fn until_connected(socket: &SocketRef) -> bool {
    let deadline = std::time::Instant::now() + CONNECT_SETTLE_LIMIT;
    while !socket.connected() {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    true
}

/// Token bucket: refills continuously at `requests_per_sec`, holds twice that.
fn take_token(state: &SocketState, limits: SocketLimits) -> Result<(), Refusal> {
    let rate = f64::from(limits.requests_per_sec);
    let mut inner = state.inner.lock().unwrap();
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

/// Whether a refused request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Yes,
    /// Over the budget: no `error` event and no ack.
    No,
    /// Far over it: the transport is closed.
    Close,
}

/// The refusal budget (`--invalid-event-rate`), a token bucket: `invalid_per_sec` refusals a
/// second are answered (bursts of twice as many); beyond that they go unanswered, and a socket
/// [`REFUSALS_OVER_BUDGET_SECS`] seconds' worth past the budget is closed. A flood of bad
/// requests thus costs herald a bounded number of answers. Refusals that are herald's
/// doing (its backend down, the socket dropped) are always answered and cost nothing.
fn spend_refusal(state: &SocketState, limits: SocketLimits, code: ErrorCode) -> Answer {
    if matches!(
        code,
        ErrorCode::BackendUnavailable | ErrorCode::SocketGone | ErrorCode::SlowConsumer
    ) {
        return Answer::Yes;
    }
    let rate = f64::from(limits.invalid_per_sec);
    let mut inner = state.inner.lock().unwrap();
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

/// `"id"` or `{ sessionId, lastSeq?, epoch? }`.
fn parse_subscribe(data: Value) -> Result<(String, Option<Resume>), Refusal> {
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
fn parse_session_ref(data: &Value) -> Result<String, Refusal> {
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

fn refuse(socket: &SocketRef, hub: &Hub, ack: AckSender, refusal: &Refusal) {
    hub.metrics().socket_errors.inc();
    let event = ErrorEvent {
        session_id: refusal.session_id.as_deref(),
        error: &refusal.message,
        code: refusal.code,
        timestamp: now_timestamp(),
    };
    socket.emit("error", &event).ok();
    let reply =
        json!({ "ok": false, "error": { "code": refusal.code, "message": refusal.message } });
    ack.send(&reply).ok();
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
