//! The handler's Prometheus collectors.

use headcount_runtime::metrics::{Register, WithSeries};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The heartbeat counters, resolved once: the ingest path bumps them per
/// message and must not look labels up each time.
#[derive(Clone, Debug)]
pub struct HeartbeatCounters {
    pub accepted: IntCounter,
    pub invalid: IntCounter,
    pub malformed: IntCounter,
    pub revoked: IntCounter,
    pub rate_limited: IntCounter,
    /// A new session whose account's dictionary has no room left.
    pub dictionary_full: IntCounter,
    /// On another partition than its account's: the server's subject
    /// mapping and this build count partitions differently.
    pub misrouted: IntCounter,
}

#[derive(Clone, Debug)]
pub struct Metrics {
    /// Heartbeats by result: accepted, invalid, malformed, revoked,
    /// rate_limited, dictionary_full, misrouted.
    pub heartbeats: IntCounterVec,
    /// KV writes by result: ok, conflict, error.
    pub kv_writes: IntCounterVec,
    pub kv_write_seconds: Histogram,
    /// Sessions held in the live interval dictionaries (each device once).
    pub sessions: IntGauge,
    /// Partitions this instance serves.
    pub partitions: IntGauge,
    /// Presence events published, by type.
    pub events: IntCounterVec,
    pub hb: HeartbeatCounters,
}

impl Metrics {
    pub fn new(registry: &Registry) -> anyhow::Result<Self> {
        let heartbeats = IntCounterVec::new(
            Opts::new(
                "headcount_heartbeats_total",
                "heartbeats received, by result",
            ),
            &["result"],
        )?
        .register(registry)?;
        // Resolving the counters also makes every result's series exist from
        // the start.
        let hb = HeartbeatCounters {
            accepted: heartbeats.with_label_values(&["accepted"]),
            invalid: heartbeats.with_label_values(&["invalid"]),
            malformed: heartbeats.with_label_values(&["malformed"]),
            revoked: heartbeats.with_label_values(&["revoked"]),
            rate_limited: heartbeats.with_label_values(&["rate_limited"]),
            dictionary_full: heartbeats.with_label_values(&["dictionary_full"]),
            misrouted: heartbeats.with_label_values(&["misrouted"]),
        };
        Ok(Self {
            hb,
            heartbeats,
            kv_writes: IntCounterVec::new(
                Opts::new(
                    "headcount_kv_writes_total",
                    "interval dictionary writes, by result",
                ),
                &["result"],
            )?
            .register(registry)?
            .with_series(["ok", "conflict", "error"]),
            kv_write_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "headcount_kv_write_duration_seconds",
                    "time to write one interval dictionary",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                ]),
            )?
            .register(registry)?,
            sessions: IntGauge::new(
                "headcount_handler_sessions",
                "sessions held in the live interval dictionaries (each device once)",
            )?
            .register(registry)?,
            partitions: IntGauge::new(
                "headcount_handler_partitions",
                "partitions this instance serves",
            )?
            .register(registry)?,
            events: IntCounterVec::new(
                Opts::new(
                    "headcount_handler_events_total",
                    "presence events published by the handler, by type",
                ),
                &["type"],
            )?
            .register(registry)?,
        })
    }
}
