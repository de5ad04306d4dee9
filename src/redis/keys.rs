//! [`Keys`]: the name of every Redis key and channel herald uses.

use std::sync::Arc;

/// Every key and channel name under one prefix (`--redis-prefix`); nothing else in herald
/// spells one. Nodes with the same prefix on the same Redis form one cluster.
///
/// A session's keys hold its id in a Redis Cluster hash tag (`{<session>}`), so they all
/// hash to one slot and the scripts and transactions that use several of them stay on one
/// shard. (Session ids never contain braces; a prefix should not either, or its own braces
/// would be taken for the tag.)
///
/// On a Redis Cluster ([`Keys::cluster`]) three shared keys that a script or transaction
/// uses together with another are hash-tagged into that one's slot, and announcements go to
/// [`ANNOUNCEMENT_SHARDS`] sharded channels; every other name is the same as on one Redis.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: Arc<str>,
    /// The sharded announcement channels (Redis Cluster); empty on one Redis.
    shards: Arc<[String]>,
}

/// Sharded announcement channels on a Redis Cluster. Each one's hash tag is chosen so that
/// channel `i` hashes into the `i`-th of as many equal slot ranges, so they spread over the
/// masters as evenly as the slots do.
pub const ANNOUNCEMENT_SHARDS: usize = 16;

/// Slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its hash tag (what is between the
/// first `{` and the next `}`, when not empty), else of the whole key, modulo 16384.
pub fn key_slot(key: &str) -> u16 {
    crc16(hash_tag(key).as_bytes()) % SLOTS
}

/// What Redis Cluster hashes of `key`.
fn hash_tag(key: &str) -> &str {
    let Some(open) = key.find('{') else {
        return key;
    };
    match key[open + 1..].find('}') {
        Some(len) if len > 0 => &key[open + 1..open + 1 + len],
        _ => key,
    }
}

/// CRC16/XMODEM, the checksum Redis Cluster's key slots are made of.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The shard of the slot range `slot` is in.
fn shard_of_slot(slot: u16) -> usize {
    usize::from(slot) * ANNOUNCEMENT_SHARDS / usize::from(SLOTS)
}

impl Keys {
    /// The consumer group every node reads the ingest stream in.
    pub const INGEST_GROUP: &'static str = "herald";

