//! HTTP load generator: the API over real loopback sockets, each scenario beside the baseline
//! it is judged against, in the same run and on the same machine:
//!
//! - `echo`: a bare axum handler on its own server that parses a ~640-byte JSON body into a
//!   `serde_json::Value` and echoes it back (the floor: HTTP + JSON, no ledger).
//! - `append (http)` / `append (tls)`: `POST /v1/subjects/{id}/events`, one ~500-byte
//!   `note.added` event per request, each connection appending to its own subject.
//! - `append (http, backup)`: the plain-HTTP append with the continuous backup running (200 ms
//!   interval); its largest lag during the run, and how soon it catches up after, are printed.
//! - `read (http)` / `read (tls)`: `GET /v1/subjects/{id}/events` on subjects of exactly 10 events.
//! - `sled floor: append` / `sled floor: read`: what sled alone allows for the same work, on a
//!   bare axum server of their own with the same group commit as the ledger (a thread that
//!   flushes sled and fsyncs its file for every request applied so far, then answers them):
//!   the append inserts its request body (the same bytes) and waits for the fsync; the read
//!   gets ten stored ~500-byte events, inserts a 200-byte record (the audit entry a read must
//!   make durable; the ledger's is three entries, the record and two index keys, so this floor
//!   is generous) and waits for the fsync before answering the ten. No parsing beyond the
//!   echo's, no auth, no encryption, no hash chain, no index, no projection: a floor.
//! - `sled floor: append, ledger's entries`: the append's floor with the entries an append of
//!   one note makes in the ledger, at their sizes (so only sled's cost of the layout): a
//!   650-byte record and a 300-byte audit record at increasing keys, the stream entry, the two
//!   audit index entries and the subject's 5,100-byte `customer` document (ten notes)
//!   rewritten (not the head and views checkpoint: the ledger writes those once per group
//!   commit, shared by about 19 appends at these rates). `PDLEDGER_LOAD_DOC_BYTES=N`
//!   sets the document's size (0: no document), and `PDLEDGER_LOAD_AUDIT=0` leaves out the
//!   audit record and its two index entries, to see what each costs.
//!
//! Every scenario: 64 keep-alive HTTP/1.1 connections on 127.0.0.1, each sending requests one
//! after another, 1 s of warm-up (not counted), then `PDLEDGER_LOAD_SECS` seconds (default 8)
//! or 2,000,000 requests, whichever comes first. Every latency is recorded; any non-2xx answer
//! or transport error fails the run (after the table is printed).
//!
//! Client and servers share one tokio runtime and the machine's cores: the numbers are for
//! comparing scenarios with each other, not a server's capacity on its own hardware.
//!
//! Run: `cargo bench --bench http_load` (or `PDLEDGER_LOAD_SECS=5 cargo bench --bench http_load`).
//! `PDLEDGER_LOAD_ONLY=read` (or `append`, `backup`, comma-separated) runs only those scenarios
//! beside the echo baseline, for profiling one of them (the store is then smaller than in a
//! full run, so compare such figures only with each other).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::{Json, Router};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use pdledger::api::{self, ApiConfig, AppState, Peer};
use pdledger::auth::{Auth, Role};
use pdledger::keyring::Keyring;
use pdledger::ledger::{Ledger, OpenOptions};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

/// The allocator the binary runs with (`src/main.rs`), so that these figures are the server's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CONNECTIONS: usize = 64;
const WARMUP: Duration = Duration::from_secs(1);
const DEFAULT_SECS: f64 = 8.0;
const REQUESTS_MAX: u64 = 2_000_000;
/// A request taking longer than this counts as an error (and its connection is replaced).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const READ_EVENTS: usize = 10;
/// The continuous backup's interval in the backup scenario: `serve --backup-interval-ms`'s default.
const BACKUP_INTERVAL: Duration = Duration::from_millis(200);
const USER: &str = "staff";
const PASSWORD: &str = "a-long-enough-password";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then only a short smoke run.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let secs = match std::env::var("PDLEDGER_LOAD_SECS") {
        Ok(s) => s.parse::<f64>().ok().filter(|s| *s > 0.0).expect("PDLEDGER_LOAD_SECS: a positive number of seconds"),
        Err(_) if smoke => 0.5,
        Err(_) => DEFAULT_SECS,
    };
    let warmup = if smoke { Duration::from_millis(200) } else { WARMUP };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    rt.block_on(run(Duration::from_secs_f64(secs), warmup));
}

