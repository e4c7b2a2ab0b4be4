//! NATS auth callout: the server asks, for every connection that is not one
//! of the services', whether its token lets it in, where, and with which
//! permissions.
//!
//! nats-server (configured with `authorization { auth_callout { ... } }`)
//! publishes an authorization request on [`CALLOUT_SUBJECT`]: a JWT signed by
//! the server's own nkey carrying the client's CONNECT options, among them the
//! token as `auth_token`. The answer is an authorization response JWT,
//! signed by the callout issuer (an account nkey whose public half is the
//! `issuer` of the server configuration), holding either an error or a user
//! JWT. That user JWT names the account the connection is placed in (its
//! `aud`) and grants exactly ([`Grant`]):
//!
//! - a device token: account [`DEVICE_ACCOUNT`], publish
//!   `hb.<account>.<device>.<session>`, subscribe `ctl.<account>.<device>`;
//! - a backend or operator token: account [`CLIENT_ACCOUNT`], publish the
//!   endpoints its role may call, subscribe the presence events and its own
//!   inbox prefix;
//!
//! and expires with the token, so the server closes the connection when the
//! token runs out. A token that does not verify, a session or token that was
//! ended (its key is in the revoked bucket, or in the connections bucket for
//! backend and operator tokens), or a store that cannot be read all get an
//! error: the callout fails closed, and so does the server when no vendor
//! answers. An admitted connection is recorded first ([`crate::access`]):
//! it replaces the session's previous connection, if any.
//!
//! Requests are decoded defensively (size cap, server-key signature check,
//! every field optional where nats-server may leave it out): a request that
//! does not decode is dropped and counted, never a panic.
//!
//! With `xkey` in the `auth_callout` block (the issuer's public curve key,
//! [`Issuer::xkey_public`]) the server seals each request to that key with
//! its own curve key, named in the [`SERVER_XKEY_HEADER`] header; the
//! callout opens it ([`open_request`]) and seals the response to the
//! server's key ([`seal_response`]). A request that does not open is dropped
//! and counted like one that does not decode. Without the header, request
//! and response travel in the clear.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::kv;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::StreamExt;
use headcount_protocol::subjects::endpoint::{
    ACTIVE, CHECK, KICK, LIMITS_GET, LIMITS_SET, STATS, TOKEN,
};
use headcount_protocol::subjects::{self, kv as keys};
use headcount_protocol::{AccountId, DeviceId, SessionId, now_millis};
use headcount_runtime::{Health, Shutdown};
use nkeys::{KeyPair, XKey};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::access::{Access, Connection};
use crate::{Role, TokenError, Vendor};

/// Where nats-server sends authorization requests.
pub const CALLOUT_SUBJECT: &str = "$SYS.REQ.USER.AUTH";
/// Queue group of the callout responders: several vendors share the load.
pub const CALLOUT_QUEUE: &str = "headcount-callout";
/// The NATS account devices are placed in (named in `nats.conf`): it can
/// reach the services' account only through the heartbeat stream it exports
/// and the control stream it imports.
pub const DEVICE_ACCOUNT: &str = "DEVICES";
/// The NATS account operators and backends are placed in: it imports the
/// query services and the presence events, and nothing else.
pub const CLIENT_ACCOUNT: &str = "CLIENTS";
/// Largest message a device may publish: a heartbeat is at most 1 KiB.
pub const DEVICE_MAX_PAYLOAD: i64 = headcount_protocol::wire::MAX_HEARTBEAT_BYTES as i64;
/// Subscriptions a device may hold: its control subject, and room for a
/// client library's own inbox.
pub const DEVICE_MAX_SUBSCRIPTIONS: i64 = 4;
/// Largest request an operator or backend may send.
pub const CLIENT_MAX_PAYLOAD: i64 = 64 * 1024;
/// Subscriptions an operator or backend connection may hold.
pub const CLIENT_MAX_SUBSCRIPTIONS: i64 = 256;
/// Environment variable that may hold the callout issuer's account seed
/// (`SA...`); otherwise it is generated into `<data_dir>/keys/`.
pub const ISSUER_SEED_ENV: &str = "HEADCOUNT_CALLOUT_SEED";
/// The issuer's seed file under `<data_dir>/keys/`.
const ISSUER_FILE: &str = "callout-issuer.nk";
/// The curve key's seed file under `<data_dir>/keys/`.
const XKEY_FILE: &str = "callout-xkey.nk";
/// Environment variable that may hold the callout's curve seed (`SX...`),
/// whose public half (`X...`) is the `xkey` of the server's `auth_callout`
/// block; otherwise it is generated into `<data_dir>/keys/`.
pub const XKEY_SEED_ENV: &str = "HEADCOUNT_CALLOUT_XKEY_SEED";
/// Header naming nats-server's public curve key on an encrypted
/// authorization request.
pub const SERVER_XKEY_HEADER: &str = "Nats-Server-Xkey";
/// Authorization requests larger than this are not decoded.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How long the revocation lookup may take before the connection is refused.
const REVOCATION_TIMEOUT: Duration = Duration::from_secs(1);

const JWT_HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

