//! The HTTP API: `POST /v1/tokens`, `POST /v1/keys/rotate` and
//! `GET /.well-known/jwks.json`.
//!
//! Every error is a JSON body `{"error": "<message>"}`; axum's plain-text
//! rejections never reach a client.

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRef, FromRequest, Request, State};
use axum::handler::Handler;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use headcount_protocol::wire::TokenRequest;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Vendor;
use crate::metrics::{BAD_REQUEST, UNAUTHORIZED};
use crate::throttle::{self, Endpoint, WrongOperatorKey};

/// A token request is two short names; anything much larger is not one.
const MAX_BODY_BYTES: usize = 16 * 1024;
/// How long a client may cache the JWKS. Short, so that a rotated-in key is
/// picked up well before it starts signing widely.
const JWKS_CACHE_CONTROL: &str = "public, max-age=300";

/// `POST /v1/tokens` (operator key as `Authorization: Bearer`) and
/// `GET /.well-known/jwks.json`. Wrong operator keys are limited per
/// address (`throttle`): an address that spent its budget gets 429 without
/// its key being looked at.
pub fn router(vendor: Vendor) -> Router {
    Router::new()
        .limited_post(&vendor, Endpoint::Tokens, issue_token)
        .limited_post(&vendor, Endpoint::KeysRotate, rotate_key)
        .route("/.well-known/jwks.json", get(jwks))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(vendor)
}

/// Routing of the endpoints with a per-address limit.
pub(crate) trait LimitedRoutes<S> {
    /// `POST` at `endpoint`'s path, answered by `handler` behind the
    /// endpoint's per-address limit ([`throttle::per_address`]).
    fn limited_post<H: Handler<T, S>, T: 'static>(
        self,
        vendor: &Vendor,
        endpoint: Endpoint,
        handler: H,
    ) -> Self;
}

impl<S: Clone + Send + Sync + 'static> LimitedRoutes<S> for Router<S> {
    fn limited_post<H: Handler<T, S>, T: 'static>(
        self,
        vendor: &Vendor,
        endpoint: Endpoint,
        handler: H,
    ) -> Self {
        let limit = from_fn_with_state((vendor.clone(), endpoint), throttle::per_address);
        self.route(endpoint.path(), post(handler).layer(limit))
    }
}

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": message.into() });
    (status, Json(body)).into_response()
}

/// The 500 answer to a request that failed on our side: the client is told
/// `failed`; the error itself is only logged, under `doing`.
pub(crate) fn internal_error(e: &dyn std::fmt::Display, doing: &str, failed: &str) -> Response {
    tracing::error!(error = %format!("{e:#}"), "{doing}");
    error(StatusCode::INTERNAL_SERVER_ERROR, failed)
}

