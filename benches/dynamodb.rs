//! `cargo bench --features dynamodb,test-util --bench dynamodb` (or
//! `scripts/bench-dynamodb`): the DynamoDB backend against a dynalite this
//! binary starts itself, every figure next to a baseline measured in the
//! same run. Prints a table and writes `target/bench/dynamodb.json`.
//!
//! 1. Uncontended acquire + release vs the raw UpdateItem pair it is made of.
//! 2. A failed try: HTTP requests sent (counted by an SDK interceptor).
//! 3. Handoff latency under contention (C = 2, 4, 8 lockers on one name,
//!    each taking it once per round after a pause of 0-250 ms and holding it
//!    50-550 ms; a handoff is a release while another was trying) vs DynamoLock's way of waiting: its
//!    `AcquireLock` is one conditional PutItem, which callers repeat at a
//!    fixed interval (here 1 s and 250 ms). Also the requests sent per
//!    acquisition.
//! 4. Requests per second while waiting on a busy name: one locker with 8
//!    waiters, 8 lockers with one waiter each, 8 fixed-interval pollers.
//!
//! dynalite is a single Node.js process on this machine: absolute latencies
//! are dynalite's, not DynamoDB's; ratios and request counts carry over.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::BoxError;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use serde_json::{json, Value};
use tokio::sync::Barrier;
use tower_lease_lock::dynamodb::DynamoDbLocker;
use tower_lease_lock::testing::Dynalite;
use tower_lease_lock::{LockError, LockName, Locker};

const TABLE: &str = "locks";
/// The table of the DynamoLock-style baseline (key `id`, as DynamoLock's).
const SEED_TABLE: &str = "seed_locks";

/// Counts the HTTP requests a client sends (every attempt).
#[derive(Debug, Clone, Default)]
struct Requests(Arc<AtomicU64>);

impl Requests {
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Intercept for Requests {
    fn name(&self) -> &'static str {
        "bench-request-counter"
    }

