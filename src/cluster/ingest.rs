//! Worker ingest through Redis: the `{prefix}:ingest` stream.
//!
//! A worker `XADD`s an entry with one field, `payload`, holding
//! `{ "sessionId", "event", "data", "idempotencyKey"? }` or
//! `{ "sessionId", "events": [{ "event", "data", "idempotencyKey"? }, …] }` (a batch,
//! all-or-nothing, like the HTTP route). Entries are handled in stream order by one node at
//! a time, the holder of the `{prefix}:ingest:lease` key (so a worker's events keep their
//! order); when the holder stops renewing it, another node takes the lease and first
//! claims the entries the old holder took but never acknowledged. An item without an
//! idempotency key gets `redis:<entry id>[:<index>]`, so an entry handled twice is still
//! logged once.
//! Refused entries are acknowledged and described in `{prefix}:ingest:errors`. Handled
//! entries are deleted from the stream.

use std::time::Duration;

use redis::Value as RedisValue;
use serde::Deserialize;
use serde_json::Value;

use crate::event::{IngestItem, validate_item, validate_session_id};
use crate::hub::Hub;

pub const GROUP: &str = "herald";
/// How long the ingest lease lasts without renewal.
pub const LEASE: Duration = Duration::from_secs(10);
/// Renews the lease if `ARGV[1]` holds it or nobody does; 1 when it is ours.
const TAKE_LEASE: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;
const BATCH: usize = 100;
const BLOCK: Duration = Duration::from_secs(2);
/// Refusals kept for inspection.
const MAX_ERRORS: usize = 1000;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    session_id: Value,
    #[serde(flatten)]
    body: Body,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Body {
    Batch { events: Vec<IngestItem> },
    One(IngestItem),
}

/// Reads and logs the stream until the task is aborted.
pub async fn consume(client: redis::Client, prefix: String, consumer: String, hub: Hub) {
    let stream = format!("{prefix}:ingest");
    let errors = format!("{prefix}:ingest:errors");
    let lease = format!("{prefix}:ingest:lease");
    loop {
        if let Err(error) =
            consume_until_error(&client, &stream, &errors, &lease, &consumer, &hub).await
        {
            tracing::warn!(stream, %error, "ingest stream failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

async fn consume_until_error(
    client: &redis::Client,
    stream: &str,
    errors: &str,
    lease: &str,
    consumer: &str,
    hub: &Hub,
) -> redis::RedisResult<()> {
    let take_lease = redis::Script::new(TAKE_LEASE);
    // The blocking read waits up to BLOCK for entries: the reply timeout must be longer.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(BLOCK * 3));
    let mut redis = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg(&["CREATE", stream, GROUP, "0", "MKSTREAM"])
        .query_async(&mut redis)
        .await;
    if let Err(error) = created
        && error.code() != Some("BUSYGROUP")
    {
        return Err(error);
    }
    loop {
        let ours: i64 = take_lease
            .key(lease)
            .arg(consumer)
            .arg(LEASE.as_millis() as u64)
            .invoke_async(&mut redis)
            .await?;
        if ours == 0 {
            tokio::time::sleep(BLOCK).await;
            continue;
        }
        // Entries taken but never acknowledged (by a holder that was lost) come first:
        // they are older than anything not yet read.
        let claimed: RedisValue = redis::cmd("XAUTOCLAIM")
            .arg(stream)
            .arg(GROUP)
            .arg(consumer)
            .arg(0)
            .arg("0-0")
            .arg("COUNT")
            .arg(BATCH)
            .query_async(&mut redis)
            .await?;
        let mut entries = claimed_entries(claimed);
        if entries.is_empty() {
            let read: RedisValue = redis::cmd("XREADGROUP")
                .arg(&["GROUP", GROUP, consumer, "COUNT"])
                .arg(BATCH)
                .arg("BLOCK")
                .arg(BLOCK.as_millis() as u64)
                .arg(&["STREAMS", stream, ">"])
                .query_async(&mut redis)
                .await?;
            entries = read_entries(read);
        }
        for (id, fields) in entries {
            if let Err(reason) = handle(hub, &id, &fields).await {
                tracing::warn!(entry = id, reason, "refused an ingest entry");
                let _: RedisValue = redis::cmd("XADD")
                    .arg(errors)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(MAX_ERRORS)
                    .arg("*")
                    .arg(&["entry", id.as_str(), "error", reason.as_str()])
                    .query_async(&mut redis)
                    .await?;
            }
            // Handled entries leave the stream, so it stays as short as the backlog.
            let _: RedisValue = redis::pipe()
                .cmd("XACK")
                .arg(stream)
                .arg(GROUP)
                .arg(&id)
                .cmd("XDEL")
                .arg(stream)
                .arg(&id)
                .query_async(&mut redis)
                .await?;
        }
    }
}

/// Validates one entry and logs its events; the error says why an entry was refused.
async fn handle(hub: &Hub, id: &str, fields: &[(String, String)]) -> Result<(), String> {
    let payload = fields
        .iter()
        .find(|(name, _)| name == "payload")
        .map(|(_, value)| value)
        .ok_or("the entry has no `payload` field")?;
    let entry: Entry =
        serde_json::from_str(payload).map_err(|e| format!("invalid payload: {e}"))?;
    let session_id = entry
        .session_id
        .as_str()
        .ok_or("`sessionId` must be a string")?
        .to_owned();
    validate_session_id(&session_id).map_err(|e| e.to_string())?;
    let items = match entry.body {
        Body::One(item) => vec![item],
        Body::Batch { events } if events.is_empty() => return Err("the batch has no events".into()),
        Body::Batch { events } => events,
    };
    let single = items.len() == 1;
    let mut drafts = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let mut draft =
            validate_item(&session_id, item).map_err(|e| format!("item {index}: {e}"))?;
        if draft.idempotency_key.is_none() {
            draft.idempotency_key = Some(if single {
                format!("redis:{id}")
            } else {
                format!("redis:{id}:{index}")
            });
        }
        drafts.push(draft);
    }
    hub.publish(&session_id, drafts)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

type Entries = Vec<(String, Vec<(String, String)>)>;

/// `XREADGROUP`: nil, or `[[stream, [[id, [field, value, …]], …]]]`.
fn read_entries(value: RedisValue) -> Entries {
    let streams: Option<Vec<(String, Vec<RedisValue>)>> =
        redis::from_redis_value(value).ok().flatten();
    streams
        .into_iter()
        .flatten()
        .flat_map(|(_, entries)| entries)
        .filter_map(entry)
        .collect()
}

/// `XAUTOCLAIM`: `[next id, [[id, fields], …], deleted ids]`.
fn claimed_entries(value: RedisValue) -> Entries {
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

fn entry(value: RedisValue) -> Option<(String, Vec<(String, String)>)> {
    let (id, fields): (String, Vec<String>) = redis::from_redis_value(value).ok()?;
    let pairs = fields
        .chunks(2)
        .filter(|p| p.len() == 2)
        .map(|p| (p[0].clone(), p[1].clone()))
        .collect();
    Some((id, pairs))
}
