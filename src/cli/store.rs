//! `kvlink store`: look at and tidy the document KV store.

use super::rag::store_cap;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kvlink::kv::redis::RedisStore;
use kvlink::kv::shared::push_store;
use kvlink::kv::DiskStore;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

#[derive(Subcommand)]
pub enum StoreCmd {
    /// What the store holds: entries and their bytes, the cap, moved-aside corrupt files
    /// and temp files (writes in progress, or left by writers that died). Changes
    /// nothing.
    Stats(StoreStatsArgs),
    /// Delete moved-aside corrupt files and temp files of dead writers, then the least
    /// recently used entries (oldest last write or read first) until the store fits
    /// --store-max-gb. Safe while other processes use the store. `ask` and
    /// `precompute` do the same by themselves when they open the store (unless a prune
    /// finished in the last 10 minutes) and as they write it.
    Prune(StorePruneArgs),
    /// Copy every intact entry of the disk store to a shared Redis tier, so that other
    /// servers (`--store redis://...`) start with the caches this machine already has.
    /// Corrupt entries and those of another cache format are reported and left out.
    Push(StorePushArgs),
    /// Rewrite every entry in another K/V format, under the same key and keeping its
    /// last-use time: `--to q8` shrinks an f16 store to about 53% without recomputing
    /// any document (each value within half a quantization step; see `ask --help`,
    /// --store-format). `--to f16` gives back the dequantized values, not the ones
    /// before quantization. Safe while other processes use the store.
    Convert(StoreConvertArgs),
}

