//! The orchestrator of docs/orchestrator.md, end to end: herald in-process with a TOML
//! configuration pointing its models at fake Ollama and OpenAI servers on loopback
//! (tests/common/fake_llm.rs, the real wire formats), and at the simulated provider.
//! Every run is read the way a front end reads it: a socket subscribed with `lastSeq: 0`,
//! so the whole run arrives in order, and the HTTP routes.

mod common;

use std::collections::BTreeMap;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::fake_llm::{FakeBehavior, FakeLlm, clarify_question, expected_reply};
use common::{Client, TestServer, is_timestamp, spawn_app_with};
use serde_json::{Value, json};

/// The environment variable the `openai` models read their key from, and the key.
const KEY_ENV: &str = "HERALD_TEST_FAKE_OPENAI_KEY";
const KEY: &str = "sk-herald-test-4f2a9c";
/// An environment variable holding a key the fake rejects.
const WRONG_KEY_ENV: &str = "HERALD_TEST_FAKE_WRONG_KEY";
const WRONG_KEY: &str = "sk-wrong";

/// `update_interval_ms` of every configuration here.
const UPDATE_INTERVAL_MS: u64 = 50;

/// How long a fake may take to see a dropped request as dropped.
const PROMPTLY: Duration = Duration::from_secs(2);

fn set_keys() {
    static KEYS: Once = Once::new();
    KEYS.call_once(|| {
        // SAFETY: set once, before this test binary's herald servers read them; Rust's own
        // environment accessors are serialised by std's lock.
        unsafe {
            std::env::set_var(KEY_ENV, KEY);
            std::env::set_var(WRONG_KEY_ENV, WRONG_KEY);
        }
    });
}

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

/// One `[[models]]` entry.
#[derive(Clone)]
struct Model {
    name: String,
    provider: &'static str,
    base_url: Option<String>,
    api_key_env: Option<String>,
    timeout_secs: u64,
    retries: u32,
    max_concurrency: u32,
    /// The provider's own model id (`model = …`), when not the name.
    model: Option<String>,
    extra: String,
}

impl Model {
    fn new(name: &str, provider: &'static str) -> Self {
        Model {
            name: name.to_owned(),
            provider,
            base_url: None,
            api_key_env: None,
            timeout_secs: 5,
            retries: 0,
            max_concurrency: 4,
            model: None,
            extra: String::new(),
        }
    }

    fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    fn timeout_secs(mut self, secs: u64) -> Self {
        self.timeout_secs = secs;
        self
    }

    fn provider_model(mut self, id: &str) -> Self {
        self.model = Some(id.to_owned());
        self
    }

    fn max_concurrency(mut self, n: u32) -> Self {
        self.max_concurrency = n;
        self
    }

    fn key_env(mut self, env: &str) -> Self {
        self.api_key_env = Some(env.to_owned());
        self
    }

    fn toml(&self) -> String {
        let mut out = format!(
            "[[models]]\nname = {:?}\nprovider = {:?}\ntimeout_secs = {}\nretries = {}\nmax_concurrency = {}\n",
            self.name, self.provider, self.timeout_secs, self.retries, self.max_concurrency
        );
        if let Some(url) = &self.base_url {
            out.push_str(&format!("base_url = {url:?}\n"));
        }
        if let Some(model) = &self.model {
            out.push_str(&format!("model = {model:?}\n"));
        }
        if let Some(env) = &self.api_key_env {
            out.push_str(&format!("api_key_env = {env:?}\n"));
        }
        out.push_str(&self.extra);
        out.push('\n');
        out
    }
}

fn ollama(name: &str, fake: &FakeLlm) -> Model {
    Model {
        base_url: Some(fake.ollama_url()),
        ..Model::new(name, "ollama")
    }
}

fn openai(name: &str, fake: &FakeLlm) -> Model {
    Model {
        base_url: Some(fake.openai_url()),
        api_key_env: Some(KEY_ENV.to_owned()),
        ..Model::new(name, "openai")
    }
}

fn simulated(name: &str) -> Model {
    Model {
        extra: "latency_ms = 10\ntokens_per_sec = 1000\n".to_owned(),
        ..Model::new(name, "simulated")
    }
}

/// The `[orchestrator]` table.
struct Orchestrator {
    max_concurrency: u32,
    clarification_timeout_secs: u64,
    update_interval_ms: u64,
    retry_backoff_ms: u64,
}

impl Default for Orchestrator {
    fn default() -> Self {
        Orchestrator {
            max_concurrency: 16,
            clarification_timeout_secs: 30,
            update_interval_ms: UPDATE_INTERVAL_MS,
            retry_backoff_ms: 10,
        }
    }
}

