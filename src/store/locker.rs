//! [`StoreLocker`]: a [`Locker`] over any [`LeaseStore`].

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::Instrument;

use super::config::{BusyWait, LeaseTiming, StoreConfigError};
use super::renewal::{self, Holds, Renewer};
use super::waiting::{self, Queues};
use super::{Busy, LeaseStore, StoreError, Take};
use crate::guard::{BoxFuture, LockInfo, Release};
use crate::{metrics, trace, Holder, LockError, LockGuard, LockMode, LockName, Locker, Wait};

/// A [`Locker`] over a [`LeaseStore`]: exclusive locks, a lease per lock
/// renewed by one task per locker, waiting by one poller per name. Cheap to
/// clone; clones share everything.
///
/// Backends build it for you (`AzureBlobLocker`, `DynamoDbLocker`); build
/// one yourself for a store of your own with [`StoreLocker::new`].
pub struct StoreLocker<S: LeaseStore> {
    shared: Arc<Shared<S>>,
}

impl<S: LeaseStore> Clone for StoreLocker<S> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

pub(crate) struct Shared<S: LeaseStore> {
    pub(crate) store: Arc<S>,
    pub(crate) timing: LeaseTiming,
    pub(crate) busy_wait: BusyWait,
    pub(crate) holds: Arc<Holds<S>>,
    pub(crate) queues: Queues,
    closing: AtomicBool,
    /// Releases under way (guards released or dropped), and a wake-up
    /// when the last one ends: shutdown waits for them.
    releasing: AtomicUsize,
    released: Notify,
    renewal: Mutex<Option<Arc<Notify>>>,
    requests: AtomicU64,
    observes: AtomicU64,
    this: Weak<Shared<S>>,
}

/// What a [`StoreLocker`] holds and does right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreDiagnostics {
    /// Locks held by this locker.
    pub held: usize,
    /// Names this locker's waiters wait for (one poller each).
    pub waiting_names: usize,
    /// Takes sent so far (tries, and polls that found the name free).
    pub take_requests: u64,
    /// Reads sent so far by waiting polls ([`LeaseStore::observe`]).
    pub observe_requests: u64,
}

pub(crate) fn shut_down() -> LockError {
    LockError::Unavailable {
        message: "the locker shut down".into(),
        source: None,
    }
}

impl<S: LeaseStore> StoreLocker<S> {
    /// A locker over `store`, with its lease `timing` and the pause between
    /// polls of a busy name. Both are checked here.
    pub fn new(
        store: S,
        timing: LeaseTiming,
        busy_wait: BusyWait,
    ) -> Result<Self, StoreConfigError> {
        timing.check()?;
        busy_wait.check()?;
        let shared = Arc::new_cyclic(|this| Shared {
            store: Arc::new(store),
            timing,
            busy_wait,
            holds: Arc::new(Holds::new()),
            queues: Queues::new(),
            closing: AtomicBool::new(false),
            releasing: AtomicUsize::new(0),
            released: Notify::new(),
            renewal: Mutex::new(None),
            requests: AtomicU64::new(0),
            observes: AtomicU64::new(0),
            this: this.clone(),
        });
        Ok(Self { shared })
    }

    /// The store this locker uses.
    pub fn store(&self) -> &S {
        &self.shared.store
    }

    /// The lease timing in force.
    pub fn timing(&self) -> LeaseTiming {
        self.shared.timing
    }

    /// What this locker holds and does right now.
    pub fn diagnostics(&self) -> StoreDiagnostics {
        StoreDiagnostics {
            held: self.shared.holds.len(),
            waiting_names: self.shared.queues.len(),
            take_requests: self.shared.requests.load(Ordering::Relaxed),
            observe_requests: self.shared.observes.load(Ordering::Relaxed),
        }
    }

