//! The five session events, their validation and the session id rules.
//!
//! Producers send `{ event, data }`; this module turns that into an [`EventDraft`] or a
//! precise [`InvalidEvent`]. Validation checks the fields herald itself relies on and
//! keeps every other field verbatim (SPEC §1: unknown extra fields are kept). The events
//! herald emits itself are built from the typed payloads of [`payload`].

mod payload;

use std::fmt;

use chrono::{SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use payload::{
    AskedBy, ClarificationEvent, Completed, ErrorEvent, ModelResult, Payload, Progress,
};

/// Longest session id accepted (SPEC §1: `^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$`).
pub const MAX_SESSION_ID_LEN: usize = 128;
/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;

/// Bytes of `value` serialized as JSON, without building the text.
pub fn json_len(value: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail, and a JSON value always serializes.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// Now, as ISO 8601 UTC with milliseconds (`2026-11-22T02:07:08.123Z`).
pub fn now_timestamp() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSessionId {
    #[error("session id is empty")]
    Empty,
    #[error("session id is longer than {MAX_SESSION_ID_LEN} characters")]
    TooLong,
    #[error("session id must match ^[A-Za-z0-9][A-Za-z0-9_.:-]{{0,127}}$")]
    IllFormed,
}

/// Checks a session id against SPEC §1 without a regex engine.
pub fn validate_session_id(id: &str) -> Result<(), InvalidSessionId> {
    let bytes = id.as_bytes();
    let Some(first) = bytes.first() else {
        return Err(InvalidSessionId::Empty);
    };
    if bytes.len() > MAX_SESSION_ID_LEN {
        return Err(InvalidSessionId::TooLong);
    }
    let rest_ok = bytes[1..]
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    if first.is_ascii_alphanumeric() && rest_ok {
        Ok(())
    } else {
        Err(InvalidSessionId::IllFormed)
    }
}

/// The five events a session emits, named as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Progress,
    ModelResult,
    Clarification,
    Completed,
    Error,
}

impl EventKind {
    pub const ALL: [EventKind; 5] = [
        EventKind::Progress,
        EventKind::ModelResult,
        EventKind::Clarification,
        EventKind::Completed,
        EventKind::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Progress => "progress",
            EventKind::ModelResult => "model_result",
            EventKind::Clarification => "clarification",
            EventKind::Completed => "completed",
            EventKind::Error => "error",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// Session status (SPEC §1 `progress.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SessionStatus {
    Active,
    Processing,
    Completed,
    Failed,
    Expired,
}

impl SessionStatus {
    pub const ALL: [SessionStatus; 5] = [
        SessionStatus::Active,
        SessionStatus::Processing,
        SessionStatus::Completed,
        SessionStatus::Failed,
        SessionStatus::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Active => "ACTIVE",
            SessionStatus::Processing => "PROCESSING",
            SessionStatus::Completed => "COMPLETED",
            SessionStatus::Failed => "FAILED",
            SessionStatus::Expired => "EXPIRED",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// A terminal session starts its TTL countdown.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            SessionStatus::Completed | SessionStatus::Failed | SessionStatus::Expired
        )
    }
}

impl fmt::Display for SessionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A model's state on a prompt (SPEC §1 `model_result.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelStatus {
    /// Started, or streaming: `result` is the partial output so far.
    Processing,
    Completed,
    Failed,
}

