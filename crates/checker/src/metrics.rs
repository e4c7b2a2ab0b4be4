//! The checker's Prometheus collectors.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone, Debug)]
pub struct Metrics {
    /// Active sessions over all accounts.
    pub active_sessions: IntGauge,
    /// Sessions ended by the checker, by action: evicted, rejected, revoked.
    pub enforcements: IntCounterVec,
    /// Requests by endpoint and result: ok, bad_request, not_found, error.
    pub requests: IntCounterVec,
    /// Time to answer, by endpoint.
    pub request_seconds: HistogramVec,
    /// Presence events published by the checker, by type.
    pub events: IntCounterVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> anyhow::Result<Self> {
        let m = Self {
            active_sessions: IntGauge::new(
                "headcount_active_sessions",
                "active sessions over all accounts",
            )?,
            enforcements: IntCounterVec::new(
                Opts::new(
                    "headcount_enforcements_total",
                    "sessions ended by limit enforcement or an operator, by action",
                ),
                &["action"],
            )?,
            requests: IntCounterVec::new(
                Opts::new(
                    "headcount_requests_total",
                    "requests answered, by endpoint and result",
                ),
                &["endpoint", "result"],
            )?,
            request_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "headcount_request_duration_seconds",
                    "time to answer a request, by endpoint",
                )
                .buckets(vec![
                    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 1.0,
                ]),
                &["endpoint"],
            )?,
            events: IntCounterVec::new(
                Opts::new(
                    "headcount_checker_events_total",
                    "presence events published by the checker, by type",
                ),
                &["type"],
            )?,
        };
        registry.register(Box::new(m.active_sessions.clone()))?;
        registry.register(Box::new(m.enforcements.clone()))?;
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.request_seconds.clone()))?;
        registry.register(Box::new(m.events.clone()))?;
        for a in ["evicted", "rejected", "revoked"] {
            m.enforcements.with_label_values(&[a]);
        }
        Ok(m)
    }
}
