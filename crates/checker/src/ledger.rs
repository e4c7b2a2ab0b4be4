//! The account's ledger: every ending the checkers decided for it lately,
//! kept in the revoked bucket under `<account>.=ledger` and written only by
//! compare-and-set on its revision.
//!
//! Architecture invariant: one decision per seat. A checker chooses victims
//! only after reading the ledger, counting every session it names as ended
//! (and ending it too, if its own view does not know that yet), and its
//! choice counts only once its write of the ledger, at the revision it
//! read, has landed. Two checkers, whatever their views, therefore never
//! both make room for the same seat: the second one's write fails, it
//! reads the first one's victims, and chooses again without them. Who tells
//! the device stays with the create-only revocation of each victim
//! ([`crate::enforcement`]).

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use headcount_protocol::subjects::kv as keys;
use headcount_protocol::wire::{Ledger, LedgerEntry, SessionRef};
use headcount_protocol::{AccountId, UnixMillis};
use headcount_runtime::buckets::DEFAULT_REVOKED_TTL;
use headcount_runtime::effects::Decision;

use crate::enforcement::Ending;
use crate::shared::Shared;
use crate::view::View;

/// How often a decision is tried again when another checker's write lands
/// first; each try reads the ledger afresh.
pub(crate) const TRIES: usize = 8;

/// The longest one read or write of the ledger is waited for.
const OP_DEADLINE: Duration = Duration::from_secs(2);

/// How long an entry stays in the ledger: as long as the revocation it
/// stands for lives (by default), so a checker whose revoked watch lags
/// still finds it.
pub(crate) const HORIZON_MS: u64 = DEFAULT_REVOKED_TTL.as_millis() as u64;

/// What one decision came to.
#[derive(Debug)]
pub(crate) struct Outcome<T> {
    /// Endings another decision recorded that this checker's view had not
    /// seen ended yet: it ends them too (the revocation says who tells).
    pub follow: Vec<Ending>,
    /// The endings this decision recorded.
    pub new: Vec<Ending>,
    /// What the plan said besides, from its last try.
    pub out: T,
    /// Why the plan's endings could not be recorded (then `new` is empty
    /// and nothing it chose was ended): the store did not answer, or kept
    /// refusing. Whether the last write landed is unknown; if it did, the
    /// next decision for the account finds it and follows it.
    pub unrecorded: Option<String>,
}

/// The ledger's entry for `ending`, decided at `at` by `decision`.
pub(crate) fn entry(ending: &Ending, at: UnixMillis, decision: &Decision) -> LedgerEntry {
    LedgerEntry {
        device: ending.victim.device.clone(),
        session: ending.victim.session.clone(),
        reason: ending.reason,
        at,
        by: ending.by.clone(),
        decision: Some(decision.as_str().to_owned()),
    }
}

/// The ending an entry stands for.
pub(crate) fn ending(entry: &LedgerEntry) -> Ending {
    Ending {
        victim: SessionRef {
            device: entry.device.clone(),
            session: entry.session.clone(),
        },
        reason: entry.reason,
        by: entry.by.clone(),
    }
}

/// The entries of `ledger` that `view` does not know ended, but those of
/// the decision `ours`: marks each ended in `view` and returns them, to be
/// ended by the caller as well.
pub(crate) fn follow(
    view: &mut View,
    account: &AccountId,
    ledger: &Ledger,
    ours: &Decision,
) -> Vec<Ending> {
    let mut followed = Vec::new();
    for e in &ledger.ended {
        if !is_ours(e, ours) && !view.is_revoked(account, &e.session) {
            view.revoke(account, &e.session);
            followed.push(ending(e));
        }
    }
    followed
}

fn is_ours(entry: &LedgerEntry, ours: &Decision) -> bool {
    entry.decision.as_deref() == Some(ours.as_str())
}

/// The ledger as stored: its entries and the revision to write on top of
/// (0: no key). A value that does not read as a ledger counts as empty,
/// and is overwritten by the next decision.
fn stored(key: &str, entry: Option<(kv::Operation, &[u8], u64)>) -> (Ledger, u64) {
    let Some((operation, value, revision)) = entry else {
        return (Ledger::default(), 0);
    };
    let ledger = match operation {
        kv::Operation::Put => serde_json::from_slice(value).unwrap_or_else(|e| {
            tracing::warn!(key, error = %e, "unreadable ledger; starting it afresh");
            Ledger::default()
        }),
        kv::Operation::Delete | kv::Operation::Purge => Ledger::default(),
    };
    (ledger, revision)
}