async fn run(measure: Duration, warmup: Duration) {
    let tmp = tempfile::tempdir().expect("temp dir");
    println!("http_load: {CONNECTIONS} keep-alive HTTP/1.1 connections per scenario on 127.0.0.1");
    println!(
        "warm-up: {:.1} s per scenario (not counted), then {:.1} s measured or {REQUESTS_MAX} requests",
        warmup.as_secs_f64(),
        measure.as_secs_f64()
    );
    println!("data dir: {} ({})", tmp.path().display(), fs_type(tmp.path()));
    println!(
        "client and servers share one tokio runtime ({} workers)\n",
        tokio::runtime::Handle::current().metrics().num_workers()
    );

    let echo = start_echo().await;
    let pd = Pd::start(tmp.path()).await;

    let append_note = note_text(440);
    let append_body = Bytes::from(note_body(&append_note, 1).to_string());
    let echo_body = Bytes::from(echo_payload(640).to_string());
    println!("bodies: echo request {} B, append request {} B", echo_body.len(), append_body.len());

    // Pre-flight: each scenario's request gives the answer we expect before we time it.
    let mut c = connect(&echo).await.expect("connect to echo");
    let (status, body) = call(&mut c, &echo_request("/echo", &echo_body)).await.expect("echo");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), serde_json::from_slice::<Value>(&echo_body).unwrap());

    let mut results = vec![];

    // 1. echo
    let templates = (0..CONNECTIONS).map(|_| echo_request("/echo", &echo_body)).collect();
    results.push(scenario("echo", &echo, templates, warmup, measure).await);

    let only = std::env::var("PDLEDGER_LOAD_ONLY").ok();
    for kind in only.iter().flat_map(|o| o.split(',')) {
        assert!(
            ["append", "backup", "read"].contains(&kind.trim()),
            "PDLEDGER_LOAD_ONLY: `{kind}` is not a scenario (append, backup, read)"
        );
    }
    let wanted = |kind: &str| only.as_deref().is_none_or(|o| o.split(',').any(|k| k.trim() == kind));

    // The floors under the append and read scenarios: sled alone, same group commit.
    let floor = if wanted("append") || wanted("read") {
        Some(Floor::start(&tmp.path().join("floor"), &append_note))
    } else {
        None
    };
    if let (Some(f), true) = (&floor, wanted("append")) {
        let templates = (0..CONNECTIONS).map(|i| echo_request(&format!("/append/{i}"), &append_body)).collect();
        results.push(scenario("sled floor: append", &f.target, templates, warmup, measure).await);
        let templates = (0..CONNECTIONS).map(|i| echo_request(&format!("/layout/{i}"), &append_body)).collect();
        results.push(scenario("sled floor: append, ledger's entries", &f.target, templates, warmup, measure).await);
    }

    // 2, 3. append
    for (name, target) in [("append (http)", &pd.http), ("append (tls)", &pd.tls)] {
        if !wanted("append") {
            break;
        }
        let subjects = pd.create_subjects(CONNECTIONS).await;
        let templates = subjects
            .iter()
            .map(|s| pd.request(Method::POST, &format!("/v1/subjects/{s}/events"), Some(&append_body)))
            .collect();
        let r = scenario(name, target, templates, warmup, measure).await;
        // Every acknowledged append is in its subject's stream, and nothing else is.
        let mut stored = 0;
        for s in &subjects {
            stored += pd.ledger.stream_version(*s).expect("stream version");
        }
        if stored != r.ok_total {
            eprintln!("!!! {name}: {} appends acknowledged but {stored} events stored", r.ok_total);
        }
        results.push(r);
    }

    // 3b. append over plain HTTP with the continuous backup running (`serve --backup-dir`,
    // its default 200 ms interval): does the backup keep up with the durable append rate?
    if wanted("backup") {
        let backup = Arc::new(
            pdledger::backup::Continuous::spawn(pd.ledger.clone(), &tmp.path().join("backup"), BACKUP_INTERVAL)
                .expect("start the continuous backup"),
        );
        let subjects = pd.create_subjects(CONNECTIONS).await;
        let templates = subjects
            .iter()
            .map(|s| pd.request(Method::POST, &format!("/v1/subjects/{s}/events"), Some(&append_body)))
            .collect();
        let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let sampler = {
            let (backup, sampling) = (backup.clone(), sampling.clone());
            tokio::spawn(async move {
                let mut max_lag = 0;
                while sampling.load(Ordering::Relaxed) {
                    max_lag = max_lag.max(backup.status().lag_records);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                max_lag
            })
        };
        let r = scenario("append (http, backup)", &pd.http, templates, warmup, measure).await;
        sampling.store(false, Ordering::Relaxed);
        let max_lag = sampler.await.expect("lag sampler");
        // Then the backup catches up with everything acknowledged.
        let head = pd.ledger.head().expect("head").0;
        let t = Instant::now();
        while backup.status().last_position < head && t.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let status = backup.status();
        // Each append is two records (the event and its audit entry).
        let lag_ms = max_lag as f64 / (2.0 * r.rps()) * 1000.0;
        println!(
            "continuous backup during {}: max lag {max_lag} records (about {lag_ms:.0} ms of appends at {:.0}/s), \
             caught up with head {head} {:.0} ms after the run, failing: {}",
            r.name,
            r.rps(),
            t.elapsed().as_secs_f64() * 1000.0,
            status.error.is_some()
        );
        assert!(status.last_position >= head, "the backup did not catch up: {} < {head}", status.last_position);
        results.push(r);
    }

    // 4, 5. read: subjects of exactly 10 events, one per connection.
    if wanted("read") {
        let f = floor.as_ref().expect("started for reads");
        let templates = (0..CONNECTIONS)
            .map(|i| Template {
                method: Method::GET,
                path: format!("/read/{i}"),
                body: Bytes::new(),
                json: false,
                bearer: None,
            })
            .collect();
        results.push(scenario("sled floor: read", &f.target, templates, warmup, measure).await);
        read_scenarios(&pd, &append_note, warmup, measure, &mut results).await;
    }
    report(&results);
    let failed: Vec<_> = results.iter().filter(|r| r.non_2xx > 0 || r.errors > 0).collect();
    if !failed.is_empty() {
        for r in &failed {
            eprintln!(
                "!!! {}: {} non-2xx, {} transport errors; first: {}",
                r.name,
                r.non_2xx,
                r.errors,
                r.first_failure.as_deref().unwrap_or("?")
            );
        }
        panic!("{} scenario(s) had failed requests: the numbers above are not valid", failed.len());
    }
}

