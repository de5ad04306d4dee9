//! The event log in Redis, shared by every node.
//!
//! Per session: a hash [`Keys::head`] (`seq`, `epoch`), a stream [`Keys::log`] whose entry
//! ids are `{seq}-1` and whose fields are `k` (event name) and `d` (the serialized
//! payload), and a sorted set [`Keys::idempotency_keys`] of idempotency keys scored by the
//! `seq` they were first given. One Lua script appends a batch atomically: it is the
//! single sequencer of the session for the whole cluster. The head hash is the incarnation:
//! when it is missing the script starts a new one (fresh epoch, seq 1) and drops whatever
//! stream and keys an earlier one left behind. Events are serialized on the node
//! around a gap where `seq` goes, and the script splices the number in, so the payload
//! stays byte-for-byte what the producer sent (Redis' own JSON would reformat numbers).
//!
//! **On a Redis Cluster** the script may only touch the session's own slot, so the shared
//! [`Keys::sessions`] index and the announcement are left to the node, after the script:
//! - the `--max-sessions` check of a new incarnation: the script answers `new` without
//!   writing anything when the head is missing, the node reads the index (`ZCARD`,
//!   `ZSCORE`) and calls again saying whether one more session is admitted (two nodes
//!   starting sessions at once may each admit one: the bound is then off by the race);
//! - `ZADD sessions <now> <id>` once events were logged: a node that dies between the script
//!   and it leaves the session out of the index until its next append or fold (the store's
//!   compare-and-set adds it too), and its keys still expire on their own (idle TTL);
//! - the announcement, `SPUBLISH` on the session's shard channel
//!   ([`Keys::announcement_channel`]), also after an append that found only duplicates, so a
//!   producer's retry of an append whose node died before announcing wakes the other nodes.
//!   One that is lost delays the other nodes' delivery of those events until the session's
//!   next announcement or their next catch-up, never loses one: delivery reads the log.
//!
//! Neither of the last two fails an append whose script succeeded.

use std::sync::Arc;

use async_trait::async_trait;
use redis::{AsyncCommands, Script, Value as RedisValue};
use serde_json::value::RawValue;

use super::announcement::ANNOUNCE_LUA;
use super::{Connection, Keys, Redis, once_more};
use crate::event::{EventDraft, EventKind, finalize_body, with_identity};
use crate::log::{
    AppendOutcome, Appended, Epoch, EventLog, LogError, LogHead, LogLimits, LogSlice, LoggedEvent,
    Writer,
};

/// Idempotency keys remembered per session; the oldest are forgotten first.
const MAX_KEYS_PER_SESSION: usize = 10_000;

/// KEYS: head, log, idempotency keys, and on one Redis the sessions index. ARGV: max events,
/// max keys, a fresh epoch, the announcement channel (`""`: the node announces), the session
/// id, max bytes, max sessions (without the index: `unchecked`, `admitted` or `full`, see
/// the module docs; `unchecked` makes a new incarnation answer `{ "new" }`), the idle
/// TTL (ms), now (ms), the writer (`h` herald, `p` producer, `r` reopening producer), then
/// per event: name, idempotency key ("" for none), payload before `seq`, payload after
/// `seq`, whether it ends the session (`1`/`0`). Returns `{ epoch, last_seq, seqs,
/// retained }` (numbers as decimal strings, so that Lua's float formatting never shows; a
/// duplicate's seq negated), or `{ "refused", code }` when nothing was logged, and
/// announces the append ([`super::Announcement`]) when anything was logged, so every node
/// can deliver the new events. Runs after [`ANNOUNCE_LUA`], which defines `announce`.
///
/// Retention: the oldest entries go while more than max events or max bytes are retained
/// (`bytes` in the head counts the retained payloads), the newest always stays. Every key
/// the append touches expires an idle TTL after it; the sessions index is scored by each
/// session's last append, which is what the idle sweep reads.
const APPEND: &str = r#"
local head, log, keys, sessions = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local max_events, max_keys = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_bytes, max_sessions = tonumber(ARGV[6]), tonumber(ARGV[7]) or 0
local ttl, now, writer = ARGV[8], ARGV[9], ARGV[10]
local first_event, stride = 11, 5
local epoch = redis.call('HGET', head, 'epoch')
if not epoch then
  if sessions then
    if redis.call('ZCARD', sessions) >= max_sessions and not redis.call('ZSCORE', sessions, ARGV[5]) then
      return { 'refused', 'TOO_MANY_SESSIONS' }
    end
  elseif ARGV[7] == 'unchecked' then
    return { 'new' }
  elseif ARGV[7] == 'full' then
    return { 'refused', 'TOO_MANY_SESSIONS' }
  end
  -- A new incarnation. What an earlier one left (its head lost: evicted, deleted) goes, or
  -- the stream's ids would no longer grow from 1 and its keys would hide new events.
  redis.call('DEL', log, keys)
  epoch = ARGV[3]
  redis.call('HSET', head, 'epoch', epoch, 'seq', 0, 'bytes', 0)
