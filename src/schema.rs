//! Event types, from the JSON Schemas in `schemas/`.
//!
//! Each file `<type>.v<version>.json` validates an event's `data` and carries an `x-pdledger`
//! annotation: the data category (which selects the subject key), purpose, legal basis,
//! labels, and which fields are lookup keys. The shipped schemas are compiled into the binary;
//! `--schemas DIR` loads a directory instead. Validation is pure.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

/// The schemas shipped in `schemas/`, compiled in. A unit test checks this list against the
/// directory, so a schema cannot be added there and forgotten here.
const BUILTIN: &[(&str, &str)] = &[
    ("consent.given.v1.json", include_str!("../schemas/consent.given.v1.json")),
    ("consent.withdrawn.v1.json", include_str!("../schemas/consent.withdrawn.v1.json")),
    ("customer.contact_changed.v1.json", include_str!("../schemas/customer.contact_changed.v1.json")),
    ("customer.registered.v1.json", include_str!("../schemas/customer.registered.v1.json")),
    ("drawing.registered.v1.json", include_str!("../schemas/drawing.registered.v1.json")),
    ("invoice.issued.v1.json", include_str!("../schemas/invoice.issued.v1.json")),
    ("invoice.paid.v1.json", include_str!("../schemas/invoice.paid.v1.json")),
    ("note.added.v1.json", include_str!("../schemas/note.added.v1.json")),
    ("project.opened.v1.json", include_str!("../schemas/project.opened.v1.json")),
];

/// Data categories: each has its own subject key, so each can be erased on its own schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Category {
    Contact = 1,
    Projects = 2,
    Billing = 3,
}

impl Category {
    pub const ALL: [Category; 3] = [Category::Contact, Category::Projects, Category::Billing];

    pub fn from_u8(v: u8) -> Option<Category> {
        Category::ALL.into_iter().find(|c| *c as u8 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            Category::Contact => "contact",
            Category::Projects => "projects",
            Category::Billing => "billing",
        }
    }
}

#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct Label {
    pub en: String,
    pub sv: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Annotation {
    #[serde(rename = "type")]
    event_type: String,
    version: u16,
    category: Category,
    purpose: String,
    legal_basis: String,
    label: Label,
    #[serde(default)]
    lookup: BTreeMap<String, String>,
    #[serde(default)]
    fields: BTreeMap<String, Label>,
    #[serde(default)]
    correction: bool,
}

/// The lookup keys a schema may mark (the blind index knows how to normalise these).
pub const LOOKUP_KEYS: [&str; 3] = ["email", "personal_number", "org_number"];

pub struct EventSchema {
    pub event_type: String,
    pub version: u16,
    pub category: Category,
    pub purpose: String,
    pub legal_basis: String,
    pub label: Label,
    /// Lookup key name → JSON pointer into `data`.
    pub lookup: BTreeMap<String, String>,
    pub fields: BTreeMap<String, Label>,
    /// A rectification (GDPR Art. 16): may be appended while the subject is restricted.
    pub correction: bool,
    validator: jsonschema::Validator,
    document: Value,
}

impl EventSchema {
    /// The schema file as parsed JSON (for static checks of pointers into `data`).
    pub fn document(&self) -> &Value {
        &self.document
    }
}

impl std::fmt::Debug for EventSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EventSchema({}.v{})", self.event_type, self.version)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// Why an event's data was refused. `pointer` is a JSON pointer into `data` ("" for the
/// whole object). The message names the rule, never the value (it may be personal).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("unknown event type `{0}`")]
    UnknownType(String),
    #[error("{event_type}: at `{pointer}`: {message}")]
    Data { event_type: String, pointer: String, message: String },
}

impl Violation {
    pub fn pointer(&self) -> &str {
        match self {
            Violation::UnknownType(_) => "/type",
            Violation::Data { pointer, .. } => pointer,
        }
    }
}

pub struct Schemas {
    by_type: HashMap<String, BTreeMap<u16, EventSchema>>,
}

impl std::fmt::Debug for Schemas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_type.keys()).finish()
    }
}

impl Schemas {
    pub fn builtin() -> Schemas {
        Schemas::from_files(BUILTIN.iter().map(|(n, t)| (n.to_string(), t.to_string())))
            .expect("the shipped schemas are valid (checked by a unit test)")
    }

