//! One watch stream per locker, multiplexed over every name it waits on.
//!
//! A waiter must learn of its predecessor's release fast. A watch opened at a
//! past revision is served by etcd's unsynced-watcher loop, which runs every
//! 100 ms: that is why etcd's Go Mutex stalls ~100 ms per handoff under
//! contention. Here a name's watch is opened at the current revision on a
//! stream that is already open (synced from its first moment), then the name's
//! keys are read once; the read plus every later event gives the name's full
//! queue ([`queue`]), kept up to date in memory (list + watch). Waiters re-check
//! the queue on every change: no polling, no missed wake-up, no extra round
//! trip after a release, and a waiter sees its own key vanish (lease expired)
//! in revision order before it could ever be granted.
//!
//! The stream is owned by one task ([`stream`]) that opens it, routes its
//! answers, and checks that it is alive: a member that is paused, cut off
//! behind a half-open connection, or separated from its leader keeps a stream
//! open and silent. When the stream has been quiet for a while the task asks
//! for a progress report; when none comes in time, it opens a fresh stream
//! (to a member that answers) and moves every name there, resuming each watch
//! from the revision its queue is exact at, so waiters keep their place.
//!
//! A name's watch is shared by all waiters of this locker on that name, and
//! cancelled after it has had no waiter for [`Settings::linger`]. When the
//! locker is dropped or shut down, the task ends and the stream closes with it.

mod queue;
mod stream;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;

pub(crate) use queue::Queue;
use queue::{NameWatch, Phase};

use super::keys::NameKeys;
use crate::LockError;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data whole; recover from poison.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The timing of a watcher, derived from the locker's request timeout.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) request_timeout: Duration,
    /// A key nobody writes, watched to open each stream.
    pub(crate) anchor: Vec<u8>,
    /// Ask for a progress report when the stream was quiet this long.
    pub(crate) probe_after: Duration,
    /// Give the stream up when the report takes longer than this.
    pub(crate) probe_timeout: Duration,
    /// Start another stream beside one that has not opened after this long.
    pub(crate) hedge_after: Duration,
    /// How long a name's watch stays after its last waiter left.
    pub(crate) linger: Duration,
}

impl Settings {
    pub(crate) fn new(request_timeout: Duration, namespace: &str) -> Self {
        Self {
            request_timeout,
            // The namespace itself: lock keys are always longer.
            anchor: namespace.as_bytes().to_vec(),
            probe_after: (request_timeout / 5)
                .clamp(Duration::from_millis(200), Duration::from_secs(1)),
            probe_timeout: (request_timeout / 4)
                .clamp(Duration::from_millis(500), Duration::from_secs(2)),
            hedge_after: Duration::from_millis(100),
            linger: Duration::from_secs(5),
        }
    }

    /// How often the stream task looks at the clock.
    fn tick(&self) -> Duration {
        (self.probe_after / 2).max(Duration::from_millis(20))
    }

    /// The bound on one name's set-up (watch confirmed, keys read).
    fn setup_budget(&self) -> Duration {
        self.request_timeout * 2
    }
}

/// What the stream task is asked to do.
pub(crate) enum Command {
    /// Watch this name.
    Watch(Arc<NameWatch>),
    /// Cancel every watch, close the stream and end.
    Shutdown,
}

/// Counts for diagnostics and tests.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Watches registered on the current stream (the anchor excluded).
    pub(crate) server_watches: AtomicUsize,
    /// Streams given up because they broke or went quiet.
    pub(crate) restarts: AtomicU64,
}

#[derive(Clone)]
pub(crate) struct Watcher {
    hub: Arc<Hub>,
}

struct Hub {
    client: etcd_client::Client,
    settings: Settings,
    names: Mutex<HashMap<Arc<str>, Arc<NameWatch>>>,
    /// The stream task's inbox; started at the first subscription. Dropping
    /// the hub (the locker) drops it, which ends the task.
    commands: Mutex<Option<mpsc::UnboundedSender<Command>>>,
    stats: Arc<Stats>,
}

/// A waiter's hold on a name's queue; the watch is cancelled some time after
/// the last one is dropped.
pub(crate) struct Subscription {
    name: Arc<NameWatch>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.name.remove_user();
    }
}

impl Subscription {
    /// Waits until `decide` returns a value for the name's queue (looked at
    /// only while it is exact). Fails when the watch breaks.
    pub(crate) async fn wait_until<T>(
        &self,
        decide: impl FnMut(&Queue<'_>) -> Option<T>,
    ) -> Result<T, LockError> {
        self.name
            .wait_until(decide)
            .await
            .map_err(|ended| ended_error(&ended))
    }
}

fn broken(reason: &str) -> LockError {
    LockError::Unavailable {
        message: format!("etcd watch broke: {reason}"),
        source: None,
    }
}

/// What a waiter is told when its name's watch ended: broken (subscribe
/// again) or refused (give up).
fn ended_error(phase: &Phase) -> LockError {
    match phase {
        Phase::Refused(reason) => LockError::PermissionDenied {
            message: format!("etcd refused to watch the lock's keys: {reason}"),
            source: None,
        },
        Phase::Broken(reason) => broken(reason),
        Phase::Creating | Phase::Created | Phase::Synced => broken("watch ended"),
    }
}

impl Watcher {
    pub(crate) fn new(client: etcd_client::Client, settings: Settings) -> Self {
        Self {
            hub: Arc::new(Hub {
                client,
                settings,
                names: Mutex::new(HashMap::new()),
                commands: Mutex::new(None),
                stats: Arc::new(Stats::default()),
            }),
        }
    }

    /// How many names are watched right now.
    pub(crate) fn watched_names(&self) -> usize {
        lock(&self.hub.names).len()
    }

