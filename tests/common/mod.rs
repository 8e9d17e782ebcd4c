//! Helpers shared by the integration tests: a real etcd per test, lockers on
//! separate clients, and key counting.
#![allow(dead_code, unreachable_pub)]

pub mod body;
pub mod process;

use std::future::Future;
use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use tower_lease_lock::etcd::EtcdLocker;
use tower_lease_lock::testing::EtcdServer;

pub const NS: &str = "test-locks/";

pub async fn etcd() -> EtcdServer {
    EtcdServer::start().await.expect("start etcd")
}

/// A locker in the test namespace on `client`, with the given request
/// timeout or, for `None`, the one derived from the TTL (5 s at most).
pub fn locker_on(
    client: etcd_client::Client,
    ttl_secs: u64,
    request_timeout: Option<Duration>,
) -> EtcdLocker {
    let mut builder = EtcdLocker::builder(client)
        .namespace(NS)
        .ttl(Duration::from_secs(ttl_secs));
    if let Some(timeout) = request_timeout {
        builder = builder.request_timeout(timeout);
    }
    builder.build().expect("build locker")
}

/// A locker on its own client (its own connection, lease and watch stream),
/// with at most a 2 s request timeout.
pub async fn locker(etcd: &EtcdServer, ttl_secs: u64) -> EtcdLocker {
    let client = etcd.client().await.expect("connect");
    let timeout = (ttl_secs >= 10).then_some(Duration::from_secs(2));
    locker_on(client, ttl_secs, timeout)
}

/// Keys under `prefix`.
pub async fn keys_under(etcd: &EtcdServer, prefix: &str) -> Vec<String> {
    let mut client = etcd.client().await.expect("connect");
    let resp = client
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .expect("get");
    resp.kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

/// Polls `check` every 10 ms until it holds; panics after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts that nothing is left under the test namespace (releases on drop
/// run in the background, so give them a moment).
pub async fn assert_no_keys_left(etcd: &EtcdServer) {
    let mut left = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        left = keys_under(etcd, NS).await;
        if left.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("keys left under {NS}: {left:?}");
}

/// A locker on its own client with a custom per-request timeout.
pub async fn locker_with_timeout(
    etcd: &EtcdServer,
    ttl_secs: u64,
    request_timeout: Duration,
) -> EtcdLocker {
    let client = etcd.client().await.expect("connect");
    locker_on(client, ttl_secs, Some(request_timeout))
}

/// A locker connected to `endpoint` directly (for child processes, which
/// have no `EtcdServer` of their own).
pub async fn locker_at(endpoint: &str, ttl_secs: u64) -> EtcdLocker {
    let options = tower_lease_lock::etcd::connect_options(Duration::from_secs(2));
    let client = etcd_client::Client::connect([endpoint], Some(options))
        .await
        .expect("connect");
    locker_on(client, ttl_secs, None)
}

/// The create revision of `key`, or `None` when it does not exist.
pub async fn create_revision(etcd: &EtcdServer, key: &str) -> Option<i64> {
    let mut client = etcd.client().await.expect("connect");
    let resp = client.get(key, None).await.expect("get");
    resp.kvs().first().map(|kv| kv.create_revision())
}

/// Asserts that nothing is left under `prefix` (a namespace other than
/// [`NS`], such as the demo's `demo/`), giving background releases a moment.
pub async fn assert_no_keys_left_under(etcd: &EtcdServer, prefix: &str) {
    let mut left = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        left = keys_under(etcd, prefix).await;
        if left.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("keys left under {prefix}: {left:?}");
}
