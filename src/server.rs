//! Wiring: builds the stores, the hub, the Socket.IO layer and the HTTP router, serves
//! them on one listener and shuts down gracefully.
//!
//! The accept loop is herald's own (axum's `serve` cannot set a header timeout): it caps
//! open connections (`--max-connections`) and gives hyper its header read timeout.

mod connection;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{OriginalUri, Request};
use axum::http::{HeaderValue, Method, Uri};
use axum::response::IntoResponse;
use socketioxide::SocketIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tower_http::trace::TraceLayer;

use crate::auth::{Auth, AuthConfigError, OriginPolicy};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::edge::{EdgeLimits, RateLimits};
use crate::http::{ApiState, EdgeGuard, edge_guard, router};
use crate::hub::Hub;
use crate::log::{EventLog, MemoryLog};
use crate::metrics::Metrics;
use crate::orchestrator::Orchestrator;
use crate::orchestrator::config::{ConfigError, ModelsFile};
use crate::redis::{RedisLog, RedisStore};
use crate::socket;
use crate::store::{MemoryStore, SessionStore};
use crate::subscriber;

/// How often ended sessions and idle gates are swept: often enough that a session outlives
/// its TTL by at most half of it (and never by more than five seconds).
fn sweep_interval(ttl: Duration) -> Duration {
    (ttl / 2).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid CORS origin `{0}`")]
    CorsOrigin(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
    #[error("cannot use Redis at {url}: {message}")]
    Redis { url: String, message: String },
    #[error(transparent)]
    DataDir(#[from] crate::datadir::DataDirError),
    #[error("server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// A bound, not yet serving, herald.
pub struct Server {
    listener: TcpListener,
    app: axum::Router,
    hub: Hub,
    config: Config,
    orchestrator: Orchestrator,
    /// The other nodes, in cluster mode.
    cluster: Option<Cluster>,
    edge: EdgeLimits,
}

impl Server {
    /// Builds everything and binds the listener, so the address is known before serving.
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        let addr = SocketAddr::new(config.host, config.port);
        let listener = listen(addr, config.listen_backlog)
            .map_err(|source| ServerError::Bind { addr, source })?;
        let metrics = Arc::new(Metrics::default());
        let (io_layer, io) = SocketIo::builder()
            .max_payload(config.max_payload)
            .max_buffer_size(config.effective_socket_buffer())
            .ping_interval(Duration::from_millis(config.ping_interval_ms))
            .ping_timeout(Duration::from_millis(config.ping_timeout_ms))
            .ws_read_buffer_size(config.ws_read_buffer)
            // The same inbound limit on both transports (engineioxide's websocket default is 64 MiB).
            .ws_max_message_size(usize::try_from(config.max_payload).unwrap_or(usize::MAX))
            .build_layer();
        let auth = Auth::from_config(&config)?;
        announce_auth(&auth);
        let (log, store, cluster) = backends(&config).await?;
        let hub = Hub::new(log, store, io.clone(), metrics.clone());
        let subscribers = subscriber::Limits {
            max_subscriptions: config.max_subscriptions,
            requests_per_sec: config.subscribe_rate.max(1),
            invalid_per_sec: config.invalid_event_rate.max(1),
            queue: config.effective_socket_buffer(),
            heartbeat: Duration::from_millis(config.stream_heartbeat_ms),
        };
        socket::register(&io, hub.clone(), subscribers, auth.clone());
        let models = match &config.models {
            Some(models) => models.clone(),
            None => ModelsFile::load(config.config_file.as_deref())?,
        };
        let orchestrator =
            Orchestrator::new(hub.clone(), models, cluster.clone(), config.run_limits());
        if let Some(cluster) = &cluster {
            cluster.set_handler(Arc::new(orchestrator.clone()));
        }
        let edge = config.edge_limits();
        let limits = Arc::new(RateLimits::new(&edge));
        let guard = EdgeGuard {
            limits: limits.clone(),
            auth: auth.clone(),
            body_timeout: edge.body_timeout,
            metrics,
        };
        let api = ApiState {
            hub: hub.clone(),
            dev: config.dev,
            orchestrator: orchestrator.clone(),
            max_batch: config.max_batch.max(1),
            max_event_bytes: config.max_event_bytes,
            auth,
            limits,
            subscribers,
        };
        let origins = OriginPolicy::new(config.dev, &config.cors_origins);
        let app = router(api, config.max_body)
            .layer(io_layer)
            .layer(axum::middleware::from_fn(crate::assets::serve))
            .layer(axum::middleware::map_request(detach_handshake_head))
            .layer(axum::middleware::from_fn_with_state(origins, check_origin))
            // Inside CORS, so that a browser can read a 429.
            .layer(axum::middleware::from_fn_with_state(guard, edge_guard))
            .layer(cors(&config)?)
            .layer(TraceLayer::new_for_http());
        Ok(Self {
            listener,
            app,
            hub,
            config,
            orchestrator,
            cluster,
            edge,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then drains in this order: stop accepting
    /// connections and requests (those in flight go on); end the running sessions (each publishes its last
    /// events, which reach its subscribers); drop every socket's transport (clients
    /// reconnect elsewhere, or here once the node is back, and resume by replay); let
    /// in-flight HTTP requests finish while the background work stops (the ingest consumer
    /// between two entries, handing its lease back). The whole drain fits in the configured
    /// shutdown timeout, counted from the signal: each step has what the earlier ones left,
    /// and connections still open at the deadline are dropped.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let Server {
            listener,
            app,
            hub,
            config,
            orchestrator,
            cluster,
            edge,
        } = self;
        // In a cluster, watching the nodes resumes what is left (handed over, or lost).
        if cluster.is_none() {
            match orchestrator.resume_saved().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(runs = n, "resumed the runs saved before the restart"),
                Err(error) => tracing::warn!(%error, "could not resume the saved runs"),
            }
        }
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(sweep_forever(
            hub.clone(),
            config.session_ttl(),
            config.session_idle_ttl(),
            stop.clone(),
        ));
        if let Some(cluster) = cluster {
            // Reading and refreshing only: they may stop at any await.
            tasks.spawn(
                stop.clone()
                    .run_until_cancelled_owned(cluster.clone().listen_forever(hub.clone())),
            );
            tasks.spawn(
                stop.clone()
                    .run_until_cancelled_owned(watch_nodes(cluster.clone(), orchestrator.clone())),
            );
            tasks.spawn(cluster.ingest(
                hub.clone(),
                Arc::new(orchestrator.clone()),
                config.max_batch.max(1),
                config.max_event_bytes,
                stop.clone(),
            ));
            let channels = config.emitter_channels();
            if !channels.is_empty() {
                let limits = crate::redis::EmitterLimits {
                    max_message_bytes: config.max_body,
                    max_event_bytes: config.max_event_bytes,
                    max_batch: config.max_batch.max(1),
                };
                tasks.spawn(cluster.emitters(channels, limits, hub.clone(), stop.clone()));
            }
        }
        let grace = Duration::from_secs(config.shutdown_timeout_secs);
        let (began_tx, began_rx) = oneshot::channel();
        let signal = async move {
            shutdown.await;
            let _ = began_tx.send(Instant::now() + grace);
        };
        let stop_background = stop.clone();
        let wind_down = move |deadline: Instant| async move {
            tracing::info!(
                "shutting down: ending runs, closing sockets, finishing in-flight requests"
            );
            if tokio::time::timeout_at(deadline, orchestrator.shutdown(grace))
                .await
                .is_err()
            {
                tracing::warn!("shutdown: runs did not end within the shutdown timeout");
            }
            tracing::debug!("shutdown: runs ended");
            close_sockets(&hub, deadline).await;
            stop_background.cancel();
        };
        let server = accept_until(listener, app, edge, signal, began_rx, wind_down);
        let (drained, deadline) = server.await;
        match drained {
            Drained::Cleanly => {}
            Drained::DeadlinePassed { open } => {
                tracing::warn!(
                    connections = open,
                    "shutdown timeout elapsed with requests still open; dropping them"
                );
            }
        }
        stop.cancel();
        tasks.close();
        // The background work stops between two steps; it was told to when the sockets
        // closed, and has until the deadline (at least a short allowance past a drain that
        // used it all), so an ingest consumer hands its lease back rather than leave it to
        // expire.
        let until = deadline.max(Instant::now() + BACKGROUND_STOP_WITHIN);
        if tokio::time::timeout_at(until, tasks.wait()).await.is_err() {
            tracing::warn!("background work did not stop in time");
        }
        Ok(())
    }
}

/// How long shutdown waits for closed sockets to confirm before it drains HTTP.
const SOCKETS_CLOSE_WITHIN: Duration = Duration::from_secs(2);

/// How long the background work has to stop once the HTTP drain is over.
const BACKGROUND_STOP_WITHIN: Duration = Duration::from_secs(1);

/// Closes every socket. Closing them ends long-polling requests, which would otherwise
/// hold the drain open until they time out. Every transport is told to close at once;
/// waiting for each to confirm is bounded, since a socket that is mid-upgrade or whose
/// peer vanished may only confirm at its ping timeout.
async fn close_sockets(hub: &Hub, deadline: Instant) {
    let within = deadline.min(Instant::now() + SOCKETS_CLOSE_WITHIN);
    if tokio::time::timeout_at(within, hub.close()).await.is_err() {
        tracing::warn!("shutdown: some sockets did not confirm their close; going on");
    } else {
        tracing::debug!("shutdown: sockets closed");
    }
}

/// How the HTTP drain ended.
enum Drained {
    Cleanly,
    DeadlinePassed { open: usize },
}

/// Accepts connections until `shutdown` resolves, then stops accepting and asks each open
/// HTTP connection to finish the request it is serving and close; runs `wind_down` (which
/// ends the long-polls), and waits for the connections until the deadline `began` carries.
/// (An upgraded websocket is no longer an HTTP connection: the hub closes those.)
async fn accept_until<W, F>(
    listener: TcpListener,
    app: axum::Router,
    edge: EdgeLimits,
    shutdown: impl Future<Output = ()>,
    began: oneshot::Receiver<Instant>,
    wind_down: W,
) -> (Drained, Instant)
where
    W: FnOnce(Instant) -> F,
    F: Future<Output = ()>,
{
    let slots = Arc::new(Semaphore::new(
        edge.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let refused = AtomicU64::new(0);
    let draining = CancellationToken::new();
    let connections = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(error).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refuse(stream, peer, &refused, edge.max_connections);
            continue;
        };
        connections.spawn(connection::serve(
            stream,
            slot,
            peer,
            app.clone(),
            edge.header_timeout,
            draining.clone(),
        ));
    }
    // Nothing new from here: no connection, and no further request on a kept-alive one (a
    // client reconnecting over one would open a socket that holds the drain open).
    drop(listener);
    draining.cancel();
    let deadline = began.await.unwrap_or_else(|_| Instant::now());
    wind_down(deadline).await;
    connections.close();
    if tokio::time::timeout_at(deadline, connections.wait())
        .await
        .is_err()
    {
        let open = connections.len();
        return (Drained::DeadlinePassed { open }, deadline);
    }
    tracing::debug!("shutdown: connections drained");
    (Drained::Cleanly, deadline)
}

/// A connection over `--max-connections`: closed at once, nothing read or written, so it
/// costs a file descriptor for microseconds. Logged at the 1st, 2nd, 4th, 8th... refusal.
/// Binds `addr` with an accept queue of `backlog` (tokio's `TcpListener::bind` fixes it at
/// 1,024), with `SO_REUSEADDR` as tokio sets it, so a restart can bind at once.
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

fn refuse(stream: TcpStream, peer: SocketAddr, refused: &AtomicU64, max: usize) {
    drop(stream);
    let count = refused.fetch_add(1, Ordering::Relaxed) + 1;
    if count.is_power_of_two() {
        tracing::warn!(
            %peer,
            refused = count,
            max_connections = max,
            "connection refused: as many connections are open as --max-connections allows"
        );
    }
}

/// An accept that failed: a connection that died in the backlog is nothing; anything else
/// (out of file descriptors) is waited out briefly rather than spun on.
async fn accept_failed(error: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        error.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::warn!(%error, "accept failed; retrying in 100 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Keeps this node's liveness fresh and ends the sessions of nodes that were lost.
/// Refreshes this node's lease, resumes the runs of nodes whose lease ran out, and takes
/// its share of the runs handed over (woken at once when a node hands some over).
async fn watch_nodes(cluster: Cluster, orchestrator: Orchestrator) {
    let mut tick = tokio::time::interval(cluster.lease() / 3);
    loop {
        let heartbeat = tokio::select! {
            _ = tick.tick() => true,
            () = cluster.handed_over() => false,
        };
        if heartbeat {
            match cluster.heartbeat().await {
                Ok(lost) => {
                    for session_id in lost {
                        tracing::warn!(
                            session_id,
                            "the node running this session was lost; resuming its run"
                        );
                        if let Err(error) = orchestrator.resume(&session_id).await {
                            tracing::warn!(session_id, %error, "could not resume a lost node's run");
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "cluster heartbeat failed"),
            }
        }
        match orchestrator.resume_saved().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(runs = n, "resumed runs another node handed over"),
            Err(error) => tracing::warn!(%error, "could not resume the runs handed over"),
        }
    }
}

async fn sweep_forever(hub: Hub, ttl: Duration, idle: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(sweep_interval(ttl.min(idle)));
    loop {
        // A sweep, once begun, runs to its end: it removes what it took from the store.
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match hub.sweep(ttl, idle).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(sessions = n, "dropped ended and idle sessions"),
            Err(error) => tracing::warn!(%error, "session sweep failed"),
        }
    }
}

fn announce_auth(auth: &Auth) {
    if !auth.is_enabled() {
        tracing::warn!(
            "auth is off: anyone who can reach this server may read, answer, cancel and create \
             every session; set --jwt-secret, --jwt-public-key or HERALD_API_KEYS to turn it on"
        );
    }
}

/// Refuses a browser page from another origin on the Socket.IO transports (SPEC §5):
/// browsers do not apply CORS to websockets, and a polling handshake's answer is readable
/// by `<script>`-less tricks too, so the allow-list is enforced here for both.
async fn check_origin(
    axum::extract::State(origins): axum::extract::State<OriginPolicy>,
    request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    // Browsers apply CORS to fetches and EventSource, not to WebSocket handshakes: those
    // are checked here against the same allow-list.
    let path = request.uri().path();
    let is_handshake =
        (path.starts_with("/socket.io") && !crate::assets::is_asset(path)) || path == "/ws";
    if is_handshake && !origins.allows(request.headers()) {
        return crate::http::ApiError::new(
            crate::error::ErrorCode::OriginNotAllowed,
            "this page's origin is not allowed to connect (see --cors-origins)",
        )
        .into_response();
    }
    next.run(request).await
}

/// Copies a Socket.IO handshake request's URI and header values out of hyper's read buffer.
///
/// hyper parses a request in place, so its URI and header values are slices of the
/// connection's 8–16 KiB read buffer; engineioxide keeps the handshake request's parts for
/// the socket's whole life, and with them that buffer. Copying the few hundred bytes that
/// matter frees it: measured at about 15 KiB less resident memory per idle connection
/// (docs/benchmarks.md). Requests that carry a `sid` belong to an existing socket and are
/// left alone.
async fn detach_handshake_head(mut request: Request) -> Request {
    let uri = request.uri();
    let is_handshake = uri.path().starts_with("/socket.io")
        && !crate::assets::is_asset(uri.path())
        && !uri.query().is_some_and(|q| q.contains("sid="));
    if !is_handshake {
        return request;
    }
    for value in request.headers_mut().values_mut() {
        if let Ok(copy) = HeaderValue::from_bytes(value.as_bytes()) {
            *value = copy;
        }
    }
    if let Ok(uri) = request.uri().to_string().parse::<Uri>() {
        *request.uri_mut() = uri;
    }
    // axum's `OriginalUri` holds its own slice of the buffer, and nothing downstream reads
    // it. (The other extensions stay: hyper's upgrade handle lives there.)
    request.extensions_mut().remove::<OriginalUri>();
    request
}

type Backends = (Arc<dyn EventLog>, Arc<dyn SessionStore>, Option<Cluster>);

/// In-memory log and store, or (with `--data-dir`) this node's on disk, or (with
/// `--redis-url`) Redis ones shared by every node.
async fn backends(config: &Config) -> Result<Backends, ServerError> {
    let Some(url) = &config.redis_url else {
        if config.redis_cluster {
            return Err(ServerError::Redis {
                url: String::new(),
                message: "--redis-cluster needs --redis-url (the cluster's seed nodes)".into(),
            });
        }
        if let Some(path) = &config.data_dir {
            let path = path.clone();
            let (log_limits, store_limits) = (config.log_limits(), config.store_limits());
            let (log, store) = tokio::task::spawn_blocking(move || {
                crate::datadir::open(&path, log_limits, store_limits)
            })
            .await
            .map_err(|e| ServerError::Serve(io::Error::other(e)))??;
            tracing::info!(
                path = %config.data_dir.as_deref().unwrap_or(std::path::Path::new("")).display(),
                "sessions, logs and snapshots live in the data dir"
            );
            return Ok((Arc::new(log), Arc::new(store), None));
        }
        let log = Arc::new(MemoryLog::with_limits(config.log_limits()));
        let store = MemoryStore::with_limits(config.store_limits());
        return Ok((log, Arc::new(store), None));
    };
    let failed = |message: String| ServerError::Redis {
        url: crate::config::redact_url(url),
        message,
    };
    let prefix = &config.redis_prefix;
    if config.redis_cluster && prefix.contains(['{', '}']) {
        // Its braces would be taken for the hash tag that keeps a session's keys in one slot.
        return Err(failed(format!(
            "the Redis prefix `{prefix}` has a brace, which a Redis Cluster would take for a hash tag"
        )));
    }
    let redis =
        crate::redis::Redis::open(url, config.redis_cluster).map_err(|e| failed(e.to_string()))?;
    let log = RedisLog::open(&redis, prefix, config.log_limits())
        .await
        .map_err(|e| failed(e.to_string()))?;
    let log: Arc<dyn EventLog> = Arc::new(log);
    let store = RedisStore::open(&redis, prefix, log.clone(), config.store_limits())
        .await
        .map_err(|e| failed(e.to_string()))?;
    let cluster = Cluster::open(&redis, prefix, config.cluster_lease())
        .await
        .map_err(|e| failed(e.to_string()))?;
    tracing::info!(
        prefix,
        node = cluster.node_id(),
        redis_cluster = config.redis_cluster,
        "cluster mode: sessions, logs and snapshots live in Redis"
    );
    Ok((log, Arc::new(store), Some(cluster)))
}

fn cors(config: &Config) -> Result<CorsLayer, ServerError> {
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            axum::http::header::CONTENT_TYPE,
            axum::http::header::AUTHORIZATION,
        ]);
    if config.dev {
        return Ok(layer.allow_origin(Any));
    }
    let origins = config
        .cors_origins
        .iter()
        .filter(|o| !o.trim().is_empty())
        .map(|o| HeaderValue::from_str(o.trim()).map_err(|_| ServerError::CorsOrigin(o.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(layer.allow_origin(AllowOrigin::list(origins)))
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
