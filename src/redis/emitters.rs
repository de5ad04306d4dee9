//! Socket.IO workers that publish through Redis, unchanged (SPEC §6): python-socketio's
//! `RedisManager` / `AsyncRedisManager` (JSON on the channel `socketio`) and
//! `@socket.io/redis-emitter` (msgpack on `socket.io#/#` and `socket.io#/#<room>#`).
//!
//! **One translator.** Every node subscribes, but only the holder of
//! [`Keys::emitter_lease`] (renewed every third of a lease) translates: an `emit` of an event
//! to rooms becomes an event of each room's session, checked first by the HTTP route's
//! parser ([`crate::intake`]) so a bad one is refused alone, and the events of one session
//! taken together share one [`Keys::ingest`] entry `{ sessionId, events }`, added by a
//! script that first checks the lease, so a node that lost its lease adds nothing. The
//! ingest consumer ([`super::Ingest`]) then logs each entry exactly once, in order.
//! Refusals go to [`Keys::ingest_errors`] with `entry` `pubsub:<channel>`.
//!
//! **Bounded.** Messages wait in a [`Backlog`] of at most [`BACKLOG_MESSAGES`] messages and
//! [`BACKLOG_BYTES`] bytes (the connection speaks RESP3 and hands each message to it without
//! blocking); what does not fit is dropped, counted and described once per renewal. The
//! holder translates up to [`BATCH_MESSAGES`] waiting messages per script call.
//!
//! **At most once.** Pub/sub keeps nothing: a message published while no node holds the
//! lease (a holder that died, until its lease runs out) or while the translator is
//! reconnecting is gone, as those workers already accept. The HTTP route and the ingest
//! stream are the exactly-once ways in.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind};
use serde::Deserialize;
use std::collections::HashMap;

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Keys, Lease};
use crate::error::ErrorCode;
use crate::event::EventDraft;
use crate::hub::Hub;
use crate::intake;

/// KEYS: the lease, the ingest stream, the errors stream. ARGV: this node, the errors
/// stream's length, the number `n` of ingest payloads, the `n` payloads, then (entry, code,
/// reason) triples. Adds them only while this node holds the lease; 1 when it did.
const ADD_IF_HOLDER: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local n = tonumber(ARGV[3])
for i = 4, 3 + n do
  redis.call('XADD', KEYS[2], '*', 'payload', ARGV[i])
end
for i = 4 + n, #ARGV, 3 do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'entry', ARGV[i], 'code', ARGV[i + 1], 'error', ARGV[i + 2])
end
return 1
"#;
/// Messages translated together (one script call), at most; and their bytes, at most,
/// unless one message alone is larger.
const BATCH_MESSAGES: usize = 256;
const BATCH_BYTES: usize = 1 << 20;
/// Messages received and not yet translated, at most (see [`Backlog`]).
const BACKLOG_MESSAGES: usize = 10_000;
const BACKLOG_BYTES: usize = 64 << 20;
/// Nesting a msgpack message may have.
const MAX_DEPTH: usize = 128;
/// Longest piece of a message (or of a decoder's complaint about it) quoted in a refusal.
const QUOTE: usize = 120;
/// Refusals kept for inspection (shared with the ingest consumer's).
const MAX_ERRORS: usize = 1000;

/// The channels the translator listens on; `None` turns one format off.
#[derive(Debug, Clone)]
pub struct EmitterChannels {
    /// python-socketio's channel (`--redis-socketio-channel`, `socketio`).
    pub socketio: Option<String>,
    /// `@socket.io/redis-emitter`'s key (`--redis-emitter-key`, `socket.io`): it publishes on
    /// `<key>#<namespace>#` and `<key>#<namespace>#<room>#`.
    pub emitter_key: Option<String>,
}

impl EmitterChannels {
    pub fn is_empty(&self) -> bool {
        self.socketio.is_none() && self.emitter_key.is_none()
    }

    fn format_of(&self, channel: &str) -> Option<Format> {
        if self.socketio.as_deref() == Some(channel) {
            return Some(Format::PythonSocketio);
        }
        let key = self.emitter_key.as_deref()?;
        channel
            .strip_prefix(key)
            .is_some_and(|rest| rest.starts_with('#'))
            .then_some(Format::RedisEmitter)
    }

