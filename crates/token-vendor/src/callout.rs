//! NATS auth callout: the server asks, for every device connection, whether
//! its token lets it in, and with which permissions.
//!
//! nats-server (configured with `authorization { auth_callout { ... } }`)
//! publishes an authorization request on [`CALLOUT_SUBJECT`]: a JWT signed by
//! the server's own nkey carrying the client's CONNECT options, among them the
//! device token as `auth_token`. The answer is an authorization response JWT,
//! signed by the callout issuer (an account nkey whose public half is the
//! `issuer` of the server configuration), holding either an error or a user
//! JWT. That user JWT grants exactly:
//!
//! - publish `hb.<account>.<device>.<session>`
//! - subscribe `ctl.<account>.<device>`
//!
//! and expires with the device token, so the server closes the connection
//! when the token runs out. A token that does not verify, a session that was
//! ended (evicted, refused, kicked, replaced: its key is in the revoked
//! bucket), or a revocation list that cannot be read all get an error: the
//! callout fails closed, and so does the server when no vendor answers.
//!
//! Requests are decoded defensively (size cap, server-key signature check,
//! every field optional where nats-server may leave it out): a request that
//! does not decode is dropped and counted, never a panic.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::kv;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::StreamExt;
use headcount_protocol::subjects::{self, kv as keys};
use headcount_protocol::{AccountId, DeviceId, SessionId, now_millis};
use headcount_runtime::Shutdown;
use nkeys::KeyPair;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::{TokenError, Vendor};

/// Where nats-server sends authorization requests.
pub const CALLOUT_SUBJECT: &str = "$SYS.REQ.USER.AUTH";
/// Queue group of the callout responders: several vendors share the load.
pub const CALLOUT_QUEUE: &str = "headcount-callout";
/// The NATS account devices are placed in (named in `nats.conf`).
pub const DEVICE_ACCOUNT: &str = "HEADCOUNT";
/// Environment variable that may hold the callout issuer's account seed
/// (`SA...`); otherwise it is generated into `<data_dir>/keys/`.
pub const ISSUER_SEED_ENV: &str = "HEADCOUNT_CALLOUT_SEED";
/// Authorization requests larger than this are not decoded.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How long the revocation lookup may take before the connection is refused.
const REVOCATION_TIMEOUT: Duration = Duration::from_secs(1);

const JWT_HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

