//! The cargo-fuzz targets, replayed on stable under plain `cargo test` (so in CI): every
//! file of `fuzz/corpus/<target>/` goes through the target's harness (`kvlink::fuzz`,
//! the same code the libFuzzer binaries in `fuzz/` call), then a bounded, seeded set of
//! mutations of those files (bit flips, interesting integers and numbers, inserted,
//! deleted, duplicated and spliced ranges, truncation). A harness that panics (a parser
//! panics, or accepts something inconsistent) fails the test; the input is written to
//! `target/tmp/fuzz-failures/` (replay: `cargo +nightly fuzz run <target> <file>` in
//! `fuzz/`).
//!
//! Deterministic: the mutations come from a fixed seed. `KVLINK_FUZZ_SEED=N` explores
//! others, `KVLINK_FUZZ_MUTATIONS=N` sets the count per target (see FUZZING.md).

mod common;

use common::tempdir::tempdir;
use common::Rng;
use kvlink::fuzz::{self, TARGETS};
use std::path::{Path, PathBuf};
use std::time::Instant;

const DEFAULT_SEED: u64 = 0x6b76_6c69_6e6b_f022;

/// Mutated inputs per target by default: a few seconds each in a debug build on one
/// core. `hf_model` writes and maps a model folder per input, so it gets fewer.
fn default_mutations(target: &str) -> usize {
    match target {
        "hf_model" => 2_000,
        "gguf_tokenizer" | "lora_adapter" => 10_000,
        _ => 20_000,
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = root().join("fuzz/corpus").join(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus folder {}: {e}", dir.display()))
        .map(|f| {
            let p = f.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seed corpus in {}", dir.display());
    files
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
    )
}

const INTERESTING_U32: [u32; 12] = [
    0,
    1,
    2,
    7,
    255,
    256,
    1 << 16,
    1 << 24,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
];
const INTERESTING_U64: [u64; 8] = [
    0,
    1,
    1 << 32,
    1 << 40,
    1 << 62,
    i64::MAX as u64,
    u64::MAX - 1,
    u64::MAX,
];
/// Replacements for a run of digits in text (JSON) inputs.
const INTERESTING_NUMBERS: [&str; 12] = [
    "0",
    "-1",
    "1",
    "65536",
    "4294967296",
    "18446744073709551616",
    "99999999999999999999999",
    "1e309",
    "-0",
    "0.5",
    "2147483648",
    "nan",
];

/// One mutated input: 1 to 4 stacked edits of `input`, drawing on `others` (the rest of
/// the target's corpus) for splices.
fn mutate(rng: &mut Rng, input: &[u8], others: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut d = input.to_vec();
    // 1 edit half the time, 2 a quarter, up to 4: most mutants stay close enough to
    // their seed to get past the first checks.
    let edits = 1 + rng.next_u64().trailing_zeros().min(3);
    for _ in 0..edits {
        let len = d.len();
        let pos = |rng: &mut Rng| rng.below64(len.max(1) as u64) as usize;
        match rng.below(11) {
            0 if len > 0 => {
                let i = pos(rng);
                d[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = pos(rng);
                d[i] = [0, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'9'][rng.below(8) as usize];
            }
            2 if len > 0 => {
                let i = pos(rng);
                d[i] = rng.next_u64() as u8;
            }
            3 if len >= 4 => {
                let i = rng.below64((len - 3) as u64) as usize;
                let v = INTERESTING_U32[rng.below(INTERESTING_U32.len() as u32) as usize];
                d[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            4 if len >= 8 => {
                let i = rng.below64((len - 7) as u64) as usize;
                let v = INTERESTING_U64[rng.below(INTERESTING_U64.len() as u32) as usize];
                d[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            5 if len > 0 => {
                let i = pos(rng);
                let n = 1 + rng.below64(64.min(len - i) as u64) as usize;
                d.drain(i..i + n.min(len - i));
            }
            6 => {
                let i = rng.below64(len as u64 + 1) as usize;
                let n = 1 + rng.below(32) as usize;
                let bytes = rng.bytes(n);
                d.splice(i..i, bytes);
            }
            7 if len > 0 => {
                let a = pos(rng);
                let n = 1 + rng.below64(256.min(len - a) as u64) as usize;
                let chunk = d[a..a + n].to_vec();
                let at = rng.below64(len as u64 + 1) as usize;
                d.splice(at..at, chunk);
            }
            8 if len > 0 => d.truncate(pos(rng)),
            9 if !others.is_empty() => {
                // Our head, another seed's tail.
                let o = &others[rng.below(others.len() as u32) as usize].1;
                let cut = rng.below64(len as u64 + 1) as usize;
                let from = rng.below64(o.len() as u64 + 1) as usize;
                d.truncate(cut);
                d.extend_from_slice(&o[from..]);
            }
            10 => {
                // A number in text (JSON) becomes an interesting one.
                let from = pos(rng);
                if let Some(i) = (from..len).find(|&i| d[i].is_ascii_digit()) {
                    let mut j = i;
                    while j < len && d[j].is_ascii_digit() {
                        j += 1;
                    }
                    let n =
                        INTERESTING_NUMBERS[rng.below(INTERESTING_NUMBERS.len() as u32) as usize];
                    d.splice(i..j, n.bytes());
                }
            }
            _ => {}
        }
    }
    d
}

/// Runs one input: whether it got past the target's main parser; on a panic, saves the
/// input and says where.
fn check(target: &str, label: &str, data: &[u8], scratch: &Path) -> Result<bool, String> {
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        fuzz::run(target, data, scratch).unwrap_or_else(|| panic!("unknown target {target}"))
    }));
    if let Ok(parsed) = run {
        return Ok(parsed);
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!("{target}-{label}"));
    let saved = match std::fs::write(&file, data) {
        Ok(()) => format!("saved to {}", file.display()),
        Err(e) => format!("could not save it to {}: {e}", file.display()),
    };
    Err(format!("{target} {label}: panicked ({saved})"))
}

fn replay(target: &str) {
    let t0 = Instant::now();
    let seeds = corpus(target);
    let seed = env_u64("KVLINK_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let n = env_u64("KVLINK_FUZZ_MUTATIONS")
        .map(|n| n as usize)
        .unwrap_or_else(|| default_mutations(target));
    let scratch = tempdir(&format!("fuzz-{target}"));
    let mut failures = Vec::new();
    let mut seeds_parsed = 0;
    for (name, data) in &seeds {
        match check(target, &format!("seed-{name}"), data, scratch.path()) {
            Ok(parsed) => seeds_parsed += parsed as usize,
            Err(e) => failures.push(e),
        }
    }
    // Each target its own stream, so adding one does not change the others' inputs.
    let mut parsed = 0;
    let mut rng = Rng::seeded(seed ^ kvlink::kv::checksum64(target.as_bytes()));
    for i in 0..n {
        if failures.len() >= 5 {
            break;
        }
        let (_, input) = &seeds[rng.below(seeds.len() as u32) as usize];
        let data = mutate(&mut rng, input, &seeds);
        match check(
            target,
            &format!("seed{seed}-mutation{i}"),
            &data,
            scratch.path(),
        ) {
            Ok(p) => parsed += p as usize,
            Err(e) => failures.push(e),
        }
    }
    eprintln!(
        "fuzz corpus {target}: {} seeds ({seeds_parsed} parsed) and {n} mutations ({parsed} \
         parsed; seed {seed}) in {:.1} s",
        seeds.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} failing input(s) (first 5 at most):\n{}\nreplay with KVLINK_FUZZ_SEED={seed}",
        failures.len(),
        failures.join("\n")
    );
    // Inputs that the main parser refuses test little beyond it: some seeds must get
    // through (a format change that leaves them all behind shows here: rerun
    // fuzz/make_corpus.py; some seeds are meant to fail, e.g. a bad checksum), and so
    // must a share of the mutations.
    assert!(
        seeds_parsed > 0,
        "{target}: the parser refuses every seed: regenerate fuzz/corpus (fuzz/make_corpus.py)"
    );
    assert!(
        parsed * 100 >= n,
        "{target}: only {parsed} of {n} mutations got past the parser"
    );
}

#[test]
fn gguf() {
    replay("gguf");
}

#[test]
fn gguf_tokenizer() {
    replay("gguf_tokenizer");
}

#[test]
fn hf_model() {
    replay("hf_model");
}

#[test]
fn kv_entry() {
    replay("kv_entry");
}

#[test]
fn link_config() {
    replay("link_config");
}

#[test]
fn lora_adapter() {
    replay("lora_adapter");
}

/// Every cargo-fuzz binary has a harness here, a seed corpus, and calls the shared
/// harness (no copy of its logic of its own); every harness has a binary.
#[test]
fn targets_match_the_fuzz_crate() {
    let manifest = std::fs::read_to_string(root().join("fuzz/Cargo.toml")).unwrap();
    let mut bins: Vec<&str> = manifest
        .split("[[bin]]")
        .skip(1)
        .filter_map(|b| {
            b.lines()
                .find_map(|l| l.trim().strip_prefix("name = "))
                .map(|n| n.trim_matches('"'))
        })
        .collect();
    bins.sort();
    let mut want = TARGETS.to_vec();
    want.sort();
    assert_eq!(
        bins, want,
        "fuzz/Cargo.toml's [[bin]]s vs kvlink::fuzz::TARGETS"
    );
    for t in TARGETS {
        let src = std::fs::read_to_string(root().join(format!("fuzz/fuzz_targets/{t}.rs")))
            .unwrap_or_else(|e| panic!("fuzz/fuzz_targets/{t}.rs: {e}"));
        assert!(
            src.contains(&format!("kvlink::fuzz::{t}(")),
            "fuzz/fuzz_targets/{t}.rs does not call kvlink::fuzz::{t}"
        );
        assert!(!corpus(t).is_empty());
    }
    assert!(fuzz::run("no_such_target", b"", Path::new(".")).is_none());
}
