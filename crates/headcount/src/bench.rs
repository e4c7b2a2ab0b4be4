//! `headcount bench`: measures headcount next to bare NATS on the same
//! machine, in one run.
//!
//! `bench all` starts, per session count, its own nats-server (the repo's
//! configuration) and runs each component as its own process (this binary's
//! `handler`, `checker`, and hidden `bench sink` / `bench echo` baselines),
//! so that resident memory is per process and the baselines pay the same
//! process and connection costs as the services. `bench freshness` measures
//! a running `headcount up`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Subcommand};
use futures::StreamExt;
use headcount_protocol::subjects::{self, endpoint, endpoint_subject};
use headcount_protocol::wire::{ActiveReply, Heartbeat};
use headcount_protocol::{AccountId, DeviceId, SessionId};
use tokio::io::AsyncBufReadExt;

use crate::config::NatsArgs;

#[path = "bench_callout.rs"]
mod callout;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchKind,
}

#[derive(Debug, Subcommand)]
enum BenchKind {
    /// Everything, in one run: ingest next to a bare subscriber, KV write
    /// amplification, check/active latency and throughput next to a bare
    /// echo responder, freshness, memory per session, at each session count.
    All(AllArgs),
    /// Steady load for a while, with memory and latency reported at every
    /// step: resident memory must stay flat.
    Soak(SoakArgs),
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

#[derive(Debug, Args)]
pub struct AllArgs {
    /// Session counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    sessions: Vec<usize>,
    /// Devices per account.
    #[arg(long, default_value_t = 10)]
    devices_per_account: usize,
    /// Heartbeats published in each ingest run (at least one per session).
    #[arg(long, default_value_t = 1_000_000)]
    heartbeats: usize,
    /// Seconds of each throughput run.
    #[arg(long, default_value_t = 5)]
    throughput_secs: u64,
    /// Sessions and seconds of the steady-state KV-write run (5 s heartbeat).
    #[arg(long, default_value_t = 10_000)]
    steady_sessions: usize,
    #[arg(long, default_value_t = 35)]
    steady_secs: u64,
    /// A small, fast run (seconds) that exercises every measurement; the
    /// numbers are not meant to be quoted.
    #[arg(long)]
    quick: bool,
    /// Also write the results as a Markdown table here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Scratch directory (default: a new temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Sessions heartbeating every 5 s throughout.
    #[arg(long, default_value_t = 100_000)]
    sessions: usize,
    /// Devices per account.
    #[arg(long, default_value_t = 10)]
    devices_per_account: usize,
    /// How long to run (e.g. 10m).
    #[arg(long, default_value = "10m", value_parser = crate::config::humantime_secs)]
    duration: Duration,
    /// How often to report (e.g. 1m).
    #[arg(long, default_value = "1m", value_parser = crate::config::humantime_secs)]
    every: Duration,
    /// Each step, this share of the sessions leaves and is replaced by new
    /// ones (churn), in percent.
    #[arg(long, default_value_t = 5)]
    churn_percent: usize,
    /// Scratch directory (default: a new temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    match a.what {
        BenchKind::Soak(a) => soak(a).await,
        BenchKind::Freshness { samples, nats } => {
            let client = nats.options("headcount-bench")?.connect().await?;
            let f = freshness(&client, samples).await?;
            println!("freshness over {samples} sessions (poll interval 0.5 ms)");
            println!("{:<28} {:>10} {:>10} {:>10}", "", "p50", "p99", "max");
            for (name, d) in [
                ("first heartbeat -> active", &f.join),
                ("leave -> seat free", &f.leave),
            ] {
                println!(
                    "{name:<28} {:>10} {:>10} {:>10}",
                    ms(d.p50),
                    ms(d.p99),
                    ms(d.max)
                );
            }
            Ok(())
        }
        BenchKind::Sink {
            subject,
            expect,
            nats,
        } => sink(&nats, &subject, expect).await,
        BenchKind::Echo { subject, nats } => echo(&nats, &subject).await,
        BenchKind::All(a) => all(a).await,
        BenchKind::Callout(a) => callout::run(a).await,
    }
}

// ---------- small helpers ----------

