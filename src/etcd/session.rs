//! The locker's leases: the current one, shared by all new locks, and the
//! retired ones that guards still hold.
//!
//! A lease is granted by the first acquisition and renewed by a task of its
//! own ([`renewal`](super::renewal)). It is *retired* (no new lock uses it)
//! when a put of unknown outcome might still land under it: new acquisitions
//! then get a fresh lease, and the retired one is revoked once its last guard
//! is gone, taking any such late key with it. Until then the
//! [`orphans`](super::orphans) sweeper deletes such keys if they appear.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;

use super::config::Config;
use super::local::LocalKeys;
use super::renewal::Renewal;
use super::rpc::{self, Hedge};
use super::BACKEND;
use crate::lost::{LostSignal, LostTrigger};
use crate::{metrics, LockError};

/// The reason given to guards when the locker shuts down.
pub(crate) const SHUT_DOWN: &str = "the locker shut down";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data whole; recover from poison.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Told the lease id when a session is dropped.
type OnDrop = Box<dyn FnOnce(i64) + Send>;

/// One granted lease.
pub(crate) struct Session {
    lease_id: i64,
    trigger: LostTrigger,
    /// Set once no new lock may use this lease.
    retired: AtomicBool,
    /// Set once the lease was revoked on purpose (shutdown): its renewal task
    /// need not revoke it again, and its loss is not a warning.
    revoked: AtomicBool,
    /// Set when a key of this lease can never be deleted: the lease is no
    /// longer renewed, so that it expires and takes the key with it.
    abandoned: AtomicBool,
    /// Told when the last reference is gone (the lease's keys and retired
    /// slots are then forgotten).
    on_drop: Mutex<Option<OnDrop>>,
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

    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    pub(crate) fn was_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    /// A key of this lease can never be deleted (etcd refuses it for good):
    /// the lease is retired and no longer renewed, so that etcd expires it
    /// within one TTL and the key goes with it. Its guards are lost now.
    pub(crate) fn abandon(&self, reason: &str) {
        self.retired.store(true, Ordering::Release);
        if !self.abandoned.swap(true, Ordering::AcqRel) {
            self.mark_lost(reason);
        }
    }

    pub(crate) fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Acquire)
    }

    /// Moves the local deadline on after a renewal.
    pub(crate) fn extend(&self, deadline: Instant) {
        self.trigger.set_deadline(deadline.into_std());
    }

    /// Tells every guard of this lease that it is lost. Logged as a warning
    /// unless the locker gave the lease up on purpose.
    pub(crate) fn mark_lost(&self, reason: &str) {
        // Once per lease: the first reason wins. (Not `is_lost()`: that is
        // already true when the local deadline passed, the usual way to here.)
        if !self.trigger.has_fired() && !self.was_revoked() {
            tracing::warn!(lease_id = self.lease_id, reason, "lease lost");
            metrics::lease_lost(BACKEND);
        }
        self.trigger.trigger(reason);
    }

    /// Tells the guards, logging only at debug level: for a renewal task
    /// dropped with its runtime (the process is stopping).
    pub(crate) fn mark_lost_quietly(&self, reason: &str) {
        tracing::debug!(lease_id = self.lease_id, reason, "lease given up");
        self.trigger.trigger(reason);
    }

    /// Marks the lease revoked on purpose and its guards lost, quietly.
    fn revoked_on_purpose(&self, reason: &str) {
        self.revoked.store(true, Ordering::Release);
        self.retired.store(true, Ordering::Release);
        tracing::debug!(lease_id = self.lease_id, reason, "lease given up");
        self.trigger.trigger(reason);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let on_drop = lock(&self.on_drop).take();
        if let Some(on_drop) = on_drop {
            on_drop(self.lease_id);
        }
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("lease_id", &self.lease_id)
            .field("retired", &self.is_retired())
            .field("lost", &self.is_lost())
            .finish()
    }
}

