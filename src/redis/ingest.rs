//! Worker ingest through Redis: the [`Keys::ingest`] stream (`<prefix>:ingest`).
//!
//! A worker `XADD`s an entry with one field, `payload`, holding
//! `{ "sessionId", "event", "data", "idempotencyKey"? }` or
//! `{ "sessionId", "events": [{ "event", "data", "idempotencyKey"? }, …] }` (a batch,
//! all-or-nothing and at most `--max-batch` long, like the HTTP route: both are parsed by
//! [`crate::intake`]).
//!
//! **Order.** Entries are handled in stream order by one node at a time, the holder of the
//! [`Keys::ingest_lease`] key, renewed before every entry; a holder that finds its lease
//! taken stops at once. The next holder handles, before anything unread: the entries it
//! took itself and has not acknowledged, then the entries a former holder took and left,
//! once they have been idle for a whole lease (that holder may still be busy with them
//! until its lease ran out); while a former holder's entry is not yet idle that long it
//! reads nothing newer.
//!
//! **Nothing acknowledged is lost.** An entry is acknowledged (and deleted, so the stream
//! stays as short as the backlog) only once its events are logged, or once it is refused.
//! Refused entries (invalid, see [`crate::intake::IntakeError`]) are described in
//! [`Keys::ingest_errors`] (`entry`, `code`, `error`). An entry whose logging fails for a
//! backend error stays unacknowledged and is retried with backoff, and nothing after it is
//! handled meanwhile. An item without an idempotency key gets herald's own
//! `herald:ingest:<entry id>[:<index>]` ([`crate::intake::ingest_key`]), so an entry handled
//! twice (by a holder that lost its lease mid-entry, and its successor) is logged once.

use std::sync::Arc;
use std::time::Duration;

use redis::Value as RedisValue;
use tokio_util::sync::CancellationToken;

use super::{Connection, Keys, Lease, Redis};
use crate::auth::Principal;
use crate::error::ErrorCode;
use crate::event::EventDraft;
use crate::hub::{Hub, HubError};
use crate::intake::{self, IntakeError, Runs};
use crate::log::{LogError, Writer};
use crate::store::StoreError;

const GROUP: &str = Keys::INGEST_GROUP;
const BATCH: usize = 100;
const BLOCK: Duration = Duration::from_secs(2);
/// How often a holder looks again at a former holder's entries that are not yet idle for
/// a whole lease.
const CLAIM_POLL: Duration = Duration::from_millis(200);
/// Backoff of a failing entry's retries; the longest wait is also at most a third of the
/// lease, so the holder keeps its lease while it retries.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_secs(2);
/// Refusals kept for inspection.
const MAX_ERRORS: usize = 1000;

/// One consumer of the ingest stream: this node's view of it.
pub struct Ingest {
    pub redis: Redis,
    pub keys: Keys,
    /// This node's consumer name (its node id).
    pub consumer: String,
    pub hub: Hub,
    /// Sessions herald runs take no producer events.
    pub runs: Arc<dyn Runs>,
    pub max_batch: usize,
    /// `--max-event-bytes`.
    pub max_event_bytes: u64,
    /// How long the lease lasts without renewal, and how long a former holder's entry must
    /// have been idle before it is claimed.
    pub lease: Duration,
    /// Shutdown: the consumer stops between entries and hands the lease back.
    pub stop: CancellationToken,
}

/// A refused entry's code and the reason recorded in the errors stream.
type Refusal = (ErrorCode, String);

/// Why an entry was not logged.
enum Failure {
    /// The entry is invalid: it is described in the errors stream and acknowledged.
    Refused(Refusal),
    /// The backend failed: the entry is retried.
    Transient(HubError),
}

impl From<HubError> for Failure {
    fn from(error: HubError) -> Self {
        match error {
            HubError::Log(LogError::Backend(_)) | HubError::Store(StoreError::Backend(_)) => {
                Failure::Transient(error)
            }
            // Refused by a limit or the session's state: the stream moves on (an entry
            // held back would hold back every entry behind it).
            HubError::Log(LogError::TooManySessions { .. }) => {
                Failure::Refused((ErrorCode::TooManySessions, error.to_string()))
            }
            HubError::Log(LogError::SessionEnded(_)) => {
                Failure::Refused((ErrorCode::SessionEnded, error.to_string()))
            }
            // An event that cannot be serialized never will be.
            other => Failure::Refused((ErrorCode::InvalidEvent, other.to_string())),
        }
    }
}

fn refusal(error: IntakeError) -> Refusal {
    let reason = match &error {
        IntakeError::InvalidJson(_) => format!("invalid payload: {error}"),
        _ => error.to_string(),
    };
    (error.code(), reason)
}

/// An entry: its id and its fields, `None` when it was deleted while pending.
type Entry = (String, Option<Vec<(String, String)>>);

impl Ingest {
    fn stream(&self) -> String {
        self.keys.ingest()
    }

