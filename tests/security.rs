//! TLS and auth to etcd (issue 9, items 10 and 11), against real servers
//! from `EtcdServer::builder()` (etcd 3.4):
//!
//! - locks over TLS, then with client certificates and auth together (the
//!   production setup), each through the README's connect recipe;
//! - the minimal role: `readwrite` on the namespace prefix, made with the
//!   README's `etcdctl` commands, serves every mode; `read` or `write` alone
//!   does not; the locker's lease requests (grant, keepalive, revoke) need no
//!   permission of their own, but revoking a lease needs write permission on
//!   every key attached to it;
//! - a user without the permission fails at once with
//!   `LockError::PermissionDenied`, and `LockLayer` answers 500;
//! - short auth tokens: with `with_auto_token_refresh(true)` a locker
//!   outlives its tokens; without it, acquisitions and releases fail once
//!   the token expired, while the held lock stays (etcd 3.4 renews leases
//!   without checking tokens), so the name stays locked.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::routing::post;
use axum::Router;
use common::*;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_lease_lock::etcd::{connect_options, EtcdLocker};
use tower_lease_lock::etcd_client::{self, ConnectOptions, Permission, PutOptions};
use tower_lease_lock::testing::{Credentials, EtcdServer};
use tower_lease_lock::{Key, LockError, LockLayer, LockMode, LockName, Locker, Wait};

/// The request timeout of the lockers here.
const TIMEOUT: Duration = Duration::from_secs(2);
/// What "at once" means for a refusal: one round trip, with room for a
/// loaded 2-core machine, and well under [`TIMEOUT`].
const AT_ONCE: Duration = Duration::from_millis(500);
/// The auth token TTL of the expiry tests (`--auth-token-ttl`).
const TOKEN_TTL: Duration = Duration::from_secs(2);

/// How long an unused token surely takes to expire: its TTL, plus etcd's
/// one-second expiry sweep, plus a margin.
const TOKEN_EXPIRED: Duration = Duration::from_secs(4);

/// An etcd with auth whose tokens expire after [`TOKEN_TTL`] of disuse, and a
/// user with read-write on the test namespace.
async fn etcd_with_expiring_tokens() -> (EtcdServer, Credentials) {
    let etcd = EtcdServer::builder()
        .auth_token_ttl(TOKEN_TTL)
        .start()
        .await
        .expect("etcd");
    let user = etcd
        .add_user("locks", [Permission::read_write(NS).with_prefix()])
        .await
        .expect("user");
    (etcd, user)
}

fn name(s: &str) -> LockName {
    LockName::new(s).expect("valid lock name")
}

/// A locker in the test namespace, through `EtcdLocker::connect` with
/// `options`, with a lease of `ttl_secs` (and the longest request timeout
/// up to [`TIMEOUT`] that it leaves room for).
async fn locker_with(etcd: &EtcdServer, options: ConnectOptions, ttl_secs: u64) -> EtcdLocker {
    let builder = EtcdLocker::connect(etcd.endpoints(), Some(options))
        .await
        .expect("connect")
        .namespace(NS)
        .ttl(Duration::from_secs(ttl_secs));
    let timeout = builder.max_request_timeout().min(TIMEOUT);
    builder
        .request_timeout(timeout)
        .build()
        .expect("build locker")
}

/// [`connect_options`] as `user`, with or without the token refresh.
fn as_user(etcd: &EtcdServer, user: &Credentials, refresh: bool) -> ConnectOptions {
    etcd.connect_options(TIMEOUT)
        .with_user(user.user(), user.password())
        .with_auto_token_refresh(refresh)
}

