//! Shared test harness: a real herald on a free port and a minimal Socket.IO v5 client
//! over real websockets (Engine.IO v4 text frames).
#![allow(dead_code)]

pub mod fake_llm;
pub mod node;
pub mod raw;
pub mod redis;
pub mod runs;
pub mod streams;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald::{Config, Server};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// How long any single awaited event may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
    http: reqwest::Client,
}

pub async fn spawn_app() -> TestServer {
    spawn_app_with(|_| {}).await
}

/// The HS256 secret of every herald the suite starts with auth on.
pub const TEST_JWT_SECRET: &str = "herald-test-secret-0123456789abcdef";

/// Whether the suite runs with auth on (`HERALD_TEST_AUTH=1`): then every herald it starts
/// verifies tokens, and the harness's clients present an admin token.
pub fn auth_under_test() -> bool {
    std::env::var("HERALD_TEST_AUTH").is_ok_and(|v| v == "1")
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token with `claims`, signed with `secret`.
pub fn sign_token(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// The harness's own credential when auth is under test.
pub fn harness_token() -> Option<String> {
    auth_under_test().then(|| {
        sign_token(
            &json!({ "sub": "harness", "exp": unix_now() + 3600, "scope": "admin" }),
            TEST_JWT_SECRET,
        )
    })
}

pub async fn spawn_app_with(tune: impl FnOnce(&mut Config)) -> TestServer {
    let mut config = Config::defaults();
    config.host = "127.0.0.1".parse().unwrap();
    config.port = 0;
    config.dev = true;
    if auth_under_test() {
        config.jwt_secret = Some(herald::config::Secret::new(TEST_JWT_SECRET));
    }
    tune(&mut config);
    let server = Server::bind(config).await.expect("server binds");
    let addr = server.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        server
            .serve(async {
                let _ = stopped.await;
            })
            .await
            .expect("server runs");
    });
    let server = TestServer {
        addr,
        stop: Some(stop),
        handle: Some(handle),
        http: harness_http(),
    };
    assert_auth_as_tested(addr).await;
    server
}

/// With auth under test, proves the server really refuses a caller without credentials,
/// so a suite run "with auth on" cannot silently run with it off.
pub async fn assert_auth_as_tested(addr: SocketAddr) {
    if !auth_under_test() {
        return;
    }
    let status = reqwest::get(format!("http://{addr}/api/wizard/sessions"))
        .await
        .expect("herald answers")
        .status();
    assert_eq!(
        status.as_u16(),
        401,
        "auth is under test but herald let an anonymous caller in"
    );
}

/// The `/metrics` page at `url`, read with `http`.
pub async fn metrics_text(http: &reqwest::Client, url: &str) -> String {
    http.get(url)
        .send()
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("/metrics has a body")
}

