//! [`DiskStore`]: session snapshots in the data dir.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::DataDir;
use crate::event::{SessionStatus, now_timestamp};
use crate::log::{Appended, Epoch};
use crate::store::{Origin, SessionStore, SessionSummary, Snapshot, StoreError, StoreLimits};

/// A snapshot as stored, with the wall-clock times the sweeper needs after a restart.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Stored {
    snapshot: Snapshot,
    touched_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ended_ms: Option<u64>,
}

/// Only the headline of a [`Stored`], for the session list.
#[derive(Deserialize)]
struct StoredSummary {
    snapshot: SessionSummary,
}

/// When a session last changed and ended, for the sweeps.
#[derive(Clone, Copy)]
struct Times {
    touched: Instant,
    ended: Option<Instant>,
}

/// The snapshots in the data dir, with an in-memory index of their times so the sweeps
/// read nothing from disk. Every call that touches the disk runs on a blocking thread.
#[derive(Clone)]
pub struct DiskStore {
    dir: Arc<DataDir>,
    limits: StoreLimits,
    times: Arc<Mutex<HashMap<String, Times>>>,
}

impl DiskStore {
    /// Opens the store: indexes every snapshot, and folds forward any that is behind its
    /// log (a crash between an append and its fold), or that its log has but it lacks.
    pub(super) fn new(dir: Arc<DataDir>, limits: StoreLimits) -> Result<Self, fjall::Error> {
        let store = Self {
            dir,
            limits,
            times: Arc::default(),
        };
        let mut ids = Vec::new();
        for key in store.dir.heads.keys() {
            ids.push(String::from_utf8_lossy(&key?).into_owned());
        }
        for id in &ids {
            store.catch_up(id).map_err(io)?;
        }
        for pair in store.dir.snapshots.iter() {
            let (key, value) = pair?;
            let stored: Stored = serde_json::from_slice(&value).map_err(super::corrupt)?;
            let id = String::from_utf8_lossy(&key).into_owned();
            store.times.lock().unwrap().insert(id, times_of(&stored));
        }
        Ok(store)
    }

    /// Folds into `session_id`'s snapshot what its log holds beyond it.
    fn catch_up(&self, session_id: &str) -> Result<(), StoreError> {
        let Some(head) = self.dir.head(session_id).map_err(backend)? else {
            return Ok(());
        };
        let epoch = super::log::log_head(Some(&head))
            .map_err(|e| StoreError::Backend(e.to_string()))?
            .epoch
            .expect("a written log has an epoch");
        let stored = self.load(session_id)?;
        let behind = stored.as_ref().is_none_or(|s| {
            s.snapshot.summary.epoch != epoch || s.snapshot.summary.last_seq < head.last_seq
        });
        if !behind {
            return Ok(());
        }
        let after = stored
            .as_ref()
            .filter(|s| s.snapshot.summary.epoch == epoch)
            .map_or(0, |s| s.snapshot.summary.last_seq);
        let events = self
            .dir
            .events_after(session_id, after, usize::MAX)
            .map_err(backend)?;
        let appended = events
            .into_iter()
            .map(Appended::from_logged)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Backend(format!("data dir: {e}")))?;
        self.fold(session_id, &epoch, &appended)
    }

    fn load(&self, session_id: &str) -> Result<Option<Stored>, StoreError> {
        self.dir
            .snapshots
            .get(session_id)
            .map_err(backend)?
            .map(|bytes| {
                serde_json::from_slice::<Stored>(&bytes)
                    .map(|mut stored| {
                        stored.snapshot.ended_at = stored.ended_ms.map(instant_of);
                        stored
                    })
                    .map_err(|e| StoreError::Backend(format!("data dir: a snapshot: {e}")))
            })
            .transpose()
    }

    fn save(&self, session_id: &str, snapshot: Snapshot) -> Result<(), StoreError> {
        let now = Instant::now();
        let stored = Stored {
            ended_ms: snapshot.ended_at.map(unix_ms_of),
            touched_ms: unix_ms_of(now),
            snapshot,
        };
        let bytes = serde_json::to_vec(&stored)
            .map_err(|e| StoreError::Backend(format!("data dir: {e}")))?;
        // Not waited to disk: a snapshot lost in a crash is folded again from the log.
        self.dir
            .snapshots
            .insert(session_id, bytes)
            .map_err(backend)?;
        self.times
            .lock()
            .unwrap()
            .insert(session_id.to_owned(), times_of(&stored));
        Ok(())
    }

    fn fold(&self, session_id: &str, epoch: &Epoch, events: &[Appended]) -> Result<(), StoreError> {
        let lock = self.dir.lock_of(session_id);
        let _order = lock.lock().unwrap();
        let mut snapshot = match self.load(session_id)? {
            Some(stored) => stored.snapshot,
            None => Snapshot::new(session_id, epoch, now_timestamp()),
        };
        snapshot.apply_within(events, epoch, &self.limits);
        self.save(session_id, snapshot)
    }

    fn set_origin_now(&self, session_id: &str, origin: &Origin) -> Result<(), StoreError> {
        let lock = self.dir.lock_of(session_id);
        let _order = lock.lock().unwrap();
        if let Some(stored) = self.load(session_id)? {
            let mut snapshot = stored.snapshot;
            origin.apply_to(&mut snapshot);
            self.save(session_id, snapshot)?;
        }
        Ok(())
    }

    fn list_now(&self, status: Option<SessionStatus>) -> Result<Vec<SessionSummary>, StoreError> {
        let mut out = Vec::new();
        for value in self.dir.snapshots.values() {
            let value = value.map_err(backend)?;
            let listed: StoredSummary = serde_json::from_slice(&value)
                .map_err(|e| StoreError::Backend(format!("data dir: a snapshot: {e}")))?;
            if status.is_none_or(|wanted| listed.snapshot.status == wanted) {
                out.push(listed.snapshot);
            }
        }
        crate::store::sort_summaries(&mut out);
        Ok(out)
    }

    /// Removes the snapshots `expired` picks, and names them.
    fn take_where(&self, expired: impl Fn(&Times) -> bool) -> Result<Vec<String>, StoreError> {
        let taken: Vec<String> = self
            .times
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, times)| expired(times))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &taken {
            let lock = self.dir.lock_of(id);
            let _order = lock.lock().unwrap();
            self.dir.snapshots.remove(id.as_str()).map_err(backend)?;
            self.times.lock().unwrap().remove(id);
        }
        Ok(taken)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Self) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        super::blocking(self, work, StoreError::Backend).await
    }
}