/// The callout issuer: the account key nats-server trusts for responses.
pub struct Issuer {
    key: KeyPair,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("public_key", &self.key.public_key())
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// The issuer from [`ISSUER_SEED_ENV`], else from
    /// `<data_dir>/keys/callout-issuer.nk`, generated (mode 0600) on first
    /// use.
    pub fn open(data_dir: &Path) -> anyhow::Result<Issuer> {
        if let Ok(seed) = std::env::var(ISSUER_SEED_ENV)
            && !seed.trim().is_empty()
        {
            return Self::from_seed(seed.trim())
                .with_context(|| format!("reading {ISSUER_SEED_ENV}"));
        }
        let path = Self::path(data_dir);
        match std::fs::read_to_string(&path) {
            Ok(seed) => {
                crate::keys::warn_if_readable_by_others(&path);
                Self::from_seed(seed.trim())
                    .with_context(|| format!("reading callout issuer {}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::new_account();
                let seed = key
                    .seed()
                    .map_err(|e| anyhow::anyhow!("encoding seed: {e}"))?;
                crate::keys::create_private_dir(&crate::keys::key_dir(data_dir))?;
                crate::keys::write_private(&path, seed.as_bytes())?;
                tracing::info!(issuer = %key.public_key(), file = %path.display(), "generated the auth callout issuer key");
                Ok(Issuer { key })
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// An issuer from an account seed (`SA...`).
    pub fn from_seed(seed: &str) -> anyhow::Result<Issuer> {
        let key =
            KeyPair::from_seed(seed).map_err(|e| anyhow::anyhow!("invalid nkey seed: {e}"))?;
        anyhow::ensure!(
            key.public_key().starts_with('A'),
            "the callout issuer must be an account key (seed SA...)"
        );
        Ok(Issuer { key })
    }

    /// A fresh issuer, for tests and one-off servers.
    pub fn generate() -> Issuer {
        Issuer {
            key: KeyPair::new_account(),
        }
    }

    /// Its seed (`SA...`): a secret, to hand to another vendor instance.
    pub fn seed(&self) -> anyhow::Result<String> {
        self.key
            .seed()
            .map_err(|e| anyhow::anyhow!("encoding seed: {e}"))
    }

    /// Its public key: the `issuer` of the server's `auth_callout` block.
    pub fn public_key(&self) -> String {
        self.key.public_key()
    }

    fn path(data_dir: &Path) -> PathBuf {
        crate::keys::key_dir(data_dir).join("callout-issuer.nk")
    }
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
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoToken => "no_token",
            Refusal::Token(e) => e.kind(),
            Refusal::Revoked => "revoked",
            Refusal::RevocationUnavailable => "revocation_unavailable",
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

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ClientInfo {
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConnectOpts {
    #[serde(default)]
    pub auth_token: Option<String>,
    #[serde(default)]
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
    let mut parts = text.trim().split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::NotAJwt);
    };
    let header = URL_SAFE_NO_PAD
        .decode(h)
        .map_err(|_| RequestError::NotAJwt)?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| RequestError::Unreadable(e.to_string()))?;
    let alg = header.get("alg").and_then(|a| a.as_str()).unwrap_or("");
    if !alg.eq_ignore_ascii_case("ed25519-nkey") {
        return Err(RequestError::WrongAlgorithm);
    }
    let claims = URL_SAFE_NO_PAD
        .decode(p)
        .map_err(|_| RequestError::NotAJwt)?;
    let sig = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| RequestError::NotAJwt)?;
    let claims: RequestClaims =
        serde_json::from_slice(&claims).map_err(|e| RequestError::Unreadable(e.to_string()))?;
    if !claims.iss.starts_with('N') {
        return Err(RequestError::NotFromAServer);
    }
    let server = KeyPair::from_public_key(&claims.iss).map_err(|_| RequestError::NotFromAServer)?;
    let signed = &text.trim()[..h.len() + 1 + p.len()];
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

/// What a connection may do: subjects it may publish and subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The user name the server logs for the connection.
    pub name: String,
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// The endpoints an operator's live view may call.
const OPERATOR_ENDPOINTS: &[&str] = &[
    subjects::endpoint::ACTIVE,
    subjects::endpoint::STATS,
    subjects::endpoint::LIMITS_GET,
    subjects::endpoint::LIMITS_SET,
    subjects::endpoint::KICK,
];

impl Grant {
    /// A device: its own heartbeat subject and its own control subject,
    /// nothing else.
    pub fn device(account: &AccountId, device: &DeviceId, session: &SessionId) -> Grant {
        Grant {
            name: format!("{account}/{device}"),
            publish: vec![subjects::heartbeat(account, device, session)],
            subscribe: vec![subjects::control(account, device)],
        }
    }

    /// An operator's live view: the query and steering endpoints, service
    /// discovery, every presence event, and replies under its own inbox
    /// prefix only.
    pub fn operator(claims: &crate::Claims) -> Grant {
        let mut publish: Vec<String> = OPERATOR_ENDPOINTS
            .iter()
            .map(|ep| subjects::endpoint_subject(ep))
            .collect();
        publish.push("$SRV.>".to_string());
        Grant {
            name: format!("operator/{}", claims.sid),
            publish,
            subscribe: vec![
                format!("{}.events.>", subjects::SERVICE_PREFIX),
                format!("{}.>", claims.inbox_prefix()),
            ],
        }
    }

    /// The grant a verified token carries.
    pub fn of(claims: &crate::Claims) -> Result<Grant, TokenError> {
        if claims.is_operator() {
            return Ok(Grant::operator(claims));
        }
        match (claims.account(), claims.device(), claims.session()) {
            (Ok(a), Ok(d), Ok(s)) => Ok(Grant::device(&a, &d, &s)),
            _ => Err(TokenError::BadClaims),
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
            aud: DEVICE_ACCOUNT.to_string(),
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
                subs: -1,
                data: -1,
                payload: -1,
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

/// Decides one connection: the verified claims of its token, unless the
/// token is missing, does not verify, or its session was ended.
async fn authorize(
    vendor: &Vendor,
    revoked: &kv::Store,
    req: &AuthRequest,
) -> Result<crate::Claims, Refusal> {
    let token = req
        .connect_opts
        .auth_token
        .as_deref()
        .filter(|t| !t.is_empty())
        .ok_or(Refusal::NoToken)?;
    let claims = vendor.verify(token).map_err(Refusal::Token)?;
    still_alive(revoked, &claims).await?;
    Ok(claims)
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
    // verify() has checked the names.
    let (Ok(account), Ok(session)) = (claims.account(), claims.session()) else {
        return Err(Refusal::Token(TokenError::BadClaims));
    };
    match tokio::time::timeout(
        REVOCATION_TIMEOUT,
        revoked.get(keys::revoked(&account, &session)),
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
    revoked: &kv::Store,
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
    let outcome = match authorize(vendor, revoked, &req).await {
        Ok(claims) => {
            let Ok(grant) = Grant::of(&claims) else {
                return None;
            };
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
            vendor.count_callout(refusal.reason());
            tracing::warn!(reason = refusal.reason(), %host, client = %client, "device connection refused: {refusal}");
            Err(refusal.to_string())
        }
    };
    match response(issuer, &req, outcome) {
        Ok(jwt) => Some(jwt),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "signing an authorization response");
            None
        }
    }
}

/// Answers authorization requests until `shutdown`. `revoked` is the
/// revocation bucket (`headcount-revoked`).
pub async fn serve_callout(
    vendor: Vendor,
    issuer: Issuer,
    nats: async_nats::Client,
    revoked: kv::Store,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut requests = nats
        .queue_subscribe(CALLOUT_SUBJECT, CALLOUT_QUEUE.to_string())
        .await
        .context("subscribing to auth callout requests")?;
    nats.flush()
        .await
        .context("flushing callout subscription")?;
    tracing::info!(issuer = %issuer.public_key(), "auth callout ready");
    let issuer = std::sync::Arc::new(issuer);
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
        if msg
            .headers
            .as_ref()
            .is_some_and(|h| h.get("Nats-Server-Xkey").is_some())
        {
            tracing::error!(
                "encrypted authorization requests are not supported: remove `xkey` from the auth_callout block"
            );
            vendor.count_callout("bad_request");
            continue;
        }
        let (vendor, issuer, revoked, nats) = (
            vendor.clone(),
            issuer.clone(),
            revoked.clone(),
            nats.clone(),
        );
        tokio::spawn(async move {
            if let Some(jwt) = answer(&vendor, &issuer, &revoked, &msg.payload).await
                && let Err(e) = nats.publish(reply, jwt.into()).await
            {
                tracing::warn!(error = %e, "sending an authorization response");
            }
        });
    }
    let _ = requests.unsubscribe().await;
    tracing::info!("auth callout stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn signed_request(server: &KeyPair, user: &str, token: Option<&str>) -> String {
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
            serde_json::json!(["hb.acme.tv.s1"])
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
            sub: crate::OPERATOR_ROLE.into(),
            acct: crate::OPERATOR_ROLE.into(),
            sid: "OPS1".into(),
            iat: 0,
            exp: 1,
            nbf: 0,
            iss: "headcount".into(),
            aud: "headcount-devices".into(),
            plan: None,
            role: Some(crate::OPERATOR_ROLE.into()),
        };
        let grant = Grant::of(&claims).unwrap();
        assert_eq!(
            grant.publish,
            [
                "headcount.active",
                "headcount.stats",
                "headcount.limits.get",
                "headcount.limits.set",
                "headcount.kick",
                "$SRV.>"
            ]
        );
        assert_eq!(grant.subscribe, ["headcount.events.>", "_INBOX_OPS1.>"]);
        assert!(!grant.publish.iter().any(|s| s.starts_with("hb.")));
        // The same claims without the role are a device token for a device
        // named "operator": its own two subjects only.
        let device = Grant::of(&crate::Claims {
            role: None,
            ..claims
        })
        .unwrap();
        assert_eq!(device.publish, ["hb.operator.operator.OPS1"]);
        assert_eq!(device.subscribe, ["ctl.operator.operator"]);
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
            let mode = std::fs::metadata(Issuer::path(dir.path()))
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
