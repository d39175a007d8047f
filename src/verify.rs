//! Keyless verification of the log: the chain, density of positions, and the head.
//!
//! Needs no key, so an auditor can run it without seeing personal data, and it still passes
//! after crypto-shredding (the chain covers ciphertext, not plaintext).

use serde::Serialize;

use crate::record::{self, ChainHash, Position};
use crate::store::{Store, StoreError};

/// A head written down elsewhere: `POSITION:HASH`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Anchor {
    pub position: Position,
    pub hash: ChainHash,
}

impl std::str::FromStr for Anchor {
    type Err = String;
    fn from_str(s: &str) -> Result<Anchor, String> {
        let (p, h) = s.split_once(':').ok_or("an anchor is POSITION:HASH, as `pdledger verify` prints it")?;
        let position = p.parse().map_err(|_| format!("anchor position `{p}` is not a number"))?;
        let hash = ChainHash::from_hex(h).ok_or("anchor hash must be 64 hex digits")?;
        Ok(Anchor { position, hash })
    }
}

impl std::fmt::Display for Anchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.position, self.hash.to_hex())
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Break {
    /// The first position that is wrong (missing, damaged, out of place, or not chained).
    pub position: Position,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    /// Records checked and found whole (the chain up to the break, if any).
    pub events: u64,
    /// Records after the last complete commit (a crash cut it short; never acknowledged).
    pub uncommitted: u64,
    pub head: HeadOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_bad_position: Option<Position>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// With `--deep`, on a whole chain: the first index entry that disagrees with the log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index_problem: Option<Break>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeadOut {
    pub position: Position,
    pub hash: String,
}

impl Report {
    pub fn anchor(&self) -> String {
        format!("{}:{}", self.head.position, self.head.hash)
    }
}

/// Walks the whole log. `progress` is called now and then with the records checked so far.
pub fn verify(store: &Store, anchor: Option<Anchor>, progress: impl FnMut(u64)) -> Result<Report, StoreError> {
    let meta_head = store.head()?;
    // A record sled cannot read is a break at that place, not a failure of the check.
    let records = store.records(1).map(|r| r.map(|(p, v)| (p, v.to_vec())).map_err(|e| e.to_string()));
    Ok(verify_log(records, meta_head, anchor, progress))
}

/// Records a reading thread hands the checking thread at a time: this many, or fewer when
/// their bytes reach `READ_AHEAD_BYTES` (events can be up to 1 MiB each).
const READ_AHEAD_CHUNK: usize = 4096;
const READ_AHEAD_BYTES: usize = 4 << 20;
/// Chunks read ahead of the checker (plus the one being filled and the one being checked).
const READ_AHEAD_CHUNKS: usize = 4;

/// Checks a log given as (position, stored bytes) in order (from a store or a backup),
/// against the head its container records (`None`: no head recorded). One thread reads the
/// records while this one decodes and hashes them, at most `READ_AHEAD_CHUNKS` chunks ahead
/// (each chunk under 4 MiB plus one record: a few tens of MiB in memory at most). Reading and
/// hashing each took about half the time of a one-thread check.
pub fn verify_log(
    records: impl Iterator<Item = Result<(Position, Vec<u8>), String>> + Send,
    meta_head: Option<(Position, ChainHash)>,
    anchor: Option<Anchor>,
    progress: impl FnMut(u64),
) -> Report {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<_>>(READ_AHEAD_CHUNKS);
        scope.spawn(move || {
            let mut chunk = Vec::with_capacity(READ_AHEAD_CHUNK);
            let mut bytes = 0;
            for item in records {
                let failed = item.is_err();
                bytes += item.as_ref().map_or(0, |(_, b)| b.len());
                chunk.push(item);
                if chunk.len() == READ_AHEAD_CHUNK || bytes >= READ_AHEAD_BYTES || failed {
                    bytes = 0;
                    // The checker stops at the first break and drops its end: so do we.
                    if tx.send(std::mem::replace(&mut chunk, Vec::with_capacity(READ_AHEAD_CHUNK))).is_err() || failed {
                        return;
                    }
                }
            }
            let _ = tx.send(chunk);
        });
        check_log(rx.into_iter().flatten(), meta_head, anchor, progress)
    })
}

