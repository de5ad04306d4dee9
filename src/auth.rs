//! Who is calling and what they may do (SPEC §5): credentials, principals, permissions.
//!
//! Every way in (the Socket.IO handshake, HTTP, and any later transport) hands the
//! credential it found to [`Auth::authenticate`] and asks [`Principal::authorize`] before it
//! touches a session, so the rules live here once. Auth is off until a JWT key or an API
//! key is configured; then every caller is a [`Principal`] with scopes, session patterns
//! and, for tokens, an expiry.
//!
//! Tokens are verified by `jsonwebtoken` (HS256 with `--jwt-secret`, RS256 or ES256 with
//! `--jwt-public-key`); the algorithm a token names picks the key, and only the configured
//! algorithms are accepted, so an HS256 token can never be checked against a public key.
//! API keys are kept as SHA-256 digests and compared in constant time.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, header};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{ApiKeyDigest, Config, Secret};
use crate::error::ErrorCode;
use crate::hub::{Hub, HubError};

/// One permission, as named in a token's `scope` or an API key's scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Read,
    Answer,
    Cancel,
    Create,
    Publish,
    Admin,
}

impl Scope {
    const ALL: [Scope; 6] = [
        Scope::Read,
        Scope::Answer,
        Scope::Cancel,
        Scope::Create,
        Scope::Publish,
        Scope::Admin,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Answer => "answer",
            Scope::Cancel => "cancel",
            Scope::Create => "create",
            Scope::Publish => "publish",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    const fn bit(self) -> u8 {
        1 << self as u8
    }

    /// What the scope lets a caller do to a session, for refusals.
    const fn verb(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Answer => "answer clarifications of",
            Scope::Cancel => "cancel",
            Scope::Create => "create",
            Scope::Publish => "publish to",
            Scope::Admin => "administer",
        }
    }

    /// Whether owning a session grants this scope on it (the owner may read, answer and
    /// cancel; publishing needs a pattern that covers the session).
    const fn owner_may(self) -> bool {
        matches!(self, Scope::Read | Scope::Answer | Scope::Cancel)
    }
}

/// A set of [`Scope`]s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    /// A token without `scope`: `read answer cancel`.
    pub const DEFAULT: Scopes =
        Scopes(Scope::Read.bit() | Scope::Answer.bit() | Scope::Cancel.bit());
    pub const ALL: Scopes = Scopes(0b11_1111);

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    fn insert(&mut self, scope: Scope) {
        self.0 |= scope.bit();
    }

    /// Parses scope names; names herald does not know (another service's scopes in a shared
    /// token, say) are ignored, as OAuth resource servers do.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut scopes = Scopes::default();
        for scope in names.into_iter().filter_map(Scope::parse) {
            scopes.insert(scope);
        }
        scopes
    }

    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Scope::ALL
            .into_iter()
            .filter(move |s| self.contains(*s))
            .map(Scope::as_str)
    }
}

/// A session id, a prefix ending in `*`, or `*` for every session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionPattern {
    Any,
    Prefix(String),
    Exact(String),
}

impl SessionPattern {
    pub fn parse(pattern: &str) -> Self {
        match pattern.strip_suffix('*') {
            Some("") => SessionPattern::Any,
            Some(prefix) => SessionPattern::Prefix(prefix.to_owned()),
            None => SessionPattern::Exact(pattern.to_owned()),
        }
    }

    pub fn matches(&self, session_id: &str) -> bool {
        match self {
            SessionPattern::Any => true,
            SessionPattern::Prefix(prefix) => session_id.starts_with(prefix.as_str()),
            SessionPattern::Exact(id) => id == session_id,
        }
    }
}

/// `[*]`, shared: a connection with auth off allocates nothing for its principal.
fn every_session() -> Arc<[SessionPattern]> {
    static ANY: std::sync::LazyLock<Arc<[SessionPattern]>> =
        std::sync::LazyLock::new(|| Arc::new([SessionPattern::Any]));
    ANY.clone()
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// `sub` of a token, `key:<name>` for an API key; `None` while auth is off.
    subject: Option<Arc<str>>,
    scopes: Scopes,
    sessions: Arc<[SessionPattern]>,
    /// When a token stops being accepted (its `exp` plus the leeway).
    valid_until: Option<SystemTime>,
}

