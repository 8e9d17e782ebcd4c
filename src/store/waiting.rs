//! Waiting for a busy name: one poller per name per locker, its waiters in
//! FIFO order behind it.
//!
//! The first waiter of a name starts its poller; later ones queue. The
//! poller takes the name for the first waiter still waiting (a guard made
//! for a waiter that gave up is dropped, which releases it), pauses between
//! busy polls as [`Backoff`](super::backoff) says, and does not poll at all
//! while this locker itself holds the name: the holder's release wakes it.
//! It ends when nobody waits any more.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use super::backoff::Backoff;
use super::locker::Shared;
use super::{Busy, LeaseStore, Observed, StoreError, Take};
use crate::{LockError, LockGuard, LockName};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data whole; recover from poison.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a waiter receives: the guard, or why it will not get one.
pub(crate) type Grant = Result<LockGuard, LockError>;

/// The waiters of one name.
pub(crate) struct NameQueue {
    waiters: Mutex<Waiters>,
    /// Woken when this locker released the name (it may be free now).
    pub(crate) wake: Notify,
}

struct Waiters {
    queue: VecDeque<(u64, oneshot::Sender<Grant>)>,
    next_id: u64,
    polling: bool,
}

impl NameQueue {
    fn new() -> Self {
        Self {
            waiters: Mutex::new(Waiters {
                queue: VecDeque::new(),
                next_id: 0,
                polling: false,
            }),
            wake: Notify::new(),
        }
    }

    /// `true` when somebody waits.
    pub(crate) fn has_waiters(&self) -> bool {
        lock(&self.waiters)
            .queue
            .iter()
            .any(|(_, reply)| !reply.is_closed())
    }

    /// Hands `grant` to the first waiter still waiting; gives it back when
    /// nobody is.
    fn hand_over(&self, mut grant: Grant) -> Option<Grant> {
        let mut waiters = lock(&self.waiters);
        while let Some((_, reply)) = waiters.queue.pop_front() {
            match reply.send(grant) {
                Ok(()) => return None,
                Err(back) => grant = back, // gave up meanwhile: the next one
            }
        }
        Some(grant)
    }

    /// Fails every waiter with `err`.
    fn fail_all(&self, err: impl Fn() -> LockError) {
        let mut waiters = lock(&self.waiters);
        for (_, reply) in waiters.queue.drain(..) {
            let _ = reply.send(Err(err()));
        }
    }
}

/// Every name some waiter of this locker waits for.
pub(crate) struct Queues {
    names: Mutex<std::collections::HashMap<LockName, Arc<NameQueue>>>,
}

/// A place in a name's queue; leaving it (drop) removes it.
pub(crate) struct Place {
    queue: Arc<NameQueue>,
    id: u64,
    pub(crate) granted: oneshot::Receiver<Grant>,
}

impl Drop for Place {
    fn drop(&mut self) {
        // A grant that arrived meanwhile is a guard: dropping it releases.
        self.granted.close();
        lock(&self.queue.waiters)
            .queue
            .retain(|(id, _)| *id != self.id);
        // The poller sees it after its pause: waking it would poll once
        // more for every waiter that leaves.
    }
}

