//! `headcount`: run the services, query them, simulate devices.
//!
//! Layout: [`config`] holds flags shared by commands, [`up`] the all-in-one
//! command (nats-server plus every service), [`services`] each service run
//! alone, [`query`] the request-reply commands, [`simulate`] a device fleet.
//! This binary only parses arguments and calls the service crates.

mod config;
mod exit;
mod lock;
mod query;
mod services;
mod simulate;
mod up;

use clap::{Parser, Subcommand};

/// Real-time device counting and per-account device limits on NATS.
#[derive(Debug, Parser)]
#[command(name = "headcount", version, about, after_help = exit::EXIT_STATUS_HELP)]
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
    #[command(after_help = exit::EXIT_STATUS_HELP)]
    Active(query::ActiveArgs),
    /// Ask whether a device may play now (applies the account's policy).
    #[command(after_help = exit::EXIT_STATUS_HELP)]
    Check(query::CheckArgs),
    /// Read or change an account's limit and policy.
    #[command(after_help = exit::EXIT_STATUS_HELP)]
    Limits(query::LimitsArgs),
    /// End one session now (the device is told, its heartbeats are ignored).
    #[command(after_help = exit::EXIT_STATUS_HELP)]
    Kick(query::KickArgs),
    /// Issue a device token.
    #[command(after_help = exit::EXIT_STATUS_HELP)]
    Token(query::TokenArgs),
    /// Issue a backend token: an application server's NATS credential.
    #[command(after_help = exit::EXIT_STATUS_HELP)]
    BackendToken(query::BackendTokenArgs),
    /// Print fresh auth callout keys (seeds for token-vendor, public keys for nats-server).
    CalloutKeys,
    /// Active sessions by content, device kind and region, and the peak.
    #[command(after_help = exit::EXIT_STATUS_HELP)]
    Stats(query::StatsArgs),
    /// A live, refreshing view of the busiest accounts.
    #[command(after_help = exit::EXIT_STATUS_HELP)]
    Top(query::TopArgs),
    /// Run the heartbeat-handler alone.
    Handler(services::HandlerArgs),
    /// Run the checker alone.
    Checker(services::CheckerArgs),
    /// Run the token-vendor alone.
    TokenVendor(services::TokenVendorArgs),
    /// Create the KV buckets or apply changed settings (replicas, TTLs), as the console user.
    Buckets(services::BucketsArgs),
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
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
    );
    if !quiet {
        headcount_runtime::init_logging(cli.log_json);
    }
    runtime.block_on(async move {
        // The query commands end with their own exit statuses (exit.rs).
        let query = |json: bool| move |r| exit::finish(r, json);
        match cli.command {
            Command::Up(a) => finish(up::run(a).await),
            Command::Simulate(a) => finish(simulate::run(a).await),
            Command::Active(a) => query(a.json())(query::active(a).await),
            Command::Check(a) => query(a.json())(query::check(a).await),
            Command::Limits(a) => query(a.json())(query::limits(a).await),
            Command::Kick(a) => query(a.json())(query::kick(a).await),
            Command::Token(a) => query(a.json())(query::token(a).await),
            Command::BackendToken(a) => query(a.json())(query::backend_token(a).await),
            Command::CalloutKeys => finish(query::callout_keys()),
            Command::Stats(a) => query(a.json())(query::stats(a).await),
            Command::Top(a) => query(a.json())(query::top(a).await),
            Command::Handler(a) => finish(services::handler(a).await),
            Command::Checker(a) => finish(services::checker(a).await),
            Command::TokenVendor(a) => finish(services::token_vendor(a).await),
            Command::Buckets(a) => finish(services::buckets(a).await),
        }
    })
}

/// The end of a command that is not a query: 1 on any error.
fn finish(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// clap could not make sense of the arguments (exit status 2), or was
/// asked for help or the version (0). Under `--json` the error is also one
/// JSON object on stdout, as every query command's errors are.
fn usage_error(e: clap::Error) -> std::process::ExitCode {
    let code = e.exit_code();
    if code != 0 && std::env::args_os().any(|a| a == "--json") {
        let text = e.render().to_string();
        let first = text
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default()
            .trim_start_matches("error: ");
        let object = serde_json::json!({ "error": first, "code": code });
        println!(
            "{}",
            serde_json::to_string_pretty(&object).unwrap_or_default()
        );
    }
    let _ = e.print();
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(2))
}

/// Millions of small session records: mimalloc keeps them about a quarter
/// smaller in resident memory than the system allocator, and is faster on
/// the ingest path (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
