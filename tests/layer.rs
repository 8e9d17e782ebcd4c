//! `LockLayer` and the axum integration against a real etcd: exclusion across
//! two services, 423 in try mode and after a bounded wait, 400 for bad keys,
//! 503 while etcd is down or frozen, the lock held until the response body
//! ends (and released when the body, the response future or a panicking
//! handler goes away), fencing tokens, handlers that lock by themselves,
//! misconfigured keys, and custom rejections.
//!
//! Every test starts its own etcd (killed when dropped) and ends with no key
//! left under the test namespace.

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use common::body::ChannelBody;
use common::*;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Barrier, Notify};
use tower::ServiceExt;
use tower_http::catch_panic::CatchPanicLayer;
use tower_lease_lock::axum::HeldLock;
use tower_lease_lock::etcd::EtcdLocker;
use tower_lease_lock::testing::EtcdServer;
use tower_lease_lock::{Key, LockError, LockLayer, LockName, Locker};

/// The bound on anything that should happen "soon" (a request that is not
/// supposed to wait, a handler that should start).
const SOON: Duration = Duration::from_secs(10);
/// How quickly a released lock's key must vanish from etcd.
const RELEASE_BOUND: Duration = Duration::from_secs(2);

fn name(s: &str) -> LockName {
    LockName::new(s).expect("valid lock name")
}

fn tenant_key() -> Key {
    Key::path_param("tenant").expect("path_param key")
}

/// `fut`, or a panic naming `what` after [`SOON`].
async fn soon<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(SOON, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {SOON:?}"))
}

fn request(method: Method, uri: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .expect("request")
}

/// Sends a request through the router in process (no network).
async fn call(app: &Router, method: Method, uri: &str) -> axum::response::Response {
    let response = app.clone().oneshot(request(method, uri));
    match soon(&format!("the response to {uri}"), response).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// Status, headers and the whole body (read to its end, which releases the
/// lock the body holds).
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
}

async fn read(response: axum::response::Response) -> Answer {
    let (parts, body) = response.into_parts();
    let bytes = soon("the end of the response body", body.collect())
        .await
        .expect("read body")
        .to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8(bytes.to_vec()).expect("utf-8 body"),
    }
}

async fn post_read(app: &Router, uri: &str) -> Answer {
    read(call(app, Method::POST, uri).await).await
}

/// Keys in etcd under the lock of `tenant`.
async fn lock_keys(etcd: &EtcdServer, locker: &EtcdLocker, tenant: &str) -> Vec<String> {
    keys_under(etcd, &locker.key_prefix(&name(tenant))).await
}

/// Waits until the lock of `tenant` has exactly `n` keys in etcd.
async fn wait_for_lock_keys(etcd: &EtcdServer, locker: &EtcdLocker, tenant: &str, n: usize) {
    eventually(&format!("{n} lock keys for {tenant}"), SOON, || async {
        lock_keys(etcd, locker, tenant).await.len() == n
    })
    .await;
}

/// Waits (at most [`RELEASE_BOUND`]) until the locker has no key left, in etcd
/// or in its own books, for `tenant`.
async fn wait_released(etcd: &EtcdServer, locker: &EtcdLocker, tenant: &str) {
    eventually(
        &format!("the lock of {tenant} released"),
        RELEASE_BOUND,
        || async { locker.own_keys() == 0 && lock_keys(etcd, locker, tenant).await.is_empty() },
    )
    .await;
}

fn assert_locked(answer: &Answer, tenant: &str) {
    assert_eq!(answer.status, StatusCode::LOCKED, "body: {}", answer.body);
    assert_eq!(answer.header(header::RETRY_AFTER), Some("1"));
    assert_eq!(
        answer.header(header::CONTENT_TYPE),
        Some("text/plain; charset=utf-8")
    );
    assert!(
        answer.body.contains(&format!("{tenant:?}")),
        "body does not name the lock: {:?}",
        answer.body
    );
}

// ---------------------------------------------------------------------------
// Handlers shared by the tests
// ---------------------------------------------------------------------------

/// Lets the test see a handler start and decide when it may finish.
struct Gate {
    started: mpsc::UnboundedSender<String>,
    release: Notify,
    released: AtomicBool,
    calls: AtomicUsize,
    stream: Mutex<Option<mpsc::Receiver<Bytes>>>,
}

impl Gate {
    fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<String>) {
        let (started, rx) = mpsc::unbounded_channel();
        let gate = Arc::new(Self {
            started,
            release: Notify::new(),
            released: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
            stream: Mutex::new(None),
        });
        (gate, rx)
    }

    /// Called by a handler: reports `what`, then waits for [`Gate::open`].
    async fn enter(&self, what: String) {
        self.calls.fetch_add(1, SeqCst);
        let _ = self.started.send(what);
        self.release.notified().await;
    }

    /// Lets one waiting (or the next) handler finish.
    fn open(&self) {
        self.released.store(true, SeqCst);
        self.release.notify_one();
    }
}