/// Every lease of a locker.
pub(crate) struct Sessions {
    current: Mutex<Option<Arc<Session>>>,
    granting: tokio::sync::Mutex<()>,
    /// When the last grant failed, and why: callers that queued behind that
    /// grant share its failure instead of trying again one after another.
    last_failure: Mutex<Option<(Instant, String)>>,
    /// Every lease granted and not yet dropped: the current one and the
    /// retired ones guards still hold. A key under one of these leases that
    /// the locker does not track is an orphan of ours.
    leases: Arc<Mutex<HashMap<i64, Weak<Session>>>>,
    local: Arc<LocalKeys>,
    /// Set by [`Sessions::shut_down`]: no lease is granted any more.
    closed: AtomicBool,
    /// Test hook: when set, renewals are skipped (the lease runs out).
    pub(crate) renewal_paused: Arc<AtomicBool>,
}

impl Sessions {
    pub(crate) fn new(local: Arc<LocalKeys>) -> Self {
        Self {
            current: Mutex::new(None),
            granting: tokio::sync::Mutex::new(()),
            last_failure: Mutex::new(None),
            leases: Arc::new(Mutex::new(HashMap::new())),
            local,
            closed: AtomicBool::new(false),
            renewal_paused: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The current session if it is usable. A lost or retired one is let
    /// go, so that it is dropped (and its lease revoked) with its last guard.
    fn live(&self) -> Option<Arc<Session>> {
        let mut current = lock(&self.current);
        if current
            .as_ref()
            .is_some_and(|s| s.is_lost() || s.is_retired())
        {
            *current = None;
        }
        current.clone()
    }

    /// `true` when `lease_id` is one of this locker's leases.
    pub(crate) fn is_ours(&self, lease_id: i64) -> bool {
        lease_id != 0
            && lock(&self.leases)
                .get(&lease_id)
                .is_some_and(|s| s.strong_count() > 0)
    }

    /// Every lease still referenced: the current one and the retired ones.
    pub(crate) fn all(&self) -> Vec<Arc<Session>> {
        lock(&self.leases)
            .values()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// How many leases this locker holds (current and retired).
    pub(crate) fn count(&self) -> usize {
        lock(&self.leases)
            .values()
            .filter(|s| s.strong_count() > 0)
            .count()
    }

    /// The live session, granting a lease first if there is none, by
    /// `deadline` at the latest.
    pub(crate) async fn get(
        &self,
        client: &etcd_client::Client,
        config: &Config,
        deadline: Instant,
    ) -> Result<Arc<Session>, LockError> {
        if self.is_closed() {
            return Err(shut_down_error());
        }
        if let Some(session) = self.live() {
            return Ok(session);
        }
        let queued = Instant::now();
        let Ok(_granting) = tokio::time::timeout_at(deadline, self.granting.lock()).await else {
            return Err(LockError::Unavailable {
                message: "etcd lease grant did not finish in time (queued behind another)".into(),
                source: None,
            });
        };
        if self.closed.load(Ordering::Acquire) {
            return Err(shut_down_error());
        }
        if let Some(session) = self.live() {
            return Ok(session);
        }
        let failed = lock(&self.last_failure).clone();
        if let Some((at, message)) = failed.filter(|(at, _)| *at >= queued) {
            let ago = at.elapsed();
            return Err(LockError::Unavailable {
                message: format!("{message} ({ago:?} ago, while this request queued)"),
                source: None,
            });
        }
        let budget = deadline
            .saturating_duration_since(Instant::now())
            .min(config.request_timeout);
        let session = self
            .grant(client, config, budget)
            .await
            .inspect_err(|err| {
                *lock(&self.last_failure) = Some((Instant::now(), err.to_string()))
            })?;
        *lock(&self.current) = Some(Arc::clone(&session));
        Ok(session)
    }

    async fn grant(
        &self,
        client: &etcd_client::Client,
        config: &Config,
        budget: Duration,
    ) -> Result<Arc<Session>, LockError> {
        let leases = client.lease_client();
        let ttl_secs = i64::try_from(config.ttl.as_secs()).unwrap_or(i64::MAX);
        // A hedged grant may grant twice: the extra leases are revoked.
        let revoke_extra = {
            let leases = leases.clone();
            move |(granted, _): (etcd_client::LeaseGrantResponse, Instant)| {
                let mut leases = leases.clone();
                tokio::spawn(async move {
                    let _ = leases.revoke(granted.id()).await;
                });
            }
        };
        let ((granted, sent), _) = rpc::hedged(
            // A grant that answers after we gave up must still be revoked.
            Hedge::for_timeout(config.request_timeout)
                .within(budget)
                .every_attempt_in_a_task(),
            "lease grant",
            || {
                let mut leases = leases.clone();
                let sent = Instant::now();
                async move { leases.grant(ttl_secs, None).await.map(|g| (g, sent)) }
            },
            revoke_extra,
        )
        .await?;
        let lease_id = granted.id();
        let (trigger, _) = LostSignal::new();
        let granted_ttl = Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(0));
        let deadline = sent + granted_ttl.saturating_sub(config.safety_margin());
        trigger.set_deadline(deadline.into_std());
        let (registry, local) = (Arc::downgrade(&self.leases), Arc::downgrade(&self.local));
        let on_drop = move |lease_id: i64| {
            if let Some(registry) = registry.upgrade() {
                lock(&registry).remove(&lease_id);
            }
            if let Some(local) = local.upgrade() {
                local.forget_lease(lease_id);
            }
        };
        let session = Arc::new(Session {
            lease_id,
            trigger,
            retired: AtomicBool::new(false),
            revoked: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            on_drop: Mutex::new(Some(Box::new(on_drop))),
        });
        lock(&self.leases).insert(lease_id, Arc::downgrade(&session));
        tracing::debug!(lease_id, ttl = granted.ttl(), "lease granted");
        metrics::lease_granted(BACKEND);
        let renewal = Renewal {
            session: Arc::downgrade(&session),
            lease_id,
            leases,
            ttl: granted_ttl,
            cadence: config.cadence,
            margin: config.safety_margin(),
            request_timeout: config.request_timeout,
            paused: Arc::clone(&self.renewal_paused),
            deadline,
        };
        let span = tracing::debug_span!("lock.lease", lease_id);
        tokio::spawn(renewal.run(sent, session.signal()).instrument(span));
        Ok(session)
    }

    /// Retires `session`: no new lock uses it. A fresh lease is granted for
    /// the next acquisition; this one is revoked when its last guard is gone.
    pub(crate) fn retire(&self, session: &Arc<Session>) {
        session.retired.store(true, Ordering::Release);
        let mut current = lock(&self.current);
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, session)) {
            *current = None;
        }
    }

