//! Ending sessions: which ones an account over its limit must lose, and
//! ending one (the revocation, then the control message and the event).
//!
//! Architecture invariant: a session is ended only through a create-only
//! write of its revocation key, and only the decision whose write holds the
//! key tells the device and publishes the event, so several checkers
//! reaching the same verdict end it once. Each decision carries its own id
//! ([`Decision`]), so a write whose acknowledgement was lost is still known
//! for its own when read back, and a retry of an unsettled ending is made
//! as the same decision.
//!
//! Accounts are enforced side by side, each by one run at a time: a slow
//! revocation holds up the endings of its own account only, and an
//! account's endings happen in the order they were chosen.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use headcount_protocol::subjects;
use headcount_protocol::wire::{
    ControlMessage, ControlType, EndReason, EventType, PresenceEvent, Revocation, SessionRef,
};
use headcount_protocol::{AccountId, UnixMillis, now_millis};
use headcount_runtime::effects::{self, Decision, Once};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::ledger;
use crate::shared::Shared;
use crate::view::View;

/// How many accounts may have a run under way at once. Each run waits on
/// its own account's revocations only; the bound keeps an unreachable store
/// from gathering a task per account.
pub(crate) const ACCOUNTS_AT_ONCE: usize = 64;

/// The first wait before an account's unsettled endings are tried again;
/// it doubles with each further failure, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// How long an ending decided by a request (`kick`, `check`) is retried,
/// as the same decision, while the revoked bucket does not settle it.
pub(crate) const REQUEST_PATIENCE: Duration = Duration::from_secs(30);

/// A session to end, why, and the session it makes room for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ending {
    pub victim: SessionRef,
    pub reason: EndReason,
    pub by: Option<SessionRef>,
}

/// The sessions `account` must lose now to be within its limits.
pub(crate) fn endings(view: &mut View, account: &AccountId, now: UnixMillis) -> Vec<Ending> {
    view.over_limit(account, now)
        .into_iter()
        .map(|v| Ending {
            reason: if v.rejected {
                EndReason::Rejected
            } else {
                EndReason::Evicted
            },
            victim: v.victim,
            by: v.by,
        })
        .collect()
}

/// One decision to end a session: the revocation it records and the id
/// that makes the record its own. Every retry of the ending reuses it
/// whole, so a try that landed unseen is found as this decision's.
#[derive(Debug, Clone)]
pub(crate) struct Decided {
    pub(crate) account: AccountId,
    pub(crate) victim: SessionRef,
    pub(crate) revocation: Revocation,
    pub(crate) decision: Decision,
}

impl Decided {
    pub(crate) fn new(account: AccountId, ending: Ending, at: UnixMillis) -> Self {
        Self {
            revocation: Revocation {
                reason: ending.reason,
                device: ending.victim.device.clone(),
                at,
                by: ending.by,
            },
            account,
            victim: ending.victim,
            decision: Decision::new(),
        }
    }
}

/// How an ending came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// This decision ended the session and told the device.
    Won,
    /// Another decision ended it, and told the device (or will).
    Lost,
    /// The revoked bucket did not settle the write: it may or may not have
    /// landed. Retry as the same decision.
    Unsettled,
}

/// How an ending is told: the control message to the device, the presence
/// event, and the action it is counted as.
fn notices(reason: EndReason) -> (ControlType, EventType, &'static str) {
    match reason {
        EndReason::Evicted => (
            ControlType::DeviceLimitExceeded,
            EventType::Evicted,
            "evicted",
        ),
        EndReason::Rejected => (
            ControlType::DeviceLimitExceeded,
            EventType::Rejected,
            "rejected",
        ),
        EndReason::Revoked | EndReason::Replaced => {
            (ControlType::Revoked, EventType::Revoked, "revoked")
        }
    }
}

/// Which accounts the enforcer runs, and when: at most one run per account
/// at a time (its endings in order), up to `at_once` accounts side by side,
/// the rest queued in the order they asked.
#[derive(Debug)]
pub(crate) struct Schedule {
    states: HashMap<AccountId, Run>,
    queue: VecDeque<AccountId>,
    running: usize,
    at_once: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// Waiting for a free slot.
    Queued,
    /// Under way; `again` once something changed since it looked at the
    /// view, so it runs once more when it is done.
    Running { again: bool },
    /// Some endings are unsettled: it runs again when its retry is due, not
    /// sooner, however often it is asked (the store is what it waits for).
    Resting,
}

