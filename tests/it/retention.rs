//! Retention rules: an erasure request keeps what the law requires (invoices, restricted to
//! the dpo) and shreds the rest at once; the retention run shreds what is kept when its time
//! is up; bad rules stop start-up; a kill during the run never shreds early.

use axum::http::Method;
use pdledger::retention::Rules;
use pdledger::schema::Category;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::http::{App, PASSWORD};
use crate::support::*;

/// A company whose two invoice events are from 2021 (checked against the sample file).
const INVOICED_2021: &str = "d5b7103b-1a9b-4941-b555-0ab55d7a2e85";

fn ms(t: &str) -> u64 {
    pdledger::time::parse_timestamp(t).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoices_outlive_an_erasure_request_until_the_bookkeeping_period_ends() {
    let app = App::with_sample();
    let subject: Uuid = INVOICED_2021.parse().unwrap();
    let mine: Vec<Value> = sample().into_iter().filter(|e| e["subject"] == INVOICED_2021).collect();
    let (staff, dpo) = (app.login("staff").await, app.login("dpo").await);

    let r = app
        .call(
            Method::POST,
            &format!("/v1/subjects/{subject}/erase"),
            Some(&dpo),
            Some(json!({"reason": "art17_request"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let retained = r.body["receipt"]["retained"].as_array().unwrap().clone();
    assert_eq!(retained.len(), 1, "{}", r.body);
    assert_eq!(retained[0]["category"], "billing");
    assert_eq!(retained[0]["until"], "2029-01-01T00:00:00.000Z", "the end of 2028: seven years after 2021");
    assert!(retained[0]["legal_reference"].as_str().unwrap().contains("Bokföringslagen"));

    // Contact and project data are gone at once: keys, documents, lookups.
    assert_eq!(app.ledger.store().key_categories(subject).unwrap(), vec![Category::Billing as u8]);
    assert!(app.ledger.view("customer", subject).unwrap().is_none());
    assert!(app.ledger.view("projects", subject).unwrap().is_none());
    assert!(app.ledger.view("billing", subject).unwrap().is_some());
    let email = mine[0]["data"]["email"].as_str().unwrap();
    assert!(app.ledger.lookup(pdledger::lookup::LookupKey::Email, email, 5).unwrap().is_empty());
    let found = scan(&[&app._scratch.data()], &known_values(&mine, 5));
    assert!(found.is_empty(), "{found:?}");

    // The invoices: the dpo alone reads them (audited); staff sees an erased subject.
    let r = app.call(Method::GET, &format!("/v1/subjects/{subject}/events"), Some(&staff), None).await;
    assert_eq!(r.status, 410);
    let r = app.call(Method::GET, &format!("/v1/subjects/{subject}/events"), Some(&dpo), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let types: Vec<&str> = r.body["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, vec!["invoice.issued", "invoice.paid"]);
    let r = app.call(Method::GET, &format!("/v1/views/billing/{subject}"), Some(&dpo), None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["data"]["invoices"][0]["invoice_number"], "20210087900");
    // So do pages of many subjects: staff sees every event of the subject as erased in the
    // feed and no billing document in the list; the dpo sees the invoices' data.
    let staff_sees = app.feed_of(&staff, INVOICED_2021).await;
    assert_eq!(staff_sees.len(), mine.len());
    assert!(staff_sees.iter().all(|e| e["erased"] == true && e.get("data").is_none()), "{staff_sees:?}");
    assert!(!app.view_lists(&staff, "billing", INVOICED_2021).await);
    let dpo_sees = app.feed_of(&dpo, INVOICED_2021).await;
    let with_data: Vec<&str> =
        dpo_sees.iter().filter(|e| e["data"].is_object()).map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(with_data, vec!["invoice.issued", "invoice.paid"], "{dpo_sees:?}");
    assert!(app.view_lists(&dpo, "billing", INVOICED_2021).await);

    // The dpo's register extract says what was kept, why, and until when.
    let r = app.call(Method::GET, &format!("/v1/subjects/{subject}/export"), Some(&dpo), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["erasure"]["retained"][0]["category"], "billing");
    assert_eq!(r.body["erasure"]["retained"][0]["until"], "2029-01-01T00:00:00.000Z");
    assert!(r.body["erasure"]["retained"][0]["legal_reference"].as_str().unwrap().contains("7 kap. 2 §"));
    assert!(r.body["events"].as_array().unwrap().iter().all(|e| e["category"] == "billing"));

    // Not before its time.
    let rules = Rules::builtin();
    let run = |at: &str| {
        tokio::task::block_in_place(|| pdledger::retention::run(&app.ledger, &rules, ms(at), "retention").unwrap())
    };
    assert!(run("2028-12-31T23:59:59Z").is_empty());
    assert_eq!(app.ledger.store().key_categories(subject).unwrap().len(), 1);
    // Then gone, with the event, the audit entry and the receipt to show it.
    let done = run("2029-01-01");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].category, "billing");
    assert!(run("2029-01-01").is_empty(), "idempotent");
    assert!(app.ledger.store().key_categories(subject).unwrap().is_empty());
    assert!(app.ledger.view("billing", subject).unwrap().is_none());
    let r = app.call(Method::GET, &format!("/v1/subjects/{subject}/events"), Some(&dpo), None).await;
    assert_eq!(r.status, 410);
    let r = app
        .call(
            Method::POST,
            &format!("/v1/subjects/{subject}/erase"),
            Some(&dpo),
            Some(json!({"reason": "art17_request"})),
        )
        .await;
    assert_eq!(r.body["receipt"]["retained"][0]["shredded"], true);
    let trail = app.audit(&format!("subject={subject}&action=erase")).await;
    assert!(trail.iter().any(|e| e["actor"] == "retention" && e["target"] == "billing"), "{trail:?}");
}

/// A rebuild (after a changed definition, `replay --rebuild`, or a restore) gives an erased
/// subject back exactly what the erasure kept: the billing document, and nothing else.
#[test]
fn a_rebuild_keeps_what_an_erasure_kept_and_nothing_more() {
    let s = Scratch::new();
    assert!(s.cli(&["import", sample_path().to_str().unwrap()]).status.success());
    let out = s.cli(&["erase", INVOICED_2021, "--reason", "art17_request"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let subject: Uuid = INVOICED_2021.parse().unwrap();
    let docs = |l: &pdledger::ledger::Ledger| {
        ["customer", "projects", "billing"].map(|v| l.view(v, subject).unwrap().map(|d| d.data))
    };
    let before = docs(&s.open());
    assert!(before[0].is_none() && before[1].is_none(), "{before:?}");
    assert!(before[2].is_some(), "the billing document is kept");
    let out = s.cli(&["replay", "--rebuild"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(docs(&s.open()), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_without_invoices_is_erased_completely_at_once() {
    let app = App::new();
    let (staff, dpo) = (app.login("staff").await, app.login("dpo").await);
    let s = Uuid::new_v4();
    let body = json!({"events": [
        {"type": "customer.registered", "occurred_at": "2026-01-10", "data": {"kind": "person", "name": "Ada Nyberg", "personal_number": "19900101-1234", "email": "ada@example.com", "phone": "0701234567", "address": {"street": "Gatan 1", "postal_code": "11111", "city": "Ort"}}},
        {"type": "project.opened", "occurred_at": "2026-02-01", "data": {"project_id": "P1", "title": "Kök", "property_designation": "Ort 1:1", "site_address": {"street": "Gatan 1", "postal_code": "11111", "city": "Ort"}}}
    ]});
    assert_eq!(app.call(Method::POST, &format!("/v1/subjects/{s}/events"), Some(&staff), Some(body)).await.status, 201);
    let r = app
        .call(Method::POST, &format!("/v1/subjects/{s}/erase"), Some(&dpo), Some(json!({"reason": "art17_request"})))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["receipt"]["retained"], json!([]));
    assert!(app.ledger.store().key_categories(s).unwrap().is_empty());
    assert_eq!(app.call(Method::GET, &format!("/v1/subjects/{s}/events"), Some(&dpo), None).await.status, 410);
}

#[test]
fn bad_retention_rules_stop_start_up() {
    let s = Scratch::new();
    let text =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/retention/rules.json"))
            .unwrap();
    for (bad, says) in [
        (text.replace("\"projects\": {", "\"drawings\": {"), "unknown category `drawings`"),
        (text.replace("\"P10Y\"", "\"ten years\""), "`ten years` is not a period"),
    ] {
        let f = s.write("rules.json", &bad);
        let out = s
            .cli_cmd(&["serve", "--plain-http", "--listen", "127.0.0.1:0", "--retention", f.to_str().unwrap()])
            .env("PDLEDGER_ADMIN_PASSWORD", PASSWORD)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(stderr(&out).contains(says), "{}", stderr(&out));
        assert!(stderr(&out).contains("rules.json"), "{}", stderr(&out));
        assert!(!s.data().join("store").exists(), "nothing opened");
    }
}

/// Kill -9 during `pdledger retention run`: every held key is shredded (with its hold gone)
/// or still held and due; nothing is shredded before its time; the next run finishes.
#[test]
fn kill_during_the_retention_run_shreds_nothing_early_and_loses_nothing() {
    let template = Scratch::new();
    let out = template.cli(&["import", sample_path().to_str().unwrap()]);
    assert!(out.status.success());
    // Erase 40 customers with invoices: each keeps its billing key until its own year's end.
    let rules = Rules::builtin();
    let mut subjects: Vec<Uuid> = vec![];
    {
        let ledger = template.open();
        let mut seen = std::collections::BTreeSet::new();
        for e in sample().iter().filter(|e| e["type"] == "invoice.issued") {
            let s: Uuid = e["subject"].as_str().unwrap().parse().unwrap();
            if seen.insert(s) && subjects.len() < 40 {
                subjects.push(s);
            }
        }
        for s in &subjects {
            pdledger::retention::erase(&ledger, &rules, *s, "test", "t", ms("2026-11-29"), vec![]).unwrap().unwrap();
        }
    }
    let holds = |s: &Scratch| -> Vec<(Uuid, u8, u64)> {
        let l = s.open();
        let h = l.store().holds().map(Result::unwrap).collect();
        h
    };
    let all = holds(&template);
    assert_eq!(all.len(), 40);
    // A time at which some holds are due and some are not.
    let mut untils: Vec<u64> = all.iter().map(|h| h.2).collect();
    untils.sort();
    let now = untils[untils.len() / 2];
    let now_text = pdledger::time::rfc3339(now);
    let t = std::time::Instant::now();
    {
        let s = Scratch::new();
        copy_scratch(&template, &s);
        assert!(s.cli(&["retention", "run", "--now", &now_text]).status.success());
    }
    let full = t.elapsed();
    let mut rng = seed();
    for _ in 0..10 {
        let s = Scratch::new();
        copy_scratch(&template, &s);
        spawn_and_kill(s.cli_cmd(&["retention", "run", "--now", &now_text]), full, &mut rng);
        let ledger = s.open();
        for (subject, category, until) in &all {
            let has_key = ledger.store().key_categories(*subject).unwrap().contains(category);
            let held = ledger.store().holds_of(*subject).unwrap().iter().any(|(c, _)| c == category);
            if *until > now {
                assert!(has_key && held, "{subject}: shredded before its time");
            } else {
                assert_eq!(has_key, held, "{subject}: a key without its hold, or a hold without its key");
            }
        }
        drop(ledger);
        assert!(s.cli(&["retention", "run", "--now", &now_text]).status.success());
        let left = holds(&s);
        assert_eq!(left.len(), all.iter().filter(|h| h.2 > now).count());
        assert!(s.cli(&["verify"]).status.success());
    }
}
