//! Network partitions through `testing::TcpProxy` (issue 8.9): a holder cut
//! off from etcd gives its lock up before anyone else can be granted it, a
//! waiter cut off while queued ends cleanly, and a full outage answers 503
//! in bounded time and recovers within 2 s.

mod common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use common::*;
use tower::ServiceExt;
use tower_lease_lock::etcd::{connect_options, EtcdLocker};
use tower_lease_lock::testing::{EtcdCluster, TcpProxy};
use tower_lease_lock::{Key, LockError, LockLayer, LockName, Locker};

/// A locker whose only way to etcd is `proxy`.
async fn behind(proxy: &TcpProxy, ttl: u64) -> EtcdLocker {
    EtcdLocker::connect([proxy.endpoint()], None)
        .await
        .expect("connect")
        .namespace(NS)
        .ttl(Duration::from_secs(ttl))
        .build()
        .expect("locker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_holder_gives_up_before_anyone_is_granted() {
    let etcd = etcd().await;
    let proxy = TcpProxy::start(&etcd.endpoints()[0]).await.expect("proxy");
    let holder = behind(&proxy, 4).await;
    let other = locker(&etcd, 10).await;
    let name = LockName::new("partitioned-holder").unwrap();

    let guard = holder.try_acquire(&name).await.expect("acquire");
    let old_lease = guard.lease_id().expect("lease");
    let lost = tokio::spawn({
        let lost = guard.lost();
        async move {
            let reason = lost.await;
            (Instant::now(), reason)
        }
    });
    proxy.blackhole();
    let cut = Instant::now();
    let granted = other
        .acquire(&name, Duration::from_secs(30))
        .await
        .expect("granted once the holder's lease expired");
    let granted_at = Instant::now();
    let (lost_at, reason) = lost.await.expect("lost task");
    eprintln!(
        "cut at 0; holder lost at {:?} ({reason}); other granted at {:?}; margin {:?}",
        lost_at - cut,
        granted_at - cut,
        granted_at.saturating_duration_since(lost_at)
    );
    assert!(
        lost_at < granted_at,
        "the holder still trusted its lock when another locker was granted it"
    );

    // Healed: the holder locks again, with a fresh lease.
    proxy.pass();
    granted.release().await.expect("release");
    let again = holder
        .acquire(&name, Duration::from_secs(10))
        .await
        .expect("the holder locks again after healing");
    assert_ne!(again.lease_id(), Some(old_lease), "a fresh lease");
    again.release().await.expect("release");
    drop(guard);
    assert_no_keys_left(&etcd).await;
    eventually(
        "the lost guard's release ran",
        Duration::from_secs(5),
        || async { holder.own_keys() == 0 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_partitioned_while_queued_ends_cleanly() {
    let etcd = etcd().await;
    let holder = locker(&etcd, 10).await;
    for (round, partition) in [Duration::from_millis(1500), Duration::from_secs(6)]
        .into_iter()
        .enumerate()
    {
        let proxy = TcpProxy::start(&etcd.endpoints()[0]).await.expect("proxy");
        let waiter = behind(&proxy, 4).await;
        let name = LockName::new(format!("partitioned-waiter-{round}")).unwrap();
        let held = holder.try_acquire(&name).await.expect("hold");
        let waiting = tokio::spawn({
            let (waiter, name) = (waiter.clone(), name.clone());
            async move { waiter.acquire(&name, Duration::from_secs(5)).await }
        });
        eventually("the waiter is in line", Duration::from_secs(5), || async {
            keys_under(&etcd, &waiter.key_prefix(&name)).await.len() == 2
        })
        .await;
        proxy.blackhole();
        held.release().await.expect("release");
        tokio::time::sleep(partition).await; // time is the subject here
        proxy.pass();
        let outcome = waiting.await.expect("waiter task");
        eprintln!("partitioned {partition:?} while queued: {outcome:?}");
        match outcome {
            Ok(guard) => guard.release().await.expect("release"),
            Err(
                LockError::Timeout { .. } | LockError::Unavailable { .. } | LockError::Lost { .. },
            ) => {}
            Err(other) => panic!("unexpected: {other}"),
        }
        // The waiter's key goes: deleted, or with its lease (TTL 4 s).
        eventually("no key left", Duration::from_secs(10), || async {
            waiter.own_keys() == 0
                && keys_under(&etcd, &waiter.key_prefix(&name))
                    .await
                    .is_empty()
        })
        .await;
    }
    assert_no_keys_left(&etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outage_answers_503_in_bounded_time_and_recovers() {
    let mut cluster = EtcdCluster::start().await.expect("cluster");
    let request_timeout = Duration::from_secs(1);
    let locker = EtcdLocker::connect(cluster.endpoints(), Some(connect_options(request_timeout)))
        .await
        .expect("connect")
        .namespace(NS)
        .ttl(Duration::from_secs(5))
        .request_timeout(request_timeout)
        .build()
        .expect("locker");
    let app = Router::new()
        .route("/tenants/{tenant}", post(|| async { "ok" }))
        .route_layer(LockLayer::new(
            locker.clone(),
            Key::path_param("tenant").unwrap(),
        ));
    let call = |tenant: &str| {
        let request = axum::http::Request::post(format!("/tenants/{tenant}"))
            .body(Body::empty())
            .unwrap();
        let app = app.clone();
        async move {
            let started = Instant::now();
            let response = app.oneshot(request).await.expect("infallible");
            (response.status(), started.elapsed())
        }
    };
    assert_eq!(call("before").await.0, 200);

    for i in 0..3 {
        cluster.member(i).unwrap().kill();
    }
    let down = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut answered = 0;
    while down.elapsed() < Duration::from_secs(10) {
        let (status, took) = call(&format!("outage-{answered}")).await;
        eprintln!("{:?} into the outage: {status} in {took:?}", down.elapsed());
        assert_eq!(status, 503, "during the outage");
        assert!(
            took <= request_timeout + Duration::from_millis(500),
            "a request took {took:?} during the outage"
        );
        slowest = slowest.max(took);
        answered += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in 0..3 {
        cluster.member(i).unwrap().restart().expect("restart");
    }
    cluster.wait_ready().await.expect("the cluster answers");
    let recovered = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (status, _) = call("after").await;
        if status == 200 {
            break;
        }
        assert!(
            recovered.elapsed() < Duration::from_secs(2),
            "still {status} {:?} after recovery",
            recovered.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "outage: {answered} requests answered 503, slowest {slowest:?}; \
         200 again {:?} after the cluster answered ({attempts} tries)",
        recovered.elapsed()
    );
    eventually("no keys left", Duration::from_secs(10), || async {
        let Ok(mut client) = cluster.client().await else {
            return false;
        };
        let options = etcd_client::GetOptions::new()
            .with_prefix()
            .with_count_only();
        client
            .get(NS, Some(options))
            .await
            .is_ok_and(|r| r.count() == 0)
    })
    .await;
}

/// Compaction while waiting: the waiter's stream is cut, and by the time a
/// new one resumes the name's watch, etcd has compacted past the revision it
/// resumes from. The name starts over (a fresh watch and read) and the
/// waiter is still granted when the holder leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_survives_compaction_past_its_resume_point() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let etcd = etcd().await;
    let proxy = TcpProxy::start(&etcd.endpoints()[0]).await.expect("proxy");
    let waiter = behind(&proxy, 10).await;
    let holder = locker(&etcd, 10).await;
    let name = LockName::new("compacted").unwrap();
    let held = holder.try_acquire(&name).await.expect("hold");
    let waiting = tokio::spawn({
        let (waiter, name) = (waiter.clone(), name.clone());
        async move { waiter.acquire(&name, Duration::from_secs(20)).await }
    });
    eventually("the waiter watches", Duration::from_secs(5), || async {
        waiter.own_keys() == 1 && waiter.diagnostics().server_watches == 1
    })
    .await;
    // History moves on and is compacted away.
    let mut client = etcd.client().await.expect("connect");
    for i in 0..5 {
        client
            .put(format!("elsewhere/{i}"), "x", None)
            .await
            .expect("put");
    }
    let revision = client
        .get("elsewhere/0", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();
    client.compact(revision, None).await.expect("compact");
    // The stream breaks; its replacement cannot resume from before `revision`.
    proxy.cut();
    eventually("a new stream", Duration::from_secs(5), || async {
        waiter.diagnostics().watch_restarts >= 1 && waiter.diagnostics().server_watches == 1
    })
    .await;
    let released = Instant::now();
    held.release().await.expect("release");
    let guard = waiting.await.unwrap().expect("granted after compaction");
    eprintln!("granted {:?} after the release", released.elapsed());
    assert!(released.elapsed() < Duration::from_secs(2));
    guard.release().await.expect("release");
    let mut client = etcd.client().await.expect("connect");
    client
        .delete(
            "elsewhere/",
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .expect("clean up");
    assert_no_keys_left(&etcd).await;
}
