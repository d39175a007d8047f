//! Subject keys in memory: unwrapped on first use from the store's wrapped-key table, then
//! kept in a bounded cache (cleared when full; keys zeroize when the last user drops them).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use uuid::Uuid;

use crate::crypto::{CryptoError, MasterKey, SubjectKey};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("subject key {subject}/{category}: {source}")]
    Unwrap { subject: Uuid, category: u8, source: CryptoError },
}

pub struct KeyCache {
    map: RwLock<HashMap<(Uuid, u8), Arc<SubjectKey>>>,
    max: usize,
    /// During a rotation, the next generation: keys already re-wrapped open with it.
    alternate: RwLock<Option<Arc<MasterKey>>>,
}

impl KeyCache {
    pub fn new(max: usize) -> KeyCache {
        KeyCache { map: RwLock::new(HashMap::new()), max: max.max(1), alternate: RwLock::new(None) }
    }

    /// The subject's key for `category`, or `None` when the subject has none (never had
    /// events of that category, or it was erased).
    pub fn get(
        &self,
        store: &Store,
        master: &MasterKey,
        subject: Uuid,
        category: u8,
    ) -> Result<Option<Arc<SubjectKey>>, KeyError> {
        if let Some(k) = self.map.read().expect("not poisoned").get(&(subject, category)) {
            return Ok(Some(k.clone()));
        }
        let Some(wrapped) = store.wrapped_key(subject, category)? else {
            return Ok(None);
        };
        let key = Arc::new(self.unwrap(master, subject, category, &wrapped)?);
        self.insert(subject, category, key.clone());
        Ok(Some(key))
    }

    /// Unwraps a subject key read from the store, with `master` or, while a rotation runs, the
    /// generation it moves to. Caches nothing: for callers that keep their own keys.
    pub fn unwrap(
        &self,
        master: &MasterKey,
        subject: Uuid,
        category: u8,
        wrapped: &[u8],
    ) -> Result<SubjectKey, KeyError> {
        match (master.unwrap(subject, category, wrapped), self.alternate()) {
            (Ok(k), _) => Ok(k),
            (Err(CryptoError::Generation { .. }), Some(alt)) => {
                alt.unwrap(subject, category, wrapped).map_err(|source| KeyError::Unwrap { subject, category, source })
            }
            (Err(source), _) => Err(KeyError::Unwrap { subject, category, source }),
        }
    }

    /// The generation a rotation under way moves to, if any.
    pub fn alternate(&self) -> Option<Arc<MasterKey>> {
        self.alternate.read().expect("not poisoned").clone()
    }

    pub fn set_alternate(&self, master: Option<Arc<MasterKey>>) {
        *self.alternate.write().expect("not poisoned") = master;
    }

    pub fn insert(&self, subject: Uuid, category: u8, key: Arc<SubjectKey>) {
        let mut map = self.map.write().expect("not poisoned");
        if map.len() >= self.max {
            map.clear();
        }
        map.insert((subject, category), key);
    }

    /// Forgets a subject's keys (erasure) or everything (rotation).
    pub fn forget(&self, subject: Option<Uuid>) {
        let mut map = self.map.write().expect("not poisoned");
        match subject {
            Some(s) => map.retain(|(k, _), _| *k != s),
            None => map.clear(),
        }
    }
}
