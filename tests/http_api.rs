//! The HTTP surface of SPEC §2: ingest, snapshot, list, history, health; every bad input
//! answered with the right status and code, and nothing logged.

mod common;

use std::time::Duration;

use common::{TestServer, progress, spawn_app, spawn_app_with};
use serde_json::{Value, json};

async fn assert_nothing_logged(app: &TestServer, session_id: &str) {
    assert_eq!(
        app.history(session_id).await,
        None,
        "{session_id} must have no log"
    );
    let (status, _) = app.get(&format!("/api/wizard/session/{session_id}")).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn ingest_rejects_bad_input_with_codes_and_logs_nothing() {
    let app = spawn_app_with(|c| c.max_batch = 3).await;
    let good = progress(1);
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        ("not an object", json!("progress"), 400, "INVALID_EVENT"),
        (
            "item given as an array",
            json!([["progress", { "status": "ACTIVE", "progress": 1 }]]),
            400,
            "INVALID_EVENT",
        ),
        ("empty batch", json!([]), 400, "EMPTY_BATCH"),
        (
            "batch over the limit",
            json!([good, good, good, good]),
            400,
            "BATCH_TOO_LARGE",
        ),
        (
            "unknown event",
            json!({ "event": "progres", "data": {} }),
            400,
            "INVALID_EVENT",
        ),
        (
            "event not a string",
            json!({ "event": 1, "data": {} }),
            400,
            "INVALID_EVENT",
        ),
        (
            "missing data",
            json!({ "event": "progress" }),
            400,
            "INVALID_EVENT",
        ),
        (
            "unknown top-level field",
            json!({ "event": "progress", "data": {}, "extra": 1 }),
            400,
            "INVALID_EVENT",
        ),
        (
            "data not an object",
            json!({ "event": "progress", "data": [1] }),
            400,
            "INVALID_EVENT",
        ),
        (
            "progress without status",
            json!({ "event": "progress", "data": { "progress": 1 } }),
            400,
            "INVALID_EVENT",
        ),
        (
            "progress over 100",
            json!({ "event": "progress", "data": { "status": "ACTIVE", "progress": 101 } }),
            400,
            "INVALID_EVENT",
        ),
        (
            "progress below 0",
            json!({ "event": "progress", "data": { "status": "ACTIVE", "progress": -1 } }),
            400,
            "INVALID_EVENT",
        ),
        (
            "bad status",
            json!({ "event": "progress", "data": { "status": "DONE", "progress": 1 } }),
            400,
            "INVALID_EVENT",
        ),
        (
            "bad prompt count",
            json!({ "event": "progress", "data": { "status": "ACTIVE", "progress": 1, "prompts": { "total": "2" } } }),
            400,
            "INVALID_EVENT",
        ),
        (
            "model_result without modelName",
            json!({ "event": "model_result", "data": { "promptId": "p", "status": "completed" } }),
            400,
            "INVALID_EVENT",
        ),
        (
            "model_result bad status",
            json!({ "event": "model_result", "data": { "promptId": "p", "modelName": "m", "status": "done" } }),
            400,
            "INVALID_EVENT",
        ),
        (
            "model_result result not a string",
            json!({ "event": "model_result", "data": { "promptId": "p", "modelName": "m", "status": "completed", "result": 5 } }),
            400,
            "INVALID_EVENT",
        ),
        (
            "clarification without question",
            json!({ "event": "clarification", "data": { "clarificationId": "c", "status": "pending" } }),
            400,
            "INVALID_EVENT",
        ),
        (
            "completed without result",
            json!({ "event": "completed", "data": {} }),
            400,
            "INVALID_EVENT",
        ),
        (
            "error without message",
            json!({ "event": "error", "data": { "code": "X" } }),
            400,
            "INVALID_EVENT",
        ),
        (
            "sessionId mismatch",
            json!({ "event": "error", "data": { "error": "x", "sessionId": "other" } }),
            400,
            "INVALID_EVENT",
        ),
        (
            "timestamp not a string",
            json!({ "event": "error", "data": { "error": "x", "timestamp": 5 } }),
            400,
            "INVALID_EVENT",
        ),
        (
            "empty idempotency key",
            json!({ "event": "error", "data": { "error": "x" }, "idempotencyKey": "" }),
            400,
            "INVALID_EVENT",
        ),
        (
            "bad last item spoils the batch",
            json!([good, good, { "event": "completed", "data": {} }]),
            400,
            "INVALID_EVENT",
        ),
    ];
    for (i, (what, body, status, code)) in cases.into_iter().enumerate() {
        let session_id = format!("bad-{i}");
        let (got, reply) = app.post_events(&session_id, &body).await;
        assert_eq!(got, status, "{what}: {reply}");
        assert_eq!(reply["error"]["code"], code, "{what}: {reply}");
        assert!(
            reply["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}"
        );
        assert_nothing_logged(&app, &session_id).await;
    }

    let (status, reply) = app
        .post_raw(
            "/api/sessions/raw-1/events",
            "application/json",
            "{ nope".into(),
        )
        .await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (400, Some("INVALID_JSON"))
    );
    let (status, reply) = app
        .post_raw("/api/sessions/raw-2/events", "text/plain", good.to_string())
        .await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (415, Some("UNSUPPORTED_MEDIA_TYPE"))
    );
    let (status, reply) = app.post_events("bad%20id", &good).await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (400, Some("INVALID_SESSION_ID"))
    );
    let (status, reply) = app.post_events(&"a".repeat(129), &good).await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (400, Some("INVALID_SESSION_ID"))
    );
    for id in ["raw-1", "raw-2"] {
        assert_nothing_logged(&app, id).await;
    }
    let (_, sessions) = app.get("/api/wizard/sessions").await;
    assert_eq!(
        sessions["sessions"],
        json!([]),
        "no bad request created a session"
    );
}