/// `body` as the JSON answer, or the [`internal_error`] that kept it from
/// being made.
pub(crate) fn json_or_error<T: Serialize, E: std::fmt::Display>(
    body: Result<T, E>,
    doing: &str,
    failed: &str,
) -> Response {
    match body {
        Ok(body) => Json(body).into_response(),
        Err(e) => internal_error(&e, doing, failed),
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// The 401 answer to a request without the operator key, counted, and
/// marked for the per-address limit of wrong keys
/// ([`throttle::per_address`]).
pub(crate) fn unauthorized(vendor: &Vendor) -> Response {
    vendor.count_rejection(UNAUTHORIZED);
    let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong operator key");
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response.extensions_mut().insert(WrongOperatorKey);
    response
}

pub(crate) fn is_operator(vendor: &Vendor, headers: &HeaderMap) -> bool {
    bearer(headers).is_some_and(|key| vendor.is_operator_key(key))
}

/// `POST /v1/keys/rotate`: a new signing key; older ones keep verifying
/// until their tokens have expired.
async fn rotate_key(State(vendor): State<Vendor>, headers: HeaderMap) -> Response {
    if !is_operator(&vendor, &headers) {
        return unauthorized(&vendor);
    }
    json_or_error(
        vendor.rotate().map(|kid| serde_json::json!({ "kid": kid })),
        "rotating the signing key",
        "rotating the signing key failed",
    )
}

/// The JSON body of a request behind the operator key. Without the key,
/// or with a body that does not read, the extraction fails with the answer
/// that refuses the request. The key is checked before the body, so that an
/// unauthenticated caller learns nothing about what a valid request looks
/// like.
pub(crate) struct OperatorJson<T>(pub(crate) T);

impl<T, S> FromRequest<S> for OperatorJson<T>
where
    T: DeserializeOwned,
    Vendor: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Response> {
        let vendor = Vendor::from_ref(state);
        if !is_operator(&vendor, request.headers()) {
            return Err(unauthorized(&vendor));
        }
        match Json::<T>::from_request(request, state).await {
            Ok(Json(body)) => Ok(OperatorJson(body)),
            Err(rejection) => {
                vendor.count_rejection(BAD_REQUEST);
                let (status, message) = describe(&rejection);
                tracing::debug!(%status, error = %message, "refusing an operator request");
                Err(error(status, message))
            }
        }
    }
}

async fn issue_token(
    State(vendor): State<Vendor>,
    OperatorJson(request): OperatorJson<TokenRequest>,
) -> Response {
    match vendor.issue_with_plan(
        &request.account,
        &request.device,
        request.plan.as_deref(),
        "http",
    ) {
        Ok(reply) => {
            if let Some(plan) = &request.plan {
                vendor.record_plan(&request.account, plan).await;
            }
            (StatusCode::OK, Json(reply)).into_response()
        }
        Err(e @ crate::IssueError::UnknownPlan(..)) => {
            vendor.count_rejection(BAD_REQUEST);
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
        Err(e) => internal_error(&e, "issuing token", "issuing the token failed"),
    }
}

/// A status and a readable message for a body that is not a token request.
pub(crate) fn describe(rejection: &JsonRejection) -> (StatusCode, String) {
    match rejection {
        JsonRejection::JsonDataError(e) => (
            StatusCode::BAD_REQUEST,
            format!("invalid token request: {}", innermost(e)),
        ),
        JsonRejection::JsonSyntaxError(e) => (
            StatusCode::BAD_REQUEST,
            format!("request body is not valid json: {}", innermost(e)),
        ),
        JsonRejection::MissingJsonContentType(_) => (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected content-type: application/json".to_string(),
        ),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {MAX_BODY_BYTES} bytes"),
        ),
        other => (
            other.status(),
            "could not read the request body".to_string(),
        ),
    }
}

/// The most specific message of an error chain: serde's own words (which
/// field, what was wrong, where) rather than axum's generic prefix.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut current = e;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

async fn jwks(State(vendor): State<Vendor>) -> Response {
    (
        [(header::CACHE_CONTROL, JWKS_CACHE_CONTROL)],
        Json(vendor.jwks()),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use headcount_protocol::wire::TokenReply;
    use headcount_runtime::Shutdown;
    use headcount_runtime::shutdown::Trigger;
    use serde_json::{Value, json};

    use super::*;
    use crate::tests::{test_vendor, verifications};

    const KEY: &str = "test-operator-key";

    struct TestServer {
        url: String,
        vendor: Vendor,
        registry: prometheus::Registry,
        client: reqwest::Client,
        _dir: tempfile::TempDir,
        _stop: Trigger,
    }

    impl TestServer {
        async fn start() -> Self {
            Self::start_with(|_| {}).await
        }

        /// With the configuration edited by `edit` (the operator key is
        /// [`KEY`]).
        async fn start_with(edit: impl FnOnce(&mut crate::Config)) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let (vendor, registry) = test_vendor(dir.path(), |c| {
                c.operator_key = KEY.into();
                edit(c);
            });
            let (stop, shutdown) = Shutdown::new();
            let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
            let (addr, _task) =
                headcount_runtime::http::serve(addr, router(vendor.clone()), shutdown)
                    .await
                    .unwrap();
            Self {
                url: format!("http://{addr}"),
                vendor,
                registry,
                client: reqwest::Client::new(),
                _dir: dir,
                _stop: stop,
            }
        }

        fn tokens(&self) -> reqwest::RequestBuilder {
            self.client.post(format!("{}/v1/tokens", self.url))
        }

        /// `POST /v1/tokens` with the operator key and `request` as JSON.
        async fn issue(&self, request: &Value) -> (u16, Value) {
            send(self.tokens().bearer_auth(KEY).json(request)).await
        }

        fn rejected(&self, reason: &str) -> u64 {
            crate::tests::counter(
                &self.registry,
                "headcount_token_requests_rejected_total",
                "reason",
                reason,
            )
        }

        /// Tokens issued over HTTP.
        fn issued(&self) -> u64 {
            crate::tests::counter(
                &self.registry,
                "headcount_tokens_issued_total",
                "via",
                "http",
            )
        }
    }

    /// The status and the JSON body (which every answer must have).
    async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(content_type.as_deref(), Some("application/json"));
        (status, response.json().await.unwrap())
    }

    fn error_message(body: &Value) -> &str {
        let message = body["error"].as_str().expect("an error body");
        assert!(!message.is_empty());
        message
    }

    #[tokio::test]
    async fn issues_a_token_that_verifies() {
        let app = TestServer::start().await;
        let (status, body) = app
            .issue(&json!({"account": "acme", "device": "tv-1"}))
            .await;
        assert_eq!(status, 200);
        let reply: TokenReply = serde_json::from_value(body).unwrap();
        let claims = app.vendor.verify(&reply.token).unwrap();
        assert_eq!(claims.account.as_str(), "acme");
        assert_eq!(claims.device.as_str(), "tv-1");
        assert_eq!(claims.session, reply.session);
        assert_eq!(reply.expires_at, claims.exp * 1000);
        assert_eq!(app.issued(), 1);
        assert_eq!(verifications(&app.registry, "ok"), 1);
    }

    #[tokio::test]
    async fn refuses_requests_without_the_operator_key() {
        let app = TestServer::start().await;
        let request = json!({"account": "acme", "device": "tv-1"});
        for builder in [
            app.tokens().json(&request),
            app.tokens().bearer_auth("wrong").json(&request),
            app.tokens().bearer_auth(format!("{KEY}x")).json(&request),
            app.tokens().basic_auth(KEY, Some(KEY)).json(&request),
            // Unauthenticated garbage is refused for the key, not the body.
            app.tokens().body("{not json"),
        ] {
            let response = builder.send().await.unwrap();
            assert_eq!(response.status().as_u16(), 401);
            assert_eq!(
                response.headers().get(header::WWW_AUTHENTICATE).unwrap(),
                "Bearer"
            );
            let body: Value = response.json().await.unwrap();
            error_message(&body);
        }
        assert_eq!(app.rejected("unauthorized"), 5);
        assert_eq!(app.rejected("bad_request"), 0);
    }

    #[tokio::test]
    async fn an_address_out_of_wrong_keys_is_refused_without_a_key_check() {
        let app = TestServer::start_with(|c| {
            c.throttle.operator_key_failures = crate::Rate::new(0.1, 3);
        })
        .await;
        let request = json!({"account": "acme", "device": "tv-1"});
        for _ in 0..3 {
            let r = app.tokens().bearer_auth("wrong").json(&request);
            assert_eq!(r.send().await.unwrap().status(), 401);
        }
        // The fourth spends the budget: from now on 429, keys unread.
        for key in ["wrong", KEY, "wrong"] {
            let response = app
                .tokens()
                .bearer_auth(key)
                .json(&request)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), 429, "{key}");
            let wait: u64 = response.headers()[header::RETRY_AFTER]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=10).contains(&wait), "{wait}");
            error_message(&response.json().await.unwrap());
        }
        assert_eq!(app.rejected("unauthorized"), 4);
        assert_eq!(
            crate::tests::counter(
                &app.registry,
                "headcount_http_throttled_total",
                "endpoint",
                "tokens"
            ),
            3
        );
    }

    #[tokio::test]
    async fn refuses_bad_json_with_a_json_error() {
        let app = TestServer::start().await;
        let with_key = || app.tokens().bearer_auth(KEY);
        for (request, expected) in [
            (
                with_key()
                    .header(header::CONTENT_TYPE, "application/json")
                    .body("{not json"),
                400,
            ),
            (with_key().json(&json!({"account": "acme"})), 400),
            // Not declared JSON.
            (with_key().body("{}"), 415),
            (
                with_key().json(&json!({"account": "acme", "device": "x".repeat(MAX_BODY_BYTES)})),
                413,
            ),
        ] {
            let (status, body) = send(request).await;
            assert_eq!(status, expected);
            error_message(&body);
        }
        assert_eq!(app.rejected("bad_request"), 4);
    }

    #[tokio::test]
    async fn refuses_invalid_names() {
        let app = TestServer::start().await;
        for request in [
            json!({"account": "a.b", "device": "tv-1"}),
            json!({"account": "acme", "device": ""}),
            json!({"account": "acme", "device": "x".repeat(65)}),
        ] {
            let (status, body) = app.issue(&request).await;
            assert_eq!(status, 400, "{request}");
            let message = error_message(&body);
            assert!(message.starts_with("invalid token request"), "{message}");
        }
        assert_eq!(app.rejected("bad_request"), 3);
        assert_eq!(app.issued(), 0);
    }

    #[tokio::test]
    async fn serves_the_jwks() {
        let app = TestServer::start().await;
        let response = app
            .client
            .get(format!("{}/.well-known/jwks.json", app.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(
            response.headers().get(header::CACHE_CONTROL).unwrap(),
            JWKS_CACHE_CONTROL
        );
        let jwks: Value = response.json().await.unwrap();
        assert_eq!(jwks, app.vendor.jwks());
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 1);
        let token = app
            .vendor
            .issue(&"acme".parse().unwrap(), &"tv-1".parse().unwrap(), "http")
            .unwrap()
            .token;
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(keys[0]["kid"].as_str(), header.kid.as_deref());
        assert_eq!(keys[0]["kty"], "OKP");
        assert_eq!(keys[0]["crv"], "Ed25519");
        assert_eq!(keys[0]["alg"], "EdDSA");
        assert_eq!(keys[0]["use"], "sig");
        // The published key alone verifies the token, as a third party would.
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(keys[0].clone()).unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
        validation.set_audience(&[crate::DEFAULT_AUDIENCE]);
        validation.set_issuer(&[crate::DEFAULT_ISSUER]);
        jsonwebtoken::decode::<crate::Claims>(&token, &key, &validation).unwrap();
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer"));
        assert_eq!(bearer(&h), None);
    }
}
