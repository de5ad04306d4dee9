//! What herald holds per session and in all (SPEC §5, "Bounded everything"), over HTTP and
//! Socket.IO: event size, ended sessions, the session cap with its idle sweep, retention by
//! bytes, and an abuse run of 100,000 one-event sessions against a real herald process.
//! Each limit is set small by flag; each test shows the documented error and that the
//! rest goes on.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::node::Node;
use common::{TestServer, WAIT, progress, spawn_app_with};
use serde_json::{Value, json};

/// The route that starts an orchestrated session.
const CREATE: &str = "/api/wizard/sessions";

/// How long a sweep may take to remove an idle session (idle TTL 1 s, sweeps every 0.5 s).
const SWEPT_WITHIN: Duration = Duration::from_secs(10);

fn progress_item(n: u64) -> Value {
    progress(n)
}

fn padded_item(n: u64, bytes: usize) -> Value {
    json!({ "event": "progress", "data": { "status": "PROCESSING", "progress": 1, "n": n, "pad": "x".repeat(bytes) } })
}

async fn post_with_headers(
    server: &TestServer,
    path: &str,
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = common::harness_http()
        .post(server.url(path))
        .json(body)
        .send()
        .await
        .expect("request sent");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (
        status,
        headers,
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_the_size_limit_is_refused_whole_and_others_keep_flowing() {
    let server = spawn_app_with(|c| c.max_event_bytes = 1_000).await;
    let mut watcher = server.connect().await;
    let ack = watcher.subscribe("sized").await;
    assert_eq!(ack["lastSeq"], 0, "{ack}");

    let batch = json!([progress_item(1), padded_item(2, 2_000)]);
    let (status, body) = server.post_events("sized", &batch).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "EVENT_TOO_LARGE", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("item 1") && message.contains("1000"),
        "the message names the item and the limit: {message}"
    );
    assert_eq!(server.history("sized").await, None, "nothing was logged");

    // The same session and its subscriber go on.
    let (status, body) = server
        .post_events("sized", &json!([progress_item(3), padded_item(4, 900)]))
        .await;
    assert_eq!(status, 202, "{body}");
    let first = watcher.wait_for("progress").await;
    let second = watcher.wait_for("progress").await;
    assert_eq!(
        (first["seq"].clone(), second["seq"].clone()),
        (json!(1), json!(2))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_session_refuses_late_producer_events_unless_reopened() {
    let server = spawn_app_with(|_| {}).await;
    let sid = "ends";
    let mut watcher = server.connect().await;
    watcher.subscribe(sid).await;
    let ending = json!([
        { "event": "progress", "data": progress(1)["data"], "idempotencyKey": "a" },
        { "event": "progress", "data": { "status": "COMPLETED", "progress": 100 }, "idempotencyKey": "b" },
        { "event": "completed", "data": { "result": { "answer": 42 } }, "idempotencyKey": "c" },
    ]);
    let (status, body) = server.post_events(sid, &ending).await;
    assert_eq!(status, 202, "{body}");

    // A retry of the batch that ended it is answered as duplicates.
    let (status, body) = server.post_events(sid, &ending).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        (body["accepted"].clone(), body["duplicates"].clone()),
        (json!(0), json!(3))
    );

    // A late event is refused and the session stays as it ended.
    let (status, body) = server.post_events(sid, &json!(progress_item(9))).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "SESSION_ENDED", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("reopen=true")),
        "the refusal says how to reopen: {body}"
    );
    let (_, snapshot) = server.get(&format!("/api/wizard/session/{sid}")).await;
    assert_eq!(snapshot["status"], "COMPLETED", "{snapshot}");
    assert_eq!(snapshot["lastSeq"], 3, "{snapshot}");

    // A documented reopen takes it, and the session is active again.
    let reopen = json!({ "event": "progress", "data": { "status": "ACTIVE", "progress": 5 } });
    let (status, body) = server
        .post_raw(
            &format!("/api/sessions/{sid}/events?reopen=true"),
            "application/json",
            reopen.to_string(),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["lastSeq"], 4, "{body}");
    let (_, snapshot) = server.get(&format!("/api/wizard/session/{sid}")).await;
    assert_eq!(snapshot["status"], "ACTIVE", "{snapshot}");

    let mut seqs = Vec::new();
    for name in ["progress", "progress", "completed", "progress"] {
        seqs.push(watcher.wait_for(name).await["seq"].clone());
    }
    assert_eq!(
        seqs,
        [1, 2, 3, 4],
        "the subscriber saw each logged event once"
    );
    watcher.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_sessions_over_the_cap_wait_for_the_idle_sweep() {
    let server = spawn_app_with(|c| {
        c.max_sessions = 3;
        c.session_idle_ttl_secs = 1;
    })
    .await;
    for sid in ["cap-1", "cap-2", "cap-3"] {
        let (status, body) = server.post_events(sid, &json!(progress_item(1))).await;
        assert_eq!(status, 202, "{sid}: {body}");
    }
    let (status, headers, body) =
        post_with_headers(&server, "/api/sessions/cap-4/events", &progress_item(1)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "TOO_MANY_SESSIONS", "{body}");
    assert!(
        headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|secs| secs > 0),
        "Retry-After: {headers:?}"
    );
    // An orchestrated session is a session too.
    let (status, body) = server
        .post_json(CREATE, &json!({ "prompts": ["hi"] }))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "TOO_MANY_SESSIONS", "{body}");
    // Sessions already held still take events.
    let (status, body) = server.post_events("cap-2", &json!(progress_item(2))).await;
    assert_eq!(status, 202, "{body}");

    // Once they have been idle for the idle TTL they are swept, and new sessions fit.
    let started = Instant::now();
    loop {
        let (_, list) = server.get("/api/wizard/sessions").await;
        if list["sessions"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(
            started.elapsed() < SWEPT_WITHIN,
            "idle sessions still listed: {list}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        server.history("cap-1").await,
        None,
        "the log went with the session"
    );
    let (status, body) = server.post_events("cap-4", &json!(progress_item(1))).await;
    assert_eq!(status, 202, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_bytes_keeps_the_newest_and_replay_says_when_it_cannot_resume() {
    let server = spawn_app_with(|c| c.max_session_bytes = 4_000).await;
    let sid = "bytes";
    let batch: Vec<Value> = (1..=30).map(|n| padded_item(n, 500)).collect();
    let (status, body) = server.post_events(sid, &json!(batch)).await;
    assert_eq!(status, 202, "{body}");
    let history = server.history(sid).await.expect("a history");
    let bytes: usize = history.iter().map(|e| e.to_string().len()).sum();
    assert!(bytes <= 4_000, "{bytes} bytes retained");
    let seqs: Vec<u64> = history.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs.last(), Some(&30), "{seqs:?}");
    let first = seqs[0];
    assert!(first > 1, "the oldest went: {seqs:?}");
    assert_eq!(seqs, (first..=30).collect::<Vec<_>>(), "contiguous");

    // A client behind what is retained is told it must resync; one within it resumes.
    let mut behind = server.connect().await;
    let ack = behind
        .call("subscribe", &json!({ "sessionId": sid, "lastSeq": 1 }))
        .await;
    assert_eq!(ack["recovered"], false, "{ack}");
    let mut within = server.connect().await;
    let ack = within
        .call("subscribe", &json!({ "sessionId": sid, "lastSeq": first }))
        .await;
    assert_eq!(ack["recovered"], true, "{ack}");
    let next = within.wait_for("progress").await;
    assert_eq!(next["seq"], first + 1);
}

/// 100,000 one-event sessions against a real herald holding at most 2,000: the count stays
/// at the cap, every refusal is the documented one, and the server's memory after the
/// first 10,000 is what it is after all 100,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abuse_run_of_100k_sessions_is_capped_and_memory_stays_flat() {
    const SESSIONS: u64 = 100_000;
    const CAP: u64 = 2_000;
    const WARM_UP: u64 = 10_000;
    const CONCURRENCY: u64 = 16;
    let node = Node::start("abuse", &["--max-sessions", &CAP.to_string()]).await;
    let http = common::harness_http_builder()
        .pool_max_idle_per_host(CONCURRENCY as usize)
        .timeout(WAIT)
        .build()
        .unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let body = json!(progress_item(1)).to_string();
    let node = Arc::new(node);

    let run = |from: u64, to: u64| {
        let tasks: Vec<_> = (0..CONCURRENCY)
            .map(|worker| {
                let (http, node, body) = (http.clone(), node.clone(), body.clone());
                let (accepted, refused) = (accepted.clone(), refused.clone());
                tokio::spawn(async move {
                    let mut n = from + worker;
                    while n < to {
                        let response = http
                            .post(node.url(&format!("/api/sessions/abuse-{n}/events")))
                            .header("content-type", "application/json")
                            .body(body.clone())
                            .send()
                            .await
                            .expect("herald answers");
                        match response.status().as_u16() {
                            202 => accepted.fetch_add(1, Ordering::Relaxed),
                            503 => {
                                let reply: Value = response.json().await.unwrap();
                                assert_eq!(reply["error"]["code"], "TOO_MANY_SESSIONS", "{reply}");
                                refused.fetch_add(1, Ordering::Relaxed)
                            }
                            other => panic!("session {n}: {other}"),
                        };
                        n += CONCURRENCY;
                    }
                })
            })
            .collect();
        futures_util::future::join_all(tasks)
    };
    for task in run(0, WARM_UP).await {
        task.unwrap();
    }
    let warm_rss = node.rss_kib();
    for task in run(WARM_UP, SESSIONS).await {
        task.unwrap();
    }
    let end_rss = node.rss_kib();
    eprintln!(
        "abuse run: RSS {warm_rss} KiB after {WARM_UP} sessions, {end_rss} KiB after {SESSIONS}"
    );

    assert_eq!(accepted.load(Ordering::Relaxed), CAP);
    assert_eq!(refused.load(Ordering::Relaxed), SESSIONS - CAP);
    let (status, list) = node.get("/api/wizard/sessions").await;
    assert_eq!(status, 200);
    assert_eq!(
        list["sessions"].as_array().map(Vec::len),
        Some(CAP as usize)
    );
    // 90,000 refused sessions may not cost memory: allow 8 MiB of allocator noise.
    assert!(
        end_rss <= warm_rss + 8 * 1024,
        "RSS grew from {warm_rss} KiB after {WARM_UP} sessions to {end_rss} KiB after {SESSIONS}"
    );
    let (status, health) = node.get("/healthz").await;
    assert_eq!(status, 200, "{health}");
}
