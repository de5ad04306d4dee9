//! What delivery promises at its edges: a socket that cannot keep up is cut off (never
//! handed a silent gap) and recovers by replay; it never holds up a session's producer or
//! its other subscribers; one socket's requests run in the order it sent them.

mod common;

use std::time::Duration;

use common::{Client, WAIT, spawn_app_with};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// A `progress` item shaped like SPEC §1, about 3 KB.
fn big_progress(n: u64) -> Value {
    json!({ "event": "progress", "data": {
        "status": "PROCESSING",
        "progress": n % 101,
        "prompts": { "total": 10, "completed": 3, "processing": 2, "pending": 5, "failed": 0 },
        "hasClarifications": false,
        "clarificationCount": 0,
        "detail": "x".repeat(3_000),
    }})
}

fn batch(from: u64, count: u64) -> Value {
    Value::Array((from..from + count).map(big_progress).collect())
}

type Ws = common::raw::RawWs;
use common::raw::next_text;

/// A raw Socket.IO client whose socket reads only when told to: it can stop reading, as a
/// stalled browser tab or a process stuck in a debugger does.
struct StalledReader {
    ws: Ws,
}

impl StalledReader {
    /// Connects (see [`common::raw::connect`]) and sends `subscribe` `{ sessionId, lastSeq }`;
    /// returns once `subscribed` arrives.
    async fn subscribe(addr: std::net::SocketAddr, session_id: &str, last_seq: u64) -> Self {
        let mut ws = common::raw::connect(addr).await;
        let frame = json!(["subscribe", { "sessionId": session_id, "lastSeq": last_seq }]);
        ws.send(Message::text(format!("42{frame}"))).await.unwrap();
        loop {
            let text = next_text(&mut ws).await.expect("frames until `subscribed`");
            if text.starts_with("42[\"subscribed\"") {
                return Self { ws };
            }
        }
    }

    /// Reads everything until the server drops the connection; returns the `seq`s of the
    /// session events received, in order. Fails if the connection is still open after `limit`.
    async fn read_until_dropped(mut self, limit: Duration) -> Vec<u64> {
        let mut seqs = Vec::new();
        let read = async {
            while let Some(text) = next_text(&mut self.ws).await {
                if text == "2" {
                    let _ = self.ws.send(Message::text("3")).await;
                } else if let Some(rest) = text.strip_prefix("42") {
                    let value: Value = serde_json::from_str(rest).unwrap();
                    if let Some(seq) = value[1]["seq"].as_u64() {
                        seqs.push(seq);
                    }
                }
            }
        };
        tokio::time::timeout(limit, read)
            .await
            .expect("the server dropped the stalled reader's connection");
        seqs
    }
}

fn assert_contiguous(seqs: &[u64], from: u64, what: &str) {
    for (i, seq) in seqs.iter().enumerate() {
        assert_eq!(
            *seq,
            from + i as u64,
            "{what}: a gap or a repeat at index {i}"
        );
    }
}

async fn metric(server: &common::TestServer, name: &str) -> u64 {
    server
        .metric(name)
        .await
        .unwrap_or_else(|| panic!("{name} is exported"))
}

async fn slow_consumers(server: &common::TestServer) -> u64 {
    metric(server, "herald_slow_consumers_total").await
}

