//! Socket-level fuzz client: sends random and mutated Engine.IO / Socket.IO frames (over
//! websockets and long-polling), HTTP requests (well-formed ones with hostile bodies,
//! headers and paths) and raw malformed HTTP at a running herald, and checks every answer.
//!
//! What must hold, or the run fails (exit status 1):
//! - every websocket frame and polling payload herald sends is a well-formed Engine.IO packet,
//!   and every Socket.IO event in it a JSON array;
//! - no HTTP answer is a 5xx (503 `TOO_MANY_SESSIONS` excepted: it is the session cap), and
//!   every `/api` error is the JSON error shape `{ error: { code, message } }`;
//! - every raw request is answered with an HTTP status line or closed;
//! - herald stays up, and (with `--pid`) its memory after the last round, once every
//!   connection has closed and RSS has settled, is within `--rss-slack-pct` of the highest
//!   after an earlier round (a leak makes every round the highest yet).
//!
//! The frame budget is split into `--rounds` equal rounds; after each, the client waits for
//! `herald_connections` to reach 0 and reads herald's RSS. It prints a summary on stderr and
//! `RESULT {json}` on stdout.
//!
//! ```text
//! cargo run --release --example fuzzclient -- --url http://127.0.0.1:3000 --pid "$PID" \
//!     --key fuzz-secret --frames 1000000
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

#[path = "../src/fuzzing.rs"]
#[allow(dead_code)]
mod fuzzing;

use fuzzing::Fuzz;

#[derive(Parser, Debug)]
#[command(name = "fuzzclient", about = "Socket-level fuzz client for herald")]
struct Cli {
    /// herald's base URL (http://HOST:PORT), loopback only.
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    url: String,
    /// Frames, polling packets and HTTP requests to send in all.
    #[arg(long, default_value_t = 1_000_000)]
    frames: u64,
    /// Stop after this many seconds even if frames remain.
    #[arg(long, default_value_t = 900)]
    seconds: u64,
    /// Connections fuzzing at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Rounds the frames are split into (memory is read after each).
    #[arg(long, default_value_t = 4)]
    rounds: u64,
    /// Seed (random when absent; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// An API key herald accepts (scopes admin, publish, create, read, answer, cancel):
    /// half the requests carry it, so they get past authentication.
    #[arg(long)]
    key: Option<String>,
    /// herald's process id, to read its memory from /proc.
    #[arg(long)]
    pid: Option<u32>,
    /// What to send: any of `ws`, `polling`, `http`, `raw`, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "ws,polling,http,raw")]
    modes: Vec<Mode>,
    /// How much higher than after any earlier round herald's RSS may be after the last.
    #[arg(long, default_value_t = 10)]
    rss_slack_pct: u64,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Ws,
    Polling,
    Http,
    Raw,
}

#[derive(Default)]
struct Tally {
    frames: AtomicU64,
    ws_connections: AtomicU64,
    ws_closed_by_server: AtomicU64,
    polling_sessions: AtomicU64,
    http_requests: AtomicU64,
    raw_requests: AtomicU64,
    raw_unanswered: AtomicU64,
    answers_checked: AtomicU64,
    statuses: Mutex<BTreeMap<u16, u64>>,
    failures: Mutex<Vec<String>>,
    failed: AtomicBool,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.store(true, Ordering::Relaxed);
        let mut failures = self.failures.lock().unwrap();
        if failures.len() < 20 {
            eprintln!("FAILURE: {what}");
            failures.push(what);
        }
    }

    fn status(&self, status: u16) {
        *self.statuses.lock().unwrap().entry(status).or_default() += 1;
    }
}

const SESSIONS: usize = 64;

/// Frames a Socket.IO client sends, the shapes mutations start from.
const FRAMES: &[&[u8]] = &[
    b"40",
    b"40{\"token\":\"x\"}",
    b"42[\"subscribe\",\"fz-1\"]",
    b"42[\"subscribe\",{\"sessionId\":\"fz-2\",\"lastSeq\":0}]",
    b"421[\"subscribe\",{\"sessionId\":\"fz-3\",\"lastSeq\":5,\"epoch\":\"0123456789abcdef\"}]",
    b"422[\"unsubscribe\",\"fz-1\"]",
    b"42[\"unsubscribe\",{\"sessionId\":\"fz-2\"}]",
    b"42[\"nonsense\",1,2,3]",
    b"43[\"ack\"]",
    b"451-[\"subscribe\",{\"_placeholder\":true,\"num\":0}]",
    b"42/other,[\"subscribe\",\"fz-1\"]",
    b"41",
    b"2",
    b"3",
    b"5",
    b"6",
    b"2probe",
];

