//! Lock names: validation and an injective, prefix-free key encoding.
//!
//! A [`LockName`] is what a request locks: a tenant id, a path, a header value.
//! Backends never use it raw. They use [`LockName::encoded`], which keeps the
//! unreserved characters `[A-Za-z0-9._~-]` as they are and percent-escapes
//! every other byte of the UTF-8 text (`/` becomes `%2F`, `%` becomes `%25`).
//!
//! Two properties follow, and the etcd backend relies on both:
//!
//! - **Injective**: distinct names have distinct encodings.
//! - **Prefix-free once a separator is added**: an encoding never contains
//!   `/`, so `encoded(a) + "/"` is never a prefix of `encoded(b) + "/"` unless
//!   `a == b`. The lock of `a` therefore never sees the keys of `a/b` (etcd's own
//!   `concurrency.Mutex` gets this wrong: its `a/` range contains `a/b/`).

use std::fmt;
use std::sync::Arc;

/// The longest name accepted, in bytes of UTF-8.
pub const MAX_NAME_LEN: usize = 512;

/// A validated lock name.
///
/// Non-empty UTF-8 of at most [`MAX_NAME_LEN`] bytes without control
/// characters. Cheap to clone.
///
/// ```
/// use tower_lease_lock::LockName;
///
/// let name = LockName::new("tenant:acme/orders").unwrap();
/// assert_eq!(name.as_str(), "tenant:acme/orders");
/// assert_eq!(name.encoded(), "tenant%3Aacme%2Forders");
/// assert!(LockName::new("").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockName(Arc<str>);

/// Why a string is not a valid [`LockName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidName {
    /// The name is empty.
    #[error("lock name is empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("lock name is {len} bytes long, the limit is {max}")]
    TooLong {
        /// Length of the rejected name in bytes.
        len: usize,
        /// The limit, [`MAX_NAME_LEN`].
        max: usize,
    },
    /// The name contains a control character.
    #[error("lock name contains the control character {ch:?} at byte {at}")]
    ControlChar {
        /// The offending character.
        ch: char,
        /// Its byte offset in the name.
        at: usize,
    },
    /// The name is not UTF-8 (for names taken from raw bytes such as headers).
    #[error("lock name is not valid UTF-8")]
    NotUtf8,
    /// The name's key in the backend would be longer than the backend
    /// allows (an Azure blob name, for example, has at most 1024 characters).
    #[error("lock name encodes to a {backend} key of {len} characters, the limit is {max}")]
    TooLongForBackend {
        /// The backend's name.
        backend: &'static str,
        /// The length of the key the name would have.
        len: usize,
        /// The backend's limit.
        max: usize,
    },
}

impl LockName {
    /// Validates `name`.
    pub fn new(name: impl AsRef<str>) -> Result<Self, InvalidName> {
        let name = name.as_ref();
        if name.is_empty() {
            return Err(InvalidName::Empty);
        }
        if name.len() > MAX_NAME_LEN {
            return Err(InvalidName::TooLong {
                len: name.len(),
                max: MAX_NAME_LEN,
            });
        }
        if let Some((at, ch)) = name.char_indices().find(|(_, c)| c.is_control()) {
            return Err(InvalidName::ControlChar { ch, at });
        }
        Ok(Self(Arc::from(name)))
    }

    /// Validates a name given as bytes (a header value, say).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, InvalidName> {
        std::str::from_utf8(bytes)
            .map_err(|_| InvalidName::NotUtf8)
            .and_then(Self::new)
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The escaped form used in backend keys; never contains `/`.
    pub fn encoded(&self) -> String {
        let mut out = String::with_capacity(self.0.len());
        for &b in self.0.as_bytes() {
            if is_unreserved(b) {
                out.push(char::from(b));
            } else {
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        }
        out
    }

    /// Reverses [`LockName::encoded`]; `None` when `encoded` is not an encoding
    /// of a valid name.
    pub fn decode(encoded: &str) -> Option<Self> {
        let bytes = encoded.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if b == b'%' {
                let hi = hex_value(*bytes.get(i + 1)?)?;
                let lo = hex_value(*bytes.get(i + 2)?)?;
                let decoded = (hi << 4) | lo;
                if is_unreserved(decoded) {
                    return None; // not canonical: would break injectivity
                }
                out.push(decoded);
                i += 3;
            } else if is_unreserved(b) {
                out.push(b);
                i += 1;
            } else {
                return None;
            }
        }
        Self::new(String::from_utf8(out).ok()?).ok()
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for LockName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for LockName {
    type Error = InvalidName;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl TryFrom<String> for LockName {
    type Error = InvalidName;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl std::str::FromStr for LockName {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name_strategy() -> impl Strategy<Value = String> {
        // Bias towards the characters that matter: separators, escapes, unicode.
        prop::collection::vec(
            prop_oneof![
                Just('a'),
                Just('b'),
                Just('/'),
                Just('%'),
                Just('~'),
                Just('.'),
                Just('2'),
                Just('F'),
                Just(' '),
                Just('é'),
                any::<char>(),
            ],
            1..12,
        )
        .prop_map(|cs| cs.into_iter().collect::<String>())
        .prop_filter("valid names", |s| LockName::new(s).is_ok())
    }

    proptest! {
        #[test]
        fn encoding_round_trips(s in name_strategy()) {
            let name = LockName::new(&s).unwrap();
            let enc = name.encoded();
            prop_assert!(!enc.contains('/'));
            prop_assert_eq!(LockName::decode(&enc), Some(name));
        }

        #[test]
        fn distinct_names_never_share_a_key_range(a in name_strategy(), b in name_strategy()) {
            prop_assume!(a != b);
            let pa = format!("{}/", LockName::new(&a).unwrap().encoded());
            let pb = format!("{}/", LockName::new(&b).unwrap().encoded());
            prop_assert!(!pa.starts_with(&pb) && !pb.starts_with(&pa), "{pa:?} vs {pb:?}");
        }
    }

    #[test]
    fn unreserved_names_map_to_themselves() {
        for s in ["tenant-42", "a.b_c~d", "ABCxyz0189"] {
            assert_eq!(LockName::new(s).unwrap().encoded(), s);
        }
        assert_eq!(LockName::new("a/b").unwrap().encoded(), "a%2Fb");
        assert_eq!(LockName::new("50%").unwrap().encoded(), "50%25");
        assert_eq!(LockName::new("é").unwrap().encoded(), "%C3%A9");
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(LockName::new(""), Err(InvalidName::Empty));
        assert!(matches!(
            LockName::new("a\nb"),
            Err(InvalidName::ControlChar { ch: '\n', at: 1 })
        ));
        assert!(matches!(
            LockName::new("x".repeat(MAX_NAME_LEN + 1)),
            Err(InvalidName::TooLong { .. })
        ));
        assert!(LockName::new("x".repeat(MAX_NAME_LEN)).is_ok());
        assert_eq!(LockName::from_bytes(&[0xff]), Err(InvalidName::NotUtf8));
        assert_eq!(LockName::decode("a%2f"), None);
        assert_eq!(LockName::decode("%61"), None);
    }
}
