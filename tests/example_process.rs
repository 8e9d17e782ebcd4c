//! The README demo (`examples/tenants.rs`) as real processes: two instances
//! on one etcd serialize increments of one tenant over real HTTP (no lost
//! update, distinct and growing fencing tokens), `etcdctl lock` competes with
//! them for the same lock, a try-mode instance answers 423 for a held tenant,
//! and SIGTERM leaves no lock key behind. The README's quick start, run as
//! written, always gets its 423; bad settings and an unreachable etcd stop
//! the demo at once with a message naming the variable; an etcd outage
//! answers a plain 503 without etcd's messages.

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
    let env = [
        ("ETCD_ENDPOINTS", etcd.endpoints().join(",")),
        ("LOCK_NAMESPACE", NAMESPACE.to_string()),
    ];
    start_on(binary, what, &env, wait_ms).await
}

/// Starts the demo with `env` (a backend and where its store is) on a free
/// port, in wait mode for `wait_ms` (0: try mode).
async fn start_on(binary: &Path, what: &str, env: &[(&str, String)], wait_ms: u64) -> Instance {
    let addr = format!("127.0.0.1:{}", free_port().expect("free port"));
    let mut command = Command::new(binary);
    command
        .env("LISTEN_ADDR", &addr)
        .env("LOCK_WAIT_MS", wait_ms.to_string())
        .env("RUST_LOG", "warn");
    for (key, value) in env {
        command.env(key, value);
    }
    let mut proc = Proc::spawn(what, &mut command);
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
    /// When the whole body had arrived (the lock is released at its end).
    at: Instant,
}

impl Answer {
    /// The last line of the body as JSON: the whole body of a GET, the
    /// result line of an increment.
    fn json(&self) -> Value {
        let last = self.body.lines().last().unwrap_or_default();
        serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// An increment's two lines: locked, then the result, with one token.
    fn increment_lines(&self) -> (Value, Value) {
        let lines: Vec<Value> = self
            .body
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
            })
            .collect();
        let [locked, result] = <[Value; 2]>::try_from(lines)
            .unwrap_or_else(|lines| panic!("not two lines: {lines:?}"));
        assert_eq!(locked["locked"], true, "{locked}");
        assert_eq!(locked["tenant"], result["tenant"]);
        assert_eq!(locked["fencing_token"], result["fencing_token"]);
        (locked, result)
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
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    let at = Instant::now();
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

/// `requests` concurrent increments of acme split across `instances`: each
/// answers 200 with NDJSON, every increment saw the previous one (the values
/// are exactly 1..=requests), and the fencing tokens are distinct and grow
/// with every holder.
async fn increments_serialize(client: &HttpClient, instances: [&Instance; 2], requests: usize) {
    let mut sent = Vec::new();
    for i in 0..requests {
        let client = client.clone();
        let url = format!("{}/tenants/acme/increment?hold_ms=5", instances[i % 2].base);
        sent.push(tokio::spawn(async move {
            send(&client, http::Method::POST, &url).await
        }));
    }
    let mut results = Vec::new();
    for request in sent {
        let answer = request.await.expect("request task");
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(
            answer
                .headers
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap()),
            Some("application/x-ndjson")
        );
        let (_, json) = answer.increment_lines();
        assert_eq!(json["tenant"], "acme", "{json}");
        let value = json["value"].as_u64().expect("numeric value");
        let token = json["fencing_token"].as_u64().expect("numeric token");
        results.push((value, token));
    }
    results.sort_unstable();
    let values: Vec<u64> = results.iter().map(|(v, _)| *v).collect();
    assert_eq!(
        values,
        (1..=requests as u64).collect::<Vec<_>>(),
        "no lost update"
    );
    for pair in results.windows(2) {
        assert!(
            pair[0].1 < pair[1].1,
            "fencing tokens out of order: {results:?}"
        );
    }
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
    increments_serialize(&client, [&a, &b], REQUESTS).await;
    println!(
        "{REQUESTS} increments over two instances in {:?}",
        started.elapsed()
    );
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

/// With feature `metrics` (the test suite runs with every feature), the
/// demo serves the lock's metrics at `/metrics`, and they move.
#[cfg(feature = "metrics")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_metrics() {
    let binary = example_binary();
    let etcd = etcd().await;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let demo = start_instance(&binary, "demo", &etcd, 0).await;
    assert_eq!(increment(&client, &demo, 0).await.status, 200);
    let page = send(
        &client,
        http::Method::GET,
        &format!("{}/metrics", demo.base),
    )
    .await;
    assert_eq!(page.status, 200);
    for expected in [
        r#"tower_lease_lock_acquisitions_total{backend="etcd",mode="exclusive",outcome="acquired"} 1"#,
        "tower_lease_lock_lease_grants_total",
        "tower_lease_lock_wait_seconds",
        "# HELP tower_lease_lock_held Locks held right now.",
    ] {
        assert!(
            page.body.contains(expected),
            "{expected:?} not in:\n{}",
            page.body
        );
    }
}

