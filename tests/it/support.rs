//! Shared test helpers: scratch directories, the CLI, the sample register, the plaintext scan.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pdledger::keyring::Keyring;
use pdledger::ledger::{Ledger, Limits, OpenOptions};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_pdledger");

pub fn sample_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sample-register.jsonl")
}

pub fn sample() -> Vec<Value> {
    std::fs::read_to_string(sample_path()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A data directory and a keyring directory beside it, removed on drop.
pub struct Scratch {
    pub root: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch { root: tempfile::tempdir().unwrap() }
    }
    pub fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }
    pub fn keyring(&self) -> PathBuf {
        self.root.path().join("keyring")
    }
    pub fn open(&self) -> Ledger {
        self.open_with(Limits::default())
    }
    pub fn open_with(&self, limits: Limits) -> Ledger {
        let mut o = OpenOptions::new(self.data(), Keyring::Dir(self.keyring()), "test");
        o.limits = limits;
        Ledger::open(o).unwrap()
    }
    /// Runs the CLI with this scratch's data and keyring.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_cmd(args).output().unwrap()
    }
    pub fn cli_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("PDLEDGER_DATA", self.data())
            .env("PDLEDGER_KEYRING", self.keyring())
            .env_remove("PDLEDGER_MASTER_KEY")
            .env_remove("RUST_LOG");
        c
    }
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.root.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file under `dir`, recursively, as bytes.
pub fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(bytes: &[u8]) -> String {
    let mut s = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..=chunk.len() {
            s.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    s
}

/// The forms a value could take in a file: raw UTF-8, hex (both cases), JSON-escaped with
/// `\u` escapes, and base64 at each of the three alignments (only the characters that do not
/// depend on the neighbouring bytes).
pub fn encodings(value: &str) -> Vec<Vec<u8>> {
    let raw = value.as_bytes();
    let mut forms = vec![raw.to_vec()];
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    forms.push(hex.clone().into_bytes());
    forms.push(hex.to_uppercase().into_bytes());
    let escaped: String = value
        .chars()
        .map(|c| if c.is_ascii() && c != '"' && c != '\\' { c.to_string() } else { format!("\\u{:04x}", c as u32) })
        .collect();
    forms.push(escaped.into_bytes());
    forms.push(serde_json::to_string(value).unwrap().trim_matches('"').as_bytes().to_vec());
    for pad in 0..3 {
        let mut padded = vec![0u8; pad];
        padded.extend_from_slice(raw);
        let enc = base64(&padded);
        // Characters fully determined by the value's bytes: skip the ones mixing in padding.
        let skip = if pad == 0 { 0 } else { pad * 4 / 3 + 1 };
        let full = (pad + raw.len()) / 3 * 4;
        if full > skip + 4 {
            forms.push(enc.as_bytes()[skip..full].to_vec());
        }
    }
    forms
}

/// (value, form, file) for every form of every value found under the directories. One pass
/// over each file finds every form (they are indexed by their first two bytes), so hundreds
/// of values over a large data directory take seconds, not minutes.
pub fn scan(dirs: &[&Path], values: &[String]) -> Vec<(String, String, PathBuf)> {
    let files: Vec<_> = dirs.iter().flat_map(|d| files_under(d)).collect();
    let forms: Vec<(usize, Vec<u8>)> =
        values.iter().enumerate().flat_map(|(i, v)| encodings(v).into_iter().map(move |f| (i, f))).collect();
    let mut by_prefix: Vec<Vec<usize>> = vec![vec![]; 1 << 16];
    let mut short = vec![];
    for (k, (_, f)) in forms.iter().enumerate() {
        match f.as_slice() {
            [a, b, ..] => by_prefix[(*a as usize) << 8 | *b as usize].push(k),
            _ => short.push(k),
        }
    }
    let mut hits = vec![];
    for (path, bytes) in &files {
        let mut seen = vec![false; forms.len()];
        for i in 0..bytes.len().saturating_sub(1) {
            for &k in &by_prefix[(bytes[i] as usize) << 8 | bytes[i + 1] as usize] {
                seen[k] = seen[k] || bytes[i..].starts_with(&forms[k].1);
            }
        }
        for &k in &short {
            let f = &forms[k].1;
            seen[k] = f.is_empty() || bytes.contains(&f[0]);
        }
        for (_, (v, f)) in forms.iter().enumerate().filter(|(k, _)| seen[*k]) {
            hits.push((values[*v].clone(), String::from_utf8_lossy(f).into_owned(), path.clone()));
        }
    }
    hits
}

/// At least `n` distinctive personal values from the sample: names, emails, personal and
/// organisation numbers, streets.
pub fn known_values(events: &[Value], n: usize) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for e in events.iter().filter(|e| e["type"] == "customer.registered") {
        let d = &e["data"];
        for v in [&d["name"], &d["email"], &d["personal_number"], &d["org_number"], &d["address"]["street"]] {
            if let Some(s) = v.as_str() {
                if s.len() >= 8 && !out.iter().any(|o| o == s) {
                    out.push(s.to_owned());
                }
            }
        }
        if out.len() >= n {
            break;
        }
    }
    out
}

/// Random-enough numbers for tests without a dependency: seeded from the clock, printed so a
/// failing run can be repeated with PDLEDGER_TEST_SEED.
pub fn seed() -> u64 {
    let s = std::env::var("PDLEDGER_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("PDLEDGER_TEST_SEED={s}");
    s
}

/// Retention rules under which an erasure shreds every category at once (a controller with
/// no obligation to keep invoices): for the tests of complete crypto-shredding.
pub fn shred_all_rules(s: &Scratch) -> PathBuf {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/retention/rules.json")).unwrap();
    let text = text
        .replace("\"on_erasure\": \"retain\"", "\"on_erasure\": \"shred\"")
        .replace("\"retain_until_end_of_year_after\": 7,", "");
    s.write("shred-all.json", &text)
}

/// Copies a directory tree (modes of directories kept; the lock file left out).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::set_permissions(to, std::fs::metadata(from).unwrap().permissions()).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else if e.file_name() != "pdledger.lock" {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Copies one scratch's data and keyring into another (a template for repeated fault runs).
pub fn copy_scratch(from: &Scratch, to: &Scratch) {
    copy_dir(&from.data(), &to.data());
    copy_dir(&from.keyring(), &to.keyring());
}

/// The next number of a seeded xorshift sequence (fault moments that a seed reproduces).
pub fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Starts `cmd` (output discarded) and kills it with SIGKILL at a random moment within
/// `within`: the fault under test, not synchronisation.
pub fn spawn_and_kill(mut cmd: Command, within: std::time::Duration, rng: &mut u64) {
    let mut child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    std::thread::sleep(within.mul_f64((next_random(rng) % 1000) as f64 / 1000.0));
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
}

/// A figure in kB from a process's `/proc/<pid>/status` (`VmRSS`, `VmHWM`).
pub fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}
