//! checker: answers who is active and enforces each account's device limit.
//!
//! It keeps an in-memory [`view::View`] of every account, fed by watching the
//! KV buckets (interval dictionaries, revocations, limits) and by listening to
//! heartbeats for liveness, so no request costs a KV read. It serves the
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
//! watches deliver, `enforcement` ends sessions, `sweep` finds timeouts,
//! `endpoints` answers requests, and `shared` holds what they share. This
//! file wires them together in [`run`].
//!
//! Never: write the sessions bucket (the heartbeat-handler owns it), or
//! answer from anything but the view (`limits.set` answers with the record
//! it stored).

mod endpoints;
mod enforcement;
mod ledger;
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
use headcount_protocol::subjects;
use headcount_protocol::{AccountId, IntervalClock, Limit, Policy};
use headcount_runtime::{Shutdown, Wiring};

pub use metrics::Metrics;
use shared::Shared;
use view::Rules;

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
        }
    }
}

/// Starts one checker on its own task (see [`run`]): ready once its
/// watches have caught up and its endpoints answer.
pub fn start(config: Config, metrics: Metrics, wiring: Wiring) -> headcount_runtime::Running {
    let health = wiring.health.clone();
    headcount_runtime::Running::spawn("checker", health, run(config, metrics, wiring))
}

/// Runs one checker until `shutdown`.
///
/// Readiness goes to `health` (a scope of the caller's, which tracks the
/// NATS connection): components `sessions`, `revoked` and `limits`, ready
/// once their watch has replayed what the bucket held, and the scope
/// itself, serving from the moment the endpoints are up until it stops.
async fn run(config: Config, metrics: Metrics, wiring: Wiring) -> anyhow::Result<()> {
    let (nats, buckets) = (wiring.nats, wiring.buckets);
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

    // Liveness first, so no heartbeat sent while the view loads is missed.
    let mut heartbeats = nats
        .subscribe(subjects::PARTITIONED_WILDCARD)
        .await
        .context("subscribing to heartbeats")?;

    let (watch_stop, watch_shutdown) = Shutdown::new();
    let mut tasks = Vec::new();
    let mut ready = Vec::new();
    // Each bucket, what applies its entries to the view, and the component
    // that is ready once its watch has replayed what the bucket held.
    let watched: [(&kv::Store, &str, watches::OnEntry, _); 3] = [
        (
            &buckets.sessions,
            "sessions",
            watches::on_dict_entry,
            sessions_health,
        ),
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
    // Accounts loaded over their limit (e.g. lowered while we were down).
    let loaded: Vec<AccountId> = shared.each_view().flat_map(|v| v.accounts()).collect();
    for a in loaded {
        shared.enforce(a);
    }

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

    let sweeper = sweep::spawn(
        shared.clone(),
        config.sweep_every,
        config.gauges_every,
        shutdown.clone(),
    );
    let serving = health.serving();
    tracing::info!(
        timeout = ?config.timeout,
        default_limit = config.default_limit.limit,
        default_policy = %config.default_limit.policy,
        "checker ready"
    );
    let mut stop = std::pin::pin!(shutdown.wait());
    loop {
        tokio::select! {
            _ = &mut stop => break,
            msg = heartbeats.next() => match msg {
                Some(msg) => watches::on_heartbeat(&shared, &msg.subject),
                None => anyhow::bail!("heartbeat subscription closed"),
            },
            req = requests.next() => match req {
                Some((name, req)) => {
                    let s = shared.clone();
                    tokio::spawn(async move { endpoints::serve(&s, name, req).await });
                }
                None => anyhow::bail!("service endpoints closed"),
            },
            msg = unknown.next() => {
                if let Some(msg) = msg {
                    endpoints::answer_unknown(&nats, msg).await;
                }
            }
        }
    }

    drop(serving);
    let _ = heartbeats.unsubscribe().await;
    let _ = unknown.unsubscribe().await;
    drop(requests);
    if let Err(e) = service.stop().await {
        tracing::warn!(error = %e, "stopping checker service");
    }
    watch_stop.fire();
    enforcer.abort();
    let _ = sweeper.await;
    for t in tasks {
        let _ = t.await;
    }
    tracing::info!("checker stopped");
    Ok(())
}
