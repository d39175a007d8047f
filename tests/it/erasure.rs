//! Data-subject rights: erasure (crypto-shredding) with the rotation that completes it,
//! restriction, and what an erased subject looks like from every side.

use axum::http::Method;
use pdledger::keyring::Keyring;
use pdledger::ledger::{Ledger, OpenOptions};
use pdledger::store::{Store, WriteBatch};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::http::App;
use crate::support::*;

const COMPANY: &str = "6a04b685-6120-4c48-9d1f-08fc27fbe3fb";

fn registration(subject: &str) -> Value {
    sample().into_iter().find(|e| e["subject"] == subject && e["type"] == "customer.registered").unwrap()
}

/// Another customer's extract without the parts that must change (the head, the time).
fn stable_extract(ledger: &Ledger, subject: Uuid) -> String {
    let mut v = serde_json::to_value(pdledger::export::extract(ledger, subject, 0).unwrap()).unwrap();
    // The head moves with every record; the access history grows with the reads this test
    // makes (the listings after the erasure).
    v.as_object_mut().unwrap().remove("ledger_head");
    v.as_object_mut().unwrap().remove("access_history");
    serde_json::to_string(&v).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasing_one_customer_removes_them_from_every_answer_and_leaves_the_rest() {
    let app = App::with_sample();
    let subject: Uuid = COMPANY.parse().unwrap();
    let reg = registration(COMPANY);
    let others: Vec<Uuid> = {
        let mut v: Vec<Uuid> = sample().iter().map(|e| e["subject"].as_str().unwrap().parse().unwrap()).collect();
        v.sort();
        v.dedup();
        v.retain(|s| *s != subject);
        v.into_iter().step_by(50).collect()
    };
    let before: Vec<String> = others.iter().map(|s| stable_extract(&app.ledger, *s)).collect();
    let (staff, dpo, admin) = (app.login("staff").await, app.login("dpo").await, app.login("admin").await);
    let email = reg["data"]["email"].as_str().unwrap().to_owned();
    let find = format!("/v1/subjects?email={}", email.replace('@', "%40"));
    assert_eq!(app.call(Method::GET, &find, Some(&staff), None).await.body["subjects"], json!([COMPANY]));

    // Staff may not erase; the attempt is refused and audited.
    let erase = format!("/v1/subjects/{COMPANY}/erase");
    let r = app.call(Method::POST, &erase, Some(&staff), Some(json!({"reason": "asked"}))).await;
    assert_eq!(r.status, 403);
    let denied = app.audit(&format!("subject={COMPANY}&action=denied")).await;
    assert_eq!(denied[0]["actor"], "staff");

    let r = app.call(Method::POST, &erase, Some(&dpo), Some(json!({"reason": "art17_request"}))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let receipt = r.body.clone();
    assert_eq!(receipt["subject"], COMPANY);
    assert_eq!(receipt["receipt"]["rotation"], "pending");
    let again = app.call(Method::POST, &erase, Some(&dpo), Some(json!({"reason": "art17_request"}))).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body, receipt, "a second call returns the same receipt");

    // Gone from every answer, with the erasure time.
    let erased_at = receipt["erased_at"].clone();
    for path in [
        format!("/v1/subjects/{COMPANY}/events"),
        format!("/v1/views/customer/{COMPANY}"),
        format!("/v1/views/billing/{COMPANY}"),
    ] {
        let r = app.call(Method::GET, &path, Some(&staff), None).await;
        assert_eq!(r.status, 410, "{path}: {}", r.body);
        assert_eq!(r.body["error"], "erased");
        assert_eq!(r.body["erased_at"], erased_at);
    }
    assert_eq!(app.call(Method::GET, &find, Some(&staff), None).await.body["subjects"], json!([]));
    let r = app
        .call(
            Method::POST,
            &format!("/v1/subjects/{COMPANY}/events"),
            Some(&staff),
            Some(json!({"events": [{"type": "note.added", "data": {"text": "back"}}]})),
        )
        .await;
    assert_eq!(r.status, 410, "appends are fenced");
    let listed = app.call(Method::GET, "/v1/views/customer?limit=1000", Some(&staff), None).await;
    assert!(listed.body["items"].as_array().unwrap().iter().all(|i| i["subject"] != COMPANY));
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 999);
    let feed = app.call(Method::GET, "/v1/events?limit=1000", Some(&staff), None).await;
    for e in feed.body["events"].as_array().unwrap().iter().filter(|e| e["subject"] == COMPANY) {
        assert_eq!(e["erased"], true);
        assert!(e.get("data").is_none());
    }

    // The rotation completes it; the receipt says so.
    let r = app.call(Method::POST, "/v1/keys/rotate", Some(&admin), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["from"], 1);
    assert_eq!(r.body["to"], 2);
    let r = app.call(Method::POST, &erase, Some(&dpo), Some(json!({"reason": "art17_request"}))).await;
    assert_eq!(r.body["receipt"]["rotation"], "complete");
    assert_eq!(r.body["position"], receipt["position"]);
    // Lookups still work for everyone else under the new index key.
    let other = registration(&others[1].to_string());
    let email = other["data"]["email"].as_str().unwrap().replace('@', "%40");
    let r = app.call(Method::GET, &format!("/v1/subjects?email={email}"), Some(&staff), None).await;
    assert_eq!(r.body["subjects"], json!([others[1]]));

    let after: Vec<String> = others.iter().map(|s| stable_extract(&app.ledger, *s)).collect();
    assert_eq!(before, after, "every other customer's extract is unchanged");
    let r = app.call(Method::GET, "/v1/ledger/verify", Some(&admin), None).await;
    assert_eq!(r.body["ok"], true, "{}", r.body);
    let trail = app.audit(&format!("subject={COMPANY}&action=erase")).await;
    assert!(trail.iter().any(|e| e["actor"] == "dpo" && e["outcome"] == "ok"));
}