/// The callout's keys: the account key nats-server trusts for responses
/// (the `issuer` of its `auth_callout` block) and the curve key requests are
/// encrypted to (its `xkey`).
pub struct Issuer {
    key: KeyPair,
    xkey: XKey,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("public_key", &self.key.public_key())
            .field("xkey_public", &self.xkey.public_key())
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// The issuer from [`ISSUER_SEED_ENV`], else from
    /// `<data_dir>/keys/callout-issuer.nk`; its curve key from
    /// [`XKEY_SEED_ENV`], else from `<data_dir>/keys/callout-xkey.nk`. A
    /// missing file is generated (mode 0600) on first use.
    ///
    /// Vendors that share the issuer through the environment but not a data
    /// directory must share the curve key the same way: the server knows
    /// one `xkey`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Issuer> {
        let key = load_or_generate(
            data_dir,
            ISSUER_SEED_ENV,
            ISSUER_FILE,
            "auth callout issuer",
        )?;
        let xkey = load_or_generate(data_dir, XKEY_SEED_ENV, XKEY_FILE, "auth callout xkey")?;
        Ok(Issuer { key, xkey })
    }

    /// An issuer from an account seed (`SA...`). Its curve key is derived
    /// from that seed, so the same seed always gives the same `xkey`; use
    /// [`Issuer::from_seeds`] to name the curve key.
    pub fn from_seed(seed: &str) -> anyhow::Result<Issuer> {
        let key = account_key(seed)?;
        let mut derived = sha2::Sha256::new();
        derived.update(b"headcount auth callout xkey v1\0");
        derived.update(seed.trim().as_bytes());
        let xkey = XKey::new_from_raw(derived.finalize().into());
        Ok(Issuer { key, xkey })
    }

    /// An issuer from an account seed (`SA...`) and a curve seed (`SX...`).
    pub fn from_seeds(account_seed: &str, xkey_seed: &str) -> anyhow::Result<Issuer> {
        Ok(Issuer {
            key: account_key(account_seed)?,
            xkey: curve_key(xkey_seed)?,
        })
    }

    /// A fresh issuer (both keys), for tests and one-off servers.
    pub fn generate() -> Issuer {
        Issuer {
            key: KeyPair::new_account(),
            xkey: XKey::new(),
        }
    }

    /// Its seed (`SA...`): a secret, to hand to another vendor instance.
    pub fn seed(&self) -> anyhow::Result<String> {
        self.key.seed_text()
    }

    /// Its public key: the `issuer` of the server's `auth_callout` block.
    pub fn public_key(&self) -> String {
        self.key.public_key()
    }

    /// Its curve seed (`SX...`): a secret, to hand to another vendor
    /// instance (as [`XKEY_SEED_ENV`]).
    pub fn xkey_seed(&self) -> anyhow::Result<String> {
        self.xkey.seed_text()
    }

    /// Its public curve key (`X...`): the `xkey` of the server's
    /// `auth_callout` block.
    pub fn xkey_public(&self) -> String {
        self.xkey.public_key()
    }
}

/// An account key pair from its seed (`SA...`).
fn account_key(seed: &str) -> anyhow::Result<KeyPair> {
    let key =
        KeyPair::from_seed(seed.trim()).map_err(|e| anyhow::anyhow!("invalid nkey seed: {e}"))?;
    anyhow::ensure!(
        key.public_key().starts_with('A'),
        "the callout issuer must be an account key (seed SA...)"
    );
    Ok(key)
}

/// A curve key pair from its seed (`SX...`).
fn curve_key(seed: &str) -> anyhow::Result<XKey> {
    XKey::from_seed(seed.trim())
        .map_err(|e| anyhow::anyhow!("invalid xkey seed (expected SX...): {e}"))
}

/// The two kinds of key the callout keeps: the issuer's account key and its
/// curve key.
trait CalloutKey: Sized {
    fn parse(seed: &str) -> anyhow::Result<Self>;
    fn generate() -> Self;
    fn seed_text(&self) -> anyhow::Result<String>;
    fn public_text(&self) -> String;
}

/// nkeys gives both kinds of key the same `seed` and `public_key`; they
/// differ in how a seed is checked, how a new key is made and what their
/// seed is called in an error.
macro_rules! callout_key {
    ($key:ty, $parse:path, $generate:path, $seed:literal) => {
        impl CalloutKey for $key {
            fn parse(seed: &str) -> anyhow::Result<Self> {
                $parse(seed)
            }
            fn generate() -> Self {
                $generate()
            }
            fn seed_text(&self) -> anyhow::Result<String> {
                self.seed()
                    .map_err(|e| anyhow::anyhow!("encoding {}: {e}", $seed))
            }
            fn public_text(&self) -> String {
                self.public_key()
            }
        }
    };
}

callout_key!(KeyPair, account_key, KeyPair::new_account, "seed");
callout_key!(XKey, curve_key, XKey::new, "xkey seed");

/// A key from the seed in `env`, else from the seed file `file` under
/// `<data_dir>/keys/`, else a new one whose seed is written to that file
/// with mode 0600. The seed file and its directory must be ones no other
/// user could have written ([`headcount_runtime::secret::read_private`]);
/// the start fails otherwise.
fn load_or_generate<T: CalloutKey>(
    data_dir: &Path,
    env: &str,
    file: &str,
    what: &str,
) -> anyhow::Result<T> {
    let dir = crate::keys::key_dir(data_dir);
    let path = &dir.join(file);
    if let Ok(seed) = std::env::var(env)
        && !seed.trim().is_empty()
    {
        return T::parse(seed.trim()).with_context(|| format!("reading {env}"));
    }
    match headcount_runtime::secret::read_private(path)? {
        Some(seed) => String::from_utf8(seed)
            .map_err(anyhow::Error::from)
            .and_then(|seed| T::parse(seed.trim()))
            .with_context(|| format!("reading {what} {}", path.display())),
        None => {
            let key = T::generate();
            let (seed, public) = (key.seed_text()?, key.public_text());
            headcount_runtime::secret::create_private_dir(&dir)?;
            headcount_runtime::secret::write_private(path, seed.as_bytes())?;
            tracing::info!(public_key = %public, file = %path.display(), "generated the {what} key");
            Ok(key)
        }
    }
}

/// The authorization request in the clear. Without `server_xkey` (the
/// [`SERVER_XKEY_HEADER`] of the request) nats-server sent it unencrypted
/// and `payload` is the request; with it, `payload` was sealed by that
/// server key to the issuer's curve key and is opened here. Never panics,
/// whatever the bytes.
pub fn open_request(
    issuer: &Issuer,
    server_xkey: Option<&str>,
    payload: &[u8],
) -> Result<Vec<u8>, RequestError> {
    let Some(server_xkey) = server_xkey else {
        return Ok(payload.to_vec());
    };
    // Version tag, nonce and tag around the request itself.
    if payload.len() > MAX_REQUEST_BYTES + SEAL_OVERHEAD {
        return Err(RequestError::TooLarge);
    }
    let server = server_curve_key(server_xkey)?;
    issuer
        .xkey
        .open(payload, &server)
        .map_err(|_| RequestError::Undecryptable)
}

/// The response as sent: `jwt` sealed by the issuer's curve key to the
/// server's `server_xkey` when the request came encrypted, else `jwt`
/// itself.
pub fn seal_response(
    issuer: &Issuer,
    server_xkey: Option<&str>,
    jwt: String,
) -> Result<Vec<u8>, RequestError> {
    let Some(server_xkey) = server_xkey else {
        return Ok(jwt.into_bytes());
    };
    let server = server_curve_key(server_xkey)?;
    issuer
        .xkey
        .seal(jwt.as_bytes(), &server)
        .map_err(|_| RequestError::BadServerXkey)
}

