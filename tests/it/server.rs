//! The real server: the `pdledger serve` binary on 127.0.0.1:0 over TLS, a real HTTPS client,
//! a refused plain-HTTP connection, and a graceful shutdown that loses no acknowledged append.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

pub struct Server {
    pub child: Child,
    pub port: u16,
    pub tls: bool,
}

impl Server {
    /// Starts `pdledger serve` and waits for its banner (the port is in it).
    pub fn start(s: &Scratch, extra: &[&str]) -> Server {
        Server::start_logged(s, extra, None)
    }

    /// Starts the server with its log (standard error) going to `log`, at the most verbose
    /// level for pdledger's own code.
    pub fn start_logged(s: &Scratch, extra: &[&str], log: Option<&Path>) -> Server {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let mut cmd = s.cli_cmd(&args);
        cmd.env("PDLEDGER_ADMIN_PASSWORD", crate::http::PASSWORD).stdout(Stdio::piped());
        match log {
            Some(p) => {
                cmd.stderr(std::fs::File::create(p).unwrap()).env("RUST_LOG", "info,pdledger=trace");
            }
            None => {
                cmd.stderr(Stdio::null());
            }
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut port = 0;
        let mut tls = true;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(rest) = line.split("serving ").nth(1) {
                tls = rest.starts_with("https://");
                port = rest.rsplit(':').next().unwrap().trim().parse().unwrap();
            }
            if line.starts_with("Then send the token") {
                break;
            }
        }
        assert!(port > 0, "no port in the banner");
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, port, tls }
    }

    pub fn stop(self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM)
    }

    pub fn signal(mut self, sig: i32) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, sig) };
        self.child.wait().unwrap()
    }
}

/// A test that fails part-way still stops its server.
impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Why a call got no answer.
#[derive(Debug)]
pub enum NoAnswer {
    /// The connection was refused: the request never reached the server.
    Refused(std::io::Error),
    /// The connection broke after it was made: the request may or may not have been handled.
    Broken(String),
}

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoAnswer::Refused(e) => write!(f, "connection refused: {e}"),
            NoAnswer::Broken(e) => write!(f, "no answer: {e}"),
        }
    }
}

/// A minimal HTTPS (or HTTP) client: one connection per request.
pub struct Client {
    port: u16,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Client {
    pub fn new(server: &Server, data: &Path) -> Client {
        let tls = server.tls.then(|| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(data.join("tls/cert.pem")).unwrap() {
                roots.add(cert.unwrap()).unwrap();
            }
            let config =
                rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth();
            tokio_rustls::TlsConnector::from(Arc::new(config))
        });
        Client { port: server.port, tls }
    }

