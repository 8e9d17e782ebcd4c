//! [`LockResponder`]: how a route answers when it cannot run its handler
//! under the lock (format, `Retry-After`, custom handler), shared by the
//! layer and by handlers that report a [`LockError`](crate::LockError).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::Response;

use super::{LockRejection, RejectionBody};

/// The format of the layer's own answers (400, 423, 500, 503).
///
/// # Problem types
///
/// With [`RejectionFormat::ProblemDetails`] every answer is an
/// `application/problem+json` document (RFC 9457) with `type`, `title`,
/// `status` and `detail`, plus the extension members `lock` (the lock name,
/// when known) and `retry_after` (whole seconds, the `Retry-After` header's
/// value, on 423 and 503):
///
/// ```json
/// {"type":"https://docs.rs/tower-lease-lock/latest/tower_lease_lock/layer/enum.RejectionFormat.html#lock-held",
///  "title":"Lock held","status":423,
///  "detail":"lock \"tenant:acme\" is held by another request; retry later",
///  "lock":"tenant:acme","retry_after":1}
/// ```
///
/// Each `type` is this page's address with one of these anchors:
///
/// | anchor | status | title | when |
/// |---|---|---|---|
/// | <span id="invalid-lock-key"></span>`invalid-lock-key` | 400 | Invalid lock key | the request's key is missing or not a valid lock name |
/// | <span id="lock-key-unavailable"></span>`lock-key-unavailable` | 500 | Lock key unavailable | the key cannot be derived on this route (a server misconfiguration) |
/// | <span id="lock-held"></span>`lock-held` | 423 | Lock held | the name is held by another request (try mode) |
/// | <span id="lock-wait-timeout"></span>`lock-wait-timeout` | 423 | Lock wait timed out | the name stayed held for the whole wait |
/// | <span id="lock-service-unavailable"></span>`lock-service-unavailable` | 503 | Lock service unavailable | the lock backend did not answer in time, or failed |
/// | <span id="lock-lost"></span>`lock-lost` | 503 | Lock lost | the lock was lost before the handler answered |
/// | <span id="lock-misconfigured"></span>`lock-misconfigured` | 500 | Lock misconfigured | the name is used with incompatible modes |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RejectionFormat {
    /// `text/plain; charset=utf-8`: one line naming the lock and what
    /// happened (the default).
    #[default]
    PlainText,
    /// `application/problem+json` (RFC 9457); see [the problem
    /// types](RejectionFormat#problem-types).
    ProblemDetails,
}

pub(crate) type RejectionHandler = dyn Fn(&LockRejection) -> Response<RejectionBody> + Send + Sync;

/// How a route answers when it cannot run its handler under the lock: the
/// [`RejectionFormat`], the `Retry-After` of 423 and 503, and the
/// [`rejection_handler`](super::LockLayer::rejection_handler), if any.
///
/// [`LockLayer`](super::LockLayer) puts its responder in the extensions of
/// every request it passes to the inner service, so that a handler reporting
/// a [`LockError`](crate::LockError) of its own (a failed
/// `txn_if_held`, a second lock it takes) answers exactly as the layer
/// would:
///
/// ```
/// use axum::{routing::post, Router};
/// use tower_lease_lock::{axum::HeldLock, layer::{Key, LockLayer, LockRejection, LockResponder}};
/// use tower_lease_lock::{LockError, LockName, Locker, MemoryLocker};
///
/// async fn transfer(
///     lock: HeldLock,
///     responder: LockResponder,
///     axum::extract::State(locker): axum::extract::State<MemoryLocker>,
/// ) -> Result<String, LockRejection> {
///     // A second lock, taken by the handler: its failure answers like the layer's.
///     let other = LockName::new("tenant:beta").map_err(|e| responder.reject(e))?;
///     let guard = locker.try_acquire(&other).await.map_err(|e| responder.reject(e))?;
///     Ok(format!("{} and {} held", lock.name(), guard.name()))
/// }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let locker = MemoryLocker::new();
/// let app: Router = Router::new()
///     .route("/tenants/{tenant}/transfer", post(transfer))
///     .route_layer(
///         LockLayer::new(locker.clone(), Key::path_param("tenant")?.template("tenant:{}")?)
///             .problem_details()
///             .retry_after(std::time::Duration::from_secs(7)),
///     )
///     .with_state(locker);
/// # Ok(()) }
/// ```
///
/// As an axum extractor it never fails: without a layer on the route it is
/// the default (plain text, `Retry-After: 1`), the answer of
/// [`LockError`](crate::LockError)'s own `IntoResponse`. To give handlers
/// outside any `LockLayer` the same answers, add a layer's responder to the
/// whole router: `.layer(axum::Extension(layer.responder()))`.
#[derive(Clone, Default)]
pub struct LockResponder {
    pub(crate) format: RejectionFormat,
    pub(crate) retry_after: Option<Duration>,
    pub(crate) handler: Option<Arc<RejectionHandler>>,
}

/// The default `Retry-After`.
pub(crate) const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

impl LockResponder {
    /// The format of the built-in answers.
    pub fn format(&self) -> RejectionFormat {
        self.format
    }

    /// The `Retry-After` of 423 and 503 answers (sent in whole seconds,
    /// rounded up, at least 1).
    pub fn retry_after(&self) -> Duration {
        self.retry_after.unwrap_or(DEFAULT_RETRY_AFTER)
    }

    /// `true` when a [`rejection_handler`](super::LockLayer::rejection_handler)
    /// shapes the answers.
    pub fn has_rejection_handler(&self) -> bool {
        self.handler.is_some()
    }

    /// `error` as a rejection answered the way of this responder: return it
    /// from an axum handler (it implements `IntoResponse`), or turn it into
    /// a response with [`LockRejection::response`].
    pub fn reject(&self, error: impl Into<LockRejection>) -> LockRejection {
        error.into().answered_by(self.clone())
    }

    /// The answer to `error`: [`reject`](Self::reject), then
    /// [`LockRejection::response`].
    pub fn respond(&self, error: impl Into<LockRejection>) -> Response<RejectionBody> {
        self.reject(error).response()
    }
}

impl fmt::Debug for LockResponder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockResponder")
            .field("format", &self.format)
            .field("retry_after", &self.retry_after())
            .field("rejection_handler", &self.handler.is_some())
            .finish()
    }
}
