//! The ledger core through its library face: round trips, no plaintext at rest, tamper
//! detection, ciphertexts bound to their place, concurrent appenders.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use pdledger::ledger::Ledger;
use pdledger::record::{self, ChainHash};
use pdledger::store::Store;
use pdledger::verify::{verify, Anchor};
use pdledger::writer::{Rejected, WriteError};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::*;

fn import_sample(s: &Scratch) {
    let out = s.cli(&["import", sample_path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("imported 14633 events for 1000 subjects"), "{}", stdout(&out));
}

/// The whole sample register imported and replayed gives back every event's data unchanged,
/// in order, per subject.
#[test]
fn sample_round_trips_exactly() {
    let s = Scratch::new();
    import_sample(&s);
    let events = sample();
    let mut by_subject: BTreeMap<Uuid, Vec<&Value>> = BTreeMap::new();
    for e in &events {
        by_subject.entry(e["subject"].as_str().unwrap().parse().unwrap()).or_default().push(e);
    }
    let ledger = s.open();
    let mut total = 0;
    for (subject, expected) in &by_subject {
        let got = ledger.read_stream(*subject, 0, usize::MAX).unwrap();
        assert_eq!(got.len(), expected.len(), "subject {subject}");
        for (i, (g, e)) in got.iter().zip(expected).enumerate() {
            assert_eq!(g.version, i as u64 + 1);
            assert_eq!(g.event_type, e["type"].as_str().unwrap());
            assert_eq!(g.occurred_at, e["occurred_at"].as_str().unwrap());
            // Byte-equal, key order included.
            assert_eq!(serde_json::to_string(&g.data).unwrap(), serde_json::to_string(&e["data"]).unwrap());
            assert_eq!(g.actor, "import");
        }
        // The API's read (the sealed JSON passed on as it is) says the same, byte for byte.
        let raw = ledger.read_stream_raw(*subject, 0, usize::MAX).unwrap();
        assert_eq!(raw.len(), got.len(), "subject {subject}");
        for (r, g) in raw.iter().zip(&got) {
            assert_eq!((r.version, r.position, &r.event_type), (g.version, g.position, &g.event_type));
            assert_eq!((&r.occurred_at, &r.recorded_at, &r.actor), (&g.occurred_at, &g.recorded_at, &g.actor));
            assert_eq!(r.data.get(), serde_json::to_string(&g.data).unwrap());
        }
        // After a version, and with a limit, as `read_stream`.
        let (after, limit) = (got.len() as u64 / 2, 3);
        let tail: Vec<u64> =
            ledger.read_stream_raw(*subject, after, limit).unwrap().iter().map(|r| r.version).collect();
        let want: Vec<u64> = ledger.read_stream(*subject, after, limit).unwrap().iter().map(|g| g.version).collect();
        assert_eq!(tail, want);
        total += got.len();
    }
    assert_eq!(total, 14_633);
    // The CLI's replay gives the same data for one subject.
    let first = events[0]["subject"].as_str().unwrap();
    drop(ledger);
    let out = s.cli(&["replay", "--subject", first, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let replayed: Vec<&Value> = lines.iter().filter_map(|l| l.get("event")).collect();
    assert_eq!(replayed[0]["data"], events[0]["data"]);
    assert_eq!(replayed.len(), by_subject[&first.parse().unwrap()].len());
    // Then the subject's views as they stand.
    assert!(lines.iter().any(|l| l["view"] == "customer" && l["data"]["name"] == events[0]["data"]["name"]));
    // The read is in the audit trail, once, as the server's reads are; before it, once, the
    // import that put the subject's data there (newest first).
    let out = s.cli(&["audit", "--subject", first, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let trail: Vec<Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(trail.len(), 2, "{trail:?}");
    assert_eq!(
        (&trail[0]["action"], &trail[0]["actor"], &trail[0]["outcome"]),
        (&json!("read"), &json!("cli"), &json!("ok"))
    );
    assert_eq!(
        (&trail[1]["action"], &trail[1]["actor"], &trail[1]["outcome"]),
        (&json!("append"), &json!("import"), &json!("ok"))
    );
    // Every subject imported has exactly one such entry, in the commit of its first events.
    let out = s.cli(&["audit", "--action", "append", "--actor", "import", "--json", "--limit", "5000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let appended: Vec<Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let subjects: std::collections::BTreeSet<Uuid> =
        appended.iter().map(|l| l["subject"].as_str().unwrap().parse().unwrap()).collect();
    assert_eq!((appended.len(), subjects.len()), (1_000, 1_000));
    assert_eq!(subjects, by_subject.keys().copied().collect());
}

/// No personal value is on disk in any encoding, and the same scan finds them in the input.
#[test]
fn no_plaintext_at_rest() {
    let s = Scratch::new();
    import_sample(&s);
    let events = sample();
    let values = known_values(&events, 60);
    assert!(values.len() >= 50, "{}", values.len());
    let hits = scan(&[&s.data(), &s.keyring()], &values);
    assert!(hits.is_empty(), "personal data found at rest: {:?}", &hits[..hits.len().min(5)]);
    // The scan itself works: every value is found in the input, and its other forms are found
    // in a file that holds them.
    let input_hits = scan(&[sample_path().parent().unwrap()], &values);
    for v in &values {
        assert!(input_hits.iter().any(|(h, _, _)| h == v), "scan missed {v} in the input");
    }
    let probe = s.root.path().join("probe");
    std::fs::create_dir(&probe).unwrap();
    let forms: Vec<Vec<u8>> = encodings(&values[0]);
    for (i, f) in forms.iter().enumerate() {
        let mut bytes = b"xx".to_vec();
        bytes.extend_from_slice(f);
        std::fs::write(probe.join(format!("{i}")), bytes).unwrap();
    }
    let mut base64_file = b"prefix ".to_vec();
    base64_file.extend_from_slice(b"\x00\x01");
    // A real base64 encoding of a value embedded at an arbitrary offset is found too.
    let enc = {
        let mut padded = vec![7u8];
        padded.extend_from_slice(values[1].as_bytes());
        encodings_base64_of(&padded)
    };
    base64_file.extend_from_slice(enc.as_bytes());
    std::fs::write(probe.join("b64"), base64_file).unwrap();
    let probe_hits = scan(&[&probe], &values[..2]);
    assert!(probe_hits.iter().any(|(v, _, p)| v == &values[1] && p.ends_with("b64")), "base64 scan broken");
    assert!(probe_hits.iter().filter(|(v, _, _)| v == &values[0]).count() >= forms.len());
}

fn encodings_base64_of(bytes: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            s.push(if i <= chunk.len() { B64[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    s
}

fn small_ledger(s: &Scratch, events: u64) -> Vec<u64> {
    let ledger = s.open();
    let mut positions = vec![];
    for i in 0..events {
        let e = pdledger::generate::event(3, 5, i);
        let subject: Uuid = e["subject"].as_str().unwrap().parse().unwrap();
        let ev = ledger.prepare(e["type"].as_str().unwrap(), e["occurred_at"].as_str(), e["data"].clone()).unwrap();
        positions.extend(ledger.append(subject, None, vec![ev], "test").unwrap().positions);
    }
    ledger.close().unwrap();
    positions
}

fn verify_dir(s: &Scratch, anchor: Option<Anchor>) -> pdledger::verify::Report {
    let store = Store::open(&s.data(), "test", 8 << 20).unwrap();
    verify(&store, anchor, |_| {}).unwrap()
}

fn with_store<T>(s: &Scratch, f: impl FnOnce(&Store) -> T) -> T {
    let store = Store::open(&s.data(), "test", 8 << 20).unwrap();
    f(&store)
}

/// Flipping any byte of a stored record is caught at that record's position.
#[test]
fn every_flipped_byte_is_caught_at_its_position() {
    let s = Scratch::new();
    small_ledger(&s, 12);
    let target = 7;
    let original = with_store(&s, |st| st.record(target).unwrap().unwrap().to_vec());
    let store = Store::open(&s.data(), "test", 8 << 20).unwrap();
    assert!(verify(&store, None, |_| {}).unwrap().ok);
    for i in 0..original.len() {
        let mut b = original.clone();
        b[i] ^= 0x20;
        store.tamper_record(target, Some(&b)).unwrap();
        let r = verify(&store, None, |_| {}).unwrap();
        assert!(!r.ok, "flip at byte {i} not caught");
        assert_eq!(r.first_bad_position, Some(target), "flip at byte {i}: {:?}", r.reason);
    }
    store.tamper_record(target, Some(&original)).unwrap();
    assert!(verify(&store, None, |_| {}).unwrap().ok);
}

/// Deleting a record, swapping two, and cutting the tail are caught by `pdledger verify`
/// (exit 1, the right position); the cut tail also through `--anchor` when the head
/// metadata is rewritten to match.
#[test]
fn deletion_swap_and_truncation_are_caught_by_the_cli() {
    let s = Scratch::new();
    small_ledger(&s, 10);
    let ok = s.cli(&["verify"]);
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    let anchor_line =
        stdout(&ok).lines().find(|l| l.starts_with("head ")).unwrap().trim_start_matches("head ").to_owned();
    assert!(anchor_line.starts_with("10:"));

    let check = |expect: u64| {
        let out = s.cli(&["verify", "--json"]);
        assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
        let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(r["ok"], false);
        assert_eq!(r["first_bad_position"], expect, "{r}");
    };

    // Delete record 4.
    let r4 = with_store(&s, |st| {
        let b = st.record(4).unwrap().unwrap().to_vec();
        st.tamper_record(4, None).unwrap();
        b
    });
    check(4);
    with_store(&s, |st| st.tamper_record(4, Some(&r4)).unwrap());
    assert_eq!(s.cli(&["verify"]).status.code(), Some(0));

    // Swap records 5 and 6.
    with_store(&s, |st| {
        let a = st.record(5).unwrap().unwrap().to_vec();
        let b = st.record(6).unwrap().unwrap().to_vec();
        st.tamper_record(5, Some(&b)).unwrap();
        st.tamper_record(6, Some(&a)).unwrap();
    });
    check(5);
    with_store(&s, |st| {
        let a = st.record(5).unwrap().unwrap().to_vec();
        let b = st.record(6).unwrap().unwrap().to_vec();
        st.tamper_record(5, Some(&b)).unwrap();
        st.tamper_record(6, Some(&a)).unwrap();
    });

    // Cut the tail (records 9 and 10): the head metadata still says 10.
    let (r9, r10) = with_store(&s, |st| {
        let r9 = st.record(9).unwrap().unwrap().to_vec();
        let r10 = st.record(10).unwrap().unwrap().to_vec();
        st.tamper_record(10, None).unwrap();
        st.tamper_record(9, None).unwrap();
        (r9, r10)
    });
    check(9);
    // An attacker who also rewrites the head metadata: the store alone looks whole...
    with_store(&s, |st| {
        let rec = record::decode(&r9).unwrap();
        let mut b = pdledger::store::WriteBatch::default();
        b.put_head(8, &rec.prev_hash);
        st.commit(b).unwrap();
    });
    assert_eq!(s.cli(&["verify"]).status.code(), Some(0));
    // ...but not against the anchor kept elsewhere.
    let out = s.cli(&["verify", "--anchor", &anchor_line, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(r["first_bad_position"], 9, "{r}");
    // Rollback with a rewritten record at the anchor position is caught too.
    with_store(&s, |st| {
        st.tamper_record(9, Some(&r9)).unwrap();
        st.tamper_record(10, Some(&r10)).unwrap();
        let rec = record::decode(&r10).unwrap();
        let mut b = pdledger::store::WriteBatch::default();
        b.put_head(10, &rec.hash);
        st.commit(b).unwrap();
    });
    let out = s.cli(&["verify", "--anchor", &anchor_line]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let wrong = format!("10:{}", ChainHash([9; 32]).to_hex());
    let out = s.cli(&["verify", "--anchor", &wrong, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(verify_dir(&s, Some(anchor_line.parse().unwrap())).ok);
}

/// A ciphertext copied to another subject or another position does not decrypt: the reader
/// reports the record as damaged rather than showing anything.
#[test]
fn moved_ciphertext_fails_to_decrypt() {
    let s = Scratch::new();
    let ledger = s.open();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let note = |t: &str| ledger.prepare("note.added", Some("2024-01-01"), json!({ "text": t })).unwrap();
    ledger.append(a, None, vec![note("about A one"), note("about A two")], "t").unwrap();
    ledger.append(b, None, vec![note("about B one"), note("about B two")], "t").unwrap();
    ledger.close().unwrap();

    // Record 1 (A, v1) rewritten as B's v1 at position 3: same nonce and ciphertext, a
    // correct chain, only the binding is wrong.
    let rewrite = |from: u64, to: u64, subject: Uuid, version: u64| {
        with_store(&s, |st| {
            let src = record::decode(&st.record(from).unwrap().unwrap()).unwrap();
            let dst = record::decode(&st.record(to).unwrap().unwrap()).unwrap();
            let mut h = src.header.clone();
            h.position = to;
            h.subject = subject;
            h.version = version;
            let (bytes, _) = record::encode(&h, &src.nonce, &src.payload, &dst.prev_hash);
            st.tamper_record(to, Some(&bytes)).unwrap();
            (st.record(to).unwrap().unwrap().to_vec(), dst)
        })
    };
    let (_, original3) = rewrite(1, 3, b, 1);
    let ledger = s.open();
    let err = ledger.read_stream(b, 0, 10).unwrap_err().to_string();
    assert!(err.contains("position 3") && err.contains("decryption failed"), "{err}");
    assert_eq!(ledger.read_stream(a, 0, 10).unwrap().len(), 2);
    ledger.close().unwrap();

    // Same subject, another position (A's v1 ciphertext placed as A's v2 at position 2).
    with_store(&s, |st| {
        let (bytes, _) = record::encode(&original3.header, &original3.nonce, &original3.payload, &original3.prev_hash);
        st.tamper_record(3, Some(&bytes)).unwrap();
    });
    rewrite(1, 2, a, 2);
    let ledger = s.open();
    let err = ledger.read_stream(a, 0, 10).unwrap_err().to_string();
    assert!(err.contains("position 2") && err.contains("decryption failed"), "{err}");
    assert_eq!(ledger.read_stream(b, 0, 10).unwrap().len(), 2);
}

/// N appenders race on one subject with expected versions: each version is won exactly once,
/// the losers see a conflict naming the current version, and the stream has no gaps.
#[test]
fn concurrent_appenders_with_expected_versions() {
    let s = Scratch::new();
    let ledger = Arc::new(s.open());
    let subject = Uuid::new_v4();
    let threads = 8;
    let rounds = 40;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let ledger = ledger.clone();
            std::thread::spawn(move || {
                let mut won = vec![];
                let mut conflicts = 0;
                for i in 0..rounds {
                    let current = ledger.stream_version(subject).unwrap();
                    let ev = ledger.prepare("note.added", None, json!({"text": format!("t{t} i{i}")})).unwrap();
                    match ledger.append(subject, Some(current), vec![ev], "t") {
                        Ok(c) => {
                            assert_eq!(c.first_version, current + 1);
                            won.push(c.first_version);
                        }
                        Err(WriteError::Rejected(Rejected::VersionConflict { expected, current: now, .. })) => {
                            assert_eq!(expected, current);
                            assert!(now > expected);
                            conflicts += 1;
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                (won, conflicts)
            })
        })
        .collect();
    let mut all = vec![];
    let mut conflicts = 0;
    for h in handles {
        let (w, c) = h.join().unwrap();
        all.extend(w);
        conflicts += c;
    }
    let unique: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len(), "a version was won twice");
    let final_version = ledger.stream_version(subject).unwrap();
    assert_eq!(unique, (1..=final_version).collect(), "gaps in the stream");
    assert_eq!(all.len() + conflicts, threads * rounds);
    let events = ledger.read_stream(subject, 0, usize::MAX).unwrap();
    assert_eq!(events.len() as u64, final_version);
    assert!(events.iter().enumerate().all(|(i, e)| e.version == i as u64 + 1));
    // "must be new" on an existing subject conflicts.
    let ev = ledger.prepare("note.added", None, json!({"text": "x"})).unwrap();
    assert!(matches!(ledger.append(subject, Some(0), vec![ev], "t"), Err(WriteError::Rejected(_))));
}

/// A batch is all or nothing: a conflict on its last operation appends none of it.
#[test]
fn submissions_are_all_or_nothing() {
    let s = Scratch::new();
    let ledger: Ledger = s.open();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let ev = || ledger.prepare("note.added", None, json!({"text": "x"})).unwrap();
    ledger.append(b, None, vec![ev()], "t").unwrap();
    let ops = vec![
        pdledger::writer::Op::Append {
            subject: a,
            expected_version: Some(0),
            events: vec![ev(), ev()],
            actor: "t".into(),
        },
        pdledger::writer::Op::Append { subject: b, expected_version: Some(0), events: vec![ev()], actor: "t".into() },
    ];
    assert!(ledger.submit(ops).is_err());
    assert_eq!(ledger.stream_version(a).unwrap(), 0);
    assert_eq!(ledger.head().unwrap().0, 1);
}

/// The keyring is created owner-only, refused inside the data directory, and a keyring from
/// another data directory is refused with a clear message.
#[test]
fn keyring_rules() {
    let s = Scratch::new();
    s.open().close().unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(s.keyring()).unwrap().permissions().mode() & 0o777, 0o700);
    let other = Scratch::new();
    other.open().close().unwrap();
    // Use the other keyring for our data.
    let out = s.cli_cmd(&["replay"]).env("PDLEDGER_KEYRING", other.keyring()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("does not belong to this data directory"), "{}", stderr(&out));
    let inside = s.data().join("keys");
    let out = s.cli_cmd(&["replay"]).env("PDLEDGER_KEYRING", &inside).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("inside the data directory"), "{}", stderr(&out));
    let out = s.cli_cmd(&["replay"]).env("PDLEDGER_KEYRING", s.root.path().join("nothing")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("generation 1"), "{}", stderr(&out));
}

/// A group commit cut short by a crash leaves records without the commit mark at the tail:
/// `verify` reports them as uncommitted (not a break), and opening the ledger removes them
/// and their stream entries, so a half-written submission never becomes visible.
#[test]
fn an_incomplete_commit_at_the_tail_is_removed_on_open() {
    let s = Scratch::new();
    let ledger = s.open();
    let subject = Uuid::new_v4();
    let ev = |l: &Ledger, t: &str| l.prepare("note.added", None, json!({ "text": t })).unwrap();
    ledger.append(subject, None, vec![ev(&ledger, "one"), ev(&ledger, "two")], "t").unwrap();
    ledger.close().unwrap();

    // Forge what a crash mid-commit leaves: two more records of the subject, chained, with
    // stream entries, no commit mark, head metadata not moved.
    with_store(&s, |st| {
        let last = record::decode(&st.record(2).unwrap().unwrap()).unwrap();
        let mut prev = last.hash;
        let mut batch = pdledger::store::WriteBatch::default();
        for (pos, version) in [(3u64, 3u64), (4, 4)] {
            let mut h = last.header.clone();
            h.flags = 0;
            h.position = pos;
            h.version = version;
            let (bytes, hash) = record::encode(&h, &last.nonce, &last.payload, &prev);
            batch.put_record(pos, bytes);
            batch.put_stream(subject, version, pos);
            prev = hash;
        }
        st.commit(batch).unwrap();
        let r = verify(st, None, |_| {}).unwrap();
        assert!(r.ok, "{r:?}");
        assert_eq!((r.head.position, r.uncommitted), (2, 2));
    });

    let ledger = s.open();
    assert_eq!(ledger.head().unwrap().0, 2);
    assert_eq!(ledger.stream_version(subject).unwrap(), 2);
    assert_eq!(ledger.read_stream(subject, 0, 10).unwrap().len(), 2);
    // The next append takes the freed positions and versions, and the chain holds.
    let c = ledger.append(subject, None, vec![ev(&ledger, "three")], "t").unwrap();
    assert_eq!((c.first_version, c.positions[0]), (3, 3));
    ledger.close().unwrap();
    let r = verify_dir(&s, None);
    assert!(r.ok && r.uncommitted == 0 && r.head.position == 3, "{r:?}");
}
