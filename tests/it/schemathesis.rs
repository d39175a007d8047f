//! API fuzzing with schemathesis (from PyPI) against the server's own OpenAPI document: the
//! real `pdledger serve` over plain HTTP on loopback, the sample register imported, every
//! check on (`--checks all`), a fixed seed, 100 examples per operation. Zero server errors,
//! zero answers outside the document (status, content type, headers, body schema), zero
//! schema-valid requests refused or invalid ones accepted, and zero routes that ignore
//! authentication.
//!
//! schemathesis must be installed: `.ci/run` puts the pinned version in a virtualenv and
//! names it in `PDLEDGER_SCHEMATHESIS`; otherwise that virtualenv (`~/.cache/pdledger-venv`), then
//! `schemathesis` on the PATH, is used. The test
//! fails without it, unless `PDLEDGER_SKIP_SCHEMATHESIS=1` (it then says loudly that it
//! skipped). The per-operation allowances are in `tests/schemathesis.toml`, each with its
//! reason.
//!
//! Four runs, one identity each, so that every authenticated operation is called by a role
//! that may call it (the ignored-auth check only probes an operation that answered 2xx):
//!
//! 1. a dpo: the public operations and everything a dpo may do, but logging out;
//! 2. an admin: what only an admin may do (users, key rotation, the chain), but disabling
//!    a user;
//! 3. a second admin: creating and disabling users;
//! 4. a second dpo: logging out.
//!
//! Logging out revokes the caller's token and disabling a user revokes theirs (the fuzzer
//! may draw its own name, or reach it through a link): in the first two runs either would
//! turn every later request into a 401, which passes every check while testing nothing. So
//! each of them runs alone with an identity of its own, and the test checks afterwards that
//! the first two runs' tokens still work.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

use crate::http::PASSWORD;
use crate::server::{Client, Server};
use crate::support::*;

/// The version `.ci/run` installs: another one may generate other cases from the same seed.
const VERSION: &str = "4.32.5";
const SEED: &str = "20261129";
const EXAMPLES: &str = "100";

/// The schemathesis executable, if there is one.
fn schemathesis() -> Option<PathBuf> {
    // Named, or where `.ci/run` installs it, or on the PATH.
    let venv = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/pdledger-venv/bin/schemathesis"));
    let candidates = match std::env::var_os("PDLEDGER_SCHEMATHESIS") {
        Some(named) => vec![PathBuf::from(named)],
        None => venv.into_iter().chain([PathBuf::from("schemathesis")]).collect(),
    };
    candidates.into_iter().find(|exe| Command::new(exe).arg("--version").output().is_ok_and(|out| out.status.success()))
}

/// One schemathesis run: who it runs as, which operations.
struct Run {
    name: &'static str,
    user: &'static str,
    operations: Vec<String>,
    /// Every phase but `stateful` for a lone operation without links (it has no scenario).
    phases: Option<&'static str>,
}

