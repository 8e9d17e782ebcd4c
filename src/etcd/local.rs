//! The keys this locker has in etcd right now, by name: the in-process fast
//! path.
//!
//! A try-acquisition that conflicts with one of our own live keys is answered
//! `Locked` without a round trip. One that conflicts only with our own keys
//! whose release is in flight waits for those deletes first (bounded by the
//! request timeout), so a request that follows its predecessor's response on
//! the same process never races the predecessor's release.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

use crate::mode::{grant, Grant};
use crate::{Holder, LockError, LockMode, LockName};

#[derive(Default)]
pub(crate) struct LocalKeys {
    names: Mutex<HashMap<Arc<str>, LocalName>>,
    /// Woken whenever any key is removed or stops releasing.
    changed: Notify,
}

#[derive(Default)]
struct LocalName {
    keys: Vec<LocalKey>,
    /// (lease, slot) pairs never to be used again: a delete of that key was
    /// sent without an answer and might still land on a later incarnation.
    retired: Vec<(i64, u64)>,
    /// Woken whenever one of `keys` is removed.
    removed: Arc<Notify>,
}

struct LocalKey {
    /// Unique among this locker's live keys of the name; part of the key.
    slot: u64,
    mode: LockMode,
    key: Arc<str>,
    token: Option<u64>,
    releasing: bool,
}

/// The outcome of [`LocalKeys::claim`].
pub(crate) enum Claim {
    /// Recorded as ours under this slot and key; go ahead.
    Claimed(u64, Arc<str>),
    /// Refused without a round trip.
    Refused(LockError),
    /// Only our own releases in flight stand in the way: wait, then claim again.
    AfterRelease(OwnedNotified),
}

impl LocalKeys {
    fn names(&self) -> MutexGuard<'_, HashMap<Arc<str>, LocalName>> {
        // Each critical section is one insert or remove: a poisoned map is whole.
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// For a try, checks our own keys first; then takes the lowest free slot
    /// of `lease` and records the key `make_key` builds for it as ours.
    pub(crate) fn claim(
        &self,
        name: &LockName,
        prefix: &Arc<str>,
        mode: LockMode,
        is_try: bool,
        lease: i64,
        make_key: impl FnOnce(u64) -> String,
    ) -> Claim {
        let mut names = self.names();
        let ours = names.entry(Arc::clone(prefix)).or_default();
        if is_try {
            let live = ours.keys.iter().filter(|k| !k.releasing);
            match grant(mode, live.map(|k| k.mode)) {
                Grant::Granted => {}
                Grant::Wait => {
                    let first = ours.keys.iter().find(|k| !k.releasing);
                    let holder = Holder {
                        token: first.and_then(|k| k.token),
                        key: first.map(|k| k.key.to_string()),
                        lease_id: None,
                        same_locker: true,
                    };
                    return Claim::Refused(LockError::Locked {
                        name: name.clone(),
                        holder: Some(holder),
                    });
                }
                Grant::Mismatch(theirs) => {
                    return Claim::Refused(LockError::ModeConflict {
                        name: name.clone(),
                        ours: mode,
                        theirs,
                    })
                }
            }
            if grant(mode, ours.keys.iter().map(|k| k.mode)) != Grant::Granted {
                return Claim::AfterRelease(Arc::clone(&ours.removed).notified_owned());
            }
        }
        let slot = (0..)
            .find(|slot| {
                ours.keys.iter().all(|k| k.slot != *slot) && !ours.retired.contains(&(lease, *slot))
            })
            .unwrap_or(u64::MAX);
        let key: Arc<str> = Arc::from(make_key(slot));
        ours.keys.push(LocalKey {
            slot,
            mode,
            key: Arc::clone(&key),
            token: None,
            releasing: false,
        });
        Claim::Claimed(slot, key)
    }

    fn with_key(&self, prefix: &str, slot: u64, f: impl FnOnce(&mut LocalKey)) {
        if let Some(k) = self
            .names()
            .get_mut(prefix)
            .and_then(|ours| ours.keys.iter_mut().find(|k| k.slot == slot))
        {
            f(k);
        }
    }

    pub(crate) fn set_token(&self, prefix: &str, slot: u64, token: u64) {
        self.with_key(prefix, slot, |k| k.token = Some(token));
        self.changed.notify_waiters();
    }

    /// Our key is being deleted: it no longer refuses tries, it delays them.
    pub(crate) fn set_releasing(&self, prefix: &str, slot: u64) {
        self.with_key(prefix, slot, |k| k.releasing = true);
    }

    pub(crate) fn remove(&self, prefix: &str, slot: u64) {
        self.remove_and_retire(prefix, slot, None);
    }

    /// Removes our key and never uses its slot with `lease` again.
    pub(crate) fn retire(&self, prefix: &str, slot: u64, lease: i64) {
        self.remove_and_retire(prefix, slot, Some(lease));
    }

    fn remove_and_retire(&self, prefix: &str, slot: u64, retire: Option<i64>) {
        let mut names = self.names();
        if let Some(ours) = names.get_mut(prefix) {
            ours.keys.retain(|k| k.slot != slot);
            if let Some(lease) = retire {
                ours.retired.push((lease, slot));
            }
            ours.removed.notify_waiters();
            if ours.keys.is_empty() && ours.retired.is_empty() {
                names.remove(prefix);
            }
        }
        drop(names);
        self.changed.notify_waiters();
    }

    /// The lease is gone for good: no key of it can appear or be deleted
    /// late any more, so its retired slots are free again.
    pub(crate) fn forget_lease(&self, lease: i64) {
        self.names().retain(|_, ours| {
            ours.retired.retain(|(l, _)| *l != lease);
            !(ours.keys.is_empty() && ours.retired.is_empty())
        });
    }

    /// `true` while `key` of the name under `prefix` is ours (claimed, held
    /// or being released). A key of our lease that is not is an orphan.
    pub(crate) fn is_tracked(&self, prefix: &str, key: &[u8]) -> bool {
        self.names()
            .get(prefix)
            .is_some_and(|ours| ours.keys.iter().any(|k| k.key.as_bytes() == key))
    }

    /// How many of our keys exist (held or waiting).
    pub(crate) fn len(&self) -> usize {
        self.names().values().map(|n| n.keys.len()).sum()
    }

    /// How many slots are retired (kept from reuse after an unanswered delete).
    pub(crate) fn retired_slots(&self) -> usize {
        self.names().values().map(|n| n.retired.len()).sum()
    }

    /// How many keys are not settled: being acquired (no token yet) or
    /// being released.
    fn unsettled(&self) -> usize {
        self.names()
            .values()
            .flat_map(|n| &n.keys)
            .filter(|k| k.releasing || k.token.is_none())
            .count()
    }

    /// Waits until every key is held or gone (no acquisition or release in
    /// flight), or until `deadline`. Returns how many were still unsettled.
    pub(crate) async fn settled(&self, deadline: tokio::time::Instant) -> usize {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let left = self.unsettled();
            if left == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.unsettled();
            }
        }
    }
}