/// herald's own idempotency keys (`herald:…`) are not the producers' to write: an item
/// carrying one is refused, and so is its whole batch.
#[tokio::test]
async fn ingest_refuses_idempotency_keys_in_herald_s_namespace() {
    let app = spawn_app().await;
    let reserved = json!({
        "event": "progress",
        "data": { "status": "ACTIVE", "progress": 1 },
        "idempotencyKey": "herald:ingest:1-0",
    });
    for (what, body) in [
        ("one item", reserved.clone()),
        ("second item of a batch", json!([progress(1), reserved])),
    ] {
        let (status, reply) = app.post_events("reserved-key", &body).await;
        assert_eq!(status, 400, "{what}: {reply}");
        assert_eq!(
            reply["error"]["code"], "RESERVED_IDEMPOTENCY_KEY",
            "{what}: {reply}"
        );
        assert_nothing_logged(&app, "reserved-key").await;
    }
    // Only the namespace is reserved: a key that merely starts with "herald" is the producer's.
    let mut own = progress(1);
    own["idempotencyKey"] = json!("heraldic:1");
    let (status, reply) = app.post_events("own-key", &own).await;
    assert_eq!(status, 202, "{reply}");
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let app = spawn_app_with(|c| c.max_body = 1024).await;
    let big = json!({ "event": "error", "data": { "error": "x".repeat(2048) } });
    let (status, reply) = app.post_events("big-body", &big).await;
    assert_eq!(status, 413, "{reply}");
    assert_eq!(reply["error"]["code"], "PAYLOAD_TOO_LARGE");
    assert_nothing_logged(&app, "big-body").await;
}