/// What sealing adds to a message: `xkv1`, a 24-byte nonce, a 16-byte tag.
const SEAL_OVERHEAD: usize = 4 + 24 + 16;

fn server_curve_key(server_xkey: &str) -> Result<XKey, RequestError> {
    let server_xkey = server_xkey.trim();
    if !server_xkey.starts_with('X') {
        return Err(RequestError::BadServerXkey);
    }
    XKey::from_public_key(server_xkey).map_err(|_| RequestError::BadServerXkey)
}

/// Why a connection was refused; the `reason` label of the callout metric.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no token presented")]
    NoToken,
    #[error("{0}")]
    Token(TokenError),
    #[error("session was ended (evicted, refused, kicked or replaced)")]
    Revoked,
    #[error("revocation list unavailable")]
    RevocationUnavailable,
    #[error("connection registry unavailable")]
    RegistryUnavailable,
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoToken => "no_token",
            Refusal::Token(e) => e.kind(),
            Refusal::Revoked => "revoked",
            Refusal::RevocationUnavailable => "revocation_unavailable",
            Refusal::RegistryUnavailable => "registry_unavailable",
        }
    }
}

/// A request that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("authorization request is larger than {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
    #[error("authorization request is not a JWT")]
    NotAJwt,
    #[error("authorization request is not ed25519-nkey signed")]
    WrongAlgorithm,
    #[error("authorization request does not parse: {0}")]
    Unreadable(String),
    #[error("authorization request is not signed by a server key")]
    NotFromAServer,
    #[error("authorization request signature is invalid")]
    BadSignature,
    #[error("authorization request names no valid user nkey")]
    BadUserKey,
    #[error("encrypted authorization request does not open with our xkey")]
    Undecryptable,
    #[error("the {SERVER_XKEY_HEADER} header is not a curve public key (X...)")]
    BadServerXkey,
}

#[derive(Debug, Deserialize)]
struct RequestClaims {
    iss: String,
    nats: AuthRequest,
}

/// What the callout reads from an authorization request.
#[derive(Debug, Clone, Deserialize)]
pub struct AuthRequest {
    pub server_id: ServerId,
    pub user_nkey: String,
    #[serde(default)]
    pub client_info: ClientInfo,
    #[serde(default)]
    pub connect_opts: ConnectOpts,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerId {
    pub id: String,
    #[serde(default)]
    pub name: String,
}

/// Every field may be left out.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ClientInfo {
    pub host: Option<String>,
    pub id: Option<u64>,
    pub name: Option<String>,
}

/// Every field may be left out.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ConnectOpts {
    pub auth_token: Option<String>,
    pub user: Option<String>,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes and checks an authorization request: a JWT signed by the server
/// key it names as issuer, naming a user nkey. Never panics, whatever the
/// bytes.
pub fn decode_request(payload: &[u8]) -> Result<AuthRequest, RequestError> {
    if payload.len() > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLarge);
    }
    let text = std::str::from_utf8(payload).map_err(|_| RequestError::NotAJwt)?;
    let text = text.trim();
    let (h, p, s) = crate::jwt_parts(text).ok_or(RequestError::NotAJwt)?;
    let unbase64 = |part| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| RequestError::NotAJwt)
    };
    let unreadable = |e: serde_json::Error| RequestError::Unreadable(e.to_string());
    let header: serde_json::Value = serde_json::from_slice(&unbase64(h)?).map_err(unreadable)?;
    let alg = header.get("alg").and_then(|a| a.as_str()).unwrap_or("");
    if !alg.eq_ignore_ascii_case("ed25519-nkey") {
        return Err(RequestError::WrongAlgorithm);
    }
    let claims = unbase64(p)?;
    let sig = unbase64(s)?;
    let claims: RequestClaims = serde_json::from_slice(&claims).map_err(unreadable)?;
    if !claims.iss.starts_with('N') {
        return Err(RequestError::NotFromAServer);
    }
    let server = KeyPair::from_public_key(&claims.iss).map_err(|_| RequestError::NotFromAServer)?;
    let signed = &text[..h.len() + 1 + p.len()];
    server
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| RequestError::BadSignature)?;
    let user = &claims.nats.user_nkey;
    if !user.starts_with('U') || KeyPair::from_public_key(user).is_err() {
        return Err(RequestError::BadUserKey);
    }
    Ok(claims.nats)
}

/// The claims every NATS JWT shares; `nats` holds the kind-specific part.
#[derive(Debug, Serialize)]
struct NatsClaims<T: Serialize> {
    #[serde(skip_serializing_if = "String::is_empty")]
    aud: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
    jti: String,
    iat: u64,
    iss: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    name: String,
    sub: String,
    nats: T,
}

#[derive(Debug, Serialize)]
struct Permission {
    allow: Vec<String>,
}

#[derive(Debug, Serialize)]
struct UserGrant {
    #[serde(rename = "pub")]
    publish: Permission,
    sub: Permission,
    subs: i64,
    data: i64,
    payload: i64,
    #[serde(rename = "type")]
    kind: &'static str,
    version: u8,
}

#[derive(Debug, Serialize)]
struct AuthResponse {
    #[serde(skip_serializing_if = "String::is_empty")]
    jwt: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    error: String,
    #[serde(rename = "type")]
    kind: &'static str,
    version: u8,
}

/// Signs `claims` as a NATS JWT with `key` (`iss`, `iat` and `jti` are set
/// here).
fn encode<T: Serialize>(mut claims: NatsClaims<T>, key: &KeyPair) -> anyhow::Result<String> {
    claims.iss = key.public_key();
    claims.iat = now_millis() / 1000;
    claims.jti = String::new();
    let digest = sha2::Sha512_256::digest(serde_json::to_vec(&claims)?);
    claims.jti = data_encoding::BASE32_NOPAD.encode(&digest);
    let body = format!(
        "{}.{}",
        b64(JWT_HEADER.as_bytes()),
        b64(&serde_json::to_vec(&claims)?)
    );
    let sig = key
        .sign(body.as_bytes())
        .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
    Ok(format!("{body}.{}", b64(&sig)))
}

