//! The HTTP API (JSON under `/v1`), as a function: `router(state) -> Router`.
//!
//! Every route is added through `Routes::add`, which takes its permission: the table of
//! routes and permissions is the router, the OpenAPI document and the authorization check at
//! once, so a route cannot exist without a permission. The check runs on every request, from
//! the caller's session (never from anything the client claims), and every denial, login and
//! access to a subject is written to the audit trail before the response goes out.
//!
//! Request flow: limits (concurrency, time, body) → route → authorize → handler (typed input,
//! validation, ledger) → audit (durable) → response. Only this module knows HTTP and JSON shapes.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, RawPathParams, Request, State,
};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Extension, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::audit::{self, Action, Entry, Outcome};
use crate::auth::{Auth, AuthError, Caller, Login, Role};
use crate::ledger::{EventError, Ledger, Payload};
use crate::writer::{Op, Rejected, WriteError};

/// Limits on every request. Each is a flag of `pdledger serve` (see the README).
#[derive(Clone, Debug)]
pub struct ApiConfig {
    pub body_bytes_max: usize,
    pub page_max: usize,
    pub concurrency_max: usize,
    pub request_secs: u64,
    pub wait_secs_max: u64,
    /// Records one audit query may scan before it returns a cursor.
    pub audit_scan_max: usize,
    /// How long after an erasure the key rotation that completes it starts (erasures in
    /// the meantime share it).
    pub rotate_delay_ms: u64,
}

impl Default for ApiConfig {
    fn default() -> ApiConfig {
        ApiConfig {
            body_bytes_max: 1 << 20,
            page_max: 1000,
            concurrency_max: 512,
            request_secs: 30,
            wait_secs_max: 30,
            audit_scan_max: 200_000,
            rotate_delay_ms: 2_000,
        }
    }
}

/// What a role may do. One permission per route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// No token needed.
    Public,
    /// Any logged-in user, acting on their own account.
    OwnAccount,
    ManageUsers,
    CreateSubject,
    Append,
    ReadSubjects,
    ReadAudit,
    VerifyLedger,
    /// Art. 15/17/18/20: export, erase, restrict.
    SubjectRights,
    /// Master-key rotation.
    RotateKeys,
}

impl Permission {
    pub fn allows(self, role: Role) -> bool {
        use Role::*;
        match self {
            Permission::Public | Permission::OwnAccount => true,
            Permission::ManageUsers => role == Admin,
            Permission::CreateSubject | Permission::Append => matches!(role, Staff | Dpo | Service),
            Permission::ReadSubjects => matches!(role, Staff | Dpo),
            Permission::ReadAudit => matches!(role, Admin | Dpo | Auditor),
            Permission::VerifyLedger => matches!(role, Admin | Auditor),
            Permission::SubjectRights => role == Dpo,
            Permission::RotateKeys => role == Admin,
        }
    }
}

/// One row of the route table.
#[derive(Clone, Debug, Serialize)]
pub struct RouteInfo {
    #[serde(serialize_with = "ser_method")]
    pub method: Method,
    pub path: &'static str,
    pub permission: Permission,
    pub summary: &'static str,
}

fn ser_method<S: serde::Serializer>(m: &Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_str())
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    append_sizes: Mutex<Histogram>,
    overloaded: std::sync::atomic::AtomicU64,
}

const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
const SIZE_BUCKETS: [f64; 12] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1000.0, 4096.0];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; 12],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64, buckets: &[f64; 12]) {
        for (i, b) in buckets.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
    fn render(&self, out: &mut String, name: &str, labels: &str, buckets: &[f64; 12]) {
        use std::fmt::Write;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in buckets.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[derive(Clone)]
pub struct AppState {
    pub ledger: Arc<Ledger>,
    pub auth: Arc<Auth>,
    pub config: Arc<ApiConfig>,
    pub metrics: Arc<Metrics>,
    /// Rotates the master key after erasures (coalesced).
    pub rotation: Arc<crate::rotator::Rotator>,
    /// Continuous backup, when `serve --backup-dir` runs one.
    pub backup: Option<Arc<Mutex<crate::backup::Continuous>>>,
    /// Retention rules: what an erasure keeps, and for how long.
    pub retention: Arc<crate::retention::Rules>,
    limiter: Arc<tokio::sync::Semaphore>,
    /// Turns to compute a password hash (`AuthConfig::hashes_at_once`), waited for here, on
    /// the async side: a login that times out while it waits leaves the queue and holds no
    /// blocking thread. (`Auth` bounds the hashes itself too, for every other caller.)
    hash_turns: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    pub fn new(ledger: Arc<Ledger>, auth: Arc<Auth>, config: ApiConfig) -> AppState {
        let limiter = Arc::new(tokio::sync::Semaphore::new(config.concurrency_max));
        let hash_turns = Arc::new(tokio::sync::Semaphore::new(auth.config().hashes_at_once.max(1)));
        let rotation =
            Arc::new(crate::rotator::Rotator::spawn(ledger.clone(), Duration::from_millis(config.rotate_delay_ms)));
        AppState {
            ledger,
            auth,
            config: Arc::new(config),
            metrics: Arc::default(),
            rotation,
            backup: None,
            retention: Arc::new(crate::retention::Rules::builtin()),
            limiter,
            hash_turns,
        }
    }

    /// Runs password-hashing work (a login, a new user) off the runtime once a turn is free.
    async fn hashing<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
        let turn = self.hash_turns.clone().acquire_owned().await.map_err(ApiError::internal)?;
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            work()
        })
        .await
        .map_err(ApiError::internal)
    }

    /// Reports this continuous backup in `/healthz` and `/metrics`.
    pub fn with_backup(mut self, backup: crate::backup::Continuous) -> AppState {
        self.backup = Some(Arc::new(Mutex::new(backup)));
        self
    }

    /// Requests being handled right now (they hold a concurrency slot).
    pub fn requests_in_flight(&self) -> usize {
        self.config.concurrency_max - self.limiter.available_permits()
    }
}

// ---------------------------------------------------------------------------------------
// Errors: one shape, `{"error": code, "message": text}`, never internals.

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Option<Box<Value>>,
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), extra: None, retry_after: None }
    }
    fn with(mut self, extra: Value) -> ApiError {
        self.extra = Some(Box::new(extra));
        self
    }
    fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs.max(1));
        self
    }
    fn internal(detail: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %detail, "internal error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the server log")
    }
    fn unauthorized() -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required")
    }
    /// `410`: the subject was erased; its data is gone for good.
    fn erased(erased_at_ms: u64) -> ApiError {
        let at = crate::time::rfc3339(erased_at_ms);
        ApiError::new(StatusCode::GONE, "erased", format!("the subject was erased at {at}"))
            .with(json!({ "erased_at": at }))
    }
    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.code, "message": self.message});
        if let (Some(Value::Object(extra)), Some(obj)) = (self.extra.map(|b| *b), body.as_object_mut()) {
            obj.extend(extra);
        }
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> ApiError {
        match e {
            WriteError::Rejected(Rejected::VersionConflict { current, .. }) => {
                ApiError::new(StatusCode::CONFLICT, "version_conflict", format!("the subject is at version {current}"))
                    .with(json!({ "current_version": current }))
            }
            WriteError::Rejected(Rejected::SubjectExists(_)) => {
                ApiError::new(StatusCode::CONFLICT, "exists", "subject exists")
            }
            WriteError::Rejected(Rejected::UnknownSubject(_)) => ApiError::not_found("no such subject"),
            WriteError::Rejected(Rejected::Erased { erased_at_ms, .. }) => ApiError::erased(erased_at_ms),
            WriteError::Rejected(Rejected::Restricted { .. }) => ApiError::new(
                StatusCode::FORBIDDEN,
                "restricted",
                "the subject's processing is restricted (GDPR Art. 18); only corrections may be appended",
            ),
            WriteError::Overloaded => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", "the ledger is busy; retry shortly")
                    .retry_after(1)
            }
            WriteError::DiskFull { free_bytes, floor_bytes } => {
                tracing::warn!(free_bytes, floor_bytes, "write refused: the data directory's disk is nearly full");
                ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "insufficient_storage",
                    format!(
                        "the data directory's disk is nearly full ({} MiB free; the ledger keeps {} MiB free): \
                         nothing was written; retry once an operator has freed space",
                        free_bytes >> 20,
                        floor_bytes >> 20
                    ),
                )
                .retry_after(30)
            }
            WriteError::Unavailable(detail) => {
                tracing::error!(error = %detail, "writer unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the ledger cannot write; an operator must look",
                )
                .retry_after(30)
            }
        }
    }
}

