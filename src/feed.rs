//! The session feed (SPEC §6): "all my jobs". A watcher first gets `sessions` (the sessions
//! its principal may read, newest first, at most [`LIST_LIMIT`]), then a `session` event
//! whenever one of those is created or changes.
//!
//! Changes are coalesced: the hub [`touch`](Feed::touch)es a session after each fold (its own
//! appends and, in cluster mode, every other node's announced ones), and one flusher task
//! per node sends each touched session's summary at most once per [`COALESCE`], read from
//! the store after the change, so what a watcher sees last is the session's latest state.
//! Nothing is recorded while no one watches.
//!
//! The list and the flushes take turns on one lock, so a watcher's `sessions` always comes
//! before the first `session` it is sent, and no change applied after the list was read is
//! missed. Sends never block: a watcher whose queue is full is cut off like any slow
//! subscriber, and recovers by watching again (a fresh list).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::Notify;

use crate::auth::Principal;
use crate::delivery::{SendError, Sink, sse_frame, ws_event_text};
use crate::event::SessionStatus;
use crate::hub::HubError;
use crate::log::Epoch;
use crate::store::{PromptCounts, SessionStore, SessionSummary};

/// How long changes to one session are gathered into one `session` event: at most a few
/// per second per session, as SPEC §6 asks.
pub const COALESCE: Duration = Duration::from_millis(250);

/// Most sessions a `sessions` list carries (the newest ones).
pub const LIST_LIMIT: usize = 1_000;

/// The feed's two messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedKind {
    /// The first message: `{ sessions: [entry], truncated }`.
    Sessions,
    /// A change: one entry.
    Session,
}

impl FeedKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FeedKind::Sessions => "sessions",
            FeedKind::Session => "session",
        }
    }
}

/// One feed message with its transport encodings, each made at most once however many
/// watchers it is sent to.
#[derive(Debug)]
pub struct FeedFrame {
    pub kind: FeedKind,
    /// The payload, a JSON object.
    pub json: Box<serde_json::value::RawValue>,
    sse: OnceLock<Bytes>,
    ws: OnceLock<Utf8Bytes>,
}

impl FeedFrame {
    fn new(kind: FeedKind, payload: &impl Serialize) -> Self {
        let json = serde_json::value::to_raw_value(payload)
            .expect("feed payloads are plain data and always serialize");
        Self {
            kind,
            json,
            sse: OnceLock::new(),
            ws: OnceLock::new(),
        }
    }

    /// `event: <kind>`, `data: <payload>`; no `id`, since a feed resumes with a fresh list.
    pub fn sse(&self) -> Bytes {
        self.sse
            .get_or_init(|| sse_frame(None, self.kind.as_str(), self.json.get()))
            .clone()
    }

    /// `{ "type": "<kind>", ...payload }`.
    pub fn ws(&self) -> Utf8Bytes {
        self.ws
            .get_or_init(|| ws_event_text(self.kind.as_str(), self.json.get()).into())
            .clone()
    }
}

/// What the feed says about one session (SPEC §6 `session`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Entry<'a> {
    session_id: &'a str,
    status: SessionStatus,
    progress: f64,
    prompts: &'a PromptCounts,
    has_clarifications: bool,
    clarification_count: usize,
    created_at: &'a str,
    updated_at: &'a str,
}

impl<'a> From<&'a SessionSummary> for Entry<'a> {
    fn from(s: &'a SessionSummary) -> Self {
        Self {
            session_id: &s.session_id,
            status: s.status,
            progress: s.progress,
            prompts: &s.prompts,
            has_clarifications: s.has_clarifications,
            clarification_count: s.clarification_count,
            created_at: &s.created_at,
            updated_at: &s.updated_at,
        }
    }
}

#[derive(Serialize)]
struct List<'a> {
    sessions: Vec<Entry<'a>>,
    /// Whether older sessions the watcher may read were left out ([`LIST_LIMIT`]).
    truncated: bool,
}

