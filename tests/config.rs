//! The configuration file through the real binary: `herald config check`, the layering of
//! the environment and flags over the file, refusals, and `herald serve --config`.

mod common;

use std::path::PathBuf;
use std::process::Output;

use common::node::Node;
use common::progress;
use serde_json::json;

/// A configuration file of its own per test, removed afterwards.
struct File(PathBuf);

impl File {
    fn new(name: &str, text: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("herald-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the binary with `args` and only the `HERALD_*` variables of `env`.
fn herald(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_herald"));
    command.args(args);
    for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("HERALD_")) {
        command.env_remove(key);
    }
    command
        .envs(env.iter().copied())
        .output()
        .expect("herald runs")
}

/// `herald config check FILE ARGS...`: its output, which must be TOML, and its stderr.
fn check(file: &File, args: &[&str], env: &[(&str, &str)]) -> (toml::Table, String, String) {
    let output = herald(&[&["config", "check", file.path()], args].concat(), env);
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(output.status.success(), "config check failed: {stderr}");
    let table = toml::from_str(&stdout).unwrap_or_else(|e| panic!("not TOML ({e}):\n{stdout}"));
    (table, stdout, stderr)
}

fn get<'a>(table: &'a toml::Table, section: &str, key: &str) -> &'a toml::Value {
    &table[section][key]
}

#[test]
fn config_check_masks_every_secret() {
    let digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let file = File::new(
        "secrets",
        &format!(
            "[auth]\njwt_secret = \"file-jwt-s3cr3t\"\njwt_issuer = \"https://issuer.example\"\n\
             [[auth.api_key_digests]]\nname = \"ocr-worker\"\nsha256 = \"{digest}\"\n\
             scopes = [\"publish\"]\nsessions = [\"ocr-*\"]\n"
        ),
    );
    let env = [
        (
            "HERALD_API_KEYS",
            "ops:env-key-s3cr3t:admin,w:other-s3cr3t:publish",
        ),
        (
            "HERALD_REDIS_URL",
            "redis://worker:redis-s3cr3t@127.0.0.1:6390/0",
        ),
    ];
    let (table, stdout, stderr) = check(&file, &[], &env);
    let secrets = [
        "file-jwt-s3cr3t",
        "env-key-s3cr3t",
        "other-s3cr3t",
        "redis-s3cr3t",
        digest,
    ];
    for secret in secrets {
        assert!(!stdout.contains(secret), "{secret} printed:\n{stdout}");
        assert!(!stderr.contains(secret), "{secret} logged:\n{stderr}");
    }
    assert_eq!(get(&table, "auth", "jwt_secret").as_str(), Some("***"));
    let keys = get(&table, "auth", "api_keys").as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(
        keys.iter().all(|key| key.as_str() == Some("***")),
        "{stdout}"
    );
    assert_eq!(
        get(&table, "auth", "jwt_issuer").as_str(),
        Some("https://issuer.example")
    );
    assert_eq!(
        get(&table, "redis", "url").as_str(),
        Some("redis://worker:***@127.0.0.1:6390/0"),
        "{stdout}"
    );
    let digests = table["auth"]["api_key_digests"].as_array().unwrap();
    assert_eq!(digests[0]["name"].as_str(), Some("ocr-worker"));
    assert_eq!(digests[0]["sha256"].as_str(), Some("***"));

    // A secret given as a flag is masked the same way.
    let (_, stdout, _) = check(&file, &["--jwt-secret", "flag-s3cr3t"], &env);
    assert!(!stdout.contains("flag-s3cr3t"), "{stdout}");
    assert!(stdout.contains("# from --jwt-secret"), "{stdout}");
}

#[test]
fn the_environment_beats_the_file_and_flags_beat_the_environment() {
    let file = File::new(
        "layers",
        "[server]\nport = 4000\n[limits]\nmax_batch = 5\n[redis]\nprefix = \"from-file\"\n",
    );
    let (table, _, _) = check(&file, &[], &[]);
    assert_eq!(get(&table, "server", "port").as_integer(), Some(4000));
    assert_eq!(get(&table, "limits", "max_batch").as_integer(), Some(5));
    // Untouched keys keep their defaults.
    assert_eq!(
        get(&table, "limits", "max_body").as_integer(),
        Some(4 << 20)
    );

    let env = [("HERALD_PORT", "5000"), ("HERALD_REDIS_PREFIX", "from-env")];
    let (table, stdout, _) = check(&file, &[], &env);
    assert_eq!(get(&table, "server", "port").as_integer(), Some(5000));
    assert_eq!(get(&table, "redis", "prefix").as_str(), Some("from-env"));
    assert_eq!(get(&table, "limits", "max_batch").as_integer(), Some(5));
    assert!(stdout.contains("# from HERALD_PORT"), "{stdout}");
    assert!(stdout.contains("# from the file"), "{stdout}");

    let (table, stdout, _) = check(&file, &["--port", "6000"], &env);
    assert_eq!(get(&table, "server", "port").as_integer(), Some(6000));
    assert_eq!(get(&table, "redis", "prefix").as_str(), Some("from-env"));
    assert!(stdout.contains("# from --port"), "{stdout}");
}

