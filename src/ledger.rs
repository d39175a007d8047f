//! `Ledger`: the store, the keys and the writer joined into one handle.
//!
//! Opening takes the data directory's lock, loads the master-key generation the store was
//! written under (creating generation 1 for a new store) and checks it belongs to this store,
//! checks the log's head against its metadata, and starts the writer. Appends are validated
//! here (pure) and sealed by the writer; reads decrypt with the subject's key and never show a
//! record that is not yet durable.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::crypto::{CryptoError, IndexKey, MasterKey};
use crate::keyring::{Keyring, KeyringError};
use crate::keys::KeyError;
use crate::lookup::LookupKey;
use crate::projection::{EventRef, Projections};
use crate::record::{self, ChainHash, DecodeError, Header, Kind, Position, Record};
use crate::schema::{EventSchema, Schemas, Violation};
use crate::store::{Store, StoreError, WriteBatch};
use crate::views::{self, Doc, Projector, ViewError};
use crate::writer::{self, Committed, Op, PreparedEvent, Reply, Shared, WriteError, WriterHandle};

/// The data directory's format. 2: the audit trail is indexed as a whole and by subject
/// (format 1 also by actor and by action; opening a format 1 store removes those, once).
pub const FORMAT_VERSION: u32 = 2;

/// Limits on everything that comes in. Each is a knob (see the README's limits table).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest `data` of one event, serialized.
    pub event_bytes_max: usize,
    /// Most events in one append request.
    pub events_per_append_max: usize,
    /// Submissions waiting for the writer before callers are told to come back later.
    pub queue_depth: usize,
    /// Most events the writer puts into one group commit.
    pub group_events_max: usize,
    /// sled's page cache.
    pub cache_bytes: u64,
    /// Unwrapped subject keys kept in memory.
    pub keys_cached_max: usize,
    /// Free space kept on the data directory's file system: below it, new data is refused
    /// (see [`writer::SpaceGuard`]).
    pub min_free_bytes: u64,
    /// Subjects whose documents a views rebuild holds in memory at once, per worker (see
    /// `ledger/rebuild.rs`): its memory bound.
    pub rebuild_range_subjects: usize,
    /// A range's spill file up to this size is read into memory and built subject by subject
    /// (faster: each subject's documents are sealed while in the CPU's caches); a larger one
    /// is read as a stream, in log order.
    pub rebuild_sort_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            event_bytes_max: 64 * 1024,
            events_per_append_max: 1000,
            queue_depth: 4096,
            group_events_max: 4096,
            cache_bytes: 64 * 1024 * 1024,
            keys_cached_max: 100_000,
            min_free_bytes: 64 * 1024 * 1024,
            rebuild_range_subjects: rebuild::RANGE_SUBJECTS,
            rebuild_sort_bytes: rebuild::SORT_BYTES,
        }
    }
}

mod rebuild;

/// Threads for bulk work split over the cores (rebuild, redo, a restore's copy): one per
/// core, at most four.
pub(crate) fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4)
}

pub struct OpenOptions {
    pub data: PathBuf,
    pub keyring: Keyring,
    pub schemas: Arc<Schemas>,
    /// Who is opening it, for the message another process gets while we hold the lock.
    pub holder: String,
    pub limits: Limits,
    pub projections: Arc<Projections>,
    /// Throw the view documents away and rebuild them from the log before opening.
    pub rebuild_views: bool,
    /// Called while views are rebuilt at open: (work done, work in all).
    pub progress: Option<Progress>,
}

/// (work done, work in all).
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

