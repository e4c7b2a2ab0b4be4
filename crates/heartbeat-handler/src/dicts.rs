//! The handler's copy of the interval dictionaries and the pending changes
//! that have not reached KV yet.
//!
//! Pure data and rules, no I/O: the ingest loop records changes here
//! ([`Dicts::on_heartbeat`], and [`Dicts::ended`] for sessions ended
//! elsewhere); the flusher takes them out ([`Dicts::take_for_write`]),
//! writes them with compare-and-set and hands the outcome back
//! ([`Dicts::on_written`], [`Dicts::on_conflict`]). Because [`apply`] is
//! idempotent, a write retried after a conflict or a time-out that did
//! commit leaves the same dictionary.
//!
//! A leave applies wherever its session is: in the copy, in a pending change
//! or in the write under way. Where this copy does not show the session
//! (another handler recorded it, and the watch has not brought that yet),
//! the removal waits for a copy that does ([`Dicts::install`]), for records
//! heard before the leave or just after it ([`LEAVE_REORDER_MS`]): a
//! session heard again later is recorded anew, and stays.
//!
//! A dictionary never grows past [`DICT_MAX_SESSIONS`] devices, so that its
//! value always fits one KV write: a new device beyond that is refused, at
//! the heartbeat ([`Decision::Full`]) and again when the write is taken.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};

use headcount_protocol::policy::DICT_MAX_SESSIONS;
use headcount_protocol::wire::{Heartbeat, HeartbeatRef, Labels, SessionDict, SessionRecord};
use headcount_protocol::{
    AccountId, ByDevice, ByInterval, DeviceId, IntervalClock, SessionId, UnixMillis,
};

use crate::rate::{Beats, Limits};

/// One dictionary's copy as KV holds it, compact (exactly one slot per
/// device). A copy is replaced whole by a newer one (a write that landed,
/// a watch update, a re-read), or rebuilt smaller by a trim; the changes on
/// their way to KV are kept beside it ([`Dict`]).
pub type Entries = ByDevice<SessionRecord>;

/// A hash map whose iteration order follows only from what was done to it
/// (a fixed-key hasher, not one seeded per process): the order in which
/// pending changes are applied decides which of several new devices a full
/// dictionary refuses, and the order in which waiting removals are queued
/// decides which goes first, so the handler decides alike for one history
/// in every run (and a simulation replays exactly). Zero-sized: no memory
/// per map beyond std's.
pub type FixedMap<K, V> = HashMap<K, V, BuildHasherDefault<DefaultHasher>>;

/// How much later than its leave a session's record may have been heard
/// and still be the session before its leave: a heartbeat and a leave
/// sent back to back may be handled in either order by two handlers (whose
/// clocks agree to well within this). A session heard again after that (a
/// page restored from the browser's cache, well over a second later) is
/// recorded anew, and stays.
pub const LEAVE_REORDER_MS: UnixMillis = 1_000;

/// One change to one device's entry in one dictionary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Record (or refresh) this session for the device.
    Upsert(Box<SessionRecord>),
    /// This session, the device's in the previous interval, heartbeated at
    /// this time: copy its record into this interval. Queued for the many
    /// live sessions moving on at an interval boundary, so it is small; it
    /// is turned into an `Upsert` when taken for a write
    /// ([`Dict::take_for_write`]). The session is named: by then the
    /// previous interval may hold another session of the device, which is
    /// not this heartbeat's to carry; and so are the heartbeat's labels:
    /// the record there may have changed since, to labels this heartbeat
    /// (the newest) did not say.
    Carry(SessionId, UnixMillis, Labels),
    /// The session left: drop the device's entry if it still holds it, and
    /// announce the leave once that is written.
    ///
    /// This and the two removals below take out a record heard by the time
    /// they carry only (the leave, and [`LEAVE_REORDER_MS`]; any time for
    /// an ending): a session heard again since, on another handler, has
    /// been recorded anew, and stays.
    Remove(SessionId, UnixMillis),
    /// The session left before this handler saw its record land (its add
    /// was pending here, or under way): drop the entry if the add landed
    /// after all, and announce the leave either way, since no other writer
    /// knows of it.
    Withdraw(Box<SessionRecord>, UnixMillis),
    /// Drop the entry if it holds the session, quietly: the session was
    /// ended by whoever announced that, its leave was told already, or
    /// this handler had trimmed it from its copy (it moved on, and its
    /// leave is announced where it is).
    Forget(SessionId, UnixMillis),
}

impl Change {
    /// Whether the change takes an entry away rather than writing one.
    fn removes(&self) -> bool {
        matches!(
            self,
            Change::Remove(..) | Change::Withdraw(..) | Change::Forget(..)
        )
    }

    /// The session the change is about.
    fn session(&self) -> &SessionId {
        match self {
            Change::Upsert(r) | Change::Withdraw(r, _) => &r.session,
            Change::Carry(s, ..) | Change::Remove(s, _) | Change::Forget(s, _) => s,
        }
    }

    /// The session whose leave the change announces once written.
    fn announces(&self) -> Option<&SessionId> {
        match self {
            Change::Remove(s, _) => Some(s),
            Change::Withdraw(r, _) => Some(&r.session),
            _ => None,
        }
    }
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
    /// A withdrawn session was not in the dictionary (its add never
    /// landed): nothing changed, and its leave is announced all the same.
    Withdrawn(SessionRecord),
}

/// Applies one change to a dictionary. Idempotent.
pub fn apply(dict: &mut SessionDict, device: &DeviceId, change: &Change) -> Applied {
    match change {
        // Resolved into an upsert before anything is applied.
        Change::Carry(..) => Applied::Nothing,
        Change::Upsert(rec) => match dict.get_mut(device) {
            Some(cur) if cur.session == rec.session => {
                // The labels of the later heartbeat: writes from two
                // handlers may land in the other order than their
                // heartbeats came (a retry after a conflict, a carry-over
                // behind a change).
                let labels = if cur.last_seen > rec.last_seen {
                    cur.labels.clone()
                } else {
                    rec.labels.clone()
                };
                let merged = SessionRecord {
                    since: cur.since.min(rec.since),
                    last_seen: cur.last_seen.max(rec.last_seen),
                    replaced: cur.replaced.clone().or_else(|| rec.replaced.clone()),
                    labels,
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
            Some(cur) if cur.replaced.as_deref() == Some(&rec.session) => Applied::Nothing,
            Some(cur) => {
                let replaced = Some(cur.session.clone());
                let record = SessionRecord {
                    replaced: replaced.clone().map(Box::new),
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
                    replaced: rec.replaced.as_deref().cloned(),
                }
            }
        },
        Change::Remove(session, by) | Change::Forget(session, by) => match dict.get(device) {
            Some(cur) if &cur.session == session && cur.last_seen <= *by => {
                let gone = dict.remove(device);
                gone.map_or(Applied::Nothing, Applied::Removed)
            }
            _ => Applied::Nothing,
        },
        Change::Withdraw(rec, by) => match dict.get(device) {
            Some(cur) if cur.session == rec.session && cur.last_seen <= *by => {
                let gone = dict.remove(device);
                gone.map_or(Applied::Nothing, Applied::Removed)
            }
            // Heard again since: it stays, and so far it has not left.
            Some(cur) if cur.session == rec.session => Applied::Nothing,
            // Also when a newer session of the device names it as replaced:
            // whoever recorded that session first may not have known of
            // this one (the name was merged in by a later write of it), so
            // no replacement need have announced its end.
            _ => Applied::Withdrawn((**rec).clone()),
        },
    }
}

/// One account's dictionary for one interval, as the handler knows it, and
/// the changes on their way to KV.
///
/// A write goes through four steps, all methods here, so that the flusher
/// only does the I/O: [`Dict::take_for_write`] hands out what to write and
/// the revision KV must still be at, and the outcome comes back through
/// exactly one of [`Dict::on_written`] or [`Dict::on_conflict`] (or, after
/// [`Take::Reread`], [`Dict::on_reread`]).
/// Until then the dictionary is in flight: changes queued meanwhile wait
/// for that write to end.
#[derive(Debug, Default)]
pub struct Dict {
    /// KV revision of `entries`; 0 when the key does not exist.
    revision: u64,
    entries: Entries,
    /// What is on its way to KV; None when nothing is ([`Dict::tidy`]).
    work: Option<Box<Work>>,
    /// A write (or the re-read of a trimmed copy) is under way.
    in_flight: bool,
    /// What is pending waits for a deferred flush (carry-overs only).
    deferred: bool,
    /// `entries` lacks what a newer interval's dictionary also holds (to
    /// save memory): the KV copy must be read before this one is written.
    partial: bool,
    /// The sessions trimmed from `entries` (by [`trimmed_key`]), which KV
    /// may still hold here: a leave or an ending removes them from KV too.
    /// Sorted, and exactly as long as it is: it is kept for as long as the
    /// interval is live, for nearly every session, and dropped after
    /// ([`Dicts::prune`]).
    trimmed: Box<[u64]>,
}

/// What one dictionary has on its way to KV. Held apart from the
/// dictionary, and only while there is any: nearly every dictionary is at
/// rest nearly all the time (a write or two per interval), and at rest a
/// dictionary is its copy and no more.
#[derive(Debug, Default)]
struct Work {
    /// Changes not yet written, newest per device.
    pending: FixedMap<DeviceId, Change>,
    /// Leaves still to be written here and announced whose pending
    /// removal a change of another session of the device took the place
    /// of (a device that left and started a new session), by the session
    /// that left: applied before the device's pending change, so that the
    /// leave is announced by the write that takes the session out (or, for
    /// a withdrawal, by the write that finds it never landed).
    owed: FixedMap<SessionId, (DeviceId, Change)>,
    /// The sessions the write under way records, by device: not in
    /// `entries` before it lands, yet a leave arriving meanwhile must find
    /// them, and a full dictionary must count them.
    flying: FixedMap<DeviceId, SessionRecord>,
    /// The revision of the copy when the re-read under way was taken.
    reread_from: u64,
}

impl Work {
    /// Nothing on its way: what a dictionary at rest reads as its work.
    const NONE: Work = Work {
        pending: FixedMap::with_hasher(BuildHasherDefault::new()),
        owed: FixedMap::with_hasher(BuildHasherDefault::new()),
        flying: FixedMap::with_hasher(BuildHasherDefault::new()),
        reread_from: 0,
    };

    fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.owed.is_empty() && self.flying.is_empty()
    }
}

/// [`Work::NONE`], to borrow.
static NO_WORK: Work = Work::NONE;

/// When a dictionary with a newly queued change should be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// A flush is already due (or under way and will pick this up).
    Already,
    Now,
    /// After the carry-over delay, so that one write carries many.
    Later,
}

/// What [`Dict::take_for_write`] found to do.
#[derive(Debug)]
#[must_use]
pub enum Take {
    /// Nothing: no change is pending, or a write is under way (it asks for
    /// another flush when it ends if changes are left).
    Idle,
    /// Every pending change was already in the copy, or was refused by a
    /// full dictionary: they are done, and there is nothing to write. What
    /// they still announce (the leave of a session withdrawn before its
    /// add landed) is announced now.
    Unchanged {
        applied: Vec<(DeviceId, Applied, bool)>,
        /// New sessions refused for want of room.
        refused: usize,
        /// Removals that waited for the changes just done were queued:
        /// flush again.
        more: bool,
    },
    /// The copy is trimmed: read the whole dictionary from KV, hand it to
    /// [`Dict::on_reread`] and flush again. The pending changes wait.
    Reread,
    /// Write this with compare-and-set and hand back the outcome.
    Write(Write),
}

/// A write taken from a dictionary: the value, the revision KV must still
/// be at, and the changes it carries, which go back to the dictionary with
/// the outcome.
#[derive(Debug)]
#[must_use = "a write ends with on_written or on_conflict"]
pub struct Write {
    revision: u64,
    value: SessionDict,
    /// The changes written, carry-overs resolved; pending again if the
    /// write does not land.
    changes: FixedMap<DeviceId, Change>,
    /// The owed leaves it carries, done once it lands (owed until then).
    owed: Vec<(SessionId, Change)>,
    /// What they did, to announce once the write lands (see
    /// [`Written::applied`]).
    applied: Vec<(DeviceId, Applied, bool)>,
    /// New sessions this write left out for want of room.
    refused: usize,
}

impl Write {
    /// The revision KV must hold for the write to land (0: no key yet).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The whole dictionary to write.
    pub fn value(&self) -> &SessionDict {
        &self.value
    }

    /// How many new sessions the dictionary had no room for: they are
    /// dropped, not retried (the session's next heartbeat asks again).
    pub fn refused(&self) -> usize {
        self.refused
    }
}

/// A write that landed.
#[derive(Debug)]
pub struct Written {
    /// What the write did to each device's entry, for events and
    /// revocations: only the writer whose compare-and-set landed announces.
    /// The flag says whether an added session was recorded in the interval
    /// before when the write was taken: a carried session's arrival is not
    /// news.
    pub applied: Vec<(DeviceId, Applied, bool)>,
    /// Changes were queued while the write was under way: flush again.
    pub more: bool,
}

/// Where a dictionary holds one session of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Held {
    /// Not at all, or only to be displaced or removed by a change already
    /// queued.
    No,
    /// In the copy KV has confirmed.
    Landed,
    /// Only in a write that has not landed: pending, or under way.
    Writing(SessionRecord),
}

impl Dict {
    /// What is on its way to KV (nothing, for a dictionary at rest).
    fn work_ref(&self) -> &Work {
        self.work.as_deref().unwrap_or(&NO_WORK)
    }

    /// What is on its way to KV, to add to.
    fn work(&mut self) -> &mut Work {
        self.work.get_or_insert_default()
    }

    fn pending(&self) -> &FixedMap<DeviceId, Change> {
        &self.work_ref().pending
    }

    fn owed(&self) -> &FixedMap<SessionId, (DeviceId, Change)> {
        &self.work_ref().owed
    }

    fn flying(&self) -> &FixedMap<DeviceId, SessionRecord> {
        &self.work_ref().flying
    }

    /// Lets the work go once nothing is on its way (and no write or
    /// re-read is under way, whose outcome it waits for).
    fn tidy(&mut self) {
        if !self.in_flight && self.work.as_deref().is_some_and(Work::is_empty) {
            self.work = None;
        }
    }

    /// The device's entry with pending changes applied (`prev`: the
    /// previous interval's dictionary, for a pending carry-over).
    fn effective(&self, device: &DeviceId, prev: Option<&Dict>) -> Option<SessionRecord> {
        let mut rec = self.entries.get(device).cloned();
        let owed = self.owed_by(device);
        let pending = self.pending().get(device);
        if owed.is_empty() && pending.is_none() {
            return rec;
        }
        let mut one = SessionDict::new();
        if let Some(r) = rec.take() {
            one.insert(device.clone(), r);
        }
        for change in owed {
            apply(&mut one, device, change);
        }
        if let Some(change) = pending.and_then(|c| carried(c, prev.map(|p| &p.entries), device)) {
            apply(&mut one, device, &change);
        }
        one.remove(device)
    }

    /// The owed removals of `device`'s earlier sessions.
    fn owed_by(&self, device: &DeviceId) -> Vec<&Change> {
        if self.owed().is_empty() {
            return Vec::new();
        }
        self.owed()
            .values()
            .filter(|(d, _)| d == device)
            .map(|(_, c)| c)
            .collect()
    }

    /// Whether anything is left to write: changes pending or leaves owed.
    fn waiting(&self) -> bool {
        !self.pending().is_empty() || !self.owed().is_empty()
    }

    /// Where this dictionary holds `session` of `device`, counting the
    /// pending changes and the write under way (`prev`: the previous
    /// interval's entries, for a pending carry-over).
    fn held(&self, device: &DeviceId, session: &SessionId, prev: Option<&Entries>) -> Held {
        // Its leave is owed here already.
        if self.owed().contains_key(session) {
            return Held::No;
        }
        let flying = || {
            self.flying()
                .get(device)
                .filter(|r| r.session == *session)
                .cloned()
        };
        let writing = match self.pending().get(device) {
            Some(change) if change.session() == session => match carried(change, prev, device) {
                Some(Change::Upsert(rec)) => Some(*rec),
                // Its removal is queued, or a carry-over with nothing left
                // to carry.
                _ => return Held::No,
            },
            // Another session of the device is about to displace it, if
            // that write lands: its removal is owed meanwhile
            // ([`Dict::queue_removal`]).
            Some(_) => flying(),
            None => flying(),
        };
        if self
            .entries
            .get(device)
            .is_some_and(|r| r.session == *session)
        {
            Held::Landed
        } else {
            writing.map_or(Held::No, Held::Writing)
        }
    }

    /// Whether a removal of `session` of `device` may still land here:
    /// pending, owed, or maybe in the write under way.
    fn removing(&self, device: &DeviceId, session: &SessionId) -> bool {
        self.in_flight
            || self
                .pending()
                .get(device)
                .is_some_and(|c| c.removes() && c.session() == session)
            || self.owed().contains_key(session)
    }

    /// The copy's record of `session` of `device` when a write of another
    /// session of the device waits here to take that entry (pending, or
    /// else under way) and is an older session's: its record started
    /// before this one's and does not name this one as displaced. Such a
    /// change was queued before this handler knew of `session` (a
    /// heartbeat taken while the copy showed it would have named it), so
    /// nothing but the records orders the two, and they say `session` is
    /// the newer. A heartbeat of `session` then queues it here in that
    /// change's place ([`Dicts::on_heartbeat`]), so that a session still
    /// heartbeating is not taken for a displaced one (`Superseded`), nor
    /// displaced by a write that has not landed. Under clock skew the
    /// records may misorder two sessions started within the skew: the
    /// other session's next heartbeat queues it again.
    fn overtaken(
        &self,
        device: &DeviceId,
        session: &SessionId,
        prev: Option<&Entries>,
    ) -> Option<SessionRecord> {
        let landed = self.entries.get(device).filter(|r| r.session == *session)?;
        let other = match self.pending().get(device) {
            Some(change) => match carried(change, prev, device)? {
                Change::Upsert(r) => *r,
                _ => return None,
            },
            None => self.flying().get(device)?.clone(),
        };
        (other.session != *session
            && other.since < landed.since
            && other.replaced.as_deref() != Some(session))
        .then(|| landed.clone())
    }

    /// Whether the device has an entry here, or will have once what is
    /// pending or under way lands: what a full dictionary counts.
    fn counts(&self, device: &DeviceId) -> bool {
        self.entries.contains_key(device)
            || self.pending().contains_key(device)
            || self.flying().contains_key(device)
    }

    /// An upper bound of how many devices [`Dict::counts`].
    fn count_bound(&self) -> usize {
        self.entries.len() + self.pending().len() + self.flying().len()
    }

    /// Queues a change and says when the dictionary must be flushed.
    /// `defer` marks a change nobody waits for (a live session entering a
    /// new interval, the quiet removal of an ended session); any other
    /// change makes the flush due now, taking the deferred ones along.
    ///
    /// A pending removal that announces a leave of another session of the
    /// device is not dropped: it is owed ([`Work::owed`]). A change of a
    /// session whose own leave is owed takes its place as it would have
    /// taken the pending removal's (a heartbeat heard again voids it), but
    /// for a quiet removal, which leaves it owed.
    fn queue(&mut self, device: DeviceId, change: Change, defer: bool) -> Schedule {
        let was_empty = !self.waiting();
        if !matches!(change, Change::Forget(..)) {
            self.work().owed.remove(change.session());
        }
        let session = change.session().clone();
        if let Some(old) = self.work().pending.insert(device.clone(), change)
            && let Some(left) = old.announces().filter(|s| **s != session)
        {
            self.work().owed.insert(left.clone(), (device, old));
        }
        self.due(was_empty, defer)
    }

    /// Queues the removal of a session, owed ([`Work::owed`]) when a change
    /// of another session of the device is pending or under way: that
    /// change is not displaced (it may land, or not), and the removal
    /// goes before it.
    fn queue_removal(&mut self, device: DeviceId, change: Change, defer: bool) -> Schedule {
        let session = change.session();
        let other = match self.pending().get(&device) {
            Some(c) => c.session() != session,
            None => self
                .flying()
                .get(&device)
                .is_some_and(|r| r.session != *session),
        };
        if !other {
            return self.queue(device, change, defer);
        }
        let was_empty = !self.waiting();
        self.work().owed.insert(session.clone(), (device, change));
        self.due(was_empty, defer)
    }

