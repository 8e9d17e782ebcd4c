//! [`LockedBody`]: the response body that holds the lock until its last frame.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tracing::Span;

use crate::LockGuard;

/// A held guard plus what is needed to log its release.
pub(crate) struct HeldLock {
    guard: LockGuard,
    span: Span,
    since: Instant,
}

impl HeldLock {
    pub(crate) fn new(guard: LockGuard, span: Span) -> Self {
        Self {
            guard,
            span,
            since: Instant::now(),
        }
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        let held_ms = self.since.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(parent: &self.span, lock.token = self.guard.token(), held_ms, "lock released");
    }
}

pin_project! {
    /// The response body of [`LockService`](super::LockService). It holds the
    /// request's lock and releases it when the inner body ends (its last
    /// frame, or an error), or when the body is dropped (a client that
    /// disconnected mid-stream).
    pub struct LockedBody<B> {
        #[pin]
        kind: Kind<B>,
        held: Option<HeldLock>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner {
            #[pin]
            body: B,
        },
        Full {
            data: Option<Bytes>,
        },
    }
}

impl<B> LockedBody<B> {
    pub(crate) fn new(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
            held: None,
        }
    }

    pub(crate) fn locked(body: B, held: HeldLock) -> Self {
        Self {
            kind: Kind::Inner { body },
            held: Some(held),
        }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
            held: None,
        }
    }

    /// `true` while the body still holds its lock.
    pub fn holds_lock(&self) -> bool {
        self.held.is_some()
    }
}

impl<B> Body for LockedBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Inner { mut body } => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                let ended = match &frame {
                    None | Some(Err(_)) => true,
                    Some(Ok(_)) => body.is_end_stream(),
                };
                if ended {
                    *this.held = None; // release now, not when the body is dropped
                }
                Poll::Ready(frame)
            }
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

impl<B> std::fmt::Debug for LockedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockedBody")
            .field("holds_lock", &self.holds_lock())
            .finish_non_exhaustive()
    }
}
