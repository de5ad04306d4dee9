//! Session snapshots in Redis, shared by every node.
//!
//! [`Keys::snapshot`] holds a session's snapshot as JSON, [`Keys::sessions`] indexes
//! sessions by creation time and [`Keys::ended`] ended ones by the time they ended. Nodes append to a
//! session's log concurrently, so a node folds its events into the stored snapshot with a
//! compare-and-set, first folding from the log any earlier events another node has not
//! folded yet: the stored snapshot always describes a prefix of the log, in order.
//!
//! **On a Redis Cluster** the compare-and-set may only touch the session's slot (snapshot
//! and version), so the two indexes (which share one slot there: [`Keys::ended`]) are
//! updated right after it succeeds, in one `MULTI` of idempotent commands (`ZADD NX`,
//! `ZREM`); its failure is warned about and does not fail the fold. A node that dies in between leaves the indexes one fold behind: the next fold of
//! the session repairs them, a session missing from `sessions` is left out of the list
//! until then (its keys still expire by their TTL), and a reopened session still in `ended`
//! is not taken for expired: the sweep takes an `ended` entry only once the snapshot it
//! reads is terminal (and drops the stale entry otherwise).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redis::{AsyncCommands, Script};

use super::{Connection, Keys, Redis, once_more};
use crate::event::{SessionStatus, now_timestamp};
use crate::log::{Appended, Epoch, EventLog};
use crate::store::{
    Origin, SessionStore, SessionSummary, Snapshot, StoreError, StoreLimits, sort_summaries,
};

/// KEYS: snapshot, its version, and on one Redis the sessions index and the ended index.
/// ARGV: the version read (`""` if none), the JSON to write, session id, created (ms),
/// ended (ms, or `""` while running), the idle TTL (ms). The version is a counter beside the
/// snapshot, so a fold sends the snapshot once, not the one it read as well. Without the
/// indexes (cluster) the node updates them after it ([`index_commands`]).
const COMPARE_AND_SET: &str = r#"
local current = redis.call('GET', KEYS[2]) or ''
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[6])
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
if #KEYS < 4 then return 1 end
redis.call('ZADD', KEYS[3], 'NX', ARGV[4], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[6])
if ARGV[5] ~= '' then
  redis.call('ZADD', KEYS[4], 'NX', ARGV[5], ARGV[3])
  redis.call('PEXPIRE', KEYS[4], ARGV[6])
else
  redis.call('ZREM', KEYS[4], ARGV[3])
end
return 1
"#;

/// A stored snapshot as read: its JSON (`None`: there is none) and its version.
struct Read {
    json: Option<String>,
    version: String,
}

/// Folds racing with other nodes give up after this many tries (each try means another
/// node made progress, so this is never reached in practice).
const MAX_TRIES: usize = 64;

pub struct RedisStore {
    redis: Connection,
    keys: Keys,
    log: Arc<dyn EventLog>,
    limits: StoreLimits,
    compare_and_set: Script,
}

