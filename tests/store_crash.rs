//! Crash safety of the disk store, measured with real processes (no GPU):
//! - writers killed with SIGKILL at random moments, hundreds of times; afterwards every
//!   entry the store returns is intact and exactly the payload written for its tokens,
//!   no read sees a torn entry, and the temp files the dead writers left are pruned;
//! - 8 processes doing put/get on one store at once under a cap small enough to force
//!   eviction; no reader ever gets a wrong or torn entry, and the store ends near its cap.
//!
//! The children are this test binary run again (`--exact store_child --ignored`) with
//! the mode in the environment. Counts are printed (`cargo test --test store_crash --
//! --nocapture`).
#![cfg(unix)]

mod common;

use common::tempdir::tempdir;
use common::Rng;
use kvlink::kv::{DiskStore, DocKey, DocKv, Lookup};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

const MODEL: &str = "model:crash-test";
const TOK: &str = "tok:crash-test";
const MODE_ENV: &str = "KVLINK_STORE_CHILD_MODE";
const DIR_ENV: &str = "KVLINK_STORE_CHILD_DIR";
const SEED_ENV: &str = "KVLINK_STORE_CHILD_SEED";
const CAP_ENV: &str = "KVLINK_STORE_CHILD_CAP";
/// Documents the children write: seeds 0..UNIVERSE.
const UNIVERSE: u64 = 300;
const LAYERS: usize = 2;
const KV_DIM: usize = 128;

/// The document of `seed`: its token ids (the first is the seed, so every seed's key
/// differs) and the payload every writer stores for it.
fn doc(seed: u64) -> (Vec<u32>, DocKv) {
    let mut r = Rng::seeded(seed.wrapping_mul(0x1234_5678_9abc_def1) ^ 0xfeed);
    let n = 8 + r.below64(56) as usize;
    let mut tokens = vec![seed as u32];
    tokens.extend((1..n).map(|_| r.below64(50_000) as u32));
    let lb = n * KV_DIM * 2;
    let mut layer = || (0..lb).map(|_| r.next_u64() as u8).collect::<Vec<u8>>();
    let k = (0..LAYERS).map(|_| layer()).collect();
    let v = (0..LAYERS).map(|_| layer()).collect();
    (
        tokens,
        DocKv {
            n_tokens: n,
            n_layers: LAYERS,
            kv_dim: KV_DIM,
            k,
            v,
        },
    )
}

fn key(tokens: &[u32]) -> DocKey {
    DocKey::new(MODEL, TOK, tokens)
}

fn put(store: &DiskStore, seed: u64) -> kvlink::Result<()> {
    let (t, kv) = doc(seed);
    store.put(&key(&t), MODEL, TOK, &t, &kv)
}

/// Reads `seed` and checks what came back: `Ok(true)` for a hit with exactly the right
/// payload, `Ok(false)` for a miss, `Err` for anything else (a wrong, torn or
/// mismatched entry).
fn check(store: &DiskStore, seed: u64) -> Result<bool, String> {
    let (t, want) = doc(seed);
    match store.get(&key(&t), MODEL, TOK, &t) {
        Ok(Lookup::Hit(kv)) if kv == want => Ok(true),
        Ok(Lookup::Hit(kv)) => Err(format!("seed {seed}: WRONG payload {kv:?}")),
        Ok(Lookup::Miss) => Ok(false),
        Ok(Lookup::Corrupt(why)) => Err(format!("seed {seed}: torn/corrupt entry: {why}")),
        Ok(Lookup::Mismatch(why)) => Err(format!("seed {seed}: mismatched entry: {why}")),
        Err(e) => Err(format!("seed {seed}: read error {e}")),
    }
}

