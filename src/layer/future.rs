//! [`ResponseFuture`]: acquire, then call the handler, then move the guard
//! into the response body.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;
use tracing::Span;

use super::body::{HeldLock, LockedBody};
use super::layer::{OnLost, Settings};
use super::LockRejection;
use crate::guard::BoxFuture;
use crate::{trace, LockError, LockGuard, LockName};

pin_project! {
    /// The response future of [`LockService`](super::LockService).
    pub struct ResponseFuture<S, ReqB>
    where
        S: Service<Request<ReqB>>,
    {
        #[pin]
        state: State<S::Future>,
        service: Option<S>,
        request: Option<Request<ReqB>>,
        settings: Arc<Settings>,
        span: Span,
        name: Option<LockName>,
        started: Instant,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Acquiring {
            acquire: BoxFuture<Result<LockGuard, LockError>>,
        },
        Calling {
            #[pin]
            future: F,
            // With the instant the acquisition finished, for `held_ms`.
            guard: Option<(LockGuard, Instant)>,
            lost: Option<BoxFuture<String>>,
        },
        Rejected {
            rejection: Option<LockRejection>,
        },
    }
}

impl<S, ReqB> ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    pub(crate) fn acquiring(
        acquire: BoxFuture<Result<LockGuard, LockError>>,
        name: LockName,
        request: Request<ReqB>,
        service: S,
        settings: Arc<Settings>,
        span: Span,
    ) -> Self {
        Self {
            state: State::Acquiring { acquire },
            service: Some(service),
            request: Some(request),
            settings,
            span,
            name: Some(name),
            started: Instant::now(),
        }
    }

    pub(crate) fn unlocked(future: S::Future, settings: Arc<Settings>) -> Self {
        Self {
            state: State::Calling {
                future,
                guard: None,
                lost: None,
            },
            service: None,
            request: None,
            settings,
            span: Span::none(),
            name: None,
            started: Instant::now(),
        }
    }

    pub(crate) fn rejected(rejection: LockRejection, settings: Arc<Settings>) -> Self {
        Self {
            state: State::Rejected {
                rejection: Some(rejection),
            },
            service: None,
            request: None,
            settings,
            span: Span::none(),
            name: None,
            started: Instant::now(),
        }
    }
}

impl<S, ReqB, ResB> Future for ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes>,
{
    type Output = Result<Response<LockedBody<ResB>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        loop {
            match this.state.as_mut().project() {
                StateProj::Acquiring { acquire } => {
                    let acquired = ready!(acquire.as_mut().poll(cx));
                    let acquired_at = Instant::now();
                    let wait_ms = trace::millis(acquired_at - *this.started);
                    this.span.record("lock.wait_ms", wait_ms);
                    let guard = match acquired {
                        Ok(guard) => guard,
                        Err(err) => {
                            this.span.record("lock.outcome", err.kind());
                            log_failure(this.name.as_ref(), &err, wait_ms);
                            let rejection = this.settings.responder.reject(err);
                            this.state.set(State::Rejected {
                                rejection: Some(rejection),
                            });
                            continue;
                        }
                    };
                    this.span.record("lock.token", guard.token());
                    this.span.record("lock.outcome", "acquired");
                    let (Some(mut service), Some(mut request)) =
                        (this.service.take(), this.request.take())
                    else {
                        // Unreachable: both are set with the Acquiring state.
                        continue;
                    };
                    request.extensions_mut().insert(guard.info().clone());
                    let lost = (this.settings.on_lost == OnLost::FailRequest)
                        .then(|| Box::pin(guard.lost()) as BoxFuture<String>);
                    let future = service.call(request);
                    this.state.set(State::Calling {
                        future,
                        guard: Some((guard, acquired_at)),
                        lost,
                    });
                }
                StateProj::Calling {
                    future,
                    guard,
                    lost,
                } => {
                    if let Some(Poll::Ready(reason)) = lost.as_mut().map(|l| l.as_mut().poll(cx)) {
                        // `lost` is only set with a guard; dropping it releases.
                        let error = match guard.take() {
                            Some((guard, _)) => {
                                let name = guard.name().clone();
                                tracing::warn!(lock.name = %name, %reason, "lock lost before the handler answered; failing the request");
                                LockError::Lost { name, reason }
                            }
                            None => LockError::Unavailable {
                                message: reason,
                                source: None,
                            },
                        };
                        let rejection = this.settings.responder.reject(error);
                        this.state.set(State::Rejected {
                            rejection: Some(rejection),
                        });
                        continue;
                    }
                    let result = ready!(future.poll(cx));
                    let guard = guard.take();
                    let response = match result {
                        Ok(response) => response,
                        Err(err) => return Poll::Ready(Err(err)), // the guard drops: released
                    };
                    let Some((guard, acquired_at)) = guard else {
                        return Poll::Ready(Ok(response.map(LockedBody::new)));
                    };
                    if guard.is_lost() {
                        tracing::warn!(lock.name = %guard.name(), "lock was lost while the handler ran");
                    }
                    let mut response = response;
                    if let Some(header) = &this.settings.token_header {
                        response
                            .headers_mut()
                            .insert(header.clone(), HeaderValue::from(guard.token()));
                    }
                    let held = HeldLock::new(guard, this.span.clone(), acquired_at);
                    return Poll::Ready(Ok(response.map(|body| LockedBody::locked(body, held))));
                }
                StateProj::Rejected { rejection } => {
                    let rejection = rejection.take().unwrap_or_else(|| {
                        // Unreachable: the state is set with its rejection.
                        this.settings.responder.reject(LockError::Unavailable {
                            message: "the layer answered twice".into(),
                            source: None,
                        })
                    });
                    return Poll::Ready(Ok(rejection.response().map(LockedBody::rejection)));
                }
            }
        }
    }
}

/// Logs an acquisition that failed: contention at DEBUG; anything else as
/// one WARN line per request with the error's short message, and its whole
/// chain of sources at DEBUG.
fn log_failure(name: Option<&LockName>, err: &LockError, wait_ms: f64) {
    let name = name.map(tracing::field::display);
    if err.is_contended() {
        tracing::debug!(lock.name = name, error = %err, wait_ms, "lock contended");
        return;
    }
    tracing::warn!(
        lock.name = name,
        lock.outcome = err.kind(),
        error = %err.summary(),
        wait_ms,
        "lock not acquired"
    );
    tracing::debug!(
        lock.name = name,
        error = err as &(dyn std::error::Error + 'static),
        "lock not acquired: details"
    );
}
