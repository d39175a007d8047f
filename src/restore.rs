//! `pdledger restore`: a working data directory from a backup, without bringing back anyone
//! erased since.
//!
//! 1. The backup is verified (every frame, the chain, the manifest's head) before anything
//!    is written.
//! 2. Erasures are gathered from every newer data directory or backup given with
//!    `--erasures-from` (the `subject.erased` records of their logs; no key needed), and key
//!    tables from the backup and from those sources.
//! 3. The key table used is the newest one the keyring can open (its generation is in the
//!    keyring and the key check matches). A backup's own table is useless after a rotation
//!    destroyed its generation: then a newer source's table is needed, and without one the
//!    restore stops and says what to supply.
//! 4. The records and the table, minus every key of a subject erased in any source, go into
//!    a new store in a temporary directory beside the target; opening it derives everything
//!    else from the records (indexes, fences, views). Each erasure found elsewhere is then
//!    re-applied as an erasure event, so the fence holds and the trail shows it.
//! 5. The result is verified, then moved into place. On any failure the temporary directory
//!    is removed: never a half-written data directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::backup::{self, KeyTable};
use crate::keyring::Keyring;
use crate::ledger::{Ledger, OpenOptions};
use crate::record::{self, ChainHash, Kind, Position};
use crate::store::{Store, WriteBatch};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Backup(#[from] backup::BackupError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Open(#[from] crate::ledger::OpenError),
    #[error("{0}")]
    Refused(String),
}

pub struct Options {
    pub src: PathBuf,
    pub data: PathBuf,
    pub keyring: Keyring,
    pub erasures_from: Vec<PathBuf>,
    pub force: bool,
    /// How to open the restored store (schemas, view definitions).
    pub open: Box<dyn Fn(PathBuf, Keyring) -> OpenOptions>,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub records: u64,
    pub head: String,
    pub key_table: String,
    pub key_generation: u32,
    pub erasures_reapplied: Vec<Uuid>,
    pub subjects_without_key: u64,
    pub seconds: f64,
    pub records_per_second: f64,
}

/// An erasure found in some log: who, and from which source.
#[derive(Clone, Debug)]
struct Erased {
    source: String,
    reason: String,
    /// Categories kept by a retention rule (and not shredded since in that source).
    retain: Vec<crate::writer::Hold>,
}

impl Erased {
    fn keeps(&self, category: u8) -> bool {
        self.retain.iter().any(|h| h.category == category)
    }
}

/// Erasures in a log (keyless: they are ledger events in clear).
fn erasures_in(
    records: impl Iterator<Item = Result<(Position, Vec<u8>), String>>,
    source: &str,
    out: &mut BTreeMap<Uuid, Erased>,
) -> Result<(), RestoreError> {
    for item in records {
        let (pos, bytes) = item.map_err(|e| RestoreError::Refused(format!("{source}: {e}")))?;
        if bytes.get(1) != Some(&(Kind::Ledger as u8)) {
            continue;
        }
        let rec = record::decode(&bytes).map_err(|e| RestoreError::Refused(format!("{source}: record {pos}: {e}")))?;
        let v: Value = serde_json::from_slice(&rec.payload).unwrap_or(Value::Null);
        if rec.header.event_type == crate::writer::ERASED {
            let reason = v.get("reason").and_then(Value::as_str).unwrap_or("").to_owned();
            let retain = v.get("retained").and_then(|r| serde_json::from_value(r.clone()).ok()).unwrap_or_default();
            out.entry(rec.header.subject).or_insert(Erased { source: source.to_owned(), reason, retain });
        }
        if rec.header.event_type == crate::writer::SHREDDED {
            if let (Some(e), Some(c)) = (out.get_mut(&rec.header.subject), v.get("category").and_then(Value::as_u64)) {
                e.retain.retain(|h| h.category != c as u8);
            }
        }
    }
    Ok(())
}