impl From<crate::ledger::ReadError> for ApiError {
    fn from(e: crate::ledger::ReadError) -> ApiError {
        ApiError::internal(e)
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        match e {
            AuthError::BadUsername | AuthError::BadPassword => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e.to_string())
            }
            AuthError::Exists => ApiError::new(StatusCode::CONFLICT, "exists", e.to_string()),
            AuthError::NoUser => ApiError::not_found(e.to_string()),
            AuthError::BadToken => ApiError::unauthorized(),
            AuthError::BadCode => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_code", e.to_string()),
            AuthError::NotEnrolled => ApiError::new(StatusCode::CONFLICT, "not_enrolled", e.to_string()),
            other => ApiError::internal(other),
        }
    }
}

/// An optional field of a JSON body that may be left out but is never `null`: the document
/// says a string (or a number), and `null` is neither.
fn not_null<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A whole number that may be written with a zero fraction (`7.0` is the number 7 in JSON
/// and in JSON Schema), never `null`.
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::de::Error;
    let n = serde_json::Number::deserialize(d)?;
    if let Some(v) = n.as_u64() {
        return Ok(Some(v));
    }
    match n.as_f64() {
        // 2^64 is the first value past u64::MAX (and exactly representable).
        Some(f) if f.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&f) => Ok(Some(f as u64)),
        _ => Err(D::Error::custom("expected a whole number from 0 to 2^64 - 1")),
    }
}

/// A JSON body whose every rejection uses our error shape.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        axum::Json::<T>::from_request(req, state).await.map(|axum::Json(v)| ApiJson(v)).map_err(json_rejection)
    }
}

/// Our error for each way a JSON body is refused.
fn json_rejection(e: JsonRejection) -> ApiError {
    match e {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send Content-Type: application/json",
        ),
        JsonRejection::BytesRejection(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", "the request body is over the limit")
        }
        JsonRejection::JsonSyntaxError(_) => ApiError::bad_request("the body is not valid JSON"),
        JsonRejection::JsonDataError(e) => {
            ApiError::bad_request(format!("the body has the wrong shape: {}", body_error(&e.body_text())))
        }
        e => ApiError::bad_request(e.body_text()),
    }
}

/// The routes whose handlers take a JSON body (`ApiJson`), as written in `routes`.
pub const BODY_ROUTES: [&str; 7] = [
    "/v1/auth/login",
    "/v1/auth/totp",
    "/v1/auth/totp/activate",
    "/v1/users",
    "/v1/subjects/lookup",
    "/v1/subjects/{id}/events",
    "/v1/subjects/{id}/erase",
];

/// Decodes `bytes` as the body of the route `path` (one of `BODY_ROUTES`) into its handler's
/// own type, as its `ApiJson` extractor does after the content type and the size limit
/// (`axum::Json::from_bytes`), refusals included. `None` for a route without a body. For the
/// fuzz target `api_body` (`fuzz/`).
pub fn decode_body(path: &str, bytes: &[u8]) -> Option<Result<(), ApiError>> {
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<(), ApiError> {
        axum::Json::<T>::from_bytes(bytes).map(drop).map_err(json_rejection)
    }
    Some(match path {
        "/v1/auth/login" => decode::<LoginBody>(bytes),
        "/v1/auth/totp" => decode::<TotpBody>(bytes),
        "/v1/auth/totp/activate" => decode::<CodeBody>(bytes),
        "/v1/users" => decode::<NewUser>(bytes),
        "/v1/subjects/lookup" => decode::<LookupParams>(bytes),
        "/v1/subjects/{id}/events" => decode::<AppendBody>(bytes),
        "/v1/subjects/{id}/erase" => decode::<EraseBody>(bytes),
        _ => return None,
    })
}

/// serde's messages for a wrong shape name fields (in backticks) and types, but quote values:
/// strings in double quotes (escaped as Rust's `{:?}` writes them), numbers in backticks after
/// `integer` or `floating point`. Those are blanked, since a value may be personal.
fn body_error(text: &str) -> String {
    let t = text.trim_start_matches("Failed to deserialize the JSON body into the target type: ");
    let t = t.split(" at line").next().unwrap_or(t);
    let mut out = String::with_capacity(t.len());
    let mut chars = t.chars();
    while let Some(c) = chars.next() {
        if c == '"' {
            out.push_str("\"…\"");
            // To the closing quote; `\"` and `\\` inside are part of the value.
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' => break,
                    _ => {}
                }
            }
        } else if c == '`' && (out.ends_with("integer ") || out.ends_with("floating point ")) {
            out.push_str("`…`");
            chars.by_ref().find(|c| *c == '`');
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn body_errors_do_not_quote_values() {
        let e = super::body_error(
            "Failed to deserialize the JSON body into the target type: events: invalid type: string \"Anna Svensson\", expected a sequence at line 1 column 30",
        );
        assert_eq!(e, "events: invalid type: string \"…\", expected a sequence");
        assert!(!e.contains("Anna"));
        // Found by the fuzz target `api_body`: a quote inside the value ended the blanking.
        let e = super::body_error(
            r#"expected_version: invalid type: string "a\"Öberg \\", expected a JSON number at line 1 column 9"#,
        );
        assert_eq!(e, "expected_version: invalid type: string \"…\", expected a JSON number");
        let e = super::body_error("reason: invalid type: integer `198106151502`, expected a string at line 1 column 9");
        assert_eq!(e, "reason: invalid type: integer `…`, expected a string");
        let e = super::body_error("code: invalid type: floating point `1.5`, expected a string");
        assert_eq!(e, "code: invalid type: floating point `…`, expected a string");
        let e = super::body_error("unknown field `nmae`, expected `username` or `password`");
        assert_eq!(e, "unknown field `nmae`, expected `username` or `password`");
    }

    #[test]
    fn bodies_decode_into_their_routes_types() {
        use super::{decode_body, BODY_ROUTES};
        let good = [
            r#"{"username":"admin","password":"pw"}"#,
            r#"{"mfa_token":"t","code":"123456"}"#,
            r#"{"code":"123456"}"#,
            r#"{"username":"dpo","password":"pw","role":"dpo"}"#,
            r#"{"email":"a@example.org"}"#,
            r#"{"expected_version":1,"events":[{"type":"note.added","data":{"text":"x"}}]}"#,
            r#"{"reason":"Art. 17 request"}"#,
        ];
        for (path, body) in BODY_ROUTES.iter().zip(good) {
            assert!(decode_body(path, body.as_bytes()).unwrap().is_ok(), "{path}");
            assert!(decode_body(path, br#"{"unknown":1}"#).unwrap().is_err(), "{path}");
        }
        assert!(decode_body("/v1/subjects", b"{}").is_none());
    }

    #[test]
    fn subject_ids_are_taken_hyphenated_only() {
        let id = "67e55044-10b1-426f-9247-bb680e5fe0c8";
        assert!(super::hyphenated(id).is_some());
        assert!(super::hyphenated(&id.to_uppercase()).is_some());
        for other in [id.replace('-', ""), format!("{{{id}}}"), format!("urn:uuid:{id}"), String::new()] {
            assert_eq!(super::hyphenated(&other), None, "{other}");
        }
    }
}

pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e: QueryRejection| ApiError::bad_request(format!("bad query parameters: {}", e.body_text())))
    }
}