/// One decision for one account in the making: the pure steps of
/// [`decide`], which does the reads and writes in between.
#[derive(Debug)]
pub(crate) struct Deciding<T> {
    decision: Decision,
    now: UnixMillis,
    followed: Vec<Ending>,
    /// The endings (and the plan's answer) of each write of this decision
    /// so far, the last one under way: any one of them may have landed, the
    /// last or, since a write given up on can still land late, an earlier
    /// one (never two: a later write expects a revision at least as new as
    /// an earlier one's, so once one lands every other finds the key moved
    /// on).
    written: Vec<(Vec<Ending>, T)>,
}

/// What to do after reading the ledger.
#[derive(Debug)]
pub(crate) enum Step<T> {
    /// The decision is made (nothing to write, or an earlier write of it
    /// turned out to have landed).
    Done(Outcome<T>),
    /// Write `ledger` at `revision`; then [`Deciding::landed`], or read
    /// again.
    Write { ledger: Ledger, revision: u64 },
}

impl<T> Deciding<T> {
    pub fn new(now: UnixMillis) -> Self {
        Self {
            decision: Decision::new(),
            now,
            followed: Vec::new(),
            written: Vec::new(),
        }
    }

    /// The ledger as read (at `revision`, 0: no key): when it holds this
    /// decision's entries, an earlier write landed unacknowledged and the
    /// decision is what that write recorded (not necessarily what the last
    /// plan chose). Otherwise what it names is taken as ended in `view`, and
    /// `plan` chooses on that view: nobody, and the decision is made;
    /// somebody, and the ledger with them added is to be written.
    pub fn read(
        &mut self,
        view: &mut View,
        account: &AccountId,
        mut ledger: Ledger,
        revision: u64,
        plan: &mut impl FnMut(&mut View) -> (Vec<Ending>, T),
    ) -> Step<T> {
        let recorded: Vec<Ending> = ledger
            .ended
            .iter()
            .filter(|e| is_ours(e, &self.decision))
            .map(ending)
            .collect();
        if !recorded.is_empty() {
            // The plan's answer of the write that landed, if it is known
            // which one did; else the last one's.
            let landed = self.written.iter().rposition(|(new, _)| *new == recorded);
            let last = self.written.len().checked_sub(1);
            if let Some(i) = landed.or(last) {
                let (_, out) = self.written.swap_remove(i);
                return Step::Done(self.outcome(recorded, out, None));
            }
        }
        let followed = follow(view, account, &ledger, &self.decision);
        self.followed.extend(followed);
        let (new, out) = plan(view);
        if new.is_empty() {
            return Step::Done(self.outcome(new, out, None));
        }
        let entries = new.iter().map(|e| entry(e, self.now, &self.decision));
        ledger.record(entries, self.now.saturating_sub(HORIZON_MS));
        self.written.push((new, out));
        Step::Write { ledger, revision }
    }

    /// The write asked for landed: the decision is made.
    pub fn landed(&mut self) -> Option<Outcome<T>> {
        let (new, out) = self.written.pop()?;
        Some(self.outcome(new, out, None))
    }

    /// No try got the decision recorded: what was followed is still to be
    /// ended, nothing this decision chose is; `out` is the plan's answer
    /// on the view as it stands.
    pub fn unrecorded(mut self, out: T, why: String) -> Outcome<T> {
        self.outcome(Vec::new(), out, Some(why))
    }

    /// The decision is made: nothing more of it is awaited (a write of it
    /// that still lands is followed by the next decision, as another's).
    fn outcome(&mut self, new: Vec<Ending>, out: T, unrecorded: Option<String>) -> Outcome<T> {
        self.written.clear();
        Outcome {
            follow: std::mem::take(&mut self.followed),
            new,
            out,
            unrecorded,
        }
    }
}

