//! In-memory event log: one process, no persistence.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;

use super::{
    AppendOutcome, Epoch, EventLog, LogError, LogHead, LogLimits, LogSlice, LoggedEvent, Numbered,
    Writer, number,
};
use crate::event::EventDraft;

/// Idempotency keys remembered per session; the oldest are forgotten first.
const MAX_KEYS_PER_SESSION: usize = 10_000;

/// Sessions are found under a read lock and then locked one by one, so appends to
/// different sessions never wait for each other. Both locks are std locks: they guard
/// plain data and are never held across an `.await`.
pub struct MemoryLog {
    sessions: RwLock<HashMap<String, Arc<Mutex<SessionLog>>>>,
    limits: LogLimits,
}

struct SessionLog {
    epoch: Epoch,
    last_seq: u64,
    events: VecDeque<Arc<LoggedEvent>>,
    /// Serialized bytes of `events`.
    bytes: u64,
    /// A terminal event was logged (see [`Writer`]).
    ended: bool,
    keys: HashMap<String, u64>,
    key_order: VecDeque<String>,
}

impl SessionLog {
    fn new() -> Self {
        Self {
            epoch: Epoch::fresh(),
            last_seq: 0,
            events: VecDeque::new(),
            bytes: 0,
            ended: false,
            keys: HashMap::new(),
            key_order: VecDeque::new(),
        }
    }

    fn head(&self) -> LogHead {
        LogHead {
            last_seq: self.last_seq,
            first_seq: self.first_seq(),
            epoch: Some(self.epoch.clone()),
        }
    }

    fn first_seq(&self) -> u64 {
        self.events.front().map_or(self.last_seq + 1, |e| e.seq)
    }

    fn remember_key(&mut self, key: String, seq: u64) {
        if self.key_order.len() == MAX_KEYS_PER_SESSION
            && let Some(old) = self.key_order.pop_front()
        {
            self.keys.remove(&old);
        }
        self.key_order.push_back(key.clone());
        self.keys.insert(key, seq);
    }

    /// Whether a batch holds an event not logged yet.
    fn has_new(&self, drafts: &[EventDraft]) -> bool {
        drafts.iter().any(|d| {
            d.idempotency_key
                .as_ref()
                .is_none_or(|key| !self.keys.contains_key(key))
        })
    }

    /// Drops the oldest events beyond the limits; the newest always stays.
    fn trim(&mut self, limits: &LogLimits) {
        while self.events.len() > 1
            && (self.events.len() as u64 > limits.max_events || self.bytes > limits.max_bytes)
        {
            if let Some(old) = self.events.pop_front() {
                self.bytes -= old.json.get().len() as u64;
            }
        }
    }
}

impl MemoryLog {
    /// A log retaining `max_events` per session, with no other limit.
    pub fn new(max_events: u64) -> Self {
        Self::with_limits(LogLimits::events(max_events))
    }

    pub fn with_limits(limits: LogLimits) -> Self {
        Self {
            sessions: RwLock::default(),
            limits,
        }
    }

    fn existing(&self, session_id: &str) -> Option<Arc<Mutex<SessionLog>>> {
        self.sessions.read().unwrap().get(session_id).cloned()
    }

    fn get_or_create(&self, session_id: &str) -> Result<Arc<Mutex<SessionLog>>, LogError> {
        if let Some(log) = self.existing(session_id) {
            return Ok(log);
        }
        let mut sessions = self.sessions.write().unwrap();
        if let Some(log) = sessions.get(session_id) {
            return Ok(log.clone());
        }
        if sessions.len() as u64 >= self.limits.max_sessions {
            return Err(LogError::TooManySessions {
                max: self.limits.max_sessions,
            });
        }
        let log = Arc::new(Mutex::new(SessionLog::new()));
        sessions.insert(session_id.to_owned(), log.clone());
        Ok(log)
    }
}

#[async_trait]
impl EventLog for MemoryLog {
    async fn append_as(
        &self,
        session_id: &str,
        drafts: Vec<EventDraft>,
        writer: Writer,
    ) -> Result<AppendOutcome, LogError> {
        let log = self.get_or_create(session_id)?;
        let mut log = log.lock().unwrap();
        if writer == Writer::Producer && log.ended && log.has_new(&drafts) {
            return Err(LogError::SessionEnded(session_id.to_owned()));
        }
        let reopen = writer == Writer::Reopening;
        // Number the whole batch first and commit it at the end, so that a failure leaves
        // the log untouched (all-or-nothing).
        let Numbered {
            appended,
            seqs,
            new_keys,
            last_seq: next,
            ends,
        } = number(session_id, drafts, log.last_seq, |key| {
            Ok::<_, LogError>(log.keys.get(key).copied())
        })?;
        for (key, seq) in new_keys {
            log.remember_key(key, seq);
        }
        log.last_seq = next;
        log.ended = ends || (log.ended && !reopen);
        log.bytes += appended
            .iter()
            .map(|a| a.event.json.get().len() as u64)
            .sum::<u64>();
        log.events.extend(appended.iter().map(|a| a.event.clone()));
        log.trim(&self.limits);
        let duplicates = seqs.len() - appended.len();
        Ok(AppendOutcome {
            appended,
            seqs,
            duplicates,
            epoch: log.epoch.clone(),
            last_seq: log.last_seq,
            first_seq: log.first_seq(),
        })
    }

    async fn head(&self, session_id: &str) -> Result<LogHead, LogError> {
        Ok(match self.existing(session_id) {
            Some(log) => log.lock().unwrap().head(),
            None => LogHead::unwritten(),
        })
    }

    async fn read(&self, session_id: &str, after: u64, limit: usize) -> Result<LogSlice, LogError> {
        let Some(log) = self.existing(session_id) else {
            return Ok(LogSlice {
                head: LogHead::unwritten(),
                events: Vec::new(),
            });
        };
        let log = log.lock().unwrap();
        let head = log.head();
        // Events are contiguous, so the first one after `after` is found by arithmetic.
        let skip = usize::try_from(after.saturating_add(1).saturating_sub(head.first_seq))
            .unwrap_or(usize::MAX);
        let events = log.events.iter().skip(skip).take(limit).cloned().collect();
        Ok(LogSlice { head, events })
    }

    async fn remove(&self, session_id: &str) -> Result<(), LogError> {
        self.sessions.write().unwrap().remove(session_id);
        Ok(())
    }
}
