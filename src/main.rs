//! The `pdledger` binary: all of it lives in the library, so tests can drive it too.

fn main() -> std::process::ExitCode {
    pdledger::cli::main()
}
