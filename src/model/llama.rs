//! The Llama-family forward pass as a sequence of GPU ops (Llama, SmolLM2, Mistral,
//! Qwen2). Reads like the math:
//!
//! ```text
//! x = embed(tokens)
//! for each layer:
//!     h = rmsnorm(x) ; q, k, v = h Wq, h Wk, h Wv (+ biases)
//!     q, k = rope(q, pos), rope(k, pos) ; cache[slots] = k, v
//!     x += attention(q, cache, mask) Wo
//!     h = rmsnorm(x) ; x += (silu(h Wg) * h Wu) Wd
//! logits = rmsnorm(x) Wlm
//! ```
//! Activations are f32, weights and the KV cache f16. Everything for one call is
//! recorded into one [`Step`] and submitted once.
//!
//! Fewer, larger dispatches (decode is bound by per-dispatch cost): Wq|Wk|Wv are one
//! matrix (one projection into `qkv`), rope + the cache write are one kernel, Wg|Wu are
//! one matrix whose GEMV applies silu(g) * u itself, and the residual adds ride on the
//! Wo and Wd projections (accumulate into x). In decode (one token) on GPU adapters
//! the GEMVs also apply the RMSNorm before them. Six dispatches per layer then: qkv,
//! rope_kv, attention, wo, gate_up, down.

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Step, Tensor};
use crate::model::source::names as n;
use crate::model::{ModelConfig, WeightSource};
use crate::ops::{self, Matrix};
use std::sync::{Arc, Mutex};

struct Layer {
    attn_norm: Tensor,
    /// Wq, Wk, Wv stacked: `[q_dim + 2 kv_dim, hidden]`.
    wqkv: Matrix,
    /// Their biases stacked the same way (Qwen2).
    bqkv: Option<Tensor>,
    wo: Matrix,
    ffn_norm: Tensor,
    /// Wgate, Wup stacked: `[2 ff, hidden]`.
    w_gate_up: Matrix,
    w_down: Matrix,
}

pub struct Llama {
    pub cfg: ModelConfig,
    gpu: Arc<Gpu>,
    /// `[input_vocab, hidden]`: the base vocabulary's rows, then (in parts of their own)
    /// any input-only extra rows.
    embed: Matrix,
    layers: Vec<Layer>,
    final_norm: Tensor,
    /// `[vocab, hidden]`. When tied, a view of the embedding's base rows: the same GPU
    /// buffers (the extra rows sit in parts of their own, which the view leaves out).
    lm_head: Matrix,
    lm_head_tied: bool,
    inv_freq: Tensor,
    scratch: Mutex<Option<Scratch>>,
    capture: Mutex<Option<Arc<MassCapture>>>,
}

/// Attention-mass capture (for inspection): while set on the model, every forward call
/// that produces a token also records, for its last row, the softmax mass each group of
/// key slots receives, per layer and head: one record `[layers][heads][n_groups]`.
pub struct MassCapture {
    /// Group index per cache slot (`[capacity]`, u32).
    pub group: Tensor,
    pub n_groups: usize,
    out: Tensor,
    pub records: Mutex<Vec<Vec<f32>>>,
}

impl MassCapture {
    pub fn new(
        gpu: &Gpu,
        cfg: &ModelConfig,
        groups: &[u32],
        capacity: usize,
        n_groups: usize,
    ) -> Result<MassCapture> {
        let mut g = groups.to_vec();
        g.resize(
            capacity.max(groups.len()),
            n_groups.saturating_sub(1) as u32,
        );
        Ok(MassCapture {
            group: Tensor::from_u32(gpu, &[g.len()], &g, "mass groups")?,
            n_groups,
            out: Tensor::zeros(
                gpu,
                &[cfg.num_hidden_layers * cfg.num_attention_heads * n_groups],
                DType::F32,
                "mass",
            )?,
            records: Mutex::new(Vec::new()),
        })
    }
}

/// The KV cache of one sequence: per layer f16 K and V `[capacity, kv_dim]`, plus the
/// segment id of every slot (KVLINK.md §2; all zero = ordinary causal attention).
/// `seg` holds `[capacity]` segment ids followed by `[capacity]` segment starts (the
/// first slot of the run of equal ids a slot belongs to), so attention of a document
/// token scans only its own document.
pub struct KvCache {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub seg: Tensor,
    pub capacity: usize,
    /// Slots 0..len hold valid entries.
    pub len: usize,
}