/// `POST /tenants/{tenant}/hold`: blocks until the gate opens.
async fn hold(State(gate): State<Arc<Gate>>, Path(tenant): Path<String>) -> String {
    gate.enter(tenant.clone()).await;
    format!("released {tenant}")
}

/// `POST /tenants/{tenant}/quick`: answers at once with the held lock.
async fn quick(State(gate): State<Arc<Gate>>, lock: HeldLock) -> String {
    gate.calls.fetch_add(1, SeqCst);
    format!(
        "{} token={} released={}",
        lock.name(),
        lock.token(),
        gate.released.load(SeqCst)
    )
}

/// `POST /tenants/{tenant}/stream`: a body the test writes through the gate's
/// channel.
async fn stream(State(gate): State<Arc<Gate>>) -> Body {
    let rx = gate
        .stream
        .lock()
        .unwrap()
        .take()
        .expect("the test set up a stream");
    Body::new(ChannelBody(rx))
}

/// The routes above behind `layer`, plus the gate as state.
fn gated_app(layer: LockLayer<EtcdLocker, Key>, gate: &Arc<Gate>) -> Router {
    Router::new()
        .route("/tenants/{tenant}/hold", post(hold))
        .route("/tenants/{tenant}/quick", post(quick))
        .route("/tenants/{tenant}/stream", post(stream))
        .route_layer(layer)
        .with_state(Arc::clone(gate))
}

/// Starts `uri` in a task and waits until its handler reports it started.
async fn start_holding(
    app: &Router,
    uri: &str,
    started: &mut mpsc::UnboundedReceiver<String>,
) -> tokio::task::JoinHandle<Answer> {
    let task = tokio::spawn({
        let (app, uri) = (app.clone(), uri.to_string());
        async move { post_read(&app, &uri).await }
    });
    soon("the holding handler to start", started.recv())
        .await
        .expect("gate sender alive");
    task
}

