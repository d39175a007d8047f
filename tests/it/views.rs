//! Projections: the shipped views over the sample register (snapshots of hand-checked
//! customers), replay equals live, view routes, a bad definition stops start-up, the audit
//! trail answering who read whom and what a user did.

use axum::http::Method;
use pdledger::ledger::Ledger;
use proptest::prelude::*;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::http::{App, PASSWORD};
use crate::support::*;

/// A company whose address changed, whose newsletter consent was withdrawn, with one unpaid
/// invoice of three (checked by hand against tests/data/sample-register.jsonl).
const COMPANY: &str = "6a04b685-6120-4c48-9d1f-08fc27fbe3fb";

fn expected_customer() -> Value {
    json!({
        "kind": "company", "name": "Henriksson Jörgensen HB", "org_number": "702595-4681",
        "contact_person": "Susanne Andersson",
        "email": "knutssonmonica@example.net", "phone": "08-960 749 54",
        "address": {"street": "Parkgatan 1", "postal_code": "75960", "city": "Växjö"},
        "registered_on": "2020-06-29",
        "consents": [{"purpose": "newsletter", "given": false, "channel": "email", "changed_on": "2020-07-19"}],
        "contact_changed_on": "2020-10-12",
        "notes": [{"on": "2020-10-31", "text": "Ringde Henriksson angående at saepe necessitatibus."}],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_register_views_match_hand_checked_documents() {
    let app = App::with_sample();
    let staff = app.login("staff").await;
    let r = app.call(Method::GET, &format!("/v1/views/customer/{COMPANY}"), Some(&staff), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["view"], "customer");
    assert_eq!(r.body["version"], 5, "the version of the last event this view applied");
    assert_eq!(r.body["data"], expected_customer());

    let r = app.call(Method::GET, &format!("/v1/views/billing/{COMPANY}"), Some(&staff), None).await;
    assert_eq!(r.status, 200);
    let b = &r.body["data"];
    assert_eq!(
        b["totals"],
        json!({"invoice_count": 3, "invoiced_ore": 12_606_250, "paid_ore": 7_243_750, "unpaid_ore": 5_362_500})
    );
    let invoices = b["invoices"].as_array().unwrap();
    assert_eq!(invoices.len(), 3);
    let unpaid: Vec<&Value> = invoices.iter().filter(|i| i["status"] == "unpaid").collect();
    assert_eq!(unpaid.len(), 1);
    assert_eq!(unpaid[0]["invoice_number"], "20210037501");
    assert_eq!(unpaid[0]["total_ore"], 5_362_500);
    assert_eq!(unpaid[0]["paid_ore"], 0);
    let paid = invoices.iter().find(|i| i["invoice_number"] == "20220037500").unwrap();
    assert_eq!(
        (paid["status"].as_str(), paid["paid_on"].as_str(), paid["paid_ore"].as_i64()),
        (Some("paid"), Some("2022-03-23"), Some(2_493_750))
    );

    let r = app.call(Method::GET, &format!("/v1/views/projects/{COMPANY}"), Some(&staff), None).await;
    let projects = r.body["data"]["projects"].as_array().unwrap();
    assert_eq!(projects.len(), 1);
    assert_eq!(projects[0]["project_id"], "P2020-00375-0");
    assert_eq!(projects[0]["drawings"][0]["drawing_id"], "A-01");
    assert_eq!(projects[0]["drawings"][0]["revision"], "B");

    // Every customer of the sample has a register card whose name is its registration's.
    let events = sample();
    let mut cursor: Option<String> = None;
    let mut seen = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("?limit=300&cursor={c}"),
            None => "?limit=300".into(),
        };
        let r = app.call(Method::GET, &format!("/v1/views/customer{q}"), Some(&staff), None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        for item in r.body["items"].as_array().unwrap() {
            let reg = events
                .iter()
                .find(|e| e["subject"] == item["subject"] && e["type"] == "customer.registered")
                .expect("a registration");
            assert_eq!(item["data"]["name"], reg["data"]["name"]);
            seen += 1;
        }
        match r.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, 1000);
    // The listing is audited per subject shown.
    let audit = app.audit(&format!("subject={COMPANY}&action=view")).await;
    assert!(audit.iter().any(|e| e["actor"] == "staff"), "{audit:?}");

    // Unknown views and roles without the permission.
    assert_eq!(app.call(Method::GET, &format!("/v1/views/nope/{COMPANY}"), Some(&staff), None).await.status, 404);
    let service = app.login("service").await;
    assert_eq!(app.call(Method::GET, &format!("/v1/views/customer/{COMPANY}"), Some(&service), None).await.status, 403);
}

/// Every document of every view, decrypted, as bytes.
fn all_docs(ledger: &Ledger) -> Vec<(String, Uuid, Vec<u8>)> {
    let mut out = vec![];
    for v in ledger.projections().views() {
        for (s, d) in ledger.view_page(v.name(), None, usize::MAX).unwrap() {
            out.push((v.name().to_owned(), s, serde_json::to_vec(&d).unwrap()));
        }
    }
    out
}

fn event(kind: u8, n: u8) -> (&'static str, Value) {
    match kind % 6 {
        0 => (
            "customer.registered",
            json!({"kind": "person", "name": format!("P{n}"), "personal_number": "19800101-1234", "email": format!("p{n}@example.com"), "phone": "0701234567", "address": {"street": "S 1", "postal_code": "11111", "city": "C"}}),
        ),
        1 => ("customer.contact_changed", json!({"email": format!("q{n}@example.com")})),
        2 => ("consent.given", json!({"purpose": "newsletter", "channel": "email"})),
        3 => ("consent.withdrawn", json!({"purpose": "newsletter"})),
        4 => (
            "invoice.issued",
            json!({"invoice_number": format!("{}", n % 4), "project_id": "P1", "issued_on": "2024-01-01", "due_on": "2024-02-01", "currency": "SEK", "lines": [{"description": "x", "hours": 1, "amount_ore": 100}], "net_ore": 100, "vat_ore": 25, "total_ore": 125, "billing_address": {"street": "S", "postal_code": "1", "city": "C"}}),
        ),
        _ => (
            "invoice.paid",
            json!({"invoice_number": format!("{}", n % 4), "paid_on": "2024-01-05", "amount_ore": 125}),
        ),
    }
}

/// The shipped views plus `stamps`, which uses the event's metadata (`$recorded_at`,
/// `$version`, `$position`, `$type`), when `stamps`; else the shipped views alone.
fn projections(stamps: bool) -> std::sync::Arc<pdledger::projection::Projections> {
    let schemas = pdledger::schema::Schemas::builtin();
    let mut p = pdledger::projection::Projections::builtin(&schemas).unwrap();
    if stamps {
        let dir = tempfile::tempdir().unwrap();
        for f in ["customer.json", "projects.json", "billing.json"] {
            std::fs::copy(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("projections").join(f),
                dir.path().join(f),
            )
            .unwrap();
        }
        let stamps = r#"{"view": "stamps", "description": "when each change was recorded", "on": {
            "customer.contact_changed": [{"append": "changes", "value": {"at": "$recorded_at", "v": "$version", "p": "$position", "t": "$type"}}],
            "customer.registered": [{"set": "registered_at", "value": "$recorded_at"}]}}"#;
        std::fs::write(dir.path().join("stamps.json"), stamps).unwrap();
        p = pdledger::projection::Projections::load_dir(dir.path(), &schemas).unwrap();
    }
    std::sync::Arc::new(p)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    /// Random appends (and erasures) to a few subjects: the documents rebuilt from the log
    /// are byte-equal to the ones the appends produced, however the rebuild cuts the subjects
    /// into ranges (one range for all, or one per subject), whether it builds a range subject
    /// by subject or in log order, and its spill files are gone after.
    /// The rebuild is either a requested one over the same definitions (it writes over the
    /// stored documents) or the one a change of definitions forces (it starts from none): the
    /// store is opened once without the `stamps` view, then again with it.
    #[test]
    fn replay_equals_live(
        ops in prop::collection::vec((0u8..4, 0u8..7, any::<u8>()), 1..60),
        range in 1usize..5,
        changed_definitions in any::<bool>(),
        sorted in any::<bool>(),
    ) {
        let s = Scratch::new();
        let subjects: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
        let options = |stamps: bool| {
            let mut o = pdledger::ledger::OpenOptions::new(s.data(), pdledger::keyring::Keyring::Dir(s.keyring()), "test");
            o.projections = projections(stamps);
            o.limits.rebuild_range_subjects = range;
            // Each range read in and built subject by subject, or streamed in log order.
            if !sorted {
                o.limits.rebuild_sort_bytes = 0;
            }
            o
        };
        let live = {
            let ledger = Ledger::open(options(true)).unwrap();
            for (who, kind, n) in &ops {
                let subject = subjects[*who as usize];
                if *kind == 6 {
                    let _ = ledger.submit(vec![pdledger::writer::Op::Erase { subject, reason: "test".into(), actor: "t".into(), retain: vec![] }]);
                    continue;
                }
                let (t, data) = event(*kind, *n);
                let ev = ledger.prepare(t, Some("2024-01-01"), data).unwrap();
                let _ = ledger.append(subject, None, vec![ev], "t");
            }
            all_docs(&ledger)
        };
        let rebuilt = if changed_definitions {
            drop(Ledger::open(options(false)).unwrap());
            all_docs(&Ledger::open(options(true)).unwrap())
        } else {
            let mut o = options(true);
            o.rebuild_views = true;
            all_docs(&Ledger::open(o).unwrap())
        };
        prop_assert_eq!(live, rebuilt);
        let left: Vec<_> = std::fs::read_dir(s.data()).unwrap().map(|e| e.unwrap().file_name()).collect();
        prop_assert!(left.iter().all(|n| !n.to_string_lossy().contains("rebuild")), "{:?}", left);
    }
}

