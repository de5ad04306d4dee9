//! The hub: the one place where events are ordered for delivery.
//!
//! Data flows one way: a producer hands validated drafts to [`Hub::publish`], which appends
//! them to the [`EventLog`] (assigning `seq`), folds them into the [`SessionStore`] and
//! broadcasts each event's already-serialized bytes to the session's Socket.IO room and its
//! SSE / WebSocket followers ([`crate::delivery`]). A [`Hub::subscribe`] reads the log head,
//! joins the subscriber (any [`Sink`]) to the session and sends the replay.
//!
//! Invariant: for one session, publish and subscribe run one at a time, in arrival order,
//! behind that session's *gate*. A subscriber therefore gets every event after its
//! `lastSeq` exactly once: those logged before it joined come from the replay, those
//! logged after from the room, and nothing can be logged in between. The gate is a tokio
//! mutex held across the log append and the broadcast on purpose: those awaits *are* the
//! ordered work; nothing unrelated is awaited under it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use socketioxide::{BroadcastError, SocketError, SocketIo};

use crate::delivery::{Followers, SendError, Sink};
use crate::feed::Feed;

use crate::event::SessionStatus;
use crate::event::{EventDraft, now_timestamp};
use crate::log::{Appended, Epoch, EventLog, LogError, LogHead, LogSlice, LoggedEvent, Writer};
use crate::metrics::Metrics;
use crate::store::{Origin, SessionStore, SessionSummary, Snapshot, StoreError};

/// How long a whole replay may take before the socket counts as a slow consumer and is cut
/// off (it recovers by replay when it reconnects).
const REPLAY_DEADLINE: Duration = Duration::from_secs(10);
/// How often a replay that outgrew its socket's queue looks for room again.
const REPLAY_POLL: Duration = Duration::from_millis(5);
/// Most events a replay reads from the log at a time.
const REPLAY_BATCH: usize = 1_000;

/// Most events one catch-up reads from the log at a time (cluster mode).
const CATCH_UP_BATCH: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the socket is gone")]
    SocketGone,
    #[error("the socket could not keep up and was disconnected")]
    SlowConsumer,
}

/// What a publish did, for the ingest reply.
#[derive(Debug)]
pub struct Published {
    pub accepted: usize,
    pub duplicates: usize,
    pub seqs: Vec<Option<u64>>,
    pub last_seq: u64,
}

/// Which events a delivery hands over for this node's own publish, and when that publish
/// began (for `herald_publish_to_deliver_seconds`).
#[derive(Debug, Clone, Copy)]
struct Accepted {
    /// The publish's first new `seq` and its start.
    from: Option<(u64, Instant)>,
}

impl Accepted {
    /// A delivery of events this node did not just accept (caught up, or at a subscribe).
    const NOT_HERE: Accepted = Accepted { from: None };

    /// The publish that began at `at` (`None`: it logged nothing new) logged `fresh`.
    fn at(at: Option<Instant>, fresh: &[Arc<LoggedEvent>]) -> Self {
        Self {
            from: at
                .zip(fresh.first().map(|e| e.seq))
                .map(|(at, seq)| (seq, at)),
        }
    }

    /// When `event` was accepted, if this publish accepted it.
    fn of(self, event: &LoggedEvent) -> Option<Instant> {
        self.from
            .and_then(|(first, at)| (event.seq >= first).then_some(at))
    }
}

/// Where a client wants to resume from.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    pub last_seq: u64,
    pub epoch: Option<Epoch>,
}

/// The reply to a subscribe.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Subscribed {
    pub session_id: String,
    pub timestamp: String,
    pub last_seq: u64,
    /// `""` on the wire while the session has no log.
    #[serde(serialize_with = "Epoch::serialize_wire")]
    pub epoch: Option<Epoch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
}

/// What this node has delivered of a session to its local room.
#[derive(Debug, Default)]
struct Cursor {
    /// Every local room member has every event up to here and gets later ones live.
    delivered: u64,
    /// The log incarnation `delivered` counts in: `None` until the cursor is first used,
    /// `Some(None)` when a socket followed the session before its log existed.
    epoch: Option<Option<Epoch>>,
}

