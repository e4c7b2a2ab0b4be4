//! A typed client for headcount's request-reply endpoints (`headcount.active`,
//! `check`, `limits.get`, `limits.set`, `kick`, `token`, `stats`): the way
//! the CLI, the tests and any Rust backend talk to the services.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use headcount_client::Client;
//! use headcount_protocol::AccountId;
//!
//! let nats = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let client = Client::new(nats);
//! let acme = AccountId::parse("acme")?;
//! match client.active(&acme).await {
//!     Ok(reply) => println!("{} of {} seats taken", reply.active, reply.limit),
//!     Err(e) if e.is_bad_request() => eprintln!("refused: {e}"),
//!     Err(e) => return Err(e.into()),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Layout:
//! - this file: [`Client`], one method per endpoint, [`Client::call`] for
//!   any [`Endpoint`], and the untyped doors [`Client::request_json`] and
//!   [`Client::request_raw`] for bodies no typed request can express (the
//!   malformed ones of attack tests).
//! - `endpoint`: [`Endpoint`] and one type per endpoint, pairing its name
//!   with its request and reply.
//! - `error`: [`ClientError`], and [`service_error_of`], which reads an
//!   endpoint's refusal from the NATS micro error headers of a reply.
//!
//! Subjects and bodies are `headcount-protocol`'s; this crate adds only the
//! transport (one NATS request per call, under a timeout) and the reading
//! of replies. It never retries: whether a refused or unanswered call is
//! worth sending again is the caller's decision ([`ClientError`] says which
//! it was).

use std::time::Duration;

