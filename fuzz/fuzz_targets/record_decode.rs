//! Stored record bytes: `record::decode` on anything. It never panics and never allocates
//! more than its input (libFuzzer's -malloc_limit_mb/-rss_limit_mb catch it if it does); what
//! decodes re-encodes to the same bytes, and the recomputed hash check never panics either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pdledger::record::{decode, encode, hash_is_valid};

fuzz_target!(|data: &[u8]| {
    let Ok(r) = decode(data) else { return };
    let _ = hash_is_valid(data, &r);
    // The format has one encoding per record: the body re-encodes byte for byte, and the
    // chain fields (prev_hash, then hash) follow it.
    let (again, hash) = encode(&r.header, &r.nonce, &r.payload, &r.prev_hash);
    let body = data.len() - 64;
    assert_eq!(&again[..body], &data[..body], "decode → encode changed the body");
    assert_eq!(&again[body..body + 32], &data[body..body + 32], "prev_hash moved");
    assert_eq!(hash_is_valid(data, &r), hash == r.hash);
    let r2 = decode(&again).expect("a re-encoded record decodes");
    assert_eq!(r2.header, r.header);
    assert_eq!(r2.payload, r.payload);
    assert_eq!(r2.nonce, r.nonce);
});
