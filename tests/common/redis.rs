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
//!
//! [`RedisCluster`]: three cluster-enabled masters joined by `redis-cli --cluster create`.
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

// ---------------------------------------------------------------------------------------
// A local three-master Redis Cluster

/// Masters of a [`RedisCluster`].
pub const CLUSTER_MASTERS: usize = 3;
/// How long forming a cluster (every node answering, `cluster_state:ok` everywhere) may take.
const CLUSTER_READY_WITHIN: Duration = Duration::from_secs(20);

/// Three `redis-server --cluster-enabled yes` masters on free loopback ports (each with a
/// free cluster bus port), joined by `redis-cli --cluster create`, with no persistence and
/// no replicas.
///
/// Each server runs under a small `sh` that kills it (SIGKILL) and removes its node file
/// when its stdin closes: when the value is dropped, and also when the test process exits,
/// which is what cleans up the one cluster [`RedisCluster::shared`] keeps per test binary
/// (a static is never dropped).
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
    dir: std::path::PathBuf,
}

struct ClusterNode {
    port: u16,
    bus_port: u16,
    /// The `sh` around the server; its stdin is the server's lifeline.
    keeper: Option<(Child, std::process::ChildStdin)>,
}

impl RedisCluster {
    /// The cluster this test binary shares (started on first use). Tests on it use key
    /// prefixes of their own (never with braces).
    pub fn shared() -> &'static RedisCluster {
        static SHARED: std::sync::OnceLock<RedisCluster> = std::sync::OnceLock::new();
        SHARED.get_or_init(RedisCluster::start)
    }

    /// Starts a cluster of its own (for a test that restarts or stops a node). Blocks until
    /// it is formed: it runs plain processes and polls them, bounded.
    pub fn start() -> RedisCluster {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("herald-test-cluster-{}", &unique[..12]));
        std::fs::create_dir_all(&dir).expect("create the cluster's directory");
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            dir,
        };
        for _ in 0..CLUSTER_MASTERS {
            let (port, bus_port) = free_port_pair(&cluster.nodes);
            let mut node = ClusterNode {
                port,
                bus_port,
                keeper: None,
            };
            node.keeper = Some(cluster.launch(port, bus_port));
            cluster.nodes.push(node);
        }
        let deadline = Instant::now() + CLUSTER_READY_WITHIN;
        for node in &cluster.nodes {
            wait_until(deadline, || {
                cli(node.port, &["PING"]).is_ok_and(|out| out.trim() == "PONG")
            })
            .unwrap_or_else(|| panic!("redis-server on {} did not answer PING", node.port));
        }
        let mut create = Command::new(cli_binary());
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let created = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        cluster.wait_ok(deadline);
        cluster
    }

    /// `redis-server` on `port` under its keeper `sh`.
    fn launch(&self, port: u16, bus_port: u16) -> (Child, std::process::ChildStdin) {
        let binary =
            std::env::var("HERALD_TEST_REDIS_SERVER").unwrap_or_else(|_| DEFAULT_BINARY.into());
        let conf = self.dir.join(format!("nodes-{port}.conf"));
        // A line `keep` (a restart) leaves the node file; the end of stdin removes it, and
        // the directory once it is empty (the last node's keeper does).
        let script = r#"server="$1"; conf="$2"; dir="$3"; shift 3; "$server" "$@" & pid=$!
if read line && [ "$line" = keep ]; then keep=1; else keep=0; fi
kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
if [ "$keep" = 0 ]; then rm -f "$conf"; rmdir "$dir" 2>/dev/null; fi
exit 0"#;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(&binary)
            .arg(&conf)
            .arg(&self.dir)
            .args(["--cluster-enabled", "yes"])
            .arg("--cluster-config-file")
            .arg(&conf)
            .args(["--cluster-port", &bus_port.to_string()])
            .args(["--cluster-node-timeout", "2000"])
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--loglevel", "warning"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run sh for {binary}: {e}"));
        let stdin = child.stdin.take().expect("a piped stdin");
        (child, stdin)
    }

    /// Waits until every running node says `cluster_state:ok`.
    fn wait_ok(&self, deadline: Instant) {
        for node in self.nodes.iter().filter(|n| n.keeper.is_some()) {
            wait_until(deadline, || {
                cli(node.port, &["CLUSTER", "INFO"])
                    .is_ok_and(|info| info.lines().any(|l| l.trim() == "cluster_state:ok"))
            })
            .unwrap_or_else(|| panic!("the cluster node on {} never reached ok", node.port));
        }
    }

    /// The seed list herald's `--redis-url` takes with `--redis-cluster`.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The masters' ports, in the order they were started.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The port of the master serving `slot`, as the cluster itself says (`CLUSTER NODES`).
    pub fn master_of_slot(&self, slot: u16) -> u16 {
        let port = self
            .nodes
            .iter()
            .find(|n| n.keeper.is_some())
            .expect("a running node")
            .port;
        let nodes = cli(port, &["CLUSTER", "NODES"]).expect("CLUSTER NODES");
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (from, to) = range.split_once('-').unwrap_or((range, range));
                match (from.parse::<u16>(), to.parse::<u16>()) {
                    (Ok(from), Ok(to)) => (from..=to).contains(&slot),
                    _ => false,
                }
            });
            if serves {
                let address = fields[1].split('@').next().unwrap_or("");
                return address
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| panic!("no port in {line:?}"));
            }
        }
        panic!("no master serves slot {slot}:\n{nodes}");
    }

    /// Kills the master on `port` (SIGKILL) and starts it again, empty but with its node
    /// file, so it rejoins with the same slots; waits until the cluster is ok again.
    pub fn restart(&mut self, port: u16) {
        let index = self
            .nodes
            .iter()
            .position(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on {port}"));
        if let Some((mut child, mut stdin)) = self.nodes[index].keeper.take() {
            use std::io::Write;
            let _ = stdin.write_all(b"keep\n");
            drop(stdin);
            let _ = child.wait();
        }
        let bus_port = self.nodes[index].bus_port;
        let keeper = self.launch(port, bus_port);
        self.nodes[index].keeper = Some(keeper);
        let deadline = Instant::now() + CLUSTER_READY_WITHIN;
        wait_until(deadline, || {
            cli(port, &["PING"]).is_ok_and(|out| out.trim() == "PONG")
        })
        .unwrap_or_else(|| panic!("the restarted node on {port} did not answer PING"));
        self.wait_ok(deadline);
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some((mut child, stdin)) = node.keeper.take() {
                drop(stdin);
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cli_binary() -> String {
    std::env::var("HERALD_TEST_REDIS_CLI").unwrap_or_else(|_| "redis-cli".into())
}

/// `redis-cli -p <port> <args>`: its output, or why it failed.
fn cli(port: u16, args: &[&str]) -> Result<String, String> {
    let output = Command::new(cli_binary())
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("redis-cli: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() && !text.starts_with("Could not connect") {
        Ok(text)
    } else {
        Err(format!("{text}{}", String::from_utf8_lossy(&output.stderr)))
    }
}

/// Polls `done` every 50 ms until it holds (`Some`) or `deadline` passes (`None`).
fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) -> Option<()> {
    loop {
        if done() {
            return Some(());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Two ports that were free a moment ago (a node's client port and its cluster bus port),
/// none of them 6379 nor one `taken` already holds.
fn free_port_pair(taken: &[ClusterNode]) -> (u16, u16) {
    let used = |p: u16| p == 6379 || taken.iter().any(|n| n.port == p || n.bus_port == p);
    for _ in 0..100 {
        let a = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let b = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let (pa, pb) = (
            a.local_addr().expect("an address").port(),
            b.local_addr().expect("an address").port(),
        );
        if !used(pa) && !used(pb) {
            return (pa, pb);
        }
    }
    panic!("no free port pair in 100 tries");
}
