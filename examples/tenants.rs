//! The README demo: a per-tenant counter, serialized across every instance of
//! this service by `LockLayer`, on etcd (default), Azure blob leases or
//! DynamoDB. The counter lives in the same store as the lock.
//!
//! ```text
//! LOCK_BACKEND     etcd (default), azure (feature azure) or dynamodb (feature dynamodb)
//! ETCD_ENDPOINTS   comma-separated etcd URLs (unset: start a throwaway local etcd)
//! AZURE_CONTAINER_URL  a container URL with a SAS (unset: start a throwaway Azurite)
//! DYNAMODB_ENDPOINT    a DynamoDB endpoint URL (unset: start a throwaway dynalite);
//!                  credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
//!                  AWS_SESSION_TOKEN, region from AWS_REGION (default us-east-1)
//! DYNAMODB_TABLE   the lock table, default demo-locks (created if missing; the
//!                  counters go to <table>-counters)
//! LISTEN_ADDR      default 127.0.0.1:3000
//! LOCK_NAMESPACE   default demo/ (must end with /): etcd key prefix, Azure blob prefix
//! LOCK_TTL_SECS    lease TTL: etcd 2 to 3600 (default 30), azure 15 to 60
//!                  (default 30), dynamodb default 20
//! LOCK_WAIT_MS     default 0 = try mode (423 at once); otherwise wait up to that long
//!
//! POST /tenants/{tenant}/increment?hold_ms=N
//!     Under the lock: read the value, sleep N ms, write value+1. Answers two
//!     lines of JSON (application/x-ndjson), each sent as soon as it is known:
//!       {"tenant":"acme","locked":true,"fencing_token":7}   the lock is held
//!       {"tenant":"acme","value":1,"fencing_token":7}       after the hold, written
//!     so a client can act while the lock is held (see the README's quick start).
//! GET  /tenants/{tenant}
//!     The value, without a lock: {"tenant":"acme","value":1}
//! GET  /metrics
//!     The lock metrics in Prometheus text format (built with feature
//!     `metrics`, as scripts/demo does; 404 otherwise)
//! ```
//!
//! Every setting is checked, and the listener bound, before anything starts;
//! then the demo checks that etcd answers. A bad setting exits with status 2
//! and `error: <VARIABLE>=<value>: <problem>` on stderr; an etcd that cannot
//! be reached or started exits with status 1.
//!
//! Run two instances on different ports against one etcd and hammer one tenant:
//! the counter never loses an update, and `etcdctl lock demo/<tenant>` competes
//! with the service for the same lock.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http_body::Frame;
use serde_json::{json, Value};
use tower_lease_lock::axum::HeldLock;
use tower_lease_lock::etcd::{
    connect_options, max_request_timeout, ConfigError, EtcdLocker, DEFAULT_TTL, MAX_TTL, MIN_TTL,
};
use tower_lease_lock::etcd_client::Client;
use tower_lease_lock::{Key, LockLayer, Locker};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long etcd may take to answer the startup check.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// The lock's bound on each etcd request (less when a short TTL needs it).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------

/// Why the demo stops before serving.
enum Failure {
    /// A setting is wrong (exit status 2): `VARIABLE=value: problem`.
    Setting {
        var: &'static str,
        value: String,
        problem: String,
    },
    /// Something else failed (exit status 1).
    Other(String),
}

impl Failure {
    fn setting(var: &'static str, value: &str, problem: impl fmt::Display) -> Self {
        Self::Setting {
            var,
            value: value.to_string(),
            problem: problem.to_string(),
        }
    }

    fn exit_code(&self) -> ExitCode {
        match self {
            Self::Setting { .. } => ExitCode::from(2),
            Self::Other(_) => ExitCode::FAILURE,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Setting {
                var,
                value,
                problem,
            } => write!(f, "{var}={value:?}: {problem}"),
            Self::Other(message) => f.write_str(message),
        }
    }
}

/// The environment, checked.
struct Settings {
    backend: Backend,
    /// `None`: start a throwaway etcd.
    endpoints: Option<Vec<String>>,
    listen: String,
    namespace: String,
    ttl: Duration,
    wait_ms: u64,
}

/// The variable's value; `None` when unset or empty.
fn var(name: &'static str) -> Result<Option<String>, Failure> {
    match std::env::var(name) {
        Ok(value) if value.is_empty() => Ok(None),
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(raw)) => Err(Failure::setting(
            name,
            &raw.to_string_lossy(),
            "not valid UTF-8",
        )),
    }
}