    /// The redis-emitter's channels as a `PSUBSCRIBE` pattern (glob characters escaped).
    fn emitter_pattern(&self) -> Option<String> {
        let key = self.emitter_key.as_deref()?;
        let mut pattern = String::with_capacity(key.len() + 2);
        for c in key.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push_str("#*");
        Some(pattern)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// JSON `{ method, event, data, namespace, room, … }`.
    PythonSocketio,
    /// msgpack `[uid, { type, data: [event, …args], nsp }, { rooms, except, flags }]`.
    RedisEmitter,
}

/// What a message asks for: `event` with `data` to each of `rooms`.
#[derive(Debug, PartialEq)]
struct Emit {
    event: String,
    data: Value,
    rooms: Vec<String>,
}

/// How large what the translator takes and makes may be.
#[derive(Debug, Clone, Copy)]
pub struct EmitterLimits {
    /// Larger messages are refused undecoded (`--max-body`).
    pub max_message_bytes: usize,
    /// `--max-event-bytes`, checked here so that one bad emit is refused alone.
    pub max_event_bytes: u64,
    /// `--max-batch`: the most events of one session one ingest entry holds.
    pub max_batch: usize,
}

/// This node's translator.
pub struct Emitters {
    pub redis: super::Redis,
    pub keys: Keys,
    pub node_id: String,
    pub channels: EmitterChannels,
    pub lease: Duration,
    pub limits: EmitterLimits,
    /// Only for its metrics: the translator logs nothing itself.
    pub hub: Hub,
    pub stop: CancellationToken,
}

impl Emitters {
    fn lease(&self) -> Lease {
        Lease {
            key: self.keys.emitter_lease(),
            holder: self.node_id.clone(),
            ttl: self.lease,
        }
    }

    /// Listens and translates until `stop`, resubscribing after every failure.
    pub async fn consume(self) {
        while !self.stop.is_cancelled() {
            if let Err(error) = self.consume_until_error().await {
                tracing::warn!(%error, "Socket.IO emitter channels failed; resubscribing");
                let _ = self
                    .stop
                    .run_until_cancelled(tokio::time::sleep(Duration::from_secs(1)))
                    .await;
            }
        }
    }

    /// A subscribing connection of its own: RESP3, so that its messages come through
    /// `backlog`, bounded, rather than an unbounded queue (on a cluster, to one node: the
    /// emitters' classic `PUBLISH` reaches every node's subscribers).
    async fn subscribe(&self, backlog: &Backlog) -> redis::RedisResult<MultiplexedConnection> {
        let mut redis = self.redis.connect_push(backlog.sender()).await?;
        if let Some(channel) = &self.channels.socketio {
            redis.subscribe(channel).await?;
        }
        if let Some(pattern) = self.channels.emitter_pattern() {
            redis.psubscribe(pattern).await?;
        }
        tracing::info!(channels = ?self.channels, "listening for Socket.IO emitters");
        Ok(redis)
    }

