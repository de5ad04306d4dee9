//! Helpers for the tests of runs that outlive their node (SPEC §7): a configuration whose
//! models are fake providers on loopback, and the checks every resumed session must pass.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::fake_llm::FakeLlm;
use super::node::Node;

/// A model for the configuration file: `name`, served by `fake` over the OpenAI wire.
pub struct FakeModel<'a> {
    pub name: &'a str,
    pub fake: &'a FakeLlm,
}

/// Writes a configuration file into `dir` with `models` and the `[orchestrator]` settings
/// given (TOML lines); returns its path.
pub fn write_config(dir: &Path, models: &[FakeModel<'_>], orchestrator: &str) -> PathBuf {
    let mut text = format!("[orchestrator]\nmax_concurrency = 64\n{orchestrator}\n");
    for model in models {
        text.push_str(&format!(
            "[[models]]\nname = {:?}\nprovider = \"openai\"\nbase_url = {:?}\ntimeout_secs = 60\nretries = 0\nmax_concurrency = 64\n\n",
            model.name,
            model.fake.openai_url(),
        ));
    }
    let path = dir.join("herald.toml");
    std::fs::write(&path, text).expect("the config file is written");
    path
}

/// Polls `probe` every 50 ms until it gives a value; fails after `limit`.
pub async fn poll<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `session_id` has ended, as `node` sees it; returns its status.
pub async fn ended(node: &Node, session_id: &str, limit: Duration) -> String {
    poll(&format!("{session_id} to end"), limit, || async {
        let snapshot = node.snapshot(session_id).await?;
        let status = snapshot["status"].as_str()?.to_owned();
        matches!(status.as_str(), "COMPLETED" | "FAILED" | "EXPIRED").then_some(status)
    })
    .await
}

/// The `model_result` events of one unit (prompt id, model name), in order.
pub fn unit_events<'a>(events: &'a [Value], prompt: &str, model: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| {
            e["event"] == "model_result"
                && e["data"]["promptId"] == prompt
                && e["data"]["modelName"] == model
        })
        .collect()
}

/// What a finished session's history says, checked for what SPEC §7 promises: `seq` from 1
/// without a gap or a repeat, exactly one terminal `model_result` per unit, exactly one
/// `completed` or `error`, and it last among the events that matter.
pub struct RunHistory {
    /// Per (prompt id, model name): how many times the unit started (1 + the highest
    /// `attempt` seen).
    pub starts: HashMap<(String, String), u64>,
    pub terminal: Vec<Value>,
}

pub fn check_history(session_id: &str, events: &[Value]) -> RunHistory {
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "{session_id}: seq is contiguous from 1");
    let mut starts: HashMap<(String, String), u64> = HashMap::new();
    let mut finals: HashMap<(String, String), usize> = HashMap::new();
    for event in events.iter().filter(|e| e["event"] == "model_result") {
        let data = &event["data"];
        let unit = (
            data["promptId"].as_str().unwrap().to_owned(),
            data["modelName"].as_str().unwrap().to_owned(),
        );
        let attempt = data["attempt"].as_u64().unwrap_or(1);
        let seen = starts.entry(unit.clone()).or_insert(1);
        *seen = (*seen).max(attempt);
        if data["status"] != "processing" {
            *finals.entry(unit).or_default() += 1;
        }
    }
    for (unit, count) in &finals {
        assert_eq!(
            *count, 1,
            "{session_id}: one terminal model_result for {unit:?}"
        );
    }
    assert_eq!(
        finals.len(),
        starts.len(),
        "{session_id}: every unit that started ended: {finals:?}"
    );
    let terminal: Vec<Value> = events
        .iter()
        .filter(|e| e["event"] == "completed" || e["event"] == "error")
        .cloned()
        .collect();
    assert_eq!(
        terminal.len(),
        1,
        "{session_id}: one completed or error: {terminal:?}"
    );
    RunHistory { starts, terminal }
}