const BODIES: &[&[u8]] = &[
    br#"{"event":"progress","data":{"status":"PROCESSING","progress":12.5,"prompts":{"total":2,"completed":0,"processing":1,"pending":1,"failed":0}},"idempotencyKey":"k-1"}"#,
    br#"[{"event":"model_result","data":{"promptId":"p1","modelName":"m","status":"completed","result":"out"}},{"event":"completed","data":{"result":{"a":1}}}]"#,
    br#"{"prompts":[{"id":"p1","text":"Summarize this"}],"models":["llama3.1:8b"],"strategy":"parallel","metadata":{"user":"u"}}"#,
    br#"{"sessionId":"fz-1","clarificationId":"c-1","answer":"2024"}"#,
];

const RAW: &[&[u8]] = &[
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /api/sessions/fz-1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 48\r\n\r\n{\"event\":\"progress\",\"data\":{\"progress\":1.0}}   ",
    b"POST /api/sessions/fz-1/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n[{}]\n\r\n0\r\n\r\n",
    b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    b"GET /api/wizard/session/%FF%FE HTTP/1.1\r\nHost: x\r\n\r\n",
];

struct Target {
    url: String,
    host: String,
    key: Option<String>,
    http: reqwest::Client,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let seed = cli.seed.unwrap_or_else(|| fastrand::u64(..));
    let host = cli
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    assert!(
        host.starts_with("127.") || host.starts_with("localhost"),
        "loopback only: {host}"
    );
    let target = Arc::new(Target {
        url: cli.url.trim_end_matches('/').to_owned(),
        host,
        key: cli.key.clone(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
    });
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + Duration::from_secs(cli.seconds);
    let started = Instant::now();
    eprintln!(
        "fuzzclient: {} frames in {} rounds, {} at once, seed {seed}",
        cli.frames, cli.rounds, cli.concurrency
    );

    let baseline = rss_kib(cli.pid);
    let peak = Arc::new(AtomicU64::new(baseline.unwrap_or(0)));
    let sampler = tokio::spawn(sample_rss(cli.pid, peak.clone()));
    let modes: Arc<[Mode]> = cli.modes.clone().into();
    let per_round = cli.frames.div_ceil(cli.rounds.max(1));
    let mut after_rounds = Vec::new();
    for round in 0..cli.rounds.max(1) {
        let round_end = per_round * (round + 1);
        let workers: Vec<_> = (0..cli.concurrency)
            .map(|worker| {
                let fuzz = Fuzz::with_seed("fuzzclient", seed ^ (round << 32) ^ worker as u64, 0);
                tokio::spawn(fuzz_worker(
                    fuzz,
                    target.clone(),
                    tally.clone(),
                    round_end,
                    deadline,
                    modes.clone(),
                ))
            })
            .collect();
        for worker in workers {
            if let Err(error) = worker.await {
                tally.fail(format!("a worker panicked: {error}"));
            }
        }
        if let Err(error) = connections_closed(&target).await {
            tally.fail(error);
        }
        let rss = settled_rss(cli.pid).await;
        eprintln!(
            "round {}: {} frames so far, {:.1?}, herald RSS {:?} KiB",
            round + 1,
            tally.frames.load(Ordering::Relaxed),
            started.elapsed(),
            rss
        );
        after_rounds.push(rss);
        if Instant::now() >= deadline || tally.failed.load(Ordering::Relaxed) {
            break;
        }
    }
    sampler.abort();

    // A leak makes the last round the highest by its size; the allocator's retention
    // moves the figure up and down by tens of MiB between rounds, so the last is held
    // against the highest before it.
    let earlier = after_rounds[..after_rounds.len().saturating_sub(1)]
        .iter()
        .flatten()
        .max();
    if let (Some(earlier), Some(Some(last))) = (earlier, after_rounds.last())
        && *last > earlier + earlier * cli.rss_slack_pct / 100
    {
        tally.fail(format!(
            "herald's RSS after the last round ({last} KiB) is above every earlier round's (at most {earlier} KiB)"
        ));
    }
    if let Err(error) = healthy(&target).await {
        tally.fail(error);
    }

    let frames = tally.frames.load(Ordering::Relaxed);
    let result = json!({
        "seed": seed,
        "frames": frames,
        "seconds": started.elapsed().as_secs_f64(),
        "framesPerSec": frames as f64 / started.elapsed().as_secs_f64(),
        "wsConnections": tally.ws_connections.load(Ordering::Relaxed),
        "wsClosedByServer": tally.ws_closed_by_server.load(Ordering::Relaxed),
        "pollingSessions": tally.polling_sessions.load(Ordering::Relaxed),
        "httpRequests": tally.http_requests.load(Ordering::Relaxed),
        "rawRequests": tally.raw_requests.load(Ordering::Relaxed),
        "rawUnanswered": tally.raw_unanswered.load(Ordering::Relaxed),
        "answersChecked": tally.answers_checked.load(Ordering::Relaxed),
        "statuses": *tally.statuses.lock().unwrap(),
        "rssKib": {
            "baseline": baseline,
            "peak": cli.pid.map(|_| peak.load(Ordering::Relaxed)),
            "afterEachRound": after_rounds,
        },
        "failures": *tally.failures.lock().unwrap(),
    });
    println!("RESULT {result}");
    if tally.failed.load(Ordering::Relaxed) {
        std::process::exit(1);
    }
}

async fn fuzz_worker(
    mut fuzz: Fuzz,
    target: Arc<Target>,
    tally: Arc<Tally>,
    round_end: u64,
    deadline: Instant,
    modes: Arc<[Mode]>,
) {
    while Instant::now() < deadline && !tally.failed.load(Ordering::Relaxed) {
        let want = match fuzz.rng().u8(..100) {
            0..50 => fuzz.rng().u64(20..300),
            50..70 => fuzz.rng().u64(2..12),
            _ => 1,
        };
        let sent = tally.frames.load(Ordering::Relaxed);
        if sent >= round_end {
            return;
        }
        let want = want.min(round_end - sent);
        let mode = match fuzz.rng().u8(..100) {
            0..50 => Mode::Ws,
            50..70 => Mode::Polling,
            70..92 => Mode::Http,
            _ => Mode::Raw,
        };
        if !modes.contains(&mode) {
            continue;
        }
        let result = match mode {
            Mode::Ws => websocket(&mut fuzz, &target, &tally, want).await,
            Mode::Polling => polling(&mut fuzz, &target, &tally, want).await,
            Mode::Http => http_request(&mut fuzz, &target, &tally).await,
            Mode::Raw => raw_request(&mut fuzz, &target, &tally).await,
        };
        if let Err(error) = result {
            tally.fail(error);
        }
    }
}

fn frame(fuzz: &mut Fuzz) -> Vec<u8> {
    let mut frame = fuzz.input(FRAMES);
    if fuzz.rng().u8(..4) == 0 {
        // A well-formed event with a random payload: past the parser, into the handlers.
        let name = ["subscribe", "unsubscribe", "ping", "x"][fuzz.rng().usize(..4)];
        let payload = fuzz.json(3);
        frame = format!("42{}", json!([name, payload])).into_bytes();
    }
    frame
}

/// A websocket connection that sends `frames` frames, reading and checking what comes back.
async fn websocket(
    fuzz: &mut Fuzz,
    target: &Target,
    tally: &Tally,
    frames: u64,
) -> Result<(), String> {
    let mut url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", target.host);
    if let Some(key) = target.key.as_ref().filter(|_| fuzz.rng().bool()) {
        url.push_str(&format!("&token={key}"));
    }
    let mut ws = match tokio_tungstenite::connect_async(&url).await {
        Ok((ws, _)) => ws,
        // A refused handshake (429 over the credential's request rate, 401) is an answer.
        Err(tokio_tungstenite::tungstenite::Error::Http(answer))
            if answer.status().as_u16() < 500 =>
        {
            tally.status(answer.status().as_u16());
            return Ok(());
        }
        Err(error) => return Err(format!("websocket connect: {error}")),
    };
    tally.ws_connections.fetch_add(1, Ordering::Relaxed);
    let mut sent = 0;
    let mut closed = false;
    if fuzz.rng().u8(..4) != 0 {
        let _ = ws.send(Message::text("40")).await;
    }
    while sent < frames && !closed {
        let message = if fuzz.rng().u8(..20) == 0 {
            let len = fuzz.rng().usize(..64);
            Message::binary(
                std::iter::repeat_with(|| fuzz.rng().u8(..))
                    .take(len)
                    .collect::<Vec<u8>>(),
            )
        } else {
            Message::text(String::from_utf8_lossy(&frame(fuzz)).into_owned())
        };
        sent += 1;
        tally.frames.fetch_add(1, Ordering::Relaxed);
        if ws.send(message).await.is_err() {
            closed = true;
        }
        // Read what is already there, without waiting for more.
        while let Some(Some(incoming)) = ws.next().now_or_never() {
            match incoming {
                Ok(Message::Text(text)) => check_engine_packet(text.as_str(), tally)?,
                Ok(Message::Close(_)) | Err(_) => {
                    closed = true;
                    break;
                }
                Ok(_) => {}
            }
        }
    }
    if closed {
        tally.ws_closed_by_server.fetch_add(1, Ordering::Relaxed);
    } else {
        let _ = ws.close(None).await;
    }
    Ok(())
}

/// A long-polling session: handshake, `frames` packets in a few POSTs, a poll, a close.
async fn polling(
    fuzz: &mut Fuzz,
    target: &Target,
    tally: &Tally,
    frames: u64,
) -> Result<(), String> {
    let base = format!("{}/socket.io/?EIO=4&transport=polling", target.url);
    let answer = target
        .http
        .get(with_token(&base, target, fuzz))
        .send()
        .await;
    let (status, body) = answered(answer, tally, "polling handshake").await?;
    if status != 200 {
        return Ok(());
    }
    check_polling_payload(&body, tally)?;
    let sid = serde_json::from_str::<Value>(body.trim_start_matches('0'))
        .ok()
        .and_then(|open| open.get("sid")?.as_str().map(str::to_owned))
        .ok_or_else(|| format!("polling handshake without a sid: {body:?}"))?;
    tally.polling_sessions.fetch_add(1, Ordering::Relaxed);
    let session = format!("{base}&sid={sid}");
    let mut sent = 0;
    while sent < frames {
        let count = fuzz.rng().u64(1..=(frames - sent).min(5));
        let packets: Vec<String> = (0..count)
            .map(|_| String::from_utf8_lossy(&frame(fuzz)).into_owned())
            .collect();
        sent += count;
        tally.frames.fetch_add(count, Ordering::Relaxed);
        let answer = target
            .http
            .post(&session)
            .body(packets.join("\u{1e}"))
            .send()
            .await;
        let (status, _) = answered(answer, tally, "polling post").await?;
        if status != 200 {
            return Ok(());
        }
        // Whatever herald has queued by now; a poll with nothing queued is left to time out.
        let poll =
            tokio::time::timeout(Duration::from_millis(50), target.http.get(&session).send());
        if let Ok(answer @ Ok(_)) = poll.await {
            let (status, body) = answered(answer, tally, "polling get").await?;
            if status == 200 {
                check_polling_payload(&body, tally)?;
            } else {
                return Ok(());
            }
        }
    }
    // Close the session, as a client that leaves does.
    let _ = target.http.post(&session).body("1").send().await;
    Ok(())
}

fn with_token(url: &str, target: &Target, fuzz: &mut Fuzz) -> String {
    match target.key.as_ref().filter(|_| fuzz.rng().bool()) {
        Some(key) => format!("{url}&token={key}"),
        None => url.to_owned(),
    }
}

/// One HTTP request with a random method, path, headers and body.
async fn http_request(fuzz: &mut Fuzz, target: &Target, tally: &Tally) -> Result<(), String> {
    let session = session_id(fuzz);
    let path = match fuzz.rng().u8(..12) {
        0..4 => format!("/api/sessions/{session}/events"),
        4 => format!("/api/sessions/{session}/events?reopen=true"),
        5 => "/api/wizard/session".to_owned(),
        6 => format!("/api/wizard/session/{session}"),
        7 => format!(
            "/api/wizard/session/{session}/events?after={}",
            fuzz.rng().u64(..)
        ),
        8 => format!("/api/wizard/session/{session}/cancel"),
        9 => "/api/wizard/clarifications/respond".to_owned(),
        10 => [
            "/api/wizard/sessions",
            "/api/models",
            "/healthz",
            "/metrics",
            "/api/nope",
        ][fuzz.rng().usize(..5)]
        .to_owned(),
        _ => format!(
            "/api/{}",
            String::from_utf8_lossy(&fuzz.input(&[b"wizard/session/x", b"sessions/%FF/events"]))
                .replace(
                    |c: char| c.is_whitespace() || c.is_control() || c == '#',
                    "%20"
                )
        ),
    };
    let method = match fuzz.rng().u8(..10) {
        0..6 => reqwest::Method::POST,
        6..8 => reqwest::Method::GET,
        8 => reqwest::Method::DELETE,
        _ => reqwest::Method::PUT,
    };
    let Ok(url) = reqwest::Url::parse(&format!("{}{path}", target.url)) else {
        return Ok(());
    };
    let mut request = target
        .http
        .request(method.clone(), url)
        .body(fuzz.input(BODIES));
    request = match fuzz.rng().u8(..4) {
        0..3 => request.header("content-type", "application/json"),
        _ => request.header("content-type", "text/plain; charset=\u{7f}"),
    };
    request = match (fuzz.rng().u8(..4), &target.key) {
        (0 | 1, Some(key)) => request.bearer_auth(key),
        (2, _) => request.header(
            "authorization",
            String::from_utf8_lossy(&fuzz.input(&[b"Bearer abc.def.ghi", b"Basic eDp5"]))
                .replace(|c: char| c.is_control() || !c.is_ascii(), "x"),
        ),
        _ => request,
    };
    // A request reqwest itself will not build (a header it refuses) is not sent at all.
    let Ok(request) = request.build() else {
        return Ok(());
    };
    tally.http_requests.fetch_add(1, Ordering::Relaxed);
    tally.frames.fetch_add(1, Ordering::Relaxed);
    let what = format!("{method} {path}");
    let (status, body) = answered(target.http.execute(request).await, tally, &what).await?;
    if path.starts_with("/api") && status >= 400 {
        check_error_shape(&body).map_err(|e| format!("{what} -> {status}: {e}"))?;
    }
    tally.answers_checked.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Mutated raw HTTP/1.1: answered with a status line, or closed.
async fn raw_request(fuzz: &mut Fuzz, target: &Target, tally: &Tally) -> Result<(), String> {
    let mut stream = TcpStream::connect(&target.host)
        .await
        .map_err(|e| format!("raw connect: {e}"))?;
    let request = fuzz.input(RAW);
    tally.raw_requests.fetch_add(1, Ordering::Relaxed);
    tally.frames.fetch_add(1, Ordering::Relaxed);
    if stream.write_all(&request).await.is_err() {
        return Ok(());
    }
    let mut answer = vec![0; 512];
    let read = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut answer)).await;
    let Ok(Ok(read)) = read else {
        // Still waiting for the rest of a request the mutation cut short.
        tally.raw_unanswered.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    };
    if read == 0 {
        return Ok(());
    }
    let head = String::from_utf8_lossy(&answer[..read]);
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| head.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("raw request answered without a status line: {head:?}"))?;
    tally.status(status);
    tally.answers_checked.fetch_add(1, Ordering::Relaxed);
    check_status(status, "raw request", &head)
}

