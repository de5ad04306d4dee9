//! The HTTP API (SPEC §2): producer ingest, snapshots, history, health and metrics.
//!
//! Handlers are thin: extract, validate, call the hub, map the error. Every error is
//! `{ "error": { "code", "message" } }` with the status its [`ErrorCode`] names, even
//! for a path or query axum cannot read: the [`Path`] and [`Query`] extractors here
//! shadow axum's and reject with [`ApiError`]. Each error response is counted in
//! `herald_http_errors_total{code}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Bytes, HttpBody as _};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::auth::{self, Auth, AuthError, Denied, Principal, Scope};
use crate::edge::{self, DeadlineBody, Limited, RateLimits};
use crate::error::ErrorCode;
use crate::event::{SessionStatus, validate_session_id};
use crate::hub::{Hub, HubError};
use crate::intake;
use crate::log::{LogError, Writer};
use crate::metrics::Metrics;
use crate::orchestrator::{CreateSession, Orchestrator, OrchestratorError};
use crate::store::StoreError;

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
    pub max_event_bytes: u64,
    pub auth: Auth,
    /// For the ingest event rate (the request rates are the edge middleware's).
    pub limits: Arc<RateLimits>,
    /// What each SSE and plain WebSocket subscriber is held to.
    pub subscribers: crate::subscriber::Limits,
}

/// An HTTP error: its code, the code's status (unless a route knows better) and a
/// message for people.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
    /// `Retry-After`, in seconds, for a limit that will let the request through later.
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: code.http_status(),
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error with a `Retry-After` header (seconds).
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// The same error with another status, for a route whose answer the code alone does
    /// not decide (a body reader's own rejection).
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    fn not_found(session_id: &str) -> Self {
        Self::new(
            ErrorCode::SessionNotFound,
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
        let mut response = (self.status, Json(body)).into_response();
        if let Some(challenge) = challenge(self.code) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        // For `count_errors`, which sees only the response.
        response.extensions_mut().insert(self.code);
        response
    }
}

/// RFC 6750's challenge for a 401: which scheme to use, and whether the token was bad.
fn challenge(code: ErrorCode) -> Option<&'static str> {
    match code {
        ErrorCode::Unauthorized => Some(r#"Bearer realm="herald""#),
        ErrorCode::InvalidToken | ErrorCode::TokenExpired => {
            Some(r#"Bearer realm="herald", error="invalid_token""#)
        }
        _ => None,
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        Self::new(error.code(), error.detail())
    }
}

impl From<Denied> for ApiError {
    fn from(denied: Denied) -> Self {
        match denied {
            Denied::Forbidden(message) => Self::new(ErrorCode::Forbidden, message),
            Denied::Backend(error) => error.into(),
        }
    }
}

/// The authenticated caller of a request (anonymous while auth is off). Every route but
/// the health checks takes one, so a route cannot forget to authenticate.
pub struct Caller(pub Principal);

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        // The edge middleware authenticated already when it limited this credential.
        if let Some(Authenticated(principal)) = parts.extensions.remove() {
            return Ok(Caller(principal));
        }
        let credential = auth::credential(&parts.headers, parts.uri.query());
        Ok(Caller(state.auth.authenticate(credential.as_deref())?))
    }
}

impl From<OrchestratorError> for ApiError {
    fn from(error: OrchestratorError) -> Self {
        match error {
            OrchestratorError::Hub(error) => error.into(),
            error => {
                let api = Self::new(error.code(), error.to_string());
                match error.retry_after() {
                    Some(secs) => api.with_retry_after(secs),
                    None => api,
                }
            }
        }
    }
}

impl From<intake::IntakeError> for ApiError {
    fn from(error: intake::IntakeError) -> Self {
        match error {
            // The backend's own text is for the log, not for clients.
            intake::IntakeError::Backend(detail) => {
                tracing::warn!(detail, "the backend failed a request");
                Self::new(ErrorCode::BackendUnavailable, BACKEND_UNAVAILABLE_MESSAGE)
            }
            error => Self::new(error.code(), error.to_string()),
        }
    }
}

