//! The session store: each session's snapshot, folded from its events.
//!
//! The snapshot is what `GET /api/wizard/session/{id}` returns and what a client refetches
//! when it cannot be brought up to date by replay. It is derived from the log only, so the
//! fold ([`Snapshot::apply`]) is shared by every backend ([`MemoryStore`] here;
//! [`crate::redis::RedisStore`] in Redis).

mod memory;

use std::time::Instant;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use memory::MemoryStore;

use crate::event::{ClarificationStatus, EventKind, ModelStatus, SessionStatus, json_len};
use crate::log::{Appended, Epoch};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PromptCounts {
    pub total: u64,
    pub completed: u64,
    pub processing: u64,
    pub pending: u64,
    pub failed: u64,
}

/// A clarification as last reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Clarification {
    pub clarification_id: String,
    pub question: String,
    pub status: ClarificationStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    pub timestamp: Value,
}

/// The headline of a session: what the session list shows, and the first part of the
/// snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionSummary {
    pub session_id: String,
    pub status: SessionStatus,
    pub progress: f64,
    pub prompts: PromptCounts,
    pub has_clarifications: bool,
    pub clarification_count: usize,
    pub last_seq: u64,
    pub epoch: Epoch,
    pub created_at: String,
    pub updated_at: String,
    /// The subject of the token that created the session (SPEC §5), when auth was on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// Everything known about a session, as returned by the HTTP API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    #[serde(flatten)]
    pub summary: SessionSummary,
    pub clarifications: Vec<Clarification>,
    /// The latest `model_result` per prompt and model, in order of first appearance.
    pub model_results: Vec<Map<String, Value>>,
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
    /// What the session's creator attached (`null` for sessions that only have events).
    pub metadata: Value,
    /// Model results and clarifications left out to keep the snapshot within
    /// `--max-snapshot-entries` (the log still has their events).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped_entries: u64,
    #[serde(skip)]
    pub ended_at: Option<Instant>,
    /// Serialized bytes of `model_results` and `clarifications`, kept up to date while
    /// folding (counted afresh after a load, on the first fold).
    #[serde(skip)]
    entry_bytes: Option<usize>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// How large the stores let a snapshot and their sessions' idleness grow (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Model results plus clarifications one snapshot keeps; a new one over it takes the
    /// place of the oldest settled one (a finished model result, a closed clarification).
    pub max_entries: usize,
    /// Their serialized bytes, at most, the same way (the newest entry always stays).
    pub max_entry_bytes: usize,
    /// How long a session's snapshot lives after its last change when nothing sweeps it
    /// (Redis keys expire after it).
    pub idle_ttl: std::time::Duration,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_entries: usize::MAX,
            max_entry_bytes: usize::MAX,
            idle_ttl: std::time::Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl Snapshot {
    pub fn new(session_id: &str, epoch: &Epoch, timestamp: String) -> Self {
        Self {
            summary: SessionSummary {
                session_id: session_id.to_owned(),
                status: SessionStatus::Active,
                progress: 0.0,
                prompts: PromptCounts::default(),
                has_clarifications: false,
                clarification_count: 0,
                last_seq: 0,
                epoch: epoch.clone(),
                created_at: timestamp.clone(),
                updated_at: timestamp,
                owner: None,
            },
            clarifications: Vec::new(),
            model_results: Vec::new(),
            result: None,
            error: None,
            metadata: Value::Null,
            dropped_entries: 0,
            ended_at: None,
            entry_bytes: Some(0),
        }
    }

    /// Folds logged events into the snapshot, keeping every entry.
    pub fn apply(&mut self, events: &[Appended], epoch: &Epoch) {
        self.apply_within(events, epoch, &StoreLimits::default());
    }

    /// Folds logged events into the snapshot, keeping its model results and clarifications
    /// within `limits` ([`StoreLimits::max_entries`], [`StoreLimits::max_entry_bytes`]).
    pub fn apply_within(&mut self, events: &[Appended], epoch: &Epoch, limits: &StoreLimits) {
        if self.summary.epoch != *epoch {
            // The log was recreated under us: the old fold no longer describes it.
            let metadata = std::mem::take(&mut self.metadata);
            let owner = self.summary.owner.take();
            *self = Snapshot::new(
                &self.summary.session_id,
                epoch,
                self.summary.created_at.clone(),
            );
            self.metadata = metadata;
            self.summary.owner = owner;
        }
        if self.entry_bytes.is_none() {
            let bytes = self.model_results.iter().map(json_len).sum::<usize>()
                + self.clarifications.iter().map(json_len).sum::<usize>();
            self.entry_bytes = Some(bytes);
        }
        // Folding is idempotent: events already folded (a retried append) are skipped.
        for appended in events {
            if appended.event.seq > self.summary.last_seq {
                self.apply_one(appended.event.kind, appended.event.seq, &appended.data);
                self.keep_within(limits);
            }
        }
    }

    fn entry_bytes_mut(&mut self) -> &mut usize {
        self.entry_bytes.get_or_insert(0)
    }

    /// Drops the oldest settled entries (else the oldest ones) until the entries are within
    /// both limits; the newest entry always stays.
    fn keep_within(&mut self, limits: &StoreLimits) {
        loop {
            let count = self.model_results.len() + self.clarifications.len();
            let bytes = self.entry_bytes.unwrap_or(0);
            let over =
                count > limits.max_entries.max(1) || (bytes > limits.max_entry_bytes && count > 1);
            if !over {
                return;
            }
            let settled_result = self.model_results.iter().position(|m| {
                m.get("status")
                    .and_then(Value::as_str)
                    .and_then(ModelStatus::parse)
                    .is_some_and(|s| s != ModelStatus::Processing)
            });
            let closed_clarification = self
                .clarifications
                .iter()
                .position(|c| c.status != ClarificationStatus::Pending);
            let freed = match (settled_result, closed_clarification) {
                (Some(i), _) => json_len(&self.model_results.remove(i)),
                (None, Some(i)) => json_len(&self.clarifications.remove(i)),
                (None, None) if !self.model_results.is_empty() => {
                    json_len(&self.model_results.remove(0))
                }
                (None, None) => json_len(&self.clarifications.remove(0)),
            };
            let total = self.entry_bytes_mut();
            *total = total.saturating_sub(freed);
            self.dropped_entries += 1;
        }
    }

    fn apply_one(&mut self, kind: EventKind, seq: u64, data: &Map<String, Value>) {
        self.summary.last_seq = self.summary.last_seq.max(seq);
        if let Some(Value::String(ts)) = data.get("timestamp") {
            self.summary.updated_at.clone_from(ts);
        }
        match kind {
            EventKind::Progress => self.apply_progress(data),
            EventKind::ModelResult => self.apply_model_result(data),
            EventKind::Clarification => self.apply_clarification(data),
            EventKind::Completed => {
                self.set_status(SessionStatus::Completed);
                self.summary.progress = 100.0;
                self.result = data.get("result").cloned();
            }
            EventKind::Error => {
                self.set_status(SessionStatus::Failed);
                self.error = Some(Value::Object(data.clone()));
            }
        }
    }

    fn apply_progress(&mut self, data: &Map<String, Value>) {
        if let Some(status) = data
            .get("status")
            .and_then(Value::as_str)
            .and_then(SessionStatus::parse)
        {
            self.set_status(status);
        }
        if let Some(progress) = data.get("progress").and_then(Value::as_f64) {
            self.summary.progress = progress;
        }
        if let Some(Value::Object(prompts)) = data.get("prompts") {
            let count = |key: &str| prompts.get(key).and_then(Value::as_u64).unwrap_or(0);
            self.summary.prompts = PromptCounts {
                total: count("total"),
                completed: count("completed"),
                processing: count("processing"),
                pending: count("pending"),
                failed: count("failed"),
            };
        }
        if let Some(result) = data.get("result") {
            self.result = Some(result.clone());
        }
    }

    fn apply_model_result(&mut self, data: &Map<String, Value>) {
        fn key(m: &Map<String, Value>) -> (Option<&Value>, Option<&Value>) {
            (m.get("promptId"), m.get("modelName"))
        }
        let wanted = key(data);
        let (added, freed) = match self.model_results.iter_mut().find(|m| key(m) == wanted) {
            Some(slot) => {
                let freed = json_len(slot);
                slot.clone_from(data);
                (json_len(data), freed)
            }
            None => {
                self.model_results.push(data.clone());
                (json_len(data), 0)
            }
        };
        let total = self.entry_bytes_mut();
        *total = (*total + added).saturating_sub(freed);
    }

    fn apply_clarification(&mut self, data: &Map<String, Value>) {
        let text = |key: &str| data.get(key).and_then(Value::as_str).map(str::to_owned);
        // Validation admits only the three statuses; an event without one changes nothing.
        let Some(status) = data
            .get("status")
            .and_then(Value::as_str)
            .and_then(ClarificationStatus::parse)
        else {
            return;
        };
        let id = text("clarificationId").unwrap_or_default();
        let entry = Clarification {
            clarification_id: id.clone(),
            question: text("question").unwrap_or_default(),
            status,
            answer: text("answer"),
            timestamp: data.get("timestamp").cloned().unwrap_or(Value::Null),
        };
        let added = json_len(&entry);
        let freed = match self
            .clarifications
            .iter_mut()
            .find(|c| c.clarification_id == id)
        {
            Some(slot) => json_len(&std::mem::replace(slot, entry)),
            None => {
                self.clarifications.push(entry);
                0
            }
        };
        let total = self.entry_bytes_mut();
        *total = (*total + added).saturating_sub(freed);
        self.summary.clarification_count = self
            .clarifications
            .iter()
            .filter(|c| c.status == ClarificationStatus::Pending)
            .count();
        self.summary.has_clarifications = self.summary.clarification_count > 0;
    }

    fn set_status(&mut self, status: SessionStatus) {
        self.summary.status = status;
        self.ended_at = match (status.is_terminal(), self.ended_at) {
            (true, None) => Some(Instant::now()),
            (true, ended) => ended,
            (false, _) => None,
        };
    }
}

