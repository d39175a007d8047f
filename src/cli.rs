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
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Append events from a JSON Lines file: {"subject","type","occurred_at"?,"data"} per line.
    ///
    /// Lines are validated against the schemas and appended in all-or-nothing batches. The
    /// import stops at the first bad line, naming it, with nothing of that line's batch appended
    /// and every earlier batch durable.
    Import {
        /// The file to read; `-` reads standard input.
        file: PathBuf,
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        keys: KeyArgs,
        /// Events per batch (one durable write each).
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
        #[arg(long)]
        json: bool,
    },
    /// Replay the log, decrypting where the key exists. With --subject, print that subject's
    /// events; without, walk everything and print a summary.
    Replay {
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        keys: KeyArgs,
        #[arg(long)]
        subject: Option<Uuid>,
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
        #[command(flatten)]
        limits: ServeLimits,
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
        #[arg(long, default_value_t = 10_000)]
        events: u64,
        #[arg(long, default_value_t = 1_000)]
        subjects: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Add a user. The password comes from PDLEDGER_PASSWORD, or the first line of standard input.
    Add {
        name: String,
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
    /// How long a session token lives, in seconds.
    #[arg(long, default_value_t = 8 * 3600)]
    session_secs: u64,
}

pub enum Outcome {
    Passed,
    Failed,
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

fn open_with(data: &DataArgs, keys: &KeyArgs, holder: &str, mut limits: Limits) -> anyhow::Result<Ledger> {
    limits.cache_bytes = cache_bytes(limits.cache_bytes >> 20)?;
    let schemas = match &keys.schemas {
        Some(dir) => Schemas::load_dir(dir)?,
        None => Schemas::builtin(),
    };
    let ledger = Ledger::open(OpenOptions {
        data: data.data.clone(),
        keyring: Keyring::from_env_or_dir(&keys.keyring),
        schemas: Arc::new(schemas),
        holder: holder.to_owned(),
        limits,
    })?;
    Ok(ledger)
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
        Command::Verify { data, anchor, json } => {
            let store = Store::open(&data.data, "pdledger verify", cache_bytes(64)?)?;
            let report =
                crate::verify::verify(&store, anchor, |n| progress_line(tty, &format!("verified {n} records")))?;
            progress_line(tty, "");
            if json {
                writeln!(out, "{}", serde_json::to_string(&report)?)?;
            } else if report.ok {
                writeln!(out, "ok: {} records, chain whole\nhead {}", report.events, report.anchor())?;
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
        Command::Replay { data, keys, subject, json } => {
            let ledger = open(&data, &keys, "pdledger replay")?;
            let outcome = match subject {
                Some(s) => {
                    let events = ledger.read_stream(s, 0, usize::MAX)?;
                    if events.is_empty() {
                        eprintln!("subject {s} has no readable events");
                        Outcome::Failed
                    } else {
                        for e in events {
                            if json {
                                writeln!(out, "{}", serde_json::to_string(&e)?)?;
                            } else {
                                writeln!(
                                    out,
                                    "v{} @{} {} {} {}",
                                    e.version, e.position, e.occurred_at, e.event_type, e.data
                                )?;
                            }
                        }
                        Outcome::Passed
                    }
                }
                None => {
                    let started = std::time::Instant::now();
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
        Command::Serve { data, keys, listen, tls_cert, tls_key, plain_http, limits: l } => {
            let limits = Limits {
                event_bytes_max: l.event_bytes_max,
                events_per_append_max: l.events_per_request_max,
                queue_depth: l.queue_depth,
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
                api: crate::api::ApiConfig {
                    body_bytes_max: l.body_bytes_max,
                    page_max: l.page_max,
                    concurrency_max: l.concurrency_max,
                    request_secs: l.request_secs,
                    wait_secs_max: l.wait_secs_max,
                    ..Default::default()
                },
                auth: crate::auth::AuthConfig {
                    session_secs: l.session_secs,
                    failures_per_account: l.login_failures_max,
                    failures_per_address: l.login_failures_per_address_max,
                    lockout_secs: l.lockout_secs,
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
                    if std::io::stdin().is_terminal() {
                        eprint!("password for {name} (15 to 1024 characters; it will echo): ");
                    }
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
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
