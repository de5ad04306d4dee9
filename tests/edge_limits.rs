//! The HTTP/socket edge under abuse (SPEC §5): header and body timeouts, the connection
//! cap, request-rate limits per address and per credential, and the per-socket budget of
//! answers to invalid requests. Real sockets on loopback; every limit is set short by flag.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::{WAIT, spawn_app_with};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads one HTTP/1.1 response with a `content-length` body from a kept-alive connection.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("a response in time")
            .expect("read");
        assert!(n > 0, "the connection closed mid-response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

/// Reads until the server closes the connection (EOF or reset), within `limit`; what it
/// sent before closing.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the server did not close the connection within {limit:?}"));
    String::from_utf8_lossy(&buf).to_string()
}

async fn healthz_on(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: herald\r\n\r\n")
        .await
        .unwrap();
    read_response(stream).await
}

/// An HTTP client whose connections come from `source` (127.0.0.2, ...: distinct client
/// addresses on loopback) and are never reused.
fn client_from(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(source.parse::<IpAddr>().unwrap())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_by_the_header_timeout_and_healthz_stays_fast() {
    const SLOW: usize = 500;
    let header_timeout = Duration::from_millis(1000);
    let server = spawn_app_with(|c| c.header_timeout_ms = 1000).await;
    let addr = server.addr;
    let started = Instant::now();
    let mut trickling = Vec::with_capacity(SLOW);
    let (opened_tx, mut opened) = tokio::sync::mpsc::channel(SLOW);
    for _ in 0..SLOW {
        trickling.push(tokio::spawn(trickle_headers(addr, opened_tx.clone())));
    }
    for _ in 0..SLOW {
        tokio::time::timeout(WAIT, opened.recv())
            .await
            .expect("every slow connection opens")
            .unwrap();
    }
    // While all of them are open and trickling, a prober is answered fast.
    let probe = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let sent = Instant::now();
        let status = probe
            .get(server.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status();
        worst = worst.max(sent.elapsed());
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("slowloris: worst /healthz latency {worst:?} with {SLOW} trickling connections");
    assert!(
        worst < Duration::from_millis(500),
        "/healthz took {worst:?}"
    );
    // Every trickling connection is closed by the server, within the timeout and slack.
    let slack = Duration::from_secs(3);
    for task in trickling {
        let closed_after =
            tokio::time::timeout(header_timeout + slack + Duration::from_secs(2), task)
                .await
                .expect("a trickling connection was never closed")
                .unwrap();
        assert!(
            closed_after <= started.elapsed() && closed_after < header_timeout + slack,
            "closed after {closed_after:?}"
        );
    }
    server.shutdown().await;
}

/// Opens a connection and sends a request head one byte every 100 ms, never finishing it;
/// returns how long the connection lived before the server answered 408 and closed it.
async fn trickle_headers(addr: SocketAddr, open: tokio::sync::mpsc::Sender<()>) -> Duration {
    let opened = Instant::now();
    let mut stream = TcpStream::connect(addr).await.expect("connects");
    open.send(()).await.unwrap();
    let head = b"GET /healthz HTTP/1.1\r\nHost: herald\r\nX-Slow: ";
    let mut byte = 0usize;
    let mut scratch = [0u8; 256];
    loop {
        let next = head.get(byte).copied().unwrap_or(b'a');
        byte += 1;
        if stream.write_all(&[next]).await.is_err() {
            return opened.elapsed();
        }
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut scratch)).await {
            Ok(Ok(0)) | Ok(Err(_)) => panic!("closed without the 408 answer"),
            Ok(Ok(n)) => {
                let mut answer = scratch[..n].to_vec();
                let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
                let answer = String::from_utf8_lossy(&answer);
                assert!(
                    answer.starts_with("HTTP/1.1 408 Request Timeout\r\n")
                        && answer.contains("connection: close")
                        && answer.ends_with(r#""code":"REQUEST_TIMEOUT","message":"the request head was not received in time"}}"#),
                    "{answer}"
                );
                return opened.elapsed();
            }
            Err(_) => {}
        }
        // Bounded: the test's own timeout ends the task if the server never closes.
        if opened.elapsed() > Duration::from_secs(30) {
            return opened.elapsed();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_or_idles_after_a_request_is_closed_without_an_answer() {
    let server = spawn_app_with(|c| c.header_timeout_ms = 300).await;
    // Sends nothing at all.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    // Sends one whole request, reads its answer, then idles.
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: herald\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, idle.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer[..n])
    );
    for (what, stream) in [("silent", &mut silent), ("idle", &mut idle)] {
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("{what}: never closed"))
            .unwrap();
        assert!(
            rest.is_empty(),
            "{what}: {}",
            String::from_utf8_lossy(&rest)
        );
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_past_the_body_timeout_gets_408_and_the_connection_closed() {
    let server = spawn_app_with(|c| c.body_timeout_ms = 500).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let auth = common::harness_token()
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST /api/sessions/slow-body/events HTTP/1.1\r\nHost: herald\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let sent = Instant::now();
    // A byte every 100 ms: each arrives well within any per-read timeout, the whole never.
    let (mut reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            if writer.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("the server closes the connection after the body timeout");
    let elapsed = sent.elapsed();
    trickle.abort();
    let response = String::from_utf8_lossy(&buf).to_string();
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("connection: close"),
        "{response}"
    );
    let body: Value = serde_json::from_str(&response[response.find("\r\n\r\n").unwrap() + 4..])
        .expect("a JSON error body");
    assert_eq!(body["error"]["code"], "REQUEST_TIMEOUT", "{body}");
    assert!(
        elapsed < Duration::from_secs(3),
        "answered after {elapsed:?}"
    );

    // A body sent in time is not affected.
    let (status, _) = server
        .post_events("slow-body", &json!(common::progress(1)))
        .await;
    assert_eq!(status, 202);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_at_once_and_the_others_keep_working() {
    let server = spawn_app_with(|c| c.max_connections = 3).await;
    // A websocket holds its slot after the upgrade, two kept-alive HTTP connections theirs.
    let mut socket = server.connect().await;
    let mut first = TcpStream::connect(server.addr).await.unwrap();
    assert!(healthz_on(&mut first).await.starts_with("HTTP/1.1 200"));
    let mut second = TcpStream::connect(server.addr).await.unwrap();
    assert!(healthz_on(&mut second).await.starts_with("HTTP/1.1 200"));

    let mut extra = TcpStream::connect(server.addr).await.unwrap();
    let refused_at = Instant::now();
    let _ = extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: herald\r\n\r\n")
        .await;
    let answer = read_until_closed(&mut extra, Duration::from_secs(2)).await;
    assert_eq!(answer, "", "a refused connection gets nothing");
    assert!(refused_at.elapsed() < Duration::from_secs(2));

    // The open ones are unaffected.
    assert!(healthz_on(&mut first).await.starts_with("HTTP/1.1 200"));
    let ack = socket.call("subscribe", &json!("capped")).await;
    assert_eq!(ack["ok"], true, "{ack}");

    // A freed slot takes a new connection (once the server has seen the close).
    drop(second);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut again = TcpStream::connect(server.addr).await.unwrap();
        let _ = again
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: herald\r\nConnection: close\r\n\r\n")
            .await;
        let answer = read_until_closed(&mut again, WAIT).await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot was never reused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown().await;
}

fn retry_after(response: &reqwest::Response) -> u64 {
    response
        .headers()
        .get("retry-after")
        .expect("Retry-After on a 429")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in whole seconds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_over_its_rate_gets_429_with_retry_after_and_other_addresses_do_not() {
    let server = spawn_app_with(|c| {
        c.rate_limit_per_address = 2;
        c.rate_limit_per_address_burst = 2;
        c.rate_limit_loopback = true;
        // A harness token (auth under test) must not be what limits here.
        c.rate_limit_per_credential = 0;
    })
    .await;
    let token = common::harness_token();
    let get = |client: &reqwest::Client, path: &str| {
        let mut request = client.get(server.url(path));
        if let Some(token) = &token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let noisy = client_from("127.0.0.2");
    for _ in 0..2 {
        assert_eq!(get(&noisy, "/api/models").await.unwrap().status(), 200);
    }
    let limited = get(&noisy, "/api/models").await.unwrap();
    assert_eq!(limited.status(), 429);
    assert!(retry_after(&limited) >= 1);
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "RATE_LIMITED", "{body}");
    // The socket.io handshake from that address is limited too.
    let handshake = get(&noisy, "/socket.io/?EIO=4&transport=polling")
        .await
        .unwrap();
    assert_eq!(handshake.status(), 429);

    // Health checks are exempt; another address is unaffected.
    assert_eq!(get(&noisy, "/healthz").await.unwrap().status(), 200);
    assert_eq!(get(&noisy, "/readyz").await.unwrap().status(), 200);
    let quiet = client_from("127.0.0.3");
    assert_eq!(get(&quiet, "/api/models").await.unwrap().status(), 200);
    assert_eq!(
        server
            .metric("herald_http_errors_total{code=\"RATE_LIMITED\"}")
            .await,
        Some(2)
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_over_its_rate_gets_429_from_any_address_and_other_credentials_do_not() {
    let server = spawn_app_with(|c| {
        c.api_keys = vec![
            herald::config::Secret::new("alpha:alpha-secret:read"),
            herald::config::Secret::new("beta:beta-secret:read"),
        ];
        c.rate_limit_per_credential = 2;
        c.rate_limit_per_credential_burst = 2;
    })
    .await;
    let list = |source: &str, key: &str| {
        client_from(source)
            .get(server.url("/api/wizard/sessions"))
            .header("x-api-key", key)
            .send()
    };
    // Two addresses, one credential: they share its budget.
    assert_eq!(
        list("127.0.0.2", "alpha-secret").await.unwrap().status(),
        200
    );
    assert_eq!(
        list("127.0.0.3", "alpha-secret").await.unwrap().status(),
        200
    );
    let limited = list("127.0.0.4", "alpha-secret").await.unwrap();
    assert_eq!(limited.status(), 429);
    assert!(retry_after(&limited) >= 1);
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "RATE_LIMITED", "{body}");
    // Another credential, and a bad one (refused as such, not as rate limited).
    assert_eq!(
        list("127.0.0.2", "beta-secret").await.unwrap().status(),
        200
    );
    assert_eq!(list("127.0.0.2", "wrong").await.unwrap().status(), 401);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_flooding_invalid_events_gets_a_bounded_number_of_errors_then_is_closed() {
    const RATE: u32 = 5;
    const FLOOD: usize = 300;
    let server = spawn_app_with(|c| c.invalid_event_rate = RATE).await;
    let mut bystander = server.connect().await;
    bystander.subscribe("flood-victim").await;

    let mut flooder = server.connect().await;
    flooder.expect("connected").await;
    let closed = flooder.disconnected.clone();
    let flood_started = Instant::now();
    for n in 0..FLOOD {
        if n % 2 == 0 {
            flooder.emit("no-such-event", &json!(n));
        } else {
            flooder.send_frame(format!("42[\"subscribe\",{{\"sessionId\":{n}}}]"));
        }
    }
    tokio::time::timeout(WAIT, closed.notified())
        .await
        .expect("the flooding socket's transport is closed");
    let flood_took = flood_started.elapsed().as_secs_f64();
    let errors = flooder
        .drain()
        .into_iter()
        .filter(|(name, _)| name == "error")
        .count();
    // The burst (twice the rate), plus what the budget refilled while the flood was read.
    let bound = 2 * RATE as usize + (f64::from(RATE) * flood_took).ceil() as usize;
    assert!(
        (1..=bound).contains(&errors),
        "{errors} error events for {FLOOD} invalid requests (bound {bound})"
    );

    // The other socket still gets its session's events.
    let (status, _) = server
        .post_events("flood-victim", &json!(common::progress(7)))
        .await;
    assert_eq!(status, 202);
    let progress = bystander.wait_for("progress").await;
    assert_eq!(
        (&progress["sessionId"], &progress["seq"]),
        (&json!("flood-victim"), &json!(1)),
        "{progress}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_over_its_ingest_event_rate_gets_429_and_other_credentials_do_not() {
    let server = spawn_app_with(|c| {
        c.api_keys = vec![
            herald::config::Secret::new("busy:busy-secret:publish+read"),
            herald::config::Secret::new("calm:calm-secret:publish"),
        ];
        c.max_batch = 10;
        c.ingest_rate_per_credential = 1;
        c.ingest_rate_per_credential_burst = 15;
    })
    .await;
    let publish = |key: &str, session: &str, events: u64| {
        let batch: Vec<Value> = (1..=events).map(common::progress).collect();
        reqwest::Client::new()
            .post(server.url(&format!("/api/sessions/{session}/events")))
            .header("x-api-key", key)
            .json(&batch)
            .send()
    };
    // Events are counted, not requests: 10 then 5 fill the burst of 15, one more is over.
    assert_eq!(
        publish("busy-secret", "ingest-a", 10)
            .await
            .unwrap()
            .status(),
        202
    );
    assert_eq!(
        publish("busy-secret", "ingest-b", 5)
            .await
            .unwrap()
            .status(),
        202
    );
    let limited = publish("busy-secret", "ingest-a", 2).await.unwrap();
    assert_eq!(limited.status(), 429);
    assert!(retry_after(&limited) >= 1);
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "RATE_LIMITED", "{body}");
    // Nothing of the refused batch was logged; another credential is unaffected.
    let history: Value = reqwest::Client::new()
        .get(server.url("/api/wizard/session/ingest-a/events?after=0&limit=100"))
        .header("x-api-key", "busy-secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(history["lastSeq"], 10, "{history}");
    assert_eq!(
        publish("calm-secret", "ingest-a", 10)
            .await
            .unwrap()
            .status(),
        202
    );
    server.shutdown().await;
}

/// Shutdown stops taking connections at once and fits in `--shutdown-timeout-secs`: a
/// request whose body never finishes (here under a 30 s body timeout) is dropped at the
/// deadline rather than waited for.
#[tokio::test]
async fn shutdown_stops_accepting_at_once_and_fits_in_its_timeout() {
    let app = spawn_app_with(|c| {
        c.shutdown_timeout_secs = 2;
        c.body_timeout_ms = 30_000;
    })
    .await;
    let addr = app.addr;
    let mut stuck = TcpStream::connect(addr).await.unwrap();
    stuck
        .write_all(
            b"POST /api/sessions/held/events HTTP/1.1\r\nHost: herald\r\n\
              Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"event\"",
        )
        .await
        .unwrap();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    assert!(healthz_on(&mut idle).await.starts_with("HTTP/1.1 200"));

    let signalled = Instant::now();
    let stopping = tokio::spawn(app.shutdown_within(Duration::from_secs(10)));
    loop {
        match TcpStream::connect(addr).await {
            Err(_) => break,
            Ok(_) if signalled.elapsed() < WAIT => tokio::task::yield_now().await,
            Ok(_) => panic!("the node still accepts connections {WAIT:?} after the signal"),
        }
    }
    // A kept-alive connection serves nothing more: it is closed without an answer.
    assert_eq!(read_until_closed(&mut idle, WAIT).await, "");
    stopping.await.expect("shutdown finishes");
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_millis(3500),
        "the drain fits in --shutdown-timeout-secs, whatever is still open: {took:?}"
    );
    drop(stuck);
}

/// How many of `count` connections the kernel completes within `limit` while herald, stopped
/// (SIGSTOP), accepts none: those its accept queue holds.
async fn queued_while_stopped(node: &common::node::Node, count: usize, limit: Duration) -> usize {
    node.signal("STOP");
    let attempts = (0..count).map(|_| tokio::time::timeout(limit, TcpStream::connect(node.addr)));
    let results = futures_util::future::join_all(attempts).await;
    node.signal("CONT");
    results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_accept_queue_is_as_long_as_listen_backlog_says() {
    const TRIES: usize = 12;
    // Linux completes backlog + 1 handshakes; the rest wait for a SYN retry (1 s and more).
    let short = common::node::Node::start("short-backlog", &["--listen-backlog", "2"]).await;
    let queued = queued_while_stopped(&short, TRIES, Duration::from_millis(700)).await;
    assert!(
        (1..=3).contains(&queued),
        "{queued} of {TRIES} connections completed with --listen-backlog 2"
    );
    let (status, _) = short.get("/healthz").await;
    assert_eq!(status, 200, "herald serves again once resumed");

    let default = common::node::Node::start("default-backlog", &[]).await;
    let queued = queued_while_stopped(&default, TRIES, Duration::from_millis(700)).await;
    assert_eq!(queued, TRIES, "the default queue holds them all");
}
