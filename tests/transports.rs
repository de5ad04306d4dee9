//! SSE, plain WebSocket and the browser bundle (SPEC §6) against a real herald: replay and
//! resume, live delivery, refusals, slow readers, auth and the shared ordering.

mod common;

use common::streams::{SseReader, StreamEnd, Ws};
use common::{
    TEST_JWT_SECRET, WAIT, harness_token, progress, sign_token, spawn_app_with, unix_now,
};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};

fn client() -> reqwest::Client {
    common::harness_http()
}

async fn open_stream(
    base: &str,
    session_id: &str,
    query: &str,
    last_event_id: Option<u64>,
) -> reqwest::Response {
    let mut request = client().get(format!(
        "{base}/api/wizard/session/{session_id}/stream{query}"
    ));
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id.to_string());
    }
    request.send().await.expect("the stream answers")
}

async fn post_n(server: &common::TestServer, session_id: &str, from: u64, count: u64) {
    let events: Vec<Value> = (from..from + count).map(progress).collect();
    let (status, body) = server.post_events(session_id, &json!(events)).await;
    assert_eq!(status, 202, "{body}");
}

#[tokio::test]
async fn sse_replays_then_streams_live_and_resumes_from_last_event_id() {
    let server = spawn_app_with(|_| {}).await;
    let base = server.url("");
    post_n(&server, "sse-1", 1, 3).await;

    let response = open_stream(&base, "sse-1", "?lastSeq=0", None).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["cache-control"], "no-cache");
    let mut stream = SseReader::new(response);
    let subscribed = stream.next_event().await;
    assert_eq!(subscribed.event, "subscribed");
    assert_eq!(subscribed.retry, Some(1000));
    assert_eq!(subscribed.id, Some(0), "complete from the point asked for");
    let reply = subscribed.json();
    assert_eq!(reply["sessionId"], "sse-1");
    assert_eq!(reply["lastSeq"], 3);
    assert_eq!(reply["recovered"], true);
    let epoch = reply["epoch"].as_str().unwrap().to_owned();
    for seq in 1..=3 {
        let frame = stream.next_event().await;
        assert_eq!((frame.id, frame.event.as_str()), (Some(seq), "progress"));
        assert_eq!(frame.json()["seq"], seq);
    }
    post_n(&server, "sse-1", 4, 2).await;
    for seq in 4..=5 {
        assert_eq!(stream.next_event().await.id, Some(seq));
    }
    drop(stream);

    // What a browser's EventSource does on reconnecting: Last-Event-ID wins over lastSeq.
    post_n(&server, "sse-1", 6, 1).await;
    let response = open_stream(
        &base,
        "sse-1",
        &format!("?lastSeq=0&epoch={epoch}"),
        Some(4),
    )
    .await;
    let mut stream = SseReader::new(response);
    let subscribed = stream.next_event().await;
    assert_eq!(subscribed.id, Some(4));
    assert_eq!(subscribed.json()["recovered"], true);
    assert_eq!(stream.next_event().await.id, Some(5));
    assert_eq!(stream.next_event().await.id, Some(6));
}

#[tokio::test]
async fn sse_without_a_resume_point_is_live_from_the_head() {
    let server = spawn_app_with(|_| {}).await;
    post_n(&server, "sse-live", 1, 2).await;
    let mut stream = SseReader::new(open_stream(&server.url(""), "sse-live", "", None).await);
    let subscribed = stream.next_event().await;
    assert_eq!(
        subscribed.id,
        Some(2),
        "a reconnect resumes after the head it started at"
    );
    assert!(subscribed.json().get("recovered").is_none());
    post_n(&server, "sse-live", 3, 1).await;
    let frame = stream.next_event().await;
    assert_eq!(
        frame.id,
        Some(3),
        "no replay without a resume point: {frame:?}"
    );

    // A resume point the log cannot serve (another epoch) says so, then goes live.
    let mut stream = SseReader::new(
        open_stream(
            &server.url(""),
            "sse-live",
            "?lastSeq=1&epoch=00000000000000000000000000000000",
            None,
        )
        .await,
    );
    let subscribed = stream.next_event().await;
    assert_eq!(subscribed.json()["recovered"], false);
    assert_eq!(subscribed.id, Some(3));
}

