//! The Redis ingest stream (`{prefix}:ingest`, docs/deployment.md "Workers publishing
//! through Redis"): what is refused is described in `{prefix}:ingest:errors` and logs
//! nothing; what fails for a backend error is retried, in order, and never lost.
//!
//! Each test runs its own `redis-server` and an in-process herald on it; the test plays the
//! worker with raw Redis commands.

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::{TestServer, WAIT, spawn_app_with};
use herald::redis::Keys;
use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};

struct Setup {
    _redis: RedisServer,
    raw: MultiplexedConnection,
    prefix: String,
    app: TestServer,
}

/// A Redis with nothing of herald in it yet, and a raw connection to it.
async fn redis_only() -> (RedisServer, MultiplexedConnection) {
    let redis = RedisServer::start().await;
    let raw = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    (redis, raw)
}

/// An in-process herald on `redis` (`lease_ms`: the cluster lease; 0 for the default).
async fn herald_on(
    redis: &RedisServer,
    prefix: &str,
    max_batch: usize,
    lease_ms: u64,
) -> TestServer {
    let (url, prefix) = (redis.url(), prefix.to_owned());
    spawn_app_with(move |c| {
        c.redis_url = Some(url);
        c.redis_prefix = prefix;
        c.max_batch = max_batch;
        if lease_ms > 0 {
            c.cluster_lease_ms = lease_ms;
        }
    })
    .await
}

async fn setup(test: &str, max_batch: usize) -> Setup {
    let (redis, raw) = redis_only().await;
    let prefix = format!("ingest-{test}");
    let app = herald_on(&redis, &prefix, max_batch, 0).await;
    Setup {
        _redis: redis,
        raw,
        prefix,
        app,
    }
}

impl Setup {
    /// `XADD {prefix}:ingest * payload <payload>`, as a worker does; returns the entry id.
    async fn publish(&mut self, payload: &Value) -> String {
        redis::cmd("XADD")
            .arg(format!("{}:ingest", self.prefix))
            .arg("*")
            .arg("payload")
            .arg(payload.to_string())
            .query_async(&mut self.raw)
            .await
            .unwrap()
    }

    /// The refusals recorded so far: each entry's fields.
    async fn refusals(&mut self) -> Vec<Vec<(String, String)>> {
        let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(format!("{}:ingest:errors", self.prefix))
            .arg("-")
            .arg("+")
            .query_async(&mut self.raw)
            .await
            .unwrap();
        entries.into_iter().map(|(_, fields)| fields).collect()
    }

    async fn metric(&self, name: &str) -> u64 {
        metric(&self.app, name).await
    }
}

/// A counter of `app`'s `/metrics` (0 when absent).
async fn metric(app: &TestServer, name: &str) -> u64 {
    app.metric(name).await.unwrap_or(0)
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> &'a str {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no `{name}` in {fields:?}"))
}

fn progress(percent: u64) -> Value {
    json!({ "event": "progress", "data": { "status": "PROCESSING", "progress": percent } })
}

