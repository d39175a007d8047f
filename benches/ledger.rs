//! Ledger core benchmarks, each beside the baseline it is judged against, in the same run:
//!
//! - `durable_append/*`: 64 concurrent appenders of ~500-byte events vs raw sled inserting
//!   the same bytes in batches of 64, each batch flushed and fsynced.
//! - `single_append/*`: one appender, one event per durable append vs one raw sled insert,
//!   flush and fsync.
//! - `read/*`: keyless verify and replay with decryption over a 100,000-event store.
//! - `primitives/*`: XChaCha20-Poly1305 over 512 bytes and one blake3 chain step.
//!
//! Run: `cargo bench --bench ledger` (results and the machine in docs/BENCHMARKS.md).

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pdledger::keyring::Keyring;
use pdledger::ledger::{Ledger, OpenOptions};
use serde_json::json;
use uuid::Uuid;

/// The allocator the binary runs with (`src/main.rs`), so that these figures are the server's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const APPENDERS: usize = 64;
const VALUE_BYTES: usize = 512;

fn open_ledger(dir: &Path) -> Ledger {
    Ledger::open(OpenOptions::new(dir.join("data"), Keyring::Dir(dir.join("keyring")), "bench")).unwrap()
}

/// A raw sled store configured like ours, and its data file for fsync.
fn open_raw(dir: &Path) -> (sled::Db, sled::Tree, File) {
    let db = sled::Config::new().path(dir.join("raw")).cache_capacity(64 << 20).flush_every_ms(None).open().unwrap();
    let tree = db.open_tree("t").unwrap();
    let f = File::open(dir.join("raw").join("db")).unwrap();
    (db, tree, f)
}

/// The ledger's key shapes, for the raw baselines that write the same layout.
fn raw_log_key(k: u64) -> Vec<u8> {
    [&[b'L'][..], &k.to_be_bytes()].concat()
}

fn raw_stream_key(k: u64) -> Vec<u8> {
    [&[b'S'][..], Uuid::from_u128(k as u128 % 64).as_bytes(), &k.to_be_bytes()].concat()
}

/// A note whose sealed payload is about 500 bytes.
fn note(ledger: &Ledger, i: u64) -> pdledger::writer::PreparedEvent {
    let text = format!("{i:08} {}", "Ringde kunden angående ritningarna. ".repeat(12));
    ledger.prepare("note.added", Some("2024-05-01"), json!({ "text": &text[..440] })).unwrap()
}

