//! Hostile input and damage: fuzzed API bodies, damaged store and keyring files, TLS
//! versions and plain HTTP on the TLS port. (Decoders of stored and imported bytes are fuzzed
//! by unit tests beside them: `record::fuzz`, `import::fuzz`, `projection::fuzz`.)

use std::io::{Read, Write};
use std::path::Path;
use std::process::Output;

use axum::body::Body;
use axum::http::{Method, Request};
use proptest::prelude::*;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::http::App;
use crate::server::Server;
use crate::support::*;

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        prop_oneof![
            Just("note.added"),
            Just("customer.registered"),
            Just("events"),
            Just("type"),
            Just("data"),
            Just("username"),
            Just("password"),
            Just("reason"),
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("events".to_owned()),
                    Just("type".to_owned()),
                    Just("data".to_owned()),
                    Just("expected_version".to_owned()),
                    Just("occurred_at".to_owned()),
                    Just("username".to_owned()),
                    Just("password".to_owned()),
                    Just("role".to_owned()),
                    Just("reason".to_owned()),
                    Just("code".to_owned()),
                    "[a-z_]{1,12}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Request bodies: arbitrary JSON shapes and arbitrary bytes, to every route that takes a
/// body, as the role that may call it. Never a 5xx; every refusal is the one error shape.
#[test]
fn fuzzed_request_bodies_never_cause_a_server_error() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let app = App::new();
    let (staff, dpo, admin) =
        rt.block_on(async { (app.login("staff").await, app.login("dpo").await, app.login("admin").await) });
    let subject = Uuid::new_v4();
    let routes: Vec<(String, Option<String>)> = vec![
        (format!("/v1/subjects/{subject}/events"), Some(staff)),
        ("/v1/auth/login".into(), None),
        ("/v1/auth/totp".into(), None),
        ("/v1/users".into(), Some(admin)),
        (format!("/v1/subjects/{subject}/erase"), Some(dpo.clone())),
        ("/v1/auth/totp/activate".into(), Some(dpo)),
    ];
    let body =
        prop_oneof![arb_json().prop_map(|v| v.to_string().into_bytes()), prop::collection::vec(any::<u8>(), 0..300),];
    let mut runner =
        proptest::test_runner::TestRunner::new(ProptestConfig { cases: 10_000, ..ProptestConfig::default() });
    let n = std::sync::atomic::AtomicU64::new(0);
    runner
        .run(&(0..routes.len(), body), |(i, bytes)| {
            let (path, token) = &routes[i];
            let mut b =
                Request::builder().method(Method::POST).uri(path.as_str()).header("content-type", "application/json");
            if let Some(t) = token {
                b = b.header("authorization", format!("Bearer {t}"));
            }
            let r = rt.block_on(app.raw(b.body(Body::from(bytes)).unwrap()));
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            prop_assert!(r.status.as_u16() < 500, "{path}: {} {}", r.status, r.body);
            if r.status.as_u16() >= 400 {
                prop_assert!(r.body["error"].is_string() && r.body["message"].is_string(), "{path}: {}", r.body);
            }
            Ok(())
        })
        .unwrap();
    assert!(n.into_inner() >= 10_000);
}

fn exit_ok(o: &Output) -> bool {
    // 0 ok, 1 a check failed, 2 a clear refusal; never a panic (101) or a signal.
    matches!(o.status.code(), Some(0..=2)) && !stderr(o).contains("panicked")
}

