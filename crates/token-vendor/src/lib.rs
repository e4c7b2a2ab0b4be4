//! The token vendor: issues the short-lived JWTs devices connect to NATS with,
//! and verifies them.
//!
//! A backend asks for a token for `{account, device}` over HTTP
//! (`POST /v1/tokens`, operator key as bearer) or over the `headcount.token`
//! NATS endpoint. Each token starts a new session (`sid`) and is signed with
//! Ed25519 (`alg: EdDSA`); the public keys are served as a JWKS at
//! `GET /.well-known/jwks.json`, and [`Vendor::verify`] checks a token the
//! way NATS auth callout must before granting a device its subjects.
//!
//! Layout:
//! - this file: [`Config`], [`Vendor`] (issue, verify, JWKS), [`Claims`]
//!   (the names of a verified token, parsed once) and [`TokenError`].
//! - `crypto`: the EdDSA-only jsonwebtoken `CryptoProvider` (no RSA, no
//!   HMAC, no ECDSA in the build), installed before the first signature.
//! - `keys`: the signing keys in `<data_dir>/keys/<kid>.json` (mode 0600);
//!   every key there verifies, the newest signs; [`SIGNING_KEY_ENV`] may
//!   supply the signing key instead.
//! - `http`: [`router`] for the HTTP API.
//! - `browser`: [`browser_router`], what browser devices and the operator's
//!   live view need over HTTP (token refresh, leave beacon, operator and
//!   demo tokens) and the pages themselves.
//! - `nats`: [`serve_nats`], the `headcount.token` micro service.
//! - `callout`: [`serve_callout`], NATS auth callout turning a device token
//!   into permissions for that device's own subjects.
//! - `metrics`: the Prometheus collectors.
//! - `throttle`: per-address limits: wrong operator keys, the browser
//!   endpoints' request rates, the auth callout's refused connections per
//!   client host.
//!
//! This crate must never log or return a key seed or the operator key, never
//! accept a token that is not EdDSA-signed by one of its own keys (no `none`,
//! no HMAC), and never put an account or device id in a metric label.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use headcount_protocol::wire::TokenReply;
use headcount_protocol::{AccountId, DeviceId, NameError, SessionId, now_millis};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};

pub mod access;
mod browser;
pub mod callout;
mod crypto;
mod http;
mod keys;
mod metrics;
mod nats;
mod service;
mod throttle;

pub use access::{Access, access_router};
pub use browser::{BrowserConfig, browser_router};
pub use callout::{CalloutStores, Grant, Issuer, serve_callout};
pub use http::router;
pub use keys::SIGNING_KEY_ENV;
pub use nats::{SERVICE_NAME, serve_nats};
pub use service::start;
pub use throttle::{Rate, RateError, ThrottleConfig};

use keys::KeyRing;
use metrics::Metrics;

/// Default `iss` claim.
pub const DEFAULT_ISSUER: &str = "headcount";
/// Default `aud` claim.
pub const DEFAULT_AUDIENCE: &str = "headcount-devices";
/// The `role` claim of operator tokens. Such a token names no device: its
/// `acct` and `sub` are both [`OPERATOR_ROLE`].
pub const OPERATOR_ROLE: &str = "operator";
/// The `role` claim of backend tokens: an application server's NATS
/// credential. Its `acct` is [`BACKEND_ROLE`], its `sub` the backend's name.
pub const BACKEND_ROLE: &str = "backend";

/// What a verified token lets its holder be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// One session of one device of one account.
    Device,
    /// An operator: queries and steering of every account, every event.
    Operator,
    /// An application server: queries, device tokens, every event.
    Backend,
}

impl Role {
    /// Operator and backend tokens: NATS clients that are not devices.
    /// They end at a key rotation or an explicit revocation.
    pub fn is_client(self) -> bool {
        matches!(self, Role::Operator | Role::Backend)
    }
}

/// Default lifetime of a backend token, and the longest one may ask for.
/// The connections bucket keeps revocations exactly this long.
pub const DEFAULT_CLIENT_TOKEN_TTL: Duration = headcount_protocol::subjects::kv::CONNECTIONS_TTL;

/// An operator token, for the live view's NATS connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OperatorToken {
    pub token: String,
    pub expires_at: u64,
    /// Replies to this connection's requests must come under this prefix
    /// (the client's inbox prefix).
    pub inbox_prefix: String,
}

