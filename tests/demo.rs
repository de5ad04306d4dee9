//! `herald demo` and the example configuration, run for real so neither rots.

mod common;

use herald::config::Secret;
use herald::demo::{DemoArgs, run};
use herald::orchestrator::config::ModelsFile;

/// The auth-on path of the quick start: `herald token` mints, `herald demo --token` uses it.
#[tokio::test]
async fn demo_runs_with_auth_on_given_a_token_from_herald_token() {
    let secret = "demo-test-secret-0123456789";
    let app = common::spawn_app_with(|c| c.jwt_secret = Some(Secret::new(secret))).await;
    let minted = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["token", "--sub", "demo", "--scope", "read answer create"])
        .env("HERALD_JWT_SECRET", secret)
        .output()
        .expect("herald token runs");
    assert!(minted.status.success(), "{minted:?}");
    let token = String::from_utf8(minted.stdout).unwrap().trim().to_owned();
    let args = |token: Option<String>| DemoArgs {
        url: app.url(""),
        prompts: vec!["Write about [clarify] the sea.".into()],
        models: vec!["sim-fast".into()],
        strategy: "all".into(),
        answer: "waves".into(),
        timeout_secs: 30,
        token: token.map(Secret::new),
    };
    let refused = run(args(None), &mut Vec::new()).await.unwrap_err();
    assert!(refused.to_string().contains("401"), "{refused}");
    let finished = run(args(Some(token)), &mut Vec::new())
        .await
        .expect("the demo completes with a token");
    assert!(finished.events > 0);
}

#[tokio::test]
async fn demo_follows_a_session_answers_its_clarification_and_completes() {
    let app = common::spawn_app().await;
    let args = DemoArgs {
        url: app.url(""),
        prompts: vec![
            "Name a colour.".into(),
            "Write about [clarify] the sea.".into(),
        ],
        models: vec!["sim-fast".into()],
        strategy: "all".into(),
        answer: "waves".into(),
        timeout_secs: 30,
        token: common::harness_token().map(Secret::new),
    };
    let mut out = Vec::new();
    let finished = run(args, &mut out)
        .await
        .expect("the demo session completes");
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("clarification pending"), "{out}");
    assert!(out.contains("answered: waves"), "{out}");
    assert!(out.trim_end().ends_with("the session completed"), "{out}");
    let (_, snapshot) = app
        .get(&format!("/api/wizard/session/{}", finished.session_id))
        .await;
    assert_eq!(snapshot["status"], "COMPLETED");
    assert_eq!(snapshot["lastSeq"], finished.events);
    let clarified = &snapshot["result"]["prompts"][1]["outputs"][0]["output"];
    assert!(
        clarified.as_str().unwrap().ends_with("(clarified: waves)"),
        "{clarified}"
    );
}

#[tokio::test]
async fn demo_reports_an_unreachable_server() {
    let args = DemoArgs {
        url: "http://127.0.0.1:9".into(),
        prompts: vec!["x".into()],
        models: vec![],
        strategy: "all".into(),
        answer: "y".into(),
        timeout_secs: 5,
        token: None,
    };
    let error = run(args, &mut Vec::new()).await.unwrap_err();
    assert!(error.to_string().contains("cannot reach herald"), "{error}");
}

#[test]
fn the_example_configuration_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/herald.toml");
    let file = ModelsFile::load(Some(&path)).expect("examples/herald.toml is valid");
    let names: Vec<&str> = file.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        ["llama3.1:8b", "gpt-4o-mini", "qwen2.5-7b-local", "sim-fast"]
    );
    assert_eq!(file.orchestrator.clarification_timeout_secs, 300);
}
