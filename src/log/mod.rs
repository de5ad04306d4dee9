//! The per-session event log behind [`EventLog`]: the only place that assigns `seq`
//! ([`MemoryLog`] here; [`crate::redis::RedisLog`] in Redis).
//!
//! Each session's log numbers its events 1, 2, 3, … with no gaps, keeps the newest
//! `max_events` of them for replay and history, remembers accepted idempotency keys, and
//! carries an `epoch` that changes whenever the log is recreated (so a client holding a
//! `lastSeq` from an older incarnation can tell). Events are serialized exactly once, here,
//! and the same bytes go to the history route, the replay and the live broadcast.

mod epoch;
mod memory;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

pub use epoch::Epoch;
pub use memory::MemoryLog;

use crate::event::{EventDraft, EventKind};

/// An event as logged: its kind, `seq` and the serialized payload sent to clients.
#[derive(Debug)]
pub struct LoggedEvent {
    pub seq: u64,
    pub kind: EventKind,
    pub json: Box<RawValue>,
}

impl LoggedEvent {
    /// The event's `timestamp`, in milliseconds since the Unix epoch: when the log backend
    /// finalized it on the node that logged it, unless its producer gave one. `None` when
    /// it is not an RFC 3339 time. Read from the logged bytes without allocating: every
    /// backend serializes the finalized data, whose last field is `timestamp`
    /// ([`crate::event::finalize_body`]).
    pub fn timestamp_ms(&self) -> Option<i64> {
        const KEY: &str = ",\"timestamp\":\"";
        let json = self.json.get().strip_suffix("\"}")?;
        let value = &json[json.rfind(KEY)? + KEY.len()..];
        if value.contains(['"', '\\']) {
            return None; // not one string, or one with escapes: not a time herald wrote
        }
        let time = chrono::DateTime::parse_from_rfc3339(value).ok()?;
        Some(time.timestamp_millis())
    }
}

/// An event appended by one call, with its finished data for folding into the snapshot.
#[derive(Debug)]
pub struct Appended {
    pub event: Arc<LoggedEvent>,
    pub data: Map<String, Value>,
}

impl Appended {
    /// An event read back from the log, with its data parsed from the logged bytes.
    pub fn from_logged(event: Arc<LoggedEvent>) -> Result<Self, serde_json::Error> {
        let data = serde_json::from_str(event.json.get())?;
        Ok(Self { event, data })
    }
}

/// What one append did. The log exists after an append (even of nothing), so it has an
/// epoch.
#[derive(Debug)]
pub struct AppendOutcome {
    /// The newly logged events, in `seq` order.
    pub appended: Vec<Appended>,
    /// Per draft, the `seq` it has: new, or the one it got when first accepted (`None` when a
    /// duplicate's original is no longer known).
    pub seqs: Vec<Option<u64>>,
    /// Drafts skipped because their idempotency key was already accepted.
    pub duplicates: usize,
    /// The log's incarnation.
    pub epoch: Epoch,
    /// `seq` of the newest event, 0 when there is none.
    pub last_seq: u64,
    /// `seq` of the oldest retained event (`last_seq + 1` when nothing is retained).
    pub first_seq: u64,
}

impl AppendOutcome {
    /// Where the log stands after the append.
    pub fn head(&self) -> LogHead {
        LogHead {
            last_seq: self.last_seq,
            first_seq: self.first_seq,
            epoch: Some(self.epoch.clone()),
        }
    }
}

/// Where a session's log stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogHead {
    /// `seq` of the newest event, 0 when there is none.
    pub last_seq: u64,
    /// `seq` of the oldest retained event (`last_seq + 1` when nothing is retained).
    pub first_seq: u64,
    /// This incarnation of the log; `None` while the session has no log.
    pub epoch: Option<Epoch>,
}

impl LogHead {
    /// The head of a session that has no log (never written, or removed).
    pub fn unwritten() -> Self {
        Self {
            last_seq: 0,
            first_seq: 1,
            epoch: None,
        }
    }

