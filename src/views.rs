//! View documents at rest, and keeping them current.
//!
//! A view document is the JSON that a projection (`projection.rs`, from `projections/`)
//! builds from one subject's events. It is stored sealed under the subject's key for the
//! view's data category, so it is as unreadable at rest as the events, and it dies with that
//! key: erasing a subject (or shredding one category) makes its documents unreadable even
//! where sled keeps old copies.
//!
//! The writer updates documents in the same commit as the events (`Projector`), after the
//! records, then the checkpoint `views_at`; a crash keeps a prefix of that order, so documents
//! are never ahead of the log. `catch_up` replays the log from the checkpoint at open (after a
//! changed definition, a requested rebuild, or a crash during one), in bounded memory.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;
use zeroize::Zeroize;

use crate::crypto::{CryptoError, SubjectKey, TAG_LEN};
use crate::projection::{EventRef, Projections, View};
use crate::record::{Position, NONCE_LEN};
use crate::store::{Store, StoreError, WriteBatch};

/// The checkpoint: the last log position the stored documents reflect.
pub const META_AT: &str = "views_at";
/// The fingerprint of the definitions the stored documents were built with.
pub const META_DEF: &str = "views_def";

/// A view document with the stream version and log position of the last event applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Doc {
    pub version: u64,
    pub position: Position,
    pub data: Value,
}

impl Doc {
    fn new() -> Doc {
        Doc { version: 0, position: 0, data: Value::Object(Default::default()) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("view document {view}/{subject} cannot be opened: {detail}")]
    Damaged { view: String, subject: Uuid, detail: String },
    #[error("subject key: {0}")]
    Key(String),
}

fn aad(view: &str, subject: Uuid, category: u8) -> Vec<u8> {
    let mut a = b"pdledger view v1\0".to_vec();
    a.extend_from_slice(view.as_bytes());
    a.push(0);
    a.extend_from_slice(subject.as_bytes());
    a.push(category);
    a
}

/// Seals a document: nonce ‖ ciphertext of its JSON. `scratch` is where the JSON is written
/// (kept by the caller from one document to the next, so that it stops growing); it is wiped
/// before this returns.
pub fn seal(
    key: &SubjectKey,
    view: &View,
    subject: Uuid,
    doc: &Doc,
    scratch: &mut Vec<u8>,
) -> Result<Vec<u8>, CryptoError> {
    scratch.clear();
    doc_json(scratch, doc);
    let mut out = Vec::with_capacity(NONCE_LEN + scratch.len() + TAG_LEN);
    let sealed = key.seal_to(&aad(view.name(), subject, view.category() as u8), scratch, &mut out);
    scratch.as_mut_slice().zeroize();
    sealed.map(|()| out)
}

/// A document's JSON, byte for byte what `serde_json::to_vec(doc)` gives (a test checks), made
/// faster: a rebuild writes every document, and serde_json escapes strings a byte at a time
/// where view documents' strings almost never need escaping at all.
fn doc_json(out: &mut Vec<u8>, doc: &Doc) {
    use std::io::Write;
    write!(out, "{{\"version\":{},\"position\":{},\"data\":", doc.version, doc.position).expect("a Vec takes it");
    json_value(out, &doc.data);
    out.push(b'}');
}

fn json_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => serde_json::to_writer(&mut *out, n).expect("a Vec takes it"),
        Value::String(s) => json_str(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                json_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(fields) => {
            out.push(b'{');
            for (i, (k, item)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                json_str(out, k);
                out.push(b':');
                json_value(out, item);
            }
            out.push(b'}');
        }
    }
}