/// Makes one decision for `account` that every checker agrees with.
///
/// `plan` chooses endings from the view (and may say more, `T`). A plan
/// that ends nobody is the answer at once, without touching the store.
/// Otherwise the ledger is read and the decision made from it
/// ([`Deciding::read`]), and its endings are written to the ledger at the
/// revision read. When another write landed first, or the write's outcome
/// is unknown, all of it starts again from a fresh read (which finds the
/// write if it landed after all).
pub(crate) async fn decide<T>(
    shared: &Shared,
    account: &AccountId,
    now: UnixMillis,
    mut plan: impl FnMut(&mut View) -> (Vec<Ending>, T),
) -> Outcome<T> {
    let (first, out) = plan(&mut shared.view(account.as_str()));
    if first.is_empty() {
        return Outcome {
            follow: Vec::new(),
            new: Vec::new(),
            out,
            unrecorded: None,
        };
    }
    let store = &shared.buckets.revoked;
    let key = keys::ledger(account);
    let count = |result: &str| {
        shared
            .metrics
            .ledger_writes
            .with_label_values(&[result])
            .inc()
    };
    let mut deciding = Deciding::new(now);
    let mut last = String::new();
    for attempt in 0..TRIES {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(20 * attempt as u64)).await;
        }
        let (ledger, revision) = match tokio::time::timeout(OP_DEADLINE, store.entry(&key)).await {
            Ok(Ok(entry)) => stored(
                &key,
                entry
                    .as_ref()
                    .map(|e| (e.operation, e.value.as_ref(), e.revision)),
            ),
            Ok(Err(e)) => {
                last = e.to_string();
                continue;
            }
            Err(_) => {
                last = format!("no answer within {OP_DEADLINE:?}");
                continue;
            }
        };
        let step = deciding.read(
            &mut shared.view(account.as_str()),
            account,
            ledger,
            revision,
            &mut plan,
        );
        let (ledger, revision) = match step {
            Step::Done(outcome) => return outcome,
            Step::Write { ledger, revision } => (ledger, revision),
        };
        let body: Bytes = serde_json::to_vec(&ledger).unwrap_or_default().into();
        match tokio::time::timeout(OP_DEADLINE, store.update(&key, body, revision)).await {
            Ok(Ok(_)) => {
                count("ok");
                if let Some(outcome) = deciding.landed() {
                    return outcome;
                }
                break;
            }
            // Another checker decided first: the next read brings its
            // endings, and the plan chooses again without them.
            Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                count("conflict");
                last = e.to_string();
            }
            // Unknown whether it landed: the next read tells.
            Ok(Err(e)) => {
                count("error");
                last = e.to_string();
            }
            Err(_) => {
                count("error");
                last = format!("no acknowledgement within {OP_DEADLINE:?}");
            }
        }
    }
    let out = plan(&mut shared.view(account.as_str())).1;
    deciding.unrecorded(
        out,
        format!("recording the decision: {TRIES} tries: {last}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::testing::{acct, view_of};
    use headcount_protocol::wire::EndReason;
    use headcount_protocol::{DeviceId, Policy, SessionId};

    fn named(device: &str, session: &str, at: UnixMillis) -> LedgerEntry {
        LedgerEntry {
            device: DeviceId::parse(device).unwrap(),
            session: SessionId::parse(session).unwrap(),
            reason: EndReason::Evicted,
            at,
            by: None,
            decision: None,
        }
    }

    #[test]
    fn what_the_ledger_names_is_ended_once_and_no_longer_counted() {
        let mut v = view_of(
            2,
            Policy::EvictOldest,
            &[("a", "s1", 1_000), ("b", "s2", 2_000)],
        );
        let ledger = Ledger {
            ended: vec![named("a", "s1", 5_000)],
        };
        let followed = follow(&mut v, &acct(), &ledger, &Decision::new());
        assert_eq!(followed.len(), 1);
        assert_eq!(followed[0].victim.session.as_str(), "s1");
        assert_eq!(followed[0].reason, EndReason::Evicted);
        assert!(v.is_revoked(&acct(), &SessionId::parse("s1").unwrap()));
        assert!(
            follow(&mut v, &acct(), &ledger, &Decision::new()).is_empty(),
            "an entry the view knows ended is not followed again"
        );
    }

    #[test]
    fn a_second_checker_chooses_around_the_first_ones_victim() {
        // Three on a limit of two under evict-least-active: one must go.
        // The first checker heard s2 least recently and ended it; the
        // second, which heard s1 least recently, reads that and ends no
        // one: one ending in all, as the seat count needs.
        let entries = [("a", "s1", 1_000), ("b", "s2", 2_000), ("c", "s3", 3_000)];
        let mut first = view_of(2, Policy::EvictLeastActive, &entries);
        let mut second = view_of(2, Policy::EvictLeastActive, &entries);
        let now = 10_000;
        first.heard("acme", "a", "s1", 9_000);
        first.heard("acme", "c", "s3", 9_000);
        second.heard("acme", "b", "s2", 9_000);
        second.heard("acme", "c", "s3", 9_000);
        let mine: Vec<String> = first
            .over_limit(&acct(), now)
            .into_iter()
            .map(|v| v.victim.session.to_string())
            .collect();
        assert_eq!(mine, ["s2"]);
        let mut ledger = Ledger::default();
        ledger.record([named("b", "s2", now)], 0);
        let followed = follow(&mut second, &acct(), &ledger, &Decision::new());
        assert_eq!(followed.len(), 1);
        let theirs: Vec<String> = second
            .over_limit(&acct(), now)
            .into_iter()
            .map(|v| v.victim.session.to_string())
            .collect();
        assert_eq!(
            theirs,
            Vec::<String>::new(),
            "s2's end already made the room"
        );
    }

    /// The plan enforcement makes: the sessions over the limit.
    fn over(view: &mut View) -> (Vec<Ending>, ()) {
        let now = 10_000;
        let endings = view
            .over_limit(&acct(), now)
            .into_iter()
            .map(|v| Ending {
                victim: v.victim,
                reason: EndReason::Evicted,
                by: v.by,
            })
            .collect();
        (endings, ())
    }

    fn sessions(endings: &[Ending]) -> Vec<&str> {
        endings.iter().map(|e| e.victim.session.as_str()).collect()
    }

    fn three_on_two() -> View {
        view_of(
            2,
            Policy::EvictOldest,
            &[("a", "s1", 1_000), ("b", "s2", 2_000), ("c", "s3", 3_000)],
        )
    }

    #[test]
    fn a_decision_on_an_empty_ledger_writes_its_victims_at_revision_zero() {
        let mut v = three_on_two();
        let mut d = Deciding::new(10_000);
        let Step::Write { ledger, revision } =
            d.read(&mut v, &acct(), Ledger::default(), 0, &mut over)
        else {
            panic!("a victim to record");
        };
        assert_eq!(revision, 0);
        assert_eq!(ledger.ended.len(), 1);
        assert_eq!(ledger.ended[0].session.as_str(), "s1");
        assert_eq!(ledger.ended[0].at, 10_000);
        let outcome = d.landed().expect("a write was under way");
        assert_eq!(sessions(&outcome.new), ["s1"]);
        assert!(outcome.follow.is_empty() && outcome.unrecorded.is_none());
    }

    #[test]
    fn a_write_that_landed_unacknowledged_is_found_as_this_decisions_own() {
        let mut v = three_on_two();
        let mut d = Deciding::new(10_000);
        let Step::Write { ledger, .. } = d.read(&mut v, &acct(), Ledger::default(), 0, &mut over)
        else {
            panic!("a victim to record");
        };
        // No acknowledgement; the next read shows the write did land.
        let Step::Done(outcome) = d.read(&mut v, &acct(), ledger, 7, &mut over) else {
            panic!("the landed write is the decision");
        };
        assert_eq!(
            sessions(&outcome.new),
            ["s1"],
            "its own victim, to end and announce"
        );
        assert!(
            outcome.follow.is_empty(),
            "not mistaken for another checker's"
        );
    }

    #[test]
    fn an_earlier_write_that_lands_late_is_the_decision_not_the_last_plan() {
        let mut v = three_on_two();
        let mut d = Deciding::new(10_000);
        let Step::Write { ledger: first, .. } =
            d.read(&mut v, &acct(), Ledger::default(), 0, &mut over)
        else {
            panic!("a victim to record");
        };
        // That write is given up on (no answer in time) but is still on its
        // way. The next read shows no change yet; meanwhile s1 left and s4
        // joined, so the plan now chooses s2, at the same revision.
        v.set_dict(
            &acct(),
            0,
            crate::view::testing::dict(&[
                ("b", "s2", 2_000),
                ("c", "s3", 3_000),
                ("d", "s4", 4_000),
            ]),
        );
        let Step::Write { ledger: second, .. } =
            d.read(&mut v, &acct(), Ledger::default(), 0, &mut over)
        else {
            panic!("a victim to record");
        };
        assert_eq!(second.ended[0].session.as_str(), "s2");
        // The first write lands late; the second fails on the revision, and
        // the read after it finds this decision's entry: s1, not s2.
        let Step::Done(outcome) = d.read(&mut v, &acct(), first, 1, &mut over) else {
            panic!("the landed write is the decision");
        };
        assert_eq!(
            sessions(&outcome.new),
            ["s1"],
            "what the ledger recorded is ended, and nothing it does not name"
        );
        assert!(outcome.follow.is_empty());
        assert!(
            d.landed().is_none(),
            "nothing of this decision is under way"
        );
    }

    #[test]
    fn a_lost_race_reads_the_winners_victim_and_chooses_no_other() {
        let mut v = three_on_two();
        let mut d = Deciding::new(10_000);
        assert!(matches!(
            d.read(&mut v, &acct(), Ledger::default(), 0, &mut over),
            Step::Write { .. }
        ));
        // Another checker recorded s2 first (its view differed); this
        // write fails on the revision, and the next read brings s2.
        let mut theirs = Ledger::default();
        theirs.record([named("b", "s2", 9_000)], 0);
        let Step::Done(outcome) = d.read(&mut v, &acct(), theirs, 3, &mut over) else {
            panic!("the room is made already");
        };
        assert_eq!(sessions(&outcome.follow), ["s2"]);
        assert!(outcome.new.is_empty(), "s1 is not ended on top of s2");
        assert!(
            d.landed().is_none(),
            "nothing of this decision is under way"
        );
    }

    #[test]
    fn a_decision_that_never_lands_ends_only_what_it_followed() {
        let mut v = view_of(
            1,
            Policy::EvictOldest,
            &[("a", "s1", 1_000), ("b", "s2", 2_000), ("c", "s3", 3_000)],
        );
        let mut d = Deciding::new(10_000);
        let mut theirs = Ledger::default();
        theirs.record([named("a", "s1", 9_000)], 0);
        let Step::Write { ledger, revision } = d.read(&mut v, &acct(), theirs, 4, &mut over) else {
            panic!("one more must go");
        };
        assert_eq!(revision, 4);
        assert_eq!(ledger.ended.len(), 2, "theirs kept, ours added");
        let outcome = d.unrecorded((), "no answer".into());
        assert_eq!(sessions(&outcome.follow), ["s1"]);
        assert!(outcome.new.is_empty());
        assert_eq!(outcome.unrecorded.as_deref(), Some("no answer"));
    }

    #[test]
    fn the_ledger_forgets_entries_past_the_horizon_and_names_each_session_once() {
        let mut ledger = Ledger::default();
        assert_eq!(
            ledger.record([named("a", "s1", 1_000), named("b", "s2", 5_000)], 0),
            2
        );
        assert_eq!(
            ledger.record([named("a", "s1", 6_000)], 0),
            0,
            "named already"
        );
        assert_eq!(ledger.record([named("c", "s3", 6_000)], 2_000), 1);
        let names: Vec<&str> = ledger.ended.iter().map(|e| e.session.as_str()).collect();
        assert_eq!(names, ["s2", "s3"], "s1 was decided before the horizon");
    }

    #[test]
    fn the_ledger_keeps_its_newest_entries_within_its_bound() {
        let mut ledger = Ledger::default();
        let many = (0..Ledger::MAX_ENTRIES + 5).map(|i| named("d", &format!("s{i}"), 1_000));
        ledger.record(many, 0);
        assert_eq!(ledger.ended.len(), Ledger::MAX_ENTRIES);
        assert_eq!(
            ledger.ended[0].session.as_str(),
            "s5",
            "the oldest went first"
        );
    }

    #[test]
    fn the_ledger_is_read_as_stored_and_anything_else_counts_as_empty() {
        assert_eq!(stored("k", None), (Ledger::default(), 0), "no key");
        let mut ledger = Ledger::default();
        ledger.record([named("a", "s1", 5_000)], 0);
        let body = serde_json::to_vec(&ledger).unwrap();
        assert_eq!(
            stored("k", Some((kv::Operation::Put, &body, 7))),
            (ledger, 7)
        );
        for op in [kv::Operation::Delete, kv::Operation::Purge] {
            assert_eq!(
                stored("k", Some((op, &body, 9))),
                (Ledger::default(), 9),
                "a deleted key is empty, written on top of its marker"
            );
        }
        assert_eq!(
            stored("k", Some((kv::Operation::Put, b"not json", 4))),
            (Ledger::default(), 4),
            "unreadable: empty, overwritten at its revision"
        );
    }

    #[test]
    fn the_answer_is_the_one_of_the_write_that_landed() {
        let mut v = three_on_two();
        let mut d = Deciding::new(10_000);
        // Each try of the plan chooses another victim, and says which try
        // it was.
        let mut tries = 0;
        let mut plan = |_: &mut View| {
            tries += 1;
            let victim = if tries == 1 { "s1" } else { "s2" };
            let ending = super::ending(&named("x", victim, 0));
            (vec![ending], tries)
        };
        let Step::Write { ledger: first, .. } =
            d.read(&mut v, &acct(), Ledger::default(), 0, &mut plan)
        else {
            panic!("a victim to record");
        };
        // The first write's outcome is unknown and a read shows nothing
        // yet: a second try writes again.
        assert!(matches!(
            d.read(&mut v, &acct(), Ledger::default(), 0, &mut plan),
            Step::Write { .. }
        ));
        // Then the first write turns out to have landed after all.
        let Step::Done(outcome) = d.read(&mut v, &acct(), first, 5, &mut plan) else {
            panic!("the landed write is the decision");
        };
        assert_eq!(sessions(&outcome.new), ["s1"]);
        assert_eq!(outcome.out, 1, "the answer of the try that landed");
    }
}
