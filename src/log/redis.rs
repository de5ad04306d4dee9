//! The event log in Redis, shared by every node.
//!
//! Per session: a hash `{prefix}:head:{id}` (`seq`, `epoch`), a stream `{prefix}:log:{id}`
//! whose entry ids are `{seq}-1` and whose fields are `k` (event name) and `d` (the
//! serialized payload), and a sorted set `{prefix}:keys:{id}` of idempotency keys scored
//! by the `seq` they were first given. One Lua script appends a batch atomically: it is the
//! single sequencer of the session for the whole cluster. The head hash is the incarnation:
//! when it is missing the script starts a new one (fresh epoch, seq 1) and drops whatever
//! stream and keys an earlier one left behind. Events are serialized on the node
//! around a gap where `seq` goes, and the script splices the number in, so the payload
//! stays byte-for-byte what the producer sent (Redis' own JSON would reformat numbers).

use std::sync::Arc;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script, Value as RedisValue};
use serde_json::value::RawValue;

use super::{AppendOutcome, Appended, Epoch, EventLog, LogError, LogHead, LogSlice, LoggedEvent};
use crate::event::{EventDraft, EventKind, finalize_body, with_identity};

/// Idempotency keys remembered per session; the oldest are forgotten first.
const MAX_KEYS_PER_SESSION: usize = 10_000;

/// KEYS: head, log, idempotency keys. ARGV: max events, max keys, a fresh epoch, the
/// notification channel, the session id, then per event: name, idempotency key ("" for
/// none), payload before `seq`, payload after `seq`. Returns `{ epoch, last_seq, seqs,
/// retained }` (numbers as decimal strings, so that Lua's float formatting never shows; a
/// duplicate's seq negated), and publishes `"<last_seq> <epoch> <session id>"` on the
/// channel when anything was logged, so every node can deliver the new events.
const APPEND: &str = r#"
local head, log, keys = KEYS[1], KEYS[2], KEYS[3]
local max_events, max_keys = tonumber(ARGV[1]), tonumber(ARGV[2])
local epoch = redis.call('HGET', head, 'epoch')
if not epoch then
  -- A new incarnation. What an earlier one left (its head lost: evicted, deleted) goes, or
  -- the stream's ids would no longer grow from 1 and its keys would hide new events.
  redis.call('DEL', log, keys)
  epoch = ARGV[3]
  redis.call('HSET', head, 'epoch', epoch, 'seq', 0)
end
local seq = tonumber(redis.call('HGET', head, 'seq'))
local first = seq
local seqs = {}
for i = 6, #ARGV, 4 do
  local name, key, before, after = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local seen = false
  if key ~= '' then
    seen = redis.call('ZSCORE', keys, key)
  end
  if seen then
    table.insert(seqs, '-' .. seen)
  else
    seq = seq + 1
    local n = string.format('%d', seq)
    redis.call('XADD', log, n .. '-1', 'k', name, 'd', before .. n .. after)
    if key ~= '' then
      redis.call('ZADD', keys, n, key)
      local excess = redis.call('ZCARD', keys) - max_keys
      if excess > 0 then redis.call('ZREMRANGEBYRANK', keys, 0, excess - 1) end
    end
    table.insert(seqs, n)
  end
end
redis.call('HSET', head, 'seq', seq)
-- One exact trim per batch: trimming on every XADD cost more than the XADD itself.
if seq > first then redis.call('XTRIM', log, 'MAXLEN', max_events) end
local last = string.format('%d', seq)
if seq > first then
  redis.call('PUBLISH', ARGV[4], last .. ' ' .. epoch .. ' ' .. ARGV[5])
end
return { epoch, last, seqs, redis.call('XLEN', log) }
"#;

pub struct RedisLog {
    redis: ConnectionManager,
    prefix: Arc<str>,
    max_events: u64,
    append: Script,
}

impl RedisLog {
    /// Connects (the connection manager reconnects by itself after Redis restarts).
    pub async fn connect(url: &str, prefix: &str, max_events: u64) -> Result<Self, LogError> {
        let (_, redis) = connect(url).await.map_err(backend)?;
        Ok(Self {
            redis,
            prefix: prefix.into(),
            max_events: max_events.max(1),
            append: Script::new(APPEND),
        })
    }

    fn key(&self, kind: &str, session_id: &str) -> String {
        format!("{}:{kind}:{session_id}", self.prefix)
    }

    /// Runs a read-only pipeline, once more over the reconnected link if the first went out
    /// on a dead one.
    async fn query<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, LogError> {
        once_more(|| {
            let mut redis = self.redis.clone();
            async move { pipe.query_async(&mut redis).await }
        })
        .await
        .map_err(backend)
    }

    /// Where appends are announced ([`Announcement`]).
    pub fn channel(&self) -> String {
        announcement_channel(&self.prefix)
    }

