//! The disk store's entry reader. Input: one flag byte (bit 0: rewrite the trailing
//! checksum to the right one first; bit 1: no token ids), then the entry bytes.
//!
//! The harness is `kvlink::fuzz::kv_entry`, shared with tests/fuzz_corpus.rs (which replays
//! the corpus and seeded mutations of it under plain `cargo test`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kvlink::fuzz::kv_entry(data);
});