fn durable_append(c: &mut Criterion) {
    let mut g = c.benchmark_group("durable_append");
    g.sample_size(20).measurement_time(Duration::from_secs(10)).throughput(Throughput::Elements(APPENDERS as u64));

    g.bench_function(BenchmarkId::new("sled_raw_batch64_fsync", APPENDERS), |b| {
        let tmp = tempfile::tempdir().unwrap();
        let (db, tree, file) = open_raw(tmp.path());
        let value = vec![0x5au8; VALUE_BYTES];
        let mut k = 0u64;
        b.iter(|| {
            let mut batch = sled::Batch::default();
            for _ in 0..APPENDERS {
                k += 1;
                batch.insert(&k.to_be_bytes(), value.as_slice());
            }
            tree.apply_batch(batch).unwrap();
            db.flush().unwrap();
            file.sync_all().unwrap();
        });
    });

    // The same writes the ledger makes per event, as plain single inserts: the ~620-byte record
    // under its position, the stream-index entry, and the head once per group.
    g.bench_function(BenchmarkId::new("sled_raw_same_layout_fsync", APPENDERS), |b| {
        let tmp = tempfile::tempdir().unwrap();
        let (db, tree, file) = open_raw(tmp.path());
        let record = vec![0x5au8; 620];
        let mut k = 0u64;
        b.iter(|| {
            for _ in 0..APPENDERS {
                k += 1;
                tree.insert(raw_log_key(k), record.as_slice()).unwrap();
                tree.insert(raw_stream_key(k), k.to_be_bytes().as_slice()).unwrap();
            }
            tree.insert(b"Mhead".as_slice(), [1u8; 40].as_slice()).unwrap();
            db.flush().unwrap();
            file.sync_all().unwrap();
        });
    });

    g.bench_function(BenchmarkId::new("ledger_concurrent_appenders", APPENDERS), |b| {
        let tmp = tempfile::tempdir().unwrap();
        let ledger = Arc::new(open_ledger(tmp.path()));
        b.iter_custom(|iters| {
            // One iteration: every appender appends one event to its own subject.
            let start = Arc::new(Barrier::new(APPENDERS + 1));
            let handles: Vec<_> = (0..APPENDERS)
                .map(|t| {
                    let (ledger, start) = (ledger.clone(), start.clone());
                    std::thread::spawn(move || {
                        let subject = Uuid::new_v4();
                        let events: Vec<_> = (0..iters).map(|i| note(&ledger, i * 64 + t as u64)).collect();
                        start.wait();
                        for ev in events {
                            ledger.append(subject, None, vec![ev], "bench").unwrap();
                        }
                    })
                })
                .collect();
            start.wait();
            let t0 = Instant::now();
            for h in handles {
                h.join().unwrap();
            }
            t0.elapsed()
        });
        let (groups, fsyncs) = ledger.commit_counts();
        let (head, _) = ledger.head().unwrap();
        eprintln!(
            "  {head} events: {:.1} per group, {:.1} per fsync",
            head as f64 / groups.max(1) as f64,
            head as f64 / fsyncs.max(1) as f64
        );
    });
    // The server's shape: 64 appenders as tokio tasks on the runtime's worker threads, each
    // awaiting its acknowledgement instead of blocking an OS thread.
    g.bench_function(BenchmarkId::new("ledger_concurrent_tasks", APPENDERS), |b| {
        let tmp = tempfile::tempdir().unwrap();
        let ledger = Arc::new(open_ledger(tmp.path()));
        let rt = tokio::runtime::Builder::new_multi_thread().build().unwrap();
        b.iter_custom(|iters| {
            let tasks: Vec<_> = (0..APPENDERS)
                .map(|t| {
                    let subject = Uuid::new_v4();
                    let events: Vec<_> = (0..iters).map(|i| note(&ledger, i * 64 + t as u64)).collect();
                    (subject, events)
                })
                .collect();
            let ledger = ledger.clone();
            rt.block_on(async move {
                let t0 = Instant::now();
                let handles: Vec<_> = tasks
                    .into_iter()
                    .map(|(subject, events)| {
                        let ledger = ledger.clone();
                        tokio::spawn(async move {
                            for ev in events {
                                let op = pdledger::writer::Op::Append {
                                    subject,
                                    expected_version: None,
                                    events: vec![ev],
                                    actor: "bench".into(),
                                };
                                ledger.writer().try_submit(vec![op]).unwrap().await.unwrap().unwrap();
                            }
                        })
                    })
                    .collect();
                for h in handles {
                    h.await.unwrap();
                }
                t0.elapsed()
            })
        });
    });
    g.finish();
}

fn single_append(c: &mut Criterion) {
    let mut g = c.benchmark_group("single_append");
    g.sample_size(20).measurement_time(Duration::from_secs(8)).throughput(Throughput::Elements(1));

    g.bench_function("sled_raw_insert_flush_fsync", |b| {
        let tmp = tempfile::tempdir().unwrap();
        let (db, tree, file) = open_raw(tmp.path());
        let value = vec![0x5au8; VALUE_BYTES];
        let mut k = 0u64;
        b.iter(|| {
            k += 1;
            tree.insert(k.to_be_bytes(), value.as_slice()).unwrap();
            db.flush().unwrap();
            file.sync_all().unwrap();
        });
    });

    g.bench_function("sled_raw_batch3_flush_fsync", |b| {
        let tmp = tempfile::tempdir().unwrap();
        let (db, tree, file) = open_raw(tmp.path());
        let value = vec![0x5au8; 620];
        let mut k = 0u64;
        b.iter(|| {
            k += 1;
            let mut batch = sled::Batch::default();
            batch.insert(raw_log_key(k), value.as_slice());
            batch.insert(raw_stream_key(k), k.to_be_bytes().as_slice());
            batch.insert(b"Mhead".as_slice(), [1u8; 40].as_slice());
            tree.apply_batch(batch).unwrap();
            db.flush().unwrap();
            file.sync_all().unwrap();
        });
    });

    g.bench_function("sled_raw_insert2_flush_fsync", |b| {
        let tmp = tempfile::tempdir().unwrap();
        let (db, tree, file) = open_raw(tmp.path());
        let value = vec![0x5au8; 620];
        let mut k = 0u64;
        b.iter(|| {
            k += 1;
            tree.insert(raw_log_key(k), value.as_slice()).unwrap();
            tree.insert(raw_stream_key(k), k.to_be_bytes().as_slice()).unwrap();
            db.flush().unwrap();
            file.sync_all().unwrap();
        });
    });

    g.bench_function("ledger_one_appender", |b| {
        let tmp = tempfile::tempdir().unwrap();
        let ledger = open_ledger(tmp.path());
        let subject = Uuid::new_v4();
        let mut i = 0;
        b.iter_batched(
            || {
                i += 1;
                note(&ledger, i)
            },
            |ev| ledger.append(subject, None, vec![ev], "bench").unwrap(),
            criterion::BatchSize::SmallInput,
        );
    });
    g.finish();
}

