//! `headcount-bench all`: every measurement in one run. First the steady
//! state at a 5 s heartbeat (KV writes per heartbeat, freshness), then, per
//! session count, on a nats-server of its own: ingest of the heartbeat-handler
//! next to a bare subscriber (both fed by several publishers, whose own
//! ceiling is measured before and after them), the memory per session of handler and checker,
//! and `check` / `active` latency and throughput next to a bare echo
//! responder. Prints Markdown tables (docs/BENCHMARKS.md has a run).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use headcount_client::Client;
use headcount_protocol::subjects::{self, endpoint};

use crate::measure::{
    ACROSS_ROUNDS, Beats, Bodies, Dist, ECHO_SUBJECT, Fresh, MEMORY_INTERVAL, Publishers, Target,
    between_and_peak, concurrent, freshness, interleaved, ms, payload, publish_all, publish_paced,
    rss_while_beating, session_subjects, us, wait_for_boundary,
};
use crate::procs::{Env, Proc, nats_version, rss_bytes, sum_prefix};

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
    /// Ingest publishers, each a task on a NATS connection of its own
    /// (default: one per core, at least 2 and at most 4).
    #[arg(long, default_value_t = default_publishers(), value_parser = publisher_count)]
    publishers: usize,
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

/// One ingest publisher per core, at least 2 and at most 4: the server and
/// the consumer need the cores too.
fn default_publishers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4))
}

/// `--publishers`: 1 to 64.
fn publisher_count(s: &str) -> Result<usize, String> {
    match s.parse() {
        Ok(n @ 1..=64) => Ok(n),
        _ => Err(format!("not a number of publishers from 1 to 64: {s:?}")),
    }
}

/// A consumer that reaches this share of the publishers' ceiling is
/// measured against the publishers, not at its own pace.
const PUBLISHER_LIMITED: f64 = 0.9;

/// The heartbeat period of the memory runs.
const BEAT: Duration = Duration::from_secs(5);

#[derive(Debug, Default, Clone)]
struct Ingest {
    sent: usize,
    publishers: usize,
    /// The publishers' own rate when nothing consumes, measured before the
    /// bare subscriber runs and after the handler has stopped.
    ceilings: [f64; 2],
    bare_rate: f64,
    bare_lost: u64,
    handler_rate: f64,
    handler_lost: u64,
    kv_writes: f64,
    join_secs: f64,
    /// A whole `headcount up`: the slower of its handler and its checker.
    up_rate: f64,
    up_lost: u64,
}

impl Ingest {
    /// The publishers' ceiling: the better of its two measurements (a
    /// machine busy with something else only ever lowers it).
    fn ceiling(&self) -> f64 {
        self.ceilings[0].max(self.ceilings[1])
    }

    /// A consumer (bare, the handler, `up`) reached [`PUBLISHER_LIMITED`]
    /// of the publishers' ceiling: that rate is (or may be) the
    /// publishers', so a ratio of two says nothing about headcount.
    fn publisher_limited(&self) -> bool {
        let fastest = self.bare_rate.max(self.handler_rate).max(self.up_rate);
        fastest >= PUBLISHER_LIMITED * self.ceiling()
    }

    /// The handler's rate as a share of the bare subscriber's.
    fn ratio_cell(&self) -> String {
        self.cell(self.handler_rate)
    }

    /// The whole `up`'s rate as a share of the bare subscriber's.
    fn up_ratio_cell(&self) -> String {
        self.cell(self.up_rate)
    }

