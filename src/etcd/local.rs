//! The keys this locker has in etcd right now, by name: the in-process fast
//! path. A try-acquisition that conflicts with one of our own keys is answered
//! `Locked` without a round trip.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::mode::{grant, Grant};
use crate::{Holder, LockError, LockMode, LockName};

#[derive(Default)]
pub(crate) struct LocalKeys {
    names: Mutex<HashMap<Arc<str>, Vec<LocalKey>>>,
}

struct LocalKey {
    seq: u64,
    mode: LockMode,
    key: Arc<str>,
    token: Option<u64>,
}

impl LocalKeys {
    fn names(&self) -> MutexGuard<'_, HashMap<Arc<str>, Vec<LocalKey>>> {
        // Each critical section is one insert or remove: a poisoned map is whole.
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// If our own keys already exclude a try of `mode`, the error to answer.
    /// Otherwise records `key` as ours (pending) and returns `None`.
    pub(crate) fn claim(
        &self,
        name: &LockName,
        prefix: &Arc<str>,
        mode: LockMode,
        seq: u64,
        key: &Arc<str>,
        is_try: bool,
    ) -> Option<LockError> {
        let mut names = self.names();
        let ours = names.entry(Arc::clone(prefix)).or_default();
        if is_try {
            match grant(mode, ours.iter().map(|k| k.mode)) {
                Grant::Granted => {}
                Grant::Wait => {
                    let first = ours.first();
                    let holder = Holder {
                        token: first.and_then(|k| k.token),
                        key: first.map(|k| k.key.to_string()),
                        lease_id: None,
                        same_locker: true,
                    };
                    return Some(LockError::Locked {
                        name: name.clone(),
                        holder: Some(holder),
                    });
                }
                Grant::Mismatch(theirs) => {
                    return Some(LockError::ModeConflict {
                        name: name.clone(),
                        ours: mode,
                        theirs,
                    })
                }
            }
        }
        ours.push(LocalKey {
            seq,
            mode,
            key: Arc::clone(key),
            token: None,
        });
        None
    }

    pub(crate) fn set_token(&self, prefix: &str, seq: u64, token: u64) {
        if let Some(k) = self
            .names()
            .get_mut(prefix)
            .and_then(|ours| ours.iter_mut().find(|k| k.seq == seq))
        {
            k.token = Some(token);
        }
    }

    pub(crate) fn remove(&self, prefix: &str, seq: u64) {
        let mut names = self.names();
        if let Some(ours) = names.get_mut(prefix) {
            ours.retain(|k| k.seq != seq);
            if ours.is_empty() {
                names.remove(prefix);
            }
        }
    }

    /// How many of our keys exist (held or waiting).
    pub(crate) fn len(&self) -> usize {
        self.names().values().map(Vec::len).sum()
    }
}
