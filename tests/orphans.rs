//! Keys of ours that nobody tracks (issue 8.4 and 8.5).
//!
//! A put whose outcome was unknown can be applied after the acquisition gave
//! up on it: the key then exists under our live lease with nobody holding
//! it. These tests make such a key by hand (the lease id and key layout of
//! a late put) and check that it never holds its name: an acquisition that
//! meets it deletes it, and while a retired lease lives, the key of its
//! uncertain put is swept.

mod common;

use std::time::Duration;

use common::*;
use etcd_client::PutOptions;
use tower_lease_lock::etcd::EtcdLocker;
use tower_lease_lock::testing::EtcdServer;
use tower_lease_lock::{LockError, LockMode, LockName, Locker, Wait};

/// Puts `key` (absent) under `lease`, as a late put of ours would; returns
/// its create revision. (A locker that meets it may delete it at once.)
async fn put_late(etcd: &EtcdServer, key: &str, lease: i64) -> i64 {
    let mut client = etcd.client().await.expect("connect");
    let put = client
        .put(key, "late", Some(PutOptions::new().with_lease(lease)))
        .await
        .expect("put");
    put.header().expect("header").revision()
}

/// The key an acquisition of `locker` on `name` uses for `slot` (the layout
/// of `EtcdLocker::key_prefix` + `<lease hex>-<slot hex>`).
fn key_of(locker: &EtcdLocker, name: &LockName, mode: LockMode, lease: i64, slot: u64) -> String {
    let prefix = locker.key_prefix(name);
    match mode {
        LockMode::Shared => format!("{prefix}~r/{lease:x}-{slot:x}"),
        _ => format!("{prefix}{lease:x}-{slot:x}"),
    }
}

/// Our own next key already exists (a late put landed on it): the put must
/// not adopt it (its create revision would be a stale token) and must not
/// wait behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_on_our_own_next_key_is_cleared_not_adopted() {
    let etcd = etcd().await;
    let a = locker(&etcd, 10).await;
    let lease = a.ensure_lease().await.expect("lease");
    for (i, (mode, wait)) in [
        (LockMode::Exclusive, Wait::Try),
        (LockMode::Exclusive, Wait::Timeout(Duration::from_secs(3))),
        (LockMode::Shared, Wait::Try),
        (LockMode::Shared, Wait::Timeout(Duration::from_secs(3))),
    ]
    .into_iter()
    .enumerate()
    {
        let name = LockName::new(format!("own-orphan-{i}")).unwrap();
        let key = key_of(&a, &name, mode, lease, 0);
        let stale = put_late(&etcd, &key, lease).await;
        let guard = a
            .lock(&name, mode, wait)
            .await
            .unwrap_or_else(|e| panic!("{mode} {wait:?}: {e}"));
        assert_eq!(guard.key(), Some(key.as_str()));
        let now = create_revision(&etcd, &key).await.expect("held");
        assert!(now > stale, "the stale key was adopted");
        assert_eq!(
            guard.token(),
            u64::try_from(now).unwrap(),
            "token = create revision"
        );
        guard.release().await.expect("release");
    }
    assert_no_keys_left(&etcd).await;
}