    fn read_before_transmit(
        &self,
        _: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn client(dynalite: &Dynalite, requests: &Requests) -> Client {
    Client::from_conf(dynalite.config().interceptor(requests.clone()).build())
}

fn locker(dynalite: &Dynalite, requests: &Requests) -> DynamoDbLocker {
    DynamoDbLocker::builder(client(dynalite, requests), TABLE)
        .build()
        .expect("locker")
}

fn name(s: &str) -> LockName {
    LockName::new(s).expect("name")
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    n: usize,
    median: Duration,
    p90: Duration,
    mean: Duration,
}

impl Stats {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let n = samples.len().max(1);
        let at = |q: f64| {
            samples
                .get(((n - 1) as f64 * q) as usize)
                .copied()
                .unwrap_or_default()
        };
        Self {
            n: samples.len(),
            median: at(0.5),
            p90: at(0.9),
            mean: samples.iter().sum::<Duration>() / n as u32,
        }
    }

    fn json(&self) -> Value {
        json!({ "n": self.n, "median_ms": ms(self.median), "p90_ms": ms(self.p90), "mean_ms": ms(self.mean) })
    }

    fn show(&self) -> String {
        format!(
            "median {:.2} ms, p90 {:.2} ms (n={})",
            ms(self.median),
            ms(self.p90),
            self.n
        )
    }
}

struct Report {
    rows: Vec<(String, String)>,
    json: BTreeMap<String, Value>,
}

impl Report {
    fn row(&mut self, what: impl Into<String>, figure: impl Into<String>) {
        let (what, figure) = (what.into(), figure.into());
        println!("{what:<56} {figure}");
        self.rows.push((what, figure));
    }
}

// ---------------------------------------------------------------------------
// Raw requests: what the backend's cycle is made of, and DynamoLock's loop
// ---------------------------------------------------------------------------

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

/// The take's UpdateItem, by hand.
async fn raw_take(client: &Client, key: &str, rvn: &str) -> bool {
    client
        .update_item()
        .table_name(TABLE)
        .key("lock", s(key))
        .update_expression("SET #o = :o, #r = :r, #l = :l, #rel = :f ADD #t :one")
        .condition_expression("attribute_not_exists(#k) OR #rel = :t_ OR #r = :r")
        .expression_attribute_names("#k", "lock")
        .expression_attribute_names("#o", "owner")
        .expression_attribute_names("#r", "rvn")
        .expression_attribute_names("#l", "lease_ms")
        .expression_attribute_names("#rel", "released")
        .expression_attribute_names("#t", "token")
        .expression_attribute_values(":o", s("raw"))
        .expression_attribute_values(":r", s(rvn))
        .expression_attribute_values(":l", AttributeValue::N("20000".into()))
        .expression_attribute_values(":f", AttributeValue::Bool(false))
        .expression_attribute_values(":t_", AttributeValue::Bool(true))
        .expression_attribute_values(":one", AttributeValue::N("1".into()))
        .return_values(aws_sdk_dynamodb::types::ReturnValue::UpdatedNew)
        .send()
        .await
        .is_ok()
}

/// The release's UpdateItem, by hand.
async fn raw_release(client: &Client, key: &str, rvn: &str) {
    client
        .update_item()
        .table_name(TABLE)
        .key("lock", s(key))
        .update_expression("SET #rel = :t_ REMOVE #o")
        .condition_expression("#r = :r")
        .expression_attribute_names("#o", "owner")
        .expression_attribute_names("#r", "rvn")
        .expression_attribute_names("#rel", "released")
        .expression_attribute_values(":r", s(rvn))
        .expression_attribute_values(":t_", AttributeValue::Bool(true))
        .send()
        .await
        .expect("raw release");
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// DynamoLock's AcquireLock: one conditional PutItem with an absolute expiry.
async fn seed_try(client: &Client, id: &str, owner: &str) -> bool {
    let now = unix_secs();
    client
        .put_item()
        .table_name(SEED_TABLE)
        .item("id", s(id))
        .item("lock_owner", s(owner))
        .item("expires", AttributeValue::N((now + 30).to_string()))
        .item("purge_time", AttributeValue::N((now + 3600).to_string()))
        .condition_expression("attribute_not_exists(id) OR expires < :now")
        .expression_attribute_values(":now", AttributeValue::N((now + 1).to_string()))
        .send()
        .await
        .is_ok()
}

/// DynamoLock's ReleaseLock: a conditional delete.
async fn seed_release(client: &Client, id: &str, owner: &str) {
    let _ = client
        .delete_item()
        .table_name(SEED_TABLE)
        .key("id", s(id))
        .condition_expression("lock_owner = :o")
        .expression_attribute_values(":o", s(owner))
        .send()
        .await;
}

/// Waits for the seed lock, retrying at a fixed interval.
async fn seed_acquire(client: &Client, id: &str, owner: &str, interval: Duration) {
    while !seed_try(client, id, owner).await {
        tokio::time::sleep(interval).await;
    }
}

async fn create_seed_table(client: &Client) {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    };
    client
        .create_table()
        .table_name(SEED_TABLE)
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
        .expect("create seed table");
}

// ---------------------------------------------------------------------------
// 1. Uncontended cycle
// ---------------------------------------------------------------------------

async fn uncontended(dynalite: &Dynalite, report: &mut Report) {
    let requests = Requests::default();
    let ours = locker(dynalite, &requests);
    let raw = client(dynalite, &Requests::default());
    let lock = name("uncontended");
    let key = lock.encoded();
    // Warm both paths (connections, JIT in dynalite).
    for _ in 0..30 {
        ours.try_acquire(&lock)
            .await
            .expect("warm")
            .release()
            .await
            .expect("release");
        let rvn = uuid_like();
        assert!(raw_take(&raw, "raw-warm", &rvn).await);
        raw_release(&raw, "raw-warm", &rvn).await;
    }
    let (mut ours_t, mut raw_t) = (Vec::new(), Vec::new());
    let before = requests.get();
    // Alternating phases: drift in dynalite's speed hits both alike.
    for _ in 0..6 {
        for _ in 0..50 {
            let t = Instant::now();
            let guard = ours.try_acquire(&lock).await.expect("acquire");
            guard.release().await.expect("release");
            ours_t.push(t.elapsed());
        }
        for _ in 0..50 {
            let rvn = uuid_like();
            let t = Instant::now();
            assert!(raw_take(&raw, &key, &rvn).await, "raw take");
            raw_release(&raw, &key, &rvn).await;
            raw_t.push(t.elapsed());
        }
    }
    let per_cycle = (requests.get() - before) as f64 / ours_t.len() as f64;
    let (o, r) = (Stats::of(ours_t), Stats::of(raw_t));
    let ratio = o.median.as_secs_f64() / r.median.as_secs_f64();
    report.row("1. uncontended acquire+release (ours)", o.show());
    report.row("   raw UpdateItem take + UpdateItem release", r.show());
    report.row(
        "   ratio ours / raw (median); requests per cycle",
        format!("{ratio:.2}x; {per_cycle:.2}"),
    );
    report.json.insert(
        "1_uncontended".into(),
        json!({ "ours": o.json(), "raw_pair": r.json(), "ratio_median": ratio, "requests_per_cycle": per_cycle }),
    );
}

fn uuid_like() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("raw:{}", N.fetch_add(1, Ordering::Relaxed))
}

