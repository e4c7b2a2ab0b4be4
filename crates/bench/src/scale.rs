//! `scale`: one fleet against 1, 2 and 4 handler instances (each its own
//! process, on one nats-server), across several interval boundaries, with
//! per-instance figures: partitions and sessions held, heartbeats taken,
//! dictionary writes and conflicts per heartbeat, resident memory; then
//! against 1, 2 and 3 checkers (each partition held by two): partitions
//! and sessions held, heartbeats heard and resident memory (between two
//! boundaries of a 30 s interval, and at the boundary's peak). Whether
//! adding an instance divides the work, or copies it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use crate::measure::{
    ACROSS_ROUNDS, MEMORY_INTERVAL, between_and_peak, publish_paced, rss_while_beating,
    session_subjects, wait_for_boundary,
};
use crate::procs::{Env, Proc, rss_bytes, scratch_dir};

#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// Handler instance counts, one run each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    instances: Vec<usize>,
    /// Checker instance counts, one run each, next to one handler
    /// (comma-separated; empty: none).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    checkers: Vec<usize>,
    /// Sessions of the fleet; each heartbeats every 5 s.
    #[arg(long, default_value_t = 30_000)]
    sessions: usize,
    /// Devices per account.
    #[arg(long, default_value_t = 10)]
    devices_per_account: usize,
    /// The dictionaries' interval in the handler runs: short, so that a
    /// run crosses several boundaries (where every live session is carried
    /// into the next dictionary). The checker runs use 30 s, to be read
    /// between two boundaries.
    #[arg(long, default_value = "10s", value_parser = crate::config::duration)]
    interval: Duration,
    /// Interval boundaries each run crosses under load.
    #[arg(long, default_value_t = 3)]
    boundaries: u32,
    /// A small, fast run; the numbers are not meant to be quoted.
    #[arg(long)]
    quick: bool,
    /// Scratch directory (default: a new temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// The heartbeat period of the fleet.
const PERIOD: Duration = Duration::from_secs(5);

/// One instance's figures over the measured stretch.
#[derive(Debug, Default, Clone)]
struct Instance {
    partitions: f64,
    sessions: f64,
    heartbeats: f64,
    writes: f64,
    conflicts: f64,
    rss_empty: u64,
    /// Resident memory: the handlers' at the end of their run; the
    /// checkers' mean between boundaries.
    rss: u64,
    /// A checker's highest reading, at the boundary's peak.
    rss_peak: u64,
    /// The heartbeats a checker's sessions sent while it was read.
    sent: f64,
}

/// Each process's value of the metric `key` (0 while it has none).
async fn each(procs: &[Proc], key: &str) -> anyhow::Result<Vec<f64>> {
    let mut v = Vec::with_capacity(procs.len());
    for p in procs {
        v.push(p.metrics().await?.get(key).copied().unwrap_or(0.0));
    }
    Ok(v)
}

