//! What every headcount process shares: connecting to NATS, opening the KV
//! buckets, the `/metrics`, `/healthz` and `/readyz` endpoints and the
//! readiness behind them ([`Health`]), declaring collectors ([`metrics`]),
//! shutdown and logging, and secrets (random ones from the OS, and the
//! private files that hold them), and [`effects`]: the publications and
//! create-only writes the services share.
//!
//! Nothing here knows what a heartbeat or a limit is; that is the services'
//! business ([`effects`] carries out what they decided, it decides nothing). Subjects and bucket names come from `headcount-protocol`.

pub mod buckets;
pub mod effects;
pub mod health;
pub mod http;
pub mod members;
pub mod metrics;
pub mod nats;
pub mod relay;
pub mod secret;
pub mod service;
pub mod shutdown;
pub mod watch;

pub use buckets::{BucketSettings, Buckets};
pub use health::Health;
pub use nats::NatsOptions;
pub use service::{Running, Wiring};
pub use shutdown::Shutdown;

/// Installs the tracing subscriber: human-readable lines, filtered by
/// `RUST_LOG` (default `info`, with the NATS client's own chatter at `warn`); `json` selects JSON lines for log shippers.
/// Colours (ANSI escapes) only when stderr is a terminal and `NO_COLOR` is
/// not set: a log redirected to a file or a pipe is plain text.
pub fn init_logging(json: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn"));
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    // A second call (tests, `up`) keeps the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// A service error as carried in the micro error headers.
pub fn service_error(
    code: usize,
    status: impl std::fmt::Display,
) -> async_nats::service::error::Error {
    async_nats::service::error::Error {
        code,
        status: status.to_string(),
    }
}
