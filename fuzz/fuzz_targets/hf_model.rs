//! HF model folders: config.json, SEP, model.safetensors (see kvlink::fuzz::split),
//! written to a per-process temp folder because HfModel reads a folder.
//!
//! The harness is `kvlink::fuzz::hf_model`, shared with tests/fuzz_corpus.rs (which replays
//! the corpus and seeded mutations of it under plain `cargo test`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| std::env::temp_dir().join(format!("kvlink-fuzz-hf-{}", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    kvlink::fuzz::hf_model(data, dir());
});
