//! Master-key rotation: what makes an erasure complete.
//!
//! Erasure deletes a subject's wrapped keys, but sled keeps old values in its files until the
//! space is reused, and backups keep them for good. Rotation creates generation g+1, re-wraps
//! every remaining subject key (and the credentials key) under it, recomputes the blind index
//! under g+1's index key, makes that durable, and only then destroys generation g. Every
//! stale copy of an erased subject's key, and every stale index entry, is then under a key
//! that no longer exists anywhere.
//!
//! Crash safety, step by step (the marker `rotating` in the store's metadata says a rotation
//! to g+1 is under way; `resume` runs at open):
//!
//! 1. g+1 is written to the keyring (fsynced). A crash here leaves an unused generation,
//!    which `resume` destroys.
//! 2. The marker is written (fsynced).
//! 3. Keys are re-wrapped in place; each wrapped key names its generation, and the keyring
//!    holds both, so every key stays readable whatever the crash leaves.
//! 4. Index entries are recomputed in place; lookups try both index keys meanwhile.
//! 5. `master_gen`, the key check and the marker's removal are written (fsynced).
//! 6. g is destroyed. A crash before this leaves g in the keyring: `resume` destroys it.
//!
//! Appends wait while a rotation runs (the writer takes the same lock for each group).

use std::sync::Arc;
use std::time::Instant;

use uuid::Uuid;

use crate::crypto::{MasterKey, SubjectKey};
use crate::keyring::{Keyring, KeyringError};
use crate::store::{StoreError, WriteBatch};
use crate::writer::Shared;

/// Metadata: the generation a rotation under way moves to.
pub const META_ROTATING: &str = "rotating";
/// Metadata: the credentials key (sealing TOTP secrets), wrapped like a subject key.
pub const META_CREDENTIALS: &str = "credentials_key";
/// The (subject, category) the credentials key is wrapped under.
pub const CREDENTIALS_ID: (Uuid, u8) = (Uuid::nil(), 0xfe);

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    #[error("key rotation needs a keyring directory; PDLEDGER_MASTER_KEY holds a single generation")]
    EnvKeyring,
    #[error("rotation: {0}")]
    Failed(String),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Rotated {
    pub from: u32,
    pub to: u32,
    /// Subject keys re-wrapped.
    pub keys: u64,
    /// Blind-index entries recomputed.
    pub index_entries: u64,
    pub seconds: f64,
    /// Of which: re-wrapping keys, and recomputing the index.
    pub rewrap_seconds: f64,
    pub index_seconds: f64,
}

/// Rotates to a new generation. Blocks appends while it runs.
pub fn rotate(shared: &Shared, keyring: &Keyring) -> Result<Rotated, RotateError> {
    if matches!(keyring, Keyring::Env(..)) {
        return Err(RotateError::EnvKeyring);
    }
    let _paused = shared.rotation.lock().expect("not poisoned");
    let started = Instant::now();
    let old = shared.master();
    let new = Arc::new(MasterKey::generate(old.generation() + 1).map_err(|e| RotateError::Failed(e.to_string()))?);
    keyring.store(&new)?;
    let mut b = WriteBatch::default();
    b.put_meta(META_ROTATING, &new.generation().to_be_bytes());
    shared.store.commit(b)?;
    let f = finish(shared, keyring, &old, &new)?;
    Ok(Rotated {
        from: old.generation(),
        to: new.generation(),
        keys: f.keys,
        index_entries: f.index_entries,
        seconds: started.elapsed().as_secs_f64(),
        rewrap_seconds: f.rewrap_seconds,
        index_seconds: f.index_seconds,
    })
}

/// Completes a rotation that a crash interrupted, or cleans up after one: run at open,
/// before anything reads keys. Returns the master key to use.
pub fn resume(
    shared_store: &crate::store::Store,
    keyring: &Keyring,
    current: MasterKey,
) -> Result<(MasterKey, Option<MasterKey>), RotateError> {
    if matches!(keyring, Keyring::Env(..)) {
        return Ok((current, None));
    }
    let gens = keyring.generations()?;
    let marker = shared_store.meta(META_ROTATING)?.and_then(|v| v[..].try_into().ok().map(u32::from_be_bytes));
    match marker {
        Some(next) if gens.contains(&next) => {
            // Steps 3-5 to redo: the caller finishes with both keys.
            let new = keyring.load(next)?;
            Ok((current, Some(new)))
        }
        _ => {
            if marker.is_some() {
                let mut b = WriteBatch::default();
                b.remove_meta(META_ROTATING);
                shared_store.commit(b)?;
            }
            // Any other generation is left over from a rotation that finished (older) or
            // never started (newer, nothing wrapped under it): destroy it.
            for g in gens {
                if g != current.generation() {
                    keyring.destroy(g)?;
                    tracing::info!(generation = g, "destroyed a master-key generation left by an interrupted rotation");
                }
            }
            Ok((current, None))
        }
    }
}