use bytes::Bytes;
use headcount_protocol::AccountId;
use headcount_protocol::subjects::endpoint_subject;
use headcount_protocol::wire::{
    AccountRequest, ActiveReply, CheckReply, CheckRequest, KickReply, KickRequest, LimitsReply,
    LimitsSetRequest, StatsReply, StatsRequest, TokenReply, TokenRequest,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub mod endpoint;
mod error;

pub use endpoint::Endpoint;
pub use error::{ClientError, service_error_of};
/// What [`ClientError::Service`] carries, so that matching on it needs no
/// other import.
pub use headcount_protocol::ServiceError;

/// How long a call waits for its answer unless told otherwise
/// ([`Client::with_timeout`]).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// headcount's endpoints over one NATS connection. Cheap to clone: clones
/// share the connection.
///
/// The connection must be allowed to publish on the endpoints' subjects and
/// to receive on its inbox prefix: the services' console user, or a
/// backend or operator token's connection (whose inbox prefix is the
/// token's `inbox_prefix`).
#[derive(Debug, Clone)]
pub struct Client {
    nats: async_nats::Client,
    timeout: Duration,
}

impl Client {
    /// A client on `nats`, waiting [`DEFAULT_TIMEOUT`] per call.
    pub fn new(nats: async_nats::Client) -> Self {
        Self {
            nats,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same client, waiting `timeout` per call. For one slow call,
    /// `client.clone().with_timeout(..)` leaves the original as it was.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long each call waits for its answer.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The NATS connection underneath.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// `headcount.active`: the account's active sessions, its limit and
    /// policy.
    pub async fn active(&self, account: &AccountId) -> Result<ActiveReply, ClientError> {
        self.call_for_account::<endpoint::Active>(account).await
    }

    /// `headcount.limits.get`: the account's limit, policy and plan.
    pub async fn limits_get(&self, account: &AccountId) -> Result<LimitsReply, ClientError> {
        self.call_for_account::<endpoint::LimitsGet>(account).await
    }

    /// Calls endpoint `E`, whose request names nothing but an account.
    async fn call_for_account<E>(&self, account: &AccountId) -> Result<E::Reply, ClientError>
    where
        E: Endpoint<Request = AccountRequest>,
    {
        let request = AccountRequest {
            account: account.clone(),
        };
        self.call::<E>(&request).await
    }

    /// Calls endpoint `E` with its typed request.
    pub async fn call<E: Endpoint>(&self, request: &E::Request) -> Result<E::Reply, ClientError> {
        self.request_json(E::NAME, request).await
    }

    /// [`Client::call`], with the reply also as the JSON it came as (every
    /// field, in the service's own words: what a command printing replies
    /// shows).
    pub async fn call_with_json<E: Endpoint>(
        &self,
        request: &E::Request,
    ) -> Result<(E::Reply, serde_json::Value), ClientError> {
        let raw: serde_json::Value = self.request_json(E::NAME, request).await?;
        let reply =
            serde_json::from_value(raw.clone()).map_err(|source| ClientError::Unreadable {
                subject: endpoint_subject(E::NAME),
                source,
            })?;
        Ok((reply, raw))
    }

    /// Sends any JSON body to `headcount.<endpoint>` and reads the reply as
    /// `Rep` (`serde_json::Value` takes whatever comes). For requests the
    /// typed ones cannot express: fields of the wrong type, names that
    /// would not parse, unknown fields.
    pub async fn request_json<Req, Rep>(
        &self,
        endpoint: &str,
        body: &Req,
    ) -> Result<Rep, ClientError>
    where
        Req: Serialize + ?Sized,
        Rep: DeserializeOwned,
    {
        let payload = serde_json::to_vec(body).map_err(|source| ClientError::Encode {
            subject: endpoint_subject(endpoint),
            source,
        })?;
        let reply = self.request_raw(endpoint, payload.into()).await?;
        serde_json::from_slice(&reply).map_err(|source| ClientError::Unreadable {
            subject: endpoint_subject(endpoint),
            source,
        })
    }

    /// Sends `payload` as it is to `headcount.<endpoint>` and returns the
    /// reply's payload as it is, once it is not an endpoint's refusal
    /// ([`ClientError::Service`]). For bodies that are not JSON at all.
    pub async fn request_raw(&self, endpoint: &str, payload: Bytes) -> Result<Bytes, ClientError> {
        let subject = endpoint_subject(endpoint);
        let request = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(self.timeout));
        // The request's own timeout runs from its publish; this one also
        // covers getting it out, should the connection be stuck.
        let msg = match tokio::time::timeout(
            self.timeout,
            self.nats.send_request(subject.clone(), request),
        )
        .await
        {
            Ok(Ok(msg)) => msg,
            Ok(Err(e)) => return Err(ClientError::of_request(subject, e, self.timeout)),
            Err(_) => {
                return Err(ClientError::Timeout {
                    subject,
                    after: self.timeout,
                });
            }
        };
        match service_error_of(&msg) {
            Some(e) => Err(ClientError::Service(e)),
            None => Ok(msg.payload),
        }
    }
}

/// The methods of the endpoints whose whole request the caller builds: each
/// is [`Client::call`] for its endpoint.
macro_rules! request_methods {
    ($($(#[$doc:meta])* $method:ident: $endpoint:ident($request:ty) -> $reply:ty;)*) => {
        impl Client {
            $(
                $(#[$doc])*
                pub async fn $method(&self, request: &$request) -> Result<$reply, ClientError> {
                    self.call::<endpoint::$endpoint>(request).await
                }
            )*
        }
    };
}

request_methods! {
    /// `headcount.check`: whether `request.device` may play now. A refusal
    /// is a reply (`allowed: false`), not an error.
    check: Check(CheckRequest) -> CheckReply;
    /// `headcount.limits.set`: changes what the request names, and answers
    /// with the account's limits as they are now. An unknown plan or policy,
    /// or a number out of range, is [`ClientError::Service`] with a 400.
    limits_set: LimitsSet(LimitsSetRequest) -> LimitsReply;
    /// `headcount.kick`: ends the session; `kicked: false` when the account
    /// has no active session by that id.
    kick: Kick(KickRequest) -> KickReply;
    /// `headcount.token`: a device token, starting a new session.
    token: Token(TokenRequest) -> TokenReply;
    /// `headcount.stats`: usage of one account, or of all with the busiest
    /// listed.
    stats: Stats(StatsRequest) -> StatsReply;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A client whose connection has no server yet: requests go out into
    /// nothing, as to a service that never answers.
    async fn unanswered() -> Client {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let nats = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(format!("nats://127.0.0.1:{port}"))
            .await
            .unwrap();
        Client::new(nats)
    }

    #[tokio::test]
    async fn a_call_nobody_answers_times_out_after_the_clients_timeout() {
        let client = unanswered().await.with_timeout(Duration::from_millis(100));
        assert_eq!(client.timeout(), Duration::from_millis(100));
        let started = std::time::Instant::now();
        let e = client
            .active(&AccountId::parse("acme").unwrap())
            .await
            .unwrap_err();
        assert!(started.elapsed() < DEFAULT_TIMEOUT);
        match e {
            ClientError::Timeout { subject, after } => {
                assert_eq!(subject, "headcount.active");
                assert_eq!(after, Duration::from_millis(100));
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn calls_run_on_spawned_tasks() {
        let client = unanswered().await.with_timeout(Duration::from_millis(50));
        let request = CheckRequest {
            account: AccountId::parse("acme").unwrap(),
            device: headcount_protocol::DeviceId::parse("tv").unwrap(),
            session: None,
            content: None,
            evict: None,
        };
        let e = tokio::spawn(async move { client.check(&request).await })
            .await
            .unwrap()
            .unwrap_err();
        assert!(e.is_unanswered(), "{e:?}");
        assert_eq!(e.subject(), Some("headcount.check"));
    }

    #[tokio::test]
    async fn a_body_that_is_not_json_is_not_sent() {
        let client = unanswered().await;
        let mut bad = std::collections::HashMap::new();
        bad.insert((1, 2), "a map with tuple keys has no JSON form");
        let e = client
            .request_json::<_, serde_json::Value>("check", &bad)
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Encode { .. }), "{e:?}");
        assert_eq!(e.subject(), Some("headcount.check"));
    }
}