#[test]
fn a_bad_projection_file_stops_start_up_naming_file_and_line() {
    let s = Scratch::new();
    let dir = s.root.path().join("projections");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["customer.json", "projects.json", "billing.json"] {
        std::fs::copy(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("projections").join(f), dir.join(f))
            .unwrap();
    }
    let text = std::fs::read_to_string(dir.join("billing.json")).unwrap();
    std::fs::write(dir.join("billing.json"), text.replace("\"invoice.paid\": [", "\"invoice.sent\": [")).unwrap();
    let line = text.lines().position(|l| l.contains("\"invoice.paid\": [")).unwrap() + 1;
    let out = s
        .cli_cmd(&["serve", "--plain-http", "--listen", "127.0.0.1:0", "--projections", dir.to_str().unwrap()])
        .env("PDLEDGER_ADMIN_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains(&format!("billing.json:{line}")), "{err}");
    assert!(err.contains("invoice.sent"), "{err}");
    assert!(!stdout(&out).contains("serving"), "it must not have started: {}", stdout(&out));
    // Not even the data directory's users were created: nothing was opened.
    assert!(!s.data().join("store").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_answers_who_read_whom_and_what_a_user_did() {
    let app = App::new();
    let staff = app.login("staff").await;
    let dpo = app.login("dpo").await;
    let (x, y) = (Uuid::new_v4(), Uuid::new_v4());
    for s in [x, y] {
        let body = json!({"events": [{"type": "note.added", "data": {"text": "hello"}}]});
        assert_eq!(
            app.call(Method::POST, &format!("/v1/subjects/{s}/events"), Some(&staff), Some(body)).await.status,
            201
        );
    }
    app.call(Method::GET, &format!("/v1/subjects/{x}/events"), Some(&staff), None).await;
    app.call(Method::GET, &format!("/v1/views/customer/{x}"), Some(&dpo), None).await;
    app.call(Method::GET, &format!("/v1/subjects/{y}/events"), Some(&dpo), None).await;

    // Who read customer X, and when.
    let who: Vec<(String, String)> = app
        .audit(&format!("subject={x}"))
        .await
        .iter()
        .filter(|e| e["action"] == "read" || e["action"] == "view")
        .map(|e| (e["actor"].as_str().unwrap().to_owned(), e["action"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(who, vec![("dpo".to_owned(), "view".to_owned()), ("staff".to_owned(), "read".to_owned())]);
    // What did the dpo do (newest first), within a time window.
    let did = app.audit("actor=dpo&since=2000-01-01&until=2100-01-01").await;
    let actions: Vec<&str> = did.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(&actions[..3], &["read", "view", "login"], "{did:?}");
    assert_eq!(did[0]["subject"], y.to_string());
    assert!(app.audit("actor=dpo&until=2000-01-01").await.is_empty());
    // Paging: one at a time, newest first, no repeats.
    let auditor = app.login("auditor").await;
    let mut cursor = String::new();
    let mut paged = vec![];
    loop {
        let r = app.call(Method::GET, &format!("/v1/audit?actor=dpo&limit=1{cursor}"), Some(&auditor), None).await;
        let e = r.body["entries"].as_array().unwrap();
        paged.extend(e.iter().map(|e| e["position"].as_u64().unwrap()));
        match r.body["next_cursor"].as_u64() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    let all: Vec<u64> = app.audit("actor=dpo").await.iter().map(|e| e["position"].as_u64().unwrap()).collect();
    assert_eq!(paged, all);
    assert!(all.windows(2).all(|w| w[0] > w[1]));
    // No personal data in the trail.
    let everything = app.audit("").await.iter().map(|e| e.to_string()).collect::<String>();
    assert!(!everything.contains("hello"));
}

#[test]
fn audit_cli_prints_a_table_and_json_lines() {
    let s = Scratch::new();
    let (x, y) = (Uuid::new_v4(), Uuid::new_v4());
    {
        use pdledger::audit::{Action, Entry, Outcome};
        let ledger = s.open();
        ledger
            .submit(vec![
                Entry::new(Action::Read, Some(x), Outcome::Ok).into_op("alice"),
                Entry::new(Action::Read, Some(y), Outcome::Ok).into_op("bob"),
                Entry::new(Action::Export, Some(x), Outcome::Ok).into_op("bob"),
            ])
            .unwrap();
    }
    let out = s.cli(&["audit", "--subject", &x.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].contains("POSITION") && lines[0].contains("ACTOR") && lines[0].contains("SUBJECT"), "{table}");
    assert!(lines[1].contains("bob") && lines[1].contains("export"), "{table}");
    assert!(lines[2].contains("alice") && lines[2].contains("read"), "{table}");
    assert!(table.contains("2 entries"));

    let out = s.cli(&["audit", "--actor", "bob", "--json"]);
    let parsed: Vec<Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(parsed.len(), 2);
    assert_eq!(parsed[0]["action"], "export");
    assert_eq!(parsed[1]["subject"], y.to_string());
    let out = s.cli(&["audit", "--actor", "bob", "--action", "read", "--since", "2000-01-01", "--json"]);
    assert_eq!(stdout(&out).lines().count(), 1);
    assert_eq!(s.cli(&["audit", "--action", "nonsense"]).status.code(), Some(2));
}

/// `replay --rebuild` killed at random moments over the sample register (during the spill,
/// the build or the writes): the next open rebuilds the views, which then equal the ones the
/// appends made, and no spill file is left in the data directory.
#[test]
fn a_rebuild_killed_midway_is_finished_at_the_next_open() {
    let template = Scratch::new();
    assert!(template.cli(&["import", sample_path().to_str().unwrap()]).status.success());
    let live = all_docs(&template.open());
    assert!(live.len() > 2000, "{}", live.len());
    let t = std::time::Instant::now();
    assert!(template.cli(&["replay", "--rebuild"]).status.success());
    let full = t.elapsed();
    assert_eq!(all_docs(&template.open()), live, "a whole rebuild equals live");
    {
        // One subject a range: 1,000 ranges, so two passes over the log (512 ranges a pass).
        let s = Scratch::new();
        copy_scratch(&template, &s);
        let mut o = pdledger::ledger::OpenOptions::new(s.data(), pdledger::keyring::Keyring::Dir(s.keyring()), "test");
        o.rebuild_views = true;
        o.limits.rebuild_range_subjects = 1;
        assert_eq!(all_docs(&Ledger::open(o).unwrap()), live, "a rebuild in two passes equals live");
    }
    let mut rng = seed();
    for round in 0..8 {
        let s = Scratch::new();
        copy_scratch(&template, &s);
        spawn_and_kill(s.cli_cmd(&["replay", "--rebuild"]), full, &mut rng);
        assert_eq!(all_docs(&s.open()), live, "round {round}");
        let left: Vec<_> = std::fs::read_dir(s.data()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.iter().all(|n| !n.to_string_lossy().contains("rebuild")), "round {round}: {left:?}");
    }
}

/// A rebuild over the same definitions writes over the stored documents instead of first
/// removing them all: whatever it does not write again goes, even a document of a subject
/// that has no subject entry or no key for the view's category.
#[test]
fn a_rebuild_removes_every_document_it_does_not_write() {
    let s = Scratch::new();
    let (customer, stranger) = (Uuid::new_v4(), Uuid::from_u128(u128::MAX));
    let live = {
        let ledger = s.open();
        let (t, data) = event(0, 1);
        let ev = ledger.prepare(t, Some("2024-01-01"), data).unwrap();
        ledger.append(customer, None, vec![ev], "t").unwrap();
        let docs = all_docs(&ledger);
        assert_eq!(docs.iter().filter(|d| d.1 == customer).count(), 1, "a customer card only: {docs:?}");
        let mut b = pdledger::store::WriteBatch::default();
        b.put_view("billing", customer, vec![1; 64]);
        b.put_view("customer", stranger, vec![2; 64]);
        b.put_view("projects", Uuid::nil(), vec![3; 64]);
        ledger.store().commit(b).unwrap();
        docs
    };
    let mut o = pdledger::ledger::OpenOptions::new(s.data(), pdledger::keyring::Keyring::Dir(s.keyring()), "test");
    o.rebuild_views = true;
    let ledger = Ledger::open(o).unwrap();
    assert_eq!(all_docs(&ledger), live);
    for (view, subject) in [("billing", customer), ("customer", stranger), ("projects", Uuid::nil())] {
        assert!(ledger.store().view(view, subject).unwrap().is_none(), "{view}/{subject} is still stored");
    }
}

/// A rebuild on a disk short of room does not spill into the space the writer keeps free
/// (`--min-free-mb`): it reads each subject's stream instead, finishes with the same documents,
/// and leaves nothing behind.
#[test]
fn a_rebuild_without_room_to_spill_reads_the_streams_instead() {
    let s = Scratch::new();
    let live = {
        let ledger = s.open();
        for n in 0..20u8 {
            let (t, data) = event(n % 6, n);
            let ev = ledger.prepare(t, Some("2024-01-01"), data).unwrap();
            let _ = ledger.append(Uuid::new_v4(), None, vec![ev], "t");
        }
        all_docs(&ledger)
    };
    assert!(!live.is_empty());
    let free = pdledger::store::free_bytes(&s.data()).unwrap();
    let mut o = pdledger::ledger::OpenOptions::new(s.data(), pdledger::keyring::Keyring::Dir(s.keyring()), "test");
    o.rebuild_views = true;
    o.limits.min_free_bytes = free + (1 << 40);
    o.limits.rebuild_range_subjects = 3;
    let ledger = Ledger::open(o).unwrap();
    let left: Vec<_> = std::fs::read_dir(s.data()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.iter().all(|n| !n.to_string_lossy().contains("rebuild")), "{left:?}");
    assert_eq!(all_docs(&ledger), live);
}
