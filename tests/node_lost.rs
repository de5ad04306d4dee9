//! A node running orchestrated sessions dies (SIGKILL): within the lease another node ends
//! its sessions `FAILED` with `code: NODE_LOST`, so none hangs; producer-fed sessions on
//! the dead node's Redis are untouched. And the converse: a Redis outage longer than the
//! lease, with every node alive, ends no session `NODE_LOST`.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::node::Node;
use common::progress;
use common::redis::RedisServer;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_a_killed_node_end_node_lost_within_the_lease() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    // A 3 s lease instead of the default 10 s keeps the test short.
    let args = [
        "--redis-url",
        url.as_str(),
        "--redis-prefix",
        "node-lost",
        "--cluster-lease-ms",
        "3000",
    ];
    let mut doomed = Node::start("doomed", &args).await;
    let survivor = Node::start("survivor", &args).await;

    // A run on the doomed node that waits for an answer, so it is surely running.
    let (status, created) = doomed
        .post_json(
            "/api/wizard/sessions",
            &json!({ "prompts": ["A story about [clarify] a fox"], "models": ["sim-fast"] }),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let session_id = created["sessionId"].as_str().unwrap().to_owned();
    // A producer-fed session in the same cluster.
    let (status, _) = survivor
        .post_events("fed-1", &json!([progress(1), progress(2)]))
        .await;
    assert_eq!(status, 202);

    // Watch the run from the surviving node.
    let mut client = survivor.connect().await;
    let ack = client
        .call(
            "subscribe",
            &json!({ "sessionId": session_id, "lastSeq": 0 }),
        )
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    client.wait_for("clarification").await;

    doomed.kill().await;

    // The lease is 3 s, the survivor checks every second and judges once it has been up for
    // two leases.
    let error = client
        .wait_for_within("error", Duration::from_secs(15))
        .await;
    assert_eq!(error["code"], "NODE_LOST", "{error}");
    assert_eq!(error["sessionId"], session_id.as_str());
    let snapshot = survivor
        .snapshot(&session_id)
        .await
        .expect("snapshot on the survivor");
    assert_eq!(snapshot["status"], "FAILED");

    // Cancel now finds an ended session; the producer-fed one is as it was.
    let (status, reply) = survivor
        .post_json(
            &format!("/api/wizard/session/{session_id}/cancel"),
            &json!({}),
        )
        .await;
    assert_eq!(status, 409, "{reply}");
    let fed = survivor.snapshot("fed-1").await.unwrap();
    assert_eq!(
        (fed["status"].as_str(), fed["lastSeq"].as_u64()),
        (Some("PROCESSING"), Some(2))
    );
}

/// The cluster lease the outage test runs with (the default is 10 s).
const SHORT_LEASE_MS: u64 = 2000;

/// The first pending clarification in a session's history: its id.
async fn pending_clarification(node: &Node, session_id: &str) -> Option<String> {
    let events = node.history(session_id).await?;
    events.iter().find_map(|e| {
        let data = &e["data"];
        (e["event"] == "clarification" && data["status"] == "pending")
            .then(|| data["clarificationId"].as_str().unwrap().to_owned())
    })
}

