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

/// Like [`with_timeout`], for requests that may be repeated safely: a quick
/// failure (a connection reset while a member fails over, a refused connect to
/// a dead endpoint) is retried with a short backoff until `timeout` runs out.
pub(crate) async fn idempotent<T, F, Fut>(
    timeout: Duration,
    what: &'static str,
    mut request: F,
) -> Result<T, LockError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut backoff = RETRY_BACKOFF;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match with_timeout(left, what, request()).await {
            Err(err @ LockError::Unavailable { .. })
                if tokio::time::Instant::now() + backoff < deadline =>
            {
                tracing::debug!(error = %err, "retrying etcd {what}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
            }
            other => return other,
        }
    }
}

/// The first pause before retrying a failed request.
pub(crate) const RETRY_BACKOFF: Duration = Duration::from_millis(25);
/// The longest pause between retries.
pub(crate) const MAX_RETRY_BACKOFF: Duration = Duration::from_millis(400);

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

/// `true` when a failed write certainly was not applied: etcd refused it for
/// a missing lease, or the connection was never made. Anything else (a
/// timeout, a reset connection) may still be applied later.
pub(crate) fn certainly_not_applied(err: &LockError) -> bool {
    if lock_error_is_lease_not_found(err) {
        return true;
    }
    match err {
        LockError::Unavailable {
            source: Some(source),
            ..
        } => {
            let text = source.to_string();
            text.contains("tcp connect error") || text.contains("Connection refused")
        }
        _ => false,
    }
}
