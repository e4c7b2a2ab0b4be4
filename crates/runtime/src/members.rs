//! Who holds which partitions: the live instances of a service, and the
//! partitions each should hold ([`headcount_protocol::partition::assign`]).
//!
//! Every instance writes its record, `<role>.<instance>` in the members
//! bucket, every [`REFRESH`]: the partitions it serves. Every instance
//! watches the records of its role; one not heard from for [`EXPIRY`] (by
//! the watcher's own clock, so no two hosts' clocks are compared) is gone,
//! and so is one deleted (an instance stopping says so). From the live
//! set, each instance computes the same assignment, and:
//! - starts the partitions assigned to it that it does not run yet;
//! - stops a partition it runs but is no longer assigned once every
//!   instance now assigned it serves it, so a partition is never left
//!   unheard while it changes hands (both hold it for a moment).
//!
//! [`Roster`] holds the rules (pure, tested alone); [`run`] the I/O of the
//! record and the roster, and [`hold`] starts and stops a service's
//! partitions ([`Holder`]) as the plans say.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use headcount_protocol::partition;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::Shutdown;

/// The role of the heartbeat handlers' records.
pub const HANDLER: &str = "handler";
/// The role of the checkers' records.
pub const CHECKER: &str = "checker";

/// How often an instance writes its record.
pub const REFRESH: Duration = Duration::from_secs(1);
/// How long an instance not heard from counts as live.
pub const EXPIRY: Duration = Duration::from_secs(5);

/// One instance's record, as written to the members bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The partitions it serves: subscribed, its view complete.
    pub serving: BTreeSet<u32>,
}

/// The rules: who is live, what this instance should run.
#[derive(Debug)]
pub struct Roster {
    me: String,
    copies: usize,
    /// Stopping: it counts itself out, so that the others take its
    /// partitions.
    leaving: bool,
    /// Every other instance heard from: when, and what it serves.
    others: BTreeMap<String, (Instant, BTreeSet<u32>)>,
}

/// Which partitions an instance should run, and which it may let go.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Every partition assigned to it.
    pub assigned: BTreeSet<u32>,
    /// Partitions not assigned to it that every instance assigned them
    /// serves: if it runs one, it may stop.
    pub handed_over: BTreeSet<u32>,
    /// How many instances are live, this one included.
    pub members: usize,
}

impl Plan {
    /// Assigned, and not in `running`: to start.
    pub fn to_start(&self, running: &BTreeSet<u32>) -> Vec<u32> {
        self.assigned.difference(running).copied().collect()
    }

    /// In `running`, and handed over: to stop.
    pub fn to_stop(&self, running: &BTreeSet<u32>) -> Vec<u32> {
        self.handed_over.intersection(running).copied().collect()
    }
}

impl Roster {
    /// The roster of instance `me`, with `copies` instances per partition.
    pub fn new(me: impl Into<String>, copies: usize) -> Self {
        Self {
            me: me.into(),
            copies: copies.max(1),
            leaving: false,
            others: BTreeMap::new(),
        }
    }

    /// A record of instance `id` arrived at `at`.
    pub fn heard(&mut self, id: &str, record: Record, at: Instant) {
        if id != self.me {
            self.others.insert(id.to_owned(), (at, record.serving));
        }
    }

    /// Instance `id` said it stopped (its record was deleted).
    pub fn gone(&mut self, id: &str) {
        self.others.remove(id);
    }

    /// This instance is stopping: from now on it counts itself out.
    pub fn leave(&mut self) {
        self.leaving = true;
    }

    /// The live instances at `now`, this one included (unless it is
    /// leaving), sorted.
    pub fn members(&self, now: Instant) -> Vec<String> {
        let mut live: Vec<String> = self
            .others
            .iter()
            .filter(|(_, (at, _))| now.saturating_duration_since(*at) < EXPIRY)
            .map(|(id, _)| id.clone())
            .collect();
        if !self.leaving {
            live.push(self.me.clone());
        }
        live.sort();
        live
    }

    /// The plan at `now`.
    pub fn plan(&self, now: Instant) -> Plan {
        let members = self.members(now);
        let owners = partition::assign(&members, self.copies);
        let me = members.iter().position(|m| *m == self.me);
        let mut plan = Plan {
            members: members.len(),
            ..Plan::default()
        };
        for (p, owners) in owners.iter().enumerate() {
            let p = p as u32;
            if me.is_some_and(|me| owners.contains(&me)) {
                plan.assigned.insert(p);
            } else if owners.iter().all(|&o| {
                self.others
                    .get(&members[o])
                    .is_some_and(|(_, serving)| serving.contains(&p))
            }) {
                plan.handed_over.insert(p);
            }
        }
        plan
    }
}

