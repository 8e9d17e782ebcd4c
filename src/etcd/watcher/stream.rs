//! The task that owns a locker's watch stream.
//!
//! It opens the stream (hedged: a member that does not confirm within a
//! moment gets a sibling attempt on another member), sends each name's create
//! request, routes etcd's answers to the names' queues, cancels the watches
//! of names nobody waits on, and checks that the stream is alive: after
//! [`Settings::probe_after`] of silence it sends a progress request (etcd
//! answers those on the stream itself), and a stream that stays silent for
//! [`Settings::probe_timeout`] more, or that ends or fails, is replaced. Its
//! names move to the new stream: a name whose queue was exact resumes its
//! watch from the revision it is exact at (etcd replays what happened since),
//! any other name starts over with a fresh watch and read.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use etcd_client::{
    GetOptions, WatchOptions, WatchRequestSender, WatchResponse, WatchResponseStream,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::queue::{NameWatch, Phase};
use super::{Command, Hub, Settings, Stats};
use crate::etcd::rpc::{self, Hedge};
use crate::etcd::BACKEND;
use crate::metrics;
use crate::LockError;

/// How often in a row a stream may be replaced before its names are given
/// up (their waiters subscribe again, with a backoff of their own).
const MAX_REHOMES: u32 = 3;

pub(super) struct StreamTask {
    hub: Weak<Hub>,
    client: etcd_client::Client,
    settings: Settings,
    stats: Arc<Stats>,
    stream: Option<Open>,
    /// Names whose stream went away, to move to the next one.
    homeless: Vec<Arc<NameWatch>>,
    /// Streams replaced since one carried a name for good.
    rehomes: u32,
}

/// An open stream and what it carries.
struct Open {
    tx: WatchRequestSender,
    rx: WatchResponseStream,
    anchor_id: i64,
    /// Names whose create request was sent, in order (etcd answers in order).
    creating: VecDeque<Arc<NameWatch>>,
    by_id: HashMap<i64, Arc<NameWatch>>,
    last_heard: Instant,
    probe_sent: Option<Instant>,
}

async fn next_answer(
    stream: &mut Option<Open>,
) -> Result<Option<WatchResponse>, etcd_client::Error> {
    match stream {
        Some(open) => open.rx.message().await,
        None => std::future::pending().await,
    }
}

