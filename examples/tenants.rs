//! The README demo: a per-tenant counter in etcd, serialized across every
//! instance of this service by `LockLayer`.
//!
//! ```text
//! ETCD_ENDPOINTS   comma-separated etcd URLs (unset: start a throwaway local etcd)
//! LISTEN_ADDR      default 127.0.0.1:3000
//! LOCK_NAMESPACE   default demo/
//! LOCK_TTL_SECS    default the crate default (30)
//! LOCK_WAIT_MS     default 0 = try mode (423 at once); otherwise wait up to that long
//!
//! POST /tenants/{tenant}/increment?hold_ms=N   read, sleep N ms, write value+1 under the lock
//! GET  /tenants/{tenant}                       read the value, no lock
//! ```
//!
//! Run two instances on different ports against one etcd and hammer one tenant:
//! the counter never loses an update, and `etcdctl lock demo/<tenant>` competes
//! with the service for the same lock.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tower_lease_lock::axum::HeldLock;
use tower_lease_lock::etcd::{EtcdLocker, DEFAULT_TTL};
use tower_lease_lock::{Key, LockLayer};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn env_u64(name: &str, default: u64) -> Result<u64, Error> {
    let raw = env_or(name, &default.to_string());
    raw.parse()
        .map_err(|_| format!("{name} must be a whole number, got {raw:?}").into())
}

fn counter_key(tenant: &str) -> String {
    format!("demo-counters/{tenant}")
}

async fn read_counter(client: &mut etcd_client::Client, tenant: &str) -> Result<u64, String> {
    let resp = client
        .get(counter_key(tenant), None)
        .await
        .map_err(|e| e.to_string())?;
    match resp.kvs().first() {
        None => Ok(0),
        Some(kv) => kv
            .value_str()
            .map_err(|e| e.to_string())?
            .parse()
            .map_err(|e| format!("corrupt counter: {e}")),
    }
}

async fn increment(
    State(client): State<etcd_client::Client>,
    Path(tenant): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    lock: HeldLock,
) -> Result<Json<Value>, (StatusCode, String)> {
    let hold_ms: u64 = match query.get("hold_ms") {
        None => 0,
        Some(v) => v.parse().map_err(|_| {
            (
                StatusCode::BAD_REQUEST,
                format!("hold_ms must be a whole number, got {v:?}"),
            )
        })?,
    };
    let mut client = client;
    let fail = |e: String| (StatusCode::SERVICE_UNAVAILABLE, e);
    let value = read_counter(&mut client, &tenant).await.map_err(fail)?;
    tokio::time::sleep(Duration::from_millis(hold_ms)).await;
    let next = value + 1;
    client
        .put(counter_key(&tenant), next.to_string(), None)
        .await
        .map_err(|e| fail(e.to_string()))?;
    Ok(Json(
        json!({ "tenant": tenant, "value": next, "fencing_token": lock.token() }),
    ))
}

async fn show(
    State(client): State<etcd_client::Client>,
    Path(tenant): Path<String>,
) -> Result<Json<Value>, (StatusCode, String)> {
    let mut client = client;
    let value = read_counter(&mut client, &tenant)
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e))?;
    Ok(Json(json!({ "tenant": tenant, "value": value })))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_lease_lock=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    // A throwaway etcd unless ETCD_ENDPOINTS names one; it is killed on exit.
    let mut _local_etcd = None;
    let endpoints: Vec<String> = match std::env::var("ETCD_ENDPOINTS")
        .ok()
        .filter(|v| !v.is_empty())
    {
        Some(list) => list.split(',').map(|s| s.trim().to_string()).collect(),
        None => {
            let etcd = tower_lease_lock::testing::EtcdServer::start().await?;
            println!("started a throwaway etcd at {}", etcd.endpoints().join(","));
            let endpoints = etcd.endpoints();
            _local_etcd = Some(etcd);
            endpoints
        }
    };
    let listen = env_or("LISTEN_ADDR", "127.0.0.1:3000");
    let namespace = env_or("LOCK_NAMESPACE", "demo/");
    let ttl = Duration::from_secs(env_u64("LOCK_TTL_SECS", DEFAULT_TTL.as_secs())?);
    let wait_ms = env_u64("LOCK_WAIT_MS", 0)?;

    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
    let client = etcd_client::Client::connect(&endpoints, Some(options)).await?;
    let locker = EtcdLocker::builder(client.clone())
        .namespace(namespace.clone())
        .ttl(ttl)
        .request_timeout(Duration::from_secs(2))
        .build()?;

    let mut layer = LockLayer::new(locker, Key::path_param("tenant")?);
    if wait_ms > 0 {
        layer = layer.wait(Duration::from_millis(wait_ms));
    }
    let app = Router::new()
        .route("/tenants/{tenant}/increment", post(increment))
        .route_layer(layer)
        .route("/tenants/{tenant}", get(show))
        .with_state(client);

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!(
        "listening on {} (etcd {}, lock namespace {namespace:?}, ttl {ttl:?}, {})",
        listener.local_addr()?,
        endpoints.join(","),
        if wait_ms == 0 {
            "try mode".to_string()
        } else {
            format!("wait up to {wait_ms} ms")
        }
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}