impl OpenOptions {
    /// Options with the shipped schemas and projections and default limits.
    pub fn new(data: PathBuf, keyring: Keyring, holder: &str) -> OpenOptions {
        let schemas = Arc::new(Schemas::builtin());
        let projections =
            Arc::new(Projections::builtin(&schemas).expect("the shipped projections are valid (a unit test checks)"));
        OpenOptions {
            data,
            keyring,
            schemas,
            holder: holder.to_owned(),
            limits: Limits::default(),
            projections,
            rebuild_views: false,
            progress: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    #[error("the data directory was written under master-key generation {needed}, but keyring {keyring} holds {present:?}; point --keyring at this data directory's keyring")]
    MissingGeneration { needed: u32, present: Vec<u32>, keyring: String },
    #[error("keyring {0} does not belong to this data directory (key check mismatch)")]
    WrongKeyring(String),
    #[error("the data directory has format {0}; this pdledger reads format {FORMAT_VERSION}")]
    Format(u32),
    #[error("the log and its head disagree: the store's head says position {meta}, the log ends at {log}. The store was damaged or cut; run `pdledger verify` and restore from a backup")]
    Inconsistent { meta: Position, log: Position },
    #[error("record at position {0} is damaged: {1}")]
    Damaged(Position, String),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("rebuilding views: {0}")]
    Views(#[from] ReadError),
    #[error("finishing an interrupted key rotation: {0}")]
    Rotate(#[from] crate::rotate::RotateError),
}

/// Why an event was refused before it reached the writer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error(transparent)]
    Schema(#[from] Violation),
    #[error("event data is {bytes} bytes, over the limit of {max}")]
    TooLarge { bytes: usize, max: usize },
    #[error("occurred_at must be YYYY-MM-DD or an RFC 3339 UTC time (YYYY-MM-DDTHH:MM:SSZ)")]
    OccurredAt,
    #[error("{count} events in one append, over the limit of {max}")]
    TooMany { count: usize, max: usize },
    #[error("an append needs at least one event")]
    Empty,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("record at position {position} is damaged: {detail}")]
    Damaged { position: Position, detail: String },
    #[error(transparent)]
    View(#[from] ViewError),
    #[error("the ledger stopped making writes durable")]
    Stopped,
}

impl From<DecodeError> for ReadError {
    fn from(e: DecodeError) -> ReadError {
        ReadError::Damaged { position: 0, detail: e.to_string() }
    }
}

/// A subject's event as read back, decrypted.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StoredEvent {
    pub position: Position,
    pub subject: Uuid,
    pub version: u64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub schema_version: u16,
    pub occurred_at: String,
    pub recorded_at: String,
    pub actor: String,
    pub data: Value,
}

/// A subject's event as the API answers it, its data the JSON text it was sealed as. The
/// fields are in the order of the answer.
#[derive(Debug, Serialize)]
pub struct RawEvent {
    pub version: u64,
    pub position: Position,
    #[serde(rename = "type")]
    pub event_type: String,
    pub occurred_at: String,
    pub recorded_at: String,
    pub actor: String,
    pub data: Box<serde_json::value::RawValue>,
}

/// The receipt of an erasure: what was erased, when, by which record, and whether the key
/// rotation that follows it (and makes every older copy of the subject's keys useless) has run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Erasure {
    pub subject: Uuid,
    pub position: Position,
    pub erased_at: String,
    #[serde(skip)]
    pub erased_at_ms: u64,
    /// Hash of the erasure record: with `position`, an anchor into the chain.
    pub hash: String,
    pub actor: String,
    pub reason: String,
    /// The master-key generation the subject's keys were wrapped under when it was erased.
    pub key_generation: u32,
    /// True once that generation has been destroyed by a rotation.
    pub complete: bool,
    /// Categories kept by a retention rule, until when, and whether they have been shredded
    /// since.
    pub retained: Vec<Retained>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Retained {
    pub category: String,
    pub until: String,
    pub shredded: bool,
}

/// What a record's payload is, once we tried to open it.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// A subject's event, decrypted.
    Event { occurred_at: String, data: Value },
    /// A subject's event whose key no longer exists: crypto-shredded.
    Shredded,
    /// A ledger event (audit, erasure, rotation), in clear.
    Ledger(Value),
}

#[derive(Debug, Clone)]
pub struct LogEntry {
    pub header: Header,
    pub hash: ChainHash,
    pub payload: Payload,
}

pub struct Ledger {
    shared: Arc<Shared>,
    writer: WriterHandle,
    join: Mutex<Option<std::thread::JoinHandle<()>>>,
    schemas: Arc<Schemas>,
    projections: Arc<Projections>,
    limits: Limits,
    keyring: Keyring,
    credentials: Arc<crate::crypto::SubjectKey>,
}

impl Ledger {
    pub fn open(opts: OpenOptions) -> Result<Ledger, OpenError> {
        opts.keyring.check_outside(&opts.data)?;
        let store = Store::open(&opts.data, &opts.holder, opts.limits.cache_bytes)?;
        let master = load_or_create_master(&store, &opts.keyring)?;
        let (master, rotating_to) = crate::rotate::resume(&store, &opts.keyring, master)?;

        // The log and its metadata must agree before we add to either.
        repair_tail(&store, opts.limits.group_events_max)?;
        let last = store.last_position()?.unwrap_or(0);
        let (mut head_pos, mut head_hash) = store.head()?.unwrap_or((0, ChainHash::GENESIS));
        if head_pos > last {
            return Err(OpenError::Inconsistent { meta: head_pos, log: last });
        }
        let mut last_ms = 0;
        let mut redo = None;
        if last > 0 {
            let bytes = store.record(last)?.ok_or(OpenError::Inconsistent { meta: head_pos, log: last })?;
            let rec = record::decode(&bytes).map_err(|e| OpenError::Damaged(last, e.to_string()))?;
            if !record::hash_is_valid(&bytes, &rec) {
                return Err(OpenError::Damaged(last, "its hash does not match its bytes".into()));
            }
            if head_pos < last {
                // A crash between a commit's last record and its head write: the commit is
                // complete in the log, and what it writes beside the log is redone below.
                redo = Some((head_pos + 1, last, rec.hash));
                (head_pos, head_hash) = (last, rec.hash);
            }
            if rec.hash != head_hash {
                return Err(OpenError::Damaged(last, "its hash does not match the head".into()));
            }
            last_ms = rec.header.recorded_at_ms;
        }

        let shared = Arc::new(Shared::new(store, master, head_pos, opts.limits.keys_cached_max));
        if let Some(next) = rotating_to {
            let old = shared.master();
            crate::rotate::finish(&shared, &opts.keyring, &old, &Arc::new(next))?;
        }
        let credentials = load_or_create_credentials(&shared)?;
        if let Some((from, to, hash)) = redo {
            redo_after_head(&shared, &opts.schemas, &opts.projections, from, to, &hash)?;
        }
        catch_up_views(&shared, &opts, opts.rebuild_views)?;
        let (writer, join) = writer::spawn(
            shared.clone(),
            (head_pos, head_hash, last_ms),
            writer::Config {
                queue_depth: opts.limits.queue_depth,
                group_events_max: opts.limits.group_events_max,
                projections: opts.projections.clone(),
                space: writer::SpaceGuard { dir: opts.data.clone(), floor_bytes: opts.limits.min_free_bytes },
            },
        );
        Ok(Ledger {
            shared,
            writer,
            join: Mutex::new(Some(join)),
            schemas: opts.schemas,
            projections: opts.projections,
            limits: opts.limits,
            keyring: opts.keyring,
            credentials,
        })
    }

    /// Rotates the master key now: a new generation, every subject key re-wrapped, the blind
    /// index recomputed, the old generation destroyed. Appends wait while it runs.
    pub fn rotate(&self) -> Result<crate::rotate::Rotated, crate::rotate::RotateError> {
        crate::rotate::rotate(&self.shared, &self.keyring)
    }

