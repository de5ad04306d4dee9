//! Everything herald keeps in Redis (with `--redis-url`), in one place: connecting
//! ([`connect`], `rediss://` included), the name of every key and channel ([`Keys`]), the
//! append announcement's format ([`Announcement`]), and the Redis backends: the event log
//! ([`RedisLog`]), the session store ([`RedisStore`]), the worker ingest stream
//! ([`Ingest`]) and the Socket.IO emitters' translator ([`Emitters`]), under a [`Lease`]. Cluster liveness and command forwarding ([`crate::cluster`]) use the keys
//! and connections from here.

mod announcement;
mod emitters;
mod ingest;
mod keys;
mod lease;
mod log;
mod store;

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

pub use announcement::Announcement;
pub use emitters::{EmitterChannels, EmitterLimits, Emitters};
pub use ingest::Ingest;
pub use keys::Keys;
pub use lease::Lease;
pub use log::RedisLog;
pub use store::RedisStore;

/// A client and a self-reconnecting connection to `url` (`redis://`, or `rediss://` for
/// TLS), with timeouts short enough that an unreachable Redis is reported in about a
/// second instead of hanging requests.
pub async fn connect(url: &str) -> redis::RedisResult<(redis::Client, ConnectionManager)> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(3)))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(1));
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
            tokio::time::sleep(Duration::from_millis(100)).await;
            request().await
        }
        other => other,
    }
}
