//! headcount's wire contract, and the only place that knows it.
//!
//! Layout:
//! - [`names`]: account, device and session identifiers, parsed at the edge so
//!   that nothing past it can hold an invalid one.
//! - [`subjects`]: every NATS subject and KV key the system uses.
//! - [`wire`]: heartbeats and control messages (MessagePack), presence events
//!   and request/reply bodies (JSON).
//! - [`partition`]: how accounts are divided among service instances.
//! - [`interval`]: the interval arithmetic behind the interval dictionaries.
//! - [`policy`]: limit policies and the per-account limit.
//! - [`error`]: the error an endpoint answers with.
//!
//! This crate does no I/O and must never depend on a NATS client: services and
//! tools share it so that a subject or a field is spelled in one place only.

pub mod by_device;
pub mod error;
pub mod interval;
pub mod names;
pub mod partition;
pub mod policy;
pub mod subjects;
pub mod wire;

pub use by_device::ByDevice;
pub use error::ServiceError;
pub use interval::{ByInterval, IntervalClock};
pub use names::{AccountId, DeviceId, NameError, SessionId};
pub use policy::{AccountLimits, Grace, Limit, Plans, Policy};

/// Milliseconds since the Unix epoch; every time on the wire uses it.
pub type UnixMillis = u64;

/// The current wall-clock time in Unix milliseconds (the server's clock; a
/// device's clock is never trusted).
pub fn now_millis() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
