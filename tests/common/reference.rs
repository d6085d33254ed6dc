//! An independent CPU f32 forward pass of the Llama family, written from the HF
//! transformers equations (not from the engine's kernels), with the KVLink mask:
//! query t attends key s iff s <= t and (seg[t] == 0 or seg[s] == seg[t]).
#![allow(dead_code)]

use kvlink::model::source::names as n;
use kvlink::model::{ModelConfig, WeightSource};

struct Layer {
    attn_norm: Vec<f32>,
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    wg: Vec<f32>,
    wu: Vec<f32>,
    wd: Vec<f32>,
}

pub struct RefModel {
    pub cfg: ModelConfig,
    embed: Vec<f32>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Option<Vec<f32>>,
}

/// y[i, j] = sum_k x[i, k] w[j, k], rows of w split across threads.
fn linear(x: &[f32], w: &[f32], rows: usize, k: usize) -> Vec<f32> {
    let n = w.len() / k;
    let mut y = vec![0.0f32; rows * n];
    let threads = std::thread::available_parallelism()
        .map_or(2, |x| x.get())
        .min(8);
    let chunk = n.div_ceil(threads);
    let mut cols: Vec<Vec<f32>> = Vec::new();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|ti| {
                s.spawn(move || {
                    let j0 = (ti * chunk).min(n);
                    let j1 = ((ti + 1) * chunk).min(n);
                    let mut out = vec![0.0f32; rows * (j1 - j0)];
                    for i in 0..rows {
                        let xr = &x[i * k..(i + 1) * k];
                        for j in j0..j1 {
                            out[i * (j1 - j0) + j - j0] = dot(xr, &w[j * k..(j + 1) * k]);
                        }
                    }
                    out
                })
            })
            .collect();
        cols = hs.into_iter().map(|h| h.join().unwrap()).collect();
    });
    for (ti, c) in cols.iter().enumerate() {
        let j0 = (ti * chunk).min(n);
        let w = c.len() / rows.max(1);
        for i in 0..rows {
            y[i * n + j0..i * n + j0 + w].copy_from_slice(&c[i * w..(i + 1) * w]);
        }
    }
    y
}

/// f32 dot product in 8 independent lanes (plain f32 arithmetic; the lanes only keep
/// the additions from waiting on each other, which makes the reference fast enough for
/// long prompts).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut y = vec![0.0; x.len()];
    for (xr, yr) in x.chunks(d).zip(y.chunks_mut(d)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for i in 0..d {
            yr[i] = xr[i] * inv * w[i];
        }
    }
    y
}