/// A string as JSON: copied whole when nothing in it needs escaping (the test runs over every
/// byte without stopping early, so that it can be vectorised), else serde_json's.
fn json_str(out: &mut Vec<u8>, s: &str) {
    let escapes = s.bytes().fold(false, |any, b| any | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if escapes {
        serde_json::to_writer(&mut *out, s).expect("a Vec takes it");
    } else {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

pub fn open(key: &SubjectKey, view: &View, subject: Uuid, sealed: &[u8]) -> Result<Doc, ViewError> {
    let damaged = |detail: String| ViewError::Damaged { view: view.name().to_owned(), subject, detail };
    if sealed.len() < NONCE_LEN {
        return Err(damaged("too short".into()));
    }
    let nonce: [u8; NONCE_LEN] = sealed[..NONCE_LEN].try_into().expect("checked length");
    let plain = zeroize::Zeroizing::new(
        key.open(&nonce, &aad(view.name(), subject, view.category() as u8), &sealed[NONCE_LEN..])
            .map_err(|e| damaged(e.to_string()))?,
    );
    serde_json::from_slice(&plain).map_err(|e| damaged(e.to_string()))
}

/// How the projector finds a subject's key for a category: `None` when there is none
/// (never created, or shredded).
pub type KeyLookup<'a> = dyn Fn(Uuid, u8) -> Result<Option<Arc<SubjectKey>>, String> + 'a;

/// Reads a stored document and opens it; `None` when there is no document or no key.
pub fn load(store: &Store, keys: &KeyLookup<'_>, view: &View, subject: Uuid) -> Result<Option<Doc>, ViewError> {
    let Some(sealed) = store.view(view.name(), subject)? else { return Ok(None) };
    let Some(key) = keys(subject, view.category() as u8).map_err(ViewError::Key)? else { return Ok(None) };
    open(&key, view, subject, &sealed).map(Some)
}

/// A multiply-rotate hasher (rustc's former FxHasher) for maps keyed by subject ids, view
/// indexes and categories: a rebuild looks such maps up for every event, and SipHash cost more
/// than the rest of the lookup. It does not resist chosen collisions; every map using it is
/// bounded (one commit's documents, one subject's in the redo, one rebuild range's subjects
/// and their documents: `Limits::rebuild_range_subjects` times the views), so crafted ids
/// could slow one commit or range, not the server.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(n.into());
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl IdHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// A map keyed by ids (`IdHasher`).
pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// Documents touched since the last flush, by (view index, subject).
pub struct Projector {
    projections: Arc<Projections>,
    docs: IdMap<(usize, Uuid), Doc>,
    /// Where each document's JSON is written before it is sealed (`seal`), kept from one flush
    /// to the next so that it stops growing (a growing buffer leaves copies behind), wiped
    /// after every document and when dropped.
    scratch: zeroize::Zeroizing<Vec<u8>>,
}

impl Projector {
    pub fn new(projections: Arc<Projections>) -> Projector {
        Projector { projections, docs: IdMap::default(), scratch: zeroize::Zeroizing::new(Vec::new()) }
    }

    pub fn projections(&self) -> &Projections {
        &self.projections
    }

    /// Applies one event of `subject` to every view that handles its type.
    pub fn apply(
        &mut self,
        store: &Store,
        keys: &KeyLookup<'_>,
        subject: Uuid,
        ev: &EventRef<'_>,
    ) -> Result<(), ViewError> {
        for (i, rules) in self.projections.consumers(ev.event_type) {
            let view = &self.projections.views()[i];
            let doc = match self.docs.entry((i, subject)) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(load(store, keys, view, subject)?.unwrap_or_else(Doc::new))
                }
            };
            rules.apply(&mut doc.data, ev);
            doc.version = ev.version;
            doc.position = ev.position;
        }
        Ok(())
    }

    /// Applies an event to documents built from nothing (never read from the store): for
    /// rebuilding one subject's documents from its whole stream.
    pub fn apply_fresh(&mut self, subject: Uuid, ev: &EventRef<'_>) {
        for (i, rules) in self.projections.consumers(ev.event_type) {
            let doc = self.docs.entry((i, subject)).or_insert_with(Doc::new);
            rules.apply(&mut doc.data, ev);
            doc.version = ev.version;
            doc.position = ev.position;
        }
    }

    /// The (view index, subject) of every document held.
    pub fn held(&self) -> impl Iterator<Item = (usize, Uuid)> + '_ {
        self.docs.keys().copied()
    }

    /// Seals every touched document into `batch` and starts over. A document whose key is
    /// gone (shredded meanwhile) is dropped.
    pub fn flush(&mut self, keys: &KeyLookup<'_>, batch: &mut WriteBatch) -> Result<(), ViewError> {
        let mut docs: Vec<_> = self.docs.drain().collect();
        // Write order does not matter for correctness; sorted keeps sled's pages warm.
        docs.sort_unstable_by_key(|d| d.0);
        for ((i, subject), doc) in docs {
            let view = &self.projections.views()[i];
            let Some(key) = keys(subject, view.category() as u8).map_err(ViewError::Key)? else { continue };
            let sealed =
                seal(&key, view, subject, &doc, &mut self.scratch).map_err(|e| ViewError::Key(e.to_string()))?;
            batch.put_view(view.name(), subject, sealed);
        }
        Ok(())
    }
}

