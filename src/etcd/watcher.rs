//! One watch stream per locker, multiplexed over every name it waits on.
//!
//! A waiter must learn of its predecessor's release fast. A watch opened at a
//! past revision is served by etcd's unsynced-watcher loop, which runs every
//! 100 ms: that is why etcd's Go Mutex stalls ~100 ms per handoff under
//! contention. Here a name's watch is opened at the current revision on a
//! stream that is already open (synced from its first moment), then the name's
//! keys are read once; the read plus every later event gives the name's full
//! queue, kept up to date in memory (list + watch). Waiters re-check the queue
//! on every change: no polling, no missed wake-up, no extra round trip after a
//! release, and a waiter sees its own key vanish (lease expired) in revision
//! order before it could ever be granted.
//!
//! A name's watch is opened and read by a task of its own (a waiter that
//! gives up cannot leave it half-made), shared by all waiters of this locker
//! on that name, and closed after it has had no waiter for a short while.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use etcd_client::{
    EventType, GetOptions, WatchOptions, WatchRequestSender, WatchResponse, WatchResponseStream,
};
use tokio::sync::watch;

use super::keys::NameKeys;
use super::rpc;
use crate::{LockError, LockMode};

/// How long a name's watch stays open after its last waiter left.
const LINGER: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data whole; recover from poison.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone)]
pub(crate) struct Watcher {
    client: etcd_client::Client,
    request_timeout: Duration,
    hub: Arc<Hub>,
}

struct Hub {
    names: Mutex<HashMap<Arc<str>, Arc<NameWatch>>>,
    sender: tokio::sync::Mutex<Option<StreamTx>>,
    generation: AtomicU64,
}

struct StreamTx {
    tx: WatchRequestSender,
    stream: Arc<StreamState>,
}

/// What the reader of one stream needs to route its responses.
#[derive(Default)]
struct StreamState {
    generation: u64,
    /// Watches whose create request was sent, in order (etcd answers in
    /// order), and whether the stream is closed to new ones.
    creating: Mutex<Creating>,
    by_id: Mutex<HashMap<i64, Arc<NameWatch>>>,
}

#[derive(Default)]
struct Creating {
    closed: bool,
    queue: VecDeque<Arc<NameWatch>>,
}

/// The queue of one name as this locker sees it.
pub(crate) struct NameWatch {
    keys: NameKeys,
    state: Mutex<NameState>,
    changed: watch::Sender<()>,
    users: AtomicUsize,
    epoch: AtomicU64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Creating,
    Created,
    Synced,
    Broken(String),
}

struct NameState {
    phase: Phase,
    watch: Option<(u64, i64)>,
    /// Events up to this revision are already in the initial read.
    snapshot_rev: i64,
    /// The queue is exact as of this revision.
    rev: i64,
    pending: Vec<Change>,
    /// Every key of the name by (create revision, key): one txn can create
    /// several keys at one revision.
    queue: BTreeMap<(i64, Vec<u8>), LockMode>,
    by_key: HashMap<Vec<u8>, i64>,
}

enum Change {
    Put {
        key: Vec<u8>,
        create_rev: i64,
        mod_rev: i64,
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

    /// The modes of the keys created before `rev`, oldest first.
    pub(crate) fn before(&self, rev: i64) -> impl Iterator<Item = LockMode> + '_ {
        self.state.queue.range(..(rev, Vec::new())).map(|(_, m)| *m)
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
                key, create_rev, ..
            } => {
                if let Some(old) = self.by_key.insert(key.clone(), create_rev) {
                    self.queue.remove(&(old, key.clone()));
                }
                self.queue
                    .insert((create_rev, key.clone()), keys.mode_of(&key));
            }
            Change::Delete { key, .. } => {
                if let Some(rev) = self.by_key.remove(&key) {
                    self.queue.remove(&(rev, key));
                }
            }
        }
    }
}

impl NameWatch {
    fn new(keys: NameKeys) -> Arc<Self> {
        Arc::new(Self {
            keys,
            state: Mutex::new(NameState {
                phase: Phase::Creating,
                watch: None,
                snapshot_rev: 0,
                rev: 0,
                pending: Vec::new(),
                queue: BTreeMap::new(),
                by_key: HashMap::new(),
            }),
            changed: watch::channel(()).0,
            users: AtomicUsize::new(0),
            epoch: AtomicU64::new(0),
        })
    }