    /// Refuses new acquisitions, ends waiting ones, releases every lock
    /// still held (their guards are lost), waits for the releases of guards
    /// dropped just before (each within the request timeout) and stops the
    /// renewal task: when it returns, other processes can take the names.
    pub async fn shutdown(&self) -> Result<(), LockError> {
        let shared = &self.shared;
        if shared.closing.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        for queue in shared.queues.all() {
            queue.wake.notify_one(); // its poller fails its waiters and ends
        }
        if let Some(stop) = lock(&shared.renewal).take() {
            stop.notify_one();
        }
        let held = shared.holds.drain();
        let mut releases = Vec::new();
        for (name, hold, trigger) in held {
            trigger.trigger("the locker shut down");
            let store = Arc::clone(&shared.store);
            let timeout = shared.timing.request_timeout;
            releases.push(async move {
                tokio::time::timeout(timeout, store.release(&name, &hold)).await
            });
        }
        let mut failure = None;
        for release in releases {
            match release.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => failure = Some(store_error(err)),
                Err(_) => {
                    failure = Some(LockError::Unavailable {
                        message: "a release did not answer in time at shutdown".into(),
                        source: None,
                    })
                }
            }
        }
        // Releases under way when the shutdown began (guards dropped just
        // before) finish too, so that another process can take those names
        // at once. Each ends within the request timeout.
        let deadline = Instant::now() + shared.timing.request_timeout;
        loop {
            let done = shared.released.notified();
            if shared.releasing.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, done).await.is_err() {
                failure = Some(LockError::Unavailable {
                    message: "a release under way did not finish in time at shutdown".into(),
                    source: None,
                });
                break;
            }
        }
        failure.map_or(Ok(()), Err)
    }
}

/// One release under way, counted from when the guard gave its hold up
/// until the release ends (or its future is dropped).
struct Releasing<S: LeaseStore>(Arc<Shared<S>>);

impl<S: LeaseStore> Releasing<S> {
    fn start(shared: &Arc<Shared<S>>) -> Self {
        shared.releasing.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(shared))
    }
}

impl<S: LeaseStore> Drop for Releasing<S> {
    fn drop(&mut self) {
        if self.0.releasing.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.released.notify_waiters();
        }
    }
}

