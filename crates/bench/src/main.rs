//! `headcount-bench`: measures headcount next to bare NATS on the same
//! machine (docs/BENCHMARKS.md). A tool for developers, kept out of the
//! shipped `headcount` binary.
//!
//! Every run that starts services starts its own nats-server (the
//! repository's configuration, through `headcount_app::server`) and runs
//! each service as its own `headcount` process, as production does, so that
//! resident memory is per process; the bare NATS baselines are this binary's
//! hidden `sink` and `echo` commands, run as processes too, so that they pay
//! the same process and connection costs as the services.
//!
//! Layout:
//! - [`all`]: every measurement at each session count (`all`).
//! - [`scale`]: the work of 1, 2 and 4 handler instances, and of 1, 2 and 3
//!   checkers, per instance.
//! - [`storage`]: dictionary writes per second into 1, 2 and 4 sessions
//!   buckets.
//! - [`soak`]: steady load with churn, memory and latency at every step.
//! - [`callout`]: a device's connect while the auth callout is flooded.
//! - [`measure`]: what the runs share: heartbeat publishers, request
//!   latency and throughput, freshness, percentiles.
//! - [`procs`]: the processes of a run (nats-server, services, baselines)
//!   and their metrics.
//! - [`baseline`]: the bare subscriber and the bare echo responder.
//! - [`config`]: where NATS is, durations on the command line.

mod all;
mod baseline;
mod callout;
mod config;
mod measure;
mod procs;
mod scale;
mod soak;
mod storage;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::NatsArgs;

/// Measure headcount next to bare NATS (see docs/BENCHMARKS.md).
#[derive(Debug, Parser)]
#[command(name = "headcount-bench", version, about)]
struct Cli {
    /// The `headcount` binary whose services the runs start. Default: the
    /// one next to this executable (cargo builds both into one directory).
    #[arg(long, env = "HEADCOUNT_BIN", global = true)]
    headcount_bin: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Everything, in one run: ingest next to a bare subscriber, KV write
    /// amplification, check/active latency and throughput next to a bare
    /// echo responder, freshness, memory per session, at each session count.
    All(all::AllArgs),
    /// One fleet against 1, 2 and 4 handler instances: per instance, the
    /// partitions and sessions held, KV writes and conflicts per heartbeat,
    /// resident memory. Whether adding an instance divides the work.
    Scale(scale::ScaleArgs),
    /// Compare-and-set dictionary writes per second into one sessions
    /// bucket (one stream, one leader) and into several side by side.
    Storage(storage::StorageArgs),
    /// Steady load for a while, with memory and latency reported at every
    /// step: resident memory must stay flat.
    Soak(soak::SoakArgs),
    /// Time from a new session's first heartbeat to it showing in `active`,
    /// and from a `leave` to its seat being free (against a running `up`).
    Freshness {
        /// Sessions to measure.
        #[arg(long, default_value_t = 200)]
        samples: usize,
        #[command(flatten)]
        nats: NatsArgs,
    },
    /// A device's connect latency while another host floods the auth
    /// callout with bad tokens, with and without the callout's shedding.
    Callout(callout::CalloutArgs),
    /// Baseline: counts messages on a subject, prints the rate.
    #[command(hide = true)]
    Sink {
        #[arg(long)]
        subject: String,
        #[arg(long)]
        expect: u64,
        #[command(flatten)]
        nats: NatsArgs,
    },
    /// Baseline: answers every request on a subject with a fixed reply.
    #[command(hide = true)]
    Echo {
        #[arg(long)]
        subject: String,
        #[command(flatten)]
        nats: NatsArgs,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match headcount_app::cli::runtime() {
        Ok(runtime) => headcount_app::cli::finish(runtime.block_on(run(cli))),
        Err(code) => code,
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let headcount = || procs::headcount_bin(cli.headcount_bin.clone());
    match cli.command {
        Command::All(a) => all::run(a, &headcount()?).await,
        Command::Soak(a) => soak::run(a, &headcount()?).await,
        Command::Scale(a) => scale::run(a, &headcount()?).await,
        Command::Storage(a) => storage::run(a, &headcount()?).await,
        Command::Callout(a) => callout::run(a, &headcount()?).await,
        Command::Freshness { samples, nats } => {
            let client = nats.options("headcount-bench")?.connect().await?;
            let f = measure::freshness(&client, samples).await?;
            println!("freshness over {samples} sessions (poll interval 0.5 ms)");
            println!("{:<28} {:>10} {:>10} {:>10}", "", "p50", "p99", "max");
            for (name, d) in [
                ("first heartbeat -> active", &f.join),
                ("leave -> seat free", &f.leave),
            ] {
                println!(
                    "{name:<28} {:>10} {:>10} {:>10}",
                    measure::ms(d.p50),
                    measure::ms(d.p99),
                    measure::ms(d.max)
                );
            }
            Ok(())
        }
        Command::Sink {
            subject,
            expect,
            nats,
        } => baseline::sink(&nats, &subject, expect).await,
        Command::Echo { subject, nats } => baseline::echo(&nats, &subject).await,
    }
}

/// The allocator of the `headcount` binary, so that the bare baselines
/// (this binary's `sink` and `echo`) allocate as the services they are
/// compared with do.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