    /// The names on one Redis.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.into(),
            shards: Arc::new([]),
        }
    }

    /// The names on a Redis Cluster: as [`Keys::new`], but [`Keys::ended`] shares
    /// [`Keys::sessions`]' slot, [`Keys::ingest_errors`] and [`Keys::emitter_lease`] share
    /// [`Keys::ingest`]'s, and announcements are sharded ([`Keys::announcement_channel`]).
    pub fn cluster(prefix: &str) -> Self {
        let shards = (0..ANNOUNCEMENT_SHARDS)
            .map(|shard| {
                // About ANNOUNCEMENT_SHARDS tries find a tag in the shard's range; the bound
                // only keeps the loop finite.
                let tag = (0..100_000u32)
                    .map(|n| format!("{prefix}:events:{shard}.{n}"))
                    .find(|tag| shard_of_slot(key_slot(tag)) == shard)
                    .unwrap_or_else(|| format!("{prefix}:events:{shard}"));
                format!("{prefix}:events:{shard}{{{tag}}}")
            })
            .collect();
        Self {
            prefix: prefix.into(),
            shards,
        }
    }

    /// Whether these are a Redis Cluster's names.
    pub fn is_cluster(&self) -> bool {
        !self.shards.is_empty()
    }

    /// `name` hash-tagged into the slot of the key `with` (on a cluster; else just `name`).
    fn beside(&self, name: &str, with: &str) -> String {
        if self.is_cluster() {
            format!("{}{{{with}}}", self.shared(name))
        } else {
            self.shared(name)
        }
    }

    fn session(&self, kind: &str, session_id: &str) -> String {
        format!("{}:{kind}:{{{session_id}}}", self.prefix)
    }

    fn shared(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    // Per session (hash-tagged).

    /// Hash of the session's log head (`seq`, `epoch`): the log's incarnation.
    pub fn head(&self, session_id: &str) -> String {
        self.session("head", session_id)
    }

    /// Stream of the session's retained events.
    pub fn log(&self, session_id: &str) -> String {
        self.session("log", session_id)
    }

    /// Sorted set of the session's accepted idempotency keys, scored by `seq`.
    pub fn idempotency_keys(&self, session_id: &str) -> String {
        self.session("keys", session_id)
    }

    /// The session's snapshot (JSON).
    pub fn snapshot(&self, session_id: &str) -> String {
        self.session("snap", session_id)
    }

    /// The version of the session's snapshot: a counter the compare-and-set of a fold checks.
    pub fn snapshot_version(&self, session_id: &str) -> String {
        self.session("snapv", session_id)
    }

    /// The checkpoint of the session's run (JSON), while it runs.
    pub fn run(&self, session_id: &str) -> String {
        self.session("run", session_id)
    }

    // Shared by all sessions.

    /// Set of the sessions with a run checkpoint: the runs that have not ended.
    pub fn runs(&self) -> String {
        self.shared("runs")
    }

    /// Channel a node stopping names the runs it hands over on, so another takes them at once.
    pub fn handover(&self) -> String {
        self.shared("handover")
    }

    /// Sorted set of session ids by creation time.
    pub fn sessions(&self) -> String {
        self.shared("sessions")
    }

    /// Sorted set of ended session ids by the time they ended (on a cluster, in
    /// [`Keys::sessions`]' slot, so both indexes change in one transaction).
    pub fn ended(&self) -> String {
        self.beside("ended", &self.sessions())
    }

    /// Channel every append is announced on ([`super::Announcement`]), on one Redis.
    pub fn announcements(&self) -> String {
        self.shared("events")
    }

    /// The channel `session_id`'s appends are announced on: [`Keys::announcements`] on one
    /// Redis (classic pub/sub); on a cluster the sharded channel of the slot range its keys
    /// are in (`SPUBLISH`/`SSUBSCRIBE`).
    pub fn announcement_channel(&self, session_id: &str) -> String {
        if self.shards.is_empty() {
            return self.announcements();
        }
        self.shards[shard_of_slot(key_slot(session_id))].clone()
    }

    /// The sharded announcement channels every node subscribes to (a cluster's; none on one
    /// Redis).
    pub fn announcement_shards(&self) -> &[String] {
        &self.shards
    }

    /// Hash of orchestrated sessions to the node running each.
    pub fn owners(&self) -> String {
        self.shared("owners")
    }

    /// A node's liveness key (expires after one lease).
    pub fn alive(&self, node_id: &str) -> String {
        self.shared(&format!("alive:{node_id}"))
    }

    /// Channel of commands forwarded to a node.
    pub fn node(&self, node_id: &str) -> String {
        self.shared(&format!("node:{node_id}"))
    }

    /// Channel of the replies to a node's forwarded commands.
    pub fn reply(&self, node_id: &str) -> String {
        self.shared(&format!("reply:{node_id}"))
    }

    /// The stream workers add events to (documented; its name must not change).
    pub fn ingest(&self) -> String {
        self.shared("ingest")
    }

    /// Stream describing refused ingest entries.
    /// On a cluster in [`Keys::ingest`]'s slot, as the consumer acknowledges an entry and
    /// records its refusal in one transaction.
    pub fn ingest_errors(&self) -> String {
        self.beside("ingest:errors", &self.ingest())
    }

    /// Key naming the node that consumes the ingest stream.
    pub fn ingest_lease(&self) -> String {
        self.shared("ingest:lease")
    }

    /// Key naming the node that translates the Socket.IO emitters' messages.
    /// On a cluster in [`Keys::ingest`]'s slot, as the translator's script checks it and
    /// adds to the stream.
    pub fn emitter_lease(&self) -> String {
        self.beside("emitters:lease", &self.ingest())
    }
}

#[cfg(test)]
mod tests {
    use super::{Keys, hash_tag};

