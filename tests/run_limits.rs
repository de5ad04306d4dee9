//! The orchestrator's limits (SPEC §5 "Bounded everything", docs/orchestrator.md "Limits"):
//! running sessions globally and per subject, input sizes, model output size, and what
//! clients are told when a provider fails. Each test shows the documented refusal and that
//! nothing else was affected by it.
//!
//! Sessions are held running by a simulated model's clarification question (`[clarify]`),
//! which keeps the run paused until the test answers it: no timing guesses.

mod common;

use std::time::Duration;

use common::fake_llm::{FakeBehavior, FakeLlm};
use common::{Client, TEST_JWT_SECRET, TestServer, auth_under_test, sign_token, spawn_app_with};
use herald::Config;
use herald::orchestrator::config::{ModelConfig, ModelsFile, OrchestratorSettings, ProviderKind};
use serde_json::{Value, json};

const CREATE: &str = "/api/wizard/sessions";

fn model(name: &str, provider: ProviderKind, base_url: Option<String>) -> ModelConfig {
    ModelConfig {
        name: name.to_owned(),
        provider,
        base_url,
        model: None,
        api_key_env: None,
        timeout_secs: 10,
        retries: 0,
        max_concurrency: 8,
        latency_ms: 0,
        tokens_per_sec: 1000,
        fail_attempts: 0,
    }
}

fn simulated(name: &str) -> ModelConfig {
    model(name, ProviderKind::Simulated, None)
}

fn models(list: Vec<ModelConfig>, clarification_timeout_secs: u64) -> ModelsFile {
    ModelsFile {
        orchestrator: OrchestratorSettings {
            clarification_timeout_secs,
            update_interval_ms: 20,
            retry_backoff_ms: 10,
            ..OrchestratorSettings::default()
        },
        models: list,
    }
}

/// A herald with one simulated model and `tune` applied.
async fn start(tune: impl FnOnce(&mut Config)) -> TestServer {
    spawn_app_with(|c| {
        c.models = Some(models(vec![simulated("sim")], 30));
        tune(c);
    })
    .await
}

/// A token for `sub` that may create, read, answer and cancel.
fn token(sub: &str) -> String {
    let claims = json!({
        "sub": sub,
        "exp": common::unix_now() + 3600,
        "scope": "create read answer cancel",
    });
    sign_token(&claims, TEST_JWT_SECRET)
}

/// The credential requests go out with: `token`, else the harness's (when auth is under test).
fn credential(token: Option<&str>) -> Option<String> {
    token.map(str::to_owned).or_else(common::harness_token)
}

/// A request's status, `Retry-After` and JSON body.
struct Reply {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

async fn post(app: &TestServer, path: &str, body: &Value, token: Option<&str>) -> Reply {
    let mut request = reqwest::Client::new().post(app.url(path)).json(body);
    if let Some(credential) = credential(token) {
        request = request.bearer_auth(credential);
    }
    let response = request.send().await.expect("request sent");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.json().await.unwrap_or(Value::Null);
    Reply {
        status,
        retry_after,
        body,
    }
}

/// Creates a session, which must be accepted; returns its id.
async fn create(app: &TestServer, prompts: Value, token: Option<&str>) -> String {
    let reply = post(app, CREATE, &json!({ "prompts": prompts }), token).await;
    assert_eq!(reply.status, 201, "create {prompts}: {}", reply.body);
    reply.body["sessionId"].as_str().unwrap().to_owned()
}

fn assert_refused(reply: &Reply, status: u16, code: &str, flag: &str) {
    assert_eq!(reply.status, status, "{}", reply.body);
    assert_eq!(reply.body["error"]["code"], code, "{}", reply.body);
    let message = reply.body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(flag),
        "the message names {flag}: {message}"
    );
}

fn assert_too_many_runs(reply: &Reply, flag: &str) {
    assert_refused(reply, 429, "TOO_MANY_RUNS", flag);
    assert_eq!(
        reply.retry_after.as_deref(),
        Some("5"),
        "Retry-After: {}",
        reply.body
    );
}