/// One series of the `/metrics` page at `url` (with its labels, e.g.
/// `herald_http_errors_total{code="RATE_LIMITED"}`), read with `http`.
pub async fn metric_from(http: &reqwest::Client, url: &str, series: &str) -> Option<u64> {
    metrics_text(http, url)
        .await
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// An HTTP client that presents the harness's token when auth is under test.
pub fn harness_http() -> reqwest::Client {
    harness_http_builder().build().unwrap()
}

pub fn harness_http_builder() -> reqwest::ClientBuilder {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = harness_token() {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
    }
    reqwest::Client::builder().default_headers(headers)
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// POSTs JSON to the ingest route; returns status and body.
    pub async fn post_events(&self, session_id: &str, body: &Value) -> (u16, Value) {
        self.post_raw(
            &format!("/api/sessions/{session_id}/events"),
            "application/json",
            body.to_string(),
        )
        .await
    }

    /// POSTs a JSON body to `path`; returns status and body.
    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, "application/json", body.to_string())
            .await
    }

    pub async fn post_raw(&self, path: &str, content_type: &str, body: String) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request sent");
        let status = response.status().as_u16();
        let body = response.json::<Value>().await.unwrap_or(Value::Null);
        (status, body)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(self.url(path))
            .send()
            .await
            .expect("request sent");
        let status = response.status().as_u16();
        (
            status,
            response.json::<Value>().await.unwrap_or(Value::Null),
        )
    }

    /// The retained history of a session (`None` when unknown).
    pub async fn history(&self, session_id: &str) -> Option<Vec<Value>> {
        let (status, body) = self
            .get(&format!(
                "/api/wizard/session/{session_id}/events?after=0&limit=1000"
            ))
            .await;
        (status == 200).then(|| body["events"].as_array().cloned().unwrap_or_default())
    }

    /// The value of one series of `/metrics`, named in full with its labels
    /// (`herald_http_errors_total{code="INTERNAL"}`); `None` when it is not exported.
    pub async fn metric(&self, series: &str) -> Option<u64> {
        metric_from(&self.http, &self.url("/metrics"), series).await
    }

    pub async fn connect(&self) -> Client {
        Client::connect(self.addr).await
    }

    /// Stops the server the way SIGTERM does and waits for it to finish.
    pub async fn shutdown(self) {
        self.shutdown_within(WAIT).await
    }

    /// [`TestServer::shutdown`], failing unless the server finishes within `limit`.
    pub async fn shutdown_within(mut self, limit: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(limit, handle)
                .await
                .expect("graceful shutdown finishes")
                .expect("server task ok");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

type Acks = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A Socket.IO client speaking the wire protocol itself, so tests see exactly what a
/// client receives.
pub struct Client {
    pub sid: String,
    out: mpsc::UnboundedSender<Message>,
    events: mpsc::UnboundedReceiver<(String, Value)>,
    acks: Acks,
    next_ack: u64,
    pub disconnected: Arc<tokio::sync::Notify>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        Self::connect_then(addr, &[]).await
    }

    /// Opens the websocket, sends the namespace CONNECT and sends `first` frames the
    /// instant the server's CONNECT reply arrives, from the reading task itself: the
    /// tightest race a real client (which waits for CONNECT before emitting) can make
    /// against the server's handler registration.
    pub async fn connect_then(addr: SocketAddr, first: &[String]) -> Client {
        let auth = harness_token().map(|token| json!({ "token": token }));
        Self::connect_as(addr, auth.as_ref(), first)
            .await
            .unwrap_or_else(|refusal| panic!("connection refused: {refusal}"))
    }

    /// Connects presenting `auth` in the namespace CONNECT (socket.io's `auth` option);
    /// a CONNECT_ERROR is returned as its payload.
    pub async fn connect_as(
        addr: SocketAddr,
        auth: Option<&Value>,
        first: &[String],
    ) -> Result<Client, Value> {
        Self::connect_with_query(addr, "", auth, first).await
    }

    /// [`Client::connect_as`] with `query` (`&name=value...`) added to the handshake URL.
    pub async fn connect_with_query(
        addr: SocketAddr,
        query: &str,
        auth: Option<&Value>,
        first: &[String],
    ) -> Result<Client, Value> {
        let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket{query}");
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connects");
        let (mut sink, mut stream) = ws.split();
        let open = match stream.next().await {
            Some(Ok(Message::Text(text))) => text.to_string(),
            other => panic!("expected the engine.io open packet, got {other:?}"),
        };
        assert!(open.starts_with('0'), "open packet: {open}");
        let connect = match auth {
            Some(auth) => format!("40{auth}"),
            None => "40".to_owned(),
        };
        sink.send(Message::text(connect)).await.unwrap();
        let first: Vec<Message> = first.iter().map(|f| Message::text(f.clone())).collect();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let (events_tx, events) = mpsc::unbounded_channel();
        let acks: Acks = Arc::default();
        let disconnected = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(async move {
            while let Some(message) = out_rx.recv().await {
                if sink.send(message).await.is_err() {
                    break;
                }
            }
        });
        let (sid_tx, sid_rx) = oneshot::channel();
        {
            let out = out.clone();
            let acks = acks.clone();
            let disconnected = disconnected.clone();
            let mut first = first;
            tokio::spawn(async move {
                let mut sid_tx = Some(sid_tx);
                while let Some(Ok(message)) = stream.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    let text = text.as_str();
                    if text == "2" {
                        let _ = out.send(Message::text("3"));
                    } else if let Some(rest) = text.strip_prefix("40") {
                        for frame in first.drain(..) {
                            let _ = out.send(frame);
                        }
                        let sid = serde_json::from_str::<Value>(rest)
                            .ok()
                            .and_then(|v| v["sid"].as_str().map(str::to_owned));
                        if let Some(tx) = sid_tx.take() {
                            let _ = tx.send(Ok(sid.unwrap_or_default()));
                        }
                    } else if let Some(rest) = text.strip_prefix("44") {
                        if let Some(tx) = sid_tx.take() {
                            let _ = tx.send(Err(serde_json::from_str(rest).unwrap_or(Value::Null)));
                        }
                    } else if let Some(rest) = text.strip_prefix("42") {
                        let value: Value = serde_json::from_str(rest).expect("event frame is JSON");
                        let name = value[0].as_str().expect("event name").to_owned();
                        let _ =
                            events_tx.send((name, value.get(1).cloned().unwrap_or(Value::Null)));
                    } else if let Some(rest) = text.strip_prefix("43") {
                        let digits = rest.chars().take_while(char::is_ascii_digit).count();
                        let id: u64 = rest[..digits].parse().expect("ack id");
                        let value: Value =
                            serde_json::from_str(&rest[digits..]).expect("ack is JSON");
                        if let Some(tx) = acks.lock().unwrap().remove(&id) {
                            let _ = tx.send(value.get(0).cloned().unwrap_or(Value::Null));
                        }
                    } else if text.starts_with("41") || text == "1" {
                        break;
                    }
                }
                disconnected.notify_waiters();
                disconnected.notify_one();
            });
        }
        let sid = tokio::time::timeout(WAIT, sid_rx)
            .await
            .expect("CONNECT reply in time")
            .expect("CONNECT reply")?;
        Ok(Client {
            sid,
            out,
            events,
            acks,
            next_ack: 0,
            disconnected,
        })
    }

    pub fn emit(&self, event: &str, data: &Value) {
        self.send_frame(format!("42{}", json!([event, data])));
    }

    pub fn send_frame(&self, frame: String) {
        let _ = self.out.send(Message::text(frame));
    }

    /// Emits with an ack callback and waits for the ack's first argument.
    pub async fn call(&mut self, event: &str, data: &Value) -> Value {
        let id = self.next_ack;
        self.next_ack += 1;
        let (tx, rx) = oneshot::channel();
        self.acks.lock().unwrap().insert(id, tx);
        self.send_frame(format!("42{id}{}", json!([event, data])));
        tokio::time::timeout(WAIT, rx)
            .await
            .expect("ack in time")
            .expect("ack")
    }

    /// The next event of any name, within `limit`.
    pub async fn next_within(&mut self, limit: Duration) -> (String, Value) {
        tokio::time::timeout(limit, self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("no event within {limit:?}"))
            .expect("the socket closed")
    }

    /// The next event of any name.
    pub async fn next(&mut self) -> (String, Value) {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("an event in time")
            .expect("socket still open")
    }

    /// The next event, which must be `name`.
    pub async fn expect(&mut self, name: &str) -> Value {
        let (got, data) = self.next().await;
        assert_eq!(got, name, "expected `{name}`, got `{got}`: {data}");
        data
    }

    /// Skips events until one named `name` arrives.
    /// Skips events until one named `name` arrives, waiting up to `limit` in all (for
    /// waits longer than [`WAIT`], e.g. a lease running out).
    pub async fn wait_for_within(&mut self, name: &str, limit: Duration) -> Value {
        let found = tokio::time::timeout(limit, async {
            while let Some((got, data)) = self.events.recv().await {
                if got == name {
                    return Some(data);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(data)) => data,
            Ok(None) => panic!("the socket closed before `{name}` arrived"),
            Err(_) => panic!("no `{name}` within {limit:?}"),
        }
    }

    pub async fn wait_for(&mut self, name: &str) -> Value {
        loop {
            let (got, data) = self.next().await;
            if got == name {
                return data;
            }
        }
    }

    /// The events received but not yet read, without waiting.
    pub fn drain(&mut self) -> Vec<(String, Value)> {
        std::iter::from_fn(|| self.events.try_recv().ok()).collect()
    }

    /// Asserts nothing arrives within `window` (a bounded negative check).
    pub async fn expect_silence(&mut self, window: Duration) {
        if let Ok(Some((name, data))) = tokio::time::timeout(window, self.events.recv()).await {
            panic!("expected no event, got `{name}`: {data}");
        }
    }

    /// Subscribes (string form) and consumes the `connected` and `subscribed` events.
    pub async fn subscribe(&mut self, session_id: &str) -> Value {
        let ack = self.call("subscribe", &json!(session_id)).await;
        assert_eq!(ack["ok"], true, "subscribe ack: {ack}");
        self.wait_for("subscribed").await
    }
}

/// A valid `progress` item for the ingest route.
/// Sends `signal` (e.g. `"STOP"`, `"CONT"`) to process `pid`, which messages call `what`.
pub fn send_signal(pid: u32, signal: &str, what: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} {pid} ({what}) failed");
}

pub fn progress(n: u64) -> Value {
    json!({ "event": "progress", "data": { "status": "PROCESSING", "progress": n % 101, "n": n } })
}

pub fn is_timestamp(value: &Value) -> bool {
    let Some(t) = value.as_str() else {
        return false;
    };
    let b = t.as_bytes();
    t.len() == 24
        && b[4] == b'-'
        && b[10] == b'T'
        && b[19] == b'.'
        && b[23] == b'Z'
        && chrono_like(t)
}

fn chrono_like(t: &str) -> bool {
    t.chars().enumerate().all(|(i, c)| match i {
        4 | 7 => c == '-',
        10 => c == 'T',
        13 | 16 => c == ':',
        19 => c == '.',
        23 => c == 'Z',
        _ => c.is_ascii_digit(),
    })
}
