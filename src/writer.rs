//! The single writer: the only code that assigns positions and stream versions.
//!
//! Submissions wait in a bounded queue. The writer thread takes the first, then everything
//! else already waiting (up to a limit), checks each submission against the stream versions,
//! seals and chains the accepted ones into one group, and applies it to the store. A second
//! thread, the syncer, makes applied groups durable with one flush + fsync (group commit) and
//! only then answers each submitter; meanwhile the sequencer prepares the next group. A
//! submission is all or nothing: every operation in it is written, or none.
//!
//! After a failed durable write, the writer refuses everything until the ledger is reopened:
//! it no longer knows what is on disk, so it does not limp on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, RwLock};

use serde_json::Value;
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use crate::crypto::{MasterKey, SubjectKey};
use crate::keys::KeyCache;
use crate::projection::{EventRef, Projections};
use crate::record::{self, ChainHash, Header, Kind, Position};
use crate::store::{Store, WriteBatch};
use crate::views::Projector;

/// An event that passed schema validation, ready to be sealed.
#[derive(Debug)]
pub struct PreparedEvent {
    pub event_type: String,
    pub schema_version: u16,
    pub category: u8,
    /// The JSON `{"occurred_at":..,"data":..}`: sealed by the writer, never stored in clear.
    pub plaintext: zeroize::Zeroizing<Vec<u8>>,
    /// Blind-index entries: (lookup key, keyed hash of the normalised value).
    pub lookups: Vec<crate::lookup::Lookup>,
    /// The same event in clear, for the projections (kept in memory only).
    pub occurred_at: String,
    pub data: Value,
    /// A rectification (Art. 16): allowed while the subject is restricted.
    pub correction: bool,
}

/// One operation in a submission.
#[derive(Debug)]
pub enum Op {
    /// Append events to one subject's stream, all or nothing.
    Append { subject: Uuid, expected_version: Option<u64>, events: Vec<PreparedEvent>, actor: String },
    /// Creates a subject with no events yet (a `subject.created` ledger event).
    Create { subject: Uuid, actor: String },
    /// A ledger event in clear (never personal data): audit entries, erasures, rotations.
    Note { subject: Option<Uuid>, event_type: String, json: Value, actor: String },
    /// Crypto-shreds a subject: the erasure event, then its keys, view documents and index
    /// entries are removed and its stream is fenced, in the same commit. Categories in
    /// `retain` (a legal obligation to keep them, GDPR Art. 17(3)(b)) keep their key until the
    /// given time (ms since the epoch), restricted to the dpo; the retention run shreds them.
    Erase { subject: Uuid, reason: String, actor: String, retain: Vec<Hold> },
    /// Shreds one category of a subject whose retention expired: its key, its view
    /// documents and its hold go, with a `category.shredded` event.
    Shred { subject: Uuid, category: u8, actor: String },
    /// Art. 18: restricts (or lifts the restriction on) a subject's processing.
    Restrict { subject: Uuid, restricted: bool, actor: String },
}

/// Ledger event types the writer gives meaning to.
pub const ERASED: &str = "subject.erased";
pub const RESTRICTED: &str = "subject.restricted";
pub const UNRESTRICTED: &str = "subject.unrestricted";
pub const SHREDDED: &str = "category.shredded";

/// A category kept after an erasure, until `until_ms`, under the retention rule of `rule`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Hold {
    pub category: u8,
    pub until_ms: u64,
}