// ---------------------------------------------------------------------------
// 1. Two services serialize one tenant; different tenants run in parallel
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Counter {
    value: AtomicU64,
    inside: AtomicUsize,
    overlaps: AtomicUsize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_serialize_same_tenant() {
    const REQUESTS: usize = 40;

    let etcd = etcd().await;
    let counter = Arc::new(Counter::default());
    let barrier = Arc::new(Barrier::new(2));
    let service = |locker: EtcdLocker| {
        let counter = Arc::clone(&counter);
        let barrier = Arc::clone(&barrier);
        Router::new()
            .route(
                "/tenants/{tenant}/increment",
                post(move || async move {
                    if counter.inside.fetch_add(1, SeqCst) != 0 {
                        counter.overlaps.fetch_add(1, SeqCst);
                    }
                    // A deliberately non-atomic read-modify-write.
                    let value = counter.value.load(SeqCst);
                    tokio::task::yield_now().await;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    counter.value.store(value + 1, SeqCst);
                    counter.inside.fetch_sub(1, SeqCst);
                    "incremented"
                }),
            )
            .route(
                "/tenants/{tenant}/meet",
                // Passes only if the other tenant's handler runs at the same time.
                post(move || async move {
                    match tokio::time::timeout(SOON, barrier.wait()).await {
                        Ok(_) => (StatusCode::OK, "met"),
                        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "alone"),
                    }
                }),
            )
            .route_layer(LockLayer::new(locker, tenant_key()).wait(Duration::from_secs(10)))
    };
    let a_locker = locker(&etcd, 10).await;
    let a = service(a_locker.clone());
    let b = service(locker(&etcd, 10).await);

    let started = Instant::now();
    let mut requests = Vec::new();
    for i in 0..REQUESTS {
        let app = if i % 2 == 0 { a.clone() } else { b.clone() };
        requests.push(tokio::spawn(async move {
            let answer = post_read(&app, "/tenants/acme/increment").await;
            (answer.status, answer.body)
        }));
    }
    for request in requests {
        let (status, body) = request.await.expect("request task");
        assert_eq!(status, StatusCode::OK, "body: {body}");
    }
    println!("{REQUESTS} serialized requests in {:?}", started.elapsed());
    assert_eq!(counter.overlaps.load(SeqCst), 0, "two handlers overlapped");
    assert_eq!(counter.value.load(SeqCst), REQUESTS as u64, "lost updates");

    // Different tenants: each handler waits for the other inside its lock.
    let t1 = tokio::spawn({
        let a = a.clone();
        async move { post_read(&a, "/tenants/t1/meet").await }
    });
    let t2 = tokio::spawn({
        let b = b.clone();
        async move { post_read(&b, "/tenants/t2/meet").await }
    });
    for (tenant, task) in [("t1", t1), ("t2", t2)] {
        let answer = soon("the meeting", task).await.expect("request task");
        assert_eq!(answer.status, StatusCode::OK, "{tenant}: {}", answer.body);
        assert_eq!(answer.body, "met");
    }

    wait_released(&etcd, &a_locker, "acme").await;
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 2. Try mode: 423 with Retry-After at once, 200 once the holder finished
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_mode_423_with_retry_after() {
    let etcd = etcd().await;
    let locker_a = locker(&etcd, 10).await;
    let (gate, mut started) = Gate::new();
    let a = gated_app(LockLayer::new(locker_a.clone(), tenant_key()), &gate);
    // The same routes on a second locker (own client): contention seen in etcd,
    // not only in the first locker's books.
    let locker_b = locker(&etcd, 10).await;
    let b = gated_app(LockLayer::new(locker_b.clone(), tenant_key()), &gate);

    let holder = start_holding(&a, "/tenants/acme/hold", &mut started).await;
    assert_eq!(lock_keys(&etcd, &locker_a, "acme").await.len(), 1);

    for app in [&a, &b] {
        let t0 = Instant::now();
        let refused = post_read(app, "/tenants/acme/quick").await;
        assert_locked(&refused, "acme");
        assert!(
            refused.body.contains("held by another request"),
            "{}",
            refused.body
        );
        assert!(t0.elapsed() < Duration::from_secs(2), "try mode waited");
    }
    // Only the holder's handler ran.
    assert_eq!(gate.calls.load(SeqCst), 1);
    // Another tenant is not affected.
    let other = post_read(&b, "/tenants/other/quick").await;
    assert_eq!(other.status, StatusCode::OK, "{}", other.body);

    gate.open();
    let held = soon("the holder's answer", holder).await.expect("task");
    assert_eq!(held.status, StatusCode::OK);
    assert_eq!(held.body, "released acme");

    wait_released(&etcd, &locker_a, "acme").await;
    let after = post_read(&b, "/tenants/acme/quick").await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.body);
    // b's release runs in the background: a sees acme free once it is done.
    wait_released(&etcd, &locker_b, "acme").await;
    let after = post_read(&a, "/tenants/acme/quick").await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.body);

    wait_released(&etcd, &locker_a, "acme").await;
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 3. Wait mode: queue behind the holder; give up after the wait with 423
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_mode() {
    let etcd = etcd().await;
    let locker_a = locker(&etcd, 10).await;
    let locker_b = locker(&etcd, 10).await;

    // (a) Waiting up to 5 s: the second request runs once the holder is done.
    let (gate, mut started) = Gate::new();
    let a = gated_app(
        LockLayer::new(locker_a.clone(), tenant_key()).wait(Duration::from_secs(5)),
        &gate,
    );
    let b = gated_app(
        LockLayer::new(locker_b.clone(), tenant_key()).wait(Duration::from_secs(5)),
        &gate,
    );
    let holder = start_holding(&a, "/tenants/acme/hold", &mut started).await;
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { post_read(&b, "/tenants/acme/quick").await }
    });
    // The waiter is in line in etcd...
    wait_for_lock_keys(&etcd, &locker_a, "acme", 2).await;
    // ...and stays there while the holder holds (the subject is time here).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the waiter answered while held");
    assert_eq!(gate.calls.load(SeqCst), 1, "the waiter's handler ran");

    gate.open();
    let held = soon("the holder's answer", holder).await.expect("task");
    assert_eq!(held.status, StatusCode::OK);
    let waited = soon("the waiter's answer", waiter).await.expect("task");
    assert_eq!(waited.status, StatusCode::OK, "{}", waited.body);
    assert!(
        waited.body.ends_with("released=true"),
        "the waiter ran before the holder was released: {}",
        waited.body
    );
    wait_released(&etcd, &locker_a, "acme").await;
    wait_released(&etcd, &locker_b, "acme").await;

    // (b) Waiting up to 300 ms behind a holder that stays: 423.
    let (gate, mut started) = Gate::new();
    let a = gated_app(
        LockLayer::new(locker_a.clone(), tenant_key()).wait(Duration::from_millis(300)),
        &gate,
    );
    let b = gated_app(
        LockLayer::new(locker_b.clone(), tenant_key()).wait(Duration::from_millis(300)),
        &gate,
    );
    let holder = start_holding(&a, "/tenants/acme/hold", &mut started).await;
    let holder_keys = lock_keys(&etcd, &locker_a, "acme").await;
    assert_eq!(holder_keys.len(), 1);
    for app in [&a, &b] {
        let t0 = Instant::now();
        let refused = post_read(app, "/tenants/acme/quick").await;
        let elapsed = t0.elapsed();
        assert_locked(&refused, "acme");
        assert!(refused.body.contains("stayed held"), "{}", refused.body);
        assert!(
            elapsed >= Duration::from_millis(280),
            "gave up early: {elapsed:?}"
        );
        assert!(
            elapsed < Duration::from_secs(5),
            "gave up late: {elapsed:?}"
        );
    }
    assert_eq!(
        gate.calls.load(SeqCst),
        1,
        "a timed-out waiter's handler ran"
    );
    // The timed-out waiters left nothing in line.
    eventually("only the holder's key left", RELEASE_BOUND, || async {
        lock_keys(&etcd, &locker_a, "acme").await == holder_keys
    })
    .await;

    gate.open();
    let held = soon("the holder's answer", holder).await.expect("task");
    assert_eq!(held.status, StatusCode::OK);
    wait_released(&etcd, &locker_a, "acme").await;
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 4. A missing or invalid header key answers 400 without calling the handler
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_for_missing_header() {
    let etcd = etcd().await;
    let locker = locker(&etcd, 10).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/orders",
            post({
                let calls = Arc::clone(&calls);
                move |lock: HeldLock| async move {
                    calls.fetch_add(1, SeqCst);
                    format!("locked {}", lock.name())
                }
            }),
        )
        .route_layer(LockLayer::new(
            locker.clone(),
            Key::header(HeaderName::from_static("x-tenant")),
        ));
    let send = |value: Option<HeaderValue>| {
        let app = app.clone();
        async move {
            let mut req = request(Method::POST, "/orders");
            if let Some(value) = value {
                req.headers_mut().insert("x-tenant", value);
            }
            read(soon("the response", app.oneshot(req)).await.unwrap()).await
        }
    };

    let missing = send(None).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        missing.header(header::CONTENT_TYPE),
        Some("text/plain; charset=utf-8")
    );
    assert!(missing.header(header::RETRY_AFTER).is_none());
    assert!(missing.body.contains("x-tenant"), "{}", missing.body);
    assert!(missing.body.contains("missing"), "{}", missing.body);

    let too_long = "x".repeat(tower_lease_lock::MAX_NAME_LEN + 1);
    let cases: [(&str, HeaderValue, &str); 4] = [
        (
            "control character",
            HeaderValue::from_static("ac\tme"),
            "control character",
        ),
        (
            "too long",
            HeaderValue::from_str(&too_long).unwrap(),
            "limit",
        ),
        (
            "not UTF-8",
            HeaderValue::from_bytes(b"acm\xe9").unwrap(),
            "not UTF-8",
        ),
        ("empty", HeaderValue::from_static(""), "empty"),
    ];
    for (what, value, says) in cases {
        let answer = send(Some(value)).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{what}: {}",
            answer.body
        );
        assert!(answer.body.contains("x-tenant"), "{what}: {}", answer.body);
        assert!(answer.body.contains(says), "{what}: {}", answer.body);
    }
    assert_eq!(calls.load(SeqCst), 0, "the handler ran for a bad key");
    assert!(
        keys_under(&etcd, NS).await.is_empty(),
        "a bad key took a lock"
    );

    let ok = send(Some(HeaderValue::from_static("acme"))).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert_eq!(ok.body, "locked acme");
    assert_eq!(calls.load(SeqCst), 1);

    wait_released(&etcd, &locker, "acme").await;
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 5. etcd down or frozen: 503 with Retry-After, bounded by the request timeout
// ---------------------------------------------------------------------------

