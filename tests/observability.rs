//! What operators watch (docs/deployment.md, "Metrics" and "Logs"): the histograms and
//! gauges of `/metrics`, `herald_build_info`, and `--log-format json`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::node::Node;
use common::streams::{SseReader, Ws};
use common::{WAIT, harness_http, progress, spawn_app, spawn_app_with};
use serde_json::{Value, json};

/// `/metrics` as (series with its labels, value), comments left out.
async fn scrape(base: &str) -> Vec<(String, f64)> {
    common::metrics_text(&harness_http(), &format!("{base}/metrics"))
        .await
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("a number: {line}")),
            };
            (series.to_owned(), value)
        })
        .collect()
}

fn value(metrics: &[(String, f64)], series: &str) -> Option<f64> {
    metrics.iter().find(|(s, _)| s == series).map(|(_, v)| *v)
}

/// Splits `name{a="1",le="2"}` into its name and labels (in order).
fn parse_series(series: &str) -> (&str, Vec<(&str, &str)>) {
    let Some((name, rest)) = series.split_once('{') else {
        return (series, Vec::new());
    };
    let labels = rest
        .strip_suffix('}')
        .expect("labels end with }")
        .split(',')
        .map(|pair| {
            let (key, value) = pair.split_once('=').expect("label=value");
            (key, value.trim_matches('"'))
        })
        .collect();
    (name, labels)
}

/// One histogram series: its buckets (bound, cumulative count), sum and count.
#[derive(Debug, Default)]
struct Series {
    buckets: Vec<(f64, f64)>,
    sum: Option<f64>,
    count: Option<f64>,
}

/// Every series of histogram `name`, by its labels (`le` aside) as written.
fn histogram(metrics: &[(String, f64)], name: &str) -> BTreeMap<String, Series> {
    let mut found: BTreeMap<String, Series> = BTreeMap::new();
    for (series, value) in metrics {
        let (metric, labels) = parse_series(series);
        let Some(part) = metric.strip_prefix(name) else {
            continue;
        };
        let key = labels
            .iter()
            .filter(|(k, _)| *k != "le")
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let entry = found.entry(key).or_default();
        match part {
            "_bucket" => {
                let le = labels.iter().find(|(k, _)| *k == "le").expect("le").1;
                let bound = match le {
                    "+Inf" => f64::INFINITY,
                    le => le.parse().expect("le is a number"),
                };
                entry.buckets.push((bound, *value));
            }
            "_sum" => entry.sum = Some(*value),
            "_count" => entry.count = Some(*value),
            _ => {}
        }
    }
    found
}

/// Checks every series of histogram `name` is well-formed (bounds ascending, counts
/// cumulative, `+Inf` last and equal to `_count`, a `_sum`); returns the series.
fn checked_histogram(metrics: &[(String, f64)], name: &str) -> BTreeMap<String, Series> {
    let all = histogram(metrics, name);
    assert!(!all.is_empty(), "{name}: not exported");
    for (labels, series) in &all {
        let what = format!("{name}{{{labels}}}");
        assert!(
            series.buckets.len() >= 2,
            "{what}: buckets {:?}",
            series.buckets
        );
        for pair in series.buckets.windows(2) {
            assert!(
                pair[0].0 < pair[1].0,
                "{what}: bounds out of order: {pair:?}"
            );
            assert!(pair[0].1 <= pair[1].1, "{what}: not cumulative: {pair:?}");
        }
        let (last_bound, inf) = *series.buckets.last().unwrap();
        assert_eq!(
            last_bound,
            f64::INFINITY,
            "{what}: +Inf is not the last bucket"
        );
        let count = series.count.unwrap_or_else(|| panic!("{what}: no _count"));
        assert_eq!(inf, count, "{what}: +Inf bucket and _count differ");
        let sum = series.sum.unwrap_or_else(|| panic!("{what}: no _sum"));
        assert!(sum.is_finite() && sum >= 0.0, "{what}: sum {sum}");
    }
    all
}

fn observed(all: &BTreeMap<String, Series>, name: &str, labels: &str) -> f64 {
    let series = all
        .get(labels)
        .unwrap_or_else(|| panic!("{name}{{{labels}}}: not exported; have {:?}", all.keys()));
    series.count.unwrap()
}