/// Where another node's announcement says a session's log ends.
struct Wanted {
    epoch: Epoch,
    seq: u64,
    /// Flushes that found the snapshot behind it.
    retries: u8,
}

impl Wanted {
    fn is_behind(&self, summary: &SessionSummary) -> bool {
        summary.epoch == self.epoch && summary.last_seq < self.seq
    }
}

/// Flushes a session is held back for while its snapshot is behind an announcement (the
/// announcing node folds right after it appends; a node that died in between never will).
const MAX_RETRIES: u8 = 8;

struct Watcher {
    sink: Arc<dyn Sink>,
    principal: Principal,
}

/// This node's feed watchers and the sessions changed since the last flush.
#[derive(Clone)]
pub struct Feed(Arc<Inner>);

struct Inner {
    store: Arc<dyn SessionStore>,
    next_id: AtomicU64,
    /// Mirrors `watchers.len()`, so that [`Feed::touch`] costs one load while no one watches.
    watching: AtomicUsize,
    /// A std mutex: map updates and non-blocking sends only, never an `.await`.
    watchers: Mutex<HashMap<u64, Watcher>>,
    /// Sessions changed since the last flush, with what the snapshot must show.
    touched: Mutex<HashMap<String, Option<Wanted>>>,
    wake: Notify,
    flusher: AtomicBool,
    /// Taken by a watcher's list and by each flush: the ordered work of the feed.
    turn: tokio::sync::Mutex<()>,
}

/// A watcher's place in the feed; [`Feed::unwatch`] with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchId(u64);

impl Feed {
    pub fn new(store: Arc<dyn SessionStore>) -> Self {
        Self(Arc::new(Inner {
            store,
            next_id: AtomicU64::new(0),
            watching: AtomicUsize::new(0),
            watchers: Mutex::default(),
            touched: Mutex::default(),
            wake: Notify::new(),
            flusher: AtomicBool::new(false),
            turn: tokio::sync::Mutex::new(()),
        }))
    }

    /// How many watchers this node has.
    pub fn watchers(&self) -> usize {
        self.0.watching.load(Ordering::Relaxed)
    }

    /// The session changed (its snapshot is already updated).
    pub fn touch(&self, session_id: &str) {
        self.touch_with(session_id, None);
    }

    /// Another node logged the session's events up to `seq` (cluster mode). It announces
    /// before it folds them, so the flush waits until the snapshot has them.
    pub fn touch_upto(&self, session_id: &str, epoch: &Epoch, seq: u64) {
        self.touch_with(
            session_id,
            Some(Wanted {
                epoch: epoch.clone(),
                seq,
                retries: 0,
            }),
        );
    }

    fn touch_with(&self, session_id: &str, wanted: Option<Wanted>) {
        if self.watchers() == 0 {
            return;
        }
        let mut touched = self.0.touched.lock().unwrap();
        if touched.is_empty() {
            self.0.wake.notify_one();
        }
        match touched.get_mut(session_id) {
            None => {
                touched.insert(session_id.to_owned(), wanted);
            }
            Some(known) => {
                if wanted.as_ref().map(|w| w.seq) > known.as_ref().map(|k| k.seq) {
                    *known = wanted;
                }
            }
        }
    }

