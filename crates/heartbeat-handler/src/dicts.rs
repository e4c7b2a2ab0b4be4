//! The handler's copy of the interval dictionaries and the pending changes
//! that have not reached KV yet.
//!
//! Pure data and rules, no I/O: the ingest loop records changes here, the
//! flusher takes them out, writes them with compare-and-set and puts the
//! outcome back. Because [`apply`] is idempotent, a write retried after a
//! conflict or a time-out that did commit leaves the same dictionary.

use std::collections::HashMap;

use headcount_protocol::wire::{Heartbeat, HeartbeatRef, Labels, SessionDict, SessionRecord};
use headcount_protocol::{AccountId, ByInterval, DeviceId, IntervalClock, SessionId, UnixMillis};

/// One change to one device's entry in one dictionary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Record (or refresh) this session for the device.
    Upsert(Box<SessionRecord>),
    /// The device's session of the previous interval heartbeated at this
    /// time: copy its record into this interval. Queued for the many live
    /// sessions moving on at an interval boundary, so it is small; it is
    /// turned into an `Upsert` ([`Dicts::resolve`]) when written.
    Carry(UnixMillis),
    /// The session left: drop the device's entry if it still holds it.
    Remove(SessionId),
    /// Like `Remove`, for a dictionary this handler had trimmed (the
    /// session also sat in a newer interval, whose write announces the
    /// leave): the entry goes, no event.
    Forget(SessionId),
}

/// What applying a change did, for events and revocations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Nothing,
    /// A session entered this dictionary (`replaced` is the session it
    /// displaced on the same device, if any).
    Added {
        record: SessionRecord,
        replaced: Option<SessionId>,
    },
    Updated,
    Removed(SessionRecord),
}

/// Applies one change to a dictionary. Idempotent.
pub fn apply(dict: &mut SessionDict, device: &DeviceId, change: &Change) -> Applied {
    match change {
        // Resolved into an upsert before anything is applied.
        Change::Carry(_) => Applied::Nothing,
        Change::Upsert(rec) => match dict.get_mut(device) {
            Some(cur) if cur.session == rec.session => {
                let merged = SessionRecord {
                    since: cur.since.min(rec.since),
                    last_seen: cur.last_seen.max(rec.last_seen),
                    replaced: cur.replaced.clone().or_else(|| rec.replaced.clone()),
                    ..(**rec).clone()
                };
                if *cur == merged {
                    Applied::Nothing
                } else {
                    *cur = merged;
                    Applied::Updated
                }
            }
            // The entry already holds the session that displaced this one:
            // this is a late heartbeat of the older session.
            Some(cur) if cur.replaced.as_ref() == Some(&rec.session) => Applied::Nothing,
            Some(cur) => {
                let replaced = Some(cur.session.clone());
                let record = SessionRecord {
                    replaced: replaced.clone(),
                    ..(**rec).clone()
                };
                *cur = record.clone();
                Applied::Added { record, replaced }
            }
            None => {
                dict.insert(device.clone(), (**rec).clone());
                Applied::Added {
                    record: (**rec).clone(),
                    // Set when the session it displaced lives in the
                    // previous interval's dictionary.
                    replaced: rec.replaced.clone(),
                }
            }
        },
        Change::Remove(session) | Change::Forget(session) => match dict.get(device) {
            Some(cur) if &cur.session == session => {
                let gone = dict.remove(device);
                gone.map_or(Applied::Nothing, Applied::Removed)
            }
            _ => Applied::Nothing,
        },
    }
}

/// One account's dictionary for one interval, as the handler knows it.
#[derive(Debug, Default)]
pub struct Dict {
    /// KV revision of `entries`; 0 when the key does not exist.
    pub revision: u64,
    pub entries: SessionDict,
    /// Changes not yet written, newest per device.
    pub pending: HashMap<DeviceId, Change>,
    /// A write of this dictionary is under way.
    pub in_flight: bool,
    /// What is pending waits for a deferred flush (carry-overs only).
    pub deferred: bool,
    /// `entries` lacks what a newer interval's dictionary also holds (to
    /// save memory): the KV copy must be read before this one is written.
    pub partial: bool,
}

/// When a dictionary with a newly queued change should be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// A flush is already due (or under way and will pick this up).
    Already,
    Now,
    /// After the carry-over delay, so that one write carries many.
    Later,
}