impl Principal {
    /// The caller while auth is off: everything is allowed, nothing is owned.
    pub fn anonymous() -> Self {
        Self {
            subject: None,
            scopes: Scopes::ALL,
            sessions: every_session(),
            valid_until: None,
        }
    }

    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }

    pub fn valid_until(&self) -> Option<SystemTime> {
        self.valid_until
    }

    /// `admin` may do everything, on every session.
    pub fn is_admin(&self) -> bool {
        self.scopes.contains(Scope::Admin)
    }

    /// An `admin` credential actually presented (not auth being off): what may override
    /// protections meant for everyone else, such as producing into a session herald runs.
    pub fn is_operator(&self) -> bool {
        self.subject.is_some() && self.is_admin()
    }

    pub fn has(&self, scope: Scope) -> bool {
        self.is_admin() || self.scopes.contains(scope)
    }

    /// Whether the credential's own session patterns name the session.
    pub fn covers(&self, session_id: &str) -> bool {
        self.is_admin() || self.sessions.iter().any(|p| p.matches(session_id))
    }

    /// Whether the caller may see this session in a listing.
    pub fn may_read(&self, session_id: &str, owner: Option<&str>) -> bool {
        self.has(Scope::Read) && (self.covers(session_id) || self.owns(owner))
    }

    fn owns(&self, owner: Option<&str>) -> bool {
        matches!((self.subject(), owner), (Some(me), Some(owner)) if me == owner)
    }

    /// Requires `scope` without a session (creating one, `/metrics`).
    pub fn require(&self, scope: Scope) -> Result<(), Denied> {
        if self.has(scope) {
            Ok(())
        } else {
            Err(Denied::Forbidden(format!(
                "this credential lacks the `{}` scope",
                scope.as_str()
            )))
        }
    }

    /// Requires `scope` on `session_id`: by the credential's patterns, or (for read, answer
    /// and cancel) by owning the session. The owner is looked up only when the patterns do
    /// not already decide, so a covered caller costs no read.
    pub async fn authorize(&self, hub: &Hub, scope: Scope, session_id: &str) -> Result<(), Denied> {
        self.require(scope)?;
        if self.covers(session_id) {
            return Ok(());
        }
        if scope.owner_may() && self.subject.is_some() {
            let owner = hub.owner(session_id).await.map_err(Denied::Backend)?;
            if self.owns(owner.as_deref()) {
                return Ok(());
            }
        }
        Err(Denied::Forbidden(format!(
            "this credential may not {} session `{session_id}`",
            scope.verb()
        )))
    }
}

/// Why [`Principal::authorize`] said no.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    #[error("{0}")]
    Forbidden(String),
    /// The owner could not be looked up.
    #[error(transparent)]
    Backend(HubError),
}

/// A credential that was missing or not accepted. Its `Display` starts with the code
/// (`UNAUTHORIZED: ...`), which is what a Socket.IO `connect_error` carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("UNAUTHORIZED: {0}")]
    Unauthorized(String),
    #[error("INVALID_TOKEN: {0}")]
    InvalidToken(String),
    #[error("TOKEN_EXPIRED: {0}")]
    TokenExpired(String),
    /// A valid credential that may not use this way in (a publish-only key on a socket).
    #[error("FORBIDDEN: {0}")]
    Forbidden(String),
}

impl AuthError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Unauthorized(_) => ErrorCode::Unauthorized,
            AuthError::InvalidToken(_) => ErrorCode::InvalidToken,
            AuthError::TokenExpired(_) => ErrorCode::TokenExpired,
            AuthError::Forbidden(_) => ErrorCode::Forbidden,
        }
    }

    /// The explanation, without the code.
    pub fn detail(&self) -> &str {
        match self {
            AuthError::Unauthorized(m)
            | AuthError::InvalidToken(m)
            | AuthError::TokenExpired(m)
            | AuthError::Forbidden(m) => m,
        }
    }
}

/// A configuration that cannot verify anything.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("cannot read the JWT public key {path}: {source}")]
    ReadKey {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds neither an RSA nor an EC (P-256) public key in PEM")]
    BadKey { path: std::path::PathBuf },
    #[error("API key #{index} is not `name:secret:scope+scope`")]
    BadApiKey { index: usize },
    #[error("API key `{name}` has no scope herald knows (read answer cancel create publish admin)")]
    NoScopes { name: String },
    #[error("the JWT secret is empty")]
    EmptySecret,
    #[error("API key `{name}`: `sha256` is not 64 hex digits")]
    BadDigest { name: String },
}

/// An API key, as configured.
pub struct ApiKey {
    pub name: String,
    /// SHA-256 of the secret.
    pub digest: [u8; 32],
    pub scopes: Scopes,
    /// Session patterns; every session when empty.
    pub sessions: Vec<SessionPattern>,
}