/// Default token lifetime.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 4096;
/// Clock skew tolerated on `exp` and `nbf`, in seconds: the host verifying a
/// token need not share the vendor's clock exactly.
pub const LEEWAY_SECS: u64 = 30;

/// Characters of a session id: 22 letters and digits (130 random bits), as
/// long as the NUIDs they replace, so subjects and keys keep their size.
pub const SESSION_ID_CHARS: usize = 22;
/// Characters of an operator token's `sid` (its inbox prefix).
pub const OPERATOR_SID_CHARS: usize = 22;

/// A new session id, from the OS random source: no session id tells
/// anything about another one (a NUID did: consecutive ones share their
/// first 12 characters and count up).
pub fn new_session_id() -> String {
    headcount_runtime::secret::random_id(SESSION_ID_CHARS)
}

/// What the vendor needs to run.
#[derive(Clone)]
pub struct Config {
    /// Keys live in `<data_dir>/keys/`.
    pub data_dir: PathBuf,
    /// The `iss` claim of issued tokens, and the only one accepted.
    pub issuer: String,
    /// The `aud` claim of issued tokens, and the only one accepted.
    pub audience: String,
    /// How long an issued token stays valid (whole seconds, at least one).
    pub token_ttl: Duration,
    /// Bearer secret for `POST /v1/tokens`. When empty, that endpoint refuses
    /// every request; NATS issuing is unaffected.
    pub operator_key: String,
    /// Plan names a token may carry; empty accepts any valid name.
    pub plans: Vec<String>,
    /// Per-address limits of the HTTP API and the auth callout.
    pub throttle: ThrottleConfig,
    /// The longest a backend token may live (its default lifetime too); at
    /// most [`DEFAULT_CLIENT_TOKEN_TTL`], how long the connections bucket
    /// keeps a revocation.
    pub client_token_ttl: Duration,
}

impl Config {
    /// A configuration with the default issuer, audience and lifetime.
    pub fn new(data_dir: impl Into<PathBuf>, operator_key: impl Into<String>) -> Self {
        Self {
            data_dir: data_dir.into(),
            issuer: DEFAULT_ISSUER.to_string(),
            audience: DEFAULT_AUDIENCE.to_string(),
            token_ttl: DEFAULT_TOKEN_TTL,
            operator_key: operator_key.into(),
            plans: Vec::new(),
            throttle: ThrottleConfig::default(),
            client_token_ttl: DEFAULT_CLIENT_TOKEN_TTL,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("data_dir", &self.data_dir)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("token_ttl", &self.token_ttl)
            .field("operator_key", &"[redacted]")
            .finish()
    }
}

/// The claims of a token, its names parsed once, at verification: whoever
/// holds `Claims` holds a valid account, device and session.
///
/// Serde reads and writes them as the JWT carries them, the names as the
/// strings `sub`, `acct` and `sid`, and refuses a name that does not parse.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(into = "WireClaims", try_from = "WireClaims")]
pub struct Claims {
    /// The device (`sub`); on a backend token the backend's name, on an
    /// operator token [`OPERATOR_ROLE`].
    pub device: DeviceId,
    /// The account (`acct`); [`OPERATOR_ROLE`] or [`BACKEND_ROLE`] on those
    /// tokens.
    pub account: AccountId,
    /// The session this token starts (`sid`); on an operator or backend
    /// token, the token's id.
    pub session: SessionId,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expires at, Unix seconds.
    pub exp: u64,
    /// Not valid before, Unix seconds.
    pub nbf: u64,
    pub iss: String,
    pub aud: String,
    /// The account's plan, when the backend named one.
    pub plan: Option<String>,
    /// [`OPERATOR_ROLE`] on an operator token (the live view); absent on a
    /// device token.
    pub role: Option<String>,
}

impl Claims {
    /// Whether this is an operator token rather than a device's.
    pub fn is_operator(&self) -> bool {
        self.role.as_deref() == Some(OPERATOR_ROLE)
    }

    /// What the token lets its holder be.
    pub fn role(&self) -> Role {
        match self.role.as_deref() {
            Some(OPERATOR_ROLE) => Role::Operator,
            Some(BACKEND_ROLE) => Role::Backend,
            _ => Role::Device,
        }
    }

