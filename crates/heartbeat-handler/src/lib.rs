//! heartbeat-handler: turns device heartbeats into interval dictionaries in
//! NATS KV.
//!
//! The instances divide the accounts' partitions among them (the server
//! puts each heartbeat on its account's partition, `hbp.<partition>.*.*.*`;
//! see [`run`]), so each heartbeat is handled once however many instances
//! run, and an instance holds only its partitions' dictionaries. A
//! heartbeat is validated (subject
//! names, size, MessagePack shape, field lengths, revocation) and then only
//! changes state when it says something new: a session entering the current
//! interval, a changed field, a leave. Those changes are coalesced per
//! dictionary and written with compare-and-set on the KV revision, so two
//! instances never lose each other's writes and KV load follows sessions and
//! intervals, not heartbeats.
//!
//! Layout: [`dicts`] holds the rules (pure), including the steps of a
//! dictionary write, over compact copies of the dictionaries;
//! [`metrics`] the collectors; this file the I/O:
//! subscription (whose subjects feed a checker in the same process, if
//! one runs there: [`headcount_runtime::relay`]), KV watches and the
//! flusher, which writes what [`dicts`] hands out and hands the outcome
//! back. Presence events, revocations and
//! the decoding of watched dictionaries go through
//! [`headcount_runtime::effects`], shared with the checker.
//!
//! A leave is never lost: it removes its session from whatever holds it,
//! the copy, a pending change or the write under way, and on a handler whose
//! copy does not show the session yet it waits for the watch to bring it.
//! Sessions ended elsewhere (the revoked watch) leave the dictionaries too,
//! quietly, and a dictionary never grows past
//! [`headcount_protocol::policy::DICT_MAX_SESSIONS`] devices, so that its
//! value always fits one KV write.
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
use headcount_protocol::{AccountId, IntervalClock, SessionId, now_millis, partition};
use headcount_runtime::effects::{self, Once};
use headcount_runtime::relay::Relay;
use headcount_runtime::{Buckets, Shutdown, Wiring, members};
use std::sync::atomic::Ordering;
use tokio::sync::{mpsc, oneshot};

pub use metrics::Metrics;

use dicts::{Applied, Decision, Dicts, Take};

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
            revoked_ttl: headcount_runtime::buckets::DEFAULT_REVOKED_TTL,
            max_concurrent_writes: 256,
            // Ten times a 5 s heartbeat.
            max_rate: rate::DEFAULT_RATE,
            burst: rate::DEFAULT_BURST,
            // One heartbeat period.
            carry_delay: Duration::from_secs(5),
        }
    }
}

type Key = (AccountId, u64);

/// One partition held by this instance: its dictionaries, and the handles
/// its writes need (shared with the instance's other partitions).
struct Shared {
    dicts: Mutex<Dicts>,
    /// Ended sessions, by id (session ids are unique across accounts);
    /// one cache for the whole instance.
    revoked: moka::sync::Cache<SessionId, ()>,
    buckets: Buckets,
    nats: async_nats::Client,
    metrics: Metrics,
    flush_tx: mpsc::UnboundedSender<Key>,
    carry_delay: Duration,
    /// The partition.
    partition: u32,
    /// Sessions its live dictionaries hold, as last counted.
    sessions: std::sync::atomic::AtomicUsize,
}