#[tokio::test]
async fn sse_refuses_bad_input_with_http_errors() {
    let server = spawn_app_with(|_| {}).await;
    let base = server.url("");
    let cases: [(&str, &str, Option<&str>, &str); 3] = [
        ("sse-bad", "", Some("seven"), "INVALID_REQUEST"),
        ("sse-bad", "?lastSeq=-1", None, "INVALID_QUERY"),
        ("bad%20id", "", None, "INVALID_SESSION_ID"),
    ];
    for (session_id, query, last_event_id, code) in cases {
        let mut request = client().get(format!(
            "{base}/api/wizard/session/{session_id}/stream{query}"
        ));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 400, "{session_id}{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
    }
}

/// ~3 KB of output, like a model's partial result.
fn bulky(n: u64) -> Value {
    json!({ "event": "progress", "data": {
        "status": "PROCESSING", "progress": n % 101, "n": n, "message": "x".repeat(3000)
    } })
}

/// Posts `batches` × 100 bulky events while nobody reads; returns how many were posted.
async fn flood(server: &common::TestServer, session_id: &str, batches: u64) -> u64 {
    for batch in 0..batches {
        let events: Vec<Value> = (0..100).map(|i| bulky(batch * 100 + i + 1)).collect();
        let (status, body) = server.post_events(session_id, &json!(events)).await;
        assert_eq!(
            status, 202,
            "a stalled reader never delays producers: {body}"
        );
    }
    batches * 100
}

/// A server whose subscriber queues hold 164 messages (max-batch + 64) and whose sessions
/// retain every event of a [`flood`].
async fn spawn_for_floods() -> common::TestServer {
    spawn_app_with(|c| {
        c.max_batch = 100;
        c.socket_buffer = 0;
        c.max_events_per_session = 10_000;
        c.max_session_bytes = 200_000_000;
    })
    .await
}

/// A reader that stops reading is cut off once its queue is full (not left silently
/// behind), and resumes from what it last received without a gap.
#[tokio::test]
async fn a_stalled_sse_reader_is_cut_off_and_resumes_gap_free() {
    let server = spawn_for_floods().await;
    let base = server.url("");
    let response = open_stream(&base, "sse-slow", "?lastSeq=0", None).await;
    let mut stream = SseReader::new(response);
    assert_eq!(stream.next_event().await.event, "subscribed");
    let total = flood(&server, "sse-slow", 60).await;
    assert!(server.metric("herald_slow_consumers_total").await.unwrap() >= 1);

    let mut last = 0;
    let end = loop {
        match stream.next().await {
            Ok(frame) if frame.comment => {}
            Ok(frame) => {
                assert_eq!(frame.id, Some(last + 1), "no gap before the cut");
                last += 1;
            }
            Err(end) => break end,
        }
    };
    assert_eq!(
        end,
        StreamEnd::Broken,
        "a cut looks like a dropped connection"
    );
    assert!(
        last < total,
        "the reader was cut before the end ({last} of {total})"
    );

    let mut stream = SseReader::new(open_stream(&base, "sse-slow", "", Some(last)).await);
    assert_eq!(stream.next_event().await.json()["recovered"], true);
    for seq in last + 1..=total {
        assert_eq!(stream.next_event().await.id, Some(seq));
    }
}