fn quick_app(locker: EtcdLocker) -> Router {
    let (gate, _) = Gate::new();
    gated_app(LockLayer::new(locker, tenant_key()), &gate)
}

/// One request that must answer 503 quickly.
async fn expect_unavailable(app: &Router, uri: &str) {
    let t0 = Instant::now();
    let answer = post_read(app, uri).await;
    let elapsed = t0.elapsed();
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{uri} after {elapsed:?}: {}",
        answer.body
    );
    assert_eq!(answer.header(header::RETRY_AFTER), Some("1"));
    assert_eq!(answer.body, "lock service unavailable; retry later\n");
    assert!(
        elapsed < Duration::from_secs(5),
        "503 took {elapsed:?} (request timeout 1 s)"
    );
    println!("503 for {uri} after {elapsed:?}");
}

/// Requests until one answers 200 (etcd is back).
async fn eventually_ok(app: &Router, uri: &str) {
    eventually(
        &format!("{uri} answers 200 again"),
        Duration::from_secs(10),
        || async { post_read(app, uri).await.status == StatusCode::OK },
    )
    .await;
}

/// etcd killed: 503 with Retry-After within the request timeout, then 200
/// again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_when_etcd_stopped() {
    let mut etcd = etcd().await;
    let locker = locker_with_timeout(&etcd, 10, Duration::from_secs(1)).await;
    let app = quick_app(locker.clone());
    let ok = post_read(&app, "/tenants/acme/quick").await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    wait_released(&etcd, &locker, "acme").await;

    etcd.member().kill();
    expect_unavailable(&app, "/tenants/acme/quick").await;
    expect_unavailable(&app, "/tenants/other/quick").await;

    etcd.restart().await.expect("restart etcd");
    eventually_ok(&app, "/tenants/acme/quick").await;
    eventually("all keys released", Duration::from_secs(10), || async {
        locker.own_keys() == 0
    })
    .await;
    assert_no_keys_left(&etcd).await;
}