/// A UUID as the API writes them, hyphenated: `Uuid`'s parser also takes the simple, braced
/// and URN forms, which the document's `format: uuid` does not.
fn hyphenated(s: &str) -> Option<Uuid> {
    if s.len() != 36 {
        return None;
    }
    Uuid::try_parse(s).ok()
}

/// A query parameter that is a UUID, hyphenated.
fn hyphenated_uuid<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Uuid>, D::Error> {
    let s = String::deserialize(d)?;
    hyphenated(&s).map(Some).ok_or_else(|| serde::de::Error::custom("not a hyphenated UUID"))
}

/// The subject id in the path.
pub struct SubjectId(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for SubjectId {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        let id = path_param(parts, state, "id").await?;
        hyphenated(&id).map(SubjectId).ok_or_else(|| ApiError::bad_request("the subject id is not a UUID"))
    }
}

async fn path_param<S: Send + Sync>(
    parts: &mut axum::http::request::Parts,
    state: &S,
    name: &str,
) -> Result<String, ApiError> {
    let params = RawPathParams::from_request_parts(parts, state)
        .await
        .map_err(|_| ApiError::bad_request(format!("no {name} in the path")))?;
    params
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
        .ok_or_else(|| ApiError::bad_request(format!("no {name} in the path")))
}

/// The `{view}` path parameter.
pub struct ViewName(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ViewName {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        path_param(parts, state, "view").await.map(ViewName)
    }
}

/// The peer's address, as the listener saw it.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// The client's address, when the server knows it.
pub struct ClientAddr(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, ApiError> {
        Ok(ClientAddr(parts.extensions.get::<ConnectInfo<Peer>>().map(|c| c.0 .0.ip())))
    }
}

/// Per-request context set by the middleware.
#[derive(Clone)]
pub struct RequestCtx {
    pub request_id: String,
    pub route: &'static str,
}

// ---------------------------------------------------------------------------------------
// The route table.

struct Routes {
    state: AppState,
    router: Router<AppState>,
    table: Vec<RouteInfo>,
}

impl Routes {
    /// The only way a route gets into the router: with its method, path and permission, from
    /// which the authorization check and the OpenAPI entry are made too.
    fn add<H: axum::handler::Handler<T, AppState>, T: 'static>(
        mut self,
        method: Method,
        path: &'static str,
        permission: Permission,
        summary: &'static str,
        handler: H,
    ) -> Routes {
        assert!(
            crate::api_doc::is_documented(method.as_str(), path),
            "{method} {path} has no shapes in api_doc.rs: document it there first"
        );
        let guard = middleware::from_fn_with_state((self.state.clone(), permission, path), authorize);
        let filter = MethodFilter::try_from(method.clone()).expect("a standard method");
        let route: MethodRouter<AppState> = on(filter, handler);
        self.router = self.router.route(path, route.route_layer(guard));
        self.table.push(RouteInfo { method, path, permission, summary });
        self
    }
}

/// Every route, its permission and what it does: the one place where routes are defined.
pub fn routes(state: AppState) -> (Router<AppState>, Vec<RouteInfo>) {
    use Permission::*;
    let r = Routes { state, router: Router::new(), table: vec![] }
        .add(Method::POST, "/v1/auth/login", Public, "Log in with username and password", login)
        .add(
            Method::POST,
            "/v1/auth/totp",
            Public,
            "Second step: exchange the mfa token and a TOTP code for a session",
            login_totp,
        )
        .add(Method::POST, "/v1/auth/logout", OwnAccount, "Revoke the caller's token", logout)
        .add(Method::GET, "/v1/auth/me", OwnAccount, "Who the caller is: username, role, two-step login", me)
        .add(Method::POST, "/v1/auth/totp/enroll", OwnAccount, "Start two-step login enrolment", totp_enroll)
        .add(
            Method::POST,
            "/v1/auth/totp/activate",
            OwnAccount,
            "Activate two-step login with a first code",
            totp_activate,
        )
        .add(Method::POST, "/v1/users", ManageUsers, "Create a user", user_create)
        .add(Method::GET, "/v1/users", ManageUsers, "List users", user_list)
        .add(
            Method::POST,
            "/v1/users/{name}/disable",
            ManageUsers,
            "Disable a user and revoke their tokens",
            user_disable,
        )
        .add(Method::POST, "/v1/subjects", CreateSubject, "Create a subject", subject_create)
        .add(
            Method::GET,
            "/v1/subjects",
            ReadSubjects,
            "Find subjects by email, personal number or organisation number (blind index)",
            lookup,
        )
        .add(
            Method::POST,
            "/v1/subjects/lookup",
            ReadSubjects,
            "Find subjects like GET /v1/subjects, with the value in the body (kept out of URLs)",
            lookup_post,
        )
        .add(Method::POST, "/v1/subjects/{id}/events", Append, "Append events to a subject, all or nothing", append)
        .add(Method::GET, "/v1/subjects/{id}/events", ReadSubjects, "Read a subject's events", read_events)
        .add(
            Method::GET,
            "/v1/subjects/{id}/export",
            SubjectRights,
            "A subject's register extract (JSON or HTML)",
            export,
        )
        .add(Method::POST, "/v1/subjects/{id}/erase", SubjectRights, "Erase a subject (crypto-shredding)", erase)
        .add(
            Method::POST,
            "/v1/subjects/{id}/restrict",
            SubjectRights,
            "Restrict a subject's processing (Art. 18)",
            restrict,
        )
        .add(Method::POST, "/v1/subjects/{id}/unrestrict", SubjectRights, "Lift a restriction", unrestrict)
        .add(Method::POST, "/v1/keys/rotate", RotateKeys, "Rotate the master key now", keys_rotate)
        .add(Method::GET, "/v1/events", ReadSubjects, "The global log in order, with long-polling", feed)
        .add(
            Method::GET,
            "/v1/views/{view}",
            ReadSubjects,
            "One view's documents in subject-id order, paged",
            view_list,
        )
        .add(Method::GET, "/v1/views/{view}/{id}", ReadSubjects, "A subject's document of one view", view_read)
        .add(Method::GET, "/v1/audit", ReadAudit, "The audit trail, newest first", audit_list)
        .add(Method::GET, "/v1/ledger/verify", VerifyLedger, "Verify the whole hash chain", ledger_verify)
        .add(Method::GET, "/v1/ledger/head", VerifyLedger, "The ledger's head", ledger_head)
        .add(Method::GET, "/healthz", Public, "Liveness", healthz)
        .add(Method::GET, "/metrics", Public, "Prometheus metrics (no personal data, no subject ids)", metrics)
        .add(Method::GET, "/openapi.json", Public, "This API's OpenAPI 3 document", openapi_doc)
        .add(Method::GET, "/", Public, "The DPO console (a web page over this API)", crate::console::index)
        .add(Method::GET, "/console/app.js", Public, "The DPO console's script", crate::console::app_js)
        .add(Method::GET, "/console/qr.js", Public, "The DPO console's QR-code encoder", crate::console::qr_js)
        .add(Method::GET, "/console/app.css", Public, "The DPO console's style sheet", crate::console::app_css);
    (r.router, r.table)
}

/// The whole application: routes behind the global limits.
pub fn router(state: AppState) -> Router {
    let body_max = state.config.body_bytes_max;
    let (router, table) = routes(state.clone());
    let table = Arc::new(table);
    router
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
        })
        .layer(Extension(table))
        .layer(DefaultBodyLimit::max(body_max))
        .layer(middleware::from_fn_with_state(state.clone(), outer))
        .with_state(state)
}