    /// The names docs/deployment.md documents.
    #[test]
    fn names() {
        let keys = Keys::new("herald");
        let session = "user:7.a-b";
        assert_eq!(keys.head(session), "herald:head:{user:7.a-b}");
        assert_eq!(keys.log(session), "herald:log:{user:7.a-b}");
        assert_eq!(keys.idempotency_keys(session), "herald:keys:{user:7.a-b}");
        assert_eq!(keys.snapshot(session), "herald:snap:{user:7.a-b}");
        assert_eq!(keys.snapshot_version(session), "herald:snapv:{user:7.a-b}");
        assert_eq!(keys.sessions(), "herald:sessions");
        assert_eq!(keys.ended(), "herald:ended");
        assert_eq!(keys.announcements(), "herald:events");
        assert_eq!(keys.owners(), "herald:owners");
        assert_eq!(keys.alive("n1"), "herald:alive:n1");
        assert_eq!(keys.node("n1"), "herald:node:n1");
        assert_eq!(keys.reply("n1"), "herald:reply:n1");
        assert_eq!(keys.ingest(), "herald:ingest");
        assert_eq!(keys.ingest_errors(), "herald:ingest:errors");
        assert_eq!(keys.ingest_lease(), "herald:ingest:lease");
    }

    #[test]
    fn a_sessions_keys_share_one_hash_slot() {
        let keys = Keys::new("herald-test:x");
        let session = "s-1";
        for key in [
            keys.head(session),
            keys.log(session),
            keys.idempotency_keys(session),
            keys.snapshot(session),
            keys.snapshot_version(session),
        ] {
            assert_eq!(hash_tag(&key), session, "{key}");
        }
    }
}

#[cfg(test)]
mod cluster_tests {
    use super::*;

    /// The slots `CLUSTER KEYSLOT` gives (Redis 7).
    #[test]
    fn slots_are_redis_clusters() {
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(key_slot("123456789"), 12739);
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        assert_eq!(key_slot("foo{}{bar}"), key_slot("foo{}{bar}"));
        assert_eq!(hash_tag("foo{}{bar}"), "foo{}{bar}");
        assert_eq!(hash_tag("foo{{bar}}zap"), "{bar");
    }

    /// On a cluster only the names that must share a slot change; the rest (documented, and
    /// the only ones an existing single-Redis deployment has) are the same.
    #[test]
    fn cluster_names() {
        let keys = Keys::cluster("herald");
        let single = Keys::new("herald");
        assert_eq!(keys.ended(), "herald:ended{herald:sessions}");
        assert_eq!(key_slot(&keys.ended()), key_slot(&keys.sessions()));
        assert_eq!(keys.ingest(), "herald:ingest");
        assert_eq!(keys.ingest_errors(), "herald:ingest:errors{herald:ingest}");
        assert_eq!(keys.emitter_lease(), "herald:emitters:lease{herald:ingest}");
        for key in [keys.ingest_errors(), keys.emitter_lease()] {
            assert_eq!(key_slot(&key), key_slot("herald:ingest"), "{key}");
        }
        for (a, b) in [
            (keys.head("s"), single.head("s")),
            (keys.log("s"), single.log("s")),
            (keys.sessions(), single.sessions()),
            (keys.owners(), single.owners()),
            (keys.ingest_lease(), single.ingest_lease()),
            (keys.runs(), single.runs()),
        ] {
            assert_eq!(a, b);
        }
        assert!(!single.is_cluster() && keys.is_cluster());
        assert_eq!(single.announcement_channel("s"), "herald:events");
        assert!(single.announcement_shards().is_empty());
    }

    /// Shard `i`'s channel hashes into the `i`-th slot range, and a session is announced on
    /// the shard of its keys' slot range.
    #[test]
    fn announcement_shards_spread_over_the_slot_ranges() {
        let keys = Keys::cluster("herald-test:x");
        let shards = keys.announcement_shards();
        assert_eq!(shards.len(), ANNOUNCEMENT_SHARDS);
        for (i, channel) in shards.iter().enumerate() {
            let slot = key_slot(channel);
            assert_eq!(shard_of_slot(slot), i, "{channel} is in slot {slot}");
            assert!(channel.starts_with("herald-test:x:events:"), "{channel}");
        }
        let mut used = std::collections::BTreeSet::new();
        for n in 0..1000 {
            let session = format!("s-{n}");
            let channel = keys.announcement_channel(&session);
            let shard = shards.iter().position(|c| *c == channel).unwrap();
            assert_eq!(shard, shard_of_slot(key_slot(&keys.head(&session))));
            used.insert(shard);
        }
        assert_eq!(used.len(), ANNOUNCEMENT_SHARDS);
        assert!(usize::from(SLOTS) % ANNOUNCEMENT_SHARDS == 0);
    }
}
