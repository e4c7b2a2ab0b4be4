//! The checker's in-memory view of every account, and the limit rules.
//!
//! Pure data, no I/O. Sessions come from the interval dictionaries (as the KV
//! watch delivers them), liveness from the heartbeats this checker sees, and
//! revocations from the revoked bucket. A session is active when a live
//! dictionary holds it, it is not revoked, and it was heard from within the
//! timeout.
//!
//! Clocks: handlers and checkers run on different hosts. The live
//! dictionaries are those of the previous, current and next interval by this
//! checker's clock ([`IntervalClock::readable_intervals`]), so a session is
//! counted, checked and enforced alike while the clock of the handler that
//! wrote it is ahead of this checker's by less than one interval, or behind
//! it by less than one interval minus the handler's carry delay (and the
//! time its write takes to land). Timeouts run on this checker's clock from
//! the later of the heartbeat it last heard itself and the record's
//! `last_seen`, which is the handler's clock: a handler behind cannot time a
//! session out early while this checker hears its heartbeats, and one ahead
//! by `d` can keep a session that stopped just after a write active for up
//! to `d` longer. Who is oldest compares `since` values that different
//! handlers' clocks wrote. The start-up grace, grace periods and peaks use
//! this checker's clock alone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::RangeInclusive;

use headcount_protocol::wire::{ActiveSession, Labels, SessionRecord, SessionRef};
use headcount_protocol::{
    AccountId, AccountLimits, ByDevice, ByInterval, DeviceId, IntervalClock, Limit, Plans, Policy,
    SessionId, UnixMillis,
};

use crate::early::Early;
use crate::victims::choose;

/// Liveness and limit defaults.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub clock: IntervalClock,
    /// A session not heard from for this long is out.
    pub timeout_ms: u64,
    pub default_limit: Limit,
}

/// How many sessions heard before their dictionary one shard keeps.
const EARLY_CAPACITY: usize = 16_384;

/// How long per-minute peaks are kept for `stats`.
pub const PEAK_WINDOW_MINUTES: u64 = 15;

/// A session as an interval dictionary records it, and when this checker
/// last heard its heartbeat (0: not yet).
#[derive(Debug, Clone)]
struct Seen {
    rec: Rec,
    heard: UnixMillis,
}

/// What the checker keeps of a [`SessionRecord`]: all of it but the
/// session it displaced, which only the handler reads (a million sessions
/// held, each id kept counts).
#[derive(Debug, Clone)]
struct Rec {
    session: SessionId,
    since: UnixMillis,
    last_seen: UnixMillis,
    labels: Labels,
}

impl From<SessionRecord> for Rec {
    fn from(r: SessionRecord) -> Self {
        Rec {
            session: r.session,
            since: r.since,
            last_seen: r.last_seen,
            labels: r.labels,
        }
    }
}

impl Seen {
    /// The session's best-known last sign of life.
    fn last_seen(&self) -> UnixMillis {
        self.rec.last_seen.max(self.heard)
    }
}

/// One interval dictionary as this checker holds it: compact, one slot per
/// device (a million sessions held, each byte counts).
type Dict = ByDevice<Seen>;

/// The highest count of each of the last [`PEAK_WINDOW_MINUTES`] minutes, in
/// a ring (no allocation: there is one per account).
#[derive(Debug, Clone, Default)]
pub struct Peaks {
    /// The newest minute recorded.
    minute: u64,
    counts: [u32; PEAK_WINDOW_MINUTES as usize],
}

impl Peaks {
    pub fn record(&mut self, minute: u64, n: u32) {
        let len = self.counts.len() as u64;
        if minute > self.minute {
            // Clear the minutes skipped since the newest one.
            for m in (self.minute + 1)..=minute.min(self.minute + len) {
                self.counts[(m % len) as usize] = 0;
            }
            self.minute = minute;
        } else if self.minute - minute >= len {
            return;
        }
        let slot = &mut self.counts[(minute % len) as usize];
        *slot = (*slot).max(n);
    }

    /// The highest count within the window.
    pub fn max(&self) -> u32 {
        self.counts.iter().copied().max().unwrap_or(0)
    }

    /// Adds `other`'s counts to these, minute by minute (the peaks of two
    /// partitions make the peak of both: an upper bound, as each minute's
    /// highest counts need not have been at the same moment).
    pub fn add(&mut self, other: &Peaks) {
        let len = self.counts.len() as u64;
        // Both windows end at the newer of the two minutes.
        let newest = self.minute.max(other.minute);
        self.record(newest, 0);
        for back in 0..len {
            let Some(m) = other.minute.checked_sub(back) else {
                break;
            };
            if newest - m >= len {
                break;
            }
            let n = other.counts[(m % len) as usize];
            self.counts[(m % len) as usize] += n;
        }
    }

    /// The newest minute and the counts of the window, newest first.
    pub fn to_wire(&self) -> (u64, Vec<u32>) {
        let len = self.counts.len() as u64;
        let counts = (0..len)
            .map_while(|back| self.minute.checked_sub(back))
            .map(|m| self.counts[(m % len) as usize])
            .collect();
        (self.minute, counts)
    }

    /// The peaks [`Peaks::to_wire`] wrote.
    pub fn from_wire(minute: u64, counts: &[u32]) -> Self {
        let mut peaks = Peaks::default();
        for (back, &n) in counts.iter().enumerate().take(PEAK_WINDOW_MINUTES as usize) {
            if let Some(m) = minute.checked_sub(back as u64) {
                peaks.record(m, n);
            }
        }
        peaks
    }
}

/// Sessions of one account already announced as timed out: almost always
/// none, so a pointer, not an empty set, in every account.
#[derive(Debug, Default)]
#[expect(
    clippy::box_collection,
    reason = "the box is the point: 8 bytes in every account, not an empty set's 48"
)]
struct TimedOut(Option<Box<HashSet<SessionId>>>);

impl TimedOut {
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|s| s.is_empty())
    }

    fn contains(&self, session: &str) -> bool {
        self.0.as_ref().is_some_and(|s| s.contains(session))
    }

    fn insert(&mut self, session: SessionId) {
        self.0.get_or_insert_default().insert(session);
    }

    /// Whether it held `session`.
    fn remove(&mut self, session: &str) -> bool {
        let Some(set) = &mut self.0 else {
            return false;
        };
        let held = set.remove(session);
        if set.is_empty() {
            self.0 = None;
        }
        held
    }

    fn retain(&mut self, keep: impl FnMut(&SessionId) -> bool) {
        if let Some(set) = &mut self.0 {
            set.retain(keep);
            if set.is_empty() {
                self.0 = None;
            }
        }
    }
}

#[derive(Debug, Default)]
struct Account {
    dicts: ByInterval<Dict>,
    /// What an operator stored for this account.
    overrides: Option<Box<AccountLimits>>,
    /// The KV revision of the account's limits key that `overrides` comes
    /// from (0: none seen), so that an older copy never replaces a newer one.
    overrides_revision: u64,
    /// The plan its most recent token carried.
    token_plan: Option<Box<str>>,
    /// Since when the account has been over its limit, within a grace.
    over_since: Option<UnixMillis>,
    peaks: Peaks,
    /// Sessions already announced as timed out.
    timed_out: TimedOut,
    /// Active sessions when the sweep last looked.
    live: u32,
    /// When the sweep must look again: the earliest moment one of the
    /// account's sessions could time out (0: at the next sweep).
    due: UnixMillis,
}

impl Account {
    /// Whether a live dictionary holds `session`.
    fn holds(&self, session: &SessionId) -> bool {
        self.dicts
            .values()
            .any(|d| d.values().any(|s| &s.rec.session == session))
    }

    /// After the dictionaries changed: forget timeouts of sessions gone, and
    /// look at the account again.
    fn changed(&mut self) {
        if !self.timed_out.is_empty() {
            let held: HashSet<&SessionId> = self
                .dicts
                .values()
                .flat_map(|d| d.values().map(|s| &s.rec.session))
                .collect();
            self.timed_out.retain(|s| held.contains(s));
        }
        self.due = 0;
    }
}

/// Every account as this checker knows it.
#[derive(Debug)]
pub struct View {
    rules: Rules,
    plans: Plans,
    /// Sessions are given this as their earliest liveness, so that a checker
    /// that just started does not time out sessions it has not heard yet.
    started_at: UnixMillis,
    accounts: HashMap<AccountId, Account>,
    /// Ended sessions and their account (session ids are unique across
    /// accounts, so the id alone is the key).
    revoked: HashMap<SessionId, AccountId>,
    /// Heartbeats of sessions no dictionary holds yet (their first write is
    /// still on its way, e.g. during a KV leader election), kept for one
    /// timeout so that the session is not taken for silent when it lands.
    /// Bounded, so junk subjects cannot grow it.
    early: Early,
    /// The partition's dictionaries are loading: heartbeats of sessions not
    /// loaded yet are not kept in `early`, as every session already has a
    /// whole timeout from the start of the load (`started_at`). Otherwise a
    /// checker starting on a million sessions would hold an entry for most
    /// of them until their dictionaries arrive.
    loading: bool,
    /// The newest revision of the limits bucket its watch has brought to
    /// this view. An account whose record this checker stored itself at a
    /// newer revision is kept even when nothing else is known of it: the
    /// revision it holds keeps an older copy, still on its way through the
    /// watch, from being applied.
    limits_watched: u64,
}

/// A session that should be ended now, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub victim: SessionRef,
    pub rejected: bool,
    pub by: Option<SessionRef>,
}

/// Active sessions broken down for `stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Breakdown {
    pub total: u32,
    pub peak: u32,
    pub by_content: BTreeMap<String, u32>,
    pub by_kind: BTreeMap<String, u32>,
    pub by_region: BTreeMap<String, u32>,
}