    pub async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
        self.try_call(method, path, token, body).await.unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// A call that reports a missing answer instead of panicking: for tests that kill the
    /// server while requests are in flight.
    pub async fn try_call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<(u16, Value), NoAnswer> {
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).await.map_err(NoAnswer::Refused)?;
        let broken = |e: &dyn std::fmt::Display| NoAnswer::Broken(e.to_string());
        let mut req = hyper::Request::builder().method(method).uri(path).header("host", "localhost");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req.body(body).unwrap();
        let resp = match &self.tls {
            Some(c) => {
                let stream =
                    c.connect(ServerName::try_from("localhost").unwrap(), tcp).await.map_err(|e| broken(&e))?;
                let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| broken(&e))?;
                tokio::spawn(conn);
                send.send_request(req).await.map_err(|e| broken(&e))?
            }
            None => {
                let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .map_err(|e| broken(&e))?;
                tokio::spawn(conn);
                send.send_request(req).await.map_err(|e| broken(&e))?
            }
        };
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.map_err(|e| broken(&e))?.to_bytes();
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }

    pub async fn login(&self, user: &str, password: &str) -> String {
        let (status, body) =
            self.call("POST", "/v1/auth/login", None, Some(json!({"username": user, "password": password}))).await;
        assert_eq!(status, 200, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_over_tls_and_graceful_shutdown() {
    let s = Scratch::new();
    let server = Server::start(&s, &[]);
    assert!(server.tls);
    let client = Client::new(&server, &s.data());

    // Plain HTTP to the TLS port gets no HTTP answer.
    let mut tcp = TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tcp.read(&mut buf).await.unwrap_or(0);
    assert!(!String::from_utf8_lossy(&buf[..n]).contains("HTTP/1.1 200"), "plain HTTP was served on the TLS port");

    let (status, body) = client.call("GET", "/healthz", None, None).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let admin = client.login("admin", crate::http::PASSWORD).await;
    let (status, _) = client
        .call(
            "POST",
            "/v1/users",
            Some(&admin),
            Some(json!({"username": "sara", "password": "sara-has-a-long-password", "role": "staff"})),
        )
        .await;
    assert_eq!(status, 201);
    let staff = client.login("sara", "sara-has-a-long-password").await;
    let subject = uuid::Uuid::new_v4();
    let mut positions = vec![];
    for i in 0..20 {
        let body = json!({"events": [{"type": "note.added", "data": {"text": format!("note {i}")}}]});
        let (status, r) =
            client.call("POST", &format!("/v1/subjects/{subject}/events"), Some(&staff), Some(body)).await;
        assert_eq!(status, 201, "{r}");
        positions.push(r["positions"][0].as_u64().unwrap());
    }
    let (status, r) = client.call("GET", &format!("/v1/subjects/{subject}/events"), Some(&staff), None).await;
    assert_eq!((status, r["version"].as_u64()), (200, Some(20)));

    // SIGTERM: a clean exit, and every acknowledged append is there afterwards.
    let exit = server.stop();
    assert!(exit.success(), "{exit:?}");
    let ledger = s.open();
    let events = ledger.read_stream(subject, 0, 100).unwrap();
    assert_eq!(events.iter().map(|e| e.position).collect::<Vec<_>>(), positions);
    drop(ledger);
    assert_eq!(s.cli(&["verify"]).status.code(), Some(0));
}

/// Ctrl-C (SIGINT) shuts down as gracefully as SIGTERM, over plain HTTP on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_shuts_down_gracefully() {
    let s = Scratch::new();
    let server = Server::start(&s, &["--plain-http"]);
    assert!(!server.tls);
    let client = Client::new(&server, &s.data());
    let token = client.login("admin", crate::http::PASSWORD).await;
    let (status, _) = client
        .call(
            "POST",
            "/v1/users",
            Some(&token),
            Some(json!({"username": "svc", "password": "service-password-long", "role": "service"})),
        )
        .await;
    assert_eq!(status, 201);
    let svc = client.login("svc", "service-password-long").await;
    let subject = uuid::Uuid::new_v4();
    let body = json!({"events": [{"type": "consent.given", "data": {"purpose": "newsletter", "channel": "email"}}]});
    let (status, r) = client.call("POST", &format!("/v1/subjects/{subject}/events"), Some(&svc), Some(body)).await;
    assert_eq!(status, 201, "{r}");
    assert!(server.signal(libc::SIGINT).success());
    let ledger = s.open();
    assert_eq!(ledger.stream_version(subject).unwrap(), 1);
}

#[test]
fn plain_http_is_refused_off_loopback() {
    let s = Scratch::new();
    let out = s.cli(&["serve", "--plain-http", "--listen", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--plain-http is refused"), "{}", stderr(&out));
}

/// Personal data sent through the API reaches neither the server's log nor its data
/// directory, in any encoding; neither do passwords or tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_personal_in_logs_or_on_disk_after_http_traffic() {
    let s = Scratch::new();
    let log = s.root.path().join("server.log");
    let server = Server::start_logged(&s, &[], Some(&log));
    // Nor in a core dump: the server turned them off for itself (limit zero, soft and hard).
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.child.id())).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    assert_eq!(core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(), ["0", "0"], "{core}");
    let client = Client::new(&server, &s.data());
    let admin = client.login("admin", crate::http::PASSWORD).await;
    let staff_pw = "staff-password-that-is-secret";
    let (status, _) = client
        .call(
            "POST",
            "/v1/users",
            Some(&admin),
            Some(json!({"username": "sara", "password": staff_pw, "role": "staff"})),
        )
        .await;
    assert_eq!(status, 201);
    let staff = client.login("sara", staff_pw).await;
    // A failed login with a password that looks like personal data.
    let (status, _) = client
        .call("POST", "/v1/auth/login", None, Some(json!({"username": "sara", "password": "Wrong-Password-Secret-42"})))
        .await;
    assert_eq!(status, 401);

    // Forty customers from the sample register, appended and read back over HTTP, plus a
    // schema violation that carries a value.
    let events = sample();
    let customers: Vec<&Value> = events.iter().filter(|e| e["type"] == "customer.registered").take(40).collect();
    for e in &customers {
        let subject = e["subject"].as_str().unwrap();
        let body = json!({"events": [{"type": e["type"], "occurred_at": e["occurred_at"], "data": e["data"]}]});
        let (status, r) =
            client.call("POST", &format!("/v1/subjects/{subject}/events"), Some(&staff), Some(body)).await;
        assert_eq!(status, 201, "{r}");
        let (status, _) = client.call("GET", &format!("/v1/subjects/{subject}/events"), Some(&staff), None).await;
        assert_eq!(status, 200);
    }
    let mut bad = customers[0]["data"].clone();
    bad["email"] = json!("Invalid Email Address Of Someone");
    let (status, _) = client
        .call(
            "POST",
            &format!("/v1/subjects/{}/events", uuid::Uuid::new_v4()),
            Some(&staff),
            Some(json!({"events": [{"type": "customer.registered", "data": bad}]})),
        )
        .await;
    assert_eq!(status, 422);
    let (status, _) = client.call("GET", "/v1/events?after_position=0&limit=1000", Some(&staff), None).await;
    assert_eq!(status, 200);
    assert!(server.stop().success());

    let mut values = known_values(&customers.iter().map(|v| (*v).clone()).collect::<Vec<_>>(), 100);
    assert!(values.len() >= 50, "{}", values.len());
    values.extend(
        [
            "Invalid Email Address Of Someone",
            staff_pw,
            "Wrong-Password-Secret-42",
            crate::http::PASSWORD,
            &admin[4..],
            &staff[4..],
        ]
        .map(String::from),
    );
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("request"), "the log is empty: the scan would prove nothing");
    let hits = scan(&[s.root.path()], &values);
    let hits: Vec<_> = hits.into_iter().filter(|(_, _, p)| !p.ends_with("gen.jsonl")).collect();
    assert!(hits.is_empty(), "found in the log or data directory: {:?}", &hits[..hits.len().min(5)]);
}

