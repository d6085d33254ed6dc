//! LoRA adapter files: adapter_config.json, adapter_model.safetensors and an optional
//! kvlink.json (joined by SEP, see split.rs) -> LoraAdapter::from_bytes, then the checks
//! against a tiny random base model (LoraModel::new) and a merged load.
#![no_main]

use kvlink::model::lora::{LoraAdapter, LoraModel};
use kvlink::model::random::RandomModel;
use kvlink::model::source::names;
use kvlink::model::WeightSource;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

#[path = "split.rs"]
mod split;

fuzz_target!(|data: &[u8]| {
    let parts = split::split(data);
    let (Some(config), Some(weights)) = (parts.first(), parts.get(1)) else {
        return;
    };
    let link = parts.get(2).copied();
    let Ok(adapter) = LoraAdapter::from_bytes(Path::new("adapter"), config, weights, link) else {
        return;
    };
    let _ = (adapter.scale(), adapter.extra_rows(), adapter.adapted());
    let base = RandomModel::new("tiny", 1).expect("tiny random model");
    let Ok(m) = LoraModel::new(Box::new(base), adapter) else {
        return;
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
});
