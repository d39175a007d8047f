//! The `pdledger` command line. Parses arguments, runs one command, and says how it went:
//! `Ok(Outcome::Passed)` exits 0, `Ok(Outcome::Failed)` (a check failed) exits 1, `Err` exits 2.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

use crate::keyring::Keyring;
use crate::ledger::{Ledger, Limits, OpenOptions, Payload};
use crate::projection::Projections;
use crate::schema::Schemas;
use crate::store::Store;
use crate::verify::Anchor;

#[derive(Parser, Debug)]
#[command(
    name = "pdledger",
    version,
    about = "An event-sourced personal-data ledger with crypto-shredding erasure.",
    long_about = "pdledger keeps each data subject's events encrypted under that subject's own key, in one \
    append-only log chained with blake3. Erasing a subject destroys its key; the chain still verifies.\n\n\
    Exit codes: 0 ok, 1 a check failed (verify found a break, a subject is unknown or erased), 2 usage or runtime error."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// The data directory (created if missing).
    #[arg(long, env = "PDLEDGER_DATA", default_value = "./pdledger-data", global = true)]
    pub data: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct KeyArgs {
    /// The keyring directory, beside the data directory and never inside it. Created with mode
    /// 0700 on first use. PDLEDGER_MASTER_KEY=<generation>:<hex> replaces it.
    #[arg(long, env = "PDLEDGER_KEYRING", default_value = "./pdledger-keyring")]
    pub keyring: PathBuf,
    /// A directory of event schemas to use instead of the ones compiled in.
    #[arg(long, env = "PDLEDGER_SCHEMAS")]
    pub schemas: Option<PathBuf>,
    /// A directory of view definitions to use instead of the ones compiled in (see
    /// projections/README.md). A changed definition rebuilds the views at start.
    #[arg(long, env = "PDLEDGER_PROJECTIONS")]
    pub projections: Option<PathBuf>,
    /// A retention rules file to use instead of the one compiled in
    /// (schemas/retention/rules.json).
    #[arg(long, env = "PDLEDGER_RETENTION")]
    pub retention: Option<PathBuf>,
}

