//! JSON Lines import: `{"subject","type","occurred_at"?,"data"}` per line.
//!
//! Lines are parsed and validated on one thread while the previous batch is being committed
//! on another. Each batch is one all-or-nothing submission, so a bad line stops the import
//! with nothing of its batch appended, and every batch before it durable.
//!
//! Each subject the import writes to gets one `append` entry in the audit trail, by the
//! import's actor, in the same commit as its first events.

use std::collections::HashSet;
use std::io::BufRead;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::ledger::Ledger;
use crate::writer::{Op, WriteError};

/// The longest line read; a longer one is refused without reading it into memory whole.
pub const LINE_BYTES_MAX: usize = 1 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    subject: String,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    occurred_at: Option<String>,
    data: Value,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Progress {
    pub lines: u64,
    pub events: u64,
    pub subjects: u64,
    pub last_position: u64,
    pub seconds: f64,
    pub events_per_second: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("line {line}: {message}")]
    Line { line: u64, message: String },
    #[error("lines {first}..={last}: {error}")]
    Write { first: u64, last: u64, error: WriteError },
    #[error("reading the input: {0}")]
    Io(#[from] std::io::Error),
}

/// The import stopped; `done` says what was appended before it did.
#[derive(Debug)]
pub struct Failure {
    pub error: ImportError,
    pub done: Progress,
}

struct Batch {
    ops: Vec<Op>,
    first_line: u64,
    last_line: u64,
    subjects: Vec<Uuid>,
}

/// Reads one line of at most `LINE_BYTES_MAX` bytes. `Ok(None)` at the end of input.
fn read_line<R: BufRead>(r: &mut R, buf: &mut Vec<u8>) -> Result<Option<bool>, std::io::Error> {
    buf.clear();
    let n = std::io::Read::take(&mut *r, LINE_BYTES_MAX as u64 + 1).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.len() > LINE_BYTES_MAX {
        // Skip the rest of the over-long line so the caller can report it by number.
        loop {
            let (done, used) = {
                let avail = r.fill_buf()?;
                match avail.iter().position(|b| *b == b'\n') {
                    Some(i) => (true, i + 1),
                    None => (avail.is_empty(), avail.len()),
                }
            };
            r.consume(used);
            if done {
                break;
            }
        }
        return Ok(Some(false));
    }
    Ok(Some(true))
}

/// Parses one line and checks its event against the schemas (nothing is written). Public for
/// the fuzz target `import_line` (`fuzz/`).
pub fn parse_line(ledger: &Ledger, bytes: &[u8]) -> Result<(Uuid, Op), String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
    let line: Line = serde_json::from_str(text.trim_end()).map_err(|e| {
        // serde's messages can quote input; keep only its classification and column.
        format!(
            "not a valid event line ({}, column {}): expected {{\"subject\",\"type\",\"occurred_at\"?,\"data\"}}",
            classify(&e),
            e.column()
        )
    })?;
    let subject = Uuid::try_parse(&line.subject).map_err(|_| "`subject` is not a UUID".to_owned())?;
    if subject.is_nil() {
        return Err("`subject` must not be the nil UUID".into());
    }
    let event = ledger.prepare(&line.event_type, line.occurred_at.as_deref(), line.data).map_err(|e| e.to_string())?;
    Ok((subject, Op::Append { subject, expected_version: None, events: vec![event], actor: String::new() }))
}

fn classify(e: &serde_json::Error) -> &'static str {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax => "malformed JSON",
        Category::Eof => "incomplete JSON",
        Category::Data => "wrong fields or types",
        Category::Io => "read error",
    }
}

