//! The README demo (`examples/tenants.rs`) as real processes: two instances
//! on one etcd serialize increments of one tenant over real HTTP (no lost
//! update, distinct and growing fencing tokens), `etcdctl lock` competes with
//! them for the same lock, a try-mode instance answers 423 for a held tenant,
//! and SIGTERM leaves no lock key behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::process::Proc;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tower_lease_lock::testing::{free_port, EtcdServer};

const NAMESPACE: &str = "demo/";
/// How long an instance may take to print `listening on`.
const START_LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// The example binary
// ---------------------------------------------------------------------------

/// The newest modification time of the files under `path`.
fn newest_mtime(path: &Path) -> SystemTime {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut newest = meta.modified().expect("mtime");
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).expect("read_dir") {
            newest = newest.max(newest_mtime(&entry.expect("dir entry").path()));
        }
    }
    newest
}

/// `target/<profile>/examples/tenants`, next to this test binary
/// (`target/<profile>/deps/`), built first if missing or older than the
/// sources.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps/");
    let binary = profile_dir
        .join("examples")
        .join(format!("tenants{}", std::env::consts::EXE_SUFFIX));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = ["src", "examples", "Cargo.toml"]
        .iter()
        .map(|p| newest_mtime(&root.join(p)))
        .max()
        .expect("sources");
    let fresh = std::fs::metadata(&binary)
        .and_then(|m| m.modified())
        .is_ok_and(|built| built >= sources);
    if !fresh {
        let started = Instant::now();
        let output = Command::new(env!("CARGO"))
            .args(["build", "--all-features", "--example", "tenants"])
            .current_dir(root)
            .stdin(Stdio::null())
            .output()
            .expect("run cargo build");
        assert!(
            output.status.success(),
            "cargo build --example tenants failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        println!("built the example in {:?}", started.elapsed());
    }
    assert!(binary.exists(), "no example binary at {}", binary.display());
    binary
}

// ---------------------------------------------------------------------------
// Child processes, stopped on every path
// ---------------------------------------------------------------------------

/// One instance of the demo, listening on its own loopback port.
struct Instance {
    proc: Proc,
    base: String,
}

