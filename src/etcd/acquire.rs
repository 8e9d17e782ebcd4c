//! The lock algorithm.
//!
//! **try** (one round trip, success or failure): one txn whose compares say
//! "no incompatible key exists under the name" (compares over key ranges);
//! then it puts our key, else it reads the first incompatible key, so a
//! failure says who holds the name. Permits also count the compatible keys in
//! the same txn; only when that count is over the limit is a second request
//! (deleting our key) needed.
//!
//! **wait**: one txn puts our key and reads the name's queue. If every earlier
//! key is compatible, we hold it. Otherwise we wait on the name's queue kept by
//! the [`watcher`](super::watcher) until every incompatible earlier key is
//! gone (FIFO by create revision), failing if our own key disappears first
//! (lease expired while waiting), the lease is lost, or time runs out. Every
//! failure deletes our key.

use std::sync::Arc;
use std::time::Instant;

use etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
    TxnResponse,
};
use tokio::time::Duration;
use tracing::Instrument;

use super::keys::NameKeys;
use super::local::Claim;
use super::release::OwnKey;
use super::session::Session;
use super::{rpc, Inner};
use crate::guard::LockInfo;
use crate::mode::{grant, Grant};
use crate::{trace, Holder, LockError, LockGuard, LockMode, LockName, Wait};

/// How long to wait before re-subscribing after the watch broke.
const RESUBSCRIBE_BACKOFF: Duration = Duration::from_millis(100);

pub(super) async fn lock(
    inner: &Arc<Inner>,
    name: &LockName,
    mode: LockMode,
    wait: Wait,
) -> Result<LockGuard, LockError> {
    let started = Instant::now();
    let wait = wait.normalized();
    let span = trace::acquire_span("etcd", name, mode);
    let result = async {
        // Quick failures (a member failing over) are retried, each attempt
        // with a new key, for up to one request timeout.
        let retry_until = started + inner.config.request_timeout;
        let mut backoff = rpc::RETRY_BACKOFF;
        let mut renewed_lease = false;
        loop {
            match Acquisition::start(inner, name, mode, wait, started).await {
                Ok(guard) => return Ok(guard),
                // etcd dropped our lease before we noticed: start over once,
                // with a fresh lease.
                Err((err, Some(session)))
                    if !renewed_lease && rpc::lock_error_is_lease_not_found(&err) =>
                {
                    session.mark_lost("etcd reports the lease not found");
                    inner.sessions.forget(&session);
                    renewed_lease = true;
                }
                Err((err @ LockError::Unavailable { .. }, _))
                    if Instant::now() + backoff < retry_until =>
                {
                    tracing::debug!(error = %err, "retrying the acquisition");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(rpc::MAX_RETRY_BACKOFF);
                }
                Err((err, _)) => return Err(err),
            }
        }
    }
    .instrument(span.clone())
    .await;
    span.in_scope(|| trace::record_outcome(&result, started.elapsed()));
    result
}

/// One attempt: our key, pending until it is held or deleted.
struct Acquisition<'a> {
    name: &'a LockName,
    mode: LockMode,
    keys: NameKeys,
    started: Instant,
    own: Option<OwnKey>,
    put: Put,
}

/// What etcd did with our put, as far as we know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Put {
    /// Not sent, or certainly not applied: nothing to clean up.
    Absent,
    /// Sent; the task that sent it owns the cleanup until it answers.
    InFlight,
    /// Sent without an answer: it may still be applied, later than any
    /// delete we send. The lease it carries must go: see [`Drop`].
    Uncertain,
    /// Applied: clean up with a delete.
    Applied,
}

type AttemptResult = Result<LockGuard, (LockError, Option<Arc<Session>>)>;