    pub fn projections(&self) -> &Projections {
        &self.projections
    }

    /// A subject's document of one view, or `None` when it has none. The document may
    /// reflect events not yet durable: wait for `doc.position` (`wait_durable`) before
    /// showing it.
    pub fn view(&self, view: &str, subject: Uuid) -> Result<Option<Doc>, ReadError> {
        let Some(v) = self.projections.get(view) else { return Ok(None) };
        let master = self.shared.master();
        let keys = |s: Uuid, c: u8| self.shared.keys.get(&self.shared.store, &master, s, c).map_err(|e| e.to_string());
        Ok(views::load(&self.shared.store, &keys, v, subject)?)
    }

    /// A page of one view's documents in subject-id order, after `after`.
    pub fn view_page(&self, view: &str, after: Option<Uuid>, limit: usize) -> Result<Vec<(Uuid, Doc)>, ReadError> {
        let Some(v) = self.projections.get(view) else { return Ok(vec![]) };
        let master = self.shared.master();
        let mut out = vec![];
        for item in self.shared.store.views(view, after) {
            let (subject, sealed) = item?;
            let Some(key) = self.shared.keys.get(&self.shared.store, &master, subject, v.category() as u8)? else {
                continue;
            };
            out.push((subject, views::open(&key, v, subject, &sealed)?));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Waits until `position` is durable (a view document read while its events were being
    /// synced). Fails if the ledger stopped making writes durable.
    pub async fn wait_durable(&self, position: Position) -> Result<(), ReadError> {
        let mut rx = self.subscribe();
        rx.wait_for(|d| *d >= position).await.map(|_| ()).map_err(|_| ReadError::Stopped)
    }

    /// The erasure of a subject, if it was erased (and the erasure is durable).
    pub fn erasure(&self, subject: Uuid) -> Result<Option<Erasure>, ReadError> {
        let Some(at) = self.shared.store.erased(subject)? else { return Ok(None) };
        if at > self.shared.durable() {
            return Ok(None);
        }
        let bytes =
            self.shared.store.record(at)?.ok_or(ReadError::Damaged { position: at, detail: "missing".into() })?;
        let rec = decode_at(at, &bytes)?;
        let v: Value = serde_json::from_slice(&rec.payload)
            .map_err(|e| ReadError::Damaged { position: at, detail: e.to_string() })?;
        let key_generation = v.get("key_generation").and_then(Value::as_u64).unwrap_or(0) as u32;
        Ok(Some(Erasure {
            subject,
            position: at,
            erased_at: crate::time::rfc3339(rec.header.recorded_at_ms),
            erased_at_ms: rec.header.recorded_at_ms,
            hash: rec.hash.to_hex(),
            actor: rec.header.actor,
            reason: v.get("reason").and_then(Value::as_str).unwrap_or("").to_owned(),
            key_generation,
            complete: self.shared.master().generation() > key_generation,
            retained: {
                let holds: Vec<writer::Hold> =
                    v.get("retained").and_then(|r| serde_json::from_value(r.clone()).ok()).unwrap_or_default();
                let current = self.shared.store.holds_of(subject)?;
                holds
                    .iter()
                    .map(|h| Retained {
                        category: crate::schema::Category::from_u8(h.category)
                            .map(|c| c.name().to_owned())
                            .unwrap_or_else(|| h.category.to_string()),
                        until: crate::time::rfc3339(h.until_ms),
                        shredded: !current.iter().any(|(c, _)| *c == h.category),
                    })
                    .collect()
            },
        }))
    }

    /// Whether a subject is erased (durably) and, if so, whether categories kept by a legal
    /// obligation are still held: `None` not erased, `Some(held)`. What `erasure` tells, from
    /// two index reads instead of the erasure's record (for pages of many subjects).
    pub fn erased_holding(&self, subject: Uuid) -> Result<Option<bool>, ReadError> {
        match self.shared.store.erased(subject)? {
            Some(at) if at <= self.shared.durable() => Ok(Some(!self.shared.store.holds_of(subject)?.is_empty())),
            _ => Ok(None),
        }
    }

    /// Whether a subject's processing is restricted (Art. 18).
    pub fn restricted(&self, subject: Uuid) -> Result<bool, ReadError> {
        Ok(self.shared.store.restricted(subject)?.is_some_and(|p| p <= self.shared.durable()))
    }

    /// Moves whenever the wrapped-key table changes.
    pub fn key_epoch(&self) -> u64 {
        self.shared.key_epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The wrapped-key table as it stands, for a backup of the log up to `as_of`. Taken
    /// between rotations (never half re-wrapped).
    pub fn key_table(&self, as_of: Position) -> Result<crate::backup::KeyTable, crate::backup::BackupError> {
        let _not_rotating = self.shared.rotation.lock().expect("not poisoned");
        crate::backup::KeyTable::of_store(&self.shared.store, as_of)
    }

    /// The current master-key generation.
    pub fn key_generation(&self) -> u32 {
        self.shared.master().generation()
    }

    /// The durable head position (0 for an empty log).
    pub fn durable(&self) -> Position {
        self.shared.durable()
    }

    pub fn schemas(&self) -> &Schemas {
        &self.schemas
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn writer(&self) -> &WriterHandle {
        &self.writer
    }

    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// Counters for metrics: (groups applied by the sequencer, fsyncs that made them durable).
    /// Bytes free on the data directory's disk and the floor the writer keeps, when the file
    /// system says.
    pub fn disk_space(&self) -> Option<(u64, u64)> {
        Some((crate::store::free_bytes(self.shared.store.dir())?, self.limits.min_free_bytes))
    }

    pub fn commit_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.shared.commits.load(Relaxed), self.shared.fsyncs.load(Relaxed))
    }

    /// The durable head: the last acknowledged position and its hash.
    pub fn head(&self) -> Result<(Position, ChainHash), ReadError> {
        let pos = self.shared.durable();
        if pos == 0 {
            return Ok((0, ChainHash::GENESIS));
        }
        let bytes =
            self.shared.store.record(pos)?.ok_or(ReadError::Damaged { position: pos, detail: "missing".into() })?;
        let rec = decode_at(pos, &bytes)?;
        Ok((pos, rec.hash))
    }

    /// The key that seals credentials (TOTP secrets). Random, stored wrapped like a subject
    /// key, so a rotation re-wraps it and nothing sealed under it needs re-sealing.
    pub fn credentials_key(&self) -> Arc<crate::crypto::SubjectKey> {
        self.credentials.clone()
    }

    /// A watch on the durable head, for long-polling readers.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Position> {
        self.shared.durable_watch.subscribe()
    }

    /// Validates one event and makes it ready for the writer. Pure but for the clock.
    pub fn prepare(
        &self,
        event_type: &str,
        occurred_at: Option<&str>,
        data: Value,
    ) -> Result<PreparedEvent, EventError> {
        let schema = self.schemas.validate(event_type, &data)?;
        let occurred_at = match occurred_at {
            Some(t) => {
                crate::time::parse_timestamp(t).ok_or(EventError::OccurredAt)?;
                t.to_owned()
            }
            None => crate::time::rfc3339(crate::time::now_ms()),
        };
        let plaintext = serde_json::to_vec(&serde_json::json!({"occurred_at": occurred_at, "data": &data}))
            .expect("a Value always serializes");
        let bytes = plaintext.len();
        if bytes > self.limits.event_bytes_max {
            return Err(EventError::TooLarge { bytes, max: self.limits.event_bytes_max });
        }
        let lookups = if schema.lookup.is_empty() {
            vec![]
        } else {
            blind_lookups(schema, &data, &self.shared.master().index_key())
        };
        Ok(PreparedEvent {
            event_type: schema.event_type.clone(),
            schema_version: schema.version,
            category: schema.category as u8,
            plaintext: zeroize::Zeroizing::new(plaintext),
            lookups,
            occurred_at,
            data,
            correction: schema.correction,
        })
    }

    /// Appends prepared events to one subject, waiting until they are durable.
    pub fn append(
        &self,
        subject: Uuid,
        expected_version: Option<u64>,
        events: Vec<PreparedEvent>,
        actor: &str,
    ) -> Result<Committed, WriteError> {
        let mut r = self.submit(vec![Op::Append { subject, expected_version, events, actor: actor.to_owned() }])?;
        Ok(r.remove(0))
    }

    /// Submits operations as one all-or-nothing unit and waits until they are durable.
    pub fn submit(&self, ops: Vec<Op>) -> Reply {
        self.writer.submit_blocking(ops)
    }

    /// Subjects whose events carried this lookup value (normalised first), through the blind
    /// index; only subjects that exist, at most `max`.
    pub fn lookup(&self, key: LookupKey, raw: &str, max: usize) -> Result<Vec<Uuid>, ReadError> {
        let Some(value) = key.normalise(raw) else { return Ok(vec![]) };
        let durable = self.shared.durable();
        let mut out: Vec<Uuid> = vec![];
        // While a rotation recomputes the index, entries are under either generation's key.
        let masters = [Some(self.shared.master()), self.shared.keys.alternate()];
        for master in masters.into_iter().flatten() {
            let blind = master.index_key().blind(key.name(), &value);
            for (subject, at) in self.shared.store.lookup(key as u8, &blind, max)? {
                if at <= durable && self.subject_exists(subject)? && !out.contains(&subject) {
                    out.push(subject);
                }
            }
        }
        Ok(out)
    }

    /// Whether a subject exists (created, or has events), as far as durable records go.
    pub fn subject_exists(&self, subject: Uuid) -> Result<bool, ReadError> {
        Ok(self.shared.store.subject_created(subject)?.is_some_and(|p| p <= self.shared.durable()))
    }

    /// A subject's current stream version (0: no events).
    pub fn stream_version(&self, subject: Uuid) -> Result<u64, ReadError> {
        // Not yet durable versions are not shown; they can only be the newest.
        let durable = self.shared.durable();
        for item in self.shared.store.stream_rev(subject) {
            let (version, pos) = item?;
            if pos <= durable {
                return Ok(version);
            }
        }
        Ok(0)
    }

    /// A subject's events after `after_version`, at most `limit`, decrypted. Shredded events
    /// (key gone) are left out; the caller decides what an erased subject answers.
    pub fn read_stream(&self, subject: Uuid, after_version: u64, limit: usize) -> Result<Vec<StoredEvent>, ReadError> {
        let master = self.shared.master();
        self.stream_records(subject, after_version, limit, |rec| {
            Ok(match open_record(&self.shared, &master, &rec)? {
                Payload::Event { occurred_at, data } => Some(stored_event(rec.header, occurred_at, data)),
                Payload::Shredded | Payload::Ledger(_) => None,
            })
        })
    }

    /// As `read_stream`, each event's data kept as the JSON text it was sealed as (for
    /// answers that pass it on unchanged: no `Value` built and serialised again).
    pub fn read_stream_raw(&self, subject: Uuid, after_version: u64, limit: usize) -> Result<Vec<RawEvent>, ReadError> {
        let master = self.shared.master();
        self.stream_records(subject, after_version, limit, |rec| {
            if rec.header.kind != Kind::Sealed {
                return Ok(None);
            }
            let h = &rec.header;
            let Some(key) = self.shared.keys.get(&self.shared.store, &master, h.subject, h.category)? else {
                return Ok(None);
            };
            let plain = open_plain(&key, &rec)?;
            #[derive(serde::Deserialize)]
            struct Sealed<'a> {
                occurred_at: String,
                #[serde(borrow)]
                data: &'a serde_json::value::RawValue,
            }
            let s: Sealed = serde_json::from_slice(&plain).map_err(|e| not_an_event(&rec, e))?;
            let data = s.data.to_owned();
            let h = rec.header;
            Ok(Some(RawEvent {
                version: h.version,
                position: h.position,
                event_type: h.event_type,
                occurred_at: s.occurred_at,
                recorded_at: crate::time::rfc3339(h.recorded_at_ms),
                actor: h.actor,
                data,
            }))
        })
    }

    /// The durable records of a subject's stream after `after_version`, at most `limit` of
    /// them, each turned by `open` into what the caller wants (or skipped).
    fn stream_records<T>(
        &self,
        subject: Uuid,
        after_version: u64,
        limit: usize,
        mut open: impl FnMut(Record) -> Result<Option<T>, ReadError>,
    ) -> Result<Vec<T>, ReadError> {
        let durable = self.shared.durable();
        let mut out = vec![];
        for item in self.shared.store.stream(subject, after_version).take(limit) {
            let (_, pos) = item?;
            if pos > durable {
                break;
            }
            let bytes =
                self.shared.store.record(pos)?.ok_or(ReadError::Damaged { position: pos, detail: "missing".into() })?;
            if let Some(t) = open(decode_at(pos, &bytes)?)? {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// The durable log from `from` on, decoded and (where a key exists) decrypted.
    pub fn log(&self, from: Position) -> impl Iterator<Item = Result<LogEntry, ReadError>> + '_ {
        let durable = self.shared.durable();
        let master = self.shared.master();
        self.shared.store.records(from.max(1)).take_while(move |r| !matches!(r, Ok((p, _)) if *p > durable)).map(
            move |item| {
                let (pos, bytes) = item?;
                let rec = decode_at(pos, &bytes)?;
                let payload = open_record(&self.shared, &master, &rec)?;
                Ok(LogEntry { hash: rec.hash, header: rec.header, payload })
            },
        )
    }

    /// Stops the writer after it has finished what was queued, and syncs. Dropping the
    /// ledger does the same, without reporting a sync failure.
    pub fn close(self) -> Result<(), StoreError> {
        self.stop_writer();
        self.shared.store.sync()
    }

    fn stop_writer(&self) {
        if let Some(j) = self.join.lock().expect("not poisoned").take() {
            self.writer.stop();
            let _ = j.join();
        }
    }
}

impl Drop for Ledger {
    /// Releases the data directory deterministically: once the writer thread is gone, the
    /// last reference to the store (and its lock) is ours.
    fn drop(&mut self) {
        self.stop_writer();
    }
}

impl StoredEvent {
    /// This event as the projections take it.
    pub fn as_event_ref(&self) -> EventRef<'_> {
        EventRef {
            event_type: &self.event_type,
            data: (&self.data).into(),
            occurred_at: &self.occurred_at,
            recorded_at: &self.recorded_at,
            version: self.version,
            position: self.position,
        }
    }
}

pub fn stored_event(h: Header, occurred_at: String, data: Value) -> StoredEvent {
    StoredEvent {
        position: h.position,
        subject: h.subject,
        version: h.version,
        event_type: h.event_type,
        schema_version: h.schema_version,
        occurred_at,
        recorded_at: crate::time::rfc3339(h.recorded_at_ms),
        actor: h.actor,
        data,
    }
}

fn decode_at(pos: Position, bytes: &[u8]) -> Result<Record, ReadError> {
    let rec = record::decode(bytes).map_err(|e| ReadError::Damaged { position: pos, detail: e.to_string() })?;
    if rec.header.position != pos {
        return Err(ReadError::Damaged {
            position: pos,
            detail: format!("holds the record of position {}", rec.header.position),
        });
    }
    Ok(rec)
}

fn open_record(shared: &Shared, master: &MasterKey, rec: &Record) -> Result<Payload, ReadError> {
    let pos = rec.header.position;
    match rec.header.kind {
        Kind::Ledger => {
            let v = serde_json::from_slice(&rec.payload)
                .map_err(|e| ReadError::Damaged { position: pos, detail: format!("ledger event is not JSON: {e}") })?;
            Ok(Payload::Ledger(v))
        }
        Kind::Sealed => {
            let Some(key) = shared.keys.get(&shared.store, master, rec.header.subject, rec.header.category)? else {
                return Ok(Payload::Shredded);
            };
            open_sealed(&key, rec)
        }
    }
}

/// Opens a subject event with its key.
fn open_sealed(key: &crate::crypto::SubjectKey, rec: &Record) -> Result<Payload, ReadError> {
    let plain = open_plain(key, rec)?;
    #[derive(serde::Deserialize)]
    struct Sealed {
        occurred_at: String,
        data: Value,
    }
    let s: Sealed = serde_json::from_slice(&plain).map_err(|e| not_an_event(rec, e))?;
    Ok(Payload::Event { occurred_at: s.occurred_at, data: s.data })
}

/// A sealed event record's plaintext: `{"occurred_at": ..., "data": ...}`.
fn open_plain(key: &crate::crypto::SubjectKey, rec: &Record) -> Result<zeroize::Zeroizing<Vec<u8>>, ReadError> {
    let plain = key
        .open(&rec.nonce, &record::seal_aad(&rec.header), &rec.payload)
        .map_err(|e| ReadError::Damaged { position: rec.header.position, detail: e.to_string() })?;
    Ok(zeroize::Zeroizing::new(plain))
}

fn not_an_event(rec: &Record, e: serde_json::Error) -> ReadError {
    ReadError::Damaged { position: rec.header.position, detail: format!("sealed payload is not an event: {e}") }
}

/// A sealed event's plaintext read as `open_sealed` reads it, into a tree borrowing from it
/// (`crate::json`): how a rebuild reads each event, without a map per object.
#[derive(serde::Deserialize)]
struct SealedTree<'a> {
    #[serde(borrow)]
    occurred_at: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    data: crate::json::Json<'a>,
}

fn parse_sealed<'a>(rec: &Record, plain: &'a [u8]) -> Result<SealedTree<'a>, ReadError> {
    serde_json::from_slice(plain).map_err(|e| not_an_event(rec, e))
}