/// The read scenarios: subjects of exactly 10 events, one per connection.
async fn read_scenarios(
    pd: &Pd,
    append_note: &str,
    warmup: Duration,
    measure: Duration,
    results: &mut Vec<ScenarioResult>,
) {
    let subjects = pd.create_subjects(CONNECTIONS).await;
    let ten = Bytes::from(
        json!({"events": (0..READ_EVENTS).map(|i| note_body(append_note, i)["events"][0].clone()).collect::<Vec<_>>()})
            .to_string(),
    );
    let mut c = connect(&pd.http).await.expect("connect to pdledger");
    for s in &subjects {
        let (status, body) =
            call(&mut c, &pd.request(Method::POST, &format!("/v1/subjects/{s}/events"), Some(&ten))).await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&body));
    }
    let (status, body) =
        call(&mut c, &pd.request(Method::GET, &format!("/v1/subjects/{}/events", subjects[0]), None)).await.unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["events"].as_array().map(Vec::len), Some(READ_EVENTS), "{v}");
    println!("read response: {} B for {READ_EVENTS} events", body.len());
    for (name, target) in [("read (http)", &pd.http), ("read (tls)", &pd.tls)] {
        let templates =
            subjects.iter().map(|s| pd.request(Method::GET, &format!("/v1/subjects/{s}/events"), None)).collect();
        results.push(scenario(name, target, templates, warmup, measure).await);
    }
    for s in &subjects {
        assert_eq!(pd.ledger.stream_version(*s).unwrap(), READ_EVENTS as u64);
    }
}

