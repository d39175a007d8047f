//! The command line as a user meets it: bad input, exit codes, a held data directory.

use serde_json::Value;

use crate::support::*;

const GOOD: &str = r#"{"subject":"9988337f-adc0-4c2e-8fa9-cffccd012c84","type":"consent.given","occurred_at":"2019-01-05","data":{"purpose":"newsletter","channel":"email"}}"#;

fn head(s: &Scratch) -> u64 {
    let out = s.cli(&["verify", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    v["head"]["position"].as_u64().unwrap()
}

/// Each kind of bad line gets its line number, exit code 2, and nothing of its batch is
/// appended; earlier batches are.
#[test]
fn bad_lines_are_named_and_nothing_of_their_batch_lands() {
    // Valid by its schema (200 lines of 400 characters) but over the 64 KiB event limit.
    let line = format!(r#"{{"description":"{}","hours":1,"amount_ore":100}}"#, "å".repeat(400));
    let big_invoice = format!(
        r#"{{"subject":"9988337f-adc0-4c2e-8fa9-cffccd012c84","type":"invoice.issued","data":{{"invoice_number":"1","project_id":"P1","issued_on":"2024-01-01","due_on":"2024-01-31","currency":"SEK","lines":[{}],"net_ore":20000,"vat_ore":5000,"total_ore":25000,"billing_address":{{"street":"Gatan 1","postal_code":"12345","city":"Ort"}}}}}}"#,
        vec![line; 200].join(",")
    );
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "malformed JSON",
            r#"{"subject": "9988337f-adc0-4c2e-8fa9-cffccd012c84", "type": ,}"#.into(),
            "malformed JSON",
        ),
        ("cut-off JSON", r#"{"subject": "9988337f-adc0-4c2e-8fa9-cffccd012c84", "type": "#.into(), "incomplete JSON"),
        ("not an object", "[1,2,3]".into(), "not a valid event line"),
        ("unknown type", GOOD.replace("consent.given", "consent.forgotten"), "unknown event type `consent.forgotten`"),
        ("schema violation", GOOD.replace(r#""channel":"email""#, r#""channel":"email","extra":1"#), "extra"),
        ("missing field", GOOD.replace(r#","channel":"email""#, ""), "channel"),
        (
            "invalid subject",
            GOOD.replace("9988337f-adc0-4c2e-8fa9-cffccd012c84", "not-a-uuid"),
            "`subject` is not a UUID",
        ),
        ("bad occurred_at", GOOD.replace("2019-01-05", "2019-02-30"), "occurred_at"),
        ("over the size limit", big_invoice, "over the limit"),
        ("unknown envelope field", GOOD.replace(r#""type""#, r#""secret":1,"type""#), "not a valid event line"),
    ];
    for (what, bad, expect) in cases {
        let s = Scratch::new();
        // Lines 1-2 are a batch that lands; line 3 good, line 4 bad: their batch does not.
        let text = format!("{GOOD}\n{GOOD}\n{GOOD}\n{bad}\n{GOOD}\n");
        let file = s.write("in.jsonl", &text);
        let out = s.cli(&["import", "--batch", "2", file.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{what}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("line 4"), "{what}: {err}");
        assert!(err.contains(expect), "{what}: expected `{expect}` in: {err}");
        assert!(err.contains("2 events from lines 1..=2 were appended"), "{what}: {err}");
        // The first batch's two events and the import's audit entry for their subject.
        assert_eq!(head(&s), 3, "{what}: more than the first batch landed");
        // The message does not echo the bad value back.
        assert!(!err.contains("ååå"), "{what}: {err}");
    }
}

#[test]
fn a_held_data_directory_is_refused_at_once_with_the_holder() {
    let s = Scratch::new();
    let ledger = s.open();
    let started = std::time::Instant::now();
    for args in [&["verify"][..], &["replay"][..], &["import", "-"][..]] {
        let out = s.cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        assert!(err.contains("is in use by process") && err.contains(&std::process::id().to_string()), "{err}");
        assert!(err.contains("(test)"), "{err}");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    ledger.close().unwrap();
    assert_eq!(s.cli(&["verify"]).status.code(), Some(0));
}

#[test]
fn usage_errors_exit_2_and_help_helps() {
    let s = Scratch::new();
    assert_eq!(s.cli(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(s.cli(&["verify", "--anchor", "nonsense"]).status.code(), Some(2));
    let help = s.cli(&["--help"]);
    assert!(help.status.success());
    for cmd in ["import", "verify", "replay"] {
        assert!(stdout(&help).contains(cmd), "{cmd} missing from help");
    }
    let out = s.cli(&["import", "/no/such/file.jsonl"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("/no/such/file.jsonl"));
    // Replay of an unknown subject is a failed check, not a crash.
    s.cli(&["verify"]);
    let out = s.cli(&["replay", "--subject", "9988337f-adc0-4c2e-8fa9-cffccd012c84"]);
    assert_eq!(out.status.code(), Some(1));
}

/// A pseudo-terminal: its master side (the test: what it types, what the screen shows) and
/// its slave side (the child's terminal).
fn pty() -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut m, mut sl) = (0, 0);
    // SAFETY: openpty writes two new descriptors into the integers given; the others may be null.
    let rc = unsafe { libc::openpty(&mut m, &mut sl, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned by nothing else.
    unsafe { (std::fs::File::from_raw_fd(m), OwnedFd::from_raw_fd(sl)) }
}

/// Starts `user add NAME --role staff` on the terminal (no `PDLEDGER_PASSWORD`) and reads what
/// the screen shows until the password prompt is on it.
fn user_add_at_its_prompt(
    s: &Scratch,
    name: &str,
    master: &mut std::fs::File,
    slave: &std::os::fd::OwnedFd,
    stdout: std::process::Stdio,
) -> (std::process::Child, Vec<u8>) {
    use std::io::Read;
    let child = s
        .cli_cmd(&["user", "add", name, "--role", "staff"])
        .env_remove("PDLEDGER_PASSWORD")
        .stdin(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap())
        .stdout(stdout)
        .spawn()
        .unwrap();
    let mut shown = Vec::new();
    let mut buf = [0u8; 512];
    while !String::from_utf8_lossy(&shown).contains("not shown): ") {
        match master.read(&mut buf) {
            Ok(n) if n > 0 => shown.extend_from_slice(&buf[..n]),
            other => panic!("the prompt never came ({other:?}): {}", String::from_utf8_lossy(&shown)),
        }
    }
    (child, shown)
}

/// Ctrl-C at the password prompt ends `user add` and leaves the terminal echoing again.
#[test]
fn user_add_interrupted_at_its_prompt_gives_the_terminal_its_echo_back() {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;

    let s = Scratch::new();
    let (mut master, slave) = pty();
    let echo_on = |fd: &OwnedFd| {
        // SAFETY: tcgetattr fills a termios we own from an open terminal descriptor.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(fd.as_raw_fd(), &mut t), 0);
            t.c_lflag & libc::ECHO != 0
        }
    };
    assert!(echo_on(&slave), "a new terminal echoes");
    let (mut child, _) = user_add_at_its_prompt(&s, "carol", &mut master, &slave, std::process::Stdio::null());
    // The prompt is up, so the echo is off; Ctrl-C (as the terminal would send it).
    assert!(!echo_on(&slave), "the echo is off at the prompt");
    // SAFETY: kill sends a signal to the child we spawned and still own.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGINT), "it ends as Ctrl-C ends a program: {status:?}");
    assert!(echo_on(&slave), "the terminal was left without its echo");
}

/// `user add` reads the password from a terminal without showing it. The test is the
/// terminal (a pseudo-terminal's master side): it types the password once the prompt is on the
/// screen, then reads back everything the screen showed, which must not hold the password.
#[test]
fn user_add_does_not_show_the_password_typed_at_its_prompt() {
    use std::io::{Read, Write};

    let s = Scratch::new();
    let (mut master, slave) = pty();
    let (mut child, mut shown) = user_add_at_its_prompt(&s, "bob", &mut master, &slave, std::process::Stdio::piped());
    drop(slave);
    let mut buf = [0u8; 512];
    let password = "correct horse battery staple 7";
    master.write_all(format!("{password}\n").as_bytes()).unwrap();
    let status = child.wait().unwrap();
    let mut stdout = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    while let Ok(n) = master.read(&mut buf) {
        if n == 0 {
            break;
        }
        shown.extend_from_slice(&buf[..n]);
    }
    let shown = String::from_utf8_lossy(&shown);
    assert!(status.success(), "{shown}");
    assert!(stdout.contains("created user bob with role staff"), "{stdout}");
    assert!(!shown.contains(password), "the password was shown: {shown:?}");
    // The password took: bob logs in with it (through the store, as the server would).
    let ledger = pdledger::ledger::Ledger::open(pdledger::ledger::OpenOptions::new(
        s.data(),
        pdledger::keyring::Keyring::Dir(s.keyring()),
        "test",
    ))
    .unwrap();
    let auth = pdledger::auth::Auth::new(
        ledger.store().kv("auth").unwrap(),
        Default::default(),
        pdledger::auth::system_clock(),
    )
    .unwrap();
    let login = auth.login("bob", password, None).unwrap();
    assert!(matches!(login, pdledger::auth::Login::Session { .. }), "the typed password does not log in");
}
