//! [`LockLayer`]: the lock settings of a route, applied by [`LockService`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderName, Response};
use http_body::Body;
use tower_layer::Layer;

use super::{
    KeyExtractor, LockRejection, LockResponder, LockService, RejectionBody, RejectionFormat,
};
use crate::{BoxError, LockMode, Locker, Wait};

/// What to do when the lock is lost while the handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnLost {
    /// Let the handler finish and log a warning (the default). Protect the
    /// data itself with the fencing token.
    #[default]
    Finish,
    /// Stop the handler (drop its future) and answer 503, if it has not
    /// answered yet.
    FailRequest,
}

/// A mistake in configuring a [`LockLayer`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayerConfigError {
    /// Permits must be at least 1.
    #[error("permits must be at least 1")]
    ZeroPermits,
}

type ModeFn = dyn Fn(&Parts) -> LockMode + Send + Sync;

#[derive(Clone)]
pub(crate) enum ModePolicy {
    Fixed(LockMode),
    ByMethod,
    Custom(Arc<ModeFn>),
}

/// The layer's settings, shared by every service and request future.
#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) wait: Wait,
    pub(crate) mode: ModePolicy,
    pub(crate) on_lost: OnLost,
    pub(crate) token_header: Option<HeaderName>,
    pub(crate) responder: LockResponder,
}

impl Settings {
    pub(crate) fn mode_for(&self, parts: &Parts) -> LockMode {
        match &self.mode {
            ModePolicy::Fixed(mode) => *mode,
            ModePolicy::ByMethod => {
                if super::key::is_safe(&parts.method) {
                    LockMode::Shared
                } else {
                    LockMode::Exclusive
                }
            }
            ModePolicy::Custom(f) => f(parts),
        }
    }
}

/// Takes a lock for each request before calling the inner service and holds
/// it until the response body ends (or the response, body or request future
/// is dropped).
///
/// ```
/// use std::time::Duration;
/// use axum::{routing::post, Router};
/// use tower_lease_lock::{layer::{Key, LockLayer}, MemoryLocker};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let locker = MemoryLocker::new(); // or an EtcdLocker
/// let app: Router = Router::new()
///     .route("/tenants/{tenant}/orders", post(|| async { "created" }))
///     .route_layer(LockLayer::new(locker, Key::path_param("tenant")?).wait(Duration::from_secs(2)));
/// # Ok(()) }
/// ```
pub struct LockLayer<L, K> {
    locker: L,
    key: K,
    settings: Arc<Settings>,
}

impl<L: Locker, K: KeyExtractor> LockLayer<L, K> {
    /// Locks the name `key` derives from each request, exclusively, in try
    /// mode: a contended name answers 423 at once.
    pub fn new(locker: L, key: K) -> Self {
        Self {
            locker,
            key,
            settings: Arc::new(Settings {
                wait: Wait::Try,
                mode: ModePolicy::Fixed(LockMode::Exclusive),
                on_lost: OnLost::Finish,
                token_header: None,
                responder: LockResponder::default(),
            }),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Settings)) -> Self {
        f(Arc::make_mut(&mut self.settings));
        self
    }

    /// Waits in line up to `timeout` for a contended name, then answers 423.
    /// The timeout bounds the wait in line; each etcd request on the way is
    /// bounded by the locker's own request timeout.
    pub fn wait(self, timeout: Duration) -> Self {
        self.with(|s| s.wait = Wait::Timeout(timeout))
    }

    /// Answers 423 at once when the name is contended (the default).
    pub fn try_only(self) -> Self {
        self.with(|s| s.wait = Wait::Try)
    }

    /// Locks every request in `mode`.
    pub fn mode(self, mode: LockMode) -> Self {
        self.with(|s| s.mode = ModePolicy::Fixed(mode))
    }

    /// Lets at most `n` requests per name run at once (a semaphore).
    pub fn permits(self, n: u32) -> Result<Self, LayerConfigError> {
        let mode = LockMode::permits(n).ok_or(LayerConfigError::ZeroPermits)?;
        Ok(self.mode(mode))
    }

    /// Safe methods (GET, HEAD, OPTIONS, TRACE) share the name; all others
    /// take it exclusively.
    pub fn mode_by_method(self) -> Self {
        self.with(|s| s.mode = ModePolicy::ByMethod)
    }

