//! [`EtcdLocker`]: leased locks in etcd.
//!
//! - **One lease per locker**, shared by all its locks and renewed by one
//!   background task (`session.rs`, `renewal.rs`); losing it fires every
//!   guard's [`lost()`](crate::LockGuard::lost) before the server could grant
//!   the lock to anyone else, and the next acquisition grants a fresh lease.
//! - **One key per acquisition**, in the layout of etcd's `concurrency.Mutex`
//!   (`keys.rs`): `etcdctl lock <namespace><name>` and Go's Mutex compete
//!   with our locks, both ways.
//! - **try in one round trip** and **waiting by watch** on one shared,
//!   already-open watch stream (`acquire.rs`, `watcher/`).
//! - **Fencing tokens**: the create revision of the lock key;
//!   [`EtcdLocker::txn_if_held`] applies a txn only while the lock is held.
//!
//! **Faults.** Every request is bounded by the request timeout; requests that
//! may be repeated are hedged, so a stalled member (paused, cut off behind a
//! half-open connection) holds up one attempt, not the call (`rpc.rs`). A
//! watch stream that goes quiet is found by progress requests and replaced,
//! its waiters keeping their place (`watcher/stream.rs`). An acquisition
//! dropped at any point cleans up after itself; keys of ours that nobody
//! tracks (a put that landed late) are deleted (`orphans.rs`);
//! [`EtcdLocker::shutdown`] frees everything at exit. Build the client with
//! [`connect_options`] (or [`EtcdLocker::connect`]) so that a dead TCP path
//! is noticed. `RELIABILITY.md` lists each fault, what the crate promises and
//! the test that checks it.
//!
//! Like every lease-based lock, this is an efficiency lock: a process pause or
//! network delay longer than the lease can let two holders overlap (Jepsen,
//! etcd 3.4.3). Use the fencing token where correctness depends on exclusion.

mod acquire;
mod batch;
mod config;
mod connect;
mod keys;
mod local;
mod orphans;
mod release;
mod renewal;
mod rpc;
mod session;
mod watcher;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnResponse};

pub use config::{
    max_request_timeout, ConfigError, EtcdLockerBuilder, DEFAULT_NAMESPACE,
    DEFAULT_REQUEST_TIMEOUT, DEFAULT_TTL, MAX_TTL, MIN_TTL,
};
pub use connect::connect_options;

use crate::guard::LockInfo;

/// The backend's name in logs and metrics.
const BACKEND: &str = "etcd";
use crate::{LockError, LockGuard, LockMode, LockName, Locker, Wait};
use config::Config;
use local::LocalKeys;
use orphans::Orphans;
use session::Sessions;
use watcher::Watcher;

/// A [`Locker`] on etcd. Cheap to clone; clones share one lease and one watch
/// stream.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_lease_lock::{etcd::EtcdLocker, LockName, Locker};
///
/// let locker = EtcdLocker::connect(["http://127.0.0.1:2379"], None).await?.build()?;
/// let name = LockName::new("tenant-42")?;
/// let guard = locker.acquire(&name, Duration::from_secs(5)).await?;
/// println!("holding {} with fencing token {}", guard.name(), guard.token());
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EtcdLocker {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    client: etcd_client::Client,
    config: Config,
    batcher: batch::Batcher,
    sessions: Sessions,
    watcher: Watcher,
    local: Arc<LocalKeys>,
    orphans: Orphans,
    /// Set once by [`EtcdLocker::shutdown`]; waiters watch it.
    closing: tokio::sync::watch::Sender<bool>,
}

/// What an [`EtcdLocker`] has in etcd and in memory right now, from
/// [`EtcdLocker::diagnostics`]. For tests, health checks and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Diagnostics {
    /// Keys this locker has in etcd (held or waiting), as
    /// [`EtcdLocker::own_keys`].
    pub own_keys: usize,
    /// Names whose queue is watched, as [`EtcdLocker::watched_names`].
    pub watched_names: usize,
    /// Watches registered on the locker's watch stream at the server.
    pub server_watches: usize,
    /// Watch streams given up because they ended, failed or went quiet.
    pub watch_restarts: u64,
    /// Leases held: the current one and retired ones that guards still hold.
    pub leases: usize,
    /// Key slots kept from reuse after a delete that went unanswered; freed
    /// when their lease is gone.
    pub retired_slots: usize,
    /// Keys whose put had an unknown outcome, checked for until their lease
    /// is gone.
    pub suspect_keys: usize,
    /// etcd requests that carried the writes of two names or more (see
    /// [`EtcdLockerBuilder::batching`]).
    pub batches: u64,
    /// Writes (acquisitions and releases) sent in those requests.
    pub batched_writes: u64,
    /// Batches etcd refused as a whole (a missing lease, too many
    /// operations) and that were sent again, smaller.
    pub batches_resent: u64,
}