    /// Adds a watcher and sends it its `sessions` list; returns how many sessions that held.
    pub async fn watch(
        &self,
        sink: Arc<dyn Sink>,
        principal: Principal,
    ) -> Result<(WatchId, usize), HubError> {
        self.start_flusher();
        let _turn = self.0.turn.lock().await;
        let id = WatchId(self.0.next_id.fetch_add(1, Ordering::Relaxed));
        self.add(id, sink.clone(), principal.clone());
        let mut sessions = match self.0.store.list(None).await {
            Ok(sessions) => sessions,
            Err(error) => {
                self.unwatch(id);
                return Err(error.into());
            }
        };
        sessions.retain(|s| principal.may_read(&s.session_id, s.owner.as_deref()));
        // Newest first: timestamps are RFC 3339 in UTC, so they sort as strings.
        sessions.sort_unstable_by(|a, b| b.created_at.cmp(&a.created_at));
        let truncated = sessions.len() > LIST_LIMIT;
        sessions.truncate(LIST_LIMIT);
        let list = List {
            sessions: sessions.iter().map(Entry::from).collect(),
            truncated,
        };
        let frame = Arc::new(FeedFrame::new(FeedKind::Sessions, &list));
        if let Err(error) = sink.send_feed(&frame) {
            self.unwatch(id);
            return Err(match error {
                SendError::Gone => HubError::SocketGone,
                SendError::Full => {
                    sink.cut_off();
                    HubError::SlowConsumer
                }
            });
        }
        Ok((id, sessions.len()))
    }

    fn add(&self, id: WatchId, sink: Arc<dyn Sink>, principal: Principal) {
        let mut watchers = self.0.watchers.lock().unwrap();
        watchers.insert(id.0, Watcher { sink, principal });
        self.0.watching.store(watchers.len(), Ordering::Relaxed);
    }

    pub fn unwatch(&self, id: WatchId) {
        let removed = {
            let mut watchers = self.0.watchers.lock().unwrap();
            let removed = watchers.remove(&id.0);
            self.0.watching.store(watchers.len(), Ordering::Relaxed);
            removed
        };
        // Dropped outside the lock: a socket's last handle may drop its subscriber, whose
        // own drop unwatches.
        drop(removed);
    }

    fn start_flusher(&self) {
        if self.0.flusher.swap(true, Ordering::AcqRel) {
            return;
        }
        let feed = self.clone();
        tokio::spawn(async move {
            loop {
                feed.0.wake.notified().await;
                tokio::time::sleep(COALESCE).await;
                feed.flush().await;
            }
        });
    }