impl ModelStatus {
    pub const ALL: [ModelStatus; 3] = [
        ModelStatus::Processing,
        ModelStatus::Completed,
        ModelStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ModelStatus::Processing => "processing",
            ModelStatus::Completed => "completed",
            ModelStatus::Failed => "failed",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// A clarification's state (SPEC §1 `clarification.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClarificationStatus {
    /// Asked, waiting for its answer.
    Pending,
    Answered,
    /// Not answered in time, or left open when its session ended.
    Expired,
}

impl ClarificationStatus {
    pub const ALL: [ClarificationStatus; 3] = [
        ClarificationStatus::Pending,
        ClarificationStatus::Answered,
        ClarificationStatus::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ClarificationStatus::Pending => "pending",
            ClarificationStatus::Answered => "answered",
            ClarificationStatus::Expired => "expired",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for ClarificationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated event about to be logged. `data` has no `seq` yet; the log assigns it.
#[derive(Debug, Clone, PartialEq)]
pub struct EventDraft {
    pub kind: EventKind,
    pub data: Map<String, Value>,
    pub idempotency_key: Option<String>,
}

impl EventDraft {
    /// Whether logging this event ends the session: its `completed` or `error`, or a
    /// `progress` `EXPIRED` (how a run whose question went unanswered ends). (A `progress`
    /// `COMPLETED` or `FAILED` does not: producers commonly send one just before their
    /// `completed` or `error`.)
    pub fn ends_session(&self) -> bool {
        match self.kind {
            EventKind::Completed | EventKind::Error => true,
            EventKind::Progress => {
                self.data.get("status").and_then(Value::as_str)
                    == Some(SessionStatus::Expired.as_str())
            }
            _ => false,
        }
    }
}

/// Why a producer's event was refused. The message names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidEvent {
    pub message: String,
}

impl InvalidEvent {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

/// One item of an ingest request, as sent by a producer.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngestItem {
    pub event: Value,
    pub data: Value,
    #[serde(default)]
    pub idempotency_key: Option<Value>,
}

/// The kind of value a field must hold.
#[derive(Clone, Copy)]
enum Field {
    Str,
    Number,
    Bool,
    Object,
    Percent,
    Count,
    /// The wire name of one of a status enum's variants.
    Status(StatusOf),
}

/// Which status enum a `status` field holds.
#[derive(Clone, Copy)]
enum StatusOf {
    Session,
    Model,
    Clarification,
}

impl StatusOf {
    fn accepts(self, name: &str) -> bool {
        match self {
            StatusOf::Session => SessionStatus::parse(name).is_some(),
            StatusOf::Model => ModelStatus::parse(name).is_some(),
            StatusOf::Clarification => ClarificationStatus::parse(name).is_some(),
        }
    }

    fn names(self) -> Vec<&'static str> {
        match self {
            StatusOf::Session => SessionStatus::ALL.map(SessionStatus::as_str).to_vec(),
            StatusOf::Model => ModelStatus::ALL.map(ModelStatus::as_str).to_vec(),
            StatusOf::Clarification => ClarificationStatus::ALL
                .map(ClarificationStatus::as_str)
                .to_vec(),
        }
    }
}

impl Field {
    fn accepts(self, value: &Value) -> bool {
        match self {
            Field::Str => value.is_string(),
            Field::Number => value.is_number(),
            Field::Bool => value.is_boolean(),
            Field::Object => value.is_object(),
            Field::Percent => value.as_f64().is_some_and(|p| (0.0..=100.0).contains(&p)),
            Field::Count => value.as_u64().is_some(),
            Field::Status(of) => value.as_str().is_some_and(|s| of.accepts(s)),
        }
    }

    fn describe(self) -> String {
        match self {
            Field::Str => "a string".into(),
            Field::Number => "a number".into(),
            Field::Bool => "a boolean".into(),
            Field::Object => "an object".into(),
            Field::Percent => "a number from 0 to 100".into(),
            Field::Count => "a non-negative integer".into(),
            Field::Status(of) => format!("one of {}", of.names().join(", ")),
        }
    }
}

/// `(field, required, type)` for each event kind. Fields not listed are kept untouched.
fn schema(kind: EventKind) -> &'static [(&'static str, bool, Field)] {
    match kind {
        EventKind::Progress => &[
            ("status", true, Field::Status(StatusOf::Session)),
            ("progress", true, Field::Percent),
            ("prompts", false, Field::Object),
            ("hasClarifications", false, Field::Bool),
            ("clarificationCount", false, Field::Count),
            ("hasResult", false, Field::Bool),
            ("result", false, Field::Object),
        ],
        EventKind::ModelResult => &[
            ("promptId", true, Field::Str),
            ("modelName", true, Field::Str),
            ("status", true, Field::Status(StatusOf::Model)),
            ("provider", false, Field::Str),
            ("duration", false, Field::Number),
            ("result", false, Field::Str),
            ("error", false, Field::Str),
        ],
        EventKind::Clarification => &[
            ("clarificationId", true, Field::Str),
            ("question", true, Field::Str),
            ("status", true, Field::Status(StatusOf::Clarification)),
            ("answer", false, Field::Str),
        ],
        EventKind::Completed => &[("result", true, Field::Object)],
        EventKind::Error => &[("error", true, Field::Str), ("code", false, Field::Str)],
    }
}

