//! `headcount`: run the services, query them, simulate devices.
//!
//! Layout: [`config`] holds flags shared by commands, [`up`] the all-in-one
//! command (nats-server plus every service), [`services`] each service run
//! alone, [`query`] the request-reply commands, [`simulate`] a device fleet.
//! This binary only parses arguments and calls the service crates.

mod bench;
mod config;
mod query;
mod services;
mod simulate;
mod up;

use clap::{Parser, Subcommand};

/// Real-time device counting and per-account device limits on NATS.
#[derive(Debug, Parser)]
#[command(name = "headcount", version, about)]
struct Cli {
    /// Log as JSON lines (for log shippers).
    #[arg(long, global = true, env = "HEADCOUNT_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start nats-server and every service in one process; `--demo` adds a simulated fleet.
    Up(up::UpArgs),
    /// Simulate accounts x devices heartbeating.
    Simulate(simulate::SimulateArgs),
    /// Show an account's active sessions.
    Active(query::ActiveArgs),
    /// Ask whether a device may play now (applies the account's policy).
    Check(query::CheckArgs),
    /// Read or change an account's limit and policy.
    Limits(query::LimitsArgs),
    /// End one session now (the device is told, its heartbeats are ignored).
    Kick(query::KickArgs),
    /// Issue a device token.
    Token(query::TokenArgs),
    /// Issue a backend token: an application server's NATS credential.
    BackendToken(query::BackendTokenArgs),
    /// Print fresh auth callout keys (seeds for token-vendor, public keys for nats-server).
    CalloutKeys,
    /// Active sessions by content, device kind and region, and the peak.
    Stats(query::StatsArgs),
    /// A live, refreshing view of the busiest accounts.
    Top(query::TopArgs),
    /// Measure a running headcount (see docs/BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// Run the heartbeat-handler alone.
    Handler(services::HandlerArgs),
    /// Run the checker alone.
    Checker(services::CheckerArgs),
    /// Run the token-vendor alone.
    TokenVendor(services::TokenVendorArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let quiet = matches!(
        cli.command,
        Command::Active(_)
            | Command::Check(_)
            | Command::Limits(_)
            | Command::Kick(_)
            | Command::Token(_)
            | Command::BackendToken(_)
            | Command::CalloutKeys
            | Command::Stats(_)
            | Command::Top(_)
            | Command::Bench(_)
    );
    if !quiet {
        headcount_runtime::init_logging(cli.log_json);
    }
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(a) => up::run(a).await,
            Command::Simulate(a) => simulate::run(a).await,
            Command::Active(a) => query::active(a).await,
            Command::Check(a) => query::check(a).await,
            Command::Limits(a) => query::limits(a).await,
            Command::Kick(a) => query::kick(a).await,
            Command::Token(a) => query::token(a).await,
            Command::BackendToken(a) => query::backend_token(a).await,
            Command::CalloutKeys => query::callout_keys(),
            Command::Stats(a) => query::stats(a).await,
            Command::Top(a) => query::top(a).await,
            Command::Bench(a) => bench::run(a).await,
            Command::Handler(a) => services::handler(a).await,
            Command::Checker(a) => services::checker(a).await,
            Command::TokenVendor(a) => services::token_vendor(a).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Millions of small session records: mimalloc keeps them about a quarter
/// smaller in resident memory than the system allocator, and is faster on
/// the ingest path (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
