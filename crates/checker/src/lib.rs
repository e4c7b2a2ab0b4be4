//! checker: answers who is active and enforces each account's device limit.
//!
//! It keeps an in-memory [`view::View`] of the accounts of the partitions it
//! holds (with other checkers: each partition is held by
//! [`Config::copies`] of them), fed by watching the KV buckets (interval
//! dictionaries, revocations, limits) and by listening to those
//! partitions' heartbeats for liveness, so no request costs a KV read. A
//! request about an account of another partition is passed on to its
//! holders. It serves the
//! `headcount.*` request-reply endpoints as a NATS micro service, ends
//! sessions beyond the limit under the account's policy (whether or not
//! anyone calls `check`), tells the device on `ctl.<account>.<device>` and
//! publishes presence events.
//!
//! Every ending goes through a create-only KV write of the session's
//! revocation: when several checkers reach the same verdict, one wins and only
//! that one tells the device and publishes the event.
//!
//! Layout: [`view`] is the pure view and limit rules, [`victims`] the one
//! rule for who goes when seats run short; `watches` applies what the KV
//! watches deliver, `liveness` picks where a partition's heartbeats come
//! from (its own subscription, or the handler of its process),
//! `enforcement` ends sessions, `sweep` finds timeouts, `endpoints`
//! answers requests, and `shared` holds what they share. This file wires
//! them together in [`run`].
//!
//! Never: write the sessions bucket (the heartbeat-handler owns it), or
//! answer from anything but the view (`limits.set` answers with the record
//! it stored).

mod early;
mod endpoints;
mod enforcement;
mod ledger;
mod liveness;
pub mod metrics;
mod shared;
#[cfg(test)]
mod simulation;
mod sweep;
pub mod victims;
pub mod view;
mod watches;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::kv;
use async_nats::service::ServiceExt;
use futures::StreamExt;
use headcount_protocol::subjects::{self, kv as keys};
use headcount_protocol::{IntervalClock, Limit, Policy, now_millis};
use headcount_runtime::relay::Relay;
use headcount_runtime::{Shutdown, Wiring, members};
use tokio::sync::{oneshot, watch};

use liveness::Heartbeats;
pub use metrics::Metrics;
use shared::Shared;
use view::Rules;

/// Checkers per partition by default.
pub const DEFAULT_COPIES: usize = 2;

/// Checker settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Must match the handler's interval.
    pub interval: Duration,
    /// A session not heard from for this long is out (default: 3 missed
    /// beats of a 5 s heartbeat).
    pub timeout: Duration,
    /// How often timeouts are looked for.
    pub sweep_every: Duration,
    /// How often the usage gauges by kind and region are recomputed (a
    /// pass over every session).
    pub gauges_every: Duration,
    /// Limit of an account with no limit or plan of its own.
    pub default_limit: Limit,
    /// Named plans accounts can be put on.
    pub plans: headcount_protocol::Plans,
    /// How many checkers hold each partition (fewer while fewer run): a
    /// partition stays answered while one of them stops or fails.
    pub copies: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(120),
            timeout: Duration::from_secs(15),
            sweep_every: Duration::from_millis(500),
            gauges_every: Duration::from_secs(30),
            default_limit: Limit::new(3, Policy::EvictOldest).unwrap_or(Limit {
                limit: 3,
                policy: Policy::EvictOldest,
                per_content: None,
                grace: None,
            }),
            plans: headcount_protocol::policy::default_plans(),
            copies: DEFAULT_COPIES,
        }
    }
}

/// Starts one checker on its own task (see [`run`]): ready once its
/// watches have caught up and its endpoints answer.
pub fn start(config: Config, metrics: Metrics, wiring: Wiring) -> headcount_runtime::Running {
    let health = wiring.health.clone();
    // Boxed: the instance's future is large, and moving it by value
    // through the spawn can overflow a small stack (a test's thread).
    headcount_runtime::Running::spawn("checker", health, Box::pin(run(config, metrics, wiring)))
}

/// The checker's side of [`members::hold`]: a partition held is one
/// shard of the view filled and its heartbeats and requests subscribed.
struct Partitions {
    shared: Arc<Shared>,
    /// True once every partition assigned serves: the endpoints may start.
    complete: watch::Sender<bool>,
    sessions_health: headcount_runtime::health::Component,
    /// Where a handler in this process feeds heartbeats, if one runs here.
    relay: Option<Relay>,
}

impl members::Holder for Partitions {
    fn start(&mut self, p: u32) -> members::Part {
        let (stop, part_stop) = Shutdown::new();
        let (ready_tx, ready) = oneshot::channel();
        let task = tokio::spawn(run_partition(
            self.shared.clone(),
            p,
            self.relay.clone(),
            ready_tx,
            part_stop,
        ));
        members::Part { stop, ready, task }
    }

    fn ended(&mut self, _: u32) {}

