//! The catalogue of error codes herald puts on the wire.
//!
//! Every refusal a client can see — an HTTP error body, a Socket.IO `error` event or
//! failing ack, the `code` of a session's `error` event, a refusal forwarded between
//! nodes — names one [`ErrorCode`]. The code decides the HTTP status and whether trying
//! again later may succeed, so no module picks a status by matching strings. The wire
//! spelling is SCREAMING_SNAKE and never changes once published (clients match on it);
//! docs/protocol.md lists them.

use std::fmt;
use std::str::FromStr;

use axum::http::StatusCode;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One row per code: variant, wire string, HTTP status, retryable. The macro writes the
/// enum and its lookups from this single table, so a code cannot be added half-way.
macro_rules! catalogue {
    ($( $(#[$doc:meta])* $variant:ident => $wire:literal, $status:ident, $retryable:literal; )*) => {
        /// A machine-readable error code (see the module documentation).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )*
        }

        impl ErrorCode {
            /// Every code, in catalogue order.
            pub const ALL: &'static [ErrorCode] = &[$( ErrorCode::$variant, )*];

            /// The wire spelling, e.g. `"SESSION_NOT_FOUND"`.
            pub const fn as_str(self) -> &'static str {
                match self { $( ErrorCode::$variant => $wire, )* }
            }

            /// The status of an HTTP answer carrying this code. Codes that only travel in
            /// events or over Socket.IO have the status such an answer would have.
            pub const fn http_status(self) -> StatusCode {
                match self { $( ErrorCode::$variant => StatusCode::$status, )* }
            }

            /// Whether the same request may succeed later, unchanged (a limit, an outage).
            pub const fn is_retryable(self) -> bool {
                match self { $( ErrorCode::$variant => $retryable, )* }
            }
        }
    };
}

