//! `kvlink serve`: the OpenAI-compatible HTTP server (see `kvlink::server`).

use super::rag::DocArgs;
use super::{load_engine_from, ModelArgs};
use anyhow::{Context, Result};
use clap::Args;
use kvlink::gpu::AdapterChoice;
use kvlink::server::{Server, ServerConfig};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Documents (`--doc`, registered at start), the disk store and link-token flags,
    /// as for `ask`.
    #[command(flatten)]
    pub docs: DocArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Requests (generations and document encodings) waiting or running; more are
    /// refused with 503.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Largest request body in MB (413 beyond it).
    #[arg(long, default_value_t = 8.0)]
    pub max_body_mb: f64,
    /// Most documents one request may name.
    #[arg(long, default_value_t = 16)]
    pub max_documents: usize,
    /// Generations decoding together at most: each is prefilled alone, then all decode
    /// in one forward pass per token (a greedy one with nothing else to decode keeps to
    /// the pipelined single-sequence decoder). 1: one generation after another.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// KV slots shared by the generations decoding together (their prompts and answers;
    /// at least --ctx). More wait for room.
    #[arg(long, default_value_t = 8192)]
    pub batch_slots: usize,
}

pub fn serve(adapter: &AdapterChoice, a: &ServeArgs) -> Result<()> {
    anyhow::ensure!(a.max_queue > 0, "--max-queue must be at least 1");
    anyhow::ensure!(a.max_batch > 0, "--max-batch must be at least 1");
    anyhow::ensure!(
        a.max_body_mb.is_finite() && a.max_body_mb > 0.0,
        "--max-body-mb must be a positive number"
    );
    let texts = a.docs.read_docs()?;
    let mut engine = load_engine_from(adapter, &a.model)?;
    a.docs.configure(&mut engine, &a.model)?;
    let model_name = a
        .model
        .model
        .as_ref()
        .and_then(|p| p.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "SmolLM2-135M-Instruct".into());
    let cfg = ServerConfig {
        max_queue: a.max_queue,
        max_body_bytes: (a.max_body_mb * 1e6) as usize,
        max_documents: a.max_documents,
        model_name,
        max_batch: a.max_batch,
        batch_slots: a.batch_slots,
    };
    let addr = format!("{}:{}", a.host, a.port);
    let server =
        Server::start(engine, cfg, &addr).with_context(|| format!("cannot listen on {addr}"))?;
    for (t, p) in texts.iter().zip(&a.docs.docs) {
        let title = p.file_name().map(|s| s.to_string_lossy().into_owned());
        let d = server
            .add_document(t, title)
            .map_err(|e| anyhow::anyhow!("document {}: {}", p.display(), e.message))?;
        eprintln!("document {} = {} ({} tokens)", p.display(), d.id, d.tokens);
    }
    eprintln!("kvlink serve: listening on http://{}", server.addr);
    server.wait()?;
    Ok(())
}

#[derive(Args)]
pub struct LoadArgs {
    /// A running server (loopback only), e.g. http://127.0.0.1:8080. Without it, a server
    /// is started in this process on a free loopback port (GPU document cache only).
    #[arg(long)]
    pub url: Option<String>,
    /// The model of the server started here (--model, --lora, --ctx).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Requests in all.
    #[arg(short = 'n', long, default_value_t = 300)]
    pub requests: usize,
    /// Concurrent clients.
    #[arg(short = 'c', long, default_value_t = 16)]
    pub clients: usize,
    /// Distinct documents (registrations go through all of them).
    #[arg(long, default_value_t = 8)]
    pub documents: usize,
    /// Documents registered before the run; each question names two of them.
    #[arg(long, default_value_t = 4)]
    pub shared: usize,
    /// Every Nth request registers a document (0: none).
    #[arg(long, default_value_t = 4)]
    pub register_every: usize,
    /// Tokens generated per question.
    #[arg(long, default_value_t = 8)]
    pub max_tokens: usize,
    /// Queue limit of the server started here (503 beyond it, counted as errors).
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn load(adapter: &AdapterChoice, a: &LoadArgs) -> Result<()> {
    use kvlink::server::loadgen;
    let cfg = loadgen::LoadConfig {
        requests: a.requests,
        clients: a.clients,
        documents: a.documents,
        shared: a.shared,
        register_every: a.register_every,
        max_tokens: a.max_tokens,
        ..Default::default()
    };
    let mut _server = None;
    let base = match &a.url {
        Some(u) => u.clone(),
        None => {
            let engine = load_engine_from(adapter, &a.model)?;
            let cfg = ServerConfig {
                max_queue: a.max_queue,
                ..Default::default()
            };
            let s = Server::start(engine, cfg, "127.0.0.1:0").context("cannot start a server")?;
            let base = format!("http://{}", s.addr);
            eprintln!("bench serve: server on {base}");
            _server = Some(s);
            base
        }
    };
    let report = loadgen::run(&base, &cfg).map_err(anyhow::Error::msg)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    anyhow::ensure!(report.errors == 0, "{} requests failed", report.errors);
    Ok(())
}