impl KvCache {
    pub fn new(gpu: &Gpu, cfg: &ModelConfig, capacity: usize) -> Result<KvCache> {
        let capacity = capacity.max(1);
        let kvd = cfg.kv_dim();
        let mut k = Vec::new();
        let mut v = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            k.push(Tensor::zeros(
                gpu,
                &[capacity, kvd],
                DType::F16,
                &format!("k{l}"),
            )?);
            v.push(Tensor::zeros(
                gpu,
                &[capacity, kvd],
                DType::F16,
                &format!("v{l}"),
            )?);
        }
        let seg = Tensor::zeros(gpu, &[2 * capacity], DType::U32, "seg")?;
        Ok(KvCache {
            k,
            v,
            seg,
            capacity,
            len: 0,
        })
    }

    /// Set the segment id of slots `0..segs.len()` (the rest stay 0).
    pub fn set_segments(&self, gpu: &Gpu, segs: &[u32]) -> Result<()> {
        if segs.len() > self.capacity {
            return Err(Error::Input(format!(
                "{} segment ids for a cache of {} slots",
                segs.len(),
                self.capacity
            )));
        }
        self.seg
            .write_u32(gpu, &crate::ops::segment_words(segs, self.capacity));
        Ok(())
    }

    /// Set the segments of one sequence among several in this cache (the batch
    /// decoder's arena): slots `base..base + segs.len()` get `segs`, their starts are
    /// relative to `base` ([`crate::ops::sequence_segments`]), so that a segment-0 query
    /// of this sequence sees nothing below `base`.
    pub fn set_sequence_segments(&self, gpu: &Gpu, base: usize, segs: &[u32]) -> Result<()> {
        if base + segs.len() > self.capacity {
            return Err(Error::Input(format!(
                "slots {base}..{} of a cache of {} slots",
                base + segs.len(),
                self.capacity
            )));
        }
        let (mut ids, mut starts) = (vec![0; segs.len()], vec![0; segs.len()]);
        crate::ops::sequence_segments(segs, base as u32, &mut ids, &mut starts);
        self.seg.write_u32_at(gpu, base, &ids);
        self.seg.write_u32_at(gpu, self.capacity + base, &starts);
        Ok(())
    }

    /// Bytes of GPU memory held.
    pub fn bytes(&self) -> u64 {
        self.k
            .iter()
            .chain(&self.v)
            .map(|t| t.byte_len())
            .sum::<u64>()
            + self.seg.byte_len()
    }
}

/// Per-call activation buffers, kept and regrown as needed.
struct Scratch {
    rows: usize,
    logit_rows: usize,
    x: Tensor,
    h: Tensor,
    qkv: Tensor,
    q: Tensor,
    att: Tensor,
    /// Gate|up projection (prefill only; decode fuses SwiGLU into the GEMV).
    gu: Tensor,
    act: Tensor,
    tokens: Tensor,
    /// Cache slots of the batch's tokens, then their positions (`[2 t]`).
    idx: Tensor,
    last: Tensor,
    logits: Tensor,
    token_out: Tensor,
}

/// Which rows of the batch need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
}

/// What one forward call processes: tokens at RoPE positions, stored in cache slots.
pub struct Batch<'a> {
    pub tokens: &'a [u32],
    pub positions: &'a [i32],
    pub slots: &'a [u32],
}

