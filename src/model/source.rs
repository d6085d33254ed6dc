//! Where weights come from. Every loader (GGUF, HF safetensors folder, random weights)
//! implements [`WeightSource`] and hands out tensors under HF names, in HF layout
//! (row-major `[out, in]` for linear weights, Q/K rows in the HF/NEOX rotary order:
//! dim i pairs with dim i + head_dim/2), as f32.

use crate::error::Result;
use crate::model::config::ModelConfig;
use crate::model::tokenizer::Tokenizer;

/// A host tensor in f32.
#[derive(Clone, Debug)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Canonical (HF) tensor names.
pub mod names {
    pub const EMBED: &str = "model.embed_tokens.weight";
    pub const FINAL_NORM: &str = "model.norm.weight";
    pub const LM_HEAD: &str = "lm_head.weight";
    pub fn layer(i: usize, rest: &str) -> String {
        format!("model.layers.{i}.{rest}")
    }
    pub const ATTN_NORM: &str = "input_layernorm.weight";
    pub const FFN_NORM: &str = "post_attention_layernorm.weight";
    pub const Q: &str = "self_attn.q_proj.weight";
    pub const K: &str = "self_attn.k_proj.weight";
    pub const V: &str = "self_attn.v_proj.weight";
    pub const O: &str = "self_attn.o_proj.weight";
    pub const Q_BIAS: &str = "self_attn.q_proj.bias";
    pub const K_BIAS: &str = "self_attn.k_proj.bias";
    pub const V_BIAS: &str = "self_attn.v_proj.bias";
    pub const GATE: &str = "mlp.gate_proj.weight";
    pub const UP: &str = "mlp.up_proj.weight";
    pub const DOWN: &str = "mlp.down_proj.weight";
}

pub trait WeightSource: Send + Sync {
    fn config(&self) -> &ModelConfig;
    /// Human-readable description of where this came from (path, format).
    fn describe(&self) -> String;
    /// Storage dtype(s) of the weights as found in the file, e.g. "Q4_1" or "bf16".
    fn dtype(&self) -> String;
    /// Whether a tensor with this canonical name exists.
    fn has(&self, name: &str) -> bool;
    /// Load one tensor as f32 in HF layout. Errors name the tensor and the file.
    fn load(&self, name: &str) -> Result<HostTensor>;
    /// The model's tokenizer (with its chat template, if any).
    fn tokenizer(&self) -> Result<Tokenizer>;
    /// A stable fingerprint of the weights (used as part of KV cache keys).
    fn fingerprint(&self) -> String;
    /// Link-token configuration that comes with the weights (a LoRA adapter's
    /// `kvlink.json`), if any.
    fn link_config(&self) -> Option<crate::model::LinkConfig> {
        None
    }
}
