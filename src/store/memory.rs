//! In-memory session store.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::{Origin, SessionStore, SessionSummary, Snapshot, StoreError};
use crate::event::{SessionStatus, now_timestamp};
use crate::log::{Appended, Epoch};

/// A std mutex: the critical sections fold a few fields and never await.
#[derive(Default)]
pub struct MemoryStore {
    sessions: Mutex<HashMap<String, Snapshot>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
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
        let mut sessions = self.sessions.lock().unwrap();
        let snapshot = sessions
            .entry(session_id.to_owned())
            .or_insert_with(|| Snapshot::new(session_id, epoch, now_timestamp()));
        snapshot.apply(events, epoch);
        Ok(())
    }

    async fn get(&self, session_id: &str) -> Result<Option<Snapshot>, StoreError> {
        Ok(self.sessions.lock().unwrap().get(session_id).cloned())
    }

    async fn set_origin(&self, session_id: &str, origin: &Origin) -> Result<(), StoreError> {
        if let Some(snapshot) = self.sessions.lock().unwrap().get_mut(session_id) {
            origin.apply_to(snapshot);
        }
        Ok(())
    }

    async fn list(&self, status: Option<SessionStatus>) -> Result<Vec<SessionSummary>, StoreError> {
        let sessions = self.sessions.lock().unwrap();
        let mut out: Vec<SessionSummary> = sessions
            .values()
            .filter(|s| status.is_none_or(|wanted| s.summary.status == wanted))
            .map(|s| s.summary.clone())
            .collect();
        out.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.session_id.cmp(&b.session_id))
        });
        Ok(out)
    }

    async fn take_expired(&self, ttl: Duration) -> Result<Vec<String>, StoreError> {
        let mut sessions = self.sessions.lock().unwrap();
        let expired: Vec<String> = sessions
            .values()
            .filter(|s| s.ended_at.is_some_and(|at| at.elapsed() >= ttl))
            .map(|s| s.summary.session_id.clone())
            .collect();
        for id in &expired {
            sessions.remove(id);
        }
        Ok(expired)
    }
}
