//! `kvlink train-data`: tokenized KVLink training samples for `train/` (the trainer).

use super::{open_source, ModelArgs};
use anyhow::{bail, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kvlink::eval::squad;
use kvlink::train_data::{self, sources, Builder, Component, Sources};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct TrainDataArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output samples file (safetensors; see train/README.md). A `.kvlink.json` with the
    /// link configuration is written beside it.
    #[arg(long)]
    pub out: PathBuf,
    /// Token budget over all components.
    #[arg(long, default_value_t = 20_000_000)]
    pub tokens: usize,
    /// Mixture: component=weight, comma-separated (shares of the token budget).
    #[arg(long, default_value = train_data::DEFAULT_MIX)]
    pub mix: String,
    /// Longest sample in tokens (longer QA/SFT samples are skipped, texts are cut).
    #[arg(long, default_value_t = 2048)]
    pub max_len: usize,
    /// Link tokens per document slot.
    #[arg(long, default_value_t = 5)]
    pub link_tokens: usize,
    /// Document slots with their own link tokens (the most documents a prompt may have).
    #[arg(long, default_value_t = 40)]
    pub slots: usize,
    /// Seed of every random choice (sample order, text cuts).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// How often each QA record may be drawn (qa_mem, qa): after the first time, with its
    /// documents in a new random order each time. 1 (default): each record once.
    #[arg(long, default_value_t = 1)]
    pub qa_passes: usize,
    /// Data folder holding hotpotqa.json, squad-v2-dev.json, sharegpt.jsonl, wiki.utf8,
    /// paul-graham-essays.json (scripts/fetch-train-data.sh). Default: <cache dir>/data.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Most conversations read from sharegpt.jsonl.
    #[arg(long, default_value_t = 40_000)]
    pub max_conversations: usize,
}

fn need(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if !p.is_file() {
        bail!(
            "training data file {} not found: run scripts/fetch-train-data.sh (or pass --data)",
            p.display()
        );
    }
    Ok(p)
}

pub fn train_data(a: &TrainDataArgs) -> Result<()> {
    let mix = train_data::parse_mix(&a.mix)?;
    if a.tokens == 0 {
        bail!("--tokens must be at least 1");
    }
    if a.max_len < 64 {
        bail!("--max-len must be at least 64");
    }
    if a.qa_passes == 0 {
        bail!("--qa-passes must be at least 1");
    }
    if a.slots == 0 || a.slots > 255 {
        bail!("--slots must be between 1 and 255");
    }
    let dir = a
        .data
        .clone()
        .unwrap_or_else(|| kvlink::model::paths::cache_dir().join("data"));
    let uses = |c: &[Component]| mix.iter().any(|(x, w)| c.contains(x) && *w > 0.0);
    let qa = if uses(&[Component::QaMem, Component::Qa]) {
        sources::qa_pool(
            &need(&dir, "hotpotqa.json")?,
            &need(&dir, "squad-v2-dev.json")?,
        )?
    } else {
        Vec::new()
    };
    let conversations = if uses(&[Component::SftMem, Component::Sft]) {
        sources::conversations(&need(&dir, "sharegpt.jsonl")?, a.max_conversations)?
    } else {
        Vec::new()
    };
    let mut texts = Vec::new();
    if uses(&[Component::TextMem, Component::Text]) {
        for f in ["wiki.utf8", "paul-graham-essays.json"] {
            texts.extend(sources::texts(&need(&dir, f)?, 1000, 12_000)?);
        }
    }
    eprintln!(
        "sources: {} QA questions (HotpotQA from question {} on, minus paragraphs of 0-{}; \
         SQuAD without its {} held-out articles), {} conversations, {} texts",
        qa.len(),
        sources::HOTPOT_VALIDATION,
        sources::HOTPOT_VALIDATION - 1,
        squad::HELD_OUT,
        conversations.len(),
        texts.len()
    );
    let src = open_source(&a.model)?;
    let tok = src.tokenizer()?;
    let base_vocab = src.config().vocab_size;
    let link = train_data::extra_token_link(base_vocab, a.link_tokens, a.slots);
    let b = Builder {
        tok: &tok,
        link: link.clone(),
        max_len: a.max_len,
    };
    let pb = ProgressBar::new(a.tokens as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "samples [{bar:30}] {pos}/{len} tokens ({elapsed}, eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let (samples, stats) = train_data::build(
        &b,
        &Sources {
            qa,
            conversations,
            texts,
        },
        &mix,
        train_data::Draw {
            budget: a.tokens,
            seed: a.seed,
            qa_passes: a.qa_passes,
        },
        &mut |done, _| pb.set_position(done as u64),
    )?;
    pb.finish_and_clear();
    if samples.is_empty() {
        bail!("no samples were built");
    }
    let kvlink_json = serde_json::json!({
        "k": link.k,
        "link_base": link.link_base,
        "kv_start": link.kv_start,
        "kv_end": link.kv_end,
        "max_slots": link.max_slots,
        "base_vocab": base_vocab,
        "extra_tokens": train_data::extra_tokens(&link),
    })
    .to_string();
    // The command line and the build: enough to make the same file again from the
    // same data (every random choice follows --seed).
    let recipe = serde_json::json!({
        "kvlink": env!("CARGO_PKG_VERSION"),
        "args": std::env::args().skip(1).collect::<Vec<_>>(),
        "samples": samples.len(),
        "tokens": samples.iter().map(|s| s.len()).sum::<usize>(),
    })
    .to_string();
    train_data::write(&a.out, &samples, base_vocab, &kvlink_json, &recipe)?;
    std::fs::write(a.out.with_extension("kvlink.json"), &kvlink_json)?;
    println!(
        "{:<9} {:>8} {:>11} {:>13} {:>9}",
        "component", "samples", "tokens", "target tokens", "mean len"
    );
    for (c, n, t, g) in &stats.per_component {
        println!(
            "{:<9} {:>8} {:>11} {:>13} {:>9.0}",
            c.name(),
            n,
            t,
            g,
            *t as f64 / (*n).max(1) as f64
        );
    }
    let total: usize = samples.iter().map(|s| s.len()).sum();
    println!(
        "{} samples, {} tokens -> {} (model {}, base vocabulary {base_vocab}, {} extra token \
         ids)",
        samples.len(),
        total,
        a.out.display(),
        src.describe(),
        train_data::extra_tokens(&link)
    );
    Ok(())
}
