//! Session snapshots in Redis, shared by every node.
//!
//! [`Keys::snapshot`] holds a session's snapshot as JSON, [`Keys::sessions`] indexes
//! sessions by creation time and [`Keys::ended`] ended ones by the time they ended. Nodes append to a
//! session's log concurrently, so a node folds its events into the stored snapshot with a
//! compare-and-set, first folding from the log any earlier events another node has not
//! folded yet: the stored snapshot always describes a prefix of the log, in order.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use super::{Keys, connect, once_more};
use crate::event::{SessionStatus, now_timestamp};
use crate::log::{Appended, Epoch, EventLog};
use crate::store::{Origin, SessionStore, SessionSummary, Snapshot, StoreError};

/// KEYS: snapshot, sessions index, ended index. ARGV: the JSON read (`""` if none), the
/// JSON to write, session id, created (ms), ended (ms, or `""` while running).
const COMPARE_AND_SET: &str = r#"
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'NX', ARGV[4], ARGV[3])
if ARGV[5] ~= '' then
  redis.call('ZADD', KEYS[3], 'NX', ARGV[5], ARGV[3])
else
  redis.call('ZREM', KEYS[3], ARGV[3])
end
return 1
"#;

/// Folds racing with other nodes give up after this many tries (each try means another
/// node made progress, so this is never reached in practice).
const MAX_TRIES: usize = 64;

pub struct RedisStore {
    redis: ConnectionManager,
    keys: Keys,
    log: Arc<dyn EventLog>,
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
    pub async fn connect(
        url: &str,
        prefix: &str,
        log: Arc<dyn EventLog>,
    ) -> Result<Self, StoreError> {
        let (_, redis) = connect(url).await.map_err(backend)?;
        Ok(Self {
            redis,
            keys: Keys::new(prefix),
            log,
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

    /// Stores `snapshot` if the stored one is still `read` (`None`: there was none), keeping
    /// the indexes in step; false when another node wrote in between.
    async fn write(
        &self,
        session_id: &str,
        read: Option<&str>,
        snapshot: &Snapshot,
    ) -> Result<bool, StoreError> {
        let ended = if snapshot.summary.status.is_terminal() {
            now_ms().to_string()
        } else {
            String::new()
        };
        let mut invocation = self.compare_and_set.prepare_invoke();
        invocation
            .key(self.keys.snapshot(session_id))
            .key(self.keys.sessions())
            .key(self.keys.ended())
            .arg(read.unwrap_or(""))
            .arg(serde_json::to_string(snapshot).map_err(backend)?)
            .arg(session_id)
            .arg(now_ms())
            .arg(ended);
        // A compare-and-set is safe to repeat: if the first went through, the second
        // finds the snapshot changed and the fold starts over.
        let written: i64 = once_more(|| {
            let mut redis = self.redis.clone();
            let invocation = &invocation;
            async move { invocation.invoke_async(&mut redis).await }
        })
        .await
        .map_err(backend)?;
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
            let raw = self.read_raw(session_id).await?;
            let mut snapshot = match &raw {
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
                snapshot.apply(&missing, epoch);
            }
            // The fold skips what it already has (another node may have folded some).
            snapshot.apply(events, epoch);
            if self.write(session_id, raw.as_deref(), &snapshot).await? {
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
            let Some(raw) = self.read_raw(session_id).await? else {
                return Ok(());
            };
            let mut snapshot: Snapshot = serde_json::from_str(&raw).map_err(backend)?;
            origin.apply_to(&mut snapshot);
            if self.write(session_id, Some(&raw), &snapshot).await? {
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
        Ok(out)
    }

    async fn take_expired(&self, ttl: Duration) -> Result<Vec<String>, StoreError> {
        let mut redis = self.redis.clone();
        let cutoff = now_ms().saturating_sub(ttl.as_millis() as u64);
        let ended = self.keys.ended();
        let ids: Vec<String> = redis
            .zrangebyscore(&ended, 0, cutoff)
            .await
            .map_err(backend)?;
        let mut taken = Vec::with_capacity(ids.len());
        for id in ids {
            // ZREM decides which node takes a session, so each is dropped once.
            let removed: i64 = redis.zrem(&ended, &id).await.map_err(backend)?;
            if removed == 1 {
                let _: () = redis.del(self.keys.snapshot(&id)).await.map_err(backend)?;
                let _: () = redis
                    .zrem(self.keys.sessions(), &id)
                    .await
                    .map_err(backend)?;
                taken.push(id);
            }
        }
        Ok(taken)
    }
}