fn whole_number(name: &'static str, default: u64) -> Result<u64, Failure> {
    match var(name)? {
        None => Ok(default),
        Some(raw) => raw
            .trim()
            .parse()
            .map_err(|_| Failure::setting(name, &raw, "not a whole number")),
    }
}

/// Where the locks (and the counters) live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Etcd,
    Azure,
    DynamoDb,
}

impl Backend {
    fn from_env() -> Result<Self, Failure> {
        let raw = var("LOCK_BACKEND")?;
        let backend = match raw.as_deref().map(str::trim) {
            None | Some("etcd") => Self::Etcd,
            Some("azure") => Self::Azure,
            Some("dynamodb") => Self::DynamoDb,
            Some(other) => {
                return Err(Failure::setting(
                    "LOCK_BACKEND",
                    other,
                    "not one of etcd, azure, dynamodb",
                ))
            }
        };
        let built = match backend {
            Self::Etcd => true,
            Self::Azure => cfg!(feature = "azure"),
            Self::DynamoDb => cfg!(feature = "dynamodb"),
        };
        if !built {
            return Err(Failure::setting(
                "LOCK_BACKEND",
                raw.as_deref().unwrap_or_default(),
                "this build lacks the backend's feature (scripts/demo builds them all)",
            ));
        }
        Ok(backend)
    }

    fn default_ttl(self) -> Duration {
        match self {
            Self::Etcd => DEFAULT_TTL,
            Self::Azure => Duration::from_secs(30),
            Self::DynamoDb => Duration::from_secs(20),
        }
    }
}

impl Settings {
    fn from_env() -> Result<Self, Failure> {
        let backend = Backend::from_env()?;
        let endpoints = match var("ETCD_ENDPOINTS")? {
            None => None,
            Some(list) => {
                let endpoints: Vec<String> =
                    list.split(',').map(|s| s.trim().to_string()).collect();
                if endpoints.iter().any(String::is_empty) {
                    return Err(Failure::setting(
                        "ETCD_ENDPOINTS",
                        &list,
                        "an empty entry in the comma-separated list",
                    ));
                }
                Some(endpoints)
            }
        };
        let listen = var("LISTEN_ADDR")?.unwrap_or_else(|| "127.0.0.1:3000".to_string());

        // What EtcdLockerBuilder::build checks, checked before etcd starts.
        let namespace = var("LOCK_NAMESPACE")?.unwrap_or_else(|| "demo/".to_string());
        if !namespace.ends_with('/') || namespace.chars().any(char::is_control) {
            let problem = ConfigError::BadNamespace(namespace.clone());
            return Err(Failure::setting("LOCK_NAMESPACE", &namespace, problem));
        }
        let ttl = Duration::from_secs(whole_number(
            "LOCK_TTL_SECS",
            backend.default_ttl().as_secs(),
        )?);
        // The other backends' builders check their leases.
        let ttl_problem = if backend != Backend::Etcd {
            None
        } else if ttl < MIN_TTL {
            Some(ConfigError::TtlTooShort(ttl))
        } else if ttl > MAX_TTL {
            Some(ConfigError::TtlTooLong(ttl))
        } else {
            None
        };
        if let Some(problem) = ttl_problem {
            return Err(Failure::setting(
                "LOCK_TTL_SECS",
                &ttl.as_secs().to_string(),
                problem,
            ));
        }
        let wait_ms = whole_number("LOCK_WAIT_MS", 0)?;
        Ok(Self {
            backend,
            endpoints,
            listen,
            namespace,
            ttl,
            wait_ms,
        })
    }
}

/// A builder's error, named by the variable it comes from.
fn locker_setting(settings: &Settings, error: ConfigError) -> Failure {
    match error {
        ConfigError::BadNamespace(_) => {
            Failure::setting("LOCK_NAMESPACE", &settings.namespace, error)
        }
        other => Failure::setting("LOCK_TTL_SECS", &settings.ttl.as_secs().to_string(), other),
    }
}

// ---------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------

fn counter_key(tenant: &str) -> String {
    format!("demo-counters/{tenant}")
}

/// Where the counters live: in the lock's own store.
#[derive(Clone)]
enum Counters {
    Etcd(Box<Client>),
    #[cfg(feature = "azure")]
    Azure(std::sync::Arc<azure_storage_blob::BlobContainerClient>),
    #[cfg(feature = "dynamodb")]
    DynamoDb {
        client: aws_sdk_dynamodb::Client,
        table: String,
    },
}