/// A configuration file in the temp dir, removed when dropped.
struct ConfigFile(PathBuf);

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write_config(orchestrator: &Orchestrator, models: &[Model]) -> ConfigFile {
    static N: AtomicUsize = AtomicUsize::new(0);
    let mut text = format!(
        "[orchestrator]\nmax_concurrency = {}\nclarification_timeout_secs = {}\nupdate_interval_ms = {}\nretry_backoff_ms = {}\n\n",
        orchestrator.max_concurrency,
        orchestrator.clarification_timeout_secs,
        orchestrator.update_interval_ms,
        orchestrator.retry_backoff_ms
    );
    for model in models {
        text.push_str(&model.toml());
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let path = std::env::temp_dir().join(format!(
        "herald-orchestrator-test-{}-{}-{nanos}.toml",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, text).expect("config file written");
    ConfigFile(path)
}

/// A herald started with a configuration file.
struct Herald {
    app: TestServer,
    _config: ConfigFile,
}

impl Deref for Herald {
    type Target = TestServer;
    fn deref(&self) -> &TestServer {
        &self.app
    }
}

async fn start(models: &[Model]) -> Herald {
    start_with(Orchestrator::default(), models).await
}

async fn start_with(orchestrator: Orchestrator, models: &[Model]) -> Herald {
    set_keys();
    let config = write_config(&orchestrator, models);
    let path = config.0.clone();
    let app = spawn_app_with(|c| c.config_file = Some(path)).await;
    Herald {
        app,
        _config: config,
    }
}

// ---------------------------------------------------------------------------------------
// Sessions and their events
// ---------------------------------------------------------------------------------------

type Events = Vec<(String, Value)>;

/// Creates a session; returns its id and the 201 snapshot.
async fn create(app: &TestServer, body: Value) -> (String, Value) {
    let (status, snapshot) = app.post_json("/api/wizard/sessions", &body).await;
    assert_eq!(status, 201, "create {body}: {snapshot}");
    let id = snapshot["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("sessionId in {snapshot}"))
        .to_owned();
    assert!(
        uuid::Uuid::parse_str(&id).is_ok(),
        "sessionId is a UUID: {id}"
    );
    (id, snapshot)
}

/// A socket subscribed to the session from its first event.
async fn follow(app: &TestServer, session_id: &str) -> Client {
    let mut client = app.connect().await;
    let ack = client
        .call(
            "subscribe",
            &json!({ "sessionId": session_id, "lastSeq": 0 }),
        )
        .await;
    assert_eq!(ack["ok"], true, "subscribe ack: {ack}");
    loop {
        let (name, data) = client.next().await;
        match name.as_str() {
            "connected" => continue,
            "subscribed" => break,
            _ => panic!("`{name}` before `subscribed`: {data}"),
        }
    }
    client
}

fn is_end(name: &str, data: &Value) -> bool {
    match name {
        "completed" => true,
        "error" => data.get("seq").is_some(),
        "progress" => data["status"] == "EXPIRED",
        _ => false,
    }
}

/// Reads session events into `events` until `stop` holds for one (which is kept).
async fn read_until(
    client: &mut Client,
    events: &mut Events,
    stop: impl Fn(&str, &Value) -> bool,
) -> Value {
    loop {
        let (name, data) = client.next().await;
        assert!(
            !(name == "error" && data.get("seq").is_none()),
            "socket-level error: {data}"
        );
        events.push((name.clone(), data.clone()));
        assert!(
            !is_end(&name, &data) || stop(&name, &data),
            "the session ended early: `{name}` {data}"
        );
        if stop(&name, &data) {
            return data;
        }
    }
}

/// Reads the rest of the run: up to and including `completed`, the session `error`, or
/// the `EXPIRED` progress.
async fn read_to_end(client: &mut Client, events: &mut Events) -> Value {
    read_until(client, events, is_end).await
}

/// Follows a session from its start and reads it to its end: every event, and the last.
async fn whole_run(app: &TestServer, session_id: &str) -> (Events, Value) {
    let mut client = follow(app, session_id).await;
    let mut events = Events::new();
    let end = read_to_end(&mut client, &mut events).await;
    (events, end)
}

fn seq(data: &Value) -> u64 {
    data["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("seq in {data}"))
}

fn named<'a>(events: &'a Events, name: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    events
        .iter()
        .filter(move |(n, _)| n == name)
        .map(|(_, d)| d)
}

/// The `model_result`s of each (promptId, modelName), in order.
fn model_results(events: &Events) -> BTreeMap<(String, String), Vec<Value>> {
    let mut out: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    for data in named(events, "model_result") {
        let key = (
            data["promptId"].as_str().unwrap_or_default().to_owned(),
            data["modelName"].as_str().unwrap_or_default().to_owned(),
        );
        out.entry(key).or_default().push(data.clone());
    }
    out
}

/// An event timestamp as milliseconds since the epoch.
fn millis(timestamp: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(text(timestamp))
        .unwrap_or_else(|e| panic!("timestamp {timestamp}: {e}"))
        .timestamp_millis()
}

fn text(value: &Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("expected a string, got {value}"))
}

/// How a run is expected to end.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum End {
    Completed,
    Failed,
    Cancelled,
    Expired,
}

/// The invariants of docs/orchestrator.md "Events of a run" that hold for every run.
/// `clarified` names the (promptId, modelName) pairs that asked a question: their partial
/// output restarts after the answer. Returns the model results per pair.
fn check_run(
    session_id: &str,
    events: &Events,
    prompts: u64,
    providers: &[(&str, &str)],
    end: End,
    clarified: &[(&str, &str)],
) -> BTreeMap<(String, String), Vec<Value>> {
    assert!(!events.is_empty());
    // Every event is a session event of this session, numbered 1, 2, 3, …
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(seq(data), i as u64 + 1, "seq of event {i} `{name}`: {data}");
        assert_eq!(data["sessionId"], session_id, "{name}: {data}");
        assert!(is_timestamp(&data["timestamp"]), "{name} timestamp: {data}");
    }

    // The first progress: PROCESSING, 0, every prompt pending.
    let (first_name, first) = &events[0];
    assert_eq!(first_name, "progress", "first event: {first}");
    assert_eq!(first["status"], "PROCESSING", "{first}");
    assert_eq!(first["progress"].as_f64(), Some(0.0), "{first}");
    assert_eq!(
        first["prompts"],
        json!({ "total": prompts, "completed": 0, "processing": 0, "pending": prompts, "failed": 0 }),
        "first progress: {first}"
    );

    // Every progress: consistent counts, progress never decreasing, 100 only at the end of
    // a COMPLETED session.
    let progresses: Vec<&Value> = named(events, "progress").collect();
    let mut last = 0.0;
    for (i, p) in progresses.iter().enumerate() {
        let count = |k: &str| {
            p["prompts"][k]
                .as_u64()
                .unwrap_or_else(|| panic!("prompts.{k} in {p}"))
        };
        assert_eq!(count("total"), prompts, "{p}");
        assert_eq!(
            count("total"),
            count("completed") + count("processing") + count("pending") + count("failed"),
            "total = completed + processing + pending + failed: {p}"
        );
        let progress = p["progress"]
            .as_f64()
            .unwrap_or_else(|| panic!("progress number: {p}"));
        assert!((0.0..=100.0).contains(&progress), "{p}");
        assert!(progress >= last, "progress decreased from {last}: {p}");
        last = progress;
        let is_last = i + 1 == progresses.len();
        if progress == 100.0 {
            assert!(
                is_last && p["status"] == "COMPLETED",
                "100 only in the last progress of a COMPLETED session: {p}"
            );
        }
        if !is_last {
            assert_eq!(p["status"], "PROCESSING", "a progress while running: {p}");
        }
    }

    // The ending.
    let n = events.len();
    let (last_name, last_data) = &events[n - 1];
    match end {
        End::Completed => {
            assert_eq!(last_name, "completed", "last event: {last_data}");
            assert!(last_data["result"].is_object(), "{last_data}");
            let (name, p) = &events[n - 2];
            assert_eq!(name, "progress", "progress before completed: {p}");
            assert_eq!(p["status"], "COMPLETED", "{p}");
            assert_eq!(p["progress"].as_f64(), Some(100.0), "{p}");
            assert_eq!(p["hasResult"], true, "{p}");
            assert_eq!(p["prompts"]["processing"], 0, "{p}");
            assert_eq!(p["prompts"]["pending"], 0, "{p}");
        }
        End::Failed | End::Cancelled => {
            assert_eq!(last_name, "error", "last event: {last_data}");
            let code = if end == End::Failed {
                "ALL_PROMPTS_FAILED"
            } else {
                "CANCELLED"
            };
            assert_eq!(last_data["code"], code, "{last_data}");
            assert!(!text(&last_data["error"]).is_empty(), "{last_data}");
            let (name, p) = &events[n - 2];
            assert_eq!(name, "progress", "progress before error: {p}");
            assert_eq!(p["status"], "FAILED", "{p}");
            assert!(named(events, "completed").next().is_none());
        }
        End::Expired => {
            assert_eq!(last_name, "progress", "last event: {last_data}");
            assert_eq!(last_data["status"], "EXPIRED", "{last_data}");
            assert!(named(events, "completed").next().is_none());
        }
    }

    // Per model and prompt: one start, growing partials, exactly one terminal.
    let results = model_results(events);
    for ((prompt_id, model), list) in &results {
        let pair = format!("{prompt_id}/{model}");
        let provider = providers
            .iter()
            .find(|(m, _)| m == model)
            .map(|(_, p)| *p)
            .unwrap_or_else(|| panic!("unexpected model {model}"));
        let start = &list[0];
        assert_eq!(start["status"], "processing", "{pair} start: {start}");
        assert_eq!(start["result"], "", "{pair} start: {start}");
        assert_eq!(
            start["duration"].as_f64(),
            Some(0.0),
            "{pair} start: {start}"
        );
        let mut duration = 0.0;
        for r in list {
            assert_eq!(r["provider"], provider, "{pair}: {r}");
            let d = r["duration"]
                .as_f64()
                .unwrap_or_else(|| panic!("{pair} duration: {r}"));
            assert!(
                d >= duration,
                "{pair} duration went back from {duration}: {r}"
            );
            duration = d;
        }
        let terminals: Vec<&Value> = list
            .iter()
            .filter(|r| r["status"] != "processing")
            .collect();
        let was_clarified = clarified.contains(&(prompt_id.as_str(), model.as_str()));
        if end == End::Cancelled || end == End::Expired {
            assert!(
                terminals.len() <= 1,
                "{pair}: at most one terminal: {list:?}"
            );
        } else {
            assert_eq!(terminals.len(), 1, "{pair}: exactly one terminal: {list:?}");
        }
        if let Some(terminal) = terminals.first() {
            assert!(
                std::ptr::eq(*terminal, list.last().unwrap()),
                "{pair}: nothing after the terminal result: {list:?}"
            );
            match text(&terminal["status"]) {
                "completed" => {}
                "failed" => assert!(
                    !text(&terminal["error"]).is_empty(),
                    "{pair}: a failure says why: {terminal}"
                ),
                other => panic!("{pair}: terminal status {other}"),
            }
        }
        let partials: Vec<&str> = list
            .iter()
            .skip(1)
            .filter(|r| r["status"] == "processing")
            .map(|r| text(&r["result"]))
            .collect();
        // At most one partial update per update interval (timestamps have ms precision).
        let times: Vec<i64> = list
            .iter()
            .skip(1)
            .filter(|r| r["status"] == "processing")
            .map(|r| millis(&r["timestamp"]))
            .collect();
        // The throttle runs on the worker's clock and `timestamp` is taken when the event is
        // logged, so single gaps jitter with scheduling on a loaded machine; on average the
        // updates must still be at least (nearly) an interval apart. Every provider here
        // streams faster than that, so without the throttle the average gap is far shorter.
        if let (Some(first), Some(last)) = (times.first(), times.last())
            && times.len() >= 3
        {
            let gaps = (times.len() - 1) as i64;
            assert!(
                last - first >= gaps * (UPDATE_INTERVAL_MS as i64 * 8 / 10),
                "{pair}: {} partial updates within {} ms, more than one per {UPDATE_INTERVAL_MS} ms: {list:?}",
                times.len(),
                last - first
            );
        }
        if !was_clarified {
            // One start only; the partial output only grows and is a prefix of the final one.
            let mut so_far = "";
            for partial in &partials {
                assert!(!partial.is_empty(), "{pair}: a second start: {list:?}");
                assert!(
                    partial.starts_with(so_far),
                    "{pair}: partial output shrank: {so_far:?} then {partial:?}"
                );
                so_far = partial;
            }
            if let Some(done) = terminals.first().filter(|t| t["status"] == "completed") {
                let output = text(&done["result"]);
                assert!(
                    output.starts_with(so_far),
                    "{pair}: final {output:?} does not extend partial {so_far:?}"
                );
            }
        }
    }
    results
}

