//! The data dir (`--data-dir`): one node's log and snapshots in an embedded, crash-safe
//! store, behind the same [`EventLog`](crate::log::EventLog) and
//! [`SessionStore`](crate::store::SessionStore) traits as memory and Redis.
//!
//! The store is fjall (an LSM tree with a write-ahead journal; the comparison with SQLite and
//! redb that chose it is in docs/durability.md). Every append is one atomic write batch (the
//! events, their idempotency keys, the trimmed tail and the session's head) made durable
//! (`fsync`) before it is acknowledged, so an event herald answered `202` for survives a
//! crash or a power cut. Snapshots are derived data: they are written without waiting for
//! the disk, and a snapshot found behind its log when the data dir is opened is folded
//! forward from the log ([`DataDir::open`]).
//!
//! Layout, one partition each; `0x00` separates a session id (which never holds it) from
//! what follows:
//! - `heads`: session id → [`Head`] (JSON): epoch, seqs, retained bytes, ended, key count;
//! - `events`: id `0x00` seq (big-endian) → kind byte + the event's JSON;
//! - `keys`: id `0x00` idempotency key → seq; `key_order`: id `0x00` seq → key, so the
//!   oldest keys are forgotten first;
//! - `snapshots`: id → the snapshot and when it last changed and ended (JSON);
//! - `runs`: id → the checkpoint of the session's run while it runs (written durably before
//!   the run logs what it accounts for), so a restart resumes the runs it interrupted.

mod log;
mod store;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use fjall::{Config as FjallConfig, Keyspace, PartitionCreateOptions, PartitionHandle};
use serde::{Deserialize, Serialize};

pub use log::DiskLog;
pub use store::DiskStore;

use crate::log::{LogLimits, LoggedEvent};
use crate::store::StoreLimits;

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("cannot open the data dir {path}: {message}")]
    Open { path: String, message: String },
    /// Two processes writing one data dir would corrupt it: the second is refused.
    #[error(
        "the data dir {path} is in use by another herald process (its lock file {lock} is held)"
    )]
    InUse { path: String, lock: String },
}

/// The lock file that keeps a data dir to one process.
const LOCK_FILE: &str = "herald.lock";

