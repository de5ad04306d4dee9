//! Auth (SPEC §5): refusals on every way in, ownership, API key scopes, token expiry on a
//! live socket and the origin check — each against a real herald with auth on.

mod common;

use std::time::Duration;

use common::{Client, TestServer, WAIT, progress, sign_token, spawn_app_with, unix_now};
use herald::config::Secret;
use serde_json::{Value, json};

const SECRET: &str = "auth-test-secret-auth-test-secret";
const AUDIENCE: &str = "herald";

async fn start() -> TestServer {
    spawn_app_with(|config| {
        config.dev = false;
        config.jwt_secret = Some(Secret::new(SECRET));
        config.jwt_audience = Some(AUDIENCE.into());
        config.jwt_leeway_secs = 0;
        config.api_keys = [
            "ocr:ocr-secret:publish",
            "ops:ops-secret:admin",
            "reader:reader-secret:read",
        ]
        .map(Secret::new)
        .to_vec();
    })
    .await
}

/// A token for `sub` with `extra` claims, valid for a minute.
fn token(sub: &str, extra: Value) -> String {
    let mut claims = json!({ "sub": sub, "exp": unix_now() + 60, "aud": AUDIENCE });
    claims
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    sign_token(&claims, SECRET)
}

struct Reply {
    status: u16,
    body: Value,
    challenge: Option<String>,
}

