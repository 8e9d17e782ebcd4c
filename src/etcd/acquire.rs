//! The lock algorithm.
//!
//! **try** (one round trip, success or failure): one txn whose compares say
//! "no incompatible key exists under the name, and our own key does not
//! exist" (compares over key ranges); then it puts our key, else it reads the
//! first incompatible key and our own, so a failure says who holds the name.
//! Permits also count the compatible keys in the same txn; only when that
//! count is over the limit is a second request (deleting our key) needed.
//!
//! **wait**: one txn puts our key (if it does not exist) and reads the name's
//! queue. If every earlier key is compatible, we hold it. Otherwise we wait on
//! the name's queue kept by the [`watcher`](super::watcher) until every
//! incompatible earlier key is gone (FIFO by create revision), failing if our
//! own key disappears first (lease expired while waiting), the lease is lost,
//! the locker shuts down, or time runs out. Every failure deletes our key.
//!
//! A key of ours that this locker does not track (an [orphan](super::orphans))
//! never makes us wait: it is deleted, and the attempt starts over if it was
//! in the way of the put itself.
//!
//! **Cancellation**: the txn runs in a task of its own and answers through a
//! channel the acquisition keeps. Dropped at any point, the acquisition
//! settles what it started: a put not yet answered is cleaned up by the task
//! when its answer comes; an answer already waiting in the channel is read
//! and cleaned up by the drop itself; an applied put is deleted.

use std::sync::Arc;
use std::time::Instant;

use etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
};
use tokio::sync::oneshot;
use tokio::time::Duration;
use tracing::Instrument;

use super::batch::{Answer, Failed, Write};
use super::keys::NameKeys;
use super::local::Claim;
use super::release::OwnKey;
use super::session::{shut_down_error, Session};
use super::{orphans, rpc, Inner, BACKEND};
use crate::guard::LockInfo;
use crate::mode::{grant, Grant};
use crate::{trace, Holder, LockError, LockGuard, LockMode, LockName, Wait};

/// How long to wait before re-subscribing after the watch broke.
const RESUBSCRIBE_BACKOFF: Duration = Duration::from_millis(100);
/// How many orphans one acquisition clears out of its way before giving up.
const MAX_ORPHANS: usize = 3;
/// The least time worth sending a txn with: less than a loopback round trip
/// would only turn the put's outcome uncertain.
const MIN_TXN_TIME: Duration = Duration::from_millis(5);

pub(super) async fn lock(
    inner: &Arc<Inner>,
    name: &LockName,
    mode: LockMode,
    wait: Wait,
) -> Result<LockGuard, LockError> {
    let started = Instant::now();
    let wait = wait.normalized();
    let span = trace::acquire_span(BACKEND, name, mode);
    let result = async {
        // Quick failures (a member failing over) are retried, each attempt
        // with a new key. Taking the lease and putting the key, all attempts
        // together, take one request timeout at most: a try answers within
        // it, whatever etcd does.
        let retry_until = started + inner.config.request_timeout;
        let setup_deadline = tokio::time::Instant::from_std(retry_until);
        let mut backoff = rpc::RETRY_BACKOFF;
        let mut renewed_lease = false;
        let mut orphans_cleared = 0;
        loop {
            if inner.sessions.is_closed() {
                return Err(shut_down_error());
            }
            match Acquisition::start(inner, name, mode, wait, started, setup_deadline).await {
                Ok(guard) => return Ok(guard),
                Err(Failure::Orphan { key, revision }) if orphans_cleared < MAX_ORPHANS => {
                    orphans_cleared += 1;
                    orphans::delete(inner, &key, revision).await?;
                }
                // etcd dropped our lease before we noticed: start over once,
                // with a fresh lease.
                Err(Failure::LeaseNotFound(session, _)) if !renewed_lease => {
                    session.mark_lost("etcd reports the lease not found");
                    inner.sessions.retire(&session);
                    renewed_lease = true;
                }
                Err(Failure::Lock(err @ LockError::Unavailable { .. }))
                    if !rpc::lock_error_is_permanent(&err)
                        && !inner.sessions.is_closed()
                        && Instant::now() + backoff < retry_until =>
                {
                    tracing::debug!(error = %err, "retrying the acquisition");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(rpc::MAX_RETRY_BACKOFF);
                }
                Err(failure) => return Err(failure.into_error(name)),
            }
        }
    }
    .instrument(span.clone())
    .await;
    span.in_scope(|| trace::record_outcome(BACKEND, mode, &result, started.elapsed()));
    result
}

