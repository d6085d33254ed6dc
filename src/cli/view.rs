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
    /// Size cap of the disk store in GB (10^9 bytes, fractions allowed), as for `ask`:
    /// beyond it the least recently used entries (last written or read) are deleted.
    /// Default: 20.
    #[arg(long, value_name = "GB")]
    pub store_max_gb: Option<f64>,
    /// How new document caches are written: f16 (as computed) or q8 (53% of the bytes;
    /// see `ask --help`).
    #[arg(long, value_name = "f16|q8", default_value = "f16", value_parser = super::rag::parse_store_format)]
    pub store_format: kvlink::kv::KvFormat,
}

pub fn view(adapter: &AdapterChoice, a: &ViewArgs) -> Result<()> {
    // A bad value is an error now, not at the first Load in the window.
    super::rag::store_cap(a.store_max_gb)?;
    super::viewer::app::run(super::viewer::app::Options {
        adapter: adapter.clone(),
        model: a.model.spec(),
        stores: kvlink::setup::StoreSpec {
            locations: a.store.iter().cloned().collect(),
            no_disk: a.no_store,
            max_gb: a.store_max_gb,
            format: a.store_format,
            ttl_hours: None,
        },
    })
}
