//! The OpenAPI 3.1 document, built from the route table: every route the router has is in it,
//! with its permission, the roles that have it, its security, parameters, request body, links,
//! and a response for every status the route can answer with. Shapes are kept here and only
//! here: `Routes::add` refuses a route this module does not document, and a schemathesis run
//! (`tests/it/schemathesis.rs`) checks the server's answers against the document.
//!
//! What depends on the running server comes from it ([`Facts`]): the event types with their
//! data schemas (the same JSON Schemas appends are validated against), the views, the limits.

use serde_json::{json, Map, Value};

use crate::api::{AppState, Permission, RouteInfo};
use crate::auth::Role;

/// What the document takes from the running server.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// Event type → the JSON Schema of its `data` (the current version's).
    pub event_types: Vec<(String, Value)>,
    pub views: Vec<String>,
    pub events_per_append_max: usize,
    pub wait_secs_max: u64,
    pub page_max: usize,
}

impl Facts {
    pub fn of(state: &AppState) -> Facts {
        let schemas = state.ledger.schemas();
        let mut event_types: Vec<(String, Value)> = vec![];
        for s in schemas.types() {
            if schemas.current(&s.event_type).is_some_and(|c| c.version == s.version) {
                event_types.push((s.event_type.clone(), s.document().clone()));
            }
        }
        event_types.sort_by(|a, b| a.0.cmp(&b.0));
        Facts {
            event_types,
            views: state.ledger.projections().views().iter().map(|v| v.name().to_owned()).collect(),
            events_per_append_max: state.ledger.limits().events_per_append_max,
            wait_secs_max: state.config.wait_secs_max,
            page_max: state.config.page_max,
        }
    }
}

/// The register extract's JSON Schema, as shipped.
const EXTRACT_SCHEMA: &str = include_str!("../schemas/export/extract.v1.json");

/// Keywords that only annotate: a `$ref` with only these beside it can be replaced by the
/// definition it names, merged with them.
const ANNOTATIONS: [&str; 4] = ["description", "title", "examples", "x-pdledger"];

/// A stand-alone JSON Schema made fit to sit inside `components/schemas`: no `$schema` or
/// `$id` (they would change how references resolve), its `#/$defs/...` references replaced
/// by the definitions (none of the shipped schemas is recursive), no `x-pdledger` block.
fn embed(mut schema: Value) -> Value {
    let defs = match schema.as_object_mut() {
        Some(o) => {
            for k in ["$schema", "$id", "x-pdledger"] {
                o.remove(k);
            }
            o.remove("$defs").unwrap_or(Value::Null)
        }
        None => Value::Null,
    };
    inline(&mut schema, &defs, 0);
    schema
}

fn inline(v: &mut Value, defs: &Value, depth: usize) {
    assert!(depth < 32, "a recursive $defs reference cannot be inlined");
    match v {
        Value::Object(o) => {
            if let Some(target) = o.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/$defs/")) {
                let mut def = defs.get(target).cloned().unwrap_or_else(|| panic!("no $defs/{target}"));
                inline(&mut def, defs, depth + 1);
                o.remove("$ref");
                if o.keys().all(|k| ANNOTATIONS.contains(&k.as_str())) {
                    let siblings = std::mem::take(o);
                    if let Value::Object(d) = def {
                        o.extend(d);
                    }
                    o.extend(siblings);
                } else {
                    o.insert("allOf".into(), json!([def]));
                }
            }
            o.remove("x-pdledger");
            for child in o.values_mut() {
                inline(child, defs, depth);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|c| inline(c, defs, depth)),
        _ => {}
    }
}

