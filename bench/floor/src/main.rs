//! The "library floor" for the herald benchmark: the same contract subset as the Node.js
//! reference (`bench/node-reference/server.js`), on a bare socketioxide 0.18 server (the
//! published crate, not herald's patched copy in `vendor/`) with axum 0.8. It is written the
//! way a socketioxide user would write it: one mutex over the sessions, `io.to(id).emit` per
//! event, socketioxide's defaults except for the per-socket queue size (see `main`).
//!
//!   PORT=0 bench/floor/target/release/herald-floor
//!   -> prints `herald-floor listening on http://127.0.0.1:PORT` on stdout when ready.
//!
//! Env: PORT (default 3000, 0 = any free port), HOST (default 127.0.0.1),
//!      RETAIN (events kept per session, default 1000). REDIS_URL (cluster mode) is not
//!      supported: the server refuses to start when it is set.
//!
//! Contract (as node-reference): `GET /healthz`; `POST /api/sessions/{id}/events` with one
//! `{event, data}` or an array of them (all-or-nothing validation), assigning the session's
//! `seq`, stamping `sessionId`, `seq` and `timestamp`, keeping the last RETAIN events and
//! broadcasting each to the session's room, answered 202 `{accepted, duplicates: 0,
//! lastSeq}`; socket events `connected` (on connect), `subscribe` (a session id or
//! `{sessionId, lastSeq?, epoch?}`, replaying retained events after `lastSeq`),
//! `unsubscribe`, and `error` for bad input, with the same ack shapes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use socketioxide::ParserError;
use socketioxide::SocketIo;
use socketioxide::extract::{AckSender, SocketRef, State as IoState, TryData};
use tokio::sync::Mutex;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MAX_BODY: usize = 1024 * 1024;
const MAX_BATCH: usize = 1000;
const EVENTS: [&str; 5] = [
    "progress",
    "model_result",
    "clarification",
    "completed",
    "error",
];

struct Stored {
    seq: u64,
    event: String,
    data: Value,
}

struct Session {
    last_seq: u64,
    epoch: String,
    /// The last RETAIN events.
    log: VecDeque<Stored>,
}

/// sessionId -> session. One lock for everything: a POST holds it while it emits its
/// events, so the events of a session reach the room in `seq` order, and a subscribe holds
/// it while it joins the room and replays, so no live event overtakes the replay.
type Sessions = Arc<Mutex<HashMap<String, Session>>>;

#[derive(Clone)]
struct App {
    io: SocketIo,
    sessions: Sessions,
    retain: usize,
}

