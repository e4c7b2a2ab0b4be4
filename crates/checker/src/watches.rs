//! Applying what the checker hears to the view: what the KV watches deliver
//! (interval dictionaries, revocations, limits: an operator's record or a
//! token's plan) and the subjects of heartbeats (liveness).
//!
//! A change that may put an account over its limit sends the account to the
//! enforcer.

use async_nats::jetstream::kv;
use headcount_protocol::subjects::kv as keys;
use headcount_protocol::{AccountId, AccountLimits, now_millis, subjects};
use headcount_runtime::effects::{self, DictEntry};
use serde::de::DeserializeOwned;

use crate::shared::Shared;
use crate::view::View;

/// What applies one entry of a watched bucket to the view.
pub(crate) type OnEntry = fn(&Shared, kv::Entry);

/// A heartbeat heard on `subject`: its session is alive now. Only the
/// subject is read; the payload is the handler's business.
pub(crate) fn on_heartbeat(shared: &Shared, subject: &str) {
    shared.metrics.heartbeats.inc();
    let Ok((_, ids)) = subjects::parse_partitioned_ref(subject) else {
        return;
    };
    let revived =
        shared
            .view(ids.account)
            .heard(ids.account, ids.device, ids.session, now_millis());
    if revived && let Ok(account) = AccountId::parse(ids.account) {
        shared.enforce(account);
    }
}

/// Every dictionary that arrives sends its account to the enforcer, also
/// one of an interval this checker's clock has not reached yet (written by
/// a handler whose clock is ahead): the view reads that interval too.
pub(crate) fn on_dict_entry(shared: &Shared, entry: kv::Entry) {
    let Some(dict) = effects::dict_entry(&entry) else {
        return;
    };
    let account = apply_dict(&mut shared.view(dict.account.as_str()), dict);
    shared.enforce(account);
}

pub(crate) fn on_revoked_entry(shared: &Shared, entry: kv::Entry) {
    if let Some((account, session)) = keys::parse_revoked(&entry.key) {
        let mut v = shared.view(account.as_str());
        match entry.operation {
            kv::Operation::Put => v.revoke(&account, &session),
            _ => v.unrevoke(&account, &session),
        }
    }
}

pub(crate) fn on_limit_entry(shared: &Shared, entry: kv::Entry) {
    let Some(change) = limits_change(&entry.key, entry.operation, &entry.value) else {
        return;
    };
    let account = apply_limits(
        &mut shared.view(change.account().as_str()),
        change,
        entry.revision,
    );
    shared.enforce(account);
}

/// Installs a dictionary in the view; returns its account.
fn apply_dict(view: &mut View, dict: DictEntry) -> AccountId {
    view.set_dict(&dict.account, dict.interval, dict.entries);
    dict.account
}

/// A change to an account's limits, as the limits bucket records it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LimitsChange {
    /// What an operator stored (None: removed).
    Overrides(AccountId, Option<AccountLimits>),
    /// The plan of the account's latest token (None: removed).
    TokenPlan(AccountId, Option<String>),
}

impl LimitsChange {
    fn account(&self) -> &AccountId {
        match self {
            LimitsChange::Overrides(a, _) | LimitsChange::TokenPlan(a, _) => a,
        }
    }
}

