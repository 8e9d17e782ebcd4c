//! Where a request's lock name comes from: the [`KeyExtractor`] trait and the
//! built-in [`Key`].

use std::fmt;
use std::sync::Arc;

use http::request::Parts;
use http::{HeaderName, Method};

use crate::LockName;

/// Derives the lock name of a request.
///
/// Synchronous and cheap: it runs on every request before the lock is taken.
/// It gets the request head mutably only so that extractors built on axum's
/// `FromRequestParts` can run; it should not change it.
///
/// - `Ok(Some(name))`: lock `name` for this request.
/// - `Ok(None)`: this request takes no lock.
/// - `Err(e)`: answer with `e`'s status (400 for a missing or invalid key).
pub trait KeyExtractor: Clone + Send + Sync + 'static {
    /// The lock name of the request with head `parts`.
    fn extract(&self, parts: &mut Parts) -> Result<Option<LockName>, KeyError>;
}

/// Why a request has no usable lock key. Becomes the response: 400 for a
/// client's mistake (missing or invalid key), 500 for a server's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lock key ({source_desc}): {reason}")]
pub struct KeyError {
    source_desc: String,
    reason: String,
    server_fault: bool,
}

impl KeyError {
    /// The request lacks the key (400).
    pub fn missing(source: impl fmt::Display) -> Self {
        Self::bad_request(source, "missing")
    }

    /// The request's key is not acceptable (400).
    pub fn invalid(source: impl fmt::Display, reason: impl fmt::Display) -> Self {
        Self::bad_request(source, reason)
    }

    /// The key cannot be derived because of how the service is set up (500).
    pub fn misconfigured(source: impl fmt::Display, reason: impl fmt::Display) -> Self {
        Self {
            source_desc: source.to_string(),
            reason: reason.to_string(),
            server_fault: true,
        }
    }

    fn bad_request(source: impl fmt::Display, reason: impl fmt::Display) -> Self {
        Self {
            source_desc: source.to_string(),
            reason: reason.to_string(),
            server_fault: false,
        }
    }

    /// `true` when the fault is the server's (500), not the client's (400).
    pub fn is_server_fault(&self) -> bool {
        self.server_fault
    }
}

/// A mistake in building a [`Key`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyConfigError {
    /// A template must contain `{}` exactly once.
    #[error("key template {0:?} must contain \"{{}}\" exactly once")]
    BadTemplate(String),
    /// A path parameter name must not be empty.
    #[error("path parameter name is empty")]
    EmptyParamName,
}

type CustomFn = dyn Fn(&mut Parts) -> Result<Option<String>, KeyError> + Send + Sync;

#[derive(Clone)]
enum Source {
    Path,
    #[cfg(feature = "axum")]
    PathParam(Arc<str>),
    Header(HeaderName),
    Custom(Arc<CustomFn>),
}

/// The built-in [`KeyExtractor`]: a source (path, path parameter, header or a
/// function), an optional template around it, and the methods it applies to.
///
/// ```
/// use http::Method;
/// use tower_lease_lock::layer::Key;
///
/// // Lock "tenant:<id>" for the {tenant} path parameter, on unsafe methods only.
/// let key = Key::path_param("tenant")?
///     .template("tenant:{}")?
///     .unsafe_methods_only();
/// # Ok::<_, tower_lease_lock::layer::KeyConfigError>(())
/// ```
#[derive(Clone)]
pub struct Key {
    source: Source,
    template: Option<(Arc<str>, Arc<str>)>,
    methods: Methods,
    optional: bool,
}

/// Which requests a [`Key`] locks, by method.
#[derive(Clone, Debug)]
enum Methods {
    All,
    Only(Arc<[Method]>),
    /// Every method but GET, HEAD, OPTIONS and TRACE (extension methods too).
    Unsafe,
}

impl Methods {
    fn locks(&self, method: &Method) -> bool {
        match self {
            Self::All => true,
            Self::Only(list) => list.contains(method),
            Self::Unsafe => !is_safe(method),
        }
    }
}

