//! Model fingerprints: a hash of every byte of the weight files, so that document caches
//! (keyed by the fingerprint) are never shared between models that differ anywhere.
//!
//! Hashing a multi-GB model takes a second or more, so a file's hash is remembered in a
//! small sidecar file under `<cache dir>/fingerprints/`, named after the file's
//! canonical path and holding that path, the file's size and mtime (nanoseconds) and the
//! hash. It is used only while all three still match; it is written atomically (temp +
//! rename) and only when the file's mtime did not change while it was hashed and is over
//! [`SETTLED`] old (a file modified again within the same clock tick would otherwise
//! keep a stale hash). Any failure to read or write it just means hashing again.

use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

/// Names the hash; part of each sidecar (a different scheme is not reused).
pub const SCHEME: &str = "xxh3-128/v1";

/// A file modified more recently than this is hashed but its hash is not remembered.
pub const SETTLED: Duration = Duration::from_secs(2);

#[derive(Serialize, Deserialize, PartialEq, Eq, Debug)]
struct Sidecar {
    scheme: String,
    path: PathBuf,
    size: u64,
    mtime_ns: u128,
    /// 32 lowercase hex digits.
    hash: String,
}

/// Where remembered file hashes live.
pub fn sidecar_dir() -> PathBuf {
    super::paths::cache_dir().join("fingerprints")
}

fn stamp(path: &Path) -> Option<(PathBuf, u64, u128, SystemTime)> {
    let canon = fs::canonicalize(path).ok()?;
    let md = fs::metadata(&canon).ok()?;
    let mtime = md.modified().ok()?;
    let ns = mtime.duration_since(UNIX_EPOCH).ok()?.as_nanos();
    Some((canon, md.len(), ns, mtime))
}

fn sidecar_path(canon: &Path) -> PathBuf {
    let h = xxh3_64(canon.as_os_str().as_encoded_bytes());
    sidecar_dir().join(format!("{h:016x}.json"))
}

/// XXH3-128 of `bytes`, which are the whole content of the file at `path` (e.g. its
/// memory map), remembered across runs (see the module docs).
pub fn file_hash(path: &Path, bytes: &[u8]) -> u128 {
    let before = stamp(path).filter(|(_, size, _, _)| *size == bytes.len() as u64);
    if let Some((canon, size, ns, _)) = &before {
        let remembered = fs::read(sidecar_path(canon))
            .ok()
            .and_then(|b| serde_json::from_slice::<Sidecar>(&b).ok())
            .filter(|s| s.scheme == SCHEME && &s.path == canon && s.size == *size)
            .filter(|s| s.mtime_ns == *ns)
            .and_then(|s| u128::from_str_radix(&s.hash, 16).ok());
        if let Some(h) = remembered {
            return h;
        }
    }
    let h = xxh3_128(bytes);
    if let Some((canon, size, ns, mtime)) = before {
        let settled = SystemTime::now()
            .duration_since(mtime)
            .is_ok_and(|age| age > SETTLED);
        let unchanged = stamp(path).is_some_and(|(_, s, n, _)| s == size && n == ns);
        if settled && unchanged {
            remember(
                &canon,
                &Sidecar {
                    scheme: SCHEME.into(),
                    path: canon.clone(),
                    size,
                    mtime_ns: ns,
                    hash: format!("{h:032x}"),
                },
            );
        }
    }
    h
}

fn remember(canon: &Path, s: &Sidecar) {
    let dst = sidecar_path(canon);
    let Some(dir) = dst.parent() else { return };
    if fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        dst.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let ok = serde_json::to_vec(s)
        .ok()
        .is_some_and(|b| fs::write(&tmp, b).is_ok())
        && fs::rename(&tmp, &dst).is_ok();
    if !ok {
        let _ = fs::remove_file(&tmp);
    }
}
