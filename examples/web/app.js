// The demo page: load a model, add documents, ask; shows full vs KVLink TTFT.
// `?auto=1` runs a fixed example end to end (used by scripts/web-screenshot.sh).
import { init } from './kvlink.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let kv = null;

function status(msg, state) {
  $('status').textContent = msg;
  if (state) document.body.dataset.state = state;
}

function enable(on) {
  for (const id of ['addDoc', 'clearDocs', 'ask']) $(id).disabled = !on;
}

async function loadModel(source) {
  enable(false);
  status('loading model…', 'loading');
  // A picked adapter folder, else ?lora=<folder URL>.
  const lora = $('lora').files.length ? $('lora').files : (params.get('lora') || undefined);
  const info = await kv.loadModel(source, {
    context: 2048,
    lora,
    onProgress: (n, total) => status(`downloading model: ${(n / 1e6).toFixed(1)}${total ? ' / ' + (total / 1e6).toFixed(1) : ''} MB`),
  });
  $('model').textContent = `${info.description}: ${info.layers} layers, vocab ${info.vocab}, ` +
    `${(info.weight_bytes / 1e6).toFixed(0)} MB of f16 weights on the GPU, loaded in ${(info.load_ms / 1e3).toFixed(1)} s` +
    (info.extra_vocab ? `; ${info.extra_vocab} extra input tokens, ${info.link.k} link tokens per document` : '');
  $('docs').innerHTML = '';
  enable(true);
  status('model ready: add documents and ask', 'ready');
}

async function addDocument(text) {
  status('encoding the document (its KV cache is kept for reuse)…', 'busy');
  const d = await kv.addDocument(text);
  const li = document.createElement('li');
  li.textContent = `${text.slice(0, 90)}${text.length > 90 ? '…' : ''} — ${d.tokens} tokens, ${d.source} in ${d.ms.toFixed(0)} ms`;
  $('docs').appendChild(li);
  status(`${kv.documentCount} document(s) cached`, 'ready');
}

function showTtft(full, kvl) {
  const max = Math.max(full || 0, kvl || 0, 1);
  const bar = (el, v) => {
    el.style.width = v ? `${Math.max(4, (90 * v) / max)}%` : '0';
    el.textContent = v ? `${v.toFixed(0)} ms` : '';
  };
  bar($('barFull'), full);
  bar($('barKv'), kvl);
  $('ttftNote').textContent = full && kvl ? `KVLink first token ${(full / kvl).toFixed(1)}x sooner than a full prefill` : '';
}

async function ask(question) {
  enable(false);
  const maxTokens = Number($('maxTokens').value) || 48;
  let full = null;
  $('answer').textContent = '';
  $('stats').textContent = '';
  showTtft(null, null);
  if ($('compare').checked) {
    status('full prefill (no reuse), first token only…', 'busy');
    const run = kv.ask(question, { mode: 'full', maxTokens: 1 });
    for await (const _ of run) { /* first token only */ }
    full = run.stats().ttft_ms;
    showTtft(full, null);
  }
  status('KVLink: cached documents + question…', 'busy');
  const run = kv.ask(question, { mode: 'kvlink', maxTokens });
  for await (const t of run) {
    if (t.index === 0) showTtft(full, t.ttftMs);
    $('answer').textContent += t.text;
  }
  const s = run.stats();
  $('stats').textContent = `${s.prompt_tokens} prompt tokens (${s.prefill_tokens} computed, ${s.cached_docs} cached documents); ` +
    `TTFT ${s.ttft_ms.toFixed(0)} ms; ${s.generated_tokens} tokens` +
    (s.decode_tok_s ? `, ${s.decode_tok_s.toFixed(1)} tok/s decode` : '') + `; stop: ${s.stop}`;
  window.kvlinkResult = { full_ttft_ms: full, kvlink: s };
  enable(true);
  status('done', 'done');
}

function guard(f) {
  return async (...a) => {
    try { await f(...a); } catch (e) { console.error(e); status(`error: ${e.message || e}`, 'error'); enable(!!kv && !!kv.model); }
  };
}

$('file').onchange = guard(async () => { if ($('file').files[0]) await loadModel($('file').files[0]); });
$('loadUrl').onclick = guard(() => loadModel($('url').value));
$('addDoc').onclick = guard(async () => { const t = $('doc').value.trim(); if (t) { await addDocument(t); $('doc').value = ''; } });
$('clearDocs').onclick = () => { kv.clearDocuments(); $('docs').innerHTML = ''; status('documents cleared', 'ready'); };
$('store').onchange = guard(async () => { await kv.useStore($('store').checked); status($('store').checked ? 'document caches are kept in OPFS' : 'document caches in GPU memory only'); });
$('ask').onclick = guard(() => ask($('question').value));

const EXAMPLE_DOCS = [
  'The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was designed by the company of Gustave Eiffel and completed in 1889 for the World\'s Fair.',
  'The Golden Gate Bridge is a suspension bridge in San Francisco, California. It opened in 1937 and was then the longest suspension bridge in the world.',
];

guard(async () => {
  kv = await init();
  const a = kv.adapterInfo();
  $('adapter').textContent = `WebGPU adapter: ${a.name || '(unnamed)'} ${a.device_type === 'Cpu' ? '(CPU fallback)' : ''}; ` +
    `shader-f16 ${a.shader_f16 ? 'yes' : 'no'}; max binding ${(a.max_storage_buffer_binding_size / 2 ** 20).toFixed(0)} MiB; ` +
    `${a.serial_kernels ? 'CPU' : 'GPU'} kernels`;
  status('ready: load a model', 'init');
  if (params.get('auto')) {
    await loadModel(params.get('model') || $('url').value);
    if (params.get('store')) { $('store').checked = true; await kv.useStore(true); }
    for (const d of EXAMPLE_DOCS) { $('doc').value = d; await addDocument(d); }
    $('doc').value = '';
    $('question').value = params.get('q') || 'When was the Eiffel Tower completed?';
    $('maxTokens').value = params.get('n') || '24';
    await ask($('question').value);
  }
})();
