//! A simulated fleet: accounts x devices, each heartbeating from its own task
//! and obeying its control messages.
//!
//! By default every device does what a real one does: asks for a token on
//! `headcount.token`, connects to NATS with it (so the auth callout grants it
//! its own two subjects and nothing else), subscribes to its control subject
//! and heartbeats. A device told `device-limit-exceeded` or `revoked` pauses,
//! then comes back with a new token, as a user pressing play again would.
//! `--shared-connection` publishes every device's heartbeats over one
//! privileged connection instead: a load generator for numbers of devices
//! no machine would open connections for.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use headcount_protocol::subjects;
use headcount_protocol::wire::{ControlMessage, Heartbeat, TokenRequest};
use headcount_protocol::{AccountId, DeviceId, SessionId};
use headcount_runtime::Shutdown;

use crate::config::{NatsArgs, humantime_secs};

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
    /// Publish all heartbeats over this tool's own (service) connection
    /// instead of one token-authenticated connection per device.
    #[arg(long)]
    shared_connection: bool,
    #[command(flatten)]
    nats: NatsArgs,
}

/// Shape of a fleet.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub accounts: usize,
    /// Devices per account: the `i`th account gets `devices(i, base_devices)`.
    pub devices: fn(usize, usize) -> usize,
    pub base_devices: usize,
    pub period: Duration,
    /// Devices that leave now and then and come back with a new session.
    pub churn: bool,
}

/// How the fleet's devices reach NATS.
#[derive(Debug, Clone)]
pub enum FleetAccess {
    /// One connection per device, with a token from `headcount.token`
    /// (requested over `tokens`).
    Tokens {
        tokens: async_nats::Client,
        urls: Vec<String>,
    },
    /// One shared connection for every device (must be allowed to publish
    /// the heartbeat subjects, `hbp.>` once mapped, and subscribe `ctl.>`).
    Shared(async_nats::Client),
}

/// Counters a fleet keeps.
#[derive(Debug, Default)]
pub struct FleetStats {
    pub sent: AtomicU64,
    pub told_off: AtomicU64,
    pub devices: AtomicU64,
    pub connected: AtomicU64,
    pub errors: AtomicU64,
}

const KINDS: [&str; 4] = ["web", "ios", "android", "tv"];
const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];

/// One device's session: its connection, subject and control stream.
struct Session {
    client: async_nats::Client,
    subject: String,
    session: SessionId,
    control: async_nats::Subscriber,
    /// Whether `client` is this session's own connection (closed at its end).
    own: bool,
    /// When its token expires (Unix ms), for a session with its own token.
    expires_at: Option<u64>,
}

async fn start_session(
    access: &FleetAccess,
    account: &AccountId,
    device: &DeviceId,
) -> anyhow::Result<Session> {
    let (client, session, expires_at) = match access {
        FleetAccess::Tokens { tokens, urls } => {
            let mut api = headcount_client::Client::new(tokens.clone());
            // As long as the connection's own requests may take.
            if let Some(timeout) = tokens.timeout() {
                api = api.with_timeout(timeout);
            }
            let reply = api
                .token(&TokenRequest {
                    account: account.clone(),
                    device: device.clone(),
                    plan: None,
                })
                .await
                .context("requesting a device token")?;
            let client = async_nats::ConnectOptions::with_token(reply.token)
                .name(format!("sim {account}/{device}"))
                .connect(
                    urls.iter()
                        .map(|u| u.parse::<async_nats::ServerAddr>())
                        .collect::<Result<Vec<_>, _>>()
                        .context("bad nats url")?
                        .as_slice(),
                )
                .await
                .context("connecting with a device token")?;
            (client, reply.session, Some(reply.expires_at))
        }
        FleetAccess::Shared(client) => (
            client.clone(),
            SessionId::parse(&nuid::next().to_string())?,
            None,
        ),
    };
    let control = client.subscribe(subjects::control(account, device)).await?;
    Ok(Session {
        subject: subjects::heartbeat(account, device, &session),
        session,
        client,
        control,
        own: expires_at.is_some(),
        expires_at,
    })
}

impl Session {
    async fn end(mut self, leave: bool) {
        if leave {
            let bye = Heartbeat {
                leave: true,
                ..Default::default()
            };
            let _ = self
                .client
                .publish(self.subject.clone(), bye.encode().into())
                .await;
        }
        let _ = self.control.unsubscribe().await;
        let _ = self.client.flush().await;
        if self.own {
            let _ = self.client.drain().await;
        }
    }
}

/// What ended a session.
enum End {
    Shutdown,
    ToldOff,
    Left,
    /// The token is about to expire: the server would close the connection
    /// and every reconnect with it would be refused.
    Expiring,
}

