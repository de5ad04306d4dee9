//! In-memory event log: one process, no persistence.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use serde_json::value::to_raw_value;

use super::{AppendOutcome, Appended, Epoch, EventLog, LogError, LogHead, LogSlice, LoggedEvent};
use crate::event::{EventDraft, finalize};

/// Idempotency keys remembered per session; the oldest are forgotten first.
const MAX_KEYS_PER_SESSION: usize = 10_000;

/// Sessions are found under a read lock and then locked one by one, so appends to
/// different sessions never wait for each other. Both locks are std locks: they guard
/// plain data and are never held across an `.await`.
pub struct MemoryLog {
    sessions: RwLock<HashMap<String, Arc<Mutex<SessionLog>>>>,
    max_events: usize,
}

struct SessionLog {
    epoch: Epoch,
    last_seq: u64,
    events: VecDeque<Arc<LoggedEvent>>,
    keys: HashMap<String, u64>,
    key_order: VecDeque<String>,
}

impl SessionLog {
    fn new() -> Self {
        Self {
            epoch: Epoch::fresh(),
            last_seq: 0,
            events: VecDeque::new(),
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
}

impl MemoryLog {
    pub fn new(max_events: u64) -> Self {
        Self {
            sessions: RwLock::default(),
            max_events: usize::try_from(max_events).unwrap_or(usize::MAX).max(1),
        }
    }

    fn existing(&self, session_id: &str) -> Option<Arc<Mutex<SessionLog>>> {
        self.sessions.read().unwrap().get(session_id).cloned()
    }

    fn get_or_create(&self, session_id: &str) -> Arc<Mutex<SessionLog>> {
        if let Some(log) = self.existing(session_id) {
            return log;
        }
        self.sessions
            .write()
            .unwrap()
            .entry(session_id.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new(SessionLog::new())))
            .clone()
    }
}

#[async_trait]
impl EventLog for MemoryLog {
    async fn append(
        &self,
        session_id: &str,
        drafts: Vec<EventDraft>,
    ) -> Result<AppendOutcome, LogError> {
        let log = self.get_or_create(session_id);
        let mut log = log.lock().unwrap();
        // Build the whole batch first and commit it at the end, so that a failure leaves
        // the log untouched (all-or-nothing).
        let mut seqs = Vec::with_capacity(drafts.len());
        let mut appended = Vec::with_capacity(drafts.len());
        // Keys first seen in this batch; a batch may repeat its own key.
        let mut new_keys: HashMap<String, u64> = HashMap::new();
        let mut next = log.last_seq;
        for draft in drafts {
            if let Some(key) = &draft.idempotency_key {
                let seen = log.keys.get(key).or_else(|| new_keys.get(key)).copied();
                if let Some(seq) = seen {
                    seqs.push(Some(seq));
                    continue;
                }
            }
            next += 1;
            let data = finalize(session_id, next, draft.data);
            let json = to_raw_value(&data)?;
            if let Some(key) = draft.idempotency_key {
                new_keys.insert(key, next);
            }
            seqs.push(Some(next));
            appended.push(Appended {
                event: Arc::new(LoggedEvent {
                    seq: next,
                    kind: draft.kind,
                    json,
                }),
                data,
            });
        }
        for (key, seq) in new_keys {
            log.remember_key(key, seq);
        }
        log.last_seq = next;
        log.events.extend(appended.iter().map(|a| a.event.clone()));
        let excess = log.events.len().saturating_sub(self.max_events);
        log.events.drain(..excess);
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
