//! Hugging Face model folders: `config.json` + `model.safetensors` (or sharded
//! `model.safetensors.index.json` + shards) + `tokenizer.json` (+ `tokenizer_config.json`,
//! `chat_template.jinja`). Shards are memory-mapped; tensors are converted to f32 on load.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::slice::HalfFloatSliceExt;
use safetensors::tensor::{Metadata, SafeTensorError};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::config::{Arch, ModelConfig, RopeScaling};
use crate::model::source::{names, HostTensor, WeightSource};
use crate::model::tokenizer::Tokenizer;

/// Every canonical tensor a model with this config must have, with its HF shape, in
/// a stable order (embedding, layers 0.., final norm, lm_head when untied).
pub fn canonical_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let (q, kv, ff) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
    let mut v = vec![(names::EMBED.to_string(), vec![cfg.vocab_size, h])];
    for i in 0..cfg.num_hidden_layers {
        let l = |rest: &str| names::layer(i, rest);
        v.push((l(names::ATTN_NORM), vec![h]));
        v.push((l(names::Q), vec![q, h]));
        v.push((l(names::K), vec![kv, h]));
        v.push((l(names::V), vec![kv, h]));
        if cfg.attention_bias {
            v.push((l(names::Q_BIAS), vec![q]));
            v.push((l(names::K_BIAS), vec![kv]));
            v.push((l(names::V_BIAS), vec![kv]));
        }
        v.push((l(names::O), vec![h, q]));
        v.push((l(names::FFN_NORM), vec![h]));
        v.push((l(names::GATE), vec![ff, h]));
        v.push((l(names::UP), vec![ff, h]));
        v.push((l(names::DOWN), vec![h, ff]));
    }
    v.push((names::FINAL_NORM.to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        v.push((names::LM_HEAD.to_string(), vec![cfg.vocab_size, h]));
    }
    v
}

// ---------------------------------------------------------------------------------------
// config.json

#[derive(Deserialize, Default)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<Value>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

/// What `config.json` says, beyond [`ModelConfig`].
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    pub config: ModelConfig,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The `architectures[0]` (or `model_type`) string.
    pub architecture: String,
}

