//! Views: declarative read models from `projections/`.
//!
//! Each `projections/<view>.json` says, per event type, which operations to apply to the view's
//! document (one JSON document per view and subject). This module parses the definitions,
//! checks them against the event schemas (every event type known, every pointer a declared
//! field, one data category per view) and applies an event to a document. It is pure: no store,
//! no keys. Whoever keeps the documents seals each under the subject's key for the view's
//! category. The format is described in `projections/README.md`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::json::Json;
use crate::schema::{Category, EventSchema, Schemas};

/// The views shipped in `projections/`, compiled in. A unit test checks this list against the
/// directory, so a view cannot be added there and forgotten here.
const BUILTIN: &[(&str, &str)] = &[
    ("billing.json", include_str!("../projections/billing.json")),
    ("customer.json", include_str!("../projections/customer.json")),
    ("projects.json", include_str!("../projections/projects.json")),
];

/// Domain of the fingerprint. Bump it when what `View::apply` does changes, so that stored
/// documents built by the old rules are rebuilt even though no definition changed.
const ENGINE: &str = "pdledger projections v1";

const OPERATIONS: [(&str, OpKind); 6] = [
    ("set", OpKind::Set),
    ("merge", OpKind::Merge),
    ("append", OpKind::Append),
    ("add", OpKind::Add),
    ("subtract", OpKind::Subtract),
    ("remove", OpKind::Remove),
];

const METAS: [(&str, Meta); 5] = [
    ("$occurred_at", Meta::OccurredAt),
    ("$recorded_at", Meta::RecordedAt),
    ("$type", Meta::Type),
    ("$version", Meta::Version),
    ("$position", Meta::Position),
];

/// A refused definition: `file:line: message`. `line` is 1-based; 0 for I/O errors.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ProjectionError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// One event as a view sees it: its type, its (decrypted) data and its metadata.
#[derive(Clone, Copy, Debug)]
pub struct EventRef<'a> {
    pub event_type: &'a str,
    pub data: EventData<'a>,
    pub occurred_at: &'a str,
    pub recorded_at: &'a str,
    pub version: u64,
    pub position: u64,
}

/// An event's data: a `Value` where the event is at hand as one (appends, extracts), or the
/// borrowed tree a rebuild parses each event into (`crate::json`). Views read both alike.
#[derive(Clone, Copy, Debug)]
pub enum EventData<'a> {
    Value(&'a Value),
    Json(&'a Json<'a>),
}

impl<'a> From<&'a Value> for EventData<'a> {
    fn from(v: &'a Value) -> EventData<'a> {
        EventData::Value(v)
    }
}

impl<'a> From<&'a Json<'a>> for EventData<'a> {
    fn from(j: &'a Json<'a>) -> EventData<'a> {
        EventData::Json(j)
    }
}

/// All view definitions, sorted by name.
#[derive(Debug)]
pub struct Projections {
    views: Vec<View>,
    /// For each event type, the views that consume it (index into `views`) and their rules:
    /// one lookup per event where asking each view would take one per view.
    consumers: HashMap<String, Vec<(usize, Ops)>>,
    /// Whether any operation reads `$recorded_at` (a rebuild formats it for each event only
    /// then).
    reads_recorded_at: bool,
}

/// One view's operations for one event type, shared by the view and `Projections::consumers`.
type Ops = Arc<[Op]>;

impl Projections {
    /// The shipped definitions, checked against `schemas`.
    pub fn builtin(schemas: &Schemas) -> Result<Projections, ProjectionError> {
        let files = BUILTIN.iter().map(|(name, text)| (format!("projections/{name}"), text.to_string()));
        Projections::from_files(files.collect(), schemas)
    }

    /// Loads every `*.json` in `dir` (other files, such as a README, are ignored).
    pub fn load_dir(dir: &Path, schemas: &Schemas) -> Result<Projections, ProjectionError> {
        let io = |path: &Path, e: std::io::Error| ProjectionError {
            file: path.display().to_string(),
            line: 0,
            message: e.to_string(),
        };
        let mut files = vec![];
        for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
            let path = entry.map_err(|e| io(dir, e))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
                files.push((path.display().to_string(), text));
            }
        }
        if files.is_empty() {
            let message = "no view definitions (`<view>.json`) found".to_owned();
            return Err(ProjectionError { file: dir.display().to_string(), line: 0, message });
        }
        files.sort();
        Projections::from_files(files, schemas)
    }

    /// `files` are (file name as shown in errors, text); the file stem is the view name.
    fn from_files(files: Vec<(String, String)>, schemas: &Schemas) -> Result<Projections, ProjectionError> {
        let mut views: Vec<View> = vec![];
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for (file, text) in &files {
            let stem = Path::new(file).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let view = parse_view(file, &stem, text, schemas)?;
            if let Some(first) = seen.insert(view.name.clone(), file.clone()) {
                return Err(ProjectionError {
                    file: file.clone(),
                    line: locate(text).line_of(&["view".into()]),
                    message: format!("view `{}` is already defined in {first}", view.name),
                });
            }
            views.push(view);
        }
        views.sort_by(|a, b| a.name.cmp(&b.name));
        let mut consumers: HashMap<String, Vec<(usize, Ops)>> = HashMap::new();
        for (i, view) in views.iter().enumerate() {
            for (event_type, ops) in &view.on {
                consumers.entry(event_type.clone()).or_default().push((i, ops.clone()));
            }
        }
        // Every source is written in the canonical form as its text, a selector's inside its
        // path: `$recorded_at` appears there wherever an operation reads it (and, harmlessly,
        // where a constant or a field name holds that text).
        let reads_recorded_at = views.iter().any(|v| v.canonical().to_string().contains("$recorded_at"));
        Ok(Projections { views, consumers, reads_recorded_at })
    }

    /// Whether any view reads the events' `$recorded_at`: where none does, a caller may leave
    /// `EventRef::recorded_at` empty rather than format it.
    pub fn reads_recorded_at(&self) -> bool {
        self.reads_recorded_at
    }

    pub fn views(&self) -> &[View] {
        &self.views
    }

    pub fn get(&self, name: &str) -> Option<&View> {
        self.views.binary_search_by(|v| v.name.as_str().cmp(name)).ok().and_then(|i| self.views.get(i))
    }

    /// blake3 over the canonical form of every definition, in name order. Whitespace, key order
    /// inside an operation, the order of event types and descriptions do not count; what an
    /// operation does, the order of operations and of template fields (it is the order of
    /// fields in the documents) and each view's category do.
    pub fn fingerprint(&self) -> [u8; 32] {
        let all = Value::Array(self.views.iter().map(View::canonical).collect());
        *blake3::Hasher::new_derive_key(ENGINE).update(all.to_string().as_bytes()).finalize().as_bytes()
    }

    /// Whether any view consumes events of this type.
    pub fn handles(&self, event_type: &str) -> bool {
        self.consumers.contains_key(event_type)
    }

    /// The views that consume events of this type, in view order: each one's index in
    /// `views()` and its rules for the type (`View::rules` of each, in one lookup).
    pub fn consumers(&self, event_type: &str) -> impl Iterator<Item = (usize, Rules<'_>)> {
        self.consumers.get(event_type).into_iter().flatten().map(|(i, ops)| (*i, Rules(ops)))
    }
}

/// One view: for each event type it consumes, the operations to apply, in order.
#[derive(Debug)]
pub struct View {
    name: String,
    description: String,
    category: Category,
    on: BTreeMap<String, Ops>,
}

impl View {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    /// The data category shared by all the view's event types: its documents are sealed under
    /// the subject's key for this category, so erasing the category erases the view too.
    pub fn category(&self) -> Category {
        self.category
    }

    /// The event types this view consumes, sorted.
    pub fn event_types(&self) -> impl Iterator<Item = &str> {
        self.on.keys().map(String::as_str)
    }

    pub fn handles(&self, event_type: &str) -> bool {
        self.on.contains_key(event_type)
    }

    /// Applies one event to the document (a new document starts as `Value::Object(empty)`).
    ///
    /// Returns false, leaving the document unchanged, when the view does not consume the event's
    /// type; true otherwise (even if every operation was skipped). Pure and deterministic: the
    /// same document and event always give the same document, field order included. Never
    /// fails: where the document's shape disagrees with an operation (a path runs through a
    /// string, `append` meets an object, the document itself is not an object), the offending
    /// value is replaced by the container the operation expects. Documents are only ever written
    /// by their view, so such a conflict means an old or damaged document; the view's rules win.
    pub fn apply(&self, doc: &mut Value, ev: &EventRef<'_>) -> bool {
        let Some(rules) = self.rules(ev.event_type) else { return false };
        rules.apply(doc, ev);
        true
    }