/// RoPE frequencies per HF `_compute_default_rope_parameters` /
/// `_compute_llama3_parameters`.
pub fn inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let base: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f32 / d as f32))
        .collect();
    let Some(s) = cfg.rope_scaling else {
        return base;
    };
    let old = s.original_max_position_embeddings as f32;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    base.iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / s.factor
            } else {
                let smooth =
                    (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
}

/// HF `apply_rotary_pos_emb` on one head: x * cos + rotate_half(x) * sin.
fn rope(x: &mut [f32], pos: i32, inv: &[f32]) {
    let h = x.len() / 2;
    for i in 0..h {
        let a = pos as f32 * inv[i];
        let (s, c) = a.sin_cos();
        let (x1, x2) = (x[i], x[i + h]);
        x[i] = x1 * c - x2 * s;
        x[i + h] = x2 * c + x1 * s;
    }
}

impl RefModel {
    pub fn load(src: &dyn WeightSource) -> RefModel {
        let cfg = src.config().clone();
        let ld = |name: &str| {
            src.load(name)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .data
        };
        let opt = |name: &str| cfg.attention_bias.then(|| ld(name));
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = |s: &str| n::layer(i, s);
                Layer {
                    attn_norm: ld(&l(n::ATTN_NORM)),
                    wq: ld(&l(n::Q)),
                    wk: ld(&l(n::K)),
                    wv: ld(&l(n::V)),
                    wo: ld(&l(n::O)),
                    bq: opt(&l(n::Q_BIAS)),
                    bk: opt(&l(n::K_BIAS)),
                    bv: opt(&l(n::V_BIAS)),
                    ffn_norm: ld(&l(n::FFN_NORM)),
                    wg: ld(&l(n::GATE)),
                    wu: ld(&l(n::UP)),
                    wd: ld(&l(n::DOWN)),
                }
            })
            .collect();
        let lm_head = (!cfg.tie_word_embeddings && src.has(n::LM_HEAD)).then(|| ld(n::LM_HEAD));
        RefModel {
            embed: ld(n::EMBED),
            norm: ld(n::FINAL_NORM),
            layers,
            lm_head,
            cfg,
        }
    }

    /// Logits `[T, vocab]` of every row (or only the last with `last_only`).
    pub fn forward(
        &self,
        tokens: &[u32],
        positions: &[i32],
        seg: &[u32],
        last_only: bool,
    ) -> Vec<Vec<f32>> {
        self.forward_inner(tokens, positions, seg, last_only, None)
    }

    /// Attention weights of the last row: `[layer][head][key]` (keys 0..T).
    pub fn last_row_attention(
        &self,
        tokens: &[u32],
        positions: &[i32],
        seg: &[u32],
    ) -> Vec<Vec<Vec<f32>>> {
        let mut out = Vec::new();
        self.forward_inner(tokens, positions, seg, true, Some(&mut out));
        out
    }

    fn forward_inner(
        &self,
        tokens: &[u32],
        positions: &[i32],
        seg: &[u32],
        last_only: bool,
        mut attn: Option<&mut Vec<Vec<Vec<f32>>>>,
    ) -> Vec<Vec<f32>> {
        let c = &self.cfg;
        let (t, d, hd) = (tokens.len(), c.hidden_size, c.head_dim);
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let inv = inv_freq(c);
        let mut x: Vec<f32> = tokens
            .iter()
            .flat_map(|&id| self.embed[id as usize * d..(id as usize + 1) * d].to_vec())
            .collect();
        for l in &self.layers {
            let h = rmsnorm(&x, &l.attn_norm, c.rms_norm_eps);
            let mut q = linear(&h, &l.wq, t, d);
            let mut k = linear(&h, &l.wk, t, d);
            let mut v = linear(&h, &l.wv, t, d);
            for (m, b) in [(&mut q, &l.bq), (&mut k, &l.bk), (&mut v, &l.bv)] {
                if let Some(b) = b {
                    for row in m.chunks_mut(b.len()) {
                        row.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    }
                }
            }
            for ti in 0..t {
                for hh in 0..nh {
                    rope(&mut q[(ti * nh + hh) * hd..][..hd], positions[ti], &inv);
                }
                for hh in 0..nkv {
                    rope(&mut k[(ti * nkv + hh) * hd..][..hd], positions[ti], &inv);
                }
            }
            let mut att = vec![0.0f32; t * nh * hd];
            let mut layer_attn = vec![Vec::new(); nh];
            let scale = 1.0 / (hd as f32).sqrt();
            for ti in 0..t {
                for hh in 0..nh {
                    let kh = hh / (nh / nkv);
                    let qv = &q[(ti * nh + hh) * hd..][..hd];
                    let mut w: Vec<f32> = (0..=ti)
                        .map(|s| {
                            if seg[ti] == 0 || seg[s] == seg[ti] {
                                let kv = &k[(s * nkv + kh) * hd..][..hd];
                                qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * scale
                            } else {
                                f32::NEG_INFINITY
                            }
                        })
                        .collect();
                    let m = w.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    w.iter_mut().for_each(|x| *x = (*x - m).exp());
                    let z: f32 = w.iter().sum();
                    if ti == t - 1 {
                        layer_attn[hh] = w.iter().map(|x| x / z).collect();
                    }
                    let o = &mut att[(ti * nh + hh) * hd..][..hd];
                    for (s, ws) in w.iter().enumerate() {
                        let vv = &v[(s * nkv + kh) * hd..][..hd];
                        for dd in 0..hd {
                            o[dd] += ws / z * vv[dd];
                        }
                    }
                }
            }
            if let Some(a) = attn.as_deref_mut() {
                a.push(layer_attn);
            }
            let o = linear(&att, &l.wo, t, nh * hd);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let h = rmsnorm(&x, &l.ffn_norm, c.rms_norm_eps);
            let g = linear(&h, &l.wg, t, d);
            let u = linear(&h, &l.wu, t, d);
            let a: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let o = linear(&a, &l.wd, t, c.intermediate_size);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
        let rows: Vec<usize> = if last_only {
            vec![t - 1]
        } else {
            (0..t).collect()
        };
        // Tied: the embedding's first `vocab_size` rows (rows past them are input-only
        // extra tokens, never produced).
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let head = &head[..c.vocab_size * d];
        rows.iter()
            .map(|&r| {
                let h = rmsnorm(&x[r * d..(r + 1) * d], &self.norm, c.rms_norm_eps);
                linear(&h, head, 1, d)
            })
            .collect()
    }
}