elseif writer == 'p' and redis.call('HGET', head, 'ended') == '1' then
  for i = first_event, #ARGV, stride do
    local key = ARGV[i + 1]
    if key == '' or not redis.call('ZSCORE', keys, key) then
      return { 'refused', 'SESSION_ENDED' }
    end
  end
end
if writer == 'r' then redis.call('HDEL', head, 'ended') end
local seq = tonumber(redis.call('HGET', head, 'seq'))
local first = seq
local added = 0
local ends = false
local seqs = {}
for i = first_event, #ARGV, stride do
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
    local data = before .. n .. after
    added = added + string.len(data)
    if ARGV[i + 4] == '1' then ends = true end
    redis.call('XADD', log, n .. '-1', 'k', name, 'd', data)
    if key ~= '' then
      redis.call('ZADD', keys, n, key)
      local excess = redis.call('ZCARD', keys) - max_keys
      if excess > 0 then redis.call('ZREMRANGEBYRANK', keys, 0, excess - 1) end
    end
    table.insert(seqs, n)
  end
end
local retained = redis.call('XLEN', log)
if seq > first then
  local bytes = math.max(0, tonumber(redis.call('HGET', head, 'bytes') or '0') + added)
  -- One trim per batch: trimming on every XADD cost more than the XADD itself.
  local cut = nil
  local from = '-'
  while retained > 1 and (retained > max_events or bytes > max_bytes) do
    local want = math.min(math.max(retained - max_events, 1) + 15, 1000)
    local entries = redis.call('XRANGE', log, from, '+', 'COUNT', want)
    if #entries == 0 then break end
    for _, entry in ipairs(entries) do
      if retained <= 1 or (retained <= max_events and bytes <= max_bytes) then break end
      bytes = math.max(0, bytes - string.len(entry[2][4] or ''))
      retained = retained - 1
      cut = entry[1]
    end
    from = '(' .. cut
  end
  if cut then
    local cut_seq = tonumber(string.match(cut, '^(%d+)'))
    redis.call('XTRIM', log, 'MINID', string.format('%d', cut_seq + 1) .. '-0')
  end
  redis.call('HSET', head, 'seq', seq, 'bytes', string.format('%d', bytes))
  if ends then redis.call('HSET', head, 'ended', '1') end
  if sessions then
    redis.call('ZADD', sessions, now, ARGV[5])
    redis.call('PEXPIRE', sessions, ttl)
  end
end
redis.call('PEXPIRE', head, ttl)
redis.call('PEXPIRE', log, ttl)
redis.call('PEXPIRE', keys, ttl)
local last = string.format('%d', seq)
if seq > first and ARGV[4] ~= '' then
  announce(ARGV[4], last, epoch, ARGV[5])
end
return { epoch, last, seqs, retained }
"#;

pub struct RedisLog {
    redis: Connection,
    keys: Keys,
    limits: LogLimits,
    append: Script,
}

impl RedisLog {
    /// Connects (the connection manager reconnects by itself after Redis restarts), retaining
    /// `max_events` per session with no other limit.
    pub async fn connect(url: &str, prefix: &str, max_events: u64) -> Result<Self, LogError> {
        Self::connect_with(url, prefix, LogLimits::events(max_events)).await
    }

    pub async fn connect_with(
        url: &str,
        prefix: &str,
        limits: LogLimits,
    ) -> Result<Self, LogError> {
        let redis = Redis::single(url).map_err(backend)?;
        Self::open(&redis, prefix, limits).await
    }

    /// A log on `redis` (one Redis or a cluster).
    pub async fn open(redis: &Redis, prefix: &str, limits: LogLimits) -> Result<Self, LogError> {
        Ok(Self {
            redis: redis.connect().await.map_err(backend)?,
            keys: redis.keys(prefix),
            limits,
            append: Script::new(&format!("{ANNOUNCE_LUA}{APPEND}")),
        })
    }

    /// Whether one more session may start (cluster: the script cannot read the index).
    async fn admits_a_session(&self, session_id: &str) -> Result<bool, LogError> {
        let mut pipe = redis::pipe();
        pipe.zcard(self.keys.sessions())
            .zscore(self.keys.sessions(), session_id);
        let (count, known): (u64, Option<f64>) = self.query(&pipe).await?;
        Ok(known.is_some() || count < self.limits.max_sessions)
    }

    /// After a cluster append: the index entry and the announcement the script could not
    /// make (see the module docs). Neither fails the append, which is logged by then (a
    /// producer told otherwise would send it again): a failure is only warned about, and
    /// costs what a crash between the two would.
    async fn after_cluster_append(
        &self,
        session_id: &str,
        logged: bool,
        epoch: &Epoch,
        last_seq: u64,
    ) {
        let mut redis = self.redis.clone();
        if logged {
            let ttl = self.idle_ttl_ms();
            let mut pipe = redis::pipe();
            pipe.zadd(self.keys.sessions(), session_id, now_ms())
                .ignore()
                .pexpire(self.keys.sessions(), i64::try_from(ttl).unwrap_or(i64::MAX))
                .ignore();
            let indexed: redis::RedisResult<()> = pipe.query_async(&mut redis).await;
            if let Err(error) = indexed {
                tracing::warn!(session_id, %error, "could not index a session after its append");
            }
        }
        if last_seq > 0 {
            let announcement = format!("{last_seq} {epoch} {session_id}");
            let announced: redis::RedisResult<i64> = redis::cmd("SPUBLISH")
                .arg(self.keys.announcement_channel(session_id))
                .arg(announcement)
                .query_async(&mut redis)
                .await;
            if let Err(error) = announced {
                tracing::warn!(session_id, %error, "could not announce an append");
            }
        }
    }