/// `Retry-After` for a new session while herald holds `--max-sessions`: sessions leave by
/// the sweep, which runs about this often.
const TOO_MANY_SESSIONS_RETRY_SECS: u64 = 60;

/// What a client is told when the session backend fails a request.
const BACKEND_UNAVAILABLE_MESSAGE: &str = "the session backend is unavailable; retry (with the same idempotency keys, nothing is logged twice)";

impl From<HubError> for ApiError {
    fn from(error: HubError) -> Self {
        match error {
            // The backend's own text (addresses, commands) is for the log, not for clients.
            HubError::Log(LogError::Backend(detail))
            | HubError::Store(StoreError::Backend(detail)) => {
                tracing::warn!(detail, "the backend failed a request");
                Self::new(ErrorCode::BackendUnavailable, BACKEND_UNAVAILABLE_MESSAGE)
            }
            HubError::Log(error @ LogError::TooManySessions { .. }) => {
                Self::new(ErrorCode::TooManySessions, error.to_string())
                    .with_retry_after(TOO_MANY_SESSIONS_RETRY_SECS)
            }
            HubError::Log(error @ LogError::SessionEnded(_)) => {
                Self::new(ErrorCode::SessionEnded, error.to_string())
            }
            error => Self::new(ErrorCode::Internal, error.to_string()),
        }
    }
}

/// axum's `Path`, rejecting with the JSON error shape (`INVALID_PATH`, 400) instead of
/// plain text: a segment that is not UTF-8 once percent-decoded, or of the wrong type.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        let error = ApiError::new(ErrorCode::InvalidPath, rejection.body_text());
        match rejection.status() {
            // A route declaring parameters its path lacks: herald's bug, not the client's.
            status if status.is_server_error() => ApiError::new(ErrorCode::Internal, error.message),
            _ => error,
        }
    }
}

/// axum's `Query`, rejecting with the JSON error shape (`INVALID_QUERY`, 400).
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::new(ErrorCode::InvalidQuery, rejection.body_text())
    }
}

/// Counts every error response by its code. Errors are [`ApiError`]s, which put their
/// code in the response's extensions; anything else that fails is counted as `INTERNAL`
/// (none should: every extractor and fallback here answers with an `ApiError`).
async fn count_errors(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if status.is_client_error() || status.is_server_error() {
        let code = response
            .extensions()
            .get::<ErrorCode>()
            .copied()
            .unwrap_or(ErrorCode::Internal);
        state.hub.metrics().http_errors.inc(code);
    }
    response
}

pub fn router(state: ApiState, max_body: usize) -> Router {
    Router::new()
        .route("/api/sessions/{session_id}/events", post(ingest))
        .route("/api/wizard/session/{session_id}", get(snapshot))
        .route("/api/wizard/session/{session_id}/events", get(history))
        .route(
            "/api/wizard/session/{session_id}/stream",
            get(crate::sse::session_stream),
        )
        .route(
            "/api/wizard/sessions/stream",
            get(crate::sse::sessions_stream),
        )
        .route("/ws", get(crate::ws::upgrade))
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
            get(|State(state): State<ApiState>, _: Caller| async move {
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
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                ErrorCode::MethodNotAllowed,
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), count_errors))
        .with_state(state)
}

pub(crate) fn session_id_from_path(session_id: &str) -> Result<(), ApiError> {
    validate_session_id(session_id)
        .map_err(|e| ApiError::new(ErrorCode::InvalidSessionId, e.to_string()))
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
            ErrorCode::UnsupportedMediaType,
            "send the body as application/json",
        ))
    }
}

