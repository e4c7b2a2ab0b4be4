//! Who is connected with which token, and ending connections.
//!
//! The auth callout admits each connection here before it answers:
//!
//! - a device session has at most one live connection: a second connection
//!   with the same token replaces the first, which the server is told to
//!   close (`$SYS.REQ.SERVER.<id>.KICK`, a system service the services'
//!   account imports);
//! - an operator or backend token may hold several connections (a pool);
//!   they are all closed when the token is revoked or the signing key is
//!   rotated.
//!
//! Records live in the connections bucket (written only by token-vendor),
//! so several vendor instances see the same connections. Every change is a
//! compare-and-set on the key's revision: when two connections race, the
//! one recorded last replaces the other, and the other is closed.

use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use headcount_protocol::SessionId;
use headcount_protocol::subjects::kv as keys;
use serde::{Deserialize, Serialize};

use crate::http::OperatorJson;
use crate::{Claims, Role};

/// How many connections one operator or backend token may hold; the oldest
/// is closed when a new one would exceed it.
pub const MAX_CLIENT_CONNECTIONS: usize = 32;
/// How long the kick request may take.
const KICK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one bucket operation may take before the connection is refused.
const KV_TIMEOUT: Duration = Duration::from_secs(1);
/// The header marking a deleted or purged key in a KV bucket's stream.
const KV_OPERATION: &str = "KV-Operation";
/// Compare-and-set attempts before giving up (then the connection is
/// refused: only many connects with one token at once get there).
const ATTEMPTS: u32 = 16;

/// One client connection on one server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    /// The server's id (`N...`), as in the authorization request.
    pub server: String,
    /// The client id the server gave the connection.
    pub cid: u64,
    /// For an operator or backend token: the key that signed it (it must
    /// be the signing key: such tokens end at a rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
}

/// Why the connection registry could not be used; the callout then refuses
/// the connection (fails closed).
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("connection registry unavailable: {0}")]
    Unavailable(String),
}

/// The connection registry and the means to end connections.
#[derive(Clone)]
pub struct Access {
    nats: async_nats::Client,
    connections: kv::Store,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Access")
    }
}

fn unavailable(e: impl std::fmt::Display) -> AccessError {
    AccessError::Unavailable(e.to_string())
}

async fn timed<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, AccessError> {
    match tokio::time::timeout(KV_TIMEOUT, f).await {
        Ok(r) => r.map_err(unavailable),
        Err(_) => Err(unavailable("timed out")),
    }
}

impl Access {
    /// `connections` is the connections bucket; `nats` the services'
    /// connection, which may call the servers' kick service.
    pub fn new(nats: async_nats::Client, connections: kv::Store) -> Self {
        Self { nats, connections }
    }

    fn key(claims: &Claims) -> String {
        match claims.role() {
            Role::Device => keys::device_connection(&claims.account, &claims.session),
            Role::Operator | Role::Backend => keys::client_connections(claims.token_id()),
        }
    }

    /// Whether an operator or backend token was revoked. Device sessions
    /// are ended through the revocation bucket instead.
    pub async fn client_revoked(&self, token_id: &SessionId) -> Result<bool, AccessError> {
        let found = timed(self.connections.get(keys::client_revoked(token_id))).await?;
        Ok(found.is_some())
    }

    /// [`Access::client_revoked`], read from the bucket's stream leader: it
    /// sees every revocation written before it was asked, which a direct
    /// read (possibly served by a lagging replica on a cluster) need not.
    /// What the callout asks once it has recorded a connection.
    pub async fn client_revoked_now(&self, token_id: &SessionId) -> Result<bool, AccessError> {
        Ok(self
            .latest(&keys::client_revoked(token_id))
            .await?
            .is_some())
    }