    /// Reads and logs the stream until `stop` (between two entries).
    pub async fn consume(self) {
        while !self.stop.is_cancelled() {
            if let Err(error) = self.consume_until_error().await {
                tracing::warn!(stream = self.stream(), %error, "ingest stream failed; retrying");
                let _ = self
                    .stop
                    .run_until_cancelled(tokio::time::sleep(Duration::from_secs(1)))
                    .await;
            }
        }
    }

    async fn consume_until_error(&self) -> redis::RedisResult<()> {
        // The blocking read waits up to BLOCK for entries: the reply timeout must be longer.
        let mut redis = self.redis.connect_blocking(BLOCK * 3).await?;
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg(&["CREATE", &self.stream(), GROUP, "0", "MKSTREAM"])
            .query_async(&mut redis)
            .await;
        if let Err(error) = created
            && error.code() != Some("BUSYGROUP")
        {
            return Err(error);
        }
        loop {
            if self.stop.is_cancelled() {
                return self.release_lease(&mut redis).await;
            }
            if !self.renew_lease(&mut redis).await? {
                let _ = self
                    .stop
                    .run_until_cancelled(tokio::time::sleep(BLOCK))
                    .await;
                continue;
            }
            // Reading may be given up at shutdown: what was read stays pending for this
            // consumer's successor, which claims it after a lease.
            let Some(entries) = self
                .stop
                .run_until_cancelled(self.next_entries(&mut redis))
                .await
                .transpose()?
            else {
                continue;
            };
            for (id, fields) in entries {
                // An entry is never left half handled: shutdown waits for it, then stops.
                if self.stop.is_cancelled() {
                    break;
                }
                if !self.renew_lease(&mut redis).await? {
                    tracing::info!("lost the ingest lease; another node goes on");
                    break;
                }
                let handled = match fields {
                    Some(fields) => self.handle_until_done(&mut redis, &id, &fields).await?,
                    None => {
                        self.acknowledge(&mut redis, &id, None).await?;
                        true
                    }
                };
                if !handled {
                    break;
                }
            }
        }
    }

    fn lease(&self) -> Lease {
        Lease {
            key: self.keys.ingest_lease(),
            holder: self.consumer.clone(),
            ttl: self.lease,
        }
    }

    /// Gives the lease back, if this node holds it, so another node goes on at once.
    async fn release_lease(&self, redis: &mut Connection) -> redis::RedisResult<()> {
        self.lease().release(redis).await?;
        tracing::info!("stopped consuming the ingest stream");
        Ok(())
    }

    /// Takes or renews the lease; whether this node holds it.
    async fn renew_lease(&self, redis: &mut Connection) -> redis::RedisResult<bool> {
        self.lease().renew(redis).await
    }

