//! The document-cache tiers behind one lookup path: GPU-resident caches (an LRU under a
//! byte budget, their memory in the [`DocPool`]), the disk store ([`DiskStore`]) and a
//! store shared with other processes ([`SharedStore`], e.g. Redis). A lookup takes what
//! the fastest tier holds, uploads what a slower tier holds (straight into pool rows),
//! computes the rest ([`super::encode_documents`]) and inserts everything into the
//! tiers above where it came from: `lookup -> upload/compute -> insert`.

use super::pool::Lease;
use super::DiskReads;
use super::{DocCache, DocPool};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor, TensorUpload};
use crate::kv::quant::PartDequantizer;
use crate::kv::store::{PayloadSink, ReadTimes};
use crate::kv::KvFormat;
use crate::kv::{DiskStore, DocKey, DocKv, Lookup, Lru, SharedStore};
use crate::model::llama::Llama;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A disk hit's K/V goes to the GPU through staging buffers of at most this size (one
/// per document unless the document's cache is larger).
const UPLOAD_BYTES: u64 = 256 << 20;

/// Where a document's cache came from for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheSource {
    Gpu,
    Disk,
    /// The shared tier ([`SharedStore`], e.g. Redis).
    Shared,
    Computed,
}

/// The document-cache tiers of one model (see the module documentation).
pub struct DocTiers {
    gpu: Arc<Gpu>,
    layers: usize,
    kv_dim: usize,
    /// The model's and tokenizer's fingerprints: part of every key, checked on every hit.
    fingerprint: String,
    tokenizer_fingerprint: String,
    /// Document caches resident on the GPU (LRU under a byte budget).
    docs: Mutex<Lru<DocKey, Arc<DocCache>>>,
    /// The GPU memory those caches live in (see [`super::pool`]), under the same budget.
    pool: DocPool,
    /// Document caches on disk, if enabled.
    store: Mutex<Option<DiskStore>>,
    /// Document caches shared with other processes (Redis), behind the disk store.
    shared: Mutex<Option<Arc<dyn SharedStore>>>,
    /// How computed caches are written to the disk and shared stores.
    format: Mutex<KvFormat>,
}

impl DocTiers {
    /// Tiers for `model`'s caches with a GPU budget of `budget` bytes, no disk store and
    /// no shared store.
    pub fn new(
        model: &Llama,
        fingerprint: &str,
        tokenizer_fingerprint: &str,
        budget: u64,
    ) -> DocTiers {
        let c = &model.cfg;
        let gpu = model.gpu().clone();
        DocTiers {
            pool: DocPool::new(gpu.clone(), c.num_hidden_layers, c.kv_dim(), budget),
            gpu,
            layers: c.num_hidden_layers,
            kv_dim: c.kv_dim(),
            fingerprint: fingerprint.to_string(),
            tokenizer_fingerprint: tokenizer_fingerprint.to_string(),
            docs: Mutex::new(Lru::new(budget)),
            store: Mutex::new(None),
            shared: Mutex::new(None),
            format: Mutex::new(KvFormat::F16),
        }
    }

    /// How computed caches are written to the disk and shared stores from now on (both
    /// formats are read, whatever this is).
    pub fn set_format(&self, format: KvFormat) {
        *self.format.lock().unwrap_or_else(|e| e.into_inner()) = format;
    }