    /// The value of `key` as the stream leader holds it (`None`: absent,
    /// deleted or purged). Unlike `get`, never a replica's stale copy: each
    /// side of the revoke-versus-connect race reads what the other wrote
    /// first (see [`Access::revoke_client`]).
    async fn latest(&self, key: &str) -> Result<Option<bytes::Bytes>, AccessError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let subject = format!("{}{key}", self.connections.prefix);
        let got = tokio::time::timeout(
            KV_TIMEOUT,
            self.connections
                .stream
                .get_last_raw_message_by_subject(&subject),
        )
        .await
        .map_err(|_| unavailable("timed out"))?;
        match got {
            Ok(msg) => {
                let removed = msg
                    .headers
                    .get(KV_OPERATION)
                    .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
                Ok((!removed).then_some(msg.payload))
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Removes `conn` from the connections recorded for the token behind
    /// `claims`: one the callout recorded and then refused (its token was
    /// revoked, or its key rotated, meanwhile). A record already gone, or
    /// replaced, is left as it is.
    pub async fn forget(&self, claims: &Claims, conn: &Connection) -> Result<(), AccessError> {
        let key = Self::key(claims);
        for _ in 0..ATTEMPTS {
            let Some(entry) = timed(self.connections.entry(key.clone())).await? else {
                return Ok(());
            };
            if entry.operation != kv::Operation::Put {
                return Ok(());
            }
            let mut list: Vec<Connection> =
                serde_json::from_slice(&entry.value).unwrap_or_default();
            let before = list.len();
            list.retain(|c| (&c.server, c.cid) != (&conn.server, conn.cid));
            if list.len() == before {
                return Ok(());
            }
            let value: bytes::Bytes = serde_json::to_vec(&list).map_err(unavailable)?.into();
            match tokio::time::timeout(
                KV_TIMEOUT,
                self.connections.update(&key, value, entry.revision),
            )
            .await
            {
                Ok(Ok(_)) => return Ok(()),
                // Changed meanwhile: read again.
                Ok(Err(e)) => {
                    tracing::debug!(%key, error = %e, "connection record changed; retrying")
                }
                Err(_) => return Err(unavailable("timed out")),
            }
        }
        Err(unavailable(
            "too many concurrent changes of one connection record",
        ))
    }

    /// Records `conn` as a connection of the token behind `claims`, then
    /// closes the connections it replaces: the previous one of a device
    /// session, the oldest beyond [`MAX_CLIENT_CONNECTIONS`] of an operator
    /// or backend token. Returns how many it closes.
    pub async fn admit(&self, claims: &Claims, conn: Connection) -> Result<usize, AccessError> {
        let key = Self::key(claims);
        let single = claims.role() == Role::Device;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                // Racing connects of one token: step apart a little.
                let jitter = u64::from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.subsec_nanos())
                        .unwrap_or(0),
                ) % 4_000;
                tokio::time::sleep(Duration::from_micros(500 * u64::from(attempt) + jitter)).await;
            }
            let entry = timed(self.connections.entry(key.clone())).await?;
            let (mut list, revision) = match entry {
                Some(e) if e.operation == kv::Operation::Put => (
                    serde_json::from_slice::<Vec<Connection>>(&e.value).unwrap_or_default(),
                    Some(e.revision),
                ),
                Some(e) => (Vec::new(), Some(e.revision)),
                None => (Vec::new(), None),
            };
            list.retain(|c| (&c.server, c.cid) != (&conn.server, conn.cid));
            let replaced: Vec<Connection> = if single {
                std::mem::take(&mut list)
            } else {
                let over = (list.len() + 1).saturating_sub(MAX_CLIENT_CONNECTIONS);
                list.drain(..over).collect()
            };
            list.push(conn.clone());
            let value: bytes::Bytes = serde_json::to_vec(&list).map_err(unavailable)?.into();
            let written = match revision {
                Some(rev) => {
                    tokio::time::timeout(KV_TIMEOUT, self.connections.update(&key, value, rev))
                        .await
                        .map_err(|_| unavailable("timed out"))?
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
                None => tokio::time::timeout(KV_TIMEOUT, self.connections.create(&key, value))
                    .await
                    .map_err(|_| unavailable("timed out"))?
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            };
            match written {
                Ok(()) => {
                    let n = replaced.len();
                    self.kick(replaced);
                    return Ok(n);
                }
                // Another connection of the same token was recorded first:
                // read again and replace it.
                Err(e) => tracing::debug!(%key, error = %e, "connection record changed; retrying"),
            }
        }
        Err(unavailable("too many concurrent connects for one token"))
    }

    /// Ends an operator or backend token: new connections with it are
    /// refused from now on and its live connections are closed. Returns how
    /// many connections were closed.
    ///
    /// The revocation is written before the connections are read, and read
    /// from the stream leader; the callout does the mirror image (it records
    /// a connection, then reads the revocation from the leader). Both go
    /// through the one stream, which orders them: whichever of the two
    /// writes comes second, the read after it sees the other write. So a
    /// connection admitted concurrently is either among those read here
    /// (and closed) or refused by the callout.
    pub async fn revoke_client(&self, claims: &Claims) -> Result<usize, AccessError> {
        let id = claims.token_id();
        timed(self.connections.put(
            keys::client_revoked(id),
            bytes::Bytes::from_static(b"revoked"),
        ))
        .await?;
        let list = self.latest(&keys::client_connections(id)).await?;
        let list: Vec<Connection> = list
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default();
        let n = list.len();
        self.kick(list);
        Ok(n)
    }

    /// Closes every live connection of an operator or backend token that
    /// was not signed by `signing_kid` (after a key rotation, which ends
    /// those tokens). Returns how many.
    pub async fn end_client_connections(&self, signing_kid: &str) -> Result<usize, AccessError> {
        let mut watch = timed(
            self.connections
                .watch_with_history(keys::CLIENT_CONNECTIONS_WILDCARD),
        )
        .await?;
        let mut all = Vec::new();
        loop {
            let next = tokio::time::timeout(KV_TIMEOUT, watch.next()).await;
            let Ok(Some(Ok(entry))) = next else { break };
            if entry.operation == kv::Operation::Put
                && let Ok(list) = serde_json::from_slice::<Vec<Connection>>(&entry.value)
            {
                all.extend(
                    list.into_iter()
                        .filter(|c| c.kid.as_deref() != Some(signing_kid)),
                );
            }
            if entry.delta == 0 {
                break;
            }
        }
        let n = all.len();
        self.kick(all);
        Ok(n)
    }

    /// Asks each connection's server to close it, in the background. A
    /// connection that is already gone is nothing to close.
    pub fn kick(&self, conns: Vec<Connection>) {
        for c in conns {
            let nats = self.nats.clone();
            tokio::spawn(async move {
                let subject = headcount_protocol::subjects::server_kick(&c.server);
                let body = serde_json::json!({ "cid": c.cid }).to_string();
                match tokio::time::timeout(KICK_TIMEOUT, nats.request(subject, body.into())).await {
                    Ok(Ok(_)) => {
                        tracing::debug!(server = %c.server, cid = c.cid, "connection closed")
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(server = %c.server, cid = c.cid, error = %e, "closing a connection")
                    }
                    Err(_) => {
                        tracing::warn!(server = %c.server, cid = c.cid, "closing a connection timed out")
                    }
                }
            });
        }
    }
}

