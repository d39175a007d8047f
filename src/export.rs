//! The register extract: everything the ledger holds about one data subject (GDPR Art. 15,
//! right of access), in a form the subject can take elsewhere (Art. 20, portability).
//!
//! Three faces of one [`Extract`]:
//! - the JSON document itself (`serde`), described field by field by the JSON Schema
//!   `schemas/export/extract.v1.json`; its field names are stable within [`FORMAT`];
//! - [`to_html`]: a self-contained bilingual (Swedish/English) page for a person to read;
//! - [`events_for_import`]: the subject's events as the JSON Lines `pdledger import` reads, so
//!   the data can be loaded into another ledger.
//!
//! The extract is a snapshot at `ledger_head`: events and audit entries after it are left out.
//! Callers check erasure and existence first (the API answers 410 and 404); for an unknown
//! subject [`extract`] returns an extract with no events. It never holds anything about another
//! subject: events are read from the subject's own stream and the audit trail through the
//! subject's index (and filtered by subject once more).
//!
//! # Which values are current (Art. 16): `superseded_fields`
//!
//! Each event lists the top-level fields of its `data` whose value a later event of the same
//! subject replaced. The rule follows the views (`projections/`), which define what the current
//! data is: a field of an event is *superseded* when a later event of the subject wrote over a
//! value a view took from that field, or removed it. So `customer.registered`'s `email` is
//! superseded by a later `customer.contact_changed` carrying `email`, and an earlier drawing
//! revision's `file_name` by a newer revision of the same drawing (the drawing's list of
//! revisions keeps the old one, but its current revision is the new one). A later event that
//! states the same value again supersedes the earlier statement too: the current value now
//! comes from it. A second note or invoice supersedes nothing (it is added beside the first),
//! nor do amounts a view adds up; fields that select which element an event updates (an
//! invoice number, a project id, a consent's purpose) identify and are never superseded; fields
//! no view shows (invoice lines, a billing address) are records of what happened, never
//! superseded.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::audit::{self, Action, Outcome};
use crate::ledger::{Ledger, ReadError, StoredEvent};
use crate::projection::{EventRef, Projections, View};
use crate::record::{self, Position};
use crate::schema::{Category, EventSchema, Label, Schemas};
use crate::store::StoreError;

/// The extract's format name and version, its `format` field.
pub const FORMAT: &str = "pdledger.extract.v1";
/// Most audit entries in `access_history` (newest first); `access_history_truncated` says when
/// there were more.
pub const ACCESS_HISTORY_MAX: usize = 10_000;
/// Most audit-index entries read while collecting the access history.
const AUDIT_SCAN_MAX: usize = 1_000_000;

/// A data subject's register extract. See the module documentation and
/// `schemas/export/extract.v1.json`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Extract {
    /// Always [`FORMAT`].
    pub format: String,
    pub subject: Uuid,
    /// RFC 3339, UTC.
    pub generated_at: String,
    /// The durable head of the log the extract was made at: everything in it is as of here.
    pub ledger_head: Head,
    /// Every readable event of the subject, in stream-version order.
    pub events: Vec<Event>,
    /// The subject's current view documents, by view name.
    pub current: BTreeMap<String, Current>,
    /// Per data category the subject has events in: purposes, legal basis, retention, recipients.
    pub categories: Vec<CategoryInfo>,
    /// Audit entries about the subject: who read or changed its data, newest first.
    pub access_history: Vec<Access>,
    /// True when there were more than [`ACCESS_HISTORY_MAX`] entries (the oldest are left out).
    pub access_history_truncated: bool,
    /// Labels of the event types in `events` and of their fields, by event type.
    pub labels: BTreeMap<String, TypeLabels>,
    /// When the subject was erased but a retention rule keeps some categories: what is kept,
    /// why, and until when (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erasure: Option<ErasureOut>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ErasureOut {
    pub erased_at: String,
    pub retained: Vec<RetainedOut>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RetainedOut {
    pub category: String,
    pub until: String,
    pub shredded: bool,
    pub basis: Label,
    pub legal_reference: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Head {
    pub position: Position,
    /// The chain hash of the record at `position` (64 hex digits; zeros for an empty log).
    pub hash: String,
}

/// One event of the subject.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Event {
    pub version: u64,
    pub position: Position,
    #[serde(rename = "type")]
    pub event_type: String,
    pub schema_version: u16,
    /// As given when appended: `YYYY-MM-DD` or an RFC 3339 UTC time.
    pub occurred_at: String,
    pub recorded_at: String,
    /// The username that appended it.
    pub actor: String,
    /// The data category whose key sealed it.
    pub category: Category,
    pub data: Value,
    /// Top-level fields of `data` whose value a later event of the subject replaced: no longer
    /// current (the rule is in the module documentation). In the order of `data`.
    pub superseded_fields: Vec<String>,
}

/// A view document: the subject's current data as one view presents it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Current {
    /// The stream version of the last event the document reflects.
    pub version: u64,
    /// The log position of that event. Beyond `ledger_head` only while that event was still
    /// being made durable: see [`Extract::pending`].
    pub position: Position,
    pub data: Value,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CategoryInfo {
    pub category: Category,
    pub label: Label,
    /// One per event type of the subject in this category, by type.
    pub purposes: Vec<Purpose>,
    pub retention: Retention,
    pub recipients: Vec<Label>,
}

