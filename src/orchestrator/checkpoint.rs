//! A run's checkpoint (SPEC §7): what another node, or this one after a restart, needs to
//! resume the run without running a finished unit again.
//!
//! A run saves its checkpoint in the session store (the data dir, or Redis) at every state
//! change, *before* it logs the events of that change, and the checkpoint carries those
//! events (the outbox) with their idempotency keys. So the checkpoint is never behind the
//! log by more than its outbox: a node that resumes the run logs the outbox first (events
//! already logged are refused as duplicates by their keys), and the run's state and its log
//! agree again. Partial outputs are logged without a checkpoint; they are lost with the
//! unit's progress, which starts again.
//!
//! Each resume starts a new *generation* of the run's keys, saved before the generation
//! logs anything, so no key of an event logged without a checkpoint is ever used twice.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Strategy;
use crate::event::{ClarificationStatus, EventDraft, EventKind};

/// Bumped when the format changes incompatibly: an older checkpoint is then not resumed
/// (its session ends `NODE_LOST`).
pub(crate) const FORMAT: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Checkpoint {
    pub format: u32,
    pub strategy: Strategy,
    pub prompts: Vec<SavedPrompt>,
    /// The session's models, by name, in its order.
    pub models: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Per prompt, per model.
    pub units: Vec<Vec<SavedUnit>>,
    pub done: u64,
    pub clarifications: Vec<SavedClarification>,
    /// The generation of the run's idempotency keys that saved this checkpoint.
    pub generation: u32,
    /// The events this checkpoint accounts for, about to be logged when it was saved.
    pub outbox: Vec<SavedEvent>,
    /// The run decided its end: the outbox holds its last events.
    pub ended: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SavedPrompt {
    pub id: String,
    pub text: String,
    pub status: PromptStatus,
}

/// A prompt's state, as the run's result names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum PromptStatus {
    Pending,
    Processing,
    Completed,
    Failed,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SavedUnit {
    /// How many times the unit started, on any node.
    pub starts: u32,
    /// When its latest start began (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Result<String, String>>,
    pub duration_ms: u64,
    pub attempts: u32,
    /// The clarifications the unit asked and got an answer to, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub answered: Vec<Answered>,
}

/// One question a model asked, and the answer it got: the conversation a restarted unit
/// replays to its model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Answered {
    /// The model's whole output that asked.
    pub output: String,
    pub answer: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SavedClarification {
    pub id: String,
    pub status: ClarificationStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// While pending: who asked, what, and until when (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<SavedQuestion>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SavedQuestion {
    pub prompt: usize,
    pub model: usize,
    pub question: String,
    pub output: String,
    pub deadline_ms: u64,
}

/// An event of the outbox, with its key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SavedEvent {
    pub kind: EventKind,
    pub data: Map<String, Value>,
    pub key: Option<String>,
}

impl From<&EventDraft> for SavedEvent {
    fn from(event: &EventDraft) -> Self {
        Self {
            kind: event.kind,
            data: event.data.clone(),
            key: event.idempotency_key.clone(),
        }
    }
}

impl From<SavedEvent> for EventDraft {
    fn from(event: SavedEvent) -> Self {
        EventDraft {
            kind: event.kind,
            data: event.data,
            idempotency_key: event.key,
        }
    }
}

/// Why a saved run cannot be resumed here.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unresumable {
    #[error("its checkpoint is unreadable: {0}")]
    Corrupt(String),
    #[error("its checkpoint was written by a herald with another format ({0})")]
    Format(u32),
    #[error("this node has no model `{0}`")]
    UnknownModel(String),
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("checkpoints serialize")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, Unresumable> {
        let checkpoint: Checkpoint =
            serde_json::from_slice(bytes).map_err(|e| Unresumable::Corrupt(e.to_string()))?;
        if checkpoint.format != FORMAT {
            return Err(Unresumable::Format(checkpoint.format));
        }
        let shape_ok = checkpoint.units.len() == checkpoint.prompts.len()
            && checkpoint
                .units
                .iter()
                .all(|units| units.len() == checkpoint.models.len())
            && checkpoint.clarifications.iter().all(|c| {
                c.pending.as_ref().is_none_or(|q| {
                    q.prompt < checkpoint.prompts.len() && q.model < checkpoint.models.len()
                })
            });
        if !shape_ok {
            return Err(Unresumable::Corrupt(
                "its units do not match its prompts and models".into(),
            ));
        }
        Ok(checkpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            format: FORMAT,
            strategy: Strategy::All,
            prompts: vec![SavedPrompt {
                id: "p1".into(),
                text: "a fox".into(),
                status: PromptStatus::Processing,
            }],
            models: vec!["m1".into(), "m2".into()],
            owner: Some("alice".into()),
            units: vec![vec![
                SavedUnit {
                    starts: 1,
                    outcome: Some(Ok("done".into())),
                    ..SavedUnit::default()
                },
                SavedUnit::default(),
            ]],
            done: 1,
            clarifications: vec![SavedClarification {
                id: "c1".into(),
                status: ClarificationStatus::Pending,
                answer: None,
                pending: Some(SavedQuestion {
                    prompt: 0,
                    model: 1,
                    question: "which?".into(),
                    output: "CLARIFICATION_NEEDED: which?".into(),
                    deadline_ms: 1,
                }),
            }],
            generation: 3,
            outbox: Vec::new(),
            ended: false,
        }
    }

    #[test]
    fn a_checkpoint_reads_back_as_written() {
        let read = Checkpoint::decode(&checkpoint().encode()).unwrap();
        assert_eq!(read.generation, 3);
        assert_eq!(read.units[0][0].outcome, Some(Ok("done".into())));
        assert_eq!(read.clarifications[0].pending.as_ref().unwrap().model, 1);
    }

    #[test]
    fn garbage_another_format_or_a_wrong_shape_is_unresumable_not_a_panic() {
        assert!(matches!(
            Checkpoint::decode(b"not json"),
            Err(Unresumable::Corrupt(_))
        ));
        assert!(matches!(
            Checkpoint::decode(b""),
            Err(Unresumable::Corrupt(_))
        ));
        let mut other = checkpoint();
        other.format = FORMAT + 1;
        assert!(matches!(
            Checkpoint::decode(&other.encode()),
            Err(Unresumable::Format(_))
        ));
        let mut short = checkpoint();
        short.units[0].pop();
        assert!(matches!(
            Checkpoint::decode(&short.encode()),
            Err(Unresumable::Corrupt(_))
        ));
        let mut stray = checkpoint();
        stray.clarifications[0].pending.as_mut().unwrap().prompt = 5;
        assert!(matches!(
            Checkpoint::decode(&stray.encode()),
            Err(Unresumable::Corrupt(_))
        ));
    }
}
