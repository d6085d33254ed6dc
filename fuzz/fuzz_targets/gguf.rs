//! The GGUF reader: header, metadata, tensor table, dequantization, and the model view
//! (config from metadata, HF names, Q/K unpermute) over arbitrary bytes.
#![no_main]

use kvlink::model::gguf::{gguf_to_hf_name, GgufFile, GgufModel};
use kvlink::model::WeightSource;
use libfuzzer_sys::fuzz_target;

/// Tensors larger than this are not dequantized (keeps each run fast; the size checks
/// happen at parse time either way).
const MAX_TENSOR_BYTES: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return;
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
        return;
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
});
