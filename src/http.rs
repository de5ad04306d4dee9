//! The HTTP API (SPEC §2): producer ingest, snapshots, history, health and metrics.
//!
//! Handlers are thin: extract, validate, call the hub, map the error. Every error is
//! `{ "error": { "code", "message" } }` with a fitting status.

use std::borrow::Cow;
use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::event::{SessionStatus, validate_session_id};
use crate::hub::{Hub, HubError};
use crate::intake;
use crate::orchestrator::{CreateSession, Orchestrator, OrchestratorError};

/// Largest page of history one request returns.
pub const MAX_HISTORY_PAGE: usize = 1000;
const DEFAULT_HISTORY_PAGE: usize = 100;

#[derive(Clone)]
pub struct ApiState {
    pub hub: Hub,
    /// Development mode: the `/api/dev` routes exist.
    pub dev: bool,
    pub orchestrator: Orchestrator,
    pub max_batch: usize,
}

/// An HTTP error with its machine-readable code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: Cow<'static, str>,
    message: String,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
        }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn not_found(session_id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "SESSION_NOT_FOUND",
            format!("no session `{session_id}`"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = %self.code, message = %self.message, "request failed");
        }
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

impl From<OrchestratorError> for ApiError {
    fn from(error: OrchestratorError) -> Self {
        if let OrchestratorError::Hub(error) = error {
            return error.into();
        }
        let status = match error.code() {
            "INVALID_REQUEST" | "UNKNOWN_MODEL" => StatusCode::BAD_REQUEST,
            "SESSION_NOT_FOUND" | "CLARIFICATION_NOT_FOUND" => StatusCode::NOT_FOUND,
            "CLARIFICATION_CLOSED" | "SESSION_ENDED" => StatusCode::CONFLICT,
            "NODE_UNAVAILABLE" => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, error.code().to_owned(), error.to_string())
    }
}

impl From<HubError> for ApiError {
    fn from(error: HubError) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            error.to_string(),
        )
    }
}

pub fn router(state: ApiState, max_body: usize) -> Router {
    Router::new()
        .route("/api/sessions/{session_id}/events", post(ingest))
        .route("/api/wizard/session/{session_id}", get(snapshot))
        .route("/api/wizard/session/{session_id}/events", get(history))
        .route(
            "/api/wizard/sessions",
            get(list_sessions).post(create_session),
        )
        .route(
            "/api/wizard/session/{session_id}/cancel",
            post(cancel_session),
        )
        .route("/api/wizard/clarifications/respond", post(respond))
        .route(
            "/api/models",
            get(|State(state): State<ApiState>| async move {
                Json(json!({ "models": state.orchestrator.models() }))
            }),
        )
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/api/dev/session/{session_id}/drop-sockets",
            post(drop_sockets),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "METHOD_NOT_ALLOWED",
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

fn session_id_from_path(session_id: &str) -> Result<(), ApiError> {
    validate_session_id(session_id)
        .map_err(|e| ApiError::bad_request("INVALID_SESSION_ID", e.to_string()))
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json")) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
            "send the body as application/json",
        ))
    }
}

/// A JSON request body: the right content type, within the size limit.
fn json_body(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    require_json(headers)?;
    body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            "the request body is larger than the configured limit (--max-body)",
        ),
        status => ApiError::new(status, "INVALID_BODY", rejection.body_text()),
    })
}

/// Parses a JSON body into `T`, answering 400 `code` with the reason otherwise.
fn parse_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
    code: &'static str,
) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(code, format!("invalid request body: {e}")))?;
    from_object(value, code, "the request body")
}

/// Deserializes `T` from a JSON object. (A derived `Deserialize` would also take an array
/// of the fields in order, which no client means.)
fn from_object<T: serde::de::DeserializeOwned>(
    value: Value,
    code: &'static str,
    what: &str,
) -> Result<T, ApiError> {
    if !value.is_object() {
        return Err(ApiError::bad_request(
            code,
            format!("{what} must be a JSON object"),
        ));
    }
    serde_json::from_value(value).map_err(|e| ApiError::bad_request(code, format!("{what}: {e}")))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IngestReply {
    accepted: usize,
    duplicates: usize,
    last_seq: u64,
    seqs: Vec<Option<u64>>,
}

async fn ingest(
    State(state): State<ApiState>,
    Path(session_id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<IngestReply>), ApiError> {
    session_id_from_path(&session_id)?;
    let body = json_body(&headers, body)?;
    let drafts = intake::parse_body(&session_id, &body, state.max_batch)
        .map_err(|e| ApiError::bad_request(e.code(), e.to_string()))?;
    let published = state.hub.publish(&session_id, drafts).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(IngestReply {
            accepted: published.accepted,
            duplicates: published.duplicates,
            last_seq: published.last_seq,
            seqs: published.seqs,
        }),
    ))
}

async fn snapshot(
    State(state): State<ApiState>,
    Path(session_id): Path<String>,
) -> Result<Response, ApiError> {
    session_id_from_path(&session_id)?;
    Ok(Json(load_snapshot(&state, &session_id).await?).into_response())
}