    /// Loads every `*.json` schema in `dir`.
    pub fn load_dir(dir: &Path) -> Result<Schemas, SchemaError> {
        let mut files = vec![];
        let entries = std::fs::read_dir(dir).map_err(|e| SchemaError::Io(dir.to_owned(), e))?;
        for entry in entries {
            let path = entry.map_err(|e| SchemaError::Io(dir.to_owned(), e))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read_to_string(&path).map_err(|e| SchemaError::Io(path.clone(), e))?;
                files.push((path.display().to_string(), text));
            }
        }
        files.sort();
        Schemas::from_files(files)
    }

    fn from_files(files: impl IntoIterator<Item = (String, String)>) -> Result<Schemas, SchemaError> {
        let mut by_type: HashMap<String, BTreeMap<u16, EventSchema>> = HashMap::new();
        for (file, text) in files {
            let invalid = |message: String| SchemaError::Invalid { file: file.clone(), message };
            let doc: Value =
                serde_json::from_str(&text).map_err(|e| invalid(format!("line {}: not JSON: {e}", e.line())))?;
            let ann = doc.get("x-pdledger").ok_or_else(|| invalid("no `x-pdledger` annotation".into()))?;
            let ann: Annotation =
                serde_json::from_value(ann.clone()).map_err(|e| invalid(format!("`x-pdledger`: {e}")))?;
            if !crate::record::type_is_valid(&ann.event_type) {
                return Err(invalid(format!("event type `{}` must be 1..=64 of [a-z0-9._-]", ann.event_type)));
            }
            let base = Path::new(&file).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let expected = format!("{}.v{}.json", ann.event_type, ann.version);
            if base != expected {
                return Err(invalid(format!("file name must be {expected} for the type and version it declares")));
            }
            if ann.version == 0 {
                return Err(invalid("version counts from 1".into()));
            }
            for (name, pointer) in &ann.lookup {
                if !LOOKUP_KEYS.contains(&name.as_str()) {
                    return Err(invalid(format!("unknown lookup key `{name}` (known: {})", LOOKUP_KEYS.join(", "))));
                }
                if !pointer.starts_with('/') {
                    return Err(invalid(format!("lookup `{name}`: `{pointer}` is not a JSON pointer")));
                }
            }
            let validator = jsonschema::options()
                .should_validate_formats(true)
                .build(&doc)
                .map_err(|e| invalid(format!("not a valid JSON Schema: {e}")))?;
            let schema = EventSchema {
                event_type: ann.event_type.clone(),
                version: ann.version,
                category: ann.category,
                purpose: ann.purpose,
                legal_basis: ann.legal_basis,
                label: ann.label,
                lookup: ann.lookup,
                fields: ann.fields,
                correction: ann.correction,
                validator,
                document: doc,
            };
            by_type.entry(ann.event_type).or_default().insert(schema.version, schema);
        }
        if by_type.is_empty() {
            return Err(SchemaError::Invalid { file: "schemas".into(), message: "no schemas found".into() });
        }
        Ok(Schemas { by_type })
    }

    /// The newest version of an event type: what appends are validated against.
    pub fn current(&self, event_type: &str) -> Option<&EventSchema> {
        self.by_type.get(event_type)?.values().next_back()
    }

    pub fn get(&self, event_type: &str, version: u16) -> Option<&EventSchema> {
        self.by_type.get(event_type)?.get(&version)
    }

    pub fn types(&self) -> impl Iterator<Item = &EventSchema> {
        self.by_type.values().flat_map(|v| v.values())
    }

    /// Validates `data` against the current schema of `event_type`; the first violation wins.
    pub fn validate(&self, event_type: &str, data: &Value) -> Result<&EventSchema, Violation> {
        let schema = self.current(event_type).ok_or_else(|| Violation::UnknownType(event_type.to_owned()))?;
        if let Some(err) = schema.validator.iter_errors(data).next() {
            let keyword = err.schema_path().as_str().rsplit('/').next().unwrap_or("").to_owned();
            // Only these keywords' messages name properties rather than values.
            let message = match keyword.as_str() {
                "required" | "additionalProperties" | "minProperties" | "unevaluatedProperties" => {
                    format!("{err}")
                }
                _ => format!("fails `{keyword}`"),
            };
            return Err(Violation::Data {
                event_type: event_type.to_owned(),
                pointer: err.instance_path().as_str().to_owned(),
                message,
            });
        }
        Ok(schema)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn builtin_list_matches_the_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".v1.json") || n.contains(".v"))
            .filter(|n| n.ends_with(".json"))
            .collect();
        on_disk.sort();
        let listed: Vec<String> = BUILTIN.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(listed, on_disk);
        let s = Schemas::builtin();
        assert_eq!(s.current("invoice.issued").unwrap().category, Category::Billing);
        assert_eq!(s.current("drawing.registered").unwrap().category, Category::Projects);
        assert_eq!(s.current("note.added").unwrap().category, Category::Contact);
    }

    #[test]
    fn violations_name_the_pointer_not_the_value() {
        let s = Schemas::builtin();
        let bad = json!({"invoice_number": "1", "paid_on": "2024-01-01", "amount_ore": -5});
        let v = s.validate("invoice.paid", &bad).unwrap_err();
        assert_eq!(v.pointer(), "/amount_ore");
        assert!(!v.to_string().contains("-5"), "{v}");
        let secret = json!({"text": "x".repeat(5000)});
        let v = s.validate("note.added", &secret).unwrap_err();
        assert!(!v.to_string().contains("xxxx"));
        assert!(matches!(s.validate("nope", &json!({})), Err(Violation::UnknownType(_))));
        let extra = json!({"purpose": "newsletter", "channel": "email", "ssn": "1"});
        assert!(s.validate("consent.given", &extra).unwrap_err().to_string().contains("ssn"));
    }
}