const PROMPT_COUNTS: [&str; 5] = ["total", "completed", "processing", "pending", "failed"];

/// Validates one producer item for `session_id` and fills what the server owns.
pub fn validate_item(session_id: &str, item: IngestItem) -> Result<EventDraft, InvalidEvent> {
    let name = item
        .event
        .as_str()
        .ok_or_else(|| InvalidEvent::new("`event` must be a string"))?;
    let kind = EventKind::parse(name).ok_or_else(|| {
        InvalidEvent::new(format!(
            "unknown event `{name}`: expected one of progress, model_result, clarification, completed, error"
        ))
    })?;
    let Value::Object(data) = item.data else {
        return Err(InvalidEvent::new("`data` must be an object"));
    };
    let idempotency_key = match item.idempotency_key {
        None | Some(Value::Null) => None,
        Some(Value::String(key)) if !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY_LEN => {
            Some(key)
        }
        Some(_) => {
            return Err(InvalidEvent::new(format!(
                "`idempotencyKey` must be a non-empty string of at most {MAX_IDEMPOTENCY_KEY_LEN} bytes"
            )));
        }
    };
    validate_data(session_id, kind, &data)?;
    Ok(EventDraft {
        kind,
        data,
        idempotency_key,
    })
}

fn validate_data(
    session_id: &str,
    kind: EventKind,
    data: &Map<String, Value>,
) -> Result<(), InvalidEvent> {
    let event = kind.as_str();
    for &(field, required, ty) in schema(kind) {
        match data.get(field) {
            None if required => {
                return Err(InvalidEvent::new(format!(
                    "{event}: `data.{field}` is required"
                )));
            }
            Some(value) if !ty.accepts(value) => {
                return Err(InvalidEvent::new(format!(
                    "{event}: `data.{field}` must be {}",
                    ty.describe()
                )));
            }
            _ => {}
        }
    }
    if let Some(Value::Object(prompts)) = data.get("prompts") {
        for key in PROMPT_COUNTS {
            if prompts.get(key).is_some_and(|v| v.as_u64().is_none()) {
                return Err(InvalidEvent::new(format!(
                    "{event}: `data.prompts.{key}` must be a non-negative integer"
                )));
            }
        }
    }
    match data.get("sessionId") {
        Some(Value::String(id)) if id != session_id => {
            return Err(InvalidEvent::new(format!(
                "{event}: `data.sessionId` is `{id}` but the event was posted to `{session_id}`"
            )));
        }
        Some(Value::String(_)) | None => {}
        Some(_) => {
            return Err(InvalidEvent::new(format!(
                "{event}: `data.sessionId` must be a string"
            )));
        }
    }
    if data.get("timestamp").is_some_and(|t| !t.is_string()) {
        return Err(InvalidEvent::new(format!(
            "{event}: `data.timestamp` must be a string"
        )));
    }
    Ok(())
}

/// Puts the fields only the server may set onto a draft's data, in SPEC order
/// (`sessionId`, `seq` first so that payloads read naturally).
pub fn finalize(session_id: &str, seq: u64, data: Map<String, Value>) -> Map<String, Value> {
    with_identity(session_id, seq, finalize_body(data))
}

/// The draft's fields without `sessionId` and `seq`, with `timestamp` last (filled when
/// missing). Backends that learn `seq` only when they store the event serialize this part
/// before they know it.
pub fn finalize_body(data: Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::with_capacity(data.len() + 1);
    let mut timestamp = None;
    for (key, value) in data {
        match key.as_str() {
            "sessionId" | "seq" => {}
            "timestamp" => timestamp = Some(value),
            _ => {
                out.insert(key, value);
            }
        }
    }
    out.insert(
        "timestamp".into(),
        timestamp.unwrap_or_else(|| Value::String(now_timestamp())),
    );
    out
}