/// Why an event type's data is held, from the schema's `x-pdledger` annotation.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Purpose {
    pub event_type: String,
    pub label: Label,
    pub purpose: String,
    pub legal_basis: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Retention {
    pub en: String,
    pub sv: String,
    pub legal_reference: Option<String>,
}

/// An audit entry about the subject (the fields of [`audit::Line`]).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Access {
    pub position: Position,
    pub at: String,
    pub actor: String,
    pub action: Action,
    pub subject: Option<Uuid>,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl From<audit::Line> for Access {
    fn from(l: audit::Line) -> Access {
        Access {
            position: l.position,
            at: l.at,
            actor: l.actor,
            action: l.entry.action,
            subject: l.entry.subject,
            outcome: l.entry.outcome,
            request_id: l.entry.request_id,
            route: l.entry.route,
            target: l.entry.target,
        }
    }
}

/// An event type's label and its fields' labels (JSON pointer into `data` → label).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TypeLabels {
    pub label: Label,
    pub fields: BTreeMap<String, Label>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Audit(#[from] audit::QueryError),
    #[error("record at position {position} is damaged: {detail}")]
    Damaged { position: Position, detail: String },
}

impl From<StoreError> for ExportError {
    fn from(e: StoreError) -> ExportError {
        ExportError::Read(ReadError::Store(e))
    }
}

impl Extract {
    /// The position to wait for (`Ledger::wait_durable`) before extracting again, when a view
    /// document in `current` reflects an event that was not yet durable at `ledger_head`
    /// (appended while the extract was made); `None` when the extract is consistent.
    pub fn pending(&self) -> Option<Position> {
        self.current.values().map(|c| c.position).filter(|p| *p > self.ledger_head.position).max()
    }
}

fn label(en: &str, sv: &str) -> Label {
    Label { en: en.to_owned(), sv: sv.to_owned() }
}

// ---------------------------------------------------------------------------------------------
// Building the extract.

/// The subject's register extract under the shipped retention rules.
pub fn extract(ledger: &Ledger, subject: Uuid, generated_at_ms: u64) -> Result<Extract, ExportError> {
    extract_with_rules(ledger, &crate::retention::Rules::builtin(), subject, generated_at_ms)
}

