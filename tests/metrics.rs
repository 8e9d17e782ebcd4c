//! The metrics (feature `metrics`) move as they should under try, wait,
//! contention and an outage, read through a real recorder installed for
//! this test binary.
#![cfg(feature = "metrics")]

mod common;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use common::*;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tower_lease_lock::metrics::names::*;
use tower_lease_lock::testing::TcpProxy;
use tower_lease_lock::{LockError, LockName, Locker, MemoryLocker};

/// The recorder of this test binary, and what was read from it so far: a
/// snapshot hands out what changed since the last one (counters and gauges
/// are reset to zero, histograms drained), so the totals are kept here.
struct Recorded {
    snapshotter: Snapshotter,
    totals: Mutex<HashMap<String, f64>>,
    histograms: Mutex<HashMap<String, Vec<f64>>>,
}

fn recorded() -> &'static Recorded {
    static RECORDED: OnceLock<Recorded> = OnceLock::new();
    RECORDED.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder of this binary");
        Recorded {
            snapshotter,
            totals: Mutex::new(HashMap::new()),
            histograms: Mutex::new(HashMap::new()),
        }
    })
}

/// `name{label=value,...}` with labels sorted.
fn series(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

/// Every counter and gauge value now, and the count and largest value of
/// every histogram so far.
fn read() -> HashMap<String, f64> {
    let recorded = recorded();
    let mut totals = recorded.totals.lock().unwrap();
    let mut histograms = recorded.histograms.lock().unwrap();
    for (key, _, _, value) in recorded.snapshotter.snapshot().into_vec() {
        let labels: Vec<(&str, &str)> = key.key().labels().map(|l| (l.key(), l.value())).collect();
        let name = series(key.key().name(), &labels);
        match value {
            // Gauges are only moved up and down here, so the changes add up.
            DebugValue::Counter(n) => *totals.entry(name).or_default() += n as f64,
            DebugValue::Gauge(g) => *totals.entry(name).or_default() += g.into_inner(),
            DebugValue::Histogram(samples) => histograms
                .entry(name)
                .or_default()
                .extend(samples.into_iter().map(|s| s.into_inner())),
        }
    }
    let mut values = totals.clone();
    for (name, samples) in histograms.iter() {
        values.insert(format!("{name}:count"), samples.len() as f64);
        let max = samples.iter().copied().fold(0.0, f64::max);
        values.insert(format!("{name}:max"), max);
    }
    values
}

fn get(values: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    values.get(&series(name, labels)).copied().unwrap_or(0.0)
}

fn hist(values: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)], what: &str) -> f64 {
    values
        .get(&format!("{}:{what}", series(name, labels)))
        .copied()
        .unwrap_or(0.0)
}

const ETCD_EX: [(&str, &str); 2] = [("backend", "etcd"), ("mode", "exclusive")];

fn acquisitions(values: &HashMap<String, f64>, outcome: &str) -> f64 {
    get(
        values,
        ACQUISITIONS,
        &[ETCD_EX[0], ETCD_EX[1], ("outcome", outcome)],
    )
}

