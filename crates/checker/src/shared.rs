//! What every task of one checker shares: the view, one shard per
//! partition, which partitions it serves, the NATS connection and buckets,
//! the metrics, and the queue of accounts to look at for enforcement.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use headcount_protocol::partition::{self, PARTITIONS};
use headcount_protocol::wire::PresenceEvent;
use headcount_protocol::{AccountId, UnixMillis, now_millis};
use headcount_runtime::{Buckets, effects};
use tokio::sync::mpsc;

use crate::enforcement::{Ask, Decided};
use crate::metrics::Metrics;
use crate::view::{self, Rules, View};

/// The view is split into one independently locked shard per partition,
/// so that a sweep or a breakdown over millions of sessions never holds up
/// a request for longer than one shard takes, and a partition this checker
/// takes or lets go is one shard filled or emptied.
///
/// Every shard holds its accounts' limits and revocations (both buckets
/// are watched whole: they are small); only the shards of the partitions
/// this checker serves hold sessions.
pub(crate) struct Shared {
    shards: Box<[Mutex<View>]>,
    /// Which partitions serve: their sessions loaded, their heartbeats and
    /// requests subscribed.
    serving: Box<[AtomicBool]>,
    /// Highest active count of each partition, per minute.
    pub peaks: Box<[Mutex<view::Peaks>]>,
    pub buckets: Buckets,
    pub nats: async_nats::Client,
    pub metrics: Metrics,
    enforce_tx: mpsc::UnboundedSender<Ask>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// An empty view over every shard; accounts to enforce arrive on the
    /// returned receiver.
    pub fn new(
        rules: Rules,
        plans: headcount_protocol::Plans,
        buckets: Buckets,
        nats: async_nats::Client,
        metrics: Metrics,
    ) -> (Self, mpsc::UnboundedReceiver<Ask>) {
        let (enforce_tx, enforce_rx) = mpsc::unbounded_channel();
        let started = now_millis();
        let shared = Self {
            shards: (0..PARTITIONS)
                .map(|_| Mutex::new(View::with_plans(rules, plans.clone(), started)))
                .collect(),
            serving: (0..PARTITIONS).map(|_| AtomicBool::new(false)).collect(),
            peaks: (0..PARTITIONS)
                .map(|_| Mutex::new(view::Peaks::default()))
                .collect(),
            buckets,
            nats,
            metrics,
            enforce_tx,
        };
        (shared, enforce_rx)
    }

    /// The shard holding `account`: its partition's.
    pub fn view(&self, account: &str) -> MutexGuard<'_, View> {
        self.view_of(partition::of(account))
    }

    /// The shard of partition `p`.
    pub fn view_of(&self, p: u32) -> MutexGuard<'_, View> {
        lock(&self.shards[p as usize])
    }

    /// Whether this checker serves partition `p`: its answers about the
    /// partition's accounts are complete.
    pub fn serves(&self, p: u32) -> bool {
        self.serving[p as usize].load(Ordering::Acquire)
    }

    pub fn set_serving(&self, p: u32, serving: bool) {
        self.serving[p as usize].store(serving, Ordering::Release);
    }

    /// The partitions this checker serves.
    pub fn served(&self) -> Vec<u32> {
        (0..PARTITIONS).filter(|&p| self.serves(p)).collect()
    }

    /// Every shard, one at a time.
    pub fn each_view(&self) -> impl Iterator<Item = MutexGuard<'_, View>> {
        self.shards.iter().map(lock)
    }

    /// Asks the enforcer to look at `account`'s limit again.
    pub fn enforce(&self, account: AccountId) {
        // Fails only once the enforcer stopped, at shutdown.
        let _ = self.enforce_tx.send(Ask::Look(account));
    }

    /// Hands an ending a request could not settle in time over to the
    /// enforcer, which retries it until it settles.
    pub fn settle_later(&self, d: Decided) {
        let _ = self.enforce_tx.send(Ask::Settle(d));
    }

    /// Publishes a presence event and counts it.
    pub async fn publish_event(&self, event: PresenceEvent) {
        if let Err(e) = effects::publish_event(&self.nats, &event).await {
            tracing::warn!(error = %e, "publishing presence event");
            return;
        }
        self.metrics
            .events
            .with_label_values(&[&effects::event_label(event.kind)])
            .inc();
    }

    /// Active sessions over every account of `partitions` by content,
    /// kind and region, shard by shard, and their peaks added up minute by
    /// minute (each partition's highest count of each minute).
    pub fn breakdown_of(
        &self,
        partitions: &[u32],
        now: UnixMillis,
    ) -> (view::Breakdown, view::Peaks) {
        let mut all = view::Breakdown::default();
        let mut peaks = view::Peaks::default();
        for &p in partitions {
            let b = self.view_of(p).breakdown_all(now);
            all.merge(b);
            peaks.add(&lock(&self.peaks[p as usize]));
        }
        all.peak = peaks.max().max(all.total);
        (all, peaks)
    }
}
