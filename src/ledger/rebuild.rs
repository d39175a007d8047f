//! Rebuilding every view document from the log, in flat memory and one pass over the log.
//!
//! A subject's events are spread over the whole log, so following each subject's stream in
//! turn reads a log page per event, and sled pulls most of those pages from the file. Reading
//! the log in position order reads each page once, but then every subject's documents are
//! open at the same time, and a document in memory (`serde_json::Value`) is several times its
//! JSON: a synthetic register's documents, about 4.7 KB of JSON per subject, took 33 KB per
//! subject in memory, 2.3 GB for 70,000 subjects.
//!
//! So the rebuild sorts first, in the way of an external sort:
//!
//! 1. **Spill.** One scan of the log, in position order, copies each subject event (sealed,
//!    as stored: nothing is decrypted) into the spill file of its subject's *range*: the
//!    subjects cut, in key order, into contiguous ranges of about `RANGE_SUBJECTS`. Records
//!    of other kinds are skipped after reading their first 27 bytes.
//! 2. **Build.** Each range is then read back from its spill file, in position order, so each
//!    subject's events come in stream order. Its keys are unwrapped once; its documents are
//!    built in memory, then sealed and written in key order. One worker per core (up to
//!    four) takes ranges off a shared queue.
//!
//! Memory holds one range's documents per worker, whatever the length of the log. A pass
//! spills at most 512 ranges (a file open each); more subjects than that (131,072 at 256 a
//! range) take more passes over the log, not more memory. The spill files hold only sealed
//! records (never plaintext, never a key), sit in the data directory (`views-rebuild.tmp/`,
//! mode 0700), take about the size of the log's records, and are removed when the rebuild
//! ends, fails, or (after a crash) starts again. They stop short of the writer's free-space
//! floor: without room, the rebuild reads each subject's stream instead (a read per event,
//! as before this module; slower, no extra disk).

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use uuid::Uuid;

use super::{decode_at, open_plain, parse_sealed, OpenError, ReadError, Shared};
use crate::crypto::SubjectKey;
use crate::projection::{EventRef, Projections};
use crate::record::{self, Kind, Position};
use crate::store::{StoreError, WriteBatch};
use crate::views::{IdMap, Projector};

/// Subjects per range, about (the default of `Limits::rebuild_range_subjects`): the rebuild's
/// memory bound is this many subjects' documents (and keys) per worker, about 8 MB at 33 KB
/// of documents per subject in memory. Measured on 1,000,000 events
/// and 70,000 subjects (docs/BENCHMARKS.md): ranges of 256 subjects were as fast as ranges of
/// 4,096 (the smaller documents' map stays in the CPU's caches) and took 200 MB less.
pub const RANGE_SUBJECTS: usize = 256;
/// Ranges per pass over the log at most (each has a spill file open while the log is read):
/// past this many ranges (131,072 subjects at 256 a range), another pass.
const RANGES_PER_PASS: usize = 512;
/// Documents sealed per write batch.
const FLUSH_DOCS: usize = 10_000;
/// The default of `Limits::rebuild_sort_bytes`: a range's spill file up to this size is read
/// into memory and built subject by subject. A range's file is about 2 MB at 256 subjects
/// of 14 events.
pub const SORT_BYTES: u64 = 32 << 20;
/// Records between two looks at the stop flag and two progress reports.
const STEP: u64 = 16_384;
/// The spill directory's name in the data directory.
const SPILL_DIR: &str = "views-rebuild.tmp";

/// The spill directory: created empty, removed when dropped.
struct Spill(PathBuf);

impl Spill {
    fn create(data: &Path) -> Result<Spill, OpenError> {
        let dir = data.join(SPILL_DIR);
        // One a crash left behind (the rebuild then starts over, here).
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(spill_error(&dir, e)),
            _ => {}
        }
        std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| spill_error(&dir, e))?;
        Ok(Spill(dir))
    }

    fn file(&self, range: usize) -> PathBuf {
        self.0.join(format!("range-{range:04}.spill"))
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), error = %e, "could not remove the views' spill directory");
        }
    }
}

