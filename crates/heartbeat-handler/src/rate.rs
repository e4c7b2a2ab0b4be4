//! Per-session heartbeat rate limiting: a token bucket per session, so a
//! device publishing far faster than its heartbeat period is cut down to the
//! allowed rate without touching anyone else.
//!
//! Each handler instance limits the heartbeats it receives; a session's
//! heartbeats reach one instance (the holder of its account's partition),
//! two for a moment while the partition changes hands.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use headcount_protocol::UnixMillis;
use headcount_protocol::names::check_session;

#[derive(Debug)]
pub struct RateLimiter {
    /// Heartbeats per second a session may keep up.
    rate: f32,
    /// Heartbeats a session may send at once (reconnect bursts).
    burst: f32,
    /// Keys are 32 bits of a per-process keyed hash of the session id
    /// (unique across accounts), so an entry costs 12 bytes and no copy of
    /// the id: a million sessions are a million entries. Two sessions
    /// sharing a key share a bucket: among the 30 000 or so sessions of one
    /// partition at a million in all, one pair in about nine partitions does,
    /// which only makes their limit stricter (two sessions beating every 5 s
    /// stay far below the rate together), and which pair differs from
    /// process to process.
    keys: RandomState,
    /// Tokens left, and the last heartbeat's time in milliseconds modulo
    /// 2^32 (entries idle for a minute are pruned, long before it wraps).
    buckets: HashMap<u32, (f32, u32)>,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate: rate.max(0.001) as f32,
            burst: burst.max(1) as f32,
            keys: RandomState::new(),
            buckets: HashMap::new(),
        }
    }

    /// Whether one more heartbeat of this session is allowed at `now`.
    pub fn allow(&mut self, session: &str, now: UnixMillis) -> bool {
        if check_session(session).is_err() {
            return false;
        }
        let (rate, burst) = (self.rate, self.burst);
        let now = now as u32;
        let (tokens, last) = self
            .buckets
            .entry(self.keys.hash_one(session) as u32)
            .or_insert((burst, now));
        let elapsed = now.wrapping_sub(*last) as f32 / 1000.0;
        *tokens = (*tokens + elapsed * rate).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets sessions whose bucket has been full for a while.
    pub fn prune(&mut self, now: UnixMillis) {
        let refill_ms = (self.burst / self.rate * 1000.0) as u32;
        let now = now as u32;
        self.buckets
            .retain(|_, (_, last)| now.wrapping_sub(*last) <= refill_ms.max(60_000));
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_rate_and_others_are_untouched() {
        let mut r = RateLimiter::new(1.0, 3);
        // 100 heartbeats within one second: the burst gets through, no more.
        let allowed = (0..100).filter(|i| r.allow("f", 1_000 + i * 10)).count();
        assert_eq!(allowed, 3);
        assert!(r.allow("c", 1_500), "another session is unaffected");
        // The rate refills.
        assert!(r.allow("f", 3_100));
        assert!(!r.allow("not a session", 3_100), "bad ids are refused");
        r.prune(1_000_000);
        assert!(r.is_empty());
    }
}
