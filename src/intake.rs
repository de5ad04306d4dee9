//! Producer ingest: the one parser of what producers send, for the HTTP route
//! (`POST /api/sessions/{id}/events`) and the Redis ingest stream alike.
//!
//! A batch is one `{ event, data, idempotencyKey? }` or an array of them, at most
//! `max_batch` long and never empty; every item is validated ([`validate_item`]) and the
//! batch is refused whole when one item is bad (the error names its index).
//!
//! **Reserved idempotency keys.** herald's own idempotency keys (its Redis ingest's default
//! keys, [`ingest_key`]) live in the namespace [`RESERVED_KEY_PREFIX`]. A producer key in
//! it is refused, so no producer can make herald take one of its own events for a
//! duplicate (or the other way round).
//!
//! **Sessions herald runs.** A session herald's orchestrator is running has one publisher,
//! its run; [`admit`] refuses producer events for it (`SESSION_RUN_BY_HERALD`), on any node.

use async_trait::async_trait;
use serde_json::Value;

use crate::auth::Principal;
use crate::error::ErrorCode;
use crate::event::{EventDraft, IngestItem, validate_item, validate_session_id};

/// Idempotency keys starting with this belong to herald itself.
pub const RESERVED_KEY_PREFIX: &str = "herald:";

/// Why a producer's batch was refused; [`IntakeError::code`] is the machine-readable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntakeError {
    #[error("the body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("expected {{ event, data }} or an array of them")]
    NotABatch,
    #[error("the batch has no events")]
    EmptyBatch,
    #[error("a batch holds at most {max} events")]
    BatchTooLarge { max: usize },
    #[error("item {index}: {message}")]
    InvalidItem { index: usize, message: String },
    #[error(
        "item {index}: idempotency keys starting with `{RESERVED_KEY_PREFIX}` are reserved for herald"
    )]
    ReservedKey { index: usize },
    #[error("item {index}: its data is {bytes} bytes serialized; an event holds at most {max}")]
    EventTooLarge { index: usize, bytes: u64, max: u64 },
    #[error("{0}")]
    InvalidSessionId(String),
    #[error("herald runs session `{0}` itself: its events come from its run only")]
    RunByHerald(String),
    /// Whether herald runs the session could not be found out; asking again may work.
    #[error("the cluster backend is unavailable: {0}")]
    Backend(String),
}

impl IntakeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidJson(_) => ErrorCode::InvalidJson,
            Self::NotABatch | Self::InvalidItem { .. } => ErrorCode::InvalidEvent,
            Self::EmptyBatch => ErrorCode::EmptyBatch,
            Self::BatchTooLarge { .. } => ErrorCode::BatchTooLarge,
            Self::EventTooLarge { .. } => ErrorCode::EventTooLarge,
            Self::ReservedKey { .. } => ErrorCode::ReservedIdempotencyKey,
            Self::InvalidSessionId(_) => ErrorCode::InvalidSessionId,
            Self::RunByHerald(_) => ErrorCode::SessionRunByHerald,
            Self::Backend(_) => ErrorCode::BackendUnavailable,
        }
    }
}

/// Knows which sessions herald's orchestrator runs (on this node, or on any in a cluster).
#[async_trait]
pub trait Runs: Send + Sync + 'static {
    async fn runs(&self, session_id: &str) -> Result<bool, IntakeError>;
}

/// Refuses producer events for a session herald runs itself: its run is its only
/// publisher, so its counts and its last event stay its own. An operator (an `admin`
/// credential) is let through: repairing a stuck session is theirs to do.
pub async fn admit(
    runs: &dyn Runs,
    session_id: &str,
    caller: &Principal,
) -> Result<(), IntakeError> {
    if !caller.is_operator() && runs.runs(session_id).await? {
        return Err(IntakeError::RunByHerald(session_id.to_owned()));
    }
    Ok(())
}

/// Parses a JSON body (bytes) into a validated batch for `session_id`.
pub fn parse_body(
    session_id: &str,
    body: &[u8],
    max_batch: usize,
) -> Result<Vec<EventDraft>, IntakeError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| IntakeError::InvalidJson(e.to_string()))?;
    parse_batch(session_id, value, max_batch)
}

/// Parses one item or an array of items into validated drafts for `session_id`.
pub fn parse_batch(
    session_id: &str,
    value: Value,
    max_batch: usize,
) -> Result<Vec<EventDraft>, IntakeError> {
    let values = match value {
        Value::Array(values) => values,
        single @ Value::Object(_) => vec![single],
        _ => return Err(IntakeError::NotABatch),
    };
    if values.is_empty() {
        return Err(IntakeError::EmptyBatch);
    }
    if values.len() > max_batch {
        return Err(IntakeError::BatchTooLarge { max: max_batch });
    }
    values
        .into_iter()
        .enumerate()
        .map(|(index, value)| parse_item(session_id, index, value))
        .collect()
}