    /// The id of an operator or backend token (its `sid`).
    pub fn token_id(&self) -> &SessionId {
        &self.session
    }

    /// The subject prefix an operator or backend connection's replies must
    /// use: its permissions allow no other inbox.
    pub fn inbox_prefix(&self) -> String {
        format!("_INBOX_{}", self.session)
    }
}

/// [`Claims`] as the JWT's payload spells them, in the order they are
/// signed: the names as plain strings, so that a verified payload whose
/// names do not parse is told apart from one that does not read at all
/// ([`TokenError::BadClaims`], not [`TokenError::Malformed`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct WireClaims {
    pub(crate) sub: String,
    pub(crate) acct: String,
    pub(crate) sid: String,
    pub(crate) iat: u64,
    pub(crate) exp: u64,
    pub(crate) nbf: u64,
    pub(crate) iss: String,
    pub(crate) aud: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) plan: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) role: Option<String>,
}

impl From<Claims> for WireClaims {
    fn from(c: Claims) -> Self {
        WireClaims {
            sub: c.device.to_string(),
            acct: c.account.to_string(),
            sid: c.session.to_string(),
            iat: c.iat,
            exp: c.exp,
            nbf: c.nbf,
            iss: c.iss,
            aud: c.aud,
            plan: c.plan,
            role: c.role,
        }
    }
}

impl TryFrom<WireClaims> for Claims {
    type Error = NameError;

    fn try_from(w: WireClaims) -> Result<Self, NameError> {
        Ok(Claims {
            device: DeviceId::parse(&w.sub)?,
            account: AccountId::parse(&w.acct)?,
            session: SessionId::parse(&w.sid)?,
            iat: w.iat,
            exp: w.exp,
            nbf: w.nbf,
            iss: w.iss,
            aud: w.aud,
            plan: w.plan,
            role: w.role,
        })
    }
}

/// Why a token could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    UnknownPlan(#[from] headcount_protocol::policy::UnknownPlan),
    #[error(transparent)]
    Internal(anyhow::Error),
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts, or a header or claims that do not parse.
    #[error("token is malformed")]
    Malformed,
    /// No `kid`, or a `kid` this vendor does not hold.
    #[error("token is signed by an unknown key")]
    UnknownKid,
    /// The signature does not verify, or the token is not EdDSA-signed at all
    /// (`alg: none`, HMAC and the like are refused here).
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token is for another audience")]
    WrongAudience,
    #[error("token is from another issuer")]
    WrongIssuer,
    #[error("token is longer than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    /// Validly signed, but the account, device or session is not a valid name.
    #[error("token names an invalid account, device or session")]
    BadClaims,
    /// An operator or backend token signed by a key that no longer signs:
    /// those end at a key rotation (device tokens do not).
    #[error("token was signed before the last key rotation")]
    Superseded,
}

impl TokenError {
    /// Every variant, e.g. to pre-create metric series.
    pub const ALL: [TokenError; 10] = [
        TokenError::Malformed,
        TokenError::UnknownKid,
        TokenError::BadSignature,
        TokenError::Expired,
        TokenError::NotYetValid,
        TokenError::WrongAudience,
        TokenError::WrongIssuer,
        TokenError::TooLarge,
        TokenError::BadClaims,
        TokenError::Superseded,
    ];

    /// The snake_case name used as the `result` metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::UnknownKid => "unknown_kid",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::WrongAudience => "wrong_audience",
            TokenError::WrongIssuer => "wrong_issuer",
            TokenError::TooLarge => "too_large",
            TokenError::BadClaims => "bad_claims",
            TokenError::Superseded => "superseded",
        }
    }
}

/// Issues and verifies device tokens. Cheap to clone: every clone shares the
/// same keys and metrics.
#[derive(Clone)]
pub struct Vendor {
    inner: Arc<Inner>,
}

