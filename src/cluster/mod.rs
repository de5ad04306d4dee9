//! Cluster glue, with Redis configured.
//!
//! - **Delivery.** Every node hears which sessions other nodes logged events for
//!   ([`Announcement`]s on [`Keys::announcements`]) and brings its own sockets up to date from
//!   the shared log. The announcement only says where the log ends; the events are read from the
//!   log, in order, by the hub, so a lost or late announcement costs latency, never an
//!   event: after every (re)subscription the node catches up every session it follows.
//! - **Commands.** A cancel or clarification answer posted to a node that does not run the
//!   session is forwarded to the node that does ([`Keys::node`], reply on [`Keys::reply`]),
//!   found in the [`Keys::owners`] hash.
//! - **Runs under a lease.** Each node refreshes [`Keys::alive`] (a key with a TTL of one
//!   lease, `--cluster-lease-ms`, 10 s). A session whose owner stopped refreshing is claimed
//!   by whichever node notices first (a compare-and-set on its owner entry, so exactly one
//!   does), which resumes its run from its checkpoint. A node stopping hands its runs over at
//!   once instead: it drops its claims and names the sessions on [`Keys::handover`], and the
//!   first node to claim each (`HSETNX`) resumes it. A missing key is evidence only if its node could have
//!   refreshed it: after a Redis outage every key may have expired although every node is
//!   alive, so a node that could not reach Redis (or just started) judges nobody until its
//!   heartbeats have succeeded for [`JUDGE_AFTER`] leases, time enough for the others to
//!   reconnect and refresh theirs.
//!
//! - **Worker ingest** through the [`Keys::ingest`] stream ([`crate::redis::Ingest`]), and
//!   from unchanged Socket.IO emitters, translated into that stream ([`crate::redis::Emitters`]).
//!
//! The subscriber reconnects by itself when Redis restarts or its connection is killed.
//!
//! **On a Redis Cluster** (`--redis-cluster`) announcements are sharded: each append is
//! `SPUBLISH`ed on its session's shard channel ([`Keys::announcement_channel`]) and every node
//! `SSUBSCRIBE`s all of them ([`Keys::announcement_shards`]), on one RESP3 cluster connection
//! that also holds the classic subscriptions (commands, replies, handover). When it loses
//! a master's connection the listener starts over with a new connection (as on one Redis:
//! backoff while subscribing fails, e.g. while the cluster is down), and every
//! (re)subscription, a slot move's included, is followed by a catch-up of every followed
//! session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::{AsyncCommands, PushInfo, PushKind};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::hub::Hub;
use crate::intake::Runs;
use crate::redis::{
    Announcement, Connection, EmitterChannels, EmitterLimits, Emitters, Ingest, Keys, Redis,
    once_more,
};
use tokio_util::sync::CancellationToken;

const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_secs(5);
/// How long a forwarded command may take before the caller gives up.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Leases of successful heartbeats after which a node that could not reach Redis (or just
/// started) judges other nodes again: one for them to refresh their keys, one more for
/// their reconnection backoff and a slow tick.
pub const JUDGE_AFTER: u32 = 2;

/// KEYS: owners. ARGV: session id, the lost node, this node. Moves the session's claim from
/// the lost node to this one, unless another node did first.
const TAKE_OVER: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"#;

/// A command for the node that runs a session.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum RemoteCommand {
    Cancel {
        session_id: String,
    },
    Respond {
        session_id: String,
        clarification_id: String,
        answer: String,
    },
}

/// Its outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "camelCase")]
pub enum RemoteReply {
    Done,
    Refused {
        code: String,
        message: String,
    },
    /// The session is not running there (any more).
    NotRunning,
}

/// Executes commands forwarded from other nodes (the orchestrator).
#[async_trait]
pub trait CommandHandler: Send + Sync + 'static {
    async fn handle(&self, command: RemoteCommand) -> RemoteReply;
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    request_id: String,
    reply_to: String,
    command: RemoteCommand,
}

#[derive(Serialize, Deserialize)]
struct ReplyEnvelope {
    request_id: String,
    reply: RemoteReply,
}

