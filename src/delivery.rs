//! The delivery core shared by every transport: what the hub sends a subscriber through.
//!
//! The hub orders a session's events and decides what each subscriber gets (replay, then
//! live); a [`Sink`] is where it puts them. Socket.IO sockets are sinks (socketioxide queues
//! and frames their packets); SSE streams and plain WebSocket connections are
//! [`Follower`]s: one bounded, ordered queue each, drained by the connection's own writer.
//! Followers of a session are kept in [`Followers`], which the hub broadcasts to right after
//! the session's Socket.IO room, under the same gate, so all three transports see one order.
//!
//! A follower whose queue is full is cut off at once, as a slow Socket.IO socket is: its
//! connection ends as a network failure would, and it recovers by replay (`Last-Event-ID`,
//! or `subscribe` with `lastSeq`). One slow follower never delays a producer or anyone else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use socketioxide::extract::SocketRef;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use serde_json::value::RawValue;

use crate::feed::FeedFrame;
use crate::hub::Subscribed;
use crate::log::LoggedEvent;

/// Why a sink did not take a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// Its queue is full: it may take more once its reader catches up.
    Full,
    /// Its connection is gone.
    Gone,
}

/// Something that follows sessions: a Socket.IO socket or a [`Follower`].
///
/// The hub calls these under a session's gate, so they must not block: each either takes
/// the message into a bounded queue at once or says why not.
pub trait Sink: Send + Sync {
    /// For logs.
    fn label(&self) -> String;
    fn send_subscribed(&self, reply: &Subscribed) -> Result<(), SendError>;
    fn send(&self, event: &Arc<LoggedEvent>) -> Result<(), SendError>;
    /// A session-feed message ([`crate::feed`]).
    fn send_feed(&self, frame: &Arc<FeedFrame>) -> Result<(), SendError>;
    /// An owned handle on the same connection, for the session feed to keep.
    fn to_shared(&self) -> Arc<dyn Sink>;
    /// From now on, the session's broadcasts reach this sink.
    fn follow(&self, session_id: &str);
    fn unfollow(&self, session_id: &str);
    /// Ends the connection because it cannot keep up; the client reconnects and replays.
    fn cut_off(&self);
}

impl Sink for SocketRef {
    fn label(&self) -> String {
        format!("socket {}", self.id)
    }

    fn send_subscribed(&self, reply: &Subscribed) -> Result<(), SendError> {
        self.emit("subscribed", reply).map_err(|_| SendError::Gone)
    }

    fn send(&self, event: &Arc<LoggedEvent>) -> Result<(), SendError> {
        emit_raw(self, event.kind.as_str(), &event.json)
    }

    fn send_feed(&self, frame: &Arc<FeedFrame>) -> Result<(), SendError> {
        emit_raw(self, frame.kind.as_str(), &frame.json)
    }

    fn to_shared(&self) -> Arc<dyn Sink> {
        Arc::new(self.clone())
    }

    fn follow(&self, session_id: &str) {
        self.join(session_id.to_owned());
    }

    fn unfollow(&self, session_id: &str) {
        self.leave(session_id.to_owned());
    }

    fn cut_off(&self) {
        self.close_transport();
    }
}

fn emit_raw(socket: &SocketRef, event: &str, json: &RawValue) -> Result<(), SendError> {
    match socket.emit(event, json) {
        Ok(()) => Ok(()),
        Err(_) if !socket.connected() => Err(SendError::Gone),
        Err(_) => Err(SendError::Full),
    }
}

/// One logged event with its transport encodings, each made at most once however many
/// followers it is broadcast to.
#[derive(Debug)]
pub struct Framed {
    pub event: Arc<LoggedEvent>,
    sse: OnceLock<Bytes>,
    ws: OnceLock<Utf8Bytes>,
}

impl Framed {
    pub fn new(event: Arc<LoggedEvent>) -> Self {
        Self {
            event,
            sse: OnceLock::new(),
            ws: OnceLock::new(),
        }
    }

    /// `id: <seq>`, `event: <name>`, `data: <payload>`, as SPEC §6 frames an SSE event.
    pub fn sse(&self) -> Bytes {
        self.sse
            .get_or_init(|| {
                let event = &self.event;
                sse_frame(Some(event.seq), event.kind.as_str(), event.json.get())
            })
            .clone()
    }

    /// `{ "type": "<name>", ...payload }`, as SPEC §6 frames a plain WebSocket event.
    pub fn ws(&self) -> Utf8Bytes {
        self.ws
            .get_or_init(|| ws_event_text(self.event.kind.as_str(), self.event.json.get()).into())
            .clone()
    }
}

/// One SSE frame. Lines of `data` become `data:` lines each, as the format requires (herald
/// writes compact JSON, so there is normally one).
pub fn sse_frame(id: Option<u64>, event: &str, data: &str) -> Bytes {
    let mut frame = String::with_capacity(data.len() + event.len() + 32);
    if let Some(id) = id {
        frame.push_str("id: ");
        frame.push_str(&id.to_string());
        frame.push('\n');
    }
    frame.push_str("event: ");
    frame.push_str(event);
    frame.push('\n');
    for line in data.split('\n') {
        frame.push_str("data: ");
        frame.push_str(line.strip_suffix('\r').unwrap_or(line));
        frame.push('\n');
    }
    frame.push('\n');
    Bytes::from(frame)
}

