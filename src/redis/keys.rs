//! [`Keys`]: the name of every Redis key and channel herald uses.

use std::sync::Arc;

/// Every key and channel name under one prefix (`--redis-prefix`); nothing else in herald
/// spells one. Nodes with the same prefix on the same Redis form one cluster.
///
/// A session's keys hold its id in a Redis Cluster hash tag (`{<session>}`), so they all
/// hash to one slot and the scripts and transactions that use several of them stay on one
/// shard. (Session ids never contain braces; a prefix should not either, or its own braces
/// would be taken for the tag.)
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: Arc<str>,
}

impl Keys {
    /// The consumer group every node reads the ingest stream in.
    pub const INGEST_GROUP: &'static str = "herald";

    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.into(),
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

    /// Sorted set of ended session ids by the time they ended.
    pub fn ended(&self) -> String {
        self.shared("ended")
    }

    /// Channel every append is announced on ([`super::Announcement`]).
    pub fn announcements(&self) -> String {
        self.shared("events")
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
    pub fn ingest_errors(&self) -> String {
        self.shared("ingest:errors")
    }

    /// Key naming the node that consumes the ingest stream.
    pub fn ingest_lease(&self) -> String {
        self.shared("ingest:lease")
    }

    /// Key naming the node that translates the Socket.IO emitters' messages.
    pub fn emitter_lease(&self) -> String {
        self.shared("emitters:lease")
    }
}

#[cfg(test)]
mod tests {
    use super::Keys;

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

    /// Redis Cluster hashes only what is between the first `{` and the next `}`.
    fn hash_tag(key: &str) -> &str {
        let Some(open) = key.find('{') else {
            return key;
        };
        match key[open + 1..].find('}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        }
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
