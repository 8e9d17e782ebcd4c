//! [`DynamoDbLockerBuilder`]: the settings of a
//! [`DynamoDbLocker`](super::DynamoDbLocker), checked when it is built.

use std::time::Duration;

use super::store::DynamoDbStore;
use super::{DynamoDbLocker, LEASE_MS, OWNER, RELEASED, RVN, TOKEN};
use crate::store::{safety_margin, BusyWait, LeaseTiming, StoreConfigError, StoreLocker};

/// The lease used when none is given (as AWS's own lock client).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(20);
/// The shortest lease accepted.
pub const MIN_LEASE: Duration = Duration::from_secs(1);
/// The longest lease accepted: an abandoned lock is taken over only after
/// a whole lease.
pub const MAX_LEASE: Duration = Duration::from_secs(3600);
/// The request timeout used when none is given, unless the lease needs a
/// shorter one (see [`DynamoDbLockerBuilder::request_timeout`]).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The key attribute used when none is given.
pub const DEFAULT_KEY_ATTRIBUTE: &str = "lock";

/// A setting of [`DynamoDbLockerBuilder`] that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DynamoDbConfigError {
    /// The lease is outside [`MIN_LEASE`]..=[`MAX_LEASE`].
    #[error("lease {0:?} must be between {MIN_LEASE:?} and {MAX_LEASE:?}")]
    BadLease(Duration),
    /// The heartbeat must be above zero and at most half the lease.
    #[error("heartbeat {heartbeat:?} must be above zero and at most half the lease {lease:?}")]
    BadHeartbeat {
        /// The heartbeat asked for.
        heartbeat: Duration,
        /// The lease in force.
        lease: Duration,
    },
    /// The lease, heartbeat and request timeout leave no room to retry a
    /// heartbeat before the lease's local deadline, or the busy-wait range
    /// is empty.
    #[error(transparent)]
    Timing(#[from] StoreConfigError),
    /// Not a DynamoDB table name (3 to 255 of `a-z A-Z 0-9 _ - .`) or a
    /// table ARN.
    #[error("{0:?} is not a DynamoDB table name (3-255 characters of a-z, A-Z, 0-9, '_', '-', '.') or table ARN")]
    BadTable(String),
    /// The key attribute is empty, longer than 255 bytes, or one of the
    /// attributes this backend writes (`owner`, `rvn`, `lease_ms`,
    /// `released`, `token`).
    #[error("key attribute {0:?} must be 1-255 bytes and not one of owner, rvn, lease_ms, released, token")]
    BadKeyAttribute(String),
}

/// The longest request timeout a locker with this lease and heartbeat
/// (`None`: the default, a quarter of the lease) accepts: a heartbeat may
/// time out once and be retried, both before the lease's local deadline.
///
/// ```
/// use std::time::Duration;
/// use tower_lease_lock::dynamodb::max_request_timeout;
///
/// assert_eq!(max_request_timeout(Duration::from_secs(20), None), Duration::from_millis(7000));
/// assert_eq!(max_request_timeout(Duration::from_secs(3), None), Duration::from_millis(825));
/// ```
pub fn max_request_timeout(lease: Duration, heartbeat: Option<Duration>) -> Duration {
    let heartbeat = heartbeat.unwrap_or(lease / 4);
    lease
        .saturating_sub(safety_margin(lease))
        .saturating_sub(heartbeat)
        / 2
}

/// Builds a [`DynamoDbLocker`]; every mistake is a [`DynamoDbConfigError`]
/// from [`DynamoDbLockerBuilder::build`].
///
/// ```no_run
/// # async fn demo(client: aws_sdk_dynamodb::Client) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_lease_lock::dynamodb::DynamoDbLocker;
///
/// let locker = DynamoDbLocker::builder(client, "locks")
///     .lease_duration(Duration::from_secs(30))
///     .heartbeat(Duration::from_secs(5))
///     .busy_wait(Duration::from_millis(100), Duration::from_secs(1))
///     .request_timeout(Duration::from_secs(2))
///     .build()?;
/// locker.ensure_table().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct DynamoDbLockerBuilder {
    client: aws_sdk_dynamodb::Client,
    table: String,
    lease: Duration,
    heartbeat: Option<Duration>,
    busy_wait: BusyWait,
    request_timeout: Option<Duration>,
    key_attribute: String,
    owner: Option<String>,
}

impl DynamoDbLockerBuilder {
    pub(super) fn new(client: aws_sdk_dynamodb::Client, table: String) -> Self {
        Self {
            client,
            table,
            lease: DEFAULT_LEASE,
            heartbeat: None,
            busy_wait: BusyWait::default(),
            request_timeout: None,
            key_attribute: DEFAULT_KEY_ATTRIBUTE.to_string(),
            owner: None,
        }
    }

