//! `headcount-bench soak`: a fleet heartbeating every 5 s for a while, part
//! of it replaced at every step, with the services' resident memory,
//! `check` latency, heartbeats processed and anything lost reported at
//! every step: memory must stay flat.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use headcount_client::Client;
use headcount_protocol::SessionId;
use headcount_protocol::subjects::{self, endpoint};
use headcount_protocol::wire::Heartbeat;

use crate::measure::{Bodies, Dist, Target, one_by_one, publish_paced, session_subjects, us};
use crate::procs::{Env, rss_bytes, sum_prefix};

#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Sessions heartbeating every 5 s throughout.
    #[arg(long, default_value_t = 100_000)]
    sessions: usize,
    /// Devices per account.
    #[arg(long, default_value_t = 10)]
    devices_per_account: usize,
    /// How long to run (e.g. 10m).
    #[arg(long, default_value = "10m", value_parser = crate::config::duration)]
    duration: Duration,
    /// How often to report (e.g. 1m).
    #[arg(long, default_value = "1m", value_parser = crate::config::duration)]
    every: Duration,
    /// Each step, this share of the sessions leaves and is replaced by new
    /// ones (churn), in percent.
    #[arg(long, default_value_t = 5)]
    churn_percent: usize,
    /// Scratch directory (default: a new temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
}

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

pub async fn run(a: SoakArgs, headcount: &Path) -> anyhow::Result<()> {
    let (dir, _scratch) = crate::procs::scratch_dir(a.dir.as_deref())?;
    let env = Env::start(&dir, headcount).await?;
    let mut handler = env.service("handler", &["--max-heartbeat-rate", "1000000000"])?;
    // No account is held back: the largest limit accepted.
    let no_limit = headcount_protocol::policy::MAX_LIMIT.to_string();
    let mut checker = env.service("checker", &["--default-limit", &no_limit])?;
    checker.wait_up("checker").await?;
    let publisher = env.client("soak-publisher").await?;
    handler.wait_handler(&publisher).await?;
    let check_endpoint = Target::Endpoint(
        Client::new(env.client("soak-client").await?),
        endpoint::CHECK,
    );
    let run = nuid::next().to_string()[..6].to_string();
    let mut subjects = session_subjects(&run, a.sessions, a.devices_per_account)?;
    let mut next_id = a.sessions;
    let check_body = Bodies::of(&subjects[0])?.check;
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
        let check = one_by_one(&check_endpoint, check_body.clone(), 300).await?;
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
