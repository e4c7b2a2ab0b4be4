//! Which sessions a policy gives up when seats run short.
//!
//! One rule serves both enforcement (an account already over its limit) and
//! `check` (a newcomer asking for a seat), so that what `check` promises is
//! what enforcement would do.

use headcount_protocol::Policy;
use headcount_protocol::wire::ActiveSession;

/// What a policy does with a group that does not fit its cap.
#[derive(Debug, PartialEq, Eq)]
pub struct Choice<'a> {
    /// Sessions of the group to end.
    pub ended: Vec<&'a ActiveSession>,
    /// Newcomers turned away (reject-new only).
    pub refused: usize,
}

/// Decides who goes so that at most `cap` of `group` (active sessions,
/// oldest first) and `joining` newcomers (newer than all of them) remain.
///
/// Evict policies end sessions of the group: the oldest first, or under
/// evict-least-active the ones heard from least recently (ties: the oldest).
/// Reject-new keeps the oldest: it refuses the newest, newcomers first, and
/// ends the group's newest only when even that is not enough.
pub fn choose<'a>(
    policy: Policy,
    group: &[&'a ActiveSession],
    cap: usize,
    joining: usize,
) -> Choice<'a> {
    let excess = (group.len() + joining).saturating_sub(cap);
    match policy {
        Policy::EvictOldest => Choice {
            ended: group.iter().copied().take(excess).collect(),
            refused: 0,
        },
        Policy::EvictLeastActive => {
            let mut order = group.to_vec();
            order.sort_by_key(|s| (s.last_seen, s.since));
            order.truncate(excess);
            Choice {
                ended: order,
                refused: 0,
            }
        }
        Policy::RejectNew => {
            let refused = excess.min(joining);
            let ended = (excess - refused).min(group.len());
            Choice {
                ended: group[group.len() - ended..].to_vec(),
                refused,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use headcount_protocol::Policy::{EvictLeastActive, EvictOldest, RejectNew};
    use headcount_protocol::{DeviceId, SessionId};

    /// Sessions `s0`, `s1`, ... oldest first, last heard at `heard[i]`.
    fn sessions(heard: &[u64]) -> Vec<ActiveSession> {
        heard
            .iter()
            .enumerate()
            .map(|(i, &last_seen)| ActiveSession {
                device: DeviceId::parse(&format!("d{i}")).unwrap(),
                session: SessionId::parse(&format!("s{i}")).unwrap(),
                since: 1_000 * i as u64,
                last_seen,
                labels: Default::default(),
            })
            .collect()
    }

    /// Who `policy` ends among sessions last heard at `heard` (all of
    /// them the group), by name, and how many newcomers it refuses.
    fn outcome(policy: Policy, heard: &[u64], cap: usize, joining: usize) -> (Vec<String>, usize) {
        let all = sessions(heard);
        let group: Vec<&ActiveSession> = all.iter().collect();
        let c = choose(policy, &group, cap, joining);
        let ended = c.ended.iter().map(|s| s.session.to_string()).collect();
        (ended, c.refused)
    }

    /// The outcome that ends `sessions` and refuses `refused` newcomers.
    fn ends(sessions: &[&str], refused: usize) -> (Vec<String>, usize) {
        (sessions.iter().map(|s| s.to_string()).collect(), refused)
    }

    #[test]
    fn nothing_goes_while_the_group_fits() {
        for policy in Policy::ALL {
            assert_eq!(outcome(policy, &[5, 4, 3], 3, 0), ends(&[], 0), "{policy}");
            assert_eq!(outcome(policy, &[5, 4, 3], 4, 1), ends(&[], 0), "{policy}");
        }
    }

    #[test]
    fn evict_oldest_ends_the_oldest_beyond_the_cap() {
        let heard = [9, 9, 9, 9];
        assert_eq!(outcome(EvictOldest, &heard, 2, 0), ends(&["s0", "s1"], 0));
        // A newcomer needs a seat as well: one more goes.
        assert_eq!(
            outcome(EvictOldest, &heard, 2, 1),
            ends(&["s0", "s1", "s2"], 0)
        );
    }

    #[test]
    fn evict_least_active_ends_the_longest_silent_then_the_oldest() {
        // s1 and s3 were heard least recently, s1 and s3 tie: s1 is older.
        let heard = [8_000, 2_000, 9_000, 2_000];
        assert_eq!(outcome(EvictLeastActive, &heard, 3, 0), ends(&["s1"], 0));
        assert_eq!(
            outcome(EvictLeastActive, &heard, 3, 1),
            ends(&["s1", "s3"], 0)
        );
    }

    #[test]
    fn reject_new_refuses_newcomers_before_ending_anyone() {
        let heard = [9, 9, 9];
        assert_eq!(outcome(RejectNew, &heard, 3, 1), ends(&[], 1));
        // Over the cap already: the newest of the group go.
        assert_eq!(outcome(RejectNew, &heard, 1, 0), ends(&["s1", "s2"], 0));
        assert_eq!(outcome(RejectNew, &heard, 2, 1), ends(&["s2"], 1));
    }
}