/// Polls `node` until `probe` gives a value; fails after `limit`.
async fn poll<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Redis is down longer than the lease, so every node's liveness key has expired when it
/// comes back (with its data: an append-only file). Every node is alive all along: the
/// first node back must not take the others' expired keys for evidence, and no session
/// ends `NODE_LOST`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_longer_than_the_lease_loses_no_live_node() {
    let lease = Duration::from_millis(SHORT_LEASE_MS);
    let mut redis = RedisServer::start_persistent().await;
    let url = redis.url();
    let lease_ms = SHORT_LEASE_MS.to_string();
    let args = [
        "--redis-url",
        url.as_str(),
        "--redis-prefix",
        "outage",
        "--cluster-lease-ms",
        lease_ms.as_str(),
    ];
    let nodes = [
        Node::start("node-a", &args).await,
        Node::start("node-b", &args).await,
    ];
    // One run per node, each paused on a clarification, so each surely runs on its node.
    let mut sessions = Vec::new();
    for node in &nodes {
        let (status, created) = node
            .post_json(
                "/api/wizard/sessions",
                &json!({ "prompts": ["A story about [clarify] a fox"], "models": ["sim-fast"] }),
            )
            .await;
        assert_eq!(status, 201, "{}: {created}", node.name);
        sessions.push(created["sessionId"].as_str().unwrap().to_owned());
    }
    for (node, id) in nodes.iter().zip(&sessions) {
        poll("the clarification", common::WAIT, || {
            pending_clarification(node, id)
        })
        .await;
    }

    // The outage: longer than the lease, so every liveness key has expired at the restart.
    // node-b also comes back later than node-a (it is paused until node-a has refreshed its
    // own key), as a node whose reconnection backoff is longer: its expired key is then all
    // node-a sees of it, for a moment.
    let b = &nodes[1];
    redis.stop();
    b.signal("STOP");
    tokio::time::sleep(lease + Duration::from_millis(1500)).await;
    redis.restart().await;
    let mut raw = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    poll(
        "node-a's first heartbeat after the outage",
        common::WAIT,
        || {
            let mut raw = raw.clone();
            async move {
                let alive: Vec<String> = redis::cmd("KEYS")
                    .arg("outage:alive:*")
                    .query_async(&mut raw)
                    .await
                    .unwrap();
                (!alive.is_empty()).then_some(())
            }
        },
    )
    .await;
    b.signal("CONT");
    for node in &nodes {
        poll("/readyz", common::WAIT, || async {
            (node.get("/readyz").await.0 == 200).then_some(())
        })
        .await;
    }

    // Bounded negative check: a node that took the expired key for evidence ends the
    // other's session at its first heartbeat; judging resumes two leases after it, so three
    // leases cover every node's judging ticks.
    // A node judged lost also loses its sessions' entries in the owners hash (even when
    // ending them then fails), so both are checked.
    let window = Instant::now() + lease * 3;
    while Instant::now() < window {
        let owners: HashMap<String, String> = redis::cmd("HGETALL")
            .arg("outage:owners")
            .query_async(&mut raw)
            .await
            .unwrap();
        for (node, id) in nodes.iter().zip(&sessions) {
            assert!(
                owners.contains_key(id),
                "{}'s session was judged lost",
                node.name
            );
            let snapshot = node.snapshot(id).await.expect("the session survives");
            assert_ne!(snapshot["status"], "FAILED", "{}: {snapshot}", node.name);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every run is still alive: answered, it completes on its node.
    for (node, id) in nodes.iter().zip(&sessions) {
        let clarification = pending_clarification(node, id)
            .await
            .expect("still pending");
        let (status, reply) = node
            .post_json(
                "/api/wizard/clarifications/respond",
                &json!({ "sessionId": id, "clarificationId": clarification, "answer": "red" }),
            )
            .await;
        assert_eq!(status, 200, "{}: {reply}", node.name);
    }
    for (node, id) in nodes.iter().zip(&sessions) {
        let status = poll("the run's end", common::WAIT, || async {
            let snapshot = node.snapshot(id).await?;
            let status = snapshot["status"].as_str()?.to_owned();
            matches!(status.as_str(), "COMPLETED" | "FAILED").then_some(status)
        })
        .await;
        let events = node.history(id).await.unwrap();
        let lost = events.iter().any(|e| e["data"]["code"] == "NODE_LOST");
        assert!(!lost, "{}: {id} ended NODE_LOST: {events:?}", node.name);
        assert_eq!(status, "COMPLETED", "{}: {id}: {events:?}", node.name);
    }
}

/// SIGTERM is a cooperative shutdown: the node ends its runs itself, at once, saying so
/// (not a lease later through another node), releases them and the ingest lease, and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shut_down_ends_its_runs_at_once_and_hands_back_what_it_held() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    // A lease far longer than the test: whatever ends the run, it is not the liveness check.
    let args = [
        "--redis-url",
        url.as_str(),
        "--redis-prefix",
        "shutdown",
        "--cluster-lease-ms",
        "120000",
    ];
    let mut leaving = Node::start("leaving", &args).await;
    let staying = Node::start("staying", &args).await;
    let (status, created) = leaving
        .post_json(
            "/api/wizard/sessions",
            &json!({ "prompts": ["A story about [clarify] a fox"], "models": ["sim-fast"] }),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let session_id = created["sessionId"].as_str().unwrap().to_owned();
    let mut client = staying.connect().await;
    let ack = client
        .call(
            "subscribe",
            &json!({ "sessionId": session_id, "lastSeq": 0 }),
        )
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    client.wait_for("clarification").await;

    let exit = leaving.terminate().await;
    assert!(exit.success(), "exit {exit:?}: {}", leaving.stderr_tail());
    // By the time the process is gone, its run has ended in the log.
    let snapshot = staying.snapshot(&session_id).await.unwrap();
    assert_eq!(snapshot["status"], "FAILED", "{snapshot}");
    let error = client.wait_for("error").await;
    assert_eq!(error["code"], "NODE_LOST", "{error}");
    assert_eq!(
        snapshot["clarifications"][0]["status"], "expired",
        "{snapshot}"
    );

    let mut raw = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let owners: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("shutdown:owners")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(owners.is_empty(), "no run is left claimed: {owners:?}");
    // The ingest lease went back (or to the node that stays): never to the one that left.
    let holder: Option<String> = redis::cmd("GET")
        .arg("shutdown:ingest:lease")
        .query_async(&mut raw)
        .await
        .unwrap();
    let stderr = leaving.stderr_tail();
    assert!(
        stderr.contains("stopped consuming the ingest stream"),
        "the consumer stopped between entries: {stderr}"
    );
    if let Some(holder) = holder {
        assert!(
            !stderr.contains(&holder),
            "the lease is still the leaving node's: {holder}"
        );
    }
}
