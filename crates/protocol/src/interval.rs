//! Interval arithmetic.
//!
//! Time is cut into fixed intervals of `interval_ms`; a session is written
//! into the dictionary of every interval in which it heartbeats, once per
//! interval. A reader that takes the union of the current and the previous
//! interval's dictionaries sees every session that heartbeated recently, and
//! a dictionary older than that is never read again, so its KV entry can
//! expire on its own. Writers and readers run on different hosts, whose
//! clocks need not agree to the millisecond: a reader also takes the next
//! interval's dictionary ([`IntervalClock::readable_intervals`]).

use std::ops::RangeInclusive;
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

    /// The intervals whose dictionaries a reader on another host than the
    /// writers takes the union of at `at`: the previous, the current and
    /// the next one, by the reader's own clock.
    ///
    /// The next one is there for writers whose clock is ahead: such a
    /// writer has already moved its sessions into what the reader still
    /// calls the next interval. With `interval` the interval's length and
    /// `carry` the delay after which a writer copies its live sessions into
    /// a new interval (plus the time that write takes to land), a live
    /// session is in a dictionary this range holds while the writer's clock
    /// is ahead of the reader's by less than `interval`, or behind it by
    /// less than `interval - carry`. Without the next interval, a writer
    /// ahead by more than `carry` would hide its carried sessions from the
    /// reader (and any writer ahead would hide the sessions it records
    /// anew) until the reader's clock reached that interval too.
    pub fn readable_intervals(&self, at: UnixMillis) -> RangeInclusive<u64> {
        let cur = self.interval_of(at);
        cur.saturating_sub(1)..=cur.saturating_add(1)
    }

    /// How long a dictionary must outlive its last write: it is written until
    /// its interval ends (and then for leaves while it is the previous
    /// interval), and read while it is current or previous.
    pub fn dictionary_ttl(&self) -> Duration {
        Duration::from_millis(self.interval_ms.saturating_mul(2)) + Duration::from_secs(1)
    }
}

/// Values by interval number, for the handful of live intervals one account
/// has at a time: a sorted vector, which costs a fraction of a tree node per
/// account when there are millions of accounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByInterval<T>(Vec<(u64, T)>);

impl<T> Default for ByInterval<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T> ByInterval<T> {
    fn position(&self, interval: u64) -> Result<usize, usize> {
        self.0.binary_search_by_key(&interval, |(i, _)| *i)
    }

    pub fn get(&self, interval: &u64) -> Option<&T> {
        self.position(*interval).ok().map(|p| &self.0[p].1)
    }

    pub fn get_mut(&mut self, interval: &u64) -> Option<&mut T> {
        self.position(*interval).ok().map(|p| &mut self.0[p].1)
    }

    /// The value of `interval`, inserted with `make` when missing.
    pub fn get_or_insert_with(&mut self, interval: u64, make: impl FnOnce() -> T) -> &mut T {
        let p = match self.position(interval) {
            Ok(p) => p,
            Err(p) => {
                self.0.reserve_exact(1);
                self.0.insert(p, (interval, make()));
                p
            }
        };
        &mut self.0[p].1
    }

    pub fn insert(&mut self, interval: u64, value: T) {
        match self.position(interval) {
            Ok(p) => self.0[p].1 = value,
            Err(p) => {
                self.0.reserve_exact(1);
                self.0.insert(p, (interval, value));
            }
        }
    }

    pub fn remove(&mut self, interval: &u64) -> Option<T> {
        self.position(*interval).ok().map(|p| self.0.remove(p).1)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(u64, &mut T) -> bool) {
        self.0.retain_mut(|(i, v)| keep(*i, v));
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
    }

    /// Oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.0.iter().map(|(i, v)| (*i, v))
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|(_, v)| v)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.0.iter_mut().map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<T: Default> ByInterval<T> {
    pub fn entry_or_default(&mut self, interval: u64) -> &mut T {
        self.get_or_insert_with(interval, T::default)
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
    fn a_reader_takes_the_next_interval_too() {
        let c = IntervalClock::new(Duration::from_secs(60));
        assert_eq!(c.readable_intervals(125_000), 1..=3);
        assert_eq!(c.readable_intervals(10), 0..=1);
        // A writer's current interval is read while its clock is at most
        // one interval ahead or behind; two intervals off, it is not.
        let reader = 125_000;
        for writer in [reader - 60_000, reader, reader + 60_000] {
            let [_, cur] = c.live_intervals(writer);
            assert!(c.readable_intervals(reader).contains(&cur), "{writer}");
        }
        let far = c.interval_of(reader + 120_000);
        assert!(!c.readable_intervals(reader).contains(&far));
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

    #[test]
    fn by_interval_keeps_intervals_in_order() {
        let mut m: ByInterval<&str> = ByInterval::default();
        m.insert(7, "seven");
        m.insert(5, "five");
        *m.entry_or_default(6) = "six";
        assert_eq!(m.iter().map(|(i, _)| i).collect::<Vec<_>>(), [5, 6, 7]);
        m.insert(5, "FIVE");
        assert_eq!(m.get(&5), Some(&"FIVE"));
        assert_eq!(m.remove(&6), Some("six"));
        assert_eq!(m.remove(&6), None);
        m.retain(|i, _| i > 5);
        assert_eq!(m.len(), 1);
        assert_eq!(m.get(&7), Some(&"seven"));
        m.retain(|_, _| false);
        assert!(m.is_empty());
    }

    // Tests that pin each rule (mutation testing).

    #[test]
    fn the_length_is_the_interval_as_given_or_clamped() {
        let c = IntervalClock::new(Duration::from_secs(60));
        assert_eq!(c.length(), Duration::from_secs(60));
        assert_eq!(
            IntervalClock::new(Duration::ZERO).length(),
            Duration::from_millis(1)
        );
    }

    #[test]
    fn by_interval_values_are_reached_by_reference_and_in_order() {
        let mut m: ByInterval<u32> = ByInterval::default();
        assert!(m.is_empty());
        assert_eq!(m.len(), 0);
        m.insert(9, 90);
        m.insert(3, 30);
        m.insert(6, 60);
        assert!(!m.is_empty());
        assert_eq!(m.len(), 3);
        assert_eq!(m.values().copied().collect::<Vec<_>>(), [30, 60, 90]);
        *m.get_mut(&6).expect("interval 6 is held") += 1;
        assert_eq!(m.get_mut(&7), None);
        for v in m.values_mut() {
            *v *= 10;
        }
        assert_eq!(
            m.iter().map(|(i, v)| (i, *v)).collect::<Vec<_>>(),
            [(3, 300), (6, 610), (9, 900)]
        );
        assert_eq!(*m.get_or_insert_with(3, || 7), 300, "held: not made again");
        assert_eq!(*m.get_or_insert_with(4, || 7), 7);
        assert_eq!(m.len(), 4);
    }
}