impl Breakdown {
    /// Adds `other`'s counts to these (`peak` is the caller's).
    pub fn merge(&mut self, other: Breakdown) {
        self.total += other.total;
        for (into, from) in [
            (&mut self.by_content, other.by_content),
            (&mut self.by_kind, other.by_kind),
            (&mut self.by_region, other.by_region),
        ] {
            for (k, n) in from {
                *into.entry(k).or_default() += n;
            }
        }
    }

    fn add(&mut self, s: &ActiveSession) {
        self.total += 1;
        let key = |v: Option<&str>| v.unwrap_or("unknown").to_string();
        let l = &s.labels;
        *self.by_content.entry(key(l.content())).or_default() += 1;
        *self.by_kind.entry(key(l.kind())).or_default() += 1;
        *self.by_region.entry(key(l.region())).or_default() += 1;
    }
}

/// Why `check` could not be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("session {0} is not an active session of this account")]
    NotActive(SessionId),
}

fn as_ref(s: &ActiveSession) -> SessionRef {
    SessionRef {
        device: s.device.clone(),
        session: s.session.clone(),
    }
}

/// The verdicts on the sessions beyond `cap` in `group` (oldest first), as
/// [`choose`] picks them for `policy`. An eviction names the
/// group's newest session as the one it made room for.
fn pick(policy: Policy, group: &[&ActiveSession], cap: usize) -> Vec<Verdict> {
    let chosen = choose(policy, group, cap, 0);
    let rejected = policy == Policy::RejectNew;
    let by = if rejected {
        None
    } else {
        group.last().map(|s| as_ref(s))
    };
    chosen
        .ended
        .into_iter()
        .map(|s| Verdict {
            victim: as_ref(s),
            rejected,
            by: by.clone(),
        })
        .collect()
}

/// Calls `f` with each device's newest record over the live intervals
/// `live` (a device a newer one holds is skipped in the older ones), without
/// allocating.
fn for_each_newest<'a>(
    dicts: &'a ByInterval<Dict>,
    live: RangeInclusive<u64>,
    mut f: impl FnMut(&'a DeviceId, &'a Seen),
) {
    let newest = *live.end();
    for (interval, dict) in dicts.iter().filter(|(i, _)| live.contains(i)) {
        for (device, rec) in dict {
            let newer = (interval + 1..=newest)
                .any(|i| dicts.get(&i).is_some_and(|d| d.contains_key(device)));
            if !newer {
                f(device, rec);
            }
        }
    }
}

/// What `check` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    pub allowed: bool,
    pub limit: Limit,
    /// Active count once the victims are gone.
    pub active: u32,
    pub victims: Vec<SessionRef>,
}

impl View {
    pub fn new(rules: Rules, started_at: UnixMillis) -> Self {
        Self::with_plans(rules, Plans::new(), started_at)
    }

    pub fn with_plans(rules: Rules, plans: Plans, started_at: UnixMillis) -> Self {
        Self {
            rules,
            plans,
            started_at,
            accounts: HashMap::new(),
            revoked: HashMap::new(),
            early: Early::new(EARLY_CAPACITY, rules.timeout_ms),
            loading: false,
            limits_watched: 0,
        }
    }

    /// Installs an interval dictionary as the KV watch delivered it, keeping
    /// what this checker heard of the sessions it already knew.
    pub fn set_dict(
        &mut self,
        account: &AccountId,
        interval: u64,
        dict: impl Into<ByDevice<SessionRecord>>,
    ) {
        let dict = dict.into();
        let acct = self.accounts.entry(account.clone()).or_default();
        if dict.is_empty() {
            acct.dicts.remove(&interval);
        } else {
            // A session held by a newer interval is not kept here again,
            // and this copy replaces the one an older interval held: each
            // live session is held once (the newest record wins anyway).
            let newer = |acct: &Account, device: &DeviceId, session: &SessionId| {
                acct.dicts
                    .iter()
                    .filter(|(i, _)| *i > interval)
                    .any(|(_, d)| d.get(device).is_some_and(|s| &s.rec.session == session))
            };
            let mut held = Vec::with_capacity(dict.len());
            for (device, rec) in dict {
                if newer(acct, &device, &rec.session) {
                    continue;
                }
                let early = self.early.take(rec.session.as_str()).unwrap_or(0);
                let heard = acct
                    .dicts
                    .values()
                    .filter_map(|d| d.get(&device))
                    .filter(|s| s.rec.session == rec.session)
                    .map(|s| s.heard)
                    .max()
                    .unwrap_or(0)
                    .max(early);
                let seen = Seen {
                    rec: rec.into(),
                    heard,
                };
                held.push((device, seen));
            }
            let held: Dict = held.into_iter().collect();
            acct.dicts.retain(|i, older| {
                if i < interval {
                    older.retain(|device, s| {
                        held.get(device)
                            .is_none_or(|h| h.rec.session != s.rec.session)
                    });
                }
                i == interval || !older.is_empty()
            });
            if held.is_empty() {
                acct.dicts.remove(&interval);
            } else {
                acct.dicts.insert(interval, held);
            }
        }
        acct.changed();
    }

    /// After this checker could not hear heartbeats for a while (its NATS
    /// connection was down), gives every session a fresh timeout from `now`,
    /// as at start-up: silence it could not hear is not a timeout.
    pub fn heard_nothing_until(&mut self, now: UnixMillis) {
        self.started_at = self.started_at.max(now);
        for acct in self.accounts.values_mut() {
            acct.due = 0;
        }
    }

    /// Its partition's dictionaries start loading (`true`) or have loaded
    /// (see `loading`).
    pub fn set_loading(&mut self, loading: bool) {
        self.loading = loading;
    }

    /// Forgets every session (this checker let their partition go), and
    /// every account that then holds nothing else: limits and revocations
    /// stay, as their watches do not start again.
    pub fn drop_sessions(&mut self) {
        self.loading = false;
        self.accounts.retain(|_, acct| {
            *acct = Account {
                overrides: acct.overrides.take(),
                overrides_revision: acct.overrides_revision,
                token_plan: acct.token_plan.take(),
                ..Account::default()
            };
            acct.overrides.is_some() || acct.overrides_revision > 0 || acct.token_plan.is_some()
        });
        self.accounts.shrink_to_fit();
        self.early.clear();
    }

    fn heard_early(&mut self, session: &str, now: UnixMillis) {
        if !self.loading {
            self.early.heard(session, now);
        }
    }

    pub fn plans(&self) -> &Plans {
        &self.plans
    }

    /// What an operator stored for the account (None: nothing) as of
    /// `revision` of its limits key, whether the watch brought it or this
    /// checker stored it. A revision older than the one held changes
    /// nothing: a watch running behind, or a request that stored its
    /// record before another's landed, never undoes a newer record. Returns
    /// whether it was applied.
    pub fn set_overrides_at(
        &mut self,
        account: &AccountId,
        overrides: Option<AccountLimits>,
        revision: u64,
    ) -> bool {
        let acct = self.accounts.entry(account.clone()).or_default();
        if revision < acct.overrides_revision {
            return false;
        }
        acct.overrides = overrides.map(Box::new);
        acct.overrides_revision = revision;
        acct.due = 0;
        true
    }

    /// The limits bucket's watch has brought this view everything up to
    /// `revision`.
    pub fn limits_watched_to(&mut self, revision: u64) {
        self.limits_watched = self.limits_watched.max(revision);
    }

    /// What an operator stored for the account, newer than anything held.
    #[cfg(test)]
    pub fn set_overrides(&mut self, account: &AccountId, overrides: Option<AccountLimits>) {
        let next = self
            .accounts
            .get(account)
            .map_or(1, |a| a.overrides_revision + 1);
        self.set_overrides_at(account, overrides, next);
    }

    pub fn overrides(&self, account: &AccountId) -> Option<&AccountLimits> {
        self.accounts
            .get(account)
            .and_then(|a| a.overrides.as_deref())
    }

    /// The plan carried by the account's latest token.
    pub fn set_token_plan(&mut self, account: &AccountId, plan: Option<String>) {
        let acct = self.accounts.entry(account.clone()).or_default();
        acct.token_plan = plan.map(Box::from);
        acct.due = 0;
    }

    /// The account's effective limit and the plan it comes from: the
    /// operator's plan, else its token's, else none (the default); the
    /// operator's overrides on top.
    pub fn limit_and_plan(&self, account: &AccountId) -> (Limit, Option<String>) {
        self.limit_and_plan_with(account, self.overrides(account))
    }

    /// [`View::limit_and_plan`] with `overrides` in place of what the view
    /// holds for the account (a record just stored, say).
    pub fn limit_and_plan_with(
        &self,
        account: &AccountId,
        overrides: Option<&AccountLimits>,
    ) -> (Limit, Option<String>) {
        let acct = self.accounts.get(account);
        let plan = overrides
            .and_then(|o| o.plan.clone())
            .or_else(|| acct.and_then(|a| a.token_plan.as_deref().map(str::to_owned)))
            .filter(|p| self.plans.contains_key(p));
        let base = plan
            .as_ref()
            .and_then(|p| self.plans.get(p).copied())
            .unwrap_or(self.rules.default_limit);
        let limit = overrides.map_or(base, |o| o.apply(base));
        (limit, plan)
    }

    pub fn limit(&self, account: &AccountId) -> Limit {
        self.limit_and_plan(account).0
    }

    pub fn revoke(&mut self, account: &AccountId, session: &SessionId) {
        self.revoked.insert(session.clone(), account.clone());
        if let Some(a) = self.accounts.get_mut(account) {
            a.due = 0;
        }
    }

    /// Forgets a revocation whose KV entry expired.
    pub fn unrevoke(&mut self, account: &AccountId, session: &SessionId) {
        self.revoked.remove(session);
        if let Some(a) = self.accounts.get_mut(account) {
            a.due = 0;
        }
    }

    pub fn is_revoked(&self, account: &AccountId, session: &SessionId) -> bool {
        let _ = account;
        self.revoked.contains_key(session)
    }

