//! KVLink: per-document KV caches reused across requests (KVLINK.md).
//!
//! A request flows: plan (tokens, segments, positions) -> document cache lookups (GPU,
//! then disk, else encode the missing documents together with a block-diagonal mask)
//! -> assembly on the GPU (encode the prefix, gather each document's K/V from the pool
//! into place with its keys turned by its position delta, see [`pool`]) -> prefill of
//! the seg-0 tokens after the prefix -> sample -> decode.

pub mod batch;
pub mod plan;
pub mod pool;
pub mod tiers;

pub use plan::{DocSpan, LinkConfig, PromptPlan};
pub use pool::DocPool;
pub use tiers::{CacheSource, DocTiers};

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Step, Tensor};
use crate::kv::serde_ms as ms;
use crate::model::llama::{Batch, ForwardOut, KvCache, Llama, Logits};
use crate::ops;
use std::sync::Arc;
use std::time::Duration;

/// How a request's prompt is processed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Ordinary causal prefill of the whole prompt, no reuse (the baseline).
    Full,
    /// Reuse document caches, rotated to their positions (KVLINK.md §1-4).
    Kvlink,
    /// Reuse without the position fix (documents keep local positions): for comparison.
    Naive,
    /// One forward pass over the whole prompt with the §2 segment mask, no reuse: what
    /// `kvlink` must equal (the invariant of §3).
    Masked,
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Mode> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(Mode::Full),
            "kvlink" => Ok(Mode::Kvlink),
            "naive" => Ok(Mode::Naive),
            "masked" => Ok(Mode::Masked),
            _ => Err(Error::Input(format!(
                "unknown mode {s:?}: use full, kvlink, naive or masked"
            ))),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Full => "full",
            Mode::Kvlink => "kvlink",
            Mode::Naive => "naive",
            Mode::Masked => "masked",
        })
    }
}

/// A document's KV cache on the GPU: per layer f16 K (post-RoPE at local positions
/// 0..n-1) and V, rows `row0 .. row0 + n` of `[rows, kv_dim]` tensors: buffers of its own
/// (`row0` 0), or a slab of a [`DocPool`] it holds a lease on.
pub struct DocCache {
    pub tokens: Vec<u32>,
    pub(crate) k: Vec<Tensor>,
    pub(crate) v: Vec<Tensor>,
    pub(crate) row0: usize,
    lease: Option<pool::Lease>,
}

impl DocCache {
    /// A cache in buffers of its own, `[n, kv_dim]` per layer.
    pub fn new(tokens: Vec<u32>, k: Vec<Tensor>, v: Vec<Tensor>) -> DocCache {
        DocCache {
            tokens,
            k,
            v,
            row0: 0,
            lease: None,
        }
    }
    /// A cache in the rows `lease` holds (filled by the caller).
    pub fn leased(tokens: Vec<u32>, lease: pool::Lease) -> DocCache {
        DocCache {
            tokens,
            k: lease.slab.k.clone(),
            v: lease.slab.v.clone(),
            row0: lease.start,
            lease: Some(lease),
        }
    }
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    /// Bytes of K and V this document's rows take.
    pub fn bytes(&self) -> u64 {
        let row: u64 = self.k.iter().chain(&self.v).map(row_bytes).sum();
        row * self.len() as u64
    }
    /// The pool slab holding the rows, if pooled.
    pub fn slab(&self) -> Option<&Arc<pool::Slab>> {
        self.lease.as_ref().map(|l| &l.slab)
    }
    /// The rows moved into `pool` (one copy per layer of K and V), or `self` unchanged
    /// when it is pooled already or the pool has no room.
    pub fn into_pool(self, pool: &DocPool) -> Result<DocCache> {
        if self.lease.is_some() || self.is_empty() {
            return Ok(self);
        }
        let gpu = pool.gpu();
        let mut st = Step::new(gpu);
        match pool.copy_in(&mut st, &self.k, &self.v, self.row0, self.len())? {
            Some(lease) => {
                st.submit();
                Ok(DocCache::leased(self.tokens, lease))
            }
            None => Ok(self),
        }
    }
    /// Per layer, the K and V bytes of the rows (f16, `n * kv_dim * 2` each).
    pub fn download(&self, gpu: &Gpu) -> Result<(LayerBytes, LayerBytes)> {
        let n = self.len();
        let own;
        let (k, v) = if self.lease.is_some() {
            // copy the rows out of the slab first: a slab is far bigger than one document
            let mut st = Step::new(gpu);
            let mut k = Vec::with_capacity(self.k.len());
            let mut v = Vec::with_capacity(self.v.len());
            for (src, dst) in [(&self.k, &mut k), (&self.v, &mut v)] {
                for t in src {
                    let rb = row_bytes(t);
                    let o = Tensor::zeros(gpu, &[n, t.shape[1]], DType::F16, "doc readback")?;
                    st.copy(t, self.row0 as u64 * rb, &o, 0, n as u64 * rb);
                    dst.push(o);
                }
            }
            st.submit();
            own = (k, v);
            (&own.0, &own.1)
        } else {
            (&self.k, &self.v)
        };
        let rd = |t: &Tensor| -> Result<Vec<u8>> {
            let w = gpu.read_words(t)?;
            let n = n * row_bytes(t) as usize;
            Ok(bytemuck::cast_slice::<u32, u8>(&w)[..n].to_vec())
        };
        Ok((
            k.iter().map(rd).collect::<Result<_>>()?,
            v.iter().map(rd).collect::<Result<_>>()?,
        ))
    }
}

