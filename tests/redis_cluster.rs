//! herald on a Redis Cluster (`--redis-cluster`): real herald processes sharing a local
//! three-master cluster (tests/common/redis.rs, `RedisCluster`), talked to over HTTP, raw
//! Socket.IO and the ingest stream.
//!
//! - Delivery across nodes for sessions whose slots are on every master: each master runs
//!   the append script of some sessions (a script touching a shared key there would be
//!   refused with CROSSSLOT), and their announcements travel on sharded channels.
//! - The worker ingest stream on a cluster: its acknowledgement and refusal transaction
//!   spans the stream and the errors stream, which share a slot only by their hash tag.
//! - A master restarted mid-run: the node that follows a session must resubscribe to the
//!   restarted master's shard channel and catch up, or it never hears of later events.
//!
//! Nothing waits by sleeping: events are awaited with timeouts (`Client::next`), HTTP
//! state and the errors stream are polled within a bound.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::node::Node;
use common::redis::{CLUSTER_MASTERS, RedisCluster};
use common::{Client, progress};
use herald::redis::{Keys, key_slot};
use serde_json::{Value, json};

/// How long a bounded poll may take, and between two polls.
const POLL_WITHIN: Duration = Duration::from_secs(20);
const POLL_EVERY: Duration = Duration::from_millis(50);

fn unique(name: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{name}-{}", &id[..12])
}