impl Queues {
    pub(crate) fn new() -> Self {
        Self {
            names: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// The queue of `name`, if anybody waits for it.
    pub(crate) fn get(&self, name: &LockName) -> Option<Arc<NameQueue>> {
        lock(&self.names).get(name).cloned()
    }

    /// How many names have waiters (or a poller winding down).
    pub(crate) fn len(&self) -> usize {
        lock(&self.names).len()
    }

    /// Every queue, for shutdown.
    pub(crate) fn all(&self) -> Vec<Arc<NameQueue>> {
        lock(&self.names).values().cloned().collect()
    }

    /// Takes a place at the end of `name`'s queue; returns it, and the queue
    /// when a poller must be started for it ([`poll`]).
    pub(crate) fn join(&self, name: &LockName) -> (Place, Option<Arc<NameQueue>>) {
        // The names stay locked until the place is taken (in the order
        // `leave_if_idle` locks them): a poller that finds the queue empty
        // cannot remove it between the lookup and the push, leaving this
        // waiter on a queue nobody polls.
        let mut names = lock(&self.names);
        let queue = Arc::clone(
            names
                .entry(name.clone())
                .or_insert_with(|| Arc::new(NameQueue::new())),
        );
        let (reply, granted) = oneshot::channel();
        let (id, start) = {
            let mut waiters = lock(&queue.waiters);
            waiters.next_id += 1;
            let id = waiters.next_id;
            waiters.queue.push_back((id, reply));
            let start = !waiters.polling;
            waiters.polling = true;
            (id, start)
        };
        drop(names);
        // No wake-up: a poller already running polls for everyone queued.
        let poller = start.then(|| Arc::clone(&queue));
        (Place { queue, id, granted }, poller)
    }

    /// The poller is done with `name` if nobody waits; the queue goes.
    /// Returns `false` when a waiter came meanwhile (keep polling).
    fn leave_if_idle(&self, name: &LockName, queue: &Arc<NameQueue>) -> bool {
        let mut names = lock(&self.names);
        let mut waiters = lock(&queue.waiters);
        waiters.queue.retain(|(_, reply)| !reply.is_closed());
        if !waiters.queue.is_empty() {
            return false;
        }
        waiters.polling = false;
        if names.get(name).is_some_and(|q| Arc::ptr_eq(q, queue)) {
            names.remove(name);
        }
        true
    }
}

/// Polls `name` for the waiters of its `queue` until none is left.
pub(crate) async fn poll<S: LeaseStore>(
    shared: Weak<Shared<S>>,
    name: LockName,
    queue: Arc<NameQueue>,
) {
    let Some(first) = shared.upgrade() else {
        return;
    };
    let mut backoff = Backoff::new(first.busy_wait);
    let request_timeout = first.timing.request_timeout;
    drop(first);
    // What the last busy poll saw of the holder, since when, and after how
    // long it may be taken over.
    let mut seen: Option<(S::Seen, Instant, Option<Duration>)> = None;
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.is_closing() {
            queue.fail_all(super::locker::shut_down);
            shared.queues.leave_if_idle(&name, &queue);
            return;
        }
        if !queue.has_waiters() && shared.queues.leave_if_idle(&name, &queue) {
            return;
        }
        // Held here: its release wakes us; polling would only be refused.
        if shared.holds.holds(&name) {
            let woken = queue.wake.notified();
            drop(shared);
            let _ = tokio::time::timeout(request_timeout, woken).await;
            backoff.reset();
            continue;
        }
        let hold = shared.store.new_hold();
        let stale = seen
            .as_ref()
            .filter(|(_, since, after)| after.is_some_and(|after| since.elapsed() >= after))
            .map(|(seen, ..)| seen.clone());
        // A read first (unless taking over a stale holder): a busy name
        // costs one read per poll. `sent` is when the take went out, the
        // start of its lease.
        let sent = OnceLock::new();
        let outcome = tokio::time::timeout(request_timeout, async {
            if stale.is_none() {
                let observed = shared.store.observe(&name).await;
                shared.count_observe();
                if let Observed::Held(busy) = observed? {
                    return Ok(Take::Busy(busy));
                }
            }
            let _ = sent.set(Instant::now());
            let taken = shared.store.take(&name, &hold, stale.as_ref()).await;
            shared.count_request();
            taken
        })
        .await;
        let sent = sent.get().copied();
        let pause = match outcome {
            Ok(Ok(Take::Taken { token })) => {
                seen = None;
                backoff.reset();
                let sent = sent.unwrap_or_else(Instant::now);
                let guard = shared.guard(&name, hold, token, sent, sent.elapsed());
                if let Some(unwanted) = queue.hand_over(Ok(guard)) {
                    drop(unwanted); // nobody waits any more: released
                }
                continue;
            }
            Ok(Ok(Take::Busy(Busy {
                seen: now,
                stale_after,
                ..
            }))) => {
                match (&seen, now) {
                    (Some((before, ..)), Some(now)) if *before == now => {}
                    // A takeover refused without word of the new holder: the
                    // stale one is gone. Forget it, or every later poll would
                    // be another take conditioned on it (never a read), and a
                    // new holder that crashed would never be taken over.
                    (_, None) if stale.is_some() => {
                        backoff.reset();
                        seen = None;
                    }
                    // The store cannot tell: the ceiling keeps growing.
                    (_, None) => {}
                    (_, Some(now)) => {
                        // Changed hands (or first seen): start over.
                        backoff.reset();
                        seen = Some((now, Instant::now(), stale_after));
                    }
                }
                backoff.next_pause()
            }
            Ok(Err(StoreError::Refused(reason))) => {
                if sent.is_some() {
                    shared.give_back_uncertain(&name, hold);
                }
                let err = move || LockError::PermissionDenied {
                    message: reason.clone(),
                    source: None,
                };
                queue.fail_all(err);
                continue;
            }
            Ok(Err(err)) => {
                tracing::debug!(lock.name = %name, error = %err, "poll failed");
                if sent.is_some() {
                    shared.give_back_uncertain(&name, hold);
                }
                backoff.next_pause()
            }
            Err(_) => {
                tracing::debug!(lock.name = %name, "poll did not answer in time");
                if sent.is_some() {
                    shared.give_back_uncertain(&name, hold);
                }
                backoff.next_pause()
            }
        };
        // Sleep, or less when a local holder releases the name.
        let woken = queue.wake.notified();
        drop(shared);
        let _ = tokio::time::timeout(pause, woken).await;
    }
}