/// Why one attempt failed.
enum Failure {
    Lock(LockError),
    /// etcd says our lease is gone.
    LeaseNotFound(Arc<Session>, LockError),
    /// A key of ours that nobody tracks stands in the way.
    Orphan {
        key: Vec<u8>,
        revision: i64,
    },
}

impl From<LockError> for Failure {
    fn from(err: LockError) -> Self {
        Self::Lock(err)
    }
}

impl Failure {
    fn into_error(self, name: &LockName) -> LockError {
        match self {
            Self::Lock(err) | Self::LeaseNotFound(_, err) => err,
            Self::Orphan { key, .. } => LockError::Unavailable {
                message: format!(
                    "could not clear a stale key of ours ({}) from lock {name:?}",
                    String::from_utf8_lossy(&key)
                ),
                source: None,
            },
        }
    }
}

/// One attempt: our key, pending until it is held or deleted.
struct Acquisition<'a> {
    inner: &'a Arc<Inner>,
    name: &'a LockName,
    mode: LockMode,
    keys: NameKeys,
    started: Instant,
    /// When taking the lease and putting the key must be done by.
    setup_deadline: tokio::time::Instant,
    own: Option<OwnKey>,
    put: Put,
}

/// What etcd did with our put, as far as we know.
#[derive(Debug)]
enum Put {
    /// Not sent, or certainly not applied: nothing to clean up.
    Absent,
    /// Sent; its answer comes through this channel. Whoever reads it (the
    /// acquisition, or its drop) cleans up; if nobody does, the request's
    /// task does.
    InFlight(oneshot::Receiver<Result<Answer, Failed>>),
    /// Sent without an answer: it may still be applied, later than any
    /// delete we send. The lease it carries must go: see [`uncertain`].
    Uncertain,
    /// Applied: clean up with a delete.
    Applied,
}

type AttemptResult = Result<LockGuard, Failure>;

