//! The sweep: every `sweep_every`, find the sessions that timed out and
//! announce each once, count what is active (gauges, peaks), and hand the
//! accounts whose grace ran out to the enforcer.
//!
//! A timeout is announced only by the checker that creates its marker in
//! the timeouts bucket, so any number of checkers publish one event.

use std::ops::DerefMut;
use std::sync::Arc;
use std::time::Duration;

use headcount_protocol::wire::{ActiveSession, EventType, PresenceEvent};
use headcount_protocol::{AccountId, UnixMillis, now_millis};
use headcount_runtime::Shutdown;
use headcount_runtime::effects::{self, Once};

use crate::shared::{Shared, lock};
use crate::view::View;

/// Runs the sweep on its own task, so that a long pass (a breakdown over
/// millions of sessions) never delays the dispatch of requests.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    every: Duration,
    gauges_every: Duration,
    stop: Shutdown,
) -> tokio::task::JoinHandle<()> {
    let gauge_rounds = (gauges_every.as_millis() / every.as_millis().max(1)).max(1) as u64;
    tokio::spawn(async move {
        let mut sweep = tokio::time::interval(every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop = std::pin::pin!(stop.wait());
        let mut round = 0u64;
        let mut was_down = false;
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = sweep.tick() => {
                    // No timeouts while this checker cannot hear the
                    // heartbeats, and a fresh start once it can again.
                    let up = shared.nats.connection_state()
                        == async_nats::connection::State::Connected;
                    if !up {
                        was_down = true;
                        continue;
                    }
                    if was_down {
                        was_down = false;
                        let now = now_millis();
                        tracing::info!("reconnected: sessions get a fresh timeout");
                        for mut v in shared.each_view() {
                            v.heard_nothing_until(now);
                        }
                    }
                    round += 1;
                    on_sweep(&shared, (round - 1).is_multiple_of(gauge_rounds)).await;
                }
            }
        }
    })
}

/// What one pass over the shards found.
#[derive(Debug, Default)]
struct Pass {
    /// Sessions that crossed the timeout since the last pass.
    timed_out: Vec<(AccountId, ActiveSession)>,
    /// Active sessions over every account.
    total: u32,
    /// Active sessions of each view, in the order swept.
    totals: Vec<u32>,
    /// Accounts whose grace ran out: to enforce now.
    grace_expired: Vec<AccountId>,
}

/// Sweeps each view in turn, holding one at a time.
fn sweep_views<V: DerefMut<Target = View>>(
    views: impl IntoIterator<Item = V>,
    now: UnixMillis,
) -> Pass {
    let mut pass = Pass::default();
    for mut v in views {
        let (t, n) = v.sweep(now);
        pass.timed_out.extend(t);
        pass.total += n;
        pass.totals.push(n);
        pass.grace_expired.extend(v.grace_expired(now));
    }
    pass
}

/// The event announcing that `session` timed out.
fn timeout_event(account: AccountId, session: ActiveSession, now: UnixMillis) -> PresenceEvent {
    PresenceEvent {
        kind: EventType::Timeout,
        account,
        device: session.device,
        content: session.labels.content().map(str::to_owned),
        session: session.session,
        at: now,
        by: None,
        reason: None,
    }
}

