//! Deterministic random weights in the shapes of real models, for tests and benchmarks.
//! Tensors are generated on demand from (seed, tensor name), so large shapes cost no RAM
//! until loaded.

use std::collections::HashMap;

use rand::{RngCore, SeedableRng};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::error::{Error, Result};
use crate::model::config::{Arch, ModelConfig, RopeScaling};
use crate::model::hf::canonical_tensors;
use crate::model::source::{HostTensor, WeightSource};
use crate::model::tokenizer::Tokenizer;

/// Shapes [`RandomModel::new`] knows.
pub const RANDOM_SHAPES: &[&str] = &["tiny", "tiny-qwen2", "smollm2-135m", "llama-3.2-1b"];

/// Standard deviation of random linear/embedding weights and biases.
pub const WEIGHT_STD: f32 = 0.02;
/// Standard deviation of random RMSNorm weights (around 1.0).
pub const NORM_STD: f32 = 0.1;

/// ChatML, as SmolLM2 / Qwen2 use it.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The model config of a named random shape.
pub fn random_config(shape: &str) -> Result<ModelConfig> {
    let tiny = ModelConfig {
        arch: Arch::Llama,
        vocab_size: 512,
        hidden_size: 128,
        intermediate_size: 344,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 32,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 2048,
        tie_word_embeddings: false,
        attention_bias: false,
        extra_vocab: 0,
    };
    Ok(match shape {
        "tiny" => tiny,
        "tiny-qwen2" => ModelConfig {
            arch: Arch::Qwen2,
            attention_bias: true,
            rms_norm_eps: 1e-6,
            ..tiny
        },
        "smollm2-135m" => ModelConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rope_theta: 100000.0,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            ..tiny
        },
        "llama-3.2-1b" => ModelConfig {
            vocab_size: 128256,
            hidden_size: 2048,
            intermediate_size: 8192,
            num_hidden_layers: 16,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 64,
            rope_theta: 500000.0,
            rope_scaling: Some(RopeScaling {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }),
            max_position_embeddings: 131072,
            tie_word_embeddings: true,
            ..tiny
        },
        other => {
            return Err(Error::Input(format!(
                "unknown random model shape `{other}` (known: {})",
                RANDOM_SHAPES.join(", ")
            )))
        }
    })
}

/// GPT-2's byte -> printable char mapping (what `ByteLevel` uses).
fn byte_to_char() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs: Vec<u32> = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        out[b as usize] = char::from_u32(c).unwrap();
    }
    out
}

/// Special tokens of the random tokenizer, with ids 256, 257, 258.
pub const RANDOM_SPECIAL_TOKENS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A byte-level BPE tokenizer with no merges: ids 0..256 are the bytes, then
/// `<|endoftext|>` (256, bos), `<|im_start|>` (257), `<|im_end|>` (258, eos), ChatML template.
pub fn random_tokenizer() -> Result<Tokenizer> {
    let terr = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
    let vocab: Vocab = byte_to_char()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .map_err(terr)?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    inner.with_decoder(Some(ByteLevel::new(false, true, true)));
    let specials: Vec<AddedToken> = RANDOM_SPECIAL_TOKENS
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    inner.add_special_tokens(&specials);
    let id = |s: &str| -> Result<(u32, String)> {
        inner
            .token_to_id(s)
            .map(|i| (i, s.to_string()))
            .ok_or_else(|| Error::Tokenizer(format!("random tokenizer lacks {s}")))
    };
    let bos = id("<|endoftext|>")?;
    let eos = id("<|im_end|>")?;
    Ok(Tokenizer {
        stop_ids: vec![eos.0, bos.0],
        bos_token: Some(bos),
        eos_token: Some(eos),
        chat_template: Some(CHATML_TEMPLATE.to_string()),
        add_bos: false,
        inner,
        data_inner: Default::default(),
        control_texts: Default::default(),
    })
}

/// Random weights of a named shape.
pub struct RandomModel {
    shape: String,
    seed: u64,
    config: ModelConfig,
    tensors: HashMap<String, Vec<usize>>,
}

impl RandomModel {
    pub fn new(shape: &str, seed: u64) -> Result<RandomModel> {
        let config = random_config(shape)?;
        let tensors = canonical_tensors(&config).into_iter().collect();
        Ok(RandomModel {
            shape: shape.to_string(),
            seed,
            config,
            tensors,
        })
    }
    pub fn shape_name(&self) -> &str {
        &self.shape
    }
    pub fn seed(&self) -> u64 {
        self.seed
    }
}

/// Fill `out` with approximately N(mean, std) values (Irwin-Hall of 4 uniforms per u64).
fn fill_normalish(rng: &mut impl RngCore, out: &mut [f32], mean: f32, std: f32) {
    // Sum of 4 U(0,1): mean 2, variance 1/3.
    let scale = std * 3f32.sqrt();
    const INV: f32 = 1.0 / 65536.0;
    for o in out.iter_mut() {
        let r = rng.next_u64();
        let s = (r & 0xffff) as f32
            + ((r >> 16) & 0xffff) as f32
            + ((r >> 32) & 0xffff) as f32
            + (r >> 48) as f32;
        *o = mean + (s * INV + 2.0 * INV - 2.0) * scale;
    }
}

impl WeightSource for RandomModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn describe(&self) -> String {
        format!("random weights ({}, seed {})", self.shape, self.seed)
    }
    fn dtype(&self) -> String {
        "f32".into()
    }
    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn load(&self, name: &str) -> Result<HostTensor> {
        let shape = self.tensors.get(name).ok_or_else(|| {
            Error::Input(format!(
                "random model `{}` has no tensor `{name}`",
                self.shape
            ))
        })?;
        // FNV-1a of the name: the same weights as ever for a given seed.
        let h = crate::kv::fnv1a64(name.as_bytes());
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed ^ h);
        let n: usize = shape.iter().product();
        let mut data = vec![0f32; n];
        let (mean, std) = if name.ends_with("norm.weight") {
            (1.0, NORM_STD)
        } else {
            (0.0, WEIGHT_STD)
        };
        fill_normalish(&mut rng, &mut data, mean, std);
        Ok(HostTensor {
            shape: shape.clone(),
            data,
        })
    }
    fn tokenizer(&self) -> Result<Tokenizer> {
        random_tokenizer()
    }
    fn fingerprint(&self) -> String {
        format!("random-{}-{}", self.shape, self.seed)
    }
}