    /// The keys that make up a session's log, for expiry and removal.
    pub fn session_keys(&self, session_id: &str) -> [String; 3] {
        [
            self.key("head", session_id),
            self.key("log", session_id),
            self.key("keys", session_id),
        ]
    }
}

/// The channel every append under `prefix` is announced on.
pub fn announcement_channel(prefix: &str) -> String {
    format!("{prefix}:events")
}

/// What the append script publishes after logging: `"<last_seq> <epoch> <session id>"`.
/// The `APPEND` script above encodes it; this is its only decoder.
#[derive(Debug, PartialEq, Eq)]
pub struct Announcement<'a> {
    pub last_seq: u64,
    pub epoch: Epoch,
    pub session_id: &'a str,
}

impl<'a> Announcement<'a> {
    pub fn parse(payload: &'a str) -> Option<Self> {
        let mut parts = payload.splitn(3, ' ');
        let last_seq = parts.next()?.parse().ok()?;
        let epoch = Epoch::parse(parts.next()?)?;
        let session_id = parts.next().filter(|s| !s.is_empty())?;
        Some(Self {
            last_seq,
            epoch,
            session_id,
        })
    }
}

/// A client and a self-reconnecting connection to `url`, with timeouts short enough that
/// an unreachable Redis is reported in about a second instead of hanging requests.
pub async fn connect(url: &str) -> redis::RedisResult<(redis::Client, ConnectionManager)> {
    let client = redis::Client::open(url)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_secs(1)))
        .set_response_timeout(Some(std::time::Duration::from_secs(3)))
        .set_number_of_retries(2)
        .set_min_delay(std::time::Duration::from_millis(50))
        .set_max_delay(std::time::Duration::from_secs(1));
    let manager = ConnectionManager::new_with_config(client.clone(), config).await?;
    Ok((client, manager))
}

/// Runs `request` once more when the connection it went out on was found dead (Redis
/// restarted, or the connection was killed): by then the manager has reconnected. Only for
/// requests that are safe to repeat (reads, compare-and-sets).
pub async fn once_more<T, F, Fut>(mut request: F) -> redis::RedisResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = redis::RedisResult<T>>,
{
    match request().await {
        Err(error) if error.is_connection_dropped() || error.is_io_error() => {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            request().await
        }
        other => other,
    }
}

fn backend(error: redis::RedisError) -> LogError {
    LogError::Backend(error.to_string())
}

/// A payload serialized around the place where its `seq` goes.
struct Split {
    before: String,
    after: String,
}

fn split(
    session_id: &str,
    body: &serde_json::Map<String, serde_json::Value>,
) -> Result<Split, LogError> {
    let before = format!(
        "{{\"sessionId\":{},\"seq\":",
        serde_json::to_string(session_id)?
    );
    // The body always has `timestamp`, so it serializes as `{…}`; its `{` becomes a comma.
    let body = serde_json::to_string(body)?;
    Ok(Split {
        before,
        after: format!(",{}", &body[1..]),
    })
}

#[async_trait]
impl EventLog for RedisLog {
    async fn append(
        &self,
        session_id: &str,
        drafts: Vec<EventDraft>,
    ) -> Result<AppendOutcome, LogError> {
        let mut invocation = self.append.prepare_invoke();
        let [head_key, log_key, keys_key] = self.session_keys(session_id);
        invocation
            .key(&head_key)
            .key(&log_key)
            .key(&keys_key)
            .arg(self.max_events)
            .arg(MAX_KEYS_PER_SESSION)
            .arg(Epoch::fresh().as_str())
            .arg(self.channel())
            .arg(session_id);
        let mut bodies = Vec::with_capacity(drafts.len());
        for draft in drafts {
            let body = finalize_body(draft.data);
            let Split { before, after } = split(session_id, &body)?;
            invocation
                .arg(draft.kind.as_str())
                .arg(draft.idempotency_key.as_deref().unwrap_or(""))
                .arg(before.clone())
                .arg(after.clone());
            bodies.push((draft.kind, body, before, after));
        }
        let (epoch, last_seq, raw_seqs, retained): (String, u64, Vec<i64>, u64) = invocation
            .invoke_async(&mut self.redis.clone())
            .await
            .map_err(backend)?;
        let epoch = Epoch::parse(&epoch)
            .ok_or_else(|| LogError::Backend("the append script returned no epoch".into()))?;
        let mut seqs = Vec::with_capacity(raw_seqs.len());
        let mut appended = Vec::new();
        for ((kind, body, before, after), raw) in bodies.into_iter().zip(raw_seqs) {
            let seq = raw.unsigned_abs();
            seqs.push(Some(seq));
            if raw < 0 {
                continue;
            }
            let json = RawValue::from_string(format!("{before}{seq}{after}"))?;
            appended.push(Appended {
                event: Arc::new(LoggedEvent { seq, kind, json }),
                data: with_identity(session_id, seq, body),
            });
        }
        let duplicates = seqs.len() - appended.len();
        Ok(AppendOutcome {
            appended,
            seqs,
            duplicates,
            epoch,
            last_seq,
            first_seq: first_retained(last_seq, retained),
        })
    }