/// Removes the records after the last commit mark: a group commit cut short by a crash, never
/// acknowledged (acknowledgement waits for the whole commit to be durable). sled keeps a prefix
/// of the writes, so the tail is the only place such records can be. Newest first, so a crash
/// during the repair leaves a shorter tail for the next open. Returns how many were removed.
pub fn repair_tail(store: &Store, group_events_max: usize) -> Result<u64, OpenError> {
    let Some(last) = store.last_position()? else { return Ok(0) };
    let mut batch = WriteBatch::default();
    let mut pos = last;
    let mut removed = 0u64;
    let mut head = (0, ChainHash::GENESIS);
    while pos > 0 {
        let Some(bytes) = store.record(pos)? else { break };
        let rec = record::decode(&bytes).map_err(|e| OpenError::Damaged(pos, e.to_string()))?;
        if rec.header.flags & record::FLAG_COMMIT != 0 {
            head = (pos, rec.hash);
            break;
        }
        // A commit writes about `group_events_max` records at most: a group takes submissions
        // until it holds that many events, and the last one taken and every submission's notes
        // (audit entries) fit in the slack below (an import batch, its events and its audit
        // entries, is held to half the limit). More than that without a mark is damage, not a
        // crash.
        if removed > 2 * group_events_max as u64 + 1024 {
            return Err(OpenError::Damaged(pos, "no commit mark in the log's tail".into()));
        }
        if rec.header.kind == Kind::Sealed {
            batch.remove_stream(rec.header.subject, rec.header.version);
        }
        if rec.header.kind == Kind::Ledger && rec.header.event_type == crate::audit::EVENT_TYPE {
            batch.remove_audit(pos, crate::audit::indexed_subject(rec.header.subject));
        }
        if store.subject_created(rec.header.subject)?.is_some_and(|created| created >= pos) {
            batch.remove_subject(rec.header.subject);
        }
        batch.remove_record(pos);
        removed += 1;
        pos -= 1;
    }
    if removed > 0 {
        // Blind-index entries of the removed events go first (a crash during the repair then
        // leaves records that a later repair finds again, never index entries without them).
        // A full scan of the index: this only runs after a crash cut a commit short.
        let mut first = WriteBatch::default();
        for entry in store.index_entries() {
            let (kind, blind, subject, at) = entry?;
            if at > head.0 {
                first.remove_index(kind, &blind, subject);
            }
        }
        first.extend(batch);
        first.put_head(head.0, &head.1);
        store.commit(first)?;
        tracing::warn!(removed, head = head.0, "removed an unacknowledged, incomplete commit from the log's tail");
    }
    Ok(removed)
}

