//! The HTTP API, driven through the router (`oneshot`, no socket) with an injected clock:
//! every route against every role, login flows, lockout, appends, the audit trail.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use pdledger::api::{self, ApiConfig, AppState};
use pdledger::auth::{Auth, AuthConfig, Role};
use pdledger::ledger::Ledger;
use serde_json::{json, Value};
use tower::ServiceExt;
use uuid::Uuid;

use crate::support::*;

pub const PASSWORD: &str = "a-long-enough-password";

pub struct App {
    /// Keeps the data directory alive as long as the app.
    pub _scratch: Scratch,
    pub ledger: Arc<Ledger>,
    pub auth: Arc<Auth>,
    pub state: AppState,
    pub router: axum::Router,
    pub clock: Arc<AtomicU64>,
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Value,
}

impl App {
    pub fn new() -> App {
        App::with(AuthConfig::default(), ApiConfig::default())
    }

    pub fn with(auth_config: AuthConfig, api_config: ApiConfig) -> App {
        App::on(Scratch::new(), auth_config, api_config)
    }

    /// The app over the imported sample register.
    pub fn with_sample() -> App {
        let scratch = Scratch::new();
        let out = scratch.cli(&["import", sample_path().to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        App::on(scratch, AuthConfig::default(), ApiConfig::default())
    }

    pub fn on(scratch: Scratch, auth_config: AuthConfig, api_config: ApiConfig) -> App {
        let ledger = Arc::new(scratch.open());
        let clock = Arc::new(AtomicU64::new(1_800_000_000_000));
        let c = clock.clone();
        let auth = Arc::new(
            Auth::new(ledger.store().kv("auth").unwrap(), auth_config, Arc::new(move || c.load(Ordering::SeqCst)))
                .unwrap(),
        );
        for role in Role::ALL {
            auth.create_user(role.name(), PASSWORD, role).unwrap();
        }
        let state = AppState::new(ledger.clone(), auth.clone(), api_config);
        let router = api::router(state.clone());
        App { _scratch: scratch, ledger, auth, state, router, clock }
    }

    pub fn advance_secs(&self, s: u64) {
        self.clock.fetch_add(s * 1000, Ordering::SeqCst);
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.load(Ordering::SeqCst)
    }

    pub async fn raw(&self, req: Request<Body>) -> Resp {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Resp { status, headers, body }
    }

    pub async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Resp {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let req = match body {
            Some(v) => b.header("content-type", "application/json").body(Body::from(v.to_string())).unwrap(),
            None => b.body(Body::empty()).unwrap(),
        };
        self.raw(req).await
    }

    pub async fn login(&self, user: &str) -> String {
        let r = self
            .call(Method::POST, "/v1/auth/login", None, Some(json!({"username": user, "password": PASSWORD})))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        r.body["token"].as_str().unwrap().to_owned()
    }

    /// Audit entries (newest first) matching a query string.
    pub async fn audit(&self, query: &str) -> Vec<Value> {
        let token = self.login("auditor").await;
        let r = self.call(Method::GET, &format!("/v1/audit?limit=1000&{query}"), Some(&token), None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        r.body["entries"].as_array().unwrap().clone()
    }

    /// One subject's events in the global feed as `token` sees it, read page by page to the
    /// head.
    pub async fn feed_of(&self, token: &str, subject: &str) -> Vec<Value> {
        let (mut after, mut out) = (0u64, vec![]);
        loop {
            let path = format!("/v1/events?limit=1000&after_position={after}");
            let r = self.call(Method::GET, &path, Some(token), None).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            out.extend(r.body["events"].as_array().unwrap().iter().filter(|e| e["subject"] == subject).cloned());
            let next = r.body["next_position"].as_u64().unwrap();
            if next == after {
                return out;
            }
            after = next;
        }
    }

    /// Whether a view's list, read page by page as `token` sees it, holds `subject`.
    pub async fn view_lists(&self, token: &str, view: &str, subject: &str) -> bool {
        let mut cursor = String::new();
        loop {
            let r = self.call(Method::GET, &format!("/v1/views/{view}?limit=1000{cursor}"), Some(token), None).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            if r.body["items"].as_array().unwrap().iter().any(|i| i["subject"] == subject) {
                return true;
            }
            match r.body["next_cursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => return false,
            }
        }
    }
}

fn note(text: &str) -> Value {
    json!({"events": [{"type": "note.added", "occurred_at": "2024-01-01", "data": {"text": text}}]})
}

/// Every route against every role, anonymous, and half-logged-in (password but no TOTP yet).
/// Each cell's status is asserted; the test fails if the router has a route this table lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_against_every_role() {
    let app = App::new();
    let subject = Uuid::new_v4();
    let staff = app.login("staff").await;
    assert_eq!(
        app.call(Method::POST, &format!("/v1/subjects/{subject}/events"), Some(&staff), Some(note("x"))).await.status,
        201
    );
    app.auth.create_user("victim", PASSWORD, Role::Staff).unwrap();
    // A user with TOTP, stopped after the password step: their mfa token is no bearer token.
    app.auth.create_user("halfway", PASSWORD, Role::Admin).unwrap();
    let halfway_token = app.login("halfway").await;
    let enrol = app.call(Method::POST, "/v1/auth/totp/enroll", Some(&halfway_token), None).await;
    let code = pdledger::auth::totp_code(enrol.body["secret"].as_str().unwrap(), app.now_ms()).unwrap();
    assert_eq!(
        app.call(Method::POST, "/v1/auth/totp/activate", Some(&halfway_token), Some(json!({"code": code})))
            .await
            .status,
        200
    );
    let r = app
        .call(Method::POST, "/v1/auth/login", None, Some(json!({"username": "halfway", "password": PASSWORD})))
        .await;
    let mfa_token = r.body["mfa_token"].as_str().unwrap().to_owned();

    // (method, path, body, status when allowed, roles allowed; None = public)
    type Row = (Method, String, Option<Value>, u16, Option<&'static [&'static str]>);
    let any: &'static [&'static str] = &["admin", "staff", "dpo", "auditor", "service"];
    let table: Vec<Row> = vec![
        (Method::POST, "/v1/auth/login".into(), Some(json!({"username": "NEW", "password": "wrong"})), 401, None),
        (Method::POST, "/v1/auth/totp".into(), Some(json!({"mfa_token": "mfa_x", "code": "123456"})), 401, None),
        (Method::POST, "/v1/auth/totp/enroll".into(), None, 200, Some(any)),
        (Method::POST, "/v1/auth/totp/activate".into(), Some(json!({"code": "abcdef"})), 422, Some(any)),
        (Method::POST, "/v1/auth/logout".into(), None, 200, Some(any)),
        (Method::GET, "/v1/auth/me".into(), None, 200, Some(any)),
        (
            Method::POST,
            "/v1/users".into(),
            Some(json!({"username": "NEW", "password": PASSWORD, "role": "staff"})),
            201,
            Some(&["admin"]),
        ),
        (Method::GET, "/v1/users".into(), None, 200, Some(&["admin"])),
        (Method::POST, "/v1/users/{name}/disable".into(), None, 200, Some(&["admin"])),
        (Method::POST, "/v1/subjects".into(), None, 201, Some(&["staff", "dpo", "service"])),
        (Method::GET, "/v1/subjects".into(), None, 200, Some(&["staff", "dpo"])),
        (
            Method::POST,
            "/v1/subjects/lookup".into(),
            Some(json!({"email": "nobody@example.com"})),
            200,
            Some(&["staff", "dpo"]),
        ),
        (Method::POST, "/v1/subjects/{id}/events".into(), Some(note("y")), 201, Some(&["staff", "dpo", "service"])),
        (Method::GET, "/v1/subjects/{id}/events".into(), None, 200, Some(&["staff", "dpo"])),
        (Method::GET, "/v1/events".into(), None, 200, Some(&["staff", "dpo"])),
        (Method::GET, "/v1/views/{view}".into(), None, 200, Some(&["staff", "dpo"])),
        (Method::GET, "/v1/views/{view}/{id}".into(), None, 200, Some(&["staff", "dpo"])),
        (Method::GET, "/v1/subjects/{id}/export".into(), None, 200, Some(&["dpo"])),
        (Method::POST, "/v1/subjects/{id}/restrict".into(), None, 200, Some(&["dpo"])),
        (Method::POST, "/v1/subjects/{id}/unrestrict".into(), None, 200, Some(&["dpo"])),
        (Method::POST, "/v1/subjects/{id}/erase".into(), Some(json!({"reason": "test"})), 200, Some(&["dpo"])),
        (Method::POST, "/v1/keys/rotate".into(), None, 200, Some(&["admin"])),
        (Method::GET, "/v1/audit".into(), None, 200, Some(&["admin", "dpo", "auditor"])),
        (Method::GET, "/v1/ledger/verify".into(), None, 200, Some(&["admin", "auditor"])),
        (Method::GET, "/v1/ledger/head".into(), None, 200, Some(&["admin", "auditor"])),
        (Method::GET, "/healthz".into(), None, 200, None),
        (Method::GET, "/metrics".into(), None, 200, None),
        (Method::GET, "/openapi.json".into(), None, 200, None),
        (Method::GET, "/".into(), None, 200, None),
        (Method::GET, "/console/app.js".into(), None, 200, None),
        (Method::GET, "/console/qr.js".into(), None, 200, None),
        (Method::GET, "/console/app.css".into(), None, 200, None),
    ];