/// One device, for as long as the fleet runs: sessions one after another.
#[allow(clippy::too_many_arguments)]
async fn device_loop(
    access: FleetAccess,
    account: AccountId,
    device: DeviceId,
    payload: bytes::Bytes,
    period: Duration,
    offset: Duration,
    churn: bool,
    seed: u64,
    stats: Arc<FleetStats>,
    shutdown: Shutdown,
) {
    let mut rng = seed | 1;
    let mut stop = std::pin::pin!(shutdown.wait());
    tokio::select! {
        _ = &mut stop => return,
        _ = tokio::time::sleep(offset) => {}
    }
    loop {
        let session = tokio::select! {
            _ = &mut stop => return,
            s = start_session(&access, &account, &device) => s,
        };
        let mut session = match session {
            Ok(s) => s,
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%account, %device, error = %format!("{e:#}"), "simulated device could not start a session");
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(period) => continue,
                }
            }
        };
        stats.connected.fetch_add(1, Ordering::Relaxed);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = loop {
            tokio::select! {
                _ = &mut stop => break End::Shutdown,
                msg = session.control.next() => {
                    let Some(msg) = msg else { break End::ToldOff };
                    if let Ok(c) = ControlMessage::decode(&msg.payload)
                        && c.session == session.session
                    {
                        stats.told_off.fetch_add(1, Ordering::Relaxed);
                        break End::ToldOff;
                    }
                }
                _ = tick.tick() => {
                    if session.expires_at.is_some_and(|at| {
                        headcount_protocol::now_millis() + 2 * period.as_millis() as u64 >= at
                    }) {
                        break End::Expiring;
                    }
                    if churn {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        if rng.is_multiple_of(400) {
                            break End::Left;
                        }
                    }
                    if session.client.publish(session.subject.clone(), payload.clone()).await.is_ok() {
                        stats.sent.fetch_add(1, Ordering::Relaxed);
                    } else {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        };
        stats.connected.fetch_sub(1, Ordering::Relaxed);
        let pause = match end {
            End::Shutdown => {
                session.end(true).await;
                return;
            }
            End::ToldOff => {
                session.end(false).await;
                period * 6
            }
            End::Left => {
                session.end(true).await;
                period * 3
            }
            // A user pressing play again: a new token, a new session.
            End::Expiring => {
                session.end(true).await;
                Duration::ZERO
            }
        };
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Runs a fleet until `shutdown`; heartbeats are spread evenly over the
/// period. Returns once every device has left.
pub async fn fleet(
    access: FleetAccess,
    spec: FleetSpec,
    stats: Arc<FleetStats>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut devices = Vec::new();
    for a in 0..spec.accounts {
        let account = AccountId::parse(&format!("acct-{a:04}"))?;
        for d in 0..(spec.devices)(a, spec.base_devices) {
            devices.push((
                account.clone(),
                DeviceId::parse(&format!("dev-{d}"))?,
                a + d,
            ));
        }
    }
    let n = devices.len().max(1) as u32;
    stats.devices.store(devices.len() as u64, Ordering::Relaxed);
    let mut tasks = Vec::with_capacity(devices.len());
    for (k, (account, device, i)) in devices.into_iter().enumerate() {
        let hb = Heartbeat {
            content: Some(format!("stream-{}", i % 7)),
            kind: Some(KINDS[i % KINDS.len()].into()),
            region: Some(REGIONS[i % REGIONS.len()].into()),
            ..Default::default()
        };
        tasks.push(tokio::spawn(device_loop(
            access.clone(),
            account,
            device,
            hb.encode().into(),
            spec.period,
            spec.period / n * k as u32,
            spec.churn,
            0x2545_f491_4f6c_dd1d ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            stats.clone(),
            shutdown.clone(),
        )));
    }
    for t in tasks {
        t.await.context("simulated device panicked")?;
    }
    if let FleetAccess::Shared(client) = &access {
        let _ = client.flush().await;
    }
    Ok(())
}

pub async fn run(a: SimulateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.accounts > 0 && a.devices > 0,
        "--accounts and --devices must be at least 1"
    );
    let opts = a.nats.options("headcount-simulate")?;
    let urls = opts.urls.clone();
    let client = opts.connect().await?;
    let access = if a.shared_connection {
        FleetAccess::Shared(client)
    } else {
        FleetAccess::Tokens {
            tokens: client,
            urls,
        }
    };
    let stats = Arc::new(FleetStats::default());
    let (trigger, shutdown) = Shutdown::new();
    let spec = FleetSpec {
        accounts: a.accounts,
        devices: |_, n| n,
        base_devices: a.devices,
        period: a.period,
        churn: false,
    };
    let task = tokio::spawn(fleet(access, spec, stats.clone(), shutdown));
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
                    "simulate: {} devices ({} in a session), {} heartbeats sent ({:.0}/s), {} told to stop, {} errors, {:.0}s",
                    stats.devices.load(Ordering::Relaxed), stats.connected.load(Ordering::Relaxed),
                    sent, sent as f64 / secs, stats.told_off.load(Ordering::Relaxed),
                    stats.errors.load(Ordering::Relaxed), secs
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