/// `{ sessionId, seq, ...body }`.
pub fn with_identity(session_id: &str, seq: u64, body: Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::with_capacity(body.len() + 2);
    out.insert("sessionId".into(), Value::String(session_id.to_owned()));
    out.insert("seq".into(), Value::from(seq));
    out.extend(body);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_len_is_the_serialized_length() {
        let value = serde_json::json!({ "k": "vé", "n": [1, 2] });
        assert_eq!(super::json_len(&value), value.to_string().len());
    }

    use super::*;
    use serde_json::json;

    #[test]
    fn session_ids_follow_the_spec() {
        assert!(validate_session_id("a").is_ok());
        assert!(validate_session_id("Session_1.2:3-x").is_ok());
        assert!(validate_session_id(&"a".repeat(128)).is_ok());
        assert_eq!(validate_session_id(""), Err(InvalidSessionId::Empty));
        assert_eq!(
            validate_session_id(&"a".repeat(129)),
            Err(InvalidSessionId::TooLong)
        );
        assert_eq!(validate_session_id("-a"), Err(InvalidSessionId::IllFormed));
        assert_eq!(validate_session_id("a b"), Err(InvalidSessionId::IllFormed));
        assert_eq!(validate_session_id("é"), Err(InvalidSessionId::IllFormed));
    }

    fn item(v: Value) -> IngestItem {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn progress_needs_status_and_percent() {
        let ok = validate_item(
            "s",
            item(json!({"event":"progress","data":{"status":"ACTIVE","progress":5,"x":1}})),
        );
        assert_eq!(ok.unwrap().data["x"], 1);
        for bad in [
            json!({"status":"ACTIVE"}),
            json!({"status":"NOPE","progress":1}),
            json!({"status":"ACTIVE","progress":101}),
            json!({"status":"ACTIVE","progress":1,"prompts":{"total":-1}}),
            json!({"status":"ACTIVE","progress":1,"sessionId":"other"}),
        ] {
            let err = validate_item("s", item(json!({"event":"progress","data":bad})));
            assert!(err.is_err(), "{bad} should be refused");
        }
    }

    /// Each status's wire name, checking that serde spells it as `as_str` does.
    fn wire_names<T>(all: &[T], as_str: fn(T) -> &'static str) -> Vec<&'static str>
    where
        T: Copy + PartialEq + std::fmt::Debug + Serialize + serde::de::DeserializeOwned,
    {
        all.iter()
            .map(|&status| {
                let json = serde_json::to_value(status).unwrap();
                assert_eq!(json, as_str(status));
                assert_eq!(serde_json::from_value::<T>(json).unwrap(), status);
                as_str(status)
            })
            .collect()
    }

    /// The wire spellings clients match on, and validation names exactly these.
    #[test]
    fn statuses_keep_their_wire_names() {
        assert_eq!(
            wire_names(&SessionStatus::ALL, SessionStatus::as_str),
            ["ACTIVE", "PROCESSING", "COMPLETED", "FAILED", "EXPIRED"]
        );
        assert_eq!(
            wire_names(&ModelStatus::ALL, ModelStatus::as_str),
            ["processing", "completed", "failed"]
        );
        assert_eq!(
            wire_names(&ClarificationStatus::ALL, ClarificationStatus::as_str),
            ["pending", "answered", "expired"]
        );
        let data = json!({ "promptId": "p", "modelName": "m", "status": "PROCESSING" });
        let refused = validate_item("s", item(json!({ "event": "model_result", "data": data })));
        assert_eq!(
            refused.unwrap_err().message,
            "model_result: `data.status` must be one of processing, completed, failed"
        );
    }

    #[test]
    fn finalize_puts_server_fields_first_and_keeps_extras() {
        let data = json!({"seq": 99, "extra": true, "timestamp": "t"});
        let Value::Object(map) = data else {
            unreachable!()
        };
        let out = finalize("s1", 7, map);
        let keys: Vec<_> = out.keys().cloned().collect();
        assert_eq!(keys, ["sessionId", "seq", "extra", "timestamp"]);
        assert_eq!(out["seq"], 7);
        assert_eq!(out["timestamp"], "t");
    }

    #[test]
    fn timestamps_have_milliseconds_and_z() {
        let t = now_timestamp();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[19] == b'.');
    }
}
