//! The locker's one lease, shared by all its locks, and the task that renews it.
//!
//! Renewal runs every `cadence`. After each answered keepalive the local
//! deadline becomes `sent + ttl - margin`, timed from when the request was
//! *sent*: the server cannot expire the lease before `sent + ttl`, so a holder
//! that trusts its lock only until the local deadline gives it up before anyone
//! else can be granted it. When the deadline passes without renewal, or etcd
//! says the lease is gone, every guard of the session is told through its
//! [`LostSignal`](crate::LostSignal), the lease is revoked on a best-effort
//! basis, and the next acquisition grants a fresh lease.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use etcd_client::{LeaseClient, LeaseKeepAliveStream, LeaseKeeper};
use tokio::time::Instant;
use tracing::Instrument;

use super::config::Config;
use super::rpc;
use crate::lost::{LostSignal, LostTrigger};
use crate::LockError;

/// How soon a failed renewal is retried.
const RETRY_INTERVAL: Duration = Duration::from_millis(250);

/// One granted lease.
#[derive(Debug)]
pub(crate) struct Session {
    lease_id: i64,
    trigger: LostTrigger,
}

impl Session {
    pub(crate) fn lease_id(&self) -> i64 {
        self.lease_id
    }

    pub(crate) fn signal(&self) -> LostSignal {
        self.trigger.signal()
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.trigger.is_triggered()
    }

    /// Moves the local deadline on after a renewal.
    fn extend(&self, deadline: Instant) {
        self.trigger.set_deadline(deadline.into_std());
    }

    pub(crate) fn mark_lost(&self, reason: &str) {
        if !self.is_lost() {
            tracing::warn!(lease_id = self.lease_id, reason, "lease lost");
        }
        self.trigger.trigger(reason);
    }
}

/// The current session of a locker, replaced when lost.
pub(crate) struct Sessions {
    current: Mutex<Option<Arc<Session>>>,
    granting: tokio::sync::Mutex<()>,
    /// When the last grant failed, and why: callers that queued behind that
    /// grant share its failure instead of trying again one after another.
    last_failure: Mutex<Option<(Instant, String)>>,
    /// Test hook: when set, renewals are skipped (the lease runs out).
    pub(crate) renewal_paused: Arc<AtomicBool>,
}

impl Sessions {
    pub(crate) fn new() -> Self {
        Self {
            current: Mutex::new(None),
            granting: tokio::sync::Mutex::new(()),
            last_failure: Mutex::new(None),
            renewal_paused: Arc::new(AtomicBool::new(false)),
        }
    }

    fn live(&self) -> Option<Arc<Session>> {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        current.as_ref().filter(|s| !s.is_lost()).cloned()
    }

    /// The live session, granting a lease first if there is none.
    pub(crate) async fn get(
        &self,
        client: &etcd_client::Client,
        config: &Config,
    ) -> Result<Arc<Session>, LockError> {
        if let Some(session) = self.live() {
            return Ok(session);
        }
        let queued = Instant::now();
        let _granting = self.granting.lock().await;
        if let Some(session) = self.live() {
            return Ok(session);
        }
        let failed = self
            .last_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some((at, message)) = failed.filter(|(at, _)| *at >= queued) {
            let ago = at.elapsed();
            return Err(LockError::Unavailable {
                message: format!("{message} ({ago:?} ago, while this request queued)"),
                source: None,
            });
        }
        let leases = client.lease_client();
        let ttl_secs = i64::try_from(config.ttl.as_secs()).unwrap_or(i64::MAX);
        let mut sent = Instant::now();
        let granted = rpc::idempotent(config.request_timeout, "lease grant", || {
            let mut leases = leases.clone();
            sent = Instant::now();
            async move { leases.grant(ttl_secs, None).await }
        })
        .await
        .inspect_err(|err| {
            *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((Instant::now(), err.to_string()));
        })?;
        let (trigger, _) = LostSignal::new();
        let granted_ttl = Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(0));
        let deadline = sent + granted_ttl.saturating_sub(config.safety_margin());
        trigger.set_deadline(deadline.into_std());
        let session = Arc::new(Session {
            lease_id: granted.id(),
            trigger,
        });
        tracing::debug!(
            lease_id = granted.id(),
            ttl = granted.ttl(),
            "lease granted"
        );
        let renewal = Renewal {
            session: Arc::downgrade(&session),
            lease_id: granted.id(),
            leases,
            ttl: granted_ttl,
            cadence: config.cadence,
            margin: config.safety_margin(),
            request_timeout: config.request_timeout,
            paused: Arc::clone(&self.renewal_paused),
            deadline,
            stream: None,
        };
        let span = tracing::debug_span!("lock.lease", lease_id = granted.id());
        tokio::spawn(renewal.run(sent, session.signal()).instrument(span));
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&session));
        Ok(session)
    }

    /// Drops the current session if it is `session` (after etcd said its lease is gone).
    pub(crate) fn forget(&self, session: &Arc<Session>) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, session)) {
            *current = None;
        }
    }
}