/// After the erasure and its rotation, nothing that remains reads the customer: not the data
/// directory, not the keyring, not a copy of the data directory taken before, not a stale
/// wrapped key planted back from that copy.
#[test]
fn after_erasure_and_rotation_nothing_remaining_reads_the_customer() {
    let s = Scratch::new();
    let out = s.cli(&["import", sample_path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let subject: Uuid = COMPANY.parse().unwrap();
    let mine: Vec<Value> = sample().into_iter().filter(|e| e["subject"] == COMPANY).collect();
    let values = known_values(&mine, 1);
    // The simplest backup: a copy of the data directory before the erasure.
    let backup = s.root.path().join("backup");
    copy_dir(&s.data(), &backup);
    let rules = shred_all_rules(&s);

    let out = s.cli(&["erase", COMPANY, "--reason", "art17_request", "--retention", rules.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let receipt: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(receipt["complete"], true, "the CLI rotates at once");
    assert_eq!(receipt["key_generation"], 1);

    let found = scan(&[&s.data(), &s.keyring(), &backup], &values);
    assert!(found.is_empty(), "plaintext left: {found:?}");
    let keyring = Keyring::Dir(s.keyring());
    assert_eq!(keyring.generations().unwrap(), vec![2], "generation 1 is destroyed");

    // The old copy, with today's keyring: it cannot even be opened, since its keys are
    // wrapped under a generation that no longer exists.
    let mut o = OpenOptions::new(backup.clone(), Keyring::Dir(s.keyring()), "test");
    o.rebuild_views = false;
    let err = Ledger::open(o).err().expect("the old copy must not open with today's keyring");
    assert!(err.to_string().contains("generation 1"), "{err}");

    // Its stale wrapped keys, planted into today's store, open nothing.
    let stale: Vec<(u8, Vec<u8>)> = {
        let old = Store::open(&backup, "test", 8 << 20).unwrap();
        old.key_categories(subject)
            .unwrap()
            .into_iter()
            .map(|c| (c, old.wrapped_key(subject, c).unwrap().unwrap().to_vec()))
            .collect()
    };
    assert_eq!(stale.len(), 3);
    let master = keyring.load(2).unwrap();
    for (c, w) in &stale {
        assert!(master.unwrap(subject, *c, w).is_err());
    }
    {
        let store = Store::open(&s.data(), "test", 8 << 20).unwrap();
        let mut b = WriteBatch::default();
        for (c, w) in &stale {
            b.put_wrapped_key(subject, *c, w);
        }
        store.commit(b).unwrap();
    }
    let ledger = s.open();
    let read = ledger.read_stream(subject, 0, usize::MAX);
    assert!(read.map(|e| e.is_empty()).unwrap_or(true), "a planted stale key must decrypt nothing");
    let read = ledger.read_stream_raw(subject, 0, usize::MAX);
    assert!(read.map(|e| e.is_empty()).unwrap_or(true), "nor through the API's read");
    for v in ledger.projections().views() {
        assert!(ledger.view(v.name(), subject).map(|d| d.is_none()).unwrap_or(true));
    }
    assert!(ledger.erasure(subject).unwrap().is_some());
    drop(ledger);
    let out = s.cli(&["verify"]);
    assert!(out.status.success(), "{}", stdout(&out));
}

/// Kill -9 at random moments of `pdledger erase` (erasure, then rotation): afterwards the
/// erasure is done or not started, everyone else reads back, the chain verifies.
#[test]
fn kill_during_erase_and_rotation_leaves_it_done_or_not_started() {
    let template = Scratch::new();
    let out = template.cli(&["import", sample_path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rules = shred_all_rules(&template);
    let subject: Uuid = COMPANY.parse().unwrap();
    let witness: Uuid = "9988337f-adc0-4c2e-8fa9-cffccd012c84".parse().unwrap();
    let (witness_events, subject_events) = {
        let l = template.open();
        (l.read_stream(witness, 0, usize::MAX).unwrap(), l.read_stream(subject, 0, usize::MAX).unwrap())
    };
    // How long an uninterrupted erase takes here, to spread the kills over it.
    let t = std::time::Instant::now();
    {
        let s = Scratch::new();
        copy_scratch(&template, &s);
        let out = s.cli(&["erase", COMPANY, "--reason", "x", "--retention", rules.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let full = t.elapsed();
    let mut rng = seed();
    let (mut done, mut not_started) = (0, 0);
    for _ in 0..30 {
        let s = Scratch::new();
        copy_scratch(&template, &s);
        spawn_and_kill(
            s.cli_cmd(&["erase", COMPANY, "--reason", "x", "--retention", rules.to_str().unwrap()]),
            full,
            &mut rng,
        );

        let ledger = s.open();
        match ledger.erasure(subject).unwrap() {
            Some(_) => {
                done += 1;
                assert!(ledger.read_stream(subject, 0, usize::MAX).map(|e| e.is_empty()).unwrap_or(true));
                assert!(ledger.view("customer", subject).map(|d| d.is_none()).unwrap_or(true));
            }
            None => {
                not_started += 1;
                assert_eq!(ledger.read_stream(subject, 0, usize::MAX).unwrap(), subject_events);
                assert!(ledger.view("customer", subject).unwrap().is_some());
            }
        }
        assert_eq!(ledger.read_stream(witness, 0, usize::MAX).unwrap(), witness_events);
        assert!(ledger.view("customer", witness).unwrap().is_some());
        drop(ledger);
        let out = s.cli(&["verify"]);
        assert!(out.status.success(), "{}", stdout(&out));
        // A second erase (the operator retrying) completes it either way.
        let out = s.cli(&["erase", COMPANY, "--reason", "x", "--retention", rules.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(Keyring::Dir(s.keyring()).generations().unwrap().len(), 1);
    }
    eprintln!("30 kills: {done} erasures done, {not_started} not started (uninterrupted erase: {full:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restriction_blocks_staff_reads_and_non_corrections() {
    let app = App::new();
    let (staff, dpo) = (app.login("staff").await, app.login("dpo").await);
    let s = Uuid::new_v4();
    let note = json!({"events": [{"type": "note.added", "data": {"text": "hi"}}]});
    assert_eq!(
        app.call(Method::POST, &format!("/v1/subjects/{s}/events"), Some(&staff), Some(note.clone())).await.status,
        201
    );
    let r = app.call(Method::POST, &format!("/v1/subjects/{s}/restrict"), Some(&dpo), None).await;
    assert_eq!(r.status, 200, "{}", r.body);

    let r = app.call(Method::GET, &format!("/v1/subjects/{s}/events"), Some(&staff), None).await;
    assert_eq!((r.status.as_u16(), r.body["error"].as_str()), (403, Some("restricted")));
    let r = app.call(Method::GET, &format!("/v1/views/customer/{s}"), Some(&staff), None).await;
    assert_eq!(r.status, 403);
    let r = app.call(Method::POST, &format!("/v1/subjects/{s}/events"), Some(&staff), Some(note.clone())).await;
    assert_eq!((r.status.as_u16(), r.body["error"].as_str()), (403, Some("restricted")));
    // A correction is allowed.
    let fix = json!({"events": [{"type": "customer.contact_changed", "data": {"email": "new@example.com"}}]});
    assert_eq!(app.call(Method::POST, &format!("/v1/subjects/{s}/events"), Some(&staff), Some(fix)).await.status, 201);
    // The dpo still reads.
    assert_eq!(app.call(Method::GET, &format!("/v1/subjects/{s}/events"), Some(&dpo), None).await.status, 200);
    // Pages of many subjects withhold it from staff too: the feed shows its events without
    // data, a view's list leaves it out. The dpo sees both.
    let id = s.to_string();
    let events = app.feed_of(&staff, &id).await;
    assert_eq!(events.len(), 2, "{events:?}");
    for e in &events {
        assert_eq!(e["restricted"], true, "{e}");
        assert!(e.get("data").is_none() && e.get("occurred_at").is_none(), "{e}");
    }
    assert!(!app.view_lists(&staff, "customer", &id).await);
    let events = app.feed_of(&dpo, &id).await;
    assert!(events.len() == 2 && events.iter().all(|e| e["data"].is_object() && e.get("restricted").is_none()));
    assert!(app.view_lists(&dpo, "customer", &id).await);
    // Each refusal is in the trail once, the pages' included.
    let trail = app.audit(&format!("subject={s}&actor=staff")).await;
    let denied = |action: &str| trail.iter().filter(|e| e["action"] == action && e["outcome"] == "denied").count();
    assert_eq!((denied("read"), denied("view")), (2, 2), "{trail:?}");

    assert_eq!(app.call(Method::POST, &format!("/v1/subjects/{s}/unrestrict"), Some(&dpo), None).await.status, 200);
    assert_eq!(app.call(Method::GET, &format!("/v1/subjects/{s}/events"), Some(&staff), None).await.status, 200);
    assert_eq!(app.call(Method::POST, &format!("/v1/subjects/{s}/events"), Some(&staff), Some(note)).await.status, 201);
    let unknown = Uuid::new_v4();
    assert_eq!(app.call(Method::POST, &format!("/v1/subjects/{unknown}/restrict"), Some(&dpo), None).await.status, 404);
}