fn backend(error: fjall::Error) -> StoreError {
    StoreError::Backend(format!("data dir: {error}"))
}

fn io(error: StoreError) -> fjall::Error {
    super::corrupt(error)
}

fn times_of(stored: &Stored) -> Times {
    Times {
        touched: instant_of(stored.touched_ms),
        ended: stored.ended_ms.map(instant_of),
    }
}

fn unix_ms_of(at: Instant) -> u64 {
    let ago = at.elapsed();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(now.saturating_sub(ago).as_millis()).unwrap_or(u64::MAX)
}

/// The instant of a wall-clock time: in the past as far as the clock says (now, if the
/// clock went back or the time is older than this process can express).
fn instant_of(unix_ms: u64) -> Instant {
    let now_ms = unix_ms_of(Instant::now());
    let ago = Duration::from_millis(now_ms.saturating_sub(unix_ms));
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

#[async_trait]
impl SessionStore for DiskStore {
    async fn apply(
        &self,
        session_id: &str,
        epoch: &Epoch,
        events: &[Appended],
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        // The fold runs on a blocking thread, which needs its own copy of the events' data.
        let events: Vec<Appended> = events
            .iter()
            .map(|a| Appended {
                event: a.event.clone(),
                data: a.data.clone(),
            })
            .collect();
        let (session_id, epoch) = (session_id.to_owned(), epoch.clone());
        self.blocking(move |store| store.fold(&session_id, &epoch, &events))
            .await
    }

    async fn get(&self, session_id: &str) -> Result<Option<Snapshot>, StoreError> {
        let session_id = session_id.to_owned();
        self.blocking(move |store| Ok(store.load(&session_id)?.map(|s| s.snapshot)))
            .await
    }

    async fn set_origin(&self, session_id: &str, origin: &Origin) -> Result<(), StoreError> {
        let (session_id, origin) = (session_id.to_owned(), origin.clone());
        self.blocking(move |store| store.set_origin_now(&session_id, &origin))
            .await
    }

    async fn list(&self, status: Option<SessionStatus>) -> Result<Vec<SessionSummary>, StoreError> {
        self.blocking(move |store| store.list_now(status)).await
    }

    async fn take_expired(&self, ttl: Duration) -> Result<Vec<String>, StoreError> {
        self.blocking(move |store| {
            store.take_where(|times| times.ended.is_some_and(|at| at.elapsed() >= ttl))
        })
        .await
    }

    async fn take_idle(&self, idle: Duration) -> Result<Vec<String>, StoreError> {
        self.blocking(move |store| store.take_where(|times| times.touched.elapsed() >= idle))
            .await
    }

    fn keeps_runs(&self) -> bool {
        true
    }

    async fn save_run(&self, session_id: &str, checkpoint: &[u8]) -> Result<(), StoreError> {
        let (session_id, checkpoint) = (session_id.to_owned(), checkpoint.to_vec());
        self.blocking(move |store| store.write_run(&session_id, Some(&checkpoint)))
            .await
    }

    async fn load_run(&self, session_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let session_id = session_id.to_owned();
        self.blocking(move |store| {
            let value = store.dir.runs.get(session_id.as_str()).map_err(backend)?;
            Ok(value.map(|bytes| bytes.to_vec()))
        })
        .await
    }

    async fn drop_run(&self, session_id: &str) -> Result<(), StoreError> {
        let session_id = session_id.to_owned();
        self.blocking(move |store| store.write_run(&session_id, None))
            .await
    }

    async fn saved_runs(&self) -> Result<Vec<String>, StoreError> {
        self.blocking(move |store| {
            let mut ids = Vec::new();
            for key in store.dir.runs.keys() {
                ids.push(String::from_utf8_lossy(&key.map_err(backend)?).into_owned());
            }
            Ok(ids)
        })
        .await
    }
}

impl DiskStore {
    /// Writes (`Some`) or removes a run's checkpoint, on disk before it returns.
    fn write_run(&self, session_id: &str, checkpoint: Option<&[u8]>) -> Result<(), StoreError> {
        let runs = &self.dir.runs;
        let mut batch = self
            .dir
            .keyspace
            .batch()
            .durability(Some(fjall::PersistMode::SyncAll));
        match checkpoint {
            Some(bytes) => batch.insert(runs, session_id, bytes),
            None => batch.remove(runs, session_id),
        }
        batch.commit().map_err(backend)
    }
}