impl Dict {
    /// The device's entry with pending changes applied (`prev`: the
    /// previous interval's dictionary, for a pending carry-over).
    fn effective(&self, device: &DeviceId, prev: Option<&Dict>) -> Option<SessionRecord> {
        let mut rec = self.entries.get(device).cloned();
        if let Some(change) = self.pending.get(device) {
            let change = carried(change, prev.map(|p| &p.entries), device);
            let mut one = SessionDict::new();
            if let Some(r) = rec.take() {
                one.insert(device.clone(), r);
            }
            if let Some(change) = change {
                apply(&mut one, device, &change);
            }
            rec = one.remove(device);
        }
        rec
    }

    /// Queues a change and says when the dictionary must be flushed.
    /// `defer` marks a change nobody waits for (a live session entering a
    /// new interval); any other change makes the flush due now, taking the
    /// deferred ones along.
    fn queue(&mut self, device: DeviceId, change: Change, defer: bool) -> Schedule {
        let was_empty = self.pending.is_empty();
        self.pending.insert(device, change);
        if self.in_flight {
            // The write under way reschedules what is left when it ends.
            Schedule::Already
        } else if was_empty {
            self.deferred = defer;
            if defer {
                Schedule::Later
            } else {
                Schedule::Now
            }
        } else if self.deferred && !defer {
            self.deferred = false;
            Schedule::Now
        } else {
            Schedule::Already
        }
    }

    /// Installs a newer copy read from KV (a watch update or a re-read after
    /// a conflict). Older copies are ignored.
    pub fn install(&mut self, revision: u64, entries: SessionDict) {
        if revision >= self.revision {
            self.revision = revision;
            self.entries = entries;
            self.partial = false;
        }
    }
}

/// `change` ready to apply: a carry-over becomes an upsert of the previous
/// interval's record (None when that record is gone: nothing to carry).
fn carried(change: &Change, prev: Option<&SessionDict>, device: &DeviceId) -> Option<Change> {
    match change {
        Change::Carry(at) => prev.and_then(|p| p.get(device)).map(|r| {
            Change::Upsert(Box::new(SessionRecord {
                last_seen: *at,
                ..r.clone()
            }))
        }),
        other => Some(other.clone()),
    }
}

/// Forgets, in the dictionary of `prev`, every entry whose session the
/// dictionary of `cur` holds for the same device. Only dictionaries with
/// nothing pending or in flight are trimmed.
fn trim(dicts: &mut ByInterval<Dict>, prev: u64, cur: u64) {
    let Some(cur_entries) = dicts.get(&cur).map(|d| &d.entries) else {
        return;
    };
    let Some(p) = dicts.get(&prev) else {
        return;
    };
    if p.in_flight
        || !p.pending.is_empty()
        || !p
            .entries
            .iter()
            .any(|(dev, r)| cur_entries.get(dev).is_some_and(|c| c.session == r.session))
    {
        return;
    }
    let keep: SessionDict = p
        .entries
        .iter()
        .filter(|(dev, r)| cur_entries.get(*dev).is_none_or(|c| c.session != r.session))
        .map(|(d, r)| (d.clone(), r.clone()))
        .collect();
    if let Some(p) = dicts.get_mut(&prev) {
        p.entries = keep;
        p.partial = true;
    }
}

/// What the ingest loop decided about a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to write: the session is already recorded for this interval.
    Unchanged,
    /// Changes were queued; flush these dictionaries now.
    Queued(Vec<(AccountId, u64)>),
    /// A live session entered a new interval: flush after the carry-over
    /// delay, so that one write carries every session of the account.
    Deferred(Vec<(AccountId, u64)>),
    /// The session was displaced by a newer session of the same device.
    Superseded,
}

/// Every dictionary the handler knows, by account and interval.
#[derive(Debug)]
pub struct Dicts {
    clock: IntervalClock,
    accounts: HashMap<AccountId, ByInterval<Dict>>,
}

impl Dicts {
    pub fn new(clock: IntervalClock) -> Self {
        Self {
            clock,
            accounts: HashMap::new(),
        }
    }

    pub fn clock(&self) -> IntervalClock {
        self.clock
    }

    pub fn get_mut(&mut self, account: &AccountId, interval: u64) -> Option<&mut Dict> {
        self.accounts.get_mut(account)?.get_mut(&interval)
    }

