//! The tracing span every acquisition runs in, shared by all backends.

use std::time::Duration;

use tracing::field::Empty;
use tracing::Span;

use crate::{LockError, LockGuard, LockMode, LockName};

/// A span named `lock.acquire` carrying `lock.name`, `lock.mode`, and, once
/// known, `lock.token`, `lock.wait_ms` and `lock.outcome`.
pub(crate) fn acquire_span(backend: &'static str, name: &LockName, mode: LockMode) -> Span {
    tracing::debug_span!(
        "lock.acquire",
        lock.backend = backend,
        lock.name = %name,
        lock.mode = %mode,
        lock.token = Empty,
        lock.wait_ms = Empty,
        lock.outcome = Empty,
    )
}

/// Records how an acquisition ended on the current span, and logs it.
pub(crate) fn record_outcome(result: &Result<LockGuard, LockError>, waited: Duration) {
    let span = Span::current();
    let wait_ms = waited.as_secs_f64() * 1e3;
    span.record("lock.wait_ms", wait_ms);
    match result {
        Ok(guard) => {
            span.record("lock.token", guard.token());
            span.record("lock.outcome", "acquired");
            tracing::debug!(lock.token = guard.token(), wait_ms, "lock acquired");
        }
        Err(err) => {
            span.record("lock.outcome", err.kind());
            if err.is_contended() {
                tracing::debug!(error = %err, wait_ms, "lock contended");
            } else {
                tracing::warn!(error = %err, wait_ms, "lock acquisition failed");
            }
        }
    }
}
