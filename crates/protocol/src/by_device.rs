//! One interval dictionary's entries as a service holds them, kept compact.
//!
//! A handler or checker holds an entry per session of its partitions: at a
//! million sessions each byte of an entry is a megabyte. A hash map keeps a
//! third to a half of its slots empty (it doubles as it grows), so a copy
//! is a sorted slice instead: exactly one slot per device, found by binary
//! search. A copy is replaced whole when KV holds a newer dictionary, or
//! rebuilt smaller when entries leave it; only a value may change in place.

use std::borrow::Borrow;
use std::collections::HashMap;

use crate::DeviceId;

/// Entries sorted by device, one per device, without spare capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByDevice<V>(Box<[(DeviceId, V)]>);

impl<V> Default for ByDevice<V> {
    fn default() -> Self {
        Self(Box::default())
    }
}

impl<V> ByDevice<V> {
    fn position(&self, device: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(d, _)| d.as_str().cmp(device))
    }

    /// The device's value.
    pub fn get(&self, device: &(impl Borrow<str> + ?Sized)) -> Option<&V> {
        self.get_key_value(device).map(|(_, v)| v)
    }

    /// The device's value, to change in place.
    pub fn get_mut(&mut self, device: &(impl Borrow<str> + ?Sized)) -> Option<&mut V> {
        let p = self.position(device.borrow()).ok()?;
        Some(&mut self.0[p].1)
    }

    /// The device's entry, its name as held here.
    pub fn get_key_value(&self, device: &(impl Borrow<str> + ?Sized)) -> Option<(&DeviceId, &V)> {
        let p = self.position(device.borrow()).ok()?;
        let (d, v) = &self.0[p];
        Some((d, v))
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
    pub fn iter(&self) -> impl Iterator<Item = (&DeviceId, &V)> {
        self.0.iter().map(|(d, v)| (d, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &DeviceId> {
        self.0.iter().map(|(d, _)| d)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.0.iter_mut().map(|(_, v)| v)
    }

    /// Keeps the entries `keep` accepts (asked once per entry); the slice
    /// is rebuilt to its new length only when some left. Whether any did.
    pub fn retain(&mut self, mut keep: impl FnMut(&DeviceId, &V) -> bool) -> bool {
        let Some(first) = self.0.iter().position(|(d, v)| !keep(d, v)) else {
            return false;
        };
        let mut all = std::mem::take(&mut self.0).into_vec();
        let rest = all.split_off(first + 1);
        all.pop();
        // Still sorted: the order of what stays is kept.
        all.extend(rest.into_iter().filter(|(d, v)| keep(d, v)));
        self.0 = all.into_boxed_slice();
        true
    }

    /// From entries in any order; of a device given twice, the later entry
    /// is kept (as a map built from them would). Entries gathered into a
    /// vector of exactly their number become the slice without a copy.
    pub fn from_entries(mut v: Vec<(DeviceId, V)>) -> Self {
        // Stable: a device's entries stay in their order for the dedup.
        v.sort_by(|(a, _), (b, _)| a.cmp(b));
        v.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(later, kept);
            }
            same
        });
        // Exactly as long as the entries: no spare capacity is kept.
        Self(v.into_boxed_slice())
    }
}

impl<V: Clone> ByDevice<V> {
    /// The entries as a map, to change and write.
    pub fn to_map(&self) -> HashMap<DeviceId, V> {
        self.iter().map(|(d, v)| (d.clone(), v.clone())).collect()
    }
}

impl<V> From<HashMap<DeviceId, V>> for ByDevice<V> {
    fn from(map: HashMap<DeviceId, V>) -> Self {
        map.into_iter().collect()
    }
}

/// From entries of distinct devices (a dictionary's, or a part of one).
impl<V> FromIterator<(DeviceId, V)> for ByDevice<V> {
    fn from_iter<I: IntoIterator<Item = (DeviceId, V)>>(entries: I) -> Self {
        Self::from_entries(entries.into_iter().collect())
    }
}

