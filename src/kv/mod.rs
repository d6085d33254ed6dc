//! Host side of the per-document KV cache (KVLINK.md §3-4).
//!
//! - [`DocKv`]: one document's keys and values for every layer, as raw little-endian f16
//!   bytes, keys post-RoPE at local positions `0..n_tokens`.
//! - [`DocKey`]: the cache key, a 128-bit hex digest over the cache format version, the
//!   model and tokenizer fingerprints and the token ids.
//! - [`DiskStore`] (in [`store`]): one checksummed file per entry, written atomically.
//! - [`Lru`]: a GPU-independent LRU index with a byte budget, for the GPU-resident cache.
//! - [`SharedStore`] (in [`shared`]): a tier shared between processes, behind the disk
//!   store, holding the same entry bytes under the same keys; on Redis in `redis`
//!   (native builds; the `redis` crate).
//!
//! Hashes: [`xxh64`] (the store's checksum, a key lane) is xxhash-rust's; [`fnv1a64`] (the
//! other key lane) is hand-written. The shared tier ([`redis`]) uses the Redis client.

#[cfg(not(target_arch = "wasm32"))]
pub mod convert;
pub mod quant;
#[cfg(not(target_arch = "wasm32"))]
pub mod redis;
pub mod shared;
pub mod store;

pub use quant::KvFormat;
pub use shared::SharedStore;
pub use store::{DiskStore, EntryInfo, Lookup, PruneStats, StoreStats};

use crate::{Error, Result};
use std::fmt;
use std::hash::Hash;

/// Version of the on-disk entry format and of the key derivation. Bump it whenever the
/// layout of [`DocKv`] or of the file changes: old entries then become misses.
pub const CACHE_FORMAT_VERSION: u32 = 1;

/// Durations as milliseconds (f64) in JSON: `#[serde(with = "serde_ms")]`.
pub(crate) mod serde_ms {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1e3)
    }
}

/// Bytes per stored element (f16).
pub const DTYPE_BYTES: usize = 2;

// ---------------------------------------------------------------------------------------
// DocKv
// ---------------------------------------------------------------------------------------

/// One document's KV cache: per layer, keys and values as raw little-endian f16 bytes of
/// shape `[n_tokens, kv_dim]` (row-major, 2 bytes per element). Keys are post-RoPE at
/// local positions `0..n_tokens`.
#[derive(Clone, PartialEq, Eq)]
pub struct DocKv {
    pub n_tokens: usize,
    pub n_layers: usize,
    pub kv_dim: usize,
    /// `k[layer]`: `n_tokens * kv_dim * 2` bytes.
    pub k: Vec<Vec<u8>>,
    /// `v[layer]`: `n_tokens * kv_dim * 2` bytes.
    pub v: Vec<Vec<u8>>,
}