/// GET, HEAD, OPTIONS and TRACE: the methods RFC 9110 calls safe.
pub(crate) fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

impl Key {
    fn from_source(source: Source) -> Self {
        Self {
            source,
            template: None,
            methods: Methods::All,
            optional: false,
        }
    }

    /// The whole request path (`/tenants/acme/orders`), as sent: it is not
    /// normalized, so `/a`, `/a/` and `/%61` are three names. Prefer a path
    /// parameter or a header for resources with several spellings.
    pub fn path() -> Self {
        Self::from_source(Source::Path)
    }

    /// An axum path parameter by name (`{tenant}` in the route).
    ///
    /// Install the layer with `Router::route_layer`. A request without route
    /// parameters (one that matched no route under `Router::layer`, or a
    /// layer wrapped around the whole router) and a route without this
    /// parameter answer 500: a server misconfiguration, never an unlocked
    /// request.
    #[cfg(feature = "axum")]
    pub fn path_param(name: impl Into<String>) -> Result<Self, KeyConfigError> {
        let name = name.into();
        if name.is_empty() {
            return Err(KeyConfigError::EmptyParamName);
        }
        Ok(Self::from_source(Source::PathParam(Arc::from(name))))
    }

    /// A request header by name. Its value must be UTF-8 (400 otherwise).
    pub fn header(name: HeaderName) -> Self {
        Self::from_source(Source::Header(name))
    }

    /// Any function of the request head. `Ok(None)` takes no lock.
    pub fn from_fn<F>(f: F) -> Self
    where
        F: Fn(&mut Parts) -> Result<Option<String>, KeyError> + Send + Sync + 'static,
    {
        Self::from_source(Source::Custom(Arc::new(f)))
    }

    /// Puts the extracted value into a template, at `{}`: `"tenant:{}"`.
    pub fn template(mut self, template: &str) -> Result<Self, KeyConfigError> {
        let mut pieces = template.split("{}");
        match (pieces.next(), pieces.next(), pieces.next()) {
            (Some(before), Some(after), None) => {
                self.template = Some((Arc::from(before), Arc::from(after)));
                Ok(self)
            }
            _ => Err(KeyConfigError::BadTemplate(template.to_string())),
        }
    }

    /// Prefixes the extracted value: `prefix("tenant:")` is `template("tenant:{}")`.
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.template = Some((Arc::from(prefix), Arc::from("")));
        self
    }

    /// Locks only requests with one of `methods`; others pass unlocked.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = Methods::Only(methods.into_iter().collect());
        self
    }

    /// Locks only requests with unsafe methods: every method but GET, HEAD,
    /// OPTIONS and TRACE, extension methods included.
    pub fn unsafe_methods_only(mut self) -> Self {
        self.methods = Methods::Unsafe;
        self
    }

    /// A request without the key passes unlocked instead of getting a 400.
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }

    fn describe(&self) -> String {
        match &self.source {
            Source::Path => "request path".to_string(),
            #[cfg(feature = "axum")]
            Source::PathParam(name) => format!("path parameter {name:?}"),
            Source::Header(name) => format!("header {:?}", name.as_str()),
            Source::Custom(_) => "custom key".to_string(),
        }
    }

    fn raw(&self, parts: &mut Parts) -> Result<Option<String>, KeyError> {
        match &self.source {
            Source::Path => Ok(Some(parts.uri.path().to_string())),
            #[cfg(feature = "axum")]
            Source::PathParam(name) => path_param(parts, name, || self.describe()),
            Source::Header(name) => match parts.headers.get(name) {
                None => Ok(None),
                Some(value) => std::str::from_utf8(value.as_bytes())
                    .map(|v| Some(v.to_string()))
                    .map_err(|_| KeyError::invalid(self.describe(), "not UTF-8")),
            },
            Source::Custom(f) => f(parts),
        }
    }
}

