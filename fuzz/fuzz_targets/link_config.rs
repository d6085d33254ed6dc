//! `kvlink.json` link configuration: parse, bounds, validate, and the prompt plan.
//!
//! The harness is `kvlink::fuzz::link_config`, shared with tests/fuzz_corpus.rs (which replays
//! the corpus and seeded mutations of it under plain `cargo test`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kvlink::fuzz::link_config(data);
});
