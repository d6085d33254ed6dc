//! Where kvlink keeps downloaded models and caches.

use std::path::PathBuf;

/// File name of the default (test) model.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The kvlink cache directory: `$KVLINK_CACHE`, else `$XDG_CACHE_HOME/kvlink`, else
/// `~/.cache/kvlink` (relative `.cache/kvlink` if there is no home directory).
pub fn cache_dir() -> PathBuf {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(c) = nonempty("KVLINK_CACHE") {
        return PathBuf::from(c);
    }
    if let Some(x) = nonempty("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("kvlink");
    }
    match nonempty("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("kvlink"),
        None => PathBuf::from(".cache").join("kvlink"),
    }
}

/// `<cache>/models/SmolLM2-135M-Instruct.Q4_1.gguf` (see [`cache_dir`]); fetched by
/// `scripts/fetch-model.sh`.
pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_MODEL_FILE)
}
