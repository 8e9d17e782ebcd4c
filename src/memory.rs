//! [`MemoryLocker`]: the same locks inside one process.
//!
//! For single-node services and fast unit tests. It follows the queue rule of
//! [`mode`](crate::LockMode) exactly like the etcd backend: FIFO, readers share,
//! permits count, tokens strictly increase per locker, and a cancelled or timed
//! out wait leaves nothing behind. Its locks are never lost.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::watch;

use crate::guard::{BoxFuture, LockInfo, Release};
use crate::mode::{grant, Grant};
use crate::LostSignal;
use tracing::Instrument;

use crate::{trace, Holder, LockError, LockGuard, LockMode, LockName, Locker, Wait};

/// An in-process [`Locker`]. Clones share the same locks.
///
/// ```
/// use tower_lease_lock::{LockName, Locker, MemoryLocker, LockError};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let locker = MemoryLocker::new();
/// let name = LockName::new("tenant-1").unwrap();
/// let guard = locker.try_acquire(&name).await.unwrap();
/// assert!(matches!(locker.try_acquire(&name).await, Err(LockError::Locked { .. })));
/// drop(guard);
/// assert!(locker.try_acquire(&name).await.is_ok());
/// # }
/// ```
#[derive(Clone, Default)]
pub struct MemoryLocker {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Set by [`MemoryLocker::shutdown`]; waiters watch it.
    closing: watch::Sender<bool>,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            closing: watch::channel(false).0,
        }
    }
}

fn shut_down() -> LockError {
    LockError::Unavailable {
        message: "the locker shut down".into(),
        source: None,
    }
}

#[derive(Default)]
struct State {
    next_token: u64,
    names: HashMap<LockName, Queue>,
}

struct Queue {
    /// Every acquisition of the name, holders and waiters, by token.
    entries: BTreeMap<u64, LockMode>,
    /// Bumped whenever an entry leaves, so waiters re-check.
    changed: watch::Sender<()>,
}

impl MemoryLocker {
    /// A new, empty locker.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many names have holders or waiters (for tests and metrics).
    pub fn active_names(&self) -> usize {
        self.inner.lock_state().names.len()
    }

    fn enqueue(&self, name: &LockName, mode: LockMode) -> Ticket {
        let mut state = self.inner.lock_state();
        state.next_token += 1;
        let token = state.next_token;
        let queue = state.names.entry(name.clone()).or_insert_with(|| Queue {
            entries: BTreeMap::new(),
            changed: watch::channel(()).0,
        });
        queue.entries.insert(token, mode);
        Ticket {
            inner: Arc::clone(&self.inner),
            name: name.clone(),
            token,
            changed: queue.changed.subscribe(),
            armed: true,
        }
    }
}

impl Inner {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this mutex cannot leave the maps half-updated
        // (every critical section is a single insert or remove), so recover.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn check(&self, name: &LockName, token: u64, mode: LockMode) -> (Grant, Option<u64>) {
        let state = self.lock_state();
        let Some(queue) = state.names.get(name) else {
            return (Grant::Granted, None);
        };
        let first = queue.entries.keys().next().copied().filter(|t| *t != token);
        (
            grant(mode, queue.entries.range(..token).map(|(_, m)| *m)),
            first,
        )
    }

    fn remove(&self, name: &LockName, token: u64) {
        let mut state = self.lock_state();
        if let Some(queue) = state.names.get_mut(name) {
            queue.entries.remove(&token);
            queue.changed.send_replace(());
            if queue.entries.is_empty() {
                state.names.remove(name);
            }
        }
    }
}

/// One entry in a queue; removes itself when dropped unless disarmed.
struct Ticket {
    inner: Arc<Inner>,
    name: LockName,
    token: u64,
    changed: watch::Receiver<()>,
    armed: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.armed {
            self.inner.remove(&self.name, self.token);
        }
    }
}

struct MemoryRelease {
    inner: Arc<Inner>,
    name: LockName,
    token: u64,
}

impl Release for MemoryRelease {
    fn release(self: Box<Self>) -> BoxFuture<Result<(), LockError>> {
        self.inner.remove(&self.name, self.token);
        Box::pin(async { Ok(()) })
    }

    fn release_in_background(self: Box<Self>) {
        self.inner.remove(&self.name, self.token);
    }
}

impl Locker for MemoryLocker {
    /// Refuses new acquisitions and ends waiting ones with
    /// [`LockError::Unavailable`]. Guards already held stay valid until
    /// released: in-process locks have nothing to free.
    async fn shutdown(&self) -> Result<(), LockError> {
        self.inner.closing.send_replace(true);
        Ok(())
    }

    async fn lock(
        &self,
        name: &LockName,
        mode: LockMode,
        wait: Wait,
    ) -> Result<LockGuard, LockError> {
        let started = Instant::now();
        let span = trace::acquire_span("memory", name, mode);
        let result = self
            .lock_in_line(name, mode, wait.normalized(), started)
            .instrument(span.clone())
            .await;
        span.in_scope(|| trace::record_outcome("memory", mode, &result, started.elapsed()));
        result
    }
}

impl MemoryLocker {
    async fn lock_in_line(
        &self,
        name: &LockName,
        mode: LockMode,
        wait: Wait,
        started: Instant,
    ) -> Result<LockGuard, LockError> {
        let mut closing = self.inner.closing.subscribe();
        if *closing.borrow_and_update() {
            return Err(shut_down());
        }
        let mut ticket = self.enqueue(name, mode);
        let deadline = match wait {
            Wait::Try => None,
            Wait::Timeout(d) => Some(started.checked_add(d)),
        };
        loop {
            ticket.changed.borrow_and_update();
            match self.inner.check(name, ticket.token, mode) {
                (Grant::Granted, _) => break,
                (Grant::Mismatch(theirs), _) => {
                    return Err(LockError::ModeConflict {
                        name: name.clone(),
                        ours: mode,
                        theirs,
                    })
                }
                (Grant::Wait, first) => {
                    let Some(deadline) = deadline else {
                        return Err(LockError::Locked {
                            name: name.clone(),
                            holder: first.map(|t| Holder {
                                same_locker: true,
                                ..Holder::with_token(t)
                            }),
                        });
                    };
                    let changed = async {
                        tokio::select! {
                            _ = ticket.changed.changed() => false,
                            _ = closing.wait_for(|closing| *closing) => true,
                        }
                    };
                    let (timed_out, closed) = match deadline {
                        Some(at) => match tokio::time::timeout_at(at.into(), changed).await {
                            Ok(closed) => (false, closed),
                            Err(_) => (true, false),
                        },
                        None => (false, changed.await),
                    };
                    if closed {
                        return Err(shut_down());
                    }
                    if timed_out {
                        return Err(LockError::Timeout {
                            name: name.clone(),
                            waited: started.elapsed(),
                        });
                    }
                }
            }
        }
        ticket.armed = false;
        let info = LockInfo::new(name.clone(), mode, ticket.token, LostSignal::never())
            .with_backend("memory")
            .with_waited(started.elapsed());
        Ok(LockGuard::new(
            info,
            MemoryRelease {
                inner: Arc::clone(&self.inner),
                name: name.clone(),
                token: ticket.token,
            },
        ))
    }
}

impl std::fmt::Debug for MemoryLocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLocker")
            .field("active_names", &self.active_names())
            .finish()
    }
}
