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
//! Never: write the sessions bucket (the heartbeat-handler owns it), or
//! answer from anything but the view.

pub mod metrics;
pub mod view;

use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::kv;
use async_nats::service::ServiceExt;
use bytes::Bytes;
use futures::StreamExt;
use headcount_protocol::subjects::{self, endpoint, kv as keys};
use headcount_protocol::wire::{
    self, AccountRequest, AccountUsage, ActiveReply, CheckReply, CheckRequest, ControlMessage,
    ControlType, EndReason, EventType, KickReply, KickRequest, LimitsReply, LimitsSetRequest,
    PresenceEvent, Revocation, SessionRef, StatsReply, StatsRequest, error_code,
};
use headcount_protocol::{AccountId, AccountLimits, IntervalClock, Limit, Policy, now_millis};
use headcount_runtime::{Buckets, Health, Shutdown, service_error};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

pub use metrics::Metrics;
use view::{Rules, View};

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

/// The view is split by account over this many independently locked
/// shards, so that a sweep or a breakdown over millions of sessions never
/// holds up a request for longer than one shard takes.
const SHARDS: usize = 32;

struct Shared {
    shards: Box<[Mutex<View>]>,
    shard_keys: RandomState,
    /// Highest active count over every account, per minute.
    global_peaks: Mutex<view::Peaks>,
    buckets: Buckets,
    nats: async_nats::Client,
    metrics: Metrics,
    enforce_tx: mpsc::UnboundedSender<AccountId>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// The shard holding `account`.
    fn view(&self, account: &str) -> MutexGuard<'_, View> {
        let i = self.shard_keys.hash_one(account) as usize % self.shards.len();
        lock(&self.shards[i])
    }

    /// Every shard, one at a time.
    fn each_view(&self) -> impl Iterator<Item = MutexGuard<'_, View>> {
        self.shards.iter().map(lock)
    }
}