impl<S: LeaseStore> Drop for Shared<S> {
    fn drop(&mut self) {
        // The renewal task ends with its locker.
        if let Some(stop) = lock(&self.renewal).take() {
            stop.notify_one();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The [`LockError`] of a failed store call.
pub(crate) fn store_error(err: StoreError) -> LockError {
    match err {
        StoreError::Refused(message) => LockError::PermissionDenied {
            message,
            source: None,
        },
        StoreError::Gone(reason) => LockError::Unavailable {
            message: format!("the store lost track of the lock: {reason}"),
            source: None,
        },
        StoreError::Unavailable { message, source } => LockError::Unavailable { message, source },
    }
}

impl<S: LeaseStore> Shared<S> {
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    pub(crate) fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_observe(&self) {
        self.observes.fetch_add(1, Ordering::Relaxed);
    }

    fn renewer(&self) -> Renewer<S> {
        Renewer {
            store: Arc::clone(&self.store),
            duration: self.timing.duration,
            cadence: self.timing.cadence,
            margin: self.timing.margin(),
            request_timeout: self.timing.request_timeout,
        }
    }

    /// Starts the renewal task at the first hold.
    fn ensure_renewal(&self) {
        let mut renewal = lock(&self.renewal);
        if renewal.is_some() || self.is_closing() {
            return;
        }
        let stop = Arc::new(Notify::new());
        *renewal = Some(Arc::clone(&stop));
        let task = renewal::run(Arc::downgrade(&self.holds), self.renewer(), stop);
        let span = tracing::debug_span!("lock.renewal", lock.backend = self.store.backend());
        tokio::spawn(task.instrument(span));
    }

    /// The guard of a hold just taken by a request sent at `sent`.
    pub(crate) fn guard(
        &self,
        name: &LockName,
        hold: S::Hold,
        token: u64,
        sent: Instant,
        waited: Duration,
    ) -> LockGuard {
        self.ensure_renewal();
        metrics::lease_granted(self.store.backend());
        let (id, lost) = self.holds.add(name, hold, sent, &self.renewer());
        let info = LockInfo::new(name.clone(), LockMode::Exclusive, token, lost)
            .with_backend(self.store.backend())
            .with_waited(waited);
        LockGuard::new(
            info,
            StoreRelease::<S> {
                // A guard keeps its locker's state (and so its renewal)
                // alive, whatever became of the locker.
                shared: self.this.upgrade(),
                id,
                runtime: tokio::runtime::Handle::try_current().ok(),
            },
        )
    }

    /// Gives back a hold whose take had an unknown outcome (it may be ours).
    pub(crate) fn give_back_uncertain(&self, name: &LockName, hold: S::Hold) {
        let (store, name, timeout) = (
            Arc::clone(&self.store),
            name.clone(),
            self.timing.request_timeout,
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            drop(runtime.spawn(async move {
                let _ = tokio::time::timeout(timeout, store.release(&name, &hold)).await;
            }));
        }
    }

    /// One try: a local answer when this locker holds the name or has
    /// waiters queued for it, else one take.
    async fn try_once(
        &self,
        name: &LockName,
        started: std::time::Instant,
    ) -> Result<LockGuard, LockError> {
        let held_here = self.holds.holds(name);
        let queued = self.queues.get(name).is_some_and(|q| q.has_waiters());
        if held_here || queued {
            return Err(LockError::Locked {
                name: name.clone(),
                holder: Some(Holder {
                    same_locker: held_here,
                    ..Holder::default()
                }),
            });
        }
        // Given back unless it is known to be taken (a guard) or refused:
        // whatever failed, or if this future is dropped while the take is
        // under way, the take may have left the hold half taken.
        let mut pending = Pending {
            shared: self,
            name,
            hold: self.store.new_hold(),
            armed: true,
        };
        let sent = Instant::now();
        let timeout = self.timing.request_timeout;
        let outcome =
            tokio::time::timeout(timeout, self.store.take(name, &pending.hold, None)).await;
        self.count_request();
        match outcome {
            Ok(Ok(Take::Taken { token })) => {
                pending.armed = false;
                let hold = pending.hold.clone();
                Ok(self.guard(name, hold, token, sent, started.elapsed()))
            }
            Ok(Ok(Take::Busy(Busy { holder, .. }))) => {
                pending.armed = false; // refused: nothing to give back
                Err(LockError::Locked {
                    name: name.clone(),
                    holder,
                })
            }
            Ok(Err(err)) => Err(store_error(err)),
            Err(_) => Err(LockError::Unavailable {
                message: format!("the store did not answer within {timeout:?}"),
                source: None,
            }),
        }
    }

    async fn wait(
        &self,
        name: &LockName,
        timeout: Duration,
        started: std::time::Instant,
    ) -> Result<LockGuard, LockError> {
        let (mut place, poller) = self.queues.join(name);
        if let Some(queue) = poller {
            tokio::spawn(waiting::poll(self.this.clone(), name.clone(), queue));
        }
        let deadline = started.checked_add(timeout).map(Instant::from_std);
        let granted = match deadline {
            Some(at) => tokio::time::timeout_at(at, &mut place.granted).await,
            None => Ok((&mut place.granted).await),
        };
        match granted {
            // The poller made the guard: the wait is this waiter's own.
            Ok(Ok(grant)) => grant.map(|mut guard| {
                guard.set_waited(started.elapsed());
                guard
            }),
            Ok(Err(_)) => Err(shut_down()),
            Err(_) => Err(LockError::Timeout {
                name: name.clone(),
                waited: started.elapsed(),
            }),
        }
    }
}

/// A hold whose take is under way or failed: given back when dropped while
/// armed (disarmed once the take succeeded or was refused).
struct Pending<'a, S: LeaseStore> {
    shared: &'a Shared<S>,
    name: &'a LockName,
    hold: S::Hold,
    armed: bool,
}

impl<S: LeaseStore> Drop for Pending<'_, S> {
    fn drop(&mut self) {
        if self.armed {
            self.shared
                .give_back_uncertain(self.name, self.hold.clone());
        }
    }
}

/// Gives a store lock back: stops its renewal, releases it in the store,
/// and wakes this locker's waiters for the name.
struct StoreRelease<S: LeaseStore> {
    shared: Option<Arc<Shared<S>>>,
    id: u64,
    runtime: Option<tokio::runtime::Handle>,
}

impl<S: LeaseStore> StoreRelease<S> {
    /// The runtime the lock was taken on, else the caller's.
    fn runtime(&self) -> Option<tokio::runtime::Handle> {
        self.runtime
            .clone()
            .or_else(|| tokio::runtime::Handle::try_current().ok())
    }

