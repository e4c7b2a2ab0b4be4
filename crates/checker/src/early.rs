//! Heartbeats heard before their session's dictionary: the session's first
//! write is still on its way (a join burst the handler is working through,
//! a KV leader election), and when it lands the session must not be taken
//! for silent since then.
//!
//! A plain map, bounded: an entry costs its id and a time (some 40-70
//! bytes with the map's spare room), and once a burst's dictionaries have
//! landed the map gives its room back, so a burst does not leave its peak
//! behind in the process.

use std::collections::HashMap;

use headcount_protocol::{SessionId, UnixMillis};

#[derive(Debug)]
pub struct Early {
    heard: HashMap<SessionId, UnixMillis>,
    /// The most sessions kept: junk subjects cannot grow it further.
    capacity: usize,
    /// How long a heartbeat is worth keeping: one timeout.
    keep_ms: u64,
    /// Full of fresh entries when last looked: until then, newcomers are
    /// turned away without a pass over the map.
    full_until: UnixMillis,
}

/// How long a full map turns newcomers away before it looks for stale
/// entries again.
const FULL_FOR_MS: UnixMillis = 1_000;

impl Early {
    pub fn new(capacity: usize, keep_ms: u64) -> Self {
        Self {
            heard: HashMap::new(),
            capacity,
            keep_ms,
            full_until: 0,
        }
    }

    /// `session` was heard at `now`. When full, what is older than a
    /// timeout goes first; if it is still full, the newcomer is not kept
    /// (its dictionary still brings the handler's record of when it was
    /// heard), nor are others for a second, so that a flood of unknown
    /// sessions costs a pass over the map once a second at most.
    pub fn heard(&mut self, session: &str, now: UnixMillis) {
        if let Some(at) = self.heard.get_mut(session) {
            *at = (*at).max(now);
            return;
        }
        if self.heard.len() >= self.capacity {
            if now < self.full_until {
                return;
            }
            self.expire(now);
            if self.heard.len() >= self.capacity {
                self.full_until = now + FULL_FOR_MS;
                return;
            }
        }
        if let Ok(id) = SessionId::parse(session) {
            self.heard.insert(id, now);
        }
    }

    /// When `session` was last heard before its dictionary, if it was;
    /// forgotten here from now on.
    pub fn take(&mut self, session: &str) -> Option<UnixMillis> {
        let at = self.heard.remove(session)?;
        self.give_back_room();
        Some(at)
    }

    /// Forgets what is older than a timeout.
    pub fn expire(&mut self, now: UnixMillis) {
        let keep_ms = self.keep_ms;
        self.heard
            .retain(|_, at| now.saturating_sub(*at) <= keep_ms);
        self.give_back_room();
    }

    pub fn clear(&mut self) {
        self.heard = HashMap::new();
    }

    /// Once no more than a quarter of the map's room is used, halves it
    /// (down to nothing): each entry is moved a bounded number of times as
    /// a burst drains.
    fn give_back_room(&mut self) {
        let (len, room) = (self.heard.len(), self.heard.capacity());
        if room > 64 && len * 4 <= room {
            self.heard.shrink_to(len * 2);
        } else if len == 0 && room > 0 {
            self.heard = HashMap::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_heartbeat_is_kept_until_its_dictionary_takes_it() {
        let mut e = Early::new(10, 1_000);
        e.heard("s1", 100);
        e.heard("s1", 300);
        e.heard("s1", 200);
        assert_eq!(e.take("s1"), Some(300));
        assert_eq!(e.take("s1"), None, "taken once");
        e.heard("not a session id", 100);
        assert_eq!(e.heard.len(), 0);
    }

    #[test]
    fn when_full_the_stale_go_first_then_newcomers_wait_outside() {
        let mut e = Early::new(2, 1_000);
        e.heard("old", 0);
        e.heard("s1", 900);
        e.heard("s2", 1_500);
        assert_eq!(e.take("old"), None, "older than a timeout: made room");
        e.heard("s3", 1_600);
        assert_eq!(e.take("s3"), None, "full of fresh ones: not kept");
        // Within the second after, newcomers are turned away without a
        // look, though "s1" has gone stale by then.
        e.heard("s4", 2_000);
        assert_eq!(e.take("s4"), None);
        e.heard("s5", 2_700);
        assert_eq!(e.take("s5"), Some(2_700));
        assert_eq!(e.take("s1"), None, "stale, made room");
        e.expire(5_000);
        assert_eq!(e.heard.len(), 0);
    }

    #[test]
    fn a_drained_burst_gives_its_room_back() {
        let mut e = Early::new(100_000, 60_000);
        let ids: Vec<String> = (0..50_000).map(|i| format!("s{i}")).collect();
        for id in &ids {
            e.heard(id, 1_000);
        }
        let burst = e.heard.capacity();
        for id in &ids[..49_990] {
            assert_eq!(e.take(id), Some(1_000));
        }
        assert!(
            e.heard.capacity() <= 64,
            "{} of {burst} slots kept for 10 sessions",
            e.heard.capacity()
        );
        for id in &ids[49_990..] {
            assert_eq!(e.take(id), Some(1_000));
        }
        assert_eq!(e.heard.capacity(), 0);
    }
}