    /// Whether a client that saw everything up to `last_seq` in `epoch` (`None`: it does
    /// not know) can be brought up to date from what is retained, without a gap.
    pub fn can_resume(&self, last_seq: u64, epoch: Option<&Epoch>) -> bool {
        if last_seq == 0 {
            // The client saw nothing, so any incarnation is fine as long as seq 1 is retained.
            return self.first_seq <= 1;
        }
        let same_epoch = epoch.is_none_or(|e| self.epoch.as_ref() == Some(e));
        same_epoch && last_seq <= self.last_seq && last_seq + 1 >= self.first_seq
    }
}

/// A page of the log.
#[derive(Debug)]
pub struct LogSlice {
    pub head: LogHead,
    pub events: Vec<Arc<LoggedEvent>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("event could not be serialized: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("event log backend failed: {0}")]
    Backend(String),
    /// A new session over [`LogLimits::max_sessions`]: nothing was logged.
    #[error("herald holds as many sessions as it may ({max}); retry once some have expired")]
    TooManySessions { max: u64 },
    /// A producer's new event for a session that has ended: nothing was logged.
    #[error(
        "session `{0}` has ended; its log takes no more producer events (post with ?reopen=true to reopen it)"
    )]
    SessionEnded(String),
}

/// How much the logs may hold (SPEC §5, "Bounded everything").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// Events retained per session; the oldest go first.
    pub max_events: u64,
    /// Bytes of serialized events retained per session; the oldest go first, the newest
    /// event always stays.
    pub max_bytes: u64,
    /// Sessions with a log at once; a new one over it is refused.
    pub max_sessions: u64,
    /// How long a session's log lives after its last append when nothing sweeps it
    /// (Redis keys expire after it; the sweeper removes idle sessions earlier).
    pub idle_ttl: std::time::Duration,
}

impl LogLimits {
    /// Retain `max_events` per session; the other limits at their widest.
    pub fn events(max_events: u64) -> Self {
        Self {
            max_events: max_events.max(1),
            max_bytes: u64::MAX,
            max_sessions: u64::MAX,
            idle_ttl: std::time::Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// A batch numbered by [`number`]: what a backend then commits.
#[derive(Debug)]
pub(crate) struct Numbered {
    pub appended: Vec<Appended>,
    pub seqs: Vec<Option<u64>>,
    /// Keys first seen in this batch, each with its event's `seq`.
    pub new_keys: HashMap<String, u64>,
    /// `seq` of the batch's last new event (`last_seq` when none is new).
    pub last_seq: u64,
    /// The batch holds a terminal event.
    pub ends: bool,
}

/// Numbers a batch after `last_seq`: a draft whose idempotency key `known` (or an earlier
/// draft of the batch) already has keeps that `seq` and is skipped; the others get the
/// next numbers and are serialized, once. The memory and data-dir logs share it (Redis
/// numbers in its Lua script).
pub(crate) fn number<E>(
    session_id: &str,
    drafts: Vec<EventDraft>,
    last_seq: u64,
    mut known: impl FnMut(&str) -> Result<Option<u64>, E>,
) -> Result<Numbered, E>
where
    E: From<serde_json::Error>,
{
    let mut numbered = Numbered {
        appended: Vec::with_capacity(drafts.len()),
        seqs: Vec::with_capacity(drafts.len()),
        new_keys: HashMap::new(),
        last_seq,
        ends: false,
    };
    for draft in drafts {
        if let Some(key) = &draft.idempotency_key {
            let seen = match numbered.new_keys.get(key) {
                Some(seq) => Some(*seq),
                None => known(key)?,
            };
            if let Some(seq) = seen {
                numbered.seqs.push(Some(seq));
                continue;
            }
        }
        numbered.last_seq += 1;
        let seq = numbered.last_seq;
        numbered.ends |= draft.ends_session();
        let data = crate::event::finalize(session_id, seq, draft.data);
        let json = serde_json::value::to_raw_value(&data)?;
        if let Some(key) = draft.idempotency_key {
            numbered.new_keys.insert(key, seq);
        }
        numbered.seqs.push(Some(seq));
        numbered.appended.push(Appended {
            event: Arc::new(LoggedEvent {
                seq,
                kind: draft.kind,
                json,
            }),
            data,
        });
    }
    Ok(numbered)
}

/// Who appends, which decides whether an ended session takes the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// herald itself (its orchestrator): always logged.
    Herald,
    /// A producer: refused with [`LogError::SessionEnded`] once the session ended, unless
    /// at least one event is new and …
    Producer,
    /// … the producer asked to reopen the session.
    Reopening,
}

/// Storage of per-session event logs. Implementations must make `append` atomic per
/// session: either every draft is logged, in order and with consecutive `seq`s, or none.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends as herald itself ([`Writer::Herald`]).
    async fn append(
        &self,
        session_id: &str,
        drafts: Vec<EventDraft>,
    ) -> Result<AppendOutcome, LogError> {
        self.append_as(session_id, drafts, Writer::Herald).await
    }
    /// Appends as `writer`. A session whose log took a terminal event has *ended*; a
    /// [`Writer::Producer`] batch that holds a new event for it is refused whole, a batch of
    /// duplicates only is answered as usual (a retry of the batch that ended it).
    /// [`Writer::Reopening`] clears the mark first.
    async fn append_as(
        &self,
        session_id: &str,
        drafts: Vec<EventDraft>,
        writer: Writer,
    ) -> Result<AppendOutcome, LogError>;
    async fn head(&self, session_id: &str) -> Result<LogHead, LogError>;
    /// Retained events with `seq > after`, at most `limit` of them.
    async fn read(&self, session_id: &str, after: u64, limit: usize) -> Result<LogSlice, LogError>;
    async fn remove(&self, session_id: &str) -> Result<(), LogError>;
    /// Whether the backend can serve requests now (for `/readyz`).
    async fn ready(&self) -> Result<(), LogError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Epoch, LogHead, LoggedEvent};

