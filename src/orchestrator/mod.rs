//! The multi-model orchestrator (SPEC §3): creates sessions, runs their prompts across
//! models, and routes cancels and clarification answers to the run they belong to.
//!
//! Each running session is one actor task ([`run`]) that owns all of the run's state and
//! is the only publisher of its events, so counts, progress and event order are consistent
//! by construction; provider calls run in worker tasks that report to it. Everything a run
//! does goes through [`Hub::publish`], so replay, snapshot and history work for
//! orchestrated sessions exactly as for ingested ones.
//!
//! A session that does not run on any node (producer-fed, or after its run) is answered
//! and cancelled in its log. Reading the snapshot first gives the precise refusal (404,
//! 409), but two requests may both read it before either writes, on one node or on
//! several: the write itself is conditional, through a reserved idempotency key
//! ([`keys`]) that the log accepts once, atomically (the Redis append is one Lua script,
//! the memory log holds a mutex). The request whose event the log reports as a duplicate
//! gets 409.

mod checkpoint;
pub mod config;
mod limits;
mod run;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::task::TaskTracker;

use crate::cluster::{Cluster, CommandHandler, RemoteCommand, RemoteReply};
use crate::error::ErrorCode;
use crate::event::{
    ClarificationEvent, ClarificationStatus, ErrorEvent, EventDraft, Payload, validate_session_id,
};
use crate::hub::{Hub, HubError};
use crate::intake::{IntakeError, Runs};
use crate::log::LogError;
use crate::providers::{self, Provider};
use crate::store::Origin;
use checkpoint::Checkpoint;
use config::{ModelConfig, ModelsFile, OrchestratorSettings};
use limits::{Admission, Cap};
pub use limits::{RETRY_AFTER_SECS, RunLimits};
use run::{Command, Run};

/// Commands and worker reports queued per running session.
const RUN_QUEUE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    #[error("{0}")]
    Invalid(String),
    #[error("unknown model `{0}`")]
    UnknownModel(String),
    #[error("no session `{0}`")]
    SessionNotFound(String),
    #[error("no clarification `{0}` in this session")]
    ClarificationNotFound(String),
    #[error("clarification `{0}` is already {1}")]
    ClarificationClosed(String, ClarificationStatus),
    /// A question left pending in a session that has ended can never be acted on.
    #[error("clarification `{0}` is already closed: the session has ended")]
    ClarificationOfEndedSession(String),
    #[error("session `{0}` has already ended")]
    SessionEnded(String),
    #[error(transparent)]
    Hub(#[from] HubError),
    /// Refused by the node that runs the session.
    #[error("{message}")]
    Remote { code: ErrorCode, message: String },
    #[error("the node running the session is unreachable: {0}")]
    NodeUnavailable(String),
    #[error("{}", too_many_runs(*.0))]
    TooManyRuns(Cap),
    #[error("prompt {index} is larger than {limit} bytes (--max-prompt-bytes)")]
    PromptTooLarge { index: usize, limit: usize },
    #[error("a session holds at most {0} prompts (--max-prompts)")]
    TooManyPrompts(usize),
    #[error("`metadata` is larger than {0} bytes of JSON (--max-metadata-bytes)")]
    MetadataTooLarge(usize),
    #[error("the answer is larger than {0} bytes (--max-answer-bytes)")]
    AnswerTooLarge(usize),
    /// The session's run cannot log right now (its backend is unreachable).
    #[error(
        "the session's backend is unreachable; retry (an answer or cancel that did go through is then refused as already done)"
    )]
    BackendUnavailable,
}

fn too_many_runs(cap: Cap) -> String {
    match cap {
        Cap::Global(n) => format!(
            "{n} orchestrated sessions are running on this node, the most it runs at once \
             (--max-running-sessions); retry in {RETRY_AFTER_SECS} s"
        ),
        Cap::PerSubject(n) => format!(
            "you have {n} sessions running on this node, the most one caller may \
             (--max-running-sessions-per-subject); retry in {RETRY_AFTER_SECS} s"
        ),
    }
}

