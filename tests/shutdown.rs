//! A clean exit (issue 8.7): `shutdown()` refuses new acquisitions, ends
//! waiting ones, finishes releases in flight, frees what is still held,
//! revokes the lease and stops the locker's tasks, without a "lease lost"
//! warning; and an app stopped right after a request leaves nothing behind.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use common::*;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_lease_lock::etcd::EtcdLocker;
use tower_lease_lock::testing::EtcdServer;
use tower_lease_lock::{Key, LockError, LockLayer, LockName, Locker, MemoryLocker};

/// Leases etcd knows about right now.
async fn leases(etcd: &EtcdServer) -> Vec<i64> {
    let mut client = etcd.client().await.expect("connect");
    let resp = client.leases().await.expect("leases");
    resp.leases().iter().map(|l| l.id()).collect()
}

fn runtime(current_thread: bool) -> tokio::runtime::Runtime {
    let mut builder = if current_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build().expect("runtime")
}

/// An app that keeps a locker clone in its state, on a current-thread
/// runtime (as `#[tokio::main(flavor = "current_thread")]` runs it), stopped
/// right after a request: the release its response spawned would be cut off
/// by the runtime's end. With `shutdown()` another replica takes the name at
/// once, and neither a key nor a lease is left.
#[test]
fn an_app_stopped_right_after_a_request_leaves_nothing() {
    let tests = runtime(false);
    let etcd = tests.block_on(etcd());
    let endpoints = etcd.endpoints();
    for round in 0..5 {
        let app_runtime = runtime(true);
        app_runtime.block_on(async {
            let locker = EtcdLocker::connect(&endpoints, None)
                .await
                .expect("connect")
                .namespace(NS)
                .build()
                .expect("locker");
            let app = Router::new()
                .route("/tenants/{tenant}", post(|| async { "done" }))
                .route_layer(LockLayer::new(
                    locker.clone(),
                    Key::path_param("tenant").expect("key"),
                ))
                .with_state(locker.clone());
            let request = axum::http::Request::post("/tenants/acme")
                .body(Body::empty())
                .expect("request");
            let response = app.oneshot(request).await.expect("response");
            assert_eq!(response.status(), 200, "round {round}");
            // The body ends: the lock's release is spawned on this runtime.
            response.into_body().collect().await.expect("body");
            // What the demo does once `axum::serve(..)` returned.
            locker.shutdown().await.expect("shutdown");
        });
        drop(app_runtime);
        tests.block_on(async {
            let other = locker(&etcd, 10).await;
            let name = LockName::new("acme").unwrap();
            let started = Instant::now();
            let guard = other
                .try_acquire(&name)
                .await
                .unwrap_or_else(|e| panic!("round {round}: not free at once: {e}"));
            assert!(started.elapsed() < Duration::from_secs(2));
            let ours = guard.lease_id().expect("lease");
            assert_eq!(
                leases(&etcd).await,
                vec![ours],
                "round {round}: leases left"
            );
            guard.release().await.expect("release");
            other.shutdown().await.expect("shutdown");
            assert_no_keys_left(&etcd).await;
            assert!(leases(&etcd).await.is_empty(), "round {round}: leases left");
        });
    }
}

/// Log lines written while a test runs.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[test]
fn shutdown_ends_everything_quietly() {
    let logs = Capture::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);
    // One thread: every task of the locker runs under the capture.
    runtime(true).block_on(async {
        let etcd = etcd().await;
        let holder = locker(&etcd, 10).await;
        let a = locker(&etcd, 10).await;
        // After a first request (the client's connection task starts with
        // it), with the lease's renewal task running.
        a.ensure_lease().await.expect("lease");
        let contended = LockName::new("contended").unwrap();
        let blocker = holder.try_acquire(&contended).await.expect("blocker");
        let tasks_before = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();

        let held = a
            .try_acquire(&LockName::new("held").unwrap())
            .await
            .expect("held");
        let waiting = tokio::spawn({
            let (a, contended) = (a.clone(), contended.clone());
            async move { a.acquire(&contended, Duration::from_secs(60)).await }
        });
        eventually("a waits in line", Duration::from_secs(5), || async {
            a.watches(&contended)
        })
        .await;
        let ours = held.lease_id().expect("lease");

        let started = Instant::now();
        a.shutdown().await.expect("shutdown");
        eprintln!("shutdown took {:?}", started.elapsed());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );

        // The waiter ended, new acquisitions are refused.
        let ended = waiting.await.unwrap().expect_err("shut down while waiting");
        assert!(matches!(ended, LockError::Unavailable { .. }), "{ended}");
        assert!(ended.to_string().contains("shut down"), "{ended}");
        let refused = a.try_acquire(&contended).await.expect_err("refused");
        assert!(refused.to_string().contains("shut down"), "{refused}");

        // What was held is gone at once, and its guard knows why.
        let reason = tokio::time::timeout(Duration::from_secs(1), held.lost())
            .await
            .expect("the held lock is lost");
        assert!(reason.contains("shut down"), "{reason}");
        assert!(
            !leases(&etcd).await.contains(&ours),
            "our lease was revoked"
        );
        assert_eq!(
            keys_under(&etcd, &a.key_prefix(&LockName::new("held").unwrap()))
                .await
                .len(),
            0
        );
        held.release()
            .await
            .expect("releasing after shutdown is fine");
        assert_eq!(a.own_keys(), 0);

        // Its tasks stopped: the watch task started since, and the lease's
        // renewal task that was running before.
        eventually("tasks stopped", Duration::from_secs(2), || async {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
                < tasks_before
        })
        .await;
        a.shutdown().await.expect("a second shutdown is a no-op");
        drop(blocker);
        assert_no_keys_left(&etcd).await;
    });
    let text = logs.text();
    assert!(!text.contains("lease lost"), "a clean exit logged:\n{text}");
}

#[tokio::test]
async fn memory_locker_shuts_down_too() {
    let locker = MemoryLocker::new();
    let name = LockName::new("m").unwrap();
    let held = locker.try_acquire(&name).await.expect("held");
    let waiting = tokio::spawn({
        let (locker, name) = (locker.clone(), name.clone());
        async move { locker.acquire(&name, Duration::from_secs(60)).await }
    });
    tokio::task::yield_now().await;
    locker.shutdown().await.expect("shutdown");
    let ended = waiting.await.unwrap().expect_err("ended");
    assert!(ended.to_string().contains("shut down"), "{ended}");
    assert!(locker
        .try_acquire(&LockName::new("other").unwrap())
        .await
        .is_err());
    drop(held);
    assert_eq!(locker.active_names(), 0);
}