    /// The operations for one event type, or None when the view does not consume it: one
    /// lookup for a caller that must find (or create) the document before applying.
    pub fn rules(&self, event_type: &str) -> Option<Rules<'_>> {
        self.on.get(event_type).map(|ops| Rules(ops))
    }

    fn canonical(&self) -> Value {
        let on: Map<String, Value> =
            self.on.iter().map(|(t, ops)| (t.clone(), Value::Array(ops.iter().map(Op::canonical).collect()))).collect();
        let mut v = Map::new();
        v.insert("view".into(), self.name.clone().into());
        v.insert("category".into(), self.category.name().into());
        v.insert("on".into(), Value::Object(on));
        Value::Object(v)
    }
}

/// One view's operations for one event type (`View::rules`).
#[derive(Clone, Copy, Debug)]
pub struct Rules<'v>(&'v [Op]);

impl Rules<'_> {
    /// As `View::apply`, for an event of the type these rules are for.
    pub fn apply(&self, doc: &mut Value, ev: &EventRef<'_>) {
        for op in self.0 {
            op.apply(doc, ev);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Compiled definitions and how they apply.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpKind {
    Set,
    Merge,
    Append,
    Add,
    Subtract,
    Remove,
}

impl OpKind {
    fn name(self) -> &'static str {
        OPERATIONS.iter().find(|(_, k)| *k == self).map_or("?", |(n, _)| n)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Meta {
    OccurredAt,
    RecordedAt,
    Type,
    Version,
    Position,
}

/// Where a value comes from: a JSON pointer into the event's data, or its metadata.
#[derive(Debug)]
enum Source {
    Pointer(Pointer),
    Meta(Meta),
}

/// A JSON pointer (RFC 6901), split and unescaped once when the definition is parsed: it is
/// resolved for every event a rebuild applies, and `Value::pointer` would split and unescape it
/// (two allocations per token) every time. Resolves exactly as `Value::pointer` does.
#[derive(Debug)]
struct Pointer {
    text: String,
    tokens: Vec<String>,
}

impl Pointer {
    /// `text` starts with `/` (the parser checks).
    fn new(text: &str) -> Pointer {
        let tokens = text.split('/').skip(1).map(|t| t.replace("~1", "/").replace("~0", "~")).collect();
        Pointer { text: text.to_owned(), tokens }
    }

    fn get<'v>(&self, data: &'v Value) -> Option<&'v Value> {
        let mut cur = data;
        for token in &self.tokens {
            cur = match cur {
                Value::Object(m) => field(m, token)?,
                Value::Array(a) => a.get(array_index(token)?)?,
                _ => return None,
            };
        }
        Some(cur)
    }

    /// As `get`, in a borrowed tree.
    fn get_json<'j, 'a>(&self, data: &'j Json<'a>) -> Option<&'j Json<'a>> {
        let mut cur = data;
        for token in &self.tokens {
            cur = match cur {
                Json::Object(_) => cur.get(token)?,
                Json::Array(a) => a.get(array_index(token)?)?,
                _ => return None,
            };
        }
        Some(cur)
    }

    /// The value at the pointer in an event's data, as a `Value` of its own.
    fn resolve(&self, data: EventData<'_>) -> Option<Value> {
        match data {
            EventData::Value(v) => self.get(v).cloned(),
            EventData::Json(j) => self.get_json(j).map(Json::to_value),
        }
    }
}

/// Objects up to this many fields are searched by comparing keys, not by hashing the one
/// sought: events' and documents' objects are small, and SipHash costs more than a few
/// compares of short keys.
const SCAN_FIELDS_MAX: usize = 12;

/// `m.get(key)`, without hashing for a small object.
fn field<'m>(m: &'m Map<String, Value>, key: &str) -> Option<&'m Value> {
    if m.len() <= SCAN_FIELDS_MAX {
        m.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    } else {
        m.get(key)
    }
}

/// `m.get_mut(key)`, without hashing for a small object.
fn field_mut<'m>(m: &'m mut Map<String, Value>, key: &str) -> Option<&'m mut Value> {
    if m.len() <= SCAN_FIELDS_MAX {
        m.iter_mut().find(|(k, _)| *k == key).map(|(_, v)| v)
    } else {
        m.get_mut(key)
    }
}

/// `field_mut`, adding the field as null (last) when it is missing.
fn field_or_null<'m>(m: &'m mut Map<String, Value>, key: &str) -> &'m mut Value {
    if field(m, key).is_none() {
        m.insert(key.to_owned(), Value::Null);
    }
    field_mut(m, key).expect("present or inserted just above")
}

/// An array index as RFC 6901 writes it: digits, no sign, no leading zero.
fn array_index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.starts_with('0') && token.len() != 1) {
        return None;
    }
    token.parse().ok()
}

impl Source {
    /// None when the pointer does not resolve in this event's data ("absent").
    fn resolve(&self, ev: &EventRef<'_>) -> Option<Value> {
        match self {
            Source::Pointer(p) => p.resolve(ev.data),
            Source::Meta(m) => Some(match m {
                Meta::OccurredAt => ev.occurred_at.into(),
                Meta::RecordedAt => ev.recorded_at.into(),
                Meta::Type => ev.event_type.into(),
                Meta::Version => ev.version.into(),
                Meta::Position => ev.position.into(),
            }),
        }
    }

    fn text(&self) -> &str {
        match self {
            Source::Pointer(p) => &p.text,
            Source::Meta(m) => METAS.iter().find(|(_, k)| k == m).map_or("?", |(n, _)| n),
        }
    }
}

#[derive(Debug)]
enum Expr {
    Source(Source),
    Const(Value),
    /// Fields in definition order; a field whose expression is absent is left out.
    Template(Vec<(String, Expr)>),
}

impl Expr {
    fn eval(&self, ev: &EventRef<'_>) -> Option<Value> {
        match self {
            Expr::Source(s) => s.resolve(ev),
            Expr::Const(v) => Some(v.clone()),
            Expr::Template(fields) => {
                let mut object = Map::with_capacity(fields.len());
                for (k, e) in fields {
                    if let Some(v) = e.eval(ev) {
                        object.insert(k.clone(), v);
                    }
                }
                Some(Value::Object(object))
            }
        }
    }

    fn canonical(&self) -> Value {
        match self {
            Expr::Source(s) => s.text().into(),
            Expr::Const(v) => Value::Object(Map::from_iter([("const".to_owned(), v.clone())])),
            Expr::Template(fields) => Value::Object(fields.iter().map(|(k, e)| (k.clone(), e.canonical())).collect()),
        }
    }
}

/// `name` or `name[key=SEL]`: the field `name`, or in the array `name` the object whose `key`
/// equals SEL's value.
#[derive(Debug)]
struct Segment {
    name: String,
    select: Option<(String, Source)>,
}

#[derive(Debug)]
struct Op {
    kind: OpKind,
    /// The path as written (the parser accepts exactly one spelling of each path).
    text: String,
    path: Vec<Segment>,
    value: Option<Expr>,
    /// `append` only: the list keeps its newest `keep_last` elements (a bound on the document,
    /// which is rewritten whole by every event that touches it).
    keep_last: Option<usize>,
}

/// The largest `keep_last` a definition may give.
const KEEP_LAST_MAX: u64 = 10_000;

impl Op {
    fn canonical(&self) -> Value {
        let mut v = Map::new();
        v.insert(self.kind.name().into(), self.text.clone().into());
        if let Some(e) = &self.value {
            v.insert("value".into(), e.canonical());
        }
        if let Some(n) = self.keep_last {
            v.insert("keep_last".into(), n.into());
        }
        Value::Object(v)
    }

    fn apply(&self, doc: &mut Value, ev: &EventRef<'_>) {
        // Resolve everything the event supplies before touching the document, so that a
        // skipped operation leaves no trace (no half-created parents). `keys`: one per segment
        // when the path has a selector, else none (and no allocation).
        let mut keys = Vec::new();
        if self.path.iter().any(|seg| seg.select.is_some()) {
            keys.reserve_exact(self.path.len());
            for seg in &self.path {
                match &seg.select {
                    Some((_, sel)) => match sel.resolve(ev) {
                        Some(v) => keys.push(Some(v)),
                        None => return,
                    },
                    None => keys.push(None),
                }
            }
        }
        let value = match &self.value {
            Some(e) => match e.eval(ev) {
                Some(v) => v,
                None => return,
            },
            None => Value::Null,
        };
        match self.kind {
            OpKind::Remove => remove(doc, &self.path, &keys),
            OpKind::Set => *slot(doc, &self.path, &keys) = value,
            OpKind::Merge => {
                let target = object(slot(doc, &self.path, &keys));
                if let Value::Object(fields) = value {
                    for (k, v) in fields {
                        match field_mut(target, &k) {
                            Some(old) => *old = v, // an existing field keeps its place
                            None => {
                                target.insert(k, v);
                            }
                        }
                    }
                }
            }
            OpKind::Append => {
                let list = array(slot(doc, &self.path, &keys));
                list.push(value);
                if let Some(keep) = self.keep_last {
                    let excess = list.len().saturating_sub(keep);
                    list.drain(..excess);
                }
            }
            OpKind::Add | OpKind::Subtract => {
                let Some(n) = value.as_i64() else { return };
                let target = slot(doc, &self.path, &keys);
                let old = target.as_i64().unwrap_or(0);
                let new = if self.kind == OpKind::Add { old.saturating_add(n) } else { old.saturating_sub(n) };
                *target = new.into();
            }
        }
    }
}