    // The table covers exactly the router's routes, and so does the OpenAPI document.
    let routes: BTreeSet<(String, String)> =
        api::route_table(app.state.clone()).iter().map(|r| (r.method.to_string(), r.path.to_owned())).collect();
    let tested: BTreeSet<(String, String)> = table.iter().map(|r| (r.0.to_string(), r.1.clone())).collect();
    assert_eq!(routes, tested, "routes and the test table differ");
    let doc = app.call(Method::GET, "/openapi.json", None, None).await.body;
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(p, ops)| ops.as_object().unwrap().keys().map(move |m| (m.to_uppercase(), p.clone())))
        .collect();
    assert_eq!(routes, documented, "routes and the OpenAPI document differ");

    let callers: Vec<(&str, Option<String>)> = vec![("anonymous", None), ("half-logged-in", Some(mfa_token.clone()))]
        .into_iter()
        .chain(Role::ALL.iter().map(|r| (r.name(), None)))
        .collect();
    let mut n = 0;
    for (who, fixed_token) in &callers {
        for (method, path, body, ok, allowed) in &table {
            let mut path =
                path.replace("{id}", &subject.to_string()).replace("{name}", "victim").replace("{view}", "customer");
            if path.ends_with("/erase") {
                // Each erasure gets a subject of its own, so the others stay usable.
                let fresh = Uuid::new_v4();
                let staff = app.login("staff").await;
                let r = app
                    .call(Method::POST, &format!("/v1/subjects/{fresh}/events"), Some(&staff), Some(note("z")))
                    .await;
                assert_eq!(r.status, 201);
                path = path.replace(&subject.to_string(), &fresh.to_string());
            }
            if *method == Method::GET && path == "/v1/subjects" {
                path.push_str("?email=nobody%40example.com");
            }
            let body = body.clone().map(|b| {
                let s = b.to_string().replace("NEW", &format!("new-{who}-{n}"));
                serde_json::from_str(&s).unwrap()
            });
            n += 1;
            let is_role = Role::ALL.iter().any(|r| r.name() == *who);
            // Logging out spends the token: every cell gets a fresh one.
            let token = if is_role { Some(app.login(who).await) } else { fixed_token.clone() };
            let expected = match allowed {
                None => *ok,
                Some(_) if !is_role => 401,
                Some(roles) if roles.contains(who) => *ok,
                Some(_) => 403,
            };
            let r = app.call(method.clone(), &path, token.as_deref(), body).await;
            assert_eq!(r.status.as_u16(), expected, "{who} {method} {path}: {}", r.body);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_flows_password_totp_replay_expiry_revocation() {
    let app = App::new();
    // Password only.
    let token = app.login("staff").await;
    assert_eq!(app.call(Method::GET, "/v1/events", Some(&token), None).await.status, 200);

    // Enrol, activate with a first code.
    let enrol = app.call(Method::POST, "/v1/auth/totp/enroll", Some(&token), None).await;
    assert_eq!(enrol.status, 200);
    let secret = enrol.body["secret"].as_str().unwrap().to_owned();
    assert!(enrol.body["otpauth_uri"].as_str().unwrap().starts_with("otpauth://totp/pdledger:staff?secret="));
    let code = pdledger::auth::totp_code(&secret, app.now_ms()).unwrap();
    assert_eq!(
        app.call(Method::POST, "/v1/auth/totp/activate", Some(&token), Some(json!({"code": code}))).await.status,
        200
    );

    // Password then TOTP.
    app.advance_secs(30);
    let r =
        app.call(Method::POST, "/v1/auth/login", None, Some(json!({"username": "staff", "password": PASSWORD}))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["mfa_required"], true);
    assert!(r.body.get("token").is_none());
    let mfa = r.body["mfa_token"].as_str().unwrap().to_owned();
    // The mfa token is not a session.
    assert_eq!(app.call(Method::GET, "/v1/events", Some(&mfa), None).await.status, 401);
    let code = pdledger::auth::totp_code(&secret, app.now_ms()).unwrap();
    let r = app.call(Method::POST, "/v1/auth/totp", None, Some(json!({"mfa_token": mfa, "code": code}))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let session = r.body["token"].as_str().unwrap().to_owned();
    assert_eq!(app.call(Method::GET, "/v1/events", Some(&session), None).await.status, 200);

    // The same code again, within its window, on a new login: refused.
    let r =
        app.call(Method::POST, "/v1/auth/login", None, Some(json!({"username": "staff", "password": PASSWORD}))).await;
    let mfa2 = r.body["mfa_token"].as_str().unwrap().to_owned();
    let r = app.call(Method::POST, "/v1/auth/totp", None, Some(json!({"mfa_token": mfa2, "code": code}))).await;
    assert_eq!(r.status, 401, "a replayed code was accepted");
    // A code two steps old is outside the window.
    app.advance_secs(90);
    let old = pdledger::auth::totp_code(&secret, app.now_ms() - 60_000).unwrap();
    let r = app.call(Method::POST, "/v1/auth/totp", None, Some(json!({"mfa_token": mfa2, "code": old}))).await;
    assert_eq!(r.status, 401);

    // Logout revokes.
    assert_eq!(app.call(Method::POST, "/v1/auth/logout", Some(&session), None).await.status, 200);
    assert_eq!(app.call(Method::GET, "/v1/events", Some(&session), None).await.status, 401);

    // Expiry.
    let dpo = app.login("dpo").await;
    assert_eq!(app.call(Method::GET, "/v1/events", Some(&dpo), None).await.status, 200);
    app.advance_secs(AuthConfig::default().session_secs + 1);
    assert_eq!(app.call(Method::GET, "/v1/events", Some(&dpo), None).await.status, 401);

    // Disabling a user stops their live token at once.
    let service = app.login("service").await;
    assert_eq!(app.call(Method::POST, "/v1/subjects", Some(&service), None).await.status, 201);
    let admin = app.login("admin").await;
    assert_eq!(app.call(Method::POST, "/v1/users/service/disable", Some(&admin), None).await.status, 200);
    assert_eq!(app.call(Method::POST, "/v1/subjects", Some(&service), None).await.status, 401);
    let r = app
        .call(Method::POST, "/v1/auth/login", None, Some(json!({"username": "service", "password": PASSWORD})))
        .await;
    assert_eq!(r.status, 401);

    // Logins and failures are in the trail.
    let trail = app.audit("actor=staff").await;
    assert!(trail.iter().any(|e| e["action"] == "login" && e["outcome"] == "ok"));
    assert!(trail.iter().any(|e| e["action"] == "login_failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_password_hash_is_argon2id_at_owasp_cost() {
    let app = App::new();
    let user = app.auth.user("staff").unwrap().unwrap();
    let hash = user.password_hash();
    assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
    // Salted: the same password hashes differently for another user.
    assert_ne!(hash, app.auth.user("dpo").unwrap().unwrap().password_hash());
    assert!(!hash.contains(PASSWORD));
    // Too short for an account without a second factor.
    let admin = app.login("admin").await;
    let r = app
        .call(
            Method::POST,
            "/v1/users",
            Some(&admin),
            Some(json!({"username": "shorty", "password": "fourteen-chars", "role": "staff"})),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    // Long passwords are not truncated: a 200-character password differs from its prefix.
    let long = "x".repeat(199) + "y";
    app.auth.create_user("longpw", &long, Role::Staff).unwrap();
    let r = app
        .call(
            Method::POST,
            "/v1/auth/login",
            None,
            Some(json!({"username": "longpw", "password": "x".repeat(199) + "z"})),
        )
        .await;
    assert_eq!(r.status, 401);
    let r = app.call(Method::POST, "/v1/auth/login", None, Some(json!({"username": "longpw", "password": long}))).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockout_after_failures_and_recovery_after_the_wait() {
    let config =
        AuthConfig { failures_per_account: 3, failures_per_address: 100, lockout_secs: 60, ..Default::default() };
    let app = App::with(config, ApiConfig::default());
    let wrong = json!({"username": "staff", "password": "not-the-password!"});
    // A failed login as `username`: its time and its body.
    let failed = |username: String| {
        let app = &app;
        async move {
            let body = json!({"username": username, "password": "not-the-password!"});
            let t = Instant::now();
            let r = app.call(Method::POST, "/v1/auth/login", None, Some(body)).await;
            let took = t.elapsed();
            assert_eq!(r.status, 401);
            (took, r.body)
        }
    };
    // Similar timing: both pay one Argon2id verification and one audit write. The fastest of
    // eight of each, interleaved (on a busy 2-core machine, with other tests running, two
    // samples each once differed 3.2x): two on `staff`, then one each on accounts of their
    // own, so that no account reaches its lockout.
    for i in 0..6 {
        app.auth.create_user(&format!("timing{i}"), PASSWORD, Role::Staff).unwrap();
    }
    let mut bodies = vec![];
    let (mut t_wrong, mut t_unknown) = (vec![], vec![]);
    for i in 0..8 {
        let user = if i < 2 { "staff".to_owned() } else { format!("timing{}", i - 2) };
        let (took, body) = failed(user).await;
        t_wrong.push(took);
        bodies.push(body);
        let (took, body) = failed(format!("nosuchuser{i}")).await;
        t_unknown.push(took);
        bodies.push(body);
    }
    // Same body for an unknown user and a wrong password.
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "{bodies:?}");
    let (w, u) = (t_wrong.iter().min().unwrap().as_secs_f64(), t_unknown.iter().min().unwrap().as_secs_f64());
    assert!(w / u < 3.0 && u / w < 3.0, "wrong password {w:.4}s vs unknown user {u:.4}s");

    // The third failure locks the account; even the right password gets 429 now.
    assert_eq!(app.call(Method::POST, "/v1/auth/login", None, Some(wrong.clone())).await.status, 401);
    let r =
        app.call(Method::POST, "/v1/auth/login", None, Some(json!({"username": "staff", "password": PASSWORD}))).await;
    assert_eq!(r.status, 429, "{}", r.body);
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    // Other accounts are not affected.
    app.login("dpo").await;
    // After the wait, the right password works again.
    app.advance_secs(61);
    app.login("staff").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_errors_append_nothing() {
    let app = App::with(AuthConfig::default(), ApiConfig { body_bytes_max: 64 * 1024, ..Default::default() });
    let staff = app.login("staff").await;
    let subject = Uuid::new_v4();
    let path = format!("/v1/subjects/{subject}/events");
    let r = app.call(Method::POST, &path, Some(&staff), Some(note("first"))).await;
    assert_eq!(r.status, 201);
    assert_eq!((r.body["first_version"].as_u64(), r.body["last_version"].as_u64()), (Some(1), Some(1)));

    let check_unchanged = || async { assert_eq!(app.ledger.stream_version(subject).unwrap(), 1) };

    // Version conflict.
    let mut body = note("second");
    body["expected_version"] = json!(0);
    let r = app.call(Method::POST, &path, Some(&staff), Some(body)).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.body["error"], "version_conflict");
    assert_eq!(r.body["current_version"], 1);
    check_unchanged().await;

    // Schema violation in the second event: names the index and pointer; the first (valid)
    // event is not appended either.
    let body = json!({"events": [
        {"type": "note.added", "data": {"text": "fine"}},
        {"type": "customer.contact_changed", "data": {"email": "not an email"}}]});
    let r = app.call(Method::POST, &path, Some(&staff), Some(body)).await;
    assert_eq!(r.status, 422);
    assert_eq!(r.body["error"], "schema_violation");
    assert_eq!(r.body["index"], 1);
    assert_eq!(r.body["pointer"], "/events/1/data/email");
    assert!(!r.body.to_string().contains("not an email"), "the error echoes the value: {}", r.body);
    check_unchanged().await;

    // Body over the limit.
    let r = app.call(Method::POST, &path, Some(&staff), Some(note(&"x".repeat(70 * 1024)))).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.body["error"], "too_large");
    check_unchanged().await;

    // Wrong content type.
    let req = Request::post(&path)
        .header("authorization", format!("Bearer {staff}"))
        .header("content-type", "text/plain")
        .body(Body::from(note("x").to_string()))
        .unwrap();
    let r = app.raw(req).await;
    assert_eq!(r.status, 415);
    assert_eq!(r.body["error"], "unsupported_media_type");
    check_unchanged().await;

    // Malformed JSON.
    let req = Request::post(&path)
        .header("authorization", format!("Bearer {staff}"))
        .header("content-type", "application/json")
        .body(Body::from("{\"events\": [}"))
        .unwrap();
    let r = app.raw(req).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"], "bad_request");
    check_unchanged().await;

    // Unknown route, bad id, unknown type.
    assert_eq!(app.call(Method::GET, "/v1/nothing", Some(&staff), None).await.status, 404);
    assert_eq!(
        app.call(Method::POST, "/v1/subjects/not-a-uuid/events", Some(&staff), Some(note("x"))).await.status,
        400
    );
    let r = app.call(Method::POST, &path, Some(&staff), Some(json!({"events": [{"type": "nope", "data": {}}]}))).await;
    assert_eq!((r.status.as_u16(), r.body["pointer"].as_str()), (422, Some("/events/0/type")));
    check_unchanged().await;

    // Every error has the one shape.
    let r = app.call(Method::GET, "/v1/nothing", None, None).await;
    assert!(r.body["error"].is_string() && r.body["message"].is_string());
}

/// Every read of a subject leaves exactly one audit entry; a denied read leaves a `denied`
/// entry; the entry is durable before the data is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_leaves_exactly_one_audit_entry() {
    let app = App::new();
    let staff = app.login("staff").await;
    let subject = Uuid::new_v4();
    let path = format!("/v1/subjects/{subject}/events");
    assert_eq!(app.call(Method::POST, &path, Some(&staff), Some(note("hello"))).await.status, 201);
    for i in 1..=3 {
        let before = app.ledger.head().unwrap().0;
        let r = app.call(Method::GET, &path, Some(&staff), None).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body["events"][0]["data"]["text"], "hello");
        // The entry is in the log (durable: the head only moves after fsync) by the time the
        // response is here.
        assert_eq!(app.ledger.head().unwrap().0, before + 1);
        let reads: Vec<_> = app
            .audit(&format!("subject={subject}&action=read"))
            .await
            .into_iter()
            .filter(|e| e["actor"] == "staff")
            .collect();
        assert_eq!(reads.len(), i, "{reads:?}");
        assert_eq!(reads[0]["outcome"], "ok");
        assert_eq!(reads[0]["route"], "/v1/subjects/{id}/events");
    }
    // A denied read.
    let service = app.login("service").await;
    assert_eq!(app.call(Method::GET, &path, Some(&service), None).await.status, 403);
    let denied = app.audit(&format!("subject={subject}&action=denied")).await;
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["actor"], "service");
    // Anonymous attempts are recorded too.
    assert_eq!(app.call(Method::GET, &path, None, None).await.status, 401);
    let denied = app.audit(&format!("subject={subject}&action=denied")).await;
    assert_eq!(denied.len(), 2);
    assert_eq!(denied[0]["actor"], "");
    // The feed records one read per subject it returns.
    let r = app.call(Method::GET, "/v1/events?after_position=0&limit=10", Some(&staff), None).await;
    assert_eq!(r.body["events"].as_array().unwrap().len(), 1);
    let reads = app.audit(&format!("subject={subject}&action=read&actor=staff")).await;
    assert_eq!(reads.len(), 4);
    assert_eq!(reads[0]["route"], "/v1/events");
}

/// The feed waits for new events when asked, and returns as soon as one is durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_long_polls_for_new_events() {
    let app = Arc::new(App::new());
    let staff = app.login("staff").await;
    let head = app.ledger.head().unwrap().0;
    let a = app.clone();
    let t = staff.clone();
    let waiter = tokio::spawn(async move {
        let started = Instant::now();
        let r = a.call(Method::GET, &format!("/v1/events?after_position={head}&wait=20"), Some(&t), None).await;
        (r, started.elapsed())
    });
    // The waiter is parked on the head watch; an append wakes it.
    let subject = Uuid::new_v4();
    let r = app.call(Method::POST, &format!("/v1/subjects/{subject}/events"), Some(&staff), Some(note("wake"))).await;
    assert_eq!(r.status, 201);
    let (r, took) = waiter.await.unwrap();
    assert_eq!(r.status, 200);
    let events = r.body["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{}", r.body);
    assert_eq!(events[0]["data"]["text"], "wake");
    assert!(took.as_secs() < 20, "long poll did not wake: {took:?}");
    // With nothing new and no wait, it answers at once, with no events (the log has moved
    // on only by audit entries, which the feed does not carry).
    let next = r.body["next_position"].as_u64().unwrap();
    let r = app.call(Method::GET, &format!("/v1/events?after_position={next}"), Some(&staff), None).await;
    assert_eq!(r.body["events"].as_array().unwrap().len(), 0);
    assert!(r.body["next_position"].as_u64().unwrap() >= next);
}

/// Overload answers 503 with Retry-After instead of queueing without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_answers_503_with_retry_after() {
    let app = Arc::new(App::with(AuthConfig::default(), ApiConfig { concurrency_max: 1, ..Default::default() }));
    let staff = app.login("staff").await;
    let head = app.ledger.head().unwrap().0;
    // One long poll holds the only slot...
    let a = app.clone();
    let t = staff.clone();
    let holder = tokio::spawn(async move {
        a.call(Method::GET, &format!("/v1/events?after_position={head}&wait=20"), Some(&t), None).await
    });
    let mut spins = 0;
    while app.state.requests_in_flight() == 0 {
        assert!(!holder.is_finished(), "the long poll returned early");
        spins += 1;
        assert!(spins < 10_000_000, "the long poll never started");
        tokio::task::yield_now().await;
    }
    // ...so the next request is turned away at once.
    let r = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.body["error"], "overloaded");
    holder.abort();
}

