//! [`AzureBlobStore`]: the lease calls of Azure Blob Storage, one blob per
//! lock, for the shared [`StoreLocker`](crate::store::StoreLocker).
//!
//! Like etcd's `mutex.go`, each call is a few lines:
//!
//! - **take**: acquire a lease on the lock's blob with a fresh proposed
//!   lease id (a retried acquire with the same id is idempotent); a missing
//!   blob is created first (a page blob, with `If-None-Match: *`); then move
//!   the fencing counter with the lease id ([`fencing`](super::fencing)).
//!   A lease held by someone else is a `409`: busy, one request.
//! - **observe** (a waiting poll): read the blob's properties (a `HEAD`):
//!   its lease state, and its counter to tell a change of hands.
//! - **renew**: renew the lease; a `409` (a broken lease, another lease id)
//!   means it is gone.
//! - **release**: release the lease; not holding it is fine. Lock blobs are
//!   never deleted: that would reset their counter.

use azure_core::http::Etag;
use azure_core::Uuid;
use azure_storage_blob::models::{
    BlobClientAcquireLeaseOptions, BlobClientGetPropertiesResultHeaders, LeaseState,
    PageBlobClientCreateOptions,
};
use azure_storage_blob::{BlobClient, BlobContainerClient};

use super::errors::{is_code, is_status, store_error};
use super::fencing;
use crate::store::{Busy, LeaseStore, Observed, StoreError, Take};
use crate::{Holder, InvalidName, LockName};

/// The longest blob name Azure Storage accepts.
pub const MAX_BLOB_NAME: usize = 1024;

/// The lease calls of one container: what [`AzureBlobLocker`](super::AzureBlobLocker)
/// runs on.
pub struct AzureBlobStore {
    pub(crate) container: BlobContainerClient,
    pub(crate) prefix: String,
    /// 15-60, or -1 for an infinite lease.
    pub(crate) lease_secs: i32,
}

impl std::fmt::Debug for AzureBlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureBlobStore")
            .field("container", &without_secret(self.container.url()))
            .field("prefix", &self.prefix)
            .field("lease_secs", &self.lease_secs)
            .finish()
    }
}

impl AzureBlobStore {
    /// The blob that holds the lock of `name`: the prefix, then the name's
    /// [encoding](LockName::encoded) with a final `.` written `%2E` (Azure
    /// rejects blob names that end with a dot, and `.` or `..` would be
    /// path segments). Injective, like the encoding: the encoding never
    /// contains `%2E`.
    pub fn blob_name(&self, name: &LockName) -> String {
        let mut blob = self.prefix.clone();
        let encoded = name.encoded();
        match encoded.strip_suffix('.') {
            Some(head) => {
                blob.push_str(head);
                blob.push_str("%2E");
            }
            None => blob.push_str(&encoded),
        }
        blob
    }

    fn blob(&self, name: &LockName) -> BlobClient {
        // The client percent-encodes the name for the URL itself.
        self.container.blob_client(&self.blob_name(name))
    }

    fn busy(&self, name: &LockName, token: Option<u64>) -> Busy<u64> {
        Busy {
            seen: token,
            holder: Some(Holder {
                token,
                key: Some(self.blob_name(name)),
                ..Holder::default()
            }),
            stale_after: None, // Azure expires leases itself
        }
    }

    /// Creates the lock blob of `name` as an empty page blob, unless a blob
    /// of that name exists (created meanwhile by anyone: not an error).
    async fn create(&self, blob: &BlobClient) -> Result<(), StoreError> {
        let options = PageBlobClientCreateOptions {
            if_none_match: Some(Etag::from("*")),
            ..Default::default()
        };
        match blob.page_blob_client().create(0, Some(options)).await {
            Ok(_) => Ok(()),
            // BlobAlreadyExists (or another 409 about a blob that exists).
            Err(err) if is_status(&err, 409) => Ok(()),
            Err(err) => Err(store_error("creating the lock blob", err)),
        }
    }
}

