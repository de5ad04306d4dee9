//! One running session: an actor that owns the run's state and publishes its events, and
//! the worker tasks that call the providers.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::checkpoint::{
    Answered, Checkpoint, FORMAT, PromptStatus, SavedClarification, SavedEvent, SavedPrompt,
    SavedQuestion, SavedUnit,
};
use super::config::OrchestratorSettings;
use super::limits::{RunLimits, RunSlot};
use super::{Model, OrchestratorError, Prompt, Strategy, keys};
use crate::error::ErrorCode;
use crate::event::{
    AskedBy, ClarificationEvent, ClarificationStatus, Completed, ErrorEvent, EventDraft,
    ModelResult, ModelStatus, Payload, Progress, SessionStatus,
};
use crate::hub::Hub;
use crate::metrics::{AttemptOutcome, Metrics, RunOutcome};
use crate::providers::{
    CLARIFICATION_MARKER, ChatMessage, ProviderError, Role, SYSTEM_PROMPT, clarification_question,
};
use crate::store::PromptCounts;

const PUBLISH_FIRST_PAUSE: Duration = Duration::from_millis(100);
const PUBLISH_LAST_PAUSE: Duration = Duration::from_secs(2);

/// What the actor is told: by its workers, or by the API on a user's behalf.
pub(crate) enum Command {
    Started {
        prompt: usize,
        model: usize,
    },
    Partial {
        prompt: usize,
        model: usize,
        output: String,
    },
    Finished {
        prompt: usize,
        model: usize,
        outcome: Result<String, String>,
        attempts: u32,
    },
    Ask {
        prompt: usize,
        model: usize,
        question: String,
        /// The model's whole output that asked, which the conversation goes on from.
        output: String,
        reply: oneshot::Sender<String>,
    },
    Respond {
        clarification_id: String,
        answer: String,
        reply: oneshot::Sender<Result<(), OrchestratorError>>,
    },
    Cancel {
        reply: oneshot::Sender<Result<(), OrchestratorError>>,
    },
    /// This node is shutting down: the run ends now, saying so, rather than dying silently.
    Stop {
        reply: oneshot::Sender<()>,
    },
}

/// One model's work on one prompt.
#[derive(Default)]
struct Unit {
    started: Option<Instant>,
    outcome: Option<Result<String, String>>,
    duration_ms: u64,
    attempts: u32,
    /// How many times the unit started, on any node: above 1 once a resumed run started it
    /// again (its events then say `attempt`).
    starts: u32,
    /// The questions it asked and the answers it got, in order.
    answered: Vec<Answered>,
}

struct PromptState {
    prompt: Prompt,
    status: PromptStatus,
    units: Vec<Unit>,
}

enum Clarification {
    Pending {
        prompt: usize,
        model: usize,
        question: String,
        /// The model's output that asked.
        output: String,
        deadline: Instant,
        /// The worker waiting for the answer; `None` until a resumed run's worker waits.
        reply: Option<oneshot::Sender<String>>,
    },
    Closed {
        status: ClarificationStatus,
        /// What it was answered with, when it was.
        answer: Option<String>,
    },
}

/// How a run ended.
pub(crate) enum End {
    Completed,
    AllFailed,
    Cancelled,
    Expired,
    Stopped,
    /// This node stopped and left the run to another node (or to itself, restarted): its
    /// checkpoint stays.
    HandedOver,
    /// It was resumed after its end was decided: its last events are logged now.
    EndedBefore,
    /// Its events could not be logged within the run's log deadline.
    LogLost,
}

impl End {
    /// Whether the run is over for good, so its checkpoint can go.
    pub fn is_final(&self) -> bool {
        !matches!(self, End::HandedOver)
    }

    /// The `outcome` of `herald_run_duration_seconds`; `None` for a run that did not end
    /// here (handed over) or whose end an earlier run decided (and would have counted).
    fn outcome(&self) -> Option<RunOutcome> {
        match self {
            End::Completed => Some(RunOutcome::Completed),
            End::AllFailed | End::LogLost => Some(RunOutcome::Failed),
            End::Cancelled => Some(RunOutcome::Cancelled),
            End::Expired => Some(RunOutcome::Expired),
            End::Stopped => Some(RunOutcome::Lost),
            End::HandedOver | End::EndedBefore => None,
        }
    }
}

pub(crate) struct Run {
    session_id: String,
    hub: Hub,
    /// When the session was created (a resumed run: as its snapshot's `createdAt` says, on
    /// this node's clock), for `herald_run_duration_seconds`.
    created: Instant,
    /// The subject the session is owned by, for the per-subject cap after a resume.
    owner: Option<String>,
    /// Whether the run saves checkpoints: only where they outlive the process.
    checkpoints: bool,
    /// This run's generation of idempotency keys: one more than the checkpoint's it was
    /// resumed from (see [`super::checkpoint`]).
    generation: u32,
    /// A resumed run's outbox, logged before anything else.
    outbox: Vec<EventDraft>,
    /// Clarifications answered in the log while no node ran the session: applied once the
    /// resumed run's workers wait for them.
    answered_meanwhile: Vec<(String, String)>,
    strategy: Strategy,
    prompts: Vec<PromptState>,
    models: Vec<Arc<Model>>,
    settings: OrchestratorSettings,
    global: Arc<Semaphore>,
    clarifications: HashMap<String, Clarification>,
    /// Finished units of work (prompt × model under `all`, prompts under `fallback`).
    done: u64,
    /// Events this run has handed to the log, for their idempotency keys.
    published: AtomicU64,
    /// This run's place under the running-session caps: given back ([`Run::end`]) once the
    /// run has decided how it ends, before its last events are published, so a client that
    /// sees a session's end can start another at once. Dropped with the run otherwise.
    slot: Option<RunSlot>,
    /// Bytes one model may stream for one prompt.
    max_output: usize,
    /// How long a publish keeps trying while the log is unreachable.
    log_deadline: Duration,
    /// Set while the run's latest publish is failing: the API answers this session's answers
    /// and cancels 503 at once instead of queueing them behind the outage.
    log_failing: Arc<AtomicBool>,
    /// Events that could not be logged within `log_deadline`, in order and keyed: once there
    /// are any, the run is over, and they are logged (before its end) when the log is back.
    unlogged: Vec<EventDraft>,
}

