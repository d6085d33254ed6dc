//! GGUF (v2/v3) reader over a memory map, dequantization to f32, and [`GgufModel`], a
//! [`WeightSource`] that hands out tensors under HF names in HF layout.
//!
//! Every malformed input gives `Error::BadModel` naming the file; nothing here indexes the
//! file with an unchecked, file-derived offset, and no allocation is sized from an
//! untrusted count without first checking it against the bytes actually present.

mod dequant;
mod file;
mod hf_names;
mod tokenizer_meta;
mod types;

pub use dequant::*;
pub use file::*;
pub use hf_names::*;
pub use types::*;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::model::config::{Arch, ModelConfig, RopeScaling};
use crate::model::source::{names, HostTensor, WeightSource};
use crate::model::tokenizer::{GgufTokenizerMeta, Tokenizer};

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Nesting limit for arrays of arrays in metadata.
pub(super) const MAX_ARRAY_DEPTH: usize = 4;
/// Dimension limit for a tensor (ggml has 4).
pub(super) const MAX_DIMS: u32 = 8;
/// Array elements, summed over all metadata, that a file may hold. Each element costs
/// a 32-byte [`MetaValue`] in memory however small it is in the file, so the bytes
/// present do not bound memory well enough alone; real files hold well under a million
/// (token list, merges, scores, token types), 2^24 bounds the parse to ~512 MiB.
pub const MAX_META_ARRAY_ELEMENTS: u64 = 1 << 24;

// ---------------------------------------------------------------------------------------
// the model
// ---------------------------------------------------------------------------------------

/// A GGUF model file as a [`WeightSource`].
pub struct GgufModel {
    file: GgufFile,
    config: ModelConfig,
    /// canonical HF name -> index into `file.tensors`
    canonical: HashMap<String, usize>,
    /// Q/K rows are in llama.cpp's interleaved order and must be unpermuted.
    permuted_qk: bool,
    fingerprint: String,
}

impl std::fmt::Debug for GgufModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufModel")
            .field("file", &self.file)
            .field("config", &self.config)
            .finish()
    }
}

impl GgufModel {
    pub fn open(path: impl AsRef<Path>) -> Result<GgufModel> {
        let file = GgufFile::open(path)?;
        Self::from_file(file)
    }