impl<'a> Acquisition<'a> {
    async fn start(
        inner: &Arc<Inner>,
        name: &'a LockName,
        mode: LockMode,
        wait: Wait,
        started: Instant,
    ) -> AttemptResult {
        let keys = NameKeys::new(&inner.config.namespace, name);
        let session = inner
            .sessions
            .get(&inner.client, &inner.config)
            .await
            .map_err(|e| (e, None))?;
        let prefix: Arc<str> = Arc::from(keys.prefix());
        let is_try = wait == Wait::Try;
        let lease_id = session.lease_id();
        let (slot, key) = loop {
            let make_key = |slot| keys.key(mode, lease_id, slot);
            match inner
                .local
                .claim(name, &prefix, mode, is_try, lease_id, make_key)
            {
                Claim::Claimed(slot, key) => break (slot, key),
                Claim::Refused(err) => return Err((err, None)),
                Claim::AfterRelease(released) => {
                    // Bounded once for the whole acquisition, not per release.
                    let limit = inner.config.request_timeout;
                    let until = tokio::time::Instant::from_std(started + limit);
                    if tokio::time::timeout_at(until, released).await.is_err() {
                        let err = LockError::Unavailable {
                            message: format!("our own release of {name:?} took over {limit:?}"),
                            source: None,
                        };
                        return Err((err, None));
                    }
                }
            }
        };
        let mut this = Acquisition {
            name,
            mode,
            keys,
            started,
            own: Some(OwnKey {
                inner: Arc::clone(inner),
                prefix,
                slot,
                key,
                session: Arc::clone(&session),
                runtime: tokio::runtime::Handle::try_current().ok(),
                unanswered: Default::default(),
            }),
            put: Put::Absent,
        };
        let result = match wait {
            Wait::Try => this.try_once(inner, &session).await,
            Wait::Timeout(timeout) => this.put_and_wait(inner, &session, timeout).await,
        };
        result.map_err(|e| (e, Some(session)))
    }

    fn own(&self) -> Result<&OwnKey, LockError> {
        self.own.as_ref().ok_or_else(|| LockError::Lost {
            name: self.name.clone(),
            reason: "acquisition already finished".into(),
        })
    }

    /// The one-round-trip try.
    async fn try_once(&mut self, inner: &Inner, session: &Session) -> Result<LockGuard, LockError> {
        let own = self.own()?;
        let incompatible = self.keys.incompatible_ranges(self.mode);
        let compares: Vec<Compare> = incompatible
            .iter()
            .map(|(start, end)| {
                Compare::create_revision(start.clone(), CompareOp::Equal, 0).with_range(end.clone())
            })
            .collect();
        let mut then = vec![put_op(own, &inner.config.owner, session)];
        if let Some((start, end)) = self.keys.compatible_range(self.mode) {
            // Counted only for permits; shared needs no count.
            if matches!(self.mode, LockMode::Permits(_)) {
                then.push(TxnOp::get(
                    start,
                    Some(GetOptions::new().with_range(end).with_count_only()),
                ));
            }
        }
        let otherwise: Vec<TxnOp> = incompatible
            .into_iter()
            .map(|(start, end)| TxnOp::get(start, Some(first_created().with_range(end))))
            .collect();
        let txn = Txn::new().when(compares).and_then(then).or_else(otherwise);
        let resp = self.txn(inner, txn).await?;
        if !resp.succeeded() {
            self.put = Put::Absent;
            return Err(self.contended(&resp));
        }
        let token = revision(&resp);
        if let LockMode::Permits(n) = self.mode {
            let holders = get_responses(&resp).first().map_or(0, |g| g.count());
            if holders > i64::from(n.get()) {
                return Err(LockError::Locked {
                    name: self.name.clone(),
                    holder: None,
                });
            }
        }
        self.granted(token)
    }

