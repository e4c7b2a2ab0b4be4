//! heartbeat-handler: turns device heartbeats into interval dictionaries in
//! NATS KV.
//!
//! Every instance joins one queue group on `hb.*.*.*`, so each heartbeat is
//! handled once however many instances run. A heartbeat is validated (subject
//! names, size, MessagePack shape, field lengths, revocation) and then only
//! changes state when it says something new: a session entering the current
//! interval, a changed field, a leave. Those changes are coalesced per
//! dictionary and written with compare-and-set on the KV revision, so two
//! instances never lose each other's writes and KV load follows sessions and
//! intervals, not heartbeats.
//!
//! Layout: [`dicts`] holds the rules (pure), [`metrics`] the collectors, and
//! this file the I/O: subscription, KV watches and the flusher.
//!
//! Never: write a dictionary without an expected revision, or drop a valid
//! session's change on a failed write (it is retried until it lands).

pub mod dicts;
pub mod metrics;
pub mod rate;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::kv;
use futures::StreamExt;
use headcount_protocol::subjects::{self, kv as keys};
use headcount_protocol::wire::{
    self, EndReason, EventType, HeartbeatError, HeartbeatRef, PresenceEvent, Revocation, SessionRef,
};
use headcount_protocol::{AccountId, IntervalClock, SessionId, now_millis};
use headcount_runtime::{Buckets, Health, Shutdown};
use tokio::sync::mpsc;

pub use metrics::Metrics;

use dicts::{Applied, Change, Decision, Dicts, apply};

/// Handler settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Length of one interval dictionary.
    pub interval: Duration,
    /// How long a revocation is remembered (as long as a token lives).
    pub revoked_ttl: Duration,
    /// Dictionary writes in flight at once.
    pub max_concurrent_writes: usize,
    /// Heartbeats per second one session may keep up (per handler
    /// instance); the excess is dropped and counted as `rate_limited`.
    pub max_rate: f64,
    /// Heartbeats one session may send in a burst.
    pub burst: u32,
    /// How long a live session's move into a new interval waits, so that
    /// one write per account carries every session of it.
    pub carry_delay: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(120),
            revoked_ttl: Duration::from_secs(3600),
            max_concurrent_writes: 256,
            // Ten times a 5 s heartbeat.
            max_rate: 2.0,
            burst: 10,
            // One heartbeat period.
            carry_delay: Duration::from_secs(5),
        }
    }
}

type Key = (AccountId, u64);

struct Shared {
    dicts: Mutex<Dicts>,
    /// Ended sessions, by id (session ids are unique across accounts).
    revoked: moka::sync::Cache<SessionId, ()>,
    buckets: Buckets,
    nats: async_nats::Client,
    metrics: Metrics,
    flush_tx: mpsc::UnboundedSender<Key>,
    rate: Mutex<rate::RateLimiter>,
    carry_delay: Duration,
}