impl Shared {
    fn dicts(&self) -> MutexGuard<'_, Dicts> {
        // A panic while holding the lock cannot leave the dictionaries
        // half-written (every mutation is a single insert), so keep going.
        self.dicts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Starts one handler instance on its own task (see [`run`]): ready once
/// its watches have caught up and it takes heartbeats.
pub fn start(config: Config, metrics: Metrics, wiring: Wiring) -> headcount_runtime::Running {
    let health = wiring.health.clone();
    // Boxed: the instance's future is large, and moving it by value
    // through the spawn can overflow a small stack (a test's thread).
    headcount_runtime::Running::spawn(
        "heartbeat-handler",
        health,
        Box::pin(run(config, metrics, wiring)),
    )
}

/// The handler's side of [`members::hold`]: what starting a partition
/// takes, and what the instance reports of them.
struct Partitions {
    config: Config,
    clock: IntervalClock,
    revoked: moka::sync::Cache<SessionId, ()>,
    buckets: Buckets,
    nats: async_nats::Client,
    metrics: Metrics,
    /// Dictionary writes in flight at once, all partitions together.
    writes: Arc<tokio::sync::Semaphore>,
    /// The partitions running, for the revoked watch's callback.
    parts: Arc<Mutex<std::collections::BTreeMap<u32, Arc<Shared>>>>,
    health: headcount_runtime::Health,
    sessions_health: headcount_runtime::health::Component,
    serving: Option<headcount_runtime::health::Serving>,
    /// Passes the heartbeats' subjects on to a checker in this process.
    relay: Option<Relay>,
}

impl members::Holder for Partitions {
    fn start(&mut self, p: u32) -> members::Part {
        let (flush_tx, flush_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            dicts: Mutex::new(
                Dicts::new(self.clock)
                    .limiting(rate::Limits::new(self.config.max_rate, self.config.burst)),
            ),
            revoked: self.revoked.clone(),
            buckets: self.buckets.clone(),
            nats: self.nats.clone(),
            metrics: self.metrics.clone(),
            flush_tx,
            carry_delay: self.config.carry_delay,
            partition: p,
            sessions: Default::default(),
        });
        let (stop, part_stop) = Shutdown::new();
        let (ready_tx, ready) = oneshot::channel();
        let task = tokio::spawn(run_partition(
            shared.clone(),
            flush_rx,
            self.writes.clone(),
            self.relay.clone(),
            ready_tx,
            part_stop,
        ));
        self.parts().insert(p, shared);
        members::Part { stop, ready, task }
    }

    fn ended(&mut self, p: u32) {
        self.parts().remove(&p);
    }

    fn round(&mut self, standing: members::Standing<'_>) {
        let sessions: usize = self
            .parts()
            .values()
            .map(|s| s.sessions.load(Ordering::Relaxed))
            .sum();
        self.metrics.sessions.set(sessions as i64);
        self.metrics.partitions.set(standing.serving.len() as i64);
        if standing.leaving {
            // Draining: no longer counted on for new heartbeats.
            self.serving = None;
        } else if self.serving.is_none() && standing.complete() {
            self.sessions_health.set_ready(true);
            self.serving = Some(self.health.serving());
            tracing::info!(
                partitions = standing.serving.len(),
                "heartbeat-handler ready"
            );
        }
    }
}

impl Partitions {
    fn parts(&self) -> MutexGuard<'_, std::collections::BTreeMap<u32, Arc<Shared>>> {
        self.parts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs one handler instance until `shutdown`, then hands its partitions
/// over and writes everything still pending before returning.
///
/// The instance holds the partitions the members bucket assigns it
/// ([`members::hold`]), each on its own tasks: a watch of the partition's
/// dictionaries, its heartbeat subscription (a queue group of its own,
/// shared for a moment while the partition changes hands), and its writes.
///
/// Readiness goes to `health` (a scope of the caller's, which tracks the
/// NATS connection): components `sessions` (every partition assigned at
/// start serves) and `revoked` (its watch has replayed what the bucket
/// held), and the scope itself, serving from then until the drain starts.
async fn run(config: Config, metrics: Metrics, wiring: Wiring) -> anyhow::Result<()> {
    let (nats, buckets) = (wiring.nats, wiring.buckets);
    let (health, shutdown) = (wiring.health, wiring.shutdown);
    let sessions_health = health.component("sessions");
    let revoked_health = health.component("revoked");
    let revoked = moka::sync::Cache::builder()
        .time_to_live(config.revoked_ttl)
        .build();
    let parts: Arc<Mutex<std::collections::BTreeMap<u32, Arc<Shared>>>> = Arc::default();

    let (watch_stop, watch_shutdown) = Shutdown::new();
    let (cache, held) = (revoked.clone(), parts.clone());
    let (revoked_task, revoked_ready) = headcount_runtime::watch::follow(
        buckets.revoked.clone(),
        "revoked",
        move |entry| {
            if entry.operation == kv::Operation::Put
                && let Some((account, session)) = keys::parse_revoked(&entry.key)
            {
                cache.insert(session.clone(), ());
                let p = partition::of(account.as_str());
                let part = held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&p)
                    .cloned();
                if let Some(part) = part {
                    on_ended(&part, &account, &session, &entry.value);
                }
            }
        },
        watch_shutdown,
    )
    .await
    .context("watching revoked bucket")?;
    if revoked_ready.await.is_ok() {
        revoked_health.set_ready(true);
    }

