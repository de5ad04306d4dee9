//! Runs survive their node (SPEC §7), on one node with `--data-dir`, with real processes and
//! fake providers on loopback that count what they are asked: a node killed with SIGKILL
//! in the middle of a run, then started again on the same data dir, finishes the run
//! without asking a model again for a unit that had finished; a clarification pending at
//! the crash is answered after the restart and keeps its deadline; a SIGTERM hands the run
//! over to the restarted node without ending it.

mod common;

use std::time::{Duration, Instant};

use common::fake_llm::{FakeBehavior, FakeLlm, expected_reply};
use common::node::Node;
use common::runs::{FakeModel, check_history, ended, poll, unit_events, write_config};
use common::{Client, WAIT};
use serde_json::{Value, json};

/// A reply that streams for about `tokens` × 100 ms: long enough to be interrupted.
fn slow(tokens: usize) -> FakeBehavior {
    FakeBehavior {
        tokens,
        token_delay: Duration::from_millis(100),
        ..FakeBehavior::default()
    }
}

async fn start(name: &str, config: &str, data_dir: &str) -> Node {
    Node::start(name, &["--config", config, "--data-dir", data_dir]).await
}

async fn create(node: &Node, body: Value) -> String {
    let (status, created) = node.post_json("/api/wizard/sessions", &body).await;
    assert_eq!(status, 201, "{created}");
    created["sessionId"].as_str().unwrap().to_owned()
}

