//! [`LockRejection`]: every answer the layer gives instead of calling the
//! handler, and the plain-text responses it becomes.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};

use super::KeyError;
use crate::LockError;

/// Why the layer answered a request itself.
#[derive(Debug)]
#[non_exhaustive]
pub enum LockRejection {
    /// The request's lock key is missing or invalid (400), or cannot be
    /// derived on this route (500).
    Key(KeyError),
    /// The lock could not be taken (423 when contended, 503 when the backend
    /// is unavailable) or was lost before the handler answered (503).
    Lock(LockError),
}

impl LockRejection {
    /// The status code: 400, 423, 500 or 503.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Key(e) if e.is_server_fault() => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Key(_) => StatusCode::BAD_REQUEST,
            Self::Lock(e) => status_of(e),
        }
    }

    /// The plain-text body. Says which key and why, never backend internals.
    pub fn body_text(&self) -> String {
        match self {
            Self::Key(e) if e.is_server_fault() => {
                tracing::error!(error = %e, "lock key cannot be derived on this route");
                "lock key cannot be derived on this route".to_string()
            }
            Self::Key(e) => format!("invalid {e}"),
            Self::Lock(e) => body_text_of(e),
        }
    }

    /// The underlying lock error, if any.
    pub fn lock_error(&self) -> Option<&LockError> {
        match self {
            Self::Lock(e) => Some(e),
            Self::Key(_) => None,
        }
    }

    /// Whether the client should retry later (423 and 503 carry `Retry-After`).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.status(),
            StatusCode::LOCKED | StatusCode::SERVICE_UNAVAILABLE
        )
    }

    /// The default response: status, `text/plain` body, and `Retry-After`
    /// (whole seconds, at least 1) for 423 and 503.
    pub fn to_response(&self, retry_after: Duration) -> Response<Bytes> {
        plain_response(
            self.status(),
            self.body_text(),
            self.is_retryable().then_some(retry_after),
        )
    }
}

impl fmt::Display for LockRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Key(e) => fmt::Display::fmt(e, f),
            Self::Lock(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl std::error::Error for LockRejection {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Key(e) => Some(e),
            Self::Lock(e) => Some(e),
        }
    }
}

impl From<KeyError> for LockRejection {
    fn from(e: KeyError) -> Self {
        Self::Key(e)
    }
}

impl From<LockError> for LockRejection {
    fn from(e: LockError) -> Self {
        Self::Lock(e)
    }
}

/// The status a [`LockError`] answers with.
pub(crate) fn status_of(e: &LockError) -> StatusCode {
    match e {
        LockError::Locked { .. } | LockError::Timeout { .. } => StatusCode::LOCKED,
        LockError::InvalidName(_) => StatusCode::BAD_REQUEST,
        LockError::Unavailable { .. } | LockError::Lost { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The body a [`LockError`] answers with: the name and what happened, without
/// holder keys or backend messages (those go to the log).
pub(crate) fn body_text_of(e: &LockError) -> String {
    match e {
        LockError::Locked { name, .. } => {
            format!("lock {name:?} is held by another request; retry later")
        }
        LockError::Timeout { name, waited } => {
            format!(
                "lock {name:?} stayed held for {} ms; retry later",
                waited.as_millis()
            )
        }
        LockError::InvalidName(e) => format!("invalid lock key: {e}"),
        LockError::Unavailable { .. } => "lock service unavailable; retry later".to_string(),
        LockError::Lost { name, .. } => format!("lock {name:?} was lost; retry later"),
        _ => "lock misconfigured on the server".to_string(),
    }
}

/// A `text/plain` response with an optional `Retry-After`.
pub(crate) fn plain_response(
    status: StatusCode,
    text: String,
    retry_after: Option<Duration>,
) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(text));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(after) = retry_after {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        headers.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    response
}
