//! Keys of ours that nobody tracks, and their removal.
//!
//! A put whose outcome was unknown (it timed out) may still be applied after
//! the acquisition gave up on it and deleted its key: it then recreates a key
//! that no guard holds, kept alive by our lease. The lease is retired at once
//! (no new lock uses it), but guards may keep it alive a long time, and all
//! that time the key holds its name against everyone.
//!
//! Such a key is recognised by its lease (one of this locker's) and by not
//! being tracked by this locker, and deleted by a txn that compares its create
//! revision, so that nothing else is ever deleted. Orphans are found
//! - when an acquisition meets one: its own key already there, or one in the
//!   name's queue ([`acquire`](super::acquire));
//! - by a sweep, every second while a retired lease lives, of the keys whose
//!   put was uncertain ([`suspect`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::rpc::{self, Hedge};
use super::session::Session;
use super::Inner;
use crate::LockError;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data whole; recover from poison.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How often the keys of uncertain puts are checked while their lease lives.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A key whose put had an unknown outcome: `(prefix of its name, key)`.
type Suspect = (Arc<str>, Arc<str>);

#[derive(Default)]
pub(crate) struct Orphans {
    /// Orphans being deleted right now (one delete each).
    deleting: Mutex<HashSet<Vec<u8>>>,
    /// Per lease, the keys whose put had an unknown outcome.
    suspects: Mutex<HashMap<i64, Vec<Suspect>>>,
}

impl Orphans {
    pub(crate) fn suspects(&self) -> usize {
        lock(&self.suspects).values().map(Vec::len).sum()
    }
}

/// `true` when `key` (of the name under `prefix`, on `lease`) is ours but not
/// tracked: nobody holds or waits with it.
pub(crate) fn is_orphan(inner: &Inner, prefix: &str, key: &[u8], lease: i64) -> bool {
    inner.sessions.is_ours(lease) && !inner.local.is_tracked(prefix, key)
}

/// Deletes `key` if it still has `create_revision`.
pub(crate) async fn delete(
    inner: &Inner,
    key: &[u8],
    create_revision: i64,
) -> Result<(), LockError> {
    tracing::debug!(
        key = %String::from_utf8_lossy(key),
        create_revision,
        "deleting an orphan key of ours"
    );
    let kv = inner.client.kv_client();
    let key = key.to_vec();
    rpc::hedged(
        Hedge::for_timeout(inner.config.request_timeout),
        "delete",
        || {
            let (mut kv, key) = (kv.clone(), key.clone());
            async move {
                let txn = Txn::new()
                    .when(vec![Compare::create_revision(
                        key.clone(),
                        CompareOp::Equal,
                        create_revision,
                    )])
                    .and_then(vec![TxnOp::delete(key, None)]);
                kv.txn(txn).await
            }
        },
        |_| {},
    )
    .await
    .map(drop)
}

/// [`delete`] in a task of its own, once per key at a time.
pub(crate) fn delete_in_background(inner: &Arc<Inner>, key: &[u8], create_revision: i64) {
    if !lock(&inner.orphans.deleting).insert(key.to_vec()) {
        return;
    }
    let (inner, key) = (Arc::clone(inner), key.to_vec());
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        lock(&inner.orphans.deleting).remove(&key);
        return;
    };
    drop(runtime.spawn(async move {
        if let Err(err) = delete(&inner, &key, create_revision).await {
            tracing::debug!(error = %err, "orphan delete failed; the next sighting retries");
        }
        lock(&inner.orphans.deleting).remove(&key);
    }));
}

/// Remembers a key whose put had an unknown outcome on `session`'s lease,
/// and checks it every second while the lease lives.
pub(crate) fn suspect(inner: &Arc<Inner>, session: &Arc<Session>, prefix: Arc<str>, key: Arc<str>) {
    let lease_id = session.lease_id();
    let first = {
        let mut suspects = lock(&inner.orphans.suspects);
        let keys = suspects.entry(lease_id).or_default();
        keys.push((prefix, key));
        keys.len() == 1
    };
    if !first {
        return; // its sweeper runs already
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let (inner, session) = (Arc::downgrade(inner), Arc::downgrade(session));
    drop(runtime.spawn(sweep(inner, session, lease_id)));
}

/// Deletes the untracked suspects of one lease until the lease is gone.
async fn sweep(inner: Weak<Inner>, session: Weak<Session>, lease_id: i64) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let alive = session
            .upgrade()
            .is_some_and(|s| !s.is_lost() && !s.was_revoked());
        if !alive || inner.sessions.is_closed() {
            lock(&inner.orphans.suspects).remove(&lease_id);
            return;
        }
        let keys = lock(&inner.orphans.suspects)
            .get(&lease_id)
            .cloned()
            .unwrap_or_default();
        for (prefix, key) in keys {
            let mut kv = inner.client.kv_client();
            let found = rpc::with_timeout(inner.config.request_timeout, "range", async {
                kv.get(key.as_bytes(), None).await
            })
            .await;
            let Ok(found) = found else { continue };
            for kv in found.kvs() {
                if kv.lease() == lease_id && !inner.local.is_tracked(&prefix, kv.key()) {
                    delete_in_background(&inner, kv.key(), kv.create_revision());
                }
            }
        }
    }
}