async fn snapshot(app: &TestServer, session_id: &str) -> Value {
    let (status, body) = app.get(&format!("/api/wizard/session/{session_id}")).await;
    assert_eq!(status, 200, "snapshot: {body}");
    body
}

/// Asserts the socket saw exactly the retained log.
async fn assert_history_matches(app: &TestServer, session_id: &str, events: &Events) {
    let history = app.history(session_id).await.expect("history");
    let logged: Events = history
        .iter()
        .map(|h| (text(&h["event"]).to_owned(), h["data"].clone()))
        .collect();
    assert_eq!(&logged, events, "the socket saw the log");
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str, what: &str) {
    assert_eq!(status, want_status, "{what}: {body}");
    assert_eq!(body["error"]["code"], want_code, "{what}: {body}");
    assert!(
        !text(&body["error"]["message"]).is_empty(),
        "{what}: message: {body}"
    );
}

async fn respond(app: &TestServer, body: &Value) -> (u16, Value) {
    app.post_json("/api/wizard/clarifications/respond", body)
        .await
}

fn slow(tokens: usize, delay_ms: u64) -> FakeBehavior {
    FakeBehavior {
        tokens,
        token_delay: Duration::from_millis(delay_ms),
        api_key: Some(KEY.to_owned()),
        ..FakeBehavior::default()
    }
}

// ---------------------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn streams_one_prompt_from_ollama_and_openai() {
    let fake = FakeLlm::start(slow(12, 30)).await;
    let app = start(&[ollama("llama-fake", &fake), openai("gpt-fake", &fake)]).await;
    let prompt = "Explain the borrow checker";
    let (id, created) = create(
        &app,
        json!({ "prompts": [prompt], "metadata": { "team": "qa", "n": 1 } }),
    )
    .await;
    assert_eq!(created["metadata"], json!({ "team": "qa", "n": 1 }));
    let (events, completed) = whole_run(&app, &id).await;
    let providers = [("llama-fake", "ollama"), ("gpt-fake", "openai")];
    let results = check_run(&id, &events, 1, &providers, End::Completed, &[]);
    assert_eq!(results.len(), 2, "{results:?}");

    for (model, provider) in providers {
        let list = &results[&("p1".to_owned(), model.to_owned())];
        let expected = expected_reply(model, prompt, 12);
        assert!(
            list.len() >= 3,
            "{model}: a start, partial updates while it streams for ~330 ms, the end: {list:?}"
        );
        let done = list.last().unwrap();
        assert_eq!(done["status"], "completed", "{done}");
        assert_eq!(done["result"], expected.as_str(), "{model}");
        assert_eq!(done["promptId"], "p1");
        assert!(
            done["duration"].as_f64().unwrap() >= 250.0,
            "{model}: the stream took 11 × 30 ms: {done}"
        );
        for partial in &list[1..list.len() - 1] {
            assert_eq!(partial["status"], "processing", "{partial}");
            assert!(expected.starts_with(text(&partial["result"])), "{partial}");
        }
        assert_eq!(fake.stats().requests_for_model(model, prompt), 1);
        let sent = fake
            .stats()
            .requests
            .into_iter()
            .find(|r| r.model == model)
            .unwrap();
        assert_eq!(sent.wire, provider);
        assert_eq!(sent.body["stream"], true, "{}", sent.body);
        let messages = sent.body["messages"].as_array().unwrap();
        assert_eq!(messages.last().unwrap()["role"], "user");
        assert_eq!(messages.last().unwrap()["content"], prompt);
        if provider == "openai" {
            assert_eq!(
                sent.authorization.as_deref(),
                Some(&*format!("Bearer {KEY}"))
            );
        }
    }

    let result = &completed["result"];
    assert_eq!(result["strategy"], "all", "{result}");
    assert_eq!(
        result["models"],
        json!(["llama-fake", "gpt-fake"]),
        "{result}"
    );
    let prompts = result["prompts"].as_array().expect("result.prompts");
    assert_eq!(prompts.len(), 1, "{result}");
    assert_eq!(prompts[0]["promptId"], "p1");
    assert_eq!(prompts[0]["text"], prompt);
    assert_eq!(prompts[0]["status"], "completed");
    let outputs = prompts[0]["outputs"].as_array().expect("outputs");
    assert_eq!(outputs.len(), 2, "{result}");
    for (model, provider) in providers {
        let output = outputs
            .iter()
            .find(|o| o["modelName"] == model)
            .unwrap_or_else(|| panic!("{model} in {result}"));
        assert_eq!(output["provider"], provider, "{output}");
        assert_eq!(output["status"], "completed", "{output}");
        assert_eq!(output["output"], expected_reply(model, prompt, 12).as_str());
        assert_eq!(output["attempts"], 1, "{output}");
        assert!(output["duration"].as_f64().unwrap() >= 250.0, "{output}");
    }
    let last_progress = named(&events, "progress").last().unwrap();
    assert_eq!(
        last_progress["prompts"],
        json!({ "total": 1, "completed": 1, "processing": 0, "pending": 0, "failed": 0 })
    );

    let snap = snapshot(&app, &id).await;
    assert_eq!(snap["status"], "COMPLETED", "{snap}");
    assert_eq!(snap["progress"].as_f64(), Some(100.0));
    assert_eq!(snap["result"], *result);
    assert_eq!(snap["lastSeq"], events.len() as u64);
    assert_eq!(snap["metadata"], json!({ "team": "qa", "n": 1 }));
    assert_history_matches(&app, &id, &events).await;
    let stats = fake.stats();
    assert_eq!(stats.aborted, 0);
    assert!(stats.unmatched.is_empty(), "{:?}", stats.unmatched);
}