/// Runs one checker until `shutdown`.
///
/// Readiness goes to `health` (a scope of the caller's, which tracks the
/// NATS connection): components `sessions`, `revoked` and `limits`, ready
/// once their watch has replayed what the bucket held, and the scope
/// itself, serving from the moment the endpoints are up until it stops.
pub async fn run(
    config: Config,
    nats: async_nats::Client,
    buckets: Buckets,
    metrics: Metrics,
    health: Health,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let sessions_health = health.component("sessions");
    let revoked_health = health.component("revoked");
    let limits_health = health.component("limits");
    let rules = Rules {
        clock: IntervalClock::new(config.interval),
        timeout_ms: config.timeout.as_millis() as u64,
        default_limit: config.default_limit,
    };
    let (enforce_tx, enforce_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        shards: {
            let started = now_millis();
            (0..SHARDS)
                .map(|_| Mutex::new(View::with_plans(rules, config.plans.clone(), started)))
                .collect()
        },
        shard_keys: RandomState::new(),
        global_peaks: Mutex::new(view::Peaks::default()),
        buckets: buckets.clone(),
        nats: nats.clone(),
        metrics,
        enforce_tx,
    });

    // Liveness first, so no heartbeat sent while the view loads is missed.
    let mut heartbeats = nats
        .subscribe(subjects::HEARTBEAT_WILDCARD)
        .await
        .context("subscribing to heartbeats")?;

    let (watch_stop, watch_shutdown) = Shutdown::new();
    let mut tasks = Vec::new();
    let mut ready = Vec::new();
    let s = shared.clone();
    let (t, r) = headcount_runtime::watch::follow(
        buckets.sessions.clone(),
        "sessions",
        move |e| on_dict_entry(&s, e),
        watch_shutdown.clone(),
    )
    .await
    .context("watching sessions bucket")?;
    tasks.push(t);
    ready.push((sessions_health, r));
    let s = shared.clone();
    let (t, r) = headcount_runtime::watch::follow(
        buckets.revoked.clone(),
        "revoked",
        move |e| {
            if let Some((account, session)) = keys::parse_revoked(&e.key) {
                let mut v = s.view(account.as_str());
                match e.operation {
                    kv::Operation::Put => v.revoke(&account, &session),
                    _ => v.unrevoke(&account, &session),
                }
            }
        },
        watch_shutdown.clone(),
    )
    .await
    .context("watching revoked bucket")?;
    tasks.push(t);
    ready.push((revoked_health, r));
    let s = shared.clone();
    let (t, r) = headcount_runtime::watch::follow(
        buckets.limits.clone(),
        "limits",
        move |e| on_limit_entry(&s, e),
        watch_shutdown,
    )
    .await
    .context("watching limits bucket")?;
    tasks.push(t);
    ready.push((limits_health, r));
    for (component, r) in ready {
        if r.await.is_ok() {
            component.set_ready(true);
        }
    }

    let enforcer = tokio::spawn(enforcer(shared.clone(), enforce_rx));
    // Accounts loaded over their limit (e.g. lowered while we were down).
    let loaded: Vec<AccountId> = shared.each_view().flat_map(|v| v.accounts()).collect();
    for a in loaded {
        let _ = shared.enforce_tx.send(a);
    }

    let service = nats
        .service_builder()
        .description("headcount: active devices per account and limit enforcement")
        .start("headcount-checker", env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("starting checker service: {e}"))?;
    let group = service.group(subjects::SERVICE_PREFIX);
    let mut endpoints = Vec::new();
    for name in [
        endpoint::ACTIVE,
        endpoint::CHECK,
        endpoint::LIMITS_GET,
        endpoint::LIMITS_SET,
        endpoint::KICK,
        endpoint::STATS,
    ] {
        let ep = group
            .endpoint(name)
            .await
            .map_err(|e| anyhow::anyhow!("adding endpoint {name}: {e}"))?;
        endpoints.push(ep.map(move |req| (name, req)).boxed());
    }
    let mut requests = futures::stream::select_all(endpoints);
    let mut unknown = nats
        .queue_subscribe(
            format!("{}.>", subjects::SERVICE_PREFIX),
            "headcount-unknown".into(),
        )
        .await
        .context("subscribing for unknown endpoints")?;

    // The sweep runs on its own task, so that a long pass (a breakdown over
    // millions of sessions) never delays the dispatch of requests.
    let sweeper = {
        let (shared, every, stop) = (shared.clone(), config.sweep_every, shutdown.clone());
        let gauge_rounds =
            (config.gauges_every.as_millis() / every.as_millis().max(1)).max(1) as u64;
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(every);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut stop = std::pin::pin!(stop.wait());
            let mut round = 0u64;
            let mut was_down = false;
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = sweep.tick() => {
                        // No timeouts while this checker cannot hear the
                        // heartbeats, and a fresh start once it can again.
                        let up = shared.nats.connection_state()
                            == async_nats::connection::State::Connected;
                        if !up {
                            was_down = true;
                            continue;
                        }
                        if was_down {
                            was_down = false;
                            let now = now_millis();
                            tracing::info!("reconnected: sessions get a fresh timeout");
                            for mut v in shared.each_view() {
                                v.heard_nothing_until(now);
                            }
                        }
                        round += 1;
                        on_sweep(&shared, (round - 1).is_multiple_of(gauge_rounds)).await;
                    }
                }
            }
        })
    };
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
                Some(msg) => {
                    if let Ok(ids) = subjects::parse_heartbeat_ref(&msg.subject) {
                        let revived = shared.view(ids.account).heard(
                            ids.account,
                            ids.device,
                            ids.session,
                            now_millis(),
                        );
                        if revived && let Ok(account) = AccountId::parse(ids.account) {
                            let _ = shared.enforce_tx.send(account);
                        }
                    }
                }
                None => anyhow::bail!("heartbeat subscription closed"),
            },
            req = requests.next() => match req {
                Some((name, req)) => {
                    let s = shared.clone();
                    tokio::spawn(async move { serve(&s, name, req).await });
                }
                None => anyhow::bail!("service endpoints closed"),
            },
            msg = unknown.next() => {
                if let Some(msg) = msg {
                    answer_unknown(&nats, msg).await;
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

fn on_dict_entry(shared: &Shared, entry: kv::Entry) {
    let Some((account, interval)) = keys::parse_session_dict(&entry.key) else {
        return;
    };
    let dict = match entry.operation {
        kv::Operation::Put => match wire::decode_dict(&entry.value) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(key = %entry.key, error = %e, "unreadable interval dictionary");
                return;
            }
        },
        _ => Default::default(),
    };
    shared
        .view(account.as_str())
        .set_dict(&account, interval, dict);
    let _ = shared.enforce_tx.send(account);
}

