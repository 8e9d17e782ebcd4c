//! Lock modes and the rule that decides who holds a name.
//!
//! Every backend keeps, per name, a queue of acquisitions ordered by arrival
//! (etcd: the create revision of each key; memory: a counter). An acquisition
//! holds the name once every acquisition before it is compatible with it:
//!
//! - [`LockMode::Exclusive`] is compatible with nothing: it waits for every
//!   earlier holder and waiter.
//! - [`LockMode::Shared`] is compatible with earlier shared acquisitions only,
//!   so a reader that arrives after a waiting writer queues behind it (no writer
//!   starvation).
//! - [`LockMode::Permits`]`(n)` is compatible with fewer than `n` earlier
//!   permit acquisitions of the same `n`.

use std::fmt;
use std::num::NonZeroU32;

/// How a name is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum LockMode {
    /// One holder at a time (a write lock). The default.
    #[default]
    Exclusive,
    /// Any number of shared holders at once, but never together with an
    /// exclusive one (a read lock).
    Shared,
    /// At most `n` holders at once (a semaphore). Every acquirer of one name
    /// must use the same `n`; a mismatch is reported as
    /// [`LockError::ModeConflict`](crate::LockError::ModeConflict).
    Permits(NonZeroU32),
}

impl LockMode {
    /// `Permits(n)`, or `None` when `n == 0`.
    pub fn permits(n: u32) -> Option<Self> {
        NonZeroU32::new(n).map(Self::Permits)
    }

    /// A short lowercase label: `exclusive`, `shared` or `permits`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Exclusive => "exclusive",
            Self::Shared => "shared",
            Self::Permits(_) => "permits",
        }
    }
}

impl fmt::Display for LockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Permits(n) => write!(f, "permits({n})"),
            other => f.write_str(other.label()),
        }
    }
}

/// What the queue says about one acquisition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grant {
    /// It holds the name.
    Granted,
    /// An earlier acquisition excludes it.
    Wait,
    /// An earlier acquisition uses `Permits` with another count.
    Mismatch(LockMode),
}

/// Applies the rule of the module docs to `mode`, given the modes of every
/// earlier acquisition of the name, oldest first.
pub(crate) fn grant(mode: LockMode, earlier: impl IntoIterator<Item = LockMode>) -> Grant {
    let mut permits_taken: u32 = 0;
    for other in earlier {
        match (mode, other) {
            (LockMode::Shared, LockMode::Shared) => {}
            (LockMode::Permits(n), LockMode::Permits(m)) if n == m => {
                permits_taken += 1;
                if permits_taken >= n.get() {
                    return Grant::Wait;
                }
            }
            (LockMode::Permits(_), LockMode::Permits(_)) => return Grant::Mismatch(other),
            _ => return Grant::Wait,
        }
    }
    Grant::Granted
}

#[cfg(test)]
mod tests {
    use super::*;
    use LockMode::*;

    fn p(n: u32) -> LockMode {
        LockMode::permits(n).unwrap()
    }

    #[test]
    fn exclusive_needs_an_empty_queue() {
        assert_eq!(grant(Exclusive, []), Grant::Granted);
        assert_eq!(grant(Exclusive, [Shared]), Grant::Wait);
        assert_eq!(grant(Exclusive, [p(5)]), Grant::Wait);
    }

    #[test]
    fn readers_share_but_queue_behind_writers() {
        assert_eq!(grant(Shared, [Shared, Shared]), Grant::Granted);
        assert_eq!(grant(Shared, [Shared, Exclusive]), Grant::Wait);
        assert_eq!(grant(Shared, [p(3)]), Grant::Wait);
    }

    #[test]
    fn permits_count_earlier_permits() {
        assert_eq!(grant(p(2), [p(2)]), Grant::Granted);
        assert_eq!(grant(p(2), [p(2), p(2)]), Grant::Wait);
        assert_eq!(grant(p(2), [Exclusive]), Grant::Wait);
        assert_eq!(grant(p(2), [p(3)]), Grant::Mismatch(p(3)));
    }

    #[test]
    fn display() {
        assert_eq!(p(3).to_string(), "permits(3)");
        assert_eq!(Shared.to_string(), "shared");
    }
}