    /// `rate` as a share of the bare subscriber's for the report, with the
    /// flag when it means nothing.
    fn cell(&self, rate: f64) -> String {
        let ratio = format!("{:.0}%", 100.0 * rate / self.bare_rate.max(1.0));
        if self.publisher_limited() {
            format!("{ratio} (publisher-limited: ratio not meaningful)")
        } else {
            ratio
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Latency {
    one: BTreeMap<&'static str, Dist>,
    throughput: BTreeMap<&'static str, f64>,
}

#[derive(Debug, Default, Clone)]
struct Memory {
    handler: PerSession,
    checker: PerSession,
    /// The whole `headcount up` process.
    up: PerSession,
}

/// Resident memory per session, between boundaries and at the boundary's
/// peak, and the share of the heartbeats the process took meanwhile.
#[derive(Debug, Default, Clone, Copy)]
struct PerSession {
    between: f64,
    peak: f64,
    taken: f64,
}

#[derive(Debug, Default)]
struct Steady {
    sessions: usize,
    heartbeats: f64,
    writes: f64,
    interval_secs: u64,
}

/// Deletes the sessions bucket (the bench's services use one): the
/// dictionaries go, and the next service creates the bucket for its own
/// interval.
async fn clear_sessions(console: &async_nats::Client) -> anyhow::Result<()> {
    async_nats::jetstream::new(console.clone())
        .delete_key_value(subjects::kv::sessions_bucket(0))
        .await
        .map_err(|e| anyhow::anyhow!("clearing the sessions bucket: {e}"))?;
    Ok(())
}

/// The ingest load: the publishers, the sessions' heartbeats, how many to
/// send, and how far the publishers may run ahead of the consumer.
struct Load<'a> {
    publishers: &'a Publishers,
    beats: &'a Beats,
    sessions: usize,
    n: usize,
    window: Option<usize>,
}

/// What one process took of the ingest load.
struct Taken {
    /// Heartbeats per second, over the measured ones.
    rate: f64,
    /// Measured heartbeats it never took.
    lost: u64,
    /// How long every session took to join first.
    join_secs: f64,
    /// Its metrics once every session had joined.
    joined: BTreeMap<String, f64>,
}

impl Load<'_> {
    /// Ingest into `proc` (a handler, or a whole `up`): every session joins
    /// first (one heartbeat each, until every gauge of `held` counts them
    /// all), so that what is timed is the steady state, where sessions are
    /// known; then `n` heartbeats, timed until each of `counters` has
    /// taken every one. The slowest counter sets the pace.
    async fn feed(&self, proc: &Proc, counters: &[&str], held: &[&str]) -> anyhow::Result<Taken> {
        // Heartbeats taken since `base` (one count per counter), by the
        // slowest counter.
        let taken = async |base: &[f64]| -> anyhow::Result<f64> {
            let m = proc.metrics().await?;
            Ok(slowest(&m, counters, base))
        };
        // `n` heartbeats, the publishers held back by what is taken.
        let publish = async |n: usize, base: &[f64]| {
            self.publishers
                .windowed(self.beats, n, self.window, async || {
                    Ok(taken(base).await? as u64)
                })
                .await
        };
        let join_start = Instant::now();
        publish(self.sessions, &vec![0.0; counters.len()]).await?;
        let all = self.sessions as f64;
        proc.wait_metrics("every session recorded", |m| {
            held.iter()
                .all(|g| m.get(*g).copied().unwrap_or(0.0) >= all)
        })
        .await?;
        let join_secs = join_start.elapsed().as_secs_f64();
        let joined = proc.metrics().await?;
        let base: Vec<f64> = counters.iter().map(|c| sum_prefix(&joined, c)).collect();
        let start = Instant::now();
        publish(self.n, &base).await?;
        let n = self.n as f64;
        proc.wait_metrics("every heartbeat taken", |m| {
            slowest(m, counters, &base) >= n
        })
        .await
        .or_else(|e| {
            // Report what was lost rather than stopping.
            eprintln!("bench: {e:#}");
            Ok::<(), anyhow::Error>(())
        })?;
        let took = start.elapsed();
        let processed = taken(&base).await?;
        Ok(Taken {
            rate: processed / took.as_secs_f64(),
            lost: (n - processed).max(0.0) as u64,
            join_secs,
            joined,
        })
    }
}

/// The least any of `counters` (each summed over its labels) has counted
/// since its `base`.
fn slowest(m: &BTreeMap<String, f64>, counters: &[&str], base: &[f64]) -> f64 {
    counters
        .iter()
        .zip(base)
        .map(|(c, b)| sum_prefix(m, c) - b)
        .fold(f64::MAX, f64::min)
}

/// What a handler, and a checker, count of the heartbeats they take.
const HANDLED: &str = "headcount_heartbeats_total";
const HEARD: &str = "headcount_checker_heartbeats_total";

/// Resident memory of one process across an interval boundary.
#[derive(Debug, Default, Clone, Copy)]
struct Reading {
    /// The mean once the boundary's work is done.
    between: u64,
    /// The highest reading, the boundary's peak.
    peak: u64,
    /// The least share of the heartbeats sent meanwhile that one of the
    /// process's services took.
    taken: f64,
}

/// Below this share of the heartbeats taken while it was read, a process
/// is marked as having fallen behind.
const BEHIND: f64 = 0.98;

/// Reads `p` ([`rss_while_beating`]) from just after the next interval
/// boundary for [`ACROSS_ROUNDS`] heartbeat periods (`--quick`: two),
/// every session beating on. Prints beside it the share of the heartbeats
/// sent meanwhile that each of `counters` counted: a process that falls
/// behind holds the backlog in its buffers, and its figure includes them.
async fn across_boundary(
    a: &AllArgs,
    p: &Proc,
    what: &str,
    counters: &[&str],
    publisher: &async_nats::Client,
    subjects: &[String],
) -> anyhow::Result<Reading> {
    wait_for_boundary().await;
    let before = p.metrics().await?;
    let rounds = if a.quick { 2 } else { ACROSS_ROUNDS };
    let readings = rss_while_beating(&[p.pid()?], publisher, subjects, BEAT, rounds)
        .await?
        .remove(0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = p.metrics().await?;
    let sent = f64::from(rounds) * subjects.len() as f64;
    let shares: Vec<f64> = counters
        .iter()
        .map(|c| (sum_prefix(&after, c) - sum_prefix(&before, c)) / sent)
        .collect();
    let (between, peak) = between_and_peak(&readings);
    let reading = Reading {
        between,
        peak,
        taken: shares.iter().copied().fold(f64::INFINITY, f64::min),
    };
    let taken: Vec<String> = counters
        .iter()
        .zip(&shares)
        .map(|(c, share)| format!("{c} {:.1}%", share * 100.0))
        .collect();
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    eprintln!(
        "bench: {what} at {} sessions: {:.0} MiB resident between boundaries, {:.0} MiB at the \
         boundary's peak; of the heartbeats sent meanwhile: {}",
        subjects.len(),
        mib(reading.between),
        mib(reading.peak),
        taken.join(", ")
    );
    Ok(reading)
}

/// One session count: ingest (bare, then handler), memory, latency.
async fn at_size(
    a: &AllArgs,
    dir: &Path,
    headcount: &Path,
    sessions: usize,
) -> anyhow::Result<(Ingest, Memory, Latency)> {
    let env = Env::start(dir, headcount).await?;
    let publisher = env.client("bench-publisher").await?;
    let run = &nuid::next().to_string()[..6];
    let subjects = session_subjects(run, sessions, a.devices_per_account)?;
    let n = a.heartbeats.max(sessions);
    let mut ingest = Ingest {
        sent: n,
        publishers: a.publishers,
        ..Default::default()
    };

    // The ingest publishers, each on a connection of its own, and their own
    // ceiling: the rate the server takes their heartbeats at while nothing
    // subscribes to them (no consumer has started yet; measured again once
    // the handler has stopped).
    let mut clients = Vec::with_capacity(a.publishers);
    for k in 0..a.publishers {
        clients.push(env.publisher(&format!("bench-publisher-{k}")).await?);
    }
    let publishers = Publishers::new(clients);
    let beats = Beats::of(&subjects)?;
    ingest.ceilings[0] = publishers.ceiling(&beats, n).await?;

    // Bare: a subscriber that only counts.
    let mut sink = env
        .baseline(
            "sink",
            &[
                "--subject".into(),
                subjects::PARTITIONED_WILDCARD.into(),
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
    // All publishers together stay below the subscription buffer (65536
    // messages) of both consumers.
    let window = Some(50_000);
    publishers
        .windowed(&beats, n, window, async || Ok(seen.load(Ordering::Relaxed)))
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
    // previous interval's dictionary to the current one. No account is held
    // back: the largest limit accepted.
    let no_limit = headcount_protocol::policy::MAX_LIMIT.to_string();
    let checker_args = [
        "--timeout",
        "1h",
        "--default-limit",
        &no_limit,
        "--interval",
        MEMORY_INTERVAL,
    ];
    let mut checker = env.service("checker", &checker_args)?;
    checker.wait_up("checker").await?;
    let checker_empty = rss_bytes(checker.pid()?)?;
    checker.stop().await;
    // The checker made the sessions bucket for its interval; a service with
    // another interval refuses a bucket made for a different one.
    clear_sessions(&publisher).await?;

    // The handler, for ingest (the default interval).
    let mut handler = env.service("handler", &["--max-heartbeat-rate", "1000000000"])?;
    handler.wait_handler(&publisher).await?;
    let load = Load {
        publishers: &publishers,
        beats: &beats,
        sessions,
        n,
        window,
    };
    let taken = load
        .feed(&handler, &[HANDLED], &["headcount_handler_sessions"])
        .await?;
    ingest.handler_rate = taken.rate;
    ingest.handler_lost = taken.lost;
    ingest.join_secs = taken.join_secs;
    ingest.kv_writes = taken
        .joined
        .get(r#"headcount_kv_writes_total{result="ok"}"#)
        .copied()
        .unwrap_or(0.0);
    handler.stop().await;
    clear_sessions(&publisher).await?;

    // The whole `headcount up` process, the same way: its handler and the
    // checker it feeds both take every heartbeat (timed by the slower).
    let no_limit = headcount_protocol::policy::MAX_LIMIT.to_string();
    let mut up = env.up(&[
        "--max-heartbeat-rate",
        "1000000000",
        "--timeout",
        "1h",
        "--default-limit",
        &no_limit,
    ])?;
    up.wait_up("up").await?;
    let taken = load
        .feed(
            &up,
            &[HANDLED, HEARD],
            &["headcount_handler_sessions", "headcount_active_sessions"],
        )
        .await?;
    ingest.up_rate = taken.rate;
    ingest.up_lost = taken.lost;
    up.stop().await;
    ingest.ceilings[1] = publishers.ceiling(&beats, n).await?;
    drop(publishers);
    eprintln!(
        "bench: ingest at {sessions} sessions, {} publishers: ceiling {:.0}/s (before {:.0}/s, \
         after {:.0}/s), bare subscriber {:.0}/s, heartbeat-handler {:.0}/s, ratio {}, \
         whole up {:.0}/s, ratio {}",
        ingest.publishers,
        ingest.ceiling(),
        ingest.ceilings[0],
        ingest.ceilings[1],
        ingest.bare_rate,
        ingest.handler_rate,
        ingest.ratio_cell(),
        ingest.up_rate,
        ingest.up_ratio_cell()
    );
    // Its dictionaries go, so the next handler starts from nothing (and
    // makes the bucket again for its own interval).
    clear_sessions(&publisher).await?;

    // A fresh handler for memory, with a 30 s interval: the sessions join
    // at a steady 5 s heartbeat (no burst whose buffers would be counted),
    // then it is read across the next interval boundary, where every
    // session moves on to the new interval's dictionary, and after it
    // ([`across_boundary`]).
    let mut handler = env.service(
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
    publish_paced(&publisher, &subjects, BEAT).await?;
    handler
        .wait_metrics("handler recorded every session", |m| {
            m.get("headcount_handler_sessions").copied().unwrap_or(0.0) >= sessions as f64
        })
        .await?;
    let handler_full =
        across_boundary(a, &handler, "handler", &[HANDLED], &publisher, &subjects).await?;

    // The checker with every session loaded and heard.
    let mut checker = env.service("checker", &checker_args)?;
    checker.wait_up("checker").await?;
    checker
        .wait_metrics("checker loaded every session", |m| {
            m.get("headcount_active_sessions").copied().unwrap_or(0.0) >= sessions as f64
        })
        .await?;
    let checker_full =
        across_boundary(a, &checker, "checker", &[HEARD], &publisher, &subjects).await?;
    let per_session = |full: Reading, empty: u64| PerSession {
        between: full.between.saturating_sub(empty) as f64 / sessions as f64,
        peak: full.peak.saturating_sub(empty) as f64 / sessions as f64,
        taken: full.taken,
    };
    let mut memory = Memory {
        handler: per_session(handler_full, handler_empty),
        checker: per_session(checker_full, checker_empty),
        up: PerSession::default(),
    };

    // Latency: the checker next to a bare echo responder, which answers
    // the bytes of a `check`.
    let echo = env
        .baseline("echo", &["--subject".into(), ECHO_SUBJECT.into()])
        .await?;
    let client = env.client("bench-client").await?;
    let api = Client::new(client.clone());
    let bodies = Bodies::of(&subjects[0])?;
    let targets = [
        ("echo", Target::Bare(client, ECHO_SUBJECT), &bodies.check),
        (
            "check",
            Target::Endpoint(api.clone(), endpoint::CHECK),
            &bodies.check,
        ),
        (
            "active",
            Target::Endpoint(api, endpoint::ACTIVE),
            &bodies.active,
        ),
    ];
    let reps = if a.quick { 300 } else { 10_000 };
    let mut latency = Latency::default();
    let asks: Vec<(&Target, Bytes)> = targets
        .iter()
        .map(|(_, target, body)| (target, Bytes::clone(body)))
        .collect();
    let dists = interleaved(&asks, reps).await?;
    for ((name, _, _), d) in targets.iter().zip(dists) {
        latency.one.insert(name, d);
    }
    for (name, target, body) in &targets {
        let rate = concurrent(target, Bytes::clone(body), 50, a.throughput_secs).await?;
        latency.throughput.insert(name, rate);
    }

    echo.stop().await;
    checker.stop().await;
    handler.stop().await;

    // The whole `headcount up` process, the same way: every session joins
    // at a steady 5 s heartbeat, an interval boundary passes, and the
    // process is measured while the sessions keep beating.
    clear_sessions(&publisher).await?;
    let mut up = env.up(&checker_args)?;
    up.wait_up("up").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let up_empty = rss_bytes(up.pid()?)?;
    publish_paced(&publisher, &subjects, BEAT).await?;
    up.wait_metrics("up recorded and loaded every session", |m| {
        let has = |name: &str| m.get(name).copied().unwrap_or(0.0) >= sessions as f64;
        has("headcount_handler_sessions") && has("headcount_active_sessions")
    })
    .await?;
    let up_full = across_boundary(a, &up, "up", &[HANDLED, HEARD], &publisher, &subjects).await?;
    memory.up = per_session(up_full, up_empty);
    up.stop().await;
    env.nats.stop().await;
    Ok((ingest, memory, latency))
}

/// Steady state at a 5 s heartbeat: KV writes per heartbeat, and freshness.
async fn steady(a: &AllArgs, dir: &Path, headcount: &Path) -> anyhow::Result<(Steady, Fresh)> {
    let env = Env::start(dir, headcount).await?;
    let interval = if a.quick { 6 } else { 30 };
    let secs = if a.quick { 8 } else { a.steady_secs };
    let interval_arg = format!("{interval}s");
    let mut handler = env.service("handler", &["--interval", &interval_arg])?;
    let no_limit = headcount_protocol::policy::MAX_LIMIT.to_string();
    let mut checker = env.service(
        "checker",
        &["--interval", &interval_arg, "--default-limit", &no_limit],
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

/// The report: each line printed as it comes, and kept for `--markdown`.
#[derive(Debug, Default)]
struct Report {
    out: String,
}

impl Report {
    fn line(&mut self, s: impl Into<String>) {
        let s = s.into();
        println!("{s}");
        self.out.push_str(&s);
        self.out.push('\n');
    }

    /// Starts a section: after a blank line, its heading, a blank line and
    /// the head of its table, `header` and the rule under it.
    fn table(&mut self, title: &str, header: &str) {
        let columns = header.matches('|').count().saturating_sub(1);
        self.line("");
        self.line(format!("### {title}"));
        self.line("");
        self.line(header);
        self.line(format!("{}|", "|---".repeat(columns)));
    }
}

pub async fn run(mut a: AllArgs, headcount: &Path) -> anyhow::Result<()> {
    if a.quick {
        a.sessions = vec![2_000];
        a.heartbeats = 20_000;
        a.throughput_secs = 1;
    }
    let (base, _scratch) = crate::procs::scratch_dir(a.dir.as_deref())?;
    let mut report = Report::default();
    report.line(format!(
        "headcount-bench all{}: {} cores, nats-server {}, {} ingest publishers",
        if a.quick { " --quick" } else { "" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        nats_version(),
        a.publishers
    ));

    let (steady, fresh) = steady(&a, &base.join("steady"), headcount).await?;
    report.table(
        "KV write amplification (steady state, 5 s heartbeat)",
        "| sessions | interval | heartbeats | KV writes | writes per heartbeat |",
    );
    report.line(format!(
        "| {} | {} s | {:.0} | {:.0} | {:.4} |",
        steady.sessions,
        steady.interval_secs,
        steady.heartbeats,
        steady.writes,
        steady.writes / steady.heartbeats.max(1.0)
    ));
    report.table("Freshness", "| | p50 | p99 | max |");
    for (what, d) in [
        ("first heartbeat -> in `active`", &fresh.join),
        ("`leave` -> seat free", &fresh.leave),
    ] {
        report.line(format!(
            "| {what} | {} | {} | {} |",
            ms(d.p50),
            ms(d.p99),
            ms(d.max)
        ));
    }

    let mut rows = Vec::new();
    for &s in &a.sessions {
        eprintln!("bench: {s} sessions ...");
        let r = at_size(&a, &base.join(format!("s{s}")), headcount, s).await?;
        rows.push((s, r));
    }
    report.table(
        "Ingest (heartbeats per second, 100-byte payloads)",
        "| sessions | heartbeats | publishers | publisher ceiling | bare subscriber | heartbeat-handler | ratio | whole `headcount up` | ratio | lost (bare / handler / up) | joining every session | KV writes to record them |",
    );
    for (s, (i, _, _)) in &rows {
        report.line(format!(
            "| {s} | {} | {} | {:.0}/s | {:.0}/s ({:.0}%) | {:.0}/s ({:.0}%) | {} | {:.0}/s ({:.0}%) | {} | {} / {} / {} | {:.1} s ({:.0}/s) | {:.0} ({:.3} per session) |",
            i.sent,
            i.publishers,
            i.ceiling(),
            i.bare_rate,
            100.0 * i.bare_rate / i.ceiling().max(1.0),
            i.handler_rate,
            100.0 * i.handler_rate / i.ceiling().max(1.0),
            i.ratio_cell(),
            i.up_rate,
            100.0 * i.up_rate / i.ceiling().max(1.0),
            i.up_ratio_cell(),
            i.bare_lost,
            i.handler_lost,
            i.up_lost,
            i.join_secs,
            *s as f64 / i.join_secs.max(1e-9),
            i.kv_writes,
            i.kv_writes / *s as f64
        ));
    }
    report.line("");
    report.line(format!(
        "Publisher ceiling: the rate the server takes the publishers' heartbeats at while nothing \
         subscribes (the better of a run before the consumers and one after); in parentheses, each consumer's rate as a share of it. A row where either \
         consumer reaches {:.0}% of the ceiling is marked publisher-limited: there the \
         publishers, not the consumers, set the pace, and the ratio is not meaningful.",
        100.0 * PUBLISHER_LIMITED
    ));
    let limited: Vec<String> = rows
        .iter()
        .filter(|(_, (i, _, _))| i.publisher_limited())
        .map(|(s, _)| s.to_string())
        .collect();
    if !limited.is_empty() {
        report.line("");
        report.line(format!(
            "**publisher-limited: ratio not meaningful** at {} sessions (more `--publishers` or \
             more cores for them).",
            limited.join(", ")
        ));
    }
    report.table(
        "Request latency (one client) and throughput (50 concurrent clients)",
        "| sessions | bare echo p50 / p99 | check p50 / p99 | active p50 / p99 | check p99 vs bare | echo req/s | check req/s | active req/s | check vs bare |",
    );
    for (s, (_, _, l)) in &rows {
        let d = |k: &str| l.one.get(k).copied().unwrap_or_default();
        let t = |k: &str| l.throughput.get(k).copied().unwrap_or_default();
        report.line(format!(
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
    report.table(
        "Memory per active session (resident, loaded minus empty; between boundaries / at a boundary's peak)",
        "| sessions | heartbeat-handler | checker | whole `headcount up` process |",
    );
    for (s, (_, m, _)) in &rows {
        let cell = |m: PerSession| {
            let behind = if m.taken < BEHIND {
                format!(" (behind: took {:.0}%)", m.taken * 100.0)
            } else {
                String::new()
            };
            format!("{:.0} B / {:.0} B{behind}", m.between, m.peak)
        };
        report.line(format!(
            "| {s} | {} | {} | {} |",
            cell(m.handler),
            cell(m.checker),
            cell(m.up)
        ));
    }
    report.line("");
    report.line(format!(
        "A cell marked behind: while it was read, the process (one of its services, for `headcount up`) took less than {:.0}% of the heartbeats sent; its buffers held the backlog, and the figure includes them.",
        BEHIND * 100.0
    ));
    if let Some(path) = &a.markdown {
        std::fs::write(path, &report.out).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingest(ceiling: f64, bare_rate: f64, handler_rate: f64) -> Ingest {
        Ingest {
            ceilings: [ceiling, ceiling / 2.0],
            bare_rate,
            handler_rate,
            ..Default::default()
        }
    }

    #[test]
    fn a_consumer_near_the_ceiling_flags_the_ratio() {
        let free = ingest(500_000.0, 300_000.0, 240_000.0);
        assert!(!free.publisher_limited());
        assert_eq!(free.ratio_cell(), "80%");
        for limited in [
            ingest(300_000.0, 280_000.0, 200_000.0),
            ingest(300_000.0, 310_000.0, 200_000.0),
            ingest(300_000.0, 200_000.0, 275_000.0),
            Ingest {
                up_rate: 275_000.0,
                ..ingest(300_000.0, 200_000.0, 150_000.0)
            },
        ] {
            assert!(limited.publisher_limited());
            for cell in [limited.ratio_cell(), limited.up_ratio_cell()] {
                assert!(cell.ends_with("(publisher-limited: ratio not meaningful)"));
            }
        }
        let up = Ingest {
            up_rate: 210_000.0,
            ..free
        };
        assert_eq!(up.up_ratio_cell(), "70%");
    }
}