async fn call(
    app: &TestServer,
    method: reqwest::Method,
    path: &str,
    credential: Option<&str>,
    body: Option<Value>,
) -> Reply {
    let mut request = reqwest::Client::new().request(method, app.url(path));
    if let Some(credential) = credential {
        request = request.bearer_auth(credential);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().await.expect("request sent");
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.json().await.unwrap_or(Value::Null);
    Reply {
        status,
        body,
        challenge,
    }
}

async fn get(app: &TestServer, path: &str, credential: Option<&str>) -> Reply {
    call(app, reqwest::Method::GET, path, credential, None).await
}

async fn post(app: &TestServer, path: &str, credential: Option<&str>, body: Value) -> Reply {
    call(app, reqwest::Method::POST, path, credential, Some(body)).await
}

fn code(reply: &Reply) -> &str {
    reply.body["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn every_bad_credential_is_refused_with_what_is_wrong() {
    let app = start().await;
    let list = "/api/wizard/sessions";

    let none = get(&app, list, None).await;
    assert_eq!(
        (none.status, code(&none)),
        (401, "UNAUTHORIZED"),
        "{}",
        none.body
    );
    assert_eq!(none.challenge.as_deref(), Some(r#"Bearer realm="herald""#));

    let cases = [
        ("not.a.token", "INVALID_TOKEN", "malformed"),
        (
            &sign_token(
                &json!({ "sub": "a", "exp": unix_now() + 60, "aud": AUDIENCE }),
                "wrong-secret",
            ),
            "INVALID_TOKEN",
            "signature",
        ),
        (
            &sign_token(
                &json!({ "sub": "a", "exp": unix_now() - 5, "aud": AUDIENCE }),
                SECRET,
            ),
            "TOKEN_EXPIRED",
            "expired",
        ),
        (
            &sign_token(
                &json!({ "sub": "a", "exp": unix_now() + 60, "aud": "other" }),
                SECRET,
            ),
            "INVALID_TOKEN",
            "audience",
        ),
        ("no-such-api-key", "UNAUTHORIZED", "API key"),
    ];
    for (credential, wanted, words) in cases {
        let reply = get(&app, list, Some(credential)).await;
        assert_eq!(
            (reply.status, code(&reply)),
            (401, wanted),
            "{}",
            reply.body
        );
        let message = reply.body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(words),
            "`{message}` should mention {words}"
        );
        assert!(reply.challenge.unwrap().starts_with("Bearer"));
    }

    // The checks and the model list: health is open, the rest needs a credential.
    assert_eq!(get(&app, "/healthz", None).await.status, 200);
    assert_eq!(get(&app, "/readyz", None).await.status, 200);
    assert_eq!(get(&app, "/api/models", None).await.status, 401);
    assert_eq!(
        get(&app, "/api/models", Some("reader-secret")).await.status,
        200
    );

    // A credential in the query (EventSource, plain WebSocket) and as X-Api-Key.
    let alice = token("alice", json!({}));
    assert_eq!(
        get(&app, &format!("{list}?token={alice}"), None)
            .await
            .status,
        200
    );
    let keyed = reqwest::Client::new()
        .get(app.url(list))
        .header("x-api-key", "reader-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(keyed.status().as_u16(), 200);

    // /metrics is for admins.
    let metrics = "/metrics";
    assert_eq!(get(&app, metrics, None).await.status, 401);
    let reader = get(&app, metrics, Some("reader-secret")).await;
    assert_eq!((reader.status, code(&reader)), (403, "FORBIDDEN"));
    assert_eq!(get(&app, metrics, Some("ops-secret")).await.status, 200);
    assert_eq!(get(&app, metrics, Some(&alice)).await.status, 403);
}

/// Creates a session as `credential` and waits until its clarification is pending.
async fn create_pending(app: &TestServer, credential: &str) -> (String, String) {
    let created = post(
        app,
        "/api/wizard/sessions",
        Some(credential),
        json!({ "prompts": ["Plan the trip [clarify]"], "models": ["sim-fast"] }),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.body["sessionId"].as_str().unwrap().to_owned();
    let path = format!("/api/wizard/session/{id}");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let snap = get(app, &path, Some(credential)).await;
        if let Some(c) = snap.body["clarifications"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["status"] == "pending"))
        {
            return (id, c["clarificationId"].as_str().unwrap().to_owned());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no clarification: {}",
            snap.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_session_belongs_to_its_creator() {
    let app = start().await;
    let scopes = json!({ "scope": "read answer cancel create" });
    let alice = token("alice", scopes.clone());
    let bob = token("bob", scopes);
    let (id, clarification) = create_pending(&app, &alice).await;

    let snap = get(&app, &format!("/api/wizard/session/{id}"), Some(&alice)).await;
    assert_eq!(snap.body["owner"], "alice", "{}", snap.body);
    let ids = |reply: Reply| -> Vec<String> {
        reply.body["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["sessionId"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        ids(get(&app, "/api/wizard/sessions", Some(&alice)).await),
        vec![id.clone()]
    );
    assert!(ids(get(&app, "/api/wizard/sessions", Some(&bob)).await).is_empty());
    assert_eq!(
        ids(get(&app, "/api/wizard/sessions", Some("ops-secret")).await),
        vec![id.clone()],
        "an operator sees every session"
    );

    // Bob may not read, answer or cancel Alice's session.
    let respond = json!({ "sessionId": id, "clarificationId": clarification, "answer": "Lisbon" });
    for reply in [
        get(&app, &format!("/api/wizard/session/{id}"), Some(&bob)).await,
        get(
            &app,
            &format!("/api/wizard/session/{id}/events"),
            Some(&bob),
        )
        .await,
        post(
            &app,
            "/api/wizard/clarifications/respond",
            Some(&bob),
            respond.clone(),
        )
        .await,
        post(
            &app,
            &format!("/api/wizard/session/{id}/cancel"),
            Some(&bob),
            json!({}),
        )
        .await,
    ] {
        assert_eq!(
            (reply.status, code(&reply)),
            (403, "FORBIDDEN"),
            "{}",
            reply.body
        );
    }
    // An unknown session is 403 to whoever could not read it, 404 to whoever could.
    let unknown = "/api/wizard/session/no-such-session";
    assert_eq!(get(&app, unknown, Some(&bob)).await.status, 403);
    let everything = token("carol", json!({ "sessions": "*" }));
    assert_eq!(get(&app, unknown, Some(&everything)).await.status, 404);

    // Alice may; her answer resumes the run.
    let answered = post(
        &app,
        "/api/wizard/clarifications/respond",
        Some(&alice),
        respond,
    )
    .await;
    assert_eq!(answered.status, 200, "{}", answered.body);
    let history = get(
        &app,
        &format!("/api/wizard/session/{id}/events"),
        Some(&alice),
    )
    .await;
    assert_eq!(history.status, 200);

    // Creating needs `create`; the default scopes lack it.
    let plain = token("dave", json!({}));
    let refused = post(
        &app,
        "/api/wizard/sessions",
        Some(&plain),
        json!({ "prompts": ["x"] }),
    )
    .await;
    assert_eq!((refused.status, code(&refused)), (403, "FORBIDDEN"));
}

#[tokio::test]
async fn ingest_needs_publish_on_the_session() {
    let app = start().await;
    let path = "/api/sessions/job-1/events";
    let event = progress(10);

    let ocr = post(&app, path, Some("ocr-secret"), event.clone()).await;
    assert_eq!(ocr.status, 202, "{}", ocr.body);
    for credential in [
        "reader-secret".to_owned(),
        token("alice", json!({ "sessions": "*" })),
    ] {
        let reply = post(&app, path, Some(&credential), event.clone()).await;
        assert_eq!(
            (reply.status, code(&reply)),
            (403, "FORBIDDEN"),
            "{}",
            reply.body
        );
    }
    let scoped = token(
        "worker",
        json!({ "scope": "publish", "sessions": ["job-*"] }),
    );
    assert_eq!(
        post(&app, path, Some(&scoped), event.clone()).await.status,
        202
    );
    let elsewhere = post(
        &app,
        "/api/sessions/other/events",
        Some(&scoped),
        event.clone(),
    )
    .await;
    assert_eq!(elsewhere.status, 403);

    // A session herald runs: producers are refused, an operator may repair it.
    let creator = token("alice", json!({ "scope": "read create" }));
    let (id, _) = create_pending(&app, &creator).await;
    let run_path = format!("/api/sessions/{id}/events");
    let refused = post(&app, &run_path, Some("ocr-secret"), event.clone()).await;
    assert_eq!(
        (refused.status, code(&refused)),
        (409, "SESSION_RUN_BY_HERALD")
    );
    assert_eq!(
        post(&app, &run_path, Some("ops-secret"), event)
            .await
            .status,
        202
    );
}

/// Connects over a raw websocket presenting `auth`; the CONNECT_ERROR message on refusal.
async fn connect(app: &TestServer, auth: Value) -> Result<Client, String> {
    Client::connect_as(app.addr, Some(&auth), &[])
        .await
        .map_err(|refusal| refusal["message"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn the_handshake_refuses_bad_credentials_and_subscribe_checks_sessions() {
    let app = start().await;
    let refusal = |r: Result<Client, String>| r.err().expect("refused");
    assert!(refusal(connect(&app, json!({})).await).starts_with("UNAUTHORIZED: "));
    assert!(
        refusal(connect(&app, json!({ "token": "x.y.z" })).await).starts_with("INVALID_TOKEN: ")
    );
    let expired = sign_token(
        &json!({ "sub": "a", "exp": unix_now() - 1, "aud": AUDIENCE }),
        SECRET,
    );
    assert!(
        refusal(connect(&app, json!({ "token": expired })).await).starts_with("TOKEN_EXPIRED: ")
    );
    // A valid credential that may not read (a publish-only key) is no subscriber either.
    assert!(
        refusal(connect(&app, json!({ "token": "ocr-secret" })).await).starts_with("FORBIDDEN: ")
    );
    assert!(
        connect(&app, json!({ "token": "reader-secret" }))
            .await
            .is_ok()
    );

    let limited = token("alice", json!({ "sessions": ["allowed-*"] }));
    let mut client = connect(&app, json!({ "token": limited })).await.unwrap();
    client.expect("connected").await;
    let denied = client.call("subscribe", &json!("secret-session")).await;
    assert_eq!(denied["ok"], false, "{denied}");
    assert_eq!(denied["error"]["code"], "FORBIDDEN");
    let error = client.expect("error").await;
    assert_eq!(
        (error["code"].as_str(), error["sessionId"].as_str()),
        (Some("FORBIDDEN"), Some("secret-session"))
    );

    // Still connected, and still served its own sessions.
    let ok = client.call("subscribe", &json!("allowed-1")).await;
    assert_eq!(ok["ok"], true, "{ok}");
    client.expect("subscribed").await;
    let posted = post(
        &app,
        "/api/sessions/allowed-1/events",
        Some("ocr-secret"),
        progress(40),
    )
    .await;
    assert_eq!(posted.status, 202);
    let event = client.wait_for("progress").await;
    assert_eq!(event["progress"], 40);

    // A token in the handshake URL works as well (for clients that cannot set `auth`).
    let query = format!("&token={}", token("bob", json!({})));
    let mut by_query = Client::connect_with_query(app.addr, &query, None, &[])
        .await
        .expect("a token in the query is accepted");
    by_query.expect("connected").await;
}

#[tokio::test]
async fn a_live_socket_is_told_and_disconnected_when_its_token_expires() {
    let app = start().await;
    let short = sign_token(
        &json!({ "sub": "alice", "exp": unix_now() + 2, "aud": AUDIENCE, "sessions": "*" }),
        SECRET,
    );
    let mut client = connect(&app, json!({ "token": short })).await.unwrap();
    client.expect("connected").await;
    assert_eq!(client.call("subscribe", &json!("s-exp")).await["ok"], true);
    let error = client
        .wait_for_within("error", Duration::from_secs(5))
        .await;
    assert_eq!(error["code"], "TOKEN_EXPIRED", "{error}");
    tokio::time::timeout(WAIT, client.disconnected.notified())
        .await
        .expect("disconnected after expiry");
}

#[tokio::test]
async fn pages_from_other_origins_cannot_open_the_socket_transports() {
    let app = spawn_app_with(|config| {
        config.dev = false;
        config.cors_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let handshake = app.url("/socket.io/?EIO=4&transport=polling");
    let with_origin = |origin: String| {
        let handshake = handshake.clone();
        async move {
            let response = reqwest::Client::new()
                .get(handshake)
                .header("origin", origin)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (status, body) = with_origin("https://evil.example".into()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("ORIGIN_NOT_ALLOWED")),
        "{body}"
    );
    assert_eq!(with_origin("https://app.example.com".into()).await.0, 200);
    assert_eq!(
        with_origin(format!("http://{}", app.addr)).await.0,
        200,
        "same origin"
    );

    let mut request = format!("ws://{}/socket.io/?EIO=4&transport=websocket", app.addr)
        .parse::<tokio_tungstenite::tungstenite::http::Uri>()
        .map(|uri| {
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(uri)
                .unwrap()
        })
        .unwrap();
    request
        .headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    let refused = tokio_tungstenite::connect_async(request).await;
    assert!(
        refused.is_err(),
        "a websocket from another origin must not open"
    );
}

/// `[[auth.api_key_digests]]` in the configuration file: a key known only by its digest,
/// limited to its sessions, on the real binary.
#[tokio::test]
async fn api_keys_from_the_configuration_file_are_limited_to_their_sessions() {
    use sha2::Digest;
    let dir = std::env::temp_dir().join(format!("herald-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("herald.toml");
    let digest = hex::encode(sha2::Sha256::digest(b"file-key-secret"));
    std::fs::write(
        &file,
        format!(
            "[[auth.api_key_digests]]\nname = \"ocr\"\nsha256 = \"{digest}\"\nscopes = [\"publish\"]\nsessions = [\"ocr-*\"]\n"
        ),
    )
    .unwrap();
    let node = common::node::Node::start("auth-file", &["--config", file.to_str().unwrap()]).await;
    let post = |session: &str| {
        let url = node.url(&format!("/api/sessions/{session}/events"));
        async move {
            reqwest::Client::new()
                .post(url)
                .header("x-api-key", "file-key-secret")
                .json(&progress(1))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(post("ocr-1").await, 202);
    assert_eq!(post("billing-1").await, 403, "outside the key's sessions");
    let anonymous = reqwest::get(node.url("/api/wizard/sessions"))
        .await
        .unwrap();
    assert_eq!(
        anonymous.status().as_u16(),
        401,
        "a digest alone turns auth on"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The development routes are for admins even in development mode, and absent outside it.
#[tokio::test]
async fn dev_routes_need_admin_and_exist_only_in_dev_mode() {
    let route = "/api/dev/session/some-session/drop-sockets";
    let alice = token("alice", json!({ "sessions": "*" }));
    let dev = spawn_app_with(|config| {
        config.dev = true;
        config.jwt_secret = Some(Secret::new(SECRET));
        config.jwt_audience = Some(AUDIENCE.into());
        config.api_keys = ["ops:ops-secret:admin", "reader:reader-secret:read"]
            .map(Secret::new)
            .to_vec();
    })
    .await;
    assert_eq!(post(&dev, route, None, json!({})).await.status, 401);
    for credential in ["reader-secret", alice.as_str()] {
        let refused = post(&dev, route, Some(credential), json!({})).await;
        assert_eq!(
            (refused.status, code(&refused)),
            (403, "FORBIDDEN"),
            "{}",
            refused.body
        );
    }
    let dropped = post(&dev, route, Some("ops-secret"), json!({})).await;
    assert_eq!(dropped.status, 200, "{}", dropped.body);
    assert_eq!(dropped.body["dropped"], 0);

    let production = start().await;
    let absent = post(&production, route, Some("ops-secret"), json!({})).await;
    assert_eq!(absent.status, 404, "{}", absent.body);
}
