//! `cargo bench --all-features --bench azure` (or `scripts/bench azure`): the
//! Azure blob lease backend against an Azurite this binary starts itself,
//! each figure next to a baseline measured in the same run:
//!
//! 1. an uncontended acquire + release cycle vs the raw lease calls it is
//!    made of (acquire with a proposed id, sequence number increment,
//!    release);
//! 2. a failed try: requests sent (counted by a pipeline policy) and latency;
//! 3. handoff latency under contention (C = 2, 4, 8 lockers on one name, each
//!    holding 50 ms) vs DistributedLock.Azure's blind busy wait (a random
//!    sleep in [250 ms, 1 s] between acquire attempts);
//! 4. requests per second sent by one waiting process with 8 waiters on a
//!    busy name vs 8 seed-style waiters.
//!
//! Prints a table and writes `target/bench/azure.json`. `BENCH_SECS` sets
//! the length of the timed phases (default 3).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{ClientOptions, Context, Request, RetryOptions};
use azure_storage_blob::models::{
    BlobClientAcquireLeaseOptions, PageBlobClientSetSequenceNumberOptions, SequenceNumberActionType,
};
use azure_storage_blob::{BlobContainerClient, BlobContainerClientOptions};
use serde_json::{json, Value};
use tower_lease_lock::azure::AzureBlobLocker;
use tower_lease_lock::testing::Azurite;
use tower_lease_lock::{LockError, LockName, Locker};

/// Counts the HTTP requests a client sends (every try).
#[derive(Debug, Default)]
struct CountRequests(AtomicU64);

#[async_trait::async_trait]
impl Policy for CountRequests {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        self.0.fetch_add(1, Ordering::Relaxed);
        next[0].send(ctx, request, &next[1..]).await
    }
}

