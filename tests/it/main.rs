//! The integration suite: one binary, one module per face of the ledger.
//!
//! - `core`: the library face: round trips, no plaintext at rest, tamper detection,
//!   ciphertext binding, concurrent appenders.
//! - `durability`: the fsync proof under strace, and kill -9 of an appending process.
//! - `cli`: the command line: bad input, exit codes, a held data directory.
//! - `http`: the HTTP API through the router: roles × routes, logins, lockout, appends, audit.
//! - `server`: the real `pdledger serve` over TLS on a loopback socket.
//! - `crash`: kill -9 of the real server under the soak's mixed load, 20 times on one data
//!   directory: acknowledged appends and erasures survive, nothing erased is readable.
//! - `diskfull`: the server on a small tmpfs filled by appends: 507, reads go on, appends resume.
//! - `console`: the DPO console: its files and headers, and end to end in headless Chromium.
//! - `schemathesis`: API fuzzing of the real server against its own OpenAPI document.

mod support;

mod backup;
mod cli;
mod console;
mod core;
mod crash;
mod diskfull;
mod durability;
mod erasure;
mod export;
mod http;
mod reliability;
mod retention;
mod schemathesis;
mod server;
mod soak;
mod views;
