//! The checker's Prometheus collectors.

use headcount_runtime::metrics::{Register, WithSeries};
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::view::Breakdown;

/// How many values of a dimension (kind, region) get their own series; the
/// rest are summed under `other`, so label sets stay bounded.
pub const TOP_VALUES: usize = 10;

#[derive(Clone, Debug)]
pub struct Metrics {
    /// Active sessions over the accounts of the partitions it holds.
    pub active_sessions: IntGauge,
    /// Partitions it serves.
    pub partitions: IntGauge,
    /// Active sessions of each partition it serves: several checkers hold
    /// a partition, so the total over a deployment is the sum over
    /// partitions of the highest over checkers.
    pub partition_sessions: IntGaugeVec,
    /// Heartbeats heard (liveness), of the partitions it serves.
    pub heartbeats: IntCounter,
    /// Partitions whose heartbeats it hears from the handler in its own
    /// process rather than through a subscription of its own.
    pub partitions_relayed: IntGauge,
    /// Heartbeats the handler in its process could not queue for it (the
    /// partition's queue was full): not heard, like a slow subscription's.
    pub relay_overflow: IntCounter,
    /// Sessions ended by the checker, by action: evicted, rejected, revoked.
    pub enforcements: IntCounterVec,
    /// Writes of an account's ledger of decided endings, by result: ok,
    /// conflict (another checker decided first), error.
    pub ledger_writes: IntCounterVec,
    /// Requests by endpoint and result: ok, bad_request, not_found, error,
    /// passed_on (to the checkers holding the account's partition).
    pub requests: IntCounterVec,
    /// Time to answer, by endpoint.
    pub request_seconds: HistogramVec,
    /// Presence events published by the checker, by type.
    pub events: IntCounterVec,
    /// Active sessions by device kind (top values plus `other`).
    pub by_kind: IntGaugeVec,
    /// Active sessions by region (top values plus `other`).
    pub by_region: IntGaugeVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> anyhow::Result<Self> {
        Ok(Self {
            active_sessions: IntGauge::new(
                "headcount_active_sessions",
                "active sessions over the accounts of the partitions this checker holds",
            )?
            .register(registry)?,
            partitions: IntGauge::new(
                "headcount_checker_partitions",
                "partitions this checker serves",
            )?
            .register(registry)?,
            partition_sessions: IntGaugeVec::new(
                Opts::new(
                    "headcount_partition_active_sessions",
                    "active sessions of each partition this checker serves",
                ),
                &["partition"],
            )?
            .register(registry)?,
            heartbeats: IntCounter::new(
                "headcount_checker_heartbeats_total",
                "heartbeats heard for liveness, of the partitions this checker serves",
            )?
            .register(registry)?,
            partitions_relayed: IntGauge::new(
                "headcount_checker_partitions_relayed",
                "partitions whose heartbeats this checker hears from the handler in its process (no subscription of its own)",
            )?
            .register(registry)?,
            relay_overflow: IntCounter::new(
                "headcount_checker_relay_overflow_total",
                "heartbeats the handler in this process could not queue for the checker (its partition's queue was full)",
            )?
            .register(registry)?,
            enforcements: IntCounterVec::new(
                Opts::new(
                    "headcount_enforcements_total",
                    "sessions ended by limit enforcement or an operator, by action",
                ),
                &["action"],
            )?
            .register(registry)?
            .with_series(["evicted", "rejected", "revoked"]),
            ledger_writes: IntCounterVec::new(
                Opts::new(
                    "headcount_ledger_writes_total",
                    "writes of an account's ledger of decided endings, by result",
                ),
                &["result"],
            )?
            .register(registry)?
            .with_series(["ok", "conflict", "error"]),
            requests: IntCounterVec::new(
                Opts::new(
                    "headcount_requests_total",
                    "requests answered, by endpoint and result",
                ),
                &["endpoint", "result"],
            )?
            .register(registry)?,
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
            )?
            .register(registry)?,
            events: IntCounterVec::new(
                Opts::new(
                    "headcount_checker_events_total",
                    "presence events published by the checker, by type",
                ),
                &["type"],
            )?
            .register(registry)?,
            by_kind: IntGaugeVec::new(
                Opts::new(
                    "headcount_active_sessions_by_kind",
                    "active sessions by device kind (the busiest kinds, the rest as other)",
                ),
                &["kind"],
            )?
            .register(registry)?,
            by_region: IntGaugeVec::new(
                Opts::new(
                    "headcount_active_sessions_by_region",
                    "active sessions by region (the busiest regions, the rest as other)",
                ),
                &["region"],
            )?
            .register(registry)?,
        })
    }

    /// Replaces the kind and region gauges with `b`'s counts.
    pub fn set_breakdown(&self, b: &Breakdown) {
        for (gauge, counts) in [(&self.by_kind, &b.by_kind), (&self.by_region, &b.by_region)] {
            gauge.reset();
            let mut sorted: Vec<(&String, &u32)> = counts.iter().collect();
            sorted.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
            let mut other = 0i64;
            for (i, (value, n)) in sorted.into_iter().enumerate() {
                if i < TOP_VALUES && value != "other" {
                    gauge
                        .with_label_values(&[value.as_str()])
                        .set(i64::from(*n));
                } else {
                    other += i64::from(*n);
                }
            }
            gauge.with_label_values(&["other"]).set(other);
        }
    }
}
