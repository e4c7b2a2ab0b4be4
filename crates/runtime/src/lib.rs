//! What every headcount process shares: connecting to NATS, opening the KV
//! buckets, the `/metrics`, `/healthz` and `/readyz` endpoints and the
//! readiness behind them ([`Health`]), shutdown and logging, and secrets
//! (random ones from the OS, and the private files that hold them).
//!
//! Nothing here knows what a heartbeat or a limit is; that is the services'
//! business. Subjects and bucket names come from `headcount-protocol`.

pub mod buckets;
pub mod health;
pub mod http;
pub mod nats;
pub mod secret;
pub mod shutdown;
pub mod watch;

pub use buckets::{BucketSettings, Buckets};
pub use health::Health;
pub use nats::NatsOptions;
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

/// The service error a reply carries (code and message), if it is one.
pub fn service_error_of(msg: &async_nats::Message) -> Option<(u16, String)> {
    let h = msg.headers.as_ref()?;
    let code = h.get(async_nats::service::NATS_SERVICE_ERROR_CODE)?;
    let text = h
        .get(async_nats::service::NATS_SERVICE_ERROR)
        .map(|v| v.to_string())
        .unwrap_or_default();
    Some((code.as_str().parse().unwrap_or(0), text))
}
