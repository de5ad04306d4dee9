//! A private `redis-server` per test, on a free loopback port, with no persistence.
//!
//! Every test that needs Redis starts its own ([`RedisServer::start`]); nothing ever talks
//! to a Redis the test did not start (in particular not to one on 6379). The process is
//! killed (SIGKILL) when the value is dropped, so a failing test leaves nothing behind.
//! Because nothing is persisted, a [`RedisServer::restart`] comes back empty: it models a
//! Redis outage with data loss, on the same address. A [`RedisServer::start_persistent`]
//! one keeps an append-only file (fsync on every write) in its own directory, so its
//! restart comes back with its data: an outage without data loss (keys whose TTL ran out
//! meanwhile are gone, as after any outage).
#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The binary to run; `HERALD_TEST_REDIS_SERVER` overrides it.
const DEFAULT_BINARY: &str = "redis-server";
/// How long a started server may take to answer PING.
const READY_WITHIN: Duration = Duration::from_secs(5);
/// Attempts at starting a server (a free port can be taken between choosing and binding).
const ATTEMPTS: usize = 5;

pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// The data directory of a persistent server (removed on drop).
    data_dir: Option<std::path::PathBuf>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub async fn start() -> RedisServer {
        Self::start_with(None).await
    }

    /// [`RedisServer::start`], persisting to an append-only file that survives restarts.
    pub async fn start_persistent() -> RedisServer {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("herald-test-redis-{}", &unique[..12]));
        std::fs::create_dir_all(&dir).expect("create the redis data directory");
        Self::start_with(Some(dir)).await
    }

    async fn start_with(data_dir: Option<std::path::PathBuf>) -> RedisServer {
        let mut failures = Vec::new();
        for _ in 0..ATTEMPTS {
            let port = free_port();
            match launch(port, data_dir.as_deref()).await {
                Ok(child) => {
                    return RedisServer {
                        port,
                        child: Some(child),
                        data_dir,
                    };
                }
                Err(why) => failures.push(format!("port {port}: {why}")),
            }
        }
        panic!(
            "redis-server did not start after {ATTEMPTS} attempts:\n{}",
            failures.join("\n")
        );
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the server process is running (not stopped, not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends `signal` (e.g. `"STOP"`, `"CONT"`) to the server's process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("redis-server is running").id();
        super::send_signal(pid, signal, "redis-server");
    }

    /// Kills the server (SIGKILL) and waits for it; the port is left free. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server (if running) and starts it again on the same port: empty, or with
    /// its data when persistent.
    pub async fn restart(&mut self) {
        self.stop();
        let mut failures = Vec::new();
        for _ in 0..ATTEMPTS {
            match launch(self.port, self.data_dir.as_deref()).await {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(why) => {
                    failures.push(why);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        panic!(
            "redis-server did not restart on port {}:\n{}",
            self.port,
            failures.join("\n")
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = &self.data_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A port that was free a moment ago (the OS picks it; the listener is dropped at once).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Spawns redis-server on `port` (persisting into `data_dir` when given) and waits until
/// that very process answers. On failure the process is gone again.
async fn launch(port: u16, data_dir: Option<&std::path::Path>) -> Result<Child, String> {
    let binary =
        std::env::var("HERALD_TEST_REDIS_SERVER").unwrap_or_else(|_| DEFAULT_BINARY.into());
    let mut command = Command::new(&binary);
    match data_dir {
        Some(dir) => command
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(dir),
        None => command
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(std::env::temp_dir()),
    };
    let mut child = command
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--protected-mode", "yes"])
        .args(["--loglevel", "warning"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {binary}: {e}"))?;
    match wait_ready(&mut child, port).await {
        Ok(()) => Ok(child),
        Err(why) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(why)
        }
    }
}

/// Polls until the server answers PING and reports our child's pid (so a server of someone
/// else that grabbed the port in between is never mistaken for ours).
async fn wait_ready(child: &mut Child, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + READY_WITHIN;
    let mut last = String::from("no answer yet");
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("redis-server exited ({status}): {last}"));
        }
        if Instant::now() >= deadline {
            return Err(format!("no PONG within {READY_WITHIN:?}: {last}"));
        }
        match probe(port).await {
            Ok(pid) if pid == child.id() => return Ok(()),
            Ok(pid) => last = format!("port {port} is served by another process (pid {pid})"),
            Err(why) => last = why,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// PING, then `INFO server`; returns the server's `process_id`.
async fn probe(port: u16) -> Result<u32, String> {
    let step = Duration::from_millis(500);
    let io = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(b"PING\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let pong = read_until(&mut stream, |buf| buf.windows(2).any(|w| w == b"\r\n")).await?;
        if !pong.starts_with(b"+PONG") {
            return Err(format!(
                "PING answered {:?}",
                String::from_utf8_lossy(&pong).trim_end()
            ));
        }
        stream
            .write_all(b"INFO server\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let info = read_until(&mut stream, bulk_complete).await?;
        let text = String::from_utf8_lossy(&info);
        text.lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .and_then(|pid| pid.trim().parse().ok())
            .ok_or_else(|| format!("INFO server without process_id: {text:?}"))
    };
    tokio::time::timeout(step, io)
        .await
        .unwrap_or_else(|_| Err("probe timed out".into()))
}

async fn read_until(stream: &mut TcpStream, done: fn(&[u8]) -> bool) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !done(&buf) {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf)
}

/// Whether `buf` holds a whole RESP reply: a bulk string `$len\r\n…\r\n`, or an error line.
fn bulk_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    if buf[0] != b'$' {
        return true;
    }
    let len: i64 = std::str::from_utf8(&buf[1..end])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let want = end + 2 + usize::try_from(len.max(0)).unwrap_or(0) + 2;
    buf.len() >= want
}