    fn round(&mut self, standing: members::Standing<'_>) {
        self.shared
            .metrics
            .partitions
            .set(standing.serving.len() as i64);
        if standing.complete() && !*self.complete.borrow() {
            self.sessions_health.set_ready(true);
            let _ = self.complete.send(true);
        }
    }
}

/// Runs one checker until `shutdown`, then lets its partitions go.
///
/// The view holds every account's limits and revocations (both buckets
/// watched whole) and the sessions of the partitions the members bucket
/// assigns this instance ([`members::hold`], [`Config::copies`] checkers
/// per partition), each partition on its own task: a watch of its
/// dictionaries, a subscription to its heartbeats (liveness) and one to the
/// requests passed on to it. The endpoints start once every partition
/// assigned serves.
///
/// Readiness goes to `health` (a scope of the caller's, which tracks the
/// NATS connection): components `revoked` and `limits`, ready once their
/// watch has replayed what the bucket held, `sessions`, ready once every
/// partition assigned serves, and the scope itself, serving from the
/// moment the endpoints are up until it stops.
async fn run(config: Config, metrics: Metrics, wiring: Wiring) -> anyhow::Result<()> {
    let (nats, buckets, relay) = (wiring.nats, wiring.buckets, wiring.relay);
    let (health, shutdown) = (wiring.health, wiring.shutdown);
    let sessions_health = health.component("sessions");
    let revoked_health = health.component("revoked");
    let limits_health = health.component("limits");
    let rules = Rules {
        clock: IntervalClock::new(config.interval),
        timeout_ms: config.timeout.as_millis() as u64,
        default_limit: config.default_limit,
    };
    let (shared, enforce_rx) = Shared::new(
        rules,
        config.plans.clone(),
        buckets.clone(),
        nats.clone(),
        metrics,
    );
    let shared = Arc::new(shared);

    let (watch_stop, watch_shutdown) = Shutdown::new();
    let mut tasks = Vec::new();
    let mut ready = Vec::new();
    // Each bucket watched whole, what applies its entries to the view, and
    // the component that is ready once its watch has replayed what the
    // bucket held.
    let watched: [(&kv::Store, &str, watches::OnEntry, _); 2] = [
        (
            &buckets.revoked,
            "revoked",
            watches::on_revoked_entry,
            revoked_health,
        ),
        (
            &buckets.limits,
            "limits",
            watches::on_limit_entry,
            limits_health,
        ),
    ];
    for (store, what, apply, component) in watched {
        let s = shared.clone();
        let (t, r) = headcount_runtime::watch::follow(
            store.clone(),
            what,
            move |e| apply(&s, e),
            watch_shutdown.clone(),
        )
        .await
        .with_context(|| format!("watching {what} bucket"))?;
        tasks.push(t);
        ready.push((component, r));
    }
    for (component, r) in ready {
        if r.await.is_ok() {
            component.set_ready(true);
        }
    }
    let enforcer = tokio::spawn(enforcement::enforcer(shared.clone(), enforce_rx));
    let sweeper = sweep::spawn(
        shared.clone(),
        config.sweep_every,
        config.gauges_every,
        shutdown.clone(),
    );

    let me = format!("{}", nuid::next());
    tracing::info!(instance = %me, copies = config.copies, "checker joining");
    let (complete, complete_rx) = watch::channel(false);
    let mut holder = Partitions {
        shared: shared.clone(),
        complete,
        sessions_health,
        relay,
    };
    let hold = members::hold(
        buckets.members.clone(),
        members::CHECKER,
        me,
        config.copies,
        &mut holder,
        shutdown.clone(),
    );
    let serve = serve(&shared, &config, &health, complete_rx, shutdown);
    let (held, served) = tokio::join!(hold, serve);

    watch_stop.fire();
    enforcer.abort();
    let _ = sweeper.await;
    for t in tasks {
        let _ = t.await;
    }
    held?;
    served?;
    tracing::info!("checker stopped");
    Ok(())
}