/// A demo stopped right after a request (SIGTERM, as on every deploy) frees
/// its tenants at once: it shuts its locker down after the server stopped,
/// so the release the last response spawned is not cut off and the lease is
/// revoked. Another replica takes the tenant immediately, not one TTL later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_demo_frees_its_tenants_at_once() {
    let binary = example_binary();
    let etcd = etcd().await;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let other = tower_lease_lock::etcd::EtcdLocker::builder(etcd.client().await.expect("connect"))
        .namespace(NAMESPACE)
        .build()
        .expect("locker");
    let tenant = tower_lease_lock::LockName::new("acme").expect("name");
    for round in 0..3 {
        let mut demo = start_instance(&binary, &format!("demo {round}"), &etcd, 0).await;
        let answer = increment(&client, &demo, 0).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        let status = demo.proc.terminate().await;
        assert!(status.success(), "round {round}: exited with {status}");
        use tower_lease_lock::Locker;
        let guard = other
            .try_acquire(&tenant)
            .await
            .unwrap_or_else(|e| panic!("round {round}: the tenant is not free at once: {e}"));
        let mut etcd_client = etcd.client().await.expect("connect");
        let leases = etcd_client.leases().await.expect("leases");
        let ids: Vec<i64> = leases.leases().iter().map(|l| l.id()).collect();
        assert_eq!(
            ids,
            vec![guard.lease_id().expect("lease")],
            "round {round}: leases left"
        );
        guard.release().await.expect("release");
    }
    assert_no_keys_left_under(&etcd, NAMESPACE).await;
}

// ---------------------------------------------------------------------------
// The README's quick start, as written
// ---------------------------------------------------------------------------

/// The shell block after "Then, in another terminal:" in the README.
fn readme_quick_start() -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let after = readme
        .split_once("Then, in another terminal:")
        .expect("the quick start in README.md")
        .1;
    let block = after
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("a sh block after \"Then, in another terminal:\"")
        .0;
    block.to_string()
}