#[tokio::test]
async fn a_late_subscriber_replays_the_whole_run() {
    let fake = FakeLlm::start(slow(6, 20)).await;
    let app = start(&[openai("gpt-fake", &fake), ollama("llama-fake", &fake)]).await;
    let (id, _) = create(
        &app,
        json!({ "prompts": [{ "id": "intro", "text": "Say hi" }, "Say bye"] }),
    )
    .await;
    let mut live = follow(&app, &id).await;
    let mut events = Events::new();
    read_to_end(&mut live, &mut events).await;
    let providers = [("llama-fake", "ollama"), ("gpt-fake", "openai")];
    let results = check_run(&id, &events, 2, &providers, End::Completed, &[]);
    let keys: Vec<(String, String)> = results.keys().cloned().collect();
    let mut want = vec![
        ("intro".to_owned(), "gpt-fake".to_owned()),
        ("intro".to_owned(), "llama-fake".to_owned()),
        ("p2".to_owned(), "gpt-fake".to_owned()),
        ("p2".to_owned(), "llama-fake".to_owned()),
    ];
    want.sort();
    assert_eq!(keys, want);
    let (_, completed) = events.last().unwrap();
    assert_eq!(
        completed["result"]["models"],
        json!(["gpt-fake", "llama-fake"]),
        "every configured model, in configuration order"
    );
    let prompt_ids: Vec<&Value> = completed["result"]["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["promptId"])
        .collect();
    assert_eq!(prompt_ids, [&json!("intro"), &json!("p2")]);

    let mut late = follow(&app, &id).await;
    let mut replayed = Events::new();
    for _ in 0..events.len() {
        let (name, data) = late.next().await;
        replayed.push((name, data));
    }
    assert_eq!(replayed, events, "the late subscriber saw the same run");
    late.expect_silence(Duration::from_millis(200)).await;
    assert_history_matches(&app, &id, &events).await;
}

// ---------------------------------------------------------------------------------------
// Retries, failures, timeouts, fallback
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_failing_provider_is_retried_until_it_succeeds() {
    let fake = FakeLlm::start(FakeBehavior {
        tokens: 4,
        fail_first: 2,
        ..FakeBehavior::default()
    })
    .await;
    // The provider's own model id differs from the name clients use.
    let app = start(&[ollama("flaky", &fake)
        .provider_model("qwen2.5:0.5b")
        .retries(2)])
    .await;
    let prompt = "Retry me";
    let (id, _) = create(&app, json!({ "prompts": [prompt] })).await;
    let (events, completed) = whole_run(&app, &id).await;
    let results = check_run(&id, &events, 1, &[("flaky", "ollama")], End::Completed, &[]);
    let done = results[&("p1".to_owned(), "flaky".to_owned())]
        .last()
        .unwrap()
        .clone();
    assert_eq!(done["status"], "completed");
    assert_eq!(
        done["result"],
        expected_reply("qwen2.5:0.5b", prompt, 4).as_str()
    );
    assert_eq!(
        fake.stats().requests_for_model("qwen2.5:0.5b", prompt),
        3,
        "two failures, one success, all for the provider's model id"
    );
    let output = &completed["result"]["prompts"][0]["outputs"][0];
    assert_eq!(output["modelName"], "flaky", "{output}");
    assert_eq!(output["status"], "completed", "{output}");
    assert_eq!(output["attempts"], 3, "{output}");
}

#[tokio::test]
async fn retries_back_off_exponentially() {
    let fake = FakeLlm::start(FakeBehavior {
        fail_first: 2,
        ..FakeBehavior::default()
    })
    .await;
    let app = start_with(
        Orchestrator {
            retry_backoff_ms: 150,
            ..Orchestrator::default()
        },
        &[ollama("flaky", &fake).retries(2)],
    )
    .await;
    let (id, _) = create(&app, json!({ "prompts": ["Back off"] })).await;
    let (events, _) = whole_run(&app, &id).await;
    check_run(&id, &events, 1, &[("flaky", "ollama")], End::Completed, &[]);
    let at: Vec<Instant> = fake.stats().requests.iter().map(|r| r.at).collect();
    assert_eq!(at.len(), 3);
    let first_gap = at[1] - at[0];
    let second_gap = at[2] - at[1];
    assert!(
        first_gap >= Duration::from_millis(145),
        "first retry after 150 ms, was {first_gap:?}"
    );
    assert!(
        second_gap >= Duration::from_millis(295),
        "second retry after 300 ms, was {second_gap:?}"
    );
    assert!(
        second_gap < Duration::from_millis(1500) && first_gap < Duration::from_millis(1000),
        "{first_gap:?} {second_gap:?}"
    );
}

#[tokio::test]
async fn a_malformed_stream_is_a_failed_attempt() {
    let fake = FakeLlm::start(FakeBehavior {
        malformed: true,
        api_key: Some(KEY.to_owned()),
        ..FakeBehavior::default()
    })
    .await;
    let app = start(&[
        ollama("llama-garbage", &fake).retries(1),
        openai("gpt-garbage", &fake).retries(1),
    ])
    .await;
    let prompt = "Parse this";
    let (id, _) = create(&app, json!({ "prompts": [prompt] })).await;
    let (events, _) = whole_run(&app, &id).await;
    let results = check_run(
        &id,
        &events,
        1,
        &[("llama-garbage", "ollama"), ("gpt-garbage", "openai")],
        End::Failed,
        &[],
    );
    for model in ["llama-garbage", "gpt-garbage"] {
        let last = results[&("p1".to_owned(), model.to_owned())]
            .last()
            .unwrap();
        assert_eq!(last["status"], "failed", "{last}");
        assert_eq!(fake.stats().requests_for_model(model, prompt), 2, "{model}");
    }
}

#[tokio::test]
async fn a_prompt_whose_every_attempt_fails_fails_the_session() {
    let fake = FakeLlm::start(FakeBehavior {
        fail_first: 10,
        ..FakeBehavior::default()
    })
    .await;
    let app = start(&[ollama("broken", &fake).retries(1)]).await;
    let prompt = "Never works";
    let (id, _) = create(&app, json!({ "prompts": [prompt] })).await;
    let (events, _) = whole_run(&app, &id).await;
    let results = check_run(&id, &events, 1, &[("broken", "ollama")], End::Failed, &[]);
    let failed = results[&("p1".to_owned(), "broken".to_owned())]
        .last()
        .unwrap()
        .clone();
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(
        fake.stats().requests_for(prompt),
        2,
        "the first attempt and one retry"
    );
    let last_progress = named(&events, "progress").last().unwrap();
    assert_eq!(
        last_progress["prompts"],
        json!({ "total": 1, "completed": 0, "processing": 0, "pending": 0, "failed": 1 }),
        "{last_progress}"
    );
    let snap = snapshot(&app, &id).await;
    assert_eq!(snap["status"], "FAILED", "{snap}");
    assert_history_matches(&app, &id, &events).await;
}

#[tokio::test]
async fn a_session_with_some_failed_prompts_still_completes() {
    let fake = FakeLlm::start(FakeBehavior {
        fail_marker: Some("[boom]".to_owned()),
        api_key: Some(KEY.to_owned()),
        ..FakeBehavior::default()
    })
    .await;
    let app = start(&[openai("gpt-fake", &fake).retries(1)]).await;
    let good = "A fine question";
    let bad = "A cursed question [boom]";
    let (id, _) = create(
        &app,
        json!({ "prompts": [{ "id": "alpha", "text": good }, { "id": "beta", "text": bad }] }),
    )
    .await;
    let (events, completed) = whole_run(&app, &id).await;
    check_run(
        &id,
        &events,
        2,
        &[("gpt-fake", "openai")],
        End::Completed,
        &[],
    );
    let prompts = completed["result"]["prompts"].as_array().unwrap();
    assert_eq!(prompts[0]["promptId"], "alpha");
    assert_eq!(prompts[0]["status"], "completed");
    assert_eq!(
        prompts[0]["outputs"][0]["output"],
        expected_reply("gpt-fake", good, 5).as_str()
    );
    assert_eq!(prompts[1]["promptId"], "beta");
    assert_eq!(prompts[1]["text"], bad);
    assert_eq!(prompts[1]["status"], "failed", "{}", prompts[1]);
    let output = &prompts[1]["outputs"][0];
    assert_eq!(output["status"], "failed", "{output}");
    assert!(!text(&output["error"]).is_empty(), "{output}");
    assert_eq!(output["attempts"], 2, "{output}");
    assert_eq!(fake.stats().requests_for(bad), 2);
    let last_progress = named(&events, "progress").last().unwrap();
    assert_eq!(
        last_progress["prompts"],
        json!({ "total": 2, "completed": 1, "processing": 0, "pending": 0, "failed": 1 }),
        "{last_progress}"
    );
}

#[tokio::test]
async fn a_rejected_api_key_is_a_failure() {
    let fake = FakeLlm::start(FakeBehavior {
        api_key: Some(KEY.to_owned()),
        ..FakeBehavior::default()
    })
    .await;
    let app = start(&[openai("gpt-fake", &fake).key_env(WRONG_KEY_ENV)]).await;
    let (id, _) = create(&app, json!({ "prompts": ["Who am I?"] })).await;
    let (events, _) = whole_run(&app, &id).await;
    check_run(&id, &events, 1, &[("gpt-fake", "openai")], End::Failed, &[]);
    let stats = fake.stats();
    assert_eq!(stats.requests.len(), 1, "no retries configured");
    assert_eq!(
        stats.requests[0].authorization.as_deref(),
        Some(&*format!("Bearer {WRONG_KEY}"))
    );
    assert_eq!(stats.requests[0].status, 401);
}

#[tokio::test]
async fn a_provider_that_never_answers_times_out() {
    let stuck = FakeLlm::start(FakeBehavior {
        hang: true,
        ..FakeBehavior::default()
    })
    .await;
    // Streams for ~2.5 s: the timeout covers the whole request, not just its start.
    let dawdling = FakeLlm::start(slow(100, 25)).await;
    let app = start(&[
        ollama("stuck", &stuck).timeout_secs(1),
        openai("dawdling", &dawdling).timeout_secs(1),
    ])
    .await;
    let began = Instant::now();
    let (id, _) = create(&app, json!({ "prompts": ["Anyone there?"] })).await;
    let (events, _) = whole_run(&app, &id).await;
    let results = check_run(
        &id,
        &events,
        1,
        &[("stuck", "ollama"), ("dawdling", "openai")],
        End::Failed,
        &[],
    );
    for model in ["stuck", "dawdling"] {
        let list = &results[&("p1".to_owned(), model.to_owned())];
        let failed = list.last().unwrap();
        assert_eq!(failed["status"], "failed", "{failed}");
        let error = text(&failed["error"]).to_lowercase();
        assert!(
            error.contains("timeout") || error.contains("timed out"),
            "the error mentions the timeout: {failed}"
        );
        let duration = failed["duration"].as_f64().unwrap();
        assert!(
            (900.0..2000.0).contains(&duration),
            "failed after the 1 s timeout: {failed}"
        );
    }
    let dawdled = &results[&("p1".to_owned(), "dawdling".to_owned())];
    assert!(
        dawdled.len() >= 3,
        "partial output streamed before the timeout: {dawdled:?}"
    );
    assert!(began.elapsed() < Duration::from_secs(5));
    assert_eq!(stuck.stats().requests.len(), 1, "retries = 0");
    assert_eq!(dawdling.stats().requests.len(), 1, "retries = 0");
    dawdling
        .wait_until("the timed-out stream dropped", PROMPTLY, |s| {
            s.aborted == 1 && s.in_flight == 0
        })
        .await;
}

#[tokio::test]
async fn fallback_tries_models_in_order_until_one_succeeds() {
    let broken = FakeLlm::start(FakeBehavior {
        fail_first: 10,
        ..FakeBehavior::default()
    })
    .await;
    let fine = FakeLlm::start(FakeBehavior {
        api_key: Some(KEY.to_owned()),
        ..FakeBehavior::default()
    })
    .await;
    let app = start(&[
        ollama("model-a", &broken).retries(1),
        openai("model-b", &fine),
        ollama("model-c", &fine),
    ])
    .await;
    let prompt = "Pick one";
    let (id, _) = create(
        &app,
        json!({ "prompts": [prompt], "strategy": "fallback", "models": ["model-a", "model-b", "model-c"] }),
    )
    .await;
    let (events, completed) = whole_run(&app, &id).await;
    let providers = [
        ("model-a", "ollama"),
        ("model-b", "openai"),
        ("model-c", "ollama"),
    ];
    let results = check_run(&id, &events, 1, &providers, End::Completed, &[]);
    let a = &results[&("p1".to_owned(), "model-a".to_owned())];
    let b = &results[&("p1".to_owned(), "model-b".to_owned())];
    assert_eq!(a.last().unwrap()["status"], "failed");
    assert_eq!(b.last().unwrap()["status"], "completed");
    assert_eq!(
        b.last().unwrap()["result"],
        expected_reply("model-b", prompt, 5).as_str()
    );
    assert!(
        seq(a.last().unwrap()) < seq(&b[0]),
        "B starts only after A failed"
    );
    assert!(
        !results.contains_key(&("p1".to_owned(), "model-c".to_owned())),
        "C never started: {results:?}"
    );
    assert_eq!(broken.stats().requests_for(prompt), 2);
    assert_eq!(fine.stats().requests_for_model("model-b", prompt), 1);
    assert_eq!(fine.stats().requests_for_model("model-c", prompt), 0);

    let result = &completed["result"];
    assert_eq!(result["strategy"], "fallback", "{result}");
    let p = &result["prompts"][0];
    assert_eq!(p["status"], "completed", "{p}");
    let outputs = p["outputs"].as_array().unwrap();
    let succeeded: Vec<&Value> = outputs
        .iter()
        .filter(|o| o["status"] == "completed")
        .collect();
    assert_eq!(succeeded.len(), 1, "{p}");
    assert_eq!(succeeded[0]["modelName"], "model-b");
    assert_eq!(
        succeeded[0]["output"],
        expected_reply("model-b", prompt, 5).as_str()
    );
    let a_output = outputs
        .iter()
        .find(|o| o["modelName"] == "model-a")
        .unwrap_or_else(|| panic!("model-a's failure is in the result: {p}"));
    assert_eq!(a_output["status"], "failed", "{a_output}");
    assert_eq!(a_output["attempts"], 2, "{a_output}");
    assert!(
        outputs
            .iter()
            .all(|o| o["modelName"] != "model-c" || o["status"] != "completed"),
        "{p}"
    );
}

// ---------------------------------------------------------------------------------------
// Bad requests and the model list
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn bad_session_requests_are_rejected_with_codes() {
    let app = start(&[simulated("sim-a"), simulated("sim-b")]).await;
    let (status, body) = app
        .post_json(
            "/api/wizard/sessions",
            &json!({ "prompts": ["hi"], "models": ["sim-a", "no-such-model"] }),
        )
        .await;
    assert_error(status, &body, 400, "UNKNOWN_MODEL", "unknown model");
    assert!(
        text(&body["error"]["message"]).contains("no-such-model"),
        "the message names the model: {body}"
    );

    let many: Vec<String> = (0..101).map(|i| format!("prompt {i}")).collect();
    let cases: Vec<(&str, Value)> = vec![
        ("no prompts field", json!({})),
        ("empty prompts", json!({ "prompts": [] })),
        ("prompts not an array", json!({ "prompts": "hello" })),
        (
            "a prompt not a string or object",
            json!({ "prompts": [42] }),
        ),
        ("empty text", json!({ "prompts": [""] })),
        ("empty object text", json!({ "prompts": [{ "text": "" }] })),
        ("object without text", json!({ "prompts": [{ "id": "a" }] })),
        (
            "duplicate ids",
            json!({ "prompts": [{ "id": "a", "text": "x" }, { "id": "a", "text": "y" }] }),
        ),
        (
            "ill-formed id",
            json!({ "prompts": [{ "id": "bad id!", "text": "x" }] }),
        ),
        (
            "unknown strategy",
            json!({ "prompts": ["x"], "strategy": "bogus" }),
        ),
        ("body not an object", json!(["x"])),
    ];
    for (what, body) in cases {
        let (status, reply) = app.post_json("/api/wizard/sessions", &body).await;
        assert_error(status, &reply, 400, "INVALID_REQUEST", what);
    }
    let (status, reply) = app
        .post_json("/api/wizard/sessions", &json!({ "prompts": many }))
        .await;
    assert_error(
        status,
        &reply,
        400,
        "TOO_MANY_PROMPTS",
        "more than 100 prompts",
    );
    let (status, list) = app.get("/api/wizard/sessions").await;
    assert_eq!(status, 200);
    assert_eq!(list["sessions"], json!([]), "nothing was created: {list}");

    // Exactly 100 prompts is fine.
    let hundred: Vec<String> = (0..100).map(|i| format!("prompt {i}")).collect();
    let (_, snap) = create(
        &app,
        json!({ "prompts": hundred, "models": ["sim-b"], "metadata": { "k": "v" } }),
    )
    .await;
    assert_eq!(snap["metadata"], json!({ "k": "v" }));
}

#[tokio::test]
async fn the_model_list_is_the_configuration_in_order() {
    let fake = FakeLlm::start(FakeBehavior::default()).await;
    let mut slowpoke = simulated("sim-z");
    slowpoke.max_concurrency = 1;
    let app = start(&[
        openai("gpt-fake", &fake).retries(3).timeout_secs(7),
        slowpoke,
        ollama("llama-fake", &fake).retries(1).timeout_secs(9),
    ])
    .await;
    let (status, body) = app.get("/api/models").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({ "models": [
            { "name": "gpt-fake", "provider": "openai", "maxConcurrency": 4, "retries": 3, "timeoutSecs": 7 },
            { "name": "sim-z", "provider": "simulated", "maxConcurrency": 1, "retries": 0, "timeoutSecs": 5 },
            { "name": "llama-fake", "provider": "ollama", "maxConcurrency": 4, "retries": 1, "timeoutSecs": 9 },
        ] })
    );

    // Without a configuration file: the three simulated models.
    let plain = spawn_app_with(|c| c.config_file = None).await;
    let (status, body) = plain.get("/api/models").await;
    assert_eq!(status, 200, "{body}");
    let names: Vec<&Value> = body["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["name"])
        .collect();
    assert_eq!(
        names,
        [
            &json!("sim-fast"),
            &json!("sim-balanced"),
            &json!("sim-slow")
        ]
    );
    assert!(
        body["models"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["provider"] == "simulated"),
        "{body}"
    );
}

// ---------------------------------------------------------------------------------------
// Clarifications
// ---------------------------------------------------------------------------------------

fn is_clarification(status: &'static str) -> impl Fn(&str, &Value) -> bool {
    move |name, data| name == "clarification" && data["status"] == status
}

/// Checks the clarification flags of the progress events around a question that was
/// asked (pending at `asked`) and answered (at `answered`).
fn check_clarification_progress(events: &Events, asked: u64, answered: u64) {
    let progresses: Vec<&Value> = named(events, "progress").collect();
    for p in &progresses {
        let s = seq(p);
        let (flag, count) = if s > asked && s < answered {
            (true, 1)
        } else {
            (false, 0)
        };
        assert_eq!(p["hasClarifications"], flag, "progress at {s}: {p}");
        assert_eq!(p["clarificationCount"], count, "progress at {s}: {p}");
    }
    assert!(
        progresses
            .iter()
            .any(|p| seq(p) > asked && seq(p) < answered),
        "a progress while the question was pending"
    );
    assert!(
        progresses.iter().any(|p| seq(p) > answered),
        "a progress after the answer"
    );
}

#[tokio::test]
async fn a_real_model_asks_a_question_and_resumes_with_the_answer() {
    let fake = FakeLlm::start(FakeBehavior {
        tokens: 4,
        clarify_marker: Some("[ask]".to_owned()),
        ..FakeBehavior::default()
    })
    .await;
    let app = start(&[ollama("llama-fake", &fake)]).await;
    let vague = "Plan my trip [ask]";
    let clear = "List three colours";
    let (id, _) = create(&app, json!({ "prompts": [vague, clear] })).await;
    let mut client = follow(&app, &id).await;
    let mut events = Events::new();
    let pending = read_until(&mut client, &mut events, is_clarification("pending")).await;
    let clarification_id = text(&pending["clarificationId"]).to_owned();
    assert!(
        uuid::Uuid::parse_str(&clarification_id).is_ok(),
        "{pending}"
    );
    assert_eq!(
        pending["question"],
        clarify_question(vague).as_str(),
        "{pending}"
    );

    // The other prompt keeps running and finishes while the question is open.
    let p2_done = |name: &str, data: &Value| {
        name == "model_result" && data["promptId"] == "p2" && data["status"] == "completed"
    };
    if !events.iter().any(|(name, data)| p2_done(name, data)) {
        read_until(&mut client, &mut events, p2_done).await;
    }
    let snap = snapshot(&app, &id).await;
    assert_eq!(snap["status"], "PROCESSING", "{snap}");
    assert_eq!(snap["hasClarifications"], true, "{snap}");
    assert_eq!(snap["clarificationCount"], 1, "{snap}");

    let answer = "Lisbon, in May";
    let (status, reply) = respond(
        &app,
        &json!({ "sessionId": id, "clarificationId": clarification_id, "answer": answer }),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply,
        json!({ "ok": true, "sessionId": id, "clarificationId": clarification_id })
    );
    let answered = read_until(&mut client, &mut events, is_clarification("answered")).await;
    assert_eq!(answered["clarificationId"], clarification_id.as_str());
    assert_eq!(answered["answer"], answer);
    let completed = read_to_end(&mut client, &mut events).await;

    let results = check_run(
        &id,
        &events,
        2,
        &[("llama-fake", "ollama")],
        End::Completed,
        &[("p1", "llama-fake")],
    );
    check_clarification_progress(&events, seq(&pending), seq(&answered));
    let p1 = &results[&("p1".to_owned(), "llama-fake".to_owned())];
    let done = p1.last().unwrap();
    assert_eq!(done["status"], "completed", "{done}");
    let output = text(&done["result"]);
    assert!(
        output.contains(answer),
        "the output uses the answer: {output}"
    );
    assert!(
        !output.contains("CLARIFICATION_NEEDED"),
        "the question is not the answer: {output}"
    );
    for partial in p1.iter().filter(|r| seq(r) > seq(&answered)) {
        assert!(output.starts_with(text(&partial["result"])), "{partial}");
    }
    let outputs = &completed["result"]["prompts"][0]["outputs"];
    assert_eq!(outputs[0]["output"], output, "{outputs}");

    // The follow-up carried the conversation: system, prompt, question, answer.
    let stats = fake.stats();
    let asked: Vec<_> = stats
        .requests
        .iter()
        .filter(|r| r.prompt == vague)
        .collect();
    assert_eq!(asked.len(), 2, "the question, then the answer");
    let roles = |r: &common::fake_llm::SeenRequest| -> Vec<String> {
        r.body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| text(&m["role"]).to_owned())
            .collect()
    };
    assert_eq!(roles(asked[0]), ["system", "user"], "{}", asked[0].body);
    assert!(
        text(&asked[0].body["messages"][0]["content"]).contains("CLARIFICATION_NEEDED"),
        "the system message states the convention: {}",
        asked[0].body
    );
    assert_eq!(
        roles(asked[1]),
        ["system", "user", "assistant", "user"],
        "{}",
        asked[1].body
    );
    let follow_up = &asked[1].body["messages"];
    assert_eq!(follow_up[1]["content"], vague);
    assert!(text(&follow_up[2]["content"]).contains(&clarify_question(vague)));
    assert!(text(&follow_up[3]["content"]).contains(answer));

    let snap = snapshot(&app, &id).await;
    assert_eq!(snap["hasClarifications"], false, "{snap}");
    assert_eq!(snap["clarificationCount"], 0, "{snap}");
    assert_eq!(snap["clarifications"][0]["status"], "answered", "{snap}");
    assert_history_matches(&app, &id, &events).await;
}

