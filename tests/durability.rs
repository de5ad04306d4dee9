//! Durability with `--data-dir` (SPEC §7), with real processes: a node killed with SIGKILL
//! (no shutdown at all, as in a power cut) in the middle of a high-rate ingest, then started
//! again on the same data dir, has every event it acknowledged, `seq` contiguous, and the
//! same epoch.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::WAIT;
use common::node::Node;
use serde_json::{Value, json};

const PRODUCERS: usize = 4;
/// Batches each producer sends at most (the node is killed well before).
const BATCHES: usize = 400;
const PER_BATCH: usize = 10;
/// Acknowledged batches, over all producers, after which the node is killed.
const KILL_AFTER: usize = 120;

fn batch(producer: usize, batch: usize) -> Value {
    let events: Vec<Value> = (0..PER_BATCH)
        .map(|i| {
            json!({
                "event": "progress",
                "idempotencyKey": format!("p{producer}-b{batch}-e{i}"),
                "data": {
                    "status": "PROCESSING",
                    "progress": (batch % 100) as u64,
                    "prompts": { "total": 8, "completed": 3, "processing": 4, "pending": 1, "failed": 0 },
                    "message": format!("producer {producer} batch {batch} event {i}"),
                },
            })
        })
        .collect();
    Value::Array(events)
}

/// Every event of a session's log, paging through history.
async fn history(node: &Node, session_id: &str) -> (String, Vec<Value>) {
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = node
            .try_request(
                reqwest::Method::GET,
                &format!("/api/wizard/session/{session_id}/events?after={after}&limit=1000"),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("history of {session_id}: {e}"));
        assert_eq!(status, 200, "{page}");
        let page_events = page["events"].as_array().cloned().unwrap_or_default();
        after = page_events
            .last()
            .map_or(after, |e| e["seq"].as_u64().unwrap());
        events.extend(page_events);
        if page["hasMore"] != json!(true) {
            return (page["epoch"].as_str().unwrap().to_owned(), events);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_ingest_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap().to_owned();
    let args = [
        "--data-dir",
        data_dir.as_str(),
        "--max-events-per-session",
        "100000",
    ];
    let mut node = Node::start("node", &args).await;
    let node_url = node.url("");

    // One epoch per session, read before the kill.
    for producer in 0..PRODUCERS {
        let (status, _) = node
            .try_request(
                reqwest::Method::POST,
                &format!("/api/sessions/power-{producer}/events"),
                Some(&json!({ "event": "progress", "data": { "status": "PROCESSING", "progress": 0 } })),
            )
            .await
            .unwrap();
        assert_eq!(status, 202);
    }
    let mut epochs = Vec::new();
    for producer in 0..PRODUCERS {
        epochs.push(history(&node, &format!("power-{producer}")).await.0);
    }

    let acknowledged = Arc::new(AtomicUsize::new(0));
    let enough = Arc::new(tokio::sync::Notify::new());
    // Per producer: batch number → the seqs herald answered 202 with.
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|producer| {
            let (url, acknowledged, enough) =
                (node_url.clone(), acknowledged.clone(), enough.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut acked: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
                for b in 0..BATCHES {
                    let sent = http
                        .post(format!("{url}/api/sessions/power-{producer}/events"))
                        .json(&batch(producer, b))
                        .timeout(WAIT)
                        .send()
                        .await;
                    let Ok(response) = sent else { break };
                    if response.status().as_u16() != 202 {
                        break;
                    }
                    let Ok(reply) = response.json::<Value>().await else {
                        break;
                    };
                    let seqs = reply["seqs"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|s| s.as_u64().unwrap())
                        .collect();
                    acked.insert(b, seqs);
                    if acknowledged.fetch_add(1, Ordering::AcqRel) + 1 == KILL_AFTER {
                        enough.notify_one();
                    }
                }
                acked
            })
        })
        .collect();
    tokio::time::timeout(WAIT * 3, enough.notified())
        .await
        .expect("the producers get batches acknowledged");
    node.kill().await;
    let mut acked = Vec::new();
    for producer in producers {
        acked.push(producer.await.unwrap());
    }
    let total: usize = acked.iter().map(BTreeMap::len).sum();
    assert!(total >= KILL_AFTER, "{total} batches acknowledged");
    assert!(
        acked.iter().all(|a| a.len() < BATCHES),
        "the node died mid-ingest, not after it"
    );

    let node = Node::start("node-restarted", &args).await;
    for (producer, acked) in acked.iter().enumerate() {
        let session_id = format!("power-{producer}");
        let (epoch, events) = history(&node, &session_id).await;
        assert_eq!(
            epoch, epochs[producer],
            "{session_id}: the epoch is unchanged"
        );
        let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        let contiguous: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, contiguous, "{session_id}: seq is contiguous from 1");
        let by_seq: BTreeMap<u64, &Value> = events
            .iter()
            .map(|e| (e["seq"].as_u64().unwrap(), e))
            .collect();
        for (b, batch_seqs) in acked {
            for (i, seq) in batch_seqs.iter().enumerate() {
                let event = by_seq
                    .get(seq)
                    .unwrap_or_else(|| panic!("{session_id}: acknowledged seq {seq} is missing"));
                assert_eq!(
                    event["data"]["message"],
                    json!(format!("producer {producer} batch {b} event {i}")),
                    "{session_id}: seq {seq} is the event acknowledged with it"
                );
            }
        }
        // Every logged event belongs to a whole batch: the one in flight at the kill is in
        // full or not at all.
        assert_eq!(
            (seqs.len() - 1) % PER_BATCH,
            0,
            "{session_id}: whole batches only"
        );
        // A producer retrying its last acknowledged batch gets duplicates, not new events.
        if let Some((&b, batch_seqs)) = acked.iter().next_back() {
            let (status, reply) = node
                .try_request(
                    reqwest::Method::POST,
                    &format!("/api/sessions/{session_id}/events"),
                    Some(&batch(producer, b)),
                )
                .await
                .unwrap();
            assert_eq!(status, 202, "{reply}");
            assert_eq!(reply["duplicates"], json!(PER_BATCH), "{reply}");
            let again: Vec<u64> = reply["seqs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_u64().unwrap())
                .collect();
            assert_eq!(
                &again, batch_seqs,
                "the keys are remembered across the crash"
            );
        }
    }
}