/// Concurrency limit, time limit, request id, metrics, access log, security headers.
async fn outer(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route =
        req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_owned();
    let request_id = Uuid::new_v4().to_string();
    req.extensions_mut().insert(RequestIdExt(request_id.clone()));
    let mut resp = match state.limiter.clone().try_acquire_owned() {
        Err(_) => {
            state.metrics.overloaded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", "too many requests in flight; retry shortly")
                .retry_after(1)
                .into_response()
        }
        Ok(permit) => {
            let limit = Duration::from_secs(state.config.request_secs);
            let r = match tokio::time::timeout(limit, next.run(req)).await {
                Ok(r) => r,
                Err(_) => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "timeout",
                    "the request took too long; an append may still have been applied: read before retrying",
                )
                .retry_after(1)
                .into_response(),
            };
            drop(permit);
            r
        }
    };
    let status = resp.status().as_u16();
    let secs = started.elapsed().as_secs_f64();
    {
        *state
            .metrics
            .requests
            .lock()
            .expect("not poisoned")
            .entry((route.clone(), method.clone(), status))
            .or_default() += 1;
        state.metrics.latency.lock().expect("not poisoned").entry(route.clone()).or_default().observe(secs, &BUCKETS);
    }
    // The route template only: raw paths and query strings can carry lookup values.
    tracing::info!(request_id, method, route, status, ms = (secs * 1000.0) as u64, "request");
    let h = resp.headers_mut();
    h.insert("x-request-id", HeaderValue::from_str(&request_id).expect("uuid is a valid header"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000"));
    // Every response has a CSP: the console's pages and the extract's page set their own;
    // the rest (JSON, text) may load nothing and be framed by nobody.
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(API_CSP));
    }
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    resp
}

/// The Content-Security-Policy of every response that sets none of its own.
pub const API_CSP: &str = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

#[derive(Clone)]
struct RequestIdExt(String);