#[derive(Debug, Clone, Copy, Default)]
struct Dist {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn dist(mut v: Vec<Duration>) -> Dist {
    v.sort();
    let at = |p: f64| {
        if v.is_empty() {
            Duration::ZERO
        } else {
            v[(((v.len() - 1) as f64) * p).round() as usize]
        }
    };
    Dist {
        p50: at(0.50),
        p99: at(0.99),
        max: v.last().copied().unwrap_or_default(),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}ms", d.as_secs_f64() * 1000.0)
}

fn us(d: Duration) -> String {
    format!("{:.0}µs", d.as_secs_f64() * 1e6)
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("reading /proc (memory figures need Linux)")?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/<pid>/status")?;
    Ok(kb * 1024)
}

/// Resident memory once it has settled after a burst: sampled every second
/// until it stops falling (at most `max` seconds).
async fn settled_rss(pid: u32, max: u64) -> anyhow::Result<u64> {
    let mut last = rss_bytes(pid)?;
    for _ in 0..max {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = rss_bytes(pid)?;
        if now + now / 200 >= last {
            return Ok(now.min(last));
        }
        last = now;
    }
    Ok(last)
}

/// One ~100-byte heartbeat payload.
fn payload(seq: u64) -> Bytes {
    Heartbeat {
        seq: Some(seq),
        content: Some("catalogue/series-0042/episode-07".into()),
        kind: Some("web".into()),
        region: Some("eu-west-1".into()),
        leave: false,
    }
    .encode()
    .into()
}

/// The account of a heartbeat subject and a `check` request for its first
/// device, as the latency measurements send it.
fn check_request(subject: &str) -> anyhow::Result<(String, Bytes)> {
    let account = subjects::parse_heartbeat_ref(subject)?.account.to_string();
    let body = serde_json::to_vec(&serde_json::json!({"account": account, "device": "device-0"}))?;
    Ok((account, Bytes::from(body)))
}

/// Subjects of `sessions` sessions spread over accounts.
fn session_subjects(run: &str, sessions: usize, per_account: usize) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::with_capacity(sessions);
    for i in 0..sessions {
        let account = AccountId::parse(&format!("b{run}-{}", i / per_account))?;
        // Ids of realistic length: a device name, a 22-character session
        // id (the length of a NUID).
        let device = DeviceId::parse(&format!("device-{}", i % per_account))?;
        let session = SessionId::parse(&format!("{run}{i:016}"))?;
        out.push(subjects::heartbeat(&account, &device, &session));
    }
    Ok(out)
}

/// Publishes `n` heartbeats round-robin over `subjects` as fast as the
/// client takes them; returns when all are flushed to the server.
async fn publish_all(
    client: &async_nats::Client,
    subjects: &[String],
    n: usize,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let p = payload(1);
    for i in 0..n {
        let s = &subjects[i % subjects.len()];
        client.publish(s.clone(), p.clone()).await?;
    }
    client.flush().await?;
    Ok(start.elapsed())
}

/// The interval of the memory measurement (see `at_size`).
const MEMORY_INTERVAL: &str = "30s";

/// Sleeps until just after the next boundary of a `MEMORY_INTERVAL` interval.
async fn wait_for_boundary() {
    let ms = 30_000;
    let now = headcount_protocol::now_millis();
    let next = (now / ms + 1) * ms + 500;
    tokio::time::sleep(Duration::from_millis(next - now)).await;
}

/// One heartbeat per session spread evenly over `period`, as a fleet with
/// that heartbeat period sends them (the steady state, no burst).
async fn publish_paced(
    client: &async_nats::Client,
    subjects: &[String],
    period: Duration,
) -> anyhow::Result<()> {
    let p = payload(1);
    let slices = 50usize;
    let per_slice = subjects.len().div_ceil(slices);
    let mut tick = tokio::time::interval(period / slices as u32);
    for chunk in subjects.chunks(per_slice.max(1)) {
        tick.tick().await;
        for s in chunk {
            client.publish(s.clone(), p.clone()).await?;
        }
        client.flush().await?;
    }
    Ok(())
}

/// Publishes `n` heartbeats like [`publish_all`], but never more than
/// `window` ahead of what the consumer reports processed, so that a consumer
/// slower than the publisher is measured at its own pace instead of being
/// overrun (the server would drop what no buffer holds).
async fn publish_windowed(
    client: &async_nats::Client,
    subjects: &[String],
    n: usize,
    window: usize,
    mut processed: impl AsyncFnMut() -> anyhow::Result<u64>,
) -> anyhow::Result<()> {
    let p = payload(1);
    let chunk = (window / 4).max(1);
    let mut sent = 0usize;
    while sent < n {
        while sent as u64 > processed().await? + (window - chunk) as u64 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let end = (sent + chunk).min(n);
        for i in sent..end {
            client
                .publish(subjects[i % subjects.len()].clone(), p.clone())
                .await?;
        }
        client.flush().await?;
        sent = end;
    }
    Ok(())
}

// ---------- baselines (run as child processes) ----------

async fn sink(nats: &NatsArgs, subject: &str, expect: u64) -> anyhow::Result<()> {
    let client = nats.options("headcount-bench-sink")?.connect().await?;
    let mut sub = client.subscribe(subject.to_string()).await?;
    client.flush().await?;
    println!("ready");
    let mut count = 0u64;
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(3), sub.next()).await {
            Ok(Some(_)) => {
                count += 1;
                last = Instant::now();
                first.get_or_insert(last);
                if count == expect {
                    break;
                }
                if count.is_multiple_of(10_000) {
                    println!("count {count}");
                }
            }
            Ok(None) => break,
            Err(_) if first.is_some() => break, // idle: the publisher is done
            Err(_) => {}
        }
    }
    let secs = first.map_or(0.0, |f| (last - f).as_secs_f64());
    println!("{{\"count\":{count},\"secs\":{secs}}}");
    Ok(())
}

