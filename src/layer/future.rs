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
use crate::{LockError, LockGuard};

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
            guard: Option<LockGuard>,
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
                    let wait_ms = this.started.elapsed().as_secs_f64() * 1e3;
                    this.span.record("lock.wait_ms", wait_ms);
                    let guard = match acquired {
                        Ok(guard) => guard,
                        Err(err) => {
                            this.span.record("lock.outcome", err.kind());
                            if err.is_contended() {
                                tracing::debug!(error = %err, "lock contended");
                            } else {
                                tracing::warn!(error = %err, "lock not acquired");
                            }
                            let rejection = Some(LockRejection::Lock(err));
                            this.state.set(State::Rejected { rejection });
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
                        guard: Some(guard),
                        lost,
                    });
                }
                StateProj::Calling {
                    future,
                    guard,
                    lost,
                } => {
                    if let Some(Poll::Ready(reason)) = lost.as_mut().map(|l| l.as_mut().poll(cx)) {
                        tracing::warn!(%reason, "lock lost before the handler answered; failing the request");
                        let name = guard.as_ref().map(|g| g.name().clone());
                        let rejection =
                            name.map(|name| LockRejection::Lock(LockError::Lost { name, reason }));
                        this.state.set(State::Rejected { rejection });
                        continue;
                    }
                    let result = ready!(future.poll(cx));
                    let guard = guard.take();
                    let response = match result {
                        Ok(response) => response,
                        Err(err) => return Poll::Ready(Err(err)), // the guard drops: released
                    };
                    let Some(guard) = guard else {
                        return Poll::Ready(Ok(response.map(LockedBody::new)));
                    };
                    if guard.is_lost() {
                        tracing::warn!("lock was lost while the handler ran");
                    }
                    let mut response = response;
                    if let Some(header) = &this.settings.token_header {
                        response
                            .headers_mut()
                            .insert(header.clone(), HeaderValue::from(guard.token()));
                    }
                    let held = HeldLock::new(guard, this.span.clone());
                    return Poll::Ready(Ok(response.map(|body| LockedBody::locked(body, held))));
                }
                StateProj::Rejected { rejection } => {
                    let response = match rejection.take() {
                        Some(rejection) => this.settings.respond(&rejection),
                        None => {
                            let lost = LockRejection::Lock(LockError::Unavailable {
                                message: "lock lost".into(),
                                source: None,
                            });
                            this.settings.respond(&lost)
                        }
                    };
                    return Poll::Ready(Ok(response.map(LockedBody::full)));
                }
            }
        }
    }
}