fn on_limit_entry(shared: &Shared, entry: kv::Entry) {
    fn read<T: DeserializeOwned>(entry: &kv::Entry) -> Result<Option<T>, ()> {
        match entry.operation {
            kv::Operation::Put => serde_json::from_slice(&entry.value).map(Some).map_err(|e| {
                tracing::warn!(key = %entry.key, error = %e, "unreadable limits entry");
            }),
            _ => Ok(None),
        }
    }
    let account = match keys::parse_limits(&entry.key) {
        Some(keys::LimitsKey::Overrides(account)) => {
            let Ok(o) = read::<AccountLimits>(&entry) else {
                return;
            };
            shared.view(account.as_str()).set_overrides(&account, o);
            account
        }
        Some(keys::LimitsKey::TokenPlan(account)) => {
            let Ok(plan) = read::<String>(&entry) else {
                return;
            };
            shared.view(account.as_str()).set_token_plan(&account, plan);
            account
        }
        None => return,
    };
    let _ = shared.enforce_tx.send(account);
}

/// Ends sessions beyond each changed account's limit.
async fn enforcer(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<AccountId>) {
    while let Some(account) = rx.recv().await {
        let verdicts = shared
            .view(account.as_str())
            .over_limit(&account, now_millis());
        for v in verdicts {
            let reason = if v.rejected {
                EndReason::Rejected
            } else {
                EndReason::Evicted
            };
            end_session(&shared, &account, &v.victim, reason, v.by).await;
        }
    }
}

async fn on_sweep(shared: &Shared, gauges: bool) {
    let now = now_millis();
    let mut timed_out = Vec::new();
    let mut total = 0u32;
    let mut expired_grace = Vec::new();
    for mut v in shared.each_view() {
        let (t, n) = v.sweep(now);
        timed_out.extend(t);
        total += n;
        expired_grace.extend(v.grace_expired(now));
    }
    lock(&shared.global_peaks).record(now / 60_000, total);
    shared.metrics.active_sessions.set(total as i64);
    for account in expired_grace {
        let _ = shared.enforce_tx.send(account);
    }
    // The breakdown gauges cost a pass over every session (millions, on a
    // big checker): only every `gauges_every`, starting with the first round.
    if gauges {
        let b = breakdown_all(shared, now);
        shared.metrics.set_breakdown(&b);
    }
    for (account, s) in timed_out {
        // One announcement per timeout, however many checkers saw it.
        match shared
            .buckets
            .timeouts
            .create(keys::revoked(&account, &s.session), Bytes::new())
            .await
        {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
            Err(e) => {
                tracing::warn!(%account, session = %s.session, error = %e, "recording a timeout; announcing anyway");
            }
        }
        publish_event(
            shared,
            PresenceEvent {
                kind: EventType::Timeout,
                account,
                device: s.device,
                session: s.session,
                at: now,
                by: None,
                reason: None,
                content: s.labels.content().map(str::to_owned),
            },
        )
        .await;
    }
}

