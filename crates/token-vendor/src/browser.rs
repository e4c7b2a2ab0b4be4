//! The HTTP side of browser devices and of the operator's live view:
//!
//! - `GET /v1/client-config`: where browsers reach NATS (WebSocket URLs),
//!   how often they heartbeat, whether demo tokens are on.
//! - `POST /v1/tokens/refresh` (the device token as bearer): a new token for
//!   the same session, while the old one is valid and the session not ended.
//! - `POST /v1/sessions/leave` (`{"token": ...}` in the body, as
//!   `navigator.sendBeacon` sends it from a closing tab): ends the session at
//!   once, published as the device's own `leave` heartbeat.
//! - `POST /v1/operator-tokens` (operator key as bearer): a token for the
//!   live view's NATS connection.
//! - `POST /v1/demo/tokens` (only with demo tokens on): a device token for
//!   any account and device, no key needed; for local demos, never for
//!   production.
//! - everything else: the built pages (`/demo/`, `/live/`) from the web
//!   directory, when one is configured.
//!
//! Refresh, leave and demo tokens are limited to a request rate per client
//! address, the operator endpoint to a budget of wrong keys per address
//! (`throttle`); above them the answer is 429 with `Retry-After`.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::kv;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use headcount_protocol::subjects;
use headcount_protocol::wire::{Heartbeat, TokenRequest};
use serde::Deserialize;

use crate::callout::Refusal;
use crate::http::{
    LimitedRoutes, bearer, describe, error, is_operator, json_or_error, unauthorized,
};
use crate::metrics::{BAD_REQUEST, FORBIDDEN};
use crate::throttle::Endpoint;
use crate::{Claims, TokenError, Vendor};

/// What the browser endpoints need besides the vendor.
#[derive(Debug, Clone)]
pub struct BrowserConfig {
    /// NATS WebSocket URLs as browsers reach them (`ws://` or `wss://`).
    pub websocket_urls: Vec<String>,
    /// How often browser devices heartbeat (well inside the checker's
    /// timeout).
    pub heartbeat_every: Duration,
    /// Serve `POST /v1/demo/tokens`: tokens for anyone who asks.
    pub demo_tokens: bool,
    /// The built pages (`web/dist`); `None` serves no pages.
    pub web_dir: Option<PathBuf>,
}

#[derive(Clone)]
struct Browser {
    vendor: Vendor,
    nats: async_nats::Client,
    revoked: kv::Store,
    config: BrowserConfig,
}

/// The browser endpoints and pages. `nats` publishes leave heartbeats;
/// `revoked` is the revocation bucket (`headcount-revoked`).
pub fn browser_router(
    vendor: Vendor,
    nats: async_nats::Client,
    revoked: kv::Store,
    config: BrowserConfig,
) -> Router {
    let pages = config.web_dir.clone();
    // A player page may live on another origin than token-vendor: what a
    // device does with its own token is open to every origin. The token
    // travels in a header or the body, never in a cookie, so no credentials
    // are involved.
    let any_origin = tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::Any)
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
        .allow_headers([
            axum::http::header::AUTHORIZATION,
            axum::http::header::CONTENT_TYPE,
        ])
        // A throttled page reads how long to wait.
        .expose_headers([axum::http::header::RETRY_AFTER]);
    // Per-address limits (`throttle`): request rates on what devices and
    // anyone (demo tokens) may call, the wrong-key budget on the operator's.
    let devices = Router::new()
        .route("/v1/client-config", get(client_config))
        .limited_post(&vendor, Endpoint::Refresh, refresh)
        .limited_post(&vendor, Endpoint::Leave, leave)
        .layer(any_origin);
    let router = devices
        .limited_post(&vendor, Endpoint::OperatorTokens, operator_token)
        .limited_post(&vendor, Endpoint::DemoTokens, demo_token)
        .with_state(Browser {
            vendor,
            nats,
            revoked,
            config,
        });
    match pages {
        Some(dir) => router
            .route("/", get(|| async { Redirect::temporary("/demo/") }))
            .fallback_service(tower_http::services::ServeDir::new(dir)),
        None => router.fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not found (pages are served only with --web-dir)",
            )
        }),
    }
}

async fn client_config(State(b): State<Browser>) -> Response {
    Json(serde_json::json!({
        "websocket": b.config.websocket_urls,
        "heartbeat_every_ms": b.config.heartbeat_every.as_millis() as u64,
        "demo_tokens": b.config.demo_tokens,
    }))
    .into_response()
}

/// A 401 for a device token that does not verify, counted.
fn bad_token(b: &Browser, e: TokenError) -> Response {
    b.vendor.count_rejection(FORBIDDEN);
    error(
        StatusCode::UNAUTHORIZED,
        format!("device token refused: {e}"),
    )
}

