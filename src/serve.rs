//! `pdledger serve`: the HTTP API over TLS, first start, graceful shutdown.
//!
//! TLS by default (rustls with the ring provider, TLS 1.2 and 1.3 only): a certificate given
//! with `--tls-cert/--tls-key`, or a self-signed one created on first start and kept in the
//! data directory. `--plain-http` is for a TLS-terminating proxy or tests, and only on a
//! loopback address. Shutdown on SIGTERM or Ctrl-C stops accepting, lets requests in flight
//! finish, then closes the ledger (every acknowledged append is already durable).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use crate::api::{self, ApiConfig, AppState};
use crate::audit::{Action, Entry, Outcome};
use crate::auth::{Auth, AuthConfig, Role};
use crate::ledger::Ledger;

pub const ENV_ADMIN_PASSWORD: &str = "PDLEDGER_ADMIN_PASSWORD";

pub enum Tls {
    /// Create (first start) or reuse the self-signed certificate in the data directory.
    SelfSigned,
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    Plain,
}

/// The TLS configuration: TLS 1.3 and 1.2 only, HTTP/2 and HTTP/1.1.
pub fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", cert.display());
    }
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading the private key {}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not make a usable TLS identity")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The self-signed certificate in `DATA/tls`, created on first use. Returns (cert, key).
pub fn self_signed(data: &Path, listen: &SocketAddr) -> anyhow::Result<(PathBuf, PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = data.join("tls");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(&dir)?;
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
        names.push(listen.ip().to_string());
    }
    let generated = rcgen::generate_simple_self_signed(names)?;
    std::fs::write(&cert, generated.cert.pem())?;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&key)?;
    std::io::Write::write_all(&mut f, generated.signing_key.serialize_pem().as_bytes())?;
    f.sync_all()?;
    Ok((cert, key))
}

/// SHA-256 of the first certificate in a PEM file, as `AB:CD:...`.
pub fn fingerprint(cert: &Path) -> anyhow::Result<String> {
    let der = CertificateDer::pem_file_iter(cert)?.next().context("no certificate")??;
    let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
    Ok(digest.as_ref().iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":"))
}

/// A listener that hands axum finished TLS connections. Handshakes run in their own tasks
/// (bounded in number and time), so a slow client cannot hold up the accept loop.
pub struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(1024));
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = tx.closed() => return,
                    a = tcp.accept() => a,
                };
                let (stream, addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    continue; // Too many handshakes in flight: drop the connection.
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    // Plain HTTP, old protocol versions and stalled clients end here.
                    if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                        let _ = tx.send((tls, addr)).await;
                    }
                    drop(permit);
                });
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept loop only ends once we are gone; until then, wait.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for api::Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> api::Peer {
        api::Peer(*stream.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TcpListener>> for api::Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> api::Peer {
        api::Peer(*stream.remote_addr())
    }
}

/// Creates the first admin on a data directory with no users. `None`: there were users
/// already; `Some(None)`: created with the password from the environment; `Some(Some(p))`:
/// created with a generated password, to print once.
pub fn bootstrap_admin(ledger: &Ledger, auth: &Auth) -> anyhow::Result<Option<Option<String>>> {
    if auth.has_users() {
        return Ok(None);
    }
    let (password, generated) = match std::env::var(ENV_ADMIN_PASSWORD) {
        Ok(p) if !p.is_empty() => (p, false),
        _ => {
            let bytes: [u8; 15] = crate::crypto::random_bytes()?;
            (crate::record::hex(&bytes), true)
        }
    };
    auth.create_user("admin", &password, Role::Admin)
        .context(format!("creating the first admin from {ENV_ADMIN_PASSWORD}"))?;
    let mut e = Entry::new(Action::UserCreated, None, Outcome::Ok);
    e.target = Some("admin".into());
    ledger.submit(vec![e.into_op("pdledger")])?;
    Ok(Some(generated.then_some(password)))
}

pub struct ServeOptions {
    pub listen: SocketAddr,
    pub tls: Tls,
    pub api: ApiConfig,
    pub auth: AuthConfig,
    /// Continuous backup into this directory, every `backup_interval`.
    pub backup_dir: Option<std::path::PathBuf>,
    pub backup_interval: std::time::Duration,
    pub retention: crate::retention::Rules,
    /// Time between retention runs.
    pub retention_check: std::time::Duration,
}

/// Runs the retention rules now and then: shreds expired holds, then asks for a rotation.
async fn retention_loop(state: AppState, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let (ledger, rules) = (state.ledger.clone(), state.retention.clone());
        let done = tokio::task::spawn_blocking(move || {
            crate::retention::run(&ledger, &rules, crate::time::now_ms(), "retention")
        })
        .await;
        match done {
            Ok(Ok(d)) if !d.is_empty() => {
                tracing::info!(shredded = d.len(), "retention run shredded expired categories");
                state.rotation.request();
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "retention run failed; retrying at the next check"),
            Err(e) => tracing::error!(error = %e, "retention run panicked"),
        }
    }
}