/// Receives session events until `stop` holds for one; returns them all, in order.
async fn collect_until(
    client: &mut Client,
    mut stop: impl FnMut(&str, &Value) -> bool,
) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let (name, data) = client.next().await;
        if data.get("seq").is_none() {
            continue;
        }
        let done = stop(&name, &data);
        seen.push(json!({ "event": name, "data": data }));
        if done {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_mid_way_finishes_after_a_restart_without_billing_a_finished_unit_again() {
    let quick = FakeLlm::start(FakeBehavior::default()).await;
    let steady = FakeLlm::start(slow(40)).await;
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
    let config = config.to_str().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let mut node = start("node", config, data).await;
    let session_id = create(
        &node,
        json!({
            "prompts": [{ "id": "alpha", "text": "alpha" }, { "id": "beta", "text": "beta" }],
            "models": ["quick", "steady"],
        }),
    )
    .await;

    // A subscriber that sees the run up to the crash.
    let mut client = node.connect().await;
    let ack = client
        .call(
            "subscribe",
            &json!({ "sessionId": session_id, "lastSeq": 0 }),
        )
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    // Crash once both quick units are logged as done and the steady ones stream.
    let mut quick_done = 0;
    let before = collect_until(&mut client, |name, data| {
        if name == "model_result" && data["modelName"] == "quick" && data["status"] == "completed" {
            quick_done += 1;
        }
        let steady_streaming = name == "model_result"
            && data["modelName"] == "steady"
            && !data["result"].as_str().unwrap_or("").is_empty();
        quick_done == 2 && steady_streaming
    })
    .await;
    node.kill().await;
    drop(client);
    assert_eq!(
        quick.stats().requests.len(),
        2,
        "one request per quick unit"
    );

    // The client reconnects to the restarted node and resumes from the last seq it saw.
    let node = start("node-restarted", config, data).await;
    let last_seq = before.last().unwrap()["data"]["seq"].as_u64().unwrap();
    let mut client = node.connect().await;
    let ack = client
        .call(
            "subscribe",
            &json!({ "sessionId": session_id, "lastSeq": last_seq }),
        )
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    let after = collect_until(&mut client, |name, _| {
        name == "completed" || name == "error"
    })
    .await;
    let seen: Vec<Value> = before.into_iter().chain(after).collect();
    let seen: Vec<Value> = seen
        .iter()
        .map(|e| json!({ "event": e["event"], "seq": e["data"]["seq"], "data": e["data"] }))
        .collect();
    let history = check_history(&session_id, &seen);
    assert_eq!(
        history.terminal[0]["event"], "completed",
        "{:?}",
        history.terminal
    );

    // Finished units were not run again; interrupted ones were, once, and said so.
    for prompt in ["alpha", "beta"] {
        assert_eq!(quick.stats().requests_for(prompt), 1, "quick on {prompt}");
        assert_eq!(steady.stats().requests_for(prompt), 2, "steady on {prompt}");
        let unit = (prompt.to_owned(), "steady".to_owned());
        assert_eq!(history.starts[&unit], 2, "steady on {prompt} started again");
        let restarted = unit_events(&seen, prompt, "steady");
        let first_again = restarted
            .iter()
            .find(|e| e["data"]["attempt"] == 2)
            .expect("the restarted unit says attempt 2");
        assert_eq!(first_again["data"]["status"], "processing");
        assert_eq!(first_again["data"]["result"], "");
    }
    // The result has every unit's output, the steady ones from their second attempt.
    let result = &history.terminal[0]["data"]["result"];
    for (i, prompt) in ["alpha", "beta"].iter().enumerate() {
        let outputs = &result["prompts"][i]["outputs"];
        assert_eq!(outputs[0]["output"], expected_reply("quick", prompt, 5));
        assert_eq!(outputs[1]["output"], expected_reply("steady", prompt, 40));
    }
    // What the restarted node serves to anyone else agrees.
    let logged = node.history(&session_id).await.unwrap();
    check_history(&session_id, &logged);
    assert_eq!(logged.len(), seen.len());
}

/// The pending clarification of a run paused at the crash, its id and when it was logged.
async fn pending_clarification(node: &Node, session_id: &str) -> (String, String) {
    poll("a pending clarification", WAIT, || async {
        let events = node.history(session_id).await?;
        events.iter().find_map(|e| {
            let data = &e["data"];
            (e["event"] == "clarification" && data["status"] == "pending").then(|| {
                (
                    data["clarificationId"].as_str().unwrap().to_owned(),
                    data["timestamp"].as_str().unwrap().to_owned(),
                )
            })
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clarification_pending_at_a_crash_is_answered_after_the_restart() {
    let fake = FakeLlm::start(FakeBehavior {
        clarify_marker: Some("[ask]".into()),
        ..FakeBehavior::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &[FakeModel {
            name: "asker",
            fake: &fake,
        }],
        "clarification_timeout_secs = 600",
    );
    let (config, data) = (
        config.to_str().unwrap().to_owned(),
        dir.path().join("data").to_str().unwrap().to_owned(),
    );
    let prompt = "Plan [ask] a trip";
    let mut node = start("node", &config, &data).await;
    let session_id = create(&node, json!({ "prompts": [prompt], "models": ["asker"] })).await;
    let (clarification_id, _) = pending_clarification(&node, &session_id).await;
    node.kill().await;

    let node = start("node-restarted", &config, &data).await;
    let snapshot = node.snapshot(&session_id).await.unwrap();
    assert_eq!(snapshot["status"], "PROCESSING", "{snapshot}");
    assert_eq!(snapshot["clarificationCount"], 1, "{snapshot}");
    let (status, reply) = node
        .post_json(
            "/api/wizard/clarifications/respond",
            &json!({ "sessionId": session_id, "clarificationId": clarification_id, "answer": "Lisbon, in May" }),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(ended(&node, &session_id, WAIT).await, "COMPLETED");

    // The question was asked once, and the model went on with the answer: two requests.
    let stats = fake.stats();
    assert_eq!(stats.requests_for(prompt), 2, "{:?}", stats.requests);
    let messages = stats.requests.last().unwrap().body["messages"].clone();
    let last = messages.as_array().unwrap().last().unwrap();
    assert_eq!(last["content"], "Lisbon, in May", "{messages}");
    let events = node.history(&session_id).await.unwrap();
    let history = check_history(&session_id, &events);
    assert_eq!(history.terminal[0]["event"], "completed");
    let answered: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "clarification" && e["data"]["status"] == "answered")
        .collect();
    assert_eq!(answered.len(), 1, "one answered event: {answered:?}");
    // The same answer again is still "done"; another is refused.
    let again = |answer: &str| json!({ "sessionId": session_id, "clarificationId": clarification_id, "answer": answer });
    let (status, _) = node
        .post_json(
            "/api/wizard/clarifications/respond",
            &again("Lisbon, in May"),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = node
        .post_json("/api/wizard/clarifications/respond", &again("Porto"))
        .await;
    assert_eq!(status, 409);
}

fn millis(timestamp: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(timestamp)
        .unwrap()
        .timestamp_millis()
}

/// The deadline of a question pending at a crash is kept across the restart: it expires
/// when it would have, not a whole timeout after the node came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clarification_pending_at_a_crash_keeps_its_deadline() {
    const TIMEOUT_SECS: i64 = 4;
    const DOWN: Duration = Duration::from_secs(3);
    let fake = FakeLlm::start(FakeBehavior {
        clarify_marker: Some("[ask]".into()),
        ..FakeBehavior::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &[FakeModel {
            name: "asker",
            fake: &fake,
        }],
        &format!("clarification_timeout_secs = {TIMEOUT_SECS}"),
    );
    let (config, data) = (
        config.to_str().unwrap().to_owned(),
        dir.path().join("data").to_str().unwrap().to_owned(),
    );
    let mut node = start("node", &config, &data).await;
    let session_id = create(
        &node,
        json!({ "prompts": ["Go [ask] now"], "models": ["asker"] }),
    )
    .await;
    let (_, asked_at) = pending_clarification(&node, &session_id).await;
    node.kill().await;
    // The node stays down for most of the timeout: that is the scenario, not a wait.
    let down_since = Instant::now();
    tokio::time::sleep(DOWN).await;

    let node = start("node-restarted", &config, &data).await;
    assert!(down_since.elapsed() >= DOWN);
    assert_eq!(ended(&node, &session_id, WAIT).await, "EXPIRED");
    let events = node.history(&session_id).await.unwrap();
    let expired = events
        .iter()
        .find(|e| e["event"] == "clarification" && e["data"]["status"] == "expired")
        .expect("the question expired");
    let waited = millis(expired["data"]["timestamp"].as_str().unwrap()) - millis(&asked_at);
    // Kept: about TIMEOUT_SECS. A fresh timer would give DOWN + restart + TIMEOUT_SECS.
    assert!(
        (TIMEOUT_SECS * 1000 - 200..(TIMEOUT_SECS + 2) * 1000).contains(&waited),
        "expired {waited} ms after it was asked"
    );
    assert_eq!(fake.stats().requests.len(), 1, "the model was asked once");
}

/// SIGTERM with a data dir stops the run without ending it; the restarted node resumes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_leaves_the_run_to_the_restarted_node() {
    let fake = FakeLlm::start(slow(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &[FakeModel {
            name: "steady",
            fake: &fake,
        }],
        "",
    );
    let (config, data) = (
        config.to_str().unwrap().to_owned(),
        dir.path().join("data").to_str().unwrap().to_owned(),
    );
    let mut node = start("node", &config, &data).await;
    let session_id = create(&node, json!({ "prompts": ["gamma"], "models": ["steady"] })).await;
    fake.wait_until("the model streams", WAIT, |s| s.started == 1)
        .await;
    assert!(node.terminate().await.success());

    let node = start("node-restarted", &config, &data).await;
    assert_eq!(ended(&node, &session_id, WAIT * 2).await, "COMPLETED");
    let events = node.history(&session_id).await.unwrap();
    let history = check_history(&session_id, &events);
    assert!(
        !events.iter().any(|e| e["data"]["code"] == "NODE_LOST"),
        "no NODE_LOST: {events:?}"
    );
    assert_eq!(history.starts[&("p1".to_owned(), "steady".to_owned())], 2);
    assert_eq!(fake.stats().requests_for("gamma"), 2);
}