/// The blind-index entries of one event: for each lookup key its schema marks, the keyed hash
/// of the normalised value (values that do not normalise are not indexed).
pub fn blind_lookups(schema: &EventSchema, data: &Value, index_key: &IndexKey) -> Vec<crate::lookup::Lookup> {
    let mut out = vec![];
    for (name, pointer) in &schema.lookup {
        let (Some(key), Some(raw)) = (LookupKey::from_name(name), data.pointer(pointer).and_then(Value::as_str)) else {
            continue;
        };
        if let Some(value) = key.normalise(raw) {
            let blind = index_key.blind(key.name(), &value);
            out.push(crate::lookup::Lookup { kind: key as u8, blind, value: zeroize::Zeroizing::new(value) });
        }
    }
    out
}

/// Redoes what the writer writes beside the records (stream and subject entries, blind
/// index, audit index, erasures, restrictions, view documents) for the records after the
/// stored head: a crash can keep a commit's records (its last one marked complete) and lose
/// some of the writes that follow them. Everything here is derived from the records, and
/// idempotent.
fn redo_after_head(
    shared: &Shared,
    schemas: &Schemas,
    projections: &Arc<Projections>,
    from: Position,
    to: Position,
    to_hash: &ChainHash,
) -> Result<(), OpenError> {
    // Derived entries, applied in key order by a thread per core in batches of this many
    // writes (150-250 bytes each in memory, plus the sort's scratch: 250-350 MB at most): a
    // restored log derives everything, a crash only a group.
    const REDO_BATCH_OPS: usize = 1_500_000;
    let store = &shared.store;
    let threads = workers();
    let master = shared.master();
    let index_key = master.index_key();
    let mut batch = WriteBatch::default();
    let mut touched: Vec<Uuid> = vec![];
    let mut erased: Vec<(Uuid, Position, Option<Vec<writer::Hold>>)> = vec![];
    let mut shredded: Vec<(Uuid, u8)> = vec![];
    let mut created = std::collections::HashSet::new();
    // In log order, as sled stores it: one read per page of the log, not one per record.
    let mut records = store.records(from);
    for pos in from..=to {
        if batch.len() >= REDO_BATCH_OPS {
            store.apply_unordered(std::mem::take(&mut batch), threads)?;
        }
        let bytes = match records.next().transpose()? {
            Some((p, bytes)) if p == pos => bytes,
            _ => return Err(OpenError::Inconsistent { meta: from - 1, log: pos }),
        };
        let rec = decode_at(pos, &bytes)?;
        let h = &rec.header;
        if !h.subject.is_nil() && !created.contains(&h.subject) && store.subject_created(h.subject)?.is_none() {
            batch.put_subject(h.subject, pos);
            created.insert(h.subject);
        }
        // Only events that carry lookup values need decrypting here.
        if h.kind == Kind::Sealed && schemas.get(&h.event_type, h.schema_version).is_none_or(|s| s.lookup.is_empty()) {
            batch.put_stream(h.subject, h.version, pos);
            touched.push(h.subject);
            continue;
        }
        match open_record(shared, &master, &rec)? {
            Payload::Event { data, .. } => {
                batch.put_stream(h.subject, h.version, pos);
                if let Some(schema) = schemas.get(&h.event_type, h.schema_version) {
                    let key = shared.keys.get(store, &master, h.subject, h.category).map_err(ReadError::from)?;
                    for l in blind_lookups(schema, &data, &index_key) {
                        let sealed = match &key {
                            Some(k) => crate::lookup::seal_value(k, h.subject, l.kind, h.category, &l.value)?,
                            None => vec![],
                        };
                        batch.put_index(l.kind, &l.blind, h.subject, pos, &sealed);
                    }
                }
                touched.push(h.subject);
            }
            Payload::Shredded => batch.put_stream(h.subject, h.version, pos),
            Payload::Ledger(v) => match h.event_type.as_str() {
                crate::audit::EVENT_TYPE => {
                    batch.put_audit(pos, crate::audit::indexed_subject(h.subject));
                }
                writer::ERASED => {
                    let retain: Vec<writer::Hold> =
                        v.get("retained").and_then(|r| serde_json::from_value(r.clone()).ok()).unwrap_or_default();
                    erased.push((h.subject, pos, Some(retain)));
                }
                writer::SHREDDED => {
                    if let Some(c) = v.get("category").and_then(Value::as_u64) {
                        shredded.push((h.subject, c as u8));
                    }
                }
                writer::RESTRICTED => batch.put_restricted(h.subject, Some(pos)),
                writer::UNRESTRICTED => batch.put_restricted(h.subject, None),
                _ => {}
            },
        }
    }
    store.apply_unordered(batch, threads)?;
    let mut batch = WriteBatch::default();
    for (subject, pos, retain) in &erased {
        let (subject, pos) = (subject, *pos);
        let retain = retain.clone().unwrap_or_default();
        writer::erase_side_effects(store, projections, *subject, pos, &retain, vec![], &mut batch)?;
        shared.keys.forget(Some(*subject));
    }
    store.apply(std::mem::take(&mut batch))?;
    // The touched subjects' documents, rebuilt from their whole streams, unless the views
    // lag anyway (then catching up rebuilds them).
    let views_at = store.meta(views::META_AT)?.and_then(|v| v[..].try_into().ok().map(u64::from_be_bytes));
    if views_at.is_none_or(|at| at + 1 < from) {
        touched.clear();
    }
    touched.sort_unstable();
    touched.dedup();
    for (subject, category) in &shredded {
        writer::shred_side_effects(projections, *subject, *category, &mut batch);
        shared.keys.forget(Some(*subject));
    }
    store.apply(std::mem::take(&mut batch))?;
    // Erased subjects are rebuilt only for what they hold (as `catch_up_views` does).
    touched.retain(|s| !erased.iter().any(|(e, _, held)| e == s && held.as_ref().is_none_or(|h| h.is_empty())));
    let keys = |s: Uuid, c: u8| shared.keys.get(store, &master, s, c).map_err(|e| e.to_string());
    let mut batch = WriteBatch::default();
    for subject in touched {
        for view in projections.views() {
            batch.remove_view(view.name(), subject);
        }
        let mut projector = Projector::new(projections.clone());
        project_subject(shared, &master, &mut projector, subject, to)?;
        projector.flush(&keys, &mut batch).map_err(ReadError::from)?;
    }
    if views_at.is_some_and(|at| at + 1 >= from) {
        batch.put_meta(views::META_AT, &to.to_be_bytes());
    }
    batch.put_head(to, to_hash);
    store.commit(batch)?;
    if from == 1 {
        tracing::info!(records = to, "derived the indexes from the log (a restored or copied log)");
    } else {
        tracing::warn!(from, to, "completed the writes of a commit cut short by a crash");
    }
    Ok(())
}

