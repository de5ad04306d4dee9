//! A rolling restart (SPEC §7): three nodes on one Redis, each stopped with SIGTERM and
//! replaced in turn while 20 orchestrated sessions run. Every session completes, none ends
//! `NODE_LOST`, and no unit is billed twice unless it was interrupted: the fake provider's
//! request count for each unit is at most the number of times its history says it started.

mod common;

use std::time::Duration;

use common::WAIT;
use common::fake_llm::{FakeBehavior, FakeLlm};
use common::node::Node;
use common::redis::RedisServer;
use common::runs::{FakeModel, check_history, ended, write_config};
use serde_json::json;

const SESSIONS: usize = 20;
const MODELS: [&str; 2] = ["north", "south"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node_completes_every_run_and_bills_only_interrupted_units() {
    // About 3 s per reply: runs are in flight through every restart.
    let fake = FakeLlm::start(FakeBehavior {
        tokens: 30,
        token_delay: Duration::from_millis(100),
        ..FakeBehavior::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &MODELS.map(|name| FakeModel { name, fake: &fake }),
        "update_interval_ms = 250",
    );
    let redis = RedisServer::start().await;
    let url = redis.url();
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--redis-url",
        url.as_str(),
        "--redis-prefix",
        "rolling",
        "--cluster-lease-ms",
        "3000",
    ];
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(Node::start(&format!("node-{i}"), &args).await);
    }
    let mut sessions = Vec::new();
    for i in 0..SESSIONS {
        let node = &nodes[i % nodes.len()];
        let prompt = format!("job {i}");
        let (status, created) = node
            .post_json(
                "/api/wizard/sessions",
                &json!({ "prompts": [{ "id": "job", "text": prompt }], "models": MODELS }),
            )
            .await;
        assert_eq!(status, 201, "{created}");
        sessions.push((created["sessionId"].as_str().unwrap().to_owned(), prompt));
    }
    fake.wait_until("every unit streams", WAIT, |s| {
        s.started >= SESSIONS * MODELS.len()
    })
    .await;

    // Restart each node in turn; the next goes once the replacement is up and every unit
    // not yet done streams again. Which node holds which run after a hand-over is up to
    // the nodes, so a later node may hold none by the time it is stopped: the test does
    // not expect each restart to interrupt something, only some of them (checked below).
    let units = SESSIONS * MODELS.len();
    for (i, node) in nodes.iter_mut().enumerate() {
        let exit = node.terminate().await;
        assert!(exit.success(), "node-{i}: {exit:?}: {}", node.stderr_tail());
        *node = Node::start(&format!("node-{i}-new"), &args).await;
        fake.wait_until("every unit not done streams again", WAIT, |s| {
            s.in_flight + s.finished >= units
        })
        .await;
    }

    let mut interrupted = 0;
    for (session_id, prompt) in &sessions {
        let status = ended(&nodes[0], session_id, WAIT * 6).await;
        let events = nodes[0].history(session_id).await.unwrap();
        assert!(
            !events.iter().any(|e| e["data"]["code"] == "NODE_LOST"),
            "{session_id}: NODE_LOST: {events:?}"
        );
        assert_eq!(status, "COMPLETED", "{session_id}: {events:?}");
        let history = check_history(session_id, &events);
        let stats = fake.stats();
        for model in MODELS {
            let starts = history.starts[&("job".to_owned(), model.to_owned())];
            let billed = stats.requests_for_model(model, prompt);
            // A unit stopped between its start and its request is asked less often than it
            // started; never more.
            assert!(
                billed >= 1 && billed as u64 <= starts,
                "{session_id}: {model} was asked {billed} times and started {starts} times"
            );
            interrupted += usize::from(starts > 1);
        }
    }
    // Each restart stopped the units its node ran (a third of them, at first).
    assert!(
        interrupted > 0,
        "no unit was interrupted: the test proves nothing"
    );
    eprintln!("{interrupted} of {units} units were interrupted and resumed");
}
