//! The only module that knows sled.
//!
//! One tree, `ledger`, keyed by a one-byte prefix and big-endian integers so byte order is
//! numeric order (layout in `docs/ARCHITECTURE.md`).
//!
//! A commit applies its writes one by one, in order, then makes them durable. We do not use
//! `sled::Batch`: measured here it costs about 100 µs more per durable write than the same
//! inserts made singly. sled recovers a prefix of its log after a crash, so a commit cut short
//! leaves a prefix of its writes; the ledger marks the last record of every commit and removes
//! an unmarked tail when it opens (`ledger::repair_tail`).
//!
//! Durability is ours: sled 0.34's `flush` ends in `sync_file_range`, which neither persists
//! file-size metadata nor flushes the drive cache, and its blob files are never synced at all.
//! So `commit` flushes, then `fsync`s the data file and any blob file sled wrote since.
//!
//! A lock file in the data directory keeps a second process out, and says who holds it.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::DirBuilderExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use uuid::Uuid;

use crate::record::{ChainHash, Position, HASH_LEN};

const TREE: &str = "ledger";
const INDEX_TREE: &str = "index";
const VIEWS_TREE: &str = "views";
const P_LOG: u8 = b'L';
const P_STREAM: u8 = b'S';
const P_KEY: u8 = b'K';
const P_META: u8 = b'M';
const P_SUBJECT: u8 = b'C';
const P_INDEX: u8 = b'I';
/// Reverse blind index: subject ‖ lookup kind ‖ hash, so erasure finds a subject's entries.
const P_INDEX_REV: u8 = b'J';
const P_AUDIT: u8 = b'A';
/// The audit index of every entry (`A` ‖ `x` ‖ position) and by subject (`A` ‖ `s` ‖ subject ‖
/// position).
const AUDIT_ALL: u8 = b'x';
const AUDIT_SUBJECT: u8 = b's';
/// Format 1's audit indexes by actor and by action (`A` ‖ `u` | `a`): gone since format 2,
/// removed when a format 1 store is opened.
const AUDIT_V1_TAGS: [u8; 2] = [b'u', b'a'];
const P_VIEW: u8 = b'V';
const P_ERASED: u8 = b'E';
const P_RESTRICTED: u8 = b'R';
/// Retention holds: subject ‖ category → until (ms), for categories kept after an erasure.
const P_HOLD: u8 = b'H';

