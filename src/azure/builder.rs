//! [`AzureBlobLockerBuilder`]: lease duration, renewal, waiting and
//! request timeout of an [`AzureBlobLocker`], checked at build time.

use std::time::Duration;

use azure_storage_blob::BlobContainerClient;

use super::store::AzureBlobStore;
use super::AzureBlobLocker;
use crate::store::{BusyWait, LeaseTiming, StoreConfigError, StoreLocker};

/// The lease duration unless set: 30 s, DistributedLock.Azure's default.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// The request timeout unless set.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How often an infinite lease is checked (renewed) unless set: a broken
/// lease is noticed within this time.
pub const DEFAULT_INFINITE_CHECK: Duration = Duration::from_secs(20);
/// The longest blob name prefix accepted.
pub const MAX_PREFIX: usize = 256;

/// Builds an [`AzureBlobLocker`]; see its docs for an example.
#[must_use]
pub struct AzureBlobLockerBuilder {
    container: BlobContainerClient,
    prefix: String,
    lease: Option<Duration>,
    cadence: Option<Duration>,
    busy_wait: BusyWait,
    request_timeout: Duration,
}

/// An [`AzureBlobLockerBuilder`] setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AzureConfigError {
    /// Azure leases last 15 to 60 whole seconds, or forever.
    #[error("lease duration {0:?} is not allowed: Azure leases last 15 to 60 whole seconds (or use infinite_lease())")]
    LeaseDuration(Duration),
    /// The blob name prefix is unusable.
    #[error("blob prefix {prefix:?}: {reason}")]
    Prefix {
        /// The prefix asked for.
        prefix: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The renewal cadence, request timeout or busy-wait range cannot work
    /// with the lease.
    #[error(transparent)]
    Timing(#[from] StoreConfigError),
}

impl AzureBlobLockerBuilder {
    pub(super) fn new(container: BlobContainerClient) -> Self {
        Self {
            container,
            prefix: String::new(),
            lease: Some(DEFAULT_LEASE),
            cadence: None,
            busy_wait: BusyWait::default(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// How long a lease lasts unless renewed: 15 to 60 whole seconds
    /// (default 30 s). A holder that crashes keeps the name this long.
    pub fn lease_duration(mut self, duration: Duration) -> Self {
        self.lease = Some(duration);
        self
    }

    /// Leases that never expire: a holder that crashes keeps its names
    /// until someone breaks their leases. Held leases are still renewed
    /// every [`renewal_cadence`](Self::renewal_cadence) (default 20 s), to
    /// notice a broken one.
    pub fn infinite_lease(mut self) -> Self {
        self.lease = None;
        self
    }

    /// How often held leases are renewed (default a third of the lease).
    /// With the request timeout it must leave time for a failed renewal to
    /// be retried before the lease runs out.
    pub fn renewal_cadence(mut self, cadence: Duration) -> Self {
        self.cadence = Some(cadence);
        self
    }

    /// The random pause between two polls of a busy name (default 250 ms to
    /// 1 s, as DistributedLock.Azure's busy-wait sleep): it starts at `min`
    /// and grows toward `max` while the name stays busy.
    pub fn busy_wait(mut self, min: Duration, max: Duration) -> Self {
        self.busy_wait = BusyWait { min, max };
        self
    }

    /// The bound on every call to the service, retries included (default
    /// 3 s). The SDK's own retry policy (by default up to 8 retries over a
    /// minute) is cut off at this bound; a call that takes longer fails the
    /// acquisition with [`LockError::Unavailable`](crate::LockError::Unavailable).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Puts every lock blob under this prefix (default none): for example
    /// `locks/`. At most 256 characters, not starting with `/`, without
    /// empty, `.` or `..` path segments, ending with `/` if it has any.
    pub fn blob_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Checks the settings and builds the locker. Sends nothing: the
    /// container must exist, and lock blobs are created on first use.
    pub fn build(self) -> Result<AzureBlobLocker, AzureConfigError> {
        check_prefix(&self.prefix)?;
        let lease_secs = match self.lease {
            None => -1,
            Some(d) if d.subsec_nanos() == 0 && (15..=60).contains(&d.as_secs()) => {
                i32::try_from(d.as_secs()).map_err(|_| AzureConfigError::LeaseDuration(d))?
            }
            Some(d) => return Err(AzureConfigError::LeaseDuration(d)),
        };
        let cadence = self.cadence.unwrap_or(match self.lease {
            Some(lease) => lease / 3,
            None => DEFAULT_INFINITE_CHECK,
        });
        let timing = LeaseTiming {
            duration: self.lease,
            cadence,
            request_timeout: self.request_timeout,
        };
        let store = AzureBlobStore {
            container: self.container,
            prefix: self.prefix,
            lease_secs,
        };
        let inner = StoreLocker::new(store, timing, self.busy_wait)?;
        Ok(AzureBlobLocker { inner })
    }
}

impl std::fmt::Debug for AzureBlobLockerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureBlobLockerBuilder")
            .field(
                "container",
                &super::store::without_secret(self.container.url()),
            )
            .field("prefix", &self.prefix)
            .field("lease", &self.lease)
            .field("cadence", &self.cadence)
            .field("busy_wait", &self.busy_wait)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

fn check_prefix(prefix: &str) -> Result<(), AzureConfigError> {
    let bad = |reason| {
        Err(AzureConfigError::Prefix {
            prefix: prefix.to_owned(),
            reason,
        })
    };
    if prefix.is_empty() {
        return Ok(());
    }
    if prefix.chars().count() > MAX_PREFIX {
        return bad("longer than 256 characters");
    }
    if prefix.chars().any(|c| c.is_control() || c == '\\') {
        return bad("contains a control character or a backslash");
    }
    let Some(path) = prefix.strip_suffix('/') else {
        return bad("must end with '/'");
    };
    if path
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return bad("has an empty, '.' or '..' path segment (or starts with '/')");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert!(check_prefix("").is_ok());
        assert!(check_prefix("locks/").is_ok());
        assert!(check_prefix("a/b/").is_ok());
        for bad in ["locks", "/locks/", "a//b/", "./", "a/../", "a\\b/", "a\n/"] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
        assert!(check_prefix(&format!("{}/", "a".repeat(MAX_PREFIX))).is_err());
    }
}
