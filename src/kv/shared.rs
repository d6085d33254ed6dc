//! A document-cache tier shared between processes and machines (e.g. Redis), behind the
//! GPU-resident cache and the disk store. It holds whole entries in exactly the disk
//! store's format ([`super::store::encode_entry`]: magic, version, header JSON with the
//! fingerprints and token ids, f16 payload, XXH64 checksum) under the same keys
//! ([`DocKey`]), and every entry read from it is checked as a disk entry is
//! ([`super::store::decode_entry`]): a corrupt, stale or colliding entry is a miss.
//!
//! The tier is a cache: the engine reports its failures as warnings and answers without
//! it (see `Engine::doc_caches`).

use super::store::{check_entry, DiskStore};
use super::DocKey;
use crate::Result;

pub trait SharedStore: Send + Sync {
    /// Where it is, for messages (e.g. `redis://127.0.0.1:6379`).
    fn describe(&self) -> String;
    /// The entry's bytes, `None` if there is none.
    fn get(&self, key: &DocKey) -> Result<Option<Vec<u8>>>;
    /// Store an entry (replacing any previous one).
    fn put(&self, key: &DocKey, entry: &[u8]) -> Result<()>;
    /// Remove an entry; `Ok(false)` if there was none.
    fn remove(&self, key: &DocKey) -> Result<bool>;
}

/// What [`push_store`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PushStats {
    /// Entries written to the shared tier.
    pub pushed: usize,
    pub pushed_bytes: u64,
    /// Entries left out: unreadable, corrupt or of another cache format (each reported
    /// on stderr), or gone while the push ran.
    pub skipped: usize,
}

/// Copy every intact entry of a disk store to the shared tier, under the key its header
/// gives (model, tokenizer and token ids: a renamed file goes where readers look for
/// it). Entries already there are replaced (same bytes, fresh expiry). `progress` is
/// called after each entry with (done, total). Stops at the first failure to write.
pub fn push_store(
    store: &DiskStore,
    shared: &dyn SharedStore,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PushStats> {
    let entries = store.entries()?;
    let mut st = PushStats::default();
    for (i, e) in entries.iter().enumerate() {
        let checked = std::fs::read(&e.path)
            .map_err(|err| err.to_string())
            .and_then(|b| check_entry(&b).map(|h| (b, h)));
        match checked {
            Ok((bytes, h)) => {
                let key = DocKey::new(&h.model_fingerprint, &h.tokenizer_fingerprint, &h.token_ids);
                shared.put(&key, &bytes)?;
                st.pushed += 1;
                st.pushed_bytes += bytes.len() as u64;
            }
            Err(why) => {
                eprintln!("kvlink: skipping {}: {why}", e.path.display());
                st.skipped += 1;
            }
        }
        progress(i + 1, entries.len());
    }
    Ok(st)
}
