//! Redis outages (SPEC §5: "While Redis is unreachable, HTTP answers 503
//! `BACKEND_UNAVAILABLE` and subscribe gets `error { code: "BACKEND_UNAVAILABLE" }`; nothing
//! is half-logged, nothing is dropped that was acknowledged").
//!
//! Real herald processes on a real, persistent `redis-server` (an append-only file fsynced
//! on every write, so a restart comes back with what Redis acknowledged): the server is
//! killed mid-run and started again on the same port.

mod common;

use std::time::{Duration, Instant};

use common::node::Node;
use common::redis::RedisServer;
use reqwest::Method;
use serde_json::{Value, json};

/// The most any request may take to be refused while Redis is down: the node's Redis
/// connect (1 s) and reply (3 s) timeouts, one retry over a new link, and slack for a busy
/// machine.
const REFUSED_WITHIN: Duration = Duration::from_secs(9);
/// How long a test waits for something that should happen once Redis is back.
const RECOVERS_WITHIN: Duration = Duration::from_secs(30);
/// The nodes' lease: the outages below last longer, so a node that judged others by the
/// time it could not see them would declare them lost.
const LEASE_MS: &str = "1500";

fn unique(name: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{name}-{}", &id[..12])
}

async fn start_node(name: &str, redis: &RedisServer, prefix: &str, extra: &[&str]) -> Node {
    let url = redis.url();
    let mut args = vec![
        "--redis-url",
        &url,
        "--redis-prefix",
        prefix,
        "--cluster-lease-ms",
        LEASE_MS,
    ];
    args.extend_from_slice(extra);
    let node = Node::start(name, &args).await;
    wait_ready(&node, 200).await;
    node
}

/// Polls `/readyz` until it answers `want`.
async fn wait_ready(node: &Node, want: u16) {
    until(
        &format!("{} answers {want} on /readyz", node.name),
        || async {
            node.try_request(Method::GET, "/readyz", None)
                .await
                .is_ok_and(|(status, _)| status == want)
        },
    )
    .await;
}

/// Polls `check` until it holds, failing after [`RECOVERS_WITHIN`].
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    poll(what, || {
        let checked = check();
        async move { checked.await.then_some(()) }
    })
    .await
}

/// Polls `find` until it finds something, failing after [`RECOVERS_WITHIN`].
async fn poll<T, F, Fut>(what: &str, mut find: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(found) = find().await {
            return found;
        }
        assert!(started.elapsed() < RECOVERS_WITHIN, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn create(node: &Node, prompt: &str, model: &str) -> String {
    let body = json!({ "prompts": [prompt], "models": [model] });
    let (status, reply) = node.post_json("/api/wizard/sessions", &body).await;
    assert_eq!(status, 201, "{}: create: {reply}", node.name);
    reply["sessionId"].as_str().unwrap().to_owned()
}

/// The id of the session's pending clarification, once it has one.
async fn pending_clarification(node: &Node, session_id: &str) -> String {
    poll("a pending clarification", || async {
        let snapshot = node.snapshot(session_id).await?;
        snapshot["clarifications"]
            .as_array()?
            .iter()
            .find(|c| c["status"] == "pending")
            .map(|c| c["clarificationId"].as_str().unwrap().to_owned())
    })
    .await
}

async fn wait_status(node: &Node, session_id: &str, status: &str) -> Value {
    poll(&format!("{session_id} is {status}"), || async {
        let snapshot = node.snapshot(session_id).await?;
        (snapshot["status"] == status).then_some(snapshot)
    })
    .await
}

/// The session's retained events; asserts their seqs are 1, 2, … with no gap or repeat.
async fn contiguous_history(node: &Node, session_id: &str) -> Vec<Value> {
    let events = node.history(session_id).await.expect("the session exists");
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    let want: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, want, "{session_id}: the log has a gap or a repeat");
    events
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect()
}

/// A request during the outage: refused 503 with `want` as its code, within
/// [`REFUSED_WITHIN`], without the backend's own text.
async fn assert_refused(node: &Node, method: Method, path: &str, body: Option<Value>, want: &str) {
    let started = Instant::now();
    let reply = node.try_request(method.clone(), path, body.as_ref()).await;
    let took = started.elapsed();
    let (status, body) = reply.unwrap_or_else(|e| panic!("no answer while Redis is down: {e}"));
    assert_eq!(status, 503, "{} {method} {path}: {body}", node.name);
    assert_eq!(
        body["error"]["code"], want,
        "{} {method} {path}: {body}",
        node.name
    );
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        !message.contains("127.0.0.1") && !message.to_lowercase().contains("redis:"),
        "backend text reached the client: {message}"
    );
    assert!(
        took < REFUSED_WITHIN,
        "{} {method} {path} took {took:?} to be refused",
        node.name
    );
}