fn parse_item(session_id: &str, index: usize, value: Value) -> Result<EventDraft, IntakeError> {
    let invalid = |message: String| IntakeError::InvalidItem { index, message };
    let shape = "(expected { event, data, idempotencyKey? })";
    // A derived `Deserialize` would also take an array of the fields in order, which no
    // producer means.
    if !value.is_object() {
        return Err(invalid(format!("{shape} must be a JSON object")));
    }
    let item: IngestItem =
        serde_json::from_value(value).map_err(|e| invalid(format!("{shape}: {e}")))?;
    let draft = validate_item(session_id, item).map_err(|e| invalid(e.message))?;
    if draft
        .idempotency_key
        .as_deref()
        .is_some_and(|key| key.starts_with(RESERVED_KEY_PREFIX))
    {
        return Err(IntakeError::ReservedKey { index });
    }
    Ok(draft)
}

/// Refuses a batch with an event whose serialized `data` is over `max_bytes`
/// (`--max-event-bytes`). Measured without building the JSON.
pub fn check_event_sizes(drafts: &[EventDraft], max_bytes: u64) -> Result<(), IntakeError> {
    for (index, draft) in drafts.iter().enumerate() {
        let bytes = crate::event::json_len(&draft.data) as u64;
        if bytes > max_bytes {
            return Err(IntakeError::EventTooLarge {
                index,
                bytes,
                max: max_bytes,
            });
        }
    }
    Ok(())
}

/// A Redis ingest stream entry's payload: `{ sessionId, event, data, idempotencyKey? }` or
/// `{ sessionId, events: [ … ] }`. Returns the session id and its validated batch.
pub fn parse_stream_payload(
    payload: &str,
    max_batch: usize,
) -> Result<(String, Vec<EventDraft>), IntakeError> {
    let value: Value =
        serde_json::from_str(payload).map_err(|e| IntakeError::InvalidJson(e.to_string()))?;
    let Value::Object(mut entry) = value else {
        return Err(IntakeError::NotABatch);
    };
    let session_id = match entry.remove("sessionId") {
        Some(Value::String(id)) => id,
        _ => {
            return Err(IntakeError::InvalidSessionId(
                "`sessionId` must be a string".into(),
            ));
        }
    };
    validate_session_id(&session_id).map_err(|e| IntakeError::InvalidSessionId(e.to_string()))?;
    let batch = match entry.remove("events") {
        Some(events @ Value::Array(_)) if entry.is_empty() => events,
        Some(_) if !entry.is_empty() => {
            return Err(IntakeError::InvalidItem {
                index: 0,
                message: "an entry holds either `events` or one event, not both".into(),
            });
        }
        Some(_) => return Err(IntakeError::NotABatch),
        None => Value::Object(entry),
    };
    let drafts = parse_batch(&session_id, batch, max_batch)?;
    Ok((session_id, drafts))
}

