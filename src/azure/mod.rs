//! Locks on Azure blob leases (feature `azure`): the primitive of .NET's
//! DistributedLock.Azure, with fencing tokens, a lost signal and polling
//! without a stampede.
//!
//! Each lock name is a blob in a container you provide; holding the lock
//! is holding a lease on that blob. Leases last 15 to 60 s (or forever) and
//! are renewed in the background by one task per locker; waiting polls,
//! since blob storage has no watches. What it guarantees, and on what:
//!
//! | | |
//! |---|---|
//! | Exclusion | the service's lease: one lease id per blob at a time |
//! | Fencing token | the page blob's sequence number, incremented with the lease id on each acquisition ([`fencing`]); strictly increasing across holders |
//! | Loss detection | a renewal the service refuses (broken lease, another holder), and a local deadline: the lease's duration minus a margin, timed from when the last successful renewal was *sent* (an expired lease nobody took can still be renewed, so success alone proves nothing) |
//! | A crashed holder | the name is free when its lease expires (at most the lease duration); never with [`infinite_lease`](AzureBlobLockerBuilder::infinite_lease) until broken |
//! | Waiting | one poller per name per locker, reading the blob's lease state (a `HEAD`) and acquiring only when it is free; a jittered pause of 250 ms-1 s that starts over when the name changes hands; this locker's waiters in FIFO order behind it |
//! | Modes | exclusive only: shared locks and permits are refused with [`LockError::UnsupportedMode`] |
//!
//! # Blobs
//!
//! The lock of a name is the blob [`AzureBlobLocker::blob_name`]: the
//! optional [prefix](AzureBlobLockerBuilder::blob_prefix), then the name
//! with every byte other than `A-Z a-z 0-9 . _ ~ -` percent-escaped (as
//! [`LockName::encoded`](crate::LockName::encoded)) and a final `.` written
//! `%2E`. `tenant-42` is the blob `tenant-42`, `a/b` is `a%2Fb`. A blob is
//! created on first use as an empty page blob (`If-None-Match: *`, so a
//! concurrent create is no error) and never deleted: it carries the
//! fencing counter.
//!
//! **With DistributedLock.Azure**: a lock it holds on the same blob excludes
//! ours and ours excludes it (the same lease). Give it the blob name above.
//! On a block blob it created, our token is a counter in the blob's metadata
//! ([`fencing::TOKEN_METADATA`]); DistributedLock.Azure deletes blobs it
//! created when it releases them, which starts that counter over: share
//! names with it only where the blobs exist beforehand, or do not rely on
//! tokens across the two.
//!
//! # Permissions
//!
//! The credential (an Entra ID token credential, or a SAS in the container
//! URL) needs, on the container: read (blob properties), write (leases,
//! sequence numbers, metadata) and create (lock blobs). With Entra ID the
//! role *Storage Blob Data Contributor* on the container covers it.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use azure_storage_blob::BlobContainerClient;
//! use tower_lease_lock::azure::AzureBlobLocker;
//! use tower_lease_lock::{Key, LockLayer};
//!
//! // A container URL with a SAS; in production, pass a token credential.
//! let url = "https://myaccount.blob.core.windows.net/locks?sv=...&sig=...".parse()?;
//! let container = BlobContainerClient::new(url, None, None)?;
//! let locker = AzureBlobLocker::builder(container)
//!     .lease_duration(Duration::from_secs(15))
//!     .build()?;
//! let layer = LockLayer::new(locker, Key::path());
//! # let _ = layer; Ok(()) }
//! ```

mod builder;
mod errors;
pub mod fencing;
mod store;

use std::future::Future;

use azure_storage_blob::BlobContainerClient;

pub use builder::{
    AzureBlobLockerBuilder, AzureConfigError, DEFAULT_INFINITE_CHECK, DEFAULT_LEASE,
    DEFAULT_REQUEST_TIMEOUT, MAX_PREFIX,
};
pub use store::{AzureBlobStore, MAX_BLOB_NAME};

use crate::store::{LeaseStore, LeaseTiming, StoreDiagnostics, StoreLocker};
use crate::{InvalidName, LockError, LockGuard, LockMode, LockName, Locker, Wait};

/// A [`Locker`] on Azure blob leases; see the [module docs](self). Cheap to
/// clone; clones share their leases, renewal task and pollers.
#[derive(Debug, Clone)]
pub struct AzureBlobLocker {
    inner: StoreLocker<AzureBlobStore>,
}

impl AzureBlobLocker {
    /// A builder for a locker on `container` (which must exist).
    pub fn builder(container: BlobContainerClient) -> AzureBlobLockerBuilder {
        AzureBlobLockerBuilder::new(container)
    }

    /// The blob that holds the lock of `name` (see [Blobs](self#blobs)), or
    /// why `name` cannot have one (longer than [`MAX_BLOB_NAME`]).
    pub fn blob_name(&self, name: &LockName) -> Result<String, InvalidName> {
        let store = self.inner.store();
        store.check_name(name)?;
        Ok(store.blob_name(name))
    }

    /// The lease timing in force (`duration: None` for infinite leases).
    pub fn timing(&self) -> LeaseTiming {
        self.inner.timing()
    }

    /// What this locker holds and does right now.
    pub fn diagnostics(&self) -> StoreDiagnostics {
        self.inner.diagnostics()
    }

    /// Refuses new acquisitions, ends waiting ones, releases every lease
    /// still held (their guards report loss) and stops the renewal task.
    pub async fn shutdown(&self) -> Result<(), LockError> {
        self.inner.shutdown().await
    }

    /// The generic locker this one is made of.
    pub fn store_locker(&self) -> &StoreLocker<AzureBlobStore> {
        &self.inner
    }
}

impl Locker for AzureBlobLocker {
    fn lock(
        &self,
        name: &LockName,
        mode: LockMode,
        wait: Wait,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        self.inner.lock(name, mode, wait)
    }

    fn shutdown(&self) -> impl Future<Output = Result<(), LockError>> + Send {
        self.inner.shutdown()
    }
}