impl Run {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        session_id: String,
        hub: Hub,
        strategy: Strategy,
        prompts: Vec<Prompt>,
        models: Vec<Arc<Model>>,
        settings: OrchestratorSettings,
        global: Arc<Semaphore>,
        slot: RunSlot,
        limits: &RunLimits,
        owner: Option<String>,
    ) -> Self {
        let prompts = prompts
            .into_iter()
            .map(|prompt| PromptState {
                prompt,
                status: PromptStatus::Pending,
                units: models.iter().map(|_| Unit::default()).collect(),
            })
            .collect();
        Self {
            session_id,
            created: Instant::now(),
            checkpoints: hub.keeps_runs(),
            hub,
            owner,
            generation: 1,
            outbox: Vec::new(),
            answered_meanwhile: Vec::new(),
            strategy,
            prompts,
            models,
            settings,
            global,
            clarifications: HashMap::new(),
            done: 0,
            published: AtomicU64::new(0),
            slot: Some(slot),
            max_output: limits.max_model_output_bytes,
            log_deadline: limits.log_deadline,
            log_failing: Arc::default(),
            unlogged: Vec::new(),
        }
    }

    /// The run a checkpoint describes, on this node: its models resolved (`models`, in the
    /// checkpoint's order), its pending clarifications' deadlines kept, and the answers the
    /// log got while no node ran it (`snapshot`) queued for its workers.
    #[allow(clippy::too_many_arguments)]
    pub fn resume(
        session_id: String,
        hub: Hub,
        checkpoint: Checkpoint,
        snapshot: &crate::store::Snapshot,
        models: Vec<Arc<Model>>,
        settings: OrchestratorSettings,
        global: Arc<Semaphore>,
        slot: RunSlot,
        limits: &RunLimits,
    ) -> Self {
        let prompts = checkpoint
            .prompts
            .into_iter()
            .zip(checkpoint.units)
            .map(|(saved, units)| PromptState {
                prompt: Prompt {
                    id: saved.id,
                    text: saved.text,
                },
                status: saved.status,
                units: units.into_iter().map(Unit::restored).collect(),
            })
            .collect();
        let mut answered_meanwhile = Vec::new();
        let clarifications = checkpoint
            .clarifications
            .into_iter()
            .map(|saved| {
                let slot = match saved.pending {
                    Some(q) => {
                        if let Some(answer) = answered_in(snapshot, &saved.id) {
                            answered_meanwhile.push((saved.id.clone(), answer));
                        }
                        Clarification::Pending {
                            prompt: q.prompt,
                            model: q.model,
                            question: q.question,
                            output: q.output,
                            deadline: instant_of(q.deadline_ms),
                            reply: None,
                        }
                    }
                    None => Clarification::Closed {
                        status: saved.status,
                        answer: saved.answer,
                    },
                };
                (saved.id, slot)
            })
            .collect();
        let mut run = Self::new(
            session_id,
            hub,
            checkpoint.strategy,
            Vec::new(),
            models,
            settings,
            global,
            slot,
            limits,
            checkpoint.owner,
        );
        if let Some(created_ms) = unix_ms_of_timestamp(&snapshot.summary.created_at) {
            run.created = instant_of(created_ms);
        }
        run.prompts = prompts;
        run.clarifications = clarifications;
        run.done = checkpoint.done;
        run.generation = checkpoint.generation + 1;
        run.outbox = checkpoint
            .outbox
            .into_iter()
            .map(EventDraft::from)
            .collect();
        run.answered_meanwhile = answered_meanwhile;
        if checkpoint.ended {
            run.end();
        }
        run
    }

    /// The run's state now, with `outbox` (keyed) about to be logged.
    fn checkpoint(&self, outbox: &[EventDraft]) -> Checkpoint {
        Checkpoint {
            format: FORMAT,
            strategy: self.strategy,
            prompts: self
                .prompts
                .iter()
                .map(|p| SavedPrompt {
                    id: p.prompt.id.clone(),
                    text: p.prompt.text.clone(),
                    status: p.status,
                })
                .collect(),
            models: self.models.iter().map(|m| m.config.name.clone()).collect(),
            owner: self.owner.clone(),
            units: self
                .prompts
                .iter()
                .map(|p| p.units.iter().map(Unit::saved).collect())
                .collect(),
            done: self.done,
            clarifications: self
                .clarifications
                .iter()
                .map(|(id, c)| saved_clarification(id, c))
                .collect(),
            generation: self.generation,
            outbox: outbox.iter().map(SavedEvent::from).collect(),
            ended: self.slot.is_none(),
        }
    }

    /// Whether the run's log is failing right now (see [`Run::log_failing`]).
    pub fn log_failing(&self) -> Arc<AtomicBool> {
        self.log_failing.clone()
    }

    /// The run has ended: its running slot is free for another session.
    fn end(&mut self) {
        self.slot = None;
    }

    fn total_units(&self) -> u64 {
        let per_prompt = match self.strategy {
            Strategy::All => self.models.len() as u64,
            Strategy::Fallback => 1,
        };
        self.prompts.len() as u64 * per_prompt
    }

    /// Logs the new run's first `progress`, after its first checkpoint: the run can be
    /// resumed from the moment anyone can see it. Fails at once, for the caller to refuse
    /// the session, rather than retrying.
    pub async fn log_first(&mut self) -> Result<(), crate::hub::HubError> {
        let mut events = vec![self.progress(SessionStatus::Processing, None)];
        self.key(&mut events);
        let saved = self.checkpoints.then(|| self.checkpoint(&events).encode());
        self.log_once(saved.as_deref(), &events).await
    }

    /// A `progress` event from the current counts. Progress is the share of finished work,
    /// kept below 100 until the run completes.
    fn progress(&self, status: SessionStatus, result: Option<&RunResult<'_>>) -> EventDraft {
        let count = |s: PromptStatus| self.prompts.iter().filter(|p| p.status == s).count() as u64;
        let pending_clarifications = self
            .clarifications
            .values()
            .filter(|c| matches!(c, Clarification::Pending { .. }))
            .count();
        let progress = match result {
            Some(_) => 100,
            None => self.done * 99 / self.total_units().max(1),
        };
        Progress {
            status,
            progress,
            prompts: PromptCounts {
                total: self.prompts.len() as u64,
                completed: count(PromptStatus::Completed),
                processing: count(PromptStatus::Processing),
                pending: count(PromptStatus::Pending),
                failed: count(PromptStatus::Failed),
            },
            has_clarifications: pending_clarifications > 0,
            clarification_count: pending_clarifications,
            has_result: result.map(|_| true),
            result,
        }
        .draft()
    }

    fn model_result(
        &self,
        prompt: usize,
        model: usize,
        status: ModelStatus,
        output: String,
        error: Option<String>,
    ) -> EventDraft {
        let unit = &self.prompts[prompt].units[model];
        let duration = match status {
            ModelStatus::Processing => unit.started.map_or(0, |s| s.elapsed().as_millis() as u64),
            ModelStatus::Completed | ModelStatus::Failed => unit.duration_ms,
        };
        let config = &self.models[model].config;
        ModelResult {
            prompt_id: self.prompts[prompt].prompt.id.clone(),
            model_name: config.name.clone(),
            provider: config.provider.as_str().to_owned(),
            duration,
            result: output,
            status,
            error,
            attempt: (unit.starts > 1).then_some(unit.starts),
        }
        .draft()
    }

    /// Runs the session to its end (or until this node hands it over); says how it ended.
    pub async fn run(mut self, tx: mpsc::Sender<Command>, mut rx: mpsc::Receiver<Command>) -> End {
        let resumed = self.generation > 1;
        if resumed {
            // Saves the new generation before it logs anything, and logs what the last
            // checkpoint accounted for.
            let outbox = std::mem::take(&mut self.outbox);
            self.publish(outbox).await;
            let ended = self.slot.is_none();
            if !self.unlogged.is_empty() {
                let end = if ended {
                    End::EndedBefore
                } else {
                    End::LogLost
                };
                return self.log_after_outage(end, &mut rx).await;
            }
            if ended {
                return End::EndedBefore;
            }
        }
        let mut workers = JoinSet::new();
        self.spawn_workers(&mut workers, &tx);
        // The API keeps its own sender; the run must not wait on its own.
        drop(tx);
        for (clarification_id, answer) in std::mem::take(&mut self.answered_meanwhile) {
            if let Err(error) = self.answer(&clarification_id, answer).await {
                tracing::warn!(session_id = %self.session_id, %error, "could not apply an answer logged while the run was handed over");
            }
        }
        let end = loop {
            let deadline = self.next_deadline();
            let command = tokio::select! {
                command = rx.recv() => command,
                () = sleep_until(deadline), if deadline.is_some() => {
                    self.expire().await;
                    break End::Expired;
                }
            };
            let Some(command) = command else {
                // Every sender is gone: nothing can change any more.
                break End::Cancelled;
            };
            if let Some(end) = self.handle(command).await {
                break end;
            }
            if !self.unlogged.is_empty() {
                break End::LogLost;
            }
            if self
                .prompts
                .iter()
                .all(|p| matches!(p.status, PromptStatus::Completed | PromptStatus::Failed))
            {
                break self.finish().await;
            }
        };
        // Dropping the workers drops their in-flight provider requests.
        workers.abort_all();
        let end = match end {
            End::Stopped | End::HandedOver => end,
            _ if !self.unlogged.is_empty() => self.log_after_outage(end, &mut rx).await,
            _ => end,
        };
        if !self.unlogged.is_empty() {
            tracing::error!(session_id = %self.session_id, events = self.unlogged.len(), "the node stopped before the log was back; the run's last events were not logged");
        }
        if let Some(outcome) = end.outcome() {
            let metrics = &self.hub.metrics().timings;
            metrics
                .run_duration(outcome)
                .observe(self.created.elapsed());
        }
        tracing::debug!(session_id = %self.session_id, ended = end.name(), "run ended");
        end
    }

    /// Starts a worker for every unit still to run: all of them in a new run; in a resumed
    /// one, those without a result, each from where its checkpoint left it.
    fn spawn_workers(&mut self, workers: &mut JoinSet<()>, tx: &mpsc::Sender<Command>) {
        for p in 0..self.prompts.len() {
            let state = &self.prompts[p];
            if matches!(state.status, PromptStatus::Completed | PromptStatus::Failed) {
                continue;
            }
            let worker = Worker {
                tx: tx.clone(),
                metrics: self.hub.metrics().clone(),
                session_id: self.session_id.as_str().into(),
                max_output: self.max_output,
                prompt: p,
                text: state.prompt.text.clone(),
                global: self.global.clone(),
                settings: self.settings.clone(),
            };
            match self.strategy {
                Strategy::All => {
                    for m in 0..self.models.len() {
                        if self.prompts[p].units[m].outcome.is_some() {
                            continue;
                        }
                        let (worker, model) = (worker.clone(), self.models[m].clone());
                        let resume = self.resume_point(p, m);
                        workers.spawn(async move {
                            worker.run_model(m, &model, resume).await;
                        });
                    }
                }
                Strategy::Fallback => {
                    // Models before the first without a result failed (a success ends the
                    // prompt); the fallback goes on from it.
                    let first = state.units.iter().position(|u| u.outcome.is_none());
                    let Some(first) = first else { continue };
                    let models = self.models.clone();
                    let mut resume = Some(self.resume_point(p, first));
                    workers.spawn(async move {
                        for (m, model) in models.iter().enumerate().skip(first) {
                            let from = resume.take().unwrap_or_default();
                            if worker.run_model(m, model, from).await {
                                break;
                            }
                        }
                    });
                }
            }
        }
    }

    /// Where the unit of prompt `p` on model `m` goes on from: the answers it got, and the
    /// question it is waiting on, whose worker is attached here.
    fn resume_point(&mut self, p: usize, m: usize) -> Resume {
        let answered = self.prompts[p].units[m].answered.clone();
        let waiting = self.clarifications.values_mut().find_map(|c| match c {
            Clarification::Pending {
                prompt,
                model,
                output,
                reply: reply @ None,
                ..
            } if *prompt == p && *model == m => {
                let (tx, rx) = oneshot::channel();
                *reply = Some(tx);
                Some((output.clone(), rx))
            }
            _ => None,
        });
        Resume { answered, waiting }
    }

    /// Logs the run's events, retrying while the log is unreachable (a Redis restart or
    /// failover) for up to the run's log deadline. Every event carries an idempotency key, so
    /// an attempt that reached the log although its reply was lost is not logged twice.
    /// The actor waits meanwhile, so its workers wait too, and the run's order holds. Past
    /// the deadline the events are kept in `unlogged`, and so is everything published after
    /// them: the run ends and [`Run::log_after_outage`] logs them.
    async fn publish(&mut self, events: Vec<EventDraft>) {
        self.publish_as(events, true).await;
    }

    /// [`Run::publish`], with a checkpoint saved first (`checkpoint`, where the store keeps
    /// them) so a node that resumes the run knows what these events did.
    async fn publish_as(&mut self, mut events: Vec<EventDraft>, checkpoint: bool) {
        self.key(&mut events);
        if !self.unlogged.is_empty() {
            self.unlogged.append(&mut events);
            return;
        }
        let saved = (checkpoint && self.checkpoints).then(|| self.checkpoint(&events).encode());
        let deadline = Instant::now() + self.log_deadline;
        let mut pause = PUBLISH_FIRST_PAUSE;
        loop {
            let error = match self.log_once(saved.as_deref(), &events).await {
                Ok(()) => {
                    self.log_failing.store(false, Ordering::Release);
                    return;
                }
                Err(error) => error,
            };
            self.log_failing.store(true, Ordering::Release);
            if Instant::now() + pause > deadline {
                tracing::error!(session_id = %self.session_id, %error, deadline = ?self.log_deadline, "could not log the run's events in time; the run stops and ends FAILED once the log is back");
                self.unlogged = events;
                return;
            }
            tracing::warn!(session_id = %self.session_id, %error, retry_in = ?pause, "could not log the run's events; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(PUBLISH_LAST_PAUSE);
        }
    }

    /// Saves the checkpoint (when there is one), then logs the events.
    async fn log_once(
        &self,
        checkpoint: Option<&[u8]>,
        events: &[EventDraft],
    ) -> Result<(), crate::hub::HubError> {
        if let Some(checkpoint) = checkpoint {
            self.hub.save_run(&self.session_id, checkpoint).await?;
        }
        if !events.is_empty() {
            self.hub.publish(&self.session_id, events.to_vec()).await?;
        }
        Ok(())
    }

    /// Gives each event without one the run's next reserved idempotency key. (Events that
    /// must be logged once whoever logs them, such as an answer, carry their own.)
    fn key(&self, events: &mut [EventDraft]) {
        for event in events.iter_mut().filter(|e| e.idempotency_key.is_none()) {
            let n = self.published.fetch_add(1, Ordering::Relaxed) + 1;
            event.idempotency_key = Some(keys::run_event(self.generation, n));
        }
    }

    /// The run could not log within its deadline: its models are stopped already. Logs what
    /// it held, in order, as soon as the log is back, ending a run that had not decided its
    /// end `FAILED` with `error { code: "BACKEND_UNAVAILABLE" }`. Meanwhile answers and
    /// cancels are refused 503; a shutdown gives up (the node's lease then tells the
    /// others).
    async fn log_after_outage(&mut self, end: End, rx: &mut mpsc::Receiver<Command>) -> End {
        self.end();
        if matches!(end, End::LogLost) {
            let mut closing = self.close_clarifications();
            closing.push(self.progress(SessionStatus::Failed, None));
            let message = format!(
                "herald could not log this session's events for {} s (its backend was unreachable); the run was stopped",
                self.log_deadline.as_secs()
            );
            closing.push(ErrorEvent::new(ErrorCode::BackendUnavailable, message).draft());
            self.key(&mut closing);
            self.unlogged.append(&mut closing);
        }
        let mut pause = PUBLISH_FIRST_PAUSE;
        let mut commands_open = true;
        loop {
            match self
                .hub
                .publish(&self.session_id, self.unlogged.clone())
                .await
            {
                Ok(_) => {
                    tracing::info!(session_id = %self.session_id, events = self.unlogged.len(), "the log is back: logged the events the run held");
                    self.unlogged.clear();
                    self.log_failing.store(false, Ordering::Release);
                    return end;
                }
                Err(error) => {
                    tracing::warn!(session_id = %self.session_id, %error, retry_in = ?pause, "the log is still unreachable");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                command = rx.recv(), if commands_open => match command {
                    Some(Command::Stop { reply }) => {
                        let _ = reply.send(());
                        return if self.checkpoints { End::HandedOver } else { End::Stopped };
                    }
                    Some(Command::Cancel { reply }) | Some(Command::Respond { reply, .. }) => {
                        let _ = reply.send(Err(OrchestratorError::BackendUnavailable));
                    }
                    // From workers, which are gone.
                    Some(_) => {}
                    None => commands_open = false,
                },
            }
            pause = (pause * 2).min(PUBLISH_LAST_PAUSE);
        }
    }

    /// Applies one command; `Some` when it ends the run.
    async fn handle(&mut self, command: Command) -> Option<End> {
        match command {
            Command::Started { prompt, model } => {
                let unit = &mut self.prompts[prompt].units[model];
                unit.started = Some(Instant::now());
                unit.starts += 1;
                let started = ModelStatus::Processing;
                let mut events =
                    vec![self.model_result(prompt, model, started, String::new(), None)];
                if self.prompts[prompt].status == PromptStatus::Pending {
                    self.prompts[prompt].status = PromptStatus::Processing;
                    events.push(self.progress(SessionStatus::Processing, None));
                }
                self.publish(events).await;
            }
            Command::Partial {
                prompt,
                model,
                output,
            } => {
                let event = self.model_result(prompt, model, ModelStatus::Processing, output, None);
                // Streamed output is not checkpointed: a resumed unit starts again.
                self.publish_as(vec![event], false).await;
            }
            Command::Finished {
                prompt,
                model,
                outcome,
                attempts,
            } => {
                let event = self.finish_unit(prompt, model, outcome, attempts);
                let progress = self.progress(SessionStatus::Processing, None);
                self.publish(vec![event, progress]).await;
            }
            Command::Ask {
                prompt,
                model,
                question,
                output,
                reply,
            } => {
                let clarification_id = uuid::Uuid::new_v4().to_string();
                let deadline =
                    Instant::now() + Duration::from_secs(self.settings.clarification_timeout_secs);
                let event = self.clarification_event(
                    &clarification_id,
                    prompt,
                    model,
                    &question,
                    ClarificationStatus::Pending,
                    None,
                );
                self.clarifications.insert(
                    clarification_id,
                    Clarification::Pending {
                        prompt,
                        model,
                        question,
                        output,
                        deadline,
                        reply: Some(reply),
                    },
                );
                let progress = self.progress(SessionStatus::Processing, None);
                self.publish(vec![event, progress]).await;
            }
            Command::Respond {
                clarification_id,
                answer,
                reply,
            } => {
                let outcome = self.answer(&clarification_id, answer).await;
                let _ = reply.send(outcome);
            }
            Command::Cancel { reply } => {
                self.end();
                // Questions nobody will act on any more are closed, so they cannot be answered.
                let mut events = self.close_clarifications();
                events.push(self.progress(SessionStatus::Failed, None));
                let error = ErrorEvent::new(ErrorCode::Cancelled, "the session was cancelled");
                events.push(keyed(error.draft(), keys::CANCEL));
                self.publish(events).await;
                let _ = reply.send(Ok(()));
                return Some(End::Cancelled);
            }
            Command::Stop { reply } if self.checkpoints => {
                // The checkpoint is current: another node, or this one restarted, resumes.
                let _ = reply.send(());
                return Some(End::HandedOver);
            }
            Command::Stop { reply } => {
                self.end();
                let mut events = self.close_clarifications();
                events.push(self.progress(SessionStatus::Failed, None));
                let error = ErrorEvent::new(
                    ErrorCode::NodeLost,
                    "the node running this session shut down; start the session again",
                );
                events.push(keyed(error.draft(), keys::LOST));
                self.publish(events).await;
                let _ = reply.send(());
                return Some(End::Stopped);
            }
        }
        None
    }

    /// Records a model's end on a prompt and, when it decides the prompt, the prompt's end.
    fn finish_unit(
        &mut self,
        prompt: usize,
        model: usize,
        outcome: Result<String, String>,
        attempts: u32,
    ) -> EventDraft {
        let state = &mut self.prompts[prompt];
        let unit = &mut state.units[model];
        unit.duration_ms = unit.started.map_or(0, |s| s.elapsed().as_millis() as u64);
        unit.attempts = attempts;
        unit.outcome = Some(outcome.clone());
        let last_model = model + 1 == self.models.len();
        let decided = match self.strategy {
            Strategy::All => state.units.iter().all(|u| u.outcome.is_some()),
            Strategy::Fallback => outcome.is_ok() || last_model,
        };
        if self.strategy == Strategy::All {
            self.done += 1;
        }
        if decided {
            let any_ok = state.units.iter().any(|u| matches!(u.outcome, Some(Ok(_))));
            state.status = if any_ok {
                PromptStatus::Completed
            } else {
                PromptStatus::Failed
            };
            if self.strategy == Strategy::Fallback {
                self.done += 1;
            }
        }
        match outcome {
            Ok(output) => self.model_result(prompt, model, ModelStatus::Completed, output, None),
            Err(error) => {
                let failed = ModelStatus::Failed;
                self.model_result(prompt, model, failed, String::new(), Some(error))
            }
        }
    }

    async fn answer(
        &mut self,
        clarification_id: &str,
        answer: String,
    ) -> Result<(), OrchestratorError> {
        let closed = Clarification::Closed {
            status: ClarificationStatus::Answered,
            answer: Some(answer.clone()),
        };
        let previous = match self.clarifications.get_mut(clarification_id) {
            None => {
                return Err(OrchestratorError::ClarificationNotFound(
                    clarification_id.to_owned(),
                ));
            }
            // The same answer again (a retry after a reply was lost, or after a 503 whose
            // answer went through): done already, as asked.
            Some(Clarification::Closed {
                answer: Some(given),
                ..
            }) if *given == answer => return Ok(()),
            Some(Clarification::Closed { status, .. }) => {
                return Err(OrchestratorError::ClarificationClosed(
                    clarification_id.to_owned(),
                    *status,
                ));
            }
            Some(slot) => std::mem::replace(slot, closed),
        };
        let Clarification::Pending {
            prompt,
            model,
            question,
            output,
            reply,
            ..
        } = previous
        else {
            unreachable!("closed clarifications returned above")
        };
        self.prompts[prompt].units[model].answered.push(Answered {
            output,
            answer: answer.clone(),
        });
        let event = self.clarification_event(
            clarification_id,
            prompt,
            model,
            &question,
            ClarificationStatus::Answered,
            Some(&answer),
        );
        // The key an answer given in the log carries too: one `answered` per question.
        let event = keyed(event, &keys::answer(clarification_id));
        let progress = self.progress(SessionStatus::Processing, None);
        self.publish(vec![event, progress]).await;
        if !self.unlogged.is_empty() {
            // The run ends without acting on it; the answer is logged before its end.
            return Err(OrchestratorError::BackendUnavailable);
        }
        // The worker may be gone (the run is ending); the answer is logged either way.
        if let Some(reply) = reply {
            let _ = reply.send(answer);
        }
        Ok(())
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.clarifications
            .values()
            .filter_map(|c| match c {
                Clarification::Pending { deadline, .. } => Some(*deadline),
                Clarification::Closed { .. } => None,
            })
            .min()
    }

    /// An unanswered clarification ran out of time: it expires and so does the session,
    /// and with it every other open question.
    async fn expire(&mut self) {
        self.end();
        let mut events = self.close_clarifications();
        events.push(self.progress(SessionStatus::Expired, None));
        self.publish(events).await;
    }

    /// Marks every pending clarification expired; returns their events.
    fn close_clarifications(&mut self) -> Vec<EventDraft> {
        let mut closed = Vec::new();
        for (id, slot) in self.clarifications.iter_mut() {
            if let Clarification::Pending {
                prompt,
                model,
                question,
                ..
            } = slot
            {
                closed.push((id.clone(), *prompt, *model, std::mem::take(question)));
                *slot = Clarification::Closed {
                    status: ClarificationStatus::Expired,
                    answer: None,
                };
            }
        }
        closed
            .iter()
            .map(|(id, prompt, model, question)| {
                let expired = ClarificationStatus::Expired;
                self.clarification_event(id, *prompt, *model, question, expired, None)
            })
            .collect()
    }

    fn clarification_event(
        &self,
        clarification_id: &str,
        prompt: usize,
        model: usize,
        question: &str,
        status: ClarificationStatus,
        answer: Option<&str>,
    ) -> EventDraft {
        ClarificationEvent {
            clarification_id: clarification_id.to_owned(),
            question: question.to_owned(),
            status,
            asked_by: Some(AskedBy {
                prompt_id: self.prompts[prompt].prompt.id.clone(),
                model_name: self.models[model].config.name.clone(),
            }),
            answer: answer.map(str::to_owned),
        }
        .draft()
    }

    async fn finish(&mut self) -> End {
        self.end();
        if self
            .prompts
            .iter()
            .all(|p| p.status == PromptStatus::Failed)
        {
            let progress = self.progress(SessionStatus::Failed, None);
            let error = ErrorEvent::new(
                ErrorCode::AllPromptsFailed,
                "every prompt failed on every model",
            );
            self.publish(vec![progress, error.draft()]).await;
            return End::AllFailed;
        }
        let result = self.result();
        let progress = self.progress(SessionStatus::Completed, Some(&result));
        let completed = Completed { result }.draft();
        self.publish(vec![progress, completed]).await;
        End::Completed
    }

    /// Per prompt, each model's output.
    fn result(&self) -> RunResult<'_> {
        let prompts = self
            .prompts
            .iter()
            .map(|state| PromptResult {
                prompt_id: &state.prompt.id,
                text: &state.prompt.text,
                status: state.status,
                outputs: state
                    .units
                    .iter()
                    .zip(&self.models)
                    .filter_map(|(unit, model)| {
                        let outcome = unit.outcome.as_ref()?;
                        Some(ModelOutput {
                            model_name: &model.config.name,
                            provider: model.config.provider.as_str(),
                            status: match outcome {
                                Ok(_) => ModelStatus::Completed,
                                Err(_) => ModelStatus::Failed,
                            },
                            output: outcome.as_ref().map_or("", String::as_str),
                            duration: unit.duration_ms,
                            attempts: unit.attempts,
                            error: outcome.as_ref().err().map(String::as_str),
                        })
                    })
                    .collect(),
            })
            .collect();
        RunResult {
            strategy: self.strategy,
            models: self.models.iter().map(|m| m.config.name.as_str()).collect(),
            prompts,
        }
    }
}