fn token_ids(v: &Option<Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

/// Parse the text of an HF `config.json`. `path` is only used in error messages.
pub fn parse_config(text: &str, path: &Path) -> Result<HfConfig> {
    let bad = |msg: String| Error::bad_model(path, msg);
    let raw: RawConfig =
        serde_json::from_str(text).map_err(|e| bad(format!("invalid config.json: {e}")))?;

    let architecture = raw
        .architectures
        .as_ref()
        .and_then(|a| a.first().cloned())
        .or_else(|| raw.model_type.clone())
        .ok_or_else(|| bad("config.json has neither `architectures` nor `model_type`".into()))?;
    let arch = match architecture.as_str() {
        "LlamaForCausalLM" | "llama" => Arch::Llama,
        "MistralForCausalLM" | "mistral" => Arch::Llama,
        "Qwen2ForCausalLM" | "qwen2" => Arch::Qwen2,
        other => {
            return Err(Error::Unsupported(format!(
                "architecture `{other}` in {} (supported: LlamaForCausalLM, MistralForCausalLM, \
                 Qwen2ForCausalLM)",
                path.display()
            )))
        }
    };

    let req = |v: Option<usize>, name: &str| -> Result<usize> {
        v.ok_or_else(|| bad(format!("config.json: missing field `{name}`")))
    };
    let hidden_size = req(raw.hidden_size, "hidden_size")?;
    let num_attention_heads = req(raw.num_attention_heads, "num_attention_heads")?;
    if num_attention_heads == 0 {
        return Err(bad("config.json: num_attention_heads is 0".into()));
    }
    let default_max_pos = if arch == Arch::Qwen2 { 32768 } else { 2048 };
    let max_position_embeddings = raw.max_position_embeddings.unwrap_or(default_max_pos);

    // Sliding-window attention is not implemented: only accept it when it never kicks in.
    let uses_window = match arch {
        Arch::Qwen2 => raw.use_sliding_window.unwrap_or(false),
        Arch::Llama => true,
    };
    if uses_window {
        if let Some(w) = raw.sliding_window.as_ref().and_then(|v| v.as_u64()) {
            if (w as usize) < max_position_embeddings {
                return Err(Error::Unsupported(format!(
                    "sliding_window attention ({w} < max_position_embeddings \
                     {max_position_embeddings}) in {}",
                    path.display()
                )));
            }
        }
    }

    let rope_scaling = match &raw.rope_scaling {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            let ty = m
                .get("rope_type")
                .or_else(|| m.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            match ty {
                "default" => None,
                "llama3" => {
                    let f = |k: &str| -> Result<f64> {
                        m.get(k).and_then(|v| v.as_f64()).ok_or_else(|| {
                            bad(format!("config.json: rope_scaling (llama3) lacks `{k}`"))
                        })
                    };
                    Some(RopeScaling {
                        factor: f("factor")? as f32,
                        low_freq_factor: f("low_freq_factor")? as f32,
                        high_freq_factor: f("high_freq_factor")? as f32,
                        original_max_position_embeddings: f("original_max_position_embeddings")?
                            as usize,
                    })
                }
                other => {
                    return Err(Error::Unsupported(format!(
                        "rope_scaling type `{other}` in {} (only llama3 is supported)",
                        path.display()
                    )))
                }
            }
        }
        Some(other) => return Err(bad(format!("config.json: bad rope_scaling {other}"))),
    };

    let config = ModelConfig {
        arch,
        vocab_size: req(raw.vocab_size, "vocab_size")?,
        hidden_size,
        intermediate_size: req(raw.intermediate_size, "intermediate_size")?,
        num_hidden_layers: req(raw.num_hidden_layers, "num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads: raw.num_key_value_heads.unwrap_or(num_attention_heads),
        head_dim: raw.head_dim.unwrap_or(hidden_size / num_attention_heads),
        rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6) as f32,
        rope_theta: raw.rope_theta.unwrap_or(10000.0) as f32,
        rope_scaling,
        max_position_embeddings,
        tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        attention_bias: arch == Arch::Qwen2 || raw.attention_bias.unwrap_or(false),
        extra_vocab: 0,
    };
    config
        .validate()
        .map_err(|e| bad(format!("config.json: {e}")))?;
    Ok(HfConfig {
        config,
        bos_token_id: token_ids(&raw.bos_token_id).first().copied(),
        eos_token_ids: token_ids(&raw.eos_token_id),
        architecture,
    })
}

// ---------------------------------------------------------------------------------------
// safetensors shards

struct Shard {
    path: PathBuf,
    mmap: memmap2::Mmap,
    /// Size of the JSON header (the data starts at 8 + header_len).
    header_len: usize,
    meta: Metadata,
}

pub(crate) fn map_st_err(e: SafeTensorError) -> String {
    match e {
        SafeTensorError::MetadataIncompleteBuffer => {
            "file size does not match its header (truncated or corrupt safetensors)".into()
        }
        SafeTensorError::HeaderTooSmall | SafeTensorError::InvalidHeaderLength => {
            "file too short for its safetensors header (truncated or not a safetensors file)".into()
        }
        SafeTensorError::HeaderTooLarge => {
            "safetensors header length is implausibly large (not a safetensors file?)".into()
        }
        other => format!("corrupt safetensors header: {other}"),
    }
}

impl Shard {
    fn open(path: &Path) -> Result<Shard> {
        let file = File::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::bad_model(path, "safetensors file is missing")
            } else {
                Error::io(path, e)
            }
        })?;
        // SAFETY: the file is opened read-only; if another process truncates it while
        // mapped we may fault, which is the usual memory-mapped model-file caveat.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, meta) =
            SafeTensors::read_metadata(&mmap).map_err(|e| Error::bad_model(path, map_st_err(e)))?;
        Ok(Shard {
            path: path.to_path_buf(),
            mmap,
            header_len,
            meta,
        })
    }

    fn data(&self) -> &[u8] {
        &self.mmap[8 + self.header_len..]
    }
}

fn dtype_name(d: Dtype) -> String {
    format!("{d:?}").to_lowercase()
}

