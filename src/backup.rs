//! Backups: the log copied as it grows, and the wrapped-key table beside it.
//!
//! A backup is a directory:
//!
//! - `log-NNNNNNNNNNNN.seg`: segments of frames `len u32 BE ‖ record bytes`, records exactly
//!   as stored (sealed, chained). Only appended to; a new segment every 64 MiB.
//! - `keys-GGGG-PPPPPPPPPPPP.json`: the wrapped-key table (every subject key wrapped under
//!   master generation G, as of log position P), the credentials key wrapped the same way, and
//!   the key check of generation G. Ciphertext only: useless without that generation.
//! - `manifest.json`: format, created/updated times, the last position and head hash, each
//!   segment's length in bytes, the key table's file. Written last, atomically (temp file,
//!   fsync, rename, fsync the directory): it is the commit point.
//!
//! A crash or a full disk at any moment leaves the manifest naming only bytes that were
//! fsynced before it; bytes past a segment's recorded length are cut off when the backup is
//! next written to, so it resumes where its manifest says. Never a master key, never clear
//! personal data: everything personal in it is sealed under keys wrapped under the master.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::record::{self, ChainHash, Position};
use crate::store::{Store, StoreError};

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT: &str = "pdledger.backup.v1";
pub const KEYS_FORMAT: &str = "pdledger.keys.v1";
const SEGMENT_MAX: u64 = 64 << 20;
/// A frame longer than this is damage (records are at most 1 MiB of payload).
const FRAME_MAX: usize = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.to_owned(), source }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Segment {
    pub file: String,
    pub first_position: Position,
    pub last_position: Position,
    /// Bytes of this file that belong to the backup (anything after is an unfinished write).
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KeysRef {
    pub file: String,
    pub generation: u32,
    pub as_of_position: Position,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub created_at: String,
    pub updated_at: String,
    pub first_position: Position,
    pub last_position: Position,
    pub head_hash: String,
    pub segments: Vec<Segment>,
    pub keys: Option<KeysRef>,
}

/// The wrapped-key table, as of a log position.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KeyTable {
    pub format: String,
    pub generation: u32,
    /// Hex of the generation's key check (tells a keyring that holds it).
    pub key_check: String,
    pub as_of_position: Position,
    /// Hex of the wrapped credentials key (TOTP secrets), if the store has one.
    pub credentials_key: Option<String>,
    /// (subject, category, hex of the wrapped key).
    pub keys: Vec<(Uuid, u8, String)>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

impl KeyTable {
    /// The store's key table now, labelled as of `as_of` (the durable head it goes with).
    pub fn of_store(store: &Store, as_of: Position) -> Result<KeyTable, BackupError> {
        let generation = store.meta_u32("master_gen")?.ok_or(StoreError::Meta("master_gen"))?;
        let key_check = store.meta("key_check")?.ok_or(StoreError::Meta("key_check"))?;
        let credentials_key = store.meta(crate::rotate::META_CREDENTIALS)?.map(|v| hex(&v));
        let mut keys = vec![];
        for item in store.wrapped_keys() {
            let (s, c, w) = item?;
            keys.push((s, c, hex(&w)));
        }
        Ok(KeyTable {
            format: KEYS_FORMAT.into(),
            generation,
            key_check: hex(&key_check),
            as_of_position: as_of,
            credentials_key,
            keys,
        })
    }
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), BackupError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    {
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    fs::rename(&tmp, &path).map_err(io(&path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}

pub fn read_manifest(dir: &Path) -> Result<Manifest, BackupError> {
    let path = dir.join(MANIFEST);
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    let m: Manifest = serde_json::from_str(&text)
        .map_err(|e| BackupError::Invalid(format!("{}: not a backup manifest: {e}", path.display())))?;
    if m.format != FORMAT {
        return Err(BackupError::Invalid(format!(
            "{}: format {}, this pdledger reads {FORMAT}",
            path.display(),
            m.format
        )));
    }
    Ok(m)
}

pub fn read_keys(dir: &Path, m: &Manifest) -> Result<Option<KeyTable>, BackupError> {
    let Some(k) = &m.keys else { return Ok(None) };
    let path = dir.join(&k.file);
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    let t: KeyTable = serde_json::from_str(&text)
        .map_err(|e| BackupError::Invalid(format!("{}: not a key table: {e}", path.display())))?;
    Ok(Some(t))
}

pub fn is_backup(dir: &Path) -> bool {
    dir.join(MANIFEST).is_file()
}

/// Appends to a backup directory (creating it), resuming from its manifest.
pub struct BackupWriter {
    dir: PathBuf,
    manifest: Manifest,
    /// The current segment, positioned at its recorded end.
    file: Option<File>,
}

impl BackupWriter {
    /// Opens `dir` for appending: a new backup when it is empty or missing, otherwise the
    /// backup its manifest describes, with any unfinished write cut off.
    pub fn open(dir: &Path) -> Result<BackupWriter, BackupError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let manifest = if dir.join(MANIFEST).exists() {
            read_manifest(dir)?
        } else {
            let stray = fs::read_dir(dir).map_err(io(dir))?.filter_map(Result::ok).any(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                !n.starts_with('.') && !n.starts_with("log-")
            });
            if stray {
                return Err(BackupError::Invalid(format!(
                    "{} is not empty and holds no backup manifest: give an empty or new directory",
                    dir.display()
                )));
            }
            let now = crate::time::rfc3339(crate::time::now_ms());
            Manifest {
                format: FORMAT.into(),
                created_at: now.clone(),
                updated_at: now,
                first_position: 1,
                last_position: 0,
                head_hash: ChainHash::GENESIS.to_hex(),
                segments: vec![],
                keys: None,
            }
        };
        let mut w = BackupWriter { dir: dir.to_owned(), manifest, file: None };
        w.reopen_segment()?;
        Ok(w)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn last_position(&self) -> Position {
        self.manifest.last_position
    }

    fn reopen_segment(&mut self) -> Result<(), BackupError> {
        self.file = None;
        if let Some(seg) = self.manifest.segments.last() {
            let path = self.dir.join(&seg.file);
            let mut f = OpenOptions::new().read(true).write(true).open(&path).map_err(io(&path))?;
            // Cut off whatever an interrupted write left past the committed length.
            f.set_len(seg.bytes).map_err(io(&path))?;
            f.seek(SeekFrom::End(0)).map_err(io(&path))?;
            self.file = Some(f);
        }
        Ok(())
    }

    /// Appends records (each the next position, chained to the last), fsyncs them, then
    /// commits the manifest. On an error nothing of this call is in the backup, and the
    /// next call starts again from the manifest.
    pub fn append(&mut self, records: &[(Position, Vec<u8>)]) -> Result<(), BackupError> {
        if records.is_empty() {
            return Ok(());
        }
        let result = self.try_append(records);
        if result.is_err() {
            // Forget the in-memory changes; the files are cut back when reopened.
            let on_disk = read_manifest(&self.dir).ok();
            if let Some(m) = on_disk {
                self.manifest = m;
            }
            let _ = self.reopen_segment();
        }
        result
    }

    fn try_append(&mut self, records: &[(Position, Vec<u8>)]) -> Result<(), BackupError> {
        let mut expected = self.manifest.last_position + 1;
        let mut prev = ChainHash::from_hex(&self.manifest.head_hash).unwrap_or(ChainHash::GENESIS);
        let mut touched: Vec<PathBuf> = vec![];
        for (pos, bytes) in records {
            if *pos != expected {
                return Err(BackupError::Invalid(format!("backup expects position {expected}, got {pos}")));
            }
            let rec = record::decode(bytes).map_err(|e| BackupError::Invalid(format!("record {pos}: {e}")))?;
            if rec.prev_hash != prev {
                return Err(BackupError::Invalid(format!("record {pos} does not chain to the backup's head")));
            }
            let need_new = match self.manifest.segments.last() {
                None => true,
                Some(s) => s.bytes >= SEGMENT_MAX,
            };
            if need_new {
                let name = format!("log-{pos:012}.seg");
                let path = self.dir.join(&name);
                let f = OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(true)
                    .read(true)
                    .open(&path)
                    .map_err(io(&path))?;
                self.file = Some(f);
                self.manifest.segments.push(Segment {
                    file: name,
                    first_position: *pos,
                    last_position: pos - 1,
                    bytes: 0,
                });
                touched.push(self.dir.clone());
            }
            let seg = self.manifest.segments.last_mut().expect("a segment");
            let path = self.dir.join(&seg.file);
            let f = self.file.as_mut().expect("the segment is open");
            f.write_all(&(bytes.len() as u32).to_be_bytes()).map_err(io(&path))?;
            f.write_all(bytes).map_err(io(&path))?;
            seg.bytes += 4 + bytes.len() as u64;
            seg.last_position = *pos;
            if !touched.contains(&path) {
                touched.push(path);
            }
            prev = rec.hash;
            expected += 1;
        }
        // Data first, then the manifest that names it.
        if let Some(f) = &self.file {
            f.sync_all().map_err(io(&self.dir))?;
        }
        if touched.contains(&self.dir) {
            sync_dir(&self.dir)?;
        }
        self.manifest.last_position = expected - 1;
        self.manifest.head_hash = prev.to_hex();
        self.commit_manifest()
    }

    /// Writes a new key table and commits the manifest naming it; the previous table file
    /// is removed afterwards.
    pub fn write_keys(&mut self, table: &KeyTable) -> Result<(), BackupError> {
        let name = format!("keys-{:04}-{:012}.json", table.generation, table.as_of_position);
        write_atomic(&self.dir, &name, &serde_json::to_vec(table).expect("serializes"))?;
        let old = self.manifest.keys.replace(KeysRef {
            file: name.clone(),
            generation: table.generation,
            as_of_position: table.as_of_position,
        });
        if let Err(e) = self.commit_manifest() {
            self.manifest.keys = old;
            return Err(e);
        }
        if let Some(o) = old {
            if o.file != name {
                let _ = fs::remove_file(self.dir.join(&o.file));
            }
        }
        Ok(())
    }

    fn commit_manifest(&mut self) -> Result<(), BackupError> {
        self.manifest.updated_at = crate::time::rfc3339(crate::time::now_ms());
        write_atomic(&self.dir, MANIFEST, &serde_json::to_vec_pretty(&self.manifest).expect("serializes"))
    }
}

/// The records of a backup, in order, as far as its manifest says (damage is an `Err` at
/// the place it is found).
pub fn records(dir: &Path, m: &Manifest) -> impl Iterator<Item = Result<(Position, Vec<u8>), String>> {
    let dir = dir.to_owned();
    m.segments.clone().into_iter().flat_map(move |seg| SegmentReader::new(dir.join(&seg.file), seg))
}

struct SegmentReader {
    path: PathBuf,
    seg: Segment,
    reader: Option<Result<BufReader<File>, String>>,
    read: u64,
    done: bool,
}

impl SegmentReader {
    fn new(path: PathBuf, seg: Segment) -> SegmentReader {
        SegmentReader { path, seg, reader: None, read: 0, done: false }
    }
}

impl Iterator for SegmentReader {
    type Item = Result<(Position, Vec<u8>), String>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.read >= self.seg.bytes {
            return None;
        }
        let path = self.path.clone();
        let r = self.reader.get_or_insert_with(|| {
            File::open(&path).map(BufReader::new).map_err(|e| format!("{}: {e}", path.display()))
        });
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                self.done = true;
                return Some(Err(e.clone()));
            }
        };
        let mut len = [0u8; 4];
        let name = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Err(e) = r.read_exact(&mut len) {
            self.done = true;
            return Some(Err(format!("{name} is shorter than its manifest says (at byte {}): {e}", self.read)));
        }
        let n = u32::from_be_bytes(len) as usize;
        if n > FRAME_MAX || self.read + 4 + n as u64 > self.seg.bytes {
            self.done = true;
            return Some(Err(format!("{name}: a frame at byte {} has an impossible length {n}", self.read)));
        }
        let mut bytes = vec![0u8; n];
        if let Err(e) = r.read_exact(&mut bytes) {
            self.done = true;
            return Some(Err(format!("{name} is shorter than its manifest says (at byte {}): {e}", self.read)));
        }
        self.read += 4 + n as u64;
        match record::decode(&bytes) {
            Ok(rec) => Some(Ok((rec.header.position, bytes))),
            Err(e) => {
                self.done = true;
                Some(Err(format!("{name} at byte {}: {e}", self.read - 4 - n as u64)))
            }
        }
    }
}