/// Reads an entry of the limits bucket. A key of no known kind, or a value
/// that cannot be read, is no change (the latter is logged).
fn limits_change(key: &str, operation: kv::Operation, value: &[u8]) -> Option<LimitsChange> {
    fn read<T: DeserializeOwned>(
        key: &str,
        operation: kv::Operation,
        value: &[u8],
    ) -> Option<Option<T>> {
        match operation {
            kv::Operation::Put => match serde_json::from_slice(value) {
                Ok(v) => Some(Some(v)),
                Err(e) => {
                    tracing::warn!(key, error = %e, "unreadable limits entry");
                    None
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => Some(None),
        }
    }
    match keys::parse_limits(key)? {
        keys::LimitsKey::Overrides(account) => Some(LimitsChange::Overrides(
            account,
            read(key, operation, value)?,
        )),
        keys::LimitsKey::TokenPlan(account) => Some(LimitsChange::TokenPlan(
            account,
            read(key, operation, value)?,
        )),
    }
}

/// Applies a limits change the watch brought at `revision` to the view;
/// returns its account.
fn apply_limits(view: &mut View, change: LimitsChange, revision: u64) -> AccountId {
    view.limits_watched_to(revision);
    match change {
        LimitsChange::Overrides(account, o) => {
            view.set_overrides_at(&account, o, revision);
            account
        }
        LimitsChange::TokenPlan(account, plan) => {
            view.set_token_plan(&account, plan);
            account
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::testing::{acct, dict, rules};
    use headcount_protocol::Policy;

    fn entry(interval: u64, sessions: &[(&str, &str, u64)]) -> DictEntry {
        DictEntry {
            account: acct(),
            interval,
            revision: 1,
            entries: dict(sessions).into(),
        }
    }

    fn active(v: &View, now: u64) -> Vec<String> {
        v.active(&acct(), now)
            .into_iter()
            .map(|s| s.session.as_str().to_owned())
            .collect()
    }

    #[test]
    fn a_dictionary_entry_installs_its_sessions_and_a_delete_removes_them() {
        let mut v = View::new(rules(5, Policy::EvictOldest), 0);
        let account = apply_dict(&mut v, entry(0, &[("a", "s1", 1_000), ("b", "s2", 2_000)]));
        assert_eq!(account, acct(), "the account to look at again");
        assert_eq!(active(&v, 3_000), ["s1", "s2"]);
        // A newer copy of the same dictionary replaces the older one.
        apply_dict(&mut v, entry(0, &[("b", "s2", 2_000)]));
        assert_eq!(active(&v, 3_000), ["s2"]);
        // Deleted or expired: the watch delivers it empty.
        apply_dict(&mut v, entry(0, &[]));
        assert!(active(&v, 3_000).is_empty());
    }

    #[test]
    fn limits_entries_set_and_clear_overrides_and_token_plans() {
        let put = kv::Operation::Put;
        let change = limits_change("acme", put, br#"{"limit":7}"#).unwrap();
        assert_eq!(
            change,
            LimitsChange::Overrides(
                acct(),
                Some(AccountLimits {
                    limit: Some(7),
                    ..Default::default()
                })
            )
        );
        let plans = headcount_protocol::policy::default_plans();
        let mut v = View::with_plans(rules(3, Policy::EvictOldest), plans, 0);
        assert_eq!(apply_limits(&mut v, change, 1), acct());
        assert_eq!(v.limit(&acct()).limit, 7);

        let change = limits_change("acme.plan", put, br#""premium""#).unwrap();
        assert_eq!(
            change,
            LimitsChange::TokenPlan(acct(), Some("premium".into()))
        );
        apply_limits(&mut v, change, 2);
        assert_eq!(v.limit_and_plan(&acct()).1.as_deref(), Some("premium"));

        let removed = limits_change("acme", kv::Operation::Delete, b"").unwrap();
        assert_eq!(removed, LimitsChange::Overrides(acct(), None));
        apply_limits(&mut v, removed, 3);
        assert_eq!(v.limit(&acct()).limit, 4, "back to the token's plan");
        let removed = limits_change("acme.plan", kv::Operation::Purge, b"").unwrap();
        apply_limits(&mut v, removed, 4);
        assert_eq!(v.limit(&acct()).limit, 3, "back to the default");
    }

    #[test]
    fn an_older_limits_record_never_replaces_a_newer_one() {
        let mut v = View::new(rules(3, Policy::EvictOldest), 0);
        let record = |limit: u32| {
            Some(AccountLimits {
                limit: Some(limit),
                ..Default::default()
            })
        };
        // This checker stored revision 5 itself; the watch, running behind,
        // then brings revision 4 and only later 5 and 6.
        assert!(v.set_overrides_at(&acct(), record(5), 5));
        let stale = LimitsChange::Overrides(acct(), record(4));
        apply_limits(&mut v, stale, 4);
        assert_eq!(v.limit(&acct()).limit, 5, "revision 4 is older");
        apply_limits(&mut v, LimitsChange::Overrides(acct(), record(5)), 5);
        apply_limits(&mut v, LimitsChange::Overrides(acct(), None), 6);
        assert_eq!(v.limit(&acct()).limit, 3, "removed at revision 6");
        // A request that read revision 5 and lost the race to 6 does not
        // bring its record back either.
        assert!(!v.set_overrides_at(&acct(), record(9), 5));
        assert_eq!(v.limit(&acct()).limit, 3);
    }

    #[test]
    fn a_dictionary_of_the_next_interval_counts_and_is_enforced_at_once() {
        // One-minute intervals; this checker's clock is at 50 s (interval
        // 0), a handler's is past 60 s already.
        let mut v = View::new(rules(1, Policy::EvictOldest), 0);
        apply_dict(&mut v, entry(0, &[("a", "s1", 45_000)]));
        let account = apply_dict(&mut v, entry(1, &[("b", "s2", 61_000)]));
        assert_eq!(account, acct(), "the account goes to the enforcer");
        assert_eq!(active(&v, 50_000), ["s1", "s2"]);
        let over = v.over_limit(&acct(), 50_000);
        assert_eq!(over.len(), 1);
        assert_eq!(over[0].victim.session.as_str(), "s1");
    }

    #[test]
    fn unreadable_limits_entries_change_nothing() {
        let put = kv::Operation::Put;
        assert_eq!(limits_change("acme", put, b"{not json"), None);
        assert_eq!(limits_change("acme.plan", put, b"7"), None);
        assert_eq!(limits_change("bad key!", put, br#"{"limit":7}"#), None);
    }
}