/// Ends one session: records the revocation (create-only, so concurrent
/// checkers agree on one winner), then the winner tells the device and
/// publishes the event. Returns whether this call ended it.
async fn end_session(
    shared: &Shared,
    account: &AccountId,
    victim: &SessionRef,
    reason: EndReason,
    by: Option<SessionRef>,
) -> bool {
    let now = now_millis();
    let revocation = Revocation {
        reason,
        device: victim.device.clone(),
        at: now,
        by: by.clone(),
    };
    let body = serde_json::to_vec(&revocation).unwrap_or_default();
    let won = match shared
        .buckets
        .revoked
        .create(keys::revoked(account, &victim.session), body.into())
        .await
    {
        Ok(_) => true,
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
        Err(e) => {
            tracing::warn!(%account, session = %victim.session, error = %e, "recording revocation");
            return false;
        }
    };
    shared
        .view(account.as_str())
        .revoke(account, &victim.session);
    if !won {
        return false;
    }
    let (control, event, action) = match reason {
        EndReason::Evicted => (
            ControlType::DeviceLimitExceeded,
            EventType::Evicted,
            "evicted",
        ),
        EndReason::Rejected => (
            ControlType::DeviceLimitExceeded,
            EventType::Rejected,
            "rejected",
        ),
        EndReason::Revoked | EndReason::Replaced => {
            (ControlType::Revoked, EventType::Revoked, "revoked")
        }
    };
    shared
        .metrics
        .enforcements
        .with_label_values(&[action])
        .inc();
    tracing::info!(%account, device = %victim.device, session = %victim.session, action, "session ended");
    let msg = ControlMessage {
        kind: control,
        account: account.clone(),
        device: victim.device.clone(),
        session: victim.session.clone(),
        at: now,
        by: by.clone(),
    };
    if let Err(e) = shared
        .nats
        .publish(
            subjects::control(account, &victim.device),
            msg.encode().into(),
        )
        .await
    {
        tracing::warn!(%account, error = %e, "sending control message");
    }
    publish_event(
        shared,
        PresenceEvent {
            kind: event,
            account: account.clone(),
            device: victim.device.clone(),
            session: victim.session.clone(),
            at: now,
            by,
            reason: None,
            content: None,
        },
    )
    .await;
    true
}

async fn publish_event(shared: &Shared, event: PresenceEvent) {
    let kind = serde_json::to_value(event.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let body = serde_json::to_vec(&event).unwrap_or_default();
    if let Err(e) = shared
        .nats
        .publish(subjects::events(&event.account), body.into())
        .await
    {
        tracing::warn!(error = %e, "publishing presence event");
        return;
    }
    shared.metrics.events.with_label_values(&[&kind]).inc();
}

/// A failed request: the micro error code and a readable message.
struct Failure(usize, String);

fn bad_request(e: impl std::fmt::Display) -> Failure {
    Failure(error_code::BAD_REQUEST, e.to_string())
}

fn parse<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Failure> {
    wire::parse_request(payload).map_err(bad_request)
}

fn json<T: Serialize>(value: &T) -> Result<Bytes, Failure> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| Failure(error_code::INTERNAL, format!("encoding reply: {e}")))
}

async fn serve(shared: &Shared, name: &'static str, req: async_nats::service::Request) {
    let started = Instant::now();
    let payload = req.message.payload.clone();
    let result = match name {
        endpoint::ACTIVE => active(shared, &payload),
        endpoint::CHECK => check(shared, &payload).await,
        endpoint::LIMITS_GET => limits_get(shared, &payload),
        endpoint::LIMITS_SET => limits_set(shared, &payload).await,
        endpoint::KICK => kick(shared, &payload).await,
        endpoint::STATS => stats(shared, &payload),
        _ => Err(Failure(
            error_code::NOT_FOUND,
            format!("unknown endpoint {name}"),
        )),
    };
    let outcome = match &result {
        Ok(_) => "ok",
        Err(Failure(error_code::BAD_REQUEST, _)) => "bad_request",
        Err(Failure(error_code::NOT_FOUND, _)) => "not_found",
        Err(_) => "error",
    };
    let reply = result.map_err(|Failure(code, msg)| service_error(code, msg));
    if let Err(e) = req.respond(reply).await {
        tracing::warn!(endpoint = name, error = %e, "sending reply");
    }
    shared
        .metrics
        .requests
        .with_label_values(&[name, outcome])
        .inc();
    shared
        .metrics
        .request_seconds
        .with_label_values(&[name])
        .observe(started.elapsed().as_secs_f64());
}

fn active(shared: &Shared, payload: &[u8]) -> Result<Bytes, Failure> {
    let req: AccountRequest = parse(payload)?;
    let (sessions, limit) = {
        let v = shared.view(req.account.as_str());
        (v.active(&req.account, now_millis()), v.limit(&req.account))
    };
    json(&ActiveReply {
        account: req.account,
        active: sessions.len() as u32,
        limit: limit.limit,
        policy: limit.policy,
        sessions,
    })
}