#[derive(Args)]
pub struct StoreConvertArgs {
    /// The store (default: <cache dir>/kv).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// The format to rewrite entries in.
    #[arg(long, value_name = "f16|q8", value_parser = super::rag::parse_store_format)]
    pub to: kvlink::kv::KvFormat,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct StorePushArgs {
    /// The store (default: <cache dir>/kv).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// The shared tier to fill.
    #[arg(long, value_name = "redis://HOST:PORT")]
    pub to: String,
    /// Expiry of the pushed entries in hours (0: never), as `--store-ttl-hours` of the
    /// servers. Default: 168 (a week).
    #[arg(long, value_name = "HOURS")]
    pub store_ttl_hours: Option<f64>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct StoreStatsArgs {
    /// The store (default: <cache dir>/kv).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct StorePruneArgs {
    /// The store (default: <cache dir>/kv).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Keep the entries under this many GB (10^9 bytes; 0 empties the store). Default:
    /// 20.
    #[arg(long, value_name = "GB")]
    pub store_max_gb: Option<f64>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn age_s(t: Option<SystemTime>) -> Option<f64> {
    t.map(|t| {
        SystemTime::now()
            .duration_since(t)
            .unwrap_or_default()
            .as_secs_f64()
    })
}

pub fn store(cmd: &StoreCmd) -> Result<()> {
    match cmd {
        StoreCmd::Stats(a) => {
            let dir = a.store.clone().unwrap_or_else(DiskStore::default_dir);
            let store = DiskStore::inspect(&dir);
            let st = store.stats()?;
            let q8 = store
                .entries()?
                .iter()
                .filter(|e| e.format == kvlink::kv::KvFormat::Q8)
                .count();
            let cap = store_cap(None)?;
            if a.json {
                let v = serde_json::json!({
                    "dir": dir,
                    "entries": st.entries,
                    "entry_bytes": st.entry_bytes,
                    "q8_entries": q8,
                    "default_cap_bytes": cap,
                    "corrupt_files": st.corrupt_files,
                    "corrupt_bytes": st.corrupt_bytes,
                    "tmp_files": st.tmp_files,
                    "tmp_bytes": st.tmp_bytes,
                    "stale_tmp_files": st.stale_tmp_files,
                    "oldest_use_age_s": age_s(st.oldest),
                    "newest_use_age_s": age_s(st.newest),
                });
                println!("{v}");
            } else {
                let gb = |b: u64| b as f64 / 1e9;
                println!("store:    {}", dir.display());
                println!(
                    "entries:  {} ({:.3} GB; default cap {:.0} GB), {q8} of them q8",
                    st.entries,
                    gb(st.entry_bytes),
                    gb(cap)
                );
                if let (Some(o), Some(n)) = (age_s(st.oldest), age_s(st.newest)) {
                    println!("last use: oldest {o:.0} s ago, newest {n:.0} s ago");
                }
                println!(
                    "corrupt:  {} set aside ({:.3} GB)",
                    st.corrupt_files,
                    gb(st.corrupt_bytes)
                );
                println!(
                    "temp:     {} ({:.3} GB), {} from dead writers",
                    st.tmp_files,
                    gb(st.tmp_bytes),
                    st.stale_tmp_files
                );
            }
        }
        StoreCmd::Prune(a) => {
            let dir = a.store.clone().unwrap_or_else(DiskStore::default_dir);
            let cap = match a.store_max_gb {
                Some(0.0) => 0,
                g => store_cap(g)?,
            };
            let st = DiskStore::inspect(&dir)
                .prune(cap)
                .with_context(|| format!("cannot prune the document store {}", dir.display()))?;
            if a.json {
                let v = serde_json::json!({
                    "dir": dir,
                    "cap_bytes": cap,
                    "removed_entries": st.removed_entries,
                    "removed_corrupt": st.removed_corrupt,
                    "removed_tmp": st.removed_tmp,
                    "freed_bytes": st.freed_bytes,
                    "remaining_bytes": st.remaining_bytes,
                    "skipped_busy": st.skipped_busy,
                });
                println!("{v}");
            } else if st.skipped_busy {
                println!(
                    "another process is pruning {} now; nothing done",
                    dir.display()
                );
            } else {
                println!(
                    "{}: removed {} entries, {} corrupt and {} temp files ({:.3} GB); {:.3} GB \
                     left (cap {:.3} GB)",
                    dir.display(),
                    st.removed_entries,
                    st.removed_corrupt,
                    st.removed_tmp,
                    st.freed_bytes as f64 / 1e9,
                    st.remaining_bytes as f64 / 1e9,
                    cap as f64 / 1e9
                );
            }
        }
        StoreCmd::Push(a) => push(a)?,
        StoreCmd::Convert(a) => convert(a)?,
    }
    Ok(())
}

fn push(a: &StorePushArgs) -> Result<()> {
    let dir = a.store.clone().unwrap_or_else(DiskStore::default_dir);
    if !dir.is_dir() {
        anyhow::bail!("no document store at {}", dir.display());
    }
    if !RedisStore::is_url(&a.to) {
        anyhow::bail!("--to must be a redis:// URL, got {:?}", a.to);
    }
    let hours = a.store_ttl_hours.unwrap_or(168.0);
    if !(hours.is_finite() && hours >= 0.0) {
        anyhow::bail!("--store-ttl-hours must be 0 or more, got {hours}");
    }
    let shared = RedisStore::open(&a.to, Duration::from_secs_f64(hours * 3600.0))?;
    shared.ping()?;
    let pb = entries_bar("pushing", a.json);
    let st = push_store(&DiskStore::inspect(&dir), &shared, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })
    .with_context(|| format!("pushing {} to {}", dir.display(), a.to))?;
    pb.finish_and_clear();
    if a.json {
        let v = serde_json::json!({"dir": dir, "to": a.to, "pushed": st.pushed,
            "pushed_bytes": st.pushed_bytes, "skipped": st.skipped});
        println!("{v}");
    } else {
        println!(
            "{} -> {}: pushed {} entries ({:.3} GB), skipped {}",
            dir.display(),
            a.to,
            st.pushed,
            st.pushed_bytes as f64 / 1e9,
            st.skipped
        );
    }
    Ok(())
}

fn convert(a: &StoreConvertArgs) -> Result<()> {
    let dir = a.store.clone().unwrap_or_else(DiskStore::default_dir);
    if !dir.is_dir() {
        anyhow::bail!("no document store at {}", dir.display());
    }
    let pb = entries_bar("converting", a.json);
    let st = kvlink::kv::convert::convert_store(&DiskStore::inspect(&dir), a.to, &mut |d, n| {
        pb.set_length(n as u64);
        pb.set_position(d as u64);
    })
    .with_context(|| format!("converting {} to {}", dir.display(), a.to))?;
    pb.finish_and_clear();
    if a.json {
        let mut v = serde_json::to_value(&st)?;
        v["dir"] = serde_json::json!(dir);
        v["to"] = serde_json::json!(a.to.to_string());
        println!("{v}");
    } else {
        println!(
            "{}: {} entries rewritten as {} ({:.3} GB -> {:.3} GB), {} already {}, {} kept as \
             f16 (not q8-representable), {} skipped",
            dir.display(),
            st.converted,
            a.to,
            st.bytes_before as f64 / 1e9,
            st.bytes_after as f64 / 1e9,
            st.unchanged,
            a.to,
            st.kept_f16,
            st.skipped
        );
    }
    Ok(())
}

/// A progress bar over a store's entries (hidden for `--json`).
fn entries_bar(verb: &str, hidden: bool) -> ProgressBar {
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{verb} [{{bar:25}}] {{pos}}/{{len}} ({{elapsed}}, eta {{eta}})"
        ))
        .expect("valid template"),
    );
    if hidden {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    pb
}