#[cfg(feature = "axum")]
fn path_param(
    parts: &mut Parts,
    name: &str,
    describe: impl Fn() -> String,
) -> Result<Option<String>, KeyError> {
    use axum::extract::{FromRequestParts, RawPathParams};
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    // RawPathParams reads the route's parameters from the extensions; its
    // future is ready at once.
    let future = RawPathParams::from_request_parts(parts, &());
    let mut future = std::pin::pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    let params = match future.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(params)) => params,
        Poll::Ready(Err(
            axum::extract::rejection::RawPathParamsRejection::InvalidUtf8InPathParam(_),
        )) => return Err(KeyError::invalid(describe(), "not valid UTF-8")),
        Poll::Ready(Err(_)) | Poll::Pending => {
            return Err(KeyError::misconfigured(
                describe(),
                "no route parameters here; install LockLayer with Router::route_layer",
                // (under Router::layer, requests matching no route get here too)
            ));
        }
    };
    let value = params
        .iter()
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_string());
    match value {
        Some(value) => Ok(Some(value)),
        None => Err(KeyError::misconfigured(
            describe(),
            "the matched route has no such parameter",
        )),
    }
}

impl KeyExtractor for Key {
    fn extract(&self, parts: &mut Parts) -> Result<Option<LockName>, KeyError> {
        if !self.methods.locks(&parts.method) {
            return Ok(None);
        }
        let raw = match self.raw(parts)? {
            Some(raw) if !raw.is_empty() => raw,
            Some(_) if self.optional => return Ok(None),
            Some(_) => return Err(KeyError::invalid(self.describe(), "empty")),
            None if self.optional => return Ok(None),
            None => return Err(KeyError::missing(self.describe())),
        };
        let full = match &self.template {
            Some((before, after)) => format!("{before}{raw}{after}"),
            None => raw,
        };
        LockName::new(full)
            .map(Some)
            .map_err(|e| KeyError::invalid(self.describe(), e))
    }
}

impl<F> KeyExtractor for F
where
    F: Fn(&mut Parts) -> Result<Option<LockName>, KeyError> + Clone + Send + Sync + 'static,
{
    fn extract(&self, parts: &mut Parts) -> Result<Option<LockName>, KeyError> {
        self(parts)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("source", &self.describe())
            .field("template", &self.template)
            .field("methods", &self.methods)
            .field("optional", &self.optional)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(method: Method, uri: &str, header: Option<&str>) -> Parts {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(h) = header {
            req = req.header("x-tenant", h);
        }
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn header_key_with_template_and_methods() {
        let key = Key::header(HeaderName::from_static("x-tenant"))
            .template("tenant:{}")
            .unwrap()
            .unsafe_methods_only();
        let got = key
            .extract(&mut parts(Method::POST, "/", Some("acme")))
            .unwrap();
        assert_eq!(got.unwrap().as_str(), "tenant:acme");
        assert_eq!(
            key.extract(&mut parts(Method::GET, "/", Some("acme")))
                .unwrap(),
            None
        );
        let err = key
            .extract(&mut parts(Method::POST, "/", None))
            .unwrap_err();
        assert_eq!(err.to_string(), "lock key (header \"x-tenant\"): missing");
        assert!(!err.is_server_fault());
    }

    #[test]
    fn hostile_keys_are_rejected() {
        let key = Key::header(HeaderName::from_static("x-tenant"));
        let long = "x".repeat(crate::MAX_NAME_LEN + 1);
        let err = key
            .extract(&mut parts(Method::POST, "/", Some(&long)))
            .unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");
        let err = key
            .extract(&mut parts(Method::POST, "/", Some("")))
            .unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }

    #[test]
    fn templates_are_checked() {
        assert!(Key::path().template("no placeholder").is_err());
        assert!(Key::path().template("{}{}").is_err());
        assert!(Key::path().template("a{}b").is_ok());
    }

    #[test]
    fn path_and_optional() {
        let got = Key::path()
            .extract(&mut parts(Method::GET, "/a/b?x=1", None))
            .unwrap();
        assert_eq!(got.unwrap().as_str(), "/a/b");
        let key = Key::header(HeaderName::from_static("x-tenant")).optional();
        assert_eq!(
            key.extract(&mut parts(Method::GET, "/", None)).unwrap(),
            None
        );
    }
}