async fn check(shared: &Shared, payload: &[u8]) -> Result<Bytes, Failure> {
    let req: CheckRequest = parse(payload)?;
    if let Some(c) = &req.content
        && c.len() > wire::MAX_CONTENT_LEN
    {
        return Err(bad_request(format!(
            "content is longer than {} bytes",
            wire::MAX_CONTENT_LEN
        )));
    }
    let outcome = shared
        .view(req.account.as_str())
        .check(
            &req.account,
            &req.device,
            req.content.as_deref(),
            req.evict.as_ref(),
            now_millis(),
        )
        .map_err(bad_request)?;
    let by = req.session.clone().map(|session| SessionRef {
        device: req.device.clone(),
        session,
    });
    for victim in &outcome.victims {
        end_session(shared, &req.account, victim, EndReason::Evicted, by.clone()).await;
    }
    json(&CheckReply {
        allowed: outcome.allowed,
        active: outcome.active,
        limit: outcome.limit.limit,
        policy: outcome.limit.policy,
        evicted: outcome.victims,
    })
}

fn limits_reply(view: &View, account: AccountId) -> LimitsReply {
    let (limit, plan) = view.limit_and_plan(&account);
    LimitsReply {
        account,
        limit: limit.limit,
        policy: limit.policy,
        per_content: limit.per_content,
        grace: limit.grace,
        plan,
    }
}

fn limits_get(shared: &Shared, payload: &[u8]) -> Result<Bytes, Failure> {
    let req: AccountRequest = parse(payload)?;
    let reply = limits_reply(&shared.view(req.account.as_str()), req.account);
    json(&reply)
}

/// Validates a `limits.set` request against the stored record: the new
/// record, or a 400 naming what is wrong (nothing is stored then).
fn merge_limits(view: &View, req: &LimitsSetRequest) -> Result<AccountLimits, Failure> {
    let nothing = req.limit.is_none()
        && req.plan.is_none()
        && req.policy.is_none()
        && req.per_content.is_none()
        && req.grace.is_none();
    if nothing && !req.reset {
        return Err(bad_request(
            "nothing to set: give limit, plan, policy, per_content, grace or reset",
        ));
    }
    let mut o = if req.reset {
        AccountLimits::default()
    } else {
        view.overrides(&req.account).cloned().unwrap_or_default()
    };
    if let Some(plan) = &req.plan {
        if !view.plans().contains_key(plan) {
            let known: Vec<&str> = view.plans().keys().map(String::as_str).collect();
            return Err(bad_request(format!(
                "unknown plan {plan:?}: known plans are {}",
                known.join(", ")
            )));
        }
        o.plan = Some(plan.clone());
    }
    if let Some(p) = &req.policy {
        o.policy = Some(p.parse::<Policy>().map_err(bad_request)?);
    }
    // Validate the numbers through Limit's own checks.
    let probe = Limit::new(req.limit.unwrap_or(1), Policy::EvictOldest)
        .and_then(|l| l.with_per_content(req.per_content))
        .and_then(|l| l.with_grace(req.grace.map(|g| (g.seats, g.secs))))
        .map_err(bad_request)?;
    if req.limit.is_some() {
        o.limit = Some(probe.limit);
    }
    if req.per_content.is_some() {
        o.per_content = probe.per_content;
    }
    if req.grace.is_some() {
        o.grace = probe.grace;
    }
    Ok(o)
}