/// A record's largest size: its payload's limit and the header, chain and lengths around it.
const SPILLED_RECORD_MAX: usize = record::PAYLOAD_LEN_MAX + 1024;
/// Spilled bytes between two looks at the disk's free space.
const SPACE_CHECK_BYTES: u64 = 16 << 20;

fn check_room(dir: &Path, floor: u64) -> Result<(), OpenError> {
    match crate::store::free_bytes(dir) {
        Some(free) if free < floor.saturating_add(SPACE_CHECK_BYTES) => Err(spill_error(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!(
                    "{} MiB free, under the free-space floor of {} MiB and the next spill",
                    free >> 20,
                    floor >> 20
                ),
            ),
        )),
        _ => Ok(()),
    }
}

/// A spill that failed for want of disk space (the floor, or the disk itself).
fn is_no_room(e: &OpenError) -> bool {
    matches!(e, OpenError::Store(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::StorageFull)
}

/// A spill frame's head: the record's length (checked) and position.
const FRAME_HEAD: usize = 12;

fn frame_head(head: &[u8; FRAME_HEAD]) -> std::io::Result<(usize, Position)> {
    let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    let pos = u64::from_be_bytes(head[4..].try_into().expect("8 bytes"));
    if len > SPILLED_RECORD_MAX {
        let detail = format!("a spilled record of {len} bytes, over any record's size");
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, detail));
    }
    Ok((len, pos))
}

/// Reads the next spill frame (length ‖ position ‖ record) into `record` and returns its
/// position; None at a clean end, which is only between frames (a cut frame is an error).
fn read_frame(r: &mut impl BufRead, record: &mut Vec<u8>) -> std::io::Result<Option<Position>> {
    if r.fill_buf()?.is_empty() {
        return Ok(None);
    }
    let mut head = [0u8; FRAME_HEAD];
    r.read_exact(&mut head)?;
    let (len, pos) = frame_head(&head)?;
    record.resize(len, 0);
    r.read_exact(record)?;
    Ok(Some(pos))
}

/// Every frame of a spill file read in whole: (position, where its record is in `all`).
fn frames_in(all: &[u8]) -> std::io::Result<Vec<(Position, std::ops::Range<usize>)>> {
    let mut frames = vec![];
    let mut at = 0;
    while at < all.len() {
        let cut = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "a spilled record cut short");
        let head = all.get(at..at + FRAME_HEAD).ok_or_else(cut)?;
        let (len, pos) = frame_head(head.try_into().expect("FRAME_HEAD bytes"))?;
        let record = at + FRAME_HEAD..at + FRAME_HEAD + len;
        if record.end > all.len() {
            return Err(cut());
        }
        at = record.end;
        frames.push((pos, record));
    }
    Ok(frames)
}

fn spill_error(path: &Path, e: std::io::Error) -> OpenError {
    OpenError::Store(StoreError::Io { path: path.to_owned(), source: e })
}