/// A completed run's result (`completed.result`, and its last `progress`'s): per prompt,
/// each model's output.
#[derive(Serialize)]
struct RunResult<'a> {
    strategy: Strategy,
    models: Vec<&'a str>,
    prompts: Vec<PromptResult<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PromptResult<'a> {
    prompt_id: &'a str,
    text: &'a str,
    status: PromptStatus,
    /// The models that finished on the prompt, in the session's order.
    outputs: Vec<ModelOutput<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ModelOutput<'a> {
    model_name: &'a str,
    provider: &'static str,
    status: ModelStatus,
    /// Empty when the model failed.
    output: &'a str,
    /// Milliseconds.
    duration: u64,
    attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

impl End {
    fn name(&self) -> &'static str {
        match self {
            End::Completed => "completed",
            End::AllFailed => "all prompts failed",
            End::Cancelled => "cancelled",
            End::Expired => "expired",
            End::Stopped => "stopped at shutdown",
            End::HandedOver => "handed over at shutdown",
            End::EndedBefore => "its end, decided before it was resumed, is logged",
            End::LogLost => "its log was unreachable for too long",
        }
    }
}

impl Unit {
    fn saved(&self) -> SavedUnit {
        SavedUnit {
            starts: self.starts,
            started_ms: self.started.map(unix_ms_of),
            outcome: self.outcome.clone(),
            duration_ms: self.duration_ms,
            attempts: self.attempts,
            answered: self.answered.clone(),
        }
    }