/// `payload` (a JSON object) with `"type": kind` added last, so that it wins over any `type`
/// field the payload carries (JSON readers keep the last of repeated keys).
pub fn ws_event_text(kind: &str, payload: &str) -> String {
    let body = payload.trim_end();
    let Some(open) = body.strip_suffix('}') else {
        // Not an object: wrap it rather than send a frame clients cannot read.
        return format!(r#"{{"type":"{kind}","data":{body}}}"#);
    };
    let mut text = String::with_capacity(body.len() + kind.len() + 12);
    text.push_str(open);
    if !open.trim_end().ends_with('{') {
        text.push(',');
    }
    text.push_str(r#""type":""#);
    text.push_str(kind);
    text.push_str(r#""}"#);
    text
}

/// What a follower's writer sends, in queue order.
#[derive(Debug)]
pub enum Outbound {
    Subscribed(Subscribed),
    Event(Arc<Framed>),
    /// A session-feed message.
    Feed(Arc<FeedFrame>),
    /// A transport-specific message (a WebSocket reply, an SSE error frame), ordered with
    /// the events.
    Text(String),
    /// The last message: the connection ends once it is sent.
    Final(String),
}

/// A subscriber that is not a Socket.IO socket (SSE, plain WebSocket).
#[derive(Clone)]
pub struct Follower(Arc<FollowerInner>);

struct FollowerInner {
    id: u64,
    kind: &'static str,
    queue: mpsc::Sender<Outbound>,
    cut: CancellationToken,
    registry: Followers,
}

impl Follower {
    /// Unique on this node while it runs.
    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// Cancelled when herald ends this follower's connection (slow, shutdown, dev drop).
    pub fn cut_token(&self) -> CancellationToken {
        self.0.cut.clone()
    }

    /// Queues a transport-specific message after what is queued already.
    pub fn push(&self, message: Outbound) -> Result<(), SendError> {
        self.0.queue.try_send(message).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::Gone,
        })
    }
}

impl Sink for Follower {
    fn label(&self) -> String {
        format!("{} follower {}", self.0.kind, self.0.id)
    }

    fn send_subscribed(&self, reply: &Subscribed) -> Result<(), SendError> {
        self.push(Outbound::Subscribed(reply.clone()))
    }

    fn send(&self, event: &Arc<LoggedEvent>) -> Result<(), SendError> {
        self.push(Outbound::Event(Arc::new(Framed::new(event.clone()))))
    }

    fn send_feed(&self, frame: &Arc<FeedFrame>) -> Result<(), SendError> {
        self.push(Outbound::Feed(frame.clone()))
    }

    fn to_shared(&self) -> Arc<dyn Sink> {
        Arc::new(self.clone())
    }

    fn follow(&self, session_id: &str) {
        self.0.registry.add(session_id, self);
    }

    fn unfollow(&self, session_id: &str) {
        self.0.registry.remove(session_id, self.0.id);
    }

    fn cut_off(&self) {
        self.0.registry.forget(self.0.id);
        self.0.cut.cancel();
    }
}

/// A follower's receiving end, held by its connection: dropping it (the connection ended)
/// removes the follower from every session.
pub struct FollowerHandle {
    pub follower: Follower,
    pub queue: mpsc::Receiver<Outbound>,
}

impl Drop for FollowerHandle {
    fn drop(&mut self) {
        self.follower.0.registry.forget(self.follower.0.id);
    }
}

/// Every follower of every session on this node.
#[derive(Clone, Default)]
pub struct Followers(Arc<FollowersInner>);

#[derive(Default)]
struct FollowersInner {
    next_id: AtomicU64,
    /// A std mutex: it guards map updates and non-blocking sends, never an `.await`.
    map: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    by_session: HashMap<String, HashMap<u64, Follower>>,
    sessions_of: HashMap<u64, Vec<String>>,
}

impl Registry {
    fn remove(&mut self, session_id: &str, id: u64) {
        if let Some(followers) = self.by_session.get_mut(session_id) {
            followers.remove(&id);
            if followers.is_empty() {
                self.by_session.remove(session_id);
            }
        }
        if let Some(sessions) = self.sessions_of.get_mut(&id) {
            sessions.retain(|s| s != session_id);
            if sessions.is_empty() {
                self.sessions_of.remove(&id);
            }
        }
    }

    fn forget(&mut self, id: u64) {
        for session_id in self.sessions_of.remove(&id).unwrap_or_default() {
            if let Some(followers) = self.by_session.get_mut(&session_id) {
                followers.remove(&id);
                if followers.is_empty() {
                    self.by_session.remove(&session_id);
                }
            }
        }
    }
}

impl Followers {
    /// A new follower whose queue holds `capacity` messages.
    pub fn open(&self, kind: &'static str, capacity: usize) -> FollowerHandle {
        let (queue, rx) = mpsc::channel(capacity.max(1));
        let follower = Follower(Arc::new(FollowerInner {
            id: self.0.next_id.fetch_add(1, Ordering::Relaxed),
            kind,
            queue,
            cut: CancellationToken::new(),
            registry: self.clone(),
        }));
        FollowerHandle {
            follower,
            queue: rx,
        }
    }

    fn add(&self, session_id: &str, follower: &Follower) {
        let mut map = self.0.map.lock().unwrap();
        let id = follower.0.id;
        map.by_session
            .entry(session_id.to_owned())
            .or_default()
            .insert(id, follower.clone());
        let sessions = map.sessions_of.entry(id).or_default();
        if !sessions.iter().any(|s| s == session_id) {
            sessions.push(session_id.to_owned());
        }
    }

    fn remove(&self, session_id: &str, id: u64) {
        self.0.map.lock().unwrap().remove(session_id, id);
    }

    fn forget(&self, id: u64) {
        self.0.map.lock().unwrap().forget(id);
    }

    /// Whether any follower on this node follows the session.
    pub fn has(&self, session_id: &str) -> bool {
        self.0
            .map
            .lock()
            .unwrap()
            .by_session
            .contains_key(session_id)
    }

    /// Queues `event` for every follower of its session; returns how many were cut off
    /// because their queue was full. Followers whose connection is gone are forgotten.
    pub fn broadcast(&self, session_id: &str, event: &Arc<LoggedEvent>) -> usize {
        let mut map = self.0.map.lock().unwrap();
        let Some(followers) = map.by_session.get(session_id) else {
            return 0;
        };
        let framed = Arc::new(Framed::new(event.clone()));
        let mut full = Vec::new();
        let mut gone = Vec::new();
        for (id, follower) in followers {
            match follower.push(Outbound::Event(framed.clone())) {
                Ok(()) => {}
                Err(SendError::Full) => full.push(follower.clone()),
                Err(SendError::Gone) => gone.push(*id),
            }
        }
        for id in gone {
            map.forget(id);
        }
        for follower in &full {
            map.forget(follower.0.id);
            follower.0.cut.cancel();
            tracing::warn!(
                session_id,
                seq = event.seq,
                follower = %follower.label(),
                "slow consumer: dropping its connection"
            );
        }
        full.len()
    }

    /// Ends the connections of the session's followers; returns how many.
    pub fn cut_session(&self, session_id: &str) -> usize {
        let cut: Vec<Follower> = {
            let map = self.0.map.lock().unwrap();
            map.by_session
                .get(session_id)
                .map(|f| f.values().cloned().collect())
                .unwrap_or_default()
        };
        for follower in &cut {
            follower.cut_off();
        }
        cut.len()
    }

    /// Ends every follower's connection (shutdown).
    pub fn cut_all(&self) {
        let all: Vec<Follower> = {
            let mut map = self.0.map.lock().unwrap();
            let all = map
                .by_session
                .values()
                .flat_map(|f| f.values().cloned())
                .collect();
            *map = Registry::default();
            all
        };
        for follower in all {
            follower.0.cut.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;

    fn event(seq: u64) -> Arc<LoggedEvent> {
        Arc::new(LoggedEvent {
            seq,
            kind: EventKind::Progress,
            json: serde_json::value::RawValue::from_string(format!(
                r#"{{"sessionId":"s","seq":{seq},"type":"payload-field"}}"#
            ))
            .unwrap(),
        })
    }

    #[test]
    fn frames_follow_spec_6() {
        let framed = Framed::new(event(7));
        assert_eq!(
            &framed.sse()[..],
            b"id: 7\nevent: progress\ndata: {\"sessionId\":\"s\",\"seq\":7,\"type\":\"payload-field\"}\n\n"
        );
        let ws: serde_json::Value = serde_json::from_str(&framed.ws()).unwrap();
        assert_eq!(ws["type"], "progress");
        assert_eq!(ws["seq"], 7);
        assert_eq!(ws_event_text("error", "{}"), r#"{"type":"error"}"#);
        assert_eq!(
            &sse_frame(None, "e", "a\nb")[..],
            b"event: e\ndata: a\ndata: b\n\n"
        );
    }

    #[test]
    fn a_full_follower_is_cut_off_and_the_others_still_get_the_event() {
        let followers = Followers::default();
        let slow = followers.open("sse", 1);
        let mut quick = followers.open("sse", 8);
        slow.follower.follow("s");
        quick.follower.follow("s");
        assert_eq!(followers.broadcast("s", &event(1)), 0);
        assert_eq!(followers.broadcast("s", &event(2)), 1);
        assert!(slow.follower.cut_token().is_cancelled());
        assert!(!quick.follower.cut_token().is_cancelled());
        assert_eq!(followers.broadcast("s", &event(3)), 0);
        let mut seqs = Vec::new();
        while let Ok(Outbound::Event(framed)) = quick.queue.try_recv() {
            seqs.push(framed.event.seq);
        }
        assert_eq!(seqs, [1, 2, 3]);
        drop(quick);
        assert!(!followers.has("s"));
    }
}
