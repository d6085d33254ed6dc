//! The GGUF reader: header, metadata, tensor table, dequantization, and the model view
//! (config from metadata, HF names, Q/K unpermute) over arbitrary bytes.
//!
//! The harness is `kvlink::fuzz::gguf`, shared with tests/fuzz_corpus.rs (which replays
//! the corpus and seeded mutations of it under plain `cargo test`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kvlink::fuzz::gguf(data);
});