// ---------------------------------------------------------------------------------------
// Servers.

/// Where to connect, and how.
struct Target {
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsConnector>,
}

async fn echo(Json(v): Json<Value>) -> Json<Value> {
    Json(v)
}

async fn start_echo() -> Target {
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = tcp.local_addr().unwrap();
    let app = Router::new().route("/echo", post(echo));
    tokio::spawn(async move { axum::serve(tcp, app).await.expect("echo server") });
    Target { addr, tls: None }
}

/// sled alone behind a bare axum server, with the ledger's group commit: the floor under the
/// append and read scenarios.
struct Floor {
    target: Target,
}

#[derive(Clone)]
struct FloorState {
    events: sled::Tree,
    log: sled::Tree,
    index: sled::Tree,
    views: sled::Tree,
    doc: Arc<Vec<u8>>,
    audit: bool,
    next: Arc<AtomicU64>,
    syncer: std::sync::mpsc::Sender<tokio::sync::oneshot::Sender<()>>,
}

impl Floor {
    /// Opens sled as the ledger does (64 MiB cache, no background flusher: the commits flush
    /// and fsync), stores ten events for each connection's subject, starts the syncer thread.
    fn start(dir: &Path, note: &str) -> Floor {
        let db = sled::Config::new().path(dir).cache_capacity(64 << 20).flush_every_ms(None).open().expect("sled");
        let (events, log) = (db.open_tree("events").unwrap(), db.open_tree("log").unwrap());
        let (index, views) = (db.open_tree("index").unwrap(), db.open_tree("views").unwrap());
        for s in 0..CONNECTIONS as u64 {
            for i in 0..READ_EVENTS as u64 {
                let event = note_body(note, i as usize)["events"][0].to_string();
                events.insert([s.to_be_bytes(), i.to_be_bytes()].concat(), event.as_bytes()).unwrap();
            }
        }
        let data = std::fs::File::open(dir.join("db")).expect("sled's data file");
        db.flush().unwrap();
        data.sync_all().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<tokio::sync::oneshot::Sender<()>>();
        let sync_db = db.clone();
        std::thread::spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut waiting = vec![first];
                waiting.extend(rx.try_iter());
                sync_db.flush().expect("flush");
                data.sync_all().expect("fsync");
                for w in waiting {
                    let _ = w.send(());
                }
            }
        });
        let state = FloorState {
            events,
            log,
            index,
            views,
            doc: Arc::new(vec![3u8; doc_bytes()]),
            audit: std::env::var("PDLEDGER_LOAD_AUDIT").as_deref() != Ok("0"),
            next: Arc::new(AtomicU64::new(0)),
            syncer: tx,
        };
        let app = Router::new()
            .route("/append/{s}", post(floor_append))
            .route("/layout/{s}", post(floor_layout))
            .route("/read/{s}", axum::routing::get(floor_read))
            .with_state(state);
        let std_tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        std_tcp.set_nonblocking(true).unwrap();
        let tcp = TcpListener::from_std(std_tcp).unwrap();
        let addr = tcp.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(tcp, app).await.expect("floor server") });
        Floor { target: Target { addr, tls: None } }
    }
}