    pub fn from_file(file: GgufFile) -> Result<GgufModel> {
        let path = file.path.clone();
        let bad = |msg: String| Error::bad_model(&path, msg);
        let arch_name = file
            .get_str("general.architecture")
            .ok_or_else(|| bad("missing metadata general.architecture".into()))?
            .to_string();
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: architecture {other:?} (supported: llama, qwen2)",
                    path.display()
                )))
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let req_usize = |k: &str| -> Result<usize> {
            let full = key(k);
            match file.get(&full) {
                None => Err(bad(format!("missing metadata {full}"))),
                Some(v) => v
                    .as_u64()
                    .filter(|&x| x <= (1u64 << 32))
                    .map(|x| x as usize)
                    .ok_or_else(|| {
                        bad(format!(
                            "metadata {full} = {} is not a valid count",
                            v.summary()
                        ))
                    }),
            }
        };
        let opt_usize = |k: &str| -> Result<Option<usize>> {
            match file.get(&key(k)) {
                None => Ok(None),
                Some(_) => req_usize(k).map(Some),
            }
        };
        let opt_f32 = |k: &str| -> Result<Option<f32>> {
            let full = key(k);
            match file.get(&full) {
                None => Ok(None),
                Some(v) => v.as_f64().map(|x| Some(x as f32)).ok_or_else(|| {
                    bad(format!("metadata {full} = {} is not a number", v.summary()))
                }),
            }
        };

        let hidden = req_usize("embedding_length")?;
        let layers = req_usize("block_count")?;
        let ffn = req_usize("feed_forward_length")?;
        let heads = req_usize("attention.head_count")?;
        let kv_heads = opt_usize("attention.head_count_kv")?.unwrap_or(heads);
        let eps = opt_f32("attention.layer_norm_rms_epsilon")?.ok_or_else(|| {
            bad(format!(
                "missing metadata {}",
                key("attention.layer_norm_rms_epsilon")
            ))
        })?;
        let theta = opt_f32("rope.freq_base")?.unwrap_or(10000.0);
        let ctx = opt_usize("context_length")?.unwrap_or(2048);
        let head_dim = match (
            opt_usize("attention.key_length")?,
            opt_usize("rope.dimension_count")?,
        ) {
            (Some(k), _) => k,
            (None, Some(r)) => r,
            (None, None) => hidden.checked_div(heads).unwrap_or(0),
        };
        // vocab size: token list, else embedding/output tensor shape.
        let vocab_from_tokens = file
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map(|a| a.len());
        let embd = file.tensor("token_embd.weight");
        let vocab_from_tensor = file
            .tensor("output.weight")
            .or(embd)
            .and_then(|t| t.dims.get(1).copied())
            .map(|d| d as usize);
        let vocab_size = match (vocab_from_tensor, vocab_from_tokens) {
            (Some(v), _) => v,
            (None, Some(v)) => v,
            (None, None) => {
                return Err(bad(
                    "cannot determine vocab size: no token list and no token_embd.weight".into(),
                ))
            }
        };
        let rope_scaling = match file.get_str(&key("rope.scaling.type")) {
            Some("llama3") => Some(RopeScaling {
                factor: opt_f32("rope.scaling.factor")?.unwrap_or(8.0),
                low_freq_factor: opt_f32("rope.scaling.low_freq_factor")?.unwrap_or(1.0),
                high_freq_factor: opt_f32("rope.scaling.high_freq_factor")?.unwrap_or(4.0),
                original_max_position_embeddings: opt_usize(
                    "rope.scaling.original_context_length",
                )?
                .unwrap_or(8192),
            }),
            Some("none") | None => None,
            Some(other) => {
                return Err(Error::Unsupported(format!(
                    "{}: rope scaling type {other:?} (supported: llama3)",
                    path.display()
                )))
            }
        };
        let config = ModelConfig {
            arch,
            vocab_size,
            hidden_size: hidden,
            intermediate_size: ffn,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: eps,
            rope_theta: theta,
            rope_scaling,
            max_position_embeddings: ctx,
            tie_word_embeddings: file.tensor("output.weight").is_none(),
            attention_bias: file.tensor("blk.0.attn_q.bias").is_some(),
            extra_vocab: 0,
        };
        config
            .validate()
            .map_err(|m| bad(format!("inconsistent model config from GGUF metadata: {m}")))?;

        let mut canonical = HashMap::new();
        for (i, t) in file.tensors.iter().enumerate() {
            if let Some(hf) = gguf_to_hf_name(&t.name) {
                canonical.insert(hf, i);
            }
        }
        if embd.is_none() {
            return Err(bad("missing tensor token_embd.weight".into()));
        }

        // Fingerprint: every byte of the file (metadata, tensor table, all weights).
        // A mapped file's hash is remembered by path, size and mtime; bytes held in
        // memory (no file behind the name) are always hashed.
        let bytes = file.bytes();
        let h = match &file.mmap {
            FileBytes::Mapped(_) => super::fingerprint::file_hash(&path, bytes),
            FileBytes::Owned(_) => xxhash_rust::xxh3::xxh3_128(bytes),
        };
        let fingerprint = format!("{h:032x}");

        Ok(GgufModel {
            permuted_qk: arch == Arch::Llama,
            file,
            config,
            canonical,
            fingerprint,
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }
    pub fn path(&self) -> &Path {
        &self.file.path
    }
}

impl WeightSource for GgufModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn describe(&self) -> String {
        format!("{} (GGUF v{})", self.file.path.display(), self.file.version)
    }

    fn dtype(&self) -> String {
        // Dominant type by bytes over the 2-D weights.
        let mut by: HashMap<GgmlType, usize> = HashMap::new();
        for t in &self.file.tensors {
            if t.dims.len() >= 2 {
                *by.entry(t.ty).or_default() += t.nbytes;
            }
        }
        by.into_iter()
            .max_by_key(|&(ty, n)| (n, std::cmp::Reverse(ty.id())))
            .map(|(ty, _)| ty.name().to_string())
            .unwrap_or_else(|| "unknown".into())
    }

    fn has(&self, name: &str) -> bool {
        self.canonical.contains_key(name)
    }

    fn load(&self, name: &str) -> Result<HostTensor> {
        let &idx = self.canonical.get(name).ok_or_else(|| {
            Error::bad_model(&self.file.path, format!("no tensor {name:?} in this GGUF"))
        })?;
        let t = &self.file.tensors[idx];
        let mut data = self.file.dequantize_info(t)?;
        let shape = t.shape();
        if self.permuted_qk {
            let is_q = name.ends_with(".self_attn.q_proj.weight")
                || name.ends_with(".self_attn.q_proj.bias");
            let is_k = name.ends_with(".self_attn.k_proj.weight")
                || name.ends_with(".self_attn.k_proj.bias");
            if is_q || is_k {
                let n_head = if is_q {
                    self.config.num_attention_heads
                } else {
                    self.config.num_key_value_heads
                };
                let rows = shape[0];
                let cols: usize = shape[1..].iter().product();
                if !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
                    return Err(Error::bad_model(
                        &self.file.path,
                        format!("tensor {:?}: {rows} rows do not split into {n_head} heads of even size", t.name),
                    ));
                }
                data = unpermute_qk_rows(&data, rows, cols, n_head);
            }
        }
        Ok(HostTensor { shape, data })
    }

    fn tokenizer(&self) -> Result<Tokenizer> {
        let meta = GgufTokenizerMeta::from_gguf(&self.file)?;
        Tokenizer::from_gguf_meta(&meta)
    }

    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }
}
