//! LoRA adapters (PEFT folders), merged into a base model's weights at load.
//!
//! An adapter folder holds `adapter_config.json` (PEFT), `adapter_model.safetensors`
//! (`base_model.model.model.layers.{i}.{self_attn,mlp}.{module}.lora_{A,B}.weight`,
//! A `[r, in]`, B `[out, r]`, f16/bf16/f32; optionally `kvlink.extra_embeddings`
//! `[n_extra, hidden]`) and optionally `kvlink.json` (link tokens, extra token count and
//! the base model it was trained on).
//!
//! [`LoraModel`] wraps any [`WeightSource`] and hands out `W + scale * B @ A` for every
//! adapted weight (scale = alpha / r, or alpha / sqrt(r) with rsLoRA), so every kernel
//! path, a quantized base included, just sees merged f32 weights. Extra embedding rows
//! are appended after the base vocabulary: the token embedding grows to
//! `vocab + n_extra` rows (`ModelConfig::extra_vocab`), the output vocabulary does not.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::hf::{bytes_to_f32, map_st_err};
use crate::model::source::{names, HostTensor, WeightSource};
use crate::model::tokenizer::Tokenizer;
use crate::model::LinkConfig;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const LINK_FILE: &str = "kvlink.json";
/// The optional tensor of input-only embedding rows.
pub const EXTRA_EMBEDDINGS: &str = "kvlink.extra_embeddings";
/// Largest LoRA rank accepted (a rank above the model width adapts nothing more).
pub const MAX_RANK: usize = crate::model::config::limits::MAX_HIDDEN;
/// Prefix PEFT puts before the base model's own tensor names.
const PEFT_PREFIX: &str = "base_model.model.";

/// The modules an adapter may target: (PEFT module name, parent in the HF layer).
pub const MODULES: [(&str, &str); 7] = [
    ("q_proj", "self_attn"),
    ("k_proj", "self_attn"),
    ("v_proj", "self_attn"),
    ("o_proj", "self_attn"),
    ("gate_proj", "mlp"),
    ("up_proj", "mlp"),
    ("down_proj", "mlp"),
];

/// `adapter_config.json` as PEFT writes it (only the fields that matter here; all
/// optional so that `null` and absent read the same).
#[derive(Deserialize)]
struct RawConfig {
    peft_type: Option<String>,
    task_type: Option<String>,
    base_model_name_or_path: Option<String>,
    r: Option<usize>,
    lora_alpha: Option<f64>,
    target_modules: Option<serde_json::Value>,
    bias: Option<String>,
    fan_in_fan_out: Option<bool>,
    use_rslora: Option<bool>,
    use_dora: Option<bool>,
    lora_bias: Option<bool>,
    rank_pattern: Option<serde_json::Value>,
    alpha_pattern: Option<serde_json::Value>,
    modules_to_save: Option<serde_json::Value>,
}

/// The base model an adapter was trained on (`kvlink.json`'s `base_model`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct BaseModelInfo {
    pub name: Option<String>,
    pub hidden_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub vocab_size: Option<usize>,
}

/// The adapter's `kvlink.json`: a [`LinkConfig`] plus what the extra rows are for.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct AdapterLinkFile {
    #[serde(flatten)]
    pub link: LinkConfig,
    pub base_vocab: Option<usize>,
    pub extra_tokens: Option<usize>,
    pub base_model: Option<BaseModelInfo>,
}

/// A (layer, module) pair of LoRA factors, f32 in HF layout.
struct Factors {
    /// `[r, in]`
    a: HostTensor,
    /// `[out, r]`
    b: HostTensor,
}

/// A parsed adapter, checked on its own (names, dtypes, ranks, config); the checks
/// against a model happen in [`LoraModel::new`].
pub struct LoraAdapter {
    path: PathBuf,
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub base_model_name: Option<String>,
    pub target_modules: Vec<String>,
    pub link: Option<AdapterLinkFile>,
    /// (layer, index into [`MODULES`]) -> factors.
    factors: HashMap<(usize, usize), Factors>,
    /// `[n_extra, hidden]`
    extra: Option<HostTensor>,
    hash: u64,
}

impl LoraAdapter {
    fn err(&self, msg: impl Into<String>) -> Error {
        lora_err(&self.path, msg)
    }