catalogue! {
    // Requests that are malformed, whatever the transport.
    /// A request body (HTTP) that does not hold the expected fields.
    InvalidRequest => "INVALID_REQUEST", BAD_REQUEST, false;
    /// A Socket.IO request's argument that is not what the event takes.
    InvalidPayload => "INVALID_PAYLOAD", BAD_REQUEST, false;
    /// A session id that breaks SPEC §1's pattern.
    InvalidSessionId => "INVALID_SESSION_ID", BAD_REQUEST, false;
    /// A URL path segment that cannot be read (not UTF-8 once percent-decoded).
    InvalidPath => "INVALID_PATH", BAD_REQUEST, false;
    /// A query string parameter of the wrong type or out of range.
    InvalidQuery => "INVALID_QUERY", BAD_REQUEST, false;
    /// A body that could not be read (the status is the reader's).
    InvalidBody => "INVALID_BODY", BAD_REQUEST, false;
    /// An ingest body that is not JSON.
    InvalidJson => "INVALID_JSON", BAD_REQUEST, false;
    /// An ingest item that is not a valid session event.
    InvalidEvent => "INVALID_EVENT", BAD_REQUEST, false;
    /// A Redis ingest stream entry without a `payload` field.
    InvalidEntry => "INVALID_ENTRY", BAD_REQUEST, false;
    /// An ingest batch with no events.
    EmptyBatch => "EMPTY_BATCH", BAD_REQUEST, false;
    /// An ingest batch over `--max-batch`.
    BatchTooLarge => "BATCH_TOO_LARGE", BAD_REQUEST, false;
    /// A producer idempotency key in herald's own `herald:` namespace.
    ReservedIdempotencyKey => "RESERVED_IDEMPOTENCY_KEY", BAD_REQUEST, false;
    /// A Socket.IO event herald does not handle.
    UnknownEvent => "UNKNOWN_EVENT", BAD_REQUEST, false;
    /// A model name that is not configured.
    UnknownModel => "UNKNOWN_MODEL", BAD_REQUEST, false;
    /// A body over `--max-body`.
    PayloadTooLarge => "PAYLOAD_TOO_LARGE", PAYLOAD_TOO_LARGE, false;
    /// An ingest event whose serialized `data` is over `--max-event-bytes`.
    EventTooLarge => "EVENT_TOO_LARGE", PAYLOAD_TOO_LARGE, false;
    /// A body that is not `application/json`.
    UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE", UNSUPPORTED_MEDIA_TYPE, false;
    /// A session's prompt whose text is over `--max-prompt-bytes`.
    PromptTooLarge => "PROMPT_TOO_LARGE", BAD_REQUEST, false;
    /// A session with more prompts than `--max-prompts`.
    TooManyPrompts => "TOO_MANY_PROMPTS", BAD_REQUEST, false;
    /// A session's `metadata` whose JSON is over `--max-metadata-bytes`.
    MetadataTooLarge => "METADATA_TOO_LARGE", BAD_REQUEST, false;
    /// A clarification answer over `--max-answer-bytes`.
    AnswerTooLarge => "ANSWER_TOO_LARGE", BAD_REQUEST, false;

    // Credentials (SPEC §5).
    /// No credential was presented, or it names no API key.
    Unauthorized => "UNAUTHORIZED", UNAUTHORIZED, false;
    /// A token that cannot be trusted: malformed, wrong signature, audience or issuer.
    InvalidToken => "INVALID_TOKEN", UNAUTHORIZED, false;
    /// A token past its `exp` (a live socket is disconnected then); get a fresh one.
    TokenExpired => "TOKEN_EXPIRED", UNAUTHORIZED, false;
    /// A valid credential that does not allow this on this session.
    Forbidden => "FORBIDDEN", FORBIDDEN, false;
    /// A browser page whose origin is not in the allow-list (`--cors-origins`).
    OriginNotAllowed => "ORIGIN_NOT_ALLOWED", FORBIDDEN, false;

    // Things that do not exist.
    /// No such route.
    NotFound => "NOT_FOUND", NOT_FOUND, false;
    /// The route exists, not with this method.
    MethodNotAllowed => "METHOD_NOT_ALLOWED", METHOD_NOT_ALLOWED, false;
    /// No session with this id.
    SessionNotFound => "SESSION_NOT_FOUND", NOT_FOUND, false;
    /// No clarification with this id in the session.
    ClarificationNotFound => "CLARIFICATION_NOT_FOUND", NOT_FOUND, false;

    // Conflicts with the session's state.
    /// The clarification was already answered or has expired.
    ClarificationClosed => "CLARIFICATION_CLOSED", CONFLICT, false;
    /// The session has already ended (e.g. a second cancel).
    SessionEnded => "SESSION_ENDED", CONFLICT, false;
    /// Producer ingest into a session herald's orchestrator runs.
    SessionRunByHerald => "SESSION_RUN_BY_HERALD", CONFLICT, false;

    // Limits: the same request may pass later.
    /// A rate limit is exceeded: a socket's requests, or HTTP requests per address or
    /// credential (with `Retry-After`).
    RateLimited => "RATE_LIMITED", TOO_MANY_REQUESTS, true;
    /// The socket follows as many sessions as it may; it must unsubscribe first.
    TooManySubscriptions => "TOO_MANY_SUBSCRIPTIONS", BAD_REQUEST, false;
    /// As many orchestrated sessions run as `--max-running-sessions` (or, for this
    /// subject, `--max-running-sessions-per-subject`) allow; retry after `Retry-After`.
    TooManyRuns => "TOO_MANY_RUNS", TOO_MANY_REQUESTS, true;
    /// herald holds `--max-sessions` sessions: a new one is refused until some expire
    /// (`Retry-After`).
    TooManySessions => "TOO_MANY_SESSIONS", SERVICE_UNAVAILABLE, true;
    /// A request body not sent within `--body-timeout-ms`; the connection is closed.
    RequestTimeout => "REQUEST_TIMEOUT", REQUEST_TIMEOUT, true;
    /// The socket did not drain its queue and is disconnected; it recovers by replay.
    SlowConsumer => "SLOW_CONSUMER", SERVICE_UNAVAILABLE, true;

    // Ends of sessions, carried by `error` events.
    /// The session was cancelled.
    Cancelled => "CANCELLED", CONFLICT, false;
    /// Every prompt failed on every model.
    AllPromptsFailed => "ALL_PROMPTS_FAILED", BAD_GATEWAY, false;
    /// The node running the session stopped; start the session again.
    NodeLost => "NODE_LOST", SERVICE_UNAVAILABLE, true;

    // Failures of herald or what it depends on.
    /// The socket went away while its request was served.
    SocketGone => "SOCKET_GONE", GONE, false;
    /// The node running the session did not answer a forwarded command.
    NodeUnavailable => "NODE_UNAVAILABLE", SERVICE_UNAVAILABLE, true;
    /// Redis is unreachable.
    BackendUnavailable => "BACKEND_UNAVAILABLE", SERVICE_UNAVAILABLE, true;
    /// `/readyz`: the backend does not answer yet.
    NotReady => "NOT_READY", SERVICE_UNAVAILABLE, true;
    /// Anything else that went wrong inside herald.
    Internal => "INTERNAL", INTERNAL_SERVER_ERROR, true;
}