impl Shared {
    fn dicts(&self) -> MutexGuard<'_, Dicts> {
        // A panic while holding the lock cannot leave the dictionaries
        // half-written (every mutation is a single insert), so keep going.
        self.dicts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs one handler instance until `shutdown`, then stops taking heartbeats
/// and writes everything still pending before returning.
///
/// Readiness goes to `health` (a scope of the caller's, which tracks the
/// NATS connection): components `sessions` and `revoked`, ready once their
/// watch has replayed what the bucket held, and the scope itself, serving
/// from the moment the heartbeat subscription is up until the drain starts.
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
    let clock = IntervalClock::new(config.interval);
    let (flush_tx, flush_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        dicts: Mutex::new(Dicts::new(clock)),
        revoked: moka::sync::Cache::builder()
            .time_to_live(config.revoked_ttl)
            .build(),
        buckets: buckets.clone(),
        nats: nats.clone(),
        metrics,
        flush_tx,
        rate: Mutex::new(rate::RateLimiter::new(config.max_rate, config.burst)),
        carry_delay: config.carry_delay,
    });

    // A complete view first: deciding on a partial one would emit false joins.
    let (watch_stop, watch_shutdown) = Shutdown::new();
    let s = shared.clone();
    let (sessions_task, sessions_ready) = headcount_runtime::watch::follow(
        buckets.sessions.clone(),
        "sessions",
        move |entry| on_dict_entry(&s, entry),
        watch_shutdown.clone(),
    )
    .await
    .context("watching sessions bucket")?;
    let s = shared.clone();
    let (revoked_task, revoked_ready) = headcount_runtime::watch::follow(
        buckets.revoked.clone(),
        "revoked",
        move |entry| {
            if entry.operation == kv::Operation::Put
                && let Some(k) = keys::parse_revoked(&entry.key)
            {
                s.revoked.insert(k.1, ());
            }
        },
        watch_shutdown,
    )
    .await
    .context("watching revoked bucket")?;
    if sessions_ready.await.is_ok() {
        sessions_health.set_ready(true);
    }
    if revoked_ready.await.is_ok() {
        revoked_health.set_ready(true);
    }

    let flusher = tokio::spawn(flusher(
        shared.clone(),
        flush_rx,
        config.max_concurrent_writes,
    ));

    let mut sub = nats
        .queue_subscribe(
            subjects::HEARTBEAT_WILDCARD,
            subjects::HANDLER_QUEUE_GROUP.into(),
        )
        .await
        .context("subscribing to heartbeats")?;
    let serving = health.serving();
    tracing::info!(interval = ?config.interval, "heartbeat-handler ready");

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut stop = std::pin::pin!(shutdown.wait());
    loop {
        tokio::select! {
            _ = &mut stop => break,
            msg = sub.next() => match msg {
                Some(msg) => on_message(&shared, &msg.subject, &msg.payload),
                None => anyhow::bail!("heartbeat subscription closed"),
            },
            _ = tick.tick() => {
                let now = now_millis();
                {
                    let mut d = shared.dicts();
                    d.prune(now);
                    shared.metrics.sessions.set(d.session_count(now) as i64);
                }
                shared.rate.lock().unwrap_or_else(|p| p.into_inner()).prune(now);
            }
        }
    }

    // Drain: take no new heartbeats, handle those already delivered, then
    // let every pending write land.
    drop(serving);
    if let Err(e) = sub.drain().await {
        tracing::warn!(error = %e, "draining heartbeat subscription");
    }
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
        on_message(&shared, &msg.subject, &msg.payload);
    }
    // Deferred carry-overs are written now rather than after their delay.
    for key in shared.dicts().pending_keys() {
        let _ = shared.flush_tx.send(key);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pending_writes(&shared) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if pending_writes(&shared) {
        tracing::warn!("stopping with dictionary writes still pending");
    }
    watch_stop.fire();
    flusher.abort();
    let _ = sessions_task.await;
    let _ = revoked_task.await;
    tracing::info!("heartbeat-handler stopped");
    Ok(())
}

fn pending_writes(shared: &Shared) -> bool {
    shared.dicts().has_pending()
}

fn on_dict_entry(shared: &Shared, entry: kv::Entry) {
    let Some((account, interval)) = keys::parse_session_dict(&entry.key) else {
        return;
    };
    let entries = match entry.operation {
        kv::Operation::Put => match wire::decode_dict(&entry.value) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(key = %entry.key, error = %e, "unreadable interval dictionary");
                return;
            }
        },
        kv::Operation::Delete | kv::Operation::Purge => Default::default(),
    };
    let mut d = shared.dicts();
    d.entry(&account, interval).install(entry.revision, entries);
    d.trim(&account, now_millis());
}

/// Handles one heartbeat message. Never fails: bad input is counted.
///
/// The common case (a known session, nothing new) allocates nothing: names
/// and fields are borrowed from the message and looked up as `&str`.
fn on_message(shared: &Shared, subject: &str, payload: &[u8]) {
    let c = &shared.metrics.hb;
    let ids = match subjects::parse_heartbeat_ref(subject) {
        Ok(ids) => ids,
        Err(e) => {
            c.invalid.inc();
            tracing::debug!(subject, error = %e, "dropping heartbeat");
            return;
        }
    };
    let now = now_millis();
    let allowed = shared
        .rate
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .allow(ids.session, now);
    if !allowed {
        c.rate_limited.inc();
        return;
    }
    let hb = match HeartbeatRef::decode(payload) {
        Ok(hb) => hb,
        Err(e) => {
            match e {
                HeartbeatError::FieldTooLong { .. } => c.invalid.inc(),
                HeartbeatError::TooLarge(_) | HeartbeatError::Malformed(_) => c.malformed.inc(),
            }
            tracing::debug!(subject, error = %e, "dropping heartbeat");
            return;
        }
    };
    if shared.revoked.contains_key(ids.session) {
        c.revoked.inc();
        return;
    }
    let decision = {
        let mut d = shared.dicts();
        if d.unchanged(ids.account, ids.device, ids.session, &hb, now) {
            drop(d);
            c.accepted.inc();
            return;
        }
        let ids = ids.to_owned();
        d.on_heartbeat(&ids.account, &ids.device, &ids.session, &hb.to_owned(), now)
    };
    let m = &shared.metrics;
    match decision {
        Decision::Superseded => m.hb.revoked.inc(),
        Decision::Unchanged => m.hb.accepted.inc(),
        Decision::Queued(keys) => {
            m.hb.accepted.inc();
            for key in keys {
                let _ = shared.flush_tx.send(key);
            }
        }
        Decision::Deferred(keys) => {
            m.hb.accepted.inc();
            for key in keys {
                let tx = shared.flush_tx.clone();
                let delay = shared.carry_delay;
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = tx.send(key);
                });
            }
        }
    }
}