/// Try, a contended try, a wait granted by the release, release: nothing
/// left of the name in etcd.
async fn try_wait_release(etcd: &EtcdServer, a: &EtcdLocker, b: &EtcdLocker) {
    let n = name("tenant:acme");
    let held = a.try_acquire(&n).await.expect("try");
    let err = b.try_acquire(&n).await.expect_err("contended");
    assert!(matches!(err, LockError::Locked { .. }), "{err}");
    let waiting = tokio::spawn({
        let (b, n) = (b.clone(), n.clone());
        async move { b.acquire(&n, Duration::from_secs(10)).await }
    });
    eventually("the waiter is in line", Duration::from_secs(5), || {
        let (b, n) = (b.clone(), n.clone());
        async move { b.watches(&n) }
    })
    .await;
    let token = held.token();
    let released = Instant::now();
    held.release().await.expect("release");
    let granted = waiting
        .await
        .expect("task")
        .expect("granted after the release");
    assert!(
        released.elapsed() < Duration::from_secs(1),
        "granted {:?} after the release",
        released.elapsed()
    );
    assert!(granted.token() > token);
    granted.release().await.expect("release");
    let prefix = a.key_prefix(&n);
    eventually("the name's keys are gone", Duration::from_secs(5), || {
        let prefix = prefix.clone();
        async move { keys_under(etcd, &prefix).await.is_empty() }
    })
    .await;
}

#[cfg(feature = "tls")]
mod tls {
    use super::*;
    use tower_lease_lock::etcd_client::{Certificate, Identity, TlsOptions};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn locks_over_tls() {
        let etcd = EtcdServer::builder().tls(true).start().await.expect("etcd");
        assert!(etcd.endpoints()[0].starts_with("https://"));
        let ca_pem = etcd.certificates().expect("tls").ca_pem();
        // The README's recipe.
        let options = || {
            connect_options(TIMEOUT)
                .with_tls(TlsOptions::new().ca_certificate(Certificate::from_pem(ca_pem)))
        };
        let a = locker_with(&etcd, options(), 10).await;
        let b = locker_with(&etcd, options(), 10).await;
        try_wait_release(&etcd, &a, &b).await;

        // The server really checks: a client that does not trust its CA
        // fails, within the request timeout.
        let stranger = locker_with(&etcd, connect_options(TIMEOUT), 10).await;
        let started = Instant::now();
        let err = stranger
            .try_acquire(&name("tenant:acme"))
            .await
            .expect_err("the CA is not trusted");
        assert!(
            matches!(err, LockError::Unavailable { .. })
                && err.to_string().contains("UnknownIssuer"),
            "{err}"
        );
        assert!(
            started.elapsed() < TIMEOUT + AT_ONCE,
            "{:?}",
            started.elapsed()
        );
        for locker in [a, b] {
            locker.shutdown().await.expect("shutdown");
        }
    }

    /// The production setup: TLS with client certificates, and auth.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn locks_with_client_certificates_and_auth() {
        let etcd = EtcdServer::builder()
            .client_cert_auth(true)
            .auth(true)
            .start()
            .await
            .expect("etcd");
        let user = etcd
            .add_user("locks", [Permission::read_write(NS).with_prefix()])
            .await
            .expect("user");
        let certificates = etcd.certificates().expect("tls");
        // The README's recipe.
        let options = |identity: bool| {
            let mut tls =
                TlsOptions::new().ca_certificate(Certificate::from_pem(certificates.ca_pem()));
            if identity {
                tls = tls.identity(Identity::from_pem(
                    certificates.client_cert_pem(),
                    certificates.client_key_pem(),
                ));
            }
            connect_options(TIMEOUT)
                .with_tls(tls)
                .with_user(user.user(), user.password())
                .with_auto_token_refresh(true)
        };
        let a = locker_with(&etcd, options(true), 10).await;
        let b = locker_with(&etcd, options(true), 10).await;
        try_wait_release(&etcd, &a, &b).await;

        // Without the client certificate the server hangs up: the client
        // cannot even log in, within the connect timeout.
        let started = Instant::now();
        let refused = EtcdLocker::connect(etcd.endpoints(), Some(options(false))).await;
        assert!(refused.is_err(), "connected without a client certificate");
        assert!(
            started.elapsed() < TIMEOUT + AT_ONCE,
            "{:?}",
            started.elapsed()
        );
        for locker in [a, b] {
            locker.shutdown().await.expect("shutdown");
        }
    }
}