    /// The waiting acquisition.
    async fn put_and_wait(
        &mut self,
        inner: &Inner,
        session: &Session,
        timeout: Duration,
    ) -> Result<LockGuard, LockError> {
        let own = self.own()?;
        let txn = Txn::new().and_then(vec![
            put_op(own, &inner.config.owner, session),
            TxnOp::get(
                self.keys.prefix(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ),
        ]);
        let resp = self.txn(inner, txn).await?;
        let token = revision(&resp);
        let mut earlier: Vec<(i64, LockMode)> = get_responses(&resp)
            .iter()
            .flat_map(|g| g.kvs())
            .filter(|kv| kv.create_revision() < token)
            .map(|kv| (kv.create_revision(), self.keys.mode_of(kv.key())))
            .collect();
        earlier.sort_unstable_by_key(|(rev, _)| *rev);
        match grant(self.mode, earlier.iter().map(|(_, m)| *m)) {
            Grant::Granted => return self.granted(token),
            Grant::Mismatch(theirs) => return Err(self.mismatch(theirs)),
            Grant::Wait => {}
        }
        tracing::debug!(
            lock.token = token,
            queued_behind = earlier.len(),
            "waiting in line"
        );
        let deadline = self
            .started
            .checked_add(timeout)
            .map(tokio::time::Instant::from_std);
        let waiting = self.wait_in_line(inner, session, token);
        let outcome = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, waiting).await,
            None => Ok(waiting.await),
        };
        match outcome {
            Ok(Ok(())) => self.granted(token),
            Ok(Err(err)) => Err(err),
            Err(_elapsed) => Err(LockError::Timeout {
                name: self.name.clone(),
                waited: self.started.elapsed(),
            }),
        }
    }

    /// Waits until our key, created at `token`, is first in line for its mode.
    async fn wait_in_line(
        &self,
        inner: &Inner,
        session: &Session,
        token: i64,
    ) -> Result<(), LockError> {
        let own = self.own()?;
        let lost = session.signal().lost();
        tokio::pin!(lost);
        loop {
            let waited = async {
                let subscription = inner.watcher.subscribe(&self.keys).await?;
                subscription
                    .wait_until(|queue| {
                        if queue.revision() < token {
                            return None; // our own put is not in the queue yet
                        }
                        if !queue.contains(own.key.as_bytes()) {
                            return Some(Err(LockError::Lost {
                                name: self.name.clone(),
                                reason: "our lock key was deleted while waiting (lease expired?)"
                                    .into(),
                            }));
                        }
                        match grant(self.mode, queue.before(token)) {
                            Grant::Granted => Some(Ok(())),
                            Grant::Wait => None,
                            Grant::Mismatch(theirs) => Some(Err(self.mismatch(theirs))),
                        }
                    })
                    .await?
            };
            let result = tokio::select! {
                reason = &mut lost => Err(LockError::Lost { name: self.name.clone(), reason }),
                result = waited => result,
            };
            match result {
                Err(LockError::Unavailable { message, .. }) => {
                    tracing::debug!(%message, "watch unavailable; subscribing again");
                    tokio::time::sleep(RESUBSCRIBE_BACKOFF).await;
                }
                other => return other,
            }
        }
    }

    /// Sends a txn that may put our key, tracking what became of the put.
    ///
    /// The request runs in a task of its own: if this acquisition is dropped
    /// meanwhile (a client that went away), the task still learns the
    /// outcome and cleans up accordingly, instead of leaving a put of unknown
    /// outcome behind.
    async fn txn(&mut self, inner: &Inner, txn: Txn) -> Result<TxnResponse, LockError> {
        let own = self.own()?.clone();
        let mut kv = inner.client.kv_client();
        let timeout = inner.config.request_timeout;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = async move {
            let result = rpc::with_timeout(timeout, "txn", async move { kv.txn(txn).await }).await;
            if let Err(result) = reply.send(result) {
                // Nobody is waiting: the acquisition was dropped.
                abandoned(own, result);
            }
        };
        self.put = Put::InFlight;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(request)),
            Err(_) => request.await,
        }
        let result = answer.await.unwrap_or_else(|_| {
            Err(LockError::Unavailable {
                message: "the etcd request task stopped".into(),
                source: None,
            })
        });
        self.put = match &result {
            // Callers correct this when the compare failed.
            Ok(_) => Put::Applied,
            Err(err) if rpc::certainly_not_applied(err) => Put::Absent,
            Err(_) => Put::Uncertain,
        };
        result
    }

    fn granted(&mut self, token: i64) -> Result<LockGuard, LockError> {
        let own = self.own.take().ok_or_else(|| LockError::Lost {
            name: self.name.clone(),
            reason: "acquisition already finished".into(),
        })?;
        self.put = Put::Absent;
        if let Some(reason) = own.session.signal().reason() {
            let name = self.name.clone();
            own.delete_in_background();
            return Err(LockError::Lost { name, reason });
        }
        let token = u64::try_from(token).unwrap_or(0);
        own.inner.local.set_token(&own.prefix, own.slot, token);
        let info = LockInfo::new(self.name.clone(), self.mode, token, own.session.signal())
            .with_backend_key(Arc::clone(&own.key), Some(own.session.lease_id()))
            .with_waited(self.started.elapsed());
        Ok(LockGuard::new(info, own))
    }

    fn mismatch(&self, theirs: LockMode) -> LockError {
        LockError::ModeConflict {
            name: self.name.clone(),
            ours: self.mode,
            theirs,
        }
    }

    /// The error for a failed try: who holds the name, or a mode conflict.
    fn contended(&self, resp: &TxnResponse) -> LockError {
        let first = get_responses(resp)
            .into_iter()
            .flat_map(|g| g.kvs().to_vec())
            .min_by_key(|kv| kv.create_revision());
        let Some(kv) = first else {
            return LockError::Locked {
                name: self.name.clone(),
                holder: None,
            };
        };
        let theirs = self.keys.mode_of(kv.key());
        if let Grant::Mismatch(theirs) = grant(self.mode, [theirs]) {
            return self.mismatch(theirs);
        }
        LockError::Locked {
            name: self.name.clone(),
            holder: Some(Holder {
                token: u64::try_from(kv.create_revision()).ok(),
                key: Some(String::from_utf8_lossy(kv.key()).into_owned()),
                lease_id: Some(kv.lease()),
                same_locker: false,
            }),
        }
    }
}