    /// When to flush after a change was queued (`was_empty`: nothing was
    /// waiting before it).
    fn due(&mut self, was_empty: bool, defer: bool) -> Schedule {
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
    /// a conflict). Older copies are ignored, and so is the copy held once
    /// more (the watch bringing back a write of this handler's that landed):
    /// one revision of a key is one value, and building it again would only
    /// churn the allocator. A trimmed copy takes it whole.
    pub fn install(&mut self, revision: u64, entries: impl Into<Entries>) {
        if revision == self.revision && !self.partial {
            return;
        }
        if revision >= self.revision {
            self.revision = revision;
            self.entries = entries.into();
            self.partial = false;
            self.trimmed = Box::default();
        }
    }

    /// Takes every pending change for one write on top of the copy held
    /// (`prev`: the previous interval's entries, which carry-overs copy).
    /// Unless [`Take::Idle`], the dictionary is in flight until the outcome
    /// comes back; [`Take::Unchanged`] has already ended it.
    ///
    /// The value never holds more than [`DICT_MAX_SESSIONS`] devices: a
    /// change that would add a device beyond that is refused and dropped.
    /// Removals go first, then the sessions already live here or in the
    /// previous interval, then new devices, and a new device gets in only
    /// while this dictionary and the previous one hold fewer than that
    /// together, so that the previous interval's sessions can always be
    /// carried over.
    ///
    /// The owed leaves go first of all, each before its device's pending
    /// change; they stay owed until a write carrying them lands.
    pub fn take_for_write(&mut self, prev: Option<&Entries>) -> Take {
        if self.in_flight || !self.waiting() {
            return Take::Idle;
        }
        self.in_flight = true;
        self.deferred = false;
        if self.partial {
            self.work().reread_from = self.revision;
            return Take::Reread;
        }
        let pending = std::mem::take(&mut self.work().pending);
        let resolved = resolve(pending, prev);
        let mut value = self.entries.to_map();
        let in_prev = |device: &DeviceId| prev.is_some_and(|p| p.contains_key(device));
        // Devices in this dictionary or the previous one; only counted
        // when the write could reach the limit at all.
        let bound = value.len() + prev.map_or(0, |p| p.len()) + resolved.len();
        let mut union = (bound > DICT_MAX_SESSIONS).then(|| {
            value.len() + prev.map_or(0, |p| p.keys().filter(|d| !value.contains_key(*d)).count())
        });
        let owed: Vec<(SessionId, Change)> = self
            .owed()
            .iter()
            .map(|(s, (_, c))| (s.clone(), c.clone()))
            .collect();
        let mut order: Vec<(DeviceId, Change, bool)> = self
            .owed()
            .values()
            .map(|(d, c)| (d.clone(), c.clone(), true))
            .chain(resolved.into_iter().map(|(d, c)| (d, c, false)))
            .collect();
        // Stable: the owed leaves stay ahead of the pending removals.
        order.sort_by_key(|(device, change, _)| {
            if change.removes() {
                0
            } else if value.contains_key(device) || in_prev(device) {
                1
            } else {
                2
            }
        });
        let mut changes = FixedMap::with_capacity_and_hasher(order.len(), Default::default());
        let mut applied = Vec::with_capacity(order.len());
        let mut changed = false;
        let mut refused = 0;
        for (device, change, is_owed) in order {
            let before = value.contains_key(&device);
            if let Some(union) = union
                && !before
                && !change.removes()
            {
                let room = if in_prev(&device) {
                    value.len() < DICT_MAX_SESSIONS
                } else {
                    union < DICT_MAX_SESSIONS
                };
                if !room {
                    refused += 1;
                    continue;
                }
            }
            let what = apply(&mut value, &device, &change);
            let after = value.contains_key(&device);
            if let Some(union) = union.as_mut()
                && before != after
                && !in_prev(&device)
            {
                if after {
                    *union += 1;
                } else {
                    *union -= 1;
                }
            }
            match what {
                Applied::Nothing => {}
                // Nothing changed, and the leave is announced all the same.
                Applied::Withdrawn(_) => applied.push((device.clone(), what, false)),
                _ => {
                    changed = true;
                    // A forgotten entry's end is announced elsewhere.
                    if !matches!(change, Change::Forget(..)) {
                        applied.push((device.clone(), what, false));
                    }
                }
            }
            if is_owed {
                continue;
            }
            if let Change::Upsert(rec) = &change {
                self.work().flying.insert(device.clone(), (**rec).clone());
            }
            changes.insert(device, change);
        }
        if !changed {
            // `value` is the copy held: nothing to write or install.
            self.write_ended();
            self.paid(owed);
            return Take::Unchanged {
                applied,
                refused,
                more: false,
            };
        }
        Take::Write(Write {
            revision: self.revision,
            value,
            changes,
            owed,
            applied,
            refused,
        })
    }

    /// The write under way has ended (it landed, did not, or found nothing
    /// to write): the dictionary is no longer in flight, and the records it
    /// carried are let go, with their map's memory: a dictionary is written
    /// a few times an interval, and a map merely cleared would keep room
    /// for the largest write it ever carried, for every dictionary held.
    fn write_ended(&mut self) {
        self.in_flight = false;
        if let Some(work) = self.work.as_deref_mut() {
            work.flying = FixedMap::default();
        }
        self.tidy();
    }

    /// The owed leaves a write carried are done (it landed, or there was
    /// nothing to write), but for those owed anew since.
    fn paid(&mut self, owed: Vec<(SessionId, Change)>) {
        for (session, change) in owed {
            if self.owed().get(&session).is_some_and(|(_, c)| *c == change) {
                self.work().owed.remove(&session);
            }
        }
        self.tidy();
    }

    /// The write landed at `revision`: its value becomes the copy (unless
    /// the watch already brought a newer one).
    pub fn on_written(&mut self, write: Write, revision: u64) -> Written {
        self.install(revision, write.value);
        self.write_ended();
        self.paid(write.owed);
        Written {
            applied: write.applied,
            more: self.waiting(),
        }
    }

    /// The write did not land, or may not have: another write landed first
    /// (a conflict), or it failed or timed out, so it may have landed all
    /// the same. Both are handled alike: the outcome of a failed write is
    /// unknown, and treating it as a conflict is what keeps it from being
    /// lost or applied twice. `current` is the copy KV holds now (None when it could not
    /// be read); the write's changes are pending again, to be applied on top
    /// of it by the next flush. A write that landed after all shows up there,
    /// or through the watch, as a newer revision already holding the
    /// changes, and applying them again changes nothing, so they are never
    /// applied twice; otherwise they are retried until they land.
    pub fn on_conflict(&mut self, write: Write, current: Option<(u64, SessionDict)>) {
        if let Some((revision, entries)) = current {
            self.reinstall(revision, entries, write.revision);
        }
        // Newer changes queued meanwhile win over the ones taken (a leave
        // queued behind the session's add withdraws it); a leave taken
        // whose device has a change of another session queued since is
        // owed.
        for (device, change) in write.changes {
            match self.pending().get(&device) {
                None => {
                    self.work().pending.insert(device, change);
                }
                Some(newer) => {
                    if let Some(left) = change.announces()
                        && newer.session() != left
                    {
                        let left = left.clone();
                        self.work().owed.entry(left).or_insert((device, change));
                    }
                }
            }
        }
        self.write_ended();
    }

    /// The whole copy of a trimmed dictionary, read after [`Take::Reread`]
    /// (None when it could not be read: the next flush tries again). The
    /// pending changes stay queued.
    pub fn on_reread(&mut self, current: Option<(u64, SessionDict)>) {
        if let Some((revision, entries)) = current {
            self.reinstall(revision, entries, self.work_ref().reread_from);
        }
        self.in_flight = false;
        self.tidy();
    }

    /// Installs the copy a read brought, asked for when the copy held was
    /// at revision `asked` (the write's expected revision, or the copy's
    /// when a re-read was taken). A read older than the copy held is not
    /// taken: the watch brought newer writes before its answer came, and
    /// going back to it would undo them here (a removal then finds nothing
    /// to remove, and is dropped unannounced). No key (0) is no revision
    /// to compare: it means the key expired only when the copy held no
    /// newer revision than when the read was asked for (the key existed
    /// then, and is gone since: expiry leaves no revision behind). A copy
    /// brought since by the watch may be the key's first write, landed
    /// after the read was served: "no key" then is older than the copy,
    /// and is not taken (if the key did expire, the next write's conflict
    /// reads it again, from that copy).
    fn reinstall(&mut self, revision: u64, entries: SessionDict, asked: u64) {
        if revision >= self.revision || (revision == 0 && self.revision == asked) {
            self.revision = revision;
            self.entries = entries.into();
            self.partial = false;
            self.trimmed = Box::default();
        }
    }
}

/// Turns the carry-overs among `changes` into upserts of the previous
/// interval's records (`prev`), dropping those with nothing left to carry.
fn resolve(
    changes: FixedMap<DeviceId, Change>,
    prev: Option<&Entries>,
) -> FixedMap<DeviceId, Change> {
    changes
        .into_iter()
        .filter_map(|(device, change)| match change {
            Change::Carry(..) => carried(&change, prev, &device).map(|c| (device, c)),
            other => Some((device, other)),
        })
        .collect()
}

/// `change` ready to apply: a carry-over becomes an upsert of the previous
/// interval's record (None when that record is gone, or is another
/// session's: nothing to carry).
fn carried(change: &Change, prev: Option<&Entries>, device: &DeviceId) -> Option<Change> {
    match change {
        Change::Carry(session, at, labels) => prev
            .and_then(|p| p.get(device))
            .filter(|r| &r.session == session)
            .map(|r| {
                Change::Upsert(Box::new(SessionRecord {
                    last_seen: *at,
                    labels: labels.clone(),
                    ..r.clone()
                }))
            }),
        other => Some(other.clone()),
    }
}

/// Forgets, in the dictionary of `prev`, every entry whose session the
/// dictionary of `cur` holds for the same device (but for a pending
/// carry-over there, which copies it yet). Only dictionaries with nothing
/// pending or in flight are trimmed.
fn trim(dicts: &mut ByInterval<Dict>, prev: u64, cur: u64) {
    let Some(c) = dicts.get(&cur) else {
        return;
    };
    let Some(p) = dicts.get(&prev) else {
        return;
    };
    // Moved on, and no carry-over pending here still copies it (with this
    // heartbeat's time, and the fields the copy here may lack).
    let moved = |dev: &DeviceId, r: &SessionRecord| {
        c.entries.get(dev).is_some_and(|e| e.session == r.session)
            && !matches!(c.pending().get(dev), Some(Change::Carry(..)))
    };
    if p.in_flight || p.waiting() || !p.entries.iter().any(|(d, r)| moved(d, r)) {
        return;
    }
    let (gone, keep): (Vec<_>, Vec<_>) = p.entries.iter().partition(|(dev, r)| moved(dev, r));
    let mut trimmed = p.trimmed.to_vec();
    trimmed.extend(gone.into_iter().map(|(_, r)| trimmed_key(&r.session)));
    trimmed.sort_unstable();
    trimmed.dedup();
    let keep: Entries = keep
        .into_iter()
        .map(|(d, r)| (d.clone(), r.clone()))
        .collect();
    if let Some(p) = dicts.get_mut(&prev) {
        p.entries = keep;
        p.partial = true;
        p.trimmed = trimmed.into_boxed_slice();
    }
}

/// A session's key in [`Dict::trimmed`]: a 64-bit hash of its id, so
/// that a trimmed copy keeps 8 bytes of each session it dropped.
fn trimmed_key(session: &SessionId) -> u64 {
    BuildHasherDefault::<DefaultHasher>::default().hash_one(session)
}

/// What the ingest loop decided about a heartbeat (or an ending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to write: the session is already recorded for this interval.
    Unchanged,
    /// Changes were queued; flush these dictionaries now.
    Queued(Vec<(AccountId, u64)>),
    /// Changes nobody waits for were queued (a live session entered a new
    /// interval, an ended session is to be dropped): flush after the
    /// carry-over delay, so that one write carries many.
    Deferred(Vec<(AccountId, u64)>),
    /// The session was displaced by a newer session of the same device.
    Superseded,
    /// A new session, and the account's live dictionaries already hold
    /// [`DICT_MAX_SESSIONS`] devices: it is not recorded.
    Full,
}

/// A removal waiting for its session to show up in a copy of one of the
/// account's dictionaries.
#[derive(Debug, Clone)]
struct Awaited {
    device: DeviceId,
    /// A leave this handler has yet to announce: the first of its removals
    /// to land takes this ([`Dicts::take_announcements`]). False for an
    /// ending (announced by whoever ended it), and once told.
    announce: bool,
    /// Only a record last heard no later than this is removed (the leave,
    /// plus [`LEAVE_REORDER_MS`]): the session of a leave may be heard
    /// again, on another handler, and recorded anew. An ended session
    /// never comes back: no bound.
    heard_by: UnixMillis,
    /// The last interval whose dictionary it was waited for in: it is
    /// dropped once that interval is no longer live.
    until: u64,
}

/// What the handler holds of one account: its dictionaries by interval,
/// and its sessions' heartbeat rate buckets.
#[derive(Debug, Default)]
struct Account {
    dicts: ByInterval<Dict>,
    beats: Beats,
}

/// Every dictionary the handler knows, by account and interval.
#[derive(Debug)]
pub struct Dicts {
    clock: IntervalClock,
    limits: Limits,
    accounts: FixedMap<AccountId, Account>,
    /// Removals of sessions that no copy here holds yet, by account and
    /// session: a leave handled here whose session another handler
    /// records, or a session ended before this copy showed it.
    awaited: FixedMap<AccountId, FixedMap<SessionId, Awaited>>,
}

impl Dicts {
    pub fn new(clock: IntervalClock) -> Self {
        Self {
            clock,
            limits: Limits::default(),
            accounts: FixedMap::default(),
            awaited: FixedMap::default(),
        }
    }

    /// Heartbeats are admitted at most at `limits`' rate per session
    /// ([`Dicts::admit`]).
    pub fn limiting(self, limits: Limits) -> Self {
        Self { limits, ..self }
    }

    pub fn clock(&self) -> IntervalClock {
        self.clock
    }

    pub fn get_mut(&mut self, account: &AccountId, interval: u64) -> Option<&mut Dict> {
        self.accounts.get_mut(account)?.dicts.get_mut(&interval)
    }

    /// `account`'s dictionary of `interval`, made empty if there is none.
    pub fn entry(&mut self, account: &AccountId, interval: u64) -> &mut Dict {
        self.accounts
            .entry(account.clone())
            .or_default()
            .dicts
            .entry_or_default(interval)
    }

    /// Installs a copy of `account`'s dictionary of `interval` read from
    /// KV (the watch), queues the removals that waited for a copy holding
    /// their session, and trims what it allows: what to flush for them.
    /// Removals first: a trim hides from the copy the sessions that moved
    /// on, which a removal waiting here must still find.
    pub fn install(
        &mut self,
        account: &AccountId,
        interval: u64,
        revision: u64,
        entries: impl Into<Entries>,
        now: UnixMillis,
    ) -> Decision {
        self.entry(account, interval).install(revision, entries);
        let decision = self.settle(account, interval);
        self.trim(account, now);
        decision
    }

    /// [`Dict::on_conflict`] for `account`'s dictionary of `interval`; the
    /// copy it installs may hold a session whose removal waited for it.
    pub fn on_conflict(
        &mut self,
        account: &AccountId,
        interval: u64,
        write: Write,
        current: Option<(u64, SessionDict)>,
    ) {
        self.entry(account, interval).on_conflict(write, current);
        // The flusher writes this dictionary again anyway, and takes what
        // this queues along.
        let _ = self.settle(account, interval);
    }

    /// [`Dict::on_reread`] for `account`'s dictionary of `interval`, as
    /// [`Dicts::on_conflict`].
    pub fn on_reread(
        &mut self,
        account: &AccountId,
        interval: u64,
        current: Option<(u64, SessionDict)>,
    ) {
        self.entry(account, interval).on_reread(current);
        // As after a conflict, the flusher writes this dictionary next.
        let _ = self.settle(account, interval);
    }

    /// Queues the awaited removals whose session `account`'s dictionary of
    /// `interval` now holds, and says when to flush. A removal keeps
    /// waiting while a change of that device is pending or a write of the
    /// dictionary is under way (it is looked at again with the write's
    /// outcome or the next copy), and after it was queued, so that a copy
    /// of another interval that also shows the session gets rid of it too
    /// (announcing the leave if it lands first).
    fn settle(&mut self, account: &AccountId, interval: u64) -> Decision {
        let Some(awaited) = self.awaited.get_mut(account).filter(|w| !w.is_empty()) else {
            return Decision::Unchanged;
        };
        let Some(dict) = self
            .accounts
            .get_mut(account)
            .and_then(|a| a.dicts.get_mut(&interval))
        else {
            return Decision::Unchanged;
        };
        // The write under way may carry this removal itself (`flying`
        // shows only its upserts); it is looked at again when that write
        // ends.
        if dict.in_flight {
            return Decision::Unchanged;
        }
        let mut schedules = Vec::new();
        for (session, w) in awaited.iter_mut() {
            let holds = dict
                .entries
                .get(&w.device)
                .is_some_and(|r| &r.session == session && r.last_seen <= w.heard_by);
            if !holds {
                continue;
            }
            // A pending change that leaves the copy as it is (the late
            // heartbeat of the session this record displaced: `apply`) is
            // done already: it does not hold the removal up.
            if dict.pending().get(&w.device).is_some_and(|c| {
                !matches!(c, Change::Carry(..)) && c.announces().is_none() && {
                    let mut one: SessionDict = dict
                        .entries
                        .get_key_value(&w.device)
                        .map(|(d, r)| (d.clone(), r.clone()))
                        .into_iter()
                        .collect();
                    apply(&mut one, &w.device, c) == Applied::Nothing
                }
            }) {
                dict.work().pending.remove(&w.device);
            }
            if dict.pending().contains_key(&w.device) {
                continue;
            }
            // A leave not told yet: this removal announces it if it lands
            // first ([`Dicts::take_announcements`]).
            let (change, defer) = if w.announce {
                (Change::Remove(session.clone(), w.heard_by), false)
            } else {
                (Change::Forget(session.clone(), w.heard_by), true)
            };
            schedules.push(dict.queue(w.device.clone(), change, defer));
        }
        let key = || vec![(account.clone(), interval)];
        if schedules.contains(&Schedule::Now) {
            Decision::Queued(key())
        } else if schedules.contains(&Schedule::Later) {
            Decision::Deferred(key())
        } else {
            Decision::Unchanged
        }
    }

    /// Every dictionary with changes not written yet.
    pub fn pending_keys(&self) -> Vec<(AccountId, u64)> {
        self.accounts
            .iter()
            .flat_map(|(a, acct)| {
                acct.dicts
                    .iter()
                    .filter(|(_, d)| d.waiting())
                    .map(move |(i, _)| (a.clone(), i))
            })
            .collect()
    }

    /// Whether any change has not reached KV yet. Removals still waiting
    /// for their session to show up are not changes yet.
    pub fn has_pending(&self) -> bool {
        self.accounts
            .values()
            .flat_map(|a| a.dicts.values())
            .any(|d| d.in_flight || d.waiting())
    }

