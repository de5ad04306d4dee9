//! Load generator for herald (and for any server that speaks the same contract, such as the
//! Node.js reference in `bench/node-reference/`).
//!
//! It speaks raw Engine.IO v4 / Socket.IO v5 text frames over websockets itself, so one
//! process can hold 10,000+ connections cheaply:
//! `GET /socket.io/?EIO=4&transport=websocket` → `0{open}`; send `40` → `40{sid}`;
//! `2` (ping) → `3` (pong); events are `42["name",{...}]`.
//!
//! Scenarios:
//! - `fanout`: clients spread over sessions subscribe; producers POST batches of `progress`
//!   events to `/api/sessions/{id}/events`; every client checks seq contiguity and measures
//!   POST→receipt latency from `sentAtNs` in the event data. `--post-url` sends the POSTs
//!   to another node than the one the clients are connected to (cluster mode).
//! - `idle`: connect and subscribe N clients, print `READY <n>`, hold them (answering pings)
//!   until stdin closes or `--hold-secs` passes.
//!
//! Both print a human summary on stderr and a final machine-readable line on stdout:
//! `RESULT {json}`. Exit status is non-zero on any loss, duplicate, protocol error or
//! connection failure.
//!
//! ```text
//! cargo run --release --example loadgen -- fanout --url http://127.0.0.1:3000 \
//!     --clients 1000 --sessions 100 --events-per-session 2000 --batch 50 --producers 8
//! cargo run --release --example loadgen -- fanout --url http://127.0.0.1:3000 \
//!     --post-url http://127.0.0.1:3001      # clients on node A, events posted to node B
//! cargo run --release --example loadgen -- idle --url http://127.0.0.1:3000 --clients 10000
//! ```

use std::fmt;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

type Ws = WebSocketStream<TcpStream>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser, Debug)]
#[command(name = "loadgen", about = "Socket.IO load generator for herald")]
struct Cli {
    /// Runtime worker threads (default: the CPUs this process may run on; 1 = current-thread).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Clients subscribe, producers POST events, clients measure throughput/latency/loss.
    Fanout(FanoutArgs),
    /// Connect and subscribe N clients, print `READY <n>`, hold them.
    Idle(IdleArgs),
}

#[derive(Args, Debug, Clone)]
struct CommonArgs {
    /// Server base URL (http://HOST:PORT).
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    url: String,
    /// Number of websocket clients.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Number of sessions; client i subscribes to session i % sessions.
    #[arg(long, default_value_t = 100)]
    sessions: usize,
    /// Connection attempts in flight at once (TCP connect until `subscribed`).
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Session id prefix (default: unique per run, so sequences start at 1).
    #[arg(long)]
    session_prefix: Option<String>,
    /// Websocket read buffer per client, bytes.
    #[arg(long, default_value_t = 4096)]
    read_buffer: usize,
    /// Label copied into the RESULT line (e.g. the server's name).
    #[arg(long, default_value = "")]
    label: String,
    /// Credential for a server with auth on: sent as socket.io `auth: { token }` in every
    /// CONNECT and as `Authorization: Bearer` on every POST.
    #[arg(long, env = "LOADGEN_TOKEN")]
    token: Option<String>,
    /// How clients subscribe: `socketio` (Engine.IO websocket), `ws` (herald's plain
    /// WebSocket `/ws`, JSON frames) or `sse` (`GET /api/wizard/session/{id}/stream`).
    #[arg(long, value_enum, default_value = "socketio")]
    transport: Transport,
    /// Local addresses the clients connect from, round-robin (e.g.
    /// `127.0.0.2,127.0.0.3`, or a range `127.0.0.2-127.0.0.9`): past ~28,000 connections
    /// one source address runs out of ephemeral ports. Default: the kernel's choice.
    #[arg(long, value_parser = parse_sources, default_value = "")]
    source_addrs: Sources,
}

/// The `--source-addrs` list.
#[derive(Debug, Clone, Default)]
struct Sources(Vec<std::net::Ipv4Addr>);

fn parse_sources(text: &str) -> Result<Sources, String> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let parse = |t: &str| {
            t.parse::<std::net::Ipv4Addr>()
                .map_err(|e| format!("`{t}`: {e}"))
        };
        match part.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (u32::from(parse(from)?), u32::from(parse(to)?));
                if to < from || to - from > 65_535 {
                    return Err(format!(
                        "`{part}`: not an ascending range of at most 65,536"
                    ));
                }
                out.extend((from..=to).map(std::net::Ipv4Addr::from));
            }
            None => out.push(parse(part)?),
        }
    }
    Ok(Sources(out))
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Socketio,
    Ws,
    Sse,
}

/// The namespace CONNECT frame every client sends (`40`, or `40{"token":...}`).
static CONNECT_FRAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn connect_frame() -> &'static str {
    CONNECT_FRAME.get().map_or("40", String::as_str)
}

fn remember_token(common: &CommonArgs) {
    if let Some(token) = &common.token {
        let _ = CONNECT_FRAME.set(format!("40{}", json!({ "token": token })));
    }
}

#[derive(Args, Debug, Clone)]
struct FanoutArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Base URL the producers POST events to (default: --url). Clients still connect to
    /// --url, so with two nodes of a cluster this measures cross-node delivery.
    #[arg(long)]
    post_url: Option<String>,
    /// Events posted to each session.
    #[arg(long, default_value_t = 1000)]
    events_per_session: u64,
    /// Events per POST request.
    #[arg(long, default_value_t = 50)]
    batch: u64,
    /// Concurrent producer tasks (each owns sessions p, p+P, p+2P, …; one request in flight each).
    #[arg(long, default_value_t = 8)]
    producers: usize,
    /// Flow control: at most this many events of a session posted but not yet received by
    /// every subscriber of it (0 = open loop, post as fast as the server accepts).
    #[arg(long, default_value_t = 100)]
    window: u64,
    /// Offered load: pace the POSTs so that subscribers receive about this many messages
    /// per second in all (events/s = rate × sessions / clients), instead of posting as fast
    /// as the window allows (0). Latency is then measured at a known load.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Extra bytes of padding in each event's data (`pad` field).
    #[arg(long, default_value_t = 0)]
    pad: usize,
    /// Overall time limit in seconds (connect + run); loss is reported when it expires.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Start posting at this wall-clock time (milliseconds since the epoch) rather than as
    /// soon as the clients are subscribed, so several load-generator processes measure the
    /// same window (0: at once).
    #[arg(long, default_value_t = 0)]
    start_at_ms: u64,
    /// A POST answered 503 or 429 is sent again, the same body, up to this many times,
    /// after its `Retry-After` (else 100 ms × attempt), as a producer following the
    /// contract does. When above 0, every event carries an `idempotencyKey`, so a retry of
    /// a batch that was logged after all is answered as duplicates. 0: such a POST fails
    /// the run.
    #[arg(long, default_value_t = 0)]
    retries: u32,
}

