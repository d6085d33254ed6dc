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
}

pub fn serve(adapter: &AdapterChoice, a: &ServeArgs) -> Result<()> {
    anyhow::ensure!(a.max_queue > 0, "--max-queue must be at least 1");
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