/// The authorization check, on every route: the caller from their token, the permission
/// from the route table. Denials are audited before the answer goes out.
async fn authorize(
    State((state, permission, route)): State<(AppState, Permission, &'static str)>,
    mut req: Request,
    next: Next,
) -> Response {
    let request_id = req.extensions().get::<RequestIdExt>().map(|r| r.0.clone()).unwrap_or_default();
    req.extensions_mut().insert(RequestCtx { request_id: request_id.clone(), route });
    if permission == Permission::Public {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let token = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let caller = match token.map(|t| state.auth.authenticate(t)) {
        Some(Ok(c)) => c,
        Some(Err(AuthError::BadToken)) | None => {
            let subject = denied_subject(&mut parts, &state).await;
            let e = deny(&state, "", subject, &request_id, route).await;
            return e.unwrap_or_else(ApiError::unauthorized).into_response();
        }
        Some(Err(e)) => return ApiError::from(e).into_response(),
    };
    if !permission.allows(caller.role) {
        let subject = denied_subject(&mut parts, &state).await;
        let e = deny(&state, &caller.username, subject, &request_id, route).await;
        return e
            .unwrap_or_else(|| {
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!("the {} role may not do this", caller.role.name()),
                )
            })
            .into_response();
    }
    let mut req = Request::from_parts(parts, body);
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// The subject a denied request aimed at, for its audit entry: parsed only on denial, so
/// allowed requests do not pay for it twice.
async fn denied_subject(parts: &mut axum::http::request::Parts, state: &AppState) -> Option<Uuid> {
    SubjectId::from_request_parts(parts, state).await.ok().map(|s| s.0)
}

/// Audits a denied request. Returns an error to send instead if the audit could not be written.
async fn deny(
    state: &AppState,
    actor: &str,
    subject: Option<Uuid>,
    request_id: &str,
    route: &'static str,
) -> Option<ApiError> {
    let mut e = Entry::new(Action::Denied, subject, Outcome::Denied);
    e.request_id = Some(request_id.to_owned());
    e.route = Some(route.to_owned());
    write_audit(state, actor, vec![e]).await.err()
}

/// Writes audit entries and waits until they are durable.
async fn write_audit(state: &AppState, actor: &str, entries: Vec<Entry>) -> Result<(), ApiError> {
    let ops = entries.into_iter().map(|e| e.into_op(actor)).collect();
    submit(state, ops).await.map(|_| ())
}

async fn submit(state: &AppState, ops: Vec<Op>) -> Result<Vec<crate::writer::Committed>, ApiError> {
    let rx = state.ledger.writer().try_submit(ops)?;
    let reply = rx.await.map_err(|_| WriteError::Unavailable("writer stopped".into()))?;
    Ok(reply?)
}

fn entry(ctx: &RequestCtx, action: Action, subject: Option<Uuid>, outcome: Outcome) -> Entry {
    let mut e = Entry::new(action, subject, outcome);
    e.request_id = Some(ctx.request_id.clone());
    e.route = Some(ctx.route.to_owned());
    e
}

// ---------------------------------------------------------------------------------------
// Authentication.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    username: String,
    password: String,
}

/// Lengths are counted in characters, as the OpenAPI document's `maxLength` counts them.
fn check_len(what: &str, s: &str, max: usize) -> Result<(), ApiError> {
    if s.chars().count() > max {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", format!("{what} is too long")));
    }
    Ok(())
}

async fn login(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    ClientAddr(addr): ClientAddr,
    ApiJson(body): ApiJson<LoginBody>,
) -> Result<Response, ApiError> {
    check_len("username", &body.username, 256)?;
    check_len("password", &body.password, 4 * crate::auth::PASSWORD_CHARS_MAX)?;
    let auth = state.auth.clone();
    let outcome = state.hashing(move || auth.login(&body.username, &body.password, addr)).await??;
    finish_login(&state, &ctx, outcome).await
}

async fn finish_login(state: &AppState, ctx: &RequestCtx, outcome: Login) -> Result<Response, ApiError> {
    match outcome {
        Login::Session { token, expires_at_ms, username } => {
            write_audit(state, &username, vec![entry(ctx, Action::Login, None, Outcome::Ok)]).await?;
            Ok(axum::Json(json!({"token": token, "expires_at": crate::time::rfc3339(expires_at_ms)})).into_response())
        }
        Login::MfaRequired { mfa_token, username } => {
            // The password step passed; the login is not complete until the second step.
            let mut e = entry(ctx, Action::Login, None, Outcome::Ok);
            e.target = Some("password".into());
            write_audit(state, &username, vec![e]).await?;
            Ok(axum::Json(json!({"mfa_required": true, "mfa_token": mfa_token})).into_response())
        }
        Login::Invalid { username } => {
            // Unknown names are not recorded: they are often passwords typed in the wrong box.
            write_audit(
                state,
                username.as_deref().unwrap_or(""),
                vec![entry(ctx, Action::LoginFailed, None, Outcome::Failed)],
            )
            .await?;
            Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid_credentials", "wrong username, password or code"))
        }
        Login::Locked { retry_after_secs } => {
            write_audit(state, "", vec![entry(ctx, Action::LoginFailed, None, Outcome::Denied)]).await?;
            Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many failed logins; wait and retry")
                .retry_after(retry_after_secs))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TotpBody {
    mfa_token: String,
    code: String,
}

async fn login_totp(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    ClientAddr(addr): ClientAddr,
    ApiJson(body): ApiJson<TotpBody>,
) -> Result<Response, ApiError> {
    check_len("mfa_token", &body.mfa_token, 128)?;
    check_len("code", &body.code, 16)?;
    let key = state.ledger.credentials_key();
    let (_, outcome) = state.auth.login_totp(&body.mfa_token, &body.code, addr, &key)?;
    finish_login(&state, &ctx, outcome).await
}

async fn logout(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    state.auth.logout(&caller)?;
    // The audit write's fsync also makes the session's removal durable.
    write_audit(&state, &caller.username, vec![entry(&ctx, Action::Logout, None, Outcome::Ok)]).await?;
    Ok(axum::Json(json!({"logged_out": true})).into_response())
}

/// The caller's own account: what the console builds its controls from. Touches no
/// subject, so nothing is audited.
async fn me(State(state): State<AppState>, Extension(caller): Extension<Caller>) -> Result<Response, ApiError> {
    let user = state.auth.user(&caller.username)?.ok_or_else(ApiError::unauthorized)?;
    Ok(axum::Json(json!({"username": user.username, "role": user.role, "totp_enabled": user.has_totp()}))
        .into_response())
}

async fn totp_enroll(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let key = state.ledger.credentials_key();
    let (secret, uri) = state.auth.totp_enroll(&caller.username, &key)?;
    write_audit(&state, &caller.username, vec![entry(&ctx, Action::TotpEnrolled, None, Outcome::Ok)]).await?;
    Ok(axum::Json(json!({"secret": secret, "otpauth_uri": uri})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CodeBody {
    code: String,
}

async fn totp_activate(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(caller): Extension<Caller>,
    ApiJson(body): ApiJson<CodeBody>,
) -> Result<Response, ApiError> {
    check_len("code", &body.code, 16)?;
    let key = state.ledger.credentials_key();
    let result = state.auth.totp_activate(&caller.username, &body.code, &key);
    let outcome = if result.is_ok() { Outcome::Ok } else { Outcome::Failed };
    write_audit(&state, &caller.username, vec![entry(&ctx, Action::TotpActivated, None, outcome)]).await?;
    result?;
    Ok(axum::Json(json!({"active": true})).into_response())
}

// ---------------------------------------------------------------------------------------
// Users.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    username: String,
    password: String,
    role: String,
}

async fn user_create(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(caller): Extension<Caller>,
    ApiJson(body): ApiJson<NewUser>,
) -> Result<Response, ApiError> {
    check_len("password", &body.password, 4 * crate::auth::PASSWORD_CHARS_MAX)?;
    let role: Role =
        body.role.parse().map_err(|e: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e))?;
    let auth = state.auth.clone();
    let username = body.username.clone();
    let user = state.hashing(move || auth.create_user(&body.username, &body.password, role)).await??;
    let mut e = entry(&ctx, Action::UserCreated, None, Outcome::Ok);
    e.target = Some(username);
    write_audit(&state, &caller.username, vec![e]).await?;
    Ok((StatusCode::CREATED, axum::Json(json!({"username": user.username, "role": user.role}))).into_response())
}

async fn user_list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let users: Vec<Value> = state
        .auth
        .users()?
        .into_iter()
        .map(|u| json!({"username": u.username, "role": u.role, "disabled": u.disabled, "totp": u.has_totp()}))
        .collect();
    Ok(axum::Json(json!({ "users": users })).into_response())
}

async fn user_disable(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(caller): Extension<Caller>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    if !crate::auth::username_is_valid(&name) {
        return Err(ApiError::not_found("no such user"));
    }
    state.auth.disable(&name)?;
    let mut e = entry(&ctx, Action::UserDisabled, None, Outcome::Ok);
    e.target = Some(name.clone());
    write_audit(&state, &caller.username, vec![e]).await?;
    Ok(axum::Json(json!({"username": name, "disabled": true})).into_response())
}

// ---------------------------------------------------------------------------------------
// Subjects and events.

async fn subject_create(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let subject = Uuid::new_v4();
    let ops = vec![
        Op::Create { subject, actor: caller.username.clone() },
        entry(&ctx, Action::SubjectCreated, Some(subject), Outcome::Ok).into_op(&caller.username),
    ];
    submit(&state, ops).await?;
    Ok((StatusCode::CREATED, axum::Json(json!({ "id": subject }))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LookupParams {
    #[serde(default, deserialize_with = "not_null")]
    email: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    personal_number: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    org_number: Option<String>,
}

/// Subjects with a matching lookup value. The value is normalised and hashed with the index
/// key; it is never logged or audited (the query string is not logged either).
async fn lookup(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(caller): Extension<Caller>,
    ApiQuery(q): ApiQuery<LookupParams>,
) -> Result<Response, ApiError> {
    find_subjects(&state, &ctx, &caller, q).await
}

/// The same lookup with the value in a JSON body, so it is in no URL (browser history,
/// proxies' logs): what the console uses.
async fn lookup_post(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(caller): Extension<Caller>,
    ApiJson(q): ApiJson<LookupParams>,
) -> Result<Response, ApiError> {
    find_subjects(&state, &ctx, &caller, q).await
}

async fn find_subjects(
    state: &AppState,
    ctx: &RequestCtx,
    caller: &Caller,
    q: LookupParams,
) -> Result<Response, ApiError> {
    use crate::lookup::LookupKey;
    let given: Vec<(LookupKey, String)> = [
        (LookupKey::Email, q.email),
        (LookupKey::PersonalNumber, q.personal_number),
        (LookupKey::OrgNumber, q.org_number),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k, v)))
    .collect();
    let [(key, value)] = given.as_slice() else {
        return Err(ApiError::bad_request("give exactly one of email, personal_number, org_number"));
    };
    check_len("the lookup value", value, 320).map_err(|_| ApiError::bad_request("the lookup value is too long"))?;
    let subjects = state.ledger.lookup(*key, value, state.config.page_max)?;
    // One entry per subject found; one without a subject when none matched.
    let entries = if subjects.is_empty() {
        vec![entry(ctx, Action::Lookup, None, Outcome::Ok)]
    } else {
        subjects.iter().map(|s| entry(ctx, Action::Lookup, Some(*s), Outcome::Ok)).collect()
    };
    write_audit(state, &caller.username, entries).await?;
    Ok(axum::Json(json!({ "subjects": subjects })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppendBody {
    #[serde(default, deserialize_with = "whole_number")]
    expected_version: Option<u64>,
    events: Vec<NewEvent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewEvent {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default, deserialize_with = "not_null")]
    occurred_at: Option<String>,
    data: Value,
}

async fn append(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(caller): Extension<Caller>,
    SubjectId(subject): SubjectId,
    ApiJson(body): ApiJson<AppendBody>,
) -> Result<Response, ApiError> {
    let max = state.ledger.limits().events_per_append_max;
    if body.events.len() > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_events",
            format!("at most {max} events per request"),
        ));
    }
    if body.events.is_empty() {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", "an append needs at least one event"));
    }
    let mut prepared = Vec::with_capacity(body.events.len());
    for (i, ev) in body.events.into_iter().enumerate() {
        match state.ledger.prepare(&ev.event_type, ev.occurred_at.as_deref(), ev.data) {
            Ok(p) => prepared.push(p),
            Err(e) => return Err(event_error(i, e)),
        }
    }
    state.metrics.append_sizes.lock().expect("not poisoned").observe(prepared.len() as f64, &SIZE_BUCKETS);
    let ops = vec![
        Op::Append {
            subject,
            expected_version: body.expected_version,
            events: prepared,
            actor: caller.username.clone(),
        },
        entry(&ctx, Action::Append, Some(subject), Outcome::Ok).into_op(&caller.username),
    ];
    match submit(&state, ops).await {
        Ok(mut done) => {
            let c = done.remove(0);
            Ok((
                StatusCode::CREATED,
                axum::Json(json!({
                    "subject": subject, "first_version": c.first_version, "last_version": c.last_version, "positions": c.positions,
                })),
            )
                .into_response())
        }
        Err(e) => {
            if e.status == StatusCode::CONFLICT {
                write_audit(
                    &state,
                    &caller.username,
                    vec![entry(&ctx, Action::Append, Some(subject), Outcome::Failed)],
                )
                .await?;
            }
            Err(e)
        }
    }
}

fn event_error(index: usize, e: EventError) -> ApiError {
    let (code, pointer) = match &e {
        EventError::Schema(v) => ("schema_violation", format!("/events/{index}{}", data_pointer(v.pointer()))),
        EventError::OccurredAt => ("invalid", format!("/events/{index}/occurred_at")),
        EventError::TooLarge { .. } => ("too_large", format!("/events/{index}/data")),
        _ => ("invalid", format!("/events/{index}")),
    };
    let status = if matches!(e, EventError::TooLarge { .. }) {
        StatusCode::PAYLOAD_TOO_LARGE
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    ApiError::new(status, code, format!("event {index}: {e}")).with(json!({"index": index, "pointer": pointer}))
}

fn data_pointer(p: &str) -> String {
    if p == "/type" {
        "/type".into()
    } else {
        format!("/data{p}")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadParams {
    #[serde(default)]
    after_version: u64,
    #[serde(default)]
    limit: Option<usize>,
}

async fn read_events(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(caller): Extension<Caller>,
    SubjectId(subject): SubjectId,
    ApiQuery(q): ApiQuery<ReadParams>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(state.config.page_max).clamp(1, state.config.page_max);
    subject_gate(&state, &ctx, &caller, subject, Action::Read).await?;
    let ledger = state.ledger.clone();
    let (version, events) = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::ledger::ReadError>((
            ledger.stream_version(subject)?,
            ledger.read_stream_raw(subject, q.after_version, limit)?,
        ))
    })
    .await
    .map_err(ApiError::internal)??;
    // The access is durable in the trail before any personal data leaves.
    write_audit(&state, &caller.username, vec![entry(&ctx, Action::Read, Some(subject), Outcome::Ok)]).await?;
    #[derive(Serialize)]
    struct Answer {
        subject: Uuid,
        version: u64,
        events: Vec<crate::ledger::RawEvent>,
    }
    Ok(axum::Json(Answer { subject, version, events }).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedParams {
    #[serde(default)]
    after_position: u64,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default, rename = "type")]
    event_type: Option<String>,
    #[serde(default)]
    wait: Option<u64>,
}

async fn feed(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(caller): Extension<Caller>,
    ApiQuery(q): ApiQuery<FeedParams>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(100).clamp(1, state.config.page_max);
    let wait = Duration::from_secs(q.wait.unwrap_or(0).min(state.config.wait_secs_max));
    if let Some(t) = &q.event_type {
        if state.ledger.schemas().current(t).is_none() {
            return Err(ApiError::bad_request("unknown event type"));
        }
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut head = state.ledger.subscribe();
    loop {
        let ledger = state.ledger.clone();
        let (after, t) = (q.after_position, q.event_type.clone());
        // Scan at most a bounded number of records per request, matching or not.
        let scan_max = limit.saturating_mul(20).max(10_000);
        let role = caller.role;
        let (events, next, seen) = tokio::task::spawn_blocking(move || {
            let mut out = vec![];
            let mut next = after;
            // after_position may be the largest position there can be: nothing comes after it.
            let Some(from) = after.checked_add(1) else { return Ok((out, next, BTreeMap::new())) };
            for (scanned, entry) in ledger.log(from).enumerate() {
                let entry = entry?;
                next = entry.header.position;
                let wanted = entry.header.kind == crate::record::Kind::Sealed
                    && t.as_deref().is_none_or(|t| t == entry.header.event_type);
                if wanted {
                    out.push(entry);
                    if out.len() >= limit {
                        break;
                    }
                }
                if scanned + 1 >= scan_max {
                    break;
                }
            }
            let mut subjects: Vec<Uuid> = out.iter().map(|e| e.header.subject).collect();
            subjects.sort_unstable();
            subjects.dedup();
            let seen = sights(&ledger, role, &subjects)?;
            Ok::<_, crate::ledger::ReadError>((out, next, seen))
        })
        .await
        .map_err(ApiError::internal)??;
        if events.is_empty() && tokio::time::Instant::now() < deadline && next == q.after_position {
            let current = *head.borrow_and_update();
            if current <= q.after_position {
                let _ = tokio::time::timeout_at(deadline, head.changed()).await;
                if tokio::time::Instant::now() < deadline {
                    continue;
                }
            } else {
                continue;
            }
        }
        // Every subject on the page, audited as what it was: read, withheld as restricted
        // (denied) or as erased (failed).
        if !seen.is_empty() {
            let entries = seen.iter().map(|(s, sight)| entry(&ctx, Action::Read, Some(*s), sight.outcome())).collect();
            write_audit(&state, &caller.username, entries).await?;
        }
        let events: Vec<Value> = events
            .into_iter()
            .map(|e| {
                let h = &e.header;
                let mut v = json!({"position": h.position, "subject": h.subject, "version": h.version, "type": h.event_type,
                                   "recorded_at": crate::time::rfc3339(h.recorded_at_ms)});
                match (seen.get(&h.subject).copied().unwrap_or(Sight::Erased), e.payload) {
                    (Sight::Restricted, _) => v["restricted"] = json!(true),
                    (Sight::Data, Payload::Event { occurred_at, data }) => {
                        v["occurred_at"] = json!(occurred_at);
                        v["data"] = data;
                    }
                    _ => v["erased"] = json!(true),
                }
                v
            })
            .collect();
        return Ok(axum::Json(json!({"events": events, "next_position": next})).into_response());
    }
}

// ---------------------------------------------------------------------------------------
// Subject rights.

/// What every read of one subject checks first, auditing a refusal: erased (410), unknown
/// (404), restricted for anyone but the dpo (403 `restricted`).
async fn subject_gate(
    state: &AppState,
    ctx: &RequestCtx,
    caller: &Caller,
    subject: Uuid,
    action: Action,
) -> Result<(), ApiError> {
    let refuse = |outcome: Outcome| entry(ctx, action, Some(subject), outcome);
    if let Some(e) = state.ledger.erasure(subject)? {
        let held = e.retained.iter().any(|h| !h.shredded);
        if sight(caller.role, Some(held), false) != Sight::Data {
            write_audit(state, &caller.username, vec![refuse(Sight::Erased.outcome())]).await?;
            return Err(ApiError::erased(e.erased_at_ms));
        }
        return Ok(());
    }
    if !state.ledger.subject_exists(subject)? {
        write_audit(state, &caller.username, vec![refuse(Outcome::Failed)]).await?;
        return Err(ApiError::not_found("no such subject"));
    }
    if sight(caller.role, None, state.ledger.restricted(subject)?) == Sight::Restricted {
        write_audit(state, &caller.username, vec![refuse(Sight::Restricted.outcome())]).await?;
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "restricted",
            "the subject's processing is restricted (GDPR Art. 18); ask the data protection officer",
        ));
    }
    Ok(())
}

/// What a caller may see of a subject's data: the one rule behind `subject_gate` (which
/// refuses a request about one subject) and the pages of many subjects (the feed, a view's
/// list), which show such a subject without its data instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sight {
    Data,
    /// Erased: nothing, except that categories a legal obligation keeps stay readable to the
    /// dpo alone (Art. 17(3)(b) with Art. 18).
    Erased,
    /// Processing restricted (Art. 18): the dpo alone reads.
    Restricted,
}

impl Sight {
    /// The audit outcome of a read that met this.
    fn outcome(self) -> Outcome {
        match self {
            Sight::Data => Outcome::Ok,
            Sight::Erased => Outcome::Failed,
            Sight::Restricted => Outcome::Denied,
        }
    }
}

/// `erased_holding`: `None` not erased, `Some(held)` erased with categories still held or not.
fn sight(role: Role, erased_holding: Option<bool>, restricted: bool) -> Sight {
    match erased_holding {
        Some(true) if role == Role::Dpo => Sight::Data,
        Some(_) => Sight::Erased,
        None if restricted && role != Role::Dpo => Sight::Restricted,
        None => Sight::Data,
    }
}

/// `sight` for each of `subjects` (distinct), read from the ledger.
fn sights(ledger: &Ledger, role: Role, subjects: &[Uuid]) -> Result<BTreeMap<Uuid, Sight>, crate::ledger::ReadError> {
    subjects
        .iter()
        .map(|s| {
            let erased = ledger.erased_holding(*s)?;
            let restricted = erased.is_none() && ledger.restricted(*s)?;
            Ok((*s, sight(role, erased, restricted)))
        })
        .collect()
}

/// The register extract (Art. 15/20): JSON by default, the readable page with
/// `Accept: text/html`. The access is in the trail before the extract leaves.
async fn export(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(caller): Extension<Caller>,
    SubjectId(subject): SubjectId,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    subject_gate(&state, &ctx, &caller, subject, Action::Export).await?;
    let html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html") && !a.contains("application/json"));
    let extract = loop {
        let (ledger, rules) = (state.ledger.clone(), state.retention.clone());
        let x = tokio::task::spawn_blocking(move || {
            crate::export::extract_with_rules(&ledger, &rules, subject, crate::time::now_ms())
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
        match x.pending() {
            Some(p) => state.ledger.wait_durable(p).await?,
            None => break x,
        }
    };
    write_audit(&state, &caller.username, vec![entry(&ctx, Action::Export, Some(subject), Outcome::Ok)]).await?;
    if html {
        let page = crate::export::to_html(&extract, state.ledger.schemas());
        let csp = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";
        return Ok((
            [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CONTENT_SECURITY_POLICY, csp)],
            page,
        )
            .into_response());
    }
    Ok(axum::Json(extract).into_response())
}

/// An erasure's reason, as sent: 1 to 200 characters, not all blank, no control characters
/// (what the document's pattern says). It is kept trimmed.
pub(crate) fn reason_is_valid(reason: &str) -> bool {
    !reason.trim().is_empty() && reason.chars().count() <= 200 && !reason.chars().any(char::is_control)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EraseBody {
    reason: String,
}

/// The erasure receipt, the same for every call once the subject is erased (but for the
/// state of the rotation and of retained categories).
fn receipt(e: &crate::ledger::Erasure, rules: &crate::retention::Rules) -> Value {
    let retained: Vec<Value> = e
        .retained
        .iter()
        .map(|h| {
            let rule = crate::schema::Category::ALL.into_iter().find(|c| c.name() == h.category).map(|c| rules.get(c));
            json!({"category": h.category, "until": h.until, "shredded": h.shredded,
                   "basis": rule.map(|r| r.basis.clone()), "legal_reference": rule.map(|r| r.legal_reference.clone())})
        })
        .collect();
    json!({
        "subject": e.subject,
        "erased_at": e.erased_at,
        "position": e.position,
        "receipt": {
            "subject": e.subject, "erased_at": e.erased_at, "position": e.position, "hash": e.hash,
            "actor": e.actor, "reason": e.reason,
            "key_generation": e.key_generation,
            "retained": retained,
            "rotation": if e.complete { "complete" } else { "pending" },
            "note": if e.complete {
                "the master-key generation that wrapped the subject's keys is destroyed: no copy of them (old files, backups) can be opened"
            } else {
                "the subject's keys are deleted; the key rotation that makes every older copy of them useless follows shortly"
            },
        },
    })
}

async fn erase(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(caller): Extension<Caller>,
    SubjectId(subject): SubjectId,
    ApiJson(body): ApiJson<EraseBody>,
) -> Result<Response, ApiError> {
    if !reason_is_valid(&body.reason) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "reason must be 1..=200 characters without control characters; it is kept in clear: no personal data",
        ));
    }
    let reason = body.reason.trim();
    if let Some(e) = state.ledger.erasure(subject)? {
        write_audit(&state, &caller.username, vec![entry(&ctx, Action::Erase, Some(subject), Outcome::Ok)]).await?;
        return Ok(axum::Json(receipt(&e, &state.retention)).into_response());
    }
    // What the retention rules keep (reads the subject's retained categories).
    let (ledger, rules) = (state.ledger.clone(), state.retention.clone());
    let retain =
        tokio::task::spawn_blocking(move || crate::retention::plan(&ledger, &rules, subject, crate::time::now_ms()))
            .await
            .map_err(ApiError::internal)??;
    // The erasure and its audit entry are one commit.
    let ops = vec![
        Op::Erase { subject, reason: reason.to_owned(), actor: caller.username.clone(), retain },
        entry(&ctx, Action::Erase, Some(subject), Outcome::Ok).into_op(&caller.username),
    ];
    match submit(&state, ops).await {
        Ok(_) => {}
        // Erased meanwhile by another call: answer with that receipt.
        Err(e) if e.code == "erased" => {}
        Err(e) => {
            write_audit(&state, &caller.username, vec![entry(&ctx, Action::Erase, Some(subject), Outcome::Failed)])
                .await?;
            return Err(e);
        }
    }
    state.rotation.request();
    let e = state.ledger.erasure(subject)?.ok_or_else(|| ApiError::internal("erasure not found after commit"))?;
    Ok(axum::Json(receipt(&e, &state.retention)).into_response())
}

async fn restrict_or_lift(
    state: AppState,
    ctx: RequestCtx,
    caller: Caller,
    subject: Uuid,
    restricted: bool,
) -> Result<Response, ApiError> {
    let action = if restricted { Action::Restrict } else { Action::Unrestrict };
    let ops = vec![
        Op::Restrict { subject, restricted, actor: caller.username.clone() },
        entry(&ctx, action, Some(subject), Outcome::Ok).into_op(&caller.username),
    ];
    if let Err(e) = submit(&state, ops).await {
        write_audit(&state, &caller.username, vec![entry(&ctx, action, Some(subject), Outcome::Failed)]).await?;
        return Err(e);
    }
    Ok(axum::Json(json!({"subject": subject, "restricted": restricted})).into_response())
}

async fn restrict(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(caller): Extension<Caller>,
    SubjectId(subject): SubjectId,
) -> Result<Response, ApiError> {
    restrict_or_lift(state, ctx, caller, subject, true).await
}

async fn unrestrict(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(caller): Extension<Caller>,
    SubjectId(subject): SubjectId,
) -> Result<Response, ApiError> {
    restrict_or_lift(state, ctx, caller, subject, false).await
}

async fn keys_rotate(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let ledger = state.ledger.clone();
    let r = tokio::task::spawn_blocking(move || ledger.rotate()).await.map_err(ApiError::internal)?;
    let outcome = if r.is_ok() { Outcome::Ok } else { Outcome::Failed };
    write_audit(&state, &caller.username, vec![entry(&ctx, Action::KeysRotated, None, outcome)]).await?;
    let r = r.map_err(ApiError::internal)?;
    Ok(axum::Json(
        json!({"from": r.from, "to": r.to, "keys": r.keys, "index_entries": r.index_entries, "seconds": r.seconds}),
    )
    .into_response())
}

// ---------------------------------------------------------------------------------------
// Views.

fn known_view(state: &AppState, view: &str) -> Result<(), ApiError> {
    if state.ledger.projections().get(view).is_none() {
        let names: Vec<&str> = state.ledger.projections().views().iter().map(|v| v.name()).collect();
        return Err(ApiError::not_found(format!("no view `{view}` (views: {})", names.join(", "))));
    }
    Ok(())
}

async fn view_read(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(caller): Extension<Caller>,
    ViewName(view): ViewName,
    SubjectId(subject): SubjectId,
) -> Result<Response, ApiError> {
    known_view(&state, &view)?;
    subject_gate(&state, &ctx, &caller, subject, Action::View).await?;
    let ledger = state.ledger.clone();
    let name = view.clone();
    let doc = tokio::task::spawn_blocking(move || ledger.view(&name, subject)).await.map_err(ApiError::internal)??;
    // A document is written with its events, before they are durable: show it only once
    // they are (a wait of at most one fsync).
    if let Some(d) = &doc {
        state.ledger.wait_durable(d.position).await?;
    }
    write_audit(&state, &caller.username, vec![entry(&ctx, Action::View, Some(subject), Outcome::Ok)]).await?;
    let (version, data) = doc.map(|d| (d.version, d.data)).unwrap_or((0, json!({})));
    Ok(axum::Json(json!({"view": view, "subject": subject, "version": version, "data": data})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ViewListParams {
    #[serde(default)]
    limit: Option<usize>,
    /// The last subject id of the previous page.
    #[serde(default, deserialize_with = "hyphenated_uuid")]
    cursor: Option<Uuid>,
}

async fn view_list(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(caller): Extension<Caller>,
    ViewName(view): ViewName,
    ApiQuery(q): ApiQuery<ViewListParams>,
) -> Result<Response, ApiError> {
    known_view(&state, &view)?;
    let limit = q.limit.unwrap_or(100).clamp(1, state.config.page_max);
    let ledger = state.ledger.clone();
    let name = view.clone();
    let role = caller.role;
    let (page, seen) = tokio::task::spawn_blocking(move || {
        let page = ledger.view_page(&name, q.cursor, limit)?;
        let subjects: Vec<Uuid> = page.iter().map(|(s, _)| *s).collect();
        let seen = sights(&ledger, role, &subjects)?;
        Ok::<_, crate::ledger::ReadError>((page, seen))
    })
    .await
    .map_err(ApiError::internal)??;
    if let Some(p) = page.iter().map(|(_, d)| d.position).max() {
        state.ledger.wait_durable(p).await?;
    }
    // Every subject on the page is an access to that subject's data: one entry each, as
    // shown or as withheld (a restricted subject, or an erased one's kept documents, are
    // left out of the page for all but the dpo).
    if !page.is_empty() {
        let entries = seen.iter().map(|(s, sight)| entry(&ctx, Action::View, Some(*s), sight.outcome())).collect();
        write_audit(&state, &caller.username, entries).await?;
    }
    let next_cursor = if page.len() >= limit { page.last().map(|(s, _)| *s) } else { None };
    let items: Vec<Value> = page
        .into_iter()
        .filter(|(subject, _)| seen.get(subject) == Some(&Sight::Data))
        .map(|(subject, d)| json!({"subject": subject, "version": d.version, "data": d.data}))
        .collect();
    Ok(axum::Json(json!({"view": view, "items": items, "next_cursor": next_cursor})).into_response())
}

// ---------------------------------------------------------------------------------------
// Audit and ledger.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    #[serde(default, deserialize_with = "hyphenated_uuid")]
    subject: Option<Uuid>,
    #[serde(default)]
    actor: Option<String>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    cursor: Option<u64>,
}

async fn audit_list(State(state): State<AppState>, ApiQuery(q): ApiQuery<AuditParams>) -> Result<Response, ApiError> {
    let action = match &q.action {
        Some(a) => Some(a.parse::<Action>().map_err(ApiError::bad_request)?),
        None => None,
    };
    let time = |name: &str, v: &Option<String>| match v {
        Some(s) => crate::time::parse_timestamp(s)
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("{name} must be YYYY-MM-DD or an RFC 3339 UTC time"))),
        None => Ok(None),
    };
    let filter = audit::Filter {
        subject: q.subject,
        actor: q.actor,
        action,
        since_ms: time("since", &q.since)?,
        until_ms: time("until", &q.until)?,
    };
    let limit = q.limit.unwrap_or(100).clamp(1, state.config.page_max);
    let before = q.cursor.unwrap_or(u64::MAX);
    let (ledger, scan_max) = (state.ledger.clone(), state.config.audit_scan_max);
    let page = tokio::task::spawn_blocking(move || {
        audit::query(ledger.store(), ledger.durable(), &filter, before, limit, scan_max)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    Ok(axum::Json(json!({"entries": page.entries, "next_cursor": page.next_cursor})).into_response())
}

async fn ledger_verify(
    State(state): State<AppState>,
    Extension(ctx): Extension<RequestCtx>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let ledger = state.ledger.clone();
    let report = tokio::task::spawn_blocking(move || crate::verify::verify(ledger.store(), None, |_| {}))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    let outcome = if report.ok { Outcome::Ok } else { Outcome::Failed };
    write_audit(&state, &caller.username, vec![entry(&ctx, Action::Verify, None, outcome)]).await?;
    Ok(axum::Json(serde_json::to_value(&report).map_err(ApiError::internal)?).into_response())
}

async fn ledger_head(State(state): State<AppState>) -> Result<Response, ApiError> {
    let (position, hash) = state.ledger.head()?;
    Ok(axum::Json(json!({"position": position, "hash": hash.to_hex()})).into_response())
}

/// Liveness, and the continuous backup's state when one runs (`degraded` while it fails).
async fn healthz(State(state): State<AppState>) -> Response {
    match &state.backup {
        None => axum::Json(json!({"status": "ok"})).into_response(),
        Some(b) => {
            let s = b.lock().expect("not poisoned").status();
            let status = if s.error.is_some() { "degraded" } else { "ok" };
            axum::Json(json!({"status": status, "backup": {"last_position": s.last_position,
                "lag_records": s.lag_records, "failing": s.error.is_some()}}))
            .into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "# TYPE pdledger_http_requests_total counter");
    for ((route, method, status), n) in state.metrics.requests.lock().expect("not poisoned").iter() {
        let _ = writeln!(
            out,
            "pdledger_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {n}"
        );
    }
    let _ = writeln!(out, "# TYPE pdledger_http_request_duration_seconds histogram");
    for (route, h) in state.metrics.latency.lock().expect("not poisoned").iter() {
        h.render(&mut out, "pdledger_http_request_duration_seconds", &format!("route=\"{route}\""), &BUCKETS);
    }
    let _ = writeln!(out, "# TYPE pdledger_append_events histogram");
    state.metrics.append_sizes.lock().expect("not poisoned").render(
        &mut out,
        "pdledger_append_events",
        "",
        &SIZE_BUCKETS,
    );
    let (commits, fsyncs) = state.ledger.commit_counts();
    let _ = writeln!(out, "# TYPE pdledger_group_commits_total counter\npdledger_group_commits_total {commits}");
    let _ = writeln!(out, "# TYPE pdledger_fsyncs_total counter\npdledger_fsyncs_total {fsyncs}");
    let head = state.ledger.head().map(|h| h.0).unwrap_or(0);
    let _ = writeln!(out, "# TYPE pdledger_head_position gauge\npdledger_head_position {head}");
    if let Some((free, floor)) = state.ledger.disk_space() {
        let _ = writeln!(out, "# TYPE pdledger_disk_free_bytes gauge\npdledger_disk_free_bytes {free}");
        let _ = writeln!(out, "# TYPE pdledger_disk_floor_bytes gauge\npdledger_disk_floor_bytes {floor}");
    }
    if let Some(b) = &state.backup {
        let s = b.lock().expect("not poisoned").status();
        let _ =
            writeln!(out, "# TYPE pdledger_backup_lag_records gauge\npdledger_backup_lag_records {}", s.lag_records);
        let _ = writeln!(out, "# TYPE pdledger_backup_position gauge\npdledger_backup_position {}", s.last_position);
        let _ = writeln!(
            out,
            "# TYPE pdledger_backup_failing gauge\npdledger_backup_failing {}",
            u8::from(s.error.is_some())
        );
    }
    let overloaded = state.metrics.overloaded.load(std::sync::atomic::Ordering::Relaxed);
    let _ = writeln!(out, "# TYPE pdledger_overloaded_total counter\npdledger_overloaded_total {overloaded}");
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn openapi_doc(State(state): State<AppState>, Extension(table): Extension<Arc<Vec<RouteInfo>>>) -> Response {
    axum::Json(crate::api_doc::document(&table, &crate::api_doc::Facts::of(&state))).into_response()
}

/// Convenience for tests and tools: the routes as (METHOD, path, permission).
pub fn route_table(state: AppState) -> Vec<RouteInfo> {
    routes(state).1
}
