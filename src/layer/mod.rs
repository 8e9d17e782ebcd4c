//! The Tower layer: one lock per request, held until the response completes.
//!
//! [`LockLayer`] derives a [`LockName`](crate::LockName) from each request
//! with a [`KeyExtractor`] (built-in: [`Key`]), takes the lock from a
//! [`Locker`](crate::Locker), calls the inner service with the lock's
//! [`LockInfo`](crate::LockInfo) in the request extensions, and moves the
//! guard into the response body ([`LockedBody`]). The lock is released when
//! the body's last frame is produced, or when the response, the body or the
//! request future is dropped (client disconnect, handler error or panic).
//!
//! | situation | answer |
//! |---|---|
//! | key missing or invalid | 400, plain text naming the key and why |
//! | key cannot be derived on this route | 500 |
//! | contended (try mode), or still contended after the wait | 423 + `Retry-After` |
//! | backend unavailable (bounded by its request timeout) | 503 + `Retry-After` |
//! | lock lost before the handler answered ([`OnLost::FailRequest`]) | 503 + `Retry-After` |
//!
//! Every failure is a response: the service's error type is the inner
//! service's (`Infallible` under axum).

mod body;
mod future;
mod key;
#[allow(clippy::module_inception)]
mod layer;
mod rejection;
mod service;

pub use body::LockedBody;
pub use future::ResponseFuture;
pub use key::{Key, KeyConfigError, KeyError, KeyExtractor};
pub use layer::{LayerConfigError, LockLayer, OnLost};
pub use rejection::LockRejection;
pub use service::LockService;

#[cfg(feature = "axum")]
pub(crate) use rejection::{body_text_of, plain_response, status_of};