impl Schedule {
    pub(crate) fn new(at_once: usize) -> Self {
        Self {
            states: HashMap::new(),
            queue: VecDeque::new(),
            running: 0,
            at_once: at_once.max(1),
        }
    }

    /// `account`'s limit must be looked at again.
    pub(crate) fn request(&mut self, account: AccountId) {
        match self.states.get_mut(&account) {
            None => {
                self.states.insert(account.clone(), Run::Queued);
                self.queue.push_back(account);
            }
            Some(Run::Running { again }) => *again = true,
            // A queued run will see the latest view; a resting one its retry.
            Some(Run::Queued | Run::Resting) => {}
        }
    }

    /// The next account to run, if a slot is free.
    pub(crate) fn start(&mut self) -> Option<AccountId> {
        if self.running >= self.at_once {
            return None;
        }
        let account = self.queue.pop_front()?;
        self.states
            .insert(account.clone(), Run::Running { again: false });
        self.running += 1;
        Some(account)
    }

    /// `account`'s run is over; `unsettled` when some of its endings wait
    /// for a retry (then [`Schedule::wake`] runs it again).
    pub(crate) fn finished(&mut self, account: &AccountId, unsettled: bool) {
        self.running = self.running.saturating_sub(1);
        let again = matches!(
            self.states.remove(account),
            Some(Run::Running { again: true })
        );
        if unsettled {
            self.states.insert(account.clone(), Run::Resting);
        } else if again {
            self.request(account.clone());
        }
    }

    /// `account`'s retry is due.
    pub(crate) fn wake(&mut self, account: AccountId) {
        if self.states.get(&account) == Some(&Run::Resting) {
            self.states.remove(&account);
            self.request(account);
        }
    }
}

/// The wait before the next retry of an account, after `previous` (none:
/// its first failure).
pub(crate) fn retry_wait(previous: Option<Duration>) -> Duration {
    previous.map_or(RETRY_FIRST, |w| (w * 2).min(RETRY_MAX))
}

/// What an account's run leaves to its next one.
#[derive(Debug)]
pub(crate) struct Left {
    pub account: AccountId,
    /// Endings the revoked bucket did not settle, to retry as the same
    /// decisions (in order).
    pub endings: Vec<Decided>,
    /// The ledger did not take this run's decision: decide again.
    pub undecided: bool,
}

impl Left {
    fn nothing(account: AccountId) -> Self {
        Self {
            account,
            endings: Vec::new(),
            undecided: false,
        }
    }
}

/// Ends sessions beyond each changed account's limit: each account on its
/// own task (see [`Schedule`]), so that one account's slow revocation holds
/// up no other. An ending the revoked bucket did not settle is kept, with
/// its decision, and tried again first when the account's retry is due;
/// the session stays a victim meanwhile. A decision the ledger did not take
/// is made again then.
pub(crate) async fn enforcer(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Ask>) {
    let mut schedule = Schedule::new(ACCOUNTS_AT_ONCE);
    let mut backlog = Backlog::default();
    let mut runs: JoinSet<Left> = JoinSet::new();
    let mut run_of: HashMap<tokio::task::Id, AccountId> = HashMap::new();
    let mut wakes: JoinSet<AccountId> = JoinSet::new();
    loop {
        while let Some(account) = schedule.start() {
            let retry = backlog.take(&account);
            let run = runs.spawn(run_account(shared.clone(), account.clone(), retry));
            run_of.insert(run.id(), account);
        }
        tokio::select! {
            ask = rx.recv() => match ask {
                Some(Ask::Look(account)) => schedule.request(account),
                Some(Ask::Settle(d)) => schedule.request(backlog.hand_over(d)),
                None => break,
            },
            Some(done) = runs.join_next_with_id(), if !runs.is_empty() => {
                let left = match done {
                    Ok((id, left)) => {
                        run_of.remove(&id);
                        left
                    }
                    Err(e) => {
                        let Some(account) = run_of.remove(&e.id()) else {
                            continue;
                        };
                        tracing::error!(%account, error = %e, "enforcement run failed");
                        Left::nothing(account)
                    }
                };
                let account = left.account.clone();
                match backlog.finished(left) {
                    None => schedule.finished(&account, false),
                    Some(wait) => {
                        schedule.finished(&account, true);
                        wakes.spawn(async move {
                            tokio::time::sleep(wait).await;
                            account
                        });
                    }
                }
            }
            Some(Ok(account)) = wakes.join_next(), if !wakes.is_empty() => schedule.wake(account),
        }
    }
}

