//! `kvlink view`: the desktop viewer (cargo feature `viewer`).

use super::ModelArgs;
use anyhow::Result;
use clap::Args;
use kvlink::gpu::AdapterChoice;
use std::path::PathBuf;

#[derive(Args)]
pub struct ViewArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where document caches are kept on disk (default: <cache dir>/kv).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Do not read or write document caches on disk.
    #[arg(long)]
    pub no_store: bool,
}

pub fn view(adapter: &AdapterChoice, a: &ViewArgs) -> Result<()> {
    super::viewer::app::run(super::viewer::app::Options {
        adapter: adapter.clone(),
        model: a.model.model.clone(),
        ctx: a.model.ctx,
        lora: a.model.lora.clone(),
        store: a.store.clone(),
        no_store: a.no_store,
    })
}
