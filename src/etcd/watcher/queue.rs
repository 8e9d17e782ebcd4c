//! The queue of one name, as this locker sees it: the name's keys by create
//! revision, kept exact by a list read plus every later watch event.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use etcd_client::{EventType, WatchResponse};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::etcd::keys::NameKeys;
use crate::LockMode;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data whole; recover from poison.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a name's watch stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Its create request is on its way; events are kept aside.
    Creating,
    /// etcd confirmed the watch; the name's keys are being read.
    Created,
    /// The queue is exact (as of [`Queue::revision`]) and kept so.
    Synced,
    /// Given up: waiters subscribe again.
    Broken(String),
    /// Refused for good (permission denied): waiters fail.
    Refused(String),
}

/// One key in a name's queue.
#[derive(Debug, Clone, Copy)]
struct Entry {
    mode: LockMode,
    lease: i64,
}

pub(crate) struct NameState {
    pub(crate) phase: Phase,
    /// Bumped whenever the watch is created anew: a list read made for an
    /// earlier watch is not merged.
    pub(crate) epoch: u64,
    /// Events up to this revision are already in the initial read.
    snapshot_rev: i64,
    /// The queue is exact as of this revision.
    rev: i64,
    pending: Vec<Change>,
    /// Every key of the name by (create revision, key): one txn can create
    /// several keys at one revision.
    queue: BTreeMap<(i64, Vec<u8>), Entry>,
    by_key: HashMap<Vec<u8>, i64>,
}

enum Change {
    Put {
        key: Vec<u8>,
        create_rev: i64,
        mod_rev: i64,
        lease: i64,
    },
    Delete {
        key: Vec<u8>,
        mod_rev: i64,
    },
}

impl Change {
    fn mod_rev(&self) -> i64 {
        match self {
            Self::Put { mod_rev, .. } | Self::Delete { mod_rev, .. } => *mod_rev,
        }
    }
}

/// A key of a name's queue, as shown to a waiter's decision.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueuedKey<'a> {
    pub(crate) key: &'a [u8],
    pub(crate) create_revision: i64,
    pub(crate) mode: LockMode,
    pub(crate) lease: i64,
}

/// A read-only view of a name's queue, given to a waiter's decision.
pub(crate) struct Queue<'a> {
    state: &'a NameState,
}

impl Queue<'_> {
    /// The revision the queue is exact at.
    pub(crate) fn revision(&self) -> i64 {
        self.state.rev
    }

    /// `true` while `key` is in the queue.
    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        self.state.by_key.contains_key(key)
    }

    /// Every key, oldest first.
    pub(crate) fn all(&self) -> impl Iterator<Item = QueuedKey<'_>> + '_ {
        self.before(i64::MAX)
    }

    /// The keys created before `rev`, oldest first.
    pub(crate) fn before(&self, rev: i64) -> impl Iterator<Item = QueuedKey<'_>> + '_ {
        self.state
            .queue
            .range(..(rev, Vec::new()))
            .map(|((create_revision, key), entry)| QueuedKey {
                key,
                create_revision: *create_revision,
                mode: entry.mode,
                lease: entry.lease,
            })
    }
}

impl NameState {
    fn apply(&mut self, keys: &NameKeys, change: Change) {
        // Events of one revision (a lease revoke deleting several keys, a
        // txn) share their revision: skip only what the initial read had.
        if change.mod_rev() <= self.snapshot_rev {
            return;
        }
        self.rev = self.rev.max(change.mod_rev());
        match change {
            Change::Put {
                key,
                create_rev,
                lease,
                ..
            } => {
                if let Some(old) = self.by_key.insert(key.clone(), create_rev) {
                    self.queue.remove(&(old, key.clone()));
                }
                let mode = keys.mode_of(&key);
                self.queue.insert((create_rev, key), Entry { mode, lease });
            }
            Change::Delete { key, .. } => {
                if let Some(rev) = self.by_key.remove(&key) {
                    self.queue.remove(&(rev, key));
                }
            }
        }
    }

    fn is_ended(&self) -> bool {
        matches!(self.phase, Phase::Broken(_) | Phase::Refused(_))
    }

    /// The revision to watch from to pick up where this queue is exact: the
    /// events of that revision again (they are idempotent here), in case a
    /// revision's events were split over two responses.
    pub(crate) fn resume_revision(&self) -> i64 {
        self.rev.max(1)
    }
}

/// A name's queue and who uses it.
pub(crate) struct NameWatch {
    pub(crate) keys: NameKeys,
    state: Mutex<NameState>,
    changed: watch::Sender<()>,
    /// Subscriptions alive right now.
    pub(crate) users: AtomicUsize,
    /// Since when nobody uses it (`None` while somebody does).
    idle_since: Mutex<Option<Instant>>,
    /// Set once it was closed as idle: it must not stay registered.
    closed: AtomicBool,
    /// How often in a row etcd refused to create its watch.
    refusals: AtomicU32,
}

