//! Interval arithmetic.
//!
//! Time is cut into fixed intervals of `interval_ms`; a session is written
//! into the dictionary of every interval in which it heartbeats, once per
//! interval. A reader that takes the union of the current and the previous
//! interval's dictionaries sees every session that heartbeated recently, and
//! a dictionary older than that is never read again, so its KV entry can
//! expire on its own.

use std::time::Duration;

use crate::UnixMillis;

/// Maps wall-clock time to interval numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntervalClock {
    interval_ms: u64,
}

impl IntervalClock {
    /// `interval` is clamped to at least one millisecond.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval_ms: (interval.as_millis() as u64).max(1),
        }
    }

    pub fn length(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    /// The interval containing `at`.
    pub fn interval_of(&self, at: UnixMillis) -> u64 {
        at / self.interval_ms
    }

    /// When interval `n` starts.
    pub fn start_of(&self, n: u64) -> UnixMillis {
        n.saturating_mul(self.interval_ms)
    }

    /// The intervals a reader must consult at `at`: the previous one and the
    /// current one, oldest first.
    pub fn live_intervals(&self, at: UnixMillis) -> [u64; 2] {
        let cur = self.interval_of(at);
        [cur.saturating_sub(1), cur]
    }

    /// How long a dictionary must outlive its last write: it is written until
    /// its interval ends (and then for leaves while it is the previous
    /// interval), and read while it is current or previous.
    pub fn dictionary_ttl(&self) -> Duration {
        Duration::from_millis(self.interval_ms.saturating_mul(2)) + Duration::from_secs(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_cut_time() {
        let c = IntervalClock::new(Duration::from_secs(60));
        assert_eq!(c.interval_of(0), 0);
        assert_eq!(c.interval_of(59_999), 0);
        assert_eq!(c.interval_of(60_000), 1);
        assert_eq!(c.start_of(2), 120_000);
        assert_eq!(c.live_intervals(125_000), [1, 2]);
        assert_eq!(c.live_intervals(10), [0, 0]);
    }

    #[test]
    fn ttl_covers_two_intervals() {
        let c = IntervalClock::new(Duration::from_secs(60));
        assert!(c.dictionary_ttl() > Duration::from_secs(120));
    }

    #[test]
    fn zero_length_is_clamped() {
        let c = IntervalClock::new(Duration::ZERO);
        assert_eq!(c.interval_of(5), 5);
    }
}
