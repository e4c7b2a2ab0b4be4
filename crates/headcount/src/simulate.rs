//! A simulated fleet: accounts x devices heartbeating over one connection
//! with the device user's permissions, obeying control messages.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use futures::StreamExt;
use headcount_protocol::subjects;
use headcount_protocol::wire::{ControlMessage, Heartbeat};
use headcount_protocol::{AccountId, DeviceId, SessionId};
use headcount_runtime::Shutdown;

use crate::config::{NatsArgs, UpInfo, humantime_secs};

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Number of accounts.
    #[arg(long, default_value_t = 10)]
    accounts: usize,
    /// Devices per account.
    #[arg(long, default_value_t = 2)]
    devices: usize,
    /// Heartbeat period of every device.
    #[arg(long, default_value = "5s", value_parser = humantime_secs)]
    period: Duration,
    /// Stop after this long (default: until Ctrl-C).
    #[arg(long, value_parser = humantime_secs)]
    duration: Option<Duration>,
    #[command(flatten)]
    nats: NatsArgs,
}

/// Shape of a fleet.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub accounts: usize,
    /// Devices per account: the `i`th account gets `devices(i)`.
    pub devices: fn(usize, usize) -> usize,
    pub base_devices: usize,
    pub period: Duration,
    /// Devices that leave now and then and come back with a new session.
    pub churn: bool,
}

/// Counters a fleet keeps.
#[derive(Debug, Default)]
pub struct FleetStats {
    pub sent: AtomicU64,
    pub told_off: AtomicU64,
    pub sessions: AtomicU64,
}

struct Sim {
    subject: String,
    payload: bytes::Bytes,
    account: AccountId,
    device: DeviceId,
    /// Paused (evicted or between sessions) until then.
    paused_until: Option<Instant>,
}

const KINDS: [&str; 4] = ["web", "ios", "android", "tv"];
const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];

fn new_session(account: &AccountId, device: &DeviceId, i: usize) -> (String, bytes::Bytes) {
    let session = SessionId::parse(&nuid::next().to_string()).unwrap_or_else(|_| {
        // nuid is always 22 base62 characters; never reached.
        SessionId::parse("fallback").unwrap_or_else(|_| unreachable!())
    });
    let hb = Heartbeat {
        content: Some(format!("stream-{}", i % 7)),
        kind: Some(KINDS[i % KINDS.len()].into()),
        region: Some(REGIONS[i % REGIONS.len()].into()),
        ..Default::default()
    };
    (
        subjects::heartbeat(account, device, &session),
        hb.encode().into(),
    )
}

/// Runs a fleet until `shutdown`, publishing each device's heartbeat once per
/// period, spread evenly over it.
pub async fn fleet(
    client: async_nats::Client,
    spec: FleetSpec,
    stats: Arc<FleetStats>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut sims = Vec::new();
    for a in 0..spec.accounts {
        let account = AccountId::parse(&format!("acct-{a:04}"))?;
        for d in 0..(spec.devices)(a, spec.base_devices) {
            let device = DeviceId::parse(&format!("dev-{d}"))?;
            let (subject, payload) = new_session(&account, &device, a + d);
            sims.push(Sim {
                subject,
                payload,
                account: account.clone(),
                device,
                paused_until: None,
            });
        }
    }
    stats.sessions.store(sims.len() as u64, Ordering::Relaxed);
    let index: HashMap<(AccountId, DeviceId), usize> = sims
        .iter()
        .enumerate()
        .map(|(i, s)| ((s.account.clone(), s.device.clone()), i))
        .collect();
    let mut ctl = client.subscribe("ctl.>").await?;

    let slots = 20u32;
    let mut tick = tokio::time::interval(spec.period / slots);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut slot = 0usize;
    let mut stop = std::pin::pin!(shutdown.wait());
    let mut rng = 0x2545f4914f6cdd1du64;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            msg = ctl.next() => {
                let Some(msg) = msg else { break };
                if let Ok(c) = ControlMessage::decode(&msg.payload)
                    && let Some(&i) = index.get(&(c.account.clone(), c.device.clone())) {
                        // Only act on notices about the current session.
                        if sims[i].subject == subjects::heartbeat(&c.account, &c.device, &c.session) {
                            stats.told_off.fetch_add(1, Ordering::Relaxed);
                            sims[i].paused_until = Some(Instant::now() + spec.period * 6);
                        }
                    }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                for (i, sim) in sims.iter_mut().enumerate() {
                    if i % slots as usize != slot {
                        continue;
                    }
                    if let Some(until) = sim.paused_until {
                        if now < until {
                            continue;
                        }
                        sim.paused_until = None;
                        let (s, p) = new_session(&sim.account, &sim.device, i);
                        sim.subject = s;
                        sim.payload = p;
                    }
                    if spec.churn {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        if rng.is_multiple_of(400) {
                            let leave = Heartbeat { leave: true, ..Default::default() };
                            client.publish(sim.subject.clone(), leave.encode().into()).await?;
                            sim.paused_until = Some(now + spec.period * 3);
                            continue;
                        }
                    }
                    client.publish(sim.subject.clone(), sim.payload.clone()).await?;
                    stats.sent.fetch_add(1, Ordering::Relaxed);
                }
                slot = (slot + 1) % slots as usize;
            }
        }
    }
    // Leave politely so seats free at once.
    for sim in &sims {
        if sim.paused_until.is_none() {
            let leave = Heartbeat {
                leave: true,
                ..Default::default()
            };
            let _ = client
                .publish(sim.subject.clone(), leave.encode().into())
                .await;
        }
    }
    let _ = client.flush().await;
    Ok(())
}

/// A device connection: the device user from up.json unless flags say otherwise.
pub async fn device_client(nats: &NatsArgs) -> anyhow::Result<async_nats::Client> {
    let mut opts = nats.options("headcount-simulate")?;
    if nats.nats_user.is_none()
        && let Ok(up) = UpInfo::load(&nats.data_dir)
    {
        opts.user = Some(up.device_user);
        opts.password = Some(up.device_password);
    }
    opts.connect().await
}

pub async fn run(a: SimulateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.accounts > 0 && a.devices > 0,
        "--accounts and --devices must be at least 1"
    );
    let client = device_client(&a.nats).await?;
    let stats = Arc::new(FleetStats::default());
    let (trigger, shutdown) = Shutdown::new();
    let spec = FleetSpec {
        accounts: a.accounts,
        devices: |_, n| n,
        base_devices: a.devices,
        period: a.period,
        churn: false,
    };
    let task = tokio::spawn(fleet(client, spec, stats.clone(), shutdown));
    let started = Instant::now();
    let mut report = tokio::time::interval(Duration::from_secs(1));
    report.tick().await;
    loop {
        tokio::select! {
            _ = crate::services::until_signal_quiet() => break,
            _ = report.tick() => {
                let sent = stats.sent.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64();
                eprintln!(
                    "simulate: {} devices, {} heartbeats sent ({:.0}/s), {} told to stop, {:.0}s",
                    stats.sessions.load(Ordering::Relaxed), sent, sent as f64 / secs,
                    stats.told_off.load(Ordering::Relaxed), secs
                );
                if a.duration.is_some_and(|d| started.elapsed() >= d) {
                    break;
                }
            }
        }
    }
    trigger.fire();
    task.await??;
    Ok(())
}
