//! `storage`: how many dictionary writes one sessions bucket takes (one
//! stream, so one leader), and several buckets side by side on the same
//! server. The handlers' writes are compare-and-set updates of whole
//! dictionaries; here writers do exactly that, each on keys of its own (no
//! conflicts), as fast as the server answers, for a while per bucket count.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use headcount_protocol::wire::{self, Labels, SessionDict, SessionRecord};
use headcount_protocol::{AccountId, DeviceId, IntervalClock, SessionId, partition, subjects};
use headcount_runtime::{BucketSettings, Buckets};

use crate::procs::{Env, scratch_dir};

#[derive(Debug, Args)]
pub struct StorageArgs {
    /// Sessions bucket counts, one run each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    buckets: Vec<u32>,
    /// Writes in flight at once, over all buckets.
    #[arg(long, default_value_t = 128)]
    writers: usize,
    /// Devices per dictionary written (the value's size follows).
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// How long each run writes.
    #[arg(long, default_value = "10s", value_parser = crate::config::duration)]
    duration: Duration,
    /// A small, fast run; the numbers are not meant to be quoted.
    #[arg(long)]
    quick: bool,
    /// Scratch directory (default: a new temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// A dictionary of `devices` sessions with labels, as a handler writes it.
fn dictionary(devices: usize) -> anyhow::Result<Bytes> {
    let mut dict = SessionDict::new();
    for d in 0..devices {
        dict.insert(
            DeviceId::parse(&format!("device-{d}"))?,
            SessionRecord {
                session: SessionId::parse(&format!("{:022}", d))?,
                since: 1_800_000_000_000,
                last_seen: 1_800_000_005_000,
                labels: Labels::new(Some("film-1234"), Some("tv"), Some("eu-west")),
                replaced: None,
            },
        );
    }
    Ok(wire::encode_dict(&dict).into())
}

pub async fn run(mut a: StorageArgs, headcount: &Path) -> anyhow::Result<()> {
    if a.quick {
        a.buckets.retain(|&n| n <= 2);
        a.duration = a.duration.min(Duration::from_secs(1));
        a.writers = a.writers.min(16);
    }
    anyhow::ensure!(
        a.buckets
            .iter()
            .all(|&n| (1..=subjects::kv::MAX_SESSIONS_BUCKETS).contains(&n)),
        "--buckets: from 1 to {}",
        subjects::kv::MAX_SESSIONS_BUCKETS
    );
    let value = dictionary(a.devices)?;
    let (dir, _scratch) = scratch_dir(a.dir.as_deref())?;
    println!(
        "bench storage: compare-and-set writes of {}-device dictionaries ({} bytes), {} in flight, {:?} per run, file storage, one server",
        a.devices,
        value.len(),
        a.writers,
        a.duration
    );
    println!(
        "{:<10} {:>14} {:>18} {:>12} {:>12}",
        "buckets", "writes/s", "per bucket/s", "p50 ms", "p99 ms"
    );
    for &n in &a.buckets {
        let r = one(&a, &dir.join(format!("b{n}")), headcount, n, &value)
            .await
            .with_context(|| format!("run with {n} buckets"))?;
        println!(
            "{:<10} {:>14.0} {:>18.0} {:>12.2} {:>12.2}",
            n,
            r.rate,
            r.rate / f64::from(n),
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

struct Run {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

async fn one(
    a: &StorageArgs,
    dir: &Path,
    headcount: &Path,
    n: u32,
    value: &Bytes,
) -> anyhow::Result<Run> {
    let env = Env::start(dir, headcount).await?;
    let client = env.client("bench-storage").await?;
    let buckets = Buckets::ensure(
        &client,
        &BucketSettings {
            sessions_ttl: IntervalClock::new(Duration::from_secs(120)).dictionary_ttl(),
            sessions_buckets: n,
            ..BucketSettings::default()
        },
    )
    .await?;
    let until = Instant::now() + a.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..a.writers {
        // An account of its own per writer, spread over the partitions and
        // so over the buckets.
        let account = AccountId::parse(&format!("store-{w}"))?;
        let store = buckets.sessions.of(partition::of(account.as_str())).clone();
        let key = subjects::kv::session_dict(&account, 1);
        let value = value.clone();
        tasks.spawn(async move {
            let mut revision = store.put(&key, value.clone()).await?;
            let mut took = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                revision = store.update(&key, value.clone(), revision).await?;
                took.push(t.elapsed());
            }
            anyhow::Ok(took)
        });
    }
    let started = Instant::now();
    let mut took = Vec::new();
    while let Some(r) = tasks.join_next().await {
        took.extend(r??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    took.sort();
    let at = |q: f64| {
        took.get(((took.len() as f64 * q) as usize).min(took.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Ok(Run {
        rate: took.len() as f64 / elapsed,
        p50: at(0.5),
        p99: at(0.99),
    })
}