/// What the enforcer is asked to do.
#[derive(Debug)]
pub(crate) enum Ask {
    /// Look at an account's limit again.
    Look(AccountId),
    /// Take over an ending a request (`kick`, `check`) could not settle in
    /// its time, and retry it, as the same decision, until it settles.
    Settle(Decided),
}

/// The endings the enforcer still owes, per account, and the wait before
/// their next retry. The enforcer ([`enforcer`]) and the checkers'
/// simulation keep their books with it.
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    owed: HashMap<AccountId, (Vec<Decided>, Option<Duration>)>,
}

impl Backlog {
    /// The endings to retry first on `account`'s run that starts now.
    pub fn take(&mut self, account: &AccountId) -> Vec<Decided> {
        self.owed
            .get_mut(account)
            .map(|(d, _)| std::mem::take(d))
            .unwrap_or_default()
    }

    /// Owes `d` too (after the endings owed already); returns its account,
    /// to run.
    pub fn hand_over(&mut self, d: Decided) -> AccountId {
        let account = d.account.clone();
        self.owed.entry(account.clone()).or_default().0.push(d);
        account
    }

    /// `left` is what a run of its account left: owes it, with any handed
    /// over meanwhile, and says when to run again (None: nothing owed).
    pub fn finished(&mut self, left: Left) -> Option<Duration> {
        let (handed, previous) = self.owed.remove(&left.account).unwrap_or_default();
        let mut endings = left.endings;
        endings.extend(handed);
        if endings.is_empty() && !left.undecided {
            return None;
        }
        let wait = retry_wait(previous);
        self.owed.insert(left.account, (endings, Some(wait)));
        Some(wait)
    }

    /// Whether anything is owed.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.owed.values().all(|(d, _)| d.is_empty())
    }

    /// Forgets everything (the checker stops).
    #[cfg(test)]
    pub fn clear(&mut self) {
        self.owed.clear();
    }
}

/// One run of `account`: first the endings its last run left unsettled
/// (as the same decisions: one of them may have landed unseen), then the
/// sessions it must lose now, decided through the account's ledger
/// ([`ledger::decide`]) so that no other checker makes room for the same
/// seats. Stops at the first ending the revoked bucket does not settle
/// (the rest would wait on the same store) and leaves it, with the rest,
/// to the next run.
async fn run_account(shared: Arc<Shared>, account: AccountId, retry: Vec<Decided>) -> Left {
    let left = end_in_order(&shared, retry).await;
    if !left.is_empty() {
        return Left {
            account,
            endings: left,
            undecided: false,
        };
    }
    let now = now_millis();
    let outcome = ledger::decide(&shared, &account, now, |view| {
        (endings(view, &account, now), ())
    })
    .await;
    if let Some(e) = &outcome.unrecorded {
        tracing::warn!(%account, error = %e, "deciding endings; decided again later");
    }
    let todo = outcome
        .follow
        .into_iter()
        .chain(outcome.new)
        .map(|e| Decided::new(account.clone(), e, now))
        .collect();
    Left {
        endings: end_in_order(&shared, todo).await,
        undecided: outcome.unrecorded.is_some(),
        account,
    }
}

/// Ends `todo` in order, up to the first ending the revoked bucket does
/// not settle; returns that one and those after it.
async fn end_in_order(shared: &Shared, todo: Vec<Decided>) -> Vec<Decided> {
    let mut todo = todo.into_iter();
    while let Some(d) = todo.next() {
        if end(shared, &d).await == Ended::Unsettled {
            return std::iter::once(d).chain(todo).collect();
        }
    }
    Vec::new()
}