    async fn consume_until_error(&self) -> redis::RedisResult<()> {
        let mut backlog = Backlog::new();
        // Held (not used) until this returns: the subscriptions live as long as it does.
        let _subscribed = self.subscribe(&backlog).await?;
        // The lease and the script go through the cluster's routing on a cluster (their keys
        // share the ingest stream's slot: [`Keys::emitter_lease`]).
        let mut redis = self.redis.connect_blocking(Duration::from_secs(3)).await?;
        let lease = self.lease();
        let script = redis::Script::new(ADD_IF_HOLDER);
        let mut renewal = tokio::time::interval(self.lease / 3);
        let mut holder = false;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => {
                    return lease.release(&mut redis).await;
                }
                _ = renewal.tick() => {
                    let was = holder;
                    holder = lease.renew(&mut redis).await?;
                    if holder != was {
                        tracing::info!(holder, "Socket.IO emitter translation lease changed");
                    }
                    let dropped = backlog.dropped.swap(0, Ordering::Relaxed);
                    if dropped > 0 && holder {
                        holder = self.report_dropped(&mut redis, &script, dropped).await?;
                    }
                }
                push = backlog.receiver.recv() => {
                    let Some(push) = push else {
                        return Ok(());
                    };
                    let mut batch = Batch::default();
                    self.take(&backlog, push, holder, &mut batch)?;
                    while batch.has_room() {
                        let Ok(push) = backlog.receiver.try_recv() else {
                            break;
                        };
                        self.take(&backlog, push, holder, &mut batch)?;
                    }
                    if !batch.is_empty() {
                        let (forwarded, refused) = (batch.events(), batch.refusals.len());
                        holder = self.flush(&mut redis, &script, &batch).await?;
                        if holder {
                            let metrics = self.hub.metrics();
                            metrics.emitter_forwarded.add(forwarded as u64);
                            metrics.emitter_refused.add(refused as u64);
                        }
                    }
                }
            }
        }
    }

    /// Takes a push off the backlog, and translates it into `batch` if this node holds the
    /// lease (the others only keep their backlog empty).
    fn take(
        &self,
        backlog: &Backlog,
        (push, size): (PushInfo, usize),
        holder: bool,
        batch: &mut Batch,
    ) -> redis::RedisResult<()> {
        backlog.bytes.fetch_sub(size, Ordering::Relaxed);
        batch.bytes += size;
        batch.messages += 1;
        let Some((channel, payload)) = message(push)? else {
            return Ok(());
        };
        let Some(format) = self.channels.format_of(&channel).filter(|_| holder) else {
            return Ok(());
        };
        let entry = format!("pubsub:{channel}");
        let decoded = if payload.len() > self.limits.max_message_bytes {
            Err(format!(
                "the message is {} bytes, over the {}-byte limit",
                payload.len(),
                self.limits.max_message_bytes
            ))
        } else {
            decode(format, &payload)
        };
        let emit = match decoded {
            Ok(emit) => emit,
            Err(reason) => {
                tracing::warn!(channel, reason, "refused a Socket.IO emitter message");
                batch.refuse(entry, ErrorCode::InvalidEntry, reason);
                return Ok(());
            }
        };
        add_emit(&self.limits, emit, &entry, batch);
        Ok(())
    }

    /// Adds a batch's ingest entries and refusals; whether this node still holds the lease
    /// (if not, it added nothing).
    async fn flush(
        &self,
        redis: &mut super::Connection,
        script: &redis::Script,
        batch: &Batch,
    ) -> redis::RedisResult<bool> {
        let mut call = script.prepare_invoke();
        call.key(self.keys.emitter_lease())
            .key(self.keys.ingest())
            .key(self.keys.ingest_errors())
            .arg(&self.node_id)
            .arg(MAX_ERRORS)
            .arg(batch.groups.len());
        for group in &batch.groups {
            call.arg(group.payload());
        }
        for (entry, code, reason) in &batch.refusals {
            call.arg(entry).arg(code.as_str()).arg(reason);
        }
        let added: i64 = call.invoke_async(redis).await?;
        Ok(added == 1)
    }

    /// Describes, once per renewal, the messages the backlog had no room for.
    async fn report_dropped(
        &self,
        redis: &mut super::Connection,
        script: &redis::Script,
        dropped: u64,
    ) -> redis::RedisResult<bool> {
        let reason = format!(
            "{dropped} Socket.IO emitter messages were dropped: the translator fell behind by \
             more than {BACKLOG_MESSAGES} messages or {BACKLOG_BYTES} bytes"
        );
        tracing::warn!(dropped, "dropped Socket.IO emitter messages");
        let mut batch = Batch::default();
        batch.refuse("pubsub".to_owned(), ErrorCode::InvalidEntry, reason);
        let holder = self.flush(redis, script, &batch).await?;
        // Counted once described, so the count never runs ahead of the errors stream.
        if holder {
            self.hub.metrics().emitter_dropped.add(dropped);
        }
        Ok(holder)
    }
}

/// What one script call adds: an ingest entry per session's run of events, and refusals
/// (entry, code, reason).
#[derive(Default)]
struct Batch {
    /// In the order they were opened, so each session's entries are in its events' order.
    groups: Vec<Group>,
    /// The group each session's next event joins.
    open: HashMap<String, usize>,
    refusals: Vec<(String, ErrorCode, String)>,
    /// The bytes of the messages taken.
    bytes: usize,
    messages: usize,
}