// ---------------------------------------------------------------------------
// 2. A failed try
// ---------------------------------------------------------------------------

async fn failed_try(dynalite: &Dynalite, report: &mut Report) {
    let holder = locker(dynalite, &Requests::default());
    let requests = Requests::default();
    let trier = locker(dynalite, &requests);
    let lock = name("failed-try");
    let held = holder.try_acquire(&lock).await.expect("hold");
    let (before, takes_before) = (requests.get(), trier.diagnostics().take_requests);
    let mut times = Vec::new();
    const TRIES: usize = 200;
    for _ in 0..TRIES {
        let t = Instant::now();
        match trier.try_acquire(&lock).await {
            Err(LockError::Locked { .. }) => times.push(t.elapsed()),
            other => panic!("expected Locked, got {other:?}"),
        }
    }
    let per_try = (requests.get() - before) as f64 / TRIES as f64;
    let takes = (trier.diagnostics().take_requests - takes_before) as f64 / TRIES as f64;
    let stats = Stats::of(times);
    report.row("2. failed try (other locker holds)", stats.show());
    report.row(
        "   HTTP requests per failed try (interceptor; diagnostics)",
        format!("{per_try:.2}; {takes:.2}"),
    );
    report.json.insert(
        "2_failed_try".into(),
        json!({ "latency": stats.json(), "http_requests_per_try": per_try, "take_requests_per_try": takes, "target": 1.0, "met": per_try == 1.0 }),
    );
    held.release().await.expect("release");
}

// ---------------------------------------------------------------------------
// 3. Handoff under contention
// ---------------------------------------------------------------------------

/// Rounds per contention level: C=2 gives one handoff a round, C=8 seven.
const ROUNDS: usize = 10;

/// One hold: when its worker started trying, got the lock, let it go.
#[derive(Debug, Clone, Copy)]
struct Span {
    trying: Instant,
    acquired: Instant,
    released: Instant,
}

