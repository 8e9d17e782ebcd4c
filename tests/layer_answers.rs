//! The layer's answers and logs, without etcd (a `MemoryLocker`, and a test
//! locker whose backend is down for some names): rejection handlers that
//! return axum responses and read the `Retry-After`, problem details, lock
//! errors reported by handlers answered exactly as the layer answers,
//! `LockedBody` under tower-http's `TimeoutLayer`, and what the layer logs
//! (`held_ms` from acquisition, one WARN per failed request).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::timeout::TimeoutLayer;
use tower_lease_lock::axum::HeldLock;
use tower_lease_lock::layer::{Key, LockLayer, LockRejection, LockResponder};
use tower_lease_lock::{LockError, LockGuard, LockMode, LockName, Locker, MemoryLocker, Wait};

/// The bound on anything that should happen at once.
const SOON: Duration = Duration::from_secs(10);
/// The text of the backend error behind every "down" name: long, like a
/// gRPC status, and never meant for clients or WARN lines.
const BACKEND_ERROR: &str = "status: Unavailable, message: \"error trying to connect: tcp connect \
    error: Connection refused (os error 111)\", details: [], metadata: MetadataMap { headers: {} }";

fn name(s: &str) -> LockName {
    LockName::new(s).expect("valid lock name")
}

fn tenant_key() -> Key {
    Key::path_param("tenant")
        .and_then(|key| key.template("tenant:{}"))
        .expect("tenant key")
}

/// A `MemoryLocker` whose backend is down for names starting with
/// `tenant:down`: those fail with [`LockError::Unavailable`] as the etcd
/// backend reports a failed request (`"etcd txn failed: {source}"`).
#[derive(Clone, Default)]
struct PartlyDown(MemoryLocker);

impl Locker for PartlyDown {
    fn lock(
        &self,
        name: &LockName,
        mode: LockMode,
        wait: Wait,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        let (locker, name) = (self.0.clone(), name.clone());
        async move {
            if name.as_str().starts_with("tenant:down") {
                let source = std::io::Error::other(BACKEND_ERROR);
                return Err(LockError::unavailable(
                    format!("etcd txn failed: {source}"),
                    source,
                ));
            }
            locker.lock(&name, mode, wait).await
        }
    }
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: impl header::AsHeaderName) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ascii header"))
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// Status, content type and `Retry-After`: what two answers of one
    /// route must share.
    fn head(&self) -> (StatusCode, Option<&str>, Option<&str>) {
        (
            self.status,
            self.header(header::CONTENT_TYPE),
            self.header(header::RETRY_AFTER),
        )
    }
}

async fn read(response: Response) -> Answer {
    let (parts, body) = response.into_parts();
    let bytes = tokio::time::timeout(SOON, body.collect())
        .await
        .expect("the body ends soon")
        .expect("read body")
        .to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8(bytes.to_vec()).expect("utf-8 body"),
    }
}

async fn send(app: &Router, request: Request<Body>) -> Answer {
    let response = tokio::time::timeout(SOON, app.clone().oneshot(request))
        .await
        .expect("an answer soon");
    match response {
        Ok(response) => read(response).await,
        Err(never) => match never {},
    }
}

async fn post_to(app: &Router, uri: &str) -> Answer {
    let request = Request::post(uri).body(Body::empty()).expect("request");
    send(app, request).await
}

async fn ok(lock: HeldLock) -> String {
    format!("{} token={}", lock.name(), lock.token())
}

// ---------------------------------------------------------------------------
// 1. A rejection handler returns an axum response and reads the Retry-After
// ---------------------------------------------------------------------------

fn axum_json_rejection(rejection: &LockRejection) -> Response {
    let status = match rejection.status() {
        StatusCode::LOCKED => StatusCode::TOO_MANY_REQUESTS,
        other => other,
    };
    let body = Json(json!({
        "error": rejection.body_text(),
        "lock": rejection.lock_name().map(LockName::as_str),
        "retry_after_ms": rejection.retry_after().map(|d| d.as_millis() as u64),
    }));
    match rejection.retry_after_secs() {
        Some(secs) => (status, [(header::RETRY_AFTER, secs)], body).into_response(),
        None => (status, body).into_response(),
    }
}

