//! Server-Sent Events (SPEC §6): `GET /api/wizard/session/{id}/stream`.
//!
//! The stream is a [`Follower`] of one session: the hub replays and delivers to it exactly as
//! to a Socket.IO socket. Refusals that can be known before the stream starts (credential,
//! scope, ownership, a malformed resume point) are HTTP errors, which `EventSource` does not
//! retry; what happens later (a failed replay, an expired token) is an `event: error`
//! frame, after which the stream ends.
//!
//! The `subscribed` frame carries `id: <seq>` too, the point the stream is complete from, so
//! that a client that drops before the next event still resumes gap-free: a browser's
//! `EventSource` sends it back as `Last-Event-ID` when it reconnects.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde::Deserialize;
use tokio::time::{Instant, Interval, Sleep};
use tokio_util::sync::CancellationToken;

use crate::auth::Scope;
use crate::delivery::{FollowerHandle, Outbound, Sink, sse_frame};
use crate::error::ErrorCode;
use crate::http::{ApiError, ApiState, Caller, Path, Query, session_id_from_path};
use crate::hub::Resume;
use crate::log::Epoch;
use crate::subscriber::{self, Refusal, Subscriber};

/// Most queued messages put into one chunk of the response.
const WRITE_BATCH: usize = 64;

/// How long a browser waits before reconnecting a dropped stream (the SSE `retry:` field).
const RETRY_MS: u64 = 1_000;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamQuery {
    last_seq: Option<u64>,
    epoch: Option<String>,
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        ApiError::new(refusal.code, refusal.message)
    }
}

/// `GET /api/wizard/session/{id}/stream[?lastSeq=N&epoch=E]`; `Last-Event-ID` wins over
/// `lastSeq`. Without either, the stream is live from now (ask for `lastSeq=0` for the whole
/// retained history).
pub async fn session_stream(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    Path(session_id): Path<String>,
    Query(query): Query<StreamQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    session_id_from_path(&session_id)?;
    caller.require(Scope::Read)?;
    subscriber::authorize_read(&state.hub, &caller, &session_id).await?;
    let last_seq = match headers.get("last-event-id") {
        Some(value) => Some(parse_last_event_id(value)?),
        None => query.last_seq,
    };
    let resume = last_seq.map(|last_seq| Resume {
        last_seq,
        epoch: query.epoch.as_deref().and_then(Epoch::parse),
    });
    let limits = state.subscribers;
    let expires = subscriber::time_left(&caller);
    let subscriber = Arc::new(Subscriber::new(state.hub.clone(), limits, caller));
    let handle = state.hub.followers().open("sse", limits.queue);
    spawn_subscribe(&handle, subscriber.clone(), session_id, resume.clone());
    let asked = resume.map(|r| r.last_seq);
    Ok(respond(SseStream::new(handle, subscriber, expires, asked)))
}

/// `GET /api/wizard/sessions/stream`: the session feed (SPEC §6), `event: sessions` then
/// `event: session` frames, without ids: a reconnected `EventSource` gets a fresh list,
/// which is its resync.
pub async fn sessions_stream(
    State(state): State<ApiState>,
    Caller(caller): Caller,
) -> Result<Response, ApiError> {
    caller.require(Scope::Read)?;
    let limits = state.subscribers;
    let expires = subscriber::time_left(&caller);
    let subscriber = Arc::new(Subscriber::new(state.hub.clone(), limits, caller));
    let handle = state.hub.followers().open("sse", limits.queue);
    // Before the response starts, so that a backend failure is an HTTP error.
    subscriber.watch_sessions(&handle.follower).await?;
    Ok(respond(SseStream::new(handle, subscriber, expires, None)))
}

fn respond(stream: SseStream) -> Response {
    let body = Body::from_stream(stream::unfold(stream, |mut stream| async move {
        let frame = stream.next_frame().await?;
        Some((frame, stream))
    }));
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx buffers responses unless told not to, which would hold events back.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn parse_last_event_id(value: &HeaderValue) -> Result<u64, ApiError> {
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                "`Last-Event-ID` must be the `seq` of the last event received",
            )
        })
}

