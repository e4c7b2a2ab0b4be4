//! Partitions: how the accounts are divided among service instances.
//!
//! nats-server maps every heartbeat subject `hb.<account>.<device>.<session>`
//! to `hbp.<partition>.<account>.<device>.<session>` (the `mappings` of the
//! devices' and the services' accounts in nats.conf, with
//! `{{partition(PARTITIONS,1)}}`), so all heartbeats of an account arrive
//! on one partition's subjects, and the instance holding that partition
//! hears them. [`of`] computes the same partition as the server does, for
//! the KV keys and the routing of requests; the two agree by construction
//! only if the count agrees, which a test of the shipped configurations
//! checks ([`MAPPING`]).
//!
//! [`assign`] decides which instances hold which partitions, from the list
//! of live instances alone, so that every instance that sees the same list
//! comes to the same answer without talking to the others.

/// How many partitions the accounts are divided into. Part of the server
/// configuration (the subject mapping): changing it means changing nats.conf
/// on every server, and the keys of the sessions bucket with it.
pub const PARTITIONS: u32 = 32;

/// The subject mapping every account that publishes heartbeats carries in
/// the server configuration, spelled as the configuration spells it.
pub const MAPPING: (&str, &str) = (
    crate::subjects::HEARTBEAT_WILDCARD,
    "hbp.{{partition(32,1)}}.{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}",
);

/// The partition of `account`: FNV-1a (32 bits) of the account id's bytes,
/// modulo [`PARTITIONS`], as nats-server's `partition()` computes it.
pub fn of(account: &str) -> u32 {
    of_n(account, PARTITIONS)
}

fn of_n(account: &str, n: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for &b in account.as_bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % n
}

/// Which of `members` hold each partition: `copies` distinct members per
/// partition (fewer when there are fewer members), every member holding at
/// most its share, `ceil(PARTITIONS * copies / members)`.
///
/// Each partition ranks the members by a hash of (member, partition) and
/// takes the best ranked that still have room, so a member joining or
/// leaving moves only about its share of partitions, and the result
/// depends on the set of members alone (not their order). Returns, per
/// partition, indexes into `members`, best ranked first.
pub fn assign(members: &[String], copies: usize) -> Vec<Vec<usize>> {
    let copies = copies.min(members.len());
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by(|&a, &b| members[a].cmp(&members[b]));
    let mut out = vec![Vec::new(); PARTITIONS as usize];
    if copies == 0 {
        return out;
    }
    let share = (PARTITIONS as usize * copies).div_ceil(members.len());
    let mut room = vec![share; members.len()];
    let total = out.len();
    for (p, owners) in out.iter_mut().enumerate() {
        let left = total - p;
        let mut ranked = order.clone();
        ranked.sort_by_key(|&m| std::cmp::Reverse(rank(&members[m], p as u32)));
        // A member with room for every partition left must hold each of
        // them, or some later partition finds too few members with room.
        let forced = ranked.iter().filter(|&&m| room[m] >= left);
        let free = ranked.iter().filter(|&&m| room[m] > 0 && room[m] < left);
        owners.extend(forced.chain(free).take(copies));
        for &m in owners.iter() {
            room[m] -= 1;
        }
    }
    out
}

/// A member's rank for a partition: FNV-1a (64 bits) of the member's name
/// and the partition number.
fn rank(member: &str, partition: u32) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in member.as_bytes().iter().chain(&partition.to_be_bytes()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Mix the low bits up, so that names differing in their last byte
    // do not rank alike.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partition_is_the_one_nats_server_computes() {
        // Values of nats-server's own tests of `partition(10,1)`, and of
        // FNV-1a 32 computed by hand.
        assert_eq!(of_n("foo", 10), 3);
        assert_eq!(of_n("qux", 10), 9);
        assert_eq!(of("acme"), 15);
        assert_eq!(of("7"), 22);
        assert_eq!(of(""), 0x811c_9dc5 % PARTITIONS);
    }

    #[test]
    fn the_mapping_names_the_partition_count() {
        assert!(
            MAPPING
                .1
                .contains(&format!("{{{{partition({PARTITIONS},1)}}}}"))
        );
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("handler-{i}")).collect()
    }

    fn load(a: &[Vec<usize>], members: usize) -> Vec<usize> {
        let mut held = vec![0; members];
        for owners in a {
            for &m in owners {
                held[m] += 1;
            }
        }
        held
    }

    #[test]
    fn every_partition_gets_its_copies_and_no_member_more_than_its_share() {
        for members in 1..=9 {
            for copies in 1..=3 {
                let a = assign(&names(members), copies);
                let want = copies.min(members);
                let share = (PARTITIONS as usize * want).div_ceil(members);
                for owners in &a {
                    assert_eq!(owners.len(), want, "{members} members, {copies} copies");
                    let mut distinct = owners.clone();
                    distinct.sort();
                    distinct.dedup();
                    assert_eq!(distinct.len(), want, "one member holds a partition twice");
                }
                for held in load(&a, members) {
                    assert!(held <= share, "{members} members: {held} > {share}");
                }
            }
        }
        assert!(assign(&[], 1).iter().all(|o| o.is_empty()));
    }

    #[test]
    fn any_set_of_names_is_balanced() {
        for seed in 0..300u32 {
            let members: Vec<String> = (0..(seed % 11 + 1))
                .map(|i| {
                    format!(
                        "{:x}",
                        (seed * 7919 + i * 104_729).wrapping_mul(2_654_435_761)
                    )
                })
                .collect();
            let copies = (seed % 3 + 1) as usize;
            let a = assign(&members, copies);
            let want = copies.min(members.len());
            let share = (PARTITIONS as usize * want).div_ceil(members.len());
            assert!(a.iter().all(|o| o.len() == want), "seed {seed}");
            assert!(
                load(&a, members.len()).iter().all(|&h| h <= share),
                "seed {seed}"
            );
        }
    }

    #[test]
    fn the_answer_depends_on_the_set_of_members_not_their_order() {
        let m = names(5);
        let mut r = m.clone();
        r.reverse();
        let by_name = |members: &[String], a: Vec<Vec<usize>>| -> Vec<Vec<String>> {
            a.into_iter()
                .map(|o| o.into_iter().map(|i| members[i].clone()).collect())
                .collect()
        };
        assert_eq!(by_name(&m, assign(&m, 2)), by_name(&r, assign(&r, 2)));
    }

    #[test]
    fn a_member_joining_moves_little() {
        let before = assign(&names(3), 1);
        let after = assign(&names(4), 1);
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| b[0] != a[0])
            .count();
        // The newcomer's share (8 of 32), and a few more where a share
        // filled up differently.
        assert!(moved >= 8, "the newcomer got {moved}");
        assert!(moved <= 16, "{moved} of 32 partitions moved");
    }
}
