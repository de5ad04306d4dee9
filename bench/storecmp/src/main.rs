//! herald's log workload on three embedded stores, every commit durable (fsync) before it
//! is acknowledged, as `--data-dir` requires. Per store: `SESSIONS` writer threads, one
//! session each, append `EVENTS` progress-shaped events (about 600 bytes of JSON) one commit
//! per event (the orchestrator's pattern), then the same in batches of 50 (an ingest
//! batch); then every session's log is read back in full. Prints events/s and bytes on disk.
//!
//!   cargo run --release --manifest-path bench/storecmp/Cargo.toml

use redb::ReadableDatabase;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

const SESSIONS: usize = 4;
const EVENTS: u64 = 1_000;
const BATCH: u64 = 50;

fn event(session: usize, seq: u64) -> Vec<u8> {
    format!(
        r#"{{"sessionId":"bench-{session}","seq":{seq},"timestamp":"2026-12-05T12:00:00.000Z","status":"PROCESSING","progress":{p},"prompts":{{"total":8,"completed":3,"processing":4,"pending":1,"failed":0}},"message":"{pad}"}}"#,
        p = seq % 100,
        pad = "x".repeat(400)
    )
    .into_bytes()
}

trait Store: Send + Sync {
    /// Appends `events` to `session` in one durable commit.
    fn append(&self, session: usize, first_seq: u64, events: &[Vec<u8>]);
    fn read_all(&self, session: usize) -> usize;
}

fn key(session: usize, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&(session as u64).to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

struct Sqlite(Vec<std::sync::Mutex<rusqlite::Connection>>);
impl Sqlite {
    fn open(dir: &Path) -> Self {
        let path = dir.join("log.db");
        let conns = (0..SESSIONS)
            .map(|_| {
                let c = rusqlite::Connection::open(&path).unwrap();
                c.busy_timeout(std::time::Duration::from_secs(30)).unwrap();
                c.pragma_update(None, "journal_mode", "WAL").unwrap();
                c.pragma_update(None, "synchronous", "FULL").unwrap();
                c.execute_batch("CREATE TABLE IF NOT EXISTS events (session INTEGER, seq INTEGER, json BLOB, PRIMARY KEY (session, seq)) WITHOUT ROWID").unwrap();
                std::sync::Mutex::new(c)
            })
            .collect();
        Self(conns)
    }
}
impl Store for Sqlite {
    fn append(&self, session: usize, first: u64, events: &[Vec<u8>]) {
        let mut c = self.0[session].lock().unwrap();
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).unwrap();
        {
            let mut st = tx.prepare_cached("INSERT INTO events VALUES (?1, ?2, ?3)").unwrap();
            for (i, e) in events.iter().enumerate() {
                st.execute(rusqlite::params![session as i64, (first + i as u64) as i64, e]).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    fn read_all(&self, session: usize) -> usize {
        let c = self.0[session].lock().unwrap();
        let mut st = c.prepare("SELECT json FROM events WHERE session = ?1 ORDER BY seq").unwrap();
        st.query_map([session as i64], |r| r.get::<_, Vec<u8>>(0)).unwrap().count()
    }
}

const TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("events");
struct Redb(redb::Database);
impl Store for Redb {
    fn append(&self, session: usize, first: u64, events: &[Vec<u8>]) {
        let tx = self.0.begin_write().unwrap();
        {
            let mut t = tx.open_table(TABLE).unwrap();
            for (i, e) in events.iter().enumerate() {
                t.insert(&key(session, first + i as u64)[..], &e[..]).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    fn read_all(&self, session: usize) -> usize {
        let tx = self.0.begin_read().unwrap();
        let t = tx.open_table(TABLE).unwrap();
        t.range(&key(session, 0)[..]..&key(session, u64::MAX)[..]).unwrap().count()
    }
}

struct Fjall(fjall::Keyspace, fjall::PartitionHandle);
impl Store for Fjall {
    fn append(&self, session: usize, first: u64, events: &[Vec<u8>]) {
        let mut batch = self.0.batch();
        for (i, e) in events.iter().enumerate() {
            batch.insert(&self.1, key(session, first + i as u64), e.as_slice());
        }
        batch.commit().unwrap();
        self.0.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    fn read_all(&self, session: usize) -> usize {
        self.1.range(key(session, 0)..key(session, u64::MAX)).count()
    }
}

fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path).unwrap().flatten().map(|e| {
        let m = e.metadata().unwrap();
        if m.is_dir() { dir_size(&e.path()) } else { m.len() }
    }).sum()
}

fn run(name: &str, dir: &Path, store: Arc<dyn Store>) {
    let mut line = format!("| {name} |");
    for batch in [1, BATCH] {
        let started = Instant::now();
        let threads: Vec<_> = (0..SESSIONS).map(|s| {
            let store = store.clone();
            std::thread::spawn(move || {
                let base = if batch == 1 { 0 } else { EVENTS };
                let mut seq = 1;
                while seq <= EVENTS {
                    let events: Vec<Vec<u8>> = (seq..seq + batch).map(|q| event(s, base + q)).collect();
                    store.append(s, base + seq, &events);
                    seq += batch;
                }
            })
        }).collect();
        for t in threads { t.join().unwrap(); }
        let rate = (SESSIONS as u64 * EVENTS) as f64 / started.elapsed().as_secs_f64();
        line += &format!(" {rate:.0} |");
    }
    let started = Instant::now();
    let read: usize = (0..SESSIONS).map(|s| store.read_all(s)).sum();
    assert_eq!(read as u64, SESSIONS as u64 * EVENTS * 2);
    let rate = read as f64 / started.elapsed().as_secs_f64();
    line += &format!(" {rate:.0} | {:.1} |", dir_size(dir) as f64 / 1e6);
    println!("{line}");
}

fn main() {
    println!("| store | events/s, 1 per commit | events/s, {BATCH} per commit | events/s read | MB on disk |");
    println!("|---|---:|---:|---:|---:|");
    let d = tempfile::tempdir_in(".").unwrap();
    run("SQLite (rusqlite 0.37, WAL, synchronous=FULL)", d.path(), Arc::new(Sqlite::open(d.path())));
    let d = tempfile::tempdir_in(".").unwrap();
    let db = redb::Database::create(d.path().join("log.redb")).unwrap();
    run("redb 3 (Durability::Immediate)", d.path(), Arc::new(Redb(db)));
    let d = tempfile::tempdir_in(".").unwrap();
    let ks = fjall::Config::new(d.path()).open().unwrap();
    let part = ks.open_partition("events", Default::default()).unwrap();
    run("fjall 2 (persist SyncAll per commit)", d.path(), Arc::new(Fjall(ks, part)));
}
