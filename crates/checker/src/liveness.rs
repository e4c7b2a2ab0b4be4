//! Where one partition's heartbeats come from: a subscription of the
//! checker's own, or, when a heartbeat handler in the same process serves
//! the partition (`headcount up`), that handler, through the process's
//! [`Relay`]: each heartbeat then crosses the network and is parsed once.
//! The handler only queues the subject for the partition's task here (a
//! queue as deep as a subscription's, whose overflow is counted like a
//! slow subscription's), so that the checker's locks never hold the
//! handler up.
//!
//! The source changes as the handler takes or lets go of the partition;
//! the switch never leaves a moment in which neither source is in place at
//! the server (see [`headcount_runtime::relay`]). A heartbeat heard twice
//! around a switch only sets the same last-heard time again.

use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use headcount_protocol::subjects;
use headcount_runtime::relay::{Listener, Relay};
use tokio::sync::{mpsc, watch};

use crate::shared::Shared;
use crate::watches;

/// One partition's heartbeats.
pub(crate) struct Heartbeats {
    shared: Arc<Shared>,
    p: u32,
    relay: Option<Relayed>,
    /// The subscription of its own, when the relay does not feed it.
    own: Option<async_nats::Subscriber>,
    /// Heard from the relay only (counted in the metrics).
    relayed: bool,
}

struct Relayed {
    relay: Relay,
    fed: watch::Receiver<bool>,
    listener: Listener,
    /// What the listener queued.
    queued: mpsc::Receiver<async_nats::Subject>,
}

/// How many subjects the relay may queue for one partition: as many
/// messages as a subscription holds (`NatsOptions::connect`).
const QUEUE: usize = 1 << 16;

/// What [`Heartbeats::next`] waited for.
pub(crate) enum Heard {
    /// A heartbeat's subject, from the subscription of its own or the
    /// relay.
    Subject(async_nats::Subject),
    /// The relay's feed started or is ending.
    Switch,
    /// The subscription of its own closed.
    Closed,
}

impl Heartbeats {
    /// Hears partition `p`'s heartbeats from now on: from the relay if it
    /// feeds them, otherwise through a subscription of its own.
    pub async fn start(shared: Arc<Shared>, p: u32, relay: Option<Relay>) -> anyhow::Result<Self> {
        let relay = relay.map(|relay| {
            let (tx, queued) = mpsc::channel(QUEUE);
            let metrics = shared.metrics.clone();
            let listener: Listener = Arc::new(move |subject: &async_nats::Subject| {
                if tx.try_send(subject.clone()).is_err() {
                    metrics.relay_overflow.inc();
                }
            });
            Relayed {
                fed: relay.watch(p),
                relay,
                listener,
                queued,
            }
        });
        let mut me = Self {
            shared,
            p,
            relay,
            own: None,
            relayed: false,
        };
        me.switch().await?;
        Ok(me)
    }

    /// The next heartbeat, from the subscription of its own or the relay,
    /// or a change of the relay's feed. Cancel-safe: it only waits.
    pub async fn next(&mut self) -> Heard {
        let (own, relay) = (&mut self.own, &mut self.relay);
        let own = async {
            match own {
                Some(sub) => sub.next().await,
                None => std::future::pending().await,
            }
        };
        let Some(r) = relay else {
            return match own.await {
                Some(msg) => Heard::Subject(msg.subject),
                None => Heard::Closed,
            };
        };
        tokio::select! {
            msg = own => match msg {
                Some(msg) => Heard::Subject(msg.subject),
                None => Heard::Closed,
            },
            // The sender lives as long as the listener, held here too.
            Some(subject) = r.queued.recv() => Heard::Subject(subject),
            // The relay's watch outlives it (this holds the relay).
            changed = r.fed.changed() => match changed {
                Ok(()) => Heard::Switch,
                Err(_) => Heard::Closed,
            },
        }
    }

    /// Acts on what [`Heartbeats::next`] waited for: a heartbeat marks its
    /// session heard, a change of the feed switches the source. Fails when
    /// the subscription of its own closed or a switch could not subscribe.
    pub async fn take(&mut self, heard: Heard) -> anyhow::Result<()> {
        match heard {
            Heard::Subject(subject) => {
                watches::on_heartbeat(&self.shared, &subject);
                Ok(())
            }
            Heard::Switch => self.switch().await,
            Heard::Closed => anyhow::bail!("heartbeat subscription closed"),
        }
    }

    /// Takes the source the relay's feed now calls for: the relay while it
    /// feeds (letting the subscription of its own go once the listener is
    /// attached), otherwise a subscription of its own, in place at the
    /// server before the feed is told it may let go.
    async fn switch(&mut self) -> anyhow::Result<()> {
        let p = self.p;
        if let Some(r) = self.relay.as_mut() {
            let fed = *r.fed.borrow_and_update();
            // Attached again even when it seemed to be already: a feed that
            // ended and restarted between two looks detached it.
            if fed && r.relay.listen(p, r.listener.clone()) {
                if let Some(mut own) = self.own.take() {
                    let _ = own.unsubscribe().await;
                }
                self.set_relayed(true);
                return Ok(());
            }
        }
        if self.own.is_none() {
            let sub = self
                .shared
                .nats
                .subscribe(subjects::partition_heartbeats(p))
                .await
                .context("subscribing to heartbeats")?;
            if let Some(r) = &self.relay {
                // In place at the server before the feed may let go.
                self.shared
                    .nats
                    .flush()
                    .await
                    .context("flushing the heartbeat subscription")?;
                r.relay.taken_over(p);
            }
            self.own = Some(sub);
        }
        self.set_relayed(false);
        Ok(())
    }

    fn set_relayed(&mut self, relayed: bool) {
        if relayed != self.relayed {
            self.relayed = relayed;
            self.shared
                .metrics
                .partitions_relayed
                .add(if relayed { 1 } else { -1 });
        }
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        if let Some(r) = &self.relay {
            r.relay.unlisten(self.p);
        }
        self.set_relayed(false);
    }
}