impl FloorState {
    async fn durable(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.syncer.send(tx).expect("syncer running");
        rx.await.expect("synced");
    }
}

/// The append's floor: the body parsed as the echo parses it, its bytes stored, made durable.
async fn floor_append(
    axum::extract::State(st): axum::extract::State<FloorState>,
    axum::extract::Path(s): axum::extract::Path<u64>,
    body: Bytes,
) -> (StatusCode, Json<Value>) {
    let v: Value = serde_json::from_slice(&body).expect("json");
    let n = st.next.fetch_add(1, Ordering::Relaxed);
    st.log.insert([s.to_be_bytes(), n.to_be_bytes()].concat(), &body[..]).expect("insert");
    st.durable().await;
    (StatusCode::CREATED, Json(json!({"version": n, "events": v["events"].as_array().map_or(0, Vec::len)})))
}

/// The append's floor with the ledger's entries for one note, at their sizes (the bytes are
/// not ours: only sled's cost of storing that many entries of that size).
async fn floor_layout(
    axum::extract::State(st): axum::extract::State<FloorState>,
    axum::extract::Path(s): axum::extract::Path<u64>,
    body: Bytes,
) -> (StatusCode, Json<Value>) {
    let v: Value = serde_json::from_slice(&body).expect("json");
    let n = st.next.fetch_add(2, Ordering::Relaxed);
    let subject = [s.to_be_bytes(), s.to_be_bytes()].concat();
    st.log.insert([b"L".as_slice(), &n.to_be_bytes()].concat(), &[1u8; 650][..]).expect("insert");
    st.index.insert([b"S".as_slice(), &subject, &n.to_be_bytes()].concat(), &n.to_be_bytes()).expect("insert");
    if st.audit {
        st.log.insert([b"L".as_slice(), &(n + 1).to_be_bytes()].concat(), &[2u8; 300][..]).expect("insert");
        st.index.insert([b"A".as_slice(), &(n + 1).to_be_bytes()].concat(), &[][..]).expect("insert");
        st.index.insert([b"B".as_slice(), &subject, &(n + 1).to_be_bytes()].concat(), &[][..]).expect("insert");
    }
    if !st.doc.is_empty() {
        st.views.insert([b"customer".as_slice(), &subject].concat(), &st.doc[..]).expect("insert");
    }
    st.durable().await;
    (StatusCode::CREATED, Json(json!({"version": n, "events": v["events"].as_array().map_or(0, Vec::len)})))
}

/// The size of the `customer` document in the layout floor: `PDLEDGER_LOAD_DOC_BYTES`, else
/// about what ten notes of the append scenario make.
fn doc_bytes() -> usize {
    std::env::var("PDLEDGER_LOAD_DOC_BYTES").map_or(5100, |s| s.parse().expect("PDLEDGER_LOAD_DOC_BYTES: bytes"))
}

/// The read's floor: ten stored events, one durable 200-byte record, then the ten.
async fn floor_read(
    axum::extract::State(st): axum::extract::State<FloorState>,
    axum::extract::Path(s): axum::extract::Path<u64>,
) -> ([(hyper::header::HeaderName, HeaderValue); 1], Vec<u8>) {
    let mut out = b"{\"events\":[".to_vec();
    for i in 0..READ_EVENTS as u64 {
        let v = st.events.get([s.to_be_bytes(), i.to_be_bytes()].concat()).expect("get").expect("stored");
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&v);
    }
    out.extend_from_slice(b"]}");
    let n = st.next.fetch_add(1, Ordering::Relaxed);
    st.log.insert([u64::MAX.to_be_bytes(), n.to_be_bytes()].concat(), &[7u8; 200][..]).expect("insert");
    st.durable().await;
    ([(CONTENT_TYPE, HeaderValue::from_static("application/json"))], out)
}

/// pdledger in-process: one ledger, served over plain HTTP and over TLS.
struct Pd {
    ledger: Arc<Ledger>,
    http: Target,
    tls: Target,
    bearer: HeaderValue,
}