    fn restored(saved: SavedUnit) -> Self {
        Self {
            started: saved.started_ms.map(instant_of),
            outcome: saved.outcome,
            duration_ms: saved.duration_ms,
            attempts: saved.attempts,
            starts: saved.starts,
            answered: saved.answered,
        }
    }
}

fn saved_clarification(id: &str, clarification: &Clarification) -> SavedClarification {
    match clarification {
        Clarification::Pending {
            prompt,
            model,
            question,
            output,
            deadline,
            ..
        } => SavedClarification {
            id: id.to_owned(),
            status: ClarificationStatus::Pending,
            answer: None,
            pending: Some(SavedQuestion {
                prompt: *prompt,
                model: *model,
                question: question.clone(),
                output: output.clone(),
                deadline_ms: unix_ms_of(*deadline),
            }),
        },
        Clarification::Closed { status, answer } => SavedClarification {
            id: id.to_owned(),
            status: *status,
            answer: answer.clone(),
            pending: None,
        },
    }
}

/// The answer the log holds for a clarification, if it was answered there.
fn answered_in(snapshot: &crate::store::Snapshot, clarification_id: &str) -> Option<String> {
    snapshot
        .clarifications
        .iter()
        .find(|c| c.clarification_id == clarification_id)
        .filter(|c| c.status == ClarificationStatus::Answered)
        .and_then(|c| c.answer.clone())
}

