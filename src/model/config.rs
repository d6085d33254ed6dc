//! One model description, whatever file it came from (HF `config.json` or GGUF metadata).

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    /// Llama 2/3.x, SmolLM/SmolLM2, TinyLlama, Mistral (no sliding window).
    Llama,
    /// Qwen2 / Qwen2.5: Llama plus biases on Q, K and V.
    Qwen2,
}

/// Llama-3 style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

impl RopeScaling {
    /// Factors finite and positive, `low_freq_factor < high_freq_factor` (the smoothing
    /// in [`ModelConfig::rope_inv_freq`] divides by their difference), and an original
    /// context length in range.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let s = self;
        for (name, v) in [
            ("factor", s.factor),
            ("low_freq_factor", s.low_freq_factor),
            ("high_freq_factor", s.high_freq_factor),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!(
                    "rope_scaling.{name} {v} must be a finite number > 0"
                ));
            }
        }
        if s.low_freq_factor >= s.high_freq_factor {
            return Err(format!(
                "rope_scaling.low_freq_factor ({}) must be below high_freq_factor ({})",
                s.low_freq_factor, s.high_freq_factor
            ));
        }
        if s.original_max_position_embeddings == 0
            || s.original_max_position_embeddings > limits::MAX_CONTEXT
        {
            return Err(format!(
                "rope_scaling.original_max_position_embeddings {} must be in 1..={}",
                s.original_max_position_embeddings,
                limits::MAX_CONTEXT
            ));
        }
        Ok(())
    }
}