/// Checks a backup without any key: every frame, the chain, and the manifest's head.
pub fn verify(dir: &Path, anchor: Option<crate::verify::Anchor>) -> Result<crate::verify::Report, BackupError> {
    let m = read_manifest(dir)?;
    let head = ChainHash::from_hex(&m.head_hash)
        .ok_or_else(|| BackupError::Invalid("the manifest's head hash is not 64 hex digits".into()))?;
    Ok(crate::verify::verify_log(records(dir, &m), Some((m.last_position, head)), anchor, |_| {}))
}

/// Copies the store's log after what `w` holds, up to `head`, in chunks; then the key table,
/// when one is given. Returns the records copied.
pub fn ship(store: &Store, head: Position, w: &mut BackupWriter, keys: Option<&KeyTable>) -> Result<u64, BackupError> {
    const CHUNK: usize = 4096;
    let mut copied = 0;
    let mut chunk: Vec<(Position, Vec<u8>)> = Vec::with_capacity(CHUNK);
    let from = w.last_position() + 1;
    if from <= head {
        for item in store.records(from) {
            let (pos, bytes) = item?;
            if pos > head {
                break;
            }
            chunk.push((pos, bytes.to_vec()));
            if chunk.len() >= CHUNK {
                w.append(&chunk)?;
                copied += chunk.len() as u64;
                chunk.clear();
            }
        }
        w.append(&chunk)?;
        copied += chunk.len() as u64;
    }
    if let Some(k) = keys {
        w.write_keys(k)?;
    }
    Ok(copied)
}

