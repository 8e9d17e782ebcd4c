//! The connect recipe (issue 8.8): `connect_options` bounds every request
//! and keeps a dead path from hanging, without cutting the locker's
//! long-lived streams (watches, which wait as long as a lock is held).

mod common;

use std::time::{Duration, Instant};

use common::*;
use tower_lease_lock::etcd::{connect_options, EtcdLocker};
use tower_lease_lock::{LockName, Locker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_longer_than_the_client_timeout_is_not_cut() {
    let etcd = etcd().await;
    let timeout = Duration::from_millis(500);
    let waiter = EtcdLocker::connect(etcd.endpoints(), Some(connect_options(timeout)))
        .await
        .expect("connect")
        .namespace(NS)
        .request_timeout(timeout)
        .build()
        .expect("locker");
    let holder = locker(&etcd, 10).await;
    let name = LockName::new("long-wait").unwrap();
    let held = holder.try_acquire(&name).await.expect("hold");
    let waiting = tokio::spawn({
        let (waiter, name) = (waiter.clone(), name.clone());
        async move { waiter.acquire(&name, Duration::from_secs(30)).await }
    });
    // Ten client timeouts.
    tokio::time::sleep(timeout * 10).await;
    let released = Instant::now();
    held.release().await.expect("release");
    let guard = waiting.await.unwrap().expect("granted");
    assert!(
        released.elapsed() < Duration::from_secs(1),
        "{:?}",
        released.elapsed()
    );
    assert_eq!(
        waiter.diagnostics().watch_restarts,
        0,
        "the watch stream was cut"
    );
    guard.release().await.expect("release");
    assert_no_keys_left(&etcd).await;
}

#[tokio::test]
async fn an_unreachable_endpoint_fails_within_the_request_timeout() {
    // A port nobody listens on: connections are refused.
    let port = tower_lease_lock::testing::free_port().expect("port");
    let timeout = Duration::from_millis(800);
    let locker = EtcdLocker::connect(
        [format!("http://127.0.0.1:{port}")],
        Some(connect_options(timeout)),
    )
    .await
    .expect("connect is lazy")
    .request_timeout(timeout)
    .build()
    .expect("locker");
    let started = Instant::now();
    let err = locker
        .try_acquire(&LockName::new("nowhere").unwrap())
        .await
        .expect_err("no etcd");
    assert!(
        matches!(err, tower_lease_lock::LockError::Unavailable { .. }),
        "{err}"
    );
    assert!(
        started.elapsed() <= timeout + Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
}