fn backend(error: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(error.to_string())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl RedisStore {
    /// A store with no limit on a snapshot's entries.
    pub async fn connect(
        url: &str,
        prefix: &str,
        log: Arc<dyn EventLog>,
    ) -> Result<Self, StoreError> {
        Self::connect_with(url, prefix, log, StoreLimits::default()).await
    }

    pub async fn connect_with(
        url: &str,
        prefix: &str,
        log: Arc<dyn EventLog>,
        limits: StoreLimits,
    ) -> Result<Self, StoreError> {
        let redis = Redis::single(url).map_err(backend)?;
        Self::open(&redis, prefix, log, limits).await
    }

    /// A store on `redis` (one Redis or a cluster).
    pub async fn open(
        redis: &Redis,
        prefix: &str,
        log: Arc<dyn EventLog>,
        limits: StoreLimits,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            redis: redis.connect().await.map_err(backend)?,
            keys: redis.keys(prefix),
            log,
            limits,
            compare_and_set: Script::new(COMPARE_AND_SET),
        })
    }

    async fn read_raw(&self, session_id: &str) -> Result<Option<String>, StoreError> {
        let key = self.keys.snapshot(session_id);
        once_more(|| {
            let mut redis = self.redis.clone();
            let key = &key;
            async move { redis.get(key).await }
        })
        .await
        .map_err(backend)
    }

    /// The snapshot and its version, in one `MGET` (both keys share the session's slot).
    async fn read_versioned(&self, session_id: &str) -> Result<Read, StoreError> {
        let keys = [
            self.keys.snapshot(session_id),
            self.keys.snapshot_version(session_id),
        ];
        let (json, version): (Option<String>, Option<String>) = once_more(|| {
            let mut redis = self.redis.clone();
            let keys = &keys;
            async move { redis.mget(keys).await }
        })
        .await
        .map_err(backend)?;
        Ok(Read {
            json,
            version: version.unwrap_or_default(),
        })
    }

    fn idle_ttl_ms(&self) -> u64 {
        u64::try_from(self.limits.idle_ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Stores `snapshot` if the stored one is still at the version `read` saw, keeping the
    /// indexes in step; false when another node wrote in between.
    async fn write(
        &self,
        session_id: &str,
        read: &Read,
        snapshot: &Snapshot,
    ) -> Result<bool, StoreError> {
        let ended = if snapshot.summary.status.is_terminal() {
            now_ms().to_string()
        } else {
            String::new()
        };
        let cluster = self.keys.is_cluster();
        let created = now_ms();
        let mut invocation = self.compare_and_set.prepare_invoke();
        invocation
            .key(self.keys.snapshot(session_id))
            .key(self.keys.snapshot_version(session_id));
        if !cluster {
            invocation.key(self.keys.sessions()).key(self.keys.ended());
        }
        invocation
            .arg(&read.version)
            .arg(serde_json::to_string(snapshot).map_err(backend)?)
            .arg(session_id)
            .arg(created)
            .arg(&ended)
            .arg(self.idle_ttl_ms());
        // A compare-and-set is safe to repeat: if the first went through, the second
        // finds the snapshot changed and the fold starts over.
        let written: i64 = once_more(|| {
            let mut redis = self.redis.clone();
            let invocation = &invocation;
            async move { invocation.invoke_async(&mut redis).await }
        })
        .await
        .map_err(backend)?;
        if written == 1 && cluster {
            let pipe = index_commands(&self.keys, session_id, created, &ended, self.idle_ttl_ms());
            // Idempotent, so safe to repeat over a reconnected link. The snapshot is written
            // by now: a failure only leaves the indexes lagging (see the module docs).
            let indexed: redis::RedisResult<()> = once_more(|| {
                let mut redis = self.redis.clone();
                let pipe = &pipe;
                async move { pipe.query_async(&mut redis).await }
            })
            .await;
            if let Err(error) = indexed {
                tracing::warn!(session_id, %error, "could not index a session after its fold");
            }
        }
        Ok(written == 1)
    }

    /// The logged events between the snapshot and `first` that this node did not append.
    async fn missing(
        &self,
        session_id: &str,
        after: u64,
        first: u64,
    ) -> Result<Vec<Appended>, StoreError> {
        let count = usize::try_from(first - after - 1).unwrap_or(usize::MAX);
        let slice = self
            .log
            .read(session_id, after, count)
            .await
            .map_err(backend)?;
        slice
            .events
            .into_iter()
            .map(|event| Appended::from_logged(event).map_err(backend))
            .collect()
    }
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn apply(
        &self,
        session_id: &str,
        epoch: &Epoch,
        events: &[Appended],
    ) -> Result<(), StoreError> {
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Ok(());
        };
        let (first, last) = (first.event.seq, last.event.seq);
        for _ in 0..MAX_TRIES {
            let read = self.read_versioned(session_id).await?;
            let mut snapshot = match &read.json {
                Some(json) => serde_json::from_str::<Snapshot>(json).map_err(backend)?,
                None => Snapshot::new(session_id, epoch, now_timestamp()),
            };
            let same_log = snapshot.summary.epoch == *epoch;
            if !same_log {
                // The log was recreated: start the fold over (metadata is kept).
                snapshot.apply(&[], epoch);
            }
            if same_log && snapshot.summary.last_seq >= last {
                return Ok(()); // another node folded these already
            }
            let done = if same_log {
                snapshot.summary.last_seq
            } else {
                0
            };
            if done + 1 < first {
                let missing = self.missing(session_id, done, first).await?;
                snapshot.apply_within(&missing, epoch, &self.limits);
            }
            // The fold skips what it already has (another node may have folded some).
            snapshot.apply_within(events, epoch, &self.limits);
            if self.write(session_id, &read, &snapshot).await? {
                return Ok(());
            }
        }
        Err(StoreError::Backend(format!(
            "snapshot of `{session_id}` kept changing under {MAX_TRIES} folds"
        )))
    }

    async fn get(&self, session_id: &str) -> Result<Option<Snapshot>, StoreError> {
        match self.read_raw(session_id).await? {
            Some(json) => Ok(Some(serde_json::from_str(&json).map_err(backend)?)),
            None => Ok(None),
        }
    }

    async fn set_origin(&self, session_id: &str, origin: &Origin) -> Result<(), StoreError> {
        for _ in 0..MAX_TRIES {
            let read = self.read_versioned(session_id).await?;
            let Some(raw) = &read.json else {
                return Ok(());
            };
            let mut snapshot: Snapshot = serde_json::from_str(raw).map_err(backend)?;
            origin.apply_to(&mut snapshot);
            if self.write(session_id, &read, &snapshot).await? {
                return Ok(());
            }
        }
        Err(StoreError::Backend(format!(
            "snapshot of `{session_id}` kept changing"
        )))
    }

    async fn list(&self, status: Option<SessionStatus>) -> Result<Vec<SessionSummary>, StoreError> {
        let mut redis = self.redis.clone();
        let ids: Vec<String> = redis
            .zrange(self.keys.sessions(), 0, -1)
            .await
            .map_err(backend)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.keys.snapshot(id)).collect();
        let raws: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut redis)
            .await
            .map_err(backend)?;
        let mut out = Vec::with_capacity(raws.len());
        for raw in raws.into_iter().flatten() {
            let snapshot: Snapshot = serde_json::from_str(&raw).map_err(backend)?;
            if status.is_none_or(|wanted| snapshot.summary.status == wanted) {
                out.push(snapshot.summary);
            }
        }
        // The index is scored by last append (for the idle sweep); the list is by creation.
        sort_summaries(&mut out);
        Ok(out)
    }

    async fn take_expired(&self, ttl: Duration) -> Result<Vec<String>, StoreError> {
        let mut redis = self.redis.clone();
        let cutoff = now_ms().saturating_sub(ttl.as_millis() as u64);
        let ended = self.keys.ended();
        let mut ids: Vec<String> = redis
            .zrangebyscore(&ended, 0, cutoff)
            .await
            .map_err(backend)?;
        if self.keys.is_cluster() {
            ids = self.still_ended(ids).await?;
        }
        self.take(&ended, ids).await
    }

    async fn take_idle(&self, idle: Duration) -> Result<Vec<String>, StoreError> {
        let mut redis = self.redis.clone();
        let cutoff = now_ms().saturating_sub(idle.as_millis() as u64);
        let sessions = self.keys.sessions();
        let ids: Vec<String> = redis
            .zrangebyscore(&sessions, 0, cutoff)
            .await
            .map_err(backend)?;
        self.take(&sessions, ids).await
    }

    fn keeps_runs(&self) -> bool {
        true
    }

    /// The checkpoint expires with the session's other keys (the idle TTL), refreshed by
    /// every save; the index entry goes with [`SessionStore::drop_run`]. Two commands, not a
    /// transaction: the keys are in different slots under Redis Cluster, and an index entry
    /// whose checkpoint is gone reads as no checkpoint.
    async fn save_run(&self, session_id: &str, checkpoint: &[u8]) -> Result<(), StoreError> {
        let ttl_ms = u64::try_from(self.limits.idle_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut redis = self.redis.clone();
        let _: () = redis
            .pset_ex(self.keys.run(session_id), checkpoint, ttl_ms)
            .await
            .map_err(backend)?;
        let _: () = redis
            .sadd(self.keys.runs(), session_id)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn load_run(&self, session_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.keys.run(session_id);
        once_more(|| {
            let mut redis = self.redis.clone();
            let key = &key;
            async move { redis.get(key).await }
        })
        .await
        .map_err(backend)
    }

    async fn drop_run(&self, session_id: &str) -> Result<(), StoreError> {
        let mut redis = self.redis.clone();
        let _: () = redis
            .del(self.keys.run(session_id))
            .await
            .map_err(backend)?;
        let _: () = redis
            .srem(self.keys.runs(), session_id)
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn saved_runs(&self) -> Result<Vec<String>, StoreError> {
        let runs = self.keys.runs();
        once_more(|| {
            let mut redis = self.redis.clone();
            let runs = &runs;
            async move { redis.smembers(runs).await }
        })
        .await
        .map_err(backend)
    }
}

/// A cluster's index updates after a compare-and-set wrote a session's snapshot (what the
/// script does on one Redis): one `MULTI`, as both indexes share a slot ([`Keys::ended`]).
fn index_commands(
    keys: &Keys,
    session_id: &str,
    created: u64,
    ended: &str,
    ttl_ms: u64,
) -> redis::Pipeline {
    let ttl = i64::try_from(ttl_ms).unwrap_or(i64::MAX);
    let mut pipe = redis::pipe();
    pipe.atomic();
    pipe.cmd("ZADD")
        .arg(keys.sessions())
        .arg("NX")
        .arg(created)
        .arg(session_id)
        .ignore()
        .pexpire(keys.sessions(), ttl)
        .ignore();
    if ended.is_empty() {
        pipe.zrem(keys.ended(), session_id).ignore();
    } else {
        pipe.cmd("ZADD")
            .arg(keys.ended())
            .arg("NX")
            .arg(ended)
            .arg(session_id)
            .ignore()
            .pexpire(keys.ended(), ttl)
            .ignore();
    }
    pipe
}

impl RedisStore {
    /// Of `ids` (read from the ended index), those whose snapshot is still terminal (or
    /// gone); the others were reopened while their index entry lagged behind (cluster: the
    /// entry is updated after the snapshot), so their entry is dropped instead.
    async fn still_ended(&self, ids: Vec<String>) -> Result<Vec<String>, StoreError> {
        let mut ended = Vec::with_capacity(ids.len());
        for id in ids {
            let terminal = match self.get(&id).await? {
                Some(snapshot) => snapshot.summary.status.is_terminal(),
                None => true,
            };
            if terminal {
                ended.push(id);
            } else {
                let mut redis = self.redis.clone();
                let _: () = redis.zrem(self.keys.ended(), &id).await.map_err(backend)?;
            }
        }
        Ok(ended)
    }

    /// Removes the sessions `ids` from both indexes and their snapshots, naming those this
    /// node took: removing an id from `index` (ZREM) decides which node takes a session, so
    /// each is dropped once.
    async fn take(&self, index: &str, ids: Vec<String>) -> Result<Vec<String>, StoreError> {
        let mut redis = self.redis.clone();
        let mut taken = Vec::with_capacity(ids.len());
        for id in ids {
            let removed: i64 = redis.zrem(index, &id).await.map_err(backend)?;
            if removed == 1 {
                let _: () = redis
                    .del(&[self.keys.snapshot(&id), self.keys.snapshot_version(&id)])
                    .await
                    .map_err(backend)?;
                let _: () = redis
                    .zrem(self.keys.sessions(), &id)
                    .await
                    .map_err(backend)?;
                let _: () = redis.zrem(self.keys.ended(), &id).await.map_err(backend)?;
                taken.push(id);
            }
        }
        Ok(taken)
    }
}