/// Applies a subject's stream, up to `head`, to fresh documents in `projector` (events whose
/// key is gone are skipped). Returns the events read.
fn project_subject(
    shared: &Shared,
    master: &MasterKey,
    projector: &mut Projector,
    subject: Uuid,
    head: Position,
) -> Result<u64, OpenError> {
    let store = &shared.store;
    let mut n = 0;
    for item in store.stream(subject, 0) {
        let (_, pos) = item?;
        if pos > head {
            break;
        }
        n += 1;
        let bytes = store.record(pos)?.ok_or(OpenError::Inconsistent { meta: head, log: pos })?;
        let rec = decode_at(pos, &bytes)?;
        if !projector.projections().handles(&rec.header.event_type) {
            continue;
        }
        if let Payload::Event { occurred_at, data } = open_record(shared, master, &rec)? {
            let recorded_at = crate::time::rfc3339(rec.header.recorded_at_ms);
            let ev = EventRef {
                event_type: &rec.header.event_type,
                data: (&data).into(),
                occurred_at: &occurred_at,
                recorded_at: &recorded_at,
                version: rec.header.version,
                position: pos,
            };
            projector.apply_fresh(subject, &ev);
        }
    }
    Ok(n)
}

/// Brings the view documents up to the log's head. The writer keeps them current in every
/// commit (`views_at` = head), so this only has work after the definitions changed, a rebuild
/// was asked for, or a crash cut one short: then every document is rebuilt from the log
/// (`rebuild.rs`), and `views_at` reaches the head only at the end, so a crash during the
/// rebuild starts it over at the next open.
fn catch_up_views(shared: &Shared, opts: &OpenOptions, rebuild: bool) -> Result<(), OpenError> {
    let projections = &opts.projections;
    let store = &shared.store;
    let head = shared.durable();
    let fingerprint = projections.fingerprint();
    let same_defs = store.meta(views::META_DEF)?.is_some_and(|v| v[..] == fingerprint);
    let at = match store.meta(views::META_AT)? {
        Some(v) if same_defs && !rebuild => {
            u64::from_be_bytes(v[..].try_into().map_err(|_| StoreError::Meta(views::META_AT))?)
        }
        _ => 0,
    };
    if at >= head && same_defs && !rebuild {
        return Ok(());
    }
    // Start over: record that first (durably). Documents of other definitions are dropped
    // before the new fingerprint is recorded (a crash in between drops them again); documents
    // of the same definitions stay until the rebuild writes over them or removes them.
    let mut b = WriteBatch::default();
    b.put_meta(views::META_AT, &0u64.to_be_bytes());
    store.commit(b)?;
    let mut removed = 0;
    if !same_defs {
        removed = store.clear_views(workers())?;
        let mut b = WriteBatch::default();
        b.put_meta(views::META_DEF, &fingerprint);
        store.commit(b)?;
    }
    if head == 0 {
        return Ok(());
    }
    tracing::info!(removed, head, "rebuilding views from the log");
    rebuild::rebuild(shared, projections, head, &opts.limits, !same_defs, opts.progress.as_deref())?;
    let mut batch = WriteBatch::default();
    batch.put_meta(views::META_AT, &head.to_be_bytes());
    store.commit(batch)?;
    Ok(())
}

