//! Fault tests on a real 3-member etcd cluster: a member killed or paused
//! while locks are held and awaited.

mod common;

use std::time::{Duration, Instant};

use tower_lease_lock::etcd::EtcdLocker;
use tower_lease_lock::testing::EtcdCluster;
use tower_lease_lock::{LockError, LockName, Locker};

async fn cluster_locker(cluster: &EtcdCluster, ttl: u64) -> EtcdLocker {
    EtcdLocker::builder(cluster.client().await.expect("connect"))
        .namespace(common::NS)
        .ttl(Duration::from_secs(ttl))
        .request_timeout(Duration::from_secs(2))
        .build()
        .expect("locker")
}

/// Keys under the test namespace; `None` while the request fails (it may go
/// to a dead member).
async fn keys_left(cluster: &EtcdCluster) -> Option<usize> {
    let mut c = cluster.client().await.ok()?;
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only();
    let resp = c.get(common::NS, Some(options)).await.ok()?;
    usize::try_from(resp.count()).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lock_survives_losing_one_member() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut cluster = EtcdCluster::start().await.expect("cluster");
    let holder = cluster_locker(&cluster, 3).await;
    let other = cluster_locker(&cluster, 3).await;
    let name = LockName::new("survivor").unwrap();
    let guard = holder.try_acquire(&name).await.expect("acquire");

    // A waiter queued behind the holder, through the fault.
    let waiter = tokio::spawn({
        let (other, name) = (other.clone(), name.clone());
        async move { other.acquire(&name, Duration::from_secs(30)).await }
    });

    // The waiter's key is in line before the fault.
    common::eventually("the waiter queued", Duration::from_secs(5), || async {
        keys_left(&cluster).await == Some(2)
    })
    .await;
    cluster.member(0).unwrap().kill();
    // Longer than two TTLs: renewal must have gone through the other members.
    let lost = tokio::time::timeout(Duration::from_secs(7), guard.lost()).await;
    assert!(
        lost.is_err(),
        "lock lost although a quorum stayed up: {lost:?}"
    );
    eprintln!("not lost");
    if waiter.is_finished() {
        panic!(
            "the waiter finished while the lock was held: {:?}",
            waiter.await
        );
    }

    let token = guard.token();
    guard.release().await.ok(); // a failed delete is retried in the background
    let next = waiter
        .await
        .unwrap()
        .expect("the waiter acquires after the release");
    assert!(next.token() > token);
    drop(next);

    cluster.member(0).unwrap().restart().expect("restart");
    common::eventually("no keys left", Duration::from_secs(10), || async {
        keys_left(&cluster).await == Some(0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_member_does_not_hang_acquisitions() {
    let mut cluster = EtcdCluster::start().await.expect("cluster");
    let locker = cluster_locker(&cluster, 3).await;
    let name = LockName::new("paused").unwrap();
    cluster.member(1).unwrap().pause();
    // Requests routed to the frozen member time out (bounded); the others
    // answer. Every attempt ends within the request timeout plus slack.
    let mut acquired = 0;
    for _ in 0..6 {
        let t0 = Instant::now();
        match locker.try_acquire(&name).await {
            Ok(g) => {
                acquired += 1;
                g.release().await.ok();
            }
            Err(LockError::Unavailable { .. }) => {}
            Err(e) => panic!("unexpected: {e}"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(6),
            "an attempt hung for {:?}",
            t0.elapsed()
        );
    }
    assert!(acquired > 0, "no acquisition succeeded with a quorum up");
    cluster.member(1).unwrap().resume();
    common::eventually("no keys left", Duration::from_secs(10), || async {
        keys_left(&cluster).await == Some(0)
    })
    .await;
}