    // Membership: which partitions this instance holds.
    let me = format!("{}", nuid::next());
    tracing::info!(instance = %me, interval = ?config.interval, "heartbeat-handler joining");
    let writes = Arc::new(tokio::sync::Semaphore::new(
        config.max_concurrent_writes.max(1),
    ));
    let mut holder = Partitions {
        clock: IntervalClock::new(config.interval),
        config,
        revoked,
        buckets: buckets.clone(),
        nats,
        metrics,
        writes,
        parts,
        health,
        sessions_health,
        serving: None,
        relay: wiring.relay,
    };
    let held = members::hold(
        buckets.members.clone(),
        members::HANDLER,
        me,
        1,
        &mut holder,
        shutdown,
    )
    .await;
    watch_stop.fire();
    let _ = revoked_task.await;
    held?;
    tracing::info!("heartbeat-handler stopped");
    Ok(())
}

/// Runs one partition until `stop`: watches its dictionaries, then takes
/// its heartbeats (feeding their subjects to the `relay`, if any), then,
/// stopping, takes no new ones and writes everything still pending.
async fn run_partition(
    shared: Arc<Shared>,
    flush_rx: mpsc::UnboundedReceiver<Key>,
    writes: Arc<tokio::sync::Semaphore>,
    relay: Option<Relay>,
    ready: oneshot::Sender<()>,
    stop: Shutdown,
) -> anyhow::Result<()> {
    let p = shared.partition;
    // A complete view first: deciding on a partial one would emit false joins.
    let (watch_stop, watch_shutdown) = Shutdown::new();
    let s = shared.clone();
    let (sessions_task, sessions_ready) = headcount_runtime::watch::follow_keys(
        shared.buckets.sessions.of(p).clone(),
        "sessions",
        &keys::session_dicts_of(p),
        move |entry| on_dict_entry(&s, entry),
        watch_shutdown,
    )
    .await
    .context("watching sessions bucket")?;
    let mut stopped = std::pin::pin!(stop.wait());
    tokio::select! {
        _ = sessions_ready => {}
        _ = &mut stopped => {
            watch_stop.fire();
            let _ = sessions_task.await;
            return Ok(());
        }
    }

    let flusher = tokio::spawn(flusher(shared.clone(), flush_rx, writes));
    let mut sub = shared
        .nats
        .queue_subscribe(
            subjects::partition_heartbeats(p),
            subjects::handler_queue_group(p),
        )
        .await
        .context("subscribing to heartbeats")?;
    let feed = match relay {
        Some(relay) => {
            // In place at the server before the checker fed here lets its
            // own subscription go.
            shared
                .nats
                .flush()
                .await
                .context("flushing the heartbeat subscription")?;
            Some(relay.feed(p))
        }
        None => None,
    };
    let hear = |msg: &async_nats::Message| {
        on_message(&shared, &msg.subject, &msg.payload);
        if let Some(feed) = &feed {
            feed.hear(&msg.subject);
        }
    };
    let _ = ready.send(());

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            msg = sub.next() => match msg {
                Some(msg) => hear(&msg),
                None => anyhow::bail!("heartbeat subscription closed"),
            },
            _ = tick.tick() => {
                let now = now_millis();
                let mut d = shared.dicts();
                d.prune(now);
                shared.sessions.store(d.session_count(now), Ordering::Relaxed);
                drop(d);
            }
        }
    }

    // Drain: the checker fed here hears the heartbeats itself first; take
    // no new heartbeats, handle those already delivered, then let every
    // pending write land.
    if let Some(feed) = &feed
        && !feed.hand_over().await
    {
        tracing::warn!(
            partition = p,
            "the checker fed here did not take over in time"
        );
    }
    if let Err(e) = sub.drain().await {
        tracing::warn!(error = %e, partition = p, "draining heartbeat subscription");
    }
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
        hear(&msg);
    }
    drop(feed);
    // Deferred carry-overs are written now rather than after their delay.
    for key in shared.dicts().pending_keys() {
        let _ = shared.flush_tx.send(key);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pending_writes(&shared) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if pending_writes(&shared) {
        tracing::warn!(
            partition = p,
            "stopping with dictionary writes still pending"
        );
    }
    watch_stop.fire();
    flusher.abort();
    let _ = sessions_task.await;
    Ok(())
}

fn pending_writes(shared: &Shared) -> bool {
    shared.dicts().has_pending()
}

