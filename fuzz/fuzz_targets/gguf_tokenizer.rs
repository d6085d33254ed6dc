//! The tokenizer-from-GGUF builder: `tokenizer.ggml.*` metadata (tokens, merges, scores,
//! token types, special ids) of arbitrary GGUF bytes -> a Tokenizer, then a few
//! encode/decode calls on it.
#![no_main]

use kvlink::model::gguf::GgufFile;
use kvlink::model::tokenizer::{GgufTokenizerMeta, TextStream};
use kvlink::model::Tokenizer;
use libfuzzer_sys::fuzz_target;

const TEXTS: [&str; 3] = [
    "Hello world, it's 12345!",
    "<|im_start|>user\nab é\u{2581}x",
    "",
];

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return;
    };
    let Ok(meta) = GgufTokenizerMeta::from_gguf(&file) else {
        return;
    };
    let Ok(tok) = Tokenizer::from_gguf_meta(&meta) else {
        return;
    };
    let n = tok.vocab_size() as u32;
    for text in TEXTS {
        if let Ok(ids) = tok.encode(text, true) {
            let _ = tok.decode(&ids);
            let mut st = TextStream::new(&tok);
            for &id in ids.iter().take(64) {
                let _ = st.push(id);
            }
            let _ = st.finish();
        }
    }
    for id in [0, 1, n.saturating_sub(1), n, u32::MAX] {
        let _ = tok.token_piece(id);
        let _ = tok.decode(&[id]);
        let _ = tok.is_stop(id);
    }
});
