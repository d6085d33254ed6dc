//! LoRA adapter files: adapter_config.json, SEP, adapter_model.safetensors, optional SEP +
//! kvlink.json -> LoraAdapter::from_bytes, then LoraModel::new on a tiny random model.
//!
//! The harness is `kvlink::fuzz::lora_adapter`, shared with tests/fuzz_corpus.rs (which replays
//! the corpus and seeded mutations of it under plain `cargo test`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kvlink::fuzz::lora_adapter(data);
});
