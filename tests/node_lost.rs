//! A node running orchestrated sessions dies (SIGKILL): within the lease another node ends
//! its sessions `FAILED` with `code: NODE_LOST`, so none hangs; producer-fed sessions on
//! the dead node's Redis are untouched.

mod common;

use std::time::Duration;

use common::node::Node;
use common::progress;
use common::redis::RedisServer;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_a_killed_node_end_node_lost_within_the_lease() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let args = ["--redis-url", url.as_str(), "--redis-prefix", "node-lost"];
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

    // The lease is 10 s; the survivor checks every few seconds.
    let error = client
        .wait_for_within("error", Duration::from_secs(25))
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
