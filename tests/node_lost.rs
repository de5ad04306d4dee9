//! A node running orchestrated sessions dies (SIGKILL): once its lease runs out another node
//! resumes its runs (SPEC §7), and a run no node can resume ends `FAILED` with
//! `code: NODE_LOST`, so none hangs; producer-fed sessions are untouched. A node shut down
//! hands its runs over at once. And the converse: a Redis outage longer than the lease, with
//! every node alive, takes no run from its node.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::WAIT;
use common::fake_llm::{FakeBehavior, FakeLlm};
use common::node::Node;
use common::progress;
use common::redis::RedisServer;
use common::runs::{FakeModel, check_history, poll, write_config};
use serde_json::json;

/// The lease the kill tests run with (the default is 10 s).
const KILL_LEASE: Duration = Duration::from_millis(3000);

async fn create(node: &Node, body: serde_json::Value) -> String {
    let (status, created) = node.post_json("/api/wizard/sessions", &body).await;
    assert_eq!(status, 201, "{}: {created}", node.name);
    created["sessionId"].as_str().unwrap().to_owned()
}

/// Three nodes; the one running a session is killed mid-stream. Once its lease has run out,
/// another node resumes the run from its checkpoint: the interrupted unit starts again
/// (`attempt: 2`), the finished one is not asked again, and a client on a surviving node
/// sees one contiguous history ending in `completed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_of_a_killed_node_is_resumed_by_another_once_its_lease_runs_out() {
    let quick = FakeLlm::start(FakeBehavior::default()).await;
    let steady = FakeLlm::start(FakeBehavior {
        tokens: 200,
        token_delay: Duration::from_millis(50),
        ..FakeBehavior::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &[
            FakeModel {
                name: "quick",
                fake: &quick,
            },
            FakeModel {
                name: "steady",
                fake: &steady,
            },
        ],
        "update_interval_ms = 100",
    );
    let redis = RedisServer::start().await;
    let (url, lease_ms) = (redis.url(), KILL_LEASE.as_millis().to_string());
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--redis-url",
        url.as_str(),
        "--redis-prefix",
        "resume",
        "--cluster-lease-ms",
        lease_ms.as_str(),
    ];
    let survivors_since = Instant::now();
    let survivors = [
        Node::start("survivor-1", &args).await,
        Node::start("survivor-2", &args).await,
    ];
    let mut doomed = Node::start("doomed", &args).await;
    let session_id = create(
        &doomed,
        json!({ "prompts": [{ "id": "fox", "text": "fox" }], "models": ["quick", "steady"] }),
    )
    .await;
    let mut client = survivors[0].connect().await;
    let ack = client
        .call(
            "subscribe",
            &json!({ "sessionId": session_id, "lastSeq": 0 }),
        )
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    let mut seen = Vec::new();
    let mut quick_done = false;
    loop {
        let (name, data) = client.next().await;
        if data.get("seq").is_none() {
            continue;
        }
        quick_done |=
            name == "model_result" && data["modelName"] == "quick" && data["status"] == "completed";
        let streaming = name == "model_result"
            && data["modelName"] == "steady"
            && !data["result"].as_str().unwrap_or("").is_empty();
        seen.push(json!({ "event": name, "seq": data["seq"], "data": data }));
        if quick_done && streaming {
            break;
        }
    }
    doomed.kill().await;
    let killed_at = Instant::now();
    // The second attempt need not be slow.
    steady.set(|b| b.token_delay = Duration::ZERO);

    loop {
        let (name, data) = client.next_within(WAIT * 3).await;
        if data.get("seq").is_none() {
            continue;
        }
        let resumed = name == "model_result" && data["attempt"] == 2;
        seen.push(json!({ "event": name, "seq": data["seq"], "data": data }));
        if resumed {
            break;
        }
    }
    // The lease runs out, then a survivor's next heartbeat (a third of a lease) notices; a
    // survivor judges only once its own heartbeats have run for JUDGE_AFTER leases.
    let resumed_after = killed_at.elapsed();
    let judging_from = survivors_since + KILL_LEASE * herald::cluster::JUDGE_AFTER;
    let expected =
        (KILL_LEASE + KILL_LEASE / 3).max(judging_from.saturating_duration_since(killed_at));
    assert!(
        resumed_after <= expected + Duration::from_millis(1500),
        "resumed {resumed_after:?} after the kill; expected within {expected:?}"
    );
    loop {
        let (name, data) = client.next_within(WAIT).await;
        if data.get("seq").is_none() {
            continue;
        }
        let done = name == "completed" || name == "error";
        seen.push(json!({ "event": name, "seq": data["seq"], "data": data }));
        if done {
            break;
        }
    }
    let history = check_history(&session_id, &seen);
    assert_eq!(history.terminal[0]["event"], "completed", "{seen:?}");
    assert_eq!(
        quick.stats().requests_for("fox"),
        1,
        "the finished unit is not run again"
    );
    assert_eq!(
        steady.stats().requests_for("fox"),
        2,
        "the interrupted one is, once"
    );
    let logged = survivors[1].history(&session_id).await.unwrap();
    check_history(&session_id, &logged);
}

