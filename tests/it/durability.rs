//! Acknowledged means durable: the fsync proof under strace, and kill -9 at random moments.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use pdledger::generate::Rng;
use serde_json::Value;

use crate::support::*;

fn generated(s: &Scratch, events: u64) -> std::path::PathBuf {
    let path = s.root.path().join("gen.jsonl");
    let f = std::fs::File::create(&path).unwrap();
    let mut w = std::io::BufWriter::new(f);
    pdledger::generate::write(&mut w, events, 200, 11).unwrap();
    path
}

/// Every acknowledged batch is preceded by an fsync of sled's data file, counted by strace.
/// The importer acknowledges a batch by printing a line to stdout after the commit returns, so
/// the trace shows, in order, each fsync of `store/db` and each acknowledgement.
#[test]
fn every_acknowledged_batch_follows_an_fsync() {
    let s = Scratch::new();
    let input = generated(&s, 400);
    let trace = s.root.path().join("trace");
    let out = std::process::Command::new("strace")
        .args(["-f", "-qq", "-y", "-e", "trace=fsync,fdatasync,write", "-o"])
        .arg(&trace)
        .arg(BIN)
        .args(["import", "--json", "--batch", "10"])
        .arg(&input)
        .env("PDLEDGER_DATA", s.data())
        .env("PDLEDGER_KEYRING", s.keyring())
        .output()
        .expect("strace is installed (.ci/run installs it)");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&trace).unwrap();
    let mut fsyncs_since_ack = 0;
    let mut acks = 0;
    let mut total_fsyncs = 0;
    let mut pending_fsync: std::collections::HashMap<String, bool> = Default::default();
    for line in text.lines() {
        let pid = line.split_whitespace().next().unwrap_or("").to_owned();
        let is_sync_start = line.contains("fsync(") || line.contains("fdatasync(");
        let on_db = line.contains("/store/db>");
        if is_sync_start && line.contains("<unfinished ...>") {
            pending_fsync.insert(pid, on_db);
            continue;
        }
        let completed_db_sync = if line.contains("<... fsync resumed>") || line.contains("<... fdatasync resumed>") {
            pending_fsync.remove(&pid).unwrap_or(false) && line.trim_end().ends_with("= 0")
        } else {
            is_sync_start && on_db && line.trim_end().ends_with("= 0")
        };
        if completed_db_sync {
            fsyncs_since_ack += 1;
            total_fsyncs += 1;
        }
        if line.contains("write(1<") && line.contains("\\\"event\\\":\\\"batch\\\"") {
            assert!(fsyncs_since_ack > 0, "acknowledgement {acks} was not preceded by an fsync of store/db:\n{line}");
            fsyncs_since_ack = 0;
            acks += 1;
        }
    }
    assert_eq!(acks, 40, "expected 40 batch acknowledgements in the trace");
    assert!(total_fsyncs >= acks);
}

/// A child process imports in small batches and is killed with SIGKILL at random moments, 50
/// times on one data directory. After each kill every acknowledged batch is there, readable,
/// and the chain verifies.
#[test]
fn kill_9_loses_no_acknowledged_event() {
    let s = Scratch::new();
    let input = generated(&s, 3000);
    let mut rng = Rng::new(seed());
    let mut acked_total = 0u64;
    let mut durable_before = 0u64;
    for round in 0..50 {
        let mut child = s
            .cli_cmd(&["import", "--json", "--batch", &(1 + rng.below(20)).to_string(), input.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let child_out = child.stdout.take().unwrap();
        let mut lines = BufReader::new(child_out).lines();
        // Kill after a random number of acknowledgements: sometimes right away, sometimes
        // with batches in flight behind the one just acknowledged.
        let wait_for = rng.below(6);
        let mut last_acked = durable_before;
        for _ in 0..wait_for {
            match lines.next() {
                Some(Ok(l)) => {
                    let v: Value = serde_json::from_str(&l).unwrap();
                    if v["event"] == "batch" {
                        last_acked = v["last_position"].as_u64().unwrap();
                    }
                }
                _ => break,
            }
        }
        // Spin a random number of iterations so the kill lands at varied points in the
        // next commit, not only right after an acknowledgement.
        let mut spin = 0u64;
        for i in 0..rng.below(2_000_000) {
            spin = spin.wrapping_add(i);
        }
        std::hint::black_box(spin);
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();

        let ledger = s.open();
        let (head, _) = ledger.head().unwrap();
        assert!(head >= last_acked, "round {round}: acknowledged position {last_acked} lost (head {head})");
        // Every record up to the head reads back (decrypts).
        let mut n = 0;
        for entry in ledger.log(durable_before.saturating_sub(50).max(1)) {
            entry.unwrap_or_else(|e| panic!("round {round}: {e}"));
            n += 1;
        }
        assert!(n > 0 || head == 0);
        ledger.close().unwrap();
        let out = s.cli(&["verify", "--json"]);
        assert_eq!(out.status.code(), Some(0), "round {round}: {}", stdout(&out));
        acked_total += last_acked.saturating_sub(durable_before);
        durable_before = head;
    }
    eprintln!("50 kills, {acked_total} acknowledged positions checked, head {durable_before}");
}
