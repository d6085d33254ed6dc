//! Evaluation subcommands: `eval hotpotqa` and `perplexity` (EVAL.md).

use super::{load_engine_from, ModelArgs};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kvlink::eval::{
    self, hotpotqa, perplexity, squad, HotpotRecord, QaOptions, QaRecord, ResultsFile,
};
use kvlink::gpu::AdapterChoice;
use kvlink::link::Mode;
use std::collections::HashSet;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum EvalCmd {
    /// HotpotQA (dev, distractor): best subspan EM per mode, fidelity vs full (first-token
    /// KL and agreement, identical answers), TTFT. Data: scripts/fetch-eval-data.sh.
    Hotpotqa(HotpotArgs),
    /// SQuAD v2 dev, held-out articles: each answerable question with its gold paragraph
    /// and nine other paragraphs of its article as ten documents (EVAL.md); same modes,
    /// metrics and options as `hotpotqa`. Data: scripts/fetch-train-data.sh.
    Squad(HotpotArgs),
    /// Compare records files (`--out` of the above) on the questions they share: EM per
    /// mode, what reuse costs (full - kvlink) with its standard error, first-token
    /// agreement, and each file minus the first, paired over questions. No GPU.
    Compare(CompareArgs),
}

#[derive(Args)]
pub struct CompareArgs {
    /// Records files; the first is the reference of the paired table.
    #[arg(required = true, value_name = "RECORDS.jsonl")]
    pub files: Vec<PathBuf>,
    /// Names for the files in the tables, comma-separated, in order (default: file stems).
    #[arg(long, value_delimiter = ',')]
    pub names: Vec<String>,
    /// Print the comparison as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct HotpotArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Data file. hotpotqa: the official hotpot_dev_distractor format, default
    /// <cache dir>/data/hotpotqa.json (scripts/fetch-eval-data.sh); squad: SQuAD v2 dev
    /// JSON, default <cache dir>/data/squad-v2-dev.json (scripts/fetch-train-data.sh).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Modes to run on every question (comma-separated): full, kvlink, naive, masked.
    #[arg(long, default_value = "full,kvlink,naive")]
    pub modes: String,
    /// Number of questions (default: all after --offset).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Skip this many questions first.
    #[arg(long, default_value_t = 0)]
    pub offset: usize,
    /// Greedy decoding stops after this many new tokens (or at end of turn).
    #[arg(long, default_value_t = 200)]
    pub max_new_tokens: usize,
    /// Append one JSON record per question x mode here; question x mode pairs already in
    /// the file are skipped (resume), and the summary covers them too.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Do not precompute the documents' caches before the timed requests: the first
    /// reusing mode's TTFT then includes encoding them.
    #[arg(long)]
    pub cold: bool,
    /// Take the documents' caches from a disk store in this format (f16 or q8), as a
    /// later request would, not from the GPU where they were just encoded: what the
    /// store's format costs in accuracy. Uses a temporary store, removed at the end.
    #[arg(long, value_name = "f16|q8", value_parser = super::rag::parse_store_format)]
    pub store_format: Option<kvlink::kv::KvFormat>,
}

pub fn eval(adapter: &AdapterChoice, cmd: &EvalCmd) -> Result<()> {
    match cmd {
        EvalCmd::Hotpotqa(a) => {
            let path = data_path(a, hotpotqa::default_path(), "fetch-eval-data.sh")?;
            let all = hotpotqa::load(&path)?;
            qa(adapter, a, "HotpotQA", &path, &all)
        }
        EvalCmd::Squad(a) => {
            let path = data_path(a, squad::default_path(), "fetch-train-data.sh")?;
            let all = squad::records(&squad::load(&path)?, squad::Part::Test);
            qa(adapter, a, "SQuAD held-out", &path, &all)
        }
        EvalCmd::Compare(a) => compare(a),
    }
}