/// The quick start's second request is sent only once the first holds the
/// lock (its first line), so it gets 423 every time, and the last read sees
/// the increment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_quick_start_is_deterministic() {
    const ROUNDS: usize = 3;

    let binary = example_binary();
    let etcd = etcd().await;
    let instance = start_instance(&binary, "the demo", &etcd, 0).await;
    let address = instance.base.trim_start_matches("http://").to_string();
    let script = readme_quick_start();
    assert!(script.contains("localhost:3000/tenants/acme"), "{script}");

    for round in 0..ROUNDS {
        let tenant = format!("acme{round}");
        let script = script
            .replace("localhost:3000", &address)
            .replace("/tenants/acme", &format!("/tenants/{tenant}"));
        let output = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new("bash")
                .args(["-euo", "pipefail", "-c", &script])
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("the quick start ends within 30 s")
        .expect("run bash (and curl)");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "round {round}: {}\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let lines: Vec<&str> = stdout.lines().collect();
        let locked: Value = serde_json::from_str(lines[0]).expect("the first line is JSON");
        assert_eq!(locked["locked"], true, "round {round}: {stdout}");
        assert_eq!(
            lines[1].trim_end(),
            "HTTP/1.1 423 Locked",
            "round {round}: {stdout}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.trim_end().eq_ignore_ascii_case("retry-after: 1")),
            "round {round}: {stdout}"
        );
        let result: Value =
            serde_json::from_str(lines[lines.len() - 2]).expect("the result line is JSON");
        assert_eq!(result["value"], 1, "round {round}: {stdout}");
        assert_eq!(result["fencing_token"], locked["fencing_token"]);
        let read: Value = serde_json::from_str(lines[lines.len() - 1]).expect("the read is JSON");
        assert_eq!(read, serde_json::json!({ "tenant": tenant, "value": 1 }));
    }
    drop(instance);
    assert_no_keys_left_under(&etcd, NAMESPACE).await;
}

// ---------------------------------------------------------------------------
// Startup failures: a message naming the variable, at once
// ---------------------------------------------------------------------------