/// Polls `condition` until it holds; panics with `what` after [`WAIT`].
async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn percents(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["data"]["progress"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_that_fails_for_a_backend_error_is_retried_in_order_and_never_lost() {
    let mut s = setup("transient", 100).await;
    // Make logging to `stuck` fail inside Redis: its idempotency-key set is not a sorted set.
    let (status, reply) = s.app.post_events("stuck", &progress(5)).await;
    assert_eq!(status, 202, "{reply}");
    let keys = Keys::new(&s.prefix).idempotency_keys("stuck");
    let _: () = redis::cmd("SET")
        .arg(&keys)
        .arg("not a sorted set")
        .query_async(&mut s.raw)
        .await
        .unwrap();
    let mut first = progress(10);
    first["sessionId"] = json!("stuck");
    first["idempotencyKey"] = json!("job:stuck:1");
    s.publish(&first).await;
    let mut later = progress(20);
    later["sessionId"] = json!("next");
    s.publish(&later).await;

    // Until the failing entry has been tried a second time (or was given up, or overtaken).
    let mut retried = false;
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if s.metric("herald_ingest_retries_total").await >= 2 {
            retried = true;
            break;
        }
        if !s.refusals().await.is_empty() || s.app.history("next").await.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        s.refusals().await,
        Vec::<Vec<(String, String)>>::new(),
        "a backend failure is not a refusal"
    );
    assert_eq!(
        s.app.history("next").await,
        None,
        "a later entry overtook the failing one"
    );
    assert!(retried, "the failing entry was not retried");

    // The backend recovers: the entry is logged, then the one after it.
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut s.raw)
        .await
        .unwrap();
    let app = &s.app;
    eventually("the later entry to be logged", || async {
        app.history("next").await.is_some()
    })
    .await;
    let stuck = s
        .app
        .history("stuck")
        .await
        .expect("the retried entry is logged");
    assert_eq!(percents(&stuck), [5, 10]);
    assert_eq!(stuck[1]["seq"], 2);
    assert_eq!(percents(&s.app.history("next").await.unwrap()), [20]);
    assert!(s.refusals().await.is_empty());
    let left: u64 = redis::cmd("XLEN")
        .arg(format!("{}:ingest", s.prefix))
        .query_async(&mut s.raw)
        .await
        .unwrap();
    assert_eq!(left, 0, "handled entries leave the stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_keys_and_oversized_batches_are_refused_on_the_stream_and_log_nothing() {
    let mut s = setup("refusals", 2).await;
    let mut reserved = progress(10);
    reserved["sessionId"] = json!("reserved");
    reserved["idempotencyKey"] = json!("herald:ingest:1-0");
    let reserved_id = s.publish(&reserved).await;
    let batch =
        json!({ "sessionId": "too-large", "events": [progress(1), progress(2), progress(3)] });
    let batch_id = s.publish(&batch).await;
    // A good entry after them, as a marker that both were handled.
    let good = json!({ "sessionId": "fits", "events": [progress(1), progress(2)] });
    s.publish(&good).await;
    let app = &s.app;
    eventually("the entry after the refused ones", || async {
        app.history("fits").await.is_some()
    })
    .await;

    let refusals = s.refusals().await;
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    assert_eq!(field(&refusals[0], "entry"), reserved_id);
    assert_eq!(field(&refusals[0], "code"), "RESERVED_IDEMPOTENCY_KEY");
    assert!(
        field(&refusals[0], "error").contains("reserved"),
        "{refusals:?}"
    );
    assert_eq!(field(&refusals[1], "entry"), batch_id);
    assert_eq!(field(&refusals[1], "code"), "BATCH_TOO_LARGE");
    assert_eq!(s.app.history("reserved").await, None);
    assert_eq!(s.app.history("too-large").await, None);
    assert_eq!(percents(&s.app.history("fits").await.unwrap()), [1, 2]);
}

/// A node that read an entry and then lost its lease may still be logging it: the next
/// lease holder claims it only once it has been idle for a whole lease, and reads nothing
/// newer before, so the worker's order holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_another_node_took_is_claimed_only_after_a_whole_lease_and_first() {
    const LEASE: Duration = Duration::from_millis(2500);
    let (redis, mut raw) = redis_only().await;
    let prefix = "ingest-claim";
    let stream = format!("{prefix}:ingest");
    let add = |percent: u64| {
        let mut item = progress(percent);
        item["sessionId"] = json!("claimed");
        redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("payload")
            .arg(item.to_string())
            .clone()
    };
    let _: () = redis::cmd("XGROUP")
        .arg(&["CREATE", &stream, "herald", "0", "MKSTREAM"])
        .query_async(&mut raw)
        .await
        .unwrap();
    let _: String = add(10).query_async(&mut raw).await.unwrap();
    // Another node (whose lease has lapsed) reads the entry and is still busy with it.
    let taken = Instant::now();
    let read: redis::Value = redis::cmd("XREADGROUP")
        .arg(&[
            "GROUP",
            "herald",
            "gone-node",
            "COUNT",
            "1",
            "STREAMS",
            &stream,
            ">",
        ])
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_ne!(read, redis::Value::Nil, "the other node took the entry");
    let _: String = add(20).query_async(&mut raw).await.unwrap();

    let app = herald_on(&redis, prefix, 100, LEASE.as_millis() as u64).await;
    let deadline = taken + LEASE + WAIT;
    let events = loop {
        if let Some(events) = app.history("claimed").await {
            break events;
        }
        assert!(
            Instant::now() < deadline,
            "the taken entry was never claimed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        taken.elapsed() >= LEASE,
        "claimed after {:?}, before the entry was idle for a lease ({LEASE:?})",
        taken.elapsed()
    );
    assert_eq!(
        percents(&events)[0],
        10,
        "the newer entry overtook the taken one"
    );
    eventually("both entries to be logged", || async {
        app.history("claimed").await.is_some_and(|e| e.len() == 2)
    })
    .await;
    assert_eq!(percents(&app.history("claimed").await.unwrap()), [10, 20]);
}

/// A holder retrying a failing entry renews its lease with every attempt, so however long
/// the backend fails no other node takes the entry over meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_retrying_an_entry_keeps_its_lease_and_the_entry() {
    const LEASE: Duration = Duration::from_millis(600);
    let (redis, mut raw) = redis_only().await;
    let prefix = "ingest-keep";
    let a = herald_on(&redis, prefix, 100, LEASE.as_millis() as u64).await;
    let (status, reply) = a.post_events("stuck", &progress(5)).await;
    assert_eq!(status, 202, "{reply}");
    let keys = Keys::new(prefix).idempotency_keys("stuck");
    let _: () = redis::cmd("SET")
        .arg(&keys)
        .arg("not a sorted set")
        .query_async(&mut raw)
        .await
        .unwrap();
    let mut entry = progress(10);
    entry["sessionId"] = json!("stuck");
    let _: String = redis::cmd("XADD")
        .arg(format!("{prefix}:ingest"))
        .arg("*")
        .arg("payload")
        .arg(entry.to_string())
        .query_async(&mut raw)
        .await
        .unwrap();
    eventually("a first retry", || async {
        metric(&a, "herald_ingest_retries_total").await >= 1
    })
    .await;
    let lease_key = format!("{prefix}:ingest:lease");
    let holder: Option<String> = redis::cmd("GET")
        .arg(&lease_key)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(holder.is_some(), "someone holds the lease");

    // A second node joins, and the backend keeps failing for four leases.
    let b = herald_on(&redis, prefix, 100, LEASE.as_millis() as u64).await;
    let until = Instant::now() + LEASE * 4;
    while Instant::now() < until {
        let now: Option<String> = redis::cmd("GET")
            .arg(&lease_key)
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(
            now, holder,
            "the lease changed hands while its holder retried"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut raw)
        .await
        .unwrap();
    eventually("the retried entry to be logged", || async {
        a.history("stuck").await.is_some_and(|e| e.len() == 2)
    })
    .await;
    assert_eq!(percents(&a.history("stuck").await.unwrap()), [5, 10]);
    assert_eq!(metric(&b, "herald_ingest_retries_total").await, 0);
}

/// A session herald's orchestrator runs has one publisher, its run: producer events for it
/// are refused on the stream and over HTTP, on the node that runs it and on any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_herald_runs_takes_no_producer_events_on_any_node() {
    let mut s = setup("run-by-herald", 10).await;
    let other = herald_on(&s._redis, &s.prefix, 10, 0).await;
    // The simulated model pauses on a clarification, so the run stays alive.
    let (status, created) = s
        .app
        .post_json(
            "/api/wizard/sessions",
            &json!({ "prompts": ["Plan it [clarify]"] }),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let session = created["sessionId"].as_str().unwrap().to_owned();

    for node in [&s.app, &other] {
        let (status, body) = node.post_events(&session, &progress(99)).await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "SESSION_RUN_BY_HERALD", "{body}");
    }
    let mut entry = progress(98);
    entry["sessionId"] = json!(session);
    let refused_id = s.publish(&entry).await;
    let marker = json!({ "sessionId": "after-the-refusal", "event": "progress", "data": { "status": "ACTIVE", "progress": 1 } });
    s.publish(&marker).await;
    let app = &s.app;
    eventually("the entry after the refused one", || async {
        app.history("after-the-refusal").await.is_some()
    })
    .await;
    let refusals = s.refusals().await;
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(field(&refusals[0], "entry"), refused_id);
    assert_eq!(field(&refusals[0], "code"), "SESSION_RUN_BY_HERALD");
    // None of the producer's percentages reached the log.
    let history = s.app.history(&session).await.unwrap();
    assert!(
        history
            .iter()
            .all(|e| ![98, 99].contains(&e["data"]["progress"].as_u64().unwrap_or(0))),
        "{history:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Socket.IO emitters (docs/deployment.md "Socket.IO emitters"); the real python-socketio
// and @socket.io/redis-emitter packages are in tests/python and tests/js.

/// python-socketio's `RedisManager.emit("progress", data, room=session)` on the wire.
fn socketio_emit(session: &str, percent: u64) -> String {
    json!({
        "method": "emit", "event": "progress",
        "data": [{ "status": "PROCESSING", "progress": percent }],
        "binary": false, "namespace": "/", "room": session,
        "skip_sid": null, "callback": null, "host_id": "test-worker",
    })
    .to_string()
}

/// Waits until a translator holds the lease (it has subscribed by then), then publishes
/// `message` on python-socketio's channel, over a connection of its own.
async fn emit_when_heard(redis: &RedisServer, prefix: &str, message: &str) {
    let mut raw = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let lease = Keys::new(prefix).emitter_lease();
    eventually("a translator", || {
        let (mut raw, lease) = (raw.clone(), lease.clone());
        async move {
            let holder: Option<String> = redis::cmd("GET")
                .arg(&lease)
                .query_async(&mut raw)
                .await
                .unwrap();
            holder.is_some()
        }
    })
    .await;
    let heard: i64 = redis::cmd("PUBLISH")
        .arg("socketio")
        .arg(message)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(heard >= 1, "nobody listens on `socketio`");
}

async fn logged(app: &TestServer, session: &str) -> Vec<Value> {
    app.history(session).await.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emitter_messages_are_heard_again_after_redis_restarts() {
    let (mut redis, _) = redis_only().await;
    let prefix = "emitters-restart";
    let app = herald_on(&redis, prefix, 100, 0).await;
    emit_when_heard(&redis, prefix, &socketio_emit("emit-before", 10)).await;
    eventually("the emit before the restart to be logged", || async {
        logged(&app, "emit-before").await.len() == 1
    })
    .await;

    // An empty Redis comes back on the same port: the translator resubscribes by itself.
    redis.restart().await;
    emit_when_heard(&redis, prefix, &socketio_emit("emit-after", 20)).await;
    eventually("the emit after the restart to be logged", || async {
        logged(&app, "emit-after").await.len() == 1
    })
    .await;
    assert_eq!(percents(&logged(&app, "emit-after").await), [20]);
    assert_eq!(metric(&app, "herald_emitter_forwarded_total").await, 2);
}

/// A burst faster than the translator: what its bounded backlog cannot hold is dropped,
/// counted and described, never queued without bound; every message is either forwarded
/// or counted as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emitter_burst_past_the_backlog_is_dropped_counted_and_described() {
    const BURST: u64 = 30_000;
    let (redis, mut raw) = redis_only().await;
    let prefix = "emitters-burst";
    let app = herald_on(&redis, prefix, 100, 1500).await;
    emit_when_heard(&redis, prefix, &socketio_emit("burst-0", 1)).await;
    let mut pipe = redis::pipe();
    for i in 1..BURST {
        pipe.cmd("PUBLISH")
            .arg("socketio")
            .arg(socketio_emit(&format!("burst-{}", i % 100), i % 100))
            .ignore();
    }
    let () = pipe.query_async(&mut raw).await.unwrap();
    eventually("every message forwarded or counted as dropped", || async {
        metric(&app, "herald_emitter_forwarded_total").await
            + metric(&app, "herald_emitter_dropped_total").await
            == BURST
    })
    .await;
    let dropped = metric(&app, "herald_emitter_dropped_total").await;
    assert!(dropped > 0, "a burst of {BURST} fit in the backlog");
    let errors: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(format!("{prefix}:ingest:errors"))
        .arg("-")
        .arg("+")
        .query_async(&mut raw)
        .await
        .unwrap();
    let described: u64 = errors
        .iter()
        .filter(|(_, fields)| field(fields, "entry") == "pubsub")
        .map(|(_, fields)| {
            let reason = field(fields, "error");
            reason.split(' ').next().unwrap().parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(described, dropped, "{errors:?}");
}