/// The child process: `writer` puts random documents until it is killed; `mixed` does
/// 600 random puts and checked gets under the cap, then prints its counts.
#[test]
#[ignore]
fn store_child() {
    let Ok(mode) = std::env::var(MODE_ENV) else {
        return;
    };
    let dir = std::env::var(DIR_ENV).unwrap();
    let seed: u64 = std::env::var(SEED_ENV).unwrap().parse().unwrap();
    let cap: u64 = std::env::var(CAP_ENV).map_or(u64::MAX, |c| c.parse().unwrap());
    let store = DiskStore::open_with_cap(&dir, cap).unwrap();
    let mut r = Rng::seeded(seed);
    match mode.as_str() {
        "writer" => loop {
            put(&store, r.below64(UNIVERSE)).unwrap();
        },
        "mixed" => {
            let (mut puts, mut hits, mut misses) = (0, 0, 0);
            for _ in 0..600 {
                let s = r.below64(UNIVERSE / 2) * 2 + (seed & 1);
                if r.below64(2) == 0 {
                    put(&store, s).unwrap();
                    puts += 1;
                } else {
                    match check(&store, s) {
                        Ok(true) => hits += 1,
                        Ok(false) => misses += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
                // Some documents are shared by all children: the same keys written and
                // read by several processes at once.
                let shared = r.below64(8);
                match check(&store, shared) {
                    Ok(true) => hits += 1,
                    Ok(false) => misses += 1,
                    Err(e) => panic!("shared {e}"),
                }
                if r.below64(4) == 0 {
                    put(&store, shared).unwrap();
                    puts += 1;
                }
            }
            println!("CHILD puts={puts} hits={hits} misses={misses}");
        }
        m => panic!("unknown child mode {m}"),
    }
}

fn spawn(mode: &str, dir: &std::path::Path, seed: u64, cap: Option<u64>) -> Child {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "store_child", "--ignored", "--nocapture"])
        .env(MODE_ENV, mode)
        .env(DIR_ENV, dir)
        .env(SEED_ENV, seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cap) = cap {
        c.env(CAP_ENV, cap.to_string());
    }
    c.spawn().unwrap()
}

