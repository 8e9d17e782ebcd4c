//! Read/write locks and permits (semaphores), on real etcd and in memory:
//! engine order and invariants, then the layer's per-method and permits modes.

mod common;

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::routing::{get, post};
use axum::Router;
use common::*;
use http::{Request, StatusCode};
use tokio::sync::Barrier;
use tower::ServiceExt;
use tower_lease_lock::axum::HeldLock;
use tower_lease_lock::{Key, LockError, LockLayer, LockMode, LockName, Locker, MemoryLocker, Wait};

const LONG: Wait = Wait::Timeout(Duration::from_secs(20));

fn p(n: u32) -> LockMode {
    LockMode::permits(n).unwrap()
}

/// The Go rwlock library's demo: r1 reads at t=0 and holds 500 ms, r2 reads at
/// t=100 ms (shares at once), w3 asks to write at t=200 ms (waits for r1 and
/// r2), r4 asks to read at t=300 ms (queues behind w3, does not overtake it).
async fn go_demo<L: Locker>(lockers: [L; 4]) -> Vec<String> {
    let name = LockName::new("rw-demo").unwrap();
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let note = |log: &Arc<Mutex<Vec<String>>>, s: &str| log.lock().unwrap().push(s.to_string());
    let plan = [
        ("r1", LockMode::Shared, 0u64, 500u64),
        ("r2", LockMode::Shared, 100, 500),
        ("w3", LockMode::Exclusive, 200, 200),
        ("r4", LockMode::Shared, 300, 100),
    ];
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for ((who, mode, at, hold), locker) in plan.into_iter().zip(lockers) {
        let (log, name) = (Arc::clone(&log), name.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start + Duration::from_millis(at)).await;
            let guard = locker.lock(&name, mode, LONG).await.expect("acquire");
            note(&log, &format!("{who} acquired"));
            tokio::time::sleep(Duration::from_millis(hold)).await;
            note(&log, &format!("{who} released"));
            guard.release().await.expect("release");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let log = log.lock().unwrap().clone();
    log
}

fn assert_go_demo_order(log: &[String]) {
    assert_eq!(log.len(), 8, "{log:?}");
    assert_eq!(&log[..2], ["r1 acquired", "r2 acquired"], "{log:?}");
    let mut released: Vec<&str> = log[2..4].iter().map(String::as_str).collect();
    released.sort_unstable();
    assert_eq!(released, ["r1 released", "r2 released"], "{log:?}");
    assert_eq!(
        &log[4..],
        ["w3 acquired", "w3 released", "r4 acquired", "r4 released"],
        "writer must run alone and r4 must not overtake it: {log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_demo_order_on_etcd() {
    let etcd = etcd().await;
    let lockers = [
        locker(&etcd, 5).await,
        locker(&etcd, 5).await,
        locker(&etcd, 5).await,
        locker(&etcd, 5).await,
    ];
    let log = go_demo(lockers).await;
    assert_go_demo_order(&log);
    assert_no_keys_left(&etcd).await;
}

#[tokio::test]
async fn go_demo_order_in_memory() {
    let m = MemoryLocker::new();
    let log = go_demo([m.clone(), m.clone(), m.clone(), m]).await;
    assert_go_demo_order(&log);
}

/// Tracks who is inside: never a writer with anyone else.
#[derive(Default)]
struct RwChecker {
    readers: AtomicI64,
    writers: AtomicI64,
    violations: AtomicUsize,
    max_readers: AtomicI64,
}

impl RwChecker {
    fn enter(&self, mode: LockMode) {
        match mode {
            LockMode::Shared => {
                let r = self.readers.fetch_add(1, Ordering::SeqCst) + 1;
                self.max_readers.fetch_max(r, Ordering::SeqCst);
                if self.writers.load(Ordering::SeqCst) != 0 {
                    self.violations.fetch_add(1, Ordering::SeqCst);
                }
            }
            _ => {
                let w = self.writers.fetch_add(1, Ordering::SeqCst) + 1;
                if w != 1 || self.readers.load(Ordering::SeqCst) != 0 {
                    self.violations.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }

    fn leave(&self, mode: LockMode) {
        match mode {
            LockMode::Shared => self.readers.fetch_sub(1, Ordering::SeqCst),
            _ => self.writers.fetch_sub(1, Ordering::SeqCst),
        };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_readers_and_writers_never_overlap_a_writer() {
    let etcd = etcd().await;
    let lockers = [locker(&etcd, 5).await, locker(&etcd, 5).await];
    let name = LockName::new("rw-random").unwrap();
    let checker = Arc::new(RwChecker::default());
    let mut tasks = Vec::new();
    for t in 0..12usize {
        let locker = lockers[t % 2].clone();
        let (name, checker) = (name.clone(), Arc::clone(&checker));
        tasks.push(tokio::spawn(async move {
            for i in 0..12usize {
                // A fixed pseudo-random pattern: about one write in four.
                let mode = if (t * 7 + i * 3) % 4 == 0 {
                    LockMode::Exclusive
                } else {
                    LockMode::Shared
                };
                let guard = locker.lock(&name, mode, LONG).await.expect("acquire");
                checker.enter(mode);
                tokio::time::sleep(Duration::from_millis(2)).await;
                checker.leave(mode);
                guard.release().await.expect("release");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(checker.violations.load(Ordering::SeqCst), 0);
    assert!(
        checker.max_readers.load(Ordering::SeqCst) > 1,
        "readers never overlapped: shared mode does not share"
    );
    assert_no_keys_left(&etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_does_not_starve_under_a_stream_of_readers() {
    let etcd = etcd().await;
    let lockers = [locker(&etcd, 5).await, locker(&etcd, 5).await];
    let name = LockName::new("rw-starve").unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    // Six readers whose holds overlap: without fairness a writer would never
    // find the name free.
    for t in 0..6usize {
        let locker = lockers[t % 2].clone();
        let (name, stop) = (name.clone(), Arc::clone(&stop));
        readers.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let guard = locker
                    .lock(&name, LockMode::Shared, LONG)
                    .await
                    .expect("read");
                tokio::time::sleep(Duration::from_millis(30)).await;
                drop(guard);
                n += 1;
            }
            n
        }));
    }
    // Let the readers get going (wait until the name has readers), then write.
    let prefix = lockers[0].key_prefix(&name);
    eventually("readers hold the name", Duration::from_secs(5), || async {
        keys_under(&etcd, &prefix).await.len() >= 3
    })
    .await;
    let asked = Instant::now();
    let writer = lockers[0]
        .lock(
            &name,
            LockMode::Exclusive,
            Wait::Timeout(Duration::from_secs(10)),
        )
        .await;
    let waited = asked.elapsed();
    stop.store(true, Ordering::SeqCst);
    let writer = writer.expect("the writer starved");
    drop(writer);
    let mut reads = 0;
    for r in readers {
        reads += r.await.unwrap();
    }
    assert!(reads > 6, "readers did not keep reading ({reads})");
    assert!(waited < Duration::from_secs(5), "writer waited {waited:?}");
    assert_no_keys_left(&etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_shared_and_exclusive() {
    let etcd = etcd().await;
    let (a, b) = (locker(&etcd, 5).await, locker(&etcd, 5).await);
    let name = LockName::new("rw-try").unwrap();
    let r1 = a.lock(&name, LockMode::Shared, Wait::Try).await.unwrap();
    let r2 = b
        .lock(&name, LockMode::Shared, Wait::Try)
        .await
        .expect("readers share");
    assert!(matches!(
        b.try_acquire(&name).await,
        Err(LockError::Locked { .. })
    ));
    // A writer waiting behind the readers blocks a new try-reader (no overtaking).
    let writer = tokio::spawn({
        let (b, name) = (b.clone(), name.clone());
        async move { b.lock(&name, LockMode::Exclusive, LONG).await }
    });
    let prefix = a.key_prefix(&name);
    eventually("writer queued", Duration::from_secs(5), || async {
        keys_under(&etcd, &prefix).await.len() == 3
    })
    .await;
    let late = a.lock(&name, LockMode::Shared, Wait::Try).await;
    assert!(matches!(late, Err(LockError::Locked { .. })), "{late:?}");
    drop((r1, r2));
    let w = writer
        .await
        .unwrap()
        .expect("writer acquires after the readers");
    assert_eq!(w.mode(), LockMode::Exclusive);
    assert!(matches!(
        b.lock(&name, LockMode::Shared, Wait::Try).await,
        Err(LockError::Locked { .. })
    ));
    drop(w);
    assert_no_keys_left(&etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permits_never_exceed_n_and_slots_are_reused() {
    let etcd = etcd().await;
    let lockers = [locker(&etcd, 5).await, locker(&etcd, 5).await];
    let name = LockName::new("sem").unwrap();
    let inside = Arc::new(AtomicI64::new(0));
    let max = Arc::new(AtomicI64::new(0));
    let mut tasks = Vec::new();
    for t in 0..10usize {
        let locker = lockers[t % 2].clone();
        let (name, inside, max) = (name.clone(), Arc::clone(&inside), Arc::clone(&max));
        tasks.push(tokio::spawn(async move {
            for _ in 0..8 {
                let guard = locker.lock(&name, p(3), LONG).await.expect("permit");
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(3)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                guard.release().await.expect("release");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let max = max.load(Ordering::SeqCst);
    assert!(max <= 3, "{max} holders of 3 permits");
    assert_eq!(max, 3, "the permits were never all in use");

    // Try mode: the 4th is refused, a released slot is reused.
    let held: Vec<_> = [0, 1, 0].into_iter().map(|i| lockers[i].clone()).collect();
    let mut guards = Vec::new();
    for l in &held {
        guards.push(l.lock(&name, p(3), Wait::Try).await.expect("free permit"));
    }
    for l in &lockers {
        let fourth = l.lock(&name, p(3), Wait::Try).await;
        assert!(
            matches!(fourth, Err(LockError::Locked { .. })),
            "{fourth:?}"
        );
    }
    // A different count on the same name is a clear error.
    let other = lockers[1].lock(&name, p(2), Wait::Try).await;
    assert!(
        matches!(other, Err(LockError::ModeConflict { .. })),
        "{other:?}"
    );
    guards.pop();
    let reused = lockers[1]
        .lock(&name, p(3), LONG)
        .await
        .expect("slot reused");
    drop(reused);
    drop(guards);
    assert_no_keys_left(&etcd).await;
}

#[tokio::test]
async fn memory_permits_and_modes_match_etcd_semantics() {
    let m = MemoryLocker::new();
    let name = LockName::new("sem").unwrap();
    let a = m.lock(&name, p(2), Wait::Try).await.unwrap();
    let b = m.lock(&name, p(2), Wait::Try).await.unwrap();
    assert!(matches!(
        m.lock(&name, p(2), Wait::Try).await,
        Err(LockError::Locked { .. })
    ));
    assert!(matches!(
        m.lock(&name, p(3), Wait::Try).await,
        Err(LockError::ModeConflict { .. })
    ));
    assert!(b.token() > a.token());
    drop(a);
    let c = m.lock(&name, p(2), Wait::Try).await.unwrap();
    drop((b, c));
    assert_eq!(m.active_names(), 0);
}

// ---- the layer ----

fn get_req(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

fn post_req(uri: &str) -> Request<Body> {
    Request::post(uri).body(Body::empty()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_aware_layer_lets_gets_share_and_posts_exclude() {
    let etcd = etcd().await;
    let locker = locker(&etcd, 5).await;
    let barrier = Arc::new(Barrier::new(2));
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let posts_done = Arc::new(AtomicUsize::new(0));
    let app = {
        let barrier = Arc::clone(&barrier);
        let posts_done = Arc::clone(&posts_done);
        Router::new()
            .route(
                "/tenants/{tenant}",
                get(move |lock: HeldLock| {
                    let (barrier, mut release) = (Arc::clone(&barrier), release_rx.clone());
                    async move {
                        assert_eq!(lock.mode(), LockMode::Shared);
                        // Both GETs are inside at once, or this never returns.
                        barrier.wait().await;
                        let _ = release.wait_for(|r| *r).await;
                        "read"
                    }
                })
                .post(move |lock: HeldLock| {
                    let posts_done = Arc::clone(&posts_done);
                    async move {
                        assert_eq!(lock.mode(), LockMode::Exclusive);
                        posts_done.fetch_add(1, Ordering::SeqCst);
                        "written"
                    }
                }),
            )
            .route_layer(
                LockLayer::new(locker.clone(), Key::path_param("tenant").unwrap())
                    .mode_by_method()
                    .wait(Duration::from_secs(10)),
            )
    };
    let g1 = tokio::spawn(app.clone().oneshot(get_req("/tenants/acme")));
    let g2 = tokio::spawn(app.clone().oneshot(get_req("/tenants/acme")));
    let prefix = locker.key_prefix(&LockName::new("acme").unwrap());
    eventually("two readers hold acme", Duration::from_secs(5), || async {
        keys_under(&etcd, &prefix).await.len() == 2
    })
    .await;
    // A POST queues behind the readers...
    let post = tokio::spawn(app.clone().oneshot(post_req("/tenants/acme")));
    eventually("the writer queues", Duration::from_secs(5), || async {
        keys_under(&etcd, &prefix).await.len() == 3
    })
    .await;
    assert_eq!(
        posts_done.load(Ordering::SeqCst),
        0,
        "POST ran while GETs held the lock"
    );
    // ...and runs once they finish.
    release_tx.send(true).unwrap();
    for g in [g1, g2] {
        let resp = g.await.unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let _ = axum::body::to_bytes(resp.into_body(), 1024).await;
    }
    let resp = post.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    drop(resp);
    assert_eq!(posts_done.load(Ordering::SeqCst), 1);
    assert_no_keys_left(&etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permits_layer_refuses_the_n_plus_first_request() {
    let etcd = etcd().await;
    let locker = locker(&etcd, 5).await;
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let app = Router::new()
        .route(
            "/jobs/{tenant}",
            post(move |lock: HeldLock| {
                let mut release = release_rx.clone();
                async move {
                    assert_eq!(lock.mode(), LockMode::permits(2).unwrap());
                    let _ = release.wait_for(|r| *r).await;
                    "done"
                }
            }),
        )
        .route_layer(
            LockLayer::new(locker.clone(), Key::path_param("tenant").unwrap())
                .permits(2)
                .unwrap(),
        );
    let a = tokio::spawn(app.clone().oneshot(post_req("/jobs/acme")));
    let b = tokio::spawn(app.clone().oneshot(post_req("/jobs/acme")));
    let prefix = locker.key_prefix(&LockName::new("acme").unwrap());
    eventually("two permits held", Duration::from_secs(5), || async {
        keys_under(&etcd, &prefix).await.len() == 2
    })
    .await;
    let third = app.clone().oneshot(post_req("/jobs/acme")).await.unwrap();
    assert_eq!(third.status(), StatusCode::LOCKED);
    assert!(third.headers().contains_key("retry-after"));
    release_tx.send(true).unwrap();
    for r in [a, b] {
        assert_eq!(r.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    // Dropping the responses released the permits (in the background).
    eventually("permits released", Duration::from_secs(2), || async {
        keys_under(&etcd, &prefix).await.is_empty()
    })
    .await;
    let again = app.oneshot(post_req("/jobs/acme")).await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    drop(again);
    assert!(LockLayer::new(locker, Key::path()).permits(0).is_err());
    assert_no_keys_left(&etcd).await;
}
