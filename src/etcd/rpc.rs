//! Every etcd request goes through here: bounded in time, errors mapped, and
//! idempotent ones hedged against a stalled member.
//!
//! etcd-client spreads requests over the cluster's members at random (its
//! balancer sees no load), so while one member is stalled (paused, cut off
//! behind a half-open connection) about one request in three hangs there
//! until its timeout. Requests that may be repeated safely are therefore
//! *hedged*: when an attempt has not answered after a short delay, another
//! one is started beside it, and the first answer wins. Writes whose
//! repetition matters (the txn that puts a lock key) are never repeated.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::LockError;

/// Runs one etcd request, failing with [`LockError::Unavailable`] when it
/// errors or takes longer than `timeout` ([`LockError::PermissionDenied`]
/// when etcd refused it for want of permission).
pub(crate) async fn with_timeout<T>(
    timeout: Duration,
    what: &'static str,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, LockError> {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(failed(what, err)),
        Err(_) => Err(timed_out(what, timeout)),
    }
}

fn failed(what: &str, err: etcd_client::Error) -> LockError {
    if is_permission_error(&err) {
        return LockError::PermissionDenied {
            message: format!("etcd refused the {what}: {}", short(&err)),
            source: Some(err.into()),
        };
    }
    LockError::unavailable(format!("etcd {what} failed: {}", short(&err)), err)
}

/// `true` when etcd refused a request for want of permission: the user's
/// roles grant no access to a key (`PermissionDenied`), the auth token is
/// invalid or expired (`Unauthenticated`; the Lock and Election services
/// report it as `Unknown`), or auth is on and the client has no user.
/// Only the service's configuration can fix these: never retried, and
/// certainly not applied (etcd checks permissions before it applies).
pub(crate) fn is_permission_error(err: &etcd_client::Error) -> bool {
    use tonic::Code;
    let etcd_client::Error::GRpcStatus(status) = err else {
        return false;
    };
    match status.code() {
        Code::PermissionDenied | Code::Unauthenticated => true,
        Code::InvalidArgument | Code::Unknown => {
            let message = status.message();
            message.contains("invalid auth token") || message.contains("user name is empty")
        }
        _ => false,
    }
}

fn timed_out(what: &str, timeout: Duration) -> LockError {
    LockError::Unavailable {
        message: format!("etcd {what} did not answer within {timeout:?}"),
        source: None,
    }
}

/// The gist of an etcd error, without the transport's nested causes (those
/// stay reachable through the error's source).
fn short(err: &etcd_client::Error) -> String {
    match err {
        etcd_client::Error::GRpcStatus(status) => {
            format!("{:?}: {}", status.code(), status.message())
        }
        other => other.to_string(),
    }
}

/// How to repeat an idempotent request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hedge {
    /// The bound on the whole call, every attempt included.
    pub(crate) budget: Duration,
    /// Start another attempt beside the running ones when none answered for
    /// this long.
    pub(crate) after: Duration,
    /// Run the first attempt in the caller's task until the hedge delay
    /// (no task, no channel: the usual case); it moves into a task of its
    /// own only when a sibling is started. Off when a late success must
    /// reach `late` even if the caller is dropped meanwhile.
    pub(crate) inline_first: bool,
}

impl Hedge {
    /// The usual hedge for a locker with this request timeout: a quarter of
    /// it, between 50 ms and 1 s (an answer from a live member takes
    /// milliseconds; a hedge costs one more request).
    pub(crate) fn for_timeout(request_timeout: Duration) -> Self {
        Self {
            budget: request_timeout,
            after: (request_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)),
            inline_first: true,
        }
    }

    /// Every attempt in a task of its own, so that a success arriving after
    /// the caller was dropped still reaches `late`.
    pub(crate) fn every_attempt_in_a_task(self) -> Self {
        Self {
            inline_first: false,
            ..self
        }
    }

    /// The same hedge within another budget.
    pub(crate) fn within(self, budget: Duration) -> Self {
        Self { budget, ..self }
    }

    /// The same budget, hedging after `after` instead.
    pub(crate) fn after(self, after: Duration) -> Self {
        Self { after, ..self }
    }
}

/// The first pause before retrying a failed request.
pub(crate) const RETRY_BACKOFF: Duration = Duration::from_millis(25);
/// The longest pause between retries.
pub(crate) const MAX_RETRY_BACKOFF: Duration = Duration::from_millis(400);