struct Inner {
    issuer: String,
    audience: String,
    ttl_secs: u64,
    client_ttl_secs: u64,
    operator_key: String,
    data_dir: PathBuf,
    plans: Vec<String>,
    /// Where the plan of an account's latest token is recorded for the
    /// checkers (the limits bucket).
    plan_store: Option<async_nats::jetstream::kv::Store>,
    /// Plans already recorded, so that issuing does not write each time.
    recorded_plans: moka::sync::Cache<AccountId, String>,
    /// Behind a lock so that a rotation can swap in a new ring while requests
    /// keep using the one they started with.
    keys: RwLock<Arc<KeyRing>>,
    validation: Validation,
    metrics: Metrics,
    throttle: throttle::Throttle,
}

impl fmt::Debug for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = self.keys();
        f.debug_struct("Vendor")
            .field("issuer", &self.inner.issuer)
            .field("audience", &self.inner.audience)
            .field("ttl_secs", &self.inner.ttl_secs)
            .field("signing_kid", &keys.signer().kid)
            .field("keys", &keys.len())
            .finish_non_exhaustive()
    }
}

/// The two header fields looked at before the signature is checked.
struct PeekedHeader {
    alg: String,
    kid: Option<String>,
}

impl Vendor {
    /// Loads the keys of `<data_dir>/keys/` (generating and saving one if
    /// there is none, or using [`SIGNING_KEY_ENV`] when set) and registers
    /// the metrics on `registry`. It records no token plans: for tools and
    /// tests that issue none (a plan token is then issued with a warning
    /// that checkers will not see its plan); services use
    /// [`Vendor::recording_plans`].
    pub fn new(config: Config, registry: &prometheus::Registry) -> anyhow::Result<Vendor> {
        let env_seed = keys::seed_from_env()?;
        Self::build(config, registry, env_seed, None)
    }

    /// [`Vendor::new`], recording the plan of each account's latest token
    /// in `plans` (the limits bucket), where the checkers read it.
    pub fn recording_plans(
        config: Config,
        plans: async_nats::jetstream::kv::Store,
        registry: &prometheus::Registry,
    ) -> anyhow::Result<Vendor> {
        let env_seed = keys::seed_from_env()?;
        Self::build(config, registry, env_seed, Some(plans))
    }

    fn build(
        config: Config,
        registry: &prometheus::Registry,
        env_seed: Option<[u8; 32]>,
        plan_store: Option<async_nats::jetstream::kv::Store>,
    ) -> anyhow::Result<Vendor> {
        crypto::install()?;
        anyhow::ensure!(!config.issuer.is_empty(), "the token issuer is empty");
        anyhow::ensure!(!config.audience.is_empty(), "the token audience is empty");
        let ring = keys::open(&config.data_dir, env_seed)?;
        let metrics = Metrics::new(registry)?;

        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;

        if config.operator_key.is_empty() {
            tracing::warn!("no operator key configured: POST /v1/tokens refuses every request");
        }
        tracing::info!(
            kid = %ring.signer().kid,
            keys = ring.len(),
            issuer = %config.issuer,
            audience = %config.audience,
            ttl_secs = config.token_ttl.as_secs(),
            "token vendor keys loaded"
        );
        Ok(Vendor {
            inner: Arc::new(Inner {
                issuer: config.issuer,
                audience: config.audience,
                ttl_secs: config.token_ttl.as_secs().max(1),
                client_ttl_secs: config
                    .client_token_ttl
                    .min(DEFAULT_CLIENT_TOKEN_TTL)
                    .as_secs()
                    .max(1),
                operator_key: config.operator_key,
                data_dir: config.data_dir,
                plans: config.plans,
                throttle: throttle::Throttle::new(&config.throttle),
                plan_store,
                recorded_plans: moka::sync::Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(Duration::from_secs(600))
                    .build(),
                keys: RwLock::new(Arc::new(ring)),
                validation,
                metrics,
            }),
        })
    }

    /// Issues a token that starts a new session of `device`. `via` names the
    /// channel for the metrics: `"http"` or `"nats"`.
    pub fn issue(
        &self,
        account: &AccountId,
        device: &DeviceId,
        via: &'static str,
    ) -> anyhow::Result<TokenReply> {
        self.issue_at(account, device, via, now_millis() / 1000)
    }

    /// [`Vendor::issue`] as if the time were `now` (Unix seconds): for
    /// clocks other than the system's, such as tests of expiry.
    pub fn issue_at(
        &self,
        account: &AccountId,
        device: &DeviceId,
        via: &'static str,
        now: u64,
    ) -> anyhow::Result<TokenReply> {
        self.issue_full(account, device, None, via, now)
    }