    fn update(&self, f: impl FnOnce(&mut NameState)) {
        f(&mut lock(&self.state));
        self.changed.send_replace(());
    }

    fn break_with(&self, reason: &str) {
        self.update(|s| {
            s.phase = Phase::Broken(reason.to_string());
            s.pending.clear();
        });
    }

    fn is_broken(&self) -> bool {
        matches!(lock(&self.state).phase, Phase::Broken(_))
    }

    fn on_events(&self, resp: &WatchResponse) {
        self.update(|s| {
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let change = match event.event_type() {
                    EventType::Put => Change::Put {
                        key: kv.key().to_vec(),
                        create_rev: kv.create_revision(),
                        mod_rev: kv.mod_revision(),
                    },
                    EventType::Delete => Change::Delete {
                        key: kv.key().to_vec(),
                        mod_rev: kv.mod_revision(),
                    },
                };
                match s.phase {
                    Phase::Synced => s.apply(&self.keys, change),
                    Phase::Creating | Phase::Created => s.pending.push(change),
                    Phase::Broken(_) => {}
                }
            }
        });
    }

    /// Waits until the phase leaves `Creating`.
    async fn created(&self) -> Result<(), LockError> {
        let mut changed = self.changed.subscribe();
        loop {
            changed.borrow_and_update();
            match &lock(&self.state).phase {
                Phase::Creating => {}
                Phase::Broken(reason) => return Err(broken(reason)),
                _ => return Ok(()),
            }
            if changed.changed().await.is_err() {
                return Err(broken("watch closed"));
            }
        }
    }
}

/// A waiter's hold on a name's queue; the watch closes some time after the
/// last one is dropped.
pub(crate) struct Subscription {
    name: Arc<NameWatch>,
    hub: Weak<Hub>,
    request_timeout: Duration,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.name.users.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let epoch = self.name.epoch.load(Ordering::Acquire);
        let name = Arc::clone(&self.name);
        let hub = self.hub.clone();
        let timeout = self.request_timeout;
        let close = async move {
            tokio::time::sleep(LINGER).await;
            if name.users.load(Ordering::Acquire) == 0
                && name.epoch.load(Ordering::Acquire) == epoch
            {
                if let Some(hub) = hub.upgrade() {
                    hub.close(&name, timeout).await;
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(close)),
            // No runtime to close it from: break it, so the next waiter
            // opens a fresh watch; the stream goes when the locker does.
            Err(_) => self.name.break_with("last waiter left outside a runtime"),
        }
    }
}

impl Subscription {
    /// Waits until `decide` returns a value for the name's queue. Fails when
    /// the watch breaks (stream lost, etcd unreachable).
    pub(crate) async fn wait_until<T>(
        &self,
        mut decide: impl FnMut(&Queue<'_>) -> Option<T>,
    ) -> Result<T, LockError> {
        let mut changed = self.name.changed.subscribe();
        loop {
            changed.borrow_and_update();
            {
                let state = lock(&self.name.state);
                if let Phase::Broken(reason) = &state.phase {
                    return Err(broken(reason));
                }
                if let Some(decision) = decide(&Queue { state: &state }) {
                    return Ok(decision);
                }
            }
            if changed.changed().await.is_err() {
                return Err(broken("watch closed"));
            }
        }
    }
}

fn broken(reason: &str) -> LockError {
    LockError::Unavailable {
        message: format!("etcd watch broke: {reason}"),
        source: None,
    }
}

impl Watcher {
    pub(crate) fn new(client: etcd_client::Client, request_timeout: Duration) -> Self {
        Self {
            client,
            request_timeout,
            hub: Arc::new(Hub {
                names: Mutex::new(HashMap::new()),
                sender: tokio::sync::Mutex::new(None),
                generation: AtomicU64::new(0),
            }),
        }
    }

    /// How many names are watched right now.
    pub(crate) fn watched_names(&self) -> usize {
        lock(&self.hub.names).len()
    }

