//! Ordering and exactly-once delivery under concurrency, the replay/live hand-over and
//! the connect/subscribe race, against a real server over real websockets.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{Client, progress, spawn_app};
use futures_util::future::join_all;
use serde_json::{Value, json};

/// Collects events until every session in `want` reached its final seq; returns the seqs
/// seen per session, in arrival order.
async fn collect(client: &mut Client, want: &HashMap<String, u64>) -> HashMap<String, Vec<u64>> {
    let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
    let done = |seen: &HashMap<String, Vec<u64>>| {
        want.iter().all(|(id, last)| {
            seen.get(id)
                .and_then(|s| s.last())
                .is_some_and(|l| l >= last)
        })
    };
    while !done(&seen) {
        let (name, data) = client.next().await;
        if name == "progress" {
            let id = data["sessionId"].as_str().unwrap().to_owned();
            seen.entry(id)
                .or_default()
                .push(data["seq"].as_u64().unwrap());
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_sees_every_seq_once_in_order_while_producers_race() {
    const SESSIONS: usize = 4;
    const PRODUCERS_PER_SESSION: usize = 2;
    const BATCHES: usize = 25;
    const BATCH: usize = 8;
    const CLIENTS: usize = 24;
    let total = (PRODUCERS_PER_SESSION * BATCHES * BATCH) as u64;
    let app = Arc::new(spawn_app().await);
    let sessions: Vec<String> = (0..SESSIONS).map(|i| format!("race-{i}")).collect();

    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut client = app.connect().await;
        for id in &sessions {
            let ack = client
                .call("subscribe", &json!({ "sessionId": id, "lastSeq": 0 }))
                .await;
            assert_eq!(ack["ok"], true, "{ack}");
        }
        clients.push(client);
    }
    let producers = sessions.iter().flat_map(|id| {
        (0..PRODUCERS_PER_SESSION).map(|p| {
            let app = app.clone();
            let id = id.clone();
            tokio::spawn(async move {
                for b in 0..BATCHES {
                    let batch: Vec<Value> = (0..BATCH)
                        .map(|i| progress((p * 10_000 + b * BATCH + i) as u64))
                        .collect();
                    let (status, reply) = app.post_events(&id, &json!(batch)).await;
                    assert_eq!(status, 202, "{reply}");
                    // A batch gets consecutive seqs, even with another producer racing.
                    let seqs: Vec<u64> = reply["seqs"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|s| s.as_u64().unwrap())
                        .collect();
                    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
                }
            })
        })
    });
    let producers: Vec<_> = producers.collect();
    let want: HashMap<String, u64> = sessions.iter().map(|id| (id.clone(), total)).collect();
    let readers = clients.into_iter().map(|mut client| {
        let want = want.clone();
        tokio::spawn(async move { collect(&mut client, &want).await })
    });
    let results = join_all(readers).await;
    for producer in join_all(producers).await {
        producer.unwrap();
    }
    let expected: Vec<u64> = (1..=total).collect();
    for seen in results {
        let seen = seen.unwrap();
        for id in &sessions {
            assert_eq!(seen[id], expected, "session {id}: every seq once, in order");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_hands_over_to_live_without_gap_or_duplicate_under_load() {
    const TOTAL: u64 = 900;
    const SUBSCRIBERS: u64 = 30;
    let app = Arc::new(spawn_app().await);
    let head = Arc::new(AtomicU64::new(0));
    let producer = {
        let app = app.clone();
        let head = head.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while n < TOTAL {
                let batch: Vec<Value> = (n + 1..=(n + 3).min(TOTAL)).map(progress).collect();
                let (status, reply) = app.post_events("handover", &json!(batch)).await;
                assert_eq!(status, 202);
                n = reply["lastSeq"].as_u64().unwrap();
                head.store(n, Ordering::SeqCst);
            }
        })
    };
    // Subscribers join while the producer runs, each resuming from a point it "saw".
    let mut subscribers = Vec::new();
    for i in 0..SUBSCRIBERS {
        while head.load(Ordering::SeqCst) < i * TOTAL / (SUBSCRIBERS + 5) {
            tokio::task::yield_now().await;
        }
        let last_seq = head.load(Ordering::SeqCst) * (i % 3) / 3;
        let app = app.clone();
        subscribers.push(tokio::spawn(async move {
            let mut client = app.connect().await;
            let ack = client
                .call(
                    "subscribe",
                    &json!({ "sessionId": "handover", "lastSeq": last_seq }),
                )
                .await;
            assert_eq!(ack["recovered"], true, "{ack}");
            let want = HashMap::from([("handover".to_owned(), TOTAL)]);
            let seen = collect(&mut client, &want).await;
            (last_seq, seen["handover"].clone())
        }));
    }
    producer.await.unwrap();
    for subscriber in join_all(subscribers).await {
        let (last_seq, seqs) = subscriber.unwrap();
        let expected: Vec<u64> = (last_seq + 1..=TOTAL).collect();
        assert_eq!(
            seqs, expected,
            "subscriber from {last_seq}: contiguous, no duplicate"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_sent_with_the_connect_is_never_lost() {
    // The subscribe frame leaves the instant the CONNECT reply arrives, while the server
    // may not have run its connect handler yet: the window in which socketioxide drops
    // events when handlers are registered late. No retries: every one must be answered.
    const CONNECTIONS: usize = 3000;
    const IN_FLIGHT: usize = 64;
    let app = Arc::new(spawn_app().await);
    let next = Arc::new(AtomicU64::new(0));
    let workers = (0..IN_FLIGHT).map(|_| {
        let app = app.clone();
        let next = next.clone();
        tokio::spawn(async move {
            let mut answered = 0;
            while (next.fetch_add(1, Ordering::SeqCst) as usize) < CONNECTIONS {
                let frame = format!(
                    "42{}",
                    json!(["subscribe", { "sessionId": "first-frame", "lastSeq": 0 }])
                );
                let mut client = Client::connect_then(app.addr, &[frame]).await;
                let subscribed = client.wait_for("subscribed").await;
                assert_eq!(subscribed["sessionId"], "first-frame");
                answered += 1;
            }
            answered
        })
    });
    let answered: usize = join_all(workers)
        .await
        .into_iter()
        .map(Result::unwrap)
        .sum();
    assert_eq!(answered, CONNECTIONS);
}