pub const LOCK_FILE: &str = "pdledger.lock";
const STORE_DIR: &str = "store";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data directory {dir} is in use by {holder}; stop that process, or use the running server's API")]
    Locked { dir: PathBuf, holder: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the store in {dir} is damaged and cannot be opened: {detail}. Run `pdledger verify --data {dir}` for where, or restore from a backup")]
    Damaged { dir: PathBuf, detail: String },
    #[error("{}", sled_message(.0))]
    Sled(#[from] sled::Error),
    #[error("metadata {0} is damaged")]
    Meta(&'static str),
}

/// sled's errors in the ledger's words: damage is called damage, with what to do about it.
fn sled_message(e: &sled::Error) -> String {
    match e {
        sled::Error::Corruption { .. } => format!(
            "the store is damaged ({e}): run `pdledger verify` for the first damaged position, or restore from a backup"
        ),
        _ => format!("storage error: {e}"),
    }
}

/// A value read from the store.
pub struct Value(sled::IVec);

impl std::ops::Deref for Value {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    /// The log, keys, subjects, fences and metadata.
    tree: sled::Tree,
    /// Stream, blind and audit indexes: small entries at random places, kept out of the
    /// log's leaves (sled copies a whole leaf on every insert into it).
    index: sled::Tree,
    /// View documents: the largest values, rewritten on every event that touches them.
    views: sled::Tree,
    /// An open handle on sled's data file: `fsync` through it makes sled's writes durable.
    data_file: File,
    synced_blobs: Mutex<BTreeSet<std::ffi::OsString>>,
    _lock: File,
}

/// A keyspace beside the log: plain keys and values, no ordering guarantees with the log.
#[derive(Clone)]
pub struct Kv {
    tree: sled::Tree,
}

impl Kv {
    pub fn get(&self, key: &[u8]) -> Result<Option<Value>, StoreError> {
        Ok(self.tree.get(key)?.map(Value))
    }
    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.tree.insert(key, value)?;
        Ok(())
    }
    pub fn remove(&self, key: &[u8]) -> Result<(), StoreError> {
        self.tree.remove(key)?;
        Ok(())
    }
    pub fn scan(&self, prefix: &[u8]) -> impl Iterator<Item = Result<(Vec<u8>, Value), StoreError>> + '_ {
        self.tree.scan_prefix(prefix).map(|kv| {
            let (k, v) = kv?;
            Ok((k.to_vec(), Value(v)))
        })
    }
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

/// What one commit writes, in order.
#[derive(Default)]
pub struct WriteBatch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl WriteBatch {
    pub fn put_record(&mut self, position: Position, bytes: Vec<u8>) {
        self.ops.push((log_key(position), Some(bytes)));
    }
    pub fn put_stream(&mut self, subject: Uuid, version: u64, position: Position) {
        self.put(stream_key(subject, version), &position.to_be_bytes());
    }
    pub fn put_wrapped_key(&mut self, subject: Uuid, category: u8, wrapped: &[u8]) {
        self.put(wrapped_key_key(subject, category), wrapped);
    }
    pub fn put_head(&mut self, position: Position, hash: &ChainHash) {
        let mut v = position.to_be_bytes().to_vec();
        v.extend_from_slice(&hash.0);
        self.put(meta_key("head"), &v);
    }
    /// Marks a subject as existing, from the position that created it.
    pub fn put_subject(&mut self, subject: Uuid, position: Position) {
        let mut k = vec![P_SUBJECT];
        k.extend_from_slice(subject.as_bytes());
        self.put(k, &position.to_be_bytes());
    }
    /// A blind-index entry: this subject has an event at `position` whose lookup value
    /// hashes to `blind`.
    /// `sealed` is the normalised value sealed under the subject's key (see `lookup.rs`).
    pub fn put_index(&mut self, kind: u8, blind: &[u8; 32], subject: Uuid, position: Position, sealed: &[u8]) {
        self.put(index_key(kind, blind, subject), &position.to_be_bytes());
        self.put(index_rev_key(subject, kind, blind), sealed);
    }
    /// Removes one blind-index entry and its reverse entry.
    pub fn remove_index(&mut self, kind: u8, blind: &[u8; 32], subject: Uuid) {
        self.ops.push((index_key(kind, blind, subject), None));
        self.ops.push((index_rev_key(subject, kind, blind), None));
    }
    /// Index entries of one audit entry: in the list of all, and by subject when it has one.
    pub fn put_audit(&mut self, position: Position, subject: Option<Uuid>) {
        for k in audit_keys(position, subject) {
            self.put(k, &[]);
        }
    }
    pub fn remove_audit(&mut self, position: Position, subject: Option<Uuid>) {
        for k in audit_keys(position, subject) {
            self.ops.push((k, None));
        }
    }
    /// A sealed view document.
    pub fn put_view(&mut self, view: &str, subject: Uuid, sealed: Vec<u8>) {
        self.ops.push((view_key(view, subject), Some(sealed)));
    }
    pub fn remove_view(&mut self, view: &str, subject: Uuid) {
        self.ops.push((view_key(view, subject), None));
    }
    /// The erasure fence: the subject was erased by the record at `position`.
    pub fn put_erased(&mut self, subject: Uuid, position: Position) {
        self.put(subject_key(P_ERASED, subject), &position.to_be_bytes());
    }
    /// Wrapped keys are removed only by erasure (and replaced by rotation).
    pub fn remove_wrapped_key(&mut self, subject: Uuid, category: u8) {
        self.ops.push((wrapped_key_key(subject, category), None));
    }
    /// A retained category of an erased subject, to be shredded at `until_ms`.
    pub fn put_hold(&mut self, subject: Uuid, category: u8, until_ms: u64) {
        let mut k = subject_key(P_HOLD, subject);
        k.push(category);
        self.put(k, &until_ms.to_be_bytes());
    }
    pub fn remove_hold(&mut self, subject: Uuid, category: u8) {
        let mut k = subject_key(P_HOLD, subject);
        k.push(category);
        self.ops.push((k, None));
    }
    /// Art. 18 restriction, from the record at `position`; `None` lifts it.
    pub fn put_restricted(&mut self, subject: Uuid, position: Option<Position>) {
        let k = subject_key(P_RESTRICTED, subject);
        self.ops.push((k, position.map(|p| p.to_be_bytes().to_vec())));
    }
    pub fn remove_subject(&mut self, subject: Uuid) {
        let mut k = vec![P_SUBJECT];
        k.extend_from_slice(subject.as_bytes());
        self.ops.push((k, None));
    }
    pub fn put_meta(&mut self, name: &str, value: &[u8]) {
        self.put(meta_key(name), value);
    }
    pub fn remove_meta(&mut self, name: &str) {
        self.ops.push((meta_key(name), None));
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
    pub fn remove_record(&mut self, position: Position) {
        self.ops.push((log_key(position), None));
    }
    pub fn remove_stream(&mut self, subject: Uuid, version: u64) {
        self.ops.push((stream_key(subject, version), None));
    }
    fn put(&mut self, key: Vec<u8>, value: &[u8]) {
        self.ops.push((key, Some(value.to_vec())));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    /// Appends another batch's writes after this one's.
    pub fn extend(&mut self, other: WriteBatch) {
        self.ops.extend(other.ops);
    }
}

fn log_key(position: Position) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(P_LOG);
    k.extend_from_slice(&position.to_be_bytes());
    k
}

fn stream_prefix(subject: Uuid) -> Vec<u8> {
    let mut k = Vec::with_capacity(25);
    k.push(P_STREAM);
    k.extend_from_slice(subject.as_bytes());
    k
}

fn stream_key(subject: Uuid, version: u64) -> Vec<u8> {
    let mut k = stream_prefix(subject);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn wrapped_key_key(subject: Uuid, category: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.push(P_KEY);
    k.extend_from_slice(subject.as_bytes());
    k.push(category);
    k
}

fn index_key(kind: u8, blind: &[u8; 32], subject: Uuid) -> Vec<u8> {
    let mut k = Vec::with_capacity(50);
    k.push(P_INDEX);
    k.push(kind);
    k.extend_from_slice(blind);
    k.extend_from_slice(subject.as_bytes());
    k
}

fn index_rev_key(subject: Uuid, kind: u8, blind: &[u8; 32]) -> Vec<u8> {
    let mut k = Vec::with_capacity(50);
    k.push(P_INDEX_REV);
    k.extend_from_slice(subject.as_bytes());
    k.push(kind);
    k.extend_from_slice(blind);
    k
}

fn subject_key(prefix: u8, subject: Uuid) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(prefix);
    k.extend_from_slice(subject.as_bytes());
    k
}

fn view_prefix(view: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + view.len() + 16);
    k.push(P_VIEW);
    k.push(view.len() as u8);
    k.extend_from_slice(view.as_bytes());
    k
}

fn view_key(view: &str, subject: Uuid) -> Vec<u8> {
    let mut k = view_prefix(view);
    k.extend_from_slice(subject.as_bytes());
    k
}

/// Which audit index to walk: every entry, or one subject's. (Queries by actor or action walk
/// every entry and filter: two keys an entry at most, where format 1 wrote four.)
#[derive(Clone, Copy, Debug)]
pub enum AuditKey {
    All,
    Subject(Uuid),
}

impl AuditKey {
    fn prefix(&self) -> Vec<u8> {
        match self {
            AuditKey::All => vec![P_AUDIT, AUDIT_ALL],
            AuditKey::Subject(s) => {
                let mut k = vec![P_AUDIT, AUDIT_SUBJECT];
                k.extend_from_slice(s.as_bytes());
                k
            }
        }
    }
}

fn audit_keys(position: Position, subject: Option<Uuid>) -> impl Iterator<Item = Vec<u8>> {
    std::iter::once(AuditKey::All).chain(subject.map(AuditKey::Subject)).map(move |key| {
        let mut k = key.prefix();
        k.extend_from_slice(&position.to_be_bytes());
        k
    })
}

fn meta_key(name: &str) -> Vec<u8> {
    let mut k = vec![P_META];
    k.extend_from_slice(name.as_bytes());
    k
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Bytes available to the ledger on the file system holding `dir` (`statvfs`), or `None` when
/// it cannot be asked.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid C string and `st` a properly sized out-parameter; the result
    // is read only when the call succeeded.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

/// Takes the data directory's lock, or says who holds it.
fn lock(dir: &Path, holder: &str) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let mut f =
        fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io(&path))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            let holder = if text.trim().is_empty() { "another process".to_owned() } else { text.trim().to_owned() };
            return Err(StoreError::Locked { dir: dir.to_owned(), holder });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
    }
    f.set_len(0).map_err(io(&path))?;
    f.rewind().map_err(io(&path))?;
    write!(f, "process {} ({holder})", std::process::id()).map_err(io(&path))?;
    f.sync_all().map_err(io(&path))?;
    Ok(f)
}

