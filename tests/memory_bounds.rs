//! Memory stays bounded while each limit of SPEC §5 is being hit, against a real herald
//! process (its own RSS, `/proc/<pid>/status`).
//!
//! Each test starts herald with one limit set small and subscribes a bystander socket. It
//! then drives the limit in rounds, [`WARM_UP`] rounds and then [`ROUNDS`] more, noting RSS
//! after each: its floor over the last rounds may exceed its peak over the warm-up by at
//! most [`SLACK_KIB`]. A round's abuse is sized so that, were
//! herald to keep what it refuses, the growth would be several times the slack. After every
//! round the limit's documented answer has been checked and the bystander must receive the
//! next event of its session, in order: nothing else was affected. (The session cap is
//! covered the same way by the abuse run in `tests/session_limits.rs`.)

mod common;

use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use common::fake_llm::{FakeBehavior, FakeLlm};
use common::node::Node;
use common::{Client, TEST_JWT_SECRET, WAIT, progress, sign_token, unix_now};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Rounds run before the baseline is taken: allocator pools, caches and tables warm up.
const WARM_UP: u32 = 2;
/// Rounds measured against the baseline.
const ROUNDS: u32 = 10;
/// The RSS growth allowed over [`ROUNDS`] rounds: allocator noise, not held abuse.
const SLACK_KIB: u64 = 8 * 1024;
/// The session the bystander follows.
const BYSTANDER_SESSION: &str = "bystander";

/// A herald process under abuse, and a bystander that must not notice.
struct Target {
    node: Node,
    bystander: Client,
    seq: u64,
    http: reqwest::Client,
}

impl Target {
    async fn start(name: &str, args: &[&str]) -> Self {
        Self::start_as(name, args, common::harness_token()).await
    }

    /// Starts herald; the bystander and [`Target::http`] present `token` when given.
    async fn start_as(name: &str, args: &[&str], token: Option<String>) -> Self {
        let node = Node::start(name, args).await;
        let auth = token.as_ref().map(|token| json!({ "token": token }));
        let mut bystander = Client::connect_as(node.addr, auth.as_ref(), &[])
            .await
            .unwrap_or_else(|refusal| panic!("the bystander is refused: {refusal}"));
        let ack = bystander.subscribe(BYSTANDER_SESSION).await;
        assert_eq!(ack["sessionId"], BYSTANDER_SESSION, "{ack}");
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = &token {
            headers.insert(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {token}").parse().unwrap(),
            );
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .no_proxy()
            .timeout(WAIT)
            .build()
            .unwrap();
        Self {
            node,
            bystander,
            seq: 0,
            http,
        }
    }

    fn url(&self, path: &str) -> String {
        self.node.url(path)
    }

    /// POSTs `body` (JSON text) to `path`: status and JSON body.
    async fn post(&self, path: &str, body: String) -> (u16, Value) {
        post(&self.http, &self.url(path), body).await
    }

    /// The next event posted to the bystander's session reaches it, next in order.
    async fn bystander_receives(&mut self) {
        let (status, body) = self
            .post(
                &format!("/api/sessions/{BYSTANDER_SESSION}/events"),
                progress(self.seq + 1).to_string(),
            )
            .await;
        assert_eq!(status, 202, "the bystander's producer: {body}");
        self.seq += 1;
        let event = self.bystander.wait_for("progress").await;
        assert_eq!(event["seq"], self.seq, "the bystander's event: {event}");
    }

    /// Runs `round` [`WARM_UP`] + [`ROUNDS`] times, the bystander receiving after each, and
    /// checks that RSS does not climb: the lowest of the last three rounds' samples may
    /// exceed the highest of the warm-up's by at most [`SLACK_KIB`]. (A round's own
    /// transient allocations make single samples swing by several MiB; what is held across
    /// rounds raises the floor round after round.)
    async fn hammer<F, Fut>(&mut self, what: &str, mut round: F)
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut samples = Vec::new();
        for n in 0..WARM_UP + ROUNDS {
            round(n).await;
            self.bystander_receives().await;
            samples.push(self.node.rss_kib());
        }
        let (warm_up, measured) = samples.split_at(WARM_UP as usize);
        let before = *warm_up.iter().max().unwrap();
        let after = *measured[measured.len() - 3..].iter().min().unwrap();
        eprintln!("{what}: RSS after each round (KiB): {warm_up:?} (warm-up), {measured:?}");
        assert!(
            after <= before + SLACK_KIB,
            "{what}: RSS rose from {before} KiB (warm-up) to at least {after} KiB over \
             {ROUNDS} rounds (allowed: {SLACK_KIB} KiB; after each round: {warm_up:?}, {measured:?})"
        );
        let (status, _) = self.node.get("/healthz").await;
        assert_eq!(status, 200, "{what}: /healthz after the abuse");
    }

