//! Fencing tokens of Azure blob locks: a counter on the lock blob that only
//! the lease holder can move, read back in the same call.
//!
//! - On a **page blob** (the blobs this crate creates) the token is the
//!   blob's sequence number, incremented with the lease id
//!   (`x-ms-sequence-number-action: increment`): one atomic round trip that
//!   returns the new number.
//! - On a **block blob** (created by another client, such as .NET's
//!   DistributedLock.Azure) the sequence number does not exist; the token is
//!   then a counter in the blob's metadata ([`TOKEN_METADATA`]), read and
//!   written with the lease id and `If-Match` (two round trips).
//!
//! Either counter only grows while every client follows the convention, and
//! only while the blob lives: lock blobs are never deleted by this crate.

use azure_core::http::Etag;
use azure_storage_blob::models::{
    BlobClientGetPropertiesOptions, BlobClientGetPropertiesResultHeaders,
    BlobClientSetMetadataOptions, BlobType, PageBlobClientSetSequenceNumberOptions,
    PageBlobClientSetSequenceNumberResultHeaders, SequenceNumberActionType,
};
use azure_storage_blob::BlobClient;

use super::errors::{is_code, is_status, store_error};
use crate::store::StoreError;

/// The metadata key of the counter on block blobs.
pub const TOKEN_METADATA: &str = "tll_fencing_token";

/// How often a metadata write that lost an `If-Match` race is repeated.
const METADATA_ATTEMPTS: usize = 3;

/// Moves the counter of the blob `lease_id` holds and returns its new value.
pub(crate) async fn next_token(blob: &BlobClient, lease_id: &str) -> Result<u64, StoreError> {
    let options = PageBlobClientSetSequenceNumberOptions {
        lease_id: Some(lease_id.to_owned()),
        ..Default::default()
    };
    match blob
        .page_blob_client()
        .set_sequence_number(SequenceNumberActionType::Increment, Some(options))
        .await
    {
        Ok(answer) => match answer.blob_sequence_number() {
            Ok(Some(number)) => u64::try_from(number).map_err(|_| {
                StoreError::Refused(format!("the blob's sequence number {number} is negative"))
            }),
            Ok(None) => Err(StoreError::Unavailable {
                message: "the sequence number increment answered without the number".into(),
                source: None,
            }),
            Err(err) => Err(StoreError::unavailable(
                "the sequence number increment answered an unreadable number",
                err,
            )),
        },
        // Not a page blob (Azurite: 400 InvalidOperation; Azure: InvalidBlobType).
        Err(err)
            if (is_status(&err, 400) || is_status(&err, 409))
                && (is_code(&err, "InvalidOperation") || is_code(&err, "InvalidBlobType")) =>
        {
            metadata_counter(blob, lease_id).await
        }
        Err(err) => Err(store_error("incrementing the sequence number", err)),
    }
}

/// The counter in metadata, for blobs that are not page blobs.
async fn metadata_counter(blob: &BlobClient, lease_id: &str) -> Result<u64, StoreError> {
    for _ in 0..METADATA_ATTEMPTS {
        let options = BlobClientGetPropertiesOptions {
            lease_id: Some(lease_id.to_owned()),
            ..Default::default()
        };
        let properties = blob
            .get_properties(Some(options))
            .await
            .map_err(|e| store_error("reading the blob's metadata", e))?;
        let mut metadata = properties
            .metadata()
            .map_err(|e| StoreError::unavailable("unreadable blob metadata", e))?;
        let etag: Option<Etag> = properties
            .etag()
            .map_err(|e| StoreError::unavailable("unreadable blob ETag", e))?;
        let next = metadata_token(&metadata).saturating_add(1);
        metadata.insert(TOKEN_METADATA.to_owned(), next.to_string());
        let options = BlobClientSetMetadataOptions {
            lease_id: Some(lease_id.to_owned()),
            if_match: etag,
            ..Default::default()
        };
        match blob.set_metadata(&metadata, Some(options)).await {
            Ok(_) => return Ok(next),
            // Written meanwhile (by a client that does not lease first):
            // read again.
            Err(err) if is_code(&err, "ConditionNotMet") => continue,
            Err(err) => return Err(store_error("writing the fencing counter", err)),
        }
    }
    Err(StoreError::Unavailable {
        message: format!(
            "the blob's metadata kept changing: {METADATA_ATTEMPTS} writes of the fencing counter lost their If-Match"
        ),
        source: None,
    })
}

/// The counter stored in a block blob's metadata (0 when none).
pub(crate) fn metadata_token(metadata: &std::collections::HashMap<String, String>) -> u64 {
    metadata
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(TOKEN_METADATA))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}

/// The current token of a blob from its properties: the sequence number of
/// a page blob, the metadata counter of any other.
pub(crate) fn current_token(properties: &impl BlobClientGetPropertiesResultHeaders) -> Option<u64> {
    match properties.blob_type().ok().flatten() {
        Some(BlobType::PageBlob) => properties
            .blob_sequence_number()
            .ok()
            .flatten()
            .and_then(|n| u64::try_from(n).ok()),
        _ => properties.metadata().ok().map(|m| metadata_token(&m)),
    }
}
