//! Giving a lock back: deleting its key, now or in the background.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use tokio::sync::oneshot;

use super::session::Session;
use super::{rpc, Inner};
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
    /// The key's create revision, once our put is known to have landed.
    /// Deletes then apply only to that incarnation of the key: slots are
    /// reused, and a delayed delete must never remove a later holder's key.
    pub(crate) token: Option<i64>,
}

impl OwnKey {
    async fn delete_once(&self) -> Result<(), LockError> {
        let kv = self.inner.client.kv_client();
        let timeout = self.inner.config.request_timeout;
        match self.token {
            Some(token) => rpc::idempotent(timeout, "delete", || {
                let mut kv = kv.clone();
                let key = self.key.as_bytes().to_vec();
                let txn = Txn::new()
                    .when(vec![Compare::create_revision(
                        key.clone(),
                        CompareOp::Equal,
                        token,
                    )])
                    .and_then(vec![TxnOp::delete(key, None)]);
                async move { kv.txn(txn).await }
            })
            .await
            .map(drop),
            // Unknown incarnation: only after an uncertain put, whose lease
            // is retired, so no later acquisition reuses this key.
            None => rpc::idempotent(timeout, "delete", || {
                let (mut kv, key) = (kv.clone(), self.key.as_bytes().to_vec());
                async move { kv.delete(key, None).await }
            })
            .await
            .map(drop),
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
                Err(err) if self.session.is_lost() => {
                    tracing::debug!(key = %self.key, error = %err, "lease lost; key goes with it");
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
        self.inner.sessions.forget(&self.session);
        self.forget();
    }

    fn forget(&self) {
        self.inner.local.remove(&self.prefix, self.slot);
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
