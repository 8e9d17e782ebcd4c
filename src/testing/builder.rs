//! [`EtcdServerBuilder`]: a test etcd with TLS, client certificates and auth,
//! as production etcd runs, and clients that match it.

use std::ffi::OsString;
use std::io;
use std::path::Path;
use std::time::Duration;

use etcd_client::ConnectOptions;

use super::auth::{self, Credentials};
#[cfg(feature = "tls")]
use super::tls::TestCertificates;
use super::EtcdServer;

/// How to start an [`EtcdServer`]: with TLS, client certificate
/// authentication, auth (users, roles, tokens), a short token TTL.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_lease_lock::etcd::EtcdLocker;
/// use tower_lease_lock::testing::EtcdServer;
///
/// let etcd = EtcdServer::builder()
///     .auth(true)
///     .auth_token_ttl(Duration::from_secs(2))
///     .start()
///     .await?;
/// // As root, with the token refreshed when it expires.
/// let locker = EtcdLocker::connect(etcd.endpoints(), Some(etcd.connect_options(Duration::from_secs(2))))
///     .await?
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct EtcdServerBuilder {
    #[cfg(feature = "tls")]
    tls: bool,
    #[cfg(feature = "tls")]
    client_cert_auth: bool,
    auth: bool,
    auth_token_ttl: Option<Duration>,
    max_txn_ops: Option<u32>,
}

impl EtcdServerBuilder {
    /// etcd's `--max-txn-ops`: the most operations one txn may hold (128 by
    /// default), to test how a client copes with a lower limit.
    pub fn max_txn_ops(mut self, ops: u32) -> Self {
        self.max_txn_ops = Some(ops);
        self
    }

    /// Serves clients over TLS (`https://` endpoints) with a certificate
    /// signed by a CA made for this server ([`EtcdServer::certificates`]).
    /// Peers still talk plain HTTP.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Accepts only clients that present a certificate signed by the
    /// server's CA (`--client-cert-auth`). Implies [`tls`](Self::tls).
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn client_cert_auth(mut self, required: bool) -> Self {
        self.client_cert_auth = required;
        self.tls |= required;
        self
    }

    /// Enables auth once the server answers: a `root` user with a random
    /// password ([`EtcdServer::root_credentials`]) and the `root` role,
    /// then `auth enable`, all through the API. Add users with
    /// [`EtcdServer::add_user`]. Passwords are hashed with the least bcrypt
    /// cost (`--bcrypt-cost 4`), so that logging in is quick.
    pub fn auth(mut self, auth: bool) -> Self {
        self.auth = auth;
        self
    }

    /// How long a simple auth token lives without being used
    /// (`--auth-token simple --auth-token-ttl`, in whole seconds, at least 1;
    /// etcd's default is 300 s). Implies [`auth`](Self::auth).
    pub fn auth_token_ttl(mut self, ttl: Duration) -> Self {
        self.auth_token_ttl = Some(ttl);
        self.auth = true;
        self
    }

    /// Starts the server on free ports and waits until it answers (as root,
    /// with auth).
    pub async fn start(self) -> io::Result<EtcdServer> {
        let security = Security {
            #[cfg(feature = "tls")]
            certificates: if self.tls {
                Some(TestCertificates::generate()?)
            } else {
                None
            },
            #[cfg(feature = "tls")]
            client_cert_auth: self.client_cert_auth,
            root: self.auth.then(|| Credentials::generate("root")),
            token_ttl_secs: self.auth_token_ttl.map(|ttl| ttl.as_secs().max(1)),
            max_txn_ops: self.max_txn_ops,
        };
        EtcdServer::start_with(security).await
    }
}

/// What a test server was started with, kept to connect to it.
#[derive(Debug, Clone, Default)]
pub(super) struct Security {
    #[cfg(feature = "tls")]
    certificates: Option<TestCertificates>,
    #[cfg(feature = "tls")]
    client_cert_auth: bool,
    root: Option<Credentials>,
    token_ttl_secs: Option<u64>,
    max_txn_ops: Option<u32>,
}

impl Security {
    /// `true` when clients connect over TLS.
    pub(super) fn https(&self) -> bool {
        #[cfg(feature = "tls")]
        {
            self.certificates.is_some()
        }
        #[cfg(not(feature = "tls"))]
        {
            false
        }
    }