/// A run no node can resume (here: the survivors have no such model) ends `NODE_LOST` within
/// the lease, saying why, so none hangs; producer-fed sessions are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_no_node_can_resume_ends_node_lost_within_the_lease() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.toml");
    std::fs::write(
        &other,
        "[[models]]\nname = \"other\"\nprovider = \"simulated\"\n",
    )
    .unwrap();
    let args = [
        "--redis-url",
        url.as_str(),
        "--redis-prefix",
        "node-lost",
        "--cluster-lease-ms",
        "3000",
    ];
    let mut doomed = Node::start("doomed", &args).await;
    let mut survivor_args = args.to_vec();
    survivor_args.extend(["--config", other.to_str().unwrap()]);
    let survivor = Node::start("survivor", &survivor_args).await;

    // A run on the doomed node that waits for an answer, so it is surely running.
    let session_id = create(
        &doomed,
        json!({ "prompts": ["A story about [clarify] a fox"], "models": ["sim-fast"] }),
    )
    .await;
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
    let message = error["error"].as_str().unwrap();
    assert!(message.contains("no model `sim-fast`"), "{message}");
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

    let mut raw = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let owners_before: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("outage:owners")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(owners_before.len(), sessions.len(), "{owners_before:?}");
    drop(raw);

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
    // A node judged lost also loses its sessions' claims in the owners hash (even when
    // resuming them then fails), so both are checked.
    let window = Instant::now() + lease * 3;
    while Instant::now() < window {
        // The test's own connection may time out on a loaded machine: that is no evidence.
        let read: redis::RedisResult<HashMap<String, String>> = redis::cmd("HGETALL")
            .arg("outage:owners")
            .query_async(&mut raw)
            .await;
        let Ok(owners) = read else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        for (node, id) in nodes.iter().zip(&sessions) {
            assert_eq!(
                owners.get(id),
                owners_before.get(id),
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

/// SIGTERM is a cooperative shutdown: the node hands its runs over at once (not a lease
/// later: the lease here is far longer than the test), another node resumes them, a
/// question pending on the leaving node is answered on the one that took it, the ingest
/// lease goes back, and the node exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shut_down_hands_its_runs_over_at_once() {
    let redis = RedisServer::start().await;
    let url = redis.url();
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
    let session_id = create(
        &leaving,
        json!({ "prompts": ["A story about [clarify] a fox"], "models": ["sim-fast"] }),
    )
    .await;
    let mut client = staying.connect().await;
    let ack = client
        .call(
            "subscribe",
            &json!({ "sessionId": session_id, "lastSeq": 0 }),
        )
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    let clarification = client.wait_for("clarification").await;

    let exit = leaving.terminate().await;
    assert!(exit.success(), "exit {exit:?}: {}", leaving.stderr_tail());
    let stderr = leaving.stderr_tail();
    let mut raw = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // The node that stays claims the run, promptly.
    let handed = Instant::now();
    let owner = poll("the run's new claim", Duration::from_secs(5), || {
        let mut raw = raw.clone();
        let session_id = session_id.clone();
        async move {
            let owner: Option<String> = redis::cmd("HGET")
                .arg("shutdown:owners")
                .arg(&session_id)
                .query_async(&mut raw)
                .await
                .unwrap();
            owner
        }
    })
    .await;
    assert!(handed.elapsed() < Duration::from_secs(5));
    assert!(
        !stderr.contains(&owner),
        "still the leaving node's: {owner}"
    );
    let snapshot = staying.snapshot(&session_id).await.unwrap();
    assert_eq!(snapshot["status"], "PROCESSING", "{snapshot}");
    assert_eq!(
        snapshot["clarifications"][0]["status"], "pending",
        "{snapshot}"
    );
    let (status, reply) = staying
        .post_json(
            "/api/wizard/clarifications/respond",
            &json!({ "sessionId": session_id, "clarificationId": clarification["clarificationId"], "answer": "red" }),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let completed = client.wait_for("completed").await;
    assert_eq!(completed["sessionId"], session_id.as_str());
    let events = staying.history(&session_id).await.unwrap();
    check_history(&session_id, &events);
    assert!(!events.iter().any(|e| e["data"]["code"] == "NODE_LOST"));

    let owners: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("shutdown:owners")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(
        owners.is_empty(),
        "the ended run is not left claimed: {owners:?}"
    );
    // The ingest lease went back (or to the node that stays): never to the one that left.
    let holder: Option<String> = redis::cmd("GET")
        .arg("shutdown:ingest:lease")
        .query_async(&mut raw)
        .await
        .unwrap();
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