#[tokio::test]
async fn read_routes_reject_bad_input() {
    let app = spawn_app().await;
    app.post_events("read-1", &progress(1)).await;
    let cases: Vec<(&str, u16, &str)> = vec![
        ("/api/wizard/session/unknown-1", 404, "SESSION_NOT_FOUND"),
        ("/api/wizard/session/bad%20id", 400, "INVALID_SESSION_ID"),
        (
            "/api/wizard/session/unknown-1/events",
            404,
            "SESSION_NOT_FOUND",
        ),
        (
            "/api/wizard/session/bad%20id/events",
            400,
            "INVALID_SESSION_ID",
        ),
        (
            "/api/wizard/session/read-1/events?after=-1",
            400,
            "INVALID_QUERY",
        ),
        (
            "/api/wizard/session/read-1/events?after=abc",
            400,
            "INVALID_QUERY",
        ),
        (
            "/api/wizard/session/read-1/events?limit=0",
            400,
            "INVALID_QUERY",
        ),
        ("/api/wizard/sessions?status=BOGUS", 400, "INVALID_QUERY"),
        ("/api/nothing-here", 404, "NOT_FOUND"),
    ];
    for (path, status, code) in cases {
        let (got, reply) = app.get(path).await;
        assert_eq!(
            (got, reply["error"]["code"].as_str()),
            (status, Some(code)),
            "{path}: {reply}"
        );
    }
    let (status, reply) = app
        .post_raw("/healthz", "application/json", "{}".into())
        .await;
    assert_eq!(status, 405, "{reply}");
}