impl OrchestratorError {
    /// The machine-readable code clients match on; it also decides the HTTP status.
    pub fn code(&self) -> ErrorCode {
        match self {
            OrchestratorError::Invalid(_) => ErrorCode::InvalidRequest,
            OrchestratorError::UnknownModel(_) => ErrorCode::UnknownModel,
            OrchestratorError::SessionNotFound(_) => ErrorCode::SessionNotFound,
            OrchestratorError::ClarificationNotFound(_) => ErrorCode::ClarificationNotFound,
            OrchestratorError::ClarificationClosed(..)
            | OrchestratorError::ClarificationOfEndedSession(_) => ErrorCode::ClarificationClosed,
            OrchestratorError::SessionEnded(_) => ErrorCode::SessionEnded,
            OrchestratorError::Hub(HubError::Log(LogError::TooManySessions { .. })) => {
                ErrorCode::TooManySessions
            }
            OrchestratorError::Hub(_) => ErrorCode::Internal,
            OrchestratorError::Remote { code, .. } => *code,
            OrchestratorError::NodeUnavailable(_) => ErrorCode::NodeUnavailable,
            OrchestratorError::TooManyRuns(_) => ErrorCode::TooManyRuns,
            OrchestratorError::PromptTooLarge { .. } => ErrorCode::PromptTooLarge,
            OrchestratorError::TooManyPrompts(_) => ErrorCode::TooManyPrompts,
            OrchestratorError::MetadataTooLarge(_) => ErrorCode::MetadataTooLarge,
            OrchestratorError::AnswerTooLarge(_) => ErrorCode::AnswerTooLarge,
            OrchestratorError::BackendUnavailable => ErrorCode::BackendUnavailable,
        }
    }

    /// Seconds after which the same request may succeed (`Retry-After`), for a limit.
    pub fn retry_after(&self) -> Option<u64> {
        matches!(self, OrchestratorError::TooManyRuns(_)).then_some(RETRY_AFTER_SECS)
    }
}

/// The idempotency keys herald writes itself. They live in the `herald:` namespace, which
/// producers may not use (SPEC §5 "Reserved keys"), so no producer event can collide with
/// them or pre-empt them.
pub mod keys {
    /// The prefix of every reserved key (producer ingest refuses keys that start with it).
    pub use crate::intake::RESERVED_KEY_PREFIX as RESERVED_PREFIX;
    /// The error event that cancels a session not running anywhere: a session is
    /// cancelled at most once.
    pub const CANCEL: &str = "herald:cancel";
    /// The error event that ends a session whose node was lost.
    pub const LOST: &str = "herald:lost";

    /// The `n`th event (from 1) a run's `generation` logs, so a retried publish is not
    /// logged twice. A resumed run starts a new generation (see `checkpoint`).
    pub fn run_event(generation: u32, n: u64) -> String {
        format!("herald:run:{generation}:{n}")
    }

    /// The `answered` event of a clarification answered in the log: it is answered once.
    pub fn answer(clarification_id: &str) -> String {
        format!("herald:answer:{clarification_id}")
    }
}

/// A configured model, ready to call.
pub(crate) struct Model {
    pub config: ModelConfig,
    pub provider: Arc<dyn Provider>,
    /// Calls in flight to this model, across sessions.
    pub limit: Arc<Semaphore>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    All,
    Fallback,
}

/// A prompt as a client may send it: `"text"` or `{ id?, text }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Full { id: Option<String>, text: String },
}

/// `POST /api/wizard/sessions`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSession {
    pub prompts: Vec<PromptInput>,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub strategy: Option<String>,
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
}

#[derive(Debug, Clone)]
pub(crate) struct Prompt {
    pub id: String,
    pub text: String,
}

/// What `GET /api/models` lists.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelInfo {
    pub name: String,
    pub provider: &'static str,
    pub max_concurrency: usize,
    pub retries: u32,
    pub timeout_secs: u64,
}

/// How long an answer or cancel waits for the run that handles it. The run answers at once
/// unless it is waiting for its log, so only an outage gets near this.
const ASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A running session, as the API reaches it.
#[derive(Clone)]
struct RunHandle {
    tx: mpsc::Sender<Command>,
    /// The run's own flag: set while its log is failing.
    log_failing: Arc<AtomicBool>,
}