async fn echo(nats: &NatsArgs, subject: &str) -> anyhow::Result<()> {
    let client = nats.options("headcount-bench-echo")?.connect().await?;
    let mut sub = client.subscribe(subject.to_string()).await?;
    client.flush().await?;
    println!("ready");
    // About the size of a check reply.
    let reply = Bytes::from_static(
        br#"{"allowed":true,"active":1,"limit":1000,"policy":"evict-oldest","evicted":[]}"#,
    );
    while let Some(msg) = sub.next().await {
        if let Some(r) = msg.reply {
            client.publish(r, reply.clone()).await?;
        }
    }
    Ok(())
}

// ---------- the processes of one run ----------

struct Proc {
    child: tokio::process::Child,
    metrics: Option<String>,
    stdout: Option<tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>>,
}

impl Proc {
    fn spawn(
        args: &[String],
        env: &[(&str, &str)],
        metrics: Option<String>,
    ) -> anyhow::Result<Proc> {
        let exe = std::env::current_exe()?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .env("RUST_LOG", "warn")
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let stdout = child
            .stdout
            .take()
            .map(|s| tokio::io::BufReader::new(s).lines());
        Ok(Proc {
            child,
            metrics,
            stdout,
        })
    }

    fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("process gone")
    }

    async fn line(&mut self) -> anyhow::Result<String> {
        let lines = self.stdout.as_mut().context("no stdout")?;
        tokio::time::timeout(Duration::from_secs(120), lines.next_line())
            .await
            .context("child said nothing for 120 s")??
            .context("child exited")
    }

    async fn metrics(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let url = self.metrics.as_deref().context("no metrics")?;
        let text = reqwest::get(url).await?.text().await?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect())
    }

    async fn wait_metrics(
        &self,
        what: &str,
        pred: impl Fn(&BTreeMap<String, f64>) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Ok(m) = self.metrics().await
                && pred(&m)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{what}: not reached in 600 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a handler or checker is ready: its `/readyz` (next to
    /// its `/metrics`, which it serves from the start) answers 200 once it
    /// is connected, has replayed the buckets and is serving.
    async fn wait_up(&self, which: &str) -> anyhow::Result<()> {
        let metrics = self.metrics.as_deref().context("no metrics")?;
        let url = format!("{}/readyz", metrics.trim_end_matches("/metrics"));
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{which} up: not ready in 600 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a handler serves metrics and hears heartbeats: its
    /// metrics appear before its subscription does, and heartbeats published
    /// in between would be lost. It publishes a heartbeat with an invalid
    /// account name (counted `invalid`, recorded nowhere) until the handler
    /// has counted one.
    async fn wait_handler(&self, nats: &async_nats::Client) -> anyhow::Result<()> {
        self.wait_up("handler").await?;
        let probe = format!(
            "hb.{}.bench.probe",
            "x".repeat(headcount_protocol::names::MAX_NAME_LEN + 1)
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            nats.publish(probe.clone(), bytes::Bytes::new()).await?;
            nats.flush().await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let m = self.metrics().await?;
            if m.get(r#"headcount_heartbeats_total{result="invalid"}"#)
                .copied()
                .unwrap_or(0.0)
                >= 1.0
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the handler did not hear heartbeats within 60 s");
            }
        }
    }

    async fn stop(mut self) {
        crate::up::terminate(&mut self.child, Duration::from_secs(15)).await;
    }
}

fn sum_prefix(m: &BTreeMap<String, f64>, prefix: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

/// A nats-server and the credentials to reach it.
struct Env {
    nats: crate::up::NatsProcess,
    url: String,
    password: String,
    dir: PathBuf,
}

impl Env {
    async fn start(dir: &Path) -> anyhow::Result<Env> {
        std::fs::create_dir_all(dir)?;
        let secrets = crate::up::load_secrets(dir)?;
        let issuer = token_vendor::Issuer::open(dir)?;
        let port = free_port()?;
        let keys = crate::up::CalloutKeys::of(&issuer);
        let launch = crate::up::Launch {
            secrets: &secrets,
            keys: Some(&keys),
            bind: std::net::Ipv4Addr::LOCALHOST.into(),
        };
        let nats = crate::up::NatsProcess::start(dir, (port, free_port()?), launch).await?;
        Ok(Env {
            nats,
            url: format!("nats://127.0.0.1:{port}"),
            password: secrets.service_password.clone(),
            dir: dir.to_path_buf(),
        })
    }

    fn nats_args(&self) -> Vec<String> {
        vec![
            "--nats-url".into(),
            self.url.clone(),
            "--nats-user".into(),
            "headcount".into(),
            "--data-dir".into(),
            self.dir.display().to_string(),
        ]
    }

    fn env(&self) -> Vec<(&'static str, &str)> {
        vec![("HEADCOUNT_NATS_PASSWORD", self.password.as_str())]
    }

    async fn client(&self, name: &str) -> anyhow::Result<async_nats::Client> {
        headcount_runtime::NatsOptions {
            urls: vec![self.url.clone()],
            user: Some("headcount".into()),
            password: Some(self.password.clone()),
            name: name.into(),
        }
        .connect()
        .await
    }

    fn service(&self, which: &str, extra: &[&str]) -> anyhow::Result<Proc> {
        let port = free_port()?;
        let mut args = vec![which.to_string()];
        args.extend(self.nats_args());
        args.extend(["--metrics-addr".into(), format!("127.0.0.1:{port}")]);
        args.extend(extra.iter().map(|s| s.to_string()));
        Proc::spawn(
            &args,
            &self.env(),
            Some(format!("http://127.0.0.1:{port}/metrics")),
        )
    }

    async fn baseline(&self, kind: &str, extra: &[String]) -> anyhow::Result<Proc> {
        let mut args = vec!["bench".to_string(), kind.to_string()];
        args.extend(self.nats_args());
        args.extend(extra.iter().cloned());
        let mut p = Proc::spawn(&args, &self.env(), None)?;
        let ready = p.line().await?;
        anyhow::ensure!(ready == "ready", "{kind} said {ready:?}");
        Ok(p)
    }
}

// ---------- measurements ----------

#[derive(Debug, Default, Clone)]
struct Ingest {
    sent: usize,
    bare_rate: f64,
    bare_lost: u64,
    handler_rate: f64,
    handler_lost: u64,
    kv_writes: f64,
    join_secs: f64,
}

#[derive(Debug, Default, Clone)]
struct Latency {
    one: BTreeMap<&'static str, Dist>,
    throughput: BTreeMap<&'static str, f64>,
}

#[derive(Debug, Default, Clone)]
struct Memory {
    handler: f64,
    checker: f64,
}

#[derive(Debug, Clone)]
struct Fresh {
    join: Dist,
    leave: Dist,
}

#[derive(Debug, Default)]
struct Steady {
    sessions: usize,
    heartbeats: f64,
    writes: f64,
    interval_secs: u64,
}

async fn one_by_one(
    client: &async_nats::Client,
    subject: &str,
    body: Bytes,
    n: usize,
) -> anyhow::Result<Dist> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n.min(200) {
        client.request(subject.to_string(), body.clone()).await?; // warm-up
    }
    for _ in 0..n {
        let t = Instant::now();
        let r = client.request(subject.to_string(), body.clone()).await?;
        times.push(t.elapsed());
        anyhow::ensure!(
            r.headers.is_none(),
            "error reply from {subject}: {:?}",
            r.payload
        );
    }
    Ok(dist(times))
}

async fn concurrent(
    client: &async_nats::Client,
    subject: &str,
    body: Bytes,
    clients: usize,
    secs: u64,
) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, subject, body, done) = (
            client.clone(),
            subject.to_string(),
            body.clone(),
            done.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                if client.request(subject.clone(), body.clone()).await.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / secs as f64)
}

