//! The Socket.IO surface of SPEC §1, over real websockets.

mod common;

use std::time::Duration;

use common::{is_timestamp, progress, spawn_app, spawn_app_with};
use serde_json::{Value, json};

#[tokio::test]
async fn connected_then_subscribed_then_every_event_kind_live() {
    let app = spawn_app().await;
    let mut client = app.connect().await;
    let connected = client.expect("connected").await;
    assert_eq!(connected["socketId"], client.sid);
    assert!(is_timestamp(&connected["timestamp"]), "{connected}");

    client.emit("subscribe", &json!("live-1"));
    let subscribed = client.expect("subscribed").await;
    assert_eq!(subscribed["sessionId"], "live-1");
    assert_eq!(subscribed["lastSeq"], 0);
    assert_eq!(
        subscribed["epoch"], "",
        "a session without events has no epoch yet"
    );
    assert!(
        subscribed.get("recovered").is_none(),
        "no lastSeq given, nothing to recover"
    );
    assert!(is_timestamp(&subscribed["timestamp"]));

    let batch = json!([
        { "event": "progress", "data": { "status": "PROCESSING", "progress": 10,
            "prompts": { "total": 2, "completed": 0, "processing": 1, "pending": 1, "failed": 0 },
            "hasClarifications": false, "clarificationCount": 0, "custom": { "nested": [1, 2] } } },
        { "event": "model_result", "data": { "promptId": "p1", "modelName": "llama3.1:8b", "provider": "ollama",
            "duration": 12, "result": "partial", "status": "processing" } },
        { "event": "clarification", "data": { "clarificationId": "c-1", "question": "Which year?", "status": "pending" } },
        { "event": "completed", "data": { "result": { "p1": { "llama3.1:8b": "done" } }, "timestamp": "2026-01-01T00:00:00.000Z" } },
        { "event": "error", "data": { "error": "late failure", "code": "X" } }
    ]);
    let (status, reply) = app.post_events("live-1", &batch).await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(reply["accepted"], 5);
    assert_eq!(reply["lastSeq"], 5);
    assert_eq!(reply["seqs"], json!([1, 2, 3, 4, 5]));

    let expected = [
        "progress",
        "model_result",
        "clarification",
        "completed",
        "error",
    ];
    for (i, name) in expected.iter().enumerate() {
        let data = client.expect(name).await;
        assert_eq!(data["sessionId"], "live-1");
        assert_eq!(data["seq"], i as u64 + 1);
        assert!(is_timestamp(&data["timestamp"]), "{data}");
        let sent = &batch[i]["data"];
        for (key, value) in sent.as_object().unwrap() {
            assert_eq!(&data[key], value, "field {key} of {name} kept verbatim");
        }
    }
    // A producer's own timestamp is kept.
    let history = app.history("live-1").await.unwrap();
    assert_eq!(history[3]["data"]["timestamp"], "2026-01-01T00:00:00.000Z");
}

