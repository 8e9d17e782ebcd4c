//! The backend-neutral [`Locker`] trait and how long an acquisition may wait.

use std::future::Future;
use std::time::Duration;

use crate::{LockError, LockGuard, LockMode, LockName};

/// How long an acquisition may wait for a contended name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Wait {
    /// Do not wait: a contended name fails at once with [`LockError::Locked`].
    #[default]
    Try,
    /// Wait in line up to this long, then fail with [`LockError::Timeout`].
    /// [`Duration::MAX`] waits without limit; [`Duration::ZERO`] is [`Wait::Try`].
    ///
    /// The time bounds the wait in line. Each etcd request on the way is
    /// bounded by the locker's request timeout of its own.
    Timeout(Duration),
}

impl Wait {
    /// `Timeout(0)` is `Try`.
    pub(crate) fn normalized(self) -> Self {
        match self {
            Self::Timeout(d) if d.is_zero() => Self::Try,
            other => other,
        }
    }
}

/// Something that hands out locks by name.
///
/// Implemented by [`EtcdLocker`](crate::etcd::EtcdLocker) and
/// [`MemoryLocker`](crate::MemoryLocker). A locker is a cheap handle: clone it
/// freely, every clone shares the same state (for etcd: one lease, one watch
/// stream).
///
/// Backends without watches or shared leases (blob leases, conditional writes)
/// fit too: `lock` may poll internally, and the [`LockGuard`] they return
/// carries their own renewal through its [`Release`](crate::Release) handle
/// and [`LostSignal`](crate::LostSignal).
pub trait Locker: Clone + Send + Sync + 'static {
    /// Acquires `name` in `mode`, waiting as `wait` allows.
    ///
    /// Dropping the returned future cancels the acquisition and leaves nothing
    /// behind.
    fn lock(
        &self,
        name: &LockName,
        mode: LockMode,
        wait: Wait,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send;

    /// Takes `name` exclusively if it is free, else fails with [`LockError::Locked`].
    fn try_acquire(
        &self,
        name: &LockName,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        self.lock(name, LockMode::Exclusive, Wait::Try)
    }

    /// Takes `name` exclusively, waiting in line up to `timeout`.
    fn acquire(
        &self,
        name: &LockName,
        timeout: Duration,
    ) -> impl Future<Output = Result<LockGuard, LockError>> + Send {
        self.lock(name, LockMode::Exclusive, Wait::Timeout(timeout))
    }

    /// Shuts the locker down for a clean exit: refuses new acquisitions
    /// ([`LockError::Unavailable`], "locker shut down"), ends waiting ones,
    /// waits a bounded time for releases in flight, frees whatever it still
    /// holds in the backend, and stops its background tasks. Guards still
    /// held are then lost (their [`lost()`](crate::LockGuard::lost) fires).
    ///
    /// Call it after the server stopped taking requests (for axum, after
    /// `axum::serve(..).with_graceful_shutdown(..)` returned): releases
    /// spawned by the last responses would otherwise be cut off when the
    /// runtime stops, leaving the names locked until their lease expires.
    /// Every clone shares the shut-down state. The provided method does
    /// nothing.
    fn shutdown(&self) -> impl Future<Output = Result<(), LockError>> + Send {
        std::future::ready(Ok(()))
    }
}