fn read(c: &mut Criterion) {
    const N: u64 = 100_000;
    let tmp = tempfile::tempdir().unwrap();
    {
        let ledger = open_ledger(tmp.path());
        let input: Vec<u8> = {
            let mut v = vec![];
            pdledger::generate::write(&mut v, N, 1000, 5).unwrap();
            v
        };
        pdledger::import::import(&ledger, std::io::Cursor::new(input), 1000, "bench", |_| {}).unwrap();
        ledger.close().unwrap();
    }
    let mut g = c.benchmark_group("read");
    g.sample_size(10).measurement_time(Duration::from_secs(15)).throughput(Throughput::Elements(N));
    {
        let store = pdledger::store::Store::open(&tmp.path().join("data"), "bench", 64 << 20).unwrap();
        g.bench_function("verify_keyless", |b| {
            b.iter(|| {
                let r = pdledger::verify::verify(&store, None, |_| {}).unwrap();
                assert!(r.ok && r.events == N);
            });
        });
    }
    {
        let ledger = open_ledger(tmp.path());
        g.bench_function("replay_decrypt", |b| {
            b.iter(|| {
                let n = ledger.log(1).inspect(|e| assert!(e.is_ok())).count();
                assert_eq!(n as u64, N);
            });
        });
    }
    g.finish();
}

fn primitives(c: &mut Criterion) {
    let mut g = c.benchmark_group("primitives");
    g.throughput(Throughput::Elements(1));
    let key = pdledger::crypto::SubjectKey::generate().unwrap();
    let plain = vec![7u8; VALUE_BYTES];
    g.bench_function("xchacha20poly1305_seal_512B", |b| b.iter(|| key.seal(b"aad", &plain).unwrap()));
    // Poly1305's backend (see .cargo/config.toml): compare with a build without the cfg,
    // `CARGO_TARGET_DIR=target/avx2 RUSTFLAGS= cargo bench --bench ledger -- primitives/`.
    for size in [32usize, 2048, 8192] {
        let plain = vec![7u8; size];
        g.bench_function(format!("xchacha20poly1305_seal_{size}B"), |b| b.iter(|| key.seal(b"aad", &plain).unwrap()));
    }
    let master = pdledger::crypto::MasterKey::generate(1).unwrap();
    let subject = Uuid::from_u128(7);
    let wrapped = master.wrap(subject, 1, &key).unwrap();
    g.bench_function("wrap_subject_key", |b| b.iter(|| master.wrap(subject, 1, &key).unwrap()));
    g.bench_function("unwrap_subject_key", |b| b.iter(|| master.unwrap(subject, 1, &wrapped).unwrap()));
    let header = pdledger::record::Header {
        kind: pdledger::record::Kind::Sealed,
        flags: 0,
        position: 1,
        subject: Uuid::nil(),
        version: 1,
        recorded_at_ms: 0,
        key_gen: 1,
        category: 1,
        schema_version: 1,
        event_type: "note.added".into(),
        actor: "bench".into(),
    };
    let prev = pdledger::record::ChainHash::GENESIS;
    let schemas = pdledger::schema::Schemas::builtin();
    let customer = json!({"kind": "person", "name": "Erik Eriksson", "personal_number": "19810615-1502",
        "email": "ckarlsson@example.com", "phone": "0345-58 73 78",
        "address": {"street": "Backtorget 40", "postal_code": "20987", "city": "Karlskrona"}});
    g.bench_function("schema_validate_customer_registered", |b| {
        b.iter(|| schemas.validate("customer.registered", &customer).unwrap())
    });
    g.bench_function("record_encode_and_chain_528B", |b| {
        b.iter(|| pdledger::record::encode(&header, &[0; 24], &plain[..VALUE_BYTES], &prev))
    });
    g.finish();
}