fn check_log(
    records: impl Iterator<Item = Result<(Position, Vec<u8>), String>>,
    meta_head: Option<(Position, ChainHash)>,
    anchor: Option<Anchor>,
    mut progress: impl FnMut(u64),
) -> Report {
    let mut prev = ChainHash::GENESIS;
    let mut expected: Position = 1;
    // The last record that closes a commit, and its hash: the head an anchor should name.
    let mut committed = (0, ChainHash::GENESIS);
    let mut meta_hash_seen = None;
    let mut anchor_seen = false;
    let mut problem: Option<Break> = None;
    for item in records {
        let fail = |reason: String| Some(Break { position: expected, reason });
        let (pos, bytes) = match item {
            Ok(v) => v,
            Err(e) => {
                problem = fail(format!("cannot be read: {e}"));
                break;
            }
        };
        if pos != expected {
            problem = fail(format!("record {expected} is missing (the next stored is {pos})"));
            break;
        }
        let rec = match record::decode(&bytes) {
            Ok(r) => r,
            Err(e) => {
                problem = fail(format!("record cannot be decoded: {e}"));
                break;
            }
        };
        if rec.header.position != pos {
            problem = fail(format!("holds the record of position {} (moved or swapped)", rec.header.position));
            break;
        }
        if rec.prev_hash != prev {
            problem = fail("its previous-hash does not match the record before it".into());
            break;
        }
        if !record::hash_is_valid(&bytes, &rec) {
            problem = fail("its hash does not match its bytes (edited)".into());
            break;
        }
        if let Some(a) = anchor {
            if a.position == pos {
                if a.hash != rec.hash {
                    problem = fail("differs from the anchor: the log was rewritten since the anchor was taken".into());
                    break;
                }
                anchor_seen = true;
            }
        }
        prev = rec.hash;
        if rec.header.flags & record::FLAG_COMMIT != 0 {
            committed = (pos, rec.hash);
        }
        if meta_head.is_some_and(|(p, _)| p == pos) {
            meta_hash_seen = Some(rec.hash);
        }
        expected += 1;
        if expected.is_multiple_of(65_536) {
            progress(expected - 1);
        }
    }
    let last = expected - 1;
    if problem.is_none() {
        match meta_head {
            Some((meta_pos, _)) if meta_pos > last => {
                problem = Some(Break {
                    position: last + 1,
                    reason: format!("the recorded head says {meta_pos}, the log ends at {last}: the tail was cut"),
                });
            }
            Some((meta_pos, meta_hash)) if meta_pos > 0 && meta_hash_seen != Some(meta_hash) => {
                problem = Some(Break { position: meta_pos, reason: "differs from the recorded head".into() });
            }
            None if last > 0 => {
                problem = Some(Break { position: 1, reason: "the store has records but no head".into() });
            }
            _ => {}
        }
    }
    if problem.is_none() {
        if let Some(a) = anchor {
            if !anchor_seen && a.position != 0 {
                problem = Some(Break {
                    position: last + 1,
                    reason: format!(
                        "the log ends at {last}, before the anchor's position {}: truncated or rolled back",
                        a.position
                    ),
                });
            }
        }
    }
    progress(last);
    let ok = problem.is_none();
    // Records after the last commit mark belong to a commit a crash cut short: never
    // acknowledged, chained correctly, removed when the ledger next opens.
    let (head_pos, head_hash) = if ok { committed } else { (last, prev) };
    Report {
        ok,
        events: match &problem {
            Some(b) => b.position - 1,
            None => head_pos,
        },
        uncommitted: if ok { last - head_pos } else { 0 },
        head: HeadOut { position: head_pos, hash: head_hash.to_hex() },
        first_bad_position: problem.as_ref().map(|b| b.position),
        reason: problem.map(|b| b.reason),
        index_problem: None,
    }
}

/// The deep check (`verify --deep`), keyless: the indexes a reader trusts against the log up
/// to `head`. Every subject record has its stream entry at its version, every subject with
/// records its subject entry, every audit entry its audit-index entries; and the stream and
/// audit indexes hold nothing the log does not. A store whose index was lost or cut would
/// otherwise open and verify as whole while showing subjects with fewer events, or none.
/// Returns the first problem, at the position of the record it concerns.
pub fn verify_indexes(
    store: &Store,
    head: Position,
    mut progress: impl FnMut(u64),
) -> Result<Option<Break>, StoreError> {
    use crate::record::Kind;
    let brk = |position: Position, reason: String| Ok(Some(Break { position, reason }));
    let (mut sealed, mut audits, mut about_subjects) = (0u64, 0u64, 0u64);
    let mut subjects = std::collections::HashSet::new();
    for item in store.records(1) {
        let (pos, bytes) = item?;
        if pos > head {
            break;
        }
        let Ok(rec) = record::decode(&bytes) else { return brk(pos, "the record cannot be decoded".into()) };
        let h = &rec.header;
        match h.kind {
            Kind::Sealed => {
                sealed += 1;
                if subjects.insert(h.subject) && store.subject_created(h.subject)?.is_none() {
                    return brk(pos, format!("subject {} has records but no entry in the subject index", h.subject));
                }
                match store.stream_position(h.subject, h.version)? {
                    Some(p) if p == pos => {}
                    Some(p) => {
                        return brk(
                            pos,
                            format!(
                                "the stream index puts subject {} version {} at position {p}",
                                h.subject, h.version
                            ),
                        )
                    }
                    None => {
                        return brk(pos, format!("the stream index lacks subject {} version {}", h.subject, h.version))
                    }
                }
            }
            Kind::Ledger if h.event_type == crate::audit::EVENT_TYPE => {
                audits += 1;
                about_subjects += u64::from(!h.subject.is_nil());
                if !store.audit_indexed(pos, crate::audit::indexed_subject(h.subject))? {
                    return brk(pos, "the audit entry is missing from the audit index".into());
                }
            }
            Kind::Ledger => {}
        }
        if pos.is_multiple_of(65_536) {
            progress(pos);
        }
    }
    // Nothing more in the indexes than in the log (entries past the head belong to a commit
    // a crash cut short, and go when the ledger next opens).
    let mut streams = 0u64;
    for p in store.stream_positions() {
        if p? <= head {
            streams += 1;
        }
    }
    if streams != sealed {
        return brk(head, format!("the stream index has {streams} entries for {sealed} subject records"));
    }
    let mut indexed = 0u64;
    for p in store.audit_rev(crate::store::AuditKey::All, head.saturating_add(1)) {
        p?;
        indexed += 1;
    }
    if indexed != audits {
        return brk(head, format!("the audit index has {indexed} entries for {audits} audit entries"));
    }
    let mut by_subject = 0u64;
    for p in store.audit_subject_positions() {
        if p? <= head {
            by_subject += 1;
        }
    }
    if by_subject != about_subjects {
        return brk(
            head,
            format!("the audit index by subject has {by_subject} entries for {about_subjects} audit entries about a subject"),
        );
    }
    progress(head);
    Ok(None)
}