    /// Chooses the mode of each request with a function of its head.
    pub fn mode_fn(self, f: impl Fn(&Parts) -> LockMode + Send + Sync + 'static) -> Self {
        self.with(|s| s.mode = ModePolicy::Custom(Arc::new(f)))
    }

    /// The `Retry-After` of 423 and 503 answers (default 1 s; sent in whole
    /// seconds, rounded up, at least 1; in problem details also as
    /// `retry_after`).
    pub fn retry_after(self, after: Duration) -> Self {
        self.with(|s| s.responder.retry_after = Some(after))
    }

    /// The format of the layer's answers: plain text (the default) or
    /// problem details.
    pub fn rejection_format(self, format: RejectionFormat) -> Self {
        self.with(|s| s.responder.format = format)
    }

    /// Answers with problem details (RFC 9457, `application/problem+json`):
    /// `rejection_format(RejectionFormat::ProblemDetails)`. See
    /// [`RejectionFormat`] for the members and problem types.
    pub fn problem_details(self) -> Self {
        self.rejection_format(RejectionFormat::ProblemDetails)
    }
    /// What to do when the lock is lost while the handler runs.
    pub fn on_lost(self, on_lost: OnLost) -> Self {
        self.with(|s| s.on_lost = on_lost)
    }

    /// Adds the fencing token to every locked response, in header `name`.
    pub fn fencing_token_header(self, name: HeaderName) -> Self {
        self.with(|s| s.token_header = Some(name))
    }

    /// Replaces every rejection response (400, 423, 500, 503) with your own,
    /// in any body type: an axum `Response`, a `Response<String>`, ...
    ///
    /// The handler gets the [`LockRejection`], which tells the status, text,
    /// lock name and `Retry-After` (configured by
    /// [`retry_after`](Self::retry_after)) of the built-in answer, and can
    /// fall back on it with [`LockRejection::default_response`]. Handlers
    /// that report lock errors through the route's [`LockResponder`] answer
    /// through it too.
    ///
    /// ```
    /// use axum::{http::header, response::{IntoResponse, Response}, Json};
    /// use tower_lease_lock::{layer::{Key, LockLayer, LockRejection}, MemoryLocker};
    ///
    /// fn json_rejection(rejection: &LockRejection) -> Response {
    ///     let body = Json(serde_json::json!({
    ///         "error": rejection.body_text(),
    ///         "lock": rejection.lock_name().map(|name| name.as_str()),
    ///     }));
    ///     match rejection.retry_after_secs() {
    ///         Some(secs) => (rejection.status(), [(header::RETRY_AFTER, secs)], body).into_response(),
    ///         None => (rejection.status(), body).into_response(),
    ///     }
    /// }
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let layer = LockLayer::new(MemoryLocker::new(), Key::path_param("tenant")?)
    ///     .rejection_handler(json_rejection);
    /// # Ok(()) }
    /// ```
    pub fn rejection_handler<F, B>(self, handler: F) -> Self
    where
        F: Fn(&LockRejection) -> Response<B> + Send + Sync + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let handler = move |rejection: &LockRejection| handler(rejection).map(RejectionBody::new);
        self.with(|s| s.responder.handler = Some(Arc::new(handler)))
    }

    /// How this layer answers when it cannot run the handler under the lock.
    /// The layer also hands it to handlers in the request extensions.
    pub fn responder(&self) -> LockResponder {
        self.settings.responder.clone()
    }
}

impl<L: Clone, K: Clone> Clone for LockLayer<L, K> {
    fn clone(&self) -> Self {
        Self {
            locker: self.locker.clone(),
            key: self.key.clone(),
            settings: Arc::clone(&self.settings),
        }
    }
}

impl<S, L: Clone, K: Clone> Layer<S> for LockLayer<L, K> {
    type Service = LockService<S, L, K>;

    fn layer(&self, inner: S) -> Self::Service {
        LockService::new(
            inner,
            self.locker.clone(),
            self.key.clone(),
            Arc::clone(&self.settings),
        )
    }
}

impl<L, K> fmt::Debug for LockLayer<L, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockLayer")
            .field("wait", &self.settings.wait)
            .field("on_lost", &self.settings.on_lost)
            .field("responder", &self.settings.responder)
            .finish_non_exhaustive()
    }
}