/// Serves the endpoints from the moment every partition assigned serves
/// (`complete`) until `shutdown`.
async fn serve(
    shared: &Arc<Shared>,
    config: &Config,
    health: &headcount_runtime::Health,
    mut complete: watch::Receiver<bool>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut stop = std::pin::pin!(shutdown.wait());
    tokio::select! {
        _ = &mut stop => return Ok(()),
        up = complete.wait_for(|c| *c) => {
            if up.is_err() {
                return Ok(());
            }
        }
    }
    let nats = &shared.nats;
    let service = nats
        .service_builder()
        .description("headcount: active devices per account and limit enforcement")
        .start("headcount-checker", env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("starting checker service: {e}"))?;
    let group = service.group(subjects::SERVICE_PREFIX);
    let mut served = Vec::new();
    for name in endpoints::SERVED {
        let ep = group
            .endpoint(name)
            .await
            .map_err(|e| anyhow::anyhow!("adding endpoint {name}: {e}"))?;
        served.push(ep.map(move |req| (name, req)).boxed());
    }
    let mut requests = futures::stream::select_all(served);
    let mut unknown = nats
        .queue_subscribe(
            format!("{}.>", subjects::SERVICE_PREFIX),
            "headcount-unknown".into(),
        )
        .await
        .context("subscribing for unknown endpoints")?;
    let serving = health.serving();
    tracing::info!(
        timeout = ?config.timeout,
        default_limit = config.default_limit.limit,
        default_policy = %config.default_limit.policy,
        partitions = shared.served().len(),
        "checker ready"
    );
    let result = loop {
        tokio::select! {
            _ = &mut stop => break Ok(()),
            req = requests.next() => match req {
                Some((name, req)) => {
                    let s = shared.clone();
                    tokio::spawn(async move { endpoints::serve(&s, name, req).await });
                }
                None => break Err(anyhow::anyhow!("service endpoints closed")),
            },
            msg = unknown.next() => {
                if let Some(msg) = msg {
                    endpoints::answer_unknown(nats, msg).await;
                }
            }
        }
    };
    drop(serving);
    let _ = unknown.unsubscribe().await;
    drop(requests);
    if let Err(e) = service.stop().await {
        tracing::warn!(error = %e, "stopping checker service");
    }
    result
}

/// Runs one partition until `stop`: subscribes to its heartbeats (liveness
/// first, so none sent while its sessions load is missed), fills its shard
/// of the view from its dictionaries, then serves the requests passed on
/// to it; stopping, it lets the requests under way end and empties the
/// shard.
async fn run_partition(
    shared: Arc<Shared>,
    p: u32,
    relay: Option<Relay>,
    ready: oneshot::Sender<()>,
    stop: Shutdown,
) -> anyhow::Result<()> {
    let mut heartbeats = Heartbeats::start(shared.clone(), p, relay).await?;
    // Sessions it has not heard yet get a whole timeout from now.
    {
        let mut v = shared.view_of(p);
        v.heard_nothing_until(now_millis());
        v.set_loading(true);
    }
    let (watch_stop, watch_shutdown) = Shutdown::new();
    let s = shared.clone();
    let (sessions_task, mut sessions_ready) = headcount_runtime::watch::follow_keys(
        shared.buckets.sessions.of(p).clone(),
        "sessions",
        &keys::session_dicts_of(p),
        move |entry| watches::on_dict_entry(&s, entry),
        watch_shutdown,
    )
    .await
    .context("watching sessions bucket")?;
    let mut stopped = std::pin::pin!(stop.wait());
    let loaded = loop {
        tokio::select! {
            _ = &mut stopped => break false,
            r = &mut sessions_ready => break r.is_ok(),
            heard = heartbeats.next() => heartbeats.take(heard).await?,
        }
    };
    shared.view_of(p).set_loading(false);
    let result = if loaded {
        serve_partition(&shared, p, &mut heartbeats, ready, stopped).await
    } else {
        Ok(())
    };
    // Not serving any more: `serve_partition` said so before it returned.
    drop(heartbeats);
    watch_stop.fire();
    let _ = sessions_task.await;
    shared.view_of(p).drop_sessions();
    result
}

/// The serving part of [`run_partition`], until `stopped`.
async fn serve_partition(
    shared: &Arc<Shared>,
    p: u32,
    heartbeats: &mut Heartbeats,
    ready: oneshot::Sender<()>,
    mut stopped: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> anyhow::Result<()> {
    let mut passed = shared
        .nats
        .queue_subscribe(
            subjects::partition_requests(p),
            subjects::checker_queue_group(p),
        )
        .await
        .context("subscribing to requests passed on")?;
    shared.set_serving(p, true);
    // Accounts loaded over their limit (e.g. lowered while no checker
    // held them).
    let loaded = shared.view_of(p).accounts();
    for a in loaded {
        shared.enforce(a);
    }
    let _ = ready.send(());
    let mut under_way = tokio::task::JoinSet::new();
    let result = loop {
        tokio::select! {
            _ = &mut stopped => break Ok(()),
            heard = heartbeats.next() => {
                if let Err(e) = heartbeats.take(heard).await {
                    break Err(e);
                }
            }
            msg = passed.next() => match msg {
                Some(msg) => {
                    let s = shared.clone();
                    under_way.spawn(async move { endpoints::serve_passed(&s, p, msg).await });
                }
                None => break Err(anyhow::anyhow!("request subscription closed")),
            },
            Some(_) = under_way.join_next(), if !under_way.is_empty() => {}
        }
    };
    // No new requests; those under way end before the shard is emptied.
    shared.set_serving(p, false);
    let _ = passed.unsubscribe().await;
    let wait = async { while under_way.join_next().await.is_some() {} };
    if tokio::time::timeout(REQUESTS_END_WAIT, wait).await.is_err() {
        tracing::warn!(partition = p, "letting go with requests still under way");
    }
    result
}

/// How long a partition let go waits for the requests under way on it.
const REQUESTS_END_WAIT: Duration = Duration::from_secs(5);