impl KeyArgs {
    fn rules(&self) -> anyhow::Result<crate::retention::Rules> {
        Ok(match &self.retention {
            Some(p) => crate::retention::Rules::load(p)?,
            None => crate::retention::Rules::builtin(),
        })
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Append events from a JSON Lines file: {"subject","type","occurred_at"?,"data"} per line.
    ///
    /// Lines are validated against the schemas and appended in all-or-nothing batches. The
    /// import stops at the first bad line, naming it, with nothing of that line's batch appended
    /// and every earlier batch durable. The audit trail gets an `append` entry (by the actor)
    /// for each subject the import writes to, in the commit of its first events.
    Import {
        /// The file to read; `-` reads standard input.
        file: PathBuf,
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        keys: KeyArgs,
        /// Events per batch (one durable write each; at most half the writer's group limit,
        /// 2048, to leave room for the batch's audit entries).
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// The actor recorded on each event.
        #[arg(long, default_value = "import")]
        actor: String,
        /// One JSON object per committed batch, then a summary.
        #[arg(long)]
        json: bool,
    },
    /// Check the whole hash chain without any key. Exit 0 and the head when whole, 1 and the
    /// first bad position when not.
    Verify {
        #[command(flatten)]
        data: DataArgs,
        /// An earlier head, POSITION:HASH as printed by verify, kept outside the store: also
        /// checks that the log still contains it (catches truncation and rollback).
        #[arg(long)]
        anchor: Option<Anchor>,
        /// Also check the indexes readers rely on against the log (the stream, subject and
        /// audit indexes; keyless): a store that lost or cut one otherwise verifies as whole
        /// while showing subjects with fewer events. Reads the log twice.
        #[arg(long)]
        deep: bool,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Replay the log, decrypting where the key exists. With --subject, print that subject's
    /// events and its views as they stand (or stood, with --until); with --rebuild, rebuild
    /// every view from the log (over the stored documents); otherwise walk everything and print
    /// a summary.
    Replay {
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        keys: KeyArgs,
        /// One subject's events and views (its id), instead of the whole log.
        #[arg(long)]
        subject: Option<Uuid>,
        /// With --subject: stop at this log position, or at this time (YYYY-MM-DD for midnight
        /// UTC at its start, or YYYY-MM-DDTHH:MM:SSZ): what the ledger held about the subject then.
        #[arg(long, requires = "subject", value_parser = parse_until)]
        until: Option<Until>,
        /// Rebuild every view from the log (progress on a terminal).
        #[arg(long, conflicts_with = "subject")]
        rebuild: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the audit trail, newest first: who did what to whose data, and when. Needs no
    /// key. `--json` prints one JSON object per line.
    Audit {
        #[command(flatten)]
        data: DataArgs,
        /// Entries about this subject (its id): who read or changed its data.
        #[arg(long)]
        subject: Option<Uuid>,
        /// The username of the caller.
        #[arg(long)]
        actor: Option<String>,
        /// login, login_failed, append, read, lookup, view, export, erase, restrict,
        /// unrestrict, user_created, user_disabled, keys_rotated, backup, denied...
        #[arg(long)]
        action: Option<crate::audit::Action>,
        /// Entries at or after this time (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ, UTC).
        #[arg(long, value_parser = parse_time)]
        since: Option<u64>,
        /// Entries before this time.
        #[arg(long, value_parser = parse_time)]
        until: Option<u64>,
        /// Most entries to print.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per entry and line, instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run the HTTP API (HTTPS by default). On a data directory with no users, creates `admin`
    /// with the password in PDLEDGER_ADMIN_PASSWORD, or a random one printed once.
    Serve {
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        keys: KeyArgs,
        /// Address to listen on.
        #[arg(long, env = "PDLEDGER_LISTEN", default_value = "127.0.0.1:8443")]
        listen: std::net::SocketAddr,
        /// PEM certificate chain (with --tls-key); without both, a self-signed certificate is
        /// created in the data directory.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key for --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Serve plain HTTP (behind a TLS-terminating proxy, or for tests). Loopback only.
        #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
        plain_http: bool,
        /// Continuous backup: every acknowledged record is copied here shortly after it is
        /// durable, with the wrapped-key table after every change (no master key, no clear
        /// personal data). Can be a mounted remote disk; resumes after a crash or a full disk.
        #[arg(long, env = "PDLEDGER_BACKUP_DIR")]
        backup_dir: Option<PathBuf>,
        /// How often the continuous backup copies what became durable (the most it lags).
        #[arg(long, default_value_t = 200)]
        backup_interval_ms: u64,
        #[command(flatten)]
        limits: ServeLimits,
    },
    /// The register extract of one subject (GDPR Art. 15/20): every event, the current views,
    /// categories, purposes, retention, recipients and the access history. It holds personal
    /// data in clear: `-o` writes it owner-only (0600).
    Export {
        /// The subject's id.
        subject: Uuid,
        /// json (machine-readable, schemas/export/extract.v1.json), html (a page a person can
        /// read), or import (JSON Lines that `pdledger import` takes into another ledger).
        #[arg(long, default_value = "json", value_parser = ["json", "html", "import"])]
        format: String,
        /// Write here instead of standard output.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// Crypto-shred one subject: the erasure event, its keys, view documents and index
    /// entries deleted, then a key rotation that makes every older copy of its keys useless.
    /// Prints the receipt. A second erase prints the same receipt.
    Erase {
        /// The subject's id.
        subject: Uuid,
        /// Why (kept in clear in the log: a reason code or short text, no personal data).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        keys: KeyArgs,
        /// The actor recorded on the erasure.
        #[arg(long, default_value = "cli")]
        actor: String,
    },
    /// A one-off backup into DEST (a new or empty directory, or an earlier backup of this
    /// ledger to bring up to date). Works on a stopped data directory and, through its control
    /// socket, while `serve` runs on it. No key needed; the result holds no master key.
    Backup {
        /// The backup directory: new, empty, or an earlier backup of this ledger.
        dest: PathBuf,
        #[command(flatten)]
        data: DataArgs,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a data directory from a backup: verified first, views rebuilt, every erasure
    /// found in the newer sources given with --erasures-from re-applied, the newest key table
    /// the keyring opens used. Refuses a non-empty directory without --force; leaves nothing
    /// half-written.
    Restore {
        /// The backup directory to restore from.
        src: PathBuf,
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        keys: KeyArgs,
        /// A newer data directory (not in use) or backup of the same ledger: its erasures are
        /// re-applied and its key table may be the one used. Repeatable.
        #[arg(long = "erasures-from")]
        erasures_from: Vec<PathBuf>,
        /// Replace a non-empty data directory.
        #[arg(long)]
        force: bool,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Retention: shred the categories whose retention ended, or report inactive subjects.
    Retention {
        #[command(subcommand)]
        command: RetentionCommand,
    },
    /// Master-key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage users offline (the server must not be running on the data directory).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Write a synthetic register (JSON Lines, the sample's event types) for load tests and
    /// benchmarks. Deterministic for a given seed.
    #[command(hide = true)]
    Generate {
        /// How many events to write.
        #[arg(long, default_value_t = 10_000)]
        events: u64,
        /// Over how many subjects (people and companies).
        #[arg(long, default_value_t = 1_000)]
        subjects: u64,
        /// The seed: the same seed writes the same register.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(Subcommand, Debug)]
enum RetentionCommand {
    /// Shred every retained category whose time is up (what `serve` does every hour), then
    /// rotate the master key. Idempotent: safe from cron.
    Run {
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        keys: KeyArgs,
        /// Act as if it were this time (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ): for drills and tests.
        #[arg(long, value_parser = parse_time)]
        now: Option<u64>,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Subjects with no activity for longer than their categories' `inactive_after`.
    Report {
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        keys: KeyArgs,
        /// Judge inactivity as of this time (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ) instead of now.
        #[arg(long, value_parser = parse_time)]
        now: Option<u64>,
        /// Erase them, by the same rules as an erasure request (retained categories are held).
        #[arg(long)]
        erase: bool,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// A new master-key generation: every subject key re-wrapped, the blind index recomputed,
    /// the old generation destroyed. Back up the keyring afterwards.
    Rotate {
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        keys: KeyArgs,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Add a user. The password comes from PDLEDGER_PASSWORD, or the first line of standard input.
    Add {
        /// The username (what they log in with).
        name: String,
        /// What the user may do: admin, staff, dpo, auditor or service (the README says which
        /// role may call what).
        #[arg(long)]
        role: crate::auth::Role,
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        keys: KeyArgs,
    },
}

/// Limits of `pdledger serve`, each with its default.
#[derive(Args, Debug, Clone)]
pub struct ServeLimits {
    /// Largest request body.
    #[arg(long, default_value_t = 1 << 20)]
    body_bytes_max: usize,
    /// Most events in one append request.
    #[arg(long, default_value_t = 1000)]
    events_per_request_max: usize,
    /// Largest event (its data, serialized).
    #[arg(long, default_value_t = 64 * 1024)]
    event_bytes_max: usize,
    /// Largest page of events or audit entries.
    #[arg(long, default_value_t = 1000)]
    page_max: usize,
    /// Requests handled at once; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 512)]
    concurrency_max: usize,
    /// Time limit of one request, in seconds.
    #[arg(long, default_value_t = 30)]
    request_secs: u64,
    /// Longest long-poll `wait` on /v1/events, in seconds.
    #[arg(long, default_value_t = 30)]
    wait_secs_max: u64,
    /// Appends waiting for the writer before new ones are answered 503.
    #[arg(long, default_value_t = 4096)]
    queue_depth: usize,
    /// Failed logins per account name before it is locked out.
    #[arg(long, default_value_t = 5)]
    login_failures_max: u32,
    /// Failed logins per client address before it is locked out.
    #[arg(long, default_value_t = 20)]
    login_failures_per_address_max: u32,
    /// How long a lockout lasts, in seconds.
    #[arg(long, default_value_t = 300)]
    lockout_secs: u64,
    /// Password hashes (Argon2id, 19 MiB of memory each) computed at once; further logins
    /// wait their turn. Default: the number of cores.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    password_hashes_max: Option<u32>,
    /// How long a session token lives, in seconds.
    #[arg(long, default_value_t = 8 * 3600)]
    session_secs: u64,
    /// Milliseconds between an erasure and the key rotation that completes it; erasures in
    /// the meantime share that rotation.
    #[arg(long, default_value_t = 2000)]
    rotate_delay_ms: u64,
    /// Seconds between retention runs (shredding retained categories whose time is up).
    #[arg(long, default_value_t = 3600)]
    retention_check_secs: u64,
    /// MiB kept free on the data directory's disk: below it, appends are answered 507 while
    /// reads, logins and erasures go on (their audit entries use the reserve down to a
    /// quarter of it); appends resume by themselves once space is freed.
    #[arg(long, env = "PDLEDGER_MIN_FREE_MB", default_value_t = 64)]
    min_free_mb: u64,
}

pub enum Outcome {
    Passed,
    Failed,
}

/// Where `replay --until` stops.
#[derive(Clone, Copy, Debug)]
pub enum Until {
    Position(u64),
    Time(u64),
}

fn parse_until(s: &str) -> Result<Until, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map(Until::Position).map_err(|e| e.to_string());
    }
    parse_time(s).map(Until::Time)
}

fn parse_time(s: &str) -> Result<u64, String> {
    crate::time::parse_timestamp(s).ok_or_else(|| "expected YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC)".to_owned())
}

fn open(data: &DataArgs, keys: &KeyArgs, holder: &str) -> anyhow::Result<Ledger> {
    open_with(data, keys, holder, Limits::default())
}

/// sled's page cache, from `PDLEDGER_CACHE_MB`, else `default_mb`.
fn cache_bytes(default_mb: u64) -> anyhow::Result<u64> {
    match std::env::var("PDLEDGER_CACHE_MB") {
        Ok(v) => Ok(v.parse::<u64>().context("PDLEDGER_CACHE_MB must be a number of MiB")?.clamp(4, 1 << 20) << 20),
        Err(_) => Ok(default_mb << 20),
    }
}

/// Import streams writes and rereads little: a small page cache keeps a million-event import
/// under 300 MB resident (measured in docs/BENCHMARKS.md).
const IMPORT_CACHE_MB: u64 = 16;

fn open_with(data: &DataArgs, keys: &KeyArgs, holder: &str, limits: Limits) -> anyhow::Result<Ledger> {
    Ok(Ledger::open(options(data, keys, holder, limits)?)?)
}

/// How a command opens the ledger: schemas and view definitions from the flags (or the
/// compiled-in ones), the page cache from the environment.
pub fn options(data: &DataArgs, keys: &KeyArgs, holder: &str, mut limits: Limits) -> anyhow::Result<OpenOptions> {
    limits.cache_bytes = cache_bytes(limits.cache_bytes >> 20)?;
    let schemas = match &keys.schemas {
        Some(dir) => Schemas::load_dir(dir)?,
        None => Schemas::builtin(),
    };
    let projections = match &keys.projections {
        Some(dir) => Projections::load_dir(dir, &schemas)?,
        None => Projections::builtin(&schemas)?,
    };
    let mut opts = OpenOptions::new(data.data.clone(), Keyring::from_env_or_dir(&keys.keyring), holder);
    opts.schemas = Arc::new(schemas);
    opts.projections = Arc::new(projections);
    opts.limits = limits;
    Ok(opts)
}

/// `pdledger backup` while `serve` holds the data directory: asks the server, through its
/// control socket, to write the backup.
fn backup_through_server(data: &std::path::Path, dest: &std::path::Path) -> anyhow::Result<crate::backup::Manifest> {
    use std::io::{BufRead as _, Write as _};
    let socket = data.join(crate::serve::CONTROL_SOCKET);
    let dest = std::path::absolute(dest)?;
    let mut s = std::os::unix::net::UnixStream::connect(&socket).with_context(|| {
        format!("the data directory is in use, and its server's control socket {} does not answer", socket.display())
    })?;
    writeln!(s, "{}", serde_json::json!({"command": "backup", "dest": dest}))?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line).context("the server's answer")?;
    if v["ok"] != true {
        bail!("the server could not write the backup: {}", v["error"].as_str().unwrap_or("unknown error"));
    }
    Ok(serde_json::from_value(v["manifest"].clone())?)
}

/// `replay --subject`: the subject's events up to `until`, then its views built from them.
fn replay_subject(
    ledger: &Ledger,
    subject: Uuid,
    until: Option<Until>,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<Outcome> {
    // A read of the subject's data, in the trail like the server's (and durable) before any of
    // it is printed.
    let audit = |outcome: crate::audit::Outcome| -> anyhow::Result<()> {
        let entry = crate::audit::Entry::new(crate::audit::Action::Read, Some(subject), outcome);
        ledger.submit(vec![entry.into_op("cli")])?;
        Ok(())
    };
    if let Some(e) = ledger.erasure(subject)? {
        audit(crate::audit::Outcome::Failed)?;
        eprintln!(
            "subject {subject} was erased at {} (position {}): its events are crypto-shredded",
            e.erased_at, e.position
        );
        return Ok(Outcome::Failed);
    }
    let mut events = ledger.read_stream(subject, 0, usize::MAX)?;
    events.retain(|e| match until {
        Some(Until::Position(p)) => e.position <= p,
        Some(Until::Time(ms)) => crate::time::parse_timestamp(&e.recorded_at).is_some_and(|t| t <= ms),
        None => true,
    });
    if events.is_empty() {
        audit(crate::audit::Outcome::Failed)?;
        eprintln!("subject {subject} has no readable events{}", if until.is_some() { " by then" } else { "" });
        return Ok(Outcome::Failed);
    }
    audit(crate::audit::Outcome::Ok)?;
    for e in &events {
        if json {
            writeln!(out, "{}", serde_json::to_string(&serde_json::json!({"event": e}))?)?;
        } else {
            writeln!(out, "v{} @{} {} {} {}", e.version, e.position, e.occurred_at, e.event_type, e.data)?;
        }
    }
    let docs = crate::views::build(ledger.projections(), events.iter().map(crate::ledger::StoredEvent::as_event_ref));
    for (view, doc) in docs {
        let v = serde_json::json!({"view": view, "subject": subject, "version": doc.version, "position": doc.position, "data": doc.data});
        if json {
            writeln!(out, "{}", serde_json::to_string(&v)?)?;
        } else {
            writeln!(
                out,
                "\nview {view} (version {}, position {}):\n{}",
                doc.version,
                doc.position,
                serde_json::to_string_pretty(&doc.data)?
            )?;
        }
    }
    Ok(Outcome::Passed)
}

fn progress_line(enabled: bool, text: &str) {
    if enabled {
        let mut e = std::io::stderr().lock();
        let _ = write!(e, "\r\x1b[2K{text}");
        let _ = e.flush();
    }
}

pub fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let tty = std::io::stderr().is_terminal();
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Import { file, data, keys, batch, actor, json } => {
            let limits = Limits { cache_bytes: IMPORT_CACHE_MB << 20, ..Limits::default() };
            let ledger = open_with(&data, &keys, "pdledger import", limits)?;
            let input: Box<dyn BufRead + Send> = if file.as_os_str() == "-" {
                Box::new(std::io::BufReader::new(std::io::stdin()))
            } else {
                let f = std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
                Box::new(std::io::BufReader::with_capacity(1 << 16, f))
            };
            let result = crate::import::import(&ledger, input, batch, &actor, |p| {
                if json {
                    let mut o = std::io::stdout().lock();
                    let _ = writeln!(
                        o,
                        "{}",
                        serde_json::json!({"event": "batch", "lines": p.lines, "events": p.events, "last_position": p.last_position})
                    );
                    let _ = o.flush();
                } else {
                    progress_line(tty, &format!("{} events, {:.0} events/s", p.events, p.events_per_second));
                }
            });
            progress_line(tty && !json, "");
            ledger.close()?;
            match result {
                Ok(p) => {
                    if json {
                        writeln!(out, "{}", serde_json::json!({"event": "done", "ok": true, "summary": p}))?;
                    } else {
                        writeln!(
                            out,
                            "imported {} events for {} subjects in {:.2} s ({:.0} events/s); last position {}",
                            p.events, p.subjects, p.seconds, p.events_per_second, p.last_position
                        )?;
                    }
                    Ok(Outcome::Passed)
                }
                Err(f) => {
                    if json {
                        writeln!(
                            out,
                            "{}",
                            serde_json::json!({"event": "done", "ok": false, "error": f.error.to_string(), "summary": f.done})
                        )?;
                    }
                    bail!(
                        "{}\nstopped: nothing from the failing batch was appended; {} events from lines 1..={} were appended before it",
                        f.error,
                        f.done.events,
                        f.done.lines
                    )
                }
            }
        }
        Command::Backup { dest, data, json } => {
            let manifest = match Store::open(&data.data, "pdledger backup", cache_bytes(64)?) {
                Ok(store) => {
                    let head = store.head()?.map(|h| h.0).unwrap_or(0);
                    crate::backup::backup_store(&store, head, &dest)?
                }
                Err(crate::store::StoreError::Locked { .. }) => backup_through_server(&data.data, &dest)?,
                Err(e) => return Err(e.into()),
            };
            if json {
                writeln!(out, "{}", serde_json::to_string(&manifest)?)?;
            } else {
                writeln!(
                    out,
                    "backup in {}: records {}..{}, head {}:{}, key table {}\nKeep the keyring (not in the backup) safe separately; it changes at every key rotation.",
                    dest.display(),
                    manifest.first_position,
                    manifest.last_position,
                    manifest.last_position,
                    manifest.head_hash,
                    manifest.keys.as_ref().map(|k| format!("generation {} as of {}", k.generation, k.as_of_position)).unwrap_or_else(|| "none".into())
                )?;
            }
            Ok(Outcome::Passed)
        }
        Command::Restore { src, data, keys, erasures_from, force, json } => {
            let base = options(&data, &keys, "pdledger restore", Limits::default())?;
            let (schemas, projections) = (base.schemas.clone(), base.projections.clone());
            drop(base);
            let summary = crate::restore::restore(
                crate::restore::Options {
                    src,
                    data: data.data.clone(),
                    keyring: Keyring::from_env_or_dir(&keys.keyring),
                    erasures_from,
                    force,
                    open: Box::new(move |d, k| {
                        let mut o = OpenOptions::new(d, k, "pdledger restore");
                        o.schemas = schemas.clone();
                        o.projections = projections.clone();
                        o
                    }),
                },
                |step| progress_line(tty, step),
            );
            progress_line(tty, "");
            let summary = match summary {
                Ok(s) => s,
                Err(crate::restore::RestoreError::Refused(why)) => {
                    eprintln!("restore refused: {why}");
                    return Ok(Outcome::Failed);
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                writeln!(out, "{}", serde_json::to_string(&summary)?)?;
            } else {
                writeln!(
                    out,
                    "restored {} records into {} in {:.2} s ({:.0} records/s), head {}\nkey table: {} (generation {}); erasures re-applied: {}; subjects without a key: {}",
                    summary.records,
                    data.data.display(),
                    summary.seconds,
                    summary.records_per_second,
                    summary.head,
                    summary.key_table,
                    summary.key_generation,
                    summary.erasures_reapplied.len(),
                    summary.subjects_without_key
                )?;
            }
            Ok(Outcome::Passed)
        }
        Command::Verify { data, anchor, deep, json } => {
            // A backup directory is verified the same way, from its segments.
            let (mut report, what) = if crate::backup::is_backup(&data.data) {
                if deep {
                    bail!("--deep checks a data directory's indexes; a backup holds none (its log is checked in full without it)");
                }
                (crate::backup::verify(&data.data, anchor)?, "backup of ")
            } else {
                let store = Store::open(&data.data, "pdledger verify", cache_bytes(64)?)?;
                let mut r =
                    crate::verify::verify(&store, anchor, |n| progress_line(tty, &format!("verified {n} records")))?;
                if deep && r.ok {
                    crate::ledger::check_format(&store)?;
                    r.index_problem = crate::verify::verify_indexes(&store, r.head.position, |n| {
                        progress_line(tty, &format!("checked the indexes of {n} records"))
                    })?;
                    r.ok = r.index_problem.is_none();
                }
                progress_line(tty, "");
                (r, "")
            };
            if json {
                writeln!(out, "{}", serde_json::to_string(&report)?)?;
            } else if let Some(b) = report.index_problem.take() {
                writeln!(
                    out,
                    "INDEX BROKEN at position {}: {}\nthe chain itself is whole: {} records, head {}\n\
                     to rebuild the indexes: `pdledger backup DIR` copies the log, and `pdledger restore DIR --data NEW` \
                     derives every index from it",
                    b.position,
                    b.reason,
                    report.events,
                    report.anchor()
                )?;
            } else if report.ok {
                let checked = if deep { ", indexes agree" } else { "" };
                writeln!(out, "ok: {what}{} records, chain whole{checked}\nhead {}", report.events, report.anchor())?;
            } else {
                writeln!(
                    out,
                    "BROKEN at position {}: {}\n{} records whole before it",
                    report.first_bad_position.unwrap_or(0),
                    report.reason.as_deref().unwrap_or(""),
                    report.events
                )?;
            }
            Ok(if report.ok { Outcome::Passed } else { Outcome::Failed })
        }
        Command::Replay { data, keys, subject, until, rebuild, json } => {
            let mut opts = options(&data, &keys, "pdledger replay", Limits::default())?;
            let started = std::time::Instant::now();
            if rebuild {
                opts.rebuild_views = true;
                opts.progress = Some(Arc::new(move |done, all| {
                    let pct = if all == 0 { 100.0 } else { done as f64 * 100.0 / all as f64 };
                    progress_line(
                        tty,
                        &format!("rebuilding views: {pct:.0}% (reading the log, then building documents)"),
                    );
                }));
            }
            let ledger = Ledger::open(opts)?;
            progress_line(tty, "");
            let outcome = match subject {
                Some(s) => replay_subject(&ledger, s, until, json, &mut out)?,
                None if rebuild => {
                    let secs = started.elapsed().as_secs_f64();
                    let records = ledger.durable();
                    let summary = serde_json::json!({
                        "rebuilt": true, "records": records, "seconds": secs,
                        "records_per_second": records as f64 / secs.max(1e-9),
                    });
                    if json {
                        writeln!(out, "{summary}")?;
                    } else {
                        writeln!(out, "rebuilt the views from {records} records in {secs:.2} s")?;
                    }
                    Outcome::Passed
                }
                None => {
                    let (mut records, mut events, mut shredded, mut notes) = (0u64, 0u64, 0u64, 0u64);
                    let mut subjects = std::collections::HashSet::new();
                    for entry in ledger.log(1) {
                        let entry = entry?;
                        records += 1;
                        match entry.payload {
                            Payload::Event { .. } => {
                                events += 1;
                                subjects.insert(entry.header.subject);
                            }
                            Payload::Shredded => shredded += 1,
                            Payload::Ledger(_) => notes += 1,
                        }
                        if records.is_multiple_of(65_536) {
                            progress_line(tty, &format!("replayed {records} records"));
                        }
                    }
                    progress_line(tty, "");
                    let secs = started.elapsed().as_secs_f64();
                    let summary = serde_json::json!({
                        "records": records, "events": events, "shredded": shredded, "ledger_events": notes,
                        "subjects": subjects.len(), "seconds": secs, "records_per_second": records as f64 / secs.max(1e-9),
                    });
                    if json {
                        writeln!(out, "{summary}")?;
                    } else {
                        writeln!(
                            out,
                            "replayed {records} records in {secs:.2} s: {events} events of {} subjects decrypted, {shredded} shredded, {notes} ledger events",
                            subjects.len()
                        )?;
                    }
                    Outcome::Passed
                }
            };
            ledger.close()?;
            Ok(outcome)
        }
        Command::Export { subject, format, output, data, keys } => {
            let ledger = open(&data, &keys, "pdledger export")?;
            if let Some(e) = ledger.erasure(subject)? {
                if e.retained.iter().all(|h| h.shredded) {
                    eprintln!("subject {subject} was erased at {}: nothing is held", e.erased_at);
                    return Ok(Outcome::Failed);
                }
                eprintln!(
                    "subject {subject} was erased at {}; the extract holds what the retention rules keep",
                    e.erased_at
                );
            }
            if !ledger.subject_exists(subject)? {
                eprintln!("no subject {subject}");
                return Ok(Outcome::Failed);
            }
            let x = crate::export::extract_with_rules(&ledger, &keys.rules()?, subject, crate::time::now_ms())?;
            let text = match format.as_str() {
                "html" => crate::export::to_html(&x, ledger.schemas()),
                "import" => crate::export::events_for_import(&x).map(|v| v.to_string() + "\n").collect(),
                _ => serde_json::to_string_pretty(&x)? + "\n",
            };
            let entry =
                crate::audit::Entry::new(crate::audit::Action::Export, Some(subject), crate::audit::Outcome::Ok);
            ledger.submit(vec![entry.into_op("cli")])?;
            match output {
                Some(path) => {
                    use std::os::unix::fs::OpenOptionsExt;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&path)
                        .with_context(|| format!("creating {} (it must not exist)", path.display()))?;
                    f.write_all(text.as_bytes())?;
                    f.sync_all()?;
                    eprintln!("wrote {} ({} events); it holds personal data in clear", path.display(), x.events.len());
                }
                None => out.write_all(text.as_bytes())?,
            }
            ledger.close()?;
            Ok(Outcome::Passed)
        }
        Command::Erase { subject, reason, data, keys, actor } => {
            let reason = reason.trim().to_owned();
            if reason.is_empty() || reason.chars().count() > 200 || reason.chars().any(char::is_control) {
                bail!("--reason must be 1..=200 characters without control characters (it is kept in clear: no personal data)");
            }
            let rules = keys.rules()?;
            let ledger = open(&data, &keys, "pdledger erase")?;
            if ledger.erasure(subject)?.is_none() {
                let retain = crate::retention::plan(&ledger, &rules, subject, crate::time::now_ms())?;
                let entry =
                    crate::audit::Entry::new(crate::audit::Action::Erase, Some(subject), crate::audit::Outcome::Ok);
                match ledger.submit(vec![
                    crate::writer::Op::Erase { subject, reason, actor: actor.clone(), retain },
                    entry.into_op(&actor),
                ]) {
                    Ok(_) => {}
                    Err(crate::writer::WriteError::Rejected(crate::writer::Rejected::UnknownSubject(_))) => {
                        eprintln!("no subject {subject}");
                        return Ok(Outcome::Failed);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let mut e = ledger.erasure(subject)?.context("the erasure is not in the log after its commit")?;
            if !e.complete {
                let r = ledger.rotate()?;
                let entry =
                    crate::audit::Entry::new(crate::audit::Action::KeysRotated, None, crate::audit::Outcome::Ok);
                ledger.submit(vec![entry.into_op(&actor)])?;
                eprintln!(
                    "rotated the master key to generation {} ({} keys re-wrapped); back up the keyring now",
                    r.to, r.keys
                );
                e = ledger.erasure(subject)?.context("the erasure is not in the log")?;
            }
            writeln!(out, "{}", serde_json::to_string_pretty(&e)?)?;
            ledger.close()?;
            Ok(Outcome::Passed)
        }
        Command::Retention { command: RetentionCommand::Run { data, keys, now, json } } => {
            let rules = keys.rules()?;
            let ledger = open(&data, &keys, "pdledger retention run")?;
            let now = now.unwrap_or_else(crate::time::now_ms);
            let done = crate::retention::run(&ledger, &rules, now, "retention").map_err(anyhow::Error::msg)?;
            if !done.is_empty() {
                ledger.rotate()?;
            }
            for d in &done {
                if json {
                    writeln!(out, "{}", serde_json::to_string(d)?)?;
                } else {
                    writeln!(
                        out,
                        "shredded {} of {} (held until {}; {})",
                        d.category, d.subject, d.held_until, d.legal_reference
                    )?;
                }
            }
            if !json {
                writeln!(out, "{} categories shredded as of {}", done.len(), crate::time::rfc3339(now))?;
            }
            ledger.close()?;
            Ok(Outcome::Passed)
        }
        Command::Retention { command: RetentionCommand::Report { data, keys, now, erase, json } } => {
            let rules = keys.rules()?;
            let ledger = open(&data, &keys, "pdledger retention report")?;
            let now = now.unwrap_or_else(crate::time::now_ms);
            let inactive = crate::retention::report(&ledger, &rules, now)?;
            for i in &inactive {
                if erase {
                    let entry = crate::audit::Entry::new(
                        crate::audit::Action::Erase,
                        Some(i.subject),
                        crate::audit::Outcome::Ok,
                    );
                    crate::retention::erase(
                        &ledger,
                        &rules,
                        i.subject,
                        "retention: inactive",
                        "retention",
                        now,
                        vec![entry.into_op("retention")],
                    )??;
                }
                if json {
                    writeln!(
                        out,
                        "{}",
                        serde_json::to_string(
                            &serde_json::json!({"subject": i.subject, "last_activity": i.last_activity, "erased": erase})
                        )?
                    )?;
                } else {
                    writeln!(
                        out,
                        "{}  last activity {}{}",
                        i.subject,
                        i.last_activity,
                        if erase { "  erased" } else { "" }
                    )?;
                }
            }
            if erase && !inactive.is_empty() {
                ledger.rotate()?;
            }
            if !json {
                writeln!(out, "{} inactive subjects as of {}", inactive.len(), crate::time::rfc3339(now))?;
            }
            ledger.close()?;
            Ok(Outcome::Passed)
        }
        Command::Keys { command: KeysCommand::Rotate { data, keys, json } } => {
            let ledger = open(&data, &keys, "pdledger keys rotate")?;
            let r = ledger.rotate()?;
            let entry = crate::audit::Entry::new(crate::audit::Action::KeysRotated, None, crate::audit::Outcome::Ok);
            ledger.submit(vec![entry.into_op("cli")])?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&r)?)?;
            } else {
                writeln!(
                    out,
                    "rotated generation {} -> {}: {} keys re-wrapped, {} index entries recomputed in {:.3} s\ngeneration {} is destroyed; back up the keyring ({}) now",
                    r.from, r.to, r.keys, r.index_entries, r.seconds, r.from, keys.keyring.display()
                )?;
            }
            ledger.close()?;
            Ok(Outcome::Passed)
        }
        Command::Audit { data, subject, actor, action, since, until, limit, json } => {
            let store = Store::open(&data.data, "pdledger audit", cache_bytes(64)?)?;
            crate::ledger::check_format(&store)?;
            let head = store.head()?.map(|h| h.0).unwrap_or(0);
            let filter = crate::audit::Filter { subject, actor, action, since_ms: since, until_ms: until };
            let mut before = u64::MAX;
            let mut printed = 0;
            if !json {
                writeln!(
                    out,
                    "{:>9}  {:<20}  {:<16}  {:<13}  {:<36}  {:<7}  ROUTE/TARGET",
                    "POSITION", "AT", "ACTOR", "ACTION", "SUBJECT", "OUTCOME"
                )?;
            }
            while printed < limit {
                let page = crate::audit::query(&store, head, &filter, before, limit - printed, 100_000)?;
                for line in &page.entries {
                    if json {
                        writeln!(out, "{}", serde_json::to_string(line)?)?;
                    } else {
                        let e = &line.entry;
                        let actor = if line.actor.is_empty() { "-" } else { line.actor.as_str() };
                        let subject = e.subject.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
                        let extra = e.route.as_deref().or(e.target.as_deref()).unwrap_or("");
                        writeln!(
                            out,
                            "{:>9}  {:<20}  {:<16}  {:<13}  {:<36}  {:<7}  {extra}",
                            line.position,
                            line.at,
                            actor,
                            e.action.name(),
                            subject,
                            serde_json::to_value(e.outcome)?.as_str().unwrap_or("")
                        )?;
                    }
                }
                printed += page.entries.len();
                match page.next_cursor {
                    Some(c) => before = c,
                    None => break,
                }
            }
            if !json {
                writeln!(out, "{printed} entries")?;
            }
            Ok(Outcome::Passed)
        }
        Command::Serve {
            data,
            keys,
            listen,
            tls_cert,
            tls_key,
            plain_http,
            backup_dir,
            backup_interval_ms,
            limits: l,
        } => {
            // Every configuration file is checked before anything is opened.
            let rules = keys.rules()?;
            let limits = Limits {
                event_bytes_max: l.event_bytes_max,
                events_per_append_max: l.events_per_request_max,
                queue_depth: l.queue_depth,
                min_free_bytes: l.min_free_mb << 20,
                ..Limits::default()
            };
            let ledger = open_with(&data, &keys, &format!("pdledger serve on {listen}"), limits)?;
            let tls = match (tls_cert, tls_key, plain_http) {
                (_, _, true) => crate::serve::Tls::Plain,
                (Some(cert), Some(key), _) => crate::serve::Tls::Files { cert, key },
                _ => crate::serve::Tls::SelfSigned,
            };
            let opts = crate::serve::ServeOptions {
                listen,
                tls,
                backup_dir,
                backup_interval: std::time::Duration::from_millis(backup_interval_ms.max(10)),
                api: crate::api::ApiConfig {
                    body_bytes_max: l.body_bytes_max,
                    page_max: l.page_max,
                    concurrency_max: l.concurrency_max,
                    request_secs: l.request_secs,
                    wait_secs_max: l.wait_secs_max,
                    rotate_delay_ms: l.rotate_delay_ms,
                    ..Default::default()
                },
                retention: rules,
                retention_check: std::time::Duration::from_secs(l.retention_check_secs.max(1)),
                auth: crate::auth::AuthConfig {
                    session_secs: l.session_secs,
                    failures_per_account: l.login_failures_max,
                    failures_per_address: l.login_failures_per_address_max,
                    lockout_secs: l.lockout_secs,
                    hashes_at_once: l.password_hashes_max.map_or_else(crate::auth::cores, |n| n as usize),
                    ..Default::default()
                },
            };
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(crate::serve::serve(ledger, opts, &data.data))?;
            Ok(Outcome::Passed)
        }
        Command::User { command: UserCommand::Add { name, role, data, keys } } => {
            let password = match std::env::var("PDLEDGER_PASSWORD") {
                Ok(p) if !p.is_empty() => p,
                _ => {
                    let terminal = std::io::stdin().is_terminal();
                    let mut line = String::new();
                    {
                        // Echo off before the prompt, so that nothing typed early is shown.
                        let _quiet = terminal.then(NoEcho::new).flatten();
                        if terminal {
                            eprint!("password for {name} (15 to 1024 characters; not shown): ");
                        }
                        std::io::stdin().read_line(&mut line)?;
                    }
                    if terminal {
                        eprintln!();
                    }
                    line.trim_end_matches(['\r', '\n']).to_owned()
                }
            };
            let ledger = open(&data, &keys, "pdledger user add")?;
            let auth =
                crate::auth::Auth::new(ledger.store().kv("auth")?, Default::default(), crate::auth::system_clock())?;
            auth.create_user(&name, &password, role)?;
            let mut e = crate::audit::Entry::new(crate::audit::Action::UserCreated, None, crate::audit::Outcome::Ok);
            e.target = Some(name.clone());
            ledger.submit(vec![e.into_op("cli")])?;
            ledger.close()?;
            writeln!(out, "created user {name} with role {}", role.name())?;
            Ok(Outcome::Passed)
        }
        Command::Generate { events, subjects, seed } => {
            crate::generate::write(&mut out, events, subjects, seed)?;
            Ok(Outcome::Passed)
        }
    }
}

/// No core dumps, ever: a dump of this process would put on disk what it holds in memory, the
/// master key, subjects' keys and decrypted personal data. The core size limit goes to zero
/// (soft and hard, so nothing below can raise it) and the process is marked not dumpable,
/// which also covers a core pattern piping to a collector and keeps other processes of the
/// same user from attaching to it. Failing to do either is reported, not fatal.
pub fn forbid_core_dumps() {
    let zero = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain system calls on this process, with a valid pointer to a local.
    let limited = unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } == 0;
    let undumpable = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } == 0;
    if !(limited && undumpable) {
        eprintln!("warning: could not turn core dumps off: {}", std::io::Error::last_os_error());
    }
}

/// The binary's whole body: parse, run, map to an exit code in one place.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(cli) {
        Ok(Outcome::Passed) => std::process::ExitCode::SUCCESS,
        Ok(Outcome::Failed) => std::process::ExitCode::from(1),
        // A closed pipe (`pdledger replay | head`) is the reader's choice, not our failure.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// The terminal on standard input with its echo off, until dropped (a typed password is not
/// shown). `None` when standard input is not a terminal or its settings cannot be read.
///
/// Ctrl-C or a `kill` while the echo is off would end the process before `drop` and leave the
/// user's terminal silent: while the guard lives, SIGINT, SIGQUIT, SIGTERM and SIGHUP (those
/// not ignored) first put the saved settings back, then end the process as the signal would.
struct NoEcho {
    saved: Box<libc::termios>,
    /// The handlers replaced, to put back.
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

/// The settings to put back if a signal comes while a `NoEcho` lives (null otherwise).
static SAVED_TERMIOS: std::sync::atomic::AtomicPtr<libc::termios> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

extern "C" fn restore_terminal_and_die(sig: libc::c_int) {
    let saved = SAVED_TERMIOS.load(std::sync::atomic::Ordering::Acquire);
    // SAFETY: only async-signal-safe calls (tcsetattr, signal, raise); `saved` points into the
    // live guard's box, which clears the pointer before it is freed.
    unsafe {
        if !saved.is_null() {
            libc::tcsetattr(0, libc::TCSANOW, saved);
        }
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

impl NoEcho {
    fn new() -> Option<NoEcho> {
        // SAFETY: tcgetattr and tcsetattr read and write a termios the caller owns; fd 0 is
        // standard input, checked to be a terminal by the caller (they fail harmlessly if not).
        // sigaction installs a handler that only makes async-signal-safe calls.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = Box::new(t);
            SAVED_TERMIOS
                .store(&*saved as *const libc::termios as *mut libc::termios, std::sync::atomic::Ordering::Release);
            let mut previous = Vec::with_capacity(4);
            for sig in [libc::SIGINT, libc::SIGQUIT, libc::SIGTERM, libc::SIGHUP] {
                let mut old: libc::sigaction = std::mem::zeroed();
                // A signal the caller ignores (a background job's SIGINT) stays ignored.
                if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 || old.sa_sigaction == libc::SIG_IGN {
                    continue;
                }
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = restore_terminal_and_die as *const () as usize;
                libc::sigemptyset(&mut action.sa_mask);
                if libc::sigaction(sig, &action, std::ptr::null_mut()) == 0 {
                    previous.push((sig, old));
                }
            }
            let guard = NoEcho { saved, previous };
            t.c_lflag &= !libc::ECHO;
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return None; // the guard's drop puts the handlers back
            }
            Some(guard)
        }
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `new` on the same descriptor, then the signal
        // handlers that were there before; the pointer is cleared before the box is freed.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &*self.saved);
            for (sig, old) in &self.previous {
                libc::sigaction(*sig, old, std::ptr::null_mut());
            }
        }
        SAVED_TERMIOS.store(std::ptr::null_mut(), std::sync::atomic::Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every command and every argument says what it is for in `--help`.
    #[test]
    fn every_command_and_argument_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path}: {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() != "help" && sub.get_about().is_none() {
                    missing.push(format!("{path} {}: no description", sub.get_name()));
                }
                walk(sub, &path, missing);
            }
        }
        let mut missing = vec![];
        walk(&super::Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:#?}");
    }
}