    /// Sends every touched session's summary to the watchers that may read it.
    async fn flush(&self) {
        let _turn = self.0.turn.lock().await;
        let touched: Vec<(String, Option<Wanted>)> =
            self.0.touched.lock().unwrap().drain().collect();
        for (session_id, wanted) in touched {
            if self.watchers() == 0 {
                return;
            }
            match self.0.store.get(&session_id).await {
                Ok(Some(snapshot)) => match wanted {
                    Some(wanted) if wanted.is_behind(&snapshot.summary) => {
                        self.retry(session_id, wanted);
                    }
                    _ => self.send(&snapshot.summary),
                },
                // Swept meanwhile: it simply stops appearing.
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(session_id, %error, "session feed: could not read a summary");
                }
            }
        }
    }

    fn retry(&self, session_id: String, mut wanted: Wanted) {
        wanted.retries += 1;
        if wanted.retries > MAX_RETRIES {
            return;
        }
        let mut touched = self.0.touched.lock().unwrap();
        if touched.is_empty() {
            self.0.wake.notify_one();
        }
        touched.entry(session_id).or_insert(Some(wanted));
    }

    fn send(&self, summary: &SessionSummary) {
        let frame = Arc::new(FeedFrame::new(FeedKind::Session, &Entry::from(summary)));
        let mut slow = Vec::new();
        let mut gone = Vec::new();
        let removed: Vec<Watcher> = {
            let mut watchers = self.0.watchers.lock().unwrap();
            for (id, watcher) in watchers.iter() {
                if !watcher
                    .principal
                    .may_read(&summary.session_id, summary.owner.as_deref())
                {
                    continue;
                }
                match watcher.sink.send_feed(&frame) {
                    Ok(()) => {}
                    Err(SendError::Gone) => gone.push(*id),
                    Err(SendError::Full) => {
                        slow.push(watcher.sink.clone());
                        gone.push(*id);
                    }
                }
            }
            let removed = gone.iter().filter_map(|id| watchers.remove(id)).collect();
            self.0.watching.store(watchers.len(), Ordering::Relaxed);
            removed
        };
        // Dropped outside the lock (see `unwatch`).
        drop(removed);
        for sink in slow {
            tracing::warn!(watcher = %sink.label(), "slow session-feed watcher: dropping its connection");
            sink.cut_off();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;
    use crate::hub::Subscribed;
    use crate::log::{Appended, LoggedEvent};
    use crate::store::MemoryStore;
    use std::sync::atomic::AtomicBool;

    /// A connection that takes the list and then, when `full`, nothing more.
    #[derive(Default)]
    struct Probe {
        got: Mutex<Vec<(FeedKind, serde_json::Value)>>,
        full: AtomicBool,
        cut: AtomicBool,
    }

    impl Sink for Arc<Probe> {
        fn label(&self) -> String {
            "probe".into()
        }
        fn send_subscribed(&self, _: &Subscribed) -> Result<(), SendError> {
            Ok(())
        }
        fn send(&self, _: &Arc<LoggedEvent>) -> Result<(), SendError> {
            Ok(())
        }
        fn send_feed(&self, frame: &Arc<FeedFrame>) -> Result<(), SendError> {
            if self.full.load(Ordering::Relaxed) {
                return Err(SendError::Full);
            }
            let payload = serde_json::from_str(frame.json.get()).unwrap();
            self.got.lock().unwrap().push((frame.kind, payload));
            Ok(())
        }
        fn to_shared(&self) -> Arc<dyn Sink> {
            Arc::new(self.clone())
        }
        fn follow(&self, _: &str) {}
        fn unfollow(&self, _: &str) {}
        fn cut_off(&self) {
            self.cut.store(true, Ordering::Relaxed);
        }
    }

    async fn fold(store: &MemoryStore, session_id: &str, epoch: &Epoch, seq: u64) {
        let json = format!(
            r#"{{"sessionId":"{session_id}","seq":{seq},"status":"PROCESSING","progress":{seq},"timestamp":"2026-12-06T00:00:00.000Z"}}"#
        );
        let event = Arc::new(LoggedEvent {
            seq,
            kind: EventKind::Progress,
            json: serde_json::value::RawValue::from_string(json).unwrap(),
        });
        let appended = Appended::from_logged(event).unwrap();
        store.apply(session_id, epoch, &[appended]).await.unwrap();
    }

    #[tokio::test]
    async fn a_full_watcher_is_cut_off_and_forgotten() {
        let store = Arc::new(MemoryStore::new());
        let epoch = Epoch::fresh();
        fold(&store, "s", &epoch, 1).await;
        let feed = Feed::new(store.clone());
        let probe = Arc::new(Probe::default());
        let (_, listed) = feed
            .watch(probe.to_shared(), Principal::anonymous())
            .await
            .unwrap();
        assert_eq!(listed, 1);
        probe.full.store(true, Ordering::Relaxed);
        fold(&store, "s", &epoch, 2).await;
        feed.touch("s");
        feed.flush().await;
        assert!(
            probe.cut.load(Ordering::Relaxed),
            "a full watcher is cut off"
        );
        assert_eq!(feed.watchers(), 0);
    }

    /// Another node announces before it folds: the feed holds the session back until the
    /// snapshot shows the announced `seq`, so the last state sent is never a stale one.
    #[tokio::test]
    async fn an_announced_change_waits_for_its_fold() {
        let store = Arc::new(MemoryStore::new());
        let epoch = Epoch::fresh();
        fold(&store, "s", &epoch, 1).await;
        let feed = Feed::new(store.clone());
        let probe = Arc::new(Probe::default());
        feed.watch(probe.to_shared(), Principal::anonymous())
            .await
            .unwrap();
        feed.touch_upto("s", &epoch, 2);
        feed.flush().await;
        assert_eq!(probe.got.lock().unwrap().len(), 1, "only the list so far");
        fold(&store, "s", &epoch, 2).await;
        feed.flush().await;
        let got = probe.got.lock().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].0, FeedKind::Session);
        assert_eq!(got[1].1["progress"], 2.0);
    }
}
