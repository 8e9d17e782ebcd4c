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
//! | key missing or invalid | 400, naming the key and why |
//! | key cannot be derived on this route | 500 |
//! | contended (try mode), or still contended after the wait | 423 + `Retry-After` |
//! | backend unavailable (bounded by its request timeout) | 503 + `Retry-After` |
//! | lock lost before the handler answered ([`OnLost::FailRequest`]) | 503 + `Retry-After` |
//!
//! Every failure is a response: the service's error type is the inner
//! service's (`Infallible` under axum). The answers are one line of plain
//! text by default, or problem details (RFC 9457) with
//! [`LockLayer::problem_details`]; a
//! [`rejection_handler`](LockLayer::rejection_handler) can shape them
//! instead. The layer hands its [`LockResponder`] to handlers, so that the
//! lock errors they report answer the same way.

mod body;
mod future;
mod key;
#[allow(clippy::module_inception)]
mod layer;
mod problem;
mod rejection;
mod responder;
mod service;

pub use body::{LockedBody, RejectionBody};
pub use future::ResponseFuture;
pub use key::{Key, KeyConfigError, KeyError, KeyExtractor};
pub use layer::{LayerConfigError, LockLayer, OnLost};
pub use rejection::LockRejection;
pub use responder::{LockResponder, RejectionFormat};
pub use service::LockService;

#[cfg(feature = "axum")]
pub(crate) use rejection::text_response;
