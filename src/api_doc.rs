//! The OpenAPI 3 document, built from the route table: every route the router has is in it,
//! with its permission, parameters, body and answers. Shapes are kept here, next to nothing
//! else, and a test checks the document against the router.

use serde_json::{json, Map, Value};

use crate::api::{Permission, RouteInfo};

fn error_schema() -> Value {
    json!({"type": "object", "required": ["error", "message"], "properties": {
        "error": {"type": "string"}, "message": {"type": "string"}}})
}

fn schemas() -> Value {
    json!({
        "Error": error_schema(),
        "Login": {"type": "object", "required": ["username", "password"], "additionalProperties": false,
            "properties": {"username": {"type": "string", "maxLength": 256}, "password": {"type": "string", "maxLength": 4096}}},
        "LoginResult": {"type": "object", "properties": {
            "token": {"type": "string"}, "expires_at": {"type": "string", "format": "date-time"},
            "mfa_required": {"type": "boolean"}, "mfa_token": {"type": "string"}}},
        "Session": {"type": "object", "required": ["token", "expires_at"], "properties": {
            "token": {"type": "string"}, "expires_at": {"type": "string", "format": "date-time"}}},
        "Totp": {"type": "object", "required": ["mfa_token", "code"], "additionalProperties": false, "properties": {
            "mfa_token": {"type": "string", "maxLength": 128}, "code": {"type": "string", "maxLength": 16}}},
        "Code": {"type": "object", "required": ["code"], "additionalProperties": false, "properties": {
            "code": {"type": "string", "maxLength": 16}}},
        "Me": {"type": "object", "required": ["username", "role", "totp_enabled"], "properties": {
            "username": {"type": "string"}, "role": {"type": "string", "enum": ["admin", "staff", "dpo", "auditor", "service"]},
            "totp_enabled": {"type": "boolean"}}},
        "Lookup": {"type": "object", "additionalProperties": false, "minProperties": 1, "maxProperties": 1,
            "description": "exactly one of the three", "properties": {
            "email": {"type": "string", "maxLength": 320}, "personal_number": {"type": "string", "maxLength": 320},
            "org_number": {"type": "string", "maxLength": 320}}},
        "Enrolment": {"type": "object", "required": ["secret", "otpauth_uri"], "properties": {
            "secret": {"type": "string"}, "otpauth_uri": {"type": "string"}}},
        "NewUser": {"type": "object", "required": ["username", "password", "role"], "additionalProperties": false, "properties": {
            "username": {"type": "string", "pattern": "^[a-z0-9._-]{1,64}$"},
            "password": {"type": "string", "minLength": 15, "maxLength": 1024},
            "role": {"type": "string", "enum": ["admin", "staff", "dpo", "auditor", "service"]}}},
        "User": {"type": "object", "required": ["username", "role"], "properties": {
            "username": {"type": "string"}, "role": {"type": "string"}, "disabled": {"type": "boolean"}, "totp": {"type": "boolean"}}},
        "Users": {"type": "object", "required": ["users"], "properties": {"users": {"type": "array", "items": {"$ref": "#/components/schemas/User"}}}},
        "Subjects": {"type": "object", "required": ["subjects"], "properties": {
            "subjects": {"type": "array", "items": {"type": "string", "format": "uuid"}}}},
        "SubjectCreated": {"type": "object", "required": ["id"], "properties": {"id": {"type": "string", "format": "uuid"}}},
        "Append": {"type": "object", "required": ["events"], "additionalProperties": false, "properties": {
            "expected_version": {"type": "integer", "minimum": 0},
            "events": {"type": "array", "minItems": 1, "maxItems": 1000, "items": {"type": "object", "required": ["type", "data"],
                "additionalProperties": false, "properties": {
                    "type": {"type": "string"}, "occurred_at": {"type": "string"}, "data": {"type": "object"}}}}}},
        "Appended": {"type": "object", "required": ["subject", "first_version", "last_version", "positions"], "properties": {
            "subject": {"type": "string", "format": "uuid"}, "first_version": {"type": "integer"}, "last_version": {"type": "integer"},
            "positions": {"type": "array", "items": {"type": "integer"}}}},
        "Event": {"type": "object", "required": ["version", "position", "type", "recorded_at", "actor", "data"], "properties": {
            "version": {"type": "integer"}, "position": {"type": "integer"}, "type": {"type": "string"},
            "occurred_at": {"type": "string"}, "recorded_at": {"type": "string"}, "actor": {"type": "string"}, "data": {"type": "object"}}},
        "Stream": {"type": "object", "required": ["subject", "version", "events"], "properties": {
            "subject": {"type": "string", "format": "uuid"}, "version": {"type": "integer"},
            "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}}}},
        "Feed": {"type": "object", "required": ["events", "next_position"], "properties": {
            "events": {"type": "array", "items": {"type": "object", "required": ["position", "subject", "version", "type", "recorded_at"],
                "properties": {"position": {"type": "integer"}, "subject": {"type": "string", "format": "uuid"}, "version": {"type": "integer"},
                    "type": {"type": "string"}, "recorded_at": {"type": "string"}, "occurred_at": {"type": "string"},
                    "data": {"type": "object"}, "erased": {"type": "boolean"}}}},
            "next_position": {"type": "integer"}}},
        "Audit": {"type": "object", "required": ["entries", "next_cursor"], "properties": {
            "entries": {"type": "array", "items": {"type": "object", "required": ["position", "at", "actor", "action", "subject", "outcome"],
                "properties": {"position": {"type": "integer"}, "at": {"type": "string"}, "actor": {"type": "string"},
                    "action": {"type": "string"}, "subject": {"type": ["string", "null"]}, "outcome": {"type": "string"},
                    "request_id": {"type": "string"}, "route": {"type": "string"}, "target": {"type": "string"}}}},
            "next_cursor": {"type": ["integer", "null"]}}},
        "Verify": {"type": "object", "required": ["ok", "events", "head"], "properties": {
            "ok": {"type": "boolean"}, "events": {"type": "integer"}, "uncommitted": {"type": "integer"},
            "head": {"$ref": "#/components/schemas/Head"}, "first_bad_position": {"type": "integer"}, "reason": {"type": "string"}}},
        "Head": {"type": "object", "required": ["position", "hash"], "properties": {
            "position": {"type": "integer"}, "hash": {"type": "string"}}},
        "Ok": {"type": "object"}
    })
}

fn int_param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": description, "schema": {"type": "integer", "minimum": 0}})
}

fn str_param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": description, "schema": {"type": "string"}})
}