/// The order of the session list: oldest first, ties by id.
pub(crate) fn sort_summaries(summaries: &mut [SessionSummary]) {
    summaries.sort_by(|a, b| {
        a.created_at
            .cmp(&b.created_at)
            .then_with(|| a.session_id.cmp(&b.session_id))
    });
}

/// What a session's creator attached to it: kept with the snapshot, never folded from events.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub metadata: Option<Value>,
    pub owner: Option<String>,
}

impl Origin {
    pub(crate) fn apply_to(&self, snapshot: &mut Snapshot) {
        if let Some(metadata) = &self.metadata {
            snapshot.metadata = metadata.clone();
        }
        if let Some(owner) = &self.owner {
            snapshot.summary.owner = Some(owner.clone());
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session store backend failed: {0}")]
    Backend(String),
}

/// Storage of session snapshots.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Folds newly logged events (already in `seq` order) into the session's snapshot,
    /// creating it on its first event.
    async fn apply(
        &self,
        session_id: &str,
        epoch: &Epoch,
        events: &[Appended],
    ) -> Result<(), StoreError>;
    async fn get(&self, session_id: &str) -> Result<Option<Snapshot>, StoreError>;
    /// Attaches what its creator said (metadata, owner) to a session that already has events.
    async fn set_origin(&self, session_id: &str, origin: &Origin) -> Result<(), StoreError>;
    async fn list(&self, status: Option<SessionStatus>) -> Result<Vec<SessionSummary>, StoreError>;
    /// Removes and names the sessions that ended more than `ttl` ago.
    async fn take_expired(&self, ttl: std::time::Duration) -> Result<Vec<String>, StoreError>;
    /// Removes and names the sessions, ended or not, that changed last more than `idle` ago.
    async fn take_idle(&self, idle: std::time::Duration) -> Result<Vec<String>, StoreError>;
    /// Whether the run checkpoints below outlive this process (the data dir, Redis): only
    /// then can another process resume a run, and only then is checkpointing worth its cost.
    fn keeps_runs(&self) -> bool;
    /// Saves the checkpoint of the run of `session_id`, replacing its last one. It is durable
    /// when this returns: a run saves it before it logs the events the checkpoint accounts
    /// for (see `orchestrator::checkpoint`).
    async fn save_run(&self, session_id: &str, checkpoint: &[u8]) -> Result<(), StoreError>;
    /// The last checkpoint saved for `session_id`'s run, if it has one.
    async fn load_run(&self, session_id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Forgets the run's checkpoint: it ended, or was given up.
    async fn drop_run(&self, session_id: &str) -> Result<(), StoreError>;
    /// The sessions with a saved run checkpoint: the runs that have not ended.
    async fn saved_runs(&self) -> Result<Vec<String>, StoreError>;
}