/// The ids of the sessions herald holds.
async fn session_ids(app: &TestServer) -> Vec<String> {
    let (status, list) = app.get("/api/wizard/sessions").await;
    assert_eq!(status, 200, "{list}");
    let mut ids: Vec<String> = list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sessionId"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// A socket following the session from its first event.
async fn follow(app: &TestServer, session_id: &str, token: Option<&str>) -> Client {
    let auth = credential(token).map(|t| json!({ "token": t }));
    let mut client = Client::connect_as(app.addr, auth.as_ref(), &[])
        .await
        .unwrap_or_else(|refusal| panic!("connection refused: {refusal}"));
    let ack = client
        .call(
            "subscribe",
            &json!({ "sessionId": session_id, "lastSeq": 0 }),
        )
        .await;
    assert_eq!(ack["ok"], true, "subscribe ack: {ack}");
    client.wait_for("subscribed").await;
    client
}

/// Reads the session's events until its end (`completed`, the session's `error`, or the
/// `EXPIRED` progress), which it returns with its name; every event read is in `seen`.
async fn read_to_end(client: &mut Client, seen: &mut Vec<(String, Value)>) -> (String, Value) {
    loop {
        let (name, data) = client.next().await;
        seen.push((name.clone(), data.clone()));
        let end = match name.as_str() {
            "completed" => true,
            "error" => data.get("seq").is_some(),
            "progress" => data["status"] == "EXPIRED",
            _ => false,
        };
        if end {
            return (name, data);
        }
    }
}

/// Waits for the session's pending clarification; returns its id.
async fn pending_question(client: &mut Client) -> String {
    let event = client.wait_for("clarification").await;
    assert_eq!(event["status"], "pending", "{event}");
    event["clarificationId"].as_str().unwrap().to_owned()
}

async fn answer(
    app: &TestServer,
    session_id: &str,
    clarification_id: &str,
    text: &str,
    token: Option<&str>,
) -> Reply {
    let body =
        json!({ "sessionId": session_id, "clarificationId": clarification_id, "answer": text });
    post(app, "/api/wizard/clarifications/respond", &body, token).await
}

/// Answers the session's question and reads it to `completed`.
async fn answer_and_complete(
    app: &TestServer,
    client: &mut Client,
    session_id: &str,
    clarification_id: &str,
    token: Option<&str>,
) -> Value {
    let reply = answer(app, session_id, clarification_id, "yes", token).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let (name, data) = read_to_end(client, &mut Vec::new()).await;
    assert_eq!(name, "completed", "{data}");
    data
}

// ---------------------------------------------------------------------------------------
// Running sessions
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn over_the_run_cap_create_is_refused_and_other_runs_carry_on() {
    let app = start(|c| c.max_running_sessions = 2).await;
    let a = create(&app, json!(["[clarify] a"]), None).await;
    let b = create(&app, json!(["[clarify] b"]), None).await;
    let mut follow_a = follow(&app, &a, None).await;
    let mut follow_b = follow(&app, &b, None).await;
    let question_a = pending_question(&mut follow_a).await;
    let question_b = pending_question(&mut follow_b).await;

    let refused = post(&app, CREATE, &json!({ "prompts": ["c"] }), None).await;
    assert_too_many_runs(&refused, "--max-running-sessions");
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    assert_eq!(
        session_ids(&app).await,
        both,
        "the refused create started nothing"
    );

    // The running sessions are unaffected: A finishes; its slot is free once its end is seen.
    answer_and_complete(&app, &mut follow_a, &a, &question_a, None).await;
    let c = create(&app, json!(["c"]), None).await;
    let mut follow_c = follow(&app, &c, None).await;
    let (end, data) = read_to_end(&mut follow_c, &mut Vec::new()).await;
    assert_eq!(end, "completed", "{data}");
    answer_and_complete(&app, &mut follow_b, &b, &question_b, None).await;
}

#[tokio::test]
async fn concurrent_creates_never_overshoot_the_run_cap() {
    let app = start(|c| c.max_running_sessions = 3).await;
    let creates = (0..12).map(|i| {
        let body = json!({ "prompts": [format!("[clarify] racer {i}")] });
        let app = &app;
        async move { post(app, CREATE, &body, None).await }
    });
    let replies = futures_util::future::join_all(creates).await;
    let created = replies.iter().filter(|r| r.status == 201).count();
    for refused in replies.iter().filter(|r| r.status != 201) {
        assert_too_many_runs(refused, "--max-running-sessions");
    }
    assert_eq!(created, 3, "exactly the cap's worth of runs started");
    assert_eq!(session_ids(&app).await.len(), 3);
}

#[tokio::test]
async fn a_slot_is_given_back_however_the_run_ends() {
    let app = spawn_app_with(|c| {
        c.models = Some(models(vec![simulated("sim")], 1));
        c.max_running_sessions = 1;
    })
    .await;

    // Cancelled.
    let cancelled = create(&app, json!(["[clarify] to cancel"]), None).await;
    let mut client = follow(&app, &cancelled, None).await;
    pending_question(&mut client).await;
    let refused = post(&app, CREATE, &json!({ "prompts": ["x"] }), None).await;
    assert_too_many_runs(&refused, "--max-running-sessions");
    let path = format!("/api/wizard/session/{cancelled}/cancel");
    let reply = post(&app, &path, &json!({}), None).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let (_, end) = read_to_end(&mut client, &mut Vec::new()).await;
    assert_eq!(end["code"], "CANCELLED", "{end}");

    // Failed: every prompt failed.
    let failed = create(&app, json!(["doomed [fail]"]), None).await;
    let (_, end) = read_to_end(&mut follow(&app, &failed, None).await, &mut Vec::new()).await;
    assert_eq!(end["code"], "ALL_PROMPTS_FAILED", "{end}");

    // Expired: the question is left unanswered (clarification_timeout_secs = 1).
    let expired = create(&app, json!(["[clarify] left alone"]), None).await;
    let (name, end) = read_to_end(&mut follow(&app, &expired, None).await, &mut Vec::new()).await;
    assert_eq!(
        (name.as_str(), &end["status"]),
        ("progress", &json!("EXPIRED"))
    );

    // Completed, twice in a row.
    for prompt in ["done once", "done twice"] {
        let done = create(&app, json!([prompt]), None).await;
        let (name, end) = read_to_end(&mut follow(&app, &done, None).await, &mut Vec::new()).await;
        assert_eq!(name, "completed", "{end}");
    }
}

#[tokio::test]
async fn the_per_subject_cap_counts_each_subject_apart() {
    let app = start(|c| {
        c.jwt_secret = Some(herald::config::Secret::new(TEST_JWT_SECRET));
        c.max_running_sessions = 10;
        c.max_running_sessions_per_subject = 1;
    })
    .await;
    let (alice, bob) = (token("alice"), token("bob"));
    let first = create(&app, json!(["[clarify] alice's"]), Some(&alice)).await;
    let mut following = follow(&app, &first, Some(&alice)).await;
    let question = pending_question(&mut following).await;

    let refused = post(&app, CREATE, &json!({ "prompts": ["more"] }), Some(&alice)).await;
    assert_too_many_runs(&refused, "--max-running-sessions-per-subject");
    // Another subject is not held back by alice's runs.
    let bobs = create(&app, json!(["bob's"]), Some(&bob)).await;
    let (name, end) =
        read_to_end(&mut follow(&app, &bobs, Some(&bob)).await, &mut Vec::new()).await;
    assert_eq!(name, "completed", "{end}");

    answer_and_complete(&app, &mut following, &first, &question, Some(&alice)).await;
    create(&app, json!(["alice again"]), Some(&alice)).await;
}

#[tokio::test]
async fn with_auth_off_only_the_global_cap_applies() {
    if auth_under_test() {
        // Every caller has a subject then; the test above covers it.
        return;
    }
    let app = start(|c| {
        c.max_running_sessions = 3;
        c.max_running_sessions_per_subject = 1;
    })
    .await;
    create(&app, json!(["[clarify] one"]), None).await;
    create(&app, json!(["[clarify] two"]), None).await;
    create(&app, json!(["[clarify] three"]), None).await;
    let refused = post(&app, CREATE, &json!({ "prompts": ["four"] }), None).await;
    assert_too_many_runs(&refused, "--max-running-sessions");
}

// ---------------------------------------------------------------------------------------
// Input sizes
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn oversized_inputs_are_refused_and_nothing_is_created_or_logged() {
    let app = start(|c| {
        c.max_prompt_bytes = 16;
        c.max_prompts = 3;
        c.max_metadata_bytes = 32;
        c.max_answer_bytes = 8;
    })
    .await;
    let cases = [
        (
            json!({ "prompts": ["x", "seventeen bytes!!"] }),
            "PROMPT_TOO_LARGE",
            "--max-prompt-bytes",
        ),
        // Bytes, not characters: 9 characters, 18 bytes.
        (
            json!({ "prompts": ["ééééééééé"] }),
            "PROMPT_TOO_LARGE",
            "--max-prompt-bytes",
        ),
        (
            json!({ "prompts": ["a", "b", "c", "d"] }),
            "TOO_MANY_PROMPTS",
            "--max-prompts",
        ),
        (
            json!({ "prompts": ["a"], "metadata": { "k": "x".repeat(25) } }),
            "METADATA_TOO_LARGE",
            "--max-metadata-bytes",
        ),
    ];
    for (body, code, flag) in cases {
        let reply = post(&app, CREATE, &body, None).await;
        assert_refused(&reply, 400, code, flag);
    }
    assert_eq!(session_ids(&app).await, Vec::<String>::new());

    // Exactly at every limit: 3 prompts, one of 16 bytes, metadata of 32 bytes of JSON.
    let metadata = json!({ "k": "x".repeat(24) });
    assert_eq!(metadata.to_string().len(), 32);
    let body = json!({ "prompts": ["[clarify] abcdef", "b", "c"], "metadata": metadata });
    let reply = post(&app, CREATE, &body, None).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let id = reply.body["sessionId"].as_str().unwrap().to_owned();
    let mut client = follow(&app, &id, None).await;
    let question = pending_question(&mut client).await;

    let reply = answer(&app, &id, &question, "nine byte", None).await;
    assert_refused(&reply, 400, "ANSWER_TOO_LARGE", "--max-answer-bytes");
    let history = app.history(&id).await.unwrap();
    assert!(
        !history
            .iter()
            .any(|e| e["event"] == "clarification" && e["data"]["status"] == "answered"),
        "the refused answer was not logged"
    );
    let reply = answer(&app, &id, &question, "8 bytes!", None).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let (name, completed) = read_to_end(&mut client, &mut Vec::new()).await;
    assert_eq!(name, "completed", "{completed}");
    assert!(
        completed.to_string().contains("(clarified: 8 bytes!)"),
        "{completed}"
    );
}

// ---------------------------------------------------------------------------------------
// Model output
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_model_that_streams_without_end_is_stopped_at_the_output_limit() {
    const LIMIT: usize = 2048;
    let fake = FakeLlm::start(FakeBehavior {
        endless: true,
        token_delay: Duration::from_millis(1),
        ..FakeBehavior::default()
    })
    .await;
    let mut runaway = model("runaway", ProviderKind::Ollama, Some(fake.ollama_url()));
    runaway.retries = 2;
    let list = vec![runaway, simulated("sim")];
    let app = spawn_app_with(|c| {
        c.models = Some(models(list, 30));
        c.max_model_output_bytes = LIMIT as u64;
    })
    .await;
    let id = create(&app, json!(["Talk forever"]), None).await;
    let mut seen = Vec::new();
    let (name, completed) = read_to_end(&mut follow(&app, &id, None).await, &mut seen).await;
    assert_eq!(
        name, "completed",
        "the other model's answer stands: {completed}"
    );

    let runaway: Vec<&Value> = seen
        .iter()
        .filter(|(name, data)| name == "model_result" && data["modelName"] == "runaway")
        .map(|(_, data)| data)
        .collect();
    for event in &runaway {
        let output = event["result"].as_str().unwrap();
        assert!(output.len() <= LIMIT, "{} bytes shown", output.len());
    }
    let last = runaway.last().unwrap();
    assert_eq!(last["status"], "failed", "{last}");
    assert_eq!(
        last["error"],
        format!("the model's output exceeded {LIMIT} bytes")
    );
    let outputs = completed["result"]["prompts"][0]["outputs"]
        .as_array()
        .unwrap();
    let statuses: Vec<(&Value, &Value)> = outputs
        .iter()
        .map(|o| (&o["modelName"], &o["status"]))
        .collect();
    assert_eq!(
        statuses,
        [
            (&json!("runaway"), &json!("failed")),
            (&json!("sim"), &json!("completed"))
        ]
    );
    let stats = fake
        .wait_until("the runaway request dropped", Duration::from_secs(2), |s| {
            s.aborted == 1 && s.in_flight == 0
        })
        .await;
    assert_eq!(stats.requests.len(), 1, "a runaway model is not retried");
}

// ---------------------------------------------------------------------------------------
// Provider errors
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn provider_failures_reach_clients_as_short_stable_messages() {
    const SECRET: &str = "sk-live-7Hq2ZpSECRET";
    let leaky =
        format!("upstream https://gpu-pool.internal.example:8443/v1/chat refused api key {SECRET}");
    let down = FakeLlm::start(FakeBehavior {
        fail_first: usize::MAX,
        fail_status: Some(503),
        fail_message: Some(leaky),
        ..FakeBehavior::default()
    })
    .await;
    let garbled = FakeLlm::start(FakeBehavior {
        malformed: true,
        ..FakeBehavior::default()
    })
    .await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let list = vec![
        model("down-ollama", ProviderKind::Ollama, Some(down.ollama_url())),
        model("down-openai", ProviderKind::Openai, Some(down.openai_url())),
        model("garbled", ProviderKind::Ollama, Some(garbled.ollama_url())),
        model(
            "unreachable",
            ProviderKind::Openai,
            Some(format!("http://{closed}/v1")),
        ),
        simulated("sim"),
    ];
    let app = spawn_app_with(|c| c.models = Some(models(list, 30))).await;
    let id = create(&app, json!(["Ask everyone"]), None).await;
    let mut seen = Vec::new();
    let (name, completed) = read_to_end(&mut follow(&app, &id, None).await, &mut seen).await;
    assert_eq!(name, "completed", "{completed}");

    let expected = [
        ("down-ollama", "the provider answered with HTTP 503"),
        ("down-openai", "the provider answered with HTTP 503"),
        ("garbled", "the provider's stream was malformed"),
        ("unreachable", "the provider could not be reached"),
    ];
    for (model, message) in expected {
        let failed = seen
            .iter()
            .find(|(name, data)| {
                name == "model_result" && data["modelName"] == model && data["status"] == "failed"
            })
            .unwrap_or_else(|| panic!("{model} failed"));
        assert_eq!(failed.1["error"], message, "{model}");
    }
    assert_eq!(
        down.stats().requests.len(),
        2,
        "both wires reached the fake"
    );
    let snapshot = app.get(&format!("/api/wizard/session/{id}")).await.1;
    let history = app.history(&id).await.unwrap();
    let everything = format!("{seen:?} {snapshot} {}", Value::from(history));
    for leak in [
        SECRET,
        "internal.example",
        "http://",
        "https://",
        &closed.to_string(),
    ] {
        assert!(!everything.contains(leak), "`{leak}` reached clients");
    }
}

/// Every partial `model_result` carries the output so far, so without a size throttle a long
/// answer streamed in small pieces costs O(n²) bytes on the wire and in the log. Here a
/// 3,000-piece answer (about 20 kB) streams with no time throttle at all: per piece, that
/// would be some 7 MB of partials; herald sends a bounded multiple of the answer.
#[tokio::test]
async fn a_long_answer_streams_in_linear_bytes() {
    let fake = FakeLlm::start(FakeBehavior {
        tokens: 3000,
        ..FakeBehavior::default()
    })
    .await;
    let mut file = models(
        vec![model("long", ProviderKind::Ollama, Some(fake.ollama_url()))],
        30,
    );
    file.orchestrator.update_interval_ms = 0;
    let app = spawn_app_with(|c| c.models = Some(file)).await;
    let id = create(&app, json!(["Say a lot"]), None).await;
    let mut seen = Vec::new();
    let (name, completed) = read_to_end(&mut follow(&app, &id, None).await, &mut seen).await;
    assert_eq!(name, "completed", "{completed}");

    let results: Vec<&Value> = seen
        .iter()
        .filter(|(name, _)| name == "model_result")
        .map(|(_, data)| data)
        .collect();
    let answer = results.last().unwrap()["result"].as_str().unwrap().len();
    let partials: Vec<usize> = results
        .iter()
        .filter(|data| data["status"] == "processing")
        .map(|data| data["result"].as_str().unwrap().len())
        .collect();
    assert!(answer > 15_000, "the answer is {answer} bytes");
    assert!(
        partials.len() > 10,
        "the answer still streams: {} partials",
        partials.len()
    );
    assert!(
        partials.windows(2).all(|w| w[0] <= w[1]),
        "each partial is the output so far: {partials:?}"
    );
    let sent: usize = partials.iter().sum();
    assert!(
        sent <= 10 * answer,
        "{sent} bytes of partials for a {answer}-byte answer ({} partials)",
        partials.len()
    );
}