#[test]
fn an_invalid_file_is_refused_naming_the_file_and_the_key() {
    let cases = [
        ("typo", "[server]\nprot = 3000\n", "`prot` in [server]"),
        (
            "type",
            "[limits]\nmax_batch = \"many\"\n",
            "[limits] max_batch must be an integer",
        ),
        (
            "range",
            "[server]\nport = 99999\n",
            "[server] port is invalid",
        ),
    ];
    for (name, text, expected) in cases {
        let file = File::new(name, text);
        for args in [
            vec!["config", "check", file.path()],
            vec!["serve", "--port", "0", "--config", file.path()],
        ] {
            let output = herald(&args, &[]);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{args:?} accepted {text}");
            assert!(stderr.contains(expected), "{args:?}: {stderr}");
            assert!(stderr.contains(file.path()), "{args:?}: {stderr}");
            assert!(output.stdout.is_empty(), "{args:?} printed something");
        }
    }
    let output = herald(&["config", "check", "/nonexistent/herald.toml"], &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot read /nonexistent/herald.toml"),
        "{stderr}"
    );
}

#[tokio::test]
async fn serve_runs_with_the_file() {
    // The node's own `--host 127.0.0.1 --port 0` flags override the file's.
    let file = File::new(
        "serve",
        "[server]\nport = 1\n[limits]\nmax_batch = 2\n[[models]]\nname = \"only\"\nprovider = \"simulated\"\n",
    );
    let node = Node::start("node-0", &["--config", file.path()]).await;
    let items = json!([progress(1), progress(2), progress(3)]);
    let (status, body) = node.post_events("s-1", &items).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "BATCH_TOO_LARGE", "{body}");
    let (status, models) = node.get("/api/models").await;
    assert_eq!(status, 200);
    assert_eq!(
        models["models"],
        json!([{ "name": "only", "provider": "simulated", "maxConcurrency": 4, "retries": 2, "timeoutSecs": 120 }])
    );
}

/// A Redis password never reaches the log, even in the error that stops the server.
#[test]
fn an_unreachable_redis_is_named_without_its_password() {
    // Port 1 on loopback: nothing listens there, so the connect is refused at once.
    let output = herald(
        &[
            "serve",
            "--port",
            "0",
            "--redis-url",
            "redis://u:pw-s3cr3t@127.0.0.1:1",
        ],
        &[("RUST_BACKTRACE", "0")],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(!stderr.contains("pw-s3cr3t"), "password logged:\n{stderr}");
    assert!(stderr.contains("redis://u:***@127.0.0.1:1"), "{stderr}");
}

/// `--redis-cluster` is refused, with a message saying why, without a seed list and with a
/// prefix a cluster would read as a hash tag; an unreachable seed list is named with every
/// password masked.
#[test]
fn redis_cluster_mistakes_are_refused_with_a_reason() {
    let env = [("RUST_BACKTRACE", "0")];
    let output = herald(&["serve", "--port", "0", "--redis-cluster"], &env);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("--redis-cluster needs --redis-url"),
        "{stderr}"
    );

    let url = "redis://127.0.0.1:1";
    let args = [
        "serve",
        "--port",
        "0",
        "--redis-cluster",
        "--redis-url",
        url,
    ];
    let output = herald(&[&args[..], &["--redis-prefix", "a{b}"]].concat(), &env);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("has a brace"), "{stderr}");

    let seeds = "redis://u:pw-one@127.0.0.1:1,redis://:pw-two@127.0.0.1:2";
    let output = herald(
        &[
            "serve",
            "--port",
            "0",
            "--redis-cluster",
            "--redis-url",
            seeds,
        ],
        &env,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        !stderr.contains("pw-one") && !stderr.contains("pw-two"),
        "{stderr}"
    );
    assert!(
        stderr.contains("redis://u:***@127.0.0.1:1,redis://:***@127.0.0.1:2"),
        "{stderr}"
    );
}
