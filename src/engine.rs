//! The engine: a loaded model with its tokenizer on a GPU, and generation.

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::model::llama::{Batch, KvCache, Llama, Logits};
use crate::model::{ModelConfig, Tokenizer, WeightSource};
use crate::sampling::{Sampler, SamplingParams};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default context window when the model allows more (KV memory grows with it).
pub const DEFAULT_CONTEXT: usize = 4096;
/// Prefill processes at most this many tokens per forward call (bounds activation memory).
pub const PREFILL_CHUNK: usize = 512;

pub struct Engine {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// Tokens of context (KV cache capacity) per sequence.
    pub context: usize,
    pub description: String,
    pub fingerprint: String,
}

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop at the tokenizer's end-of-sequence / end-of-turn tokens.
    pub stop_at_eos: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 256,
            sampling: SamplingParams::greedy(),
            stop_at_eos: true,
        }
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Prompt processing up to the first token.
    pub ttft: Duration,
    /// Time for the tokens after the first.
    pub decode: Duration,
    /// Why generation stopped: "eos", "max_tokens", "context" or "callback".
    pub stop: &'static str,
}

impl GenerateStats {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.ttft.as_secs_f64().max(1e-9)
    }
    pub fn decode_tok_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

impl Engine {
    /// Load weights and tokenizer onto `gpu`. `context` 0 means the default
    /// (min(model maximum, DEFAULT_CONTEXT)).
    pub fn load(
        gpu: Arc<Gpu>,
        src: &dyn WeightSource,
        context: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Engine> {
        let tokenizer = src.tokenizer()?;
        let cfg = src.config();
        let max = cfg.max_position_embeddings.max(1);
        let context = if context == 0 {
            max.min(DEFAULT_CONTEXT)
        } else {
            context
        };
        if context > max {
            return Err(Error::Input(format!(
                "context {context} exceeds the model's maximum of {max} positions"
            )));
        }
        // Compile every kernel now, so the first request's TTFT measures inference only.
        for k in crate::ops::kernels::ALL {
            gpu.pipeline(*k);
        }
        let model = Llama::load(gpu, src, progress)?;
        Ok(Engine {
            model,
            tokenizer,
            context,
            description: src.describe(),
            fingerprint: src.fingerprint(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        self.model.gpu()
    }

    /// Tokenize a prompt: with `raw`, the text as is (plus BOS where the model wants
    /// one); otherwise wrapped in the model's chat template as one user turn.
    pub fn encode_prompt(&self, text: &str, system: Option<&str>, raw: bool) -> Result<Vec<u32>> {
        if raw {
            return self.tokenizer.encode(text, true);
        }
        let mut msgs = Vec::new();
        if let Some(s) = system {
            msgs.push(crate::model::ChatMessage {
                role: "system".into(),
                content: s.into(),
            });
        }
        msgs.push(crate::model::ChatMessage {
            role: "user".into(),
            content: text.into(),
        });
        let rendered = self.tokenizer.apply_chat_template(&msgs, true)?;
        // The template already contains any BOS text it wants.
        self.tokenizer.encode(&rendered, false)
    }

    fn check_prompt(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::Input("the prompt is empty".into()));
        }
        if ids.len() >= self.context {
            return Err(Error::Input(format!(
                "the prompt is {} tokens but the context holds {} (use --ctx to raise it, up to \
                 the model's {})",
                ids.len(),
                self.context,
                self.model.cfg.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// Prefill `ids` into a fresh causal cache starting at slot 0; returns the cache and
    /// the last row's logits (if `want_logits`) and greedy token.
    fn prefill(
        &self,
        ids: &[u32],
        want_logits: bool,
        greedy: bool,
    ) -> Result<(KvCache, Vec<f32>, Option<u32>)> {
        self.check_prompt(ids)?;
        let mut cache = self.model.new_cache(self.context)?;
        let mut start = 0;
        let mut out = None;
        while start < ids.len() {
            let end = (start + PREFILL_CHUNK).min(ids.len());
            let pos: Vec<i32> = (start as i32..end as i32).collect();
            let slots: Vec<u32> = (start as u32..end as u32).collect();
            let last = end == ids.len();
            let batch = Batch {
                tokens: &ids[start..end],
                positions: &pos,
                slots: &slots,
            };
            let lg = if last && want_logits {
                Logits::Last
            } else {
                Logits::None
            };
            out = Some(self.model.forward(&mut cache, &batch, lg, last && greedy)?);
            start = end;
        }
        let out = out.expect("non-empty prompt");
        Ok((cache, out.logits, out.token))
    }

    /// Next-token logits after the prompt `ids` (one row, `[vocab]`).
    pub fn next_logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        Ok(self.prefill(ids, true, false)?.1)
    }

    /// Generate after the prompt `ids`. `on_token(id)` is called for every generated
    /// token (including a final stop token); returning false stops early.
    pub fn generate(
        &self,
        ids: &[u32],
        params: &GenerateParams,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<GenerateStats> {
        let mut sampler = Sampler::new(params.sampling.clone())?;
        let greedy = sampler.params().is_greedy();
        let t0 = Instant::now();
        let mut stats = GenerateStats {
            prompt_tokens: ids.len(),
            stop: "max_tokens",
            ..Default::default()
        };
        if params.max_tokens == 0 {
            self.check_prompt(ids)?;
            return Ok(stats);
        }
        let (mut cache, logits, tok) = self.prefill(ids, !greedy, greedy)?;
        let mut next = match tok {
            Some(t) => t,
            None => sampler.sample(&logits)?,
        };
        stats.ttft = t0.elapsed();
        let t1 = Instant::now();
        let mut pos = ids.len();
        loop {
            stats.generated_tokens += 1;
            let stop = params.stop_at_eos && self.tokenizer.is_stop(next);
            if !on_token(next) {
                stats.stop = "callback";
                break;
            }
            if stop {
                stats.stop = "eos";
                break;
            }
            if stats.generated_tokens >= params.max_tokens {
                break;
            }
            if pos >= self.context {
                stats.stop = "context";
                break;
            }
            let batch = Batch {
                tokens: &[next],
                positions: &[pos as i32],
                slots: &[pos as u32],
            };
            let out = self.model.forward(
                &mut cache,
                &batch,
                if greedy { Logits::None } else { Logits::Last },
                greedy,
            )?;
            next = match out.token {
                Some(t) => t,
                None => sampler.sample(&out.logits)?,
            };
            pos += 1;
        }
        stats.decode = t1.elapsed();
        Ok(stats)
    }
}