fn session_id(fuzz: &mut Fuzz) -> String {
    match fuzz.rng().u8(..10) {
        0 => String::from_utf8_lossy(&fuzz.input(&[b"fz-1", b"a%2Fb", b"%FF"]))
            .chars()
            .filter(|c| c.is_ascii_graphic() && !"#?/".contains(*c))
            .collect(),
        _ => format!("fz-{}", fuzz.rng().usize(..SESSIONS)),
    }
}

/// An HTTP answer's status (counted) and body, once its status is checked.
async fn answered(
    answer: reqwest::Result<reqwest::Response>,
    tally: &Tally,
    what: &str,
) -> Result<(u16, String), String> {
    let answer = answer.map_err(|e| format!("{what}: {e}"))?;
    let status = answer.status().as_u16();
    tally.status(status);
    let body = answer.text().await.unwrap_or_default();
    check_status(status, what, &body)?;
    Ok((status, body))
}

fn check_status(status: u16, what: &str, body: &str) -> Result<(), String> {
    if status >= 500 && !(status == 503 && body.contains("TOO_MANY_SESSIONS")) {
        return Err(format!("{what} -> {status}: {}", truncate(body)));
    }
    Ok(())
}

fn check_error_shape(body: &str) -> Result<(), String> {
    let value: Value = serde_json::from_str(body)
        .map_err(|e| format!("error body is not JSON ({e}): {}", truncate(body)))?;
    let code = value.pointer("/error/code").and_then(Value::as_str);
    let message = value.pointer("/error/message").and_then(Value::as_str);
    match (code, message) {
        (Some(code), Some(_)) if !code.is_empty() => Ok(()),
        _ => Err(format!("not the error shape: {}", truncate(body))),
    }
}