/// Key tables and erasures from one `--erasures-from` source: a backup or a data directory
/// (which must not be in use).
fn gather(
    path: &Path,
    tables: &mut Vec<(String, KeyTable)>,
    erased: &mut BTreeMap<Uuid, Erased>,
) -> Result<(), RestoreError> {
    let name = path.display().to_string();
    if backup::is_backup(path) {
        let m = backup::read_manifest(path)?;
        if let Some(t) = backup::read_keys(path, &m)? {
            tables.push((name.clone(), t));
        }
        erasures_in(backup::records(path, &m), &name, erased)
    } else {
        let store = Store::open(path, "pdledger restore (reading erasures)", 16 << 20)?;
        let head = store.head()?.map(|h| h.0).unwrap_or(0);
        tables.push((name.clone(), KeyTable::of_store(&store, head)?));
        let records = store.records(1).map(|r| r.map(|(p, v)| (p, v.to_vec())).map_err(|e| e.to_string()));
        erasures_in(records, &name, erased)
    }
}

/// Removes the temporary directory unless the restore went through.
struct Cleanup(Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).map(|mut d| d.next().is_none()).unwrap_or(true)
}

/// Records copied per batch: about 45 MB of the sample register's records in memory.
const COPY_BATCH: usize = 100_000;

pub fn restore(opts: Options, mut progress: impl FnMut(&str)) -> Result<Summary, RestoreError> {
    let started = Instant::now();
    let mut progress = |step: &str| {
        tracing::info!(secs = started.elapsed().as_secs_f64(), "restore: {step}");
        progress(step)
    };
    if opts.data.exists() && !is_empty_dir(&opts.data) && !opts.force {
        return Err(RestoreError::Refused(format!(
            "{} is not empty: restore into a new directory, or pass --force to replace it",
            opts.data.display()
        )));
    }
    // 1. The backup, whole, before anything is written.
    progress("verifying the backup");
    let m = backup::read_manifest(&opts.src)?;
    let report = backup::verify(&opts.src, None)?;
    if !report.ok {
        return Err(RestoreError::Refused(format!(
            "the backup is damaged at position {}: {}; nothing was restored",
            report.first_bad_position.unwrap_or(0),
            report.reason.unwrap_or_default()
        )));
    }
    // 2. Erasures and key tables.
    let mut tables: Vec<(String, KeyTable)> = vec![];
    if let Some(t) = backup::read_keys(&opts.src, &m)? {
        tables.push((opts.src.display().to_string(), t));
    }
    let mut erased = BTreeMap::new();
    // Erasures the backup's own log holds are replayed from their records at open.
    let mut erased_before = BTreeMap::new();
    erasures_in(backup::records(&opts.src, &m), &opts.src.display().to_string(), &mut erased_before)?;
    for p in &opts.erasures_from {
        progress(&format!("reading erasures and keys from {}", p.display()));
        gather(p, &mut tables, &mut erased)?;
    }
    // 3. The newest table the keyring opens.
    let present = opts.keyring.generations().map_err(|e| RestoreError::Refused(e.to_string()))?;
    let mut usable: Option<(String, KeyTable)> = None;
    for (source, t) in tables.iter().cloned() {
        let Ok(master) = opts.keyring.load(t.generation) else { continue };
        if backup::unhex(&t.key_check).as_deref() != Some(&master.check_value()[..]) {
            continue;
        }
        let better =
            usable.as_ref().is_none_or(|(_, u)| (t.generation, t.as_of_position) > (u.generation, u.as_of_position));
        if better {
            usable = Some((source, t));
        }
    }
    let Some((table_source, table)) = usable else {
        let gens: Vec<String> = tables.iter().map(|(s, t)| format!("{s}: generation {}", t.generation)).collect();
        return Err(RestoreError::Refused(format!(
            "no key table I was given opens with keyring {} (it holds generations {present:?}; the tables are under {}). \
             A key rotation since the backup destroyed its generation: pass --erasures-from with a newer backup or \
             data directory of this ledger (its key table is under the current generation), or the keyring that \
             holds the backup's generation. Nothing was restored.",
            opts.keyring.describe(),
            if gens.is_empty() { "none".to_owned() } else { gens.join(", ") }
        )));
    };

    // 4. Into a temporary directory beside the target.
    let parent = opts.data.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&parent).map_err(|e| RestoreError::Refused(format!("{}: {e}", parent.display())))?;
    let name = opts.data.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into());
    let tmp = parent.join(format!(".{name}.restoring-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut cleanup = Cleanup(Some(tmp.clone()));
    progress("copying the log");
    let mut records = 0u64;
    let mut head = (0, ChainHash::GENESIS);
    {
        let store = Store::open(&tmp, "pdledger restore", 64 << 20)?;
        let mut batch = WriteBatch::default();
        for item in backup::records(&opts.src, &m) {
            let (pos, bytes) = item.map_err(RestoreError::Refused)?;
            if let Ok(rec) = record::decode(&bytes) {
                head = (pos, rec.hash);
            }
            batch.put_record(pos, bytes);
            records += 1;
            // Written by a thread per core over contiguous positions: the log's sled inserts
            // are most of the copy, and threads on separate ranges rarely meet.
            if batch.len() >= COPY_BATCH {
                store.apply_unordered(std::mem::take(&mut batch), crate::ledger::workers())?;
            }
        }
        store.apply_unordered(std::mem::take(&mut batch), crate::ledger::workers())?;
        batch.put_meta("format", &crate::ledger::FORMAT_VERSION.to_be_bytes());
        batch.put_meta("master_gen", &table.generation.to_be_bytes());
        batch.put_meta("key_check", &backup::unhex(&table.key_check).unwrap_or_default());
        if let Some(c) = table.credentials_key.as_deref().and_then(backup::unhex) {
            batch.put_meta(crate::rotate::META_CREDENTIALS, &c);
        }
        for (subject, category, wrapped) in &table.keys {
            // An erased subject's keys never reach the new store.
            let gone = |m: &BTreeMap<Uuid, Erased>| m.get(subject).is_some_and(|e| !e.keeps(*category));
            if gone(&erased) || gone(&erased_before) {
                continue;
            }
            batch.put_wrapped_key(*subject, *category, &backup::unhex(wrapped).unwrap_or_default());
        }
        store.commit(batch)?;
    }
    // Opening derives the rest from the records (see `redo_after_head`) and builds the views.
    progress("rebuilding indexes and views");
    let ledger = Ledger::open((opts.open)(tmp.clone(), opts.keyring.clone()))?;
    let mut reapplied = vec![];
    for (subject, e) in &erased {
        if ledger.subject_exists(*subject).unwrap_or(false) && ledger.erasure(*subject).ok().flatten().is_none() {
            let reason = format!("re-applied at restore: erased in {} ({})", e.source, e.reason);
            let reason: String = reason.chars().take(200).collect();
            ledger
                .submit(vec![crate::writer::Op::Erase {
                    subject: *subject,
                    reason,
                    actor: "restore".into(),
                    retain: e.retain.clone(),
                }])
                .map_err(|e| RestoreError::Refused(format!("re-applying an erasure: {e}")))?;
            reapplied.push(*subject);
        }
    }
    let mut without_key = 0u64;
    for s in ledger.store().subjects() {
        let s = s?;
        if ledger.erasure(s).ok().flatten().is_none() && ledger.store().key_categories(s)?.is_empty() {
            without_key += 1;
        }
    }
    ledger.close()?;

    // 5. Verified, then moved into place.
    progress("verifying the result");
    {
        let store = Store::open(&tmp, "pdledger restore", 16 << 20)?;
        let r = crate::verify::verify(&store, Some(crate::verify::Anchor { position: head.0, hash: head.1 }), |_| {})?;
        if !r.ok {
            return Err(RestoreError::Refused(format!(
                "the restored log does not verify at {}: {}",
                r.first_bad_position.unwrap_or(0),
                r.reason.unwrap_or_default()
            )));
        }
    }
    if opts.data.exists() {
        let old = parent.join(format!(".{name}.replaced-{}", std::process::id()));
        std::fs::rename(&opts.data, &old)
            .map_err(|e| RestoreError::Refused(format!("{}: {e}", opts.data.display())))?;
        std::fs::rename(&tmp, &opts.data)
            .map_err(|e| RestoreError::Refused(format!("{}: {e}", opts.data.display())))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, &opts.data)
            .map_err(|e| RestoreError::Refused(format!("{}: {e}", opts.data.display())))?;
    }
    if let Ok(f) = std::fs::File::open(&parent) {
        let _ = f.sync_all();
    }
    cleanup.0 = None;
    let seconds = started.elapsed().as_secs_f64();
    Ok(Summary {
        records,
        head: format!("{}:{}", head.0, head.1.to_hex()),
        key_table: table_source,
        key_generation: table.generation,
        erasures_reapplied: reapplied,
        subjects_without_key: without_key,
        seconds,
        records_per_second: records as f64 / seconds.max(1e-9),
    })
}