    /// Records a heartbeat heard on the wire. Only sessions a dictionary
    /// holds are tracked, so junk subjects cannot grow the view. Returns
    /// whether the session just became evidently live to this checker (first
    /// heartbeat heard, or back after a timeout): the account's limit must
    /// then be looked at again.
    pub fn heard(&mut self, account: &str, device: &str, session: &str, now: UnixMillis) -> bool {
        let mut before = None;
        let Some(acct) = self.accounts.get_mut(account) else {
            self.heard_early(session, now);
            return false;
        };
        for d in acct.dicts.values_mut() {
            if let Some(s) = d.get_mut(device)
                && s.rec.session.as_str() == session
            {
                before = Some(
                    before
                        .unwrap_or(0)
                        .max(std::mem::replace(&mut s.heard, now)),
                );
            }
        }
        let Some(before) = before else {
            self.heard_early(session, now);
            return false;
        };
        let was_timed_out = acct.timed_out.remove(session);
        let revived =
            was_timed_out || before == 0 || now.saturating_sub(before) > self.rules.timeout_ms;
        if revived {
            acct.due = 0;
        }
        revived
    }

    /// The account's active sessions, oldest first. A checker that started
    /// less than a timeout ago counts the sessions it has not heard yet too.
    pub fn active(&self, account: &AccountId, now: UnixMillis) -> Vec<ActiveSession> {
        self.active_as(account, now, true)
    }

    /// The sessions limits are enforced on: like [`View::active`], but only
    /// those with evidence of life (a recorded or heard heartbeat within the
    /// timeout). A checker that just started must not end live sessions to
    /// make room for ones that stopped while it was away.
    fn enforceable(&self, account: &AccountId, now: UnixMillis) -> Vec<ActiveSession> {
        self.active_as(account, now, false)
    }

    fn active_as(&self, account: &AccountId, now: UnixMillis, grace: bool) -> Vec<ActiveSession> {
        let Some(acct) = self.accounts.get(account) else {
            return Vec::new();
        };
        let mut out: Vec<ActiveSession> = self
            .candidates(account, acct, now, grace)
            .into_iter()
            .filter(|s| now.saturating_sub(s.last_seen) <= self.rules.timeout_ms)
            .collect();
        out.sort_by(|a, b| (a.since, &a.device).cmp(&(b.since, &b.device)));
        out
    }

    /// How many sessions [`View::enforceable`] would list, without listing
    /// them.
    fn enforceable_count(&self, account: &AccountId, now: UnixMillis) -> usize {
        let Some(acct) = self.accounts.get(account) else {
            return 0;
        };
        let mut n = 0;
        self.each_candidate(account, acct, now, false, |_, _, last_seen| {
            if now.saturating_sub(last_seen) <= self.rules.timeout_ms {
                n += 1;
            }
        });
        n
    }

    /// Sessions recorded in a live dictionary and not revoked, with their
    /// best-known last heartbeat, whether timed out or not.
    fn candidates(
        &self,
        account: &AccountId,
        acct: &Account,
        now: UnixMillis,
        grace: bool,
    ) -> Vec<ActiveSession> {
        let mut out = Vec::new();
        self.each_candidate(account, acct, now, grace, |device, rec, last_seen| {
            out.push(ActiveSession {
                device: device.clone(),
                session: rec.session.clone(),
                since: rec.since,
                last_seen,
                labels: rec.labels.clone(),
            });
        });
        out
    }

    /// Calls `f` with each of [`View::candidates`]: its device, record and
    /// best-known last heartbeat (no earlier than the checker's start under
    /// `grace`).
    fn each_candidate(
        &self,
        account: &AccountId,
        acct: &Account,
        now: UnixMillis,
        grace: bool,
        mut f: impl FnMut(&DeviceId, &Rec, UnixMillis),
    ) {
        let floor = if grace { self.started_at } else { 0 };
        let live = self.rules.clock.readable_intervals(now);
        // Newest interval wins per device.
        for_each_newest(&acct.dicts, live, |device, seen| {
            if !self.is_revoked(account, &seen.rec.session) {
                f(device, &seen.rec, seen.last_seen().max(floor));
            }
        });
    }

    /// Sessions beyond the account's limits, as its policy sees them: first
    /// per content, then account-wide. Evict policies end the oldest (or the
    /// least recently heard), reject-new the newest. Within a grace, `seats`
    /// more are tolerated until `secs` after the account went over.
    pub fn over_limit(&mut self, account: &AccountId, now: UnixMillis) -> Vec<Verdict> {
        let limit = self.limit(account);
        // The common case, an account within its one limit, is counted
        // without listing its sessions (each dictionary a watch delivers
        // has its account looked at).
        if limit.per_content.is_none()
            && self.enforceable_count(account, now) <= limit.limit as usize
        {
            if let Some(acct) = self.accounts.get_mut(account) {
                acct.over_since = None;
            }
            return Vec::new();
        }
        let live = self.enforceable(account, now);
        let mut verdicts = Vec::new();
        let mut ended: HashSet<SessionId> = HashSet::new();
        if let Some(per_content) = limit.per_content {
            let mut groups: BTreeMap<&str, Vec<&ActiveSession>> = BTreeMap::new();
            for s in &live {
                if let Some(c) = s.labels.content() {
                    groups.entry(c).or_default().push(s);
                }
            }
            for group in groups.values() {
                for v in pick(limit.policy, group, per_content as usize) {
                    ended.insert(v.victim.session.clone());
                    verdicts.push(v);
                }
            }
        }
        let rest: Vec<&ActiveSession> = live
            .iter()
            .filter(|s| !ended.contains(&s.session))
            .collect();
        let mut allowed = limit.limit as usize;
        let over = rest.len() > allowed;
        if let Some(acct) = self.accounts.get_mut(account) {
            match (limit.grace, over) {
                (Some(g), true) => {
                    let since = *acct.over_since.get_or_insert(now);
                    allowed += g.extra_seats(Some(since), now) as usize;
                }
                _ => acct.over_since = None,
            }
        }
        verdicts.extend(pick(limit.policy, &rest, allowed));
        verdicts
    }