impl StreamTask {
    pub(super) fn new(
        hub: Weak<Hub>,
        client: etcd_client::Client,
        settings: Settings,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            hub,
            client,
            settings,
            stats,
            stream: None,
            homeless: Vec::new(),
            rehomes: 0,
        }
    }

    /// Runs until the locker shuts down or is dropped (its hub holds the
    /// only sender of `commands`).
    pub(super) async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let reason = loop {
            if !self.homeless.is_empty() {
                self.rehome().await;
            }
            let tick = self.next_tick();
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Watch(name)) => self.watch(name).await,
                    Some(Command::Shutdown) => break super::super::session::SHUT_DOWN,
                    None => break "the locker was dropped",
                },
                answer = next_answer(&mut self.stream) => self.on_answer(answer).await,
                () = sleep_until(tick) => self.on_tick().await,
            }
        };
        // Dropping the stream cancels every watch on it at the server.
        if let Some(open) = self.stream.take() {
            for name in open.by_id.values().chain(&open.creating) {
                name.break_with(reason);
            }
        }
        for name in self.homeless.drain(..) {
            name.break_with(reason);
        }
        self.stats.server_watches.store(0, Ordering::Relaxed);
        tracing::debug!(reason, "watch task ended");
    }

    /// When to look at the clock next: only while there is something to
    /// look after.
    fn next_tick(&self) -> Option<Instant> {
        let busy = self.stream.is_some() || self.hub.upgrade().is_some_and(|h| h.has_names());
        busy.then(|| Instant::now() + self.settings.tick())
    }

    async fn watch(&mut self, name: Arc<NameWatch>) {
        if name.is_done() {
            return;
        }
        if self.stream.is_none() {
            if let Err(err) = self.open().await {
                end(&name, &err);
                return;
            }
        }
        self.create(name, None).await;
    }

    /// Opens a stream with a watch on the anchor key, hedged, within one
    /// request timeout.
    async fn open(&mut self) -> Result<(), LockError> {
        let hedge =
            Hedge::for_timeout(self.settings.request_timeout).after(self.settings.hedge_after);
        let anchor = self.settings.anchor.clone();
        let opened = rpc::hedged(
            hedge,
            "watch",
            || {
                let (mut client, anchor) = (self.client.watch_client(), anchor.clone());
                let anchor_for_error = anchor.clone();
                async move {
                    let mut stream = client.watch(anchor, None).await?;
                    match stream.message().await? {
                        Some(resp) if resp.created() && !resp.canceled() => {
                            Ok((stream, resp.watch_id()))
                        }
                        // A role without the namespace: retrying cannot help.
                        Some(resp) if is_refusal(resp.cancel_reason()) => {
                            Err(etcd_client::Error::GRpcStatus(tonic::Status::permission_denied(
                                format!(
                                    "{} (the role needs readwrite on the whole namespace prefix {:?})",
                                    resp.cancel_reason(),
                                    String::from_utf8_lossy(&anchor_for_error),
                                ),
                            )))
                        }
                        Some(resp) => Err(etcd_client::Error::WatchError(format!(
                            "watch refused: {}",
                            resp.cancel_reason()
                        ))),
                        None => Err(etcd_client::Error::WatchError("stream closed".into())),
                    }
                }
            },
            |_| {}, // a stream that opened too late is dropped, which closes it
        )
        .await;
        match opened {
            Ok(((stream, anchor_id), _)) => {
                let (tx, rx) = stream.split();
                self.stream = Some(Open {
                    tx,
                    rx,
                    anchor_id,
                    creating: VecDeque::new(),
                    by_id: HashMap::new(),
                    last_heard: Instant::now(),
                    probe_sent: None,
                });
                Ok(())
            }
            Err(err) => Err(err),
        }
    }

    /// Sends a name's create request: from `start` (resuming a queue that is
    /// exact up to it) or from now (a fresh watch, read once confirmed).
    /// Returns `false` when the stream died meanwhile.
    async fn create(&mut self, name: Arc<NameWatch>, start: Option<i64>) -> bool {
        let Some(open) = self.stream.as_mut() else {
            self.homeless.push(name);
            return false;
        };
        let mut options = WatchOptions::new().with_prefix();
        if let Some(revision) = start {
            options = options.with_start_revision(revision);
        }
        let prefix = name.keys.prefix().to_string();
        open.creating.push_back(name);
        let sent = tokio::time::timeout(
            self.settings.probe_timeout,
            open.tx.watch(prefix, Some(options)),
        )
        .await;
        if matches!(sent, Ok(Ok(()))) {
            return true;
        }
        self.stream_died("could not send a watch request");
        false
    }

    /// Moves the names of a dead stream to a new one.
    async fn rehome(&mut self) {
        let mut names: Vec<_> = std::mem::take(&mut self.homeless)
            .into_iter()
            .filter(|n| !n.is_done())
            .collect();
        names.dedup_by(|a, b| Arc::ptr_eq(a, b));
        if names.is_empty() {
            return;
        }
        self.rehomes += 1;
        if self.rehomes > MAX_REHOMES {
            self.rehomes = 0;
            for name in names {
                name.break_with("the watch stream kept failing");
            }
            return;
        }
        if self.stream.is_none() {
            if let Err(err) = self.open().await {
                for name in names {
                    end(&name, &err);
                }
                return;
            }
        }
        let mut names = names.into_iter();
        for name in names.by_ref() {
            let start = {
                let state = name.state();
                (state.phase == Phase::Synced).then(|| state.resume_revision())
            };
            if start.is_none() {
                name.restart();
            }
            if !self.create(name, start).await {
                break;
            }
        }
        self.homeless.extend(names);
    }

    async fn on_answer(&mut self, answer: Result<Option<WatchResponse>, etcd_client::Error>) {
        let resp = match answer {
            Ok(Some(resp)) => resp,
            Ok(None) => return self.stream_died("the watch stream ended"),
            Err(err) => return self.stream_died(&format!("the watch stream failed: {err}")),
        };
        let Some(open) = self.stream.as_mut() else {
            return;
        };
        open.last_heard = Instant::now();
        open.probe_sent = None;
        let id = resp.watch_id();
        if resp.created() {
            let Some(name) = open.creating.pop_front() else {
                return;
            };
            if resp.canceled() {
                // Refused: a resumed watch whose revision was compacted
                // starts over; a permission refusal is retried once on a
                // fresh stream; anything else gives the name up.
                if resp.compact_revision() == 0 && is_refusal(resp.cancel_reason()) {
                    self.refused(name, &resp);
                } else {
                    self.cancelled(name, &resp).await;
                }
                return;
            }
            if name.is_done() {
                // Closed or given up while its create was on its way.
                self.cancel(id).await;
                return;
            }
            open.by_id.insert(id, Arc::clone(&name));
            self.stats.server_watches.fetch_add(1, Ordering::Relaxed);
            self.rehomes = 0;
            if let Some(epoch) = name.created() {
                self.read_keys(name, epoch);
            }
            return;
        }
        if id == open.anchor_id {
            return;
        }
        let Some(name) = open.by_id.get(&id).cloned() else {
            return; // a progress report, or an answer for a cancelled watch
        };
        if !resp.events().is_empty() {
            name.on_events(&resp);
        }
        if resp.canceled() {
            open.by_id.remove(&id);
            self.stats.server_watches.fetch_sub(1, Ordering::Relaxed);
            self.cancelled(name, &resp).await;
        }
    }

    /// etcd refused to create a name's watch. A stream is authorized with the
    /// token it was opened with: once that token expired, etcd refuses new
    /// watches on it although the client has a fresh token by now. So the
    /// first refusal moves every name to a fresh stream; a refusal there too
    /// stands (a role without the grant), and the name's waiters fail.
    fn refused(&mut self, name: Arc<NameWatch>, resp: &WatchResponse) {
        let reason = resp.cancel_reason();
        if name.refused_once_more() > 1 {
            tracing::debug!(
                prefix = name.keys.prefix(),
                reason,
                "etcd refused the watch again"
            );
            name.refuse(reason);
            return;
        }
        tracing::debug!(
            prefix = name.keys.prefix(),
            reason,
            "etcd refused a watch; trying a fresh stream"
        );
        self.homeless.push(name);
        self.stream_died("etcd refused a watch on it (an expired auth token?)");
    }

    /// etcd cancelled a name's watch (or refused to create it). When history
    /// was compacted past where it resumed, the name starts over with a
    /// fresh watch and read; anything else gives the name up.
    async fn cancelled(&mut self, name: Arc<NameWatch>, resp: &WatchResponse) {
        if resp.compact_revision() > 0 && !name.is_done() {
            tracing::debug!(
                prefix = name.keys.prefix(),
                compacted = resp.compact_revision(),
                "history compacted past the resume point; reading the name afresh"
            );
            name.restart();
            self.create(name, None).await;
        } else {
            name.break_with(resp.cancel_reason());
        }
    }

    /// Reads a fresh name's keys (after its watch was confirmed, so no event
    /// falls between the two) in a task of its own.
    fn read_keys(&self, name: Arc<NameWatch>, epoch: u64) {
        let kv = self.client.kv_client();
        let hedge = Hedge::for_timeout(self.settings.request_timeout);
        tokio::spawn(async move {
            let prefix = name.keys.prefix().to_string();
            let read = rpc::hedged(
                hedge,
                "range",
                || {
                    let (mut kv, prefix) = (kv.clone(), prefix.clone());
                    async move {
                        kv.get(
                            prefix,
                            Some(GetOptions::new().with_prefix().with_keys_only()),
                        )
                        .await
                    }
                },
                |_| {},
            )
            .await;
            match read {
                Ok((snapshot, _)) => {
                    name.synced(epoch, &snapshot);
                }
                Err(err) => {
                    let current = {
                        let state = name.state();
                        state.epoch == epoch && state.phase == Phase::Created
                    };
                    if current {
                        name.break_with(&err.to_string());
                    }
                }
            }
        });
    }

    async fn cancel(&mut self, id: i64) {
        let Some(open) = self.stream.as_mut() else {
            return;
        };
        let sent = tokio::time::timeout(self.settings.probe_timeout, open.tx.cancel(id)).await;
        if !matches!(sent, Ok(Ok(()))) {
            self.stream_died("could not send a watch cancel");
        }
    }

    async fn on_tick(&mut self) {
        // Idle names are closed; their watches, and those of names given
        // up, are cancelled.
        if let Some(hub) = self.hub.upgrade() {
            hub.close_idle();
        }
        let done: Vec<i64> = match &mut self.stream {
            Some(open) => {
                let done: Vec<i64> = open
                    .by_id
                    .iter()
                    .filter(|(_, name)| name.is_done())
                    .map(|(id, _)| *id)
                    .collect();
                for id in &done {
                    open.by_id.remove(id);
                }
                done
            }
            None => return,
        };
        for id in done {
            self.stats.server_watches.fetch_sub(1, Ordering::Relaxed);
            self.cancel(id).await;
        }
        let Some(open) = self.stream.as_mut() else {
            return;
        };
        if open.by_id.is_empty() && open.creating.is_empty() && self.homeless.is_empty() {
            // Nothing to watch: close the stream (the next waiter opens one).
            self.stream = None;
            return;
        }
        let now = Instant::now();
        match open.probe_sent {
            Some(sent) if now - sent >= self.settings.probe_timeout => {
                let quiet = now - open.last_heard;
                tracing::warn!(
                    quiet_ms = u64::try_from(quiet.as_millis()).unwrap_or(u64::MAX),
                    "etcd watch stream stalled (no answer to a progress request); moving to a fresh stream"
                );
                self.stream_died("no answer to a progress request");
            }
            Some(_) => {}
            None if now - open.last_heard >= self.settings.probe_after => {
                open.probe_sent = Some(now);
                let sent =
                    tokio::time::timeout(self.settings.probe_timeout, open.tx.request_progress())
                        .await;
                if !matches!(sent, Ok(Ok(()))) {
                    self.stream_died("could not send a progress request");
                }
            }
            None => {}
        }
    }

    /// Gives the stream up; its names go to the next one.
    fn stream_died(&mut self, reason: &str) {
        let Some(open) = self.stream.take() else {
            return;
        };
        tracing::debug!(reason, "etcd watch stream given up");
        self.stats.restarts.fetch_add(1, Ordering::Relaxed);
        metrics::watch_stream_restarted(BACKEND);
        self.stats.server_watches.store(0, Ordering::Relaxed);
        let Open {
            creating, by_id, ..
        } = open;
        self.homeless.extend(
            by_id
                .into_values()
                .chain(creating)
                .filter(|name| !name.is_done()),
        );
    }
}

/// Ends a name whose stream could not be opened: refused for good on a
/// permission error, broken (its waiters subscribe again) otherwise.
fn end(name: &NameWatch, err: &LockError) {
    match err {
        LockError::PermissionDenied { message, .. } => name.refuse(message),
        other => name.break_with(&other.to_string()),
    }
}

/// `true` for etcd's cancel reasons that deny access (a role without the
/// grant, or a token no longer valid).
fn is_refusal(reason: &str) -> bool {
    reason.contains("permission denied") || reason.contains("auth token")
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