/// Convert raw little-endian bytes of `dtype` to f32. `None` for unsupported dtypes.
pub(crate) fn bytes_to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    match dtype {
        Dtype::F32 => Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::F16 | Dtype::BF16 => {
            let n = bytes.len() / 2;
            let mut out = vec![0f32; n];
            match bytemuck::try_cast_slice::<u8, u16>(bytes) {
                Ok(bits) if cfg!(target_endian = "little") => {
                    if dtype == Dtype::F16 {
                        bytemuck::cast_slice::<u16, half::f16>(bits).convert_to_f32_slice(&mut out);
                    } else {
                        bytemuck::cast_slice::<u16, half::bf16>(bits)
                            .convert_to_f32_slice(&mut out);
                    }
                }
                _ => {
                    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                        let b = u16::from_le_bytes([c[0], c[1]]);
                        *o = if dtype == Dtype::F16 {
                            half::f16::from_bits(b).to_f32()
                        } else {
                            half::bf16::from_bits(b).to_f32()
                        };
                    }
                }
            }
            Some(out)
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// HfModel

/// An HF model folder opened for reading.
pub struct HfModel {
    dir: PathBuf,
    hf: HfConfig,
    shards: Vec<Shard>,
    /// tensor name -> shard index
    index: HashMap<String, usize>,
    fingerprint: String,
    dtype: String,
}

impl HfModel {
    pub fn open(dir: &Path) -> Result<HfModel> {
        if !dir.is_dir() {
            return Err(Error::bad_model(dir, "not a directory"));
        }
        let config_path = dir.join("config.json");
        let config_bytes = std::fs::read(&config_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::bad_model(&config_path, "config.json is missing from the model folder")
            } else {
                Error::io(&config_path, e)
            }
        })?;
        let text = std::str::from_utf8(&config_bytes)
            .map_err(|_| Error::bad_model(&config_path, "config.json is not UTF-8"))?;
        let mut hf = parse_config(text, &config_path)?;

        // Weights: single file or sharded index.
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let mut shards = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| Error::bad_model(&index_path, format!("invalid index JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::bad_model(&index_path, "index has no `weight_map` object"))?;
            // Open each distinct shard once, in sorted order (stable fingerprint).
            let mut files: BTreeMap<String, usize> = BTreeMap::new();
            for f in map.values() {
                let f = f.as_str().ok_or_else(|| {
                    Error::bad_model(&index_path, "weight_map values must be file names")
                })?;
                files.insert(f.to_string(), 0);
            }
            for (i, (f, slot)) in files.iter_mut().enumerate() {
                if f.contains("..") || Path::new(f).is_absolute() {
                    return Err(Error::bad_model(
                        &index_path,
                        format!("bad shard name `{f}`"),
                    ));
                }
                shards.push(Shard::open(&dir.join(f.as_str()))?);
                *slot = i;
            }
            for (name, f) in map {
                let si = files[f.as_str().unwrap()];
                if shards[si].meta.info(name).is_none() {
                    return Err(Error::bad_model(
                        &shards[si].path,
                        format!("tensor `{name}` listed in the index is not in this shard"),
                    ));
                }
                index.insert(name.clone(), si);
            }
            // Tensors present in shards but not in the index are still usable.
            for (si, s) in shards.iter().enumerate() {
                for name in s.meta.offset_keys() {
                    index.entry(name).or_insert(si);
                }
            }
        } else if single.exists() {
            let s = Shard::open(&single)?;
            for name in s.meta.offset_keys() {
                index.insert(name, 0);
            }
            shards.push(s);
        } else {
            return Err(Error::bad_model(
                dir,
                "no model.safetensors or model.safetensors.index.json in the model folder",
            ));
        }

        // Some checkpoints say untied but ship no lm_head: they are tied in practice.
        if !hf.config.tie_word_embeddings && !index.contains_key(names::LM_HEAD) {
            hf.config.tie_word_embeddings = true;
        }

        let mut m = HfModel {
            dir: dir.to_path_buf(),
            hf,
            shards,
            index,
            fingerprint: String::new(),
            dtype: String::new(),
        };

        // Check every tensor the forward pass needs: present, supported dtype, right shape.
        let mut dtypes: Vec<String> = Vec::new();
        for (name, shape) in canonical_tensors(&m.hf.config) {
            let (shard, info) = m.info(&name).ok_or_else(|| {
                Error::bad_model(
                    &m.dir,
                    format!("required tensor `{name}` is missing from the safetensors files"),
                )
            })?;
            if !matches!(info.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                return Err(Error::Unsupported(format!(
                    "tensor `{name}` in {} has dtype {:?} (supported: F32, F16, BF16)",
                    shard.path.display(),
                    info.dtype
                )));
            }
            if info.shape != shape {
                return Err(Error::bad_model(
                    &shard.path,
                    format!(
                        "tensor `{name}` has shape {:?}, config.json implies {:?}",
                        info.shape, shape
                    ),
                ));
            }
            let d = dtype_name(info.dtype);
            if !dtypes.contains(&d) {
                dtypes.push(d);
            }
        }
        m.dtype = dtypes.join("+");
        m.fingerprint = m.compute_fingerprint(&config_bytes);
        Ok(m)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn hf_config(&self) -> &HfConfig {
        &self.hf
    }
    /// All tensor names in the safetensors files (sorted).
    pub fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }

    fn info(&self, name: &str) -> Option<(&Shard, &safetensors::tensor::TensorInfo)> {
        let s = &self.shards[*self.index.get(name)?];
        Some((s, s.meta.info(name)?))
    }

    /// XXH3-128 over config.json and every shard's whole-file hash (all weight bytes;
    /// each shard's hash is remembered by path, size and mtime, see
    /// [`crate::model::fingerprint`]).
    fn compute_fingerprint(&self, config_bytes: &[u8]) -> String {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&(config_bytes.len() as u64).to_le_bytes());
        h.update(config_bytes);
        for s in &self.shards {
            h.update(&super::fingerprint::file_hash(&s.path, &s.mmap).to_le_bytes());
        }
        format!("{:032x}", h.digest128())
    }
}

