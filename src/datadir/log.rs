//! [`DiskLog`]: the event log in the data dir.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use fjall::PersistMode;

use super::{DataDir, Head, encode_event, idempotency_key, seq_key, seq_of, session_prefix};
use crate::event::EventDraft;
use crate::log::{
    AppendOutcome, Appended, Epoch, EventLog, LogError, LogHead, LogLimits, LogSlice, Numbered,
    Writer, number,
};

/// Idempotency keys remembered per session; the oldest are forgotten first (as in memory).
const MAX_KEYS_PER_SESSION: u64 = 10_000;

/// The log in the data dir. Every call runs on a blocking thread: the disk is waited for
/// there, never on the runtime's workers.
#[derive(Clone)]
pub struct DiskLog {
    dir: Arc<DataDir>,
    limits: LogLimits,
    /// Sessions with a log, for `max_sessions` (counted once at open).
    sessions: Arc<AtomicU64>,
}

impl DiskLog {
    pub(super) fn new(dir: Arc<DataDir>, limits: LogLimits) -> Result<Self, fjall::Error> {
        let sessions = dir.heads.len()? as u64;
        Ok(Self {
            dir,
            limits,
            sessions: Arc::new(AtomicU64::new(sessions)),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Self) -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        super::blocking(self, work, LogError::Backend).await
    }

    fn append_now(
        &self,
        session_id: &str,
        drafts: Vec<EventDraft>,
        writer: Writer,
    ) -> Result<AppendOutcome, LogError> {
        let dir = &self.dir;
        let lock = dir.lock_of(session_id);
        let _order = lock.lock().unwrap();
        let existing = dir.head(session_id).map_err(backend)?;
        let created = existing.is_none();
        if created && self.sessions.load(Ordering::Acquire) >= self.limits.max_sessions {
            return Err(LogError::TooManySessions {
                max: self.limits.max_sessions,
            });
        }
        let mut head = existing.unwrap_or_else(|| Head {
            epoch: Epoch::fresh().to_string(),
            last_seq: 0,
            first_seq: 1,
            bytes: 0,
            ended: false,
            keys: 0,
        });
        let known = |key: &str| -> Result<Option<u64>, LogError> {
            let found = dir
                .keys
                .get(idempotency_key(session_id, key))
                .map_err(backend)?;
            Ok(found.as_deref().and_then(seq_of))
        };
        if writer == Writer::Producer && head.ended {
            let mut has_new = false;
            for draft in &drafts {
                has_new |= match &draft.idempotency_key {
                    Some(key) => known(key)?.is_none(),
                    None => true,
                };
            }
            if has_new {
                return Err(LogError::SessionEnded(session_id.to_owned()));
            }
        }
        let mut batch = dir.keyspace.batch().durability(Some(PersistMode::SyncAll));
        let Numbered {
            appended,
            seqs,
            new_keys,
            last_seq: next,
            ends,
        } = number(session_id, drafts, head.last_seq, known)?;
        for (key, seq) in &new_keys {
            batch.insert(
                &dir.keys,
                idempotency_key(session_id, key),
                seq.to_be_bytes(),
            );
            batch.insert(&dir.key_order, seq_key(session_id, *seq), key.as_bytes());
        }
        head.bytes += appended
            .iter()
            .map(|a| a.event.json.get().len() as u64)
            .sum::<u64>();
        head.keys += new_keys.len() as u64;
        self.forget_oldest_keys(session_id, &mut head, &mut batch)?;
        head.last_seq = next;
        head.ended = ends || (head.ended && writer != Writer::Reopening);
        self.trim(session_id, &mut head, &appended, &mut batch)?;
        // After the trim, so that no key is both written and removed by one batch.
        for new in appended.iter().filter(|a| a.event.seq >= head.first_seq) {
            batch.insert(
                &dir.events,
                seq_key(session_id, new.event.seq),
                encode_event(&new.event),
            );
        }
        batch.insert(
            &dir.heads,
            session_id,
            serde_json::to_vec(&head).map_err(LogError::Serialize)?,
        );
        batch.commit().map_err(backend)?;
        if created {
            self.sessions.fetch_add(1, Ordering::AcqRel);
        }
        let duplicates = seqs.len() - appended.len();
        let epoch = epoch_of(&head)?;
        Ok(AppendOutcome {
            appended,
            seqs,
            duplicates,
            epoch,
            last_seq: head.last_seq,
            first_seq: head.first_seq,
        })
    }

    /// Drops the oldest retained events beyond the limits; the newest always stays. The
    /// oldest may be this batch's own (`appended`), not in the store yet.
    fn trim(
        &self,
        session_id: &str,
        head: &mut Head,
        appended: &[Appended],
        batch: &mut fjall::Batch,
    ) -> Result<(), LogError> {
        while head.first_seq < head.last_seq
            && (head.last_seq - head.first_seq + 1 > self.limits.max_events
                || head.bytes > self.limits.max_bytes)
        {
            let seq = head.first_seq;
            let key = seq_key(session_id, seq);
            // This batch's own events are not written at all (see the caller).
            let size = match appended.iter().find(|a| a.event.seq == seq) {
                Some(new) => new.event.json.get().len() as u64,
                None => {
                    let size = self.dir.events.size_of(&key).map_err(backend)?;
                    batch.remove(&self.dir.events, key);
                    size.map_or(0, |size| u64::from(size).saturating_sub(1))
                }
            };
            head.bytes = head.bytes.saturating_sub(size);
            head.first_seq += 1;
        }
        Ok(())
    }

    fn forget_oldest_keys(
        &self,
        session_id: &str,
        head: &mut Head,
        batch: &mut fjall::Batch,
    ) -> Result<(), LogError> {
        if head.keys <= MAX_KEYS_PER_SESSION {
            return Ok(());
        }
        let excess = usize::try_from(head.keys - MAX_KEYS_PER_SESSION).unwrap_or(usize::MAX);
        for pair in self
            .dir
            .key_order
            .prefix(session_prefix(session_id))
            .take(excess)
        {
            let (order_key, key) = pair.map_err(backend)?;
            let mut stored = session_prefix(session_id);
            stored.extend_from_slice(&key);
            batch.remove(&self.dir.keys, stored);
            batch.remove(&self.dir.key_order, order_key);
            head.keys -= 1;
        }
        Ok(())
    }

    fn remove_now(&self, session_id: &str) -> Result<(), LogError> {
        let dir = &self.dir;
        let lock = dir.lock_of(session_id);
        let _order = lock.lock().unwrap();
        if dir.head(session_id).map_err(backend)?.is_none() {
            return Ok(());
        }
        let prefix = session_prefix(session_id);
        let mut batch = dir.keyspace.batch().durability(Some(PersistMode::SyncAll));
        for partition in [&dir.events, &dir.keys, &dir.key_order] {
            for pair in partition.prefix(&prefix) {
                batch.remove(partition, pair.map_err(backend)?.0);
            }
        }
        batch.remove(&dir.heads, session_id);
        batch.commit().map_err(backend)?;
        self.sessions.fetch_sub(1, Ordering::AcqRel);
        drop(_order);
        dir.forget_lock(session_id);
        Ok(())
    }
}

fn backend(error: fjall::Error) -> LogError {
    LogError::Backend(format!("data dir: {error}"))
}

fn epoch_of(head: &Head) -> Result<Epoch, LogError> {
    Epoch::parse(&head.epoch).ok_or_else(|| LogError::Backend("data dir: an empty epoch".into()))
}

pub(super) fn log_head(head: Option<&Head>) -> Result<LogHead, LogError> {
    Ok(match head {
        Some(head) => LogHead {
            last_seq: head.last_seq,
            first_seq: head.first_seq,
            epoch: Some(epoch_of(head)?),
        },
        None => LogHead::unwritten(),
    })
}

#[async_trait]
impl EventLog for DiskLog {
    async fn append_as(
        &self,
        session_id: &str,
        drafts: Vec<EventDraft>,
        writer: Writer,
    ) -> Result<AppendOutcome, LogError> {
        let session_id = session_id.to_owned();
        self.blocking(move |log| log.append_now(&session_id, drafts, writer))
            .await
    }

    async fn head(&self, session_id: &str) -> Result<LogHead, LogError> {
        let session_id = session_id.to_owned();
        self.blocking(move |log| log_head(log.dir.head(&session_id).map_err(backend)?.as_ref()))
            .await
    }

    async fn read(&self, session_id: &str, after: u64, limit: usize) -> Result<LogSlice, LogError> {
        let session_id = session_id.to_owned();
        self.blocking(move |log| {
            // Head and events from one consistent view: appends to the session wait.
            let lock = log.dir.lock_of(&session_id);
            let _order = lock.lock().unwrap();
            let head = log.dir.head(&session_id).map_err(backend)?;
            let head = log_head(head.as_ref())?;
            let from = after.max(head.first_seq.saturating_sub(1));
            let events = if head.epoch.is_some() {
                log.dir
                    .events_after(&session_id, from, limit)
                    .map_err(backend)?
            } else {
                Vec::new()
            };
            Ok(LogSlice { head, events })
        })
        .await
    }

    async fn remove(&self, session_id: &str) -> Result<(), LogError> {
        let session_id = session_id.to_owned();
        self.blocking(move |log| log.remove_now(&session_id)).await
    }
}