    /// The budget for opening and reading one name's watch.
    fn setup_budget(&self) -> Duration {
        self.request_timeout * 2
    }

    /// Subscribes to the queue of `keys`' name; the first subscriber starts
    /// the task that opens its watch and reads its keys. Bounded by twice the
    /// request timeout.
    pub(crate) async fn subscribe(&self, keys: &NameKeys) -> Result<Subscription, LockError> {
        let (name, is_new) = {
            let mut names = lock(&self.hub.names);
            let (name, is_new) = match names.get(keys.prefix()) {
                Some(existing) if !existing.is_broken() => (Arc::clone(existing), false),
                _ => {
                    let fresh = NameWatch::new(keys.clone());
                    names.insert(Arc::from(keys.prefix()), Arc::clone(&fresh));
                    (fresh, true)
                }
            };
            // Counted under the map's lock, so an idle close cannot race us.
            name.users.fetch_add(1, Ordering::AcqRel);
            name.epoch.fetch_add(1, Ordering::AcqRel);
            (name, is_new)
        };
        let subscription = Subscription {
            name: Arc::clone(&name),
            hub: Arc::downgrade(&self.hub),
            request_timeout: self.request_timeout,
        };
        if is_new {
            let (this, name) = (self.clone(), Arc::clone(&name));
            tokio::spawn(async move {
                let budget = this.setup_budget();
                let outcome = tokio::time::timeout(budget, this.set_up(&name)).await;
                let failure = match outcome {
                    Ok(Ok(())) => return,
                    Ok(Err(err)) => err.to_string(),
                    Err(_) => format!("watch not ready within {budget:?}"),
                };
                name.break_with(&failure);
            });
        }
        let ready = async {
            let mut changed = name.changed.subscribe();
            loop {
                changed.borrow_and_update();
                match &lock(&name.state).phase {
                    Phase::Synced => return Ok(()),
                    Phase::Broken(reason) => return Err(broken(reason)),
                    _ => {}
                }
                if changed.changed().await.is_err() {
                    return Err(broken("watch closed"));
                }
            }
        };
        // The set-up task breaks the name when its own budget runs out; this
        // bound only adds slack for scheduling.
        let budget = self.setup_budget() + self.request_timeout;
        match tokio::time::timeout(budget, ready).await {
            Ok(Ok(())) => Ok(subscription),
            Ok(Err(err)) => Err(err),
            Err(_) => {
                name.break_with("watch not ready in time");
                Err(broken("watch not ready in time"))
            }
        }
    }

    /// Opens the name's watch on the shared stream, waits for etcd to confirm
    /// it, then reads the name's keys and merges the events that arrived
    /// meanwhile.
    async fn set_up(&self, name: &Arc<NameWatch>) -> Result<(), LockError> {
        self.send_create(name).await?;
        name.created().await?;
        let kv = self.client.kv_client();
        let snapshot = rpc::idempotent(self.request_timeout, "range", || {
            let (mut kv, prefix) = (kv.clone(), name.keys.prefix().to_string());
            async move {
                kv.get(
                    prefix,
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )
                .await
            }
        })
        .await?;
        let rev = snapshot.header().map_or(0, |h| h.revision());
        name.update(|s| {
            if s.phase != Phase::Created {
                return; // broken meanwhile
            }
            s.snapshot_rev = rev;
            s.rev = rev;
            for kv in snapshot.kvs() {
                let key = kv.key().to_vec();
                s.queue
                    .insert((kv.create_revision(), key.clone()), name.keys.mode_of(&key));
                s.by_key.insert(key, kv.create_revision());
            }
            for change in std::mem::take(&mut s.pending) {
                s.apply(&name.keys, change);
            }
            s.phase = Phase::Synced;
        });
        Ok(())
    }