/// What a demo run that is expected to stop by itself printed.
struct Exit {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs the demo with `env` (and none of the demo's variables from the
/// test's own environment) until it exits; panics after `limit`.
async fn run_demo(binary: &Path, env: &[(&str, &str)], limit: Duration) -> Exit {
    let mut command = tokio::process::Command::new(binary);
    for var in [
        "ETCD_ENDPOINTS",
        "LISTEN_ADDR",
        "LOCK_NAMESPACE",
        "LOCK_TTL_SECS",
        "LOCK_WAIT_MS",
    ] {
        command.env_remove(var);
    }
    command
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let started = Instant::now();
    let output = tokio::time::timeout(limit, command.output())
        .await
        .unwrap_or_else(|_| panic!("the demo with {env:?} still runs after {limit:?}"))
        .expect("run the demo");
    Exit {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        took: started.elapsed(),
    }
}

#[tokio::test]
async fn bad_settings_exit_2_before_starting_etcd() {
    let binary = example_binary();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let taken_addr = taken.local_addr().expect("address").to_string();
    let free_addr = format!("127.0.0.1:{}", free_port().expect("free port"));
    // (variable, value, what the message says)
    let cases = [
        ("LOCK_TTL_SECS", "1", "shorter than etcd's minimum of 2s"),
        ("LOCK_TTL_SECS", "soon", "not a whole number"),
        ("LOCK_WAIT_MS", "-5", "not a whole number"),
        ("LOCK_NAMESPACE", "demo", "end with '/'"),
        ("LISTEN_ADDR", "nonsense", "cannot listen there"),
        ("LISTEN_ADDR", taken_addr.as_str(), "in use"),
    ];
    for (var, value, says) in cases {
        // LISTEN_ADDR on a free port unless the case sets it: no clash with 3000.
        let mut env = vec![(var, value)];
        if var != "LISTEN_ADDR" {
            env.push(("LISTEN_ADDR", &free_addr));
        }
        let exit = run_demo(&binary, &env, Duration::from_secs(20)).await;
        assert_eq!(exit.code, Some(2), "{env:?}: {}", exit.stderr);
        let first = exit.stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with(&format!("error: {var}={value:?}: ")),
            "{env:?}: {first}"
        );
        assert!(first.contains(says), "{env:?}: {first}");
        assert_eq!(exit.stderr.lines().count(), 1, "{env:?}: {}", exit.stderr);
        assert!(
            !exit.stdout.contains("throwaway etcd"),
            "{env:?}: etcd started before the settings were checked: {}",
            exit.stdout
        );
        assert!(
            exit.took < Duration::from_secs(5),
            "{env:?}: took {:?}",
            exit.took
        );
    }
    drop(taken);
}

#[tokio::test]
async fn unreachable_etcd_exits_at_startup() {
    let binary = example_binary();
    let listen = format!("127.0.0.1:{}", free_port().expect("free port"));
    let exit = run_demo(
        &binary,
        &[
            ("ETCD_ENDPOINTS", "http://127.0.0.1:1"),
            ("LISTEN_ADDR", &listen),
        ],
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(exit.code, Some(1), "{}", exit.stderr);
    assert!(
        exit.stderr
            .starts_with("error: etcd at http://127.0.0.1:1 (ETCD_ENDPOINTS)"),
        "{}",
        exit.stderr
    );
    assert!(!exit.stdout.contains("listening"), "{}", exit.stdout);
    assert!(exit.took < Duration::from_secs(8), "took {:?}", exit.took);
}

// ---------------------------------------------------------------------------
// An etcd outage: plain 503s, etcd's messages only in the log
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_answers_without_internals() {
    let binary = example_binary();
    let mut etcd = etcd().await;
    let instance = start_instance(&binary, "the demo", &etcd, 0).await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    assert_eq!(counter(&client, &instance).await, 0);

    etcd.member().kill();
    let read = send(
        &client,
        http::Method::GET,
        &format!("{}/tenants/acme", instance.base),
    )
    .await;
    assert_eq!(read.status, 503, "{}", read.body);
    assert_eq!(read.body, "counter store unavailable; retry later\n");
    let write = increment(&client, &instance, 0).await;
    assert_eq!(write.status, 503, "{}", write.body);
    assert_eq!(write.body, "lock service unavailable; retry later\n");
}

// ---------------------------------------------------------------------------
// The demo on the other backends: LOCK_BACKEND=azure and dynamodb
// ---------------------------------------------------------------------------

/// Two instances on one store: 12 concurrent increments of one tenant split
/// across them give exactly 1..=12 with growing fencing tokens, and a
/// try-mode instance answers 423 while a request holds the tenant.
async fn serialize_on(env: &[(&str, String)]) {
    const REQUESTS: usize = 12;
    let binary = example_binary();
    let mut a = start_on(&binary, "instance a", env, 20_000).await;
    let mut b = start_on(&binary, "instance b", env, 20_000).await;
    let mut c = start_on(&binary, "instance c (try mode)", env, 0).await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    increments_serialize(&client, [&a, &b], REQUESTS).await;
    // A long hold on a, and c (try mode) is refused meanwhile.
    let holding = tokio::spawn({
        let (client, a) = (client.clone(), a.base.clone());
        async move {
            let url = format!("{a}/tenants/acme/increment?hold_ms=3000");
            send(&client, http::Method::POST, &url).await
        }
    });
    let url = format!("{}/tenants/acme/increment", c.base);
    eventually(
        "c answers 423 while a holds acme",
        Duration::from_secs(10),
        || {
            let (client, url) = (client.clone(), url.clone());
            async move { send(&client, http::Method::POST, &url).await.status == 423 }
        },
    )
    .await;
    assert_eq!(holding.await.expect("holding request").status, 200);
    for instance in [&mut a, &mut b, &mut c] {
        let status = instance.proc.terminate().await;
        assert!(status.success(), "{}: {status}", instance.proc.what());
    }
}

#[cfg(feature = "dynamodb")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_on_dynamodb_serializes_one_tenant() {
    let dynalite = tower_lease_lock::testing::Dynalite::start()
        .await
        .expect("dynalite");
    serialize_on(&[
        ("LOCK_BACKEND", "dynamodb".into()),
        ("DYNAMODB_ENDPOINT", dynalite.endpoint().to_string()),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
    ])
    .await;
}

#[cfg(feature = "azure")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_on_azure_serializes_one_tenant() {
    let azurite = tower_lease_lock::testing::Azurite::start()
        .await
        .expect("azurite");
    azurite.container("demo").await.expect("container");
    let url = azurite.container_url("demo").expect("url");
    serialize_on(&[
        ("LOCK_BACKEND", "azure".into()),
        ("AZURE_CONTAINER_URL", url.to_string()),
    ])
    .await;
}
