//! `headcount bench`: measurements against a running headcount (see
//! docs/BENCHMARKS.md). Nothing here asserts; it reports.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use headcount_protocol::subjects::{self, endpoint, endpoint_subject};
use headcount_protocol::wire::{ActiveReply, Heartbeat};
use headcount_protocol::{AccountId, DeviceId, SessionId};

use crate::config::NatsArgs;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchKind,
}

#[derive(Debug, Subcommand)]
enum BenchKind {
    /// Time from a new session's first heartbeat to it showing in `active`,
    /// and from a `leave` to its seat being free.
    Freshness {
        /// Sessions to measure.
        #[arg(long, default_value_t = 200)]
        samples: usize,
        #[command(flatten)]
        nats: NatsArgs,
    },
}

pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    match a.what {
        BenchKind::Freshness { samples, nats } => freshness(samples, &nats).await,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn active(client: &async_nats::Client, account: &AccountId) -> anyhow::Result<ActiveReply> {
    let body = serde_json::to_vec(&serde_json::json!({ "account": account }))?;
    let msg = client
        .request(endpoint_subject(endpoint::ACTIVE), body.into())
        .await?;
    serde_json::from_slice(&msg.payload).context("unreadable active reply")
}

/// Polls `active` until `pred` holds; returns the time since `start`.
async fn until(
    client: &async_nats::Client,
    account: &AccountId,
    start: Instant,
    pred: impl Fn(&ActiveReply) -> bool,
) -> anyhow::Result<Duration> {
    loop {
        if pred(&active(client, account).await?) {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(10),
            "not seen within 10 s"
        );
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

async fn freshness(samples: usize, nats: &NatsArgs) -> anyhow::Result<()> {
    let service = nats.options("headcount-bench")?.connect().await?;
    // The service user publishes on behalf of many devices, as a load
    // generator; real devices would need a token and a connection each.
    let device = nats.options("headcount-bench")?.connect().await?;
    let run = nuid::next().to_string();
    let mut joins = Vec::with_capacity(samples);
    let mut leaves = Vec::with_capacity(samples);
    for i in 0..samples {
        let account = AccountId::parse(&format!("bench-fresh-{}-{i}", &run[..8]))?;
        let dev = DeviceId::parse("d")?;
        let session = SessionId::parse(&nuid::next().to_string())?;
        let subject = subjects::heartbeat(&account, &dev, &session);
        let start = Instant::now();
        device
            .publish(subject.clone(), Heartbeat::default().encode().into())
            .await?;
        device.flush().await?;
        joins.push(until(&service, &account, start, |r| r.active == 1).await?);
        let leave = Heartbeat {
            leave: true,
            ..Default::default()
        };
        let start = Instant::now();
        device.publish(subject, leave.encode().into()).await?;
        device.flush().await?;
        leaves.push(until(&service, &account, start, |r| r.active == 0).await?);
    }
    joins.sort();
    leaves.sort();
    println!("freshness over {samples} sessions (poll interval 0.5 ms)");
    println!("{:<28} {:>10} {:>10} {:>10}", "", "p50", "p99", "max");
    for (name, v) in [
        ("first heartbeat -> active", &joins),
        ("leave -> seat free", &leaves),
    ] {
        println!(
            "{:<28} {:>8.2}ms {:>8.2}ms {:>8.2}ms",
            name,
            percentile(v, 0.5).as_secs_f64() * 1e3,
            percentile(v, 0.99).as_secs_f64() * 1e3,
            v.last().copied().unwrap_or_default().as_secs_f64() * 1e3
        );
    }
    Ok(())
}
