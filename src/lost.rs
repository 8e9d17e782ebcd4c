//! [`LostSignal`]: how a held lock tells its holder that it can no longer be
//! trusted, and [`LostTrigger`], the backend's side of it.
//!
//! A signal fires when the backend triggers it (a lease revoked, a renewal
//! refused), when a local deadline passes without being moved on (a lease not
//! renewed in time: read on every check, so it holds even when no task runs to
//! notice), or when the trigger is dropped (the backend stopped tracking the
//! lock).

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

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

    /// `true` once [`LostTrigger::trigger`] was called (a passed deadline
    /// aside).
    pub fn has_fired(&self) -> bool {
        self.tx.borrow().is_some()
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