/// Feature `tls-native-roots`: `TlsOptions::new().with_native_roots()`
/// trusts the system's roots, here the test CA through `SSL_CERT_FILE`
/// (which rustls-native-certs reads instead of the system store), in a
/// child process of this test binary with that environment.
#[cfg(feature = "tls-native-roots")]
mod native_roots {
    use super::*;
    use tower_lease_lock::etcd_client::TlsOptions;

    const ENDPOINT: &str = "TLL_NATIVE_ROOTS_ENDPOINT";
    const EXPECT_TRUST: &str = "TLL_NATIVE_ROOTS_EXPECT_TRUST";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn native_roots_are_trusted() {
        let etcd = EtcdServer::builder().tls(true).start().await.expect("etcd");
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, etcd.certificates().expect("tls").ca_pem()).expect("write CA");
        for trusted in [true, false] {
            let mut child = tokio::process::Command::new(std::env::current_exe().expect("exe"));
            child
                .args(["--exact", "native_roots::child", "--ignored", "--nocapture"])
                .env(ENDPOINT, &etcd.endpoints()[0])
                .env(EXPECT_TRUST, trusted.to_string());
            if trusted {
                child.env("SSL_CERT_FILE", &ca);
            } else {
                // The system's own roots: no test CA there.
                child.env_remove("SSL_CERT_FILE").env_remove("SSL_CERT_DIR");
            }
            let output = child.output().await.expect("run the child");
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(
                output.status.success() && stdout.contains("1 passed"),
                "trusted={trusted}: {stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        assert_no_keys_left(&etcd).await;
    }

    /// Run by `native_roots_are_trusted` with its environment.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "run by native_roots_are_trusted"]
    async fn child() {
        let Ok(endpoint) = std::env::var(ENDPOINT) else {
            return;
        };
        let trusted = std::env::var(EXPECT_TRUST).as_deref() == Ok("true");
        let options = connect_options(TIMEOUT).with_tls(TlsOptions::new().with_native_roots());
        let locker = EtcdLocker::connect([endpoint], Some(options))
            .await
            .expect("connect")
            .namespace(NS)
            .request_timeout(TIMEOUT)
            .build()
            .expect("locker");
        let result = locker.try_acquire(&name("native")).await;
        if trusted {
            result.expect("trusted").release().await.expect("release");
            locker.shutdown().await.expect("shutdown");
        } else {
            let err = result.expect_err("the test CA is not a system root");
            assert!(err.to_string().contains("UnknownIssuer"), "{err}");
        }
    }
}

/// The role the README gives, made with its `etcdctl` commands: `readwrite`
/// on the namespace prefix is all a locker needs, in every mode, shutdown
/// (lease revoke) included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readwrite_on_the_namespace_prefix_is_enough() {
    let etcd = EtcdServer::builder()
        .auth(true)
        .start()
        .await
        .expect("etcd");
    let root = etcd.root_credentials().expect("auth").etcdctl_user();
    let password = "locks-secret";
    for args in [
        vec!["role", "add", "locks"],
        vec![
            "role",
            "grant-permission",
            "locks",
            "readwrite",
            NS,
            "--prefix=true",
        ],
        vec!["user", "add", "locks", "--new-user-password", password],
        vec!["user", "grant-role", "locks", "locks"],
    ] {
        let output = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(&etcd.endpoints()[0])
            .args(["--user", &root])
            .args(&args)
            .output()
            .expect("run etcdctl");
        assert!(
            output.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let options = || {
        connect_options(TIMEOUT)
            .with_user("locks", password)
            .with_auto_token_refresh(true)
    };
    // A short lease, renewed several times during the test.
    let a = locker_with(&etcd, options(), 3).await;
    let b = locker_with(&etcd, options(), 3).await;
    a.ensure_lease().await.expect("lease grant");
    try_wait_release(&etcd, &a, &b).await;

    let readers = name("report");
    let r1 = a
        .lock(&readers, LockMode::Shared, Wait::Try)
        .await
        .expect("shared");
    let r2 = b
        .lock(&readers, LockMode::Shared, Wait::Try)
        .await
        .expect("shared");
    let pool = name("pool");
    let two = LockMode::permits(2).expect("two permits");
    let p1 = a.lock(&pool, two, Wait::Try).await.expect("permit");
    let p2 = b.lock(&pool, two, Wait::Try).await.expect("permit");
    let err = a
        .lock(&pool, two, Wait::Try)
        .await
        .expect_err("no third permit");
    assert!(matches!(err, LockError::Locked { .. }), "{err}");
    // Held across several renewals (every second).
    tokio::time::sleep(Duration::from_millis(3500)).await;
    for guard in [&r1, &r2, &p1, &p2] {
        assert!(!guard.is_lost(), "lost: renewals failed");
    }
    for guard in [r1, r2, p1, p2] {
        guard.release().await.expect("release");
    }
    // Shutdown revokes the leases while a lock is held: revoking needs
    // write permission on the lease's keys, which the role gives.
    let held = a.try_acquire(&name("at-exit")).await.expect("try");
    a.shutdown().await.expect("shutdown revokes the lease");
    assert!(held.is_lost());
    b.shutdown().await.expect("shutdown");
    assert_no_keys_left(&etcd).await;
}

/// A role on one name's prefix, narrower than the namespace: try mode
/// works, but a waiter cannot open its watch stream (the stream opens with
/// a watch on the namespace key): it fails at once with a message saying
/// what the role lacks, rather than waiting out its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_narrower_than_the_namespace_is_not_enough() {
    let etcd = EtcdServer::builder()
        .auth(true)
        .start()
        .await
        .expect("etcd");
    let n = name("acme");
    let root = locker_with(&etcd, etcd.connect_options(TIMEOUT), 10).await;
    let prefix = root.key_prefix(&n);
    let user = etcd
        .add_user(
            "acme",
            [Permission::read_write(prefix.as_str()).with_prefix()],
        )
        .await
        .expect("user");
    let a = locker_with(&etcd, as_user(&etcd, &user, true), 10).await;
    let b = locker_with(&etcd, as_user(&etcd, &user, true), 10).await;
    let held = a.try_acquire(&n).await.expect("try works");
    let wait = Duration::from_secs(3);
    let started = Instant::now();
    let waiting = tokio::spawn({
        let (b, n) = (b.clone(), n.clone());
        async move { b.acquire(&n, wait).await }
    });
    let err = waiting.await.expect("task").expect_err("cannot watch");
    assert!(matches!(err, LockError::PermissionDenied { .. }), "{err:?}");
    assert!(err.to_string().contains("whole namespace"), "{err}");
    assert!(
        started.elapsed() < wait,
        "failed after {:?}: it waited out its timeout",
        started.elapsed()
    );
    held.release().await.expect("release");
    for locker in [a, b, root] {
        locker.shutdown().await.expect("shutdown");
    }
    assert_no_keys_left(&etcd).await;
}

/// `read` and `write` are both needed: the lock txn compares and reads, and
/// puts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_or_write_alone_is_not_enough() {
    let etcd = EtcdServer::builder()
        .auth(true)
        .start()
        .await
        .expect("etcd");
    let cases = [
        ("reader", Permission::read(NS).with_prefix()),
        ("writer", Permission::write(NS).with_prefix()),
    ];
    for (user, permission) in cases {
        let user = etcd.add_user(user, [permission]).await.expect("user");
        let locker = locker_with(&etcd, as_user(&etcd, &user, true), 10).await;
        let err = locker
            .try_acquire(&name("tenant:acme"))
            .await
            .expect_err("refused");
        assert!(
            matches!(err, LockError::PermissionDenied { .. }),
            "{}: {err}",
            user.user()
        );
    }
    assert_no_keys_left(&etcd).await;
}