/// Rebuilds every document from the log up to `head`, writing over the stored ones and
/// removing those it does not write again. `cleared`: the caller has just removed every
/// document (new definitions, a new store), so there is nothing to remove and no range looks.
/// `progress` gets (work done, work in all): one unit per record scanned and one per event
/// built.
pub fn rebuild(
    shared: &Shared,
    projections: &Arc<Projections>,
    head: Position,
    limits: &super::Limits,
    cleared: bool,
    progress: Option<&(dyn Fn(u64, u64) + Send + Sync)>,
) -> Result<(), OpenError> {
    let range_subjects = limits.rebuild_range_subjects;
    let store = &shared.store;
    let subjects: Vec<Uuid> = store.subjects().collect::<Result<_, _>>()?;
    let workers = super::workers();
    let ranges = subjects.len().div_ceil(range_subjects.max(1)).max(workers.min(subjects.len())).max(1);
    let per_range = subjects.len().div_ceil(ranges).max(1);
    // Each range by its first and last possible subject id, so that together they cover
    // every id (nothing stored escapes the rebuild); a subject's range by binary search.
    let mut starts: Vec<u128> = subjects.chunks(per_range).map(|c| c[0].as_u128()).collect();
    if starts.is_empty() {
        starts.push(0);
    }
    let bounds: Vec<(Uuid, Uuid)> = (0..starts.len())
        .map(|i| {
            let first = if i == 0 { 0 } else { starts[i] };
            let last = starts.get(i + 1).map_or(u128::MAX, |next| next - 1);
            (Uuid::from_u128(first), Uuid::from_u128(last))
        })
        .collect();
    drop(subjects);
    let mut spill = match Spill::create(store.dir()) {
        Ok(spill) => Some(spill),
        Err(e) if is_no_room(&e) => None,
        Err(e) => return Err(e),
    };
    let started = std::time::Instant::now();
    // A pass spills and builds at most `RANGES_PER_PASS` ranges (each has a file open while
    // the log is read): past that many ranges, the log is read once more per pass.
    let passes = bounds.len().div_ceil(RANGES_PER_PASS) as u64;
    let total = passes.saturating_mul(2).saturating_mul(head);
    let report = |done: u64| {
        if let Some(p) = progress {
            p(done.min(total), total)
        }
    };
    for (pass, first_range) in (0..bounds.len()).step_by(RANGES_PER_PASS).enumerate() {
        let pass_ranges = first_range..(first_range + RANGES_PER_PASS).min(bounds.len());
        let report = |d: u64| report(pass as u64 * 2 * head + d);
        match rebuild_pass(
            shared,
            projections,
            head,
            limits,
            spill.as_ref(),
            &bounds,
            pass_ranges.clone(),
            workers,
            cleared,
            &report,
        ) {
            Err(e) if spill.is_some() && is_no_room(&e) => {
                // No room for the spill: the rest goes subject by subject through the streams
                // (a read per event: slower, but no more disk than the documents themselves).
                tracing::warn!(error = %e, "views rebuild: no room to spill; reading each subject's stream instead");
                spill = None;
                rebuild_pass(shared, projections, head, limits, None, &bounds, pass_ranges, workers, cleared, &report)?;
            }
            other => other?,
        }
    }
    report(total);
    tracing::info!(
        workers,
        ranges = bounds.len(),
        passes,
        secs = started.elapsed().as_secs_f64(),
        "views rebuild: documents built"
    );
    Ok(())
}