#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    /// Where Redis is (the listener, the ingest consumer and the translator connect there).
    target: Redis,
    redis: Connection,
    keys: Keys,
    node_id: String,
    /// Forwarded commands awaiting their reply. A std mutex: inserts and removals only.
    pending: Mutex<HashMap<String, oneshot::Sender<RemoteReply>>>,
    handler: OnceLock<Arc<dyn CommandHandler>>,
    /// A node that has not refreshed its liveness key for this long is lost; also the
    /// ingest lease.
    lease: Duration,
    /// A std mutex: plain data, never held across an await.
    judge: Mutex<Judge>,
    /// Woken when another node hands runs over.
    handover: tokio::sync::Notify,
}

/// Whether this node has the evidence to judge other nodes lost: only once its own
/// heartbeats have succeeded for a while (see the module docs).
#[derive(Debug)]
struct Judge {
    /// Since when heartbeats may end other nodes' sessions; `None` until one succeeds.
    from: Option<Instant>,
    grace: Duration,
}

impl Judge {
    fn new(lease: Duration) -> Self {
        Self {
            from: None,
            grace: lease * JUDGE_AFTER,
        }
    }

    /// This node could not reach Redis: other nodes may not have reached it either.
    fn heartbeat_failed(&mut self) {
        self.from = None;
    }

    /// A heartbeat succeeded at `now`; whether other nodes may be judged.
    fn heartbeat_succeeded(&mut self, now: Instant) -> bool {
        now >= *self.from.get_or_insert(now + self.grace)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the node running the session did not answer in time")]
    Timeout,
}

impl Cluster {
    /// On one Redis at `url`.
    pub async fn connect(url: &str, prefix: &str, lease: Duration) -> Result<Self, ClusterError> {
        Self::open(&Redis::single(url)?, prefix, lease).await
    }