fn time_seed() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[test]
fn sigkilled_writers_never_leave_a_bad_entry() {
    let td = tempdir("sigkill");
    let seed =
        std::env::var("KVLINK_CRASH_SEED").map_or_else(|_| time_seed(), |s| s.parse().unwrap());
    eprintln!("seed {seed} (KVLINK_CRASH_SEED to repeat)");
    let mut r = Rng::seeded(seed);
    let t0 = Instant::now();
    const ROUNDS: usize = 75;
    const PER_ROUND: usize = 4;
    let mut kills = 0;
    let mut exited_early = 0;
    for round in 0..ROUNDS {
        let mut kids: Vec<(Child, Duration)> = (0..PER_ROUND)
            .map(|i| {
                let c = spawn(
                    "writer",
                    td.path(),
                    seed ^ ((round * PER_ROUND + i) as u64) << 8,
                    None,
                );
                // Random moments: from during start-up to well into the writing.
                (c, Duration::from_millis(5 + r.below64(120)))
            })
            .collect();
        kids.sort_by_key(|(_, d)| *d);
        let start = Instant::now();
        for (c, at) in &mut kids {
            if let Some(left) = at.checked_sub(start.elapsed()) {
                std::thread::sleep(left);
            }
            if c.try_wait().unwrap().is_some() {
                exited_early += 1;
            } else {
                c.kill().unwrap(); // SIGKILL
                kills += 1;
            }
            c.wait().unwrap();
        }
    }
    assert_eq!(exited_early, 0, "writers must only stop by being killed");
    let kill_time = t0.elapsed();

    // Every entry the store returns is intact and exactly its document's payload.
    let store = DiskStore::inspect(td.path());
    let before = store.stats().unwrap();
    let mut hits = 0;
    for s in 0..UNIVERSE {
        if check(&store, s).unwrap_or_else(|e| panic!("{e}")) {
            hits += 1;
        }
    }
    assert_eq!(
        hits, before.entries,
        "every entry file is one of the documents"
    );
    assert!(
        hits > 0,
        "no writer got an entry written: the kills came too early"
    );

    // The dead writers' temp files: once old enough, the next open (after the children's
    // last prune is old enough too) removes them all.
    let marker = td.path().join(kvlink::kv::store::PRUNE_MARKER);
    let long_ago = SystemTime::now() - kvlink::kv::store::PRUNE_AT_OPEN_AFTER;
    if let Ok(f) = std::fs::File::options().write(true).open(&marker) {
        f.set_modified(long_ago).unwrap();
    }
    for f in walk(td.path()) {
        if f.file_name().unwrap().to_string_lossy().ends_with(".tmp") {
            let file = std::fs::File::options().write(true).open(&f).unwrap();
            file.set_modified(SystemTime::now() - Duration::from_secs(120))
                .unwrap();
        }
    }
    let store = DiskStore::open(td.path()).unwrap();
    let after = store.stats().unwrap();
    assert_eq!(
        after.tmp_files, 0,
        "temp files of dead writers left: {after:?}"
    );
    assert_eq!(after.entries, before.entries);

    // A damaged entry is never used: flip one payload byte in some, all read Corrupt.
    let mut damaged = 0;
    for s in 0..UNIVERSE {
        let (t, _) = doc(s);
        let p = store.path_for(&key(&t));
        let Ok(mut bytes) = std::fs::read(&p) else {
            continue;
        };
        let i = bytes.len() - 9 - r.below64(64) as usize;
        bytes[i] ^= 0x40;
        std::fs::write(&p, &bytes).unwrap();
        assert!(
            matches!(
                store.get(&key(&t), MODEL, TOK, &t).unwrap(),
                Lookup::Corrupt(_)
            ),
            "a damaged entry was not reported corrupt"
        );
        damaged += 1;
        if damaged == 20 {
            break;
        }
    }
    println!(
        "store_crash: {kills} writers SIGKILLed in {:.1} s; {hits} entries checked intact \
         (of {UNIVERSE} documents), 0 bad; {} temp files of dead writers pruned; {damaged} \
         damaged entries all refused",
        kill_time.as_secs_f64(),
        before.tmp_files
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn concurrent_processes_under_a_small_cap_never_read_a_wrong_entry() {
    let td = tempdir("concurrent");
    let seed = time_seed();
    eprintln!("seed {seed}");
    // The documents take about UNIVERSE * 20 KB; a quarter of that fits.
    let all: u64 = (0..UNIVERSE).map(|s| doc(s).1.bytes() as u64).sum();
    let cap = all / 4;
    let biggest = (0..UNIVERSE)
        .map(|s| doc(s).1.bytes() as u64)
        .max()
        .unwrap()
        + 4096;
    const PROCS: u64 = 8;
    let t0 = Instant::now();
    let kids: Vec<Child> = (0..PROCS)
        .map(|i| spawn("mixed", td.path(), seed.wrapping_add(i), Some(cap)))
        .collect();
    let (mut puts, mut hits, mut misses) = (0u64, 0u64, 0u64);
    for c in kids {
        let out = c.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "a child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout
            .lines()
            .find(|l| l.starts_with("CHILD "))
            .unwrap_or_else(|| panic!("child printed no counts: {stdout}"));
        for kv in line["CHILD ".len()..].split(' ') {
            let (k, v) = kv.split_once('=').unwrap();
            let v: u64 = v.parse().unwrap();
            match k {
                "puts" => puts += v,
                "hits" => hits += v,
                "misses" => misses += v,
                _ => {}
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let st = DiskStore::inspect(td.path()).stats().unwrap();
    // Every surviving entry is right.
    let mut ok = 0;
    for s in 0..UNIVERSE {
        if check(&DiskStore::inspect(td.path()), s).unwrap_or_else(|e| panic!("{e}")) {
            ok += 1;
        }
    }
    assert_eq!(ok, st.entries);
    println!(
        "store_crash: {PROCS} processes, {puts} puts, {} checked gets ({hits} hits, {misses} \
         misses), 0 wrong or torn, in {secs:.1} s; cap {cap} bytes (documents total {all}), \
         store ends at {} bytes in {} entries; {} temp files",
        hits + misses,
        st.entry_bytes,
        st.entries,
        st.tmp_files
    );
    assert!(
        st.entry_bytes <= cap + PROCS * biggest,
        "store {} bytes, cap {cap}",
        st.entry_bytes
    );
    assert!(misses > 0 && hits > 0);
    assert_eq!(st.tmp_files, 0);
}