/// Runs a request that may be repeated safely, within `hedge.budget`.
///
/// An attempt that has not answered after `hedge.after` gets a sibling; an
/// attempt that fails quickly (a reset connection while a member fails over)
/// is followed by another after a short backoff; an error that repeating
/// cannot fix (permission denied, lease not found) is returned at once. The
/// first success wins. Attempts run in tasks of their own, so dropping the
/// caller does not cut them off mid-request: a success that arrives after the
/// call returned (or was dropped) is handed to `late` (to revoke an extra
/// lease, say) instead of being lost.
///
/// Returns the value and how many attempts were started.
pub(crate) async fn hedged<T, E, F, Fut, L>(
    hedge: Hedge,
    what: &'static str,
    mut attempt: F,
    late: L,
) -> Result<(T, usize), LockError>
where
    T: Send + 'static,
    E: AttemptError,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
    L: Fn(T) + Send + Sync + 'static,
{
    let deadline = Instant::now() + hedge.budget;
    let late = Arc::new(late);
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<T, E>>();
    let mut started = 0;
    let mut running = 0;
    let mut backoff = RETRY_BACKOFF;
    let mut next_start = Some(Instant::now());
    let mut last_error = None;
    // Moves a (possibly half-run) attempt into a task that reports to `rx`.
    let run_in_task = |request: std::pin::Pin<Box<Fut>>,
                       late: Arc<L>,
                       tx: mpsc::UnboundedSender<Result<T, E>>| {
        tokio::spawn(async move {
            let result = match tokio::time::timeout_at(deadline, request).await {
                Ok(result) => result,
                Err(_) => return, // the caller reports the timeout
            };
            if let Err(mpsc::error::SendError(Ok(value))) = tx.send(result) {
                late(value);
            }
        });
    };
    if hedge.inline_first {
        let mut first = Box::pin(attempt());
        started = 1;
        let hedge_at = (Instant::now() + hedge.after).min(deadline);
        match tokio::time::timeout_at(hedge_at, &mut first).await {
            Ok(Ok(value)) => return Ok((value, started)),
            Ok(Err(err)) if !err.retryable() => return Err(err.into_lock_error(what)),
            Ok(Err(err)) => {
                tracing::debug!(error = %err.brief(), "etcd {what} failed; retrying");
                last_error = Some(err);
                next_start = Some(Instant::now() + backoff).filter(|at| *at < deadline);
                backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
            }
            Err(_) => {
                // Slow: it goes on in a task, and a sibling starts now.
                running = 1;
                run_in_task(first, Arc::clone(&late), tx.clone());
            }
        }
    }
    loop {
        if next_start.is_some_and(|at| at <= Instant::now()) {
            let request = Box::pin(attempt());
            started += 1;
            running += 1;
            run_in_task(request, Arc::clone(&late), tx.clone());
            next_start = Some(Instant::now() + hedge.after).filter(|at| *at < deadline);
        }
        let wake = next_start.map_or(deadline, |at| at.min(deadline));
        tokio::select! {
            answer = rx.recv() => match answer {
                Some(Ok(value)) => return Ok((value, started)),
                Some(Err(err)) => {
                    running -= 1;
                    if !err.retryable() {
                        return Err(err.into_lock_error(what));
                    }
                    tracing::debug!(error = %err.brief(), "etcd {what} failed; retrying");
                    last_error = Some(err);
                    if running == 0 {
                        // Nothing in flight: the next attempt after a backoff,
                        // not after a full hedge delay.
                        let at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
                        next_start = Some(at).filter(|at| *at < deadline);
                    }
                }
                None => {} // unreachable: `tx` is held here
            },
            () = tokio::time::sleep_until(wake) => {}
        }
        if Instant::now() >= deadline || (next_start.is_none() && running == 0) {
            return Err(match last_error {
                Some(err) if running == 0 => err.into_lock_error(what),
                _ => timed_out(what, hedge.budget),
            });
        }
    }
}

/// The error of one attempt of a [`hedged`] request: raw from etcd-client,
/// or already mapped.
pub(crate) trait AttemptError: Send + 'static {
    /// `false` when repeating the request cannot fix it.
    fn retryable(&self) -> bool;
    /// The error the call reports.
    fn into_lock_error(self, what: &str) -> LockError;
    /// A short text for the debug log.
    fn brief(&self) -> String;
}

impl AttemptError for etcd_client::Error {
    fn retryable(&self) -> bool {
        is_retryable(self)
    }
    fn into_lock_error(self, what: &str) -> LockError {
        failed(what, self)
    }
    fn brief(&self) -> String {
        short(self)
    }
}

impl AttemptError for LockError {
    fn retryable(&self) -> bool {
        !matches!(self, LockError::PermissionDenied { .. }) && !lock_error_is_permanent(self)
    }
    fn into_lock_error(self, _what: &str) -> LockError {
        self
    }
    fn brief(&self) -> String {
        self.summary()
    }
}