#[tokio::test]
async fn a_simulated_model_asks_and_respond_rejects_bad_answers() {
    let app = start(&[simulated("sim-q")]).await;
    let prompt = "Summarise the quarterly report [clarify]";
    let (id, _) = create(&app, json!({ "prompts": [prompt] })).await;
    let mut client = follow(&app, &id).await;
    let mut events = Events::new();
    let pending = read_until(&mut client, &mut events, is_clarification("pending")).await;
    let cid = text(&pending["clarificationId"]).to_owned();
    assert_eq!(
        pending["question"],
        format!("What should I focus on for \"{prompt}\"?").as_str()
    );

    // Errors while the question is open; none of them answers it.
    let (status, body) = respond(
        &app,
        &json!({ "sessionId": "no-such-session", "clarificationId": cid, "answer": "x" }),
    )
    .await;
    assert_error(status, &body, 404, "SESSION_NOT_FOUND", "unknown session");
    let (status, body) = respond(
        &app,
        &json!({ "sessionId": id, "clarificationId": "2c1f5b8e-0000-4000-8000-000000000000", "answer": "x" }),
    )
    .await;
    assert_error(
        status,
        &body,
        404,
        "CLARIFICATION_NOT_FOUND",
        "unknown clarification",
    );
    let malformed = [
        (
            "missing answer",
            json!({ "sessionId": id, "clarificationId": cid }),
        ),
        (
            "answer not a string",
            json!({ "sessionId": id, "clarificationId": cid, "answer": 42 }),
        ),
        (
            "empty answer",
            json!({ "sessionId": id, "clarificationId": cid, "answer": "" }),
        ),
        (
            "missing clarificationId",
            json!({ "sessionId": id, "answer": "x" }),
        ),
        (
            "clarificationId not a string",
            json!({ "sessionId": id, "clarificationId": 7, "answer": "x" }),
        ),
        (
            "missing sessionId",
            json!({ "clarificationId": cid, "answer": "x" }),
        ),
        (
            "sessionId not a string",
            json!({ "sessionId": ["x"], "clarificationId": cid, "answer": "x" }),
        ),
    ];
    for (what, body) in malformed {
        let (status, reply) = respond(&app, &body).await;
        assert_error(status, &reply, 400, "INVALID_REQUEST", what);
    }
    let snap = snapshot(&app, &id).await;
    assert_eq!(snap["clarifications"][0]["status"], "pending", "{snap}");
    assert_eq!(snap["status"], "PROCESSING", "{snap}");

    let answer = "the revenue table";
    let (status, reply) = respond(
        &app,
        &json!({ "sessionId": id, "clarificationId": cid, "answer": answer }),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let answered = read_until(&mut client, &mut events, is_clarification("answered")).await;
    assert_eq!(answered["answer"], answer);
    read_to_end(&mut client, &mut events).await;
    let results = check_run(
        &id,
        &events,
        1,
        &[("sim-q", "simulated")],
        End::Completed,
        &[("p1", "sim-q")],
    );
    check_clarification_progress(&events, seq(&pending), seq(&answered));
    let done = results[&("p1".to_owned(), "sim-q".to_owned())]
        .last()
        .unwrap()
        .clone();
    assert_eq!(done["status"], "completed", "{done}");
    assert!(
        text(&done["result"]).contains(&format!("(clarified: {answer})")),
        "{done}"
    );

    // The same answer again is done already; another one is refused.
    let (status, body) = respond(
        &app,
        &json!({ "sessionId": id, "clarificationId": cid, "answer": answer }),
    )
    .await;
    assert_eq!(status, 200, "the same answer again: {body}");
    let (status, body) = respond(
        &app,
        &json!({ "sessionId": id, "clarificationId": cid, "answer": "again" }),
    )
    .await;
    assert_error(status, &body, 409, "CLARIFICATION_CLOSED", "answered twice");
    assert_history_matches(&app, &id, &events).await;
}

#[tokio::test]
async fn an_unanswered_question_expires_the_session_and_stops_its_work() {
    // The slow fake streams for ~10 s; the question expires after 1 s.
    let fake = FakeLlm::start(slow(400, 25)).await;
    let app = start_with(
        Orchestrator {
            clarification_timeout_secs: 1,
            ..Orchestrator::default()
        },
        &[simulated("sim-q"), ollama("slow-llama", &fake)],
    )
    .await;
    let began = Instant::now();
    let (id, _) = create(
        &app,
        json!({ "prompts": ["[clarify] Write the plan", "Write the summary"] }),
    )
    .await;
    let mut client = follow(&app, &id).await;
    let mut events = Events::new();
    let pending = read_until(&mut client, &mut events, is_clarification("pending")).await;
    let cid = text(&pending["clarificationId"]).to_owned();
    let expired = read_until(&mut client, &mut events, is_clarification("expired")).await;
    assert_eq!(expired["clarificationId"], cid.as_str());
    read_to_end(&mut client, &mut events).await;
    assert!(
        began.elapsed() < Duration::from_secs(6),
        "expired after ~1 s, not after the slow model"
    );
    check_run(
        &id,
        &events,
        2,
        &[("sim-q", "simulated"), ("slow-llama", "ollama")],
        End::Expired,
        &[("p1", "sim-q")],
    );
    for p in named(&events, "progress") {
        if seq(p) > seq(&pending) && seq(p) < seq(&expired) {
            assert_eq!(p["hasClarifications"], true, "{p}");
            assert_eq!(p["clarificationCount"], 1, "{p}");
        }
    }
    let last_progress = named(&events, "progress").last().unwrap();
    assert_eq!(last_progress["hasClarifications"], false, "{last_progress}");
    assert_eq!(last_progress["clarificationCount"], 0, "{last_progress}");

    // The slow model's requests (both prompts) were dropped.
    fake.wait_until("both slow streams dropped", PROMPTLY, |s| {
        s.started == 2 && s.aborted == 2 && s.in_flight == 0
    })
    .await;
    client.expect_silence(Duration::from_millis(300)).await;

    let snap = snapshot(&app, &id).await;
    assert_eq!(snap["status"], "EXPIRED", "{snap}");
    assert_eq!(snap["clarifications"][0]["status"], "expired", "{snap}");
    let history = app.history(&id).await.unwrap();
    let last_logged_progress = history
        .iter()
        .rev()
        .find(|h| h["event"] == "progress")
        .unwrap();
    assert_eq!(last_logged_progress["data"]["status"], "EXPIRED");
    assert_history_matches(&app, &id, &events).await;

    let (status, body) = respond(
        &app,
        &json!({ "sessionId": id, "clarificationId": cid, "answer": "too late" }),
    )
    .await;
    assert_error(status, &body, 409, "CLARIFICATION_CLOSED", "expired");
    let (status, body) = app
        .post_json(&format!("/api/wizard/session/{id}/cancel"), &json!({}))
        .await;
    assert_error(
        status,
        &body,
        409,
        "SESSION_ENDED",
        "cancel an expired session",
    );
    // An expired session stays ended for producers too.
    let (status, body) = app
        .post_events(
            &id,
            &json!([{ "event": "progress", "data": { "status": "PROCESSING", "progress": 5 } }]),
        )
        .await;
    assert_error(status, &body, 409, "SESSION_ENDED", "a late producer event");
    assert_eq!(snapshot(&app, &id).await["status"], "EXPIRED");
}

// ---------------------------------------------------------------------------------------
// Cancel
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn cancel_stops_the_session_and_drops_provider_requests() {
    // ~10 s of streaming per request unless dropped.
    let fake = FakeLlm::start(slow(400, 25)).await;
    let app = start(&[ollama("llama-fake", &fake), openai("gpt-fake", &fake)]).await;
    let (id, _) = create(&app, json!({ "prompts": ["Write a long essay"] })).await;
    let mut client = follow(&app, &id).await;
    fake.wait_until("both models streaming", Duration::from_secs(5), |s| {
        s.in_flight == 2
    })
    .await;

    // No body at all.
    let response = common::harness_http()
        .post(app.url(&format!("/api/wizard/session/{id}/cancel")))
        .send()
        .await
        .expect("cancel sent");
    let status = response.status().as_u16();
    let snap: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 202, "{snap}");
    assert_eq!(snap["sessionId"], id.as_str(), "{snap}");
    assert_eq!(snap["status"], "FAILED", "{snap}");
    assert_eq!(snap["error"]["code"], "CANCELLED", "{snap}");

    let mut events = Events::new();
    let error = read_to_end(&mut client, &mut events).await;
    assert_eq!(error["code"], "CANCELLED", "{error}");
    check_run(
        &id,
        &events,
        1,
        &[("llama-fake", "ollama"), ("gpt-fake", "openai")],
        End::Cancelled,
        &[],
    );
    let stats = fake
        .wait_until("both streams dropped", PROMPTLY, |s| {
            s.aborted == 2 && s.in_flight == 0
        })
        .await;
    assert_eq!(stats.finished, 0);
    client.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(
        fake.stats().requests.len(),
        2,
        "nothing retried after cancel"
    );
    assert_history_matches(&app, &id, &events).await;

    let (status, body) = app
        .post_json(&format!("/api/wizard/session/{id}/cancel"), &json!({}))
        .await;
    assert_error(status, &body, 409, "SESSION_ENDED", "cancel twice");
    let (status, body) = app
        .post_json("/api/wizard/session/no-such-session/cancel", &json!({}))
        .await;
    assert_error(status, &body, 404, "SESSION_NOT_FOUND", "cancel unknown");
}