/// Per layer, the bytes of one tensor.
pub type LayerBytes = Vec<Vec<u8>>;

/// Bytes of one row of a `[rows, kv_dim]` f16 tensor.
fn row_bytes(t: &Tensor) -> u64 {
    (t.shape.get(1).copied().unwrap_or(0) * 2) as u64
}

/// Where the time to first token went.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Timings {
    /// Tokenize, plan, and find/load/encode document caches (host time: GPU work it
    /// queues, copies of disk hits and encoding, runs on into the later phases).
    #[serde(with = "ms")]
    pub lookup: Duration,
    /// Prefix encode, K/V gather and key rotation (recorded and submitted).
    #[serde(with = "ms")]
    pub assemble: Duration,
    /// Prefill of the new tokens up to the first token's logits.
    #[serde(with = "ms")]
    pub prefill: Duration,
    /// Whole time to first token.
    #[serde(with = "ms")]
    pub ttft: Duration,
    pub cached_docs: usize,
    /// Of the cached documents, those read from the disk store.
    pub disk_docs: usize,
    /// Of the cached documents, those read from the shared tier (Redis).
    pub shared_docs: usize,
    /// The prefix's KV came from the cache (not computed for this request).
    pub prefix_cached: bool,
    pub computed_docs: usize,
    pub cached_doc_tokens: usize,
    pub computed_doc_tokens: usize,
    /// Tokens run through the model for this request before the first token.
    pub prefill_tokens: usize,
    pub prompt_tokens: usize,
    /// Where the disk store's reads spent their time, if any entry was read.
    pub disk_reads: Option<DiskReads>,
}

/// Where a request's disk-store reads spent their time: `wall` is the parallel read of
/// every entry (one thread per document, up to the cores); the phases are summed over
/// those threads (so they can add up to more than `wall`).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct DiskReads {
    #[serde(with = "ms")]
    pub wall: Duration,
    #[serde(flatten)]
    pub phases: crate::kv::store::ReadTimes,
}

impl std::fmt::Display for DiskReads {
    /// One line: wall time, then the per-thread sums.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let p = &self.phases;
        write!(
            f,
            "{} entries, {:.1} MB in {:.2} ms; thread sums: open {:.2}, setup {:.2}, read {:.2}, \
             hash {:.2}, copy {:.2}, finish {:.2} ms",
            p.entries,
            p.bytes as f64 / 1e6,
            ms(self.wall),
            ms(p.open),
            ms(p.setup),
            ms(p.read),
            ms(p.hash),
            ms(p.copy),
            ms(p.finish),
        )
    }
}

impl std::fmt::Display for Timings {
    /// "TTFT = lookup + assembly + prefill | tokens | documents by tier", one line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(
            f,
            "{:.1} ms = lookup {:.1} + assembly {:.1} + prefill/first token {:.1} | {} prompt \
             tokens, {} computed | docs: {} cached ({} from disk, {} from redis, {} tokens), \
             {} computed ({} tokens)",
            ms(self.ttft),
            ms(self.lookup),
            ms(self.assemble),
            ms(self.prefill),
            self.prompt_tokens,
            self.prefill_tokens,
            self.cached_docs,
            self.disk_docs,
            self.shared_docs,
            self.cached_doc_tokens,
            self.computed_docs,
            self.computed_doc_tokens,
        )
    }
}