/// etcd 3.4 checks no permission on lease grant and keepalive, nor on
/// revoking a lease without keys; revoking a lease (and putting a key with
/// it) needs write permission on every key attached to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_need_no_permission_but_revoke_needs_write_on_their_keys() {
    let etcd = EtcdServer::builder()
        .auth(true)
        .start()
        .await
        .expect("etcd");
    let nobody = etcd.add_user("nobody", []).await.expect("user");
    let mut client =
        etcd_client::Client::connect(etcd.endpoints(), Some(as_user(&etcd, &nobody, true)))
            .await
            .expect("connect");
    let lease = client.lease_grant(10, None).await.expect("grant").id();
    let (mut keeper, mut answers) = client.lease_keep_alive(lease).await.expect("keepalive");
    keeper.keep_alive().await.expect("keepalive");
    let answer = answers.message().await.expect("keepalive answer");
    assert_eq!(answer.map(|a| a.ttl()), Some(10));
    client
        .lease_revoke(lease)
        .await
        .expect("revoke a lease without keys");

    // A lease with a key this user may not write (root put it there).
    let lease = client.lease_grant(10, None).await.expect("grant").id();
    let mut root = etcd.client().await.expect("root");
    let key = format!("{NS}elsewhere");
    root.put(key.as_str(), "x", Some(PutOptions::new().with_lease(lease)))
        .await
        .expect("root puts with the lease");
    let err = client
        .lease_revoke(lease)
        .await
        .expect_err("revoke needs write on the key");
    assert!(err.to_string().contains("permission denied"), "{err}");
    // Keepalives still pass.
    let (mut keeper, mut answers) = client.lease_keep_alive(lease).await.expect("keepalive");
    keeper.keep_alive().await.expect("keepalive");
    assert!(answers.message().await.expect("answer").is_some());
    root.lease_revoke(lease).await.expect("root revokes");
}

