//! Giving a lock back: deleting its key, now or in the background.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::batch::Write;
use super::rpc::{self, Hedge};
use super::session::Session;
use super::Inner;
use crate::guard::{BoxFuture, Release};
use crate::LockError;

/// One key of ours in etcd, as the guard (or a failed acquisition) holds it.
#[derive(Clone)]
pub(crate) struct OwnKey {
    pub(crate) inner: Arc<Inner>,
    pub(crate) prefix: Arc<str>,
    pub(crate) slot: u64,
    pub(crate) key: Arc<str>,
    pub(crate) session: Arc<Session>,
    pub(crate) runtime: Option<tokio::runtime::Handle>,
    /// Set when a delete of this key went unanswered (see `delete_once`).
    pub(crate) unanswered: Arc<AtomicBool>,
}

impl OwnKey {
    /// One delete, hedged within the request timeout. A plain delete, the
    /// cheapest write etcd has; if more than one attempt was sent, or none
    /// was answered, one might still land later, on a later incarnation of
    /// this key, so the key's slot is then never used again with this lease
    /// (see [`OwnKey::forget`]).
    async fn delete_once(&self) -> Result<(), LockError> {
        if self.session.was_revoked() {
            return Ok(()); // the key went with its lease
        }
        let inner = Arc::clone(&self.inner);
        let result = rpc::hedged(
            Hedge::for_timeout(self.inner.config.request_timeout),
            "delete",
            || {
                let (inner, name) = (Arc::clone(&inner), Arc::clone(&self.prefix));
                let key = self.key.as_bytes().to_vec();
                async move {
                    let deadline = tokio::time::Instant::now() + inner.config.request_timeout;
                    inner
                        .batcher
                        .write(name, Write::Delete(key), deadline)
                        .await
                        .map_err(|failed| failed.error)
                }
            },
            |_| {},
        )
        .await;
        match result {
            Ok((_, attempts)) => {
                if attempts > 1 {
                    self.unanswered.store(true, Ordering::Relaxed);
                }
                Ok(())
            }
            Err(err) => {
                self.unanswered.store(true, Ordering::Relaxed);
                Err(err)
            }
        }
    }

    /// Deletes the key, retrying until etcd confirms or the lease is lost
    /// (which removes the key anyway). Never leaves a key behind a live lease.
    pub(crate) async fn delete(self) {
        self.inner.local.set_releasing(&self.prefix, self.slot);
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.delete_once().await {
                Ok(()) => break,
                Err(err) if self.session.is_lost() || self.inner.sessions.is_closed() => {
                    tracing::debug!(key = %self.key, error = %err, "lease lost; key goes with it");
                    break;
                }
                // Refused for good (the token expired without refresh, a
                // role changed): retrying cannot help. The lease is left to
                // expire instead, and the key goes with it within one TTL.
                Err(err @ LockError::PermissionDenied { .. }) => {
                    tracing::warn!(key = %self.key, error = %err, "lock release refused; the lease is left to expire");
                    self.session.abandon(&format!(
                        "a lock key of this lease cannot be deleted: {err}"
                    ));
                    break;
                }
                Err(err) => {
                    tracing::warn!(key = %self.key, error = %err, "lock release failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        self.forget();
    }

    fn runtime(&self) -> Option<tokio::runtime::Handle> {
        self.runtime
            .clone()
            .or_else(|| tokio::runtime::Handle::try_current().ok())
    }

    /// Deletes the key from a task of its own.
    pub(crate) fn delete_in_background(self) {
        self.inner.local.set_releasing(&self.prefix, self.slot);
        match self.runtime() {
            Some(runtime) => drop(runtime.spawn(self.delete())),
            None => self.retire_lease("no Tokio runtime to release the lock from"),
        }
    }

    /// When the key cannot be deleted, the lease it is on must go instead:
    /// new acquisitions get a fresh lease, and this one is revoked (taking
    /// the key with it) once nothing else holds it.
    pub(crate) fn retire_lease(self, why: &str) {
        tracing::warn!(key = %self.key, why, "retiring the lease");
        self.inner.sessions.retire(&self.session);
        self.forget();
    }

    /// Drops our record of the key once it is gone. Slots are reused, so a
    /// delete that might still land must not meet a later holder of the same
    /// key: after an unanswered delete the slot is retired for this lease.
    pub(crate) fn forget(&self) {
        if self.unanswered.load(Ordering::Relaxed) {
            let lease = self.session.lease_id();
            self.inner.local.retire(&self.prefix, self.slot, lease);
        } else {
            self.inner.local.remove(&self.prefix, self.slot);
        }
    }
}

impl Release for OwnKey {
    fn release(self: Box<Self>) -> BoxFuture<Result<(), LockError>> {
        let own = *self;
        own.inner.local.set_releasing(&own.prefix, own.slot);
        let Some(runtime) = own.runtime() else {
            own.retire_lease("no Tokio runtime to release the lock from");
            return Box::pin(async { Ok(()) });
        };
        // The delete runs in a task of its own: dropping the caller's future
        // (a client that went away) cannot leave the key behind.
        let (first, reply) = oneshot::channel();
        drop(runtime.spawn(async move {
            let attempt = own.delete_once().await;
            let failed = attempt.is_err();
            let _ = first.send(attempt);
            if failed {
                own.delete().await; // retries until etcd confirms
            } else {
                own.forget();
            }
        }));
        Box::pin(async move {
            reply.await.unwrap_or_else(|_| {
                Err(LockError::Unavailable {
                    message: "the release task stopped".into(),
                    source: None,
                })
            })
        })
    }

    fn release_in_background(self: Box<Self>) {
        (*self).delete_in_background();
    }
}