#[tokio::test]
async fn ack_reports_head_and_replay_follows_in_order_then_live() {
    let app = spawn_app().await;
    let events: Vec<Value> = (1..=5).map(progress).collect();
    app.post_events("replay-1", &json!(events)).await;

    let mut client = app.connect().await;
    client.expect("connected").await;
    let ack = client
        .call(
            "subscribe",
            &json!({ "sessionId": "replay-1", "lastSeq": 2 }),
        )
        .await;
    assert_eq!(ack["ok"], true);
    assert_eq!(ack["sessionId"], "replay-1");
    assert_eq!(ack["lastSeq"], 5);
    assert_eq!(ack["recovered"], true);
    let subscribed = client.expect("subscribed").await;
    assert_eq!(subscribed["recovered"], true);
    let epoch = subscribed["epoch"].as_str().unwrap().to_owned();
    assert_eq!(epoch.len(), 32);
    for seq in 3..=5 {
        assert_eq!(client.expect("progress").await["seq"], seq);
    }
    app.post_events("replay-1", &progress(6)).await;
    assert_eq!(client.expect("progress").await["seq"], 6);

    // Same epoch, up to date: nothing replayed.
    let mut again = app.connect().await;
    again.expect("connected").await;
    let ack = again
        .call(
            "subscribe",
            &json!({ "sessionId": "replay-1", "lastSeq": 6, "epoch": epoch }),
        )
        .await;
    assert_eq!(ack["recovered"], true);
    again.expect("subscribed").await;
    again.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn unrecoverable_gaps_say_recovered_false_and_replay_nothing() {
    let app = spawn_app_with(|c| c.max_events_per_session = 5).await;
    let events: Vec<Value> = (1..=10).map(progress).collect();
    app.post_events("gap-1", &json!(events)).await;
    let (_, page) = app.get("/api/wizard/session/gap-1/events?after=0").await;
    assert_eq!(page["firstSeq"], 6);
    assert_eq!(page["truncated"], true);

    let mut client = app.connect().await;
    client.expect("connected").await;
    // seq 2..=5 are gone: no partial replay.
    let ack = client
        .call("subscribe", &json!({ "sessionId": "gap-1", "lastSeq": 1 }))
        .await;
    assert_eq!(ack["recovered"], false);
    let subscribed = client.expect("subscribed").await;
    assert_eq!(subscribed["recovered"], false);
    assert_eq!(subscribed["lastSeq"], 10);
    client.expect_silence(Duration::from_millis(200)).await;

    // seq 5 was seen, 6.. retained: full recovery.
    let mut ok = app.connect().await;
    ok.expect("connected").await;
    let ack = ok
        .call("subscribe", &json!({ "sessionId": "gap-1", "lastSeq": 5 }))
        .await;
    assert_eq!(ack["recovered"], true);
    ok.expect("subscribed").await;
    for seq in 6..=10 {
        assert_eq!(ok.expect("progress").await["seq"], seq);
    }

    // Another incarnation of the log: not recoverable, whatever the numbers.
    let mut stale = app.connect().await;
    stale.expect("connected").await;
    let ack = stale
        .call(
            "subscribe",
            &json!({ "sessionId": "gap-1", "lastSeq": 8, "epoch": "0123" }),
        )
        .await;
    assert_eq!(ack["recovered"], false);
    stale.expect("subscribed").await;
    stale.expect_silence(Duration::from_millis(200)).await;

    // Ahead of the log (the log was recreated and the client kept an old number).
    let mut ahead = app.connect().await;
    ahead.expect("connected").await;
    let ack = ahead
        .call("subscribe", &json!({ "sessionId": "gap-1", "lastSeq": 99 }))
        .await;
    assert_eq!(ack["recovered"], false);
}

#[tokio::test]
async fn bad_subscribe_input_gets_a_structured_error_and_the_socket_stays_usable() {
    let app = spawn_app().await;
    let mut client = app.connect().await;
    client.expect("connected").await;
    let long = "a".repeat(129);
    let cases: Vec<(Value, &str)> = vec![
        (json!(""), "INVALID_SESSION_ID"),
        (json!(long), "INVALID_SESSION_ID"),
        (json!("bad id!"), "INVALID_SESSION_ID"),
        (json!("-leading-dash"), "INVALID_SESSION_ID"),
        (json!({ "sessionId": "" }), "INVALID_SESSION_ID"),
        (json!(42), "INVALID_PAYLOAD"),
        (json!(null), "INVALID_PAYLOAD"),
        (json!([]), "INVALID_PAYLOAD"),
        (json!({}), "INVALID_PAYLOAD"),
        (json!({ "sessionId": 5 }), "INVALID_PAYLOAD"),
        (
            json!({ "sessionId": "ok-id", "lastSeq": -1 }),
            "INVALID_PAYLOAD",
        ),
        (
            json!({ "sessionId": "ok-id", "lastSeq": "3" }),
            "INVALID_PAYLOAD",
        ),
        (
            json!({ "sessionId": "ok-id", "epoch": 7 }),
            "INVALID_PAYLOAD",
        ),
    ];
    for (payload, code) in &cases {
        // Without an ack: the error event alone.
        client.emit("subscribe", payload);
        let error = client.expect("error").await;
        assert_eq!(error["code"], *code, "payload {payload}");
        assert!(error["error"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(is_timestamp(&error["timestamp"]));
        assert!(error.get("seq").is_none(), "protocol errors carry no seq");
        // With an ack: the ack says why, and the error event still comes.
        let ack = client.call("subscribe", payload).await;
        assert_eq!(ack["ok"], false, "payload {payload}");
        assert_eq!(ack["error"]["code"], *code);
        assert!(
            ack["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        client.expect("error").await;
    }
    // Nothing was subscribed, so events for the would-be session do not arrive.
    app.post_events("ok-id", &progress(1)).await;
    client.expect_silence(Duration::from_millis(200)).await;
    // Unknown events are answered too.
    let ack = client.call("subscribe_all", &json!("x")).await;
    assert_eq!(ack["error"]["code"], "UNKNOWN_EVENT");
    client.expect("error").await;
    // Still connected and usable.
    let subscribed = client.subscribe("ok-id").await;
    assert_eq!(subscribed["lastSeq"], 1);
    app.post_events("ok-id", &progress(2)).await;
    assert_eq!(client.expect("progress").await["seq"], 2);
    assert_eq!(
        app.history("ok-id").await.unwrap().len(),
        2,
        "bad input logged nothing"
    );
}

#[tokio::test]
async fn unsubscribe_stops_one_session_and_not_the_others() {
    let app = spawn_app().await;
    let mut client = app.connect().await;
    client.expect("connected").await;
    client.subscribe("keep-1").await;
    client.subscribe("drop-1").await;
    let ack = client.call("unsubscribe", &json!("drop-1")).await;
    assert_eq!(ack, json!({ "ok": true, "sessionId": "drop-1" }));
    let unsubscribed = client.expect("unsubscribed").await;
    assert_eq!(unsubscribed["sessionId"], "drop-1");
    assert!(is_timestamp(&unsubscribed["timestamp"]));
    app.post_events("drop-1", &progress(1)).await;
    app.post_events("keep-1", &progress(1)).await;
    let data = client.expect("progress").await;
    assert_eq!(
        data["sessionId"], "keep-1",
        "the dropped session's event must not arrive first"
    );
    client.expect_silence(Duration::from_millis(200)).await;
    // Object form and bad input on unsubscribe.
    client.emit("unsubscribe", &json!({ "sessionId": "keep-1" }));
    client.expect("unsubscribed").await;
    let ack = client.call("unsubscribe", &json!(3)).await;
    assert_eq!(ack["error"]["code"], "INVALID_PAYLOAD");
}

#[tokio::test]
async fn subscription_count_and_request_rate_are_bounded() {
    let app = spawn_app_with(|c| {
        c.max_subscriptions = 3;
        c.subscribe_rate = 1000;
    })
    .await;
    let mut client = app.connect().await;
    client.expect("connected").await;
    for i in 0..3 {
        client.subscribe(&format!("many-{i}")).await;
    }
    let ack = client.call("subscribe", &json!("many-3")).await;
    assert_eq!(ack["error"]["code"], "TOO_MANY_SUBSCRIPTIONS");
    assert_eq!(client.expect("error").await["sessionId"], "many-3");
    // Re-subscribing to a session already followed is not a new subscription.
    let ack = client.call("subscribe", &json!("many-0")).await;
    assert_eq!(ack["ok"], true);

    let limited = spawn_app_with(|c| c.subscribe_rate = 2).await;
    let mut client = limited.connect().await;
    client.expect("connected").await;
    let mut codes = Vec::new();
    for _ in 0..10 {
        let ack = client.call("subscribe", &json!("rate-1")).await;
        codes.push(ack["error"]["code"].as_str().unwrap_or("ok").to_owned());
    }
    assert_eq!(
        codes.iter().filter(|c| *c == "ok").count(),
        4,
        "burst of twice the rate: {codes:?}"
    );
    assert!(codes[4..].iter().all(|c| c == "RATE_LIMITED"), "{codes:?}");
}

#[tokio::test]
async fn payloads_above_socketioxide_default_limit_are_delivered() {
    let app = spawn_app().await;
    let mut client = app.connect().await;
    client.expect("connected").await;
    client.subscribe("big-1").await;
    let big = "x".repeat(600 * 1024);
    let item = json!({ "event": "model_result", "data": {
        "promptId": "p", "modelName": "m", "status": "completed", "result": big } });
    let (status, _) = app.post_events("big-1", &item).await;
    assert_eq!(status, 202);
    let data = client.expect("model_result").await;
    assert_eq!(data["result"].as_str().unwrap().len(), 600 * 1024);
}

#[tokio::test]
async fn shutdown_disconnects_sockets_and_finishes() {
    let app = spawn_app().await;
    let mut client = app.connect().await;
    client.expect("connected").await;
    let disconnected = client.disconnected.clone();
    let notified = disconnected.notified();
    app.shutdown().await;
    tokio::time::timeout(common::WAIT, notified)
        .await
        .expect("socket closed by shutdown");
}

#[tokio::test]
async fn development_mode_can_drop_a_sessions_sockets_server_side() {
    let app = spawn_app().await;
    let mut follower = app.connect().await;
    follower.expect("connected").await;
    follower.subscribe("drop-me").await;
    let mut bystander = app.connect().await;
    bystander.expect("connected").await;
    bystander.subscribe("keep-me").await;
    let closed = follower.disconnected.clone();
    let notified = closed.notified();
    let (status, reply) = app
        .post_raw(
            "/api/dev/session/drop-me/drop-sockets",
            "application/json",
            "{}".into(),
        )
        .await;
    assert_eq!(
        (status, reply["dropped"].as_u64()),
        (200, Some(1)),
        "{reply}"
    );
    tokio::time::timeout(common::WAIT, notified)
        .await
        .expect("the follower was dropped");
    app.post_events("keep-me", &progress(1)).await;
    assert_eq!(bystander.expect("progress").await["seq"], 1);

    let production = spawn_app_with(|c| c.dev = false).await;
    let (status, _) = production
        .post_raw(
            "/api/dev/session/drop-me/drop-sockets",
            "application/json",
            "{}".into(),
        )
        .await;
    assert_eq!(status, 404, "the route exists only in development mode");
}

/// The Engine.IO heartbeat on a websocket session (kept by the connection's one task in the
/// vendored engineioxide): a client that answers every PING stays connected and keeps
/// getting its session's events, even while a steady flow of events is written to it; one
/// that stops answering is sent a CLOSE packet and dropped once the PONG is overdue.
#[tokio::test]
async fn heartbeat_keeps_answering_clients_and_drops_silent_ones() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;

    let app = spawn_app_with(|config| {
        config.ping_interval_ms = 150;
        config.ping_timeout_ms = 300;
    })
    .await;
    let mut answering = common::raw::connect(app.addr).await;
    let mut silent = common::raw::connect(app.addr).await;
    answering
        .send(Message::text(r#"42["subscribe","beat-1"]"#))
        .await
        .unwrap();

    // The producer posts an event every 20 ms for the whole test, so writes keep coming
    // while the answering client's PONGs must still be read.
    let producer = {
        let http = reqwest::Client::new();
        let url = app.url("/api/sessions/beat-1/events");
        tokio::spawn(async move {
            for n in 1..=100u64 {
                let body = json!({ "event": "progress", "data": { "status": "PROCESSING", "progress": n } });
                let _ = http.post(&url).json(&body).send().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let answered = async {
        let (mut pings, mut events) = (0, 0);
        while pings < 8 {
            let frame = common::raw::next_text(&mut answering)
                .await
                .expect("an answering client stays connected");
            if frame == "2" {
                pings += 1;
                answering.send(Message::text("3")).await.unwrap();
            } else if frame.starts_with(r#"42["progress""#) {
                events += 1;
            }
        }
        events
    };
    let dropped = async {
        let mut frames = Vec::new();
        while let Some(frame) = common::raw::next_text(&mut silent).await {
            frames.push(frame);
        }
        frames
    };
    let (events, silent_frames) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(answered, dropped)
    })
    .await
    .expect("8 pings answered and the silent client dropped within 10 s");

    assert!(events > 10, "events kept coming between pings: {events}");
    assert_eq!(
        silent_frames.iter().filter(|f| *f == "2").count(),
        1,
        "the silent client is pinged once, then dropped: {silent_frames:?}"
    );
    assert_eq!(
        silent_frames.last().map(String::as_str),
        Some("1"),
        "a CLOSE packet before the connection ends: {silent_frames:?}"
    );
    producer.abort();
}