/// One session's events, in order: one ingest entry `{ sessionId, events }`.
struct Group {
    session_id: String,
    events: Vec<Value>,
}

impl Group {
    fn payload(&self) -> String {
        json!({ "sessionId": self.session_id, "events": self.events }).to_string()
    }
}

impl Batch {
    fn has_room(&self) -> bool {
        self.messages < BATCH_MESSAGES && self.bytes < BATCH_BYTES
    }

    fn is_empty(&self) -> bool {
        self.groups.is_empty() && self.refusals.is_empty()
    }

    fn events(&self) -> usize {
        self.groups.iter().map(|g| g.events.len()).sum()
    }

    /// Adds an event to its session's open group. An event that ends the session closes
    /// it (a later event then goes alone, to be refused as the HTTP route would), and so
    /// does a full one.
    fn add(&mut self, session_id: String, item: Value, ends: bool, max_group: usize) {
        let index = match self.open.get(&session_id) {
            Some(&index) if self.groups[index].events.len() < max_group.max(1) => index,
            _ => {
                self.groups.push(Group {
                    session_id: session_id.clone(),
                    events: Vec::new(),
                });
                self.open.insert(session_id.clone(), self.groups.len() - 1);
                self.groups.len() - 1
            }
        };
        self.groups[index].events.push(item);
        if ends {
            self.open.remove(&session_id);
        }
    }

    fn refuse(&mut self, entry: String, code: ErrorCode, reason: String) {
        self.refusals.push((entry, code, reason));
    }
}

/// A published message's channel and payload; `None` for the other pushes (subscription
/// confirmations). The connection's end is an error, so the translator reconnects.
fn message(push: PushInfo) -> redis::RedisResult<Option<(String, Vec<u8>)>> {
    let mut data = push.data.into_iter();
    let (channel, payload) = match push.kind {
        PushKind::Message => (data.next(), data.next()),
        PushKind::PMessage => (data.nth(1), data.next()),
        PushKind::Disconnection => {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "the emitter channels' connection closed",
            )));
        }
        _ => return Ok(None),
    };
    let (Some(channel), Some(payload)) = (channel, payload) else {
        return Ok(None);
    };
    let channel: String = redis::from_redis_value(channel)?;
    let payload: Vec<u8> = redis::from_redis_value(payload)?;
    Ok(Some((channel, payload)))
}

/// Messages received and not yet translated: bounded in count and in bytes. What does not
/// fit is dropped and counted (pub/sub is at most once; Redis itself drops a subscriber
/// that falls too far behind).
struct Backlog {
    sender: mpsc::Sender<(PushInfo, usize)>,
    receiver: mpsc::Receiver<(PushInfo, usize)>,
    bytes: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
}

impl Backlog {
    fn new() -> Self {
        let (sender, receiver) = mpsc::channel(BACKLOG_MESSAGES);
        Self {
            sender,
            receiver,
            bytes: Arc::default(),
            dropped: Arc::default(),
        }
    }

    /// What the connection hands each push to; it must not block.
    fn sender(
        &self,
    ) -> impl Fn(PushInfo) -> Result<(), Infallible> + Clone + Send + Sync + 'static {
        let (sender, bytes, dropped) = (
            self.sender.clone(),
            self.bytes.clone(),
            self.dropped.clone(),
        );
        move |push| {
            let size = push_size(&push);
            let queued = bytes.fetch_add(size, Ordering::Relaxed);
            let fits = queued + size <= BACKLOG_BYTES || push.kind == PushKind::Disconnection;
            if !fits || sender.try_send((push, size)).is_err() {
                bytes.fetch_sub(size, Ordering::Relaxed);
                dropped.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }
    }
}

fn push_size(push: &PushInfo) -> usize {
    push.data
        .iter()
        .map(|value| match value {
            redis::Value::BulkString(bytes) => bytes.len(),
            _ => 16,
        })
        .sum()
}