    /// [`Vendor::issue`] for an account on `plan` (carried as the `plan`
    /// claim). Refuses a plan name that is not a valid name or, when the
    /// vendor was told the plans, not one of them.
    pub fn issue_with_plan(
        &self,
        account: &AccountId,
        device: &DeviceId,
        plan: Option<&str>,
        via: &'static str,
    ) -> Result<TokenReply, IssueError> {
        if let Some(p) = plan {
            // No plans told: any well-spelled name.
            if self.inner.plans.is_empty() {
                if !headcount_protocol::policy::is_plan_name(p) {
                    return Err(headcount_protocol::policy::UnknownPlan {
                        name: p.to_string(),
                        known: Vec::new(),
                    }
                    .into());
                }
            } else {
                headcount_protocol::policy::check_plan(
                    p,
                    self.inner.plans.iter().map(String::as_str),
                )?;
            }
        }
        self.issue_full(account, device, plan, via, now_millis() / 1000)
            .map_err(IssueError::Internal)
    }

    fn issue_full(
        &self,
        account: &AccountId,
        device: &DeviceId,
        plan: Option<&str>,
        via: &'static str,
        now: u64,
    ) -> anyhow::Result<TokenReply> {
        let session = SessionId::parse(&new_session_id())?;
        let claims = Claims {
            device: device.clone(),
            account: account.clone(),
            session: session.clone(),
            iat: now,
            exp: now.saturating_add(self.inner.ttl_secs),
            nbf: now,
            iss: self.inner.issuer.clone(),
            aud: self.inner.audience.clone(),
            plan: plan.map(str::to_owned),
            role: None,
        };
        let token = self.sign(&claims, via)?;
        tracing::debug!(%account, %device, %session, via, "token issued");
        Ok(TokenReply {
            token,
            session,
            expires_at: claims.exp.saturating_mul(1000),
        })
    }

    /// A fresh token for the session of `current` (a verified device token):
    /// the same account, device, session and plan with a new lifetime. The
    /// caller checks that the session has not been ended.
    pub fn renew(&self, current: &Claims) -> anyhow::Result<TokenReply> {
        anyhow::ensure!(
            !current.role().is_client(),
            "operator and backend tokens are not renewed"
        );
        let now = now_millis() / 1000;
        let claims = Claims {
            iat: now,
            nbf: now,
            exp: now.saturating_add(self.inner.ttl_secs),
            ..current.clone()
        };
        let token = self.sign(&claims, "refresh")?;
        tracing::debug!(account = %claims.account, device = %claims.device, session = %claims.session, "token renewed");
        Ok(TokenReply {
            token,
            expires_at: claims.exp.saturating_mul(1000),
            session: claims.session,
        })
    }

    /// A token for an operator's live view: through the auth callout it may
    /// query and steer every account (`active`, `stats`, `limits`, `kick`)
    /// and watch every presence event, and publish no heartbeat. It lives as
    /// long as a device token and ends at a key rotation or revocation.
    pub fn issue_operator(&self) -> anyhow::Result<OperatorToken> {
        self.issue_client(Role::Operator, OPERATOR_ROLE, self.inner.ttl_secs)
    }

    /// A backend token: an application server's NATS credential (queries,
    /// device tokens over `headcount.token`, every presence event, replies
    /// under its own inbox prefix only). `name` names the backend in logs;
    /// `ttl` defaults to, and may not exceed, the configured client token
    /// lifetime. It ends at a key rotation or revocation.
    pub fn issue_backend(
        &self,
        name: &DeviceId,
        ttl: Option<Duration>,
    ) -> anyhow::Result<OperatorToken> {
        let max = self.inner.client_ttl_secs;
        let ttl = ttl.map_or(max, |t| t.as_secs().clamp(1, max));
        self.issue_client(Role::Backend, name.as_str(), ttl)
    }

    /// The longest a backend token may live.
    pub fn client_token_ttl(&self) -> Duration {
        Duration::from_secs(self.inner.client_ttl_secs)
    }

    /// The id of the key that signs now.
    pub fn signing_kid(&self) -> String {
        self.keys().signer().kid.clone()
    }

