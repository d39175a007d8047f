//! The register extract (GDPR Art. 15 / Art. 20): exactly one subject's data and nothing else,
//! superseded values marked, valid against its JSON Schema, importable into a fresh ledger, and
//! rendered as a self-contained page where every value is escaped.

use std::collections::BTreeSet;
use std::path::Path;

use pdledger::audit::{Action, Entry, Outcome};
use pdledger::export::{self, Extract};
use pdledger::ledger::Ledger;
use pdledger::schema::Category;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::*;

const NOW_MS: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

fn extract_schema() -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/export/extract.v1.json");
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    jsonschema::options().should_validate_formats(true).build(&schema).unwrap()
}

fn schema_errors(v: &jsonschema::Validator, doc: &Value) -> Vec<String> {
    v.iter_errors(doc).map(|e| format!("{} at `{}`", e, e.instance_path().as_str())).collect()
}

fn subject_of(line: &Value) -> Uuid {
    line["subject"].as_str().unwrap().parse().unwrap()
}

/// The first subject of the sample with a contact change that replaces the email, phone and
/// address given at registration, invoices and notes; with its lines.
fn customer_with_history(sample: &[Value]) -> (Uuid, Vec<Value>) {
    let mut seen = BTreeSet::new();
    for line in sample {
        let subject = subject_of(line);
        if !seen.insert(subject) {
            continue;
        }
        let lines: Vec<Value> = sample.iter().filter(|l| subject_of(l) == subject).cloned().collect();
        let has = |t: &str| lines.iter().any(|l| l["type"] == t);
        let registered = &lines[0]["data"];
        let changes_all = lines.iter().any(|l| {
            l["type"] == "customer.contact_changed"
                && ["email", "phone", "address"].iter().all(|f| l["data"].get(f).is_some_and(|v| *v != registered[f]))
        });
        if lines[0]["type"] == "customer.registered" && changes_all && has("invoice.issued") && has("note.added") {
            return (subject, lines);
        }
    }
    panic!("the sample has no customer with a contact change, invoices and notes");
}

fn append(ledger: &Ledger, subject: Uuid, event_type: &str, occurred_at: &str, data: Value) {
    let ev = ledger.prepare(event_type, Some(occurred_at), data).unwrap();
    ledger.append(subject, None, vec![ev], "staff1").unwrap();
}

fn audit(ledger: &Ledger, actor: &str, action: Action, subject: Uuid) {
    ledger.submit(vec![Entry::new(action, Some(subject), Outcome::Ok).into_op(actor)]).unwrap();
}

fn person(name: &str, email: &str) -> Value {
    json!({
        "kind": "person",
        "name": name,
        "personal_number": "19810615-1502",
        "email": email,
        "phone": "0345-58 73 78",
        "address": {"street": "Backtorget 40", "postal_code": "20987", "city": "Karlskrona"}
    })
}