async fn flusher(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Key>, max: usize) {
    let permits = Arc::new(tokio::sync::Semaphore::new(max.max(1)));
    while let Some(key) = rx.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            flush(&shared, key).await;
            drop(permit);
        });
    }
}

/// Writes one dictionary's pending changes with compare-and-set. On a
/// conflict it re-reads, re-applies and schedules itself again; on any other
/// failure it puts the changes back and retries after a pause, so a valid
/// session's change is never dropped.
async fn flush(shared: &Shared, key: Key) {
    let (account, interval) = &key;
    let taken = {
        let mut d = shared.dicts();
        let Some(dict) = d.get_mut(account, interval.to_owned()) else {
            return;
        };
        if dict.in_flight || dict.pending.is_empty() {
            return;
        }
        dict.in_flight = true;
        dict.deferred = false;
        if dict.partial {
            None
        } else {
            Some((
                dict.revision,
                dict.entries.clone(),
                std::mem::take(&mut dict.pending),
            ))
        }
    };
    let Some((revision, before, changes)) = taken else {
        // Trimmed in memory: write on top of the whole KV copy.
        reread(shared, &key).await;
        let _ = shared.flush_tx.send(key.clone());
        return;
    };
    let changes = shared.dicts().resolve(account, *interval, changes);
    let mut after = before.clone();
    let mut applied = Vec::with_capacity(changes.len());
    let mut changed = false;
    for (device, change) in &changes {
        let what = apply(&mut after, device, change);
        if what != Applied::Nothing {
            changed = true;
            // A forgotten entry's leave is announced by the newer interval.
            if !matches!(change, Change::Forget(_)) {
                applied.push((device.clone(), what));
            }
        }
    }

    let kv_key = keys::session_dict(account, *interval);
    let m = &shared.metrics;
    let result = if !changed {
        Ok(revision)
    } else {
        let timer = m.kv_write_seconds.start_timer();
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            shared
                .buckets
                .sessions
                .update(&kv_key, wire::encode_dict(&after).into(), revision),
        )
        .await;
        timer.observe_duration();
        match r {
            Ok(Ok(rev)) => Ok(rev),
            Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Err(true),
            Ok(Err(e)) => {
                tracing::warn!(key = %kv_key, error = %e, "dictionary write failed, retrying");
                Err(false)
            }
            Err(_) => {
                tracing::warn!(key = %kv_key, "dictionary write timed out, retrying");
                Err(false)
            }
        }
    };

    match result {
        Ok(new_revision) => {
            if changed {
                m.kv_writes.with_label_values(&["ok"]).inc();
            }
            let reschedule = {
                let mut d = shared.dicts();
                let dict = d.entry(account, *interval);
                dict.install(new_revision, after);
                dict.in_flight = false;
                let more = !dict.pending.is_empty();
                d.trim(account, now_millis());
                more
            };
            if reschedule {
                let _ = shared.flush_tx.send(key.clone());
            }
            announce(shared, account, *interval, applied).await;
        }
        Err(conflict) => {
            m.kv_writes
                .with_label_values(&[if conflict { "conflict" } else { "error" }])
                .inc();
            // Learn the current value so the retry applies on top of it. A
            // write that timed out but committed shows up here as a newer
            // revision already holding our change, and re-applying it is a
            // no-op, so it is never applied twice.
            let fresh = read_dict(shared, &kv_key).await;
            {
                let mut d = shared.dicts();
                let dict = d.entry(account, *interval);
                if let Some((rev, entries)) = fresh {
                    // Take the server's copy as is: a KV entry that expired
                    // leaves no revision behind, so this may go backwards.
                    dict.revision = rev;
                    dict.entries = entries;
                }
                // Newer changes queued meanwhile win over the ones we took.
                for (device, change) in changes {
                    dict.pending.entry(device).or_insert(change);
                }
                dict.in_flight = false;
            }
            if !conflict {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let _ = shared.flush_tx.send(key);
        }
    }
}

