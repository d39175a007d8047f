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

use crate::crypto::{CryptoError, MasterKey};
use crate::keyring::{Keyring, KeyringError};
use crate::keys::KeyError;
use crate::lookup::LookupKey;
use crate::record::{self, ChainHash, DecodeError, Header, Kind, Position, Record};
use crate::schema::{Schemas, Violation};
use crate::store::{Store, StoreError, WriteBatch};
use crate::writer::{self, Committed, Op, PreparedEvent, Reply, Shared, WriteError, WriterHandle};

pub const FORMAT_VERSION: u32 = 1;

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
        }
    }
}

pub struct OpenOptions {
    pub data: PathBuf,
    pub keyring: Keyring,
    pub schemas: Arc<Schemas>,
    /// Who is opening it, for the message another process gets while we hold the lock.
    pub holder: String,
    pub limits: Limits,
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
    limits: Limits,
}

impl Ledger {
    pub fn open(opts: OpenOptions) -> Result<Ledger, OpenError> {
        opts.keyring.check_outside(&opts.data)?;
        let store = Store::open(&opts.data, &opts.holder, opts.limits.cache_bytes)?;
        let master = load_or_create_master(&store, &opts.keyring)?;

        // The log and its metadata must agree before we add to either.
        repair_tail(&store, opts.limits.group_events_max)?;
        let last = store.last_position()?.unwrap_or(0);
        let (mut head_pos, mut head_hash) = store.head()?.unwrap_or((0, ChainHash::GENESIS));
        if head_pos > last {
            return Err(OpenError::Inconsistent { meta: head_pos, log: last });
        }
        let mut last_ms = 0;
        if last > 0 {
            let bytes = store.record(last)?.ok_or(OpenError::Inconsistent { meta: head_pos, log: last })?;
            let rec = record::decode(&bytes).map_err(|e| OpenError::Damaged(last, e.to_string()))?;
            if !record::hash_is_valid(&bytes, &rec) {
                return Err(OpenError::Damaged(last, "its hash does not match its bytes".into()));
            }
            if head_pos < last {
                // A crash between a commit's last record and its head write: the record is
                // marked complete, so the head moves up to it.
                let mut batch = WriteBatch::default();
                batch.put_head(last, &rec.hash);
                store.commit(batch)?;
                (head_pos, head_hash) = (last, rec.hash);
            }
            if rec.hash != head_hash {
                return Err(OpenError::Damaged(last, "its hash does not match the head".into()));
            }
            last_ms = rec.header.recorded_at_ms;
        }

        let shared = Arc::new(Shared::new(store, master, head_pos, opts.limits.keys_cached_max));
        let (writer, join) = writer::spawn(
            shared.clone(),
            (head_pos, head_hash, last_ms),
            writer::Config { queue_depth: opts.limits.queue_depth, group_events_max: opts.limits.group_events_max },
        );
        Ok(Ledger { shared, writer, join: Mutex::new(Some(join)), schemas: opts.schemas, limits: opts.limits })
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

    /// The key that seals credentials (TOTP secrets) under the current master generation.
    pub fn credentials_key(&self) -> crate::crypto::SubjectKey {
        self.shared.master().credentials_key()
    }

    /// Ledger events (audit entries, erasures...) before `before`, newest first, without
    /// decrypting anything.
    pub fn notes_rev(&self, before: Position) -> impl Iterator<Item = Result<(Header, Value), ReadError>> + '_ {
        let before = before.min(self.shared.durable() + 1);
        self.shared.store.records_rev(before).filter_map(|item| {
            let (pos, bytes) = match item {
                Ok(v) => v,
                Err(e) => return Some(Err(e.into())),
            };
            // The kind byte is at offset 1: skip sealed records without decoding them.
            if bytes.get(1) != Some(&(Kind::Ledger as u8)) {
                return None;
            }
            let rec = match decode_at(pos, &bytes) {
                Ok(r) => r,
                Err(e) => return Some(Err(e)),
            };
            match serde_json::from_slice(&rec.payload) {
                Ok(v) => Some(Ok((rec.header, v))),
                Err(e) => Some(Err(ReadError::Damaged { position: pos, detail: e.to_string() })),
            }
        })
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
        let mut lookups = vec![];
        if !schema.lookup.is_empty() {
            let index_key = self.shared.master().index_key();
            for (name, pointer) in &schema.lookup {
                let (Some(key), Some(raw)) =
                    (LookupKey::from_name(name), data.pointer(pointer).and_then(Value::as_str))
                else {
                    continue;
                };
                if let Some(value) = key.normalise(raw) {
                    lookups.push((key as u8, index_key.blind(key.name(), &value)));
                }
            }
        }
        Ok(PreparedEvent {
            event_type: schema.event_type.clone(),
            schema_version: schema.version,
            category: schema.category as u8,
            plaintext: zeroize::Zeroizing::new(plaintext),
            lookups,
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
        let blind = self.shared.master().index_key().blind(key.name(), &value);
        let durable = self.shared.durable();
        let mut out: Vec<Uuid> = vec![];
        for (subject, at) in self.shared.store.lookup(key as u8, &blind, max)? {
            if at <= durable && self.subject_exists(subject)? && !out.contains(&subject) {
                out.push(subject);
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
        let durable = self.shared.durable();
        let master = self.shared.master();
        let mut out = vec![];
        for item in self.shared.store.stream(subject, after_version).take(limit) {
            let (_, pos) = item?;
            if pos > durable {
                break;
            }
            let bytes =
                self.shared.store.record(pos)?.ok_or(ReadError::Damaged { position: pos, detail: "missing".into() })?;
            let rec = decode_at(pos, &bytes)?;
            if let Payload::Event { occurred_at, data } = open_record(&self.shared, &master, &rec)? {
                out.push(stored_event(rec.header, occurred_at, data));
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
            let plain = zeroize::Zeroizing::new(
                key.open(&rec.nonce, &record::seal_aad(&rec.header), &rec.payload)
                    .map_err(|e| ReadError::Damaged { position: pos, detail: e.to_string() })?,
            );
            #[derive(serde::Deserialize)]
            struct Sealed {
                occurred_at: String,
                data: Value,
            }
            let s: Sealed = serde_json::from_slice(&plain).map_err(|e| ReadError::Damaged {
                position: pos,
                detail: format!("sealed payload is not an event: {e}"),
            })?;
            Ok(Payload::Event { occurred_at: s.occurred_at, data: s.data })
        }
    }
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
        // A commit writes at most `group_events_max` records (plus its notes): more than
        // that without a mark is damage, not a crash.
        if removed > 2 * group_events_max as u64 + 1024 {
            return Err(OpenError::Damaged(pos, "no commit mark in the log's tail".into()));
        }
        if rec.header.kind == Kind::Sealed {
            batch.remove_stream(rec.header.subject, rec.header.version);
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
        for key in store.index_entries_from(head.0 + 1)? {
            first.remove_index_raw(key);
        }
        first.extend(batch);
        first.put_head(head.0, &head.1);
        store.commit(first)?;
        tracing::warn!(removed, head = head.0, "removed an unacknowledged, incomplete commit from the log's tail");
    }
    Ok(removed)
}

/// Loads the master-key generation this store was written under, or starts generation 1
/// for a new store (reusing a generation the keyring already has, if any).
fn load_or_create_master(store: &Store, keyring: &Keyring) -> Result<MasterKey, OpenError> {
    let format = store.meta_u32("format")?;
    if let Some(f) = format {
        if f != FORMAT_VERSION {
            return Err(OpenError::Format(f));
        }
    }
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