/// Subject rights and views on stores of 10,000 and 100,000 events (100 events per subject on
/// the larger): a view read against reading the subject's events, the register extract, an
/// erasure (durable; it must not scan the log, so it should cost the same on both), rotation.
fn rights(c: &mut Criterion) {
    for n in [10_000u64, 100_000] {
        let tmp = tempfile::tempdir().unwrap();
        let ledger = open_ledger(tmp.path());
        let input: Vec<u8> = {
            let mut v = vec![];
            pdledger::generate::write(&mut v, n, 1000, 5).unwrap();
            v
        };
        pdledger::import::import(&ledger, std::io::Cursor::new(input), 1000, "bench", |_| {}).unwrap();
        let mut subjects: Vec<uuid::Uuid> = ledger.store().subjects().map(Result::unwrap).collect();
        let probe = subjects[0];
        let mut g = c.benchmark_group(format!("rights_{n}_events"));
        g.sample_size(20).measurement_time(Duration::from_secs(8));
        g.bench_function("read_subject_events", |b| {
            b.iter(|| assert!(!ledger.read_stream(probe, 0, usize::MAX).unwrap().is_empty()))
        });
        g.bench_function("read_view_customer", |b| {
            b.iter(|| assert!(ledger.view("customer", probe).unwrap().is_some()))
        });
        g.bench_function("export_subject", |b| {
            b.iter(|| pdledger::export::extract(&ledger, probe, 0).unwrap());
        });
        let rules = pdledger::retention::Rules::builtin();
        subjects.clear();
        // Each erasure takes a fresh subject with a registration, a project and an invoice
        // (set up outside the timing).
        g.bench_function("erase_subject_durable", |b| {
            b.iter_batched(
                || {
                    let s = Uuid::new_v4();
                    let events = vec![note(&ledger, 1), note(&ledger, 2), note(&ledger, 3)];
                    ledger.append(s, None, events, "bench").unwrap();
                    s
                },
                |s| pdledger::retention::erase(&ledger, &rules, s, "bench", "bench", 0, vec![]).unwrap().unwrap(),
                criterion::BatchSize::PerIteration,
            )
        });
        g.sample_size(10);
        g.bench_function("rotate_all_keys", |b| b.iter(|| ledger.rotate().unwrap()));
        g.finish();
    }
}

/// Key rotation's re-wrap beside raw sled doing the same writes: every subject key of a store
/// read, unwrapped, wrapped under the new generation and written back, against iterating a
/// sled tree of as many 18-byte keys and 76-byte values (a wrapped key's sizes) and
/// overwriting each. Only the re-wrap step is timed on the ledger side (`Rotated::
/// rewrap_seconds`); the index step is reported by `rights_*/rotate_all_keys`.
fn rotation(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let ledger = open_ledger(tmp.path());
    let input: Vec<u8> = {
        let mut v = vec![];
        pdledger::generate::write(&mut v, 40_000, 20_000, 7).unwrap();
        v
    };
    pdledger::import::import(&ledger, std::io::Cursor::new(input), 1000, "bench", |_| {}).unwrap();
    let keys = ledger.rotate().unwrap().keys;
    let mut g = c.benchmark_group("rotation");
    g.sample_size(10).measurement_time(Duration::from_secs(10)).throughput(Throughput::Elements(keys));
    g.bench_function(format!("rewrap_{keys}_keys"), |b| {
        b.iter_custom(|iters| {
            (0..iters).map(|_| Duration::from_secs_f64(ledger.rotate().unwrap().rewrap_seconds)).sum()
        })
    });
    let raw_dir = tempfile::tempdir().unwrap();
    let (db, tree, _) = open_raw(raw_dir.path());
    for i in 0..keys {
        let mut k = vec![b'K'];
        k.extend_from_slice(Uuid::from_u128(i as u128 * 0x9e37_79b9_7f4a_7c15).as_bytes());
        k.push(1);
        tree.insert(k, vec![7u8; 76]).unwrap();
    }
    db.flush().unwrap();
    g.bench_function(format!("sled_raw_overwrite_{keys}_values"), |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for round in 0..iters {
                for kv in tree.iter() {
                    let (k, _) = kv.unwrap();
                    tree.insert(k, vec![round as u8; 76]).unwrap();
                }
            }
            t.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, durable_append, single_append, read, primitives, rights, rotation);
criterion_main!(benches);
