//! View definitions: `projection::parse_view` on any text, against the shipped schemas. The
//! file stem is the definition's own `view` name when it has one (so the fuzzer gets past the
//! name check), else `x`. It never panics; a refusal names the file and a line within the text.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pdledger::projection::parse_view;
use pdledger::schema::Schemas;

fn schemas() -> &'static Schemas {
    static S: OnceLock<Schemas> = OnceLock::new();
    S.get_or_init(Schemas::builtin)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let stem = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("view").and_then(|n| n.as_str()).map(str::to_owned))
        .unwrap_or_else(|| "x".to_owned());
    let file = format!("{stem}.json");
    if let Err(e) = parse_view(&file, &stem, text, schemas()) {
        assert_eq!(e.file, file);
        assert!(e.line <= text.lines().count() + 1, "line {} of {} lines: {e}", e.line, text.lines().count());
    }
});