/// An RFC 3339 time (a snapshot's `createdAt`) in milliseconds since the Unix epoch.
fn unix_ms_of_timestamp(timestamp: &str) -> Option<u64> {
    let time = chrono::DateTime::parse_from_rfc3339(timestamp).ok()?;
    u64::try_from(time.timestamp_millis()).ok()
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Wall-clock time of an instant, so it means the same on another node.
fn unix_ms_of(at: Instant) -> u64 {
    let now = Instant::now();
    let unix = now_unix_ms();
    if at >= now {
        unix.saturating_add((at - now).as_millis() as u64)
    } else {
        unix.saturating_sub((now - at).as_millis() as u64)
    }
}

/// The instant of a wall-clock time, on this node.
fn instant_of(unix_ms: u64) -> Instant {
    let now = Instant::now();
    let unix = now_unix_ms();
    if unix_ms >= unix {
        now + Duration::from_millis(unix_ms - unix)
    } else {
        now.checked_sub(Duration::from_millis(unix - unix_ms))
            .unwrap_or(now)
    }
}

fn keyed(mut event: EventDraft, key: &str) -> EventDraft {
    event.idempotency_key = Some(key.to_owned());
    event
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Calls one provider for one prompt, reporting to the run.
#[derive(Clone)]
struct Worker {
    tx: mpsc::Sender<Command>,
    /// For the provider histograms.
    metrics: Arc<Metrics>,
    /// For the server log.
    session_id: Arc<str>,
    /// Bytes the model may stream for the prompt, per attempt.
    max_output: usize,
    prompt: usize,
    text: String,
    global: Arc<Semaphore>,
    settings: OrchestratorSettings,
}

/// Where a unit goes on from when a resumed run starts it (empty for a new unit).
#[derive(Default)]
struct Resume {
    /// The questions it asked and their answers: the conversation so far.
    answered: Vec<Answered>,
    /// The question it waits on: the output that asked, and where the answer comes.
    waiting: Option<(String, oneshot::Receiver<String>)>,
}

impl Worker {
    /// Runs `model` on the prompt to its end: retries, clarifications and all, going on
    /// from `resume`. Returns whether it succeeded. A closed channel means the run is over:
    /// stop quietly.
    async fn run_model(&self, m: usize, model: &Model, resume: Resume) -> bool {
        let (prompt, tx) = (self.prompt, &self.tx);
        let mut messages = vec![
            ChatMessage::new(Role::System, SYSTEM_PROMPT),
            ChatMessage::new(Role::User, self.text.clone()),
        ];
        for Answered { output, answer } in resume.answered {
            messages.push(ChatMessage::new(Role::Assistant, output));
            messages.push(ChatMessage::new(Role::User, answer));
        }
        match resume.waiting {
            // Paused on a question: it goes on once answered, as it would have.
            Some((output, answer)) => {
                let Ok(answer) = answer.await else {
                    return false;
                };
                messages.push(ChatMessage::new(Role::Assistant, output));
                messages.push(ChatMessage::new(Role::User, answer));
            }
            None => {
                let started = Command::Started { prompt, model: m };
                if tx.send(started).await.is_err() {
                    return false;
                }
            }
        }
        let mut attempts = 0;
        let mut failures = 0;
        let outcome = loop {
            attempts += 1;
            match self.attempt(m, model, messages.clone()).await {
                Ok(output) => match clarification_question(&output) {
                    Some(question) => {
                        let (reply, answer) = oneshot::channel();
                        let ask = Command::Ask {
                            prompt,
                            model: m,
                            question: question.to_owned(),
                            output: output.clone(),
                            reply,
                        };
                        if tx.send(ask).await.is_err() {
                            return false;
                        }
                        let Ok(answer) = answer.await else {
                            return false;
                        };
                        messages.push(ChatMessage::new(Role::Assistant, output));
                        messages.push(ChatMessage::new(Role::User, answer));
                        failures = 0;
                    }
                    None => break Ok(output),
                },
                Err(failure) => {
                    failures += 1;
                    if !failure.retry || failures > model.config.retries {
                        break Err(failure.message);
                    }
                    let backoff = self
                        .settings
                        .retry_backoff_ms
                        .saturating_mul(1 << (failures - 1).min(16));
                    tokio::time::sleep(Duration::from_millis(backoff)).await;
                }
            }
        };
        let ok = outcome.is_ok();
        let finished = Command::Finished {
            prompt,
            model: m,
            outcome,
            attempts,
        };
        tx.send(finished).await.is_ok() && ok
    }

    /// One request, streamed, bounded by the model's timeout, its output limit and the
    /// concurrency limits.
    async fn attempt(
        &self,
        m: usize,
        model: &Model,
        messages: Vec<ChatMessage>,
    ) -> Result<String, Failure> {
        // The semaphores are never closed.
        let _global = self.global.acquire().await.map_err(Failure::internal)?;
        let _model = model.limit.acquire().await.map_err(Failure::internal)?;
        let timeout = model.config.timeout();
        let started = Instant::now();
        let streamed =
            tokio::time::timeout(timeout, self.stream(m, model, messages, started)).await;
        let outcome = match &streamed {
            Ok(Ok(_)) => AttemptOutcome::Ok,
            Ok(Err(_)) => AttemptOutcome::Error,
            Err(_) => AttemptOutcome::Timeout,
        };
        let timings = &self.metrics.timings;
        timings
            .provider_duration(model.config.provider, outcome)
            .observe(started.elapsed());
        match streamed {
            Ok(result) => result,
            Err(_) => {
                let secs = timeout.as_secs();
                tracing::warn!(session_id = %self.session_id, model = %model.config.name, timeout_secs = secs, "the provider did not finish in time");
                Err(Failure::retry(format!(
                    "the provider timed out after {secs} s"
                )))
            }
        }
    }

    /// The attempt that began at `started`: the model's output, streamed.
    async fn stream(
        &self,
        m: usize,
        model: &Model,
        messages: Vec<ChatMessage>,
        started: Instant,
    ) -> Result<String, Failure> {
        let mut pieces = model
            .provider
            .chat(messages)
            .await
            .map_err(|e| self.provider_failed(model, &e))?;
        let mut throttle =
            PartialThrottle::new(Duration::from_millis(self.settings.update_interval_ms));
        let mut output = String::new();
        while let Some(piece) = pieces.next().await {
            let piece = piece.map_err(|e| self.provider_failed(model, &e))?;
            if output.is_empty() && !piece.is_empty() {
                let first_token = self
                    .metrics
                    .timings
                    .provider_first_token(model.config.provider);
                first_token.observe(started.elapsed());
            }
            output.push_str(&piece);
            if output.len() > self.max_output {
                // Returning drops `pieces`, and with it the provider's request. Another
                // attempt would most likely run away the same way: it is not retried.
                tracing::warn!(session_id = %self.session_id, model = %model.config.name, limit = self.max_output, "the model's output exceeded the limit; stopped it");
                return Err(Failure {
                    message: format!("the model's output exceeded {} bytes", self.max_output),
                    retry: false,
                });
            }
            if !output.is_empty() && !is_question_so_far(&output) && throttle.due(output.len()) {
                let partial = Command::Partial {
                    prompt: self.prompt,
                    model: m,
                    output: output.clone(),
                };
                if self.tx.send(partial).await.is_err() {
                    return Err(Failure {
                        message: "the session ended".into(),
                        retry: false,
                    });
                }
            }
        }
        Ok(output)
    }

    /// A provider's failure: the whole story for the server log, a short stable message for
    /// clients (never the provider's text, which may hold URLs, keys or prompts).
    fn provider_failed(&self, model: &Model, error: &ProviderError) -> Failure {
        tracing::warn!(session_id = %self.session_id, model = %model.config.name, %error, "a provider request failed");
        Failure::retry(error.public_message())
    }
}

/// Why an attempt failed.
struct Failure {
    /// What clients see (`model_result.error`, the result's `error`): short and stable.
    message: String,
    /// Whether another attempt may help (within the model's `retries`).
    retry: bool,
}

impl Failure {
    fn retry(message: String) -> Self {
        Self {
            message,
            retry: true,
        }
    }

    fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "a model call could not start");
        Self::retry("herald could not start the model call".into())
    }
}