#[tokio::test]
async fn rejection_handler_returns_an_axum_response() {
    let locker = MemoryLocker::new();
    let layer = LockLayer::new(locker.clone(), tenant_key())
        .retry_after(Duration::from_millis(6500))
        .rejection_handler(axum_json_rejection);
    assert!(layer.responder().has_rejection_handler());
    let app = Router::new()
        .route("/tenants/{tenant}", post(ok))
        .route_layer(layer);

    let held = locker
        .try_acquire(&name("tenant:acme"))
        .await
        .expect("hold acme");
    let refused = post_to(&app, "/tenants/acme").await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.body
    );
    assert_eq!(
        refused.header(header::CONTENT_TYPE),
        Some("application/json")
    );
    assert_eq!(refused.header(header::RETRY_AFTER), Some("7"));
    assert_eq!(
        refused.json(),
        json!({
            "error": "lock \"tenant:acme\" is held by another request; retry later",
            "lock": "tenant:acme",
            "retry_after_ms": 6500,
        })
    );

    // A key error: no Retry-After to read.
    let by_header = Router::new()
        .route("/orders", post(|| async { "handled" }))
        .route_layer(
            LockLayer::new(
                locker.clone(),
                Key::header(HeaderName::from_static("x-tenant")),
            )
            .retry_after(Duration::from_secs(7))
            .rejection_handler(axum_json_rejection),
        );
    let missing = post_to(&by_header, "/orders").await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(missing.header(header::RETRY_AFTER), None);
    assert_eq!(missing.json()["retry_after_ms"], Value::Null);
    assert_eq!(missing.json()["lock"], Value::Null);

    held.release().await.expect("release");
    let after = post_to(&app, "/tenants/acme").await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.body);
}

/// A handler can keep the built-in answer for some rejections.
#[tokio::test]
async fn rejection_handler_falls_back_on_the_default_response() {
    let locker = MemoryLocker::new();
    let app = Router::new()
        .route("/tenants/{tenant}", post(ok))
        .route_layer(
            LockLayer::new(locker.clone(), tenant_key())
                .problem_details()
                .rejection_handler(|rejection: &LockRejection| match rejection.status() {
                    StatusCode::LOCKED => (StatusCode::CONFLICT, "busy\n").into_response(),
                    _ => rejection.default_response().into_response(),
                }),
        );
    let _held = locker
        .try_acquire(&name("tenant:acme"))
        .await
        .expect("hold acme");
    let busy = post_to(&app, "/tenants/acme").await;
    assert_eq!(
        (busy.status, busy.body.as_str()),
        (StatusCode::CONFLICT, "busy\n")
    );
    let invalid = post_to(&app, "/tenants/ac%09me").await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST, "{}", invalid.body);
    assert_eq!(
        invalid.header(header::CONTENT_TYPE),
        Some("application/problem+json")
    );
    assert!(invalid.json()["detail"]
        .as_str()
        .unwrap()
        .contains("control character"));
}

// ---------------------------------------------------------------------------
// 2. Problem details
// ---------------------------------------------------------------------------

const TYPES: &str =
    "https://docs.rs/tower-lease-lock/latest/tower_lease_lock/layer/enum.RejectionFormat.html#";

fn assert_problem(answer: &Answer, status: u16, kind: &str, title: &str) -> Value {
    assert_eq!(answer.status.as_u16(), status, "{}", answer.body);
    assert_eq!(
        answer.header(header::CONTENT_TYPE),
        Some("application/problem+json")
    );
    assert!(answer.body.ends_with("}\n"), "{:?}", answer.body);
    let json = answer.json();
    assert_eq!(json["type"], format!("{TYPES}{kind}"), "{json}");
    assert_eq!(json["title"], title, "{json}");
    assert_eq!(json["status"], status, "{json}");
    assert!(json["detail"].is_string(), "{json}");
    match answer.header(header::RETRY_AFTER) {
        Some(secs) => assert_eq!(json["retry_after"].to_string(), secs, "{json}"),
        None => assert!(json.get("retry_after").is_none(), "{json}"),
    }
    json
}

