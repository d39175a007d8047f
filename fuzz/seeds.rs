//! Writes the seed corpus, `fuzz/seeds/<target>/`, from the sample register
//! (`tests/data/sample-register.jsonl`) and the shipped view definitions:
//!
//! - `import_line`: the register's first lines of each event type, as they are;
//! - `record_decode`: the stored records those lines become when imported into a new ledger
//!   (sealed events and the ledger's own records), byte for byte as the store holds them;
//! - `projection_def`: `projections/*.json`;
//! - `api_body`: the bodies of every route with one (`api::BODY_ROUTES`), the append bodies
//!   made of the same register lines.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example seeds` (then commit `fuzz/seeds/`).
//! Records hold fresh keys and nonces, so their bytes differ from run to run.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use pdledger::keyring::Keyring;
use pdledger::ledger::{Ledger, OpenOptions};
use pdledger::writer::Op;
use serde_json::{json, Value};
use uuid::Uuid;

const PER_TYPE: usize = 6;
const RECORDS_MAX: usize = 120;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = fuzz.parent().unwrap();
    let seeds = fuzz.join("seeds");
    let dirs: Vec<_> = ["import_line", "record_decode", "projection_def", "api_body"]
        .iter()
        .map(|t| {
            let d = seeds.join(t);
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).unwrap();
            d
        })
        .collect();
    let [lines_dir, records_dir, views_dir, bodies_dir] = &dirs[..] else { unreachable!() };

    // The first PER_TYPE lines of each event type.
    let text = fs::read_to_string(root.join("tests/data/sample-register.jsonl")).unwrap();
    let mut by_type: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let picked = by_type.entry(v["type"].as_str().unwrap().to_owned()).or_default();
        if picked.len() < PER_TYPE {
            picked.push(line);
        }
    }
    let lines: Vec<&str> = by_type.values().flatten().copied().collect();
    for (i, line) in lines.iter().enumerate() {
        write(lines_dir, &format!("line-{i:03}"), line.as_bytes());
    }

    // Those lines imported into a new ledger; its records as stored.
    let scratch = std::env::temp_dir().join(format!("pdledger-fuzz-seeds-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).unwrap();
    {
        let opts = OpenOptions::new(scratch.join("data"), Keyring::Dir(scratch.join("keys")), "fuzz-seeds");
        let ledger = Ledger::open(opts).unwrap();
        let input = lines.join("\n") + "\n";
        pdledger::import::import(&ledger, input.as_bytes(), 16, "import", |_| {}).map_err(|f| f.error).unwrap();
        // And the ledger's own records: a new subject, a restriction, an erasure, a rotation.
        let subject = |i: usize| {
            let v: Value = serde_json::from_str(lines[i]).unwrap();
            Uuid::parse_str(v["subject"].as_str().unwrap()).unwrap()
        };
        let actor = || "dpo".to_owned();
        let ops = vec![
            Op::Create { subject: Uuid::from_u128(0x5eed), actor: actor() },
            Op::Restrict { subject: subject(0), restricted: true, actor: actor() },
            Op::Erase { subject: subject(1), reason: "Art. 17 request".into(), actor: actor(), retain: vec![] },
        ];
        ledger.submit(ops).unwrap();
        ledger.rotate().unwrap();
        let mut n = 0;
        for r in ledger.store().records(1).take(RECORDS_MAX) {
            let (position, bytes) = r.unwrap();
            pdledger::record::decode(&bytes).expect("a stored record decodes");
            write(records_dir, &format!("record-{position:04}"), &bytes);
            n += 1;
        }
        println!("record_decode: {n} records");
    }
    fs::remove_dir_all(&scratch).unwrap();

    let mut views = 0;
    for entry in fs::read_dir(root.join("projections")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            fs::copy(&path, views_dir.join(path.file_name().unwrap())).unwrap();
            views += 1;
        }
    }

    // Bodies: each route's own shape, and appends made of the register's lines.
    let mut bodies = vec![
        json!({"username": "admin", "password": "correct horse battery staple"}),
        json!({"mfa_token": "3q2+7wAAAAAAAAAAAAAAAA", "code": "123456"}),
        json!({"code": "654321"}),
        json!({"username": "dpo2", "password": "a long enough passphrase", "role": "dpo"}),
        json!({"username": "staff2", "password": "another passphrase", "role": "staff"}),
        json!({"email": "ulrica58@example.org"}),
        json!({"personal_number": "19810615-1502"}),
        json!({"org_number": "848987-2153"}),
        json!({"reason": "Art. 17 request by the data subject, ticket 4711"}),
    ];
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap();
        let event = json!({"type": v["type"], "occurred_at": v["occurred_at"], "data": v["data"]});
        bodies.push(json!({"events": [event]}));
    }
    let firsts: Vec<Value> = by_type
        .values()
        .map(|ls| {
            let v: Value = serde_json::from_str(ls[0]).unwrap();
            json!({"type": v["type"], "data": v["data"]})
        })
        .collect();
    bodies.push(json!({"expected_version": 3, "events": firsts}));
    for (i, b) in bodies.iter().enumerate() {
        write(bodies_dir, &format!("body-{i:03}"), b.to_string().as_bytes());
    }
    println!(
        "import_line: {} lines, projection_def: {views} definitions, api_body: {} bodies",
        lines.len(),
        bodies.len()
    );
}
