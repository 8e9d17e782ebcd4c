//! An acquisition dropped at any await point leaves nothing behind: no key in
//! etcd, nothing tracked by the locker. The case that used to leak: etcd has
//! answered the txn (the reply waits in a channel) and the acquisition is
//! dropped before it is polled again, as a client that disconnects, a
//! `select!` that picks another branch or an aborted task does.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use common::*;
use tower_lease_lock::etcd::EtcdLocker;
use tower_lease_lock::{LockGuard, LockMode, LockName, Locker, Wait};

/// Polls `fut` once with the task's real waker; `true` once it finished.
async fn poll_once<F: Future + Unpin>(fut: &mut F) -> bool {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *fut).poll(cx).is_ready())).await
}

/// The pauses between polls: long ones let etcd's answer arrive while
/// nobody polls, short ones catch the acquisition mid-flight.
const PAUSES: [u64; 6] = [300, 1, 300, 20, 0, 300];

/// What another locker holds so that `mode` must wait.
async fn block(holder: &EtcdLocker, name: &LockName, mode: LockMode) -> Vec<LockGuard> {
    let (blocking, count) = match mode {
        LockMode::Permits(n) => (mode, n.get()),
        _ => (LockMode::Exclusive, 1),
    };
    let mut guards = Vec::new();
    for _ in 0..count {
        guards.push(
            holder
                .lock(name, blocking, Wait::Try)
                .await
                .expect("blocking lock"),
        );
    }
    guards
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquisition_dropped_after_any_poll_leaves_nothing() {
    let etcd = etcd().await;
    let locker = locker(&etcd, 10).await;
    let holder = locker_with_timeout(&etcd, 10, Duration::from_secs(2)).await;
    let modes = [
        LockMode::Exclusive,
        LockMode::Shared,
        LockMode::permits(2).expect("permits"),
    ];
    for mode in modes {
        for wait in [Wait::Try, Wait::Timeout(Duration::from_secs(30))] {
            let label = format!("{}-{}", mode.label(), matches!(wait, Wait::Try));
            let name = LockName::new(format!("drop-{label}")).expect("name");
            let prefix = locker.key_prefix(&name);
            // In wait mode the name is held, so the acquisition queues.
            let held = match wait {
                Wait::Try => Vec::new(),
                _ => block(&holder, &name, mode).await,
            };
            for polls in 1..=PAUSES.len() {
                let mut acquisition = Box::pin(locker.lock(&name, mode, wait));
                let mut finished = false;
                for pause in &PAUSES[..polls] {
                    if poll_once(&mut acquisition).await {
                        finished = true; // a guard, dropped with the future
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(*pause)).await;
                }
                drop(acquisition);
                eventually(
                    &format!("{label}: nothing left after dropping at poll {polls} (finished: {finished})"),
                    Duration::from_secs(5),
                    || async {
                        locker.own_keys() == 0 && keys_under(&etcd, &prefix).await.len() == held.len()
                    },
                )
                .await;
            }
            drop(held);
        }
    }
    assert_no_keys_left(&etcd).await;
}

/// The exact reproduction: one poll sends the txn, etcd answers while
/// nobody polls, the acquisition is dropped. The name must be free for
/// another locker at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_acquisition_whose_reply_arrived_frees_the_name() {
    let etcd = etcd().await;
    let a = locker(&etcd, 10).await;
    let b = locker(&etcd, 10).await;
    let name = LockName::new("reply-waiting").expect("name");
    // With the lease granted, the first poll goes straight to the txn.
    a.ensure_lease().await.expect("lease");
    for wait in [Wait::Try, Wait::Timeout(Duration::from_secs(5))] {
        let mut acquisition = Box::pin(a.lock(&name, LockMode::Exclusive, wait));
        assert!(!poll_once(&mut acquisition).await, "one poll cannot finish");
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(acquisition);
        eventually(
            "the other locker takes the name",
            Duration::from_secs(5),
            || async {
                match b.try_acquire(&name).await {
                    Ok(guard) => guard.release().await.is_ok(),
                    Err(_) => false,
                }
            },
        )
        .await;
        assert_eq!(a.own_keys(), 0);
    }
    assert_no_keys_left(&etcd).await;
}
