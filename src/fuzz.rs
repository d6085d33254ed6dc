//! The fuzz harnesses of kvlink's parsers of untrusted files, shared by the cargo-fuzz
//! targets in `fuzz/` (nightly, libFuzzer) and by `tests/fuzz_corpus.rs` (stable, run in
//! CI), which replays every seed in `fuzz/corpus/` and a bounded, seeded set of
//! mutations of them. See FUZZING.md.
//!
//! Each harness takes arbitrary bytes and must return normally: a malformed input is an
//! `Err` from the parser, which the harness ignores. It returns whether the input got
//! past its main parser (so the rest of the harness ran on it), for the replay test to
//! tell how deep its inputs reach. It panics (so libFuzzer reports a
//! crash and the test fails) only when kvlink breaks one of its own promises: a parser
//! panics, or something it accepted is inconsistent (a config it hands out does not
//! validate, a tensor's length disagrees with its shape, a store entry does not read
//! back as written).
//!
//! Not part of kvlink's API for serving; native only (`hf_model` writes a folder).

use crate::kv::store::{decode_entry, encode_entry};
use crate::kv::{checksum64, Lookup};
use crate::link::{LinkConfig, PromptPlan};
use crate::model::gguf::{gguf_to_hf_name, GgufFile, GgufModel};
use crate::model::hf::{parse_config, HfModel};
use crate::model::lora::{LoraAdapter, LoraModel};
use crate::model::random::RandomModel;
use crate::model::source::names;
use crate::model::tokenizer::{GgufTokenizerMeta, TextStream};
use crate::model::{Tokenizer, WeightSource};
use std::path::Path;

/// Every target, by the name of its cargo-fuzz binary and corpus folder.
pub const TARGETS: [&str; 6] = [
    "gguf",
    "gguf_tokenizer",
    "hf_model",
    "kv_entry",
    "link_config",
    "lora_adapter",
];

/// Runs the harness of `target` on `data` and returns what it does. `scratch` is a
/// folder the harness may write to (`hf_model` writes its model folder there). `None`
/// for an unknown target.
pub fn run(target: &str, data: &[u8], scratch: &Path) -> Option<bool> {
    Some(match target {
        "gguf" => gguf(data),
        "gguf_tokenizer" => gguf_tokenizer(data),
        "hf_model" => hf_model(data, scratch),
        "kv_entry" => kv_entry(data),
        "link_config" => link_config(data),
        "lora_adapter" => lora_adapter(data),
        _ => return None,
    })
}

/// Inputs that hold several files join them with this line.
pub const SEP: &[u8] = b"\n#kvlink-fuzz-next-file#\n";

/// Splits `data` at each [`SEP`].
pub fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(SEP.len()).position(|w| w == SEP) {
        parts.push(&rest[..i]);
        rest = &rest[i + SEP.len()..];
    }
    parts.push(rest);
    parts
}

/// Tensors larger than this are not dequantized or loaded (keeps each run fast; the
/// size checks happen at parse time either way).
const MAX_TENSOR_BYTES: usize = 1 << 16;

/// The GGUF reader: header, metadata, tensor table, dequantization, and the model view
/// (config from metadata, HF names, Q/K unpermute, tokenizer) over arbitrary bytes.
pub fn gguf(data: &[u8]) -> bool {
    let Ok(file) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return false;
    };
    for (_, v) in file.metadata() {
        let _ = (v.summary(), v.as_f64(), v.as_bool(), v.as_str());
    }
    for t in file.tensors() {
        assert!(
            t.start + t.nbytes <= file.file_len(),
            "tensor range checked at open"
        );
        if t.nbytes <= MAX_TENSOR_BYTES {
            if let Ok(v) = file.dequantize(&t.name) {
                assert_eq!(v.len(), t.n_elements);
            }
        }
    }
    let Ok(model) = GgufModel::from_file(file) else {
        return true;
    };
    model
        .config()
        .validate()
        .expect("GgufModel hands out a validated config");
    let _ = (model.dtype(), model.fingerprint(), model.describe());
    let names: Vec<(String, usize)> = model
        .file()
        .tensors()
        .iter()
        .filter_map(|t| gguf_to_hf_name(&t.name).map(|n| (n, t.nbytes)))
        .collect();
    for (name, nbytes) in names {
        if nbytes <= MAX_TENSOR_BYTES {
            if let Ok(t) = model.load(&name) {
                assert_eq!(t.numel(), t.data.len());
            }
        }
    }
    let _ = model.tokenizer();
    true
}

const TEXTS: [&str; 3] = [
    "Hello world, it's 12345!",
    "<|im_start|>user\nab é\u{2581}x",
    "",
];

/// The tokenizer-from-GGUF builder: `tokenizer.ggml.*` metadata (tokens, merges,
/// scores, token types, special ids) of arbitrary GGUF bytes -> a Tokenizer, then a few
/// encode/decode calls on it.
pub fn gguf_tokenizer(data: &[u8]) -> bool {
    let Ok(file) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return false;
    };
    let Ok(meta) = GgufTokenizerMeta::from_gguf(&file) else {
        return false;
    };
    let Ok(tok) = Tokenizer::from_gguf_meta(&meta) else {
        return false;
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
    true
}

