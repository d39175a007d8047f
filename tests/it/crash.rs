//! Kill -9 of the real server under the soak's mixed load, round after round on one data
//! directory (`PDLEDGER_CRASH_ROUNDS`, default 20; the seed is printed and taken back from
//! `PDLEDGER_TEST_SEED`). After every kill: the chain verifies, the head covers every
//! acknowledged position, and through the restarted server every append acknowledged in the
//! round reads back as acknowledged, every append without an answer is there wholly or not at
//! all, every acknowledged erasure answers 410. At the end, after a clean restart and the
//! rotation it runs: every acknowledged append ever, every other customer's stream as
//! imported plus exactly the notes appended to it, every erasure complete with no key, view
//! or index entry left, one keyring generation, no erased customer's value anywhere in the
//! data directory or keyring, and the copy taken before the load no longer opens.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pdledger::keyring::Keyring;
use pdledger::ledger::{Ledger, OpenOptions, StoredEvent};
use pdledger::lookup::LookupKey;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::http::PASSWORD;
use crate::server::{Client, NoAnswer, Server};
use crate::support::*;

/// What became of a request that changes the ledger.
#[derive(Clone, Debug, PartialEq)]
enum Answer {
    /// Answered 2xx, with the positions it reported.
    Acked(Vec<u64>),
    /// The connection broke after it was made: done wholly or not at all.
    Unknown,
    /// Refused: answered otherwise, or the connection was never made. Not done.
    NotDone,
}

fn answer(result: &Result<(u16, Value), NoAnswer>, ok: u16, positions: impl Fn(&Value) -> Vec<u64>) -> Answer {
    match result {
        Ok((status, body)) if *status == ok => Answer::Acked(positions(body)),
        Ok(_) | Err(NoAnswer::Refused(_)) => Answer::NotDone,
        Err(NoAnswer::Broken(_)) => Answer::Unknown,
    }
}

#[derive(Clone, Debug)]
struct Append {
    round: usize,
    subject: Uuid,
    texts: Vec<String>,
    answer: Answer,
}

#[derive(Clone, Debug)]
struct Erase {
    round: usize,
    customer: Customer,
    answer: Answer,
}

#[derive(Clone, Debug)]
struct Customer {
    subject: Uuid,
    email: String,
}

/// What one round's load shares between its tasks.
struct Load {
    round: usize,
    client: Client,
    staff: String,
    dpo: String,
    auditor: String,
    /// Customers never erased: read, looked up, exported, appended to.
    live: Arc<Vec<Customer>>,
    /// Customers to erase, in the seed's order.
    to_erase: Arc<Mutex<Vec<Customer>>>,
    /// Erased in an earlier round: they answer 410.
    erased: Vec<Uuid>,
    stop: AtomicBool,
    requests: AtomicU64,
    appends: Mutex<Vec<Append>>,
    erasures: Mutex<Vec<Erase>>,
    /// Answers the mix does not expect (a 5xx, a read refused): the test fails on any.
    unexpected: Mutex<Vec<String>>,
    /// Told when an erasure is acknowledged (its rotation is then due after the delay).
    erasure_acked: tokio::sync::Notify,
}

impl Load {
    fn pick<'a, T>(rng: &mut u64, from: &'a [T]) -> &'a T {
        &from[(next_random(rng) % from.len() as u64) as usize]
    }

    fn unexpected(&self, what: String) {
        self.unexpected.lock().unwrap().push(format!("round {}: {what}", self.round));
    }
}