/// The subject's register extract, as of the ledger's durable head. `generated_at_ms` is the
/// time to state as the extract's (ms since the epoch). Each category's name, recipients and
/// retention come from the retention rules (`schemas/retention/rules.json`).
pub fn extract_with_rules(
    ledger: &Ledger,
    rules: &crate::retention::Rules,
    subject: Uuid,
    generated_at_ms: u64,
) -> Result<Extract, ExportError> {
    let (head, head_hash) = ledger.head()?;
    let stored: Vec<StoredEvent> =
        ledger.read_stream(subject, 0, usize::MAX)?.into_iter().filter(|e| e.position <= head).collect();
    let superseded = superseded_fields(ledger.projections(), &stored);

    let schemas = ledger.schemas();
    let mut events = Vec::with_capacity(stored.len());
    // Event type → the schema versions its events were written under; by category.
    let mut types: BTreeMap<Category, BTreeMap<String, BTreeSet<u16>>> = BTreeMap::new();
    for (e, superseded_fields) in stored.into_iter().zip(superseded) {
        let category = category_of(ledger, e.position)?;
        types.entry(category).or_default().entry(e.event_type.clone()).or_default().insert(e.schema_version);
        events.push(Event {
            version: e.version,
            position: e.position,
            event_type: e.event_type,
            schema_version: e.schema_version,
            occurred_at: e.occurred_at,
            recorded_at: e.recorded_at,
            actor: e.actor,
            category,
            data: e.data,
            superseded_fields,
        });
    }

    let mut current = BTreeMap::new();
    for view in ledger.projections().views() {
        if let Some(doc) = ledger.view(view.name(), subject)? {
            current.insert(
                view.name().to_owned(),
                Current { version: doc.version, position: doc.position, data: doc.data },
            );
        }
    }

    let mut categories = vec![];
    let mut labels = BTreeMap::new();
    for (category, types) in &types {
        let d = rules.get(*category);
        let mut purposes = vec![];
        for (event_type, versions) in types {
            // What the controller declares now: the current schema's annotation.
            let declared = schemas.current(event_type);
            purposes.push(match declared {
                Some(s) => Purpose {
                    event_type: event_type.clone(),
                    label: s.label.clone(),
                    purpose: s.purpose.clone(),
                    legal_basis: s.legal_basis.clone(),
                },
                None => Purpose {
                    event_type: event_type.clone(),
                    label: label(event_type, event_type),
                    purpose: "Not declared: no schema for this event type is loaded.".into(),
                    legal_basis: "Not declared: no schema for this event type is loaded.".into(),
                },
            });
            // Labels of every version the subject's events use, the newest winning (the current
            // schema's when none of those versions is loaded).
            let mut used: Vec<&EventSchema> = versions.iter().filter_map(|v| schemas.get(event_type, *v)).collect();
            if used.is_empty() {
                used.extend(declared);
            }
            if let Some(newest) = used.last() {
                let mut fields = BTreeMap::new();
                for s in &used {
                    fields.extend(s.fields.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                labels.insert(event_type.clone(), TypeLabels { label: newest.label.clone(), fields });
            }
        }
        categories.push(CategoryInfo {
            category: *category,
            label: d.label.clone(),
            purposes,
            retention: Retention {
                en: d.basis.en.clone(),
                sv: d.basis.sv.clone(),
                legal_reference: Some(d.legal_reference.clone()),
            },
            recipients: d.recipients.clone(),
        });
    }

    let filter = audit::Filter { subject: Some(subject), ..Default::default() };
    let page = audit::query(ledger.store(), head, &filter, u64::MAX, ACCESS_HISTORY_MAX, AUDIT_SCAN_MAX)?;
    let access_history_truncated = page.next_cursor.is_some();
    let access_history =
        page.entries.into_iter().filter(|l| l.entry.subject == Some(subject)).map(Access::from).collect();

    Ok(Extract {
        format: FORMAT.to_owned(),
        subject,
        generated_at: crate::time::rfc3339(generated_at_ms),
        ledger_head: Head { position: head, hash: head_hash.to_hex() },
        events,
        current,
        categories,
        access_history,
        access_history_truncated,
        labels,
        erasure: ledger.erasure(subject)?.map(|e| ErasureOut {
            erased_at: e.erased_at,
            retained: e
                .retained
                .into_iter()
                .filter_map(|h| {
                    let c = Category::ALL.into_iter().find(|c| c.name() == h.category)?;
                    let r = rules.get(c);
                    Some(RetainedOut {
                        category: h.category,
                        until: h.until,
                        shredded: h.shredded,
                        basis: r.basis.clone(),
                        legal_reference: r.legal_reference.clone(),
                    })
                })
                .collect(),
        }),
    })
}

/// The data category of the record at `position`, from its clear header: the category whose
/// key sealed it.
fn category_of(ledger: &Ledger, position: Position) -> Result<Category, ExportError> {
    let damaged = |detail: String| ExportError::Damaged { position, detail };
    let bytes = ledger.store().record(position)?.ok_or_else(|| damaged("missing".into()))?;
    let rec = record::decode(&bytes).map_err(|e| damaged(e.to_string()))?;
    Category::from_u8(rec.header.category).ok_or_else(|| damaged(format!("unknown category {}", rec.header.category)))
}

/// The subject's events as `pdledger import` lines: `{"subject","type","occurred_at","data"}`,
/// in stream order. Import validates each against the *current* schema of its type.
pub fn events_for_import(extract: &Extract) -> impl Iterator<Item = Value> + '_ {
    extract.events.iter().map(|e| {
        let mut line = Map::new();
        line.insert("subject".into(), Value::String(extract.subject.to_string()));
        line.insert("type".into(), Value::String(e.event_type.clone()));
        line.insert("occurred_at".into(), Value::String(e.occurred_at.clone()));
        line.insert("data".into(), e.data.clone());
        Value::Object(line)
    })
}

// ---------------------------------------------------------------------------------------------
// Superseded fields (the rule is in the module documentation).

/// Starts a marker: never a prefix of data a person typed (it starts with NUL).
const MARK: &str = "\u{0}pdledger-mark:";

/// One marked leaf of an event's data.
struct Marker {
    event: usize,
    field: String,
    /// Copies of the leaf the event itself put into the view's document.
    placed: u32,
    /// Copies left in the final document.
    left: u32,
}

/// `v` with each string, number and boolean replaced by a numbered marker. Markers are
/// strings, so operations that add numbers up skip them: only copied values are found.
fn mark(v: &Value, event: usize, field: &str, markers: &mut Vec<Marker>) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), mark(v, event, field, markers))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(|v| mark(v, event, field, markers)).collect()),
        Value::Null => Value::Null,
        _ => {
            markers.push(Marker { event, field: field.to_owned(), placed: 0, left: 0 });
            Value::String(format!("{MARK}{}", markers.len() - 1))
        }
    }
}

/// Counts the markers in `v` into `count`.
fn count_marks(v: &Value, markers: &mut [Marker], count: fn(&mut Marker)) {
    match v {
        Value::String(s) => {
            if let Some(m) = s.strip_prefix(MARK).and_then(|n| n.parse::<usize>().ok()).and_then(|i| markers.get_mut(i))
            {
                count(m);
            }
        }
        Value::Object(m) => m.values().for_each(|v| count_marks(v, markers, count)),
        Value::Array(a) => a.iter().for_each(|v| count_marks(v, markers, count)),
        _ => {}
    }
}

/// Same objects with the same keys and arrays of the same lengths, all the way down; scalar
/// values may differ.
fn same_shape(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_shape(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same_shape(v, w)),
        (Value::Object(_) | Value::Array(_), _) | (_, Value::Object(_) | Value::Array(_)) => false,
        _ => true,
    }
}

/// Whether `field` selects an array element in `view` (`invoices[invoice_number=/invoice_number]`):
/// applying the event twice lands in the same element, applying it again with the field's
/// values changed makes another one. Such fields identify; they are never marked.
fn selects(view: &View, ev: &EventRef<'_>, data: &Value, field: &str) -> bool {
    let mut changed = data.clone();
    let mut scratch = vec![];
    changed[field] = mark(&data[field], 0, field, &mut scratch);
    let empty = || Value::Object(Map::new());
    let (mut twice, mut other) = (empty(), empty());
    view.apply(&mut twice, ev);
    view.apply(&mut twice, ev);
    view.apply(&mut other, ev);
    view.apply(&mut other, &EventRef { data: (&changed).into(), ..*ev });
    !same_shape(&twice, &other)
}

