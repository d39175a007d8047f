//! The `pdledger` binary: all of it lives in the library, so tests can drive it too.
//!
//! A panic is never how the binary ends: sled 0.34 can panic deep inside on a damaged file
//! (its issues 1533, 1527, 1509), so a panic becomes a clear message and exit code 2.

fn main() -> std::process::ExitCode {
    tune_malloc();
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
    match std::panic::catch_unwind(pdledger::cli::main) {
        Ok(code) => code,
        Err(_) => std::process::ExitCode::from(2),
    }
}

/// glibc's malloc keeps what threads free in per-thread arenas (up to eight per core) and,
/// after the first large free, serves large blocks from them too, so a server's memory grows
/// with every thread that once hashed a password (Argon2 takes 19 MiB) or built a large
/// export, and rarely shrinks. Two arenas, and large blocks always mapped and unmapped, keep
/// the server's memory close to what it holds (measured in docs/RELIABILITY.md, the soak).
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called first thing, before any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}