    fn issue_client(&self, role: Role, name: &str, ttl: u64) -> anyhow::Result<OperatorToken> {
        let (role, via) = match role {
            Role::Operator => (OPERATOR_ROLE, "operator"),
            Role::Backend => (BACKEND_ROLE, "backend"),
            Role::Device => anyhow::bail!("device tokens are issued with issue()"),
        };
        let now = now_millis() / 1000;
        let claims = Claims {
            device: DeviceId::parse(name)?,
            account: AccountId::parse(role)?,
            // Alphanumeric: it is also the token of the inbox prefix.
            session: SessionId::parse(&headcount_runtime::secret::random_id(OPERATOR_SID_CHARS))?,
            iat: now,
            exp: now.saturating_add(ttl),
            nbf: now,
            iss: self.inner.issuer.clone(),
            aud: self.inner.audience.clone(),
            plan: None,
            role: Some(role.to_string()),
        };
        let token = self.sign(&claims, via)?;
        Ok(OperatorToken {
            token,
            expires_at: claims.exp.saturating_mul(1000),
            inbox_prefix: claims.inbox_prefix(),
        })
    }

    /// Signs `claims` with the current signing key and counts the token as
    /// issued over `via`.
    fn sign(&self, claims: &Claims, via: &'static str) -> anyhow::Result<String> {
        let keys = self.keys();
        let signer = keys.signer();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(signer.kid.clone());
        let token = jsonwebtoken::encode(&header, claims, &signer.encoding)
            .map_err(|e| anyhow::anyhow!("signing token with key {}: {e}", signer.kid))?;
        self.inner.metrics.issued.with_label_values(&[via]).inc();
        Ok(token)
    }

    /// Checks a token: size, shape, a known `kid`, the EdDSA signature,
    /// `exp` and `nbf` (with [`LEEWAY_SECS`]), `iss`, `aud`, and that the
    /// account, device and session are valid names.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let result = self.check(token);
        let label = match &result {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        self.inner
            .metrics
            .verifications
            .with_label_values(&[label])
            .inc();
        result
    }

    fn check(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        let header = peek_header(token)?;
        // Only EdDSA is ever accepted; jsonwebtoken would refuse other
        // algorithms too, but `none` does not even parse there, and a token
        // that is not signed the way we sign is a signature failure.
        if header.alg != "EdDSA" {
            return Err(TokenError::BadSignature);
        }
        let kid = header.kid.ok_or(TokenError::UnknownKid)?;
        let keys = self.keys();
        let key = keys.get(&kid).ok_or(TokenError::UnknownKid)?;
        // Read as strings first: a name that does not parse is a token
        // with bad claims, not a malformed one.
        let data = jsonwebtoken::decode::<WireClaims>(token, &key.decoding, &self.inner.validation)
            .map_err(|e| token_error(&e))?;
        let claims = Claims::try_from(data.claims).map_err(|e| {
            tracing::debug!(error = %e, "token names are invalid");
            TokenError::BadClaims
        })?;
        // Operator and backend tokens end at a key rotation: only the key
        // that signs now vouches for them.
        if claims.role().is_client() && kid != keys.signer().kid {
            return Err(TokenError::Superseded);
        }
        Ok(claims)
    }

    /// The public keys as a JWKS, signing key first.
    pub fn jwks(&self) -> serde_json::Value {
        let keys = self.keys();
        let keys: Vec<serde_json::Value> = keys
            .by_age()
            .into_iter()
            .map(|k| {
                serde_json::json!({
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "alg": "EdDSA",
                    "use": "sig",
                    "kid": k.kid,
                    "x": URL_SAFE_NO_PAD.encode(k.public),
                })
            })
            .collect();
        serde_json::json!({ "keys": keys })
    }

