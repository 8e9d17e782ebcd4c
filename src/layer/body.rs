//! The bodies of the layer's responses: [`LockedBody`], which holds the lock
//! until its last frame, and [`RejectionBody`], the body of an answer given
//! instead of calling the handler.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tracing::Span;

use crate::{trace, BoxError, LockGuard};

/// A held guard plus what is needed to log its release.
pub(crate) struct HeldLock {
    guard: LockGuard,
    span: Span,
    acquired_at: Instant,
}

impl HeldLock {
    /// `acquired_at`: when the acquisition finished, so that `held_ms`
    /// covers the handler and the body, not the body alone.
    pub(crate) fn new(guard: LockGuard, span: Span, acquired_at: Instant) -> Self {
        Self {
            guard,
            span,
            acquired_at,
        }
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        let held_ms = trace::millis(self.acquired_at.elapsed());
        tracing::debug!(parent: &self.span, lock.token = self.guard.token(), held_ms, "lock released");
    }
}

pin_project! {
    /// The response body of [`LockService`](super::LockService). It holds the
    /// request's lock and releases it when the inner body ends (its last
    /// frame, or an error), or when the body is dropped (a client that
    /// disconnected mid-stream).
    ///
    /// The layer's own answers (a [`LockRejection`](super::LockRejection))
    /// carry a [`RejectionBody`] instead of the inner service's body, so
    /// errors are boxed: [`BoxError`].
    ///
    /// `Default` (when `B: Default`) is an empty body of `B` holding no lock,
    /// which middleware such as tower-http's `TimeoutLayer` uses for the
    /// answers it makes up.
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
        Rejection {
            #[pin]
            body: RejectionBody,
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

    pub(crate) fn rejection(body: RejectionBody) -> Self {
        Self {
            kind: Kind::Rejection { body },
            held: None,
        }
    }

    /// `true` while the body still holds its lock.
    pub fn holds_lock(&self) -> bool {
        self.held.is_some()
    }
}

impl<B: Default> Default for LockedBody<B> {
    fn default() -> Self {
        Self::new(B::default())
    }
}

impl<B> Body for LockedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

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
                Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
            }
            KindProj::Rejection { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Rejection { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Rejection { body } => body.size_hint(),
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

/// The body of an answer the layer gives instead of calling the handler: the
/// built-in text or problem details, or whatever body a
/// [`rejection_handler`](super::LockLayer::rejection_handler) returned
/// (boxed).
pub struct RejectionBody {
    kind: RejectionKind,
}

enum RejectionKind {
    Full(Option<Bytes>),
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl RejectionBody {
    /// Boxes any body whose data is [`Bytes`]: an axum `Body`, a `String`,
    /// http-body-util's `Full`, a stream.
    pub fn new<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self {
            kind: RejectionKind::Boxed(body.map_err(Into::into).boxed_unsync()),
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    fn full(data: Bytes) -> Self {
        Self {
            kind: RejectionKind::Full((!data.is_empty()).then_some(data)),
        }
    }
}

impl Default for RejectionBody {
    fn default() -> Self {
        Self::empty()
    }
}

impl From<Bytes> for RejectionBody {
    fn from(data: Bytes) -> Self {
        Self::full(data)
    }
}

impl From<String> for RejectionBody {
    fn from(text: String) -> Self {
        Self::full(Bytes::from(text))
    }
}

impl From<&'static str> for RejectionBody {
    fn from(text: &'static str) -> Self {
        Self::full(Bytes::from_static(text.as_bytes()))
    }
}

impl Body for RejectionBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match &mut self.get_mut().kind {
            RejectionKind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            RejectionKind::Boxed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RejectionKind::Full(data) => data.is_none(),
            RejectionKind::Boxed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RejectionKind::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RejectionKind::Boxed(body) => body.size_hint(),
        }
    }
}

impl std::fmt::Debug for RejectionBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            RejectionKind::Full(_) => "full",
            RejectionKind::Boxed(_) => "boxed",
        };
        f.debug_struct("RejectionBody")
            .field("kind", &kind)
            .finish()
    }
}