#[tokio::test]
async fn problem_details_for_every_rejection() {
    let locker = PartlyDown::default();
    let layer = LockLayer::new(locker.clone(), tenant_key())
        .problem_details()
        .retry_after(Duration::from_secs(7));
    // (route_layer wraps the routes added before it: one router per layer)
    let app = Router::new()
        .route("/tenants/{tenant}", post(ok))
        .route_layer(layer.clone().wait(Duration::from_millis(50)))
        .merge(
            Router::new()
                .route("/try/{tenant}", post(ok))
                .route_layer(layer),
        )
        .merge(
            Router::new()
                .route("/orders", post(|| async { "handled" }))
                .route_layer(
                    LockLayer::new(
                        locker.clone(),
                        Key::header(HeaderName::from_static("x-tenant")),
                    )
                    .problem_details(),
                ),
        );

    let _held = locker
        .0
        .try_acquire(&name("tenant:acme"))
        .await
        .expect("hold acme");
    let held = post_to(&app, "/try/acme").await;
    let json = assert_problem(&held, 423, "lock-held", "Lock held");
    assert_eq!(held.header(header::RETRY_AFTER), Some("7"));
    assert_eq!(json["lock"], "tenant:acme");
    assert_eq!(
        json["detail"],
        "lock \"tenant:acme\" is held by another request; retry later"
    );

    let waited = post_to(&app, "/tenants/acme").await;
    let json = assert_problem(&waited, 423, "lock-wait-timeout", "Lock wait timed out");
    assert_eq!(json["lock"], "tenant:acme");

    let down = post_to(&app, "/try/down").await;
    let json = assert_problem(
        &down,
        503,
        "lock-service-unavailable",
        "Lock service unavailable",
    );
    assert_eq!(down.header(header::RETRY_AFTER), Some("7"));
    assert_eq!(json["detail"], "lock service unavailable; retry later");
    assert!(json.get("lock").is_none(), "{json}");
    assert!(
        !down.body.contains("Connection refused"),
        "leaks: {}",
        down.body
    );

    let missing = post_to(&app, "/orders").await;
    let json = assert_problem(&missing, 400, "invalid-lock-key", "Invalid lock key");
    assert_eq!(
        json["detail"],
        "invalid lock key (header \"x-tenant\"): missing"
    );
    assert!(json.get("lock").is_none(), "{json}");

    // A key with quotes and a backslash in it comes back intact.
    let odd = post_to(&app, "/try/%22a%5Cb%22").await;
    assert_eq!(odd.status, StatusCode::OK, "{}", odd.body);
    let _odd = locker
        .0
        .try_acquire(&name("tenant:\"a\\b\""))
        .await
        .expect("hold");
    let refused = post_to(&app, "/try/%22a%5Cb%22").await;
    let json = assert_problem(&refused, 423, "lock-held", "Lock held");
    assert_eq!(json["lock"], "tenant:\"a\\b\"");
}

#[tokio::test]
async fn plain_text_answers_end_with_a_newline() {
    let locker = PartlyDown::default();
    let app = Router::new()
        .route("/tenants/{tenant}", post(ok))
        .route_layer(LockLayer::new(locker.clone(), tenant_key()));
    let _held = locker
        .0
        .try_acquire(&name("tenant:acme"))
        .await
        .expect("hold acme");
    for (uri, status, text) in [
        (
            "/tenants/acme",
            StatusCode::LOCKED,
            "lock \"tenant:acme\" is held by another request; retry later\n",
        ),
        (
            "/tenants/down",
            StatusCode::SERVICE_UNAVAILABLE,
            "lock service unavailable; retry later\n",
        ),
    ] {
        let answer = post_to(&app, uri).await;
        assert_eq!(
            answer.head(),
            (status, Some("text/plain; charset=utf-8"), Some("1")),
            "{uri}"
        );
        assert_eq!(answer.body, text, "{uri}");
    }
}

// ---------------------------------------------------------------------------
// 3. A lock error reported by a handler answers as the route's layer does
// ---------------------------------------------------------------------------