/// A wire string that names no [`ErrorCode`] (e.g. from a newer node).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error code `{0}`")]
pub struct UnknownErrorCode(pub String);

impl FromStr for ErrorCode {
    type Err = UnknownErrorCode;

    fn from_str(wire: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|code| code.as_str() == wire)
            .ok_or_else(|| UnknownErrorCode(wire.to_owned()))
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Serialized as its wire string, so `json!({ "code": ErrorCode::Cancelled })` is the
/// event clients already know.
impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        wire.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/protocol.md's catalogue names every code a client can be sent.
    #[test]
    fn the_protocol_doc_names_every_code() {
        let doc = include_str!("../docs/protocol.md");
        let missing: Vec<&str> = ErrorCode::ALL
            .iter()
            .map(|code| code.as_str())
            .filter(|wire| !doc.contains(&format!("`{wire}`")))
            .collect();
        assert!(missing.is_empty(), "not in docs/protocol.md: {missing:?}");
    }

    #[test]
    fn wire_strings_are_unique_screaming_snake_and_round_trip() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            let wire = code.as_str();
            assert!(
                wire.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{wire}"
            );
            assert_eq!(wire.parse::<ErrorCode>(), Ok(*code));
            let json = serde_json::to_value(code).unwrap();
            assert_eq!(json, wire);
            assert_eq!(serde_json::from_value::<ErrorCode>(json).unwrap(), *code);
            assert!(
                ErrorCode::ALL[..i]
                    .iter()
                    .all(|other| other.as_str() != wire),
                "{wire} twice"
            );
        }
        assert!("NO_SUCH_CODE".parse::<ErrorCode>().is_err());
    }

    #[test]
    fn statuses_and_retryability_follow_the_spec() {
        let expected = [
            (ErrorCode::ReservedIdempotencyKey, 400, false),
            (ErrorCode::SessionRunByHerald, 409, false),
            (ErrorCode::BackendUnavailable, 503, true),
            (ErrorCode::RateLimited, 429, true),
            (ErrorCode::SessionNotFound, 404, false),
            (ErrorCode::ClarificationClosed, 409, false),
            (ErrorCode::SessionEnded, 409, false),
            (ErrorCode::NodeUnavailable, 503, true),
            (ErrorCode::InvalidPath, 400, false),
            (ErrorCode::Internal, 500, true),
            (ErrorCode::TooManyRuns, 429, true),
            (ErrorCode::PromptTooLarge, 400, false),
            (ErrorCode::TooManyPrompts, 400, false),
            (ErrorCode::MetadataTooLarge, 400, false),
            (ErrorCode::AnswerTooLarge, 400, false),
            (ErrorCode::RequestTimeout, 408, true),
            (ErrorCode::EventTooLarge, 413, false),
            (ErrorCode::TooManySessions, 503, true),
        ];
        for (code, status, retryable) in expected {
            assert_eq!(
                (code.http_status().as_u16(), code.is_retryable()),
                (status, retryable),
                "{code}"
            );
        }
    }
}
