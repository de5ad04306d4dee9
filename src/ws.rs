//! Plain WebSocket (SPEC §6): `GET /ws`, JSON text frames without Socket.IO framing.
//!
//! A connection is a [`Subscriber`] whose sink is a [`Follower`]: requests go through the
//! same subscribe / unsubscribe code and limits as a Socket.IO socket's, and everything the
//! server says (replies, errors, events) goes through the follower's one ordered queue, so
//! a `subscribed` always precedes the replay it announces.
//!
//! A connection's task reads requests one at a time (a subscribe, replay included, ends
//! before the next request is read) while a second task writes the queue out. Herald ends a connection
//! with a close code: 1013 (try again later) when it could not keep up or at shutdown, then
//! the client reconnects and resubscribes with `lastSeq`; 1008 (policy) when its token
//! expired or it kept sending invalid requests.

use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};

use crate::auth::{Principal, Scope};
use crate::delivery::{Follower, FollowerHandle, Outbound, Sink, ws_event_text};
use crate::error::ErrorCode;
use crate::event::now_timestamp;
use crate::http::{ApiError, ApiState, Caller};
use crate::subscriber::{self, Answer, Limits, Refusal, Subscriber};

/// Largest message (and frame) a client may send: requests are a few hundred bytes.
const MAX_MESSAGE: usize = 64 * 1024;
/// How long herald waits for a close frame to go out before it drops the connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// `GET /ws`: authenticated like any request (`Authorization`, `X-Api-Key` or `?token=`,
/// the only one a browser's `WebSocket` can send); needs the `read` scope.
pub async fn upgrade(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("/ws takes WebSocket connections: {}", rejection.body_text()),
        )
    })?;
    let limits = state.subscribers;
    Ok(upgrade
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| serve(socket, state, limits, caller)))
}

async fn serve(socket: WebSocket, state: ApiState, limits: Limits, caller: Principal) {
    let expires = subscriber::time_left(&caller);
    let subscriber = Subscriber::new(state.hub.clone(), limits, caller);
    let handle = state.hub.followers().open("ws", limits.queue);
    let follower = handle.follower.clone();
    let hello = json!({
        "type": "connected",
        "socketId": format!("ws-{}", follower.id()),
        "timestamp": now_timestamp(),
    });
    follower.push(Outbound::Text(hello.to_string())).ok();
    let (sink, stream) = socket.split();
    // The writer gets a task of its own: polled together with the reader, every event's
    // wake-up polled the reader's half too: 35% more CPU per event than Socket.IO, 0.74x its
    // throughput; 0.75x its CPU and 1.33x its throughput once split (docs/benchmarks.md).
    let mut writer = tokio::spawn(write_out(sink, handle, limits.heartbeat, expires));
    tokio::select! {
        () = read_requests(stream, &subscriber, &follower) => writer.abort(),
        _ = &mut writer => {}
    }
}