/// Takes the data dir's lock for as long as the process holds the returned file (the OS
/// releases it when the process ends, however it ends).
fn lock(path: &Path) -> Result<std::fs::File, DataDirError> {
    let shown = || path.display().to_string();
    std::fs::create_dir_all(path).map_err(|e| DataDirError::Open {
        path: shown(),
        message: e.to_string(),
    })?;
    let lock_path = path.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| DataDirError::Open {
            path: shown(),
            message: e.to_string(),
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(DataDirError::InUse {
            path: shown(),
            lock: lock_path.display().to_string(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(DataDirError::Open {
            path: shown(),
            message: e.to_string(),
        }),
    }
}

/// The open data dir: the keyspace and its partitions, shared by [`DiskLog`] and
/// [`DiskStore`].
pub(crate) struct DataDir {
    keyspace: Keyspace,
    heads: PartitionHandle,
    events: PartitionHandle,
    keys: PartitionHandle,
    key_order: PartitionHandle,
    snapshots: PartitionHandle,
    runs: PartitionHandle,
    /// Per session, the lock that orders its writes (appends and folds alike). std locks,
    /// taken only on blocking threads.
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// The data dir's lock file, held while this is open.
    _lock: std::fs::File,
}

/// A session's log head as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Head {
    epoch: String,
    last_seq: u64,
    first_seq: u64,
    bytes: u64,
    ended: bool,
    keys: u64,
}

impl DataDir {
    fn open(path: &Path) -> Result<Arc<Self>, DataDirError> {
        let lock = lock(path)?;
        let failed = |e: fjall::Error| DataDirError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let keyspace = FjallConfig::new(path).open().map_err(failed)?;
        let partition = |name: &str| {
            keyspace
                .open_partition(name, PartitionCreateOptions::default())
                .map_err(failed)
        };
        Ok(Arc::new(Self {
            heads: partition("heads")?,
            events: partition("events")?,
            keys: partition("keys")?,
            key_order: partition("key_order")?,
            snapshots: partition("snapshots")?,
            runs: partition("runs")?,
            keyspace,
            locks: Mutex::default(),
            _lock: lock,
        }))
    }

    /// The lock that orders `session_id`'s writes.
    fn lock_of(&self, session_id: &str) -> Arc<Mutex<()>> {
        self.locks
            .lock()
            .unwrap()
            .entry(session_id.to_owned())
            .or_default()
            .clone()
    }

    /// Forgets the lock of a session that is gone, unless someone holds it.
    fn forget_lock(&self, session_id: &str) {
        let mut locks = self.locks.lock().unwrap();
        if locks
            .get(session_id)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            locks.remove(session_id);
        }
    }

    fn head(&self, session_id: &str) -> Result<Option<Head>, fjall::Error> {
        self.heads
            .get(session_id)?
            .map(|bytes| serde_json::from_slice(&bytes).map_err(corrupt))
            .transpose()
    }

    /// The retained events of `session_id` with `seq > after`, at most `limit`.
    fn events_after(
        &self,
        session_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Arc<LoggedEvent>>, fjall::Error> {
        let from = seq_key(session_id, after.saturating_add(1));
        let to = seq_key(session_id, u64::MAX);
        self.events
            .range(from..=to)
            .take(limit)
            .map(|pair| {
                let (key, value) = pair?;
                decode_event(&key, &value).ok_or_else(|| corrupt("an unreadable event"))
            })
            .collect()
    }
}

/// Opens (creating it if needed) the data dir at `path`: its log and its store, with the
/// snapshots brought level with the logs.
pub fn open(
    path: &Path,
    log_limits: LogLimits,
    store_limits: StoreLimits,
) -> Result<(DiskLog, DiskStore), DataDirError> {
    let dir = DataDir::open(path)?;
    let failed = |e: fjall::Error| DataDirError::Open {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let log = DiskLog::new(dir.clone(), log_limits).map_err(failed)?;
    let store = DiskStore::new(dir, store_limits).map_err(failed)?;
    Ok((log, store))
}

/// Runs `work` on `this` on a blocking thread (the disk is waited for there, never on the
/// runtime's workers); a task that panicked becomes the backend's error through `failed`.
async fn blocking<S, T, E>(
    this: &S,
    work: impl FnOnce(&S) -> Result<T, E> + Send + 'static,
    failed: fn(String) -> E,
) -> Result<T, E>
where
    S: Clone + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    let this = this.clone();
    tokio::task::spawn_blocking(move || work(&this))
        .await
        .map_err(|e| failed(format!("data dir task failed: {e}")))?
}

/// `id 0x00`: the start of every key of one session.
fn session_prefix(session_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(session_id.len() + 9);
    key.extend_from_slice(session_id.as_bytes());
    key.push(0);
    key
}

/// `id 0x00 seq`, the seq big-endian so keys sort in seq order.
fn seq_key(session_id: &str, seq: u64) -> Vec<u8> {
    let mut key = session_prefix(session_id);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// `id 0x00 key`.
fn idempotency_key(session_id: &str, key: &str) -> Vec<u8> {
    let mut out = session_prefix(session_id);
    out.extend_from_slice(key.as_bytes());
    out
}

fn seq_of(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

fn encode_event(event: &LoggedEvent) -> Vec<u8> {
    let json = event.json.get().as_bytes();
    let mut value = Vec::with_capacity(json.len() + 1);
    value.push(kind_byte(event.kind));
    value.extend_from_slice(json);
    value
}

fn decode_event(key: &[u8], value: &[u8]) -> Option<Arc<LoggedEvent>> {
    let (&kind, json) = value.split_first()?;
    let kind = *crate::event::EventKind::ALL.get(usize::from(kind))?;
    let json =
        serde_json::value::RawValue::from_string(String::from_utf8(json.to_vec()).ok()?).ok()?;
    Some(Arc::new(LoggedEvent {
        seq: seq_of(key)?,
        kind,
        json,
    }))
}

fn kind_byte(kind: crate::event::EventKind) -> u8 {
    crate::event::EventKind::ALL
        .iter()
        .position(|k| *k == kind)
        .and_then(|i| u8::try_from(i).ok())
        .unwrap_or(0)
}

/// What the store holds but herald cannot read: reported as a backend failure.
fn corrupt(what: impl std::fmt::Display) -> fjall::Error {
    fjall::Error::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("the data dir holds {what}"),
    ))
}