impl ApiKey {
    /// Parses `name:secret:scope+scope` (`HERALD_API_KEYS`).
    pub fn parse(index: usize, spec: &str) -> Result<Self, AuthConfigError> {
        let mut parts = spec.trim().splitn(3, ':');
        let (Some(name), Some(secret), Some(scopes)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthConfigError::BadApiKey { index });
        };
        if name.is_empty() || secret.is_empty() {
            return Err(AuthConfigError::BadApiKey { index });
        }
        let key = Self {
            name: name.to_owned(),
            digest: Sha256::digest(secret.as_bytes()).into(),
            scopes: Scopes::from_names(scopes.split('+')),
            sessions: Vec::new(),
        };
        key.checked()
    }

    /// A key from the configuration file, given by its secret's SHA-256 and, optionally,
    /// the sessions it is limited to.
    pub fn from_digest(entry: &ApiKeyDigest) -> Result<Self, AuthConfigError> {
        let mut digest = [0u8; 32];
        hex::decode_to_slice(&entry.sha256, &mut digest).map_err(|_| {
            AuthConfigError::BadDigest {
                name: entry.name.clone(),
            }
        })?;
        Self {
            name: entry.name.clone(),
            digest,
            scopes: Scopes::from_names(entry.scopes.iter().map(String::as_str)),
            sessions: entry
                .sessions
                .iter()
                .map(|p| SessionPattern::parse(p))
                .collect(),
        }
        .checked()
    }

    fn checked(self) -> Result<Self, AuthConfigError> {
        if self.scopes == Scopes::default() {
            return Err(AuthConfigError::NoScopes { name: self.name });
        }
        Ok(self)
    }
}

struct KeyPrincipal {
    digest: [u8; 32],
    principal: Principal,
}

/// One accepted JWT algorithm: its key and the checks a token must pass.
struct JwtKey {
    algorithm: Algorithm,
    key: DecodingKey,
    validation: Validation,
}

struct Verifier {
    jwt: Vec<JwtKey>,
    keys: Vec<KeyPrincipal>,
    leeway: Duration,
}

/// The authenticator: off, or the configured JWT keys and API keys.
#[derive(Clone, Default)]
pub struct Auth(Option<Arc<Verifier>>);

/// What a JWT's claims say (`exp` and `nbf` are checked by `jsonwebtoken`).
#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: f64,
    #[serde(default)]
    sessions: Option<OneOrMany>,
    #[serde(default)]
    scope: Option<OneOrMany>,
}

/// A claim given as one string or an array of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl Auth {
    /// Auth off: every caller is [`Principal::anonymous`].
    pub fn disabled() -> Self {
        Self(None)
    }

    pub fn from_config(config: &Config) -> Result<Self, AuthConfigError> {
        let mut keys = config
            .api_keys
            .iter()
            .filter(|spec| !spec.expose().trim().is_empty())
            .enumerate()
            .map(|(index, spec)| ApiKey::parse(index + 1, spec.expose()))
            .collect::<Result<Vec<_>, _>>()?;
        for digest in &config.api_key_digests {
            keys.push(ApiKey::from_digest(digest)?);
        }
        Self::new(
            config.jwt_secret.as_ref(),
            config.jwt_public_key.as_deref(),
            JwtChecks {
                audience: config.jwt_audience.clone(),
                issuer: config.jwt_issuer.clone(),
                leeway: Duration::from_secs(config.jwt_leeway_secs),
            },
            keys,
        )
    }

    /// Builds the authenticator; it is off when nothing is configured.
    pub fn new(
        secret: Option<&Secret>,
        public_key: Option<&std::path::Path>,
        checks: JwtChecks,
        keys: Vec<ApiKey>,
    ) -> Result<Self, AuthConfigError> {
        let mut jwt = Vec::new();
        if let Some(secret) = secret {
            if secret.expose().is_empty() {
                return Err(AuthConfigError::EmptySecret);
            }
            let key = DecodingKey::from_secret(secret.expose().as_bytes())
                .map_err(|_| AuthConfigError::EmptySecret)?;
            jwt.push(checks.key(Algorithm::HS256, key));
        }
        if let Some(path) = public_key {
            let pem = std::fs::read(path).map_err(|source| AuthConfigError::ReadKey {
                path: path.to_owned(),
                source,
            })?;
            let (algorithm, key) = if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                (Algorithm::RS256, key)
            } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                (Algorithm::ES256, key)
            } else {
                return Err(AuthConfigError::BadKey {
                    path: path.to_owned(),
                });
            };
            jwt.push(checks.key(algorithm, key));
        }
        if jwt.is_empty() && keys.is_empty() {
            return Ok(Self::disabled());
        }
        let keys = keys
            .into_iter()
            .map(|key| KeyPrincipal {
                digest: key.digest,
                principal: Principal {
                    subject: Some(format!("key:{}", key.name).into()),
                    scopes: key.scopes,
                    sessions: if key.sessions.is_empty() {
                        every_session()
                    } else {
                        key.sessions.into()
                    },
                    valid_until: None,
                },
            })
            .collect();
        Ok(Self(Some(Arc::new(Verifier {
            jwt,
            keys,
            leeway: checks.leeway,
        }))))
    }

    pub fn is_enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Who presents `credential` (a JWT or an API key).
    pub fn authenticate(&self, credential: Option<&str>) -> Result<Principal, AuthError> {
        let Some(verifier) = &self.0 else {
            return Ok(Principal::anonymous());
        };
        let Some(credential) = credential.map(str::trim).filter(|c| !c.is_empty()) else {
            return Err(AuthError::Unauthorized(
                "no credentials: send a token or API key as `Authorization: Bearer ...`, \
                 socket.io `auth: { token }`, `X-Api-Key` or `?token=`"
                    .into(),
            ));
        };
        if let Some(principal) = verifier.api_key(credential) {
            return Ok(principal);
        }
        if credential.split('.').count() == 3 {
            return verifier.token(credential);
        }
        Err(AuthError::Unauthorized(
            "the credential is neither a token nor a known API key".into(),
        ))
    }
}

