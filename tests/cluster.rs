//! Cluster mode (SPEC §4): several real herald processes sharing one private Redis.
//!
//! Every test starts its own `redis-server` (tests/common/redis.rs) and its own herald
//! processes (tests/common/node.rs: `herald serve --redis-url … --redis-prefix …`), then
//! talks to them the way producers and front ends do: HTTP and raw Socket.IO over
//! websockets. What is checked is the cluster contract: one `seq` order per session for
//! the whole cluster, each node delivering every event to its sockets exactly once and in
//! order whichever node logged it, replay from Redis on any node, the same snapshot and
//! history everywhere, orchestrator commands reaching the node that runs the session, and
//! recovery from Redis trouble and from a dead node without restarting anything.
//!
//! Nothing waits by sleeping: events are awaited with timeouts (`Client::next`), HTTP
//! state is polled within a bound.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::node::Node;
use common::redis::RedisServer;
use common::streams::{SseReader, Ws};
use common::{Client, progress};
use futures_util::future::join_all;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// The five session events (docs/protocol.md).
const SESSION_EVENTS: [&str; 5] = [
    "progress",
    "model_result",
    "clarification",
    "completed",
    "error",
];

/// How long a bounded poll of HTTP state may take.
const POLL_WITHIN: Duration = Duration::from_secs(20);
/// Between two polls.
const POLL_EVERY: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------------------
// The cluster

/// (Fields drop in order: the nodes go first, so a failing test shows their logs from
/// before Redis went away.)
struct Cluster {
    nodes: Vec<Node>,
    redis: RedisServer,
}

impl Cluster {
    /// A fresh Redis and `n` nodes on it (one unique key prefix), each ready.
    async fn start(n: usize) -> Cluster {
        Self::start_with(n, &[]).await
    }

    /// [`Cluster::start`] with `args` added to every node's command line.
    async fn start_with(n: usize, args: &[&str]) -> Cluster {
        let redis = RedisServer::start().await;
        let url = redis.url();
        let prefix = unique("herald-test");
        let nodes = join_all((0..n).map(|i| {
            let name = format!("node-{i}");
            let (url, prefix) = (url.clone(), prefix.clone());
            async move {
                let mut all = vec!["--redis-url", &url, "--redis-prefix", &prefix];
                all.extend_from_slice(args);
                Node::start(&name, &all).await
            }
        }))
        .await;
        let cluster = Cluster { redis, nodes };
        for node in &cluster.nodes {
            wait_readyz(node, 200).await;
        }
        cluster
    }

    fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }
}

/// A session id no other test uses.
fn unique(name: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{name}-{}", &id[..12])
}

