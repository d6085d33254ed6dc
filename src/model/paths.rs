//! Where kvlink keeps downloaded models and caches.

use std::path::PathBuf;

/// File name of the default (test) model.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub use crate::paths::cache_dir;

/// `<cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf` (see [`cache_dir`]); fetched by
/// `scripts/fetch-model.sh`.
pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_MODEL_FILE)
}