    async fn send_create(&self, name: &Arc<NameWatch>) -> Result<(), LockError> {
        let options = WatchOptions::new().with_prefix();
        let prefix = name.keys.prefix().to_string();
        let mut sender = self.hub.sender.lock().await;
        if let Some(open) = sender.as_mut() {
            let queued = {
                let mut creating = lock(&open.stream.creating);
                if !creating.closed {
                    creating.queue.push_back(Arc::clone(name));
                }
                !creating.closed
            };
            if queued
                && open
                    .tx
                    .watch(prefix.clone(), Some(options.clone()))
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            // The stream is gone; its reader breaks what it carried. Open another.
            *sender = None;
        }
        let stream = Arc::new(StreamState {
            generation: self.hub.generation.fetch_add(1, Ordering::AcqRel) + 1,
            ..StreamState::default()
        });
        lock(&stream.creating).queue.push_back(Arc::clone(name));
        let mut client = self.client.watch_client();
        let opened = rpc::with_timeout(self.request_timeout, "watch", async {
            client.watch(prefix, Some(options)).await
        })
        .await?;
        let (tx, rx) = opened.split();
        tokio::spawn(read_stream(
            Arc::downgrade(&self.hub),
            Arc::clone(&stream),
            rx,
        ));
        *sender = Some(StreamTx { tx, stream });
        Ok(())
    }
}

impl Hub {
    /// Closes the watch of an idle name.
    async fn close(&self, name: &Arc<NameWatch>, timeout: Duration) {
        {
            let mut names = lock(&self.names);
            if name.users.load(Ordering::Acquire) != 0 {
                return;
            }
            if names
                .get(name.keys.prefix())
                .is_some_and(|n| Arc::ptr_eq(n, name))
            {
                names.remove(name.keys.prefix());
            }
        }
        let watch = lock(&name.state).watch;
        name.break_with("closed while idle");
        let Some((generation, id)) = watch else {
            return;
        };
        let cancel = async {
            let mut sender = self.sender.lock().await;
            if let Some(open) = sender.as_mut() {
                if open.stream.generation == generation {
                    lock(&open.stream.by_id).remove(&id);
                    if open.tx.cancel(id).await.is_err() {
                        *sender = None;
                    }
                }
            }
        };
        // Best effort: a watch left open only costs events for an idle name.
        let _ = tokio::time::timeout(timeout, cancel).await;
    }
}

/// Routes one stream's responses to the names' queues until it ends, then
/// breaks every watch it carried so their waiters resubscribe.
async fn read_stream(hub: Weak<Hub>, stream: Arc<StreamState>, mut rx: WatchResponseStream) {
    let reason = loop {
        let resp = match rx.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => break "watch stream ended".to_string(),
            Err(err) => break format!("watch stream failed: {err}"),
        };
        if hub.strong_count() == 0 {
            break "locker dropped".to_string();
        }
        let id = resp.watch_id();
        if resp.created() {
            let Some(name) = lock(&stream.creating).queue.pop_front() else {
                continue;
            };
            if resp.canceled() {
                name.break_with(resp.cancel_reason());
                continue;
            }
            lock(&stream.by_id).insert(id, Arc::clone(&name));
            name.update(|s| {
                s.watch = Some((stream.generation, id));
                if s.phase == Phase::Creating {
                    s.phase = Phase::Created;
                }
            });
        }
        let name = lock(&stream.by_id).get(&id).cloned();
        let Some(name) = name else { continue };
        if !resp.events().is_empty() {
            name.on_events(&resp);
        }
        if resp.canceled() {
            lock(&stream.by_id).remove(&id);
            let why = match resp.compact_revision() {
                0 => resp.cancel_reason().to_string(),
                rev => format!("compacted at revision {rev}"),
            };
            name.break_with(&why);
        }
    };
    tracing::debug!(generation = stream.generation, %reason, "watch stream closed");
    // No new watch may join this stream from here on.
    if let Some(hub) = hub.upgrade() {
        let mut sender = hub.sender.lock().await;
        if sender
            .as_ref()
            .is_some_and(|s| s.stream.generation == stream.generation)
        {
            *sender = None;
        }
    }
    let mut orphans: Vec<Arc<NameWatch>> = {
        let mut creating = lock(&stream.creating);
        creating.closed = true;
        creating.queue.drain(..).collect()
    };
    orphans.extend(lock(&stream.by_id).drain().map(|(_, n)| n));
    for name in orphans {
        name.break_with(&reason);
    }
}