fn on_dict_entry(shared: &Shared, entry: kv::Entry) {
    let Some(e) = effects::dict_entry(&entry) else {
        return;
    };
    // The copy may show a session whose removal waited for it.
    let decision =
        shared
            .dicts()
            .install(&e.account, e.interval, e.revision, e.entries, now_millis());
    schedule(&shared.flush_tx, shared.carry_delay, decision);
}

/// A session was ended (its revocation key was written): it leaves the live
/// dictionaries, so that they hold live sessions only. Quietly: whoever
/// ended it announced that.
fn on_ended(shared: &Shared, account: &AccountId, session: &SessionId, value: &[u8]) {
    let revocation: Revocation = match serde_json::from_slice(value) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(%account, %session, error = %e, "unreadable revocation");
            return;
        }
    };
    let decision = shared.dicts().ended(
        account,
        &revocation.device,
        session,
        revocation.at,
        now_millis(),
    );
    schedule(&shared.flush_tx, shared.carry_delay, decision);
}

/// Handles one heartbeat message. Never fails: bad input is counted.
///
/// The common case (a known session, nothing new) allocates nothing: names
/// and fields are borrowed from the message and looked up as `&str`.
fn on_message(shared: &Shared, subject: &str, payload: &[u8]) {
    let c = &shared.metrics.hb;
    let ids = match subjects::parse_partitioned_ref(subject) {
        Ok((p, ids)) if p == shared.partition && partition::of(ids.account) == p => ids,
        Ok(_) => {
            // The server's mapping counts another number of partitions
            // than this build: nats.conf and headcount disagree.
            c.misrouted.inc();
            tracing::warn!(subject, "heartbeat on another partition than its account's");
            return;
        }
        Err(e) => {
            c.invalid.inc();
            tracing::debug!(subject, error = %e, "dropping heartbeat");
            return;
        }
    };
    let now = now_millis();
    // One lock for the whole heartbeat (the rate's buckets are kept with
    // the dictionaries, so the account is looked up once for both); the
    // outcome is counted once it is let go.
    let heard = take(&mut shared.dicts(), &shared.revoked, ids, payload, now);
    let decision = match heard {
        Heard::RateLimited => return c.rate_limited.inc(),
        Heard::Unreadable(e) => {
            match e {
                HeartbeatError::FieldTooLong { .. } => c.invalid.inc(),
                HeartbeatError::TooLarge(_) | HeartbeatError::Malformed(_) => c.malformed.inc(),
            }
            tracing::debug!(subject, error = %e, "dropping heartbeat");
            return;
        }
        Heard::Revoked => return c.revoked.inc(),
        Heard::Unchanged => return c.accepted.inc(),
        Heard::Decided(decision) => decision,
    };
    match decision {
        Decision::Superseded => c.revoked.inc(),
        Decision::Full => c.dictionary_full.inc(),
        _ => c.accepted.inc(),
    }
    schedule(&shared.flush_tx, shared.carry_delay, decision);
}

/// What became of a heartbeat whose subject was its partition's.
enum Heard {
    /// Over its session's rate.
    RateLimited,
    /// Its payload could not be read, or breaks a bound.
    Unreadable(HeartbeatError),
    /// Its session was ended.
    Revoked,
    /// It changes nothing (the fast path).
    Unchanged,
    /// What it changes.
    Decided(Decision),
}

/// [`on_message`] under the partition's lock: the rate first, then the
/// payload, the revocations, and the dictionaries.
fn take(
    d: &mut Dicts,
    revoked: &moka::sync::Cache<SessionId, ()>,
    ids: subjects::HeartbeatSubjectRef<'_>,
    payload: &[u8],
    now: headcount_protocol::UnixMillis,
) -> Heard {
    if !d.admit(ids.account, ids.session, now) {
        return Heard::RateLimited;
    }
    let hb = match HeartbeatRef::decode(payload) {
        Ok(hb) => hb,
        Err(e) => return Heard::Unreadable(e),
    };
    if revoked.contains_key(ids.session) {
        return Heard::Revoked;
    }
    if d.unchanged(ids.account, ids.device, ids.session, &hb, now) {
        return Heard::Unchanged;
    }
    let ids = ids.to_owned();
    Heard::Decided(d.on_heartbeat(&ids.account, &ids.device, &ids.session, &hb.to_owned(), now))
}