/// Why the counter could not be read or written. Logged in full; clients get
/// [`CounterError::answer`], without the store's messages.
enum CounterError {
    Store(String),
    Corrupt(String),
}

impl CounterError {
    fn answer(&self, tenant: &str) -> Response {
        match self {
            Self::Store(error) => {
                tracing::warn!(%tenant, %error, "counter store unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "counter store unavailable; retry later\n",
                )
                    .into_response()
            }
            Self::Corrupt(error) => {
                tracing::error!(%tenant, %error, "corrupt counter");
                (StatusCode::INTERNAL_SERVER_ERROR, "corrupt counter\n").into_response()
            }
        }
    }
}

fn parse_counter(text: &str) -> Result<u64, CounterError> {
    text.trim()
        .parse::<u64>()
        .map_err(|e| CounterError::Corrupt(e.to_string()))
}

/// A blob name for a tenant's counter: the tenant percent-encoded (as lock
/// names are), with a suffix so that no name ends with a dot.
#[cfg(feature = "azure")]
fn counter_blob(tenant: &str) -> Result<String, CounterError> {
    let name = tower_lease_lock::LockName::new(tenant)
        .map_err(|e| CounterError::Corrupt(e.to_string()))?;
    Ok(format!("demo-counters/{}.count", name.encoded()))
}

impl Counters {
    async fn read(&self, tenant: &str) -> Result<u64, CounterError> {
        match self {
            Self::Etcd(client) => {
                let resp = (**client)
                    .clone()
                    .get(counter_key(tenant), None)
                    .await
                    .map_err(|e| CounterError::Store(e.to_string()))?;
                match resp.kvs().first() {
                    None => Ok(0),
                    Some(kv) => parse_counter(
                        kv.value_str()
                            .map_err(|e| CounterError::Corrupt(e.to_string()))?,
                    ),
                }
            }
            #[cfg(feature = "azure")]
            Self::Azure(container) => {
                let blob = container.blob_client(&counter_blob(tenant)?);
                match blob.download(None).await {
                    Ok(download) => {
                        let bytes = download
                            .body
                            .collect()
                            .await
                            .map_err(|e| CounterError::Store(e.to_string()))?;
                        parse_counter(&String::from_utf8_lossy(&bytes))
                    }
                    Err(e) if e.http_status().map(u16::from) == Some(404) => Ok(0),
                    Err(e) => Err(CounterError::Store(e.to_string())),
                }
            }
            #[cfg(feature = "dynamodb")]
            Self::DynamoDb { client, table } => {
                use aws_sdk_dynamodb::types::AttributeValue;
                let item = client
                    .get_item()
                    .table_name(table)
                    .key("tenant", AttributeValue::S(tenant.to_string()))
                    .consistent_read(true)
                    .send()
                    .await
                    .map_err(|e| {
                        CounterError::Store(format!(
                            "{}",
                            aws_sdk_dynamodb::error::DisplayErrorContext(e)
                        ))
                    })?;
                match item.item().and_then(|item| item.get("value")) {
                    None => Ok(0),
                    Some(AttributeValue::N(n)) => parse_counter(n),
                    Some(other) => Err(CounterError::Corrupt(format!("{other:?}"))),
                }
            }
        }
    }

    async fn write(&self, tenant: &str, value: u64) -> Result<(), CounterError> {
        match self {
            Self::Etcd(client) => (**client)
                .clone()
                .put(counter_key(tenant), value.to_string(), None)
                .await
                .map(drop)
                .map_err(|e| CounterError::Store(e.to_string())),
            #[cfg(feature = "azure")]
            Self::Azure(container) => container
                .blob_client(&counter_blob(tenant)?)
                .upload(
                    azure_core::http::RequestContent::from(value.to_string().into_bytes()),
                    None,
                )
                .await
                .map(drop)
                .map_err(|e| CounterError::Store(e.to_string())),
            #[cfg(feature = "dynamodb")]
            Self::DynamoDb { client, table } => {
                use aws_sdk_dynamodb::types::AttributeValue;
                client
                    .put_item()
                    .table_name(table)
                    .item("tenant", AttributeValue::S(tenant.to_string()))
                    .item("value", AttributeValue::N(value.to_string()))
                    .send()
                    .await
                    .map(drop)
                    .map_err(|e| {
                        CounterError::Store(format!(
                            "{}",
                            aws_sdk_dynamodb::error::DisplayErrorContext(e)
                        ))
                    })
            }
        }
    }
}

