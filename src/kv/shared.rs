//! A document-cache tier shared between processes and machines (e.g. Redis), behind the
//! GPU-resident cache and the disk store. It holds whole entries in exactly the disk
//! store's format ([`super::store::encode_entry`]: magic, version, header JSON with the
//! fingerprints and token ids, f16 payload, XXH64 checksum) under the same keys
//! ([`DocKey`]), and every entry read from it is checked as a disk entry is
//! ([`super::store::decode_entry`]): a corrupt, stale or colliding entry is a miss.
//!
//! The tier is a cache: the engine reports its failures as warnings and answers without
//! it (see `Engine::doc_caches`).

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