    /// `true` while the queue of `keys`' name is watched and exact.
    pub(crate) fn watches(&self, keys: &NameKeys) -> bool {
        lock(&self.hub.names)
            .get(keys.prefix())
            .is_some_and(|name| name.phase() == Phase::Synced)
    }

    pub(crate) fn stats(&self) -> &Stats {
        &self.hub.stats
    }

    /// Ends the stream task: every watch is cancelled with the stream.
    pub(crate) fn shut_down(&self) {
        if let Some(commands) = lock(&self.hub.commands).take() {
            let _ = commands.send(Command::Shutdown);
        }
        let names: Vec<_> = lock(&self.hub.names).drain().map(|(_, n)| n).collect();
        for name in names {
            name.break_with(super::session::SHUT_DOWN);
        }
    }

    fn send(&self, command: Command) -> Result<(), LockError> {
        let mut commands = lock(&self.hub.commands);
        let inbox = match commands.as_ref().filter(|c| !c.is_closed()) {
            Some(inbox) => inbox.clone(),
            None => {
                let (tx, rx) = mpsc::unbounded_channel();
                let task = stream::StreamTask::new(
                    Arc::downgrade(&self.hub),
                    self.hub.client.clone(),
                    self.hub.settings.clone(),
                    Arc::clone(&self.hub.stats),
                );
                tokio::spawn(task.run(rx));
                *commands = Some(tx.clone());
                tx
            }
        };
        inbox
            .send(command)
            .map_err(|_| broken("the watch task stopped"))
    }

    /// Subscribes to the queue of `keys`' name; the first subscriber has its
    /// watch opened and its keys read. Bounded by twice the request timeout.
    pub(crate) async fn subscribe(&self, keys: &NameKeys) -> Result<Subscription, LockError> {
        let (name, is_new) = {
            let mut names = lock(&self.hub.names);
            let (name, is_new) = match names.get(keys.prefix()) {
                Some(existing) if !existing.is_done() => (Arc::clone(existing), false),
                _ => {
                    let fresh = Arc::new(NameWatch::new(keys.clone()));
                    names.insert(Arc::from(keys.prefix()), Arc::clone(&fresh));
                    (fresh, true)
                }
            };
            // Counted under the map's lock, so an idle close cannot race us.
            name.add_user();
            (name, is_new)
        };
        let subscription = Subscription {
            name: Arc::clone(&name),
        };
        if is_new {
            if let Err(err) = self.send(Command::Watch(Arc::clone(&name))) {
                name.break_with(&err.to_string());
                return Err(err);
            }
        }
        let ready = async {
            let mut changed = name.subscribe_changes();
            loop {
                changed.borrow_and_update();
                match name.phase() {
                    Phase::Synced => return Ok(()),
                    ended @ (Phase::Broken(_) | Phase::Refused(_)) => {
                        return Err(ended_error(&ended))
                    }
                    Phase::Creating | Phase::Created => {}
                }
                if changed.changed().await.is_err() {
                    return Err(broken("watch closed"));
                }
            }
        };
        let budget = self.hub.settings.setup_budget();
        match tokio::time::timeout(budget, ready).await {
            Ok(Ok(())) => Ok(subscription),
            Ok(Err(err)) => Err(err),
            Err(_) => {
                // The stream task cancels the watch if it is confirmed later.
                let reason = format!("watch not ready within {budget:?}");
                name.break_with(&reason);
                Err(broken(&reason))
            }
        }
    }
}

impl Hub {
    /// Removes the names nobody used for the linger time from the map (new
    /// waiters get fresh ones) and marks them closed. Returns them.
    fn close_idle(&self) -> Vec<Arc<NameWatch>> {
        let mut names = lock(&self.names);
        let linger = self.settings.linger;
        let mut closed = Vec::new();
        names.retain(|_, name| {
            if name.is_done() || name.idle_for(linger) {
                name.close();
                closed.push(Arc::clone(name));
                false
            } else {
                true
            }
        });
        closed
    }

    fn has_names(&self) -> bool {
        !lock(&self.names).is_empty()
    }
}

#[cfg(all(test, feature = "test-util"))]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Poll;

    use super::*;
    use crate::testing::EtcdServer;
    use crate::LockName;

    fn keys(name: &str) -> NameKeys {
        NameKeys::new("ns/", &LockName::new(name).expect("name"))
    }

    /// Subscriptions given up at once: their names are closed (no linger)
    /// while their watches' confirmations may still be on the way. None of
    /// those watches may stay registered, here or at the server.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watches_confirmed_after_their_name_closed_are_cancelled() {
        let etcd = EtcdServer::start().await.expect("etcd");
        let client = etcd.client().await.expect("client");
        let mut settings = Settings::new(Duration::from_secs(2), "ns/");
        settings.linger = Duration::ZERO;
        let watcher = Watcher::new(client, settings);
        let _keep = watcher.subscribe(&keys("keep")).await.expect("keep");
        for i in 0..100 {
            let name = keys(&format!("n{i}"));
            let mut subscribing = Box::pin(watcher.subscribe(&name));
            std::future::poll_fn(|cx| {
                let _ = Pin::new(&mut subscribing).poll(cx);
                Poll::Ready(())
            })
            .await;
            drop(subscribing);
            if i % 7 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let started = std::time::Instant::now();
        loop {
            let at_server = etcd
                .member_ref()
                .metric("etcd_debugging_mvcc_watcher_total")
                .await
                .expect("metrics")
                .unwrap_or(0.0);
            let ours = watcher
                .stats()
                .server_watches
                .load(std::sync::atomic::Ordering::Relaxed);
            // The anchor and `keep`.
            if ours == 1 && watcher.watched_names() == 1 && at_server == 2.0 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "left registered: {ours} here, {at_server} at the server, {} names",
                watcher.watched_names()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