/// A one-off backup of a store into `dest` (new or empty, or a backup of this same log to
/// bring up to date).
pub fn backup_store(store: &Store, head: Position, dest: &Path) -> Result<Manifest, BackupError> {
    let mut w = BackupWriter::open(dest)?;
    let keys = KeyTable::of_store(store, head)?;
    ship(store, head, &mut w, Some(&keys))?;
    Ok(w.manifest().clone())
}

/// What the continuous backup reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub dir: String,
    /// The last position in the backup.
    pub last_position: Position,
    /// Durable records not yet in the backup.
    pub lag_records: u64,
    /// The last failure, until a later round succeeds.
    pub error: Option<String>,
}

/// Continuous backup from a running ledger: a thread that copies every durable record to
/// the backup directory within `interval` of it becoming durable, and the key table after
/// every change to it. Failures (a full disk, a lost mount) are reported in `status` and
/// retried; the backup stays consistent and resumes where its manifest says.
pub struct Continuous {
    stop: std::sync::mpsc::Sender<()>,
    join: Option<std::thread::JoinHandle<()>>,
    status: std::sync::Arc<std::sync::Mutex<Status>>,
}

impl Continuous {
    pub fn spawn(
        ledger: std::sync::Arc<crate::ledger::Ledger>,
        dir: &Path,
        interval: std::time::Duration,
    ) -> Result<Continuous, BackupError> {
        let mut w = BackupWriter::open(dir)?;
        let status = std::sync::Arc::new(std::sync::Mutex::new(Status {
            dir: dir.display().to_string(),
            last_position: w.last_position(),
            ..Status::default()
        }));
        let (stop, rx) = std::sync::mpsc::channel::<()>();
        let st = status.clone();
        let join = std::thread::Builder::new()
            .name("pdledger-backup".into())
            .spawn(move || {
                let mut epoch_copied = None;
                loop {
                    let head = ledger.durable();
                    let epoch = ledger.key_epoch();
                    let round = (|| {
                        let keys = if epoch_copied != Some(epoch) { Some(ledger.key_table(head)?) } else { None };
                        ship(ledger.store(), head, &mut w, keys.as_ref())
                    })();
                    let wait = {
                        let mut s = st.lock().expect("not poisoned");
                        s.last_position = w.last_position();
                        s.lag_records = ledger.durable().saturating_sub(s.last_position);
                        match round {
                            Ok(_) => {
                                epoch_copied = Some(epoch);
                                s.error = None;
                                interval
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "continuous backup failed; retrying");
                                s.error = Some(e.to_string());
                                interval.max(std::time::Duration::from_secs(1))
                            }
                        }
                    };
                    match rx.recv_timeout(wait) {
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                        // Stopping: one last round, so a clean stop leaves the backup complete.
                        _ => {
                            let head = ledger.durable();
                            let keys = ledger.key_table(head).ok();
                            if let Err(e) = ship(ledger.store(), head, &mut w, keys.as_ref()) {
                                tracing::error!(error = %e, "final backup round failed");
                            }
                            return;
                        }
                    }
                }
            })
            .map_err(|e| BackupError::Invalid(format!("spawning the backup thread: {e}")))?;
        Ok(Continuous { stop, join: Some(join), status })
    }

    pub fn status(&self) -> Status {
        self.status.lock().expect("not poisoned").clone()
    }

    pub fn stop(&mut self) {
        let _ = self.stop.send(());
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

impl Drop for Continuous {
    fn drop(&mut self) {
        self.stop();
    }
}