    pub fn format(&self) -> KvFormat {
        *self.format.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Share document caches with other processes through `shared` (None: not), looked
    /// up after the GPU and the disk store; see [`crate::kv::shared`].
    pub fn set_shared(&self, shared: Option<Arc<dyn SharedStore>>) {
        *self.shared.lock().unwrap_or_else(|e| e.into_inner()) = shared;
    }

    pub fn shared(&self) -> Option<Arc<dyn SharedStore>> {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A document's entry from the shared tier, checked as a disk entry is: `None` for a
    /// miss, and for a failure, a corrupt or a mismatched entry (warned about; the store
    /// is a cache).
    fn read_shared(
        &self,
        sh: &dyn SharedStore,
        k: &DocKey,
        tokens: &[u32],
    ) -> Option<(DocKv, Vec<u8>)> {
        let bytes = match sh.get(k) {
            Ok(b) => b?,
            Err(e) => {
                eprintln!(
                    "kvlink: warning: could not read document cache {k} from {e}; going on \
                     without it"
                );
                return None;
            }
        };
        match crate::kv::store::decode_entry(
            &bytes,
            &self.fingerprint,
            &self.tokenizer_fingerprint,
            tokens,
        ) {
            Lookup::Hit(kv) => Some((kv, bytes)),
            Lookup::Corrupt(why) => {
                eprintln!(
                    "kvlink: warning: document cache {k} in {} was corrupt ({why}); \
                     recomputing it",
                    sh.describe()
                );
                None
            }
            Lookup::Miss | Lookup::Mismatch(_) => None,
        }
    }

    /// Keep document caches on disk in `store` (None: GPU memory only).
    pub fn set_store(&self, store: Option<DiskStore>) {
        *self.store.lock().unwrap_or_else(|e| e.into_inner()) = store;
    }

    pub fn store(&self) -> Option<DiskStore> {
        self.store.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// GPU memory budget for resident document caches (evicts beyond it).
    pub fn set_budget(&self, bytes: u64) {
        self.docs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_budget(bytes);
        self.pool.set_budget(bytes);
    }

    /// The GPU memory budget for resident caches.
    pub fn budget(&self) -> u64 {
        self.docs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .budget_bytes()
    }

    /// Bytes of document caches resident on the GPU now.
    pub fn resident_bytes(&self) -> u64 {
        self.docs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .used_bytes()
    }

    /// The GPU memory pool the resident document caches live in.
    pub fn pool(&self) -> &DocPool {
        &self.pool
    }

    /// Drop a document's cache from the GPU, the disk store and the shared tier (those
    /// configured). Returns whether any held it.
    pub fn forget(&self, key: &DocKey) -> Result<bool> {
        let gpu = self
            .docs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key)
            .is_some();
        let disk = match self.store() {
            Some(s) => s.remove(key)?,
            None => false,
        };
        // The shared tier is a cache too: a failure to reach it is not this call's.
        let shared = match self.shared() {
            Some(sh) => sh.remove(key).unwrap_or_else(|e| {
                eprintln!("kvlink: warning: could not remove document cache {key}: {e}");
                false
            }),
            None => false,
        };
        Ok(gpu || disk || shared)
    }

    /// Whether a document's cache is resident on the GPU now.
    pub fn resident(&self, key: &DocKey) -> bool {
        self.docs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(key)
    }

    /// The cache key of a document's token ids under this model and tokenizer.
    pub fn key(&self, tokens: &[u32]) -> DocKey {
        DocKey::new(&self.fingerprint, &self.tokenizer_fingerprint, tokens)
    }

    /// The shape check of a document cache for this model.
    fn check_doc_shape(
        &self,
        tokens: &[u32],
        n_tokens: usize,
        n_layers: usize,
        kv_dim: usize,
    ) -> Result<()> {
        if n_layers != self.layers || kv_dim != self.kv_dim || n_tokens != tokens.len() {
            return Err(Error::Input(
                "document cache does not match the model's shape".into(),
            ));
        }
        Ok(())
    }

    /// Upload a document cache read from another store (the browser's).
    fn upload_doc(&self, tokens: &[u32], kv: &DocKv) -> Result<DocCache> {
        let want = kv.n_tokens * kv.kv_dim * 2;
        if kv.k.len() != kv.n_layers || kv.v.len() != kv.n_layers {
            return Err(Error::Input(format!(
                "document cache has {} K and {} V layers, {} expected",
                kv.k.len(),
                kv.v.len(),
                kv.n_layers
            )));
        }
        let parts = kv.k.iter().chain(&kv.v);
        if let Some((part, b)) = parts.clone().enumerate().find(|(_, b)| b.len() != want) {
            return Err(Error::Input(format!(
                "document cache part {part} has {} bytes, {want} expected",
                b.len()
            )));
        }
        let shape = (kv.n_tokens, kv.n_layers, kv.kv_dim);
        let mut sink = self.upload_sink(tokens, shape, KvFormat::F16)?;
        for (part, bytes) in parts.enumerate() {
            sink.write(part, 0, bytes);
        }
        sink.finish()
    }

    /// A sink that uploads a disk-store entry as it is read: file -> (L2-sized chunk) ->
    /// pooled staging memory -> GPU buffers, with no host copy of the whole cache.
    /// `shape`: tokens, layers, kv_dim; `format`: how the entry's parts are stored (q8
    /// parts are turned into f16 as they arrive, so the GPU always gets f16).
    fn upload_sink(
        &self,
        tokens: &[u32],
        (n_tokens, n_layers, kv_dim): (usize, usize, usize),
        format: KvFormat,
    ) -> Result<UploadSink> {
        self.check_doc_shape(tokens, n_tokens, n_layers, kv_dim)?;
        let lease = self.pool.lease(n_tokens)?;
        // One staging buffer per document, or per group of layers for a cache too big
        // for one buffer; straight into pool rows where the pool has room.
        let n = 2 * n_layers;
        let part_bytes = (n_tokens * kv_dim * 2).max(4) as u64;
        let max = UPLOAD_BYTES.min(self.gpu.limits.max_buffer_size);
        let per = ((max / part_bytes) as usize).clamp(1, n.max(1));
        let uploads = (0..n)
            .step_by(per)
            .map(|i| {
                let parts = i..(i + per).min(n);
                match &lease {
                    Some(l) => {
                        let (k, v, at) = l.rows();
                        let rb = (kv_dim * 2) as u64;
                        let dests = parts
                            .map(|p| {
                                let t = if p < n_layers {
                                    &k[p]
                                } else {
                                    &v[p - n_layers]
                                };
                                (t.clone(), at as u64 * rb)
                            })
                            .collect();
                        self.gpu.upload_into(dests, n_tokens * kv_dim * 2, "doc kv")
                    }
                    None => self
                        .gpu
                        .upload_f16(parts.len(), &[n_tokens, kv_dim], "doc kv"),
                }
            })
            .collect::<Result<_>>()?;
        let values = n_tokens * kv_dim;
        Ok(UploadSink {
            tokens: tokens.to_vec(),
            uploads,
            per,
            lease,
            q8: (format == KvFormat::Q8).then(|| HostQ8 {
                parts: PartDequantizer::new(values),
                failed: None,
            }),
        })
    }

    /// Make a document cache read from another store (the browser's) resident on the
    /// GPU, as a disk-store hit would.
    pub fn insert(&self, tokens: &[u32], kv: &DocKv) -> Result<Arc<DocCache>> {
        let dc = Arc::new(self.upload_doc(tokens, kv)?);
        self.docs.lock().unwrap_or_else(|e| e.into_inner()).insert(
            self.key(tokens),
            dc.clone(),
            dc.bytes(),
        );
        Ok(dc)
    }

    /// Make `kv` resident under `key` whatever the key says (tests: a hash collision or a
    /// stale key, which [`DocTiers::lookup`] must refuse to serve).
    #[doc(hidden)]
    pub fn insert_with_key(&self, key: DocKey, tokens: &[u32], kv: &DocKv) -> Result<()> {
        let dc = Arc::new(self.upload_doc(tokens, kv)?);
        let bytes = dc.bytes();
        self.docs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, dc, bytes);
        Ok(())
    }

    /// Read a document cache back from the GPU for the disk store.
    fn download_doc(&self, dc: &DocCache) -> Result<DocKv> {
        let (k, v) = dc.download(&self.gpu)?;
        Ok(DocKv {
            n_tokens: dc.len(),
            n_layers: k.len(),
            kv_dim: self.kv_dim,
            k,
            v,
        })
    }

    /// Write a newly computed cache to the disk store and the shared tier, in `format`:
    /// with both, encoded once and the same entry bytes written to each. A tier that
    /// cannot be written (disk full, read-only, unreachable) costs the reuse of this
    /// document later, not this answer: a warning, and nothing else.
    fn write_new(
        &self,
        store: Option<&DiskStore>,
        shared: Option<&dyn SharedStore>,
        key: &DocKey,
        tokens: &[u32],
        kv: &DocKv,
        format: KvFormat,
    ) {
        let (fp, tfp) = (&self.fingerprint, &self.tokenizer_fingerprint);
        let warn_store = |store: &DiskStore, e: Error| {
            eprintln!(
                "kvlink: warning: could not write document cache {key} to the store {} \
                 ({e}); answering without storing it",
                store.dir().display()
            )
        };
        let Some(sh) = shared else {
            if let Some(store) = store {
                // Streamed from the parts: no copy of the whole entry in memory.
                if let Err(e) = store.put_as(key, fp, tfp, tokens, kv, format) {
                    warn_store(store, e);
                }
            }
            return;
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let entry = match crate::kv::store::encode_entry_as(fp, tfp, tokens, kv, format, now_ms) {
            Ok(entry) => entry,
            Err(e) => {
                eprintln!("kvlink: warning: could not encode document cache {key} ({e})");
                return;
            }
        };
        if let Some(store) = store {
            if let Err(e) = store.put_entry(key, &entry) {
                warn_store(store, e);
            }
        }
        if let Err(e) = sh.put(key, &entry) {
            eprintln!(
                "kvlink: warning: could not write document cache {key} to {} ({e}); \
                 answering without sharing it",
                sh.describe()
            );
        }
    }

    /// Look documents up in the disk store and upload the hits. Reading, checksumming
    /// and uploading hundreds of MB of K/V is the slow part of a disk hit, so each
    /// document is read and copied into staging memory on its own thread (natively; one
    /// after another in the browser), each starting its GPU copies as soon as it is done.
    fn read_stored(
        &self,
        store: &DiskStore,
        keys: &[DocKey],
        docs: &[(usize, &[u32])],
    ) -> Vec<(Result<Lookup<DocCache>>, ReadTimes)> {
        let get = |&(i, d): &(usize, &[u32])| {
            let mut times = ReadTimes::default();
            let found = store.get_with(
                &keys[i],
                &self.fingerprint,
                &self.tokenizer_fingerprint,
                d,
                |h| self.upload_sink(d, (h.n_tokens, h.n_layers, h.kv_dim), h.format()),
                &mut times,
            );
            (found, times)
        };
        let lost = || {
            let e = Error::Gpu("document cache reader panicked".into());
            (Err(e), ReadTimes::default())
        };
        crate::par::map(docs, get, lost)
    }

    /// The one lookup path: caches for documents, GPU-resident, else from the disk store,
    /// else from the shared tier (a hit there is written to the disk store too), else
    /// encoded by `model` (all missing documents in one batch, `chunk` tokens per
    /// forward) and written to the disk store and the shared tier; every hit and every
    /// new cache ends up resident. Returns the caches and, per document, where each came
    /// from.
    pub fn lookup(
        &self,
        model: &Llama,
        docs: &[&[u32]],
        chunk: usize,
    ) -> Result<(Vec<Arc<DocCache>>, Vec<CacheSource>)> {
        let found = self.lookup_timed(model, docs, chunk)?;
        Ok((found.caches, found.sources))
    }

    /// [`DocTiers::lookup`], also saying where the disk store's reads spent their time.
    pub fn lookup_timed(&self, model: &Llama, docs: &[&[u32]], chunk: usize) -> Result<Found> {
        let mut lru = self.docs.lock().unwrap_or_else(|e| e.into_inner());
        let store = self.store();
        let keys: Vec<DocKey> = docs.iter().map(|d| self.key(d)).collect();
        let mut found: HashMap<&DocKey, (Arc<DocCache>, CacheSource)> = HashMap::new();
        let mut candidates: Vec<(usize, &[u32])> = Vec::new();
        for (i, (d, k)) in docs.iter().zip(&keys).enumerate() {
            if found.contains_key(k) || candidates.iter().any(|(j, _)| keys[*j] == *k) {
                continue;
            }
            if let Some(dc) = lru.get(k).cloned() {
                // The key is a hash: as the disk store does, serve a resident cache only
                // for exactly these token ids (a collision or stale key is a miss).
                if dc.tokens == *d {
                    // Keep its disk entry recent too, so that the store's LRU eviction
                    // does not drop a document that is used all the time from the GPU
                    // (at most every few minutes: most hits cost no system call).
                    if let Some(store) = &store {
                        store.touch(k);
                    }
                    found.insert(k, (dc, CacheSource::Gpu));
                    continue;
                }
                lru.remove(k);
            }
            candidates.push((i, d));
        }
        let mut missing: Vec<(usize, &[u32])> = Vec::new();
        let mut disk = None;
        match &store {
            None => missing = candidates,
            Some(store) => {
                let t = web_time::Instant::now();
                let lookups = self.read_stored(store, &keys, &candidates);
                let mut reads = DiskReads {
                    wall: t.elapsed(),
                    ..DiskReads::default()
                };
                for (_, times) in &lookups {
                    reads.phases.add(times);
                }
                if reads.phases.entries > 0 {
                    disk = Some(reads);
                }
                for ((i, d), (lookup, _)) in candidates.into_iter().zip(lookups) {
                    let k = &keys[i];
                    // The store is a cache: a read that fails (permissions, I/O) is a
                    // miss, reported, and the request goes on.
                    let lookup = lookup.unwrap_or_else(|e| {
                        eprintln!(
                            "kvlink: warning: could not read document cache {k} from the \
                             store ({e}); recomputing it"
                        );
                        Lookup::Miss
                    });
                    match lookup {
                        Lookup::Hit(dc) => {
                            // (in pool rows already, if the pool had room: see upload_sink)
                            let dc = Arc::new(dc);
                            lru.insert(k.clone(), dc.clone(), dc.bytes());
                            found.insert(k, (dc, CacheSource::Disk));
                            continue;
                        }
                        Lookup::Corrupt(why) => {
                            eprintln!(
                                "kvlink: document cache {k} was corrupt ({why}); recomputing it"
                            );
                        }
                        Lookup::Miss | Lookup::Mismatch(_) => {}
                    }
                    missing.push((i, d));
                }
            }
        }
        let shared = self.shared();
        if let Some(sh) = &shared {
            let mut still = Vec::new();
            for (i, d) in missing {
                let k = &keys[i];
                let Some((kv, entry)) = self.read_shared(sh.as_ref(), k, d) else {
                    still.push((i, d));
                    continue;
                };
                let dc = Arc::new(self.upload_doc(d, &kv)?);
                if let Some(store) = &store {
                    // The entry as the shared tier has it (its format, f16 or q8).
                    if let Err(e) = store.put_entry(k, &entry) {
                        eprintln!(
                            "kvlink: warning: could not write document cache {k} to the store \
                             {} ({e}); going on without it",
                            store.dir().display()
                        );
                    }
                }
                lru.insert(k.clone(), dc.clone(), dc.bytes());
                found.insert(k, (dc, CacheSource::Shared));
            }
            missing = still;
        }
        let batch: Vec<&[u32]> = missing.iter().map(|(_, d)| *d).collect();
        let format = self.format();
        for ((i, d), dc) in missing.iter().zip(super::encode_documents(
            model,
            &batch,
            chunk,
            Some(&self.pool),
        )?) {
            let dc = Arc::new(dc);
            if store.is_some() || shared.is_some() {
                let kv = self.download_doc(&dc)?;
                self.write_new(store.as_ref(), shared.as_deref(), &keys[*i], d, &kv, format);
            }
            lru.insert(keys[*i].clone(), dc.clone(), dc.bytes());
            found.insert(&keys[*i], (dc, CacheSource::Computed));
        }
        let mut out = Vec::with_capacity(docs.len());
        let mut src = Vec::with_capacity(docs.len());
        for k in &keys {
            let (dc, s) = &found[k];
            out.push(dc.clone());
            src.push(*s);
        }
        Ok(Found {
            caches: out,
            sources: src,
            disk,
        })
    }

    /// Forget all GPU-resident document caches.
    pub fn clear(&self) {
        self.docs.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.pool.trim();
    }
}

/// What [`DocTiers::lookup_timed`] found: per document, its cache and where it came from.
pub struct Found {
    pub caches: Vec<Arc<DocCache>>,
    pub sources: Vec<CacheSource>,
    /// Where the disk store's reads spent their time, if any entry was read.
    pub disk: Option<DiskReads>,
}

/// See [`DocTiers::upload_sink`].
struct UploadSink {
    tokens: Vec<u32>,
    /// K of every layer, then V of every layer (the store's part order), `per` parts in
    /// each upload.
    uploads: Vec<TensorUpload>,
    per: usize,
    /// The pool rows the uploads fill, if the pool had room.
    lease: Option<Lease>,
    /// For a q8 entry: its parts, turned into f16 as they are read.
    q8: Option<HostQ8>,
}

/// A q8 entry's parts, each turned into f16 by the reading thread once its last bytes
/// arrive, then written to the f16 staging: the GPU gets plain copies, as for an f16
/// entry, and no dispatch per layer.
struct HostQ8 {
    parts: PartDequantizer,
    /// Why a part could not be turned into f16 (reported by `finish`).
    failed: Option<crate::Error>,
}

impl PayloadSink for UploadSink {
    type Output = DocCache;

    fn write(&mut self, part: usize, offset: usize, bytes: &[u8]) {
        let upload = &mut self.uploads[part / self.per];
        let Some(h) = &mut self.q8 else {
            return upload.write(part % self.per, offset, bytes);
        };
        match h.parts.push(offset, bytes) {
            None => {}
            Some(Ok(f16)) => upload.write(part % self.per, 0, f16),
            Some(Err(e)) => {
                h.failed.get_or_insert(e);
            }
        }
    }

    fn finish(self) -> Result<DocCache> {
        if let Some(e) = self.q8.and_then(|h| h.failed) {
            return Err(crate::Error::Input(format!("a q8 document cache: {e}")));
        }
        // Submits this document's copies now, while other threads still read theirs.
        let mut k: Vec<Tensor> = self
            .uploads
            .into_iter()
            .flat_map(TensorUpload::finish)
            .collect();
        Ok(match self.lease {
            Some(lease) => DocCache::leased(self.tokens, lease),
            None => {
                let v = k.split_off(k.len() / 2);
                DocCache::new(self.tokens, k, v)
            }
        })
    }
}