impl EtcdLocker {
    /// A locker with the default settings.
    pub fn new(client: etcd_client::Client) -> Result<Self, ConfigError> {
        Self::builder(client).build()
    }

    /// A builder for a locker with custom settings.
    pub fn builder(client: etcd_client::Client) -> EtcdLockerBuilder {
        EtcdLockerBuilder::new(client)
    }

    fn from_config(client: etcd_client::Client, config: Config) -> Self {
        let settings = watcher::Settings::new(config.request_timeout, &config.namespace);
        let watcher = Watcher::new(client.clone(), settings);
        let local = Arc::new(LocalKeys::default());
        let batcher =
            batch::Batcher::new(client.kv_client(), config.request_timeout, config.batching);
        Self {
            inner: Arc::new(Inner {
                batcher,
                client,
                config,
                sessions: Sessions::new(Arc::clone(&local)),
                watcher,
                local,
                orphans: Orphans::default(),
                closing: tokio::sync::watch::channel(false).0,
            }),
        }
    }

    /// The key prefix of this locker's locks.
    pub fn namespace(&self) -> &str {
        &self.inner.config.namespace
    }

    /// The etcd client this locker uses.
    pub fn client(&self) -> &etcd_client::Client {
        &self.inner.client
    }

    /// The key prefix of `name`'s lock: `<namespace><encoded name>/`.
    pub fn key_prefix(&self, name: &LockName) -> String {
        keys::NameKeys::new(&self.inner.config.namespace, name)
            .prefix()
            .to_string()
    }

    /// How many keys this locker has in etcd right now (held or waiting).
    pub fn own_keys(&self) -> usize {
        self.inner.local.len()
    }

    /// How many names this locker watches right now.
    pub fn watched_names(&self) -> usize {
        self.inner.watcher.watched_names()
    }

    /// `true` while this locker watches `name`'s queue and it is exact: a
    /// waiter of this locker is in line for `name`, or was a few seconds ago
    /// (a name's watch stays a while after its last waiter left).
    pub fn watches(&self, name: &LockName) -> bool {
        let keys = keys::NameKeys::new(&self.inner.config.namespace, name);
        self.inner.watcher.watches(&keys)
    }

    /// What this locker has in etcd and in memory right now.
    pub fn diagnostics(&self) -> Diagnostics {
        let inner = &self.inner;
        let stats = inner.watcher.stats();
        Diagnostics {
            own_keys: inner.local.len(),
            watched_names: inner.watcher.watched_names(),
            server_watches: stats.server_watches.load(Ordering::Relaxed),
            watch_restarts: stats.restarts.load(Ordering::Relaxed),
            leases: inner.sessions.count(),
            retired_slots: inner.local.retired_slots(),
            suspect_keys: inner.orphans.suspects(),
            batches: inner.batcher.stats.batches.load(Ordering::Relaxed),
            batched_writes: inner.batcher.stats.batched_writes.load(Ordering::Relaxed),
            batches_resent: inner.batcher.stats.resent.load(Ordering::Relaxed),
        }
    }

    /// Grants the lease now instead of at the first acquisition (to fail
    /// fast at startup when etcd is unreachable, say). Returns its id.
    pub async fn ensure_lease(&self) -> Result<i64, LockError> {
        let session = self
            .inner
            .sessions
            .get(
                &self.inner.client,
                &self.inner.config,
                tokio::time::Instant::now() + self.inner.config.request_timeout,
            )
            .await?;
        Ok(session.lease_id())
    }

