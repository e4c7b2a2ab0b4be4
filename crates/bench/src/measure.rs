//! What the runs share: heartbeat subjects and payloads, publishers (as
//! fast as possible, paced like a fleet, or several connections windowed
//! behind a slower consumer, with their own ceiling), request latency and
//! throughput, freshness, percentiles.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use headcount_client::Client;
use headcount_protocol::subjects;
use headcount_protocol::wire::{AccountRequest, CheckRequest, Heartbeat};
use headcount_protocol::{AccountId, DeviceId, SessionId};

/// Median, 99th percentile and maximum of a set of durations.
#[derive(Debug, Clone, Copy, Default)]
pub struct Dist {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

pub fn dist(mut v: Vec<Duration>) -> Dist {
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

/// Milliseconds, two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2}ms", d.as_secs_f64() * 1000.0)
}

/// Whole microseconds.
pub fn us(d: Duration) -> String {
    format!("{:.0}µs", d.as_secs_f64() * 1e6)
}

/// One ~100-byte heartbeat payload.
pub fn payload(seq: u64) -> Bytes {
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

/// The subject the bare echo baseline answers on.
pub const ECHO_SUBJECT: &str = "bench.echo";

/// The bodies the latency measurements send, encoded once so that the
/// loops time the round trip alone.
#[derive(Debug, Clone)]
pub struct Bodies {
    /// `check` for the device of a heartbeat subject.
    pub check: Bytes,
    /// `active` for its account.
    pub active: Bytes,
}

impl Bodies {
    /// The bodies for the session of heartbeat subject `subject`.
    pub fn of(subject: &str) -> anyhow::Result<Bodies> {
        let ids = subjects::parse_heartbeat(subject)?;
        let check = CheckRequest {
            account: ids.account.clone(),
            device: ids.device,
            session: None,
            content: None,
            evict: None,
        };
        let active = AccountRequest {
            account: ids.account,
        };
        Ok(Bodies {
            check: serde_json::to_vec(&check)?.into(),
            active: serde_json::to_vec(&active)?.into(),
        })
    }
}

/// What a latency or throughput measurement asks, with a body encoded
/// beforehand: an endpoint of the services through [`Client`], or a
/// subject of a bare baseline through NATS alone.
#[derive(Debug, Clone)]
pub enum Target {
    Endpoint(Client, &'static str),
    Bare(async_nats::Client, &'static str),
}

impl Target {
    /// Sends `body` and waits for the answer; an error reply fails.
    async fn ask(&self, body: Bytes) -> anyhow::Result<()> {
        match self {
            Target::Endpoint(client, endpoint) => {
                client.request_raw(endpoint, body).await?;
            }
            Target::Bare(nats, subject) => {
                let r = nats.request(*subject, body).await?;
                anyhow::ensure!(
                    r.headers.is_none(),
                    "error reply from {subject}: {:?}",
                    r.payload
                );
            }
        }
        Ok(())
    }
}

/// Subjects of `sessions` sessions spread over accounts.
pub fn session_subjects(
    run: &str,
    sessions: usize,
    per_account: usize,
) -> anyhow::Result<Vec<String>> {
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
pub async fn publish_all(
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

/// One heartbeat per session spread evenly over `period`, as a fleet with
/// that heartbeat period sends them (the steady state, no burst).
pub async fn publish_paced(
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

/// Resident memory of each process, read once a second over `rounds`
/// heartbeat periods while every session keeps beating at `period`, as a
/// deployment runs (an allocator returns freed pages as it works; an idle
/// process would be read with what it has not returned yet): each
/// process's readings, in order.
pub async fn rss_while_beating(
    pids: &[u32],
    client: &async_nats::Client,
    subjects: &[String],
    period: Duration,
    rounds: u32,
) -> anyhow::Result<Vec<Vec<u64>>> {
    let beats = async {
        for _ in 0..rounds {
            publish_paced(client, subjects, period).await?;
        }
        anyhow::Ok(())
    };
    let samples = async {
        let mut readings = vec![Vec::new(); pids.len()];
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        for _ in 0..(period * rounds).as_secs().max(1) {
            tick.tick().await;
            for (r, &pid) in readings.iter_mut().zip(pids) {
                r.push(crate::procs::rss_bytes(pid)?);
            }
        }
        anyhow::Ok(readings)
    };
    let (beats, samples) = tokio::join!(beats, samples);
    beats?;
    samples
}

/// The interval of the memory readings, as the services are given it: a
/// reading starts just after a boundary ([`wait_for_boundary`]) and lasts
/// [`ACROSS_ROUNDS`] heartbeat periods, which end before the next one.
pub const MEMORY_INTERVAL: &str = "30s";
const MEMORY_INTERVAL_MS: u64 = 30_000;

/// Heartbeat periods read across a boundary, and from how many seconds
/// after it the readings count as "between boundaries": by then every
/// session has been heard in the new interval (one period) and its
/// carry-over written (the handler's 5 s carry-over delay) and the previous
/// interval's copy trimmed of it. Five periods end before the next
/// boundary of a 30 s interval.
pub const ACROSS_ROUNDS: u32 = 5;
const SETTLED_SECS: usize = 12;

/// Sleeps until just after the next boundary of a [`MEMORY_INTERVAL`]
/// interval.
pub async fn wait_for_boundary() {
    let ms = MEMORY_INTERVAL_MS;
    let now = headcount_protocol::now_millis();
    let next = (now / ms + 1) * ms + 500;
    tokio::time::sleep(Duration::from_millis(next - now)).await;
}

/// Of readings taken each second from just after a boundary: their mean
/// once the boundary's work is done ([`SETTLED_SECS`] on; the last reading
/// in a shorter run), and the highest (the boundary's peak).
pub fn between_and_peak(readings: &[u64]) -> (u64, u64) {
    let settled = SETTLED_SECS.min(readings.len().saturating_sub(1));
    (
        mean(&readings[settled..]),
        readings.iter().copied().max().unwrap_or(0),
    )
}

/// The mean of some readings (0 for none).
pub fn mean(readings: &[u64]) -> u64 {
    readings.iter().sum::<u64>() / (readings.len() as u64).max(1)
}

/// Heartbeats encoded once for the ingest publishers: every session's
/// subject, built (and checked) once as an [`async_nats::Subject`], and one
/// payload, so that publishing a message copies and checks nothing.
#[derive(Debug, Clone)]
pub struct Beats {
    subjects: Arc<[async_nats::Subject]>,
    payload: Bytes,
}

impl Beats {
    pub fn of(subjects: &[String]) -> anyhow::Result<Beats> {
        let subjects = subjects
            .iter()
            .map(|s| {
                let subject = async_nats::Subject::from(s.as_str());
                let wildcard = s.split('.').any(|t| t == "*" || t == ">");
                anyhow::ensure!(
                    subject.is_valid() && !wildcard,
                    "not a subject to publish on: {s:?}"
                );
                Ok(subject)
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Beats {
            subjects,
            payload: payload(1),
        })
    }
}

/// The ingest publishers: several tasks, each on a NATS connection of its
/// own (see `Env::publisher`), so that no single connection's client task
/// bounds the rate a consumer is measured at.
#[derive(Debug)]
pub struct Publishers {
    clients: Vec<async_nats::Client>,
}

/// Messages a publisher sends between two looks at the consumer's progress
/// when nothing bounds it (the ceiling run).
const UNBOUNDED_CHUNK: usize = 4096;

impl Publishers {
    pub fn new(clients: Vec<async_nats::Client>) -> Publishers {
        Publishers { clients }
    }

    /// The publishers' own ceiling: heartbeats per second the server
    /// accepts from them when nothing consumes (no subscription matches
    /// `beats` while this runs), through the same code as
    /// [`Publishers::windowed`], timed until every publisher's last flush
    /// has been answered.
    pub async fn ceiling(&self, beats: &Beats, n: usize) -> anyhow::Result<f64> {
        let took = self.windowed(beats, n, None, async || Ok(0)).await?;
        Ok(n as f64 / took.as_secs_f64().max(1e-9))
    }

    /// Publishes `n` heartbeats round-robin over `beats`' sessions, split
    /// among the publishers (publisher `k` of `p` sends messages `k`,
    /// `k + p`, ...: with `n` equal to the sessions, each session once),
    /// all at once; returns when every publisher has flushed.
    ///
    /// With a `window`, the publishers never run more than `window` ahead of
    /// what the consumer reports processed, so that a consumer slower than
    /// the publishers is measured at its own pace instead of being overrun
    /// (the server would drop what no buffer holds). The window is split
    /// among them: each publisher keeps its own sent count at most its share
    /// of the window above its share of the consumer's progress, so that all
    /// of them together are never more than `window` ahead. `processed` is
    /// asked (from this task, one call at a time) only while a publisher
    /// waits for it.
    pub async fn windowed(
        &self,
        beats: &Beats,
        n: usize,
        window: Option<usize>,
        mut processed: impl AsyncFnMut() -> anyhow::Result<u64>,
    ) -> anyhow::Result<Duration> {
        anyhow::ensure!(!self.clients.is_empty(), "no publishers");
        anyhow::ensure!(!beats.subjects.is_empty(), "no sessions to publish to");
        let p = self.clients.len();
        let share = window.map(|w| (w / p).max(1));
        let chunk = share.map_or(UNBOUNDED_CHUNK, |s| (s / 4).max(1));
        let progress = Arc::new(AtomicU64::new(0));
        let waiting = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(p));

        /// Counts a publisher out however it ends (error or panic included),
        /// so that the progress loop below stops.
        struct Running(Arc<AtomicUsize>);
        impl Drop for Running {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }

        let start = Instant::now();
        let mut tasks = Vec::with_capacity(p);
        for (k, client) in self.clients.iter().enumerate() {
            let count = share_of(n, p, k);
            let (client, beats) = (client.clone(), beats.clone());
            let (progress, waiting) = (progress.clone(), waiting.clone());
            let guard = Running(running.clone());
            tasks.push(tokio::spawn(async move {
                let _guard = guard;
                let len = beats.subjects.len();
                let mut sent = 0usize;
                while sent < count {
                    let c = chunk.min(count - sent);
                    if let Some(share) = share {
                        let mut counted = false;
                        while sent + c > progress.load(Ordering::Relaxed) as usize / p + share {
                            if !counted {
                                waiting.fetch_add(1, Ordering::SeqCst);
                                counted = true;
                            }
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        if counted {
                            waiting.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                    for j in sent..sent + c {
                        let s = &beats.subjects[(k + j * p) % len];
                        client.publish(s.clone(), beats.payload.clone()).await?;
                    }
                    sent += c;
                }
                client.flush().await?;
                Ok::<(), anyhow::Error>(())
            }));
        }
        // The consumer's progress, for the publishers waiting on it: asked
        // at most every 2 ms (a scrape of a service's metrics costs it time).
        let polled = async {
            while running.load(Ordering::SeqCst) > 0 {
                if window.is_some() && waiting.load(Ordering::SeqCst) > 0 {
                    progress.store(processed().await?, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                } else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            Ok::<(), anyhow::Error>(())
        }
        .await;
        if let Err(e) = polled {
            for t in &tasks {
                t.abort();
            }
            return Err(e);
        }
        for t in tasks {
            t.await??;
        }
        Ok(start.elapsed())
    }
}

/// How many of `n` messages publisher `k` of `p` sends: messages `k`,
/// `k + p`, `k + 2p`, ... below `n`.
fn share_of(n: usize, p: usize, k: usize) -> usize {
    n / p + usize::from(k < n % p)
}

/// How long a join and a leave took to show in `active`.
#[derive(Debug, Clone)]
pub struct Fresh {
    pub join: Dist,
    pub leave: Dist,
}

/// Latency of `n` requests sent one after another from one client (after
/// a warm-up); an error reply fails the run.
pub async fn one_by_one(target: &Target, body: Bytes, n: usize) -> anyhow::Result<Dist> {
    Ok(interleaved(&[(target, body)], n).await?.remove(0))
}

/// Latency of `n` requests to each target from one client, one request
/// at a time, the targets taking turns (each round starting with the next
/// one), so that whatever else the machine does falls on all of them
/// alike; per target, in order. An error reply fails the run.
pub async fn interleaved(targets: &[(&Target, Bytes)], n: usize) -> anyhow::Result<Vec<Dist>> {
    let mut times = vec![Vec::with_capacity(n); targets.len()];
    for (target, body) in targets {
        for _ in 0..n.min(200) {
            target.ask(body.clone()).await?; // warm-up
        }
    }
    for round in 0..n {
        for k in 0..targets.len() {
            let k = (round + k) % targets.len();
            let (target, body) = &targets[k];
            let t = Instant::now();
            target.ask(body.clone()).await?;
            times[k].push(t.elapsed());
        }
    }
    Ok(times.into_iter().map(dist).collect())
}

/// Answers per second to `clients` concurrent callers, each sending its
/// next request as soon as the last is answered, for `secs` seconds.
pub async fn concurrent(
    target: &Target,
    body: Bytes,
    clients: usize,
    secs: u64,
) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (target, body, done) = (target.clone(), body.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                if target.ask(body.clone()).await.is_ok() {
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

/// `samples` sessions, one after another, each on an account of its own:
/// from its first heartbeat until `active` counts it, and from its `leave`
/// until `active` no longer does (polled every 0.5 ms).
pub async fn freshness(client: &async_nats::Client, samples: usize) -> anyhow::Result<Fresh> {
    async fn until(
        client: &Client,
        account: &AccountId,
        start: Instant,
        want: u32,
    ) -> anyhow::Result<Duration> {
        loop {
            if client.active(account).await?.active == want {
                return Ok(start.elapsed());
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(10),
                "not seen within 10 s"
            );
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    let api = Client::new(client.clone());
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
        joins.push(until(&api, &account, start, 1).await?);
        let leave = Heartbeat {
            leave: true,
            ..Default::default()
        };
        let start = Instant::now();
        client.publish(subject, leave.encode().into()).await?;
        client.flush().await?;
        leaves.push(until(&api, &account, start, 0).await?);
    }
    Ok(Fresh {
        join: dist(joins),
        leave: dist(leaves),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishers_split_the_messages_without_gap_or_overlap() {
        for n in [0, 1, 7, 10, 20_000] {
            for p in 1..=5 {
                let mut seen = vec![0u8; n];
                for k in 0..p {
                    for j in 0..share_of(n, p, k) {
                        seen[k + j * p] += 1;
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "n {n}, p {p}");
            }
        }
    }
}