/// A number in [0, n) from a worker's round (the same in every run).
fn spread(seed: u64, n: u64) -> u64 {
    let mut x = (seed + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 32;
    x % n
}

/// A pause in [0, 250 ms) before a worker starts trying in a round, and a
/// hold in [50, 550 ms): releases fall anywhere in fixed-interval pollers'
/// intervals, as between real processes, not in step with them.
fn timing(c: usize, worker: usize, round: usize) -> (Duration, Duration) {
    let seed = (c * 1000 + worker * 10 + round) as u64;
    (
        Duration::from_millis(spread(seed, 250)),
        Duration::from_millis(50 + spread(seed + 7_777_777, 500)),
    )
}

/// One worker's holds: each round it waits for the others, pauses, takes
/// the lock with `acquire`, holds it and gives it back with `release`.
async fn rounds<H, A, R>(
    c: usize,
    worker: usize,
    barrier: &Barrier,
    acquire: impl Fn() -> A,
    release: impl Fn(H) -> R,
) -> Vec<Span>
where
    A: std::future::Future<Output = H>,
    R: std::future::Future<Output = ()>,
{
    let mut spans = Vec::new();
    for round in 0..ROUNDS {
        barrier.wait().await;
        let (start, hold) = timing(c, worker, round);
        tokio::time::sleep(start).await;
        let trying = Instant::now();
        let held = acquire().await;
        let acquired = Instant::now();
        tokio::time::sleep(hold).await;
        let released = Instant::now();
        release(held).await;
        spans.push(Span {
            trying,
            acquired,
            released,
        });
    }
    spans
}

/// Gaps between one holder's release and the next holder's acquisition,
/// C workers each taking the lock once per round; and the requests sent per
/// acquisition (polls, takes and releases alike).
async fn handoffs<F, Fut>(c: usize, requests: &Requests, worker: F) -> (Stats, f64)
where
    F: Fn(usize, Arc<Barrier>) -> Fut,
    Fut: std::future::Future<Output = Vec<Span>> + Send + 'static,
{
    let barrier = Arc::new(Barrier::new(c));
    let before = requests.get();
    let tasks: Vec<_> = (0..c)
        .map(|i| tokio::spawn(worker(i, Arc::clone(&barrier))))
        .collect();
    let mut holds: Vec<(usize, Span)> = Vec::new();
    for task in tasks {
        let spans = task.await.expect("worker");
        holds.extend(spans.into_iter().enumerate());
    }
    let per_acquisition = (requests.get() - before) as f64 / holds.len() as f64;
    let mut gaps = Vec::new();
    for round in 0..ROUNDS {
        let mut this: Vec<&Span> = holds
            .iter()
            .filter(|h| h.0 == round)
            .map(|h| &h.1)
            .collect();
        this.sort_by_key(|h| h.acquired);
        for pair in this.windows(2) {
            let (before, next) = (pair[0], pair[1]);
            assert!(next.acquired >= before.released, "overlapping holds");
            // A handoff: the next holder was already trying at the release.
            if next.trying < before.released {
                gaps.push(next.acquired - before.released);
            }
        }
    }
    (Stats::of(gaps), per_acquisition)
}

async fn contention(dynalite: &Dynalite, report: &mut Report) {
    let mut out = serde_json::Map::new();
    for c in [2usize, 4, 8] {
        let lock = name(&format!("contended-{c}"));
        let requests = Requests::default();
        let lockers: Vec<_> = (0..c).map(|_| locker(dynalite, &requests)).collect();
        let (ours, ours_per_acq) = handoffs(c, &requests, |i, barrier| {
            let (locker, lock) = (lockers[i].clone(), lock.clone());
            async move {
                let (locker, lock) = (&locker, &lock);
                rounds(
                    c,
                    i,
                    &barrier,
                    move || async move {
                        locker
                            .acquire(lock, Duration::from_secs(60))
                            .await
                            .expect("acquire")
                    },
                    |guard| async move { guard.release().await.expect("release") },
                )
                .await
            }
        })
        .await;
        report.row(
            format!("3. handoff C={c}: ours (busy wait 250 ms-1 s)"),
            format!("{} {ours_per_acq:.1} req/acq", ours.show()),
        );
        let mut entry =
            json!({ "ours": { "gap": ours.json(), "requests_per_acquisition": ours_per_acq } });
        for interval in [Duration::from_secs(1), Duration::from_millis(250)] {
            let requests = Requests::default();
            let clients: Vec<_> = (0..c).map(|_| client(dynalite, &requests)).collect();
            let id = format!("contended-{c}-{}", interval.as_millis());
            let (seed, seed_per_acq) = handoffs(c, &requests, |i, barrier| {
                let (client, id) = (clients[i].clone(), id.clone());
                async move {
                    let owner = format!("worker-{i}");
                    let (client, id, owner) = (&client, &id, &owner);
                    rounds(
                        c,
                        i,
                        &barrier,
                        move || seed_acquire(client, id, owner, interval),
                        move |()| seed_release(client, id, owner),
                    )
                    .await
                }
            })
            .await;
            let label = format!(
                "   DynamoLock-style fixed retry {} ms",
                interval.as_millis()
            );
            report.row(label, format!("{} {seed_per_acq:.1} req/acq", seed.show()));
            entry[format!("fixed_retry_{}ms", interval.as_millis())] =
                json!({ "gap": seed.json(), "requests_per_acquisition": seed_per_acq });
        }
        out.insert(format!("c{c}"), entry);
    }
    report.json.insert("3_handoff".into(), Value::Object(out));
}

// ---------------------------------------------------------------------------
// 4. Requests per second while waiting
// ---------------------------------------------------------------------------

const WAIT_WINDOW: Duration = Duration::from_secs(4);

async fn waiting_cost(dynalite: &Dynalite, report: &mut Report) {
    let holder = locker(dynalite, &Requests::default());
    let lock = name("waited-on");
    let held = holder.try_acquire(&lock).await.expect("hold");
    let mut out = serde_json::Map::new();

    // One locker (one process), 8 waiters.
    let requests = Requests::default();
    let one = locker(dynalite, &requests);
    let waiters: Vec<_> = (0..8)
        .map(|_| {
            let (one, lock) = (one.clone(), lock.clone());
            tokio::spawn(async move { one.acquire(&lock, WAIT_WINDOW).await })
        })
        .collect();
    let before = requests.get();
    let started = Instant::now();
    for waiter in waiters {
        assert!(matches!(
            waiter.await.expect("task"),
            Err(LockError::Timeout { .. })
        ));
    }
    let rate = (requests.get() - before) as f64 / started.elapsed().as_secs_f64();
    report.row(
        "4. waiting, one locker with 8 waiters",
        format!("{rate:.2} req/s (per process)"),
    );
    out.insert("one_locker_8_waiters_req_per_sec".into(), json!(rate));

    // Eight lockers (eight processes), one waiter each.
    let requests = Requests::default();
    let eight: Vec<_> = (0..8).map(|_| locker(dynalite, &requests)).collect();
    let before = requests.get();
    let started = Instant::now();
    let waiters: Vec<_> = eight
        .iter()
        .map(|l| {
            let (l, lock) = (l.clone(), lock.clone());
            tokio::spawn(async move { l.acquire(&lock, WAIT_WINDOW).await })
        })
        .collect();
    for waiter in waiters {
        assert!(matches!(
            waiter.await.expect("task"),
            Err(LockError::Timeout { .. })
        ));
    }
    let rate = (requests.get() - before) as f64 / started.elapsed().as_secs_f64();
    report.row(
        "   8 lockers, one waiter each",
        format!("{:.2} req/s per process ({rate:.2} total)", rate / 8.0),
    );
    out.insert(
        "eight_lockers_req_per_sec_per_process".into(),
        json!(rate / 8.0),
    );

    // Eight DynamoLock-style pollers at a fixed 1 s.
    let requests = Requests::default();
    let seed_holder = client(dynalite, &Requests::default());
    assert!(seed_try(&seed_holder, "waited-on", "holder").await);
    let before = requests.get();
    let started = Instant::now();
    let pollers: Vec<_> = (0..8)
        .map(|i| {
            let client = client(dynalite, &requests);
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    WAIT_WINDOW,
                    seed_acquire(
                        &client,
                        "waited-on",
                        &format!("poller-{i}"),
                        Duration::from_secs(1),
                    ),
                )
                .await;
            })
        })
        .collect();
    for poller in pollers {
        poller.await.expect("poller");
    }
    let rate = (requests.get() - before) as f64 / started.elapsed().as_secs_f64();
    report.row(
        "   8 DynamoLock-style pollers (fixed 1 s)",
        format!("{:.2} req/s per process ({rate:.2} total)", rate / 8.0),
    );
    out.insert(
        "eight_fixed_1s_pollers_req_per_sec_per_process".into(),
        json!(rate / 8.0),
    );
    seed_release(&seed_holder, "waited-on", "holder").await;
    held.release().await.expect("release");
    report
        .json
        .insert("4_waiting_cost".into(), Value::Object(out));
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dynalite = Dynalite::start().await?;
    let setup = locker(&dynalite, &Requests::default());
    setup.ensure_table().await?;
    create_seed_table(&dynalite.client()).await;
    let mut report = Report {
        rows: Vec::new(),
        json: BTreeMap::new(),
    };
    println!("{:<56} figure", "item");
    uncontended(&dynalite, &mut report).await;
    failed_try(&dynalite, &mut report).await;
    contention(&dynalite, &mut report).await;
    waiting_cost(&dynalite, &mut report).await;

    report.json.insert(
        "rows".into(),
        Value::Array(
            report
                .rows
                .iter()
                .map(|(what, figure)| json!({ "item": what, "figure": figure }))
                .collect(),
        ),
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("dynamodb.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report.json)?)?;
    println!("\nwrote {}", path.display());
    Ok(())
}
