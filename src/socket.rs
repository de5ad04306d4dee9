//! The Socket.IO surface (SPEC §1): `connected`, `subscribe`, `unsubscribe` and the
//! structured `error` event for bad input.
//!
//! Handlers are registered in the connect *middleware*, which socketioxide runs before it
//! sends the CONNECT packet. Registering them in the connect handler instead (which runs
//! after CONNECT) leaves a window in which a client's first `subscribe` is dropped.
//! One fallback handler serves every event name, so a socket costs one boxed handler.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use serde_json::{Value, json};
use socketioxide::SocketIo;
use socketioxide::extract::{AckSender, Event, SocketRef, TryData};
use socketioxide::handler::ConnectHandler;

use crate::auth::{self, Auth, AuthError, Principal};
use crate::error::ErrorCode;
use crate::event::now_timestamp;
use crate::hub::Hub;
use crate::subscriber::{self, Answer, Limits, Refusal, Subscriber};

/// Per-socket state, owned by the socket's handlers: created with them and dropped with
/// them, so the subscriber's gauges count exactly the sockets that have handlers
/// (socketioxide may run a socket's disconnect handler without its connect handler).
struct SocketState {
    subscriber: Subscriber,
    /// Cancels the token-expiry timer when the socket goes first (only tokens expire).
    expiry: Option<CancellationToken>,
    /// Done when the socket's latest request is: the next one waits for it.
    latest: Mutex<Option<oneshot::Receiver<()>>>,
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
        let after = self.latest.lock().unwrap().replace(next);
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

/// Registers the `/` namespace on `io`.
pub fn register(io: &SocketIo, hub: Hub, limits: Limits, auth: Auth) {
    // `connected` is sent by `install`, in the socket's line of requests: socketioxide spawns
    // the connect handler's future, so an emit from there can reach the client after the
    // reply to its first `subscribe`.
    let on_connect = |_socket: SocketRef| async {};
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
    subscriber::authenticate(auth, credential.as_deref())
}

/// Ends the socket when its token does: it is told why (`TOKEN_EXPIRED`), then
/// disconnected for good, since reconnecting with the same token cannot succeed. A client
/// whose `auth` is a callback fetches a fresh token when it connects again.
fn expire_at(socket: &SocketRef, state: &SocketState) {
    let (Some(left), Some(cancelled)) = (
        subscriber::time_left(state.subscriber.principal()),
        state.expiry.clone(),
    ) else {
        return;
    };
    let socket = socket.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = cancelled.cancelled() => {}
            () = tokio::time::sleep(left) => {
                socket.emit("error", &subscriber::token_expired().event()).ok();
                socket.disconnect().ok();
            }
        }
    });
}

fn install(socket: &SocketRef, hub: Hub, limits: Limits, principal: Principal) {
    let principal_expires = principal.valid_until().is_some();
    let state = Arc::new(SocketState {
        subscriber: Subscriber::new(hub.clone(), limits, principal),
        expiry: principal_expires.then(CancellationToken::new),
        latest: Mutex::new(None),
    });
    let on_event = {
        let state = state.clone();
        move |socket: SocketRef,
              Event(name): Event,
              TryData(data): TryData<Value>,
              ack: AckSender| {
            let state = state.clone();
            let mut turn = state.take_turn();
            async move {
                // One request at a time per socket: a subscribe and an unsubscribe of the same
                // socket never interleave, so its subscription count is always exact.
                turn.wait().await;
                let subscriber = &state.subscriber;
                if subscriber.is_closed() || !until_connected(&socket).await {
                    return;
                }
                let result = match data {
                    Err(_) => Err(Refusal::new(
                        ErrorCode::InvalidPayload,
                        format!(
                            "`{name}` needs one JSON argument: a session id or {{ sessionId, lastSeq?, epoch? }}"
                        ),
                    )),
                    Ok(data) => dispatch(&socket, subscriber, &name, data).await,
                };
                let metrics = subscriber.hub().metrics();
                match result {
                    Ok(reply) => {
                        ack.send(&reply).ok();
                    }
                    Err(refusal) => match subscriber.spend_refusal(refusal.code) {
                        Answer::Yes => refuse(&socket, subscriber.hub(), ack, &refusal),
                        Answer::No => metrics.socket_errors.inc(),
                        Answer::Close => {
                            metrics.socket_errors.inc();
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
    greet(socket, state.take_turn());
    expire_at(socket, &state);
    socket.on_disconnect(move |_socket: SocketRef| {
        let state = state.clone();
        async move {
            if let Some(expiry) = &state.expiry {
                expiry.cancel();
            }
            state.subscriber.unwatch_sessions();
        }
    });
}

async fn dispatch(
    socket: &SocketRef,
    subscriber: &Subscriber,
    name: &str,
    data: Value,
) -> Result<Value, Refusal> {
    match name {
        "subscribe" => subscriber.subscribe(socket, data).await,
        "unsubscribe" => {
            let ended = subscriber.unsubscribe(socket, &data)?;
            socket.emit("unsubscribed", &ended.reply()).ok();
            Ok(ended.ack())
        }
        other => Err(Refusal::new(
            ErrorCode::UnknownEvent,
            format!("unknown event `{other}`: herald accepts subscribe and unsubscribe"),
        )),
    }
}

/// How long a handler waits for socketioxide to mark a fresh socket connected.
const CONNECT_SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits (briefly) until the socket counts as connected; false if it never does.
///
/// socketioxide sends CONNECT and only then flags the socket connected, so a client that
/// emits the instant it sees CONNECT can reach this handler in between, when every emit
/// to the socket still fails as if it were closed. The window is microseconds wide.
/// Sends `connected` as the socket's first turn: every request waits for it, so the greeting
/// is always the first event a client sees.
fn greet(socket: &SocketRef, turn: Turn) {
    let socket = socket.clone();
    tokio::spawn(async move {
        let _turn = turn;
        if until_connected(&socket).await {
            let payload =
                json!({ "socketId": socket.id.to_string(), "timestamp": now_timestamp() });
            socket.emit("connected", &payload).ok();
        }
    });
}

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

fn refuse(socket: &SocketRef, hub: &Hub, ack: AckSender, refusal: &Refusal) {
    hub.metrics().socket_errors.inc();
    socket.emit("error", &refusal.event()).ok();
    ack.send(&refusal.ack()).ok();
}