    /// Shuts the locker down for a clean exit (see [`Locker::shutdown`]):
    /// refuses new acquisitions, ends waiting ones, waits up to one request
    /// timeout for releases in flight, revokes every lease of the locker
    /// (which deletes every key still under them, at once rather than at
    /// expiry), and stops the renewal and watch tasks. Guards still held are
    /// lost, quietly: no "lease lost" warning is logged. A second call
    /// returns at once.
    ///
    /// Fails with [`LockError::Unavailable`] when a lease could not be
    /// revoked (etcd unreachable), or [`LockError::PermissionDenied`] when
    /// etcd refused it (an expired auth token, a role without write on the
    /// namespace): its keys then go when it expires, one TTL later.
    pub async fn shutdown(&self) -> Result<(), LockError> {
        let inner = &self.inner;
        if inner.closing.send_replace(true) {
            return Ok(());
        }
        inner.sessions.close();
        let deadline = tokio::time::Instant::now() + inner.config.request_timeout;
        let unsettled = inner.local.settled(deadline).await;
        if unsettled > 0 {
            tracing::debug!(
                unsettled,
                "shutting down with acquisitions or releases in flight"
            );
        }
        let revoked = inner
            .sessions
            .shut_down(&inner.client, inner.config.request_timeout)
            .await;
        inner.watcher.shut_down();
        inner.batcher.shut_down();
        tracing::debug!(ok = revoked.is_ok(), "locker shut down");
        revoked
    }

    /// A compare that holds while the lock of `info` is held: its key still
    /// exists with the create revision that is its fencing token. Add it to
    /// your own txn for a fenced write; `None` for locks of other backends.
    pub fn fence(info: &LockInfo) -> Option<Compare> {
        let key = info.key()?;
        let token = i64::try_from(info.token()).ok()?;
        Some(Compare::create_revision(key, CompareOp::Equal, token))
    }

    /// Runs `ops` in one txn that applies only while the lock of `info` is
    /// held. Fails with [`LockError::Lost`] when it is not (nothing applied).
    ///
    /// ```no_run
    /// # async fn demo(locker: tower_lease_lock::etcd::EtcdLocker, guard: tower_lease_lock::LockGuard)
    /// # -> Result<(), tower_lease_lock::LockError> {
    /// use etcd_client::TxnOp;
    /// locker
    ///     .txn_if_held(guard.info(), vec![TxnOp::put("balance/acme", "42", None)])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn txn_if_held(
        &self,
        info: &LockInfo,
        ops: Vec<TxnOp>,
    ) -> Result<TxnResponse, LockError> {
        let Some(fence) = Self::fence(info) else {
            return Err(LockError::Lost {
                name: info.name().clone(),
                reason: "not an etcd lock".into(),
            });
        };
        let mut kv = self.inner.client.kv_client();
        let txn = Txn::new().when(vec![fence]).and_then(ops);
        let resp = rpc::with_timeout(self.inner.config.request_timeout, "txn", async move {
            kv.txn(txn).await
        })
        .await?;
        if resp.succeeded() {
            Ok(resp)
        } else {
            Err(LockError::Lost {
                name: info.name().clone(),
                reason: "the lock key no longer exists with this fencing token".into(),
            })
        }
    }

    /// Test hook: stops (or resumes) the lease renewal, as a hung process
    /// would. The lease then runs out and every guard's `lost()` fires.
    #[cfg(feature = "test-util")]
    #[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
    pub fn pause_renewal(&self, paused: bool) {
        self.inner
            .sessions
            .renewal_paused
            .store(paused, Ordering::Relaxed);
    }
}

impl Locker for EtcdLocker {
    fn lock(
        &self,
        name: &LockName,
        mode: LockMode,
        wait: Wait,
    ) -> impl std::future::Future<Output = Result<LockGuard, LockError>> + Send {
        acquire::lock(&self.inner, name, mode, wait)
    }

    fn shutdown(&self) -> impl std::future::Future<Output = Result<(), LockError>> + Send {
        EtcdLocker::shutdown(self)
    }
}

impl std::fmt::Debug for EtcdLocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdLocker")
            .field("namespace", &self.inner.config.namespace)
            .field("ttl", &self.inner.config.ttl)
            .field("own_keys", &self.own_keys())
            .finish_non_exhaustive()
    }
}