/// What a connection may do: the NATS account it is placed in, subjects it
/// may publish and subscribe to, and its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The user name the server logs for the connection.
    pub name: String,
    /// The account the connection is placed in ([`DEVICE_ACCOUNT`] or
    /// [`CLIENT_ACCOUNT`]); never the services' own.
    pub account: &'static str,
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// Largest message it may publish, in bytes.
    pub max_payload: i64,
    /// Subscriptions it may hold.
    pub max_subscriptions: i64,
}

/// The endpoints an operator's live view may call.
const OPERATOR_ENDPOINTS: &[&str] = &[ACTIVE, STATS, LIMITS_GET, LIMITS_SET, KICK];

/// The endpoints an application backend may call.
const BACKEND_ENDPOINTS: &[&str] = &[ACTIVE, CHECK, LIMITS_GET, STATS, TOKEN];

impl Grant {
    /// A device: its own heartbeat subject and its own control subject,
    /// nothing else, in the devices' account. The heartbeat subject is
    /// granted as the server's mapping makes it (the device publishes
    /// `hb.<account>.<device>.<session>`, the server checks the partitioned
    /// subject): the one partition of its account, so that a device cannot
    /// put its heartbeats on another partition by publishing there directly.
    pub fn device(account: &AccountId, device: &DeviceId, session: &SessionId) -> Grant {
        Grant {
            name: format!("{account}/{device}"),
            account: DEVICE_ACCOUNT,
            publish: vec![subjects::partitioned_heartbeat(account, device, session)],
            subscribe: vec![subjects::control(account, device)],
            max_payload: DEVICE_MAX_PAYLOAD,
            max_subscriptions: DEVICE_MAX_SUBSCRIPTIONS,
        }
    }

    /// An operator or backend in the clients' account: `endpoints`, every
    /// presence event, and replies under its own inbox prefix only.
    fn client(name: String, endpoints: &[&str], claims: &crate::Claims) -> Grant {
        Grant {
            name,
            account: CLIENT_ACCOUNT,
            publish: endpoints
                .iter()
                .map(|ep| subjects::endpoint_subject(ep))
                .collect(),
            subscribe: vec![
                format!("{}.events.>", subjects::SERVICE_PREFIX),
                format!("{}.>", claims.inbox_prefix()),
            ],
            max_payload: CLIENT_MAX_PAYLOAD,
            max_subscriptions: CLIENT_MAX_SUBSCRIPTIONS,
        }
    }

    /// An operator's live view: the query and steering endpoints.
    pub fn operator(claims: &crate::Claims) -> Grant {
        Self::client(
            format!("operator/{}", claims.session),
            OPERATOR_ENDPOINTS,
            claims,
        )
    }

    /// An application backend: queries and device tokens, no steering.
    pub fn backend(claims: &crate::Claims) -> Grant {
        Self::client(
            format!("backend/{}/{}", claims.device, claims.session),
            BACKEND_ENDPOINTS,
            claims,
        )
    }

    /// The grant a verified token carries.
    pub fn of(claims: &crate::Claims) -> Grant {
        match claims.role() {
            Role::Operator => Grant::operator(claims),
            Role::Backend => Grant::backend(claims),
            Role::Device => Grant::device(&claims.account, &claims.device, &claims.session),
        }
    }
}

/// The user JWT of a connection: what `grant` allows, until `expires`.
fn user_jwt(
    issuer: &Issuer,
    user_nkey: &str,
    grant: Grant,
    expires: u64,
) -> anyhow::Result<String> {
    encode(
        NatsClaims {
            aud: grant.account.to_string(),
            exp: Some(expires),
            jti: String::new(),
            iat: 0,
            iss: String::new(),
            name: grant.name,
            sub: user_nkey.to_string(),
            nats: UserGrant {
                publish: Permission {
                    allow: grant.publish,
                },
                sub: Permission {
                    allow: grant.subscribe,
                },
                subs: grant.max_subscriptions,
                data: -1,
                payload: grant.max_payload,
                kind: "user",
                version: 2,
            },
        },
        &issuer.key,
    )
}

/// The authorization response: the user JWT, or an error.
fn response(
    issuer: &Issuer,
    req: &AuthRequest,
    outcome: Result<String, String>,
) -> anyhow::Result<String> {
    let (jwt, error) = match outcome {
        Ok(jwt) => (jwt, String::new()),
        Err(e) => (String::new(), e),
    };
    encode(
        NatsClaims {
            aud: req.server_id.id.clone(),
            exp: None,
            jti: String::new(),
            iat: 0,
            iss: String::new(),
            name: String::new(),
            sub: req.user_nkey.clone(),
            nats: AuthResponse {
                jwt,
                error,
                kind: "authorization_response",
                version: 2,
            },
        },
        &issuer.key,
    )
}

/// The token a request presents, if any.
fn token_of(req: &AuthRequest) -> Result<&str, Refusal> {
    req.connect_opts
        .auth_token
        .as_deref()
        .filter(|t| !t.is_empty())
        .ok_or(Refusal::NoToken)
}

/// Decides one connection: the verified claims of its token, unless the
/// token is missing, does not verify, or its session was ended.
async fn authorize(
    vendor: &Vendor,
    stores: &CalloutStores,
    req: &AuthRequest,
) -> Result<crate::Claims, Refusal> {
    let token = token_of(req)?;
    let claims = vendor.verify(token).map_err(Refusal::Token)?;
    still_alive(&stores.revoked, &claims).await?;
    let client = if claims.role().is_client() {
        let id = claims.token_id().clone();
        client_not_revoked(stores.access.client_revoked(&id).await)?;
        // verify() let an operator or backend token through only if the key
        // that signed it was the signing key at that moment: the key to
        // record, not the signing key of now (a rotation may have happened
        // since).
        let kid = crate::peek_header(token)
            .ok()
            .and_then(|h| h.kid)
            .ok_or(Refusal::Token(TokenError::UnknownKid))?;
        Some((id, kid))
    } else {
        None
    };
    // One live connection per device session: this one replaces any other.
    let conn = Connection {
        server: req.server_id.id.clone(),
        cid: req.client_info.id.ok_or(Refusal::RegistryUnavailable)?,
        kid: client.as_ref().map(|(_, kid)| kid.clone()),
    };
    if let Err(e) = stores.access.admit(&claims, conn.clone()).await {
        tracing::error!(error = %e, "recording a connection");
        return Err(Refusal::RegistryUnavailable);
    }
    // The checks above raced with `POST /v1/tokens/revoke` and with key
    // rotations, which end an operator or backend token by writing (the
    // revocation, the new signing key) and then reading the recorded
    // connections to close them. Were they to run between our checks and
    // our record, they would miss this connection and it would live on.
    // So, now that it is recorded, check again, in the opposite order of
    // theirs: they write, then read the records; we wrote the record, now
    // we read what they write. Each pair is ordered (the revocation and the
    // record are in one stream, read from its leader; the signing key is
    // one lock in this process), so one side sees the other: either our
    // record was written before their read (they close this connection:
    // the server has registered it while it awaits our answer) or their
    // write came before our read here (we refuse it).
    if let Some((id, kid)) = &client {
        let recheck = if vendor.signing_kid() != *kid {
            Err(Refusal::Token(TokenError::Superseded))
        } else {
            client_not_revoked(stores.access.client_revoked_now(id).await)
        };
        if let Err(refusal) = recheck {
            // Refused, so the server drops the connection; its record goes.
            if let Err(e) = stores.access.forget(&claims, &conn).await {
                tracing::warn!(error = %e, "removing the record of a refused connection");
            }
            return Err(refusal);
        }
    }
    Ok(claims)
}