/// Appends, reads, views, lookups, exports, the audit trail, the feed and wrong-password
/// logins, as staff, dpo and auditor, until the server is gone.
async fn mixed(load: Arc<Load>, worker: usize, mut rng: u64) {
    let mut n = 0;
    while !load.stop.load(Ordering::Relaxed) {
        n += 1;
        let c = Load::pick(&mut rng, &load.live).clone();
        let choice = next_random(&mut rng) % 12;
        if choice < 3 {
            // A new subject or a live customer; one to three notes, all or nothing.
            let subject = if next_random(&mut rng).is_multiple_of(2) { Uuid::new_v4() } else { c.subject };
            let texts: Vec<String> = (0..1 + next_random(&mut rng) % 3)
                .map(|j| format!("crash note r{} w{worker} n{n} e{j}", load.round))
                .collect();
            let events: Vec<Value> = texts.iter().map(|t| json!({"type": "note.added", "data": {"text": t}})).collect();
            let path = format!("/v1/subjects/{subject}/events");
            let r = load.client.try_call("POST", &path, Some(&load.staff), Some(json!({"events": events}))).await;
            let a =
                answer(&r, 201, |b| b["positions"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap()).collect());
            if let Ok((status, body)) = &r {
                if *status != 201 {
                    load.unexpected(format!("POST {path}: {status} {body}"));
                }
            }
            load.appends.lock().unwrap().push(Append { round: load.round, subject, texts, answer: a });
            load.requests.fetch_add(1, Ordering::Relaxed);
            if r.is_err() {
                return;
            }
            continue;
        }
        let s = c.subject;
        let (method, path, token, body, expect) = match choice {
            3 => ("GET", format!("/v1/subjects/{s}/events"), &load.staff, None, 200),
            4 => ("GET", format!("/v1/views/customer/{s}"), &load.staff, None, 200),
            5 => ("POST", "/v1/subjects/lookup".to_owned(), &load.staff, Some(json!({"email": c.email})), 200),
            6 => ("GET", "/v1/views/billing?limit=20".to_owned(), &load.staff, None, 200),
            7 => ("GET", format!("/v1/subjects/{s}/export"), &load.dpo, None, 200),
            8 => ("GET", "/v1/audit?limit=50".to_owned(), &load.auditor, None, 200),
            9 => (
                "POST",
                "/v1/auth/login".to_owned(),
                &load.staff,
                Some(json!({"username": "clerk", "password": "not the password at all"})),
                401,
            ),
            10 => ("GET", "/v1/events?limit=20".to_owned(), &load.staff, None, 200),
            _ if !load.erased.is_empty() => {
                let e = Load::pick(&mut rng, &load.erased);
                ("GET", format!("/v1/subjects/{e}/events"), &load.staff, None, 410)
            }
            _ => ("GET", format!("/v1/subjects?email={}", c.email.replace('@', "%40")), &load.staff, None, 200),
        };
        let token = (path != "/v1/auth/login").then_some(token.as_str());
        match load.client.try_call(method, &path, token, body).await {
            // A wrong password past the limit is answered 429 (locked out) instead of 401.
            Ok((status, _)) if status == expect || (expect == 401 && status == 429) => {}
            Ok((status, r)) => load.unexpected(format!("{method} {path}: {status} {r}")),
            Err(_) => return,
        }
        load.requests.fetch_add(1, Ordering::Relaxed);
    }
}

/// Erasures as dpo, a few a second, until the server is gone.
async fn eraser(load: Arc<Load>, mut rng: u64) {
    loop {
        // Pacing: an erasure now and then, not synchronisation.
        tokio::time::sleep(Duration::from_millis(100 + next_random(&mut rng) % 500)).await;
        if load.stop.load(Ordering::Relaxed) {
            return;
        }
        let Some(customer) = load.to_erase.lock().unwrap().pop() else { return };
        let path = format!("/v1/subjects/{}/erase", customer.subject);
        let r = load.client.try_call("POST", &path, Some(&load.dpo), Some(json!({"reason": "crash test"}))).await;
        let a = answer(&r, 200, |b| vec![b["position"].as_u64().unwrap()]);
        if let Ok((status, body)) = &r {
            if *status != 200 || body["subject"] != customer.subject.to_string() {
                load.unexpected(format!("POST {path}: {status} {body}"));
            }
        }
        if matches!(a, Answer::Acked(_)) {
            load.erasure_acked.notify_one();
        }
        load.erasures.lock().unwrap().push(Erase { round: load.round, customer, answer: a });
        load.requests.fetch_add(1, Ordering::Relaxed);
        if r.is_err() {
            return;
        }
    }
}