// ---------------------------------------------------------------------------------------
// Bodies that are JSON arrays
// ---------------------------------------------------------------------------------------

/// Both bodies are objects in docs/orchestrator.md; an array holding the right values in
/// field order is still not one (serde's derive would read it as the struct).
#[tokio::test]
async fn array_bodies_are_not_requests() {
    let app = start(&[simulated("sim-q")]).await;
    let (status, body) = app
        .post_json("/api/wizard/sessions", &json!([["hello"]]))
        .await;
    assert_error(status, &body, 400, "INVALID_REQUEST", "create: array body");

    let (id, _) = create(&app, json!({ "prompts": ["Plan it [clarify]"] })).await;
    let mut client = follow(&app, &id).await;
    let mut events = Events::new();
    let pending = read_until(&mut client, &mut events, is_clarification("pending")).await;
    let cid = text(&pending["clarificationId"]).to_owned();
    let (status, body) = respond(&app, &json!([id, cid, "an answer"])).await;
    assert_error(status, &body, 400, "INVALID_REQUEST", "respond: array body");
    let snap = snapshot(&app, &id).await;
    assert_eq!(snap["clarifications"][0]["status"], "pending", "{snap}");
}

// ---------------------------------------------------------------------------------------
// Concurrency limits and the simulated provider's failures
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn concurrency_limits_hold_per_model_and_overall() {
    // One call at a time to this model.
    let single = FakeLlm::start(slow(5, 20)).await;
    let app = start(&[ollama("single", &single).max_concurrency(1)]).await;
    let (id, _) = create(&app, json!({ "prompts": ["one", "two", "three"] })).await;
    let (events, _) = whole_run(&app, &id).await;
    check_run(
        &id,
        &events,
        3,
        &[("single", "ollama")],
        End::Completed,
        &[],
    );
    let stats = single.stats();
    assert_eq!(stats.requests.len(), 3);
    assert_eq!(stats.max_in_flight, 1, "max_concurrency = 1 for the model");

    // Two calls at a time across all sessions, though the model allows four.
    let pair = FakeLlm::start(slow(5, 20)).await;
    let app = start_with(
        Orchestrator {
            max_concurrency: 2,
            ..Orchestrator::default()
        },
        &[ollama("pair", &pair).max_concurrency(4)],
    )
    .await;
    let (first, _) = create(&app, json!({ "prompts": ["a1", "a2"] })).await;
    let (second, _) = create(&app, json!({ "prompts": ["b1", "b2"] })).await;
    for id in [first, second] {
        let mut client = follow(&app, &id).await;
        let mut events = Events::new();
        read_to_end(&mut client, &mut events).await;
        check_run(&id, &events, 2, &[("pair", "ollama")], End::Completed, &[]);
    }
    let stats = pair.stats();
    assert_eq!(stats.requests.len(), 4);
    assert_eq!(
        stats.max_in_flight, 2,
        "[orchestrator] max_concurrency = 2 across sessions, and it is used"
    );
}

