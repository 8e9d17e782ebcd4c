//! axum integration (feature `axum`).
//!
//! - [`HeldLock`]: the lock [`LockLayer`](crate::LockLayer) took for this
//!   request, as an extractor. Without the layer it rejects with
//!   [`MissingLockLayer`] (500).
//! - [`LockError`] and [`LockRejection`]
//!   implement `IntoResponse` with the same statuses, bodies and
//!   `Retry-After` as the layer, so a handler can lock by itself after its
//!   own extractors ran:
//!
//! ```
//! use axum::{extract::{Path, State}, routing::post, Router};
//! use tower_lease_lock::{LockError, LockName, Locker, MemoryLocker};
//!
//! async fn rename(
//!     State(locker): State<MemoryLocker>,
//!     Path(tenant): Path<String>,
//! ) -> Result<String, LockError> {
//!     let guard = locker.try_acquire(&LockName::new(format!("tenant:{tenant}"))?).await?;
//!     Ok(format!("renamed under token {}", guard.token()))
//! }
//!
//! let app: Router = Router::new()
//!     .route("/tenants/{tenant}/rename", post(rename))
//!     .with_state(MemoryLocker::new());
//! ```

use std::convert::Infallible;
use std::fmt;
use std::ops::Deref;
use std::time::Duration;

use ::axum::extract::{FromRequestParts, OptionalFromRequestParts};
use ::axum::response::{IntoResponse, Response};

use http::request::Parts;
use http::StatusCode;

use crate::layer::{body_text_of, plain_response, status_of, LockRejection};
use crate::{LockError, LockInfo};

/// The `Retry-After` of a [`LockError`] answered from a handler.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The lock held for this request by [`LockLayer`](crate::LockLayer): name,
/// mode, fencing token and lost signal. Derefs to [`LockInfo`].
///
/// ```
/// use tower_lease_lock::axum::HeldLock;
///
/// async fn handler(lock: HeldLock) -> String {
///     format!("{} held with token {}", lock.name(), lock.token())
/// }
/// ```
///
/// As `Option<HeldLock>` it is `None` for requests the layer let through
/// unlocked.
#[derive(Debug, Clone)]
pub struct HeldLock(pub LockInfo);

impl Deref for HeldLock {
    type Target = LockInfo;
    fn deref(&self) -> &LockInfo {
        &self.0
    }
}

impl<S: Send + Sync> FromRequestParts<S> for HeldLock {
    type Rejection = MissingLockLayer;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<LockInfo>() {
            Some(info) => Ok(Self(info.clone())),
            None => {
                tracing::trace!(target: "axum::rejection", "HeldLock rejected: LockLayer is not installed");
                Err(MissingLockLayer { _private: () })
            }
        }
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for HeldLock {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<LockInfo>().cloned().map(Self))
    }
}

/// Rejection of [`HeldLock`] when no [`LockLayer`](crate::LockLayer) took a
/// lock for the request: a server misconfiguration, answered with 500.
#[derive(Debug)]
#[non_exhaustive]
pub struct MissingLockLayer {
    _private: (),
}

impl MissingLockLayer {
    /// 500.
    pub fn status(&self) -> StatusCode {
        StatusCode::INTERNAL_SERVER_ERROR
    }

    /// `LockLayer is not installed on this route`.
    pub fn body_text(&self) -> String {
        "LockLayer is not installed on this route".to_string()
    }
}

impl fmt::Display for MissingLockLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.body_text())
    }
}

impl std::error::Error for MissingLockLayer {}

impl IntoResponse for MissingLockLayer {
    fn into_response(self) -> Response {
        plain_response(self.status(), self.body_text(), None).map(::axum::body::Body::from)
    }
}

impl IntoResponse for LockError {
    /// 423 (locked, timeout), 400 (invalid name), 503 (unavailable, lost), or
    /// 500 (mode conflict), with `Retry-After: 1` on 423 and 503.
    fn into_response(self) -> Response {
        let status = status_of(&self);
        if status.is_server_error() {
            tracing::warn!(error = %self, "lock error answered with {status}");
        }
        let retry = matches!(status, StatusCode::LOCKED | StatusCode::SERVICE_UNAVAILABLE);
        plain_response(status, body_text_of(&self), retry.then_some(RETRY_AFTER))
            .map(::axum::body::Body::from)
    }
}

impl IntoResponse for LockRejection {
    fn into_response(self) -> Response {
        self.to_response(RETRY_AFTER).map(::axum::body::Body::from)
    }
}
