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
/// (`.with_tls(..)`, etcd-client's `tls` feature) or a user
/// (`.with_user(name, password)`). **With a user, also enable
/// `.with_auto_token_refresh(true)`**: etcd's auth tokens expire
/// (`--auth-token-ttl`, 5 minutes by default), and without the refresh
/// every request, lease renewals included, fails once the token has expired,
/// so the locks are lost.
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