/// For each event, the top-level fields of its data that a later event superseded.
///
/// The events are replayed once through every view with each field's leaves replaced by
/// markers (fields that select array elements keep their values, so every event lands where it
/// really does). Applying an event to an empty document shows how many copies of each of its
/// markers it makes (operations depend on the event, not on the document, for that); a field
/// is superseded when the final document holds fewer. One replay: as costly as building the
/// views from the stream.
fn superseded_fields(projections: &Projections, events: &[StoredEvent]) -> Vec<Vec<String>> {
    let views = projections.views();
    let mut docs = vec![Value::Object(Map::new()); views.len()];
    let mut selectors: HashMap<(usize, &str, &str), bool> = HashMap::new();
    let mut markers: Vec<Marker> = vec![];
    for (i, e) in events.iter().enumerate() {
        let ev = e.as_event_ref();
        for (vi, view) in views.iter().enumerate().filter(|(_, v)| v.handles(&e.event_type)) {
            let Value::Object(fields) = &e.data else {
                view.apply(&mut docs[vi], &ev);
                continue;
            };
            let mut data = e.data.clone();
            for (field, value) in fields {
                let key = (vi, e.event_type.as_str(), field.as_str());
                if !*selectors.entry(key).or_insert_with(|| selects(view, &ev, &e.data, field)) {
                    data[field.as_str()] = mark(value, i, field, &mut markers);
                }
            }
            let marked = EventRef { data: (&data).into(), ..ev };
            let mut alone = Value::Object(Map::new());
            view.apply(&mut alone, &marked);
            count_marks(&alone, &mut markers, |m| m.placed += 1);
            view.apply(&mut docs[vi], &marked);
        }
    }
    for doc in &docs {
        count_marks(doc, &mut markers, |m| m.left += 1);
    }
    let mut gone: Vec<BTreeSet<&str>> = vec![BTreeSet::new(); events.len()];
    for m in markers.iter().filter(|m| m.left < m.placed) {
        gone[m.event].insert(&m.field);
    }
    events
        .iter()
        .zip(gone)
        .map(|(e, gone)| match &e.data {
            Value::Object(fields) => fields.keys().filter(|k| gone.contains(k.as_str())).cloned().collect(),
            _ => vec![],
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// HTML.

/// The one escape function: every value that goes into the page passes through it.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A Swedish label, then the English one (escaped).
fn bi(sv: &str, en: &str) -> String {
    if sv == en {
        esc(sv)
    } else {
        format!("{} <span class=\"en\" lang=\"en\">/ {}</span>", esc(sv), esc(en))
    }
}

fn bi_label(l: &Label) -> String {
    bi(&l.sv, &l.en)
}

/// `3437500` → `3 437 500` (no-break spaces between groups of three).
fn group_digits(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{a0}');
        }
        out.push(c);
    }
    out
}

/// `3437500` → `3 437 500 öre (34 375,00 kr)`.
fn ore_text(ore: i64) -> String {
    let sign = if ore < 0 { "-" } else { "" };
    let abs = ore.unsigned_abs();
    format!("{sign}{}\u{a0}öre ({sign}{},{:02}\u{a0}kr)", group_digits(abs), group_digits(abs / 100), abs % 100)
}

/// Labels of keys in view documents and nested objects that are not top-level event fields.
const KEY_LABELS: &[(&str, &str, &str)] = &[
    ("street", "Gatuadress", "Street"),
    ("postal_code", "Postnummer", "Postal code"),
    ("city", "Ort", "City"),
    ("description", "Beskrivning", "Description"),
    ("hours", "Timmar", "Hours"),
    ("amount_ore", "Belopp (öre)", "Amount (öre)"),
    ("title", "Titel", "Title"),
    ("registered_on", "Registrerad", "Registered on"),
    ("contact_changed_on", "Kontaktuppgifter ändrade", "Contact details changed on"),
    ("consents", "Samtycken", "Consents"),
    ("given", "Lämnat", "Given"),
    ("changed_on", "Ändrat", "Changed on"),
    ("notes", "Anteckningar", "Notes"),
    ("on", "Datum", "Date"),
    ("invoices", "Fakturor", "Invoices"),
    ("totals", "Summor", "Totals"),
    ("invoice_count", "Antal fakturor", "Number of invoices"),
    ("invoiced_ore", "Fakturerat (öre)", "Invoiced (öre)"),
    ("paid_ore", "Betalt (öre)", "Paid (öre)"),
    ("unpaid_ore", "Obetalt (öre)", "Unpaid (öre)"),
    ("status", "Status", "Status"),
    ("projects", "Projekt", "Projects"),
    ("opened_on", "Öppnat", "Opened on"),
    ("drawings", "Ritningar", "Drawings"),
    ("revisions", "Revisioner", "Revisions"),
];

const VIEW_LABELS: &[(&str, &str, &str)] = &[
    ("customer", "Kunduppgifter", "Customer details"),
    ("projects", "Projekt", "Projects"),
    ("billing", "Fakturor och betalningar", "Invoices and payments"),
];

struct Page<'a> {
    extract: &'a Extract,
    schemas: &'a Schemas,
}

