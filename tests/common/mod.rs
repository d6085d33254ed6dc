//! Shared test helpers: one GPU device per test binary, a seeded RNG (splitmix64) whose
//! seed is fresh each run (printed, and overridable with KVLINK_TEST_SEED to reproduce),
//! or fixed ([`Rng::seeded`]).
#![allow(dead_code)]

use kvlink::gpu::{AdapterChoice, Gpu};
use std::sync::{Arc, OnceLock};

pub fn gpu() -> &'static Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| {
        // Quiet Mesa's "XDG_RUNTIME_DIR is invalid" on headless machines.
        if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
            std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
        }
        Gpu::new(&AdapterChoice::from_env()).expect(
            "no usable GPU adapter: install Mesa's lavapipe (apt-get install mesa-vulkan-drivers)",
        )
    })
}

pub struct Rng(u64);

impl Rng {
    pub fn new() -> Rng {
        let seed = std::env::var("KVLINK_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("test rng seed: {seed} (set KVLINK_TEST_SEED={seed} to reproduce)");
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    /// A fixed stream: the same `state` gives the same numbers in every run and process
    /// (payloads several processes must agree on, deterministic fuzzing).
    pub fn seeded(state: u64) -> Rng {
        Rng(state)
    }
    pub fn next_u64(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % n as u64) as u32
    }
    pub fn below64(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u32 + 1) as usize;
            v.swap(i, j);
        }
    }
}

pub fn rand_vec(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.unit() * scale).collect()
}

pub mod mem_shared;
pub mod model;
pub mod reference;
pub mod tempdir;

/// Max |Δ logprob| over `b`'s ten most likely tokens, and whether the argmax agrees:
/// how the tests compare two sets of next-token logits.
/// Tolerance on [`top10_diff`] between the engine and the f32 CPU reference (or between
/// two engine paths that must agree): what the f16 kernels reach plus headroom. Observed
/// on lavapipe: 0.004-0.010 against the reference on the real model, 0.003 kvlink vs the
/// masked pass; 0.05, the earlier bound, would hide a wrong position or scale on one
/// head.
pub const LOGPROB_TOL: f32 = 0.025;

pub fn top10_diff(a: &[f32], b: &[f32]) -> (f32, bool) {
    use kvlink::sampling::{argmax, log_softmax};
    let (la, lb) = (log_softmax(a), log_softmax(b));
    let mut idx: Vec<usize> = (0..lb.len()).collect();
    idx.sort_by(|&x, &y| lb[y].total_cmp(&lb[x]));
    let worst = idx[..10]
        .iter()
        .map(|&i| (la[i] - lb[i]).abs())
        .fold(0.0, f32::max);
    (worst, argmax(a) == argmax(b))
}

/// A test that cannot run on this machine (`feature` missing: "coop", "subgroups",
/// "xvfb"). Where `KVLINK_REQUIRE` names the feature (comma-separated, or "all"), that
/// is a failure: the scripts that provide the feature set it, so a feature they set up
/// can never go untested. Otherwise the skip is printed and appended to the file
/// `KVLINK_SKIP_LOG` names, which scripts/test.sh counts and prints after the run.
pub fn skip(feature: &str, test: &str, reason: &str) {
    let required = std::env::var("KVLINK_REQUIRE").unwrap_or_default();
    if required
        .split(',')
        .any(|r| r.trim() == feature || r.trim() == "all")
    {
        panic!("{test}: {reason}, but KVLINK_REQUIRE={required} requires {feature}");
    }
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(log) = std::env::var_os("KVLINK_SKIP_LOG") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open KVLINK_SKIP_LOG");
        writeln!(f, "{test} ({feature}): {reason}").expect("write KVLINK_SKIP_LOG");
    }
}