fn compare(a: &CompareArgs) -> Result<()> {
    use kvlink::eval::compare::{self, Records};
    if !a.names.is_empty() && a.names.len() != a.files.len() {
        bail!(
            "--names: {} names for {} files",
            a.names.len(),
            a.files.len()
        );
    }
    let files = a
        .files
        .iter()
        .enumerate()
        .map(|(i, p)| Records::load(p, a.names.get(i).map(String::as_str)))
        .collect::<kvlink::Result<Vec<_>>>()?;
    let (md, json) = compare::compare(&files);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{md}");
    }
    Ok(())
}

fn data_path(a: &HotpotArgs, default: PathBuf, script: &str) -> Result<PathBuf> {
    let path = a.data.clone().unwrap_or(default);
    if !path.exists() {
        bail!(
            "data not found at {}: run scripts/{script} (or pass --data)",
            path.display()
        );
    }
    Ok(path)
}

/// Run the QA evaluation over `all` (the selected slice of it) and print the summary.
fn qa(
    adapter: &AdapterChoice,
    a: &HotpotArgs,
    task: &str,
    path: &std::path::Path,
    all: &[HotpotRecord],
) -> Result<()> {
    let modes = eval::parse_modes(&a.modes)?;
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    if a.offset >= all.len() {
        bail!(
            "--offset {} is past the end of {} ({} questions)",
            a.offset,
            path.display(),
            all.len()
        );
    }
    let end = a
        .limit
        .map(|l| (a.offset + l).min(all.len()))
        .unwrap_or(all.len());
    let slice = &all[a.offset..end];
    let mut results = match &a.out {
        Some(p) => Some(ResultsFile::open(p)?),
        None => None,
    };
    let done = results.as_ref().map(|r| r.done()).unwrap_or_default();
    if a.cold && a.store_format.is_some() {
        bail!("--cold and --store-format: documents taken from a store are not cold");
    }
    let engine = load_engine_from(adapter, &a.model)?;
    let _store = match a.store_format {
        Some(f) => Some(TempStore::set(&engine, f)?),
        None => None,
    };
    let opts = QaOptions {
        modes: modes.clone(),
        max_new_tokens: a.max_new_tokens,
        warm_docs: !a.cold,
        docs_from_store: a.store_format.is_some(),
    };
    let mut session: Vec<QaRecord> = Vec::new();
    let pb = ProgressBar::new(slice.len() as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:25}] {pos}/{len} ({elapsed}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let skipped_before = slice
        .iter()
        .filter(|r| {
            modes
                .iter()
                .all(|m| done.contains(&(r.id.clone(), m.to_string())))
        })
        .count();
    let running = |recs: &[&QaRecord]| {
        let s = eval::summarize(recs.iter().copied(), &modes);
        s.iter()
            .map(|m| format!("{} {:.3}", m.mode, m.em))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let in_slice: HashSet<&str> = slice.iter().map(|r| r.id.as_str()).collect();
    let prior = |results: &Option<ResultsFile>| -> Vec<QaRecord> {
        results
            .as_ref()
            .map(|r| {
                r.records
                    .values()
                    .filter(|x| in_slice.contains(x.id.as_str()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    };
    pb.set_message(format!(
        "EM {}",
        running(&prior(&results).iter().collect::<Vec<_>>())
    ));
    for (k, rec) in slice.iter().enumerate() {
        let index = a.offset + k;
        let prior_full = results.as_ref().and_then(|r| {
            r.records
                .get(&(rec.id.clone(), Mode::Full.to_string()))
                .cloned()
        });
        let recs = eval::run_question(&engine, rec, index, &opts, &done, prior_full.as_ref())
            .with_context(|| format!("question {index} (_id {})", rec.id))?;
        if let Some(r) = results.as_mut() {
            r.append(&recs)?;
        }
        session.extend(recs);
        pb.inc(1);
        let mut view = prior(&results);
        if results.is_none() {
            view = session.clone();
        }
        pb.set_message(format!("EM {}", running(&view.iter().collect::<Vec<_>>())));
    }
    pb.finish_and_clear();
    let view: Vec<QaRecord> = if results.is_some() {
        prior(&results)
    } else {
        session.clone()
    };
    let view: Vec<QaRecord> = view
        .into_iter()
        .filter(|r| modes.iter().any(|m| m.to_string() == r.mode))
        .collect();
    let summary = eval::summarize(&view, &modes);
    let adapter_name = engine.gpu().report.name.clone();
    if a.json {
        let v = serde_json::json!({
            "task": task,
            "dataset": path.display().to_string(),
            "model": engine.description(),
            "adapter": adapter_name,
            "offset": a.offset,
            "questions": slice.len(),
            "skipped_already_done": skipped_before,
            "max_new_tokens": a.max_new_tokens,
            "warm_docs": !a.cold,
            "store_format": a.store_format.map(|f| f.to_string()),
            "modes": summary,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{task} {} questions [{}..{}) of {} | {} | {} | max {} new tokens{}",
            slice.len(),
            a.offset,
            end,
            path.display(),
            engine.description(),
            adapter_name,
            a.max_new_tokens,
            if skipped_before > 0 {
                format!(" | {skipped_before} questions already in --out")
            } else {
                String::new()
            }
        );
        print_summary(&summary);
    }
    Ok(())
}

fn opt(x: Option<f64>, prec: usize) -> String {
    x.map(|v| format!("{v:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

fn print_summary(s: &[eval::ModeSummary]) {
    println!(
        "{:<8} {:>5} {:>7} {:>10} {:>9} {:>9} {:>12} {:>9} {:>9}",
        "mode", "n", "EM", "KL(full)", "1st-tok", "same-ans", "TTFT med ms", "prompt", "cached"
    );
    for m in s {
        println!(
            "{:<8} {:>5} {:>7.3} {:>10} {:>9} {:>9} {:>12.1} {:>9.0} {:>9.0}",
            m.mode,
            m.questions,
            m.em,
            opt(m.mean_kl, 4),
            opt(m.first_token_agreement, 3),
            opt(m.identical_answer_rate, 3),
            m.median_ttft_ms,
            m.mean_prompt_tokens,
            m.mean_cached_doc_tokens,
        );
    }
}

#[derive(Args)]
pub struct PerplexityArgs {
    /// Model: a .gguf file or an HF folder. Default: SmolLM2-135M-Instruct from the cache.
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
    /// A LoRA adapter folder merged into the model (see `kvlink generate --help`).
    #[arg(long, env = "KVLINK_LORA")]
    pub lora: Option<PathBuf>,
    /// Text file (WikiExtractor <doc ...> lines are dropped). Default:
    /// <cache dir>/data/wiki.utf8 (scripts/fetch-eval-data.sh).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Window length in tokens (non-overlapping windows).
    #[arg(long, default_value_t = 1024)]
    pub ctx: usize,
    /// KVLink layout: the first half of each window in C independently encoded chunks,
    /// the second half scored against them (compared with plain causal context).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Score at most this many windows (default: all).
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn perplexity(adapter: &AdapterChoice, a: &PerplexityArgs) -> Result<()> {
    if a.ctx < 4 {
        bail!("--ctx must be at least 4 tokens");
    }
    if let Some(c) = a.chunks {
        if c == 0 || c > a.ctx / 2 {
            bail!("--chunks must be between 1 and --ctx/2 ({})", a.ctx / 2);
        }
    }
    let path = a.text.clone().unwrap_or_else(|| {
        kvlink::model::paths::cache_dir()
            .join("data")
            .join("wiki.utf8")
    });
    if !path.exists() {
        bail!(
            "text file not found: {} (run scripts/fetch-eval-data.sh, or pass --text)",
            path.display()
        );
    }
    let text = perplexity::read_text(&path)?;
    let margs = ModelArgs {
        model: a.model.clone(),
        ctx: 0,
        lora: a.lora.clone(),
    };
    let engine = load_engine_from(adapter, &margs)?;
    let max_pos = engine.config().max_position_embeddings;
    if a.ctx > max_pos {
        bail!(
            "--ctx {} exceeds the model's maximum of {max_pos} positions",
            a.ctx
        );
    }
    let need = a
        .max_windows
        .map(|w| w.saturating_mul(a.ctx))
        .unwrap_or(usize::MAX);
    let ids = perplexity::tokenize(engine.tokenizer(), &text, need)?;
    let mut windows: Vec<&[u32]> = ids.chunks_exact(a.ctx).collect();
    if let Some(w) = a.max_windows {
        windows.truncate(w);
    }
    if windows.is_empty() {
        bail!(
            "{} has {} tokens, fewer than one window of --ctx {}",
            path.display(),
            ids.len(),
            a.ctx
        );
    }
    let pb = ProgressBar::new(windows.len() as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:25}] {pos}/{len} windows ({elapsed}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut plain = perplexity::Nll::default();
    let mut plain_tail = perplexity::Nll::default();
    let mut chunked = perplexity::Nll::default();
    for w in &windows {
        let r = perplexity::score_window(&engine, w, a.chunks)?;
        plain.add(r.plain);
        plain_tail.add(r.plain_tail);
        if let Some(c) = r.chunked {
            chunked.add(c);
        }
        engine.clear_doc_caches();
        pb.inc(1);
        pb.set_message(match a.chunks {
            Some(_) => format!(
                "ppl {:.3} | tail {:.3} vs chunked {:.3}",
                plain.perplexity(),
                plain_tail.perplexity(),
                chunked.perplexity()
            ),
            None => format!("ppl {:.3}", plain.perplexity()),
        });
    }
    pb.finish_and_clear();
    let increase = a
        .chunks
        .map(|_| chunked.perplexity() / plain_tail.perplexity() - 1.0);
    if a.json {
        let v = serde_json::json!({
            "text": path.display().to_string(),
            "model": engine.description(),
            "adapter": engine.gpu().report.name,
            "ctx": a.ctx,
            "windows": windows.len(),
            "chunks": a.chunks,
            "plain": nll_json(&plain),
            "plain_second_half": a.chunks.map(|_| nll_json(&plain_tail)),
            "chunked_second_half": a.chunks.map(|_| nll_json(&chunked)),
            "perplexity_increase": increase,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{} | {} | {} windows of {} tokens from {}",
        engine.description(),
        engine.gpu().report.name,
        windows.len(),
        a.ctx,
        path.display()
    );
    println!(
        "{:<34} {:>8} {:>10} {:>11}",
        "", "tokens", "mean NLL", "perplexity"
    );
    let row = |name: &str, n: &perplexity::Nll| {
        println!(
            "{name:<34} {:>8} {:>10.4} {:>11.3}",
            n.tokens,
            n.mean(),
            n.perplexity()
        )
    };
    row("plain (whole windows)", &plain);
    if let Some(c) = a.chunks {
        row("plain, second halves", &plain_tail);
        row(&format!("KVLink {c} chunks, second halves"), &chunked);
        println!(
            "perplexity increase from independent encoding: {:+.2}%",
            increase.unwrap_or(f64::NAN) * 100.0
        );
    }
    Ok(())
}

fn nll_json(n: &perplexity::Nll) -> serde_json::Value {
    serde_json::json!({"tokens": n.tokens, "mean_nll": n.mean(), "perplexity": n.perplexity()})
}

/// `eval --store-format`: a store of its own in a temporary directory, removed (and
/// unset) when dropped.
struct TempStore<'a> {
    engine: &'a kvlink::Engine,
    dir: PathBuf,
}

impl<'a> TempStore<'a> {
    fn set(engine: &'a kvlink::Engine, format: kvlink::kv::KvFormat) -> Result<TempStore<'a>> {
        let dir = std::env::temp_dir().join(format!("kvlink-eval-store-{}", std::process::id()));
        let store = kvlink::kv::DiskStore::open(dir.clone())
            .with_context(|| format!("cannot open a store in {}", dir.display()))?;
        engine.set_store(Some(store));
        engine.set_store_format(format);
        Ok(TempStore { engine, dir })
    }
}

impl Drop for TempStore<'_> {
    fn drop(&mut self) {
        self.engine.set_store(None);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