impl Page<'_> {
    /// The label of a key anywhere in a document: the table above, else the label of an event
    /// field of that name, else the key itself.
    fn key_label(&self, key: &str) -> String {
        if let Some((_, sv, en)) = KEY_LABELS.iter().find(|(k, _, _)| *k == key) {
            return bi(sv, en);
        }
        let pointer = pointer_of(key);
        match self.extract.labels.values().find_map(|t| t.fields.get(&pointer)) {
            Some(l) => bi_label(l),
            None => format!("<code>{}</code>", esc(key)),
        }
    }

    /// The label of a top-level field of an event: from the schema the event was written under,
    /// else the extract's labels, else as any key.
    fn field_label(&self, e: &Event, field: &str) -> String {
        let pointer = pointer_of(field);
        let from_schema = self.schemas.get(&e.event_type, e.schema_version).and_then(|s| s.fields.get(&pointer));
        match from_schema.or_else(|| self.extract.labels.get(&e.event_type).and_then(|t| t.fields.get(&pointer))) {
            Some(l) => bi_label(l),
            None => self.key_label(field),
        }
    }

    fn type_label(&self, event_type: &str, version: u16) -> String {
        let l = self.schemas.get(event_type, version).map(|s| &s.label);
        match l.or_else(|| self.extract.labels.get(event_type).map(|t| &t.label)) {
            Some(l) => bi_label(l),
            None => format!("<code>{}</code>", esc(event_type)),
        }
    }

    /// A value as HTML: objects as definition lists, arrays of objects as tables, other arrays
    /// as lists; amounts in öre also in kronor.
    fn value(&self, key: Option<&str>, v: &Value, out: &mut String) {
        match v {
            Value::Null => out.push('—'),
            Value::Bool(true) => out.push_str(&bi("ja", "yes")),
            Value::Bool(false) => out.push_str(&bi("nej", "no")),
            Value::Number(n) => match (key.is_some_and(|k| k.ends_with("_ore")), n.as_i64()) {
                (true, Some(ore)) => out.push_str(&esc(&ore_text(ore))),
                _ => out.push_str(&esc(&n.to_string())),
            },
            Value::String(s) => out.push_str(&esc(s)),
            Value::Array(a) if a.is_empty() => out.push('—'),
            Value::Array(a) if a.iter().all(Value::is_object) => {
                let mut columns: Vec<&str> = vec![];
                for item in a.iter().filter_map(Value::as_object) {
                    for k in item.keys() {
                        if !columns.contains(&k.as_str()) {
                            columns.push(k);
                        }
                    }
                }
                out.push_str("<table>\n<thead><tr>");
                for c in &columns {
                    let _ = write!(out, "<th>{}</th>", self.key_label(c));
                }
                out.push_str("</tr></thead>\n<tbody>\n");
                for item in a.iter().filter_map(Value::as_object) {
                    out.push_str("<tr>");
                    for c in &columns {
                        out.push_str("<td>");
                        match item.get(*c) {
                            Some(v) => self.value(Some(c), v, out),
                            None => out.push('—'),
                        }
                        out.push_str("</td>");
                    }
                    out.push_str("</tr>\n");
                }
                out.push_str("</tbody>\n</table>\n");
            }
            Value::Array(a) => {
                out.push_str("<ul>\n");
                for item in a {
                    out.push_str("<li>");
                    self.value(key, item, out);
                    out.push_str("</li>\n");
                }
                out.push_str("</ul>\n");
            }
            Value::Object(m) if m.is_empty() => out.push('—'),
            Value::Object(m) => {
                out.push_str("<dl>\n");
                for (k, v) in m {
                    let _ = write!(out, "<dt>{}</dt><dd>", self.key_label(k));
                    self.value(Some(k), v, out);
                    out.push_str("</dd>\n");
                }
                out.push_str("</dl>\n");
            }
        }
    }
}

fn pointer_of(key: &str) -> String {
    format!("/{}", key.replace('~', "~0").replace('/', "~1"))
}

fn action_label(a: Action) -> String {
    let (sv, en) = match a {
        Action::Read => ("Läsning av händelser", "Events read"),
        Action::View => ("Läsning av aktuella uppgifter", "Current data read"),
        Action::Append => ("Uppgifter tillagda", "Data added"),
        Action::Lookup => ("Sökning", "Lookup"),
        Action::Export => ("Registerutdrag", "Register extract"),
        Action::Erase => ("Radering", "Erasure"),
        Action::Restrict => ("Begränsning av behandling", "Processing restricted"),
        Action::Unrestrict => ("Begränsning hävd", "Restriction lifted"),
        Action::SubjectCreated => ("Registrerad skapad", "Data subject created"),
        Action::Denied => ("Nekad åtkomst", "Access denied"),
        other => return format!("<code>{}</code>", esc(&other.name())),
    };
    bi(sv, en)
}

fn outcome_label(o: Outcome) -> String {
    match o {
        Outcome::Ok => bi("genomförd", "done"),
        Outcome::Denied => bi("nekad", "denied"),
        Outcome::Failed => bi("misslyckad", "failed"),
    }
}

const STYLE: &str = "
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; max-width: 62rem;
       margin: 2rem auto; padding: 0 1rem; color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 1.8rem; margin-bottom: .25rem; }
