//! Ending sessions: which ones an account over its limit must lose, and
//! ending one (the revocation, then the control message and the event).
//!
//! Architecture invariant: a session is ended only through a create-only
//! write of its revocation key, and only the instance whose write wins tells
//! the device and publishes the event, so several checkers reaching the same
//! verdict end it once.

use std::sync::Arc;

use headcount_protocol::subjects;
use headcount_protocol::wire::{
    ControlMessage, ControlType, EndReason, EventType, PresenceEvent, Revocation, SessionRef,
};
use headcount_protocol::{AccountId, UnixMillis, now_millis};
use headcount_runtime::effects::{self, Once};
use tokio::sync::mpsc;

use crate::shared::Shared;
use crate::view::View;

/// A session to end, why, and the session it makes room for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ending {
    pub victim: SessionRef,
    pub reason: EndReason,
    pub by: Option<SessionRef>,
}

/// The sessions `account` must lose now to be within its limits.
fn endings(view: &mut View, account: &AccountId, now: UnixMillis) -> Vec<Ending> {
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

/// Ends sessions beyond each changed account's limit.
pub(crate) async fn enforcer(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<AccountId>) {
    while let Some(account) = rx.recv().await {
        let todo = endings(&mut shared.view(account.as_str()), &account, now_millis());
        for e in todo {
            end_session(&shared, &account, &e.victim, e.reason, e.by).await;
        }
    }
}

/// Ends one session: records the revocation (create-only, so concurrent
/// checkers agree on one winner), then the winner tells the device and
/// publishes the event. Returns whether this call ended it.
pub(crate) async fn end_session(
    shared: &Shared,
    account: &AccountId,
    victim: &SessionRef,
    reason: EndReason,
    by: Option<SessionRef>,
) -> bool {
    let now = now_millis();
    let revocation = Revocation {
        reason,
        device: victim.device.clone(),
        at: now,
        by: by.clone(),
    };
    let won = match effects::revoke_once(
        &shared.buckets.revoked,
        account,
        &victim.session,
        &revocation,
    )
    .await
    {
        Ok(once) => once == Once::Won,
        Err(e) => {
            tracing::warn!(%account, session = %victim.session, error = %e, "recording revocation");
            return false;
        }
    };
    // Won or lost, the session is over: stop counting it at once rather
    // than when the revoked bucket's watch brings the same news.
    shared
        .view(account.as_str())
        .revoke(account, &victim.session);
    if !won {
        return false;
    }
    let (control, event, action) = notices(reason);
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
        at: now,
        by: by.clone(),
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
            at: now,
            by,
            reason: None,
            content: None,
        })
        .await;
    true
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