impl Pd {
    async fn start(dir: &Path) -> Pd {
        let data = dir.join("data");
        let ledger = Arc::new(
            Ledger::open(OpenOptions::new(data.clone(), Keyring::Dir(dir.join("keyring")), "load"))
                .expect("open ledger"),
        );
        let auth = Arc::new(
            Auth::new(ledger.store().kv("auth").unwrap(), Default::default(), pdledger::auth::system_clock()).unwrap(),
        );
        auth.create_user(USER, PASSWORD, Role::Staff).expect("create user");
        let state = AppState::new(ledger.clone(), auth, ApiConfig { concurrency_max: 4096, ..Default::default() });
        let app = api::router(state);

        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let http = Target { addr: tcp.local_addr().unwrap(), tls: None };
        let make = app.clone().into_make_service_with_connect_info::<Peer>();
        tokio::spawn(async move { axum::serve(tcp, make).await.expect("pdledger http") });

        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let tls_addr = tcp.local_addr().unwrap();
        let (cert, key) = pdledger::serve::self_signed(&data, &tls_addr).expect("self-signed certificate");
        let config = pdledger::serve::tls_config(&cert, &key).expect("tls config");
        let listener = pdledger::serve::TlsListener::new(tcp, config).expect("tls listener");
        let make = app.into_make_service_with_connect_info::<Peer>();
        tokio::spawn(async move { axum::serve(listener, make).await.expect("pdledger tls") });
        let tls = Target { addr: tls_addr, tls: Some(client_tls(&cert)) };

        let mut c = connect(&http).await.expect("connect to pdledger");
        let login = Bytes::from(json!({"username": USER, "password": PASSWORD}).to_string());
        let (status, body) = call(&mut c, &echo_request("/v1/auth/login", &login)).await.expect("login");
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        assert_eq!(status, StatusCode::OK, "login: {v}");
        let token = v["token"].as_str().expect("token");
        let bearer = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
        Pd { ledger, http, tls, bearer }
    }

    fn request(&self, method: Method, path: &str, body: Option<&Bytes>) -> Template {
        Template {
            method,
            path: path.to_owned(),
            body: body.cloned().unwrap_or_default(),
            json: body.is_some(),
            bearer: Some(self.bearer.clone()),
        }
    }

    /// New subjects through the API, one per connection.
    async fn create_subjects(&self, n: usize) -> Vec<Uuid> {
        let mut c = connect(&self.http).await.expect("connect to pdledger");
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let (status, body) = call(&mut c, &self.request(Method::POST, "/v1/subjects", None)).await.unwrap();
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            assert_eq!(status, StatusCode::CREATED, "create subject: {v}");
            out.push(v["id"].as_str().and_then(|s| s.parse().ok()).expect("subject id"));
        }
        out
    }
}

