//! The locks a store locker holds, and the one task that renews them all.
//!
//! Each hold is renewed every cadence. After a renewal the store confirmed,
//! the hold's local deadline becomes `sent + lease - margin`, timed from when
//! the request was *sent*: the store cannot expire the lease before
//! `sent + lease`, so a holder that trusts its lock only until then gives it
//! up before anyone else can take it. A renewal the store refuses (the lease
//! was broken, or taken after it expired) fires the guard's lost signal at
//! once; one that fails otherwise is retried, each time within at most half
//! the time left, and the deadline fires the signal if none succeeds. A lease
//! that ran out may still be renewed by its old holder when nobody took it
//! (Azure does that): the local deadline, not the renewal's success, decides.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{LeaseStore, StoreError};
use crate::lost::{LostSignal, LostTrigger};
use crate::{metrics, LockName};

/// The most renewals in flight at once.
const PARALLEL: usize = 64;
/// The longest pause before retrying a failed renewal.
const RETRY: Duration = Duration::from_millis(250);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data whole; recover from poison.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Entry<H> {
    name: LockName,
    hold: H,
    trigger: LostTrigger,
    /// When the next renewal is due.
    next: Instant,
    /// `None` for a lease that never expires.
    deadline: Option<Instant>,
    renewing: bool,
}

/// A renewal to send: the hold's id, its name and the hold.
type Due<H> = (u64, LockName, H, Option<Instant>);

/// Every hold of one locker.
pub(crate) struct Holds<S: LeaseStore> {
    entries: Mutex<Map<S::Hold>>,
    /// Woken when a hold is added (the renewal task may need to wake earlier).
    added: Notify,
}

struct Map<H> {
    next_id: u64,
    entries: HashMap<u64, Entry<H>>,
    /// The hold of each name this locker holds (exclusive: one per name).
    by_name: HashMap<LockName, u64>,
}

/// What the renewal task needs of its locker.
pub(crate) struct Renewer<S: LeaseStore> {
    pub(crate) store: Arc<S>,
    pub(crate) duration: Option<Duration>,
    pub(crate) cadence: Duration,
    pub(crate) margin: Duration,
    pub(crate) request_timeout: Duration,
}

impl<S: LeaseStore> Holds<S> {
    pub(crate) fn new() -> Self {
        Self {
            entries: Mutex::new(Map {
                next_id: 0,
                entries: HashMap::new(),
                by_name: HashMap::new(),
            }),
            added: Notify::new(),
        }
    }

    /// Registers a hold taken by a request sent at `sent`; returns its id and
    /// the guard's lost signal.
    pub(crate) fn add(
        &self,
        name: &LockName,
        hold: S::Hold,
        sent: Instant,
        renewer: &Renewer<S>,
    ) -> (u64, LostSignal) {
        let (trigger, signal) = LostSignal::new();
        let deadline = renewer
            .duration
            .map(|d| sent + d.saturating_sub(renewer.margin));
        if let Some(at) = deadline {
            trigger.set_deadline(at.into_std());
        }
        let mut map = lock(&self.entries);
        map.next_id += 1;
        let id = map.next_id;
        map.entries.insert(
            id,
            Entry {
                name: name.clone(),
                hold,
                trigger,
                next: sent + renewer.cadence,
                deadline,
                renewing: false,
            },
        );
        map.by_name.insert(name.clone(), id);
        drop(map);
        self.added.notify_one();
        (id, signal)
    }

    /// Stops renewing a hold and hands it back, to be released.
    pub(crate) fn remove(&self, id: u64) -> Option<(LockName, S::Hold)> {
        let mut map = lock(&self.entries);
        let entry = map.entries.remove(&id)?;
        if map.by_name.get(&entry.name) == Some(&id) {
            map.by_name.remove(&entry.name);
        }
        Some((entry.name, entry.hold))
    }

    /// `true` while this locker holds `name`.
    pub(crate) fn holds(&self, name: &LockName) -> bool {
        lock(&self.entries).by_name.contains_key(name)
    }

    /// The fencing token is not kept here; the holder's key is its name.
    pub(crate) fn len(&self) -> usize {
        lock(&self.entries).entries.len()
    }

    /// Every hold, removed (for shutdown).
    pub(crate) fn drain(&self) -> Vec<(LockName, S::Hold, LostTrigger)> {
        let mut map = lock(&self.entries);
        map.by_name.clear();
        map.entries
            .drain()
            .map(|(_, e)| (e.name, e.hold, e.trigger))
            .collect()
    }