impl<'a> Acquisition<'a> {
    async fn start(
        inner: &'a Arc<Inner>,
        name: &'a LockName,
        mode: LockMode,
        wait: Wait,
        started: Instant,
        setup_deadline: tokio::time::Instant,
    ) -> AttemptResult {
        let keys = NameKeys::new(&inner.config.namespace, name);
        let session = inner
            .sessions
            .get(&inner.client, &inner.config, setup_deadline)
            .await?;
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
                Claim::Refused(err) => return Err(err.into()),
                Claim::AfterRelease(released) => {
                    // Bounded once for the whole acquisition, not per release.
                    let limit = inner.config.request_timeout;
                    let until = tokio::time::Instant::from_std(started + limit);
                    if tokio::time::timeout_at(until, released).await.is_err() {
                        let err = LockError::Unavailable {
                            message: format!("our own release of {name:?} took over {limit:?}"),
                            source: None,
                        };
                        return Err(err.into());
                    }
                }
            }
        };
        let mut this = Acquisition {
            inner,
            name,
            mode,
            keys,
            started,
            setup_deadline,
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
            Wait::Try => this.try_once(&session).await,
            Wait::Timeout(timeout) => this.put_and_wait(&session, timeout).await,
        };
        result.map_err(|failure| match failure {
            Failure::Lock(err) if rpc::lock_error_is_lease_not_found(&err) => {
                Failure::LeaseNotFound(session, err)
            }
            other => other,
        })
    }

    fn own(&self) -> Result<&OwnKey, LockError> {
        self.own.as_ref().ok_or_else(|| LockError::Lost {
            name: self.name.clone(),
            reason: "acquisition already finished".into(),
        })
    }

    /// The one-round-trip try.
    async fn try_once(&mut self, session: &Session) -> AttemptResult {
        let own = self.own()?;
        let own_key = own.key.as_bytes().to_vec();
        let incompatible = self.keys.incompatible_ranges(self.mode);
        let mut compares: Vec<Compare> = incompatible
            .iter()
            .map(|(start, end)| {
                Compare::create_revision(start.clone(), CompareOp::Equal, 0).with_range(end.clone())
            })
            .collect();
        // Never adopt a key of ours that exists already (an orphan).
        compares.push(Compare::create_revision(
            own_key.clone(),
            CompareOp::Equal,
            0,
        ));
        let mut then = vec![put_op(own, &self.inner.config.owner, session)];
        if let (LockMode::Permits(_), Some((start, end))) =
            (self.mode, self.keys.compatible_range(self.mode))
        {
            then.push(TxnOp::get(
                start,
                Some(GetOptions::new().with_range(end).with_count_only()),
            ));
        }
        let mut otherwise: Vec<TxnOp> = incompatible
            .into_iter()
            .map(|(start, end)| TxnOp::get(start, Some(first_created().with_range(end))))
            .collect();
        otherwise.push(TxnOp::get(
            own_key,
            Some(GetOptions::new().with_keys_only()),
        ));
        let txn = Txn::new().when(compares).and_then(then).or_else(otherwise);
        let resp = self.txn(txn).await?;
        if !resp.succeeded {
            self.put = Put::Absent;
            return Err(self.contended(&resp));
        }
        let token = token_of(&resp)?;
        if let LockMode::Permits(n) = self.mode {
            let holders = holders_of(get_responses(&resp).first().map(|g| g.count()))?;
            if holders > i64::from(n.get()) {
                return Err(LockError::Locked {
                    name: self.name.clone(),
                    holder: None,
                }
                .into());
            }
        }
        self.granted(token)
    }

    /// The waiting acquisition.
    async fn put_and_wait(&mut self, session: &Session, timeout: Duration) -> AttemptResult {
        let own = self.own()?;
        let own_key = own.key.as_bytes().to_vec();
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                own_key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![
                put_op(own, &self.inner.config.owner, session),
                TxnOp::get(
                    self.keys.prefix(),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                ),
            ])
            .or_else(vec![TxnOp::get(
                own_key.clone(),
                Some(GetOptions::new().with_keys_only()),
            )]);
        let resp = self.txn(txn).await?;
        if !resp.succeeded {
            self.put = Put::Absent;
            return Err(match own_key_in(&resp, &own_key) {
                Some(revision) => Failure::Orphan {
                    key: own_key,
                    revision,
                },
                None => missing("our key (it vanished between the compare and the read)").into(),
            });
        }
        let token = token_of(&resp)?;
        let listing = get_responses(&resp)
            .into_iter()
            .next()
            .ok_or_else(|| missing("the name's keys"))?;
        let prefix = self.keys.prefix();
        let mut earlier: Vec<(i64, LockMode)> = Vec::new();
        for kv in listing.kvs() {
            if orphans::is_orphan(self.inner, prefix, kv.key(), kv.lease()) {
                orphans::delete_in_background(self.inner, kv.key(), kv.create_revision());
                continue;
            }
            if kv.create_revision() < token {
                earlier.push((kv.create_revision(), self.keys.mode_of(kv.key())));
            }
        }
        earlier.sort_unstable_by_key(|(rev, _)| *rev);
        match grant(self.mode, earlier.iter().map(|(_, m)| *m)) {
            Grant::Granted => return self.granted(token),
            Grant::Mismatch(theirs) => return Err(self.mismatch(theirs).into()),
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
        let waiting = self.wait_in_line(session, token);
        let outcome = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, waiting).await,
            None => Ok(waiting.await),
        };
        match outcome {
            Ok(Ok(())) => self.granted(token),
            Ok(Err(err)) => Err(err.into()),
            Err(_elapsed) => Err(LockError::Timeout {
                name: self.name.clone(),
                waited: self.started.elapsed(),
            }
            .into()),
        }
    }

    /// Waits until our key, created at `token`, is first in line for its mode.
    async fn wait_in_line(&self, session: &Session, token: i64) -> Result<(), LockError> {
        let own = self.own()?;
        let lost = session.signal().lost();
        tokio::pin!(lost);
        let mut closing = self.inner.closing.subscribe();
        let inner = self.inner;
        let prefix = self.keys.prefix();
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
                        // Orphans of ours anywhere in line hold the name
                        // against us or against those after us: clear them.
                        for k in queue.all() {
                            if orphans::is_orphan(inner, prefix, k.key, k.lease) {
                                orphans::delete_in_background(inner, k.key, k.create_revision);
                            }
                        }
                        let earlier = queue
                            .before(token)
                            .filter(|k| !orphans::is_orphan(inner, prefix, k.key, k.lease));
                        match grant(self.mode, earlier.map(|k| k.mode)) {
                            Grant::Granted => Some(Ok(())),
                            Grant::Wait => None,
                            Grant::Mismatch(theirs) => Some(Err(self.mismatch(theirs))),
                        }
                    })
                    .await?
            };
            let result = tokio::select! {
                reason = &mut lost => Err(LockError::Lost { name: self.name.clone(), reason }),
                _ = closing.wait_for(|closing| *closing) => Err(shut_down_error()),
                result = waited => result,
            };
            match result {
                Err(LockError::Unavailable { message, .. }) if !inner.sessions.is_closed() => {
                    tracing::debug!(%message, "watch unavailable; subscribing again");
                    tokio::time::sleep(RESUBSCRIBE_BACKOFF).await;
                }
                other => return other,
            }
        }
    }

    /// Sends a txn that may put our key, tracking what became of the put.
    ///
    /// The txn goes through the locker's [`Batcher`](super::batch::Batcher)
    /// from a task of its own, and answers through a channel kept in
    /// [`Put::InFlight`]: however this acquisition ends, whoever gets the
    /// answer (this call, the acquisition's drop, or the task when nobody is
    /// left to read it) cleans up after it.
    async fn txn(&mut self, txn: Txn) -> Result<Answer, LockError> {
        let own = self.own()?.clone();
        let deadline = self
            .setup_deadline
            .min(tokio::time::Instant::now() + self.inner.config.request_timeout);
        if deadline.saturating_duration_since(tokio::time::Instant::now()) < MIN_TXN_TIME {
            // Not sent: nothing to clean up but our claim.
            return Err(LockError::Unavailable {
                message: format!(
                    "etcd did not take the lock within {:?}",
                    self.inner.config.request_timeout
                ),
                source: None,
            });
        }
        let (reply, answer) = oneshot::channel();
        let request = async move {
            let name = Arc::clone(&own.prefix);
            let result = own
                .inner
                .batcher
                .write(name, Write::Txn(txn), deadline)
                .await;
            if let Err(result) = reply.send(result) {
                // Nobody is waiting: the acquisition was dropped.
                abandoned(own, result);
            }
        };
        self.put = Put::InFlight(answer);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(request)),
            Err(_) => request.await,
        }
        let Put::InFlight(answer) = &mut self.put else {
            return Err(missing("an answer"));
        };
        let result = answer.await.unwrap_or_else(|_| {
            Err(Failed {
                error: LockError::Unavailable {
                    message: "the etcd request task stopped".into(),
                    source: None,
                },
                maybe_applied: true,
            })
        });
        match result {
            // Callers correct this when the compare failed.
            Ok(answer) => {
                self.put = Put::Applied;
                Ok(answer)
            }
            Err(failed) => {
                self.put = if failed.maybe_applied {
                    Put::Uncertain
                } else {
                    Put::Absent
                };
                Err(failed.error)
            }
        }
    }

    fn granted(&mut self, token: i64) -> AttemptResult {
        let own = self.own.take().ok_or_else(|| LockError::Lost {
            name: self.name.clone(),
            reason: "acquisition already finished".into(),
        })?;
        self.put = Put::Absent;
        if self.inner.sessions.is_closed() {
            own.delete_in_background();
            return Err(shut_down_error().into());
        }
        if let Some(reason) = own.session.signal().reason() {
            let name = self.name.clone();
            own.delete_in_background();
            return Err(LockError::Lost { name, reason }.into());
        }
        let token = u64::try_from(token).map_err(|_| missing("a valid revision"))?;
        own.inner.local.set_token(&own.prefix, own.slot, token);
        let info = LockInfo::new(self.name.clone(), self.mode, token, own.session.signal())
            .with_backend(BACKEND)
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

    /// The failure of a try: an orphan of ours in the way, a mode conflict,
    /// or who holds the name.
    fn contended(&self, resp: &Answer) -> Failure {
        let gets = get_responses(resp);
        let Some((own, holders)) = gets.split_last() else {
            return missing("the holder's key").into();
        };
        if let Some(kv) = own.kvs().first() {
            return Failure::Orphan {
                key: kv.key().to_vec(),
                revision: kv.create_revision(),
            };
        }
        let first = holders
            .iter()
            .flat_map(|g| g.kvs())
            .min_by_key(|kv| kv.create_revision());
        let Some(kv) = first else {
            return LockError::Locked {
                name: self.name.clone(),
                holder: None,
            }
            .into();
        };
        if orphans::is_orphan(self.inner, self.keys.prefix(), kv.key(), kv.lease()) {
            return Failure::Orphan {
                key: kv.key().to_vec(),
                revision: kv.create_revision(),
            };
        }
        let theirs = self.keys.mode_of(kv.key());
        if let Grant::Mismatch(theirs) = grant(self.mode, [theirs]) {
            return self.mismatch(theirs).into();
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
        .into()
    }
}

impl Drop for Acquisition<'_> {
    fn drop(&mut self) {
        let Some(own) = self.own.take() else {
            return;
        };
        match std::mem::replace(&mut self.put, Put::Absent) {
            Put::Absent => own.inner.local.remove(&own.prefix, own.slot),
            Put::InFlight(mut answer) => {
                // Closed first: from here on the request's task cannot hand
                // its answer over, so exactly one of us cleans up.
                answer.close();
                if let Ok(result) = answer.try_recv() {
                    abandoned(own, result);
                }
            }
            Put::Applied => own.delete_in_background(),
            Put::Uncertain => uncertain(own),
        }
    }
}