/// Upper bounds [`ModelConfig::validate`] enforces: well above any released Llama/Qwen
/// model, low enough that nothing sized from a corrupt file's numbers is absurd.
pub mod limits {
    /// Transformer blocks (Llama 3.1 405B has 126).
    pub const MAX_LAYERS: usize = 1024;
    /// Model width (405B: 16384).
    pub const MAX_HIDDEN: usize = 65536;
    /// MLP width (405B: 53248).
    pub const MAX_INTERMEDIATE: usize = 1 << 20;
    /// Query or key/value heads (405B: 128).
    pub const MAX_HEADS: usize = 1024;
    /// Token embedding rows, extra rows included (Gemma: 256000).
    pub const MAX_VOCAB: usize = 1 << 24;
    /// Context length (max_position_embeddings).
    pub const MAX_CONTEXT: usize = 1 << 24;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Q/K/V projections carry a bias (Qwen2).
    pub attention_bias: bool,
    /// Input-only embedding rows after the output vocabulary (a LoRA adapter's
    /// `kvlink.extra_embeddings`): ids `vocab_size..input_vocab()` can be fed to the
    /// model but are never produced (the lm_head keeps `vocab_size` rows).
    #[serde(default)]
    pub extra_vocab: usize,
}

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
    /// Rows of the token embedding: the ids the model accepts as input (>= the
    /// `vocab_size` logits it produces).
    pub fn input_vocab(&self) -> usize {
        self.vocab_size + self.extra_vocab
    }

    /// Check the numbers are consistent and within [`limits`], so that nothing sized
    /// from them (layer lists, tensor names, buffers) can be absurd; the message names
    /// the first field that is not. Every loader calls this before allocating anything
    /// from the config.
    pub fn validate(&self) -> std::result::Result<(), String> {
        use limits::*;
        let c = self;
        if c.vocab_size == 0 || c.hidden_size == 0 || c.num_hidden_layers == 0 {
            return Err("vocab_size, hidden_size and num_hidden_layers must be > 0".into());
        }
        let at_most = |what: &str, v: usize, max: usize| {
            if v > max {
                Err(format!(
                    "{what} {v} is implausibly large (this engine accepts at most {max}): \
                     corrupt model file?"
                ))
            } else {
                Ok(())
            }
        };
        at_most("num_hidden_layers", c.num_hidden_layers, MAX_LAYERS)?;
        at_most("hidden_size", c.hidden_size, MAX_HIDDEN)?;
        at_most("intermediate_size", c.intermediate_size, MAX_INTERMEDIATE)?;
        at_most("num_attention_heads", c.num_attention_heads, MAX_HEADS)?;
        at_most("num_key_value_heads", c.num_key_value_heads, MAX_HEADS)?;
        at_most("vocab_size", c.vocab_size, MAX_VOCAB)?;
        at_most(
            "vocab_size + extra_vocab",
            c.vocab_size.saturating_add(c.extra_vocab),
            MAX_VOCAB,
        )?;
        at_most(
            "max_position_embeddings",
            c.max_position_embeddings,
            MAX_CONTEXT,
        )?;
        if c.num_attention_heads == 0
            || c.num_key_value_heads == 0
            || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                c.num_attention_heads, c.num_key_value_heads
            ));
        }
        if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) || c.head_dim > 256 {
            return Err(format!("head_dim {} must be even and <= 256", c.head_dim));
        }
        if c.max_position_embeddings == 0 {
            return Err("max_position_embeddings must be > 0".into());
        }
        if c.intermediate_size == 0 {
            return Err("intermediate_size must be > 0".into());
        }
        if !(c.rope_theta.is_finite() && c.rope_theta > 0.0) {
            return Err(format!(
                "rope_theta {} must be a finite number > 0",
                c.rope_theta
            ));
        }
        if !(c.rms_norm_eps.is_finite() && c.rms_norm_eps > 0.0) {
            return Err(format!(
                "rms_norm_eps {} must be a finite number > 0",
                c.rms_norm_eps
            ));
        }
        if let Some(s) = &c.rope_scaling {
            s.validate()?;
        }
        // Whole-model element count (embedding, layers, lm_head) must fit in usize, so
        // no product of these numbers overflows anywhere (wasm32 has a 32-bit usize).
        let params = || -> Option<u64> {
            let u = |x: usize| x as u64;
            let (h, q, kv, ff) = (
                u(c.hidden_size),
                u(c.q_dim()),
                u(c.kv_dim()),
                u(c.intermediate_size),
            );
            let attn = h.checked_mul(q.checked_mul(2)?.checked_add(kv.checked_mul(2)?)?)?;
            let layer = attn.checked_add(h.checked_mul(ff)?.checked_mul(3)?)?;
            let embed = u(c.input_vocab()).checked_mul(h)?.checked_mul(2)?;
            let total = layer
                .checked_mul(u(c.num_hidden_layers))?
                .checked_add(embed)?;
            usize::try_from(total).is_ok().then_some(total)
        };
        if params().is_none() {
            return Err(
                "the model's weights would not fit in this machine's address space \
                        (sizes overflow)"
                    .into(),
            );
        }
        Ok(())
    }

    /// RoPE inverse frequencies (one per rotation pair, `head_dim / 2` of them), with
    /// Llama-3 scaling applied when configured. Same formula as HF transformers'
    /// `_compute_llama3_parameters`.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        let mut inv: Vec<f64> = (0..half)
            .map(|i| 1.0 / (self.rope_theta as f64).powf((2 * i) as f64 / self.head_dim as f64))
            .collect();
        if let Some(s) = self.rope_scaling {
            let old = s.original_max_position_embeddings as f64;
            let low_wl = old / s.low_freq_factor as f64;
            let high_wl = old / s.high_freq_factor as f64;
            for f in inv.iter_mut() {
                let wl = 2.0 * std::f64::consts::PI / *f;
                if wl < high_wl {
                    // high frequency: unchanged
                } else if wl > low_wl {
                    *f /= s.factor as f64;
                } else {
                    let smooth = (old / wl - s.low_freq_factor as f64)
                        / (s.high_freq_factor as f64 - s.low_freq_factor as f64);
                    *f = (1.0 - smooth) * *f / s.factor as f64 + smooth * *f;
                }
            }
        }
        inv.into_iter().map(|f| f as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama 3.1 405B's config.json numbers: the largest model the limits must admit.
    fn llama_405b() -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            vocab_size: 128256,
            hidden_size: 16384,
            intermediate_size: 53248,
            num_hidden_layers: 126,
            num_attention_heads: 128,
            num_key_value_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: Some(RopeScaling {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }),
            max_position_embeddings: 131072,
            tie_word_embeddings: false,
            attention_bias: false,
            extra_vocab: 0,
        }
    }

    fn rejects(c: &ModelConfig, needle: &str) {
        let e = c.validate().expect_err("config should be rejected");
        assert!(e.contains(needle), "{e:?} should mention {needle:?}");
    }

    #[test]
    fn real_large_model_passes() {
        let c = llama_405b();
        c.validate().unwrap();
        assert!(c.rope_inv_freq().iter().all(|f| f.is_finite() && *f > 0.0));
    }

    #[test]
    fn absurd_counts_are_rejected() {
        let base = llama_405b();
        type Edit = fn(&mut ModelConfig);
        let cases: [(&str, Edit); 8] = [
            ("num_hidden_layers", |c| c.num_hidden_layers = 4_000_000_000),
            ("hidden_size", |c| c.hidden_size = 1 << 20),
            ("intermediate_size", |c| c.intermediate_size = 1 << 40),
            ("num_attention_heads", |c| c.num_attention_heads = 1 << 20),
            ("num_key_value_heads", |c| c.num_key_value_heads = 1 << 20),
            ("vocab_size", |c| c.vocab_size = 1 << 32),
            ("extra_vocab", |c| c.extra_vocab = usize::MAX),
            ("max_position_embeddings", |c| {
                c.max_position_embeddings = 1 << 40
            }),
        ];
        for (needle, f) in cases {
            let mut c = base.clone();
            f(&mut c);
            rejects(&c, needle);
        }
    }

    #[test]
    fn non_finite_rope_theta_and_eps_are_rejected() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -1.0] {
            let mut c = llama_405b();
            c.rope_theta = bad;
            rejects(&c, "rope_theta");
            let mut c = llama_405b();
            c.rms_norm_eps = bad;
            rejects(&c, "rms_norm_eps");
        }
    }

    #[test]
    fn bad_llama3_rope_scaling_is_rejected() {
        let with = |f: fn(&mut RopeScaling)| {
            let mut c = llama_405b();
            f(c.rope_scaling.as_mut().unwrap());
            c
        };
        // Equal factors: the smoothing term divides by zero (HF's formula is undefined).
        rejects(
            &with(|s| s.high_freq_factor = s.low_freq_factor),
            "low_freq_factor",
        );
        rejects(&with(|s| s.low_freq_factor = 8.0), "low_freq_factor");
        rejects(&with(|s| s.factor = f32::NAN), "rope_scaling.factor");
        rejects(&with(|s| s.factor = 0.0), "rope_scaling.factor");
        rejects(
            &with(|s| s.high_freq_factor = f32::INFINITY),
            "high_freq_factor",
        );
        rejects(
            &with(|s| s.original_max_position_embeddings = 0),
            "original_max_position_embeddings",
        );
    }
}