    /// Read an adapter folder (`adapter_config.json`, `adapter_model.safetensors`,
    /// optional `kvlink.json`).
    pub fn open(dir: &Path) -> Result<LoraAdapter> {
        if !dir.exists() {
            return Err(lora_err(dir, "folder not found"));
        }
        if !dir.is_dir() {
            return Err(lora_err(
                dir,
                format!("not a folder (expected a folder with {CONFIG_FILE} and {WEIGHTS_FILE})"),
            ));
        }
        let read = |name: &str| -> Result<Option<Vec<u8>>> {
            let p = dir.join(name);
            match std::fs::read(&p) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(lora_err(dir, format!("cannot read {name}: {e}"))),
            }
        };
        let config =
            read(CONFIG_FILE)?.ok_or_else(|| lora_err(dir, format!("{CONFIG_FILE} is missing")))?;
        let weights = read(WEIGHTS_FILE)?.ok_or_else(|| {
            let also = if dir.join("adapter_model.bin").exists() {
                " (adapter_model.bin is there: only safetensors adapters are supported)"
            } else {
                ""
            };
            lora_err(dir, format!("{WEIGHTS_FILE} is missing{also}"))
        })?;
        let link = read(LINK_FILE)?;
        LoraAdapter::from_bytes(dir, &config, &weights, link.as_deref())
    }

    /// Parse an adapter from the bytes of its files (`path` only names it in messages).
    pub fn from_bytes(
        path: &Path,
        config: &[u8],
        weights: &[u8],
        link: Option<&[u8]>,
    ) -> Result<LoraAdapter> {
        let e = |msg: String| lora_err(path, msg);
        let raw: RawConfig =
            serde_json::from_slice(config).map_err(|x| e(format!("invalid {CONFIG_FILE}: {x}")))?;
        let cfg = check_config(&raw).map_err(|m| e(format!("{CONFIG_FILE}: {m}")))?;
        let link_bytes = link;
        let link: Option<AdapterLinkFile> = link
            .map(|b| serde_json::from_slice(b).map_err(|x| e(format!("invalid {LINK_FILE}: {x}"))))
            .transpose()?;
        if let Some(l) = &link {
            l.link
                .check_bounds()
                .map_err(|m| e(format!("{LINK_FILE}: {m}")))?;
        }

        let st = SafeTensors::deserialize(weights)
            .map_err(|x| e(format!("{WEIGHTS_FILE}: {}", map_st_err(x))))?;
        let mut a_s: HashMap<(usize, usize), HostTensor> = HashMap::new();
        let mut b_s: HashMap<(usize, usize), HostTensor> = HashMap::new();
        let mut extra = None;
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort();
        for name in &names {
            let view = st
                .tensor(name)
                .map_err(|x| e(format!("{WEIGHTS_FILE}: tensor {name}: {x}")))?;
            let dtype = view.dtype();
            if !matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32) {
                return Err(e(format!(
                    "tensor {name} has dtype {dtype:?} (supported: F16, BF16, F32)"
                )));
            }
            let data = bytes_to_f32(dtype, view.data())
                .ok_or_else(|| e(format!("tensor {name}: cannot read dtype {dtype:?}")))?;
            let t = HostTensor {
                shape: view.shape().to_vec(),
                data,
            };
            if t.shape.len() != 2 {
                return Err(e(format!(
                    "tensor {name} has shape {:?}, expected a matrix",
                    t.shape
                )));
            }
            if let Some(i) = t.data.iter().position(|x| !x.is_finite()) {
                return Err(e(format!(
                    "tensor {name} holds a non-finite value at element {i}"
                )));
            }
            if name == EXTRA_EMBEDDINGS {
                extra = Some(t);
                continue;
            }
            let (layer, module, is_a) = parse_name(name).ok_or_else(|| {
                e(format!(
                    "tensor {name} is not a LoRA weight of a Llama-family model (expected \
                     {PEFT_PREFIX}model.layers.<i>.{{self_attn.{{q,k,v,o}}_proj,mlp.{{gate,up,\
                     down}}_proj}}.lora_{{A,B}}.weight or {EXTRA_EMBEDDINGS})"
                ))
            })?;
            let mname = MODULES[module].0;
            if !cfg.target_modules.iter().any(|m| m == mname) {
                return Err(e(format!(
                    "tensor {name} adapts {mname}, which target_modules in {CONFIG_FILE} does \
                     not list ({})",
                    cfg.target_modules.join(", ")
                )));
            }
            let (rank, what) = if is_a {
                (t.shape[0], "lora_A [r, in]")
            } else {
                (t.shape[1], "lora_B [out, r]")
            };
            if rank != cfg.r {
                return Err(e(format!(
                    "r mismatch: tensor {name} ({what}) has shape {:?}, rank {rank}, but \
                     {CONFIG_FILE} says r = {}",
                    t.shape, cfg.r
                )));
            }
            if is_a { &mut a_s } else { &mut b_s }.insert((layer, module), t);
        }
        let mut factors = HashMap::new();
        let mut keys: BTreeSet<(usize, usize)> = a_s.keys().copied().collect();
        keys.extend(b_s.keys().copied());
        for key in keys {
            let (a, b) = (a_s.remove(&key), b_s.remove(&key));
            let (l, m) = (key.0, MODULES[key.1]);
            match (a, b) {
                (Some(a), Some(b)) => {
                    factors.insert(key, Factors { a, b });
                }
                (a, _) => {
                    let missing = if a.is_none() { "lora_A" } else { "lora_B" };
                    return Err(e(format!(
                        "layer {l} {}.{}: {missing} is missing (each adapted module needs \
                         both lora_A and lora_B)",
                        m.1, m.0
                    )));
                }
            }
        }
        if factors.is_empty() && extra.is_none() {
            return Err(e(format!("{WEIGHTS_FILE} holds no LoRA weights")));
        }
        // XXH3 (GB/s) over every byte of the files: an adapter's weights can be large.
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for part in [Some(config), link_bytes, Some(weights)] {
            // Length-prefixed (u64::MAX for an absent kvlink.json), so no two different
            // sets of files hash the same bytes.
            h.update(&part.map_or(u64::MAX, |p| p.len() as u64).to_le_bytes());
            h.update(part.unwrap_or_default());
        }
        Ok(LoraAdapter {
            path: path.to_path_buf(),
            r: cfg.r,
            alpha: cfg.alpha,
            use_rslora: cfg.use_rslora,
            base_model_name: raw.base_model_name_or_path.clone(),
            target_modules: cfg.target_modules,
            link,
            factors,
            extra,
            hash: h.digest(),
        })
    }

    /// The merge scale: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scale(&self) -> f32 {
        let r = self.r as f64;
        (if self.use_rslora {
            self.alpha / r.sqrt()
        } else {
            self.alpha / r
        }) as f32
    }

    /// Input-only embedding rows the adapter adds.
    pub fn extra_rows(&self) -> usize {
        self.extra.as_ref().map_or(0, |t| t.shape[0])
    }

    /// How many (layer, module) weights the adapter changes.
    pub fn adapted(&self) -> usize {
        self.factors.len()
    }

    /// A hash of the adapter's files (config, kvlink.json, tensor bytes).
    pub fn hash(&self) -> u64 {
        self.hash
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn lora_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Lora {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

struct CheckedConfig {
    r: usize,
    alpha: f64,
    use_rslora: bool,
    target_modules: Vec<String>,
}

/// What this engine supports of a PEFT config; the error names the first field it
/// does not.
fn check_config(c: &RawConfig) -> std::result::Result<CheckedConfig, String> {
    match c.peft_type.as_deref() {
        Some("LORA") => {}
        Some(other) => return Err(format!("peft_type {other:?} is not supported (only LORA)")),
        None => return Err("peft_type is missing (expected \"LORA\")".into()),
    }
    if let Some(t) = c.task_type.as_deref() {
        if t != "CAUSAL_LM" {
            return Err(format!("task_type {t:?} is not supported (only CAUSAL_LM)"));
        }
    }
    if c.use_dora == Some(true) {
        return Err("use_dora: true (DoRA) is not supported".into());
    }
    if c.fan_in_fan_out == Some(true) {
        return Err("fan_in_fan_out: true is not supported (weights must be [out, in])".into());
    }
    if let Some(b) = c.bias.as_deref() {
        if b != "none" {
            return Err(format!("bias {b:?} is not supported (only \"none\")"));
        }
    }
    if c.lora_bias == Some(true) {
        return Err("lora_bias: true is not supported".into());
    }
    let non_empty = |v: &Option<serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Object(m)) => !m.is_empty(),
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    };
    for (name, v) in [
        ("rank_pattern", &c.rank_pattern),
        ("alpha_pattern", &c.alpha_pattern),
        ("modules_to_save", &c.modules_to_save),
    ] {
        if non_empty(v) {
            return Err(format!("{name} is not supported (it must be empty)"));
        }
    }
    let r = match c.r {
        Some(r) if r > MAX_RANK => {
            return Err(format!(
                "r = {r} is more than the {MAX_RANK} this engine accepts"
            ))
        }
        Some(r) if r > 0 => r,
        Some(_) => return Err("r must be > 0".into()),
        None => return Err("r is missing".into()),
    };
    let alpha = match c.lora_alpha {
        Some(a) if a.is_finite() => a,
        Some(a) => return Err(format!("lora_alpha {a} is not a finite number")),
        None => return Err("lora_alpha is missing".into()),
    };
    let target_modules: Vec<String> = match &c.target_modules {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("target_modules entry {v} is not a string"))
            })
            .collect::<std::result::Result<_, _>>()?,
        Some(serde_json::Value::String(s)) => {
            return Err(format!(
                "target_modules {s:?} (a pattern) is not supported: list the modules"
            ))
        }
        _ => return Err("target_modules is missing (expected a list of module names)".into()),
    };
    let known: Vec<&str> = MODULES.iter().map(|m| m.0).collect();
    if let Some(bad) = target_modules.iter().find(|m| !known.contains(&m.as_str())) {
        return Err(format!(
            "target module {bad:?} is not a module of this model (supported: {})",
            known.join(", ")
        ));
    }
    Ok(CheckedConfig {
        r,
        alpha,
        use_rslora: c.use_rslora.unwrap_or(false),
        target_modules,
    })
}