/// `POST /tenants/{tenant}/second`: takes a second lock (`tenant:second`)
/// by itself; `POST /tenants/{tenant}/lost`: its write under the lock failed
/// because the lock was lost (what a failed `txn_if_held` reports).
fn handlers_reporting_lock_errors() -> Router<PartlyDown> {
    async fn second(
        lock: HeldLock,
        responder: LockResponder,
        State(locker): State<PartlyDown>,
    ) -> Result<String, LockRejection> {
        let name = LockName::new("tenant:second").map_err(|e| responder.reject(e))?;
        let guard = locker
            .try_acquire(&name)
            .await
            .map_err(|e| responder.reject(e))?;
        Ok(format!("{} and {} held", lock.name(), guard.name()))
    }

    async fn lost(lock: HeldLock, responder: LockResponder) -> Result<String, LockRejection> {
        let write = Err(LockError::Lost {
            name: lock.name().clone(),
            reason: "the lease expired".into(),
        });
        write.map_err(|e| responder.reject(e))
    }

    Router::new()
        .route("/tenants/{tenant}/second", post(second))
        .route("/tenants/{tenant}/lost", post(lost))
}

#[tokio::test]
async fn handler_lock_errors_answer_like_the_layer() {
    let locker = PartlyDown::default();
    let app = handlers_reporting_lock_errors()
        .route_layer(
            LockLayer::new(locker.clone(), tenant_key())
                .problem_details()
                .retry_after(Duration::from_secs(7)),
        )
        .with_state(locker.clone());

    // 503: the layer's (backend down) and the handler's (lock lost).
    let by_layer = post_to(&app, "/tenants/down/lost").await;
    let by_handler = post_to(&app, "/tenants/acme/lost").await;
    assert_eq!(
        by_handler.head(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("application/problem+json"),
            Some("7")
        ),
        "{}",
        by_handler.body
    );
    assert_eq!(by_handler.head(), by_layer.head());
    let json = assert_problem(&by_handler, 503, "lock-lost", "Lock lost");
    assert_eq!(json["lock"], "tenant:acme");
    assert_eq!(json["retry_after"], 7);

    // 423: the layer's (acme held) and the handler's (its second lock held).
    let second = locker
        .0
        .try_acquire(&name("tenant:second"))
        .await
        .expect("hold");
    let by_handler = post_to(&app, "/tenants/beta/second").await;
    let held = locker
        .0
        .try_acquire(&name("tenant:acme"))
        .await
        .expect("hold");
    let by_layer = post_to(&app, "/tenants/acme/second").await;
    assert_eq!(by_handler.head(), by_layer.head());
    assert_eq!(
        by_handler.head(),
        (
            StatusCode::LOCKED,
            Some("application/problem+json"),
            Some("7")
        )
    );
    assert_problem(&by_handler, 423, "lock-held", "Lock held");
    assert_eq!(by_handler.json()["lock"], "tenant:second");
    assert_eq!(by_layer.json()["lock"], "tenant:acme");

    drop((second, held));
    let both = post_to(&app, "/tenants/beta/second").await;
    assert_eq!(both.status, StatusCode::OK, "{}", both.body);
    assert_eq!(both.body, "tenant:beta and tenant:second held");
}

/// The same handlers with a rejection handler on the layer: theirs goes
/// through it too. Without a layer, the responder is the default one, the
/// answer of `LockError`'s own `IntoResponse`.
#[tokio::test]
async fn handler_lock_errors_follow_the_rejection_handler_or_the_default() {
    let locker = PartlyDown::default();
    let app = handlers_reporting_lock_errors()
        .route_layer(
            LockLayer::new(locker.clone(), tenant_key())
                .retry_after(Duration::from_secs(3))
                .rejection_handler(axum_json_rejection),
        )
        .with_state(locker.clone());
    let by_handler = post_to(&app, "/tenants/acme/lost").await;
    let by_layer = post_to(&app, "/tenants/down/lost").await;
    assert_eq!(by_handler.head(), by_layer.head());
    assert_eq!(
        by_handler.head(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("application/json"),
            Some("3")
        )
    );
    assert_eq!(by_handler.json()["retry_after_ms"], 3000);

    let bare = handlers_reporting_lock_errors().with_state(locker.clone());
    let unlocked = Router::new()
        .route(
            "/lost",
            post(|| async {
                LockError::Lost {
                    name: name("tenant:acme"),
                    reason: "gone".into(),
                }
            }),
        )
        .merge(bare.route_layer(axum::middleware::from_fn(
            // No LockLayer: the handlers' HeldLock comes from a test lock.
            move |mut request: Request<Body>, next: axum::middleware::Next| {
                let locker = locker.0.clone();
                async move {
                    let guard = locker
                        .try_acquire(&name("tenant:bare"))
                        .await
                        .expect("lock");
                    request.extensions_mut().insert(guard.info().clone());
                    let response = next.run(request).await;
                    drop(guard);
                    response
                }
            },
        )));
    let by_handler = post_to(&unlocked, "/tenants/acme/lost").await;
    let by_into_response = post_to(&unlocked, "/lost").await;
    assert_eq!(
        by_handler.head(),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("text/plain; charset=utf-8"),
            Some("1")
        )
    );
    assert_eq!(by_handler.head(), by_into_response.head());
    assert_eq!(
        by_handler.body,
        "lock \"tenant:bare\" was lost; retry later\n"
    );
    assert_eq!(
        by_into_response.body,
        "lock \"tenant:acme\" was lost; retry later\n"
    );
}