/// etcd frozen (SIGSTOP): requests hang and the request timeout answers 503.
/// What the frozen server had received may still apply once it resumes (the
/// puts of the timed-out acquisitions): the locker must not leave such a key
/// behind, or the name stays locked, with nobody holding it, for as long as
/// the lease is renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_when_etcd_paused() {
    const BURST: usize = 32;
    const ROUNDS: usize = 3;

    let mut etcd = etcd().await;
    let locker = locker_with_timeout(&etcd, 10, Duration::from_secs(1)).await;
    let app = quick_app(locker.clone());
    let ok = post_read(&app, "/tenants/acme/quick").await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    wait_released(&etcd, &locker, "acme").await;

    let mut burst = Vec::new();
    for round in 0..ROUNDS {
        etcd.member().pause();
        expect_unavailable(&app, "/tenants/acme/quick").await;
        // A burst of tenants at once: every one times out on its own, and
        // each leaves a put that the frozen server may still apply.
        let uris: Vec<String> = (0..BURST)
            .map(|i| format!("/tenants/r{round}-t{i}/quick"))
            .collect();
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for uri in &uris {
            let (app, uri) = (app.clone(), uri.clone());
            tasks.push(tokio::spawn(
                async move { expect_unavailable(&app, &uri).await },
            ));
        }
        for task in tasks {
            task.await.expect("503 for every tenant");
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "the burst queued");
        etcd.member().resume();
        eventually_ok(&app, "/tenants/acme/quick").await;
        wait_released(&etcd, &locker, "acme").await;
        burst.extend(uris);
    }

    let started = Instant::now();
    let mut left = keys_under(&etcd, NS).await;
    while !left.is_empty() && started.elapsed() < Duration::from_secs(6) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = keys_under(&etcd, NS).await;
    }
    assert!(
        left.is_empty(),
        "keys leaked after etcd resumed ({} in the locker's books): {left:?}",
        locker.own_keys()
    );
    for uri in &burst {
        let answer = post_read(&app, uri).await;
        assert_eq!(answer.status, StatusCode::OK, "{uri}: {}", answer.body);
    }
    eventually("the locker's books empty", RELEASE_BOUND, || async {
        locker.own_keys() == 0
    })
    .await;
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 6. A streaming body holds the lock until its end, or until it is dropped
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_body_holds_until_end() {
    let etcd = etcd().await;
    let locker = locker(&etcd, 10).await;
    let (gate, _) = Gate::new();
    let app = gated_app(LockLayer::new(locker.clone(), tenant_key()), &gate);

    // (a) Read to the end.
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    *gate.stream.lock().unwrap() = Some(rx);
    let response = call(&app, Method::POST, "/tenants/acme/stream").await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    assert_eq!(lock_keys(&etcd, &locker, "acme").await.len(), 1);
    assert_locked(&post_read(&app, "/tenants/acme/quick").await, "acme");

    for chunk in ["first ", "second "] {
        tx.send(Bytes::from(chunk)).await.expect("body alive");
        let frame = soon("a chunk", body.frame())
            .await
            .expect("a frame")
            .expect("no error");
        assert_eq!(frame.into_data().expect("data"), chunk);
        // Still held between chunks.
        assert_eq!(lock_keys(&etcd, &locker, "acme").await.len(), 1);
        assert_locked(&post_read(&app, "/tenants/acme/quick").await, "acme");
    }
    tx.send(Bytes::from("last")).await.expect("body alive");
    drop(tx);
    let rest = soon("the end of the body", body.collect())
        .await
        .expect("no error")
        .to_bytes();
    assert_eq!(rest, "last");
    wait_released(&etcd, &locker, "acme").await;
    let after = post_read(&app, "/tenants/acme/quick").await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.body);
    wait_released(&etcd, &locker, "acme").await;

    // (b) One chunk read, then the body dropped while the sender is open.
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    *gate.stream.lock().unwrap() = Some(rx);
    let response = call(&app, Method::POST, "/tenants/acme/stream").await;
    let mut body = response.into_body();
    tx.send(Bytes::from("only")).await.expect("body alive");
    let frame = soon("a chunk", body.frame()).await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "only");
    assert_eq!(lock_keys(&etcd, &locker, "acme").await.len(), 1);
    drop(body);
    wait_released(&etcd, &locker, "acme").await;
    // The body (and with it the receiver) is gone; the sender never closed.
    assert!(tx.is_closed(), "the body was not dropped");
    let after = post_read(&app, "/tenants/acme/quick").await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.body);
    drop(tx);

    wait_released(&etcd, &locker, "acme").await;
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 7. A dropped request future (client gone) releases the lock
// ---------------------------------------------------------------------------

