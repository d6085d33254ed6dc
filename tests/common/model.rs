//! Locating and loading the real test model (SmolLM2-135M-Instruct, GGUF Q4_1).
#![allow(dead_code)]

use kvlink::model::WeightSource;
use kvlink::Engine;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// KVLINK_TEST_MODEL, else the default model in the cache directory. Fails (never
/// skips) when it is missing, saying how to fetch it.
pub fn model_path() -> PathBuf {
    if let Ok(p) = std::env::var("KVLINK_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let p = kvlink::model::default_model_path();
    assert!(
        p.exists(),
        "test model not found at {}: run scripts/fetch-model.sh (or set KVLINK_TEST_MODEL)",
        p.display()
    );
    p
}

pub fn source() -> &'static Arc<dyn WeightSource> {
    static SRC: OnceLock<Arc<dyn WeightSource>> = OnceLock::new();
    SRC.get_or_init(|| {
        Arc::from(kvlink::model::open_model(&model_path()).expect("open test model"))
    })
}

/// The engine on the test GPU, loaded once per test binary.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        Engine::load(
            super::gpu().clone(),
            source().as_ref(),
            2048,
            &mut |_, _| {},
        )
        .expect("load engine")
    })
}