/// ISO 8601 UTC with milliseconds, as JavaScript's `new Date().toISOString()`.
fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$`
fn valid_session_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b':' | b'-'))
}

fn http_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({ "error": { "code": code, "message": message } });
    (status, axum::Json(body)).into_response()
}

async fn healthz() -> Response {
    axum::Json(json!({ "status": "ok" })).into_response()
}

async fn not_found() -> Response {
    http_error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such route")
}

async fn method_not_allowed() -> Response {
    http_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        "use POST",
    )
}

async fn post_events(
    State(app): State<App>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let id = match id {
        Ok(Path(id)) if valid_session_id(&id) => id,
        _ => {
            return http_error(
                StatusCode::BAD_REQUEST,
                "INVALID_SESSION_ID",
                "invalid session id",
            );
        }
    };
    let body = match body {
        Ok(body) => body,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return http_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PAYLOAD_TOO_LARGE",
                "body too large",
            );
        }
        Err(_) => return http_error(StatusCode::BAD_REQUEST, "INVALID_JSON", "body is not JSON"),
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return http_error(StatusCode::BAD_REQUEST, "INVALID_JSON", "body is not JSON");
    };
    let items = match body {
        Value::Array(items) => items,
        item => vec![item],
    };
    if items.is_empty() {
        return http_error(StatusCode::BAD_REQUEST, "EMPTY_BATCH", "empty batch");
    }
    if items.len() > MAX_BATCH {
        return http_error(
            StatusCode::BAD_REQUEST,
            "BATCH_TOO_LARGE",
            "batch too large",
        );
    }
    // Whole batch validated first: all-or-nothing.
    let mut events = Vec::with_capacity(items.len());
    for item in items {
        let invalid = || {
            http_error(
                StatusCode::BAD_REQUEST,
                "INVALID_EVENT",
                "each item needs { event, data }",
            )
        };
        let Value::Object(mut item) = item else {
            return invalid();
        };
        let event = match item.remove("event") {
            Some(Value::String(event)) if EVENTS.contains(&event.as_str()) => event,
            _ => return invalid(),
        };
        let data = match item.remove("data") {
            None => Map::new(),
            Some(Value::Object(data)) => data,
            Some(_) => return invalid(),
        };
        if let Some(sid) = data.get("sessionId")
            && sid.as_str() != Some(id.as_str())
        {
            return http_error(
                StatusCode::BAD_REQUEST,
                "INVALID_EVENT",
                "data.sessionId does not match the path",
            );
        }
        events.push((event, data));
    }

    let accepted = events.len();
    let ts = now();
    let mut sessions = app.sessions.lock().await;
    let session = sessions.entry(id.clone()).or_insert_with(|| Session {
        last_seq: 0,
        epoch: uuid::Uuid::new_v4().to_string(),
        log: VecDeque::new(),
    });
    for (event, mut data) in events {
        session.last_seq += 1;
        let seq = session.last_seq;
        data.insert("sessionId".into(), id.clone().into());
        data.insert("seq".into(), seq.into());
        if !data.get("timestamp").is_some_and(Value::is_string) {
            data.insert("timestamp".into(), ts.clone().into());
        }
        let data = Value::Object(data);
        if let Err(e) = app.io.to(id.clone()).emit(&event, &data).await {
            eprintln!("herald-floor: WARN broadcast to session {id} failed: {e}");
        }
        session.log.push_back(Stored { seq, event, data });
    }
    while session.log.len() > app.retain {
        session.log.pop_front();
    }
    let last_seq = session.last_seq;
    drop(sessions);
    let body = json!({ "accepted": accepted, "duplicates": 0, "lastSeq": last_seq });
    (StatusCode::ACCEPTED, axum::Json(body)).into_response()
}

/// A session id, or an object with a string `sessionId` (and maybe `lastSeq`, `epoch`).
fn session_arg(payload: Result<Value, ParserError>) -> Option<Map<String, Value>> {
    match payload.ok()? {
        Value::String(id) => Some(Map::from_iter([(
            "sessionId".to_string(),
            Value::String(id),
        )])),
        Value::Object(arg) if arg.get("sessionId").is_some_and(Value::is_string) => Some(arg),
        _ => None,
    }
}

/// JavaScript's falsiness, for `!arg.epoch`.
fn is_falsy(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

fn protocol_error(
    socket: &SocketRef,
    ack: AckSender,
    code: &str,
    message: &str,
    session_id: Option<&str>,
) {
    let mut err = json!({ "error": message, "code": code, "timestamp": now() });
    if let Some(id) = session_id {
        err["sessionId"] = id.into();
    }
    let _ = socket.emit("error", &err);
    let _ = ack.send(&json!({ "ok": false, "error": { "code": code, "message": message } }));
}

async fn on_subscribe(
    socket: SocketRef,
    TryData(payload): TryData<Value>,
    ack: AckSender,
    IoState(sessions): IoState<Sessions>,
) {
    let Some(arg) = session_arg(payload) else {
        return protocol_error(
            &socket,
            ack,
            "INVALID_PAYLOAD",
            "expected a session id",
            None,
        );
    };
    let session_id = arg["sessionId"].as_str().unwrap_or_default().to_owned();
    if !valid_session_id(&session_id) {
        return protocol_error(
            &socket,
            ack,
            "INVALID_SESSION_ID",
            "invalid session id",
            Some(&session_id),
        );
    }
    // `typeof arg.lastSeq === 'number'`
    let after = arg.get("lastSeq").and_then(Value::as_f64);

    let sessions = sessions.lock().await;
    let s = sessions.get(&session_id);
    let last_seq = s.map_or(0, |s| s.last_seq);
    let epoch = s.map_or("", |s| s.epoch.as_str());
    socket.join(session_id.clone());

    let mut replay = Vec::new();
    let mut recovered = None;
    if let Some(after) = after {
        let first = s
            .and_then(|s| s.log.front())
            .map_or(last_seq + 1, |e| e.seq);
        let epoch_ok = arg
            .get("epoch")
            .is_none_or(|e| is_falsy(e) || e.as_str() == Some(epoch));
        let ok = epoch_ok && after <= last_seq as f64 && after >= first as f64 - 1.0;
        recovered = Some(ok);
        if ok && let Some(s) = s {
            replay.extend(s.log.iter().filter(|e| e.seq as f64 > after));
        }
    }
    let mut reply =
        json!({ "sessionId": session_id, "timestamp": now(), "lastSeq": last_seq, "epoch": epoch });
    let mut a = json!({ "ok": true, "sessionId": session_id, "lastSeq": last_seq, "epoch": epoch });
    if let Some(recovered) = recovered {
        reply["recovered"] = recovered.into();
        a["recovered"] = recovered.into();
    }
    let _ = socket.emit("subscribed", &reply);
    for e in replay {
        let _ = socket.emit(&e.event, &e.data);
    }
    drop(sessions);
    let _ = ack.send(&a);
}

async fn on_unsubscribe(socket: SocketRef, TryData(payload): TryData<Value>, ack: AckSender) {
    let Some(arg) = session_arg(payload) else {
        return protocol_error(
            &socket,
            ack,
            "INVALID_PAYLOAD",
            "expected a session id",
            None,
        );
    };
    let session_id = arg["sessionId"].as_str().unwrap_or_default().to_owned();
    socket.leave(session_id.clone());
    let _ = socket.emit(
        "unsubscribed",
        &json!({ "sessionId": session_id, "timestamp": now() }),
    );
    let _ = ack.send(&json!({ "ok": true, "sessionId": session_id }));
}

async fn on_connect(socket: SocketRef) {
    socket.on("subscribe", on_subscribe);
    socket.on("unsubscribe", on_unsubscribe);
    let _ = socket.emit(
        "connected",
        &json!({ "socketId": socket.id.to_string(), "timestamp": now() }),
    );
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| {
            eprintln!("herald-floor: {name}={v:?} is not valid");
            std::process::exit(2);
        }),
        Err(_) => default,
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    if std::env::var("REDIS_URL").is_ok_and(|v| !v.is_empty()) {
        eprintln!(
            "herald-floor: REDIS_URL is set, but cluster mode is not implemented \
             (the floor server is one process; unset REDIS_URL)"
        );
        std::process::exit(2);
    }
    let host: String = env_or("HOST", "127.0.0.1".to_string());
    let port: u16 = env_or("PORT", 3000);
    let retain: usize = env_or("RETAIN", 1000);

    let sessions: Sessions = Arc::default();
    // The only setting changed from socketioxide's defaults: a socket's queue (default 128
    // packets) must hold a whole batch (up to MAX_BATCH events, broadcast back to back) or a
    // whole replay (up to RETAIN events) plus a few replies, since the library skips a socket
    // whose queue is full. 1064 by default, the size herald's queue has by default too.
    let (io_layer, io) = SocketIo::builder()
        .max_buffer_size(MAX_BATCH.max(retain) + 64)
        .with_state(sessions.clone())
        .build_layer();
    io.ns("/", on_connect);

    let app = App {
        io: io.clone(),
        sessions,
        retain,
    };
    let router = Router::new()
        .route("/healthz", get(healthz).fallback(not_found))
        .route(
            "/api/sessions/{id}/events",
            post(post_events).fallback(method_not_allowed),
        )
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
        .layer(io_layer);

    let listener = tokio::net::TcpListener::bind((host.as_str(), port)).await?;
    let port = listener.local_addr()?.port();
    println!("herald-floor listening on http://{host}:{port}");

    tokio::select! {
        r = axum::serve(listener, router) => r?,
        () = shutdown_signal() => io.close().await,
    }
    Ok(())
}
