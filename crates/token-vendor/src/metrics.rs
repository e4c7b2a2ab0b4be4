//! The token vendor's Prometheus collectors.
//!
//! Labels stay low-cardinality: a channel, a reason or a result kind, never an
//! account, device or key id.

use headcount_runtime::metrics::{Register, WithSeries};
use prometheus::{IntCounterVec, Opts, Registry};

/// Channels a token can be issued over: a backend over HTTP or NATS, the
/// demo page, a device renewing its own token, an operator's live view.
pub(crate) const VIA: &[&str] = &["http", "nats", "demo", "refresh", "operator", "backend"];
/// A request without a valid device token, or for an ended session.
pub(crate) const FORBIDDEN: &str = "forbidden";
/// Why a token request was refused.
pub(crate) const UNAUTHORIZED: &str = "unauthorized";
pub(crate) const BAD_REQUEST: &str = "bad_request";

#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    /// Tokens issued, by channel ([`VIA`]).
    pub issued: IntCounterVec,
    /// Token requests refused, by reason: unauthorized, bad_request,
    /// forbidden.
    pub rejected: IntCounterVec,
    /// Token verifications, by result: ok or the error kind.
    pub verifications: IntCounterVec,
    /// Device connections decided by the auth callout, by result.
    pub callout: IntCounterVec,
    /// HTTP requests answered 429 by the per-address limits, by endpoint
    /// ([`THROTTLED_ENDPOINTS`]).
    pub throttled: IntCounterVec,
}

/// The `endpoint` labels of [`Metrics::throttled`]: the HTTP endpoints with
/// a per-address limit.
pub(crate) const THROTTLED_ENDPOINTS: &[&str] = &[
    "tokens",
    "keys_rotate",
    "operator_tokens",
    "backend_tokens",
    "tokens_revoke",
    "refresh",
    "leave",
    "demo_tokens",
];

/// Results of the auth callout besides the token error kinds.
pub(crate) const CALLOUT_RESULTS: &[&str] = &[
    "allowed",
    "no_token",
    "revoked",
    "revocation_unavailable",
    "registry_unavailable",
    "bad_request",
    "internal",
    "throttled",
];

impl Metrics {
    /// Creates the collectors and registers them on `registry`; fails if
    /// they are already registered there (one vendor per registry).
    pub fn new(registry: &Registry) -> anyhow::Result<Self> {
        // Every series exists from the start: a scrape shows zeros rather
        // than nothing, and rate() works from the first increment.
        let kinds = crate::TokenError::ALL.map(|k| k.kind());
        Ok(Self {
            issued: IntCounterVec::new(
                Opts::new("headcount_tokens_issued_total", "tokens issued, by channel"),
                &["via"],
            )?
            .register(registry)?
            .with_series(VIA),
            rejected: IntCounterVec::new(
                Opts::new(
                    "headcount_token_requests_rejected_total",
                    "token requests refused, by reason",
                ),
                &["reason"],
            )?
            .register(registry)?
            .with_series([UNAUTHORIZED, BAD_REQUEST, FORBIDDEN]),
            callout: IntCounterVec::new(
                Opts::new(
                    "headcount_callout_total",
                    "device connections decided by the auth callout, by result \
                     (allowed, or why the connection was refused)",
                ),
                &["result"],
            )?
            .register(registry)?
            .with_series(kinds.iter().chain(CALLOUT_RESULTS)),
            throttled: IntCounterVec::new(
                Opts::new(
                    "headcount_http_throttled_total",
                    "HTTP requests refused with 429 by the per-address limits \
                     (wrong operator keys, refresh, leave, demo tokens), by endpoint",
                ),
                &["endpoint"],
            )?
            .register(registry)?
            .with_series(THROTTLED_ENDPOINTS),
            verifications: IntCounterVec::new(
                Opts::new(
                    "headcount_token_verifications_total",
                    "device tokens verified, by result",
                ),
                &["result"],
            )?
            .register(registry)?
            .with_series(["ok"].iter().chain(&kinds)),
        })
    }
}
