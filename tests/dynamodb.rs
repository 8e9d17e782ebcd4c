//! The DynamoDB backend against a real emulator (dynalite, whose conditional
//! writes are atomic): one winner per race, mutual exclusion, takeover of a
//! killed holder after one to two leases (no clock used), increasing
//! fencing tokens, lost locks, timeouts and cancellation, a missing table,
//! `ensure_table`, an unreachable service, unsupported modes, builder
//! errors, reads while waiting, one poller per name, and the Tower layer.
//!
//! Every test starts its own dynalite (killed when dropped). Run with
//! `--test-threads 8`: most tests wait on timers, not on the CPU.
#![cfg(all(feature = "dynamodb", feature = "test-util"))]

mod common;

use common::body::ChannelBody;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, Method, Request, StatusCode};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use common::process::Proc;
use http_body_util::BodyExt;
use tokio::sync::{mpsc, Barrier};
use tower::ServiceExt;
use tower_lease_lock::dynamodb::fencing::Fence;
use tower_lease_lock::dynamodb::{DynamoDbConfigError, DynamoDbLocker, TableError};
use tower_lease_lock::store::StoreConfigError;
use tower_lease_lock::testing::{Dynalite, TcpProxy};
use tower_lease_lock::{Key, LockError, LockLayer, LockMode, LockName, Locker, Wait};

const TABLE: &str = "locks";
/// The short lease of the timing tests, with its heartbeat and request
/// timeout (3 s lease: 0.6 s margin, 0.75 s + 2 x 0.8 s fits in 2.4 s).
const LEASE: Duration = Duration::from_secs(3);
const HEARTBEAT: Duration = Duration::from_millis(750);
const REQUEST_TIMEOUT: Duration = Duration::from_millis(800);
/// The bound on anything that should happen "soon".
const SOON: Duration = Duration::from_secs(10);

fn name(s: &str) -> LockName {
    LockName::new(s).expect("valid lock name")
}

async fn dynalite() -> Dynalite {
    Dynalite::start().await.expect("start dynalite")
}

/// A locker with the short lease and a quick busy wait, on its own client.
fn short(dynalite: &Dynalite) -> DynamoDbLocker {
    DynamoDbLocker::builder(dynalite.client(), TABLE)
        .lease_duration(LEASE)
        .heartbeat(HEARTBEAT)
        .request_timeout(REQUEST_TIMEOUT)
        .busy_wait(Duration::from_millis(20), Duration::from_millis(100))
        .build()
        .expect("build locker")
}

/// A dynalite with the lock table, and a locker on it.
async fn setup() -> (Dynalite, DynamoDbLocker) {
    let dynalite = dynalite().await;
    let locker = short(&dynalite);
    locker.ensure_table().await.expect("ensure_table");
    (dynalite, locker)
}

async fn soon<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(SOON, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {SOON:?}"))
}

/// Polls `check` every 10 ms until it holds; panics after `limit`.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The lock item of `name`.
async fn item(dynalite: &Dynalite, lock: &LockName) -> Option<HashMap<String, AttributeValue>> {
    dynalite
        .client()
        .get_item()
        .table_name(TABLE)
        .key("lock", AttributeValue::S(lock.encoded()))
        .consistent_read(true)
        .send()
        .await
        .expect("get_item")
        .item
}

/// `true` when `name` is free in the table (no item, or released).
async fn is_free(dynalite: &Dynalite, lock: &LockName) -> bool {
    item(dynalite, lock).await.is_none_or(|item| {
        item.get("released") == Some(&AttributeValue::Bool(true)) && !item.contains_key("owner")
    })
}

/// Waits until `locker` holds nothing and waits for nothing.
async fn wait_idle(locker: &DynamoDbLocker) {
    eventually("the locker idle", SOON, || async {
        let d = locker.diagnostics();
        d.held == 0 && d.waiting_names == 0
    })
    .await;
}

