//! One behavioural suite for the storage traits, run against every backend: the
//! [`EventLog`] (seq assignment, serialization, epochs, retention, idempotency,
//! concurrency) and the [`SessionStore`] (the fold, listing, metadata, expiry).
//!
//! A behaviour is an async function over `Arc<dyn EventLog>` / `Arc<dyn SessionStore>`;
//! `log_suite!` and `store_suite!` turn it into a `memory`, a `disk` (the data dir), a
//! `redis` test (`cargo test --test backends redis`) and a `redis_cluster` one. Each Redis test
//! runs its own `redis-server` (tests/common/redis.rs) and uses its own key prefix; the
//! `redis_cluster` tests share one local three-master Redis Cluster per run
//! (`RedisCluster::shared`), each under its own prefix. Behaviours that only exist with
//! several nodes (two `RedisLog`s or `RedisStore`s on one Redis) are Redis-only tests at
//! the end.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::is_timestamp;
use common::redis::{RedisCluster, RedisServer};
use herald::event::{EventDraft, EventKind, SessionStatus};
use herald::log::{
    AppendOutcome, Appended, Epoch, EventLog, LogError, LogHead, LogLimits, LoggedEvent, MemoryLog,
    Writer,
};
use herald::redis::{Announcement, Keys, Redis, RedisLog, RedisStore};
use herald::store::{MemoryStore, Origin, SessionStore, Snapshot, StoreLimits};
use serde_json::{Map, Value, json};

/// Retention large enough that nothing is trimmed.
const KEEP_ALL: u64 = 10_000;
/// A read limit larger than anything a test logs.
const READ_ALL: usize = 100_000;
/// How long one behaviour may take before the test fails instead of hanging.
const BEHAVIOUR_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Backends

fn memory_log(max_events: u64) -> Arc<dyn EventLog> {
    Arc::new(MemoryLog::new(max_events))
}

fn memory_store() -> Arc<dyn SessionStore> {
    Arc::new(MemoryStore::new())
}

/// A log and store in a fresh data dir, which lives as long as the returned guard.
fn disk_backends(
    log_limits: LogLimits,
    store_limits: StoreLimits,
) -> (tempfile::TempDir, Arc<dyn EventLog>, Arc<dyn SessionStore>) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (log, store) = herald::datadir::open(dir.path(), log_limits, store_limits)
        .unwrap_or_else(|e| panic!("datadir::open: {e}"));
    (dir, Arc::new(log), Arc::new(store))
}

/// A key prefix no other test uses.
fn prefix(test: &str) -> String {
    let unique = uuid::Uuid::new_v4().simple().to_string();
    format!("herald-test:{test}:{}", &unique[..8])
}

async fn redis_log(server: &RedisServer, prefix: &str, max_events: u64) -> Arc<dyn EventLog> {
    let log = RedisLog::connect(&server.url(), prefix, max_events)
        .await
        .unwrap_or_else(|e| panic!("RedisLog::connect({}, {prefix}): {e}", server.url()));
    Arc::new(log)
}

async fn redis_store(
    server: &RedisServer,
    prefix: &str,
    log: Arc<dyn EventLog>,
) -> Arc<dyn SessionStore> {
    let store = RedisStore::connect(&server.url(), prefix, log)
        .await
        .unwrap_or_else(|e| panic!("RedisStore::connect({}, {prefix}): {e}", server.url()));
    Arc::new(store)
}

/// The Redis Cluster this test binary shares, as herald reaches it (`--redis-cluster`).
fn cluster_target() -> Redis {
    let url = RedisCluster::shared().url();
    Redis::cluster(&url).unwrap_or_else(|e| panic!("Redis::cluster({url}): {e}"))
}

async fn cluster_log(prefix: &str, limits: LogLimits) -> Arc<dyn EventLog> {
    let log = RedisLog::open(&cluster_target(), prefix, limits)
        .await
        .unwrap_or_else(|e| panic!("RedisLog::open(cluster, {prefix}): {e}"));
    Arc::new(log)
}

async fn cluster_store(
    prefix: &str,
    log: Arc<dyn EventLog>,
    limits: StoreLimits,
) -> Arc<dyn SessionStore> {
    let store = RedisStore::open(&cluster_target(), prefix, log, limits)
        .await
        .unwrap_or_else(|e| panic!("RedisStore::open(cluster, {prefix}): {e}"));
    Arc::new(store)
}

async fn bounded(behaviour: impl Future<Output = ()>) {
    tokio::time::timeout(BEHAVIOUR_TIMEOUT, behaviour)
        .await
        .expect("the behaviour finishes in time (a backend call hangs?)");
}