/// (request body schema, success status, success schema, query parameters) per route.
fn shape(method: &str, path: &str) -> (Option<&'static str>, u16, &'static str, Vec<Value>) {
    match (method, path) {
        ("POST", "/v1/auth/login") => (Some("Login"), 200, "LoginResult", vec![]),
        ("POST", "/v1/auth/totp") => (Some("Totp"), 200, "Session", vec![]),
        ("POST", "/v1/auth/logout") => (None, 200, "Ok", vec![]),
        ("POST", "/v1/auth/totp/enroll") => (None, 200, "Enrolment", vec![]),
        ("GET", "/v1/auth/me") => (None, 200, "Me", vec![]),
        ("POST", "/v1/subjects/lookup") => (Some("Lookup"), 200, "Subjects", vec![]),
        ("POST", "/v1/auth/totp/activate") => (Some("Code"), 200, "Ok", vec![]),
        ("POST", "/v1/users") => (Some("NewUser"), 201, "User", vec![]),
        ("GET", "/v1/users") => (None, 200, "Users", vec![]),
        ("POST", "/v1/users/{name}/disable") => (None, 200, "User", vec![]),
        ("POST", "/v1/subjects") => (None, 201, "SubjectCreated", vec![]),
        ("GET", "/v1/subjects") => (
            None,
            200,
            "Subjects",
            vec![
                str_param("email", "any letter case, surrounding spaces ignored"),
                str_param("personal_number", "with or without the dash and the century digits"),
                str_param("org_number", "with or without the dash"),
            ],
        ),
        ("POST", "/v1/subjects/{id}/events") => (Some("Append"), 201, "Appended", vec![]),
        ("GET", "/v1/subjects/{id}/events") => (
            None,
            200,
            "Stream",
            vec![int_param("after_version", "only events after this version"), int_param("limit", "page size")],
        ),
        ("GET", "/v1/events") => (
            None,
            200,
            "Feed",
            vec![
                int_param("after_position", "only records after this position"),
                int_param("limit", "page size"),
                str_param("type", "only this event type"),
                int_param("wait", "seconds to wait for new events when there are none (bounded)"),
            ],
        ),
        ("GET", "/v1/audit") => (
            None,
            200,
            "Audit",
            vec![
                json!({"name": "subject", "in": "query", "required": false, "schema": {"type": "string", "format": "uuid"}}),
                str_param("actor", "username"),
                str_param("action", "audit action"),
                str_param("since", "YYYY-MM-DD or RFC 3339 UTC time"),
                int_param("limit", "page size"),
                int_param("cursor", "next_cursor of the previous page"),
            ],
        ),
        ("GET", "/v1/ledger/verify") => (None, 200, "Verify", vec![]),
        ("GET", "/v1/ledger/head") => (None, 200, "Head", vec![]),
        _ => (None, 200, "Ok", vec![]),
    }
}

