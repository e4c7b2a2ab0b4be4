//! Per-session heartbeat rate limiting: a token bucket per session, so a
//! device publishing far faster than its heartbeat period is cut down to the
//! allowed rate without touching anyone else.
//!
//! Each handler instance limits the heartbeats it receives; with N instances
//! in the queue group a session's allowance is up to N times the rate.

use std::collections::HashMap;

use headcount_protocol::{SessionId, UnixMillis};

#[derive(Debug)]
pub struct RateLimiter {
    /// Heartbeats per second a session may keep up.
    rate: f64,
    /// Heartbeats a session may send at once (reconnect bursts).
    burst: f64,
    /// By session id (unique across accounts).
    buckets: HashMap<SessionId, (f64, UnixMillis)>,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate: rate.max(0.001),
            burst: f64::from(burst.max(1)),
            buckets: HashMap::new(),
        }
    }

    /// Whether one more heartbeat of this session is allowed at `now`.
    pub fn allow(&mut self, session: &str, now: UnixMillis) -> bool {
        let (rate, burst) = (self.rate, self.burst);
        if !self.buckets.contains_key(session) {
            let Ok(id) = SessionId::parse(session) else {
                return false;
            };
            self.buckets.insert(id, (burst, now));
        }
        let Some((tokens, last)) = self.buckets.get_mut(session) else {
            return false;
        };
        let elapsed = now.saturating_sub(*last) as f64 / 1000.0;
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
        let refill_ms = (self.burst / self.rate * 1000.0) as u64;
        self.buckets
            .retain(|_, (_, last)| now.saturating_sub(*last) <= refill_ms.max(60_000));
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
