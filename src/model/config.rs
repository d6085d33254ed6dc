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

    /// Check the numbers are consistent; `what` names the source for the error message.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let c = self;
        if c.vocab_size == 0 || c.hidden_size == 0 || c.num_hidden_layers == 0 {
            return Err("vocab_size, hidden_size and num_hidden_layers must be > 0".into());
        }
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
        if c.rope_theta.is_nan()
            || c.rope_theta <= 0.0
            || c.rms_norm_eps.is_nan()
            || c.rms_norm_eps <= 0.0
        {
            return Err("rope_theta and rms_norm_eps must be > 0".into());
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
