//! `headcount-bench callout`: how fast a legitimate device connects while
//! another host floods the auth callout with bad tokens.
//!
//! One nats-server (the repository's configuration, auth callout on), a
//! checker (it creates the buckets) and a token-vendor, each its own
//! process. A legitimate device connects from 127.0.0.1 with a good token,
//! one connection after another; the flood comes from 127.0.0.2 (another
//! loopback address, so that the callout sees another host): raw NATS
//! CONNECTs carrying forged tokens (a real header and claims, a wrong
//! signature, so each one costs a full signature check unless it is shed),
//! at a fixed rate for a fixed time, at most [`MAX_IN_FLIGHT`] at once.
//! Three runs: no flood; a flood with the callout's per-host shedding off
//! (`--callout-refusal-limit off`); a flood with the default shedding.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::measure::{Dist, dist, ms};
use crate::procs::{Env, Proc, free_port, nats_version};

/// Garbage connections in flight at most; the flood skips (and counts) a
/// connection rather than queue beyond it.
const MAX_IN_FLIGHT: usize = 512;
/// Where the flood comes from: a loopback address other than the device's.
const FLOOD_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// What a device's connect p99 under the flood, with shedding, must stay under.
const TARGET_P99: Duration = Duration::from_millis(50);
const OPERATOR_KEY: &str = "bench-callout-operator-key";

#[derive(Debug, Args)]
pub struct CalloutArgs {
    /// Garbage connects per second during a flood.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// How long each flood lasts, in seconds (at most 120).
    #[arg(long, default_value_t = 15)]
    flood_secs: u64,
    /// Connects of the legitimate device per run (at most 2000), spread over
    /// the flood.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// Scratch directory (default: a new temporary directory).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

/// One run's numbers.
#[derive(Debug, Default)]
struct Run {
    connects: Dist,
    samples: usize,
    failed: usize,
    flood: FloodCount,
    /// The vendor's callout results during the run, by result label.
    callout: Vec<(String, f64)>,
    vendor_cpu: f64,
    vendor_log_lines: usize,
}

#[derive(Debug, Default, Clone, Copy)]
struct FloodCount {
    sent: u64,
    refused: u64,
    other: u64,
    skipped: u64,
}

pub async fn run(a: CalloutArgs, headcount: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(a.rate > 0, "--rate must be positive");
    anyhow::ensure!(
        (2..=120).contains(&a.flood_secs),
        "--flood-secs must be 2 to 120"
    );
    anyhow::ensure!(
        (1..=2000).contains(&a.samples),
        "--samples must be 1 to 2000"
    );
    check_flood_source().await?;
    let (base, _scratch) = crate::procs::scratch_dir(a.dir.as_deref())?;
    let env = Env::start(&base.join("nats"), headcount).await?;
    let mut checker = env.service("checker", &[])?;
    checker.wait_up("checker").await?;
    let nats_addr: SocketAddr = env
        .url
        .trim_start_matches("nats://")
        .parse()
        .context("nats url")?;

    println!(
        "headcount-bench callout: {} cores, nats-server {}; device from 127.0.0.1, \
         flood of {}/s forged tokens from {FLOOD_SOURCE} for {} s",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        nats_version(),
        a.rate,
        a.flood_secs
    );
    let mut rows = Vec::new();
    for (name, flood, extra) in [
        ("no flood", false, vec![]),
        (
            "flood, shedding off",
            true,
            vec!["--callout-refusal-limit", "off"],
        ),
        ("flood, shedding on (default)", true, vec![]),
    ] {
        eprintln!("bench callout: {name} ...");
        let run = one_run(&a, &env, &base, nats_addr, flood, &extra)
            .await
            .with_context(|| format!("run {name:?}"))?;
        rows.push((name, run));
    }
    checker.stop().await;

    println!();
    println!(
        "| run | device connects | p50 | p99 | max | flood sent / refused / other / skipped | vendor CPU s | vendor log lines |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, r) in &rows {
        let failed = if r.failed > 0 {
            format!(" ({} failed)", r.failed)
        } else {
            String::new()
        };
        println!(
            "| {name} | {}{failed} | {} | {} | {} | {} / {} / {} / {} | {:.2} | {} |",
            r.samples,
            ms(r.connects.p50),
            ms(r.connects.p99),
            ms(r.connects.max),
            r.flood.sent,
            r.flood.refused,
            r.flood.other,
            r.flood.skipped,
            r.vendor_cpu,
            r.vendor_log_lines
        );
    }
    println!();
    for (name, r) in &rows {
        let results: Vec<String> = r
            .callout
            .iter()
            .filter(|(_, v)| *v > 0.0)
            .map(|(k, v)| format!("{k}={v:.0}"))
            .collect();
        println!("callout results, {name}: {}", results.join(", "));
    }
    if let Some((_, shed)) = rows.last() {
        let verdict = if shed.connects.p99 < TARGET_P99 {
            "met"
        } else {
            "NOT met"
        };
        println!(
            "target: device connect p99 < {} under the flood, with shedding: {verdict} ({})",
            ms(TARGET_P99),
            ms(shed.connects.p99)
        );
    }
    Ok(())
}

/// Fails early, with a reason, where 127.0.0.2 is not a local address.
async fn check_flood_source() -> anyhow::Result<()> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::new(FLOOD_SOURCE.into(), 0))
        .with_context(|| {
            format!("binding {FLOOD_SOURCE}: the flood needs a second loopback address (Linux has 127.0.0.0/8)")
        })
}