/// One line of JSON.
fn json_line(value: Value) -> Bytes {
    Bytes::from(format!("{value}\n"))
}

async fn increment(
    State(counters): State<Counters>,
    Path(tenant): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    lock: HeldLock,
) -> Response {
    let hold_ms: u64 = match query.get("hold_ms").map(|v| v.parse()) {
        None => 0,
        Some(Ok(ms)) => ms,
        Some(Err(_)) => {
            return (StatusCode::BAD_REQUEST, "hold_ms must be a whole number\n").into_response()
        }
    };
    let value = match counters.read(&tenant).await {
        Ok(value) => value,
        Err(e) => return e.answer(&tenant),
    };
    let token = lock.token();
    let locked = json_line(json!({ "tenant": tenant, "locked": true, "fencing_token": token }));
    let write = async move {
        tokio::time::sleep(Duration::from_millis(hold_ms)).await;
        let next = value + 1;
        if let Err(CounterError::Store(error) | CounterError::Corrupt(error)) =
            counters.write(&tenant, next).await
        {
            tracing::warn!(%tenant, %error, "counter not written");
            // Ends the response before its last line: the client sees a
            // failed transfer, not a success.
            return Err(BoxError::from("counter store unavailable"));
        }
        Ok(json_line(
            json!({ "tenant": tenant, "value": next, "fencing_token": token }),
        ))
    };
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::new(TwoLines {
            first: Some(locked),
            rest: Some(Box::pin(write)),
        }),
    )
        .into_response()
}

/// A body of two frames: `first` at once, then the line `rest` makes.
///
/// `rest` runs only while the body is read. `LockLayer` holds the lock until
/// this body ends, so the write in `rest` always happens under the lock: a
/// client that goes away drops the body, and with it the write, as the lock
/// is released.
struct TwoLines {
    first: Option<Bytes>,
    rest: Option<LineFuture>,
}

type LineFuture = Pin<Box<dyn Future<Output = Result<Bytes, BoxError>> + Send>>;

impl http_body::Body for TwoLines {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        let Some(rest) = this.rest.as_mut() else {
            return Poll::Ready(None);
        };
        let line = ready!(rest.as_mut().poll(cx));
        this.rest = None;
        Poll::Ready(Some(line.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_none()
    }
}

async fn show(State(counters): State<Counters>, Path(tenant): Path<String>) -> Response {
    match counters.read(&tenant).await {
        Ok(value) => Json(json!({ "tenant": tenant, "value": value })).into_response(),
        Err(e) => e.answer(&tenant),
    }
}

// ---------------------------------------------------------------------------
// Startup
// ---------------------------------------------------------------------------

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

/// Fails unless etcd answers a status request within [`PROBE_TIMEOUT`]:
/// `Client::connect` alone does not notice an unreachable endpoint.
async fn probe(client: &Client, endpoints: &[String], given: bool) -> Result<(), Failure> {
    let at = endpoints.join(",");
    let which = if given {
        format!("etcd at {at} (ETCD_ENDPOINTS)")
    } else {
        format!("the throwaway etcd at {at}")
    };
    let mut client = client.clone();
    match tokio::time::timeout(PROBE_TIMEOUT, client.status()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(Failure::Other(format!("{which} does not answer: {e}"))),
        Err(_) => Err(Failure::Other(format!(
            "{which} did not answer within {PROBE_TIMEOUT:?}"
        ))),
    }
}

async fn run() -> Result<(), Failure> {
    let settings = Settings::from_env()?;
    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .map_err(|e| {
            Failure::setting(
                "LISTEN_ADDR",
                &settings.listen,
                format!("cannot listen there: {e}"),
            )
        })?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| Failure::Other(format!("the listener has no address: {e}")))?;

    match settings.backend {
        Backend::Etcd => run_etcd(&settings, listener, local_addr).await,
        #[cfg(feature = "azure")]
        Backend::Azure => run_azure(&settings, listener, local_addr).await,
        #[cfg(feature = "dynamodb")]
        Backend::DynamoDb => run_dynamodb(&settings, listener, local_addr).await,
        #[allow(unreachable_patterns)]
        other => Err(Failure::Other(format!(
            "this build lacks the {other:?} backend"
        ))),
    }
}

