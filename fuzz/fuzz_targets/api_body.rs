//! API request bodies: every route that takes a JSON body (`api::BODY_ROUTES`) decodes the
//! same bytes into its handler's own type, as its extractor does (`api::decode_body`). It never
//! panics; a refusal is a 4xx in the API's one error shape, and never quotes a value
//! (`quoting.rs`).
#![no_main]

mod quoting;

use axum::response::IntoResponse;
use libfuzzer_sys::fuzz_target;
use pdledger::api::{decode_body, BODY_ROUTES};

fuzz_target!(|data: &[u8]| {
    let body = serde_json::from_slice::<serde_json::Value>(data).ok();
    for path in BODY_ROUTES {
        let Err(e) = decode_body(path, data).expect("a route with a body") else { continue };
        if let Some(body) = &body {
            quoting::assert_no_value_quoted(&format!("{e:?}"), body, &[]);
        }
        let r = e.into_response();
        assert!(r.status().is_client_error(), "{path}: {}", r.status());
    }
});