/// A client trusting only the self-signed certificate, speaking HTTP/1.1.
fn client_tls(cert: &Path) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(cert).expect("cert.pem") {
        roots.add(c.expect("certificate")).expect("trusted root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

// ---------------------------------------------------------------------------------------
// Bodies.

/// Note text of `chars` characters (not all ASCII), like the ledger bench's.
fn note_text(chars: usize) -> String {
    "Ringde kunden angående ritningarna. ".repeat(chars / 30 + 1).chars().take(chars).collect()
}

fn note_body(text: &str, i: usize) -> Value {
    let text = format!("{i:08} {}", &text[text.char_indices().nth(9).map_or(0, |(b, _)| b)..]);
    json!({"events": [{"type": "note.added", "occurred_at": "2024-05-01", "data": {"text": text}}]})
}

/// The echo body: the append body's shape, ASCII text padded to `bytes` in all.
fn echo_payload(bytes: usize) -> Value {
    let shape =
        |text: &str| json!({"events": [{"type": "note.added", "occurred_at": "2024-05-01", "data": {"text": text}}]});
    let overhead = shape("").to_string().len();
    let text: String =
        "Called the customer about the drawings. ".repeat(bytes / 40 + 1).chars().take(bytes - overhead).collect();
    shape(&text)
}

// ---------------------------------------------------------------------------------------
// Client.

/// One request, rebuilt for every send (the body bytes are shared, not copied).
#[derive(Clone)]
struct Template {
    method: Method,
    path: String,
    body: Bytes,
    json: bool,
    bearer: Option<HeaderValue>,
}

impl Template {
    fn build(&self) -> Request<Full<Bytes>> {
        let mut r = Request::builder().method(self.method.clone()).uri(&self.path).header(HOST, "localhost");
        if self.json {
            r = r.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        if let Some(b) = &self.bearer {
            r = r.header(AUTHORIZATION, b.clone());
        }
        r.body(Full::new(self.body.clone())).expect("valid request")
    }
}

fn echo_request(path: &str, body: &Bytes) -> Template {
    Template { method: Method::POST, path: path.to_owned(), body: body.clone(), json: true, bearer: None }
}

async fn connect(t: &Target) -> Result<SendRequest<Full<Bytes>>, BoxError> {
    let tcp = TcpStream::connect(t.addr).await?;
    tcp.set_nodelay(true)?;
    match &t.tls {
        None => {
            let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            Ok(send)
        }
        Some(c) => {
            let stream = c.connect(ServerName::try_from("localhost")?, tcp).await?;
            let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            Ok(send)
        }
    }
}

/// Sends one request and reads the whole answer (so the connection can be reused).
async fn call(send: &mut SendRequest<Full<Bytes>>, t: &Template) -> Result<(StatusCode, Bytes), BoxError> {
    send.ready().await?;
    let resp = send.send_request(t.build()).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

// ---------------------------------------------------------------------------------------
// Scenarios.

struct WorkerResult {
    /// Nanoseconds, measured phase only.
    latencies: Vec<u64>,
    /// 2xx answers, warm-up included.
    ok_total: u64,
    /// Warm-up included.
    non_2xx: u64,
    errors: u64,
    first_failure: Option<String>,
    last_done: Instant,
}

struct ScenarioResult {
    name: &'static str,
    requests: u64,
    secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    ok_total: u64,
    non_2xx: u64,
    errors: u64,
    first_failure: Option<String>,
}

impl ScenarioResult {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.secs
    }
}

async fn scenario(
    name: &'static str,
    target: &Target,
    templates: Vec<Template>,
    warmup: Duration,
    measure: Duration,
) -> ScenarioResult {
    // All connections first, so handshakes are neither timed nor staggered into the run.
    let mut conns = Vec::with_capacity(templates.len());
    for _ in &templates {
        conns.push(connect(target).await.unwrap_or_else(|e| panic!("{name}: connect: {e}")));
    }
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let (warm_end, end) = (start + warmup, start + warmup + measure);
    let workers: Vec<_> = conns
        .into_iter()
        .zip(templates)
        .map(|(send, t)| {
            let target = Target { addr: target.addr, tls: target.tls.clone() };
            tokio::spawn(worker(send, target, t, warm_end, end, issued.clone()))
        })
        .collect();
    let mut all = Vec::new();
    let (mut ok_total, mut non_2xx, mut errors, mut first_failure, mut last_done) = (0, 0, 0, None, warm_end);
    for w in workers {
        let r = w.await.expect("worker panicked");
        all.extend_from_slice(&r.latencies);
        ok_total += r.ok_total;
        non_2xx += r.non_2xx;
        errors += r.errors;
        first_failure = first_failure.or(r.first_failure);
        last_done = last_done.max(r.last_done);
    }
    all.sort_unstable();
    let pct = |q: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        let i = ((q * all.len() as f64).ceil() as usize).clamp(1, all.len()) - 1;
        all[i] as f64 / 1e6
    };
    let r = ScenarioResult {
        name,
        requests: all.len() as u64,
        secs: (last_done - warm_end).as_secs_f64().max(1e-9),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        ok_total,
        non_2xx,
        errors,
        first_failure,
    };
    println!(
        "{name:>14}: {:>8} requests, {:>9.0} req/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, non-2xx {}, errors {}",
        r.requests,
        r.rps(),
        r.p50_ms,
        r.p99_ms,
        r.max_ms,
        r.non_2xx,
        r.errors
    );
    r
}

async fn worker(
    mut send: SendRequest<Full<Bytes>>,
    target: Target,
    t: Template,
    warm_end: Instant,
    end: Instant,
    issued: Arc<AtomicU64>,
) -> WorkerResult {
    let mut r = WorkerResult {
        latencies: Vec::with_capacity(16 * 1024),
        ok_total: 0,
        non_2xx: 0,
        errors: 0,
        first_failure: None,
        last_done: warm_end,
    };
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let measured = now >= warm_end;
        if measured && issued.fetch_add(1, Ordering::Relaxed) >= REQUESTS_MAX {
            break;
        }
        let t0 = Instant::now();
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT, call(&mut send, &t)).await;
        let done = Instant::now();
        if measured {
            r.latencies.push((done - t0).as_nanos() as u64);
            r.last_done = done;
        }
        match outcome {
            Ok(Ok((status, _))) if status.is_success() => r.ok_total += 1,
            Ok(Ok((status, body))) => {
                r.non_2xx += 1;
                r.first_failure.get_or_insert_with(|| format!("{status}: {}", String::from_utf8_lossy(&body)));
            }
            failed => {
                r.errors += 1;
                let e = match failed {
                    Err(_) => format!("no answer within {REQUEST_TIMEOUT:?}"),
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(_)) => unreachable!(),
                };
                r.first_failure.get_or_insert(e);
                // The connection is in an unknown state: replace it.
                match connect(&target).await {
                    Ok(s) => send = s,
                    Err(e) => {
                        r.first_failure.get_or_insert_with(|| format!("reconnect: {e}"));
                        break;
                    }
                }
            }
        }
    }
    r
}

