//! Typed configuration, loaded once: defaults < file (`herald.toml`) < environment
//! (`HERALD_*`) < command-line flags.
//!
//! Every setting is a clap flag with an environment variable (so that containers and process
//! managers can configure herald without a wrapper script) and a key in the file: the flag's
//! field name, in the table its `help_heading` names (`Server` is `[server]`, and so on;
//! `file.rs` has the rules). [`Cli::load`] reads the file and layers it under the
//! environment and the flags; `herald config check FILE` prints the outcome.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::orchestrator::RunLimits;
use crate::orchestrator::config::ModelsFile;

mod effective;
mod file;

pub use effective::Effective;
pub(crate) use file::ConfigFile;
pub use file::{LoadError, Loaded};

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
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a configuration file: read it as `herald serve --config FILE` would, with the
    /// `HERALD_*` environment and the flags given here layered on it, and print the
    /// effective settings (secrets as ***). Exits non-zero when the file is invalid.
    Check(Box<CheckArgs>),
}

#[derive(Debug, Clone, Args)]
// FILE is the file checked: `--config` and HERALD_CONFIG would only compete with it.
#[command(mut_arg("config_file", |arg| arg.hide(true).env(None).conflicts_with("file")))]
pub struct CheckArgs {
    /// The configuration file (TOML; see examples/herald.toml).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    #[command(flatten)]
    pub config: Config,
}