/// Truncated, zeroed and bit-flipped store files, and a damaged keyring: every command either
/// refuses with a clear error or, when it runs, serves nothing but whole data; never a panic.
#[test]
fn damaged_files_are_refused_clearly_never_served_partially() {
    let template = Scratch::new();
    let lines: Vec<String> =
        std::fs::read_to_string(sample_path()).unwrap().lines().take(2000).map(str::to_owned).collect();
    let input = template.write("part.jsonl", &(lines.join("\n") + "\n"));
    assert!(template.cli(&["import", input.to_str().unwrap()]).status.success());
    let whole = stdout(&template.cli(&["replay", "--json"]));

    let db = |s: &Scratch| s.data().join("store").join("db");
    type Damage = (&'static str, fn(&mut Vec<u8>));
    let damages: Vec<Damage> = vec![
        ("truncated to half", |b| b.truncate(b.len() / 2)),
        ("truncated by 100 bytes", |b| b.truncate(b.len().saturating_sub(100))),
        ("zeroed in the middle", |b| {
            let (a, n) = (b.len() / 3, (b.len() / 10).max(1));
            b[a..a + n].fill(0)
        }),
        ("bits flipped", |b| {
            for i in (b.len() / 4..b.len()).step_by(4099) {
                b[i] ^= 0x5a;
            }
        }),
    ];
    for (what, damage) in damages {
        let s = Scratch::new();
        copy_scratch(&template, &s);
        let mut bytes = std::fs::read(db(&s)).unwrap();
        damage(&mut bytes);
        std::fs::write(db(&s), &bytes).unwrap();
        let verify = s.cli(&["verify", "--json"]);
        assert!(exit_ok(&verify), "{what}: verify: {}", stderr(&verify));
        let replay = s.cli(&["replay", "--json"]);
        assert!(exit_ok(&replay), "{what}: replay: {}", stderr(&replay));
        if verify.status.success() && replay.status.success() {
            // Whatever still opens and verifies must be the whole data, not a part of it.
            let r: Value = serde_json::from_str(stdout(&replay).lines().next().unwrap()).unwrap();
            let w: Value = serde_json::from_str(whole.lines().next().unwrap()).unwrap();
            for k in ["records", "events", "subjects"] {
                assert_eq!(r[k], w[k], "{what}: served partially");
            }
        } else {
            let said = format!("{}{}", stdout(&verify), stderr(&replay));
            assert!(
                said.contains("damaged")
                    || said.contains("BROKEN")
                    || said.contains("position")
                    || said.contains("first_bad_position"),
                "{what}: no clear error: {said}"
            );
        }
    }

    // The keyring: a truncated or altered master key is refused by name.
    for (what, edit) in [("truncated", 10usize), ("altered", 0)] {
        let s = Scratch::new();
        copy_scratch(&template, &s);
        let key = std::fs::read_dir(s.keyring()).unwrap().map(|e| e.unwrap().path()).next().unwrap();
        let mut text = std::fs::read_to_string(&key).unwrap();
        if edit > 0 {
            text.truncate(edit);
        } else {
            let flipped = if text.starts_with('0') { "1" } else { "0" };
            text.replace_range(0..1, flipped);
        }
        std::fs::write(&key, text).unwrap();
        let out = s.cli(&["replay", "--json"]);
        assert_eq!(out.status.code(), Some(2), "{what}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("keyring") || err.contains("master"), "{what}: {err}");
        assert!(!err.contains("panicked"));
    }
}

/// Only TLS 1.2 and 1.3: a client offering TLS 1.1 alone is refused by the server, and plain
/// HTTP on the TLS port gets no HTTP answer.
/// A process killed while sled wrote its snapshot (sled writes one at every open) leaves
/// `snap.<lsn>.generating`, cut short. sled 0.34 would read that one (the greatest name) and
/// refuse to open the store for good; the store removes it first, so sled reads the last
/// finished snapshot and replays its log, as after any crash. Each cut of the snapshot, and
/// a whole one never renamed: the store opens, everything is there, `verify` passes.
#[test]
fn a_snapshot_cut_short_by_a_kill_does_not_stop_the_store_opening() {
    let template = Scratch::new();
    let lines: Vec<String> =
        std::fs::read_to_string(sample_path()).unwrap().lines().take(500).map(str::to_owned).collect();
    let input = template.write("part.jsonl", &(lines.join("\n") + "\n"));
    assert!(template.cli(&["import", input.to_str().unwrap()]).status.success());
    // The chain's head (position and hash) and what replay counts, before any damage.
    let head = stdout(&template.cli(&["verify", "--json"]));
    let counts = |out: &Output| -> Vec<Value> {
        let r: Value = serde_json::from_str(stdout(out).lines().next().unwrap()).unwrap();
        ["records", "events", "subjects"].iter().map(|k| r[*k].clone()).collect()
    };
    let whole = counts(&template.cli(&["replay", "--json"]));
    let sled_dir = template.data().join("store");
    let snapshot = std::fs::read_dir(&sled_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("snap."))
        .expect("sled wrote a snapshot");
    let bytes = std::fs::read(&snapshot).unwrap();
    for keep in [0, 8, bytes.len() / 2, bytes.len() - 1, bytes.len()] {
        let s = Scratch::new();
        copy_scratch(&template, &s);
        // A newer log position than the finished snapshot's: the name sled would pick.
        let name = "snap.7FFFFFFFFFFFFFFF.generating";
        let unfinished = s.data().join("store").join(name);
        std::fs::write(&unfinished, &bytes[..keep]).unwrap();
        let out = s.cli(&["verify", "--json"]);
        assert!(out.status.success(), "{keep} bytes: {}{}", stdout(&out), stderr(&out));
        assert_eq!(stdout(&out), head, "{keep} bytes");
        assert!(!unfinished.exists(), "{keep} bytes: the unfinished snapshot was removed");
        assert_eq!(counts(&s.cli(&["replay", "--json"])), whole, "{keep} bytes");
    }
}

#[test]
fn tls_1_1_and_plain_http_are_refused_on_the_tls_port() {
    let s = Scratch::new();
    let server = Server::start(&s, &[]);
    let addr = format!("127.0.0.1:{}", server.port);
    let openssl = |args: &[&str]| {
        std::process::Command::new("openssl")
            .arg("s_client")
            .args(args)
            .args(["-connect", &addr, "-servername", "localhost"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl is installed")
    };
    // SECLEVEL=0 lets the client offer TLS 1.1 at all; the server must say no.
    let old = openssl(&["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]);
    let said = format!("{}{}", String::from_utf8_lossy(&old.stdout), String::from_utf8_lossy(&old.stderr));
    // The server answers the TLS 1.1 hello with an alert; no cipher is ever agreed.
    assert!(said.contains("alert"), "TLS 1.1 was not refused: {said}");
    assert!(said.contains("Cipher is (NONE)"), "TLS 1.1 was accepted: {said}");
    for (flag, version) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let ok = openssl(&[flag]);
        let said = String::from_utf8_lossy(&ok.stdout).into_owned();
        assert!(said.contains(version) && !said.contains("Cipher is (NONE)"), "{flag}: {said}");
    }

    let mut tcp = std::net::TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n").unwrap();
    let mut buf = vec![];
    let _ = tcp.read_to_end(&mut buf);
    assert!(!buf.starts_with(b"HTTP/"), "plain HTTP answered on the TLS port: {:?}", String::from_utf8_lossy(&buf));
    assert!(server.stop().success());
    let _ = json!({});
}

/// `verify --deep` finds what the chain check cannot see: the indexes readers rely on,
/// damaged while the log stays whole (an entry lost, one pointing elsewhere, one too many, an
/// audit entry unindexed). Without it such a store would serve subjects with fewer events.
#[test]
fn verify_deep_finds_index_entries_lost_misplaced_or_extra() {
    use pdledger::store::{AuditKey, Store, WriteBatch};
    let s = Scratch::new();
    assert!(s.cli(&["import", sample_path().to_str().unwrap()]).status.success());
    let subject: Uuid = sample()
        .iter()
        .find(|e| e["type"] == "customer.registered")
        .and_then(|e| e["subject"].as_str()?.parse().ok())
        .unwrap();
    // An audit entry about that subject (the extract is audited).
    assert!(s.cli(&["export", &subject.to_string()]).status.success());
    let deep = || {
        let out = s.cli(&["verify", "--deep", "--json"]);
        (out.status.code(), serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null))
    };
    let (code, report) = deep();
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["ok"], true);
    let change = |f: &dyn Fn(&Store, &mut WriteBatch)| {
        let store = Store::open(&s.data(), "test", 16 << 20).unwrap();
        let mut b = WriteBatch::default();
        f(&store, &mut b);
        store.commit(b).unwrap();
    };
    let at = Store::open(&s.data(), "test", 16 << 20).unwrap().stream_position(subject, 2).unwrap().unwrap();

    // Lost: the chain check passes, the deep check names the record.
    change(&|_, b| b.remove_stream(subject, 2));
    assert_eq!(s.cli(&["verify"]).status.code(), Some(0), "the log itself is whole");
    let (code, report) = deep();
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["index_problem"]["position"], at, "{report}");
    let reason = report["index_problem"]["reason"].as_str().unwrap();
    assert!(reason.contains(&subject.to_string()) && reason.contains("version 2"), "{reason}");
    let text = String::from_utf8(s.cli(&["verify", "--deep"]).stdout).unwrap();
    assert!(text.starts_with(&format!("INDEX BROKEN at position {at}")), "{text}");

    // Misplaced.
    change(&|_, b| b.put_stream(subject, 2, at + 1));
    let (code, report) = deep();
    assert_eq!(code, Some(1));
    assert!(report["index_problem"]["reason"].as_str().unwrap().contains(&format!("at position {}", at + 1)));

    // Put right, then one too many.
    change(&|_, b| b.put_stream(subject, 2, at));
    assert_eq!(deep().0, Some(0));
    change(&|_, b| b.put_stream(subject, 999, at));
    let (code, report) = deep();
    assert_eq!(code, Some(1));
    assert!(report["index_problem"]["reason"].as_str().unwrap().contains("entries for"), "{report}");
    change(&|_, b| b.remove_stream(subject, 999));
    assert_eq!(deep().0, Some(0));

    // An audit entry missing from the audit index.
    change(&|store, b| {
        let pos = store.audit_rev(AuditKey::Subject(subject), u64::MAX).next().unwrap().unwrap();
        b.remove_audit(pos, Some(subject));
    });
    let (code, report) = deep();
    assert_eq!(code, Some(1));
    assert!(report["index_problem"]["reason"].as_str().unwrap().contains("audit index"), "{report}");

    // The way out it prints: a backup of the whole log, restored, derives every index again.
    change(&|_, b| b.remove_stream(subject, 2));
    let (bk, fresh) = (s.root.path().join("bk"), s.root.path().join("fresh"));
    assert!(s.cli(&["backup", bk.to_str().unwrap()]).status.success());
    let out = s.cli(&["restore", bk.to_str().unwrap(), "--data", fresh.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = s.cli(&["verify", "--deep", "--data", fresh.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    let store = Store::open(&fresh, "test", 16 << 20).unwrap();
    assert_eq!(store.stream_position(subject, 2).unwrap(), Some(at));
}

/// A data directory written by the previous format (1: the audit trail also indexed by actor
/// and by action; made by pdledger at 838f83a from the sample register's first 40
/// lines, two exports and a user added) reads the same audit trail before and after the
/// upgrade, which happens when the ledger opens it with its keyring: the format becomes 2, the
/// old index entries go (also those a crash during the upgrade left), `verify --deep` passes
/// and new entries are found by subject, actor and action. With the wrong keyring nothing
/// changes.
#[test]
fn a_format_1_data_directory_upgrades_in_place_with_the_same_audit_trail() {
    use pdledger::store::Store;
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/format1-store.tar.gz");
    let unpack = |s: &Scratch| {
        let out =
            std::process::Command::new("tar").arg("xzf").arg(&fixture).current_dir(s.root.path()).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    };
    let format = |s: &Scratch| Store::open(&s.data(), "test", 1 << 20).unwrap().meta_u32("format").unwrap();
    let subject = "9988337f-adc0-4c2e-8fa9-cffccd012c84";
    let trail = |s: &Scratch, filter: &[&str]| -> Vec<Value> {
        let out = s.cli(&[&["audit", "--json"], filter].concat());
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let positions = |lines: &[Value]| lines.iter().map(|l| l["position"].as_u64().unwrap()).collect::<Vec<_>>();

    // What the fixture holds: the format 1 entries (3 audit entries x the actor and action
    // indexes), found by the function the upgrade runs.
    let old = Scratch::new();
    unpack(&old);
    assert_eq!(format(&old), Some(1));
    assert_eq!(Store::open(&old.data(), "test", 1 << 20).unwrap().drop_v1_audit_indexes().unwrap(), 6);

    // A crash during an upgrade: format 2 durable, the old entries still there. The next
    // open removes them.
    let crashed = Scratch::new();
    unpack(&crashed);
    {
        let store = Store::open(&crashed.data(), "test", 1 << 20).unwrap();
        let mut b = pdledger::store::WriteBatch::default();
        b.put_meta("format", &2u32.to_be_bytes());
        store.commit(b).unwrap();
    }
    assert!(crashed.cli(&["export", subject]).status.success());
    assert_eq!(Store::open(&crashed.data(), "test", 1 << 20).unwrap().drop_v1_audit_indexes().unwrap(), 0);

    let s = Scratch::new();
    unpack(&s);
    // Opened with a keyring that is not its own: refused, and still format 1 (an older
    // pdledger can still open it with the right one).
    let stranger = s.root.path().join("other-keyring");
    std::fs::create_dir(&stranger).unwrap();
    let out = s.cli_cmd(&["export", subject]).env("PDLEDGER_KEYRING", &stranger).output().unwrap();
    assert!(!out.status.success());
    assert_eq!(format(&s), Some(1), "{}", stderr(&out));
    // Read as it stands, by this version, before any upgrade: what the old version printed.
    let expected: Vec<Value> = [
        r#"{"position":43,"at":"2026-11-30T04:27:08.536Z","actor":"cli","action":"user_created","subject":null,"outcome":"ok","target":"clerk"}"#,
        r#"{"position":42,"at":"2026-11-30T04:27:08.442Z","actor":"cli","action":"export","subject":"9988337f-adc0-4c2e-8fa9-cffccd012c84","outcome":"ok"}"#,
        r#"{"position":41,"at":"2026-11-30T04:27:08.414Z","actor":"cli","action":"export","subject":"9988337f-adc0-4c2e-8fa9-cffccd012c84","outcome":"ok"}"#,
    ]
    .iter()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect();
    assert_eq!(trail(&s, &[]), expected);
    assert_eq!(positions(&trail(&s, &["--subject", subject])), [42, 41]);
    assert_eq!(positions(&trail(&s, &["--action", "user_created"])), [43]);

    // Opening the ledger upgrades it; the trail reads the same, and grows.
    let out = s.cli(&["export", subject]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(format(&s), Some(2));
    assert_eq!(Store::open(&s.data(), "test", 1 << 20).unwrap().drop_v1_audit_indexes().unwrap(), 0);
    assert_eq!(&trail(&s, &[])[1..], &expected[..]);
    assert_eq!(positions(&trail(&s, &["--subject", subject])), [44, 42, 41]);
    assert_eq!(positions(&trail(&s, &["--action", "export"])), [44, 42, 41]);
    assert_eq!(positions(&trail(&s, &["--actor", "cli", "--action", "user_created"])), [43]);
    let out = s.cli(&["verify", "--deep"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}