/// What `finish` did.
pub struct Finished {
    pub keys: u64,
    pub index_entries: u64,
    pub rewrap_seconds: f64,
    pub index_seconds: f64,
}

/// Steps 3-6, idempotent: re-wrap, recompute the index, switch, destroy the old generation.
pub fn finish(
    shared: &Shared,
    keyring: &Keyring,
    old: &MasterKey,
    new: &Arc<MasterKey>,
) -> Result<Finished, RotateError> {
    let t = Instant::now();
    const CHUNK: usize = 10_000;
    let store = &shared.store;
    shared.keys.set_alternate(Some(new.clone()));
    let unwrap_any = |subject: Uuid, category: u8, wrapped: &[u8]| -> Result<SubjectKey, RotateError> {
        let gen = wrapped.get(..4).and_then(|g| g.try_into().ok()).map(u32::from_be_bytes).unwrap_or(0);
        let m = if gen == new.generation() { &**new } else { old };
        m.unwrap(subject, category, wrapped).map_err(|e| RotateError::Failed(format!("key {subject}/{category}: {e}")))
    };

    // Step 3: every subject key, and the credentials key.
    let mut keys = 0u64;
    let mut b = WriteBatch::default();
    let mut pending = 0;
    for item in store.wrapped_keys() {
        let (subject, category, wrapped) = item?;
        if wrapped.get(..4) == Some(&new.generation().to_be_bytes()[..]) {
            continue;
        }
        let key = unwrap_any(subject, category, &wrapped)?;
        let rewrapped = new.wrap(subject, category, &key).map_err(|e| RotateError::Failed(e.to_string()))?;
        b.put_wrapped_key(subject, category, &rewrapped);
        keys += 1;
        pending += 1;
        if pending >= CHUNK {
            store.apply(std::mem::take(&mut b))?;
            pending = 0;
        }
    }
    if let Some(wrapped) = store.meta(META_CREDENTIALS)? {
        if wrapped.get(..4) != Some(&new.generation().to_be_bytes()[..]) {
            let key = unwrap_any(CREDENTIALS_ID.0, CREDENTIALS_ID.1, &wrapped)?;
            let rewrapped =
                new.wrap(CREDENTIALS_ID.0, CREDENTIALS_ID.1, &key).map_err(|e| RotateError::Failed(e.to_string()))?;
            b.put_meta(META_CREDENTIALS, &rewrapped);
        }
    }
    store.apply(std::mem::take(&mut b))?;
    let rewrap_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();

    // Step 4: the blind index under the new index key, from the normalised values kept
    // sealed beside it (under each subject's key; never stored in clear).
    let new_index = new.index_key();
    let mut index_entries = 0u64;
    let entries: Vec<_> = store.index_rev_entries().collect::<Result<_, _>>()?;
    for (subject, kind, blind, sealed) in entries {
        let category = crate::lookup::sealed_category(&sealed);
        let key = match category {
            Some(c) => shared.keys.get(store, old, subject, c).map_err(|e| RotateError::Failed(e.to_string()))?,
            None => None,
        };
        let value = key.and_then(|k| crate::lookup::open_value(&k, subject, kind, &sealed));
        let (Some(value), Some(lookup)) = (value, crate::lookup::LookupKey::from_u8(kind)) else {
            // No key (erased) or nothing to re-hash: the entry cannot stay.
            b.remove_index(kind, &blind, subject);
            continue;
        };
        let fresh = new_index.blind(lookup.name(), &value);
        if fresh != blind {
            let pos = store.index_position(kind, &blind, subject)?.unwrap_or(0);
            b.remove_index(kind, &blind, subject);
            b.put_index(kind, &fresh, subject, pos, &sealed);
            index_entries += 1;
        }
        if b.len() >= CHUNK {
            store.apply(std::mem::take(&mut b))?;
        }
    }
    let index_seconds = t.elapsed().as_secs_f64();

    // Step 5: switch, durably.
    b.put_meta("master_gen", &new.generation().to_be_bytes());
    b.put_meta("key_check", &new.check_value());
    b.remove_meta(META_ROTATING);
    b.remove_meta(crate::rotator::META_DUE);
    store.commit(b)?;
    *shared.master.write().expect("not poisoned") = new.clone();
    shared.key_epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    shared.keys.set_alternate(None);

    // Step 6: the old generation goes.
    keyring.destroy(old.generation())?;
    tracing::info!(from = old.generation(), to = new.generation(), keys, index_entries, "rotated the master key");
    Ok(Finished { keys, index_entries, rewrap_seconds, index_seconds })
}