/// An orphan elsewhere in the name's queue (another slot) must not make a
/// waiter wait, nor a try fail for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_in_the_queue_is_cleared() {
    let etcd = etcd().await;
    let a = locker(&etcd, 10).await;
    let b = locker(&etcd, 10).await;
    let lease = a.ensure_lease().await.expect("lease");

    // Wait mode: the orphan sits first in line when the waiter arrives.
    let name = LockName::new("queue-orphan-wait").unwrap();
    put_late(
        &etcd,
        &key_of(&a, &name, LockMode::Exclusive, lease, 7),
        lease,
    )
    .await;
    let guard = a
        .acquire(&name, Duration::from_secs(3))
        .await
        .expect("not held up by the orphan");
    guard.release().await.expect("release");

    // Wait mode: the orphan appears while we wait behind a real holder.
    let name = LockName::new("queue-orphan-late").unwrap();
    let held = b.try_acquire(&name).await.expect("b holds");
    let waiting = tokio::spawn({
        let (a, name) = (a.clone(), name.clone());
        async move { a.acquire(&name, Duration::from_secs(5)).await }
    });
    eventually("a is in line", Duration::from_secs(5), || async {
        keys_under(&etcd, &a.key_prefix(&name)).await.len() == 2
    })
    .await;
    // Created after a's key: it is behind a in line, but a late put of an
    // earlier acquisition could as well have landed before a.
    put_late(
        &etcd,
        &key_of(&a, &name, LockMode::Exclusive, lease, 9),
        lease,
    )
    .await;
    held.release().await.expect("release");
    waiting
        .await
        .unwrap()
        .expect("granted after the holder left")
        .release()
        .await
        .expect("release");

    // Try mode from another locker: the orphan is someone else's; it holds
    // the name only until its owner meets it.
    let name = LockName::new("queue-orphan-try").unwrap();
    put_late(
        &etcd,
        &key_of(&a, &name, LockMode::Exclusive, lease, 3),
        lease,
    )
    .await;
    assert!(matches!(
        b.try_acquire(&name).await,
        Err(LockError::Locked { .. })
    ));
    let guard = a.try_acquire(&name).await.expect("a clears its own orphan");
    guard.release().await.expect("release");
    b.try_acquire(&name)
        .await
        .expect("free for everyone")
        .release()
        .await
        .expect("release");
    assert_no_keys_left(&etcd).await;
}

/// A put that timed out retires its lease; while guards keep that lease
/// alive, a late landing of the put is swept within a couple of seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_put_under_a_retired_lease_is_swept() {
    let mut etcd = etcd().await;
    let a = locker_with_timeout(&etcd, 10, Duration::from_secs(1)).await;
    let b = locker(&etcd, 10).await;
    // A guard that keeps the lease alive after it is retired.
    let keeper = a
        .try_acquire(&LockName::new("keeper").unwrap())
        .await
        .expect("keeper");
    let old_lease = keeper.lease_id().expect("lease");

    // The put of this try times out: its outcome is unknown.
    let name = LockName::new("late-put").unwrap();
    etcd.member().pause();
    let err = a.try_acquire(&name).await.expect_err("etcd is frozen");
    etcd.member().resume();
    assert!(matches!(err, LockError::Unavailable { .. }), "{err}");
    eventually(
        "the uncertain key is suspected",
        Duration::from_secs(5),
        || async { a.diagnostics().suspect_keys == 1 },
    )
    .await;
    let prefix = a.key_prefix(&name);
    eventually("our cleanup ran", Duration::from_secs(5), || async {
        keys_under(&etcd, &prefix).await.is_empty()
    })
    .await;

    // The put lands late, after our cleanup.
    let key = key_of(&a, &name, LockMode::Exclusive, old_lease, 0);
    put_late(&etcd, &key, old_lease).await;
    assert!(matches!(
        b.try_acquire(&name).await,
        Err(LockError::Locked { .. })
    ));
    eventually("the late key is swept", Duration::from_secs(5), || async {
        keys_under(&etcd, &prefix).await.is_empty()
    })
    .await;
    b.try_acquire(&name)
        .await
        .expect("free again")
        .release()
        .await
        .expect("release");

    // A fresh lease serves new locks; the retired one goes with its guard.
    let fresh = a.ensure_lease().await.expect("fresh lease");
    assert_ne!(fresh, old_lease);
    keeper.release().await.expect("release");
    eventually(
        "the retired lease is gone",
        Duration::from_secs(5),
        || async { a.diagnostics().leases == 1 && a.diagnostics().suspect_keys == 0 },
    )
    .await;
    assert_no_keys_left(&etcd).await;
}