/// Builds a subject's documents in memory from events (for `replay --until`): nothing is
/// stored. `events` are in stream order.
pub fn build<'e>(projections: &Projections, events: impl IntoIterator<Item = EventRef<'e>>) -> Vec<(String, Doc)> {
    let mut docs: Vec<Option<Doc>> = vec![None; projections.views().len()];
    for ev in events {
        for (i, view) in projections.views().iter().enumerate() {
            if view.handles(ev.event_type) {
                let doc = docs[i].get_or_insert_with(Doc::new);
                view.apply(&mut doc.data, &ev);
                doc.version = ev.version;
                doc.position = ev.position;
            }
        }
    }
    projections.views().iter().zip(docs).filter_map(|(v, d)| Some((v.name().to_owned(), d?))).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Any JSON value: strings with quotes, backslashes, control characters and non-ASCII text,
    /// integers of both signs, floats, nesting. (Also `json`'s tests.)
    pub(crate) fn any_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from), // not finite: null, as serde_json makes it
            "(\\PC|[\"\\\\\u{0}-\u{1f}\u{7f}]){0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec(("(\\PC|[\"\\\\\u{1}]){0,6}", inner), 0..6)
                    .prop_map(|fields| Value::Object(fields.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

        #[test]
        fn a_document_is_written_as_serde_json_writes_it(data in any_value(), version in any::<u64>(), position in any::<u64>()) {
            let doc = Doc { version, position, data };
            let mut ours = vec![];
            doc_json(&mut ours, &doc);
            prop_assert_eq!(&ours, &serde_json::to_vec(&doc).unwrap());
            prop_assert!(serde_json::from_slice::<Doc>(&ours).is_ok());
        }
    }

    #[test]
    fn a_sealed_document_opens_and_its_scratch_is_wiped() {
        let schemas = crate::schema::Schemas::builtin();
        let projections = Projections::builtin(&schemas).unwrap();
        let view = projections.get("customer").unwrap();
        let key = SubjectKey::generate().unwrap();
        let subject = Uuid::from_u128(9);
        let doc = Doc { version: 3, position: 7, data: serde_json::json!({"name": "Ada", "notes": ["x"]}) };
        let mut scratch = vec![];
        let sealed = seal(&key, view, subject, &doc, &mut scratch).unwrap();
        assert!(!scratch.is_empty() && scratch.iter().all(|b| *b == 0), "the JSON is wiped");
        assert_eq!(open(&key, view, subject, &sealed).unwrap(), doc);
        // Bound to its view and subject.
        assert!(open(&key, view, Uuid::from_u128(10), &sealed).is_err());
        assert!(open(&key, projections.get("billing").unwrap(), subject, &sealed).is_err());
        // A second, smaller document through the same scratch.
        let small = Doc { version: 4, position: 8, data: serde_json::json!({}) };
        let sealed = seal(&key, view, subject, &small, &mut scratch).unwrap();
        assert_eq!(open(&key, view, subject, &sealed).unwrap(), small);
    }

    #[test]
    fn strings_that_need_escaping_are_escaped() {
        let doc = Doc {
            version: 1,
            position: 2,
            data: serde_json::json!({"a\"b": "x\\y\n\u{1}\u{7f}é\"", "n": [1.5, -2, null]}),
        };
        let mut ours = vec![];
        doc_json(&mut ours, &doc);
        assert_eq!(ours, serde_json::to_vec(&doc).unwrap());
    }
}