// ---------------------------------------------------------------------------
// 4. tower-http's TimeoutLayer directly outside LockLayer
// ---------------------------------------------------------------------------

#[tokio::test]
async fn timeout_layer_outside_lock_layer() {
    let locker = MemoryLocker::new();
    let never = Arc::new(Notify::new());
    let service = ServiceBuilder::new()
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(200),
        ))
        .layer(LockLayer::new(
            locker.clone(),
            Key::header(HeaderName::from_static("x-tenant")),
        ))
        .service_fn(move |request: Request<Body>| {
            let never = Arc::clone(&never);
            async move {
                if request.uri().path() == "/slow" {
                    never.notified().await; // answers only when timed out
                }
                Ok::<_, Infallible>(Response::new(Body::from("done")))
            }
        });
    let call = |path: &'static str| {
        let service = service.clone();
        async move {
            let request = Request::builder()
                .method(Method::POST)
                .uri(path)
                .header("x-tenant", "acme")
                .body(Body::empty())
                .expect("request");
            let response = tokio::time::timeout(SOON, service.oneshot(request))
                .await
                .expect("an answer soon")
                .expect("infallible");
            let holds_lock = response.body().holds_lock();
            (holds_lock, read(response.map(Body::new)).await)
        }
    };

    let (held, fast) = call("/fast").await;
    assert!(held, "the handler's answer holds the lock until its end");
    assert_eq!((fast.status, fast.body.as_str()), (StatusCode::OK, "done"));
    let (held, slow) = call("/slow").await;
    assert!(
        !held,
        "TimeoutLayer's answer (LockedBody::default) holds no lock"
    );
    assert_eq!(slow.status, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(slow.body, "");
    // The timed-out request's lock went with its future.
    let guard = locker
        .try_acquire(&name("acme"))
        .await
        .expect("acme is free");
    drop(guard);
    let (_, again) = call("/fast").await;
    assert_eq!(again.status, StatusCode::OK);
}

// ---------------------------------------------------------------------------
// 5. What the layer logs
// ---------------------------------------------------------------------------

mod capture {
    use std::collections::BTreeMap;
    use std::fmt;
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing::{Event, Level, Subscriber};
    use tracing_subscriber::layer::Context;
    use tracing_subscriber::Layer;

    /// One event: its level and fields (`message` included), as text.
    #[derive(Debug, Clone)]
    pub struct Captured {
        pub level: Level,
        pub fields: BTreeMap<String, String>,
    }

    impl Captured {
        pub fn message(&self) -> &str {
            self.fields.get("message").map_or("", String::as_str)
        }
    }

    /// A layer that keeps every event.
    #[derive(Clone, Default)]
    pub struct Events(pub Arc<Mutex<Vec<Captured>>>);

    struct Fields<'a>(&'a mut BTreeMap<String, String>);

    impl Visit for Fields<'_> {
        fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
            self.0
                .insert(field.name().to_string(), format!("{value:?}"));
        }
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0.insert(field.name().to_string(), value.to_string());
        }
        fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
            let mut text = value.to_string();
            let mut source = value.source();
            while let Some(cause) = source {
                text.push_str(&format!(" <- {cause}"));
                source = cause.source();
            }
            self.0.insert(field.name().to_string(), text);
        }
    }

    impl<S: Subscriber> Layer<S> for Events {
        fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
            let mut fields = BTreeMap::new();
            event.record(&mut Fields(&mut fields));
            let level = *event.metadata().level();
            self.0.lock().unwrap().push(Captured { level, fields });
        }
    }

    impl Events {
        pub fn taken(&self) -> Vec<Captured> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }
}

