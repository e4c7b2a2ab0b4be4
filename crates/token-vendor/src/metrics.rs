//! The token vendor's Prometheus collectors.
//!
//! Labels stay low-cardinality: a channel, a reason or a result kind, never an
//! account, device or key id.

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
        let m = Self {
            issued: IntCounterVec::new(
                Opts::new("headcount_tokens_issued_total", "tokens issued, by channel"),
                &["via"],
            )?,
            rejected: IntCounterVec::new(
                Opts::new(
                    "headcount_token_requests_rejected_total",
                    "token requests refused, by reason",
                ),
                &["reason"],
            )?,
            callout: IntCounterVec::new(
                Opts::new(
                    "headcount_callout_total",
                    "device connections decided by the auth callout, by result \
                     (allowed, or why the connection was refused)",
                ),
                &["result"],
            )?,
            throttled: IntCounterVec::new(
                Opts::new(
                    "headcount_http_throttled_total",
                    "HTTP requests refused with 429 by the per-address limits \
                     (wrong operator keys, refresh, leave, demo tokens), by endpoint",
                ),
                &["endpoint"],
            )?,
            verifications: IntCounterVec::new(
                Opts::new(
                    "headcount_token_verifications_total",
                    "device tokens verified, by result",
                ),
                &["result"],
            )?,
        };
        registry.register(Box::new(m.callout.clone()))?;
        registry.register(Box::new(m.issued.clone()))?;
        registry.register(Box::new(m.rejected.clone()))?;
        registry.register(Box::new(m.verifications.clone()))?;
        registry.register(Box::new(m.throttled.clone()))?;
        // Every series exists from the start, so a scrape shows zeros rather
        // than nothing and rate() works from the first increment.
        for via in VIA {
            m.issued.with_label_values(&[*via]);
        }
        for reason in [UNAUTHORIZED, BAD_REQUEST, FORBIDDEN] {
            m.rejected.with_label_values(&[reason]);
        }
        m.verifications.with_label_values(&["ok"]);
        for kind in crate::TokenError::ALL {
            m.verifications.with_label_values(&[kind.kind()]);
            m.callout.with_label_values(&[kind.kind()]);
        }
        for endpoint in THROTTLED_ENDPOINTS {
            m.throttled.with_label_values(&[*endpoint]);
        }
        for result in CALLOUT_RESULTS {
            m.callout.with_label_values(&[*result]);
        }
        Ok(m)
    }
}