// ---------------------------------------------------------------------------------------
// Report.

fn report(results: &[ScenarioResult]) {
    println!("\n| scenario | connections | requests | req/s | p50 ms | p99 ms | max ms | non-2xx | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        println!(
            "| {} | {CONNECTIONS} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} |",
            r.name,
            r.requests,
            r.rps(),
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.non_2xx,
            r.errors
        );
    }
    let get = |name: &str| results.iter().find(|r| r.name == name);
    println!();
    for (a, b) in [
        ("append (http)", "echo"),
        ("sled floor: append", "echo"),
        ("append (http)", "sled floor: append"),
        ("sled floor: append, ledger's entries", "echo"),
        ("append (http)", "sled floor: append, ledger's entries"),
        ("append (tls)", "append (http)"),
        ("append (http, backup)", "append (http)"),
        ("read (http)", "echo"),
        ("sled floor: read", "echo"),
        ("read (http)", "sled floor: read"),
        ("read (tls)", "read (http)"),
    ] {
        if let (Some(x), Some(y)) = (get(a), get(b)) {
            println!("{a} / {b}: throughput {:.3}x, p50 latency {:.2}x", x.rps() / y.rps(), x.p50_ms / y.p50_ms);
        }
    }
    println!("\nnon-2xx and errors include the warm-up; requests, req/s and latencies do not.");
    println!("nproc: {}", nproc());
    println!("cpu: {}", cpu_model());
}

fn nproc() -> String {
    std::process::Command::new("nproc")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or("?".into(), |n| n.to_string()))
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The file system holding `path` (from /proc/mounts): fsync costs differ widely between them.
fn fs_type(path: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fs) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(dir).then(|| (dir.len(), format!("{fs} at {dir}")))
        })
        .max_by_key(|(n, _)| *n)
        .map_or_else(|| "unknown file system".into(), |(_, s)| s)
}
