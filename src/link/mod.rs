//! KVLink: per-document KV caches reused across requests (KVLINK.md).
//!
//! A request flows: plan (tokens, segments, positions) -> document cache lookups (GPU,
//! then disk, else encode the missing documents together with a block-diagonal mask)
//! -> assembly on the GPU (encode the prefix, copy each document's K/V into place,
//! rotate every document's keys by its position delta) -> prefill of the seg-0 tokens
//! after the prefix -> sample -> decode.

pub mod plan;

pub use plan::{DocSpan, LinkConfig, PromptPlan};

use crate::error::{Error, Result};
use crate::gpu::{Step, Tensor};
use crate::model::llama::{Batch, ForwardOut, KvCache, Llama, Logits};
use crate::ops;
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
/// 0..n-1) and V, `[n, kv_dim]`.
pub struct DocCache {
    pub tokens: Vec<u32>,
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl DocCache {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    pub fn bytes(&self) -> u64 {
        self.k.iter().chain(&self.v).map(|t| t.byte_len()).sum()
    }
}

/// Where the time to first token went.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Timings {
    /// Tokenize, plan, and find/load/encode document caches.
    #[serde(with = "ms")]
    pub lookup: Duration,
    /// Prefix encode, K/V copies and key rotation.
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
}

mod ms {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1e3)
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
/// block-diagonal mask, and cut the result into one [`DocCache`] per document.
pub fn encode_documents(model: &Llama, docs: &[&[u32]], chunk: usize) -> Result<Vec<DocCache>> {
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
        out.push(DocCache {
            tokens: d.to_vec(),
            k,
            v,
        });
        start += n;
    }
    st.submit();
    Ok(out)
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
            // 1. the prefix: copied from its cache, or encoded normally
            let p = plan.prefix_len;
            let kvd = model.cfg.kv_dim();
            let prefix = prefix.filter(|c| p > 0 && c.tokens[..] == plan.tokens[..p]);
            if let Some(pc) = prefix {
                let mut st = Step::new(gpu);
                for l in 0..model.cfg.num_hidden_layers {
                    st.copy(&pc.k[l], 0, &cache.k[l], 0, (p * kvd * 2) as u64);
                    st.copy(&pc.v[l], 0, &cache.v[l], 0, (p * kvd * 2) as u64);
                }
                st.submit();
            } else if p > 0 {
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
            // 2. copy each document's K/V into place; 3. rotate keys by their deltas
            let mut st = Step::new(gpu);
            for (span, dc) in plan.docs.iter().zip(docs) {
                if dc.len() != span.len {
                    return Err(Error::Input(format!(
                        "document cache has {} tokens, the plan expects {}",
                        dc.len(),
                        span.len
                    )));
                }
                let (off, bytes) = ((span.start * kvd * 2) as u64, (span.len * kvd * 2) as u64);
                for l in 0..model.cfg.num_hidden_layers {
                    st.copy(&dc.k[l], 0, &cache.k[l], off, bytes);
                    st.copy(&dc.v[l], 0, &cache.v[l], off, bytes);
                }
            }
            if mode == Mode::Kvlink && !plan.docs.is_empty() {
                let first = plan.docs[0].start;
                let last = plan.docs.last().map(|d| d.start + d.len).unwrap_or(first);
                let mut deltas = vec![0i32; last - first];
                for d in &plan.docs {
                    deltas[d.start - first..d.start - first + d.len].fill(d.start as i32);
                }
                let dt = Tensor::from_u32(
                    gpu,
                    &[deltas.len()],
                    bytemuck::cast_slice(&deltas),
                    "deltas",
                )?;
                let c = &model.cfg;
                for l in 0..c.num_hidden_layers {
                    ops::rotate_keys(
                        &mut st,
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