#[tokio::test]
async fn a_run_and_a_delivery_fill_every_histogram() {
    let server = spawn_app().await;
    let base = server.url("");

    // A subscriber receiving posted events.
    let mut client = server.connect().await;
    client.subscribe("obs-delivery").await;
    let events: Vec<Value> = (1..=3).map(progress).collect();
    let (status, body) = server.post_events("obs-delivery", &json!(events)).await;
    assert_eq!(status, 202, "{body}");
    for n in 1..=3 {
        let event = client.wait_for("progress").await;
        assert_eq!(event["n"], n);
    }

    // A simulated orchestrated session, run to completion.
    let (status, created) = server
        .post_json(
            "/api/wizard/sessions",
            &json!({ "prompts": ["How are metrics bucketed?"], "models": ["sim-fast"] }),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["sessionId"].as_str().expect("sessionId").to_owned();
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    loop {
        let (_, snapshot) = server.get(&format!("/api/wizard/session/{id}")).await;
        if snapshot["status"] == "COMPLETED" {
            break;
        }
        assert_ne!(snapshot["status"], "FAILED", "{snapshot}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "not completed: {snapshot}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The run's duration is taken once its actor has finished, just after its last event.
    let run = "herald_run_duration_seconds_count{outcome=\"completed\"}";
    let metrics = loop {
        let metrics = scrape(&base).await;
        if value(&metrics, run).is_some_and(|count| count > 0.0) {
            break metrics;
        }
        assert!(tokio::time::Instant::now() < deadline, "{run} stays 0");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let publish = checked_histogram(&metrics, "herald_publish_to_deliver_seconds");
    // 3 posted events, and the run's own.
    assert!(observed(&publish, "publish_to_deliver", "") >= 4.0);
    let lag = checked_histogram(&metrics, "herald_delivery_lag_seconds");
    assert!(observed(&lag, "delivery_lag", "") >= 4.0);
    let first_token = checked_histogram(&metrics, "herald_provider_first_token_seconds");
    assert_eq!(
        first_token.len(),
        3,
        "one series per provider kind: {:?}",
        first_token.keys()
    );
    assert!(observed(&first_token, "first_token", "provider=simulated") >= 1.0);
    assert_eq!(
        observed(&first_token, "first_token", "provider=openai"),
        0.0
    );
    let duration = checked_histogram(&metrics, "herald_provider_duration_seconds");
    assert_eq!(
        duration.len(),
        9,
        "provider kinds × outcomes: {:?}",
        duration.keys()
    );
    assert!(observed(&duration, "duration", "provider=simulated,outcome=ok") >= 1.0);
    let runs = checked_histogram(&metrics, "herald_run_duration_seconds");
    assert_eq!(observed(&runs, "run", "outcome=completed"), 1.0);
    assert_eq!(observed(&runs, "run", "outcome=cancelled"), 0.0);
    // A run of the simulated model takes a while: not nothing, not minutes.
    let sum = runs["outcome=completed"].sum.unwrap();
    assert!(sum > 0.0 && sum < 60.0, "run duration {sum}");

    let build: Vec<_> = metrics
        .iter()
        .filter(|(series, _)| parse_series(series).0 == "herald_build_info")
        .collect();
    assert_eq!(build.len(), 1, "{build:?}");
    assert_eq!(build[0].1, 1.0);
    let labels: BTreeMap<_, _> = parse_series(&build[0].0).1.into_iter().collect();
    assert_eq!(labels.get("version"), Some(&env!("CARGO_PKG_VERSION")));
    for key in ["commit", "rustc"] {
        assert!(
            labels.get(key).is_some_and(|v| !v.is_empty()),
            "{key}: {labels:?}"
        );
    }
    server.shutdown().await;
}

/// A gauge's value, negative ones included.
async fn gauge(base: &str, name: &str) -> f64 {
    value(&scrape(base).await, name).unwrap_or_else(|| panic!("{name} is exported"))
}

/// Waits until `herald_connections` and `herald_subscriptions` read `expected`.
async fn until_gauges(base: &str, expected: (f64, f64)) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = (
            gauge(base, "herald_connections").await,
            gauge(base, "herald_subscriptions").await,
        );
        if now == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "(connections, subscriptions) = {now:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_gauges_count_every_transport_and_return_to_zero() {
    let server = spawn_app().await;
    let base = server.url("");
    let (status, body) = server
        .post_events("obs-gauges", &json!([progress(1)]))
        .await;
    assert_eq!(status, 202, "{body}");
    until_gauges(&base, (0.0, 0.0)).await;

    let mut socket = server.connect().await;
    socket.subscribe("obs-gauges").await;
    until_gauges(&base, (1.0, 1.0)).await;

    let stream = harness_http()
        .get(format!("{base}/api/wizard/session/obs-gauges/stream"))
        .send()
        .await
        .expect("the stream answers");
    let mut sse = SseReader::new(stream);
    assert_eq!(sse.next_event().await.event, "subscribed");
    until_gauges(&base, (2.0, 2.0)).await;

    // The feed is a connection, not a session subscription.
    let feed = harness_http()
        .get(format!("{base}/api/wizard/sessions/stream"))
        .send()
        .await
        .expect("the feed answers");
    let mut feed = SseReader::new(feed);
    assert_eq!(feed.next_event().await.event, "sessions");
    until_gauges(&base, (3.0, 2.0)).await;

    let mut ws = Ws::connect(&format!("ws://{}/ws", server.addr)).await;
    ws.send(json!({ "type": "subscribe", "sessionId": "obs-gauges" }))
        .await;
    assert_eq!(ws.next_json().await["type"], "subscribed");
    // Subscribing again to the same session is still one subscription.
    ws.send(json!({ "type": "subscribe", "sessionId": "obs-gauges" }))
        .await;
    assert_eq!(ws.next_json().await["type"], "subscribed");
    until_gauges(&base, (4.0, 3.0)).await;
    ws.send(json!({ "type": "unsubscribe", "sessionId": "obs-gauges" }))
        .await;
    assert_eq!(ws.next_json().await["type"], "unsubscribed");
    until_gauges(&base, (4.0, 2.0)).await;

    drop(ws);
    drop(feed);
    drop(sse);
    // An engine.io CLOSE packet: the socket leaves.
    socket.send_frame("1".to_owned());
    until_gauges(&base, (0.0, 0.0)).await;
    server.shutdown().await;
}

/// A plain WebSocket whose connection is gone while its replay is still being sent: its
/// writer ends, and with it the request in flight. The subscription it was setting up must
/// not be taken off the gauge without having been put on it.
#[tokio::test]
async fn a_websocket_gone_mid_replay_leaves_the_gauges_at_zero() {
    // A queue of 74 messages (max-batch + 64) and a replay of ~32 MB: far more than the
    // queue and the sockets' kernel buffers hold, so the replay is still going when the
    // client goes.
    let server = spawn_app_with(|config| {
        config.max_batch = 10;
        config.socket_buffer = 1;
        config.max_session_bytes = 64 * 1024 * 1024;
    })
    .await;
    let base = server.url("");
    let pad = "x".repeat(32 * 1024);
    for batch in 0..100u64 {
        let events: Vec<Value> = (0..10)
            .map(|i| {
                let n = batch * 10 + i;
                json!({ "event": "progress", "data": { "status": "PROCESSING", "progress": n % 100, "pad": pad } })
            })
            .collect();
        let (status, body) = server.post_events("obs-replay", &json!(events)).await;
        assert_eq!(status, 202, "{body}");
    }

    let mut ws = Ws::connect(&format!("ws://{}/ws", server.addr)).await;
    ws.send(json!({ "type": "subscribe", "sessionId": "obs-replay", "lastSeq": 0 }))
        .await;
    // Reads nothing: herald's writer fills the socket's buffers and waits.
    tokio::time::sleep(Duration::from_millis(500)).await;
    until_gauges(&base, (1.0, 1.0)).await;
    // Closing a socket with unread data resets the connection: herald's blocked write fails.
    drop(ws);
    until_gauges(&base, (0.0, 0.0)).await;
    server.shutdown().await;
}

/// Whether every line `node` logged so far is a JSON object with a timestamp, a level and a
/// message; waits until it has logged `ready`.
async fn logged_lines(node: &Node) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let tail = node.stderr_tail();
        if tail.contains("ready") {
            return tail.lines().map(str::to_owned).collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: no `ready` line in:\n{tail}",
            node.name
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_json_lines(name: &str, lines: &[String]) {
    assert!(!lines.is_empty(), "{name}: logged nothing");
    for line in lines {
        let object: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{name}: a log line that is not JSON ({e}): {line}"));
        assert!(object.is_object(), "{name}: {line}");
        for key in ["timestamp", "level", "target", "message"] {
            assert!(object[key].is_string(), "{name}: no `{key}` in {line}");
        }
    }
    let ready: Value = lines
        .iter()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .find(|line| line["message"] == "ready")
        .unwrap_or_else(|| panic!("{name}: no ready line"));
    assert_eq!(ready["level"], "INFO");
    // The event's fields sit beside the message.
    assert!(
        ready["addr"]
            .as_str()
            .is_some_and(|a| a.contains("127.0.0.1")),
        "{ready}"
    );
}

#[tokio::test]
async fn log_format_json_makes_every_stderr_line_a_json_object() {
    let flag = Node::start("json-flag", &["--log-format", "json"]).await;
    assert_json_lines(&flag.name, &logged_lines(&flag).await);

    let env = Node::start_with_env("json-env", &[], &[("HERALD_LOG_FORMAT", "json")]).await;
    assert_json_lines(&env.name, &logged_lines(&env).await);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("herald.toml");
    std::fs::write(&file, "[server]\nlog_format = \"json\"\n").unwrap();
    let from_file = Node::start("json-file", &["--config", file.to_str().unwrap()]).await;
    assert_json_lines(&from_file.name, &logged_lines(&from_file).await);

    // The default is text: the same check fails on it.
    let text = Node::start("text", &[]).await;
    let lines = logged_lines(&text).await;
    assert!(
        lines
            .iter()
            .all(|line| serde_json::from_str::<Value>(line).is_err()),
        "text lines are not JSON: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|line| line.contains("INFO") && line.contains("ready"))
    );
}