/// Adds an emit's event to `batch` for each of its rooms, or the refusal of a room.
fn add_emit(limits: &EmitterLimits, emit: Emit, entry: &str, batch: &mut Batch) {
    let item = json!({ "event": emit.event, "data": emit.data });
    for room in emit.rooms {
        match validate(limits, &room, &item) {
            Ok(ends) => batch.add(room, item.clone(), ends, limits.max_batch),
            Err((code, reason)) => {
                tracing::warn!(entry, room, %code, reason, "refused a Socket.IO emitter event");
                batch.refuse(entry.to_owned(), code, reason);
            }
        }
    }
}

/// Checks an emit to one room as the ingest consumer will, so that a bad one is refused
/// alone rather than with the other events of its session's entry; whether it ends the
/// session.
fn validate(limits: &EmitterLimits, room: &str, item: &Value) -> Result<bool, (ErrorCode, String)> {
    crate::event::validate_session_id(room).map_err(|error| {
        (
            ErrorCode::InvalidSessionId,
            format!("room {} is not a session id: {error}", cut(room)),
        )
    })?;
    let drafts = intake::parse_batch(room, Value::Array(vec![item.clone()]), 1)
        .and_then(|drafts| {
            intake::check_event_sizes(&drafts, limits.max_event_bytes)?;
            Ok(drafts)
        })
        .map_err(|error| (error.code(), cut(&error.to_string())))?;
    Ok(drafts.iter().any(EventDraft::ends_session))
}

fn decode(format: Format, bytes: &[u8]) -> Result<Emit, String> {
    match format {
        Format::PythonSocketio => {
            let message: Value = serde_json::from_slice(bytes).map_err(|e| {
                format!(
                    "not a python-socketio JSON message: {}",
                    cut(&e.to_string())
                )
            })?;
            python_socketio(message)
        }
        Format::RedisEmitter => {
            // As deep as serde_json allows for JSON, not rmp-serde's 1,024.
            let mut decoder = rmp_serde::Deserializer::from_read_ref(bytes);
            decoder.set_max_depth(MAX_DEPTH);
            let message = Value::deserialize(&mut decoder).map_err(|e| {
                format!(
                    "not a @socket.io/redis-emitter msgpack message: {}",
                    cut(&e.to_string())
                )
            })?;
            redis_emitter(message)
        }
    }
}

/// `{ "method": "emit", "event", "data": [arg] | arg, "namespace": "/", "room": room |
/// [room, …], … }`.
fn python_socketio(message: Value) -> Result<Emit, String> {
    let Value::Object(mut message) = message else {
        return Err("a python-socketio message is a JSON object".into());
    };
    match message.get("method").and_then(Value::as_str) {
        Some("emit") => {}
        Some(method) => {
            return Err(format!(
                "python-socketio `{}` messages carry no session event (only `emit` does)",
                cut(method)
            ));
        }
        None => return Err("the message has no `method`".into()),
    }
    check_namespace(message.get("namespace"))?;
    let event = take_event(message.remove("event"))?;
    let args = match message.remove("data") {
        Some(Value::Array(args)) => args,
        Some(arg) => vec![arg],
        None => Vec::new(),
    };
    Ok(Emit {
        event,
        data: one_argument(args)?,
        rooms: rooms(message.remove("room"))?,
    })
}

/// `[uid, { "type": 2, "data": [event, arg], "nsp": "/" }, { "rooms": [room, …], … }]`.
fn redis_emitter(message: Value) -> Result<Emit, String> {
    let Value::Array(parts) = message else {
        return Err("a redis-emitter message is an array [uid, packet, options]".into());
    };
    let [_uid, Value::Object(mut packet), Value::Object(mut options)] =
        <[Value; 3]>::try_from(parts)
            .map_err(|_| "a redis-emitter message is an array [uid, packet, options]")?
    else {
        return Err("a redis-emitter message's packet and options are maps".into());
    };
    match packet.get("type").and_then(Value::as_u64) {
        Some(2) => {}
        Some(kind) => {
            return Err(format!(
                "Socket.IO packet type {kind} carries no session event (only 2, EVENT, does)"
            ));
        }
        None => return Err("the packet has no `type`".into()),
    }
    check_namespace(packet.get("nsp"))?;
    let Some(Value::Array(mut data)) = packet.remove("data") else {
        return Err("the packet's `data` is not [event, …arguments]".into());
    };
    if data.is_empty() {
        return Err("the packet's `data` names no event".into());
    }
    let event = take_event(Some(data.remove(0)))?;
    Ok(Emit {
        event,
        data: one_argument(data)?,
        rooms: rooms(options.remove("rooms"))?,
    })
}