#[derive(Args, Debug, Clone)]
struct IdleArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Hold the connections at most this long after READY (also ends when stdin closes).
    #[arg(long, default_value_t = 600)]
    hold_secs: u64,
    /// Do not watch stdin (hold for --hold-secs only).
    #[arg(long)]
    ignore_stdin: bool,
    /// Time limit for connecting all clients, seconds.
    #[arg(long, default_value_t = 120)]
    connect_timeout: u64,
    /// Connect only (Socket.IO CONNECT and `connected`), do not subscribe: separates the
    /// cost of a connection from the cost of a subscription.
    #[arg(long)]
    no_subscribe: bool,
}

fn main() {
    let cli = Cli::parse();
    raise_nofile_limit();
    let threads = cli.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    let code = rt.block_on(async move {
        match cli.cmd {
            Cmd::Fanout(a) => {
                remember_token(&a.common);
                fanout(a).await
            }
            Cmd::Idle(a) => {
                remember_token(&a.common);
                idle(a).await
            }
        }
    });
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // Exit without tearing down thousands of sockets one by one.
    std::process::exit(code);
}

/// Raise the soft RLIMIT_NOFILE to the hard limit (the script also runs `ulimit -n`).
fn raise_nofile_limit() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: getrlimit/setrlimit with a valid pointer to a properly sized struct.
        #[repr(C)]
        struct RLimit {
            cur: u64,
            max: u64,
        }
        unsafe extern "C" {
            fn getrlimit(resource: i32, rlim: *mut RLimit) -> i32;
            fn setrlimit(resource: i32, rlim: *const RLimit) -> i32;
        }
        const RLIMIT_NOFILE: i32 = 7;
        let mut lim = RLimit { cur: 0, max: 0 };
        unsafe {
            if getrlimit(RLIMIT_NOFILE, &mut lim) == 0 && lim.cur < lim.max {
                lim.cur = lim.max;
                let _ = setrlimit(RLIMIT_NOFILE, &lim);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Shared state and results
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Fanout,
    Idle,
}

/// Protocol observations worth reporting; the first few samples are printed.
#[derive(Default)]
struct Problems {
    count: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Problems {
    fn report(&self, what: impl fmt::Display) {
        let n = self.count.fetch_add(1, Ordering::Relaxed);
        if n < 10 {
            let s = what.to_string();
            eprintln!("loadgen: protocol problem: {s}");
            self.samples.lock().unwrap().push(s);
        }
    }
}

struct Shared {
    mode: Mode,
    subscribe: bool,
    transport: Transport,
    ws_url: String,
    /// http://host:port, for `/ws` and SSE.
    base: String,
    token: Option<String>,
    sse_http: reqwest::Client,
    addr: String,
    /// `--source-addrs`, and the next one to use.
    sources: Sources,
    next_source: AtomicUsize,
    read_buffer: usize,
    events_per_session: u64,
    connect_sem: Semaphore,
    problems: Problems,
    server_errors: AtomicU64,
    subscribe_retries: AtomicU64,
    /// Set when the run is over (closed connections are expected from then on).
    stopping: AtomicBool,
    /// Fan-out: clients that have received every event of their session.
    done_clients: AtomicUsize,
    all_done: Notify,
    /// One per producer: set while the producer waits for window space.
    producer_waiting: Vec<AtomicBool>,
    producer_notify: Vec<Notify>,
}

/// What each client publishes while running (read by producers for flow control).
struct ClientLive {
    /// Highest seq such that 1..=seq have all been received.
    contiguous: AtomicU64,
}

#[derive(Default)]
struct ClientResult {
    connected: bool,
    connect_error: Option<String>,
    received: u64,
    distinct: u64,
    duplicates: u64,
    out_of_order: u64,
    wrong_session: u64,
    hist: Option<Histogram<u64>>,
    last_recv: Option<Instant>,
    subscribed_last_seq: Option<u64>,
}

fn new_hist() -> Histogram<u64> {
    // microseconds, 1 µs .. 1 h, 3 significant digits
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn session_prefix(c: &CommonArgs) -> String {
    c.session_prefix.clone().unwrap_or_else(|| {
        format!(
            "bench-{}-{}",
            std::process::id(),
            unix_ns() / 1_000_000 % 100_000_000
        )
    })
}

fn session_id(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i}")
}

/// `http://host:port[/...]` → (`ws://host:port/socket.io/?EIO=4&transport=websocket`, `host:port`).
fn endpoints(url: &str) -> Result<(String, String, String), BoxError> {
    let u = reqwest::Url::parse(url)?;
    let host = u.host_str().ok_or("url has no host")?.to_string();
    let port = u.port_or_known_default().ok_or("url has no port")?;
    let scheme = match u.scheme() {
        "http" | "ws" => "ws",
        s => return Err(format!("unsupported scheme {s} (plain http only)").into()),
    };
    let base = url.trim_end_matches('/').to_string();
    let hostport = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok((
        format!("{scheme}://{hostport}/socket.io/?EIO=4&transport=websocket"),
        hostport,
        base,
    ))
}

fn cpu_seconds() -> f64 {
    // utime + stime of this process, from /proc/self/stat (clock ticks, normally 100/s).
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // fields after ')' start at field 3 (state); utime is field 14, stime 15.
    (ticks(11) + ticks(12)) / 100.0
}

// ---------------------------------------------------------------------------------------
// Socket.IO client over raw websocket
// ---------------------------------------------------------------------------------------

/// Deserializes a number or a numeric string into u64 (for `sentAtNs`).
struct NumOrStr(u64);

impl<'de> Deserialize<'de> for NumOrStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = NumOrStr;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number or a numeric string")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<NumOrStr, E> {
                Ok(NumOrStr(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<NumOrStr, E> {
                Ok(NumOrStr(v.max(0) as u64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<NumOrStr, E> {
                Ok(NumOrStr(v.max(0.0) as u64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<NumOrStr, E> {
                v.parse().map(NumOrStr).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct EventData<'a> {
    seq: Option<u64>,
    #[serde(rename = "sentAtNs")]
    sent_at_ns: Option<NumOrStr>,
    #[serde(rename = "sessionId", borrow)]
    session_id: Option<&'a str>,
    #[serde(borrow)]
    timestamp: Option<&'a str>,
}

/// Splits a Socket.IO packet carried in an Engine.IO `4` message: returns the event
/// array text (`["name",...]`) of a root-namespace EVENT packet (`42[...]`, `42<ackid>[...]`).
fn event_array(text: &str) -> Option<&str> {
    let rest = text.strip_prefix("42")?;
    let start = rest.find('[')?;
    if !rest[..start].bytes().all(|b| b.is_ascii_digit()) {
        return None; // namespaced packet ("42/ns,...") – not ours
    }
    Some(&rest[start..])
}

/// Event name of `["name", ...]` without parsing the rest.
fn event_name(arr: &str) -> Option<&str> {
    let s = arr.strip_prefix("[\"")?;
    let end = s.find('"')?;
    Some(&s[..end])
}

fn is_iso_ms_utc(ts: &str) -> bool {
    // 2026-11-22T02:07:08.123Z
    let b = ts.as_bytes();
    b.len() == 24
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[23] == b'Z'
}

enum Step {
    /// Engine.IO ping answered / noop / ws control frame.
    Handled,
    Event(String, Value),
    Other(String),
}

async fn recv_text(
    ws: &mut Ws,
) -> Result<Option<tokio_tungstenite::tungstenite::Utf8Bytes>, BoxError> {
    match ws.next().await {
        None => Err("connection closed".into()),
        Some(Err(e)) => Err(e.into()),
        Some(Ok(Message::Text(t))) => Ok(Some(t)),
        Some(Ok(Message::Close(f))) => Err(format!("server closed the websocket: {f:?}").into()),
        Some(Ok(Message::Binary(_))) => Err("unexpected binary frame".into()),
        Some(Ok(_)) => Ok(None), // ws ping/pong: tungstenite answers pings itself
    }
}

/// Reads one message during the handshake phase and classifies it (answers pings).
async fn handshake_step(ws: &mut Ws) -> Result<Step, BoxError> {
    let Some(t) = recv_text(ws).await? else {
        return Ok(Step::Handled);
    };
    let text = t.as_str();
    if text == "2" {
        ws.send(Message::text("3")).await?;
        return Ok(Step::Handled);
    }
    if text == "6" {
        return Ok(Step::Handled);
    }
    if let Some(arr) = event_array(text) {
        let v: Value = serde_json::from_str(arr)?;
        let mut it = match v {
            Value::Array(a) => a.into_iter(),
            _ => return Err(format!("event packet is not an array: {text}").into()),
        };
        let name = match it.next() {
            Some(Value::String(s)) => s,
            _ => return Err(format!("event without a name: {text}").into()),
        };
        return Ok(Step::Event(name, it.next().unwrap_or(Value::Null)));
    }
    Ok(Step::Other(text.to_string()))
}

fn check_connected(data: &Value, shared: &Shared) {
    let ok = data.get("socketId").is_some_and(Value::is_string)
        && data
            .get("timestamp")
            .and_then(Value::as_str)
            .is_some_and(is_iso_ms_utc);
    if !ok {
        shared.problems.report(format_args!(
            "`connected` payload not {{socketId, timestamp}}: {data}"
        ));
    }
}

fn check_subscribed(data: &Value, sid: &str, shared: &Shared) -> Option<u64> {
    let last_seq = data.get("lastSeq").and_then(Value::as_u64);
    let ok = data.get("sessionId").and_then(Value::as_str) == Some(sid)
        && data
            .get("timestamp")
            .and_then(Value::as_str)
            .is_some_and(is_iso_ms_utc)
        && last_seq.is_some()
        && data.get("epoch").is_some_and(Value::is_string)
        && data.get("recovered").is_some_and(Value::is_boolean);
    if !ok {
        shared.problems.report(format_args!(
            "`subscribed` payload not {{sessionId, timestamp, lastSeq, epoch, recovered}}: {data}"
        ));
    }
    last_seq
}

/// Sleeps until `at_ms` (milliseconds since the epoch); at once when it has passed or is 0.
async fn wait_until_epoch_ms(at_ms: u64) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    if at_ms > now_ms {
        tokio::time::sleep(Duration::from_millis(at_ms - now_ms)).await;
    }
}

/// A TCP connection to the server (with no Nagle delay), from the next `--source-addrs`
/// address when there are any.
async fn dial(shared: &Shared) -> Result<TcpStream, BoxError> {
    let tcp = if shared.sources.0.is_empty() {
        TcpStream::connect(&shared.addr).await?
    } else {
        let n = shared.next_source.fetch_add(1, Ordering::Relaxed);
        let source = shared.sources.0[n % shared.sources.0.len()];
        let target = tokio::net::lookup_host(&shared.addr)
            .await?
            .find(std::net::SocketAddr::is_ipv4)
            .ok_or("the server has no IPv4 address")?;
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((source, 0).into())?;
        socket.connect(target).await?
    };
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// TCP connect, websocket upgrade, Engine.IO open, Socket.IO connect, wait for `connected`,
/// subscribe, wait for `subscribed`. Returns the stream and the `subscribed.lastSeq`.
async fn establish(shared: &Shared, sid: &str) -> Result<(Ws, Option<u64>), BoxError> {
    let tcp = dial(shared).await?;
    let cfg = WebSocketConfig::default()
        .read_buffer_size(shared.read_buffer)
        .write_buffer_size(0);
    let (mut ws, _resp) =
        tokio_tungstenite::client_async_with_config(shared.ws_url.as_str(), tcp, Some(cfg)).await?;

    // Engine.IO open packet.
    let open = loop {
        if let Some(t) = recv_text(&mut ws).await? {
            break t;
        }
    };
    let open = open.as_str();
    let Some(json) = open.strip_prefix('0') else {
        return Err(format!("expected Engine.IO open packet, got {open:?}").into());
    };
    let v: Value = serde_json::from_str(json)?;
    if !v.get("sid").is_some_and(Value::is_string)
        || !v.get("pingInterval").is_some_and(Value::is_u64)
    {
        shared
            .problems
            .report(format_args!("open packet lacks sid/pingInterval: {open}"));
    }

    // Socket.IO CONNECT to "/".
    ws.send(Message::text(connect_frame())).await?;
    let mut got_connect = false;
    let mut got_connected = false;
    while !(got_connect && got_connected) {
        match handshake_step(&mut ws).await? {
            Step::Handled => {}
            Step::Event(name, data) if name == "connected" => {
                check_connected(&data, shared);
                got_connected = true;
            }
            Step::Event(name, data) => {
                shared
                    .problems
                    .report(format_args!("event {name:?} before `connected`: {data}"));
            }
            Step::Other(text) if text.starts_with("40") => {
                if !got_connect && !text[2..].contains("\"sid\"") {
                    shared
                        .problems
                        .report(format_args!("CONNECT reply without sid: {text}"));
                }
                got_connect = true;
            }
            Step::Other(text) if text.starts_with("44") => {
                return Err(format!("connect_error: {text}").into());
            }
            Step::Other(text) => {
                shared
                    .problems
                    .report(format_args!("unexpected packet during connect: {text:?}"));
            }
        }
    }

    if !shared.subscribe {
        return Ok((ws, None));
    }
    let subscribe = Message::text(
        json!(["subscribe", {"sessionId": sid, "lastSeq": 0}])
            .to_string()
            .replacen('[', "42[", 1),
    );
    for attempt in 0..3 {
        if attempt > 0 {
            shared.subscribe_retries.fetch_add(1, Ordering::Relaxed);
        }
        ws.send(subscribe.clone()).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let step = match tokio::time::timeout_at(deadline, handshake_step(&mut ws)).await {
                Ok(s) => s?,
                Err(_) => break, // resend
            };
            match step {
                Step::Handled => {}
                Step::Event(name, data) if name == "subscribed" => {
                    let last = check_subscribed(&data, sid, shared);
                    return Ok((ws, last));
                }
                Step::Event(name, data) if name == "error" => {
                    shared.server_errors.fetch_add(1, Ordering::Relaxed);
                    return Err(format!("server replied error to subscribe: {data}").into());
                }
                Step::Event(name, data) => {
                    shared
                        .problems
                        .report(format_args!("event {name:?} before `subscribed`: {data}"));
                }
                Step::Other(text) => {
                    shared
                        .problems
                        .report(format_args!("unexpected packet during subscribe: {text:?}"));
                }
            }
        }
    }
    Err("no `subscribed` after 3 subscribe attempts (5 s each)".into())
}

/// A subscribed client's connection, whatever its transport.
enum Conn {
    Sio(Ws),
    Plain(Ws),
    Sse(SseBody),
}

struct SseBody {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
    /// Where the next frame starts in `buffer`.
    read: usize,
}

/// One thing a client received.
enum Incoming {
    /// A WebSocket text message (an event, or something to report), not copied.
    Text(tokio_tungstenite::tungstenite::Utf8Bytes),
    /// An SSE frame.
    Frame(String),
    /// Engine.IO ping / noop, WebSocket control frames, SSE comments.
    Skip,
    Closed(String),
}

impl Conn {
    async fn recv(&mut self) -> Incoming {
        match self {
            Conn::Sio(ws) | Conn::Plain(ws) => match ws.next().await {
                Some(Ok(Message::Text(t))) => Incoming::Text(t),
                Some(Ok(Message::Close(f))) => Incoming::Closed(format!("closed: {f:?}")),
                None => Incoming::Closed("closed".into()),
                Some(Err(e)) => Incoming::Closed(format!("websocket error: {e}")),
                Some(Ok(_)) => Incoming::Skip,
            },
            Conn::Sse(sse) => loop {
                if let Some(end) = sse.buffer[sse.read..].find("\n\n") {
                    let start = sse.read;
                    sse.read += end + 2;
                    let frame = sse.buffer[start..sse.read].to_owned();
                    if frame.starts_with(':') {
                        return Incoming::Skip;
                    }
                    return Incoming::Frame(frame);
                }
                // Only what follows the last whole frame is kept (no quadratic shifting).
                sse.buffer.drain(..sse.read);
                sse.read = 0;
                match sse.body.next().await {
                    Some(Ok(chunk)) => sse.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                    Some(Err(e)) => return Incoming::Closed(format!("stream error: {e}")),
                    None => return Incoming::Closed("stream ended".into()),
                }
            },
        }
    }

    /// Answers an Engine.IO ping; false when the connection is gone.
    async fn pong(&mut self) -> bool {
        match self {
            Conn::Sio(ws) => ws.send(Message::text("3")).await.is_ok(),
            _ => true,
        }
    }
}

/// The event name and the payload object of a message, per transport.
fn split_event(transport: Transport, text: &str) -> Option<(&str, &str)> {
    match transport {
        Transport::Socketio => {
            let arr = event_array(text)?;
            let name = event_name(arr)?;
            let rest = arr[name.len() + 3..].trim_start_matches(',');
            Some((name, rest.strip_suffix(']')?))
        }
        Transport::Ws => {
            // herald puts `"type":"<name>"` last.
            let at = text.rfind(r#""type":""#)?;
            let name = text[at + 8..].split('"').next()?;
            Some((name, text))
        }
        Transport::Sse => {
            let mut name = None;
            let mut data = None;
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = Some(v);
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = Some(v);
                }
            }
            Some((name?, data?))
        }
    }
}

/// Connects and subscribes over herald's plain WebSocket.
async fn establish_plain(shared: &Shared, sid: &str) -> Result<Ws, BoxError> {
    let tcp = dial(shared).await?;
    let cfg = WebSocketConfig::default()
        .read_buffer_size(shared.read_buffer)
        .write_buffer_size(0);
    let mut url = format!("{}/ws", shared.base.replacen("http", "ws", 1));
    if let Some(token) = &shared.token {
        url.push_str(&format!("?token={token}"));
    }
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(url.as_str(), tcp, Some(cfg)).await?;
    let hello = loop {
        if let Some(t) = recv_text(&mut ws).await? {
            break t;
        }
    };
    let hello: Value = serde_json::from_str(hello.as_str())?;
    check_connected(&hello, shared);
    let request = json!({ "type": "subscribe", "sessionId": sid, "lastSeq": 0 });
    ws.send(Message::text(request.to_string())).await?;
    loop {
        let Some(t) = recv_text(&mut ws).await? else {
            continue;
        };
        let reply: Value = serde_json::from_str(t.as_str())?;
        match reply["type"].as_str() {
            Some("subscribed") => {
                check_subscribed(&reply, sid, shared);
                return Ok(ws);
            }
            Some("error") => return Err(format!("subscribe refused: {reply}").into()),
            _ => shared
                .problems
                .report(format_args!("message before `subscribed`: {reply}")),
        }
    }
}

/// Opens the session's SSE stream and reads up to its `subscribed` frame.
async fn establish_sse(shared: &Shared, sid: &str) -> Result<SseBody, BoxError> {
    let mut request = shared.sse_http.get(format!(
        "{}/api/wizard/session/{sid}/stream?lastSeq=0",
        shared.base
    ));
    if let Some(token) = &shared.token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    if !response.status().is_success() {
        return Err(format!("stream refused: {}", response.status()).into());
    }
    let mut sse = SseBody {
        body: response.bytes_stream().boxed(),
        buffer: String::new(),
        read: 0,
    };
    let mut conn = Conn::Sse(sse);
    loop {
        match conn.recv().await {
            Incoming::Frame(frame) => {
                let Some(("subscribed", data)) = split_event(Transport::Sse, &frame) else {
                    return Err(format!("expected `subscribed` first: {frame:.200}").into());
                };
                check_subscribed(&serde_json::from_str(data)?, sid, shared);
                break;
            }
            Incoming::Skip | Incoming::Text(_) => {}
            Incoming::Closed(why) => return Err(why.into()),
        }
    }
    let Conn::Sse(body) = conn else {
        unreachable!()
    };
    sse = body;
    Ok(sse)
}

/// Connects and subscribes over the configured transport.
async fn establish_any(shared: &Shared, sid: &str) -> Result<(Conn, Option<u64>), BoxError> {
    match shared.transport {
        Transport::Socketio => establish(shared, sid)
            .await
            .map(|(ws, last)| (Conn::Sio(ws), last)),
        Transport::Ws => Ok((Conn::Plain(establish_plain(shared, sid).await?), Some(0))),
        Transport::Sse => Ok((Conn::Sse(establish_sse(shared, sid).await?), Some(0))),
    }
}

/// Per-client receive state in fan-out mode.
struct Tracker {
    seen: Vec<u64>, // bitset over seq 1..=n
    n: u64,
    contiguous: u64,
    max_seq: u64,
}

impl Tracker {
    fn new(n: u64) -> Self {
        Tracker {
            seen: vec![0; (n as usize).div_ceil(64) + 1],
            n,
            contiguous: 0,
            max_seq: 0,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_client(
    shared: Arc<Shared>,
    live: Arc<ClientLive>,
    sid: String,
    producer: usize,
    ready: mpsc::UnboundedSender<Result<(), String>>,
    mut shutdown: watch::Receiver<bool>,
) -> ClientResult {
    let mut res = ClientResult::default();
    let permit = shared.connect_sem.acquire().await.expect("semaphore");
    let mut last_err = String::new();
    let mut conn = None;
    for attempt in 0..3u64 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
        }
        match tokio::time::timeout(Duration::from_secs(30), establish_any(&shared, &sid)).await {
            Ok(Ok(c)) => {
                conn = Some(c);
                break;
            }
            Ok(Err(e)) => last_err = e.to_string(),
            Err(_) => last_err = "connect/subscribe timed out (30 s)".into(),
        }
    }
    drop(permit);
    let Some((mut conn, last_seq)) = conn else {
        let _ = ready.send(Err(last_err.clone()));
        res.connect_error = Some(last_err);
        return res;
    };
    res.connected = true;
    res.subscribed_last_seq = last_seq;
    let _ = ready.send(Ok(()));
    drop(ready);

    let fan = shared.mode == Mode::Fanout;
    let mut tr = Tracker::new(if fan { shared.events_per_session } else { 0 });
    if fan {
        res.hist = Some(new_hist());
    }
    let mut done = false;
    // One shutdown future for the whole loop (re-creating it per message costs two lock
    // round trips on the watch channel's waiter list).
    let stop = shutdown.changed();
    tokio::pin!(stop);

    loop {
        let msg = tokio::select! {
            biased;
            _ = &mut stop => break,
            m = conn.recv() => m,
        };
        let owned_frame;
        let owned_text;
        let text = match msg {
            Incoming::Text(t) => {
                owned_text = t;
                owned_text.as_str()
            }
            Incoming::Frame(f) => {
                owned_frame = f;
                owned_frame.as_str()
            }
            Incoming::Skip => continue,
            Incoming::Closed(why) => {
                if !shared.stopping.load(Ordering::Relaxed) {
                    shared.problems.report(format_args!(
                        "the connection of a client of {sid} ended: {why}"
                    ));
                }
                break;
            }
        };
        if text == "2" {
            if !conn.pong().await {
                break;
            }
            continue;
        }
        let Some((name, object)) = split_event(shared.transport, text) else {
            if text != "6" {
                shared
                    .problems
                    .report(format_args!("unexpected packet: {:.200}", text));
            }
            continue;
        };
        match Some(name) {
            Some("progress") if fan => {
                let now = unix_ns();
                let recv_at = Instant::now();
                let data: EventData = match serde_json::from_str(object) {
                    Ok(v) => v,
                    Err(e) => {
                        shared
                            .problems
                            .report(format_args!("bad progress event ({e}): {:.200}", text));
                        continue;
                    }
                };
                res.received += 1;
                res.last_recv = Some(recv_at);
                if data.session_id != Some(sid.as_str()) {
                    res.wrong_session += 1;
                    continue;
                }
                if res.received == 1 && !data.timestamp.is_some_and(is_iso_ms_utc) {
                    shared.problems.report(format_args!(
                        "event timestamp not ISO 8601 ms UTC: {:.200}",
                        text
                    ));
                }
                if let Some(NumOrStr(sent)) = data.sent_at_ns {
                    let us = now.saturating_sub(sent) / 1000;
                    if let Some(h) = res.hist.as_mut() {
                        h.saturating_record(us.max(1));
                    }
                }
                let Some(seq) = data.seq else {
                    shared
                        .problems
                        .report(format_args!("event without seq: {:.200}", text));
                    continue;
                };
                if seq == 0 || seq > tr.n {
                    shared
                        .problems
                        .report(format_args!("seq {seq} outside 1..={} on {sid}", tr.n));
                    continue;
                }
                let (w, b) = ((seq / 64) as usize, seq % 64);
                if tr.seen[w] & (1 << b) != 0 {
                    res.duplicates += 1;
                    continue;
                }
                tr.seen[w] |= 1 << b;
                res.distinct += 1;
                if seq < tr.max_seq {
                    res.out_of_order += 1;
                }
                tr.max_seq = tr.max_seq.max(seq);
                if seq == tr.contiguous + 1 {
                    let mut c = seq;
                    while c < tr.n && tr.seen[((c + 1) / 64) as usize] & (1 << ((c + 1) % 64)) != 0
                    {
                        c += 1;
                    }
                    tr.contiguous = c;
                    live.contiguous.store(c, Ordering::Release);
                    if shared.producer_waiting[producer].load(Ordering::Acquire) {
                        shared.producer_notify[producer].notify_one();
                    }
                }
                if !done && res.distinct == tr.n {
                    done = true;
                    shared.done_clients.fetch_add(1, Ordering::AcqRel);
                    shared.all_done.notify_one();
                }
            }
            Some("error") => {
                shared.server_errors.fetch_add(1, Ordering::Relaxed);
                shared
                    .problems
                    .report(format_args!("server sent error event: {:.300}", text));
            }
            Some(name) => {
                shared
                    .problems
                    .report(format_args!("unexpected event {name:?}: {:.200}", text));
            }
            None => {
                shared
                    .problems
                    .report(format_args!("unparseable event packet: {:.200}", text));
            }
        }
    }
    res
}

struct Fleet {
    shared: Arc<Shared>,
    lives: Vec<Arc<ClientLive>>,
    handles: Vec<tokio::task::JoinHandle<ClientResult>>,
    shutdown: watch::Sender<bool>,
    ready_rx: mpsc::UnboundedReceiver<Result<(), String>>,
    session_ids: Vec<String>,
}

fn spawn_fleet(
    c: &CommonArgs,
    mode: Mode,
    events_per_session: u64,
    producers: usize,
    subscribe: bool,
) -> Result<Fleet, BoxError> {
    if c.sessions == 0 || c.clients == 0 {
        return Err("--clients and --sessions must be > 0".into());
    }
    let (ws_url, addr, base) = endpoints(&c.url)?;
    let shared = Arc::new(Shared {
        mode,
        subscribe,
        transport: c.transport,
        ws_url,
        base,
        token: c.token.clone(),
        sse_http: reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("an HTTP client"),
        addr,
        sources: c.source_addrs.clone(),
        next_source: AtomicUsize::new(0),
        read_buffer: c.read_buffer,
        events_per_session,
        connect_sem: Semaphore::new(c.connect_concurrency.max(1)),
        problems: Problems::default(),
        server_errors: AtomicU64::new(0),
        subscribe_retries: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
        done_clients: AtomicUsize::new(0),
        all_done: Notify::new(),
        producer_waiting: (0..producers.max(1))
            .map(|_| AtomicBool::new(false))
            .collect(),
        producer_notify: (0..producers.max(1)).map(|_| Notify::new()).collect(),
    });
    let prefix = session_prefix(c);
    let session_ids: Vec<String> = (0..c.sessions).map(|i| session_id(&prefix, i)).collect();
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = mpsc::unbounded_channel();
    let mut lives = Vec::with_capacity(c.clients);
    let mut handles = Vec::with_capacity(c.clients);
    for i in 0..c.clients {
        let s = i % c.sessions;
        let live = Arc::new(ClientLive {
            contiguous: AtomicU64::new(0),
        });
        lives.push(live.clone());
        handles.push(tokio::spawn(run_client(
            shared.clone(),
            live,
            session_ids[s].clone(),
            s % producers.max(1),
            ready_tx.clone(),
            shutdown_rx.clone(),
        )));
    }
    Ok(Fleet {
        shared,
        lives,
        handles,
        shutdown,
        ready_rx,
        session_ids,
    })
}

/// Waits until every client has reported connected (or failed), or the deadline.
async fn wait_ready(fleet: &mut Fleet, n: usize, deadline: tokio::time::Instant) -> (usize, usize) {
    let (mut ok, mut failed) = (0, 0);
    let mut first_errors = 0;
    while ok + failed < n {
        match tokio::time::timeout_at(deadline, fleet.ready_rx.recv()).await {
            Ok(Some(Ok(()))) => ok += 1,
            Ok(Some(Err(e))) => {
                failed += 1;
                if first_errors < 5 {
                    first_errors += 1;
                    eprintln!("loadgen: client failed to connect/subscribe: {e}");
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    (ok, failed)
}

async fn collect(fleet: Fleet) -> (Arc<Shared>, Vec<ClientResult>) {
    fleet.shared.stopping.store(true, Ordering::Relaxed);
    let _ = fleet.shutdown.send(true);
    let mut out = Vec::with_capacity(fleet.handles.len());
    for h in fleet.handles {
        // Clients still connecting are aborted after a short grace period.
        match tokio::time::timeout(Duration::from_secs(5), h).await {
            Ok(Ok(r)) => out.push(r),
            _ => out.push(ClientResult {
                connect_error: Some("did not finish".into()),
                ..Default::default()
            }),
        }
    }
    (fleet.shared, out)
}

fn problems_json(shared: &Shared) -> Value {
    json!({
        "count": shared.problems.count.load(Ordering::Relaxed),
        "samples": *shared.problems.samples.lock().unwrap(),
    })
}

// ---------------------------------------------------------------------------------------
// fanout
// ---------------------------------------------------------------------------------------

struct ProducerSession {
    url: String,
    posted: u64,
    clients: Vec<Arc<ClientLive>>,
    seq_mismatch_reported: bool,
}

#[derive(Default)]
struct ProducerStats {
    requests: u64,
    /// POSTs sent again after a 503 or 429 (`--retries`).
    retries: u64,
    events: u64,
    seq_mismatches: u64,
    post_hist: Option<Histogram<u64>>,
}

fn batch_body(first_progress: u64, n_total: u64, count: u64, pad: &str, keys: bool) -> String {
    let sent = unix_ns();
    let mut s = String::with_capacity(count as usize * (96 + pad.len()) + 2);
    s.push('[');
    for k in 0..count {
        if k > 0 {
            s.push(',');
        }
        let progress = ((first_progress + k) * 100 / n_total.max(1)).min(100);
        s.push_str(r#"{"event":"progress","data":{"status":"PROCESSING","progress":"#);
        s.push_str(&progress.to_string());
        s.push_str(r#","sentAtNs":""#);
        s.push_str(&sent.to_string());
        s.push('"');
        if !pad.is_empty() {
            s.push_str(r#","pad":""#);
            s.push_str(pad);
            s.push('"');
        }
        s.push('}');
        if keys {
            s.push_str(r#","idempotencyKey":"e"#);
            s.push_str(&(first_progress + k).to_string());
            s.push('"');
        }
        s.push('}');
    }
    s.push(']');
    s
}

#[derive(Deserialize)]
struct IngestReply {
    accepted: Option<u64>,
    duplicates: Option<u64>,
    #[serde(rename = "lastSeq")]
    last_seq: Option<u64>,
}

/// Spreads POSTs evenly over time for `--rate`: the k-th POST of the run (over all
/// producers) may start at `start + k × interval`.
struct Pacer {
    start: tokio::time::Instant,
    interval: Duration,
    next: AtomicU64,
}

impl Pacer {
    fn new(rate_msgs: u64, subscribers_per_session: f64, batch: u64) -> Self {
        let events_per_sec = rate_msgs as f64 / subscribers_per_session.max(1.0);
        Self {
            start: tokio::time::Instant::now(),
            interval: Duration::from_secs_f64(batch as f64 / events_per_sec.max(1e-9)),
            next: AtomicU64::new(0),
        }
    }

    async fn wait_turn(&self) {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        let at = self.start + self.interval.mul_f64(k as f64);
        tokio::time::sleep_until(at).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn producer(
    p: usize,
    shared: Arc<Shared>,
    http: reqwest::Client,
    mut sessions: Vec<ProducerSession>,
    n: u64,
    batch: u64,
    window: u64,
    pad: Arc<String>,
    pacer: Option<Arc<Pacer>>,
    retries: u32,
) -> Result<ProducerStats, String> {
    let mut st = ProducerStats {
        post_hist: Some(new_hist()),
        ..Default::default()
    };
    let can_post = |s: &ProducerSession| -> bool {
        if s.posted >= n {
            return false;
        }
        if window == 0 {
            return true;
        }
        let b = batch.min(n - s.posted);
        let min = s
            .clients
            .iter()
            .map(|c| c.contiguous.load(Ordering::Acquire))
            .min()
            .unwrap_or(s.posted);
        s.posted + b - min <= window
    };
    loop {
        let mut remaining = false;
        let mut progressed = false;
        for s in sessions.iter_mut() {
            if s.posted >= n {
                continue;
            }
            remaining = true;
            if !can_post(s) {
                continue;
            }
            if let Some(pacer) = &pacer {
                pacer.wait_turn().await;
            }
            let b = batch.min(n - s.posted);
            let body = batch_body(s.posted, n, b, &pad, retries > 0);
            let t0 = Instant::now();
            let mut attempt = 0;
            let text = loop {
                let resp = http
                    .post(&s.url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .map_err(|e| format!("POST {}: {e}", s.url))?;
                let status = resp.status();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                let text = resp
                    .text()
                    .await
                    .map_err(|e| format!("POST {}: reading reply: {e}", s.url))?;
                if status.as_u16() == 202 {
                    break text;
                }
                if !matches!(status.as_u16(), 429 | 503) || attempt >= retries {
                    return Err(format!("POST {} → {status}: {text:.300}", s.url));
                }
                attempt += 1;
                st.retries += 1;
                let wait = retry_after.map_or(
                    Duration::from_millis(100 * u64::from(attempt)),
                    Duration::from_secs,
                );
                tokio::time::sleep(wait).await;
            };
            if let Some(h) = st.post_hist.as_mut() {
                h.saturating_record((t0.elapsed().as_micros() as u64).max(1));
            }
            let reply: IngestReply = serde_json::from_str(&text)
                .map_err(|e| format!("POST {}: bad reply {text:.200}: {e}", s.url))?;
            s.posted += b;
            st.requests += 1;
            st.events += b;
            // A retry of a batch logged after all is answered as duplicates.
            let taken = reply.accepted.unwrap_or(0) + reply.duplicates.unwrap_or(0);
            let whole = reply.accepted == Some(b) || (attempt > 0 && taken == b);
            if !whole || reply.last_seq != Some(s.posted) {
                st.seq_mismatches += 1;
                if !s.seq_mismatch_reported {
                    s.seq_mismatch_reported = true;
                    shared.problems.report(format_args!(
                        "ingest reply {text:.200} – expected accepted={b} lastSeq={}",
                        s.posted
                    ));
                }
            }
            progressed = true;
        }
        if !remaining {
            return Ok(st);
        }
        if !progressed {
            shared.producer_waiting[p].store(true, Ordering::Release);
            if !sessions.iter().any(can_post) {
                let _ = tokio::time::timeout(
                    Duration::from_millis(20),
                    shared.producer_notify[p].notified(),
                )
                .await;
            }
            shared.producer_waiting[p].store(false, Ordering::Release);
        }
    }
}

fn pct_ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

async fn fanout(a: FanoutArgs) -> i32 {
    let c = &a.common;
    if a.batch == 0 || a.events_per_session == 0 || a.producers == 0 {
        eprintln!("loadgen: --batch, --events-per-session and --producers must be > 0");
        return 2;
    }
    if a.window != 0 && a.window < a.batch {
        eprintln!("loadgen: --window must be 0 or ≥ --batch");
        return 2;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.timeout);
    let mut fleet = match spawn_fleet(c, Mode::Fanout, a.events_per_session, a.producers, true) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return 2;
        }
    };
    let post_url = a.post_url.as_deref().unwrap_or(&c.url);
    let base = match endpoints(post_url) {
        Ok((_, _, base)) => base,
        Err(e) => {
            eprintln!("loadgen: --post-url: {e}");
            return 2;
        }
    };
    let t_connect = Instant::now();
    let (ok, failed) = wait_ready(&mut fleet, c.clients, deadline).await;
    let connect_secs = t_connect.elapsed().as_secs_f64();
    eprintln!(
        "loadgen: {ok}/{} clients subscribed in {connect_secs:.2} s ({failed} failed)",
        c.clients
    );

    // Clients of each session, for flow control.
    let mut per_session: Vec<Vec<Arc<ClientLive>>> = vec![Vec::new(); c.sessions];
    for (i, l) in fleet.lives.iter().enumerate() {
        per_session[i % c.sessions].push(l.clone());
    }
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = &c.token {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}")
                .parse()
                .expect("a token is a header value"),
        );
    }
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .pool_max_idle_per_host(a.producers)
        .tcp_nodelay(true)
        .build()
        .expect("http client");
    let pad = Arc::new("x".repeat(a.pad));
    let mut owned: Vec<Vec<ProducerSession>> = (0..a.producers).map(|_| Vec::new()).collect();
    for (s, clients) in per_session.into_iter().enumerate() {
        owned[s % a.producers].push(ProducerSession {
            url: format!("{base}/api/sessions/{}/events", fleet.session_ids[s]),
            posted: 0,
            clients,
            seq_mismatch_reported: false,
        });
    }

    wait_until_epoch_ms(a.start_at_ms).await;
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let pacer = (a.rate > 0).then(|| {
        let per_session = c.clients as f64 / c.sessions.max(1) as f64;
        Arc::new(Pacer::new(a.rate, per_session, a.batch))
    });
    let mut producer_handles = Vec::new();
    if failed == 0 && ok == c.clients {
        for (p, sessions) in owned.into_iter().enumerate() {
            producer_handles.push(tokio::spawn(producer(
                p,
                fleet.shared.clone(),
                http.clone(),
                sessions,
                a.events_per_session,
                a.batch,
                a.window,
                pad.clone(),
                pacer.clone(),
                a.retries,
            )));
        }
    }

    // Wait until every client has everything, a producer fails, or the deadline.
    let mut producer_error: Option<String> = None;
    let mut prod_stats = Vec::new();
    let mut timed_out = false;
    if !producer_handles.is_empty() {
        let mut pending: Vec<_> = producer_handles.into_iter().map(Some).collect();
        loop {
            if fleet.shared.done_clients.load(Ordering::Acquire) >= ok {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                timed_out = true;
                break;
            }
            let _ =
                tokio::time::timeout(Duration::from_millis(50), fleet.shared.all_done.notified())
                    .await;
            for slot in pending.iter_mut() {
                if slot.as_ref().is_some_and(|h| h.is_finished()) {
                    match slot.take().expect("some").await {
                        Ok(Ok(st)) => prod_stats.push(st),
                        Ok(Err(e)) => producer_error = Some(e),
                        Err(e) => producer_error = Some(format!("producer panicked: {e}")),
                    }
                }
            }
            if producer_error.is_some() {
                // Give in-flight deliveries a moment, then stop.
                tokio::time::sleep(Duration::from_millis(500)).await;
                break;
            }
        }
        // A producer whose last reply is still on its way when every event has arrived
        // finishes within moments: let it (its stats count), abort only the rest.
        let grace = tokio::time::Instant::now()
            + if timed_out || producer_error.is_some() {
                Duration::ZERO
            } else {
                Duration::from_secs(2)
            };
        for mut h in pending.into_iter().flatten() {
            match tokio::time::timeout_at(grace, &mut h).await {
                Ok(Ok(Ok(st))) => prod_stats.push(st),
                Ok(Ok(Err(e))) => {
                    producer_error.get_or_insert(e);
                }
                Ok(Err(_)) => {}
                Err(_) => {
                    h.abort();
                    if let Ok(Ok(st)) = h.await {
                        prod_stats.push(st);
                    }
                }
            }
        }
    } else {
        timed_out = true;
    }
    let wall = start.elapsed();
    let cpu = cpu_seconds() - cpu0;
    let (shared, results) = collect(fleet).await;

    // Aggregate.
    let mut hist = new_hist();
    let mut post_hist = new_hist();
    let (mut received, mut distinct, mut dups, mut ooo, mut wrong) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut last_recv: Option<Instant> = None;
    let mut connected = 0usize;
    let mut nonzero_start = 0u64;
    for r in &results {
        if r.connected {
            connected += 1;
        }
        received += r.received;
        distinct += r.distinct;
        dups += r.duplicates;
        ooo += r.out_of_order;
        wrong += r.wrong_session;
        if r.subscribed_last_seq.is_some_and(|s| s != 0) {
            nonzero_start += 1;
        }
        if let Some(h) = &r.hist {
            hist.add(h).expect("same bounds");
        }
        if let Some(t) = r.last_recv {
            last_recv = Some(last_recv.map_or(t, |l: Instant| l.max(t)));
        }
    }
    let (mut requests, mut posted, mut seq_mismatches, mut post_retries) = (0u64, 0u64, 0u64, 0u64);
    for p in &prod_stats {
        requests += p.requests;
        post_retries += p.retries;
        posted += p.events;
        seq_mismatches += p.seq_mismatches;
        if let Some(h) = &p.post_hist {
            post_hist.add(h).expect("same bounds");
        }
    }
    let expected = a.events_per_session * c.clients as u64;
    let missing = expected.saturating_sub(distinct);
    let duration = last_recv
        .map(|t| t.saturating_duration_since(start))
        .unwrap_or(wall)
        .as_secs_f64()
        .max(1e-9);
    let msgs_per_sec = received as f64 / duration;
    let problems = shared.problems.count.load(Ordering::Relaxed);
    let server_errors = shared.server_errors.load(Ordering::Relaxed);

    eprintln!(
        "fanout{}: {} clients / {} sessions, {} events/session, batch {}, {} producers, window {}",
        if c.label.is_empty() {
            String::new()
        } else {
            format!(" [{}]", c.label)
        },
        c.clients,
        c.sessions,
        a.events_per_session,
        a.batch,
        a.producers,
        a.window
    );
    if a.rate > 0 {
        eprintln!("  offered load: {} msgs/s (paced POSTs)", a.rate);
    }
    if post_url != c.url {
        eprintln!("  clients on {}, events posted to {post_url}", c.url);
    }
    eprintln!(
        "  posted {posted} events in {requests} requests; delivered {received} msgs ({distinct} distinct of {expected} expected) in {duration:.3} s → {msgs_per_sec:.0} msgs/s"
    );
    eprintln!(
        "  latency POST→receipt ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2};  POST round trip ms: p50 {:.2} p99 {:.2}",
        pct_ms(&hist, 0.5),
        pct_ms(&hist, 0.99),
        pct_ms(&hist, 0.999),
        hist.max() as f64 / 1000.0,
        pct_ms(&post_hist, 0.5),
        pct_ms(&post_hist, 0.99)
    );
    eprintln!(
        "  missing {missing}  duplicates {dups}  out-of-order {ooo}  wrong-session {wrong}  server errors {server_errors}  protocol problems {problems}  loadgen CPU {:.0}%",
        100.0 * cpu / wall.as_secs_f64().max(1e-9)
    );
    if let Some(e) = &producer_error {
        eprintln!("  producer error: {e}");
    }
    if timed_out {
        eprintln!("  TIMED OUT after {} s", a.timeout);
    }

    let result = json!({
        "scenario": "fanout",
        "label": c.label,
        "url": c.url,
        "postUrl": post_url,
        "clients": c.clients,
        "sessions": c.sessions,
        "eventsPerSession": a.events_per_session,
        "batch": a.batch,
        "producers": a.producers,
        "window": a.window,
        "rate": a.rate,
        "connected": connected,
        "connectSecs": connect_secs,
        "requests": requests,
        "postRetries": post_retries,
        "posted": posted,
        "expected": expected,
        "delivered": received,
        "distinct": distinct,
        "durationSecs": duration,
        "msgsPerSec": msgs_per_sec,
        "latencyMs": {
            "p50": pct_ms(&hist, 0.5),
            "p90": pct_ms(&hist, 0.9),
            "p99": pct_ms(&hist, 0.99),
            "p999": pct_ms(&hist, 0.999),
            "max": hist.max() as f64 / 1000.0,
        },
        "postMs": { "p50": pct_ms(&post_hist, 0.5), "p99": pct_ms(&post_hist, 0.99) },
        "missing": missing,
        "duplicates": dups,
        "outOfOrder": ooo,
        "wrongSession": wrong,
        "seqMismatches": seq_mismatches,
        "subscribedNonZeroLastSeq": nonzero_start,
        "subscribeRetries": shared.subscribe_retries.load(Ordering::Relaxed),
        "serverErrors": server_errors,
        "problems": problems_json(&shared),
        "producerError": producer_error,
        "timedOut": timed_out,
        "loadgenCpuPct": 100.0 * cpu / wall.as_secs_f64().max(1e-9),
    });
    println!("RESULT {result}");
    let lossless = missing == 0 && dups == 0 && ooo == 0 && wrong == 0;
    if lossless && producer_error.is_none() && !timed_out && connected == c.clients {
        0
    } else {
        1
    }
}

// ---------------------------------------------------------------------------------------
// idle
// ---------------------------------------------------------------------------------------

async fn idle(a: IdleArgs) -> i32 {
    let c = &a.common;
    let mut fleet = match spawn_fleet(c, Mode::Idle, 0, 1, !a.no_subscribe) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return 2;
        }
    };
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.connect_timeout);
    let (ok, failed) = wait_ready(&mut fleet, c.clients, deadline).await;
    let connect_secs = t0.elapsed().as_secs_f64();
    println!("READY {ok}");
    let _ = std::io::stdout().flush();
    eprintln!(
        "idle{}: {ok}/{} clients connected+subscribed in {connect_secs:.2} s ({:.0}/s), {failed} failed",
        if c.label.is_empty() {
            String::new()
        } else {
            format!(" [{}]", c.label)
        },
        c.clients,
        ok as f64 / connect_secs.max(1e-9)
    );

    // Hold until stdin closes or the hold time passes.
    let hold = tokio::time::sleep(Duration::from_secs(a.hold_secs));
    tokio::pin!(hold);
    let held_from = Instant::now();
    if a.ignore_stdin {
        hold.await;
    } else {
        let stdin_closed = async {
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 256];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        tokio::select! {
            _ = &mut hold => {}
            _ = stdin_closed => {}
        }
    }
    let held_secs = held_from.elapsed().as_secs_f64();
    // Count clients the server dropped while we held them.
    let (shared, results) = collect(fleet).await;
    let problems = shared.problems.count.load(Ordering::Relaxed);
    let connected = results.iter().filter(|r| r.connected).count();
    let result = json!({
        "scenario": "idle",
        "label": c.label,
        "clients": c.clients,
        "sessions": c.sessions,
        "connected": connected,
        "failed": failed,
        "connectSecs": connect_secs,
        "connectsPerSec": ok as f64 / connect_secs.max(1e-9),
        "heldSecs": held_secs,
        "subscribeRetries": shared.subscribe_retries.load(Ordering::Relaxed),
        "serverErrors": shared.server_errors.load(Ordering::Relaxed),
        "problems": problems_json(&shared),
    });
    println!("RESULT {result}");
    if ok == c.clients && problems == 0 {
        0
    } else {
        1
    }
}