/// Run `tokens` at `positions` into `slots` of `cache`, in chunks of at most `chunk`
/// tokens (slots ascending). Logits/greedy token of the last token if asked.
#[allow(clippy::too_many_arguments)]
pub fn run_chunked(
    model: &Llama,
    cache: &mut KvCache,
    tokens: &[u32],
    positions: &[i32],
    slots: &[u32],
    chunk: usize,
    logits: Logits,
    greedy: bool,
) -> Result<ForwardOut> {
    let n = tokens.len();
    let mut out = ForwardOut::default();
    let mut i = 0;
    while i < n {
        let end = (i + chunk).min(n);
        let last = end == n;
        let batch = Batch {
            tokens: &tokens[i..end],
            positions: &positions[i..end],
            slots: &slots[i..end],
        };
        out = model.forward(
            cache,
            &batch,
            if last { logits } else { Logits::None },
            last && greedy,
        )?;
        i = end;
    }
    Ok(out)
}

/// Encode documents alone (each at positions 0..n-1), all in one batched pass with a
/// block-diagonal mask, and cut the result into one [`DocCache`] per document: rows of
/// `pool` where it has room, else buffers of their own.
pub fn encode_documents(
    model: &Llama,
    docs: &[&[u32]],
    chunk: usize,
    pool: Option<&DocPool>,
) -> Result<Vec<DocCache>> {
    if docs.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(j) = docs.iter().position(|d| d.is_empty()) {
        return Err(Error::Input(format!("document {} is empty", j + 1)));
    }
    let total: usize = docs.iter().map(|d| d.len()).sum();
    let gpu = model.gpu();
    let mut cache = model.new_cache(total)?;
    let mut tokens = Vec::with_capacity(total);
    let mut positions = Vec::with_capacity(total);
    let mut segs = Vec::with_capacity(total);
    for (j, d) in docs.iter().enumerate() {
        tokens.extend_from_slice(d);
        positions.extend(0..d.len() as i32);
        segs.extend(std::iter::repeat_n(j as u32 + 1, d.len()));
    }
    let slots: Vec<u32> = (0..total as u32).collect();
    cache.set_segments(gpu, &segs)?;
    run_chunked(
        model,
        &mut cache,
        &tokens,
        &positions,
        &slots,
        chunk,
        Logits::None,
        false,
    )?;
    let kvd = model.cfg.kv_dim();
    let mut out = Vec::with_capacity(docs.len());
    let mut st = Step::new(gpu);
    let mut start = 0usize;
    for d in docs {
        let n = d.len();
        if let Some(pool) = pool {
            if let Some(lease) = pool.copy_in(&mut st, &cache.k, &cache.v, start, n)? {
                out.push(DocCache::leased(d.to_vec(), lease));
                start += n;
                continue;
            }
        }
        let mut k = Vec::with_capacity(model.cfg.num_hidden_layers);
        let mut v = Vec::with_capacity(model.cfg.num_hidden_layers);
        for l in 0..model.cfg.num_hidden_layers {
            let kt = Tensor::zeros(gpu, &[n, kvd], crate::gpu::DType::F16, "doc k")?;
            let vt = Tensor::zeros(gpu, &[n, kvd], crate::gpu::DType::F16, "doc v")?;
            let (off, bytes) = ((start * kvd * 2) as u64, (n * kvd * 2) as u64);
            st.copy(&cache.k[l], off, &kt, 0, bytes);
            st.copy(&cache.v[l], off, &vt, 0, bytes);
            k.push(kt);
            v.push(vt);
        }
        out.push(DocCache::new(d.to_vec(), k, v));
        start += n;
    }
    st.submit();
    Ok(out)
}