async fn read_requests(
    mut stream: futures_util::stream::SplitStream<WebSocket>,
    subscriber: &Subscriber,
    follower: &Follower,
) {
    while let Some(Ok(message)) = stream.next().await {
        let result = match message {
            Message::Text(text) => handle(subscriber, follower, &text).await,
            Message::Binary(_) => Err(Refusal::new(
                ErrorCode::InvalidPayload,
                "herald's WebSocket takes JSON text frames, not binary ones",
            )),
            Message::Close(_) => return,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        let Err(refusal) = result else { continue };
        let metrics = subscriber.hub().metrics();
        metrics.socket_errors.inc();
        match subscriber.spend_refusal(refusal.code) {
            Answer::Yes => {
                let text = error_text(&refusal);
                if follower.push(Outbound::Text(text)).is_err() {
                    follower.cut_off();
                }
            }
            Answer::No => {}
            Answer::Close => {
                tracing::info!(
                    follower = %follower.label(),
                    "closing a WebSocket that keeps sending invalid requests"
                );
                follower
                    .push(Outbound::Final(close_reason(
                        close_code::POLICY,
                        "too many invalid requests",
                    )))
                    .ok();
                // Requests still arriving are not read any more; the writer closes.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// One request: `{ "type" | "action": "subscribe" | "unsubscribe" | "ping", ... }`.
async fn handle(subscriber: &Subscriber, follower: &Follower, text: &str) -> Result<(), Refusal> {
    let request: Value = serde_json::from_str(text).map_err(|_| {
        Refusal::new(
            ErrorCode::InvalidJson,
            "a request is one JSON object with a `type`",
        )
    })?;
    let kind = request
        .get("type")
        .or_else(|| request.get("action"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            Refusal::new(
                ErrorCode::InvalidPayload,
                "a request needs a `type` (or `action`): subscribe, unsubscribe or ping",
            )
        })?;
    match kind {
        // The `subscribed` reply and the replay come through the follower's queue.
        "subscribe" => subscriber.subscribe(follower, request).await.map(drop),
        "unsubscribe" => {
            let mut reply = subscriber.unsubscribe(follower, &request)?.reply();
            reply["type"] = json!("unsubscribed");
            reply_with(follower, reply)
        }
        "ping" => reply_with(
            follower,
            json!({ "type": "pong", "timestamp": now_timestamp() }),
        ),
        other => Err(Refusal::new(
            ErrorCode::UnknownEvent,
            format!(
                "unknown type `{}`: herald accepts subscribe, unsubscribe and ping",
                other.chars().take(64).collect::<String>()
            ),
        )),
    }
}

fn reply_with(follower: &Follower, reply: Value) -> Result<(), Refusal> {
    if follower.push(Outbound::Text(reply.to_string())).is_err() {
        // A client that does not read its replies is a slow consumer like any other.
        follower.cut_off();
    }
    Ok(())
}

fn error_text(refusal: &Refusal) -> String {
    let payload = serde_json::to_string(&refusal.event()).unwrap_or_default();
    ws_event_text("error", &payload)
}

/// An [`Outbound::Final`] for a WebSocket: `code reason`.
fn close_reason(code: u16, reason: &str) -> String {
    format!("{code} {reason}")
}

async fn write_out(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut handle: FollowerHandle,
    heartbeat: Duration,
    expires: Option<Duration>,
) {
    let cut = handle.follower.cut_token();
    let mut heartbeat = crate::sse::heartbeat(heartbeat);
    let expired = async {
        match expires {
            Some(left) => tokio::time::sleep(left).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expired);
    let close = loop {
        let message = tokio::select! {
            biased;
            () = cut.cancelled() => {
                break (close_code::AGAIN, "cut off: reconnect and resubscribe with lastSeq".to_owned());
            }
            () = &mut expired => {
                sink.send(Message::Text(error_text(&subscriber::token_expired()).into())).await.ok();
                break (close_code::POLICY, "token expired".to_owned());
            }
            message = handle.queue.recv() => match message {
                None => return,
                Some(message) => message,
            },
            _ = heartbeat.tick() => {
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
                continue;
            }
        };
        match write_ready(&mut sink, &mut handle, message).await {
            Ok(None) => {}
            Ok(Some(close)) => break close,
            Err(()) => return,
        }
    };
    let frame = CloseFrame {
        code: close.0,
        reason: close.1.into(),
    };
    tokio::time::timeout(CLOSE_TIMEOUT, sink.send(Message::Close(Some(frame))))
        .await
        .ok();
}

/// Most messages written before one flush: what a burst puts in one write, not one each.
const WRITE_BATCH: usize = 64;

/// Writes `first` and whatever else is queued already (up to [`WRITE_BATCH`]), then
/// flushes once. `Some` close when a [`Outbound::Final`] came up; `Err` when the
/// connection is gone.
async fn write_ready(
    sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    handle: &mut FollowerHandle,
    first: Outbound,
) -> Result<Option<(u16, String)>, ()> {
    let mut next = Some(first);
    let mut written = 0;
    while let Some(message) = next.take() {
        if let Outbound::Final(reason) = message {
            sink.flush().await.map_err(drop)?;
            return Ok(Some(parse_close(&reason)));
        }
        sink.feed(Message::Text(text_of(message)))
            .await
            .map_err(drop)?;
        written += 1;
        if written < WRITE_BATCH {
            next = handle.queue.try_recv().ok();
        }
    }
    sink.flush().await.map_err(drop)?;
    Ok(None)
}

fn parse_close(reason: &str) -> (u16, String) {
    let (code, text) = reason.split_once(' ').unwrap_or((reason, ""));
    (code.parse().unwrap_or(close_code::NORMAL), text.to_owned())
}

fn text_of(message: Outbound) -> Utf8Bytes {
    match message {
        Outbound::Event(framed) => framed.ws(),
        Outbound::Feed(frame) => frame.ws(),
        Outbound::Subscribed(reply) => {
            let payload = serde_json::to_string(&reply).unwrap_or_default();
            ws_event_text("subscribed", &payload).into()
        }
        Outbound::Text(text) | Outbound::Final(text) => text.into(),
    }
}