async fn freshness(client: &async_nats::Client, samples: usize) -> anyhow::Result<Fresh> {
    async fn until(
        client: &async_nats::Client,
        account: &AccountId,
        start: Instant,
        want: u32,
    ) -> anyhow::Result<Duration> {
        let body = Bytes::from(serde_json::to_vec(
            &serde_json::json!({ "account": account }),
        )?);
        loop {
            let msg = client
                .request(endpoint_subject(endpoint::ACTIVE), body.clone())
                .await?;
            let r: ActiveReply =
                serde_json::from_slice(&msg.payload).context("unreadable active reply")?;
            if r.active == want {
                return Ok(start.elapsed());
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(10),
                "not seen within 10 s"
            );
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    let run = nuid::next().to_string();
    let (mut joins, mut leaves) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let account = AccountId::parse(&format!("fresh-{}-{i}", &run[..8]))?;
        let session = SessionId::parse(&nuid::next().to_string())?;
        let subject = subjects::heartbeat(&account, &DeviceId::parse("d")?, &session);
        let start = Instant::now();
        client
            .publish(subject.clone(), Heartbeat::default().encode().into())
            .await?;
        client.flush().await?;
        joins.push(until(client, &account, start, 1).await?);
        let leave = Heartbeat {
            leave: true,
            ..Default::default()
        };
        let start = Instant::now();
        client.publish(subject, leave.encode().into()).await?;
        client.flush().await?;
        leaves.push(until(client, &account, start, 0).await?);
    }
    Ok(Fresh {
        join: dist(joins),
        leave: dist(leaves),
    })
}

/// One session count: ingest (bare, then handler), memory, latency.
async fn at_size(
    a: &AllArgs,
    dir: &Path,
    sessions: usize,
) -> anyhow::Result<(Ingest, Memory, Latency)> {
    let env = Env::start(dir).await?;
    let publisher = env.client("bench-publisher").await?;
    let run = &nuid::next().to_string()[..6];
    let subjects = session_subjects(run, sessions, a.devices_per_account)?;
    let n = a.heartbeats.max(sessions);
    let mut ingest = Ingest {
        sent: n,
        ..Default::default()
    };

    // Bare: a subscriber that only counts.
    let mut sink = env
        .baseline(
            "sink",
            &[
                "--subject".into(),
                subjects::HEARTBEAT_WILDCARD.into(),
                "--expect".into(),
                n.to_string(),
            ],
        )
        .await?;
    let mut lines = sink.stdout.take().context("sink stdout")?;
    let seen = Arc::new(AtomicU64::new(0));
    let (final_tx, final_rx) = tokio::sync::oneshot::channel::<String>();
    let reader = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(c) = line.strip_prefix("count ") {
                    seen.store(c.parse().unwrap_or(0), Ordering::Relaxed);
                } else {
                    let _ = final_tx.send(line);
                    return;
                }
            }
        })
    };
    // Below the subscription buffer (65536 messages) of both consumers.
    let window = 50_000;
    publish_windowed(&publisher, &subjects, n, window, async || {
        Ok(seen.load(Ordering::Relaxed))
    })
    .await?;
    let line = tokio::time::timeout(Duration::from_secs(120), final_rx)
        .await
        .context("sink did not finish")??;
    reader.abort();
    let v: serde_json::Value = serde_json::from_str(&line)?;
    let count = v["count"].as_u64().unwrap_or(0);
    ingest.bare_rate = count as f64 / v["secs"].as_f64().unwrap_or(f64::MAX).max(1e-9);
    ingest.bare_lost = n as u64 - count;
    sink.stop().await;

    // The checker's memory with nothing loaded.
    // A 30 s interval, so that the memory figures below include an interval
    // boundary: the steady state, where every session has moved on from the
    // previous interval's dictionary to the current one.
    let checker_args = [
        "--timeout",
        "1h",
        "--default-limit",
        "10000",
        "--interval",
        MEMORY_INTERVAL,
    ];
    let checker = env.service("checker", &checker_args)?;
    checker.wait_up("checker").await?;
    let checker_empty = rss_bytes(checker.pid()?)?;
    checker.stop().await;

    // The handler, for ingest (the default interval).
    let handler = env.service("handler", &["--max-heartbeat-rate", "1000000000"])?;
    handler.wait_handler(&publisher).await?;
    // Every session joins first (one heartbeat each, written to KV): the
    // ingest rate below is the steady state, where sessions are known.
    let join_start = Instant::now();
    let processed = async || -> anyhow::Result<u64> {
        let m = handler.metrics().await?;
        Ok(sum_prefix(&m, "headcount_heartbeats_total") as u64)
    };
    publish_windowed(&publisher, &subjects, sessions, window, processed).await?;
    handler
        .wait_metrics("handler recorded every session", |m| {
            m.get("headcount_handler_sessions").copied().unwrap_or(0.0) >= sessions as f64
        })
        .await?;
    ingest.join_secs = join_start.elapsed().as_secs_f64();
    ingest.kv_writes = handler
        .metrics()
        .await?
        .get(r#"headcount_kv_writes_total{result="ok"}"#)
        .copied()
        .unwrap_or(0.0);
    let base = sum_prefix(&handler.metrics().await?, "headcount_heartbeats_total");
    let start = Instant::now();
    let processed = async || -> anyhow::Result<u64> {
        let m = handler.metrics().await?;
        Ok((sum_prefix(&m, "headcount_heartbeats_total") - base) as u64)
    };
    publish_windowed(&publisher, &subjects, n, window, processed).await?;
    let n_f = n as f64;
    handler
        .wait_metrics("handler processed every heartbeat", |m| {
            sum_prefix(m, "headcount_heartbeats_total") - base >= n_f
        })
        .await
        .or_else(|e| {
            // Report what was lost rather than stopping.
            eprintln!("bench: {e:#}");
            Ok::<(), anyhow::Error>(())
        })?;
    let took = start.elapsed();
    let m = handler.metrics().await?;
    let processed = sum_prefix(&m, "headcount_heartbeats_total") - base;
    ingest.handler_rate = processed / took.as_secs_f64();
    ingest.handler_lost = (n_f - processed).max(0.0) as u64;
    handler.stop().await;
    // Its dictionaries go, so the next handler starts from nothing.
    async_nats::jetstream::new(publisher.clone())
        .delete_key_value(headcount_protocol::subjects::kv::SESSIONS_BUCKET)
        .await
        .map_err(|e| anyhow::anyhow!("clearing the sessions bucket: {e}"))?;

    // A fresh handler for memory, with a 30 s interval: the sessions join
    // at a steady 5 s heartbeat (no burst whose buffers would be counted),
    // then an interval boundary passes and every session moves on to the
    // new interval's dictionary: the steady state.
    let handler = env.service(
        "handler",
        &[
            "--max-heartbeat-rate",
            "1000000000",
            "--interval",
            MEMORY_INTERVAL,
        ],
    )?;
    handler.wait_handler(&publisher).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let handler_empty = rss_bytes(handler.pid()?)?;
    publish_paced(&publisher, &subjects, Duration::from_secs(5)).await?;
    handler
        .wait_metrics("handler recorded every session", |m| {
            m.get("headcount_handler_sessions").copied().unwrap_or(0.0) >= sessions as f64
        })
        .await?;
    wait_for_boundary().await;
    publish_paced(&publisher, &subjects, Duration::from_secs(5)).await?;
    tokio::time::sleep(Duration::from_secs(4)).await; // the carry-over delay
    let handler_full = settled_rss(handler.pid()?, 20).await?;

    // The checker with every session loaded and heard.
    let checker = env.service("checker", &checker_args)?;
    checker
        .wait_metrics("checker loaded every session", |m| {
            m.get("headcount_active_sessions").copied().unwrap_or(0.0) >= sessions as f64
        })
        .await?;
    // Steady state: each session heard once, at a 5 s heartbeat period.
    publish_paced(&publisher, &subjects, Duration::from_secs(5)).await?;
    let checker_full = settled_rss(checker.pid()?, 20).await?;
    let memory = Memory {
        handler: handler_full.saturating_sub(handler_empty) as f64 / sessions as f64,
        checker: checker_full.saturating_sub(checker_empty) as f64 / sessions as f64,
    };

    // Latency: the checker next to a bare echo responder.
    let echo = env
        .baseline("echo", &["--subject".into(), "bench.echo".into()])
        .await?;
    let client = env.client("bench-client").await?;
    let (one_account, check_body) = check_request(&subjects[0])?;
    let active_body = Bytes::from(serde_json::to_vec(
        &serde_json::json!({"account": one_account}),
    )?);
    let reps = if a.quick { 300 } else { 5000 };
    let mut latency = Latency::default();
    latency.one.insert(
        "echo",
        one_by_one(&client, "bench.echo", check_body.clone(), reps).await?,
    );
    latency.one.insert(
        "check",
        one_by_one(
            &client,
            &endpoint_subject(endpoint::CHECK),
            check_body.clone(),
            reps,
        )
        .await?,
    );
    latency.one.insert(
        "active",
        one_by_one(
            &client,
            &endpoint_subject(endpoint::ACTIVE),
            active_body.clone(),
            reps,
        )
        .await?,
    );
    let secs = a.throughput_secs;
    latency.throughput.insert(
        "echo",
        concurrent(&client, "bench.echo", check_body.clone(), 50, secs).await?,
    );
    latency.throughput.insert(
        "check",
        concurrent(
            &client,
            &endpoint_subject(endpoint::CHECK),
            check_body.clone(),
            50,
            secs,
        )
        .await?,
    );
    latency.throughput.insert(
        "active",
        concurrent(
            &client,
            &endpoint_subject(endpoint::ACTIVE),
            active_body,
            50,
            secs,
        )
        .await?,
    );

    echo.stop().await;
    checker.stop().await;
    handler.stop().await;
    env.nats.stop().await;
    Ok((ingest, memory, latency))
}