/// A JSON request body: the right content type, within the size limit, in time.
fn json_body(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    require_json(headers)?;
    body.map_err(|rejection| match rejection.status() {
        _ if edge::is_body_timeout(&rejection) => body_timeout(),
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            ErrorCode::PayloadTooLarge,
            "the request body is larger than the configured limit (--max-body)",
        ),
        status => ApiError::new(ErrorCode::InvalidBody, rejection.body_text()).with_status(status),
    })
}

/// Parses a JSON body into `T`, answering 400 `code` with the reason otherwise.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], code: ErrorCode) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(code, format!("invalid request body: {e}")))?;
    from_object(value, code, "the request body")
}

/// Deserializes `T` from a JSON object. (A derived `Deserialize` would also take an array
/// of the fields in order, which no client means.)
fn from_object<T: serde::de::DeserializeOwned>(
    value: Value,
    code: ErrorCode,
    what: &str,
) -> Result<T, ApiError> {
    if !value.is_object() {
        return Err(ApiError::new(code, format!("{what} must be a JSON object")));
    }
    serde_json::from_value(value).map_err(|e| ApiError::new(code, format!("{what}: {e}")))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IngestReply {
    accepted: usize,
    duplicates: usize,
    last_seq: u64,
    seqs: Vec<Option<u64>>,
}

/// `POST /api/sessions/{id}/events?reopen=true`: a producer's events for an ended session
/// are taken and the session is active again (SPEC §5: terminal sessions stay terminal
/// unless a reopen is asked for).
#[derive(Debug, Default, Deserialize)]
struct IngestQuery {
    #[serde(default)]
    reopen: bool,
}

async fn ingest(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    Path(session_id): Path<String>,
    Query(query): Query<IngestQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<IngestReply>), ApiError> {
    session_id_from_path(&session_id)?;
    caller
        .authorize(&state.hub, Scope::Publish, &session_id)
        .await?;
    let body = json_body(&headers, body)?;
    let drafts = intake::parse_body(&session_id, &body, state.max_batch)?;
    intake::check_event_sizes(&drafts, state.max_event_bytes)?;
    if let Some(subject) = caller.subject() {
        state
            .limits
            .check_ingest(subject, drafts.len())
            .map_err(rate_limited)?;
    }
    intake::admit(&state.orchestrator, &session_id, &caller).await?;
    let writer = if query.reopen {
        Writer::Reopening
    } else {
        Writer::Producer
    };
    let published = state.hub.publish_as(&session_id, drafts, writer).await?;
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
    Caller(caller): Caller,
    Path(session_id): Path<String>,
) -> Result<Response, ApiError> {
    session_id_from_path(&session_id)?;
    caller
        .authorize(&state.hub, Scope::Read, &session_id)
        .await?;
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
    Caller(caller): Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Response), ApiError> {
    caller.require(Scope::Create)?;
    let body = json_body(&headers, body)?;
    let request: CreateSession = parse_json(&body, ErrorCode::InvalidRequest)?;
    let owner = caller.subject().map(str::to_owned);
    let session_id = state.orchestrator.create(request, owner).await?;
    let snapshot = load_snapshot(&state, &session_id).await?;
    Ok((StatusCode::CREATED, Json(snapshot).into_response()))
}

async fn cancel_session(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    Path(session_id): Path<String>,
) -> Result<(StatusCode, Response), ApiError> {
    session_id_from_path(&session_id)?;
    caller
        .authorize(&state.hub, Scope::Cancel, &session_id)
        .await?;
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
    Caller(caller): Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Scope::Answer)?;
    let body = json_body(&headers, body)?;
    let request: RespondRequest = parse_json(&body, ErrorCode::InvalidRequest)?;
    validate_session_id(&request.session_id)
        .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("sessionId: {e}")))?;
    caller
        .authorize(&state.hub, Scope::Answer, &request.session_id)
        .await?;
    if request.answer.trim().is_empty() || request.clarification_id.is_empty() {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
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

/// `GET /api/wizard/sessions?status=S`.
#[derive(Deserialize)]
struct ListQuery {
    status: Option<SessionStatus>,
}

async fn list_sessions(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let mut sessions = state.hub.sessions(query.status).await?;
    sessions.retain(|s| caller.may_read(&s.session_id, s.owner.as_deref()));
    Ok(Json(json!({ "sessions": sessions })).into_response())
}

/// `GET /api/wizard/session/{id}/events?after=N&limit=M`.
#[derive(Deserialize)]
struct HistoryQuery {
    #[serde(default)]
    after: u64,
    limit: Option<u64>,
}

impl HistoryQuery {
    /// The page size asked for, capped at [`MAX_HISTORY_PAGE`].
    fn page(&self) -> Result<usize, ApiError> {
        match self.limit {
            None => Ok(DEFAULT_HISTORY_PAGE),
            Some(0) => Err(ApiError::new(
                ErrorCode::InvalidQuery,
                "`limit` must be at least 1",
            )),
            Some(n) => Ok(usize::try_from(n)
                .unwrap_or(MAX_HISTORY_PAGE)
                .min(MAX_HISTORY_PAGE)),
        }
    }
}

/// Whether events the client asked for (those after `after`) are no longer retained, so
/// it must refetch the snapshot. Nothing follows `u64::MAX`, so nothing is missing then.
fn is_truncated(after: u64, first_retained: u64) -> bool {
    after
        .checked_add(1)
        .is_some_and(|next| next < first_retained)
}

async fn history(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    Path(session_id): Path<String>,
    Query(query): Query<HistoryQuery>,
) -> Result<Response, ApiError> {
    session_id_from_path(&session_id)?;
    caller
        .authorize(&state.hub, Scope::Read, &session_id)
        .await?;
    let (after, limit) = (query.after, query.page()?);
    let slice = state.hub.history(&session_id, after, limit).await?;
    let Some(epoch) = &slice.head.epoch else {
        return Err(ApiError::not_found(&session_id));
    };
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
        "epoch": epoch,
        "lastSeq": slice.head.last_seq,
        "firstSeq": slice.head.first_seq,
        "truncated": is_truncated(after, slice.head.first_seq),
        "hasMore": next_after < slice.head.last_seq,
        "events": events,
    }))
    .into_response())
}