impl NameWatch {
    pub(crate) fn new(keys: NameKeys) -> Self {
        Self {
            keys,
            state: Mutex::new(NameState {
                phase: Phase::Creating,
                epoch: 0,
                snapshot_rev: 0,
                rev: 0,
                pending: Vec::new(),
                queue: BTreeMap::new(),
                by_key: HashMap::new(),
            }),
            changed: watch::channel(()).0,
            users: AtomicUsize::new(0),
            idle_since: Mutex::new(None),
            closed: AtomicBool::new(false),
            refusals: AtomicU32::new(0),
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, NameState> {
        lock(&self.state)
    }

    /// Changes the state and wakes every waiter.
    pub(crate) fn update<T>(&self, f: impl FnOnce(&mut NameState) -> T) -> T {
        let out = f(&mut lock(&self.state));
        self.changed.send_replace(());
        out
    }

    pub(crate) fn subscribe_changes(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    pub(crate) fn phase(&self) -> Phase {
        lock(&self.state).phase.clone()
    }

    pub(crate) fn break_with(&self, reason: &str) {
        self.end(Phase::Broken(reason.to_string()));
    }

    /// etcd refused the watch for good: its waiters fail rather than
    /// subscribe again.
    pub(crate) fn refuse(&self, reason: &str) {
        self.end(Phase::Refused(reason.to_string()));
    }

    fn end(&self, phase: Phase) {
        self.update(|s| {
            if !s.is_ended() {
                s.phase = phase;
            }
            s.pending.clear();
        });
    }

    pub(crate) fn is_broken(&self) -> bool {
        lock(&self.state).is_ended()
    }

    /// Counts a refused create; returns how many in a row.
    pub(crate) fn refused_once_more(&self) -> u32 {
        self.refusals.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// `true` once the name has no use: closed as idle, or broken (its
    /// waiters subscribe to a fresh one).
    pub(crate) fn is_done(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.is_broken()
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.break_with("closed while idle");
    }

    /// One more subscription.
    pub(crate) fn add_user(&self) {
        self.users.fetch_add(1, Ordering::AcqRel);
        *lock(&self.idle_since) = None;
    }

    /// One subscription fewer; the last one starts the idle clock.
    pub(crate) fn remove_user(&self) {
        if self.users.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.idle_since) = Some(Instant::now());
        }
    }

    /// `true` when nobody used the name for `linger`.
    pub(crate) fn idle_for(&self, linger: std::time::Duration) -> bool {
        self.users.load(Ordering::Acquire) == 0
            && lock(&self.idle_since).is_some_and(|since| since.elapsed() >= linger)
    }

    /// The watch will be created anew from scratch: forget the queue, keep
    /// events aside again, and read the keys once it is confirmed.
    pub(crate) fn restart(&self) {
        self.update(|s| {
            if s.is_ended() {
                return;
            }
            s.phase = Phase::Creating;
            s.epoch += 1;
            s.pending.clear();
            s.queue.clear();
            s.by_key.clear();
            s.snapshot_rev = 0;
            s.rev = 0;
        });
    }

    /// etcd confirmed the watch. Returns the epoch a list read must match
    /// when this is a fresh watch (`None` for a resumed one).
    pub(crate) fn created(&self) -> Option<u64> {
        self.refusals.store(0, Ordering::Release);
        self.update(|s| match s.phase {
            Phase::Creating => {
                s.phase = Phase::Created;
                Some(s.epoch)
            }
            _ => None,
        })
    }

    /// Merges the initial read (taken after the watch was confirmed) with the
    /// events that arrived meanwhile. Ignored if the watch was re-created
    /// since (`epoch`) or the name broke.
    pub(crate) fn synced(&self, epoch: u64, snapshot: &etcd_client::GetResponse) -> bool {
        let rev = snapshot.header().map_or(0, |h| h.revision());
        self.update(|s| {
            if s.phase != Phase::Created || s.epoch != epoch {
                return false;
            }
            s.snapshot_rev = rev;
            s.rev = rev;
            for kv in snapshot.kvs() {
                let key = kv.key().to_vec();
                let entry = Entry {
                    mode: self.keys.mode_of(&key),
                    lease: kv.lease(),
                };
                s.queue.insert((kv.create_revision(), key.clone()), entry);
                s.by_key.insert(key, kv.create_revision());
            }
            for change in std::mem::take(&mut s.pending) {
                s.apply(&self.keys, change);
            }
            s.phase = Phase::Synced;
            true
        })
    }

    pub(crate) fn on_events(&self, resp: &WatchResponse) {
        self.update(|s| {
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let change = match event.event_type() {
                    EventType::Put => Change::Put {
                        key: kv.key().to_vec(),
                        create_rev: kv.create_revision(),
                        mod_rev: kv.mod_revision(),
                        lease: kv.lease(),
                    },
                    EventType::Delete => Change::Delete {
                        key: kv.key().to_vec(),
                        mod_rev: kv.mod_revision(),
                    },
                };
                match s.phase {
                    Phase::Synced => s.apply(&self.keys, change),
                    Phase::Creating | Phase::Created => s.pending.push(change),
                    Phase::Broken(_) | Phase::Refused(_) => {}
                }
            }
        });
    }

    /// Waits until `decide` returns a value for the synced queue. Fails when
    /// the name breaks, or is refused.
    pub(crate) async fn wait_until<T>(
        &self,
        mut decide: impl FnMut(&Queue<'_>) -> Option<T>,
    ) -> Result<T, Phase> {
        let mut changed = self.changed.subscribe();
        loop {
            changed.borrow_and_update();
            {
                let state = lock(&self.state);
                match &state.phase {
                    ended @ (Phase::Broken(_) | Phase::Refused(_)) => return Err(ended.clone()),
                    // Exact: decide. Otherwise (being re-created) wait.
                    Phase::Synced => {
                        if let Some(decision) = decide(&Queue { state: &state }) {
                            return Ok(decision);
                        }
                    }
                    Phase::Creating | Phase::Created => {}
                }
            }
            if changed.changed().await.is_err() {
                return Err(Phase::Broken("watch closed".to_string()));
            }
        }
    }
}