/// `false` for errors that repeating the request cannot fix.
pub(crate) fn is_retryable(err: &etcd_client::Error) -> bool {
    use tonic::Code;
    match err {
        etcd_client::Error::GRpcStatus(status) => {
            !matches!(
                status.code(),
                Code::PermissionDenied
                    | Code::Unauthenticated
                    | Code::InvalidArgument
                    | Code::NotFound
                    | Code::FailedPrecondition
                    | Code::OutOfRange
                    | Code::Unimplemented
                    | Code::AlreadyExists
            ) && !is_lease_not_found(err)
                && !is_permission_error(err)
        }
        etcd_client::Error::InvalidArgs(_)
        | etcd_client::Error::InvalidUri(_)
        | etcd_client::Error::InvalidMetadataValue(_) => false,
        etcd_client::Error::LeaseKeepAliveError(msg) => !msg.contains("lease not found"),
        _ => true,
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

/// The etcd error under a mapped error, if any.
fn source_of(err: &LockError) -> Option<&etcd_client::Error> {
    match err {
        LockError::Unavailable {
            source: Some(source),
            ..
        }
        | LockError::PermissionDenied {
            source: Some(source),
            ..
        } => source.downcast_ref::<etcd_client::Error>(),
        _ => None,
    }
}

/// etcd's answer under a mapped error, when etcd answered with an error.
pub(crate) fn status_of(err: &LockError) -> Option<&tonic::Status> {
    match source_of(err)? {
        etcd_client::Error::GRpcStatus(status) => Some(status),
        _ => None,
    }
}

/// The same error again, for each of the writes that shared one request:
/// its kind, its message and, when etcd answered, etcd's status as source.
pub(crate) fn copy_error(err: &LockError) -> LockError {
    let source = status_of(err).map(|status| etcd_client::Error::GRpcStatus(status.clone()).into());
    match err {
        LockError::PermissionDenied { message, .. } => LockError::PermissionDenied {
            message: message.clone(),
            source,
        },
        LockError::Unavailable { message, .. } => LockError::Unavailable {
            message: message.clone(),
            source,
        },
        other => LockError::Unavailable {
            message: other.to_string(),
            source,
        },
    }
}

/// The same test on a mapped error.
pub(crate) fn lock_error_is_lease_not_found(err: &LockError) -> bool {
    source_of(err).is_some_and(is_lease_not_found)
}

/// `true` when a mapped error is one that repeating cannot fix.
pub(crate) fn lock_error_is_permanent(err: &LockError) -> bool {
    source_of(err).is_some_and(|e| !is_retryable(e))
}

/// `true` when a failed write certainly was not applied: etcd refused it (a
/// missing lease, a permission), or the connection was never made. Anything
/// else (a timeout, a reset connection) may still be applied later.
pub(crate) fn certainly_not_applied(err: &LockError) -> bool {
    let Some(source) = source_of(err) else {
        return false;
    };
    if is_permission_error(source) {
        return true;
    }
    if let etcd_client::Error::GRpcStatus(status) = source {
        use tonic::Code;
        if matches!(
            status.code(),
            Code::PermissionDenied
                | Code::Unauthenticated
                | Code::InvalidArgument
                | Code::FailedPrecondition
                | Code::NotFound
        ) || is_lease_not_found(source)
        {
            return true;
        }
    }
    let text = source.to_string();
    text.contains("tcp connect error") || text.contains("Connection refused")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    fn status(code: Code, message: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(Status::new(code, message))
    }

    #[test]
    fn auth_refusals_are_permission_errors_never_retried_nor_applied() {
        // As etcd 3.4 words them: a role without the grant, an expired token
        // (and the Lock service's flattened form of it), no user.
        for err in [
            status(Code::PermissionDenied, "etcdserver: permission denied"),
            status(Code::Unauthenticated, "etcdserver: invalid auth token"),
            status(Code::Unknown, "etcdserver: invalid auth token"),
            status(Code::InvalidArgument, "etcdserver: user name is empty"),
        ] {
            assert!(is_permission_error(&err), "{err}");
            assert!(!is_retryable(&err), "{err}");
            let mapped = failed("txn", err);
            assert!(
                matches!(mapped, LockError::PermissionDenied { .. }),
                "{mapped:?}"
            );
            assert_eq!(mapped.kind(), "permission_denied");
            assert!(lock_error_is_permanent(&mapped));
            assert!(certainly_not_applied(&mapped));
        }
        let mapped = failed(
            "txn",
            status(Code::PermissionDenied, "etcdserver: permission denied"),
        );
        assert_eq!(
            mapped.to_string(),
            "lock backend permission denied: etcd refused the txn: \
             PermissionDenied: etcdserver: permission denied"
        );
    }

    #[test]
    fn other_failures_stay_unavailable() {
        for (err, retryable) in [
            (status(Code::Unavailable, "transport error"), true),
            (status(Code::Unknown, "etcdserver: request timed out"), true),
            (
                status(Code::NotFound, "etcdserver: requested lease not found"),
                false,
            ),
            (
                status(
                    Code::InvalidArgument,
                    "etcdserver: too many operations in txn request",
                ),
                false,
            ),
        ] {
            assert!(!is_permission_error(&err), "{err}");
            assert_eq!(is_retryable(&err), retryable, "{err}");
            let mapped = failed("txn", err);
            assert!(
                matches!(mapped, LockError::Unavailable { .. }),
                "{mapped:?}"
            );
        }
    }
}