/// Removes the snapshot files sled left unfinished (`snap.<16 hex>.generating`) when its
/// process died while writing one. sled 0.34 writes a snapshot at every open: to that name,
/// then fsync, then a rename to `snap.<16 hex>`, then it removes the older ones. But when it
/// reads, it takes the greatest name among all `snap.` files, the unfinished one included: a
/// kill at the wrong moment of an open (or of the `erase`, `backup` or `import` that opened
/// it) left a store that refused to open ("Read corrupted data", sled issues 1527 and 1533;
/// seen by `kill_during_erase_and_rotation_leaves_it_done_or_not_started`). Without it,
/// How long `Store::open` waits for a closing store's sled to let go of its file lock.
const SLED_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// sled 0.34 locks its `db` file for as long as any of its threads holds that file: a store
/// closed a moment ago, by this process or by one exiting, can still hold the lock while a
/// sled I/O thread finishes, and sled then refuses to open ("could not acquire lock"; sled's
/// own tests block on it for this reason). We hold the data directory's lock, so no one else
/// uses the store: wait, bounded, until the lock is free, then let sled take it. After the
/// bound, sled's refusal stands.
fn wait_for_closing_sled(sled_dir: &Path) -> Result<(), StoreError> {
    let db = sled_dir.join("db");
    let f = match fs::OpenOptions::new().read(true).write(true).open(&db) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()), // a new store
        Err(e) => return Err(io(&db)(e)),
    };
    let deadline = std::time::Instant::now() + SLED_LOCK_WAIT;
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(()), // released as `f` closes
            Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            Err(fs::TryLockError::WouldBlock) => return Ok(()),
            Err(fs::TryLockError::Error(e)) => return Err(io(&db)(e)),
        }
    }
}

