//! The `pdledger` binary: all of it lives in the library, so tests can drive it too.
//!
//! A panic is never how the binary ends: sled 0.34 can panic deep inside on a damaged file
//! (its issues 1533, 1527, 1509), so a panic becomes a clear message and exit code 2.

/// mimalloc rather than glibc's malloc: a quarter of the CPU went to glibc's malloc and free
/// in rebuilds, rotations and under HTTP load; with mimalloc those run 1.3–1.6x faster, at the
/// cost of a higher resident size (docs/BENCHMARKS.md, docs/RELIABILITY.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let at = info.location().map(|l| l.file().to_owned()).unwrap_or_default();
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if at.contains("sled") {
            eprintln!(
                "error: the store could not be read ({what}): the data directory is damaged. \
                 Run `pdledger verify` to see where, or restore it from a backup."
            );
        } else {
            eprintln!("error: internal error ({what} at {at}); please report it");
        }
    }));
    pdledger::cli::forbid_core_dumps();
    match std::panic::catch_unwind(pdledger::cli::main) {
        Ok(code) => code,
        Err(_) => std::process::ExitCode::from(2),
    }
}
