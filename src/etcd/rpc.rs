//! Every etcd request goes through here: bounded in time, errors mapped.

use std::future::Future;
use std::time::Duration;

use crate::LockError;

/// Runs one etcd request, failing with [`LockError::Unavailable`] when it
/// errors or takes longer than `timeout`.
pub(crate) async fn with_timeout<T>(
    timeout: Duration,
    what: &'static str,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, LockError> {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(LockError::unavailable(
            format!("etcd {what} failed: {err}"),
            err,
        )),
        Err(_) => Err(LockError::Unavailable {
            message: format!("etcd {what} did not answer within {timeout:?}"),
            source: None,
        }),
    }
}

/// `true` when etcd refused a request because its lease no longer exists.
pub(crate) fn is_lease_not_found(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::GRpcStatus(status) => status.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(msg) => msg.contains("lease not found"),
        _ => false,
    }
}

/// The same test on a mapped error.
pub(crate) fn lock_error_is_lease_not_found(err: &LockError) -> bool {
    match err {
        LockError::Unavailable {
            source: Some(source),
            ..
        } => source
            .downcast_ref::<etcd_client::Error>()
            .is_some_and(is_lease_not_found),
        _ => false,
    }
}