    /// The next entries to handle, oldest first (see the module docs for the order).
    async fn next_entries(&self, redis: &mut Connection) -> redis::RedisResult<Vec<Entry>> {
        let stream = self.stream();
        // Ours, taken earlier and not acknowledged (a backend failure, a lost connection).
        let own: RedisValue = redis::cmd("XREADGROUP")
            .arg(&["GROUP", GROUP, &self.consumer, "COUNT"])
            .arg(BATCH)
            .arg(&["STREAMS", &stream, "0"])
            .query_async(redis)
            .await?;
        let own = read_entries(own);
        if !own.is_empty() {
            return Ok(own);
        }
        // A former holder's, once it cannot be busy with them any more.
        let claimed: RedisValue = redis::cmd("XAUTOCLAIM")
            .arg(&stream)
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(self.lease.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(BATCH)
            .query_async(redis)
            .await?;
        let claimed = claimed_entries(claimed);
        if !claimed.is_empty() {
            return Ok(claimed);
        }
        // A former holder's that are not idle long enough yet come before anything unread.
        let (pending, ..): (u64, RedisValue, RedisValue, RedisValue) = redis::cmd("XPENDING")
            .arg(&stream)
            .arg(GROUP)
            .query_async(redis)
            .await?;
        if pending > 0 {
            tokio::time::sleep(CLAIM_POLL).await;
            return Ok(Vec::new());
        }
        let read: RedisValue = redis::cmd("XREADGROUP")
            .arg(&["GROUP", GROUP, &self.consumer, "COUNT"])
            .arg(BATCH)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg(&["STREAMS", &stream, ">"])
            .query_async(redis)
            .await?;
        Ok(read_entries(read))
    }

    /// Logs an entry's events unless herald runs their session itself.
    async fn log(&self, session_id: &str, drafts: &[EventDraft]) -> Result<(), Failure> {
        match intake::admit(&*self.runs, session_id, &Principal::anonymous()).await {
            Ok(()) => {}
            Err(IntakeError::Backend(message)) => {
                return Err(Failure::Transient(HubError::Log(LogError::Backend(
                    message,
                ))));
            }
            Err(refused) => return Err(Failure::Refused(refusal(refused))),
        }
        self.hub
            .publish_as(session_id, drafts.to_vec(), Writer::Producer)
            .await
            .map(drop)
            .map_err(Failure::from)
    }

    /// Logs one entry, retrying backend failures with backoff until it is logged or refused
    /// (then acknowledged), or until this node loses the lease (`false`: left pending for
    /// the next holder).
    async fn handle_until_done(
        &self,
        redis: &mut Connection,
        id: &str,
        fields: &[(String, String)],
    ) -> redis::RedisResult<bool> {
        let parsed = parse(id, fields, self.max_batch).and_then(|(session_id, drafts)| {
            intake::check_event_sizes(&drafts, self.max_event_bytes).map_err(refusal)?;
            Ok((session_id, drafts))
        });
        let last_retry = LAST_RETRY.min(self.lease / 3);
        let mut backoff = FIRST_RETRY.min(last_retry);
        loop {
            let outcome = match &parsed {
                Ok((session_id, drafts)) => self.log(session_id, drafts).await,
                Err(refused) => Err(Failure::Refused(refused.clone())),
            };
            match outcome {
                Ok(()) => {
                    self.acknowledge(redis, id, None).await?;
                    return Ok(true);
                }
                Err(Failure::Refused((code, reason))) => {
                    tracing::warn!(entry = id, %code, reason, "refused an ingest entry");
                    self.acknowledge(redis, id, Some((code, &reason))).await?;
                    return Ok(true);
                }
                Err(Failure::Transient(error)) => {
                    self.hub.metrics().ingest_retries.inc();
                    tracing::warn!(entry = id, %error, retry_in = ?backoff, "could not log an ingest entry");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(last_retry);
                    // At shutdown a failing entry stays pending for the next holder.
                    if self.stop.is_cancelled() || !self.renew_lease(redis).await? {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// Acknowledges and deletes an entry, with its refusal (code, reason) recorded in the
    /// errors stream in the same transaction.
    async fn acknowledge(
        &self,
        redis: &mut Connection,
        id: &str,
        refusal: Option<(ErrorCode, &str)>,
    ) -> redis::RedisResult<()> {
        let stream = self.stream();
        let mut pipe = redis::pipe();
        pipe.atomic();
        if let Some((code, reason)) = refusal {
            pipe.cmd("XADD")
                .arg(self.keys.ingest_errors())
                .arg("MAXLEN")
                .arg("~")
                .arg(MAX_ERRORS)
                .arg("*")
                .arg(&["entry", id, "code", code.as_str(), "error", reason])
                .ignore();
        }
        pipe.cmd("XACK")
            .arg(&stream)
            .arg(GROUP)
            .arg(id)
            .ignore()
            .cmd("XDEL")
            .arg(&stream)
            .arg(id)
            .ignore();
        pipe.query_async(redis).await
    }
}

/// An entry's session and validated drafts (with herald's default idempotency keys), or
/// the code and reason of its refusal.
fn parse(
    id: &str,
    fields: &[(String, String)],
    max_batch: usize,
) -> Result<(String, Vec<EventDraft>), Refusal> {
    let payload = fields
        .iter()
        .find(|(name, _)| name == "payload")
        .map(|(_, value)| value)
        .ok_or((
            ErrorCode::InvalidEntry,
            "the entry has no `payload` field".to_owned(),
        ))?;
    let (session_id, mut drafts) =
        intake::parse_stream_payload(payload, max_batch).map_err(refusal)?;
    let single = drafts.len() == 1;
    for (index, draft) in drafts.iter_mut().enumerate() {
        if draft.idempotency_key.is_none() {
            let index = (!single).then_some(index);
            draft.idempotency_key = Some(intake::ingest_key(id, index));
        }
    }
    Ok((session_id, drafts))
}

/// `XREADGROUP`: nil, or `[[stream, [[id, [field, value, …] | nil], …]]]`.
fn read_entries(value: RedisValue) -> Vec<Entry> {
    let streams: Option<Vec<(String, Vec<RedisValue>)>> =
        redis::from_redis_value(value).ok().flatten();
    streams
        .into_iter()
        .flatten()
        .flat_map(|(_, entries)| entries)
        .filter_map(entry)
        .collect()
}

/// `XAUTOCLAIM`: `[next id, [[id, fields], …], deleted ids]`. (Entries deleted while
/// pending are dropped from the pending list by Redis itself.)
fn claimed_entries(value: RedisValue) -> Vec<Entry> {
    let RedisValue::Array(mut parts) = value else {
        return Vec::new();
    };
    if parts.len() < 2 {
        return Vec::new();
    }
    let RedisValue::Array(entries) = parts.swap_remove(1) else {
        return Vec::new();
    };
    entries.into_iter().filter_map(entry).collect()
}

/// One entry; its fields are nil when it was deleted (trimmed) while pending.
fn entry(value: RedisValue) -> Option<Entry> {
    let (id, fields): (String, Option<Vec<String>>) = redis::from_redis_value(value).ok()?;
    let pairs = fields.map(|fields| {
        fields
            .chunks(2)
            .filter(|p| p.len() == 2)
            .map(|p| (p[0].clone(), p[1].clone()))
            .collect()
    });
    Some((id, pairs))
}
