//! [`LockGuard`]: a held lock, its fencing token, its lost signal, and release.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{metrics, LockError, LockMode, LockName, LostSignal};

/// A boxed, sendable future, as returned by [`Release::release`].
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A backend's way to give a lock back. Implement it to write a backend.
pub trait Release: Send + Sync + 'static {
    /// Releases the lock and reports whether the backend confirmed it.
    fn release(self: Box<Self>) -> BoxFuture<Result<(), LockError>>;

    /// Releases the lock without waiting (called when a guard is dropped).
    /// Must not block and must not panic, inside or outside a runtime.
    fn release_in_background(self: Box<Self>);
}

/// What a held lock is, without the power to release it: name, mode, fencing
/// token, backend key and lost signal. Cheap to clone; the Tower layer puts
/// one in the request extensions.
#[derive(Clone, Debug)]
pub struct LockInfo {
    backend: &'static str,
    name: LockName,
    mode: LockMode,
    token: u64,
    lease_id: Option<i64>,
    key: Option<Arc<str>>,
    waited: Duration,
    lost: LostSignal,
}

impl LockInfo {
    /// Describes a held lock (for backend implementors).
    pub fn new(name: LockName, mode: LockMode, token: u64, lost: LostSignal) -> Self {
        Self {
            backend: "custom",
            name,
            mode,
            token,
            lease_id: None,
            key: None,
            waited: Duration::ZERO,
            lost,
        }
    }

    /// Sets the backend key and lease of the lock.
    pub fn with_backend_key(mut self, key: impl Into<Arc<str>>, lease_id: Option<i64>) -> Self {
        self.key = Some(key.into());
        self.lease_id = lease_id;
        self
    }

    /// Names the backend (`etcd`, `memory`, ...), for logs and metrics;
    /// `custom` unless set.
    pub fn with_backend(mut self, backend: &'static str) -> Self {
        self.backend = backend;
        self
    }

    /// The backend's name: `etcd`, `memory`, or what a backend set.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Sets how long the acquisition waited.
    pub fn with_waited(mut self, waited: Duration) -> Self {
        self.waited = waited;
        self
    }

    /// The locked name.
    pub fn name(&self) -> &LockName {
        &self.name
    }

    /// The mode it is held in.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// The fencing token: strictly greater than the token of every earlier
    /// holder of this name. For etcd it is the create revision of the lock key.
    /// Pass it to the resource you protect and have it reject smaller tokens:
    /// a lock alone cannot survive process pauses, a token check can.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The lease the lock is attached to (etcd).
    pub fn lease_id(&self) -> Option<i64> {
        self.lease_id
    }

    /// The backend key of this lock (etcd: `<namespace><encoded name>/<suffix>`).
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// How long the acquisition waited in line.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// The lost signal of this lock.
    pub fn lost_signal(&self) -> &LostSignal {
        &self.lost
    }

    /// Resolves when the lock can no longer be trusted; see [`LostSignal::lost`].
    pub fn lost(&self) -> impl Future<Output = String> + Send + 'static {
        self.lost.lost()
    }

    /// `true` once the lock can no longer be trusted.
    pub fn is_lost(&self) -> bool {
        self.lost.is_lost()
    }
}

/// A held lock. Released by [`LockGuard::release`] or, in the background,
/// when dropped.
///
/// Dropping a guard never blocks and never panics, inside or outside a Tokio
/// runtime.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LockGuard {
    info: LockInfo,
    release: Option<Box<dyn Release>>,
    /// When the guard was made, for the hold-time metric.
    acquired_at: Instant,
}

impl LockGuard {
    /// Wraps a held lock (for backend implementors).
    pub fn new(info: LockInfo, release: impl Release) -> Self {
        metrics::held(info.backend, info.mode);
        Self {
            info,
            release: Some(Box::new(release)),
            acquired_at: Instant::now(),
        }
    }

    /// Counts the lock as released (once: release and drop both end here).
    fn count_release(&self) {
        metrics::released(
            self.info.backend,
            self.info.mode,
            self.acquired_at.elapsed(),
        );
    }

    /// The description of this lock.
    pub fn info(&self) -> &LockInfo {
        &self.info
    }

    /// Sets how long the acquisition waited (a guard taken by a poller for
    /// a waiter learns the waiter's time when it is handed over).
    pub(crate) fn set_waited(&mut self, waited: Duration) {
        self.info.waited = waited;
    }

    /// The locked name.
    pub fn name(&self) -> &LockName {
        &self.info.name
    }

    /// The mode it is held in.
    pub fn mode(&self) -> LockMode {
        self.info.mode
    }

    /// The fencing token; see [`LockInfo::token`].
    pub fn token(&self) -> u64 {
        self.info.token
    }

    /// The lease the lock is attached to (etcd).
    pub fn lease_id(&self) -> Option<i64> {
        self.info.lease_id
    }

    /// The backend key of this lock.
    pub fn key(&self) -> Option<&str> {
        self.info.key()
    }

    /// Resolves when the lock can no longer be trusted.
    pub fn lost(&self) -> impl Future<Output = String> + Send + 'static {
        self.info.lost()
    }

    /// `true` once the lock can no longer be trusted.
    pub fn is_lost(&self) -> bool {
        self.info.is_lost()
    }

    /// Releases the lock and waits for the backend to confirm.
    pub async fn release(mut self) -> Result<(), LockError> {
        match self.release.take() {
            Some(release) => {
                self.count_release();
                release.release().await
            }
            None => Ok(()),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            self.count_release();
            release.release_in_background();
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("name", &self.info.name)
            .field("mode", &self.info.mode)
            .field("token", &self.info.token)
            .field("key", &self.info.key)
            .finish()
    }
}