fn check_namespace(namespace: Option<&Value>) -> Result<(), String> {
    match namespace {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(nsp)) if nsp == "/" => Ok(()),
        Some(other) => Err(format!(
            "namespace {} holds no herald sessions (they are in `/`)",
            quote(other)
        )),
    }
}

fn take_event(event: Option<Value>) -> Result<String, String> {
    match event {
        Some(Value::String(event)) => Ok(event),
        _ => Err("the emit names no event".into()),
    }
}

fn one_argument(args: Vec<Value>) -> Result<Value, String> {
    let count = args.len();
    let [data] = <[Value; 1]>::try_from(args).map_err(|_| {
        format!("a session event is emitted with one argument, its payload; this emit has {count}")
    })?;
    Ok(data)
}

fn rooms(rooms: Option<Value>) -> Result<Vec<String>, String> {
    let rooms = match rooms {
        Some(Value::String(room)) => vec![room],
        Some(Value::Array(rooms)) => rooms
            .into_iter()
            .map(|room| match room {
                Value::String(room) => Ok(room),
                other => Err(format!("room {} is not a session id", quote(&other))),
            })
            .collect::<Result<_, _>>()?,
        None | Some(Value::Null) => Vec::new(),
        Some(other) => return Err(format!("room {} is not a session id", quote(&other))),
    };
    if rooms.is_empty() {
        return Err("an emit to every socket (no room) names no session".into());
    }
    Ok(rooms)
}

/// `value` as JSON, cut to [`QUOTE`] characters: a refusal never echoes a whole message.
fn quote(value: &Value) -> String {
    match value {
        Value::String(text) => cut(text),
        other => cut(&other.to_string()),
    }
}