/// Subscribes in a task of its own: a replay larger than the queue needs the stream to
/// drain it meanwhile. A refusal is the stream's last frame.
fn spawn_subscribe(
    handle: &FollowerHandle,
    subscriber: Arc<Subscriber>,
    session_id: String,
    resume: Option<Resume>,
) {
    let follower = handle.follower.clone();
    tokio::spawn(async move {
        if let Err(refusal) = subscriber.follow(&follower, session_id, resume).await
            && follower
                .push(Outbound::Final(error_frame(&refusal)))
                .is_err()
        {
            follower.cut_off();
        }
    });
}

fn error_frame(refusal: &Refusal) -> String {
    let data = serde_json::to_string(&refusal.event()).unwrap_or_default();
    String::from_utf8_lossy(&sse_frame(None, "error", &data)).into_owned()
}

/// A heartbeat interval whose first tick is one period away (not at once).
pub fn heartbeat(period: Duration) -> Interval {
    let period = period.max(Duration::from_millis(10));
    let mut interval = tokio::time::interval_at(Instant::now() + period, period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

struct SseStream {
    handle: FollowerHandle,
    cut: CancellationToken,
    heartbeat: Interval,
    expires: Option<Pin<Box<Sleep>>>,
    /// The `lastSeq` the client resumed from, if any.
    asked: Option<u64>,
    /// Counted as a connection for as long as the stream lives.
    _subscriber: Arc<Subscriber>,
    done: bool,
}

impl SseStream {
    fn new(
        handle: FollowerHandle,
        subscriber: Arc<Subscriber>,
        expires: Option<Duration>,
        asked: Option<u64>,
    ) -> Self {
        Self {
            cut: handle.follower.cut_token(),
            heartbeat: heartbeat(subscriber.limits().heartbeat),
            handle,
            expires: expires.map(|left| Box::pin(tokio::time::sleep(left))),
            asked,
            _subscriber: subscriber,
            done: false,
        }
    }

    async fn next_frame(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        if self.done {
            return None;
        }
        let expires = &mut self.expires;
        let expired = async move {
            match expires {
                Some(sleep) => sleep.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = self.cut.cancelled() => {
                // An error ends the response without its last chunk: to the client it is a
                // dropped connection, which `EventSource` retries with `Last-Event-ID`.
                self.done = true;
                Some(Err(std::io::Error::other("cut off: reconnect and resume")))
            }
            () = expired => {
                self.done = true;
                Some(Ok(error_frame(&subscriber::token_expired()).into()))
            }
            message = self.handle.queue.recv() => {
                let message = message?;
                Some(Ok(self.frames_from(message)))
            }
            _ = self.heartbeat.tick() => Some(Ok(Bytes::from_static(b": keep-alive\n\n"))),
        }
    }

    /// `first` and whatever else is queued already (up to [`WRITE_BATCH`]) as one chunk:
    /// a burst of events becomes one write, not one each.
    fn frames_from(&mut self, first: Outbound) -> Bytes {
        let first = self.frame(first);
        if self.done {
            return first;
        }
        let mut chunk: Option<bytes::BytesMut> = None;
        for _ in 1..WRITE_BATCH {
            let Ok(message) = self.handle.queue.try_recv() else {
                break;
            };
            let frame = self.frame(message);
            chunk
                .get_or_insert_with(|| bytes::BytesMut::from(&first[..]))
                .extend_from_slice(&frame);
            if self.done {
                break;
            }
        }
        chunk.map_or(first, bytes::BytesMut::freeze)
    }

    fn frame(&mut self, message: Outbound) -> Bytes {
        match message {
            Outbound::Event(framed) => framed.sse(),
            Outbound::Feed(frame) => frame.sse(),
            Outbound::Subscribed(reply) => {
                // Complete from the point asked for when it is recovered, else from the head.
                let from = match (reply.recovered, self.asked) {
                    (Some(true), Some(asked)) => asked,
                    _ => reply.last_seq,
                };
                let data = serde_json::to_string(&reply).unwrap_or_default();
                let mut frame = format!("retry: {RETRY_MS}\n").into_bytes();
                frame.extend_from_slice(&sse_frame(Some(from), "subscribed", &data));
                frame.into()
            }
            Outbound::Text(text) => text.into(),
            Outbound::Final(text) => {
                self.done = true;
                text.into()
            }
        }
    }
}