/// The refusal, if any, that the answer to "was this operator or backend
/// token revoked?" calls for.
fn client_not_revoked(revoked: Result<bool, crate::access::AccessError>) -> Result<(), Refusal> {
    match revoked {
        Ok(false) => Ok(()),
        Ok(true) => Err(Refusal::Revoked),
        Err(e) => {
            tracing::error!(error = %e, "reading operator and backend revocations");
            Err(Refusal::RevocationUnavailable)
        }
    }
}

/// The buckets the callout reads and writes.
#[derive(Clone)]
pub struct CalloutStores {
    /// Ended device sessions (`headcount-revoked`).
    pub revoked: kv::Store,
    /// Live connections and revoked operator/backend tokens.
    pub access: Access,
}

impl std::fmt::Debug for CalloutStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CalloutStores")
    }
}

/// Whether verified `claims` may still be used for anything new (a
/// connection, a renewal): not expired without leeway, and its session not
/// ended (no key in the revocation bucket). Fails closed when the
/// revocation bucket cannot be read in time.
pub(crate) async fn still_alive(
    revoked: &kv::Store,
    claims: &crate::Claims,
) -> Result<(), Refusal> {
    // verify() tolerates clock skew between hosts; a connection or a renewal,
    // though, would last until `exp`, which must still be ahead.
    if claims.exp <= now_millis() / 1000 {
        return Err(Refusal::Token(TokenError::Expired));
    }
    match tokio::time::timeout(
        REVOCATION_TIMEOUT,
        revoked.get(keys::revoked(&claims.account, &claims.session)),
    )
    .await
    {
        Ok(Ok(None)) => Ok(()),
        Ok(Ok(Some(_))) => Err(Refusal::Revoked),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "reading the revocation list");
            Err(Refusal::RevocationUnavailable)
        }
        Err(_) => {
            tracing::error!("reading the revocation list timed out");
            Err(Refusal::RevocationUnavailable)
        }
    }
}

/// Answers one authorization request; returns the response JWT, or `None`
/// when the request itself was unusable (then the server times out and
/// refuses the client).
pub(crate) async fn answer(
    vendor: &Vendor,
    issuer: &Issuer,
    stores: &CalloutStores,
    payload: &[u8],
) -> Option<String> {
    let req = match decode_request(payload) {
        Ok(req) => req,
        Err(e) => {
            tracing::warn!(error = %e, "dropping an authorization request");
            vendor.count_callout("bad_request");
            return None;
        }
    };
    let client = req.client_info.name.clone().unwrap_or_default();
    let host = req.client_info.host.clone().unwrap_or_default();
    // A host that has been refused too often lately has its bad tokens
    // refused at once: no KV lookup, no refusal log line; a flood of
    // garbage from it costs the request's decoding, a signature check and
    // the response's signature only. A token that verifies is never shed:
    // a host address is often shared (NAT, the TLS proxy in front of the
    // WebSocket listener), and whoever floods it with garbage must not lock
    // out the valid devices behind it. Such a token gets the usual decision
    // (revocation lookup, admission).
    let outcome = match vendor.throttle().callout_blocked(&host) {
        Some(left) if !verifies(vendor, &req) => shed(vendor, &host, left),
        _ => decide(vendor, issuer, stores, &req, &host, &client).await,
    };
    match response(issuer, &req, outcome) {
        Ok(jwt) => Some(jwt),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "signing an authorization response");
            None
        }
    }
}

/// Whether the request's token verifies (signature, claims, key), checked
/// without a side effect: no verification counted (the decision that
/// follows counts its own), nothing logged. What a host being shed must
/// present to be let through.
fn verifies(vendor: &Vendor, req: &AuthRequest) -> bool {
    token_of(req).is_ok_and(|token| vendor.check(token).is_ok())
}

/// What a connection from a host that is being shed is told.
const SHED_ERROR: &str = "too many refused connections from this address; try again later";

/// The refusal of a request whose token does not verify from a host being
/// shed (for `left` more), counted as `throttled` and logged at most once a
/// second.
fn shed(vendor: &Vendor, host: &str, left: Duration) -> Result<String, String> {
    vendor.count_callout("throttled");
    if let Some(suppressed) = vendor.throttle().shed_log.admit() {
        tracing::warn!(
            %host,
            retry_in_ms = left.as_millis() as u64,
            suppressed,
            "refusing a bad token at once: its host was refused too often (valid tokens still get in)"
        );
    }
    Err(SHED_ERROR.to_string())
}

/// Whether a refusal is the connecting host's doing (charged to its
/// refusal budget), rather than ours (a store we could not read).
fn host_at_fault(refusal: &Refusal) -> bool {
    match refusal {
        Refusal::NoToken | Refusal::Token(_) | Refusal::Revoked => true,
        Refusal::RevocationUnavailable | Refusal::RegistryUnavailable => false,
    }
}

