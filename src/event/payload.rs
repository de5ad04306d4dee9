//! The five session events as herald itself emits them (SPEC §1), one type each.
//!
//! The orchestrator builds its events from these types, so their field names, spellings
//! and order are those of the types: camelCase, in declaration order (`serde_json` keeps
//! it, with `preserve_order`), optional fields left out when absent. `sessionId`, `seq`
//! and `timestamp` are not here: they are the server's, and [`finalize`](super::finalize)
//! adds them when the event is logged.
//!
//! Producers' events are not parsed into these types: ingest keeps the map a producer
//! sent, unknown fields and all (SPEC §1), and checks only the fields herald relies on
//! ([`validate_item`](super::validate_item)). The types also read herald's own events back
//! (the demo, tests); a producer's event may lack fields they require.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{ClarificationStatus, EventDraft, EventKind, ModelStatus, SessionStatus};
use crate::error::ErrorCode;
use crate::store::PromptCounts;

/// A session event's payload. Its kind goes with its type, so no payload is logged under
/// another event's name.
pub trait Payload: Serialize {
    const KIND: EventKind;

    /// The event, ready for the log.
    fn draft(&self) -> EventDraft {
        let data = match serde_json::to_value(self) {
            Ok(Value::Object(data)) => data,
            Ok(_) | Err(_) => unreachable!("session payloads serialize to JSON objects"),
        };
        EventDraft {
            kind: Self::KIND,
            data,
            idempotency_key: None,
        }
    }
}

/// `progress`: the session's status and counts, after each state change of a run.
///
/// `R` is the result's type: a run emits its own typed result; read back, any object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress<R = Map<String, Value>> {
    pub status: SessionStatus,
    /// 0 to 100; never decreases within a run.
    pub progress: u64,
    pub prompts: PromptCounts,
    /// Whether any clarification is pending.
    pub has_clarifications: bool,
    /// Pending clarifications.
    pub clarification_count: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub has_result: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<R>,
}

/// `model_result`: one model's state on one prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelResult {
    pub prompt_id: String,
    pub model_name: String,
    /// `ollama`, `openai`, `simulated`.
    pub provider: String,
    /// Milliseconds since this model started on this prompt.
    pub duration: u64,
    /// The output; while `status` is `processing`, the partial output so far.
    pub result: String,
    pub status: ModelStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Which start of this model on this prompt the event belongs to, from 2: present only
    /// once a run resumed on another node (or after a restart) started the unit again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
}

/// `clarification`: a question a model asked, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClarificationEvent {
    /// A UUID.
    pub clarification_id: String,
    pub question: String,
    pub status: ClarificationStatus,
    /// A run says which of its prompts and models asked; an answer logged for a session
    /// that runs nowhere does not know.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub asked_by: Option<AskedBy>,
    /// Once `answered`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
}

/// `completed`: the session's result. `R` as in [`Progress`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completed<R = Map<String, Value>> {
    pub result: R,
}

/// `error`: the session failed. (Protocol errors sent to one socket are not session
/// events: they have no `seq` and are not logged.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEvent {
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
}

impl ErrorEvent {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: message.into(),
            code: Some(code),
        }
    }
}

/// Where a clarification came from: `promptId` and `modelName`, both or neither.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AskedBy {
    pub prompt_id: String,
    pub model_name: String,
}

impl<R: Serialize> Payload for Progress<R> {
    const KIND: EventKind = EventKind::Progress;
}

impl Payload for ModelResult {
    const KIND: EventKind = EventKind::ModelResult;
}

impl Payload for ClarificationEvent {
    const KIND: EventKind = EventKind::Clarification;
}

impl<R: Serialize> Payload for Completed<R> {
    const KIND: EventKind = EventKind::Completed;
}

impl Payload for ErrorEvent {
    const KIND: EventKind = EventKind::Error;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::validate_data;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    fn object(value: Value) -> Map<String, Value> {
        let Value::Object(map) = value else {
            panic!("{value} is not an object")
        };
        map
    }

