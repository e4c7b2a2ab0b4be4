//! The handler's copy of one dictionary as KV holds it, kept compact.
//!
//! An instance holds a copy of every live dictionary of its partitions,
//! one entry per session: at a million sessions each byte of an entry is a
//! megabyte. A hash map keeps a third to a half of its slots empty (it
//! doubles as it grows), so the copy is a sorted slice instead: exactly one
//! slot per device, found by binary search. A copy is never edited in
//! place: it is replaced whole by a newer one (a write that landed, a watch
//! update, a re-read), or rebuilt smaller by a trim; the changes on their
//! way to KV are kept beside it ([`crate::dicts::Dict`]).

use std::borrow::Borrow;

use headcount_protocol::DeviceId;
use headcount_protocol::wire::{SessionDict, SessionRecord};

/// One dictionary's entries, sorted by device, without spare capacity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entries(Box<[(DeviceId, SessionRecord)]>);

impl Entries {
    fn position(&self, device: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(d, _)| d.as_str().cmp(device))
    }

    /// The device's record.
    pub fn get(&self, device: &(impl Borrow<str> + ?Sized)) -> Option<&SessionRecord> {
        self.get_key_value(device).map(|(_, r)| r)
    }

    /// The device's entry, its name as held here.
    pub fn get_key_value(
        &self,
        device: &(impl Borrow<str> + ?Sized),
    ) -> Option<(&DeviceId, &SessionRecord)> {
        let p = self.position(device.borrow()).ok()?;
        let (d, r) = &self.0[p];
        Some((d, r))
    }

    pub fn contains_key(&self, device: &(impl Borrow<str> + ?Sized)) -> bool {
        self.position(device.borrow()).is_ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every entry, in device order.
    pub fn iter(&self) -> impl Iterator<Item = (&DeviceId, &SessionRecord)> {
        self.0.iter().map(|(d, r)| (d, r))
    }

    pub fn keys(&self) -> impl Iterator<Item = &DeviceId> {
        self.0.iter().map(|(d, _)| d)
    }

    /// The entries as a dictionary to change and write.
    pub fn to_dict(&self) -> SessionDict {
        self.iter().map(|(d, r)| (d.clone(), r.clone())).collect()
    }
}

impl From<SessionDict> for Entries {
    fn from(dict: SessionDict) -> Self {
        dict.into_iter().collect()
    }
}

/// From entries of distinct devices (a dictionary's, or a part of one).
impl FromIterator<(DeviceId, SessionRecord)> for Entries {
    fn from_iter<I: IntoIterator<Item = (DeviceId, SessionRecord)>>(entries: I) -> Self {
        let mut v: Vec<_> = entries.into_iter().collect();
        v.sort_unstable_by(|(a, _), (b, _)| a.cmp(b));
        // Exactly as long as the entries: no spare capacity is kept.
        Self(v.into_boxed_slice())
    }
}

impl<Q: Borrow<str> + ?Sized> std::ops::Index<&Q> for Entries {
    type Output = SessionRecord;

    /// The device's record; panics when the device has none, as a map's
    /// index does.
    fn index(&self, device: &Q) -> &SessionRecord {
        match self.get(device) {
            Some(r) => r,
            None => panic!("no entry for device {}", device.borrow()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use headcount_protocol::SessionId;

    fn rec(session: &str) -> SessionRecord {
        SessionRecord {
            session: SessionId::parse(session).unwrap(),
            since: 1,
            last_seen: 2,
            labels: Default::default(),
            replaced: None,
        }
    }

    #[test]
    fn finds_each_device_and_round_trips_a_dictionary() {
        let dict: SessionDict = ["tv", "radio", "phone", "a", "z"]
            .iter()
            .enumerate()
            .map(|(i, d)| (DeviceId::parse(d).unwrap(), rec(&format!("s{i}"))))
            .collect();
        let entries = Entries::from(dict.clone());
        assert_eq!(entries.len(), 5);
        for (d, r) in &dict {
            assert_eq!(entries.get(d), Some(r));
            assert_eq!(entries.get(d.as_str()), Some(r));
            assert!(entries.contains_key(d));
        }
        assert!(!entries.contains_key("b"));
        assert_eq!(entries.get("zz"), None);
        let keys: Vec<&str> = entries.keys().map(DeviceId::as_str).collect();
        assert_eq!(keys, ["a", "phone", "radio", "tv", "z"]);
        assert_eq!(entries.to_dict(), dict);
        assert!(Entries::default().is_empty());
    }
}