/// Waits until the metric `name` reads `value`.
async fn until_metric(server: &common::TestServer, name: &str, value: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = metric(server, name).await;
        if now == value {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} stayed at {now}, not {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_is_cut_off_and_recovers_without_a_gap() {
    // The default queue (1,088 packets: a whole batch) and retention large enough that the
    // stalled reader's gap is still there when it comes back.
    let server = spawn_app_with(|c| {
        c.max_events_per_session = 5_000;
        c.max_session_bytes = 64 << 20;
    })
    .await;
    let session = "stalled-live";
    let stalled = StalledReader::subscribe(server.addr, session, 0).await;
    let mut watcher = server.connect().await;
    watcher.subscribe(session).await;

    // 9 MB of events: far more than the stalled socket's queue and kernel buffers hold.
    for from in [1, 1_001, 2_001] {
        let (status, body) = server.post_events(session, &batch(from, 1_000)).await;
        assert_eq!(status, 202, "ingest: {body}");
    }
    // The producer and the other subscriber were not held up: it has every event.
    let mut seen = Vec::new();
    while seen.len() < 3_000 {
        let (name, data) = watcher.next().await;
        if name == "progress" {
            seen.push(data["seq"].as_u64().unwrap());
        }
    }
    assert_contiguous(&seen, 1, "the reading subscriber");
    // The server let go of it although it still reads nothing: only the watcher is left.
    until_metric(&server, "herald_connections", 1).await;
    assert_eq!(
        slow_consumers(&server).await,
        1,
        "the stalled socket counts as one slow consumer, however many events it missed"
    );

    // The stalled reader wakes up: it has a gap-free prefix, then finds its connection gone.
    let got = stalled.read_until_dropped(WAIT).await;
    assert_contiguous(&got, 1, "the stalled reader before the drop");
    let last = *got.last().unwrap_or(&0);
    assert!(
        last < 3_000,
        "it cannot have had everything: it got up to {last}"
    );

    // It resumes from its last seq and gets exactly the rest.
    let mut back = server.connect().await;
    let ack = back
        .call(
            "subscribe",
            &json!({ "sessionId": session, "lastSeq": last }),
        )
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    let subscribed = back.wait_for("subscribed").await;
    assert_eq!(subscribed["recovered"], true, "{subscribed}");
    let mut rest = Vec::new();
    while rest.len() < (3_000 - last) as usize {
        let (name, data) = back.next().await;
        if name == "progress" {
            rest.push(data["seq"].as_u64().unwrap());
        }
    }
    assert_contiguous(&rest, last + 1, "the replay after reconnecting");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_replay_never_holds_up_the_producer_or_other_subscribers() {
    let server = spawn_app_with(|c| {
        c.max_events_per_session = 5_000;
        c.max_session_bytes = 64 << 20;
    })
    .await;
    let session = "stalled-replay";
    for from in [1, 1_001, 2_001] {
        let (status, body) = server.post_events(session, &batch(from, 1_000)).await;
        assert_eq!(status, 202, "ingest: {body}");
    }
    let mut watcher = server.connect().await;
    watcher.subscribe(session).await;
    // Asks for all 3,000 events (9 MB), then stops reading.
    let stalled = StalledReader::subscribe(server.addr, session, 0).await;

    // While that replay is stuck, the session goes on for everyone else.
    let (status, body) = server.post_events(session, &batch(3_001, 1)).await;
    assert_eq!(status, 202, "ingest: {body}");
    let event = watcher.wait_for("progress").await;
    assert_eq!(event["seq"], 3_001);
    assert_eq!(
        slow_consumers(&server).await,
        0,
        "the producer was answered while the slow replay was still in progress"
    );

    // Reading again within the replay deadline, it gets everything in order, then live.
    let reader = tokio::spawn(stalled.read_until_dropped(Duration::from_secs(30)));
    until_metric(&server, "herald_replayed_events_total", 3_001).await;
    let (status, _) = server.post_events(session, &batch(3_002, 1)).await;
    assert_eq!(status, 202);
    assert_eq!(watcher.wait_for("progress").await["seq"], 3_002);
    let (status, _) = server
        .post_json(
            &format!("/api/dev/session/{session}/drop-sockets"),
            &json!({}),
        )
        .await;
    assert_eq!(status, 200);
    let got = reader.await.unwrap();
    assert_contiguous(&got, 1, "the slow replay, then live");
    assert_eq!(got.last(), Some(&3_002));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sockets_requests_run_in_the_order_it_sent_them() {
    let server = spawn_app_with(|c| c.max_subscriptions = 1).await;
    // A long replay makes the first subscribe slow, so requests sent after it would overtake
    // it if a socket's requests ran concurrently.
    let (status, _) = server.post_events("order-a", &batch(1, 1_000)).await;
    assert_eq!(status, 202);
    for round in 0..10 {
        let mut client: Client = server.connect().await;
        client.emit(
            "subscribe",
            &json!({ "sessionId": "order-a", "lastSeq": 0 }),
        );
        client.emit("unsubscribe", &json!("order-a"));
        client.emit("subscribe", &json!("order-b"));
        // In order: subscribed(a), its replay, unsubscribed(a), subscribed(b).
        let mut names = Vec::new();
        loop {
            let (name, data) = client.next().await;
            assert_ne!(
                name, "error",
                "round {round}: a request was refused: {data}"
            );
            let done = name == "subscribed" && data["sessionId"] == "order-b";
            if name != "progress" && name != "connected" {
                names.push(format!(
                    "{name}:{}",
                    data["sessionId"].as_str().unwrap_or("")
                ));
            }
            if done {
                break;
            }
        }
        assert_eq!(
            names,
            [
                "subscribed:order-a",
                "unsubscribed:order-a",
                "subscribed:order-b"
            ],
            "round {round}"
        );
        // The socket follows order-b only (the cap is one): an event of order-a posted
        // first never arrives.
        let (status, _) = server
            .post_events("order-a", &batch(1_001 + round, 1))
            .await;
        assert_eq!(status, 202);
        let (status, _) = server.post_events("order-b", &batch(1 + round, 1)).await;
        assert_eq!(status, 202);
        // (`connected` is sent by the connect handler, which may run after the requests.)
        let (name, data) = loop {
            let (name, data) = client.next().await;
            if name != "connected" {
                break (name, data);
            }
        };
        assert_eq!(
            (name.as_str(), &data["sessionId"]),
            ("progress", &json!("order-b")),
            "round {round}"
        );
    }
    server.shutdown().await;
}

/// With Redis stopped, a subscribe (here: a socket resubscribing to a session it follows)
/// is refused with `BACKEND_UNAVAILABLE` and no backend text, and leaves the socket not
/// following the session, as the refusal says; once Redis is back a subscribe works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_refused_while_redis_is_down_leaves_nothing_half_subscribed() {
    let mut redis = common::redis::RedisServer::start().await;
    let url = redis.url();
    let server = spawn_app_with(move |c| {
        c.redis_url = Some(url);
        c.redis_prefix = "half-subscribed".into();
    })
    .await;
    let mut client = server.connect().await;
    client.subscribe("outage-a").await;
    assert_eq!(metric(&server, "herald_subscriptions").await, 1);

    redis.stop();
    let ack = client
        .call(
            "subscribe",
            &json!({ "sessionId": "outage-a", "lastSeq": 0 }),
        )
        .await;
    assert_eq!(ack["ok"], false, "{ack}");
    assert_eq!(ack["error"]["code"], "BACKEND_UNAVAILABLE", "{ack}");
    let message = ack["error"]["message"].as_str().unwrap();
    assert!(!message.contains("127.0.0.1"), "no backend text: {message}");
    assert_eq!(
        metric(&server, "herald_subscriptions").await,
        0,
        "the refused socket is counted as following nothing"
    );

    redis.restart().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ack = client.call("subscribe", &json!("outage-a")).await;
        if ack["ok"] == true {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still refused: {ack}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&server, "herald_subscriptions").await, 1);
    let (status, body) = server.post_events("outage-a", &batch(1, 1)).await;
    assert_eq!(status, 202, "{body}");
    let event = client.wait_for("progress").await;
    assert_eq!(event["seq"], 1);
    server.shutdown().await;
}