fn load_or_create_credentials(shared: &Shared) -> Result<Arc<crate::crypto::SubjectKey>, OpenError> {
    use crate::rotate::{CREDENTIALS_ID, META_CREDENTIALS};
    let master = shared.master();
    if let Some(wrapped) = shared.store.meta(META_CREDENTIALS)? {
        return Ok(Arc::new(master.unwrap(CREDENTIALS_ID.0, CREDENTIALS_ID.1, &wrapped)?));
    }
    let key = crate::crypto::SubjectKey::generate()?;
    let mut b = WriteBatch::default();
    b.put_meta(META_CREDENTIALS, &master.wrap(CREDENTIALS_ID.0, CREDENTIALS_ID.1, &key)?);
    shared.store.commit(b)?;
    Ok(Arc::new(key))
}

/// The store's format (`None` for a new store), refused unless this version reads it: the
/// current one, or format 1, which `upgrade` brings up to date when the ledger opens it. The
/// commands that read a store without opening the ledger (`audit`, `verify --deep`) ask too.
pub fn check_format(store: &Store) -> Result<Option<u32>, OpenError> {
    match store.meta_u32("format")? {
        Some(f) if f != 1 && f != FORMAT_VERSION => Err(OpenError::Format(f)),
        f => Ok(f),
    }
}

