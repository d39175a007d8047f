//! What sled 0.34 itself costs, without pdledger: the floors under two of the goals.
//!
//! - `memory`: sled's memory for a growing store. Entries are inserted with a 1 MiB cache (a
//!   flush every 64 inserts, like the ledger's commits) in two patterns: sequential keys with
//!   420-byte values (the log's records) and small entries at random places (the indexes).
//!   The RSS is printed at every step and the growth per million entries after the first:
//!   sled keeps a record in memory for every page of a tree, cached or not, so memory grows
//!   with what the store holds whatever the cache size.
//! - `copy`: the restore's floor. Every entry of every tree of a data directory (one not in
//!   use, for example what `pdledger restore` just wrote) is read into memory, then written
//!   into a fresh sled database in key order by two threads over contiguous halves of each
//!   tree, and flushed: the same entries and bytes a restore must write, with no decoding,
//!   no crypto and no verification. Three rounds, the median printed.
//!
//! Run: `cargo bench --bench sled_floor` (memory, about a minute and a half);
//! `PDLEDGER_FLOOR_DATA=DIR cargo bench --bench sled_floor` adds the copy of DIR's store.
//! `PDLEDGER_FLOOR_ENTRIES` sets the entries per memory pattern (default 2,000,000).

use std::path::Path;
use std::time::Instant;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_mb() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: f64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("statm's second field");
    pages * 4096.0 / (1024.0 * 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Inserts `n` entries into a fresh database with a 1 MiB cache; returns the growth in MB per
/// million entries after the first million.
fn memory(dir: &Path, n: u64, value_len: usize, random: bool) -> f64 {
    let _ = std::fs::remove_dir_all(dir);
    let db = sled::Config::new().path(dir).cache_capacity(1 << 20).flush_every_ms(None).open().expect("sled opens");
    let tree = db.open_tree("t").expect("a tree");
    let value = vec![7u8; value_len];
    let started = Instant::now();
    let mut at_first_million = None;
    for i in 0..n {
        let key = if random {
            // 70,000 prefixes (the subjects of the million-event store), then a counter.
            let prefix = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % 70_000;
            [prefix.to_be_bytes(), i.to_be_bytes()].concat()
        } else {
            i.to_be_bytes().to_vec()
        };
        tree.insert(key, &value[..]).expect("insert");
        if i % 64 == 0 {
            db.flush().expect("flush");
        }
        if i > 0 && i % 500_000 == 0 {
            let rss = rss_mb();
            println!("  {i:>9} entries: RSS {rss:.0} MB ({:.1} s)", started.elapsed().as_secs_f64());
            if i == 1_000_000 {
                at_first_million = Some(rss);
            }
        }
    }
    db.flush().expect("flush");
    let end = rss_mb();
    println!("  {n:>9} entries: RSS {end:.0} MB ({:.1} s)", started.elapsed().as_secs_f64());
    drop(tree);
    drop(db);
    let _ = std::fs::remove_dir_all(dir);
    match at_first_million {
        Some(first) if n > 1_000_000 => (end - first) / ((n - 1_000_000) as f64 / 1e6),
        _ => f64::NAN,
    }
}

type Entries = Vec<(sled::IVec, sled::IVec)>;

/// Writes every tree's entries into a fresh database by `threads` threads over contiguous
/// parts of each tree; returns the seconds to the end of the flush.
fn copy_once(trees: &[(sled::IVec, Entries)], dir: &Path, threads: usize) -> f64 {
    let _ = std::fs::remove_dir_all(dir);
    let db = sled::Config::new().path(dir).cache_capacity(64 << 20).flush_every_ms(None).open().expect("sled opens");
    let started = Instant::now();
    for (name, entries) in trees {
        let tree = db.open_tree(name).expect("a tree");
        let per = entries.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            for part in entries.chunks(per) {
                let tree = tree.clone();
                s.spawn(move || {
                    for (k, v) in part {
                        tree.insert(k, v.clone()).expect("insert");
                    }
                });
            }
        });
    }
    db.flush().expect("flush");
    let secs = started.elapsed().as_secs_f64();
    drop(db);
    let _ = std::fs::remove_dir_all(dir);
    secs
}

fn main() {
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let n: u64 = std::env::var("PDLEDGER_FLOOR_ENTRIES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000_000);
    // Each pattern in a process of its own (this program again), so that neither starts with
    // memory the other left to the allocator.
    if let Ok(pattern) = std::env::var("PDLEDGER_FLOOR_PATTERN") {
        let growth = match pattern.as_str() {
            "sequential" => memory(&scratch.path().join("seq"), n, 420, false),
            _ => memory(&scratch.path().join("rand"), n, 8, true),
        };
        println!("growth {growth}");
        return;
    }
    println!("memory: sled 0.34 with a 1 MiB cache, {n} entries a pattern, each in a fresh process");
    let run = |pattern: &str| -> f64 {
        let out = std::process::Command::new(std::env::current_exe().expect("this program"))
            .env("PDLEDGER_FLOOR_PATTERN", pattern)
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("the pattern's process runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut growth = f64::NAN;
        for line in text.lines() {
            match line.strip_prefix("growth ") {
                Some(g) => growth = g.parse().unwrap_or(f64::NAN),
                None => println!("{line}"),
            }
        }
        growth
    };
    println!(" sequential keys, 420-byte values:");
    let seq = run("sequential");
    println!(" random places, 8-byte values:");
    let rand = run("random");
    println!(
        "memory: growth after the first million entries: {seq:.1} MB per million sequential 420-byte entries, \
         {rand:.1} MB per million small entries at random places"
    );

    let Some(data) = std::env::var_os("PDLEDGER_FLOOR_DATA") else {
        println!("copy: skipped (PDLEDGER_FLOOR_DATA=DIR: a data directory not in use, e.g. a fresh restore)");
        return;
    };
    let store = Path::new(&data).join("store");
    let trees: Vec<(sled::IVec, Entries)> = {
        let db = sled::Config::new().path(&store).open().expect("the data directory's store opens");
        db.tree_names()
            .into_iter()
            .map(|name| {
                let tree = db.open_tree(&name).expect("a tree");
                let entries: Entries = tree.iter().collect::<Result<_, _>>().expect("the tree reads");
                (name, entries)
            })
            .collect()
    };
    let entries: usize = trees.iter().map(|(_, e)| e.len()).sum();
    let bytes: usize = trees.iter().flat_map(|(_, e)| e.iter().map(|(k, v)| k.len() + v.len())).sum();
    for (name, e) in &trees {
        println!("copy: tree {:?}: {} entries", String::from_utf8_lossy(name), e.len());
    }
    let rounds: Vec<f64> = (0..3).map(|_| copy_once(&trees, &scratch.path().join("copy"), 2)).collect();
    println!(
        "copy: {entries} entries, {} MB, written by 2 threads in key order and flushed: {:.2?} s, median {:.2} s",
        bytes >> 20,
        rounds,
        median(rounds.clone())
    );
}
