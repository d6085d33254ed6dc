//! Where kvlink keeps its files (models, document caches, data): the one place every
//! layer may ask.

use std::path::PathBuf;

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