/// An Engine.IO v4 packet: a type digit; a Socket.IO event or ack carries a JSON array.
fn check_engine_packet(packet: &str, tally: &Tally) -> Result<(), String> {
    tally.answers_checked.fetch_add(1, Ordering::Relaxed);
    let bad = || format!("malformed packet from herald: {}", truncate(packet));
    let mut chars = packet.chars();
    match chars.next() {
        Some('0') => serde_json::from_str::<Value>(&packet[1..])
            .map(drop)
            .map_err(|_| bad()),
        Some('1' | '2' | '3' | '5' | '6') => Ok(()),
        Some('4') => check_socket_packet(&packet[1..]).ok_or_else(bad),
        _ => Err(bad()),
    }
}

fn check_socket_packet(packet: &str) -> Option<()> {
    let kind = packet.chars().next()?;
    let rest = &packet[1..];
    let rest = match rest.strip_prefix('/') {
        Some(namespaced) => namespaced.split_once(',')?.1,
        None => rest,
    };
    match kind {
        '0' | '1' | '4' => {
            (rest.is_empty() || serde_json::from_str::<Value>(rest).is_ok()).then_some(())
        }
        '2' | '3' => {
            let json = rest.trim_start_matches(|c: char| c.is_ascii_digit());
            serde_json::from_str::<Value>(json)
                .ok()?
                .is_array()
                .then_some(())
        }
        _ => None,
    }
}