/// Every way in during an outage, on both nodes: each is refused in bounded time; then
/// Redis comes back with what it had acknowledged, and so does everything else: the acked
/// events, a run that was streaming (it resumes and completes, logged once), a run paused
/// on a clarification (still answerable), and both nodes (neither declared the other lost
/// although the outage outlasted their lease several times).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_refuses_every_request_in_bounded_time_and_costs_nothing() {
    let mut redis = RedisServer::start_persistent().await;
    let prefix = unique("outage");
    let a = start_node(
        "node-a",
        &redis,
        &prefix,
        &["--run-log-deadline-secs", "120"],
    )
    .await;
    let b = start_node(
        "node-b",
        &redis,
        &prefix,
        &["--run-log-deadline-secs", "120"],
    )
    .await;

    let fed = unique("fed");
    let items: Vec<Value> = (1..=10).map(common::progress).collect();
    let (status, reply) = a.post_events(&fed, &json!(items)).await;
    assert_eq!(status, 202, "{reply}");
    // sim-slow streams 30 words a second: this run streams for several seconds and is
    // still streaming when Redis goes.
    let long_prompt = format!("Describe {}", ["the slow careful plan"; 40].join(", "));
    let streaming = create(&a, &long_prompt, "sim-slow").await;
    let paused = create(&a, "Plan a trip [clarify]", "sim-fast").await;
    let question = pending_clarification(&a, &paused).await;
    until("the run streams", || async {
        a.history(&streaming)
            .await
            .unwrap_or_default()
            .iter()
            .any(|e| e["event"] == "model_result" && e["data"]["result"].as_str() != Some(""))
    })
    .await;

    redis.stop();
    for node in [&a, &b] {
        wait_ready(node, 503).await;
        let fresh = unique("fresh");
        let session = format!("/api/wizard/session/{fed}");
        let refusals: [(Method, String, Option<Value>); 7] = [
            (Method::GET, session.clone(), None),
            (Method::GET, format!("{session}/events?after=0"), None),
            (Method::GET, "/api/wizard/sessions".into(), None),
            (
                Method::POST,
                format!("/api/sessions/{fresh}/events"),
                Some(json!([common::progress(1)])),
            ),
            (
                Method::POST,
                "/api/wizard/sessions".into(),
                Some(json!({ "prompts": ["hello"], "models": ["sim-fast"] })),
            ),
            (
                Method::POST,
                "/api/wizard/clarifications/respond".into(),
                Some(json!({ "sessionId": paused, "clarificationId": question, "answer": "Rome" })),
            ),
            (
                Method::POST,
                format!("/api/wizard/session/{streaming}/cancel"),
                Some(json!({})),
            ),
        ];
        for (method, path, body) in refusals {
            assert_refused(node, method, &path, body, "BACKEND_UNAVAILABLE").await;
        }
        let mut client = node.connect().await;
        let ack = client
            .call("subscribe", &json!({ "sessionId": fed, "lastSeq": 0 }))
            .await;
        assert_eq!(ack["ok"], false, "{}: {ack}", node.name);
        assert_eq!(ack["error"]["code"], "BACKEND_UNAVAILABLE", "{ack}");
    }

    redis.restart().await;
    for node in [&a, &b] {
        wait_ready(node, 200).await;
    }

    // What was acknowledged before the outage is all there, once.
    let fed_log = contiguous_history(&b, &fed).await;
    assert_eq!(fed_log.len(), 10, "{fed_log:?}");
    // The streaming run waited out the outage and completed, every event logged once.
    wait_status(&b, &streaming, "COMPLETED").await;
    let log = contiguous_history(&b, &streaming).await;
    let ends = kinds(&log);
    assert_eq!(ends.last(), Some(&"completed"), "{ends:?}");
    assert!(!ends.contains(&"error"), "{log:?}");
    // The paused run's question outlived the outage: answered now, from the other node.
    // Readiness says Redis answers one probe; the connection that serves the answer may
    // still be reconnecting for a moment, and says so with a 503 the caller may retry.
    let body = json!({ "sessionId": paused, "clarificationId": question, "answer": "Rome" });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (status, reply) = loop {
        let (status, reply) = b
            .post_json("/api/wizard/clarifications/respond", &body)
            .await;
        let retry = status == 503
            && reply["error"]["code"] == "BACKEND_UNAVAILABLE"
            && std::time::Instant::now() < deadline;
        if !retry {
            break (status, reply);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(status, 200, "{reply}");
    wait_status(&a, &paused, "COMPLETED").await;
    // Nobody was declared lost.
    for node in [&a, &b] {
        let logs = node.stderr_tail();
        assert!(!logs.contains("NODE_LOST"), "{}:\n{logs}", node.name);
        assert!(!logs.contains("was lost"), "{}:\n{logs}", node.name);
    }
}

/// A run whose log stays unreachable past `--run-log-deadline-secs` stops its models and,
/// as soon as the log is back, logs every event it held and ends `FAILED` with
/// `error { code: "BACKEND_UNAVAILABLE" }`: never a run that silently drops its events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_cannot_log_past_its_deadline_fails_visibly_once_the_log_is_back() {
    let mut redis = RedisServer::start_persistent().await;
    let prefix = unique("deadline");
    let node = start_node("node", &redis, &prefix, &["--run-log-deadline-secs", "2"]).await;
    let long_prompt = format!("Describe {}", ["the slow careful plan"; 40].join(", "));
    let id = create(&node, &long_prompt, "sim-slow").await;
    let paused = create(&node, "Plan a trip [clarify]", "sim-fast").await;
    let question = pending_clarification(&node, &paused).await;
    until("the run streams", || async {
        node.history(&id)
            .await
            .unwrap_or_default()
            .iter()
            .any(|e| e["event"] == "model_result" && e["data"]["result"].as_str() != Some(""))
    })
    .await;
    let before = contiguous_history(&node, &id).await.len();

    redis.stop();
    until("the run gives up on its deadline", || async {
        node.stderr_tail()
            .contains("could not log the run's events in time")
    })
    .await;
    // A stopped run answers for itself, at once.
    let cancel = format!("/api/wizard/session/{id}/cancel");
    assert_refused(
        &node,
        Method::POST,
        &cancel,
        Some(json!({})),
        "BACKEND_UNAVAILABLE",
    )
    .await;
    redis.restart().await;
    wait_ready(&node, 200).await;

    let snapshot = wait_status(&node, &id, "FAILED").await;
    let log = contiguous_history(&node, &id).await;
    assert!(log.len() > before, "the held events were logged: {log:?}");
    let names = kinds(&log);
    assert!(!names.contains(&"completed"), "{names:?}");
    assert_eq!(
        names.iter().filter(|n| **n == "error").count(),
        1,
        "{names:?}"
    );
    let last = log.last().unwrap();
    assert_eq!(last["event"], "error", "{last}");
    assert_eq!(last["data"]["code"], "BACKEND_UNAVAILABLE", "{last}");
    assert_eq!(snapshot["lastSeq"], log.len() as u64, "{snapshot}");
    // The paused session had nothing to log meanwhile: it never noticed, and goes on.
    let body = json!({ "sessionId": paused, "clarificationId": question, "answer": "Rome" });
    let (status, reply) = node
        .post_json("/api/wizard/clarifications/respond", &body)
        .await;
    assert_eq!(status, 200, "{reply}");
    wait_status(&node, &paused, "COMPLETED").await;
}
