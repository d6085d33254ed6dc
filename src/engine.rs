//! The engine: a loaded model with its tokenizer on a GPU, and generation.

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kv::{DiskStore, DocKey, DocKv, SharedStore};
pub use crate::link::CacheSource;
use crate::link::{self, DocCache, DocPool, DocTiers, LinkConfig, Mode, PromptPlan, Timings};
use crate::model::llama::{Batch, KvCache, Llama, Logits};
use crate::model::{ModelConfig, Tokenizer, WeightSource};
use crate::sampling::{Sampler, SamplingParams};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use web_time::Instant;

/// Default context window when the model allows more (KV memory grows with it).
pub const DEFAULT_CONTEXT: usize = 4096;
/// Prefill processes at most this many tokens per forward call (bounds activation memory).
pub const PREFILL_CHUNK: usize = 512;

/// A loaded model with its tokenizer on a GPU: plans requests, gets their documents'
/// caches from the tiers ([`DocTiers`]), has `link` assemble and prefill them, and
/// decodes. A thin orchestrator: the scheduler is in [`crate::link`], the caches in
/// [`DocTiers`], the arithmetic in [`Llama`].
pub struct Engine {
    model: Llama,
    tokenizer: Tokenizer,
    /// Tokens of context (KV cache capacity) per sequence.
    context: usize,
    description: String,
    fingerprint: String,
    /// Link tokens and markers (KVLink fine-tuned models); default: none.
    link: LinkConfig,
    /// Fingerprint of the tokenizer (part of every document cache key).
    tokenizer_fingerprint: String,
    /// Document caches: GPU-resident, on disk, shared with other processes.
    tiers: DocTiers,
    /// Attention capture is per engine: one capturing request at a time.
    capture_lock: Mutex<()>,
}

/// Default GPU memory budget for resident document caches.
pub const DEFAULT_DOC_CACHE_BYTES: u64 = 1 << 30;

/// A RAG request: documents (each tokenized and cached on its own) and a question.
#[derive(Clone, Debug)]
pub struct Request {
    pub system: Option<String>,
    /// Earlier turns of a conversation (user and assistant messages, oldest first),
    /// rendered by the chat template between the system message and the question. Their
    /// text is data, like the question's. Ignored with `raw`.
    pub history: Vec<crate::model::ChatMessage>,
    pub documents: Vec<String>,
    pub question: String,
    /// Skip the chat template: prefix = BOS (if the model wants one), tail = question.
    pub raw: bool,
    pub mode: Mode,
}

impl Request {
    pub fn new(documents: Vec<String>, question: impl Into<String>) -> Request {
        Request {
            system: None,
            history: Vec::new(),
            documents,
            question: question.into(),
            raw: false,
            mode: Mode::Kvlink,
        }
    }
}

/// Attention mass per prompt segment while answering (see `Engine::ask_with_attention`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct AttentionCapture {
    pub layers: usize,
    pub heads: usize,
    /// "prefix", "doc 1".., "links", "question", "answer".
    pub groups: Vec<String>,
    /// The generated tokens, one record each.
    pub tokens: Vec<u32>,
    /// `[token][layer][head][group]`; each (token, layer, head) row sums to 1.
    pub mass: Vec<f32>,
}

impl AttentionCapture {
    /// Mass of (token, layer, head, group).
    pub fn at(&self, token: usize, layer: usize, head: usize, group: usize) -> f32 {
        let g = self.groups.len();
        self.mass[((token * self.layers + layer) * self.heads + head) * g + group]
    }
}