    /// On `target` (one Redis or a cluster).
    pub async fn open(target: &Redis, prefix: &str, lease: Duration) -> Result<Self, ClusterError> {
        let redis = target.connect().await?;
        Ok(Self {
            inner: Arc::new(Inner {
                target: target.clone(),
                redis,
                keys: target.keys(prefix),
                node_id: uuid::Uuid::new_v4().simple().to_string(),
                pending: Mutex::default(),
                handler: OnceLock::new(),
                lease,
                judge: Mutex::new(Judge::new(lease)),
                handover: tokio::sync::Notify::new(),
            }),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// How long a node's liveness (and the ingest lease) lasts without renewal.
    pub fn lease(&self) -> Duration {
        self.inner.lease
    }

    pub fn set_handler(&self, handler: Arc<dyn CommandHandler>) {
        let _ = self.inner.handler.set(handler);
    }

    fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// Records that this node runs `session_id`.
    pub async fn claim(&self, session_id: &str) -> Result<(), ClusterError> {
        let _: () = self
            .inner
            .redis
            .clone()
            .hset(self.keys().owners(), session_id, &self.inner.node_id)
            .await?;
        Ok(())
    }

    /// Claims for this node those of `session_ids` no node holds (runs handed over), each
    /// with `HSETNX`, so that exactly one node gets each; returns the ones this node got.
    /// One `HMGET` finds them, so the runs other nodes hold cost one round trip in all.
    pub async fn claim_unclaimed(
        &self,
        session_ids: &[String],
    ) -> Result<Vec<String>, ClusterError> {
        if session_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut redis = self.inner.redis.clone();
        let owners: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.keys().owners())
            .arg(session_ids)
            .query_async(&mut redis)
            .await?;
        let mut claimed = Vec::new();
        for (session_id, owner) in session_ids.iter().zip(owners) {
            if owner.is_some() {
                continue;
            }
            let got: bool = redis
                .hset_nx(self.keys().owners(), session_id, &self.inner.node_id)
                .await?;
            if got {
                claimed.push(session_id.clone());
            }
        }
        Ok(claimed)
    }

    /// Leaves `session_id`'s run to the other nodes: drops this node's claim, then wakes
    /// them ([`Cluster::handed_over`]).
    pub async fn hand_over(&self, session_id: &str) -> Result<(), ClusterError> {
        self.release(session_id).await?;
        let _: i64 = self
            .inner
            .redis
            .clone()
            .publish(self.keys().handover(), session_id)
            .await?;
        Ok(())
    }

    /// Returns when another node has handed runs over (at once if one did since the last
    /// call).
    pub async fn handed_over(&self) {
        self.inner.handover.notified().await;
    }

    /// Forgets that this node runs `session_id` (its run ended).
    pub async fn release(&self, session_id: &str) -> Result<(), ClusterError> {
        let _: () = self
            .inner
            .redis
            .clone()
            .hdel(self.keys().owners(), session_id)
            .await?;
        Ok(())
    }

    /// The node that runs `session_id`, if any does.
    /// A read, so it is sent once more when it went out on a connection found dead (Redis
    /// restarted): producers' requests are not refused for a link that was already replaced.
    pub async fn runner(&self, session_id: &str) -> Result<Option<String>, ClusterError> {
        let owners = self.keys().owners();
        let owner: Option<String> = once_more(|| {
            let mut redis = self.inner.redis.clone();
            let owners = owners.clone();
            async move { redis.hget(owners, session_id).await }
        })
        .await?;
        Ok(owner)
    }

    /// Sends `command` to the node running its session and waits for the reply; `None`
    /// when no other live node runs it.
    pub async fn forward(
        &self,
        session_id: &str,
        command: RemoteCommand,
    ) -> Result<Option<RemoteReply>, ClusterError> {
        let mut redis = self.inner.redis.clone();
        let owner: Option<String> = redis.hget(self.keys().owners(), session_id).await?;
        let Some(owner) = owner.filter(|o| *o != self.inner.node_id) else {
            return Ok(None);
        };
        let request_id = uuid::Uuid::new_v4().simple().to_string();
        let (tx, rx) = oneshot::channel();
        self.inner
            .pending
            .lock()
            .unwrap()
            .insert(request_id.clone(), tx);
        let envelope = Envelope {
            request_id: request_id.clone(),
            reply_to: self.keys().reply(&self.inner.node_id),
            command,
        };
        let payload = serde_json::to_string(&envelope).expect("commands serialize");
        let receivers: i64 = redis.publish(self.keys().node(&owner), payload).await?;
        let outcome = if receivers == 0 {
            Ok(None) // the owner is gone; the liveness sweep will end its sessions
        } else {
            match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
                Ok(Ok(reply)) => Ok(Some(reply)),
                Ok(Err(_)) | Err(_) => Err(ClusterError::Timeout),
            }
        };
        self.inner.pending.lock().unwrap().remove(&request_id);
        outcome
    }

    /// Refreshes this node's liveness and returns the sessions whose owner is lost, each
    /// claimed by this node alone (so that exactly one node resumes each). Returns none while
    /// this node lacks the evidence to judge (see the module docs).
    pub async fn heartbeat(&self) -> Result<Vec<String>, ClusterError> {
        let outcome = self.refresh_and_judge().await;
        if outcome.is_err() {
            self.inner.judge.lock().unwrap().heartbeat_failed();
        }
        outcome
    }

    async fn refresh_and_judge(&self) -> Result<Vec<String>, ClusterError> {
        let mut redis = self.inner.redis.clone();
        let alive = self.keys().alive(&self.inner.node_id);
        let lease_ms = u64::try_from(self.inner.lease.as_millis()).unwrap_or(u64::MAX);
        let _: () = redis.pset_ex(&alive, "1", lease_ms).await?;
        let may_judge = self
            .inner
            .judge
            .lock()
            .unwrap()
            .heartbeat_succeeded(Instant::now());
        if !may_judge {
            return Ok(Vec::new());
        }
        let owners: HashMap<String, String> = redis.hgetall(self.keys().owners()).await?;
        let mut lost = Vec::new();
        let mut checked: HashMap<String, bool> = HashMap::new();
        for (session_id, node) in owners {
            let is_alive = match checked.get(&node) {
                Some(&known) => known,
                None => {
                    let known: bool = redis.exists(self.keys().alive(&node)).await?;
                    checked.insert(node.clone(), known);
                    known
                }
            };
            if is_alive {
                continue;
            }
            let taken: i64 = redis::Script::new(TAKE_OVER)
                .key(self.keys().owners())
                .arg(&session_id)
                .arg(&node)
                .arg(&self.inner.node_id)
                .invoke_async(&mut redis)
                .await?;
            if taken == 1 {
                lost.push(session_id);
            }
        }
        Ok(lost)
    }

    /// Consumes the worker ingest stream until `stop`; batches hold at most `max_batch`
    /// events.
    pub fn ingest(
        &self,
        hub: Hub,
        runs: Arc<dyn Runs>,
        max_batch: usize,
        max_event_bytes: u64,
        stop: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let ingest = Ingest {
            redis: self.inner.target.clone(),
            keys: self.inner.keys.clone(),
            consumer: self.inner.node_id.clone(),
            hub,
            runs,
            max_batch,
            max_event_bytes,
            lease: self.inner.lease,
            stop,
        };
        ingest.consume()
    }

    /// Translates the Socket.IO emitters' messages into the ingest stream until `stop`
    /// (this node takes part in electing the one translator).
    pub fn emitters(
        &self,
        channels: EmitterChannels,
        limits: EmitterLimits,
        hub: Hub,
        stop: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let emitters = Emitters {
            redis: self.inner.target.clone(),
            keys: self.inner.keys.clone(),
            node_id: self.inner.node_id.clone(),
            channels,
            lease: self.inner.lease,
            limits,
            hub,
            stop,
        };
        emitters.consume()
    }

    /// Listens for announcements and commands, resubscribing after every failure, until
    /// dropped (it only reads, so it may stop at any point).
    pub async fn listen_forever(self, hub: Hub) {
        let mut retry = FIRST_RETRY;
        loop {
            match self.listen(&hub, &mut retry).await {
                Ok(()) => tracing::warn!("cluster channels closed; resubscribing"),
                Err(error) => tracing::warn!(%error, "cluster channels failed; resubscribing"),
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(LAST_RETRY);
        }
    }

    async fn listen(&self, hub: &Hub, retry: &mut Duration) -> redis::RedisResult<()> {
        if self.inner.target.is_cluster() {
            return self.listen_on_cluster(hub, retry).await;
        }
        let Some(client) = self.inner.target.single_client() else {
            return Ok(());
        };
        let events = self.keys().announcements();
        let commands = self.keys().node(&self.inner.node_id);
        let replies = self.keys().reply(&self.inner.node_id);
        let handover = self.keys().handover();
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub
            .subscribe(&[&events, &commands, &replies, &handover])
            .await?;
        *retry = FIRST_RETRY;
        tracing::info!(
            node = self.inner.node_id,
            "listening for other nodes' events and commands"
        );
        // Whatever was announced while nobody listened is in the log.
        if let Err(error) = hub.catch_up_all().await {
            tracing::warn!(%error, "catching up after (re)subscribing failed");
        }
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            let channel = message.get_channel_name().to_owned();
            let payload: String = message.get_payload()?;
            if channel == events {
                self.on_announcement(hub, &payload);
            } else if channel == commands {
                self.on_command(payload);
            } else if channel == replies {
                self.on_reply(&payload);
            } else if channel == handover {
                self.inner.handover.notify_one();
            }
        }
        Ok(())
    }

    /// [`Cluster::listen`] on a Redis Cluster: sharded announcements, classic commands,
    /// replies and handovers on one RESP3 cluster connection (see the module docs).
    async fn listen_on_cluster(&self, hub: &Hub, retry: &mut Duration) -> redis::RedisResult<()> {
        let commands = self.keys().node(&self.inner.node_id);
        let replies = self.keys().reply(&self.inner.node_id);
        let handover = self.keys().handover();
        // Unbounded, as the classic pub/sub stream is: its pushes are handled without
        // awaiting anything but the catch-up.
        let (sender, mut pushes) = tokio::sync::mpsc::unbounded_channel::<PushInfo>();
        let Some(connected) = self.inner.target.connect_cluster_push(sender).await else {
            return Ok(());
        };
        let mut connection = connected?;
        // One channel per command: a sharded subscription's channels must share a slot.
        for shard in self.keys().announcement_shards() {
            connection.ssubscribe(shard).await?;
        }
        for channel in [&commands, &replies, &handover] {
            connection.subscribe(channel).await?;
        }
        *retry = FIRST_RETRY;
        tracing::info!(
            node = self.inner.node_id,
            shards = self.keys().announcement_shards().len(),
            "listening for other nodes' events (sharded) and commands on the Redis Cluster"
        );
        let mut catch_up = true;
        loop {
            if catch_up && pushes.is_empty() {
                catch_up = false;
                // Whatever was announced while a shard was not listened to is in the log.
                if let Err(error) = hub.catch_up_all().await {
                    tracing::warn!(%error, "catching up after (re)subscribing failed");
                }
            }
            let Some(push) = pushes.recv().await else {
                return Ok(());
            };
            match push.kind {
                PushKind::Message | PushKind::SMessage => {
                    let mut data = push.data.into_iter();
                    let (Some(channel), Some(payload)) = (data.next(), data.next()) else {
                        continue;
                    };
                    let channel: String = redis::from_redis_value(channel)?;
                    let payload: String = redis::from_redis_value(payload)?;
                    if channel == commands {
                        self.on_command(payload);
                    } else if channel == replies {
                        self.on_reply(&payload);
                    } else if channel == handover {
                        self.inner.handover.notify_one();
                    } else {
                        self.on_announcement(hub, &payload);
                    }
                }
                // A (re)subscription confirmed (the connection renews its subscriptions
                // after a slot move): catch up once the pushes pause.
                PushKind::SSubscribe | PushKind::Subscribe => catch_up = true,
                // A master's connection lost. The cluster connection would resubscribe by
                // itself, but a resubscription made while the cluster is still down fails
                // unnoticed; so start over, as on one Redis: subscribe everything anew
                // (with backoff while that fails), then catch up.
                PushKind::Disconnection => {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "lost the connection to a Redis Cluster node",
                    )));
                }
                _ => {}
            }
        }
    }

    fn on_announcement(&self, hub: &Hub, payload: &str) {
        match Announcement::parse(payload) {
            Some(a) => hub.announce(a.session_id, &a.epoch, a.last_seq),
            None => tracing::warn!(payload, "malformed announcement"),
        }
    }

    /// Runs a forwarded command in its own task, so a slow one never holds up delivery.
    fn on_command(&self, payload: String) {
        let Ok(envelope) = serde_json::from_str::<Envelope>(&payload) else {
            tracing::warn!(payload, "malformed forwarded command");
            return;
        };
        let Some(handler) = self.inner.handler.get().cloned() else {
            return;
        };
        let mut redis = self.inner.redis.clone();
        tokio::spawn(async move {
            let reply = handler.handle(envelope.command).await;
            let answer = ReplyEnvelope {
                request_id: envelope.request_id,
                reply,
            };
            let payload = serde_json::to_string(&answer).expect("replies serialize");
            if let Err(error) = redis
                .publish::<_, _, i64>(&envelope.reply_to, payload)
                .await
            {
                tracing::warn!(%error, "could not reply to a forwarded command");
            }
        });
    }

    fn on_reply(&self, payload: &str) {
        let Ok(answer) = serde_json::from_str::<ReplyEnvelope>(payload) else {
            tracing::warn!(payload, "malformed reply");
            return;
        };
        if let Some(tx) = self
            .inner
            .pending
            .lock()
            .unwrap()
            .remove(&answer.request_id)
        {
            let _ = tx.send(answer.reply);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_only_after_a_grace_of_successful_heartbeats() {
        let lease = Duration::from_secs(10);
        let mut judge = Judge::new(lease);
        let start = Instant::now();
        // A node that just started has no evidence yet.
        assert!(!judge.heartbeat_succeeded(start));
        assert!(!judge.heartbeat_succeeded(start + lease));
        assert!(judge.heartbeat_succeeded(start + lease * JUDGE_AFTER));
        // An outage: the grace starts again from the first heartbeat that succeeds.
        judge.heartbeat_failed();
        let back = start + lease * 5;
        assert!(!judge.heartbeat_succeeded(back));
        assert!(!judge.heartbeat_succeeded(back + lease));
        assert!(judge.heartbeat_succeeded(back + lease * JUDGE_AFTER));
    }
}
