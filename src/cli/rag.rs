//! RAG subcommands: `ask`, `precompute`, `bench`.

use super::{load_engine_from, GenArgs, ModelArgs};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kvlink::engine::StartOptions;
use kvlink::gpu::AdapterChoice;
use kvlink::kv::{DiskStore, KvFormat};
use kvlink::link::{Mode, PromptPlan, Timings};
use kvlink::{Engine, GenerateParams, Request};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// Documents and cache flags shared by `ask`, `logits` and `precompute`.
#[derive(Args, Clone, Default)]
pub struct DocArgs {
    /// A document file (repeat for several). Each is encoded and cached on its own.
    #[arg(long = "doc", short = 'd')]
    pub docs: Vec<PathBuf>,
    /// Where document caches are kept: a directory (default: <cache dir>/kv) and/or a
    /// Redis server shared with other processes, `redis://HOST:PORT[/DB]`, looked up
    /// after the GPU and the directory (both: `--store DIR --store redis://HOST:PORT`).
    #[arg(long, value_name = "DIR|redis://HOST:PORT")]
    pub store: Vec<PathBuf>,
    /// Do not read or write document caches on disk.
    #[arg(long)]
    pub no_store: bool,
    /// Size cap of the disk store in GB (10^9 bytes, fractions allowed). Beyond it the
    /// least recently used entries (last written or read) are deleted. Default: 20.
    #[arg(long, value_name = "GB")]
    pub store_max_gb: Option<f64>,
    /// How new document caches are written to the stores: f16 (as computed) or q8
    /// (8-bit with a scale per 32 values: 53% of the bytes to read and upload on a hit,
    /// each value within half a quantization step). Entries of either format are read.
    #[arg(long, value_name = "f16|q8", default_value = "f16", value_parser = parse_store_format)]
    pub store_format: KvFormat,
    /// Expiry of entries in a Redis store, in hours after their last write or hit (0:
    /// never; then bound Redis with `maxmemory` and an LRU `maxmemory-policy`).
    /// Default: 168 (a week).
    #[arg(long, value_name = "HOURS")]
    pub store_ttl_hours: Option<f64>,
    /// Link tokens per document (KVLink fine-tuned models; also from kvlink.json next
    /// to the model).
    #[arg(long)]
    pub link_tokens: Option<usize>,
    /// Id of the first link token.
    #[arg(long)]
    pub link_base: Option<u32>,
    /// KV-START marker token id.
    #[arg(long)]
    pub kv_start: Option<u32>,
    /// KV-END marker token id.
    #[arg(long)]
    pub kv_end: Option<u32>,
}

impl DocArgs {
    /// Read the document files ("\n"-terminated, so documents end on a line break).
    pub fn read_docs(&self) -> Result<Vec<String>> {
        self.docs
            .iter()
            .map(|p| {
                let t = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read document {}", p.display()))?;
                Ok(format!("{}\n", t.trim_end()))
            })
            .collect()
    }

    /// Apply link-token configuration (a `--lora` adapter's kvlink.json, which the
    /// engine took at load, else kvlink.json next to the model; then flags) and the
    /// stores to a loaded engine.
    pub fn configure(&self, engine: &mut Engine, model: &ModelArgs) -> Result<()> {
        store_cap(self.store_max_gb)?;
        if let Some(h) = self.store_ttl_hours {
            if !(h.is_finite() && h >= 0.0) {
                bail!("--store-ttl-hours must be 0 or more, got {h}");
            }
        }
        let links = kvlink::setup::LinkOverrides {
            k: self.link_tokens,
            link_base: self.link_base,
            kv_start: self.kv_start,
            kv_end: self.kv_end,
        };
        Ok(kvlink::setup::configure(
            engine,
            &model.spec(),
            &links,
            &self.stores(),
        )?)
    }

    /// Where the flags say document caches go.
    pub fn stores(&self) -> kvlink::setup::StoreSpec {
        kvlink::setup::StoreSpec {
            locations: self.store.clone(),
            no_disk: self.no_store,
            max_gb: self.store_max_gb,
            format: self.store_format,
            ttl_hours: self.store_ttl_hours,
        }
    }
}

/// `--store-format`.
pub fn parse_store_format(s: &str) -> std::result::Result<KvFormat, String> {
    s.parse().map_err(|e: kvlink::Error| e.to_string())
}