#[tokio::test]
async fn sse_and_ws_need_credentials_and_end_when_the_token_does() {
    let server = spawn_app_with(|c| {
        c.jwt_secret = Some(herald::config::Secret::new(TEST_JWT_SECRET));
        c.jwt_leeway_secs = 0;
    })
    .await;
    let base = server.url("");
    let admin = sign_token(
        &json!({ "sub": "ops", "exp": unix_now() + 3600, "scope": "admin publish" }),
        TEST_JWT_SECRET,
    );
    let alice = sign_token(
        &json!({ "sub": "alice", "exp": unix_now() + 3600, "sessions": ["alice-*"] }),
        TEST_JWT_SECRET,
    );
    let plain = reqwest::Client::new();
    let anonymous = plain
        .get(format!("{base}/api/wizard/session/alice-1/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert!(anonymous.headers().contains_key("www-authenticate"));
    let forbidden = plain
        .get(format!(
            "{base}/api/wizard/session/bob-1/stream?token={alice}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);
    let body: Value = forbidden.json().await.unwrap();
    assert_eq!(body["error"]["code"], "FORBIDDEN");

    // An EventSource can only send its token in the URL.
    let publish = |n: u64| {
        plain
            .post(format!("{base}/api/sessions/alice-1/events"))
            .bearer_auth(&admin)
            .json(&progress(n))
            .send()
    };
    assert_eq!(publish(1).await.unwrap().status(), 202);
    let response = plain
        .get(format!(
            "{base}/api/wizard/session/alice-1/stream?lastSeq=0&token={alice}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = SseReader::new(response);
    assert_eq!(stream.next_event().await.event, "subscribed");
    assert_eq!(stream.next_event().await.id, Some(1));

    // A token about to expire: the stream says so, then ends.
    let brief = sign_token(
        &json!({ "sub": "alice", "exp": unix_now() + 2, "sessions": ["alice-*"] }),
        TEST_JWT_SECRET,
    );
    let response = plain
        .get(format!(
            "{base}/api/wizard/session/alice-1/stream?token={brief}"
        ))
        .send()
        .await
        .unwrap();
    let mut stream = SseReader::new(response);
    assert_eq!(stream.next_event().await.event, "subscribed");
    let expired = stream.next_event().await;
    assert_eq!(expired.event, "error");
    assert_eq!(expired.json()["code"], "TOKEN_EXPIRED");
    assert_eq!(stream.next().await.err(), Some(StreamEnd::Finished));

    // The plain WebSocket: refused at the handshake without a token, FORBIDDEN per session.
    let addr = server.addr;
    let refused = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected a 401 handshake, got {other:?}"),
    }
    let mut ws = Ws::connect(&format!("ws://{addr}/ws?token={alice}")).await;
    ws.send(json!({ "type": "subscribe", "sessionId": "bob-1" }))
        .await;
    let error = ws.next_json().await;
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("error"), Some("FORBIDDEN"))
    );
    ws.send(json!({ "type": "ping" })).await;
    assert_eq!(
        ws.next_json().await["type"],
        "pong",
        "a refusal leaves it connected"
    );

    let brief = sign_token(
        &json!({ "sub": "alice", "exp": unix_now() + 2, "sessions": ["alice-*"] }),
        TEST_JWT_SECRET,
    );
    let mut ws = Ws::connect(&format!("ws://{addr}/ws?token={brief}")).await;
    let mut saw_expiry = false;
    let close = loop {
        match ws.next_message().await {
            Some(Message::Text(text)) => {
                let value: Value = serde_json::from_str(&text).unwrap();
                saw_expiry |= value["code"] == "TOKEN_EXPIRED";
            }
            Some(Message::Close(frame)) => break frame,
            Some(_) => {}
            None => panic!("closed without a close frame"),
        }
    };
    assert!(saw_expiry);
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Policy));
}

fn ws_url(server: &common::TestServer) -> String {
    format!("ws://{}/ws", server.addr)
}

#[tokio::test]
async fn ws_speaks_the_json_protocol_with_type_or_action() {
    let server = spawn_app_with(|_| {}).await;
    post_n(&server, "ws-1", 1, 2).await;
    let mut ws = Ws::connect(&ws_url(&server)).await;
    ws.send(json!({ "type": "subscribe", "sessionId": "ws-1", "lastSeq": 0 }))
        .await;
    let subscribed = ws.next_json().await;
    assert_eq!(subscribed["type"], "subscribed");
    assert_eq!(subscribed["lastSeq"], 2);
    assert_eq!(subscribed["recovered"], true);
    for seq in 1..=2 {
        let event = ws.next_json().await;
        assert_eq!(
            (event["type"].as_str(), event["seq"].as_u64()),
            (Some("progress"), Some(seq))
        );
        assert_eq!(event["sessionId"], "ws-1");
    }
    post_n(&server, "ws-1", 3, 1).await;
    assert_eq!(ws.next_json().await["seq"], 3);

    ws.send(json!({ "action": "ping" })).await;
    let pong = ws.next_json().await;
    assert_eq!(pong["type"], "pong");
    assert!(common::is_timestamp(&pong["timestamp"]));

    ws.send(json!({ "action": "unsubscribe", "sessionId": "ws-1" }))
        .await;
    assert_eq!(ws.next_json().await["type"], "unsubscribed");
    post_n(&server, "ws-1", 4, 1).await;
    // Replies are ordered with events: had seq 4 been delivered, it would come first.
    ws.send(json!({ "type": "ping" })).await;
    assert_eq!(
        ws.next_json().await["type"],
        "pong",
        "nothing after unsubscribe"
    );

    // Resume after 3 with the epoch: exactly seq 4.
    let epoch = subscribed["epoch"].as_str().unwrap();
    ws.send(json!({ "type": "subscribe", "sessionId": "ws-1", "lastSeq": 3, "epoch": epoch }))
        .await;
    assert_eq!(ws.next_json().await["recovered"], true);
    assert_eq!(ws.next_json().await["seq"], 4);
}

#[tokio::test]
async fn ws_answers_garbage_with_errors_and_closes_a_flood() {
    let server = spawn_app_with(|c| c.invalid_event_rate = 5).await;
    let mut ws = Ws::connect(&ws_url(&server)).await;
    let cases = [
        (
            Message::Binary(Bytes::from_static(b"\x00\x01")),
            "INVALID_PAYLOAD",
        ),
        (Message::Text("{not json".into()), "INVALID_JSON"),
        (Message::Text(r#"{"type":"shout"}"#.into()), "UNKNOWN_EVENT"),
        (
            Message::Text(r#"{"type":"subscribe"}"#.into()),
            "INVALID_PAYLOAD",
        ),
        (
            Message::Text(r#"{"type":"subscribe","sessionId":"a b"}"#.into()),
            "INVALID_SESSION_ID",
        ),
        (
            Message::Text(r#"{"sessionId":"s"}"#.into()),
            "INVALID_PAYLOAD",
        ),
    ];
    for (message, code) in cases {
        ws.send_raw(message).await;
        let error = ws.next_json().await;
        assert_eq!(
            (error["type"].as_str(), error["code"].as_str()),
            (Some("error"), Some(code)),
            "{error}"
        );
        assert!(common::is_timestamp(&error["timestamp"]));
    }
    ws.send(json!({ "type": "ping" })).await;
    assert_eq!(ws.next_json().await["type"], "pong");

    // A flood costs a bounded number of answers, then the connection.
    for _ in 0..200 {
        if ws
            .socket
            .send(Message::Text("garbage".into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let mut answered = 0;
    let close = loop {
        match ws.next_message().await {
            Some(Message::Text(_)) => answered += 1,
            Some(Message::Close(frame)) => break frame,
            Some(_) => {}
            None => panic!("dropped without a close frame"),
        }
    };
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Policy));
    assert!(answered <= 20, "{answered} answers to a flood");
}

#[tokio::test]
async fn a_stalled_ws_reader_is_closed_with_1013_and_resumes_gap_free() {
    let server = spawn_for_floods().await;
    let mut ws = Ws::connect(&ws_url(&server)).await;
    ws.send(json!({ "type": "subscribe", "sessionId": "ws-slow", "lastSeq": 0 }))
        .await;
    assert_eq!(ws.next_json().await["type"], "subscribed");
    let total = flood(&server, "ws-slow", 60).await;
    let mut last = 0;
    let close = loop {
        match ws.next_message().await {
            Some(Message::Text(text)) => {
                let event: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(event["seq"], last + 1, "no gap before the cut");
                last += 1;
            }
            Some(Message::Close(frame)) => break frame,
            Some(_) => {}
            None => break None,
        }
    };
    assert!(last < total, "cut before the end ({last} of {total})");
    if let Some(frame) = close {
        assert_eq!(frame.code, CloseCode::Again);
    }
    let mut ws = Ws::connect(&ws_url(&server)).await;
    ws.send(json!({ "type": "subscribe", "sessionId": "ws-slow", "lastSeq": last }))
        .await;
    assert_eq!(ws.next_json().await["recovered"], true);
    for seq in last + 1..=total {
        assert_eq!(ws.next_json().await["seq"], seq);
    }
}

/// One session followed over all three transports: the same events in the same order, and
/// the dev drop route drops every one of them.
#[tokio::test]
async fn all_transports_share_one_order_and_are_dropped_together() {
    let server = spawn_app_with(|_| {}).await;
    let mut socket = server.connect().await;
    socket.subscribe("mix-1").await;
    let mut ws = Ws::connect(&ws_url(&server)).await;
    ws.send(json!({ "type": "subscribe", "sessionId": "mix-1" }))
        .await;
    assert_eq!(ws.next_json().await["type"], "subscribed");
    let mut sse = SseReader::new(open_stream(&server.url(""), "mix-1", "", None).await);
    assert_eq!(sse.next_event().await.event, "subscribed");

    let producers: Vec<_> = (0..4u64)
        .map(|p| {
            let url = server.url("/api/sessions/mix-1/events");
            tokio::spawn(async move {
                let http = common::harness_http();
                for i in 0..10u64 {
                    let events: Vec<Value> =
                        (0..5).map(|j| progress(p * 1000 + i * 10 + j)).collect();
                    let status = http.post(&url).json(&events).send().await.unwrap().status();
                    assert_eq!(status, 202);
                }
            })
        })
        .collect();
    for producer in producers {
        producer.await.unwrap();
    }
    let mut seen_socket = Vec::new();
    let mut seen_ws = Vec::new();
    let mut seen_sse = Vec::new();
    for _ in 0..200 {
        let event = socket.wait_for_within("progress", WAIT).await;
        seen_socket.push((event["seq"].as_u64(), event["n"].clone()));
        let event = ws.next_json().await;
        seen_ws.push((event["seq"].as_u64(), event["n"].clone()));
        let frame = sse.next_event().await;
        seen_sse.push((frame.id, frame.json()["n"].clone()));
    }
    assert_eq!(seen_socket, seen_ws);
    assert_eq!(seen_socket, seen_sse);
    assert_eq!(seen_socket.first().unwrap().0, Some(1));

    let (status, body) = server
        .post_json("/api/dev/session/mix-1/drop-sockets", &json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["dropped"], 3, "{body}");
    assert_eq!(sse.next_frame().await.err(), Some(StreamEnd::Broken));
    let close = loop {
        match ws.next_message().await {
            Some(Message::Close(frame)) => break frame,
            Some(_) => {}
            None => break None,
        }
    };
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Again));
}

/// A request for `url` with the `etag` it was served with is answered 304, with no body.
async fn assert_revalidates(http: &reqwest::Client, url: &str, etag: &str) {
    let again = http
        .get(url)
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304, "{url}");
    assert!(again.bytes().await.unwrap().is_empty(), "{url}");
}

#[tokio::test]
async fn the_browser_bundle_is_served_with_node_s_caching_headers() {
    let server = spawn_app_with(|_| {}).await;
    let http = client();
    for path in ["/socket.io/socket.io.js", "/socket.io/socket.io.min.js"] {
        let response = http.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/javascript; charset=utf-8"
        );
        assert_eq!(response.headers()["cache-control"], "public, max-age=0");
        let etag = response.headers()["etag"].to_str().unwrap().to_owned();
        assert_eq!(etag, format!("\"{}\"", herald::assets::SOCKET_IO_VERSION));
        let body = response.text().await.unwrap();
        assert!(body.contains(&format!("Socket.IO v{}", herald::assets::SOCKET_IO_VERSION)));
        assert_revalidates(&http, &server.url(path), &etag).await;
    }
    // The Engine.IO endpoint next to it is untouched.
    let (status, _) = server.get("/socket.io/?EIO=4&transport=polling").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_dashboard_is_served_compressed_revalidated_and_without_a_credential() {
    // With auth on: the page must load before the user has a token to give it.
    let server = spawn_app_with(|c| {
        c.dev = false;
        c.jwt_secret = Some(herald::config::Secret::new("dashboard-secret"));
    })
    .await;
    let http = client();
    for (path, kind) in [
        ("/", "text/html; charset=utf-8"),
        ("/dashboard/app.js", "text/javascript; charset=utf-8"),
        ("/dashboard/style.css", "text/css; charset=utf-8"),
    ] {
        let fetch = |encoding: &'static str| {
            let request = http
                .get(server.url(path))
                .header("accept-encoding", encoding);
            async move { request.send().await.unwrap() }
        };
        let plain = fetch("identity").await;
        assert_eq!(plain.status(), 200, "{path}");
        assert_eq!(plain.headers()["content-type"], kind);
        assert_eq!(plain.headers()["cache-control"], "no-cache");
        assert_eq!(plain.headers()["vary"], "Accept-Encoding");
        assert!(plain.headers().get("content-encoding").is_none());
        let etag = plain.headers()["etag"].to_str().unwrap().to_owned();
        let plain = plain.bytes().await.unwrap();

        let br = fetch("gzip, deflate, br").await;
        assert_eq!(br.headers()["content-encoding"], "br", "{path}");
        assert_eq!(br.headers()["etag"].to_str().unwrap(), etag);
        let br = br.bytes().await.unwrap();
        let mut decoded = Vec::new();
        brotli::BrotliDecompress(&mut &br[..], &mut decoded).unwrap();
        assert_eq!(decoded, plain, "{path}");
        assert!(
            br.len() < plain.len() / 2,
            "{path}: {} of {}",
            br.len(),
            plain.len()
        );

        let gzip = fetch("gzip").await;
        assert_eq!(gzip.headers()["content-encoding"], "gzip", "{path}");
        let gzip = gzip.bytes().await.unwrap();
        let mut decoded = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gzip[..]), &mut decoded)
            .unwrap();
        assert_eq!(decoded, plain, "{path}");

        assert_revalidates(&http, &server.url(path), &etag).await;
    }
    let page = http.get(server.url("/")).send().await.unwrap();
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(html.contains("/socket.io/socket.io.min.js"), "{html}");
    // Everything else still needs a credential.
    let (status, _) = server.get("/api/wizard/sessions").await;
    assert_eq!(status, 401);
    // Only GET and HEAD are the page's.
    let post = http.post(server.url("/")).send().await.unwrap();
    assert_eq!(post.status(), 404);
    let head = http.head(server.url("/")).send().await.unwrap();
    assert_eq!(head.status(), 200);
}

#[tokio::test]
async fn ws_handshakes_are_origin_checked() {
    let server = spawn_app_with(|c| {
        c.dev = false;
        c.cors_origins = vec!["https://app.example".into()];
    })
    .await;
    let mut request = ws_url(&server).into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    if let Some(token) = harness_token() {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("expected a refused handshake, got {other:?}"),
    }
    let mut request = ws_url(&server).into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", "https://app.example".parse().unwrap());
    if let Some(token) = harness_token() {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    assert!(tokio_tungstenite::connect_async(request).await.is_ok());
}

/// A connection that receives session-feed messages, whatever its transport.
trait FeedReader {
    /// The next message's name and payload.
    async fn next_feed(&mut self) -> (String, Value);
}

impl FeedReader for common::Client {
    async fn next_feed(&mut self) -> (String, Value) {
        self.next().await
    }
}

impl FeedReader for Ws {
    async fn next_feed(&mut self) -> (String, Value) {
        let mut data = self.next_json().await;
        let kind = data["type"].as_str().unwrap_or_default().to_owned();
        data.as_object_mut().unwrap().remove("type");
        (kind, data)
    }
}

impl FeedReader for SseReader {
    async fn next_feed(&mut self) -> (String, Value) {
        let frame = self.next_event().await;
        (frame.event.clone(), frame.json())
    }
}

/// Reads feed messages until each of `wanted`'s sessions has shown its `progress`;
/// returns how many `session` messages each got on the way.
async fn feed_until(reader: &mut impl FeedReader, wanted: &[(&str, f64)]) -> Vec<usize> {
    let mut counts = vec![0; wanted.len()];
    let mut done = vec![false; wanted.len()];
    while done.contains(&false) {
        let (kind, data) = reader.next_feed().await;
        assert_eq!(
            kind, "session",
            "after the list only `session` messages come: {data}"
        );
        for field in [
            "status",
            "progress",
            "prompts",
            "hasClarifications",
            "clarificationCount",
        ] {
            assert!(
                data.get(field).is_some(),
                "`session` lacks `{field}`: {data}"
            );
        }
        assert!(common::is_timestamp(&data["updatedAt"]), "{data}");
        for (i, (session_id, progress)) in wanted.iter().enumerate() {
            if data["sessionId"] == *session_id {
                counts[i] += 1;
                done[i] |= data["progress"].as_f64() == Some(*progress);
            }
        }
    }
    counts
}

fn assert_newest_first(list: &Value) -> Vec<String> {
    let sessions = list["sessions"].as_array().expect("`sessions` is a list");
    let created: Vec<&str> = sessions
        .iter()
        .map(|s| s["createdAt"].as_str().expect("createdAt"))
        .collect();
    assert!(
        created.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {created:?}"
    );
    assert_eq!(list["truncated"], false);
    sessions
        .iter()
        .map(|s| s["sessionId"].as_str().unwrap().to_owned())
        .collect()
}

/// The session feed (SPEC §6) on all three transports: the list first (newest first),
/// then a `session` whenever one is created or changes, coalesced (a burst of 30 changes is
/// a few messages, the last carrying the latest state); unsubscribing ends it.
#[tokio::test]
async fn the_session_feed_lists_then_streams_coalesced_changes_on_every_transport() {
    let server = spawn_app_with(|_| {}).await;
    post_n(&server, "feed-old", 1, 1).await;
    post_n(&server, "feed-busy", 1, 1).await;

    let mut io = server.connect().await;
    let ack = io.call("subscribe", &json!({ "feed": "sessions" })).await;
    assert_eq!(ack["ok"], true, "{ack}");
    assert_eq!(ack["feed"], "sessions");
    assert_eq!(ack["sessions"], 2);
    let listed = assert_newest_first(&io.wait_for("sessions").await);
    assert_eq!(listed.len(), 2);
    let mut ws = Ws::connect(&ws_url(&server)).await;
    ws.send(json!({ "action": "subscribe", "feed": "sessions" }))
        .await;
    let list = ws.next_json().await;
    assert_eq!(list["type"], "sessions", "{list}");
    assert_eq!(assert_newest_first(&list), listed);
    let response = client()
        .get(server.url("/api/wizard/sessions/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut sse = SseReader::new(response);
    let first = sse.next_event().await;
    assert_eq!((first.event.as_str(), first.id), ("sessions", None));
    assert_eq!(assert_newest_first(&first.json()), listed);

    // A burst of changes, one request each, then a session created while they watch.
    for n in 2..=31 {
        post_n(&server, "feed-busy", n, 1).await;
    }
    post_n(&server, "feed-born", 7, 1).await;
    let wanted = [("feed-busy", 31.0), ("feed-born", 7.0)];
    let on_io = feed_until(&mut io, &wanted).await;
    let on_ws = feed_until(&mut ws, &wanted).await;
    let on_sse = feed_until(&mut sse, &wanted).await;
    for (transport, counts) in [("socket.io", on_io), ("ws", on_ws), ("sse", on_sse)] {
        assert!(
            (1..=10).contains(&counts[0]),
            "{transport}: 30 changes in a burst came as {} `session` messages",
            counts[0]
        );
        assert_eq!(counts[1], 1, "{transport}: one change, one message");
    }

    // Unsubscribed, the socket gets no more; the WebSocket still does.
    let ack = io.call("unsubscribe", &json!({ "feed": "sessions" })).await;
    assert_eq!(ack, json!({ "ok": true, "feed": "sessions" }));
    assert_eq!(io.wait_for("unsubscribed").await["feed"], "sessions");
    post_n(&server, "feed-old", 50, 1).await;
    loop {
        let data = ws.next_json().await;
        if data["sessionId"] == "feed-old" {
            assert_eq!(data["type"], "session");
            break;
        }
    }
    io.call("subscribe", &json!("feed-old")).await;
    let late: Vec<String> = io.drain().into_iter().map(|(name, _)| name).collect();
    assert!(
        !late.iter().any(|name| name == "session"),
        "an unsubscribed socket still got feed messages: {late:?}"
    );

    // A feed that does not exist is refused, and the socket stays usable.
    let ack = io.call("subscribe", &json!({ "feed": "jobs" })).await;
    assert_eq!(ack["ok"], false, "{ack}");
    assert_eq!(ack["error"]["code"], "INVALID_PAYLOAD");
    assert_eq!(io.wait_for("error").await["code"], "INVALID_PAYLOAD");
    let ack = io.call("subscribe", &json!({ "feed": "sessions" })).await;
    assert_eq!(ack["ok"], true, "{ack}");
}
