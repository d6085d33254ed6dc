// kvlink in the browser: a small API over the wasm build (see README, "Browser").
//
//   import { init } from './kvlink.js';
//   const kv = await init();                       // WebGPU adapter + wasm module
//   await kv.loadModel('models/SmolLM2-135M-Instruct.Q4_1.gguf');   // URL, File, Blob or bytes
//   await kv.addDocument('The Eiffel Tower ...');   // cached KV, computed once
//   const run = kv.ask('When was it completed?', { mode: 'kvlink', maxTokens: 64 });
//   for await (const t of run) out.textContent += t.text;   // {id, text, index, ms, ttftMs}
//   run.stats();                                    // {ttft_ms, decode_tok_s, ...}
import wasmInit, { Kvlink } from './pkg/kvlink.js';

/** Load the wasm module and open the browser's WebGPU adapter. */
export async function init(options = {}) {
  if (!navigator.gpu) {
    throw new Error('this browser has no WebGPU (in Chromium on Linux start it with --enable-unsafe-webgpu)');
  }
  await wasmInit(options.wasmUrl ? { module_or_path: options.wasmUrl } : undefined);
  return new KvlinkEngine(await Kvlink.create());
}

async function toBytes(source, onProgress) {
  if (source instanceof Uint8Array) return source;
  if (source instanceof ArrayBuffer) return new Uint8Array(source);
  if (source instanceof Blob) return new Uint8Array(await source.arrayBuffer());
  const resp = await fetch(source);
  if (!resp.ok) throw new Error(`cannot fetch ${source}: HTTP ${resp.status}`);
  const total = Number(resp.headers.get('content-length')) || 0;
  if (!resp.body || !onProgress) return new Uint8Array(await resp.arrayBuffer());
  const reader = resp.body.getReader();
  const parts = [];
  let got = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    got += value.length;
    onProgress(got, total);
  }
  const bytes = new Uint8Array(got);
  let o = 0;
  for (const p of parts) { bytes.set(p, o); o += p.length; }
  return bytes;
}

async function toText(source) {
  if (typeof source === 'string' && source.trimStart().startsWith('{')) return source;  // JSON itself
  return new TextDecoder().decode(await toBytes(source));
}

/**
 * A LoRA adapter's three files: a folder URL ('adapters/kvlink5/': its
 * adapter_config.json, adapter_model.safetensors and, if present, kvlink.json), the
 * Files of a picked folder (FileList or array, matched by name), or
 * {config, weights, link?} with each a URL, File/Blob or bytes (config/link also JSON text).
 */
async function loraFiles(lora) {
  if (typeof lora === 'string') {
    const base = lora.endsWith('/') ? lora : lora + '/';
    const link = await fetch(base + 'kvlink.json');
    return {
      name: base,
      config: await toText(base + 'adapter_config.json'),
      weights: await toBytes(base + 'adapter_model.safetensors'),
      link: link.ok ? await link.text() : undefined,
    };
  }
  if (Array.isArray(lora) || (typeof FileList !== 'undefined' && lora instanceof FileList)) {
    const files = Array.from(lora);
    const pick = (n) => files.find((f) => f.name === n);
    for (const n of ['adapter_config.json', 'adapter_model.safetensors']) {
      if (!pick(n)) throw new Error(`LoRA adapter: ${n} is missing from the chosen files`);
    }
    const dir = (files[0].webkitRelativePath || '').split('/')[0] || 'adapter';
    return {
      name: dir,
      config: await toText(pick('adapter_config.json')),
      weights: await toBytes(pick('adapter_model.safetensors')),
      link: pick('kvlink.json') ? await toText(pick('kvlink.json')) : undefined,
    };
  }
  if (!lora.config || !lora.weights) throw new Error('LoRA adapter: give {config, weights, link?}');
  return {
    name: lora.name || (typeof lora.weights === 'string' ? lora.weights : 'adapter'),
    config: await toText(lora.config),
    weights: await toBytes(lora.weights),
    link: lora.link ? await toText(lora.link) : undefined,
  };
}

export class KvlinkEngine {
  constructor(inner) { this.inner = inner; this.model = null; }

  /** The WebGPU adapter: name, limits, whether shader-f16 exists, kernel family. */
  adapterInfo() { return this.inner.adapterInfo(); }

  /**
   * Load a GGUF model from a same-origin URL, a File/Blob (file picker) or bytes.
   * options: { context (0 = default), onProgress(bytesDone, bytesTotal), lora }, where
   * lora is a LoRA adapter merged into the weights (see loraFiles: a folder URL, the
   * Files of a picked folder, or {config, weights, link?}); its kvlink.json sets the
   * link tokens. Resolves to {description, layers, vocab, extra_vocab, link, context,
   * load_ms, ...}.
   */
  async loadModel(source, options = {}) {
    const bytes = await toBytes(source, options.onProgress);
    const name = typeof source === 'string' ? source : (source.name || 'model.gguf');
    const lora = options.lora ? await loraFiles(options.lora) : null;
    // Let the page repaint before the (synchronous) weight upload.
    await new Promise((r) => setTimeout(r, 0));
    const ctx = options.context || 0;
    this.model = lora
      ? this.inner.loadModelWithLora(bytes, name, ctx, lora.name, lora.config, lora.weights, lora.link)
      : this.inner.loadModel(bytes, name, ctx);
    return this.model;
  }

  /**
   * Keep document caches in the origin-private file system (native store format).
   * options.format: "f16" (default) or "q8" (53% of the storage; see setStoreFormat).
   */
  async useStore(enable = true, options = {}) {
    if (options.format) this.inner.setStoreFormat(options.format);
    return this.inner.useStore(enable);
  }

  /** How new document caches are written to the store: "f16" or "q8". */
  setStoreFormat(format) { this.inner.setStoreFormat(format); }

  /** Add a document; its KV cache is computed (or loaded) now. Resolves to {index, tokens, source, ms}. */
  async addDocument(text) { return this.inner.addDocument(text); }

  clearDocuments() { this.inner.clearDocuments(); }

  get documentCount() { return this.inner.documentCount(); }

  /**
   * Answer `question` over the added documents. Returns an async iterator of tokens
   * {id, text, index, ms, ttftMs} (ms since the request started); `stats()` on it
   * gives {mode, ttft_ms, prompt_tokens, prefill_tokens, cached_docs, decode_tok_s, stop, text}.
   * options: { mode: 'kvlink'|'full'|'naive'|'masked', maxTokens, temperature, topK, topP, seed, system, raw }.
   */
  ask(question, options = {}) { return new AskRun(this.inner, question, options); }

  /** Next-token log-probabilities: {tokens, top: [{id, token, logprob}]} (as `kvlink logits --json`). */
  async logits(prompt, { raw = true, top = 10 } = {}) { return this.inner.logits(prompt, raw, top); }
}

class AskRun {
  constructor(inner, question, options) {
    this.stream = null;
    this._stats = null;
    this._start = () => inner.start(question, options);
  }
  async *[Symbol.asyncIterator]() {
    const s = await this._start();
    this.stream = s;
    try {
      for (;;) {
        const t = await s.next();
        if (t === undefined) break;
        t.ttftMs = s.ttftMs;
        yield t;
      }
    } finally {
      this._stats = s.stats();
      s.free();
      this.stream = null;
    }
  }
  /** Timings and counts (complete after the iteration ends). */
  stats() { return this.stream ? this.stream.stats() : this._stats; }
}