/// Lookup through the blind index: email in any letter case and with spaces, personal number
/// with or without dash and century digits, organisation number; nothing for unknown values;
/// each lookup audited per subject found, without the value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_by_email_personal_and_org_number() {
    let app = App::new();
    let staff = app.login("staff").await;
    let events = sample();
    let mut person = None;
    let mut company = None;
    for e in events.iter().filter(|e| e["type"] == "customer.registered").take(30) {
        let subject = e["subject"].as_str().unwrap();
        let body =
            json!({"events": [{"type": "customer.registered", "occurred_at": e["occurred_at"], "data": e["data"]}]});
        let r = app.call(Method::POST, &format!("/v1/subjects/{subject}/events"), Some(&staff), Some(body)).await;
        assert_eq!(r.status, 201, "{}", r.body);
        if e["data"]["kind"] == "person" && person.is_none() {
            person = Some(e.clone());
        }
        if e["data"]["kind"] == "company" && company.is_none() {
            company = Some(e.clone());
        }
    }
    let (person, company) = (person.unwrap(), company.unwrap());
    let find = |q: String| {
        let app = &app;
        let staff = staff.clone();
        async move {
            let r = app.call(Method::GET, &format!("/v1/subjects?{q}"), Some(&staff), None).await;
            assert_eq!(r.status, 200, "{q}: {}", r.body);
            r.body["subjects"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect::<Vec<_>>()
        }
    };
    let enc = |s: &str| s.replace('@', "%40").replace(' ', "%20").replace('+', "%2B");
    let want = vec![person["subject"].as_str().unwrap().to_owned()];
    let email = person["data"]["email"].as_str().unwrap();
    assert_eq!(find(format!("email={}", enc(email))).await, want);
    assert_eq!(find(format!("email={}", enc(&format!("  {}  ", email.to_uppercase())))).await, want);
    let pn = person["data"]["personal_number"].as_str().unwrap(); // YYYYMMDD-NNNN
    assert_eq!(find(format!("personal_number={pn}")).await, want);
    assert_eq!(find(format!("personal_number={}", pn.replace('-', ""))).await, want);
    assert_eq!(find(format!("personal_number={}", &pn[2..])).await, want);
    let on = company["data"]["org_number"].as_str().unwrap();
    let want_company = vec![company["subject"].as_str().unwrap().to_owned()];
    assert_eq!(find(format!("org_number={on}")).await, want_company);
    assert_eq!(find(format!("org_number={}", on.replace('-', ""))).await, want_company);
    assert!(find("email=nobody%40example.org".into()).await.is_empty());
    assert!(find("personal_number=19000101-0000".into()).await.is_empty());
    // Exactly one kind of key per request.
    let r = app.call(Method::GET, "/v1/subjects?email=a%40b.c&org_number=1", Some(&staff), None).await;
    assert_eq!(r.status, 400);
    let r = app.call(Method::GET, "/v1/subjects", Some(&staff), None).await;
    assert_eq!(r.status, 400);
    // Audited per subject found, never with the value.
    let trail = app.audit(&format!("subject={}&action=lookup", want[0])).await;
    assert_eq!(trail.len(), 5, "{trail:?}");
    let everything = app.audit("action=lookup").await;
    assert!(!serde_json::to_string(&everything).unwrap().contains(email));
}
