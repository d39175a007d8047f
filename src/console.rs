//! The DPO console: a web page for the everyday privacy work, served by `pdledger serve` at
//! `/` from files compiled into the binary (`src/console/`: one HTML page, one script, one
//! QR-code encoder, one style sheet; hand-written, no build step).
//!
//! The page adds no privileges of its own: it talks only to the JSON API with the caller's
//! bearer token, and builds its controls from the caller's role (`GET /v1/auth/me`); the
//! server refuses anything the role may not do anyway. It is safe by construction: a strict
//! Content-Security-Policy (scripts only from these files, Trusted Types so no string can
//! become HTML), personal data put into the page only as text, none in URLs, and nothing in
//! browser storage but the session token.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

/// The console's Content-Security-Policy: its own files only, no inline script or style, no
/// HTML from strings (Trusted Types), no framing, no form posts, requests to this origin only.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                       connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'; \
                       require-trusted-types-for 'script'; trusted-types 'none'";

pub const INDEX_HTML: &str = include_str!("console/index.html");
pub const APP_JS: &str = include_str!("console/app.js");
pub const QR_JS: &str = include_str!("console/qr.js");
pub const APP_CSS: &str = include_str!("console/app.css");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

/// `GET /`: the console's page.
pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /console/app.js`: the console's script.
pub async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /console/qr.js`: the QR-code encoder that shows the TOTP enrolment URI.
pub async fn qr_js() -> Response {
    asset("text/javascript; charset=utf-8", QR_JS)
}

/// `GET /console/app.css`: the console's style sheet.
pub async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}
