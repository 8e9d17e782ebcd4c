//! The etcd lock engine against a real etcd: exclusion, FIFO hand-off,
//! timeouts, cancellation, fencing tokens, lease loss (renewal stopped, lease
//! revoked, holder process killed), interop with `etcdctl lock`, name
//! independence, etcd outages, the same-locker fast path and release on drop
//! outside a runtime.
//!
//! Every test starts its own etcd (killed when dropped) and ends with no key
//! left under the test namespace.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::Proc;
use common::*;
use tower_lease_lock::etcd::EtcdLocker;
use tower_lease_lock::testing::EtcdServer;
use tower_lease_lock::{LockError, LockGuard, LockName, Locker};

fn name(s: &str) -> LockName {
    LockName::new(s).expect("valid lock name")
}

async fn key_count(etcd: &EtcdServer, prefix: &str) -> usize {
    keys_under(etcd, prefix).await.len()
}

/// Waits until exactly `n` keys exist under `prefix`.
async fn wait_for_keys(etcd: &EtcdServer, prefix: &str, n: usize) {
    eventually(
        &format!("{n} keys under {prefix}"),
        Duration::from_secs(10),
        || async { key_count(etcd, prefix).await == n },
    )
    .await;
}

/// Asserts `result` is `Locked` and returns what is known of the holder.
fn expect_locked(result: Result<LockGuard, LockError>) -> tower_lease_lock::Holder {
    match result {
        Err(LockError::Locked {
            holder: Some(holder),
            ..
        }) => holder,
        other => panic!("expected Locked with a holder, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// 1. Mutual exclusion under contention
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion() {
    const TASKS: usize = 16;
    const ITERATIONS: usize = 15;

    let etcd = etcd().await;
    let a = locker(&etcd, 5).await;
    let b = locker(&etcd, 5).await;
    let lock_name = name("mutex");

    let counter = Arc::new(AtomicU64::new(0));
    let inside = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let last_token = Arc::new(AtomicU64::new(0));
    let token_regressions = Arc::new(AtomicUsize::new(0));

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let locker = if t % 2 == 0 { a.clone() } else { b.clone() };
        let lock_name = lock_name.clone();
        let (counter, inside, overlaps) = (counter.clone(), inside.clone(), overlaps.clone());
        let (last_token, token_regressions) = (last_token.clone(), token_regressions.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..ITERATIONS {
                let guard = locker
                    .acquire(&lock_name, Duration::from_secs(10))
                    .await
                    .expect("acquire under contention");
                if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                // Tokens of successive holders strictly increase.
                if last_token.swap(guard.token(), Ordering::SeqCst) >= guard.token() {
                    token_regressions.fetch_add(1, Ordering::SeqCst);
                }
                // A deliberately non-atomic increment: lost updates show overlap.
                let value = counter.load(Ordering::SeqCst);
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_micros(200)).await;
                counter.store(value + 1, Ordering::SeqCst);
                inside.fetch_sub(1, Ordering::SeqCst);
                guard.release().await.expect("release");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task panicked");
    }

    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two holders overlapped");
    assert_eq!(
        token_regressions.load(Ordering::SeqCst),
        0,
        "fencing token went back"
    );
    assert_eq!(
        counter.load(Ordering::SeqCst),
        (TASKS * ITERATIONS) as u64,
        "lost updates"
    );
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 2. Waiters are served in arrival order
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_order() {
    let etcd = etcd().await;
    let a = locker(&etcd, 5).await;
    let b = locker(&etcd, 5).await;
    let lock_name = name("fifo");
    let prefix = a.key_prefix(&lock_name);

    let holder = a.try_acquire(&lock_name).await.expect("holder");
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 0..4usize {
        let locker = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (lock_name, order) = (lock_name.clone(), order.clone());
        waiters.push(tokio::spawn(async move {
            let guard = locker
                .acquire(&lock_name, Duration::from_secs(10))
                .await
                .unwrap_or_else(|e| panic!("waiter {i}: {e}"));
            order.lock().unwrap().push(i);
            guard.release().await.expect("release");
        }));
        // The next waiter queues only once this one's key is in etcd.
        wait_for_keys(&etcd, &prefix, i + 2).await;
    }
    assert!(
        order.lock().unwrap().is_empty(),
        "a waiter got the lock while it was held"
    );

    holder.release().await.expect("release holder");
    for waiter in waiters {
        waiter.await.expect("waiter panicked");
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 3. A waiting acquisition times out and leaves nothing behind
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout() {
    let etcd = etcd().await;
    let a = locker(&etcd, 5).await;
    let b = locker(&etcd, 5).await;
    let lock_name = name("timeout");
    let prefix = a.key_prefix(&lock_name);

    let holder = a.try_acquire(&lock_name).await.expect("holder");
    let started = Instant::now();
    let result = b.acquire(&lock_name, Duration::from_millis(300)).await;
    let elapsed = started.elapsed();
    match result {
        Err(LockError::Timeout { name: n, waited }) => {
            assert_eq!(n, lock_name);
            assert!(waited >= Duration::from_millis(300), "waited {waited:?}");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(
        elapsed >= Duration::from_millis(300),
        "gave up early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "gave up late: {elapsed:?}"
    );

    let holder_key = holder.key().expect("etcd key").to_string();
    eventually(
        "only the holder's key is left",
        Duration::from_secs(5),
        || async { keys_under(&etcd, &prefix).await == vec![holder_key.clone()] },
    )
    .await;
    eventually("b forgot its key", Duration::from_secs(5), || async {
        b.own_keys() == 0
    })
    .await;

    holder.release().await.expect("release");
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 4. Dropping a waiting acquisition deletes its key
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation() {
    let etcd = etcd().await;
    let a = locker(&etcd, 5).await;
    let b = locker(&etcd, 5).await;
    let lock_name = name("cancel");
    let prefix = a.key_prefix(&lock_name);

    let holder = a.try_acquire(&lock_name).await.expect("holder");
    let waiter = tokio::spawn({
        let (b, lock_name) = (b.clone(), lock_name.clone());
        async move { b.acquire(&lock_name, Duration::from_secs(30)).await }
    });
    wait_for_keys(&etcd, &prefix, 2).await;

    waiter.abort();
    let joined = waiter.await;
    assert!(
        joined.as_ref().is_err_and(|e| e.is_cancelled()),
        "the waiter finished instead of being cancelled: {joined:?}"
    );

    let holder_key = holder.key().expect("etcd key").to_string();
    eventually(
        "the cancelled waiter's key is deleted",
        Duration::from_secs(5),
        || async { keys_under(&etcd, &prefix).await == vec![holder_key.clone()] },
    )
    .await;
    eventually("b forgot its key", Duration::from_secs(5), || async {
        b.own_keys() == 0
    })
    .await;

    holder.release().await.expect("release");
    // Nothing stale is left in b either: it can take the name at once.
    let guard = b.try_acquire(&lock_name).await.expect("b takes the name");
    guard.release().await.expect("release");
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 5. Fencing tokens are create revisions and strictly increase
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_increase() {
    let etcd = etcd().await;
    let lockers = [locker(&etcd, 5).await, locker(&etcd, 5).await];
    let lock_name = name("fencing");

    let mut last = 0u64;
    for i in 0..20usize {
        let locker = &lockers[i % 2];
        // Both the one-round-trip try and the waiting path compute tokens.
        let guard = if i % 4 < 2 {
            locker.try_acquire(&lock_name).await
        } else {
            locker.acquire(&lock_name, Duration::from_secs(5)).await
        }
        .unwrap_or_else(|e| panic!("acquisition {i}: {e}"));
        let key = guard.key().expect("etcd key");
        let revision = create_revision(&etcd, key)
            .await
            .unwrap_or_else(|| panic!("key {key} missing while held"));
        assert_eq!(
            guard.token(),
            u64::try_from(revision).unwrap(),
            "token of {key}"
        );
        assert!(guard.token() > last, "token {} after {last}", guard.token());
        last = guard.token();
        guard.release().await.expect("release");
    }
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 6. A holder whose renewal stops is told before anyone else gets the lock
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_when_renewal_stops() {
    const TTL: u64 = 3;
    let etcd = etcd().await;
    let a = locker(&etcd, TTL).await;
    let b = locker(&etcd, TTL).await;
    let lock_name = name("renewal");
    let prefix = a.key_prefix(&lock_name);

    let guard = a.try_acquire(&lock_name).await.expect("a holds");
    let old_lease = guard.lease_id().expect("lease id");
    let a_lost = guard.info().lost_signal().clone();

    let b_task = tokio::spawn({
        let (b, lock_name, a_lost) = (b.clone(), lock_name.clone(), a_lost.clone());
        async move {
            let result = b.acquire(&lock_name, Duration::from_secs(15)).await;
            // Checked the moment B holds: was A already told?
            let a_was_lost = a_lost.is_lost();
            (result, Instant::now(), a_was_lost)
        }
    });
    wait_for_keys(&etcd, &prefix, 2).await;

    let paused_at = Instant::now();
    a.pause_renewal(true);
    let lost_task = tokio::spawn({
        let lost = guard.lost();
        async move {
            let reason = tokio::time::timeout(Duration::from_secs(10), lost).await;
            (reason, Instant::now())
        }
    });

    let (reason, lost_at) = lost_task.await.expect("lost task");
    let reason = reason.expect("lost() did not fire within 10 s of pausing renewal");
    let (b_result, b_at, a_was_lost) = b_task.await.expect("b task");
    let b_guard = b_result.expect("b acquires after a's lease runs out");

    assert!(
        a_was_lost,
        "B was granted the lock before A was told it lost it"
    );
    assert!(
        lost_at <= b_at,
        "lost() resolved {:?} after B acquired",
        lost_at - b_at
    );
    assert!(
        b_at - paused_at < Duration::from_secs(TTL + 3),
        "B acquired {:?} after the pause",
        b_at - paused_at
    );
    assert!(guard.is_lost());
    println!("lost after {:?}: {reason}", lost_at - paused_at);

    // After renewal resumes, A starts over with a fresh lease.
    a.pause_renewal(false);
    drop(guard);
    b_guard.release().await.expect("release b");
    let fresh = a
        .acquire(&lock_name, Duration::from_secs(5))
        .await
        .expect("a acquires again");
    assert_ne!(
        fresh.lease_id(),
        Some(old_lease),
        "the lost lease was reused"
    );
    assert!(!fresh.is_lost());
    fresh.release().await.expect("release");
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 7. A lease revoked from outside fires lost() and is replaced
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_when_lease_revoked() {
    const TTL: u64 = 6;
    let etcd = etcd().await;
    let a = locker(&etcd, TTL).await;
    let b = locker(&etcd, TTL).await;
    let lock_name = name("revoked");

    let guard = a.try_acquire(&lock_name).await.expect("a holds");
    let old_lease = guard.lease_id().expect("lease id");
    let mut client = etcd.client().await.expect("connect");
    let revoked_at = Instant::now();
    client.lease_revoke(old_lease).await.expect("revoke");

    // The revoke deleted A's key: B can take the name at once.
    let b_guard = loop {
        match b.try_acquire(&lock_name).await {
            Ok(g) => break g,
            Err(LockError::Locked { .. }) if revoked_at.elapsed() < Duration::from_secs(2) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("b could not take the revoked name: {e}"),
        }
    };

    let reason = tokio::time::timeout(Duration::from_secs(TTL), guard.lost())
        .await
        .expect("lost() did not fire within the TTL of the revoke");
    assert!(revoked_at.elapsed() < Duration::from_secs(TTL));
    println!("lost after {:?}: {reason}", revoked_at.elapsed());

    let other = a
        .try_acquire(&name("revoked-2"))
        .await
        .expect("a acquires with a fresh lease");
    let new_lease = other.lease_id().expect("lease id");
    assert_ne!(new_lease, old_lease);

    // Again, once the lease was renewed at least once: the revoke is then
    // noticed on the open keepalive stream, not when opening it.
    let lowest = std::cell::Cell::new(i64::MAX);
    eventually(
        "the new lease is renewed once",
        Duration::from_secs(TTL),
        || {
            let (mut client, lowest) = (client.clone(), &lowest);
            async move {
                let ttl = client
                    .lease_time_to_live(new_lease, None)
                    .await
                    .expect("time to live")
                    .ttl();
                let renewed = ttl > lowest.get();
                lowest.set(lowest.get().min(ttl));
                renewed
            }
        },
    )
    .await;
    let revoked_at = Instant::now();
    client.lease_revoke(new_lease).await.expect("revoke");
    tokio::time::timeout(Duration::from_secs(TTL), other.lost())
        .await
        .expect("lost() did not fire within the TTL of the second revoke");
    assert!(revoked_at.elapsed() < Duration::from_secs(TTL));

    drop(guard);
    other.release().await.expect("release");
    b_guard.release().await.expect("release");
    assert_no_keys_left(&etcd).await;
}

/// The lease is revoked and the locker has not noticed yet (long TTL, so the
/// renewal is seconds away): the next acquisition meets "lease not found" and
/// must start over with a fresh lease, in both the try and the waiting path.
/// Several rounds: the retry must not be refused by what is left of the
/// failed first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_lease_is_replaced_on_next_acquisition() {
    const ROUNDS: usize = 10;
    let etcd = etcd().await;
    let a = locker(&etcd, 30).await;
    let mut client = etcd.client().await.expect("connect");

    let mut held = a.try_acquire(&name("stale-0")).await.expect("first");
    let mut old_guards = Vec::new();
    for round in 1..=ROUNDS {
        let old_lease = held.lease_id().expect("lease id");
        client.lease_revoke(old_lease).await.expect("revoke");
        let next = a
            .try_acquire(&name(&format!("stale-{round}")))
            .await
            .unwrap_or_else(|e| panic!("round {round}: try on a free name after a revoke: {e}"));
        assert_ne!(next.lease_id(), Some(old_lease), "round {round}");
        assert!(
            held.is_lost(),
            "round {round}: the revoked lease's guard is not lost"
        );
        assert_eq!(
            create_revision(&etcd, next.key().expect("etcd key")).await,
            Some(i64::try_from(next.token()).unwrap()),
            "round {round}: the new key is not in etcd"
        );
        old_guards.push(std::mem::replace(&mut held, next));
    }

    let old_lease = held.lease_id().expect("lease id");
    client.lease_revoke(old_lease).await.expect("revoke");
    let waited = a
        .acquire(&name("stale-wait"), Duration::from_secs(5))
        .await
        .expect("acquire after a revoke succeeds with a fresh lease");
    assert_ne!(waited.lease_id(), Some(old_lease));
    assert!(held.is_lost());

    drop(old_guards);
    drop(held);
    waited.release().await.expect("release");
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 8. A holder process killed with SIGKILL frees its lock after its TTL
// ---------------------------------------------------------------------------

const CHILD_ENDPOINT: &str = "TLL_CHILD_ENDPOINT";
const CHILD_NAME: &str = "TLL_CHILD_NAME";
const CHILD_TTL: u64 = 3;

/// Not a test of its own: the lock holder of `killed_holder_process`, run in
/// a child process. Does nothing unless started with its environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process of killed_holder_process"]
async fn holder_process_child() {
    let Ok(endpoint) = std::env::var(CHILD_ENDPOINT) else {
        return;
    };
    let lock_name = name(&std::env::var(CHILD_NAME).expect("TLL_CHILD_NAME"));
    let locker = locker_at(&endpoint, CHILD_TTL).await;
    let guard = locker
        .acquire(&lock_name, Duration::from_secs(10))
        .await
        .expect("child acquires");
    common::process::say_held(guard.token());
    tokio::time::sleep(Duration::from_secs(60)).await;
    drop(guard);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_holder_process() {
    let etcd = etcd().await;
    let b = locker(&etcd, 5).await;
    let lock_name = name("killed-holder");

    let mut child = Proc::spawn_child_test(
        "holder child",
        "holder_process_child",
        &[
            (CHILD_ENDPOINT, &etcd.endpoints()[0]),
            (CHILD_NAME, lock_name.as_str()),
        ],
    );
    let child_token = child.held_token(Duration::from_secs(30)).await;

    let holder = expect_locked(b.try_acquire(&lock_name).await);
    assert_eq!(holder.token, Some(child_token));
    assert!(!holder.same_locker);

    child.kill();
    let killed_at = Instant::now();
    let guard = b
        .acquire(&lock_name, Duration::from_secs(20))
        .await
        .expect("the killed holder's lock is freed");
    let after = killed_at.elapsed();
    assert!(
        after < Duration::from_secs(CHILD_TTL + 3),
        "acquired {after:?} after the kill"
    );
    assert!(guard.token() > child_token);
    println!("acquired {after:?} after killing the holder");

    guard.release().await.expect("release");
    drop(child);
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 9. `etcdctl lock` and our locks exclude each other, both ways
// ---------------------------------------------------------------------------

fn etcdctl_lock(endpoint: &str, lock: &str) -> Proc {
    Proc::spawn(
        "etcdctl lock",
        Command::new("etcdctl").env("ETCDCTL_API", "3").args([
            "--endpoints",
            endpoint,
            "lock",
            "--ttl",
            "3",
            lock,
        ]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_interop() {
    let etcd = etcd().await;
    let endpoint = etcd.endpoints()[0].clone();
    let a = locker(&etcd, 5).await;
    let lock_name = name("interop");
    let prefix = a.key_prefix(&lock_name);
    let etcdctl_name = format!("{NS}{}", lock_name.as_str());
    assert_eq!(format!("{etcdctl_name}/"), prefix);

    // (a) etcdctl holds: we are refused, and we wait behind it.
    let mut ctl = etcdctl_lock(&endpoint, &etcdctl_name);
    let ctl_key = ctl
        .next_line(Duration::from_secs(10))
        .await
        .expect("etcdctl exited without locking");
    assert!(ctl_key.starts_with(&prefix), "etcdctl key {ctl_key}");
    let holder = expect_locked(a.try_acquire(&lock_name).await);
    assert_eq!(holder.key.as_deref(), Some(ctl_key.as_str()));
    assert!(!holder.same_locker);
    assert_eq!(
        holder.token.map(|t| i64::try_from(t).unwrap()),
        create_revision(&etcd, &ctl_key).await
    );

    let ctl_stopped = Arc::new(AtomicBool::new(false));
    let waiter = tokio::spawn({
        let (a, lock_name, ctl_stopped) = (a.clone(), lock_name.clone(), ctl_stopped.clone());
        async move {
            let result = a.acquire(&lock_name, Duration::from_secs(15)).await;
            (result, ctl_stopped.load(Ordering::SeqCst))
        }
    });
    wait_for_keys(&etcd, &prefix, 2).await;
    ctl_stopped.store(true, Ordering::SeqCst);
    ctl.signal("INT"); // etcdctl unlocks on SIGINT
    let status = ctl.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "etcdctl exited with {status}");
    let (result, granted_after_stop) = waiter.await.expect("waiter");
    let guard = result.expect("we acquire once etcdctl unlocked");
    assert!(
        granted_after_stop,
        "we were granted the lock while etcdctl held it"
    );
    assert!(guard.token() > holder.token.unwrap());
    guard.release().await.expect("release");
    drop(ctl);
    assert_no_keys_left(&etcd).await;

    // (b) we hold: etcdctl waits, and gets the lock once we release.
    let ours = a.try_acquire(&lock_name).await.expect("we hold");
    let mut ctl = etcdctl_lock(&endpoint, &etcdctl_name);
    wait_for_keys(&etcd, &prefix, 2).await; // etcdctl is in line
    tokio::time::sleep(Duration::from_secs(1)).await; // the subject: it must not acquire
    assert!(!ctl.has_output(), "etcdctl acquired a lock we hold");
    let ctl_key = keys_under(&etcd, &prefix)
        .await
        .into_iter()
        .find(|k| Some(k.as_str()) != ours.key())
        .expect("etcdctl's key");
    ours.release().await.expect("release");
    let printed = ctl
        .next_line(Duration::from_secs(5))
        .await
        .expect("etcdctl exited without locking");
    assert_eq!(printed, ctl_key);
    ctl.signal("INT");
    let status = ctl.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "etcdctl exited with {status}");
    drop(ctl);
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 10. Names that are prefixes of one another are independent
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_independence() {
    let etcd = etcd().await;
    let a = locker(&etcd, 5).await;
    let b = locker(&etcd, 5).await;
    let names: Vec<LockName> = ["a", "a/b", "ab", "a%2Fb"].into_iter().map(name).collect();

    for (holder, other) in [(&a, &b), (&b, &a)] {
        for held in &names {
            let guard = holder.try_acquire(held).await.expect("hold");
            // The same name is refused...
            let refused = expect_locked(other.try_acquire(held).await);
            assert_eq!(refused.key.as_deref(), guard.key());
            // ...every other one is free.
            for free in names.iter().filter(|n| *n != held) {
                let g = other
                    .try_acquire(free)
                    .await
                    .unwrap_or_else(|e| panic!("holding {held:?} blocked {free:?}: {e}"));
                g.release().await.expect("release");
            }
            guard.release().await.expect("release");
        }
    }

    // All four at once, spread over both lockers.
    let mut guards = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let locker = if i % 2 == 0 { &a } else { &b };
        guards.push(locker.try_acquire(n).await.expect("all at once"));
    }
    for guard in guards {
        guard.release().await.expect("release");
    }
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 11. etcd down or hung: acquisitions fail with Unavailable, in bounded time
// ---------------------------------------------------------------------------

async fn assert_unavailable_fast(locker: &EtcdLocker, lock_name: &LockName, what: &str) {
    let started = Instant::now();
    let result = locker.try_acquire(lock_name).await;
    let elapsed = started.elapsed();
    assert!(
        matches!(result, Err(LockError::Unavailable { .. })),
        "{what}: try_acquire gave {result:?}"
    );
    assert!(
        elapsed < Duration::from_secs(4),
        "{what}: try_acquire took {elapsed:?}"
    );

    let started = Instant::now();
    let result = locker.acquire(lock_name, Duration::from_secs(30)).await;
    let elapsed = started.elapsed();
    assert!(
        matches!(result, Err(LockError::Unavailable { .. })),
        "{what}: acquire gave {result:?}"
    );
    assert!(
        elapsed < Duration::from_secs(4),
        "{what}: acquire took {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_when_etcd_down() {
    let lock_name = name("outage");

    // Killed.
    let mut etcd = etcd().await;
    let l = locker_with_timeout(&etcd, 10, Duration::from_secs(1)).await;
    let guard = l.try_acquire(&lock_name).await.expect("acquire");
    guard.release().await.expect("release");
    assert_no_keys_left(&etcd).await;
    etcd.member().kill();
    assert_unavailable_fast(&l, &lock_name, "etcd killed").await;
    drop(l);
    drop(etcd);

    // Paused (SIGSTOP): requests hang instead of failing.
    let mut etcd = common::etcd().await;
    let l = locker_with_timeout(&etcd, 10, Duration::from_secs(1)).await;
    let guard = l.try_acquire(&lock_name).await.expect("acquire");
    guard.release().await.expect("release");
    assert_no_keys_left(&etcd).await;
    etcd.member().pause();
    assert_unavailable_fast(&l, &lock_name, "etcd paused").await;
    etcd.member().resume();

    // Once etcd answers again, whatever the timed-out requests put is deleted
    // (see `no_orphan_keys_after_requests_time_out`), and the locker works.
    let started = Instant::now();
    loop {
        let left = keys_under(&etcd, NS).await;
        if left.is_empty() && l.own_keys() == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "10 s after etcd resumed, keys are left: {left:?}; the locker still tracks {} \
             of its keys",
            l.own_keys()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let guard = l
        .try_acquire(&lock_name)
        .await
        .expect("the locker works after etcd resumed");
    guard.release().await.expect("release");
    assert_no_keys_left(&etcd).await;
}

/// Requests that time out while etcd hangs may still be applied once it
/// answers again. Every key such a request put must then be deleted: the
/// locker's lease is still alive, so a key it forgot would hold its name
/// until the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_orphan_keys_after_requests_time_out() {
    const CYCLES: usize = 5;
    const ATTEMPTS: usize = 8;
    let mut etcd = etcd().await;
    let l = locker_with_timeout(&etcd, 10, Duration::from_millis(500)).await;
    let lease = l.ensure_lease().await.expect("lease granted");

    for cycle in 0..CYCLES {
        etcd.member().pause();
        let mut attempts = tokio::task::JoinSet::new();
        for i in 0..ATTEMPTS {
            let (l, lock_name) = (l.clone(), name(&format!("orphan-{cycle}-{i}")));
            attempts.spawn(async move {
                if i % 2 == 0 {
                    l.try_acquire(&lock_name).await
                } else {
                    l.acquire(&lock_name, Duration::from_secs(30)).await
                }
            });
        }
        while let Some(result) = attempts.join_next().await {
            let result = result.expect("attempt task");
            assert!(
                matches!(result, Err(LockError::Unavailable { .. })),
                "while etcd hangs: {result:?}"
            );
        }
        etcd.member().resume();

        let started = Instant::now();
        loop {
            let left = keys_under(&etcd, NS).await;
            if left.is_empty() && l.own_keys() == 0 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "cycle {cycle}: 10 s after etcd resumed, keys on the locker's live lease \
                 {lease:x} are left: {left:?}; the locker still tracks {} of its keys",
                l.own_keys()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Puts whose outcome is unknown retire the lease they carried (a late
        // put lands on a lease that is then revoked): a new lease serves on.
        assert!(l.ensure_lease().await.is_ok(), "the locker works again");
    }
    let guard = l
        .try_acquire(&name("orphan-0-0"))
        .await
        .expect("the name is free");
    guard.release().await.expect("release");
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 12. One locker: the fast path, several names, and its own waiters
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_locker_fast_path() {
    let etcd = etcd().await;
    let a = locker(&etcd, 5).await;
    let b = locker(&etcd, 5).await;
    let lock_name = name("same");
    let prefix = a.key_prefix(&lock_name);

    let guard = a.try_acquire(&lock_name).await.expect("hold");
    let token = guard.token();
    let lease = guard.lease_id().expect("lease id");

    let mine = expect_locked(a.try_acquire(&lock_name).await);
    assert!(mine.same_locker);
    assert_eq!(mine.key.as_deref(), guard.key());
    assert_eq!(mine.token, Some(token));

    let theirs = expect_locked(b.try_acquire(&lock_name).await);
    assert!(!theirs.same_locker);
    assert_eq!(theirs.key.as_deref(), guard.key());
    assert_eq!(theirs.token, Some(token));
    assert_eq!(theirs.lease_id, Some(lease));

    // Two names on one locker: one lease, two keys.
    let second = a.try_acquire(&name("same-2")).await.expect("second name");
    assert_eq!(second.lease_id(), Some(lease));
    assert_ne!(second.key(), guard.key());
    assert_eq!(a.own_keys(), 2);
    second.release().await.expect("release");

    // A second exclusive acquisition of the same name by the same locker
    // waits on a key of its own, and only gets the lock once it is released.
    let released = Arc::new(AtomicBool::new(false));
    let waiter = tokio::spawn({
        let (a, lock_name, released) = (a.clone(), lock_name.clone(), released.clone());
        async move {
            let g = a.acquire(&lock_name, Duration::from_secs(10)).await;
            (g, released.load(Ordering::SeqCst))
        }
    });
    wait_for_keys(&etcd, &prefix, 2).await;
    let lease_prefix = format!("{prefix}{lease:x}-");
    let keys = keys_under(&etcd, &prefix).await;
    assert!(
        keys.iter().all(|k| k.starts_with(&lease_prefix)),
        "both keys should be on the one lease: {keys:?}"
    );
    assert!(!waiter.is_finished(), "the second acquisition did not wait");

    released.store(true, Ordering::SeqCst);
    guard.release().await.expect("release");
    let (waited, was_released) = waiter.await.expect("waiter");
    let waited = waited.expect("the waiter gets the lock");
    assert!(
        was_released,
        "the waiter held the lock while the first guard did"
    );
    assert!(waited.token() > token);
    assert_eq!(waited.lease_id(), Some(lease));
    waited.release().await.expect("release");
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// 13. Dropping a guard on a thread without a runtime still releases it
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_on_drop_outside_runtime() {
    let etcd = etcd().await;
    let a = locker(&etcd, 5).await;
    let lock_name = name("drop-outside");
    let prefix = a.key_prefix(&lock_name);

    let guard = a.try_acquire(&lock_name).await.expect("hold");
    assert_eq!(key_count(&etcd, &prefix).await, 1);
    std::thread::spawn(move || {
        assert!(tokio::runtime::Handle::try_current().is_err());
        drop(guard);
    })
    .join()
    .expect("drop thread");

    wait_for_keys(&etcd, &prefix, 0).await;
    eventually("a forgot its key", Duration::from_secs(5), || async {
        a.own_keys() == 0
    })
    .await;
    let again = a.try_acquire(&lock_name).await.expect("free again");
    again.release().await.expect("release");
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// Builder misuse is a typed error at construction
// ---------------------------------------------------------------------------

#[tokio::test]
async fn builder_misuse_is_a_typed_error() {
    use tower_lease_lock::etcd::ConfigError;

    let etcd = etcd().await;
    let client = etcd.client().await.expect("connect");
    let build = |f: fn(
        tower_lease_lock::etcd::EtcdLockerBuilder,
    ) -> tower_lease_lock::etcd::EtcdLockerBuilder| {
        f(EtcdLocker::builder(client.clone())).build().map(drop)
    };
    assert!(matches!(
        build(|b| b.ttl(Duration::from_secs(1))),
        Err(ConfigError::TtlTooShort(_))
    ));
    assert!(matches!(
        build(|b| b.ttl(Duration::from_secs(7200))),
        Err(ConfigError::TtlTooLong(_))
    ));
    assert!(matches!(
        build(|b| b.ttl(Duration::from_millis(2500))),
        Err(ConfigError::TtlNotWholeSeconds(_))
    ));
    assert!(matches!(
        build(|b| b.renewal_cadence(Duration::from_secs(30))),
        Err(ConfigError::BadRenewalCadence { .. })
    ));
    assert!(matches!(
        build(|b| b.renewal_cadence(Duration::ZERO)),
        Err(ConfigError::BadRenewalCadence { .. })
    ));
    assert!(matches!(
        build(|b| b.request_timeout(Duration::ZERO)),
        Err(ConfigError::ZeroRequestTimeout)
    ));
    // A 3 s TTL renews every second and must be renewed 0.6 s before it
    // expires: a 2 s request could use up the whole window, with no room
    // for a retry (issue 8.3).
    let err = build(|b| {
        b.ttl(Duration::from_secs(3))
            .request_timeout(Duration::from_secs(2))
    })
    .unwrap_err();
    match &err {
        ConfigError::RequestTimeoutTooLong { max, .. } => {
            assert_eq!(*max, Duration::from_millis(700))
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("retry"), "{err}");
    // The defaults fit any TTL: 5 s, or less where the TTL needs it.
    for ttl in [2, 3, 5, 7, 15, 30] {
        EtcdLocker::builder(client.clone())
            .ttl(Duration::from_secs(ttl))
            .build()
            .unwrap_or_else(|e| panic!("TTL {ttl}s with the default request timeout: {e}"));
    }
    build(|b| {
        b.ttl(Duration::from_secs(5))
            .renewal_cadence(Duration::from_secs(1))
            .request_timeout(Duration::from_millis(1500))
    })
    .expect("a shorter cadence leaves room for a longer request timeout");
    for bad in ["", "no-slash", "a/\n/"] {
        let result = EtcdLocker::builder(client.clone()).namespace(bad).build();
        assert!(
            matches!(result, Err(ConfigError::BadNamespace(_))),
            "{bad:?}"
        );
    }
    let ok = EtcdLocker::builder(client.clone())
        .ttl(Duration::from_secs(2))
        .renewal_cadence(Duration::from_millis(500))
        .build()
        .expect("the minimum TTL is fine");
    assert_eq!(ok.namespace(), tower_lease_lock::etcd::DEFAULT_NAMESPACE);
    let err = build(|b| b.ttl(Duration::from_secs(1))).unwrap_err();
    assert!(err.to_string().contains("minimum"), "{err}");
}

// ---------------------------------------------------------------------------
// Regressions found in review
// ---------------------------------------------------------------------------

/// A lease revoke deletes all of its keys at one revision: a waiter must see
/// every one of those deletes, not just the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_sees_every_delete_of_one_revision() {
    use tower_lease_lock::{LockMode, Wait};

    let etcd = etcd().await;
    let (a, b) = (locker(&etcd, 10).await, locker(&etcd, 10).await);
    let lock_name = name("revoked-readers");
    let mut readers = Vec::new();
    for _ in 0..3 {
        readers.push(
            a.lock(&lock_name, LockMode::Shared, Wait::Try)
                .await
                .expect("readers share"),
        );
    }
    let writer = tokio::spawn({
        let (b, lock_name) = (b.clone(), lock_name.clone());
        async move { b.acquire(&lock_name, Duration::from_secs(20)).await }
    });
    let prefix = a.key_prefix(&lock_name);
    eventually("the writer queued", Duration::from_secs(5), || async {
        keys_under(&etcd, &prefix).await.len() == 4
    })
    .await;
    let lease = readers[0].lease_id().expect("etcd lock");
    let mut client = etcd.client().await.expect("connect");
    let revoked = Instant::now();
    client.lease_revoke(lease).await.expect("revoke");
    let guard = tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .expect("the writer waited on readers that are gone")
        .unwrap()
        .expect("writer");
    assert!(revoked.elapsed() < Duration::from_secs(5));
    drop(guard);
    drop(readers);
    assert_no_keys_left(&etcd).await;
}

/// Waiters that give up while the name's watch is being set up must not
/// leave it half-made for the waiters after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_that_give_up_early_do_not_wedge_the_name() {
    let etcd = etcd().await;
    let (a, b) = (locker(&etcd, 10).await, locker(&etcd, 10).await);
    let lock_name = name("impatient");
    let holder = a.try_acquire(&lock_name).await.expect("holder");
    for micros in [1u64, 50, 200, 1_000, 3_000] {
        let early = b.acquire(&lock_name, Duration::from_micros(micros)).await;
        assert!(
            matches!(early, Err(LockError::Timeout { .. })),
            "{micros} us: {early:?}"
        );
    }
    let patient = tokio::spawn({
        let (b, lock_name) = (b.clone(), lock_name.clone());
        async move { b.acquire(&lock_name, Duration::from_secs(10)).await }
    });
    let prefix = a.key_prefix(&lock_name);
    eventually(
        "the patient waiter queued",
        Duration::from_secs(5),
        || async { keys_under(&etcd, &prefix).await.len() == 2 },
    )
    .await;
    holder.release().await.expect("release");
    let guard = tokio::time::timeout(Duration::from_secs(3), patient)
        .await
        .expect("the patient waiter was not woken")
        .unwrap()
        .expect("acquired");
    drop(guard);
    assert_no_keys_left(&etcd).await;
}

/// Dropping the future of `release()` mid-flight still releases the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_release_still_releases() {
    let etcd = etcd().await;
    let (a, b) = (locker(&etcd, 10).await, locker(&etcd, 10).await);
    for i in 0..10 {
        let lock_name = name(&format!("cancelled-release-{i}"));
        let guard = a.try_acquire(&lock_name).await.expect("acquire");
        // Polled once (the delete is sent), then dropped.
        let _ = tokio::time::timeout(Duration::from_micros(10), guard.release()).await;
        let b = b.clone();
        eventually("the name is free again", Duration::from_secs(3), || {
            let (b, lock_name) = (b.clone(), lock_name.clone());
            async move { b.try_acquire(&lock_name).await.is_ok() }
        })
        .await;
    }
    eventually(
        "locker a forgot its keys",
        Duration::from_secs(3),
        || async { a.own_keys() == 0 },
    )
    .await;
    assert_no_keys_left(&etcd).await;
}

// ---------------------------------------------------------------------------
// Fenced writes
// ---------------------------------------------------------------------------

/// `txn_if_held` applies only while the lock is held by that very
/// acquisition: not after its release, not for a later holder that reuses
/// the same key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_writes_apply_only_while_held() {
    use etcd_client::TxnOp;

    let etcd = etcd().await;
    let a = locker(&etcd, 10).await;
    let lock_name = name("fenced");
    let mut client = etcd.client().await.expect("connect");
    let read = |client: &mut etcd_client::Client| {
        let mut client = client.clone();
        async move {
            let resp = client.get("data/fenced", None).await.expect("get");
            resp.kvs().first().map(|kv| kv.value().to_vec())
        }
    };

    let first = a.try_acquire(&lock_name).await.expect("acquire");
    let stale = first.info().clone();
    a.txn_if_held(&stale, vec![TxnOp::put("data/fenced", "1", None)])
        .await
        .expect("held: applies");
    assert_eq!(read(&mut client).await.as_deref(), Some(&b"1"[..]));
    first.release().await.expect("release");

    let refused = a
        .txn_if_held(&stale, vec![TxnOp::put("data/fenced", "2", None)])
        .await;
    assert!(
        matches!(refused, Err(LockError::Lost { .. })),
        "{refused:?}"
    );

    // The same locker takes the name again: same key, new create revision.
    let second = a.try_acquire(&lock_name).await.expect("acquire again");
    assert_eq!(second.key(), stale.key(), "the slot is reused");
    assert!(second.token() > stale.token());
    let refused = a
        .txn_if_held(&stale, vec![TxnOp::put("data/fenced", "3", None)])
        .await;
    assert!(
        matches!(refused, Err(LockError::Lost { .. })),
        "{refused:?}"
    );
    a.txn_if_held(second.info(), vec![TxnOp::put("data/fenced", "4", None)])
        .await
        .expect("the new holder writes");
    assert_eq!(read(&mut client).await.as_deref(), Some(&b"4"[..]));
    drop(second);
    assert_no_keys_left(&etcd).await;
}