/// What `ask` reports besides the streamed tokens.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AskStats {
    pub mode: Mode,
    pub timings: Timings,
    pub generation: GenerateStats,
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
        let link = src.link_config().unwrap_or_default();
        link.validate(cfg.input_vocab(), 1)?;
        let model = Llama::load(gpu, src, progress)?;
        let fingerprint = src.fingerprint();
        let tokenizer_fingerprint = format!(
            "{:016x}",
            crate::kv::fnv1a64(tokenizer.to_hf_json()?.as_bytes())
        );
        let tiers = DocTiers::new(
            &model,
            &fingerprint,
            &tokenizer_fingerprint,
            DEFAULT_DOC_CACHE_BYTES,
        );
        Ok(Engine {
            model,
            context,
            description: src.describe(),
            fingerprint,
            link,
            tokenizer_fingerprint,
            tokenizer,
            tiers,
            capture_lock: Mutex::new(()),
        })
    }

    /// The model on the GPU.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Tokens of context (KV cache capacity) per sequence.
    pub fn context(&self) -> usize {
        self.context
    }

    /// What was loaded (model file, adapter), for reports.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The model's fingerprint (weights and adapter; part of every document cache key).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The tokenizer's fingerprint (part of every document cache key).
    pub fn tokenizer_fingerprint(&self) -> &str {
        &self.tokenizer_fingerprint
    }

    /// Link tokens and markers (from a KVLink adapter's `kvlink.json`; default: none).
    pub fn link(&self) -> &LinkConfig {
        &self.link
    }

    /// Use other link tokens and markers (checked against the model's vocabulary).
    pub fn set_link(&mut self, link: LinkConfig) -> Result<()> {
        link.validate(self.model.cfg.input_vocab(), 1)?;
        self.link = link;
        Ok(())
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        self.model.gpu()
    }

    /// Tokenize a prompt: with `raw`, the text as is, control-token text included (plus
    /// BOS where the model wants one); otherwise wrapped in the model's chat template as
    /// one user turn, the text (and `system`) as data: control-token text in them stays
    /// text ([`crate::model::Tokenizer::encode_chat`]).
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
        // The template already contains any BOS text it wants.
        self.tokenizer
            .encode_chat(&self.tokenizer.render_chat(&msgs, true)?)
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
        let (cache, logits, tok) = self.prefill(ids, !greedy, greedy)?;
        let first = match tok {
            Some(t) => t,
            None => sampler.sample(&logits)?,
        };
        stats.ttft = t0.elapsed();
        self.decode_loop(
            cache,
            ids.len(),
            first,
            &mut sampler,
            params,
            &mut stats,
            &mut on_token,
        )?;
        Ok(stats)
    }

    /// Emit `first`, then decode until a stop condition. `pos` is the first free slot.
    #[allow(clippy::too_many_arguments)]
    fn decode_loop(
        &self,
        mut cache: KvCache,
        mut pos: usize,
        first: u32,
        sampler: &mut Sampler,
        params: &GenerateParams,
        stats: &mut GenerateStats,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<()> {
        let greedy = sampler.params().is_greedy();
        let t1 = Instant::now();
        if greedy && !self.model.capturing() && !cfg!(target_arch = "wasm32") {
            return self.decode_pipelined(cache, pos, first, params, stats, on_token, t1);
        }
        let mut next = first;
        loop {
            if let Some(reason) = self.emit(next, params, stats, on_token) {
                stats.stop = reason;
                break;
            }
            if pos >= cache.capacity {
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
        Ok(())
    }

    /// Count `next` and hand it to `on_token`; the reason to stop after it, if a rule that
    /// does not depend on the cache says so ("callback", "eos", "max_tokens").
    fn emit(
        &self,
        next: u32,
        params: &GenerateParams,
        stats: &mut GenerateStats,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Option<&'static str> {
        stats.generated_tokens += 1;
        let eos = params.stop_at_eos && self.tokenizer.is_stop(next);
        if !on_token(next) {
            return Some("callback");
        }
        if eos {
            return Some("eos");
        }
        (stats.generated_tokens >= params.max_tokens).then_some("max_tokens")
    }

    /// [`Engine::decode_loop`] for greedy decoding: each step takes the previous step's
    /// token on the GPU ([`Llama::decode_async`]), so step n + 1 is queued before token n
    /// is read back and the host's recording and readback overlap the GPU's work. The
    /// same tokens and stop rules as the plain loop; at most one step past a stop runs.
    #[allow(clippy::too_many_arguments)]
    fn decode_pipelined(
        &self,
        mut cache: KvCache,
        pos0: usize,
        first: u32,
        params: &GenerateParams,
        stats: &mut GenerateStats,
        on_token: &mut dyn FnMut(u32) -> bool,
        t1: Instant,
    ) -> Result<()> {
        let mut pipe = self.model.decode_pipe()?;
        // Tokens 1.. (the first is `first`), while under max_tokens and in the cache.
        let steps = (params.max_tokens.saturating_sub(1)).min(cache.capacity.saturating_sub(pos0));
        let mut stop = self.emit(first, params, stats, on_token);
        if stop.is_none() {
            self.model
                .decode_greedy(&mut pipe, &mut cache, pos0, first, steps, &mut |t| {
                    stop = self.emit(t, params, stats, on_token);
                    stop.is_none()
                })?;
        }
        stats.stop = stop.unwrap_or("context");
        stats.decode = t1.elapsed();
        Ok(())
    }
}

/// How [`Engine::start_request`] prefills a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartOptions {
    /// Cache slots beyond the prompt, for the tokens to decode (capped by the context).
    pub extra: usize,
    /// Read back the last row's logits (to sample the first token, or to inspect them).
    pub logits: bool,
    /// Take the last row's argmax on the GPU (the greedy first token).
    pub greedy: bool,
}

impl StartOptions {
    /// For generating up to `max_tokens`: the greedy first token from the GPU, else the
    /// logits to sample it from.
    pub fn generate(max_tokens: usize, greedy: bool) -> StartOptions {
        StartOptions {
            extra: max_tokens,
            logits: !greedy,
            greedy,
        }
    }

    /// Only the next-token logits (no room to decode).
    pub fn logits() -> StartOptions {
        StartOptions {
            logits: true,
            ..Default::default()
        }
    }
}

/// A request prefilled up to its first token.
pub struct Started {
    pub plan: PromptPlan,
    /// Its KV cache: the prompt's slots filled, [`StartOptions::extra`] more free.
    pub cache: KvCache,
    /// The last row's logits and/or greedy token.
    pub out: crate::model::llama::ForwardOut,
    /// The TTFT breakdown so far.
    pub timings: Timings,
}

/// (prefix, documents, tail) token ids of a request.
pub type TokenizedRequest = (Vec<u32>, Vec<Vec<u32>>, Vec<u32>);

/// Marks where the documents go when the chat template is rendered.
const DOCS_SENTINEL: &str = "\u{1}KVLINK-DOCUMENTS\u{1}";

/// Tokenize a request into (prefix, documents, tail). The prefix and tail come from
/// the chat template rendered around the last user turn "<documents><question>" (the
/// prefix holds the system message and any earlier turns, [`Request::history`]); each
/// document is tokenized on its own (no special tokens added). Documents, the question
/// and the system message are data: control-token text in them (`<|im_start|>`, ...) is
/// encoded as text, so a document cannot open a turn of its own
/// ([`crate::model::Tokenizer::encode_data`]); only the template inserts control tokens.
/// Inference and `kvlink train-data` both lay prompts out through this function.
pub fn tokenize_request(tokenizer: &Tokenizer, req: &Request) -> Result<TokenizedRequest> {
    if req.question.trim().is_empty() {
        return Err(Error::Input("the question is empty".into()));
    }
    let docs = req
        .documents
        .iter()
        .enumerate()
        .map(|(j, d)| {
            if d.trim().is_empty() {
                return Err(Error::Input(format!("document {} is empty", j + 1)));
            }
            tokenizer.encode_data(d)
        })
        .collect::<Result<Vec<_>>>()?;
    if req.raw {
        let prefix = tokenizer.encode("", true)?;
        return Ok((prefix, docs, tokenizer.encode_data(&req.question)?));
    }
    let mut msgs = Vec::new();
    if let Some(s) = &req.system {
        msgs.push(crate::model::ChatMessage::new("system", s.as_str()));
    }
    msgs.extend(req.history.iter().cloned());
    let user = msgs.len();
    msgs.push(crate::model::ChatMessage::new(
        "user",
        req.question.as_str(),
    ));
    // The documents go where the user's message begins.
    let chat = tokenizer.render_chat(&msgs, true)?;
    if let Some((head, rest)) = chat.split_at_message(user) {
        return Ok((
            tokenizer.encode_chat(&head)?,
            docs,
            tokenizer.encode_chat(&rest)?,
        ));
    }
    // A template that rewrites message text (render_chat has checked that no message
    // holds control-token text): a marker at the start of the user's message.
    msgs[user].content = format!("{DOCS_SENTINEL}{}", req.question);
    let text = tokenizer.apply_chat_template(&msgs, true)?;
    let (head, rest) = text
        .split_once(DOCS_SENTINEL)
        .ok_or_else(|| Error::Template("the chat template dropped the user message".into()))?;
    Ok((
        tokenizer.encode(head, false)?,
        docs,
        tokenizer.encode(rest, false)?,
    ))
}

impl Engine {
    /// Tokenize a request into (prefix, documents, tail): see [`tokenize_request`].
    pub fn tokenize_request(&self, req: &Request) -> Result<TokenizedRequest> {
        tokenize_request(&self.tokenizer, req)
    }

    /// The prompt plan of a request (KVLINK.md §1), checked against the context.
    pub fn plan(&self, req: &Request) -> Result<PromptPlan> {
        let (prefix, docs, tail) = self.tokenize_request(req)?;
        self.link
            .validate(self.config().input_vocab(), docs.len())?;
        for (j, d) in docs.iter().enumerate() {
            if d.len() >= self.context {
                return Err(Error::Input(format!(
                    "document {} is {} tokens, longer than the context ({})",
                    j + 1,
                    d.len(),
                    self.context
                )));
            }
        }
        let refs: Vec<&[u32]> = docs.iter().map(|d| d.as_slice()).collect();
        let plan = PromptPlan::build(&prefix, &refs, &tail, &self.link)?;
        if plan.len() >= self.context {
            return Err(Error::Input(format!(
                "the prompt is {} tokens ({} documents) but the context holds {} (use --ctx to \
                 raise it, or fewer documents)",
                plan.len(),
                docs.len(),
                self.context
            )));
        }
        Ok(plan)
    }

    /// Encode a document alone (positions 0..n-1) and keep its cache on the GPU.
    pub fn precompute(&self, doc_tokens: &[u32]) -> Result<Arc<DocCache>> {
        Ok(self.precompute_from(doc_tokens)?.0)
    }

    /// [`Engine::precompute`], and where the cache came from.
    pub fn precompute_from(&self, doc_tokens: &[u32]) -> Result<(Arc<DocCache>, CacheSource)> {
        let (mut c, s) = self.doc_caches(&[doc_tokens])?;
        Ok((c.remove(0), s[0]))
    }

    /// Share document caches with other processes through `shared` (None: not), looked
    /// up after the GPU and the disk store; see [`crate::kv::shared`].
    pub fn set_shared_store(&self, shared: Option<Arc<dyn SharedStore>>) {
        self.tiers.set_shared(shared);
    }

    pub fn shared_store(&self) -> Option<Arc<dyn SharedStore>> {
        self.tiers.shared()
    }

    /// Keep document caches on disk in `store` (None: GPU memory only).
    pub fn set_store(&self, store: Option<DiskStore>) {
        self.tiers.set_store(store);
    }

    pub fn store(&self) -> Option<DiskStore> {
        self.tiers.store()
    }

    /// How document caches are written to the disk and shared stores: f16 as computed
    /// (the default) or q8 (about half the bytes to read and upload on a hit, within
    /// half a quantization step of the f16 values; see [`crate::kv::quant`]). Entries of
    /// either format are read.
    pub fn set_store_format(&self, format: crate::kv::KvFormat) {
        self.tiers.set_format(format);
    }

    pub fn store_format(&self) -> crate::kv::KvFormat {
        self.tiers.format()
    }

    /// GPU memory budget for resident document caches (evicts beyond it).
    pub fn set_doc_cache_budget(&self, bytes: u64) {
        self.tiers.set_budget(bytes);
    }

    pub fn doc_cache_budget(&self) -> u64 {
        self.tiers.budget()
    }

    /// Bytes of document caches resident on the GPU now.
    pub fn doc_cache_bytes(&self) -> u64 {
        self.tiers.resident_bytes()
    }

    /// The GPU memory pool the resident document caches live in.
    pub fn doc_pool(&self) -> &DocPool {
        self.tiers.pool()
    }

    /// The document-cache tiers (GPU, disk store, shared store) and their lookup path.
    pub fn doc_tiers(&self) -> &DocTiers {
        &self.tiers
    }

    /// Drop a document's cache from the GPU, the disk store and the shared tier (those
    /// configured). Returns whether any held it.
    pub fn forget_doc(&self, key: &DocKey) -> Result<bool> {
        self.tiers.forget(key)
    }

    /// Whether a document's cache is resident on the GPU now.
    pub fn doc_resident(&self, key: &DocKey) -> bool {
        self.tiers.resident(key)
    }

    /// The cache key of a document's token ids under this model and tokenizer.
    pub fn doc_key(&self, tokens: &[u32]) -> DocKey {
        self.tiers.key(tokens)
    }

    /// Make a document cache read from another store (the browser's) resident on the
    /// GPU, as a disk-store hit would.
    pub fn insert_doc(&self, tokens: &[u32], kv: &DocKv) -> Result<Arc<DocCache>> {
        self.tiers.insert(tokens, kv)
    }

    /// Make `kv` resident under `key` whatever the key says (tests: a hash collision or a
    /// stale key, which [`Engine::doc_caches`] must refuse to serve).
    #[doc(hidden)]
    pub fn insert_doc_with_key(&self, key: DocKey, tokens: &[u32], kv: &DocKv) -> Result<()> {
        self.tiers.insert_with_key(key, tokens, kv)
    }

    /// Caches for documents, from the first tier that has each (see [`DocTiers::lookup`]);
    /// the missing ones are encoded. Returns, per document, where each came from.
    pub fn doc_caches(&self, docs: &[&[u32]]) -> Result<(Vec<Arc<DocCache>>, Vec<CacheSource>)> {
        self.tiers.lookup(&self.model, docs, PREFILL_CHUNK)
    }

    /// Forget all GPU-resident document caches.
    pub fn clear_doc_caches(&self) {
        self.tiers.clear();
    }

    /// Plan, fetch caches and prefill a request up to its first token.
    pub fn start_request(&self, req: &Request, o: StartOptions) -> Result<Started> {
        let t0 = Instant::now();
        let plan = self.plan(req)?;
        // A conversation's head (earlier turns) is new for nearly every request: it is
        // prefilled, not cached like a document.
        let cache_prefix = req.history.is_empty();
        self.start_plan_with(plan, req.mode, t0, o, cache_prefix)
    }

    /// Like `start_request` for an already built plan; `t0` is when the request began.
    pub fn start_plan(
        &self,
        plan: PromptPlan,
        mode: Mode,
        t0: Instant,
        o: StartOptions,
    ) -> Result<Started> {
        self.start_plan_with(plan, mode, t0, o, true)
    }

    /// [`Engine::start_plan`]; `cache_prefix`: the prefix's KV is looked up and kept like
    /// a document's (else prefilled with the rest).
    fn start_plan_with(
        &self,
        plan: PromptPlan,
        mode: Mode,
        t0: Instant,
        o: StartOptions,
        cache_prefix: bool,
    ) -> Result<Started> {
        let mut tm = Timings {
            prompt_tokens: plan.len(),
            ..Default::default()
        };
        let reuse = matches!(mode, Mode::Kvlink | Mode::Naive);
        let mut prefix = None;
        let caches = if reuse {
            let mut docs: Vec<&[u32]> = (0..plan.docs.len()).map(|j| plan.doc_tokens(j)).collect();
            // The prefix (system prompt + user header) is cached like a document.
            let with_prefix = cache_prefix && plan.prefix_len > 0;
            if with_prefix {
                docs.insert(0, &plan.tokens[..plan.prefix_len]);
            }
            let found = self.tiers.lookup_timed(&self.model, &docs, PREFILL_CHUNK)?;
            tm.disk_reads = found.disk;
            let (mut c, mut from) = (found.caches, found.sources);
            if with_prefix {
                tm.prefix_cached = from.remove(0) != CacheSource::Computed;
                prefix = Some(c.remove(0));
            }
            for (span, f) in plan.docs.iter().zip(&from) {
                if *f != CacheSource::Computed {
                    tm.cached_docs += 1;
                    tm.cached_doc_tokens += span.len;
                    if *f == CacheSource::Disk {
                        tm.disk_docs += 1;
                    }
                    if *f == CacheSource::Shared {
                        tm.shared_docs += 1;
                    }
                } else {
                    tm.computed_docs += 1;
                    tm.computed_doc_tokens += span.len;
                }
            }
            c
        } else {
            Vec::new()
        };
        // No wait for the GPU here: the copies of disk hits (and the encoding of missing
        // documents) run while the assembly and the prefill are recorded, and the queue
        // keeps them in order; so `lookup` is host time, and GPU work it queued lands in
        // the later phases.
        tm.lookup = t0.elapsed();
        let refs: Vec<&DocCache> = caches.iter().map(|c| c.as_ref()).collect();
        let extra = o.extra.min(self.context.saturating_sub(plan.len()));
        let t1 = Instant::now();
        let (cache, out, assemble, computed) = link::assemble_and_prefill(
            &self.model,
            &plan,
            prefix.as_deref(),
            &refs,
            mode,
            extra,
            PREFILL_CHUNK,
            if o.logits { Logits::Last } else { Logits::None },
            o.greedy,
        )?;
        tm.assemble = assemble;
        tm.prefill = t1.elapsed().saturating_sub(assemble);
        tm.prefill_tokens = computed;
        tm.ttft = t0.elapsed();
        Ok(Started {
            plan,
            cache,
            out,
            timings: tm,
        })
    }

    /// Next-token logits of a request's prompt, with its plan.
    pub fn request_logits(&self, req: &Request) -> Result<(PromptPlan, Vec<f32>, Timings)> {
        let s = self.start_request(req, StartOptions::logits())?;
        Ok((s.plan, s.out.logits, s.timings))
    }

    /// Like [`Engine::ask`], and also capture, for every generated token, the attention
    /// mass each prompt segment receives per layer and head (computed on the GPU; costs
    /// one extra small kernel per layer and step, only here).
    pub fn ask_with_attention(
        &self,
        req: &Request,
        params: &GenerateParams,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<(AskStats, AttentionCapture)> {
        let _exclusive = self.capture_lock.lock().unwrap_or_else(|e| e.into_inner());
        let plan = self.plan(req)?;
        let (groups, names) = plan.groups();
        let c = self.config();
        let cap = Arc::new(crate::model::llama::MassCapture::new(
            self.gpu(),
            c,
            &groups,
            (plan.len() + params.max_tokens + 1).min(self.context),
            names.len(),
        )?);
        self.model.set_capture(Some(cap.clone()));
        let mut tokens = Vec::new();
        let r = self.ask(req, params, |t| {
            tokens.push(t);
            on_token(t)
        });
        self.model.set_capture(None);
        let stats = r?;
        let records = std::mem::take(&mut *cap.records.lock().unwrap_or_else(|e| e.into_inner()));
        let n = tokens.len().min(records.len());
        tokens.truncate(n);
        Ok((
            stats,
            AttentionCapture {
                layers: c.num_hidden_layers,
                heads: c.num_attention_heads,
                groups: names,
                tokens,
                mass: records[..n].concat(),
            },
        ))
    }

    /// Answer a request, streaming tokens to `on_token` (false stops early).
    pub fn ask(
        &self,
        req: &Request,
        params: &GenerateParams,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<AskStats> {
        let mut sampler = Sampler::new(params.sampling.clone())?;
        let greedy = sampler.params().is_greedy();
        let Started {
            plan,
            cache,
            out,
            timings: mut tm,
        } = self.start_request(req, StartOptions::generate(params.max_tokens, greedy))?;
        let first = match out.token {
            Some(t) => t,
            None => sampler.sample(&out.logits)?,
        };
        tm.ttft = tm.ttft.max(tm.lookup + tm.assemble + tm.prefill);
        let mut stats = GenerateStats {
            prompt_tokens: plan.len(),
            ttft: tm.ttft,
            stop: "max_tokens",
            ..Default::default()
        };
        if params.max_tokens > 0 {
            self.decode_loop(
                cache,
                plan.len(),
                first,
                &mut sampler,
                params,
                &mut stats,
                &mut on_token,
            )?;
        }
        Ok(AskStats {
            mode: req.mode,
            timings: tm,
            generation: stats,
        })
    }
}