impl Op {
    fn len(&self) -> usize {
        match self {
            Op::Append { events, .. } => events.len(),
            Op::Create { .. } | Op::Note { .. } | Op::Erase { .. } | Op::Restrict { .. } | Op::Shred { .. } => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub subject: Option<Uuid>,
    /// Stream versions written (empty for notes).
    pub first_version: u64,
    pub last_version: u64,
    pub positions: Vec<Position>,
    pub recorded_at_ms: u64,
    /// Hash of the last record this operation wrote.
    pub hash: ChainHash,
}

/// Expected outcomes are kept apart from failures, so `?` cannot turn a conflict into a 500.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("subject {0} exists already")]
    SubjectExists(Uuid),
    #[error("version conflict on subject {subject}: expected {expected}, current {current}")]
    VersionConflict { op: usize, subject: Uuid, expected: u64, current: u64 },
    #[error("no subject {0}")]
    UnknownSubject(Uuid),
    /// The subject was erased by the record at `position`: no more events, ever.
    #[error("subject {subject} was erased")]
    Erased { subject: Uuid, position: Position, erased_at_ms: u64 },
    /// While restricted, only corrections may be appended.
    #[error("subject {subject} is restricted; only corrections may be appended")]
    Restricted { subject: Uuid, event_type: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Rejected(#[from] Rejected),
    #[error("the writer queue is full; retry shortly")]
    Overloaded,
    #[error("the ledger refuses writes after a storage failure ({0}); restart it")]
    Unavailable(String),
    /// The data directory's file system is nearly full: refused before anything is written,
    /// so nothing is half-written and the ledger goes on once space is freed.
    #[error("the data directory's disk is nearly full: {free_bytes} bytes free, the ledger keeps {floor_bytes} free")]
    DiskFull { free_bytes: u64, floor_bytes: u64 },
}

pub type Reply = Result<Vec<Committed>, WriteError>;

struct Submission {
    ops: Vec<Op>,
    reply: oneshot::Sender<Reply>,
}

enum Msg {
    Submit(Submission),
    /// Finish what came before, then stop (the ledger is closing).
    Stop,
}

/// State shared between the writer thread and readers.
pub struct Shared {
    pub store: Store,
    pub master: RwLock<Arc<MasterKey>>,
    pub keys: KeyCache,
    /// The highest position known durable. Readers never show anything past it.
    pub durable: AtomicU64,
    pub durable_watch: watch::Sender<Position>,
    poisoned: AtomicBool,
    pub fsyncs: AtomicU64,
    pub commits: AtomicU64,
    /// Groups handed to the syncer and not yet answered.
    in_flight: std::sync::atomic::AtomicUsize,
    /// Held by the sequencer for each group and by a key rotation for its whole run.
    pub rotation: std::sync::Mutex<()>,
    /// Moves whenever the wrapped-key table changes (new keys, erasure, rotation): backups
    /// copy the table again when it moved.
    pub key_epoch: AtomicU64,
}

impl Shared {
    pub fn new(store: Store, master: MasterKey, durable: Position, keys_max: usize) -> Shared {
        let (tx, _) = watch::channel(durable);
        Shared {
            store,
            master: RwLock::new(Arc::new(master)),
            keys: KeyCache::new(keys_max),
            durable: AtomicU64::new(durable),
            durable_watch: tx,
            poisoned: AtomicBool::new(false),
            fsyncs: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            rotation: std::sync::Mutex::new(()),
            key_epoch: AtomicU64::new(0),
        }
    }

    pub fn master(&self) -> Arc<MasterKey> {
        self.master.read().expect("not poisoned").clone()
    }

    pub fn durable(&self) -> Position {
        self.durable.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
pub struct WriterHandle {
    tx: SyncSender<Msg>,
}

impl WriterHandle {
    fn submission(ops: Vec<Op>) -> (Submission, oneshot::Receiver<Reply>) {
        let (reply, rx) = oneshot::channel();
        (Submission { ops, reply }, rx)
    }

    /// Queues without waiting for room: a full queue answers `Overloaded` at once.
    pub fn try_submit(&self, ops: Vec<Op>) -> Result<oneshot::Receiver<Reply>, WriteError> {
        let (s, rx) = Self::submission(ops);
        match self.tx.try_send(Msg::Submit(s)) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(WriteError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(WriteError::Unavailable("writer stopped".into())),
        }
    }

    /// Queues, waiting for room (for batch tools that would rather wait than fail).
    pub fn submit_blocking(&self, ops: Vec<Op>) -> Reply {
        let (s, rx) = Self::submission(ops);
        self.tx.send(Msg::Submit(s)).map_err(|_| WriteError::Unavailable("writer stopped".into()))?;
        rx.blocking_recv().map_err(|_| WriteError::Unavailable("writer stopped".into()))?
    }

    /// Asks the writer to stop once everything queued before is done.
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
    }
}

pub struct Config {
    pub queue_depth: usize,
    pub group_events_max: usize,
    pub projections: Arc<Projections>,
    pub space: SpaceGuard,
}

/// Keeps the data directory's file system from filling up under the store.
///
/// sled turns any failed write into a permanent error for the whole process, so the ledger
/// must refuse writes before the disk is full, not after. Below `floor_bytes` free, new data
/// (appends, new subjects) is refused with [`WriteError::DiskFull`]; the small records that
/// keep the ledger lawful (audit entries of reads and logins, erasures, restrictions,
/// shreds) go on into the reserve down to a quarter of it; below that, everything is refused,
/// and reads that must be audited first are refused with them. Checked once per group commit
/// (one `statvfs`); the ledger goes on by itself once space is freed.
#[derive(Clone, Debug)]
pub struct SpaceGuard {
    pub dir: std::path::PathBuf,
    pub floor_bytes: u64,
}

impl SpaceGuard {
    /// Bytes available on the data directory's file system, or `None` when the file system
    /// does not say (then nothing is refused on its account).
    pub fn free_bytes(&self) -> Option<u64> {
        crate::store::free_bytes(&self.dir)
    }

    /// Why this submission may not be written now, if it may not.
    fn refuses(&self, free: Option<u64>, ops: &[Op]) -> Option<WriteError> {
        let free_bytes = free?;
        let new_data = ops.iter().any(|op| matches!(op, Op::Append { .. } | Op::Create { .. }));
        let floor = if new_data { self.floor_bytes } else { self.floor_bytes / 4 };
        (free_bytes < floor).then_some(WriteError::DiskFull { free_bytes, floor_bytes: floor })
    }
}

pub fn spawn(
    shared: Arc<Shared>,
    head: (Position, ChainHash, u64),
    config: Config,
) -> (WriterHandle, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::sync_channel(config.queue_depth);
    // Two groups in flight at most: one being synced, one applied behind it.
    let (sync_tx, sync_rx) = std::sync::mpsc::sync_channel(1);
    let syncer_shared = shared.clone();
    let syncer = std::thread::Builder::new()
        .name("pdledger-syncer".into())
        .spawn(move || sync_loop(syncer_shared, sync_rx))
        .expect("spawn the syncer thread");
    let mut w = Writer {
        syncer: sync_tx,
        shared,
        head: head.0,
        hash: head.1,
        last_ms: head.2,
        versions: HashMap::new(),
        group_events_max: config.group_events_max,
        projector: Projector::new(config.projections),
        space: config.space,
    };
    let join = std::thread::Builder::new()
        .name("pdledger-writer".into())
        .spawn(move || {
            w.run(rx);
            // Closing the channel lets the syncer finish what is in flight, then stop.
            drop(w);
            let _ = syncer.join();
        })
        .expect("spawn the writer thread");
    (WriterHandle { tx }, join)
}

struct Writer {
    shared: Arc<Shared>,
    syncer: SyncSender<Applied>,
    /// The last applied position and its hash (durable once the syncer says so).
    head: Position,
    hash: ChainHash,
    last_ms: u64,
    /// Durable stream versions, read through from the store. Bounded: cleared when full.
    versions: HashMap<Uuid, u64>,
    group_events_max: usize,
    /// Keeps the view documents current, in the same commit as the events.
    projector: Projector,
    space: SpaceGuard,
}

const VERSIONS_MAX: usize = 200_000;

/// A group applied to the store, waiting for its fsync.
struct Applied {
    head: Position,
    accepted: Vec<Staged>,
}

/// The syncer: makes applied groups durable and only then acknowledges them. While it waits
/// for one fsync, the sequencer seals and applies the next group; one fsync covers every
/// group applied by the time it starts.
fn sync_loop(shared: Arc<Shared>, rx: Receiver<Applied>) {
    while let Ok(first) = rx.recv() {
        let mut groups = vec![first];
        while let Ok(g) = rx.try_recv() {
            groups.push(g);
        }
        let n = groups.len();
        make_durable(&shared, groups);
        shared.in_flight.fetch_sub(n, Ordering::AcqRel);
    }
}

/// One flush + fsync for all these applied groups, then the durable head moves and every
/// submitter in them is answered.
fn make_durable(shared: &Shared, groups: Vec<Applied>) {
    let outcome = if shared.poisoned.load(Ordering::Acquire) {
        Err("an earlier write failed".to_owned())
    } else {
        shared.store.sync().map_err(|e| e.to_string())
    };
    shared.fsyncs.fetch_add(1, Ordering::Relaxed);
    match outcome {
        Ok(()) => {
            let head = groups.last().expect("at least one").head;
            shared.durable.fetch_max(head, Ordering::AcqRel);
            shared.durable_watch.send_replace(shared.durable.load(Ordering::Acquire));
            for g in groups {
                for s in g.accepted {
                    let _ = s.reply.send(Ok(s.results));
                }
            }
        }
        Err(msg) => {
            tracing::error!(error = msg, "durable write failed; refusing further writes until restart");
            shared.poisoned.store(true, Ordering::Release);
            for g in groups {
                for s in g.accepted {
                    let _ = s.reply.send(Err(WriteError::Unavailable(msg.clone())));
                }
            }
        }
    }
}

/// What one accepted submission will write, before it is durable.
struct Staged {
    reply: oneshot::Sender<Reply>,
    results: Vec<Committed>,
}

impl Writer {
    fn run(&mut self, rx: Receiver<Msg>) {
        let mut stopping = false;
        let mut next: Option<Msg> = None;
        while !stopping {
            let first = match next.take().map(Ok).unwrap_or_else(|| rx.recv()) {
                Ok(Msg::Submit(s)) => s,
                Ok(Msg::Stop) | Err(_) => break,
            };
            let mut group = vec![first];
            let mut events: usize = group[0].ops.iter().map(Op::len).sum();
            while events < self.group_events_max {
                match rx.try_recv() {
                    Ok(Msg::Submit(s)) => {
                        events += s.ops.iter().map(Op::len).sum::<usize>();
                        group.push(s);
                    }
                    Ok(Msg::Stop) => {
                        stopping = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            let Some(applied) = self.commit_group(group) else { continue };
            // Nothing in flight and nothing waiting: sync here and save a thread hop (a lone
            // appender's latency). Otherwise the syncer takes it and we move on to the next
            // group while it waits for the disk.
            let idle = self.shared.in_flight.load(Ordering::Acquire) == 0;
            if idle && !stopping {
                match rx.try_recv() {
                    Ok(m) => next = Some(m),
                    Err(_) => {
                        make_durable(&self.shared, vec![applied]);
                        continue;
                    }
                }
            }
            self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
            if self.syncer.send(applied).is_err() {
                self.poison("the syncer thread stopped");
            }
        }
    }

    fn current_version(&mut self, subject: Uuid, staged: &HashMap<Uuid, u64>) -> Result<u64, String> {
        if let Some(v) = staged.get(&subject) {
            return Ok(*v);
        }
        if let Some(v) = self.versions.get(&subject) {
            return Ok(*v);
        }
        let v = self.shared.store.stream_version(subject).map_err(|e| e.to_string())?;
        if self.versions.len() >= VERSIONS_MAX {
            self.versions.clear();
        }
        self.versions.insert(subject, v);
        Ok(v)
    }

    /// Checks, seals and applies a group. Returns it for `make_durable`, or `None` when
    /// nothing was accepted (every submitter has been answered).
    fn commit_group(&mut self, group: Vec<Submission>) -> Option<Applied> {
        // A key rotation pauses the sequencer (not the syncer) while it runs.
        let shared = self.shared.clone();
        let _not_rotating = shared.rotation.lock().expect("not poisoned");
        if self.shared.poisoned.load(Ordering::Acquire) {
            for s in group {
                let _ = s.reply.send(Err(WriteError::Unavailable("an earlier write failed".into())));
            }
            return None;
        }
        let master = self.shared.master();
        let mut g = Group {
            pending: vec![],
            staged_versions: HashMap::new(),
            new_keys: vec![],
            creates: vec![],
            index: vec![],
            projected: vec![],
            audit: vec![],
            erasures: vec![],
            shreds: vec![],
            restrictions: vec![],
        };
        let mut accepted: Vec<Staged> = vec![];
        let now = crate::time::now_ms().max(self.last_ms);
        let free = self.space.free_bytes();

        for sub in group {
            if let Some(e) = self.space.refuses(free, &sub.ops) {
                let _ = sub.reply.send(Err(e));
                continue;
            }
            if let Err(e) = self.check(&sub.ops, &g) {
                let _ = sub.reply.send(Err(e));
                continue;
            }
            // Seal and stage. Failures here are ours or the OS's: nothing of this group lands.
            let mut results = Vec::with_capacity(sub.ops.len());
            for op in sub.ops {
                match self.stage(op, &master, &mut g, now) {
                    Ok(c) => results.push(c),
                    Err(e) => {
                        self.poison(&e);
                        let _ = sub.reply.send(Err(WriteError::Unavailable(e)));
                        for s in accepted {
                            let _ = s.reply.send(Err(WriteError::Unavailable("group aborted".into())));
                        }
                        return None;
                    }
                }
            }
            accepted.push(Staged { reply: sub.reply, results });
        }
        if accepted.is_empty() {
            return None;
        }
        self.shared.commits.fetch_add(1, Ordering::Relaxed);

        // Chain in position order; the last record carries the commit mark. Write order
        // matters, since a crash keeps a prefix: keys before the records sealed under them,
        // each record before its stream entry, the head last.
        let mut batch = WriteBatch::default();
        for (subject, category, wrapped, _) in &g.new_keys {
            batch.put_wrapped_key(*subject, *category, wrapped);
        }
        let mut hash = self.hash;
        let mut hashes = Vec::with_capacity(g.pending.len());
        let last = g.pending.len() - 1;
        for (i, mut p) in g.pending.into_iter().enumerate() {
            if i == last {
                p.header.flags |= record::FLAG_COMMIT;
            }
            let (bytes, h) = record::encode(&p.header, &p.nonce, &p.payload, &hash);
            // Our own bug, caught before it reaches the disk.
            debug_assert_eq!(record::decode(&bytes).map(|r| r.header), Ok(p.header.clone()));
            batch.put_record(p.header.position, bytes);
            if p.header.kind == Kind::Sealed {
                batch.put_stream(p.header.subject, p.header.version, p.header.position);
            }
            hash = h;
            hashes.push(h);
        }
        for (subject, at) in &g.creates {
            batch.put_subject(*subject, *at);
        }
        for (kind, blind, subject, at, sealed) in &g.index {
            batch.put_index(*kind, blind, *subject, *at, sealed);
        }
        for (at, subject) in &g.audit {
            batch.put_audit(*at, *subject);
        }
        let pos = self.head + hashes.len() as u64;
        // An erased subject's events of this same group are not projected.
        g.projected.retain(|p| !g.erasures.iter().any(|(s, _, _)| *s == p.subject));
        // The views follow the records they reflect, then their checkpoint, then the head.
        if let Err(e) = self.project(&g.projected, &g.new_keys, &master, now, &mut batch) {
            let msg = format!("updating views: {e}");
            self.poison(&msg);
            for s in accepted {
                let _ = s.reply.send(Err(WriteError::Unavailable(msg.clone())));
            }
            return None;
        }
        for (subject, restricted) in &g.restrictions {
            let at = if *restricted { Some(pos) } else { None };
            batch.put_restricted(*subject, at);
        }
        for (subject, category) in &g.shreds {
            shred_side_effects(self.projector.projections(), *subject, *category, &mut batch);
        }
        for (subject, at, retain) in &g.erasures {
            let staged_index: Vec<_> =
                g.index.iter().filter(|(_, _, s, _, _)| s == subject).map(|(k, b, _, _, _)| (*k, *b)).collect();
            if let Err(e) = erase_side_effects(
                &self.shared.store,
                self.projector.projections(),
                *subject,
                *at,
                retain,
                staged_index,
                &mut batch,
            ) {
                let msg = format!("erasing: {e}");
                self.poison(&msg);
                for s in accepted {
                    let _ = s.reply.send(Err(WriteError::Unavailable(msg.clone())));
                }
                return None;
            }
        }
        batch.put_meta(crate::views::META_AT, &pos.to_be_bytes());
        batch.put_head(pos, &hash);
        for s in &mut accepted {
            for c in &mut s.results {
                let last = *c.positions.last().expect("every op writes a record");
                c.hash = hashes[(last - self.head - 1) as usize];
            }
        }

        // Applied (not yet durable): the sequencer moves on while the syncer makes it durable.
        if let Err(e) = self.shared.store.apply(batch) {
            let msg = e.to_string();
            self.poison(&msg);
            for s in accepted {
                let _ = s.reply.send(Err(WriteError::Unavailable(msg.clone())));
            }
            return None;
        }
        self.head = pos;
        self.hash = hash;
        self.last_ms = now;
        for (s, v) in g.staged_versions {
            if self.versions.len() >= VERSIONS_MAX {
                self.versions.clear();
            }
            self.versions.insert(s, v);
        }
        if !g.new_keys.is_empty() || !g.erasures.is_empty() || !g.shreds.is_empty() {
            self.shared.key_epoch.fetch_add(1, Ordering::AcqRel);
        }
        for (subject, category, _, key) in g.new_keys {
            if !g.erasures.iter().any(|(s, _, _)| *s == subject) {
                self.shared.keys.insert(subject, category, key);
            }
        }
        for (subject, _) in &g.shreds {
            self.shared.keys.forget(Some(*subject));
        }
        for (subject, _, _) in &g.erasures {
            self.shared.keys.forget(Some(*subject));
            self.versions.remove(subject);
        }
        Some(Applied { head: pos, accepted })
    }

    /// Applies this group's events to the view documents and seals them into `batch`.
    fn project(
        &mut self,
        events: &[Projected],
        new_keys: &[NewKey],
        master: &MasterKey,
        now: u64,
        batch: &mut WriteBatch,
    ) -> Result<(), crate::views::ViewError> {
        if events.is_empty() {
            return Ok(());
        }
        let shared = &self.shared;
        let keys = |subject: Uuid, category: u8| -> Result<Option<Arc<SubjectKey>>, String> {
            if let Some((_, _, _, k)) = new_keys.iter().find(|(s, c, _, _)| *s == subject && *c == category) {
                return Ok(Some(k.clone()));
            }
            shared.keys.get(&shared.store, master, subject, category).map_err(|e| e.to_string())
        };
        let recorded_at = crate::time::rfc3339(now);
        for p in events {
            let ev = EventRef {
                event_type: &p.event_type,
                data: (&p.data).into(),
                occurred_at: &p.occurred_at,
                recorded_at: &recorded_at,
                version: p.version,
                position: p.position,
            };
            self.projector.apply(&shared.store, &keys, p.subject, &ev)?;
        }
        self.projector.flush(&keys, batch)
    }

    /// Checks a submission's expected versions against the log and what this group already
    /// staged, writing nothing.
    fn check(&mut self, ops: &[Op], g: &Group) -> Result<(), WriteError> {
        let staged = &g.staged_versions;
        let mut local: HashMap<Uuid, u64> = HashMap::new();
        let unavailable = |e: crate::store::StoreError| WriteError::Unavailable(e.to_string());
        let shared = self.shared.clone();
        let store = &shared.store;
        // The position and time of the subject's erasure, if it was erased.
        let erased = |subject: &Uuid| -> Result<Option<(Position, u64)>, WriteError> {
            if let Some((_, at, _)) = g.erasures.iter().find(|(s, _, _)| s == subject) {
                return Ok(Some((*at, crate::time::now_ms())));
            }
            let Some(at) = store.erased(*subject).map_err(unavailable)? else { return Ok(None) };
            let bytes = store
                .record(at)
                .map_err(unavailable)?
                .ok_or_else(|| WriteError::Unavailable("erasure record missing".into()))?;
            let rec = record::decode(&bytes).map_err(|e| WriteError::Unavailable(e.to_string()))?;
            Ok(Some((at, rec.header.recorded_at_ms)))
        };
        let restricted = |subject: &Uuid| -> Result<bool, WriteError> {
            if let Some((_, r)) = g.restrictions.iter().rev().find(|(s, _)| s == subject) {
                return Ok(*r);
            }
            Ok(store.restricted(*subject).map_err(unavailable)?.is_some())
        };
        let exists = |subject: &Uuid, local: &HashMap<Uuid, u64>| -> Result<bool, WriteError> {
            Ok(local.contains_key(subject)
                || staged.contains_key(subject)
                || store.subject_created(*subject).map_err(unavailable)?.is_some())
        };
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::Append { subject, events, .. } => {
                    if let Some((position, erased_at_ms)) = erased(subject)? {
                        return Err(Rejected::Erased { subject: *subject, position, erased_at_ms }.into());
                    }
                    if let Some(ev) = events.iter().find(|e| !e.correction) {
                        if restricted(subject)? {
                            return Err(
                                Rejected::Restricted { subject: *subject, event_type: ev.event_type.clone() }.into()
                            );
                        }
                    }
                }
                Op::Erase { subject, .. } | Op::Restrict { subject, .. } => {
                    if let Some((position, erased_at_ms)) = erased(subject)? {
                        return Err(Rejected::Erased { subject: *subject, position, erased_at_ms }.into());
                    }
                    if !exists(subject, &local)? {
                        return Err(Rejected::UnknownSubject(*subject).into());
                    }
                }
                _ => {}
            }
            if let Op::Append { subject, expected_version, events, .. } = op {
                let current = match local.get(subject) {
                    Some(v) => *v,
                    None => self.current_version(*subject, staged).map_err(WriteError::Unavailable)?,
                };
                if let Some(expected) = expected_version {
                    if *expected != current {
                        return Err(WriteError::Rejected(Rejected::VersionConflict {
                            op: i,
                            subject: *subject,
                            expected: *expected,
                            current,
                        }));
                    }
                }
                local.insert(*subject, current + events.len() as u64);
            }
            if let Op::Create { subject, .. } = op {
                if exists(subject, &local)?
                    || self.current_version(*subject, staged).map_err(WriteError::Unavailable)? > 0
                {
                    return Err(WriteError::Rejected(Rejected::SubjectExists(*subject)));
                }
                local.insert(*subject, 0);
            }
        }
        Ok(())
    }

    fn poison(&self, why: &str) {
        tracing::error!(error = why, "durable write failed; refusing further writes until restart");
        self.shared.poisoned.store(true, Ordering::Release);
    }

    /// Seals one operation's events into records at the next positions.
    fn stage(&mut self, op: Op, master: &MasterKey, g: &mut Group, now: u64) -> Result<Committed, String> {
        let head = self.head;
        let position = |g: &Group| head + g.pending.len() as u64 + 1;
        match op {
            Op::Append { subject, events, actor, .. } => {
                let mut version = self.current_version(subject, &g.staged_versions)?;
                if version == 0
                    && !g.staged_versions.contains_key(&subject)
                    && self.shared.store.subject_created(subject).map_err(|e| e.to_string())?.is_none()
                {
                    // Appending to an unknown id creates the subject (idempotent if created).
                    g.creates.push((subject, position(g)));
                }
                let first_version = version + 1;
                let mut positions = Vec::with_capacity(events.len());
                for ev in events {
                    version += 1;
                    let key = match g.new_keys.iter().find(|(s, c, _, _)| *s == subject && *c == ev.category) {
                        Some((_, _, _, k)) => k.clone(),
                        None => match self.shared.keys.get(&self.shared.store, master, subject, ev.category) {
                            Ok(Some(k)) => k,
                            Ok(None) => {
                                let k = Arc::new(SubjectKey::generate().map_err(|e| e.to_string())?);
                                let wrapped = master.wrap(subject, ev.category, &k).map_err(|e| e.to_string())?;
                                g.new_keys.push((subject, ev.category, wrapped, k.clone()));
                                k
                            }
                            Err(e) => return Err(e.to_string()),
                        },
                    };
                    let header = Header {
                        kind: Kind::Sealed,
                        flags: 0,
                        position: position(g),
                        subject,
                        version,
                        recorded_at_ms: now,
                        key_gen: master.generation(),
                        category: ev.category,
                        schema_version: ev.schema_version,
                        event_type: ev.event_type,
                        actor: actor.clone(),
                    };
                    let (nonce, payload) =
                        key.seal(&record::seal_aad(&header), &ev.plaintext).map_err(|e| e.to_string())?;
                    positions.push(header.position);
                    for l in ev.lookups {
                        let sealed = crate::lookup::seal_value(&key, subject, l.kind, ev.category, &l.value)
                            .map_err(|e| e.to_string())?;
                        g.index.push((l.kind, l.blind, subject, header.position, sealed));
                    }
                    if self.projector.projections().handles(&header.event_type) {
                        g.projected.push(Projected {
                            subject,
                            event_type: header.event_type.clone(),
                            occurred_at: ev.occurred_at,
                            data: ev.data,
                            version,
                            position: header.position,
                        });
                    }
                    g.pending.push(Pending { header, nonce, payload });
                }
                g.staged_versions.insert(subject, version);
                Ok(Committed {
                    subject: Some(subject),
                    first_version,
                    last_version: version,
                    positions,
                    recorded_at_ms: now,
                    hash: ChainHash::GENESIS,
                })
            }
            Op::Create { subject, actor } => {
                let at = position(g);
                g.creates.push((subject, at));
                g.staged_versions.insert(subject, 0);
                let c = self.stage(
                    Op::Note {
                        subject: Some(subject),
                        event_type: "subject.created".into(),
                        json: serde_json::json!({ "subject": subject }),
                        actor,
                    },
                    master,
                    g,
                    now,
                )?;
                Ok(c)
            }
            Op::Erase { subject, reason, actor, retain } => {
                g.erasures.push((subject, position(g), retain.clone()));
                let json = serde_json::json!({
                    "subject": subject, "reason": reason, "key_generation": master.generation(),
                    "retained": retain,
                });
                self.stage(Op::Note { subject: Some(subject), event_type: ERASED.into(), json, actor }, master, g, now)
            }
            Op::Shred { subject, category, actor } => {
                g.shreds.push((subject, category));
                let json = serde_json::json!({ "subject": subject, "category": category });
                self.stage(
                    Op::Note { subject: Some(subject), event_type: SHREDDED.into(), json, actor },
                    master,
                    g,
                    now,
                )
            }
            Op::Restrict { subject, restricted, actor } => {
                g.restrictions.push((subject, restricted));
                let event_type = if restricted { RESTRICTED } else { UNRESTRICTED };
                let json = serde_json::json!({ "subject": subject });
                self.stage(
                    Op::Note { subject: Some(subject), event_type: event_type.into(), json, actor },
                    master,
                    g,
                    now,
                )
            }
            Op::Note { subject, event_type, json, actor } => {
                if event_type == crate::audit::EVENT_TYPE {
                    g.audit.push((position(g), crate::audit::indexed_subject(subject.unwrap_or(Uuid::nil()))));
                }
                let header = Header {
                    kind: Kind::Ledger,
                    flags: 0,
                    position: position(g),
                    subject: subject.unwrap_or(Uuid::nil()),
                    version: 0,
                    recorded_at_ms: now,
                    key_gen: 0,
                    category: 0,
                    schema_version: 1,
                    event_type,
                    actor,
                };
                let payload = serde_json::to_vec(&json).map_err(|e| e.to_string())?;
                let positions = vec![header.position];
                g.pending.push(Pending { header, nonce: [0; record::NONCE_LEN], payload });
                Ok(Committed {
                    subject,
                    first_version: 0,
                    last_version: 0,
                    positions,
                    recorded_at_ms: now,
                    hash: ChainHash::GENESIS,
                })
            }
        }
    }
}

/// What erasing a subject removes, after its erasure event at `at`: every wrapped key, view
/// document and blind-index entry (`extra_index`: entries staged in the same group), and the
/// fence that refuses its appends. Idempotent: open replays it for a commit cut short.
pub fn erase_side_effects(
    store: &Store,
    projections: &Projections,
    subject: Uuid,
    at: Position,
    retain: &[Hold],
    extra_index: Vec<(u8, [u8; 32])>,
    batch: &mut WriteBatch,
) -> Result<(), crate::store::StoreError> {
    let kept = |c: u8| retain.iter().any(|h| h.category == c);
    batch.put_erased(subject, at);
    batch.put_meta(crate::rotator::META_DUE, &at.to_be_bytes());
    for category in store.key_categories(subject)? {
        if !kept(category) {
            batch.remove_wrapped_key(subject, category);
        }
    }
    // Keys created by the same group are put earlier in the batch: remove every category.
    for category in crate::schema::Category::ALL {
        if !kept(category as u8) {
            batch.remove_wrapped_key(subject, category as u8);
        }
    }
    for h in retain {
        batch.put_hold(subject, h.category, h.until_ms);
    }
    for view in projections.views() {
        if !kept(view.category() as u8) {
            batch.remove_view(view.name(), subject);
        }
    }
    for (kind, blind) in store.index_of(subject)?.into_iter().chain(extra_index) {
        batch.remove_index(kind, &blind, subject);
    }
    Ok(())
}

/// What shredding one retained category removes: its key, its view documents, its hold.
pub fn shred_side_effects(projections: &Projections, subject: Uuid, category: u8, batch: &mut WriteBatch) {
    batch.remove_wrapped_key(subject, category);
    batch.remove_hold(subject, category);
    for view in projections.views().iter().filter(|v| v.category() as u8 == category) {
        batch.remove_view(view.name(), subject);
    }
    batch.put_meta(crate::rotator::META_DUE, &[1]);
}

/// A record sealed but not yet chained.
struct Pending {
    header: Header,
    nonce: [u8; record::NONCE_LEN],
    payload: Vec<u8>,
}

/// A subject key created by this group: (subject, category, wrapped, key).
type NewKey = (Uuid, u8, Vec<u8>, Arc<SubjectKey>);

/// A blind-index entry: (lookup key, hash, subject, position of the event, sealed value).
type IndexEntry = (u8, [u8; 32], Uuid, Position, Vec<u8>);

/// An event of this group that some view handles.
struct Projected {
    subject: Uuid,
    event_type: String,
    occurred_at: String,
    data: Value,
    version: u64,
    position: Position,
}

/// What one group commit will write.
struct Group {
    pending: Vec<Pending>,
    staged_versions: HashMap<Uuid, u64>,
    new_keys: Vec<NewKey>,
    projected: Vec<Projected>,
    /// Audit entries to index: (position, subject).
    audit: Vec<(Position, Option<Uuid>)>,
    /// Subjects erased by this group, the position of each erasure event, what it keeps.
    erasures: Vec<(Uuid, Position, Vec<Hold>)>,
    /// Categories shredded by this group.
    shreds: Vec<(Uuid, u8)>,
    /// Restrictions set (true) or lifted (false) by this group, in order.
    restrictions: Vec<(Uuid, bool)>,
    /// Subjects created by this group, and the position that created each.
    creates: Vec<(Uuid, Position)>,
    index: Vec<IndexEntry>,
}
