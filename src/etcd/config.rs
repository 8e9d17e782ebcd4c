//! [`EtcdLockerBuilder`]: the settings of an [`EtcdLocker`](super::EtcdLocker),
//! checked when it is built.

use std::time::Duration;

use super::EtcdLocker;

/// The namespace used when none is given.
pub const DEFAULT_NAMESPACE: &str = "tower-lease-lock/";
/// The lease TTL used when none is given.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// The shortest TTL etcd grants (it rounds shorter ones up).
pub const MIN_TTL: Duration = Duration::from_secs(2);
/// The longest TTL accepted: a crashed holder keeps its names this long.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// The per-request timeout used when none is given, unless the TTL needs a
/// shorter one (see [`EtcdLockerBuilder::request_timeout`]).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A setting of [`EtcdLockerBuilder`] that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The TTL is shorter than etcd's minimum of 2 s.
    #[error("lease TTL {0:?} is shorter than etcd's minimum of 2s")]
    TtlTooShort(Duration),
    /// The TTL is longer than [`MAX_TTL`].
    #[error("lease TTL {0:?} is longer than the limit of {MAX_TTL:?}")]
    TtlTooLong(Duration),
    /// etcd leases count whole seconds.
    #[error("lease TTL {0:?} is not a whole number of seconds")]
    TtlNotWholeSeconds(Duration),
    /// The renewal cadence must be above zero and at most half of the TTL
    /// minus the safety margin, so that a failed renewal can be retried.
    #[error("renewal cadence {cadence:?} must be above zero and at most half the lease TTL {ttl:?} (minus a safety margin)")]
    BadRenewalCadence {
        /// The cadence asked for.
        cadence: Duration,
        /// The TTL in force.
        ttl: Duration,
    },
    /// The request timeout must be above zero.
    #[error("request timeout must be above zero")]
    ZeroRequestTimeout,
    /// The request timeout leaves no room for a retry of a lease renewal
    /// before the local deadline: a renewal sent at the cadence may take one
    /// request timeout and its retry another, both within
    /// `TTL - safety margin - cadence`.
    #[error("request timeout {request_timeout:?} leaves no room to retry a lease renewal within the TTL {ttl:?}: at most {max:?} with this TTL and renewal cadence (use a longer TTL, a shorter renewal cadence or a shorter request timeout)")]
    RequestTimeoutTooLong {
        /// The request timeout asked for.
        request_timeout: Duration,
        /// The longest that fits.
        max: Duration,
        /// The TTL in force.
        ttl: Duration,
    },
    /// The namespace must be non-empty, end with `/` and have no control characters.
    #[error("namespace {0:?} must be non-empty, end with '/' and have no control characters")]
    BadNamespace(String),
}

/// The longest request timeout a locker with this lease TTL and renewal
/// cadence (`None`: the default, TTL/3) accepts: a renewal sent at the
/// cadence may time out once and be retried, both before the lease's local
/// deadline. Zero when the TTL is below [`MIN_TTL`].
///
/// ```
/// use std::time::Duration;
/// use tower_lease_lock::etcd::max_request_timeout;
///
/// assert_eq!(max_request_timeout(Duration::from_secs(3), None), Duration::from_millis(700));
/// assert_eq!(max_request_timeout(Duration::from_secs(30), None), Duration::from_millis(9500));
/// ```
pub fn max_request_timeout(ttl: Duration, cadence: Option<Duration>) -> Duration {
    if ttl < MIN_TTL {
        return Duration::ZERO;
    }
    let cadence = cadence.unwrap_or(ttl / 3);
    ttl.saturating_sub(safety_margin(ttl))
        .saturating_sub(cadence)
        / 2
}

/// Builds an [`EtcdLocker`]; every mistake is a [`ConfigError`] from
/// [`EtcdLockerBuilder::build`].
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_lease_lock::etcd::{connect_options, EtcdLocker};
///
/// let timeout = Duration::from_secs(2);
/// let client = etcd_client::Client::connect(["http://127.0.0.1:2379"], Some(connect_options(timeout))).await?;
/// let locker = EtcdLocker::builder(client)
///     .namespace("billing/locks/")
///     .ttl(Duration::from_secs(15))
///     .request_timeout(timeout)
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[must_use]
pub struct EtcdLockerBuilder {
    pub(super) client: etcd_client::Client,
    pub(super) namespace: String,
    pub(super) ttl: Duration,
    pub(super) cadence: Option<Duration>,
    pub(super) request_timeout: Option<Duration>,
    pub(super) owner: String,
    pub(super) batching: bool,
}

/// The checked settings.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) namespace: String,
    pub(crate) ttl: Duration,
    pub(crate) cadence: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) owner: String,
    pub(crate) batching: bool,
}

impl Config {
    /// How far short of the server's lease expiry the local deadline is kept.
    pub(crate) fn safety_margin(&self) -> Duration {
        safety_margin(self.ttl)
    }
}

/// `<hostname>:<pid>` (`pid:<pid>` alone tells nothing inside containers).
fn default_owner() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_string());
    format!("{host}:{}", std::process::id())
}

