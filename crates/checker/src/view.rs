//! The checker's in-memory view of every account, and the limit rules.
//!
//! Pure data, no I/O. Sessions come from the interval dictionaries (as the KV
//! watch delivers them), liveness from the heartbeats this checker sees, and
//! revocations from the revoked bucket. A session is active when a live
//! dictionary holds it, it is not revoked, and it was heard from within the
//! timeout.

use std::collections::{BTreeMap, HashMap, HashSet};

use headcount_protocol::wire::{ActiveSession, SessionDict, SessionRef};
use headcount_protocol::{
    AccountId, DeviceId, IntervalClock, Limit, Policy, SessionId, UnixMillis,
};

/// Liveness and limit defaults.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub clock: IntervalClock,
    /// A session not heard from for this long is out.
    pub timeout_ms: u64,
    pub default_limit: Limit,
}

#[derive(Debug, Default)]
struct Account {
    dicts: BTreeMap<u64, SessionDict>,
    limit: Option<Limit>,
    /// Last heartbeat this checker saw, per session.
    heard: HashMap<SessionId, UnixMillis>,
    /// Sessions already announced as timed out.
    timed_out: HashSet<SessionId>,
    /// Every session some dictionary holds (the liveness lookup runs per
    /// heartbeat, so it must not scan the dictionaries).
    known: HashSet<SessionId>,
}

impl Account {
    fn reindex(&mut self) {
        self.known = self
            .dicts
            .values()
            .flat_map(|d| d.values().map(|r| r.session.clone()))
            .collect();
    }
}

/// Every account as this checker knows it.
#[derive(Debug)]
pub struct View {
    rules: Rules,
    /// Sessions are given this as their earliest liveness, so that a checker
    /// that just started does not time out sessions it has not heard yet.
    started_at: UnixMillis,
    accounts: HashMap<AccountId, Account>,
    revoked: HashSet<(AccountId, SessionId)>,
}

