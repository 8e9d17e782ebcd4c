//! [`LockGuard`]: a held lock, its fencing token, its lost signal, and release.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::{LockError, LockMode, LockName};

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

/// Resolves when a lock can no longer be trusted. Cheap to clone.
///
/// For etcd this fires when the lease's local deadline passes without renewal
/// (the deadline is kept short of the server's expiry, and is read on every
/// check, so it holds even when the renewal task is not scheduled in time),
/// when the lease was revoked or expired, or when the locker gave it up.
#[derive(Clone)]
pub struct LostSignal {
    shared: Option<(Reasons, Arc<Deadline>)>,
}

/// Why the lock was lost; `None` while it was not.
type Reasons = watch::Receiver<Option<Arc<str>>>;

/// The backend's side of a [`LostSignal`]. Dropping it without calling
/// [`LostTrigger::trigger`] also counts as lost.
#[derive(Debug)]
pub struct LostTrigger {
    tx: watch::Sender<Option<Arc<str>>>,
    deadline: Arc<Deadline>,
}

/// A point in time after which a lock is lost unless it is moved on, stored
/// as nanoseconds past a base instant so that it can be read without a lock.
#[derive(Debug)]
struct Deadline {
    base: Instant,
    /// `u64::MAX`: no deadline.
    nanos: AtomicU64,
}

impl Deadline {
    fn get(&self) -> Option<Instant> {
        match self.nanos.load(Ordering::Acquire) {
            u64::MAX => None,
            nanos => Some(self.base + Duration::from_nanos(nanos)),
        }
    }

    fn passed(&self) -> bool {
        self.get().is_some_and(|at| Instant::now() >= at)
    }
}

const DEADLINE_PASSED: &str = "the lease was not renewed before its local deadline";

impl LostTrigger {
    /// Marks every signal of this trigger lost, with a reason. Later calls
    /// keep the first reason.
    pub fn trigger(&self, reason: impl Into<String>) {
        let reason: Arc<str> = Arc::from(reason.into());
        self.tx.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(reason);
                true
            } else {
                false
            }
        });
    }

    /// Sets the moment after which the lock counts as lost unless the
    /// deadline is moved again (a lease's renewal moves it on).
    pub fn set_deadline(&self, at: Instant) {
        let nanos = at.saturating_duration_since(self.deadline.base).as_nanos();
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX - 1);
        self.deadline.nanos.store(nanos, Ordering::Release);
        self.tx.send_modify(|_| {}); // wake waiters to re-read the deadline
    }

    /// `true` once triggered, or once the deadline passed.
    pub fn is_triggered(&self) -> bool {
        self.tx.borrow().is_some() || self.deadline.passed()
    }

    /// A new signal of this trigger.
    pub fn signal(&self) -> LostSignal {
        LostSignal {
            shared: Some((self.tx.subscribe(), Arc::clone(&self.deadline))),
        }
    }
}

impl LostSignal {
    /// A trigger and its first signal.
    pub fn new() -> (LostTrigger, LostSignal) {
        let (tx, _) = watch::channel(None);
        let trigger = LostTrigger {
            tx,
            deadline: Arc::new(Deadline {
                base: Instant::now(),
                nanos: AtomicU64::new(u64::MAX),
            }),
        };
        let signal = trigger.signal();
        (trigger, signal)
    }

    /// A signal that never fires (in-process locks cannot be lost).
    pub fn never() -> Self {
        Self { shared: None }
    }

    /// `true` once the lock can no longer be trusted.
    pub fn is_lost(&self) -> bool {
        self.reason().is_some()
    }

    /// Why the lock was lost, once it was.
    pub fn reason(&self) -> Option<String> {
        let (rx, deadline) = self.shared.as_ref()?;
        if let Some(reason) = rx.borrow().as_ref() {
            return Some(reason.to_string());
        }
        if deadline.passed() {
            return Some(DEADLINE_PASSED.to_string());
        }
        if rx.has_changed().is_err() {
            return Some(DROPPED.to_string());
        }
        None
    }

    /// Resolves with the reason once the lock is lost; never resolves for a
    /// lock that cannot be lost. The future owns what it needs, so it can be
    /// moved into a task or a `select!`.
    pub fn lost(&self) -> impl Future<Output = String> + Send + 'static {
        let shared = self.shared.clone();
        async move {
            let Some((mut rx, deadline)) = shared else {
                return std::future::pending().await;
            };
            loop {
                if let Some(reason) = rx.borrow_and_update().as_ref() {
                    return reason.to_string();
                }
                let expiry = deadline.get();
                if expiry.is_some_and(|at| Instant::now() >= at) {
                    return DEADLINE_PASSED.to_string();
                }
                let sleep = async {
                    match expiry {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() {
                        return DROPPED.to_string();
                    },
                    () = sleep => {}
                }
            }
        }
    }
}

const DROPPED: &str = "the lock backend stopped tracking this lock";

impl fmt::Debug for LostSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LostSignal")
            .field("lost", &self.reason())
            .finish()
    }
}

/// What a held lock is, without the power to release it: name, mode, fencing
/// token, backend key and lost signal. Cheap to clone; the Tower layer puts
/// one in the request extensions.
#[derive(Clone, Debug)]
pub struct LockInfo {
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
}

impl LockGuard {
    /// Wraps a held lock (for backend implementors).
    pub fn new(info: LockInfo, release: impl Release) -> Self {
        Self {
            info,
            release: Some(Box::new(release)),
        }
    }

    /// The description of this lock.
    pub fn info(&self) -> &LockInfo {
        &self.info
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
            Some(release) => release.release().await,
            None => Ok(()),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
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