#[test]
fn schemathesis_finds_no_server_error_no_schema_break_and_no_ignored_auth() {
    if std::env::var("PDLEDGER_SKIP_SCHEMATHESIS").as_deref() == Ok("1") {
        // Straight to standard error, past the test harness's capture: a skip is never silent.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED schemathesis_finds_no_server_error_no_schema_break_and_no_ignored_auth: PDLEDGER_SKIP_SCHEMATHESIS=1"
        );
        return;
    }
    let exe = schemathesis().unwrap_or_else(|| {
        panic!(
            "schemathesis {VERSION} is needed (`.ci/run` installs it in a virtualenv and sets \
             PDLEDGER_SCHEMATHESIS; or `pip install schemathesis=={VERSION}`). Set \
             PDLEDGER_SKIP_SCHEMATHESIS=1 to skip this test."
        )
    });
    let version = stdout(&Command::new(&exe).arg("--version").output().unwrap());
    assert!(
        version.trim().ends_with(&format!("version {VERSION}")),
        "{exe:?} is `{}`, not {VERSION}: the seed would draw other cases",
        version.trim()
    );
    let started = Instant::now();

    let s = Scratch::new();
    let out = s.cli(&["import", sample_path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let users = [("fuzz-dpo", "dpo"), ("fuzz-admin", "admin"), ("fuzz-admin-2", "admin"), ("fuzz-leaver", "dpo")];
    for (user, role) in users {
        let out =
            s.cli_cmd(&["user", "add", user, "--role", role]).env("PDLEDGER_PASSWORD", PASSWORD).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // Long polls of the event feed wait at most a second: the fuzzer asks for them often.
    let server = Server::start(&s, &["--plain-http", "--wait-secs-max", "1"]);
    let client = Client::new(&server, &s.data());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // Every login first: the fuzzer's wrong passwords lock logins from 127.0.0.1 for a while.
    let tokens: BTreeMap<&str, String> =
        users.iter().map(|(user, _)| (*user, rt.block_on(client.login(user, PASSWORD)))).collect();
    let (status, doc) = rt.block_on(client.call("GET", "/openapi.json", None, None));
    assert_eq!(status, 200);

    // The operations of each run, from the document's own x-roles.
    let mut ops: Vec<(String, String, String, Vec<String>)> = vec![]; // (method, path, id, roles)
    for (path, methods) in doc["paths"].as_object().unwrap() {
        for (method, op) in methods.as_object().unwrap() {
            let roles = op["x-roles"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_owned()).collect();
            ops.push((method.to_uppercase(), path.clone(), op["operationId"].as_str().unwrap().to_owned(), roles));
        }
    }
    let ids = |keep: &dyn Fn(&str, &[String]) -> bool| -> Vec<String> {
        ops.iter().filter(|(_, _, id, roles)| keep(id, roles)).map(|(_, _, id, _)| id.clone()).collect()
    };
    let has = |roles: &[String], role: &str| roles.iter().any(|r| r == role);
    let runs = [
        Run {
            name: "dpo",
            user: "fuzz-dpo",
            operations: ids(&|id, roles| (roles.is_empty() || has(roles, "dpo")) && id != "post_v1_auth_logout"),
            phases: None,
        },
        Run {
            name: "admin",
            user: "fuzz-admin",
            operations: ids(&|id, roles| {
                has(roles, "admin") && !has(roles, "dpo") && id != "post_v1_users__name__disable"
            }),
            phases: None,
        },
        Run {
            name: "users",
            user: "fuzz-admin-2",
            operations: vec!["post_v1_users".into(), "post_v1_users__name__disable".into()],
            phases: None,
        },
        Run {
            name: "logout",
            user: "fuzz-leaver",
            operations: vec!["post_v1_auth_logout".into()],
            phases: Some("coverage,fuzzing"),
        },
    ];
    let covered: BTreeSet<&String> = runs.iter().flat_map(|r| &r.operations).collect();
    assert_eq!(covered.len(), ops.len(), "an operation is in no run");

    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis.toml");
    let url = format!("http://127.0.0.1:{}/openapi.json", server.port);
    let mut failures = vec![];
    let mut figures = vec![];
    for run in &runs {
        let report = s.root.path().join(format!("{}.ndjson", run.name));
        let filter = format!("^({})$", run.operations.join("|"));
        let auth = format!("Authorization: Bearer {}", tokens[run.user]);
        let mut args = vec![
            "--config-file",
            config.to_str().unwrap(),
            "run",
            &url,
            "--checks",
            "all",
            "--seed",
            SEED,
            "--max-examples",
            EXAMPLES,
            // One worker: with several, this machine's CPython 3.11.7 fails now and then in
            // hypothesis's `ast.parse` ("AST constructor recursion depth mismatch", a race
            // in CPython fixed in later releases), which would make the test flaky.
            "--workers",
            "1",
            "--generation-database",
            "none",
            "--include-operation-id-regex",
            &filter,
            "--header",
            &auth,
            "--report",
            "ndjson",
            "--report-ndjson-path",
            report.to_str().unwrap(),
            "--no-color",
        ];
        if let Some(p) = run.phases {
            args.extend(["--phases", p]);
        }
        let t = Instant::now();
        // In the scratch directory: schemathesis leaves nothing in the work tree.
        let out = Command::new(&exe).args(&args).current_dir(s.root.path()).output().unwrap();
        let text = stdout(&out);
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "---- schemathesis run `{}` as {} ({} operations, {secs:.0} s): {}\n{}{}",
            run.name,
            run.user,
            run.operations.len(),
            shown(&args),
            text,
            stderr(&out)
        );
        let cases = text.lines().find(|l| l.contains(" generated, ")).unwrap_or("no test cases").trim().to_owned();
        figures.push(format!("{}: {} operations, {cases}", run.name, run.operations.len()));
        if !out.status.success() {
            failures.push(format!("run `{}` exited {:?}", run.name, out.status.code()));
        }
        // Neither of the first two runs may have lost its identity half-way.
        if matches!(run.name, "dpo" | "admin") {
            let (status, me) = rt.block_on(client.call("GET", "/v1/auth/me", Some(&tokens[run.user]), None));
            assert_eq!(status, 200, "run `{}` lost its token: the rest of it tested nothing: {me}", run.name);
        }
        failures.extend(unauthenticated_answers(&report, &ops, &run.operations));
    }
    eprintln!(
        "schemathesis {VERSION}, seed {SEED}, {EXAMPLES} examples per operation, {} operations, {:.0} s: {}",
        ops.len(),
        started.elapsed().as_secs_f64(),
        figures.join("; ")
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let (status, _) = rt.block_on(client.call("GET", "/healthz", None, None));
    assert_eq!(status, 200);
    assert!(server.stop().success());
    assert!(s.cli(&["verify"]).status.success(), "the chain does not verify after the fuzzing");
}

/// The command line as a shell would take it, the token left out.
fn shown(args: &[&str]) -> String {
    let quote = |a: &str| {
        if a.starts_with("Authorization: ") {
            "'Authorization: Bearer …'".to_owned()
        } else if a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:,=".contains(c)) {
            a.to_owned()
        } else {
            format!("'{a}'")
        }
    };
    std::iter::once("schemathesis").chain(args.iter().copied()).map(quote).collect::<Vec<_>>().join(" ")
}

/// Proof that authentication is enforced, from the run's own record of every request: each
/// authenticated operation of the run was sent at least one request without credentials
/// (the ignored-auth check's probe after a 2xx, the coverage phase's missing header), and
/// every such request was answered 401.
fn unauthenticated_answers(
    report: &Path,
    ops: &[(String, String, String, Vec<String>)],
    run: &[String],
) -> Vec<String> {
    let text = std::fs::read_to_string(report).unwrap_or_default();
    let run_ops: Vec<_> = ops.iter().filter(|(_, _, id, roles)| run.contains(id) && !roles.is_empty()).collect();
    let mut statuses: BTreeMap<&str, Vec<u64>> = run_ops.iter().map(|(_, _, id, _)| (id.as_str(), vec![])).collect();
    for line in text.lines() {
        let event: Value = serde_json::from_str(line).unwrap();
        let Some(interactions) = event["ScenarioFinished"]["recorder"]["interactions"].as_object() else { continue };
        for i in interactions.values() {
            let request = &i["request"];
            let headers = request["headers"].as_object().unwrap();
            if headers.keys().any(|h| h.eq_ignore_ascii_case("authorization")) {
                continue;
            }
            let uri = request["uri"].as_str().unwrap();
            let path = uri.split_once("://").map_or(uri, |(_, rest)| &rest[rest.find('/').unwrap_or(rest.len())..]);
            let path = path.split('?').next().unwrap();
            let method = request["method"].as_str().unwrap();
            if let Some((_, _, id, _)) = run_ops.iter().find(|(m, p, _, _)| m == method && template_matches(p, path)) {
                statuses.get_mut(id.as_str()).unwrap().push(i["response"]["status_code"].as_u64().unwrap_or(0));
            }
        }
    }
    let mut problems = vec![];
    for (id, seen) in &statuses {
        if seen.is_empty() {
            problems.push(format!("{id}: schemathesis sent no request without credentials"));
        } else if seen.iter().any(|s| *s != 401) {
            problems.push(format!("{id}: requests without credentials were answered {seen:?}, not all 401"));
        }
    }
    eprintln!(
        "requests without credentials, per authenticated operation (all must be 401): {}",
        statuses.iter().map(|(id, s)| format!("{id} {}", s.len())).collect::<Vec<_>>().join(", ")
    );
    problems
}

/// Whether a request path fits a route template (`{x}` is one non-empty segment).
fn template_matches(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len() && t.iter().zip(&p).all(|(t, p)| (t.starts_with('{') && !p.is_empty()) || t == p)
}
