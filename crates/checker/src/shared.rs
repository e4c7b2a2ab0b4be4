//! What every task of one checker shares: the sharded view, the NATS
//! connection and buckets, the metrics, and the queue of accounts to look
//! at for enforcement.

use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard};

use headcount_protocol::wire::PresenceEvent;
use headcount_protocol::{AccountId, UnixMillis, now_millis};
use headcount_runtime::{Buckets, effects};
use tokio::sync::mpsc;

use crate::enforcement::{Ask, Decided};
use crate::metrics::Metrics;
use crate::view::{self, Rules, View};

/// The view is split by account over this many independently locked
/// shards, so that a sweep or a breakdown over millions of sessions never
/// holds up a request for longer than one shard takes.
const SHARDS: usize = 32;

pub(crate) struct Shared {
    shards: Box<[Mutex<View>]>,
    shard_keys: RandomState,
    /// Highest active count over every account, per minute.
    pub global_peaks: Mutex<view::Peaks>,
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
            shards: (0..SHARDS)
                .map(|_| Mutex::new(View::with_plans(rules, plans.clone(), started)))
                .collect(),
            shard_keys: RandomState::new(),
            global_peaks: Mutex::new(view::Peaks::default()),
            buckets,
            nats,
            metrics,
            enforce_tx,
        };
        (shared, enforce_rx)
    }

    /// The shard holding `account`.
    pub fn view(&self, account: &str) -> MutexGuard<'_, View> {
        let i = self.shard_keys.hash_one(account) as usize % self.shards.len();
        lock(&self.shards[i])
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

    /// Active sessions over every account by content, kind and region,
    /// shard by shard, with the peak over every account.
    pub fn breakdown_all(&self, now: UnixMillis) -> view::Breakdown {
        let mut all = view::Breakdown::default();
        for v in self.each_view() {
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
        let peak = lock(&self.global_peaks).max();
        all.peak = peak.max(all.total);
        all
    }
}