async fn start_instance(binary: &Path, what: &str, etcd: &EtcdServer, wait_ms: u64) -> Instance {
    let addr = format!("127.0.0.1:{}", free_port().expect("free port"));
    let mut proc = Proc::spawn(
        what,
        Command::new(binary)
            .env("ETCD_ENDPOINTS", etcd.endpoints().join(","))
            .env("LISTEN_ADDR", &addr)
            .env("LOCK_NAMESPACE", NAMESPACE)
            .env("LOCK_WAIT_MS", wait_ms.to_string())
            .env("RUST_LOG", "warn"),
    );
    loop {
        match proc.next_line_at(START_LIMIT).await {
            Some((_, line)) if line.contains("listening on") => {
                assert!(line.contains(&addr), "{what}: {line}");
                break;
            }
            Some(_) => continue,
            None => panic!("{what} exited before listening"),
        }
    }
    Instance {
        proc,
        base: format!("http://{addr}"),
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: String,
    /// When the response head arrived.
    at: Instant,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

async fn send(client: &HttpClient, method: http::Method, url: &str) -> Answer {
    let request = http::Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = tokio::time::timeout(Duration::from_secs(20), client.request(request))
        .await
        .unwrap_or_else(|_| panic!("no answer from {url} within 20 s"))
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let at = Instant::now();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8(body.to_vec()).expect("utf-8 body"),
        at,
    }
}

async fn increment(client: &HttpClient, instance: &Instance, hold_ms: u64) -> Answer {
    let url = format!("{}/tenants/acme/increment?hold_ms={hold_ms}", instance.base);
    send(client, http::Method::POST, &url).await
}

async fn counter(client: &HttpClient, instance: &Instance) -> u64 {
    let answer = send(
        client,
        http::Method::GET,
        &format!("{}/tenants/acme", instance.base),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let json = answer.json();
    assert_eq!(json["tenant"], "acme");
    json["value"].as_u64().expect("numeric value")
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_serialize_one_tenant() {
    const REQUESTS: usize = 30;

    let binary = example_binary();
    let etcd = etcd().await;
    let endpoint = etcd.endpoints()[0].clone();
    let started = Instant::now();
    let mut a = start_instance(&binary, "instance a", &etcd, 10_000).await;
    let mut b = start_instance(&binary, "instance b", &etcd, 10_000).await;
    let mut c = start_instance(&binary, "instance c (try mode)", &etcd, 0).await;
    println!("three instances up in {:?}", started.elapsed());
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    // (1) Concurrent increments of one tenant, split across two instances.
    let started = Instant::now();
    let mut requests = Vec::new();
    for i in 0..REQUESTS {
        let client = client.clone();
        let base = if i % 2 == 0 { &a.base } else { &b.base };
        let url = format!("{base}/tenants/acme/increment?hold_ms=5");
        requests.push(tokio::spawn(async move {
            send(&client, http::Method::POST, &url).await
        }));
    }
    let mut results = Vec::new();
    for request in requests {
        let answer = request.await.expect("request task");
        assert_eq!(answer.status, 200, "{}", answer.body);
        let json = answer.json();
        assert_eq!(json["tenant"], "acme", "{json}");
        let value = json["value"].as_u64().expect("numeric value");
        let token = json["fencing_token"].as_u64().expect("numeric token");
        results.push((value, token));
    }
    println!(
        "{REQUESTS} increments over two instances in {:?}",
        started.elapsed()
    );
    // Each increment saw the previous one: the values are exactly 1..=30...
    results.sort_unstable();
    let values: Vec<u64> = results.iter().map(|(v, _)| *v).collect();
    assert_eq!(values, (1..=REQUESTS as u64).collect::<Vec<_>>());
    // ...and the fencing tokens are distinct and grow with every holder.
    for pair in results.windows(2) {
        assert!(
            pair[0].1 < pair[1].1,
            "fencing tokens out of order: {results:?}"
        );
    }
    assert_eq!(counter(&client, &a).await, REQUESTS as u64);
    assert_eq!(counter(&client, &b).await, REQUESTS as u64);

    // (2) Instance a holds acme for 1.5 s.
    let lock_prefix = format!("{NAMESPACE}acme/");
    let held_at = Instant::now();
    let holder = tokio::spawn({
        let (client, url) = (
            client.clone(),
            format!("{}/tenants/acme/increment?hold_ms=1500", a.base),
        );
        async move { send(&client, http::Method::POST, &url).await }
    });
    eventually("a holds acme", Duration::from_secs(5), || async {
        keys_under(&etcd, &lock_prefix).await.len() == 1
    })
    .await;

    // The try-mode instance refuses at once.
    let t0 = Instant::now();
    let refused = increment(&client, &c, 0).await;
    assert_eq!(refused.status, 423, "{}", refused.body);
    assert_eq!(
        refused
            .headers
            .get(http::header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap()),
        Some("1")
    );
    assert!(refused.body.contains("acme"), "{}", refused.body);
    assert!(t0.elapsed() < Duration::from_secs(1), "try mode waited");

    // `etcdctl lock demo/acme` queues behind a and acquires only after it.
    let mut etcdctl = Proc::spawn(
        "etcdctl lock",
        Command::new("etcdctl").env("ETCDCTL_API", "3").args([
            "--endpoints",
            &endpoint,
            "lock",
            &format!("{NAMESPACE}acme"),
            "echo",
            "acquired",
        ]),
    );
    eventually("etcdctl in line", Duration::from_secs(5), || async {
        keys_under(&etcd, &lock_prefix).await.len() == 2
    })
    .await;
    assert!(
        !holder.is_finished(),
        "a answered before etcdctl queued (the test's window is too short)"
    );
    let held = holder.await.expect("holder task");
    assert_eq!(held.status, 200, "{}", held.body);
    assert_eq!(held.json()["value"], REQUESTS as u64 + 1);
    assert!(held.at - held_at >= Duration::from_millis(1500));
    let (acquired_at, line) = etcdctl
        .next_line_at(Duration::from_secs(10))
        .await
        .expect("etcdctl printed nothing");
    assert_eq!(line, "acquired");
    assert!(
        acquired_at > held.at,
        "etcdctl acquired {:?} before a answered",
        held.at - acquired_at
    );
    let status = etcdctl.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "etcdctl exited with {status}");
    drop(etcdctl);

    assert_eq!(counter(&client, &c).await, REQUESTS as u64 + 1);

    // (3) SIGTERM: every instance shuts down cleanly and leaves no lock key.
    drop(client);
    for instance in [&mut a, &mut b, &mut c] {
        let status = instance.proc.terminate().await;
        assert!(
            status.success(),
            "{} exited with {status}",
            instance.proc.what()
        );
    }
    assert_no_keys_left_under(&etcd, NAMESPACE).await;
}
