//! The integration suite: one binary, one module per face of the ledger.
//!
//! - `core`: the library face: round trips, no plaintext at rest, tamper detection,
//!   ciphertext binding, concurrent appenders.
//! - `durability`: the fsync proof under strace, and kill -9 of an appending process.
//! - `cli`: the command line: bad input, exit codes, a held data directory.

mod support;

mod cli;
mod core;
mod durability;