    /// etcd's flags for this setup; writes the certificates into `dir`.
    /// `metrics_url` serves `/metrics` in plain HTTP beside a TLS client URL.
    pub(super) fn args(&self, dir: &Path, metrics_url: &str) -> io::Result<Vec<OsString>> {
        let mut args: Vec<OsString> = Vec::new();
        #[cfg(feature = "tls")]
        if let Some(certificates) = &self.certificates {
            let files = certificates.write(dir)?;
            args.push("--cert-file".into());
            args.push(files.server_cert.into());
            args.push("--key-file".into());
            args.push(files.server_key.into());
            // etcd 3.4 asks every client for a certificate as soon as it has
            // a CA to check one against, `--client-cert-auth` or not.
            if self.client_cert_auth {
                args.push("--client-cert-auth".into());
                args.push("--trusted-ca-file".into());
                args.push(files.ca.into());
            }
            args.push("--listen-metrics-urls".into());
            args.push(metrics_url.into());
        }
        #[cfg(not(feature = "tls"))]
        let _ = (dir, metrics_url);
        if self.root.is_some() {
            args.extend(["--auth-token", "simple", "--bcrypt-cost", "4"].map(OsString::from));
            if let Some(ttl) = self.token_ttl_secs {
                args.push("--auth-token-ttl".into());
                args.push(ttl.to_string().into());
            }
        }
        if let Some(ops) = self.max_txn_ops {
            args.push("--max-txn-ops".into());
            args.push(ops.to_string().into());
        }
        Ok(args)
    }

    /// `base` with the server's TLS settings and, when `as_root` and auth is
    /// on, the root user with its token refreshed on expiry.
    pub(super) fn apply(&self, base: ConnectOptions, as_root: bool) -> ConnectOptions {
        #[cfg(feature = "tls")]
        let base = match self.tls_options() {
            Some(tls) => base.with_tls(tls),
            None => base,
        };
        match &self.root {
            Some(root) if as_root => base
                .with_user(root.user(), root.password())
                .with_auto_token_refresh(true),
            _ => base,
        }
    }

    #[cfg(feature = "tls")]
    fn tls_options(&self) -> Option<etcd_client::TlsOptions> {
        let certificates = self.certificates.as_ref()?;
        Some(certificates.tls_options(self.client_cert_auth))
    }

    /// Turns auth on, if asked, on a server that answers with auth off.
    /// Returns whether it did.
    pub(super) async fn enable_auth(&self, endpoints: &[String]) -> io::Result<bool> {
        let Some(root) = &self.root else {
            return Ok(false);
        };
        let options = self.apply(crate::etcd::connect_options(Duration::from_secs(2)), false);
        let mut client = etcd_client::Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| io::Error::other(format!("cannot connect to enable auth: {e}")))?;
        auth::enable(&mut client, root).await?;
        Ok(true)
    }
}

impl EtcdServer {
    /// A builder for a server with TLS or auth. [`EtcdServer::start`] is
    /// `EtcdServer::builder().start()`.
    pub fn builder() -> EtcdServerBuilder {
        EtcdServerBuilder::default()
    }

    /// [`connect_options`](crate::etcd::connect_options) for
    /// `request_timeout`, matching the server: its CA (and the client
    /// certificate when it requires one) with TLS, and the root user with
    /// `with_auto_token_refresh(true)` with auth. Replace the user with
    /// `.with_user(..)`.
    pub fn connect_options(&self, request_timeout: Duration) -> ConnectOptions {
        self.security()
            .apply(crate::etcd::connect_options(request_timeout), true)
    }

    /// The root user's name and password, when auth is on.
    pub fn root_credentials(&self) -> Option<&Credentials> {
        self.security().root.as_ref()
    }

    /// The CA and certificates of a TLS server.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn certificates(&self) -> Option<&TestCertificates> {
        self.security().certificates.as_ref()
    }

    /// TLS options that match the server: its CA, and the client
    /// certificate when it requires one. `None` without TLS.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls_options(&self) -> Option<etcd_client::TlsOptions> {
        self.security().tls_options()
    }
}