/// Imports events from `input` in batches of `batch_events`, calling `on_batch` after each
/// batch is durable.
pub fn import(
    ledger: &Ledger,
    input: impl BufRead + Send,
    batch_events: usize,
    actor: &str,
    mut on_batch: impl FnMut(&Progress),
) -> Result<Progress, Box<Failure>> {
    // A batch's submission holds its events and up to as many audit entries (one per new
    // subject): half the group limit keeps a commit within what the tail repair expects.
    let batch_events = batch_events.clamp(1, (ledger.limits().group_events_max / 2).max(1));
    let started = Instant::now();
    let mut done = Progress::default();
    let mut seen: HashSet<Uuid> = HashSet::new();

    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Batch, ImportError>>(2);
        scope.spawn(move || {
            let mut input = input;
            let mut buf = Vec::new();
            let mut line_no = 0u64;
            let mut batch = Batch { ops: vec![], first_line: 1, last_line: 0, subjects: vec![] };
            loop {
                let line = match read_line(&mut input, &mut buf) {
                    Ok(None) => break,
                    Ok(Some(ok)) => {
                        line_no += 1;
                        ok
                    }
                    Err(e) => {
                        let _ = tx.send(Err(ImportError::Io(e)));
                        return;
                    }
                };
                if !line {
                    let _ = tx.send(Err(ImportError::Line {
                        line: line_no,
                        message: format!("longer than {LINE_BYTES_MAX} bytes"),
                    }));
                    return;
                }
                if buf.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                match parse_line(ledger, &buf) {
                    Ok((subject, mut op)) => {
                        if let Op::Append { actor: a, .. } = &mut op {
                            *a = actor.to_owned();
                        }
                        batch.ops.push(op);
                        batch.subjects.push(subject);
                        batch.last_line = line_no;
                    }
                    Err(message) => {
                        let _ = tx.send(Err(ImportError::Line { line: line_no, message }));
                        return;
                    }
                }
                if batch.ops.len() >= batch_events {
                    let next = Batch { ops: vec![], first_line: line_no + 1, last_line: line_no, subjects: vec![] };
                    if tx.send(Ok(std::mem::replace(&mut batch, next))).is_err() {
                        return;
                    }
                }
            }
            if !batch.ops.is_empty() {
                let _ = tx.send(Ok(batch));
            }
        });

        for item in rx {
            let batch = match item {
                Ok(b) => b,
                Err(error) => return Err(Box::new(Failure { error, done: done.clone() })),
            };
            let (first, last) = (batch.first_line, batch.last_line);
            let events = batch.ops.len() as u64;
            // The trail records who put data on each subject: an `append` entry for every
            // subject the first time this import writes to it, in the same commit as its
            // events (all or nothing, as the server's appends are audited).
            let mut ops = batch.ops;
            let mut fresh: HashSet<Uuid> = HashSet::new();
            for s in &batch.subjects {
                if !seen.contains(s) && fresh.insert(*s) {
                    let entry =
                        crate::audit::Entry::new(crate::audit::Action::Append, Some(*s), crate::audit::Outcome::Ok);
                    ops.push(entry.into_op(actor));
                }
            }
            match ledger.submit(ops) {
                Ok(results) => {
                    done.events += events;
                    done.lines = last;
                    done.last_position =
                        results.last().and_then(|c| c.positions.last().copied()).unwrap_or(done.last_position);
                    for s in batch.subjects {
                        seen.insert(s);
                    }
                    done.subjects = seen.len() as u64;
                    done.seconds = started.elapsed().as_secs_f64();
                    done.events_per_second = done.events as f64 / done.seconds.max(1e-9);
                    on_batch(&done);
                }
                Err(error) => {
                    return Err(Box::new(Failure {
                        error: ImportError::Write { first, last, error },
                        done: done.clone(),
                    }));
                }
            }
        }
        Ok(done)
    })
}

/// Fuzzing the JSON Lines parser (proptest, in every test run; cargo-fuzz runs the same
/// parser longer, by hand: `fuzz/run.sh`, target `import_line`): arbitrary bytes and
/// mutations of the sample register's lines are refused or accepted, never a panic, and an
/// error message never quotes the input.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    struct Fixture {
        _dir: tempfile::TempDir,
        ledger: Ledger,
        lines: Vec<String>,
    }

    fn fixture() -> &'static Fixture {
        static F: OnceLock<Fixture> = OnceLock::new();
        F.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let opts = crate::ledger::OpenOptions::new(
                dir.path().join("data"),
                crate::keyring::Keyring::Dir(dir.path().join("keys")),
                "fuzz",
            );
            let ledger = Ledger::open(opts).unwrap();
            let text = std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sample-register.jsonl"),
            )
            .unwrap();
            let lines = text.lines().take(2000).map(str::to_owned).collect();
            Fixture { _dir: dir, ledger, lines }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]
        #[test]
        fn arbitrary_lines_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let f = fixture();
            let _ = parse_line(&f.ledger, &bytes);
        }

        #[test]
        fn mutated_sample_lines_never_panic_nor_leak(pick in any::<usize>(), edits in prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..6)) {
            let f = fixture();
            let line = &f.lines[pick % f.lines.len()];
            let mut b = line.as_bytes().to_vec();
            crate::fuzzing::mutate(&mut b, &edits);
            if let Err(msg) = parse_line(&f.ledger, &b) {
                // Personal values (a name, an email) must not come back in the message.
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                if let Some(name) = v["data"]["name"].as_str() {
                    prop_assert!(!msg.contains(name), "{}", msg);
                }
            }
        }
    }
}