/// The imported sample register: one customer's extract holds exactly that customer's events,
/// byte for byte, marks the contact details the change replaced, has the current view and the
/// customer's categories, no trace of any other subject, and validates against its schema.
#[test]
fn extract_holds_exactly_one_subject() {
    let s = Scratch::new();
    let out = s.cli(&["import", sample_path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sample = sample();
    let (subject, lines) = customer_with_history(&sample);
    let other = subject_of(sample.iter().find(|l| subject_of(l) != subject).unwrap());
    let ledger = s.open();
    audit(&ledger, "staff1", Action::Read, subject);
    audit(&ledger, "staff2", Action::Read, other);
    audit(&ledger, "staff1", Action::View, subject);

    let x = export::extract(&ledger, subject, NOW_MS).unwrap();
    assert_eq!(x.format, export::FORMAT);
    assert_eq!(x.subject, subject);
    assert_eq!(x.generated_at, "2026-01-01T00:00:00.000Z");
    let (head, hash) = ledger.head().unwrap();
    assert_eq!((x.ledger_head.position, x.ledger_head.hash.as_str()), (head, hash.to_hex().as_str()));
    assert_eq!(x.pending(), None);

    // Exactly the subject's events, in order, data byte-equal to the file's.
    assert_eq!(x.events.len(), lines.len());
    for (i, (e, l)) in x.events.iter().zip(&lines).enumerate() {
        assert_eq!(e.version, i as u64 + 1);
        assert_eq!(e.event_type, l["type"].as_str().unwrap());
        assert_eq!(e.occurred_at, l["occurred_at"].as_str().unwrap());
        assert_eq!(serde_json::to_string(&e.data).unwrap(), serde_json::to_string(&l["data"]).unwrap());
        assert_eq!(e.category, ledger.schemas().current(&e.event_type).unwrap().category);
    }

    // The registration's email, phone and address were replaced; its name was not.
    let registration = &x.events[0];
    assert_eq!(registration.event_type, "customer.registered");
    for f in ["email", "phone", "address"] {
        assert!(registration.superseded_fields.iter().any(|s| s == f), "{f}: {:?}", registration.superseded_fields);
    }
    for f in ["kind", "name"] {
        assert!(!registration.superseded_fields.iter().any(|s| s == f), "{f}");
    }
    // The last change of each contact detail is current; notes and invoices supersede nothing.
    let last_change = x.events.iter().rev().find(|e| e.event_type == "customer.contact_changed").unwrap();
    assert!(last_change.superseded_fields.is_empty(), "{:?}", last_change.superseded_fields);
    for e in x.events.iter().filter(|e| ["note.added", "invoice.issued"].contains(&e.event_type.as_str())) {
        assert!(e.superseded_fields.is_empty(), "{} {:?}", e.event_type, e.superseded_fields);
    }

    // The current register card shows the changed email.
    let card = &x.current.get("customer").expect("current.customer").data;
    let latest_email = x
        .events
        .iter()
        .rev()
        .find_map(|e| (e.event_type.starts_with("customer.")).then(|| e.data.get("email")).flatten())
        .unwrap();
    assert_eq!(&card["email"], latest_email);
    assert!(x.current.contains_key("billing"));

    // Categories: exactly the subject's, each with a purpose per event type of the subject.
    let expected: BTreeSet<Category> = x.events.iter().map(|e| e.category).collect();
    let got: Vec<Category> = x.categories.iter().map(|c| c.category).collect();
    assert_eq!(got, expected.into_iter().collect::<Vec<_>>());
    for c in &x.categories {
        let types: BTreeSet<&str> =
            x.events.iter().filter(|e| e.category == c.category).map(|e| e.event_type.as_str()).collect();
        let declared: BTreeSet<&str> = c.purposes.iter().map(|p| p.event_type.as_str()).collect();
        assert_eq!(declared, types);
        assert!(c.purposes.iter().all(|p| !p.purpose.is_empty() && p.legal_basis.starts_with("GDPR Art. 6(1)")));
        assert!(!c.retention.en.is_empty() && !c.retention.sv.is_empty() && !c.recipients.is_empty());
    }
    let billing = x.categories.iter().find(|c| c.category == Category::Billing).unwrap();
    assert!(billing.retention.legal_reference.as_deref().unwrap().contains("Bokföringslagen"));
    assert_eq!(x.labels["customer.registered"].fields["/email"].sv, "E-post");

    // The access history: this subject's entries only, newest first, down to the import that
    // put its data there.
    let actions: Vec<(Action, &str)> = x.access_history.iter().map(|a| (a.action, a.actor.as_str())).collect();
    assert_eq!(actions, vec![(Action::View, "staff1"), (Action::Read, "staff1"), (Action::Append, "import")]);
    assert!(x.access_history.iter().all(|a| a.subject == Some(subject)));
    assert!(!x.access_history_truncated);

    // Nothing about any other subject: no other id anywhere in the document.
    let text = serde_json::to_string(&x).unwrap();
    let others: BTreeSet<Uuid> = sample.iter().map(subject_of).filter(|s| *s != subject).collect();
    assert_eq!(others.len(), 999);
    for o in &others {
        assert!(!text.contains(&o.to_string()), "the extract mentions subject {o}");
    }

    // Valid against the published schema, and a JSON round trip gives the same extract.
    let doc = serde_json::to_value(&x).unwrap();
    let validator = extract_schema();
    assert_eq!(schema_errors(&validator, &doc), Vec::<String>::new());
    assert_eq!(serde_json::from_value::<Extract>(doc.clone()).unwrap(), x);
    // The schema is strict where it says so.
    let mut extra = doc.clone();
    extra["surprise"] = json!(1);
    assert!(!validator.is_valid(&extra));
    let mut extra = doc.clone();
    extra["events"][0]["note"] = json!("x");
    assert!(!validator.is_valid(&extra));
    let mut missing = doc.clone();
    missing.as_object_mut().unwrap().remove("access_history");
    assert!(!validator.is_valid(&missing));
    let mut wrong = doc;
    wrong["events"][0]["category"] = json!("health");
    assert!(!validator.is_valid(&wrong));
}

/// Art. 20: the extract's events, as JSON Lines, import into a fresh ledger and read back the
/// same (type, occurred_at, data).
#[test]
fn extract_round_trips_through_import() {
    let sample = sample();
    let (subject, lines) = customer_with_history(&sample);
    let source = Scratch::new();
    let input: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let out = source.cli(&["import", source.write("subject.jsonl", &input).to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let original = {
        let ledger = source.open();
        // One more event recorded without a date: its occurred_at is a full timestamp.
        let ev = ledger.prepare("note.added", None, json!({"text": "Ringde <om> ritningarna & \"fasaden\""})).unwrap();
        ledger.append(subject, None, vec![ev], "staff1").unwrap();
        export::extract(&ledger, subject, NOW_MS).unwrap()
    };
    assert_eq!(original.events.len(), lines.len() + 1);

    let jsonl: String = export::events_for_import(&original).map(|v| format!("{v}\n")).collect();
    let first: Value = serde_json::from_str(jsonl.lines().next().unwrap()).unwrap();
    let keys: Vec<&str> = first.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["subject", "type", "occurred_at", "data"]);

    let fresh = Scratch::new();
    let file = fresh.write("extract.jsonl", &jsonl);
    let out = fresh.cli(&["import", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ledger = fresh.open();
    let copy = ledger.read_stream(subject, 0, usize::MAX).unwrap();
    assert_eq!(copy.len(), original.events.len());
    for (c, o) in copy.iter().zip(&original.events) {
        assert_eq!(c.event_type, o.event_type);
        assert_eq!(c.occurred_at, o.occurred_at);
        assert_eq!(serde_json::to_string(&c.data).unwrap(), serde_json::to_string(&o.data).unwrap());
    }
    // And the copy's extract tells the same story.
    let again = export::extract(&ledger, subject, NOW_MS).unwrap();
    let current = |x: &Extract| x.current.iter().map(|(k, v)| (k.clone(), v.data.clone())).collect::<Vec<_>>();
    assert_eq!(current(&again), current(&original));
    let superseded = |x: &Extract| x.events.iter().map(|e| e.superseded_fields.clone()).collect::<Vec<_>>();
    assert_eq!(superseded(&again), superseded(&original));
}

/// The page: every value escaped, no script, no external resource, Swedish and English.
#[test]
fn html_escapes_everything_and_runs_nothing() {
    let s = Scratch::new();
    let ledger = s.open();
    let subject = Uuid::new_v4();
    let name = r#"<script>alert("x")</script> & 'Ö'"#;
    append(&ledger, subject, "customer.registered", "2024-03-01", person(name, "a@example.org"));
    append(&ledger, subject, "customer.contact_changed", "2024-04-01", json!({"email": "b@example.org"}));
    append(&ledger, subject, "note.added", "2024-04-02", json!({"text": "\"><img src=x onerror=alert(1)>"}));
    append(
        &ledger,
        subject,
        "invoice.issued",
        "2024-05-01",
        json!({
            "invoice_number": "20240001", "project_id": "P2024-1", "issued_on": "2024-05-01",
            "due_on": "2024-05-31", "currency": "SEK",
            "lines": [{"description": "Arkitekttjänster", "hours": 25, "amount_ore": 2_750_000}],
            "net_ore": 2_750_000, "vat_ore": 687_500, "total_ore": 3_437_500,
            "billing_address": {"street": "Backtorget 40", "postal_code": "20987", "city": "Karlskrona"}
        }),
    );
    audit(&ledger, "staff1", Action::Read, subject);
    let x = export::extract(&ledger, subject, NOW_MS).unwrap();
    let html = export::to_html(&x, ledger.schemas());

    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("<html lang=\"sv\">"));
    assert!(html.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;Ö&#39;"), "{html}");
    assert!(!html.contains(name));
    assert!(!html.to_ascii_lowercase().contains("<script"), "{html}");
    assert!(!html.contains("<img"));
    assert!(html.contains("&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"));
    // Headings in both languages.
    for text in [
        "Registerutdrag",
        "Register extract",
        "Aktuella uppgifter",
        "Current data",
        "Historik",
        "History",
        "Åtkomsthistorik",
        "Access history",
        "Lagringstid",
        "Retention",
        "Namn",
        "Name",
    ] {
        assert!(html.contains(text), "missing {text}");
    }
    // Amounts also in kronor; the replaced email marked.
    assert!(html.contains("3\u{a0}437\u{a0}500\u{a0}öre (34\u{a0}375,00\u{a0}kr)"), "{html}");
    assert!(html.contains("ersatt av senare uppgift"));
    assert!(html.contains("Bokföringslagen (1999:1078) 7 kap. 2 §"));
    // Self-contained: one inline <style>, nothing fetched from anywhere.
    assert_eq!(html.matches("<style>").count(), 1);
    for needle in ["<link", "src=\"", "href=", "url(", "@import", "http://", "https://", "<iframe", "<object"] {
        assert!(!html.to_ascii_lowercase().contains(needle), "the page contains {needle}");
    }
    // Every attribute value is one of the page's own constants: nothing from the data.
    let allowed = [
        "sv",
        "en",
        "utf-8",
        "Content-Security-Policy",
        "default-src 'none'; style-src 'unsafe-inline'",
        "viewport",
        "width=device-width, initial-scale=1",
        "robots",
        "noindex",
        "lead",
        "note",
        "events",
        "meta",
        "superseded",
    ];
    let mut rest = html.as_str();
    while let Some(i) = rest.find("=\"") {
        let after = &rest[i + 2..];
        let end = after.find('"').unwrap();
        assert!(allowed.contains(&&after[..end]), "attribute value {:?}", &after[..end]);
        rest = &after[end + 1..];
    }
}

/// Reads of the subject show up in its access history, newest first, and nobody else's.
#[test]
fn access_history_lists_the_reads() {
    let s = Scratch::new();
    let ledger = s.open();
    let (subject, other) = (Uuid::new_v4(), Uuid::new_v4());
    append(&ledger, subject, "customer.registered", "2024-03-01", person("Erik Eriksson", "e@example.org"));
    append(&ledger, other, "customer.registered", "2024-03-02", person("Anna Andersson", "a@example.org"));
    let before = export::extract(&ledger, subject, NOW_MS).unwrap();
    assert!(before.access_history.iter().all(|a| a.action != Action::Read));

    audit(&ledger, "staff1", Action::Read, subject);
    audit(&ledger, "staff2", Action::Read, other);
    audit(&ledger, "staff1", Action::View, subject);
    ledger.submit(vec![Entry::new(Action::Read, Some(subject), Outcome::Denied).into_op("service1")]).unwrap();
    audit(&ledger, "dpo1", Action::Export, subject);

    let x = export::extract(&ledger, subject, NOW_MS).unwrap();
    let got: Vec<(Action, &str, Outcome)> = x
        .access_history
        .iter()
        .filter(|a| a.position > before.ledger_head.position)
        .map(|a| (a.action, a.actor.as_str(), a.outcome))
        .collect();
    assert_eq!(
        got,
        vec![
            (Action::Export, "dpo1", Outcome::Ok),
            (Action::Read, "service1", Outcome::Denied),
            (Action::View, "staff1", Outcome::Ok),
            (Action::Read, "staff1", Outcome::Ok),
        ]
    );
    assert!(x.access_history.windows(2).all(|w| w[0].position > w[1].position), "newest first");
    assert!(x.access_history.iter().all(|a| a.subject == Some(subject)));
    assert!(x.access_history.iter().all(|a| a.actor != "staff2"));
    assert_eq!(schema_errors(&extract_schema(), &serde_json::to_value(&x).unwrap()), Vec::<String>::new());

    let html = export::to_html(&x, ledger.schemas());
    assert!(html.contains("dpo1") && html.contains("service1"));
    assert!(html.contains("Läsning av händelser") && html.contains("nekad"));
    assert!(!html.contains("staff2") && !html.contains("Anna Andersson"));

    // An unknown subject: an extract with nothing in it.
    let nobody = export::extract(&ledger, Uuid::new_v4(), NOW_MS).unwrap();
    assert!(nobody.events.is_empty() && nobody.current.is_empty() && nobody.categories.is_empty());
    assert!(nobody.access_history.is_empty());
    assert_eq!(schema_errors(&extract_schema(), &serde_json::to_value(&nobody).unwrap()), Vec::<String>::new());
}