#[tokio::test]
async fn simulated_models_fail_when_told_to() {
    let mut recovering = simulated("sim-c").retries(1);
    recovering.extra.push_str("fail_attempts = 1\n");
    let app = start(&[
        simulated("sim-a").retries(1),
        simulated("sim-b").retries(1),
        recovering,
    ])
    .await;
    let (id, _) = create(
        &app,
        json!({ "prompts": ["All good", "Doomed [fail]", "Only b fails [fail:sim-b]"] }),
    )
    .await;
    let (events, completed) = whole_run(&app, &id).await;
    let providers = [
        ("sim-a", "simulated"),
        ("sim-b", "simulated"),
        ("sim-c", "simulated"),
    ];
    check_run(&id, &events, 3, &providers, End::Completed, &[]);
    let prompts = completed["result"]["prompts"].as_array().unwrap();
    let outcome = |p: usize, model: &str| -> (String, u64) {
        let output = prompts[p]["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["modelName"] == model)
            .unwrap_or_else(|| panic!("{model} in {}", prompts[p]));
        (
            text(&output["status"]).to_owned(),
            output["attempts"].as_u64().unwrap(),
        )
    };
    let statuses: Vec<&Value> = prompts.iter().map(|p| &p["status"]).collect();
    assert_eq!(
        statuses,
        [&json!("completed"), &json!("failed"), &json!("completed")]
    );
    assert_eq!(outcome(0, "sim-a"), ("completed".to_owned(), 1));
    assert_eq!(
        outcome(0, "sim-c"),
        ("completed".to_owned(), 2),
        "fail_attempts = 1"
    );
    for model in ["sim-a", "sim-b", "sim-c"] {
        assert_eq!(
            outcome(1, model),
            ("failed".to_owned(), 2),
            "[fail] on {model}"
        );
    }
    assert_eq!(outcome(2, "sim-a"), ("completed".to_owned(), 1));
    assert_eq!(
        outcome(2, "sim-b"),
        ("failed".to_owned(), 2),
        "[fail:sim-b]"
    );
    let last_progress = named(&events, "progress").last().unwrap();
    assert_eq!(
        last_progress["prompts"],
        json!({ "total": 3, "completed": 2, "processing": 0, "pending": 0, "failed": 1 })
    );
}

// ---------------------------------------------------------------------------------------
// Answers and cancels of sessions herald does not run: conditional writes
// ---------------------------------------------------------------------------------------

/// Concurrent requests in each race below: enough that, without the log's own check of the
/// reserved key, several read the snapshot before the first one's event is folded.
const RACERS: usize = 12;

/// Two nodes on one private Redis: the requests below race across nodes, through awaits
/// on Redis between reading the snapshot and appending.
async fn two_nodes(redis: &common::redis::RedisServer) -> [TestServer; 2] {
    let prefix = format!("herald-test-{}", uuid::Uuid::new_v4().simple());
    let node = || {
        let (url, prefix) = (redis.url(), prefix.clone());
        spawn_app_with(move |c| {
            c.redis_url = Some(url);
            c.redis_prefix = prefix;
        })
    };
    [node().await, node().await]
}

/// A producer-fed session with one pending clarification `c1`.
async fn producer_session_with_a_question(app: &TestServer, session_id: &str) {
    let events = json!([
        { "event": "progress", "data": { "status": "PROCESSING", "progress": 10 } },
        { "event": "clarification", "data": { "clarificationId": "c1", "question": "Which year?", "status": "pending" } },
    ]);
    let (status, reply) = app.post_events(session_id, &events).await;
    assert_eq!(status, 202, "{reply}");
}

/// Sends `RACERS` copies of a POST at once, alternating between the nodes; returns the
/// replies.
async fn race(nodes: &[TestServer; 2], path: &str, body: &Value) -> Vec<(u16, Value)> {
    race_each(nodes, path, |_| body.clone()).await
}

/// [`race`], the `i`th request with `body(i)`.
async fn race_each(
    nodes: &[TestServer; 2],
    path: &str,
    body: impl Fn(usize) -> Value,
) -> Vec<(u16, Value)> {
    let bodies: Vec<Value> = (0..RACERS).map(body).collect();
    let requests = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| nodes[i % 2].post_json(path, body));
    futures_util::future::join_all(requests).await
}

