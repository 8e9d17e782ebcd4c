//! [`LockRejection`]: every answer the layer gives instead of calling the
//! handler, and the built-in responses it becomes (plain text or problem
//! details).

use std::fmt;
use std::time::Duration;

use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};

use super::problem::Problem;
use super::{KeyError, LockResponder, RejectionBody, RejectionFormat};
use crate::{InvalidName, LockError, LockName};

/// Why the layer answered a request itself (or why a handler gives up, see
/// [`LockResponder::reject`]), and how the route answers it.
///
/// A [`rejection_handler`](super::LockLayer::rejection_handler) receives it
/// to build its own response: [`status`](Self::status),
/// [`body_text`](Self::body_text), [`lock_name`](Self::lock_name) and
/// [`retry_after`](Self::retry_after) say what the built-in answer would say,
/// and [`default_response`](Self::default_response) is that answer.
#[derive(Debug)]
pub struct LockRejection {
    cause: Cause,
    responder: LockResponder,
}

#[derive(Debug)]
enum Cause {
    Key(KeyError),
    Lock(LockError),
}

impl LockRejection {
    /// Sets how this rejection is answered.
    pub(crate) fn answered_by(mut self, responder: LockResponder) -> Self {
        self.responder = responder;
        self
    }

    /// The status code: 400 (missing or invalid key), 423 (contended), 500
    /// (key underivable on the route, modes in conflict, backend permission
    /// denied) or 503 (backend unavailable, lock lost).
    pub fn status(&self) -> StatusCode {
        match &self.cause {
            Cause::Key(e) if e.is_server_fault() => StatusCode::INTERNAL_SERVER_ERROR,
            Cause::Key(_) => StatusCode::BAD_REQUEST,
            Cause::Lock(e) => status_of(e),
        }
    }

    /// One line for the client: which lock or key and what happened, never
    /// holder keys or backend messages (those go to the log). Without a
    /// trailing newline (the plain-text body adds one).
    pub fn body_text(&self) -> String {
        match &self.cause {
            Cause::Key(e) if e.is_server_fault() => {
                "lock key cannot be derived on this route".to_string()
            }
            Cause::Key(e) => format!("invalid {e}"),
            Cause::Lock(e) => body_text_of(e),
        }
    }

    /// The lock name, when the rejection is about one (not for key errors
    /// and an unavailable backend).
    pub fn lock_name(&self) -> Option<&LockName> {
        self.lock_error().and_then(LockError::name)
    }

    /// The lock error, if the rejection is one.
    pub fn lock_error(&self) -> Option<&LockError> {
        match &self.cause {
            Cause::Lock(e) => Some(e),
            Cause::Key(_) => None,
        }
    }

    /// The key error, if the rejection is one.
    pub fn key_error(&self) -> Option<&KeyError> {
        match &self.cause {
            Cause::Key(e) => Some(e),
            Cause::Lock(_) => None,
        }
    }

    /// Whether the client should retry later: 423 and 503 answers.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.status(),
            StatusCode::LOCKED | StatusCode::SERVICE_UNAVAILABLE
        )
    }

    /// The `Retry-After` the route sends with this answer: the layer's
    /// [`retry_after`](super::LockLayer::retry_after) on 423 and 503, `None`
    /// otherwise.
    pub fn retry_after(&self) -> Option<Duration> {
        self.is_retryable().then(|| self.responder.retry_after())
    }

    /// [`retry_after`](Self::retry_after) as the `Retry-After` header sends
    /// it: whole seconds, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after().map(whole_seconds)
    }

    /// How the route answers: format, `Retry-After`, custom handler.
    pub fn responder(&self) -> &LockResponder {
        &self.responder
    }

    /// The answer of the route: its
    /// [`rejection_handler`](super::LockLayer::rejection_handler)'s, or else
    /// [`default_response`](Self::default_response).
    pub fn response(&self) -> Response<RejectionBody> {
        match &self.responder.handler {
            Some(handler) => handler(self),
            None => self.default_response(),
        }
    }

    /// The built-in answer, in the route's [`RejectionFormat`]: the status,
    /// the body (a line of text, or problem details), and `Retry-After` on
    /// 423 and 503. A rejection handler can fall back on it.
    pub fn default_response(&self) -> Response<RejectionBody> {
        let status = self.status();
        let (content_type, body) = match self.responder.format {
            RejectionFormat::PlainText => (TEXT_PLAIN, format!("{}\n", self.body_text())),
            RejectionFormat::ProblemDetails => {
                let (kind, title) = self.problem_type();
                let problem = Problem {
                    kind,
                    title,
                    status: status.as_u16(),
                    detail: &self.body_text(),
                    lock: self.lock_name().map(LockName::as_str),
                    retry_after: self.retry_after_secs(),
                };
                (PROBLEM_JSON, problem.to_json())
            }
        };
        response(status, content_type, body, self.retry_after_secs())
    }

    /// The problem type's anchor and title; see [`RejectionFormat`].
    fn problem_type(&self) -> (&'static str, &'static str) {
        match &self.cause {
            Cause::Key(e) if e.is_server_fault() => {
                ("lock-key-unavailable", "Lock key unavailable")
            }
            Cause::Key(_) | Cause::Lock(LockError::InvalidName(_)) => {
                ("invalid-lock-key", "Invalid lock key")
            }
            Cause::Lock(LockError::Locked { .. }) => ("lock-held", "Lock held"),
            Cause::Lock(LockError::Timeout { .. }) => ("lock-wait-timeout", "Lock wait timed out"),
            Cause::Lock(LockError::Unavailable { .. }) => {
                ("lock-service-unavailable", "Lock service unavailable")
            }
            Cause::Lock(LockError::Lost { .. }) => ("lock-lost", "Lock lost"),
            Cause::Lock(_) => ("lock-misconfigured", "Lock misconfigured"),
        }
    }
}

