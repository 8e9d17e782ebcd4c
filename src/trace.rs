//! The tracing span every acquisition runs in, shared by all backends.

use std::time::Duration;

use tracing::field::Empty;
use tracing::Span;

use crate::{metrics, LockError, LockGuard, LockMode, LockName};

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

/// Records how an acquisition ended on the current span, and logs it at
/// DEBUG: the caller gets the error and decides what it is worth (the Tower
/// layer logs one WARN per request that fails for something else than
/// contention).
pub(crate) fn record_outcome(
    backend: &'static str,
    mode: LockMode,
    result: &Result<LockGuard, LockError>,
    waited: Duration,
) {
    let outcome = match result {
        Ok(_) => "acquired",
        Err(err) => err.kind(),
    };
    metrics::acquisition(backend, mode, outcome, waited);
    let span = Span::current();
    let wait_ms = millis(waited);
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
                tracing::debug!(
                    error = err as &(dyn std::error::Error + 'static),
                    wait_ms,
                    "lock acquisition failed"
                );
            }
        }
    }
}

/// A duration in milliseconds for a log field, to the microsecond: `0.3`,
/// not `0.30000000000000004`.
pub(crate) fn millis(duration: Duration) -> f64 {
    // Whole microseconds are exact in an f64 (up to 2^53 µs, 285 years), and
    // one correctly rounded division prints as the shortest decimal.
    let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
    micros as f64 / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing::{Event, Level, Subscriber};
    use tracing_subscriber::layer::{Context, SubscriberExt};
    use tracing_subscriber::Layer;

    #[test]
    fn millis_print_without_float_noise() {
        assert_eq!(millis(Duration::from_micros(300)).to_string(), "0.3");
        assert_eq!(millis(Duration::from_nanos(300_999)).to_string(), "0.3");
        assert_eq!(millis(Duration::from_millis(900)).to_string(), "900");
        assert_eq!(
            millis(Duration::from_micros(1_234_567)).to_string(),
            "1234.567"
        );
        assert_eq!(millis(Duration::ZERO).to_string(), "0");
    }

    /// Collects the level of every event.
    struct Levels(Arc<Mutex<Vec<Level>>>);

    impl<S: Subscriber> Layer<S> for Levels {
        fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
            self.0.lock().unwrap().push(*event.metadata().level());
        }
    }

    /// A failed acquisition is the caller's to report: the backend's span
    /// logs it at DEBUG only, so that the layer's WARN is the only one.
    #[test]
    fn failures_are_logged_at_debug() {
        let levels = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Levels(Arc::clone(&levels)));
        tracing::subscriber::with_default(subscriber, || {
            let err = LockError::unavailable("etcd txn failed", std::io::Error::other("refused"));
            record_outcome(
                "etcd",
                LockMode::Exclusive,
                &Err(err),
                Duration::from_millis(3),
            );
        });
        assert_eq!(*levels.lock().unwrap(), vec![Level::DEBUG]);
    }
}