/// Marks the session lost when the renewal task ends or is dropped.
struct LostOnExit(Weak<Session>);

impl Drop for LostOnExit {
    fn drop(&mut self) {
        if let Some(session) = self.0.upgrade() {
            session.mark_lost("the lease renewal task stopped");
        }
    }
}

struct Renewal {
    session: Weak<Session>,
    lease_id: i64,
    leases: LeaseClient,
    ttl: Duration,
    cadence: Duration,
    margin: Duration,
    request_timeout: Duration,
    paused: Arc<AtomicBool>,
    deadline: Instant,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

enum Renewed {
    Ttl(Duration),
    Gone,
}

impl Renewal {
    async fn run(mut self, granted_sent: Instant, signal: LostSignal) {
        // However this task ends (even dropped with its runtime), the
        // session's guards are told.
        let _guard = LostOnExit(self.session.clone());
        let mut next = granted_sent + self.cadence;
        let lost = signal.lost();
        tokio::pin!(lost);
        loop {
            tokio::select! {
                // Lost elsewhere, or the session was dropped (no locker, no guard).
                _ = &mut lost => break,
                _ = tokio::time::sleep_until(next.min(self.deadline)) => {}
            }
            let Some(session) = self.session.upgrade() else {
                break;
            };
            let now = Instant::now();
            if now >= self.deadline {
                session.mark_lost("lease renewal failed until the local deadline");
                break;
            }
            if self.paused.load(Ordering::Relaxed) {
                next = now + self.cadence;
                continue;
            }
            let budget = self.request_timeout.min(self.deadline - now);
            match tokio::time::timeout(budget, self.renew_once()).await {
                Ok(Ok(Renewed::Ttl(ttl))) => {
                    self.deadline = now + ttl.saturating_sub(self.margin);
                    session.extend(self.deadline);
                    next = now + self.cadence;
                }
                Ok(Ok(Renewed::Gone)) => {
                    session.mark_lost("etcd reports the lease expired or revoked");
                    break;
                }
                Ok(Err(err)) => {
                    tracing::debug!(lease_id = self.lease_id, error = %err, "lease renewal failed");
                    self.stream = None;
                    next = now + RETRY_INTERVAL;
                }
                Err(_) => {
                    tracing::debug!(lease_id = self.lease_id, "lease renewal timed out");
                    self.stream = None;
                    next = now + RETRY_INTERVAL;
                }
            }
        }
        self.revoke().await;
    }

    async fn renew_once(&mut self) -> Result<Renewed, etcd_client::Error> {
        let Some((keeper, stream)) = self.stream.as_mut() else {
            // Opening the stream sends one keepalive and reads its answer.
            return match self.leases.keep_alive(self.lease_id).await {
                Ok(opened) => {
                    self.stream = Some(opened);
                    Ok(Renewed::Ttl(self.ttl))
                }
                Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(Renewed::Gone),
                Err(err) if rpc::is_lease_not_found(&err) => Ok(Renewed::Gone),
                Err(err) => Err(err),
            };
        };
        keeper.keep_alive().await?;
        match stream.message().await? {
            Some(resp) if resp.ttl() > 0 => Ok(Renewed::Ttl(Duration::from_secs(
                u64::try_from(resp.ttl()).unwrap_or(0),
            ))),
            Some(_) => Ok(Renewed::Gone),
            None => Err(etcd_client::Error::LeaseKeepAliveError(
                "keepalive stream closed".into(),
            )),
        }
    }

    /// Best effort: frees the lease's keys at once instead of at expiry.
    async fn revoke(&mut self) {
        self.stream = None;
        let revoked =
            tokio::time::timeout(self.request_timeout, self.leases.revoke(self.lease_id)).await;
        tracing::debug!(
            lease_id = self.lease_id,
            ok = matches!(revoked, Ok(Ok(_))),
            "lease revoked"
        );
    }
}
