//! A replay in cluster mode never hands a client `recovered: true` with a hole, even when
//! another node trims the log in the middle of it (two real nodes, one real Redis).

mod common;

use common::node::Node;
use common::redis::RedisServer;
use serde_json::{Value, json};

fn batch(from: u64, count: u64) -> Value {
    Value::Array(
        (from..from + count)
            .map(|n| json!({ "event": "progress", "data": { "status": "PROCESSING", "progress": n % 101 } }))
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_racing_another_nodes_trim_is_whole_or_refused() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let prefix = format!(
        "herald-replay-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    // A short retention: every batch of 10 trims 10 events off the front.
    let args = [
        "--redis-url",
        &url,
        "--redis-prefix",
        &prefix,
        "--max-events-per-session",
        "20",
    ];
    let (reader_node, writer_node) = tokio::join!(Node::start("a", &args), Node::start("b", &args));
    let session = "trim-race";
    let (status, _) = writer_node.post_events(session, &batch(1, 20)).await;
    assert_eq!(status, 202);

    // Node b logs batch after batch while clients of node a resume from just inside the
    // retained window, where a trim between reading the head and reading the range bites.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let ingest_url = writer_node.url(&format!("/api/sessions/{session}/events"));
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut next = 21;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && next < 200_000 {
                let response = http
                    .post(&ingest_url)
                    .json(&batch(next, 10))
                    .send()
                    .await
                    .expect("ingest answers");
                assert_eq!(response.status(), 202);
                next += 10;
            }
        })
    };
    let mut recovered = 0;
    let mut refused = 0;
    for attempt in 0..300u64 {
        let history = reader_node
            .history_after(session, 0)
            .await
            .expect("the session has a log");
        let first = history["firstSeq"].as_u64().unwrap();
        // From the oldest retained event to a few past it.
        let last_seq = first.saturating_sub(1) + attempt % 6;
        let mut client = reader_node.connect().await;
        let ack = client
            .call(
                "subscribe",
                &json!({ "sessionId": session, "lastSeq": last_seq }),
            )
            .await;
        assert_eq!(ack["ok"], true, "{ack}");
        let subscribed = client.wait_for("subscribed").await;
        if subscribed["recovered"] == true {
            recovered += 1;
            let (name, event) = client.next().await;
            assert_eq!(name, "progress");
            assert_eq!(
                event["seq"].as_u64(),
                Some(last_seq + 1),
                "attempt {attempt}: recovered: true from lastSeq {last_seq}, but the replay starts later"
            );
        } else {
            refused += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    // Both outcomes happened, so the race window was exercised from both sides.
    assert!(
        recovered > 0 && refused > 0,
        "recovered {recovered}, refused {refused}"
    );
}
