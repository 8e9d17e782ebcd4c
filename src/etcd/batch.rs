//! Group commit: the lock writes of many names in one etcd request.
//!
//! etcd pays per request (a gRPC call, a raft entry, an apply), so while
//! every acquisition and release is a request of its own, that cost is the
//! ceiling. etcd runs a txn nested in another txn's `then` as part of the one
//! request, so a locker sends its hot-path writes (the txn that puts a lock
//! key, the delete that releases it) through a [`Batcher`]: an op is sent at
//! once when nothing is in flight (no added latency when idle); while
//! [`IN_FLIGHT`] batches are in flight, ops that arrive wait and go together in
//! the next one.
//!
//! What etcd 3.4 does with a batch, and the rules that follow:
//!
//! - All nested compares see the state before the batch, and a key written
//!   twice rejects the whole batch: **at most one op per name per batch**
//!   (names never share keys: their encodings are prefix-free). A second op
//!   on a name waits for the next batch.
//! - Every key written by a batch gets the batch's revision, and nested
//!   responses carry a header with revision 0: each op's [`Answer`] carries
//!   the outer revision.
//! - A batch etcd refused applied nothing (one op's missing lease, a key
//!   the user may not write, too many operations): its ops are sent again,
//!   alone or in halves, so that each gets its own answer and one bad op
//!   fails only itself.
//! - A batch that fails otherwise (a timeout, a reset connection) leaves the
//!   outcome of every op unknown, as for a request of its own.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{KvClient, Txn, TxnOp, TxnOpResponse, TxnResponse};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

use super::rpc;
use crate::LockError;

/// How many batches a locker keeps in flight: one leaves etcd idle while
/// its answer travels back (C=8 ran at 0.9x of unbatched); two keep it busy.
pub(crate) const IN_FLIGHT: usize = 2;
/// The most ops in one batch until etcd says fewer (its `--max-txn-ops`,
/// 128 by default, counts nested txns too).
const MAX_OPS: usize = 100;

/// A lock write.
pub(crate) enum Write {
    /// A txn (the acquisition's put-if-absent and reads).
    Txn(Txn),
    /// A plain delete (a release).
    Delete(Vec<u8>),
}

impl Write {
    /// The request's name, for messages.
    fn what(&self) -> &'static str {
        match self {
            Self::Txn(_) => "txn",
            Self::Delete(_) => "delete",
        }
    }
}

/// What etcd answered one write.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    /// Whether the txn's compares held (always for a delete).
    pub(crate) succeeded: bool,
    /// The revision of the request that carried it: the create revision of
    /// any key it put. `None` when etcd's answer had no header.
    pub(crate) revision: Option<i64>,
    /// The txn's op responses (empty for a delete).
    pub(crate) responses: Vec<TxnOpResponse>,
}

impl Answer {
    fn of_txn(resp: &TxnResponse, revision: Option<i64>) -> Self {
        Self {
            succeeded: resp.succeeded(),
            revision,
            responses: resp.op_responses(),
        }
    }

    fn of_delete(revision: Option<i64>) -> Self {
        Self {
            succeeded: true,
            revision,
            responses: Vec::new(),
        }
    }
}

/// Why a write failed, and whether it may have been applied all the same.
#[derive(Debug)]
pub(crate) struct Failed {
    pub(crate) error: LockError,
    /// `false` when etcd certainly did not apply it (never sent, refused).
    pub(crate) maybe_applied: bool,
}

impl Failed {
    fn from_error(error: LockError) -> Self {
        let maybe_applied = !rpc::certainly_not_applied(&error);
        Self {
            error,
            maybe_applied,
        }
    }
}

const QUEUED: u8 = 0;
const SENT: u8 = 1;
const CANCELLED: u8 = 2;

/// One write waiting for a batch.
struct Op {
    /// The name's key prefix: one op per name per batch.
    name: Arc<str>,
    write: Write,
    state: Arc<AtomicU8>,
    reply: oneshot::Sender<Result<Answer, Failed>>,
}

/// Counts for diagnostics and tests.
#[derive(Debug, Default)]
pub(crate) struct BatchStats {
    /// Requests that carried two writes or more.
    pub(crate) batches: AtomicU64,
    /// Writes sent in those requests.
    pub(crate) batched_writes: AtomicU64,
    /// Batches etcd refused as a whole and that were sent again, smaller.
    pub(crate) resent: AtomicU64,
}