type Gate = Arc<tokio::sync::Mutex<Cursor>>;

/// The newest append another node announced for a session: its log incarnation and `seq`.
#[derive(Debug)]
struct Announced {
    epoch: Epoch,
    seq: u64,
}

impl Cursor {
    /// Whether this node has delivered what `announced` says was logged.
    fn covers(&self, announced: &Announced) -> bool {
        self.epoch
            .as_ref()
            .is_some_and(|e| e.as_ref() == Some(&announced.epoch))
            && announced.seq <= self.delivered
    }
}

/// Whether `events` (read after `after`) continue it without a hole up to `last_seq`.
fn continues(events: &[Arc<LoggedEvent>], after: u64, last_seq: u64) -> bool {
    after >= last_seq || events.first().is_some_and(|e| e.seq == after + 1)
}

/// One socket's replay in progress: what it has been sent and what is still to send.
struct Replay<'a> {
    socket: &'a dyn Sink,
    /// The socket has every event up to here.
    sent: u64,
    epoch: Option<Epoch>,
    pending: std::collections::VecDeque<Arc<LoggedEvent>>,
    count: u64,
}

impl<'a> Replay<'a> {
    fn new(socket: &'a dyn Sink, after: u64, epoch: Option<Epoch>) -> Self {
        Self {
            socket,
            sent: after,
            epoch,
            pending: Default::default(),
            count: 0,
        }
    }

    /// Queues the events read after `sent`, up to `last_seq` (a read may return more: other
    /// nodes log while it runs, and the room delivers those).
    fn queue(&mut self, events: Vec<Arc<LoggedEvent>>, last_seq: u64) {
        self.pending.extend(
            events
                .into_iter()
                .filter(|e| e.seq > self.sent && e.seq <= last_seq),
        );
    }