    /// Refuses every later grant, revokes every lease (which deletes every
    /// key still under them) and tells their guards, quietly.
    pub(crate) async fn shut_down(
        &self,
        client: &etcd_client::Client,
        request_timeout: Duration,
    ) -> Result<(), LockError> {
        self.closed.store(true, Ordering::Release);
        // No grant is under way past this point.
        let _granting = self.granting.lock().await;
        // Every lease, held here: dropping the current one first could drop
        // its last reference before it is revoked.
        let sessions = self.all();
        lock(&self.current).take();
        let mut failure = None;
        for session in sessions {
            session.revoked_on_purpose(SHUT_DOWN);
            let lease_id = session.lease_id();
            let leases = client.lease_client();
            let revoked = rpc::hedged(
                Hedge::for_timeout(request_timeout),
                "lease revoke",
                || {
                    let mut leases = leases.clone();
                    async move { leases.revoke(lease_id).await }
                },
                |_| {},
            )
            .await;
            match revoked {
                Ok(_) => tracing::debug!(lease_id, "lease revoked"),
                // Already gone: its keys went with it.
                Err(err) if rpc::lock_error_is_lease_not_found(&err) => {}
                Err(err) => failure = Some(err),
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Refuses every later acquisition.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

pub(crate) fn shut_down_error() -> LockError {
    LockError::Unavailable {
        message: SHUT_DOWN.to_string(),
        source: None,
    }
}