async fn run_etcd(
    settings: &Settings,
    listener: tokio::net::TcpListener,
    local_addr: std::net::SocketAddr,
) -> Result<(), Failure> {
    // A throwaway etcd unless ETCD_ENDPOINTS names one; it is killed on return.
    let mut _local_etcd = None;
    let endpoints = match &settings.endpoints {
        Some(endpoints) => endpoints.clone(),
        None => {
            let etcd = tower_lease_lock::testing::EtcdServer::start()
                .await
                .map_err(|e| Failure::Other(format!("cannot start a throwaway etcd: {e}")))?;
            println!("started a throwaway etcd at {}", etcd.endpoints().join(","));
            let endpoints = etcd.endpoints();
            _local_etcd = Some(etcd);
            endpoints
        }
    };

    // Quick 503s when etcd is away: 2 s per request, or less when a short
    // TTL needs it (a lease renewal must be able to fail once and be retried).
    let request_timeout = REQUEST_TIMEOUT.min(max_request_timeout(settings.ttl, None));
    let options = connect_options(request_timeout);
    let given = settings.endpoints.is_some();
    let client = Client::connect(&endpoints, Some(options))
        .await
        .map_err(|e| match given {
            true => Failure::setting("ETCD_ENDPOINTS", &endpoints.join(","), e),
            false => Failure::Other(format!("cannot connect to the throwaway etcd: {e}")),
        })?;
    probe(&client, &endpoints, given).await?;
    let locker = EtcdLocker::builder(client.clone())
        .namespace(settings.namespace.clone())
        .ttl(settings.ttl)
        .request_timeout(request_timeout)
        .build()
        .map_err(|e| locker_setting(settings, e))?;
    let store = format!("etcd {}", endpoints.join(","));
    serve(
        locker,
        Counters::Etcd(Box::new(client)),
        settings,
        listener,
        local_addr,
        store,
    )
    .await
}

#[cfg(feature = "azure")]
async fn run_azure(
    settings: &Settings,
    listener: tokio::net::TcpListener,
    local_addr: std::net::SocketAddr,
) -> Result<(), Failure> {
    use azure_storage_blob::BlobContainerClient;
    use tower_lease_lock::azure::{AzureBlobLocker, AzureConfigError};

    // A throwaway Azurite unless AZURE_CONTAINER_URL names a container.
    let mut _local = None;
    let (container, store) = match var("AZURE_CONTAINER_URL")? {
        Some(raw) => {
            let url = raw.parse().map_err(|e| {
                Failure::setting("AZURE_CONTAINER_URL", "(hidden: it may hold a SAS)", e)
            })?;
            let container = BlobContainerClient::new(url, None, None).map_err(|e| {
                Failure::setting("AZURE_CONTAINER_URL", "(hidden: it may hold a SAS)", e)
            })?;
            let store = format!("azure {}", raw.split('?').next().unwrap_or_default());
            (container, store)
        }
        None => {
            let azurite = tower_lease_lock::testing::Azurite::start()
                .await
                .map_err(|e| Failure::Other(format!("cannot start a throwaway Azurite: {e}")))?;
            println!("started a throwaway Azurite at {}", azurite.endpoint());
            let container = azurite
                .container("demo")
                .await
                .map_err(|e| Failure::Other(format!("cannot create a container: {e}")))?;
            let store = format!("azure {}/demo", azurite.endpoint());
            _local = Some(azurite);
            (container, store)
        }
    };
    let counters = Counters::Azure(std::sync::Arc::new(
        BlobContainerClient::new(container.url().clone(), None, None)
            .map_err(|e| Failure::Other(format!("container client: {e}")))?,
    ));
    let locker = AzureBlobLocker::builder(container)
        .lease_duration(settings.ttl)
        .blob_prefix(settings.namespace.clone())
        .request_timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| match e {
            AzureConfigError::Prefix { .. } => {
                Failure::setting("LOCK_NAMESPACE", &settings.namespace, e)
            }
            other => Failure::setting("LOCK_TTL_SECS", &settings.ttl.as_secs().to_string(), other),
        })?;
    serve(locker, counters, settings, listener, local_addr, store).await
}