impl CountRequests {
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

fn client(azurite: &Azurite, counter: &Arc<CountRequests>) -> BlobContainerClient {
    let url = azurite.container_url("locks").expect("url");
    let options = BlobContainerClientOptions {
        client_options: ClientOptions {
            retry: RetryOptions::none(),
            per_try_policies: vec![counter.clone() as Arc<dyn Policy>],
            ..Default::default()
        },
        ..Default::default()
    };
    BlobContainerClient::new(url, None, Some(options)).expect("client")
}

fn locker(container: BlobContainerClient) -> AzureBlobLocker {
    AzureBlobLocker::builder(container)
        .lease_duration(Duration::from_secs(15))
        .build()
        .expect("locker")
}

fn name(s: &str) -> LockName {
    LockName::new(s).expect("name")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

fn stats(mut samples: Vec<Duration>) -> Value {
    samples.sort_unstable();
    let mean = samples.iter().sum::<Duration>() / samples.len().max(1) as u32;
    json!({
        "n": samples.len(),
        "mean_ms": ms(mean),
        "p50_ms": ms(percentile(&samples, 0.5)),
        "p90_ms": ms(percentile(&samples, 0.9)),
    })
}

/// 1. Uncontended cycles, ours and raw, in alternating rounds.
async fn uncontended(azurite: &Azurite, secs: f64) -> Value {
    let counter = Arc::new(CountRequests::default());
    let ours = locker(client(azurite, &counter));
    let raw = client(azurite, &Arc::new(CountRequests::default()));
    let lock = name("uncontended");
    ours.try_acquire(&lock)
        .await
        .expect("creates the blob")
        .release()
        .await
        .expect("release");
    let raw_blob = raw.blob_client("uncontended");
    let (mut ours_t, mut raw_t) = (Vec::new(), Vec::new());
    let (before, started) = (counter.get(), Instant::now());
    let mut ours_cycles = 0u64;
    while started.elapsed().as_secs_f64() < secs {
        for _ in 0..20 {
            let t = Instant::now();
            let guard = ours.try_acquire(&lock).await.expect("acquire");
            guard.release().await.expect("release");
            ours_t.push(t.elapsed());
            ours_cycles += 1;
        }
        for _ in 0..20 {
            let t = Instant::now();
            let id = azure_core::Uuid::new_v4().to_string();
            let options = BlobClientAcquireLeaseOptions {
                proposed_lease_id: Some(id.clone()),
                ..Default::default()
            };
            raw_blob
                .acquire_lease(15, Some(options))
                .await
                .expect("raw acquire");
            let options = PageBlobClientSetSequenceNumberOptions {
                lease_id: Some(id.clone()),
                ..Default::default()
            };
            raw_blob
                .page_blob_client()
                .set_sequence_number(SequenceNumberActionType::Increment, Some(options))
                .await
                .expect("raw increment");
            raw_blob.release_lease(id, None).await.expect("raw release");
            raw_t.push(t.elapsed());
        }
    }
    let per_cycle = (counter.get() - before) as f64 / ours_cycles as f64;
    let mean = |v: &[Duration]| v.iter().sum::<Duration>().as_secs_f64() / v.len() as f64;
    let ratio = mean(&raw_t) / mean(&ours_t);
    json!({
        "ours": stats(ours_t),
        "raw_calls": stats(raw_t),
        "requests_per_cycle": per_cycle,
        "throughput_vs_raw": (ratio * 100.0).round() / 100.0,
    })
}

/// 2. Failed tries on a held name.
async fn failed_try(azurite: &Azurite) -> Value {
    let holder = locker(client(azurite, &Arc::new(CountRequests::default())));
    let counter = Arc::new(CountRequests::default());
    let other = locker(client(azurite, &counter));
    let lock = name("held");
    let _held = holder.try_acquire(&lock).await.expect("hold");
    let before = counter.get();
    let mut times = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        match other.try_acquire(&lock).await {
            Err(LockError::Locked { .. }) => times.push(t.elapsed()),
            other => panic!("expected Locked, got {other:?}"),
        }
    }
    json!({
        "requests_per_try": (counter.get() - before) as f64 / 200.0,
        "latency": stats(times),
    })
}

/// A tiny xorshift for the seed's random sleep.
struct Rng(u64);
impl Rng {
    fn between(&mut self, min: Duration, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let span = (max - min).as_nanos() as u64;
        min + Duration::from_nanos(self.0 % (span + 1))
    }
}

const HOLD: Duration = Duration::from_millis(50);

/// Handoffs: C contenders hand one name around. Each holds it 50 ms,
/// releases it, and tries again only once another contender took it (so
/// every grant is a handoff between two processes). The gap between a
/// release and the next grant is the handoff latency. `seed`:
/// DistributedLock.Azure's loop (try; on 409 sleep a random 250 ms-1 s).
async fn handoff(azurite: &Azurite, contenders: usize, secs: f64, seed: bool) -> Value {
    let lock_name = format!(
        "handoff-{contenders}-{}",
        if seed { "seed" } else { "ours" }
    );
    let released_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let gaps = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
    let last = Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
    let changed = Arc::new(tokio::sync::Notify::new());
    let counter = Arc::new(CountRequests::default());
    // The blob exists before the seed's loop (it would create it on a 404).
    let setup = locker(client(azurite, &Arc::new(CountRequests::default())));
    setup
        .try_acquire(&name(&lock_name))
        .await
        .expect("create the blob")
        .release()
        .await
        .expect("release");
    let started = Instant::now();
    let stop = started + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for me in 0..contenders {
        let locker = locker(client(azurite, &counter));
        let blob = locker.blob_name(&name(&lock_name)).expect("blob name");
        let raw = client(azurite, &counter).blob_client(&blob);
        let (released_at, gaps, lock_name) = (released_at.clone(), gaps.clone(), lock_name.clone());
        let (last, changed) = (last.clone(), changed.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((me as u64 + 1) * 0x1234_5678_9ABC));
            while Instant::now() < stop {
                // Our turn is over until someone else has had one.
                while last.load(Ordering::SeqCst) == me {
                    let notified = changed.notified();
                    if last.load(Ordering::SeqCst) != me {
                        break;
                    }
                    if tokio::time::timeout_at(stop.into(), notified)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let on_grant = || {
                    let now = Instant::now();
                    if let Some(at) = released_at.lock().unwrap().take() {
                        if now < stop {
                            gaps.lock().unwrap().push(now - at);
                        }
                    }
                    last.store(me, Ordering::SeqCst);
                    changed.notify_waiters();
                };
                if seed {
                    let id = azure_core::Uuid::new_v4().to_string();
                    let mut granted = false;
                    while Instant::now() < stop + Duration::from_secs(2) {
                        let options = BlobClientAcquireLeaseOptions {
                            proposed_lease_id: Some(id.clone()),
                            ..Default::default()
                        };
                        if raw.acquire_lease(15, Some(options)).await.is_ok() {
                            granted = true;
                            break;
                        }
                        let pause = rng.between(Duration::from_millis(250), Duration::from_secs(1));
                        tokio::time::sleep(pause).await;
                    }
                    if !granted {
                        return;
                    }
                    on_grant();
                    tokio::time::sleep(HOLD).await;
                    *released_at.lock().unwrap() = Some(Instant::now());
                    raw.release_lease(id, None).await.expect("raw release");
                } else {
                    let wait =
                        (stop + Duration::from_secs(2)).saturating_duration_since(Instant::now());
                    let Ok(guard) = locker.acquire(&name(&lock_name), wait).await else {
                        return;
                    };
                    on_grant();
                    tokio::time::sleep(HOLD).await;
                    *released_at.lock().unwrap() = Some(Instant::now());
                    guard.release().await.expect("release");
                }
            }
        }));
    }
    // Whoever waits at the end gives up within 2 s of the stop.
    for task in tasks {
        task.await.expect("contender");
    }
    let gaps = std::mem::take(&mut *gaps.lock().unwrap());
    let handoffs = gaps.len();
    json!({
        "handoffs_per_sec": (handoffs as f64 / secs * 100.0).round() / 100.0,
        "handoff": stats(gaps),
        "requests_per_sec": ((counter.get() as f64 / started.elapsed().as_secs_f64()) * 10.0).round() / 10.0,
    })
}