/// `log_suite!(behaviour, max_events)`: tests `behaviour::memory` and `behaviour::redis`,
/// each running `behaviour(log)` on a fresh log that keeps `max_events` per session.
macro_rules! log_suite {
    ($behaviour:ident, $max_events:expr) => {
        mod $behaviour {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                bounded(super::$behaviour(memory_log($max_events))).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn disk() {
                let (_dir, log, _) =
                    disk_backends(LogLimits::events($max_events), StoreLimits::default());
                bounded(super::$behaviour(log)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                let server = RedisServer::start().await;
                let prefix = prefix(stringify!($behaviour));
                let log = redis_log(&server, &prefix, $max_events).await;
                bounded(super::$behaviour(log)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis_cluster() {
                let prefix = prefix(stringify!($behaviour));
                let log = cluster_log(&prefix, LogLimits::events($max_events)).await;
                bounded(super::$behaviour(log)).await;
            }
        }
    };
}

/// `store_suite!(behaviour)`: tests `behaviour::memory` and `behaviour::redis`, each
/// running `behaviour(log, store)` on a fresh log (keeping everything) and store.
macro_rules! store_suite {
    ($behaviour:ident) => {
        mod $behaviour {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                bounded(super::$behaviour(memory_log(KEEP_ALL), memory_store())).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn disk() {
                let (_dir, log, store) =
                    disk_backends(LogLimits::events(KEEP_ALL), StoreLimits::default());
                bounded(super::$behaviour(log, store)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                let server = RedisServer::start().await;
                let prefix = prefix(stringify!($behaviour));
                let log = redis_log(&server, &prefix, KEEP_ALL).await;
                let store = redis_store(&server, &prefix, log.clone()).await;
                bounded(super::$behaviour(log, store)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis_cluster() {
                let prefix = prefix(stringify!($behaviour));
                let log = cluster_log(&prefix, LogLimits::events(KEEP_ALL)).await;
                let store = cluster_store(&prefix, log.clone(), StoreLimits::default()).await;
                bounded(super::$behaviour(log, store)).await;
            }
        }
    };
}

// ---------------------------------------------------------------------------------------
// Helpers

fn draft(kind: EventKind, data: Value) -> EventDraft {
    let Value::Object(data) = data else {
        panic!("draft data must be an object: {data}");
    };
    EventDraft {
        kind,
        data,
        idempotency_key: None,
    }
}

fn keyed(key: &str, mut draft: EventDraft) -> EventDraft {
    draft.idempotency_key = Some(key.to_owned());
    draft
}

/// A `progress` draft carrying its number `n`.
fn progress(n: u64) -> EventDraft {
    draft(
        EventKind::Progress,
        json!({ "status": "PROCESSING", "progress": n % 101, "n": n }),
    )
}

fn progresses(numbers: std::ops::RangeInclusive<u64>) -> Vec<EventDraft> {
    numbers.map(progress).collect()
}

fn parse(event: &LoggedEvent) -> Map<String, Value> {
    serde_json::from_str(event.json.get()).unwrap_or_else(|e| {
        panic!(
            "seq {}: LoggedEvent.json is not a JSON object ({e}): {}",
            event.seq,
            event.json.get()
        )
    })
}

fn seqs_of(events: &[Arc<LoggedEvent>]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

fn appended_seqs(out: &AppendOutcome) -> Vec<u64> {
    out.appended.iter().map(|a| a.event.seq).collect()
}

fn unknown_head() -> LogHead {
    LogHead::unwritten()
}

async fn append(log: &dyn EventLog, session_id: &str, drafts: Vec<EventDraft>) -> AppendOutcome {
    log.append(session_id, drafts)
        .await
        .unwrap_or_else(|e| panic!("append to {session_id}: {e}"))
}

async fn read(log: &dyn EventLog, session_id: &str, after: u64, limit: usize) -> Vec<u64> {
    let slice = log.read(session_id, after, limit).await.unwrap();
    seqs_of(&slice.events)
}

/// Appends and folds the new events into the store, as the hub does.
async fn publish(
    log: &dyn EventLog,
    store: &dyn SessionStore,
    session_id: &str,
    drafts: Vec<EventDraft>,
) -> AppendOutcome {
    let out = append(log, session_id, drafts).await;
    store
        .apply(session_id, &out.epoch, &out.appended)
        .await
        .unwrap_or_else(|e| panic!("apply to {session_id}: {e}"));
    out
}

async fn get(store: &dyn SessionStore, session_id: &str) -> Snapshot {
    store
        .get(session_id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{session_id} has a snapshot"))
}

/// A snapshot as JSON without `createdAt` (the moment the store first saw the session).
fn comparable(snapshot: &Snapshot) -> Value {
    let mut value = serde_json::to_value(snapshot).unwrap();
    value.as_object_mut().unwrap().remove("createdAt");
    value
}

/// What the store must hold for a session: `Snapshot::apply` over its whole log, in `seq`
/// order, plus `metadata`.
async fn folded(log: &dyn EventLog, session_id: &str, metadata: Value) -> Value {
    folded_owned(log, session_id, metadata, None).await
}

/// [`folded`], for a session created by `owner`.
async fn folded_owned(
    log: &dyn EventLog,
    session_id: &str,
    metadata: Value,
    owner: Option<&str>,
) -> Value {
    let slice = log.read(session_id, 0, READ_ALL).await.unwrap();
    assert_eq!(
        slice.head.first_seq, 1,
        "the reference fold needs the whole log"
    );
    let events: Vec<Appended> = slice
        .events
        .iter()
        .map(|e| Appended {
            event: e.clone(),
            data: parse(e),
        })
        .collect();
    let epoch = slice.head.epoch.expect("a written log has an epoch");
    let mut snapshot = Snapshot::new(session_id, &epoch, "t0".into());
    snapshot.apply(&events, &epoch);
    snapshot.metadata = metadata;
    snapshot.summary.owner = owner.map(str::to_owned);
    comparable(&snapshot)
}

async fn listed(store: &dyn SessionStore, status: Option<SessionStatus>) -> Vec<String> {
    let mut ids: Vec<String> = store
        .list(status)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.session_id)
        .collect();
    ids.sort();
    ids
}

// ---------------------------------------------------------------------------------------
// EventLog behaviours

log_suite!(append_numbers_and_serializes_once, KEEP_ALL);
/// `seq` is 1..N across batches; `seqs`, `head` and the events agree; the JSON carries
/// the server fields and every producer field verbatim; reading gives the same bytes.
async fn append_numbers_and_serializes_once(log: Arc<dyn EventLog>) {
    let sid = "s-append";
    let rich = json!({
        "status": "PROCESSING",
        "progress": 12.5,
        "nested": { "a": [1, { "b": null }, true, "x"], "deep": { "x": { "y": "z" } } },
        "unicode": "héllo ✓ 日本語 🚀 \"quoted\" back\\slash \n\t \u{1} \u{7f} \u{2028}",
        "big": 9_007_199_254_740_993_u64,
        "max": u64::MAX,
        "negative": -9_007_199_254_740_993_i64,
        "float": 0.1,
        "tiny": 1.5e-7,
        "huge": 1e300,
        "empty": {},
        "list": [],
        "seq": 99,
        "sessionId": sid,
    });
    let batch1 = vec![
        draft(EventKind::Progress, rich),
        draft(
            EventKind::ModelResult,
            json!({ "promptId": "p1", "modelName": "m1", "status": "completed",
                    "result": "ok", "duration": 0.25,
                    "timestamp": "2001-02-03T04:05:06.789Z" }),
        ),
        draft(
            EventKind::Clarification,
            json!({ "clarificationId": "c1", "question": "¿qué?", "status": "pending" }),
        ),
    ];
    let batch2 = vec![
        draft(
            EventKind::Completed,
            json!({ "result": { "answer": 42, "big": 9_007_199_254_740_993_u64 } }),
        ),
        draft(
            EventKind::Error,
            json!({ "error": "boom", "code": "E1", "timestamp": "the producer's own clock" }),
        ),
    ];
    let drafts: Vec<EventDraft> = batch1.iter().chain(&batch2).cloned().collect();

    let first = append(&*log, sid, batch1).await;
    let second = append(&*log, sid, batch2).await;
    let mut epoch = None;
    for (out, expected) in [(&first, 1..=3u64), (&second, 4..=5)] {
        let expected: Vec<u64> = expected.collect();
        assert_eq!(
            out.seqs,
            expected.iter().map(|&s| Some(s)).collect::<Vec<_>>()
        );
        assert_eq!(appended_seqs(out), expected);
        assert_eq!(out.duplicates, 0);
        assert_eq!(out.last_seq, *expected.last().unwrap());
        assert_eq!(out.first_seq, 1);
        assert_eq!(*epoch.get_or_insert(&out.epoch), &out.epoch);
    }

    let appended: Vec<&Appended> = first.appended.iter().chain(&second.appended).collect();
    for (i, (a, d)) in appended.iter().zip(&drafts).enumerate() {
        let seq = i as u64 + 1;
        let raw = a.event.json.get();
        assert_eq!(a.event.kind, d.kind, "seq {seq}: kind");
        let json = parse(&a.event);
        assert_eq!(
            Value::Object(json.clone()),
            Value::Object(a.data.clone()),
            "seq {seq}: Appended.data is what was serialized"
        );
        let keys: Vec<&str> = json.keys().map(String::as_str).collect();
        assert_eq!(keys[..2], ["sessionId", "seq"], "seq {seq}: {raw}");
        assert_eq!(json["sessionId"], sid, "{raw}");
        assert_eq!(json["seq"], seq, "{raw}");
        for (key, value) in &d.data {
            if key != "seq" && key != "sessionId" {
                assert_eq!(&json[key], value, "seq {seq}: field `{key}` kept verbatim");
            }
        }
        let mut want: BTreeSet<&str> = d.data.keys().map(String::as_str).collect();
        want.extend(["sessionId", "seq", "timestamp"]);
        assert_eq!(
            json.keys().map(String::as_str).collect::<BTreeSet<_>>(),
            want,
            "seq {seq}: no field added or lost: {raw}"
        );
        match d.data.get("timestamp") {
            Some(given) => assert_eq!(&json["timestamp"], given, "a given timestamp is kept"),
            None => assert!(
                is_timestamp(&json["timestamp"]),
                "seq {seq}: a missing timestamp is filled: {raw}"
            ),
        }
    }
    let raw = appended[0].event.json.get();
    for digits in [
        "9007199254740993",
        "18446744073709551615",
        "-9007199254740993",
    ] {
        assert!(
            raw.contains(digits),
            "{digits} must be written as is, not via a float: {raw}"
        );
    }

    let slice = log.read(sid, 0, READ_ALL).await.unwrap();
    assert_eq!(slice.head, second.head());
    assert_eq!(seqs_of(&slice.events), [1, 2, 3, 4, 5]);
    for (read, a) in slice.events.iter().zip(&appended) {
        assert_eq!(read.kind, a.event.kind, "seq {}: kind as read", read.seq);
        assert_eq!(
            read.json.get(),
            a.event.json.get(),
            "seq {}: history serves the bytes that were logged",
            read.seq
        );
    }
    assert_eq!(log.head(sid).await.unwrap(), second.head());
}

log_suite!(heads_and_epochs, KEEP_ALL);
/// An unknown session has the empty head; a log gets an epoch on its first append and
/// keeps it; `remove` forgets the log, and the next append starts a new incarnation.
async fn heads_and_epochs(log: Arc<dyn EventLog>) {
    let sid = "s-epoch";
    assert_eq!(log.head(sid).await.unwrap(), unknown_head());
    let slice = log.read(sid, 0, 10).await.unwrap();
    assert_eq!(slice.head, unknown_head());
    assert!(slice.events.is_empty());

    let first = append(&*log, sid, vec![progress(1)]).await;
    let epoch = first.epoch.clone();
    assert_eq!(
        first.head(),
        LogHead {
            last_seq: 1,
            first_seq: 1,
            epoch: Some(epoch.clone())
        }
    );
    assert_eq!(log.head(sid).await.unwrap(), first.head());
    let second = append(&*log, sid, progresses(2..=3)).await;
    assert_eq!(second.epoch, epoch, "the epoch is stable across appends");
    assert_eq!(second.last_seq, 3);
    assert_eq!(log.head(sid).await.unwrap(), second.head());

    let other = append(&*log, "s-other", vec![progress(1)]).await;
    assert_eq!(other.seqs, [Some(1)], "each session has its own numbering");

    log.remove(sid).await.unwrap();
    assert_eq!(log.head(sid).await.unwrap(), unknown_head());
    let slice = log.read(sid, 0, 10).await.unwrap();
    assert_eq!(slice.head, unknown_head());
    assert!(slice.events.is_empty(), "a removed log has no events");
    log.remove(sid).await.unwrap();
    log.remove("s-never").await.unwrap();

    let again = append(&*log, sid, vec![progress(7)]).await;
    assert_eq!(again.seqs, [Some(1)], "seq restarts after remove");
    assert_eq!(parse(&again.appended[0].event)["seq"], 1);
    assert_ne!(again.epoch, epoch, "a recreated log has a new epoch");
    assert_eq!(
        again.head(),
        LogHead {
            last_seq: 1,
            first_seq: 1,
            epoch: Some(again.epoch.clone())
        }
    );
    let slice = log.read(sid, 0, 10).await.unwrap();
    assert_eq!(seqs_of(&slice.events), [1]);
    assert_eq!(
        parse(&slice.events[0])["n"],
        7,
        "no event of the old incarnation"
    );

    assert_eq!(
        log.head("s-other").await.unwrap(),
        other.head(),
        "remove touches one session only"
    );
}

log_suite!(retention_keeps_the_newest, 5);
/// With `max_events` 5 only the newest five events are retained; `can_resume` and paged
/// reads follow what is retained.
async fn retention_keeps_the_newest(log: Arc<dyn EventLog>) {
    let sid = "s-retain";
    let out = append(&*log, sid, progresses(1..=3)).await;
    assert_eq!((out.first_seq, out.last_seq), (1, 3));
    assert!(out.head().can_resume(0, None));
    let out = append(&*log, sid, progresses(4..=8)).await;
    assert_eq!((out.first_seq, out.last_seq), (4, 8));
    let out = append(&*log, sid, progresses(9..=12)).await;
    assert_eq!(appended_seqs(&out), [9, 10, 11, 12]);
    let epoch = out.epoch.clone();
    let head = LogHead {
        last_seq: 12,
        first_seq: 8,
        epoch: Some(epoch.clone()),
    };
    assert_eq!(out.head(), head);
    assert_eq!(log.head(sid).await.unwrap(), head);

    let slice = log.read(sid, 0, READ_ALL).await.unwrap();
    assert_eq!(slice.head, head);
    assert_eq!(seqs_of(&slice.events), [8, 9, 10, 11, 12]);
    for event in &slice.events {
        let json = parse(event);
        assert_eq!(json["seq"], event.seq);
        assert_eq!(
            json["n"], event.seq,
            "seq {} is the event logged as it",
            event.seq
        );
    }

    for last_seq in 7..=12 {
        assert!(
            head.can_resume(last_seq, Some(&epoch)),
            "lastSeq {last_seq}"
        );
        assert!(head.can_resume(last_seq, None), "lastSeq {last_seq}");
    }
    assert!(!head.can_resume(6, Some(&epoch)), "seq 7 is gone");
    assert!(!head.can_resume(0, None), "seq 1 is gone");
    assert!(!head.can_resume(13, Some(&epoch)), "ahead of the log");
    assert!(!head.can_resume(10, Some(&Epoch::fresh())));

    for after in 0..=14u64 {
        for limit in 0..=6usize {
            let want: Vec<u64> = ((after + 1).max(8)..=12).take(limit).collect();
            let slice = log.read(sid, after, limit).await.unwrap();
            assert_eq!(
                seqs_of(&slice.events),
                want,
                "read(after {after}, limit {limit})"
            );
            assert_eq!(slice.head, head, "read(after {after}, limit {limit}) head");
        }
    }

    // One batch larger than the retention: every event is reported, the newest 5 kept.
    let big = append(&*log, "s-retain-big", progresses(1..=7)).await;
    assert_eq!(appended_seqs(&big), [1, 2, 3, 4, 5, 6, 7]);
    assert_eq!((big.first_seq, big.last_seq), (3, 7));
    assert_eq!(
        read(&*log, "s-retain-big", 0, READ_ALL).await,
        [3, 4, 5, 6, 7]
    );
}

log_suite!(idempotency_keys, KEEP_ALL);
/// A key accepted once is a duplicate later and within its own batch; the duplicate
/// reports the original's seq and logs nothing. Keys are per session.
async fn idempotency_keys(log: Arc<dyn EventLog>) {
    let sid = "s-idem";
    let out = append(
        &*log,
        sid,
        vec![
            keyed("k1", progress(1)),
            progress(2),
            keyed("k2", progress(3)),
        ],
    )
    .await;
    assert_eq!(out.seqs, [Some(1), Some(2), Some(3)]);
    assert_eq!(out.duplicates, 0);

    let out = append(
        &*log,
        sid,
        vec![
            keyed("k1", progress(101)),
            keyed("k3", progress(4)),
            keyed("k2", progress(103)),
        ],
    )
    .await;
    assert_eq!(
        out.seqs,
        [Some(1), Some(4), Some(3)],
        "duplicates name the original"
    );
    assert_eq!(out.duplicates, 2);
    assert_eq!(appended_seqs(&out), [4]);
    assert_eq!(parse(&out.appended[0].event)["n"], 4);
    assert_eq!(out.last_seq, 4);

    let out = append(
        &*log,
        sid,
        vec![
            keyed("k5", progress(5)),
            keyed("k5", progress(105)),
            progress(6),
        ],
    )
    .await;
    assert_eq!(
        out.seqs,
        [Some(5), Some(5), Some(6)],
        "a batch repeating a key"
    );
    assert_eq!(out.duplicates, 1);
    assert_eq!(appended_seqs(&out), [5, 6]);

    let epoch = out.epoch.clone();
    let out = append(&*log, sid, vec![keyed("k1", progress(201))]).await;
    assert_eq!(out.seqs, [Some(1)]);
    assert_eq!(out.duplicates, 1);
    assert!(
        out.appended.is_empty(),
        "an all-duplicate batch logs nothing"
    );
    assert_eq!(
        out.head(),
        LogHead {
            last_seq: 6,
            first_seq: 1,
            epoch: Some(epoch)
        }
    );

    let slice = log.read(sid, 0, READ_ALL).await.unwrap();
    assert_eq!(seqs_of(&slice.events), [1, 2, 3, 4, 5, 6]);
    let ns: Vec<Value> = slice.events.iter().map(|e| parse(e)["n"].clone()).collect();
    assert_eq!(
        ns,
        [1, 2, 3, 4, 5, 6],
        "the originals are logged, never a duplicate"
    );

    let other = append(&*log, "s-idem-other", vec![keyed("k1", progress(1))]).await;
    assert_eq!(other.seqs, [Some(1)], "keys are per session");
    assert_eq!((other.duplicates, other.appended.len()), (0, 1));

    log.remove(sid).await.unwrap();
    let fresh = append(&*log, sid, vec![keyed("k1", progress(1))]).await;
    assert_eq!(
        (
            fresh.seqs.as_slice(),
            fresh.duplicates,
            fresh.appended.len()
        ),
        ([Some(1)].as_slice(), 0, 1),
        "a removed log forgets its keys"
    );
}

const TASKS: u64 = 8;
const BATCHES: u64 = 25;
const PER_BATCH: u64 = 4;

log_suite!(concurrent_appends_one_instance, KEEP_ALL);
async fn concurrent_appends_one_instance(log: Arc<dyn EventLog>) {
    concurrent_appends(vec![log]).await;
}

/// 8 tasks × 25 batches of 4 appends to one session at once, spread over `logs` (several
/// instances = several nodes): the log is exactly 1..800, every batch contiguous and in
/// its order, each task's batches in the order it sent them, and the outcomes carry the
/// bytes that were logged.
async fn concurrent_appends(logs: Vec<Arc<dyn EventLog>>) {
    let sid = "s-concurrent";
    let total = TASKS * BATCHES * PER_BATCH;
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let log = logs[task as usize % logs.len()].clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for batch in 0..BATCHES {
                    let drafts = (0..PER_BATCH)
                        .map(|i| {
                            draft(
                                EventKind::Progress,
                                json!({ "status": "PROCESSING", "progress": 1,
                                        "task": task, "batch": batch, "i": i }),
                            )
                        })
                        .collect();
                    outcomes.push(append(&*log, sid, drafts).await);
                }
                outcomes
            })
        })
        .collect();

    let mut logged: BTreeMap<u64, String> = BTreeMap::new();
    let mut epochs = BTreeSet::new();
    for (task, handle) in tasks.into_iter().enumerate() {
        let outcomes = handle.await.expect("append task");
        let mut previous = 0;
        for (batch, out) in outcomes.iter().enumerate() {
            let seqs = appended_seqs(out);
            let first = seqs[0];
            let want: Vec<u64> = (first..first + PER_BATCH).collect();
            assert_eq!(seqs, want, "task {task} batch {batch} is contiguous");
            assert_eq!(out.seqs, want.iter().map(|&s| Some(s)).collect::<Vec<_>>());
            assert!(
                first > previous,
                "task {task}: batch {batch} after the one before"
            );
            assert!(out.last_seq >= first + PER_BATCH - 1);
            previous = first;
            epochs.insert(out.epoch.clone());
            for (i, a) in out.appended.iter().enumerate() {
                let json = parse(&a.event);
                assert_eq!(
                    (&json["task"], &json["batch"], &json["i"], &json["seq"]),
                    (&json!(task), &json!(batch), &json!(i), &json!(a.event.seq))
                );
                let dup = logged.insert(a.event.seq, a.event.json.get().to_owned());
                assert!(dup.is_none(), "seq {} handed out twice", a.event.seq);
            }
        }
    }
    assert_eq!(epochs.len(), 1, "one incarnation: {epochs:?}");
    assert_eq!(
        logged.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );

    let epoch = epochs.into_iter().next().unwrap();
    for log in &logs {
        let slice = log.read(sid, 0, READ_ALL).await.unwrap();
        assert_eq!(
            slice.head,
            LogHead {
                last_seq: total,
                first_seq: 1,
                epoch: Some(epoch.clone())
            }
        );
        assert_eq!(seqs_of(&slice.events), (1..=total).collect::<Vec<_>>());
        for event in &slice.events {
            assert_eq!(
                event.json.get(),
                logged[&event.seq],
                "seq {}: the log holds what the append reported",
                event.seq
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// SessionStore behaviours

store_suite!(store_folds_lists_and_keeps_metadata);
/// `apply` creates and folds the snapshot exactly as `Snapshot::apply` does; `get`,
/// `list` (with its status filter) and `set_metadata` see it.
async fn store_folds_lists_and_keeps_metadata(
    log: Arc<dyn EventLog>,
    store: Arc<dyn SessionStore>,
) {
    let (log, store) = (&*log, &*store);
    let sid = "s-fold";
    assert!(store.get(sid).await.unwrap().is_none());
    assert!(listed(store, None).await.is_empty());

    let out = publish(
        log,
        store,
        sid,
        vec![draft(
            EventKind::Progress,
            json!({ "status": "ACTIVE", "progress": 10,
                    "prompts": { "total": 3, "completed": 0, "processing": 1, "pending": 2, "failed": 0 } }),
        )],
    )
    .await;
    let snap = get(store, sid).await;
    assert_eq!(snap.summary.session_id, sid);
    assert_eq!(snap.summary.status, SessionStatus::Active);
    assert_eq!(snap.summary.progress, 10.0);
    assert_eq!(
        (snap.summary.prompts.total, snap.summary.prompts.pending),
        (3, 2)
    );
    assert_eq!(snap.summary.last_seq, 1);
    assert_eq!(snap.summary.epoch, out.epoch);
    assert!(is_timestamp(&json!(snap.summary.created_at)));
    assert_eq!(snap.metadata, Value::Null);
    assert_eq!(comparable(&snap), folded(log, sid, Value::Null).await);

    let metadata = json!({ "owner": "ada", "tags": ["x", 1], "big": 9_007_199_254_740_993_u64 });
    let origin = Origin {
        metadata: Some(metadata.clone()),
        owner: Some("ada".into()),
    };
    store.set_origin(sid, &origin).await.unwrap();
    let snap = get(store, sid).await;
    assert_eq!(snap.metadata, metadata);
    assert_eq!(
        snap.summary.owner.as_deref(),
        Some("ada"),
        "the owner is stored"
    );
    let summaries = store.list(None).await.unwrap();
    let summary = summaries.iter().find(|s| s.session_id == sid).unwrap();
    assert_eq!(summary.owner.as_deref(), Some("ada"), "and listed");

    let model = |prompt: &str, model: &str, status: &str, extra: Value| {
        let mut data = json!({ "promptId": prompt, "modelName": model, "status": status });
        data.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        draft(EventKind::ModelResult, data)
    };
    let clarification = |id: &str, status: &str, extra: Value| {
        let mut data =
            json!({ "clarificationId": id, "question": format!("{id}?"), "status": status });
        data.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        draft(EventKind::Clarification, data)
    };
    publish(
        log,
        store,
        sid,
        vec![
            model("p1", "m1", "processing", json!({})),
            model("p1", "m2", "completed", json!({ "result": "r2", "duration": 1.5 })),
            clarification("c1", "pending", json!({})),
            clarification("c2", "pending", json!({})),
            model("p1", "m1", "completed", json!({ "result": "r1", "provider": "simulated" })),
            clarification("c1", "answered", json!({ "answer": "a1" })),
            draft(
                EventKind::Progress,
                json!({ "status": "PROCESSING", "progress": 50,
                        "prompts": { "total": 3, "completed": 1, "processing": 2, "pending": 0, "failed": 0 },
                        "hasResult": true, "result": { "partial": true } }),
            ),
        ],
    )
    .await;
    let snap = get(store, sid).await;
    assert_eq!(snap.summary.status, SessionStatus::Processing);
    assert_eq!(snap.summary.progress, 50.0);
    assert_eq!(snap.summary.last_seq, 8);
    let results: Vec<(&Value, &Value, &Value)> = snap
        .model_results
        .iter()
        .map(|m| (&m["modelName"], &m["status"], &m["seq"]))
        .collect();
    assert_eq!(
        results,
        [
            (&json!("m1"), &json!("completed"), &json!(6)),
            (&json!("m2"), &json!("completed"), &json!(3)),
        ],
        "the latest result per prompt and model, in order of first appearance"
    );
    let clarifications: Vec<(&str, &str, Option<&str>)> = snap
        .clarifications
        .iter()
        .map(|c| {
            (
                c.clarification_id.as_str(),
                c.status.as_str(),
                c.answer.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        clarifications,
        [("c1", "answered", Some("a1")), ("c2", "pending", None)]
    );
    assert_eq!(snap.summary.clarification_count, 1);
    assert!(snap.summary.has_clarifications);
    assert_eq!(snap.result, Some(json!({ "partial": true })));
    assert_eq!(snap.metadata, metadata, "metadata survives later events");
    assert_eq!(
        comparable(&snap),
        folded_owned(log, sid, metadata.clone(), Some("ada")).await
    );

    publish(log, store, "s-done", vec![progress(5)]).await;
    publish(
        log,
        store,
        "s-done",
        vec![draft(
            EventKind::Completed,
            json!({ "result": { "text": "done" } }),
        )],
    )
    .await;
    let done = get(store, "s-done").await;
    assert_eq!(done.summary.status, SessionStatus::Completed);
    assert_eq!(done.summary.progress, 100.0);
    assert_eq!(done.result, Some(json!({ "text": "done" })));
    assert_eq!(comparable(&done), folded(log, "s-done", Value::Null).await);

    let failed = vec![
        progress(1),
        draft(EventKind::Error, json!({ "error": "boom", "code": "X" })),
    ];
    let out = publish(log, store, "s-failed", failed).await;
    let snap = get(store, "s-failed").await;
    assert_eq!(snap.summary.status, SessionStatus::Failed);
    assert_eq!(
        snap.error,
        Some(Value::Object(out.appended[1].data.clone()))
    );
    assert_eq!(
        comparable(&snap),
        folded(log, "s-failed", Value::Null).await
    );

    store.apply("s-empty", &Epoch::fresh(), &[]).await.unwrap();
    assert!(
        store.get("s-empty").await.unwrap().is_none(),
        "no events, no snapshot"
    );
    assert!(store.get("s-unknown").await.unwrap().is_none());

    assert_eq!(listed(store, None).await, ["s-done", "s-failed", "s-fold"]);
    for (status, want) in [
        (SessionStatus::Completed, vec!["s-done"]),
        (SessionStatus::Failed, vec!["s-failed"]),
        (SessionStatus::Processing, vec!["s-fold"]),
        (SessionStatus::Active, vec![]),
        (SessionStatus::Expired, vec![]),
    ] {
        assert_eq!(listed(store, Some(status)).await, want, "list({status:?})");
    }
    for summary in store.list(None).await.unwrap() {
        let snap = get(store, &summary.session_id).await;
        assert_eq!(
            serde_json::to_value(&summary).unwrap(),
            serde_json::to_value(&snap.summary).unwrap(),
            "list and get agree on {}",
            summary.session_id
        );
    }
}

store_suite!(store_expires_ended_sessions);
/// Sessions that ended (COMPLETED, FAILED) go once their TTL has passed, not before;
/// running ones, and ones that ended and were revived, stay.
async fn store_expires_ended_sessions(log: Arc<dyn EventLog>, store: Arc<dyn SessionStore>) {
    let (log, store) = (&*log, &*store);
    let completed = || draft(EventKind::Completed, json!({ "result": {} }));
    publish(log, store, "s-live", vec![progress(1)]).await;
    publish(log, store, "s-revived", vec![completed()]).await;
    publish(log, store, "s-revived", vec![progress(2)]).await;
    assert_eq!(
        get(store, "s-revived").await.summary.status,
        SessionStatus::Processing
    );
    let done_at = Instant::now();
    publish(log, store, "s-done", vec![progress(1), completed()]).await;

    let kept = ["s-done", "s-live", "s-revived"];
    let taken = store.take_expired(Duration::from_secs(3600)).await.unwrap();
    assert!(taken.is_empty(), "nothing ended an hour ago: {taken:?}");
    for id in kept {
        assert!(store.get(id).await.unwrap().is_some(), "{id} is kept");
    }

    // A backend may expire by itself (Redis TTLs) instead of naming the session here, so
    // each phase polls until the snapshot is gone.
    let mut named: Vec<String> = Vec::new();
    let ttl = Duration::from_millis(300);
    expire(store, ttl, "s-done", &mut named).await;
    assert!(
        done_at.elapsed() >= ttl - Duration::from_millis(10),
        "s-done went {:?} after it ended, before its TTL of {ttl:?}",
        done_at.elapsed()
    );
    publish(
        log,
        store,
        "s-failed",
        vec![draft(EventKind::Error, json!({ "error": "boom" }))],
    )
    .await;
    expire(store, Duration::ZERO, "s-failed", &mut named).await;

    for id in ["s-live", "s-revived"] {
        assert!(
            !named.iter().any(|n| n == id),
            "{id} is not ended: {named:?}"
        );
        assert!(store.get(id).await.unwrap().is_some(), "{id} is kept");
    }
    let unique: BTreeSet<&String> = named.iter().collect();
    assert_eq!(
        unique.len(),
        named.len(),
        "each session is named once: {named:?}"
    );
    assert_eq!(listed(store, None).await, ["s-live", "s-revived"]);
    assert!(
        listed(store, Some(SessionStatus::Completed))
            .await
            .is_empty()
    );
    assert!(listed(store, Some(SessionStatus::Failed)).await.is_empty());
}

/// Calls `take_expired(ttl)` until `session_id` is gone (at most 5 s), collecting the
/// sessions it names.
async fn expire(
    store: &dyn SessionStore,
    ttl: Duration,
    session_id: &str,
    named: &mut Vec<String>,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        named.extend(store.take_expired(ttl).await.unwrap());
        if store.get(session_id).await.unwrap().is_none() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{session_id} is gone after take_expired({ttl:?}); named so far: {named:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

store_suite!(store_follows_a_new_epoch);
/// When the log is recreated (new epoch), the snapshot is folded afresh from the new
/// incarnation, keeping its metadata.
async fn store_follows_a_new_epoch(log: Arc<dyn EventLog>, store: Arc<dyn SessionStore>) {
    let (log, store) = (&*log, &*store);
    let sid = "s-reborn";
    let old = publish(
        log,
        store,
        sid,
        vec![
            progress(10),
            draft(
                EventKind::Clarification,
                json!({ "clarificationId": "c1", "question": "q", "status": "pending" }),
            ),
            draft(
                EventKind::ModelResult,
                json!({ "promptId": "p", "modelName": "m", "status": "completed" }),
            ),
        ],
    )
    .await;
    let origin = Origin {
        metadata: Some(json!({ "k": "v" })),
        owner: Some("ada".into()),
    };
    store.set_origin(sid, &origin).await.unwrap();
    log.remove(sid).await.unwrap();
    let new = publish(log, store, sid, vec![progress(20)]).await;
    assert_ne!(new.epoch, old.epoch);
    let snap = get(store, sid).await;
    assert_eq!(snap.summary.epoch, new.epoch);
    assert_eq!(snap.summary.last_seq, 1);
    assert_eq!(snap.summary.progress, 20.0);
    assert!(snap.clarifications.is_empty() && snap.model_results.is_empty());
    assert_eq!(snap.summary.clarification_count, 0);
    assert_eq!(snap.metadata, json!({ "k": "v" }), "metadata is kept");
    assert_eq!(
        snap.summary.owner.as_deref(),
        Some("ada"),
        "so is the owner"
    );
    assert_eq!(
        comparable(&snap),
        folded_owned(log, sid, json!({ "k": "v" }), Some("ada")).await
    );
}

store_suite!(store_keeps_run_checkpoints);
/// A run's checkpoint (SPEC §7) is saved whole, replaced by the next, listed while it is
/// saved, and gone once dropped; each session's is its own.
async fn store_keeps_run_checkpoints(_log: Arc<dyn EventLog>, store: Arc<dyn SessionStore>) {
    assert_eq!(store.load_run("run-a").await.unwrap(), None);
    assert!(store.saved_runs().await.unwrap().is_empty());
    store.save_run("run-a", b"{\"first\":1}").await.unwrap();
    store.save_run("run-b", b"{\"other\":2}").await.unwrap();
    store.save_run("run-a", b"{\"second\":2}").await.unwrap();
    assert_eq!(
        store.load_run("run-a").await.unwrap().as_deref(),
        Some(&b"{\"second\":2}"[..])
    );
    let mut saved = store.saved_runs().await.unwrap();
    saved.sort();
    assert_eq!(saved, ["run-a", "run-b"]);
    store.drop_run("run-a").await.unwrap();
    assert_eq!(store.load_run("run-a").await.unwrap(), None);
    assert_eq!(store.saved_runs().await.unwrap(), ["run-b"]);
    assert_eq!(
        store.load_run("run-b").await.unwrap().as_deref(),
        Some(&b"{\"other\":2}"[..])
    );
    // Dropping what is not saved is no error.
    store.drop_run("run-a").await.unwrap();
}

store_suite!(store_folds_each_event_once);
/// Applying events that are already folded (a retried publish whose first attempt landed)
/// changes nothing: the snapshot stays the fold of the log.
async fn store_folds_each_event_once(log: Arc<dyn EventLog>, store: Arc<dyn SessionStore>) {
    let (log, store) = (&*log, &*store);
    let sid = "s-again";
    let first = publish(log, store, sid, vec![progress(10), progress(40)]).await;
    publish(
        log,
        store,
        sid,
        vec![draft(EventKind::Completed, json!({ "result": "done" }))],
    )
    .await;
    store
        .apply(sid, &first.epoch, &first.appended)
        .await
        .unwrap();
    let snap = get(store, sid).await;
    assert_eq!(snap.summary.status, SessionStatus::Completed, "{snap:?}");
    assert_eq!(snap.summary.progress, 100.0, "{snap:?}");
    assert_eq!(comparable(&snap), folded(log, sid, Value::Null).await);
}

// ---------------------------------------------------------------------------------------
// Several nodes on one Redis (Redis only)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_two_redis_nodes() {
    let server = RedisServer::start().await;
    let prefix = prefix("two-nodes");
    let nodes = vec![
        redis_log(&server, &prefix, KEEP_ALL).await,
        redis_log(&server, &prefix, KEEP_ALL).await,
    ];
    bounded(concurrent_appends(nodes)).await;
}

/// Two nodes (a log and a store each, one Redis) whose applies reach the store in another
/// order than their appends reached the log: every store ends at the log head with the
/// fold of all events in `seq` order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_of_two_redis_nodes_fold_in_seq_order_whatever_the_apply_order() {
    let server = RedisServer::start().await;
    let prefix = prefix("store-race");
    let logs = [
        redis_log(&server, &prefix, KEEP_ALL).await,
        redis_log(&server, &prefix, KEEP_ALL).await,
    ];
    let stores = [
        redis_store(&server, &prefix, logs[0].clone()).await,
        redis_store(&server, &prefix, logs[1].clone()).await,
    ];
    bounded(stores_race(logs, stores)).await;
}

async fn stores_race(logs: [Arc<dyn EventLog>; 2], stores: [Arc<dyn SessionStore>; 2]) {
    // Deterministic: node 1's later batch is applied before node 0's earlier one.
    let sid = "race-1";
    let early = append(
        &*logs[0],
        sid,
        vec![
            draft(
                EventKind::Progress,
                json!({ "status": "ACTIVE", "progress": 10,
                        "prompts": { "total": 1, "completed": 0, "processing": 1, "pending": 0, "failed": 0 } }),
            ),
            draft(
                EventKind::ModelResult,
                json!({ "promptId": "p1", "modelName": "m1", "status": "completed", "result": "r" }),
            ),
            draft(
                EventKind::Clarification,
                json!({ "clarificationId": "c1", "question": "q", "status": "pending" }),
            ),
        ],
    )
    .await;
    let late = append(
        &*logs[1],
        sid,
        vec![
            progress(60),
            draft(EventKind::Completed, json!({ "result": { "final": true } })),
        ],
    )
    .await;
    assert_eq!(appended_seqs(&late), [4, 5]);
    stores[1]
        .apply(sid, &late.epoch, &late.appended)
        .await
        .unwrap();
    let want = folded(&*logs[0], sid, Value::Null).await;
    assert_eq!(
        comparable(&get(&*stores[1], sid).await),
        want,
        "applying seqs 4..5 first folds the missing 1..3 from the log"
    );
    stores[0]
        .apply(sid, &early.epoch, &early.appended)
        .await
        .unwrap();
    for store in &stores {
        let snap = get(&**store, sid).await;
        assert_eq!(snap.summary.last_seq, 5);
        assert_eq!(snap.summary.status, SessionStatus::Completed);
        assert_eq!(snap.summary.progress, 100.0);
        assert_eq!(snap.clarifications.len(), 1);
        assert_eq!(snap.model_results.len(), 1);
        assert_eq!(
            comparable(&snap),
            want,
            "a late apply of old events changes nothing"
        );
    }

    // Racing: 8 tasks over the two nodes, each appending and then applying after a
    // jitter; a `completed` appended last on one node is applied on the other.
    let sid = "race-2";
    let tasks: Vec<_> = (0..8u64)
        .map(|task| {
            let log = logs[(task % 2) as usize].clone();
            let store = stores[(task % 2) as usize].clone();
            tokio::spawn(async move {
                let mut jitter = task.wrapping_mul(6_364_136_223_846_793_005) | 1;
                for batch in 0..10u64 {
                    let n = task * 100 + batch;
                    let drafts = vec![
                        draft(
                            EventKind::Progress,
                            json!({ "status": "PROCESSING", "progress": n % 101, "n": n }),
                        ),
                        draft(
                            EventKind::ModelResult,
                            json!({ "promptId": format!("p{task}"), "modelName": "m",
                                    "status": "completed", "result": format!("r{n}") }),
                        ),
                        draft(
                            EventKind::Clarification,
                            json!({ "clarificationId": format!("c{task}"), "question": "q",
                                    "status": if batch % 2 == 0 { "pending" } else { "answered" } }),
                        ),
                    ];
                    let out = append(&*log, sid, drafts).await;
                    jitter = jitter
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    tokio::time::sleep(Duration::from_micros((jitter >> 33) % 3000)).await;
                    store
                        .apply(sid, &out.epoch, &out.appended)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("racing task");
    }
    let head = logs[0].head(sid).await.unwrap();
    assert_eq!(head.last_seq, 8 * 10 * 3);
    let want = folded(&*logs[0], sid, Value::Null).await;
    for (node, store) in stores.iter().enumerate() {
        let snap = get(&**store, sid).await;
        assert_eq!(snap.summary.last_seq, head.last_seq, "node {node}");
        assert_eq!(
            comparable(&snap),
            want,
            "node {node}: the fold of all events"
        );
    }

    let last = append(
        &*logs[0],
        sid,
        vec![draft(
            EventKind::Completed,
            json!({ "result": { "n": 80 } }),
        )],
    )
    .await;
    stores[1]
        .apply(sid, &last.epoch, &last.appended)
        .await
        .unwrap();
    let want = folded(&*logs[1], sid, Value::Null).await;
    for (node, store) in stores.iter().enumerate() {
        let snap = get(&**store, sid).await;
        assert_eq!(snap.summary.last_seq, last.last_seq, "node {node}");
        assert_eq!(snap.summary.status, SessionStatus::Completed, "node {node}");
        assert_eq!(
            comparable(&snap),
            want,
            "node {node}: the fold of all events"
        );
    }

    // Both nodes sweep at once: each ended session is named by exactly one of them.
    let (a, b) = tokio::join!(
        stores[0].take_expired(Duration::ZERO),
        stores[1].take_expired(Duration::ZERO)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut named: Vec<&String> = a.iter().chain(&b).collect();
    named.sort();
    assert_eq!(named, ["race-1", "race-2"], "node 0 {a:?}, node 1 {b:?}");
    for store in &stores {
        assert!(store.get("race-1").await.unwrap().is_none());
        assert!(store.get("race-2").await.unwrap().is_none());
        assert!(store.list(None).await.unwrap().is_empty());
    }
}

// ---------------------------------------------------------------------------------------
// The Redis harness itself, and the log across a Redis restart

#[tokio::test]
async fn redis_harness_starts_restarts_and_kills_its_server() {
    let ping = |port: u16| {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"PING\r\n")?;
        let mut buf = [0u8; 7];
        stream.read_exact(&mut buf)?;
        Ok::<_, std::io::Error>(buf == *b"+PONG\r\n")
    };
    let mut server = RedisServer::start().await;
    let port = server.port();
    assert_ne!(port, 6379);
    assert_eq!(server.url(), format!("redis://127.0.0.1:{port}"));
    assert!(ping(port).unwrap());
    server.restart().await;
    assert_eq!(server.port(), port);
    assert!(server.is_running());
    assert!(ping(port).unwrap());
    drop(server);
    assert!(ping(port).is_err(), "the server is gone with its handle");
}

/// A Redis restart loses everything (no persistence): once the log can reach Redis again,
/// the session starts over at seq 1 with a new epoch, so no client resumes across it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_log_starts_a_new_epoch_after_redis_lost_its_data() {
    let mut server = RedisServer::start().await;
    let log = redis_log(&server, &prefix("restart"), KEEP_ALL).await;
    let sid = "s-restart";
    let before = append(&*log, sid, progresses(1..=3)).await;
    server.restart().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        match log.append(sid, vec![progress(4)]).await {
            Ok(out) => break out,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no append after the restart: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(after.seqs, [Some(1)]);
    assert_ne!(after.epoch, before.epoch);
    assert!(!after.head().can_resume(3, Some(&before.epoch)));
    assert_eq!(read(&*log, sid, 0, READ_ALL).await, [1]);
}

/// The head hash alone was lost (evicted, or deleted by hand) while the session's stream
/// and idempotency keys remain: the next append starts a new incarnation at seq 1 with a
/// new epoch instead of failing forever on a stream id that no longer grows, and nothing of
/// the old incarnation (events, keys) leaks into the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_log_starts_a_new_incarnation_when_the_head_hash_is_lost() {
    let server = RedisServer::start().await;
    let prefix = prefix("lost-head");
    let log = redis_log(&server, &prefix, KEEP_ALL).await;
    let sid = "s-lost-head";
    let before = append(&*log, sid, vec![keyed("k-1", progress(1)), progress(2)]).await;
    assert_eq!(before.last_seq, 2);

    let client = redis::Client::open(server.url()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let deleted: i64 = redis::cmd("DEL")
        .arg(Keys::new(&prefix).head(sid))
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(deleted, 1, "the head hash existed");

    let after = log
        .append(sid, vec![keyed("k-1", progress(3))])
        .await
        .expect("an append after the head was lost succeeds");
    assert_eq!(after.seqs, [Some(1)], "a new incarnation starts at seq 1");
    assert_eq!(after.duplicates, 0, "the old incarnation's keys are gone");
    assert_ne!(after.epoch, before.epoch);
    assert!(!after.head().can_resume(2, Some(&before.epoch)));
    let slice = log.read(sid, 0, READ_ALL).await.unwrap();
    assert_eq!(seqs_of(&slice.events), [1]);
    assert_eq!(parse(&slice.events[0])["n"], 3);
    assert_eq!((slice.head.first_seq, slice.head.last_seq), (1, 1));
    // And it goes on from there.
    let next = append(&*log, sid, vec![progress(4)]).await;
    assert_eq!(next.seqs, [Some(2)]);
}

/// What the append script publishes is what `Announcement::parse` reads: one announcement
/// per append that logged something (the session's new head and epoch), none for a batch of
/// duplicates only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_log_announces_each_append_in_the_format_nodes_decode() {
    use futures_util::StreamExt;

    let server = RedisServer::start().await;
    let prefix = prefix("announce");
    let log = redis_log(&server, &prefix, KEEP_ALL).await;
    let client = redis::Client::open(server.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(Keys::new(&prefix).announcements())
        .await
        .unwrap();
    let mut messages = pubsub.on_message();
    let sid = "s-announce:1";

    let first = append(&*log, sid, vec![keyed("k", progress(1)), progress(2)]).await;
    let duplicate = append(&*log, sid, vec![keyed("k", progress(1))]).await;
    assert!(duplicate.appended.is_empty());
    let second = append(&*log, sid, vec![progress(3)]).await;

    for out in [&first, &second] {
        let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .expect("an append is announced")
            .unwrap();
        let payload: String = message.get_payload().unwrap();
        assert_eq!(
            Announcement::parse(&payload),
            Some(Announcement {
                last_seq: out.last_seq,
                epoch: out.epoch.clone(),
                session_id: sid,
            }),
            "{payload:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Limits (SPEC §5, "Bounded everything"): the same on every backend.

/// The limits the limits behaviours run under.
fn tight_log() -> LogLimits {
    LogLimits {
        max_events: 1_000,
        max_bytes: 2_000,
        max_sessions: 3,
        idle_ttl: Duration::from_secs(600),
    }
}

fn tight_store() -> StoreLimits {
    StoreLimits {
        max_entries: 3,
        max_entry_bytes: 4_000,
        idle_ttl: Duration::from_secs(600),
    }
}

/// `limits_suite!(behaviour)`: `behaviour(log, store)` on a fresh log and store under
/// [`tight_log`] and [`tight_store`], in memory and in Redis.
macro_rules! limits_suite {
    ($behaviour:ident) => {
        mod $behaviour {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                let log: Arc<dyn EventLog> = Arc::new(MemoryLog::with_limits(tight_log()));
                let store: Arc<dyn SessionStore> =
                    Arc::new(MemoryStore::with_limits(tight_store()));
                bounded(super::$behaviour(log, store)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn disk() {
                let (_dir, log, store) = disk_backends(tight_log(), tight_store());
                bounded(super::$behaviour(log, store)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                let server = RedisServer::start().await;
                let (log, store) = tight_redis(&server, &prefix(stringify!($behaviour))).await;
                bounded(super::$behaviour(log, store)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis_cluster() {
                let prefix = prefix(stringify!($behaviour));
                let log = cluster_log(&prefix, tight_log()).await;
                let store = cluster_store(&prefix, log.clone(), tight_store()).await;
                bounded(super::$behaviour(log, store)).await;
            }
        }
    };
}

/// A Redis log and store under `prefix` with the tight limits.
async fn tight_redis(
    server: &RedisServer,
    prefix: &str,
) -> (Arc<dyn EventLog>, Arc<dyn SessionStore>) {
    let log: Arc<dyn EventLog> = Arc::new(
        RedisLog::connect_with(&server.url(), prefix, tight_log())
            .await
            .unwrap(),
    );
    let store: Arc<dyn SessionStore> = Arc::new(
        RedisStore::connect_with(&server.url(), prefix, log.clone(), tight_store())
            .await
            .unwrap(),
    );
    (log, store)
}

/// A `progress` draft whose payload is about `bytes` long.
fn padded(n: u64, bytes: usize) -> EventDraft {
    draft(
        EventKind::Progress,
        json!({ "status": "PROCESSING", "progress": 1, "n": n, "pad": "x".repeat(bytes) }),
    )
}

limits_suite!(retention_by_bytes_keeps_a_contiguous_newest_tail);
async fn retention_by_bytes_keeps_a_contiguous_newest_tail(
    log: Arc<dyn EventLog>,
    _store: Arc<dyn SessionStore>,
) {
    let sid = "bytes";
    for n in 1..=20 {
        append(&*log, sid, vec![padded(n, 300)]).await;
    }
    let slice = log.read(sid, 0, READ_ALL).await.unwrap();
    let retained: usize = slice.events.iter().map(|e| e.json.get().len()).sum();
    assert!(retained <= 2_000, "{retained} bytes retained, over 2000");
    let seqs = seqs_of(&slice.events);
    assert_eq!(seqs.last(), Some(&20), "the newest stays: {seqs:?}");
    assert!(seqs.len() >= 4, "as many as fit stay: {seqs:?}");
    assert_eq!(
        seqs,
        (slice.head.first_seq..=20).collect::<Vec<_>>(),
        "contiguous from first_seq"
    );
    // An event larger than the whole budget is still kept, alone.
    append(&*log, sid, vec![padded(21, 5_000)]).await;
    let slice = log.read(sid, 0, READ_ALL).await.unwrap();
    assert_eq!(seqs_of(&slice.events), [21]);
    assert_eq!(slice.head.first_seq, 21);
    // And the next small ones push it out again.
    append(&*log, sid, vec![padded(22, 10), padded(23, 10)]).await;
    assert_eq!(read(&*log, sid, 0, READ_ALL).await, [22, 23]);
}

limits_suite!(new_sessions_over_the_cap_are_refused);
async fn new_sessions_over_the_cap_are_refused(
    log: Arc<dyn EventLog>,
    store: Arc<dyn SessionStore>,
) {
    for sid in ["cap-1", "cap-2", "cap-3"] {
        publish(&*log, &*store, sid, vec![progress(1)]).await;
    }
    match log.append("cap-4", vec![progress(1)]).await {
        Err(LogError::TooManySessions { max: 3 }) => {}
        other => panic!("a fourth session: {other:?}"),
    }
    assert!(store.get("cap-4").await.unwrap().is_none());
    // Sessions already held still take events.
    let out = publish(&*log, &*store, "cap-2", vec![progress(2)]).await;
    assert_eq!(out.last_seq, 2);
    // Once the idle ones are swept (as the hub does), new sessions fit again.
    let taken = store.take_idle(Duration::ZERO).await.unwrap();
    assert_eq!(taken.len(), 3, "{taken:?}");
    for sid in &taken {
        log.remove(sid).await.unwrap();
    }
    let out = publish(&*log, &*store, "cap-4", vec![progress(1)]).await;
    assert_eq!(out.last_seq, 1);
}

limits_suite!(an_ended_session_refuses_new_producer_events);
async fn an_ended_session_refuses_new_producer_events(
    log: Arc<dyn EventLog>,
    _store: Arc<dyn SessionStore>,
) {
    let sid = "ended";
    let completed = draft(EventKind::Completed, json!({ "result": "done" }));
    // A terminal progress does not end it: producers send one right before `completed`.
    let terminal_progress = draft(
        EventKind::Progress,
        json!({ "status": "COMPLETED", "progress": 100 }),
    );
    let ending = vec![
        keyed("p-1", progress(1)),
        keyed("p-2", terminal_progress),
        keyed("p-3", completed),
    ];
    let first = log
        .append_as(sid, ending.clone(), Writer::Producer)
        .await
        .unwrap();
    assert_eq!(first.last_seq, 3);
    // The same batch again (a retry): duplicates, not a refusal.
    let retry = log.append_as(sid, ending, Writer::Producer).await.unwrap();
    assert_eq!((retry.duplicates, retry.last_seq), (3, 3));
    // A new event, keyed or not: refused, and nothing logged.
    for late in [keyed("p-4", progress(4)), progress(5)] {
        match log.append_as(sid, vec![late], Writer::Producer).await {
            Err(LogError::SessionEnded(id)) => assert_eq!(id, sid),
            other => panic!("a late producer event: {other:?}"),
        }
    }
    assert_eq!(log.head(sid).await.unwrap().last_seq, 3);
    // herald itself still logs; a reopening producer is let in and the session is open.
    let own = log.append(sid, vec![progress(6)]).await.unwrap();
    assert_eq!(own.last_seq, 4);
    let reopened = log
        .append_as(sid, vec![progress(7)], Writer::Reopening)
        .await
        .unwrap();
    assert_eq!(reopened.last_seq, 5);
    let after = log
        .append_as(sid, vec![progress(8)], Writer::Producer)
        .await
        .unwrap();
    assert_eq!(after.last_seq, 6);
    assert_eq!(read(&*log, sid, 0, READ_ALL).await, [1, 2, 3, 4, 5, 6]);
}

/// The prompt ids of a snapshot's model results, in order.
fn prompt_ids(snapshot: &Snapshot) -> Vec<&str> {
    snapshot
        .model_results
        .iter()
        .map(|m| m["promptId"].as_str().unwrap())
        .collect()
}

limits_suite!(a_snapshot_keeps_its_newest_and_pending_entries);
async fn a_snapshot_keeps_its_newest_and_pending_entries(
    log: Arc<dyn EventLog>,
    store: Arc<dyn SessionStore>,
) {
    let sid = "entries";
    let result = |prompt: &str, status: &str| {
        draft(
            EventKind::ModelResult,
            json!({ "promptId": prompt, "modelName": "m", "status": status, "result": "r" }),
        )
    };
    let pending = draft(
        EventKind::Clarification,
        json!({ "clarificationId": "c1", "question": "Which?", "status": "pending" }),
    );
    publish(
        &*log,
        &*store,
        sid,
        vec![pending, result("p1", "completed")],
    )
    .await;
    for prompt in ["p2", "p3", "p4", "p5"] {
        publish(&*log, &*store, sid, vec![result(prompt, "completed")]).await;
    }
    // An update of a kept entry is not a new one.
    publish(&*log, &*store, sid, vec![result("p5", "failed")]).await;
    let snapshot = get(&*store, sid).await;
    let prompts = prompt_ids(&snapshot);
    assert_eq!(prompts, ["p4", "p5"], "the newest settled results stay");
    assert_eq!(
        snapshot.clarifications.len(),
        1,
        "the pending question stays"
    );
    assert_eq!(snapshot.summary.clarification_count, 1);
    assert_eq!(snapshot.dropped_entries, 3);
    let json = serde_json::to_value(&snapshot).unwrap();
    assert_eq!(json["droppedEntries"], 3, "{json}");
    assert_eq!(snapshot.summary.last_seq, 7);
}

limits_suite!(a_snapshot_keeps_its_entries_within_their_byte_limit);
async fn a_snapshot_keeps_its_entries_within_their_byte_limit(
    log: Arc<dyn EventLog>,
    store: Arc<dyn SessionStore>,
) {
    let sid = "entry-bytes";
    // Three of these are over 4,000 bytes: only two fit, though three entries would.
    let result = |prompt: &str| {
        draft(
            EventKind::ModelResult,
            json!({ "promptId": prompt, "modelName": "m", "status": "completed", "result": "r".repeat(1_500) }),
        )
    };
    for prompt in ["p1", "p2", "p3", "p4", "p5"] {
        publish(&*log, &*store, sid, vec![result(prompt)]).await;
    }
    let snapshot = get(&*store, sid).await;
    let prompts = prompt_ids(&snapshot);
    assert_eq!(prompts, ["p4", "p5"], "the newest results that fit stay");
    assert_eq!(snapshot.dropped_entries, 3);
    let kept: usize = snapshot
        .model_results
        .iter()
        .map(|m| serde_json::to_string(m).unwrap().len())
        .sum();
    assert!(kept <= 4_000, "{kept} bytes kept");
    // A result that grows in place is counted at its new size, not twice.
    let grown = draft(
        EventKind::ModelResult,
        json!({ "promptId": "p5", "modelName": "m", "status": "completed", "result": "r".repeat(3_000) }),
    );
    publish(&*log, &*store, sid, vec![grown]).await;
    let snapshot = get(&*store, sid).await;
    let prompts = prompt_ids(&snapshot);
    assert_eq!(prompts, ["p5"], "p4 makes room for the grown p5");
    assert_eq!(snapshot.dropped_entries, 4);
}

limits_suite!(idle_sessions_are_taken_once);
async fn idle_sessions_are_taken_once(log: Arc<dyn EventLog>, store: Arc<dyn SessionStore>) {
    publish(&*log, &*store, "idle-1", vec![progress(1)]).await;
    publish(&*log, &*store, "idle-2", vec![progress(1)]).await;
    assert!(
        store
            .take_idle(Duration::from_secs(3600))
            .await
            .unwrap()
            .is_empty()
    );
    let mut taken = store.take_idle(Duration::ZERO).await.unwrap();
    taken.sort();
    assert_eq!(taken, ["idle-1", "idle-2"]);
    assert!(store.take_idle(Duration::ZERO).await.unwrap().is_empty());
    assert!(store.get("idle-1").await.unwrap().is_none());
    assert!(store.list(None).await.unwrap().is_empty());
}

/// Redis: every key a session leaves behind expires, so a cluster that stops for good
/// leaves nothing forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_every_session_key_expires() {
    let server = RedisServer::start().await;
    let prefix = prefix("expiry");
    let (log, store) = tight_redis(&server, &prefix).await;
    let sid = "expires";
    publish(
        &*log,
        &*store,
        sid,
        vec![
            keyed("k", progress(1)),
            draft(EventKind::Completed, json!({ "result": 1 })),
        ],
    )
    .await;
    let client = redis::Client::open(server.url()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    let named = Keys::new(&prefix);
    for expected in [
        named.head(sid),
        named.log(sid),
        named.idempotency_keys(sid),
        named.snapshot(sid),
        named.snapshot_version(sid),
        named.sessions(),
        named.ended(),
    ] {
        assert!(keys.contains(&expected), "{expected} in {keys:?}");
    }
    for key in &keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert!(
            ttl > 0 && ttl <= 600_000,
            "{key} expires within the idle TTL (PTTL {ttl})"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The data dir across restarts (one node; memory forgets, Redis is shared by nodes).

/// Every retained event of a session, as the bytes it was logged as.
async fn logged_bytes(log: &dyn EventLog, session_id: &str) -> Vec<String> {
    let slice = log.read(session_id, 0, READ_ALL).await.unwrap();
    slice
        .events
        .iter()
        .map(|e| e.json.get().to_owned())
        .collect()
}

/// Opens the data dir at `path` again, as a restarted node does.
fn reopen(path: &std::path::Path) -> (Arc<dyn EventLog>, Arc<dyn SessionStore>) {
    let (log, store) =
        herald::datadir::open(path, LogLimits::events(KEEP_ALL), StoreLimits::default())
            .unwrap_or_else(|e| panic!("datadir::open again: {e}"));
    (Arc::new(log), Arc::new(store))
}

/// A reopened data dir has every session as it was: the same epoch and seqs, its events
/// byte for byte, its idempotency keys (a retry is still a duplicate), its ended mark, its
/// snapshot with metadata and owner; and numbering goes on without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_a_reopened_data_dir_has_every_session_as_it_was() {
    let (dir, log, store) = disk_backends(LogLimits::events(KEEP_ALL), StoreLimits::default());
    let sid = "s-reopen";
    let first = publish(
        &*log,
        &*store,
        sid,
        vec![keyed("k1", progress(1)), progress(2)],
    )
    .await;
    store
        .set_origin(
            sid,
            &Origin {
                metadata: Some(json!({ "team": "a" })),
                owner: Some("alice".into()),
            },
        )
        .await
        .unwrap();
    publish(
        &*log,
        &*store,
        "s-ended",
        vec![draft(EventKind::Completed, json!({ "result": 1 }))],
    )
    .await;
    let before = logged_bytes(&*log, sid).await;
    let snapshot_before = comparable(&get(&*store, sid).await);
    drop((log, store));

    let (log, store) = reopen(dir.path());
    let head = log.head(sid).await.unwrap();
    assert_eq!(
        head.epoch.as_ref(),
        Some(&first.epoch),
        "the epoch is unchanged"
    );
    assert_eq!((head.first_seq, head.last_seq), (1, 2));
    let after = logged_bytes(&*log, sid).await;
    assert_eq!(after, before, "the same bytes");
    assert_eq!(comparable(&get(&*store, sid).await), snapshot_before);
    let snapshot = get(&*store, sid).await;
    assert_eq!(snapshot.summary.owner.as_deref(), Some("alice"));
    assert_eq!(snapshot.metadata, json!({ "team": "a" }));

    let retry = append(&*log, sid, vec![keyed("k1", progress(1)), progress(3)]).await;
    assert_eq!(retry.duplicates, 1, "the key is remembered");
    assert_eq!(retry.seqs, vec![Some(1), Some(3)], "numbering goes on");
    let refused = log
        .append_as("s-ended", vec![progress(9)], Writer::Producer)
        .await;
    assert!(
        matches!(refused, Err(LogError::SessionEnded(_))),
        "an ended session stays ended: {refused:?}"
    );
    let mut sessions = listed(&*store, None).await;
    sessions.sort();
    assert_eq!(sessions, ["s-ended", "s-reopen"]);
}

/// A crash between an append (durable) and its fold (not waited for) leaves the snapshot
/// behind its log: opening the data dir folds it forward, so the snapshot never lacks an
/// acknowledged event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_a_snapshot_behind_its_log_is_folded_forward_on_open() {
    let (dir, log, store) = disk_backends(LogLimits::events(KEEP_ALL), StoreLimits::default());
    publish(&*log, &*store, "s-behind", progresses(1..=2)).await;
    // Logged, never folded: as if the node died between the two.
    append(
        &*log,
        "s-behind",
        vec![draft(EventKind::Completed, json!({ "result": "done" }))],
    )
    .await;
    append(&*log, "s-unfolded", progresses(1..=3)).await;
    drop((log, store));

    let (log, store) = reopen(dir.path());
    let behind = get(&*store, "s-behind").await;
    assert_eq!(behind.summary.last_seq, 3);
    assert_eq!(behind.summary.status, SessionStatus::Completed);
    assert_eq!(behind.result, Some(json!("done")));
    assert_eq!(
        comparable(&behind),
        folded(&*log, "s-behind", Value::Null).await
    );
    let unfolded = get(&*store, "s-unfolded").await;
    assert_eq!(unfolded.summary.last_seq, 3);
}

/// One data dir, one process: a second open while the first holds it is refused with a
/// clear error (two writers would corrupt it); once the first is closed it opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_a_data_dir_in_use_is_refused() {
    let (dir, log, store) = disk_backends(LogLimits::events(KEEP_ALL), StoreLimits::default());
    let second = herald::datadir::open(
        dir.path(),
        LogLimits::events(KEEP_ALL),
        StoreLimits::default(),
    );
    match second {
        Err(error @ herald::datadir::DataDirError::InUse { .. }) => {
            assert!(
                error
                    .to_string()
                    .contains("in use by another herald process"),
                "{error}"
            );
        }
        Err(other) => panic!("expected InUse, got {other}"),
        Ok(_) => panic!("a data dir in use was opened a second time"),
    }
    drop((log, store));
    let _ = reopen(dir.path());
}