    /// Accounts whose grace ran out since they went over: to enforce now.
    pub fn grace_expired(&self, now: UnixMillis) -> Vec<AccountId> {
        self.accounts
            .iter()
            .filter(|(id, a)| {
                a.over_since.is_some_and(|since| {
                    // Without a grace (any more), being over is expired at once.
                    !self
                        .limit(id)
                        .grace
                        .is_some_and(|g| g.open(Some(since), now))
                })
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// "May this device play now?" `content` applies the per-content limit;
    /// `evict` names the session the user chose to sign out if a seat is
    /// needed (takeover). Fails when `evict` is not an active session of the
    /// account.
    pub fn check(
        &self,
        account: &AccountId,
        device: &DeviceId,
        content: Option<&str>,
        evict: Option<&SessionId>,
        now: UnixMillis,
    ) -> Result<CheckOutcome, CheckError> {
        let live = self.enforceable(account, now);
        let limit = self.limit(account);
        let chosen = match evict {
            Some(session) => Some(
                live.iter()
                    .find(|s| &s.session == session)
                    .ok_or_else(|| CheckError::NotActive(session.clone()))?,
            ),
            None => None,
        };
        // The device's own session (a reload) never needs a new seat.
        let others: Vec<&ActiveSession> = live.iter().filter(|s| &s.device != device).collect();
        let mut victims: Vec<SessionRef> = Vec::new();
        // Makes one seat free in `pool` (at most `cap` may stay), or refuses.
        let make_room =
            |pool: &[&ActiveSession], cap: usize, victims: &mut Vec<SessionRef>| -> bool {
                let pool: Vec<&ActiveSession> = pool
                    .iter()
                    .copied()
                    .filter(|s| !victims.iter().any(|v| v.session == s.session))
                    .collect();
                if pool.len() < cap {
                    return true;
                }
                let need = pool.len() + 1 - cap;
                if let Some(c) = chosen
                    && pool.iter().any(|s| s.session == c.session)
                {
                    victims.push(as_ref(c));
                    if need == 1 {
                        return true;
                    }
                }
                let pool: Vec<&ActiveSession> = pool
                    .into_iter()
                    .filter(|s| !victims.iter().any(|v| v.session == s.session))
                    .collect();
                let choice = choose(limit.policy, &pool, cap, 1);
                if choice.refused > 0 {
                    return false;
                }
                victims.extend(choice.ended.into_iter().map(as_ref));
                true
            };
        let mut allowed = true;
        if let (Some(per_content), Some(content)) = (limit.per_content, content) {
            let same: Vec<&ActiveSession> = others
                .iter()
                .copied()
                .filter(|s| s.labels.content() == Some(content))
                .collect();
            allowed = make_room(&same, per_content as usize, &mut victims);
        }
        if allowed && others.len() < live.len() {
            // Already active: no account-wide seat needed.
        } else if allowed {
            let since = self.accounts.get(account).and_then(|a| a.over_since);
            let in_grace = limit.grace.map_or(0, |g| g.extra_seats(since, now));
            let cap = limit.limit as usize + in_grace as usize;
            allowed = make_room(&others, cap, &mut victims);
        }
        if !allowed {
            victims.clear();
        }
        let active = live.len() - victims.len();
        Ok(CheckOutcome {
            allowed,
            limit,
            active: active as u32,
            victims,
        })
    }

    /// Active counts by content, kind and region, and the peak over the
    /// last [`PEAK_WINDOW_MINUTES`] minutes.
    pub fn breakdown(&self, account: &AccountId, now: UnixMillis) -> Breakdown {
        let mut b = Breakdown::default();
        for s in self.active(account, now) {
            b.add(&s);
        }
        b.peak = self.accounts.get(account).map_or(0, |a| a.peaks.max());
        b.peak = b.peak.max(b.total);
        b
    }

    /// Active sessions of one account, counted without copying them.
    fn count_active(&self, acct: &Account, now: UnixMillis) -> u32 {
        let live = self.rules.clock.readable_intervals(now);
        let (timeout, floor) = (self.rules.timeout_ms, self.started_at);
        let mut n = 0;
        for_each_newest(&acct.dicts, live, |_, seen| {
            if !self.revoked.contains_key(&seen.rec.session)
                && now.saturating_sub(seen.last_seen().max(floor)) <= timeout
            {
                n += 1;
            }
        });
        n
    }

    /// The busiest accounts by active sessions, at most `n`.
    pub fn top(&self, n: usize, now: UnixMillis) -> Vec<(AccountId, u32, Limit)> {
        let mut all: Vec<(&AccountId, u32)> = self
            .accounts
            .iter()
            .map(|(id, a)| (id, self.count_active(a, now)))
            .filter(|(_, n)| *n > 0)
            .collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        all.truncate(n);
        all.into_iter()
            .map(|(id, n)| (id.clone(), n, self.limit(id)))
            .collect()
    }

    /// Breakdown over every account (one pass, no copies of the sessions).
    /// `peak` is left at 0: the peak over every account is the caller's.
    pub fn breakdown_all(&self, now: UnixMillis) -> Breakdown {
        let live = self.rules.clock.readable_intervals(now);
        let (timeout, floor) = (self.rules.timeout_ms, self.started_at);
        let mut total = 0u32;
        let mut counts: [HashMap<&str, u32>; 3] = Default::default();
        for acct in self.accounts.values() {
            for_each_newest(&acct.dicts, live.clone(), |_, seen| {
                if self.revoked.contains_key(&seen.rec.session)
                    || now.saturating_sub(seen.last_seen().max(floor)) > timeout
                {
                    return;
                }
                total += 1;
                let l = &seen.rec.labels;
                for (map, value) in counts.iter_mut().zip([l.content(), l.kind(), l.region()]) {
                    *map.entry(value.unwrap_or("unknown")).or_default() += 1;
                }
            });
        }
        let own = |m: &HashMap<&str, u32>| m.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        Breakdown {
            total,
            peak: 0,
            by_content: own(&counts[0]),
            by_kind: own(&counts[1]),
            by_region: own(&counts[2]),
        }
    }

    /// The device currently holding `session` in a live dictionary, if any.
    pub fn find_session(
        &self,
        account: &AccountId,
        session: &SessionId,
        now: UnixMillis,
    ) -> Option<DeviceId> {
        let acct = self.accounts.get(account)?;
        let live = self.rules.clock.readable_intervals(now);
        acct.dicts
            .iter()
            .filter(|(i, _)| live.contains(i))
            .flat_map(|(_, d)| d.iter())
            .find(|(_, s)| &s.rec.session == session)
            .map(|(d, _)| d.clone())
    }

    /// Sessions that crossed the timeout since the last call, each reported
    /// once, and the number of active sessions over all accounts; also drops
    /// what no live interval refers to any more.
    ///
    /// Runs often, so it looks only at accounts that are due: an account is
    /// looked at again when one of its sessions could first time out, or at
    /// once when anything about it changed (dictionaries, revocations,
    /// limits, a session heard again). In between, its last count stands.
    /// It allocates only for what timed out.
    pub fn sweep(&mut self, now: UnixMillis) -> (Vec<(AccountId, ActiveSession)>, u32) {
        let intervals = self.rules.clock.readable_intervals(now);
        let prev = *intervals.start();
        let minute = now / 60_000;
        let (timeout, floor) = (self.rules.timeout_ms, self.started_at);
        let mut timed_out = Vec::new();
        let mut total = 0u32;
        let mut pruned = false;
        let revoked = &self.revoked;
        for (account, acct) in self.accounts.iter_mut() {
            if acct.dicts.iter().next().is_some_and(|(i, _)| i < prev) {
                acct.dicts.retain(|i, _| i >= prev);
                acct.changed();
                pruned = true;
            }
            if acct.due <= now {
                let mut live = 0u32;
                let mut due = UnixMillis::MAX;
                let mut expired: Vec<(DeviceId, Rec, UnixMillis)> = Vec::new();
                for_each_newest(&acct.dicts, intervals.clone(), |device, seen| {
                    let rec = &seen.rec;
                    if revoked.contains_key(&rec.session) {
                        return;
                    }
                    let last_seen = seen.last_seen().max(floor);
                    if now.saturating_sub(last_seen) <= timeout {
                        live += 1;
                        due = due.min(last_seen + timeout + 1);
                    } else if !acct.timed_out.contains(rec.session.as_str()) {
                        expired.push((device.clone(), rec.clone(), last_seen));
                    }
                });
                acct.live = live;
                acct.due = due;
                for (device, rec, last_seen) in expired {
                    acct.timed_out.insert(rec.session.clone());
                    timed_out.push((
                        account.clone(),
                        ActiveSession {
                            device,
                            session: rec.session,
                            since: rec.since,
                            last_seen,
                            labels: rec.labels,
                        },
                    ));
                }
            }
            total += acct.live;
            acct.peaks.record(minute, acct.live);
        }
        if pruned {
            let limits_watched = self.limits_watched;
            self.accounts.retain(|_, a| {
                !a.dicts.is_empty()
                    || a.overrides.is_some()
                    || a.token_plan.is_some()
                    || a.overrides_revision > limits_watched
            });
            // A revocation matters only while a live dictionary holds the session.
            let accounts = &self.accounts;
            self.revoked
                .retain(|s, a| accounts.get(a).is_some_and(|acct| acct.holds(s)));
        }
        (timed_out, total)
    }

    /// Every account the view knows.
    pub fn accounts(&self) -> Vec<AccountId> {
        self.accounts.keys().cloned().collect()
    }
}

/// What the tests of the checker's modules build views from.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use headcount_protocol::wire::SessionDict;
    use std::time::Duration;

    /// One-minute intervals, a 15 s timeout and the given default limit.
    pub fn rules(limit: u32, policy: Policy) -> Rules {
        Rules {
            clock: IntervalClock::new(Duration::from_secs(60)),
            timeout_ms: 15_000,
            default_limit: Limit::new(limit as i64, policy).expect("limit"),
        }
    }

    pub fn acct() -> AccountId {
        AccountId::parse("acme").unwrap()
    }

    /// A view under `rules(limit, policy)`, started at 0, in which the
    /// dictionary of interval 0 of `acct()` holds `entries` (see [`dict`]).
    pub fn view_of(limit: u32, policy: Policy, entries: &[(&str, &str, u64)]) -> View {
        let mut v = View::new(rules(limit, policy), 0);
        v.set_dict(&acct(), 0, dict(entries));
        v
    }

    /// An operator's limit and policy for `acct()`, as `limits.set` stores
    /// them.
    pub fn set_limit(v: &mut View, limit: u32, policy: Policy) {
        let limit = Limit::new(limit as i64, policy).expect("limit");
        v.set_overrides(
            &acct(),
            Some(AccountLimits {
                limit: Some(limit.limit),
                policy: Some(limit.policy),
                ..Default::default()
            }),
        );
    }

    /// A dictionary of `(device, session, since)`, each last seen when it
    /// began.
    pub fn dict(entries: &[(&str, &str, u64)]) -> SessionDict {
        entries
            .iter()
            .map(|(d, s, since)| {
                (
                    DeviceId::parse(d).unwrap(),
                    SessionRecord {
                        session: SessionId::parse(s).unwrap(),
                        since: *since,
                        last_seen: *since,
                        labels: Default::default(),
                        replaced: None,
                    },
                )
            })
            .collect()
    }

    /// `d` with the given devices playing the given content.
    pub fn with_content(mut d: SessionDict, contents: &[(&str, &str)]) -> SessionDict {
        for (dev, c) in contents {
            if let Some(r) = d.get_mut(&DeviceId::parse(dev).unwrap()) {
                r.labels = headcount_protocol::wire::Labels::new(Some(c), None, None);
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{acct, dict, rules, set_limit, view_of, with_content};
    use super::*;
    use headcount_protocol::wire::SessionDict;

    #[test]
    fn timed_out_sessions_take_a_set_only_while_there_are_some() {
        let mut t = TimedOut::default();
        assert!(t.is_empty() && !t.contains("s1") && !t.remove("s1"));
        t.insert(SessionId::parse("s1").unwrap());
        t.insert(SessionId::parse("s2").unwrap());
        assert!(!t.is_empty() && t.contains("s1") && t.contains("s2"));
        assert!(t.remove("s1") && !t.remove("s1"));
        t.retain(|s| s.as_str() != "s2");
        assert!(t.is_empty() && t.0.is_none(), "emptied: no set left");
        t.insert(SessionId::parse("s3").unwrap());
        assert!(t.remove("s3") && t.0.is_none());
    }

    #[test]
    fn newest_interval_wins_and_revoked_are_hidden() {
        let mut v = view_of(
            5,
            Policy::EvictOldest,
            &[("a", "s1", 1_000), ("b", "s2", 2_000)],
        );
        v.set_dict(&acct(), 1, dict(&[("a", "s3", 61_000)]));
        let active = v.active(&acct(), 62_000);
        let sessions: Vec<&str> = active.iter().map(|s| s.session.as_str()).collect();
        assert_eq!(sessions, ["s3"], "b timed out, a replaced by s3");
        v.revoke(&acct(), &SessionId::parse("s3").unwrap());
        assert!(v.active(&acct(), 62_000).is_empty());
    }

    #[test]
    fn heartbeats_keep_sessions_alive_and_timeouts_are_reported_once() {
        let mut v = view_of(5, Policy::EvictOldest, &[("a", "s1", 1_000)]);
        let s1 = SessionId::parse("s1").unwrap();
        assert!(v.heard("acme", "a", s1.as_str(), 10_000));
        assert!(!v.heard("acme", "a", "nope", 10_000));
        assert_eq!(v.active(&acct(), 24_000).len(), 1);
        assert!(v.sweep(24_000).0.is_empty());
        assert_eq!(v.sweep(25_001).0.len(), 1);
        assert!(v.sweep(26_000).0.is_empty());
        assert!(v.active(&acct(), 25_001).is_empty());
    }

    #[test]
    fn the_sweep_counts_right_while_looking_only_at_due_accounts() {
        let mut v = View::new(rules(5, Policy::EvictOldest), 0);
        let other = AccountId::parse("other").unwrap();
        v.set_dict(&acct(), 0, dict(&[("a", "s1", 1_000), ("b", "s2", 1_000)]));
        v.set_dict(&other, 0, dict(&[("c", "s3", 1_000)]));
        assert_eq!(v.sweep(2_000).1, 3);
        // Nothing due: the counts stand.
        assert_eq!(v.sweep(3_000).1, 3);
        // A revocation is counted at the next sweep, not at the due time.
        v.revoke(&acct(), &SessionId::parse("s2").unwrap());
        assert_eq!(v.sweep(3_500).1, 2);
        // s1 is kept alive by heartbeats, s3 is not: only s3 times out, on time.
        v.heard("acme", "a", "s1", 12_000);
        let (gone, n) = v.sweep(16_001);
        assert_eq!(n, 1);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].1.session.as_str(), "s3");
        assert_eq!(
            v.sweep(27_001).0.len(),
            1,
            "s1 times out 15 s after it was heard"
        );
        assert_eq!(v.sweep(27_500).1, 0);
        // Heard again: counted again at once.
        assert!(v.heard("acme", "a", "s1", 28_000));
        assert_eq!(v.sweep(28_000).1, 1);
    }

    #[test]
    fn a_heartbeat_before_its_dictionary_counts_once_loaded_but_not_while_loading() {
        // The partition started loading at 40 s; heard at 50 s, the
        // dictionary (last seen at 1 s) lands after.
        let last_seen = |loading: bool| {
            let mut v = View::new(rules(5, Policy::EvictOldest), 40_000);
            v.set_loading(loading);
            assert!(!v.heard("acme", "a", "s1", 50_000), "no dictionary yet");
            v.set_loading(false);
            v.set_dict(&acct(), 0, dict(&[("a", "s1", 1_000)]));
            v.active(&acct(), 50_000)[0].last_seen
        };
        assert_eq!(last_seen(false), 50_000, "kept aside, then counted");
        // While loading nothing is kept aside: the start of the load stands
        // in for it (a session loaded is not timed out before a whole
        // timeout from then).
        assert_eq!(last_seen(true), 40_000);
    }

    #[test]
    fn what_was_heard_survives_a_new_copy_of_the_dictionary() {
        let mut v = view_of(5, Policy::EvictOldest, &[("a", "s1", 1_000)]);
        assert!(v.heard("acme", "a", "s1", 14_000));
        // Another device joins: the watch delivers the whole dictionary again.
        v.set_dict(&acct(), 0, dict(&[("a", "s1", 1_000), ("b", "s2", 14_000)]));
        assert_eq!(v.active(&acct(), 20_000).len(), 2, "s1 was heard at 14 s");
        assert!(!v.heard("acme", "b", "s1", 20_000), "wrong device");
    }

    #[test]
    fn a_session_in_two_intervals_is_held_once_and_leaves_at_once() {
        let mut v = view_of(
            5,
            Policy::EvictOldest,
            &[("a", "s1", 1_000), ("b", "s2", 55_000)],
        );
        v.heard("acme", "a", "s1", 59_000);
        // s1 moved on to interval 1; s2 did not (yet).
        v.set_dict(&acct(), 1, dict(&[("a", "s1", 1_000)]));
        let held = |v: &View, i: u64| v.accounts[&acct()].dicts.get(&i).map_or(0, |d| d.len());
        assert_eq!((held(&v, 0), held(&v, 1)), (1, 1), "s1 is held once");
        let active = v.active(&acct(), 62_000);
        assert_eq!(active.len(), 2);
        assert_eq!(active[0].last_seen, 59_000, "what was heard moved along");
        // s1 leaves (removed from interval 1): gone at once, not found
        // again in interval 0.
        v.set_dict(&acct(), 1, SessionDict::new());
        let active = v.active(&acct(), 62_000);
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].session.as_str(), "s2");
        // An older copy delivered late does not bring back what is newer.
        v.set_dict(&acct(), 1, dict(&[("b", "s2", 55_000)]));
        v.set_dict(&acct(), 0, dict(&[("a", "s1", 1_000), ("b", "s2", 55_000)]));
        assert_eq!((held(&v, 0), held(&v, 1)), (1, 1));
    }

    #[test]
    fn a_handler_ahead_writes_into_the_next_interval_and_is_counted_at_once() {
        // One-minute intervals. This checker's clock is at 50 s (interval
        // 0); a handler's is 15 s ahead: it has carried s1 on into interval
        // 1 and records the newcomer s2 there.
        let now = 50_000;
        let mut v = view_of(1, Policy::EvictOldest, &[("a", "s1", 1_000)]);
        v.heard("acme", "a", "s1", 49_000);
        let sessions = |v: &View, now: u64| -> Vec<String> {
            v.active(&acct(), now)
                .iter()
                .map(|s| s.session.to_string())
                .collect()
        };
        v.set_dict(&acct(), 1, dict(&[("a", "s1", 1_000)]));
        assert_eq!(sessions(&v, now), ["s1"], "carried on: counted, once");
        // Interval 0's copy arriving again does not count s1 twice either.
        v.set_dict(&acct(), 0, dict(&[("a", "s1", 1_000)]));
        assert_eq!(sessions(&v, now), ["s1"]);
        assert_eq!(v.sweep(now), (Vec::new(), 1));
        assert!(v.over_limit(&acct(), now).is_empty());

        v.set_dict(&acct(), 1, dict(&[("a", "s1", 1_000), ("b", "s2", 64_000)]));
        assert_eq!(sessions(&v, now), ["s1", "s2"]);
        assert_eq!(v.sweep(now).1, 2);
        let over = v.over_limit(&acct(), now);
        assert_eq!(over.len(), 1, "over the limit now, not at 60 s");
        assert_eq!(over[0].victim.session.as_str(), "s1");
        assert_eq!(over[0].by.as_ref().unwrap().session.as_str(), "s2");
        v.revoke(&acct(), &over[0].victim.session);
        let out = v
            .check(&acct(), &DeviceId::parse("c").unwrap(), None, None, now)
            .unwrap();
        assert!(out.allowed);
        assert_eq!(out.victims.len(), 1, "check sees s2 too");
        assert_eq!(out.victims[0].session.as_str(), "s2");
        assert!(
            v.find_session(&acct(), &out.victims[0].session, now)
                .is_some()
        );

        // Once this checker's clock reaches interval 1 the count is the same.
        assert_eq!(sessions(&v, now), ["s2"]);
        assert_eq!(sessions(&v, 61_000), ["s2"]);
    }

    #[test]
    fn an_account_keeps_the_revision_of_a_record_the_watch_has_not_brought_yet() {
        let mut v = view_of(1, Policy::EvictOldest, &[("a", "s1", 1_000)]);
        let other = AccountId::parse("other").unwrap();
        // This checker removed acme's record at revision 7 (or later); its
        // dictionaries then expire.
        assert!(v.set_overrides_at(&acct(), None, 7));
        v.sweep(200_000);
        let stale = AccountLimits {
            limit: Some(9),
            ..Default::default()
        };
        assert!(
            !v.set_overrides_at(&acct(), Some(stale), 6),
            "the revision outlived the dictionaries"
        );
        assert_eq!(v.limit(&acct()).limit, 1);
        // Once the watch has brought revision 7, the empty account goes.
        v.limits_watched_to(7);
        v.set_dict(&other, 3, dict(&[("x", "s9", 190_000)]));
        v.sweep(400_000);
        assert!(v.accounts().is_empty());
    }

    #[test]
    fn heartbeats_heard_before_the_dictionary_lands_count() {
        let mut v = View::new(rules(5, Policy::EvictOldest), 0);
        // The first write was held up (a KV election) while the device kept
        // beating; the record lands with the first heartbeat's time.
        assert!(!v.heard("acme", "a", "s1", 30_000));
        v.set_dict(&acct(), 0, dict(&[("a", "s1", 10_000)]));
        assert!(v.sweep(31_000).0.is_empty(), "no false timeout");
        assert_eq!(v.active(&acct(), 31_000).len(), 1);
    }

    #[test]
    fn peaks_keep_the_highest_count_of_each_recent_minute() {
        let mut p = Peaks::default();
        p.record(100, 5);
        p.record(100, 3);
        p.record(101, 4);
        assert_eq!(p.max(), 5);
        p.record(100 + PEAK_WINDOW_MINUTES, 1);
        assert_eq!(p.max(), 4, "minute 100 left the window");
        p.record(1_000, 2);
        assert_eq!(p.max(), 2, "a long gap clears everything");
        p.record(990, 9);
        assert_eq!(p.max(), 9, "a minute within the window still counts");
        p.record(900, 50);
        assert_eq!(p.max(), 9, "too old to count");
    }

    #[test]
    fn the_peaks_of_two_partitions_add_up_minute_by_minute() {
        let len = PEAK_WINDOW_MINUTES;
        let mut a = Peaks::default();
        a.record(1_000, 5);
        a.record(1_001, 2);
        let mut c = a.clone();
        let mut b = Peaks::default();
        b.record(1_000, 4);
        b.record(1_002, 7);
        b.record(1_002 - len, 100); // outside the window that ends at 1002
        a.add(&b);
        assert_eq!(a.max(), 9, "minute 1000: 5 + 4");
        c.record(1_002, 3);
        c.add(&b);
        assert_eq!(c.max(), 10, "minute 1002: 3 + 7");
        let mut a = c;
        // What is older than the newer window is dropped, on either side.
        let mut old = Peaks::default();
        old.record(1_002 - len, 50);
        a.add(&old);
        assert_eq!(a.max(), 10);
        let mut behind = Peaks::default();
        behind.record(900, 1);
        behind.add(&a);
        assert_eq!(behind.max(), 10, "its own minute left the window");
    }

    #[test]
    fn peaks_cross_the_wire_unchanged() {
        let mut p = Peaks::default();
        for (m, n) in [(3u64, 4u32), (5, 1), (20, 8), (21, 6)] {
            p.record(m, n);
        }
        let (minute, counts) = p.to_wire();
        assert_eq!(minute, 21);
        assert_eq!(counts.len(), PEAK_WINDOW_MINUTES as usize);
        assert_eq!(&counts[..2], [6, 8], "newest first");
        let back = Peaks::from_wire(minute, &counts);
        assert_eq!(back.to_wire(), (minute, counts));
        assert_eq!(back.max(), 8);
        // Near the epoch the window is shorter.
        let mut early = Peaks::default();
        early.record(2, 9);
        assert_eq!(early.to_wire(), (2, vec![9, 0, 0]));
        assert_eq!(Peaks::from_wire(2, &[9, 0, 0]).max(), 9);
    }

    #[test]
    fn a_partition_let_go_forgets_its_sessions_but_not_its_limits() {
        let mut v = view_of(
            2,
            Policy::EvictOldest,
            &[("a", "s1", 1_000), ("b", "s2", 2_000)],
        );
        let other = AccountId::parse("other").unwrap();
        v.set_dict(&other, 0, dict(&[("c", "s3", 1_000)]));
        set_limit(&mut v, 5, Policy::RejectNew);
        v.revoke(&acct(), &SessionId::parse("s9").unwrap());
        v.drop_sessions();
        assert!(v.active(&acct(), 3_000).is_empty());
        assert!(v.active(&other, 3_000).is_empty());
        assert_eq!(v.accounts(), [acct()], "only the account with limits stays");
        assert_eq!(v.limit(&acct()).limit, 5);
        assert!(v.is_revoked(&acct(), &SessionId::parse("s9").unwrap()));
        // Loaded again, its sessions count as before.
        v.set_dict(&acct(), 0, dict(&[("a", "s1", 1_000)]));
        assert_eq!(v.active(&acct(), 3_000).len(), 1);
    }

    #[test]
    fn evict_oldest_and_reject_new() {
        let mut v = view_of(
            2,
            Policy::EvictOldest,
            &[("a", "s1", 1_000), ("b", "s2", 2_000), ("c", "s3", 3_000)],
        );
        let over = v.over_limit(&acct(), 4_000);
        assert_eq!(over.len(), 1);
        assert_eq!(over[0].victim.session.as_str(), "s1");
        assert_eq!(over[0].by.as_ref().unwrap().session.as_str(), "s3");

        set_limit(&mut v, 2, Policy::RejectNew);
        let over = v.over_limit(&acct(), 4_000);
        assert_eq!(over[0].victim.session.as_str(), "s3");
        assert!(over[0].rejected);
    }

    #[test]
    fn check_follows_the_policy() {
        let mut v = view_of(
            2,
            Policy::EvictOldest,
            &[("a", "s1", 1_000), ("b", "s2", 2_000)],
        );
        let d = |s| DeviceId::parse(s).unwrap();
        // An active device is always allowed and takes no extra seat.
        let out = v.check(&acct(), &d("a"), None, None, 3_000).unwrap();
        assert!(out.allowed && out.victims.is_empty());
        let out = v.check(&acct(), &d("c"), None, None, 3_000).unwrap();
        assert!(out.allowed);
        assert_eq!(out.victims.len(), 1);
        assert_eq!(out.victims[0].session.as_str(), "s1");
        assert_eq!(out.active, 1);

        set_limit(&mut v, 2, Policy::RejectNew);
        let out = v.check(&acct(), &d("c"), None, None, 3_000).unwrap();
        assert!(!out.allowed && out.victims.is_empty());
        assert_eq!(out.active, 2);
    }

    #[test]
    fn a_fresh_checker_gives_sessions_a_grace_period() {
        let mut v = View::new(rules(5, Policy::EvictOldest), 50_000);
        v.set_dict(&acct(), 0, dict(&[("a", "s1", 1_000)]));
        assert_eq!(v.active(&acct(), 55_000).len(), 1);
        assert!(v.active(&acct(), 65_001).is_empty());
    }

    #[test]
    fn a_fresh_checker_never_ends_live_sessions_for_stale_ones() {
        // Limit 2: b and c heartbeat on, x stopped long before the start.
        let mut v = View::new(rules(2, Policy::EvictOldest), 100_000);
        v.set_dict(
            &acct(),
            1,
            dict(&[
                ("x", "sx", 60_000),
                ("b", "sb", 61_000),
                ("c", "sc", 62_000),
            ]),
        );
        assert!(
            v.over_limit(&acct(), 100_001).is_empty(),
            "nothing is known to be live yet"
        );
        let (sb, sc) = (
            SessionId::parse("sb").unwrap(),
            SessionId::parse("sc").unwrap(),
        );
        assert!(
            v.heard("acme", "b", sb.as_str(), 101_000),
            "first heartbeat heard: look again"
        );
        assert!(v.heard("acme", "c", sc.as_str(), 102_000));
        assert!(!v.heard("acme", "c", sc.as_str(), 103_000), "nothing new");
        assert!(v.over_limit(&acct(), 103_000).is_empty(), "two live of two");
        let out = v
            .check(&acct(), &DeviceId::parse("b").unwrap(), None, None, 103_000)
            .unwrap();
        assert!(out.allowed && out.victims.is_empty());
    }

    #[test]
    fn a_session_back_from_a_timeout_is_looked_at_again() {
        let mut v = view_of(5, Policy::EvictOldest, &[("a", "s1", 1_000)]);
        let s1 = SessionId::parse("s1").unwrap();
        assert!(v.heard("acme", "a", s1.as_str(), 2_000));
        assert_eq!(v.sweep(20_000).0.len(), 1);
        assert!(v.heard("acme", "a", s1.as_str(), 21_000), "revived");
    }

    fn set(v: &mut View, o: AccountLimits) {
        v.set_overrides(&acct(), Some(o));
    }

    #[test]
    fn per_content_limits_apply_within_each_content() {
        let mut v = View::new(rules(5, Policy::EvictOldest), 0);
        let d = dict(&[("a", "s1", 1_000), ("b", "s2", 2_000), ("c", "s3", 3_000)]);
        v.set_dict(
            &acct(),
            0,
            with_content(d, &[("a", "m1"), ("b", "m1"), ("c", "m2")]),
        );
        set(
            &mut v,
            AccountLimits {
                per_content: Some(1),
                ..Default::default()
            },
        );
        let over = v.over_limit(&acct(), 4_000);
        assert_eq!(over.len(), 1);
        assert_eq!(over[0].victim.session.as_str(), "s1");
        assert_eq!(over[0].by.as_ref().unwrap().session.as_str(), "s2");
        // check: a new device on m2 makes room on m2 only.
        let out = v
            .check(
                &acct(),
                &DeviceId::parse("z").unwrap(),
                Some("m2"),
                None,
                4_000,
            )
            .unwrap();
        assert!(out.allowed);
        assert!(out.victims.iter().any(|s| s.session.as_str() == "s3"));
    }

    #[test]
    fn evict_least_active_ends_the_longest_silent() {
        let mut v = view_of(
            2,
            Policy::EvictLeastActive,
            &[("a", "s1", 1_000), ("b", "s2", 2_000), ("c", "s3", 3_000)],
        );
        // s1 is the oldest but heard most recently; s2 is the quietest.
        v.heard("acme", "a", "s1", 9_000);
        v.heard("acme", "c", "s3", 8_000);
        let over = v.over_limit(&acct(), 9_500);
        assert_eq!(over.len(), 1);
        assert_eq!(over[0].victim.session.as_str(), "s2");
    }

    #[test]
    fn grace_tolerates_an_overage_for_a_while() {
        let mut v = View::new(rules(2, Policy::EvictOldest), 0);
        set(
            &mut v,
            AccountLimits {
                grace: Some(headcount_protocol::Grace { seats: 1, secs: 10 }),
                ..Default::default()
            },
        );
        v.set_dict(
            &acct(),
            0,
            dict(&[("a", "s1", 1_000), ("b", "s2", 2_000), ("c", "s3", 3_000)]),
        );
        assert!(
            v.over_limit(&acct(), 4_000).is_empty(),
            "one extra seat in grace"
        );
        assert!(v.grace_expired(13_000).is_empty());
        assert_eq!(v.grace_expired(14_000), vec![acct()]);
        let over = v.over_limit(&acct(), 14_000);
        assert_eq!(over.len(), 1, "grace over: back to the limit");
        assert_eq!(over[0].victim.session.as_str(), "s1");
    }

    #[test]
    fn takeover_signs_out_the_chosen_session() {
        let v = view_of(
            2,
            Policy::RejectNew,
            &[("a", "s1", 1_000), ("b", "s2", 2_000)],
        );
        let new = DeviceId::parse("c").unwrap();
        let s2 = SessionId::parse("s2").unwrap();
        let out = v.check(&acct(), &new, None, Some(&s2), 3_000).unwrap();
        assert!(out.allowed);
        assert_eq!(out.victims.len(), 1);
        assert_eq!(out.victims[0].session, s2);
        // Without a takeover, reject-new refuses.
        assert!(!v.check(&acct(), &new, None, None, 3_000).unwrap().allowed);
        // A session that is not active here is an error.
        let stranger = SessionId::parse("elsewhere").unwrap();
        assert_eq!(
            v.check(&acct(), &new, None, Some(&stranger), 3_000),
            Err(CheckError::NotActive(stranger))
        );
    }

    #[test]
    fn plans_set_the_base_and_overrides_win() {
        let plans = headcount_protocol::policy::default_plans();
        let mut v = View::with_plans(rules(3, Policy::EvictOldest), plans, 0);
        assert_eq!(v.limit_and_plan(&acct()), (v.limit(&acct()), None));
        assert_eq!(v.limit(&acct()).limit, 3);
        v.set_token_plan(&acct(), Some("premium".into()));
        assert_eq!(v.limit_and_plan(&acct()).0.limit, 4);
        assert_eq!(v.limit_and_plan(&acct()).1.as_deref(), Some("premium"));
        set(
            &mut v,
            AccountLimits {
                plan: Some("basic".into()),
                ..Default::default()
            },
        );
        assert_eq!(
            v.limit(&acct()).limit,
            1,
            "the operator's plan beats the token's"
        );
        set(
            &mut v,
            AccountLimits {
                plan: Some("basic".into()),
                limit: Some(7),
                ..Default::default()
            },
        );
        assert_eq!(v.limit(&acct()).limit, 7);
        v.set_token_plan(&acct(), Some("no-such-plan".into()));
        v.set_overrides(&acct(), None);
        assert_eq!(
            v.limit(&acct()).limit,
            3,
            "an unknown plan falls back to the default"
        );
    }

    // Tests that pin each rule (mutation testing).

    fn sid(name: &str) -> SessionId {
        SessionId::parse(name).unwrap()
    }

    fn dev(name: &str) -> DeviceId {
        DeviceId::parse(name).unwrap()
    }

    /// Session names, sorted.
    fn names<'a>(sessions: impl IntoIterator<Item = &'a ActiveSession>) -> Vec<String> {
        let mut v: Vec<String> = sessions
            .into_iter()
            .map(|s| s.session.to_string())
            .collect();
        v.sort();
        v
    }

