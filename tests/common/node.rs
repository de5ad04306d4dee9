//! A real `herald serve` process (the binary Cargo built for this test run), for tests
//! that need several nodes or must kill one.
//!
//! [`Node::start`] runs `herald serve --host 127.0.0.1 --port 0 <args>`, reads the port from
//! the one stdout line `herald listening on http://HOST:PORT` and returns once it is there.
//! The process is killed (SIGKILL) when the value is dropped. Its stderr (the logs) is kept
//! in memory, the last lines of it are printed when a test panics with the node alive, so
//! a failure says what the node was doing.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{Client, WAIT};

/// How long a node may take from spawn to its "listening" line.
const STARTS_WITHIN: Duration = Duration::from_secs(15);
/// stderr lines kept per node.
const STDERR_TAIL: usize = 300;
/// The stdout line's prefix (docs/protocol.md, "Process").
const LISTENING: &str = "herald listening on http://";

pub struct Node {
    /// A name for messages ("node-0", …).
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
    stderr: Arc<Mutex<VecDeque<String>>>,
    http: reqwest::Client,
}

impl Node {
    /// Starts `herald serve --host 127.0.0.1 --port 0` with `args` after it. `HERALD_*`
    /// variables of the test's environment are not passed on, so only `args` configure it.
    pub async fn start(name: &str, args: &[&str]) -> Node {
        Self::start_with_env(name, args, &[]).await
    }

    /// [`Node::start`] with extra environment variables.
    pub async fn start_with_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Node {
        let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
        command
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, _) in std::env::vars() {
            if key.starts_with("HERALD_") {
                command.env_remove(key);
            }
        }
        if super::auth_under_test() {
            command.env("HERALD_JWT_SECRET", super::TEST_JWT_SECRET);
        }
        command.envs(env.iter().copied());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot run herald: {e}"));

        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let mut err_lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let tail = stderr.clone();
        let err_reader = tokio::spawn(async move {
            while let Ok(Some(line)) = err_lines.next_line().await {
                let mut tail = tail.lock().unwrap();
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });

        let mut out_lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let listening = tokio::time::timeout(STARTS_WITHIN, async {
            while let Ok(Some(line)) = out_lines.next_line().await {
                if let Some(addr) = line.trim().strip_prefix(LISTENING) {
                    return Some(addr.trim_end_matches('/').to_owned());
                }
            }
            None
        })
        .await;
        let addr = match listening {
            Ok(Some(addr)) => addr.parse::<SocketAddr>().unwrap_or_else(|e| {
                panic!("{name}: bad address in the listening line {addr:?}: {e}")
            }),
            other => {
                let why = match other {
                    Ok(_) => "stdout closed before the listening line",
                    Err(_) => "no listening line in time",
                };
                let _ = child.start_kill();
                let status = tokio::time::timeout(WAIT, child.wait()).await;
                let _ = tokio::time::timeout(WAIT, err_reader).await;
                let tail = stderr.lock().unwrap().iter().cloned().collect::<Vec<_>>();
                panic!(
                    "{name}: herald serve {args:?}: {why} (exit: {status:?}); stderr:\n{}",
                    tail.join("\n")
                );
            }
        };
        // Keep reading stdout so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = out_lines.next_line().await {} });

        super::assert_auth_as_tested(addr).await;
        Node {
            name: name.to_owned(),
            addr,
            child,
            stderr,
            http: super::harness_http_builder()
                .no_proxy()
                .timeout(WAIT)
                .build()
                .expect("http client"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The process id (for `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the node is running")
    }

    /// The node's resident memory, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/<pid>/status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// Kills the process at once (SIGKILL, no graceful shutdown) and waits for it.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(WAIT, self.child.wait()).await;
    }

    /// Sends SIGTERM (graceful shutdown) and waits for the process; its exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        tokio::time::timeout(WAIT * 3, self.child.wait())
            .await
            .expect("the node exits after SIGTERM")
            .expect("the node's exit status")
    }

    /// Sends `signal` (e.g. `"STOP"`, `"CONT"`) to the node's process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("the node is running");
        super::send_signal(pid, signal, &self.name);
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines the node logged.
    pub fn stderr_tail(&self) -> String {
        let tail = self.stderr.lock().unwrap();
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    pub async fn connect(&self) -> Client {
        Client::connect(self.addr).await
    }

    /// Sends a request; status and JSON body (`Null` when the body is not JSON), or why no
    /// reply came.
    pub async fn try_request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        let mut request = self.http.request(method.clone(), self.url(path));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("{} {method} {path}: {e}", self.name))?;
        let status = response.status().as_u16();
        Ok((
            status,
            response.json::<Value>().await.unwrap_or(Value::Null),
        ))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.try_request(reqwest::Method::GET, path, None)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        self.try_request(reqwest::Method::POST, path, Some(body))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// POSTs to the ingest route; returns status and body.
    pub async fn post_events(&self, session_id: &str, body: &Value) -> (u16, Value) {
        self.post_json(&format!("/api/sessions/{session_id}/events"), body)
            .await
    }

    /// The snapshot of a session (`None` on 404).
    pub async fn snapshot(&self, session_id: &str) -> Option<Value> {
        let (status, body) = self.get(&format!("/api/wizard/session/{session_id}")).await;
        match status {
            200 => Some(body),
            404 => None,
            _ => panic!("{}: snapshot of {session_id}: {status} {body}", self.name),
        }
    }

    /// The whole history reply of a session after `after` (`None` on 404).
    pub async fn history_after(&self, session_id: &str, after: u64) -> Option<Value> {
        let (status, body) = self
            .get(&format!(
                "/api/wizard/session/{session_id}/events?after={after}&limit=1000"
            ))
            .await;
        match status {
            200 => Some(body),
            404 => None,
            _ => panic!("{}: history of {session_id}: {status} {body}", self.name),
        }
    }

    /// The retained events of a session (`None` when unknown).
    pub async fn history(&self, session_id: &str) -> Option<Vec<Value>> {
        self.history_after(session_id, 0)
            .await
            .map(|body| body["events"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() && matches!(self.child.try_wait(), Ok(None)) {
            eprintln!(
                "---- {} ({}) stderr, last lines ----\n{}\n---- end of {} ----",
                self.name,
                self.addr,
                self.stderr_tail(),
                self.name
            );
        }
        let _ = self.child.start_kill();
    }
}