/// `base_model.model.model.layers.{i}.{parent}.{module}.lora_{A,B}.weight` ->
/// (i, index into MODULES, is A).
fn parse_name(name: &str) -> Option<(usize, usize, bool)> {
    let rest = name.strip_prefix(PEFT_PREFIX)?;
    let p: Vec<&str> = rest.split('.').collect();
    let [m0, layers, i, parent, module, ab, w] = p.as_slice() else {
        return None;
    };
    if *m0 != "model" || *layers != "layers" || *w != "weight" {
        return None;
    }
    // Plain decimal only (no sign, no leading "+").
    if i.is_empty() || !i.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let layer = i.parse().ok()?;
    let module = MODULES
        .iter()
        .position(|m| m.0 == *module && m.1 == *parent)?;
    let is_a = match *ab {
        "lora_A" => true,
        "lora_B" => false,
        _ => return None,
    };
    Some((layer, module, is_a))
}

/// `[out, in]` of a module's weight in a model of this config.
fn module_shape(cfg: &ModelConfig, module: usize) -> (usize, usize) {
    let (h, q, kv, ff) = (
        cfg.hidden_size,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.intermediate_size,
    );
    match MODULES[module].0 {
        "q_proj" => (q, h),
        "k_proj" | "v_proj" => (kv, h),
        "o_proj" => (h, q),
        "gate_proj" | "up_proj" => (ff, h),
        _ => (h, ff),
    }
}