/// The Redis ingest's own idempotency key for item `index` of stream entry `entry_id`
/// (`None` for an entry that holds one event), so an entry handled twice is logged once.
pub fn ingest_key(entry_id: &str, index: Option<usize>) -> String {
    match index {
        None => format!("{RESERVED_KEY_PREFIX}ingest:{entry_id}"),
        Some(index) => format!("{RESERVED_KEY_PREFIX}ingest:{entry_id}:{index}"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn progress(key: Option<&str>) -> Value {
        let mut item = json!({"event": "progress", "data": {"status": "ACTIVE", "progress": 1}});
        if let Some(key) = key {
            item["idempotencyKey"] = json!(key);
        }
        item
    }

    fn code(result: Result<Vec<EventDraft>, IntakeError>) -> &'static str {
        result.expect_err("refused").code().as_str()
    }

    #[test]
    fn one_item_or_an_array_within_the_limit() {
        assert_eq!(parse_batch("s", progress(None), 2).unwrap().len(), 1);
        let two = json!([progress(Some("a")), progress(None)]);
        let drafts = parse_batch("s", two, 2).unwrap();
        assert_eq!(drafts[0].idempotency_key.as_deref(), Some("a"));
        assert_eq!(code(parse_batch("s", json!([]), 2)), "EMPTY_BATCH");
        let three = json!([progress(None), progress(None), progress(None)]);
        assert_eq!(code(parse_batch("s", three, 2)), "BATCH_TOO_LARGE");
        assert_eq!(code(parse_batch("s", json!("x"), 2)), "INVALID_EVENT");
        assert_eq!(code(parse_body("s", b"{", 2)), "INVALID_JSON");
    }

    #[test]
    fn a_bad_item_is_named_by_its_index() {
        let batch = json!([progress(None), {"event": "progress", "data": {}}]);
        let error = parse_batch("s", batch, 5).unwrap_err();
        assert_eq!(error.code(), ErrorCode::InvalidEvent);
        assert!(error.to_string().starts_with("item 1: "), "{error}");
    }

    #[test]
    fn keys_in_herald_s_namespace_are_refused() {
        let batch = json!([progress(Some("job:1")), progress(Some("herald:ingest:1-0"))]);
        let error = parse_batch("s", batch, 5).unwrap_err();
        assert_eq!(error, IntakeError::ReservedKey { index: 1 });
        assert_eq!(error.code(), ErrorCode::ReservedIdempotencyKey);
        // Only the prefix is reserved.
        assert!(parse_batch("s", progress(Some("heraldic:1")), 5).is_ok());
    }

    #[test]
    fn stream_payloads_carry_their_session() {
        let one =
            r#"{"sessionId":"s1","event":"progress","data":{"status":"ACTIVE","progress":1}}"#;
        let (session_id, drafts) = parse_stream_payload(one, 5).unwrap();
        assert_eq!((session_id.as_str(), drafts.len()), ("s1", 1));
        let batch = json!({"sessionId": "s1", "events": [progress(None), progress(None)]});
        let (_, drafts) = parse_stream_payload(&batch.to_string(), 5).unwrap();
        assert_eq!(drafts.len(), 2);
        let refused = |payload: &str, max| {
            parse_stream_payload(payload, max)
                .unwrap_err()
                .code()
                .as_str()
        };
        assert_eq!(refused(&batch.to_string(), 1), "BATCH_TOO_LARGE");
        assert_eq!(
            refused(r#"{"sessionId":"s1","events":[]}"#, 5),
            "EMPTY_BATCH"
        );
        assert_eq!(
            refused(r#"{"event":"progress","data":{}}"#, 5),
            "INVALID_SESSION_ID"
        );
        assert_eq!(refused("not json", 5), "INVALID_JSON");
    }

    #[test]
    fn ingest_keys_are_reserved() {
        assert_eq!(ingest_key("1-0", None), "herald:ingest:1-0");
        assert_eq!(ingest_key("1-0", Some(2)), "herald:ingest:1-0:2");
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzzing::Fuzz;

    const SEEDS: &[&[u8]] = &[
        br#"{"event":"progress","data":{"status":"PROCESSING","progress":12.5,"prompts":{"total":2,"completed":0,"processing":1,"pending":1,"failed":0}},"idempotencyKey":"k-1"}"#,
        br#"[{"event":"model_result","data":{"promptId":"p1","modelName":"m","status":"completed","result":"out","duration":42}},{"event":"completed","data":{"result":{"a":1}}}]"#,
        br#"{"event":"clarification","data":{"clarificationId":"c-1","question":"Which year?","status":"pending"}}"#,
        br#"{"event":"error","data":{"error":"boom","code":"MODEL_FAILED"}}"#,
    ];

    /// Whatever the body, the answer is a batch within bounds or an error clients are told
    /// about with a 4xx status: never a panic, never a 5xx for bad input.
    #[test]
    fn fuzz_ingest_bodies() {
        Fuzz::new("ingest body").run(SEEDS, |input| match parse_body("fuzz-session", input, 10) {
            Ok(drafts) => {
                assert!((1..=10).contains(&drafts.len()), "{} drafts", drafts.len());
                let _ = check_event_sizes(&drafts, 64);
            }
            Err(error) => assert!(error.code().http_status().is_client_error(), "{error:?}"),
        });
    }

    /// The Redis ingest stream's entries: `{ sessionId, event, data }` or `{ sessionId, events }`.
    #[test]
    fn fuzz_stream_payloads() {
        let seeds: Vec<Vec<u8>> = SEEDS
            .iter()
            .map(|seed| {
                let body: Value = serde_json::from_slice(seed).unwrap();
                let entry = match body {
                    Value::Array(events) => {
                        serde_json::json!({"sessionId": "s-1", "events": events})
                    }
                    Value::Object(mut item) => {
                        item.insert("sessionId".into(), "s-1".into());
                        Value::Object(item)
                    }
                    _ => unreachable!(),
                };
                serde_json::to_vec(&entry).unwrap()
            })
            .collect();
        let seeds: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
        Fuzz::new("ingest stream entry").run(&seeds, |input| {
            let payload = String::from_utf8_lossy(input);
            match parse_stream_payload(&payload, 10) {
                Ok((session_id, drafts)) => {
                    assert!(crate::event::validate_session_id(&session_id).is_ok());
                    assert!((1..=10).contains(&drafts.len()));
                }
                Err(error) => assert!(error.code().http_status().is_client_error(), "{error:?}"),
            }
        });
    }
}
