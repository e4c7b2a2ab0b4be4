//! headcount's composition root: the one place the services are wired.
//!
//! - [`settings`]: everything a process needs to run some or all of the
//!   services, validated once ([`Settings::validate`]).
//! - [`App::build`]: connects each service as its own NATS user, opens the
//!   buckets, starts the services and their HTTP listeners, and waits until
//!   every one says it is ready. `headcount up`, the standalone service
//!   commands (which the benchmark runs as processes) and the test harness
//!   all start services through it.
//! - [`server`]: starting nats-server (the users' passwords, the callout's
//!   keys, a child that dies with its parent).
//! - [`secrets`]: the secrets `up` keeps in its data dir.
//! - [`cli`]: what the command-line programs share: where NATS is, a
//!   command's runtime and exit status.

mod app;
pub mod cli;
pub mod secrets;
pub mod server;
pub mod settings;

pub use app::App;
pub use settings::{CheckerSettings, HandlerSettings, Settings, VendorSettings};