/// A fifth of the TTL, at most one second, but at least 1/500 of the TTL
/// (clock rate drift, which NTP keeps within 500 ppm, grows with the TTL).
fn safety_margin(ttl: Duration) -> Duration {
    (ttl / 5).min(Duration::from_secs(1).max(ttl / 500))
}

impl EtcdLockerBuilder {
    pub(super) fn new(client: etcd_client::Client) -> Self {
        Self {
            client,
            namespace: DEFAULT_NAMESPACE.to_string(),
            ttl: DEFAULT_TTL,
            cadence: None,
            request_timeout: None,
            owner: default_owner(),
            batching: true,
        }
    }

    /// The key prefix of every lock (default [`DEFAULT_NAMESPACE`]). It must end
    /// with `/`; the lock of name `n` lives under `<namespace><encoded n>/`, so
    /// `etcdctl lock <namespace><n>` competes with it. Two namespaces must not
    /// be nested in one another.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The TTL of the locker's lease (default 30 s; whole seconds, 2 s to 1 h).
    /// A crashed process's locks are freed at most this long after it died
    /// (plus an election timeout if the etcd leader changes meanwhile).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How often the lease is renewed (default TTL/3; at most half of the TTL
    /// minus the safety margin of TTL/5, capped at 1 s).
    pub fn renewal_cadence(mut self, cadence: Duration) -> Self {
        self.cadence = Some(cadence);
        self
    }

    /// The longest any single etcd request may take before the acquisition
    /// fails with [`LockError::Unavailable`](crate::LockError::Unavailable).
    ///
    /// A lease renewal must be able to time out once and be retried before
    /// the lease's local deadline, so the request timeout may be at most half
    /// of `TTL - safety margin - renewal cadence` (4.5 s for a 15 s TTL,
    /// 0.7 s for 3 s); a longer one is a
    /// [`ConfigError::RequestTimeoutTooLong`]. The default is
    /// [`DEFAULT_REQUEST_TIMEOUT`] (5 s), or that limit when it is shorter.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// The longest request timeout this builder's TTL and renewal cadence
    /// leave room for; see [`max_request_timeout`].
    pub fn max_request_timeout(&self) -> Duration {
        max_request_timeout(self.ttl, self.cadence)
    }

    /// Whether to send the lock writes of many names in one etcd request
    /// (default: on). While requests are in flight, the acquisitions and
    /// releases that arrive meanwhile go together in the next one, each as
    /// a txn nested in it: etcd pays per request, so under load this
    /// multiplies the locks per second (see `BENCHMARKS.md`). An op is sent
    /// at once when nothing is in flight, so an idle locker waits for
    /// nothing. Off: every acquisition and release is an etcd request of
    /// its own.
    pub fn batching(mut self, on: bool) -> Self {
        self.batching = on;
        self
    }

    /// The value stored in this locker's lock keys, shown to contenders as the
    /// holder (default `<hostname>:<process id>`).
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = owner.into();
        self
    }

    /// Checks the settings and builds the locker. No request is sent: the
    /// lease is granted by the first acquisition.
    ///
    /// Must be called inside a Tokio runtime only when the locker is used; it
    /// spawns nothing itself.
    pub fn build(self) -> Result<EtcdLocker, ConfigError> {
        let ttl = self.ttl;
        if ttl < MIN_TTL {
            return Err(ConfigError::TtlTooShort(ttl));
        }
        if ttl > MAX_TTL {
            return Err(ConfigError::TtlTooLong(ttl));
        }
        if ttl.subsec_nanos() != 0 {
            return Err(ConfigError::TtlNotWholeSeconds(ttl));
        }
        let cadence = self.cadence.unwrap_or(ttl / 3);
        // A renewal must be able to fail once and be retried before the
        // local deadline: at most half of (TTL - safety margin).
        if cadence.is_zero() || cadence > (ttl - safety_margin(ttl)) / 2 {
            return Err(ConfigError::BadRenewalCadence { cadence, ttl });
        }
        // A renewal sent at the cadence, timing out once, and its retry must
        // all fit before the local deadline.
        let max_request_timeout = self.max_request_timeout();
        let request_timeout = match self.request_timeout {
            None => DEFAULT_REQUEST_TIMEOUT.min(max_request_timeout),
            Some(timeout) if timeout.is_zero() => return Err(ConfigError::ZeroRequestTimeout),
            Some(timeout) if timeout > max_request_timeout => {
                return Err(ConfigError::RequestTimeoutTooLong {
                    request_timeout: timeout,
                    max: max_request_timeout,
                    ttl,
                })
            }
            Some(timeout) => timeout,
        };
        let ns = &self.namespace;
        if ns.is_empty() || !ns.ends_with('/') || ns.chars().any(char::is_control) {
            return Err(ConfigError::BadNamespace(self.namespace));
        }
        let config = Config {
            namespace: self.namespace,
            ttl,
            cadence,
            request_timeout,
            owner: self.owner,
            batching: self.batching,
        };
        Ok(EtcdLocker::from_config(self.client, config))
    }
}

impl std::fmt::Debug for EtcdLockerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdLockerBuilder")
            .field("namespace", &self.namespace)
            .field("ttl", &self.ttl)
            .field("cadence", &self.cadence)
            .field("request_timeout", &self.request_timeout)
            .field("batching", &self.batching)
            .finish_non_exhaustive()
    }
}