/// When a partial `model_result` goes out. Each one carries the whole output so far (SPEC §1:
/// `result` is the output so far), so a partial per interval alone would cost O(n²) bytes
/// for a long answer from a fast model. A partial also waits until the output has grown by
/// an eighth since the last one: the partials' sizes then grow geometrically, and all of
/// them together carry at most about nine times the final output, however it is streamed.
struct PartialThrottle {
    interval: Duration,
    last_at: Instant,
    last_len: usize,
}

impl PartialThrottle {
    fn new(interval: Duration) -> Self {
        Self {
            interval,
            last_at: Instant::now(),
            last_len: 0,
        }
    }

    /// Whether output of `len` bytes should be sent now; if so, counts it as sent.
    fn due(&mut self, len: usize) -> bool {
        let grown = len > self.last_len + self.last_len / 8;
        if !grown || self.last_at.elapsed() < self.interval {
            return false;
        }
        self.last_at = Instant::now();
        self.last_len = len;
        true
    }
}

/// Whether a partial output is (or may still become) a clarification request, which must
/// not be shown as an answer.
fn is_question_so_far(output: &str) -> bool {
    let start = output.trim_start();
    start.starts_with(CLARIFICATION_MARKER) || CLARIFICATION_MARKER.starts_with(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes carried by the partials of an output that grows `step` bytes at a time to `len`.
    fn partial_bytes(len: usize, step: usize) -> usize {
        let mut throttle = PartialThrottle::new(Duration::ZERO);
        (step..=len)
            .step_by(step)
            .filter(|&n| throttle.due(n))
            .sum()
    }

    #[test]
    fn partials_of_any_answer_cost_linear_bytes() {
        for (len, step) in [(1_000, 1), (100_000, 5), (1_000_000, 100)] {
            let sent = partial_bytes(len, step);
            assert!(
                sent <= 9 * len,
                "{sent} bytes of partials for a {len}-byte answer in {step}-byte pieces"
            );
        }
    }

    #[test]
    fn deadlines_keep_their_wall_clock_time_through_a_checkpoint() {
        let deadline = Instant::now() + Duration::from_secs(90);
        let back = instant_of(unix_ms_of(deadline));
        let drift = if back > deadline {
            back - deadline
        } else {
            deadline - back
        };
        assert!(drift < Duration::from_millis(20), "{drift:?}");
        // A deadline that passed while no node ran the session is due at once.
        assert!(instant_of(unix_ms_of(Instant::now()).saturating_sub(60_000)) <= Instant::now());
    }

    #[test]
    fn a_short_answer_still_streams_piece_by_piece() {
        let mut throttle = PartialThrottle::new(Duration::ZERO);
        assert!((1..=8).all(|n| throttle.due(n)));
    }
}