/// What every token must satisfy besides its signature.
#[derive(Debug, Clone, Default)]
pub struct JwtChecks {
    pub audience: Option<String>,
    pub issuer: Option<String>,
    pub leeway: Duration,
}

impl JwtChecks {
    fn key(&self, algorithm: Algorithm, key: DecodingKey) -> JwtKey {
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        // A configured audience or issuer must be present, not only right when present.
        let mut required = vec!["exp", "sub"];
        match &self.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        JwtKey {
            algorithm,
            key,
            validation,
        }
    }
}

impl Verifier {
    /// The API key whose secret `credential` is. Every key is compared, in constant time.
    fn api_key(&self, credential: &str) -> Option<Principal> {
        let digest: [u8; 32] = Sha256::digest(credential.as_bytes()).into();
        let mut found = None;
        for key in &self.keys {
            if bool::from(key.digest.ct_eq(&digest)) {
                found = Some(key.principal.clone());
            }
        }
        found
    }

    fn token(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::InvalidToken(format!("malformed token: {e}")))?;
        let Some(key) = self.jwt.iter().find(|k| k.algorithm == header.alg) else {
            return Err(AuthError::InvalidToken(if self.jwt.is_empty() {
                "herald accepts no tokens here (no JWT key is configured); use an API key".into()
            } else {
                format!("tokens signed with {:?} are not accepted", header.alg)
            }));
        };
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
            .map_err(|e| refusal(e.into_kind(), &key.validation))?
            .claims;
        if claims.sub.is_empty() {
            return Err(AuthError::InvalidToken("`sub` is empty".into()));
        }
        let scopes = match &claims.scope {
            None => Scopes::DEFAULT,
            Some(OneOrMany::One(names)) => Scopes::from_names(names.split_whitespace()),
            Some(OneOrMany::Many(names)) => Scopes::from_names(names.iter().map(String::as_str)),
        };
        let sessions: Arc<[SessionPattern]> = match &claims.sessions {
            None => Arc::new([]),
            Some(OneOrMany::One(pattern)) => Arc::new([SessionPattern::parse(pattern)]),
            Some(OneOrMany::Many(patterns)) => {
                patterns.iter().map(|p| SessionPattern::parse(p)).collect()
            }
        };
        let exp = Duration::try_from_secs_f64(claims.exp.max(0.0)).unwrap_or(Duration::MAX);
        let valid_until = UNIX_EPOCH
            .checked_add(exp)
            .and_then(|t| t.checked_add(self.leeway));
        // `jsonwebtoken` compares whole seconds and still accepts a token in its `exp`
        // second; a live socket is cut at `exp` itself, so the handshake must agree with it.
        if valid_until.is_some_and(|until| until <= SystemTime::now()) {
            return Err(AuthError::TokenExpired(
                "the token has expired; get a fresh one".into(),
            ));
        }
        Ok(Principal {
            subject: Some(claims.sub.into()),
            scopes,
            sessions,
            valid_until,
        })
    }
}