fn expect_locked(result: Result<tower_lease_lock::LockGuard, LockError>) {
    match result {
        Err(LockError::Locked { .. }) => {}
        other => panic!("expected Locked, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Races and exclusion
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_lockers_one_winner_per_round() {
    let (dynalite, first) = setup().await;
    let lockers: Vec<DynamoDbLocker> = std::iter::once(first)
        .chain((1..16).map(|_| short(&dynalite)))
        .collect();
    let lock = name("race");
    let mut last_token = 0;
    for round in 0..30 {
        let barrier = Arc::new(Barrier::new(lockers.len()));
        let tries: Vec<_> = lockers
            .iter()
            .cloned()
            .map(|locker| {
                let (barrier, lock) = (Arc::clone(&barrier), lock.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    locker.try_acquire(&lock).await
                })
            })
            .collect();
        let mut winners = Vec::new();
        for task in tries {
            match soon("a try", task).await.expect("task") {
                Ok(guard) => winners.push(guard),
                Err(LockError::Locked { .. }) => {}
                Err(other) => panic!("round {round}: {other}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {} winners", winners.len());
        let guard = winners.pop().expect("a winner");
        assert!(guard.token() > last_token, "round {round}");
        last_token = guard.token();
        guard.release().await.expect("release");
    }
    for locker in &lockers {
        assert_eq!(locker.diagnostics().held, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_exclusion_of_a_counter() {
    let (dynalite, a) = setup().await;
    let b = short(&dynalite);
    let lock = name("counter");
    let counter = Arc::new(AtomicU64::new(0));
    let inside = Arc::new(AtomicBool::new(false));
    const ROUNDS: u64 = 5;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let locker = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (lock, counter, inside) = (lock.clone(), Arc::clone(&counter), Arc::clone(&inside));
            tokio::spawn(async move {
                let mut tokens = Vec::new();
                for _ in 0..ROUNDS {
                    let guard = locker
                        .acquire(&lock, Duration::from_secs(60))
                        .await
                        .expect("acquire");
                    assert!(!inside.swap(true, SeqCst), "two holders at once");
                    // Not atomic: a lost update shows a second holder.
                    let seen = counter.load(SeqCst);
                    tokio::task::yield_now().await;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    counter.store(seen + 1, SeqCst);
                    inside.store(false, SeqCst);
                    tokens.push(guard.token());
                    guard.release().await.expect("release");
                }
                tokens
            })
        })
        .collect();
    let mut tokens = Vec::new();
    for task in tasks {
        tokens.extend(soon("a worker", task).await.expect("task"));
    }
    assert_eq!(counter.load(SeqCst), 8 * ROUNDS);
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(
        tokens.len() as u64,
        8 * ROUNDS,
        "every hold had its own token"
    );
    wait_idle(&a).await;
    wait_idle(&b).await;
    assert!(is_free(&dynalite, &lock).await);
}

// ---------------------------------------------------------------------------
// Takeover of a killed holder, fencing tokens
// ---------------------------------------------------------------------------

const CHILD_ENDPOINT: &str = "TLL_DYNAMODB_CHILD_ENDPOINT";
const CHILD_NAME: &str = "TLL_DYNAMODB_CHILD_NAME";

/// Not a test of its own: the lock holder of
/// `killed_holder_is_taken_over_after_one_lease`, run in a child process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process of killed_holder_is_taken_over_after_one_lease"]
async fn dynamodb_holder_child() {
    let Ok(endpoint) = std::env::var(CHILD_ENDPOINT) else {
        return;
    };
    let lock = name(&std::env::var(CHILD_NAME).expect(CHILD_NAME));
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(Dynalite::REGION))
        .credentials_provider(Credentials::new("k", "s", None, None, "child"))
        .endpoint_url(endpoint)
        .build();
    let locker = DynamoDbLocker::builder(aws_sdk_dynamodb::Client::from_conf(config), TABLE)
        .lease_duration(LEASE)
        .heartbeat(HEARTBEAT)
        .request_timeout(REQUEST_TIMEOUT)
        .build()
        .expect("build");
    let guard = locker.try_acquire(&lock).await.expect("child acquires");
    common::process::say_held(guard.token());
    // Heartbeats go on until the parent kills this process.
    tokio::time::sleep(Duration::from_secs(60)).await;
    drop(guard);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_holder_is_taken_over_after_one_lease() {
    let (dynalite, waiter) = setup().await;
    let lock = name("killed-holder");
    let mut child = Proc::spawn_child_test(
        "holder child",
        "dynamodb_holder_child",
        &[
            (CHILD_ENDPOINT, dynalite.endpoint()),
            (CHILD_NAME, lock.as_str()),
        ],
    );
    let child_token = child.held_token(Duration::from_secs(30)).await;
    // Held, and kept alive by its heartbeats for longer than a lease.
    let before = item(&dynalite, &lock).await.expect("item")["rvn"].clone();
    tokio::time::sleep(LEASE + HEARTBEAT).await;
    let after = item(&dynalite, &lock).await.expect("item")["rvn"].clone();
    assert_ne!(before, after, "the child's heartbeats rewrite the version");
    expect_locked(waiter.try_acquire(&lock).await);

    child.kill();
    let killed_at = Instant::now();
    let guard = waiter
        .acquire(&lock, Duration::from_secs(20))
        .await
        .expect("the killed holder's lock is taken over");
    let took = killed_at.elapsed();
    assert!(
        took >= LEASE,
        "taken over {took:?} after the kill: before a whole lease"
    );
    assert!(
        took < LEASE * 2,
        "taken over {took:?} after the kill: later than two leases"
    );
    assert!(guard.token() > child_token);
    println!("taken over {took:?} after killing the holder (lease {LEASE:?})");
    guard.release().await.expect("release");
    drop(child);
    assert!(is_free(&dynalite, &lock).await);
}

/// Writes the item a holder that crashed leaves behind: held, with a
/// version nobody rewrites.
async fn abandoned_hold(dynalite: &Dynalite, lock: &LockName, lease: Duration, rvn: &str) {
    dynalite
        .client()
        .update_item()
        .table_name(TABLE)
        .key("lock", AttributeValue::S(lock.encoded()))
        .update_expression("SET #o = :o, #r = :r, #l = :l, #rel = :f ADD #t :one")
        .expression_attribute_names("#o", "owner")
        .expression_attribute_names("#r", "rvn")
        .expression_attribute_names("#l", "lease_ms")
        .expression_attribute_names("#rel", "released")
        .expression_attribute_names("#t", "token")
        .expression_attribute_values(":o", AttributeValue::S("crashed".into()))
        .expression_attribute_values(":r", AttributeValue::S(rvn.into()))
        .expression_attribute_values(":l", AttributeValue::N(lease.as_millis().to_string()))
        .expression_attribute_values(":f", AttributeValue::Bool(false))
        .expression_attribute_values(":one", AttributeValue::N("1".into()))
        .send()
        .await
        .expect("write the abandoned hold");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_increase_across_release_takeover_and_reacquire() {
    let (dynalite, a) = setup().await;
    let b = short(&dynalite);
    let lock = name("tokens");

    let first = a.try_acquire(&lock).await.expect("first");
    let t1 = first.token();
    first.release().await.expect("release");
    let second = b.try_acquire(&lock).await.expect("after a release");
    let t2 = second.token();
    second.release().await.expect("release");

    // A holder that crashed (1 s lease): taken over after that lease.
    abandoned_hold(&dynalite, &lock, Duration::from_secs(1), "crashed:0").await;
    let crashed: u64 = item(&dynalite, &lock).await.expect("item")["token"]
        .as_n()
        .expect("number")
        .parse()
        .expect("u64");
    let holder = match a.try_acquire(&lock).await {
        Err(LockError::Locked { holder, .. }) => holder,
        other => panic!("expected Locked, got {other:?}"),
    };
    let started = Instant::now();
    let third = a.acquire(&lock, SOON).await.expect("takeover");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let t3 = third.token();
    drop(third); // released in the background
    eventually("released", SOON, || is_free(&dynalite, &lock)).await;
    let fourth = a.try_acquire(&lock).await.expect("re-acquire");
    let t4 = fourth.token();
    fourth.release().await.expect("release");

    assert!(
        t1 < t2 && t2 < crashed && crashed < t3 && t3 < t4,
        "{t1} {t2} {crashed} {t3} {t4} ({holder:?})"
    );
    assert!(is_free(&dynalite, &lock).await);
}

/// Two waiters take over the same abandoned hold: one wins, the other's
/// takeover is refused (dynalite says nothing of the new holder). That one
/// must read again, not repeat a take conditioned on the gone version: when
/// the new holder is abandoned in turn, it is taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_takeover_reads_again() {
    let (dynalite, a) = setup().await;
    let b = short(&dynalite);
    let lock = name("double-takeover");
    abandoned_hold(&dynalite, &lock, Duration::from_secs(1), "crashed:0").await;
    let spawn = |locker: &DynamoDbLocker| {
        let (locker, lock) = (locker.clone(), lock.clone());
        tokio::spawn(async move { locker.acquire(&lock, SOON).await })
    };
    let (mut first, mut second) = (spawn(&a), spawn(&b));
    let (winner, loser, mut waiting) = tokio::select! {
        won = &mut first => (won, &b, second),
        won = &mut second => (won, &a, first),
    };
    let winner = winner.expect("task").expect("one waiter takes over");
    // The winner is abandoned in turn (its item rewritten by a crashed one).
    abandoned_hold(&dynalite, &lock, Duration::from_secs(1), "crashed:1").await;
    soon("the winner's lost()", winner.lost()).await;
    drop(winner);
    let taken = Instant::now();
    let guard = soon("the second takeover", &mut waiting)
        .await
        .expect("task")
        .expect("the other waiter takes over the new abandoned hold");
    assert!(
        taken.elapsed() < Duration::from_secs(3),
        "{:?}",
        taken.elapsed()
    );
    guard.release().await.expect("release");
    wait_idle(loser).await;
    eventually("released", SOON, || is_free(&dynalite, &lock)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_refuses_an_older_token() {
    let (dynalite, a) = setup().await;
    let client = dynalite.client();
    client
        .create_table()
        .table_name("accounts")
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("id")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .expect("definition"),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("id")
                .key_type(KeyType::Hash)
                .build()
                .expect("key"),
        )
        .send()
        .await
        .expect("create accounts");
    let lock = name("account-1");
    let old = a.try_acquire(&lock).await.expect("old").token();
    a.shutdown().await.expect("shutdown");
    let b = short(&dynalite);
    let new = b.try_acquire(&lock).await.expect("new");
    let write = |token: u64, balance: &str| {
        let update = client
            .update_item()
            .table_name("accounts")
            .key("id", AttributeValue::S("1".into()))
            .update_expression("SET balance = :b")
            .expression_attribute_values(":b", AttributeValue::N(balance.into()));
        Fence::new(token).update_item(update).send()
    };
    write(new.token(), "10")
        .await
        .expect("the new holder writes");
    let late = write(old, "5")
        .await
        .expect_err("the old holder is fenced off");
    assert!(late
        .as_service_error()
        .is_some_and(|e| e.is_conditional_check_failed_exception()));
    // The same token twice: refused unless repeatable.
    assert!(write(new.token(), "11").await.is_err());
    let update = client
        .update_item()
        .table_name("accounts")
        .key("id", AttributeValue::S("1".into()))
        .update_expression("SET balance = :b")
        .expression_attribute_values(":b", AttributeValue::N("12".into()));
    Fence::new(new.token())
        .repeatable()
        .update_item(update)
        .send()
        .await
        .expect("repeatable");
    let put = client
        .put_item()
        .table_name("accounts")
        .item("id", AttributeValue::S("1".into()))
        .item("balance", AttributeValue::N("1".into()));
    assert!(
        Fence::new(old).put_item(put).send().await.is_err(),
        "an old put is refused"
    );
    new.release().await.expect("release");
}

// ---------------------------------------------------------------------------
// Lost locks
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_when_the_item_is_changed_from_outside() {
    let (dynalite, a) = setup().await;
    let lock = name("changed");
    let guard = a.try_acquire(&lock).await.expect("acquire");
    dynalite
        .client()
        .update_item()
        .table_name(TABLE)
        .key("lock", AttributeValue::S(lock.encoded()))
        .update_expression("SET #r = :r")
        .expression_attribute_names("#r", "rvn")
        .expression_attribute_values(":r", AttributeValue::S("intruder".into()))
        .send()
        .await
        .expect("change the item");
    let changed = Instant::now();
    let reason = soon("lost()", guard.lost()).await;
    assert!(changed.elapsed() <= HEARTBEAT + REQUEST_TIMEOUT + Duration::from_millis(500));
    assert!(reason.contains("refused"), "{reason}");
    // Releasing a lost lock leaves the intruder's item alone.
    guard.release().await.expect("release is harmless");
    let item = item(&dynalite, &lock).await.expect("item");
    assert_eq!(item["rvn"], AttributeValue::S("intruder".into()));
    assert_eq!(item["released"], AttributeValue::Bool(false));
    wait_idle(&a).await;
}

/// With more locks held than the renewal task sends at once (64), no more
/// than 64 renewals are in flight, even when none is answered: each needs
/// a connection of its own through the proxy, which counts them. The task
/// went on starting the next 64 as soon as it had started 64, until every
/// due renewal was in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_64_renewals_are_in_flight() {
    const HELD: usize = 100;
    const PARALLEL: u64 = 64;
    let dynalite = dynalite().await;
    let proxy = TcpProxy::start(&format!("127.0.0.1:{}", dynalite.port()))
        .await
        .expect("proxy");
    let client = aws_sdk_dynamodb::Client::from_conf(
        dynalite.config().endpoint_url(proxy.endpoint()).build(),
    );
    // Renewals every 5 s, each attempt given 2 s (half the request
    // timeout; a retry would open another connection): the first wave is
    // all in flight, unanswered, well before any attempt times out.
    let locker = DynamoDbLocker::builder(client, TABLE)
        .lease_duration(Duration::from_secs(30))
        .heartbeat(Duration::from_secs(5))
        .request_timeout(Duration::from_secs(4))
        .build()
        .expect("build locker");
    locker.ensure_table().await.expect("ensure_table");
    let mut guards = Vec::new();
    for i in 0..HELD {
        let guard = locker.try_acquire(&name(&format!("held-{i}"))).await;
        guards.push(guard.expect("acquire"));
    }
    // Nothing answers from here on; the renewals fall due within the
    // time the acquisitions took.
    proxy.blackhole();
    let before = proxy.connections_accepted();
    eventually("the first renewals in flight", SOON, || async {
        proxy.connections_accepted() - before >= PARALLEL / 2
    })
    .await;
    // The rest of the wave (every hold falls due within the few hundred ms
    // the acquisitions took), before the first attempts time out.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let in_flight = proxy.connections_accepted() - before;
    assert!(
        in_flight <= PARALLEL,
        "{in_flight} renewals in flight at once ({HELD} locks held)"
    );
    assert!(in_flight >= PARALLEL / 2, "{in_flight}");
    proxy.pass();
    drop(guards);
    wait_idle(&locker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_when_heartbeats_stop() {
    let (dynalite, a) = setup().await;
    let lock = name("frozen");
    let guard = a.try_acquire(&lock).await.expect("acquire");
    let acquired = Instant::now();
    dynalite.pause().expect("pause dynalite");
    let reason = soon("lost()", guard.lost()).await;
    let after = acquired.elapsed();
    dynalite.resume().expect("resume dynalite");
    // The local deadline: at most a lease (minus its margin) after the last
    // confirmed heartbeat was sent.
    assert!(after <= LEASE, "lost {after:?} after the acquisition");
    assert!(reason.contains("deadline"), "{reason}");
    println!("lost {after:?} after the acquisition, dynalite frozen");
    guard.release().await.ok();
    wait_idle(&a).await;
}

// ---------------------------------------------------------------------------
// Timeouts, cancellation, unreachable service, missing table
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_and_cancellation_leave_the_lock_free() {
    let (dynalite, a) = setup().await;
    let b = short(&dynalite);
    let lock = name("cancel");
    let held = a.try_acquire(&lock).await.expect("acquire");

    match b.acquire(&lock, Duration::from_millis(300)).await {
        Err(LockError::Timeout { .. }) => {}
        other => panic!("expected Timeout, got {other:?}"),
    }
    wait_idle(&b).await;

    // Dropped mid-wait, several times, at different points.
    for ms in [1, 30, 120] {
        let waiting = b.acquire(&lock, SOON);
        assert!(tokio::time::timeout(Duration::from_millis(ms), waiting)
            .await
            .is_err());
    }
    wait_idle(&b).await;

    // Dropped while the lock is being handed over.
    let waiting = tokio::spawn({
        let (b, lock) = (b.clone(), lock.clone());
        async move { b.acquire(&lock, SOON).await }
    });
    eventually("b waits", SOON, || async {
        b.diagnostics().waiting_names == 1
    })
    .await;
    held.release().await.expect("release");
    waiting.abort();
    let _ = waiting.await;
    wait_idle(&b).await;
    wait_idle(&a).await;
    eventually("the lock free in the table", SOON, || {
        is_free(&dynalite, &lock)
    })
    .await;
    let again = a.try_acquire(&lock).await.expect("free again");
    again.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_table_is_a_clear_error() {
    let dynalite = dynalite().await;
    let locker = short(&dynalite);
    let lock = name("nowhere");
    for wait in [Wait::Try, Wait::Timeout(SOON)] {
        let started = Instant::now();
        match locker.lock(&lock, LockMode::Exclusive, wait).await {
            Err(err @ LockError::PermissionDenied { .. }) => {
                let text = err.to_string();
                assert!(
                    text.contains("\"locks\"") && text.contains("ensure_table"),
                    "{text}"
                );
            }
            other => panic!("{wait:?}: expected PermissionDenied, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{wait:?} did not fail at once"
        );
    }
    wait_idle(&locker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_table_is_idempotent_and_checks_the_key() {
    let dynalite = dynalite().await;
    let a = short(&dynalite);
    let b = short(&dynalite);
    let (x, y) = tokio::join!(a.ensure_table(), b.ensure_table());
    x.expect("first");
    y.expect("concurrent");
    a.ensure_table().await.expect("again");
    let guard = a.try_acquire(&name("x")).await.expect("works");
    guard.release().await.expect("release");

    // Another key attribute on the same table: refused, naming both.
    let other = DynamoDbLocker::builder(dynalite.client(), TABLE)
        .key_attribute("id")
        .build()
        .expect("build");
    match other.ensure_table().await {
        Err(err @ TableError::KeySchema { .. }) => {
            assert!(err.to_string().contains("\"id\""), "{err}");
        }
        other => panic!("expected KeySchema, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_service_is_unavailable_within_the_request_timeout() {
    let (mut dynalite, a) = setup().await;
    let lock = name("unreachable");
    dynalite.kill();
    let started = Instant::now();
    match a.try_acquire(&lock).await {
        Err(LockError::Unavailable { .. }) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took < REQUEST_TIMEOUT + Duration::from_secs(1),
        "took {took:?}"
    );
    match a.acquire(&lock, Duration::from_millis(500)).await {
        Err(LockError::Timeout { .. }) => {}
        other => panic!("waiting: expected Timeout, got {other:?}"),
    }
    wait_idle(&a).await;
}

// ---------------------------------------------------------------------------
// Modes and configuration
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_and_permits_are_unsupported() {
    let (_dynalite, a) = setup().await;
    let lock = name("modes");
    for mode in [LockMode::Shared, LockMode::permits(3).expect("n > 0")] {
        match a.lock(&lock, mode, Wait::Try).await {
            Err(LockError::UnsupportedMode {
                backend: "dynamodb",
                ..
            }) => {}
            other => panic!("{mode:?}: expected UnsupportedMode, got {other:?}"),
        }
    }
    assert_eq!(
        a.diagnostics().take_requests,
        0,
        "refused without a request"
    );
}

#[test]
fn builder_misuse_gives_typed_errors() {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .build();
    let client = aws_sdk_dynamodb::Client::from_conf(config);
    let builder = || DynamoDbLocker::builder(client.clone(), TABLE);
    let err =
        |b: tower_lease_lock::dynamodb::DynamoDbLockerBuilder| b.build().expect_err("refused");

    assert!(builder().build().is_ok());
    assert_eq!(
        err(builder().lease_duration(Duration::from_millis(500))),
        DynamoDbConfigError::BadLease(Duration::from_millis(500))
    );
    assert!(matches!(
        err(builder()
            .lease_duration(Duration::from_secs(10))
            .heartbeat(Duration::from_secs(6))),
        DynamoDbConfigError::BadHeartbeat { .. }
    ));
    assert!(matches!(
        err(builder().heartbeat(Duration::ZERO)),
        DynamoDbConfigError::BadHeartbeat { .. }
    ));
    assert!(matches!(
        err(builder().request_timeout(Duration::from_secs(8))),
        DynamoDbConfigError::Timing(StoreConfigError::NoRoomToRenew { .. })
    ));
    assert!(matches!(
        err(builder().busy_wait(Duration::from_secs(2), Duration::from_secs(1))),
        DynamoDbConfigError::Timing(StoreConfigError::BadBusyWait { .. })
    ));
    assert!(matches!(
        err(DynamoDbLocker::builder(client.clone(), "a b")),
        DynamoDbConfigError::BadTable(_)
    ));
    assert!(matches!(
        err(builder().key_attribute("token")),
        DynamoDbConfigError::BadKeyAttribute(_)
    ));
    // A short lease gets a request timeout that fits by default.
    let short = builder()
        .lease_duration(Duration::from_secs(2))
        .build()
        .expect("2 s lease");
    assert!(short.timing().request_timeout < Duration::from_secs(1));
}

// ---------------------------------------------------------------------------
// Waiting: reads, not takes; one poller per name
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_polls_read_instead_of_taking() {
    let (dynalite, a) = setup().await;
    let b = short(&dynalite);
    let lock = name("busy");
    let held = a.try_acquire(&lock).await.expect("acquire");
    let _ = b.acquire(&lock, Duration::from_millis(1500)).await;
    let d = b.diagnostics();
    assert!(d.observe_requests >= 5, "{d:?}");
    assert_eq!(d.take_requests, 0, "a busy name is read, not taken: {d:?}");
    held.release().await.expect("release");
    wait_idle(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_of_one_locker_share_one_poller() {
    let (dynalite, a) = setup().await;
    let b = short(&dynalite);
    let lock = name("shared-poller");
    let held = a.try_acquire(&lock).await.expect("acquire");
    let order = Arc::new(Mutex::new(Vec::new()));
    let waiters: Vec<_> = (0..8)
        .map(|i| {
            let (b, lock, order) = (b.clone(), lock.clone(), Arc::clone(&order));
            tokio::spawn(async move {
                let guard = b
                    .acquire(&lock, Duration::from_secs(30))
                    .await
                    .expect("acquire");
                order.lock().unwrap().push(i);
                guard.release().await.expect("release");
            })
        })
        .collect();
    eventually("8 waiters queued", SOON, || async {
        b.diagnostics().waiting_names == 1
    })
    .await;
    let start = b.diagnostics().observe_requests;
    let window = Duration::from_secs(1);
    tokio::time::sleep(window).await;
    let polls = b.diagnostics().observe_requests - start;
    // One poller pauses at least 20 ms between reads: at most ~50 a second.
    assert!(
        (1..=55).contains(&polls),
        "{polls} reads in {window:?} for 8 waiters"
    );
    held.release().await.expect("release");
    for waiter in waiters {
        soon("a waiter", waiter).await.expect("waiter");
    }
    assert_eq!(order.lock().unwrap().len(), 8);
    let d = b.diagnostics();
    assert!(d.take_requests <= 10, "{d:?}");
    wait_idle(&b).await;
}

// ---------------------------------------------------------------------------
// The Tower layer on this backend
// ---------------------------------------------------------------------------

type Streams = Arc<Mutex<Option<mpsc::Receiver<Bytes>>>>;

fn app(locker: DynamoDbLocker, streams: Streams) -> Router {
    async fn stream(State(streams): State<Streams>) -> Body {
        let rx = streams.lock().unwrap().take().expect("a stream to serve");
        Body::new(ChannelBody(rx))
    }
    Router::new()
        .route("/tenants/{tenant}/stream", post(stream))
        .route("/tenants/{tenant}/quick", post(|| async { "ok" }))
        .with_state(streams)
        .layer(LockLayer::new(
            locker,
            Key::path_param("tenant").expect("key"),
        ))
}

async fn post_to(app: &Router, uri: &str) -> axum::response::Response {
    let request = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .body(Body::empty())
        .expect("request");
    match soon(uri, app.clone().oneshot(request)).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_end_to_end() {
    let (dynalite, a) = setup().await;
    let b = short(&dynalite);
    let streams: Streams = Arc::new(Mutex::new(None));
    let app_a = app(a.clone(), Arc::clone(&streams));
    let app_b = app(b.clone(), Arc::clone(&streams));

    let (tx, rx) = mpsc::channel(4);
    *streams.lock().unwrap() = Some(rx);
    let response = post_to(&app_a, "/tenants/acme/stream").await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    tx.send(Bytes::from("first")).await.expect("body alive");
    let frame = soon("a chunk", body.frame())
        .await
        .expect("frame")
        .expect("ok");
    assert_eq!(frame.into_data().expect("data"), "first");

    // Held until the body ends: the other locker's app answers 423 at once.
    let refused = post_to(&app_b, "/tenants/acme/quick").await;
    assert_eq!(refused.status(), StatusCode::LOCKED);
    assert!(refused.headers().contains_key(header::RETRY_AFTER));
    let other = post_to(&app_b, "/tenants/other/quick").await;
    assert_eq!(other.status(), StatusCode::OK);
    // Its body read to the end: the other tenant's lock is released.
    let _ = soon("the body", other.into_body().collect()).await;
    let lock = name("acme");
    assert!(!is_free(&dynalite, &lock).await);

    drop(tx);
    let rest = soon("the end of the body", body.collect())
        .await
        .expect("ok")
        .to_bytes();
    assert!(rest.is_empty());
    wait_idle(&a).await;
    eventually("acme free", SOON, || is_free(&dynalite, &lock)).await;
    let after = post_to(&app_b, "/tenants/acme/quick").await;
    assert_eq!(after.status(), StatusCode::OK);
    let _ = soon("the body", after.into_body().collect()).await;
    wait_idle(&b).await;
    eventually("acme free", SOON, || is_free(&dynalite, &lock)).await;
}
