//! [`Azurite`]: a throwaway Azure blob service (Azurite's `azurite-blob`),
//! and SAS-signed clients for it.

use std::ffi::OsString;
use std::io;

use azure_core::credentials::Secret;
use azure_core::http::{RetryOptions, Url};
use azure_core::time::{to_rfc3339, Duration, OffsetDateTime};
use azure_storage_blob::{BlobContainerClient, BlobContainerClientOptions};

use super::emulator::{Emulator, EmulatorProcess};

const AZURITE: Emulator = Emulator {
    kind: "azurite",
    bin_var: "TLL_AZURITE_BIN",
    bin_name: "azurite-blob",
    npm_package: "azurite@3.37.0",
    ready_line: "Azurite Blob service successfully listens on",
};

/// The service version the SAS is signed for (`sv`); it sets the layout of
/// the string to sign (with the encryption scope line, since 2020-12-06), not
/// the API version of the requests (`x-ms-version`, the SDK's own).
const SAS_VERSION: &str = "2025-11-05";

/// How long a SAS made by [`Azurite::account_sas`] is valid.
const SAS_LIFETIME: Duration = Duration::days(1);

/// At most this much memory for blob contents (Azurite's default is half
/// the machine's memory).
const EXTENT_MEMORY_LIMIT_MB: &str = "256";

/// A throwaway Azurite blob service on a free loopback port, with in-memory
/// storage, killed (by pid) when dropped.
///
/// The Azure SDK for Rust has no shared key authentication, so clients reach
/// Azurite through a SAS: [`account_sas`](Self::account_sas) signs one with
/// the emulator's well-known key, [`container_url`](Self::container_url)
/// appends it to a container's URL (for a client of your own), and
/// [`container`](Self::container) creates a fresh container and returns a
/// client for it.
///
/// The program is `$TLL_AZURITE_BIN`, else `azurite-blob` from this
/// repository's `.emulators/` (installed by `scripts/ensure-emulators.sh`),
/// else `azurite-blob` on `PATH` (`npm install azurite@3.37.0`).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_lease_lock::testing::Azurite;
///
/// let azurite = Azurite::start().await?;
/// let container = azurite.container("locks").await?;
/// let blob = container.blob_client("tenant-acme");
/// // blob.page_blob_client().create(512, None).await?; ...
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Azurite {
    process: EmulatorProcess,
    port: u16,
    endpoint: String,
}

impl Azurite {
    /// The emulator's account name.
    pub const ACCOUNT: &'static str = "devstoreaccount1";

    /// The emulator's well-known account key (base64), public in Azurite's
    /// documentation.
    pub const ACCOUNT_KEY: &'static str =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

    /// The permissions of [`account_sas`](Self::account_sas): read (get
    /// properties and metadata, download), write (create a page blob;
    /// acquire, renew, release, change and break a lease; set the sequence
    /// number; set metadata), delete (delete a blob; break a lease too), list
    /// (list blobs), create (create a container, or a blob that does not
    /// exist yet).
    pub const SAS_PERMISSIONS: &'static str = "rwdlc";

    /// Starts `azurite-blob` on a free loopback port with in-memory storage
    /// and no telemetry, and waits until it answers.
    pub async fn start() -> io::Result<Self> {
        let (process, port) = EmulatorProcess::start_on_free_port(&AZURITE, |port| {
            [
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                port,
                "--inMemoryPersistence",
                "--extentMemoryLimit",
                EXTENT_MEMORY_LIMIT_MB,
                "--disableTelemetry",
                "--silent",
            ]
            .into_iter()
            .map(OsString::from)
            .collect()
        })
        .await?;
        Ok(Self {
            process,
            port,
            endpoint: format!("http://127.0.0.1:{port}/{}", Self::ACCOUNT),
        })
    }

    /// The account's blob service URL, `http://127.0.0.1:<port>/devstoreaccount1`
    /// (path-style, as Azurite serves it).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The port the blob service listens on.
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

    /// Kills the emulator at once (SIGKILL); everything it stored is lost.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// An account SAS (the query string, without `?`) signed with
    /// [`ACCOUNT_KEY`](Self::ACCOUNT_KEY), valid for a day, for the blob
    /// service (`ss=b`), every resource type (`srt=sco`: service, container,
    /// object), with [`SAS_PERMISSIONS`](Self::SAS_PERMISSIONS) over http or
    /// https.
    pub fn account_sas(&self) -> azure_core::Result<String> {
        let now = OffsetDateTime::now_utc();
        let expiry = (now + SAS_LIFETIME).replace_nanosecond(0).map_err(|e| {
            azure_core::Error::with_message(
                azure_core::error::ErrorKind::DataConversion,
                format!("SAS expiry: {e}"),
            )
        })?;
        let expiry = to_rfc3339(&expiry);
        let (services, resource_types, protocols) = ("b", "sco", "https,http");
        // The account SAS string to sign for version 2020-12-06 and later:
        // account, permissions, services, resource types, start, expiry, IP
        // range, protocols, version, encryption scope, each followed by a
        // newline (empty start, IP range and encryption scope).
        let string_to_sign = format!(
            "{}\n{}\n{services}\n{resource_types}\n\n{expiry}\n\n{protocols}\n{SAS_VERSION}\n\n",
            Self::ACCOUNT,
            Self::SAS_PERMISSIONS,
        );
        let signature =
            azure_core::hmac::hmac_sha256(&string_to_sign, &Secret::new(Self::ACCOUNT_KEY))?;
        let mut query = Url::parse("http://sas.invalid/")?;
        query
            .query_pairs_mut()
            .append_pair("sv", SAS_VERSION)
            .append_pair("ss", services)
            .append_pair("srt", resource_types)
            .append_pair("sp", Self::SAS_PERMISSIONS)
            .append_pair("se", &expiry)
            .append_pair("spr", protocols)
            .append_pair("sig", &signature);
        Ok(query.query().unwrap_or_default().to_string())
    }

    /// The URL of `container` with an [`account_sas`](Self::account_sas):
    /// `http://127.0.0.1:<port>/devstoreaccount1/<container>?<sas>`, for
    /// `BlobContainerClient::new(url, None, options)`. The name is
    /// percent-encoded here; pass it raw.
    pub fn container_url(&self, container: &str) -> azure_core::Result<Url> {
        let mut url = Url::parse(&format!("{}/", self.endpoint))?;
        url.path_segments_mut()
            .map_err(|()| {
                azure_core::Error::with_message(
                    azure_core::error::ErrorKind::DataConversion,
                    format!("{} cannot take a path", self.endpoint),
                )
            })?
            .pop_if_empty()
            .push(container);
        url.set_query(Some(&self.account_sas()?));
        Ok(url)
    }

    /// Creates `container` (3-63 lowercase letters, digits and hyphens) and
    /// returns a client for it, signed with an account SAS. The client does
    /// not retry: on loopback an emulator answers or is gone, and a test
    /// sees each answer as the service gave it.
    pub async fn container(&self, container: &str) -> azure_core::Result<BlobContainerClient> {
        let mut options = BlobContainerClientOptions::default();
        options.client_options.retry = RetryOptions::none();
        let client = BlobContainerClient::new(self.container_url(container)?, None, Some(options))?;
        client.create(None).await?;
        Ok(client)
    }
}
