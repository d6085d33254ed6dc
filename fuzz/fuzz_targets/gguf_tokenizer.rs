//! The tokenizer-from-GGUF builder: `tokenizer.ggml.*` metadata of arbitrary GGUF bytes
//! -> a Tokenizer, then a few encode/decode calls on it.
//!
//! The harness is `kvlink::fuzz::gguf_tokenizer`, shared with tests/fuzz_corpus.rs (which replays
//! the corpus and seeded mutations of it under plain `cargo test`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kvlink::fuzz::gguf_tokenizer(data);
});