impl<'a> Batch<'a> {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

fn load_vec(src: &dyn WeightSource, gpu: &Gpu, name: &str, len: usize) -> Result<Tensor> {
    let t = src.load(name)?;
    if t.numel() != len {
        return Err(Error::BadModel {
            path: src.describe().into(),
            msg: format!("tensor {name} has shape {:?}, expected [{len}]", t.shape),
        });
    }
    Tensor::from_f32(gpu, &[len], &t.data, name)
}

fn load_matrix(
    src: &dyn WeightSource,
    gpu: &Gpu,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Matrix> {
    let data = load_host_matrix(src, name, rows, cols)?;
    Matrix::upload(gpu, rows, cols, &data, name)
}

/// Several `[rows_i, cols]` weights stacked by rows into one matrix (one GEMV for all).
fn load_stacked(
    src: &dyn WeightSource,
    gpu: &Gpu,
    parts: &[(&str, usize)],
    cols: usize,
    label: &str,
) -> Result<Matrix> {
    let mut data = Vec::new();
    for &(name, rows) in parts {
        data.extend(load_host_matrix(src, name, rows, cols)?);
    }
    let rows = parts.iter().map(|p| p.1).sum();
    Matrix::upload(gpu, rows, cols, &data, label)
}

fn load_host_matrix(
    src: &dyn WeightSource,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>> {
    let t = src.load(name)?;
    if t.shape != [rows, cols] {
        return Err(Error::BadModel {
            path: src.describe().into(),
            msg: format!(
                "tensor {name} has shape {:?}, expected [{rows}, {cols}]",
                t.shape
            ),
        });
    }
    if let Some(i) = t.data.iter().position(|x| !x.is_finite()) {
        return Err(Error::BadModel {
            path: src.describe().into(),
            msg: format!("tensor {name} holds a non-finite value at element {i}"),
        });
    }
    Ok(t.data)
}

/// The token embedding `[input_vocab, hidden]`: the base rows uploaded as usual, the
/// extra rows (if any) uploaded separately and appended as parts of their own, so the
/// base rows' parts alone form the tied lm_head.
fn load_embedding(src: &dyn WeightSource, gpu: &Gpu, cfg: &ModelConfig) -> Result<Matrix> {
    let (vocab, d) = (cfg.vocab_size, cfg.hidden_size);
    let data = load_host_matrix(src, n::EMBED, cfg.input_vocab(), d)?;
    let mut m = Matrix::upload(gpu, vocab, d, &data[..vocab * d], n::EMBED)?;
    if cfg.extra_vocab > 0 {
        let extra = Matrix::upload(gpu, cfg.extra_vocab, d, &data[vocab * d..], "extra rows")?;
        m.parts
            .extend(extra.parts.into_iter().map(|(r0, t)| (vocab + r0, t)));
        m.rows += cfg.extra_vocab;
    }
    Ok(m)
}

impl Llama {
    /// Upload all weights. `progress(done, total)` is called after each tensor.
    pub fn load(
        gpu: Arc<Gpu>,
        src: &dyn WeightSource,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Llama> {
        let cfg = src.config().clone();
        cfg.validate().map_err(|m| Error::BadModel {
            path: src.describe().into(),
            msg: m,
        })?;
        let g = &*gpu;
        let (d, qd, kvd, ff) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        let total = cfg.num_hidden_layers * 9 + 3;
        let mut done = 0;
        let mut tick = |p: &mut dyn FnMut(usize, usize), k: usize| {
            done += k;
            p(done, total);
        };
        let embed = load_embedding(src, g, &cfg)?;
        tick(progress, 1);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = |s: &str| n::layer(i, s);
            let bqkv = if cfg.attention_bias {
                let mut b = Vec::with_capacity(qd + 2 * kvd);
                for (name, len) in [(n::Q_BIAS, qd), (n::K_BIAS, kvd), (n::V_BIAS, kvd)] {
                    let t = src.load(&l(name))?;
                    if t.numel() != len {
                        return Err(Error::BadModel {
                            path: src.describe().into(),
                            msg: format!(
                                "tensor {} has shape {:?}, expected [{len}]",
                                l(name),
                                t.shape
                            ),
                        });
                    }
                    b.extend(t.data);
                }
                Some(Tensor::from_f32(g, &[b.len()], &b, &l("qkv_bias"))?)
            } else {
                None
            };
            let (q, k, v) = (l(n::Q), l(n::K), l(n::V));
            let (gate, up) = (l(n::GATE), l(n::UP));
            layers.push(Layer {
                attn_norm: load_vec(src, g, &l(n::ATTN_NORM), d)?,
                wqkv: load_stacked(src, g, &[(&q, qd), (&k, kvd), (&v, kvd)], d, &l("qkv"))?,
                bqkv,
                wo: load_matrix(src, g, &l(n::O), d, qd)?,
                ffn_norm: load_vec(src, g, &l(n::FFN_NORM), d)?,
                w_gate_up: load_stacked(src, g, &[(&gate, ff), (&up, ff)], d, &l("gate_up"))?,
                w_down: load_matrix(src, g, &l(n::DOWN), d, ff)?,
            });
            tick(progress, 9);
        }
        let final_norm = load_vec(src, g, n::FINAL_NORM, d)?;
        let lm_head_tied = cfg.tie_word_embeddings || !src.has(n::LM_HEAD);
        let lm_head = if lm_head_tied {
            Matrix {
                rows: cfg.vocab_size,
                cols: d,
                parts: embed
                    .parts
                    .iter()
                    .filter(|(r0, _)| *r0 < cfg.vocab_size)
                    .cloned()
                    .collect(),
            }
        } else {
            load_matrix(src, g, n::LM_HEAD, cfg.vocab_size, d)?
        };
        tick(progress, 2);
        let inv = cfg.rope_inv_freq();
        let inv_freq = Tensor::from_f32(g, &[inv.len()], &inv, "inv_freq")?;
        Ok(Llama {
            cfg,
            gpu,
            embed,
            layers,
            final_norm,
            lm_head,
            lm_head_tied,
            inv_freq,
            scratch: Mutex::new(None),
            capture: Mutex::new(None),
        })
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    pub fn inv_freq(&self) -> &Tensor {
        &self.inv_freq
    }

    /// Bytes of weights on the GPU.
    pub fn weight_bytes(&self) -> u64 {
        let mut b = self.embed.bytes()
            + if self.lm_head_tied {
                0
            } else {
                self.lm_head.bytes()
            };
        for l in &self.layers {
            for m in [&l.wqkv, &l.wo, &l.w_gate_up, &l.w_down] {
                b += m.bytes();
            }
        }
        b
    }

    /// Whether attention-mass capture is on (it reads back after every step).
    pub fn capturing(&self) -> bool {
        self.capture
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Start (Some) or stop (None) attention-mass capture; see [`MassCapture`].
    pub fn set_capture(&self, c: Option<Arc<MassCapture>>) {
        *self.capture.lock().unwrap_or_else(|e| e.into_inner()) = c;
    }

    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        KvCache::new(&self.gpu, &self.cfg, capacity)
    }

    fn scratch(
        &self,
        rows: usize,
        logit_rows: usize,
    ) -> Result<std::sync::MutexGuard<'_, Option<Scratch>>> {
        let mut s = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let fits = s
            .as_ref()
            .is_some_and(|s| s.rows >= rows && s.logit_rows >= logit_rows);
        if !fits {
            let rows = rows.max(s.as_ref().map_or(0, |s| s.rows));
            let logit_rows = logit_rows
                .max(s.as_ref().map_or(1, |s| s.logit_rows))
                .max(1);
            let c = &self.cfg;
            let g = &*self.gpu;
            let f = |n: usize, l: &str| Tensor::zeros(g, &[n], DType::F32, l);
            let u = |n: usize, l: &str| Tensor::zeros(g, &[n], DType::U32, l);
            *s = Some(Scratch {
                rows,
                logit_rows,
                x: f(rows * c.hidden_size, "x")?,
                h: f(rows * c.hidden_size, "h")?,
                qkv: f(rows * (c.q_dim() + 2 * c.kv_dim()), "qkv")?,
                q: f(rows * c.q_dim(), "q")?,
                att: f(rows * c.q_dim(), "att")?,
                // Decode never touches it: keep it small until a prefill needs it.
                gu: f(
                    if rows > 1 {
                        rows * 2 * c.intermediate_size
                    } else {
                        1
                    },
                    "gu",
                )?,
                act: f(rows * c.intermediate_size, "act")?,
                tokens: u(rows, "tokens")?,
                idx: u(2 * rows, "slots+pos")?,
                last: f(logit_rows * c.hidden_size, "last")?,
                logits: f(logit_rows * c.vocab_size, "logits")?,
                token_out: u(logit_rows.max(4), "token_out")?,
            });
        }
        Ok(s)
    }

    /// Run the model over `batch`, writing its keys/values into `cache` at the batch's
    /// slots (the cache's `seg` must already hold the segment of every slot involved).
    /// Returns the logits of the requested rows (`[rows, vocab]`, read back) and, with
    /// `greedy`, the argmax token of the last row computed on the GPU.
    pub fn forward(
        &self,
        cache: &mut KvCache,
        batch: &Batch,
        logits: Logits,
        greedy: bool,
    ) -> Result<ForwardOut> {
        self.forward_with(cache, batch, logits, greedy, false)
    }

    /// One forward over rows that belong to different sequences sharing `cache`, each in
    /// its own slot range with its segments set by [`KvCache::set_sequence_segments`]
    /// (the batch decoder, `link::DecodeBatch`): a row sees only its own sequence.
    /// Every row's logits are computed; with `greedy` each row's argmax comes back in
    /// [`ForwardOut::tokens`] (and no logits), else the logits of every row.
    pub fn forward_sequences(
        &self,
        cache: &mut KvCache,
        batch: &Batch,
        greedy: bool,
    ) -> Result<ForwardOut> {
        self.forward_with(cache, batch, Logits::All, greedy, true)
    }

    fn forward_with(
        &self,
        cache: &mut KvCache,
        batch: &Batch,
        logits: Logits,
        greedy: bool,
        shared: bool,
    ) -> Result<ForwardOut> {
        let t = batch.len();
        let c = &self.cfg;
        if t == 0 {
            return Err(Error::Input("forward: empty batch".into()));
        }
        if batch.positions.len() != t || batch.slots.len() != t {
            return Err(Error::Input(
                "forward: tokens, positions and slots differ in length".into(),
            ));
        }
        self.check_tokens(batch.tokens)?;
        check_slots(batch.slots, cache)?;
        let logit_rows = match logits {
            Logits::None => 0,
            Logits::Last => 1,
            Logits::All => t,
        };
        // Rows of several sequences: greedy means every row's argmax, read alone (the
        // logits stay on the GPU, in scratch rows for all of them).
        let every_argmax = shared && greedy;
        let logit_rows = if every_argmax { 0 } else { logit_rows };
        let g = &*self.gpu;
        let scratch_rows = if every_argmax { t } else { logit_rows.max(1) };
        let guard = self.scratch(t, scratch_rows)?;
        let s = guard.as_ref().expect("scratch allocated");
        s.tokens.write_u32(g, batch.tokens);
        let mut idx = Vec::with_capacity(2 * t);
        idx.extend_from_slice(batch.slots);
        idx.extend(batch.positions.iter().map(|&p| p as u32));
        s.idx.write_u32(g, &idx);

        let capture = self
            .capture
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let capture = capture.filter(|_| (logit_rows > 0 || greedy) && !shared);
        let mut st = Step::new(g);
        let rec = Record {
            t,
            decode_at: (t == 1 && !shared).then(|| (batch.slots[0], batch.positions[0])),
            tokens: &s.tokens,
            logits,
            logit_rows,
            greedy,
            shared,
            longest: if shared { longest(batch.positions) } else { 0 },
            capture: capture.as_deref(),
            token_out: &s.token_out,
        };
        self.record(&mut st, s, cache, &rec)?;
        let _ = st.submit();
        let end = batch
            .slots
            .iter()
            .map(|&x| x as usize + 1)
            .max()
            .unwrap_or(0);
        cache.len = cache.len.max(end);
        let mut out = ForwardOut::default();
        if let Some(cap) = &capture {
            let rec = g.read_f32(&cap.out)?;
            cap.records
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(rec);
        }
        if every_argmax {
            let ids = g.read_u32(&s.token_out)?;
            out.tokens = ids[..t]
                .iter()
                .map(|&id| self.checked_token(id))
                .collect::<Result<_>>()?;
        } else if greedy {
            out.token = Some(self.checked_token(g.read_u32(&s.token_out)?[0])?);
        }
        if logit_rows > 0 {
            let all = g.read_f32(&s.logits)?;
            out.logits = all[..logit_rows * c.vocab_size].to_vec();
            out.rows = logit_rows;
        }
        // Nothing to read back: return without waiting; later submits are ordered
        // after this one on the queue.
        Ok(out)
    }

    /// A [`DecodePipe`] for [`Llama::decode_async`] (one row a step).
    pub fn decode_pipe(&self) -> Result<DecodePipe> {
        self.decode_pipe_rows(1)
    }

    /// A [`DecodePipe`] for steps of up to `rows` rows
    /// ([`Llama::decode_sequences_async`]); it grows when a step brings its own tokens.
    pub fn decode_pipe_rows(&self, rows: usize) -> Result<DecodePipe> {
        Ok(DecodePipe {
            token: Tensor::zeros(&self.gpu, &[rows.max(4)], DType::U32, "decode token")?,
            ring: Vec::new(),
            next: 0,
            last_rows: None,
        })
    }

    /// One greedy decode step, submitted without waiting: the token at `pos` (cache slot
    /// and position) is `token`, or with None the argmax of the pipe's previous step,
    /// which stays on the GPU. So the next step can be recorded and queued while this one
    /// runs, and the host reads each token while the GPU computes the one after it (the
    /// caller may run one step past a stop; its cache slot is simply overwritten later).
    pub fn decode_async(
        &self,
        pipe: &mut DecodePipe,
        cache: &mut KvCache,
        pos: usize,
        token: Option<u32>,
    ) -> Result<PendingToken> {
        let at = [u32_of(pos)?];
        let tokens = token.map(|t| [t]);
        let tokens = tokens.as_ref().map(|t| t.as_slice());
        self.queue_decode(pipe, cache, &at, &[at[0] as i32], tokens, false)
    }

    /// One greedy step over rows of several sequences sharing `cache` (as
    /// [`Llama::forward_sequences`]), submitted without waiting: row i feeds `tokens[i]`,
    /// or with None the argmax row i of the pipe's previous step produced, which stays on
    /// the GPU (that step must have had as many rows, in the same order: the caller's
    /// contract, as for [`Llama::decode_async`]). [`Llama::read_tokens`] waits for it.
    pub fn decode_sequences_async(
        &self,
        pipe: &mut DecodePipe,
        cache: &mut KvCache,
        slots: &[u32],
        positions: &[i32],
        tokens: Option<&[u32]>,
    ) -> Result<PendingToken> {
        self.queue_decode(pipe, cache, slots, positions, tokens, true)
    }

    /// [`Llama::decode_async`] (one row, `shared` false: the fused decode kernels) and
    /// [`Llama::decode_sequences_async`] (`shared`).
    fn queue_decode(
        &self,
        pipe: &mut DecodePipe,
        cache: &mut KvCache,
        slots: &[u32],
        positions: &[i32],
        tokens: Option<&[u32]>,
        shared: bool,
    ) -> Result<PendingToken> {
        let t = slots.len();
        if t == 0 || positions.len() != t || tokens.is_some_and(|x| x.len() != t) {
            return Err(Error::Input(format!(
                "decode step: {t} slots, {} positions, {:?} tokens",
                positions.len(),
                tokens.map(<[u32]>::len)
            )));
        }
        check_slots(slots, cache)?;
        let g = &*self.gpu;
        match tokens {
            Some(ids) => {
                self.check_tokens(ids)?;
                pipe.reserve(g, t)?;
                pipe.token.write_u32(g, ids);
            }
            None => pipe.follow(t)?,
        }
        let guard = self.scratch(t, t)?;
        let s = guard.as_ref().expect("scratch allocated");
        let mut idx = Vec::with_capacity(2 * t);
        idx.extend_from_slice(slots);
        idx.extend(positions.iter().map(|&p| p as u32));
        s.idx.write_u32(g, &idx);
        let mut st = Step::new(g);
        let rec = Record {
            t,
            decode_at: (!shared).then(|| (slots[0], positions[0])),
            tokens: &pipe.token,
            logits: Logits::All,
            logit_rows: 0,
            greedy: true,
            shared,
            longest: if shared { longest(positions) } else { 0 },
            capture: None,
            token_out: &pipe.token,
        };
        self.record(&mut st, s, cache, &rec)?;
        let p = pipe.submit(g, st, t)?;
        let end = slots.iter().map(|&x| x as usize + 1).max().unwrap_or(0);
        cache.len = cache.len.max(end);
        Ok(p)
    }

    /// Wait for a step of [`Llama::decode_async`] and read its token.
    pub fn read_token(&self, p: PendingToken) -> Result<u32> {
        self.checked_token(p.wait(&self.gpu)?[0])
    }

    /// Wait for a step of [`Llama::decode_sequences_async`] and read every row's token.
    pub fn read_tokens(&self, p: PendingToken) -> Result<Vec<u32>> {
        p.wait(&self.gpu)?
            .into_iter()
            .map(|id| self.checked_token(id))
            .collect()
    }

    /// Refuse token ids past the input vocabulary.
    fn check_tokens(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.cfg.input_vocab();
        match ids.iter().find(|&&x| x as usize >= vocab) {
            Some(bad) => Err(Error::Input(format!(
                "token id {bad} is outside the model's vocabulary ({vocab})"
            ))),
            None => Ok(()),
        }
    }

    /// Greedy decoding on the pipelined path: step `i` feeds the token at slot `pos0 + i`
    /// (`first`, then the previous step's argmax, which stays on the GPU) and yields the
    /// next token, which `take` sees; `steps` steps at most, fewer once `take` returns
    /// false. Two steps stay queued: step i + 1 runs while step i's token is read back,
    /// and step i + 2 is queued before `take` sees that token, so neither the readback nor
    /// the caller's work leaves the GPU idle; at most two steps run past a stop (their
    /// slots, within `pos0 + steps`, are simply overwritten later). Returns the number of
    /// tokens `take` saw.
    pub fn decode_greedy(
        &self,
        pipe: &mut DecodePipe,
        cache: &mut KvCache,
        pos0: usize,
        first: u32,
        steps: usize,
        take: &mut dyn FnMut(u32) -> bool,
    ) -> Result<usize> {
        if pos0 + steps > cache.capacity {
            return Err(Error::Input(format!(
                "{steps} decode steps from slot {pos0} overflow a cache of {} slots",
                cache.capacity
            )));
        }
        let mut inflight = std::collections::VecDeque::with_capacity(2);
        let mut queued = 0;
        while queued < steps.min(2) {
            let token = (queued == 0).then_some(first);
            inflight.push_back(self.decode_async(pipe, cache, pos0 + queued, token)?);
            queued += 1;
        }
        let mut done = 0;
        while let Some(pending) = inflight.pop_front() {
            let t = self.read_token(pending)?;
            done += 1;
            if queued < steps {
                inflight.push_back(self.decode_async(pipe, cache, pos0 + queued, None)?);
                queued += 1;
            }
            if !take(t) {
                break;
            }
        }
        Ok(done)
    }

    /// A GPU argmax: the kernel returns an id past the vocabulary when every logit is NaN.
    fn checked_token(&self, id: u32) -> Result<u32> {
        if id as usize >= self.cfg.vocab_size {
            return Err(Error::Gpu(
                "the model produced non-finite logits (NaN); the weights or the adapter's \
                 arithmetic are broken"
                    .into(),
            ));
        }
        Ok(id)
    }

    /// Record one forward call's dispatches into `st` (see [`Llama::forward`]).
    fn record(&self, st: &mut Step, s: &Scratch, cache: &KvCache, r: &Record) -> Result<()> {
        let c = &self.cfg;
        let (t, logits, logit_rows, greedy) = (r.t, r.logits, r.logit_rows, r.greedy);
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let eps = c.rms_norm_eps;
        ops::embed(st, r.tokens, t, &self.embed, &s.x)?;
        for (i, l) in self.layers.iter().enumerate() {
            let bqkv = l.bqkv.as_ref();
            let (kc, vc) = (&cache.k[i], &cache.v[i]);
            let fused = match r.decode_at {
                Some(at) => ops::qkv_rope_matvec(
                    st,
                    &s.x,
                    &l.attn_norm,
                    eps,
                    &l.wqkv,
                    bqkv,
                    [nh, nkv, hd],
                    &self.inv_freq,
                    at,
                    [&s.q, kc, vc],
                )?,
                None => false,
            };
            if fused {
                // Q rotated into s.q, K and V stored: straight to attention.
            } else if t == 1 {
                let (x, h, nw) = (&s.x, &s.h, &l.attn_norm);
                ops::rms_norm_matvec(st, x, 0, nw, eps, h, &l.wqkv, bqkv, &s.qkv, 0, false)?;
            } else {
                ops::rms_norm(st, &s.x, 0, t, &l.attn_norm, &s.h, 0, eps)?;
                ops::matmul(st, &s.h, 0, t, &l.wqkv, bqkv, &s.qkv, 0, false)?;
            }
            if !fused {
                ops::rope_kv(
                    st,
                    &s.qkv,
                    t,
                    nh,
                    nkv,
                    hd,
                    &s.idx,
                    &self.inv_freq,
                    false,
                    &s.q,
                    kc,
                    vc,
                )?;
            }
            let operands = ops::Attn {
                q: &s.q,
                t,
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                kc: &cache.k[i],
                vc: &cache.v[i],
                qslot: &s.idx,
                seg: &cache.seg,
                out: &s.att,
            };
            if r.shared {
                ops::attention_sequences(st, &operands, r.longest)?;
            } else {
                ops::attention(st, &operands)?;
            }
            if let Some(cap) = r.capture {
                let n = cap.n_groups;
                ops::attention_mass(
                    st,
                    &s.q,
                    t - 1,
                    nh,
                    nkv,
                    hd,
                    &cache.k[i],
                    &s.idx,
                    &cache.seg,
                    &cap.group,
                    n,
                    &cap.out,
                    i * nh * n,
                )?;
            }
            ops::matmul(st, &s.att, 0, t, &l.wo, None, &s.x, 0, true)?;
            if t == 1 {
                let (x, h, nw) = (&s.x, &s.h, &l.ffn_norm);
                ops::rms_norm_matvec_swiglu(st, x, nw, eps, h, &l.w_gate_up, &s.gu, &s.act)?;
            } else {
                ops::rms_norm(st, &s.x, 0, t, &l.ffn_norm, &s.h, 0, eps)?;
                ops::matmul_swiglu(st, &s.h, t, &l.w_gate_up, &s.gu, &s.act)?;
            }
            ops::matmul(st, &s.act, 0, t, &l.w_down, None, &s.x, 0, true)?;
        }
        let head = &self.lm_head;
        if r.shared && greedy {
            // Every row's logits (in s.logits), then every row's argmax.
            let (x, nw) = (&s.x, &self.final_norm);
            let (rows, vocab) = (t, c.vocab_size);
            ops::rms_norm(st, x, 0, rows, nw, &s.last, 0, eps)?;
            ops::matmul(st, &s.last, 0, rows, head, None, &s.logits, 0, false)?;
            ops::argmax_rows(st, &s.logits, 0, vocab, rows, r.token_out)?;
        } else if logit_rows > 0 || greedy {
            let (row0, rows) = if logits == Logits::All {
                (0, t)
            } else {
                (t - 1, 1)
            };
            if rows == 1 {
                let (x, nw, last) = (&s.x, &self.final_norm, &s.last);
                ops::rms_norm_matvec(st, x, row0, nw, eps, last, head, None, &s.logits, 0, false)?;
            } else {
                ops::rms_norm(st, &s.x, row0, rows, &self.final_norm, &s.last, 0, eps)?;
                ops::matmul(st, &s.last, 0, rows, head, None, &s.logits, 0, false)?;
            }
            if greedy {
                ops::argmax(
                    st,
                    &s.logits,
                    (rows - 1) * c.vocab_size,
                    c.vocab_size,
                    r.token_out,
                )?;
            }
        }
        Ok(())
    }
}

/// The most keys a row of a decode step sees: its position + 1 (a sequence's first slot
/// holds position 0).
fn longest(positions: &[i32]) -> usize {
    positions
        .iter()
        .map(|&p| p.max(0) as usize + 1)
        .max()
        .unwrap_or(1)
}

/// Refuse cache slots past the cache's capacity.
fn check_slots(slots: &[u32], cache: &KvCache) -> Result<()> {
    match slots.iter().find(|&&s| s as usize >= cache.capacity) {
        Some(s) => Err(Error::Input(format!(
            "cache slot {s} is beyond the cache capacity {}",
            cache.capacity
        ))),
        None => Ok(()),
    }
}

/// A cache slot as the kernels index it.
fn u32_of(pos: usize) -> Result<u32> {
    u32::try_from(pos).map_err(|_| Error::Input(format!("cache slot {pos} is out of range")))
}

/// The state of a pipelined greedy decode ([`Llama::decode_async`],
/// [`Llama::decode_sequences_async`]): the token buffer the steps pass on the GPU (each
/// step's argmaxes become the next step's inputs), and small mappable buffers the host
/// reads tokens from.
pub struct DecodePipe {
    token: Tensor,
    ring: Vec<Arc<wgpu::Buffer>>,
    next: usize,
    /// Rows of the last step queued (None before the first): a step that takes its
    /// tokens from the GPU must have as many.
    last_rows: Option<usize>,
}

/// Readback buffers a pipe cycles through: enough for the steps a caller keeps queued
/// (two) plus the one it reads.
const PIPE_RING: usize = 3;

impl DecodePipe {
    /// A step of `rows` rows takes its tokens from the previous step.
    fn follow(&self, rows: usize) -> Result<()> {
        match self.last_rows {
            Some(r) if r == rows => Ok(()),
            Some(r) => Err(Error::Input(format!(
                "a decode step of {rows} rows cannot take its tokens from a step of {r}"
            ))),
            None => Err(Error::Input(
                "the first decode step of a pipe needs its tokens".into(),
            )),
        }
    }

    /// Room for `rows` rows of tokens (only before a step that brings its own).
    fn reserve(&mut self, gpu: &Gpu, rows: usize) -> Result<()> {
        if rows > self.token.numel() {
            self.token = Tensor::zeros(gpu, &[rows], DType::U32, "decode token")?;
        }
        Ok(())
    }

    /// Copy the step's tokens out for the host and submit it.
    fn submit(&mut self, gpu: &Gpu, mut st: Step, rows: usize) -> Result<PendingToken> {
        let size = 4 * self.token.numel() as u64;
        if self.ring.len() < PIPE_RING {
            self.ring
                .resize_with(PIPE_RING, || Self::readback(gpu, size));
        }
        // A buffer still held by an unread step, or too small, is replaced, never
        // overwritten under it.
        let slot = &mut self.ring[self.next];
        if Arc::strong_count(slot) > 1 || slot.size() < size {
            *slot = Self::readback(gpu, size);
        }
        let buf = slot.clone();
        self.next = (self.next + 1) % PIPE_RING;
        st.copy_to_buffer(&self.token, &buf, 4 * rows as u64);
        let index = st
            .submit()
            .ok_or_else(|| Error::Gpu("decode step recorded nothing".into()))?;
        self.last_rows = Some(rows);
        Ok(PendingToken { buf, index, rows })
    }

    fn readback(gpu: &Gpu, size: u64) -> Arc<wgpu::Buffer> {
        Arc::new(gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("decode tokens"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }))
    }
}

/// A decode step in flight: its argmaxes (`rows` of them) land in `buf` when submission
/// `index` is done.
pub struct PendingToken {
    buf: Arc<wgpu::Buffer>,
    index: wgpu::SubmissionIndex,
    rows: usize,
}

impl PendingToken {
    /// Wait for this step only (later submissions keep running) and read its tokens
    /// (unchecked: [`Llama::read_tokens`] checks them).
    fn wait(self, gpu: &Gpu) -> Result<Vec<u32>> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.buf.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        gpu.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(self.index),
                timeout: None,
            })
            .map_err(|e| Error::Gpu(format!("waiting for a decode step failed: {e}")))?;
        rx.recv()
            .map_err(|_| Error::Gpu("decode readback callback never ran".into()))?
            .map_err(|e| Error::Gpu(format!("decode readback failed: {e}")))?;
        let ids = {
            let view = self
                .buf
                .get_mapped_range(..)
                .map_err(|e| Error::Gpu(format!("decode readback map failed: {e}")))?;
            bytemuck::cast_slice::<u8, u32>(&view[..4 * self.rows]).to_vec()
        };
        self.buf.unmap();
        Ok(ids)
    }
}

/// What [`Llama::record`] records: `t` tokens read from `tokens`, logits of the rows
/// `logits` names, the greedy argmax of the last row into `token_out`.
struct Record<'a> {
    t: usize,
    /// One token's cache slot and RoPE position (decode), for the fused QKV + RoPE GEMV.
    decode_at: Option<(u32, i32)>,
    tokens: &'a Tensor,
    logits: Logits,
    logit_rows: usize,
    greedy: bool,
    /// Rows of several sequences sharing the cache ([`Llama::forward_sequences`]).
    shared: bool,
    /// With `shared`: the most keys a row sees (its position + 1: a sequence's first
    /// slot holds position 0); unused otherwise.
    longest: usize,
    capture: Option<&'a MassCapture>,
    token_out: &'a Tensor,
}

#[derive(Default, Debug)]
pub struct ForwardOut {
    /// `[rows, vocab]` row-major.
    pub logits: Vec<f32>,
    pub rows: usize,
    pub token: Option<u32>,
    /// Every row's greedy token ([`Llama::forward_sequences`]).
    pub tokens: Vec<u32>,
}