#[cfg(feature = "dynamodb")]
async fn run_dynamodb(
    settings: &Settings,
    listener: tokio::net::TcpListener,
    local_addr: std::net::SocketAddr,
) -> Result<(), Failure> {
    use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    };
    use tower_lease_lock::dynamodb::DynamoDbLocker;

    let table = var("DYNAMODB_TABLE")?.unwrap_or_else(|| "demo-locks".to_string());
    // A throwaway dynalite unless DYNAMODB_ENDPOINT names one.
    let mut _local = None;
    let client = match var("DYNAMODB_ENDPOINT")? {
        Some(endpoint) => {
            let key = |name| var(name).map(Option::unwrap_or_default);
            let credentials = Credentials::new(
                key("AWS_ACCESS_KEY_ID")?,
                key("AWS_SECRET_ACCESS_KEY")?,
                var("AWS_SESSION_TOKEN")?,
                None,
                "environment",
            );
            let region = var("AWS_REGION")?.unwrap_or_else(|| "us-east-1".to_string());
            let config = aws_sdk_dynamodb::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new(region))
                .credentials_provider(credentials)
                .endpoint_url(endpoint)
                .build();
            aws_sdk_dynamodb::Client::from_conf(config)
        }
        None => {
            let dynalite = tower_lease_lock::testing::Dynalite::start()
                .await
                .map_err(|e| Failure::Other(format!("cannot start a throwaway dynalite: {e}")))?;
            println!("started a throwaway dynalite at {}", dynalite.endpoint());
            let client = dynalite.client();
            _local = Some(dynalite);
            client
        }
    };
    let locker = DynamoDbLocker::builder(client.clone(), table.clone())
        .lease_duration(settings.ttl)
        .request_timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| Failure::setting("LOCK_TTL_SECS", &settings.ttl.as_secs().to_string(), e))?;
    locker
        .ensure_table()
        .await
        .map_err(|e| Failure::Other(format!("the lock table {table:?}: {e}")))?;
    // The counters' table, next to the lock table.
    let counters_table = format!("{table}-counters");
    let created = client
        .create_table()
        .table_name(&counters_table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("tenant")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(|e| Failure::Other(e.to_string()))?,
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("tenant")
                .key_type(KeyType::Hash)
                .build()
                .map_err(|e| Failure::Other(e.to_string()))?,
        )
        .send()
        .await;
    if let Err(e) = created {
        let in_use = e
            .as_service_error()
            .is_some_and(|e| e.is_resource_in_use_exception());
        if !in_use {
            return Err(Failure::Other(format!(
                "cannot create the table {counters_table:?}: {}",
                aws_sdk_dynamodb::error::DisplayErrorContext(e)
            )));
        }
    }
    let counters = Counters::DynamoDb {
        client,
        table: counters_table,
    };
    let store = format!("dynamodb table {table}");
    serve(locker, counters, settings, listener, local_addr, store).await
}

/// Serves the demo's routes behind a `LockLayer` on `locker` until Ctrl-C
/// or SIGTERM, then shuts the locker down.
async fn serve<L: Locker>(
    locker: L,
    counters: Counters,
    settings: &Settings,
    listener: tokio::net::TcpListener,
    local_addr: std::net::SocketAddr,
    store: String,
) -> Result<(), Failure> {
    let key = Key::path_param("tenant").map_err(|e| Failure::Other(e.to_string()))?;
    let mut layer = LockLayer::new(locker.clone(), key);
    if settings.wait_ms > 0 {
        layer = layer.wait(Duration::from_millis(settings.wait_ms));
    }
    let app = Router::new()
        .route("/tenants/{tenant}/increment", post(increment))
        .route_layer(layer)
        .route("/tenants/{tenant}", get(show))
        .with_state(counters);
    #[cfg(feature = "metrics")]
    let app = {
        // The lock's counters, histograms and gauges, as Prometheus scrapes them.
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .map_err(|e| Failure::Other(format!("cannot install the metrics recorder: {e}")))?;
        app.route(
            "/metrics",
            get(move || std::future::ready(recorder.render())),
        )
    };

    println!(
        "listening on {local_addr} ({store}, lock namespace {:?}, ttl {:?}, {})",
        settings.namespace,
        settings.ttl,
        if settings.wait_ms == 0 {
            "try mode".to_string()
        } else {
            format!("wait up to {} ms", settings.wait_ms)
        }
    );
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| Failure::Other(format!("serving failed: {e}")));
    // The last responses' releases may still be in flight: finish them, free
    // whatever is held and revoke the lease, so another instance can take
    // these tenants at once (not one TTL later).
    if let Err(e) = locker.shutdown().await {
        tracing::warn!(error = %e, "the lock service did not confirm the shutdown");
    }
    served
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_lease_lock=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {failure}");
            failure.exit_code()
        }
    }
}