    fn release_now(self) -> impl Future<Output = Result<(), LockError>> + Send + 'static {
        let shared = self.shared;
        let taken = shared.as_ref().and_then(|s| s.holds.remove(self.id));
        // Counted from now, before the future first runs.
        let releasing = shared
            .as_ref()
            .filter(|_| taken.is_some())
            .map(Releasing::start);
        async move {
            let _releasing = releasing;
            let (Some(shared), Some((name, hold))) = (shared, taken) else {
                return Ok(()); // shut down, or released already
            };
            let timeout = shared.timing.request_timeout;
            let deadline = Instant::now() + timeout;
            let mut pause = Duration::from_millis(25);
            let result = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, shared.store.release(&name, &hold)).await {
                    Ok(Ok(())) => break Ok(()),
                    Ok(Err(StoreError::Unavailable { .. })) if Instant::now() + pause < deadline => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(400));
                    }
                    Ok(Err(err)) => break Err(store_error(err)),
                    Err(_) => {
                        break Err(LockError::Unavailable {
                            message: format!("the release did not answer within {timeout:?}; the lease expires by itself"),
                            source: None,
                        })
                    }
                }
            };
            if let Some(queue) = shared.queues.get(&name) {
                queue.wake.notify_one();
            }
            result
        }
    }
}

impl<S: LeaseStore> Release for StoreRelease<S> {
    fn release(self: Box<Self>) -> BoxFuture<Result<(), LockError>> {
        let this = *self;
        let runtime = this.runtime();
        let release = this.release_now();
        match runtime {
            // In a task of its own: a caller that goes away cannot cut it off.
            Some(runtime) => {
                let task = runtime.spawn(release);
                Box::pin(async move {
                    task.await.unwrap_or_else(|_| {
                        Err(LockError::Unavailable {
                            message: "the release task stopped".into(),
                            source: None,
                        })
                    })
                })
            }
            None => Box::pin(release),
        }
    }

    fn release_in_background(self: Box<Self>) {
        let this = *self;
        let runtime = this.runtime();
        let release = this.release_now();
        if let Some(runtime) = runtime {
            drop(runtime.spawn(async move {
                if let Err(err) = release.await {
                    tracing::debug!(error = %err, "release failed; the lease expires by itself");
                }
            }));
        }
        // Without a runtime the lease expires by itself.
    }
}

impl<S: LeaseStore> Locker for StoreLocker<S> {
    async fn lock(
        &self,
        name: &LockName,
        mode: LockMode,
        wait: Wait,
    ) -> Result<LockGuard, LockError> {
        let started = std::time::Instant::now();
        let backend = self.shared.store.backend();
        let span = trace::acquire_span(backend, name, mode);
        let result = async {
            if mode != LockMode::Exclusive {
                return Err(LockError::UnsupportedMode { backend, mode });
            }
            if self.shared.is_closing() {
                return Err(shut_down());
            }
            self.shared.store.check_name(name)?;
            match wait.normalized() {
                Wait::Try => self.shared.try_once(name, started).await,
                Wait::Timeout(timeout) => self.shared.wait(name, timeout, started).await,
            }
        }
        .instrument(span.clone())
        .await;
        span.in_scope(|| trace::record_outcome(backend, mode, &result, started.elapsed()));
        result
    }

    fn shutdown(&self) -> impl Future<Output = Result<(), LockError>> + Send {
        StoreLocker::shutdown(self)
    }
}

impl<S: LeaseStore> fmt::Debug for StoreLocker<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreLocker")
            .field("backend", &self.shared.store.backend())
            .field("timing", &self.shared.timing)
            .field("diagnostics", &self.diagnostics())
            .finish_non_exhaustive()
    }
}