async fn on_sweep(shared: &Shared, gauges: bool) {
    let now = now_millis();
    let pass = sweep_views(shared.each_view(), now);
    // Shards are partitions, in order.
    for (p, (peaks, &n)) in shared.peaks.iter().zip(&pass.totals).enumerate() {
        lock(peaks).record(now / 60_000, n);
        let label = p.to_string();
        if shared.serves(p as u32) {
            shared
                .metrics
                .partition_sessions
                .with_label_values(&[&label])
                .set(i64::from(n));
        } else {
            // Not this checker's (any more): its holders report it.
            let _ = shared
                .metrics
                .partition_sessions
                .remove_label_values(&[&label]);
        }
    }
    shared.metrics.active_sessions.set(pass.total as i64);
    for account in pass.grace_expired {
        shared.enforce(account);
    }
    // The breakdown gauges cost a pass over every session (millions, on a
    // big checker): only every `gauges_every`, starting with the first round.
    if gauges {
        let (b, _) = shared.breakdown_of(&shared.served(), now);
        shared.metrics.set_breakdown(&b);
    }
    for (account, s) in pass.timed_out {
        match effects::announce_timeout_once(&shared.buckets.timeouts, &account, &s.session).await {
            Ok(Once::Won) => {}
            Ok(Once::Lost) => continue,
            // Better a timeout announced twice than one never announced.
            Err(e) => {
                tracing::warn!(%account, session = %s.session, error = %e, "recording a timeout; announcing anyway");
            }
        }
        shared.publish_event(timeout_event(account, s, now)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::testing::{acct, dict, rules, with_content};
    use headcount_protocol::{AccountLimits, Grace, Policy};

    fn other() -> AccountId {
        AccountId::parse("other").unwrap()
    }

    fn announced(p: &Pass) -> Vec<(&str, &str)> {
        let mut v: Vec<(&str, &str)> = p
            .timed_out
            .iter()
            .map(|(a, s)| (a.as_str(), s.session.as_str()))
            .collect();
        v.sort();
        v
    }

    /// Two shards: acme (s1 silent, s2 heard) and other (s3 silent).
    fn two_shards() -> [View; 2] {
        let mut a = View::new(rules(5, Policy::EvictOldest), 0);
        a.set_dict(
            &acct(),
            0,
            with_content(
                dict(&[("a", "s1", 1_000), ("b", "s2", 1_000)]),
                &[("a", "film")],
            ),
        );
        a.heard("acme", "b", "s2", 10_000);
        let mut b = View::new(rules(5, Policy::EvictOldest), 0);
        b.set_dict(&other(), 0, dict(&[("c", "s3", 2_000)]));
        [a, b]
    }

    #[test]
    fn the_sessions_silent_past_the_timeout_are_announced_once() {
        let mut shards = two_shards();
        let p = sweep_views(shards.iter_mut(), 16_001);
        assert_eq!(announced(&p), [("acme", "s1")]);
        assert_eq!(p.total, 2, "s2 heard, s3 not silent long enough yet");
        assert_eq!(p.totals, [1, 1], "each view's own count");
        let p = sweep_views(shards.iter_mut(), 17_001);
        assert_eq!(
            announced(&p),
            [("other", "s3")],
            "s1 is not announced again"
        );
        assert_eq!(p.total, 1);
        let p = sweep_views(shards.iter_mut(), 25_001);
        assert_eq!(announced(&p), [("acme", "s2")]);
        assert_eq!(p.total, 0);
        assert!(sweep_views(shards.iter_mut(), 30_000).timed_out.is_empty());
    }

    #[test]
    fn ended_sessions_are_not_announced_as_timeouts() {
        let mut shards = two_shards();
        shards[0].revoke(
            &acct(),
            &headcount_protocol::SessionId::parse("s1").unwrap(),
        );
        let p = sweep_views(shards.iter_mut(), 30_000);
        assert_eq!(announced(&p), [("acme", "s2"), ("other", "s3")], "not s1");
    }

    #[test]
    fn accounts_whose_grace_ran_out_are_handed_on() {
        let mut shards = two_shards();
        shards[1].set_overrides(
            &other(),
            Some(AccountLimits {
                limit: Some(1),
                grace: Some(Grace { seats: 1, secs: 5 }),
                ..Default::default()
            }),
        );
        shards[1].set_dict(&other(), 0, dict(&[("c", "s3", 2_000), ("d", "s4", 2_500)]));
        assert!(shards[1].over_limit(&other(), 3_000).is_empty(), "in grace");
        assert!(
            sweep_views(shards.iter_mut(), 7_999)
                .grace_expired
                .is_empty()
        );
        assert_eq!(
            sweep_views(shards.iter_mut(), 8_000).grace_expired,
            [other()]
        );
    }

    #[test]
    fn a_timeout_event_names_the_session_and_its_content() {
        let mut shards = two_shards();
        let p = sweep_views(shards.iter_mut(), 16_001);
        let (account, session) = p.timed_out.into_iter().next().unwrap();
        let e = timeout_event(account, session, 16_001);
        assert_eq!(e.kind, EventType::Timeout);
        assert_eq!(
            (e.account.as_str(), e.device.as_str(), e.session.as_str()),
            ("acme", "a", "s1")
        );
        assert_eq!((e.at, e.content.as_deref()), (16_001, Some("film")));
        assert_eq!((e.by, e.reason), (None, None));
    }
}