impl fmt::Debug for DocKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DocKv")
            .field("n_tokens", &self.n_tokens)
            .field("n_layers", &self.n_layers)
            .field("kv_dim", &self.kv_dim)
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl DocKv {
    /// All-zero cache of the given shape.
    pub fn zeros(n_tokens: usize, n_layers: usize, kv_dim: usize) -> DocKv {
        let lb = n_tokens * kv_dim * DTYPE_BYTES;
        DocKv {
            n_tokens,
            n_layers,
            kv_dim,
            k: vec![vec![0u8; lb]; n_layers],
            v: vec![vec![0u8; lb]; n_layers],
        }
    }

    /// Bytes of one layer's K (or V): `n_tokens * kv_dim * 2`.
    pub fn layer_bytes(&self) -> usize {
        self.n_tokens * self.kv_dim * DTYPE_BYTES
    }

    /// Total payload bytes actually held (all K and V layers).
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(self.v.iter()).map(|l| l.len()).sum()
    }

    /// Checks that the shape fields and the buffers agree.
    pub fn validate(&self) -> Result<()> {
        let lb = self
            .n_tokens
            .checked_mul(self.kv_dim)
            .and_then(|x| x.checked_mul(DTYPE_BYTES))
            .ok_or_else(|| Error::Input(format!("DocKv: shape overflow {self:?}")))?;
        if self.k.len() != self.n_layers || self.v.len() != self.n_layers {
            return Err(Error::Input(format!(
                "DocKv: n_layers = {} but k has {} layers and v has {}",
                self.n_layers,
                self.k.len(),
                self.v.len()
            )));
        }
        for (name, layers) in [("k", &self.k), ("v", &self.v)] {
            for (i, l) in layers.iter().enumerate() {
                if l.len() != lb {
                    return Err(Error::Input(format!(
                        "DocKv: {name}[{i}] has {} bytes, expected {lb} (n_tokens {} x kv_dim {} x 2)",
                        l.len(),
                        self.n_tokens,
                        self.kv_dim
                    )));
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// DocKey
// ---------------------------------------------------------------------------------------

/// Cache key of one document: 32 lowercase hex chars (128 bits: an xxh64 lane and an
/// FNV-1a-64 lane over the same canonical encoding). The disk store also stores and checks
/// the full fields, so a collision can only cause a miss, never a wrong hit.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocKey(String);

const KEY_DOMAIN: &[u8] = b"kvlink/doc-kv/key\0";

impl DocKey {
    pub fn new(model_fingerprint: &str, tokenizer_fingerprint: &str, token_ids: &[u32]) -> DocKey {
        Self::with_version(
            CACHE_FORMAT_VERSION,
            model_fingerprint,
            tokenizer_fingerprint,
            token_ids,
        )
    }

    /// The key as a different format version would derive it (tests, migrations).
    pub fn with_version(
        version: u32,
        model_fingerprint: &str,
        tokenizer_fingerprint: &str,
        token_ids: &[u32],
    ) -> DocKey {
        let mut buf = Vec::with_capacity(
            KEY_DOMAIN.len()
                + 28
                + model_fingerprint.len()
                + tokenizer_fingerprint.len()
                + 4 * token_ids.len(),
        );
        buf.extend_from_slice(KEY_DOMAIN);
        buf.extend_from_slice(&version.to_le_bytes());
        buf.extend_from_slice(&(model_fingerprint.len() as u64).to_le_bytes());
        buf.extend_from_slice(model_fingerprint.as_bytes());
        buf.extend_from_slice(&(tokenizer_fingerprint.len() as u64).to_le_bytes());
        buf.extend_from_slice(tokenizer_fingerprint.as_bytes());
        buf.extend_from_slice(&(token_ids.len() as u64).to_le_bytes());
        for t in token_ids {
            buf.extend_from_slice(&t.to_le_bytes());
        }
        let a = xxh64(&buf, 0x6b76_6c69_6e6b_0001);
        let b = fnv1a64(&buf);
        DocKey(format!("{a:016x}{b:016x}"))
    }

    /// Parses a key previously produced by [`DocKey::new`] (32 lowercase hex chars).
    pub fn from_hex(s: &str) -> Option<DocKey> {
        let ok = s.len() == 32 && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
        ok.then(|| DocKey(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DocKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// ---------------------------------------------------------------------------------------
// Hashes
// ---------------------------------------------------------------------------------------

/// Streaming XXH64 (the standard algorithm; `xxh64(b"", 0) == 0xEF46DB3751D8E999`):
/// xxhash-rust's, behind the names the store and its tests use.
#[derive(Clone)]
pub struct Xxh64(xxhash_rust::xxh64::Xxh64);

impl Xxh64 {
    pub fn new(seed: u64) -> Self {
        Xxh64(xxhash_rust::xxh64::Xxh64::new(seed))
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(&self) -> u64 {
        self.0.digest()
    }
}

/// One-shot XXH64.
pub fn xxh64(data: &[u8], seed: u64) -> u64 {
    xxhash_rust::xxh64::xxh64(data, seed)
}

/// FNV-1a, 64-bit. Hand-written (xxhash-rust has no FNV): its values are part of the
/// document keys, the tokenizer fingerprint and the evaluations' sampling seeds, so it
/// stays as it is.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The checksum the disk format uses (XXH64, seed 0).
pub fn checksum64(data: &[u8]) -> u64 {
    xxh64(data, 0)
}

// ---------------------------------------------------------------------------------------
// Lru
// ---------------------------------------------------------------------------------------

/// LRU index with a byte budget (GPU-independent; the values are whatever the caller
/// keeps, e.g. GPU buffers). `used_bytes() <= budget_bytes()` always holds. The recency
/// order is the `lru` crate's; this adds the byte accounting and eviction by budget.
pub struct Lru<K: Hash + Eq, V> {
    budget_bytes: u64,
    used: u64,
    /// value and its bytes, most recently used first
    map: lru::LruCache<K, (V, u64)>,
}

impl<K: Eq + Hash + Clone, V> Lru<K, V> {
    pub fn new(budget_bytes: u64) -> Self {
        Lru {
            budget_bytes,
            used: 0,
            map: lru::LruCache::unbounded(),
        }
    }

    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    pub fn used_bytes(&self) -> u64 {
        self.used
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn contains(&self, k: &K) -> bool {
        self.map.contains(k)
    }

    /// Looks up `k` and marks it most recently used.
    pub fn get(&mut self, k: &K) -> Option<&V> {
        self.map.get(k).map(|e| &e.0)
    }

    /// Looks up `k` without changing its recency.
    pub fn peek(&self, k: &K) -> Option<&V> {
        self.map.peek(k).map(|e| &e.0)
    }

    /// Inserts `k` as most recently used and returns what had to go, oldest first:
    /// a previous value stored under `k` (always), then least recently used entries until
    /// the budget holds. An entry larger than the whole budget is not inserted; it is
    /// returned as evicted (nothing else is evicted for it).
    pub fn insert(&mut self, k: K, v: V, bytes: u64) -> Vec<(K, V)> {
        let mut evicted = Vec::new();
        if let Some(old) = self.remove(&k) {
            evicted.push((k.clone(), old));
        }
        if bytes > self.budget_bytes {
            evicted.push((k, v));
            return evicted;
        }
        while self.used + bytes > self.budget_bytes {
            match self.pop_lru() {
                Some(kv) => evicted.push(kv),
                None => break,
            }
        }
        self.map.put(k, (v, bytes));
        self.used += bytes;
        evicted
    }

    pub fn remove(&mut self, k: &K) -> Option<V> {
        let (v, bytes) = self.map.pop(k)?;
        self.used -= bytes;
        Some(v)
    }

    /// Removes and returns the least recently used entry.
    pub fn pop_lru(&mut self) -> Option<(K, V)> {
        let (k, (v, bytes)) = self.map.pop_lru()?;
        self.used -= bytes;
        Some((k, v))
    }

    /// Changes the budget, returning the entries evicted to meet it (oldest first).
    pub fn set_budget(&mut self, budget_bytes: u64) -> Vec<(K, V)> {
        self.budget_bytes = budget_bytes;
        let mut evicted = Vec::new();
        while self.used > self.budget_bytes {
            match self.pop_lru() {
                Some(kv) => evicted.push(kv),
                None => break,
            }
        }
        evicted
    }

    /// Keys from least to most recently used.
    pub fn keys_lru_order(&self) -> impl Iterator<Item = &K> {
        self.map.iter().rev().map(|(k, _)| k)
    }

    /// Removes everything, returning the entries (oldest first).
    pub fn clear(&mut self) -> Vec<(K, V)> {
        let mut out = Vec::with_capacity(self.len());
        while let Some(kv) = self.pop_lru() {
            out.push(kv);
        }
        out
    }
}

impl<K: Hash + Eq, V> fmt::Debug for Lru<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lru")
            .field("budget_bytes", &self.budget_bytes)
            .field("used_bytes", &self.used)
            .field("len", &self.map.len())
            .finish()
    }
}