    /// Sessions held in the live dictionaries (a device counted once, by its
    /// newest interval), so that the count does not dip at an interval
    /// boundary before each session's next heartbeat moves it along.
    pub fn session_count(&self, now: UnixMillis) -> usize {
        let [prev, cur] = self.clock.live_intervals(now);
        self.accounts
            .values()
            .map(|a| {
                let d = &a.dicts;
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

    /// Whether `session` of `device` is recorded in `account`'s dictionary
    /// of the interval before `interval`, or is about to be (a change
    /// pending, or the write under way): then its arrival in `interval` is
    /// a carry-over, and if it is a join at all, that earlier dictionary's
    /// write announces it. Only the earlier interval counts: a write landing
    /// late, after the next interval has begun, is still a join when it is
    /// one.
    pub fn recorded_before(
        &self,
        account: &AccountId,
        device: &DeviceId,
        session: &SessionId,
        interval: u64,
    ) -> bool {
        let Some(dicts) = self.accounts.get(account).map(|a| &a.dicts) else {
            return false;
        };
        let Some(d) = dicts.get(&interval.wrapping_sub(1)) else {
            return false;
        };
        let holds = |r: &SessionRecord| &r.session == session;
        let before = dicts.get(&interval.wrapping_sub(2)).map(|p| &p.entries);
        d.entries.get(device).is_some_and(holds)
            || d.flying().get(device).is_some_and(holds)
            || d.pending()
                .get(device)
                .and_then(|c| carried(c, before, device))
                .is_some_and(|c| matches!(c, Change::Upsert(r) if holds(&r)))
    }

    /// Drops dictionaries no reader consults any more, keeping those with a
    /// write still pending (and the one before them, which tells whether
    /// what they add is a carry-over), and removals that waited for an
    /// interval no longer live. The dictionary just before the live ones
    /// is kept for one interval more: a leave whose session no live
    /// dictionary holds removes it there, and announces it
    /// ([`Dicts::remove`]). It was trimmed of every session that moved
    /// on, so it holds the few that did not.
    pub fn prune(&mut self, now: UnixMillis) {
        let [prev, _] = self.clock.live_intervals(now);
        let limits = &self.limits;
        self.accounts.retain(|_, acct| {
            let dicts = &mut acct.dicts;
            // Most accounts, on most passes (every second), hold only live
            // dictionaries and the one before, already cleared: nothing to
            // do, and nothing to allocate.
            if !dicts.is_empty()
                && dicts.iter().all(|(i, d)| {
                    i >= prev || (i.saturating_add(1) == prev && d.trimmed.is_empty())
                })
            {
                return true;
            }
            let writing = |d: &Dict| d.in_flight || d.waiting();
            let keep: Vec<u64> = dicts
                .iter()
                .filter(|(i, d)| {
                    i.saturating_add(1) >= prev
                        || writing(d)
                        || dicts.get(&(i + 1)).is_some_and(writing)
                })
                .map(|(i, _)| i)
                .collect();
            dicts.retain(|i, d| {
                // Only a live dictionary's trimmed sessions are looked up
                // ([`Dicts::remove`]); an older copy stays partial, so it is
                // still read whole before it is written.
                if i < prev {
                    d.trimmed = Box::default();
                }
                keep.contains(&i)
            });
            // Once an interval, as its dictionaries age: the buckets of
            // sessions gone quiet go too, and an account holding nothing
            // else with them.
            acct.beats.prune(limits, now);
            !acct.dicts.is_empty() || !acct.beats.is_empty()
        });
        // A leave's removal announces it only if it lands first
        // ([`Dicts::take_announcements`]): what it waited for is kept while
        // one may still land.
        let accounts = &self.accounts;
        self.awaited.retain(|account, awaited| {
            let dicts = accounts.get(account).map(|a| &a.dicts);
            awaited.retain(|session, w| {
                w.until >= prev
                    || dicts
                        .is_some_and(|dicts| dicts.values().any(|d| d.removing(&w.device, session)))
            });
            !awaited.is_empty()
        });
    }

    /// [`Dict::take_for_write`] for `account`'s dictionary of `interval`,
    /// carry-overs copied from the previous interval's. A take that finds
    /// nothing to write trims, and lets waiting removals through, like a
    /// write that landed.
    ///
    /// Whether an added session is recorded in the interval before (a
    /// carry-over, not a join: [`Dicts::recorded_before`]) is decided here,
    /// while that interval still holds it: a leave may remove it there
    /// before this write lands.
    pub fn take_for_write(&mut self, account: &AccountId, interval: u64, now: UnixMillis) -> Take {
        let Some(dicts) = self.accounts.get_mut(account).map(|a| &mut a.dicts) else {
            return Take::Idle;
        };
        // Lifted out for a moment so that the previous dictionary can be
        // read beside it.
        let Some(mut dict) = dicts.remove(&interval) else {
            return Take::Idle;
        };
        // No reader consults a dictionary older than the live ones, and its
        // key may have expired: adding to it would bring it back, and
        // announce joins nobody sees. Only its removals are still written
        // (a leave they carry is announced).
        if interval < self.clock.live_intervals(now)[0] && !dict.in_flight {
            if let Some(work) = dict.work.as_deref_mut() {
                work.pending.retain(|_, change| change.removes());
            }
            dict.tidy();
        }
        let prev = dicts.get(&interval.wrapping_sub(1)).map(|p| &p.entries);
        let mut take = dict.take_for_write(prev);
        dicts.insert(interval, dict);
        match &mut take {
            Take::Unchanged { applied, more, .. } => {
                // A withdrawal announces as a removal that landed.
                self.take_announcements(account, applied);
                // A removal waits while a change of its device is pending;
                // that change is done now, as after a write that landed.
                *more = self.settle(account, interval) != Decision::Unchanged;
                self.trim(account, now);
            }
            Take::Write(write) => {
                for (device, what, elsewhere) in &mut write.applied {
                    if let Applied::Added { record, .. } = what {
                        *elsewhere =
                            self.recorded_before(account, device, &record.session, interval);
                    }
                }
            }
            Take::Idle | Take::Reread => {}
        }
        take
    }

    /// [`Dict::on_written`] for `account`'s dictionary of `interval`, then
    /// the removals its new copy lets through and the trim it allows (in
    /// that order, as in [`Dicts::install`]).
    pub fn on_written(
        &mut self,
        account: &AccountId,
        interval: u64,
        write: Write,
        revision: u64,
        now: UnixMillis,
    ) -> Written {
        let mut written = self.entry(account, interval).on_written(write, revision);
        self.take_announcements(account, &mut written.applied);
        if self.settle(account, interval) != Decision::Unchanged {
            written.more = true;
        }
        self.trim(account, now);
        written
    }

    /// The leaves that a write's removals (or withdrawals) announce: a
    /// leave is removed from several dictionaries ([`Dicts::remove`], and
    /// [`Dicts::settle`] for the copies that show its session later), and
    /// only the first of those removals to land tells, the others are
    /// quiet. Not the one chosen when the leave was handled: that may be a
    /// write of an older dictionary that lands late, after the removal
    /// from a newer one took the session out of sight, and after the
    /// session, heard again, joined anew.
    fn take_announcements(
        &mut self,
        account: &AccountId,
        applied: &mut Vec<(DeviceId, Applied, bool)>,
    ) {
        let Some(awaited) = self.awaited.get_mut(account) else {
            return;
        };
        applied.retain(|(_, what, _)| {
            let (Applied::Removed(r) | Applied::Withdrawn(r)) = what else {
                return true;
            };
            awaited
                .get_mut(&r.session)
                .is_none_or(|w| std::mem::take(&mut w.announce))
        });
    }

    /// Trims `account`'s previous-interval dictionary: a session that has
    /// moved on to the current interval is forgotten there, so that a live
    /// session is held once, not twice. A trimmed dictionary is re-read from
    /// KV before it is written again. Called when the current dictionary
    /// changed, so it costs one pass over one account per write.
    pub fn trim(&mut self, account: &AccountId, now: UnixMillis) {
        let [prev, cur] = self.clock.live_intervals(now);
        if prev != cur
            && let Some(acct) = self.accounts.get_mut(account)
        {
            trim(&mut acct.dicts, prev, cur);
        }
    }

    /// Whether one more heartbeat of `session` of `account` is within its
    /// rate ([`crate::rate`]). Borrowed names: the account is copied only
    /// the first time it is heard.
    pub fn admit(&mut self, account: &str, session: &str, now: UnixMillis) -> bool {
        let limits = &self.limits;
        if let Some(acct) = self.accounts.get_mut(account) {
            return acct.beats.allow(limits, session, now);
        }
        let Ok(account) = AccountId::parse(account) else {
            return false;
        };
        let acct = self.accounts.entry(account).or_default();
        acct.beats.allow(limits, session, now)
    }

    /// The fast path: whether a heartbeat changes nothing (its session is
    /// recorded for the current interval with the same fields and nothing is
    /// pending or under way for the device). Borrowed names, no allocation. When false,
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
        let Some(dict) = self.accounts.get(account).and_then(|a| a.dicts.get(&cur)) else {
            return false;
        };
        // A write under way may record other fields (an earlier
        // heartbeat's) and land after: [`Dicts::on_heartbeat`] looks.
        if dict.pending().contains_key(device) || dict.flying().contains_key(device) {
            return false;
        }
        dict.entries.get(device).is_some_and(|r| {
            r.session.as_str() == session && r.labels.matches(hb.content, hb.kind, hb.region)
        })
    }

    /// Decides what a valid heartbeat changes. Only the current interval's
    /// dictionary is written for a live session; a leave removes the
    /// session from every live dictionary that holds it ([`Dicts::remove`]).
    pub fn on_heartbeat(
        &mut self,
        account: &AccountId,
        device: &DeviceId,
        session: &SessionId,
        hb: &Heartbeat,
        now: UnixMillis,
    ) -> Decision {
        let [prev, cur] = self.clock.live_intervals(now);
        let dicts = &mut self.accounts.entry(account.clone()).or_default().dicts;
        // A write of an older session of the device, queued here before
        // the copy showed this one, does not take this session's entry:
        // this heartbeat's change takes its place ([`Dict::overtaken`]).
        let mut taken_over = Vec::new();
        if !hb.leave {
            for i in if prev == cur {
                vec![cur]
            } else {
                vec![prev, cur]
            } {
                let before = dicts.get(&i.wrapping_sub(1)).map(|p| &p.entries);
                let Some(rec) = dicts
                    .get(&i)
                    .and_then(|d| d.overtaken(device, session, before))
                else {
                    continue;
                };
                let change = Change::Upsert(Box::new(rec));
                if dicts
                    .entry_or_default(i)
                    .queue(device.clone(), change, false)
                    == Schedule::Now
                {
                    taken_over.push((account.clone(), i));
                }
            }
        }
        let decision = self.on_heartbeat_after(account, device, session, hb, now);
        if taken_over.is_empty() {
            return decision;
        }
        match decision {
            Decision::Queued(keys) | Decision::Deferred(keys) => {
                for key in keys {
                    if !taken_over.contains(&key) {
                        taken_over.push(key);
                    }
                }
            }
            _ => {}
        }
        Decision::Queued(taken_over)
    }

    /// [`Dicts::on_heartbeat`] once an older session's change no longer
    /// stands in the way of this one.
    fn on_heartbeat_after(
        &mut self,
        account: &AccountId,
        device: &DeviceId,
        session: &SessionId,
        hb: &Heartbeat,
        now: UnixMillis,
    ) -> Decision {
        let [prev, cur] = self.clock.live_intervals(now);
        let dicts = &mut self.accounts.entry(account.clone()).or_default().dicts;
        let prev_d = dicts.get(&prev).filter(|_| prev != cur);
        let prev_rec = prev_d.and_then(|d| d.effective(device, None));
        let cur_rec = dicts.get(&cur).and_then(|d| d.effective(device, prev_d));

        let superseded = |cur: Option<&SessionRecord>, prev: Option<&SessionRecord>| {
            let named = |r: Option<&SessionRecord>| {
                r.is_some_and(|r| r.replaced.as_deref() == Some(session))
            };
            named(cur) || (cur.is_none() && named(prev))
        };
        if hb.leave {
            // A leave is dropped only when a newer session's displacement
            // of it has landed (and announced its end). One still to be
            // written here may never land (displaced in turn, withdrawn):
            // the leave's removal goes before it.
            let landed_cur = dicts.get(&cur).and_then(|d| d.entries.get(device));
            let landed_prev = prev_d.and_then(|d| d.entries.get(device));
            if superseded(landed_cur, landed_prev) {
                return Decision::Superseded;
            }
            return self.remove(account, device, session, true, now);
        }
        if superseded(cur_rec.as_ref(), prev_rec.as_ref()) {
            return Decision::Superseded;
        }
        // Heard again after a leave that is waiting for its session to show
        // up here: it joins again, and that removal is void. While a
        // removal of the leave may still land, what it waited for stays,
        // voided (no record is heard by 0), for whether that removal
        // announces the leave ([`Dicts::take_announcements`]).
        if let Some(awaited) = self.awaited.get_mut(account)
            && let Some(w) = awaited.remove(session)
        {
            let removing = self
                .accounts
                .get(account)
                .is_some_and(|a| a.dicts.values().any(|d| d.removing(&w.device, session)));
            if removing {
                awaited.insert(session.clone(), Awaited { heard_by: 0, ..w });
            }
        }
        let dicts = &mut self.accounts.entry(account.clone()).or_default().dicts;

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
            // newest heartbeat's time, so that it does not land stale, and
            // so its labels: the copy may show newer ones than it holds
            // (another handler's write of a change), which with that time
            // it would otherwise undo.
            if let Some(Change::Upsert(rec)) = dicts
                .get_mut(&cur)
                .and_then(|d| d.work.as_deref_mut())
                .and_then(|w| w.pending.get_mut(device))
                && &rec.session == session
            {
                rec.last_seen = rec.last_seen.max(now);
                if !same_fields(rec) {
                    rec.labels = Labels::new(
                        hb.content.as_deref(),
                        hb.kind.as_deref(),
                        hb.region.as_deref(),
                    );
                }
            }
            // A write under way that records other fields of the session
            // (an earlier heartbeat's) would land after this one: what this
            // one says is written after it.
            let stale = dicts
                .get(&cur)
                .filter(|d| !d.pending().contains_key(device))
                .and_then(|d| d.flying().get(device))
                .is_some_and(|f| &f.session == session && !same_fields(f));
            if !stale {
                return Decision::Unchanged;
            }
        }
        // A device new to the account's live dictionaries takes a place in
        // them, and past their room it is refused: no limit allows that many
        // sessions, so it would be ended anyway.
        let (cur_d, prev_d) = (dicts.get(&cur), dicts.get(&prev).filter(|_| prev != cur));
        let known = |d: Option<&Dict>| d.is_some_and(|d| d.counts(device));
        if cur_rec.is_none()
            && prev_rec.is_none()
            && !known(cur_d)
            && !known(prev_d)
            && !has_room(cur_d, prev_d)
        {
            return Decision::Full;
        }
        // Carry the session's start, and which session it displaced, over
        // from whichever live interval knows it. A new session displaces the
        // device's session of the current interval (handled by `apply`) or,
        // when the current interval's copy has none yet, that of the
        // previous one: also when a write of that session into the current
        // interval (its move) is pending or under way, which this change
        // takes the place of, or lands before (then `apply` names it all
        // the same). The write announces that session's end.
        let carried = [&cur_rec, &prev_rec]
            .into_iter()
            .flatten()
            .find(|r| &r.session == session);
        let landed_cur = dicts.get(&cur).and_then(|d| d.entries.get(device));
        let (since, replaced) = match carried {
            Some(r) => (r.since, r.replaced.clone()),
            None => (
                now,
                match (landed_cur, &prev_rec) {
                    (None, Some(prev)) => Some(Box::new(prev.session.clone())),
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
        // record is all it needs. A carry-over copies that record when the
        // write is taken, from the copy: while a change of it is still
        // pending or under way there (its first write, new labels), the
        // record this heartbeat matched is copied now instead; and so it is
        // while this interval's write under way records the session
        // already (with older labels, maybe: once it lands, the previous
        // interval's copy is trimmed of the session, and a carry-over
        // would find nothing to copy). So it is, too, while any write of
        // the previous interval is under way, or the session's removal is
        // owed there: that write may carry the removal of an earlier leave
        // of this session (heard again since, it stays), and a carry-over
        // taken after it landed would find nothing to copy.
        let defer = cur_rec.is_none() && carried.is_some_and(same_fields);
        let writing = |d: &Dict| {
            d.flying()
                .get(device)
                .is_some_and(|r| &r.session == session)
        };
        let landed = !dicts.get(&cur).is_some_and(writing)
            && dicts.get(&prev).filter(|_| prev != cur).is_some_and(|d| {
                d.entries.get(device).is_some_and(|r| &r.session == session)
                    && !d.pending().contains_key(device)
                    && !d.removing(device, session)
            });
        let change = if defer && landed {
            Change::Carry(session.clone(), now, record.labels.clone())
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

    /// `session` of `device` was ended by someone else (evicted, refused,
    /// kicked, replaced) at `at`: it leaves every live dictionary of
    /// `account`, quietly (its ending was announced by whoever ended it),
    /// so that dictionaries hold live sessions only. Nobody waits for that
    /// write: it is deferred like a carry-over, and rides along with the
    /// account's next one. An ending older than the live intervals has
    /// nothing left to remove.
    pub fn ended(
        &mut self,
        account: &AccountId,
        device: &DeviceId,
        session: &SessionId,
        at: UnixMillis,
        now: UnixMillis,
    ) -> Decision {
        let [prev, _] = self.clock.live_intervals(now);
        if self.clock.interval_of(at) < prev {
            return Decision::Unchanged;
        }
        self.remove(account, device, session, false, now)
    }

    /// Queues the removal of `session` of `device` from every live
    /// dictionary of `account` that holds it, in its copy or in a write
    /// that has not landed; a leave (`announce`) is announced by one of
    /// them only, whichever lands first (a withdrawal where the session's
    /// add has not landed), the others being quiet. A session no
    /// dictionary holds waits for a copy that does ([`Dicts::install`]).
    fn remove(
        &mut self,
        account: &AccountId,
        device: &DeviceId,
        session: &SessionId,
        announce: bool,
        now: UnixMillis,
    ) -> Decision {
        let [prev, cur] = self.clock.live_intervals(now);
        let intervals: &[u64] = if prev == cur { &[cur] } else { &[prev, cur] };
        let dicts = &mut self.accounts.entry(account.clone()).or_default().dicts;
        let held: Vec<(u64, Held)> = intervals
            .iter()
            .map(|&i| {
                let before = dicts.get(&i.wrapping_sub(1)).map(|p| &p.entries);
                let held = dicts
                    .get(&i)
                    .map_or(Held::No, |d| d.held(device, session, before));
                (i, held)
            })
            .collect();
        let unheld = held.iter().all(|(_, h)| *h == Held::No);
        // A trimmed copy may still hold the session in KV, where it was
        // trimmed from the copy (it had moved on, and may have been
        // displaced there since, or be about to be): remove it there too,
        // quietly (a leave is announced where the session is seen, or by
        // its displacement).
        let key = trimmed_key(session);
        let trimmed = |i: u64| {
            dicts
                .get(&i)
                .is_some_and(|d| d.partial && d.trimmed.binary_search(&key).is_ok())
        };
        let by = if announce {
            now.saturating_add(LEAVE_REORDER_MS)
        } else {
            UnixMillis::MAX
        };
        // Every removal of a leave may announce it; the first to land
        // does, the others are quiet ([`Dicts::take_announcements`]): any
        // of them may be the only one to land (the key of another expires
        // first, or a newer session's write takes its place).
        let mut changes = Vec::new();
        for (interval, h) in held {
            let change = match h {
                Held::No if trimmed(interval) => Change::Forget(session.clone(), by),
                Held::No => continue,
                Held::Landed if announce => Change::Remove(session.clone(), by),
                Held::Writing(rec) if announce => Change::Withdraw(Box::new(rec), by),
                Held::Landed | Held::Writing(_) => Change::Forget(session.clone(), by),
            };
            changes.push((interval, change));
        }
        // No live dictionary holds the session, not even in a write still
        // under way: its last record is older (its move into the previous
        // interval has not landed, or it had gone silent). That record is
        // removed from the dictionary before the live ones, as long as this
        // copy holds it there (see [`Dicts::prune`]; a write of that
        // dictionary carries removals only), and announces the leave when
        // it lands, unless a copy of a live dictionary has shown the
        // session first: its removal there announces it then (the move
        // landed after all). Whichever comes first announces; the other is
        // quiet ([`Dicts::take_announcements`]).
        let older = (announce && unheld && prev != cur)
            .then(|| prev.wrapping_sub(1))
            .filter(|o| {
                dicts
                    .get(o)
                    .and_then(|d| d.entries.get(device))
                    .is_some_and(|r| r.session == *session && r.last_seen <= by)
            });
        if let Some(o) = older {
            changes.push((o, Change::Remove(session.clone(), by)));
        }
        // The removal also waits for the session to show up where this
        // handler does not see it yet: another handler's write of it into
        // another live interval may still be under way, or not watched yet.
        // A leave is told by whichever of its removals lands first
        // ([`Dicts::take_announcements`]); an ending is told already, but
        // for a leave before it not told yet.
        let awaited = self.awaited.entry(account.clone()).or_default();
        let untold = awaited.get(session).is_some_and(|w| w.announce);
        awaited.insert(
            session.clone(),
            Awaited {
                device: device.clone(),
                announce: announce || untold,
                heard_by: by,
                until: cur,
            },
        );
        if changes.is_empty() {
            return Decision::Unchanged;
        }
        // A leave is waited for by the device and its observers; an ending
        // is announced already, and its removal rides along.
        let defer = !announce;
        let mut now_keys = Vec::new();
        let mut later_keys = Vec::new();
        for (interval, change) in changes {
            let dict = dicts.entry_or_default(interval);
            match dict.queue_removal(device.clone(), change, defer) {
                Schedule::Now => now_keys.push((account.clone(), interval)),
                Schedule::Later => later_keys.push((account.clone(), interval)),
                Schedule::Already => {}
            }
        }
        if !now_keys.is_empty() {
            Decision::Queued(now_keys)
        } else if !later_keys.is_empty() {
            Decision::Deferred(later_keys)
        } else {
            Decision::Unchanged
        }
    }
}

/// Whether the live dictionaries `cur` and `prev` of an account have room
/// for one more device: together they count fewer than
/// [`DICT_MAX_SESSIONS`] ([`Dict::counts`]), so that neither can outgrow
/// it, whatever of the previous interval is carried over.
fn has_room(cur: Option<&Dict>, prev: Option<&Dict>) -> bool {
    let bound = cur.map_or(0, Dict::count_bound) + prev.map_or(0, Dict::count_bound);
    if bound < DICT_MAX_SESSIONS {
        return true;
    }
    let distinct = |d: &Dict| {
        let pending = d.pending().keys().filter(|k| !d.entries.contains_key(*k));
        let flying = d
            .flying()
            .keys()
            .filter(|k| !d.entries.contains_key(*k) && !d.pending().contains_key(*k));
        d.entries.len() + pending.count() + flying.count()
    };
    let in_cur = cur.map_or(0, distinct);
    let only_prev = prev.map_or(0, |p| {
        let mut n = 0;
        let mut seen = |k: &DeviceId| {
            if !cur.is_some_and(|c| c.counts(k)) {
                n += 1;
            }
        };
        p.entries.keys().for_each(&mut seen);
        p.pending()
            .keys()
            .filter(|k| !p.entries.contains_key(*k))
            .for_each(&mut seen);
        p.flying()
            .keys()
            .filter(|k| !p.entries.contains_key(*k) && !p.pending().contains_key(*k))
            .for_each(&mut seen);
        n
    });
    in_cur + only_prev < DICT_MAX_SESSIONS
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

    /// The sessions bucket in memory: one revision sequence for the whole
    /// bucket, as a KV stream has, and compare-and-set writes.
    #[derive(Default)]
    struct Kv {
        seq: u64,
        dicts: HashMap<(AccountId, u64), (u64, SessionDict)>,
    }

    impl Kv {
        /// The dictionary with its revision (0 and empty when there is none).
        fn read(&self, account: &AccountId, interval: u64) -> (u64, SessionDict) {
            self.dicts
                .get(&(account.clone(), interval))
                .cloned()
                .unwrap_or_default()
        }

        /// Writes `write` if the key is still at its revision: the new
        /// revision, or None on a conflict.
        fn update(&mut self, account: &AccountId, interval: u64, write: &Write) -> Option<u64> {
            let (revision, _) = self.read(account, interval);
            (revision == write.revision())
                .then(|| self.put(account, interval, write.value().clone()))
        }

        /// Writes unconditionally (another handler's write that landed).
        fn put(&mut self, account: &AccountId, interval: u64, value: SessionDict) -> u64 {
            self.seq += 1;
            self.dicts
                .insert((account.clone(), interval), (self.seq, value));
            self.seq
        }
    }

    /// Writes everything pending as a lone handler would, every write
    /// landing in `kv`.
    /// Returns what the writes announce.
    fn flush(d: &mut Dicts, kv: &mut Kv, now: UnixMillis) -> Vec<(DeviceId, Applied, bool)> {
        let mut applied = Vec::new();
        for _ in 0..10 {
            let keys = d.pending_keys();
            if keys.is_empty() {
                return applied;
            }
            for (a, i) in keys {
                match d.take_for_write(&a, i, now) {
                    Take::Idle => {}
                    Take::Unchanged { applied: now, .. } => applied.extend(now),
                    Take::Reread => d.on_reread(&a, i, Some(kv.read(&a, i))),
                    Take::Write(w) => {
                        let rev = kv.update(&a, i, &w).expect("a lone handler's write lands");
                        applied.extend(d.on_written(&a, i, w, rev, now).applied);
                    }
                }
            }
        }
        panic!("changes still pending after ten rounds of writes");
    }

    /// A handler on its own, whose every write lands, and the KV it
    /// writes to.
    fn lone() -> (Dicts, Kv) {
        (Dicts::new(clock()), Kv::default())
    }

    /// A heartbeat of `session` of `device` (on the account of [`ids`]) at
    /// `at`, and every write it makes due, landed.
    fn beat(d: &mut Dicts, kv: &mut Kv, device: &DeviceId, session: &SessionId, at: UnixMillis) {
        d.on_heartbeat(&ids().0, device, session, &Heartbeat::default(), at);
        flush(d, kv, at);
    }

    /// [`lone`] once the session of [`ids`] has heartbeated at each of
    /// `times`, what each heartbeat changed written before the next.
    fn lived(times: &[UnixMillis]) -> (Dicts, Kv) {
        let (_, dev, s) = ids();
        let (mut d, mut kv) = lone();
        for &t in times {
            beat(&mut d, &mut kv, &dev, &s, t);
        }
        (d, kv)
    }

    /// [`lone`] once the session of [`ids`] has joined at `at` with `hb`,
    /// and the write of that join, taken but not landed yet.
    fn joining(hb: &Heartbeat, at: UnixMillis) -> (Dicts, Kv, Write) {
        let (a, dev, s) = ids();
        let (mut d, kv) = lone();
        d.on_heartbeat(&a, &dev, &s, hb, at);
        let w = write_of(d.take_for_write(&a, 0, at));
        (d, kv, w)
    }

    fn device(name: &str) -> DeviceId {
        DeviceId::parse(name).unwrap()
    }

    fn session(name: &str) -> SessionId {
        SessionId::parse(name).unwrap()
    }

    fn leave() -> Heartbeat {
        Heartbeat {
            leave: true,
            ..Default::default()
        }
    }

    fn content(c: &str) -> Heartbeat {
        Heartbeat {
            content: Some(c.into()),
            ..Default::default()
        }
    }

    fn write_of(take: Take) -> Write {
        match take {
            Take::Write(w) => w,
            other => panic!("expected a write, got {other:?}"),
        }
    }

    /// Device and session names a dictionary holds, sorted.
    fn held(dict: &SessionDict) -> Vec<(String, String)> {
        let mut v: Vec<_> = dict
            .iter()
            .map(|(d, r)| (d.as_str().to_owned(), r.session.as_str().to_owned()))
            .collect();
        v.sort();
        v
    }

    fn pair(device: &str, session: &str) -> (String, String) {
        (device.to_owned(), session.to_owned())
    }

    /// A plain record of `session`, heard first and last at `at`.
    fn record(session: &str, at: UnixMillis) -> SessionRecord {
        SessionRecord {
            session: SessionId::parse(session).unwrap(),
            since: at,
            last_seen: at,
            labels: Labels::default(),
            replaced: None,
        }
    }

    /// The sessions whose join, and whose leave, a handler announces for
    /// these outcomes of its writes.
    fn events(applied: &[(DeviceId, Applied, bool)]) -> (Vec<String>, Vec<String>) {
        let (mut joins, mut leaves) = (Vec::new(), Vec::new());
        for (_, what, elsewhere) in applied {
            match what {
                Applied::Added { record, .. } if !elsewhere => {
                    joins.push(record.session.to_string())
                }
                Applied::Removed(r) | Applied::Withdrawn(r) => leaves.push(r.session.to_string()),
                _ => {}
            }
        }
        (joins, leaves)
    }

    #[test]
    fn a_moved_session_is_held_once_and_its_leave_reaches_both_intervals() {
        let (a, dev, s) = ids();
        // Next interval: the session moves on; the old copy is trimmed.
        let (mut d, _) = lived(&[1_000, 10_500]);
        d.trim(&a, 10_600);
        let old = d.get_mut(&a, 0).expect("previous dictionary");
        assert!(old.partial && old.entries.is_empty());
        assert_eq!(d.session_count(10_600), 1);
        // Leaving removes it from the current dictionary and, quietly, from
        // the trimmed one (whose KV copy still holds it).
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s, &leave(), 10_700),
            Decision::Queued(vec![(a.clone(), 0), (a.clone(), 1)])
        );
        let old = d.get_mut(&a, 0).expect("previous dictionary");
        let by = 10_700 + LEAVE_REORDER_MS;
        assert_eq!(
            old.pending().get(&dev),
            Some(&Change::Forget(s.clone(), by))
        );
        let new = d.get_mut(&a, 1).expect("current dictionary");
        assert_eq!(
            new.pending().get(&dev),
            Some(&Change::Remove(s.clone(), by))
        );
    }

    #[test]
    fn one_write_per_session_per_interval() {
        let (a, dev, s) = ids();
        let (mut d, mut kv) = lone();
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
        flush(&mut d, &mut kv, 2_000);
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
        flush(&mut d, &mut kv, 10_500);
        assert_eq!(
            d.on_heartbeat(&a, &tv2, &s2, &hb, 10_600),
            Decision::Queued(vec![(a.clone(), 1)]),
            "a join is written at once"
        );
        flush(&mut d, &mut kv, 10_600);
        let rec = &d.get_mut(&a, 1).unwrap().entries[&dev];
        assert_eq!(rec.since, 1_000);
    }

    #[test]
    fn a_carried_session_is_flagged_as_known_and_a_new_one_is_not() {
        let (a, dev, s) = ids();
        let (mut d, mut kv) = lived(&[9_000]);
        // Next interval: s is carried and s2, a new device's, joins, in one
        // write.
        let (tv2, s2) = (device("tv2"), session("s2"));
        d.on_heartbeat(&a, &dev, &s, &Heartbeat::default(), 10_500);
        d.on_heartbeat(&a, &tv2, &s2, &Heartbeat::default(), 10_500);
        let w = write_of(d.take_for_write(&a, 1, 10_500));
        let rev = kv.update(&a, 1, &w).expect("lands");
        let written = d.on_written(&a, 1, w, rev, 10_500);
        let mut flags: Vec<(String, bool)> = written
            .applied
            .iter()
            .filter(|(_, applied, _)| matches!(applied, Applied::Added { .. }))
            .map(|(device, _, elsewhere)| (device.as_str().to_owned(), *elsewhere))
            .collect();
        flags.sort();
        // Only s2 is news: s was in the previous interval (which the write
        // then trimmed of it).
        assert_eq!(flags, [("tv".to_owned(), true), ("tv2".to_owned(), false)]);
        assert!(d.get_mut(&a, 0).expect("previous").partial);
    }

    #[test]
    fn leave_clears_every_live_interval() {
        let (a, dev, s) = ids();
        let (mut d, mut kv) = lived(&[9_000, 10_001]);
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s, &leave(), 10_002),
            Decision::Queued(vec![(a.clone(), 0), (a.clone(), 1)])
        );
        flush(&mut d, &mut kv, 10_002);
        assert!(d.get_mut(&a, 0).unwrap().entries.is_empty());
        assert!(d.get_mut(&a, 1).unwrap().entries.is_empty());
    }

    #[test]
    fn new_session_replaces_and_old_one_is_superseded() {
        let (a, dev, s1) = ids();
        let s2 = session("s2");
        let (mut d, mut kv) = lived(&[1_000]);
        beat(&mut d, &mut kv, &dev, &s2, 2_000);
        let rec = d.get_mut(&a, 0).unwrap().entries[&dev].clone();
        assert_eq!(rec.session, s2);
        assert_eq!(rec.replaced, Some(Box::new(s1.clone())));
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s1, &Heartbeat::default(), 3_000),
            Decision::Superseded
        );
    }