    fn timed_out(gone: &[(AccountId, ActiveSession)]) -> Vec<String> {
        names(gone.iter().map(|(_, s)| s))
    }

    fn victims(out: &CheckOutcome) -> Vec<&str> {
        out.victims.iter().map(|v| v.session.as_str()).collect()
    }

    /// A device and its `(content, kind, region)`.
    type DeviceLabels<'a> = (&'a str, Option<&'a str>, Option<&'a str>, Option<&'a str>);

    /// `d` with the given devices labelled.
    fn labelled(mut d: SessionDict, labels: &[DeviceLabels<'_>]) -> SessionDict {
        for (device, content, kind, region) in labels {
            if let Some(r) = d.get_mut(&dev(device)) {
                r.labels = headcount_protocol::wire::Labels::new(*content, *kind, *region);
            }
        }
        d
    }

    fn grace(v: &mut View, seats: u32, secs: u32) {
        set(
            v,
            AccountLimits {
                grace: Some(headcount_protocol::Grace { seats, secs }),
                ..Default::default()
            },
        );
    }

    #[test]
    fn a_fresh_ring_forgets_its_first_minutes_once_they_leave_the_window() {
        let mut p = Peaks::default();
        p.record(0, 5);
        p.record(PEAK_WINDOW_MINUTES, 1);
        assert_eq!(p.max(), 1, "minute 0 left the window");
        let mut p = Peaks::default();
        p.record(1, 5);
        p.record(1 + PEAK_WINDOW_MINUTES, 2);
        assert_eq!(p.max(), 2, "minute 1 left the window");
    }

    #[test]
    fn a_revocation_lasts_while_a_live_dictionary_holds_its_session() {
        let mut v = View::new(rules(5, Policy::EvictOldest), 0);
        v.set_dict(&acct(), 0, dict(&[("b", "s2", 1_000)]));
        v.set_dict(&acct(), 2, dict(&[("a", "s1", 121_000)]));
        v.revoke(&acct(), &sid("s1"));
        // Interval 0 expires: s1 is still held, by interval 2.
        v.sweep(130_000);
        assert!(v.is_revoked(&acct(), &sid("s1")));
        assert!(v.active(&acct(), 130_000).is_empty());
        // Interval 2 expires too: nothing holds s1 any more, and its
        // revocation is forgotten.
        v.set_dict(&acct(), 4, dict(&[("c", "s3", 250_000)]));
        v.sweep(250_000);
        assert!(!v.is_revoked(&acct(), &sid("s1")));
        assert_eq!(names(&v.active(&acct(), 250_000)), ["s3"]);
    }

    #[test]
    fn a_revocation_heard_before_its_record_still_hides_it() {
        let mut v = view_of(5, Policy::EvictOldest, &[("a", "s1", 1_000)]);
        // s2 is ended before its record reaches this checker.
        v.revoke(&acct(), &sid("s2"));
        assert_eq!(v.sweep(2_000).1, 1);
        v.set_dict(&acct(), 0, dict(&[("a", "s1", 1_000), ("b", "s2", 1_500)]));
        assert_eq!(names(&v.active(&acct(), 3_000)), ["s1"]);
        assert_eq!(v.sweep(3_000).1, 1);
    }

    #[test]
    fn a_timeout_is_reported_again_for_a_session_that_left_and_came_back() {
        let mut v = view_of(
            5,
            Policy::EvictOldest,
            &[("a", "s1", 1_000), ("b", "s2", 1_000)],
        );
        assert_eq!(timed_out(&v.sweep(17_000).0), ["s1", "s2"]);
        // s1's record leaves, then a copy holding it again arrives.
        v.set_dict(&acct(), 0, dict(&[("b", "s2", 1_000)]));
        v.set_dict(&acct(), 0, dict(&[("a", "s1", 1_000), ("b", "s2", 1_000)]));
        assert_eq!(timed_out(&v.sweep(18_000).0), ["s1"], "s2 never left");
    }

    #[test]
    fn a_breakdown_counts_each_label_and_keeps_the_peak() {
        let mut v = View::new(rules(5, Policy::EvictOldest), 0);
        let d = dict(&[("a", "s1", 1_000), ("b", "s2", 2_000), ("c", "s3", 3_000)]);
        let d = labelled(
            d,
            &[
                ("a", Some("film"), Some("tv"), Some("eu")),
                ("b", Some("film"), Some("web"), None),
            ],
        );
        v.set_dict(&acct(), 0, d);
        let counts = |pairs: &[(&str, u32)]| -> BTreeMap<String, u32> {
            pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect()
        };
        let b = v.breakdown(&acct(), 4_000);
        assert_eq!(
            b,
            Breakdown {
                total: 3,
                peak: 3,
                by_content: counts(&[("film", 2), ("unknown", 1)]),
                by_kind: counts(&[("tv", 1), ("web", 1), ("unknown", 1)]),
                by_region: counts(&[("eu", 1), ("unknown", 2)]),
            }
        );
        // Swept with three live, then one goes: the peak stays.
        assert_eq!(v.sweep(4_000).1, 3);
        v.revoke(&acct(), &sid("s3"));
        let b = v.breakdown(&acct(), 5_000);
        assert_eq!((b.total, b.peak), (2, 3));
        assert_eq!(b.by_content, counts(&[("film", 2)]));
    }

    /// Three accounts at 16 s (the timeout is 15 s): acme with two
    /// sessions live (one of them heard exactly a timeout ago) and a
    /// revoked one, other with one, idle with one silent a millisecond too
    /// long.
    fn three_accounts() -> View {
        let mut v = View::new(rules(5, Policy::EvictOldest), 0);
        let d = dict(&[("a", "s1", 1_000), ("b", "s2", 1_000), ("c", "s3", 5_000)]);
        let d = labelled(d, &[("a", Some("film"), Some("tv"), Some("eu"))]);
        v.set_dict(&acct(), 0, d);
        v.revoke(&acct(), &sid("s3"));
        let d = labelled(
            dict(&[("x", "s4", 2_000)]),
            &[("x", Some("news"), None, None)],
        );
        v.set_dict(&AccountId::parse("other").unwrap(), 0, d);
        v.set_dict(
            &AccountId::parse("idle").unwrap(),
            0,
            dict(&[("y", "s5", 999)]),
        );
        v
    }

    #[test]
    fn top_lists_the_busiest_accounts_by_live_sessions() {
        let v = three_accounts();
        let top: Vec<(String, u32)> = v
            .top(5, 16_000)
            .into_iter()
            .map(|(a, n, limit)| {
                assert_eq!(limit.limit, 5);
                (a.to_string(), n)
            })
            .collect();
        assert_eq!(top, [("acme".to_owned(), 2), ("other".to_owned(), 1)]);
        assert_eq!(v.top(1, 16_000).len(), 1);
        assert_eq!(v.top(1, 16_000)[0].1, 2);
    }

    #[test]
    fn the_breakdown_of_every_account_counts_live_sessions_only() {
        let v = three_accounts();
        let counts = |pairs: &[(&str, u32)]| -> BTreeMap<String, u32> {
            pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect()
        };
        assert_eq!(
            v.breakdown_all(16_000),
            Breakdown {
                total: 3,
                peak: 0,
                by_content: counts(&[("film", 1), ("news", 1), ("unknown", 1)]),
                by_kind: counts(&[("tv", 1), ("unknown", 2)]),
                by_region: counts(&[("eu", 1), ("unknown", 2)]),
            }
        );
    }

    #[test]
    fn silence_while_disconnected_is_not_a_timeout() {
        let mut v = view_of(5, Policy::EvictOldest, &[("a", "s1", 1_000)]);
        // The connection was down until 30 s: nothing could be heard.
        v.heard_nothing_until(30_000);
        assert_eq!(v.active(&acct(), 44_000).len(), 1);
        assert!(v.sweep(44_000).0.is_empty());
        assert_eq!(timed_out(&v.sweep(45_001).0), ["s1"]);
    }

    #[test]
    fn the_view_serves_the_plans_it_was_given() {
        let plans = headcount_protocol::policy::default_plans();
        let v = View::with_plans(rules(3, Policy::EvictOldest), plans.clone(), 0);
        assert_eq!(v.plans(), &plans);
    }

    #[test]
    fn overrides_of_the_same_revision_are_applied_again() {
        let mut v = View::new(rules(1, Policy::EvictOldest), 0);
        let limit = |n| AccountLimits {
            limit: Some(n),
            ..Default::default()
        };
        assert!(v.set_overrides_at(&acct(), Some(limit(3)), 5));
        assert!(v.set_overrides_at(&acct(), Some(limit(4)), 5));
        assert_eq!(v.limit(&acct()).limit, 4);
        assert!(!v.set_overrides_at(&acct(), Some(limit(9)), 4));
        assert_eq!(v.limit(&acct()).limit, 4);
    }

    #[test]
    fn an_expired_revocation_lets_the_session_count_again() {
        let mut v = view_of(5, Policy::EvictOldest, &[("a", "s1", 1_000)]);
        v.revoke(&acct(), &sid("s1"));
        assert!(v.active(&acct(), 2_000).is_empty());
        v.unrevoke(&acct(), &sid("s1"));
        assert!(!v.is_revoked(&acct(), &sid("s1")));
        assert_eq!(names(&v.active(&acct(), 2_000)), ["s1"]);
    }

    #[test]
    fn a_session_is_revived_only_after_a_silence_longer_than_the_timeout() {
        let mut v = view_of(5, Policy::EvictOldest, &[("a", "s1", 1_000)]);
        assert!(v.heard("acme", "a", "s1", 2_000), "first heard");
        assert!(
            !v.heard("acme", "a", "s1", 17_000),
            "exactly a timeout later: still live"
        );
        assert!(v.heard("acme", "a", "s1", 32_001), "silent for longer");
    }

    #[test]
    fn a_revived_session_times_out_again_and_others_are_not_revived_by_it() {
        let mut v = view_of(
            5,
            Policy::EvictOldest,
            &[("a", "s1", 1_000), ("b", "s2", 1_000)],
        );
        assert!(v.heard("acme", "a", "s1", 10_000));
        assert_eq!(timed_out(&v.sweep(16_500).0), ["s2"]);
        assert!(
            !v.heard("acme", "a", "s1", 16_600),
            "s1 is live: another session's timeout is not its own"
        );
        assert!(v.heard("acme", "b", "s2", 20_000), "s2 is back");
        assert_eq!(
            timed_out(&v.sweep(35_001).0),
            ["s1", "s2"],
            "s2's second timeout is reported too"
        );
    }

    #[test]
    fn an_account_at_its_limit_starts_no_grace() {
        let mut v = View::new(rules(2, Policy::EvictOldest), 0);
        grace(&mut v, 1, 10);
        v.set_dict(&acct(), 0, dict(&[("a", "s1", 1_000), ("b", "s2", 2_000)]));
        assert!(v.over_limit(&acct(), 4_000).is_empty());
        assert!(v.grace_expired(30_000).is_empty());
    }

    #[test]
    fn an_account_back_within_its_limit_gets_a_whole_grace_when_it_goes_over_again() {
        let mut v = View::new(rules(2, Policy::EvictOldest), 0);
        grace(&mut v, 1, 10);
        let three = dict(&[("a", "s1", 1_000), ("b", "s2", 2_000), ("c", "s3", 3_000)]);
        v.set_dict(&acct(), 0, three.clone());
        assert!(v.over_limit(&acct(), 4_000).is_empty(), "in grace from 4 s");
        // One leaves: within the limit, the grace ends.
        v.set_dict(&acct(), 0, dict(&[("a", "s1", 1_000), ("b", "s2", 2_000)]));
        assert!(v.over_limit(&acct(), 5_000).is_empty());
        assert!(v.grace_expired(30_000).is_empty());
        // Over again at 12 s: a new grace, not what was left of the first.
        v.set_dict(&acct(), 0, three);
        assert!(v.over_limit(&acct(), 12_000).is_empty());
        assert!(v.grace_expired(21_000).is_empty(), "until 22 s");
        assert_eq!(v.grace_expired(22_000), vec![acct()]);
    }

    #[test]
    fn check_makes_room_per_content_then_account_wide() {
        let mut v = View::new(rules(2, Policy::EvictOldest), 0);
        let d = dict(&[("a", "s1", 1_000), ("b", "s2", 2_000), ("x", "s3", 3_000)]);
        let d = with_content(d, &[("a", "m1"), ("b", "m2"), ("x", "m3")]);
        v.set_dict(&acct(), 0, d);
        set(
            &mut v,
            AccountLimits {
                per_content: Some(1),
                ..Default::default()
            },
        );
        let out = v
            .check(&acct(), &dev("c"), Some("m1"), None, 4_000)
            .unwrap();
        assert!(out.allowed);
        assert_eq!(victims(&out), ["s1", "s2"], "m1's seat, then the account's");
        assert_eq!(out.active, 1);
    }

    #[test]
    fn a_takeover_that_is_not_enough_ends_the_oldest_too() {
        // Limit 1, two live (not enforced yet): the chosen one and the
        // oldest go.
        let v = view_of(
            1,
            Policy::EvictOldest,
            &[("a", "s1", 1_000), ("b", "s2", 2_000)],
        );
        let out = v
            .check(&acct(), &dev("c"), None, Some(&sid("s2")), 3_000)
            .unwrap();
        assert!(out.allowed);
        assert_eq!(victims(&out), ["s2", "s1"]);
        assert_eq!(out.active, 0);
        // Limit 3, four live: the chosen one and one more.
        let v = view_of(
            3,
            Policy::EvictOldest,
            &[
                ("a", "s1", 1_000),
                ("b", "s2", 2_000),
                ("d", "s3", 3_000),
                ("e", "s4", 4_000),
            ],
        );
        let out = v
            .check(&acct(), &dev("c"), None, Some(&sid("s4")), 5_000)
            .unwrap();
        assert_eq!(victims(&out), ["s4", "s1"]);
        assert_eq!(out.active, 2);
    }

    #[test]
    fn a_takeover_of_another_content_does_not_free_a_seat_on_this_one() {
        let mut v = View::new(rules(5, Policy::EvictOldest), 0);
        let d = dict(&[("a", "s1", 1_000), ("b", "s2", 2_000)]);
        v.set_dict(&acct(), 0, with_content(d, &[("a", "m1"), ("b", "m2")]));
        set(
            &mut v,
            AccountLimits {
                per_content: Some(1),
                ..Default::default()
            },
        );
        let out = v
            .check(&acct(), &dev("c"), Some("m1"), Some(&sid("s2")), 3_000)
            .unwrap();
        assert!(out.allowed);
        assert_eq!(victims(&out), ["s1"]);
    }

    #[test]
    fn an_active_device_needs_no_seat_even_over_the_limit() {
        let v = view_of(
            1,
            Policy::EvictOldest,
            &[("a", "s1", 1_000), ("b", "s2", 2_000)],
        );
        let out = v.check(&acct(), &dev("a"), None, None, 3_000).unwrap();
        assert!(out.allowed);
        assert!(out.victims.is_empty());
        assert_eq!(out.active, 2);
    }

    #[test]
    fn check_counts_the_grace_seats() {
        let mut v = View::new(rules(2, Policy::EvictOldest), 0);
        grace(&mut v, 1, 10);
        v.set_dict(&acct(), 0, dict(&[("a", "s1", 1_000), ("b", "s2", 2_000)]));
        let out = v.check(&acct(), &dev("c"), None, None, 3_000).unwrap();
        assert!(out.allowed);
        assert!(out.victims.is_empty(), "the grace seat");
        assert_eq!(out.active, 2);
    }

    #[test]
    fn the_peak_is_per_minute_and_leaves_after_the_window() {
        let mut v = view_of(
            5,
            Policy::EvictOldest,
            &[("a", "s1", 1_000), ("b", "s2", 1_000), ("c", "s3", 1_000)],
        );
        assert_eq!(v.sweep(2_000).1, 3);
        // A minute later only a newcomer is live: minute 0's peak stands.
        v.set_dict(&acct(), 1, dict(&[("d", "s4", 61_000)]));
        assert_eq!(v.sweep(61_000).1, 1);
        assert_eq!(v.breakdown(&acct(), 61_000).peak, 3);
        // Twenty minutes in: minute 0 has left the window.
        v.set_dict(&acct(), 20, dict(&[("e", "s5", 1_200_000)]));
        assert_eq!(v.sweep(1_200_000).1, 1);
        assert_eq!(v.breakdown(&acct(), 1_200_000).peak, 1);
    }

    #[test]
    fn accounts_with_limits_or_a_plan_outlive_their_dictionaries() {
        let plans = headcount_protocol::policy::default_plans();
        let mut v = View::with_plans(rules(1, Policy::EvictOldest), plans, 0);
        let other = AccountId::parse("other").unwrap();
        v.set_dict(&acct(), 0, dict(&[("a", "s1", 1_000)]));
        v.set_dict(&other, 0, dict(&[("b", "s2", 1_000)]));
        let three = AccountLimits {
            limit: Some(3),
            ..Default::default()
        };
        assert!(v.set_overrides_at(&acct(), Some(three), 4));
        v.set_token_plan(&other, Some("premium".into()));
        v.limits_watched_to(4);
        // Both dictionaries expire.
        v.sweep(200_000);
        let mut accounts: Vec<String> = v.accounts().iter().map(|a| a.to_string()).collect();
        accounts.sort();
        assert_eq!(accounts, ["acme", "other"]);
        assert_eq!(v.limit(&acct()).limit, 3);
        assert_eq!(v.limit_and_plan(&other).1.as_deref(), Some("premium"));
    }

    #[test]
    fn a_dictionary_emptied_by_a_move_is_dropped() {
        let mut v = view_of(5, Policy::EvictOldest, &[("a", "s1", 1_000)]);
        v.set_dict(&acct(), 1, dict(&[("a", "s1", 1_000)]));
        let intervals: Vec<u64> = v.accounts[&acct()].dicts.iter().map(|(i, _)| i).collect();
        assert_eq!(intervals, [1]);
    }
}