/// One test: the recorder is global, so the scenarios run in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_try_wait_contention_and_outage() {
    let mut etcd = etcd().await;
    let before = read();

    // Try: acquired, held, released.
    let a = locker(&etcd, 3).await;
    let b = locker(&etcd, 10).await;
    let name = LockName::new("metered").unwrap();
    let guard = a.try_acquire(&name).await.expect("acquire");
    let now = read();
    assert_eq!(
        acquisitions(&now, "acquired") - acquisitions(&before, "acquired"),
        1.0
    );
    assert_eq!(
        get(&now, HELD, &ETCD_EX) - get(&before, HELD, &ETCD_EX),
        1.0
    );
    assert!(
        get(&now, LEASE_GRANTS, &[("backend", "etcd")])
            >= get(&before, LEASE_GRANTS, &[("backend", "etcd")]) + 1.0
    );

    // Contention: locked.
    let err = b.try_acquire(&name).await.expect_err("held");
    assert!(matches!(err, LockError::Locked { .. }));
    let contended = read();
    assert_eq!(
        acquisitions(&contended, "locked") - acquisitions(&now, "locked"),
        1.0
    );

    // Wait: a timeout, then a grant after the release; the wait is measured.
    let err = b
        .acquire(&name, Duration::from_millis(200))
        .await
        .expect_err("held");
    assert!(matches!(err, LockError::Timeout { .. }));
    let waiting = tokio::spawn({
        let (b, name) = (b.clone(), name.clone());
        async move { b.acquire(&name, Duration::from_secs(10)).await }
    });
    eventually("b waits", Duration::from_secs(5), || async {
        b.watches(&name)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the hold is the subject
    guard.release().await.expect("release");
    let granted = waiting.await.unwrap().expect("granted");
    let waited = read();
    assert_eq!(
        acquisitions(&waited, "timeout") - acquisitions(&contended, "timeout"),
        1.0
    );
    assert_eq!(
        acquisitions(&waited, "acquired") - acquisitions(&contended, "acquired"),
        1.0
    );
    let acquired = [ETCD_EX[0], ETCD_EX[1], ("outcome", "acquired")];
    assert!(
        hist(&waited, WAIT_SECONDS, &acquired, "max") >= 0.3,
        "the granted wait"
    );
    assert!(hist(&waited, HOLD_SECONDS, &ETCD_EX, "count") >= 1.0);
    assert!(
        hist(&waited, HOLD_SECONDS, &ETCD_EX, "max") >= 0.3,
        "the hold"
    );
    assert_eq!(
        get(&waited, HELD, &ETCD_EX) - get(&before, HELD, &ETCD_EX),
        1.0,
        "b holds"
    );
    drop(granted);
    eventually("nothing held", Duration::from_secs(5), || async {
        get(&read(), HELD, &ETCD_EX) == get(&before, HELD, &ETCD_EX)
    })
    .await;

    // Renewals: a 3 s lease is renewed every second.
    let renewals = |v: &HashMap<String, f64>, outcome: &str| {
        get(
            v,
            LEASE_RENEWALS,
            &[("backend", "etcd"), ("outcome", outcome)],
        )
    };
    let start = read();
    eventually("renewals", Duration::from_secs(5), || async {
        renewals(&read(), "ok") >= renewals(&start, "ok") + 2.0
    })
    .await;

    // Outage: etcd frozen. A try is unavailable, renewals fail, the lease
    // is lost.
    // A guard keeps the lease (the frozen try retires it: its put's outcome
    // is unknown), so that it is renewed, and lost, during the outage.
    let keep = a
        .try_acquire(&LockName::new("kept").unwrap())
        .await
        .expect("keep");
    let start = read();
    etcd.member().pause();
    let err = a.try_acquire(&name).await.expect_err("etcd is frozen");
    assert!(matches!(err, LockError::Unavailable { .. }), "{err}");
    eventually("a lease lost", Duration::from_secs(10), || async {
        get(&read(), LEASE_LOSSES, &[("backend", "etcd")])
            > get(&start, LEASE_LOSSES, &[("backend", "etcd")])
    })
    .await;
    etcd.member().resume();
    drop(keep);
    let outage = read();
    assert_eq!(
        acquisitions(&outage, "unavailable") - acquisitions(&start, "unavailable"),
        1.0
    );
    assert!(renewals(&outage, "failed") > renewals(&start, "failed"));

    // A watch stream cut: restarted.
    let proxy = TcpProxy::start(&etcd.endpoints()[0]).await.expect("proxy");
    let behind = tower_lease_lock::etcd::EtcdLocker::connect([proxy.endpoint()], None)
        .await
        .expect("connect")
        .namespace(NS)
        .build()
        .expect("locker");
    let blocker = a
        .acquire(&name, Duration::from_secs(10))
        .await
        .expect("a again");
    let waiting = tokio::spawn({
        let (behind, name) = (behind.clone(), name.clone());
        async move { behind.acquire(&name, Duration::from_secs(10)).await }
    });
    eventually(
        "waiting behind the proxy",
        Duration::from_secs(5),
        || async { behind.watches(&name) },
    )
    .await;
    let start = read();
    proxy.cut();
    eventually("a restart counted", Duration::from_secs(5), || async {
        get(&read(), WATCH_STREAM_RESTARTS, &[("backend", "etcd")])
            > get(&start, WATCH_STREAM_RESTARTS, &[("backend", "etcd")])
    })
    .await;
    drop(blocker);
    drop(waiting.await.unwrap().expect("granted"));

    // The memory backend reports under its own name.
    let memory = MemoryLocker::new();
    let start = read();
    let held = memory.try_acquire(&name).await.expect("memory");
    assert!(memory.try_acquire(&name).await.is_err());
    drop(held);
    let end = read();
    let mem = |outcome| {
        [
            ("backend", "memory"),
            ("mode", "exclusive"),
            ("outcome", outcome),
        ]
    };
    assert_eq!(
        get(&end, ACQUISITIONS, &mem("acquired")) - get(&start, ACQUISITIONS, &mem("acquired")),
        1.0
    );
    assert_eq!(
        get(&end, ACQUISITIONS, &mem("locked")) - get(&start, ACQUISITIONS, &mem("locked")),
        1.0
    );
    assert_eq!(
        get(&end, HELD, &[("backend", "memory"), ("mode", "exclusive")]),
        0.0
    );
    assert_no_keys_left(&etcd).await;
}