/// The control socket in the data directory: `pdledger backup` talks to a running server
/// through it. Mode 0600 in a 0700 directory: whoever may use it can read the data anyway.
pub const CONTROL_SOCKET: &str = "pdledger.sock";

/// Serves one-off backups to local tools: a JSON line `{"command":"backup","dest":PATH}` in,
/// a JSON line out.
async fn control(listener: tokio::net::UnixListener, ledger: Arc<Ledger>) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let ledger = ledger.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut r = BufReader::new(r.take(64 * 1024));
            if r.read_line(&mut line).await.is_err() {
                return;
            }
            #[derive(serde::Deserialize)]
            struct Req {
                command: String,
                dest: std::path::PathBuf,
            }
            let reply = match serde_json::from_str::<Req>(&line) {
                Ok(req) if req.command == "backup" => {
                    let l = ledger.clone();
                    let done = tokio::task::spawn_blocking(move || {
                        let head = l.durable();
                        let keys = l.key_table(head)?;
                        let mut w = crate::backup::BackupWriter::open(&req.dest)?;
                        crate::backup::ship(l.store(), head, &mut w, Some(&keys))?;
                        Ok::<_, crate::backup::BackupError>(w.manifest().clone())
                    })
                    .await;
                    let outcome = match &done {
                        Ok(Ok(_)) => crate::audit::Outcome::Ok,
                        _ => crate::audit::Outcome::Failed,
                    };
                    let entry = crate::audit::Entry::new(crate::audit::Action::Backup, None, outcome).into_op("local");
                    let l = ledger.clone();
                    let _ = tokio::task::spawn_blocking(move || l.submit(vec![entry])).await;
                    match done {
                        Ok(Ok(m)) => serde_json::json!({"ok": true, "manifest": m}),
                        Ok(Err(e)) => serde_json::json!({"ok": false, "error": e.to_string()}),
                        Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
                    }
                }
                _ => serde_json::json!({"ok": false, "error": "expected {\"command\":\"backup\",\"dest\":PATH}"}),
            };
            let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
        });
    }
}

