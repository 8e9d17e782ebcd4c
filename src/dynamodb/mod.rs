//! [`DynamoDbLocker`]: locks in a DynamoDB table, safe without synchronized
//! clocks (feature `dynamodb`).
//!
//! The algorithm is the one of AWS's own lock client for Java: one item per
//! lock name, no absolute time anywhere.
//!
//! - **Take** (a try, or a waiting poll that found the name free): one
//!   `UpdateItem` conditioned on "no item, or released, or the version we
//!   write (a retry of this same take)" that sets the owner, a fresh record
//!   version number (`rvn`), the lease duration, `released = false`, and
//!   `ADD`s 1 to the `token` counter, returning it. A failed try costs that
//!   one request.
//! - **Heartbeat**: every [`heartbeat`](DynamoDbLockerBuilder::heartbeat)
//!   each held lock's `rvn` is rewritten by an `UpdateItem` conditioned on
//!   our owner and version. The lock is trusted until a local deadline timed
//!   from when the last confirmed heartbeat was *sent*, minus a margin;
//!   a failed condition (the item was changed by somebody else) or a
//!   deadline that passes fires the guard's
//!   [`lost()`](crate::LockGuard::lost).
//! - **Waiting**: one poller per name per locker reads the item
//!   (`GetItem`, consistent read) with a jittered backoff; a busy name costs
//!   one read per poll. The poller records the holder's `rvn`; if it stays
//!   the same for a whole lease *on this process's monotonic clock*, the
//!   holder stopped heartbeating and the next take is also conditioned on
//!   "the version is still that one" (takeover). A holder that crashed is so
//!   taken over after one to about two leases (plus a busy-wait pause),
//!   whatever the machines' clocks say.
//! - **Release**: an `UpdateItem` conditioned on our version that sets
//!   `released = true` and removes the owner. The item is never deleted, so
//!   the token counter survives and keeps increasing.
//!
//! **Guarantees.** Takes are atomic conditional writes: one holder per name
//! at a time as far as DynamoDB is concerned. The fencing token
//! ([`LockGuard::token`](crate::LockGuard::token)) strictly increases from
//! one holder of a name to the next (release, takeover and re-acquire
//! alike); use it with [`fencing::Fence`] on your own writes where
//! correctness depends on exclusion. Like every lease-based lock this is an
//! efficiency lock: a holder paused for longer than a lease may be taken
//! over while it still believes it holds the lock (its `lost()` fires when
//! it wakes, after the fact). Exclusive locks only:
//! [`LockMode::Shared`](crate::LockMode) and permits fail with
//! [`LockError::UnsupportedMode`].
//!
//! **Item layout** (one item per lock name; attribute names are passed as
//! expression attribute names, so reserved words are no problem):
//!
//! | attribute | type | meaning |
//! |---|---|---|
//! | `lock` (see [`key_attribute`](DynamoDbLockerBuilder::key_attribute)) | S, hash key | [`LockName::encoded`](crate::LockName::encoded) |
//! | `owner` | S | `<locker uuid> <hostname>:<pid>`; removed on release |
//! | `rvn` | S | record version number, `<acquisition uuid>:<n>`: new on every write |
//! | `lease_ms` | N | the holder's lease duration in milliseconds (relative, not a time) |
//! | `released` | BOOL | `true` once released |
//! | `token` | N | the fencing counter, +1 on every take |
//!
//! The version is `<uuid>:<n>` rather than a fresh UUID per write so that a
//! heartbeat repeated after its answer was lost finds its own version and is
//! not mistaken for a change by somebody else.
//!
//! **Errors.** A missing table, missing permissions, bad credentials and
//! validation errors are refusals:
//! [`LockError::PermissionDenied`], the
//! message naming the table. Throttling, 5xx answers, timeouts and
//! connection failures are
//! [`LockError::Unavailable`]; the SDK retries
//! them (throttling included) with backoff, within the
//! [request timeout](DynamoDbLockerBuilder::request_timeout). A failed
//! condition is never retried: it is an answer.
//!
//! **IAM permissions** on the table: `dynamodb:GetItem` and
//! `dynamodb:UpdateItem`; for [`DynamoDbLocker::ensure_table`] also
//! `dynamodb:DescribeTable` and `dynamodb:CreateTable`.
//!
//! ```json
//! {
//!   "Effect": "Allow",
//!   "Action": ["dynamodb:GetItem", "dynamodb:UpdateItem", "dynamodb:DescribeTable", "dynamodb:CreateTable"],
//!   "Resource": "arn:aws:dynamodb:<region>:<account>:table/<table>"
//! }
//! ```
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use aws_sdk_dynamodb::config::{BehaviorVersion, Region};
//! use tower_lease_lock::dynamodb::DynamoDbLocker;
//! use tower_lease_lock::{LockName, Locker};
//!
//! // Usually from `aws_config::load_defaults(..)`.
//! let config = aws_sdk_dynamodb::Config::builder()
//!     .behavior_version(BehaviorVersion::latest())
//!     .region(Region::new("eu-west-1"))
//!     .build();
//! let client = aws_sdk_dynamodb::Client::from_conf(config);
//! let locker = DynamoDbLocker::builder(client, "locks").build()?;
//! locker.ensure_table().await?;
//!
//! let name = LockName::new("tenant-42")?;
//! let guard = locker.acquire(&name, Duration::from_secs(5)).await?;
//! println!("holding {} with fencing token {}", guard.name(), guard.token());
//! guard.release().await?;
//! locker.shutdown().await?;
//! # Ok(()) }
//! ```

