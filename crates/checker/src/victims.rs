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

    fn names<'a>(c: &Choice<'a>) -> Vec<&'a str> {
        c.ended.iter().map(|s| s.session.as_str()).collect()
    }

    #[test]
    fn nothing_goes_while_the_group_fits() {
        let all = sessions(&[5, 4, 3]);
        let group: Vec<&ActiveSession> = all.iter().collect();
        for policy in Policy::ALL {
            let c = choose(policy, &group, 3, 0);
            assert!(c.ended.is_empty() && c.refused == 0, "{policy}");
            let c = choose(policy, &group, 4, 1);
            assert!(c.ended.is_empty() && c.refused == 0, "{policy}");
        }
    }

    #[test]
    fn evict_oldest_ends_the_oldest_beyond_the_cap() {
        let all = sessions(&[9, 9, 9, 9]);
        let group: Vec<&ActiveSession> = all.iter().collect();
        assert_eq!(
            names(&choose(Policy::EvictOldest, &group, 2, 0)),
            ["s0", "s1"]
        );
        // A newcomer needs a seat as well: one more goes.
        let c = choose(Policy::EvictOldest, &group, 2, 1);
        assert_eq!((names(&c), c.refused), (vec!["s0", "s1", "s2"], 0));
    }

    #[test]
    fn evict_least_active_ends_the_longest_silent_then_the_oldest() {
        // s1 and s3 were heard least recently, s1 and s3 tie: s1 is older.
        let all = sessions(&[8_000, 2_000, 9_000, 2_000]);
        let group: Vec<&ActiveSession> = all.iter().collect();
        assert_eq!(
            names(&choose(Policy::EvictLeastActive, &group, 3, 0)),
            ["s1"]
        );
        assert_eq!(
            names(&choose(Policy::EvictLeastActive, &group, 3, 1)),
            ["s1", "s3"]
        );
    }

    #[test]
    fn reject_new_refuses_newcomers_before_ending_anyone() {
        let all = sessions(&[9, 9, 9]);
        let group: Vec<&ActiveSession> = all.iter().collect();
        let c = choose(Policy::RejectNew, &group, 3, 1);
        assert_eq!((names(&c), c.refused), (vec![], 1));
        // Over the cap already: the newest of the group go.
        let c = choose(Policy::RejectNew, &group, 1, 0);
        assert_eq!((names(&c), c.refused), (vec!["s1", "s2"], 0));
        let c = choose(Policy::RejectNew, &group, 2, 1);
        assert_eq!((names(&c), c.refused), (vec!["s2"], 1));
    }
}