/// Says in words why `jsonwebtoken` refused a token.
fn refusal(kind: ErrorKind, validation: &Validation) -> AuthError {
    let invalid = |m: String| AuthError::InvalidToken(m);
    match kind {
        ErrorKind::ExpiredSignature => {
            AuthError::TokenExpired("the token has expired; get a fresh one".into())
        }
        ErrorKind::InvalidSignature => invalid("the signature does not verify".into()),
        ErrorKind::InvalidAudience => invalid(match &validation.aud {
            Some(aud) => format!(
                "wrong audience: `aud` must name {}",
                aud.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
            None => "wrong audience".into(),
        }),
        ErrorKind::InvalidIssuer => invalid("wrong issuer (`iss`)".into()),
        ErrorKind::ImmatureSignature => invalid("the token is not valid yet (`nbf`)".into()),
        ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => {
            invalid("the `aud` claim is required: tokens must name this server's audience".into())
        }
        ErrorKind::MissingRequiredClaim(claim) => {
            invalid(format!("the `{claim}` claim is required"))
        }
        ErrorKind::InvalidAlgorithm => invalid("the token's algorithm is not accepted".into()),
        ErrorKind::Json(error) => invalid(format!("unreadable claims: {error}")),
        other => invalid(format!("{other:?}")),
    }
}

/// The credential of an HTTP request or a Socket.IO handshake: `Authorization: Bearer`,
/// then `X-Api-Key`, then `?token=`.
pub fn credential(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?.trim();
        let (scheme, credential) = value.split_once(' ').unwrap_or((value, ""));
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| credential.trim().to_owned());
    }
    if let Some(key) = headers.get("x-api-key") {
        return key.to_str().ok().map(|k| k.trim().to_owned());
    }
    query.and_then(|query| {
        form_urlencoded::parse(query.as_bytes())
            .find(|(name, _)| name == "token")
            .map(|(_, token)| token.into_owned())
    })
}

/// Whether a browser page's `Origin` may open a Socket.IO or WebSocket connection. Browsers
/// apply CORS to HTTP requests but not to websocket handshakes, so herald checks them
/// itself against the CORS allow-list. Requests without `Origin` (non-browser clients) and
/// same-origin pages (herald's own dashboard) always pass.
#[derive(Debug, Clone)]
pub struct OriginPolicy {
    any: bool,
    allowed: Arc<[String]>,
}

impl OriginPolicy {
    pub fn new(dev: bool, allowed: &[String]) -> Self {
        Self {
            any: dev,
            allowed: allowed
                .iter()
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|o| !o.is_empty())
                .collect(),
        }
    }

    /// Whether a handshake may go on: no `Origin` (not a browser), or every `Origin` it
    /// carries is allowed (a client that sends two, as websocket-client does when given
    /// one, is judged by both).
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        if self.any {
            return true;
        }
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        headers
            .get_all(header::ORIGIN)
            .iter()
            .all(|origin| origin.to_str().is_ok_and(|o| self.allows_one(o, host)))
    }

    fn allows_one(&self, origin: &str, host: Option<&str>) -> bool {
        let origin = origin.trim().to_ascii_lowercase();
        if self.allowed.contains(&origin) {
            return true;
        }
        let authority = origin.split_once("://").map(|(_, rest)| rest);
        matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
    }
}

/// `herald token`: mints a development token from the configured HS256 secret.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// The token's subject (`sub`): who owns the sessions it creates.
    #[arg(long)]
    pub sub: String,
    /// Session patterns it may use (ids, `prefix*`, `*`), comma separated.
    #[arg(long, value_delimiter = ',')]
    pub sessions: Vec<String>,
    /// Scopes, comma or space separated (default: read answer cancel).
    #[arg(long)]
    pub scope: Option<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl_secs: u64,
    /// The `aud` claim.
    #[arg(long, env = "HERALD_JWT_AUDIENCE")]
    pub audience: Option<String>,
    /// The `iss` claim.
    #[arg(long, env = "HERALD_JWT_ISSUER")]
    pub issuer: Option<String>,
    /// The HS256 secret herald verifies with.
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Secret,
}

#[derive(Serialize)]
struct MintedClaims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sessions: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
}