/// Ready while the log's backend answers (always, in memory; Redis must be reachable).
async fn readyz(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    state
        .hub
        .ready()
        .await
        .map_err(|e| ApiError::new(ErrorCode::NotReady, format!("not ready: {e}")))?;
    Ok(Json(json!({ "status": "ready" })))
}

/// Development mode only: disconnects this node's sockets following a session, server
/// side, so client libraries can test their recovery.
async fn drop_sockets(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    Path(session_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !state.dev {
        return Err(ApiError::new(ErrorCode::NotFound, "no such route"));
    }
    caller.require(Scope::Admin)?;
    session_id_from_path(&session_id)?;
    let dropped = state.hub.drop_followers(&session_id).await;
    Ok(Json(json!({ "dropped": dropped })))
}

async fn metrics(
    State(state): State<ApiState>,
    Caller(caller): Caller,
) -> Result<Response, ApiError> {
    caller.require(Scope::Admin)?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.hub.metrics().render(),
    )
        .into_response())
}

/// One history entry; `data` is the logged bytes, written out without re-parsing.
#[derive(Serialize)]
struct HistoryItem<'a> {
    seq: u64,
    event: &'static str,
    data: &'a serde_json::value::RawValue,
}

/// What the edge middleware ([`edge_guard`]) needs: the rate limiters, the credential
/// check, the body deadline, and the metrics its own answers are counted in.
#[derive(Clone)]
pub struct EdgeGuard {
    pub limits: Arc<RateLimits>,
    pub auth: Auth,
    pub body_timeout: Duration,
    pub metrics: Arc<Metrics>,
}