/// The service says the lease is not (or no longer) ours: 409 (broken, or
/// another lease id holds it), 404 (the blob is gone), 412 (a condition on
/// a lease that is not ours).
fn not_ours(err: &azure_core::Error) -> bool {
    [409, 404, 412]
        .into_iter()
        .any(|status| is_status(err, status))
}

impl LeaseStore for AzureBlobStore {
    /// The lease id.
    type Hold = String;
    /// The blob's fencing counter.
    type Seen = u64;

    fn backend(&self) -> &'static str {
        "azure"
    }

    fn new_hold(&self) -> String {
        Uuid::new_v4().to_string()
    }

    fn check_name(&self, name: &LockName) -> Result<(), InvalidName> {
        let len = self.blob_name(name).chars().count();
        if len > MAX_BLOB_NAME {
            return Err(InvalidName::TooLongForBackend {
                backend: "azure",
                len,
                max: MAX_BLOB_NAME,
            });
        }
        Ok(())
    }

    async fn observe(&self, name: &LockName) -> Result<Observed<u64>, StoreError> {
        match self.blob(name).get_properties(None).await {
            Ok(properties) => {
                let state = properties
                    .lease_state()
                    .map_err(|e| StoreError::unavailable("unreadable lease state", e))?;
                match state {
                    Some(LeaseState::Leased | LeaseState::Breaking) => Ok(Observed::Held(
                        self.busy(name, fencing::current_token(&properties)),
                    )),
                    _ => Ok(Observed::Free),
                }
            }
            Err(err) if is_status(&err, 404) && !is_code(&err, "ContainerNotFound") => {
                Ok(Observed::Free)
            }
            Err(err) => Err(store_error("reading the lock blob", err)),
        }
    }

    async fn take(
        &self,
        name: &LockName,
        lease_id: &String,
        _stale: Option<&u64>,
    ) -> Result<Take<u64>, StoreError> {
        let blob = self.blob(name);
        let mut created = false;
        loop {
            let options = BlobClientAcquireLeaseOptions {
                proposed_lease_id: Some(lease_id.clone()),
                ..Default::default()
            };
            match blob.acquire_lease(self.lease_secs, Some(options)).await {
                Ok(_) => break,
                Err(err) if is_code(&err, "BlobNotFound") && !created => {
                    self.create(&blob).await?;
                    created = true;
                }
                // LeaseAlreadyPresent, LeaseIsBreakingAndCannotBeAcquired.
                Err(err) if is_status(&err, 409) => {
                    return Ok(Take::Busy(self.busy(name, None)));
                }
                Err(err) => return Err(store_error("acquiring the lease", err)),
            }
        }
        // Held without a token if this fails: the locker gives back every
        // take that ends in an error.
        let token = fencing::next_token(&blob, lease_id).await?;
        Ok(Take::Taken { token })
    }

    async fn renew(&self, name: &LockName, lease_id: &String) -> Result<String, StoreError> {
        match self.blob(name).renew_lease(lease_id.clone(), None).await {
            Ok(_) => Ok(lease_id.clone()),
            Err(err) if not_ours(&err) => {
                let code = super::errors::answer(&err).map(|(_, c)| c.to_owned());
                Err(StoreError::Gone(format!(
                    "the service refused the renewal ({})",
                    code.unwrap_or_default()
                )))
            }
            Err(err) => Err(store_error("renewing the lease", err)),
        }
    }

    async fn release(&self, name: &LockName, lease_id: &String) -> Result<(), StoreError> {
        match self.blob(name).release_lease(lease_id.clone(), None).await {
            Ok(_) => Ok(()),
            // Nothing to give back.
            Err(err) if not_ours(&err) => Ok(()),
            Err(err) => Err(store_error("releasing the lease", err)),
        }
    }
}

/// A container URL as it may be shown: without its query, since a SAS is a
/// secret.
pub(crate) fn without_secret(url: &azure_core::http::Url) -> &str {
    url.as_str().split('?').next().unwrap_or_default()
}