    /// Makes a new signing key, saved in `<data_dir>/keys/` so that a
    /// restart keeps it, and signs with it from now on. Tokens signed by older keys keep verifying until
    /// they have all expired: a key is retired, and its file removed, once
    /// it stopped signing more than the token lifetime plus the leeway ago.
    /// Returns the new key's id.
    pub fn rotate(&self) -> anyhow::Result<String> {
        let key = keys::KeyPair::generate()?;
        let kid = key.kid.clone();
        let dir = keys::key_dir(&self.inner.data_dir);
        keys::save(&dir, &key)?;
        let keep = Duration::from_secs(self.inner.ttl_secs + LEEWAY_SECS);
        let mut guard = self
            .inner
            .keys
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (ring, dropped) = guard.rotated(key, keep, now_millis());
        *guard = Arc::new(ring);
        drop(guard);
        for old in &dropped {
            let path = dir.join(format!("{old}.json"));
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(file = %path.display(), error = %e, "removing a retired key file");
            }
        }
        tracing::info!(kid = %kid, retired = ?dropped, "signing key rotated");
        Ok(kid)
    }

    /// Makes `plan` the account's token plan for the checkers (written only
    /// when it changed).
    pub async fn record_plan(&self, account: &AccountId, plan: &str) {
        if self.inner.recorded_plans.get(account).as_deref() == Some(plan) {
            return;
        }
        let Some(store) = &self.inner.plan_store else {
            tracing::warn!(%account, "a token carries a plan but no limits bucket is connected: checkers will not see it");
            return;
        };
        let body = serde_json::to_vec(plan).unwrap_or_default();
        match store
            .put(
                headcount_protocol::subjects::kv::token_plan(account),
                body.into(),
            )
            .await
        {
            Ok(_) => self
                .inner
                .recorded_plans
                .insert(account.clone(), plan.to_string()),
            Err(e) => tracing::warn!(%account, error = %e, "recording the token plan"),
        }
    }

    /// Whether `presented` is the operator key, compared in constant time.
    pub(crate) fn is_operator_key(&self, presented: &str) -> bool {
        let expected = self.inner.operator_key.as_bytes();
        !expected.is_empty() && constant_time_eq(presented.as_bytes(), expected)
    }

    pub(crate) fn count_callout(&self, result: &'static str) {
        self.inner
            .metrics
            .callout
            .with_label_values(&[result])
            .inc();
    }

    pub(crate) fn count_throttled(&self, endpoint: &'static str) {
        self.inner
            .metrics
            .throttled
            .with_label_values(&[endpoint])
            .inc();
    }

    pub(crate) fn throttle(&self) -> &throttle::Throttle {
        &self.inner.throttle
    }

    pub(crate) fn count_rejection(&self, reason: &'static str) {
        self.inner
            .metrics
            .rejected
            .with_label_values(&[reason])
            .inc();
    }

    fn keys(&self) -> Arc<KeyRing> {
        // A poisoned lock still holds a whole ring: the writer swaps an Arc.
        self.inner
            .keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// The three dot-separated parts of a compact JWT (header, claims,
/// signature); `None` unless there are exactly three.
pub(crate) fn jwt_parts(token: &str) -> Option<(&str, &str, &str)> {
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(header), Some(claims), Some(signature), None) => Some((header, claims, signature)),
        _ => None,
    }
}

/// Reads `alg` and `kid` from a token's header without trusting anything.
fn peek_header(token: &str) -> Result<PeekedHeader, TokenError> {
    let (header, _claims, _signature) = jwt_parts(token).ok_or(TokenError::Malformed)?;
    let json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| TokenError::Malformed)?;
    // A JSON object, read by hand: serde's derive would also take an array.
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
    let alg = match header.get("alg") {
        Some(serde_json::Value::String(alg)) => alg.clone(),
        _ => return Err(TokenError::Malformed),
    };
    let kid = match header.get("kid") {
        None => None,
        Some(serde_json::Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(TokenError::Malformed),
    };
    Ok(PeekedHeader { alg, kid })
}

fn token_error(e: &jsonwebtoken::errors::Error) -> TokenError {
    match e.kind() {
        // The header was read before, so a base64 failure here is in the
        // signature (the claims are only decoded once it verified).
        ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm | ErrorKind::Base64(_) => {
            TokenError::BadSignature
        }
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        other => {
            tracing::debug!(error = ?other, "token refused");
            TokenError::Malformed
        }
    }
}

/// Compares without stopping at the first difference, so the time taken does
/// not tell a caller how much of the key it guessed right. The loop runs
/// over the presented bytes, whose length the caller already knows.
fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(presented.len() != expected.len());
    for (i, p) in presented.iter().enumerate() {
        diff |= p ^ expected.get(i).copied().unwrap_or(0);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests;
