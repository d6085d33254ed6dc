//! HF model folders: `config.json` (parse_config) and `model.safetensors` (header,
//! dtypes, shapes against the config, tensor loads). Input: config.json, SEP,
//! model.safetensors (see split.rs); the files are written to a per-process temp folder
//! because HfModel reads a folder.
#![no_main]

use kvlink::model::hf::{parse_config, HfModel};
use kvlink::model::WeightSource;
use libfuzzer_sys::fuzz_target;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[path = "split.rs"]
mod split;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("kvlink-fuzz-hf-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let parts = split::split(data);
    let config = parts[0];
    if let Ok(text) = std::str::from_utf8(config) {
        if let Ok(hf) = parse_config(text, Path::new("config.json")) {
            hf.config
                .validate()
                .expect("parse_config hands out a validated config");
        }
    }
    let Some(weights) = parts.get(1) else {
        return;
    };
    let d = dir();
    std::fs::write(d.join("config.json"), config).unwrap();
    std::fs::write(d.join("model.safetensors"), weights).unwrap();
    let Ok(m) = HfModel::open(d) else {
        return;
    };
    let _ = (m.fingerprint(), m.dtype(), m.describe());
    for name in m.tensor_names() {
        if let Ok(t) = m.load(&name) {
            assert_eq!(t.numel(), t.data.len());
        }
    }
});