/// Polls `GET /readyz` on `node` until it answers `want` (200 or 503), checking the body
/// shape of that answer; fails after [`POLL_WITHIN`].
async fn wait_readyz(node: &Node, want: u16) {
    let started = Instant::now();
    loop {
        let (status, body) = node.get("/readyz").await;
        if status == want {
            match want {
                200 => assert_eq!(body, json!({ "status": "ready" }), "{}", node.name),
                _ => {
                    assert_eq!(body["error"]["code"], "NOT_READY", "{}: {body}", node.name);
                    assert!(
                        body["error"]["message"].is_string(),
                        "{}: {body}",
                        node.name
                    );
                }
            }
            return;
        }
        assert!(
            started.elapsed() < POLL_WITHIN,
            "{}: /readyz did not answer {want} within {POLL_WITHIN:?}; last answer {status} {body}",
            node.name,
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

// ---------------------------------------------------------------------------------------
// Producing and following

/// Posts `items` to `node`; asserts 202 and that the batch got consecutive seqs; returns
/// them.
async fn post(node: &Node, session: &str, items: Vec<Value>) -> Vec<u64> {
    let count = items.len();
    let (status, reply) = node.post_events(session, &json!(items)).await;
    assert_eq!(status, 202, "{}: POST {session} events: {reply}", node.name);
    let seqs: Vec<u64> = reply["seqs"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no seqs in {reply}", node.name))
        .iter()
        .map(|s| s.as_u64().expect("a seq"))
        .collect();
    assert_eq!(seqs.len(), count, "{}: {reply}", node.name);
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "{}: a batch must get consecutive seqs: {seqs:?}",
        node.name
    );
    assert_eq!(
        reply["lastSeq"],
        *seqs.last().unwrap(),
        "{}: {reply}",
        node.name
    );
    seqs
}

/// `count` progress items whose `n` are `first..first+count`.
fn batch(first: u64, count: u64) -> Vec<Value> {
    (first..first + count).map(progress).collect()
}

/// Subscribes with `lastSeq` (and `epoch` when given); returns the ack after checking it.
async fn subscribe_from(
    client: &mut Client,
    session: &str,
    last_seq: u64,
    epoch: Option<&str>,
) -> Value {
    let mut request = json!({ "sessionId": session, "lastSeq": last_seq });
    if let Some(epoch) = epoch {
        request["epoch"] = json!(epoch);
    }
    let ack = client.call("subscribe", &request).await;
    assert_eq!(ack["ok"], true, "subscribe {request}: {ack}");
    assert_eq!(ack["sessionId"], session, "{ack}");
    ack
}

/// The session events one client received, per session, in arrival order.
type Received = HashMap<String, Vec<(String, Value)>>;

/// Files a received event; `false` when it is not a session event.
fn record(received: &mut Received, name: &str, data: Value) -> bool {
    if !SESSION_EVENTS.contains(&name) {
        return false;
    }
    assert!(
        data["seq"].is_u64(),
        "a `{name}` without seq (a socket error?): {data}"
    );
    let session = data["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("`{name}` without sessionId: {data}"))
        .to_owned();
    received
        .entry(session)
        .or_default()
        .push((name.to_owned(), data));
    true
}

fn last_seq(events: &[(String, Value)]) -> u64 {
    events.last().map_or(0, |(_, d)| d["seq"].as_u64().unwrap())
}

/// Reads events until every session in `want` reached (at least) its seq.
async fn collect_into(client: &mut Client, received: &mut Received, want: &HashMap<String, u64>) {
    let done = |received: &Received| {
        want.iter()
            .all(|(id, last)| received.get(id).is_some_and(|e| last_seq(e) >= *last))
    };
    while !done(received) {
        let (name, data) = client.next().await;
        record(received, &name, data);
    }
}

async fn collect(client: &mut Client, want: &HashMap<String, u64>) -> Received {
    let mut received = Received::new();
    collect_into(client, &mut received, want).await;
    received
}

/// Reads one session's events until its `completed` or `error` event.
async fn read_to_end(client: &mut Client, received: &mut Received, session: &str) {
    loop {
        let (name, data) = client.next().await;
        let ends = (name == "completed" || name == "error") && data["sessionId"] == session;
        if record(received, &name, data) && ends {
            return;
        }
    }
}

fn seqs(events: &[(String, Value)]) -> Vec<u64> {
    events
        .iter()
        .map(|(_, d)| d["seq"].as_u64().unwrap())
        .collect()
}

/// Asserts `got` is exactly `from..=to`; on failure names the first deviation.
fn assert_contiguous(label: &str, got: &[u64], from: u64, to: u64) {
    let want: Vec<u64> = (from..=to).collect();
    if got == want.as_slice() {
        return;
    }
    let at = got
        .iter()
        .zip(&want)
        .position(|(g, w)| g != w)
        .unwrap_or(got.len().min(want.len()));
    let around = |v: &[u64]| v[at.saturating_sub(3)..(at + 4).min(v.len())].to_vec();
    panic!(
        "{label}: expected seq {from}..={to} exactly once in order; got {} events, first \
         deviation at index {at}: got {:?} where {:?} was expected (duplicates: {:?}, missing: {:?})",
        got.len(),
        around(got),
        around(&want),
        duplicates(got),
        missing(got, from, to),
    );
}

fn duplicates(got: &[u64]) -> Vec<u64> {
    let mut count = BTreeMap::new();
    for s in got {
        *count.entry(*s).or_insert(0) += 1;
    }
    count
        .into_iter()
        .filter(|(_, c)| *c > 1)
        .map(|(s, _)| s)
        .take(10)
        .collect()
}

fn missing(got: &[u64], from: u64, to: u64) -> Vec<u64> {
    let have: std::collections::BTreeSet<u64> = got.iter().copied().collect();
    (from..=to).filter(|s| !have.contains(s)).take(10).collect()
}

/// The retained history of `session` on `node`, by seq.
async fn history_by_seq(node: &Node, session: &str) -> BTreeMap<u64, (String, Value)> {
    let body = node
        .history_after(session, 0)
        .await
        .unwrap_or_else(|| panic!("{}: no history for {session}", node.name));
    assert_eq!(body["truncated"], false, "{}: {body}", node.name);
    body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                (e["event"].as_str().unwrap().to_owned(), e["data"].clone()),
            )
        })
        .collect()
}

/// Asserts every received event is, name and data, the logged event of its seq.
fn assert_as_logged(label: &str, events: &[(String, Value)], log: &BTreeMap<u64, (String, Value)>) {
    for (name, data) in events {
        let seq = data["seq"].as_u64().unwrap();
        let logged = log
            .get(&seq)
            .unwrap_or_else(|| panic!("{label}: seq {seq} is not in the history"));
        assert_eq!(
            (name, data),
            (&logged.0, &logged.1),
            "{label}: seq {seq} differs from the logged event"
        );
    }
}

/// `CLIENT KILL TYPE pubsub` on the Redis at `port`; returns how many connections it
/// closed.
async fn kill_pubsub_connections(port: u16) -> i64 {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the test redis");
    stream
        .write_all(b"*4\r\n$6\r\nCLIENT\r\n$4\r\nKILL\r\n$4\r\nTYPE\r\n$6\r\npubsub\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let mut chunk = [0u8; 256];
    while !reply.ends_with(b"\r\n") {
        let n = tokio::time::timeout(common::WAIT, stream.read(&mut chunk))
            .await
            .expect("CLIENT KILL answered in time")
            .unwrap();
        assert!(n > 0, "redis closed the connection");
        reply.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&reply);
    text.strip_prefix(':')
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("CLIENT KILL TYPE pubsub answered {text:?}"))
}

// ---------------------------------------------------------------------------------------
// 1. Fan-out: producers on different nodes, clients on every node

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_on_every_node_sees_each_seq_once_in_order_while_nodes_race() {
    const NODES: usize = 3;
    const SESSIONS: usize = 3;
    const CLIENTS: usize = 30;
    const BATCHES: u64 = 20;
    const BATCH: u64 = 5;
    let total = NODES as u64 * BATCHES * BATCH;
    let cluster = Cluster::start(NODES).await;
    let sessions: Vec<String> = (0..SESSIONS).map(|i| unique(&format!("fan-{i}"))).collect();

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let mut client = cluster.node(c % NODES).connect().await;
        for id in &sessions {
            subscribe_from(&mut client, id, 0, None).await;
        }
        clients.push(client);
    }

    // Producer p posts every batch of every session to node p: the three nodes log into
    // the same sessions at the same time.
    let producers = (0..NODES).map(|p| {
        let node = cluster.node(p);
        let sessions = &sessions;
        async move {
            let mut got: HashMap<String, Vec<u64>> = HashMap::new();
            for b in 0..BATCHES {
                for id in sessions {
                    let first = p as u64 * 1_000_000 + b * BATCH;
                    let seqs = post(node, id, batch(first, BATCH)).await;
                    got.entry(id.clone()).or_default().extend(seqs);
                }
            }
            got
        }
    });
    let accepted = join_all(producers).await;

    // One sequencer per session for the whole cluster: the seqs the three nodes handed
    // out are 1..=total, none twice.
    for id in &sessions {
        let mut all: Vec<u64> = accepted.iter().flat_map(|g| g[id].clone()).collect();
        all.sort_unstable();
        assert_contiguous(
            &format!("seqs assigned for {id} by all nodes"),
            &all,
            1,
            total,
        );
    }

    let mut logs = HashMap::new();
    for id in &sessions {
        logs.insert(id.clone(), history_by_seq(cluster.node(0), id).await);
    }
    let want: HashMap<String, u64> = sessions.iter().map(|id| (id.clone(), total)).collect();
    for (c, client) in clients.iter_mut().enumerate() {
        let received = collect(client, &want).await;
        for id in &sessions {
            let label = format!("client {c} on node-{} following {id}", c % NODES);
            assert_contiguous(&label, &seqs(&received[id]), 1, total);
            assert_as_logged(&label, &received[id], &logs[id]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// 2. Replay on one node of events logged on another, hand-over to live events of a third

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_on_one_node_hands_over_to_live_events_logged_on_another() {
    const BEFORE: u64 = 50;
    const BATCHES: u64 = 40;
    const BATCH: u64 = 5;
    const SUBSCRIBERS: u64 = 12;
    let total = BEFORE + BATCHES * BATCH;
    let cluster = Cluster::start(3).await;
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let id = unique("handover");

    for k in 0..BEFORE / 5 {
        post(a, &id, batch(k * 5, 5)).await;
    }
    let snapshot = b.snapshot(&id).await.expect("node-1 knows the session");
    assert_eq!(snapshot["lastSeq"], BEFORE, "{snapshot}");
    let epoch = snapshot["epoch"].as_str().unwrap().to_owned();
    assert!(!epoch.is_empty(), "{snapshot}");

    // Subscribers join node-1 at staggered points of a producer posting to node-2, each
    // with the last seq it "saw"; half of them also name the epoch.
    let (progress_tx, progress_rx) = watch::channel(0u64);
    let producer = async {
        for k in 0..BATCHES {
            post(c, &id, batch(1_000 + k * BATCH, BATCH)).await;
            progress_tx.send_replace(k + 1);
        }
    };
    // Subscriber i joins once 3·i batches are logged, with a lastSeq somewhere in what
    // is logged by then.
    let schedule = (0..SUBSCRIBERS).map(|i| {
        let after_batches = i * 3;
        (
            after_batches,
            (i * 23) % (BEFORE + after_batches * BATCH + 1),
        )
    });
    // Connected beforehand, so each subscribe goes out the moment its batch is logged.
    let mut clients = Vec::new();
    for _ in 0..SUBSCRIBERS {
        clients.push(b.connect().await);
    }
    let subscribers = async {
        let mut asked = Vec::new();
        for ((i, (after_batches, from)), client) in schedule.enumerate().zip(clients) {
            let mut rx = progress_rx.clone();
            rx.wait_for(|done| *done >= after_batches).await.unwrap();
            let mut request = json!({ "sessionId": id, "lastSeq": from });
            if i % 2 == 0 {
                request["epoch"] = json!(epoch);
            }
            client.emit("subscribe", &request);
            asked.push((from, client));
        }
        asked
    };
    let ((), asked) = tokio::join!(producer, subscribers);
    let mut joined = Vec::new();
    for (from, mut client) in asked {
        let subscribed = client.wait_for("subscribed").await;
        assert_eq!(
            subscribed["recovered"], true,
            "lastSeq {from}: {subscribed}"
        );
        assert_eq!(
            subscribed["epoch"],
            epoch.as_str(),
            "lastSeq {from}: {subscribed}"
        );
        let head = subscribed["lastSeq"].as_u64().expect("lastSeq");
        joined.push((from, head, client));
    }

    let log = history_by_seq(a, &id).await;
    assert_eq!(log.len() as u64, total);
    let want = HashMap::from([(id.clone(), total)]);
    for (from, head, client) in &mut joined {
        let received = collect(client, &want).await;
        let label = format!(
            "client on node-1 subscribed with lastSeq {from} (its `subscribed` said lastSeq {head})"
        );
        assert_contiguous(&label, &seqs(&received[&id]), *from + 1, total);
        assert_as_logged(&label, &received[&id], &log);
    }
}

// ---------------------------------------------------------------------------------------
// 3. The snapshot and the history are the same on every node

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_history_and_listing_agree_on_every_node() {
    let cluster = Cluster::start(3).await;
    let id = unique("snap");
    let items = [
        json!({ "event": "progress", "data": { "status": "ACTIVE", "progress": 10 } }),
        json!({ "event": "model_result", "data": { "promptId": "p1", "modelName": "m1", "status": "completed", "result": "four" } }),
        json!({ "event": "clarification", "data": { "clarificationId": "c1", "question": "Which year?", "status": "pending" } }),
        json!({ "event": "clarification", "data": { "clarificationId": "c1", "question": "Which year?", "status": "answered", "answer": "2025" } }),
        json!({ "event": "progress", "data": { "status": "COMPLETED", "progress": 100 } }),
        json!({ "event": "completed", "data": { "result": { "answer": 42 } } }),
    ];
    // Each event through another node, so every node logged some of them.
    for (i, item) in items.iter().enumerate() {
        let seqs = post(cluster.node(i % 3), &id, vec![item.clone()]).await;
        assert_eq!(seqs, [i as u64 + 1]);
    }

    let first = cluster
        .node(0)
        .snapshot(&id)
        .await
        .expect("node-0 snapshot");
    assert_eq!(first["sessionId"], id.as_str(), "{first}");
    assert_eq!(first["lastSeq"], 6, "{first}");
    assert_eq!(first["status"], "COMPLETED", "{first}");
    assert_eq!(first["progress"].as_f64(), Some(100.0), "{first}");
    assert_eq!(first["result"], json!({ "answer": 42 }), "{first}");
    assert_eq!(first["clarificationCount"], 0, "{first}");
    assert_eq!(first["clarifications"][0]["status"], "answered", "{first}");
    assert!(!first["epoch"].as_str().unwrap_or("").is_empty(), "{first}");
    let full = cluster.node(0).history_after(&id, 0).await.unwrap();
    let tail = cluster.node(0).history_after(&id, 3).await.unwrap();
    assert_eq!(full["lastSeq"], 6, "{full}");
    assert_eq!(full["epoch"], first["epoch"], "{full}");
    let logged: Vec<u64> = full["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(logged, [1, 2, 3, 4, 5, 6], "{full}");
    for (i, e) in full["events"].as_array().unwrap().iter().enumerate() {
        assert_eq!(e["event"], items[i]["event"], "{e}");
        assert_eq!(e["data"]["sessionId"], id.as_str(), "{e}");
    }

    for node in &cluster.nodes[1..] {
        let snapshot = node.snapshot(&id).await.expect("snapshot");
        assert_eq!(
            snapshot, first,
            "{}: the snapshot differs from node-0's",
            node.name
        );
        assert_eq!(
            node.history_after(&id, 0).await.as_ref(),
            Some(&full),
            "{}: history after 0 differs from node-0's",
            node.name
        );
        assert_eq!(
            node.history_after(&id, 3).await.as_ref(),
            Some(&tail),
            "{}: history after 3 differs from node-0's",
            node.name
        );
    }
    for node in &cluster.nodes {
        let (status, body) = node.get("/api/wizard/sessions").await;
        assert_eq!(status, 200, "{}: {body}", node.name);
        let listed = body["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["sessionId"] == id.as_str());
        assert!(listed, "{}: {id} is not listed: {body}", node.name);
        let (status, body) = node.get("/api/wizard/session/never-logged-here").await;
        assert_eq!(status, 404, "{}: {body}", node.name);
        assert_eq!(body["error"]["code"], "SESSION_NOT_FOUND", "{body}");
    }
}

// ---------------------------------------------------------------------------------------
// 4. Orchestrated sessions: watched, answered and cancelled from other nodes

/// `POST /api/wizard/sessions` on `node`; returns the new session id.
async fn create_session(node: &Node, body: Value) -> String {
    let (status, reply) = node.post_json("/api/wizard/sessions", &body).await;
    assert_eq!(status, 201, "{}: create {body}: {reply}", node.name);
    reply["sessionId"].as_str().expect("sessionId").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_on_one_node_is_watched_and_answered_from_others_and_completes() {
    let cluster = Cluster::start(3).await;
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let id = create_session(
        a,
        json!({
            "prompts": ["Plan the product launch [clarify]", "Write the summary"],
            "models": ["sim-fast", "sim-balanced"],
        }),
    )
    .await;
    let mut on_b = b.connect().await;
    let mut on_c = c.connect().await;
    let head_b = subscribe_from(&mut on_b, &id, 0, None).await["lastSeq"].clone();
    subscribe_from(&mut on_c, &id, 0, None).await;

    // Follow the run on node-1; answer every question it asks through node-2.
    let answer = "the European market";
    let mut received = Received::new();
    let mut answered = Vec::new();
    loop {
        let (name, data) = on_b.next().await;
        if !record(&mut received, &name, data.clone()) {
            continue;
        }
        let got = seqs(&received[&id]);
        assert_contiguous(
            &format!("client on node-1 (subscribed with lastSeq 0 at head {head_b})"),
            &got,
            1,
            got.len() as u64,
        );
        if name == "clarification" && data["status"] == "pending" {
            let cid = data["clarificationId"].as_str().expect("clarificationId");
            let (status, reply) = c
                .post_json(
                    "/api/wizard/clarifications/respond",
                    &json!({ "sessionId": id, "clarificationId": cid, "answer": answer }),
                )
                .await;
            assert_eq!(
                status, 200,
                "respond to {cid} of {id} (running on node-0) through node-2: {reply}"
            );
            assert_eq!(
                reply,
                json!({ "ok": true, "sessionId": id, "clarificationId": cid }),
                "node-2 respond reply"
            );
            answered.push(cid.to_owned());
        }
        if name == "completed" || name == "error" {
            break;
        }
    }
    let events = &received[&id];
    let (last_name, last) = events.last().unwrap();
    assert_eq!(last_name, "completed", "the run ended with {last}");
    assert_eq!(
        answered.len(),
        2,
        "one question per model of the [clarify] prompt"
    );
    let total = last_seq(events);
    assert_contiguous("client on node-1", &seqs(events), 1, total);

    // Every answer was logged, and the answered model used it.
    for cid in &answered {
        let logged = events.iter().any(|(n, d)| {
            n == "clarification"
                && d["clarificationId"] == cid.as_str()
                && d["status"] == "answered"
                && d["answer"] == answer
        });
        assert!(logged, "no `answered` clarification {cid} reached node-1");
    }
    for model in ["sim-fast", "sim-balanced"] {
        let clarified = events.iter().any(|(n, d)| {
            n == "model_result"
                && d["promptId"] == "p1"
                && d["modelName"] == model
                && d["status"] == "completed"
                && d["result"]
                    .as_str()
                    .is_some_and(|r| r.contains(&format!("(clarified: {answer})")))
        });
        assert!(clarified, "{model} did not finish p1 with the answer");
    }

    // node-2's client saw the very same run; every node has the same history.
    let mut on_c_received = Received::new();
    let want = HashMap::from([(id.clone(), total)]);
    collect_into(&mut on_c, &mut on_c_received, &want).await;
    assert_eq!(
        on_c_received[&id], *events,
        "node-2's client saw another run than node-1's"
    );
    for node in &cluster.nodes {
        let log = history_by_seq(node, &id).await;
        assert_eq!(log.len() as u64, total, "{}", node.name);
        assert_as_logged(&format!("history on {}", node.name), events, &log);
        let snapshot = node.snapshot(&id).await.unwrap();
        assert_eq!(snapshot["status"], "COMPLETED", "{}: {snapshot}", node.name);
        assert_eq!(snapshot["lastSeq"], total, "{}: {snapshot}", node.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_posted_to_another_node_ends_the_run_for_clients_on_every_node() {
    let cluster = Cluster::start(3).await;
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    // sim-slow: 300 ms before the first word, then 30 words a second; the reply repeats
    // the prompt, so this run takes seconds.
    let prompt = format!("Describe {}", vec!["the slow careful plan"; 25].join(", "));
    let id = create_session(a, json!({ "prompts": [prompt], "models": ["sim-slow"] })).await;
    let mut clients = Vec::new();
    for node in &cluster.nodes {
        let mut client = node.connect().await;
        subscribe_from(&mut client, &id, 0, None).await;
        clients.push(client);
    }

    // Once the model is working (seen on node-2), cancel through node-1.
    let mut received: Vec<Received> = vec![Received::new(); clients.len()];
    loop {
        let (name, data) = clients[2].next().await;
        let started = name == "model_result" && data["status"] == "processing";
        assert!(
            name != "completed" && name != "error",
            "the run ended before the cancel: {name} {data}"
        );
        record(&mut received[2], &name, data);
        if started {
            break;
        }
    }
    let (status, reply) = b
        .post_json(&format!("/api/wizard/session/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(
        status, 202,
        "cancel of {id} (running on node-0) through node-1: {reply}"
    );
    assert_eq!(reply["status"], "FAILED", "cancel reply: {reply}");

    let mut runs = Vec::new();
    for (i, client) in clients.iter_mut().enumerate() {
        read_to_end(client, &mut received[i], &id).await;
        let events = received[i][&id].clone();
        let label = format!("client on node-{i}");
        let (name, last) = events.last().unwrap();
        assert_eq!(name, "error", "{label}: the run ended with {last}");
        assert_eq!(last["code"], "CANCELLED", "{label}: {last}");
        assert!(last["error"].is_string(), "{label}: {last}");
        let final_progress = events
            .iter()
            .rev()
            .find(|(n, _)| n == "progress")
            .map(|(_, d)| d.clone())
            .unwrap();
        assert_eq!(
            final_progress["status"], "FAILED",
            "{label}: {final_progress}"
        );
        assert!(
            events.iter().all(|(n, _)| n != "completed"),
            "{label}: a cancelled run completed"
        );
        assert_contiguous(&label, &seqs(&events), 1, last_seq(&events));
        runs.push(events);
    }
    assert_eq!(
        runs[0], runs[1],
        "node-0 and node-1 clients saw different runs"
    );
    assert_eq!(
        runs[0], runs[2],
        "node-0 and node-2 clients saw different runs"
    );
    // Nothing follows the end of the run, on any node.
    join_all(
        clients
            .iter_mut()
            .map(|client| client.expect_silence(Duration::from_millis(500))),
    )
    .await;

    for node in &cluster.nodes {
        let snapshot = node.snapshot(&id).await.unwrap();
        assert_eq!(snapshot["status"], "FAILED", "{}: {snapshot}", node.name);
        assert_eq!(
            snapshot["lastSeq"],
            last_seq(&runs[0]),
            "{}: {snapshot}",
            node.name
        );
    }
    let (status, reply) = c
        .post_json(&format!("/api/wizard/session/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 409, "a second cancel, through node-2: {reply}");
    assert_eq!(reply["error"]["code"], "SESSION_ENDED", "{reply}");
}

// ---------------------------------------------------------------------------------------
// 5. Redis trouble

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_survives_killed_pubsub_connections() {
    let cluster = Cluster::start(3).await;
    let id = unique("pubsub-kill");
    let mut followers = Vec::new();
    for i in [1, 2] {
        let mut client = cluster.node(i).connect().await;
        subscribe_from(&mut client, &id, 0, None).await;
        followers.push((i, client, Received::new()));
    }
    post(cluster.node(0), &id, batch(0, 5)).await;
    for (_, client, received) in &mut followers {
        collect_into(client, received, &HashMap::from([(id.clone(), 5)])).await;
    }

    let killed = kill_pubsub_connections(cluster.redis.port()).await;
    assert!(
        killed >= 1,
        "CLIENT KILL TYPE pubsub closed no connection: the nodes do not use pub/sub?"
    );
    // At once, before any node can have resubscribed: one event through every node.
    // Nothing is posted afterwards, so the last of them arrives only if a node catches up
    // on what it missed while it was not subscribed.
    for k in 0..9u64 {
        post(cluster.node(k as usize % 3), &id, batch(100 + k, 1)).await;
    }
    let want = HashMap::from([(id.clone(), 14)]);
    for (i, client, received) in &mut followers {
        collect_into(client, received, &want).await;
        assert_contiguous(
            &format!("client on node-{i} across the pub/sub kill"),
            &seqs(&received[&id]),
            1,
            14,
        );
    }
    // And live delivery goes on.
    post(cluster.node(0), &id, batch(200, 5)).await;
    let want = HashMap::from([(id.clone(), 19)]);
    let log = history_by_seq(cluster.node(0), &id).await;
    for (i, client, received) in &mut followers {
        collect_into(client, received, &want).await;
        let label = format!("client on node-{i} after the pub/sub kill");
        assert_contiguous(&label, &seqs(&received[&id]), 1, 19);
        assert_as_logged(&label, &received[&id], &log);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_makes_nodes_unready_then_they_recover_without_restarting() {
    let mut cluster = Cluster::start(3).await;
    let before = unique("before-restart");
    let mut watcher = cluster.node(1).connect().await;
    subscribe_from(&mut watcher, &before, 0, None).await;
    post(cluster.node(0), &before, batch(0, 3)).await;
    collect(&mut watcher, &HashMap::from([(before.clone(), 3)])).await;

    cluster.redis.stop();
    for node in &cluster.nodes {
        wait_readyz(node, 503).await;
    }
    // Nothing can be logged without the sequencer.
    let refused = cluster
        .node(0)
        .try_request(
            reqwest::Method::POST,
            &format!("/api/sessions/{}/events", unique("during-outage")),
            Some(&json!(batch(0, 1))),
        )
        .await;
    match refused {
        Ok((status, body)) => {
            assert_eq!(
                status, 503,
                "node-0 answered {status} to an ingest while Redis is down: {body}"
            );
            assert_eq!(body["error"]["code"], "BACKEND_UNAVAILABLE", "{body}");
        }
        Err(why) => panic!("no answer to an ingest while Redis is down: {why}"),
    }

    cluster.redis.restart().await;
    for node in &cluster.nodes {
        wait_readyz(node, 200).await;
    }

    // The restarted Redis is empty: follow a fresh session, from nodes that were never
    // restarted, fed through a third.
    let after = unique("after-restart");
    let mut followers = Vec::new();
    for i in [1, 2] {
        let mut client = cluster.node(i).connect().await;
        subscribe_from(&mut client, &after, 0, None).await;
        followers.push((i, client));
    }
    post(cluster.node(0), &after, batch(0, 5)).await;
    post(cluster.node(2), &after, batch(5, 5)).await;
    post(cluster.node(1), &after, batch(10, 5)).await;
    let log = history_by_seq(cluster.node(2), &after).await;
    let want = HashMap::from([(after.clone(), 15)]);
    for (i, client) in &mut followers {
        let received = collect(client, &want).await;
        let label = format!("client on node-{i} after the Redis restart");
        assert_contiguous(&label, &seqs(&received[&after]), 1, 15);
        assert_as_logged(&label, &received[&after], &log);
    }
}

// ---------------------------------------------------------------------------------------
// 6. A node dies; its clients move to another node and recover by replay

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_node_recover_on_another_without_gap_or_duplicate() {
    const BATCHES: u64 = 30;
    const BATCH: u64 = 5;
    const KILL_AFTER: u64 = 10;
    const MISSED: u64 = 5;
    const MOVERS: usize = 4;
    let total = BATCHES * BATCH;
    let mut cluster = Cluster::start(3).await;
    let id = unique("node-kill");

    let mut movers = Vec::new();
    for _ in 0..MOVERS {
        let mut client = cluster.node(1).connect().await;
        subscribe_from(&mut client, &id, 0, None).await;
        movers.push(client);
    }
    let mut bystander = cluster.node(2).connect().await;
    subscribe_from(&mut bystander, &id, 0, None).await;

    // The producer posts to node-0. It pauses after KILL_AFTER batches until node-1 is
    // dead, posts MISSED batches the movers can only get by replay, and pauses again
    // until the first mover is back, so the others re-subscribe while events are logged.
    let (progress_tx, mut progress_rx) = watch::channel(0u64);
    let (killed_tx, killed_rx) = tokio::sync::oneshot::channel::<()>();
    let (back_tx, back_rx) = tokio::sync::oneshot::channel::<()>();
    let (producer_nodes, other_nodes) = cluster.nodes.split_at_mut(1);
    let producer_node = &producer_nodes[0];
    let session = id.as_str();
    let producer = async move {
        let (mut killed, mut back) = (Some(killed_rx), Some(back_rx));
        for k in 0..BATCHES {
            if k == KILL_AFTER {
                killed.take().unwrap().await.expect("node-1 killed");
            }
            if k == KILL_AFTER + MISSED {
                back.take().unwrap().await.expect("first mover back");
            }
            post(producer_node, session, batch(k * BATCH, BATCH)).await;
            progress_tx.send_replace(k + 1);
        }
    };
    let movers_task = async {
        progress_rx
            .wait_for(|done| *done >= KILL_AFTER)
            .await
            .unwrap();
        // Mover m has handled the events up to 50 - 7m when its node dies (the rest may
        // be on the wire: lost with the connection).
        let mut handled = Vec::new();
        for (m, mut client) in movers.into_iter().enumerate() {
            let upto = KILL_AFTER * BATCH - 7 * m as u64;
            let received = collect(&mut client, &HashMap::from([(id.clone(), upto)])).await;
            handled.push((m, client, received));
        }
        let [victim, refuge] = other_nodes else {
            unreachable!()
        };
        victim.kill().await;
        killed_tx.send(()).unwrap();
        progress_rx
            .wait_for(|done| *done >= KILL_AFTER + MISSED)
            .await
            .unwrap();
        let mut back = Some(back_tx);
        let mut moved = Vec::new();
        for (m, client, received) in handled {
            // The old connection is closed: the node is gone.
            tokio::time::timeout(common::WAIT, client.disconnected.notified())
                .await
                .unwrap_or_else(|_| panic!("mover {m}: still connected to a killed node"));
            drop(client);
            let before = last_seq(&received[&id]);
            let mut again = refuge.connect().await;
            let ack = subscribe_from(&mut again, &id, before, None).await;
            assert_eq!(ack["recovered"], true, "mover {m}, lastSeq {before}: {ack}");
            if let Some(back) = back.take() {
                back.send(()).unwrap();
            }
            moved.push((m, before, ack["lastSeq"].clone(), received, again));
        }
        moved
    };
    let ((), moved) = tokio::join!(producer, movers_task);

    let log = history_by_seq(&cluster.nodes[0], &id).await;
    assert_eq!(log.len() as u64, total);
    let want = HashMap::from([(id.clone(), total)]);
    for (m, before, head, mut received, mut again) in moved {
        collect_into(&mut again, &mut received, &want).await;
        let label =
            format!("mover {m} (node-1 until seq {before}, then node-2 from its head {head})");
        assert_contiguous(&label, &seqs(&received[&id]), 1, total);
        assert_as_logged(&label, &received[&id], &log);
    }
    let received = collect(&mut bystander, &want).await;
    assert_contiguous(
        "client on node-2 while node-1 died",
        &seqs(&received[&id]),
        1,
        total,
    );
    assert_as_logged("client on node-2", &received[&id], &log);
}

/// A node that falls further behind than the log retains must not hand its clients a silent
/// gap: it cuts them off, and on resubscribing they learn the gap cannot be replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_fell_behind_the_retained_log_cuts_its_clients_off_instead_of_skipping() {
    const RETAINED: u64 = 5;
    let retained = RETAINED.to_string();
    let cluster = Cluster::start_with(2, &["--max-events-per-session", &retained]).await;
    let (a, b) = (cluster.node(0), cluster.node(1));
    let id = unique("behind");

    let mut client = a.connect().await;
    subscribe_from(&mut client, &id, 0, None).await;
    client.wait_for("subscribed").await;
    post(b, &id, batch(0, 3)).await;
    for want in 1..=3u64 {
        let event = client.wait_for("progress").await;
        assert_eq!(event["seq"], want, "{event}");
    }

    // Node A sleeps while node B logs four times what the log retains.
    a.signal("STOP");
    for k in 0..4 {
        post(b, &id, batch(100 + k * RETAINED, RETAINED)).await;
    }
    a.signal("CONT");

    // Node A may not deliver seq 19..23 after 3: the client must be disconnected instead.
    let cut_off =
        tokio::time::timeout(Duration::from_secs(10), client.disconnected.notified()).await;
    let received = client.drain();
    assert!(
        received.is_empty(),
        "events after seq 3 although 4..18 are no longer logged: {received:?}"
    );
    assert!(cut_off.is_ok(), "node-0 did not cut the client off");

    // Resubscribing from where it was tells the client to refetch the snapshot.
    let mut again = a.connect().await;
    let ack = subscribe_from(&mut again, &id, 3, None).await;
    assert_eq!(ack["recovered"], false, "{ack}");
    assert_eq!(ack["lastSeq"], 3 + 4 * RETAINED, "{ack}");
}

/// A run outlives a Redis outage: the events it produces meanwhile are logged, in order,
/// once Redis answers again; none is given up and none is logged twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_outlives_a_redis_outage_and_logs_every_event_once() {
    let cluster = Cluster::start(1).await;
    let a = cluster.node(0);
    // sim-slow streams 30 words a second and repeats the prompt: this one streams for about
    // 8 s, so the run is still streaming when Redis stops, even on a busy machine.
    let prompt = format!("Describe {}", ["the slow careful plan"; 60].join(", "));
    let id = create_session(a, json!({ "prompts": [prompt], "models": ["sim-slow"] })).await;
    let mut client = a.connect().await;
    subscribe_from(&mut client, &id, 0, None).await;
    let mut received = Received::new();
    loop {
        let (name, data) = client.next().await;
        let partial = name == "model_result"
            && data["status"] == "processing"
            && data["result"].as_str().is_some_and(|r| !r.is_empty());
        record(&mut received, &name, data);
        if partial {
            break;
        }
    }

    // The outage itself: twice the node's 3 s Redis reply timeout, so appends fail.
    cluster.redis.signal("STOP");
    tokio::time::sleep(Duration::from_secs(6)).await;
    cluster.redis.signal("CONT");

    loop {
        let (name, data) = client.next().await;
        if record(&mut received, &name, data) && (name == "completed" || name == "error") {
            break;
        }
    }
    let events = &received[&id];
    let (last_name, last) = events.last().unwrap();
    assert_eq!(last_name, "completed", "the run ended with {last}");
    let total = last_seq(events);
    assert_contiguous("client on node-0", &seqs(events), 1, total);
    let log = history_by_seq(a, &id).await;
    assert_eq!(log.len() as u64, total, "history of {id}");
    assert_as_logged("history", events, &log);
    let snapshot = a.snapshot(&id).await.unwrap();
    assert_eq!(snapshot["status"], "COMPLETED", "{snapshot}");
    assert_eq!(snapshot["lastSeq"], total, "{snapshot}");

    let logs = a.stderr_tail();
    assert!(
        !logs.contains("ERROR herald::orchestrator"),
        "the run gave events up:\n{logs}"
    );
    assert!(
        logs.contains("could not log the run's events; retrying"),
        "the outage never reached the run's publishing:\n{logs}"
    );
}

// ---------------------------------------------------------------------------------------
// SSE and plain WebSocket across nodes (SPEC §6)

async fn open_sse(node: &Node, session: &str, last_event_id: Option<u64>) -> SseReader {
    let mut request =
        common::harness_http().get(node.url(&format!("/api/wizard/session/{session}/stream")));
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id.to_string());
    }
    let response = request.send().await.expect("the stream answers");
    assert_eq!(response.status(), 200, "{}: SSE", node.name);
    SseReader::new(response)
}

/// An SSE stream and a plain WebSocket on one node follow a session both nodes log to,
/// each event once and in `seq` order; an SSE reader that resumes on the other node with
/// `Last-Event-ID` gets the rest from the shared log, gap-free.
#[tokio::test]
async fn sse_and_ws_subscribers_follow_what_every_node_logs_and_resume_on_another() {
    let cluster = Cluster::start(2).await;
    let (a, b) = (cluster.node(0), cluster.node(1));
    let session = unique("streams");
    let mut sse = open_sse(b, &session, None).await;
    let subscribed = sse.next_event().await;
    assert_eq!(subscribed.event, "subscribed", "{}", subscribed.data);
    let mut ws = Ws::connect(&format!("ws://{}/ws", b.addr)).await;
    ws.send(json!({ "type": "subscribe", "sessionId": session }))
        .await;
    assert_eq!(ws.next_json().await["type"], "subscribed");

    for round in 0..5 {
        post(a, &session, batch(round * 20, 10)).await;
        post(b, &session, batch(round * 20 + 10, 10)).await;
    }
    let log = history_by_seq(a, &session).await;
    assert_eq!(log.len(), 100);
    for seq in 1..=100u64 {
        let expected = &log[&seq].1["n"];
        let frame = sse.next_event().await;
        assert_eq!(
            (frame.id, frame.event.as_str()),
            (Some(seq), "progress"),
            "SSE on {}",
            b.name
        );
        assert_eq!(&frame.json()["n"], expected, "SSE seq {seq}");
        let message = ws.next_json().await;
        assert_eq!(
            (message["type"].as_str(), message["seq"].as_u64()),
            (Some("progress"), Some(seq)),
            "WebSocket on {}: {message}",
            b.name
        );
        assert_eq!(&message["n"], expected, "WebSocket seq {seq}");
    }

    // The reader goes away at seq 60 (as a browser's EventSource would on a network drop),
    // more is logged meanwhile, and it comes back on the other node.
    drop(sse);
    post(b, &session, batch(100, 20)).await;
    let mut resumed = open_sse(a, &session, Some(60)).await;
    let subscribed = resumed.next_event().await;
    assert_eq!(subscribed.event, "subscribed");
    assert_eq!(subscribed.json()["recovered"], true, "{}", subscribed.data);
    let ids: Vec<Option<u64>> = {
        let mut ids = Vec::new();
        for _ in 61..=120 {
            ids.push(resumed.next_event().await.id);
        }
        ids
    };
    assert_eq!(ids, (61..=120).map(Some).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------
// The session feed

fn token_for(subject: &str) -> String {
    common::sign_token(
        &json!({
            "sub": subject,
            "exp": common::unix_now() + 600,
            "scope": "read answer cancel create",
            "sessions": [],
        }),
        common::TEST_JWT_SECRET,
    )
}

async fn create_as(node: &Node, token: &str, prompt: &str) -> String {
    let reply = reqwest::Client::new()
        .post(node.url("/api/wizard/sessions"))
        .bearer_auth(token)
        .json(&json!({ "prompts": [prompt], "models": ["sim-fast"] }))
        .send()
        .await
        .expect("create answers");
    assert_eq!(reply.status(), 201, "{}: create as a user", node.name);
    let body: Value = reply.json().await.unwrap();
    body["sessionId"].as_str().expect("sessionId").to_owned()
}

async fn watch_feed(node: &Node, token: &str) -> (Client, Vec<String>) {
    let auth = json!({ "token": token });
    let mut client = Client::connect_as(node.addr, Some(&auth), &[])
        .await
        .unwrap_or_else(|refusal| panic!("{}: refused: {refusal}", node.name));
    let ack = client
        .call("subscribe", &json!({ "feed": "sessions" }))
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    let list = client.wait_for("sessions").await;
    let ids = list["sessions"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| s["sessionId"].as_str().unwrap().to_owned())
        .collect();
    (client, ids)
}

/// Reads `session` messages until `session_id` is `COMPLETED`; returns every session id
/// the messages named.
async fn feed_until_completed(client: &mut Client, session_id: &str) -> Vec<String> {
    let mut named = Vec::new();
    let deadline = Instant::now() + POLL_WITHIN;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (name, data) = client.next_within(left).await;
        if name != "session" {
            continue;
        }
        let id = data["sessionId"].as_str().expect("sessionId").to_owned();
        let completed = id == session_id && data["status"] == "COMPLETED";
        named.push(id);
        if completed {
            return named;
        }
    }
}

/// With auth on, each caller's feed lists and streams exactly the sessions it may read,
/// whichever node runs them: Alice and Bob watch on node-1, each creates a run on node-0,
/// each sees their own run through to `COMPLETED` and never the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_feed_spans_nodes_and_shows_each_caller_only_their_sessions() {
    let cluster = Cluster::start_with(2, &["--jwt-secret", common::TEST_JWT_SECRET]).await;
    let (a, b) = (cluster.node(0), cluster.node(1));
    let (alice, bob) = (token_for("alice"), token_for("bob"));
    let (mut alice_feed, listed) = watch_feed(b, &alice).await;
    assert!(listed.is_empty(), "{listed:?}");
    let (mut bob_feed, listed) = watch_feed(b, &bob).await;
    assert!(listed.is_empty(), "{listed:?}");

    let alices = create_as(a, &alice, "Write the launch plan").await;
    let bobs = create_as(a, &bob, "Write the budget").await;
    let seen_by_alice = feed_until_completed(&mut alice_feed, &alices).await;
    let seen_by_bob = feed_until_completed(&mut bob_feed, &bobs).await;
    assert!(
        seen_by_alice.iter().all(|id| *id == alices),
        "Alice's feed named someone else's session: {seen_by_alice:?}"
    );
    assert!(
        seen_by_bob.iter().all(|id| *id == bobs),
        "Bob's feed named someone else's session: {seen_by_bob:?}"
    );

    // A fresh list, on the other node, holds only the caller's own.
    let (_, listed) = watch_feed(a, &bob).await;
    assert_eq!(listed, vec![bobs]);
    let (_, listed) = watch_feed(b, &alice).await;
    assert_eq!(listed, vec![alices]);
}