/// Hands the dictionaries a heartbeat (or an ending) changed to the
/// flusher: at once, or after `carry_delay` for changes nobody waits for (a
/// live session moving into a new interval, an ended session's removal), so
/// that one write carries every such change of the account.
fn schedule(flush_tx: &mpsc::UnboundedSender<Key>, carry_delay: Duration, decision: Decision) {
    match decision {
        Decision::Superseded | Decision::Unchanged | Decision::Full => {}
        Decision::Queued(keys) => {
            for key in keys {
                let _ = flush_tx.send(key);
            }
        }
        Decision::Deferred(keys) => {
            for key in keys {
                let tx = flush_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(carry_delay).await;
                    let _ = tx.send(key);
                });
            }
        }
    }
}

/// Writes the dictionaries handed to it, each on a task of its own, as
/// many at once as `permits` allows (one budget for the whole instance).
async fn flusher(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Key>,
    permits: Arc<tokio::sync::Semaphore>,
) {
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

/// How one compare-and-set write of a dictionary ended.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// It landed at this revision.
    Written(u64),
    /// Another write landed first: the expected revision was stale.
    Conflict,
    /// It failed or timed out; it may have landed all the same.
    Failed,
}

impl Outcome {
    /// The result `headcount_kv_writes_total` counts it under.
    fn label(self) -> &'static str {
        match self {
            Outcome::Written(_) => "ok",
            Outcome::Conflict => "conflict",
            Outcome::Failed => "error",
        }
    }
}

/// Writes one dictionary's pending changes with compare-and-set and hands
/// the outcome to [`dicts::Dict`]. On a conflict it re-reads and schedules
/// itself again; on any other failure it re-reads and retries after a
/// pause, so a valid session's change is never dropped.
async fn flush(shared: &Shared, key: Key) {
    let (account, interval) = (&key.0, key.1);
    let kv_key = keys::session_dict(account, interval);
    let take = shared
        .dicts()
        .take_for_write(account, interval, now_millis());
    let write = match take {
        Take::Idle => return,
        Take::Unchanged {
            applied,
            refused,
            more,
        } => {
            count_refused(shared, refused);
            if more {
                let _ = shared.flush_tx.send(key.clone());
            }
            announce(shared, account, applied).await;
            return;
        }
        Take::Reread => {
            // Trimmed in memory: write on top of the whole KV copy.
            let current = read_dict(shared, &kv_key).await;
            if current.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            shared.dicts().on_reread(account, interval, current);
            let _ = shared.flush_tx.send(key.clone());
            return;
        }
        Take::Write(write) => write,
    };
    count_refused(shared, write.refused());

    let outcome = write_dict(shared, &kv_key, &write).await;
    shared
        .metrics
        .kv_writes
        .with_label_values(&[outcome.label()])
        .inc();
    match outcome {
        Outcome::Written(revision) => {
            let written =
                shared
                    .dicts()
                    .on_written(account, interval, write, revision, now_millis());
            if written.more {
                let _ = shared.flush_tx.send(key.clone());
            }
            announce(shared, account, written.applied).await;
        }
        Outcome::Conflict | Outcome::Failed => {
            // What KV holds now: the copy the retry applies on top of (what
            // landed first) and, after a failure, whether the write landed
            // after all.
            let current = read_dict(shared, &kv_key).await;
            shared
                .dicts()
                .on_conflict(account, interval, write, current);
            if let Outcome::Failed = outcome {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let _ = shared.flush_tx.send(key);
        }
    }
}

/// Counts the new sessions a full dictionary left out of a write.
fn count_refused(shared: &Shared, refused: usize) {
    if refused > 0 {
        shared.metrics.hb.dictionary_full.inc_by(refused as u64);
    }
}

/// Writes `write` under `kv_key`, expecting the revision it was taken at.
async fn write_dict(shared: &Shared, kv_key: &str, write: &dicts::Write) -> Outcome {
    let timer = shared.metrics.kv_write_seconds.start_timer();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        shared.buckets.sessions.of(shared.partition).update(
            kv_key,
            wire::encode_dict(write.value()).into(),
            write.revision(),
        ),
    )
    .await;
    timer.observe_duration();
    match r {
        Ok(Ok(revision)) => Outcome::Written(revision),
        Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Outcome::Conflict,
        Ok(Err(e)) => {
            tracing::warn!(key = %kv_key, error = %e, "dictionary write failed, retrying");
            Outcome::Failed
        }
        Err(_) => {
            tracing::warn!(key = %kv_key, "dictionary write timed out, retrying");
            Outcome::Failed
        }
    }
}