/// Everything the server needs to start. Field docs are the `--help` text.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// The configuration file (TOML; see examples/herald.toml): every setting below, models
    /// and orchestrator settings. The environment and flags override it. Without it, three
    /// simulated models are available.
    #[arg(long = "config", env = "HERALD_CONFIG")]
    pub config_file: Option<PathBuf>,

    /// Address to listen on. Use 0.0.0.0 to accept connections from other hosts.
    #[arg(
        long,
        env = "HERALD_HOST",
        default_value_t = IpAddr::from([127, 0, 0, 1]),
        help_heading = "Server"
    )]
    pub host: IpAddr,

    /// Port to listen on (0 picks a free port; the chosen one is printed on stdout).
    #[arg(
        long,
        env = "HERALD_PORT",
        default_value_t = 3000,
        help_heading = "Server"
    )]
    pub port: u16,

    /// Development mode: permissive CORS (any origin).
    #[arg(
        long,
        env = "HERALD_DEV",
        default_value_t = false,
        help_heading = "Server"
    )]
    pub dev: bool,

    /// Origins allowed by CORS, comma separated (e.g. https://app.example.com).
    #[arg(
        long,
        env = "HERALD_CORS_ORIGINS",
        value_delimiter = ',',
        help_heading = "Server"
    )]
    pub cors_origins: Vec<String>,

    /// Events retained per session for replay and history; older ones are dropped.
    #[arg(long, env = "HERALD_MAX_EVENTS_PER_SESSION", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000), help_heading = "Limits")]
    pub max_events_per_session: u64,

    /// Seconds a session is kept after it reaches a terminal status (COMPLETED, FAILED, EXPIRED).
    #[arg(
        long,
        env = "HERALD_SESSION_TTL_SECS",
        default_value_t = 3600,
        help_heading = "Limits"
    )]
    pub session_ttl_secs: u64,

    /// Seconds a session that never ends is kept after its last event; then it is removed
    /// as an ended one would be (and its Redis keys expire). Keep it above the longest
    /// pause a run may take (the clarification timeout).
    #[arg(long, env = "HERALD_SESSION_IDLE_TTL_SECS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "Limits")]
    pub session_idle_ttl_secs: u64,

    /// Sessions held at once (in Redis mode: by the whole cluster). A producer event or a
    /// create for a new session over it gets 503 TOO_MANY_SESSIONS with Retry-After.
    #[arg(long, env = "HERALD_MAX_SESSIONS", default_value_t = 50_000,
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "Limits")]
    pub max_sessions: u64,

    /// Largest ingest event: the bytes of its serialized `data`; 413 EVENT_TOO_LARGE over it.
    /// The default leaves room in one --max-payload Socket.IO packet for the envelope.
    #[arg(long, env = "HERALD_MAX_EVENT_BYTES", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "Limits")]
    pub max_event_bytes: u64,

    /// Bytes of events retained per session for replay and history (as well as at most
    /// max-events-per-session); the oldest go first, the newest always stays.
    #[arg(long, env = "HERALD_MAX_SESSION_BYTES", default_value_t = 4 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "Limits")]
    pub max_session_bytes: u64,

    /// Model results plus clarifications one session's snapshot keeps; a new one over it
    /// takes the place of the oldest settled one, and `droppedEntries` counts them.
    #[arg(long, env = "HERALD_MAX_SNAPSHOT_ENTRIES", default_value_t = 2_000,
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "Limits")]
    pub max_snapshot_entries: u64,

    /// Serialized bytes of the model results and clarifications one session's snapshot
    /// keeps, the same way (the oldest settled go first; the newest always stays).
    #[arg(long, env = "HERALD_MAX_SNAPSHOT_BYTES", default_value_t = 8 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "Limits")]
    pub max_snapshot_bytes: u64,

    /// Largest Socket.IO packet, in bytes, in either direction (socketioxide's own default is 100 kB).
    #[arg(long, env = "HERALD_MAX_PAYLOAD", default_value_t = 1024 * 1024, help_heading = "Limits")]
    pub max_payload: u64,

    /// Largest HTTP request body, in bytes; larger requests get 413.
    #[arg(long, env = "HERALD_MAX_BODY", default_value_t = 4 * 1024 * 1024, help_heading = "Limits")]
    pub max_body: usize,

    /// Most events in one ingest request.
    #[arg(
        long,
        env = "HERALD_MAX_BATCH",
        default_value_t = 1000,
        help_heading = "Limits"
    )]
    pub max_batch: usize,

    /// Packets queued per socket. A live event that finds the queue full drops the socket's
    /// connection (it reconnects and recovers by replay); a replay larger than the queue is
    /// sent as the client reads, within the replay deadline. Raised to at least
    /// max-batch + 64: a batch is broadcast back to back, faster than any client reads.
    #[arg(
        long,
        env = "HERALD_SOCKET_BUFFER",
        default_value_t = 1024,
        help_heading = "Limits"
    )]
    pub socket_buffer: usize,

    /// Sessions one socket may be subscribed to at once.
    #[arg(
        long,
        env = "HERALD_MAX_SUBSCRIPTIONS",
        default_value_t = 100,
        help_heading = "Limits"
    )]
    pub max_subscriptions: usize,

    /// subscribe/unsubscribe requests allowed per socket per second (burst of twice that).
    #[arg(
        long,
        env = "HERALD_SUBSCRIBE_RATE",
        default_value_t = 50,
        help_heading = "Limits"
    )]
    pub subscribe_rate: u32,

    /// Engine.IO ping interval in milliseconds.
    #[arg(
        long,
        env = "HERALD_PING_INTERVAL_MS",
        default_value_t = 25_000,
        help_heading = "Server"
    )]
    pub ping_interval_ms: u64,

    /// How often an idle SSE stream gets a comment line and a plain WebSocket a ping, in
    /// milliseconds (SPEC §6: proxies close connections that stay silent).
    #[arg(
        long,
        env = "HERALD_STREAM_HEARTBEAT_MS",
        default_value_t = 15_000,
        help_heading = "Server"
    )]
    pub stream_heartbeat_ms: u64,

    /// Engine.IO ping timeout in milliseconds.
    #[arg(
        long,
        env = "HERALD_PING_TIMEOUT_MS",
        default_value_t = 20_000,
        help_heading = "Server"
    )]
    pub ping_timeout_ms: u64,

    /// Websocket read buffer per connection, in bytes. Clients send herald only small frames
    /// (subscribe, pongs, acks); a larger frame still arrives, the buffer grows for it.
    #[arg(
        long,
        env = "HERALD_WS_READ_BUFFER",
        default_value_t = 256,
        help_heading = "Limits"
    )]
    pub ws_read_buffer: usize,

    // The HTTP/socket edge (docs/deployment.md, "Edge limits").
    /// Milliseconds a client has to send a request's headers (then 408, if it began), and
    /// that a keep-alive connection may sit idle between requests; then the connection is
    /// closed.
    #[arg(long, env = "HERALD_HEADER_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "Limits")]
    pub header_timeout_ms: u64,

    /// Milliseconds a client has to send a whole request body, counted from its headers;
    /// then 408 REQUEST_TIMEOUT and the connection is closed.
    #[arg(long, env = "HERALD_BODY_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "Limits")]
    pub body_timeout_ms: u64,

    /// Open TCP connections (HTTP and websocket) this node holds at once; a connection over
    /// it is accepted and closed at once, nothing written. Keep it under `ulimit -n`.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS", default_value_t = 50_000,
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "Limits")]
    pub max_connections: u64,

    /// HTTP requests per second one client address may make (IPv6: per /64); 429
    /// RATE_LIMITED with Retry-After over it. 0: no limit. /healthz and /readyz are exempt.
    #[arg(
        long,
        env = "HERALD_RATE_LIMIT_PER_ADDRESS",
        default_value_t = 200,
        help_heading = "Limits"
    )]
    pub rate_limit_per_address: u32,

    /// Requests one address may make at once above its rate (the bucket's size).
    #[arg(long, env = "HERALD_RATE_LIMIT_PER_ADDRESS_BURST", default_value_t = 400,
          value_parser = clap::value_parser!(u32).range(1..), help_heading = "Limits")]
    pub rate_limit_per_address_burst: u32,

    /// HTTP requests per second one credential (a token's `sub`, an API key's name) may
    /// make, from any address; 429 RATE_LIMITED with Retry-After over it. 0: no limit.
    #[arg(
        long,
        env = "HERALD_RATE_LIMIT_PER_CREDENTIAL",
        default_value_t = 1000,
        help_heading = "Limits"
    )]
    pub rate_limit_per_credential: u32,

    /// Requests one credential may make at once above its rate (the bucket's size).
    #[arg(long, env = "HERALD_RATE_LIMIT_PER_CREDENTIAL_BURST", default_value_t = 2000,
          value_parser = clap::value_parser!(u32).range(1..), help_heading = "Limits")]
    pub rate_limit_per_credential_burst: u32,

    /// Ingest events per second one credential may publish over HTTP, each item of a batch
    /// counted; 429 RATE_LIMITED with Retry-After over it. 0: no limit. Not applied while
    /// auth is off.
    #[arg(
        long,
        env = "HERALD_INGEST_RATE_PER_CREDENTIAL",
        default_value_t = 10_000,
        help_heading = "Limits"
    )]
    pub ingest_rate_per_credential: u32,

    /// Events one credential may publish at once above its rate; raised to at least
    /// max-batch, so that a whole batch can pass.
    #[arg(long, env = "HERALD_INGEST_RATE_PER_CREDENTIAL_BURST", default_value_t = 20_000,
          value_parser = clap::value_parser!(u32).range(1..), help_heading = "Limits")]
    pub ingest_rate_per_credential_burst: u32,

    /// Apply the per-address limit to loopback clients too. Off by default: on loopback
    /// sit a local reverse proxy (one address for every user) and the node's own tooling.
    #[arg(
        long,
        env = "HERALD_RATE_LIMIT_LOOPBACK",
        default_value_t = false,
        help_heading = "Limits"
    )]
    pub rate_limit_loopback: bool,

    /// Invalid or refused socket requests per second a socket gets an `error` event for
    /// (bursts of twice that); beyond that it gets no answer, and a socket four seconds'
    /// worth over its budget has its transport closed.
    #[arg(long, env = "HERALD_INVALID_EVENT_RATE", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..), help_heading = "Limits")]
    pub invalid_event_rate: u32,

    /// Orchestrated sessions running on this node at once (each holds model calls, timers
    /// and queues until it ends). A create over it gets 429 TOO_MANY_RUNS with Retry-After.
    /// Counted per node in cluster mode.
    #[arg(long, env = "HERALD_MAX_RUNNING_SESSIONS", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "Limits")]
    pub max_running_sessions: u64,

    /// Orchestrated sessions one subject (a token's `sub`, an API key's name) may have
    /// running on this node at once; 429 TOO_MANY_RUNS over it. Not applied while auth is
    /// off: every caller is then the same anonymous one, bounded by max-running-sessions.
    #[arg(long, env = "HERALD_MAX_RUNNING_SESSIONS_PER_SUBJECT", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "Limits")]
    pub max_running_sessions_per_subject: u64,

    /// Largest prompt text, in bytes (UTF-8); 400 PROMPT_TOO_LARGE over it.
    #[arg(long, env = "HERALD_MAX_PROMPT_BYTES", default_value_t = 32 * 1024,
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "Limits")]
    pub max_prompt_bytes: u64,

    /// Most prompts in one session; 400 TOO_MANY_PROMPTS over it.
    #[arg(long, env = "HERALD_MAX_PROMPTS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=10_000), help_heading = "Limits")]
    pub max_prompts: u64,

    /// Largest session `metadata`, in bytes of its JSON; 400 METADATA_TOO_LARGE over it.
    #[arg(long, env = "HERALD_MAX_METADATA_BYTES", default_value_t = 16 * 1024,
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "Limits")]
    pub max_metadata_bytes: u64,

    /// Largest clarification answer, in bytes (UTF-8); 400 ANSWER_TOO_LARGE over it.
    #[arg(long, env = "HERALD_MAX_ANSWER_BYTES", default_value_t = 8 * 1024,
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "Limits")]
    pub max_answer_bytes: u64,

    /// Most output, in bytes, one model may stream for one prompt. A model that streams more
    /// is stopped (its request dropped) and fails on that prompt, not retried:
    /// "the model's output exceeded N bytes".
    #[arg(long, env = "HERALD_MAX_MODEL_OUTPUT_BYTES", default_value_t = 256 * 1024,
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "Limits")]
    pub max_model_output_bytes: u64,

    /// Seconds an orchestrated session keeps trying to log its events while the log (Redis)
    /// is unreachable. Meanwhile the run waits (its models' output waits with it) and
    /// answers and cancels get 503 BACKEND_UNAVAILABLE; past it the run stops its models and
    /// ends FAILED with `error { code: "BACKEND_UNAVAILABLE" }`, logged with every event it
    /// held as soon as the log is back.
    #[arg(long, env = "HERALD_RUN_LOG_DEADLINE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..), help_heading = "Limits")]
    pub run_log_deadline_secs: u64,

    /// A directory for this node's sessions (logs, snapshots, idempotency keys, owners):
    /// they survive a restart or a crash (docs/durability.md). Without it, and without
    /// Redis, everything stays in this process's memory. Not with `--redis-url`.
    #[arg(
        long,
        env = "HERALD_DATA_DIR",
        help_heading = "Server",
        conflicts_with = "redis_url"
    )]
    pub data_dir: Option<PathBuf>,

    /// Redis URL (e.g. redis://127.0.0.1:6379): nodes sharing it share sessions, logs and
    /// rooms. Without it everything stays in this process.
    #[arg(long, env = "HERALD_REDIS_URL", help_heading = "Redis")]
    pub redis_url: Option<String>,

    /// The Redis is a Redis Cluster: `--redis-url` lists seed nodes, comma separated
    /// (e.g. redis://10.0.0.1:7000,redis://10.0.0.2:7000); announcements use sharded pub/sub
    /// (Redis 7+). The key layout is in docs/deployment.md.
    #[arg(
        long,
        env = "HERALD_REDIS_CLUSTER",
        default_value_t = false,
        help_heading = "Redis"
    )]
    pub redis_cluster: bool,

    /// Prefix of every Redis key and channel herald uses.
    #[arg(
        long,
        env = "HERALD_REDIS_PREFIX",
        default_value = "herald",
        help_heading = "Redis"
    )]
    pub redis_prefix: String,

    /// Channel python-socketio's `RedisManager` publishes on (its `channel=`): its `emit`s
    /// of session events to session rooms are logged. Empty: not listened to.
    #[arg(
        long,
        env = "HERALD_REDIS_SOCKETIO_CHANNEL",
        default_value = "socketio",
        help_heading = "Redis"
    )]
    pub redis_socketio_channel: String,

    /// Key `@socket.io/redis-emitter` publishes under (its `key` option; channels
    /// `<key>#/#…`): its emits of session events to session rooms are logged. Empty: not
    /// listened to.
    #[arg(
        long,
        env = "HERALD_REDIS_EMITTER_KEY",
        default_value = "socket.io",
        help_heading = "Redis"
    )]
    pub redis_emitter_key: String,

    /// Cluster lease in milliseconds: a node whose liveness key is this old is lost, and the
    /// ingest stream's lease lasts this long. Internal (tests shorten it), hence hidden.
    #[arg(long, env = "HERALD_CLUSTER_LEASE_MS", default_value_t = 10_000, hide = true,
          value_parser = clap::value_parser!(u64).range(500..=600_000), help_heading = "Redis")]
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

    /// The listening socket's accept queue: connections the kernel completes before herald
    /// accepts them. A reconnect storm of many thousand clients overflows a short one (the
    /// kernel then drops SYNs and clients retry a second or more later). The kernel caps it
    /// at `net.core.somaxconn`.
    #[arg(long, env = "HERALD_LISTEN_BACKLOG", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..), help_heading = "Server")]
    pub listen_backlog: u32,

    /// Seconds to wait for in-flight requests and sockets on shutdown.
    #[arg(
        long,
        env = "HERALD_SHUTDOWN_TIMEOUT_SECS",
        default_value_t = 10,
        help_heading = "Server"
    )]
    pub shutdown_timeout_secs: u64,

    /// How log lines on stderr are written: `text` (for people) or `json` (one JSON object
    /// per line, for log shippers). Which lines is `HERALD_LOG`'s filter.
    #[arg(
        long,
        env = "HERALD_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text,
        help_heading = "Server"
    )]
    pub log_format: LogFormat,

    /// API keys given by the SHA-256 of their secret (`[[auth.api_key_digests]]`, file only).
    #[arg(skip)]
    pub api_key_digests: Vec<ApiKeyDigest>,

    /// The model part of the configuration file (`[orchestrator]`, `[[models]]`), read with
    /// the rest of it by [`Cli::load`]. `None` when this `Config` was not loaded from the
    /// command line ([`Config::defaults`]): then the server reads `config_file`'s model part
    /// itself, or takes the built-in models.
    #[arg(skip)]
    pub models: Option<ModelsFile>,
}