/// Put document caches into `cache`: `(cache, first slot, delta)` each, keys turned by
/// their deltas. Pooled caches are gathered with one dispatch per slab and layer; the
/// others are copied and then rotated in place.
fn place(
    model: &Llama,
    st: &mut Step,
    cache: &KvCache,
    placed: &[(&DocCache, usize, i32)],
) -> Result<()> {
    let gpu = model.gpu();
    let c = &model.cfg;
    let kvd = c.kv_dim();
    let (pooled, own): (Vec<_>, Vec<_>) = placed.iter().partition(|(dc, ..)| dc.slab().is_some());
    // pooled: per slab, a table over the slots its documents cover
    let mut slabs: Vec<&Arc<pool::Slab>> =
        pooled.iter().filter_map(|(dc, _, _)| dc.slab()).collect();
    slabs.sort_by_key(|s| s.id());
    slabs.dedup_by_key(|s| s.id());
    for slab in slabs {
        let mine: Vec<_> = pooled
            .iter()
            .filter(|(dc, ..)| dc.slab().is_some_and(|s| s.id() == slab.id()))
            .collect();
        let lo = mine.iter().map(|(_, at, _)| *at).min().unwrap_or(0);
        let hi = mine
            .iter()
            .map(|(dc, at, _)| at + dc.len())
            .max()
            .unwrap_or(lo);
        let mut table = vec![u32::MAX; 2 * (hi - lo)];
        for (dc, at, delta) in mine {
            if dc.row0 + dc.len() > slab.rows() {
                return Err(Error::Gpu(format!(
                    "document cache rows {}..{} outside its slab of {}",
                    dc.row0,
                    dc.row0 + dc.len(),
                    slab.rows()
                )));
            }
            for t in 0..dc.len() {
                table[2 * (at - lo + t)] = (dc.row0 + t) as u32;
                table[2 * (at - lo + t) + 1] = *delta as u32;
            }
        }
        let tt = Tensor::from_u32(gpu, &[table.len()], &table, "assembly table")?;
        for l in 0..c.num_hidden_layers {
            ops::assemble_kv(
                st,
                &slab.k[l],
                &slab.v[l],
                &tt,
                &cache.k[l],
                &cache.v[l],
                lo,
                hi - lo,
                c.num_key_value_heads,
                c.head_dim,
                model.inv_freq(),
                false,
            )?;
        }
    }
    // own buffers: copies, then one rotation pass over the slots they cover
    let rb = (kvd * 2) as u64;
    for (dc, at, _) in &own {
        let (from, to, bytes) = (dc.row0 as u64 * rb, *at as u64 * rb, dc.len() as u64 * rb);
        for l in 0..c.num_hidden_layers {
            st.copy(&dc.k[l], from, &cache.k[l], to, bytes);
            st.copy(&dc.v[l], from, &cache.v[l], to, bytes);
        }
    }
    let turned: Vec<_> = own
        .iter()
        .filter(|(dc, _, d)| *d != 0 && !dc.is_empty())
        .collect();
    if let (Some(first), Some(last)) = (
        turned.iter().map(|(_, at, _)| *at).min(),
        turned.iter().map(|(dc, at, _)| at + dc.len()).max(),
    ) {
        let mut deltas = vec![0i32; last - first];
        for (dc, at, d) in turned {
            deltas[at - first..at - first + dc.len()].fill(*d);
        }
        let dt = Tensor::from_u32(
            gpu,
            &[deltas.len()],
            bytemuck::cast_slice(&deltas),
            "deltas",
        )?;
        for l in 0..c.num_hidden_layers {
            ops::rotate_keys(
                st,
                &cache.k[l],
                first,
                deltas.len(),
                c.num_key_value_heads,
                c.head_dim,
                &dt,
                model.inv_freq(),
                false,
            )?;
        }
    }
    Ok(())
}