#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

struct Inner {
    hub: Hub,
    /// The other nodes, in cluster mode.
    cluster: Option<Cluster>,
    models: Vec<Arc<Model>>,
    settings: OrchestratorSettings,
    global: Arc<Semaphore>,
    limits: RunLimits,
    /// Slots for running sessions, within `limits`' caps.
    admission: Admission,
    /// Running sessions. A std mutex: lookups only, never across an await.
    running: Mutex<HashMap<String, RunHandle>>,
    /// Every run's task, so shutdown can wait for them to end.
    runs: TaskTracker,
    /// Set at shutdown: no new run starts.
    stopping: AtomicBool,
}

impl Orchestrator {
    pub fn new(hub: Hub, file: ModelsFile, cluster: Option<Cluster>, limits: RunLimits) -> Self {
        let http = reqwest::Client::builder()
            .build()
            .expect("an HTTP client with default settings builds");
        let models = file
            .models
            .into_iter()
            .map(|config| {
                Arc::new(Model {
                    provider: providers::build(&config, &http),
                    limit: Arc::new(Semaphore::new(config.max_concurrency)),
                    config,
                })
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                hub,
                cluster,
                models,
                global: Arc::new(Semaphore::new(file.orchestrator.max_concurrency)),
                settings: file.orchestrator,
                limits,
                admission: Admission::new(limits),
                running: Mutex::default(),
                runs: TaskTracker::new(),
                stopping: AtomicBool::new(false),
            }),
        }
    }

    pub fn models(&self) -> Vec<ModelInfo> {
        self.inner
            .models
            .iter()
            .map(|m| ModelInfo {
                name: m.config.name.clone(),
                provider: m.config.provider.as_str(),
                max_concurrency: m.config.max_concurrency,
                retries: m.config.retries,
                timeout_secs: m.config.timeout_secs,
            })
            .collect()
    }

    /// Validates the request, takes a running slot (global and, for `owner`, per subject),
    /// logs the session's first `progress` and starts the run in the background. Returns the
    /// new session's id. The session is owned by `owner` (a token's subject) when given.
    pub async fn create(
        &self,
        request: CreateSession,
        owner: Option<String>,
    ) -> Result<String, OrchestratorError> {
        if self.inner.stopping.load(Ordering::Acquire) {
            return Err(OrchestratorError::NodeUnavailable(
                "this node is shutting down; start the session on another".into(),
            ));
        }
        let limits = &self.inner.limits;
        let strategy = parse_strategy(request.strategy.as_deref())?;
        let prompts = parse_prompts(request.prompts, limits)?;
        if let Some(metadata) = &request.metadata
            && limits::json_len(metadata) > limits.max_metadata_bytes
        {
            return Err(OrchestratorError::MetadataTooLarge(
                limits.max_metadata_bytes,
            ));
        }
        let models = self.select_models(request.models)?;
        // Taken last, so a refused request holds no slot; given back if anything below fails.
        let slot = self
            .inner
            .admission
            .admit(owner.as_deref())
            .map_err(OrchestratorError::TooManyRuns)?;
        let session_id = uuid::Uuid::new_v4().to_string();
        // Claimed before anything is saved, so no other node takes the run for an orphan.
        if let Some(cluster) = &self.inner.cluster {
            cluster.claim(&session_id).await.map_err(|error| {
                tracing::warn!(%error, "could not record this node as a new session's runner");
                OrchestratorError::BackendUnavailable
            })?;
        }
        let mut run = Run::new(
            session_id.clone(),
            self.inner.hub.clone(),
            strategy,
            prompts,
            models,
            self.inner.settings.clone(),
            self.inner.global.clone(),
            slot,
            limits,
            owner.clone(),
        );
        if let Err(error) = run.log_first().await {
            self.release(&session_id).await;
            return Err(error.into());
        }
        let origin = Origin {
            metadata: request.metadata.map(Value::Object),
            owner,
        };
        if origin.metadata.is_some() || origin.owner.is_some() {
            self.inner.hub.set_origin(&session_id, &origin).await?;
        }
        self.start(session_id.clone(), run);
        Ok(session_id)
    }

    /// Runs `run` in the background until it ends or this node hands it over.
    fn start(&self, session_id: String, run: Run) {
        let (tx, rx) = mpsc::channel(RUN_QUEUE);
        let handle = RunHandle {
            tx: tx.clone(),
            log_failing: run.log_failing(),
        };
        self.inner
            .running
            .lock()
            .unwrap()
            .insert(session_id.clone(), handle);
        let this = self.clone();
        self.inner.runs.spawn(async move {
            let end = run.run(tx, rx).await;
            this.inner.running.lock().unwrap().remove(&session_id);
            if end.is_final() {
                this.forget_run(&session_id).await;
            } else {
                this.hand_over(&session_id).await;
            }
        });
    }

    /// The run is over for good: its checkpoint and its claim go.
    async fn forget_run(&self, session_id: &str) {
        if self.inner.hub.keeps_runs()
            && let Err(error) = self.inner.hub.drop_run(session_id).await
        {
            // Harmless: whoever finds it next sees the session has ended.
            tracing::warn!(session_id, %error, "could not drop the ended run's checkpoint");
        }
        self.release(session_id).await;
    }

    /// Leaves the run, whose checkpoint is current, to another node (cluster mode), or to
    /// this one once it restarts (data dir).
    async fn hand_over(&self, session_id: &str) {
        if let Some(cluster) = &self.inner.cluster
            && let Err(error) = cluster.hand_over(session_id).await
        {
            // The claim then points at a node about to be gone: its lease hands it over.
            tracing::warn!(session_id, %error, "could not hand the run over; the lease will");
        }
    }

    async fn release(&self, session_id: &str) {
        if let Some(cluster) = &self.inner.cluster
            && let Err(error) = cluster.release(session_id).await
        {
            tracing::warn!(session_id, %error, "could not release the session");
        }
    }

    /// Resumes the runs saved in the store that no node runs: on a restarted data dir,
    /// all of them; in a cluster, those handed over, each taken by exactly one node.
    /// Returns how many this node took.
    pub async fn resume_saved(&self) -> Result<usize, OrchestratorError> {
        if self.inner.stopping.load(Ordering::Acquire) {
            return Ok(0);
        }
        let mut saved = self.inner.hub.saved_runs().await?;
        saved.retain(|session_id| self.running(session_id).is_none());
        let taken = match &self.inner.cluster {
            None => saved,
            Some(cluster) => cluster.claim_unclaimed(&saved).await.map_err(|error| {
                tracing::warn!(%error, "could not look for runs to resume");
                OrchestratorError::BackendUnavailable
            })?,
        };
        let mut resumed = 0;
        for session_id in &taken {
            match self.resume(session_id).await {
                Ok(()) => resumed += 1,
                Err(error) => {
                    tracing::warn!(session_id, %error, "could not resume a run; it is left for the next try");
                }
            }
        }
        Ok(resumed)
    }

    /// Resumes the run of `session_id` from its checkpoint, once this node holds its claim
    /// (cluster mode) or is the only one (data dir). A run that cannot be resumed ends
    /// `NODE_LOST`, saying why; one that has ended is only forgotten.
    /// On failure (the store unreachable) the claim is given back, so that this node or
    /// another tries again at a later heartbeat.
    pub async fn resume(&self, session_id: &str) -> Result<(), OrchestratorError> {
        let resumed = self.try_resume(session_id).await;
        if resumed.is_err() {
            self.release(session_id).await;
        }
        resumed
    }

    async fn try_resume(&self, session_id: &str) -> Result<(), OrchestratorError> {
        let hub = &self.inner.hub;
        let saved = hub.load_run(session_id).await?;
        let snapshot = hub.snapshot(session_id).await?;
        let Some(snapshot) = snapshot.filter(|s| !s.summary.status.is_terminal()) else {
            self.forget_run(session_id).await;
            return Ok(());
        };
        let resumable = match saved {
            None => Err("it was lost before its first checkpoint, or its node kept none".into()),
            Some(bytes) => Checkpoint::decode(&bytes)
                .map_err(|why| why.to_string())
                .and_then(|checkpoint| self.resolve(checkpoint).map_err(|why| why.to_string())),
        };
        let (checkpoint, models) = match resumable {
            Ok(found) => found,
            Err(why) => {
                tracing::warn!(
                    session_id,
                    why,
                    "a run could not be resumed; it ends NODE_LOST"
                );
                let result = self.fail_lost(session_id, &why).await;
                self.forget_run(session_id).await;
                return result;
            }
        };
        if self.inner.stopping.load(Ordering::Acquire) {
            self.hand_over(session_id).await;
            return Ok(());
        }
        let slot = self.inner.admission.readmit(checkpoint.owner.as_deref());
        tracing::info!(
            session_id,
            generation = checkpoint.generation + 1,
            "resuming a run"
        );
        let run = Run::resume(
            session_id.to_owned(),
            hub.clone(),
            checkpoint,
            &snapshot,
            models,
            self.inner.settings.clone(),
            self.inner.global.clone(),
            slot,
            &self.inner.limits,
        );
        self.start(session_id.to_owned(), run);
        Ok(())
    }

    /// This node's models for a checkpoint's, by name.
    fn resolve(
        &self,
        checkpoint: Checkpoint,
    ) -> Result<(Checkpoint, Vec<Arc<Model>>), checkpoint::Unresumable> {
        let models = checkpoint
            .models
            .iter()
            .map(|name| {
                self.inner
                    .models
                    .iter()
                    .find(|m| m.config.name == *name)
                    .cloned()
                    .ok_or_else(|| checkpoint::Unresumable::UnknownModel(name.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((checkpoint, models))
    }

    /// Shutdown: starts no new run and stops every running one, waiting up to `grace` for
    /// them. Where checkpoints outlive the process (data dir, Redis) each run is handed over
    /// as it stands: another node resumes it at once (cluster), or this one once restarted.
    /// In memory nothing can resume it: it ends with `error { code: "NODE_LOST" }`. Runs are
    /// told, never aborted, so none is cut off in the middle of a publish.
    pub async fn shutdown(&self, grace: std::time::Duration) {
        self.inner.stopping.store(true, Ordering::Release);
        let running: Vec<mpsc::Sender<Command>> = self
            .inner
            .running
            .lock()
            .unwrap()
            .values()
            .map(|run| run.tx.clone())
            .collect();
        let count = running.len();
        let stops = running.into_iter().map(|tx| async move {
            let (reply, done) = oneshot::channel();
            if tx.send(Command::Stop { reply }).await.is_ok() {
                let _ = done.await;
            }
        });
        self.inner.runs.close();
        let all = async {
            futures_util::future::join_all(stops).await;
            self.inner.runs.wait().await;
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                runs = count,
                "runs did not all end within the shutdown grace period"
            );
        } else if count > 0 {
            tracing::info!(runs = count, "ended the running sessions");
        }
    }

    fn select_models(
        &self,
        names: Option<Vec<String>>,
    ) -> Result<Vec<Arc<Model>>, OrchestratorError> {
        let Some(names) = names else {
            return Ok(self.inner.models.clone());
        };
        if names.is_empty() {
            return Err(OrchestratorError::Invalid(
                "`models` must name at least one model".into(),
            ));
        }
        let mut selected: Vec<Arc<Model>> = Vec::with_capacity(names.len());
        for name in names {
            let model = self
                .inner
                .models
                .iter()
                .find(|m| m.config.name == name)
                .ok_or_else(|| OrchestratorError::UnknownModel(name.clone()))?;
            if selected.iter().any(|m| Arc::ptr_eq(m, model)) {
                return Err(OrchestratorError::Invalid(format!(
                    "model `{name}` is listed twice"
                )));
            }
            selected.push(model.clone());
        }
        Ok(selected)
    }

    fn running(&self, session_id: &str) -> Option<RunHandle> {
        self.inner.running.lock().unwrap().get(session_id).cloned()
    }

    /// Sends a command to a running session and waits for its answer; `None` when the
    /// session is not running here (or ended while the command was on its way). While the
    /// run cannot log, the command is refused at once; one that was already on its way when
    /// the log failed is waited for at most [`ASK_TIMEOUT`] (it may still take effect).
    async fn ask_run<T>(
        &self,
        session_id: &str,
        command: impl FnOnce(oneshot::Sender<Result<T, OrchestratorError>>) -> Command,
    ) -> Option<Result<T, OrchestratorError>> {
        let run = self.running(session_id)?;
        if run.log_failing.load(Ordering::Acquire) {
            return Some(Err(OrchestratorError::BackendUnavailable));
        }
        let (reply, answer) = oneshot::channel();
        let asked = async {
            run.tx.send(command(reply)).await.ok()?;
            answer.await.ok()
        };
        tokio::time::timeout(ASK_TIMEOUT, asked)
            .await
            .unwrap_or(Some(Err(OrchestratorError::BackendUnavailable)))
    }

    /// Hands a command to the node that runs the session (cluster mode); `None` when no
    /// other live node runs it.
    async fn forward(
        &self,
        session_id: &str,
        command: RemoteCommand,
    ) -> Option<Result<(), OrchestratorError>> {
        let cluster = self.inner.cluster.as_ref()?;
        match cluster.forward(session_id, command).await {
            Ok(None) | Ok(Some(RemoteReply::NotRunning)) => None,
            Ok(Some(RemoteReply::Done)) => Some(Ok(())),
            Ok(Some(RemoteReply::Refused { code, message })) => {
                Some(Err(OrchestratorError::Remote {
                    code: remote_code(&code),
                    message,
                }))
            }
            // Redis's own text (addresses) is for the log, not for clients.
            Err(crate::cluster::ClusterError::Redis(error)) => {
                tracing::warn!(session_id, %error, "could not forward a command: Redis failed");
                Some(Err(OrchestratorError::BackendUnavailable))
            }
            Err(error) => Some(Err(OrchestratorError::NodeUnavailable(error.to_string()))),
        }
    }

    /// Ends a session whose run no node can resume (`why`): `error { code: "NODE_LOST" }`,
    /// unless it already ended.
    pub async fn fail_lost(&self, session_id: &str, why: &str) -> Result<(), OrchestratorError> {
        let snapshot = self.snapshot(session_id).await?;
        if snapshot.summary.status.is_terminal() {
            return Ok(());
        }
        let error = ErrorEvent::new(
            ErrorCode::NodeLost,
            format!(
                "the node running this session stopped and its run could not be resumed ({why}); start the session again"
            ),
        );
        // Every node that notices the loss may get here; the key lets one error through.
        self.publish_once(session_id, error.draft(), keys::LOST.into())
            .await?;
        Ok(())
    }

    /// Stops a session: `FAILED` with an `error` event `{ code: "CANCELLED" }`.
    pub async fn cancel(&self, session_id: &str) -> Result<(), OrchestratorError> {
        if let Some(outcome) = self
            .ask_run(session_id, |reply| Command::Cancel { reply })
            .await
        {
            return outcome;
        }
        let forwarded = RemoteCommand::Cancel {
            session_id: session_id.to_owned(),
        };
        if let Some(outcome) = self.forward(session_id, forwarded).await {
            return outcome;
        }
        // Not running here: a producer-fed session can still be cancelled in its log.
        let snapshot = self.snapshot(session_id).await?;
        if snapshot.summary.status.is_terminal() {
            return Err(OrchestratorError::SessionEnded(session_id.to_owned()));
        }
        let cancel = ErrorEvent::new(ErrorCode::Cancelled, "the session was cancelled").draft();
        match self
            .publish_once(session_id, cancel, keys::CANCEL.into())
            .await?
        {
            Logged::Once => Ok(()),
            // Another cancel got there between our snapshot read and our append.
            Logged::Already => Err(OrchestratorError::SessionEnded(session_id.to_owned())),
        }
    }

    /// Answers a pending clarification; the paused prompt resumes with the answer.
    pub async fn respond(
        &self,
        session_id: &str,
        clarification_id: &str,
        answer: String,
    ) -> Result<(), OrchestratorError> {
        if answer.len() > self.inner.limits.max_answer_bytes {
            return Err(OrchestratorError::AnswerTooLarge(
                self.inner.limits.max_answer_bytes,
            ));
        }
        let command = |reply| Command::Respond {
            clarification_id: clarification_id.to_owned(),
            answer: answer.clone(),
            reply,
        };
        if let Some(outcome) = self.ask_run(session_id, command).await {
            return outcome;
        }
        let forwarded = RemoteCommand::Respond {
            session_id: session_id.to_owned(),
            clarification_id: clarification_id.to_owned(),
            answer: answer.clone(),
        };
        if let Some(outcome) = self.forward(session_id, forwarded).await {
            return outcome;
        }
        // Not running here: answer in the log, where the session's producer can see it.
        let snapshot = self.snapshot(session_id).await?;
        let clarification = snapshot
            .clarifications
            .iter()
            .find(|c| c.clarification_id == clarification_id)
            .ok_or_else(|| OrchestratorError::ClarificationNotFound(clarification_id.to_owned()))?;
        let id = || clarification_id.to_owned();
        match clarification.status {
            // The same answer again: done already, as asked (see `Run::answer`).
            ClarificationStatus::Answered if clarification.answer.as_deref() == Some(&answer) => {
                return Ok(());
            }
            ClarificationStatus::Pending if snapshot.summary.status.is_terminal() => {
                return Err(OrchestratorError::ClarificationOfEndedSession(id()));
            }
            ClarificationStatus::Pending => {}
            closed => return Err(OrchestratorError::ClarificationClosed(id(), closed)),
        }
        let answered = ClarificationEvent {
            clarification_id: clarification_id.to_owned(),
            question: clarification.question.clone(),
            status: ClarificationStatus::Answered,
            // The snapshot does not keep who asked.
            asked_by: None,
            answer: Some(answer.clone()),
        }
        .draft();
        match self
            .publish_once(session_id, answered, keys::answer(clarification_id))
            .await?
        {
            Logged::Once => Ok(()),
            // Another answer got there between our snapshot read and our append: done, if
            // it was this same answer.
            Logged::Already => {
                let snapshot = self.snapshot(session_id).await?;
                let same = snapshot.clarifications.iter().any(|c| {
                    c.clarification_id == clarification_id && c.answer.as_deref() == Some(&answer)
                });
                if same {
                    Ok(())
                } else {
                    Err(OrchestratorError::ClarificationClosed(
                        id(),
                        ClarificationStatus::Answered,
                    ))
                }
            }
        }
    }

    /// Logs `event` under the reserved `key`, unless an event with that key is logged
    /// already: the log decides, atomically, so this holds across requests and nodes.
    async fn publish_once(
        &self,
        session_id: &str,
        mut event: EventDraft,
        key: String,
    ) -> Result<Logged, OrchestratorError> {
        event.idempotency_key = Some(key);
        let published = self.inner.hub.publish(session_id, vec![event]).await?;
        Ok(if published.accepted == 0 && published.duplicates > 0 {
            Logged::Already
        } else {
            Logged::Once
        })
    }

    async fn snapshot(
        &self,
        session_id: &str,
    ) -> Result<crate::store::Snapshot, OrchestratorError> {
        self.inner
            .hub
            .snapshot(session_id)
            .await?
            .ok_or_else(|| OrchestratorError::SessionNotFound(session_id.to_owned()))
    }
}

/// What [`Orchestrator::publish_once`] did.
enum Logged {
    /// The event is logged now.
    Once,
    /// An event with the same reserved key was logged before: nothing was.
    Already,
}

/// The sessions herald's orchestrator runs: on this node, or (cluster mode) on any node,
/// as the owners hash records.
#[async_trait::async_trait]
impl Runs for Orchestrator {
    async fn runs(&self, session_id: &str) -> Result<bool, IntakeError> {
        if self.running(session_id).is_some() {
            return Ok(true);
        }
        let Some(cluster) = &self.inner.cluster else {
            return Ok(false);
        };
        let runner = cluster
            .runner(session_id)
            .await
            .map_err(|e| IntakeError::Backend(e.to_string()))?;
        Ok(runner.is_some())
    }
}

/// Commands other nodes forward here run only against sessions running on this node.
#[async_trait::async_trait]
impl CommandHandler for Orchestrator {
    async fn handle(&self, command: RemoteCommand) -> RemoteReply {
        let outcome = match command {
            RemoteCommand::Cancel { session_id } => {
                self.ask_run(&session_id, |reply| Command::Cancel { reply })
                    .await
            }
            RemoteCommand::Respond {
                session_id,
                clarification_id,
                answer,
            } => {
                let command = |reply| Command::Respond {
                    clarification_id,
                    answer,
                    reply,
                };
                self.ask_run(&session_id, command).await
            }
        };
        match outcome {
            None => RemoteReply::NotRunning,
            Some(Ok(())) => RemoteReply::Done,
            Some(Err(error)) => RemoteReply::Refused {
                code: error.code().as_str().to_owned(),
                message: error.to_string(),
            },
        }
    }
}

/// The code of a refusal from another node. One running a newer herald may name a code
/// this one does not know: it is passed on as `INTERNAL` rather than lost.
fn remote_code(wire: &str) -> ErrorCode {
    wire.parse().unwrap_or_else(|error| {
        tracing::warn!(%error, "another node refused a command with a code unknown here");
        ErrorCode::Internal
    })
}

fn parse_strategy(strategy: Option<&str>) -> Result<Strategy, OrchestratorError> {
    match strategy {
        None | Some("all") => Ok(Strategy::All),
        Some("fallback") => Ok(Strategy::Fallback),
        Some(other) => Err(OrchestratorError::Invalid(format!(
            "unknown strategy `{other}`: expected all or fallback"
        ))),
    }
}

fn parse_prompts(
    inputs: Vec<PromptInput>,
    limits: &RunLimits,
) -> Result<Vec<Prompt>, OrchestratorError> {
    if inputs.is_empty() {
        return Err(OrchestratorError::Invalid(
            "`prompts` must hold at least one prompt".into(),
        ));
    }
    if inputs.len() > limits.max_prompts {
        return Err(OrchestratorError::TooManyPrompts(limits.max_prompts));
    }
    let mut prompts: Vec<Prompt> = Vec::with_capacity(inputs.len());
    for (index, input) in inputs.into_iter().enumerate() {
        let (id, text) = match input {
            PromptInput::Text(text) => (None, text),
            PromptInput::Full { id, text } => (id, text),
        };
        if text.trim().is_empty() {
            return Err(OrchestratorError::Invalid(format!(
                "prompt {index} has no text"
            )));
        }
        if text.len() > limits.max_prompt_bytes {
            return Err(OrchestratorError::PromptTooLarge {
                index,
                limit: limits.max_prompt_bytes,
            });
        }
        let id = id.unwrap_or_else(|| format!("p{}", index + 1));
        validate_session_id(&id).map_err(|e| {
            OrchestratorError::Invalid(format!(
                "prompt id `{id}`: {}",
                e.to_string().replace("session id", "id")
            ))
        })?;
        if prompts.iter().any(|p| p.id == id) {
            return Err(OrchestratorError::Invalid(format!(
                "prompt id `{id}` is used twice"
            )));
        }
        prompts.push(Prompt { id, text });
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::keys;

    #[test]
    fn herald_keys_are_in_the_reserved_namespace() {
        assert_eq!(keys::run_event(2, 7), "herald:run:2:7");
        assert_eq!(keys::answer("c-1"), "herald:answer:c-1");
        for key in [
            keys::run_event(1, 1),
            keys::answer("c"),
            keys::CANCEL.into(),
            keys::LOST.into(),
        ] {
            assert!(key.starts_with(keys::RESERVED_PREFIX), "{key}");
        }
    }
}
