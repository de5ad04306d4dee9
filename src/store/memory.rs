//! In-memory session store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Origin, SessionStore, SessionSummary, Snapshot, StoreError, StoreLimits};
use crate::event::{SessionStatus, now_timestamp};
use crate::log::{Appended, Epoch};

/// Sessions are found under a read lock and then locked one by one, so folds into
/// different sessions never wait for each other (as in [`crate::log::MemoryLog`]). Both
/// are std locks: they guard plain data and are never held across an `.await`.
#[derive(Default)]
pub struct MemoryStore {
    sessions: RwLock<HashMap<String, Arc<Mutex<Entry>>>>,
    limits: StoreLimits,
    /// Run checkpoints: kept so the behaviour is the backends' one, though nothing can
    /// resume from them once the process is gone.
    runs: Mutex<HashMap<String, Vec<u8>>>,
}

struct Entry {
    snapshot: Snapshot,
    /// When the snapshot last changed (for the idle sweep).
    touched: Instant,
}

impl MemoryStore {
    /// A store with no limit on a snapshot's entries.
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_limits(limits: StoreLimits) -> Self {
        Self {
            sessions: RwLock::default(),
            limits,
            runs: Mutex::default(),
        }
    }

    fn existing(&self, session_id: &str) -> Option<Arc<Mutex<Entry>>> {
        self.sessions.read().unwrap().get(session_id).cloned()
    }

    /// Removes the sessions `expired` picks, and names them.
    fn take_where(&self, expired: impl Fn(&Entry) -> bool) -> Vec<String> {
        let mut sessions = self.sessions.write().unwrap();
        let taken: Vec<String> = sessions
            .iter()
            .filter(|(_, entry)| expired(&entry.lock().unwrap()))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &taken {
            sessions.remove(id);
        }
        taken
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn apply(
        &self,
        session_id: &str,
        epoch: &Epoch,
        events: &[Appended],
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let entry = match self.existing(session_id) {
            Some(entry) => entry,
            None => self
                .sessions
                .write()
                .unwrap()
                .entry(session_id.to_owned())
                .or_insert_with(|| {
                    Arc::new(Mutex::new(Entry {
                        snapshot: Snapshot::new(session_id, epoch, now_timestamp()),
                        touched: Instant::now(),
                    }))
                })
                .clone(),
        };
        let mut entry = entry.lock().unwrap();
        entry.snapshot.apply_within(events, epoch, &self.limits);
        entry.touched = Instant::now();
        Ok(())
    }

    async fn get(&self, session_id: &str) -> Result<Option<Snapshot>, StoreError> {
        Ok(self
            .existing(session_id)
            .map(|entry| entry.lock().unwrap().snapshot.clone()))
    }

    async fn set_origin(&self, session_id: &str, origin: &Origin) -> Result<(), StoreError> {
        if let Some(entry) = self.existing(session_id) {
            origin.apply_to(&mut entry.lock().unwrap().snapshot);
        }
        Ok(())
    }

    async fn list(&self, status: Option<SessionStatus>) -> Result<Vec<SessionSummary>, StoreError> {
        let entries: Vec<Arc<Mutex<Entry>>> =
            self.sessions.read().unwrap().values().cloned().collect();
        let mut out: Vec<SessionSummary> = entries
            .iter()
            .filter_map(|entry| {
                let entry = entry.lock().unwrap();
                let summary = &entry.snapshot.summary;
                status
                    .is_none_or(|wanted| summary.status == wanted)
                    .then(|| summary.clone())
            })
            .collect();
        super::sort_summaries(&mut out);
        Ok(out)
    }

    async fn take_expired(&self, ttl: Duration) -> Result<Vec<String>, StoreError> {
        Ok(self.take_where(|entry| {
            entry
                .snapshot
                .ended_at
                .is_some_and(|at| at.elapsed() >= ttl)
        }))
    }

    async fn take_idle(&self, idle: Duration) -> Result<Vec<String>, StoreError> {
        Ok(self.take_where(|entry| entry.touched.elapsed() >= idle))
    }

    fn keeps_runs(&self) -> bool {
        false
    }

    async fn save_run(&self, session_id: &str, checkpoint: &[u8]) -> Result<(), StoreError> {
        self.runs
            .lock()
            .unwrap()
            .insert(session_id.to_owned(), checkpoint.to_vec());
        Ok(())
    }

    async fn load_run(&self, session_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.runs.lock().unwrap().get(session_id).cloned())
    }

    async fn drop_run(&self, session_id: &str) -> Result<(), StoreError> {
        self.runs.lock().unwrap().remove(session_id);
        Ok(())
    }

    async fn saved_runs(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.runs.lock().unwrap().keys().cloned().collect())
    }
}