#[tokio::test]
async fn snapshot_folds_the_events() {
    let app = spawn_app().await;
    let events = json!([
        { "event": "progress", "data": { "status": "PROCESSING", "progress": 25,
            "prompts": { "total": 2, "completed": 0, "processing": 2, "pending": 0, "failed": 0 } } },
        { "event": "model_result", "data": { "promptId": "p1", "modelName": "m1", "status": "processing", "result": "Hel" } },
        { "event": "model_result", "data": { "promptId": "p1", "modelName": "m1", "status": "completed", "result": "Hello" } },
        { "event": "model_result", "data": { "promptId": "p2", "modelName": "m1", "status": "processing", "result": "" } },
        { "event": "clarification", "data": { "clarificationId": "c1", "question": "Which?", "status": "pending" } },
        { "event": "clarification", "data": { "clarificationId": "c2", "question": "Where?", "status": "pending" } },
        { "event": "clarification", "data": { "clarificationId": "c1", "question": "Which?", "status": "answered", "answer": "This" } },
    ]);
    app.post_events("fold-1", &events).await;
    let (status, snap) = app.get("/api/wizard/session/fold-1").await;
    assert_eq!(status, 200);
    assert_eq!(snap["sessionId"], "fold-1");
    assert_eq!(snap["status"], "PROCESSING");
    assert_eq!(snap["progress"], 25.0);
    assert_eq!(snap["prompts"]["processing"], 2);
    assert_eq!(snap["lastSeq"], 7);
    assert_eq!(snap["clarificationCount"], 1);
    assert_eq!(snap["hasClarifications"], true);
    assert_eq!(snap["clarifications"][0]["status"], "answered");
    assert_eq!(snap["clarifications"][0]["answer"], "This");
    assert_eq!(snap["clarifications"][1]["status"], "pending");
    let results = snap["modelResults"].as_array().unwrap();
    assert_eq!(results.len(), 2, "latest per prompt and model");
    assert_eq!(results[0]["result"], "Hello");
    assert!(common::is_timestamp(&snap["createdAt"]) && common::is_timestamp(&snap["updatedAt"]));

    app.post_events(
        "fold-1",
        &json!({ "event": "completed", "data": { "result": { "p1": "Hello" } } }),
    )
    .await;
    app.post_events(
        "fold-2",
        &json!({ "event": "error", "data": { "error": "boom", "code": "X" } }),
    )
    .await;
    let (_, snap) = app.get("/api/wizard/session/fold-1").await;
    assert_eq!(
        (snap["status"].as_str(), snap["progress"].as_f64()),
        (Some("COMPLETED"), Some(100.0))
    );
    assert_eq!(snap["result"], json!({ "p1": "Hello" }));
    let (_, failed) = app.get("/api/wizard/sessions?status=FAILED").await;
    let ids: Vec<&str> = failed["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sessionId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["fold-2"]);
    let (_, all) = app.get("/api/wizard/sessions").await;
    assert_eq!(all["sessions"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn history_pages_through_the_log() {
    let app = spawn_app().await;
    let events: Vec<Value> = (1..=25).map(progress).collect();
    app.post_events("page-1", &json!(events)).await;
    let (_, page) = app
        .get("/api/wizard/session/page-1/events?after=10&limit=10")
        .await;
    let seqs: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (11..=20).collect::<Vec<_>>());
    assert_eq!(page["events"][0]["event"], "progress");
    assert_eq!(page["events"][0]["data"]["seq"], 11);
    assert_eq!(page["lastSeq"], 25);
    assert_eq!(page["hasMore"], true);
    assert_eq!(page["truncated"], false);
    let (_, tail) = app.get("/api/wizard/session/page-1/events?after=20").await;
    assert_eq!(tail["events"].as_array().unwrap().len(), 5);
    assert_eq!(tail["hasMore"], false);
}

#[tokio::test]
async fn idempotency_keys_log_an_event_once() {
    let app = spawn_app().await;
    let item = json!({ "event": "progress", "data": { "status": "ACTIVE", "progress": 1 }, "idempotencyKey": "job-7:page-1" });
    let (status, first) = app.post_events("idem-1", &item).await;
    assert_eq!(
        (
            status,
            first["accepted"].as_u64(),
            first["duplicates"].as_u64()
        ),
        (202, Some(1), Some(0))
    );
    let (status, again) = app.post_events("idem-1", &item).await;
    assert_eq!(status, 202);
    assert_eq!(again["accepted"], 0);
    assert_eq!(again["duplicates"], 1);
    assert_eq!(
        again["seqs"],
        json!([1]),
        "the duplicate reports the seq it first got"
    );
    // Inside one batch, and mixed with new events.
    let batch = json!([item, progress(2), { "event": "progress", "data": { "status": "ACTIVE", "progress": 3 }, "idempotencyKey": "k2" },
        { "event": "progress", "data": { "status": "ACTIVE", "progress": 3 }, "idempotencyKey": "k2" }]);
    let (_, reply) = app.post_events("idem-1", &batch).await;
    assert_eq!(reply["accepted"], 2);
    assert_eq!(reply["duplicates"], 2);
    assert_eq!(reply["seqs"], json!([1, 2, 3, 3]));
    assert_eq!(app.history("idem-1").await.unwrap().len(), 3);
    // Keys are per session.
    let (_, other) = app.post_events("idem-2", &item).await;
    assert_eq!(other["accepted"], 1);
}

#[tokio::test]
async fn ended_sessions_are_dropped_after_their_ttl_and_come_back_with_a_new_epoch() {
    let app = spawn_app_with(|c| c.session_ttl_secs = 0).await;
    app.post_events("ttl-1", &progress(1)).await;
    let (_, before) = app.get("/api/wizard/session/ttl-1").await;
    app.post_events(
        "ttl-2",
        &json!({ "event": "completed", "data": { "result": {} } }),
    )
    .await;
    // Poll (bounded) until the sweeper has dropped the ended session.
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while app.get("/api/wizard/session/ttl-2").await.0 != 404 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ended session never dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.history("ttl-2").await, None);
    // A running session is kept.
    let (status, after) = app.get("/api/wizard/session/ttl-1").await;
    assert_eq!(status, 200);
    assert_eq!(before["epoch"], after["epoch"]);
    // Reusing the id starts a new log with a new epoch and seq 1.
    let (_, reply) = app.post_events("ttl-2", &progress(1)).await;
    assert_eq!(reply["lastSeq"], 1);
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let app = spawn_app().await;
    assert_eq!(app.get("/healthz").await, (200, json!({ "status": "ok" })));
    assert_eq!(
        app.get("/readyz").await,
        (200, json!({ "status": "ready" }))
    );
    app.post_events("metrics-1", &json!([progress(1), progress(2)]))
        .await;
    let text = reqwest::get(app.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("# TYPE herald_events_logged_total counter"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l == "herald_events_logged_total 2"),
        "{text}"
    );
}

async fn history_after(app: &TestServer, after: &str) -> (u16, Value) {
    app.get(&format!("/api/wizard/session/after-1/events?after={after}"))
        .await
}

#[tokio::test]
async fn history_after_the_newest_seq_is_not_truncated() {
    let app = spawn_app_with(|c| c.max_events_per_session = 5).await;
    let events: Vec<Value> = (1..=8).map(progress).collect();
    app.post_events("after-1", &json!(events)).await;
    // `after + 1` would wrap (release) or panic (debug) here.
    let (status, reply) = history_after(&app, "18446744073709551615").await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        (&reply["truncated"], &reply["hasMore"], &reply["events"]),
        (&json!(false), &json!(false), &json!([])),
        "{reply}"
    );
    // Only seq 4..=8 are retained: after=3 is whole, after=2 misses seq 3.
    let (_, whole) = history_after(&app, "3").await;
    assert_eq!(
        (&whole["firstSeq"], &whole["truncated"]),
        (&json!(4), &json!(false)),
        "{whole}"
    );
    assert_eq!(whole["events"].as_array().unwrap().len(), 5);
    let (_, gap) = history_after(&app, "2").await;
    assert_eq!(gap["truncated"], true, "{gap}");
}

#[tokio::test]
async fn bad_paths_and_queries_get_the_json_error_shape() {
    let app = spawn_app().await;
    app.post_events("shape-1", &progress(1)).await;
    let gets: Vec<(&str, &str)> = vec![
        // Not UTF-8 once percent-decoded: refused by the path extractor itself.
        ("/api/wizard/session/%FF", "INVALID_PATH"),
        ("/api/wizard/session/%FF/events", "INVALID_PATH"),
        (
            "/api/wizard/session/shape-1/events?after=1.5",
            "INVALID_QUERY",
        ),
        (
            "/api/wizard/session/shape-1/events?limit=ten",
            "INVALID_QUERY",
        ),
        ("/api/wizard/sessions?status=processing", "INVALID_QUERY"),
    ];
    for (path, code) in gets {
        let (status, reply) = app.get(path).await;
        assert_eq!(status, 400, "{path}: {reply}");
        assert_eq!(reply["error"]["code"], code, "{path}: {reply}");
        assert!(reply["error"]["message"].is_string(), "{path}: {reply}");
    }
    let posts = ["/api/sessions/%FF/events", "/api/wizard/session/%FF/cancel"];
    for path in posts {
        let (status, reply) = app
            .post_raw(path, "application/json", progress(1).to_string())
            .await;
        assert_eq!(status, 400, "{path}: {reply}");
        assert_eq!(reply["error"]["code"], "INVALID_PATH", "{path}: {reply}");
    }
}

/// `herald_http_errors_total{code="..."}` from `/metrics` (`None` when the line is missing).
async fn http_errors(app: &TestServer, code: &str) -> Option<u64> {
    app.metric(&format!("herald_http_errors_total{{code=\"{code}\"}}"))
        .await
}

#[tokio::test]
async fn error_responses_are_counted_by_code() {
    let app = spawn_app().await;
    let before = http_errors(&app, "SESSION_NOT_FOUND").await;
    assert_eq!(before, Some(0), "every code is exported from the start");
    for _ in 0..3 {
        let (status, _) = app.get("/api/wizard/session/nobody-here").await;
        assert_eq!(status, 404);
    }
    app.get("/api/wizard/session/%FF").await;
    app.post_raw("/healthz", "application/json", "{}".into())
        .await;
    assert_eq!(http_errors(&app, "SESSION_NOT_FOUND").await, Some(3));
    assert_eq!(http_errors(&app, "INVALID_PATH").await, Some(1));
    assert_eq!(http_errors(&app, "METHOD_NOT_ALLOWED").await, Some(1));
    // Successful requests are not errors.
    app.get("/healthz").await;
    assert_eq!(http_errors(&app, "INTERNAL").await, Some(0));
}
