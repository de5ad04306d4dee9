//! `rediss://`: herald reaches a Redis that only speaks TLS. The test makes its own CA and
//! server certificate (with the `openssl` CLI), runs `redis-server --tls-port … --port 0`,
//! and starts herald with `SSL_CERT_FILE` naming the test CA: the redis crate (rustls)
//! trusts the platform's store, which `SSL_CERT_FILE` replaces (docs/deployment.md).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::node::Node;
use common::progress;

/// A CA and a server certificate for 127.0.0.1, in a fresh temporary directory.
struct Certificates {
    dir: PathBuf,
}

impl Certificates {
    fn make() -> Certificates {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("herald-test-tls-{}", &unique[..12]));
        std::fs::create_dir_all(&dir).unwrap();
        let run = |args: &[&str]| {
            let status = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("the openssl CLI runs");
            assert!(status.success(), "openssl {args:?} failed");
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=herald test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ]);
        Certificates { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Certificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A redis-server that accepts TLS connections only; killed on drop.
struct TlsRedis {
    port: u16,
    child: Child,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

fn start_tls_redis(certs: &Certificates) -> TlsRedis {
    let port = free_port();
    let arg = |p: &Path| p.to_str().unwrap().to_owned();
    let binary =
        std::env::var("HERALD_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let child = Command::new(binary)
        .args(["--port", "0", "--tls-port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--tls-cert-file", &arg(&certs.path("server.pem"))])
        .args(["--tls-key-file", &arg(&certs.path("server.key"))])
        .args(["--tls-ca-cert-file", &arg(&certs.path("ca.pem"))])
        .args(["--tls-auth-clients", "no", "--loglevel", "warning"])
        .arg("--dir")
        .arg(&certs.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server runs");
    TlsRedis { port, child }
}

/// Polls PING over TLS (trusting the test CA) until the server answers.
async fn wait_ready(url: &str, ca: &Path) {
    let client = redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(ca).unwrap()),
        },
    )
    .expect("a rediss:// client");
    let deadline = Instant::now() + common::WAIT;
    loop {
        let pong: redis::RedisResult<String> = async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async(&mut conn).await
        }
        .await;
        match pong {
            Ok(_) => return,
            Err(error) => assert!(
                Instant::now() < deadline,
                "the TLS redis-server never answered: {error}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_runs_on_a_tls_only_redis_through_a_rediss_url() {
    let certs = Certificates::make();
    let redis = start_tls_redis(&certs);
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    wait_ready(&url, &certs.path("ca.pem")).await;

    let ca = certs.path("ca.pem");
    let node = Node::start_with_env(
        "tls-node",
        &["--redis-url", &url, "--redis-prefix", "tls"],
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
    )
    .await;
    let (status, body) = node.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = node
        .post_events("over-tls", &serde_json::json!([progress(1), progress(2)]))
        .await;
    assert_eq!(status, 202, "{body}");
    let events = node.history("over-tls").await.expect("logged in Redis");
    assert_eq!(events.len(), 2);
    let snapshot = node.snapshot("over-tls").await.unwrap();
    assert_eq!(snapshot["lastSeq"], 2);
}