/// The key of an instance's record.
pub fn key(role: &str, id: &str) -> String {
    format!("{role}.{id}")
}

/// What [`run`] tells the service: the plan, each time it may have changed.
pub type Plans = watch::Receiver<Plan>;

/// What the service tells [`run`]: the partitions it serves now.
pub type Serving = mpsc::UnboundedSender<BTreeSet<u32>>;

/// Keeps this instance's record written and the roster current, sending a
/// new [`Plan`] whenever it changes, until the service drops its end of
/// `plans`. On `leave` the record is deleted, so the others take over at
/// once, and the plans that follow count this instance out: the service
/// lets each partition go once it is handed over. `serving` brings the
/// partitions the service serves, written with the next record.
pub async fn run(
    store: kv::Store,
    role: &'static str,
    me: String,
    copies: usize,
    plans: watch::Sender<Plan>,
    mut serving: mpsc::UnboundedReceiver<BTreeSet<u32>>,
    leave: Shutdown,
) -> anyhow::Result<()> {
    let (heard_tx, mut heard_rx) = mpsc::unbounded_channel();
    let (watch_stop, watch_shutdown) = Shutdown::new();
    let prefix = format!("{role}.");
    let on_entry = move |entry: kv::Entry| {
        if let Some(id) = entry.key.strip_prefix(&prefix) {
            let record = match entry.operation {
                kv::Operation::Put => serde_json::from_slice::<Record>(&entry.value).ok(),
                _ => None,
            };
            let _ = heard_tx.send((id.to_owned(), record, Instant::now()));
        }
    };
    // Right after a cluster starts, the watch's consumer may not be made
    // at the first try: keep trying (the service is not ready meanwhile).
    let mut delay = Duration::from_millis(100);
    let (task, ready) = loop {
        match crate::watch::follow_keys(
            store.clone(),
            "members",
            &format!("{role}.*"),
            on_entry.clone(),
            watch_shutdown.clone(),
        )
        .await
        {
            Ok(started) => break started,
            Err(e) => {
                tracing::warn!(error = %e, "watching the members bucket, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    };
    let _ = ready.await;
    let mut roster = Roster::new(me.clone(), copies);
    let my_key = key(role, &me);
    let mut mine = Record::default();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_write: Option<Instant> = None;
    let mut leaving = std::pin::pin!(leave.wait());
    let mut left = false;
    loop {
        let mut changed = false;
        tokio::select! {
            _ = plans.closed() => break,
            _ = &mut leaving, if !left => {
                left = true;
                roster.leave();
                if let Err(e) = store.delete(&my_key).await {
                    tracing::warn!(error = %e, "deleting member record");
                }
            }
            heard = heard_rx.recv() => {
                let Some((id, record, at)) = heard else { break };
                match record {
                    Some(r) => roster.heard(&id, r, at),
                    None => roster.gone(&id),
                }
            }
            s = serving.recv(), if !serving.is_closed() => {
                if let Some(s) = s {
                    changed = mine.serving != s;
                    mine.serving = s;
                }
            }
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        if !left && (changed || last_write.is_none_or(|w| now.duration_since(w) >= REFRESH)) {
            let value = serde_json::to_vec(&mine)?;
            match store.put(&my_key, value.into()).await {
                Ok(_) => last_write = Some(now),
                Err(e) => tracing::warn!(error = %e, "writing member record"),
            }
        }
        let plan = roster.plan(now);
        plans.send_if_modified(|old| {
            let differs = *old != plan;
            if differs {
                *old = plan;
            }
            differs
        });
    }
    if !left && let Err(e) = store.delete(&my_key).await {
        tracing::warn!(error = %e, "deleting member record");
    }
    watch_stop.fire();
    let _ = task.await;
    Ok(())
}

/// A partition's tasks, as a service started them for [`hold`].
pub struct Part {
    /// Stops them: the partition was handed over, or the instance stops.
    pub stop: crate::shutdown::Trigger,
    /// Fires once the partition serves (its view complete, its
    /// subscriptions up).
    pub ready: oneshot::Receiver<()>,
    /// Ends once the partition has stopped (Ok) or failed (Err).
    pub task: JoinHandle<anyhow::Result<()>>,
}

/// Where an instance stands after a round of [`hold`].
#[derive(Debug, Clone, Copy)]
pub struct Standing<'a> {
    pub plan: &'a Plan,
    /// The partitions it serves: ready, and not being let go.
    pub serving: &'a BTreeSet<u32>,
    /// It is stopping, and lets its partitions go.
    pub leaving: bool,
}

impl Standing<'_> {
    /// It serves every partition assigned to it, and is not stopping.
    pub fn complete(&self) -> bool {
        !self.leaving
            && self.plan.members > 0
            && self.plan.assigned.iter().all(|p| self.serving.contains(p))
    }
}

/// What a partitioned service does with the partitions [`hold`] gives it.
pub trait Holder {
    /// Starts partition `p`'s tasks.
    fn start(&mut self, p: u32) -> Part;
    /// Partition `p`'s tasks ended, stopped or failed: it is held no more.
    fn ended(&mut self, p: u32);
    /// After every round (at least every 100 ms): readiness, gauges.
    fn round(&mut self, standing: Standing<'_>);
}

/// How long a stopping instance waits for others to take its partitions
/// over before it lets them go regardless.
pub const HAND_OVER_WAIT: Duration = Duration::from_secs(10);

/// How long a partition whose tasks failed waits before it starts again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Holds the partitions the members bucket assigns instance `me` of
/// `role` until `shutdown`, then hands them over: starts each partition
/// assigned (through `holder`), restarts one that fails, stops one once its
/// new holders serve it, and, stopping, deletes its record so that the
/// others take over at once, and lets each partition go once it is handed
/// over (or after [`HAND_OVER_WAIT`]). Returns once every partition has
/// stopped.
pub async fn hold(
    store: kv::Store,
    role: &'static str,
    me: String,
    copies: usize,
    holder: &mut impl Holder,
    shutdown: crate::Shutdown,
) -> anyhow::Result<()> {
    struct Held {
        part: Part,
        serving: bool,
        stopping: bool,
    }
    let (plans_tx, mut plans) = watch::channel(Plan::default());
    let (serving_tx, serving_rx) = mpsc::unbounded_channel();
    let (leave, leave_signal) = crate::Shutdown::new();
    let mut roster = tokio::spawn(run(
        store,
        role,
        me,
        copies,
        plans_tx,
        serving_rx,
        leave_signal,
    ));
    let mut running: BTreeMap<u32, Held> = BTreeMap::new();
    let mut announced = BTreeSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut stop = std::pin::pin!(shutdown.wait());
    let mut leaving: Option<tokio::time::Instant> = None;
    // Partitions whose tasks failed, and when to start them again.
    let mut retry_at = BTreeMap::new();
    loop {
        tokio::select! {
            _ = &mut stop, if leaving.is_none() => {
                leave.fire();
                leaving = Some(tokio::time::Instant::now() + HAND_OVER_WAIT);
            }
            _ = plans.changed() => {}
            _ = tick.tick() => {}
            ended = &mut roster => {
                anyhow::bail!("following the members bucket ended: {ended:?}");
            }
        }
        let plan = plans.borrow().clone();
        let ids: BTreeSet<u32> = running.keys().copied().collect();
        if leaving.is_none() && plan.members > 0 {
            let now = tokio::time::Instant::now();
            retry_at.retain(|_, at| *at > now);
            for p in plan.to_start(&ids) {
                if !retry_at.contains_key(&p) {
                    let part = holder.start(p);
                    let held = Held {
                        part,
                        serving: false,
                        stopping: false,
                    };
                    running.insert(p, held);
                }
            }
        }
        let give_up = match leaving {
            // No other instance, or waited long enough: stop what is left.
            Some(deadline) => plan.members == 0 || tokio::time::Instant::now() >= deadline,
            None => false,
        };
        let to_stop = if give_up {
            ids.iter().copied().collect()
        } else {
            plan.to_stop(&ids)
        };
        for p in to_stop {
            if let Some(r) = running.get_mut(&p)
                && !r.stopping
            {
                tracing::info!(role, partition = p, "handing partition over");
                r.stopping = true;
                r.part.stop.fire();
            }
        }
        // Partitions that came up, or ended.
        let mut ended = Vec::new();
        for (&p, r) in running.iter_mut() {
            if !r.serving && r.part.ready.try_recv().is_ok() {
                r.serving = true;
            }
            if r.part.task.is_finished() {
                ended.push(p);
            }
        }
        for p in ended {
            let Some(r) = running.remove(&p) else {
                continue;
            };
            holder.ended(p);
            let failed = match r.part.task.await {
                Ok(Ok(())) if r.stopping => continue,
                Ok(Ok(())) => "stopped".to_string(),
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) => e.to_string(),
            };
            tracing::warn!(role, partition = p, error = %failed, "partition ended, restarting");
            retry_at.insert(p, tokio::time::Instant::now() + RETRY_AFTER);
        }
        let serving: BTreeSet<u32> = running
            .iter()
            .filter(|(_, r)| r.serving && !r.stopping)
            .map(|(&p, _)| p)
            .collect();
        if serving != announced {
            let _ = serving_tx.send(serving.clone());
            announced = serving;
        }
        holder.round(Standing {
            plan: &plan,
            serving: &announced,
            leaving: leaving.is_some(),
        });
        if leaving.is_some() && running.is_empty() {
            break;
        }
    }
    drop(plans);
    let _ = roster.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> BTreeSet<u32> {
        (0..partition::PARTITIONS).collect()
    }

    #[test]
    fn alone_an_instance_runs_every_partition() {
        let r = Roster::new("a", 1);
        let plan = r.plan(Instant::now());
        assert_eq!(plan.assigned, all());
        assert_eq!(
            plan.to_start(&BTreeSet::new()).len(),
            partition::PARTITIONS as usize
        );
        assert!(plan.to_stop(&all()).is_empty());
        assert_eq!(plan.members, 1);
    }

    #[test]
    fn a_partition_is_let_go_only_once_its_new_holder_serves_it() {
        let t = Instant::now();
        let mut a = Roster::new("a", 1);
        a.heard("b", Record::default(), t);
        let plan = a.plan(t);
        let given: Vec<u32> = all().difference(&plan.assigned).copied().collect();
        assert_eq!(given.len(), partition::PARTITIONS as usize / 2);
        assert!(plan.to_stop(&all()).is_empty(), "b serves none of them yet");
        assert!(plan.to_start(&all()).is_empty());
        // b serves half of what it was given: a lets go of those alone.
        let half: BTreeSet<u32> = given.iter().take(given.len() / 2).copied().collect();
        a.heard(
            "b",
            Record {
                serving: half.clone(),
            },
            t,
        );
        assert_eq!(
            a.plan(t).to_stop(&all()),
            half.into_iter().collect::<Vec<_>>()
        );
    }

    #[test]
    fn an_instance_not_heard_from_is_gone_and_its_partitions_are_taken() {
        let t = Instant::now();
        let mut a = Roster::new("a", 1);
        a.heard("b", Record { serving: all() }, t);
        let mine = a.plan(t).assigned;
        assert!(mine.len() < all().len());
        assert_eq!(a.members(t + EXPIRY - Duration::from_millis(1)).len(), 2);
        let later = t + EXPIRY;
        assert_eq!(a.members(later), vec!["a".to_string()]);
        assert_eq!(
            a.plan(later).to_start(&mine).len(),
            all().len() - mine.len()
        );
        assert_eq!(a.plan(later).members, 1);
    }

    #[test]
    fn a_deleted_record_is_gone_at_once() {
        let t = Instant::now();
        let mut a = Roster::new("a", 2);
        a.heard("b", Record { serving: all() }, t);
        a.heard("c", Record { serving: all() }, t);
        assert_eq!(a.members(t).len(), 3);
        a.gone("b");
        assert_eq!(a.members(t), vec!["a".to_string(), "c".to_string()]);
        // Two copies, two members: each holds everything.
        assert_eq!(a.plan(t).assigned, all());
    }

    #[test]
    fn with_two_copies_a_partition_waits_for_both_new_holders() {
        let t = Instant::now();
        let mut a = Roster::new("a", 2);
        a.heard("b", Record::default(), t);
        a.heard("c", Record::default(), t);
        let plan = a.plan(t);
        let given: Vec<u32> = all().difference(&plan.assigned).copied().collect();
        assert!(!given.is_empty());
        // b and c each serve everything they are assigned but for one
        // partition given up by a: that one stays.
        let p = given[0];
        let members = a.members(t);
        let owners = partition::assign(&members, 2);
        let mut b = BTreeSet::new();
        let mut c = BTreeSet::new();
        for (q, o) in owners.iter().enumerate() {
            for &m in o {
                match members[m].as_str() {
                    "b" => b.insert(q as u32),
                    "c" => c.insert(q as u32),
                    _ => false,
                };
            }
        }
        c.remove(&p);
        b.remove(&p);
        a.heard("b", Record { serving: b }, t);
        a.heard("c", Record { serving: c }, t);
        let stop = a.plan(t).to_stop(&all());
        assert!(!stop.contains(&p));
        assert_eq!(stop.len(), given.len() - 1);
    }
}