/// The notes found in a stream read over HTTP: text -> position.
fn notes(events: &Value) -> HashMap<String, u64> {
    events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "note.added")
        .filter_map(|e| Some((e["data"]["text"].as_str()?.to_owned(), e["position"].as_u64()?)))
        .collect()
}

/// Whether an append's notes are there as its answer allows: acknowledged ones at their
/// positions, unanswered ones wholly or not at all, refused ones not at all. Returns whether
/// they are there.
fn check_append(a: &Append, found: &HashMap<String, u64>, when: &str) -> bool {
    let present: Vec<Option<u64>> = a.texts.iter().map(|t| found.get(t).copied()).collect();
    let count = present.iter().filter(|p| p.is_some()).count();
    match &a.answer {
        Answer::Acked(positions) => {
            let want: Vec<Option<u64>> = positions.iter().map(|p| Some(*p)).collect();
            assert_eq!(present, want, "{when}: acknowledged append lost or moved: {a:?}");
        }
        Answer::Unknown => assert!(count == 0 || count == a.texts.len(), "{when}: half an append is there: {a:?}"),
        Answer::NotDone => assert_eq!(count, 0, "{when}: a refused append is there: {a:?}"),
    }
    count > 0
}

/// What the checks after each restart have established so far.
#[derive(Default)]
struct Known {
    /// Erased: acknowledged, or unanswered and found done.
    erased: Vec<Customer>,
    /// An erasure unanswered or refused and found not done: the customer must be intact.
    spared: Vec<Customer>,
    tally: Tally,
}

/// Counters for the summary line.
#[derive(Default, Debug)]
struct Tally {
    acked_appends: usize,
    acked_events: usize,
    unknown_present: usize,
    unknown_absent: usize,
    acked_erasures: usize,
    unknown_erased: usize,
    unknown_not_erased: usize,
    mid_rotation: usize,
}

