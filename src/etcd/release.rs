//! Giving a lock back: deleting its key, now or in the background.

use std::sync::Arc;
use std::time::Duration;

use super::session::Session;
use super::{rpc, Inner};
use crate::guard::{BoxFuture, Release};
use crate::LockError;

/// One key of ours in etcd, as the guard (or a failed acquisition) holds it.
pub(crate) struct OwnKey {
    pub(crate) inner: Arc<Inner>,
    pub(crate) prefix: Arc<str>,
    pub(crate) slot: u64,
    pub(crate) key: Arc<str>,
    pub(crate) session: Arc<Session>,
    pub(crate) runtime: Option<tokio::runtime::Handle>,
}

impl OwnKey {
    async fn delete_once(&self) -> Result<(), LockError> {
        let kv = self.inner.client.kv_client();
        rpc::idempotent(self.inner.config.request_timeout, "delete", || {
            let (mut kv, key) = (kv.clone(), self.key.as_bytes().to_vec());
            async move { kv.delete(key, None).await }
        })
        .await
        .map(drop)
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

    /// Deletes the key from a task of its own.
    pub(crate) fn delete_in_background(self) {
        self.inner.local.set_releasing(&self.prefix, self.slot);
        match self
            .runtime
            .clone()
            .or_else(|| tokio::runtime::Handle::try_current().ok())
        {
            Some(runtime) => drop(runtime.spawn(self.delete())),
            None => {
                // No runtime to send the delete from: the key stays until the
                // lease ends. Keep the local record consistent with that.
                tracing::warn!(key = %self.key, "no Tokio runtime to release the lock from");
            }
        }
    }

    fn forget(&self) {
        self.inner.local.remove(&self.prefix, self.slot);
    }
}

impl Release for OwnKey {
    fn release(self: Box<Self>) -> BoxFuture<Result<(), LockError>> {
        Box::pin(async move {
            self.inner.local.set_releasing(&self.prefix, self.slot);
            match self.delete_once().await {
                Ok(()) => {
                    self.forget();
                    Ok(())
                }
                Err(err) => {
                    self.delete_in_background();
                    Err(err)
                }
            }
        })
    }

    fn release_in_background(self: Box<Self>) {
        (*self).delete_in_background();
    }
}
