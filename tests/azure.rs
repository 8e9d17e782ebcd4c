//! The Azure blob lease backend against a real Azurite (started per test,
//! killed when dropped): races, exclusion, waiting, fencing tokens, loss,
//! a killed holder, configuration errors, an unreachable service, and the
//! layer end to end.
#![cfg(all(feature = "azure", feature = "test-util"))]

mod common;

use common::body::ChannelBody;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::routing::post;
use axum::Router;
use azure_core::http::RequestContent;
use azure_storage_blob::models::{
    BlobClientAcquireLeaseOptions, BlobClientBreakLeaseOptions,
    BlobClientGetPropertiesResultHeaders, LeaseState,
};
use azure_storage_blob::BlobContainerClient;
use bytes::Bytes;
use common::process::Proc;
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tower::ServiceExt;
use tower_lease_lock::azure::{AzureBlobLocker, AzureConfigError};
use tower_lease_lock::testing::{Azurite, ProxyMode, TcpProxy};
use tower_lease_lock::{InvalidName, Key, LockError, LockLayer, LockMode, LockName, Locker, Wait};

const SOON: Duration = Duration::from_secs(10);

fn name(s: &str) -> LockName {
    LockName::new(s).expect("valid name")
}

async fn azurite() -> (Azurite, BlobContainerClient) {
    let azurite = Azurite::start().await.expect("start azurite");
    let container = azurite.container("locks").await.expect("create container");
    (azurite, container)
}

async fn container(azurite: &Azurite) -> BlobContainerClient {
    let url = azurite.container_url("locks").expect("container url");
    BlobContainerClient::new(url, None, None).expect("container client")
}

/// A locker on its own client: 15 s leases renewed every second (a broken
/// lease is noticed within about a second), quick polls.
async fn locker(azurite: &Azurite) -> AzureBlobLocker {
    AzureBlobLocker::builder(container(azurite).await)
        .lease_duration(Duration::from_secs(15))
        .renewal_cadence(Duration::from_secs(1))
        .request_timeout(Duration::from_secs(2))
        .busy_wait(Duration::from_millis(20), Duration::from_millis(100))
        .build()
        .expect("build locker")
}

async fn lease_state(container: &BlobContainerClient, blob: &str) -> Option<LeaseState> {
    let properties = container
        .blob_client(blob)
        .get_properties(None)
        .await
        .expect("blob properties");
    properties.lease_state().expect("lease state")
}