/// Through the restarted server: the previous round's appends and erasures as their answers
/// allow, and every erasure so far still in force.
async fn check_restart(
    client: &Client,
    staff: &str,
    round: usize,
    appends: &[Append],
    erasures: &[Erase],
    known: &mut Known,
) {
    let Known { erased, spared, tally } = known;
    let when = format!("after kill {}", round + 1);
    let mut by_subject: BTreeMap<Uuid, Vec<&Append>> = BTreeMap::new();
    for a in appends.iter().filter(|a| a.round == round) {
        by_subject.entry(a.subject).or_default().push(a);
    }
    for (subject, list) in by_subject {
        let (status, r) = client.call("GET", &format!("/v1/subjects/{subject}/events"), Some(staff), None).await;
        // A new subject whose only append was not done does not exist.
        let found = if status == 404 { HashMap::new() } else { notes(&r["events"]) };
        assert!(status == 200 || (status == 404 && found.is_empty()), "{when}: {subject}: {status} {r}");
        for a in list {
            let there = check_append(a, &found, &when);
            match a.answer {
                Answer::Acked(ref p) => {
                    tally.acked_appends += 1;
                    tally.acked_events += p.len();
                }
                Answer::Unknown if there => tally.unknown_present += 1,
                Answer::Unknown => tally.unknown_absent += 1,
                Answer::NotDone => {}
            }
        }
    }
    let mut fresh = vec![];
    for e in erasures.iter().filter(|e| e.round == round) {
        let path = format!("/v1/subjects/{}/events", e.customer.subject);
        let (status, r) = client.call("GET", &path, Some(staff), None).await;
        match (&e.answer, status) {
            (Answer::Acked(_), 410) => tally.acked_erasures += 1,
            (Answer::Unknown, 410) => tally.unknown_erased += 1,
            (Answer::Unknown | Answer::NotDone, 200) => {
                tally.unknown_not_erased += matches!(e.answer, Answer::Unknown) as usize;
                spared.push(e.customer.clone());
                continue;
            }
            _ => panic!("{when}: erasure {:?}: {path} answers {status} {r}", e.answer),
        }
        assert_eq!(r["error"], "erased", "{when}: {r}");
        erased.push(e.customer.clone());
        fresh.push(e.customer.clone());
    }
    // Every erasure so far: gone from reads; the newest also from views and lookups.
    for c in erased.iter() {
        let (status, r) = client.call("GET", &format!("/v1/subjects/{}/events", c.subject), Some(staff), None).await;
        assert_eq!(status, 410, "{when}: erased {} reads back: {r}", c.subject);
    }
    for c in &fresh {
        let (status, _) = client.call("GET", &format!("/v1/views/customer/{}", c.subject), Some(staff), None).await;
        assert_eq!(status, 410, "{when}: erased {}'s view", c.subject);
        let (status, r) =
            client.call("POST", "/v1/subjects/lookup", Some(staff), Some(json!({"email": c.email}))).await;
        // Not found (the sample has customers sharing an email: those still are).
        let found = r["subjects"].as_array().unwrap().contains(&json!(c.subject));
        assert!(status == 200 && !found, "{when}: erased {} is found: {status} {r}", c.subject);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_mixed_load_loses_no_acknowledged_append_or_erasure() {
    let rounds: usize = std::env::var("PDLEDGER_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let started = Instant::now();
    let mut rng = seed().max(1);
    let s = Scratch::new();
    let out = s.cli(&["import", sample_path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    for (u, role) in [("clerk", "staff"), ("privacy", "dpo"), ("checker", "auditor")] {
        let out = s.cli_cmd(&["user", "add", u, "--role", role]).env("PDLEDGER_PASSWORD", PASSWORD).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // Erasures shred every category, so that nothing of an erased customer may remain.
    let rules = shred_all_rules(&s);
    const ROTATE_DELAY_MS: u64 = 200;
    let delay = ROTATE_DELAY_MS.to_string();
    let args = ["--plain-http", "--rotate-delay-ms", &delay, "--retention", rules.to_str().unwrap()];

    let register = sample();
    let mut customers: Vec<Customer> = register
        .iter()
        .filter(|e| e["type"] == "customer.registered")
        .map(|e| Customer {
            subject: e["subject"].as_str().unwrap().parse().unwrap(),
            email: e["data"]["email"].as_str().unwrap().to_owned(),
        })
        .collect();
    for i in (1..customers.len()).rev() {
        customers.swap(i, (next_random(&mut rng) % (i as u64 + 1)) as usize);
    }
    let live = Arc::new(customers.split_off(customers.len() / 4));
    let pool = customers.len();
    let to_erase = Arc::new(Mutex::new(customers));
    let originals: HashMap<Uuid, Vec<StoredEvent>> = {
        let ledger = s.open();
        let mut subjects: Vec<Uuid> =
            register.iter().map(|e| e["subject"].as_str().unwrap().parse().unwrap()).collect();
        subjects.sort();
        subjects.dedup();
        subjects.into_iter().map(|x| (x, ledger.read_stream(x, 0, usize::MAX).unwrap())).collect()
    };
    // The data directory before any erasure: afterwards today's keyring must not open it.
    let before = s.root.path().join("before");
    copy_dir(&s.data(), &before);

    let mut appends: Vec<Append> = vec![];
    let mut erasures: Vec<Erase> = vec![];
    let mut known = Known::default();
    let mut requests = 0;
    let mut max_acked = 0;
    for round in 0..=rounds {
        let server = Server::start(&s, &args);
        let client = Client::new(&server, &s.data());
        let staff = client.login("clerk", PASSWORD).await;
        if round > 0 {
            check_restart(&client, &staff, round - 1, &appends, &erasures, &mut known).await;
        }
        if round == rounds {
            // The last start is left to finish its rotation and stop cleanly.
            let dpo = client.login("privacy", PASSWORD).await;
            let deadline = Instant::now() + Duration::from_secs(60);
            for e in erasures.iter().filter(|e| known.erased.iter().any(|c| c.subject == e.customer.subject)) {
                let path = format!("/v1/subjects/{}/erase", e.customer.subject);
                loop {
                    let (status, r) = client.call("POST", &path, Some(&dpo), Some(json!({"reason": "again"}))).await;
                    assert_eq!(status, 200, "{r}");
                    if let Answer::Acked(p) = &e.answer {
                        assert_eq!(r["position"].as_u64(), Some(p[0]), "the receipt changed: {r}");
                    }
                    if r["receipt"]["rotation"] == "complete" {
                        break;
                    }
                    assert!(Instant::now() < deadline, "the rotation after restart never completed: {r}");
                    tokio::time::sleep(Duration::from_millis(100)).await; // polling a condition
                }
            }
            let status = server.stop();
            assert!(status.success(), "{status:?}");
            break;
        }
        let load = Arc::new(Load {
            round,
            staff,
            dpo: client.login("privacy", PASSWORD).await,
            auditor: client.login("checker", PASSWORD).await,
            client,
            live: live.clone(),
            to_erase: to_erase.clone(),
            erased: known.erased.iter().map(|c| c.subject).collect(),
            stop: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            appends: Mutex::new(vec![]),
            erasures: Mutex::new(vec![]),
            unexpected: Mutex::new(vec![]),
            erasure_acked: tokio::sync::Notify::new(),
        });
        let mut tasks = vec![];
        for worker in 0..6 {
            tasks.push(tokio::spawn(mixed(load.clone(), worker, next_random(&mut rng) | 1)));
        }
        tasks.push(tokio::spawn(eraser(load.clone(), next_random(&mut rng) | 1)));
        // The fault, at a moment the seed chooses: in two rounds of three anywhere in the
        // first two seconds of load; in the third, within the key rotation that follows the
        // first acknowledged erasure (it starts after the delay and takes 100-300 ms here).
        if next_random(&mut rng).is_multiple_of(3) {
            let _ = tokio::time::timeout(Duration::from_secs(3), load.erasure_acked.notified()).await;
            let ms = ROTATE_DELAY_MS + next_random(&mut rng) % 250;
            tokio::time::sleep(Duration::from_millis(ms)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(200 + next_random(&mut rng) % 1800)).await;
        }
        server.signal(libc::SIGKILL);
        load.stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        let unexpected = load.unexpected.lock().unwrap();
        assert!(unexpected.is_empty(), "{} unexpected answers, first: {:?}", unexpected.len(), unexpected.first());
        requests += load.requests.load(Ordering::Relaxed);
        appends.extend(load.appends.lock().unwrap().drain(..));
        erasures.extend(load.erasures.lock().unwrap().drain(..));
        for p in appends.iter().filter_map(|a| match &a.answer {
            Answer::Acked(p) => p.iter().max(),
            _ => None,
        }) {
            max_acked = max_acked.max(*p);
        }
        for e in &erasures {
            if let Answer::Acked(p) = &e.answer {
                max_acked = max_acked.max(p[0]);
            }
        }

        // The state the kill left, before anything opens it to recover. Two keyring
        // generations: the kill fell inside a key rotation.
        if Keyring::Dir(s.keyring()).generations().unwrap().len() > 1 {
            known.tally.mid_rotation += 1;
        }
        let out = s.cli(&["verify", "--json"]);
        assert!(out.status.success(), "after kill {}: {}{}", round + 1, stdout(&out), stderr(&out));
        let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
        let head = report["head"]["position"].as_u64().unwrap();
        assert!(head >= max_acked, "after kill {}: head {head} is short of acknowledged {max_acked}", round + 1);
    }

    // Everything, from the library.
    let Known { erased, spared, tally } = known;
    let ledger = s.open();
    let mut by_subject: HashMap<Uuid, Vec<&Append>> = HashMap::new();
    for a in &appends {
        by_subject.entry(a.subject).or_default().push(a);
    }
    let erased_ids: Vec<Uuid> = erased.iter().map(|c| c.subject).collect();
    let mut notes_found = 0;
    let mut check_stream = |subject: Uuid, list: &[&Append]| {
        let stream = ledger.read_stream(subject, 0, usize::MAX).unwrap();
        let original = originals.get(&subject).map(Vec::as_slice).unwrap_or(&[]);
        assert_eq!(&stream[..original.len().min(stream.len())], original, "{subject}: imported events changed");
        let mut found = HashMap::new();
        for e in &stream[original.len()..] {
            assert_eq!(e.event_type, "note.added", "{subject}: an event nobody appended: {e:?}");
            let text = e.data["text"].as_str().unwrap().to_owned();
            assert!(list.iter().any(|a| a.texts.contains(&text)), "{subject}: a note nobody appended: {text}");
            assert!(found.insert(text, e.position).is_none(), "{subject}: a note twice: {e:?}");
        }
        for a in list {
            check_append(a, &found, "at the end");
        }
        notes_found += found.len();
    };
    for (subject, list) in &by_subject {
        check_stream(*subject, list);
    }
    for subject in originals.keys().filter(|x| !by_subject.contains_key(x) && !erased_ids.contains(x)) {
        check_stream(*subject, &[]);
    }
    for c in &erased {
        let e = ledger.erasure(c.subject).unwrap().unwrap_or_else(|| panic!("{} is not erased", c.subject));
        assert!(e.complete, "{}: {e:?}", c.subject);
        assert!(ledger.read_stream(c.subject, 0, usize::MAX).map(|e| e.is_empty()).unwrap_or(true));
        for v in ledger.projections().views() {
            assert!(ledger.view(v.name(), c.subject).map(|d| d.is_none()).unwrap_or(true), "{}", v.name());
        }
        assert!(!ledger.lookup(LookupKey::Email, &c.email, 10).unwrap().contains(&c.subject));
        assert!(ledger.store().key_categories(c.subject).unwrap().is_empty(), "{}: keys left", c.subject);
    }
    for c in &spared {
        assert!(ledger.erasure(c.subject).unwrap().is_none());
        assert!(ledger.view("customer", c.subject).unwrap().is_some());
    }
    drop(ledger);
    let out = s.cli(&["verify"]);
    assert!(out.status.success(), "{}", stdout(&out));
    let keyring = Keyring::Dir(s.keyring());
    assert_eq!(keyring.generations().unwrap().len(), 1, "an old generation is left");
    let mut o = OpenOptions::new(before, Keyring::Dir(s.keyring()), "test");
    o.rebuild_views = false;
    assert!(erased.is_empty() || Ledger::open(o).is_err(), "the copy from before the erasures still opens");
    let mine: Vec<Value> =
        register.iter().filter(|e| erased_ids.iter().any(|x| e["subject"] == x.to_string())).cloned().collect();
    let values = known_values(&mine, usize::MAX);
    let hits = scan(&[&s.data(), &s.keyring()], &values);
    assert!(hits.is_empty(), "an erased customer's value is on disk: {:?}", &hits[..hits.len().min(5)]);

    eprintln!(
        "crash: {rounds} kills ({} inside a key rotation) in {:.0} s, {requests} requests; {} acknowledged appends ({} events), {} erasures \
         ({} acknowledged, {} unanswered but done; {} unanswered and not done); unanswered appends: {} there, {} \
         not; {notes_found} notes at the end; {} personal values of the erased scanned for; 0 lost",
        tally.mid_rotation,
        started.elapsed().as_secs_f64(),
        tally.acked_appends,
        tally.acked_events,
        erased.len(),
        tally.acked_erasures,
        tally.unknown_erased,
        tally.unknown_not_erased,
        tally.unknown_present,
        tally.unknown_absent,
        values.len(),
    );
    assert!(tally.acked_appends > 10 * rounds, "too little load to prove anything: {tally:?}");
    assert!(erased.len() >= (rounds / 2).min(pool), "too few erasures to prove anything: {tally:?}");
}