/// Counts and logs a refused connection (a few lines a second at most, with
/// the number left out) and charges it to the host's refusal budget when it
/// was the host's doing.
fn refused(vendor: &Vendor, refusal: &Refusal, host: &str, client: &str) {
    vendor.count_callout(refusal.reason());
    let throttle = vendor.throttle();
    if let Some(suppressed) = throttle.refusal_log.admit() {
        tracing::warn!(reason = refusal.reason(), %host, %client, suppressed, "device connection refused: {refusal}");
    }
    if host_at_fault(refusal)
        && let Some(block) = throttle.callout_refused(host)
        && let Some(suppressed) = throttle.shed_log.admit()
    {
        tracing::warn!(
            %host,
            block_ms = block.as_millis() as u64,
            suppressed,
            "too many refused connections from one host: refusing its bad tokens at once for a while"
        );
    }
}

/// The outcome for a request from a host that is not being shed, or whose
/// token verifies: the user JWT or why not.
async fn decide(
    vendor: &Vendor,
    issuer: &Issuer,
    stores: &CalloutStores,
    req: &AuthRequest,
    host: &str,
    client: &str,
) -> Result<String, String> {
    match authorize(vendor, stores, req).await {
        Ok(claims) => {
            let grant = Grant::of(&claims);
            let name = grant.name.clone();
            match user_jwt(issuer, &req.user_nkey, grant, claims.exp) {
                Ok(jwt) => {
                    vendor.count_callout("allowed");
                    tracing::debug!(user = %name, %host, "connection allowed");
                    Ok(jwt)
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "signing a user jwt");
                    vendor.count_callout("internal");
                    Err("internal error".to_string())
                }
            }
        }
        Err(refusal) => {
            refused(vendor, &refusal, host, client);
            Err(refusal.to_string())
        }
    }
}

