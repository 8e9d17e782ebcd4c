//! axum integration (feature `axum`).
//!
//! - [`HeldLock`]: the lock [`LockLayer`](crate::LockLayer) took for this
//!   request, as an extractor. Without the layer it rejects with
//!   [`MissingLockLayer`] (500).
//! - [`LockResponder`] as an extractor: how the route's layer answers, so
//!   that a handler reporting a [`LockError`] of its own answers the same
//!   way (format, `Retry-After`, custom handler):
//!   `Err(responder.reject(err))`, a [`LockRejection`], which implements
//!   `IntoResponse`.
//! - [`LockError`] implements `IntoResponse` with the layer's default
//!   statuses, bodies and `Retry-After: 1`, so a handler on a route without
//!   the layer can lock by itself after its own extractors ran:
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

use ::axum::body::Body;
use ::axum::extract::{FromRequestParts, OptionalFromRequestParts};
use ::axum::response::{IntoResponse, Response};

use http::request::Parts;
use http::StatusCode;

use crate::layer::{text_response, LockRejection, LockResponder};
use crate::{LockError, LockInfo};

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
        text_response(self.status(), &self.body_text()).map(Body::new)
    }
}

impl IntoResponse for LockError {
    /// 423 (locked, timeout), 400 (invalid name), 503 (unavailable, lost), or
    /// 500 (mode conflict), in plain text, with `Retry-After: 1` on 423 and
    /// 503: the default answers of the layer. On a route with a
    /// [`LockLayer`](crate::LockLayer), answer through its
    /// [`LockResponder`] instead, to follow its settings.
    fn into_response(self) -> Response {
        LockRejection::from(self).into_response()
    }
}

impl IntoResponse for LockRejection {
    /// The route's answer: [`LockRejection::response`].
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            match self.lock_error() {
                Some(error) => {
                    tracing::warn!(error = %error.summary(), "lock error answered with {status}")
                }
                None => tracing::warn!(error = %self, "lock error answered with {status}"),
            }
        }
        self.response().map(Body::new)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for LockResponder {
    type Rejection = Infallible;

    /// The responder of the route's [`LockLayer`](crate::LockLayer), or the
    /// default one (plain text, `Retry-After: 1`) without a layer.
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<LockResponder>()
            .cloned()
            .unwrap_or_default())
    }
}