async fn load_snapshot(
    state: &ApiState,
    session_id: &str,
) -> Result<crate::store::Snapshot, ApiError> {
    state
        .hub
        .snapshot(session_id)
        .await?
        .ok_or_else(|| ApiError::not_found(session_id))
}

async fn create_session(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Response), ApiError> {
    let body = json_body(&headers, body)?;
    let request: CreateSession = parse_json(&body, "INVALID_REQUEST")?;
    let session_id = state.orchestrator.create(request).await?;
    let snapshot = load_snapshot(&state, &session_id).await?;
    Ok((StatusCode::CREATED, Json(snapshot).into_response()))
}

async fn cancel_session(
    State(state): State<ApiState>,
    Path(session_id): Path<String>,
) -> Result<(StatusCode, Response), ApiError> {
    session_id_from_path(&session_id)?;
    state.orchestrator.cancel(&session_id).await?;
    let snapshot = load_snapshot(&state, &session_id).await?;
    Ok((StatusCode::ACCEPTED, Json(snapshot).into_response()))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RespondRequest {
    session_id: String,
    clarification_id: String,
    answer: String,
}

async fn respond(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = json_body(&headers, body)?;
    let request: RespondRequest = parse_json(&body, "INVALID_REQUEST")?;
    validate_session_id(&request.session_id)
        .map_err(|e| ApiError::bad_request("INVALID_REQUEST", format!("sessionId: {e}")))?;
    if request.answer.trim().is_empty() || request.clarification_id.is_empty() {
        return Err(ApiError::bad_request(
            "INVALID_REQUEST",
            "`clarificationId` and `answer` must not be empty",
        ));
    }
    state
        .orchestrator
        .respond(
            &request.session_id,
            &request.clarification_id,
            request.answer,
        )
        .await?;
    Ok(Json(json!({
        "ok": true,
        "sessionId": request.session_id,
        "clarificationId": request.clarification_id,
    }))
    .into_response())
}

async fn list_sessions(
    State(state): State<ApiState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let status = match query.get("status") {
        None => None,
        Some(name) => Some(SessionStatus::parse(name).ok_or_else(|| {
            ApiError::bad_request(
                "INVALID_QUERY",
                format!("unknown status `{name}`: expected ACTIVE, PROCESSING, COMPLETED, FAILED or EXPIRED"),
            )
        })?),
    };
    let sessions = state.hub.sessions(status).await?;
    Ok(Json(json!({ "sessions": sessions })).into_response())
}

/// Parses an optional non-negative integer query parameter.
fn query_number(query: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    query
        .get(name)
        .map(|raw| {
            raw.parse::<u64>().map_err(|_| {
                ApiError::bad_request(
                    "INVALID_QUERY",
                    format!("`{name}` must be a non-negative integer"),
                )
            })
        })
        .transpose()
}

async fn history(
    State(state): State<ApiState>,
    Path(session_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    session_id_from_path(&session_id)?;
    let after = query_number(&query, "after")?.unwrap_or(0);
    let limit = match query_number(&query, "limit")? {
        None => DEFAULT_HISTORY_PAGE,
        Some(0) => {
            return Err(ApiError::bad_request(
                "INVALID_QUERY",
                "`limit` must be at least 1",
            ));
        }
        Some(n) => usize::try_from(n)
            .unwrap_or(MAX_HISTORY_PAGE)
            .min(MAX_HISTORY_PAGE),
    };
    let slice = state.hub.history(&session_id, after, limit).await?;
    if slice.head.epoch.is_empty() {
        return Err(ApiError::not_found(&session_id));
    }
    let events: Vec<HistoryItem> = slice
        .events
        .iter()
        .map(|e| HistoryItem {
            seq: e.seq,
            event: e.kind.as_str(),
            data: &e.json,
        })
        .collect();
    let next_after = slice.events.last().map_or(after, |e| e.seq);
    Ok(Json(json!({
        "sessionId": session_id,
        "epoch": slice.head.epoch,
        "lastSeq": slice.head.last_seq,
        "firstSeq": slice.head.first_seq,
        // A client asking for events that are no longer retained must refetch the snapshot.
        "truncated": after + 1 < slice.head.first_seq,
        "hasMore": next_after < slice.head.last_seq,
        "events": events,
    }))
    .into_response())
}

/// Ready while the log's backend answers (always, in memory; Redis must be reachable).
async fn readyz(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    state.hub.ready().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "NOT_READY",
            format!("not ready: {e}"),
        )
    })?;
    Ok(Json(json!({ "status": "ready" })))
}

/// Development mode only: disconnects this node's sockets following a session, server
/// side, so client libraries can test their recovery.
async fn drop_sockets(
    State(state): State<ApiState>,
    Path(session_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !state.dev {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "no such route",
        ));
    }
    session_id_from_path(&session_id)?;
    let dropped = state.hub.drop_followers(&session_id).await;
    Ok(Json(json!({ "dropped": dropped })))
}

async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.hub.metrics().render(),
    )
        .into_response()
}

/// One history entry; `data` is the logged bytes, written out without re-parsing.
#[derive(Serialize)]
struct HistoryItem<'a> {
    seq: u64,
    event: &'static str,
    data: &'a serde_json::value::RawValue,
}
