//! The JS surface of the browser build. `examples/web/kvlink.js` wraps it into the
//! documented API (`init`, `loadModel`, `addDocument`, `ask`).
//!
//! Everything the engine does synchronously (tokenize, plan, record and submit GPU work)
//! runs as on native; only the waits for GPU results are awaited (see [`super::readback`]).

use super::readback::{self, deferred, words_to_f32};
use crate::engine::{CacheSource, Engine, StartOptions};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu};
use crate::link::Mode;
use crate::model::llama::{Batch, KvCache, Logits};
use crate::model::{GgufModel, LoraAdapter, LoraModel, WeightSource};
use crate::sampling::{Sampler, SamplingParams};
use crate::Request;
use serde::Deserialize;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use wasm_bindgen::prelude::*;
use web_time::Instant;

fn js_err(e: Error) -> JsError {
    JsError::new(&e.to_string())
}

fn to_js(v: &serde_json::Value) -> JsValue {
    js_sys::JSON::parse(&v.to_string()).unwrap_or(JsValue::NULL)
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct State {
    gpu: Arc<Gpu>,
    engine: Option<Rc<Engine>>,
    /// Documents added so far (their caches are computed when added).
    docs: Vec<String>,
    store: Option<super::store::OpfsStore>,
    /// How new document caches are written to the store.
    format: crate::kv::KvFormat,
}

/// An engine on the browser's WebGPU adapter.
#[wasm_bindgen]
pub struct Kvlink {
    st: Rc<RefCell<State>>,
}

/// Options of [`Kvlink::start`] (all optional, JS camelCase).
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct AskOptions {
    mode: Option<String>,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    seed: Option<u64>,
    system: Option<String>,
    raw: bool,
    stop_at_eos: Option<bool>,
}

/// A LoRA adapter's files as JS hands them over (see [`Kvlink::load_model_with_lora`]).
struct LoraFiles {
    name: String,
    config: String,
    weights: Vec<u8>,
    link: Option<String>,
}

impl Kvlink {
    /// Load a GGUF model (with a LoRA adapter merged in, if given) and make it current.
    fn load(
        &self,
        bytes: Vec<u8>,
        name: String,
        context: usize,
        lora: Option<LoraFiles>,
    ) -> Result<JsValue> {
        let t0 = Instant::now();
        let gpu = self.st.borrow().gpu.clone();
        let file = crate::model::gguf::GgufFile::from_bytes(name, bytes)?;
        let mut src: Box<dyn WeightSource> = Box::new(GgufModel::from_file(file)?);
        if let Some(l) = lora {
            let adapter = LoraAdapter::from_bytes(
                std::path::Path::new(&l.name),
                l.config.as_bytes(),
                &l.weights,
                l.link.as_deref().map(str::as_bytes),
            )?;
            src = Box::new(LoraModel::new(src, adapter)?);
        }
        let engine = Engine::load(gpu, src.as_ref(), context, &mut |_, _| {})?;
        let c = engine.config();
        let info = serde_json::json!({
            "description": engine.description(),
            "fingerprint": engine.fingerprint(),
            "layers": c.num_hidden_layers,
            "hidden": c.hidden_size,
            "vocab": c.vocab_size,
            "extra_vocab": c.extra_vocab,
            "link": engine.link(),
            "context": engine.context(),
            "weight_bytes": engine.model().weight_bytes(),
            "load_ms": ms(t0.elapsed()),
        });
        let mut st = self.st.borrow_mut();
        st.engine = Some(Rc::new(engine));
        st.docs.clear();
        Ok(to_js(&info))
    }

    fn engine(&self) -> Result<Rc<Engine>> {
        self.st
            .borrow()
            .engine
            .clone()
            .ok_or_else(|| Error::Input("no model loaded: call loadModel first".into()))
    }
}

#[wasm_bindgen]
impl Kvlink {
    /// Open the WebGPU adapter.
    pub async fn create() -> std::result::Result<Kvlink, JsError> {
        console_hook();
        let gpu = super::open_gpu().await.map_err(js_err)?;
        Ok(Kvlink {
            st: Rc::new(RefCell::new(State {
                gpu,
                engine: None,
                docs: Vec::new(),
                store: None,
                format: crate::kv::KvFormat::F16,
            })),
        })
    }

    /// The adapter: name, backend, features and limits (as `kvlink devices` prints).
    #[wasm_bindgen(js_name = adapterInfo)]
    pub fn adapter_info(&self) -> JsValue {
        let st = self.st.borrow();
        let mut v = serde_json::to_value(&st.gpu.report).unwrap_or_default();
        v["serial_kernels"] = st.gpu.prefers_serial_kernels().into();
        to_js(&v)
    }

    /// Load a GGUF model from its bytes (`name` is only used in messages). `context` 0
    /// means the default (min(model maximum, 4096)). Returns the model's description.
    #[wasm_bindgen(js_name = loadModel)]
    pub fn load_model(
        &self,
        bytes: Vec<u8>,
        name: String,
        context: usize,
    ) -> std::result::Result<JsValue, JsError> {
        self.load(bytes, name, context, None).map_err(js_err)
    }

    /// Like `loadModel`, with a LoRA adapter merged into the weights: the text of its
    /// `adapter_config.json`, the bytes of `adapter_model.safetensors` and the text of
    /// its `kvlink.json` (or undefined); `lora_name` is only used in messages. The
    /// adapter's kvlink.json sets the link tokens.
    #[wasm_bindgen(js_name = loadModelWithLora)]
    #[allow(clippy::too_many_arguments)]
    pub fn load_model_with_lora(
        &self,
        bytes: Vec<u8>,
        name: String,
        context: usize,
        lora_name: String,
        lora_config: String,
        lora_weights: Vec<u8>,
        lora_link: Option<String>,
    ) -> std::result::Result<JsValue, JsError> {
        let lora = LoraFiles {
            name: lora_name,
            config: lora_config,
            weights: lora_weights,
            link: lora_link,
        };
        self.load(bytes, name, context, Some(lora)).map_err(js_err)
    }

    /// Keep document caches in the browser's origin-private file system (same keys,
    /// checksums and format as the native disk store). Resolves to whether it is on.
    #[wasm_bindgen(js_name = useStore)]
    pub async fn use_store(&self, enable: bool) -> std::result::Result<bool, JsError> {
        let store = if enable {
            Some(super::store::OpfsStore::open().await.map_err(js_err)?)
        } else {
            None
        };
        let on = store.is_some();
        self.st.borrow_mut().store = store;
        Ok(on)
    }

    /// How new document caches are written to the store: "f16" (as computed, the
    /// default) or "q8" (8-bit with a scale per 32 values: 53% of the storage, each
    /// value within half a quantization step). Entries of either format are read.
    #[wasm_bindgen(js_name = setStoreFormat)]
    pub fn set_store_format(&self, format: &str) -> std::result::Result<(), JsError> {
        self.st.borrow_mut().format = format.parse().map_err(js_err)?;
        Ok(())
    }

    /// Add a document: tokenize it and compute (or load from the store) its KV cache
    /// now. Resolves to `{index, tokens, source, ms}`.
    #[wasm_bindgen(js_name = addDocument)]
    pub async fn add_document(&self, text: String) -> std::result::Result<JsValue, JsError> {
        let engine = self.engine().map_err(js_err)?;
        let (store, format) = {
            let st = self.st.borrow();
            (st.store.clone(), st.format)
        };
        let t0 = Instant::now();
        if text.trim().is_empty() {
            return Err(js_err(Error::Input("the document is empty".into())));
        }
        let tokens = engine.tokenizer().encode_data(&text).map_err(js_err)?;
        let source = super::store::doc_cache(&engine, store.as_ref(), format, &tokens)
            .await
            .map_err(js_err)?;
        // Report the time the GPU took, not just the time to submit the encoding.
        readback::gpu_idle(engine.gpu()).await.map_err(js_err)?;
        let mut st = self.st.borrow_mut();
        st.docs.push(text);
        Ok(to_js(&serde_json::json!({
            "index": st.docs.len() - 1,
            "tokens": tokens.len(),
            "source": source,
            "ms": ms(t0.elapsed()),
        })))
    }

    /// Forget the added documents (their caches stay resident for reuse).
    #[wasm_bindgen(js_name = clearDocuments)]
    pub fn clear_documents(&self) {
        self.st.borrow_mut().docs.clear();
    }

    /// Number of added documents.
    #[wasm_bindgen(js_name = documentCount)]
    pub fn document_count(&self) -> usize {
        self.st.borrow().docs.len()
    }

    /// Start answering `question` over the added documents. `options` (JSON object,
    /// all optional): mode ("kvlink" | "full" | "naive" | "masked"), maxTokens,
    /// temperature, topK, topP, seed, system, raw, stopAtEos. Resolves once the first
    /// token is known (TTFT).
    pub async fn start(
        &self,
        question: String,
        options: JsValue,
    ) -> std::result::Result<AskStream, JsError> {
        let engine = self.engine().map_err(js_err)?;
        let opts: AskOptions = if options.is_undefined() || options.is_null() {
            AskOptions::default()
        } else {
            let s = js_sys::JSON::stringify(&options)
                .map(String::from)
                .unwrap_or_default();
            serde_json::from_str(&s)
                .map_err(|e| js_err(Error::Input(format!("bad options: {e}"))))?
        };
        let docs = self.st.borrow().docs.clone();
        AskStream::start(engine, docs, question, opts)
            .await
            .map_err(js_err)
    }

    /// Next-token log-probabilities after `prompt` (what `kvlink logits --json` prints):
    /// `{tokens, top: [{id, token, logprob}]}`.
    pub async fn logits(
        &self,
        prompt: String,
        raw: bool,
        top: usize,
    ) -> std::result::Result<JsValue, JsError> {
        let engine = self.engine().map_err(js_err)?;
        let ids = engine.encode_prompt(&prompt, None, raw).map_err(js_err)?;
        let vocab = engine.config().vocab_size;
        let (_, reads) = deferred(|| engine.next_logits(&ids))
            .await
            .map_err(js_err)?;
        let words = reads
            .last()
            .ok_or_else(|| js_err(Error::Gpu("no logits were read".into())))?;
        let lg = words_to_f32(words, DType::F32, vocab);
        let tops =
            crate::sampling::top_logprobs_json(|i| engine.tokenizer().token_piece(i), &lg, top);
        Ok(to_js(&serde_json::json!({ "tokens": ids, "top": tops })))
    }
}

/// One answer being generated: call `next()` until it resolves to `undefined`.
#[wasm_bindgen]
pub struct AskStream {
    s: Rc<RefCell<StreamState>>,
}

struct StreamState {
    engine: Rc<Engine>,
    /// None only while a decode step is on the GPU.
    cache: Option<KvCache>,
    sampler: Sampler,
    /// The token to emit next (computed, not yet returned).
    next: Option<u32>,
    /// First free cache slot.
    pos: usize,
    max_tokens: usize,
    stop_at_eos: bool,
    generated: Vec<u32>,
    /// Text emitted so far (decoded from `generated`).
    text: String,
    t0: Instant,
    ttft_ms: f64,
    first_emit_ms: Option<f64>,
    stats: serde_json::Value,
    stop: &'static str,
}

impl AskStream {
    async fn start(
        engine: Rc<Engine>,
        docs: Vec<String>,
        question: String,
        o: AskOptions,
    ) -> Result<AskStream> {
        let t0 = Instant::now();
        let mode: Mode = o.mode.as_deref().unwrap_or("kvlink").parse()?;
        let mut sp = SamplingParams::greedy();
        if let Some(t) = o.temperature {
            sp.temperature = t;
        }
        if let Some(k) = o.top_k {
            sp.top_k = k;
        }
        if let Some(p) = o.top_p {
            sp.top_p = p;
        }
        if let Some(s) = o.seed {
            sp.seed = s;
        }
        let mut sampler = Sampler::new(sp)?;
        let greedy = sampler.params().is_greedy();
        let max_tokens = o.max_tokens.unwrap_or(128);
        let req = Request {
            system: o.system,
            history: Vec::new(),
            documents: docs,
            question,
            raw: o.raw,
            mode,
        };
        let plan = engine.plan(&req)?;
        let start = StartOptions::generate(max_tokens, greedy);
        let (started, reads) = deferred(|| engine.start_plan(plan, mode, t0, start)).await?;
        let (plan, cache, tm) = (started.plan, started.cache, started.timings);
        let first = next_token(&engine, &mut sampler, greedy, &reads)?;
        let ttft = t0.elapsed();
        let stats = serde_json::json!({
            "mode": mode.to_string(),
            "ttft_ms": ms(ttft),
            "prompt_tokens": plan.len(),
            "prefill_tokens": tm.prefill_tokens,
            "cached_docs": tm.cached_docs,
            "computed_docs": tm.computed_docs,
            "cached_doc_tokens": tm.cached_doc_tokens,
            "prefix_cached": tm.prefix_cached,
            // CPU time to record and submit the work (the GPU runs asynchronously).
            "submit_ms": { "lookup": ms(tm.lookup), "assemble": ms(tm.assemble), "prefill": ms(tm.prefill) },
        });
        Ok(AskStream {
            s: Rc::new(RefCell::new(StreamState {
                engine,
                pos: plan.len(),
                cache: Some(cache),
                sampler,
                next: (max_tokens > 0).then_some(first),
                max_tokens,
                stop_at_eos: o.stop_at_eos.unwrap_or(true),
                generated: Vec::new(),
                text: String::new(),
                t0,
                ttft_ms: ms(ttft),
                first_emit_ms: None,
                stats,
                stop: "max_tokens",
            })),
        })
    }
}

/// The token from a deferred forward's reads: the GPU argmax, or sampled from logits.
fn next_token(
    engine: &Engine,
    sampler: &mut Sampler,
    greedy: bool,
    reads: &[Vec<u32>],
) -> Result<u32> {
    let w = reads
        .last()
        .ok_or_else(|| Error::Gpu("the forward pass read nothing back".into()))?;
    let vocab = engine.config().vocab_size;
    if greedy {
        let id = *w.first().unwrap_or(&u32::MAX);
        if id as usize >= vocab {
            return Err(Error::Gpu(
                "the model produced non-finite logits (NaN); the adapter's arithmetic is broken"
                    .into(),
            ));
        }
        Ok(id)
    } else {
        sampler.sample(&words_to_f32(w, DType::F32, vocab))
    }
}

#[wasm_bindgen]
impl AskStream {
    /// Time to first token in milliseconds (request start to the first token's id read
    /// back from the GPU).
    #[wasm_bindgen(getter, js_name = ttftMs)]
    pub fn ttft_ms(&self) -> f64 {
        self.s.borrow().ttft_ms
    }

    /// The next token `{id, text, index, ms}` (ms since the request started), or
    /// `undefined` when the answer is complete. `text` is the new text this token adds
    /// (may be empty while a multi-byte character is incomplete).
    pub async fn next(&self) -> std::result::Result<JsValue, JsError> {
        let s = self.s.clone();
        step(&s).await.map_err(js_err)
    }

    /// `{mode, ttft_ms, prompt_tokens, prefill_tokens, cached_docs, computed_docs,
    /// generated_tokens, decode_ms, decode_tok_s, stop, text}`.
    pub fn stats(&self) -> JsValue {
        let s = self.s.borrow();
        let mut v = s.stats.clone();
        let n = s.generated.len();
        let t = ms(s.t0.elapsed());
        let decode_ms = s.first_emit_ms.map_or(0.0, |f| (t - f).max(0.0));
        v["generated_tokens"] = n.into();
        v["decode_ms"] = decode_ms.into();
        v["decode_tok_s"] = if n > 1 && decode_ms > 0.0 {
            ((n - 1) as f64 * 1e3 / decode_ms).into()
        } else {
            serde_json::Value::Null
        };
        v["stop"] = s.stop.into();
        v["text"] = s.text.clone().into();
        to_js(&v)
    }
}

async fn step(s: &Rc<RefCell<StreamState>>) -> Result<JsValue> {
    // Emit the pending token, deciding whether generation goes on after it.
    let (tok, more) = {
        let mut st = s.borrow_mut();
        let Some(tok) = st.next.take() else {
            return Ok(JsValue::UNDEFINED);
        };
        st.generated.push(tok);
        let is_stop = st.stop_at_eos && st.engine.tokenizer().is_stop(tok);
        let more = if is_stop {
            st.stop = "eos";
            false
        } else if st.generated.len() >= st.max_tokens {
            false
        } else if st.pos >= st.cache.as_ref().map_or(0, |c| c.capacity) {
            st.stop = "context";
            false
        } else {
            true
        };
        (tok, more)
    };
    let (text, index, at) = {
        let mut st = s.borrow_mut();
        let full = st.engine.tokenizer().decode(&st.generated)?;
        let new = if full.ends_with('\u{FFFD}') {
            String::new()
        } else if let Some(rest) = full.strip_prefix(st.text.as_str()) {
            let r = rest.to_string();
            st.text = full;
            r
        } else {
            st.text = full.clone();
            full
        };
        let at = ms(st.t0.elapsed());
        st.first_emit_ms.get_or_insert(at);
        (new, st.generated.len() - 1, at)
    };
    let out = serde_json::json!({ "id": tok, "text": text, "index": index, "ms": at });
    if more {
        // Decode the next token now, so the caller's next `next()` has it ready. The
        // cache is taken out of the state while the GPU works (no borrow across await).
        let (engine, mut cache, greedy, pos) = {
            let mut st = s.borrow_mut();
            let cache = st.cache.take().expect("cache present while generating");
            let greedy = st.sampler.params().is_greedy();
            (st.engine.clone(), cache, greedy, st.pos)
        };
        let (tokens, positions, slots) = ([tok], [pos as i32], [pos as u32]);
        let r = deferred(|| {
            let batch = Batch {
                tokens: &tokens,
                positions: &positions,
                slots: &slots,
            };
            let lg = if greedy { Logits::None } else { Logits::Last };
            engine.model().forward(&mut cache, &batch, lg, greedy)
        })
        .await;
        let mut st = s.borrow_mut();
        st.cache = Some(cache);
        let (_, reads) = r?;
        let st = &mut *st;
        st.next = Some(next_token(&engine, &mut st.sampler, greedy, &reads)?);
        st.pos += 1;
    }
    Ok(to_js(&out))
}

/// Which source a document's cache came from, as a string for JS.
pub(crate) fn source_name(s: CacheSource) -> &'static str {
    match s {
        CacheSource::Gpu => "gpu",
        CacheSource::Disk => "store",
        CacheSource::Shared => "shared",
        CacheSource::Computed => "computed",
    }
}

fn console_hook() {
    // Panics go to the browser console instead of an opaque "unreachable".
    static SET: std::sync::Once = std::sync::Once::new();
    SET.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            web_sys::console::error_1(&format!("kvlink panicked: {info}").into());
        }));
    });
}