/// Waits until the processes serve `total` partitions between them (their
/// gauge `key`), each some of them.
async fn until_divided(procs: &[Proc], key: &str, total: f64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held = each(procs, key).await?;
        if held.iter().sum::<f64>() == total && held.iter().all(|&p| p > 0.0) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "partitions not divided: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One figure per process, with its resident memory before any session.
fn empty_figures(procs: &[Proc]) -> anyhow::Result<Vec<Instance>> {
    procs
        .iter()
        .map(|p| {
            Ok(Instance {
                rss_empty: rss_bytes(p.pid()?)?,
                ..Instance::default()
            })
        })
        .collect()
}

/// Counters read from one handler's metrics.
fn counters(m: &std::collections::BTreeMap<String, f64>) -> (f64, f64, f64) {
    let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
    (
        get(r#"headcount_heartbeats_total{result="accepted"}"#),
        get(r#"headcount_kv_writes_total{result="ok"}"#),
        get(r#"headcount_kv_writes_total{result="conflict"}"#),
    )
}

pub async fn run(mut a: ScaleArgs, headcount: &Path) -> anyhow::Result<()> {
    if a.quick {
        a.sessions = a.sessions.min(3_000);
        a.boundaries = a.boundaries.min(1);
        a.instances.retain(|&n| n <= 2);
        a.checkers.retain(|&n| n <= 2);
    }
    anyhow::ensure!(
        a.instances.iter().all(|&n| n >= 1),
        "--instances: at least one handler per run"
    );
    anyhow::ensure!(
        a.checkers.iter().all(|&n| n >= 1),
        "--checkers: at least one checker per run"
    );
    let (dir, _scratch) = scratch_dir(a.dir.as_deref())?;
    println!(
        "bench scale: {} sessions in {} accounts, one heartbeat each per {:?}, interval {:?}, {} boundaries per run",
        a.sessions,
        a.sessions.div_ceil(a.devices_per_account),
        PERIOD,
        a.interval,
        a.boundaries
    );
    let mut results = Vec::new();
    for &n in &a.instances {
        let r = one(&a, &dir.join(format!("h{n}")), headcount, n)
            .await
            .with_context(|| format!("run with {n} handlers"))?;
        report(n, &r, a.sessions);
        results.push((n, r));
    }
    summary(&results, a.sessions);
    let mut results = Vec::new();
    for &n in &a.checkers {
        let r = checkers(&a, &dir.join(format!("c{n}")), headcount, n)
            .await
            .with_context(|| format!("run with {n} checkers"))?;
        report_checkers(n, &r, a.sessions);
        results.push((n, r));
    }
    checkers_summary(&results, a.sessions);
    Ok(())
}

/// Checkers per partition, as `headcount checker` holds them by default.
const COPIES: usize = checker::DEFAULT_COPIES;

/// The fleet against one handler and `n` checkers: what each checker holds
/// and what it costs once every session is loaded and heard.
async fn checkers(
    a: &ScaleArgs,
    dir: &Path,
    headcount: &Path,
    n: usize,
) -> anyhow::Result<Vec<Instance>> {
    std::fs::create_dir_all(dir)?;
    let env = Env::start(dir, headcount).await?;
    // The checkers are read like `bench all` reads one: between two
    // boundaries of a 30 s interval, and at the boundary's peak.
    let interval = MEMORY_INTERVAL;
    let no_limit = (a.devices_per_account * 2).to_string();
    let mut handler = env.service(
        "handler",
        &["--interval", interval, "--max-heartbeat-rate", "1000000000"],
    )?;
    handler.wait_up("handler").await?;
    let args = [
        "--interval",
        interval,
        "--timeout",
        "1h",
        "--default-limit",
        no_limit.as_str(),
    ];
    let mut checkers: Vec<Proc> = Vec::new();
    for _ in 0..n {
        let mut c = env.service("checker", &args)?;
        c.wait_up("checker").await?;
        checkers.push(c);
    }
    let copies = COPIES.min(n) as f64;
    let partitions = f64::from(headcount_protocol::partition::PARTITIONS);
    until_divided(
        &checkers,
        "headcount_checker_partitions",
        partitions * copies,
    )
    .await?;
    let mut figures = empty_figures(&checkers)?;
    let client = env.client("bench-fleet").await?;
    let run = &nuid::next().to_string()[..6];
    let subjects = session_subjects(run, a.sessions, a.devices_per_account)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        publish_paced(&client, &subjects, PERIOD).await?;
        let held = each(&checkers, "headcount_active_sessions").await?;
        if held.iter().sum::<f64>() >= a.sessions as f64 * copies {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not every session loaded: {held:?}"
        );
    }
    // Every session beating on from just after a boundary, while the
    // checkers' memory is sampled (every session moves on to the new
    // interval's dictionary, then the checkers hold it between boundaries).
    let pids = checkers
        .iter()
        .map(Proc::pid)
        .collect::<Result<Vec<_>, _>>()?;
    let rounds = if a.quick { 2 } else { ACROSS_ROUNDS };
    wait_for_boundary().await;
    let hb0 = each(&checkers, "headcount_checker_heartbeats_total").await?;
    let rss = rss_while_beating(&pids, &client, &subjects, PERIOD, rounds).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let hb1 = each(&checkers, "headcount_checker_heartbeats_total").await?;
    for (i, (f, c)) in figures.iter_mut().zip(&checkers).enumerate() {
        let m = c.metrics().await?;
        f.partitions = m
            .get("headcount_checker_partitions")
            .copied()
            .unwrap_or(0.0);
        f.sessions = m.get("headcount_active_sessions").copied().unwrap_or(0.0);
        f.heartbeats = hb1[i] - hb0[i];
        f.sent = f64::from(rounds) * f.sessions;
        (f.rss, f.rss_peak) = between_and_peak(&rss[i]);
    }
    for c in checkers {
        c.stop().await;
    }
    handler.stop().await;
    Ok(figures)
}

fn report_checkers(n: usize, figures: &[Instance], sessions: usize) {
    println!();
    println!("{n} checker(s), {COPIES} per partition");
    println!(
        "{:<10} {:>10} {:>10} {:>8} {:>8} {:>10} {:>12} {:>12} {:>12}",
        "instance",
        "partitions",
        "sessions",
        "share",
        "heard",
        "RSS MiB",
        "loaded MiB",
        "peak MiB",
        "B/session"
    );
    for (i, f) in figures.iter().enumerate() {
        let loaded = f.rss.saturating_sub(f.rss_empty);
        let heard = f.heartbeats / f.sent.max(1.0);
        println!(
            "{:<10} {:>10} {:>10} {:>7.1}% {:>7.1}% {:>10.1} {:>12.1} {:>12.1} {:>12.0}{}",
            i,
            f.partitions,
            f.sessions,
            100.0 * f.sessions / sessions as f64,
            100.0 * heard,
            f.rss as f64 / MIB,
            loaded as f64 / MIB,
            f.rss_peak.saturating_sub(f.rss_empty) as f64 / MIB,
            loaded as f64 / f.sessions.max(1.0),
            if heard < BEHIND { " (behind)" } else { "" },
        );
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// Below this share of its sessions' heartbeats heard while it was read, a
/// checker is marked as behind: its buffers hold the backlog, and its
/// memory includes them.
const BEHIND: f64 = 0.98;

/// The largest checker of each run next to the single checker's: resident
/// memory loaded minus empty, between boundaries and at the boundary's
/// peak.
fn checkers_summary(results: &[(usize, Vec<Instance>)], sessions: usize) {
    if results.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<10} {:>12} {:>16} {:>12} {:>16} {:>12}",
        "checkers", "max share", "max loaded MiB", "vs fewest", "max peak MiB", "vs fewest"
    );
    let max_of = |fs: &[Instance], rss: fn(&Instance) -> u64| {
        fs.iter()
            .map(|f| rss(f).saturating_sub(f.rss_empty))
            .max()
            .unwrap_or(0) as f64
    };
    let between = |f: &Instance| f.rss;
    let peak = |f: &Instance| f.rss_peak;
    let (between0, peak0) = results
        .first()
        .map(|(_, fs)| (max_of(fs, between), max_of(fs, peak)))
        .unwrap_or_default();
    // A ratio to a base under a MiB is noise (a small run): not shown.
    let ratio = |x: f64, base: f64| {
        if base < MIB {
            "-".to_string()
        } else {
            format!("{:.2}x", x / base)
        }
    };
    for (n, fs) in results {
        let share = fs.iter().map(|f| f.sessions).fold(0.0, f64::max) / sessions as f64;
        println!(
            "{:<10} {:>11.1}% {:>16.1} {:>12} {:>16.1} {:>12}",
            n,
            100.0 * share,
            max_of(fs, between) / MIB,
            ratio(max_of(fs, between), between0),
            max_of(fs, peak) / MIB,
            ratio(max_of(fs, peak), peak0),
        );
    }
}

async fn one(
    a: &ScaleArgs,
    dir: &Path,
    headcount: &Path,
    n: usize,
) -> anyhow::Result<Vec<Instance>> {
    std::fs::create_dir_all(dir)?;
    let env = Env::start(dir, headcount).await?;
    let interval = format!("{}s", a.interval.as_secs());
    let args = [
        "--interval",
        interval.as_str(),
        "--max-heartbeat-rate",
        "1000000000",
    ];
    let mut handlers: Vec<Proc> = Vec::new();
    for _ in 0..n {
        let mut h = env.service("handler", &args)?;
        h.wait_up("handler").await?;
        handlers.push(h);
    }
    // Every partition served, by every instance its share.
    let partitions = f64::from(headcount_protocol::partition::PARTITIONS);
    until_divided(&handlers, "headcount_handler_partitions", partitions).await?;
    let mut figures = empty_figures(&handlers)?;

    let client = env.client("bench-fleet").await?;
    let run = &nuid::next().to_string()[..6];
    let subjects = session_subjects(run, a.sessions, a.devices_per_account)?;
    // Every session joins, then beats steadily.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        publish_paced(&client, &subjects, PERIOD).await?;
        let held = each(&handlers, "headcount_handler_sessions").await?;
        if held.iter().sum::<f64>() >= a.sessions as f64 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "not every session joined");
    }
    // The measured stretch starts just after a boundary and ends just
    // after the last one, so it holds `boundaries` carries of every session.
    let interval_ms = a.interval.as_millis() as u64;
    let to_boundary = interval_ms - headcount_protocol::now_millis() % interval_ms;
    let start_in = Duration::from_millis(to_boundary) + Duration::from_millis(500);
    let pace = tokio::spawn({
        let (client, subjects) = (client.clone(), subjects.clone());
        let until = Instant::now() + start_in + a.interval * a.boundaries + PERIOD * 2;
        async move {
            while Instant::now() < until {
                publish_paced(&client, &subjects, PERIOD).await?;
            }
            anyhow::Ok(())
        }
    });
    tokio::time::sleep(start_in).await;
    let mut base = Vec::new();
    for h in &handlers {
        base.push(counters(&h.metrics().await?));
    }
    let began = Instant::now();
    tokio::time::sleep(a.interval * a.boundaries).await;
    // The last boundary's carries are written after the carry delay.
    tokio::time::sleep(PERIOD + Duration::from_secs(1)).await;
    for ((f, h), (hb0, w0, c0)) in figures.iter_mut().zip(&handlers).zip(&base) {
        let m = h.metrics().await?;
        let (hb, w, c) = counters(&m);
        f.partitions = m
            .get("headcount_handler_partitions")
            .copied()
            .unwrap_or(0.0);
        f.sessions = m.get("headcount_handler_sessions").copied().unwrap_or(0.0);
        f.heartbeats = hb - hb0;
        f.writes = w - w0;
        f.conflicts = c - c0;
        f.rss = rss_bytes(h.pid()?)?;
    }
    let took = began.elapsed();
    pace.await??;
    for h in handlers {
        h.stop().await;
    }
    println!("  measured over {:.1} s", took.as_secs_f64());
    Ok(figures)
}

fn report(n: usize, figures: &[Instance], sessions: usize) {
    println!();
    println!("{n} handler(s)");
    println!(
        "{:<10} {:>10} {:>10} {:>8} {:>12} {:>10} {:>10} {:>12} {:>10} {:>12}",
        "instance",
        "partitions",
        "sessions",
        "share",
        "heartbeats",
        "writes",
        "conflicts",
        "writes/hb",
        "RSS MiB",
        "B/session"
    );
    for (i, f) in figures.iter().enumerate() {
        let per_session = if f.sessions > 0.0 {
            (f.rss.saturating_sub(f.rss_empty)) as f64 / f.sessions
        } else {
            0.0
        };
        println!(
            "{:<10} {:>10} {:>10} {:>7.1}% {:>12} {:>10} {:>10} {:>12.5} {:>10.1} {:>12.0}",
            i,
            f.partitions,
            f.sessions,
            100.0 * f.sessions / sessions as f64,
            f.heartbeats,
            f.writes,
            f.conflicts,
            f.writes / f.heartbeats.max(1.0),
            f.rss as f64 / MIB,
            per_session,
        );
    }
}

/// Totals per run, next to the run with the fewest instances.
fn summary(results: &[(usize, Vec<Instance>)], sessions: usize) {
    println!();
    println!(
        "{:<10} {:>12} {:>12} {:>12} {:>14} {:>14} {:>16}",
        "handlers",
        "max share",
        "writes/hb",
        "vs fewest",
        "conflicts",
        "max RSS MiB",
        "sessions held"
    );
    let per_hb = |fs: &[Instance]| {
        let w: f64 = fs.iter().map(|f| f.writes).sum();
        let hb: f64 = fs.iter().map(|f| f.heartbeats).sum();
        w / hb.max(1.0)
    };
    let first = results.first().map(|(_, fs)| per_hb(fs)).unwrap_or(0.0);
    for (n, fs) in results {
        let held: f64 = fs.iter().map(|f| f.sessions).sum();
        let share = fs.iter().map(|f| f.sessions).fold(0.0, f64::max) / sessions as f64;
        let writes: f64 = fs.iter().map(|f| f.writes).sum();
        let conflicts: f64 = fs.iter().map(|f| f.conflicts).sum();
        let rss = fs.iter().map(|f| f.rss).max().unwrap_or(0);
        println!(
            "{:<10} {:>11.1}% {:>12.5} {:>11.2}x {:>13.2}% {:>14.1} {:>16}",
            n,
            100.0 * share,
            per_hb(fs),
            per_hb(fs) / first.max(f64::MIN_POSITIVE),
            100.0 * conflicts / (writes + conflicts).max(1.0),
            rss as f64 / MIB,
            held,
        );
    }
}