    fn logged(json: &str) -> LoggedEvent {
        LoggedEvent {
            seq: 1,
            kind: crate::event::EventKind::Progress,
            json: serde_json::value::RawValue::from_string(json.to_owned()).unwrap(),
        }
    }

    #[test]
    fn the_timestamp_is_read_from_the_last_field() {
        let at = |json: &str| logged(json).timestamp_ms();
        assert_eq!(
            at(
                r#"{"sessionId":"s","seq":1,"status":"PROCESSING","timestamp":"1970-01-01T00:00:01.250Z"}"#
            ),
            Some(1_250)
        );
        // A nested `timestamp` is not the event's.
        assert_eq!(
            at(
                r#"{"sessionId":"s","seq":1,"a":{"timestamp":"1970-01-01T00:00:01Z"},"timestamp":"1970-01-01T00:00:02+01:00"}"#
            ),
            Some(2_000 - 3_600_000)
        );
        assert_eq!(
            at(r#"{"sessionId":"s","seq":1,"a":{"timestamp":"1970-01-01T00:00:01Z"}}"#),
            None
        );
        assert_eq!(
            at(r#"{"sessionId":"s","seq":1,"timestamp":"yesterday"}"#),
            None
        );
        assert_eq!(at(r#"{"sessionId":"s","seq":1,"timestamp":"a\"b"}"#), None);
        // What the log writes parses back to the moment it was written.
        let draft = crate::event::finalize("s", 1, serde_json::Map::new());
        let before = chrono::Utc::now().timestamp_millis();
        let json = serde_json::to_string(&draft).unwrap();
        let ms = at(&json).unwrap();
        assert!((before - 1_000..=before + 1_000).contains(&ms), "{json}");
    }

    fn epoch(name: &str) -> Epoch {
        Epoch::parse(name).unwrap()
    }

    fn head(first: u64, last: u64) -> LogHead {
        LogHead {
            last_seq: last,
            first_seq: first,
            epoch: Some(epoch("e1")),
        }
    }

    #[test]
    fn resume_needs_the_next_event_retained_and_the_same_epoch() {
        assert!(head(1, 10).can_resume(0, None));
        assert!(head(1, 10).can_resume(4, Some(&epoch("e1"))));
        assert!(head(5, 10).can_resume(4, None));
        assert!(!head(6, 10).can_resume(4, None));
        assert!(!head(6, 10).can_resume(0, None));
        assert!(!head(1, 10).can_resume(4, Some(&epoch("e0"))));
        assert!(!head(1, 10).can_resume(11, None));
        assert!(head(11, 10).can_resume(10, None));
        // an empty, never-written log
        assert!(LogHead::unwritten().can_resume(0, Some(&epoch("old"))));
        assert!(!LogHead::unwritten().can_resume(1, Some(&epoch("old"))));
    }
}