/// Exactly one request won; every other one got 409 `code`.
fn assert_one_winner(replies: &[(u16, Value)], winner: u16, code: &str) {
    let won = replies.iter().filter(|(s, _)| *s == winner).count();
    assert_eq!(won, 1, "exactly one {winner}: {replies:?}");
    for (status, body) in replies.iter().filter(|(s, _)| *s != winner) {
        assert_error(*status, body, 409, code, "a losing request");
    }
}

async fn count_in_history(
    app: &TestServer,
    session_id: &str,
    wanted: impl Fn(&Value) -> bool,
) -> usize {
    let history = app.history(session_id).await.expect("history");
    history.iter().filter(|h| wanted(h)).count()
}

#[tokio::test]
async fn concurrent_answers_to_a_producer_question_succeed_once_across_nodes() {
    let redis = common::redis::RedisServer::start().await;
    let nodes = two_nodes(&redis).await;
    let id = format!("answer-race-{}", uuid::Uuid::new_v4().simple());
    producer_session_with_a_question(&nodes[0], &id).await;
    let body = |i: usize| json!({ "sessionId": id, "clarificationId": "c1", "answer": format!("{}", 2026 + i) });
    let replies = race_each(&nodes, "/api/wizard/clarifications/respond", body).await;
    assert_one_winner(&replies, 200, "CLARIFICATION_CLOSED");
    let answered = count_in_history(&nodes[1], &id, |h| {
        h["event"] == "clarification" && h["data"]["status"] == "answered"
    })
    .await;
    assert_eq!(answered, 1, "one `answered` event in the log");
    let snap = snapshot(&nodes[0], &id).await;
    assert_eq!(snap["clarifications"][0]["status"], "answered", "{snap}");
}

/// The same answer sent again (a client retrying after a lost reply or a 503) is done
/// already: 200 for every copy, one `answered` event in the log; a different one is 409.
#[tokio::test]
async fn the_same_answer_again_is_done_already_across_nodes() {
    let redis = common::redis::RedisServer::start().await;
    let nodes = two_nodes(&redis).await;
    let id = format!("answer-again-{}", uuid::Uuid::new_v4().simple());
    producer_session_with_a_question(&nodes[0], &id).await;
    let body = json!({ "sessionId": id, "clarificationId": "c1", "answer": "2026" });
    let replies = race(&nodes, "/api/wizard/clarifications/respond", &body).await;
    for (status, reply) in &replies {
        assert_eq!(*status, 200, "{reply}");
    }
    let answered = count_in_history(&nodes[1], &id, |h| {
        h["event"] == "clarification" && h["data"]["status"] == "answered"
    })
    .await;
    assert_eq!(answered, 1, "one `answered` event in the log");
    let other = json!({ "sessionId": id, "clarificationId": "c1", "answer": "2027" });
    let (status, body) = nodes[1]
        .post_json("/api/wizard/clarifications/respond", &other)
        .await;
    assert_error(
        status,
        &body,
        409,
        "CLARIFICATION_CLOSED",
        "a different answer",
    );
}

#[tokio::test]
async fn concurrent_cancels_of_a_producer_session_succeed_once_across_nodes() {
    let redis = common::redis::RedisServer::start().await;
    let nodes = two_nodes(&redis).await;
    let id = format!("cancel-race-{}", uuid::Uuid::new_v4().simple());
    producer_session_with_a_question(&nodes[0], &id).await;
    let path = format!("/api/wizard/session/{id}/cancel");
    let replies = race(&nodes, &path, &json!({})).await;
    assert_one_winner(&replies, 202, "SESSION_ENDED");
    let cancelled = count_in_history(&nodes[1], &id, |h| {
        h["event"] == "error" && h["data"]["code"] == "CANCELLED"
    })
    .await;
    assert_eq!(cancelled, 1, "one CANCELLED error in the log");
}
