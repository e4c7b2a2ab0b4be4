//! Per-session heartbeat rate limiting: a token bucket per session, so a
//! device publishing far faster than its heartbeat period is cut down to the
//! allowed rate without touching anyone else.
//!
//! The buckets of an account's sessions are kept beside its dictionaries
//! ([`crate::dicts::Dicts::admit`]): the one lookup of the account that
//! every heartbeat makes finds them, with no table of every session beside
//! it.
//!
//! Each handler instance limits the heartbeats it receives; a session's
//! heartbeats reach one instance (the holder of its account's partition),
//! two for a moment while the partition changes hands.

use std::hash::{BuildHasher, RandomState};

use headcount_protocol::UnixMillis;

/// Heartbeats per second a session may keep up by default.
pub const DEFAULT_RATE: f64 = 2.0;
/// Heartbeats a session may send at once by default (reconnect bursts).
pub const DEFAULT_BURST: u32 = 10;

/// The allowed rate and burst, and the key that turns session ids into
/// bucket keys.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Heartbeats per second a session may keep up.
    rate: f32,
    /// Heartbeats a session may send at once.
    burst: f32,
    /// A bucket's key is 32 bits of a per-process keyed hash of the session
    /// id: 12 bytes a session, and no copy of the id. Two sessions of one
    /// account sharing a key share a bucket, which only makes their limit
    /// stricter (two sessions beating every 5 s stay far below the rate
    /// together); among an account's few sessions that is about never, and
    /// which pair differs from process to process.
    keys: RandomState,
}

impl Limits {
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate: rate.max(0.001) as f32,
            burst: burst.max(1) as f32,
            keys: RandomState::new(),
        }
    }

    /// How long a bucket is kept after its session's last heartbeat: until
    /// it would be full again, and at least a minute.
    fn idle_ms(&self) -> u32 {
        ((self.burst / self.rate * 1000.0) as u32).max(60_000)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::new(DEFAULT_RATE, DEFAULT_BURST)
    }
}

/// Tokens left, and the last heartbeat's time in milliseconds modulo 2^32
/// (a bucket idle for a minute goes long before it wraps).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f32,
    last: u32,
}

/// Milliseconds from `last` to `now`, both modulo 2^32; none when the
/// clock stepped back past `last`.
fn since(now: u32, last: u32) -> u32 {
    (now.wrapping_sub(last) as i32).max(0) as u32
}

/// The buckets of one account's sessions, sorted by key.
#[derive(Debug, Default)]
pub struct Beats(Box<[(u32, Bucket)]>);

impl Beats {
    /// Whether one more heartbeat of `session` is allowed at `now`.
    pub fn allow(&mut self, limits: &Limits, session: &str, now: UnixMillis) -> bool {
        let key = limits.keys.hash_one(session) as u32;
        let now = now as u32;
        let i = match self.0.binary_search_by_key(&key, |(k, _)| *k) {
            Ok(i) => i,
            Err(_) => self.insert(limits, key, now),
        };
        let b = &mut self.0[i].1;
        let elapsed = since(now, b.last) as f32 / 1000.0;
        b.tokens = (b.tokens + elapsed * limits.rate).min(limits.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Adds a full bucket for `key`, and lets the idle ones go while the
    /// slice is rebuilt anyway: where it lands.
    fn insert(&mut self, limits: &Limits, key: u32, now: u32) -> usize {
        let mut kept = Vec::with_capacity(self.0.len() + 1);
        kept.extend(self.kept(limits, now));
        let at = kept.partition_point(|(k, _)| *k < key);
        let full = Bucket {
            tokens: limits.burst,
            last: now,
        };
        kept.insert(at, (key, full));
        self.0 = kept.into_boxed_slice();
        at
    }

    /// Forgets the sessions whose bucket has been idle for a while.
    pub fn prune(&mut self, limits: &Limits, now: UnixMillis) {
        let now = now as u32;
        if self.kept(limits, now).count() < self.0.len() {
            self.0 = self.kept(limits, now).collect();
        }
    }

    /// The buckets not idle at `now`, in order.
    fn kept(&self, limits: &Limits, now: u32) -> impl Iterator<Item = (u32, Bucket)> + '_ {
        let idle = limits.idle_ms();
        self.0
            .iter()
            .filter(move |(_, b)| since(now, b.last) <= idle)
            .copied()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_rate_and_others_are_untouched() {
        let limits = Limits::new(1.0, 3);
        let mut b = Beats::default();
        // 100 heartbeats within one second: the burst gets through, no more.
        let allowed = (0..100)
            .filter(|i| b.allow(&limits, "f", 1_000 + i * 10))
            .count();
        assert_eq!(allowed, 3);
        assert!(
            b.allow(&limits, "c", 1_500),
            "another session is unaffected"
        );
        assert_eq!(b.len(), 2, "nor does a clock stepping back drop a bucket");
        // The rate refills: about two tokens over 1.1 s.
        let refilled = (0..10).filter(|_| b.allow(&limits, "f", 3_100)).count();
        assert_eq!(refilled, 2);
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn idle_buckets_go_when_pruned_or_when_a_session_is_added() {
        let limits = Limits::new(1.0, 3);
        let mut b = Beats::default();
        assert!(b.allow(&limits, "a", 1_000));
        assert!(b.allow(&limits, "b", 50_000));
        b.prune(&limits, 61_000);
        assert_eq!(b.len(), 2, "a minute is not up for either");
        // Adding a session drops "a", idle for over a minute.
        assert!(b.allow(&limits, "c", 62_000));
        assert_eq!(b.len(), 2);
        b.prune(&limits, 200_000);
        assert!(b.is_empty());
        // A session back after its bucket went starts with a whole burst.
        let allowed = (0..10).filter(|_| b.allow(&limits, "a", 200_000)).count();
        assert_eq!(allowed, 3);
    }

    #[test]
    fn buckets_stay_sorted_by_key_whatever_order_sessions_arrive_in() {
        let limits = Limits::new(1.0, 1);
        let mut b = Beats::default();
        for s in ["s5", "s1", "s9", "s3", "s7", "s2"] {
            assert!(b.allow(&limits, s, 1_000));
        }
        assert!(b.0.windows(2).all(|w| w[0].0 < w[1].0));
        // Each found again: every bucket was spent.
        for s in ["s1", "s2", "s3", "s5", "s7", "s9"] {
            assert!(!b.allow(&limits, s, 1_000), "{s} has its own bucket");
        }
    }
}
