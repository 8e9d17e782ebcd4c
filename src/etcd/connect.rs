//! Connecting to etcd with settings that surface failures.
//!
//! `etcd_client::Client::connect(endpoints, None)` sets no timeout and no
//! keepalive: a request sent over a dead TCP path (a member frozen, a network
//! cut without a reset) can wait forever, and a member cut off from its
//! leader keeps serving stale watches. [`connect_options`] sets what a locker
//! needs, matched to its request timeout.

use std::time::Duration;

use etcd_client::ConnectOptions;

use super::{EtcdLocker, EtcdLockerBuilder, DEFAULT_REQUEST_TIMEOUT};

/// The least interval between HTTP/2 pings: etcd answers clients that ping
/// more often than its `--grpc-keepalive-min-time` (5 s by default) with
/// GOAWAY.
const MIN_PING_INTERVAL: Duration = Duration::from_secs(10);

/// Connect options for a locker whose requests time out after
/// `request_timeout`:
///
/// - a connect timeout and a per-request timeout of `request_timeout` (a
///   backstop: the locker bounds every request itself);
/// - HTTP/2 keepalive pings every 10 s (or `request_timeout`, if longer) while
///   streams are open, dropping a connection whose ping is not answered within
///   `request_timeout`, and TCP keepalive, so a dead path is noticed;
/// - `require_leader`: a member that lost its leader refuses requests and
///   cancels its watch streams instead of serving stale data, and the locker
///   moves to another member.
///
/// Extend them for your deployment, for example with TLS
/// (`.with_tls(..)` and `https://` endpoints, this crate's feature `tls`)
/// or a user (`.with_user(name, password)`). **With a user, also enable
/// `.with_auto_token_refresh(true)`**: etcd's auth tokens expire
/// (`--auth-token-ttl`, 5 minutes of disuse by default for simple tokens;
/// JWT tokens after a fixed time), and without the refresh every request
/// that needs the token is refused once it has expired
/// ([`LockError::PermissionDenied`](crate::LockError::PermissionDenied),
/// "invalid auth token"): acquisitions fail, and releases cannot delete
/// their keys. etcd 3.4 renews leases without checking the token, so the
/// locks already held are not lost: they stay held, their names locked for
/// everyone, until the locker shuts down and its lease expires.
///
/// The user's role needs `readwrite` on the locker's namespace prefix, and
/// nothing more: see the crate docs, "TLS and auth".
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_lease_lock::etcd::{connect_options, EtcdLocker};
///
/// let timeout = Duration::from_secs(2);
/// let options = connect_options(timeout)
///     .with_user("locker", "secret")
///     .with_auto_token_refresh(true);
/// let locker = EtcdLocker::connect(["http://127.0.0.1:2379"], Some(options))
///     .await?
///     .request_timeout(timeout)
///     .build()?;
/// # Ok(()) }
/// ```
///
/// With TLS (feature `tls`), trusting your etcd CA and, when etcd runs with
/// `--client-cert-auth`, presenting a client certificate:
///
/// ```no_run
/// # #[cfg(feature = "tls")]
/// # async fn demo(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_lease_lock::etcd::{connect_options, EtcdLocker};
/// use tower_lease_lock::etcd_client::{Certificate, Identity, TlsOptions};
///
/// let tls = TlsOptions::new()
///     .ca_certificate(Certificate::from_pem(ca_pem))
///     .identity(Identity::from_pem(cert_pem, key_pem));
/// let options = connect_options(Duration::from_secs(2)).with_tls(tls);
/// let locker = EtcdLocker::connect(["https://etcd-1:2379"], Some(options))
///     .await?
///     .build()?;
/// # Ok(()) }
/// ```
pub fn connect_options(request_timeout: Duration) -> ConnectOptions {
    let ping_every = MIN_PING_INTERVAL.max(request_timeout);
    ConnectOptions::new()
        .with_connect_timeout(request_timeout)
        .with_timeout(request_timeout)
        .with_keep_alive(ping_every, request_timeout)
        .with_keep_alive_while_idle(false)
        .with_tcp_keepalive(ping_every)
        .with_require_leader(true)
}

impl EtcdLocker {
    /// Connects a client to `endpoints` and returns a builder for a locker
    /// on it. `None` uses [`connect_options`] for the default request
    /// timeout of 5 s; pass `Some(connect_options(timeout))`, extended as
    /// you need, when you set another one.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_lease_lock::etcd::EtcdLocker;
    ///
    /// let locker = EtcdLocker::connect(["http://127.0.0.1:2379"], None)
    ///     .await?
    ///     .namespace("billing/")
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub async fn connect<E: AsRef<str>, S: AsRef<[E]>>(
        endpoints: S,
        options: Option<ConnectOptions>,
    ) -> Result<EtcdLockerBuilder, etcd_client::Error> {
        let options = options.unwrap_or_else(|| connect_options(DEFAULT_REQUEST_TIMEOUT));
        let client = etcd_client::Client::connect(endpoints, Some(options)).await?;
        Ok(Self::builder(client))
    }
}