/// A base model with an adapter merged in (see the module docs).
pub struct LoraModel {
    base: Box<dyn WeightSource>,
    adapter: LoraAdapter,
    config: ModelConfig,
    /// Canonical weight name -> key into the adapter's factors.
    merged: HashMap<String, (usize, usize)>,
    link: Option<LinkConfig>,
}

impl LoraModel {
    /// Check the adapter fits `base` (base model, layers, shapes, extra rows, link ids)
    /// and wrap it.
    pub fn new(base: Box<dyn WeightSource>, adapter: LoraAdapter) -> Result<LoraModel> {
        let bc = base.config();
        let a = &adapter;
        let lf = a.link.clone().unwrap_or_default();
        if let Some(bm) = &lf.base_model {
            let mismatch = [
                ("hidden_size", bm.hidden_size, bc.hidden_size),
                (
                    "num_hidden_layers",
                    bm.num_hidden_layers,
                    bc.num_hidden_layers,
                ),
                ("vocab_size", bm.vocab_size, bc.vocab_size),
            ]
            .iter()
            .any(|(_, want, have)| want.is_some_and(|w| w != *have));
            if mismatch {
                let show = |v: Option<usize>| v.map_or("?".to_string(), |v| v.to_string());
                return Err(a.err(format!(
                    "wrong base model: the adapter was trained on {} (hidden_size {}, \
                     num_hidden_layers {}, vocab_size {}), but the loaded model {} has \
                     hidden_size {}, num_hidden_layers {}, vocab_size {}",
                    bm.name
                        .as_deref()
                        .or(a.base_model_name.as_deref())
                        .map_or("an unnamed model".to_string(), |n| format!("{n:?}")),
                    show(bm.hidden_size),
                    show(bm.num_hidden_layers),
                    show(bm.vocab_size),
                    base.describe(),
                    bc.hidden_size,
                    bc.num_hidden_layers,
                    bc.vocab_size
                )));
            }
        }
        if let Some(v) = lf.base_vocab {
            if v != bc.vocab_size {
                return Err(a.err(format!(
                    "wrong base model: {LINK_FILE} says base_vocab {v}, but the loaded model \
                     {} has vocab_size {}",
                    base.describe(),
                    bc.vocab_size
                )));
            }
        }
        let mut merged = HashMap::new();
        let mut keys: Vec<_> = a.factors.keys().copied().collect();
        keys.sort();
        for key in keys {
            let (layer, module) = key;
            let (mname, parent) = MODULES[module];
            if layer >= bc.num_hidden_layers {
                return Err(a.err(format!(
                    "layer index {layer} ({parent}.{mname}) is beyond the model's {} layers",
                    bc.num_hidden_layers
                )));
            }
            let name = names::layer(layer, &format!("{parent}.{mname}.weight"));
            if !base.has(&name) {
                return Err(a.err(format!("the model has no tensor {name} to adapt")));
            }
            let (out, inp) = module_shape(bc, module);
            let f = &a.factors[&key];
            if f.a.shape != [a.r, inp] {
                return Err(a.err(format!(
                    "layer {layer} {parent}.{mname}.lora_A has shape {:?}, but the weight \
                     [{out}, {inp}] needs [r, in] = [{}, {inp}]",
                    f.a.shape, a.r
                )));
            }
            if f.b.shape != [out, a.r] {
                return Err(a.err(format!(
                    "layer {layer} {parent}.{mname}.lora_B has shape {:?}, but the weight \
                     [{out}, {inp}] needs [out, r] = [{out}, {}]",
                    f.b.shape, a.r
                )));
            }
            merged.insert(name, key);
        }
        let n_extra = a.extra_rows();
        if let Some(x) = &a.extra {
            if x.shape[1] != bc.hidden_size {
                return Err(a.err(format!(
                    "{EXTRA_EMBEDDINGS} has shape {:?}: rows of {} values, but the model's \
                     hidden size is {}",
                    x.shape, x.shape[1], bc.hidden_size
                )));
            }
            if bc.extra_vocab > 0 {
                return Err(a.err(
                    "the base model already has extra embedding rows (adapters with extra \
                     rows cannot be stacked)",
                ));
            }
        }
        if let Some(n) = lf.extra_tokens {
            if n != n_extra {
                return Err(a.err(format!(
                    "{LINK_FILE} says extra_tokens {n}, but {WEIGHTS_FILE} has {n_extra} \
                     extra embedding rows ({EXTRA_EMBEDDINGS})"
                )));
            }
        }
        let mut config = bc.clone();
        config.extra_vocab = config.extra_vocab.saturating_add(n_extra);
        config.validate().map_err(|m| {
            a.err(format!(
                "the model with the adapter's {n_extra} extra embedding rows: {m}"
            ))
        })?;
        let link = a.link.as_ref().map(|l| l.link.clone());
        if let Some(l) = &link {
            let vocab = config.input_vocab();
            l.validate(vocab, l.max_slots.max(1)).map_err(|e| {
                a.err(format!(
                    "{LINK_FILE}: {e} ({} base + {n_extra} extra rows)",
                    bc.vocab_size
                ))
            })?;
        }
        Ok(LoraModel {
            base,
            adapter,
            config,
            merged,
            link,
        })
    }

