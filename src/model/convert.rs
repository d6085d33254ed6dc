//! Write any [`WeightSource`] as an HF model folder (config.json, F16 model.safetensors,
//! tokenizer.json, tokenizer_config.json).

use std::borrow::Cow;
use std::cell::RefCell;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, View};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::model::config::{Arch, ModelConfig};
use crate::model::hf::canonical_tensors;
use crate::model::source::WeightSource;

/// The `config.json` for a model config plus special token ids.
pub fn hf_config_json(cfg: &ModelConfig, bos_id: Option<u32>, eos_ids: &[u32]) -> Value {
    let (arch, model_type) = match cfg.arch {
        Arch::Llama => ("LlamaForCausalLM", "llama"),
        Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
    };
    let mut o = json!({
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "torch_dtype": "float16",
    });
    let m = o.as_object_mut().unwrap();
    m.insert(
        "rope_scaling".into(),
        match cfg.rope_scaling {
            Some(s) => json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }),
            None => Value::Null,
        },
    );
    if cfg.arch == Arch::Qwen2 {
        m.insert("use_sliding_window".into(), false.into());
        m.insert("sliding_window".into(), Value::Null);
    }
    m.insert(
        "bos_token_id".into(),
        bos_id.map(Value::from).unwrap_or(Value::Null),
    );
    m.insert(
        "eos_token_id".into(),
        match eos_ids {
            [] => Value::Null,
            [one] => (*one).into(),
            many => many.to_vec().into(),
        },
    );
    o
}

struct WriteState<'a> {
    err: Option<Error>,
    done: usize,
    total: usize,
    progress: &'a mut dyn FnMut(usize, usize),
}

/// A tensor that is loaded and converted to F16 only when the serializer asks for its bytes.
struct LazyF16<'a> {
    name: String,
    shape: Vec<usize>,
    src: &'a dyn WeightSource,
    state: &'a RefCell<WriteState<'a>>,
}

impl LazyF16<'_> {
    fn bytes(&self) -> Result<Vec<u8>> {
        let t = self.src.load(&self.name)?;
        if t.shape != self.shape || t.data.len() != self.data_len() / 2 {
            return Err(Error::bad_model(
                self.src.describe(),
                format!(
                    "tensor `{}` has shape {:?}, expected {:?}",
                    self.name, t.shape, self.shape
                ),
            ));
        }
        let mut out = Vec::with_capacity(t.data.len() * 2);
        for &x in &t.data {
            let x = x.clamp(-65504.0, 65504.0);
            out.extend_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes());
        }
        Ok(out)
    }
}

impl View for LazyF16<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F16
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 2
    }
    fn data(&self) -> Cow<'_, [u8]> {
        if self.state.borrow().err.is_some() {
            return Cow::Owned(vec![0u8; self.data_len()]);
        }
        let r = self.bytes();
        let mut st = self.state.borrow_mut();
        match r {
            Ok(b) => {
                st.done += 1;
                let (d, t) = (st.done, st.total);
                (st.progress)(d, t);
                Cow::Owned(b)
            }
            Err(e) => {
                st.err = Some(e);
                Cow::Owned(vec![0u8; self.data_len()])
            }
        }
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Write `src` as an HF folder at `out` (which must not exist, or be an empty directory).
/// Everything goes to a temporary directory next to `out` that is renamed at the end, so
/// a failed conversion leaves nothing behind. `progress(done, total)` is called after
/// each tensor.
pub fn write_hf_folder(
    src: &dyn WeightSource,
    out: &Path,
    mut progress: impl FnMut(usize, usize),
) -> Result<()> {
    if src.config().extra_vocab > 0 {
        return Err(Error::Unsupported(format!(
            "{} has {} input-only embedding rows (a LoRA adapter's extra tokens), which an HF \
             folder cannot hold; load the adapter with --lora instead of converting",
            src.describe(),
            src.config().extra_vocab
        )));
    }
    if out.exists() {
        let empty_dir = out.is_dir()
            && std::fs::read_dir(out)
                .map_err(|e| Error::io(out, e))?
                .next()
                .is_none();
        if !empty_dir {
            return Err(Error::Input(format!(
                "output {} already exists; choose a new path or remove it",
                out.display()
            )));
        }
    }
    let file_name = out
        .file_name()
        .ok_or_else(|| Error::Input(format!("bad output path {}", out.display())))?
        .to_string_lossy()
        .into_owned();
    let parent: PathBuf = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = parent.join(format!(".{file_name}.kvlink-tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;

    let r = write_into(src, &tmp, &mut progress).and_then(|()| {
        if out.exists() {
            std::fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
        }
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
    });
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r
}

fn write_into(
    src: &dyn WeightSource,
    dir: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    let cfg = src.config();
    cfg.validate()
        .map_err(|e| Error::bad_model(src.describe(), format!("invalid config: {e}")))?;
    let tok = src.tokenizer()?;

    // Tokenizer files.
    write_file(&dir.join("tokenizer.json"), tok.to_hf_json()?.as_bytes())?;
    let tc = serde_json::to_string_pretty(&tok.tokenizer_config_json())
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    write_file(&dir.join("tokenizer_config.json"), tc.as_bytes())?;

    // config.json
    let mut eos_ids: Vec<u32> = Vec::new();
    if let Some((e, _)) = &tok.eos_token {
        eos_ids.push(*e);
    }
    for &s in &tok.stop_ids {
        if !eos_ids.contains(&s) {
            eos_ids.push(s);
        }
    }
    let config = hf_config_json(cfg, tok.bos_token.as_ref().map(|(b, _)| *b), &eos_ids);
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Input(e.to_string()))?;
    write_file(&dir.join("config.json"), text.as_bytes())?;

    // model.safetensors, one tensor in memory at a time.
    let tensors = canonical_tensors(cfg);
    let state = RefCell::new(WriteState {
        err: None,
        done: 0,
        total: tensors.len(),
        progress,
    });
    let views: Vec<(String, LazyF16)> = tensors
        .into_iter()
        .map(|(name, shape)| {
            (
                name.clone(),
                LazyF16 {
                    name,
                    shape,
                    src,
                    state: &state,
                },
            )
        })
        .collect();
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let st_path = dir.join("model.safetensors");
    let r = safetensors::serialize_to_file(views, Some(meta), &st_path);
    if let Some(e) = state.borrow_mut().err.take() {
        return Err(e);
    }
    r.map_err(|e| Error::io(&st_path, std::io::Error::other(e.to_string())))?;
    Ok(())
}