    fn idle_ttl_ms(&self) -> u64 {
        u64::try_from(self.limits.idle_ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
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

    /// The keys that make up a session's log: head, log, idempotency keys.
    fn session_keys(&self, session_id: &str) -> [String; 3] {
        [
            self.keys.head(session_id),
            self.keys.log(session_id),
            self.keys.idempotency_keys(session_id),
        ]
    }
}

fn backend(error: redis::RedisError) -> LogError {
    LogError::Backend(error.to_string())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Whether the append script answered `{ "new" }` (cluster: a new incarnation to check).
fn is_new_incarnation(reply: &RedisValue) -> bool {
    matches!(reply, RedisValue::Array(items)
        if matches!(items.as_slice(), [RedisValue::BulkString(marker)] if marker == b"new"))
}

/// The append script's reply: `(epoch, last_seq, seqs, retained)`, or the refusal it names.
fn appended_or_refused(
    session_id: &str,
    reply: RedisValue,
    limits: &LogLimits,
) -> Result<(String, u64, Vec<i64>, u64), LogError> {
    let text = |value: &RedisValue| match value {
        RedisValue::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        _ => String::new(),
    };
    if let RedisValue::Array(items) = &reply
        && let [marker, code] = items.as_slice()
        && text(marker) == "refused"
    {
        return Err(match text(code).as_str() {
            "TOO_MANY_SESSIONS" => LogError::TooManySessions {
                max: limits.max_sessions,
            },
            "SESSION_ENDED" => LogError::SessionEnded(session_id.to_owned()),
            other => LogError::Backend(format!("the append script refused: {other}")),
        });
    }
    redis::from_redis_value(reply).map_err(|e| LogError::Backend(e.to_string()))
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
    async fn append_as(
        &self,
        session_id: &str,
        drafts: Vec<EventDraft>,
        writer: Writer,
    ) -> Result<AppendOutcome, LogError> {
        let [head_key, log_key, keys_key] = self.session_keys(session_id);
        let limits = &self.limits;
        let cluster = self.keys.is_cluster();
        let mut bodies = Vec::with_capacity(drafts.len());
        let mut events = Vec::with_capacity(drafts.len());
        for draft in drafts {
            let ends = draft.ends_session();
            let body = finalize_body(draft.data);
            let Split { before, after } = split(session_id, &body)?;
            events.push((
                draft.kind.as_str(),
                draft.idempotency_key.unwrap_or_default(),
                before.clone(),
                after.clone(),
                if ends { "1" } else { "0" },
            ));
            bodies.push((draft.kind, body, before, after));
        }
        let fresh = Epoch::fresh();
        // On a cluster: first as if the session existed; a new incarnation comes back once
        // to be checked against the index (see the module docs).
        let mut sessions_check = if cluster {
            "unchecked".to_owned()
        } else {
            limits.max_sessions.to_string()
        };
        let reply = loop {
            let mut invocation = self.append.prepare_invoke();
            invocation.key(&head_key).key(&log_key).key(&keys_key);
            if !cluster {
                invocation.key(self.keys.sessions());
            }
            invocation
                .arg(limits.max_events)
                .arg(MAX_KEYS_PER_SESSION)
                .arg(fresh.as_str())
                .arg(if cluster {
                    String::new()
                } else {
                    self.keys.announcements()
                })
                .arg(session_id)
                .arg(limits.max_bytes)
                .arg(&sessions_check)
                .arg(self.idle_ttl_ms())
                .arg(now_ms())
                .arg(match writer {
                    Writer::Herald => "h",
                    Writer::Producer => "p",
                    Writer::Reopening => "r",
                });
            for (kind, key, before, after, ends) in &events {
                invocation
                    .arg(*kind)
                    .arg(key.as_str())
                    .arg(before.as_str())
                    .arg(after.as_str())
                    .arg(*ends);
            }
            let reply: RedisValue = invocation
                .invoke_async(&mut self.redis.clone())
                .await
                .map_err(backend)?;
            if cluster && sessions_check == "unchecked" && is_new_incarnation(&reply) {
                sessions_check = if self.admits_a_session(session_id).await? {
                    "admitted".to_owned()
                } else {
                    "full".to_owned()
                };
                continue;
            }
            break reply;
        };
        let (epoch, last_seq, raw_seqs, retained) = appended_or_refused(session_id, reply, limits)?;
        let epoch = Epoch::parse(&epoch)
            .ok_or_else(|| LogError::Backend("the append script returned no epoch".into()))?;
        if cluster {
            let logged = raw_seqs.iter().any(|&raw| raw > 0);
            self.after_cluster_append(session_id, logged, &epoch, last_seq)
                .await;
        }
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