/// Closes the live connections of operator and backend tokens whenever this
/// vendor's signing key changes (`POST /v1/keys/rotate`), until `shutdown`.
pub(crate) async fn end_clients_on_rotation(
    vendor: crate::Vendor,
    access: Access,
    shutdown: headcount_runtime::Shutdown,
) {
    // At start too: a vendor restarted with a new signing key (the way a
    // fleet of vendors rotates) ends the tokens the old key signed.
    let mut kid = String::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut stop = std::pin::pin!(shutdown.wait());
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        let now = vendor.signing_kid();
        if now == kid {
            continue;
        }
        kid = now;
        match access.end_client_connections(&kid).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                closed = n,
                "operator and backend connections of tokens signed before the current key closed"
            ),
            Err(e) => tracing::error!(error = %e, "closing operator and backend connections"),
        }
    }
}

/// `POST /v1/backend-tokens` and `POST /v1/tokens/revoke`, both behind the
/// operator key.
/// Wrong operator keys count against the address's budget as on every
/// other operator endpoint (`throttle::per_address`).
pub fn access_router(vendor: crate::Vendor, access: Access) -> axum::Router {
    use crate::http::LimitedRoutes;
    use crate::throttle::Endpoint;
    axum::Router::new()
        .limited_post(&vendor, Endpoint::BackendTokens, backend_token)
        .limited_post(&vendor, Endpoint::Revoke, revoke_token)
        .with_state(AccessState { vendor, access })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendTokenRequest {
    name: String,
    /// Lifetime in seconds; at most the configured client token lifetime.
    #[serde(default)]
    ttl_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    token: String,
}

/// What the access endpoints work with.
#[derive(Clone)]
struct AccessState {
    vendor: crate::Vendor,
    access: Access,
}

/// The operator key is the vendor's to check ([`crate::http::OperatorJson`]).
impl axum::extract::FromRef<AccessState> for crate::Vendor {
    fn from_ref(state: &AccessState) -> Self {
        state.vendor.clone()
    }
}

async fn backend_token(
    axum::extract::State(AccessState { vendor, .. }): axum::extract::State<AccessState>,
    OperatorJson(request): OperatorJson<BackendTokenRequest>,
) -> axum::response::Response {
    let name = match headcount_protocol::DeviceId::parse(&request.name) {
        Ok(n) => n,
        Err(e) => {
            return crate::http::error(
                axum::http::StatusCode::BAD_REQUEST,
                format!("backend name: {e}"),
            );
        }
    };
    crate::http::json_or_error(
        vendor.issue_backend(&name, request.ttl_secs.map(Duration::from_secs)),
        "issuing a backend token",
        "issuing the token failed",
    )
}

async fn revoke_token(
    axum::extract::State(AccessState { vendor, access }): axum::extract::State<AccessState>,
    OperatorJson(request): OperatorJson<RevokeRequest>,
) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    // Any token this vendor signed that is still worth revoking: a token
    // that no longer verifies (expired, superseded) cannot connect anyway.
    let claims = match vendor.verify(&request.token) {
        Ok(c) => c,
        Err(e) => {
            return crate::http::error(StatusCode::BAD_REQUEST, format!("{e}: nothing to revoke"));
        }
    };
    if !claims.role().is_client() {
        return crate::http::error(
            StatusCode::BAD_REQUEST,
            "this is a device token: end its session with `headcount.kick`",
        );
    }
    match access.revoke_client(&claims).await {
        Ok(closed) => {
            tracing::info!(token = %claims.session, role = ?claims.role(), closed, "token revoked");
            axum::Json(serde_json::json!({ "revoked": true, "connections_closed": closed }))
                .into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "revoking a token");
            crate::http::error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}