    pub fn entry(&mut self, account: &AccountId, interval: u64) -> &mut Dict {
        self.accounts
            .entry(account.clone())
            .or_default()
            .entry_or_default(interval)
    }

    /// Every dictionary with changes not written yet.
    pub fn pending_keys(&self) -> Vec<(AccountId, u64)> {
        self.accounts
            .iter()
            .flat_map(|(a, dicts)| {
                dicts
                    .iter()
                    .filter(|(_, d)| !d.pending.is_empty())
                    .map(move |(i, _)| (a.clone(), i))
            })
            .collect()
    }

    /// Whether any change has not reached KV yet.
    pub fn has_pending(&self) -> bool {
        self.accounts
            .values()
            .flat_map(|d| d.values())
            .any(|d| d.in_flight || !d.pending.is_empty())
    }

    /// Sessions currently held for the live intervals (for the gauge).
    /// Sessions held in the live dictionaries (a device counted once, by its
    /// newest interval), so that the count does not dip at an interval
    /// boundary before each session's next heartbeat moves it along.
    pub fn session_count(&self, now: UnixMillis) -> usize {
        let [prev, cur] = self.clock.live_intervals(now);
        self.accounts
            .values()
            .map(|d| {
                let cur_d = d.get(&cur).map(|c| &c.entries);
                let in_cur = cur_d.map_or(0, |c| c.len());
                let only_prev = d.get(&prev).filter(|_| prev != cur).map_or(0, |p| {
                    p.entries
                        .keys()
                        .filter(|dev| !cur_d.is_some_and(|c| c.contains_key(*dev)))
                        .count()
                });
                in_cur + only_prev
            })
            .sum()
    }

    /// Whether `session` of `device` is recorded in any live dictionary of
    /// `account` other than `except`.
    pub fn recorded_elsewhere(
        &self,
        account: &AccountId,
        device: &DeviceId,
        session: &SessionId,
        except: u64,
        now: UnixMillis,
    ) -> bool {
        let Some(dicts) = self.accounts.get(account) else {
            return false;
        };
        self.clock
            .live_intervals(now)
            .iter()
            .filter(|i| **i != except)
            .filter_map(|i| dicts.get(i))
            .any(|d| d.entries.get(device).is_some_and(|r| &r.session == session))
    }

    /// Drops dictionaries no reader consults any more, keeping those with a
    /// write still pending.
    pub fn prune(&mut self, now: UnixMillis) {
        let [prev, _] = self.clock.live_intervals(now);
        self.accounts.retain(|_, dicts| {
            dicts.retain(|i, d| i >= prev || d.in_flight || !d.pending.is_empty());
            !dicts.is_empty()
        });
    }

    /// Turns the carry-overs among `changes` (taken from `account`'s
    /// dictionary of `interval`) into upserts of the previous interval's
    /// records, dropping those with nothing left to carry.
    pub fn resolve(
        &self,
        account: &AccountId,
        interval: u64,
        changes: HashMap<DeviceId, Change>,
    ) -> HashMap<DeviceId, Change> {
        let prev = self
            .accounts
            .get(account)
            .and_then(|d| d.get(&interval.wrapping_sub(1)))
            .map(|d| &d.entries);
        changes
            .into_iter()
            .filter_map(|(device, change)| match change {
                Change::Carry(_) => carried(&change, prev, &device).map(|c| (device, c)),
                other => Some((device, other)),
            })
            .collect()
    }

    /// Trims `account`'s previous-interval dictionary: a session that has
    /// moved on to the current interval is forgotten there, so that a live
    /// session is held once, not twice. A trimmed dictionary is re-read from
    /// KV before it is written again. Called when the current dictionary
    /// changed, so it costs one pass over one account per write.
    pub fn trim(&mut self, account: &AccountId, now: UnixMillis) {
        let [prev, cur] = self.clock.live_intervals(now);
        if prev != cur
            && let Some(dicts) = self.accounts.get_mut(account)
        {
            trim(dicts, prev, cur);
        }
    }

