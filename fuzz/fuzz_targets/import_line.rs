//! JSON Lines import: `import::parse_line`, the parser and schema check of one line, on
//! anything, against a real ledger (empty, in a scratch directory under $TMPDIR, opened once
//! per process). It never panics, and a refusal never quotes a value (`quoting.rs`).
#![no_main]

mod quoting;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pdledger::import::parse_line;
use pdledger::keyring::Keyring;
use pdledger::ledger::{Ledger, OpenOptions};
use serde_json::Value;

fn ledger() -> &'static Ledger {
    static L: OnceLock<Ledger> = OnceLock::new();
    L.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pdledger-fuzz-import-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut opts = OpenOptions::new(dir.join("data"), Keyring::Dir(dir.join("keys")), "fuzz");
        opts.limits.cache_bytes = 4 << 20;
        Ledger::open(opts).expect("opening a new ledger")
    })
}

fuzz_target!(|data: &[u8]| {
    let Err(message) = parse_line(ledger(), data) else { return };
    // A line that is JSON: its values must not come back in the refusal.
    if let Ok(line) = serde_json::from_slice::<Value>(data) {
        let event_type = line.get("type").and_then(Value::as_str).unwrap_or("");
        quoting::assert_no_value_quoted(&message, &line, &[event_type]);
    }
});