    /// Up to `room` due renewals (marked as under way, with their local
    /// deadlines), and when the next one not yet due is due. Due renewals
    /// beyond `room` wait for a renewal in flight to end (which wakes the
    /// task).
    fn due(&self, now: Instant, room: usize) -> (Vec<Due<S::Hold>>, Option<Instant>) {
        let mut map = lock(&self.entries);
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        for (id, entry) in map.entries.iter_mut() {
            if entry.renewing {
                continue;
            }
            if entry.next > now {
                next = Some(next.map_or(entry.next, |n| n.min(entry.next)));
            } else if due.len() < room {
                entry.renewing = true;
                due.push((*id, entry.name.clone(), entry.hold.clone(), entry.deadline));
            }
        }
        (due, next)
    }

    /// Applies the outcome of a renewal sent at `sent`.
    fn renewed(
        &self,
        id: u64,
        sent: Instant,
        outcome: Result<S::Hold, StoreError>,
        renewer: &Renewer<S>,
        backend: &'static str,
    ) {
        let mut map = lock(&self.entries);
        let Some(entry) = map.entries.get_mut(&id) else {
            return; // released meanwhile
        };
        entry.renewing = false;
        let now = Instant::now();
        match outcome {
            Ok(hold) => {
                metrics::lease_renewal(backend, true);
                entry.hold = hold;
                entry.deadline = renewer
                    .duration
                    .map(|d| sent + d.saturating_sub(renewer.margin));
                if let Some(at) = entry.deadline {
                    entry.trigger.set_deadline(at.into_std());
                }
                entry.next = sent + renewer.cadence;
            }
            Err(StoreError::Gone(reason)) => {
                metrics::lease_renewal(backend, false);
                metrics::lease_lost(backend);
                tracing::warn!(lock.name = %entry.name, %reason, "lock lost: the store refused its renewal");
                entry
                    .trigger
                    .trigger(format!("the store refused the renewal: {reason}"));
                // No more renewals; the guard's release still gives it back.
                entry.next = Instant::now() + Duration::from_secs(86_400 * 365);
            }
            Err(err) => {
                metrics::lease_renewal(backend, false);
                tracing::debug!(lock.name = %entry.name, error = %err, "renewal failed; retrying");
                let left = entry
                    .deadline
                    .map_or(RETRY * 4, |d| d.saturating_duration_since(now));
                if left.is_zero() {
                    if !entry.trigger.has_fired() {
                        metrics::lease_lost(backend);
                        tracing::warn!(lock.name = %entry.name, "lock lost: not renewed before its local deadline");
                        entry
                            .trigger
                            .trigger("the lease was not renewed before its local deadline");
                    }
                    entry.next = now + Duration::from_secs(86_400 * 365);
                } else {
                    entry.next = now + RETRY.min(left / 4);
                }
            }
        }
    }
}

impl<S: LeaseStore> Renewer<S> {
    /// One renewal round for one hold: at most half the time left before
    /// its deadline, within the request timeout.
    fn budget(&self, deadline: Option<Instant>, now: Instant) -> Duration {
        match deadline {
            Some(at) => self
                .request_timeout
                .min(at.saturating_duration_since(now) / 2),
            None => self.request_timeout,
        }
    }
}

/// Renews every hold of `holds` until the locker is gone or `stop` fires.
pub(crate) async fn run<S: LeaseStore>(
    holds: Weak<Holds<S>>,
    renewer: Renewer<S>,
    stop: Arc<Notify>,
) {
    let backend = renewer.store.backend();
    let mut under_way: JoinSet<(u64, Instant, Result<S::Hold, StoreError>)> = JoinSet::new();
    loop {
        let Some(holds_now) = holds.upgrade() else {
            return;
        };
        let now = Instant::now();
        let (due, next) = holds_now.due(now, PARALLEL.saturating_sub(under_way.len()));
        for (id, name, hold, deadline) in due {
            let budget = renewer.budget(deadline, now);
            let store = Arc::clone(&renewer.store);
            under_way.spawn(async move {
                let sent = Instant::now();
                let outcome = match tokio::time::timeout(budget, store.renew(&name, &hold)).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(StoreError::Unavailable {
                        message: format!("the renewal did not answer within {budget:?}"),
                        source: None,
                    }),
                };
                (id, sent, outcome)
            });
        }
        let wake = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            // The locker shut down or was dropped.
            () = stop.notified() => return,
            () = holds_now.added.notified() => {}
            () = tokio::time::sleep_until(wake) => {}
            Some(done) = under_way.join_next(), if !under_way.is_empty() => {
                if let Ok((id, sent, outcome)) = done {
                    holds_now.renewed(id, sent, outcome, &renewer, backend);
                }
            }
        }
    }
}