    /// The fast path: whether a heartbeat changes nothing (its session is
    /// recorded for the current interval with the same fields and nothing is
    /// pending for the device). Borrowed names, no allocation. When false,
    /// [`Dicts::on_heartbeat`] decides.
    pub fn unchanged(
        &self,
        account: &str,
        device: &str,
        session: &str,
        hb: &HeartbeatRef<'_>,
        now: UnixMillis,
    ) -> bool {
        if hb.leave {
            return false;
        }
        let [_, cur] = self.clock.live_intervals(now);
        let Some(dict) = self.accounts.get(account).and_then(|d| d.get(&cur)) else {
            return false;
        };
        if dict.pending.contains_key(device) {
            return false;
        }
        dict.entries.get(device).is_some_and(|r| {
            r.session.as_str() == session && r.labels.matches(hb.content, hb.kind, hb.region)
        })
    }

    /// Decides what a valid heartbeat changes. Only the current interval's
    /// dictionary is written for a live session; a leave is written to every
    /// live dictionary that holds the session.
    pub fn on_heartbeat(
        &mut self,
        account: &AccountId,
        device: &DeviceId,
        session: &SessionId,
        hb: &Heartbeat,
        now: UnixMillis,
    ) -> Decision {
        let [prev, cur] = self.clock.live_intervals(now);
        let dicts = self.accounts.entry(account.clone()).or_default();
        let prev_d = dicts.get(&prev).filter(|_| prev != cur);
        let prev_rec = prev_d.and_then(|d| d.effective(device, None));
        let cur_rec = dicts.get(&cur).and_then(|d| d.effective(device, prev_d));

        let superseded = |r: &Option<SessionRecord>| {
            r.as_ref()
                .is_some_and(|r| r.replaced.as_ref() == Some(session))
        };
        if superseded(&cur_rec) || (cur_rec.is_none() && superseded(&prev_rec)) {
            return Decision::Superseded;
        }

        if hb.leave {
            let mut flush = Vec::new();
            let holds =
                |r: &Option<SessionRecord>| r.as_ref().is_some_and(|r| &r.session == session);
            // A trimmed previous dictionary may still hold the session in KV
            // when the current one does: remove it there too, quietly.
            let trimmed = prev != cur
                && holds(&cur_rec)
                && !holds(&prev_rec)
                && dicts.get(&prev).is_some_and(|d| d.partial);
            let changes = [
                (prev, holds(&prev_rec), Change::Remove(session.clone())),
                (prev, trimmed, Change::Forget(session.clone())),
                (cur, holds(&cur_rec), Change::Remove(session.clone())),
            ];
            for (interval, wanted, change) in changes {
                if wanted {
                    let dict = dicts.entry_or_default(interval);
                    if dict.queue(device.clone(), change, false) == Schedule::Now {
                        flush.push((account.clone(), interval));
                    }
                }
            }
            return if flush.is_empty() {
                Decision::Unchanged
            } else {
                Decision::Queued(flush)
            };
        }

        let same_fields = |r: &SessionRecord| {
            r.labels.matches(
                hb.content.as_deref(),
                hb.kind.as_deref(),
                hb.region.as_deref(),
            )
        };
        if let Some(r) = &cur_rec
            && &r.session == session
            && same_fields(r)
        {
            // A write still waiting (KV slow, a leader election) carries the
            // newest heartbeat's time, so that it does not land stale.
            if let Some(Change::Upsert(rec)) =
                dicts.get_mut(&cur).and_then(|d| d.pending.get_mut(device))
                && &rec.session == session
            {
                rec.last_seen = rec.last_seen.max(now);
            }
            return Decision::Unchanged;
        }
        // Carry the session's start, and which session it displaced, over
        // from whichever live interval knows it. A new session displaces the
        // device's session of the current interval (handled by `apply`) or,
        // when the current interval has none yet, that of the previous one.
        let carried = [&cur_rec, &prev_rec]
            .into_iter()
            .flatten()
            .find(|r| &r.session == session);
        let (since, replaced) = match carried {
            Some(r) => (r.since, r.replaced.clone()),
            None => (
                now,
                match (&cur_rec, &prev_rec) {
                    (None, Some(prev)) => Some(prev.session.clone()),
                    _ => None,
                },
            ),
        };
        let record = SessionRecord {
            session: session.clone(),
            since,
            last_seen: now,
            labels: Labels::new(
                hb.content.as_deref(),
                hb.kind.as_deref(),
                hb.region.as_deref(),
            ),
            replaced,
        };
        // Only the interval changed: the session is live in the previous
        // dictionary, so nobody waits for this write, and the previous
        // record is all it needs.
        let defer = cur_rec.is_none() && carried.is_some_and(same_fields);
        let change = if defer {
            Change::Carry(now)
        } else {
            Change::Upsert(Box::new(record))
        };
        let dict = dicts.entry_or_default(cur);
        match dict.queue(device.clone(), change, defer) {
            Schedule::Now => Decision::Queued(vec![(account.clone(), cur)]),
            Schedule::Later => Decision::Deferred(vec![(account.clone(), cur)]),
            Schedule::Already => Decision::Queued(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ids() -> (AccountId, DeviceId, SessionId) {
        (
            AccountId::parse("acme").unwrap(),
            DeviceId::parse("tv").unwrap(),
            SessionId::parse("s1").unwrap(),
        )
    }

    fn clock() -> IntervalClock {
        IntervalClock::new(Duration::from_secs(10))
    }

    /// Simulates a successful flush of everything pending.
    fn flush(d: &mut Dicts) {
        let keys: Vec<(AccountId, u64)> = d
            .accounts
            .iter()
            .flat_map(|(a, dicts)| dicts.iter().map(move |(i, _)| (a.clone(), i)))
            .collect();
        for (a, i) in keys {
            let taken = std::mem::take(&mut d.get_mut(&a, i).expect("dict").pending);
            let changes = d.resolve(&a, i, taken);
            let dict = d.get_mut(&a, i).expect("dict");
            for (dev, ch) in changes {
                apply(&mut dict.entries, &dev, &ch);
            }
            dict.revision += 1;
        }
    }

    #[test]
    fn a_moved_session_is_held_once_and_its_leave_reaches_both_intervals() {
        let (a, dev, s) = ids();
        let mut d = Dicts::new(clock());
        d.on_heartbeat(&a, &dev, &s, &Heartbeat::default(), 1_000);
        flush(&mut d);
        // Next interval: the session moves on; the old copy is trimmed.
        d.on_heartbeat(&a, &dev, &s, &Heartbeat::default(), 10_500);
        flush(&mut d);
        d.trim(&a, 10_600);
        let old = d.get_mut(&a, 0).expect("previous dictionary");
        assert!(old.partial && old.entries.is_empty());
        assert_eq!(d.session_count(10_600), 1);
        // Leaving removes it from the current dictionary and, quietly, from
        // the trimmed one (whose KV copy still holds it).
        let leave = Heartbeat {
            leave: true,
            ..Default::default()
        };
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s, &leave, 10_700),
            Decision::Queued(vec![(a.clone(), 0), (a.clone(), 1)])
        );
        let old = d.get_mut(&a, 0).expect("previous dictionary");
        assert_eq!(old.pending.get(&dev), Some(&Change::Forget(s.clone())));
        let new = d.get_mut(&a, 1).expect("current dictionary");
        assert_eq!(new.pending.get(&dev), Some(&Change::Remove(s.clone())));
    }

    #[test]
    fn one_write_per_session_per_interval() {
        let (a, dev, s) = ids();
        let mut d = Dicts::new(clock());
        let hb = Heartbeat::default();
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s, &hb, 1_000),
            Decision::Queued(vec![(a.clone(), 0)])
        );
        // Further heartbeats before the flush are covered by the queued write.
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s, &hb, 2_000),
            Decision::Unchanged
        );
        flush(&mut d);
        for t in [3_000, 5_000, 9_999] {
            assert_eq!(d.on_heartbeat(&a, &dev, &s, &hb, t), Decision::Unchanged);
        }
        // A new interval needs one write (deferred, to carry the account's
        // other sessions along), and keeps the session's start.
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s, &hb, 10_500),
            Decision::Deferred(vec![(a.clone(), 1)])
        );
        // Another live session of the account rides along...
        let tv2 = DeviceId::parse("tv2").unwrap();
        let s2 = SessionId::parse("s2").unwrap();
        flush(&mut d);
        assert_eq!(
            d.on_heartbeat(&a, &tv2, &s2, &hb, 10_600),
            Decision::Queued(vec![(a.clone(), 1)]),
            "a join is written at once"
        );
        flush(&mut d);
        let rec = &d.get_mut(&a, 1).unwrap().entries[&dev];
        assert_eq!(rec.since, 1_000);
    }

    #[test]
    fn leave_clears_every_live_interval() {
        let (a, dev, s) = ids();
        let mut d = Dicts::new(clock());
        d.on_heartbeat(&a, &dev, &s, &Heartbeat::default(), 9_000);
        flush(&mut d);
        d.on_heartbeat(&a, &dev, &s, &Heartbeat::default(), 10_001);
        flush(&mut d);
        let leave = Heartbeat {
            leave: true,
            ..Default::default()
        };
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s, &leave, 10_002),
            Decision::Queued(vec![(a.clone(), 0), (a.clone(), 1)])
        );
        flush(&mut d);
        assert!(d.get_mut(&a, 0).unwrap().entries.is_empty());
        assert!(d.get_mut(&a, 1).unwrap().entries.is_empty());
    }

    #[test]
    fn new_session_replaces_and_old_one_is_superseded() {
        let (a, dev, s1) = ids();
        let s2 = SessionId::parse("s2").unwrap();
        let mut d = Dicts::new(clock());
        d.on_heartbeat(&a, &dev, &s1, &Heartbeat::default(), 1_000);
        flush(&mut d);
        d.on_heartbeat(&a, &dev, &s2, &Heartbeat::default(), 2_000);
        flush(&mut d);
        let rec = d.get_mut(&a, 0).unwrap().entries[&dev].clone();
        assert_eq!(rec.session, s2);
        assert_eq!(rec.replaced, Some(s1.clone()));
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s1, &Heartbeat::default(), 3_000),
            Decision::Superseded
        );
    }

    #[test]
    fn replacement_across_an_interval_boundary_is_recorded_and_sticks() {
        let (a, dev, s1) = ids();
        let s2 = SessionId::parse("s2").unwrap();
        let mut d = Dicts::new(clock());
        // s1 lives in interval 0 only; s2 starts in interval 1.
        d.on_heartbeat(&a, &dev, &s1, &Heartbeat::default(), 9_000);
        flush(&mut d);
        d.on_heartbeat(&a, &dev, &s2, &Heartbeat::default(), 10_500);
        let cur = d.get_mut(&a, 1).unwrap();
        let (device, change) = cur.pending.iter().next().unwrap();
        let mut entries = cur.entries.clone();
        let applied = apply(&mut entries, device, change);
        // The write reports s1 as displaced, so it gets revoked.
        assert!(
            matches!(&applied, Applied::Added { replaced: Some(old), .. } if *old == s1),
            "{applied:?}"
        );
        flush(&mut d);
        // A late s1 heartbeat cannot take the seat back...
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s1, &Heartbeat::default(), 11_000),
            Decision::Superseded
        );
        // ...nor later, once s2 has been carried into the next interval.
        d.on_heartbeat(&a, &dev, &s2, &Heartbeat::default(), 20_500);
        flush(&mut d);
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s1, &Heartbeat::default(), 21_000),
            Decision::Superseded
        );
        assert_eq!(d.get_mut(&a, 2).unwrap().entries[&dev].session, s2);
    }

    #[test]
    fn the_session_count_holds_across_an_interval_boundary() {
        let (a, dev, s) = ids();
        let mut d = Dicts::new(clock());
        d.on_heartbeat(&a, &dev, &s, &Heartbeat::default(), 9_000);
        flush(&mut d);
        assert_eq!(d.session_count(9_500), 1);
        // The next interval has begun, the session has not beaten yet.
        assert_eq!(d.session_count(10_500), 1);
        // Once it has, it is still one session.
        d.on_heartbeat(&a, &dev, &s, &Heartbeat::default(), 10_600);
        flush(&mut d);
        assert_eq!(d.session_count(10_700), 1);
    }

    #[test]
    fn apply_is_idempotent() {
        let (_, dev, s) = ids();
        let rec = SessionRecord {
            session: s.clone(),
            since: 5,
            last_seen: 5,
            labels: Labels::default(),
            replaced: None,
        };
        let mut dict = SessionDict::new();
        let up = Change::Upsert(Box::new(rec.clone()));
        assert!(matches!(apply(&mut dict, &dev, &up), Applied::Added { .. }));
        assert_eq!(apply(&mut dict, &dev, &up), Applied::Nothing);
        let rm = Change::Remove(s);
        assert_eq!(apply(&mut dict, &dev, &rm), Applied::Removed(rec));
        assert_eq!(apply(&mut dict, &dev, &rm), Applied::Nothing);
    }
}