/// A session that should be ended now, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub victim: SessionRef,
    pub rejected: bool,
    pub by: Option<SessionRef>,
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
        Self {
            rules,
            started_at,
            accounts: HashMap::new(),
            revoked: HashSet::new(),
        }
    }

    pub fn set_dict(&mut self, account: &AccountId, interval: u64, dict: SessionDict) {
        let acct = self.accounts.entry(account.clone()).or_default();
        if dict.is_empty() {
            acct.dicts.remove(&interval);
        } else {
            acct.dicts.insert(interval, dict);
        }
        acct.reindex();
    }

    pub fn set_limit(&mut self, account: &AccountId, limit: Option<Limit>) {
        self.accounts.entry(account.clone()).or_default().limit = limit;
    }

    pub fn limit(&self, account: &AccountId) -> Limit {
        self.accounts
            .get(account)
            .and_then(|a| a.limit)
            .unwrap_or(self.rules.default_limit)
    }

    pub fn revoke(&mut self, account: &AccountId, session: &SessionId) {
        self.revoked.insert((account.clone(), session.clone()));
    }

    /// Forgets a revocation whose KV entry expired.
    pub fn unrevoke(&mut self, account: &AccountId, session: &SessionId) {
        self.revoked.remove(&(account.clone(), session.clone()));
    }

    pub fn is_revoked(&self, account: &AccountId, session: &SessionId) -> bool {
        self.revoked.contains(&(account.clone(), session.clone()))
    }

    /// Records a heartbeat heard on the wire. Only sessions a dictionary
    /// holds are tracked, so junk subjects cannot grow the view. Returns
    /// whether the session just became evidently live to this checker (first
    /// heartbeat heard, or back after a timeout): the account's limit must
    /// then be looked at again.
    pub fn heard(&mut self, account: &AccountId, session: &SessionId, now: UnixMillis) -> bool {
        let Some(acct) = self.accounts.get_mut(account) else {
            return false;
        };
        if !acct.known.contains(session) {
            return false;
        }
        let was_timed_out = acct.timed_out.remove(session);
        let before = acct.heard.insert(session.clone(), now);
        was_timed_out || before.is_none_or(|t| now.saturating_sub(t) > self.rules.timeout_ms)
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

    /// Sessions recorded in a live dictionary and not revoked, with their
    /// best-known last heartbeat, whether timed out or not.
    fn candidates(
        &self,
        account: &AccountId,
        acct: &Account,
        now: UnixMillis,
        grace: bool,
    ) -> Vec<ActiveSession> {
        let floor = if grace { self.started_at } else { 0 };
        let [prev, cur] = self.rules.clock.live_intervals(now);
        // Newest interval wins per device.
        let mut per_device: HashMap<&DeviceId, (&headcount_protocol::wire::SessionRecord, u64)> =
            HashMap::new();
        for (interval, dict) in acct.dicts.range(prev..=cur) {
            for (device, rec) in dict {
                per_device.insert(device, (rec, *interval));
            }
        }
        per_device
            .into_iter()
            .filter(|(_, (rec, _))| !self.is_revoked(account, &rec.session))
            .map(|(device, (rec, _))| {
                let heard = acct.heard.get(&rec.session).copied().unwrap_or(0);
                ActiveSession {
                    device: device.clone(),
                    session: rec.session.clone(),
                    since: rec.since,
                    last_seen: rec.last_seen.max(heard).max(floor),
                    content: rec.content.clone(),
                    kind: rec.kind.clone(),
                    region: rec.region.clone(),
                }
            })
            .collect()
    }

    /// Sessions beyond the account's limit, as its policy sees them:
    /// evict-oldest ends the oldest, reject-new the newest.
    pub fn over_limit(&self, account: &AccountId, now: UnixMillis) -> Vec<Verdict> {
        let active = self.enforceable(account, now);
        let limit = self.limit(account);
        let excess = active.len().saturating_sub(limit.limit as usize);
        if excess == 0 {
            return Vec::new();
        }
        let newest = active.last().map(|s| SessionRef {
            device: s.device.clone(),
            session: s.session.clone(),
        });
        let as_ref = |s: &ActiveSession| SessionRef {
            device: s.device.clone(),
            session: s.session.clone(),
        };
        match limit.policy {
            Policy::EvictOldest => active[..excess]
                .iter()
                .map(|s| Verdict {
                    victim: as_ref(s),
                    rejected: false,
                    by: newest.clone(),
                })
                .collect(),
            Policy::RejectNew => active[active.len() - excess..]
                .iter()
                .map(|s| Verdict {
                    victim: as_ref(s),
                    rejected: true,
                    by: None,
                })
                .collect(),
        }
    }

    /// "May this device play now?"
    pub fn check(&self, account: &AccountId, device: &DeviceId, now: UnixMillis) -> CheckOutcome {
        let active = self.enforceable(account, now);
        let limit = self.limit(account);
        let n = active.len();
        let already = active.iter().any(|s| &s.device == device);
        if already || n < limit.limit as usize {
            return CheckOutcome {
                allowed: true,
                limit,
                active: n as u32,
                victims: Vec::new(),
            };
        }
        match limit.policy {
            Policy::RejectNew => CheckOutcome {
                allowed: false,
                limit,
                active: n as u32,
                victims: Vec::new(),
            },
            Policy::EvictOldest => {
                // Make one seat free for the newcomer.
                let excess = n + 1 - limit.limit as usize;
                let victims: Vec<SessionRef> = active[..excess]
                    .iter()
                    .map(|s| SessionRef {
                        device: s.device.clone(),
                        session: s.session.clone(),
                    })
                    .collect();
                CheckOutcome {
                    allowed: true,
                    limit,
                    active: (n - excess) as u32,
                    victims,
                }
            }
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
        let [prev, cur] = self.rules.clock.live_intervals(now);
        acct.dicts
            .range(prev..=cur)
            .flat_map(|(_, d)| d.iter())
            .find(|(_, r)| &r.session == session)
            .map(|(d, _)| d.clone())
    }

    /// Sessions that crossed the timeout since the last call, each reported
    /// once; also drops what no live interval refers to any more.
    pub fn sweep(&mut self, now: UnixMillis) -> Vec<(AccountId, ActiveSession)> {
        let [prev, _] = self.rules.clock.live_intervals(now);
        let mut timed_out = Vec::new();
        let accounts: Vec<AccountId> = self.accounts.keys().cloned().collect();
        for account in accounts {
            let Some(acct) = self.accounts.get(&account) else {
                continue;
            };
            let expired: Vec<ActiveSession> = self
                .candidates(&account, acct, now, true)
                .into_iter()
                .filter(|s| now.saturating_sub(s.last_seen) > self.rules.timeout_ms)
                .filter(|s| !acct.timed_out.contains(&s.session))
                .collect();
            let Some(acct) = self.accounts.get_mut(&account) else {
                continue;
            };
            for s in expired {
                acct.timed_out.insert(s.session.clone());
                timed_out.push((account.clone(), s));
            }
            let before = acct.dicts.len();
            acct.dicts.retain(|i, _| *i >= prev);
            if acct.dicts.len() != before {
                acct.reindex();
            }
            let known = &acct.known;
            acct.heard.retain(|s, _| known.contains(s));
            acct.timed_out.retain(|s| known.contains(s));
        }
        self.accounts
            .retain(|_, a| !a.dicts.is_empty() || a.limit.is_some());
        // A revocation matters only while a live dictionary holds the session.
        let accounts = &self.accounts;
        self.revoked
            .retain(|(a, s)| accounts.get(a).is_some_and(|acct| acct.known.contains(s)));
        timed_out
    }

    /// Every account the view knows.
    pub fn accounts(&self) -> Vec<AccountId> {
        self.accounts.keys().cloned().collect()
    }

    /// Active sessions over all accounts (for the gauge).
    pub fn total_active(&self, now: UnixMillis) -> usize {
        self.accounts
            .keys()
            .map(|a| self.active(a, now).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use headcount_protocol::wire::SessionRecord;
    use std::time::Duration;

    fn rules(limit: u32, policy: Policy) -> Rules {
        Rules {
            clock: IntervalClock::new(Duration::from_secs(60)),
            timeout_ms: 15_000,
            default_limit: Limit { limit, policy },
        }
    }

    fn acct() -> AccountId {
        AccountId::parse("acme").unwrap()
    }

    fn dict(entries: &[(&str, &str, u64)]) -> SessionDict {
        entries
            .iter()
            .map(|(d, s, since)| {
                (
                    DeviceId::parse(d).unwrap(),
                    SessionRecord {
                        session: SessionId::parse(s).unwrap(),
                        since: *since,
                        last_seen: *since,
                        content: None,
                        kind: None,
                        region: None,
                        replaced: None,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn newest_interval_wins_and_revoked_are_hidden() {
        let mut v = View::new(rules(5, Policy::EvictOldest), 0);
        v.set_dict(&acct(), 0, dict(&[("a", "s1", 1_000), ("b", "s2", 2_000)]));
        v.set_dict(&acct(), 1, dict(&[("a", "s3", 61_000)]));
        let active = v.active(&acct(), 62_000);
        let sessions: Vec<&str> = active.iter().map(|s| s.session.as_str()).collect();
        assert_eq!(sessions, ["s3"], "b timed out, a replaced by s3");
        v.revoke(&acct(), &SessionId::parse("s3").unwrap());
        assert!(v.active(&acct(), 62_000).is_empty());
    }

    #[test]
    fn heartbeats_keep_sessions_alive_and_timeouts_are_reported_once() {
        let mut v = View::new(rules(5, Policy::EvictOldest), 0);
        let s1 = SessionId::parse("s1").unwrap();
        v.set_dict(&acct(), 0, dict(&[("a", "s1", 1_000)]));
        assert!(v.heard(&acct(), &s1, 10_000));
        assert!(!v.heard(&acct(), &SessionId::parse("nope").unwrap(), 10_000));
        assert_eq!(v.active(&acct(), 24_000).len(), 1);
        assert!(v.sweep(24_000).is_empty());
        assert_eq!(v.sweep(25_001).len(), 1);
        assert!(v.sweep(26_000).is_empty());
        assert!(v.active(&acct(), 25_001).is_empty());
    }

    #[test]
    fn evict_oldest_and_reject_new() {
        let mut v = View::new(rules(2, Policy::EvictOldest), 0);
        v.set_dict(
            &acct(),
            0,
            dict(&[("a", "s1", 1_000), ("b", "s2", 2_000), ("c", "s3", 3_000)]),
        );
        let over = v.over_limit(&acct(), 4_000);
        assert_eq!(over.len(), 1);
        assert_eq!(over[0].victim.session.as_str(), "s1");
        assert_eq!(over[0].by.as_ref().unwrap().session.as_str(), "s3");

        v.set_limit(
            &acct(),
            Some(Limit {
                limit: 2,
                policy: Policy::RejectNew,
            }),
        );
        let over = v.over_limit(&acct(), 4_000);
        assert_eq!(over[0].victim.session.as_str(), "s3");
        assert!(over[0].rejected);
    }

    #[test]
    fn check_follows_the_policy() {
        let mut v = View::new(rules(2, Policy::EvictOldest), 0);
        v.set_dict(&acct(), 0, dict(&[("a", "s1", 1_000), ("b", "s2", 2_000)]));
        let d = |s| DeviceId::parse(s).unwrap();
        // An active device is always allowed and takes no extra seat.
        let out = v.check(&acct(), &d("a"), 3_000);
        assert!(out.allowed && out.victims.is_empty());
        let out = v.check(&acct(), &d("c"), 3_000);
        assert!(out.allowed);
        assert_eq!(out.victims.len(), 1);
        assert_eq!(out.victims[0].session.as_str(), "s1");
        assert_eq!(out.active, 1);

        v.set_limit(
            &acct(),
            Some(Limit {
                limit: 2,
                policy: Policy::RejectNew,
            }),
        );
        let out = v.check(&acct(), &d("c"), 3_000);
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
            v.heard(&acct(), &sb, 101_000),
            "first heartbeat heard: look again"
        );
        assert!(v.heard(&acct(), &sc, 102_000));
        assert!(!v.heard(&acct(), &sc, 103_000), "nothing new");
        assert!(v.over_limit(&acct(), 103_000).is_empty(), "two live of two");
        let out = v.check(&acct(), &DeviceId::parse("b").unwrap(), 103_000);
        assert!(out.allowed && out.victims.is_empty());
    }

    #[test]
    fn a_session_back_from_a_timeout_is_looked_at_again() {
        let mut v = View::new(rules(5, Policy::EvictOldest), 0);
        let s1 = SessionId::parse("s1").unwrap();
        v.set_dict(&acct(), 0, dict(&[("a", "s1", 1_000)]));
        assert!(v.heard(&acct(), &s1, 2_000));
        assert_eq!(v.sweep(20_000).len(), 1);
        assert!(v.heard(&acct(), &s1, 21_000), "revived");
    }
}