/// Serves `app` on a loopback port.
async fn serve(app: Router) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    (addr, server)
}

/// One HTTP/1.1 request over a fresh connection; returns the whole raw answer.
async fn raw_http(addr: std::net::SocketAddr, method: &str, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    soon("the HTTP answer", stream.read_to_end(&mut answer))
        .await
        .expect("read");
    String::from_utf8(answer).expect("utf-8 answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_request_future_releases() {
    let etcd = etcd().await;
    let locker = locker(&etcd, 10).await;
    let (gate, mut started) = Gate::new();
    let app = gated_app(LockLayer::new(locker.clone(), tenant_key()), &gate);

    // (a) In process: the task driving the request is aborted.
    let task = start_holding(&app, "/tenants/acme/hold", &mut started).await;
    assert_eq!(lock_keys(&etcd, &locker, "acme").await.len(), 1);
    task.abort();
    assert!(task.await.expect_err("aborted").is_cancelled());
    wait_released(&etcd, &locker, "acme").await;
    let after = post_read(&app, "/tenants/acme/quick").await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.body);
    wait_released(&etcd, &locker, "acme").await;

    // (b) Over HTTP: the client closes its connection while the handler runs.
    let (addr, server) = serve(app.clone()).await;
    let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
    client
        .write_all(b"POST /tenants/beta/hold HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n")
        .await
        .expect("write");
    soon("the handler to start", started.recv()).await.unwrap();
    assert_eq!(lock_keys(&etcd, &locker, "beta").await.len(), 1);
    drop(client);
    wait_released(&etcd, &locker, "beta").await;
    let after = raw_http(addr, "POST", "/tenants/beta/quick").await;
    assert!(after.starts_with("HTTP/1.1 200"), "{after}");
    server.abort();

    wait_released(&etcd, &locker, "beta").await;
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 8. A panicking handler (caught by CatchPanicLayer) releases the lock
// ---------------------------------------------------------------------------

async fn panics(State(gate): State<Arc<Gate>>, Path(tenant): Path<String>) -> String {
    gate.enter(tenant).await;
    panic!("this handler panics on purpose");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_handler_releases() {
    let etcd = etcd().await;
    let locker = locker(&etcd, 10).await;
    let (gate, mut started) = Gate::new();
    let app = Router::new()
        .route("/tenants/{tenant}/panic", post(panics))
        .route("/tenants/{tenant}/quick", post(quick))
        .route_layer(LockLayer::new(locker.clone(), tenant_key()))
        .layer(CatchPanicLayer::new())
        .with_state(Arc::clone(&gate));

    let task = start_holding(&app, "/tenants/acme/panic", &mut started).await;
    assert_eq!(lock_keys(&etcd, &locker, "acme").await.len(), 1);
    gate.open();
    let answer = soon("the panic's answer", task).await.expect("task");
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    wait_released(&etcd, &locker, "acme").await;
    let after = post_read(&app, "/tenants/acme/quick").await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.body);

    wait_released(&etcd, &locker, "acme").await;
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 9. HeldLock's token is the lock key's create revision; the header says so too
// ---------------------------------------------------------------------------

async fn token(State(gate): State<Arc<Gate>>, lock: HeldLock) -> String {
    let key = lock.key().expect("etcd key").to_string();
    let said = format!("{} {key}", lock.token());
    gate.enter(said.clone()).await;
    said
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_lock_token_matches_etcd() {
    let etcd = etcd().await;
    let locker = locker(&etcd, 10).await;
    let (gate, mut started) = Gate::new();
    let app = Router::new()
        .route("/tenants/{tenant}/token", post(token))
        .route_layer(
            LockLayer::new(locker.clone(), tenant_key())
                .fencing_token_header(HeaderName::from_static("x-fencing-token")),
        )
        .route(
            "/unlocked",
            get(|lock: HeldLock| async move { lock.token().to_string() }),
        )
        .route(
            "/maybe",
            get(|lock: Option<HeldLock>| async move { format!("{:?}", lock.map(|l| l.token())) }),
        )
        .with_state(Arc::clone(&gate));

    let mut last_token = 0;
    for round in 0..2 {
        let task = tokio::spawn({
            let app = app.clone();
            async move { post_read(&app, "/tenants/acme/token").await }
        });
        let said = soon("the handler to start", started.recv()).await.unwrap();
        let (token, key) = said.split_once(' ').expect("token and key");
        let token: u64 = token.parse().expect("numeric token");
        assert!(
            key.starts_with(&locker.key_prefix(&name("acme"))),
            "key {key}"
        );
        // While the handler runs, the key is in etcd, created at the token.
        assert_eq!(
            create_revision(&etcd, key).await,
            Some(i64::try_from(token).unwrap()),
            "round {round}"
        );
        assert!(token > last_token, "fencing token did not grow");
        last_token = token;

        gate.open();
        let answer = soon("the answer", task).await.expect("task");
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, said);
        assert_eq!(
            answer.header("x-fencing-token"),
            Some(token.to_string().as_str())
        );
        wait_released(&etcd, &locker, "acme").await;
        assert_eq!(create_revision(&etcd, key).await, None);
    }

    let unlocked = read(call(&app, Method::GET, "/unlocked").await).await;
    assert_eq!(unlocked.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(unlocked.body, "LockLayer is not installed on this route\n");
    let maybe = read(call(&app, Method::GET, "/maybe").await).await;
    assert_eq!(maybe.status, StatusCode::OK);
    assert_eq!(maybe.body, "None");

    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 10. A handler that locks by itself answers LockError like the layer does
// ---------------------------------------------------------------------------

async fn self_locking(
    State(locker): State<EtcdLocker>,
    Path(tenant): Path<String>,
) -> Result<String, LockError> {
    let guard = locker.try_acquire(&LockName::new(&tenant)?).await?;
    let token = guard.token();
    guard.release().await?;
    Ok(format!("self-locked with token {token}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_error_into_response() {
    let etcd = etcd().await;
    let locker_a = locker(&etcd, 10).await;
    let (gate, _) = Gate::new();
    let layered = gated_app(LockLayer::new(locker_a.clone(), tenant_key()), &gate);
    let app = Router::new()
        .route("/self/{tenant}", post(self_locking))
        .with_state(locker_a.clone())
        .merge(layered);

    let free = post_read(&app, "/self/acme").await;
    assert_eq!(free.status, StatusCode::OK, "{}", free.body);
    assert!(free.body.starts_with("self-locked"), "{}", free.body);
    wait_released(&etcd, &locker_a, "acme").await;

    // Held elsewhere (another locker on another client).
    let other = locker(&etcd, 10).await;
    let held = other.try_acquire(&name("acme")).await.expect("hold acme");
    let by_handler = post_read(&app, "/self/acme").await;
    let by_layer = post_read(&app, "/tenants/acme/quick").await;
    assert_locked(&by_handler, "acme");
    assert_locked(&by_layer, "acme");
    assert_eq!(by_handler.body, by_layer.body);
    assert_eq!(
        by_handler.body,
        "lock \"acme\" is held by another request; retry later\n"
    );

    // An invalid name answers 400, as an invalid key does under the layer.
    let invalid = post_read(&app, "/self/ac%09me").await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST, "{}", invalid.body);
    assert!(
        invalid.body.contains("control character"),
        "{}",
        invalid.body
    );

    held.release().await.expect("release");
    let free = post_read(&app, "/self/acme").await;
    assert_eq!(free.status, StatusCode::OK, "{}", free.body);

    wait_released(&etcd, &locker_a, "acme").await;
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 11. A key that cannot be derived on the route is the server's fault: 500
// ---------------------------------------------------------------------------

/// Under `Router::layer` (and, a fortiori, around the whole router) the lock
/// key may be underivable: the server's mistake, answered 500 without calling
/// the handler or taking a lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_param_under_layer_is_500() {
    let etcd = etcd().await;
    let locker = locker(&etcd, 10).await;
    let (gate, mut started) = Gate::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = Arc::clone(&calls);
        move || async move {
            calls.fetch_add(1, SeqCst);
            "handled"
        }
    };
    let expect_500 = |answer: Answer, what: &str| {
        assert_eq!(
            answer.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "{what}: {}",
            answer.body
        );
        assert_eq!(
            answer.body, "lock key cannot be derived on this route\n",
            "{what}"
        );
        assert!(answer.header(header::RETRY_AFTER).is_none(), "{what}");
    };

    // Router::layer applies to every route, also those without {tenant}.
    let app = Router::new()
        .route("/tenants/{tenant}/hold", post(hold))
        .route("/orders/{id}", post(handler.clone()))
        .route("/health", get(handler.clone()))
        .layer(LockLayer::new(locker.clone(), tenant_key()))
        .with_state(Arc::clone(&gate));
    expect_500(post_read(&app, "/orders/1").await, "route without {tenant}");
    expect_500(
        read(call(&app, Method::GET, "/health").await).await,
        "route without parameters",
    );

    // The layer around the whole router runs before routing: no parameters.
    let router = Router::new().route("/tenants/{tenant}/orders", post(handler.clone()));
    let outside = tower::Layer::layer(&LockLayer::new(locker.clone(), tenant_key()), router);
    let response = soon(
        "the response",
        outside.oneshot(request(Method::POST, "/tenants/acme/orders")),
    )
    .await
    .unwrap();
    expect_500(
        read(response.map(Body::new)).await,
        "layer around the router",
    );

    assert_eq!(calls.load(SeqCst), 0, "a handler ran without its lock");
    assert!(keys_under(&etcd, NS).await.is_empty(), "a lock was taken");

    // axum 0.8 runs Router::layer after routing, so on a route that has
    // {tenant} the key is derived and the request is locked like under
    // route_layer (the README's table says 500 here).
    let holder = start_holding(&app, "/tenants/acme/hold", &mut started).await;
    assert_eq!(lock_keys(&etcd, &locker, "acme").await.len(), 1);
    gate.open();
    let held = soon("the holder's answer", holder).await.expect("task");
    assert_eq!(held.status, StatusCode::OK, "{}", held.body);

    wait_released(&etcd, &locker, "acme").await;
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 12. A rejection handler replaces the layer's answers
// ---------------------------------------------------------------------------

/// A plain `http::Response<String>`: no axum types needed.
fn json_rejection(rejection: &tower_lease_lock::layer::LockRejection) -> http::Response<String> {
    let status = match rejection.status() {
        StatusCode::LOCKED => StatusCode::TOO_MANY_REQUESTS,
        other => other,
    };
    let body = serde_json::json!({
        "error": rejection.to_string(),
        "lock_status": rejection.status().as_u16(),
        "retryable": rejection.is_retryable(),
    });
    http::Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .expect("response")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejection_handler() {
    let etcd = etcd().await;
    let locker = locker(&etcd, 10).await;
    let (gate, mut started) = Gate::new();
    let app = gated_app(
        LockLayer::new(locker.clone(), tenant_key()).rejection_handler(json_rejection),
        &gate,
    );

    let holder = start_holding(&app, "/tenants/acme/hold", &mut started).await;
    let refused = post_read(&app, "/tenants/acme/quick").await;
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
    assert!(refused.header(header::RETRY_AFTER).is_none());
    let json: serde_json::Value = serde_json::from_str(&refused.body).expect("json body");
    assert_eq!(json["lock_status"], 423);
    assert_eq!(json["retryable"], true);
    assert!(json["error"].as_str().unwrap().contains("acme"), "{json}");

    // Key errors go through it too.
    let by_header = Router::new()
        .route("/orders", post(|| async { "handled" }))
        .route_layer(
            LockLayer::new(
                locker.clone(),
                Key::header(HeaderName::from_static("x-tenant")),
            )
            .rejection_handler(json_rejection),
        );
    let missing = post_read(&by_header, "/orders").await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        missing.header(header::CONTENT_TYPE),
        Some("application/json")
    );
    let json: serde_json::Value = serde_json::from_str(&missing.body).expect("json body");
    assert_eq!(json["lock_status"], 400);
    assert_eq!(json["retryable"], false);

    gate.open();
    let held = soon("the holder's answer", holder).await.expect("task");
    assert_eq!(held.status, StatusCode::OK);
    wait_released(&etcd, &locker, "acme").await;
    let after = post_read(&app, "/tenants/acme/quick").await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.body);

    wait_released(&etcd, &locker, "acme").await;
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 13. The lock is lost while the handler runs
// ---------------------------------------------------------------------------

/// With `OnLost::FailRequest`, a handler still running when the lock is lost
/// is stopped and the request answers 503; by default (`OnLost::Finish`) it
/// finishes normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_lock_while_the_handler_runs() {
    use tower_lease_lock::layer::OnLost;

    let etcd = etcd().await;
    for policy in [OnLost::FailRequest, OnLost::Finish] {
        // A short lease whose renewal the test stops: lost within ~2.4 s.
        let locker = locker(&etcd, 3).await;
        let (gate, mut started) = Gate::new();
        let layer = LockLayer::new(locker.clone(), tenant_key()).on_lost(policy);
        let app = gated_app(layer, &gate);
        let task = start_holding(&app, "/tenants/acme/hold", &mut started).await;
        locker.pause_renewal(true);
        let t0 = Instant::now();
        match policy {
            OnLost::FailRequest => {
                let answer = soon("the lost lock to fail the request", task)
                    .await
                    .unwrap();
                assert_eq!(
                    answer.status,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "{}",
                    answer.body
                );
                assert_eq!(answer.body, "lock \"acme\" was lost; retry later\n");
                assert_eq!(answer.header(header::RETRY_AFTER), Some("1"));
                assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
            }
            _ => {
                // Still running after the lease is gone; finishes when let go.
                eventually(
                    "the lease to be given up",
                    Duration::from_secs(5),
                    || async { keys_under(&etcd, NS).await.is_empty() },
                )
                .await;
                assert!(!task.is_finished(), "the handler was stopped");
                gate.open();
                let answer = soon("the handler to finish", task).await.unwrap();
                assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
            }
        }
        locker.pause_renewal(false);
    }
    assert_no_keys_left(&etcd).await;
}