/// One pass: the log read once, spilling the records of `ranges`, then those ranges built.
/// `report` gets the pass's work done, from 0 to twice the head.
#[allow(clippy::too_many_arguments)]
fn rebuild_pass(
    shared: &Shared,
    projections: &Arc<Projections>,
    head: Position,
    limits: &super::Limits,
    spill: Option<&Spill>,
    bounds: &[(Uuid, Uuid)],
    ranges: std::ops::Range<usize>,
    workers: usize,
    cleared: bool,
    report: &(dyn Fn(u64) + Sync),
) -> Result<(), OpenError> {
    let store = &shared.store;
    let started = std::time::Instant::now();
    // 1. Spill (when there is room for it).
    let spilled = match spill {
        Some(spill) => spill_pass(store, head, limits, spill, bounds, &ranges, report)?,
        // No spill: the build reads the streams; progress counts the log's subject records.
        None => {
            report(head);
            head
        }
    };
    tracing::info!(spilled, ranges = ranges.len(), secs = started.elapsed().as_secs_f64(), "views rebuild: log read");

    // 2. Build: each range's documents from its spill file, ranges shared out to workers.
    let master = shared.master();
    let next = AtomicUsize::new(0);
    let built = AtomicU64::new(0);
    // The first failure (or panic) stops the other workers within a step.
    let stop = AtomicBool::new(false);
    struct StopOnUnwind<'a>(&'a AtomicBool);
    impl Drop for StopOnUnwind<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.store(true, Ordering::Relaxed);
            }
        }
    }
    // `all`: the worker's buffer for a range's spill file, reused from one range to the next.
    let build_range = |i: usize, all: &mut Vec<u8>| -> Result<(), OpenError> {
        let (first, last) = bounds[i];
        // An erased subject has keys left only for the categories an erasure kept for a legal
        // obligation: those documents are rebuilt; events of the others have no key, skipped.
        let mut keys: IdMap<(Uuid, u8), Arc<SubjectKey>> = IdMap::default();
        for item in store.wrapped_keys_between(first, last) {
            let (subject, category, wrapped) = item?;
            let key = shared.keys.unwrap(&master, subject, category, &wrapped).map_err(ReadError::from)?;
            keys.insert((subject, category), Arc::new(key));
        }
        let mut projector = Projector::new(projections.clone());
        let mut n = 0u64;
        // `$recorded_at`, formatted only when a view reads it, and once for a run of events
        // recorded in the same millisecond (otherwise left empty: no view looks at it).
        let mut recorded: (Option<u64>, String) = (None, String::new());
        // One record of the range, in its subject's stream order; true: stop (another worker
        // failed).
        let mut apply = |projector: &mut Projector, pos: Position, bytes: &[u8]| -> Result<bool, OpenError> {
            n += 1;
            if n == STEP {
                report(head + (built.fetch_add(n, Ordering::Relaxed) + n) * head / spilled.max(1));
                n = 0;
                if stop.load(Ordering::Relaxed) {
                    return Ok(true);
                }
            }
            let rec = decode_at(pos, bytes)?;
            let h = &rec.header;
            if h.kind != Kind::Sealed || !projections.handles(&h.event_type) {
                return Ok(false);
            }
            let Some(key) = keys.get(&(h.subject, h.category)) else { return Ok(false) };
            let plain = open_plain(key, &rec)?;
            let sealed = parse_sealed(&rec, &plain)?;
            if projections.reads_recorded_at() && recorded.0 != Some(h.recorded_at_ms) {
                recorded = (Some(h.recorded_at_ms), crate::time::rfc3339(h.recorded_at_ms));
            }
            let ev = EventRef {
                event_type: &h.event_type,
                data: (&sealed.data).into(),
                occurred_at: &sealed.occurred_at,
                recorded_at: &recorded.1,
                version: h.version,
                position: h.position,
            };
            projector.apply_fresh(h.subject, &ev);
            Ok(false)
        };
        // The documents written (for the stale check below), and those sealed and waiting to be.
        let mut written: HashSet<(usize, Uuid)> = HashSet::new();
        let mut pending = WriteBatch::default();
        // Seals every document held into `pending`, written to the store every `FLUSH_DOCS`.
        let mut seal_held = |projector: &mut Projector| -> Result<(), OpenError> {
            let held = projector.held();
            written.extend(held.filter(|(i, s)| keys.contains_key(&(*s, projections.views()[*i].category() as u8))));
            let lookup = |s: Uuid, c: u8| Ok(keys.get(&(s, c)).cloned());
            projector.flush(&lookup, &mut pending).map_err(ReadError::from)?;
            if pending.len() >= FLUSH_DOCS {
                store.apply_unordered(std::mem::take(&mut pending), 1)?;
            }
            Ok(())
        };
        match spill {
            // The range's spill file: its records in log order, so each subject's in stream order.
            Some(spill) => {
                let path = spill.file(i);
                let file = File::open(&path).map_err(|e| spill_error(&path, e))?;
                let size = file.metadata().map_err(|e| spill_error(&path, e))?.len();
                // A range that fits in `rebuild_sort_bytes` is read in whole and sorted by subject
                // (then position: stream order): each subject is built and its documents sealed
                // while they are still in the CPU's caches, and only one subject's documents
                // are held at a time. A larger one (a few subjects with very long streams) is
                // built in log order, the whole range's documents held until its end.
                if size <= limits.rebuild_sort_bytes {
                    all.clear();
                    all.reserve(size as usize);
                    (&file).read_to_end(all).map_err(|e| spill_error(&path, e))?;
                    let mut frames: Vec<(Uuid, Position, std::ops::Range<usize>)> = frames_in(all)
                        .map_err(|e| spill_error(&path, e))?
                        .into_iter()
                        // Bytes `peek` cannot read go first; `apply` then says what is wrong.
                        .map(|(pos, at)| (record::peek(&all[at.clone()]).map_or(Uuid::nil(), |(_, s)| s), pos, at))
                        .collect();
                    frames.sort_unstable_by_key(|(subject, pos, _)| (*subject, *pos));
                    for one in frames.chunk_by(|a, b| a.0 == b.0) {
                        for (_, pos, at) in one {
                            if apply(&mut projector, *pos, &all[at.clone()])? {
                                return Ok(());
                            }
                        }
                        seal_held(&mut projector)?;
                    }
                } else {
                    let mut r = BufReader::with_capacity(1 << 16, file);
                    let mut bytes = Vec::new();
                    while let Some(pos) = read_frame(&mut r, &mut bytes).map_err(|e| spill_error(&path, e))? {
                        if apply(&mut projector, pos, &bytes)? {
                            return Ok(());
                        }
                    }
                }
                std::fs::remove_file(&path).map_err(|e| spill_error(&path, e))?;
            }
            // No room to spill: each subject's stream, a read per event (slower, no disk).
            None => {
                for subject in store.subjects_between(first, last) {
                    for item in store.stream(subject?, 0) {
                        let (_, pos) = item?;
                        if pos > head {
                            break;
                        }
                        let bytes = store.record(pos)?.ok_or(OpenError::Inconsistent { meta: head, log: pos })?;
                        if apply(&mut projector, pos, &bytes)? {
                            return Ok(());
                        }
                    }
                    seal_held(&mut projector)?;
                }
            }
        }
        seal_held(&mut projector)?;
        report(head + (built.fetch_add(n, Ordering::Relaxed) + n) * head / spilled.max(1));
        // Documents stored from before (a rebuild over current definitions keeps them until
        // it overwrites them) that this one does not write again are removed; after a clear
        // there are none to look for.
        if !cleared {
            let mut stale = WriteBatch::default();
            for (i, view) in projections.views().iter().enumerate() {
                for subject in store.view_subjects_between(view.name(), first, last) {
                    let subject = subject?;
                    if !written.contains(&(i, subject)) {
                        stale.remove_view(view.name(), subject);
                    }
                }
            }
            store.apply(stale)?;
        }
        store.apply_unordered(pending, 1)?;
        Ok(())
    };
    let work = || -> Result<(), OpenError> {
        let _guard = StopOnUnwind(&stop);
        let mut all = Vec::new();
        let result = (|| {
            while !stop.load(Ordering::Relaxed) {
                let i = ranges.start + next.fetch_add(1, Ordering::Relaxed);
                if i >= ranges.end {
                    break;
                }
                build_range(i, &mut all)?;
            }
            Ok(())
        })();
        if result.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        result
    };
    let results: Vec<Result<(), OpenError>> = std::thread::scope(|scope| {
        let work = &work;
        let handles: Vec<_> = (0..workers.min(ranges.len())).map(|_| scope.spawn(work)).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    results.into_iter().collect::<Result<(), _>>()?;
    Ok(())
}

/// Reads the log once, in position order, and copies each subject event of `ranges` into its
/// range's spill file, framed as length ‖ position ‖ record. Returns how many it copied.
fn spill_pass(
    store: &crate::store::Store,
    head: Position,
    limits: &super::Limits,
    spill: &Spill,
    bounds: &[(Uuid, Uuid)],
    ranges: &std::ops::Range<usize>,
    report: &(dyn Fn(u64) + Sync),
) -> Result<u64, OpenError> {
    let mut files = Vec::with_capacity(ranges.len());
    for i in ranges.clone() {
        let path = spill.file(i);
        let f = File::create(&path).map_err(|e| spill_error(&path, e))?;
        files.push(BufWriter::with_capacity(1 << 15, f));
    }
    let mut spilled = 0u64;
    // The spill files take about the size of the log's subject records: they stop short of
    // the free-space floor the writer keeps (checked before the first byte and then every
    // `SPACE_CHECK_BYTES`), rather than fill the disk under sled.
    let mut unchecked = SPACE_CHECK_BYTES;
    let mut expected = 1;
    for item in store.records(1) {
        let (pos, bytes) = item?;
        if pos > head {
            break;
        }
        if pos != expected {
            return Err(OpenError::Damaged(expected, "it is missing from the log".into()));
        }
        expected += 1;
        if pos % STEP == 0 {
            report(pos);
        }
        if bytes.get(3..11) != Some(&pos.to_be_bytes()[..]) {
            // Stored under another position, or too short: decoding says which.
            decode_at(pos, &bytes)?;
        }
        let subject = match record::peek(&bytes) {
            Some((Kind::Sealed, subject)) => subject,
            Some(_) => continue,
            // Bytes `peek` cannot read do not decode either: the error names what is wrong.
            None => {
                decode_at(pos, &bytes)?;
                continue;
            }
        };
        if unchecked >= SPACE_CHECK_BYTES {
            unchecked = 0;
            check_room(&spill.0, limits.min_free_bytes)?;
        }
        let i = bounds.partition_point(|(_, last)| *last < subject);
        if !ranges.contains(&i) {
            continue;
        }
        unchecked += bytes.len() as u64 + 12;
        let w = &mut files[i - ranges.start];
        w.write_all(&(bytes.len() as u32).to_be_bytes())
            .and_then(|_| w.write_all(&pos.to_be_bytes()))
            .and_then(|_| w.write_all(&bytes))
            .map_err(|e| spill_error(&spill.file(i), e))?;
        spilled += 1;
    }
    if expected <= head {
        return Err(OpenError::Damaged(expected, "it is missing from the log".into()));
    }
    for (i, mut w) in ranges.clone().zip(files) {
        w.flush().map_err(|e| spill_error(&spill.file(i), e))?;
    }
    report(head);
    Ok(spilled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(pos: Position, record: &[u8]) -> Vec<u8> {
        let mut f = (record.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&pos.to_be_bytes());
        f.extend_from_slice(record);
        f
    }

    /// Both ways of reading a spill file find the same frames, and refuse a cut one alike.
    #[test]
    fn a_spill_file_reads_alike_whole_or_streamed_and_a_cut_frame_is_refused() {
        let mut file = frame(7, b"first record");
        file.extend(frame(9, b""));
        file.extend(frame(12, &[0xab; 300]));
        let streamed = |bytes: &[u8]| -> std::io::Result<Vec<(Position, Vec<u8>)>> {
            let mut r = bytes;
            let mut out = vec![];
            let mut record = vec![];
            while let Some(pos) = read_frame(&mut r, &mut record)? {
                out.push((pos, record.clone()));
            }
            Ok(out)
        };
        let whole = |bytes: &[u8]| -> std::io::Result<Vec<(Position, Vec<u8>)>> {
            Ok(frames_in(bytes)?.into_iter().map(|(pos, at)| (pos, bytes[at].to_vec())).collect())
        };
        let want = vec![(7, b"first record".to_vec()), (9, vec![]), (12, vec![0xab; 300])];
        assert_eq!(streamed(&file).unwrap(), want);
        assert_eq!(whole(&file).unwrap(), want);
        let boundaries = [0, 24, 36, file.len()];
        for cut in 0..=file.len() {
            let part = &file[..cut];
            if boundaries.contains(&cut) {
                assert_eq!(whole(part).unwrap(), streamed(part).unwrap(), "cut at {cut}");
            } else {
                assert!(whole(part).is_err() && streamed(part).is_err(), "cut at {cut}");
            }
        }
        let mut huge = frame(1, b"x");
        huge[..4].copy_from_slice(&(SPILLED_RECORD_MAX as u32 + 1).to_be_bytes());
        assert!(whole(&huge).is_err() && streamed(&huge).is_err());
    }
}