/// sled reads the newest finished snapshot (or none) and replays its log from there, which
/// is what it does after any crash. Called with the directory lock held, so no other process
/// is writing one.
fn remove_unfinished_snapshots(sled_dir: &Path) -> Result<(), StoreError> {
    let entries = match fs::read_dir(sled_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(sled_dir)(e)),
    };
    let mut removed = false;
    for entry in entries {
        let entry = entry.map_err(io(sled_dir))?;
        let name = entry.file_name();
        let Some(lsn) = name.to_str().and_then(|n| n.strip_prefix("snap.")).and_then(|n| n.strip_suffix(".generating"))
        else {
            continue;
        };
        if lsn.len() == 16 && lsn.bytes().all(|b| b.is_ascii_hexdigit()) {
            let path = entry.path();
            fs::remove_file(&path).map_err(io(&path))?;
            tracing::warn!(file = %path.display(), "removed a snapshot sled left unfinished (a crash while it wrote it)");
            removed = true;
        }
    }
    if removed {
        File::open(sled_dir).and_then(|f| f.sync_all()).map_err(io(sled_dir))?;
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the store in `dir`. `holder` says who we are, for the
    /// message another process gets while we hold the lock.
    pub fn open(dir: &Path, holder: &str, cache_bytes: u64) -> Result<Store, StoreError> {
        // Owner-only: the contents are encrypted, but ids and times need not be public either.
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
        let lock = lock(dir, holder)?;
        let path = dir.join(STORE_DIR);
        remove_unfinished_snapshots(&path)?;
        wait_for_closing_sled(&path)?;
        let config = sled::Config::new()
            .path(&path)
            .cache_capacity(cache_bytes)
            // Our commits flush and fsync; sled's background flusher would only add
            // non-durable `sync_file_range` calls between them.
            .flush_every_ms(None);
        // sled 0.34 can panic on a damaged file rather than return an error: turn that into
        // a clear refusal instead of a crash or a half-open store.
        let opened = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let db = config.open()?;
            let tree = db.open_tree(TREE)?;
            let index = db.open_tree(INDEX_TREE)?;
            let views = db.open_tree(VIEWS_TREE)?;
            Ok::<_, sled::Error>((db, tree, index, views))
        }));
        let (db, tree, index, views) = match opened {
            Ok(Ok(v)) => v,
            Ok(Err(sled::Error::Io(e))) => return Err(io(&path)(e)),
            Ok(Err(e)) => return Err(StoreError::Damaged { dir: dir.to_owned(), detail: e.to_string() }),
            Err(panic) => {
                let detail = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "sled panicked while opening".into());
                return Err(StoreError::Damaged { dir: dir.to_owned(), detail });
            }
        };
        let data_path = path.join("db");
        let data_file = File::open(&data_path).map_err(io(&data_path))?;
        // The files sled just created must survive a power cut too.
        for d in [dir, path.as_path()] {
            File::open(d).and_then(|f| f.sync_all()).map_err(io(d))?;
        }
        let store = Store {
            dir: dir.to_owned(),
            db,
            tree,
            index,
            views,
            data_file,
            synced_blobs: Mutex::new(BTreeSet::new()),
            _lock: lock,
        };
        *store.synced_blobs.lock().expect("not poisoned") = store.blob_names()?;
        Ok(store)
    }

    /// Which sled tree holds keys of this prefix. (One sled log holds all trees, so a crash
    /// still keeps a prefix of the writes across them.)
    fn tree_for(&self, prefix: u8) -> &sled::Tree {
        match prefix {
            P_STREAM | P_INDEX | P_INDEX_REV | P_AUDIT => &self.index,
            P_VIEW => &self.views,
            _ => &self.tree,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn blob_names(&self) -> Result<BTreeSet<std::ffi::OsString>, StoreError> {
        let blobs = self.dir.join(STORE_DIR).join("blobs");
        match fs::read_dir(&blobs) {
            Ok(entries) => entries.map(|e| e.map(|e| e.file_name()).map_err(io(&blobs))).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
            Err(e) => Err(io(&blobs)(e)),
        }
    }

    /// Applies the writes in order and makes them durable: sled flush, then a real fsync of
    /// the data file (and of any blob file written since). Returns only once all of it is on
    /// stable storage. A crash before then leaves a prefix of the writes.
    pub fn commit(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.apply(batch)?;
        self.sync()
    }

    /// Applies the writes in order, without waiting for them to be durable: `sync` does that.
    pub fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
        for (k, v) in batch.ops {
            let tree = self.tree_for(k[0]);
            match v {
                Some(v) => tree.insert(k, v)?,
                None => tree.remove(k)?,
            };
        }
        Ok(())
    }

    /// Applies a batch of writes whose order does not matter (derived entries: indexes,
    /// documents), in key order, by up to `threads` threads over contiguous key ranges: sled
    /// inserts in key order cost a fraction of inserts at random places, and threads on
    /// separate ranges rarely meet.
    /// Of several writes to one key, the last wins, as it would applied in order.
    pub fn apply_unordered(&self, mut batch: WriteBatch, threads: usize) -> Result<(), StoreError> {
        // Stable, so writes to one key stay in their order; then only the last of them is kept
        // (no two threads ever write one key).
        batch.ops.sort_by(|a, b| a.0.cmp(&b.0));
        batch.ops.reverse();
        batch.ops.dedup_by(|later, earlier| later.0 == earlier.0);
        batch.ops.reverse();
        let per = batch.ops.len().div_ceil(threads.max(1)).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = batch
                .ops
                .chunks(per)
                .map(|part| {
                    scope.spawn(move || -> Result<(), StoreError> {
                        for (k, v) in part {
                            let tree = self.tree_for(k[0]);
                            match v {
                                Some(v) => tree.insert(&k[..], &v[..])?,
                                None => tree.remove(&k[..])?,
                            };
                        }
                        Ok(())
                    })
                })
                .collect();
            // Every thread joined before the first error is returned.
            let results: Vec<Result<(), StoreError>> =
                handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect();
            results.into_iter().collect()
        })
    }

    /// Flush and fsync whatever has been applied so far.
    pub fn sync(&self) -> Result<(), StoreError> {
        // Blob files first: sled writes them when a large item is logged (before the flush),
        // and the data file will point at them, so they must be on disk before it is.
        let now = self.blob_names()?;
        {
            let mut synced = self.synced_blobs.lock().expect("not poisoned");
            if now.len() != synced.len() || !now.is_subset(&synced) {
                let blobs = self.dir.join(STORE_DIR).join("blobs");
                for name in now.difference(&synced) {
                    let p = blobs.join(name);
                    File::open(&p).and_then(|f| f.sync_all()).map_err(io(&p))?;
                }
                File::open(&blobs).and_then(|f| f.sync_all()).map_err(io(&blobs))?;
                *synced = now;
            }
        }
        self.db.flush()?;
        let data_path = self.dir.join(STORE_DIR).join("db");
        self.data_file.sync_all().map_err(io(&data_path))?;
        Ok(())
    }

    pub fn meta(&self, name: &str) -> Result<Option<Value>, StoreError> {
        Ok(self.tree.get(meta_key(name))?.map(Value))
    }

    pub fn meta_u32(&self, name: &'static str) -> Result<Option<u32>, StoreError> {
        match self.meta(name)? {
            None => Ok(None),
            Some(v) => Ok(Some(u32::from_be_bytes(v[..].try_into().map_err(|_| StoreError::Meta(name))?))),
        }
    }

    /// The head (last position and its hash) as the store's metadata records it.
    pub fn head(&self) -> Result<Option<(Position, ChainHash)>, StoreError> {
        let Some(v) = self.meta("head")? else { return Ok(None) };
        if v.len() != 8 + HASH_LEN {
            return Err(StoreError::Meta("head"));
        }
        let pos = be_u64(&v[..8]).ok_or(StoreError::Meta("head"))?;
        Ok(Some((pos, ChainHash(v[8..].try_into().expect("32 bytes")))))
    }

    /// The highest position present in the log, whatever the metadata says.
    pub fn last_position(&self) -> Result<Option<Position>, StoreError> {
        match self.tree.scan_prefix([P_LOG]).next_back() {
            None => Ok(None),
            Some(kv) => Ok(be_u64(&kv?.0[1..])),
        }
    }

    pub fn record(&self, position: Position) -> Result<Option<Value>, StoreError> {
        Ok(self.tree.get(log_key(position))?.map(Value))
    }

    /// The log from `from` on, in order: (the position its key says, the stored bytes).
    pub fn records(&self, from: Position) -> impl Iterator<Item = Result<(Position, Value), StoreError>> + '_ {
        self.tree.range(log_key(from)..vec![P_LOG + 1]).map(|kv| {
            let (k, v) = kv?;
            let pos = be_u64(&k[1..]).ok_or(StoreError::Meta("log key"))?;
            Ok((pos, Value(v)))
        })
    }

    /// A subject's current stream version (0 when it has no events).
    pub fn stream_version(&self, subject: Uuid) -> Result<u64, StoreError> {
        match self.index.scan_prefix(stream_prefix(subject)).next_back() {
            None => Ok(0),
            Some(kv) => Ok(be_u64(&kv?.0[17..]).ok_or(StoreError::Meta("stream key"))?),
        }
    }

    /// A subject's stream, newest first: (version, position).
    pub fn stream_rev(&self, subject: Uuid) -> impl Iterator<Item = Result<(u64, Position), StoreError>> + '_ {
        self.index.scan_prefix(stream_prefix(subject)).rev().map(|kv| {
            let (k, v) = kv?;
            let version = be_u64(&k[17..]).ok_or(StoreError::Meta("stream key"))?;
            let pos = be_u64(&v).ok_or(StoreError::Meta("stream value"))?;
            Ok((version, pos))
        })
    }

    /// A subject's stream after `after_version`: (version, position), in order.
    pub fn stream(
        &self,
        subject: Uuid,
        after_version: u64,
    ) -> impl Iterator<Item = Result<(u64, Position), StoreError>> + '_ {
        let start = stream_key(subject, after_version.saturating_add(1));
        let end = stream_key(subject, u64::MAX);
        self.index.range(start..=end).map(|kv| {
            let (k, v) = kv?;
            let version = be_u64(&k[17..]).ok_or(StoreError::Meta("stream key"))?;
            let pos = be_u64(&v).ok_or(StoreError::Meta("stream value"))?;
            Ok((version, pos))
        })
    }

    /// The position a subject's stream entry for `version` points to.
    pub fn stream_position(&self, subject: Uuid, version: u64) -> Result<Option<Position>, StoreError> {
        Ok(self.index.get(stream_key(subject, version))?.and_then(|v| be_u64(&v)))
    }

    /// The positions every stream entry points to, in key order (for `verify --deep`).
    pub fn stream_positions(&self) -> impl Iterator<Item = Result<Position, StoreError>> + '_ {
        self.index.scan_prefix([P_STREAM]).map(|kv| {
            let (_, v) = kv?;
            be_u64(&v).ok_or(StoreError::Meta("stream value"))
        })
    }

    /// Whether every audit-index entry of the audit entry at `position` is there.
    pub fn audit_indexed(&self, position: Position, subject: Option<Uuid>) -> Result<bool, StoreError> {
        for k in audit_keys(position, subject) {
            if !self.index.contains_key(k)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The positions in the audit index by subject, every subject's, in no particular order.
    pub fn audit_subject_positions(&self) -> impl Iterator<Item = Result<Position, StoreError>> + '_ {
        self.index.scan_prefix([P_AUDIT, AUDIT_SUBJECT]).map(|kv| {
            let (k, _) = kv?;
            be_u64(&k[18..]).ok_or(StoreError::Meta("audit key"))
        })
    }

    /// Removes format 1's audit indexes by actor and by action. Returns how many entries
    /// went. Not made durable here (nothing reads them: a crash leaves some for the next
    /// call to find).
    pub fn drop_v1_audit_indexes(&self) -> Result<u64, StoreError> {
        let mut removed = 0;
        for tag in AUDIT_V1_TAGS {
            for kv in self.index.scan_prefix([P_AUDIT, tag]) {
                let (k, _) = kv?;
                self.index.remove(k)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The position that created a subject, if it exists.
    pub fn subject_created(&self, subject: Uuid) -> Result<Option<Position>, StoreError> {
        let mut k = vec![P_SUBJECT];
        k.extend_from_slice(subject.as_bytes());
        Ok(self.tree.get(k)?.and_then(|v| be_u64(&v)))
    }

    /// Subjects with an index entry for this lookup hash, at most `max`, with the position
    /// of the event that carried the value.
    pub fn lookup(&self, kind: u8, blind: &[u8; 32], max: usize) -> Result<Vec<(Uuid, Position)>, StoreError> {
        let mut prefix = vec![P_INDEX, kind];
        prefix.extend_from_slice(blind);
        self.index
            .scan_prefix(prefix)
            .take(max)
            .map(|kv| {
                let (k, v) = kv?;
                let subject = Uuid::from_slice(&k[34..]).map_err(|_| StoreError::Meta("index key"))?;
                Ok((subject, be_u64(&v).ok_or(StoreError::Meta("index value"))?))
            })
            .collect()
    }

    /// The log before `before`, newest first.
    pub fn records_rev(&self, before: Position) -> impl Iterator<Item = Result<(Position, Value), StoreError>> + '_ {
        self.tree.range(log_key(1)..log_key(before)).rev().map(|kv| {
            let (k, v) = kv?;
            let pos = be_u64(&k[1..]).ok_or(StoreError::Meta("log key"))?;
            Ok((pos, Value(v)))
        })
    }

    /// Positions of audit entries in one index, before `before`, newest first.
    pub fn audit_rev(
        &self,
        key: AuditKey,
        before: Position,
    ) -> impl Iterator<Item = Result<Position, StoreError>> + '_ {
        let prefix = key.prefix();
        let mut end = prefix.clone();
        end.extend_from_slice(&before.to_be_bytes());
        let n = prefix.len();
        self.index.range(prefix..end).rev().map(move |kv| {
            let (k, _) = kv?;
            be_u64(&k[n..]).ok_or(StoreError::Meta("audit key"))
        })
    }

    /// A subject's blind-index entries: (lookup kind, hash).
    pub fn index_of(&self, subject: Uuid) -> Result<Vec<(u8, [u8; 32])>, StoreError> {
        let prefix = subject_key(P_INDEX_REV, subject);
        let mut out = vec![];
        for kv in self.index.scan_prefix(prefix) {
            let (k, _) = kv?;
            let blind: [u8; 32] = k[18..].try_into().map_err(|_| StoreError::Meta("index key"))?;
            out.push((k[17], blind));
        }
        Ok(out)
    }

    /// Every reverse blind-index entry: (subject, kind, hash, sealed normalised value).
    pub fn index_rev_entries(&self) -> impl Iterator<Item = Result<(Uuid, u8, [u8; 32], Value), StoreError>> + '_ {
        self.index.scan_prefix([P_INDEX_REV]).map(|kv| {
            let (k, v) = kv?;
            let bad = || StoreError::Meta("reverse index key");
            let subject = Uuid::from_slice(k.get(1..17).ok_or_else(bad)?).map_err(|_| bad())?;
            let blind: [u8; 32] = k.get(18..50).and_then(|b| b.try_into().ok()).ok_or_else(bad)?;
            Ok((subject, k[17], blind, Value(v)))
        })
    }

    /// The position an index entry points at.
    pub fn index_position(&self, kind: u8, blind: &[u8; 32], subject: Uuid) -> Result<Option<Position>, StoreError> {
        Ok(self.index.get(index_key(kind, blind, subject))?.and_then(|v| be_u64(&v)))
    }

    /// Every blind-index entry: (kind, hash, subject, position of the event that carried it).
    pub fn index_entries(&self) -> impl Iterator<Item = Result<(u8, [u8; 32], Uuid, Position), StoreError>> + '_ {
        self.index.scan_prefix([P_INDEX]).map(|kv| {
            let (k, v) = kv?;
            let bad = || StoreError::Meta("index key");
            let blind: [u8; 32] = k.get(2..34).and_then(|b| b.try_into().ok()).ok_or_else(bad)?;
            let subject = Uuid::from_slice(k.get(34..).ok_or_else(bad)?).map_err(|_| bad())?;
            Ok((k[1], blind, subject, be_u64(&v).ok_or_else(bad)?))
        })
    }

    pub fn view(&self, view: &str, subject: Uuid) -> Result<Option<Value>, StoreError> {
        Ok(self.views.get(view_key(view, subject))?.map(Value))
    }

    /// A view's documents in subject-id order, after `after` (exclusive).
    pub fn views(
        &self,
        view: &str,
        after: Option<Uuid>,
    ) -> impl Iterator<Item = Result<(Uuid, Value), StoreError>> + '_ {
        let prefix = view_prefix(view);
        let n = prefix.len();
        let start = match after {
            Some(s) => {
                let mut k = view_key(view, s);
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        let mut end = prefix;
        end.extend_from_slice(&[0xff; 17]);
        self.views.range(start..end).map(move |kv| {
            let (k, v) = kv?;
            let subject = Uuid::from_slice(&k[n..]).map_err(|_| StoreError::Meta("view key"))?;
            Ok((subject, Value(v)))
        })
    }

    /// The subjects from `first` to `last` (both included) that have a document of `view`.
    pub fn view_subjects_between(
        &self,
        view: &str,
        first: Uuid,
        last: Uuid,
    ) -> impl Iterator<Item = Result<Uuid, StoreError>> + '_ {
        let n = view_prefix(view).len();
        self.views.range(view_key(view, first)..=view_key(view, last)).map(move |kv| {
            let (k, _) = kv?;
            Uuid::from_slice(&k[n..]).map_err(|_| StoreError::Meta("view key"))
        })
    }

    /// Removes every view document (before a rebuild). Returns how many.
    pub fn clear_views(&self, threads: usize) -> Result<u64, StoreError> {
        let mut n = 0;
        let mut batch = WriteBatch::default();
        for kv in self.views.scan_prefix([P_VIEW]) {
            batch.ops.push((kv?.0.to_vec(), None));
            n += 1;
            if batch.len() == 100_000 {
                self.apply_unordered(std::mem::take(&mut batch), threads)?;
            }
        }
        self.apply_unordered(batch, threads)?;
        Ok(n)
    }

    /// Every retention hold: (subject, category, until ms).
    pub fn holds(&self) -> impl Iterator<Item = Result<(Uuid, u8, u64), StoreError>> + '_ {
        self.tree.scan_prefix([P_HOLD]).map(|kv| {
            let (k, v) = kv?;
            let bad = || StoreError::Meta("hold");
            let subject = Uuid::from_slice(k.get(1..17).ok_or_else(bad)?).map_err(|_| bad())?;
            Ok((subject, *k.get(17).ok_or_else(bad)?, be_u64(&v).ok_or_else(bad)?))
        })
    }

    /// A subject's retention holds: (category, until ms).
    pub fn holds_of(&self, subject: Uuid) -> Result<Vec<(u8, u64)>, StoreError> {
        let mut out = vec![];
        for kv in self.tree.scan_prefix(subject_key(P_HOLD, subject)) {
            let (k, v) = kv?;
            out.push((*k.get(17).ok_or(StoreError::Meta("hold"))?, be_u64(&v).ok_or(StoreError::Meta("hold"))?));
        }
        Ok(out)
    }

    /// Every subject, in id order.
    /// The subjects from `first` to `last` (both included), in key order.
    pub fn subjects_between(&self, first: Uuid, last: Uuid) -> impl Iterator<Item = Result<Uuid, StoreError>> + '_ {
        self.tree.range(subject_key(P_SUBJECT, first)..=subject_key(P_SUBJECT, last)).map(|kv| {
            let (k, _) = kv?;
            k.get(1..).and_then(|b| Uuid::from_slice(b).ok()).ok_or(StoreError::Meta("subject key"))
        })
    }

    pub fn subjects(&self) -> impl Iterator<Item = Result<Uuid, StoreError>> + '_ {
        self.tree.scan_prefix([P_SUBJECT]).map(|kv| {
            let (k, _) = kv?;
            Uuid::from_slice(&k[1..]).map_err(|_| StoreError::Meta("subject key"))
        })
    }

    /// The position of the record that erased this subject, if it was erased.
    pub fn erased(&self, subject: Uuid) -> Result<Option<Position>, StoreError> {
        Ok(self.tree.get(subject_key(P_ERASED, subject))?.and_then(|v| be_u64(&v)))
    }

    /// The position of the record that restricted this subject, while it is restricted.
    pub fn restricted(&self, subject: Uuid) -> Result<Option<Position>, StoreError> {
        Ok(self.tree.get(subject_key(P_RESTRICTED, subject))?.and_then(|v| be_u64(&v)))
    }

    /// Every wrapped subject key: (subject, category, wrapped bytes).
    pub fn wrapped_keys(&self) -> impl Iterator<Item = Result<(Uuid, u8, Value), StoreError>> + '_ {
        self.tree.scan_prefix([P_KEY]).map(|kv| {
            let (k, v) = kv?;
            let subject = k.get(1..17).and_then(|b| Uuid::from_slice(b).ok()).ok_or(StoreError::Meta("key table"))?;
            Ok((subject, *k.get(17).ok_or(StoreError::Meta("key table"))?, Value(v)))
        })
    }

    /// The wrapped keys of the subjects from `first` to `last` (both included), in key order.
    pub fn wrapped_keys_between(
        &self,
        first: Uuid,
        last: Uuid,
    ) -> impl Iterator<Item = Result<(Uuid, u8, Value), StoreError>> + '_ {
        let mut end = subject_key(P_KEY, last);
        end.push(0xff);
        self.tree.range(subject_key(P_KEY, first)..=end).map(|kv| {
            let (k, v) = kv?;
            let subject = k.get(1..17).and_then(|b| Uuid::from_slice(b).ok()).ok_or(StoreError::Meta("key table"))?;
            Ok((subject, *k.get(17).ok_or(StoreError::Meta("key table"))?, Value(v)))
        })
    }

    /// The categories a subject holds keys for.
    pub fn key_categories(&self, subject: Uuid) -> Result<Vec<u8>, StoreError> {
        let mut out = vec![];
        for kv in self.tree.scan_prefix(subject_key(P_KEY, subject)) {
            let (k, _) = kv?;
            out.push(*k.get(17).ok_or(StoreError::Meta("key table"))?);
        }
        Ok(out)
    }

    /// A separate keyspace for records that are not part of the log (users, sessions). Its
    /// writes become durable with the next commit or `sync`.
    pub fn kv(&self, name: &str) -> Result<Kv, StoreError> {
        Ok(Kv { tree: self.db.open_tree(format!("kv:{name}"))? })
    }

    pub fn wrapped_key(&self, subject: Uuid, category: u8) -> Result<Option<Value>, StoreError> {
        Ok(self.tree.get(wrapped_key_key(subject, category))?.map(Value))
    }

    /// Test and tooling access to raw records: overwrite or remove the bytes at a position,
    /// bypassing the chain. Used by the tamper tests; never by the ledger itself.
    #[doc(hidden)]
    pub fn tamper_record(&self, position: Position, bytes: Option<&[u8]>) -> Result<(), StoreError> {
        match bytes {
            Some(b) => self.tree.insert(log_key(position), b)?,
            None => self.tree.remove(log_key(position))?,
        };
        self.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store whose sled file lock is still held, as by an I/O thread of a store closed a
    /// moment ago, opens once the lock is let go (sled alone refuses: "could not acquire lock").
    #[test]
    fn a_store_opens_once_a_closing_one_lets_go_of_its_lock() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), "test", 1 << 20).unwrap());
        let held = File::options().read(true).write(true).open(dir.path().join(STORE_DIR).join("db")).unwrap();
        held.lock().unwrap();
        let (opening, about_to_open) = std::sync::mpsc::channel::<()>();
        let releaser = std::thread::spawn(move || {
            about_to_open.recv().unwrap();
            // Let go only after the open has begun (a remnant outliving the close).
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        opening.send(()).unwrap();
        let store = Store::open(dir.path(), "test", 1 << 20);
        releaser.join().unwrap();
        assert!(store.is_ok(), "{:?}", store.err());
    }

    /// Writes applied out of order by several threads end as the same writes applied in
    /// order: the last write to a key wins, whatever the threads.
    #[test]
    fn unordered_apply_ends_where_ordered_apply_ends() {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let ordered = Store::open(dirs[0].path(), "test", 1 << 20).unwrap();
        let unordered = Store::open(dirs[1].path(), "test", 1 << 20).unwrap();
        let mut batch = WriteBatch::default();
        let subjects: Vec<Uuid> = (0..50).map(|_| Uuid::new_v4()).collect();
        for round in 0..4u64 {
            for (i, s) in subjects.iter().enumerate() {
                batch.put_stream(*s, round + 1, round * 100 + i as u64);
                // Restricted, lifted, restricted again: only the last may stand.
                batch.put_restricted(*s, (round % 2 == 0 || i % 3 == 0).then_some(round));
            }
        }
        for s in &subjects[..10] {
            batch.remove_stream(*s, 2);
        }
        let copy = WriteBatch { ops: batch.ops.clone() };
        ordered.apply(batch).unwrap();
        unordered.apply_unordered(copy, 3).unwrap();
        for tree in [TREE, INDEX_TREE] {
            let a: Vec<_> = ordered.db.open_tree(tree).unwrap().iter().collect::<Result<_, _>>().unwrap();
            let b: Vec<_> = unordered.db.open_tree(tree).unwrap().iter().collect::<Result<_, _>>().unwrap();
            assert!(!a.is_empty());
            assert_eq!(a, b, "tree {tree}");
        }
        for (i, s) in subjects.iter().enumerate() {
            assert_eq!(unordered.restricted(*s).unwrap(), (i % 3 == 0).then_some(3), "subject {i}");
            assert_eq!(unordered.stream_position(*s, 2).unwrap().is_some(), i >= 10);
        }
    }
}