/// Subscribes with `lastSeq: 0`, so the whole log is replayed.
async fn subscribe_from_start(client: &mut common::Client, session_id: &str) {
    let ack = client
        .call(
            "subscribe",
            &json!({ "sessionId": session_id, "lastSeq": 0 }),
        )
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
}

/// A run the restarted node cannot resume (its configuration no longer has the run's
/// model) does not hang: it ends `NODE_LOST` (once), saying why, and keeps what it had
/// logged. (Runs it can resume are in `tests/resume.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_the_restarted_node_cannot_resume_ends_node_lost() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data").to_str().unwrap().to_owned();
    let args = ["--data-dir", data_dir.as_str()];
    let other = dir.path().join("other.toml");
    std::fs::write(
        &other,
        "[[models]]\nname = \"other\"\nprovider = \"simulated\"\n",
    )
    .unwrap();
    let mut node = Node::start("node", &args).await;
    let (status, created) = node
        .post_json(
            "/api/wizard/sessions",
            &json!({ "prompts": ["A story about [clarify] a fox"], "models": ["sim-fast"] }),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let session_id = created["sessionId"].as_str().unwrap().to_owned();
    // A producer-fed session beside it, which no restart may end.
    let (status, _) = node
        .post_events("fed-1", &json!([common::progress(1)]))
        .await;
    assert_eq!(status, 202);
    let mut client = node.connect().await;
    subscribe_from_start(&mut client, &session_id).await;
    client.wait_for("clarification").await;
    node.kill().await;

    let restarted = [
        "--data-dir",
        data_dir.as_str(),
        "--config",
        other.to_str().unwrap(),
    ];
    let node = Node::start("node-restarted", &restarted).await;
    let mut client = node.connect().await;
    subscribe_from_start(&mut client, &session_id).await;
    let error = client.wait_for("error").await;
    assert_eq!(error["code"], "NODE_LOST", "{error}");
    let message = error["error"].as_str().unwrap();
    assert!(message.contains("no model `sim-fast`"), "{message}");
    let snapshot = node
        .snapshot(&session_id)
        .await
        .expect("the session survived");
    assert_eq!(snapshot["status"], "FAILED");
    let events = node.history(&session_id).await.unwrap();
    let errors = events.iter().filter(|e| e["event"] == "error").count();
    assert_eq!(errors, 1, "one terminal error: {events:?}");
    assert!(
        events.iter().any(|e| e["event"] == "clarification"),
        "what the run logged before the crash is kept"
    );
    let fed = node.snapshot("fed-1").await.unwrap();
    assert_eq!(
        fed["status"], "PROCESSING",
        "a producer-fed session is not a run"
    );
}