/// Format 1 → 2: the new format number is made durable first (from then on an older
/// pdledger refuses the directory), then format 1's audit indexes by actor and by action are
/// removed. Every open repeats the removal while any are left (a crash during it leaves some;
/// finding none is two prefix seeks), and readers of format 2 never look at them.
fn upgrade(store: &Store, format: Option<u32>) -> Result<(), OpenError> {
    if format == Some(1) {
        let mut batch = WriteBatch::default();
        batch.put_meta("format", &FORMAT_VERSION.to_be_bytes());
        store.commit(batch)?;
    }
    let removed = store.drop_v1_audit_indexes()?;
    if removed > 0 {
        tracing::info!(removed, "data directory upgraded to format {FORMAT_VERSION}: format 1's audit indexes by actor and by action removed (such queries filter the index of every entry)");
    }
    Ok(())
}

/// Loads the master-key generation this store was written under, or starts generation 1
/// for a new store (reusing a generation the keyring already has, if any).
fn load_or_create_master(store: &Store, keyring: &Keyring) -> Result<MasterKey, OpenError> {
    let format = check_format(store)?;
    match store.meta_u32("master_gen")? {
        Some(needed) => {
            let present = keyring.generations()?;
            if !present.contains(&needed) {
                return Err(OpenError::MissingGeneration { needed, present, keyring: keyring.describe() });
            }
            let master = keyring.load(needed)?;
            let check = store.meta("key_check")?.ok_or(StoreError::Meta("key_check"))?;
            if check[..] != master.check_value() {
                return Err(OpenError::WrongKeyring(keyring.describe()));
            }
            // Only once the keyring is known to be this store's: a refused open changes nothing.
            upgrade(store, format)?;
            Ok(master)
        }
        None => {
            let master = match keyring.generations()?.last() {
                Some(g) => keyring.load(*g)?,
                None => {
                    let m = MasterKey::generate(1)?;
                    keyring.store(&m)?;
                    m
                }
            };
            let mut batch = WriteBatch::default();
            batch.put_meta("format", &FORMAT_VERSION.to_be_bytes());
            batch.put_meta("master_gen", &master.generation().to_be_bytes());
            batch.put_meta("key_check", &master.check_value());
            store.commit(batch)?;
            Ok(master)
        }
    }
}
