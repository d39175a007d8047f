//! pdledger: an event-sourced personal-data ledger.
//!
//! Each data subject's events are sealed under that subject's own key (one per data
//! category) and appended to one global log, chained with blake3 over the bytes as stored.
//! Erasure destroys the key; the chain still verifies. `docs/ARCHITECTURE.md` is the map.
//!
//! # Layout, in reading order
//!
//! - [`record`]: the stored record format and its chain hash (pure).
//! - [`crypto`]: master and subject keys, sealing, wrapping (the only module holding keys).
//! - [`keyring`]: master-key generations on disk, outside the data directory.
//! - [`store`]: the only module that knows sled: key layout, atomic durable commits, the lock.
//! - [`keys`]: subject keys unwrapped on demand, cached in memory.
//! - [`schema`]: event types, validation, data categories, lookup annotations.
//! - [`lookup`]: lookup keys and how their values are normalised for the blind index.
//! - [`json`]: a borrowed, read-only JSON tree: how a rebuild reads events without a map per object.
//! - [`projection`]: view definitions from `projections/`, checked against the schemas; applying them (pure).
//! - [`writer`]: the single writer thread and group commit.
//! - [`ledger`]: everything above joined: open, append, read, walk the log.
//! - [`restore`]: a data directory from a backup, erasures from newer sources re-applied.
//! - [`retention`]: retention rules per category; holds after erasure, scheduled shredding.
//! - [`rotate`]: master-key rotation, crash-safe step by step (completes erasure).
//! - [`rotator`]: rotation after erasures, coalesced, in the background of `serve`.
//! - [`verify`]: keyless chain verification.
//! - [`views`]: view documents sealed at rest, kept current by the writer, rebuilt by replay.
//! - [`import`]: JSON Lines import in validated batches.
//! - [`backup`]: backups (log segments, key table, manifest), continuous and one-off; keyless verify.
//! - [`auth`]: users, Argon2id passwords, TOTP, sessions, lockout.
//! - [`audit`]: audit entries: written to the log, read back.
//! - [`export`]: the register extract (GDPR Art. 15/20): JSON, a bilingual HTML page, import lines.
//! - [`api`]: the HTTP API: routes and their permissions, handlers, errors, OpenAPI.
//! - [`serve`]: `pdledger serve`: TLS, first start, graceful shutdown.
//! - [`console`]: the DPO console, a web page over the API, compiled into the binary.
//! - [`cli`]: the `pdledger` command line.
//! - [`time`], [`generate`]: timestamps; a synthetic register for tests and benchmarks.

pub mod api;
pub mod api_doc;
pub mod audit;
pub mod auth;
pub mod backup;
pub mod cli;
pub mod console;
pub mod crypto;
pub mod export;
pub mod generate;
pub mod import;
pub mod json;
pub mod keyring;
pub mod keys;
pub mod ledger;
pub mod lookup;
pub mod projection;
pub mod record;
pub mod restore;
pub mod retention;
pub mod rotate;
pub mod rotator;
pub mod schema;
pub mod serve;
pub mod store;
pub mod time;
pub mod verify;
pub mod views;
pub mod writer;

/// Shared by the fuzz properties of the decoders (`record`, `import`, `projection`).
#[cfg(test)]
pub(crate) mod fuzzing {
    /// Applies byte edits to `bytes`: (where, byte, 0 replace | 1 insert | 2 delete).
    pub fn mutate(bytes: &mut Vec<u8>, edits: &[(usize, u8, u8)]) {
        for &(at, byte, how) in edits {
            let i = at % (bytes.len() + 1);
            match how {
                0 if i < bytes.len() => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ if i < bytes.len() => {
                    bytes.remove(i);
                }
                _ => {}
            }
        }
    }
}