/// Ends one session for a request (`kick`, `check`) whose ending the
/// account's ledger holds: records the revocation (create-only, so
/// concurrent checkers agree on one winner), then the winner tells the
/// device and publishes the event. An unsettled write is retried as the
/// same decision for up to [`REQUEST_PATIENCE`], then handed over to the
/// enforcer, which retries it until it settles (a try that landed unseen
/// is still told).
pub(crate) async fn end_session(shared: &Shared, account: &AccountId, ending: Ending) -> Ended {
    let d = Decided::new(account.clone(), ending, now_millis());
    let until = tokio::time::Instant::now() + REQUEST_PATIENCE;
    let mut wait = None;
    loop {
        let ended = end(shared, &d).await;
        let next = retry_wait(wait);
        if ended != Ended::Unsettled {
            return ended;
        }
        if tokio::time::Instant::now() + next > until {
            shared.settle_later(d);
            return ended;
        }
        tokio::time::sleep(next).await;
        wait = Some(next);
    }
}

/// One try at the ending `d`: the revocation, and if this decision holds
/// it, the control message and the event.
async fn end(shared: &Shared, d: &Decided) -> Ended {
    let (account, session) = (&d.account, &d.victim.session);
    let once = match effects::revoke_as(
        &shared.buckets.revoked,
        account,
        session,
        &d.revocation,
        &d.decision,
    )
    .await
    {
        Ok(once) => once,
        Err(e) => {
            tracing::warn!(%account, %session, error = %e, "recording revocation; it is tried again");
            return Ended::Unsettled;
        }
    };
    // Won or lost, the session is over: stop counting it at once rather
    // than when the revoked bucket's watch brings the same news.
    shared.view(account.as_str()).revoke(account, session);
    if once == Once::Lost {
        return Ended::Lost;
    }
    announce(shared, d).await;
    Ended::Won
}