    /// How long a lock lasts without a heartbeat (default
    /// [`DEFAULT_LEASE`]): an abandoned lock is taken over after one to
    /// about two leases.
    pub fn lease_duration(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How often each held lock's version is rewritten (default a quarter of
    /// the lease); at most half the lease.
    pub fn heartbeat(mut self, heartbeat: Duration) -> Self {
        self.heartbeat = Some(heartbeat);
        self
    }

    /// The random pause between two polls of a busy name: it starts at
    /// `min` and grows toward `max` (default 250 ms to 1 s).
    pub fn busy_wait(mut self, min: Duration, max: Duration) -> Self {
        self.busy_wait = BusyWait { min, max };
        self
    }

    /// The bound on each DynamoDB call, the SDK's retries of throttled and
    /// failed attempts included (default [`DEFAULT_REQUEST_TIMEOUT`], or
    /// [`max_request_timeout`] when the lease needs less). A heartbeat must
    /// be able to time out and be retried before the lease's local deadline.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// The name of the table's (string) hash key attribute (default
    /// [`DEFAULT_KEY_ATTRIBUTE`]).
    pub fn key_attribute(mut self, name: impl Into<String>) -> Self {
        self.key_attribute = name.into();
        self
    }

    /// What the `owner` attribute says after this locker's id (default
    /// `<hostname>:<pid>`), for people reading the table.
    pub fn owner_description(mut self, description: impl Into<String>) -> Self {
        self.owner = Some(description.into());
        self
    }

    /// Checks the settings and builds the locker. No request is sent.
    pub fn build(self) -> Result<DynamoDbLocker, DynamoDbConfigError> {
        if !(MIN_LEASE..=MAX_LEASE).contains(&self.lease) {
            return Err(DynamoDbConfigError::BadLease(self.lease));
        }
        let heartbeat = self.heartbeat.unwrap_or(self.lease / 4);
        if heartbeat.is_zero() || heartbeat > self.lease / 2 {
            return Err(DynamoDbConfigError::BadHeartbeat {
                heartbeat,
                lease: self.lease,
            });
        }
        if !valid_table(&self.table) {
            return Err(DynamoDbConfigError::BadTable(self.table));
        }
        let key = &self.key_attribute;
        if key.is_empty()
            || key.len() > 255
            || [OWNER, RVN, LEASE_MS, RELEASED, TOKEN].contains(&key.as_str())
        {
            return Err(DynamoDbConfigError::BadKeyAttribute(self.key_attribute));
        }
        let request_timeout = self.request_timeout.unwrap_or_else(|| {
            DEFAULT_REQUEST_TIMEOUT.min(max_request_timeout(self.lease, Some(heartbeat)))
        });
        let timing = LeaseTiming {
            duration: Some(self.lease),
            cadence: heartbeat,
            request_timeout,
        };
        let owner = format!(
            "{} {}",
            uuid::Uuid::new_v4(),
            self.owner.unwrap_or_else(default_owner)
        );
        let store = DynamoDbStore::new(
            self.client,
            self.table,
            self.key_attribute,
            owner,
            self.lease,
            request_timeout,
        );
        let inner = StoreLocker::new(store, timing, self.busy_wait)?;
        Ok(DynamoDbLocker { inner })
    }
}

/// A table name (`[a-zA-Z0-9_.-]{3,255}`) or ARN.
fn valid_table(table: &str) -> bool {
    if table.starts_with("arn:") {
        return table.len() <= 1024 && !table.chars().any(char::is_whitespace);
    }
    (3..=255).contains(&table.len())
        && table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// `<hostname>:<pid>`.
fn default_owner() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_string());
    format!("{host}:{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        assert!(valid_table("locks"));
        assert!(valid_table("my-app.locks_v2"));
        assert!(valid_table(
            "arn:aws:dynamodb:us-east-1:123456789012:table/locks"
        ));
        assert!(!valid_table("ab"));
        assert!(!valid_table("has space"));
        assert!(!valid_table(&"x".repeat(256)));
    }

    #[test]
    fn default_timeout_fits_the_lease() {
        for secs in [1, 2, 3, 5, 20, 60] {
            let lease = Duration::from_secs(secs);
            let timing = LeaseTiming {
                duration: Some(lease),
                cadence: lease / 4,
                request_timeout: DEFAULT_REQUEST_TIMEOUT.min(max_request_timeout(lease, None)),
            };
            assert!(timing.check().is_ok(), "{secs} s: {timing:?}");
        }
    }
}