fn r(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SS[.fff]Z`, a real calendar date from 1970 on: exactly
/// what `time::parse_timestamp` accepts.
fn timestamp_pattern() -> String {
    let year = "(?:19[7-9][0-9]|[2-9][0-9]{3})";
    let month_day = "(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))";
    let leap_day =
        "(?:19(?:7[26]|8[048]|9[26])|[2-9][0-9](?:0[48]|[2468][048]|[13579][26])|(?:[2468][048]|[3579][26])00)-02-29";
    let time = "T(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\\.[0-9]{1,3})?Z";
    format!("^(?:{year}-{month_day}|{leap_day})(?:{time})?$")
}

fn schemas(f: &Facts) -> Value {
    let uuid = json!({"type": "string", "format": "uuid"});
    let u64_max = json!(u64::MAX);
    let count = json!({"type": "integer", "minimum": 0});
    let role = json!({"type": "string", "enum": Role::ALL.iter().map(|r| r.name()).collect::<Vec<_>>()});
    let timestamp = json!({"type": "string", "pattern": timestamp_pattern(), "maxLength": 24});
    let recorded = json!({"type": "string", "format": "date-time"});
    let actions: Vec<String> = crate::audit::Action::ALL.iter().map(|a| a.name()).collect();
    // One alternative per event type: its name and the schema of its data.
    let events: Vec<Value> = f
        .event_types
        .iter()
        .map(|(t, schema)| {
            json!({"type": "object", "title": t, "required": ["type", "data"], "additionalProperties": false,
                   "properties": {"type": {"const": t}, "occurred_at": r("Timestamp"), "data": embed(schema.clone())}})
        })
        .collect();
    let mut all = Map::new();
    all.extend(object(json!({
        "Error": {"type": "object", "required": ["error", "message"],
            "description": "Every refusal. Some carry more: `erased_at` (410), `current_version` (409 version_conflict), `index` and `pointer` (an event's violation).",
            "properties": {
                "error": {"type": "string", "pattern": "^[a-z_]+$"}, "message": {"type": "string"},
                "erased_at": recorded, "current_version": count, "index": count, "pointer": {"type": "string"}}},
        "Uuid": uuid,
        "Timestamp": timestamp,
        "Role": role,
        "Login": {"type": "object", "required": ["username", "password"], "additionalProperties": false,
            "properties": {"username": {"type": "string", "maxLength": 256}, "password": {"type": "string", "maxLength": 4 * crate::auth::PASSWORD_CHARS_MAX}}},
        "Session": {"type": "object", "required": ["token", "expires_at"], "additionalProperties": false, "properties": {
            "token": {"type": "string", "pattern": "^pdl_[0-9a-f]{64}$"}, "expires_at": recorded}},
        "MfaChallenge": {"type": "object", "required": ["mfa_required", "mfa_token"], "additionalProperties": false,
            "description": "The password was right; the account has two-step login: send the mfa token and a code to /v1/auth/totp.",
            "properties": {"mfa_required": {"const": true}, "mfa_token": {"type": "string", "pattern": "^mfa_[0-9a-f]{64}$"}}},
        "LoginResult": {"oneOf": [r("Session"), r("MfaChallenge")]},
        "Totp": {"type": "object", "required": ["mfa_token", "code"], "additionalProperties": false, "properties": {
            "mfa_token": {"type": "string", "maxLength": 128}, "code": {"type": "string", "pattern": "^[0-9]{6}$"}}},
        "Code": {"type": "object", "required": ["code"], "additionalProperties": false, "properties": {
            "code": {"type": "string", "pattern": "^[0-9]{6}$"}}},
        "LoggedOut": {"type": "object", "required": ["logged_out"], "additionalProperties": false, "properties": {"logged_out": {"const": true}}},
        "Me": {"type": "object", "required": ["username", "role", "totp_enabled"], "additionalProperties": false, "properties": {
            "username": {"type": "string"}, "role": r("Role"), "totp_enabled": {"type": "boolean"}}},
        "Enrolment": {"type": "object", "required": ["secret", "otpauth_uri"], "additionalProperties": false, "properties": {
            "secret": {"type": "string", "pattern": "^[A-Z2-7]+=*$"}, "otpauth_uri": {"type": "string", "pattern": "^otpauth://totp/"}}},
        "Activated": {"type": "object", "required": ["active"], "additionalProperties": false, "properties": {"active": {"const": true}}},
    })));
    all.extend(object(json!({
        "Lookup": {"type": "object", "additionalProperties": false, "minProperties": 1, "maxProperties": 1,
            "description": "Exactly one of the three, normalised before the blind-index lookup: email in any letter case with surrounding spaces ignored, personal number with or without the dash and century digits, organisation number with or without the dash.",
            "properties": {
                "email": {"type": "string", "maxLength": 320}, "personal_number": {"type": "string", "maxLength": 320},
                "org_number": {"type": "string", "maxLength": 320}}},
        "NewUser": {"type": "object", "required": ["username", "password", "role"], "additionalProperties": false, "properties": {
            "username": {"type": "string", "pattern": "^[a-z0-9._-]{1,64}$"},
            "password": {"type": "string", "minLength": crate::auth::PASSWORD_CHARS_MIN, "maxLength": crate::auth::PASSWORD_CHARS_MAX},
            "role": r("Role")}},
        "UserCreated": {"type": "object", "required": ["username", "role"], "additionalProperties": false, "properties": {
            "username": {"type": "string"}, "role": r("Role")}},
        "User": {"type": "object", "required": ["username", "role", "disabled", "totp"], "additionalProperties": false, "properties": {
            "username": {"type": "string"}, "role": r("Role"), "disabled": {"type": "boolean"}, "totp": {"type": "boolean"}}},
        "Users": {"type": "object", "required": ["users"], "additionalProperties": false, "properties": {"users": {"type": "array", "items": r("User")}}},
        "UserDisabled": {"type": "object", "required": ["username", "disabled"], "additionalProperties": false, "properties": {
            "username": {"type": "string"}, "disabled": {"const": true}}},
    })));
    all.extend(object(json!({
        "Subjects": {"type": "object", "required": ["subjects"], "additionalProperties": false, "properties": {
            "subjects": {"type": "array", "items": r("Uuid")}}},
        "SubjectCreated": {"type": "object", "required": ["id"], "additionalProperties": false, "properties": {"id": r("Uuid")}},
        "NewEvent": {"oneOf": events},
        "Append": {"type": "object", "required": ["events"], "additionalProperties": false, "properties": {
            "expected_version": {"type": "integer", "minimum": 0, "maximum": u64_max,
                "description": "The subject's version the events were based on: 409 when it is no longer current"},
            "events": {"type": "array", "minItems": 1, "maxItems": f.events_per_append_max, "items": r("NewEvent")}}},
        "Appended": {"type": "object", "required": ["subject", "first_version", "last_version", "positions"], "additionalProperties": false, "properties": {
            "subject": r("Uuid"), "first_version": count, "last_version": count,
            "positions": {"type": "array", "items": count}}},
        "Event": {"type": "object", "required": ["version", "position", "type", "occurred_at", "recorded_at", "actor", "data"], "additionalProperties": false, "properties": {
            "version": count, "position": count, "type": {"type": "string"},
            "occurred_at": {"type": "string"}, "recorded_at": recorded, "actor": {"type": "string"}, "data": {"type": "object"}}},
        "Stream": {"type": "object", "required": ["subject", "version", "events"], "additionalProperties": false, "properties": {
            "subject": r("Uuid"), "version": count, "events": {"type": "array", "items": r("Event")}}},
    })));
    all.extend(object(json!({
        "Extract": embed(serde_json::from_str(EXTRACT_SCHEMA).expect("the shipped extract schema is JSON")),
        "Erase": {"type": "object", "required": ["reason"], "additionalProperties": false, "properties": {
            "reason": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*[^\\s\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u001f\\u007f-\\u009f]*$",
                "description": "Why: kept in clear in the ledger, so no personal data. Not blank, no control characters."}}},
        "Receipt": {"type": "object", "required": ["subject", "erased_at", "position", "receipt"], "additionalProperties": false, "properties": {
            "subject": r("Uuid"), "erased_at": recorded, "position": count,
            "receipt": {"type": "object", "additionalProperties": false,
                "required": ["subject", "erased_at", "position", "hash", "actor", "reason", "key_generation", "retained", "rotation", "note"], "properties": {
                "subject": r("Uuid"), "erased_at": recorded, "position": count, "hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "actor": {"type": "string"}, "reason": {"type": "string"}, "key_generation": count,
                "retained": {"type": "array", "items": {"type": "object", "additionalProperties": false,
                    "required": ["category", "until", "shredded", "basis", "legal_reference"], "properties": {
                    "category": {"type": "string"}, "until": {"type": "string"}, "shredded": {"type": "boolean"},
                    "basis": {"type": ["object", "null"]}, "legal_reference": {"type": ["string", "null"]}}}},
                "rotation": {"enum": ["pending", "complete"]}, "note": {"type": "string"}}}}},
        "Restriction": {"type": "object", "required": ["subject", "restricted"], "additionalProperties": false, "properties": {
            "subject": r("Uuid"), "restricted": {"type": "boolean"}}},
        "Rotated": {"type": "object", "required": ["from", "to", "keys", "index_entries", "seconds"], "additionalProperties": false, "properties": {
            "from": count, "to": count, "keys": count, "index_entries": count, "seconds": {"type": "number", "minimum": 0}}},
    })));
    all.extend(object(json!({
        "Feed": {"type": "object", "required": ["events", "next_position"], "additionalProperties": false, "properties": {
            "events": {"type": "array", "items": {"type": "object", "required": ["position", "subject", "version", "type", "recorded_at"],
                "additionalProperties": false,
                "description": "An event. An erased subject's (or a crypto-shredded category's) has `erased` and no data (the dpo alone still sees the data of categories a legal obligation keeps); a restricted subject's (Art. 18) has `restricted` and no data for anyone but the dpo.",
                "properties": {"position": count, "subject": r("Uuid"), "version": count,
                    "type": {"type": "string"}, "recorded_at": recorded, "occurred_at": {"type": "string"},
                    "data": {"type": "object"}, "erased": {"const": true}, "restricted": {"const": true}}}},
            "next_position": count}},
        "ViewPage": {"type": "object", "required": ["view", "items", "next_cursor"], "additionalProperties": false,
            "description": "A page of documents in subject-id order. A restricted subject's (Art. 18) and an erased subject's kept documents are left out for all but the dpo, so a page can hold fewer items than its limit and still have a next_cursor.",
            "properties": {
            "view": {"type": "string"},
            "items": {"type": "array", "items": {"type": "object", "required": ["subject", "version", "data"], "additionalProperties": false,
                "properties": {"subject": r("Uuid"), "version": count, "data": {"type": "object"}}}},
            "next_cursor": {"oneOf": [r("Uuid"), {"type": "null"}]}}},
        "ViewDocument": {"type": "object", "required": ["view", "subject", "version", "data"], "additionalProperties": false, "properties": {
            "view": {"type": "string"}, "subject": r("Uuid"), "version": count, "data": {"type": "object"}}},
        "Audit": {"type": "object", "required": ["entries", "next_cursor"], "additionalProperties": false, "properties": {
            "entries": {"type": "array", "items": {"type": "object", "required": ["position", "at", "actor", "action", "subject", "outcome"],
                "additionalProperties": false,
                "properties": {"position": count, "at": recorded, "actor": {"type": "string"},
                    "action": {"type": "string", "enum": actions}, "subject": {"oneOf": [r("Uuid"), {"type": "null"}]},
                    "outcome": {"enum": ["ok", "denied", "failed"]},
                    "request_id": {"type": "string"}, "route": {"type": "string"}, "target": {"type": "string"}}}},
            "next_cursor": {"type": ["integer", "null"], "minimum": 0}}},
        "Head": {"type": "object", "required": ["position", "hash"], "additionalProperties": false, "properties": {
            "position": count, "hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}},
        "Verify": {"type": "object", "required": ["ok", "events", "uncommitted", "head"], "additionalProperties": false, "properties": {
            "ok": {"type": "boolean"}, "events": count, "uncommitted": count,
            "head": r("Head"), "first_bad_position": count, "reason": {"type": "string"}}},
        "Health": {"type": "object", "required": ["status"], "additionalProperties": false, "properties": {
            "status": {"enum": ["ok", "degraded"]},
            "backup": {"type": "object", "required": ["last_position", "lag_records", "failing"], "additionalProperties": false,
                "properties": {"last_position": count, "lag_records": count, "failing": {"type": "boolean"}}}}},
    })));
    Value::Object(all)
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(o) => o,
        _ => unreachable!("an object literal"),
    }
}

/// A query parameter.
fn q(name: &str, schema: Value, description: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": description, "schema": schema})
}

fn uint() -> Value {
    json!({"type": "integer", "minimum": 0, "maximum": u64::MAX})
}

/// A link from a response to an operation that takes one of its fields as a path parameter.
fn link(operation: &str, param: &str, pointer: &str) -> Value {
    json!({"operationId": operation, "parameters": {param: format!("$response.body#{pointer}")}})
}

fn subject_links(pointer: &str) -> Value {
    let mut links = Map::new();
    for (name, op) in [
        ("AppendEvents", "post_v1_subjects__id__events"),
        ("ReadEvents", "get_v1_subjects__id__events"),
        ("Export", "get_v1_subjects__id__export"),
        ("Restrict", "post_v1_subjects__id__restrict"),
        ("Unrestrict", "post_v1_subjects__id__unrestrict"),
        ("Erase", "post_v1_subjects__id__erase"),
        ("ViewDocument", "get_v1_views__view___id_"),
    ] {
        links.insert(name.into(), link(op, "id", pointer));
    }
    Value::Object(links)
}

/// One operation's shapes: request body, success, parameters, statuses of its own, links.
struct Spec {
    body: Option<&'static str>,
    ok: u16,
    /// The success response: a schema name (JSON), or a whole response object.
    ok_response: Value,
    params: Vec<Value>,
    errors: Vec<(u16, &'static str)>,
    links: Option<Value>,
}

impl Spec {
    fn json(body: Option<&'static str>, ok: u16, schema: &str) -> Spec {
        Spec {
            body,
            ok,
            ok_response: json!({"description": "success", "content": {"application/json": {"schema": r(schema)}}}),
            params: vec![],
            errors: vec![],
            links: None,
        }
    }
    fn content(media: &str, schema: Value, description: &str) -> Spec {
        Spec {
            body: None,
            ok: 200,
            ok_response: json!({"description": description, "content": {media: {"schema": schema}}}),
            params: vec![],
            errors: vec![],
            links: None,
        }
    }
    fn params(mut self, params: Vec<Value>) -> Spec {
        self.params = params;
        self
    }
    fn errors(mut self, errors: &[(u16, &'static str)]) -> Spec {
        self.errors.extend_from_slice(errors);
        self
    }
    fn links(mut self, links: Value) -> Spec {
        self.links = Some(links);
        self
    }
}

const GONE: (u16, &str) = (410, "the subject was erased");
const NO_SUBJECT: (u16, &str) = (404, "no such subject");
const RESTRICTED: (u16, &str) =
    (403, "the caller's role lacks the permission, or the subject's processing is restricted (Art. 18)");

fn spec(method: &str, path: &str, f: &Facts) -> Option<Spec> {
    let limit = || q("limit", uint(), &format!("page size, 1 to {} (outside that range: the nearest)", f.page_max));
    Some(match (method, path) {
        ("POST", "/v1/auth/login") => Spec::json(Some("Login"), 200, "LoginResult").errors(&[
            (401, "wrong username or password, or a disabled account"),
            (422, "a field over its length"),
            (429, "too many failures for the account or the address; see Retry-After"),
        ]),
        ("POST", "/v1/auth/totp") => Spec::json(Some("Totp"), 200, "Session").errors(&[
            (401, "an unknown or expired mfa token, or a wrong code"),
            (422, "a field over its length"),
            (429, "too many failures; see Retry-After"),
        ]),
        ("POST", "/v1/auth/logout") => Spec::json(None, 200, "LoggedOut"),
        ("GET", "/v1/auth/me") => Spec::json(None, 200, "Me"),
        ("POST", "/v1/auth/totp/enroll") => Spec::json(None, 200, "Enrolment"),
        ("POST", "/v1/auth/totp/activate") => Spec::json(Some("Code"), 200, "Activated")
            .errors(&[(409, "no enrolment started"), (422, "a wrong or reused code")]),
        ("POST", "/v1/users") => Spec::json(Some("NewUser"), 201, "UserCreated")
            .errors(&[(409, "the user exists"), (422, "a bad username, password or role")])
            .links(json!({"Disable": link("post_v1_users__name__disable", "name", "/username")})),
        ("GET", "/v1/users") => Spec::json(None, 200, "Users"),
        ("POST", "/v1/users/{name}/disable") => {
            Spec::json(None, 200, "UserDisabled").errors(&[(404, "no such user")])
        }
        ("POST", "/v1/subjects") => Spec::json(None, 201, "SubjectCreated").links(subject_links("/id")),
        ("GET", "/v1/subjects") => Spec::json(None, 200, "Subjects").params(vec![json!({
            "name": "lookup", "in": "query", "required": true, "style": "form", "explode": true,
            "description": "exactly one of email, personal_number, org_number (as separate query parameters)",
            "schema": r("Lookup")})]),
        ("POST", "/v1/subjects/lookup") => Spec::json(Some("Lookup"), 200, "Subjects"),
        ("POST", "/v1/subjects/{id}/events") => Spec::json(Some("Append"), 201, "Appended")
            .errors(&[
                RESTRICTED,
                (409, "version conflict (expected_version is not current)"),
                GONE,
                (422, "an event breaks its type's schema, or a bad occurred_at"),
            ])
            .links(subject_links("/subject")),
        ("GET", "/v1/subjects/{id}/events") => Spec::json(None, 200, "Stream")
            .params(vec![q("after_version", uint(), "only events after this version"), limit()])
            .errors(&[RESTRICTED, NO_SUBJECT, GONE]),
        ("GET", "/v1/subjects/{id}/export") => Spec {
            ok_response: json!({"description": "the register extract: JSON, or a readable page with `Accept: text/html`",
                "content": {"application/json": {"schema": r("Extract")}, "text/html": {"schema": {"type": "string"}}}}),
            ..Spec::json(None, 200, "Extract")
        }
        .errors(&[RESTRICTED, NO_SUBJECT, GONE]),
        ("POST", "/v1/subjects/{id}/erase") => Spec::json(Some("Erase"), 200, "Receipt")
            .errors(&[NO_SUBJECT, (422, "a blank reason, or one with control characters")]),
        ("POST", "/v1/subjects/{id}/restrict") | ("POST", "/v1/subjects/{id}/unrestrict") => {
            Spec::json(None, 200, "Restriction").errors(&[NO_SUBJECT, GONE])
        }
        ("POST", "/v1/keys/rotate") => Spec::json(None, 200, "Rotated"),
        ("GET", "/v1/events") => Spec::json(None, 200, "Feed").params(vec![
            q("after_position", uint(), "only records after this position"),
            q("limit", uint(), &format!("page size, 1 to {} (default 100)", f.page_max)),
            q(
                "type",
                json!({"type": "string", "enum": f.event_types.iter().map(|e| &e.0).collect::<Vec<_>>()}),
                "only this event type",
            ),
            q(
                "wait",
                uint(),
                &format!("seconds to wait for new events when there are none (at most {})", f.wait_secs_max),
            ),
        ]),
        ("GET", "/v1/views/{view}") => Spec::json(None, 200, "ViewPage")
            .params(vec![limit(), q("cursor", r("Uuid"), "next_cursor of the previous page")])
            .errors(&[(404, "no such view")]),
        ("GET", "/v1/views/{view}/{id}") => Spec::json(None, 200, "ViewDocument")
            .errors(&[RESTRICTED, (404, "no such view or subject"), GONE]),
        ("GET", "/v1/audit") => Spec::json(None, 200, "Audit").params(vec![
            q("subject", r("Uuid"), "only entries about this subject"),
            q("actor", json!({"type": "string"}), "only entries by this username"),
            q(
                "action",
                json!({"type": "string", "enum": crate::audit::Action::ALL.iter().map(|a| a.name()).collect::<Vec<_>>()}),
                "only this action",
            ),
            q("since", r("Timestamp"), "entries recorded at or after this time (a date is its midnight UTC)"),
            q("until", r("Timestamp"), "entries recorded before this time"),
            limit(),
            q("cursor", uint(), "next_cursor of the previous page"),
        ]),
        ("GET", "/v1/ledger/verify") => Spec::json(None, 200, "Verify"),
        ("GET", "/v1/ledger/head") => Spec::json(None, 200, "Head"),
        ("GET", "/healthz") => Spec::json(None, 200, "Health"),
        ("GET", "/metrics") => Spec::content("text/plain", json!({"type": "string"}), "Prometheus text"),
        ("GET", "/openapi.json") => Spec::content("application/json", json!({"type": "object"}), "this document"),
        ("GET", "/") => Spec::content("text/html", json!({"type": "string"}), "the DPO console's page"),
        ("GET", "/console/app.js") | ("GET", "/console/qr.js") => {
            Spec::content("text/javascript", json!({"type": "string"}), "a script of the DPO console")
        }
        ("GET", "/console/app.css") => {
            Spec::content("text/css", json!({"type": "string"}), "the DPO console's style sheet")
        }
        _ => return None,
    })
}

/// Whether the document has this operation's shapes: `Routes::add` refuses a route without.
pub fn is_documented(method: &str, path: &str) -> bool {
    spec(method, path, &Facts::default()).is_some()
}

fn error(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": r("Error")}}})
}

fn with_header(mut response: Value, name: &str, schema: Value, description: &str) -> Value {
    response["headers"] = json!({name: {"required": true, "description": description, "schema": schema}});
    response
}

pub fn document(routes: &[RouteInfo], f: &Facts) -> Value {
    let mut paths = Map::new();
    for route in routes {
        let method = route.method.as_str();
        let s = spec(method, route.path, f)
            .unwrap_or_else(|| panic!("{method} {} has no shapes in api_doc.rs", route.path));
        let mut params = s.params;
        for seg in route.path.split('/') {
            if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                let schema = match name {
                    "id" => r("Uuid"),
                    "view" => json!({"type": "string", "enum": f.views}),
                    _ => json!({"type": "string", "pattern": "^[a-z0-9._-]{1,64}$"}),
                };
                params.push(json!({"name": name, "in": "path", "required": true, "schema": schema}));
            }
        }
        let public = route.permission == Permission::Public;
        let mut ok = s.ok_response;
        if let Some(links) = s.links {
            ok["links"] = links;
        }
        let mut responses = Map::new();
        responses.insert(s.ok.to_string(), ok);
        let mut errors: Vec<(u16, &str)> = vec![(400, "malformed JSON, parameters or path")];
        if !public {
            errors.push((401, "no token, or an invalid, expired or revoked one"));
            errors.push((403, "the caller's role lacks the permission"));
        }
        if s.body.is_some() {
            errors.push((413, "the body is over the limit"));
            errors.push((415, "the body is not sent as application/json"));
        }
        errors.extend(s.errors);
        errors.push((503, "overloaded, timed out or unable to write; see Retry-After"));
        // Everything but the public pages writes to the ledger (if only an audit entry).
        if !(public && method == "GET") {
            errors.push((507, "the data directory's disk is nearly full: nothing was written; see Retry-After"));
        }
        for (status, what) in errors {
            // A later, more specific description of the same status wins.
            let mut resp = error(what);
            resp = match status {
                401 => with_header(resp, "WWW-Authenticate", json!({"const": "Bearer"}), "the scheme to use"),
                429 | 503 | 507 => {
                    with_header(resp, "Retry-After", json!({"type": "integer", "minimum": 1}), "seconds to wait")
                }
                _ => resp,
            };
            responses.insert(status.to_string(), resp);
        }
        let roles: Vec<&str> =
            Role::ALL.iter().filter(|r| !public && route.permission.allows(**r)).map(|r| r.name()).collect();
        let mut op = json!({
            "summary": route.summary,
            "operationId": format!("{}{}", method.to_lowercase(), route.path.replace(['/', '{', '}', '.'], "_")),
            "x-permission": route.permission,
            "x-roles": roles,
            "security": if public { json!([]) } else { json!([{"bearer": []}]) },
            "parameters": params,
            "responses": responses,
        });
        if let Some(b) = s.body {
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": r(b)}}});
        }
        paths.entry(route.path.to_owned()).or_insert_with(|| json!({}))[method.to_lowercase()] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "pdledger", "version": env!("CARGO_PKG_VERSION"),
                 "description": "An event-sourced personal-data ledger. Roles: admin, staff, dpo, auditor, service; each operation's x-permission names what it needs and x-roles who has it. Log in at /v1/auth/login and send the token as `Authorization: Bearer pdl_...`."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "a session token from /v1/auth/login or /v1/auth/totp"}},
            "schemas": schemas(f),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pattern as the server's own JSON Schema validator reads it.
    struct Pattern(jsonschema::Validator);

    impl Pattern {
        fn new(pattern: &str) -> Pattern {
            Pattern(jsonschema::validator_for(&json!({"type": "string", "pattern": pattern})).unwrap())
        }
        fn is_match(&self, s: &str) -> bool {
            self.0.is_valid(&json!(s))
        }
    }

    #[test]
    fn erasure_reasons_match_what_the_server_takes() {
        let schema = &schemas(&Facts::default())["Erase"]["properties"]["reason"];
        let re = Pattern::new(schema["pattern"].as_str().unwrap());
        let max = schema["maxLength"].as_u64().unwrap() as usize;
        for s in [
            "court order",
            " x ",
            "ü",
            "a\u{a0}",
            "",
            " ",
            "\u{3000}",
            "a\tb",
            "a\n",
            "\u{85}x",
            "x\u{7f}",
            &"y".repeat(200),
            &"y".repeat(201),
        ] {
            let documented = re.is_match(s) && (1..=max).contains(&s.chars().count());
            assert_eq!(documented, crate::api::reason_is_valid(s), "{s:?}");
        }
    }

    #[test]
    fn timestamps_match_what_the_server_parses() {
        let re = Pattern::new(&timestamp_pattern());
        for s in [
            "2024-02-29",
            "2000-02-29",
            "1972-02-29",
            "2023-01-31",
            "1970-01-01",
            "2024-06-30T23:59:60Z",
            "2024-06-30T00:00:00.1Z",
            "2024-06-30T00:00:00.123Z",
            "9999-12-31",
            "2023-02-29",
            "2100-02-29",
            "1969-12-31",
            "2023-04-31",
            "2023-13-01",
            "2023-00-10",
            "2023-01-00",
            "2024-06-30T24:00:00Z",
            "2024-06-30T00:60:00Z",
            "2024-06-30T00:00:00.1234Z",
            "2024-06-30T00:00:00.Z",
            "2024-06-30T00:00:00",
            "2024-06-30T00:00:00+01:00",
            "2024-06-30 00:00:00Z",
            "2024-6-30",
        ] {
            let parsed = crate::time::parse_timestamp(s).is_some();
            assert_eq!(re.is_match(s), parsed, "{s}: the pattern and parse_timestamp disagree (parsed: {parsed})");
        }
        // Every day of a few years, leap and not, both ways.
        for year in [1970, 1999, 2000, 2023, 2024, 2100, 2400] {
            for month in 1..=12 {
                for day in 0..=32 {
                    let s = format!("{year:04}-{month:02}-{day:02}");
                    assert_eq!(re.is_match(&s), crate::time::parse_timestamp(&s).is_some(), "{s}");
                }
            }
        }
    }

    #[test]
    fn embedded_schemas_have_no_defs_or_ids_left() {
        let extract = embed(serde_json::from_str(EXTRACT_SCHEMA).unwrap());
        let text = extract.to_string();
        assert!(!text.contains("$defs") && !text.contains("$id") && !text.contains("\"$schema\""), "{text}");
        assert_eq!(extract["properties"]["subject"]["format"], "uuid");
    }
}
