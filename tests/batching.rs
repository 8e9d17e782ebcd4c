//! Group commit (issue 10): many names' lock writes in one etcd request keep
//! every lock semantic: exclusion, increasing tokens per name, a release and
//! a re-acquire back to back, a lease revoked mid-batch, a server that
//! allows fewer operations per txn.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tower_lease_lock::etcd::EtcdLocker;
use tower_lease_lock::testing::EtcdServer;
use tower_lease_lock::{LockError, LockName, Locker};

/// 64 tasks over 2 lockers hammering 8 names (so batches see repeated names),
/// each with a non-atomic read-modify-write of a counter per name: no two
/// holders ever overlap, and tokens per name strictly increase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_under_batching() {
    let etcd = etcd().await;
    let lockers = [locker(&etcd, 10).await, locker(&etcd, 10).await];
    const NAMES: usize = 8;
    const TASKS: usize = 64;
    const ROUNDS: usize = 15;
    let counters: Arc<Vec<AtomicU64>> = Arc::new((0..NAMES).map(|_| AtomicU64::new(0)).collect());
    let tokens: Arc<Mutex<HashMap<usize, Vec<u64>>>> = Arc::default();
    let violations = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let locker = lockers[t % 2].clone();
        let (counters, tokens, violations) = (
            Arc::clone(&counters),
            Arc::clone(&tokens),
            Arc::clone(&violations),
        );
        tasks.push(tokio::spawn(async move {
            for round in 0..ROUNDS {
                let n = (t + round) % NAMES;
                let name = LockName::new(format!("hammer-{n}")).unwrap();
                let guard = locker
                    .acquire(&name, Duration::from_secs(60))
                    .await
                    .unwrap_or_else(|e| panic!("task {t}: {e}"));
                tokens
                    .lock()
                    .unwrap()
                    .entry(n)
                    .or_default()
                    .push(guard.token());
                // Non-atomic: a second holder in between loses an update.
                let seen = counters[n].load(Ordering::SeqCst);
                tokio::task::yield_now().await;
                if counters[n].swap(seen + 1, Ordering::SeqCst) != seen {
                    violations.fetch_add(1, Ordering::SeqCst);
                }
                guard.release().await.expect("release");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    assert_eq!(
        violations.load(Ordering::SeqCst),
        0,
        "two holders overlapped"
    );
    let total: u64 = counters.iter().map(|c| c.load(Ordering::SeqCst)).sum();
    assert_eq!(total, (TASKS * ROUNDS) as u64);
    // Tokens per name, in the order the locks were held, strictly increase.
    for (n, tokens) in tokens.lock().unwrap().iter() {
        assert!(
            tokens.windows(2).all(|w| w[0] < w[1]),
            "name {n}: tokens not increasing: {tokens:?}"
        );
    }
    let batched: u64 = lockers.iter().map(|l| l.diagnostics().batches).sum();
    assert!(
        batched > 0,
        "no batch formed: the test did not test batching"
    );
    eprintln!(
        "{batched} batches carried {} writes",
        lockers
            .iter()
            .map(|l| l.diagnostics().batched_writes)
            .sum::<u64>()
    );
    assert_no_keys_left(&etcd).await;
}

/// A release and a re-acquire of the same name by one locker, back to
/// back, many at once: slot reuse puts and deletes the same key, which in
/// one batch etcd would refuse ("duplicate key"); they never share one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_and_reacquire_back_to_back() {
    let etcd = etcd().await;
    let locker = locker(&etcd, 10).await;
    let mut tasks = Vec::new();
    for t in 0..32 {
        let locker = locker.clone();
        tasks.push(tokio::spawn(async move {
            let name = LockName::new(format!("again-{t}")).unwrap();
            let mut last = 0;
            for _ in 0..20 {
                let guard = locker
                    .try_acquire(&name)
                    .await
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!(guard.token() > last);
                last = guard.token();
                // Dropped: the release goes in the background, and the next
                // try follows at once (it waits for our own release).
                drop(guard);
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let d = locker.diagnostics();
    assert!(d.batches > 0, "no batch formed");
    assert_eq!(d.batches_resent, 0, "etcd refused a batch");
    assert_no_keys_left(&etcd).await;
}

/// A lease revoked from outside while batches are in flight: the batch
/// that puts with it is refused as a whole, and sent again op by op; the
/// other names succeed, the affected acquisitions start over on a fresh
/// lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_revoked_mid_batch_fails_only_its_own_ops() {
    let etcd = etcd().await;
    let victim = locker(&etcd, 10).await;
    let bystander = locker(&etcd, 10).await;
    let mut admin = etcd.client().await.expect("connect");
    for round in 0..5 {
        let lease = victim.ensure_lease().await.expect("lease");
        let mut tasks = Vec::new();
        for t in 0..48 {
            // Two lockers share nothing but etcd; within one locker the
            // batch mixes names.
            let locker = if t % 3 == 0 {
                bystander.clone()
            } else {
                victim.clone()
            };
            tasks.push(tokio::spawn(async move {
                let name = LockName::new(format!("revoked-{round}-{t}")).unwrap();
                locker.try_acquire(&name).await
            }));
        }
        // (Already gone, if the locker gave it up first: then it is the
        // next round's turn. `batches_resent` below says it happened.)
        let _ = admin.lease_revoke(lease).await;
        for task in tasks {
            match task.await.expect("task") {
                Ok(guard) => drop(guard),
                // Its lease went between the grant and the write: told as
                // lost, or retried on a fresh lease.
                Err(LockError::Lost { .. } | LockError::Unavailable { .. }) => {}
                Err(other) => panic!("unexpected: {other}"),
            }
        }
    }
    let d = victim.diagnostics();
    eprintln!("victim: {} batches, {} resent", d.batches, d.batches_resent);
    assert!(
        d.batches_resent > 0,
        "no batch met the revoked lease: not tested"
    );
    // Every name is free afterwards, for anyone.
    let checker = locker(&etcd, 10).await;
    for round in 0..5 {
        for t in 0..48 {
            let name = LockName::new(format!("revoked-{round}-{t}")).unwrap();
            eventually(&format!("{name} free"), Duration::from_secs(5), || async {
                match checker.try_acquire(&name).await {
                    Ok(guard) => guard.release().await.is_ok(),
                    Err(_) => false,
                }
            })
            .await;
        }
    }
    assert_no_keys_left(&etcd).await;
}

/// etcd started with `--max-txn-ops 16`: a batch of more is refused as a
/// whole, and sent again in halves; every acquisition succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_split_under_a_lower_txn_limit() {
    let etcd = EtcdServer::builder()
        .max_txn_ops(16)
        .start()
        .await
        .expect("etcd");
    let locker = locker(&etcd, 10).await;
    let mut tasks = Vec::new();
    for t in 0..128 {
        let locker = locker.clone();
        tasks.push(tokio::spawn(async move {
            let name = LockName::new(format!("limited-{t}")).unwrap();
            for _ in 0..5 {
                let guard = locker.try_acquire(&name).await.expect("acquire");
                guard.release().await.expect("release");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let d = locker.diagnostics();
    eprintln!(
        "{} batches, {} writes, {} resent",
        d.batches, d.batched_writes, d.batches_resent
    );
    assert!(d.batches > 0, "no batch formed");
    assert!(
        d.batches_resent > 0,
        "no batch was over the limit: the split was not tested"
    );
    assert_no_keys_left(&etcd).await;
}

/// Batching off: every write is a request of its own, and locks work the
/// same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batching_can_be_turned_off() {
    let etcd = etcd().await;
    let locker = EtcdLocker::builder(etcd.client().await.expect("connect"))
        .namespace(NS)
        .batching(false)
        .build()
        .expect("locker");
    let mut tasks = Vec::new();
    for t in 0..32 {
        let locker = locker.clone();
        tasks.push(tokio::spawn(async move {
            let name = LockName::new(format!("unbatched-{t}")).unwrap();
            let guard = locker.try_acquire(&name).await.expect("acquire");
            guard.release().await.expect("release");
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    assert_eq!(locker.diagnostics().batches, 0);
    assert_no_keys_left(&etcd).await;
}