/// Collects the events of this thread (the tests run on a current-thread
/// runtime) until the guard drops.
fn capture_events() -> (capture::Events, tracing::subscriber::DefaultGuard) {
    use tracing_subscriber::layer::SubscriberExt;
    let events = capture::Events::default();
    let subscriber = tracing_subscriber::registry().with(events.clone());
    (events, tracing::subscriber::set_default(subscriber))
}

/// `held_ms` counts from the acquisition: the handler's time is in it.
#[tokio::test]
async fn held_ms_counts_from_the_acquisition() {
    const HOLD: Duration = Duration::from_millis(300);
    let (events, _guard) = capture_events();
    let app = Router::new()
        .route(
            "/tenants/{tenant}",
            post(|| async {
                tokio::time::sleep(HOLD).await;
                "held"
            }),
        )
        .route_layer(LockLayer::new(MemoryLocker::new(), tenant_key()));

    let t0 = Instant::now();
    let answer = post_to(&app, "/tenants/acme").await;
    let elapsed = t0.elapsed();
    assert_eq!(answer.status, StatusCode::OK);
    let released: Vec<_> = events
        .taken()
        .into_iter()
        .filter(|e| e.message() == "lock released")
        .collect();
    assert_eq!(released.len(), 1, "{released:?}");
    let held_ms: f64 = released[0].fields["held_ms"]
        .parse()
        .expect("numeric held_ms");
    assert!(
        held_ms >= HOLD.as_millis() as f64,
        "held_ms {held_ms} < the handler's {HOLD:?}"
    );
    assert!(
        held_ms <= elapsed.as_secs_f64() * 1e3,
        "held_ms {held_ms} > the request's {elapsed:?}"
    );
}

/// A backend that is down: one WARN per request, with a short message; the
/// backend's own error text only at DEBUG.
#[tokio::test]
async fn one_short_warn_per_failed_request() {
    const REQUESTS: usize = 3;
    let (events, _guard) = capture_events();
    let app = Router::new()
        .route("/tenants/{tenant}", post(ok))
        .route_layer(LockLayer::new(PartlyDown::default(), tenant_key()));

    for i in 0..REQUESTS {
        let answer = post_to(&app, &format!("/tenants/down-{i}")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let captured = events.taken();
    let warns: Vec<_> = captured
        .iter()
        .filter(|e| e.level <= tracing::Level::WARN)
        .collect();
    assert_eq!(warns.len(), REQUESTS, "{warns:#?}");
    for (i, warn) in warns.iter().enumerate() {
        assert_eq!(warn.level, tracing::Level::WARN);
        assert_eq!(warn.message(), "lock not acquired");
        assert_eq!(warn.fields["lock.name"], format!("tenant:down-{i}"));
        assert_eq!(warn.fields["lock.outcome"], "unavailable");
        assert_eq!(
            warn.fields["error"],
            "lock backend unavailable: etcd txn failed"
        );
        let line: String = warn.fields.values().cloned().collect();
        assert!(!line.contains("Connection refused"), "{warn:?}");
    }
    let details: Vec<&BTreeMap<String, String>> = captured
        .iter()
        .filter(|e| e.level == tracing::Level::DEBUG && e.message() == "lock not acquired: details")
        .map(|e| &e.fields)
        .collect();
    assert_eq!(details.len(), REQUESTS);
    assert!(
        details[0]["error"].contains("Connection refused"),
        "{details:?}"
    );

    // Contention is not worth a WARN.
    let locker = MemoryLocker::new();
    let app = Router::new()
        .route("/tenants/{tenant}", post(ok))
        .route_layer(LockLayer::new(locker.clone(), tenant_key()));
    let _held = locker
        .try_acquire(&name("tenant:acme"))
        .await
        .expect("hold");
    assert_eq!(
        post_to(&app, "/tenants/acme").await.status,
        StatusCode::LOCKED
    );
    let captured = events.taken();
    assert!(
        captured.iter().all(|e| e.level > tracing::Level::WARN),
        "{captured:#?}"
    );
    assert!(
        captured.iter().any(|e| e.message() == "lock contended"),
        "{captured:#?}"
    );
}
