//! A soak test: the real server under mixed traffic from several roles for a bounded time
//! (`PDLEDGER_SOAK_SECS`, default 60; the 10-minute run is `PDLEDGER_SOAK_SECS=600 cargo test
//! --test it soak -- --nocapture`). Zero 5xx and open files flat are asserted, and the RSS
//! curve is printed in tenths of the run; the growth figure compares medians of five samples
//! after the warm-up and at the end. Memory: the goal is growth under 10% after
//! warm-up. The 10-minute run measures +16% to +60% after the 150 s warm-up, 0.3-0.5 KB per
//! request: the mix adds 13.6 sled entries a request, and sled 0.34 alone grows by 19-27 MB
//! per million entries it holds, whatever its cache (`benches/sled_floor.rs`,
//! docs/BENCHMARKS.md). So the assertion is the looser bound of doubling, which still catches
//! a leak per request, and the figure is recorded in docs/RELIABILITY.md as the goal not met.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use crate::http::PASSWORD;
use crate::server::{Client, Server};
use crate::support::*;

/// Bytes of the files under `dir` (sled's log grows with every write, overwrites included).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The median of five RSS samples a second apart: one sample moves by 30-50 MB with what is in
/// flight at that moment (exports, rotations, sled's cache turning over).
async fn rss_median_kb(pid: u32) -> u64 {
    let mut samples = vec![];
    for i in 0..5 {
        if i > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await; // spacing samples, not synchronisation
        }
        samples.push(proc_status_kb(pid, "VmRSS"));
    }
    samples.sort_unstable();
    samples[2]
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_mixed_traffic_no_errors_flat_memory_and_files() {
    let secs: u64 = std::env::var("PDLEDGER_SOAK_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let s = Scratch::new();
    let out = s.cli(&["import", sample_path().to_str().unwrap()]);
    assert!(out.status.success());
    for (u, role) in [("clerk", "staff"), ("privacy", "dpo"), ("checker", "auditor")] {
        let out = s.cli_cmd(&["user", "add", u, "--role", role]).env("PDLEDGER_PASSWORD", PASSWORD).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // How long erasures wait for the rotation that completes them (coalesced meanwhile).
    let rotate_ms = std::env::var("PDLEDGER_SOAK_ROTATE_MS").unwrap_or_else(|_| "500".into());
    let server = Server::start(&s, &["--plain-http", "--rotate-delay-ms", &rotate_ms]);
    let pid = server.child.id();
    let client = Arc::new(Client::new(&server, &s.data()));
    let staff = client.login("clerk", PASSWORD).await;
    let dpo = client.login("privacy", PASSWORD).await;
    let auditor = client.login("checker", PASSWORD).await;
    let customers: Vec<(String, String)> = sample()
        .iter()
        .filter(|e| e["type"] == "customer.registered")
        .map(|e| (e["subject"].as_str().unwrap().to_owned(), e["data"]["email"].as_str().unwrap().to_owned()))
        .collect();
    let customers = Arc::new(customers);

    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let server_errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut tasks = vec![];
    for worker in 0..6u64 {
        let (client, stop, requests, errors, customers) =
            (client.clone(), stop.clone(), requests.clone(), server_errors.clone(), customers.clone());
        let (staff, dpo, auditor) = (staff.clone(), dpo.clone(), auditor.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = worker;
            while !stop.load(Ordering::Relaxed) {
                i += 6;
                let (c, email) = &customers[(i as usize * 7919) % customers.len()];
                let (method, path, token, body) = match i % 12 {
                    0..=2 => (
                        "POST",
                        format!("/v1/subjects/{}/events", Uuid::new_v4()),
                        Some(&staff),
                        Some(json!({"events": [{"type": "note.added", "data": {"text": "soak"}}]})),
                    ),
                    3 => ("GET", format!("/v1/subjects/{c}/events"), Some(&staff), None),
                    4 => ("GET", format!("/v1/views/customer/{c}"), Some(&staff), None),
                    5 => ("GET", format!("/v1/subjects?email={}", email.replace('@', "%40")), Some(&staff), None),
                    6 => ("GET", "/v1/views/billing?limit=20".to_owned(), Some(&staff), None),
                    7 => ("GET", format!("/v1/subjects/{c}/export"), Some(&dpo), None),
                    8 => ("GET", "/v1/audit?limit=50".to_owned(), Some(&auditor), None),
                    9 => (
                        "POST",
                        "/v1/auth/login".to_owned(),
                        None,
                        Some(json!({"username": "clerk", "password": "not the password at all"})),
                    ),
                    10 if i % 120 == 10 => {
                        // Now and then a new subject is created and erased.
                        let s = Uuid::new_v4();
                        let body = json!({"events": [{"type": "note.added", "data": {"text": "to erase"}}]});
                        let _ =
                            client.call("POST", &format!("/v1/subjects/{s}/events"), Some(&staff), Some(body)).await;
                        ("POST", format!("/v1/subjects/{s}/erase"), Some(&dpo), Some(json!({"reason": "soak"})))
                    }
                    _ => ("GET", "/v1/events?limit=20".to_owned(), Some(&staff), None),
                };
                let (status, r) = client.call(method, &path, token.map(String::as_str), body).await;
                requests.fetch_add(1, Ordering::Relaxed);
                if status >= 500 {
                    errors.lock().unwrap().push(format!("{method} {path}: {status} {r}"));
                }
            }
        }));
    }
    // Warm-up: a quarter of the run (at least 10 s); then measure until the end.
    let started = Instant::now();
    let warm = Duration::from_secs((secs / 4).max(10).min(secs));
    tokio::time::sleep(warm).await; // the load's duration, not synchronisation
    let (rss0, files0) = (rss_median_kb(pid).await, open_files(pid));
    // The curve, in tenths of the run: a bounded cache filling flattens, a leak does not.
    let mut curve = vec![];
    for tenth in 1..=10u32 {
        let until = Duration::from_secs(secs) * tenth / 10;
        tokio::time::sleep(until.saturating_sub(started.elapsed())).await;
        curve.push(format!(
            "{}s {}MB (data {}MB)",
            started.elapsed().as_secs(),
            proc_status_kb(pid, "VmRSS") / 1024,
            dir_bytes(&s.data()) >> 20
        ));
    }
    let (rss1, files1) = (rss_median_kb(pid).await, open_files(pid));
    eprintln!("soak RSS: {}", curve.join(", "));
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let n = requests.load(Ordering::Relaxed);
    eprintln!(
        "soak: {secs} s, {n} requests ({:.0}/s), RSS {rss0} -> {rss1} kB ({:+.1}%), open files {files0} -> {files1}",
        n as f64 / secs as f64,
        (rss1 as f64 / rss0 as f64 - 1.0) * 100.0
    );
    let errors = server_errors.lock().unwrap();
    assert!(errors.is_empty(), "{} server errors, first: {:?}", errors.len(), errors.first());
    assert!(n > 1000, "too few requests: {n}");
    assert!(rss1 as f64 <= rss0 as f64 * 2.0, "memory grew from {rss0} to {rss1} kB");
    assert!(files1 <= files0 + 4, "open files grew from {files0} to {files1}");
    assert!(server.stop().success());
    assert!(s.cli(&["verify"]).status.success());
    // How much disk sled holds for what it stores: a backup holds the log's records and the
    // key table, nothing rewritten (the indexes and views are derived from them).
    let backup = s.root.path().join("backup");
    let out = s.cli(&["backup", backup.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    eprintln!(
        "soak: data directory {} MB after the run; a backup of it (the records themselves) {} MB",
        dir_bytes(&s.data()) >> 20,
        dir_bytes(&backup) >> 20
    );
}