/// HF model folders: `config.json` ([`parse_config`]) and `model.safetensors` (header,
/// dtypes, shapes against the config, tensor loads). Input: config.json, [`SEP`],
/// model.safetensors; both are written to `dir` (created if needed) because
/// [`HfModel`] reads a folder.
pub fn hf_model(data: &[u8], dir: &Path) -> bool {
    let parts = split(data);
    let config = parts[0];
    let mut parsed = false;
    if let Ok(text) = std::str::from_utf8(config) {
        if let Ok(hf) = parse_config(text, Path::new("config.json")) {
            hf.config
                .validate()
                .expect("parse_config hands out a validated config");
            parsed = true;
        }
    }
    let Some(weights) = parts.get(1) else {
        return parsed;
    };
    // The harness's own folder: failing to write it is the machine's fault, not the
    // input's, and is reported as such.
    std::fs::create_dir_all(dir).expect("create the fuzz scratch folder");
    std::fs::write(dir.join("config.json"), config).expect("write config.json");
    std::fs::write(dir.join("model.safetensors"), weights).expect("write model.safetensors");
    let Ok(m) = HfModel::open(dir) else {
        return parsed;
    };
    let _ = (m.fingerprint(), m.dtype(), m.describe());
    for name in m.tensor_names() {
        if let Ok(t) = m.load(&name) {
            assert_eq!(t.numel(), t.data.len());
        }
    }
    true
}

/// The disk store's entry reader ([`decode_entry`], the byte-slice form of what
/// `DiskStore::get` does to a file): magic, version, header JSON, shape bounds, length,
/// payload, checksum, and the match against the request.
///
/// Input: one flag byte, then the entry bytes. Flag bit 0 rewrites the trailing
/// checksum to the right one first, so mutations get past it to the header and payload
/// checks; bit 1 asks for no token ids instead of [1, 2, 3].
pub fn kv_entry(data: &[u8]) -> bool {
    let Some((&flags, body)) = data.split_first() else {
        return false;
    };
    let mut bytes = body.to_vec();
    if flags & 1 == 1 && bytes.len() >= 8 {
        let n = bytes.len() - 8;
        let sum = checksum64(&bytes[..n]);
        bytes[n..].copy_from_slice(&sum.to_le_bytes());
    }
    let ids: &[u32] = if flags & 2 == 0 { &[1, 2, 3] } else { &[] };
    if let Lookup::Hit(kv) = decode_entry(&bytes, "m", "t", ids) {
        kv.validate().expect("a hit is a consistent DocKv");
        assert_eq!(kv.n_tokens, ids.len());
        // What was read writes back to an entry that reads the same.
        let again = encode_entry("m", "t", ids, &kv, 0).expect("re-encode a hit");
        match decode_entry(&again, "m", "t", ids) {
            Lookup::Hit(kv2) => assert!(kv2.k == kv.k && kv2.v == kv.v),
            other => panic!("re-encoded entry does not read back: {other:?}"),
        }
        return true;
    }
    false
}

/// `kvlink.json` link configuration: parse, bounds, validate against vocabularies and
/// document counts, and the prompt plan it lays out.
pub fn link_config(data: &[u8]) -> bool {
    let Ok(link) = LinkConfig::parse(data, Path::new("kvlink.json")) else {
        return false;
    };
    let docs: [&[u32]; 3] = [&[5, 6], &[7], &[8, 9, 10]];
    for vocab in [0usize, 11, 49354, 1 << 24, usize::MAX] {
        for n_docs in [0usize, 1, 3, 40, 1 << 20] {
            let _ = link.validate(vocab, n_docs);
        }
        // A plan over ids the configuration validated lies inside the vocabulary.
        if vocab > 10 && link.validate(vocab, docs.len()).is_ok() {
            let plan = PromptPlan::build(&[1], &docs, &[2], &link).expect("validated plan");
            assert!(plan.tokens.iter().all(|&t| (t as usize) < vocab));
            assert_eq!(plan.tokens.len(), plan.segments.len());
        }
    }
    let _ = PromptPlan::build(&[], &docs, &[], &link);
    true
}

/// LoRA adapter files: adapter_config.json, adapter_model.safetensors and an optional
/// kvlink.json (joined by [`SEP`]) -> [`LoraAdapter::from_bytes`], then the checks
/// against a tiny random base model ([`LoraModel::new`]) and merged loads.
pub fn lora_adapter(data: &[u8]) -> bool {
    let parts = split(data);
    let (Some(config), Some(weights)) = (parts.first(), parts.get(1)) else {
        return false;
    };
    let link = parts.get(2).copied();
    let Ok(adapter) = LoraAdapter::from_bytes(Path::new("adapter"), config, weights, link) else {
        return false;
    };
    let _ = (adapter.scale(), adapter.extra_rows(), adapter.adapted());
    let base = RandomModel::new("tiny", 1).expect("tiny random model");
    let Ok(m) = LoraModel::new(Box::new(base), adapter) else {
        return true;
    };
    m.config()
        .validate()
        .expect("LoraModel hands out a validated config");
    let _ = (m.describe(), m.fingerprint(), m.link_config());
    for name in [
        names::EMBED.to_string(),
        names::layer(0, names::Q),
        names::layer(1, names::DOWN),
    ] {
        if let Ok(t) = m.load(&name) {
            assert_eq!(t.numel(), t.data.len());
        }
    }
    true
}
