//! Locks on stores without watches: a lease per lock, renewed in the
//! background, and waiting by polling (feature-independent core of the
//! Azure blob lease and DynamoDB backends).
//!
//! A store such as Azure Blob Storage or DynamoDB offers one primitive: take
//! a name if it is free (or its holder's lease ran out), renew what you
//! took, give it back. There is no watch to learn of a release, and every
//! lock has a lease of its own. A [`LeaseStore`] implements those three
//! calls for one service; [`StoreLocker`] turns it into a [`Locker`](crate::Locker)
//! with everything else written once:
//!
//! - **Renewal** by one task per locker (not one per lock): each hold is
//!   renewed every cadence, and trusted only until a local deadline timed
//!   from when its last renewal was *sent*, minus a margin (`renewal.rs`).
//!   A renewal the store refuses, or a deadline that passes, fires the
//!   guard's [`lost()`](crate::LockGuard::lost).
//! - **Waiting** by polling, better than a blind random sleep (`waiting.rs`):
//!   one poller per name per locker, with the locker's waiters in FIFO order
//!   behind it (N requests in one process send one request per poll, not N),
//!   a jittered backoff within a configurable range that starts over when the
//!   name changes hands, and a hand-over to the next local waiter as soon as
//!   a local holder releases.
//! - **Takeover without clocks**: a store whose records do not expire by
//!   themselves (DynamoDB) reports what it saw of the holder; when that stays
//!   the same for a whole lease on this process's monotonic clock, the next
//!   take is conditioned on it (the algorithm of AWS's own lock client).
//! - Release on drop and on [`shutdown`](crate::Locker::shutdown); timeouts
//!   and cancellation leave nothing behind: a take whose outcome is unknown
//!   is given back in the background.
//!
//! Stores hold exclusive locks only: [`LockMode::Shared`](crate::LockMode)
//! and permits are refused with [`LockError::UnsupportedMode`](crate::LockError::UnsupportedMode).

mod backoff;
mod config;
mod locker;
mod renewal;
mod waiting;

use std::fmt;
use std::future::Future;
use std::time::Duration;

#[cfg(feature = "dynamodb")]
pub(crate) use config::safety_margin;
pub use config::{BusyWait, LeaseTiming, StoreConfigError};
pub use locker::{StoreDiagnostics, StoreLocker};

use crate::{BoxError, Holder, InvalidName, LockName};

/// A store of per-lock leases: what a backend implements.
///
/// Every call is bounded by the locker's request timeout (the future is
/// dropped when it runs out), so an implementation must be cancel-safe and
/// should bound its own retries by that timeout too.
pub trait LeaseStore: Send + Sync + 'static {
    /// What identifies one hold in the store (an Azure lease id, a DynamoDB
    /// record version). A fresh one is made for each acquisition, before the
    /// first request, so that a take can be retried or given back whatever
    /// its outcome.
    type Hold: Clone + fmt::Debug + Send + Sync + 'static;
    /// What a failed take saw of the current holder, compared between
    /// polls: a change means the name changed hands.
    type Seen: Clone + fmt::Debug + PartialEq + Send + Sync + 'static;

    /// The backend's name in logs and metrics (`azure`, `dynamodb`).
    fn backend(&self) -> &'static str;

    /// A fresh hold identity for one acquisition.
    fn new_hold(&self) -> Self::Hold;

    /// Refuses a name this store cannot hold (too long for its keys, say),
    /// before any request. The default accepts every [`LockName`].
    fn check_name(&self, name: &LockName) -> Result<(), InvalidName> {
        let _ = name;
        Ok(())
    }

    /// Takes `name` with `hold` if it is free: one request (a try costs
    /// exactly that). When it returns an error (or times out), the locker
    /// gives `hold` back with [`release`](Self::release), so a take that
    /// fails halfway need not clean up itself. `stale`: the holder seen
    /// before, unchanged for a whole lease on this process's clock; a store
    /// that does not expire leases itself takes over from it (conditioned
    /// on it being still the same).
    fn take(
        &self,
        name: &LockName,
        hold: &Self::Hold,
        stale: Option<&Self::Seen>,
    ) -> impl Future<Output = Result<Take<Self::Seen>, StoreError>> + Send;

    /// Looks at `name` without taking it: what a waiting poll sends first,
    /// so that a busy name costs one read per poll and a free one a read
    /// and a take. A store without a cheap read returns [`Observed::Free`]
    /// (every poll is then a take).
    fn observe(
        &self,
        name: &LockName,
    ) -> impl Future<Output = Result<Observed<Self::Seen>, StoreError>> + Send;

    /// Renews `hold`, returning the hold to use from now on (the same, or a
    /// new record version). [`StoreError::Gone`] when the store says the
    /// hold is no longer ours. Must be repeatable: a renewal that timed out
    /// (its outcome unknown) is retried with the same `hold`, so a store
    /// that writes a new version must accept the retry when the first
    /// attempt landed.
    fn renew(
        &self,
        name: &LockName,
        hold: &Self::Hold,
    ) -> impl Future<Output = Result<Self::Hold, StoreError>> + Send;

    /// Gives `hold` back. Succeeds when it was not (or no longer) held:
    /// releasing after an uncertain take must be harmless.
    fn release(
        &self,
        name: &LockName,
        hold: &Self::Hold,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// What one take did.
#[derive(Debug, Clone)]
pub enum Take<S> {
    /// Taken: ours, with this fencing token (strictly greater than every
    /// earlier holder's).
    Taken {
        /// The fencing token.
        token: u64,
    },
    /// Held by someone else.
    Busy(Busy<S>),
}

/// What a poll saw of a name without taking it ([`LeaseStore::observe`]).
#[derive(Debug, Clone)]
pub enum Observed<S> {
    /// Nobody holds it, its lease ran out, or the store cannot tell without
    /// trying: take it.
    Free,
    /// Held by someone: no take is sent.
    Held(Busy<S>),
}

/// What is known of the holder of a busy name.
#[derive(Debug, Clone)]
pub struct Busy<S> {
    /// What was seen of the holder, to tell a change of hands (which starts
    /// the backoff over); `None` when the store cannot tell.
    pub seen: Option<S>,
    /// What is known of the holder, for [`LockError::Locked`](crate::LockError::Locked).
    pub holder: Option<Holder>,
    /// For stores without expiry: the holder may be taken over once `seen`
    /// stayed the same this long (its lease) on this process's clock; `None`
    /// when the store expires leases itself.
    pub stale_after: Option<Duration>,
}

impl<S> Busy<S> {
    /// A busy name of which nothing more is known.
    pub fn unknown() -> Self {
        Self {
            seen: None,
            holder: None,
            stale_after: None,
        }
    }
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The hold is no longer ours (the lease was broken, expired and taken,
    /// or the record changed): for [`LeaseStore::renew`].
    #[error("the lock is no longer held: {0}")]
    Gone(String),
    /// The store did not answer in time, was unreachable, throttled us or
    /// failed: repeating may help.
    #[error("{message}")]
    Unavailable {
        /// What failed.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// The store refused for good: no permission, or a resource is missing
    /// (a table, a container). Repeating cannot help.
    #[error("{0}")]
    Refused(String),
}

impl StoreError {
    /// A [`StoreError::Unavailable`] with a message and a source.
    pub fn unavailable(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Unavailable {
            message: message.into(),
            source: Some(source.into()),
        }
    }
}
