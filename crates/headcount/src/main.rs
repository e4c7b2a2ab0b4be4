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
    /// The request-reply commands, and `callout-keys`.
    #[command(flatten)]
    Query(query::Command),
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
    let runtime = match headcount_app::cli::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // The query commands print their answers, and nothing else, on stdout.
    let quiet = matches!(cli.command, Command::Query(_));
    if !quiet {
        headcount_runtime::init_logging(cli.log_json);
    }
    runtime.block_on(async move {
        let finish = headcount_app::cli::finish;
        match cli.command {
            Command::Up(a) => finish(up::run(a).await),
            Command::Simulate(a) => finish(simulate::run(a).await),
            Command::Query(q) => q.run().await,
            Command::Handler(a) => finish(services::handler(a).await),
            Command::Checker(a) => finish(services::checker(a).await),
            Command::TokenVendor(a) => finish(services::token_vendor(a).await),
            Command::Buckets(a) => finish(services::buckets(a).await),
        }
    })
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