/// Build the request's KV cache for `plan` in `mode` and prefill up to the first token.
/// `docs[j]` is document j's cache (ignored for `Full` and `Masked`); `prefix`, if
/// given, is the prefix's cache (a prefix is an ordinary prefix cache: encoded alone at
/// positions 0..p-1), otherwise the prefix is encoded here. `extra` slots are
/// reserved for generated tokens. Returns the cache, the last row's output and the
/// time spent assembling (prefix + copies + rotation).
#[allow(clippy::too_many_arguments)]
pub fn assemble_and_prefill(
    model: &Llama,
    plan: &PromptPlan,
    prefix: Option<&DocCache>,
    docs: &[&DocCache],
    mode: Mode,
    extra: usize,
    chunk: usize,
    logits: Logits,
    greedy: bool,
) -> Result<(KvCache, ForwardOut, Duration, usize)> {
    let gpu = model.gpu();
    let n = plan.len();
    let mut cache = model.new_cache(n + extra)?;
    let slots: Vec<u32> = (0..n as u32).collect();
    let t0 = web_time::Instant::now();
    match mode {
        Mode::Full | Mode::Masked => {
            if mode == Mode::Masked {
                cache.set_segments(gpu, &plan.segments)?;
            }
            let out = run_chunked(
                model,
                &mut cache,
                &plan.tokens,
                &plan.positions,
                &slots,
                chunk,
                logits,
                greedy,
            )?;
            Ok((cache, out, Duration::ZERO, n))
        }
        Mode::Kvlink | Mode::Naive => {
            if docs.len() != plan.docs.len() {
                return Err(Error::Input(format!(
                    "{} document caches for {} documents",
                    docs.len(),
                    plan.docs.len()
                )));
            }
            cache.set_segments(gpu, &plan.segments)?;
            // 1. the prefix: placed from its cache, or encoded normally
            let p = plan.prefix_len;
            let prefix = prefix.filter(|c| p > 0 && c.tokens[..] == plan.tokens[..p]);
            if prefix.is_none() && p > 0 {
                run_chunked(
                    model,
                    &mut cache,
                    &plan.tokens[..p],
                    &plan.positions[..p],
                    &slots[..p],
                    chunk,
                    Logits::None,
                    false,
                )?;
            }
            // 2. every cache into place, keys turned by their deltas (KVLINK.md §3)
            let mut placed: Vec<(&DocCache, usize, i32)> = Vec::with_capacity(docs.len() + 1);
            if let Some(pc) = prefix {
                placed.push((pc, 0, 0));
            }
            for (span, dc) in plan.docs.iter().zip(docs) {
                if dc.len() != span.len {
                    return Err(Error::Input(format!(
                        "document cache has {} tokens, the plan expects {}",
                        dc.len(),
                        span.len
                    )));
                }
                let delta = if mode == Mode::Kvlink {
                    span.start as i32
                } else {
                    0
                };
                placed.push((dc, span.start, delta));
            }
            let mut st = Step::new(gpu);
            place(model, &mut st, &cache, &placed)?;
            st.submit();
            let assemble = t0.elapsed();
            // 4. prefill only the seg-0 tokens after the prefix
            let idx = plan.new_token_indices();
            if idx.is_empty() {
                return Err(Error::Input(
                    "nothing after the documents: the question is empty".into(),
                ));
            }
            let toks: Vec<u32> = idx.iter().map(|&i| plan.tokens[i]).collect();
            let pos: Vec<i32> = idx.iter().map(|&i| plan.positions[i]).collect();
            let sl: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
            let out = run_chunked(model, &mut cache, &toks, &pos, &sl, chunk, logits, greedy)?;
            let computed = if prefix.is_some() { 0 } else { p } + idx.len();
            Ok((cache, out, assemble, computed))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_line_names_every_part() {
        let t = Timings {
            lookup: Duration::from_micros(1_250),
            assemble: Duration::from_micros(800),
            prefill: Duration::from_micros(5_400),
            ttft: Duration::from_micros(7_450),
            cached_docs: 3,
            disk_docs: 1,
            shared_docs: 2,
            computed_docs: 1,
            cached_doc_tokens: 900,
            computed_doc_tokens: 300,
            prefill_tokens: 340,
            prompt_tokens: 1240,
            prefix_cached: true,
            disk_reads: None,
        };
        let us = Duration::from_micros;
        let d = DiskReads {
            wall: us(6_660),
            phases: crate::kv::store::ReadTimes {
                entries: 3,
                bytes: 25_165_824,
                open: us(220),
                setup: us(290),
                read: us(3_550),
                hash: us(1_900),
                copy: us(2_560),
                finish: us(3_110),
            },
        };
        assert_eq!(
            d.to_string(),
            "3 entries, 25.2 MB in 6.66 ms; thread sums: open 0.22, setup 0.29, read 3.55, \
             hash 1.90, copy 2.56, finish 3.11 ms"
        );
        assert_eq!(
            t.to_string(),
            "7.5 ms = lookup 1.2 + assembly 0.8 + prefill/first token 5.4 | 1240 prompt tokens, \
             340 computed | docs: 3 cached (1 from disk, 2 from redis, 900 tokens), 1 computed \
             (300 tokens)"
        );
    }
}