/// `--store-max-gb` in bytes ([`DiskStore`]'s default without it).
pub fn store_cap(gb: Option<f64>) -> Result<u64> {
    let spec = kvlink::setup::StoreSpec {
        max_gb: gb,
        ..Default::default()
    };
    match spec.disk_cap() {
        Ok(cap) => Ok(cap),
        Err(_) => bail!(
            "--store-max-gb must be a positive number of GB, got {}",
            gb.unwrap_or_default()
        ),
    }
}

#[derive(Args)]
pub struct AskArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub docs: DocArgs,
    /// The question.
    #[arg(long, short = 'q')]
    pub question: String,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// full (plain prefill, no reuse), kvlink (reuse + rotation, default), naive (reuse
    /// without rotation), masked (one pass with the KVLink mask, no reuse).
    #[arg(long, default_value = "kvlink")]
    pub mode: String,
    /// No chat template: documents then the question as plain text.
    #[arg(long)]
    pub raw: bool,
    /// Print the answer and timings as one JSON object instead of streaming.
    #[arg(long)]
    pub json: bool,
    /// Capture the attention mass each prompt segment receives during decode (per
    /// generated token, layer and head) and write it as JSON.
    #[arg(long)]
    pub attention_out: Option<PathBuf>,
    /// Render the captured attention as a PNG heatmap (layers x segments, mean over
    /// heads and generated tokens).
    #[arg(long)]
    pub attention_png: Option<PathBuf>,
    #[command(flatten)]
    pub gen: GenArgs,
}