/// The selector value of segment `i`: `keys` has one per segment, or none when the path has
/// no selector.
fn key_of(keys: &[Option<Value>], i: usize) -> Option<&Value> {
    keys.get(i).and_then(Option::as_ref)
}

/// The value at `path`, creating what is missing on the way (objects for fields, arrays and
/// upserted `{key: value}` elements for selectors) and replacing what has the wrong shape.
fn slot<'d>(doc: &'d mut Value, path: &[Segment], keys: &[Option<Value>]) -> &'d mut Value {
    let mut cur = doc;
    for (i, seg) in path.iter().enumerate() {
        // Not `entry`: it takes an owned key, an allocation for every field already there.
        let field = field_or_null(object(cur), &seg.name);
        cur = match (&seg.select, key_of(keys, i)) {
            (Some((k, _)), Some(want)) => {
                let list = array(field);
                let at = match list.iter().position(|e| selects(e, k, want)) {
                    Some(at) => at,
                    None => {
                        list.push(Value::Object(Map::from_iter([(k.clone(), want.clone())])));
                        list.len() - 1
                    }
                };
                &mut list[at]
            }
            _ => field,
        };
    }
    cur
}

/// Deletes the field or selected element at `path`; anything missing or of another shape on
/// the way means there is nothing to delete.
fn remove(doc: &mut Value, path: &[Segment], keys: &[Option<Value>]) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut cur = doc;
    for (i, seg) in parents.iter().enumerate() {
        let Some(field) = cur.get_mut(seg.name.as_str()) else { return };
        cur = match (&seg.select, key_of(keys, i)) {
            (Some((k, _)), Some(want)) => {
                match field.as_array_mut().and_then(|l| l.iter_mut().find(|e| selects(e, k, want))) {
                    Some(e) => e,
                    None => return,
                }
            }
            _ => field,
        };
    }
    let Some(obj) = cur.as_object_mut() else { return };
    match (&last.select, key_of(keys, parents.len())) {
        (Some((k, _)), Some(want)) => {
            if let Some(Value::Array(list)) = obj.get_mut(&last.name) {
                if let Some(i) = list.iter().position(|e| selects(e, k, want)) {
                    list.remove(i);
                }
            }
        }
        _ => {
            obj.shift_remove(&last.name);
        }
    }
}

/// Whether the list element `e` is an object whose field `key` equals `want` (`field`, not
/// `Value::get`: a selector looks at every element of the list it walks).
fn selects(e: &Value, key: &str, want: &Value) -> bool {
    e.as_object().and_then(|fields| field(fields, key)) == Some(want)
}

/// `v` as an object, replacing it with an empty one if it is anything else.
fn object(v: &mut Value) -> &mut Map<String, Value> {
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    match v {
        Value::Object(m) => m,
        _ => unreachable!("made an object just above"),
    }
}

/// `v` as an array, replacing it with an empty one if it is anything else.
fn array(v: &mut Value) -> &mut Vec<Value> {
    if !v.is_array() {
        *v = Value::Array(vec![]);
    }
    match v {
        Value::Array(a) => a,
        _ => unreachable!("made an array just above"),
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing and checking a definition.

/// Where in the definition a refusal points: keys and array indices from the root.
type At = [String];

fn at(base: &At, key: impl ToString) -> Vec<String> {
    let mut v = base.to_vec();
    v.push(key.to_string());
    v
}

struct Ctx<'a> {
    file: &'a str,
    spans: &'a Node,
}

impl Ctx<'_> {
    fn err(&self, at: &At, message: impl Into<String>) -> ProjectionError {
        ProjectionError { file: self.file.to_owned(), line: self.spans.line_of(at), message: message.into() }
    }
}

/// Parses one view definition, `text` of the file `file` whose stem is `stem`, against the
/// schemas. Public for the fuzz target `projection_def` (`fuzz/`).
pub fn parse_view(file: &str, stem: &str, text: &str, schemas: &Schemas) -> Result<View, ProjectionError> {
    let doc: Value = serde_json::from_str(text).map_err(|e| {
        // serde_json ends its message with the position; the line goes in front instead.
        let full = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let what = full.strip_suffix(&suffix).unwrap_or(&full);
        ProjectionError {
            file: file.to_owned(),
            line: e.line(),
            message: format!("not JSON: {what} (column {})", e.column()),
        }
    })?;
    let spans = locate(text);
    let cx = Ctx { file, spans: &spans };
    if let Some((line, key)) = spans.duplicate() {
        // serde_json would silently keep the last one, dropping e.g. a whole event type's rules.
        return Err(ProjectionError { file: file.to_owned(), line, message: format!("duplicate key `{key}`") });
    }
    let Value::Object(top) = &doc else {
        return Err(cx.err(&[], "a view definition is an object with `view`, `description` and `on`"));
    };
    if let Some(k) = top.keys().find(|k| !["view", "description", "on"].contains(&k.as_str())) {
        return Err(cx.err(&at(&[], k), format!("unknown key `{k}` (a definition has `view`, `description` and `on`)")));
    }
    let string = |key: &str| match top.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(cx.err(&at(&[], key), format!("`{key}` must be a string"))),
        None => Err(cx.err(&[], format!("missing `{key}`"))),
    };
    let name = string("view")?;
    let description = string("description")?;
    if !is_view_name(&name) {
        return Err(cx.err(&at(&[], "view"), format!("view name `{name}` must match [a-z][a-z0-9_]{{0,31}}")));
    }
    if name != stem {
        let message = format!("view `{name}` must be defined in `{name}.json` (the file name is the view name)");
        return Err(cx.err(&at(&[], "view"), message));
    }
    let on_at = at(&[], "on");
    let on = match top.get("on") {
        Some(Value::Object(on)) => on,
        Some(_) => return Err(cx.err(&on_at, "`on` must be an object: event type → list of operations")),
        None => return Err(cx.err(&[], "missing `on`")),
    };
    if on.is_empty() {
        return Err(cx.err(&on_at, "`on` names no event type: a view consumes at least one"));
    }
    let mut category: Option<(&str, Category)> = None;
    let mut compiled = BTreeMap::new();
    for (event_type, ops) in on {
        let type_at = at(&on_at, event_type);
        let schema = schemas
            .current(event_type)
            .ok_or_else(|| cx.err(&type_at, format!("unknown event type `{event_type}`")))?;
        match category {
            None => category = Some((event_type, schema.category)),
            Some((first, c)) if c != schema.category => {
                let message = format!(
                    "`{event_type}` is {} data but `{first}` is {}: a view's document is sealed under one \
                     category's key, so all its event types must share one category",
                    schema.category.name(),
                    c.name()
                );
                return Err(cx.err(&type_at, message));
            }
            Some(_) => {}
        }
        let ops = match ops {
            Value::Array(ops) if !ops.is_empty() => ops,
            _ => return Err(cx.err(&type_at, format!("`{event_type}` needs a non-empty list of operations"))),
        };
        let ops = ops.iter().enumerate().map(|(i, op)| parse_op(&cx, &at(&type_at, i), op, schema));
        compiled.insert(event_type.clone(), ops.collect::<Result<Ops, _>>()?);
    }
    let (_, category) = category.ok_or_else(|| cx.err(&on_at, "`on` names no event type"))?;
    Ok(View { name, description, category, on: compiled })
}

