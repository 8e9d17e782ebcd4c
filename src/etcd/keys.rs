//! Where locks live in etcd.
//!
//! The lock of name `n` in namespace `ns` is the set of keys under the prefix
//! `P = <ns><encoded n>/`, the layout of etcd's `concurrency.Mutex` and of
//! `etcdctl lock <ns><n>`. The key with the lowest create revision is first
//! in line. Every acquisition puts its own key (sharing a lease must never
//! let two acquisitions share a key):
//!
//! | mode        | key                             |
//! |-------------|---------------------------------|
//! | exclusive   | `P<lease hex>-<slot hex>`       |
//! | shared      | `P~r/<lease hex>-<slot hex>`    |
//! | permits(n)  | `P~p<n>/<lease hex>-<slot hex>` |
//!
//! The slot is the lowest number this locker is not using for the name right
//! now, so a name locked over and over by one process reuses one key. Fresh
//! keys would each leave a deleted entry in etcd's index until the next
//! compaction, and every range compare and read of the name would scan them
//! all.
//!
//! Keys of other clients (`etcdctl lock`, Go's Mutex: `P<lease hex>`) read as
//! exclusive. `~` sorts after every hex digit and is never produced by Go's
//! Mutex, so the shared and permit keys form ranges of their own, and a
//! "nobody incompatible holds or waits" test is a compare over the ranges
//! around them.

use crate::LockMode;
use crate::LockName;

const SHARED_MARK: &str = "~r/";
const PERMITS_MARK: &str = "~p";

/// The keys of one name.
#[derive(Debug, Clone)]
pub(crate) struct NameKeys {
    prefix: String,
}

impl NameKeys {
    pub(crate) fn new(namespace: &str, name: &LockName) -> Self {
        let mut prefix = String::with_capacity(namespace.len() + name.as_str().len() + 1);
        prefix.push_str(namespace);
        prefix.push_str(&name.encoded());
        prefix.push('/');
        Self { prefix }
    }

    /// `<namespace><encoded name>/`.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The first key past the name's range.
    pub(crate) fn range_end(&self) -> Vec<u8> {
        prefix_end(self.prefix.as_bytes())
    }

    /// The key of one acquisition.
    pub(crate) fn key(&self, mode: LockMode, lease_id: i64, slot: u64) -> String {
        let p = &self.prefix;
        match mode {
            LockMode::Shared => format!("{p}{SHARED_MARK}{lease_id:x}-{slot:x}"),
            LockMode::Permits(n) => format!("{p}{PERMITS_MARK}{n}/{lease_id:x}-{slot:x}"),
            _ => format!("{p}{lease_id:x}-{slot:x}"),
        }
    }

    /// The mode a key of this name was put with.
    pub(crate) fn mode_of(&self, key: &[u8]) -> LockMode {
        let suffix = key.get(self.prefix.len()..).unwrap_or_default();
        if suffix.starts_with(SHARED_MARK.as_bytes()) {
            return LockMode::Shared;
        }
        if let Some(rest) = suffix.strip_prefix(PERMITS_MARK.as_bytes()) {
            let digits = rest.split(|b| *b == b'/').next().unwrap_or_default();
            let n = std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse::<u32>().ok())
                .and_then(LockMode::permits);
            if let (Some(mode), true) = (n, rest.len() > digits.len()) {
                return mode;
            }
        }
        LockMode::Exclusive
    }

    /// The sub-range whose keys are compatible with `mode` (`None`: no key is).
    pub(crate) fn compatible_range(&self, mode: LockMode) -> Option<(Vec<u8>, Vec<u8>)> {
        let start = match mode {
            LockMode::Shared => format!("{}{SHARED_MARK}", self.prefix),
            LockMode::Permits(n) => format!("{}{PERMITS_MARK}{n}/", self.prefix),
            _ => return None,
        };
        let end = prefix_end(start.as_bytes());
        Some((start.into_bytes(), end))
    }

    /// The ranges that must be empty for `mode` to be granted without waiting:
    /// the whole name, minus the compatible range.
    pub(crate) fn incompatible_ranges(&self, mode: LockMode) -> Vec<(Vec<u8>, Vec<u8>)> {
        let start = self.prefix.as_bytes().to_vec();
        let end = self.range_end();
        match self.compatible_range(mode) {
            None => vec![(start, end)],
            Some((c_start, c_end)) => vec![(start, c_start), (c_end, end)],
        }
    }
}

/// The first key after every key that starts with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // the whole keyspace, as etcd spells it
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(name: &str) -> NameKeys {
        NameKeys::new("ns/", &LockName::new(name).unwrap())
    }

    #[test]
    fn layout_matches_etcdctl_for_plain_names() {
        let k = keys("tenant-1");
        assert_eq!(k.prefix(), "ns/tenant-1/");
        assert_eq!(k.key(LockMode::Exclusive, 0xabc, 2), "ns/tenant-1/abc-2");
        assert_eq!(k.range_end(), b"ns/tenant-10".to_vec());
    }

    #[test]
    fn modes_round_trip_through_keys() {
        let k = keys("x");
        for mode in [
            LockMode::Exclusive,
            LockMode::Shared,
            LockMode::permits(1).unwrap(),
            LockMode::permits(17).unwrap(),
        ] {
            assert_eq!(k.mode_of(k.key(mode, 0x694d, 9).as_bytes()), mode);
        }
        // etcdctl / Go Mutex keys are exclusive.
        assert_eq!(k.mode_of(b"ns/x/694d7a0b1c2d3e4f"), LockMode::Exclusive);
        assert_eq!(k.mode_of(b"ns/x/~p0/1-1"), LockMode::Exclusive);
        assert_eq!(k.mode_of(b"ns/x/~p12"), LockMode::Exclusive);
    }

    #[test]
    fn compatible_ranges_hold_exactly_their_keys() {
        let k = keys("x");
        let in_range = |r: &(Vec<u8>, Vec<u8>), key: &str| {
            key.as_bytes() >= r.0.as_slice() && key.as_bytes() < r.1.as_slice()
        };
        let shared = k.compatible_range(LockMode::Shared).unwrap();
        assert!(in_range(&shared, &k.key(LockMode::Shared, 1, 1)));
        assert!(!in_range(&shared, &k.key(LockMode::Exclusive, 0xffff, 1)));
        let p2 = LockMode::permits(2).unwrap();
        let p20 = LockMode::permits(20).unwrap();
        let r2 = k.compatible_range(p2).unwrap();
        assert!(in_range(&r2, &k.key(p2, 1, 1)));
        assert!(!in_range(&r2, &k.key(p20, 1, 1)));
        for (s, e) in k.incompatible_ranges(LockMode::Shared) {
            assert!(s <= e);
            assert!(!in_range(&(s, e), &k.key(LockMode::Shared, 7, 7)));
        }
    }

    #[test]
    fn prefix_end_carries() {
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }
}