fn response(description: &str, schema: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

pub fn document(routes: &[RouteInfo]) -> Value {
    let mut paths = Map::new();
    for r in routes {
        let method = r.method.as_str();
        let (body, ok_status, ok_schema, mut params) = shape(method, r.path);
        for seg in r.path.split('/') {
            if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                let schema =
                    if name == "id" { json!({"type": "string", "format": "uuid"}) } else { json!({"type": "string"}) };
                params.push(json!({"name": name, "in": "path", "required": true, "schema": schema}));
            }
        }
        let mut responses = Map::new();
        let ok = match r.path {
            "/metrics" => {
                json!({"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}})
            }
            "/openapi.json" => {
                json!({"description": "this document", "content": {"application/json": {"schema": {"type": "object"}}}})
            }
            "/" | "/console/app.js" | "/console/qr.js" | "/console/app.css" => {
                let media = match r.path.rsplit('.').next() {
                    Some("js") => "text/javascript",
                    Some("css") => "text/css",
                    _ => "text/html",
                };
                json!({"description": "a file of the DPO console, compiled into the binary, with its Content-Security-Policy",
                       "content": {media: {"schema": {"type": "string"}}}})
            }
            _ => response("success", ok_schema),
        };
        responses.insert(ok_status.to_string(), ok);
        let mut errors =
            vec![(400, "malformed JSON or parameters"), (503, "overloaded or unavailable; see Retry-After")];
        if r.permission != Permission::Public {
            errors.push((401, "no or bad token"));
            errors.push((403, "the caller's role lacks the permission"));
        }
        if body.is_some() {
            errors.extend([(413, "body over the limit"), (415, "not application/json"), (422, "invalid content")]);
        }
        match r.path {
            "/v1/auth/login" | "/v1/auth/totp" => {
                errors.extend([(401, "wrong credentials"), (429, "too many failures; see Retry-After")])
            }
            "/v1/subjects/{id}/events" => {
                errors.extend([(404, "unknown subject"), (409, "version conflict"), (410, "erased subject")])
            }
            "/v1/users" if method == "POST" => errors.push((409, "user exists")),
            "/v1/users/{name}/disable" => errors.push((404, "unknown user")),
            "/v1/auth/totp/activate" => errors.push((409, "not enrolled")),
            _ => {}
        }
        for (status, what) in errors {
            responses.insert(status.to_string(), response(what, "Error"));
        }
        let mut op = json!({
            "summary": r.summary,
            "operationId": format!("{}{}", method.to_lowercase(), r.path.replace(['/', '{', '}', '.'], "_")),
            "x-permission": r.permission,
            "parameters": params,
            "responses": responses,
        });
        if r.permission == Permission::Public {
            op["security"] = json!([]);
        }
        if let Some(b) = body {
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{b}")}}}});
        }
        paths.entry(r.path.to_owned()).or_insert_with(|| json!({}))[method.to_lowercase()] = op;
    }
    json!({
        "openapi": "3.0.3",
        "info": {"title": "pdledger", "version": env!("CARGO_PKG_VERSION"),
                 "description": "An event-sourced personal-data ledger. Roles: admin, staff, dpo, auditor, service; each operation's x-permission names what it needs."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
        },
        "security": [{"bearer": []}],
    })
}