fn parse_op(cx: &Ctx<'_>, op_at: &At, op: &Value, schema: &EventSchema) -> Result<Op, ProjectionError> {
    let names = || OPERATIONS.map(|(n, _)| format!("`{n}`")).join(", ");
    let Value::Object(fields) = op else {
        return Err(cx.err(
            op_at,
            format!(
                "an operation is an object such as {{\"set\": \"path\", \"value\": \"/field\"}}; operations: {}",
                names()
            ),
        ));
    };
    let mut found: Option<(OpKind, &str, &Value)> = None;
    for (key, v) in fields {
        if key == "value" || key == "keep_last" {
            continue;
        }
        let Some((_, kind)) = OPERATIONS.iter().find(|(n, _)| n == key) else {
            return Err(cx.err(
                &at(op_at, key),
                format!(
                    "unknown key `{key}` in an operation (operations: {}; plus `value` and, for `append`, `keep_last`)",
                    names()
                ),
            ));
        };
        if let Some((_, first, _)) = found {
            return Err(cx.err(&at(op_at, key), format!("one operation per object: `{first}` and `{key}`")));
        }
        found = Some((*kind, key, v));
    }
    let Some((kind, key, path_value)) = found else {
        return Err(cx.err(op_at, format!("no operation: name one of {}", names())));
    };
    let path_at = at(op_at, key);
    let Value::String(text) = path_value else {
        return Err(cx.err(&path_at, format!("the path of `{key}` must be a string such as `totals.paid_ore`")));
    };
    let path = parse_path(text, schema).map_err(|m| cx.err(&path_at, m))?;
    if path.last().is_some_and(|s| s.select.is_some()) && !matches!(kind, OpKind::Merge | OpKind::Remove) {
        // The element would lose the key field that finds it again.
        let message = format!(
            "`{key}` cannot replace a selected element (`name[key=...]`): use `merge` to update it, `remove` to \
             delete it, or name a field inside it"
        );
        return Err(cx.err(&path_at, message));
    }
    let value_at = at(op_at, "value");
    let value = match (kind, fields.get("value")) {
        (OpKind::Remove, Some(_)) => return Err(cx.err(&value_at, "`remove` takes no `value`")),
        (OpKind::Remove, None) => None,
        (_, None) => return Err(cx.err(op_at, format!("`{key}` needs a `value`"))),
        (_, Some(v)) => Some(parse_expr(cx, &value_at, v, schema)?),
    };
    match (kind, &value) {
        (OpKind::Merge, Some(Expr::Template(_))) => {}
        (OpKind::Merge, _) => {
            return Err(cx.err(&value_at, "`merge` takes an object template: {\"field\": EXPR, ...}"));
        }
        (OpKind::Add | OpKind::Subtract, Some(e)) if !may_be_integer(e) => {
            let message =
                format!("`{key}` needs an integer: a pointer to one, `$version`, `$position` or {{\"const\": 1}}");
            return Err(cx.err(&value_at, message));
        }
        _ => {}
    }
    let keep_at = at(op_at, "keep_last");
    let keep_last = match (kind, fields.get("keep_last")) {
        (_, None) => None,
        (OpKind::Append, Some(v)) => match v.as_u64() {
            Some(n @ 1..=KEEP_LAST_MAX) => Some(n as usize),
            _ => return Err(cx.err(&keep_at, format!("`keep_last` must be an integer from 1 to {KEEP_LAST_MAX}"))),
        },
        (_, Some(_)) => return Err(cx.err(&keep_at, format!("`keep_last` belongs to `append`, not `{key}`"))),
    };
    Ok(Op { kind, text: text.clone(), path, value, keep_last })
}

/// False for expressions that can never give an integer (they would always be skipped).
fn may_be_integer(e: &Expr) -> bool {
    match e {
        Expr::Source(Source::Pointer(_)) | Expr::Source(Source::Meta(Meta::Version | Meta::Position)) => true,
        Expr::Source(Source::Meta(_)) | Expr::Template(_) => false,
        Expr::Const(v) => v.as_i64().is_some(),
    }
}

fn parse_expr(cx: &Ctx<'_>, here: &At, v: &Value, schema: &EventSchema) -> Result<Expr, ProjectionError> {
    match v {
        Value::String(s) => Ok(Expr::Source(parse_source(s, schema).map_err(|m| cx.err(here, m))?)),
        Value::Object(m) if m.len() == 1 && m.contains_key("const") => {
            Ok(Expr::Const(m.get("const").cloned().unwrap_or(Value::Null)))
        }
        Value::Object(m) => {
            let mut fields = Vec::with_capacity(m.len());
            for (k, fv) in m {
                let field_at = at(here, k);
                if !is_field_name(k) {
                    return Err(cx.err(&field_at, format!("template field `{k}` must match [a-z_][a-z0-9_]*")));
                }
                fields.push((k.clone(), parse_expr(cx, &field_at, fv, schema)?));
            }
            Ok(Expr::Template(fields))
        }
        _ => Err(cx.err(here, format!("not an expression: {}", EXPR_FORMS))),
    }
}

const EXPR_FORMS: &str = "write a JSON pointer into the event's data (\"/field\"), event metadata \
     (\"$occurred_at\", \"$recorded_at\", \"$type\", \"$version\", \"$position\"), a constant ({\"const\": ...}) \
     or an object template ({\"field\": EXPR, ...})";

fn parse_source(s: &str, schema: &EventSchema) -> Result<Source, String> {
    if s.starts_with('/') {
        check_pointer(schema, s)?;
        Ok(Source::Pointer(Pointer::new(s)))
    } else if let Some((_, m)) = METAS.iter().find(|(n, _)| *n == s) {
        Ok(Source::Meta(*m))
    } else {
        Err(format!("`{s}` is not an expression: {EXPR_FORMS}"))
    }
}

/// Segments joined by `.`, each `name` or `name[key=SEL]` (SEL a JSON pointer or `$meta`,
/// without `]`).
fn parse_path(text: &str, schema: &EventSchema) -> Result<Vec<Segment>, String> {
    let bad = || {
        format!(
            "bad path `{text}`: write `name` or `name[key=/pointer]` segments joined by `.` (names match \
             [a-z_][a-z0-9_]*; the selector is a JSON pointer into the data or `$meta`)"
        )
    };
    let mut segments = vec![];
    let mut rest = text;
    loop {
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let (name, tail) = rest.split_at(end);
        if !is_field_name(name) {
            return Err(bad());
        }
        rest = tail;
        let mut select = None;
        if let Some(inner) = rest.strip_prefix('[') {
            let close = inner.find(']').ok_or_else(bad)?;
            let (key, sel) = inner[..close].split_once('=').ok_or_else(bad)?;
            if !is_field_name(key) || !(sel.starts_with('/') || sel.starts_with('$')) {
                return Err(bad());
            }
            select = Some((key.to_owned(), parse_source(sel, schema)?));
            rest = &inner[close + 1..];
        }
        segments.push(Segment { name: name.to_owned(), select });
        if rest.is_empty() {
            return Ok(segments);
        }
        rest = rest.strip_prefix('.').ok_or_else(bad)?;
    }
}

/// Checks that `pointer` names a field the event's schema declares: through `properties`,
/// local `$ref`s, `allOf`/`anyOf`/`oneOf` branches, and `items` for an array index.
fn check_pointer(schema: &EventSchema, pointer: &str) -> Result<(), String> {
    let root = schema.document();
    let mut node = root;
    for raw in pointer.split('/').skip(1) {
        let token = raw.replace("~1", "/").replace("~0", "~");
        node = schema_child(root, node, &token, 0).ok_or_else(|| {
            format!(
                "`{pointer}`: `{}` (schema v{}) declares no field `{token}` there",
                schema.event_type, schema.version
            )
        })?;
    }
    Ok(())
}

fn schema_child<'s>(root: &'s Value, node: &'s Value, token: &str, depth: u8) -> Option<&'s Value> {
    if depth > 16 {
        return None; // a `$ref` cycle
    }
    if let Some(child) = node.get("properties").and_then(|p| p.get(token)) {
        return Some(child);
    }
    let is_index =
        token == "0" || (!token.starts_with('0') && !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()));
    if let (true, Some(items)) = (is_index, node.get("items")) {
        return Some(items);
    }
    let target =
        node.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix('#')).and_then(|p| root.pointer(p));
    let branches = ["allOf", "anyOf", "oneOf"].into_iter().filter_map(|k| node.get(k)?.as_array()).flatten();
    target.into_iter().chain(branches).find_map(|n| schema_child(root, n, token, depth + 1))
}

fn is_view_name(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=32).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

fn is_field_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

// ---------------------------------------------------------------------------------------------
// Where each value of a definition starts, for error lines.

/// A value's 1-based line and, for objects and arrays, its members (array members keyed by
/// index) in text order.
#[derive(Debug, Default)]
struct Node {
    line: usize,
    kids: Vec<(String, Node)>,
}

impl Node {
    /// The line of the value at `path`, or of the deepest value on the way that exists.
    fn line_of(&self, path: &At) -> usize {
        let mut node = self;
        for key in path {
            match node.kids.iter().rev().find(|(k, _)| k == key) {
                Some((_, kid)) => node = kid,
                None => break,
            }
        }
        node.line
    }

    /// The first key that repeats within one object: (line of its second value, key).
    fn duplicate(&self) -> Option<(usize, &str)> {
        for (i, (k, kid)) in self.kids.iter().enumerate() {
            if self.kids[..i].iter().any(|(earlier, _)| earlier == k) {
                return Some((kid.line, k));
            }
            if let Some(d) = kid.duplicate() {
                return Some(d);
            }
        }
        None
    }
}

/// Maps the text (already parsed by serde_json, so valid JSON) to value positions. Should the
/// scanner ever disagree with serde_json, errors point at line 1 rather than nowhere.
fn locate(text: &str) -> Node {
    let mut s = Scanner { b: text.as_bytes(), i: 0, line: 1 };
    s.value().unwrap_or(Node { line: 1, kids: vec![] })
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    line: usize,
}