    /// Sends what the socket's queue takes now, without waiting; true when nothing is left.
    fn send_what_fits(&mut self) -> Result<bool, HubError> {
        while let Some(event) = self.pending.front() {
            match self.socket.send(event) {
                Ok(()) => {
                    self.sent = event.seq;
                    self.count += 1;
                    self.pending.pop_front();
                }
                Err(SendError::Gone) => return Err(HubError::SocketGone),
                Err(SendError::Full) => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Sends everything pending, waiting for room in the socket's queue until `deadline`.
    async fn send_all_by(&mut self, deadline: tokio::time::Instant) -> Result<(), HubError> {
        while !self.send_what_fits()? {
            if tokio::time::Instant::now() >= deadline {
                return Err(HubError::SlowConsumer);
            }
            // The engine gives no signal when a queue drains; a replay that outgrew the queue
            // is rare, and this wait holds nothing but this socket.
            tokio::time::sleep(REPLAY_POLL).await;
        }
        Ok(())
    }
}

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    log: Arc<dyn EventLog>,
    store: Arc<dyn SessionStore>,
    io: SocketIo,
    /// A std mutex: it guards a map lookup and is never held across an `.await`.
    gates: Mutex<HashMap<String, Gate>>,
    /// Sessions whose catch-up is spawned but has not yet taken the gate (cluster mode),
    /// with the newest announcement for each: an announcement for one of them needs no
    /// catch-up of its own, because that one reads the log after the announced events were
    /// logged. At most one per session waits.
    queued: Mutex<HashMap<String, Announced>>,
    /// This node's SSE and plain WebSocket subscribers.
    followers: Followers,
    /// This node's session-feed watchers.
    feed: Feed,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(
        log: Arc<dyn EventLog>,
        store: Arc<dyn SessionStore>,
        io: SocketIo,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                log,
                feed: Feed::new(store.clone()),
                store,
                io,
                gates: Mutex::default(),
                queued: Mutex::default(),
                followers: Followers::default(),
                metrics,
            }),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    fn gate(&self, session_id: &str) -> Gate {
        let mut gates = self.inner.gates.lock().unwrap();
        if let Some(gate) = gates.get(session_id) {
            return gate.clone();
        }
        gates.entry(session_id.to_owned()).or_default().clone()
    }

    /// Logs herald's own drafts (all or none), updates the snapshot and broadcasts the new
    /// events.
    pub async fn publish(
        &self,
        session_id: &str,
        drafts: Vec<EventDraft>,
    ) -> Result<Published, HubError> {
        self.publish_as(session_id, drafts, Writer::Herald).await
    }

    /// [`Hub::publish`] for `writer`: a producer's new events for an ended session are
    /// refused ([`LogError::SessionEnded`]) unless it reopens the session.
    pub async fn publish_as(
        &self,
        session_id: &str,
        drafts: Vec<EventDraft>,
        writer: Writer,
    ) -> Result<Published, HubError> {
        // `herald_publish_to_deliver_seconds` counts from here: the gate's wait is part of
        // what a publisher waits for.
        let accepted_at = Instant::now();
        let gate = self.gate(session_id);
        let mut cursor = gate.lock().await;
        let outcome = self.inner.log.append_as(session_id, drafts, writer).await?;
        let accepted = outcome.appended.len();
        let to_fold = if accepted == 0 && outcome.duplicates > 0 {
            // Only duplicates: a retry. Its first attempt was logged, but the connection may
            // have died before it was folded or delivered, so both are done again from the
            // log; the fold and the cursor skip what they already have.
            self.read_back(session_id, &outcome.seqs).await?
        } else {
            outcome.appended
        };
        self.inner
            .store
            .apply(session_id, &outcome.epoch, &to_fold)
            .await?;
        if !to_fold.is_empty() {
            self.inner.feed.touch(session_id);
        }
        let fresh: Vec<Arc<LoggedEvent>> = to_fold.iter().map(|a| a.event.clone()).collect();
        let upto = fresh.last().map_or(outcome.last_seq, |e| e.seq);
        // A retry that found only duplicates delivers events accepted by an earlier call.
        let accepted_here = Accepted::at((accepted > 0).then_some(accepted_at), &fresh);
        self.deliver(
            session_id,
            &mut cursor,
            Some(&outcome.epoch),
            upto,
            &fresh,
            accepted_here,
        )
        .await?;
        self.inner.metrics.events_logged.add(accepted as u64);
        Ok(Published {
            accepted,
            duplicates: outcome.duplicates,
            seqs: outcome.seqs,
            last_seq: outcome.last_seq,
        })
    }

    /// The logged events whose `seq`s an append reported for duplicates.
    async fn read_back(
        &self,
        session_id: &str,
        seqs: &[Option<u64>],
    ) -> Result<Vec<Appended>, HubError> {
        let known = || seqs.iter().flatten().copied();
        let (Some(first), Some(last)) = (known().min(), known().max()) else {
            return Ok(Vec::new());
        };
        let count = usize::try_from(last - first + 1).unwrap_or(usize::MAX);
        let slice = self.inner.log.read(session_id, first - 1, count).await?;
        let appended = slice
            .events
            .into_iter()
            .map(Appended::from_logged)
            .collect::<Result<_, _>>()
            .map_err(LogError::from)?;
        Ok(appended)
    }

    /// Brings the local room of a session up to the log's head.
    pub async fn catch_up(&self, session_id: &str) -> Result<(), HubError> {
        let gate = self.gate(session_id);
        let mut cursor = gate.lock().await;
        self.catch_up_locked(session_id, &mut cursor).await
    }

    /// Another node logged events of `session_id` up to `announced` in log incarnation
    /// `epoch` (cluster mode). When a local socket follows the session and this node has not
    /// delivered that far, a catch-up is started in its own task, so sessions catch up
    /// concurrently and the announcement listener never waits on Redis. A burst of
    /// announcements for one session costs one catch-up.
    pub fn announce(&self, session_id: &str, epoch: &Epoch, announced: u64) {
        self.inner.feed.touch_upto(session_id, epoch, announced);
        // Every followed session has a gate: `subscribe` makes one and `sweep` keeps it
        // while the room has members.
        let Some(gate) = self.inner.gates.lock().unwrap().get(session_id).cloned() else {
            return;
        };
        let announced = Announced {
            epoch: epoch.clone(),
            seq: announced,
        };
        if gate
            .try_lock()
            .is_ok_and(|cursor| cursor.covers(&announced))
        {
            return;
        }
        {
            let mut queued = self.inner.queued.lock().unwrap();
            if let Some(waiting) = queued.get_mut(session_id) {
                *waiting = announced;
                return;
            }
            queued.insert(session_id.to_owned(), announced);
        }
        let hub = self.clone();
        let session_id = session_id.to_owned();
        tokio::spawn(async move {
            let mut cursor = gate.lock().await;
            let wanted = hub.inner.queued.lock().unwrap().remove(&session_id);
            if wanted.is_some_and(|wanted| cursor.covers(&wanted)) {
                return; // an earlier catch-up already read that far
            }
            if let Err(error) = hub.catch_up_locked(&session_id, &mut cursor).await {
                tracing::warn!(session_id, %error, "could not deliver events logged by another node");
            }
        });
    }

    /// Catches up every session this node follows (after a lost announcement channel).
    pub async fn catch_up_all(&self) -> Result<(), HubError> {
        let sessions: Vec<String> = self.inner.gates.lock().unwrap().keys().cloned().collect();
        for session_id in sessions {
            self.catch_up(&session_id).await?;
        }
        Ok(())
    }

    /// Delivers what the log holds beyond the cursor, reading it in batches: each read
    /// returns the head and the next events in one request.
    async fn catch_up_locked(&self, session_id: &str, cursor: &mut Cursor) -> Result<(), HubError> {
        if cursor.epoch.is_none() {
            // Nobody here followed the session yet: only where the log stands matters.
            let head = self.inner.log.head(session_id).await?;
            return self.deliver_to_head(session_id, cursor, &head).await;
        }
        loop {
            let before = (cursor.epoch.clone(), cursor.delivered);
            let slice = self
                .inner
                .log
                .read(session_id, cursor.delivered, CATCH_UP_BATCH)
                .await?;
            let head = &slice.head;
            // Deliver no further than what was read, so a long backlog goes in batches.
            let upto = slice
                .events
                .last()
                .map_or(head.last_seq, |e| e.seq.min(head.last_seq));
            self.deliver(
                session_id,
                cursor,
                head.epoch.as_ref(),
                upto,
                &slice.events,
                Accepted::NOT_HERE,
            )
            .await?;
            let stuck = (cursor.epoch.clone(), cursor.delivered) == before;
            if cursor.delivered >= head.last_seq || stuck {
                return Ok(());
            }
        }
    }

    /// Brings the local room up to `head`, reading from the log what it lacks.
    async fn deliver_to_head(
        &self,
        session_id: &str,
        cursor: &mut Cursor,
        head: &LogHead,
    ) -> Result<(), HubError> {
        self.deliver(
            session_id,
            cursor,
            head.epoch.as_ref(),
            head.last_seq,
            &[],
            Accepted::NOT_HERE,
        )
        .await
    }

    /// Broadcasts, in order, every event after `cursor.delivered` up to `upto`: `fresh`
    /// when it continues the cursor (the common case: events this node just logged),
    /// otherwise what the log holds (events other nodes logged in between). `accepted`
    /// says which of them this node's publish accepted, and when.
    async fn deliver(
        &self,
        session_id: &str,
        cursor: &mut Cursor,
        epoch: Option<&Epoch>,
        upto: u64,
        fresh: &[Arc<LoggedEvent>],
        accepted: Accepted,
    ) -> Result<(), HubError> {
        match &cursor.epoch {
            Some(known) if known.as_ref() == epoch => {}
            Some(_) => {
                // The log is new (or was recreated): its events all count from seq 1.
                cursor.epoch = Some(epoch.cloned());
                cursor.delivered = 0;
            }
            None => {
                // First use: no local socket follows the session yet (see `sweep`), so only
                // what is being delivered now matters.
                cursor.epoch = Some(epoch.cloned());
                cursor.delivered = fresh.first().map_or(upto, |e| e.seq - 1);
            }
        }
        if epoch.is_none() {
            return Ok(());
        }
        if upto <= cursor.delivered {
            return Ok(());
        }
        if fresh.first().is_some_and(|e| e.seq == cursor.delivered + 1) {
            for event in fresh {
                self.broadcast(session_id, event, accepted.of(event)).await;
            }
        } else if !self.room_is_empty(session_id) {
            let count = usize::try_from(upto - cursor.delivered).unwrap_or(usize::MAX);
            let slice = self
                .inner
                .log
                .read(session_id, cursor.delivered, count)
                .await?;
            let first = slice.events.first().map_or(upto + 1, |e| e.seq);
            if first != cursor.delivered + 1 {
                // This node fell further behind than the log retains (a paused or overloaded
                // node in a cluster): a broadcast now would hand its sockets a silent gap.
                // They are cut off like slow consumers instead; on resubscribing they get
                // `recovered: false` and refetch the snapshot.
                let cut = self.cut_off_followers(session_id);
                tracing::warn!(
                    session_id,
                    delivered = cursor.delivered,
                    first_retained = first,
                    sockets = cut,
                    "events left the log before this node delivered them: disconnecting the session's sockets so they resync"
                );
            } else {
                for event in slice.events.iter().filter(|e| e.seq <= upto) {
                    self.broadcast(session_id, event, accepted.of(event)).await;
                }
            }
        }
        cursor.delivered = upto;
        Ok(())
    }

    /// Disconnects this node's sockets that follow `session_id`, counting them as slow
    /// consumers; returns how many.
    fn cut_off_followers(&self, session_id: &str) -> usize {
        let count = self.disconnect_followers(session_id);
        self.inner.metrics.slow_consumers.add(count as u64);
        count
    }

    /// The local room of a session; `None` once the namespace is closed (shutdown), when
    /// requests still finishing and background work must find nothing to deliver to.
    fn room(&self, session_id: &str) -> Option<socketioxide::operators::BroadcastOperators> {
        Some(self.inner.io.of("/")?.to(session_id.to_owned()))
    }

    fn disconnect_followers(&self, session_id: &str) -> usize {
        let sockets = self
            .room(session_id)
            .map(|r| r.sockets())
            .unwrap_or_default();
        // A socket already cut off (still leaving the room) is not counted again.
        let count = sockets
            .iter()
            .filter(|socket| socket.close_transport())
            .count();
        count + self.inner.followers.cut_session(session_id)
    }

    /// Whether no local socket follows the session (then nothing needs reading to deliver).
    fn room_is_empty(&self, session_id: &str) -> bool {
        self.room(session_id)
            .is_none_or(|room| room.sockets().is_empty())
            && !self.inner.followers.has(session_id)
    }

    /// Hands `event` to every local subscriber (followers, then the room) and times it:
    /// `accepted` is when this node's publish of it began, if it did.
    async fn broadcast(
        &self,
        session_id: &str,
        event: &Arc<LoggedEvent>,
        accepted: Option<Instant>,
    ) {
        let cut = self.inner.followers.broadcast(session_id, event);
        self.inner.metrics.slow_consumers.add(cut as u64);
        // The payload is raw JSON: socketioxide copies it into one packet shared by every
        // socket of the room, so an event is encoded once per broadcast, not per client.
        if let Some(room) = self.room(session_id) {
            self.emit(session_id, room, event).await;
        }
        let timings = &self.inner.metrics.timings;
        if let Some(accepted) = accepted {
            timings.publish_to_deliver.observe(accepted.elapsed());
        }
        if let Some(logged_ms) = event.timestamp_ms() {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            // A clock behind the logging node's (or a producer's timestamp ahead of it)
            // counts as no lag.
            let lag_ms = u64::try_from(now_ms.saturating_sub(logged_ms)).unwrap_or(0);
            timings.delivery_lag.observe(Duration::from_millis(lag_ms));
        }
    }

    async fn emit(
        &self,
        session_id: &str,
        room: socketioxide::operators::BroadcastOperators,
        event: &LoggedEvent,
    ) {
        match room.emit(event.kind.as_str(), &*event.json).await {
            Ok(()) => self.inner.metrics.broadcasts.inc(),
            Err(BroadcastError::Socket(errors)) => {
                // A socket whose queue was full has had its connection dropped (by the
                // broadcast itself, see vendor/socketioxide/HERALD-PATCH.md): it reconnects and
                // recovers by replay. Closed sockets were leaving anyway.
                let full = errors
                    .iter()
                    .filter(|e| matches!(e, SocketError::InternalChannelFull))
                    .count();
                if full > 0 {
                    self.inner.metrics.slow_consumers.add(full as u64);
                    tracing::warn!(
                        session_id,
                        seq = event.seq,
                        sockets = full,
                        "slow consumers: dropped their connections"
                    );
                }
                self.inner.metrics.broadcasts.inc();
            }
            Err(error) => {
                self.inner.metrics.broadcast_failures.inc();
                tracing::warn!(session_id, seq = event.seq, %error, "broadcast failed");
            }
        }
    }

    /// Joins `socket` to the session's room and replays what it missed, in order.
    ///
    /// The replay is read under the session's gate but sent outside it: under the gate a
    /// socket only gets what its queue takes at once (the common case: all of it), so no
    /// socket ever delays the session's producers or its other subscribers. A socket that
    /// needs more waits for room without the gate, then takes the gate again for what was
    /// logged meanwhile, and joins the room only once it has everything up to the head. A
    /// socket that cannot take its replay within [`REPLAY_DEADLINE`] is cut off.
    ///
    /// On error the socket does not follow the session (it is not in the room), whether
    /// it did before or not.
    pub async fn subscribe(
        &self,
        socket: &dyn Sink,
        session_id: &str,
        resume: Option<Resume>,
    ) -> Result<Subscribed, HubError> {
        let outcome = self.subscribe_and_replay(socket, session_id, resume).await;
        if outcome.is_err() {
            socket.unfollow(session_id);
        }
        outcome
    }

    async fn subscribe_and_replay(
        &self,
        socket: &dyn Sink,
        session_id: &str,
        resume: Option<Resume>,
    ) -> Result<Subscribed, HubError> {
        let deadline = tokio::time::Instant::now() + REPLAY_DEADLINE;
        let gate = self.gate(session_id);
        let (reply, mut replay) = {
            let mut cursor = gate.lock().await;
            // A socket already in the room would get live events in the middle of its replay.
            socket.unfollow(session_id);
            let after = resume.as_ref().map_or(0, |r| r.last_seq);
            // The head and the first events in one read, so that they agree (another node may
            // trim the log in between two reads). Without `lastSeq` there is nothing to replay.
            let limit = if resume.is_some() { REPLAY_BATCH } else { 0 };
            let slice = self.inner.log.read(session_id, after, limit).await?;
            let head = slice.head.clone();
            // The room must be at the head before this socket joins it at the head.
            self.deliver_to_head(session_id, &mut cursor, &head).await?;
            let recovered = resume.as_ref().map(|r| {
                head.can_resume(r.last_seq, r.epoch.as_ref())
                    && continues(&slice.events, r.last_seq, head.last_seq)
            });
            let reply = Subscribed {
                session_id: session_id.to_owned(),
                timestamp: now_timestamp(),
                last_seq: head.last_seq,
                epoch: head.epoch.clone(),
                recovered,
            };
            if socket.send_subscribed(&reply).is_err() {
                return Err(HubError::SocketGone);
            }
            if recovered != Some(true) {
                socket.follow(session_id);
                return Ok(reply);
            }
            let mut replay = Replay::new(socket, after, head.epoch);
            if self.join_if_caught_up(session_id, &mut replay, slice.events, head.last_seq)? {
                return Ok(reply);
            }
            (reply, replay)
        };
        loop {
            if let Err(error) = replay.send_all_by(deadline).await {
                if matches!(error, HubError::SlowConsumer) {
                    self.cut_off(socket, "could not take its replay in time");
                }
                return Err(error);
            }
            let mut cursor = gate.lock().await;
            let slice = self
                .inner
                .log
                .read(session_id, replay.sent, REPLAY_BATCH)
                .await?;
            let head = &slice.head;
            if head.epoch != replay.epoch || !continues(&slice.events, replay.sent, head.last_seq) {
                // What it still needs left the log while it was reading slowly.
                self.cut_off(socket, "fell behind the retained log during its replay");
                return Err(HubError::SlowConsumer);
            }
            self.deliver_to_head(session_id, &mut cursor, head).await?;
            let last_seq = head.last_seq;
            if self.join_if_caught_up(session_id, &mut replay, slice.events, last_seq)? {
                return Ok(reply);
            }
        }
    }

    /// Under the gate: sends the replay what its socket takes now of `events` (read after
    /// what it has) and, when that brings it to `last_seq`, the room's position, joins it to
    /// the room. True when it joined.
    fn join_if_caught_up(
        &self,
        session_id: &str,
        replay: &mut Replay<'_>,
        events: Vec<Arc<LoggedEvent>>,
        last_seq: u64,
    ) -> Result<bool, HubError> {
        replay.queue(events, last_seq);
        if !(replay.send_what_fits()? && replay.sent == last_seq) {
            return Ok(false);
        }
        replay.socket.follow(session_id);
        self.inner.metrics.replayed.add(replay.count);
        Ok(true)
    }

    /// Drops one socket's connection because it cannot keep up; it reconnects and resumes.
    fn cut_off(&self, socket: &dyn Sink, why: &str) {
        tracing::warn!(subscriber = %socket.label(), why, "slow consumer: dropping its connection");
        self.inner.metrics.slow_consumers.inc();
        socket.cut_off();
    }

    pub fn unsubscribe(&self, socket: &dyn Sink, session_id: &str) {
        socket.unfollow(session_id);
    }

    /// This node's session feed (SPEC §6).
    pub fn feed(&self) -> &Feed {
        &self.inner.feed
    }

    /// This node's SSE and plain WebSocket subscribers, for their transports to join.
    pub fn followers(&self) -> &Followers {
        &self.inner.followers
    }

    /// The session's snapshot, `None` when it is unknown.
    pub async fn snapshot(&self, session_id: &str) -> Result<Option<Snapshot>, HubError> {
        Ok(self.inner.store.get(session_id).await?)
    }

    /// Summaries of the sessions held, optionally only those with `status`.
    pub async fn sessions(
        &self,
        status: Option<SessionStatus>,
    ) -> Result<Vec<SessionSummary>, HubError> {
        Ok(self.inner.store.list(status).await?)
    }

    /// Attaches what a session's creator said (metadata, owner) to its snapshot.
    pub async fn set_origin(&self, session_id: &str, origin: &Origin) -> Result<(), HubError> {
        self.inner.store.set_origin(session_id, origin).await?;
        // The owner decides who may see the session in the feed.
        self.inner.feed.touch(session_id);
        Ok(())
    }

    /// See [`SessionStore::keeps_runs`].
    pub fn keeps_runs(&self) -> bool {
        self.inner.store.keeps_runs()
    }

    /// See [`SessionStore::save_run`].
    pub async fn save_run(&self, session_id: &str, checkpoint: &[u8]) -> Result<(), HubError> {
        Ok(self.inner.store.save_run(session_id, checkpoint).await?)
    }

    /// See [`SessionStore::load_run`].
    pub async fn load_run(&self, session_id: &str) -> Result<Option<Vec<u8>>, HubError> {
        Ok(self.inner.store.load_run(session_id).await?)
    }

    /// See [`SessionStore::drop_run`].
    pub async fn drop_run(&self, session_id: &str) -> Result<(), HubError> {
        Ok(self.inner.store.drop_run(session_id).await?)
    }

    /// See [`SessionStore::saved_runs`].
    pub async fn saved_runs(&self) -> Result<Vec<String>, HubError> {
        Ok(self.inner.store.saved_runs().await?)
    }

    /// Who owns a session (SPEC §5): the subject of the token that created it.
    pub async fn owner(&self, session_id: &str) -> Result<Option<String>, HubError> {
        Ok(self
            .inner
            .store
            .get(session_id)
            .await?
            .and_then(|snapshot| snapshot.summary.owner))
    }

    /// Whether the backend can serve requests now (for `/readyz`).
    pub async fn ready(&self) -> Result<(), HubError> {
        Ok(self.inner.log.ready().await?)
    }

    pub async fn head(&self, session_id: &str) -> Result<LogHead, HubError> {
        Ok(self.inner.log.head(session_id).await?)
    }

    pub async fn history(
        &self,
        session_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<LogSlice, HubError> {
        Ok(self.inner.log.read(session_id, after, limit).await?)
    }

    /// Drops sessions that ended more than `ttl` ago or changed last more than `idle` ago,
    /// and forgets idle gates.
    pub async fn sweep(&self, ttl: Duration, idle: Duration) -> Result<usize, HubError> {
        let mut expired = self.inner.store.take_expired(ttl).await?;
        expired.extend(self.inner.store.take_idle(idle).await?);
        for session_id in &expired {
            let gate = self.gate(session_id);
            let _order = gate.lock().await;
            self.inner.log.remove(session_id).await?;
        }
        // A gate only the map holds is in nobody's hands, and new users must come through
        // the map lock, so removing it cannot split a session's order in two. A gate whose
        // room still has local members is kept: its cursor is what they have received.
        let mut gates = self.inner.gates.lock().unwrap();
        gates.retain(|session_id, gate| {
            Arc::strong_count(gate) > 1 || !self.room_is_empty(session_id)
        });
        Ok(expired.len())
    }

    /// Drops the connections of this node's sockets that follow `session_id`, as a network
    /// failure would (development mode only: clients' reconnection is tested with it).
    /// Returns how many.
    pub async fn drop_followers(&self, session_id: &str) -> usize {
        self.disconnect_followers(session_id)
    }

    /// Drops every socket's connection (server shutdown), as a network failure would, so
    /// clients reconnect (to another node, or to this one once it is back) and resume.
    pub async fn close(&self) {
        for socket in self
            .inner
            .io
            .of("/")
            .map(|ns| ns.sockets())
            .unwrap_or_default()
        {
            socket.close_transport();
        }
        self.inner.followers.cut_all();
        self.inner.io.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::MemoryLog;
    use crate::store::MemoryStore;

    /// During shutdown, requests still finishing and background work run after the
    /// namespace is closed: they must find no room, not panic (socketioxide's `io.to`
    /// panics once the default namespace is gone).
    #[tokio::test]
    async fn a_closed_hub_still_logs_and_delivers_to_nobody() {
        let (_layer, io) = SocketIo::builder().build_layer();
        io.ns("/", async |_: socketioxide::extract::SocketRef| {});
        let hub = Hub::new(
            Arc::new(MemoryLog::new(10)),
            Arc::new(MemoryStore::new()),
            io,
            Arc::new(Metrics::default()),
        );
        hub.close().await;
        hub.close().await;
        let draft = EventDraft {
            kind: crate::event::EventKind::Progress,
            data: serde_json::json!({ "status": "PROCESSING", "progress": 5 })
                .as_object()
                .unwrap()
                .clone(),
            idempotency_key: None,
        };
        let published = hub.publish("s-1", vec![draft]).await.unwrap();
        assert_eq!(published.last_seq, 1);
        assert_eq!(hub.drop_followers("s-1").await, 0);
    }
}