/// A user whose role covers another prefix: every acquisition fails at
/// once (no retry, no wait) with a permission error, and the layer answers
/// 500 without `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_permission_is_refused_at_once() {
    let etcd = EtcdServer::builder()
        .auth(true)
        .start()
        .await
        .expect("etcd");
    let user = etcd
        .add_user(
            "elsewhere",
            [Permission::read_write("elsewhere/").with_prefix()],
        )
        .await
        .expect("user");
    let locker = locker_with(&etcd, as_user(&etcd, &user, true), 10).await;
    let n = name("tenant:acme");
    // A holder with the right role, so that a waiting acquisition would wait.
    let holder = locker_with(&etcd, etcd.connect_options(TIMEOUT), 10).await;
    let held = holder.try_acquire(&n).await.expect("root holds");

    for wait in [Wait::Try, Wait::Timeout(Duration::from_secs(10))] {
        let started = Instant::now();
        let err = locker
            .lock(&n, LockMode::Exclusive, wait)
            .await
            .expect_err("refused");
        let took = started.elapsed();
        eprintln!("{wait:?}: refused in {took:?}: {err}");
        assert!(matches!(err, LockError::PermissionDenied { .. }), "{err:?}");
        assert_eq!(err.kind(), "permission_denied");
        assert!(err.to_string().contains("permission denied"), "{err}");
        assert!(took < AT_ONCE, "{wait:?}: refused after {took:?}");
    }
    // A refused put is known not to be applied: the lease stays in use.
    let diagnostics = locker.diagnostics();
    assert_eq!(
        (
            diagnostics.own_keys,
            diagnostics.suspect_keys,
            diagnostics.leases
        ),
        (0, 0, 1),
        "{diagnostics:?}"
    );

    // A client without a user is refused the same way.
    let anonymous = locker_with(&etcd, connect_options(TIMEOUT), 10).await;
    let started = Instant::now();
    let err = anonymous.try_acquire(&n).await.expect_err("refused");
    assert!(matches!(err, LockError::PermissionDenied { .. }), "{err:?}");
    assert!(err.to_string().contains("user name is empty"), "{err}");
    assert!(started.elapsed() < AT_ONCE, "{:?}", started.elapsed());

    // The layer: a server misconfiguration, not an outage.
    let app = Router::new()
        .route("/tenants/{tenant}/charge", post(|| async { "charged" }))
        .route_layer(
            LockLayer::new(locker.clone(), Key::path_param("tenant").expect("key"))
                .wait(Duration::from_secs(5)),
        );
    let started = Instant::now();
    let response = app
        .oneshot(
            Request::post("/tenants/acme/charge")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("infallible");
    assert!(started.elapsed() < AT_ONCE, "{:?}", started.elapsed());
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(response.headers().get(header::RETRY_AFTER).is_none());
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(body, "lock misconfigured on the server\n");

    held.release().await.expect("release");
    holder.shutdown().await.expect("shutdown");
    locker.shutdown().await.expect("nothing to revoke");
    assert_no_keys_left(&etcd).await;
}