/// The batches in flight, shared by the driver and by writers that find
/// the batcher idle (they send at once, from their own task).
#[derive(Default)]
struct Slots {
    in_flight: AtomicUsize,
    /// Writes handed to the driver and not yet sent or withdrawn.
    queued: AtomicUsize,
    /// Woken when a batch in flight ends.
    freed: Notify,
}

impl Slots {
    /// Takes a slot if one is free.
    fn take(self: &Arc<Self>) -> Option<SlotGuard> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < IN_FLIGHT).then_some(n + 1)
            })
            .ok()
            .map(|_| SlotGuard(Arc::clone(self)))
    }
}

/// A slot in use; given back (and the driver woken) when dropped.
struct SlotGuard(Arc<Slots>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

/// Sends a locker's lock writes, batched or one request each.
pub(crate) struct Batcher {
    kv: KvClient,
    request_timeout: Duration,
    /// The batch driver's inbox (started at the first write); `None` when
    /// batching is off.
    inbox: std::sync::Mutex<Option<mpsc::UnboundedSender<Op>>>,
    batching: bool,
    /// Set by [`Batcher::shut_down`]: no write is sent any more.
    closed: std::sync::atomic::AtomicBool,
    /// The most ops per batch: lowered when etcd refuses a batch as too big.
    max_ops: Arc<AtomicUsize>,
    slots: Arc<Slots>,
    pub(crate) stats: Arc<BatchStats>,
}

impl Batcher {
    pub(crate) fn new(kv: KvClient, request_timeout: Duration, batching: bool) -> Self {
        Self {
            kv,
            request_timeout,
            inbox: std::sync::Mutex::new(None),
            closed: std::sync::atomic::AtomicBool::new(false),
            batching,
            max_ops: Arc::new(AtomicUsize::new(MAX_OPS)),
            slots: Arc::new(Slots::default()),
            stats: Arc::new(BatchStats::default()),
        }
    }

    /// Sends `write` (on the name under `name`) and waits for etcd's answer,
    /// until `deadline`. A write still queued at the deadline is withdrawn
    /// (certainly not applied); one sent and unanswered may still be.
    pub(crate) async fn write(
        &self,
        name: Arc<str>,
        write: Write,
        deadline: Instant,
    ) -> Result<Answer, Failed> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Failed {
                error: unavailable("the locker shut down"),
                maybe_applied: false,
            });
        }
        if !self.batching {
            let timeout = deadline.saturating_duration_since(Instant::now());
            return send_alone(self.kv.clone(), write, timeout).await;
        }
        // Idle (a slot free, nobody queued): sent at once, from here.
        if self.slots.queued.load(Ordering::Acquire) == 0 {
            if let Some(_slot) = self.slots.take() {
                let timeout = deadline.saturating_duration_since(Instant::now());
                return send_alone(self.kv.clone(), write, timeout).await;
            }
        }
        let what = write.what();
        let state = Arc::new(AtomicU8::new(QUEUED));
        // Dropped while still queued (its caller gave up): never sent.
        let _withdraw_on_drop = Withdraw(Arc::clone(&state));
        let (reply, answer) = oneshot::channel();
        let op = Op {
            name,
            write,
            state: Arc::clone(&state),
            reply,
        };
        self.slots.queued.fetch_add(1, Ordering::AcqRel);
        if self.inbox().send(op).is_err() {
            self.slots.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Failed {
                error: unavailable("the batch task stopped"),
                maybe_applied: false,
            });
        }
        let queued = Instant::now();
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Failed {
                error: unavailable("the batch task stopped"),
                maybe_applied: state.load(Ordering::Acquire) == SENT,
            }),
            Err(_) => Err(Failed {
                error: LockError::Unavailable {
                    message: format!("etcd {what} did not answer within {:?}", queued.elapsed()),
                    source: None,
                },
                maybe_applied: !withdraw(&state),
            }),
        }
    }

    /// Sends nothing more: the driver sends what it has and ends.
    pub(crate) fn shut_down(&self) {
        self.closed.store(true, Ordering::Release);
        self.inbox.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn inbox(&self) -> mpsc::UnboundedSender<Op> {
        let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        match inbox.as_ref().filter(|tx| !tx.is_closed()) {
            Some(tx) => tx.clone(),
            None => {
                let (tx, rx) = mpsc::unbounded_channel();
                let driver = Driver {
                    kv: self.kv.clone(),
                    request_timeout: self.request_timeout,
                    max_ops: Arc::clone(&self.max_ops),
                    slots: Arc::clone(&self.slots),
                    stats: Arc::clone(&self.stats),
                };
                tokio::spawn(driver.run(rx));
                *inbox = Some(tx.clone());
                tx
            }
        }
    }
}