mod builder;
pub mod fencing;
mod store;
mod table;

pub use builder::{
    max_request_timeout, DynamoDbConfigError, DynamoDbLockerBuilder, DEFAULT_KEY_ATTRIBUTE,
    DEFAULT_LEASE, DEFAULT_REQUEST_TIMEOUT, MAX_LEASE, MIN_LEASE,
};
pub use table::{TableError, ENSURE_TABLE_LIMIT};

use std::fmt;

use crate::store::{LeaseTiming, StoreDiagnostics, StoreLocker};
use crate::{LockError, LockGuard, LockMode, LockName, Locker, Wait};
use store::DynamoDbStore;

/// The backend's name in logs and metrics.
const BACKEND: &str = "dynamodb";

/// The attributes of a lock item besides its key.
const OWNER: &str = "owner";
const RVN: &str = "rvn";
const LEASE_MS: &str = "lease_ms";
const RELEASED: &str = "released";
const TOKEN: &str = "token";

/// A [`Locker`] on a DynamoDB table. Cheap to clone; clones share one
/// heartbeat task and one poller per waited-for name. See the
/// [module docs](self) for the algorithm.
#[derive(Clone)]
pub struct DynamoDbLocker {
    inner: StoreLocker<DynamoDbStore>,
}

impl DynamoDbLocker {
    /// Starts building a locker on `table` with `client` (whose region,
    /// credentials and endpoint are used as they are).
    pub fn builder(
        client: aws_sdk_dynamodb::Client,
        table: impl Into<String>,
    ) -> DynamoDbLockerBuilder {
        DynamoDbLockerBuilder::new(client, table.into())
    }

    /// Creates the table if it does not exist (on-demand billing, a string
    /// hash key named as the [key attribute](DynamoDbLockerBuilder::key_attribute))
    /// and waits until it is active, at most [`ENSURE_TABLE_LIMIT`]. An
    /// existing table is checked for its key. Safe to call from several
    /// processes at once.
    pub async fn ensure_table(&self) -> Result<(), TableError> {
        table::ensure_table(self.inner.store()).await
    }

    /// The table.
    pub fn table(&self) -> &str {
        self.inner.store().table()
    }

    /// What this locker writes in the `owner` attribute.
    pub fn owner(&self) -> &str {
        self.inner.store().owner()
    }

    /// The lease, heartbeat and request timeout in force.
    pub fn timing(&self) -> LeaseTiming {
        self.inner.timing()
    }

    /// What this locker holds and does right now, and how many requests it
    /// sent.
    pub fn diagnostics(&self) -> StoreDiagnostics {
        self.inner.diagnostics()
    }

    /// Refuses new acquisitions, ends waiting ones, releases every lock
    /// still held (their guards are lost) and stops the heartbeat task. See
    /// [`Locker::shutdown`].
    pub async fn shutdown(&self) -> Result<(), LockError> {
        self.inner.shutdown().await
    }
}

impl Locker for DynamoDbLocker {
    async fn lock(
        &self,
        name: &LockName,
        mode: LockMode,
        wait: Wait,
    ) -> Result<LockGuard, LockError> {
        self.inner.lock(name, mode, wait).await
    }

    fn shutdown(&self) -> impl std::future::Future<Output = Result<(), LockError>> + Send {
        self.inner.shutdown()
    }
}

impl fmt::Debug for DynamoDbLocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamoDbLocker")
            .field("table", &self.table())
            .field("owner", &self.owner())
            .field("timing", &self.timing())
            .field("diagnostics", &self.diagnostics())
            .finish_non_exhaustive()
    }
}