/// Signs an HS256 token with `args`' claims.
pub fn mint(args: &TokenArgs) -> Result<String, jsonwebtoken::errors::Error> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let scope = args.scope.as_deref().map(|s| {
        s.split([',', ' '])
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    });
    let claims = MintedClaims {
        sub: &args.sub,
        exp: now.saturating_add(args.ttl_secs),
        iat: now,
        sessions: (!args.sessions.is_empty()).then_some(args.sessions.as_slice()),
        scope,
        aud: args.audience.as_deref(),
        iss: args.issuer.as_deref(),
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(args.jwt_secret.expose().as_bytes())?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &str = "test-secret-test-secret-test-secret";

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn auth(checks: JwtChecks, keys: &[&str]) -> Auth {
        let keys = keys
            .iter()
            .enumerate()
            .map(|(i, k)| ApiKey::parse(i, k).unwrap())
            .collect();
        Auth::new(Some(&Secret::new(SECRET)), None, checks, keys).unwrap()
    }

    fn sign(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn nothing_configured_means_off() {
        let auth = Auth::new(None, None, JwtChecks::default(), Vec::new()).unwrap();
        assert!(!auth.is_enabled());
        assert!(auth.authenticate(None).unwrap().is_admin());
    }

    #[test]
    fn a_valid_token_carries_its_claims() {
        let auth = auth(JwtChecks::default(), &[]);
        let token = sign(
            json!({ "sub": "alice", "exp": now() + 60, "sessions": ["user-42:*", "one"], "scope": "read create other" }),
            SECRET,
        );
        let alice = auth.authenticate(Some(&token)).unwrap();
        assert_eq!(alice.subject(), Some("alice"));
        assert!(alice.has(Scope::Read) && alice.has(Scope::Create));
        assert!(!alice.has(Scope::Answer) && !alice.is_admin());
        assert!(alice.covers("user-42:abc") && alice.covers("one"));
        assert!(!alice.covers("user-43:abc") && !alice.covers("one-more"));
        assert!(alice.valid_until().unwrap() > SystemTime::now());
    }

    #[test]
    fn scope_defaults_to_read_answer_cancel_and_sessions_to_owned_only() {
        let auth = auth(JwtChecks::default(), &[]);
        let token = sign(json!({ "sub": "bob", "exp": now() + 60 }), SECRET);
        let bob = auth.authenticate(Some(&token)).unwrap();
        assert_eq!(bob.scopes, Scopes::DEFAULT);
        assert!(!bob.covers("anything"));
        assert!(bob.may_read("s", Some("bob")));
        assert!(!bob.may_read("s", Some("alice")) && !bob.may_read("s", None));
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let checks = JwtChecks {
            audience: Some("herald".into()),
            issuer: None,
            leeway: Duration::from_secs(0),
        };
        let auth = auth(checks, &[]);
        let err = |token: &str| auth.authenticate(Some(token)).unwrap_err();
        assert_eq!(err("garbage").code(), ErrorCode::Unauthorized);
        assert!(matches!(
            auth.authenticate(None),
            Err(AuthError::Unauthorized(_))
        ));
        assert_eq!(err("a.b.c").code(), ErrorCode::InvalidToken);
        let good = json!({ "sub": "a", "exp": now() + 60, "aud": "herald" });
        assert_eq!(
            err(&sign(good.clone(), "another-secret")).code(),
            ErrorCode::InvalidToken
        );
        let expired = json!({ "sub": "a", "exp": now() - 5, "aud": "herald" });
        let e = err(&sign(expired, SECRET));
        assert_eq!(e.code(), ErrorCode::TokenExpired);
        assert!(e.to_string().starts_with("TOKEN_EXPIRED: "));
        let wrong_aud = json!({ "sub": "a", "exp": now() + 60, "aud": "other" });
        assert!(err(&sign(wrong_aud, SECRET)).detail().contains("audience"));
        let no_aud = json!({ "sub": "a", "exp": now() + 60 });
        assert!(
            err(&sign(no_aud, SECRET)).detail().contains("aud"),
            "a configured audience is required"
        );
        let in_its_last_second = json!({ "sub": "a", "exp": now(), "aud": "herald" });
        assert_eq!(
            err(&sign(in_its_last_second, SECRET)).code(),
            ErrorCode::TokenExpired
        );
        let no_exp = json!({ "sub": "a", "aud": "herald" });
        assert!(err(&sign(no_exp, SECRET)).detail().contains("exp"));
        let not_yet =
            json!({ "sub": "a", "exp": now() + 600, "nbf": now() + 300, "aud": "herald" });
        assert!(err(&sign(not_yet, SECRET)).detail().contains("nbf"));
        assert!(auth.authenticate(Some(&sign(good, SECRET))).is_ok());
    }

    #[test]
    fn a_configured_issuer_must_be_named_exactly() {
        let checks = JwtChecks {
            audience: None,
            issuer: Some("https://auth.example.com".into()),
            leeway: Duration::from_secs(0),
        };
        let auth = auth(checks, &[]);
        let with_iss = |iss: Option<&str>| {
            let mut claims = json!({ "sub": "a", "exp": now() + 60 });
            if let Some(iss) = iss {
                claims["iss"] = json!(iss);
            }
            auth.authenticate(Some(&sign(claims, SECRET)))
        };
        assert!(with_iss(Some("https://auth.example.com")).is_ok());
        for refused in [with_iss(Some("https://evil.example")), with_iss(None)] {
            let error = refused.unwrap_err();
            assert_eq!(error.code(), ErrorCode::InvalidToken);
            assert!(error.detail().contains("iss"), "{error}");
        }
    }

    #[test]
    fn leeway_forgives_a_clock_that_is_behind_by_at_most_its_length() {
        let auth = auth(
            JwtChecks {
                leeway: Duration::from_secs(30),
                ..JwtChecks::default()
            },
            &[],
        );
        let expired_ago = |secs: u64| {
            auth.authenticate(Some(&sign(
                json!({ "sub": "a", "exp": now() - secs }),
                SECRET,
            )))
        };
        assert!(
            expired_ago(10).is_ok(),
            "10 s past exp is within a 30 s leeway"
        );
        assert_eq!(expired_ago(60).unwrap_err().code(), ErrorCode::TokenExpired);
        let early = json!({ "sub": "a", "exp": now() + 600, "nbf": now() + 10 });
        assert!(
            auth.authenticate(Some(&sign(early, SECRET))).is_ok(),
            "nbf 10 s ahead is within the leeway"
        );
    }

    #[test]
    fn public_keys_verify_their_own_algorithm_only() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt");
        let claims = json!({ "sub": "svc", "exp": now() + 60 });
        for (algorithm, name) in [(Algorithm::RS256, "rs256"), (Algorithm::ES256, "es256")] {
            let public = fixtures.join(format!("{name}-public.pem"));
            let auth = Auth::new(None, Some(&public), JwtChecks::default(), Vec::new()).unwrap();
            let private = std::fs::read(fixtures.join(format!("{name}-private.pem"))).unwrap();
            let key = match algorithm {
                Algorithm::RS256 => EncodingKey::from_rsa_pem(&private).unwrap(),
                _ => EncodingKey::from_ec_pem(&private).unwrap(),
            };
            let token = encode(&Header::new(algorithm), &claims, &key).unwrap();
            assert_eq!(
                auth.authenticate(Some(&token)).unwrap().subject(),
                Some("svc")
            );
            // An HS256 token "signed" with the public key's bytes must not pass.
            let pem = std::fs::read_to_string(&public).unwrap();
            let forged = sign(claims.clone(), &pem);
            assert_eq!(
                auth.authenticate(Some(&forged)).unwrap_err().code(),
                ErrorCode::InvalidToken
            );
        }
    }

    #[test]
    fn an_algorithm_without_a_key_is_refused() {
        let auth = auth(JwtChecks::default(), &[]);
        let token = encode(
            &Header::new(Algorithm::HS384),
            &json!({ "sub": "a", "exp": now() + 60 }),
            &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
        )
        .unwrap();
        let e = auth.authenticate(Some(&token)).unwrap_err();
        assert!(e.detail().contains("HS384"), "{e}");
    }

    #[test]
    fn api_keys_carry_their_scopes() {
        let auth = auth(
            JwtChecks::default(),
            &["ocr:s3cr3t:publish", "ops:0ps:admin+read"],
        );
        let ocr = auth.authenticate(Some("s3cr3t")).unwrap();
        assert_eq!(ocr.subject(), Some("key:ocr"));
        assert!(ocr.has(Scope::Publish) && !ocr.has(Scope::Read));
        assert!(ocr.covers("any-session"));
        assert!(auth.authenticate(Some("0ps")).unwrap().is_admin());
        assert!(auth.authenticate(Some("s3cr3")).is_err());
    }

    #[test]
    fn api_keys_from_the_file_are_digests_limited_to_their_sessions() {
        let entry = ApiKeyDigest {
            name: "ocr".into(),
            sha256: hex::encode(Sha256::digest(b"file-secret")),
            scopes: vec!["publish".into()],
            sessions: vec!["ocr-*".into()],
        };
        let key = ApiKey::from_digest(&entry).unwrap();
        let auth = Auth::new(None, None, JwtChecks::default(), vec![key]).unwrap();
        let ocr = auth.authenticate(Some("file-secret")).unwrap();
        assert!(ocr.has(Scope::Publish) && ocr.covers("ocr-1") && !ocr.covers("other"));
        assert!(auth.authenticate(Some("wrong")).is_err());
    }

    #[test]
    fn api_key_specs_are_checked() {
        assert!(ApiKey::parse(1, "nameonly").is_err());
        assert!(ApiKey::parse(1, "n::read").is_err());
        assert!(ApiKey::parse(1, "n:s:nothing").is_err());
        // A secret may contain colons after the second one? No: the scopes follow it.
        assert_eq!(
            ApiKey::parse(1, "n:s:read+x").unwrap().scopes,
            Scopes::from_names(["read"])
        );
    }

    #[test]
    fn credentials_are_found_in_order() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            credential(&headers, Some("a=1&token=t%2B1")),
            Some("t+1".into())
        );
        headers.insert("x-api-key", "k".parse().unwrap());
        assert_eq!(credential(&headers, Some("token=t")), Some("k".into()));
        headers.insert(header::AUTHORIZATION, "Bearer  abc ".parse().unwrap());
        assert_eq!(credential(&headers, None), Some("abc".into()));
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(credential(&headers, None), None);
    }

    #[test]
    fn patterns() {
        assert!(SessionPattern::parse("*").matches("x"));
        assert!(SessionPattern::parse("a:*").matches("a:b"));
        assert!(!SessionPattern::parse("a:*").matches("b:a"));
        assert!(SessionPattern::parse("a").matches("a"));
        assert!(!SessionPattern::parse("a").matches("ab"));
    }

    #[test]
    fn origins() {
        let policy = OriginPolicy::new(false, &["https://app.example.com/".into()]);
        let with = |origin: &str, host: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ORIGIN, origin.parse().unwrap());
            h.insert(header::HOST, host.parse().unwrap());
            policy.allows(&h)
        };
        assert!(policy.allows(&HeaderMap::new()));
        assert!(with("https://app.example.com", "herald.internal:3000"));
        assert!(with("http://127.0.0.1:3000", "127.0.0.1:3000"));
        assert!(!with("https://evil.example", "127.0.0.1:3000"));
        assert!(!with("null", "127.0.0.1:3000"));
        // Two origins (websocket-client sends its own and the one it was given): both count.
        let two = |second: &str| {
            let mut h = HeaderMap::new();
            h.append(header::ORIGIN, "http://127.0.0.1:3000".parse().unwrap());
            h.append(header::ORIGIN, second.parse().unwrap());
            h.insert(header::HOST, "127.0.0.1:3000".parse().unwrap());
            policy.allows(&h)
        };
        assert!(!two("https://evil.example"));
        assert!(two("https://app.example.com"));
        assert!(OriginPolicy::new(true, &[]).allows(&{
            let mut h = HeaderMap::new();
            h.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
            h
        }));
    }

    /// Mutated tokens, API key specs, session patterns and credential headers: a token is
    /// either refused with an auth error or is the one that was signed (never a forged
    /// principal); nothing panics.
    #[test]
    fn fuzz_credentials() {
        let auth = auth(JwtChecks::default(), &["worker:key-secret-1:publish"]);
        let token = sign(
            json!({ "sub": "alice", "exp": now() + 600, "sessions": ["user-42:*"], "scope": "read answer" }),
            SECRET,
        );
        let seeds: &[&[u8]] = &[
            token.as_bytes(),
            b"key-secret-1",
            b"worker:key-secret-1:publish+read",
            b"user-42:*",
            b"Bearer key-secret-1",
            b"token=abc&EIO=4&transport=polling",
        ];
        crate::fuzzing::Fuzz::new("credentials").run(seeds, |input| {
            let text = String::from_utf8_lossy(input);
            match auth.authenticate(Some(&text)) {
                Ok(principal) => assert!(
                    matches!(principal.subject(), Some("alice" | "key:worker")),
                    "forged principal {principal:?} from {text:?}"
                ),
                Err(error) => {
                    let _ = (error.code(), error.detail());
                }
            }
            let _ = ApiKey::parse(0, &text);
            let _ = SessionPattern::parse(&text).matches("user-42:abc");
            let mut headers = HeaderMap::new();
            if let Ok(value) = axum::http::HeaderValue::from_bytes(input) {
                headers.insert(header::AUTHORIZATION, value);
            }
            let _ = credential(&headers, Some(&text));
        });
    }
}
