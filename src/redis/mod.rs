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

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

pub use announcement::Announcement;
pub use emitters::{EmitterChannels, EmitterLimits, Emitters};
pub use ingest::Ingest;
pub use keys::{ANNOUNCEMENT_SHARDS, Keys, key_slot};
pub use lease::Lease;
pub use log::RedisLog;
pub use store::RedisStore;

/// How long a connection attempt may take, and a reply: an unreachable Redis is reported in
/// about a second instead of hanging requests.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Where herald's Redis is: one server (`redis://`, `rediss://`), or a Redis Cluster
/// (`--redis-cluster`: the URL lists seed nodes, comma separated). Nothing else in herald
/// builds a client or a connection.
#[derive(Clone)]
pub struct Redis {
    target: Target,
}

#[derive(Clone)]
enum Target {
    Single(redis::Client),
    Cluster {
        seeds: Vec<redis::Client>,
        urls: Vec<String>,
    },
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_cluster() {
            "Redis(cluster)"
        } else {
            "Redis(single)"
        })
    }
}

impl Redis {
    /// One Redis at `url`.
    pub fn single(url: &str) -> redis::RedisResult<Self> {
        Ok(Self {
            target: Target::Single(redis::Client::open(url)?),
        })
    }

    /// A Redis Cluster reached through `seeds` (comma separated URLs, at least one; the
    /// other nodes are found from them).
    pub fn cluster(seeds: &str) -> redis::RedisResult<Self> {
        let urls: Vec<String> = seeds
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .collect();
        if urls.is_empty() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "a Redis Cluster URL names at least one seed node",
            )));
        }
        let seeds = urls
            .iter()
            .map(|url| redis::Client::open(url.as_str()))
            .collect::<redis::RedisResult<_>>()?;
        Ok(Self {
            target: Target::Cluster { seeds, urls },
        })
    }

    /// [`Redis::cluster`] when `cluster`, else [`Redis::single`].
    pub fn open(url: &str, cluster: bool) -> redis::RedisResult<Self> {
        if cluster {
            Self::cluster(url)
        } else {
            Self::single(url)
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster { .. })
    }

    /// The key and channel names under `prefix` for this deployment ([`Keys::cluster`] on a
    /// cluster).
    pub fn keys(&self, prefix: &str) -> Keys {
        if self.is_cluster() {
            Keys::cluster(prefix)
        } else {
            Keys::new(prefix)
        }
    }

    fn cluster_builder(urls: &[String]) -> ClusterClientBuilder {
        ClusterClientBuilder::new(urls.iter().map(String::as_str))
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .retries(2)
            .min_retry_wait(50)
            .max_retry_wait(1000)
    }

    /// A self-reconnecting connection, with [`CONNECT_TIMEOUT`] and [`RESPONSE_TIMEOUT`]: a
    /// connection manager to one Redis, or a cluster connection (which follows the slots
    /// and reconnects to each master by itself).
    pub async fn connect(&self) -> redis::RedisResult<Connection> {
        match &self.target {
            Target::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(2)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_secs(1));
                let manager = ConnectionManager::new_with_config(client.clone(), config).await?;
                Ok(Connection::Single(manager))
            }
            Target::Cluster { urls, .. } => {
                let client = Self::cluster_builder(urls).build()?;
                Ok(Connection::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// A connection whose replies may take up to `response_timeout` (blocking reads), not
    /// reconnecting by itself: its user reconnects after an error.
    pub async fn connect_blocking(
        &self,
        response_timeout: Duration,
    ) -> redis::RedisResult<Connection> {
        match &self.target {
            Target::Single(client) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(response_timeout));
                let connection = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Ok(Connection::Direct(connection))
            }
            Target::Cluster { urls, .. } => {
                let client = Self::cluster_builder(urls)
                    .response_timeout(response_timeout)
                    .build()?;
                Ok(Connection::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// A RESP3 connection to one node that hands every push (pub/sub message) to `sender`,
    /// for classic `SUBSCRIBE`/`PSUBSCRIBE`: on a cluster a classic `PUBLISH` reaches the
    /// subscribers of every node, so the first seed that answers will do.
    pub async fn connect_push(
        &self,
        sender: impl redis::aio::AsyncPushSender + Clone,
    ) -> redis::RedisResult<MultiplexedConnection> {
        let clients: &[redis::Client] = match &self.target {
            Target::Single(client) => std::slice::from_ref(client),
            Target::Cluster { seeds, .. } => seeds,
        };
        let mut last = None;
        for client in clients {
            let info = client.get_connection_info().clone();
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_push_sender(sender.clone());
            let connected = match redis::Client::open(info.set_redis_settings(settings)) {
                Ok(client) => {
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                }
                Err(error) => Err(error),
            };
            match connected {
                Ok(connection) => return Ok(connection),
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "no Redis node"))
        }))
    }

    /// The one Redis's client (classic pub/sub); `None` on a cluster.
    pub fn single_client(&self) -> Option<&redis::Client> {
        match &self.target {
            Target::Single(client) => Some(client),
            Target::Cluster { .. } => None,
        }
    }

    /// A RESP3 cluster connection handing every push to `sender`: its subscriptions
    /// (sharded ones included) follow the slots and are renewed after every reconnection.
    /// `None` on a single Redis.
    pub async fn connect_cluster_push(
        &self,
        sender: impl redis::aio::AsyncPushSender,
    ) -> Option<redis::RedisResult<ClusterConnection>> {
        let Target::Cluster { urls, .. } = &self.target else {
            return None;
        };
        let connected = async {
            let client = Self::cluster_builder(urls)
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(sender)
                .build()?;
            client.get_async_connection().await
        };
        Some(connected.await)
    }
}

/// A connection to herald's Redis, whichever kind ([`Redis::connect`]): every backend
/// sends its commands through this one type.
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Direct(MultiplexedConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
            Connection::Direct(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Direct(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
            Connection::Direct(c) => c.get_db(),
        }
    }
}

/// A client and a self-reconnecting connection to one Redis at `url` ([`Redis::connect`]).
pub async fn connect(url: &str) -> redis::RedisResult<(Redis, Connection)> {
    let redis = Redis::single(url)?;
    let connection = redis.connect().await?;
    Ok((redis, connection))
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