fn check_polling_payload(body: &str, tally: &Tally) -> Result<(), String> {
    body.split('\u{1e}')
        .try_for_each(|packet| check_engine_packet(packet, tally))
}

/// Waits until herald counts no open connection (abandoned long-polls end at its ping
/// timeout), for at most 60 s.
async fn connections_closed(target: &Target) -> Result<(), String> {
    let until = Instant::now() + Duration::from_secs(60);
    let mut open = None;
    while Instant::now() < until {
        let mut request = target.http.get(format!("{}/metrics", target.url));
        if let Some(key) = &target.key {
            request = request.bearer_auth(key);
        }
        let text = match request.send().await {
            Ok(answer) => answer.text().await.unwrap_or_default(),
            Err(error) => return Err(format!("herald stopped answering: {error}")),
        };
        open = text
            .lines()
            .find_map(|line| line.strip_prefix("herald_connections "))
            .and_then(|n| n.trim().parse::<f64>().ok());
        if open == Some(0.0) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(format!(
        "connections still open 60 s after the round: {open:?}"
    ))
}

async fn healthy(target: &Target) -> Result<(), String> {
    let answer = target
        .http
        .get(format!("{}/healthz", target.url))
        .send()
        .await
        .map_err(|e| format!("herald stopped answering: {e}"))?;
    if answer.status().is_success() {
        Ok(())
    } else {
        Err(format!("/healthz -> {}", answer.status()))
    }
}

fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// herald's RSS once it stops falling (the allocator hands freed memory back to the system
/// with a delay): the lowest of samples 500 ms apart, taken until four in a row are no lower,
/// for at most 20 s.
async fn settled_rss(pid: Option<u32>) -> Option<u64> {
    let mut lowest = rss_kib(pid)?;
    let mut unchanged = 0;
    let until = Instant::now() + Duration::from_secs(20);
    while unchanged < 4 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss = rss_kib(pid)?;
        if rss < lowest {
            lowest = rss;
            unchanged = 0;
        } else {
            unchanged += 1;
        }
    }
    Some(lowest)
}

async fn sample_rss(pid: Option<u32>, peak: Arc<AtomicU64>) {
    loop {
        if let Some(rss) = rss_kib(pid) {
            peak.fetch_max(rss, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(300).collect()
}