/// Runs the server until SIGTERM or Ctrl-C. Prints the address, the certificate's
/// fingerprint and how to log in.
pub async fn serve(ledger: Ledger, opts: ServeOptions, data: &Path) -> anyhow::Result<()> {
    if matches!(opts.tls, Tls::Plain) && !opts.listen.ip().is_loopback() {
        bail!(
            "--plain-http is refused on {}: use it only on a loopback address, behind a TLS-terminating proxy",
            opts.listen
        );
    }
    let ledger = Arc::new(ledger);
    let auth = Arc::new(Auth::new(ledger.store().kv("auth")?, opts.auth, crate::auth::system_clock())?);
    let generated = {
        let (l, a) = (ledger.clone(), auth.clone());
        tokio::task::spawn_blocking(move || bootstrap_admin(&l, &a)).await??
    };
    let mut state = AppState::new(ledger.clone(), auth, opts.api);
    state.retention = Arc::new(opts.retention);
    let mut banner_backup = String::new();
    if let Some(dir) = &opts.backup_dir {
        let c = crate::backup::Continuous::spawn(ledger.clone(), dir, opts.backup_interval)
            .with_context(|| format!("starting continuous backup into {}", dir.display()))?;
        banner_backup = format!(
            "Continuous backup: {} (every {} ms; keep the keyring, {}, backed up separately)\n",
            dir.display(),
            opts.backup_interval.as_millis(),
            "replaced at every rotation"
        );
        state = state.with_backup(c);
    }
    let socket = data.join(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&socket);
    let control_listener =
        tokio::net::UnixListener::bind(&socket).with_context(|| format!("control socket {}", socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    }
    let control_task = tokio::spawn(control(control_listener, ledger.clone()));
    let retention_task = tokio::spawn(retention_loop(state.clone(), opts.retention_check));
    let app = api::router(state).into_make_service_with_connect_info::<api::Peer>();
    let tcp = TcpListener::bind(opts.listen).await.with_context(|| format!("listening on {}", opts.listen))?;
    let local = tcp.local_addr()?;

    let scheme = if matches!(opts.tls, Tls::Plain) { "http" } else { "https" };
    let host = if local.ip().is_loopback() || local.ip().is_unspecified() {
        format!("localhost:{}", local.port())
    } else {
        local.to_string()
    };
    let url = format!("{scheme}://{host}");
    let mut banner = format!("pdledger {} serving {url}\n", env!("CARGO_PKG_VERSION"));
    banner += &banner_backup;
    let server_tls = match &opts.tls {
        Tls::Plain => None,
        Tls::SelfSigned => {
            let (cert, key) = self_signed(data, &local)?;
            banner += &format!(
                "TLS: self-signed certificate {}\n     SHA-256 fingerprint {}\n",
                cert.display(),
                fingerprint(&cert)?
            );
            Some((tls_config(&cert, &key)?, Some(cert)))
        }
        Tls::Files { cert, key } => {
            banner +=
                &format!("TLS: certificate {}\n     SHA-256 fingerprint {}\n", cert.display(), fingerprint(cert)?);
            Some((tls_config(cert, key)?, None))
        }
    };
    let curl_tls = match &server_tls {
        Some((_, Some(cert))) => format!("--cacert {} ", cert.display()),
        _ => String::new(),
    };
    match &generated {
        Some(Some(p)) => {
            banner += &format!("First start: created user `admin` with password {p}\n  (shown once, stored only as a hash: write it down now)\n")
        }
        Some(None) => banner += &format!("First start: created user `admin` with the password in {ENV_ADMIN_PASSWORD}.\n"),
        None => {}
    }
    banner += &format!(
        "Log in:\n  curl {curl_tls}-H 'content-type: application/json' -d '{{\"username\":\"admin\",\"password\":\"...\"}}' {url}/v1/auth/login\n\
         Then send the token: -H 'authorization: Bearer pdl_...'. API reference: {url}/openapi.json\n"
    );
    // The handlers are in place before anyone is told the server is up: a SIGTERM right
    // after the banner is a graceful stop, never the default kill.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    print!("{banner}");
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::info!("shutting down: finishing requests in flight");
    };
    match server_tls {
        None => axum::serve(tcp, app).with_graceful_shutdown(shutdown).await?,
        Some((config, _)) => axum::serve(TlsListener::new(tcp, config)?, app).with_graceful_shutdown(shutdown).await?,
    }
    // Requests are done; the writer drains its queue and the store syncs as the ledger drops.
    control_task.abort();
    retention_task.abort();
    let _ = control_task.await;
    let _ = retention_task.await;
    let _ = std::fs::remove_file(&socket);
    match Arc::try_unwrap(ledger) {
        Ok(l) => l.close()?,
        Err(l) => drop(l),
    }
    println!("pdledger stopped");
    Ok(())
}