/// Requests per second from one process with 8 waiters on a busy name:
/// ours (one poller) vs 8 seed-style loops.
async fn waiting_requests(azurite: &Azurite, secs: f64) -> Value {
    let holder = locker(client(azurite, &Arc::new(CountRequests::default())));
    let lock = name("busy");
    let _held = holder.try_acquire(&lock).await.expect("hold");

    let counter = Arc::new(CountRequests::default());
    let ours = locker(client(azurite, &counter));
    let mut waiters = Vec::new();
    for _ in 0..8 {
        let (ours, lock) = (ours.clone(), lock.clone());
        waiters.push(tokio::spawn(async move {
            ours.acquire(&lock, Duration::from_secs_f64(secs)).await
        }));
    }
    for waiter in waiters {
        let _ = waiter.await;
    }
    let ours_rate = counter.get() as f64 / secs;

    let seed_counter = Arc::new(CountRequests::default());
    let blob_name = holder.blob_name(&lock).expect("blob");
    let stop = Instant::now() + Duration::from_secs_f64(secs);
    let mut loops = Vec::new();
    for i in 0..8u64 {
        let blob = client(azurite, &seed_counter).blob_client(&blob_name);
        loops.push(tokio::spawn(async move {
            let mut rng = Rng(0xDEAD_BEEF ^ ((i + 1) * 0x9E37_79B9));
            while Instant::now() < stop {
                let options = BlobClientAcquireLeaseOptions {
                    proposed_lease_id: Some(azure_core::Uuid::new_v4().to_string()),
                    ..Default::default()
                };
                if blob.acquire_lease(15, Some(options)).await.is_ok() {
                    panic!("the name is held");
                }
                tokio::time::sleep(rng.between(Duration::from_millis(250), Duration::from_secs(1)))
                    .await;
            }
        }));
    }
    for l in loops {
        l.await.expect("seed loop");
    }
    let seed_rate = seed_counter.get() as f64 / secs;
    json!({
        "ours_requests_per_sec": (ours_rate * 10.0).round() / 10.0,
        "seed_requests_per_sec": (seed_rate * 10.0).round() / 10.0,
        "ours_vs_seed": (ours_rate / seed_rate * 100.0).round() / 100.0,
    })
}

#[tokio::main]
async fn main() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let azurite = Azurite::start().await.expect("start azurite");
    azurite.container("locks").await.expect("container");

    let mut report = serde_json::Map::new();
    report.insert("1_uncontended".into(), uncontended(&azurite, secs).await);
    report.insert("2_failed_try".into(), failed_try(&azurite).await);
    let mut handoffs = serde_json::Map::new();
    for c in [2usize, 4, 8] {
        let ours = handoff(&azurite, c, secs * 3.0, false).await;
        let seed = handoff(&azurite, c, secs * 3.0, true).await;
        let ratio = seed["handoff"]["mean_ms"].as_f64().unwrap_or(0.0)
            / ours["handoff"]["mean_ms"].as_f64().unwrap_or(f64::INFINITY);
        handoffs.insert(
            format!("c{c}"),
            json!({ "ours": ours, "seed": seed, "seed_mean_over_ours": (ratio * 100.0).round() / 100.0 }),
        );
    }
    report.insert("3_handoff".into(), Value::Object(handoffs));
    report.insert(
        "4_waiting_requests".into(),
        waiting_requests(&azurite, secs * 2.0).await,
    );
    let report = Value::Object(report);
    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(
        dir.join("azure.json"),
        serde_json::to_string_pretty(&report).expect("json"),
    );
}