/// Answers authorization requests until `shutdown`.
///
/// `health` is the callout's scope (the caller's, which tracks the NATS
/// connection): serving from the moment the subscription has reached the
/// server until it stops.
pub async fn serve_callout(
    vendor: Vendor,
    issuer: Issuer,
    nats: async_nats::Client,
    stores: CalloutStores,
    health: Health,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut requests = nats
        .queue_subscribe(CALLOUT_SUBJECT, CALLOUT_QUEUE.to_string())
        .await
        .context("subscribing to auth callout requests")?;
    nats.flush()
        .await
        .context("flushing callout subscription")?;
    let serving = health.serving();
    tracing::info!(issuer = %issuer.public_key(), xkey = %issuer.xkey_public(), "auth callout ready");
    tokio::spawn(crate::access::end_clients_on_rotation(
        vendor.clone(),
        stores.access.clone(),
        shutdown.clone(),
    ));
    let issuer = std::sync::Arc::new(issuer);
    // A flood of bad requests must not become a flood of log lines.
    let undecryptable = crate::throttle::LogSampler::new(1);
    let mut stop = std::pin::pin!(shutdown.wait());
    loop {
        let msg = tokio::select! {
            _ = &mut stop => break,
            msg = requests.next() => match msg {
                Some(msg) => msg,
                None => anyhow::bail!("auth callout subscription closed"),
            },
        };
        let Some(reply) = msg.reply.clone() else {
            vendor.count_callout("bad_request");
            continue;
        };
        // Encrypted (the server has our `xkey`) when it names its own xkey.
        let server_xkey = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(SERVER_XKEY_HEADER))
            .map(|v| v.as_str().to_string());
        let payload = match open_request(&issuer, server_xkey.as_deref(), &msg.payload) {
            Ok(payload) => payload,
            Err(e) => {
                vendor.count_callout("bad_request");
                if let Some(skipped) = undecryptable.admit() {
                    tracing::warn!(error = %e, skipped, "dropping an authorization request (is the server's auth_callout xkey our xkey?)");
                }
                continue;
            }
        };
        let (vendor, issuer, stores, nats) =
            (vendor.clone(), issuer.clone(), stores.clone(), nats.clone());
        tokio::spawn(async move {
            let Some(jwt) = answer(&vendor, &issuer, &stores, &payload).await else {
                return;
            };
            let response = match seal_response(&issuer, server_xkey.as_deref(), jwt) {
                Ok(response) => response,
                Err(e) => {
                    tracing::error!(error = %e, "sealing an authorization response");
                    return;
                }
            };
            if let Err(e) = nats.publish(reply, response.into()).await {
                tracing::warn!(error = %e, "sending an authorization response");
            }
        });
    }
    drop(serving);
    let _ = requests.unsubscribe().await;
    tracing::info!("auth callout stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A request as nats-server signs it (what is inside the encryption,
    /// when there is one).
    pub(super) fn signed_request(server: &KeyPair, user: &str, token: Option<&str>) -> String {
        let claims = serde_json::json!({
            "iss": server.public_key(),
            "sub": user,
            "nats": {
                "server_id": {"id": server.public_key(), "name": "n1", "host": "127.0.0.1"},
                "user_nkey": user,
                "client_info": {"host": "127.0.0.1", "id": 7, "name": "tv"},
                "connect_opts": {"auth_token": token, "protocol": 1},
                "type": "authorization_request",
                "version": 2
            }
        });
        let body = format!(
            "{}.{}",
            b64(JWT_HEADER.as_bytes()),
            b64(&serde_json::to_vec(&claims).unwrap())
        );
        let sig = server.sign(body.as_bytes()).unwrap();
        format!("{body}.{}", b64(&sig))
    }

    fn payload_of(jwt: &str) -> serde_json::Value {
        let p = jwt.split('.').nth(1).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
    }

    #[test]
    fn a_server_signed_request_decodes() {
        let server = KeyPair::new_server();
        let user = KeyPair::new_user().public_key();
        let req = decode_request(signed_request(&server, &user, Some("t")).as_bytes()).unwrap();
        assert_eq!(req.user_nkey, user);
        assert_eq!(req.connect_opts.auth_token.as_deref(), Some("t"));
        assert_eq!(req.server_id.id, server.public_key());
    }

    #[test]
    fn tampered_or_foreign_requests_are_refused() {
        let server = KeyPair::new_server();
        let user = KeyPair::new_user().public_key();
        let good = signed_request(&server, &user, Some("t"));
        // Claims swapped under the same signature.
        let other = signed_request(&server, &user, Some("other"));
        let mut parts: Vec<&str> = good.split('.').collect();
        let other_claims = other.split('.').nth(1).unwrap();
        parts[1] = other_claims;
        assert_eq!(
            decode_request(parts.join(".").as_bytes()).unwrap_err(),
            RequestError::BadSignature
        );
        // Signed by an account key instead of a server.
        let account = KeyPair::new_account();
        let forged = signed_request(&account, &user, Some("t"));
        assert_eq!(
            decode_request(forged.as_bytes()).unwrap_err(),
            RequestError::NotFromAServer
        );
        // A user nkey that is not one.
        let bad_user = signed_request(&server, &account.public_key(), Some("t"));
        assert_eq!(
            decode_request(bad_user.as_bytes()).unwrap_err(),
            RequestError::BadUserKey
        );
        assert_eq!(decode_request(b"a.b").unwrap_err(), RequestError::NotAJwt);
        let huge = vec![b'a'; MAX_REQUEST_BYTES + 1];
        assert_eq!(decode_request(&huge).unwrap_err(), RequestError::TooLarge);
    }

    #[test]
    fn user_jwts_grant_exactly_the_device_subjects_until_expiry() {
        let issuer = Issuer::generate();
        let user = KeyPair::new_user().public_key();
        let (a, d, s) = (
            AccountId::parse("acme").unwrap(),
            DeviceId::parse("tv").unwrap(),
            SessionId::parse("s1").unwrap(),
        );
        let jwt = user_jwt(&issuer, &user, Grant::device(&a, &d, &s), 1_900_000_000).unwrap();
        let claims = payload_of(&jwt);
        assert_eq!(claims["sub"], user.as_str());
        assert_eq!(claims["iss"], issuer.public_key().as_str());
        assert_eq!(claims["aud"], DEVICE_ACCOUNT);
        assert_eq!(claims["exp"], 1_900_000_000u64);
        assert_eq!(
            claims["nats"]["pub"]["allow"],
            serde_json::json!(["hbp.15.acme.tv.s1"])
        );
        assert_eq!(
            claims["nats"]["sub"]["allow"],
            serde_json::json!(["ctl.acme.tv"])
        );
        assert_eq!(claims["nats"]["type"], "user");
        // The signature verifies with the issuer's public key.
        let (body, sig) = jwt.rsplit_once('.').unwrap();
        KeyPair::from_public_key(&issuer.public_key())
            .unwrap()
            .verify(body.as_bytes(), &URL_SAFE_NO_PAD.decode(sig).unwrap())
            .unwrap();
    }

    #[test]
    fn operator_tokens_grant_queries_events_and_their_own_inbox_only() {
        let claims = crate::Claims {
            device: DeviceId::parse(crate::OPERATOR_ROLE).unwrap(),
            account: AccountId::parse(crate::OPERATOR_ROLE).unwrap(),
            session: SessionId::parse("OPS1").unwrap(),
            iat: 0,
            exp: 1,
            nbf: 0,
            iss: "headcount".into(),
            aud: "headcount-devices".into(),
            plan: None,
            role: Some(crate::OPERATOR_ROLE.into()),
        };
        // A backend: queries and device tokens, no steering.
        let backend = crate::Claims {
            device: DeviceId::parse("shop").unwrap(),
            account: AccountId::parse(crate::BACKEND_ROLE).unwrap(),
            role: Some(crate::BACKEND_ROLE.into()),
            ..claims.clone()
        };
        for (claims, endpoints) in [
            (
                &claims,
                ["active", "stats", "limits.get", "limits.set", "kick"],
            ),
            (
                &backend,
                ["active", "check", "limits.get", "stats", "token"],
            ),
        ] {
            let grant = Grant::of(claims);
            assert_eq!(grant.publish, endpoints.map(|e| format!("headcount.{e}")));
            // Every presence event, and replies under its own inbox only.
            assert_eq!(grant.subscribe, ["headcount.events.>", "_INBOX_OPS1.>"]);
            assert_eq!(grant.account, CLIENT_ACCOUNT);
            assert!(!grant.publish.iter().any(|s| s.starts_with("hb")));
        }
        // The same claims without the role are a device token for a device
        // named "operator": its own two subjects only, in the devices'
        // account, with the devices' limits.
        let device = Grant::of(&crate::Claims {
            role: None,
            ..claims
        });
        let p = headcount_protocol::partition::of("operator");
        assert_eq!(device.publish, [format!("hbp.{p}.operator.operator.OPS1")]);
        assert_eq!(device.subscribe, ["ctl.operator.operator"]);
        assert_eq!(device.account, DEVICE_ACCOUNT);
        assert_eq!(device.max_payload, 1024);
    }

    #[test]
    fn issuer_seeds_must_be_account_keys() {
        let user_seed = KeyPair::new_user().seed().unwrap();
        assert!(Issuer::from_seed(&user_seed).is_err());
        assert!(Issuer::from_seed("garbage").is_err());
        let account_seed = KeyPair::new_account().seed().unwrap();
        assert!(Issuer::from_seed(&account_seed).is_ok());
    }

    #[test]
    fn the_issuer_key_is_generated_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let a = Issuer::open(dir.path()).unwrap();
        let b = Issuer::open(dir.path()).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(crate::keys::key_dir(dir.path()).join(ISSUER_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_request(&bytes);
        }

        #[test]
        fn decoding_jwt_shaped_garbage_never_panics(h in "[A-Za-z0-9_-]{0,64}", p in "[A-Za-z0-9_-]{0,256}", s in "[A-Za-z0-9_-]{0,128}") {
            let _ = decode_request(format!("{h}.{p}.{s}").as_bytes());
        }

        #[test]
        fn decoding_json_shaped_claims_never_panics(claims in "\\{[ -~]{0,200}\\}") {
            let jwt = format!("{}.{}.{}", b64(JWT_HEADER.as_bytes()), b64(claims.as_bytes()), b64(&[0u8; 64]));
            prop_assert!(decode_request(jwt.as_bytes()).is_err());
        }
    }
}

#[cfg(test)]
mod xkey_tests {
    use super::*;
    use proptest::prelude::*;

    fn server_signed_request(server: &KeyPair, user: &str) -> String {
        super::tests::signed_request(server, user, Some("t"))
    }

    /// The issuer's public curve key, as nats-server holds it (`xkey`).
    fn configured_xkey(issuer: &Issuer) -> XKey {
        XKey::from_public_key(&issuer.xkey_public()).unwrap()
    }