/// A burst of logins: Argon2id holds 19 MiB per password hash, so the server computes them a
/// few at a time (`--password-hashes-max`) instead of one per request in flight (64 wrong
/// logins at once took it from 114 MB to 1 GB), and the lockout per address holds exactly
/// under the burst (each login in the queue checks it again when its turn comes; before,
/// all 64 were hashed and answered 401).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_logins_is_hashed_one_at_a_time_and_stops_at_the_lockout() {
    const BURST: usize = 48;
    let s = Scratch::new();
    let server = Server::start(&s, &["--plain-http", "--password-hashes-max", "1"]);
    let pid = server.child.id();
    let client = Arc::new(Client::new(&server, &s.data()));
    let (status, _) = client.call("GET", "/healthz", None, None).await;
    assert_eq!(status, 200);
    let peak_before = proc_status_kb(pid, "VmHWM");
    let logins: Vec<_> = (0..BURST)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let body = json!({"username": format!("nobody{i}"), "password": "a wrong password, long enough"});
                client.call("POST", "/v1/auth/login", None, Some(body)).await.0
            })
        })
        .collect();
    let mut statuses = vec![];
    for l in logins {
        statuses.push(l.await.unwrap());
    }
    let peak_after = proc_status_kb(pid, "VmHWM");
    // Distinct names, one address: the address's limit (20 by default) is what stops them.
    let refused = statuses.iter().filter(|&&s| s == 401).count();
    let locked = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!((refused, locked), (20, BURST - 20), "{statuses:?}");
    // One hash at a time: 19 MiB (two or three while freed ones are purged) and what else the burst costs, far from 19 MiB per login.
    let grew_mb = peak_after.saturating_sub(peak_before) / 1024;
    assert!(grew_mb < 6 * 19, "peak RSS grew by {grew_mb} MB during {BURST} logins");
    eprintln!("peak RSS {} -> {} MB over {BURST} logins at once", peak_before / 1024, peak_after / 1024);
    assert!(server.stop().success());
}