h2 { font-size: 1.35rem; margin-top: 2.25rem; border-bottom: 2px solid #d0d0d0; padding-bottom: .2rem; }
h3 { font-size: 1.05rem; margin: 1.25rem 0 .35rem; }
.en { color: #595959; font-weight: normal; }
.lead, .note { color: #333; }
.note { font-size: .9rem; }
dl { display: grid; grid-template-columns: minmax(9rem, max-content) 1fr; gap: .2rem 1rem; margin: .4rem 0; }
dt { font-weight: 600; }
dd { margin: 0; overflow-wrap: anywhere; }
dd dl { margin: 0; }
table { border-collapse: collapse; width: 100%; margin: .4rem 0; font-size: .95rem; }
th, td { border: 1px solid #cfcfcf; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
ol.events { list-style: none; padding: 0; }
ol.events > li { border-left: 3px solid #8aa4c8; padding: .1rem 0 .1rem .9rem; margin-bottom: 1.1rem; }
.meta { font-size: .88rem; color: #444; margin: .1rem 0 .3rem; }
.superseded { display: inline-block; margin-left: .5rem; font-size: .8rem; color: #7a3e00;
              border: 1px solid #d9a066; border-radius: .2rem; padding: 0 .3rem; }
code { font-family: ui-monospace, 'SF Mono', Menlo, Consolas, monospace; font-size: .9em; overflow-wrap: anywhere; }
@media print { body { margin: 0; max-width: none; } h2 { break-after: avoid; } ol.events > li { break-inside: avoid; } }
";

/// The extract as one self-contained HTML page in Swedish and English: inline CSS only, no
/// script, no external resources (a Content-Security-Policy says so too), every value escaped.
/// `schemas` gives the labels of each event's own schema version.
pub fn to_html(extract: &Extract, schemas: &Schemas) -> String {
    let p = Page { extract, schemas };
    let mut h = String::with_capacity(32 * 1024 + 2048 * extract.events.len());
    h.push_str("<!DOCTYPE html>\n<html lang=\"sv\">\n<head>\n<meta charset=\"utf-8\">\n");
    h.push_str(
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n",
    );
    h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    h.push_str("<meta name=\"robots\" content=\"noindex\">\n");
    let _ = writeln!(h, "<title>Registerutdrag / Register extract {}</title>", esc(&extract.subject.to_string()));
    let _ = writeln!(h, "<style>{STYLE}</style>\n</head>\n<body>");
    let _ = writeln!(h, "<h1>{}</h1>", bi("Registerutdrag", "Register extract"));
    let _ = writeln!(
        h,
        "<p class=\"lead\">{}</p>",
        bi(
            "Det här är de personuppgifter vi behandlar om dig, varför vi behandlar dem, hur länge de sparas och vem som har tagit del av dem (dataskyddsförordningen, artikel 15).",
            "These are the personal data we process about you, why we process them, how long they are kept and who has accessed them (GDPR Article 15).",
        )
    );

    // Who and when.
    let _ = writeln!(h, "<section>\n<h2>{}</h2>\n<dl>", bi("Om utdraget", "About this extract"));
    let row = |h: &mut String, label: String, value: String| {
        let _ = writeln!(h, "<dt>{label}</dt><dd>{value}</dd>");
    };
    row(
        &mut h,
        bi("Registrerad (id)", "Data subject (id)"),
        format!("<code>{}</code>", esc(&extract.subject.to_string())),
    );
    row(&mut h, bi("Utdraget skapat", "Generated"), esc(&extract.generated_at));
    row(&mut h, bi("Antal händelser", "Number of events"), esc(&extract.events.len().to_string()));
    row(
        &mut h,
        bi("Loggens position och kontrollsumma", "Ledger position and hash"),
        format!("{} · <code>{}</code>", esc(&extract.ledger_head.position.to_string()), esc(&extract.ledger_head.hash)),
    );
    row(&mut h, bi("Format", "Format"), format!("<code>{}</code>", esc(&extract.format)));
    h.push_str("</dl>\n</section>\n");

    // Current data.
    let _ = writeln!(h, "<section>\n<h2>{}</h2>", bi("Aktuella uppgifter", "Current data"));
    if extract.current.is_empty() {
        let _ = writeln!(h, "<p>{}</p>", bi("Inga uppgifter.", "No data."));
    }
    // The register card first: the shipped views in the table's order, then any others by name.
    let mut views: Vec<(&String, &Current)> = extract.current.iter().collect();
    views.sort_by_key(|(name, _)| VIEW_LABELS.iter().position(|(n, _, _)| n == name).unwrap_or(VIEW_LABELS.len()));
    for (name, cur) in views {
        let title = match VIEW_LABELS.iter().find(|(n, _, _)| n == name) {
            Some((_, sv, en)) => bi(sv, en),
            None => format!("<code>{}</code>", esc(name)),
        };
        let _ = writeln!(h, "<h3>{title}</h3>");
        p.value(None, &cur.data, &mut h);
    }
    h.push_str("</section>\n");

    // History.
    let _ = writeln!(h, "<section>\n<h2>{}</h2>", bi("Historik", "History"));
    let _ = writeln!(
        h,
        "<p class=\"note\">{}</p>",
        bi(
            "Allt som registrerats om dig, i den ordning det registrerades. Uppgifter som senare ersatts är markerade.",
            "Everything recorded about you, in the order it was recorded. Values later replaced are marked.",
        )
    );
    if extract.events.is_empty() {
        let _ = writeln!(h, "<p>{}</p>", bi("Inga händelser.", "No events."));
    } else {
        h.push_str("<ol class=\"events\">\n");
        for e in &extract.events {
            let _ = writeln!(
                h,
                "<li>\n<h3>{} — {}</h3>",
                esc(&e.occurred_at),
                p.type_label(&e.event_type, e.schema_version)
            );
            let category = extract
                .categories
                .iter()
                .find(|c| c.category == e.category)
                .map(|c| (c.label.en.as_str(), c.label.sv.as_str()))
                .unwrap_or((e.category.name(), e.category.name()));
            let _ = writeln!(
                h,
                "<p class=\"meta\">{}: {} · {}: {} · {}: {} · {} {}</p>",
                bi("Kategori", "Category"),
                bi(category.1, category.0),
                bi("Registrerat", "Recorded"),
                esc(&e.recorded_at),
                bi("av", "by"),
                esc(&e.actor),
                bi("version", "version"),
                esc(&e.version.to_string()),
            );
            match &e.data {
                Value::Object(fields) => {
                    h.push_str("<dl>\n");
                    for (k, v) in fields {
                        let _ = write!(h, "<dt>{}</dt><dd>", p.field_label(e, k));
                        p.value(Some(k), v, &mut h);
                        if e.superseded_fields.iter().any(|f| f == k) {
                            let _ = write!(
                                h,
                                "<span class=\"superseded\">{}</span>",
                                bi("ersatt av senare uppgift", "replaced by a later entry")
                            );
                        }
                        h.push_str("</dd>\n");
                    }
                    h.push_str("</dl>\n");
                }
                other => p.value(None, other, &mut h),
            }
            h.push_str("</li>\n");
        }
        h.push_str("</ol>\n");
    }
    h.push_str("</section>\n");

    // An erasure that kept some categories by law: what, why, until when.
    if let Some(e) = &extract.erasure {
        let _ = writeln!(h, "<section>\n<h2>{}</h2>", bi("Radering", "Erasure"));
        let _ = writeln!(h, "<p>{} {}</p>", bi("Uppgifterna raderades", "The data was erased at"), esc(&e.erased_at));
        for r in &e.retained {
            let _ = writeln!(
                h,
                "<p>{}: {} — {} {} ({}) {}</p><p>{} <span class=\"en\" lang=\"en\">/ {}</span></p>",
                bi("Sparas enligt lag", "Kept by law"),
                esc(&r.category),
                bi("till", "until"),
                esc(&r.until),
                esc(&r.legal_reference),
                if r.shredded { bi("nu förstörd", "now shredded") } else { String::new() },
                esc(&r.basis.sv),
                esc(&r.basis.en)
            );
        }
        h.push_str("</section>\n");
    }

    // Categories, purposes, legal basis, retention, recipients.
    let _ = writeln!(
        h,
        "<section>\n<h2>{}</h2>",
        bi("Ändamål, rättslig grund, lagring och mottagare", "Purposes, legal basis, retention and recipients")
    );
    let _ = writeln!(
        h,
        "<p class=\"note\">{}</p>",
        bi(
            "Lagringstider och mottagare är den personuppgiftsansvariges standardangivelse för varje kategori.",
            "Retention periods and recipients are the controller's default declaration for each category.",
        )
    );
    for c in &extract.categories {
        let _ = writeln!(h, "<h3>{}</h3>", bi_label(&c.label));
        let _ = writeln!(
            h,
            "<table>\n<thead><tr><th>{}</th><th>{}</th><th>{}</th></tr></thead>\n<tbody>",
            bi("Uppgifter", "Data"),
            bi("Ändamål", "Purpose"),
            bi("Rättslig grund", "Legal basis"),
        );
        for pur in &c.purposes {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td lang=\"en\">{}</td><td lang=\"en\">{}</td></tr>",
                bi_label(&pur.label),
                esc(&pur.purpose),
                esc(&pur.legal_basis)
            );
        }
        h.push_str("</tbody>\n</table>\n<dl>\n");
        let _ = writeln!(
            h,
            "<dt>{}</dt><dd>{} <span class=\"en\" lang=\"en\">/ {}</span></dd>",
            bi("Lagringstid", "Retention"),
            esc(&c.retention.sv),
            esc(&c.retention.en)
        );
        if let Some(r) = &c.retention.legal_reference {
            let _ = writeln!(h, "<dt>{}</dt><dd>{}</dd>", bi("Lagrum", "Legal reference"), esc(r));
        }
        let _ = write!(h, "<dt>{}</dt><dd>", bi("Mottagare", "Recipients"));
        if c.recipients.is_empty() {
            h.push('—');
        } else {
            h.push_str("<ul>");
            for r in &c.recipients {
                let _ = write!(h, "<li>{}</li>", bi_label(r));
            }
            h.push_str("</ul>");
        }
        h.push_str("</dd>\n</dl>\n");
    }
    h.push_str("</section>\n");

    // Access history.
    let _ = writeln!(h, "<section>\n<h2>{}</h2>", bi("Åtkomsthistorik", "Access history"));
    if extract.access_history.is_empty() {
        let _ = writeln!(h, "<p>{}</p>", bi("Ingen registrerad åtkomst.", "No recorded access."));
    } else {
        let _ = writeln!(
            h,
            "<table>\n<thead><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr></thead>\n<tbody>",
            bi("Tid", "Time"),
            bi("Användare", "User"),
            bi("Åtgärd", "Action"),
            bi("Utfall", "Outcome"),
        );
        for a in &extract.access_history {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&a.at),
                esc(&a.actor),
                action_label(a.action),
                outcome_label(a.outcome)
            );
        }
        h.push_str("</tbody>\n</table>\n");
        if extract.access_history_truncated {
            let _ = writeln!(
                h,
                "<p class=\"note\">{}</p>",
                bi(
                    &format!("Endast de {ACCESS_HISTORY_MAX} senaste visas."),
                    &format!("Only the latest {ACCESS_HISTORY_MAX} are shown."),
                )
            );
        }
    }
    h.push_str("</section>\n");

    let _ = writeln!(
        h,
        "<footer>\n<p class=\"note\">{}</p>\n</footer>\n</body>\n</html>",
        bi(
            &format!("Utdraget finns också i maskinläsbar form (JSON, {FORMAT}) som kan föras över till en annan personuppgiftsansvarig (artikel 20)."),
            &format!("The extract is also available in machine-readable form (JSON, {FORMAT}) that can be transmitted to another controller (Article 20)."),
        )
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn escapes_the_five_characters() {
        assert_eq!(esc(r#"<a href="x">'&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
        assert_eq!(esc("Åsa Öberg"), "Åsa Öberg");
    }

    #[test]
    fn amounts_in_ore_and_kronor() {
        assert_eq!(ore_text(3_437_500), "3\u{a0}437\u{a0}500\u{a0}öre (34\u{a0}375,00\u{a0}kr)");
        assert_eq!(ore_text(5), "5\u{a0}öre (0,05\u{a0}kr)");
        assert_eq!(ore_text(-123_456), "-123\u{a0}456\u{a0}öre (-1\u{a0}234,56\u{a0}kr)");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1000), "1\u{a0}000");
    }

    fn ev(version: u64, event_type: &str, data: Value) -> StoredEvent {
        StoredEvent {
            position: version,
            subject: Uuid::nil(),
            version,
            event_type: event_type.into(),
            schema_version: 1,
            occurred_at: format!("2024-01-{version:02}"),
            recorded_at: "2024-01-01T00:00:00.000Z".into(),
            actor: "t".into(),
            data,
        }
    }

    #[test]
    fn superseded_follows_the_views() {
        let schemas = Schemas::builtin();
        let projections = Projections::builtin(&schemas).unwrap();
        let address = json!({"street": "Gatan 1", "postal_code": "11122", "city": "Ort"});
        let events = vec![
            ev(
                1,
                "customer.registered",
                json!({"kind": "person", "name": "A B", "personal_number": "19810615-1502",
                "email": "a@example.org", "phone": "08-1", "address": address}),
            ),
            ev(2, "consent.given", json!({"purpose": "newsletter", "channel": "email"})),
            ev(3, "customer.contact_changed", json!({"email": "b@example.org", "phone": "08-1"})),
            ev(4, "consent.withdrawn", json!({"purpose": "newsletter"})),
            ev(5, "consent.given", json!({"purpose": "newsletter", "channel": "sms"})),
            ev(6, "note.added", json!({"text": "one"})),
            ev(7, "note.added", json!({"text": "two"})),
            ev(
                8,
                "drawing.registered",
                json!({"project_id": "P1", "drawing_id": "A-1", "revision": "A",
                "title": "Plan", "file_name": "a.pdf", "content_hash": "00"}),
            ),
            ev(
                9,
                "drawing.registered",
                json!({"project_id": "P1", "drawing_id": "A-1", "revision": "B",
                "title": "Plan", "file_name": "b.pdf", "content_hash": "11"}),
            ),
            ev(10, "invoice.paid", json!({"invoice_number": "1", "paid_on": "2024-02-01", "amount_ore": 100})),
            ev(11, "invoice.paid", json!({"invoice_number": "1", "paid_on": "2024-03-01", "amount_ore": 100})),
        ];
        let s = superseded_fields(&projections, &events);
        // The later change carries the email and the phone (the same phone: it is now where the
        // current value comes from); the address and the name are the registration's.
        assert_eq!(s[0], vec!["email", "phone"]);
        // A new consent for the same purpose replaces the channel; the purpose identifies.
        assert_eq!(s[1], vec!["channel"]);
        assert!(s[2].is_empty() && s[3].is_empty() && s[4].is_empty());
        // Notes are added, not replaced.
        assert!(s[5].is_empty() && s[6].is_empty());
        // A new revision of the same drawing replaces the current revision's details.
        assert_eq!(s[7], vec!["revision", "title", "file_name", "content_hash"]);
        assert!(s[8].is_empty());
        // The payment date is replaced by the later payment's; amounts are added up, not replaced.
        assert_eq!(s[9], vec!["paid_on"]);
        assert!(s[10].is_empty());
    }

    #[test]
    fn each_detail_is_current_where_it_was_last_given() {
        let schemas = Schemas::builtin();
        let projections = Projections::builtin(&schemas).unwrap();
        let address = |street: &str| json!({"street": street, "postal_code": "11122", "city": "Ort"});
        let events = vec![
            ev(
                1,
                "customer.registered",
                json!({"kind": "company", "name": "AB", "org_number": "848987-2153",
                "contact_person": "C D", "email": "a@example.org", "phone": "08-1", "address": address("Gatan 1")}),
            ),
            ev(2, "customer.contact_changed", json!({"email": "b@example.org"})),
            ev(3, "customer.contact_changed", json!({"address": address("Gatan 2")})),
            ev(4, "customer.contact_changed", json!({"email": "c@example.org"})),
        ];
        let s = superseded_fields(&projections, &events);
        assert_eq!(s, vec![vec!["email", "address"], vec!["email"], vec![], vec![]]);
    }
}