    #[test]
    fn an_encrypted_request_opens_and_its_response_opens_on_the_server() {
        let issuer = Issuer::generate();
        let server = XKey::new();
        let server_nkey = KeyPair::new_server();
        let user = KeyPair::new_user().public_key();
        let request = server_signed_request(&server_nkey, &user);
        let sealed = server
            .seal(request.as_bytes(), &configured_xkey(&issuer))
            .unwrap();
        assert_ne!(sealed, request.as_bytes());

        let opened = open_request(&issuer, Some(&server.public_key()), &sealed).unwrap();
        assert_eq!(opened, request.as_bytes());
        let req = decode_request(&opened).unwrap();
        assert_eq!(req.user_nkey, user);

        // The server opens the response with its own key and the `xkey` it
        // was configured with; it tells encrypted from plain by the JWT's
        // leading `eyJ`.
        let jwt = "eyJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.c2ln".to_string();
        let response = seal_response(&issuer, Some(&server.public_key()), jwt.clone()).unwrap();
        assert!(!response.starts_with(b"eyJ"));
        let on_server = server.open(&response, &configured_xkey(&issuer)).unwrap();
        assert_eq!(on_server, jwt.as_bytes());
        // Nobody else opens it.
        assert!(
            XKey::new()
                .open(&response, &configured_xkey(&issuer))
                .is_err()
        );
    }

    #[test]
    fn plain_requests_and_responses_pass_unchanged() {
        let issuer = Issuer::generate();
        assert_eq!(open_request(&issuer, None, b"eyJ.a.b").unwrap(), b"eyJ.a.b");
        assert_eq!(
            seal_response(&issuer, None, "eyJ.c.d".to_string()).unwrap(),
            b"eyJ.c.d"
        );
    }

    #[test]
    fn tampered_or_wrongly_keyed_requests_are_refused() {
        let issuer = Issuer::generate();
        let server = XKey::new();
        let header = server.public_key();
        let request =
            server_signed_request(&KeyPair::new_server(), &KeyPair::new_user().public_key());
        let sealed = server
            .seal(request.as_bytes(), &configured_xkey(&issuer))
            .unwrap();

        // One bit flipped anywhere after the version tag.
        for i in [4, 4 + 24, sealed.len() - 1] {
            let mut tampered = sealed.clone();
            tampered[i] ^= 1;
            assert_eq!(
                open_request(&issuer, Some(&header), &tampered).unwrap_err(),
                RequestError::Undecryptable
            );
        }
        // Sealed to another vendor's xkey.
        let other = Issuer::generate();
        let foreign = server
            .seal(request.as_bytes(), &configured_xkey(&other))
            .unwrap();
        assert_eq!(
            open_request(&issuer, Some(&header), &foreign).unwrap_err(),
            RequestError::Undecryptable
        );
        // The header names another server key than the one that sealed.
        assert_eq!(
            open_request(&issuer, Some(&XKey::new().public_key()), &sealed).unwrap_err(),
            RequestError::Undecryptable
        );
        // Claimed encrypted, but sent in the clear, or empty.
        assert_eq!(
            open_request(&issuer, Some(&header), request.as_bytes()).unwrap_err(),
            RequestError::Undecryptable
        );
        assert_eq!(
            open_request(&issuer, Some(&header), b"").unwrap_err(),
            RequestError::Undecryptable
        );
        // A header that is not a curve public key.
        for bad in [
            "",
            "garbage",
            &KeyPair::new_server().public_key(),
            &server.seed().unwrap(),
        ] {
            assert_eq!(
                open_request(&issuer, Some(bad), &sealed).unwrap_err(),
                RequestError::BadServerXkey
            );
            assert_eq!(
                seal_response(&issuer, Some(bad), "eyJ".to_string()).unwrap_err(),
                RequestError::BadServerXkey
            );
        }
        let huge = vec![0u8; MAX_REQUEST_BYTES + SEAL_OVERHEAD + 1];
        assert_eq!(
            open_request(&issuer, Some(&header), &huge).unwrap_err(),
            RequestError::TooLarge
        );
    }

    #[test]
    fn the_xkey_is_generated_once_private_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let a = Issuer::open(dir.path()).unwrap();
        let b = Issuer::open(dir.path()).unwrap();
        assert!(a.xkey_public().starts_with('X'));
        assert_eq!(a.xkey_public(), b.xkey_public());
        assert_eq!(a.public_key(), b.public_key());
        let path = crate::keys::key_dir(dir.path()).join(XKEY_FILE);
        let stored = std::fs::read_to_string(&path).unwrap();
        assert!(stored.starts_with("SX"));
        assert_eq!(stored.trim(), a.xkey_seed().unwrap());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // The same two seeds elsewhere make the same issuer.
        let c = Issuer::from_seeds(&a.seed().unwrap(), &a.xkey_seed().unwrap()).unwrap();
        assert_eq!(c.xkey_public(), a.xkey_public());
        assert_eq!(c.public_key(), a.public_key());
    }

    #[test]
    fn seeds_are_checked_and_from_seed_derives_a_stable_xkey() {
        let account = KeyPair::new_account().seed().unwrap();
        let a = Issuer::from_seed(&account).unwrap();
        let b = Issuer::from_seed(&account).unwrap();
        assert_eq!(a.xkey_public(), b.xkey_public());
        let other = Issuer::from_seed(&KeyPair::new_account().seed().unwrap()).unwrap();
        assert_ne!(a.xkey_public(), other.xkey_public());

        let xkey = XKey::new().seed().unwrap();
        assert!(Issuer::from_seeds(&account, &xkey).is_ok());
        // Swapped, or a curve seed that is not one.
        assert!(Issuer::from_seeds(&xkey, &account).is_err());
        assert!(Issuer::from_seeds(&account, &account).is_err());
        assert!(Issuer::from_seeds(&account, "garbage").is_err());
        assert!(Issuer::from_seeds(&account, &XKey::new().public_key()).is_err());
    }

    #[test]
    fn debug_shows_no_secret() {
        let issuer = Issuer::generate();
        let shown = format!("{issuer:?}");
        assert!(shown.contains(&issuer.xkey_public()));
        assert!(!shown.contains(&issuer.xkey_seed().unwrap()));
        assert!(!shown.contains(&issuer.seed().unwrap()));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn opening_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), prefix in any::<bool>()) {
            let issuer = Issuer::generate();
            let header = XKey::new().public_key();
            let mut payload = if prefix { b"xkv1".to_vec() } else { Vec::new() };
            payload.extend_from_slice(&bytes);
            prop_assert!(open_request(&issuer, Some(&header), &payload).is_err());
        }
    }
}