    /// Open `dir` as an adapter and merge it into `base`.
    pub fn open(base: Box<dyn WeightSource>, dir: &Path) -> Result<LoraModel> {
        let adapter = LoraAdapter::open(dir)?;
        LoraModel::new(base, adapter)
    }

    pub fn adapter(&self) -> &LoraAdapter {
        &self.adapter
    }
}

/// `w[out, in] += scale * b[out, r] @ a[r, in]` (rows split over threads off the web).
fn merge_into(w: &mut [f32], a: &[f32], b: &[f32], r: usize, inp: usize, scale: f32) {
    let rows = |w: &mut [f32], b: &[f32]| {
        for (wrow, brow) in w.chunks_mut(inp).zip(b.chunks(r)) {
            for (j, &bj) in brow.iter().enumerate() {
                let c = scale * bj;
                if c == 0.0 {
                    continue;
                }
                for (x, &y) in wrow.iter_mut().zip(&a[j * inp..(j + 1) * inp]) {
                    *x += c * y;
                }
            }
        }
    };
    let out = w.len() / inp.max(1);
    let threads = if cfg!(target_arch = "wasm32") || out * inp * r < (1 << 22) {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
    };
    if threads <= 1 {
        rows(w, b);
        return;
    }
    let per = out.div_ceil(threads);
    std::thread::scope(|s| {
        for (wc, bc) in w.chunks_mut(per * inp).zip(b.chunks(per * r)) {
            s.spawn(move || rows(wc, bc));
        }
    });
}