/// The dictionary under `kv_key` as KV holds it now, with its revision (0
/// and empty when there is none); None when it cannot be read.
async fn read_dict(shared: &Shared, kv_key: &str) -> Option<(u64, wire::SessionDict)> {
    match shared
        .buckets
        .sessions
        .of(shared.partition)
        .entry(kv_key)
        .await
    {
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

/// Publishes the presence events of a write that landed and records
/// sessions displaced by a newer session of the same device. Only the
/// instance whose compare-and-set succeeded gets here, so each happens once;
/// so does the one that withdrew a session whose join never landed, the
/// only one that knows of its leave.
async fn announce(
    shared: &Shared,
    account: &AccountId,
    applied: Vec<(headcount_protocol::DeviceId, Applied, bool)>,
) {
    let now = now_millis();
    for (device, what, elsewhere) in applied {
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
                    match effects::revoke_once(&shared.buckets.revoked, account, old, &revocation)
                        .await
                    {
                        Ok(Once::Won) => {
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
                        Ok(Once::Lost) => {}
                        Err(e) => {
                            tracing::warn!(%account, session = %old, error = %e, "recording replaced session")
                        }
                    }
                }
                // Carried from the previous interval: not a join.
                if elsewhere {
                    continue;
                }
                (EventType::Join, record)
            }
            // One removal per leave announces it (`Dicts` queues the
            // others quietly), and a withdrawn session's leave is announced
            // though there was nothing left to remove.
            Applied::Removed(record) | Applied::Withdrawn(record) => (EventType::Leave, record),
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

/// Publishes a presence event and counts it.
async fn publish_event(shared: &Shared, event: PresenceEvent) {
    if let Err(e) = effects::publish_event(&shared.nats, &event).await {
        tracing::warn!(error = %e, "publishing presence event");
        return;
    }
    shared
        .metrics
        .events
        .with_label_values(&[&effects::event_label(event.kind)])
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;
    use headcount_protocol::DeviceId;
    use headcount_protocol::wire::Heartbeat;

    #[tokio::test(start_paused = true)]
    async fn carried_sessions_are_written_once_per_account_after_the_carry_delay() {
        let account = AccountId::parse("acme").unwrap();
        let sessions = [("tv", "s1"), ("radio", "s2")]
            .map(|(d, s)| (DeviceId::parse(d).unwrap(), SessionId::parse(s).unwrap()));
        let hb = Heartbeat::default();
        let mut d = Dicts::new(IntervalClock::new(Duration::from_secs(10)));
        // Both sessions are live in interval 0, written.
        for (dev, s) in &sessions {
            let _ = d.on_heartbeat(&account, dev, s, &hb, 1_000);
        }
        let Take::Write(w) = d.take_for_write(&account, 0, 1_000) else {
            panic!("the joins make a write");
        };
        let _ = d.on_written(&account, 0, w, 1, 1_000);

        // Interval 1 begins and both heartbeat, as on_message hands them on.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let delay = Duration::from_secs(5);
        let start = tokio::time::Instant::now();
        for (dev, s) in &sessions {
            schedule(&tx, delay, d.on_heartbeat(&account, dev, s, &hb, 10_500));
        }
        tokio::time::sleep(delay - Duration::from_millis(1)).await;
        assert!(
            rx.try_recv().is_err(),
            "nothing is flushed before the delay"
        );
        assert_eq!(rx.recv().await, Some((account.clone(), 1)));
        assert!(start.elapsed() >= delay);
        tokio::time::sleep(delay * 2).await;
        assert!(rx.try_recv().is_err(), "one flush for the account");

        // That flush is one write carrying both records as they were.
        let Take::Write(w) = d.take_for_write(&account, 1, 15_500) else {
            panic!("the carry-overs make a write");
        };
        assert_eq!(w.revision(), 0);
        assert_eq!(w.value().len(), 2);
        for (dev, s) in &sessions {
            let r = &w.value()[dev];
            assert_eq!((&r.session, r.since, r.last_seen), (s, 1_000, 10_500));
        }
        let written = d.on_written(&account, 1, w, 2, 15_500);
        assert!(!written.more);
        assert!(!d.has_pending());
    }
}