    #[test]
    fn replacement_across_an_interval_boundary_is_recorded_and_sticks() {
        let (a, dev, s1) = ids();
        let s2 = session("s2");
        // s1 lives in interval 0 only; s2 starts in interval 1.
        let (mut d, mut kv) = lived(&[9_000]);
        d.on_heartbeat(&a, &dev, &s2, &Heartbeat::default(), 10_500);
        let cur = d.get_mut(&a, 1).unwrap();
        let (device, change) = cur.pending().iter().next().unwrap();
        let mut entries = cur.entries.to_map();
        let applied = apply(&mut entries, device, change);
        // The write reports s1 as displaced, so it gets revoked.
        assert!(
            matches!(&applied, Applied::Added { replaced: Some(old), .. } if *old == s1),
            "{applied:?}"
        );
        flush(&mut d, &mut kv, 10_500);
        // A late s1 heartbeat cannot take the seat back...
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s1, &Heartbeat::default(), 11_000),
            Decision::Superseded
        );
        // ...nor later, once s2 has been carried into the next interval.
        beat(&mut d, &mut kv, &dev, &s2, 20_500);
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s1, &Heartbeat::default(), 21_000),
            Decision::Superseded
        );
        assert_eq!(d.get_mut(&a, 2).unwrap().entries[&dev].session, s2);
    }

    #[test]
    fn the_session_count_holds_across_an_interval_boundary() {
        let (_, dev, s) = ids();
        let (mut d, mut kv) = lived(&[9_000]);
        assert_eq!(d.session_count(9_500), 1);
        // The next interval has begun, the session has not beaten yet.
        assert_eq!(d.session_count(10_500), 1);
        // Once it has, it is still one session.
        beat(&mut d, &mut kv, &dev, &s, 10_600);
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
        let rm = Change::Remove(s, UnixMillis::MAX);
        assert_eq!(apply(&mut dict, &dev, &rm), Applied::Removed(rec));
        assert_eq!(apply(&mut dict, &dev, &rm), Applied::Nothing);
    }

    #[test]
    fn a_conflict_reapplies_the_pending_change_on_the_newer_copy_and_writes_again() {
        let a = AccountId::parse("acme").unwrap();
        let (tv, radio) = (device("tv"), device("radio"));
        let mut kv = Kv::default();
        // Two handlers, each with a join for the same dictionary.
        let mut h1 = Dicts::new(clock());
        let mut h2 = Dicts::new(clock());
        h1.on_heartbeat(&a, &tv, &session("s1"), &Heartbeat::default(), 1_000);
        h2.on_heartbeat(&a, &radio, &session("s2"), &Heartbeat::default(), 1_000);
        let w1 = write_of(h1.take_for_write(&a, 0, 1_000));
        let w2 = write_of(h2.take_for_write(&a, 0, 1_000));
        assert_eq!((w1.revision(), w2.revision()), (0, 0));

        let rev1 = kv.update(&a, 0, &w1).expect("the first write lands");
        let applied = h1.on_written(&a, 0, w1, rev1, 1_000).applied;
        assert_eq!(applied.len(), 1);
        assert_eq!(applied[0].0, tv);
        assert_eq!(kv.update(&a, 0, &w2), None, "the second one is stale");
        h2.on_conflict(&a, 0, w2, Some(kv.read(&a, 0)));

        // The join is pending again and goes on top of the newer copy.
        assert!(h2.has_pending());
        let retry = write_of(h2.take_for_write(&a, 0, 1_000));
        assert_eq!(retry.revision(), rev1);
        assert_eq!(held(retry.value()), [pair("radio", "s2"), pair("tv", "s1")]);
        let rev2 = kv.update(&a, 0, &retry).expect("the retry lands");
        let written = h2.on_written(&a, 0, retry, rev2, 1_000);
        // Each join is announced by the handler whose write carried it.
        assert!(
            matches!(&written.applied[..], [(d, Applied::Added { .. }, _)] if *d == radio),
            "{:?}",
            written.applied
        );
        assert!(!written.more);
        assert!(!h2.has_pending());
        assert_eq!(
            held(&kv.read(&a, 0).1),
            [pair("radio", "s2"), pair("tv", "s1")]
        );
    }

    #[test]
    fn a_change_queued_during_a_write_wins_over_the_one_put_back() {
        let (a, dev, s) = ids();
        let (mut d, mut kv, w) = joining(&content("film"), 1_000);
        // The write under way asks for the next flush when it ends.
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s, &content("news"), 2_000),
            Decision::Queued(Vec::new())
        );
        kv.put(&a, 0, SessionDict::new());
        assert_eq!(kv.update(&a, 0, &w), None);
        d.on_conflict(&a, 0, w, Some(kv.read(&a, 0)));

        let retry = write_of(d.take_for_write(&a, 0, 2_000));
        assert_eq!(retry.revision(), 1);
        assert_eq!(retry.value()[&dev].labels.content(), Some("news"));
    }

    #[test]
    fn a_write_that_timed_out_but_landed_is_not_applied_twice() {
        // The landed value shows up through the watch (and the re-read
        // fails), or through the re-read.
        for through_watch in [true, false] {
            let a = ids().0;
            let (mut d, mut kv, w) = joining(&Heartbeat::default(), 1_000);
            // It commits, but its answer never arrives.
            let landed = kv.update(&a, 0, &w).expect("the write lands");
            let current = if through_watch {
                let (rev, entries) = kv.read(&a, 0);
                d.entry(&a, 0).install(rev, entries);
                None
            } else {
                Some(kv.read(&a, 0))
            };
            d.on_conflict(&a, 0, w, current);
            assert!(d.has_pending(), "the change is kept until known written");

            // The retry finds it in the copy: no second write, so no second
            // join either.
            let retry = d.take_for_write(&a, 0, 1_500);
            assert!(
                matches!(retry, Take::Unchanged { .. }),
                "through_watch {through_watch}: {retry:?}"
            );
            assert_eq!(kv.seq, landed);
            assert!(!d.has_pending());
            let dict = d.get_mut(&a, 0).expect("dictionary");
            assert_eq!(dict.revision, landed);
            assert_eq!(held(&dict.entries.to_map()), [pair("tv", "s1")]);
        }
    }

    #[test]
    fn a_failed_write_is_kept_and_retried_until_it_lands() {
        let (a, dev, s) = ids();
        let (mut d, mut kv, w) = joining(&Heartbeat::default(), 1_000);
        let value = w.value().clone();
        // It fails without landing, and KV cannot be read either.
        d.on_conflict(&a, 0, w, None);
        assert!(d.has_pending());
        // It fails again; this time KV answers that there is no key yet.
        let w = write_of(d.take_for_write(&a, 0, 1_200));
        assert_eq!((w.revision(), w.value()), (0, &value));
        d.on_conflict(&a, 0, w, Some(kv.read(&a, 0)));

        let w = write_of(d.take_for_write(&a, 0, 1_400));
        assert_eq!((w.revision(), w.value()), (0, &value));
        let rev = kv.update(&a, 0, &w).expect("the write lands");
        let written = d.on_written(&a, 0, w, rev, 1_400);
        assert!(
            matches!(&written.applied[..], [(d, Applied::Added { record, .. }, _)] if *d == dev && record.session == s),
            "{:?}",
            written.applied
        );
        assert!(!d.has_pending());
        assert_eq!(held(&kv.read(&a, 0).1), [pair("tv", "s1")]);
    }

    #[test]
    fn a_leave_while_another_write_of_the_dictionary_is_under_way_is_written_next() {
        let (a, tv, s1) = ids();
        let (radio, s2) = (device("radio"), session("s2"));
        let (mut d, mut kv) = lived(&[1_000]);
        d.on_heartbeat(&a, &radio, &s2, &Heartbeat::default(), 2_000);
        let w = write_of(d.take_for_write(&a, 0, 2_000));

        // The leave waits for the write under way, which asks for the next
        // flush when it lands: nothing to flush now.
        assert_eq!(
            d.on_heartbeat(&a, &tv, &s1, &leave(), 2_100),
            Decision::Unchanged
        );
        assert_eq!(
            d.get_mut(&a, 0).expect("dictionary").pending().get(&tv),
            Some(&Change::Remove(s1.clone(), 2_100 + LEAVE_REORDER_MS))
        );
        let rev = kv.update(&a, 0, &w).expect("the write lands");
        assert!(d.on_written(&a, 0, w, rev, 2_100).more);

        let w = write_of(d.take_for_write(&a, 0, 2_100));
        let rev = kv.update(&a, 0, &w).expect("the leave lands");
        let written = d.on_written(&a, 0, w, rev, 2_100);
        assert!(
            matches!(&written.applied[..], [(d, Applied::Removed(r), _)] if *d == tv && r.session == s1),
            "{:?}",
            written.applied
        );
        assert_eq!(held(&kv.read(&a, 0).1), [pair("radio", "s2")]);
    }

    #[test]
    fn a_leave_during_the_sessions_first_write_is_written_after_it() {
        let (a, dev, s) = ids();
        let (mut d, mut kv, w) = joining(&Heartbeat::default(), 1_000);

        // The leave finds the session in the write under way and waits for
        // it: the write asks for the next flush when it lands.
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s, &leave(), 1_100),
            Decision::Unchanged
        );
        let rev = kv.update(&a, 0, &w).expect("the join lands");
        let written = d.on_written(&a, 0, w, rev, 1_100);
        assert!(written.more, "the leave is written next");
        let mut applied = written.applied;
        applied.extend(flush(&mut d, &mut kv, 1_100));
        assert_eq!(events(&applied), (vec!["s1".into()], vec!["s1".into()]));
        assert!(kv.read(&a, 0).1.is_empty());
        assert!(!d.has_pending());
    }

    #[test]
    fn a_leave_during_a_first_write_that_does_not_land_still_announces_the_leave() {
        let (a, dev, s) = ids();
        let (mut d, mut kv, w) = joining(&Heartbeat::default(), 1_000);
        d.on_heartbeat(&a, &dev, &s, &leave(), 1_100);
        // Another handler's write lands first: the join did not.
        let other = [(device("radio"), record("s2", 1_050))]
            .into_iter()
            .collect();
        kv.put(&a, 0, other);
        assert_eq!(kv.update(&a, 0, &w), None);
        d.on_conflict(&a, 0, w, Some(kv.read(&a, 0)));

        // The leave withdraws the join: nothing to write, nobody saw the
        // session join, and its leave is announced all the same.
        let before = kv.seq;
        let applied = flush(&mut d, &mut kv, 1_200);
        assert_eq!(events(&applied), (vec![], vec!["s1".into()]));
        assert_eq!(kv.seq, before, "no write");
        assert_eq!(held(&kv.read(&a, 0).1), [pair("radio", "s2")]);
        assert!(!d.has_pending());
    }

    #[test]
    fn a_leave_before_the_sessions_first_write_withdraws_it() {
        let (a, dev, s) = ids();
        let (mut d, mut kv) = lone();
        d.on_heartbeat(&a, &dev, &s, &Heartbeat::default(), 1_000);
        d.on_heartbeat(&a, &dev, &s, &leave(), 1_100);
        let applied = flush(&mut d, &mut kv, 1_100);
        assert_eq!(events(&applied), (vec![], vec!["s1".into()]));
        assert_eq!(kv.seq, 0, "nothing was ever written");
    }

    #[test]
    fn a_leave_during_a_carry_write_removes_the_carried_record_too() {
        // The leave's removal from the interval the session came from lands
        // before the carry-over, or after it.
        for removal_first in [true, false] {
            let (a, dev, s) = ids();
            let (mut d, mut kv) = lived(&[9_000]);
            assert_eq!(
                d.on_heartbeat(&a, &dev, &s, &Heartbeat::default(), 10_500),
                Decision::Deferred(vec![(a.clone(), 1)])
            );
            let carry = write_of(d.take_for_write(&a, 1, 10_500));

            // Removed from the interval where the session has landed, and
            // withdrawn from the carry-over once that has landed: whichever
            // lands first announces, the other is quiet.
            assert_eq!(
                d.on_heartbeat(&a, &dev, &s, &leave(), 10_600),
                Decision::Queued(vec![(a.clone(), 0)])
            );
            assert!(matches!(
                d.get_mut(&a, 1).expect("current").pending().get(&dev),
                Some(Change::Withdraw(r, by))
                    if r.session == s && *by == 10_600 + LEAVE_REORDER_MS
            ));
            let removal = write_of(d.take_for_write(&a, 0, 10_600));
            // Each write lands and is handed back, in the order asked for.
            let mut writes = vec![(0, removal), (1, carry)];
            if !removal_first {
                writes.reverse();
            }
            let mut applied = Vec::new();
            for (interval, w) in writes {
                let rev = kv.update(&a, interval, &w).expect("the write lands");
                let written = d.on_written(&a, interval, w, rev, 10_600);
                assert_eq!(written.more, interval == 1, "interval {interval}");
                applied.extend(written.applied);
            }
            applied.extend(flush(&mut d, &mut kv, 10_600));

            // A carry-over, not a join, and one leave.
            assert_eq!(
                events(&applied),
                (vec![], vec!["s1".into()]),
                "removal first: {removal_first}"
            );
            assert!(kv.read(&a, 0).1.is_empty());
            assert!(kv.read(&a, 1).1.is_empty());
            assert!(!d.has_pending());
        }
    }

    #[test]
    fn a_leave_on_a_handler_whose_copy_lacks_the_session_removes_it_once_it_shows_up() {
        // The leave reaches the second handler while the first one's join
        // is under way, or after it landed but before the watch told.
        for landed_first in [false, true] {
            let (a, dev, s) = ids();
            let mut kv = Kv::default();
            let mut h1 = Dicts::new(clock());
            let mut h2 = Dicts::new(clock());
            h1.on_heartbeat(&a, &dev, &s, &Heartbeat::default(), 1_000);
            let w = write_of(h1.take_for_write(&a, 0, 1_000));
            let mut join = Some(w);
            let mut land = |h1: &mut Dicts, kv: &mut Kv| {
                let w = join.take().expect("the join lands once");
                let rev = kv.update(&a, 0, &w).expect("the join lands");
                h1.on_written(&a, 0, w, rev, 1_100).applied
            };
            let mut joined = Vec::new();
            if landed_first {
                joined = land(&mut h1, &mut kv);
            }

            // h2 knows nothing of the session: the removal waits for it,
            // and is no pending write.
            assert_eq!(
                h2.on_heartbeat(&a, &dev, &s, &leave(), 1_100),
                Decision::Unchanged
            );
            assert!(!h2.has_pending());
            if !landed_first {
                joined = land(&mut h1, &mut kv);
            }
            // h2's watch brings the copy that holds it: the removal is due.
            let (rev, entries) = kv.read(&a, 0);
            assert_eq!(
                h2.install(&a, 0, rev, entries, 1_150),
                Decision::Queued(vec![(a.clone(), 0)])
            );
            let left = flush(&mut h2, &mut kv, 1_150);
            assert_eq!(events(&joined), (vec!["s1".into()], vec![]));
            assert_eq!(events(&left), (vec![], vec!["s1".into()]));
            assert!(kv.read(&a, 0).1.is_empty());

            // h1 learns of it through its watch; nobody writes again.
            let (rev, entries) = kv.read(&a, 0);
            assert_eq!(h1.install(&a, 0, rev, entries, 1_200), Decision::Unchanged);
            assert!(!h1.has_pending());
            let (rev, entries) = kv.read(&a, 0);
            assert_eq!(h2.install(&a, 0, rev, entries, 1_200), Decision::Unchanged);
            assert!(!h2.has_pending());
        }
    }

    #[test]
    fn a_session_heard_again_after_its_awaited_leave_stays() {
        let (a, dev, s) = ids();
        let (mut d, mut kv) = lone();
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s, &leave(), 1_000),
            Decision::Unchanged
        );
        // It comes back (a page restored from the browser's cache): it
        // joins again, and the leave that waited for it is void.
        beat(&mut d, &mut kv, &dev, &s, 1_100);
        let (rev, entries) = kv.read(&a, 0);
        assert_eq!(d.install(&a, 0, rev, entries, 1_200), Decision::Unchanged);
        assert!(!d.has_pending());
        assert_eq!(held(&kv.read(&a, 0).1), [pair("tv", "s1")]);
    }

    #[test]
    fn an_awaited_leave_is_forgotten_once_its_interval_is_over() {
        let (a, dev, s) = ids();
        let (mut d, _) = lone();
        d.on_heartbeat(&a, &dev, &s, &leave(), 1_000);
        d.prune(10_500);
        assert!(d.awaited.contains_key(&a), "interval 0 is still live");
        d.prune(20_500);
        assert!(d.awaited.is_empty());
    }

    #[test]
    fn a_dictionary_is_dropped_once_no_reader_consults_it_and_not_while_written() {
        let (a, _, _) = ids();
        let intervals = |d: &Dicts| -> Vec<u64> {
            d.accounts
                .get(&a)
                .map(|x| x.dicts.iter().map(|(i, _)| i).collect())
                .unwrap_or_default()
        };
        // Recorded in intervals 0 and 1.
        let (mut d, _) = lived(&[1_000, 10_500]);
        d.prune(19_000);
        assert_eq!(intervals(&d), [0, 1], "both live");
        d.prune(20_500);
        assert_eq!(intervals(&d), [0, 1], "0 is the one before the live ones");
        d.prune(30_500);
        assert_eq!(intervals(&d), [1]);
        d.prune(40_500);
        assert!(d.accounts.is_empty(), "nothing left of the account");

        // A dictionary with a write under way stays until it lands.
        let (mut d, _, _write) = joining(&Heartbeat::default(), 1_000);
        d.prune(40_500);
        assert_eq!(intervals(&d), [0]);
    }

    #[test]
    fn an_accounts_rate_buckets_outlive_its_dictionaries_until_they_idle() {
        let (a, _, s) = ids();
        let mut d = Dicts::new(clock()).limiting(Limits::new(1.0, 2));
        // An account with no dictionary: its session's burst, then nothing.
        assert!(d.admit(a.as_str(), s.as_str(), 1_000));
        assert!(d.admit(a.as_str(), s.as_str(), 1_000));
        assert!(!d.admit(a.as_str(), s.as_str(), 1_000));
        assert!(d.admit(a.as_str(), "other", 1_000), "a session of its own");
        assert!(d.admit("beta", s.as_str(), 1_000), "an account of its own");
        assert!(!d.admit("not an account", s.as_str(), 1_000));
        // A pass of prune keeps the spent bucket (half a token back).
        d.prune(1_500);
        assert!(!d.admit(a.as_str(), s.as_str(), 1_500));
        // Beating at its rate, it keeps getting through.
        assert!(d.admit(a.as_str(), s.as_str(), 3_000));
        // Quiet for over a minute: the buckets go, and the accounts with them.
        d.prune(64_000);
        assert!(d.accounts.is_empty());
    }

    #[test]
    fn an_ended_session_leaves_the_live_dictionaries_quietly() {
        let (a, dev, s) = ids();
        // Recorded in intervals 0 and 1, trimmed from this copy of 0.
        let (mut d, mut kv) = lived(&[9_000, 10_500]);
        assert_eq!(
            d.ended(&a, &dev, &s, 10_600, 10_700),
            Decision::Deferred(vec![(a.clone(), 0), (a.clone(), 1)])
        );
        let applied = flush(&mut d, &mut kv, 10_700);
        assert!(applied.is_empty(), "nothing to announce: {applied:?}");
        assert!(kv.read(&a, 0).1.is_empty());
        assert!(kv.read(&a, 1).1.is_empty());
        // An ending older than the live intervals has nothing to remove,
        // nor to wait for.
        let old = session("old");
        assert_eq!(d.ended(&a, &dev, &old, 1_000, 20_500), Decision::Unchanged);
        assert!(d.awaited.get(&a).is_none_or(|w| !w.contains_key(&old)));
    }

    #[test]
    fn an_ending_the_copy_does_not_show_yet_applies_when_it_does() {
        let (a, dev, s) = ids();
        let mut kv = Kv::default();
        let mut h1 = Dicts::new(clock());
        let mut h2 = Dicts::new(clock());
        h1.on_heartbeat(&a, &dev, &s, &Heartbeat::default(), 1_000);
        flush(&mut h1, &mut kv, 1_000);
        // h2 hears of the ending before its watch brought the session.
        assert_eq!(h2.ended(&a, &dev, &s, 1_100, 1_100), Decision::Unchanged);
        let (rev, entries) = kv.read(&a, 0);
        assert_eq!(
            h2.install(&a, 0, rev, entries, 1_200),
            Decision::Deferred(vec![(a.clone(), 0)])
        );
        assert!(flush(&mut h2, &mut kv, 1_200).is_empty());
        assert!(kv.read(&a, 0).1.is_empty());
    }

    /// `n` sessions, `s<i>` of device `d<i>`.
    fn many(n: usize, at: UnixMillis) -> SessionDict {
        (0..n)
            .map(|i| (device(&format!("d{i}")), record(&format!("s{i}"), at)))
            .collect()
    }

    /// `d` with `dict` installed as KV's copy of acme's `interval`.
    fn installed(d: &mut Dicts, kv: &mut Kv, interval: u64, dict: SessionDict, at: UnixMillis) {
        let a = ids().0;
        kv.put(&a, interval, dict);
        let (rev, entries) = kv.read(&a, interval);
        let _ = d.install(&a, interval, rev, entries, at);
    }

    #[test]
    fn a_full_dictionary_refuses_new_devices_and_keeps_its_own_sessions() {
        let a = ids().0;
        let hb = Heartbeat::default();
        let (mut d, mut kv) = lone();
        installed(&mut d, &mut kv, 0, many(DICT_MAX_SESSIONS, 1_000), 1_000);

        let (new, s_new) = (device("new"), session("new"));
        assert_eq!(d.on_heartbeat(&a, &new, &s_new, &hb, 1_100), Decision::Full);
        // Its sessions still change, are replaced and leave.
        assert_eq!(
            d.on_heartbeat(&a, &device("d0"), &session("s0"), &content("news"), 1_100),
            Decision::Queued(vec![(a.clone(), 0)])
        );
        d.on_heartbeat(&a, &device("d1"), &session("t1"), &hb, 1_100);
        d.on_heartbeat(&a, &device("d2"), &session("s2"), &leave(), 1_100);
        let applied = flush(&mut d, &mut kv, 1_100);
        assert_eq!(events(&applied), (vec!["t1".into()], vec!["s2".into()]));
        let dict = kv.read(&a, 0).1;
        assert_eq!(dict.len(), DICT_MAX_SESSIONS - 1);
        assert_eq!(dict[&device("d0")].labels.content(), Some("news"));
        assert_eq!(dict[&device("d1")].session, session("t1"));

        // The leave made room for one.
        assert_eq!(
            d.on_heartbeat(&a, &new, &s_new, &hb, 1_200),
            Decision::Queued(vec![(a.clone(), 0)])
        );
        let other = device("other");
        assert_eq!(
            d.on_heartbeat(&a, &other, &session("other"), &hb, 1_200),
            Decision::Full
        );
        flush(&mut d, &mut kv, 1_200);
        assert_eq!(kv.read(&a, 0).1.len(), DICT_MAX_SESSIONS);

        // Next interval: the live sessions move on, and newcomers wait
        // while the previous interval holds that many.
        assert_eq!(
            d.on_heartbeat(&a, &device("d3"), &session("s3"), &hb, 10_500),
            Decision::Deferred(vec![(a.clone(), 1)])
        );
        assert_eq!(
            d.on_heartbeat(&a, &other, &session("other"), &hb, 10_500),
            Decision::Full
        );
    }

    #[test]
    fn a_write_never_takes_a_dictionary_past_its_room() {
        let a = ids().0;
        let hb = Heartbeat::default();
        let (mut d, mut kv) = lone();
        installed(
            &mut d,
            &mut kv,
            0,
            many(DICT_MAX_SESSIONS - 2, 1_000),
            1_000,
        );
        // Room for two more, as far as this handler knows.
        for name in ["n0", "n1"] {
            assert_eq!(
                d.on_heartbeat(&a, &device(name), &session(name), &hb, 1_100),
                Decision::Queued(if name == "n0" {
                    vec![(a.clone(), 0)]
                } else {
                    Vec::new()
                })
            );
        }
        assert_eq!(
            d.on_heartbeat(&a, &device("n2"), &session("n2"), &hb, 1_100),
            Decision::Full
        );
        let w = write_of(d.take_for_write(&a, 0, 1_100));
        assert_eq!(w.refused(), 0);

        // Another handler's newcomer landed first: one of the two is left
        // out of the retry.
        let mut theirs = kv.read(&a, 0).1;
        theirs.insert(device("theirs"), record("theirs", 1_050));
        kv.put(&a, 0, theirs);
        assert_eq!(kv.update(&a, 0, &w), None);
        d.on_conflict(&a, 0, w, Some(kv.read(&a, 0)));
        let w = write_of(d.take_for_write(&a, 0, 1_200));
        assert_eq!(w.refused(), 1);
        assert_eq!(w.value().len(), DICT_MAX_SESSIONS);
        let rev = kv.update(&a, 0, &w).expect("the retry lands");
        let written = d.on_written(&a, 0, w, rev, 1_200);
        assert_eq!(events(&written.applied).0.len(), 1);
        assert!(!written.more);
        assert!(!d.has_pending(), "a refused session is not retried");
    }

    #[test]
    fn the_previous_intervals_sessions_are_carried_before_newcomers_get_in() {
        let a = ids().0;
        let hb = Heartbeat::default();
        let (mut d, mut kv) = lone();
        // A newcomer in interval 1, before this handler's copy of interval 0
        // came in, full.
        assert_eq!(
            d.on_heartbeat(&a, &device("new"), &session("new"), &hb, 10_500),
            Decision::Queued(vec![(a.clone(), 1)])
        );
        installed(&mut d, &mut kv, 0, many(DICT_MAX_SESSIONS, 9_000), 10_500);
        d.on_heartbeat(&a, &device("d0"), &session("s0"), &hb, 10_600);
        let w = write_of(d.take_for_write(&a, 1, 10_600));
        assert_eq!(w.refused(), 1);
        assert_eq!(held(w.value()), [pair("d0", "s0")]);
    }

    #[test]
    fn a_trimmed_dictionary_is_read_whole_before_it_is_written() {
        let (a, dev, s) = ids();
        // Carried into interval 1, the session is trimmed from interval 0.
        let (mut d, mut kv) = lived(&[1_000, 10_500]);
        assert!(d.get_mut(&a, 0).expect("previous dictionary").partial);
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s, &leave(), 10_700),
            Decision::Queued(vec![(a.clone(), 0), (a.clone(), 1)])
        );

        // Interval 0's KV copy still holds the session: read it first.
        assert!(matches!(d.take_for_write(&a, 0, 10_700), Take::Reread));
        // A read that fails leaves the change pending and the copy trimmed.
        d.on_reread(&a, 0, None);
        assert!(matches!(d.take_for_write(&a, 0, 10_700), Take::Reread));
        let whole = kv.read(&a, 0);
        assert_eq!(held(&whole.1), [pair("tv", "s1")]);
        d.on_reread(&a, 0, Some(whole.clone()));

        let w = write_of(d.take_for_write(&a, 0, 10_700));
        assert_eq!(w.revision(), whole.0);
        assert!(w.value().is_empty());
        let rev = kv.update(&a, 0, &w).expect("the write lands");
        // Interval 1's write announces the leave; this one is quiet.
        assert!(d.on_written(&a, 0, w, rev, 10_700).applied.is_empty());
    }

    #[test]
    fn a_copy_no_longer_live_drops_its_trimmed_sessions_and_is_still_read_whole() {
        let (a, tv, s1) = ids();
        let radio = DeviceId::parse("radio").unwrap();
        let s2 = SessionId::parse("s2").unwrap();
        // Both join in interval 0; tv moves on to interval 1, radio falls
        // silent: interval 0's copy is trimmed of s1 and keeps s2.
        let (mut d, mut kv) = lone();
        beat(&mut d, &mut kv, &tv, &s1, 9_000);
        beat(&mut d, &mut kv, &radio, &s2, 9_000);
        beat(&mut d, &mut kv, &tv, &s1, 10_500);
        let old = d.get_mut(&a, 0).expect("interval 0");
        assert!(old.partial && old.trimmed.len() == 1);
        assert_eq!(old.entries.keys().collect::<Vec<_>>(), [&radio]);

        // Interval 2: interval 0 is no longer live. Its copy is kept (radio's
        // leave may remove s2 there) without the trimmed sessions.
        beat(&mut d, &mut kv, &tv, &s1, 20_500);
        d.prune(20_500);
        let old = d.get_mut(&a, 0).expect("the copy before the live ones");
        assert!(old.partial && old.trimmed.is_empty());
        assert_eq!(old.entries.len(), 1);

        // radio leaves: s2 is removed in interval 0, after a read of the
        // whole KV copy (which still holds s1): the write keeps s1.
        assert_eq!(
            d.on_heartbeat(&a, &radio, &s2, &leave(), 20_600),
            Decision::Queued(vec![(a.clone(), 0)])
        );
        assert!(matches!(d.take_for_write(&a, 0, 20_600), Take::Reread));
        let whole = kv.read(&a, 0);
        assert_eq!(held(&whole.1), [pair("radio", "s2"), pair("tv", "s1")]);
        d.on_reread(&a, 0, Some(whole));
        let w = write_of(d.take_for_write(&a, 0, 20_600));
        assert_eq!(held(w.value()), [pair("tv", "s1")]);
    }

    #[test]
    fn a_carry_over_copies_only_its_own_session() {
        let (a, dev, s) = ids();
        let (mut d, mut kv) = lived(&[9_000]);
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s, &Heartbeat::default(), 10_500),
            Decision::Deferred(vec![(a.clone(), 1)])
        );
        // Before the carry-over is taken, another handler's write shows
        // another session of the device in interval 0.
        let other = [(dev.clone(), record("s2", 9_500))].into_iter().collect();
        installed(&mut d, &mut kv, 0, other, 10_600);
        // It is not carried under this session's heartbeat.
        let take = d.take_for_write(&a, 1, 11_500);
        assert!(matches!(take, Take::Unchanged { .. }), "{take:?}");
    }

    #[test]
    fn the_later_heartbeats_labels_win_whichever_write_lands_last() {
        let dev = ids().1;
        let newer = SessionRecord {
            labels: Labels::new(Some("news"), None, None),
            last_seen: 2_000,
            ..record("s1", 1_000)
        };
        let mut dict: SessionDict = [(dev.clone(), newer)].into_iter().collect();
        // An earlier heartbeat's write, retried after a conflict, lands
        // last: its labels are not the session's any more.
        let older = SessionRecord {
            labels: Labels::new(Some("film"), None, None),
            ..record("s1", 1_500)
        };
        let change = Change::Upsert(Box::new(older));
        assert_eq!(apply(&mut dict, &dev, &change), Applied::Nothing);
        assert_eq!(dict[&dev].labels.content(), Some("news"));
    }

    #[test]
    fn a_read_older_than_the_copy_is_not_taken() {
        let (a, dev, s) = ids();
        let (mut d, mut kv) = lone();
        let other = [(device("radio"), record("s2", 500))].into_iter().collect();
        installed(&mut d, &mut kv, 0, other, 600);
        d.on_heartbeat(&a, &dev, &s, &Heartbeat::default(), 1_000);
        let w = write_of(d.take_for_write(&a, 0, 1_000));
        // The write lands and its answer is lost; the read made after that
        // answers with what the key held before, after the watch brought
        // the write.
        let stale = kv.read(&a, 0);
        let rev = kv.update(&a, 0, &w).expect("the write lands");
        let (_, entries) = kv.read(&a, 0);
        let _ = d.install(&a, 0, rev, entries, 1_100);
        d.on_conflict(&a, 0, w, Some(stale));
        // The copy keeps the write: nothing to write again.
        let retry = d.take_for_write(&a, 0, 1_300);
        assert!(matches!(retry, Take::Unchanged { .. }), "{retry:?}");
        assert_eq!(kv.seq, rev);
    }

    #[test]
    fn a_session_heard_again_well_after_its_leave_stays_on_every_handler() {
        let (a, dev, s) = ids();
        let mut kv = Kv::default();
        let (mut h1, mut h2) = (Dicts::new(clock()), Dicts::new(clock()));
        // h2 takes the leave knowing nothing of the session: the removal
        // waits for a copy that shows it.
        assert_eq!(
            h2.on_heartbeat(&a, &dev, &s, &leave(), 1_000),
            Decision::Unchanged
        );
        // Seconds later the session is heard again, on h1 (a page restored
        // from the browser's cache), and recorded anew.
        beat(&mut h1, &mut kv, &dev, &s, 4_000);
        // h2's copy shows a record heard after its leave: it stays.
        let (rev, entries) = kv.read(&a, 0);
        assert_eq!(h2.install(&a, 0, rev, entries, 4_100), Decision::Unchanged);
        assert!(!h2.has_pending());
    }

    #[test]
    fn a_dictionary_no_longer_read_gets_only_its_removals_written() {
        let (a, dev, s) = ids();
        let (mut d, mut kv) = lone();
        let other = [(device("radio"), record("s2", 500))].into_iter().collect();
        installed(&mut d, &mut kv, 0, other, 600);
        // A join and a leave wait for interval 0's write (the store kept
        // failing) until interval 2: nobody reads interval 0 any more.
        d.on_heartbeat(&a, &dev, &s, &Heartbeat::default(), 1_000);
        d.on_heartbeat(&a, &device("radio"), &session("s2"), &leave(), 1_100);
        let w = write_of(d.take_for_write(&a, 0, 20_500));
        assert!(w.value().is_empty(), "{:?}", w.value());
        let rev = kv.update(&a, 0, &w).expect("the removal lands");
        let written = d.on_written(&a, 0, w, rev, 20_500);
        // The leave is announced; the join, which nobody would see, is not.
        assert_eq!(events(&written.applied), (vec![], vec!["s2".into()]));
    }

    // ---- the simulation's defects, each in its smallest form ----------

    /// What `applied` says of `device`'s replaced sessions.
    fn replaced_of(applied: &[(DeviceId, Applied, bool)]) -> Vec<String> {
        applied
            .iter()
            .filter_map(|(_, what, _)| match what {
                Applied::Added {
                    replaced: Some(old),
                    ..
                } => Some(old.as_str().to_owned()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_leave_displaced_by_the_devices_next_session_is_still_written_and_announced() {
        // The leave of s1 is pending when the device's next session s2 is
        // heard (one pending change per device), and s2 ends before
        // anything is written. Whether s1's join landed (another handler's
        // write, seen late) or not, s1 goes and its leave is told once.
        for landed in [false, true] {
            let (a, tv, s1) = ids();
            let (mut d, mut kv) = lone();
            let radio = device("radio");
            // Interval 1 with a session carried over: interval 0 is trimmed.
            beat(&mut d, &mut kv, &radio, &session("sa"), 1_000);
            beat(&mut d, &mut kv, &radio, &session("sa"), 10_500);
            d.on_heartbeat(&a, &tv, &s1, &Heartbeat::default(), 10_600);
            d.on_heartbeat(&a, &tv, &s1, &leave(), 10_700);
            d.on_heartbeat(&a, &tv, &session("s2"), &Heartbeat::default(), 10_800);
            d.ended(&a, &tv, &session("s2"), 10_900, 10_900);
            if landed {
                let (_, mut value) = kv.read(&a, 1);
                value.insert(tv.clone(), record("s1", 10_600));
                let rev = kv.put(&a, 1, value.clone());
                let _ = d.install(&a, 1, rev, value, 10_950);
            }
            let told = flush(&mut d, &mut kv, 11_000);
            assert_eq!(events(&told), (vec![], vec!["s1".into()]), "{told:?}");
            assert_eq!(held(&kv.read(&a, 1).1), vec![pair("radio", "sa")]);
            assert!(!d.has_pending());
        }
    }

    #[test]
    fn a_no_key_read_from_before_the_keys_first_write_is_not_taken() {
        let (a, dev, s) = ids();
        let (mut d, mut kv) = lone();
        d.on_heartbeat(&a, &dev, &s, &Heartbeat::default(), 1_000);
        let w = write_of(d.take_for_write(&a, 0, 1_000));
        // The write is lost, and the leave comes while it is under way.
        d.on_heartbeat(&a, &dev, &s, &leave(), 1_100);
        // The read after the failure is served before another handler's
        // write of the session lands, and answers after the watch brought
        // that write.
        let early = kv.read(&a, 0);
        let value: SessionDict = [(dev.clone(), record("s1", 1_050))].into_iter().collect();
        let rev = kv.put(&a, 0, value.clone());
        let _ = d.install(&a, 0, rev, value, 1_150);
        d.on_conflict(&a, 0, w, Some(early));
        // The removal is written on the copy the watch brought.
        let told = flush(&mut d, &mut kv, 1_200);
        assert_eq!(events(&told), (vec![], vec!["s1".into()]));
        assert!(kv.read(&a, 0).1.is_empty());
    }

    #[test]
    fn a_no_key_read_after_the_copys_revision_is_an_expired_key() {
        let (a, dev, s) = ids();
        let (mut d, mut kv) = lived(&[1_000]);
        // The key expires; the next write conflicts and reads no key.
        kv.dicts.clear();
        d.on_heartbeat(&a, &dev, &s, &content("film"), 2_000);
        let w = write_of(d.take_for_write(&a, 0, 2_000));
        assert_eq!(w.revision(), 1);
        assert!(kv.update(&a, 0, &w).is_none());
        d.on_conflict(&a, 0, w, Some(kv.read(&a, 0)));
        let w = write_of(d.take_for_write(&a, 0, 2_000));
        assert_eq!(w.revision(), 0, "the key is written anew");
    }

    #[test]
    fn an_ended_session_trimmed_from_the_copy_is_removed_behind_its_devices_next_session() {
        let (a, tv, s1) = ids();
        let (mut d, mut kv) = lived(&[1_000, 10_500]);
        // s1 moved on to interval 1: interval 0's copy is trimmed of it,
        // while KV still holds it there.
        assert_eq!(held(&kv.read(&a, 0).1), vec![pair("tv", "s1")]);
        // The device's next session is heard, and s1 is ended before that
        // write is taken: s1 leaves interval 0 too, not only interval 1.
        d.on_heartbeat(&a, &tv, &session("s2"), &Heartbeat::default(), 10_600);
        d.ended(&a, &tv, &s1, 10_700, 10_700);
        let told = flush(&mut d, &mut kv, 11_700);
        assert!(kv.read(&a, 0).1.is_empty(), "{:?}", kv.read(&a, 0).1);
        assert_eq!(held(&kv.read(&a, 1).1), vec![pair("tv", "s2")]);
        // Its ending was told by whoever ended it.
        assert_eq!(events(&told), (vec!["s2".into()], vec![]));
        assert!(replaced_of(&told).is_empty(), "{told:?}");
    }

    #[test]
    fn a_withdrawn_session_named_replaced_by_a_merged_record_is_still_announced() {
        let (a, tv, s1) = ids();
        let (mut d, mut kv) = lone();
        d.on_heartbeat(&a, &tv, &s1, &Heartbeat::default(), 1_000);
        d.on_heartbeat(&a, &tv, &s1, &leave(), 1_100);
        // The device's next session s2 landed first with no session
        // replaced, and a later write of it merged in s1 as replaced: no
        // replacement of s1 was ever announced.
        let s2 = SessionRecord {
            replaced: Some(Box::new(s1.clone())),
            ..record("s2", 1_050)
        };
        let value: SessionDict = [(tv.clone(), s2)].into_iter().collect();
        let rev = kv.put(&a, 0, value.clone());
        let _ = d.install(&a, 0, rev, value, 1_150);
        let told = flush(&mut d, &mut kv, 1_200);
        assert_eq!(events(&told), (vec![], vec!["s1".into()]));
    }

    #[test]
    fn a_leave_is_not_dropped_for_a_displacement_that_has_not_landed() {
        // s1 is recorded; s2 of the same device is heard here (its write
        // not taken yet), then s1 leaves. Whether s2 lands or leaves too,
        // s1 goes from KV and its leave is told once, not as `replaced`.
        for s2_leaves in [false, true] {
            let (a, tv, s1) = ids();
            let (mut d, mut kv) = lived(&[1_000]);
            let s2 = session("s2");
            d.on_heartbeat(&a, &tv, &s2, &Heartbeat::default(), 2_000);
            assert_ne!(
                d.on_heartbeat(&a, &tv, &s1, &leave(), 2_100),
                Decision::Superseded
            );
            if s2_leaves {
                d.on_heartbeat(&a, &tv, &s2, &leave(), 2_200);
            }
            let told = flush(&mut d, &mut kv, 2_300);
            let (joins, leaves) = events(&told);
            assert!(leaves.contains(&"s1".to_owned()), "{told:?}");
            assert_eq!(leaves.iter().filter(|s| *s == "s1").count(), 1);
            assert!(replaced_of(&told).is_empty(), "{told:?}");
            if s2_leaves {
                assert!(kv.read(&a, 0).1.is_empty());
            } else {
                assert_eq!(joins, vec!["s2".to_owned()]);
                assert_eq!(held(&kv.read(&a, 0).1), vec![pair("tv", "s2")]);
            }
        }
    }

    #[test]
    fn two_handlers_with_one_history_refuse_the_same_newcomers() {
        // Which of several new devices a full dictionary refuses follows
        // from the order the pending changes are taken in: the same for
        // every handler (and every run) that saw the same history.
        let a = ids().0;
        let taken = || {
            let (mut d, mut kv) = lone();
            installed(
                &mut d,
                &mut kv,
                0,
                many(DICT_MAX_SESSIONS - 10, 1_000),
                1_000,
            );
            for i in 0..10 {
                let (dev, s) = (device(&format!("n{i}")), session(&format!("n{i}")));
                d.on_heartbeat(&a, &dev, &s, &Heartbeat::default(), 1_100);
            }
            // Another handler's write takes five of the free places.
            let mut value = kv.read(&a, 0).1;
            for i in 0..5 {
                value.insert(device(&format!("x{i}")), record(&format!("x{i}"), 1_150));
            }
            installed(&mut d, &mut kv, 0, value, 1_200);
            let w = write_of(d.take_for_write(&a, 0, 1_200));
            assert_eq!(w.refused(), 5);
            let mut kept: Vec<String> = w
                .value()
                .keys()
                .filter(|k| k.as_str().starts_with('n'))
                .map(|k| k.as_str().to_owned())
                .collect();
            kept.sort();
            kept
        };
        let first = taken();
        assert_eq!(first.len(), 5);
        for _ in 0..4 {
            assert_eq!(taken(), first);
        }
    }

    #[test]
    fn a_newer_sessions_heartbeat_wins_over_an_older_sessions_write_not_landed() {
        // s1's write is pending here; another handler records the device's
        // next session s2 meanwhile (it started later). s2's heartbeats are
        // its own, not a displaced session's: whether they change its labels
        // or not, s2 stays, with its latest labels, and is not revoked.
        for hb in [Heartbeat::default(), content("film")] {
            let (a, tv, s1) = ids();
            let (mut d, mut kv) = lone();
            let s2 = session("s2");
            d.on_heartbeat(&a, &tv, &s1, &Heartbeat::default(), 1_000);
            let value: SessionDict = [(tv.clone(), record("s2", 2_000))].into_iter().collect();
            let rev = kv.put(&a, 0, value.clone());
            let _ = d.install(&a, 0, rev, value, 2_100);
            // (The flush s1's change made due takes this one along.)
            let decision = d.on_heartbeat(&a, &tv, &s2, &hb, 2_200);
            assert_ne!(decision, Decision::Superseded, "{hb:?}");
            let told = flush(&mut d, &mut kv, 2_300);
            assert!(replaced_of(&told).is_empty(), "{told:?}");
            let now = &kv.read(&a, 0).1[&tv];
            assert_eq!(now.session, s2);
            assert_eq!(now.labels.content(), hb.content.as_deref());
        }
        // The other way round, s1 started after s2: a heartbeat of s2 is a
        // displaced session's.
        let (a, tv, s1) = ids();
        let (mut d, mut kv) = lone();
        d.on_heartbeat(&a, &tv, &s1, &Heartbeat::default(), 3_000);
        let value: SessionDict = [(tv.clone(), record("s2", 2_000))].into_iter().collect();
        let rev = kv.put(&a, 0, value.clone());
        let _ = d.install(&a, 0, rev, value, 3_100);
        let hb = Heartbeat::default();
        let decision = d.on_heartbeat(&a, &tv, &session("s2"), &hb, 3_200);
        assert_eq!(decision, Decision::Superseded);
    }

    /// A second handler that saw `s1` of `tv` land in interval 0 (at
    /// 1_000) and nothing since: its move into interval 1 (written by
    /// the first handler) has not landed. Time is in interval 2.
    fn moved_unseen() -> (Dicts, Kv) {
        let (mut d, kv) = lived(&[1_000]);
        let (mut other, _) = lone();
        let (rev, value) = kv.read(&ids().0, 0);
        let _ = other.install(&ids().0, 0, rev, value, 1_100);
        // The first handler's carry into interval 1 is pending for good.
        d.on_heartbeat(&ids().0, &ids().1, &ids().2, &Heartbeat::default(), 10_500);
        other.prune(20_500);
        (other, kv)
    }

    /// Takes and writes `account`'s dictionary of `interval` once: what it
    /// announces.
    fn write_once(
        d: &mut Dicts,
        kv: &mut Kv,
        interval: u64,
        now: UnixMillis,
    ) -> Vec<(DeviceId, Applied, bool)> {
        let a = ids().0;
        match d.take_for_write(&a, interval, now) {
            Take::Write(w) => {
                let rev = kv.update(&a, interval, &w).expect("lands");
                d.on_written(&a, interval, w, rev, now).applied
            }
            Take::Unchanged { applied, .. } => applied,
            other => panic!("expected a write, got {other:?}"),
        }
    }

    #[test]
    fn a_leave_no_live_dictionary_holds_is_removed_and_announced_where_it_last_was() {
        let (a, tv, s1) = ids();
        let (mut d, mut kv) = moved_unseen();
        // Interval 0 is no longer read, but this handler still holds it.
        assert_eq!(
            d.on_heartbeat(&a, &tv, &s1, &leave(), 20_600),
            Decision::Queued(vec![(a.clone(), 0)])
        );
        let told = flush(&mut d, &mut kv, 20_700);
        assert_eq!(events(&told), (vec![], vec!["s1".into()]));
        assert!(kv.read(&a, 0).1.is_empty());
    }

    #[test]
    fn a_leave_removed_from_an_older_and_a_live_dictionary_is_announced_once() {
        // The move into interval 1 lands after the leave: the removal there
        // and the one from interval 0 race; whichever lands first tells.
        // Also when the older copy shows the session only after the leave,
        // and when the session is heard again meanwhile.
        for (older_first, heard_again) in
            [(true, false), (false, false), (false, true), (true, true)]
        {
            let (a, tv, s1) = ids();
            let (mut d, mut kv) = moved_unseen();
            d.on_heartbeat(&a, &tv, &s1, &leave(), 20_600);
            let mut told = Vec::new();
            if older_first {
                told.extend(write_once(&mut d, &mut kv, 0, 20_700));
            }
            let moved: SessionDict = [(tv.clone(), record("s1", 10_500))].into_iter().collect();
            let rev = kv.put(&a, 1, moved.clone());
            let _ = d.install(&a, 1, rev, moved, 20_800);
            if heard_again {
                // Well after its leave: it is back, and stays.
                let _ = d.on_heartbeat(&a, &tv, &s1, &Heartbeat::default(), 22_000);
            }
            told.extend(flush(&mut d, &mut kv, 22_100));
            let leaves = events(&told).1;
            assert_eq!(
                leaves,
                vec!["s1".to_owned()],
                "{older_first} {heard_again}: {told:?}"
            );
            assert!(kv.read(&a, 0).1.is_empty());
            // Heard again, it is recorded anew where it is heard.
            assert_eq!(kv.read(&a, 2).1.contains_key(&tv), heard_again);
            if !heard_again {
                assert!(kv.read(&a, 1).1.is_empty());
            }
            assert!(!d.has_pending());
        }
    }

    #[test]
    fn an_older_copy_showing_a_left_session_does_not_take_the_announcement() {
        // The leave finds the session nowhere; a re-read of interval 0
        // then shows it there, and the removal queued there never lands
        // (the key expires): the live copy that shows it later still
        // announces the leave.
        let (a, tv, s1) = ids();
        let (mut d, mut kv) = moved_unseen();
        // This copy of interval 0 lags: it lacks the session.
        let lagging = d.get_mut(&a, 0).unwrap();
        lagging.entries = Entries::default();
        lagging.revision = 0;
        assert_eq!(
            d.on_heartbeat(&a, &tv, &s1, &leave(), 20_600),
            Decision::Unchanged
        );
        let (rev, value) = kv.read(&a, 0);
        let _ = d.install(&a, 0, rev, value, 20_650);
        let w = write_of(d.take_for_write(&a, 0, 20_700));
        kv.dicts.remove(&(a.clone(), 0));
        assert!(kv.update(&a, 0, &w).is_none());
        d.on_conflict(&a, 0, w, Some(kv.read(&a, 0)));
        let mut told = flush(&mut d, &mut kv, 20_750);
        assert_eq!(events(&told), (vec![], vec![]));
        let moved: SessionDict = [(tv.clone(), record("s1", 10_500))].into_iter().collect();
        let rev = kv.put(&a, 1, moved.clone());
        let _ = d.install(&a, 1, rev, moved, 20_800);
        told.extend(flush(&mut d, &mut kv, 20_900));
        assert_eq!(events(&told), (vec![], vec!["s1".into()]));
        assert!(kv.read(&a, 1).1.is_empty());
    }

    #[test]
    fn a_removal_from_an_older_dictionary_landing_late_stays_quiet_once_the_leave_was_told() {
        // The live copy's removal announced the leave; the older
        // dictionary's removal lands only intervals later, after the leave
        // stopped waiting for copies: it is still known as told.
        let (a, tv, s1) = ids();
        let (mut d, mut kv) = moved_unseen();
        d.on_heartbeat(&a, &tv, &s1, &leave(), 20_600);
        let moved: SessionDict = [(tv.clone(), record("s1", 10_500))].into_iter().collect();
        let rev = kv.put(&a, 1, moved.clone());
        let _ = d.install(&a, 1, rev, moved, 20_800);
        let told = write_once(&mut d, &mut kv, 1, 20_900);
        assert_eq!(events(&told), (vec![], vec!["s1".into()]));
        d.prune(40_500);
        let told = write_once(&mut d, &mut kv, 0, 40_600);
        assert_eq!(events(&told), (vec![], vec![]), "{told:?}");
        assert!(kv.read(&a, 0).1.is_empty());
        d.prune(41_500);
        assert!(d.awaited.is_empty());
    }

    #[test]
    fn a_session_heard_again_while_its_leaves_removal_is_written_moves_on_whole() {
        // The leave's removal from interval 0 is under way when the
        // session is heard again, well after it, in interval 1: its move
        // there is not a carry-over of the record that removal takes out,
        // which would find nothing to copy, but the record itself.
        let (a, tv, s1) = ids();
        let (mut d, mut kv) = lived(&[1_000]);
        d.on_heartbeat(&a, &tv, &s1, &leave(), 5_000);
        let w = write_of(d.take_for_write(&a, 0, 5_100));
        d.on_heartbeat(&a, &tv, &s1, &Heartbeat::default(), 10_500);
        let rev = kv.update(&a, 0, &w).expect("lands");
        let mut told = d.on_written(&a, 0, w, rev, 10_550).applied;
        told.extend(flush(&mut d, &mut kv, 10_600));
        assert_eq!(events(&told), (vec!["s1".into()], vec!["s1".into()]));
        assert!(kv.read(&a, 0).1.is_empty());
        let moved = kv.read(&a, 1).1;
        assert_eq!(
            moved.get(&tv).map(|r| (r.since, r.last_seen)),
            Some((1_000, 10_500))
        );
    }

    #[test]
    fn a_new_session_taking_the_place_of_a_pending_move_names_the_session_it_displaced() {
        // s1's move into interval 1 is pending when the device's next
        // session is heard: that session's write takes the move's place,
        // and records s1 as the session it displaced, whose end it
        // announces.
        let (a, tv, s1) = ids();
        let (mut d, mut kv) = lived(&[1_000]);
        d.on_heartbeat(&a, &tv, &s1, &Heartbeat::default(), 10_500);
        d.on_heartbeat(&a, &tv, &session("s2"), &Heartbeat::default(), 10_600);
        let told = flush(&mut d, &mut kv, 10_700);
        assert!(
            told.iter().any(|(_, what, _)| matches!(
                what,
                Applied::Added { record, replaced: Some(old) }
                    if record.session.as_str() == "s2" && *old == s1
            )),
            "{told:?}"
        );
        let rec = kv.read(&a, 1).1.remove(&tv).expect("s2 recorded");
        assert_eq!(
            (rec.session.as_str(), rec.replaced),
            ("s2", Some(Box::new(s1)))
        );
    }

    #[test]
    fn a_leave_is_told_by_the_first_of_its_removals_to_land() {
        // The leave finds the session only in this handler's first write
        // of it (interval 0), still under way; another handler's write of
        // it into interval 1 shows up afterwards. The removal from interval
        // 1 lands first and tells; the withdrawal from interval 0, landing
        // later, is quiet. (Told by the withdrawal, the leave would come
        // after the session, heard again meanwhile, joined anew.)
        let (a, tv, s1) = ids();
        let (mut d, mut kv) = lone();
        d.on_heartbeat(&a, &tv, &s1, &Heartbeat::default(), 1_000);
        let w = write_of(d.take_for_write(&a, 0, 1_000));
        d.on_heartbeat(&a, &tv, &s1, &leave(), 10_500);
        let moved: SessionDict = [(tv.clone(), record("s1", 10_100))].into_iter().collect();
        let rev = kv.put(&a, 1, moved.clone());
        let _ = d.install(&a, 1, rev, moved, 10_600);
        let told = write_once(&mut d, &mut kv, 1, 10_700);
        assert_eq!(events(&told), (vec![], vec!["s1".into()]));
        assert!(kv.read(&a, 1).1.is_empty());
        // The first write did not land; its withdrawal is quiet now.
        d.on_conflict(&a, 0, w, None);
        let told = flush(&mut d, &mut kv, 10_800);
        assert_eq!(events(&told), (vec![], vec![]), "{told:?}");
        assert!(!d.has_pending());
    }

    #[test]
    fn a_pending_change_that_changes_nothing_does_not_hold_up_a_removal() {
        // A late heartbeat of s1 is pending when the copy shows s2, which
        // displaced s1, and whose leave this handler heard before the copy
        // showed it. s1's change does nothing to that copy: the removal of
        // s2 does not wait for it, though the write carrying it does not
        // land.
        let (a, tv, s1) = ids();
        let s2 = session("s2");
        let (mut d, mut kv) = lone();
        d.on_heartbeat(&a, &tv, &s1, &Heartbeat::default(), 1_000);
        d.on_heartbeat(
            &a,
            &device("pc"),
            &session("s9"),
            &Heartbeat::default(),
            1_000,
        );
        let w = write_of(d.take_for_write(&a, 0, 1_000));
        assert_eq!(
            d.on_heartbeat(&a, &tv, &s2, &leave(), 2_000),
            Decision::Unchanged
        );
        let rec = SessionRecord {
            replaced: Some(Box::new(s1.clone())),
            ..record("s2", 1_500)
        };
        let _ = kv.put(&a, 0, [(tv.clone(), rec)].into_iter().collect());
        assert!(kv.update(&a, 0, &w).is_none());
        d.on_conflict(&a, 0, w, Some(kv.read(&a, 0)));
        let w = write_of(d.take_for_write(&a, 0, 2_100));
        assert!(!w.value().contains_key(&tv), "{:?}", w.value());
        let rev = kv.update(&a, 0, &w).expect("lands");
        let told = d.on_written(&a, 0, w, rev, 2_100).applied;
        assert_eq!(events(&told), (vec!["s9".into()], vec!["s2".into()]));
    }

    // ---------------------------------------------------------------------
    // Tests that pin each rule (mutation testing: `deploy/dev mutants`).
    // One block, kept apart from the tests above.
    // ---------------------------------------------------------------------

    fn labelled(session: &str, at: UnixMillis, content: &str) -> SessionRecord {
        SessionRecord {
            labels: Labels::new(Some(content), None, None),
            ..record(session, at)
        }
    }

    fn only(device: &DeviceId, rec: SessionRecord) -> SessionDict {
        [(device.clone(), rec)].into_iter().collect()
    }

    #[test]
    fn an_upsert_heard_at_the_same_time_as_the_copy_brings_its_labels() {
        let dev = ids().1;
        let mut dict = only(&dev, labelled("s1", 5_000, "film"));
        let up = Change::Upsert(Box::new(labelled("s1", 5_000, "news")));
        assert_eq!(apply(&mut dict, &dev, &up), Applied::Updated);
        assert_eq!(dict[&dev].labels.content(), Some("news"));
    }

    #[test]
    fn an_upsert_keeps_the_session_it_displaced_and_its_start() {
        let dev = ids().1;
        let cur = SessionRecord {
            replaced: Some(Box::new(session("s0"))),
            ..record("s1", 1_000)
        };
        let mut dict = only(&dev, cur);
        let up = Change::Upsert(Box::new(record("s1", 2_000)));
        assert_eq!(apply(&mut dict, &dev, &up), Applied::Updated);
        let rec = &dict[&dev];
        assert_eq!(rec.replaced, Some(Box::new(session("s0"))));
        assert_eq!((rec.since, rec.last_seen), (1_000, 2_000));
    }

    #[test]
    fn a_late_upsert_of_a_displaced_session_changes_nothing() {
        let dev = ids().1;
        let newer = SessionRecord {
            replaced: Some(Box::new(session("s1"))),
            ..record("s2", 2_000)
        };
        let mut dict = only(&dev, newer.clone());
        let late = Change::Upsert(Box::new(record("s1", 3_000)));
        assert_eq!(apply(&mut dict, &dev, &late), Applied::Nothing);
        assert_eq!(dict[&dev], newer);
    }

    #[test]
    fn a_withdrawal_removes_keeps_or_announces_by_what_the_entry_holds() {
        let dev = ids().1;
        let withdraw = Change::Withdraw(Box::new(record("s1", 1_000)), 4_000);
        // Landed, and not heard after the leave: removed.
        let mut dict = only(&dev, record("s1", 3_000));
        assert_eq!(
            apply(&mut dict, &dev, &withdraw),
            Applied::Removed(record("s1", 3_000))
        );
        assert!(dict.is_empty());
        // Heard again after the leave: it stays, and has not left.
        let mut dict = only(&dev, record("s1", 5_000));
        assert_eq!(apply(&mut dict, &dev, &withdraw), Applied::Nothing);
        assert_eq!(dict[&dev], record("s1", 5_000));
        // Displaced by a newer session of the device, whose record names
        // it: the name may have been merged in by a write that announced
        // nothing, so the leave is announced here too.
        let newer = SessionRecord {
            replaced: Some(Box::new(session("s1"))),
            ..record("s2", 2_000)
        };
        let mut dict = only(&dev, newer.clone());
        assert_eq!(
            apply(&mut dict, &dev, &withdraw),
            Applied::Withdrawn(record("s1", 1_000))
        );
        assert_eq!(dict[&dev], newer);
        // Another session holds the entry, or nothing does: the add never
        // landed, and the leave is announced all the same.
        let mut dict = only(&dev, record("s2", 2_000));
        assert_eq!(
            apply(&mut dict, &dev, &withdraw),
            Applied::Withdrawn(record("s1", 1_000))
        );
        assert_eq!(dict[&dev], record("s2", 2_000));
        let mut dict = SessionDict::new();
        assert_eq!(
            apply(&mut dict, &dev, &withdraw),
            Applied::Withdrawn(record("s1", 1_000))
        );
    }

    #[test]
    fn devices_moving_on_take_no_second_place_in_a_nearly_full_account() {
        let a = ids().0;
        let hb = Heartbeat::default();
        let (mut d, mut kv) = lone();
        installed(
            &mut d,
            &mut kv,
            0,
            many(DICT_MAX_SESSIONS - 1, 9_000),
            9_000,
        );
        // Next interval: every session moves on (carry-overs pending).
        for i in 0..DICT_MAX_SESSIONS - 1 {
            let (dev, s) = (device(&format!("d{i}")), session(&format!("s{i}")));
            assert_ne!(
                d.on_heartbeat(&a, &dev, &s, &hb, 10_500),
                Decision::Full,
                "{dev}"
            );
        }
        // One place is left for a newcomer, and only one.
        assert_ne!(
            d.on_heartbeat(&a, &device("new"), &session("new"), &hb, 10_600),
            Decision::Full
        );
        assert_eq!(
            d.on_heartbeat(&a, &device("new2"), &session("new2"), &hb, 10_600),
            Decision::Full
        );
    }

    #[test]
    fn a_full_dictionary_refuses_even_a_carry_over() {
        let a = ids().0;
        let (mut d, mut kv) = lone();
        installed(&mut d, &mut kv, 0, many(1, 9_000), 9_000);
        // Other handlers' newcomers filled interval 1 before d0 moved on.
        let theirs: SessionDict = (0..DICT_MAX_SESSIONS)
            .map(|i| (device(&format!("n{i}")), record(&format!("n{i}"), 10_100)))
            .collect();
        installed(&mut d, &mut kv, 1, theirs, 10_100);
        d.on_heartbeat(
            &a,
            &device("d0"),
            &session("s0"),
            &Heartbeat::default(),
            10_500,
        );
        match d.take_for_write(&a, 1, 10_500) {
            Take::Unchanged { refused, .. } => assert_eq!(refused, 1),
            other => panic!("expected the carry-over refused, got {other:?}"),
        }
    }

    #[test]
    fn a_leave_in_the_same_write_makes_room_for_a_newcomer() {
        let a = ids().0;
        let hb = Heartbeat::default();
        let (mut d, mut kv) = lone();
        // The newcomer is queued before this handler's copy shows the
        // dictionary full (other handlers' writes).
        assert_eq!(
            d.on_heartbeat(&a, &device("new"), &session("new"), &hb, 1_000),
            Decision::Queued(vec![(a.clone(), 0)])
        );
        installed(&mut d, &mut kv, 0, many(DICT_MAX_SESSIONS, 1_000), 1_100);
        d.on_heartbeat(&a, &device("d2"), &session("s2"), &leave(), 1_200);
        let w = write_of(d.take_for_write(&a, 0, 1_200));
        assert_eq!(w.refused(), 0);
        assert_eq!(w.value().len(), DICT_MAX_SESSIONS);
        assert!(w.value().contains_key(&device("new")));
        assert!(!w.value().contains_key(&device("d2")));
        let rev = kv.update(&a, 0, &w).expect("lands");
        let written = d.on_written(&a, 0, w, rev, 1_200);
        assert_eq!(
            events(&written.applied),
            (vec!["new".into()], vec!["s2".into()])
        );
    }

    #[test]
    fn a_carry_over_writes_its_heartbeats_labels_over_a_changed_record() {
        let (a, dev, s) = ids();
        let (mut d, mut kv) = lone();
        d.on_heartbeat(&a, &dev, &s, &content("film"), 9_000);
        flush(&mut d, &mut kv, 9_000);
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s, &content("film"), 10_500),
            Decision::Deferred(vec![(a.clone(), 1)])
        );
        // Before the carry-over is taken, another handler's write of an
        // earlier heartbeat shows other labels in interval 0.
        let theirs = only(
            &dev,
            SessionRecord {
                last_seen: 10_400,
                ..labelled("s1", 9_000, "news")
            },
        );
        installed(&mut d, &mut kv, 0, theirs, 10_600);
        let w = write_of(d.take_for_write(&a, 1, 11_500));
        let rec = &w.value()[&dev];
        assert_eq!(rec.labels.content(), Some("film"), "the newest heartbeat's");
        assert_eq!((rec.since, rec.last_seen), (9_000, 10_500));
    }

    #[test]
    fn a_previous_dictionary_nothing_moved_from_is_not_trimmed() {
        let a = ids().0;
        let (mut d, mut kv) = lived(&[9_000]);
        // A newcomer in interval 1; the session of interval 0 has not
        // moved on yet.
        beat(&mut d, &mut kv, &device("tv2"), &session("s2"), 10_500);
        assert!(!d.get_mut(&a, 0).expect("previous").partial);
        // Its leave is written at once, without reading the copy again.
        d.on_heartbeat(&a, &ids().1, &ids().2, &leave(), 10_600);
        let w = write_of(d.take_for_write(&a, 0, 10_600));
        assert!(w.value().is_empty());
    }

    #[test]
    fn the_session_count_counts_every_live_device_once() {
        let a = ids().0;
        let (mut d, mut kv) = lone();
        assert_eq!(d.session_count(1_000), 0);
        beat(&mut d, &mut kv, &device("d1"), &session("s1"), 1_000);
        beat(&mut d, &mut kv, &device("d2"), &session("s2"), 1_000);
        assert_eq!(d.session_count(1_000), 2);
        // d1 moved on to interval 1, d2 not yet: each counted once.
        beat(&mut d, &mut kv, &device("d1"), &session("s1"), 10_500);
        assert_eq!(d.session_count(10_600), 2);
        assert!(d.get_mut(&a, 1).is_some());
    }

    #[test]
    fn a_session_whose_first_write_is_still_pending_is_carried_not_joined() {
        let (a, dev, s) = ids();
        let (mut d, _) = lone();
        let hb = Heartbeat::default();
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s, &hb, 9_900),
            Decision::Queued(vec![(a.clone(), 0)])
        );
        // The next interval begins before that write is taken.
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s, &hb, 10_100),
            Decision::Deferred(vec![(a.clone(), 1)])
        );
        // Interval 1 is written first: it records the session itself
        // (there is nothing in interval 0's copy to carry yet), and its
        // arrival is not a join: interval 0's write announces that.
        let w = write_of(d.take_for_write(&a, 1, 10_100));
        assert_eq!(w.value()[&dev].session, s);
        assert_eq!(w.value()[&dev].since, 9_900);
        assert_eq!(events(&w.applied), (Vec::new(), Vec::new()));
    }

    #[test]
    fn the_dictionary_a_pending_carry_over_copies_from_is_kept() {
        let (a, dev, s) = ids();
        let (mut d, mut kv) = lived(&[9_000]);
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s, &Heartbeat::default(), 10_500),
            Decision::Deferred(vec![(a.clone(), 1)])
        );
        // Interval 2 begins before the carry-over is written.
        d.prune(20_100);
        assert!(
            d.get_mut(&a, 0).is_some(),
            "interval 1 still copies from it"
        );
        let w = write_of(d.take_for_write(&a, 1, 20_100));
        assert_eq!(w.value()[&dev].last_seen, 10_500);
        let rev = kv.update(&a, 1, &w).expect("lands");
        let _ = d.on_written(&a, 1, w, rev, 20_100);
        // Once nothing is pending, the old one goes when it is no longer
        // the dictionary just before the live ones either.
        d.prune(30_100);
        assert!(d.get_mut(&a, 0).is_none());
        assert!(d.get_mut(&a, 1).is_some());
    }

    #[test]
    fn the_fast_path_knows_a_recorded_session_and_defers_to_pending_changes() {
        let (a, dev, s) = ids();
        let (mut d, mut kv) = lived(&[1_000]);
        let plain = HeartbeatRef::default();
        assert!(d.unchanged(a.as_str(), dev.as_str(), s.as_str(), &plain, 2_000));
        // New labels, queued but not written: the fast path does not
        // answer for the device until they are.
        d.on_heartbeat(&a, &dev, &s, &content("film"), 2_100);
        assert!(!d.unchanged(a.as_str(), dev.as_str(), s.as_str(), &plain, 2_200));
        flush(&mut d, &mut kv, 2_200);
        let film = HeartbeatRef {
            content: Some("film"),
            ..Default::default()
        };
        assert!(d.unchanged(a.as_str(), dev.as_str(), s.as_str(), &film, 2_300));
        assert!(!d.unchanged(a.as_str(), dev.as_str(), s.as_str(), &plain, 2_300));
    }

    #[test]
    fn a_pending_write_carries_the_newest_heartbeats_time() {
        let (a, dev, s) = ids();
        let (mut d, mut kv) = lone();
        let hb = Heartbeat::default();
        d.on_heartbeat(&a, &dev, &s, &hb, 1_000);
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s, &hb, 2_000),
            Decision::Unchanged
        );
        flush(&mut d, &mut kv, 2_000);
        assert_eq!(kv.read(&a, 0).1[&dev].last_seen, 2_000);
    }

    #[test]
    fn a_pending_write_takes_the_labels_of_the_newest_heartbeat() {
        let (a, dev, s) = ids();
        let (mut d, mut kv) = lived(&[1_000]);
        // New labels, queued...
        d.on_heartbeat(&a, &dev, &s, &content("news"), 2_000);
        // ...when another handler's write of a later heartbeat lands,
        // back on the old ones.
        let theirs = only(
            &dev,
            SessionRecord {
                last_seen: 2_500,
                ..labelled("s1", 1_000, "film")
            },
        );
        installed(&mut d, &mut kv, 0, theirs, 2_500);
        // This heartbeat says film too: the pending write must not bring
        // news back.
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s, &content("film"), 3_000),
            Decision::Unchanged
        );
        flush(&mut d, &mut kv, 3_000);
        let rec = &kv.read(&a, 0).1[&dev];
        assert_eq!(rec.labels.content(), Some("film"));
        assert_eq!(rec.last_seen, 3_000);
    }

    #[test]
    fn labels_changed_back_during_a_write_are_written_after_it() {
        let (a, dev, s) = ids();
        let (mut d, mut kv) = lived(&[1_000]);
        d.on_heartbeat(&a, &dev, &s, &content("film"), 2_000);
        let w = write_of(d.take_for_write(&a, 0, 2_000));
        // Back to no labels while the write of film is under way.
        assert_eq!(
            d.on_heartbeat(&a, &dev, &s, &Heartbeat::default(), 2_100),
            Decision::Queued(Vec::new()),
            "written once the write under way ends"
        );
        let rev = kv.update(&a, 0, &w).expect("lands");
        assert!(d.on_written(&a, 0, w, rev, 2_200).more);
        flush(&mut d, &mut kv, 2_200);
        assert_eq!(kv.read(&a, 0).1[&dev].labels.content(), None);
    }

    #[test]
    fn a_heartbeat_during_a_carry_write_is_written_after_it() {
        let (a, dev, s) = ids();
        let (mut d, mut kv) = lived(&[9_000]);
        d.on_heartbeat(&a, &dev, &s, &Heartbeat::default(), 10_500);
        let w = write_of(d.take_for_write(&a, 1, 10_500));
        // Heard again while the carry-over is under way: once it lands,
        // interval 0's copy is trimmed of the session, so this heartbeat
        // cannot be a carry-over from it.
        d.on_heartbeat(&a, &dev, &s, &Heartbeat::default(), 10_700);
        let rev = kv.update(&a, 1, &w).expect("lands");
        let _ = d.on_written(&a, 1, w, rev, 10_700);
        // Moved on: held once, in interval 1, from the moment it landed.
        let old = d.get_mut(&a, 0).expect("previous dictionary");
        assert!(old.partial && !old.entries.contains_key(&dev));
        flush(&mut d, &mut kv, 10_800);
        assert_eq!(kv.read(&a, 1).1[&dev].last_seen, 10_700);
    }

    #[test]
    fn a_leave_displaced_by_the_devices_next_session_is_announced_once() {
        let (a, dev, s) = ids();
        let (mut d, mut kv) = lived(&[1_000, 10_500]);
        d.trim(&a, 10_600);
        // The leave: a quiet removal from the trimmed interval 0, the
        // announced one from interval 1...
        d.on_heartbeat(&a, &dev, &s, &leave(), 10_700);
        // ...which the device's next session displaces before it is
        // written: the leave is still announced, once.
        let s2 = session("s2");
        d.on_heartbeat(&a, &dev, &s2, &Heartbeat::default(), 10_800);
        let old = d.get_mut(&a, 0).expect("previous dictionary");
        assert!(old.pending().contains_key(&dev), "{:?}", old.pending());
        let applied = flush(&mut d, &mut kv, 10_800);
        assert_eq!(events(&applied).1, ["s1"]);
        assert_eq!(kv.read(&a, 1).1[&dev].session, s2);
        assert!(kv.read(&a, 0).1.is_empty());
    }

    #[test]
    fn an_owed_leave_does_not_take_over_another_sessions_quiet_removal() {
        let (a, dev, _) = ids();
        let (s0, s1, s2) = (session("s0"), session("s1"), session("s2"));
        let (mut d, mut kv) = lone();
        beat(&mut d, &mut kv, &dev, &s0, 9_000);
        // s1 replaces s0 on the device in interval 1; s0 is then ended.
        beat(&mut d, &mut kv, &dev, &s1, 10_500);
        d.ended(&a, &dev, &s0, 10_550, 10_600);
        let quiet = Change::Forget(s0.clone(), UnixMillis::MAX);
        assert_eq!(d.get_mut(&a, 0).unwrap().pending().get(&dev), Some(&quiet));
        // s1 leaves, and the device's next session displaces that leave.
        d.on_heartbeat(&a, &dev, &s1, &leave(), 10_700);
        d.on_heartbeat(&a, &dev, &s2, &Heartbeat::default(), 10_800);
        assert_eq!(
            d.get_mut(&a, 0).unwrap().pending().get(&dev),
            Some(&quiet),
            "s0's removal is still s0's"
        );
        flush(&mut d, &mut kv, 10_800);
        assert!(kv.read(&a, 0).1.is_empty(), "s0 is gone");
        assert_eq!(kv.read(&a, 1).1[&dev].session, s2);
    }

    #[test]
    fn a_leave_overwritten_by_a_quiet_removal_in_a_trimmed_copy_is_still_announced() {
        let a = ids().0;
        let (x, y) = (device("x"), device("y"));
        let (s_old, s, sy) = (session("s_old"), session("s"), session("sy"));
        let (mut d, mut kv) = lone();
        beat(&mut d, &mut kv, &y, &sy, 9_000);
        beat(&mut d, &mut kv, &x, &s_old, 9_000);
        // y moves on: interval 0's copy is trimmed.
        beat(&mut d, &mut kv, &y, &sy, 10_500);
        assert!(d.get_mut(&a, 0).unwrap().partial);
        // x's s_old leaves (its removal waits in interval 0), and x's next
        // session joins interval 1 and is written there.
        d.on_heartbeat(&a, &x, &s_old, &leave(), 10_600);
        d.on_heartbeat(&a, &x, &s, &Heartbeat::default(), 10_700);
        let w = write_of(d.take_for_write(&a, 1, 10_700));
        let rev = kv.update(&a, 1, &w).expect("lands");
        let _ = d.on_written(&a, 1, w, rev, 10_700);
        // s leaves too: its quiet removal from the trimmed interval 0
        // takes the place of s_old's, whose leave is still owed.
        d.on_heartbeat(&a, &x, &s, &leave(), 10_800);
        let applied = flush(&mut d, &mut kv, 10_800);
        let mut leaves = events(&applied).1;
        leaves.sort();
        assert_eq!(leaves, ["s", "s_old"]);
        assert!(!kv.read(&a, 0).1.contains_key(&x));
    }

    #[test]
    fn a_device_both_under_way_and_pending_takes_one_place() {
        let a = ids().0;
        let (mut d, mut kv) = lone();
        installed(
            &mut d,
            &mut kv,
            0,
            many(DICT_MAX_SESSIONS - 2, 1_000),
            1_000,
        );
        let n0 = device("n0");
        d.on_heartbeat(&a, &n0, &session("n0"), &Heartbeat::default(), 1_100);
        let _w = write_of(d.take_for_write(&a, 0, 1_100));
        // New labels while its first write is under way: pending too.
        assert_eq!(
            d.on_heartbeat(&a, &n0, &session("n0"), &content("film"), 1_200),
            Decision::Queued(Vec::new())
        );
        // One place is left.
        assert_ne!(
            d.on_heartbeat(
                &a,
                &device("n1"),
                &session("n1"),
                &Heartbeat::default(),
                1_300
            ),
            Decision::Full
        );
        assert_eq!(
            d.on_heartbeat(
                &a,
                &device("n2"),
                &session("n2"),
                &Heartbeat::default(),
                1_300
            ),
            Decision::Full
        );
    }

    #[test]
    fn a_device_whose_first_write_is_under_way_takes_its_place() {
        let a = ids().0;
        let (mut d, mut kv) = lone();
        installed(
            &mut d,
            &mut kv,
            0,
            many(DICT_MAX_SESSIONS - 1, 1_000),
            1_000,
        );
        d.on_heartbeat(
            &a,
            &device("n0"),
            &session("n0"),
            &Heartbeat::default(),
            1_100,
        );
        let _w = write_of(d.take_for_write(&a, 0, 1_100));
        assert_eq!(
            d.on_heartbeat(
                &a,
                &device("n1"),
                &session("n1"),
                &Heartbeat::default(),
                1_200
            ),
            Decision::Full
        );
    }

    /// Interval 0 of acme holding `DICT_MAX_SESSIONS - 1` sessions, `d0`'s
    /// with new labels queued at 9.5 s, and taken for a write (under way)
    /// when `taken`.
    fn nearly_full_with_a_change(taken: bool) -> Dicts {
        let a = ids().0;
        let (mut d, mut kv) = lone();
        installed(
            &mut d,
            &mut kv,
            0,
            many(DICT_MAX_SESSIONS - 1, 9_000),
            9_000,
        );
        d.on_heartbeat(&a, &device("d0"), &session("s0"), &content("film"), 9_500);
        if taken {
            let _under_way = write_of(d.take_for_write(&a, 0, 9_500));
        }
        d
    }

    #[test]
    fn a_change_of_a_previous_intervals_device_takes_no_second_place() {
        let a = ids().0;
        let hb = Heartbeat::default();
        for taken in [false, true] {
            let mut d = nearly_full_with_a_change(taken);
            // Next interval: room for one newcomer, not two.
            assert_ne!(
                d.on_heartbeat(&a, &device("n1"), &session("n1"), &hb, 10_500),
                Decision::Full,
                "taken: {taken}"
            );
            assert_eq!(
                d.on_heartbeat(&a, &device("n2"), &session("n2"), &hb, 10_500),
                Decision::Full,
                "taken: {taken}"
            );
        }
    }

    #[test]
    fn a_previous_intervals_device_whose_first_write_is_under_way_takes_its_place() {
        let a = ids().0;
        let hb = Heartbeat::default();
        let (mut d, mut kv) = lone();
        installed(
            &mut d,
            &mut kv,
            0,
            many(DICT_MAX_SESSIONS - 1, 9_000),
            9_000,
        );
        d.on_heartbeat(&a, &device("n0"), &session("n0"), &hb, 9_500);
        let _under_way = write_of(d.take_for_write(&a, 0, 9_500));
        assert_eq!(
            d.on_heartbeat(&a, &device("n1"), &session("n1"), &hb, 10_500),
            Decision::Full
        );
    }

    #[test]
    fn an_owed_leave_goes_before_the_devices_pending_change_in_its_entry_to_be() {
        // s1's leave is pending when the device's next session s2 is heard:
        // the leave is owed, written before s2's change. The entry the
        // device will hold is that write's: s2, not naming s1 as displaced.
        let (a, tv, s1) = ids();
        let (mut d, _) = lived(&[1_000]);
        d.on_heartbeat(&a, &tv, &s1, &leave(), 2_000);
        d.on_heartbeat(&a, &tv, &session("s2"), &Heartbeat::default(), 2_100);
        let dict = d.get_mut(&a, 0).expect("dictionary");
        assert!(dict.owed().contains_key(&s1), "{:?}", dict.owed());
        let to_be = dict.effective(&tv, None).expect("an entry");
        assert_eq!((to_be.session.as_str(), &to_be.replaced), ("s2", &None));
        let w = write_of(d.take_for_write(&a, 0, 2_200));
        assert_eq!(w.value().get(&tv), Some(&to_be));
        assert_eq!(events(&w.applied), (vec!["s2".into()], vec!["s1".into()]));
    }

    #[test]
    fn a_leave_voided_by_its_session_heard_again_is_not_told_by_a_later_ending() {
        // s2's leave waits for a copy showing it (this one shows the
        // device's ended s1, whose quiet removal is pending). s2 is heard
        // again well after: it joins, and the leave is void, no removal of
        // it being on its way. s2 is then ended: its removal is quiet, also
        // where a lagging write shows it again.
        let (a, tv, _) = ids();
        let (s1, s2) = (session("s1"), session("s2"));
        let (mut d, mut kv) = lived(&[1_000]);
        d.ended(&a, &tv, &s1, 1_100, 1_100);
        assert_eq!(
            d.on_heartbeat(&a, &tv, &s2, &leave(), 1_200),
            Decision::Unchanged
        );
        beat(&mut d, &mut kv, &tv, &s2, 5_000);
        assert_eq!(kv.read(&a, 0).1[&tv].session, s2);
        d.ended(&a, &tv, &s2, 6_000, 6_000);
        assert!(flush(&mut d, &mut kv, 6_000).is_empty());
        assert!(kv.read(&a, 0).1.is_empty());
        let lagging = only(&tv, record("s2", 5_000));
        let rev = kv.put(&a, 0, lagging.clone());
        assert_eq!(
            d.install(&a, 0, rev, lagging, 6_500),
            Decision::Deferred(vec![(a.clone(), 0)])
        );
        let told = flush(&mut d, &mut kv, 6_500);
        assert_eq!(events(&told), (vec![], vec![]), "{told:?}");
        assert!(kv.read(&a, 0).1.is_empty());
    }

    #[test]
    fn a_session_started_with_an_older_write_not_landed_is_not_taken_for_the_newer() {
        // s1's write is pending; the copy shows the device's s2, whose
        // record started at the same time. Nothing orders the two: s1's
        // write stands, and a heartbeat of s2 is a displaced session's.
        let (a, tv, s1) = ids();
        let (mut d, mut kv) = lone();
        d.on_heartbeat(&a, &tv, &s1, &Heartbeat::default(), 2_000);
        installed(&mut d, &mut kv, 0, only(&tv, record("s2", 2_000)), 2_100);
        assert_eq!(
            d.on_heartbeat(&a, &tv, &session("s2"), &Heartbeat::default(), 2_200),
            Decision::Superseded
        );
    }

    #[test]
    fn a_session_heard_again_after_its_owed_leave_voids_it() {
        // s1's leave is owed behind the device's next session s2, and s1 is
        // heard again well after it: s1 stays, with its start, and no leave
        // of it is told.
        let (a, tv, s1) = ids();
        let (mut d, mut kv) = lived(&[1_000]);
        d.on_heartbeat(&a, &tv, &s1, &leave(), 2_000);
        d.on_heartbeat(&a, &tv, &session("s2"), &Heartbeat::default(), 2_100);
        assert!(
            d.get_mut(&a, 0)
                .expect("dictionary")
                .owed()
                .contains_key(&s1)
        );
        d.on_heartbeat(&a, &tv, &s1, &Heartbeat::default(), 6_000);
        let told = flush(&mut d, &mut kv, 6_000);
        assert_eq!(events(&told).1, Vec::<String>::new(), "{told:?}");
        let rec = &kv.read(&a, 0).1[&tv];
        assert_eq!(
            (&rec.session, rec.since, rec.last_seen),
            (&s1, 1_000, 6_000)
        );
    }

    #[test]
    fn a_removal_behind_a_due_change_of_the_devices_next_session_rides_along() {
        // s2's change is due when s1 leaves, or is ended: its removal is
        // owed before that change, and the flush already due writes it
        // (nothing else to flush). A leave is told, an ending is not.
        for leaves in [true, false] {
            let (a, tv, s1) = ids();
            let (mut d, mut kv) = lived(&[1_000]);
            assert_eq!(
                d.on_heartbeat(&a, &tv, &session("s2"), &Heartbeat::default(), 2_000),
                Decision::Queued(vec![(a.clone(), 0)])
            );
            let decision = if leaves {
                d.on_heartbeat(&a, &tv, &s1, &leave(), 2_100)
            } else {
                d.ended(&a, &tv, &s1, 2_100, 2_100)
            };
            assert_eq!(decision, Decision::Unchanged, "leaves: {leaves}");
            let told = flush(&mut d, &mut kv, 2_100);
            let left: Vec<String> = if leaves { vec!["s1".into()] } else { vec![] };
            assert_eq!(events(&told), (vec!["s2".into()], left), "{told:?}");
            assert!(replaced_of(&told).is_empty(), "{told:?}");
        }
    }

    #[test]
    fn a_leave_in_a_write_that_did_not_land_is_owed_behind_the_devices_next_session() {
        // s1's removal is under way when the device's next session s2 is
        // heard; the write does not land. The removal is owed, written
        // before s2's change, and tells the leave: s2 does not displace s1.
        let (a, tv, s1) = ids();
        let (mut d, mut kv) = lived(&[1_000]);
        d.on_heartbeat(&a, &tv, &s1, &leave(), 2_000);
        let w = write_of(d.take_for_write(&a, 0, 2_000));
        d.on_heartbeat(&a, &tv, &session("s2"), &Heartbeat::default(), 2_100);
        let mut theirs = kv.read(&a, 0).1;
        theirs.insert(device("radio"), record("s9", 2_050));
        kv.put(&a, 0, theirs);
        assert!(kv.update(&a, 0, &w).is_none());
        d.on_conflict(&a, 0, w, Some(kv.read(&a, 0)));
        let told = flush(&mut d, &mut kv, 2_200);
        assert_eq!(
            events(&told),
            (vec!["s2".into()], vec!["s1".into()]),
            "{told:?}"
        );
        assert!(replaced_of(&told).is_empty(), "{told:?}");
        assert_eq!(
            held(&kv.read(&a, 0).1),
            [pair("radio", "s9"), pair("tv", "s2")]
        );
    }

    #[test]
    fn a_previous_dictionary_with_a_change_pending_is_not_trimmed() {
        // tv's session moves on while radio's leave waits to be written in
        // interval 0: that copy stays whole, and its write needs no read.
        let (a, tv, s1) = ids();
        let (radio, s2) = (device("radio"), session("s2"));
        let (mut d, mut kv) = lived(&[9_000]);
        beat(&mut d, &mut kv, &radio, &s2, 9_000);
        d.on_heartbeat(&a, &radio, &s2, &leave(), 10_500);
        d.on_heartbeat(&a, &tv, &s1, &Heartbeat::default(), 10_500);
        let _ = write_once(&mut d, &mut kv, 1, 10_600);
        assert_eq!(held(&kv.read(&a, 1).1), [pair("tv", "s1")]);
        let old = d.get_mut(&a, 0).expect("previous dictionary");
        assert!(!old.partial);
        let w = write_of(d.take_for_write(&a, 0, 10_600));
        assert_eq!(held(w.value()), [pair("tv", "s1")]);
    }

    #[test]
    fn a_trimmed_copy_gets_the_quiet_removal_of_its_trimmed_sessions_only() {
        // Interval 0's copy is trimmed of tv's session, which moved on. A
        // leave of radio's session, only ever in interval 1, is written
        // there alone.
        let a = ids().0;
        let (radio, s2) = (device("radio"), session("s2"));
        let (mut d, mut kv) = lived(&[1_000, 10_500]);
        assert!(d.get_mut(&a, 0).expect("previous dictionary").partial);
        beat(&mut d, &mut kv, &radio, &s2, 10_600);
        assert_eq!(
            d.on_heartbeat(&a, &radio, &s2, &leave(), 10_700),
            Decision::Queued(vec![(a.clone(), 1)])
        );
        assert!(!d.get_mut(&a, 0).expect("previous dictionary").waiting());
    }

    #[test]
    fn the_dictionary_a_pending_carry_over_copies_from_tells_a_later_arrival_is_no_join() {
        // The session's carry into interval 1 is still pending (the store
        // kept failing) when it is heard in interval 2 and, in interval 3,
        // that write is taken: interval 0, no longer live, is kept for
        // interval 1's carry-over, which makes the arrival in interval 2 no
        // join (interval 0's write announced it).
        let (a, tv, s1) = ids();
        let (mut d, _) = lived(&[9_000]);
        let hb = Heartbeat::default();
        assert_eq!(
            d.on_heartbeat(&a, &tv, &s1, &hb, 10_500),
            Decision::Deferred(vec![(a.clone(), 1)])
        );
        assert_eq!(
            d.on_heartbeat(&a, &tv, &s1, &hb, 20_500),
            Decision::Queued(vec![(a.clone(), 2)])
        );
        d.prune(30_100);
        assert!(
            d.get_mut(&a, 0).is_some(),
            "interval 1 still copies from it"
        );
        let w = write_of(d.take_for_write(&a, 2, 30_100));
        assert_eq!(w.value()[&tv].session, s1);
        assert_eq!(events(&w.applied), (vec![], vec![]), "{:?}", w.applied);
    }

    #[test]
    fn a_newer_sessions_heartbeat_takes_over_an_older_sessions_carry_in_the_previous_interval() {
        // s1's carry into interval 1 is pending when the copy there shows
        // the device's s2, which started later. In interval 2, s2's
        // heartbeat takes the carry's place (due now) and moves s2 on: both
        // dictionaries are to flush, and s2 stays in both, displacing no one.
        let (a, tv, s1) = ids();
        let s2 = session("s2");
        let hb = Heartbeat::default();
        let (mut d, mut kv) = lived(&[9_000]);
        assert_eq!(
            d.on_heartbeat(&a, &tv, &s1, &hb, 10_500),
            Decision::Deferred(vec![(a.clone(), 1)])
        );
        installed(&mut d, &mut kv, 1, only(&tv, record("s2", 12_000)), 12_100);
        assert_eq!(
            d.on_heartbeat(&a, &tv, &s2, &hb, 20_500),
            Decision::Queued(vec![(a.clone(), 1), (a.clone(), 2)])
        );
        let told = flush(&mut d, &mut kv, 20_600);
        assert!(replaced_of(&told).is_empty(), "{told:?}");
        assert_eq!(kv.read(&a, 1).1[&tv].session, s2);
        assert_eq!(kv.read(&a, 2).1[&tv].session, s2);
    }

    #[test]
    fn a_session_heard_again_during_a_write_is_not_removed_by_its_voided_leave() {
        // The leave waits for a copy showing the session, and it is heard
        // again well after, while a write is under way (which might carry a
        // removal of it): what the leave waited for stays only to tell it.
        // A write from before the leave, landing later, is left be.
        let (a, tv, s) = ids();
        let hb = Heartbeat::default();
        let (mut d, mut kv) = lone();
        d.on_heartbeat(&a, &device("radio"), &session("s9"), &hb, 10_500);
        let w = write_of(d.take_for_write(&a, 1, 10_500));
        assert_eq!(
            d.on_heartbeat(&a, &tv, &s, &leave(), 10_600),
            Decision::Unchanged
        );
        d.on_heartbeat(&a, &tv, &s, &hb, 15_000);
        let before = only(&tv, record("s1", 9_000));
        let rev = kv.put(&a, 0, before.clone());
        assert_eq!(d.install(&a, 0, rev, before, 15_100), Decision::Unchanged);
        let rev = kv.update(&a, 1, &w).expect("lands");
        let mut told = d.on_written(&a, 1, w, rev, 15_200).applied;
        told.extend(flush(&mut d, &mut kv, 15_200));
        assert_eq!(events(&told).1, Vec::<String>::new(), "{told:?}");
        assert_eq!(kv.read(&a, 0).1[&tv].session, s);
        assert_eq!(kv.read(&a, 1).1[&tv].session, s);
    }

    #[test]
    fn an_ended_session_whose_add_has_not_landed_is_forgotten_quietly() {
        // Its add pending, or under way: the ending queues a quiet removal
        // (told by whoever ended it), and a leave the session sends after
        // it is not told either.
        for under_way in [false, true] {
            let (a, tv, s) = ids();
            let (mut d, mut kv) = lone();
            d.on_heartbeat(&a, &tv, &s, &Heartbeat::default(), 1_000);
            let w = under_way.then(|| write_of(d.take_for_write(&a, 0, 1_000)));
            d.ended(&a, &tv, &s, 1_100, 1_100);
            assert_eq!(
                d.get_mut(&a, 0).expect("dictionary").pending().get(&tv),
                Some(&Change::Forget(s.clone(), UnixMillis::MAX)),
                "under way: {under_way}"
            );
            d.on_heartbeat(&a, &tv, &s, &leave(), 1_200);
            let mut told = Vec::new();
            if let Some(w) = w {
                let rev = kv.update(&a, 0, &w).expect("lands");
                told.extend(d.on_written(&a, 0, w, rev, 1_300).applied);
            }
            told.extend(flush(&mut d, &mut kv, 1_300));
            let joined: Vec<String> = if under_way { vec!["s1".into()] } else { vec![] };
            assert_eq!(events(&told), (joined, vec![]), "{told:?}");
            assert!(kv.read(&a, 0).1.is_empty());
        }
    }

    #[test]
    fn only_a_leave_no_live_dictionary_holds_reaches_the_dictionary_before_them() {
        // Interval 0, before the live ones, holds tv's s1. Its removal
        // there is for a leave of s1 that no live dictionary holds: not
        // when the copy of interval 1 shows s1 (removed there), not for an
        // ending, not for a leave of another session of the device.
        let (a, tv, s1) = ids();
        let (mut d, mut kv) = moved_unseen();
        let moved = only(&tv, record("s1", 10_500));
        let rev = kv.put(&a, 1, moved.clone());
        let _ = d.install(&a, 1, rev, moved, 20_550);
        assert_eq!(
            d.on_heartbeat(&a, &tv, &s1, &leave(), 20_600),
            Decision::Queued(vec![(a.clone(), 1)])
        );
        let (mut d, _) = moved_unseen();
        assert_eq!(d.ended(&a, &tv, &s1, 20_600, 20_600), Decision::Unchanged);
        assert!(!d.has_pending());
        let (mut d, _) = moved_unseen();
        assert_eq!(
            d.on_heartbeat(&a, &tv, &session("s2"), &leave(), 20_600),
            Decision::Unchanged
        );
        assert!(!d.has_pending());
    }
}