/// Tells the device that `d` ended its session, publishes the event and
/// counts it. Only the decision that holds the revocation gets here.
async fn announce(shared: &Shared, d: &Decided) {
    let (account, victim, at) = (&d.account, &d.victim, d.revocation.at);
    let (control, event, action) = notices(d.revocation.reason);
    shared
        .metrics
        .enforcements
        .with_label_values(&[action])
        .inc();
    tracing::info!(%account, device = %victim.device, session = %victim.session, action, "session ended");
    let msg = ControlMessage {
        kind: control,
        account: account.clone(),
        device: victim.device.clone(),
        session: victim.session.clone(),
        at,
        by: d.revocation.by.clone(),
    };
    if let Err(e) = shared
        .nats
        .publish(
            subjects::control(account, &victim.device),
            msg.encode().into(),
        )
        .await
    {
        tracing::warn!(%account, error = %e, "sending control message");
    }
    shared
        .publish_event(PresenceEvent {
            kind: event,
            account: account.clone(),
            device: victim.device.clone(),
            session: victim.session.clone(),
            at,
            by: d.revocation.by.clone(),
            reason: None,
            content: None,
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::testing::{acct, dict, rules, view_of, with_content};
    use headcount_protocol::{AccountLimits, Policy};

    /// Three sessions, oldest first, on a limit of two.
    fn three_on_two(policy: Policy) -> View {
        view_of(
            2,
            policy,
            &[("a", "s1", 1_000), ("b", "s2", 2_000), ("c", "s3", 3_000)],
        )
    }

    fn sessions(e: &[Ending]) -> Vec<(&str, EndReason, Option<&str>)> {
        e.iter()
            .map(|e| {
                (
                    e.victim.session.as_str(),
                    e.reason,
                    e.by.as_ref().map(|b| b.session.as_str()),
                )
            })
            .collect()
    }

    #[test]
    fn evict_oldest_ends_the_oldest_for_the_newest() {
        let mut v = three_on_two(Policy::EvictOldest);
        let e = endings(&mut v, &acct(), 4_000);
        assert_eq!(sessions(&e), [("s1", EndReason::Evicted, Some("s3"))]);
    }

    #[test]
    fn evict_least_active_ends_the_quietest() {
        let mut v = three_on_two(Policy::EvictLeastActive);
        v.heard("acme", "a", "s1", 9_000);
        v.heard("acme", "c", "s3", 8_000);
        let e = endings(&mut v, &acct(), 9_500);
        assert_eq!(sessions(&e), [("s2", EndReason::Evicted, Some("s3"))]);
    }

    #[test]
    fn reject_new_refuses_the_newest_for_no_one() {
        let mut v = three_on_two(Policy::RejectNew);
        let e = endings(&mut v, &acct(), 4_000);
        assert_eq!(sessions(&e), [("s3", EndReason::Rejected, None)]);
    }

    #[test]
    fn an_ended_session_is_not_ended_again() {
        let mut v = three_on_two(Policy::EvictOldest);
        let e = endings(&mut v, &acct(), 4_000);
        // What end_session does to the view, won or lost.
        v.revoke(&acct(), &e[0].victim.session);
        assert!(
            endings(&mut v, &acct(), 4_000).is_empty(),
            "nothing left to do"
        );
        assert_eq!(v.active(&acct(), 4_000).len(), 2);
    }

    #[test]
    fn per_content_and_account_limits_are_enforced_in_one_pass() {
        let mut v = View::new(rules(2, Policy::EvictOldest), 0);
        let d = dict(&[
            ("a", "s1", 1_000),
            ("b", "s2", 2_000),
            ("c", "s3", 3_000),
            ("d", "s4", 4_000),
        ]);
        v.set_dict(
            &acct(),
            0,
            with_content(d, &[("a", "m1"), ("b", "m1"), ("c", "m2"), ("d", "m3")]),
        );
        v.set_overrides(
            &acct(),
            Some(AccountLimits {
                per_content: Some(1),
                ..Default::default()
            }),
        );
        let e = endings(&mut v, &acct(), 5_000);
        // m1 holds two: s1 goes for s2. Then s2, s3, s4 remain for two
        // seats: the oldest of them, s2, goes for the newest, s4.
        assert_eq!(
            sessions(&e),
            [
                ("s1", EndReason::Evicted, Some("s2")),
                ("s2", EndReason::Evicted, Some("s4")),
            ]
        );
    }

    #[test]
    fn a_grace_delays_the_ending_until_it_runs_out() {
        let mut v = three_on_two(Policy::EvictOldest);
        v.set_overrides(
            &acct(),
            Some(AccountLimits {
                grace: Some(headcount_protocol::Grace { seats: 1, secs: 10 }),
                ..Default::default()
            }),
        );
        assert!(endings(&mut v, &acct(), 4_000).is_empty(), "within grace");
        assert!(endings(&mut v, &acct(), 13_999).is_empty());
        let e = endings(&mut v, &acct(), 14_000);
        assert_eq!(sessions(&e), [("s1", EndReason::Evicted, Some("s3"))]);
    }

    fn named(name: &str) -> AccountId {
        AccountId::parse(name).unwrap()
    }

    #[test]
    fn accounts_run_side_by_side_and_each_one_run_at_a_time() {
        let (a, b, c) = (named("a"), named("b"), named("c"));
        let mut s = Schedule::new(2);
        for x in [&a, &b, &a, &c] {
            s.request(x.clone());
        }
        // a is slow: b still starts beside it; c waits for a free slot.
        assert_eq!(s.start(), Some(a.clone()));
        assert_eq!(s.start(), Some(b.clone()));
        assert_eq!(s.start(), None, "two at once");
        // A change to a while it runs: not a second run beside the first.
        s.request(a.clone());
        s.finished(&b, false);
        assert_eq!(s.start(), Some(c.clone()), "in the order they asked");
        assert_eq!(s.start(), None);
        s.finished(&c, false);
        assert_eq!(s.start(), None, "a is still under way");
        s.finished(&a, false);
        assert_eq!(s.start(), Some(a.clone()), "then once more, for the change");
        s.finished(&a, false);
        assert_eq!(s.start(), None, "and no more");
        assert!(s.states.is_empty() && s.queue.is_empty());
    }

    #[test]
    fn an_account_with_unsettled_endings_runs_again_when_its_retry_is_due() {
        let (a, b) = (named("a"), named("b"));
        let mut s = Schedule::new(1);
        s.request(a.clone());
        assert_eq!(s.start(), Some(a.clone()));
        s.finished(&a, true);
        // Asking again does not hurry it; it frees its slot for others.
        s.request(a.clone());
        s.request(b.clone());
        assert_eq!(s.start(), Some(b.clone()));
        s.finished(&b, false);
        assert_eq!(s.start(), None, "a rests");
        s.wake(a.clone());
        assert_eq!(s.start(), Some(a.clone()), "its retry");
        // A stray wake of an account that is not resting changes nothing.
        s.wake(b.clone());
        s.wake(a.clone());
        assert_eq!(s.start(), None);
        s.finished(&a, false);
        assert!(s.states.is_empty());
    }

    #[test]
    fn an_ending_handed_over_during_a_run_is_owed_after_it() {
        let ending = |s: &str| Ending {
            victim: SessionRef {
                device: headcount_protocol::DeviceId::parse("d").unwrap(),
                session: headcount_protocol::SessionId::parse(s).unwrap(),
            },
            reason: EndReason::Revoked,
            by: None,
        };
        let mut b = Backlog::default();
        assert!(b.take(&acct()).is_empty());
        // A kick gave up on s1 while no run was under way: owed, and the
        // account's next run retries it first.
        assert_eq!(b.hand_over(Decided::new(acct(), ending("s1"), 1)), acct());
        let retry = b.take(&acct());
        assert_eq!(retry.len(), 1);
        // The run leaves s1 unsettled, and a request hands s2 over
        // meanwhile: both owed, the run's first, after the first wait.
        b.hand_over(Decided::new(acct(), ending("s2"), 2));
        let left = Left {
            account: acct(),
            endings: retry,
            undecided: false,
        };
        assert_eq!(b.finished(left), Some(RETRY_FIRST));
        let owed: Vec<String> = b
            .take(&acct())
            .iter()
            .map(|d| d.victim.session.to_string())
            .collect();
        assert_eq!(owed, ["s1", "s2"]);
        // A run that settles everything and finds nothing handed over: done.
        assert_eq!(b.finished(Left::nothing(acct())), None);
        assert!(b.is_empty());
        // One that settled its own but must decide again waits longer.
        b.finished(Left::nothing(acct()));
        let undecided = Left {
            undecided: true,
            ..Left::nothing(acct())
        };
        assert_eq!(b.finished(undecided), Some(RETRY_FIRST));
    }

    #[test]
    fn retries_back_off_up_to_a_bound() {
        assert_eq!(retry_wait(None), RETRY_FIRST);
        assert_eq!(retry_wait(Some(RETRY_FIRST)), RETRY_FIRST * 2);
        let mut w = None;
        for _ in 0..20 {
            w = Some(retry_wait(w));
        }
        assert_eq!(w, Some(RETRY_MAX));
    }

    #[test]
    fn a_decision_records_its_ending_and_is_its_own() {
        let ending = Ending {
            victim: SessionRef {
                device: headcount_protocol::DeviceId::parse("tv").unwrap(),
                session: headcount_protocol::SessionId::parse("s1").unwrap(),
            },
            reason: EndReason::Rejected,
            by: None,
        };
        let d = Decided::new(acct(), ending.clone(), 5_000);
        assert_eq!(
            d.revocation,
            Revocation {
                reason: EndReason::Rejected,
                device: ending.victim.device.clone(),
                at: 5_000,
                by: None,
            }
        );
        let again = Decided::new(acct(), ending, 5_000);
        assert_ne!(d.decision, again.decision, "two decisions, two ids");
        let retried = d.clone();
        assert_eq!(retried.decision, d.decision, "a retry is the same decision");
    }

    #[test]
    fn endings_are_told_by_their_reason() {
        assert_eq!(
            notices(EndReason::Evicted),
            (
                ControlType::DeviceLimitExceeded,
                EventType::Evicted,
                "evicted"
            )
        );
        assert_eq!(
            notices(EndReason::Rejected),
            (
                ControlType::DeviceLimitExceeded,
                EventType::Rejected,
                "rejected"
            )
        );
        for r in [EndReason::Revoked, EndReason::Replaced] {
            assert_eq!(
                notices(r),
                (ControlType::Revoked, EventType::Revoked, "revoked")
            );
        }
    }
}