/// A token-vendor process, with its log in `dir/vendor.log`.
async fn start_vendor(env: &Env, dir: &Path, extra: &[&str]) -> anyhow::Result<(Proc, String)> {
    std::fs::create_dir_all(dir)?;
    let port = free_port()?;
    let http = format!("http://127.0.0.1:{port}");
    let log = std::fs::File::create(dir.join("vendor.log"))?;
    let mut cmd = tokio::process::Command::new(&env.headcount);
    cmd.arg("token-vendor")
        .args(env.nats_args())
        .args(["--operator-key", OPERATOR_KEY])
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .env("RUST_LOG", "info")
        .kill_on_drop(true);
    for (k, v) in env.env() {
        cmd.env(k, v);
    }
    let proc = Proc {
        child: cmd.spawn()?,
        metrics: Some(format!("{http}/metrics")),
        stdout: None,
        log: Some(dir.join("vendor.log")),
    };
    proc.wait_metrics("token-vendor up", |m| {
        m.keys().any(|k| k.starts_with("headcount_callout_total"))
    })
    .await?;
    Ok((proc, http))
}

/// A device token from the vendor's HTTP API.
async fn device_token(http: &str) -> anyhow::Result<String> {
    let reply: headcount_protocol::wire::TokenReply = reqwest::Client::new()
        .post(format!("{http}/v1/tokens"))
        .bearer_auth(OPERATOR_KEY)
        .json(&serde_json::json!({"account": "bench-callout", "device": "legit"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(reply.token)
}

/// `token` with its signature replaced: a known key id and valid claims,
/// so the vendor checks the signature before refusing it.
fn forged(token: &str) -> String {
    let (signed, _) = token.rsplit_once('.').unwrap_or((token, ""));
    format!("{signed}.{}", "A".repeat(86))
}

async fn device_connect(url: &str, token: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let client = async_nats::ConnectOptions::with_token(token.to_string())
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await?;
    let took = start.elapsed();
    drop(client);
    Ok(took)
}

async fn one_run(
    a: &CalloutArgs,
    env: &Env,
    base: &Path,
    nats_addr: SocketAddr,
    flood: bool,
    extra: &[&str],
) -> anyhow::Result<Run> {
    let dir = base.join(format!("vendor-{}", nuid::next()));
    let (vendor, http) = start_vendor(env, &dir, extra).await?;
    let token = device_token(&http).await?;
    // The callout answers once the vendor has subscribed: wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while device_connect(&env.url, &token).await.is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the device cannot connect: is the callout up?"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..10 {
        device_connect(&env.url, &token).await?; // warm-up
    }
    let before = vendor.metrics().await?;
    let lines_before = log_lines(&dir);
    let cpu_before = cpu_seconds(vendor.pid()?)?;

    let flood_task = flood.then(|| {
        let garbage = forged(&token);
        let (rate, secs) = (a.rate, a.flood_secs);
        tokio::spawn(async move { run_flood(nats_addr, &garbage, rate, secs).await })
    });
    // Under a flood: start once it is going, stop before it ends, spread
    // the samples over what is between.
    let (lead, window) = if flood {
        let window = Duration::from_secs(a.flood_secs) - Duration::from_millis(1500);
        (Duration::from_secs(1), window)
    } else {
        (Duration::ZERO, Duration::ZERO)
    };
    tokio::time::sleep(lead).await;
    let every = window / a.samples as u32;
    let start = Instant::now();
    let mut times = Vec::with_capacity(a.samples);
    let mut failed = 0;
    for i in 0..a.samples {
        let at = start + every * i as u32;
        if flood && Instant::now() > start + window {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        match device_connect(&env.url, &token).await {
            Ok(t) => times.push(t),
            Err(e) => {
                failed += 1;
                if failed == 1 {
                    eprintln!("bench callout: a device connect failed: {e:#}");
                }
            }
        }
    }
    let flood = match flood_task {
        Some(task) => task.await??,
        None => FloodCount::default(),
    };
    let after = vendor.metrics().await?;
    let callout = after
        .iter()
        .filter_map(|(k, v)| {
            let label = k
                .strip_prefix("headcount_callout_total{result=\"")?
                .strip_suffix("\"}")?;
            Some((label.to_string(), v - before.get(k).copied().unwrap_or(0.0)))
        })
        .collect();
    let vendor_cpu = cpu_seconds(vendor.pid()?)? - cpu_before;
    vendor.stop().await;
    Ok(Run {
        samples: times.len(),
        connects: dist(times),
        failed,
        flood,
        callout,
        vendor_cpu,
        vendor_log_lines: log_lines(&dir).saturating_sub(lines_before),
    })
}

/// User and system CPU time of process `pid` so far (Linux).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .context("reading /proc (CPU figures need Linux)")?;
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> f64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0.0) };
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 here; the
    // kernel counts them in USER_HZ, 100 on Linux.
    Ok((ticks(11) + ticks(12)) / 100.0)
}