async fn soon<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(SOON, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {SOON:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_lockers_race_thirty_rounds_one_winner_each() {
    let (azurite, _container) = azurite().await;
    let mut lockers = Vec::new();
    for _ in 0..16 {
        lockers.push(locker(&azurite).await);
    }
    for round in 0..30 {
        let lock = name(&format!("race-{round}"));
        let tries = lockers.iter().map(|l| {
            let (l, lock) = (l.clone(), lock.clone());
            tokio::spawn(async move { l.try_acquire(&lock).await })
        });
        let mut results = Vec::new();
        for task in tries.collect::<Vec<_>>() {
            results.push(task.await);
        }
        let mut winners = Vec::new();
        for result in results {
            match result.expect("task") {
                Ok(guard) => winners.push(guard),
                Err(LockError::Locked { .. }) => {}
                Err(other) => panic!("round {round}: unexpected error {other}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one winner");
        assert_eq!(winners[0].token(), 1, "a fresh blob's first token is 1");
        winners
            .pop()
            .expect("winner")
            .release()
            .await
            .expect("release");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_tasks_on_two_lockers_exclude_each_other() {
    let (azurite, _container) = azurite().await;
    let lockers = [locker(&azurite).await, locker(&azurite).await];
    let counter = Arc::new(AtomicUsize::new(0));
    let inside = Arc::new(AtomicUsize::new(0));
    let lock = name("counter");
    let mut tasks = Vec::new();
    for task in 0..8 {
        let locker = lockers[task % 2].clone();
        let (counter, inside, lock) = (counter.clone(), inside.clone(), lock.clone());
        tasks.push(tokio::spawn(async move {
            let mut tokens = Vec::new();
            for _ in 0..4 {
                let guard = locker
                    .acquire(&lock, Duration::from_secs(60))
                    .await
                    .expect("acquire");
                assert_eq!(inside.fetch_add(1, SeqCst), 0, "two holders at once");
                // A non-atomic increment: a lost update shows a double holder.
                let value = counter.load(SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                counter.store(value + 1, SeqCst);
                inside.fetch_sub(1, SeqCst);
                tokens.push(guard.token());
                guard.release().await.expect("release");
            }
            tokens
        }));
    }
    let mut tokens = Vec::new();
    for task in tasks {
        tokens.extend(task.await.expect("task"));
    }
    assert_eq!(counter.load(SeqCst), 32);
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), 32, "every holder had its own token");
    for locker in &lockers {
        assert_eq!(locker.diagnostics().held, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_times_out_or_is_cancelled_and_leaves_nothing() {
    let (azurite, container) = azurite().await;
    let (a, b) = (locker(&azurite).await, locker(&azurite).await);
    let lock = name("tenant-1");
    let held = a.try_acquire(&lock).await.expect("a holds");

    let started = Instant::now();
    match b.acquire(&lock, Duration::from_millis(600)).await {
        Err(LockError::Timeout { .. }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // Cancelled: a wait dropped after it polled a few times.
    let waiting = tokio::spawn({
        let (b, lock) = (b.clone(), lock.clone());
        async move { b.acquire(&lock, Duration::from_secs(60)).await }
    });
    common::eventually("b polls the name", SOON, || {
        let b = b.clone();
        async move { b.diagnostics().observe_requests >= 3 }
    })
    .await;
    waiting.abort();
    let _ = waiting.await;
    common::eventually("b's poller ends", SOON, || {
        let b = b.clone();
        async move { b.diagnostics().waiting_names == 0 }
    })
    .await;
    assert_eq!(b.diagnostics().held, 0);

    held.release().await.expect("release");
    assert_eq!(
        lease_state(&container, "tenant-1").await,
        Some(LeaseState::Available),
        "released, and no lease of b's left behind"
    );
    let again = b.try_acquire(&lock).await.expect("b takes it now");
    assert_eq!(again.token(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_gets_the_lock_when_it_is_released() {
    let (azurite, _container) = azurite().await;
    let (a, b) = (locker(&azurite).await, locker(&azurite).await);
    let lock = name("handoff");
    let held = a.try_acquire(&lock).await.expect("a holds");
    let waiting_since = Instant::now();
    let waiter = tokio::spawn({
        let (b, lock) = (b.clone(), lock.clone());
        async move { b.acquire(&lock, Duration::from_secs(30)).await }
    });
    common::eventually("b polls twice", SOON, || {
        let b = b.clone();
        async move { b.diagnostics().observe_requests >= 2 }
    })
    .await;
    let first = held.token();
    let released_after = waiting_since.elapsed();
    held.release().await.expect("release");
    let guard = soon("the waiter's grant", waiter)
        .await
        .expect("task")
        .expect("b gets it");
    assert!(guard.token() > first);
    // The guard tells the waiter's own wait, not the poller's last request.
    assert!(
        guard.info().waited() >= released_after,
        "waited {:?}, released after {released_after:?}",
        guard.info().waited()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_lease_is_lost_and_the_next_holder_has_a_greater_token() {
    let (azurite, container) = azurite().await;
    let (a, b) = (locker(&azurite).await, locker(&azurite).await);
    let lock = name("fenced");
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let guard = a.try_acquire(&lock).await.expect("a");
        tokens.push(guard.token());
        drop(guard); // released in the background
        common::eventually("released", SOON, || async {
            lease_state(&container, "fenced").await != Some(LeaseState::Leased)
        })
        .await;
    }
    let held = a.try_acquire(&lock).await.expect("a again");
    tokens.push(held.token());
    assert!(
        matches!(b.try_acquire(&lock).await, Err(LockError::Locked { .. })),
        "held"
    );

    // Broken from outside (an operator, or DistributedLock's break).
    let options = BlobClientBreakLeaseOptions {
        break_period: Some(0),
        ..Default::default()
    };
    container
        .blob_client("fenced")
        .break_lease(Some(options))
        .await
        .expect("break the lease");
    let reason = soon("the lost signal", held.lost()).await;
    assert!(held.is_lost(), "{reason}");

    let taken = b.try_acquire(&lock).await.expect("b takes over");
    tokens.push(taken.token());
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens strictly increase: {tokens:?}"
    );
    // The lost guard is still a's until dropped (its release is harmless).
    assert_eq!(a.diagnostics().held, 1);
    held.release()
        .await
        .expect("releasing a lost lease is harmless");
    assert_eq!(a.diagnostics().held, 0);
    assert_eq!(
        lease_state(&container, "fenced").await,
        Some(LeaseState::Leased),
        "b's lease stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_when_renewals_stop_answering() {
    let (azurite, _container) = azurite().await;
    let a = locker(&azurite).await;
    let guard = a.try_acquire(&name("frozen")).await.expect("a");
    let stopped = Instant::now();
    azurite.pause().expect("pause Azurite");
    // The renewals time out; the lease's local deadline (15 s minus a 1 s
    // margin, from the last renewal sent) fires the signal.
    let lost = tokio::time::timeout(Duration::from_secs(25), guard.lost()).await;
    azurite.resume().expect("resume Azurite");
    let reason = lost.expect("lost within the lease");
    let after = stopped.elapsed();
    assert!(
        after < Duration::from_secs(15),
        "lost after {after:?}: {reason}"
    );
    assert!(
        after > Duration::from_secs(10),
        "not before the deadline: {after:?}"
    );
}

/// A try dropped at any point (before its take was sent, with it in
/// flight, with its answer unread) gives back whatever it may have taken:
/// another locker takes the name at once. A try dropped with its lease
/// acquired on the blob left that lease to expire (never, for an infinite
/// lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_dropped_at_any_point_leaves_the_name_free() {
    use std::future::Future;
    use std::task::Poll;
    let (azurite, _container) = azurite().await;
    let (a, b) = (locker(&azurite).await, locker(&azurite).await);
    for polls in 1..=6 {
        let lock = name(&format!("dropped-try-{polls}"));
        let mut trying = Box::pin(a.try_acquire(&lock));
        for _ in 0..polls {
            let polled = std::future::poll_fn(|cx| Poll::Ready(trying.as_mut().poll(cx))).await;
            if polled.is_ready() {
                break; // a guard, dropped at once (released), or an error
            }
            // Time for the request to reach Azurite and its answer to
            // come back, unread.
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        drop(trying);
        let started = Instant::now();
        let guard = loop {
            match b.try_acquire(&lock).await {
                Ok(guard) => break guard,
                Err(err) => assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "dropped after {polls} polls: the name is still taken ({err}), \
                     well within the 15 s lease"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        guard.release().await.expect("release");
    }
}

/// A guard dropped just before `shutdown()` is released in the background;
/// shutdown waits for that release, so another process can take the name
/// as soon as it returns (it returned at once, with the release still on its
/// way). Azurite is paused so that the release is surely under way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_releases_under_way() {
    let (azurite, _container) = azurite().await;
    let (a, b) = (locker(&azurite).await, locker(&azurite).await);
    let guard = a.try_acquire(&name("dropped")).await.expect("a");
    azurite.pause().expect("pause Azurite");
    drop(guard); // its release waits on the paused service
    let mut shutdown = tokio::spawn({
        let a = a.clone();
        async move { a.shutdown().await }
    });
    // What is checked is that shutdown does not return meanwhile.
    let early = tokio::time::timeout(Duration::from_millis(500), &mut shutdown).await;
    azurite.resume().expect("resume Azurite");
    assert!(
        early.is_err(),
        "shutdown returned before the release: {early:?}"
    );
    soon("the shutdown", shutdown)
        .await
        .expect("task")
        .expect("the release landed");
    let taken = b
        .try_acquire(&name("dropped"))
        .await
        .expect("free as soon as a shut down");
    taken.release().await.expect("release");
}

/// Run as a child process by `a_killed_holder_frees_the_name_within_the_lease`:
/// takes the lock, says so, and waits to be killed.
#[tokio::test]
#[ignore = "helper process of a_killed_holder_frees_the_name_within_the_lease"]
async fn child_holder() {
    let Ok(url) = std::env::var("TLL_AZURE_CHILD_CONTAINER") else {
        return; // not the child
    };
    let container =
        BlobContainerClient::new(url.parse().expect("url"), None, None).expect("container client");
    let locker = AzureBlobLocker::builder(container)
        .lease_duration(Duration::from_secs(15))
        .build()
        .expect("locker");
    let guard = locker
        .try_acquire(&name("killed"))
        .await
        .expect("child holds");
    common::process::say_held(guard.token());
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_frees_the_name_within_the_lease() {
    let (azurite, _container) = azurite().await;
    let url = azurite.container_url("locks").expect("url");
    let mut child = Proc::spawn_child_test(
        "child holder",
        "child_holder",
        &[("TLL_AZURE_CHILD_CONTAINER", url.as_str())],
    );
    let token = child.held_token(Duration::from_secs(30)).await;
    child.kill();
    let killed = Instant::now();

    let b = locker(&azurite).await;
    let guard = b
        .acquire(&name("killed"), Duration::from_secs(30))
        .await
        .expect("b takes the name once the lease expires");
    let after = killed.elapsed();
    assert!(
        after <= Duration::from_secs(17),
        "free within the lease: {after:?}"
    );
    assert!(guard.token() > token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_waiters_in_one_locker_share_one_poller_that_only_reads() {
    let (azurite, _container) = azurite().await;
    let (a, b) = (locker(&azurite).await, locker(&azurite).await);
    let lock = name("busy");
    let held = a.try_acquire(&lock).await.expect("a holds");
    // Each waiter records its token and releases at once: the next one in
    // the queue (whichever order the tasks joined it) is handed the name.
    let granted = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for _ in 0..8 {
        let (b, lock, granted) = (b.clone(), lock.clone(), granted.clone());
        waiters.push(tokio::spawn(async move {
            let guard = b.acquire(&lock, Duration::from_secs(60)).await?;
            granted.lock().unwrap().push(guard.token());
            guard.release().await
        }));
    }
    common::eventually("the poller reads 10 times", Duration::from_secs(30), || {
        let b = b.clone();
        async move { b.diagnostics().observe_requests >= 10 }
    })
    .await;
    let d = b.diagnostics();
    assert_eq!(d.waiting_names, 1, "one poller for the name");
    assert_eq!(d.take_requests, 0, "a busy name is only read: {d:?}");
    held.release().await.expect("release");
    // The waiters get the lock one after the other, each from the last.
    for waiter in waiters {
        soon("every waiter's turn", waiter)
            .await
            .expect("task")
            .expect("granted and released");
    }
    let tokens = granted.lock().unwrap().clone();
    assert_eq!(tokens.len(), 8);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "one holder after the other: {tokens:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_with_a_raw_lease_and_block_blob_counters() {
    let (azurite, container) = azurite().await;
    let a = locker(&azurite).await;
    // DistributedLock.Azure's blob: a block blob it created, leased by it.
    let blob = container.blob_client("dotnet-lock");
    blob.upload(RequestContent::from(Vec::<u8>::new()), None)
        .await
        .expect("block blob");
    let options = BlobClientAcquireLeaseOptions {
        proposed_lease_id: Some("11111111-2222-3333-4444-555555555555".into()),
        ..Default::default()
    };
    blob.acquire_lease(15, Some(options))
        .await
        .expect("their lease");
    match a.try_acquire(&name("dotnet-lock")).await {
        Err(LockError::Locked { .. }) => {}
        other => panic!("their lease excludes ours: {other:?}"),
    }
    blob.release_lease("11111111-2222-3333-4444-555555555555".into(), None)
        .await
        .expect("they release");
    let ours = a.try_acquire(&name("dotnet-lock")).await.expect("ours now");
    assert_eq!(ours.token(), 1, "counter in metadata on a block blob");
    let err = blob
        .acquire_lease(15, None)
        .await
        .expect_err("ours excludes theirs");
    assert_eq!(err.http_status().map(u16::from), Some(409));
    ours.release().await.expect("release");
    let again = a.try_acquire(&name("dotnet-lock")).await.expect("again");
    assert_eq!(again.token(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_map_to_blobs_injectively_and_too_long_ones_are_refused() {
    let (azurite, container) = azurite().await;
    let a = locker(&azurite).await;
    assert_eq!(a.blob_name(&name("tenant-42")).unwrap(), "tenant-42");
    assert_eq!(a.blob_name(&name("a/b")).unwrap(), "a%2Fb");
    assert_eq!(a.blob_name(&name("..")).unwrap(), ".%2E");
    assert_eq!(a.blob_name(&name(".")).unwrap(), "%2E");
    for n in [".", "..", "a.", "a/b", "ü/%"] {
        let guard = a.try_acquire(&name(n)).await.expect(n);
        let blob = a.blob_name(&name(n)).unwrap();
        assert_eq!(
            lease_state(&container, &blob).await,
            Some(LeaseState::Leased),
            "{n} is leased as {blob}"
        );
        drop(guard);
    }
    let long = name(&"/".repeat(400)); // 1200 characters encoded
    match a.try_acquire(&long).await {
        Err(LockError::InvalidName(InvalidName::TooLongForBackend { max: 1024, .. })) => {}
        other => panic!("expected a typed error, got {other:?}"),
    }
    match a.lock(&name("x"), LockMode::Shared, Wait::Try).await {
        Err(LockError::UnsupportedMode {
            backend: "azure", ..
        }) => {}
        other => panic!("expected UnsupportedMode, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_settings_are_typed_errors() {
    let url = "http://127.0.0.1:9/devstoreaccount1/locks".parse().unwrap();
    let container = || BlobContainerClient::new(url_clone(&url), None, None).unwrap();
    for secs in [0, 14, 61, 3600] {
        let err = AzureBlobLocker::builder(container())
            .lease_duration(Duration::from_secs(secs))
            .build()
            .expect_err("invalid duration");
        assert!(matches!(err, AzureConfigError::LeaseDuration(_)), "{err}");
    }
    let err = AzureBlobLocker::builder(container())
        .lease_duration(Duration::from_millis(15_500))
        .build()
        .expect_err("fractional");
    assert!(matches!(err, AzureConfigError::LeaseDuration(_)));
    let err = AzureBlobLocker::builder(container())
        .lease_duration(Duration::from_secs(15))
        .renewal_cadence(Duration::from_secs(10))
        .build()
        .expect_err("no room to renew");
    assert!(matches!(err, AzureConfigError::Timing(_)), "{err}");
    let err = AzureBlobLocker::builder(container())
        .busy_wait(Duration::from_secs(2), Duration::from_secs(1))
        .build()
        .expect_err("inverted range");
    assert!(matches!(err, AzureConfigError::Timing(_)), "{err}");
    let err = AzureBlobLocker::builder(container())
        .blob_prefix("locks")
        .build()
        .expect_err("prefix without a slash");
    assert!(matches!(err, AzureConfigError::Prefix { .. }), "{err}");
    for secs in [15, 60] {
        AzureBlobLocker::builder(container())
            .lease_duration(Duration::from_secs(secs))
            .build()
            .expect("valid");
    }
    let infinite = AzureBlobLocker::builder(container())
        .infinite_lease()
        .build()
        .expect("infinite");
    assert_eq!(infinite.timing().duration, None);
}

fn url_clone(url: &azure_core::http::Url) -> azure_core::http::Url {
    url.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_service_is_unavailable_within_the_request_timeout() {
    let (azurite, _container) = azurite().await;
    // Traffic through a proxy that accepts and never answers.
    let proxy = TcpProxy::start(&format!("127.0.0.1:{}", azurite.port()))
        .await
        .expect("proxy");
    proxy.blackhole();
    assert_eq!(proxy.mode(), ProxyMode::Blackhole);
    let mut url = azurite.container_url("locks").expect("url");
    url.set_port(Some(proxy.local_addr().port())).expect("port");
    // The SDK's default retry policy (8 retries over a minute) is on.
    let container = BlobContainerClient::new(url, None, None).expect("client");
    let a = AzureBlobLocker::builder(container)
        .lease_duration(Duration::from_secs(15))
        .request_timeout(Duration::from_secs(1))
        .build()
        .expect("locker");
    for wait in [Wait::Try, Wait::Timeout(Duration::from_secs(3))] {
        let started = Instant::now();
        let result = a
            .lock(&name("unreachable"), LockMode::Exclusive, wait)
            .await;
        let took = started.elapsed();
        match (wait, result) {
            (Wait::Try, Err(LockError::Unavailable { .. })) => {
                assert!(took < Duration::from_millis(1800), "try: {took:?}")
            }
            (Wait::Timeout(_), Err(LockError::Timeout { .. })) => {
                assert!(took < Duration::from_secs(5), "wait: {took:?}")
            }
            (wait, other) => panic!("{wait:?}: unexpected {other:?}"),
        }
    }
    // A refused connection (nothing listens) is unavailable too.
    let mut url = azurite.container_url("locks").expect("url");
    url.set_port(Some(tower_lease_lock::testing::free_port().expect("port")))
        .expect("port");
    let a = AzureBlobLocker::builder(BlobContainerClient::new(url, None, None).unwrap())
        .request_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let started = Instant::now();
    assert!(matches!(
        a.try_acquire(&name("refused")).await,
        Err(LockError::Unavailable { .. })
    ));
    assert!(started.elapsed() < Duration::from_millis(1800));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_answers_423_and_holds_until_the_body_ends() {
    let (azurite, container) = azurite().await;
    let locker = locker(&azurite).await;
    let bodies = Arc::new(std::sync::Mutex::new(Vec::<mpsc::Receiver<Bytes>>::new()));
    let app = Router::new()
        .route(
            "/tenants/{tenant}/stream",
            post({
                let bodies = Arc::clone(&bodies);
                move || {
                    let rx = bodies.lock().unwrap().pop();
                    async move {
                        match rx {
                            Some(rx) => Body::new(ChannelBody(rx)),
                            None => Body::from("done\n"),
                        }
                    }
                }
            }),
        )
        .route_layer(LockLayer::new(
            locker.clone(),
            Key::path_param("tenant").expect("key"),
        ));
    let request = || {
        Request::builder()
            .method(Method::POST)
            .uri("/tenants/acme/stream")
            .body(Body::empty())
            .unwrap()
    };
    let (tx, rx) = mpsc::channel(1);
    bodies.lock().unwrap().push(rx);
    let streaming = app.clone().oneshot(request()).await.expect("call");
    assert_eq!(streaming.status(), StatusCode::OK);
    assert_eq!(
        lease_state(&container, "acme").await,
        Some(LeaseState::Leased)
    );

    let second = app.clone().oneshot(request()).await.expect("call");
    assert_eq!(
        second.status(),
        StatusCode::LOCKED,
        "held while the body streams"
    );

    tx.send(Bytes::from("chunk\n")).await.expect("send");
    drop(tx);
    let body = streaming
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(&body[..], b"chunk\n");
    common::eventually("released when the body ended", SOON, || async {
        lease_state(&container, "acme").await == Some(LeaseState::Available)
    })
    .await;
    let third = app.clone().oneshot(request()).await.expect("call");
    assert_eq!(third.status(), StatusCode::OK);
}