fn cut(text: &str) -> String {
    match text.char_indices().nth(QUOTE) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn emit(rooms: &[&str]) -> Emit {
        Emit {
            event: "progress".into(),
            data: json!({"status": "ACTIVE", "progress": 10}),
            rooms: rooms.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn python_socketio_emits_are_read_with_one_or_a_list_of_arguments() {
        let message = json!({"method": "emit", "event": "progress",
            "data": [{"status": "ACTIVE", "progress": 10}], "binary": false, "namespace": "/",
            "room": "sess-1", "skip_sid": null, "callback": null, "host_id": "h"});
        assert_eq!(python_socketio(message).unwrap(), emit(&["sess-1"]));
        let older = json!({"method": "emit", "event": "progress",
            "data": {"status": "ACTIVE", "progress": 10}, "room": ["sess-1", "sess-2"]});
        assert_eq!(python_socketio(older).unwrap(), emit(&["sess-1", "sess-2"]));
    }

    #[test]
    fn python_socketio_messages_that_are_no_session_event_are_refused_with_a_reason() {
        let cases = [
            (json!({"method": "disconnect", "sid": "x"}), "`disconnect`"),
            (
                json!({"method": "emit", "event": "progress", "data": [{}]}),
                "no room",
            ),
            (
                json!({"method": "emit", "event": "progress", "data": [{}], "room": "s", "namespace": "/chat"}),
                "namespace",
            ),
            (
                json!({"method": "emit", "event": "progress", "data": [{}, 2], "room": "s"}),
                "has 2",
            ),
            (
                json!({"method": "emit", "data": [{}], "room": "s"}),
                "no event",
            ),
            (json!([1, 2]), "JSON object"),
        ];
        for (message, reason) in cases {
            let error = python_socketio(message.clone()).unwrap_err();
            assert!(error.contains(reason), "{message}: {error}");
        }
    }

    fn msgpack(value: &Value) -> Vec<u8> {
        rmp_serde::to_vec_named(value).unwrap()
    }

    #[test]
    fn redis_emitter_messages_are_decoded_from_msgpack() {
        let message = json!(["emitter", {"type": 2, "data": ["progress", {"status": "ACTIVE", "progress": 10}], "nsp": "/"},
            {"rooms": ["sess-1"], "except": [], "flags": {}}]);
        let decoded = decode(Format::RedisEmitter, &msgpack(&message)).unwrap();
        assert_eq!(decoded, emit(&["sess-1"]));
    }

    #[test]
    fn redis_emitter_messages_that_are_no_session_event_are_refused_with_a_reason() {
        let cases = [
            (
                json!(["e", {"type": 2, "data": ["progress", {}], "nsp": "/"}, {"rooms": []}]),
                "no room",
            ),
            (
                json!(["e", {"type": 5, "data": ["progress", {}], "nsp": "/"}, {"rooms": ["s"]}]),
                "type 5",
            ),
            (
                json!(["e", {"type": 2, "data": ["progress", {}], "nsp": "/x"}, {"rooms": ["s"]}]),
                "namespace",
            ),
            (
                json!(["e", {"type": 2, "data": [], "nsp": "/"}, {"rooms": ["s"]}]),
                "no event",
            ),
            (json!({"not": "an array"}), "array"),
        ];
        for (message, reason) in cases {
            let error = decode(Format::RedisEmitter, &msgpack(&message)).unwrap_err();
            assert!(error.contains(reason), "{message}: {error}");
        }
        let error = decode(Format::RedisEmitter, b"\xc1garbage").unwrap_err();
        assert!(error.contains("msgpack"), "{error}");
    }

    #[test]
    fn an_emit_to_several_rooms_is_one_entry_per_room() {
        let payloads = translate(&[emit(&["a", "b"])]).0;
        assert_eq!(
            payloads,
            [
                json!({"sessionId": "a", "events": [{"event": "progress", "data": {"status": "ACTIVE", "progress": 10}}]}),
                json!({"sessionId": "b", "events": [{"event": "progress", "data": {"status": "ACTIVE", "progress": 10}}]}),
            ]
        );
    }

    const LIMITS: EmitterLimits = EmitterLimits {
        max_message_bytes: 1 << 20,
        max_event_bytes: 1_000,
        max_batch: 3,
    };

    /// The ingest payloads (parsed) and the refusal codes a batch of emits makes.
    fn translate(emits: &[Emit]) -> (Vec<Value>, Vec<ErrorCode>) {
        let mut batch = Batch::default();
        for emit in emits {
            let emit = Emit {
                event: emit.event.clone(),
                data: emit.data.clone(),
                rooms: emit.rooms.clone(),
            };
            add_emit(&LIMITS, emit, "pubsub:test", &mut batch);
        }
        let payloads = batch
            .groups
            .iter()
            .map(|g| serde_json::from_str(&g.payload()).unwrap())
            .collect();
        (payloads, batch.refusals.iter().map(|r| r.1).collect())
    }

    fn to(event: &str, data: Value, room: &str) -> Emit {
        Emit {
            event: event.into(),
            data,
            rooms: vec![room.into()],
        }
    }

    #[test]
    fn a_sessions_emits_share_entries_in_order_and_bad_ones_are_refused_alone() {
        let step = |n: u64| {
            to(
                "progress",
                json!({"status": "PROCESSING", "progress": n}),
                "a",
            )
        };
        let emits = [
            step(1),
            to(
                "progress",
                json!({"status": "PROCESSING", "progress": 1}),
                "b",
            ),
            to("bogus", json!({}), "a"),
            step(2),
            to("progress", json!({"progress": 3}), "a"),
            step(3),
            step(4),
            to("completed", json!({"result": {}}), "a"),
            step(5),
            to(
                "progress",
                json!({"status": "ACTIVE", "progress": 1}),
                "not a session id!",
            ),
            to(
                "progress",
                json!({"status": "ACTIVE", "x": "y".repeat(2_000), "progress": 1}),
                "b",
            ),
        ];
        let (payloads, refusals) = translate(&emits);
        let summary: Vec<(String, Vec<String>)> = payloads
            .iter()
            .map(|p| {
                let events = p["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| {
                        let n = &e["data"]["progress"];
                        format!(
                            "{}{}",
                            e["event"].as_str().unwrap(),
                            if n.is_null() {
                                String::new()
                            } else {
                                n.to_string()
                            }
                        )
                    })
                    .collect();
                (p["sessionId"].as_str().unwrap().to_owned(), events)
            })
            .collect();
        let owned = |s: &str, e: &[&str]| {
            (
                s.to_owned(),
                e.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            summary,
            [
                // At most max_batch (3) events per entry, in order.
                owned("a", &["progress1", "progress2", "progress3"]),
                owned("b", &["progress1"]),
                // An ending event closes its entry: what follows goes alone.
                owned("a", &["progress4", "completed"]),
                owned("a", &["progress5"]),
            ]
        );
        assert_eq!(
            refusals,
            [
                ErrorCode::InvalidEvent,
                ErrorCode::InvalidEvent,
                ErrorCode::InvalidSessionId,
                ErrorCode::EventTooLarge
            ]
        );
    }

    #[test]
    fn channels_are_told_apart_and_the_pattern_is_escaped() {
        let channels = EmitterChannels {
            socketio: Some("socketio".into()),
            emitter_key: Some("socket.io".into()),
        };
        assert_eq!(channels.format_of("socketio"), Some(Format::PythonSocketio));
        assert_eq!(
            channels.format_of("socket.io#/#sess-1#"),
            Some(Format::RedisEmitter)
        );
        assert_eq!(channels.format_of("socket.io-request#/#"), None);
        let odd = EmitterChannels {
            socketio: None,
            emitter_key: Some("a*b".into()),
        };
        assert_eq!(odd.emitter_pattern().as_deref(), Some("a\\*b#*"));
    }

    /// What a translation gives the ingest stream, or its refusal, for any input.
    fn check_translation(decoded: Result<Emit, String>) {
        match decoded {
            Ok(emit) => {
                let rooms = emit.rooms.len();
                assert!(rooms > 0);
                let (payloads, refusals) = translate(&[emit]);
                assert_eq!(payloads.len() + refusals.len(), rooms);
                for payload in payloads {
                    // The ingest consumer's parser takes what the translator admitted.
                    let parsed = crate::intake::parse_stream_payload(&payload.to_string(), 10);
                    assert!(parsed.is_ok(), "{payload}: {parsed:?}");
                }
                assert!(refusals.iter().all(|c| c.http_status().is_client_error()));
            }
            Err(reason) => assert!(
                reason.chars().count() <= 300,
                "an over-long refusal: {reason}"
            ),
        }
    }

    fn python_seeds() -> Vec<Vec<u8>> {
        [
            json!({"method": "emit", "event": "progress", "data": [{"status": "ACTIVE", "progress": 10}],
                "namespace": "/", "room": "sess-1", "skip_sid": null, "callback": null, "host_id": "h"}),
            json!({"method": "emit", "event": "completed", "data": {"result": {}}, "room": ["a", "b"]}),
            json!({"method": "enter_room", "sid": "x", "room": "r", "namespace": "/"}),
        ]
        .iter()
        .map(|v| serde_json::to_vec(v).unwrap())
        .collect()
    }

    #[test]
    fn fuzz_python_socketio_messages() {
        let seeds = python_seeds();
        let seeds: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
        crate::fuzzing::Fuzz::new("python-socketio message").run(&seeds, |input| {
            check_translation(decode(Format::PythonSocketio, input));
        });
    }

    #[test]
    fn fuzz_redis_emitter_messages() {
        let seeds: Vec<Vec<u8>> = [
            json!(["emitter", {"type": 2, "data": ["progress", {"status": "ACTIVE", "progress": 10}], "nsp": "/"},
                {"rooms": ["sess-1"], "except": [], "flags": {}}]),
            json!(["e", {"type": 2, "data": ["error", {"error": "x"}], "nsp": "/"}, {"rooms": ["a", "b"]}]),
        ]
        .iter()
        .map(msgpack)
        .collect();
        let seeds: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
        crate::fuzzing::Fuzz::new("redis-emitter message").run(&seeds, |input| {
            check_translation(decode(Format::RedisEmitter, input));
        });
    }

    #[test]
    fn deep_msgpack_is_refused_not_followed() {
        // 1,000 nested one-element arrays: within rmp-serde's own limit, over herald's.
        let mut deep = vec![0x91u8; 1_000];
        deep.push(0xc0);
        let error = decode(Format::RedisEmitter, &deep).unwrap_err();
        assert!(error.contains("depth"), "{error}");
    }
}