pub fn ask(adapter: &AdapterChoice, a: &AskArgs) -> Result<()> {
    let mode: Mode = a.mode.parse()?;
    let params = a.gen.params();
    params.sampling.validate()?;
    let docs = a.docs.read_docs()?;
    let mut engine = load_engine_from(adapter, &a.model)?;
    a.docs.configure(&mut engine, &a.model)?;
    let req = Request {
        system: a.system.clone(),
        history: Vec::new(),
        documents: docs,
        question: a.question.clone(),
        raw: a.raw,
        mode,
    };
    let mut ts = kvlink::model::tokenizer::TextStream::new(engine.tokenizer());
    let mut answer = String::new();
    let mut out = std::io::stdout().lock();
    let on_token = |t| {
        if params.stop_at_eos && engine.tokenizer().is_stop(t) {
            return true;
        }
        if let Ok(s) = ts.push(t) {
            answer.push_str(&s);
            if !a.json {
                let _ = out.write_all(s.as_bytes());
                let _ = out.flush();
            }
        }
        true
    };
    let want_attention = a.attention_out.is_some() || a.attention_png.is_some();
    let (stats, capture) = if want_attention {
        let (s, c) =
            super::viewer::attention::ask_with_attention(&engine, &req, &params, on_token)?;
        (s, Some(c))
    } else {
        (engine.ask(&req, &params, on_token)?, None)
    };
    let rest = ts.finish()?;
    answer.push_str(&rest);
    if a.json {
        let v = serde_json::json!({
            "answer": answer,
            "mode": stats.mode,
            "timings_ms": stats.timings,
            "generation": {
                "prompt_tokens": stats.generation.prompt_tokens,
                "generated_tokens": stats.generation.generated_tokens,
                "decode_tok_s": stats.generation.decode_tok_s(),
                "stop": stats.generation.stop,
            },
            "adapter": engine.gpu().report.name,
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(out, "{rest}")?;
        drop(out);
        print_timings(&stats.timings, stats.mode, &engine);
        eprintln!(
            "[{} generated, {:.1} tok/s, stop: {}]",
            stats.generation.generated_tokens,
            stats.generation.decode_tok_s(),
            stats.generation.stop
        );
    }
    if let Some(cap) = &capture {
        let (j, p) = (a.attention_out.as_deref(), a.attention_png.as_deref());
        super::viewer::export_ask(&engine, cap, stats.mode, j, p)?;
    }
    Ok(())
}

pub fn print_timings(t: &Timings, mode: Mode, engine: &Engine) {
    eprintln!("[{mode}] TTFT {t} | {}", engine.gpu().report.name);
}

#[derive(Args)]
pub struct PrecomputeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Document files to encode and store.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Where document caches are kept (default: <cache dir>/kv).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Size cap of the store in GB (10^9 bytes); least recently used entries are
    /// deleted beyond it. Default: 20.
    #[arg(long, value_name = "GB")]
    pub store_max_gb: Option<f64>,
    /// How the caches are written: f16 (as computed) or q8 (53% of the bytes; see `ask
    /// --help`).
    #[arg(long, value_name = "f16|q8", default_value = "f16", value_parser = parse_store_format)]
    pub store_format: KvFormat,
    /// Documents encoded per batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
}

pub fn precompute(adapter: &AdapterChoice, a: &PrecomputeArgs) -> Result<()> {
    let cap = store_cap(a.store_max_gb)?;
    let engine = load_engine_from(adapter, &a.model)?;
    let dir = a.store.clone().unwrap_or_else(DiskStore::default_dir);
    let store = DiskStore::open_with_cap(&dir, cap)
        .with_context(|| format!("cannot open the document store {}", dir.display()))?;
    engine.set_store(Some(store.clone()));
    engine.set_store_format(a.store_format);
    let docs = DocArgs {
        docs: a.files.clone(),
        ..Default::default()
    }
    .read_docs()?;
    let pb = ProgressBar::new(docs.len() as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "precompute [{bar:30}] {pos}/{len} documents ({elapsed}, eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let (mut fresh, mut present, mut tokens) = (0, 0, 0);
    for chunk in docs.chunks(a.batch.max(1)) {
        let ids = chunk
            .iter()
            .map(|d| {
                engine
                    .tokenizer()
                    .encode_data(d)
                    .map_err(anyhow::Error::from)
            })
            .collect::<Result<Vec<_>>>()?;
        for (i, d) in ids.iter().enumerate() {
            if d.is_empty() {
                bail!("document {} is empty", fresh + present + i + 1);
            }
            if d.len() >= engine.context() {
                bail!(
                    "a document is {} tokens, longer than the context ({}); use --ctx",
                    d.len(),
                    engine.context()
                );
            }
        }
        let refs: Vec<&[u32]> = ids.iter().map(|d| d.as_slice()).collect();
        let (_, from) = engine.doc_caches(&refs)?;
        for (f, d) in from.iter().zip(&ids) {
            tokens += d.len();
            if *f == kvlink::engine::CacheSource::Computed {
                fresh += 1;
            } else {
                present += 1;
            }
        }
        engine.clear_doc_caches();
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    eprintln!(
        "{} documents ({tokens} tokens): {fresh} encoded, {present} already stored; store {} ({:.1} MiB)",
        docs.len(),
        store.dir().display(),
        store.total_bytes()? as f64 / (1 << 20) as f64
    );
    Ok(())
}

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Time to first token: full prefill vs KVLink reuse (caches on the GPU and from
    /// disk), same prompt, one run; median of repeats after warm-up.
    Ttft(TtftArgs),
    /// Prefill and decode throughput.
    Speed(SpeedArgs),
    /// The model's GEMM/GEMV shapes under each kernel variant (portable, tensor cores
    /// with several tiles), checked against the CPU, then timed: for tuning on a new GPU.
    Kernels(super::bench_kernels::KernelArgs),
    /// Batched decode: aggregate greedy decode tok/s of 1, 4, 16 ... sequences decoding
    /// together in one KV arena (one forward per step for all), each after its own
    /// prompt, against one sequence decoding alone. Steps are pipelined as the server
    /// runs them (the next queued on the GPU before this one's tokens are read); the
    /// step time with each step waited for is shown beside.
    Batch(BatchArgs),
    /// Load-test `kvlink serve` on loopback: N requests from C concurrent clients mixing
    /// document registrations and streamed questions over shared documents; errors and
    /// TTFT percentiles. Starts its own server unless --url names one.
    Serve(super::serve::LoadArgs),
}

#[derive(Args, Clone)]
pub struct BenchModel {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Random weights of a named shape instead of a model file (smollm2-135m,
    /// llama-3.2-1b, tiny, tiny-qwen2): no download, for speed work.
    #[arg(long)]
    pub random_model: Option<String>,
    /// Print results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Timed repeats (median reported).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
}

#[derive(Args)]
pub struct BatchArgs {
    #[command(flatten)]
    pub bench: BenchModel,
    /// Concurrent sequences to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub streams: Vec<usize>,
    /// Prompt tokens per sequence (each its own random prompt).
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    /// Decode steps timed (after two untimed ones).
    #[arg(long, default_value_t = 64)]
    pub decode: usize,
}

#[derive(Args)]
pub struct TtftArgs {
    #[command(flatten)]
    pub bench: BenchModel,
    /// Documents per prompt.
    #[arg(long, default_value_t = 10)]
    pub docs: usize,
    /// Tokens per document.
    #[arg(long, default_value_t = 256)]
    pub doc_len: usize,
    /// Tokens in the question.
    #[arg(long, default_value_t = 32)]
    pub question_len: usize,
    /// Tokens in the prefix (system prompt).
    #[arg(long, default_value_t = 16)]
    pub prefix_len: usize,
    /// Skip the disk-store measurements (f16 and q8 entries).
    #[arg(long)]
    pub no_disk: bool,
}

#[derive(Args)]
pub struct SpeedArgs {
    #[command(flatten)]
    pub bench: BenchModel,
    /// Prompt lengths for prefill throughput.
    #[arg(long, value_delimiter = ',', default_value = "512,2048")]
    pub prefill: Vec<usize>,
    /// Decode this many tokens after a prompt of --decode-ctx tokens.
    #[arg(long, default_value_t = 128)]
    pub decode: usize,
    #[arg(long, default_value_t = 512)]
    pub decode_ctx: usize,
}

/// Load the benchmark's model with a context of at least `ctx` tokens (or --ctx).
fn bench_engine(adapter: &AdapterChoice, b: &BenchModel, ctx: usize) -> Result<Engine> {
    let mut m = b.model.clone();
    let src: Box<dyn kvlink::model::WeightSource> = match &b.random_model {
        Some(shape) => {
            let r = Box::new(kvlink::model::random::RandomModel::new(shape, 1)?);
            match &m.lora {
                Some(dir) => kvlink::model::lora::with_lora(r, dir)?,
                None => r,
            }
        }
        None => super::open_source(&m)?,
    };
    if m.ctx == 0 {
        let max = src.config().max_position_embeddings;
        if ctx > max {
            bail!("the benchmark needs {ctx} tokens of context but the model has {max} positions; use smaller sizes");
        }
        m.ctx = ctx;
    }
    super::load_engine_with(adapter, src.as_ref(), m.ctx)
}

/// Random token ids that are ordinary text tokens (not the first/last 1000 ids, where
/// vocabularies keep special tokens), deterministic per seed.
fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let (lo, hi) = if vocab > 4000 {
        (1000u64, vocab as u64 - 1000)
    } else {
        (0, vocab as u64)
    };
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (lo + s % (hi - lo)) as u32
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Time `f` (returns ms): `warmup` untimed runs (with a warm-up at all, repeated until
/// 0.3 s have passed, at most 50 runs, so an idle GPU's clocks are up), then the median
/// of `repeats`.
fn timed(warmup: usize, repeats: usize, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    let t0 = Instant::now();
    let mut runs = 0;
    while runs < warmup || (warmup > 0 && runs < 50 && t0.elapsed().as_secs_f64() < 0.3) {
        f()?;
        runs += 1;
    }
    let mut v = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        v.push(f()?);
    }
    Ok(median(v))
}

pub fn bench(adapter: &AdapterChoice, cmd: &BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Ttft(a) => bench_ttft(adapter, a),
        BenchCmd::Speed(a) => bench_speed(adapter, a),
        BenchCmd::Batch(a) => bench_batch(adapter, a),
        BenchCmd::Kernels(a) => super::bench_kernels::run(adapter, a),
        BenchCmd::Serve(a) => super::serve::load(adapter, a),
    }
}

/// With KVLINK_PROFILE=1: GPU time per kernel over the whole run.
fn print_profile(engine: &Engine) {
    let prof = engine.gpu().take_profile();
    if prof.is_empty() {
        return;
    }
    let total: f64 = prof.iter().map(|p| p.2).sum();
    eprintln!("GPU time per kernel (KVLINK_PROFILE, whole run, {total:.1} ms):");
    for (name, n, ms) in prof {
        eprintln!(
            "  {name:<32} {n:>8} dispatches {ms:>10.2} ms {:>5.1}%",
            100.0 * ms / total
        );
    }
}

fn bench_ttft(adapter: &AdapterChoice, a: &TtftArgs) -> Result<()> {
    let total = a.prefix_len + a.docs * (a.doc_len + 8) + a.question_len + 16;
    let engine = bench_engine(adapter, &a.bench, total.div_ceil(256) * 256)?;
    let vocab = engine.config().vocab_size;
    let prefix = random_tokens(a.prefix_len, vocab, 1);
    let docs: Vec<Vec<u32>> = (0..a.docs)
        .map(|j| random_tokens(a.doc_len, vocab, 100 + j as u64))
        .collect();
    let tail = random_tokens(a.question_len, vocab, 2);
    let refs: Vec<&[u32]> = docs.iter().map(|d| d.as_slice()).collect();
    let plan = PromptPlan::build(&prefix, &refs, &tail, engine.link())?;
    if plan.len() >= engine.context() {
        bail!(
            "the prompt ({} tokens) does not fit the context ({}); pass --ctx",
            plan.len(),
            engine.context()
        );
    }
    let run = |mode: Mode| -> Result<(f64, Timings)> {
        let t0 = Instant::now();
        let o = StartOptions {
            extra: 1,
            greedy: true,
            ..Default::default()
        };
        let s = engine.start_plan(plan.clone(), mode, t0, o)?;
        let (out, tm) = (s.out, s.timings);
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(out.token.is_some(), "no first token");
        Ok((ms, tm))
    };
    let (w, r) = (a.bench.warmup, a.bench.repeats);
    eprintln!(
        "bench ttft: {} docs x {} tokens + {} question tokens = {} prompt tokens on {}",
        a.docs,
        a.doc_len,
        a.question_len,
        plan.len(),
        engine.gpu().report.name
    );
    let full = timed(w, r, || Ok(run(Mode::Full)?.0))?;
    engine.clear_doc_caches();
    let (cold, _) = run(Mode::Kvlink)?; // encodes the documents
    let mut last = Timings::default();
    let warm = timed(w, r, || {
        let (ms, tm) = run(Mode::Kvlink)?;
        last = tm;
        Ok(ms)
    })?;
    // Caches from disk, stored as f16 and as q8.
    let mut disk = [None, None];
    // The last disk run's breakdown per format: the host's reads and checksums land in
    // lookup, the GPU copies they queue in prefill (which waits for them).
    let mut disk_tm = [Timings::default(), Timings::default()];
    for ((d, tm), format) in disk
        .iter_mut()
        .zip(disk_tm.iter_mut())
        .zip([KvFormat::F16, KvFormat::Q8])
        .filter(|_| !a.no_disk)
    {
        let dir =
            std::env::temp_dir().join(format!("kvlink-bench-{}-{format}", std::process::id()));
        let store = DiskStore::open(dir.clone())?;
        engine.set_store(Some(store));
        engine.set_store_format(format);
        engine.clear_doc_caches();
        run(Mode::Kvlink)?; // writes the store
        let t = timed(0, r, || {
            engine.clear_doc_caches();
            let (ms, t) = run(Mode::Kvlink)?;
            *tm = t;
            Ok(ms)
        });
        engine.set_store(None);
        engine.set_store_format(KvFormat::F16);
        let _ = std::fs::remove_dir_all(&dir);
        *d = Some(t?);
    }
    let [disk, disk_q8] = disk;
    let v = serde_json::json!({
        "adapter": engine.gpu().report.name,
        "backend": engine.gpu().report.backend,
        "model": engine.description(),
        "docs": a.docs, "doc_len": a.doc_len, "question_len": a.question_len,
        "prompt_tokens": plan.len(),
        "full_ms": full,
        "kvlink_gpu_ms": warm,
        "kvlink_disk_ms": disk,
        "kvlink_disk_q8_ms": disk_q8,
        "kvlink_cold_ms": cold,
        "ratio_gpu": warm / full,
        "ratio_disk": disk.map(|d| d / full),
        "ratio_disk_q8": disk_q8.map(|d| d / full),
        "kvlink_breakdown_ms": last,
        "kvlink_disk_breakdown_ms": disk.map(|_| &disk_tm[0]),
        "kvlink_disk_q8_breakdown_ms": disk_q8.map(|_| &disk_tm[1]),
    });
    if a.bench.json {
        println!("{v}");
    } else {
        println!("| measure | TTFT ms | vs full |");
        println!("|---|---:|---:|");
        println!(
            "| full prefill ({} tokens) | {full:.2} | 1.000 |",
            plan.len()
        );
        println!("| kvlink, caches on GPU | {warm:.2} | {:.3} |", warm / full);
        if let Some(d) = disk {
            println!("| kvlink, caches from disk | {d:.2} | {:.3} |", d / full);
        }
        if let Some(d) = disk_q8 {
            println!(
                "| kvlink, caches from disk, q8 | {d:.2} | {:.3} |",
                d / full
            );
        }
        println!(
            "| kvlink, cold (encode docs) | {cold:.2} | {:.3} |",
            cold / full
        );
        print_profile(&engine);
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let breakdown = |what: &str, t: &Timings| {
            println!(
                "kvlink breakdown ({what}): lookup {:.2} ms, assembly {:.2} ms, prefill {:.2} ms ({} tokens)",
                ms(t.lookup),
                ms(t.assemble),
                ms(t.prefill),
                t.prefill_tokens
            );
            if let Some(d) = &t.disk_reads {
                println!("  disk reads: {d}");
            }
        };
        breakdown("GPU caches", &last);
        if disk.is_some() {
            breakdown("disk f16", &disk_tm[0]);
        }
        if disk_q8.is_some() {
            breakdown("disk q8", &disk_tm[1]);
        }
    }
    Ok(())
}

fn bench_batch(adapter: &AdapterChoice, a: &BatchArgs) -> Result<()> {
    use kvlink::link::batch::DecodeBatch;
    let most = a.streams.iter().copied().max().unwrap_or(0);
    if most == 0 || a.streams.contains(&0) {
        bail!("--streams: give counts of at least 1 (e.g. 1,4,16)");
    }
    if a.prompt_len == 0 || a.decode == 0 {
        bail!("--prompt-len and --decode must be at least 1");
    }
    let warm = 2;
    let room = a.prompt_len + a.decode + warm + 1;
    let engine = bench_engine(adapter, &a.bench, room.div_ceil(256) * 256)?;
    let vocab = engine.config().vocab_size;
    let mut batch = DecodeBatch::new(engine.model(), most * room)?;
    eprintln!(
        "bench batch: {} prompt tokens each, {} decode steps, arena {} slots ({:.0} MiB) on {}",
        a.prompt_len,
        a.decode,
        batch.slots(),
        batch.bytes() as f64 / (1 << 20) as f64,
        engine.gpu().report.name
    );
    let mut rows = Vec::new();
    // Decode `n` sequences together for `warm + a.decode` steps, each step waited for
    // or pipelined (queued on the GPU before the previous step's tokens are read);
    // seconds for the timed steps.
    let mut run = |n: usize, pipelined: bool| -> Result<f64> {
        let model = engine.model();
        // Prefill each sequence alone, then move it into the arena.
        let mut ids = Vec::with_capacity(n);
        let mut next = Vec::with_capacity(n);
        for j in 0..n {
            let prompt = random_tokens(a.prompt_len, vocab, 50 + j as u64);
            let plan = PromptPlan::build(&prompt, &[], &[], engine.link())?;
            let o = StartOptions::generate(room, true);
            let s = engine.start_plan(plan, Mode::Full, Instant::now(), o)?;
            let (plan, cache, out) = (s.plan, s.cache, s.out);
            next.push(out.token.context("no first token")?);
            let id = batch
                .join(model, &cache, plan.len(), room)?
                .context("the arena has no room")?;
            ids.push(id);
        }
        let mut pipe = batch.pipe(model)?;
        let mut queued = std::collections::VecDeque::new();
        let mut t0 = Instant::now();
        for s in 0..warm + a.decode {
            if s == warm {
                for p in queued.drain(..) {
                    model.read_tokens(p)?;
                }
                engine.gpu().wait()?;
                t0 = Instant::now();
            }
            if pipelined {
                let first = (s == 0).then_some(next.as_slice());
                queued.push_back(batch.step_async(model, &mut pipe, &ids, first)?);
                if queued.len() == 2 {
                    let p = queued.pop_front().expect("two queued");
                    model.read_tokens(p)?;
                }
            } else {
                let live: Vec<_> = ids.iter().copied().zip(next.iter().copied()).collect();
                next = batch.step(model, &live, true)?.tokens;
            }
        }
        for p in queued {
            model.read_tokens(p)?;
        }
        let secs = t0.elapsed().as_secs_f64();
        for id in ids {
            batch.leave(id);
        }
        Ok(secs)
    };
    for &n in &a.streams {
        let secs = run(n, true)?;
        let waited = run(n, false)?;
        let tok_s = (n * a.decode) as f64 / secs;
        rows.push(serde_json::json!({
            "streams": n,
            "step_ms": secs * 1e3 / a.decode as f64,
            "tok_s": tok_s,
            "waited_step_ms": waited * 1e3 / a.decode as f64,
            "waited_tok_s": (n * a.decode) as f64 / waited,
        }));
    }
    // The single-stream reference: the pipelined one-sequence decoder.
    let ids = random_tokens(a.prompt_len, vocab, 8);
    let p = GenerateParams {
        max_tokens: a.decode + 1,
        stop_at_eos: false,
        ..Default::default()
    };
    let alone = engine.generate(&ids, &p, |_| true)?.decode_tok_s();
    let v = serde_json::json!({
        "adapter": engine.gpu().report.name,
        "model": engine.description(),
        "prompt_len": a.prompt_len,
        "decode": a.decode,
        "alone_tok_s": alone,
        "results": rows,
    });
    if a.bench.json {
        println!("{v}");
    } else {
        println!(
            "| streams | step ms | aggregate tok/s | vs one alone | step ms, each waited for |"
        );
        println!("|---:|---:|---:|---:|---:|");
        for r in &rows {
            let tok_s = r["tok_s"].as_f64().unwrap_or(0.0);
            println!(
                "| {} | {:.2} | {:.0} | {:.2}x | {:.2} |",
                r["streams"],
                r["step_ms"].as_f64().unwrap_or(0.0),
                tok_s,
                tok_s / alone,
                r["waited_step_ms"].as_f64().unwrap_or(0.0),
            );
        }
        println!("one sequence alone (pipelined decoder): {alone:.0} tok/s");
        println!("adapter: {}", engine.gpu().report.name);
        print_profile(&engine);
    }
    Ok(())
}

fn bench_speed(adapter: &AdapterChoice, a: &SpeedArgs) -> Result<()> {
    let need = a
        .prefill
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(a.decode_ctx + a.decode)
        + 8;
    let engine = bench_engine(adapter, &a.bench, need.div_ceil(256) * 256)?;
    let vocab = engine.config().vocab_size;
    let (w, r) = (a.bench.warmup, a.bench.repeats);
    let mut rows = Vec::new();
    for &n in &a.prefill {
        let ids = random_tokens(n, vocab, 7);
        let p = GenerateParams {
            max_tokens: 1,
            stop_at_eos: false,
            ..Default::default()
        };
        let ms = timed(w, r, || {
            let st = engine.generate(&ids, &p, |_| true)?;
            Ok(st.ttft.as_secs_f64() * 1e3)
        })?;
        rows.push(serde_json::json!({"measure": format!("prefill {n} tokens"), "ms": ms, "tok_s": n as f64 / ms * 1e3}));
    }
    if a.decode > 0 {
        let ids = random_tokens(a.decode_ctx, vocab, 8);
        let p = GenerateParams {
            max_tokens: a.decode + 1,
            stop_at_eos: false,
            ..Default::default()
        };
        let tok_s = {
            let mut v = Vec::new();
            for i in 0..(w + r.max(1)) {
                let st = engine.generate(&ids, &p, |_| true)?;
                if i >= w {
                    v.push(st.decode_tok_s());
                }
            }
            median(v)
        };
        rows.push(serde_json::json!({"measure": format!("decode {} tokens after {}", a.decode, a.decode_ctx), "ms": 1e3 / tok_s, "tok_s": tok_s}));
    }
    let v = serde_json::json!({
        "adapter": engine.gpu().report.name,
        "model": engine.description(),
        "results": rows,
    });
    if a.bench.json {
        println!("{v}");
    } else {
        println!("| measure | ms | tok/s |");
        println!("|---|---:|---:|");
        for r in &rows {
            println!(
                "| {} | {:.2} | {:.0} |",
                r["measure"].as_str().unwrap_or(""),
                r["ms"].as_f64().unwrap_or(0.0),
                r["tok_s"].as_f64().unwrap_or(0.0)
            );
        }
        println!("adapter: {}", engine.gpu().report.name);
        print_profile(&engine);
    }
    Ok(())
}