impl fmt::Display for LockRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cause {
            Cause::Key(e) => fmt::Display::fmt(e, f),
            Cause::Lock(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl std::error::Error for LockRejection {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.cause {
            Cause::Key(e) => Some(e),
            Cause::Lock(e) => Some(e),
        }
    }
}

/// Answered the default way (plain text, `Retry-After: 1`) until
/// [`LockResponder::reject`] says otherwise.
impl From<KeyError> for LockRejection {
    fn from(e: KeyError) -> Self {
        Self {
            cause: Cause::Key(e),
            responder: LockResponder::default(),
        }
    }
}

/// Answered the default way (plain text, `Retry-After: 1`) until
/// [`LockResponder::reject`] says otherwise.
impl From<LockError> for LockRejection {
    fn from(e: LockError) -> Self {
        Self {
            cause: Cause::Lock(e),
            responder: LockResponder::default(),
        }
    }
}

/// A [`LockError::InvalidName`]: 400.
impl From<InvalidName> for LockRejection {
    fn from(e: InvalidName) -> Self {
        LockError::from(e).into()
    }
}

/// The status a [`LockError`] answers with.
fn status_of(e: &LockError) -> StatusCode {
    match e {
        LockError::Locked { .. } | LockError::Timeout { .. } => StatusCode::LOCKED,
        LockError::InvalidName(_) => StatusCode::BAD_REQUEST,
        LockError::Unavailable { .. } | LockError::Lost { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The text a [`LockError`] answers with: the name and what happened, without
/// holder keys or backend messages (those go to the log).
fn body_text_of(e: &LockError) -> String {
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

const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
const PROBLEM_JSON: &str = "application/problem+json";

/// Rounds up to whole seconds, at least 1.
fn whole_seconds(after: Duration) -> u64 {
    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    secs.max(1)
}

/// A response with a body, its content type and an optional `Retry-After`.
fn response(
    status: StatusCode,
    content_type: &'static str,
    body: String,
    retry_after_secs: Option<u64>,
) -> Response<RejectionBody> {
    let mut response = Response::new(RejectionBody::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(secs) = retry_after_secs {
        headers.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// A `text/plain` response of one line (a newline is added).
#[cfg(feature = "axum")]
pub(crate) fn text_response(status: StatusCode, text: &str) -> Response<RejectionBody> {
    response(status, TEXT_PLAIN, format!("{text}\n"), None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// The whole body of a built-in answer (ready at once: no runtime needed).
    fn body(response: Response<RejectionBody>) -> String {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};

        let mut cx = Context::from_waker(Waker::noop());
        let mut collect = std::pin::pin!(response.into_body().collect());
        let Poll::Ready(Ok(collected)) = collect.as_mut().poll(&mut cx) else {
            panic!("a built-in body is ready at once");
        };
        String::from_utf8(collected.to_bytes().to_vec()).expect("utf-8")
    }

    fn locked() -> LockError {
        LockError::Locked {
            name: LockName::new("tenant:acme").unwrap(),
            holder: None,
        }
    }

    #[test]
    fn plain_text_ends_with_a_newline() {
        let response = LockRejection::from(locked()).default_response();
        assert_eq!(response.status(), StatusCode::LOCKED);
        assert_eq!(response.headers()[CONTENT_TYPE], TEXT_PLAIN);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        assert_eq!(
            body(response),
            "lock \"tenant:acme\" is held by another request; retry later\n"
        );
    }

    #[test]
    fn problem_details_carry_the_lock_and_retry_after() {
        let responder = LockResponder {
            format: RejectionFormat::ProblemDetails,
            retry_after: Some(Duration::from_millis(6500)),
            handler: None,
        };
        let rejection = responder.reject(locked());
        assert_eq!(rejection.retry_after(), Some(Duration::from_millis(6500)));
        assert_eq!(rejection.retry_after_secs(), Some(7));
        let response = rejection.response();
        assert_eq!(response.headers()[CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(response.headers()[RETRY_AFTER], "7");
        let json: serde_json::Value = serde_json::from_str(&body(response)).expect("JSON");
        assert_eq!(
            json,
            serde_json::json!({
                "type": format!("{}lock-held", super::super::problem::TYPE_BASE),
                "title": "Lock held",
                "status": 423,
                "detail": "lock \"tenant:acme\" is held by another request; retry later",
                "lock": "tenant:acme",
                "retry_after": 7,
            })
        );

        // A key error: no lock member, no retry.
        let rejection = responder.reject(KeyError::missing("header \"x-tenant\""));
        assert_eq!(rejection.retry_after(), None);
        let response = rejection.response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert!(response.headers().get(RETRY_AFTER).is_none());
        let json: serde_json::Value = serde_json::from_str(&body(response)).expect("JSON");
        assert_eq!(json["title"], "Invalid lock key");
        assert_eq!(
            json["detail"],
            "invalid lock key (header \"x-tenant\"): missing"
        );
        assert!(json.get("lock").is_none() && json.get("retry_after").is_none());
    }
}