impl<V> IntoIterator for ByDevice<V> {
    type Item = (DeviceId, V);
    type IntoIter = std::vec::IntoIter<(DeviceId, V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_vec().into_iter()
    }
}

impl<'a, V> IntoIterator for &'a ByDevice<V> {
    type Item = (&'a DeviceId, &'a V);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (DeviceId, V)>,
        fn(&'a (DeviceId, V)) -> (&'a DeviceId, &'a V),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(d, v)| (d, v))
    }
}

impl<V, Q: Borrow<str> + ?Sized> std::ops::Index<&Q> for ByDevice<V> {
    type Output = V;

    /// The device's value; panics when the device has none, as a map's
    /// index does.
    fn index(&self, device: &Q) -> &V {
        match self.get(device) {
            Some(v) => v,
            None => panic!("no entry for device {}", device.borrow()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(d: &str) -> DeviceId {
        DeviceId::parse(d).unwrap()
    }

    #[test]
    fn finds_each_device_in_order_and_retains_without_spare_room() {
        let mut m: ByDevice<u32> = ["tv", "radio", "phone", "a", "z"]
            .iter()
            .enumerate()
            .map(|(i, d)| (dev(d), i as u32))
            .collect();
        assert_eq!(m.len(), 5);
        assert_eq!(m.get("tv"), Some(&0));
        assert_eq!(m["z"], 4);
        assert_eq!(
            m.get_key_value("phone").map(|(d, _)| d.as_str()),
            Some("phone")
        );
        assert!(m.contains_key(&dev("a")));
        assert!(!m.contains_key("b"));
        assert_eq!(m.get("zz"), None);
        let keys: Vec<&str> = m.keys().map(DeviceId::as_str).collect();
        assert_eq!(keys, ["a", "phone", "radio", "tv", "z"]);

        *m.get_mut("radio").unwrap() = 10;
        assert_eq!(m.get("radio"), Some(&10));
        assert!(m.get_mut("b").is_none());

        assert!(!m.retain(|_, _| true), "nothing left: unchanged");
        assert_eq!(m.len(), 5);
        let mut asked = 0;
        assert!(m.retain(|d, v| {
            asked += 1;
            d.as_str() != "phone" && *v != 4
        }));
        assert_eq!(asked, 5, "each entry asked once");
        let left: Vec<(&str, u32)> = m.iter().map(|(d, v)| (d.as_str(), *v)).collect();
        assert_eq!(left, [("a", 3), ("radio", 10), ("tv", 0)]);
        assert_eq!(m.0.len(), 3);
        for v in m.values_mut() {
            *v += 1;
        }
        assert_eq!(m.values().copied().collect::<Vec<_>>(), [4, 11, 1]);
        let map = m.to_map();
        assert_eq!(ByDevice::from(map.clone()), m);
        assert_eq!(map.len(), 3);
        assert!(m.retain(|_, _| false));
        assert!(m.is_empty());
        assert!(ByDevice::<u32>::default().is_empty());
    }

    #[test]
    fn a_device_given_twice_keeps_its_later_entry_and_owned_entries_come_back_in_order() {
        let entries = vec![
            (dev("tv"), 1),
            (dev("a"), 2),
            (dev("tv"), 3),
            (dev("b"), 4),
            (dev("tv"), 5),
            (dev("a"), 6),
        ];
        let m = ByDevice::from_entries(entries.clone());
        let map: HashMap<DeviceId, u32> = entries.into_iter().collect();
        assert_eq!(m.to_map(), map, "as a map built from them");
        let owned: Vec<(String, u32)> = m.into_iter().map(|(d, v)| (d.to_string(), v)).collect();
        assert_eq!(
            owned,
            [
                ("a".to_string(), 6),
                ("b".to_string(), 4),
                ("tv".to_string(), 5)
            ]
        );
    }
}