/// `n` herald nodes on `cluster` under `prefix`, each ready.
async fn start_nodes(cluster: &RedisCluster, prefix: &str, n: usize) -> Vec<Node> {
    let url = cluster.url();
    let mut nodes = Vec::new();
    for i in 0..n {
        let args = [
            "--redis-url",
            &url,
            "--redis-cluster",
            "--redis-prefix",
            prefix,
            // Short leases: the ingest consumer's lease is taken at once.
            "--cluster-lease-ms",
            "1000",
        ];
        nodes.push(Node::start(&format!("node-{i}"), &args).await);
    }
    for node in &nodes {
        let started = Instant::now();
        loop {
            let (status, body) = node.get("/readyz").await;
            if status == 200 {
                assert_eq!(body, json!({ "status": "ready" }), "{}", node.name);
                break;
            }
            assert!(
                started.elapsed() < POLL_WITHIN,
                "{}: not ready within {POLL_WITHIN:?}: {status} {body}",
                node.name
            );
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
    nodes
}

/// Session ids, `per_master` for each master, found by the slot of their keys.
fn sessions_on_every_master(cluster: &RedisCluster, per_master: usize) -> Vec<(String, u16)> {
    let mut count: HashMap<u16, usize> = HashMap::new();
    let mut found = Vec::new();
    for n in 0..10_000 {
        if found.len() == per_master * CLUSTER_MASTERS {
            break;
        }
        let id = unique(&format!("rc-{n}"));
        let master = cluster.master_of_slot(key_slot(&id));
        let taken = count.entry(master).or_default();
        if *taken < per_master {
            *taken += 1;
            found.push((id, master));
        }
    }
    assert_eq!(found.len(), per_master * CLUSTER_MASTERS, "{found:?}");
    found
}

/// Posts `items` to `node`, retrying (bounded) while it answers 503 (a master it needs is
/// coming back): every item carries an idempotency key, so a retry logs nothing twice.
/// Returns the seqs.
async fn post(node: &Node, session: &str, items: &[Value]) -> Vec<u64> {
    let started = Instant::now();
    loop {
        let (status, reply) = node.post_events(session, &json!(items)).await;
        if status == 202 {
            let seqs: Vec<u64> = reply["seqs"]
                .as_array()
                .unwrap_or_else(|| panic!("no seqs in {reply}"))
                .iter()
                .map(|s| s.as_u64().expect("a seq"))
                .collect();
            assert_eq!(seqs.len(), items.len(), "{reply}");
            return seqs;
        }
        assert!(
            status == 503 && started.elapsed() < POLL_WITHIN,
            "{}: POST {session} events: {status} {reply}",
            node.name
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Progress items `first..first+count`, each with an idempotency key of its own.
fn keyed_batch(session: &str, first: u64, count: u64) -> Vec<Value> {
    (first..first + count)
        .map(|n| {
            let mut item = progress(n);
            item["idempotencyKey"] = json!(format!("{session}:{n}"));
            item
        })
        .collect()
}

/// Reads events until every session in `want` reached its seq; returns each session's
/// received `(seq, n)` in arrival order.
async fn collect(
    client: &mut Client,
    want: &HashMap<String, u64>,
) -> HashMap<String, Vec<(u64, u64)>> {
    let mut received: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    let done = |received: &HashMap<String, Vec<(u64, u64)>>| {
        want.iter().all(|(id, last)| {
            received
                .get(id)
                .and_then(|events| events.last())
                .is_some_and(|(seq, _)| seq >= last)
        })
    };
    while !done(&received) {
        let (name, data) = client.next().await;
        if name != "progress" {
            continue;
        }
        let session = data["sessionId"].as_str().expect("a sessionId").to_owned();
        let seq = data["seq"].as_u64().expect("a seq");
        let n = data["data"]["n"]
            .as_u64()
            .or_else(|| data["n"].as_u64())
            .unwrap_or_else(|| panic!("progress without n: {data}"));
        received.entry(session).or_default().push((seq, n));
    }
    received
}

/// The `n` of each logged `progress` of `session`, by seq, as `node`'s history has them.
async fn logged(node: &Node, session: &str) -> BTreeMap<u64, u64> {
    let events = node
        .history(session)
        .await
        .unwrap_or_else(|| panic!("{}: no history for {session}", node.name));
    events
        .iter()
        .map(|e| {
            let data = &e["data"];
            let n = data["data"]["n"]
                .as_u64()
                .or_else(|| data["n"].as_u64())
                .unwrap_or_else(|| panic!("history event without n: {e}"));
            (e["seq"].as_u64().expect("a seq"), n)
        })
        .collect()
}

async fn subscribe(client: &mut Client, session: &str) {
    let ack = client
        .call("subscribe", &json!({ "sessionId": session, "lastSeq": 0 }))
        .await;
    assert_eq!(ack["ok"], true, "subscribe {session}: {ack}");
}

/// Events posted to node A reach a subscriber on node B in order and exactly once, for
/// sessions whose keys are on each of the three masters; and a worker's ingest entry (and
/// the refusal of a bad one) works on the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_one_node_gets_every_event_posted_to_another_on_every_master() {
    const ROUNDS: u64 = 10;
    const BATCH: u64 = 3;
    let cluster = RedisCluster::shared();
    let prefix = unique("herald-test-rc");
    let nodes = start_nodes(cluster, &prefix, 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let sessions = sessions_on_every_master(cluster, 2);
    let masters: BTreeSet<u16> = sessions.iter().map(|(_, m)| *m).collect();
    assert_eq!(masters.len(), CLUSTER_MASTERS, "{sessions:?}");

    let mut client = b.connect().await;
    for (id, _) in &sessions {
        subscribe(&mut client, id).await;
    }
    for round in 0..ROUNDS {
        for (id, _) in &sessions {
            let seqs = post(a, id, &keyed_batch(id, round * BATCH, BATCH)).await;
            let first = round * BATCH + 1;
            assert_eq!(seqs, (first..first + BATCH).collect::<Vec<_>>(), "{id}");
        }
    }
    let total = ROUNDS * BATCH;
    let want: HashMap<String, u64> = sessions.iter().map(|(id, _)| (id.clone(), total)).collect();
    let received = tokio::time::timeout(POLL_WITHIN, collect(&mut client, &want))
        .await
        .expect("node B delivers every event posted to node A");
    for (id, master) in &sessions {
        let got = &received[id];
        let want: Vec<(u64, u64)> = (1..=total).map(|seq| (seq, seq - 1)).collect();
        assert_eq!(
            got, &want,
            "{id} (keys on the master at {master}): seq 1..={total} once, in order"
        );
        let log = logged(b, id).await;
        assert_eq!(
            log,
            want.iter().copied().collect::<BTreeMap<_, _>>(),
            "{id}"
        );
    }

    // A worker's ingest entry, through the stream (its slot is its own), and a refused one
    // described in the errors stream (in the stream's slot, by its hash tag).
    let keys = Keys::cluster(&prefix);
    let redis = redis::cluster::ClusterClient::new(cluster.url().split(',').collect::<Vec<_>>())
        .expect("a cluster client");
    let mut redis = redis
        .get_async_connection()
        .await
        .expect("a cluster connection");
    let (ingested, _) = &sessions[0];
    let payload = json!({ "sessionId": ingested, "events": [progress(total)] }).to_string();
    let _: String = redis::cmd("XADD")
        .arg(keys.ingest())
        .arg("*")
        .arg("payload")
        .arg(&payload)
        .query_async(&mut redis)
        .await
        .expect("XADD to the ingest stream");
    let bad: String = redis::cmd("XADD")
        .arg(keys.ingest())
        .arg("*")
        .arg("payload")
        .arg("{ not json")
        .query_async(&mut redis)
        .await
        .expect("XADD to the ingest stream");
    let want = HashMap::from([(ingested.clone(), total + 1)]);
    let received = tokio::time::timeout(POLL_WITHIN, collect(&mut client, &want))
        .await
        .expect("node B delivers the ingested event");
    assert_eq!(
        received[ingested],
        vec![(total + 1, total)],
        "the ingested event, once"
    );
    assert_eq!(
        keys.ingest_errors(),
        format!("{prefix}:ingest:errors{{{prefix}:ingest}}")
    );

    // A python-socketio emit, a classic PUBLISH on a cluster (any node's subscribers get
    // it), translated by the lease holder into the ingest stream, whose script spans the
    // lease and both streams (one slot by their hash tags).
    let emit = json!({
        "method": "emit", "event": "progress", "namespace": "/", "room": ingested,
        "data": [{ "status": "PROCESSING", "progress": 1, "n": total + 1 }],
    });
    let started = Instant::now();
    let mut emitted = None;
    while emitted.is_none() {
        // (Its reply counts only the subscribers of the node it went to.)
        let _: i64 = redis::cmd("PUBLISH")
            .arg("socketio")
            .arg(emit.to_string())
            .query_async(&mut redis)
            .await
            .expect("PUBLISH on the socketio channel");
        let want = HashMap::from([(ingested.clone(), total + 2)]);
        // The translator's lease may still be changing hands: then publish again.
        emitted = tokio::time::timeout(Duration::from_secs(2), collect(&mut client, &want))
            .await
            .ok();
        assert!(
            started.elapsed() < POLL_WITHIN,
            "the emit was never delivered"
        );
    }
    assert_eq!(
        emitted.unwrap()[ingested].first(),
        Some(&(total + 2, total + 1)),
        "the emitted event"
    );
    let started = Instant::now();
    loop {
        let errors: redis::Value = redis::cmd("XRANGE")
            .arg(keys.ingest_errors())
            .arg("-")
            .arg("+")
            .query_async(&mut redis)
            .await
            .expect("XRANGE the errors stream");
        let text = format!("{errors:?}");
        if text.contains(&bad) {
            break;
        }
        assert!(
            started.elapsed() < POLL_WITHIN,
            "the refused entry {bad} is not described in {}: {text}",
            keys.ingest_errors()
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// A session whose keys are on one master and whose announcement shard channel is on
/// another: that other master restarts (empty, same slots), and node B, following the
/// session, still gets every event node A logs afterwards, in order and once. It takes
/// B's resubscription to the restarted master and a catch-up (announcements made while B's
/// subscription was gone are lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_goes_on_after_the_master_of_a_sessions_shard_channel_restarts() {
    let mut cluster = RedisCluster::start();
    let prefix = unique("herald-test-rc");
    let keys = Keys::cluster(&prefix);
    let (session, data_master, channel_master) = (0..10_000)
        .find_map(|n| {
            let id = unique(&format!("rc-restart-{n}"));
            let data = cluster.master_of_slot(key_slot(&id));
            let channel = cluster.master_of_slot(key_slot(&keys.announcement_channel(&id)));
            (data != channel).then_some((id, data, channel))
        })
        .expect("a session whose shard channel is on another master");
    let nodes = start_nodes(&cluster, &prefix, 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut client = b.connect().await;
    subscribe(&mut client, &session).await;

    const BEFORE: u64 = 5;
    const AFTER: u64 = 10;
    post(a, &session, &keyed_batch(&session, 0, BEFORE)).await;
    let want = HashMap::from([(session.clone(), BEFORE)]);
    tokio::time::timeout(POLL_WITHIN, collect(&mut client, &want))
        .await
        .expect("delivery before the restart");

    cluster.restart(channel_master);

    // One event at a time: each one after the restart must arrive.
    let mut received = Vec::new();
    for n in BEFORE..BEFORE + AFTER {
        let seqs = post(a, &session, &keyed_batch(&session, n, 1)).await;
        assert_eq!(
            seqs,
            vec![n + 1],
            "the log (on {data_master}) kept its seqs"
        );
        let want = HashMap::from([(session.clone(), n + 1)]);
        let got = tokio::time::timeout(POLL_WITHIN, collect(&mut client, &want))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "seq {} was not delivered after the restart of {channel_master}",
                    n + 1
                )
            });
        received.extend(got[&session].iter().copied());
    }
    let want: Vec<(u64, u64)> = (BEFORE + 1..=BEFORE + AFTER)
        .map(|seq| (seq, seq - 1))
        .collect();
    assert_eq!(
        received, want,
        "every event after the restart, once, in order"
    );
}
