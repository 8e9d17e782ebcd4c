//! [`Dynalite`]: a throwaway DynamoDB (dynalite), and a client for it.

use std::ffi::OsString;
use std::io;
use std::time::Duration;

use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};

use super::emulator::{Emulator, EmulatorProcess};

const DYNALITE: Emulator = Emulator {
    kind: "dynalite",
    bin_var: "TLL_DYNALITE_BIN",
    bin_name: "dynalite",
    npm_package: "dynalite@4.0.0",
    ready_line: "Dynalite listening at:",
};

/// The bound on each attempt of a call of [`Dynalite::client`].
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// A throwaway dynalite (DynamoDB's API over an in-memory store) on a free
/// loopback port, killed (by pid) when dropped. Tables are created, updated
/// and deleted at once (`--createTableMs 0 --deleteTableMs 0
/// --updateTableMs 0`). Conditional writes are atomic; there is no TTL and
/// no TransactWriteItems.
///
/// The program is `$TLL_DYNALITE_BIN`, else `dynalite` from this
/// repository's `.emulators/` (installed by `scripts/ensure-emulators.sh`),
/// else `dynalite` on `PATH` (`npm install dynalite@4.0.0`).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_lease_lock::testing::Dynalite;
///
/// let dynalite = Dynalite::start().await?;
/// let client = dynalite.client();
/// let tables = client.list_tables().send().await?;
/// assert!(tables.table_names().is_empty());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Dynalite {
    process: EmulatorProcess,
    port: u16,
    endpoint: String,
}

impl Dynalite {
    /// The region of [`client`](Self::client) (dynalite accepts any).
    pub const REGION: &'static str = "us-east-1";

    /// The bound on each call of [`client`](Self::client), retries
    /// included: a dead or frozen emulator fails a test in seconds instead
    /// of hanging it.
    pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);

    /// Starts `dynalite` on a free loopback port and waits until it answers.
    pub async fn start() -> io::Result<Self> {
        let (process, port) = EmulatorProcess::start_on_free_port(&DYNALITE, |port| {
            [
                "--host",
                "127.0.0.1",
                "--port",
                port,
                "--createTableMs",
                "0",
                "--deleteTableMs",
                "0",
                "--updateTableMs",
                "0",
            ]
            .into_iter()
            .map(OsString::from)
            .collect()
        })
        .await?;
        Ok(Self {
            process,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
        })
    }

    /// The endpoint URL, `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The port dynalite listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Freezes the emulator (SIGSTOP): its connections stay open and it
    /// answers nothing until [`resume`](Self::resume); requests time out.
    pub fn pause(&self) -> io::Result<()> {
        self.process.pause()
    }

    /// Thaws a paused emulator (SIGCONT).
    pub fn resume(&self) -> io::Result<()> {
        self.process.resume()
    }

    /// Kills the emulator at once (SIGKILL); every table is lost.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// The configuration of [`client`](Self::client): static fake
    /// credentials, region [`REGION`](Self::REGION), this endpoint, each
    /// call bounded by [`OPERATION_TIMEOUT`](Self::OPERATION_TIMEOUT) (2 s an
    /// attempt), the SDK's
    /// standard retries (3 attempts). Change what you need and build a
    /// client with `aws_sdk_dynamodb::Client::from_conf`.
    pub fn config(&self) -> aws_sdk_dynamodb::config::Builder {
        aws_sdk_dynamodb::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(Self::REGION))
            .credentials_provider(Credentials::new(
                "tll-test-key",
                "tll-test-secret",
                None,
                None,
                "tower-lease-lock-testing",
            ))
            .endpoint_url(&self.endpoint)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(ATTEMPT_TIMEOUT)
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .operation_timeout(Self::OPERATION_TIMEOUT)
                    .build(),
            )
            .retry_config(RetryConfig::standard())
    }

    /// A client for this emulator, configured by [`config`](Self::config).
    pub fn client(&self) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::from_conf(self.config().build())
    }
}
