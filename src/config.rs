//! Typed configuration: defaults < environment (`HERALD_*`) < command-line flags.
//!
//! Every flag has an environment variable so that containers and process managers can
//! configure herald without a wrapper script.

use std::net::IpAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version,
    about = "Socket.IO server that streams AI session progress"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (in-memory store, no Redis needed).
    Serve(Box<Config>),
    /// Create a session on a running herald and print its events live.
    Demo(crate::demo::DemoArgs),
    /// Print a development token signed with the HS256 secret (`--jwt-secret`).
    Token(crate::auth::TokenArgs),
}

/// Everything the server needs to start. Field docs are the `--help` text.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Models and orchestrator settings (TOML; see examples/herald.toml). Without it, three
    /// simulated models are available.
    #[arg(long = "config", env = "HERALD_CONFIG")]
    pub config_file: Option<std::path::PathBuf>,

    /// Redis URL (e.g. redis://127.0.0.1:6379): nodes sharing it share sessions, logs and
    /// rooms. Without it everything stays in this process.
    #[arg(long, env = "HERALD_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Prefix of every Redis key and channel herald uses.
    #[arg(long, env = "HERALD_REDIS_PREFIX", default_value = "herald")]
    pub redis_prefix: String,

    /// Address to listen on. Use 0.0.0.0 to accept connections from other hosts.
    #[arg(long, env = "HERALD_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// Port to listen on (0 picks a free port; the chosen one is printed on stdout).
    #[arg(long, env = "HERALD_PORT", default_value_t = 3000)]
    pub port: u16,

    /// Development mode: permissive CORS (any origin).
    #[arg(long, env = "HERALD_DEV", default_value_t = false)]
    pub dev: bool,

    /// Origins allowed by CORS, comma separated (e.g. https://app.example.com).
    #[arg(long, env = "HERALD_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Events retained per session for replay and history; older ones are dropped.
    #[arg(long, env = "HERALD_MAX_EVENTS_PER_SESSION", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_events_per_session: u64,

    /// Seconds a session is kept after it reaches a terminal status (COMPLETED, FAILED, EXPIRED).
    #[arg(long, env = "HERALD_SESSION_TTL_SECS", default_value_t = 3600)]
    pub session_ttl_secs: u64,

    /// Largest Socket.IO packet, in bytes, in either direction (socketioxide's own default is 100 kB).
    #[arg(long, env = "HERALD_MAX_PAYLOAD", default_value_t = 1024 * 1024)]
    pub max_payload: u64,

    /// Largest HTTP request body, in bytes; larger requests get 413.
    #[arg(long, env = "HERALD_MAX_BODY", default_value_t = 4 * 1024 * 1024)]
    pub max_body: usize,

    /// Most events in one ingest request.
    #[arg(long, env = "HERALD_MAX_BATCH", default_value_t = 1000)]
    pub max_batch: usize,

    /// Packets queued per socket. A live event that finds the queue full drops the socket's
    /// connection (it reconnects and recovers by replay); a replay larger than the queue is
    /// sent as the client reads, within the replay deadline. Raised to at least
    /// max-batch + 64: a batch is broadcast back to back, faster than any client reads.
    #[arg(long, env = "HERALD_SOCKET_BUFFER", default_value_t = 1024)]
    pub socket_buffer: usize,

    /// Sessions one socket may be subscribed to at once.
    #[arg(long, env = "HERALD_MAX_SUBSCRIPTIONS", default_value_t = 100)]
    pub max_subscriptions: usize,

    /// subscribe/unsubscribe requests allowed per socket per second (burst of twice that).
    #[arg(long, env = "HERALD_SUBSCRIBE_RATE", default_value_t = 50)]
    pub subscribe_rate: u32,

    /// Engine.IO ping interval in milliseconds.
    #[arg(long, env = "HERALD_PING_INTERVAL_MS", default_value_t = 25_000)]
    pub ping_interval_ms: u64,

    /// Engine.IO ping timeout in milliseconds.
    #[arg(long, env = "HERALD_PING_TIMEOUT_MS", default_value_t = 20_000)]
    pub ping_timeout_ms: u64,

    /// Websocket read buffer per connection, in bytes. Clients send herald only small frames
    /// (subscribe, pongs, acks); a larger frame still arrives, the buffer grows for it.
    #[arg(long, env = "HERALD_WS_READ_BUFFER", default_value_t = 256)]
    pub ws_read_buffer: usize,

    /// Cluster lease in milliseconds: a node whose liveness key is this old is lost, and the
    /// ingest stream's lease lasts this long. Internal (tests shorten it), hence hidden.
    #[arg(long, env = "HERALD_CLUSTER_LEASE_MS", default_value_t = 10_000, hide = true,
          value_parser = clap::value_parser!(u64).range(500..=600_000))]
    pub cluster_lease_ms: u64,

    /// HS256 secret for JWTs. Setting it (or a public key, or an API key) turns auth on.
    #[arg(
        long,
        env = "HERALD_JWT_SECRET",
        hide_env_values = true,
        help_heading = "Auth"
    )]
    pub jwt_secret: Option<Secret>,

    /// PEM file with the RS256 or ES256 public key that verifies JWTs.
    #[arg(long, env = "HERALD_JWT_PUBLIC_KEY", help_heading = "Auth")]
    pub jwt_public_key: Option<std::path::PathBuf>,

    /// Audience a JWT's `aud` must name (unchecked when unset).
    #[arg(long, env = "HERALD_JWT_AUDIENCE", help_heading = "Auth")]
    pub jwt_audience: Option<String>,

    /// Issuer a JWT's `iss` must be (unchecked when unset).
    #[arg(long, env = "HERALD_JWT_ISSUER", help_heading = "Auth")]
    pub jwt_issuer: Option<String>,

    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    #[arg(
        long,
        env = "HERALD_JWT_LEEWAY_SECS",
        default_value_t = 30,
        help_heading = "Auth"
    )]
    pub jwt_leeway_secs: u64,

    /// API keys, comma separated, each `name:secret:scope+scope` (e.g.
    /// `ocr-worker:s3cr3t:publish,ops:0ps:admin`).
    #[arg(
        long,
        env = "HERALD_API_KEYS",
        hide_env_values = true,
        value_delimiter = ',',
        help_heading = "Auth"
    )]
    pub api_keys: Vec<Secret>,

    /// Seconds to wait for in-flight requests and sockets on shutdown.
    #[arg(long, env = "HERALD_SHUTDOWN_TIMEOUT_SECS", default_value_t = 10)]
    pub shutdown_timeout_secs: u64,
}

/// A configuration value that must never reach a log line or `--help` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Self(value.to_owned()))
    }
}

impl Config {
    /// A configuration with every default, for tests and embedding.
    pub fn defaults() -> Self {
        let cli = Cli::parse_from(["herald", "serve"]);
        match cli.command {
            Command::Serve(config) => *config,
            Command::Demo(_) | Command::Token(_) => unreachable!("parsed from `serve`"),
        }
    }

    /// The per-socket queue must hold a whole ingest batch plus a few replies.
    pub fn effective_socket_buffer(&self) -> usize {
        self.socket_buffer.max(self.max_batch.saturating_add(64))
    }

    pub fn session_ttl(&self) -> Duration {
        Duration::from_secs(self.session_ttl_secs)
    }

    pub fn cluster_lease(&self) -> Duration {
        Duration::from_millis(self.cluster_lease_ms)
    }
}
