//! Backups: the restore drill, what a backup taken before an erasure can and cannot give back,
//! continuous backup under kill -9, damaged backups, and scans of the backup directory.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use pdledger::keyring::Keyring;
use pdledger::ledger::Ledger;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::server::{Client, Server};
use crate::support::*;

const ERASED: [&str; 2] = ["6a04b685-6120-4c48-9d1f-08fc27fbe3fb", "9988337f-adc0-4c2e-8fa9-cffccd012c84"];

fn import_sample(s: &Scratch) {
    let out = s.cli(&["import", sample_path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
}

fn all_streams(ledger: &Ledger, upto: u64) -> BTreeMap<Uuid, Vec<pdledger::ledger::StoredEvent>> {
    let mut out = BTreeMap::new();
    for s in ledger.store().subjects() {
        let s = s.unwrap();
        let mut events = ledger.read_stream(s, 0, usize::MAX).unwrap();
        events.retain(|e| e.position <= upto);
        out.insert(s, events);
    }
    out
}

/// Import the sample, back it up, append more, erase two customers (and rotate), then restore
/// the earlier backup with the newer data directory's erasures.
#[test]
fn restore_drill_brings_back_everyone_but_the_erased() {
    let s = Scratch::new();
    import_sample(&s);
    let bk = s.root.path().join("backup");
    let out = s.cli(&["backup", bk.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let backed_up = manifest["last_position"].as_u64().unwrap();
    // The sample's events, and the import's `append` audit entry for each of its 1,000 subjects.
    assert_eq!(backed_up, 14_633 + 1_000);
    let before = all_streams(&s.open(), backed_up);
    {
        let ledger = s.open();
        for who in ["5a61bbb5-dc0a-491d-855e-afbb596c1400", ERASED[0]] {
            let ev = ledger.prepare("note.added", Some("2026-01-01"), json!({"text": "after the backup"})).unwrap();
            ledger.append(who.parse().unwrap(), None, vec![ev], "t").unwrap();
        }
    }
    let rules = shred_all_rules(&s);
    for e in ERASED {
        let out = s.cli(&["erase", e, "--reason", "art17_request", "--retention", rules.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
    }

    let restored = s.root.path().join("restored");
    let t = Instant::now();
    let out = s.cli(&[
        "restore",
        bk.to_str().unwrap(),
        "--data",
        restored.to_str().unwrap(),
        "--erasures-from",
        s.data().to_str().unwrap(),
        "--json",
    ]);
    let drill = t.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: Value = serde_json::from_str(&stdout(&out)).unwrap();
    eprintln!("restore drill: {drill:?} for {} records ({summary})", summary["records"]);
    assert_eq!(summary["erasures_reapplied"].as_array().unwrap().len(), 2);
    assert_eq!(summary["key_generation"], 3, "the newer data directory's table (two rotations)");

    let ledger =
        Ledger::open(pdledger::ledger::OpenOptions::new(restored.clone(), Keyring::Dir(s.keyring()), "test")).unwrap();
    let after = all_streams(&ledger, u64::MAX);
    for (subject, events) in &before {
        if ERASED.contains(&subject.to_string().as_str()) {
            assert!(ledger.erasure(*subject).unwrap().is_some(), "{subject} stays erased");
            assert!(ledger.read_stream(*subject, 0, usize::MAX).unwrap().is_empty());
            assert!(ledger.view("customer", *subject).unwrap().is_none());
        } else {
            assert_eq!(&after[subject], events, "{subject} reads back as before");
        }
    }
    // The erased are not found by lookup either.
    let reg = sample().into_iter().find(|e| e["subject"] == ERASED[0] && e["type"] == "customer.registered").unwrap();
    let email = reg["data"]["email"].as_str().unwrap();
    assert!(ledger.lookup(pdledger::lookup::LookupKey::Email, email, 10).unwrap().is_empty());
    let other = sample()
        .into_iter()
        .find(|e| e["subject"] == "5a61bbb5-dc0a-491d-855e-afbb596c1400" && e["type"] == "customer.registered")
        .unwrap();
    assert_eq!(
        ledger.lookup(pdledger::lookup::LookupKey::Email, other["data"]["email"].as_str().unwrap(), 10).unwrap().len(),
        1
    );
    drop(ledger);
    let out = s.cli(&["verify", "--data", restored.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stdout(&out));
    // A non-empty target is refused without --force.
    let out = s.cli(&["restore", bk.to_str().unwrap(), "--data", restored.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
}

/// A backup taken before an erasure, restored after the rotation that followed: its own key
/// table is under a destroyed generation, so it gives back nobody without a newer table, and
/// the erased customer's key is in no table the keyring opens.
#[test]
fn a_backup_from_before_an_erasure_cannot_bring_the_customer_back() {
    let s = Scratch::new();
    import_sample(&s);
    let bk = s.root.path().join("backup");
    assert!(s.cli(&["backup", bk.to_str().unwrap()]).status.success());
    let rules = shred_all_rules(&s);
    assert!(s
        .cli(&["erase", ERASED[0], "--reason", "art17_request", "--retention", rules.to_str().unwrap()])
        .status
        .success());

    let target = s.root.path().join("restored");
    let out = s.cli(&["restore", bk.to_str().unwrap(), "--data", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("--erasures-from") && err.contains("generation"), "{err}");
    assert!(!target.exists(), "nothing half-written");
    assert!(std::fs::read_dir(s.root.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("restoring")));

    // The backup's wrapped key for the erased customer opens with nothing in today's keyring.
    let table: Value = {
        let m: Value = serde_json::from_str(&std::fs::read_to_string(bk.join("manifest.json")).unwrap()).unwrap();
        serde_json::from_str(&std::fs::read_to_string(bk.join(m["keys"]["file"].as_str().unwrap())).unwrap()).unwrap()
    };
    let keyring = Keyring::Dir(s.keyring());
    let subject: Uuid = ERASED[0].parse().unwrap();
    let mine: Vec<&Value> = table["keys"].as_array().unwrap().iter().filter(|k| k[0] == ERASED[0]).collect();
    assert_eq!(mine.len(), 3);
    for g in keyring.generations().unwrap() {
        let master = keyring.load(g).unwrap();
        for k in &mine {
            let wrapped = pdledger::backup::unhex(k[2].as_str().unwrap()).unwrap();
            assert!(master.unwrap(subject, k[1].as_u64().unwrap() as u8, &wrapped).is_err());
        }
    }
}

#[test]
fn a_damaged_or_cut_backup_is_refused_with_the_position() {
    let s = Scratch::new();
    import_sample(&s);
    let bk = s.root.path().join("backup");
    assert!(s.cli(&["backup", bk.to_str().unwrap()]).status.success());
    let seg = std::fs::read_dir(&bk)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("log-"))
        .unwrap();
    let pristine = std::fs::read(&seg).unwrap();

    // A flipped byte in the middle.
    let mut bytes = pristine.clone();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    let out = s.cli(&["verify", "--data", bk.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let bad = r["first_bad_position"].as_u64().unwrap();
    assert!(bad > 1 && bad < 14_633, "{r}");
    let target = s.root.path().join("restored");
    let out = s.cli(&["restore", bk.to_str().unwrap(), "--data", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&format!("position {bad}")), "{}", stderr(&out));
    assert!(!target.exists());

    // Cut short.
    std::fs::write(&seg, &pristine[..pristine.len() - 1000]).unwrap();
    let out = s.cli(&["verify", "--data", bk.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(r["first_bad_position"].as_u64().unwrap() > 14_000, "{r}");
    let out = s.cli(&["restore", bk.to_str().unwrap(), "--data", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!target.exists());
    std::fs::write(&seg, &pristine).unwrap();
    assert!(s.cli(&["verify", "--data", bk.to_str().unwrap()]).status.success());
}

/// What a backup holds: no personal value in any encoding, no master key.
#[test]
fn a_backup_holds_no_plaintext_and_no_master_key() {
    let s = Scratch::new();
    import_sample(&s);
    let bk = s.root.path().join("backup");
    assert!(s.cli(&["backup", bk.to_str().unwrap()]).status.success());
    let values = known_values(&sample(), 60);
    assert!(scan(&[&bk], &values).is_empty());
    let keyring = Keyring::Dir(s.keyring());
    for g in keyring.generations().unwrap() {
        let master = keyring.load(g).unwrap();
        let hex: String = master.expose_for_keyring().iter().map(|b| format!("{b:02x}")).collect();
        let raw = String::from_utf8_lossy(master.expose_for_keyring()).into_owned();
        for (path, bytes) in files_under(&bk) {
            assert!(!bytes.windows(32).any(|w| w == master.expose_for_keyring()), "{path:?} holds the master key");
            assert!(!String::from_utf8_lossy(&bytes).contains(&hex), "{path:?} holds the master key in hex");
            let _ = &raw;
        }
    }
}

fn manifest_last(dir: &Path) -> u64 {
    let m: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    m["last_position"].as_u64().unwrap()
}

/// `serve --backup-dir` under appends, killed with SIGKILL 20 times: the backup always
/// verifies and holds every record acknowledged more than the lag before the kill; a
/// one-off `pdledger backup` works while the server runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_backup_survives_kills_and_keeps_up() {
    const INTERVAL_MS: u64 = 50;
    // What "shortly" allows: the interval, plus one round's fsyncs on a busy machine.
    const LAG: Duration = Duration::from_millis(INTERVAL_MS + 1000);
    let s = Scratch::new();
    let out = s
        .cli_cmd(&["user", "add", "clerk", "--role", "staff"])
        .env("PDLEDGER_PASSWORD", crate::http::PASSWORD)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let bk = s.root.path().join("continuous");
    let interval = INTERVAL_MS.to_string();
    let mut rng = seed();
    let mut checked = 0;
    for round in 0..20 {
        let server = Server::start(
            &s,
            &["--plain-http", "--backup-dir", bk.to_str().unwrap(), "--backup-interval-ms", &interval],
        );
        let client = std::sync::Arc::new(Client::new(&server, &s.data()));
        let token = client.login("clerk", crate::http::PASSWORD).await;
        if round == 0 {
            // A one-off backup through the running server.
            let one = s.root.path().join("one-off");
            let out = s.cli(&["backup", one.to_str().unwrap()]);
            assert!(out.status.success(), "{}", stderr(&out));
            assert!(s.cli(&["verify", "--data", one.to_str().unwrap()]).status.success());
        }
        let acks = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u64, Instant)>::new()));
        let mut tasks = vec![];
        for _ in 0..4 {
            let (client, token, acks) = (client.clone(), token.clone(), acks.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let subject = Uuid::new_v4();
                    let body = json!({"events": [{"type": "note.added", "data": {"text": "backed up"}}]});
                    let (status, r) =
                        client.call("POST", &format!("/v1/subjects/{subject}/events"), Some(&token), Some(body)).await;
                    if status != 201 {
                        break;
                    }
                    let pos = r["positions"][0].as_u64().unwrap();
                    acks.lock().unwrap().push((pos, Instant::now()));
                }
            }));
        }
        let run = Duration::from_millis(1500 + next_random(&mut rng) % 1000);
        tokio::time::sleep(run).await; // how long the load runs before the fault
        let killed_at = Instant::now();
        server.signal(libc::SIGKILL);
        for t in tasks {
            let _ = t.await;
        }
        let report = s.cli(&["verify", "--data", bk.to_str().unwrap(), "--json"]);
        assert!(report.status.success(), "round {round}: {}", stdout(&report));
        let last = manifest_last(&bk);
        for (pos, at) in acks.lock().unwrap().iter() {
            if *at + LAG < killed_at {
                assert!(*pos <= last, "round {round}: position {pos}, acknowledged {:?} before the kill, is not in the backup (it ends at {last})", killed_at - *at);
                checked += 1;
            }
        }
    }
    assert!(checked > 50, "too few appends were old enough to check: {checked}");
    // After a clean stop the backup holds everything, and restores.
    let log = s.root.path().join("last.log");
    let server = Server::start_logged(&s, &["--plain-http", "--backup-dir", bk.to_str().unwrap()], Some(&log));
    let status = server.stop();
    assert!(status.success(), "{status:?}: {}", std::fs::read_to_string(&log).unwrap_or_default());
    let head = s.open().durable();
    assert_eq!(manifest_last(&bk), head);
}