    /// The payload's draft is exactly `expected`, field order included; herald's own event
    /// passes the checks producers' events get; and it reads back as itself.
    fn emits<P>(payload: P, expected: Value)
    where
        P: Payload + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let draft = payload.draft();
        assert_eq!(draft.kind, P::KIND);
        assert_eq!(draft.idempotency_key, None);
        let expected = object(expected);
        let keys = |m: &Map<String, Value>| m.keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&draft.data), keys(&expected));
        assert_eq!(draft.data, expected);
        validate_data("s", P::KIND, &draft.data).expect("a valid event");
        let read: P = serde_json::from_value(Value::Object(draft.data)).unwrap();
        assert_eq!(read, payload);
    }

    fn counts() -> PromptCounts {
        PromptCounts {
            total: 3,
            completed: 1,
            processing: 1,
            pending: 0,
            failed: 1,
        }
    }

    #[test]
    fn progress_leaves_out_the_result_until_there_is_one() {
        let mut progress = Progress {
            status: SessionStatus::Processing,
            progress: 66,
            prompts: counts(),
            has_clarifications: true,
            clarification_count: 1,
            has_result: None,
            result: None,
        };
        let prompts =
            json!({ "total": 3, "completed": 1, "processing": 1, "pending": 0, "failed": 1 });
        emits(
            progress.clone(),
            json!({
                "status": "PROCESSING", "progress": 66, "prompts": prompts,
                "hasClarifications": true, "clarificationCount": 1,
            }),
        );
        progress.has_result = Some(true);
        progress.result = Some(object(json!({ "prompts": [] })));
        emits(
            progress,
            json!({
                "status": "PROCESSING", "progress": 66, "prompts": prompts,
                "hasClarifications": true, "clarificationCount": 1,
                "hasResult": true, "result": { "prompts": [] },
            }),
        );
    }

    #[test]
    fn model_result_has_an_error_only_when_failed() {
        let mut result = ModelResult {
            prompt_id: "p1".into(),
            model_name: "llama3.1:8b".into(),
            provider: "ollama".into(),
            duration: 12,
            result: "partial".into(),
            status: ModelStatus::Processing,
            error: None,
            attempt: None,
        };
        emits(
            result.clone(),
            json!({
                "promptId": "p1", "modelName": "llama3.1:8b", "provider": "ollama",
                "duration": 12, "result": "partial", "status": "processing",
            }),
        );
        result.status = ModelStatus::Failed;
        result.result = String::new();
        result.error = Some("timed out".into());
        emits(
            result,
            json!({
                "promptId": "p1", "modelName": "llama3.1:8b", "provider": "ollama",
                "duration": 12, "result": "", "status": "failed", "error": "timed out",
            }),
        );
    }

    #[test]
    fn clarification_names_its_asker_and_answer_when_known() {
        let asked = ClarificationEvent {
            clarification_id: "c1".into(),
            question: "Which sea?".into(),
            status: ClarificationStatus::Pending,
            asked_by: Some(AskedBy {
                prompt_id: "p2".into(),
                model_name: "sim-fast".into(),
            }),
            answer: None,
        };
        emits(
            asked.clone(),
            json!({
                "clarificationId": "c1", "question": "Which sea?", "status": "pending",
                "promptId": "p2", "modelName": "sim-fast",
            }),
        );
        emits(
            ClarificationEvent {
                status: ClarificationStatus::Answered,
                answer: Some("the North Sea".into()),
                ..asked.clone()
            },
            json!({
                "clarificationId": "c1", "question": "Which sea?", "status": "answered",
                "promptId": "p2", "modelName": "sim-fast", "answer": "the North Sea",
            }),
        );
        emits(
            ClarificationEvent {
                status: ClarificationStatus::Answered,
                asked_by: None,
                answer: Some("the North Sea".into()),
                ..asked
            },
            json!({
                "clarificationId": "c1", "question": "Which sea?", "status": "answered",
                "answer": "the North Sea",
            }),
        );
    }

    #[test]
    fn completed_and_error_events() {
        let result = object(json!({ "strategy": "all", "models": ["m"], "prompts": [] }));
        emits(
            Completed { result },
            json!({ "result": { "strategy": "all", "models": ["m"], "prompts": [] } }),
        );
        emits(
            ErrorEvent::new(ErrorCode::Cancelled, "the session was cancelled"),
            json!({ "error": "the session was cancelled", "code": "CANCELLED" }),
        );
        let uncoded = ErrorEvent {
            error: "boom".into(),
            code: None,
        };
        emits(uncoded, json!({ "error": "boom" }));
    }
}