/// A token that expires every 2 s of disuse, and a locker with
/// `with_auto_token_refresh(true)`: a lock held across several token
/// lifetimes stays held (renewals go on), and locks are taken, waited for
/// and released after expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auto_refresh_a_locker_outlives_its_tokens() {
    let (etcd, user) = etcd_with_expiring_tokens().await;
    let a = locker_with(&etcd, as_user(&etcd, &user, true), 3).await;
    let b = locker_with(&etcd, as_user(&etcd, &user, true), 3).await;
    let held = a.try_acquire(&name("long")).await.expect("try");
    // A witness that logs in now and then stays idle: its token expires.
    let mut witness =
        etcd_client::Client::connect(etcd.endpoints(), Some(as_user(&etcd, &user, false)))
            .await
            .expect("connect");

    // Hold the lock for over three token lifetimes (renewals every second):
    // a sleep, since what is checked is that nothing happens.
    let lost = held.lost();
    tokio::select! {
        reason = lost => panic!("lost while the tokens expired: {reason}"),
        () = tokio::time::sleep(TOKEN_EXPIRED + Duration::from_secs(3)) => {}
    }
    let err = witness.get(NS, None).await.expect_err("the token expired");
    assert!(err.to_string().contains("invalid auth token"), "{err}");

    // After expiry: a try, and a release (a's token expired too).
    let second = a
        .try_acquire(&name("after"))
        .await
        .expect("try after expiry");
    second.release().await.expect("release after expiry");
    // A wait after expiry, on b's own expired token.
    try_wait_release(&etcd, &b, &a).await;
    assert!(!held.is_lost());
    held.release().await.expect("release");
    a.shutdown().await.expect("shutdown");
    b.shutdown().await.expect("shutdown");
    assert_no_keys_left(&etcd).await;
}