async fn limits_set(shared: &Shared, payload: &[u8]) -> Result<Bytes, Failure> {
    let req: LimitsSetRequest = parse(payload)?;
    let record = merge_limits(&shared.view(req.account.as_str()), &req)?;
    let key = keys::limits(&req.account);
    let stored = if record == AccountLimits::default() {
        shared
            .buckets
            .limits
            .delete(key)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    } else {
        let body = serde_json::to_vec(&record)
            .map_err(|e| Failure(error_code::INTERNAL, e.to_string()))?;
        shared
            .buckets
            .limits
            .put(key, body.into())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    stored.map_err(|e| Failure(error_code::INTERNAL, format!("storing limits: {e}")))?;
    // Apply here at once; the watch brings the same record to every replica.
    let reply = {
        let mut v = shared.view(req.account.as_str());
        v.set_overrides(
            &req.account,
            (record != AccountLimits::default()).then_some(record),
        );
        limits_reply(&v, req.account.clone())
    };
    let _ = shared.enforce_tx.send(req.account);
    json(&reply)
}

fn stats(shared: &Shared, payload: &[u8]) -> Result<Bytes, Failure> {
    let req: StatsRequest = if payload.iter().all(u8::is_ascii_whitespace) {
        StatsRequest {
            account: None,
            top: None,
        }
    } else {
        parse(payload)?
    };
    let now = now_millis();
    let (b, top) = match &req.account {
        Some(a) => (shared.view(a.as_str()).breakdown(a, now), Vec::new()),
        None => {
            let n = req.top.unwrap_or(10).min(1000) as usize;
            let mut top: Vec<(AccountId, u32, Limit)> =
                shared.each_view().flat_map(|v| v.top(n, now)).collect();
            top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            let top = top
                .into_iter()
                .take(n)
                .map(|(account, active, limit)| AccountUsage {
                    account,
                    active,
                    limit: limit.limit,
                })
                .collect();
            (breakdown_all(shared, now), top)
        }
    };
    json(&StatsReply {
        account: req.account,
        active: b.total,
        peak: b.peak,
        window_minutes: view::PEAK_WINDOW_MINUTES as u32,
        by_content: b.by_content,
        by_kind: b.by_kind,
        by_region: b.by_region,
        top,
    })
}

/// Active sessions over every account by content, kind and region, shard
/// by shard, with the peak over every account.
fn breakdown_all(shared: &Shared, now: headcount_protocol::UnixMillis) -> view::Breakdown {
    let mut all = view::Breakdown::default();
    for v in shared.each_view() {
        let b = v.breakdown_all(now);
        drop(v);
        all.total += b.total;
        for (into, from) in [
            (&mut all.by_content, b.by_content),
            (&mut all.by_kind, b.by_kind),
            (&mut all.by_region, b.by_region),
        ] {
            for (k, n) in from {
                *into.entry(k).or_default() += n;
            }
        }
    }
    let peak = lock(&shared.global_peaks).max();
    all.peak = peak.max(all.total);
    all
}

async fn kick(shared: &Shared, payload: &[u8]) -> Result<Bytes, Failure> {
    let req: KickRequest = parse(payload)?;
    let device = {
        let v = shared.view(req.account.as_str());
        if v.is_revoked(&req.account, &req.session) {
            None
        } else {
            v.find_session(&req.account, &req.session, now_millis())
        }
    };
    let kicked = match device {
        Some(device) => {
            let victim = SessionRef {
                device,
                session: req.session,
            };
            end_session(shared, &req.account, &victim, EndReason::Revoked, None).await
        }
        None => false,
    };
    json(&KickReply { kicked })
}

/// Requests to a `headcount.*` subject no service serves get a 404 instead
/// of a silent time-out.
async fn answer_unknown(nats: &async_nats::Client, msg: async_nats::Message) {
    let Some(reply) = msg.reply else {
        return; // events and other publications are not requests
    };
    // Answer only what looks like a reply subject: an inbox, or the
    // server's rewritten reply of a request from another account. A
    // request naming, say, a control subject as its reply gets no answer:
    // this service publishes there for real.
    if !(reply.starts_with("_INBOX") || reply.starts_with("_R_.")) {
        return;
    }
    let name = msg
        .subject
        .strip_prefix(subjects::SERVICE_PREFIX)
        .and_then(|s| s.strip_prefix('.'))
        .unwrap_or_default();
    if endpoint::ALL.contains(&name) {
        return; // some service serves it
    }
    let text = format!("unknown endpoint {}", msg.subject);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::service::NATS_SERVICE_ERROR, text.as_str());
    headers.insert(
        async_nats::service::NATS_SERVICE_ERROR_CODE,
        error_code::NOT_FOUND.to_string().as_str(),
    );
    if let Err(e) = nats.publish_with_headers(reply, headers, text.into()).await {
        tracing::warn!(error = %e, "answering unknown endpoint");
    }
}
