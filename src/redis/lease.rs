//! [`Lease`]: a key that names the one node doing a cluster-wide job (consuming the ingest
//! stream, forwarding the Socket.IO emitters' messages), held while it is renewed.

use std::time::Duration;

use redis::aio::ConnectionLike;

/// Deletes the lease if `ARGV[1]` holds it.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;
/// Renews the lease if `ARGV[1]` holds it or nobody does; 1 when it is ours.
const TAKE: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;

/// One node's handle on a lease key.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The key.
    pub key: String,
    /// This node's name, the key's value while it holds the lease.
    pub holder: String,
    /// How long the lease lasts without renewal.
    pub ttl: Duration,
}

impl Lease {
    /// Takes or renews the lease; whether this node holds it.
    pub async fn renew(
        &self,
        redis: &mut (impl ConnectionLike + Send),
    ) -> redis::RedisResult<bool> {
        let ours: i64 = redis::Script::new(TAKE)
            .key(&self.key)
            .arg(&self.holder)
            .arg(self.ttl.as_millis() as u64)
            .invoke_async(redis)
            .await?;
        Ok(ours == 1)
    }

    /// Gives the lease back, if this node holds it, so another node goes on at once.
    pub async fn release(
        &self,
        redis: &mut (impl ConnectionLike + Send),
    ) -> redis::RedisResult<()> {
        let _: i64 = redis::Script::new(RELEASE)
            .key(&self.key)
            .arg(&self.holder)
            .invoke_async(redis)
            .await?;
        Ok(())
    }
}
