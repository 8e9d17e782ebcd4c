//! Nothing outlives its use (issue 8.6): retired key slots go with their
//! lease, watches of names nobody waits on are cancelled at the server, and
//! a dropped locker takes its tasks and server-side watches with it.

mod common;

use std::time::Duration;

use common::*;
use tower_lease_lock::testing::EtcdServer;
use tower_lease_lock::{LockError, LockName, Locker};

/// Watchers etcd serves right now.
async fn server_watchers(etcd: &EtcdServer) -> f64 {
    etcd.member_ref()
        .metric("etcd_debugging_mvcc_watcher_total")
        .await
        .expect("metrics page")
        .expect("the watcher gauge")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retired_slots_go_with_their_lease() {
    let mut etcd = etcd().await;
    let a = locker_with_timeout(&etcd, 10, Duration::from_secs(1)).await;
    let name = LockName::new("retired-slot").unwrap();
    let guard = a.try_acquire(&name).await.expect("acquire");
    let lease = guard.lease_id().expect("lease");

    // A release whose delete goes unanswered retires the key's slot: a late
    // delete could otherwise hit a later holder of the same key.
    etcd.member().pause();
    let released = guard.release().await;
    etcd.member().resume();
    assert!(released.is_err(), "etcd was frozen: {released:?}");
    eventually("the slot is retired", Duration::from_secs(5), || async {
        a.own_keys() == 0 && a.diagnostics().retired_slots == 1
    })
    .await;

    // The lease goes (revoked from outside); once the locker moved on to a
    // fresh lease, the retired slot is forgotten.
    let mut client = etcd.client().await.expect("connect");
    client.lease_revoke(lease).await.expect("revoke");
    eventually("a fresh lease", Duration::from_secs(10), || async {
        a.ensure_lease().await.is_ok_and(|l| l != lease)
    })
    .await;
    assert_eq!(a.diagnostics().retired_slots, 0);
    assert_no_keys_left(&etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_watches_are_cancelled_at_the_server() {
    let etcd = etcd().await;
    let holder = locker(&etcd, 10).await;
    let waiter = locker(&etcd, 10).await;
    let baseline = server_watchers(&etcd).await;
    let mut guards = Vec::new();
    for i in 0..5 {
        let name = LockName::new(format!("idle-{i}")).unwrap();
        guards.push(holder.try_acquire(&name).await.expect("hold"));
        let err = waiter
            .acquire(&name, Duration::from_millis(200))
            .await
            .expect_err("held");
        assert!(matches!(err, LockError::Timeout { .. }), "{err}");
    }
    assert_eq!(waiter.watched_names(), 5);
    assert!(server_watchers(&etcd).await >= baseline + 5.0);
    // Nobody waits any more: after the linger time (5 s) the watches go,
    // at the server too, and the stream with them.
    eventually(
        "idle watches cancelled",
        Duration::from_secs(10),
        || async {
            waiter.watched_names() == 0
                && waiter.diagnostics().server_watches == 0
                && server_watchers(&etcd).await == baseline
        },
    )
    .await;
    drop(guards);
    assert_no_keys_left(&etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_locker_leaves_no_task_and_no_watch() {
    let etcd = etcd().await;
    let holder = locker(&etcd, 10).await;
    let name = LockName::new("dropped-locker").unwrap();
    let held = holder.try_acquire(&name).await.expect("hold");
    let baseline = server_watchers(&etcd).await;
    let runtime = tokio::runtime::Handle::current();
    let tasks_before = runtime.metrics().num_alive_tasks();
    {
        let waiter = locker(&etcd, 10).await;
        let err = waiter
            .acquire(&name, Duration::from_millis(300))
            .await
            .expect_err("held");
        assert!(matches!(err, LockError::Timeout { .. }), "{err}");
        assert!(server_watchers(&etcd).await > baseline);
        assert!(runtime.metrics().num_alive_tasks() > tasks_before);
    }
    // The locker is gone, with no guard left: its renewal and watch tasks
    // end, and the watch stream closes (no event on the name is needed).
    eventually("tasks and watches gone", Duration::from_secs(2), || async {
        runtime.metrics().num_alive_tasks() <= tasks_before
            && server_watchers(&etcd).await == baseline
    })
    .await;
    drop(held);
    assert_no_keys_left(&etcd).await;
}
