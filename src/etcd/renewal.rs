//! The task that keeps one lease alive.
//!
//! Renewal runs every `cadence`. After each answered keepalive the local
//! deadline becomes `sent + ttl - margin`, timed from when the request was
//! *sent*: the server cannot expire the lease before `sent + ttl`, so a holder
//! that trusts its lock only until the local deadline gives it up before anyone
//! else can be granted it. When the deadline passes without renewal, or etcd
//! says the lease is gone, every guard of the lease is told through its
//! [`LostSignal`](crate::LostSignal), the lease is revoked on a best-effort
//! basis, and the next acquisition grants a fresh lease.
//!
//! A keepalive sent to a stalled member would hang until its timeout, so each
//! renewal opens a fresh keepalive stream, hedged: if no answer came after
//! [`HEDGE_AFTER`], another stream (to a member the client picks at random) is
//! opened beside it. One renewal round may use at most half the time left
//! before the local deadline, so a round that fails outright still leaves
//! room for another.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use etcd_client::LeaseClient;
use tokio::time::Instant;

use super::rpc::{self, Hedge};
use super::session::Session;
use super::BACKEND;
use crate::{metrics, LostSignal};

/// How long a keepalive may go unanswered before another is sent beside it.
const HEDGE_AFTER: Duration = Duration::from_millis(100);
/// The shortest renewal round worth starting.
const MIN_ROUND: Duration = Duration::from_millis(10);
/// The longest pause before retrying a failed renewal round.
const RETRY_INTERVAL: Duration = Duration::from_millis(250);

pub(crate) struct Renewal {
    pub(crate) session: Weak<Session>,
    pub(crate) lease_id: i64,
    pub(crate) leases: LeaseClient,
    pub(crate) ttl: Duration,
    pub(crate) cadence: Duration,
    pub(crate) margin: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) paused: Arc<AtomicBool>,
    pub(crate) deadline: Instant,
}

/// Marks the session lost when the renewal task ends or is dropped. A task
/// that ends by itself has said why already; one dropped mid-way is being
/// cut off by its runtime's shutdown, which is no incident to warn about.
struct LostOnExit(Weak<Session>);

impl Drop for LostOnExit {
    fn drop(&mut self) {
        if let Some(session) = self.0.upgrade() {
            session.mark_lost_quietly("the lease renewal task stopped (its runtime shut down)");
        }
    }
}

enum Renewed {
    /// Renewed by a keepalive sent at this instant.
    At(Instant),
    /// etcd says the lease is gone.
    Gone,
}

impl Renewal {
    pub(crate) async fn run(mut self, granted_sent: Instant, signal: LostSignal) {
        // However this task ends (even dropped with its runtime), the
        // session's guards are told.
        let _lost_on_exit = LostOnExit(self.session.clone());
        let mut next = granted_sent + self.cadence;
        let lost = signal.lost();
        tokio::pin!(lost);
        loop {
            tokio::select! {
                // Lost elsewhere, the local deadline passed (the signal has a
                // timer of its own), or the session was dropped (no locker, no
                // guard). Reported once; a no-op when it was reported already.
                _ = &mut lost => {
                    if let Some(session) = self.session.upgrade() {
                        session.mark_lost("lease renewal failed until the local deadline");
                    }
                    break;
                }
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
            // At most half the time left: a round that fails leaves room for another.
            let budget = self.request_timeout.min((self.deadline - now) / 2);
            if budget < MIN_ROUND {
                next = self.deadline; // too little left for a round trip
                continue;
            }
            let round = Instant::now();
            let renewed = self.renew(budget).await;
            metrics::lease_renewal(BACKEND, matches!(renewed, Ok(Renewed::At(_))));
            match renewed {
                Ok(Renewed::At(sent)) => {
                    self.deadline = sent + self.ttl.saturating_sub(self.margin);
                    session.extend(self.deadline);
                    next = sent + self.cadence;
                }
                Ok(Renewed::Gone) => {
                    session.mark_lost("etcd reports the lease expired or revoked");
                    break;
                }
                Err(err) => {
                    tracing::debug!(lease_id = self.lease_id, error = %err, "lease renewal failed");
                    // A round that used its whole budget was hedged all along:
                    // the next starts at once. One that failed early (an error
                    // repeating cannot fix) pauses a little first.
                    next = if round.elapsed() >= budget {
                        Instant::now()
                    } else {
                        let left = self.deadline.saturating_duration_since(Instant::now());
                        Instant::now() + RETRY_INTERVAL.min(left / 4)
                    };
                }
            }
        }
        // A lease revoked on purpose is gone; an abandoned one is left to
        // expire (revoking it was refused already, as deleting its key was).
        let leave = self
            .session
            .upgrade()
            .is_some_and(|s| s.was_revoked() || s.is_abandoned());
        if !leave {
            self.revoke().await;
        }
    }

    /// One renewal round: hedged keepalives, each on a fresh stream.
    async fn renew(&self, budget: Duration) -> Result<Renewed, crate::LockError> {
        let lease_id = self.lease_id;
        let hedge = Hedge::for_timeout(budget).after(HEDGE_AFTER);
        let renewed = rpc::hedged(
            hedge,
            "lease keepalive",
            || {
                let mut leases = self.leases.clone();
                let sent = Instant::now();
                // Opening the stream sends one keepalive and reads its answer;
                // dropping it closes the stream.
                async move { leases.keep_alive(lease_id).await.map(|_| sent) }
            },
            |_| {},
        )
        .await;
        match renewed {
            Ok((sent, _)) => Ok(Renewed::At(sent)),
            Err(err) if rpc::lock_error_is_lease_not_found(&err) => Ok(Renewed::Gone),
            Err(err) => Err(err),
        }
    }

    /// Best effort: frees the lease's keys at once instead of at expiry.
    async fn revoke(&self) {
        let lease_id = self.lease_id;
        let revoked = rpc::hedged(
            Hedge::for_timeout(self.request_timeout),
            "lease revoke",
            || {
                let mut leases = self.leases.clone();
                async move { leases.revoke(lease_id).await }
            },
            |_| {},
        )
        .await;
        tracing::debug!(lease_id, ok = revoked.is_ok(), "lease revoked");
    }
}
