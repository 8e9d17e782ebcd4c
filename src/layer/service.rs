//! [`LockService`]: extracts the key, starts the acquisition, and hands the
//! rest to the [`ResponseFuture`].

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::future::ResponseFuture;
use super::layer::Settings;
use super::{KeyExtractor, LockedBody};
use crate::Locker;

/// The service made by [`LockLayer`](super::LockLayer).
pub struct LockService<S, L, K> {
    inner: S,
    locker: L,
    key: K,
    settings: Arc<Settings>,
}

impl<S, L, K> LockService<S, L, K> {
    pub(crate) fn new(inner: S, locker: L, key: K, settings: Arc<Settings>) -> Self {
        Self {
            inner,
            locker,
            key,
            settings,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, L, K, ReqB, ResB> Service<Request<ReqB>> for LockService<S, L, K>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    L: Locker,
    K: KeyExtractor,
    ResB: Body<Data = Bytes>,
{
    type Response = Response<LockedBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        let settings = Arc::clone(&self.settings);
        // For handlers that report lock errors of their own (see LockResponder).
        parts.extensions.insert(settings.responder.clone());
        let name = match self.key.extract(&mut parts) {
            Ok(Some(name)) => name,
            Ok(None) => {
                let request = Request::from_parts(parts, body);
                return ResponseFuture::unlocked(self.inner.call(request), settings);
            }
            Err(err) => {
                if err.is_server_fault() {
                    tracing::error!(error = %err, "lock key cannot be derived on this route");
                } else {
                    tracing::debug!(error = %err, "request without a valid lock key");
                }
                let rejection = settings.responder.reject(err);
                return ResponseFuture::rejected(rejection, settings);
            }
        };
        let mode = settings.mode_for(&parts);
        let wait = settings.wait;
        // The readied service goes with the future; `self` keeps a fresh clone.
        let clone = self.inner.clone();
        let service = std::mem::replace(&mut self.inner, clone);
        let locker = self.locker.clone();
        let span = tracing::debug_span!(
            "lock.request",
            lock.name = %name,
            lock.mode = %mode,
            lock.token = tracing::field::Empty,
            lock.wait_ms = tracing::field::Empty,
            lock.outcome = tracing::field::Empty,
        );
        let acquire = {
            let name = name.clone();
            Box::pin(async move { locker.lock(&name, mode, wait).await })
        };
        ResponseFuture::acquiring(
            acquire,
            name,
            Request::from_parts(parts, body),
            service,
            settings,
            span,
        )
    }
}

impl<S: Clone, L: Clone, K: Clone> Clone for LockService<S, L, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            locker: self.locker.clone(),
            key: self.key.clone(),
            settings: Arc::clone(&self.settings),
        }
    }
}

impl<S: fmt::Debug, L, K> fmt::Debug for LockService<S, L, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}