/// How herald writes its log lines (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colored on a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the event's
    /// fields at the top level, and the spans it happened in.
    Json,
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

/// An API key known by the SHA-256 of its secret rather than the secret itself
/// (`[[auth.api_key_digests]]` in the configuration file).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyDigest {
    /// Who the key belongs to (e.g. `ocr-worker`).
    pub name: String,
    /// The SHA-256 of the key's secret: 64 hex digits, lowercase once loaded.
    pub sha256: String,
    /// What the key may do (`read`, `answer`, `cancel`, `create`, `publish`, `admin`).
    pub scopes: Vec<String>,
    /// Session ids or prefix patterns ending in `*` (`"ocr-*"`) the key is limited to;
    /// empty: no limit beyond its scopes.
    #[serde(default)]
    pub sessions: Vec<String>,
}

/// The scopes of SPEC §5.
const SCOPES: [&str; 6] = ["read", "answer", "cancel", "create", "publish", "admin"];

impl ApiKeyDigest {
    /// Checks the entry and lowercases its digest. Errors name the problem, never a digest.
    fn validate(&mut self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("a key has an empty name".into());
        }
        let name = &self.name;
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("key `{name}`: sha256 must be 64 hex digits"));
        }
        self.sha256.make_ascii_lowercase();
        if self.scopes.is_empty() {
            return Err(format!("key `{name}` has no scopes"));
        }
        if let Some(scope) = self.scopes.iter().find(|s| !SCOPES.contains(&s.as_str())) {
            return Err(format!(
                "key `{name}`: unknown scope `{scope}` (known: {})",
                SCOPES.join(", ")
            ));
        }
        let bad_pattern =
            |p: &&String| p.is_empty() || p.strip_suffix('*').unwrap_or(p).contains('*');
        if let Some(pattern) = self.sessions.iter().find(bad_pattern) {
            return Err(format!(
                "key `{name}`: session pattern `{pattern}` must be an id, a prefix ending in `*`, or `*`"
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for ApiKeyDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyDigest")
            .field("name", &self.name)
            .field("sha256", &"***")
            .field("scopes", &self.scopes)
            .field("sessions", &self.sessions)
            .finish()
    }
}

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid configuration in {path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    /// A configuration with every default, for tests and embedding.
    pub fn defaults() -> Self {
        let cli = Cli::parse_from(["herald", "serve"]);
        match cli.command {
            Command::Serve(config) => *config,
            _ => unreachable!("parsed from `serve`"),
        }
    }

    /// The per-socket queue must hold a whole ingest batch plus a few replies.
    pub fn effective_socket_buffer(&self) -> usize {
        self.socket_buffer.max(self.max_batch.saturating_add(64))
    }

    pub fn session_ttl(&self) -> Duration {
        Duration::from_secs(self.session_ttl_secs)
    }

    pub fn session_idle_ttl(&self) -> Duration {
        Duration::from_secs(self.session_idle_ttl_secs)
    }

    /// What the event logs may hold.
    pub fn log_limits(&self) -> crate::log::LogLimits {
        crate::log::LogLimits {
            max_events: self.max_events_per_session,
            max_bytes: self.max_session_bytes,
            max_sessions: self.max_sessions,
            idle_ttl: self.redis_key_ttl(),
        }
    }

    /// What the session stores may hold.
    pub fn store_limits(&self) -> crate::store::StoreLimits {
        crate::store::StoreLimits {
            max_entries: usize::try_from(self.max_snapshot_entries).unwrap_or(usize::MAX),
            max_entry_bytes: usize::try_from(self.max_snapshot_bytes).unwrap_or(usize::MAX),
            idle_ttl: self.redis_key_ttl(),
        }
    }

    /// How long a session's Redis keys outlive its last write: past the idle sweep and the
    /// ended sessions' TTL, so that the sweep, not the expiry, normally removes them.
    fn redis_key_ttl(&self) -> Duration {
        self.session_idle_ttl().max(self.session_ttl()) + Duration::from_secs(3600)
    }

    /// The Socket.IO emitters' channels herald listens to (an empty name: that one is off).
    pub fn emitter_channels(&self) -> crate::redis::EmitterChannels {
        let named = |name: &str| (!name.is_empty()).then(|| name.to_owned());
        crate::redis::EmitterChannels {
            socketio: named(&self.redis_socketio_channel),
            emitter_key: named(&self.redis_emitter_key),
        }
    }

    pub fn cluster_lease(&self) -> Duration {
        Duration::from_millis(self.cluster_lease_ms)
    }

    /// The limits of the HTTP/socket edge.
    pub fn edge_limits(&self) -> crate::edge::EdgeLimits {
        crate::edge::EdgeLimits {
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            body_timeout: Duration::from_millis(self.body_timeout_ms),
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            per_address: crate::edge::Rate::new(
                self.rate_limit_per_address,
                self.rate_limit_per_address_burst,
            ),
            per_credential: crate::edge::Rate::new(
                self.rate_limit_per_credential,
                self.rate_limit_per_credential_burst,
            ),
            ingest_per_credential: crate::edge::Rate::new(
                self.ingest_rate_per_credential,
                self.ingest_rate_per_credential_burst
                    .max(u32::try_from(self.max_batch).unwrap_or(u32::MAX)),
            ),
            limit_loopback: self.rate_limit_loopback,
        }
    }

    /// The orchestrator's limits.
    pub fn run_limits(&self) -> RunLimits {
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        RunLimits {
            max_running: size(self.max_running_sessions),
            max_running_per_subject: size(self.max_running_sessions_per_subject),
            max_prompt_bytes: size(self.max_prompt_bytes),
            max_prompts: size(self.max_prompts),
            max_metadata_bytes: size(self.max_metadata_bytes),
            max_answer_bytes: size(self.max_answer_bytes),
            max_model_output_bytes: size(self.max_model_output_bytes),
            log_deadline: Duration::from_secs(self.run_log_deadline_secs),
        }
    }
}

/// `url` with the password of its userinfo (`redis://user:secret@host`) replaced by `***`,
/// for logs, errors and `herald config check`: a Redis password is a secret.
pub fn redact_url(url: &str) -> String {
    // A Redis Cluster's seed list: each URL on its own.
    if url.contains(',') {
        return url
            .split(',')
            .map(redact_one_url)
            .collect::<Vec<_>>()
            .join(",");
    }
    redact_one_url(url)
}

fn redact_one_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    // `redis://secret@host` is the password alone, as the redis crate reads it.
    let shown = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!("{}{shown}{}", &url[..scheme_end], &rest[at..])
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_url_hides_every_seed_nodes_password() {
        assert_eq!(
            super::redact_url("redis://a:p1@h1:7000,redis://:p2@h2:7000,redis://h3:7000"),
            "redis://a:***@h1:7000,redis://:***@h2:7000,redis://h3:7000"
        );
    }

    #[test]
    fn redact_url_hides_a_redis_password_and_nothing_else() {
        use super::redact_url;
        assert_eq!(
            redact_url("redis://user:s3cr@t@10.0.0.1:6379/0"),
            "redis://user:***@10.0.0.1:6379/0"
        );
        assert_eq!(redact_url("rediss://:pw@host"), "rediss://:***@host");
        assert_eq!(redact_url("redis://pw@host/1"), "redis://***@host/1");
        assert_eq!(redact_url("redis://10.0.0.1:6379"), "redis://10.0.0.1:6379");
        assert_eq!(redact_url("redis://host/?a=b@c"), "redis://host/?a=b@c");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    use std::path::{Path, PathBuf};

    use super::file::{self, Kind};
    use super::*;

    /// A directory of its own per test, removed afterwards.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("herald-config-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn file(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn serve(args: &[&str]) -> Result<Config, LoadError> {
        let args = ["herald", "serve"].iter().chain(args);
        match Cli::load_from(args)?.cli.command {
            Command::Serve(config) => Ok(*config),
            _ => unreachable!("parsed from `serve`"),
        }
    }

    fn serve_file(dir: &Dir, text: &str, args: &[&str]) -> Result<Config, LoadError> {
        let path = dir.file("herald.toml", text);
        let path = path.to_str().unwrap();
        serve(&[&["--config", path], args].concat())
    }

    fn refusal(result: Result<Config, LoadError>) -> String {
        match result {
            Err(LoadError::Config(error)) => error.to_string(),
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[test]
    fn the_file_beats_the_defaults_and_flags_beat_the_file() {
        let dir = Dir::new("layers");
        let text = "[server]\nport = 4100\ndev = true\ncors_origins = [\"https://a.example\"]\n\
                    [limits]\nmax_batch = 7\n[redis]\nurl = \"redis://10.0.0.1:6379\"\nprefix = \"h2\"\n\
                    [auth]\njwt_audience = \"aud\"\n";
        let config = serve_file(&dir, text, &[]).unwrap();
        assert_eq!(config.port, 4100);
        assert!(config.dev);
        assert_eq!(config.cors_origins, ["https://a.example"]);
        assert_eq!(config.max_batch, 7);
        assert_eq!(config.redis_url.as_deref(), Some("redis://10.0.0.1:6379"));
        assert_eq!(config.redis_prefix, "h2");
        assert_eq!(config.jwt_audience.as_deref(), Some("aud"));
        assert_eq!(
            config.max_subscriptions,
            Config::defaults().max_subscriptions
        );

        let config = serve_file(&dir, text, &["--port", "4200", "--max-batch", "9"]).unwrap();
        assert_eq!((config.port, config.max_batch), (4200, 9));
        assert_eq!(config.redis_prefix, "h2");
    }

    #[test]
    fn the_model_part_is_read_with_the_rest() {
        let dir = Dir::new("models");
        let text = "[orchestrator]\nmax_concurrency = 3\n[[models]]\nname = \"m\"\nprovider = \"simulated\"\n";
        let models = serve_file(&dir, text, &[]).unwrap().models.unwrap();
        assert_eq!(models.orchestrator.max_concurrency, 3);
        assert_eq!(models.models.len(), 1);
        let builtin = serve(&[]).unwrap().models.unwrap();
        assert_eq!(builtin.models.len(), ModelsFile::builtin().models.len());
    }

    #[test]
    fn unknown_keys_and_tables_are_refused() {
        let dir = Dir::new("unknown");
        let error = refusal(serve_file(&dir, "[server]\nprot = 1\n", &[]));
        assert!(error.contains("herald.toml"), "{error}");
        assert!(error.contains("`prot` in [server]"), "{error}");
        // A flag's key belongs to its own table only.
        let error = refusal(serve_file(&dir, "[limits]\nport = 1\n", &[]));
        assert!(error.contains("`port` in [limits]"), "{error}");
        let error = refusal(serve_file(&dir, "[srever]\nport = 1\n", &[]));
        assert!(error.contains("srever"), "{error}");
        let error = refusal(serve_file(
            &dir,
            "[redis]\nredis_url = \"redis://x\"\n",
            &[],
        ));
        assert!(error.contains("`redis_url` in [redis]"), "{error}");
    }

    #[test]
    fn wrong_types_and_values_are_refused() {
        let dir = Dir::new("types");
        let cases = [
            (
                "[server]\nport = \"3000\"\n",
                "[server] port must be an integer, not a string",
            ),
            ("[server]\ndev = 1\n", "[server] dev must be a boolean"),
            (
                "[server]\ncors_origins = \"https://a\"\n",
                "cors_origins must be an array of strings",
            ),
            (
                "[server]\nhost = \"localhost:1\"\n",
                "[server] host is invalid",
            ),
            ("[server]\nport = 70000\n", "[server] port is invalid"),
            (
                "[limits]\nmax_events_per_session = 0\n",
                "max_events_per_session is invalid",
            ),
            (
                "[auth]\napi_keys = [1]\n",
                "[auth] api_keys must be an array of strings",
            ),
            (
                "[[auth.api_keys]]\nname = \"k\"\n",
                "[[auth.api_key_digests]]",
            ),
            ("[[models]]\nname = \"m\"\nprovider = \"olama\"\n", "line 3"),
        ];
        for (text, expected) in cases {
            let error = refusal(serve_file(&dir, text, &[]));
            assert!(error.contains(expected), "{text}: {error}");
            assert!(error.contains("herald.toml"), "{text}: {error}");
        }
    }

    #[test]
    fn secrets_are_read_from_files_relative_to_the_configuration() {
        let dir = Dir::new("secrets");
        dir.file("jwt", "file-jwt-secret\n");
        dir.file("keys", "a:s1:read\nb:s2:publish,c:s3:admin\n");
        let text = "[auth]\njwt_secret_file = \"jwt\"\napi_keys_file = \"keys\"\njwt_public_key = \"key.pem\"\n";
        let config = serve_file(&dir, text, &[]).unwrap();
        assert_eq!(config.jwt_secret.unwrap().expose(), "file-jwt-secret");
        let keys: Vec<&str> = config.api_keys.iter().map(Secret::expose).collect();
        assert_eq!(keys, ["a:s1:read", "b:s2:publish", "c:s3:admin"]);
        assert_eq!(config.jwt_public_key.unwrap(), dir.0.join("key.pem"));

        let both = "[auth]\njwt_secret = \"x\"\njwt_secret_file = \"jwt\"\n";
        let error = refusal(serve_file(&dir, both, &[]));
        assert!(
            error.contains("both jwt_secret and jwt_secret_file"),
            "{error}"
        );
        let missing = "[auth]\njwt_secret_file = \"absent\"\n";
        let error = refusal(serve_file(&dir, missing, &[]));
        assert!(error.contains("jwt_secret_file cannot be read"), "{error}");
        dir.file("empty", "\n");
        let empty = "[auth]\njwt_secret_file = \"empty\"\n";
        let error = refusal(serve_file(&dir, empty, &[]));
        assert!(error.contains("empty file"), "{error}");
        // A flag still beats the file.
        let config = serve_file(&dir, text, &["--jwt-secret", "flag"]).unwrap();
        assert_eq!(config.jwt_secret.unwrap().expose(), "flag");
    }

    #[test]
    fn api_key_digests_are_checked() {
        let dir = Dir::new("digests");
        let digest = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08";
        let entry = |fields: &str| format!("[[auth.api_key_digests]]\nname = \"ocr\"\n{fields}\n");
        let good = entry(&format!(
            "sha256 = \"{digest}\"\nscopes = [\"publish\"]\nsessions = [\"ocr-*\"]"
        ));
        let config = serve_file(&dir, &good, &[]).unwrap();
        assert_eq!(
            config.api_key_digests,
            [ApiKeyDigest {
                name: "ocr".into(),
                sha256: digest.to_ascii_lowercase(),
                scopes: vec!["publish".into()],
                sessions: vec!["ocr-*".into()],
            }]
        );
        let cases = [
            (
                entry("sha256 = \"abc\"\nscopes = [\"read\"]"),
                "64 hex digits",
            ),
            (
                entry(&format!(
                    "sha256 = \"{}\"\nscopes = [\"read\"]",
                    "g".repeat(64)
                )),
                "64 hex digits",
            ),
            (
                entry(&format!("sha256 = \"{digest}\"\nscopes = [\"raed\"]")),
                "unknown scope `raed`",
            ),
            (
                entry(&format!("sha256 = \"{digest}\"\nscopes = []")),
                "no scopes",
            ),
            (
                entry(&format!(
                    "sha256 = \"{digest}\"\nscopes = [\"read\"]\nsessions = [\"a*b\"]"
                )),
                "session pattern",
            ),
            (
                entry(&format!("sha = \"{digest}\"\nscopes = [\"read\"]")),
                "unknown field `sha`",
            ),
            (format!("{good}{good}"), "configured twice"),
        ];
        for (text, expected) in cases {
            let error = refusal(serve_file(&dir, &text, &[]));
            assert!(error.contains(expected), "{text}: {error}");
            assert!(
                !error
                    .to_ascii_lowercase()
                    .contains(&digest.to_ascii_lowercase()),
                "{error}"
            );
        }
    }

    #[test]
    fn debug_masks_every_secret() {
        let dir = Dir::new("debug");
        let digest = "ab".repeat(32);
        let text = format!(
            "[auth]\njwt_secret = \"jwt-s3cr3t\"\napi_keys = [\"k:key-s3cr3t:read\"]\n\
             [[auth.api_key_digests]]\nname = \"k2\"\nsha256 = \"{digest}\"\nscopes = [\"read\"]\n"
        );
        let config = serve_file(&dir, &text, &[]).unwrap();
        let shown = format!("{config:?}");
        for secret in ["jwt-s3cr3t", "key-s3cr3t", digest.as_str()] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("k2"), "{shown}");
    }

    #[test]
    fn every_flag_has_a_table_and_a_kind() {
        let all = Config::augment_args(clap::Command::new("herald"));
        for arg in all.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "config_file" {
                continue;
            }
            assert!(
                file::table(arg).is_some(),
                "--{id}: its help_heading names no table"
            );
            // A list is the only kind the file writes as an array.
            let append = matches!(arg.get_action(), clap::ArgAction::Append);
            assert_eq!(Kind::of(arg) == Kind::List, append, "--{id}");
        }
        let keys: Vec<String> = file::flags().iter().map(file::key).collect();
        assert!(keys.contains(&"url".to_owned()) && keys.contains(&"prefix".to_owned()));
    }

    /// The lines of `[table]` in `text`, up to the next table header.
    fn section<'a>(text: &'a str, table: &str) -> Vec<&'a str> {
        let header = format!("[{table}]");
        let mut lines = text
            .lines()
            .skip_while(|line| line.trim() != header)
            .skip(1);
        let mut section = Vec::new();
        for line in lines.by_ref() {
            if line.trim_start().starts_with('[') {
                break;
            }
            section.push(line);
        }
        section
    }

    /// Whether `lines` set `key`, or show it commented out (`# key = ...`).
    fn mentions(lines: &[&str], key: &str) -> bool {
        lines.iter().any(|line| {
            let line = line.trim_start().trim_start_matches('#').trim_start();
            line.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
    }

    fn example() -> (PathBuf, String) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/herald.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        (path, text)
    }

    #[test]
    fn the_example_names_every_key() {
        let (_, text) = example();
        for flag in file::flags() {
            let (table, key) = (file::table(&flag).unwrap(), file::key(&flag));
            let lines = section(&text, table);
            assert!(
                mentions(&lines, &key),
                "examples/herald.toml: no `{key}` in [{table}]"
            );
            if file::is_secret(&flag) {
                let key = format!("{key}_file");
                assert!(
                    mentions(&lines, &key),
                    "examples/herald.toml: no `{key}` in [{table}]"
                );
            }
        }
        assert!(
            text.contains("# [[auth.api_key_digests]]"),
            "no [[auth.api_key_digests]]"
        );
        for key in ["name", "sha256", "scopes", "sessions"] {
            let lines = section(&text, "auth");
            assert!(
                mentions(&lines, key),
                "[[auth.api_key_digests]]: no `{key}`"
            );
        }
    }

    #[test]
    fn the_example_is_valid_and_shows_the_defaults() {
        let (path, _) = example();
        let mut config = serve(&["--config", path.to_str().unwrap()]).unwrap();
        let models = config.models.take().unwrap();
        assert_eq!(models.models.len(), 4);
        assert_eq!(config.config_file.take(), Some(path));
        assert_eq!(format!("{config:?}"), format!("{:?}", Config::defaults()));
    }

    #[test]
    fn config_check_takes_the_file_and_the_flags() {
        let (path, _) = example();
        let path = path.to_str().unwrap();
        let loaded = Cli::load_from(["herald", "config", "check", path, "--port", "1"]).unwrap();
        let Command::Config(ConfigCommand::Check(check)) = loaded.cli.command else {
            panic!("parsed from `config check`");
        };
        assert_eq!(check.config.port, 1);
        assert_eq!(check.config.config_file, Some(check.file));
        let shown = loaded.effective.unwrap().to_string();
        assert!(shown.contains("port = 1 "), "{shown}");
        assert!(shown.contains("# from --port"), "{shown}");
        let conflict = Cli::load_from(["herald", "config", "check", path, "--config", path]);
        assert!(matches!(conflict, Err(LoadError::Args(_))));
    }
}
