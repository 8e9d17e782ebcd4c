//! [`LockError`]: every way an acquisition can fail.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use crate::{InvalidName, LockMode, LockName};

/// A boxed error from a backend.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What is known of the current holder of a contended name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Holder {
    /// The holder's fencing token (etcd: its key's create revision), if known.
    pub token: Option<u64>,
    /// The holder's backend key, if it has one.
    pub key: Option<String>,
    /// The holder's lease id, if known.
    pub lease_id: Option<i64>,
    /// `true` when the holder is this very locker (answered without a round trip).
    pub same_locker: bool,
}

impl Holder {
    /// A holder of which only the fencing token is known.
    pub fn with_token(token: u64) -> Self {
        Self {
            token: Some(token),
            key: None,
            lease_id: None,
            same_locker: false,
        }
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.same_locker {
            f.write_str("this locker")?;
        } else {
            f.write_str("another locker")?;
        }
        if let Some(key) = &self.key {
            write!(f, ", key {key}")?;
        }
        if let Some(token) = self.token {
            write!(f, ", token {token}")?;
        }
        Ok(())
    }
}

/// Why a lock was not acquired, or is no longer held.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// The name is held by someone else (try mode).
    #[error("lock {name:?} is held{}", holder.as_ref().map(|h| format!(" by {h}")).unwrap_or_default())]
    Locked {
        /// The contended name.
        name: LockName,
        /// What is known of the holder.
        holder: Option<Holder>,
    },
    /// The name stayed held for the whole wait.
    #[error("gave up on lock {name:?} after waiting {waited:?}")]
    Timeout {
        /// The contended name.
        name: LockName,
        /// How long the acquisition waited.
        waited: Duration,
    },
    /// The name is not a valid [`LockName`].
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    /// The backend did not answer in time or answered with an error.
    #[error("lock backend unavailable: {message}")]
    Unavailable {
        /// What failed.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The backend refused the request for want of permission: the
    /// credentials lack a grant on the lock's keys (etcd: `permission
    /// denied`), or are missing or no longer valid (an expired auth token,
    /// no user). Repeating the request cannot fix it: the service's backend
    /// configuration must change. [`LockLayer`](crate::LockLayer) answers 500
    /// (a server misconfiguration, not an outage: no `Retry-After`).
    #[error("lock backend permission denied: {message}")]
    PermissionDenied {
        /// What was refused, and etcd's reason.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The lock was lost: its lease expired, was revoked or was not renewed
    /// before its local deadline, or its key vanished while it waited in line.
    #[error("lock {name:?} was lost: {reason}")]
    Lost {
        /// The name whose lock was lost.
        name: LockName,
        /// Why.
        reason: String,
    },
    /// The name is in use with an incompatible mode (two different permit counts).
    #[error("lock {name:?} is used as {theirs} by others, not as {ours}")]
    ModeConflict {
        /// The name.
        name: LockName,
        /// The mode asked for.
        ours: LockMode,
        /// The mode found in use.
        theirs: LockMode,
    },
    /// The backend cannot lock in this mode: lease stores without watches
    /// (Azure blob leases, DynamoDB) hold exclusive locks only. A server
    /// misconfiguration: the layer answers 500.
    #[error("the {backend} backend holds exclusive locks only, not {mode}")]
    UnsupportedMode {
        /// The backend's name.
        backend: &'static str,
        /// The mode asked for.
        mode: LockMode,
    },
}

impl LockError {
    /// A [`LockError::Unavailable`] with a message and a source.
    pub fn unavailable(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Unavailable {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// `true` for [`LockError::Locked`] and [`LockError::Timeout`]: the name is busy.
    pub fn is_contended(&self) -> bool {
        matches!(self, Self::Locked { .. } | Self::Timeout { .. })
    }

    /// The name the error is about, when it is about one.
    pub fn name(&self) -> Option<&LockName> {
        match self {
            Self::Locked { name, .. }
            | Self::Timeout { name, .. }
            | Self::Lost { name, .. }
            | Self::ModeConflict { name, .. } => Some(name),
            Self::InvalidName(_)
            | Self::Unavailable { .. }
            | Self::PermissionDenied { .. }
            | Self::UnsupportedMode { .. } => None,
        }
    }

    /// The error's message for a one-line log: its `Display`, without the
    /// text of its source when the message ends with it (backends often
    /// write `"etcd txn failed: {source}"`, and a gRPC error's text runs
    /// long). The source itself stays available through
    /// [`std::error::Error::source`].
    pub(crate) fn summary(&self) -> String {
        let full = self.to_string();
        let Some(source) = StdError::source(self) else {
            return full;
        };
        let source = source.to_string();
        match full.strip_suffix(source.as_str()) {
            Some(head) if !source.is_empty() => {
                let head = head.trim_end_matches([' ', ':']);
                if head.is_empty() {
                    full
                } else {
                    head.to_string()
                }
            }
            _ => full,
        }
    }

    /// A short label for logs and metrics: `locked`, `timeout`, `invalid_name`,
    /// `unavailable`, `permission_denied`, `lost` or `mode_conflict`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Locked { .. } => "locked",
            Self::Timeout { .. } => "timeout",
            Self::InvalidName(_) => "invalid_name",
            Self::Unavailable { .. } => "unavailable",
            Self::PermissionDenied { .. } => "permission_denied",
            Self::Lost { .. } => "lost",
            Self::ModeConflict { .. } => "mode_conflict",
            Self::UnsupportedMode { .. } => "unsupported_mode",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_leaves_out_the_source_text() {
        let source = std::io::Error::other("status: Unavailable, message: \"tcp connect error\"");
        let err = LockError::unavailable(format!("etcd txn failed: {source}"), source);
        assert_eq!(err.summary(), "lock backend unavailable: etcd txn failed");
        // A message that does not end with its source's text stays whole.
        let err = LockError::unavailable("etcd txn failed", std::io::Error::other("refused"));
        assert_eq!(err.summary(), "lock backend unavailable: etcd txn failed");
        let err = LockError::Unavailable {
            message: "etcd txn did not answer within 2s".into(),
            source: None,
        };
        assert_eq!(
            err.summary(),
            "lock backend unavailable: etcd txn did not answer within 2s"
        );
    }
}