    /// One series of `/metrics` (the harness's token when auth is under test).
    async fn metric(&self, series: &str) -> u64 {
        metric(&self.http, &self.url("/metrics"), series).await
    }

    /// Waits until the metric `series` reads `value`.
    async fn until_metric(&self, series: &str, value: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let now = self.metric(series).await;
            if now == value {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} stayed at {now}, not {value}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn post(http: &reqwest::Client, url: &str, body: String) -> (u16, Value) {
    let response = http
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn metric(http: &reqwest::Client, url: &str, series: &str) -> u64 {
    common::metric_from(http, url, series)
        .await
        .unwrap_or_else(|| panic!("{series} is exported"))
}

fn assert_refused(reply: &(u16, Value), status: u16, code: &str) {
    assert_eq!(reply.0, status, "{}", reply.1);
    assert_eq!(reply.1["error"]["code"], code, "{}", reply.1);
}

fn padded_progress(n: u64, bytes: usize) -> Value {
    json!({ "event": "progress", "data": { "status": "PROCESSING", "progress": 1, "n": n, "pad": "x".repeat(bytes) } })
}

/// A token herald verifies with the suite's secret.
fn token(sub: &str, scope: &str) -> String {
    sign_token(
        &json!({ "sub": sub, "exp": unix_now() + 3600, "scope": scope }),
        TEST_JWT_SECRET,
    )
}

// ---------------------------------------------------------------------------------------
// Sessions and their logs
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_events_cost_no_memory() {
    const ITEM: usize = 256 * 1024;
    let mut target = Target::start("mem-event-size", &["--max-event-bytes", "16384"]).await;
    let (http, base) = (target.http.clone(), target.url(""));
    // 40 events of 256 KiB a round, each to a new session: 10 MiB a round if kept.
    let oversized = json!([progress(1), padded_progress(2, ITEM)]).to_string();
    target
        .hammer("oversized events", |round| {
            let (http, base, body) = (http.clone(), base.clone(), oversized.clone());
            async move {
                for n in 0..40 {
                    let url = format!("{base}/api/sessions/big-{round}-{n}/events");
                    let reply = post(&http, &url, body.clone()).await;
                    assert_refused(&reply, 413, "EVENT_TOO_LARGE");
                }
            }
        })
        .await;
    let (status, _) = target
        .node
        .get("/api/wizard/session/big-11-0/events?after=0")
        .await;
    assert_eq!(status, 404, "a refused batch creates no session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_bodies_and_batches_cost_no_memory() {
    // Limits of 64 KiB and 10 items: bodies of several MiB would measure the allocator's
    // retention of huge blocks (it gives them back in its own time), not herald.
    let args = ["--max-body", "65536", "--max-batch", "10"];
    let mut target = Target::start("mem-body-size", &args).await;
    let (http, base) = (target.http.clone(), target.url(""));
    // 20 bodies of 100 KiB and 20 batches of 11 events a round: 2 MiB a round if kept.
    let too_big = format!("[{}]", "1,".repeat(51_200) + "1");
    let too_many = Value::Array((0..11).map(progress).collect()).to_string();
    target
        .hammer("oversized bodies and batches", |round| {
            let (http, base) = (http.clone(), base.clone());
            let (too_big, too_many) = (too_big.clone(), too_many.clone());
            async move {
                for n in 0..20 {
                    let url = format!("{base}/api/sessions/body-{round}-{n}/events");
                    let reply = post(&http, &url, too_big.clone()).await;
                    assert_refused(&reply, 413, "PAYLOAD_TOO_LARGE");
                    let reply = post(&http, &url, too_many.clone()).await;
                    assert_refused(&reply, 400, "BATCH_TOO_LARGE");
                }
            }
        })
        .await;
    let (status, _) = target
        .node
        .get("/api/wizard/session/body-11-0/events?after=0")
        .await;
    assert_eq!(status, 404, "a refused body creates no session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_fed_without_end_holds_only_its_retained_bytes() {
    const RETAINED: u64 = 256 * 1024;
    let retained = RETAINED.to_string();
    // The count limit out of the way: bytes are what bound this log.
    let args = [
        "--max-session-bytes",
        retained.as_str(),
        "--max-events-per-session",
        "1000000",
        "--ingest-rate-per-credential",
        "0",
    ];
    let mut target = Target::start("mem-retention", &args).await;
    let (http, base) = (target.http.clone(), target.url(""));
    // 15 batches of 50 events of 4 KiB a round into one session: 3 MiB a round if kept.
    let mut next = 0u64;
    target
        .hammer("one session fed without end", move |_| {
            let (http, base) = (http.clone(), base.clone());
            let batches: Vec<String> = (0..15)
                .map(|_| {
                    let batch: Vec<Value> = (0..50)
                        .map(|_| {
                            next += 1;
                            padded_progress(next, 4096)
                        })
                        .collect();
                    Value::Array(batch).to_string()
                })
                .collect();
            async move {
                for batch in batches {
                    let url = format!("{base}/api/sessions/hog/events");
                    let (status, body) = post(&http, &url, batch).await;
                    assert_eq!(status, 202, "{body}");
                }
            }
        })
        .await;
    let history = target.node.history("hog").await.expect("hog is held");
    let bytes: usize = history.iter().map(|e| e.to_string().len()).sum();
    assert!(
        (bytes as u64) < 2 * RETAINED && history.len() < 200,
        "{} events of {bytes} bytes retained (limit {RETAINED})",
        history.len()
    );
    assert_eq!(
        history.last().unwrap()["seq"],
        (WARM_UP + ROUNDS) as u64 * 15 * 50,
        "the newest event is retained"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_fed_new_entries_without_end_stays_within_its_limits() {
    const ENTRIES: usize = 100;
    let args = [
        "--max-snapshot-entries",
        "100",
        "--max-snapshot-bytes",
        "262144",
        // The log itself stays small, so what could grow is the snapshot.
        "--max-session-bytes",
        "1048576",
        "--ingest-rate-per-credential",
        "0",
    ];
    let mut target = Target::start("mem-snapshot", &args).await;
    let (http, base) = (target.http.clone(), target.url(""));
    // 200 settled model results of 8 KiB a round, each for a new prompt: 1.6 MiB a round.
    let output = "y".repeat(8 * 1024);
    target
        .hammer("a snapshot fed new entries", |round| {
            let (http, base) = (http.clone(), base.clone());
            let batches: Vec<String> = (0..10)
                .map(|b| {
                    let batch: Vec<Value> = (0..20)
                        .map(|k| {
                            json!({ "event": "model_result", "data": {
                                "promptId": format!("p-{round}-{b}-{k}"), "modelName": "m",
                                "status": "completed", "result": output,
                            } })
                        })
                        .collect();
                    Value::Array(batch).to_string()
                })
                .collect();
            async move {
                for batch in batches {
                    let url = format!("{base}/api/sessions/wide/events");
                    let (status, body) = post(&http, &url, batch).await;
                    assert_eq!(status, 202, "{body}");
                }
            }
        })
        .await;
    let snapshot = target.node.snapshot("wide").await.expect("wide is held");
    let text = snapshot.to_string();
    let held = text.matches("\"promptId\"").count();
    assert!(
        (1..=ENTRIES).contains(&held),
        "{held} model results held (limit {ENTRIES})"
    );
    assert!(
        text.len() < 2 * 262_144,
        "the snapshot is {} bytes (limit 262,144)",
        text.len()
    );
}

// ---------------------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------------------

type Ws = common::raw::RawWs;
use common::raw::{connect as raw_socket, next_text};

/// Reads (answering pings) until the server closes the connection.
async fn read_until_closed_ws(mut ws: Ws) {
    let read = async {
        while let Some(text) = next_text(&mut ws).await {
            if text == "2" {
                let _ = ws.send(Message::text("3")).await;
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("the server closed the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_that_flood_invalid_events_are_closed_and_leave_nothing_behind() {
    let mut target = Target::start("mem-invalid", &["--invalid-event-rate", "5"]).await;
    let addr = target.node.addr;
    // 10 sockets a round, 200 invalid frames each.
    target
        .hammer("sockets flooding invalid events", |round| async move {
            let floods = (0..10).map(|n| async move {
                let mut ws = raw_socket(addr).await;
                for k in 0..200 {
                    let frame = format!("42[\"no-such-event-{round}-{n}\",{k}]");
                    if ws.send(Message::text(frame)).await.is_err() {
                        break;
                    }
                }
                read_until_closed_ws(ws).await;
            });
            futures_util::future::join_all(floods).await;
        })
        .await;
    target.until_metric("herald_connections", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_asking_for_ever_more_subscriptions_hold_at_most_the_cap() {
    // Refusals within the invalid-event budget, so the cap alone answers.
    let args = [
        "--max-subscriptions",
        "20",
        "--subscribe-rate",
        "100000",
        "--invalid-event-rate",
        "100000",
    ];
    let mut target = Target::start("mem-subscriptions", &args).await;
    let addr = target.node.addr;
    let metrics = metric_probe(target.http.clone(), target.url("/metrics"));
    // 5 sockets a round, each asking for 300 subscriptions: 20 are held while it is
    // connected, and nothing once it has gone.
    target
        .hammer("sockets over the subscription cap", |round| {
            let sockets = (0..5).map(move |n| async move {
                let mut ws = raw_socket(addr).await;
                for k in 0..300 {
                    let frame =
                        json!(["subscribe", { "sessionId": format!("sub-{round}-{n}-{k}") }]);
                    ws.send(Message::text(format!("42{k}{frame}")))
                        .await
                        .unwrap();
                }
                let (mut ok, mut capped) = (0, 0);
                while ok + capped < 300 {
                    let text = next_text(&mut ws).await.expect("an ack per subscribe");
                    if text == "2" {
                        ws.send(Message::text("3")).await.unwrap();
                    } else if text.starts_with("43") {
                        if text.contains("TOO_MANY_SUBSCRIPTIONS") {
                            capped += 1;
                        } else if text.contains("\"lastSeq\"") {
                            ok += 1;
                        } else {
                            panic!("unexpected ack: {text}");
                        }
                    }
                }
                assert_eq!((ok, capped), (20, 280), "acks of socket {round}-{n}");
                ws
            });
            let metrics = metrics.clone();
            async move {
                let sockets = futures_util::future::join_all(sockets).await;
                assert_eq!(
                    metrics("herald_subscriptions").await,
                    5 * 20 + 1,
                    "the cap's worth per socket, and the bystander's"
                );
                drop(sockets);
                let deadline = tokio::time::Instant::now() + WAIT;
                while metrics("herald_subscriptions").await != 1 {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "round {round}: the closed sockets' subscriptions stayed"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
        .await;
    target.until_metric("herald_connections", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_over_the_payload_limit_and_subscribes_over_the_rate_cost_nothing() {
    let args = [
        "--max-payload",
        "65536",
        "--subscribe-rate",
        "5",
        // Rate-limited subscribes are answered, not counted against this budget here.
        "--invalid-event-rate",
        "100000",
    ];
    let mut target = Target::start("mem-payload-rate", &args).await;
    let addr = target.node.addr;
    // 10 sockets a round each send one 1 MiB packet: 10 MiB a round if kept.
    let huge = format!("42[\"subscribe\",\"{}\"]", "p".repeat(1 << 20));
    target
        .hammer("packets over --max-payload", |_| {
            let huge = huge.clone();
            async move {
                let sockets = (0..10).map(|_| {
                    let huge = huge.clone();
                    async move {
                        let mut ws = raw_socket(addr).await;
                        let _ = ws.send(Message::text(huge)).await;
                        read_until_closed_ws(ws).await;
                    }
                });
                futures_util::future::join_all(sockets).await;
            }
        })
        .await;
    // 5 sockets a round each ask for 200 subscriptions at once, at a rate of 5 a second.
    target
        .hammer("subscribes over --subscribe-rate", |round| async move {
            let sockets = (0..5).map(|n| async move {
                let mut ws = raw_socket(addr).await;
                for k in 0..200 {
                    let frame =
                        json!(["subscribe", { "sessionId": format!("rate-{round}-{n}-{k}") }]);
                    ws.send(Message::text(format!("42{k}{frame}")))
                        .await
                        .unwrap();
                }
                let (mut answered, mut limited) = (0, 0);
                while answered < 200 {
                    let text = next_text(&mut ws).await.expect("an ack per subscribe");
                    if text == "2" {
                        ws.send(Message::text("3")).await.unwrap();
                    } else if text.starts_with("43") {
                        answered += 1;
                        limited += u32::from(text.contains("RATE_LIMITED"));
                    }
                }
                assert!(
                    limited >= 150,
                    "socket {round}-{n}: {limited} of 200 subscribes limited"
                );
            });
            futures_util::future::join_all(sockets).await;
        })
        .await;
    target.until_metric("herald_connections", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_stop_reading_are_cut_off_and_their_queues_freed() {
    let args = ["--socket-buffer", "64", "--ingest-rate-per-credential", "0"];
    let mut target = Target::start("mem-stalled", &args).await;
    let (http, base, addr) = (target.http.clone(), target.url(""), target.node.addr);
    let slow_metric = metric_probe(target.http.clone(), target.url("/metrics"));
    // 5 stalled readers a round on one session, fed 8 MiB: each would queue it all if the
    // queue were not bounded. (The session's log keeps its default bound of 4 MiB.)
    let batch = Value::Array((0..100).map(|n| padded_progress(n, 4096)).collect()).to_string();
    target
        .hammer("readers that stop reading", |round| {
            let (http, base, batch, slow_metric) = (
                http.clone(),
                base.clone(),
                batch.clone(),
                slow_metric.clone(),
            );
            async move {
                let session = "stall";
                let before = slow_metric("herald_slow_consumers_total").await;
                let mut stalled = Vec::new();
                for _ in 0..5 {
                    let mut ws = raw_socket(addr).await;
                    let frame = json!(["subscribe", { "sessionId": session }]);
                    ws.send(Message::text(format!("421{frame}"))).await.unwrap();
                    loop {
                        let text = next_text(&mut ws).await.expect("the subscribe ack");
                        if text.starts_with("431") {
                            assert!(text.contains("\"lastSeq\""), "{text}");
                            break;
                        }
                    }
                    stalled.push(ws);
                }
                let url = format!("{base}/api/sessions/{session}/events");
                for _ in 0..20 {
                    let (status, body) = post(&http, &url, batch.clone()).await;
                    assert_eq!(status, 202, "{body}");
                }
                let deadline = tokio::time::Instant::now() + WAIT;
                while slow_metric("herald_slow_consumers_total").await < before + 5 {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "round {round}: the stalled readers were not cut off"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                drop(stalled);
            }
        })
        .await;
    target.until_metric("herald_connections", 1).await;
}

/// A cloneable `/metrics` reader for use inside rounds.
fn metric_probe(
    http: reqwest::Client,
    url: String,
) -> impl Fn(&'static str) -> std::pin::Pin<Box<dyn Future<Output = u64> + Send>> + Clone {
    move |series| {
        let (http, url) = (http.clone(), url.clone());
        Box::pin(async move { metric(&http, &url, series).await })
    }
}

// ---------------------------------------------------------------------------------------
// HTTP edge
// ---------------------------------------------------------------------------------------

/// Reads until the server closes the connection; what it sent.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("the server closed the connection");
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_and_bodies_are_answered_408_and_their_connections_freed() {
    let args = ["--header-timeout-ms", "300", "--body-timeout-ms", "300"];
    let mut target = Target::start("mem-slow", &args).await;
    let addr = target.node.addr;
    // 100 connections a round that stop half-way through their head.
    target
        .hammer("heads that never end", |_| async move {
            let slow = (0..100).map(|_| async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                stream
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: herald\r\nX-Pad: ")
                    .await
                    .unwrap();
                let answer = read_until_closed(&mut stream).await;
                assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
            });
            futures_util::future::join_all(slow).await;
        })
        .await;
    // 100 connections a round that promise 64 KiB of body and send 10 bytes.
    target
        .hammer("bodies that never end", |n| async move {
            let slow = (0..100).map(|k| async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                let head = format!(
                    "POST /api/sessions/slow-{n}-{k}/events HTTP/1.1\r\nHost: herald\r\n\
                     Content-Type: application/json\r\nContent-Length: 65536\r\n\r\n[{{\"event\""
                );
                stream.write_all(head.as_bytes()).await.unwrap();
                let answer = read_until_closed(&mut stream).await;
                // With auth under test, the missing credential is refused before the body.
                let expected = if common::auth_under_test() {
                    "HTTP/1.1 401"
                } else {
                    "HTTP/1.1 408"
                };
                assert!(answer.starts_with(expected), "{answer:?}");
            });
            futures_util::future::join_all(slow).await;
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_and_cost_nothing() {
    let mut target = Target::start("mem-cap", &["--max-connections", "6"]).await;
    let addr = target.node.addr;
    // 200 connections a round, at once, against 6 slots (the bystander holds two).
    target
        .hammer("connections over the cap", |round| async move {
            let tries = (0..200).map(|_| async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                let _ = stream
                    .write_all(
                        b"GET /healthz HTTP/1.1\r\nHost: herald\r\nConnection: close\r\n\r\n",
                    )
                    .await;
                let answer = read_until_closed(&mut stream).await;
                assert!(
                    answer.is_empty() || answer.starts_with("HTTP/1.1 200"),
                    "{answer:?}"
                );
                answer.is_empty()
            });
            let refused = futures_util::future::join_all(tries)
                .await
                .into_iter()
                .filter(|refused| *refused)
                .count();
            assert!(
                refused >= 100,
                "round {round}: only {refused} of 200 refused"
            );
        })
        .await;
}

/// An HTTP client whose connections come from `source` and are never reused.
fn client_from(source: IpAddr) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = common::harness_token() {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .local_address(source)
        .pool_max_idle_per_host(0)
        .no_proxy()
        .timeout(WAIT)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_over_their_rate_get_429_and_their_buckets_stay_small() {
    let args = [
        "--rate-limit-per-address",
        "1",
        // The bystander's requests, from 127.0.0.1, fit in one burst.
        "--rate-limit-per-address-burst",
        "20",
        "--rate-limit-loopback",
        "--rate-limit-per-credential",
        "0",
    ];
    let mut target = Target::start("mem-address-rate", &args).await;
    let base = target.url("");
    // 40 new addresses a round, 25 requests each: 5 of them over the burst (at 1/s).
    target
        .hammer("addresses over their rate", |round| {
            let base = base.clone();
            async move {
                let addresses = (0..40u8).map(|n| {
                    let base = base.clone();
                    async move {
                        let source = IpAddr::from([127, 1 + round as u8, n, 2]);
                        let client = client_from(source);
                        let mut limited = 0;
                        for _ in 0..25 {
                            let response = client
                                .get(format!("{base}/api/models"))
                                .send()
                                .await
                                .unwrap();
                            match response.status().as_u16() {
                                200 => {}
                                429 => {
                                    assert!(response.headers().contains_key("retry-after"));
                                    limited += 1;
                                }
                                other => panic!("{source}: {other}"),
                            }
                        }
                        // A request may come after a refill: one a second.
                        assert!(
                            (3..=5).contains(&limited),
                            "{source}: {limited} of 25 requests over a burst of 20 limited"
                        );
                    }
                });
                futures_util::future::join_all(addresses).await;
            }
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_over_their_rates_get_429_and_cost_nothing() {
    let args = [
        "--jwt-secret",
        TEST_JWT_SECRET,
        "--rate-limit-per-credential",
        "2",
        "--rate-limit-per-credential-burst",
        "20",
        "--ingest-rate-per-credential",
        "20",
        "--ingest-rate-per-credential-burst",
        "200",
        // The ingest burst is raised to at least the largest batch.
        "--max-batch",
        "50",
    ];
    let mut target = Target::start_as(
        "mem-credential-rate",
        &args,
        Some(token("bystander", "admin")),
    )
    .await;
    let base = target.url("");
    // 20 new subjects a round: 10 ingest batches of 50 events each (6 over the burst of 200
    // events, at 20/s) into one session, then 30 list requests (20 over what is left of the
    // burst, at 2/s).
    target
        .hammer("credentials over their rates", |round| {
            let base = base.clone();
            async move {
                let subjects = (0..20).map(|n| {
                    let base = base.clone();
                    async move {
                        let credential = token(&format!("s-{round}-{n}"), "admin");
                        let http = reqwest::Client::builder()
                            .no_proxy()
                            .timeout(WAIT)
                            .build()
                            .unwrap();
                        // Ingest first: its 10 requests leave 10 of the request burst.
                        let batch = Value::Array((0..50).map(progress).collect()).to_string();
                        let mut refused = 0;
                        for _ in 0..10 {
                            let response = http
                                .post(format!("{base}/api/sessions/rated/events"))
                                .bearer_auth(&credential)
                                .header("content-type", "application/json")
                                .body(batch.clone())
                                .send()
                                .await
                                .unwrap();
                            refused += u32::from(response.status() == 429);
                        }
                        let mut limited = 0;
                        for _ in 0..30 {
                            let response = http
                                .get(format!("{base}/api/wizard/sessions?limit=1"))
                                .bearer_auth(&credential)
                                .send()
                                .await
                                .unwrap();
                            limited += u32::from(response.status() == 429);
                        }
                        assert!(
                            limited >= 10,
                            "s-{round}-{n}: {limited} of 30 requests limited"
                        );
                        assert!(
                            refused >= 4,
                            "s-{round}-{n}: {refused} of 10 batches limited"
                        );
                    }
                });
                futures_util::future::join_all(subjects).await;
            }
        })
        .await;
}

// ---------------------------------------------------------------------------------------
// Orchestrated sessions
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_runs_and_oversized_inputs_create_and_keep_nothing() {
    let mut target = Target::start("mem-runs", &["--max-running-sessions", "1"]).await;
    let (http, base) = (target.http.clone(), target.url(""));
    // One run holds the only slot, waiting for its answer.
    let (status, created) = target
        .post(
            "/api/wizard/sessions",
            json!({ "prompts": ["[clarify] hold the slot"] }).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let held = created["sessionId"].as_str().unwrap().to_owned();
    let clarification = loop {
        let snapshot = target.node.snapshot(&held).await.expect("the held run");
        let pending = snapshot.to_string();
        if let Some(id) = pending
            .split("\"clarificationId\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
        {
            break id.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Each round: 20 creates over the run cap, and a 256 KiB prompt, metadata and answer
    // 10 times each: 7.5 MiB a round if kept. (Not larger: bodies of MiBs would measure the
    // allocator's retention of huge blocks.)
    let big = "z".repeat(256 << 10);
    target
        .hammer("runs over the cap and oversized inputs", |_| {
            let (http, base, big) = (http.clone(), base.clone(), big.clone());
            let (held, clarification) = (held.clone(), clarification.clone());
            async move {
                let create = format!("{base}/api/wizard/sessions");
                for _ in 0..20 {
                    let reply = post(&http, &create, json!({ "prompts": ["x"] }).to_string()).await;
                    assert_refused(&reply, 429, "TOO_MANY_RUNS");
                }
                for _ in 0..10 {
                    let reply = post(&http, &create, json!({ "prompts": [big] }).to_string()).await;
                    assert_refused(&reply, 400, "PROMPT_TOO_LARGE");
                    let body = json!({ "prompts": ["x"], "metadata": { "note": big } });
                    let reply = post(&http, &create, body.to_string()).await;
                    assert_refused(&reply, 400, "METADATA_TOO_LARGE");
                    let body = json!({ "sessionId": held, "clarificationId": clarification, "answer": big });
                    let url = format!("{base}/api/wizard/clarifications/respond");
                    let reply = post(&http, &url, body.to_string()).await;
                    assert_refused(&reply, 400, "ANSWER_TOO_LARGE");
                }
            }
        })
        .await;
    let (status, list) = target.node.get("/api/wizard/sessions").await;
    assert_eq!(status, 200, "{list}");
    let ids: Vec<&str> = list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["sessionId"].as_str())
        .filter(|id| *id != BYSTANDER_SESSION)
        .collect();
    assert_eq!(ids, [held.as_str()], "only the held run was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_that_stream_without_end_are_stopped_and_cost_nothing() {
    const LIMIT: u64 = 16 * 1024;
    let fake = FakeLlm::start(FakeBehavior {
        endless: true,
        token_delay: Duration::from_micros(50),
        ..FakeBehavior::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("herald.toml");
    std::fs::write(
        &config,
        format!(
            "[[models]]\nname = \"runaway\"\nprovider = \"ollama\"\nbase_url = {:?}\nretries = 0\nmax_concurrency = 8\n\
             [[models]]\nname = \"sim\"\nprovider = \"simulated\"\n",
            fake.ollama_url()
        ),
    )
    .unwrap();
    let limit = LIMIT.to_string();
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--max-model-output-bytes",
        limit.as_str(),
        // Ended runs are swept at once, so what could grow is what a run leaves behind.
        "--session-ttl-secs",
        "1",
    ];
    let mut target = Target::start("mem-output", &args).await;
    let (http, base, addr) = (target.http.clone(), target.url(""), target.node.addr);
    // 4 runs a round, each with a model that never stops talking.
    target
        .hammer("models that stream without end", |round| {
            let (http, base) = (http.clone(), base.clone());
            async move {
                let runs = (0..4).map(|n| {
                    let (http, base) = (http.clone(), base.clone());
                    async move {
                        let body = json!({ "prompts": [format!("Talk forever {round}-{n}")], "models": ["runaway", "sim"] });
                        let (status, created) = post(&http, &format!("{base}/api/wizard/sessions"), body.to_string()).await;
                        assert_eq!(status, 201, "{created}");
                        let id = created["sessionId"].as_str().unwrap().to_owned();
                        let mut follower = Client::connect(addr).await;
                        let ack = follower.call("subscribe", &json!({ "sessionId": id, "lastSeq": 0 })).await;
                        assert_eq!(ack["sessionId"], id.as_str(), "{ack}");
                        let mut runaway = None;
                        loop {
                            let (name, data) = follower.next().await;
                            match name.as_str() {
                                "model_result" if data["modelName"] == "runaway" => {
                                    let shown = data["result"].as_str().map_or(0, str::len) as u64;
                                    assert!(shown <= LIMIT, "{shown} bytes shown");
                                    runaway = Some(data);
                                }
                                "completed" | "error" => break,
                                _ => {}
                            }
                        }
                        let runaway = runaway.expect("the runaway model's results");
                        assert_eq!(runaway["status"], "failed", "{runaway}");
                    }
                });
                futures_util::future::join_all(runs).await;
            }
        })
        .await;
    let stats = fake
        .wait_until("every runaway request dropped", WAIT, |s| s.in_flight == 0)
        .await;
    assert_eq!(stats.aborted, (WARM_UP + ROUNDS) as usize * 4);
}