/// A principal the edge middleware authenticated, for [`Caller`] to take over.
#[derive(Clone)]
struct Authenticated(Principal);

/// Requests that no limit applies to: health checks must answer a prober under any load.
fn is_exempt(path: &str) -> bool {
    path == "/healthz" || path == "/readyz"
}

/// A request of an Engine.IO session that exists already (a poll or a polling POST): it
/// was counted when its handshake was, and a socket's own limits apply to what it sends.
fn is_established_socket(request: &Request) -> bool {
    request.uri().path().starts_with("/socket.io")
        && request.uri().query().is_some_and(|q| q.contains("sid="))
}

/// The edge of every request (SPEC §5): the per-address limit (before any credential is
/// verified, so a flood costs no signature checks), the per-credential limit, and the
/// body deadline. Over a limit: 429 `RATE_LIMITED` with `Retry-After`. A body not received
/// in time: 408 `REQUEST_TIMEOUT` and the connection is closed.
pub async fn edge_guard(
    State(guard): State<EdgeGuard>,
    mut request: Request,
    next: Next,
) -> Response {
    if is_exempt(request.uri().path()) {
        return next.run(request).await;
    }
    if !is_established_socket(&request)
        && let Err(limited) = check_rates(&guard, &mut request)
    {
        return guard.answer(rate_limited(limited));
    }
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let (request, expired) = {
        let (parts, body) = request.into_parts();
        let (body, expired) = DeadlineBody::new(body, guard.body_timeout);
        (
            Request::from_parts(parts, axum::body::Body::new(body)),
            expired,
        )
    };
    let response = next.run(request).await;
    if !expired.load(Ordering::Relaxed) {
        return response;
    }
    // The handler may have answered the failed read its own way (engineioxide does).
    let mut response = if response.status() == StatusCode::REQUEST_TIMEOUT {
        response
    } else {
        guard.answer(body_timeout())
    };
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

impl EdgeGuard {
    /// An error answered here, outside the router, counted as the router counts its own.
    fn answer(&self, error: ApiError) -> Response {
        self.metrics.http_errors.inc(error.code());
        error.into_response()
    }
}

/// Counts the request against its address and, when it presents a valid credential,
/// against the credential; the principal is kept for the route.
fn check_rates(guard: &EdgeGuard, request: &mut Request) -> Result<(), Limited> {
    if let Some(ConnectInfo(peer)) = request.extensions().get::<ConnectInfo<SocketAddr>>() {
        guard.limits.check_address(peer.ip())?;
    }
    if !guard.limits.limits_credentials() || !guard.auth.is_enabled() {
        return Ok(());
    }
    let credential = auth::credential(request.headers(), request.uri().query());
    let Some(credential) = credential else {
        return Ok(());
    };
    // A credential that is not accepted is refused by the route; only the address counts.
    let Ok(principal) = guard.auth.authenticate(Some(&credential)) else {
        return Ok(());
    };
    if let Some(subject) = principal.subject() {
        guard.limits.check_credential(subject)?;
    }
    // Not for a handshake: engineioxide keeps its request's parts as long as the socket lives.
    if !request.uri().path().starts_with("/socket.io") {
        request.extensions_mut().insert(Authenticated(principal));
    }
    Ok(())
}

fn rate_limited(limited: Limited) -> ApiError {
    let (what, retry) = match limited {
        Limited::Address(retry) => ("too many requests from this address", retry),
        Limited::Credential(retry) => ("too many requests with this credential", retry),
        Limited::Events(retry) => ("too many events published with this credential", retry),
    };
    ApiError::new(
        ErrorCode::RateLimited,
        format!("{what}; retry after {} s", retry.0),
    )
    .with_retry_after(retry.0)
}

fn body_timeout() -> ApiError {
    ApiError::new(
        ErrorCode::RequestTimeout,
        "the request body was not received in time (--body-timeout-ms); the connection is closed",
    )
}