/// The dictionary under `kv_key` as KV holds it now, with its revision (0
/// and empty when there is none); None when it cannot be read.
async fn read_dict(shared: &Shared, kv_key: &str) -> Option<(u64, wire::SessionDict)> {
    match shared.buckets.sessions.entry(kv_key).await {
        Ok(Some(e)) if e.operation == kv::Operation::Put => {
            wire::decode_dict(&e.value).ok().map(|d| (e.revision, d))
        }
        Ok(Some(e)) => Some((e.revision, Default::default())),
        Ok(None) => Some((0, Default::default())),
        Err(e) => {
            tracing::warn!(key = %kv_key, error = %e, "reading dictionary");
            None
        }
    }
}

/// Replaces a trimmed dictionary's copy with the whole one from KV (the
/// pending changes stay queued) and ends the flush that found it trimmed.
async fn reread(shared: &Shared, key: &Key) {
    let (account, interval) = key;
    let kv_key = keys::session_dict(account, *interval);
    let Some((rev, entries)) = read_dict(shared, &kv_key).await else {
        tokio::time::sleep(Duration::from_millis(200)).await;
        shared.dicts().entry(account, *interval).in_flight = false;
        return;
    };
    let mut d = shared.dicts();
    let dict = d.entry(account, *interval);
    dict.revision = rev;
    dict.entries = entries;
    dict.partial = false;
    dict.in_flight = false;
}

/// Publishes the presence events of a write that landed and records
/// sessions displaced by a newer session of the same device. Only the
/// instance whose compare-and-set succeeded gets here, so each happens once.
async fn announce(
    shared: &Shared,
    account: &AccountId,
    interval: u64,
    applied: Vec<(headcount_protocol::DeviceId, Applied)>,
) {
    let now = now_millis();
    for (device, what) in applied {
        let (event, extra) = match what {
            Applied::Added { record, replaced } => {
                if let Some(old) = &replaced {
                    let revocation = Revocation {
                        reason: EndReason::Replaced,
                        device: device.clone(),
                        at: now,
                        by: Some(SessionRef {
                            device: device.clone(),
                            session: record.session.clone(),
                        }),
                    };
                    shared.revoked.insert(old.clone(), ());
                    let body = serde_json::to_vec(&revocation).unwrap_or_default();
                    match shared
                        .buckets
                        .revoked
                        .create(keys::revoked(account, old), body.into())
                        .await
                    {
                        Ok(_) => {
                            publish_event(
                                shared,
                                PresenceEvent {
                                    kind: EventType::Leave,
                                    account: account.clone(),
                                    device: device.clone(),
                                    session: old.clone(),
                                    at: now,
                                    by: revocation.by.clone(),
                                    reason: Some("replaced".into()),
                                    content: None,
                                },
                            )
                            .await;
                        }
                        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                        Err(e) => {
                            tracing::warn!(%account, session = %old, error = %e, "recording replaced session")
                        }
                    }
                }
                let known = shared.dicts().recorded_elsewhere(
                    account,
                    &device,
                    &record.session,
                    interval,
                    now,
                );
                if known {
                    continue;
                }
                (EventType::Join, record)
            }
            Applied::Removed(record) => {
                let still = shared.dicts().recorded_elsewhere(
                    account,
                    &device,
                    &record.session,
                    interval,
                    now,
                );
                if still {
                    continue;
                }
                (EventType::Leave, record)
            }
            Applied::Updated | Applied::Nothing => continue,
        };
        publish_event(
            shared,
            PresenceEvent {
                kind: event,
                account: account.clone(),
                device,
                session: extra.session,
                at: now,
                by: None,
                reason: None,
                content: extra.labels.content().map(str::to_owned),
            },
        )
        .await;
    }
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