fn log_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("vendor.log")).map_or(0, |s| s.lines().count())
}

/// Opens `rate` connections a second for `secs` from [`FLOOD_SOURCE`], each
/// presenting `token`, and counts how they ended.
async fn run_flood(
    server: SocketAddr,
    token: &str,
    rate: u32,
    secs: u64,
) -> anyhow::Result<FloodCount> {
    let connect = Arc::new(format!(
        "CONNECT {}\r\nPING\r\n",
        serde_json::json!({
            "verbose": false,
            "pedantic": false,
            "auth_token": token,
            "name": "bench-flood",
            "lang": "raw",
            "version": "0",
            "protocol": 1,
        })
    ));
    let counts = Arc::new([
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    ]);
    let (sent, refused, other, skipped) = (0, 1, 2, 3);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let every = Duration::from_secs(1) / rate;
    let total = u64::from(rate) * secs;
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        tokio::time::sleep_until(start + every * i as u32).await;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            counts[skipped].fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (connect, counts) = (connect.clone(), counts.clone());
        counts[sent].fetch_add(1, Ordering::Relaxed);
        tasks.spawn(async move {
            let outcome =
                tokio::time::timeout(Duration::from_secs(5), garbage_connect(server, &connect))
                    .await;
            let slot_index = match outcome {
                Ok(Ok(true)) => refused,
                _ => other,
            };
            counts[slot_index].fetch_add(1, Ordering::Relaxed);
            drop(slot);
        });
        // Reap finished tasks as we go, so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let get = |i: usize| counts[i].load(Ordering::Relaxed);
    Ok(FloodCount {
        sent: get(sent),
        refused: get(refused),
        other: get(other),
        skipped: get(skipped),
    })
}

/// One raw NATS connection from [`FLOOD_SOURCE`] sending `connect`; true
/// when the server refused it (`-ERR`).
async fn garbage_connect(server: SocketAddr, connect: &str) -> anyhow::Result<bool> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::new(IpAddr::V4(FLOOD_SOURCE), 0))?;
    let stream = socket.connect(server).await?;
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    stream.read_line(&mut line).await?; // INFO
    anyhow::ensure!(line.starts_with("INFO"), "no INFO: {line:?}");
    stream.get_mut().write_all(connect.as_bytes()).await?;
    line.clear();
    stream.read_line(&mut line).await?;
    Ok(line.starts_with("-ERR"))
}