impl WeightSource for LoraModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn describe(&self) -> String {
        let a = &self.adapter;
        let extra = match a.extra_rows() {
            0 => String::new(),
            n => format!(", {n} extra token rows"),
        };
        format!(
            "{} + LoRA {} (r {}, alpha {}{}, {} weights{extra})",
            self.base.describe(),
            a.path.display(),
            a.r,
            a.alpha,
            if a.use_rslora { ", rsLoRA" } else { "" },
            a.adapted()
        )
    }

    fn dtype(&self) -> String {
        format!("{} + LoRA", self.base.dtype())
    }

    fn has(&self, name: &str) -> bool {
        self.base.has(name)
    }

    fn load(&self, name: &str) -> Result<HostTensor> {
        let mut t = self.base.load(name)?;
        if let Some(key) = self.merged.get(name) {
            let f = &self.adapter.factors[key];
            let (out, inp) = (f.b.shape[0], f.a.shape[1]);
            if t.shape != [out, inp] {
                return Err(self.adapter.err(format!(
                    "tensor {name} has shape {:?} in the model, the adapter expects \
                     [{out}, {inp}]",
                    t.shape
                )));
            }
            let r = self.adapter.r;
            merge_into(
                &mut t.data,
                &f.a.data,
                &f.b.data,
                r,
                inp,
                self.adapter.scale(),
            );
        } else if name == names::EMBED {
            if let Some(x) = &self.adapter.extra {
                let base = self.base.config();
                let want = [base.input_vocab(), base.hidden_size];
                if t.shape != want {
                    return Err(self.adapter.err(format!(
                        "the model's embedding has shape {:?}, expected {want:?}",
                        t.shape
                    )));
                }
                t.data.extend_from_slice(&x.data);
                t.shape[0] += x.shape[0];
            }
        }
        Ok(t)
    }

    fn tokenizer(&self) -> Result<Tokenizer> {
        self.base.tokenizer()
    }

    fn fingerprint(&self) -> String {
        format!(
            "{}+lora-{:016x}",
            self.base.fingerprint(),
            self.adapter.hash
        )
    }

    fn link_config(&self) -> Option<LinkConfig> {
        self.link.clone().or_else(|| self.base.link_config())
    }
}

/// Wrap `base` with the adapter in `dir` (the CLI's `--lora`).
pub fn with_lora(base: Box<dyn WeightSource>, dir: &Path) -> Result<Box<dyn WeightSource>> {
    Ok(Box::new(LoraModel::open(base, dir)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_bad_ones_do_not() {
        let n = |s: &str| parse_name(&format!("{PEFT_PREFIX}model.layers.{s}"));
        assert_eq!(n("3.self_attn.q_proj.lora_A.weight"), Some((3, 0, true)));
        assert_eq!(n("12.mlp.down_proj.lora_B.weight"), Some((12, 6, false)));
        assert_eq!(n("1.mlp.q_proj.lora_A.weight"), None);
        assert_eq!(n("1.self_attn.q_proj.lora_C.weight"), None);
        assert_eq!(n("+1.self_attn.q_proj.lora_A.weight"), None);
        assert_eq!(n("1.self_attn.q_proj.lora_A.default.weight"), None);
        assert_eq!(
            parse_name("model.layers.1.self_attn.q_proj.lora_A.weight"),
            None
        );
    }

    #[test]
    fn merge_matches_the_plain_product() {
        let (out, inp, r) = (3, 5, 2);
        let a: Vec<f32> = (0..r * inp).map(|i| i as f32 * 0.5 - 1.0).collect();
        let b: Vec<f32> = (0..out * r).map(|i| 1.0 - i as f32 * 0.25).collect();
        let mut w = vec![1.0f32; out * inp];
        merge_into(&mut w, &a, &b, r, inp, 2.0);
        for o in 0..out {
            for i in 0..inp {
                let d: f32 = (0..r).map(|j| b[o * r + j] * a[j * inp + i]).sum();
                assert!((w[o * inp + i] - (1.0 + 2.0 * d)).abs() < 1e-6);
            }
        }
    }
}