impl Drop for Acquisition<'_> {
    fn drop(&mut self) {
        let Some(own) = self.own.take() else {
            return;
        };
        match self.put {
            Put::Absent => own.inner.local.remove(&own.prefix, own.slot),
            Put::InFlight => {} // the request's task cleans up
            Put::Applied => own.delete_in_background(),
            Put::Uncertain => uncertain(own),
        }
    }
}

/// Cleans up after a put whose acquisition was dropped before it answered.
fn abandoned(own: OwnKey, result: Result<TxnResponse, LockError>) {
    match result {
        Ok(resp) if resp.succeeded() => own.delete_in_background(),
        Ok(_) => own.inner.local.remove(&own.prefix, own.slot),
        Err(err) if rpc::certainly_not_applied(&err) => {
            own.inner.local.remove(&own.prefix, own.slot)
        }
        Err(_) => uncertain(own),
    }
}

/// A put applied after our delete would leave a key nobody holds, kept alive
/// by our lease. So the lease is retired: new acquisitions get a fresh one,
/// and this one is revoked (taking any such key with it) once its last guard
/// is released.
fn uncertain(own: OwnKey) {
    tracing::debug!(key = %own.key, "put outcome unknown; retiring the lease");
    own.inner.sessions.forget(&own.session);
    own.delete_in_background();
}

fn put_op(own: &OwnKey, owner: &str, session: &Session) -> TxnOp {
    TxnOp::put(
        own.key.as_bytes(),
        owner.as_bytes(),
        Some(PutOptions::new().with_lease(session.lease_id())),
    )
}

fn first_created() -> GetOptions {
    GetOptions::new()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
        .with_limit(1)
        .with_keys_only()
}

fn revision(resp: &TxnResponse) -> i64 {
    resp.header().map_or(0, |h| h.revision())
}

fn get_responses(resp: &TxnResponse) -> Vec<etcd_client::GetResponse> {
    resp.op_responses()
        .into_iter()
        .filter_map(|op| match op {
            TxnOpResponse::Get(get) => Some(get),
            _ => None,
        })
        .collect()
}