/// Steady state at a 5 s heartbeat: KV writes per heartbeat, and freshness.
async fn steady(a: &AllArgs, dir: &Path) -> anyhow::Result<(Steady, Fresh)> {
    let env = Env::start(dir).await?;
    let interval = if a.quick { 6 } else { 30 };
    let secs = if a.quick { 8 } else { a.steady_secs };
    let interval_arg = format!("{interval}s");
    let handler = env.service("handler", &["--interval", &interval_arg])?;
    let checker = env.service(
        "checker",
        &["--interval", &interval_arg, "--default-limit", "10000"],
    )?;
    let publisher = env.client("bench-publisher").await?;
    handler.wait_handler(&publisher).await?;
    checker.wait_up("checker").await?;
    let run = &nuid::next().to_string()[..6];
    let sessions = if a.quick { 500 } else { a.steady_sessions };
    let subjects = session_subjects(run, sessions, a.devices_per_account)?;

    // Joining: one beat each, then wait until recorded.
    publish_all(&publisher, &subjects, sessions).await?;
    handler
        .wait_metrics("sessions recorded", |m| {
            m.get("headcount_handler_sessions").copied().unwrap_or(0.0) >= sessions as f64
        })
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = handler.metrics().await?;
    // Steady: every session beats every 5 s, spread evenly.
    let period = Duration::from_secs(5);
    let slots = 50u32;
    let mut tick = tokio::time::interval(period / slots);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut slot = 0usize;
    let p = payload(2);
    while Instant::now() < until {
        tick.tick().await;
        for s in subjects.iter().skip(slot).step_by(slots as usize) {
            publisher.publish(s.clone(), p.clone()).await?;
        }
        slot = (slot + 1) % slots as usize;
    }
    publisher.flush().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = handler.metrics().await?;
    let writes = |m: &BTreeMap<String, f64>| {
        m.get(r#"headcount_kv_writes_total{result="ok"}"#)
            .copied()
            .unwrap_or(0.0)
    };
    let hbs = |m: &BTreeMap<String, f64>| {
        m.get(r#"headcount_heartbeats_total{result="accepted"}"#)
            .copied()
            .unwrap_or(0.0)
    };
    let steady = Steady {
        sessions,
        heartbeats: hbs(&after) - hbs(&before),
        writes: writes(&after) - writes(&before),
        interval_secs: interval,
    };
    let fresh = freshness(&publisher, if a.quick { 30 } else { 300 }).await?;
    checker.stop().await;
    handler.stop().await;
    env.nats.stop().await;
    Ok((steady, fresh))
}

async fn all(mut a: AllArgs) -> anyhow::Result<()> {
    if a.quick {
        a.sessions = vec![2_000];
        a.heartbeats = 20_000;
        a.throughput_secs = 1;
    }
    let tmp = tempfile::tempdir()?;
    let base = a.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let mut out = String::new();
    let mut line = |s: String| {
        println!("{s}");
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "headcount bench all{}: {} cores, nats-server {}",
        if a.quick { " --quick" } else { "" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        nats_version()
    ));
    line(String::new());

    let (steady, fresh) = steady(&a, &base.join("steady")).await?;
    line("### KV write amplification (steady state, 5 s heartbeat)".into());
    line(String::new());
    line("| sessions | interval | heartbeats | KV writes | writes per heartbeat |".into());
    line("|---|---|---|---|---|".into());
    line(format!(
        "| {} | {} s | {:.0} | {:.0} | {:.4} |",
        steady.sessions,
        steady.interval_secs,
        steady.heartbeats,
        steady.writes,
        steady.writes / steady.heartbeats.max(1.0)
    ));
    line(String::new());
    line("### Freshness".into());
    line(String::new());
    line("| | p50 | p99 | max |".into());
    line("|---|---|---|---|".into());
    line(format!(
        "| first heartbeat -> in `active` | {} | {} | {} |",
        ms(fresh.join.p50),
        ms(fresh.join.p99),
        ms(fresh.join.max)
    ));
    line(format!(
        "| `leave` -> seat free | {} | {} | {} |",
        ms(fresh.leave.p50),
        ms(fresh.leave.p99),
        ms(fresh.leave.max)
    ));
    line(String::new());

    let mut rows = Vec::new();
    for &s in &a.sessions {
        eprintln!("bench: {s} sessions ...");
        let r = at_size(&a, &base.join(format!("s{s}")), s).await?;
        rows.push((s, r));
    }
    line("### Ingest (heartbeats per second, 100-byte payloads)".into());
    line(String::new());
    line("| sessions | heartbeats | bare subscriber | heartbeat-handler | ratio | lost (bare / handler) | joining every session | KV writes to record them |".into());
    line("|---|---|---|---|---|---|---|---|".into());
    for (s, (i, _, _)) in &rows {
        line(format!(
            "| {s} | {} | {:.0}/s | {:.0}/s | {:.0}% | {} / {} | {:.1} s ({:.0}/s) | {:.0} ({:.3} per session) |",
            i.sent,
            i.bare_rate,
            i.handler_rate,
            100.0 * i.handler_rate / i.bare_rate.max(1.0),
            i.bare_lost,
            i.handler_lost,
            i.join_secs,
            *s as f64 / i.join_secs.max(1e-9),
            i.kv_writes,
            i.kv_writes / *s as f64
        ));
    }
    line(String::new());
    line("### Request latency (one client) and throughput (50 concurrent clients)".into());
    line(String::new());
    line("| sessions | bare echo p50 / p99 | check p50 / p99 | active p50 / p99 | check p99 vs bare | echo req/s | check req/s | active req/s | check vs bare |".into());
    line("|---|---|---|---|---|---|---|---|---|".into());
    for (s, (_, _, l)) in &rows {
        let d = |k: &str| l.one.get(k).copied().unwrap_or_default();
        let t = |k: &str| l.throughput.get(k).copied().unwrap_or_default();
        line(format!(
            "| {s} | {} / {} | {} / {} | {} / {} | {:.2}x | {:.0} | {:.0} | {:.0} | {:.0}% |",
            us(d("echo").p50),
            us(d("echo").p99),
            us(d("check").p50),
            us(d("check").p99),
            us(d("active").p50),
            us(d("active").p99),
            d("check").p99.as_secs_f64() / d("echo").p99.as_secs_f64().max(1e-9),
            t("echo"),
            t("check"),
            t("active"),
            100.0 * t("check") / t("echo").max(1.0)
        ));
    }
    line(String::new());
    line("### Memory per active session (resident, loaded minus empty)".into());
    line(String::new());
    line("| sessions | heartbeat-handler | checker |".into());
    line("|---|---|---|".into());
    for (s, (_, m, _)) in &rows {
        line(format!("| {s} | {:.0} B | {:.0} B |", m.handler, m.checker));
    }
    if let Some(path) = &a.markdown {
        std::fs::write(path, &out).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn nats_version() -> String {
    std::process::Command::new("nats-server")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "?".into())
}

// ---------- soak ----------

/// One report of the soak run.
#[derive(Debug)]
struct SoakStep {
    at: Duration,
    handler_rss: u64,
    checker_rss: u64,
    check: Dist,
    heartbeats: f64,
    lost: u64,
    active: f64,
}

async fn soak(a: SoakArgs) -> anyhow::Result<()> {
    let tmp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let env = Env::start(&dir).await?;
    let handler = env.service("handler", &["--max-heartbeat-rate", "1000000000"])?;
    let checker = env.service("checker", &["--default-limit", "10000"])?;
    checker.wait_up("checker").await?;
    let publisher = env.client("soak-publisher").await?;
    handler.wait_handler(&publisher).await?;
    let client = env.client("soak-client").await?;
    let run = nuid::next().to_string()[..6].to_string();
    let mut subjects = session_subjects(&run, a.sessions, a.devices_per_account)?;
    let mut next_id = a.sessions;
    let (_, check_body) = check_request(&subjects[0])?;
    println!(
        "soak: {} sessions at a 5 s heartbeat, {}% replaced every {:?}, for {:?}",
        a.sessions, a.churn_percent, a.every, a.duration
    );
    println!(
        "{:>8} {:>12} {:>12} {:>10} {:>10} {:>12} {:>8} {:>10}",
        "time",
        "handler RSS",
        "checker RSS",
        "check p50",
        "check p99",
        "heartbeats/s",
        "lost",
        "active"
    );
    let start = Instant::now();
    let mut steps: Vec<SoakStep> = Vec::new();
    let mut published = 0u64;
    let processed = async || -> anyhow::Result<f64> {
        Ok(sum_prefix(
            &handler.metrics().await?,
            "headcount_heartbeats_total",
        ))
    };
    let mut last_processed = processed().await?;
    let mut step_start = Instant::now();
    while start.elapsed() < a.duration {
        let step_end = step_start + a.every;
        // Heartbeats for every session, 5 s apart, until the step ends.
        while Instant::now() + Duration::from_millis(4_500) <= step_end
            && start.elapsed() < a.duration
        {
            publish_paced(&publisher, &subjects, Duration::from_secs(5)).await?;
            published += subjects.len() as u64;
        }
        // Churn: some sessions leave, as many new ones join.
        let n = subjects.len() * a.churn_percent / 100;
        let leave: Bytes = Heartbeat {
            leave: true,
            ..Default::default()
        }
        .encode()
        .into();
        for i in 0..n {
            let victim = (i * 7919 + next_id) % subjects.len();
            publisher
                .publish(subjects[victim].clone(), leave.clone())
                .await?;
            published += 1;
            let session = SessionId::parse(&format!("{run}{next_id:016}"))?;
            next_id += 1;
            let ids = subjects::parse_heartbeat(&subjects[victim])?;
            subjects[victim] = subjects::heartbeat(&ids.account, &ids.device, &session);
        }
        publisher.flush().await?;
        let wait = step_end.saturating_duration_since(Instant::now());
        tokio::time::sleep(wait).await;
        let now_processed = processed().await?;
        let secs = step_start.elapsed().as_secs_f64();
        let check = one_by_one(
            &client,
            &endpoint_subject(endpoint::CHECK),
            check_body.clone(),
            300,
        )
        .await?;
        let active = checker
            .metrics()
            .await?
            .get("headcount_active_sessions")
            .copied()
            .unwrap_or(0.0);
        let step = SoakStep {
            at: start.elapsed(),
            handler_rss: rss_bytes(handler.pid()?)?,
            checker_rss: rss_bytes(checker.pid()?)?,
            check,
            heartbeats: (now_processed - last_processed) / secs,
            lost: published.saturating_sub(now_processed as u64),
            active,
        };
        println!(
            "{:>7.0}s {:>9.1} MB {:>9.1} MB {:>10} {:>10} {:>12.0} {:>8} {:>10.0}",
            step.at.as_secs_f64(),
            step.handler_rss as f64 / 1e6,
            step.checker_rss as f64 / 1e6,
            us(step.check.p50),
            us(step.check.p99),
            step.heartbeats,
            step.lost,
            step.active
        );
        steps.push(step);
        last_processed = now_processed;
        step_start = Instant::now();
    }
    if let (Some(first), Some(last)) = (steps.get(1).or(steps.first()), steps.last()) {
        let growth = |a: u64, b: u64| (b as f64 - a as f64) / a.max(1) as f64 * 100.0;
        println!(
            "memory from the second report to the last: handler {:+.1}%, checker {:+.1}%",
            growth(first.handler_rss, last.handler_rss),
            growth(first.checker_rss, last.checker_rss)
        );
    }
    checker.stop().await;
    handler.stop().await;
    env.nats.stop().await;
    Ok(())
}