    async fn head(&self, session_id: &str) -> Result<LogHead, LogError> {
        let [head_key, log_key, _] = self.session_keys(session_id);
        let mut pipe = redis::pipe();
        ask_head(&mut pipe, &head_key, &log_key);
        Ok(to_head(self.query(&pipe).await?))
    }

    /// One round trip: the head and the entries are read in one `MULTI`, so they agree.
    async fn read(&self, session_id: &str, after: u64, limit: usize) -> Result<LogSlice, LogError> {
        if limit == 0 {
            return Ok(LogSlice {
                head: self.head(session_id).await?,
                events: Vec::new(),
            });
        }
        let [head_key, log_key, _] = self.session_keys(session_id);
        let start = format!("{}-1", after.saturating_add(1));
        let mut pipe = redis::pipe();
        pipe.atomic();
        ask_head(&mut pipe, &head_key, &log_key);
        pipe.cmd("XRANGE")
            .arg(&log_key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(limit);
        let (fields, retained, entries): (HeadFields, u64, RedisValue) = self.query(&pipe).await?;
        let head = to_head((fields, retained));
        // Entries without a head are an earlier incarnation's leftovers.
        let events = if head.epoch.is_none() {
            Vec::new()
        } else {
            parse_entries(entries)?
        };
        Ok(LogSlice { head, events })
    }

    async fn ready(&self) -> Result<(), LogError> {
        let _: String = once_more(|| {
            let mut redis = self.redis.clone();
            async move { redis::cmd("PING").query_async(&mut redis).await }
        })
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn remove(&self, session_id: &str) -> Result<(), LogError> {
        let mut redis = self.redis.clone();
        let _: () = redis
            .del(&self.session_keys(session_id))
            .await
            .map_err(backend)?;
        Ok(())
    }
}

/// `HMGET head seq epoch`: the head hash's fields.
type HeadFields = (Option<u64>, Option<String>);

/// Adds the commands whose replies make a [`LogHead`]: the head hash's fields and `XLEN`.
fn ask_head(pipe: &mut redis::Pipeline, head_key: &str, log_key: &str) {
    pipe.cmd("HMGET")
        .arg(head_key)
        .arg("seq")
        .arg("epoch")
        .xlen(log_key);
}

fn to_head(((seq, epoch), retained): (HeadFields, u64)) -> LogHead {
    let last_seq = seq.unwrap_or(0);
    LogHead {
        last_seq,
        first_seq: first_retained(last_seq, retained),
        epoch: epoch.as_deref().and_then(Epoch::parse),
    }
}

/// Entries are contiguous, so the oldest retained one follows from their count.
fn first_retained(last_seq: u64, retained: u64) -> u64 {
    last_seq + 1 - retained.min(last_seq)
}

/// `XRANGE` entries: `[[id, [field, value, …]], …]`.
fn parse_entries(entries: RedisValue) -> Result<Vec<Arc<LoggedEvent>>, LogError> {
    let malformed = |what: &str| LogError::Backend(format!("malformed log entry: {what}"));
    let RedisValue::Array(entries) = entries else {
        return Err(malformed("not a list"));
    };
    entries
        .into_iter()
        .map(|entry| {
            let (id, fields): (String, Vec<String>) =
                redis::from_redis_value(entry).map_err(|e| malformed(&e.to_string()))?;
            let seq = id
                .split('-')
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| malformed(&id))?;
            let field = |name: &str| {
                fields
                    .chunks(2)
                    .find(|pair| pair[0] == name)
                    .and_then(|pair| pair.get(1))
                    .ok_or_else(|| malformed(name))
            };
            let kind = EventKind::parse(field("k")?).ok_or_else(|| malformed("event name"))?;
            let json = RawValue::from_string(field("d")?.clone())?;
            Ok(Arc::new(LoggedEvent { seq, kind, json }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{Announcement, Epoch};

    #[test]
    fn announcements_decode_what_the_append_script_encodes() {
        assert_eq!(
            Announcement::parse("42 e1 user:7-a b"),
            Some(Announcement {
                last_seq: 42,
                epoch: Epoch::parse("e1").unwrap(),
                session_id: "user:7-a b",
            })
        );
        for bad in ["", "42", "42 e1", "x e1 s", "42  s", "-1 e1 s"] {
            assert_eq!(Announcement::parse(bad), None, "{bad:?}");
        }
    }
}