/// Withdraws a queued op: `true` when it was still queued (and now never
/// will be sent), `false` when it was sent already.
fn withdraw(state: &AtomicU8) -> bool {
    state
        .compare_exchange(QUEUED, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Withdraws its op when dropped, unless it was sent already.
struct Withdraw(Arc<AtomicU8>);

impl Drop for Withdraw {
    fn drop(&mut self) {
        withdraw(&self.0);
    }
}

fn unavailable(message: &str) -> LockError {
    LockError::Unavailable {
        message: message.to_string(),
        source: None,
    }
}

/// Sends one write as a request of its own.
async fn send_alone(kv: KvClient, write: Write, timeout: Duration) -> Result<Answer, Failed> {
    let mut kv = kv;
    let result = match write {
        Write::Txn(txn) => rpc::with_timeout(timeout, "txn", async move { kv.txn(txn).await })
            .await
            .map(|resp| Answer::of_txn(&resp, resp.header().map(|h| h.revision()))),
        Write::Delete(key) => {
            rpc::with_timeout(timeout, "delete", async move { kv.delete(key, None).await })
                .await
                .map(|resp| Answer::of_delete(resp.header().map(|h| h.revision())))
        }
    };
    result.map_err(Failed::from_error)
}

/// The task that forms batches: one per locker, ending with it.
struct Driver {
    kv: KvClient,
    request_timeout: Duration,
    max_ops: Arc<AtomicUsize>,
    slots: Arc<Slots>,
    stats: Arc<BatchStats>,
}

impl Driver {
    async fn run(self, mut inbox: mpsc::UnboundedReceiver<Op>) {
        let mut queue: VecDeque<Op> = VecDeque::new();
        let mut open = true;
        loop {
            tokio::select! {
                op = inbox.recv(), if open => match op {
                    Some(op) => queue.push_back(op),
                    None => open = false,
                },
                () = self.slots.freed.notified() => {}
            }
            while let Ok(op) = inbox.try_recv() {
                queue.push_back(op);
            }
            while !queue.is_empty() {
                let Some(slot) = self.slots.take() else {
                    break; // sent when a batch in flight ends
                };
                let batch = self.take_batch(&mut queue);
                if batch.is_empty() {
                    break; // the slot goes back with `slot`
                }
                let sender = self.sender();
                tokio::spawn(async move {
                    sender.send(batch).await;
                    drop(slot);
                });
            }
            if !open && queue.is_empty() && self.slots.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
        }
    }

    fn sender(&self) -> Sender {
        Sender {
            kv: self.kv.clone(),
            request_timeout: self.request_timeout,
            max_ops: Arc::clone(&self.max_ops),
            stats: Arc::clone(&self.stats),
        }
    }

    /// The next batch: queued ops in order, one per name, up to the limit;
    /// ops withdrawn meanwhile are dropped.
    fn take_batch(&self, queue: &mut VecDeque<Op>) -> Vec<Op> {
        let limit = self.max_ops.load(Ordering::Relaxed).max(1);
        let mut names = HashSet::new();
        let mut batch = Vec::new();
        let mut rest = VecDeque::with_capacity(queue.len());
        while let Some(op) = queue.pop_front() {
            if batch.len() >= limit || names.contains(&op.name) {
                rest.push_back(op);
                continue;
            }
            self.slots.queued.fetch_sub(1, Ordering::AcqRel);
            let taken = op
                .state
                .compare_exchange(QUEUED, SENT, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
            if !taken {
                continue; // withdrawn at its deadline
            }
            names.insert(Arc::clone(&op.name));
            batch.push(op);
        }
        *queue = rest;
        batch
    }
}

/// Sends one batch and hands each op its answer.
struct Sender {
    kv: KvClient,
    request_timeout: Duration,
    max_ops: Arc<AtomicUsize>,
    stats: Arc<BatchStats>,
}

impl Sender {
    async fn send(&self, batch: Vec<Op>) {
        let mut pending = vec![batch];
        while let Some(batch) = pending.pop() {
            if let [_] = batch.as_slice() {
                let Some(op) = batch.into_iter().next() else {
                    continue;
                };
                let result = send_alone(self.kv.clone(), op.write, self.request_timeout).await;
                let _ = op.reply.send(result);
                continue;
            }
            match self.send_nested(batch).await {
                Ok(()) => {}
                // Refused as a whole, nothing applied: again, smaller.
                Err((batch, Refusal::TooBig)) => {
                    let half = batch.len() / 2;
                    self.max_ops.fetch_min(half.max(1), Ordering::Relaxed);
                    tracing::debug!(
                        ops = batch.len(),
                        "etcd refused a batch as too big; splitting it"
                    );
                    let mut batch = batch;
                    let second = batch.split_off(half);
                    pending.push(second);
                    pending.push(batch);
                }
                Err((batch, Refusal::Alone)) => {
                    pending.extend(batch.into_iter().map(|op| vec![op]));
                }
            }
        }
    }

    /// Sends ops nested in one txn. Gives the batch back when etcd refused
    /// it as a whole (nothing applied).
    async fn send_nested(&self, batch: Vec<Op>) -> Result<(), (Vec<Op>, Refusal)> {
        let (ops, replies): (Vec<Unsent>, Vec<_>) = batch
            .into_iter()
            .map(|op| ((op.name, op.write, op.state), op.reply))
            .unzip();
        // Kept to rebuild the batch if etcd refuses it as a whole.
        let mut nested = Vec::with_capacity(ops.len());
        let mut kept = Vec::with_capacity(ops.len());
        for (name, write, state) in ops {
            let (op, again) = match write {
                Write::Txn(txn) => {
                    let copy = txn.clone();
                    (TxnOp::txn(txn), Write::Txn(copy))
                }
                Write::Delete(key) => (TxnOp::delete(key.clone(), None), Write::Delete(key)),
            };
            nested.push(op);
            kept.push((name, again, state));
        }
        let mut kv = self.kv.clone();
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats
            .batched_writes
            .fetch_add(nested.len() as u64, Ordering::Relaxed);
        let txn = Txn::new().and_then(nested);
        let sent = rpc::with_timeout(
            self.request_timeout,
            "txn",
            async move { kv.txn(txn).await },
        )
        .await;
        let resp = match sent {
            Ok(resp) => resp,
            Err(err) => {
                if let Some(refusal) = Refusal::of(&err) {
                    self.stats.resent.fetch_add(1, Ordering::Relaxed);
                    let batch = kept
                        .into_iter()
                        .zip(replies)
                        .map(|((name, write, state), reply)| Op {
                            name,
                            write,
                            state,
                            reply,
                        })
                        .collect();
                    return Err((batch, refusal));
                }
                // Shared fate: each op's outcome is unknown (or certainly
                // not applied, as the request's).
                let maybe_applied = !rpc::certainly_not_applied(&err);
                for reply in replies {
                    let _ = reply.send(Err(Failed {
                        error: rpc::copy_error(&err),
                        maybe_applied,
                    }));
                }
                return Ok(());
            }
        };
        let revision = resp.header().map(|h| h.revision());
        let mut answers = resp.op_responses().into_iter();
        for reply in replies {
            let answer = match answers.next() {
                Some(TxnOpResponse::Txn(inner)) => Ok(Answer::of_txn(&inner, revision)),
                Some(TxnOpResponse::Delete(_)) => Ok(Answer::of_delete(revision)),
                // etcd answered the batch but not this op: applied, unreadable.
                _ => Err(Failed {
                    error: unavailable("etcd answered a batch without this op's response"),
                    maybe_applied: true,
                }),
            };
            let _ = reply.send(answer);
        }
        Ok(())
    }
}

/// An op without its reply channel: what a refused batch is rebuilt from.
type Unsent = (Arc<str>, Write, Arc<AtomicU8>);

/// How etcd refused a batch as a whole.
enum Refusal {
    /// Too many operations: send it in halves.
    TooBig,
    /// An op spoiled it (a missing lease, a key the user may not write, a
    /// key written twice): send each op alone, for its own answer.
    Alone,
}

impl Refusal {
    /// How etcd refused the batch that failed with `err`, if it refused it:
    /// an answer from etcd that certainly applied nothing.
    fn of(err: &LockError) -> Option<Self> {
        let status = rpc::status_of(err)?;
        if status.message().contains("too many operations") {
            Some(Self::TooBig)
        } else {
            rpc::certainly_not_applied(err).then_some(Self::Alone)
        }
    }
}

#[cfg(all(test, feature = "test-util"))]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Poll;

    use super::*;
    use crate::testing::EtcdServer;

    fn put(key: &str) -> Write {
        Write::Txn(Txn::new().and_then([TxnOp::put(key, "v", None)]))
    }

    async fn exists(etcd: &EtcdServer, key: &str) -> bool {
        let mut client = etcd.client().await.expect("client");
        let resp = client.get(key, None).await.expect("get");
        !resp.kvs().is_empty()
    }

    /// Waits (bounded) until `done` holds.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let started = Instant::now();
        while !done() {
            assert!(started.elapsed() < Duration::from_secs(10), "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// etcd refuses a whole batch for one op (here a put without a key; in
    /// production a missing lease or a key the user may not write): the
    /// others must still be applied, each op getting its own answer. They
    /// all failed with the refusal, as "unavailable", when only a missing
    /// lease or a duplicate key was recognised by its text.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_refused_for_one_op_applies_the_others() {
        let etcd = EtcdServer::start().await.expect("etcd");
        let client = etcd.client().await.expect("client");
        let sender = Sender {
            kv: client.kv_client(),
            request_timeout: Duration::from_secs(2),
            max_ops: Arc::new(AtomicUsize::new(MAX_OPS)),
            stats: Arc::new(BatchStats::default()),
        };
        let mut answers = Vec::new();
        let batch = [("a", put("a")), ("bad", put("")), ("b", put("b"))]
            .into_iter()
            .map(|(name, write)| {
                let (reply, answer) = oneshot::channel();
                answers.push(answer);
                Op {
                    name: name.into(),
                    write,
                    state: Arc::new(AtomicU8::new(SENT)),
                    reply,
                }
            })
            .collect();
        sender.send(batch).await;
        let mut results = Vec::new();
        for answer in answers {
            results.push(answer.await.expect("answered"));
        }
        assert!(results[0].is_ok(), "a: {:?}", results[0]);
        assert!(results[2].is_ok(), "b: {:?}", results[2]);
        let refused = results[1].as_ref().expect_err("the op without a key");
        assert!(!refused.maybe_applied, "{refused:?}");
        assert!(exists(&etcd, "a").await && exists(&etcd, "b").await);
        assert_eq!(sender.stats.resent.load(Ordering::Relaxed), 1);
    }

    /// A write whose caller gives up while it waits in the queue is never
    /// sent: it was sent when a slot freed, after its caller had been told
    /// it was not applied.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queued_write_dropped_by_its_caller_is_never_sent() {
        let mut etcd = EtcdServer::start().await.expect("etcd");
        let client = etcd.client().await.expect("client");
        let batcher = Arc::new(Batcher::new(
            client.kv_client(),
            Duration::from_secs(5),
            true,
        ));
        let later = || Instant::now() + Duration::from_secs(10);
        // Every slot taken by a write the paused etcd cannot answer yet.
        etcd.member().pause();
        let hung: Vec<_> = (0..IN_FLIGHT)
            .map(|i| {
                let (batcher, key) = (Arc::clone(&batcher), format!("hung{i}"));
                tokio::spawn(
                    async move { batcher.write(key.as_str().into(), put(&key), later()).await },
                )
            })
            .collect();
        until("every slot in flight", || {
            batcher.slots.in_flight.load(Ordering::Acquire) == IN_FLIGHT
        })
        .await;
        // A write queued behind them, dropped by its caller.
        let mut queued = Box::pin(batcher.write("k".into(), put("k"), later()));
        let polled = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut queued).poll(cx))).await;
        assert!(polled.is_pending(), "it waits for a slot");
        assert_eq!(batcher.slots.queued.load(Ordering::Acquire), 1);
        drop(queued);

        etcd.member().resume();
        for task in hung {
            task.await
                .expect("task")
                .expect("answered once etcd resumed");
        }
        until("the queue dealt with", || {
            batcher.slots.queued.load(Ordering::Acquire) == 0
                && batcher.slots.in_flight.load(Ordering::Acquire) == 0
        })
        .await;
        assert!(!exists(&etcd, "k").await, "the dropped write was sent");
        assert!(exists(&etcd, "hung0").await);
    }
}