impl Scanner<'_> {
    fn ws(&mut self) {
        while let Some(&c) = self.b.get(self.i) {
            match c {
                b'\n' => self.line += 1,
                b' ' | b'\t' | b'\r' => {}
                _ => break,
            }
            self.i += 1;
        }
    }

    /// The next significant byte, consumed.
    fn next(&mut self) -> Option<u8> {
        self.ws();
        let c = *self.b.get(self.i)?;
        self.i += 1;
        Some(c)
    }

    /// A string whose opening quote was consumed; JSON strings hold no raw newlines.
    fn string(&mut self) -> Option<String> {
        let start = self.i - 1;
        loop {
            match *self.b.get(self.i)? {
                b'\\' => self.i += 2,
                b'"' => break,
                _ => self.i += 1,
            }
        }
        self.i += 1;
        serde_json::from_slice(self.b.get(start..self.i)?).ok()
    }

    fn value(&mut self) -> Option<Node> {
        self.ws();
        let line = self.line;
        let mut kids = vec![];
        match self.next()? {
            b'{' => {
                self.ws();
                if self.b.get(self.i) == Some(&b'}') {
                    self.i += 1;
                } else {
                    loop {
                        if self.next()? != b'"' {
                            return None;
                        }
                        let key = self.string()?;
                        if self.next()? != b':' {
                            return None;
                        }
                        kids.push((key, self.value()?));
                        match self.next()? {
                            b',' => {}
                            b'}' => break,
                            _ => return None,
                        }
                    }
                }
            }
            b'[' => {
                self.ws();
                if self.b.get(self.i) == Some(&b']') {
                    self.i += 1;
                } else {
                    loop {
                        kids.push((kids.len().to_string(), self.value()?));
                        match self.next()? {
                            b',' => {}
                            b']' => break,
                            _ => return None,
                        }
                    }
                }
            }
            b'"' => {
                self.string()?;
            }
            _ => {
                // A number or literal: up to the next delimiter.
                while self.b.get(self.i).is_some_and(|c| !b",]} \t\r\n".contains(c)) {
                    self.i += 1;
                }
            }
        }
        Some(Node { line, kids })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn load(view: &str, text: &str) -> Result<Projections, ProjectionError> {
        Projections::from_files(vec![(format!("projections/{view}.json"), text.to_owned())], &Schemas::builtin())
    }

    /// A definition of view `v` whose `on` entries are `on_lines`: the first of them is line 5.
    fn def(on_lines: &[&str]) -> String {
        format!(
            "{{\n  \"view\": \"v\",\n  \"description\": \"test\",\n  \"on\": {{\n{}\n  }}\n}}\n",
            on_lines.join("\n")
        )
    }

    fn view(on_lines: &[&str]) -> View {
        let mut p = load("v", &def(on_lines)).unwrap_or_else(|e| panic!("{e}"));
        p.views.remove(0)
    }

    /// Asserts that `text`, as `projections/<name>.json`, is refused at `line` with `needle` in the message.
    fn refused(name: &str, text: &str, line: usize, needle: &str) {
        let e = load(name, text).expect_err("must be refused");
        assert_eq!(e.file, format!("projections/{name}.json"), "{e}");
        assert_eq!(e.line, line, "{e}");
        assert!(e.message.contains(needle), "`{needle}` not in: {e}");
        assert_eq!(e.to_string(), format!("projections/{name}.json:{line}: {}", e.message));
    }

    fn ev<'a>(event_type: &'a str, data: &'a Value) -> EventRef<'a> {
        EventRef {
            event_type,
            data: data.into(),
            occurred_at: "2024-05-01",
            recorded_at: "2024-05-01T10:00:00.000Z",
            version: 3,
            position: 42,
        }
    }

    #[test]
    fn builtin_list_matches_the_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("projections");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json"))
            .collect();
        on_disk.sort();
        let listed: Vec<String> = BUILTIN.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(listed, on_disk);

        let p = Projections::builtin(&Schemas::builtin()).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<&str> = p.views().iter().map(View::name).collect();
        assert_eq!(names, ["billing", "customer", "projects"]);
        assert_eq!(p.get("customer").unwrap().category(), Category::Contact);
        assert_eq!(p.get("projects").unwrap().category(), Category::Projects);
        assert_eq!(p.get("billing").unwrap().category(), Category::Billing);
        assert!(p.get("nope").is_none());
        // Every shipped event type has a view, and each exactly one.
        for schema in Schemas::builtin().types() {
            let t = schema.event_type.as_str();
            assert_eq!(p.views().iter().filter(|v| v.handles(t)).count(), 1, "{t}");
            assert!(p.handles(t));
        }
        assert!(!p.handles("audit"));
        assert_eq!(p.consumers("audit").count(), 0);
        assert!(!p.reads_recorded_at());
        for op in [
            r#"{"set": "at", "value": "$recorded_at"}"#,
            r#"{"append": "notes", "value": {"text": "/text", "at": "$recorded_at"}}"#,
            r#"{"merge": "by[at=$recorded_at]", "value": {"text": "/text"}}"#,
        ] {
            let text = def(&[&format!(r#"    "note.added": [{op}]"#)]);
            let p = Projections::from_files(vec![("projections/v.json".into(), text)], &Schemas::builtin()).unwrap();
            assert!(p.reads_recorded_at(), "{op}");
        }
        let types: Vec<&str> = p.get("billing").unwrap().event_types().collect();
        assert_eq!(types, ["invoice.issued", "invoice.paid"]);
    }

    #[test]
    fn load_dir_reads_json_files_and_refuses_an_empty_dir() {
        let s = Schemas::builtin();
        let shipped = Projections::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("projections"), &s).unwrap();
        assert_eq!(shipped.fingerprint(), Projections::builtin(&s).unwrap().fingerprint());

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("README.md"), "not a view").unwrap();
        let e = Projections::load_dir(dir.path(), &s).unwrap_err();
        assert_eq!((e.file.as_str(), e.line), (dir.path().to_str().unwrap(), 0), "{e}");
        std::fs::write(
            dir.path().join("notes.json"),
            def(&[r#"    "note.added": [{"append": "notes", "value": "/text"}]"#]),
        )
        .unwrap();
        let e = Projections::load_dir(dir.path(), &s).unwrap_err();
        assert_eq!((e.file, e.line), (dir.path().join("notes.json").display().to_string(), 2));
        let e = Projections::load_dir(&dir.path().join("missing"), &s).unwrap_err();
        assert_eq!(e.line, 0);

        // Two files defining one view (only possible across directories, or through from_files).
        let text = def(&[r#"    "note.added": [{"append": "notes", "value": "/text"}]"#]);
        let e = Projections::from_files(vec![("a/v.json".into(), text.clone()), ("b/v.json".into(), text)], &s)
            .unwrap_err();
        assert_eq!(e.to_string(), "b/v.json:2: view `v` is already defined in a/v.json");
    }

    #[test]
    fn every_refusal_names_the_file_and_line() {
        let note = r#"    "note.added": [{"append": "notes", "value": "/text"}]"#;
        // Syntax: serde_json's line.
        refused("v", "{\n  \"view\": \"v\"\n  \"description\": \"x\"\n}\n", 3, "not JSON: expected `,` or `}`");
        refused("v", "{\n  \"view\": \"v\",\n  \"view\": \"v\"\n}\n", 3, "duplicate key `view`");
        refused("v", "[]", 1, "an object with `view`");
        // Top level.
        let text = "{\n  \"view\": \"v\",\n  \"description\": \"d\",\n  \"color\": \"red\",\n  \"on\": {}\n}";
        refused("v", text, 4, "unknown key `color`");
        refused("w", &def(&[note]), 2, "view `v` must be defined in `v.json`");
        refused("V", &def(&[note]).replace("\"v\"", "\"V\""), 2, "must match [a-z][a-z0-9_]{0,31}");
        refused("v", "{\n  \"view\": \"v\",\n  \"on\": {}\n}", 1, "missing `description`");
        refused(
            "v",
            "{\n  \"view\": \"v\",\n  \"description\": \"d\",\n  \"on\": {}\n}",
            4,
            "`on` names no event type",
        );
        refused("v", &def(&[r#"    "note.added": []"#]), 5, "needs a non-empty list of operations");
        // Event types and categories.
        let text = def(&[&format!("{note},"), r#"    "invoice.sent": [{"append": "x", "value": "/x"}]"#]);
        refused("v", &text, 6, "unknown event type `invoice.sent`");
        let text = def(&[&format!("{note},"), r#"    "invoice.paid": [{"add": "paid", "value": "/amount_ore"}]"#]);
        refused("v", &text, 6, "`invoice.paid` is billing data but `note.added` is contact");
        // Operations.
        let op = |lines: &[&str]| def(&[&[r#"    "note.added": ["#][..], lines, &["    ]"]].concat());
        refused(
            "v",
            &op(&["      {\"append\": \"notes\",", "       \"value\": \"/body\"}"]),
            7,
            "declares no field `body`",
        );
        let text = op(&[
            "      {\"append\": \"notes\",",
            "       \"value\": {\"on\": \"$occurred_at\",",
            "         \"body\": \"/body\"}}",
        ]);
        refused("v", &text, 8, "`/body`: `note.added` (schema v1) declares no field `body` there");
        refused("v", &op(&["      {\"set\": \"last\", \"value\": \"text\"}"]), 6, "`text` is not an expression");
        refused(
            "v",
            &op(&["      {\"set\": \"last\", \"value\": \"$occured_at\"}"]),
            6,
            "\"$occurred_at\", \"$recorded_at\"",
        );
        refused("v", &op(&["      {\"set\": \"last\", \"value\": 5}"]), 6, "{\"const\": ...}");
        refused("v", &op(&["      {\"set\": \"Last\", \"value\": \"/text\"}"]), 6, "bad path `Last`");
        for bad in ["a..b", "a.", ".a", "a[b]", "a[b=/text", "a[b=/text]c", "a[B=/text]", "a[b=text]", "a b"] {
            refused("v", &op(&[&format!("      {{\"set\": \"{bad}\", \"value\": \"/text\"}}")]), 6, "bad path");
        }
        let text = op(&["      {\"merge\": \"notes[id=/id]\",", "       \"value\": {}}"]);
        refused("v", &text, 6, "`/id`: `note.added` (schema v1) declares no field `id`");
        refused(
            "v",
            &op(&["      {\"set\": \"a\", \"append\": \"b\", \"value\": \"/text\"}"]),
            6,
            "one operation per object",
        );
        refused("v", &op(&["      {\"put\": \"a\", \"value\": \"/text\"}"]), 6, "unknown key `put`");
        refused("v", &op(&["      {\"value\": \"/text\"}"]), 6, "no operation");
        refused("v", &op(&["      \"set\""]), 6, "an operation is an object");
        refused("v", &op(&["      {\"set\": \"a\"}"]), 6, "`set` needs a `value`");
        refused("v", &op(&["      {\"remove\": \"a\",", "       \"value\": 1}"]), 7, "`remove` takes no `value`");
        refused(
            "v",
            &op(&["      {\"merge\": \"a\",", "       \"value\": \"/text\"}"]),
            7,
            "`merge` takes an object template",
        );
        refused("v", &op(&["      {\"add\": \"n\",", "       \"value\": {\"const\": \"1\"}}"]), 7, "needs an integer");
        refused("v", &op(&["      {\"add\": \"n\", \"value\": \"$occurred_at\"}"]), 6, "needs an integer");
        refused(
            "v",
            &op(&["      {\"append\": \"l[t=/text]\", \"value\": \"/text\"}"]),
            6,
            "cannot replace a selected element",
        );
        refused("v", &op(&["      {\"merge\": \"l\", \"value\": {\"Text\": \"/text\"}}"]), 6, "template field `Text`");
    }

    #[test]
    fn pointers_follow_refs_items_and_branches() {
        let ok = [
            r#"    "invoice.issued": [{"set": "a", "value": "/billing_address/city"},"#,
            r#"                       {"set": "b", "value": "/lines/0/amount_ore"},"#,
            r#"                       {"set": "c", "value": "/lines/12/hours"}]"#,
        ];
        view(&ok);
        for bad in ["/billing_address/country", "/lines/x", "/lines/01/hours", "/lines/-", "/", "/net_ore/x"] {
            let line = format!(r#"    "invoice.issued": [{{"set": "a", "value": "{bad}"}}]"#);
            refused("v", &def(&[&line]), 5, "declares no field");
        }
    }

    #[test]
    fn a_split_pointer_resolves_as_serde_json_resolves_it() {
        let data = json!({
            "a": {"b/c": 1, "d~e": [10, {"f": 2}], "": 3},
            "lines": [{"x": 1}, {"x": 2}],
            "0": "zero",
            "s": "text"
        });
        let pointers = [
            "/a",
            "/a/b~1c",
            "/a/d~0e",
            "/a/d~0e/1/f",
            "/a/d~0e/01",
            "/a/d~0e/+1",
            "/a/d~0e/2",
            "/a/",
            "/lines/0/x",
            "/lines/1/x",
            "/lines/-",
            "/lines/00",
            "/0",
            "/s/0",
            "/s",
            "/missing",
            "/a/b~1c/deeper",
            "/",
        ];
        let text = data.to_string();
        let tree: Json = serde_json::from_str(&text).unwrap();
        for p in pointers {
            assert_eq!(Pointer::new(p).get(&data), data.pointer(p), "{p}");
            assert_eq!(Pointer::new(p).resolve(EventData::Json(&tree)).as_ref(), data.pointer(p), "{p} in a tree");
        }
    }

    #[test]
    fn consumers_are_each_views_rules_in_view_order() {
        // The shipped views and one more that shares `note.added` with `customer`.
        let schemas = Schemas::builtin();
        let mut files: Vec<(String, String)> =
            BUILTIN.iter().map(|(name, text)| (format!("projections/{name}"), text.to_string())).collect();
        files.push((
            "projections/v.json".into(),
            def(&[r#"    "note.added": [{"append": "notes", "value": "/text"}]"#]),
        ));
        let p = Projections::from_files(files, &schemas).unwrap();
        let mut shared = 0;
        for schema in schemas.types() {
            let t = schema.event_type.as_str();
            let want: Vec<usize> = (0..p.views().len()).filter(|i| p.views()[*i].handles(t)).collect();
            let got: Vec<usize> = p.consumers(t).map(|(i, _)| i).collect();
            assert_eq!(got, want, "{t}");
            for (i, rules) in p.consumers(t) {
                assert!(std::ptr::eq(rules.0, p.views()[i].rules(t).unwrap().0), "{t}");
            }
            shared += usize::from(got.len() > 1);
        }
        assert_eq!(shared, 1);
    }

    #[test]
    fn keep_last_bounds_an_appended_list_and_is_checked() {
        let v = view(&[r#"    "note.added": [{"append": "notes", "value": "/text", "keep_last": 2}]"#]);
        let mut doc = json!({});
        for t in ["a", "b", "c"] {
            assert!(v.apply(&mut doc, &ev("note.added", &json!({ "text": t }))));
        }
        assert_eq!(doc, json!({"notes": ["b", "c"]}));
        // Part of the definition's identity: a changed bound rebuilds the stored documents.
        let fp = |n: u32| {
            let text =
                def(&[&format!(r#"    "note.added": [{{"append": "notes", "value": "/text", "keep_last": {n}}}]"#)]);
            load("v", &text).unwrap().fingerprint()
        };
        assert_ne!(fp(2), fp(3));
        for bad in ["0", "-1", "1.5", "\"2\"", "10001"] {
            let text =
                def(&[&format!(r#"    "note.added": [{{"append": "notes", "value": "/text", "keep_last": {bad}}}]"#)]);
            refused("v", &text, 5, "`keep_last` must be an integer from 1 to 10000");
        }
        let text = def(&[r#"    "note.added": [{"set": "last", "value": "/text", "keep_last": 2}]"#]);
        refused("v", &text, 5, "`keep_last` belongs to `append`, not `set`");
    }

    #[test]
    fn set_merge_append_remove() {
        let v = view(&[
            r#"    "customer.contact_changed": ["#,
            r#"      {"set": "contact.email", "value": "/email"},"#,
            r#"      {"set": "contact.city", "value": "/address/city"},"#,
            r#"      {"merge": "contact", "value": {"phone": "/phone", "seen": "$position", "tag": {"const": [1]}}},"#,
            r#"      {"append": "history","#,
            r#"       "value": {"on": "$occurred_at", "at": "$recorded_at","#,
            r#"                 "v": "$version", "t": "$type", "email": "/email"}},"#,
            r#"      {"remove": "stale"},"#,
            r#"      {"remove": "contact.nothing_here"}"#,
            r#"    ]"#,
        ]);
        let mut doc = json!({"stale": true, "contact": {"email": "old@x", "note": "kept"}});
        let data = json!({"email": "a@b", "address": {"street": "S 1", "postal_code": "1", "city": "Lund"}});
        assert!(v.apply(&mut doc, &ev("customer.contact_changed", &data)));
        let expected = json!({
            "contact": {"email": "a@b", "note": "kept", "city": "Lund", "seen": 42, "tag": [1]},
            "history": [
                {"on": "2024-05-01", "at": "2024-05-01T10:00:00.000Z",
                 "v": 3, "t": "customer.contact_changed", "email": "a@b"}
            ]
        });
        assert_eq!(doc, expected);
        // Absent values: `set` skipped, template fields left out, `merge` leaves the rest alone.
        let data = json!({"phone": "08-1"});
        assert!(v.apply(&mut doc, &ev("customer.contact_changed", &data)));
        assert_eq!(
            doc["contact"],
            json!({"email": "a@b", "note": "kept", "city": "Lund", "seen": 42, "tag": [1], "phone": "08-1"})
        );
        assert_eq!(
            doc["history"][1],
            json!({"on": "2024-05-01", "at": "2024-05-01T10:00:00.000Z", "v": 3, "t": "customer.contact_changed"})
        );
        // Another type: unchanged, false.
        let before = doc.clone();
        assert!(!v.apply(&mut doc, &ev("note.added", &json!({"text": "x"}))));
        assert_eq!(doc, before);
    }

    #[test]
    fn small_and_large_objects_are_found_alike() {
        // Objects up to SCAN_FIELDS_MAX fields are searched by compare, larger ones by hash:
        // the same result either side of the line, field order included.
        let v = view(&[
            r#"    "customer.contact_changed": ["#,
            r#"      {"set": "contact.email", "value": "/email"},"#,
            r#"      {"merge": "contact", "value": {"phone": "/phone", "f3": "/address/city"}}"#,
            r#"    ]"#,
        ]);
        for n in [0, SCAN_FIELDS_MAX - 1, SCAN_FIELDS_MAX, SCAN_FIELDS_MAX + 1, 3 * SCAN_FIELDS_MAX] {
            let fillers = |extra: Vec<(String, Value)>| -> Value {
                let mut m: Map<String, Value> = (0..n).map(|i| (format!("f{i}"), Value::from(i))).collect();
                m.extend(extra);
                Value::Object(m)
            };
            let mut doc = json!({ "contact": fillers(vec![("email".into(), json!("old@x"))]) });
            let data = fillers(vec![
                ("email".into(), json!("a@b")),
                ("phone".into(), json!("08-1")),
                ("address".into(), json!({"city": "Lund"})),
            ]);
            assert!(v.apply(&mut doc, &ev("customer.contact_changed", &data)));
            let mut want: Vec<(String, Value)> = (0..n).map(|i| (format!("f{i}"), Value::from(i))).collect();
            if n > 3 {
                want[3].1 = json!("Lund");
            }
            want.push(("email".into(), json!("a@b")));
            want.push(("phone".into(), json!("08-1")));
            if n <= 3 {
                want.push(("f3".into(), json!("Lund")));
            }
            let got: Vec<(String, Value)> = doc["contact"].as_object().unwrap().clone().into_iter().collect();
            assert_eq!(got, want, "{n} fields");
        }
    }

    #[test]
    fn add_and_subtract_saturate_and_skip_non_integers() {
        let v = view(&[
            r#"    "invoice.paid": ["#,
            r#"      {"add": "t.sum", "value": "/amount_ore"},"#,
            r#"      {"subtract": "t.left", "value": "/amount_ore"},"#,
            r#"      {"add": "t.count", "value": {"const": 1}},"#,
            r#"      {"add": "t.oops", "value": "/paid_on"}"#,
            r#"    ]"#,
        ]);
        let data = json!({"invoice_number": "1", "paid_on": "2024-01-01", "amount_ore": 500});
        let mut doc = json!({"t": {"sum": i64::MAX - 100, "left": "junk", "count": 1.5}});
        assert!(v.apply(&mut doc, &ev("invoice.paid", &data)));
        assert_eq!(doc, json!({"t": {"sum": i64::MAX, "left": -500, "count": 1}}));
        let mut doc = json!({"t": {"left": i64::MIN + 1}});
        v.apply(&mut doc, &ev("invoice.paid", &data));
        assert_eq!(doc["t"]["left"], json!(i64::MIN));
        // A value beyond i64 (or a float) is not an integer: skipped, nothing created.
        let big = json!({"invoice_number": "1", "paid_on": "2024-01-01", "amount_ore": u64::MAX});
        let mut doc = json!({});
        v.apply(&mut doc, &ev("invoice.paid", &big));
        assert_eq!(doc, json!({"t": {"count": 1}}));
    }

    #[test]
    fn selectors_upsert_nest_and_skip_when_absent() {
        let v = view(&[
            r#"    "drawing.registered": ["#,
            r#"      {"merge": "p[id=/project_id].d[id=/drawing_id]", "value": {"rev": "/revision"}},"#,
            r#"      {"append": "p[id=/project_id].d[id=/drawing_id].revs", "value": "/revision"},"#,
            r#"      {"add": "p[id=/project_id].count", "value": {"const": 1}},"#,
            r#"      {"set": "by_pos[pos=$position].seen", "value": {"const": true}}"#,
            r#"    ],"#,
            r#"    "project.opened": ["#,
            r#"      {"remove": "p[id=/project_id].d[id=/title]"},"#,
            r#"      {"remove": "by_pos[pos=$position]"},"#,
            r#"      {"remove": "p[id=/project_id].none[id=/title].x"},"#,
            r#"      {"remove": "p[id=/property_designation]"}"#,
            r#"    ]"#,
        ]);
        let draw = |p: &str, d: &str, r: &str| {
            json!({
                "project_id": p, "drawing_id": d, "revision": r,
                "title": "t", "file_name": "f", "content_hash": "0"
            })
        };
        let mut doc = json!({});
        for data in [draw("P1", "A", "1"), draw("P1", "A", "2"), draw("P1", "B", "1"), draw("P2", "A", "1")] {
            v.apply(&mut doc, &ev("drawing.registered", &data));
        }
        let expected = json!({
            "p": [
                {"id": "P1", "d": [
                    {"id": "A", "rev": "2", "revs": ["1", "2"]},
                    {"id": "B", "rev": "1", "revs": ["1"]}
                ], "count": 3},
                {"id": "P2", "d": [{"id": "A", "rev": "1", "revs": ["1"]}], "count": 1}
            ],
            "by_pos": [{"pos": 42, "seen": true}]
        });
        assert_eq!(doc, expected);
        // A selector whose value is absent skips the whole operation: nothing is created.
        let mut fresh = json!({});
        let partial = json!({"project_id": "P9", "revision": "1"});
        v.apply(&mut fresh, &ev("drawing.registered", &partial));
        // (The count only needs the project id, which is there.)
        assert_eq!(fresh, json!({"p": [{"id": "P9", "count": 1}], "by_pos": [{"pos": 42, "seen": true}]}));
        // Removing selected elements; missing ones are no-ops.
        let site = json!({"street": "s", "postal_code": "1", "city": "c"});
        let open = json!({"project_id": "P1", "title": "A", "property_designation": "P2", "site_address": site});
        assert!(v.apply(&mut doc, &ev("project.opened", &open)));
        let expected = json!({
            "p": [{"id": "P1", "d": [{"id": "B", "rev": "1", "revs": ["1"]}], "count": 3}],
            "by_pos": []
        });
        assert_eq!(doc, expected);
    }

    #[test]
    fn shape_conflicts_are_replaced_by_the_expected_container() {
        let v = view(&[
            r#"    "note.added": ["#,
            r#"      {"append": "notes", "value": "/text"},"#,
            r#"      {"set": "a.b", "value": "/text"},"#,
            r#"      {"merge": "l[k=$type]", "value": {"n": "$version"}},"#,
            r#"      {"remove": "x.y"}"#,
            r#"    ]"#,
        ]);
        let data = json!({"text": "hi"});
        for start in [json!("a string"), json!([1]), json!(null), json!({"notes": {"x": 1}, "a": 7, "l": "s", "x": 3})]
        {
            let mut doc = start;
            v.apply(&mut doc, &ev("note.added", &data));
            let mut doc_keys: Vec<&String> = doc.as_object().unwrap().keys().collect();
            doc_keys.retain(|k| *k != "x");
            assert_eq!(doc_keys, ["notes", "a", "l"]);
            assert_eq!(doc["notes"], json!(["hi"]));
            assert_eq!(doc["a"], json!({"b": "hi"}));
            assert_eq!(doc["l"], json!([{"k": "note.added", "n": 3}]));
        }
        // Elements that are not objects never match a selector; they stay.
        let mut doc = json!({"l": [5, {"k": "note.added"}]});
        v.apply(&mut doc, &ev("note.added", &data));
        assert_eq!(doc["l"], json!([5, {"k": "note.added", "n": 3}]));
    }

    #[test]
    fn apply_is_deterministic() {
        let s = Schemas::builtin();
        let (a, b) = (Projections::builtin(&s).unwrap(), Projections::builtin(&s).unwrap());
        let events = [
            (
                "invoice.issued",
                json!({
                    "invoice_number": "7", "project_id": "P", "issued_on": "2024-01-01", "due_on": "2024-01-31",
                    "currency": "SEK", "lines": [{"description": "x", "hours": 1, "amount_ore": 100}],
                    "net_ore": 100, "vat_ore": 25, "total_ore": 125,
                    "billing_address": {"street": "s", "postal_code": "1", "city": "c"}
                }),
            ),
            ("invoice.paid", json!({"invoice_number": "7", "paid_on": "2024-01-10", "amount_ore": 125})),
        ];
        let run = |p: &Projections| {
            let mut doc = Value::Object(Map::new());
            for (t, d) in &events {
                p.get("billing").unwrap().apply(&mut doc, &ev(t, d));
            }
            serde_json::to_vec(&doc).unwrap()
        };
        assert_eq!(run(&a), run(&b));
        assert_eq!(run(&a), run(&a));
    }

    #[test]
    fn fingerprint_follows_meaning_not_layout() {
        let s = Schemas::builtin();
        let base = Projections::builtin(&s).unwrap().fingerprint();
        let with = |edit: &dyn Fn(&mut Value)| {
            let files = BUILTIN.iter().map(|(name, text)| {
                let mut v: Value = serde_json::from_str(text).unwrap();
                if *name == "billing.json" {
                    edit(&mut v);
                }
                (format!("projections/{name}"), serde_json::to_string_pretty(&v).unwrap())
            });
            Projections::from_files(files.collect(), &s).unwrap().fingerprint()
        };
        assert_eq!(with(&|_| {}), base, "layout");
        assert_eq!(with(&|v| v["description"] = json!("other words")), base, "description");
        // Key order inside an operation, order of event types.
        assert_eq!(
            with(&|v| {
                for op in v["on"]["invoice.paid"].as_array_mut().unwrap() {
                    let m = op.as_object_mut().unwrap();
                    let value = m.shift_remove("value").unwrap();
                    let mut reordered = Map::from_iter([("value".to_owned(), value)]);
                    reordered.extend(std::mem::take(m));
                    *m = reordered;
                }
                let on = v["on"].as_object_mut().unwrap();
                let issued = on.shift_remove("invoice.issued").unwrap();
                on.insert("invoice.issued".into(), issued);
            }),
            base,
            "key order"
        );
        assert_ne!(with(&|v| v["on"]["invoice.paid"][2]["value"] = json!("/invoice_number")), base);
        assert_ne!(with(&|v| v["on"]["invoice.paid"].as_array_mut().unwrap().swap(2, 3)), base);
        assert_ne!(
            with(&|v| {
                let t = v["on"]["invoice.paid"][0]["value"].as_object_mut().unwrap();
                let paid_on = t.shift_remove("paid_on").unwrap();
                t.insert("paid_on".into(), paid_on);
            }),
            base,
            "template field order is document field order"
        );
    }

    /// The whole sample register through the three views, one stream per subject.
    #[test]
    fn sample_register() {
        let s = Schemas::builtin();
        let p = Projections::builtin(&s).unwrap();
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sample-register.jsonl"))
                .unwrap();
        let mut streams: BTreeMap<String, Vec<(u64, Value)>> = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let e: Value = serde_json::from_str(line).unwrap();
            streams.entry(e["subject"].as_str().unwrap().to_owned()).or_default().push((i as u64 + 1, e));
        }
        assert_eq!(streams.len(), 1000);
        let mut docs: BTreeMap<String, BTreeMap<&str, Value>> = BTreeMap::new();
        for (subject, events) in &streams {
            let mine = docs.entry(subject.clone()).or_default();
            for (version, (position, e)) in events.iter().enumerate() {
                let er = EventRef {
                    event_type: e["type"].as_str().unwrap(),
                    data: (&e["data"]).into(),
                    occurred_at: e["occurred_at"].as_str().unwrap(),
                    recorded_at: "2025-06-01T00:00:00.000Z",
                    version: version as u64 + 1,
                    position: *position,
                };
                let handled = p
                    .views()
                    .iter()
                    .filter(|v| v.apply(mine.entry(v.name()).or_insert_with(|| Value::Object(Map::new())), &er));
                assert_eq!(handled.count(), 1, "{}", er.event_type);
            }
        }

        // Every customer has a card; billing totals agree with the invoices.
        let mut unpaid_invoices = 0;
        for (subject, views) in &docs {
            assert!(views["customer"]["name"].is_string(), "{subject}");
            let billing = &views["billing"];
            let Some(invoices) = billing["invoices"].as_array() else { continue };
            let t = &billing["totals"];
            let sum = |status: &str| -> i64 {
                invoices.iter().filter(|i| i["status"] == status).map(|i| i["total_ore"].as_i64().unwrap()).sum()
            };
            assert_eq!(t["invoice_count"].as_u64(), Some(invoices.len() as u64));
            assert_eq!(
                t["unpaid_ore"].as_i64(),
                Some(t["invoiced_ore"].as_i64().unwrap() - t["paid_ore"].as_i64().unwrap())
            );
            assert_eq!(t["unpaid_ore"].as_i64(), Some(sum("unpaid")));
            assert_eq!(t["paid_ore"].as_i64(), Some(sum("paid")));
            unpaid_invoices += invoices.iter().filter(|i| i["status"] == "unpaid").count();
        }
        assert_eq!(unpaid_invoices, 336);

        // A company that withdrew its newsletter consent 11 days after giving it.
        let karlsson = &docs["9988337f-adc0-4c2e-8fa9-cffccd012c84"]["customer"];
        assert_eq!(karlsson["org_number"], "848987-2153");
        assert_eq!(karlsson["contact_person"], "Margareta Eliasson");
        assert!(karlsson.get("personal_number").is_none());
        assert_eq!(
            karlsson["consents"],
            json!([{"purpose": "newsletter", "given": false, "channel": "email", "changed_on": "2019-01-16"}])
        );

        // A person who moved, withdrew consent and has one invoice unpaid.
        let lantz = &docs["6d8a91a3-85d7-47b9-b67c-b01e9e65c43a"];
        let customer = json!({
            "kind": "person",
            "name": "Elisabet Lantz-Lindblad",
            "personal_number": "19980123-8917",
            "email": "johanna13@example.org",
            "phone": "0120-24 63 94",
            "address": {"street": "Industrigatan 963", "postal_code": "41595", "city": "Lund"},
            "registered_on": "2023-10-11",
            "consents": [{"purpose": "newsletter", "given": false, "channel": "email", "changed_on": "2024-11-12"}],
            "notes": [{"on": "2024-03-05", "text": "Ringde Elisabet angående fuga dolorem commodi eaque vel."}],
            "contact_changed_on": "2025-02-06"
        });
        // Compared as text: field order is part of the bytes, and follows the definitions.
        assert_eq!(lantz["customer"].to_string(), customer.to_string());
        let (a02, a01) = (
            "0405be4d9115bde0adb7c109fb8c817b2b172f81ab01a3fe85f70845b2e6545d",
            "dea2fb514498b04558da965c07f3b8f540c4ed7eee1d53f8273e309a360dbab4",
        );
        let projects = json!({"projects": [{
            "project_id": "P2023-00978-0",
            "title": "Bygglovsansökan Skogsstigen",
            "property_designation": "Västerås Forsgren 4:236",
            "site_address": {"street": "Villavägen 6", "postal_code": "81759", "city": "Piteå"},
            "opened_on": "2023-11-17",
            "drawings": [
                {"drawing_id": "A-02", "title": "Situationsplan", "revision": "C", "file_name": "P2023-00978-0-A02.pdf",
                 "content_hash": a02, "registered_on": "2024-01-07",
                 "revisions": [{"revision": "C", "file_name": "P2023-00978-0-A02.pdf", "content_hash": a02,
                                "registered_on": "2024-01-07"}]},
                {"drawing_id": "A-01", "title": "Planritning", "revision": "B", "file_name": "P2023-00978-0-A01.pdf",
                 "content_hash": a01, "registered_on": "2024-04-24",
                 "revisions": [{"revision": "B", "file_name": "P2023-00978-0-A01.pdf", "content_hash": a01,
                                "registered_on": "2024-04-24"}]}
            ]
        }]});
        assert_eq!(lantz["projects"].to_string(), projects.to_string());
        let billing = json!({
            "invoices": [
                {"invoice_number": "20240097800", "project_id": "P2023-00978-0", "issued_on": "2024-04-15",
                 "due_on": "2024-05-15", "currency": "SEK", "net_ore": 3000000, "vat_ore": 750000, "total_ore": 3750000,
                 "paid_ore": 3750000, "status": "paid", "paid_on": "2024-04-22"},
                {"invoice_number": "20250097801", "project_id": "P2023-00978-0", "issued_on": "2025-01-10",
                 "due_on": "2025-02-09", "currency": "SEK", "net_ore": 3740000, "vat_ore": 935000, "total_ore": 4675000,
                 "paid_ore": 0, "status": "unpaid"}
            ],
            "totals": {"invoice_count": 2, "invoiced_ore": 8425000, "paid_ore": 3750000, "unpaid_ore": 4675000}
        });
        assert_eq!(lantz["billing"].to_string(), billing.to_string());
    }
}

/// Fuzzing the definition parser (proptest, in every test run; cargo-fuzz runs the same parser
/// longer, by hand: `fuzz/run.sh`, target `projection_def`): arbitrary text and
/// mutations of the shipped definitions are refused with a file and line, or accepted; never a
/// panic.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,300}") {
            let schemas = crate::schema::Schemas::builtin();
            if let Err(e) = parse_view("x.json", "x", &text, &schemas) {
                prop_assert_eq!(e.file.as_str(), "x.json");
            }
        }

        #[test]
        fn mutated_definitions_never_panic(pick in 0usize..3, edits in prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..6)) {
            let schemas = crate::schema::Schemas::builtin();
            let (file, text) = BUILTIN[pick % BUILTIN.len()];
            let mut b = text.as_bytes().to_vec();
            crate::fuzzing::mutate(&mut b, &edits);
            let text = String::from_utf8_lossy(&b);
            let stem = Path::new(file).file_stem().unwrap().to_string_lossy().into_owned();
            if let Err(e) = parse_view(file, &stem, &text, &schemas) {
                prop_assert!(e.line <= text.lines().count() + 1, "{}", e);
            }
        }
    }
}