/// Why a request's device token was not taken.
enum NotADevice {
    Missing,
    Refused(TokenError),
    Operator,
}

impl NotADevice {
    /// The answer to send, counted.
    fn respond(self, b: &Browser) -> Response {
        match self {
            NotADevice::Missing => {
                b.vendor.count_rejection(FORBIDDEN);
                error(StatusCode::UNAUTHORIZED, "no device token presented")
            }
            NotADevice::Refused(e) => bad_token(b, e),
            NotADevice::Operator => {
                b.vendor.count_rejection(BAD_REQUEST);
                error(
                    StatusCode::BAD_REQUEST,
                    "this is an operator or backend token, not a device's; get a new one at /v1/operator-tokens or /v1/backend-tokens",
                )
            }
        }
    }
}

/// The verified claims of a device token.
fn device_claims(b: &Browser, token: Option<&str>) -> Result<Claims, NotADevice> {
    let token = token.filter(|t| !t.is_empty()).ok_or(NotADevice::Missing)?;
    let claims = b.vendor.verify(token).map_err(NotADevice::Refused)?;
    if claims.role().is_client() {
        return Err(NotADevice::Operator);
    }
    Ok(claims)
}

/// `POST /v1/tokens/refresh`: a device renews its own token before it
/// expires. Only a valid, unexpired token of a session that was not ended
/// is renewed, so a refresh never revives an evicted or kicked device.
async fn refresh(State(b): State<Browser>, headers: HeaderMap) -> Response {
    let claims = match device_claims(&b, bearer(&headers)) {
        Ok(c) => c,
        Err(refusal) => return refusal.respond(&b),
    };
    match crate::callout::still_alive(&b.revoked, &claims).await {
        Ok(()) => {}
        Err(Refusal::Token(e)) => return bad_token(&b, e),
        Err(Refusal::Revoked) => {
            b.vendor.count_rejection(FORBIDDEN);
            return error(StatusCode::FORBIDDEN, Refusal::Revoked.to_string());
        }
        Err(Refusal::RevocationUnavailable | Refusal::RegistryUnavailable | Refusal::NoToken) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "revocation list unavailable; try again",
            );
        }
    }
    json_or_error(
        b.vendor.renew(&claims),
        "renewing a token",
        "renewing the token failed",
    )
}

#[derive(Deserialize)]
struct LeaveRequest {
    token: String,
}

/// `POST /v1/sessions/leave`: the beacon a closing tab sends. The body is
/// read as JSON whatever its content type (`sendBeacon` sends text/plain).
async fn leave(State(b): State<Browser>, body: Bytes) -> Response {
    let request: LeaveRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            b.vendor.count_rejection(BAD_REQUEST);
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"token\": \"<device token>\"}}: {e}"),
            );
        }
    };
    let claims = match device_claims(&b, Some(&request.token)) {
        Ok(c) => c,
        Err(refusal) => return refusal.respond(&b),
    };
    let (account, device, session) = (claims.account, claims.device, claims.session);
    let subject = subjects::heartbeat(&account, &device, &session);
    let payload = Heartbeat {
        leave: true,
        ..Heartbeat::default()
    }
    .encode();
    if let Err(e) = b.nats.publish(subject, payload.into()).await {
        tracing::warn!(error = %e, "publishing a leave for a closing tab");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "NATS unavailable; try again",
        );
    }
    tracing::debug!(%account, %device, %session, "leave by beacon");
    StatusCode::NO_CONTENT.into_response()
}

/// `POST /v1/operator-tokens`: the live view's NATS token.
async fn operator_token(State(b): State<Browser>, headers: HeaderMap) -> Response {
    if !is_operator(&b.vendor, &headers) {
        return unauthorized(&b.vendor);
    }
    json_or_error(
        b.vendor.issue_operator(),
        "issuing an operator token",
        "issuing the token failed",
    )
}

/// `POST /v1/demo/tokens`: a device token without a key, when demo tokens
/// are on (`headcount up --demo`); 404 otherwise.
async fn demo_token(
    State(b): State<Browser>,
    body: Result<Json<TokenRequest>, JsonRejection>,
) -> Response {
    if !b.config.demo_tokens {
        return error(
            StatusCode::NOT_FOUND,
            "demo tokens are off (headcount up --demo-tokens turns them on, for local demos only)",
        );
    }
    let request = match body {
        Ok(Json(r)) => r,
        Err(rejection) => {
            b.vendor.count_rejection(BAD_REQUEST);
            let (status, message) = describe(&rejection);
            return error(status, message);
        }
    };
    json_or_error(
        b.vendor
            .issue_with_plan(&request.account, &request.device, None, "demo"),
        "issuing a demo token",
        "issuing the token failed",
    )
}