impl WeightSource for HfModel {
    fn config(&self) -> &ModelConfig {
        &self.hf.config
    }

    fn describe(&self) -> String {
        format!(
            "HF folder {} ({}, {} safetensors file{})",
            self.dir.display(),
            self.hf.architecture,
            self.shards.len(),
            if self.shards.len() == 1 { "" } else { "s" }
        )
    }

    fn dtype(&self) -> String {
        self.dtype.clone()
    }

    fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn load(&self, name: &str) -> Result<HostTensor> {
        let (shard, info) = self.info(name).ok_or_else(|| {
            Error::bad_model(
                &self.dir,
                format!("tensor `{name}` not found in the safetensors files"),
            )
        })?;
        let (a, b) = info.data_offsets;
        let bytes = shard.data().get(a..b).ok_or_else(|| {
            Error::bad_model(
                &shard.path,
                format!("tensor `{name}` lies outside the file"),
            )
        })?;
        let data = bytes_to_f32(info.dtype, bytes).ok_or_else(|| {
            Error::Unsupported(format!(
                "tensor `{name}` in {} has dtype {:?} (supported: F32, F16, BF16)",
                shard.path.display(),
                info.dtype
            ))
        })?;
        let t = HostTensor {
            shape: info.shape.clone(),
            data,
        };
        if t.numel() != t.data.len() {
            return Err(Error::bad_model(
                &shard.path,
                format!(
                    "tensor `{name}`: byte size does not match shape {:?}",
                    t.shape
                ),
            ));
        }
        Ok(t)
    }

    fn tokenizer(&self) -> Result<Tokenizer> {
        let tj = self.dir.join("tokenizer.json");
        if !tj.is_file() {
            return Err(Error::bad_model(
                &tj,
                "tokenizer.json is missing from the model folder",
            ));
        }
        let tc = self.dir.join("tokenizer_config.json");
        let ct = self.dir.join("chat_template.jinja");
        Tokenizer::from_hf_files(
            &tj,
            tc.is_file().then_some(tc.as_path()),
            ct.is_file().then_some(ct.as_path()),
            &self.hf.eos_token_ids,
        )
    }

    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }
}