/// Without `with_auto_token_refresh(true)`, the token expires and every
/// request that needs it is refused: acquisitions fail at once, and a
/// release cannot delete its key. The lease would live on (etcd 3.4 renews
/// leases without a token, and refuses to revoke them), so a refused release
/// gives the lease up: it is no longer renewed, its guards are lost, and
/// the name is free one TTL later, without waiting for a shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_refresh_locking_stops_when_the_token_expires() {
    let (etcd, user) = etcd_with_expiring_tokens().await;
    let ttl_secs = 3;
    let stale = locker_with(&etcd, as_user(&etcd, &user, false), ttl_secs).await;
    let fresh = locker_with(&etcd, as_user(&etcd, &user, true), ttl_secs).await;
    let n = name("stuck");
    let held = stale
        .try_acquire(&n)
        .await
        .expect("works while the token lives");
    let other_guard = stale
        .try_acquire(&name("also-held"))
        .await
        .expect("works while the token lives");
    // Nothing tells when a token expired (using it would keep it alive).
    tokio::time::sleep(TOKEN_EXPIRED).await;

    let started = Instant::now();
    let err = stale
        .try_acquire(&name("other"))
        .await
        .expect_err("the token expired");
    assert!(matches!(err, LockError::PermissionDenied { .. }), "{err:?}");
    assert!(err.to_string().contains("invalid auth token"), "{err}");
    assert!(started.elapsed() < AT_ONCE, "{:?}", started.elapsed());

    assert!(!held.is_lost(), "renewals need no token on etcd 3.4");
    let released = Instant::now();
    let err = held.release().await.expect_err("the delete is refused");
    assert!(matches!(err, LockError::PermissionDenied { .. }), "{err:?}");
    let err = fresh.try_acquire(&n).await.expect_err("still locked");
    assert!(matches!(err, LockError::Locked { .. }), "{err}");

    // The lease is given up: its other guard is told, and the name is free
    // once etcd expires the lease (no shutdown needed).
    let reason = tokio::time::timeout(Duration::from_secs(5), other_guard.lost())
        .await
        .expect("the lease's other guard is lost");
    assert!(reason.contains("cannot be deleted"), "{reason}");
    let free = fresh
        .acquire(&n, Duration::from_secs(ttl_secs + 3))
        .await
        .expect("free once the lease expired");
    assert!(
        released.elapsed() > Duration::from_secs(1),
        "freed after {:?}: before the lease expired?",
        released.elapsed()
    );
    free.release().await.expect("release");
    drop(other_guard);
    // Shutting down cannot revoke a lease of that token either.
    let _ = stale.shutdown().await;
    fresh.shutdown().await.expect("shutdown");
    assert_no_keys_left(&etcd).await;
}

/// A waiter whose name is first watched on a watch stream opened before the
/// locker's token expired. etcd checks a watch against the token the stream
/// was opened with, so it refuses that watch ("permission denied") although
/// the locker has a fresh token by then. The watcher moves the name to a
/// fresh stream, opened with the fresh token (it used to give the name up,
/// and the waiter waited out its timeout: 423). With JWT tokens (a fixed
/// lifetime) any stream older than the token TTL does this.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_granted_on_a_watch_stream_older_than_the_token() {
    let (etcd, user) = etcd_with_expiring_tokens().await;
    let holder = locker_with(&etcd, as_user(&etcd, &user, true), 3).await;
    let waiter = locker_with(&etcd, as_user(&etcd, &user, true), 3).await;
    let (first, second) = (name("first"), name("second"));
    let held_first = holder.try_acquire(&first).await.expect("try");
    let held_second = holder.try_acquire(&second).await.expect("try");
    // The waiter's stream opens now and stays open (a name is waited on).
    let waiting_first = tokio::spawn({
        let (waiter, first) = (waiter.clone(), first.clone());
        async move { waiter.acquire(&first, Duration::from_secs(30)).await }
    });
    eventually("in line for the first", Duration::from_secs(5), || {
        let (waiter, first) = (waiter.clone(), first.clone());
        async move { waiter.watches(&first) }
    })
    .await;
    // Nothing tells when a token expired (using it would keep it alive).
    tokio::time::sleep(TOKEN_EXPIRED).await;
    let waiting_second = tokio::spawn({
        let (waiter, second) = (waiter.clone(), second.clone());
        async move { waiter.acquire(&second, Duration::from_secs(5)).await }
    });
    // Its key is put (with a refreshed token) before it can be in line.
    eventually("the second waiter's key", Duration::from_secs(5), || {
        let (etcd, prefix) = (&etcd, waiter.key_prefix(&second));
        async move { keys_under(etcd, &prefix).await.len() == 2 }
    })
    .await;
    held_second.release().await.expect("release");
    let granted = waiting_second
        .await
        .expect("task")
        .expect("granted after the release");
    granted.release().await.expect("release");
    held_first.release().await.expect("release");
    waiting_first
        .await
        .expect("task")
        .expect("granted")
        .release()
        .await
        .expect("release");
    holder.shutdown().await.expect("shutdown");
    waiter.shutdown().await.expect("shutdown");
    assert_no_keys_left(&etcd).await;
}