/// Cleans up after a put whose acquisition was dropped before it read the
/// answer.
fn abandoned(own: OwnKey, result: Result<Answer, Failed>) {
    match result {
        Ok(answer) if answer.succeeded => own.delete_in_background(),
        Ok(answer) => {
            // Not applied. If our key was in the way, it is an orphan.
            if let Some(revision) = own_key_in(&answer, own.key.as_bytes()) {
                orphans::delete_in_background(&own.inner, own.key.as_bytes(), revision);
            }
            own.inner.local.remove(&own.prefix, own.slot);
        }
        Err(failed) if !failed.maybe_applied => own.inner.local.remove(&own.prefix, own.slot),
        Err(_) => uncertain(own),
    }
}

/// A put applied after our delete would leave a key nobody holds, kept alive
/// by our lease. So the lease is retired (new acquisitions get a fresh one,
/// and this one is revoked, taking any such key with it, once its last guard
/// is released) and the key is watched for until then.
fn uncertain(own: OwnKey) {
    tracing::debug!(key = %own.key, "put outcome unknown; retiring the lease");
    own.inner.sessions.retire(&own.session);
    orphans::suspect(
        &own.inner,
        &own.session,
        Arc::clone(&own.prefix),
        Arc::clone(&own.key),
    );
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

fn missing(what: &str) -> LockError {
    LockError::Unavailable {
        message: format!("etcd answered without {what}"),
        source: None,
    }
}

/// The fencing token of a txn that put our key: its revision (the
/// batch's, when it went in one). A reply without one is an error, never a
/// grant.
fn token_of(answer: &Answer) -> Result<i64, LockError> {
    revision_token(answer.revision)
}

fn revision_token(revision: Option<i64>) -> Result<i64, LockError> {
    match revision {
        Some(revision) if revision > 0 => Ok(revision),
        _ => Err(missing("a revision (no response header)")),
    }
}

/// How many permit holders a txn counted. A reply without the count is an
/// error, never "nobody".
fn holders_of(count: Option<i64>) -> Result<i64, LockError> {
    count.ok_or_else(|| missing("the count of holders"))
}

/// The create revision of `key` when the txn's last read found it.
fn own_key_in(answer: &Answer, key: &[u8]) -> Option<i64> {
    get_responses(answer)
        .last()?
        .kvs()
        .iter()
        .find(|kv| kv.key() == key)
        .map(|kv| kv.create_revision())
}

fn get_responses(answer: &Answer) -> Vec<&etcd_client::GetResponse> {
    answer
        .responses
        .iter()
        .filter_map(|op| match op {
            TxnOpResponse::Get(get) => Some(get),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_without_a_revision_is_an_error_not_token_zero() {
        assert!(matches!(
            revision_token(None),
            Err(LockError::Unavailable { .. })
        ));
        assert!(revision_token(Some(0)).is_err());
        assert_eq!(revision_token(Some(42)).ok(), Some(42));
    }

    #[test]
    fn a_reply_without_a_count_is_an_error_not_zero_holders() {
        assert!(matches!(
            holders_of(None),
            Err(LockError::Unavailable { .. })
        ));
        assert_eq!(holders_of(Some(0)).ok(), Some(0));
    }
}
