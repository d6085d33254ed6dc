//! Evaluation: does reuse keep the answers right? (EVAL.md)
//!
//! - [`hotpotqa`]: the HotpotQA reader and the paper's prompt layout.
//! - [`score`]: the paper's "best subspan EM".
//! - [`perplexity`]: plain vs KVLink-chunked perplexity.
//! - this module: running a question in several modes (greedy), fidelity against `full`
//!   (first-token KL divergence and agreement, identical answers), the resumable JSONL
//!   results file and the per-mode summary.

pub mod compare;
pub mod hotpotqa;
pub mod perplexity;
pub mod score;
pub mod squad;

use crate::engine::{CacheSource, StartOptions, Started};
use crate::error::{Error, Result};
use crate::link::{Mode, Timings};
use crate::model::llama::{Batch, Logits};
use crate::{Engine, Request};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

pub use hotpotqa::HotpotRecord;

/// A greedy answer with its first-token distribution.
#[derive(Clone, Debug)]
pub struct Answer {
    /// Generated token ids, including a final stop token if generation stopped on one.
    pub tokens: Vec<u32>,
    /// The decoded answer (stop token excluded), trimmed.
    pub text: String,
    /// Next-token logits after the prompt (`[vocab]`).
    pub first_logits: Vec<f32>,
    pub timings: Timings,
}

/// Answer `req` greedily with at most `max_new_tokens` tokens, stopping at the model's
/// stop tokens. One prefill per call: the first token's logits are read back from the
/// same pass that picks the first token (the TTFT includes that read-back, in every
/// mode alike), then decoding goes on as `Engine::generate` does.
pub fn greedy_answer(engine: &Engine, req: &Request, max_new_tokens: usize) -> Result<Answer> {
    if max_new_tokens == 0 {
        return Err(Error::Input("max new tokens must be at least 1".into()));
    }
    let o = StartOptions {
        extra: max_new_tokens,
        logits: true,
        greedy: true,
    };
    let Started {
        plan,
        mut cache,
        out,
        timings,
    } = engine.start_request(req, o)?;
    let mut next = out
        .token
        .ok_or_else(|| Error::Gpu("prefill returned no greedy token".into()))?;
    let mut pos = plan.len();
    let mut tokens = Vec::new();
    loop {
        tokens.push(next);
        if engine.tokenizer().is_stop(next)
            || tokens.len() >= max_new_tokens
            || pos >= cache.capacity
        {
            break;
        }
        let batch = Batch {
            tokens: &[next],
            positions: &[pos as i32],
            slots: &[pos as u32],
        };
        let o = engine
            .model()
            .forward(&mut cache, &batch, Logits::None, true)?;
        next = o
            .token
            .ok_or_else(|| Error::Gpu("decode returned no greedy token".into()))?;
        pos += 1;
    }
    let body: Vec<u32> = tokens
        .iter()
        .copied()
        .filter(|&t| !engine.tokenizer().is_stop(t))
        .collect();
    let text = engine.tokenizer().decode(&body)?.trim().to_string();
    Ok(Answer {
        tokens,
        text,
        first_logits: out.logits,
        timings,
    })
}

/// KL(P || Q) of the softmax distributions of two logit vectors, in nats, computed in f64.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    assert_eq!(
        p_logits.len(),
        q_logits.len(),
        "logit vectors differ in length"
    );
    let lp = log_softmax_f64(p_logits);
    let lq = log_softmax_f64(q_logits);
    lp.iter()
        .zip(&lq)
        .map(|(&a, &b)| {
            if a == f64::NEG_INFINITY {
                0.0
            } else {
                a.exp() * (a - b)
            }
        })
        .sum::<f64>()
        .max(0.0)
}

/// log softmax in f64.
pub fn log_softmax_f64(x: &[f32]) -> Vec<f64> {
    let m = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let z: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
    let lz = z.ln() + m;
    x.iter().map(|&v| v as f64 - lz).collect()
}

fn argmax(x: &[f32]) -> u32 {
    crate::sampling::argmax(x)
}

/// One question answered in one mode: a line of the results file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct QaRecord {
    pub id: String,
    /// Index of the question in the data file.
    pub index: usize,
    pub mode: String,
    pub prediction: String,
    pub gold: String,
    /// Best subspan EM: 1 or 0.
    pub score: f64,
    pub ttft_ms: f64,
    pub prompt_tokens: usize,
    /// Document tokens whose cache was reused (0 in `full`).
    pub cached_doc_tokens: usize,
    /// Document tokens encoded for this request (0 in `full`, where no document is
    /// cached: the whole prompt is prefilled, see `prompt_tokens`).
    pub computed_doc_tokens: usize,
    pub generated_tokens: usize,
    /// Greedy first token id.
    pub first_token: u32,
    /// KL(full || this mode) of the first-token distributions, nats (None for `full`).
    pub kl_vs_full: Option<f64>,
    /// First token equals the `full` mode's (None for `full`).
    pub first_token_agree: Option<bool>,
    /// The whole greedy answer equals the `full` mode's (None for `full`).
    pub answer_identical: Option<bool>,
    /// The documents (1-based) holding the gold paragraphs, where the data says
    /// ([`hotpotqa::HotpotRecord::gold_documents`]): for where-in-the-context analyses
    /// (`scripts/edge-gap.py`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gold_docs: Vec<usize>,
    /// Documents in the prompt (0 in records written before it was kept).
    #[serde(default)]
    pub documents: usize,
}

impl QaRecord {
    pub fn key(&self) -> (String, String) {
        (self.id.clone(), self.mode.clone())
    }
}

/// How to run the QA evaluation.
#[derive(Clone, Debug)]
pub struct QaOptions {
    pub modes: Vec<Mode>,
    pub max_new_tokens: usize,
    /// Encode the question's document caches before the timed requests, so `kvlink` and
    /// `naive` TTFT measure reuse of precomputed caches (as in the paper). Without it,
    /// the first reusing mode also pays for encoding the documents it did not find.
    pub warm_docs: bool,
    /// With `warm_docs`: once the question's documents are encoded (and written to the
    /// engine's store), drop every GPU-resident cache so that the reusing modes take
    /// them back from the store, as a later request would: measures what the store's
    /// format (e.g. q8, [`crate::kv::KvFormat`]) costs in accuracy. Needs a store.
    pub docs_from_store: bool,
}

impl Default for QaOptions {
    fn default() -> Self {
        QaOptions {
            modes: vec![Mode::Full, Mode::Kvlink, Mode::Naive],
            max_new_tokens: 200,
            warm_docs: true,
            docs_from_store: false,
        }
    }
}

/// Parse "full,kvlink,naive".
pub fn parse_modes(s: &str) -> Result<Vec<Mode>> {
    let mut out: Vec<Mode> = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let m: Mode = p.parse()?;
        if !out.contains(&m) {
            out.push(m);
        }
    }
    if out.is_empty() {
        return Err(Error::Input(
            "no modes given (e.g. --modes full,kvlink,naive)".into(),
        ));
    }
    Ok(out)
}

/// Run one question in every mode of `opts` not in `done` (keys `(id, mode)`), `full`
/// first. Fidelity fields compare each mode with `full`; when `full` itself is already
/// done (`prior_full`, its record from an earlier run), its first-token distribution is
/// recomputed (one extra prefill) and its answer taken from the record.
pub fn run_question(
    engine: &Engine,
    rec: &HotpotRecord,
    index: usize,
    opts: &QaOptions,
    done: &HashSet<(String, String)>,
    prior_full: Option<&QaRecord>,
) -> Result<Vec<QaRecord>> {
    let todo: Vec<Mode> = opts
        .modes
        .iter()
        .copied()
        .filter(|m| !done.contains(&(rec.id.clone(), m.to_string())))
        .collect();
    if todo.is_empty() {
        return Ok(Vec::new());
    }
    let want_full = opts.modes.contains(&Mode::Full);
    // `full` first, so every other mode can be compared with it.
    let mut order: Vec<Mode> = todo.iter().copied().filter(|m| *m == Mode::Full).collect();
    order.extend(todo.iter().copied().filter(|m| *m != Mode::Full));
    let mut full: Option<(Vec<f32>, Vec<u32>, String)> = None;
    if want_full && !todo.contains(&Mode::Full) {
        if let Some(pf) = prior_full {
            let (_, logits, _) = engine.request_logits(&rec.request(Mode::Full))?;
            full = Some((logits, Vec::new(), pf.prediction.clone()));
        }
    }
    if opts.warm_docs
        && order
            .iter()
            .any(|m| matches!(m, Mode::Kvlink | Mode::Naive))
    {
        let plan = engine.plan(&rec.request(Mode::Kvlink))?;
        let docs: Vec<&[u32]> = (0..plan.docs.len()).map(|j| plan.doc_tokens(j)).collect();
        engine.doc_caches(&docs)?;
        if opts.docs_from_store {
            engine.clear_doc_caches();
            let (_, from) = engine.doc_caches(&docs)?;
            if let Some(j) = from.iter().position(|&f| f != CacheSource::Disk) {
                return Err(Error::Input(format!(
                    "document {} of question {index} came from {:?}, not from the store \
                     (is the store set and writable?)",
                    j + 1,
                    from[j]
                )));
            }
        }
    }
    let mut out = Vec::with_capacity(order.len());
    for mode in order {
        let a = greedy_answer(engine, &rec.request(mode), opts.max_new_tokens)?;
        let first = a.tokens[0];
        let mut r = QaRecord {
            id: rec.id.clone(),
            index,
            mode: mode.to_string(),
            score: score::best_subspan_em(&a.text, &rec.golds()),
            prediction: a.text.clone(),
            gold: rec.answer.clone(),
            ttft_ms: a.timings.ttft.as_secs_f64() * 1e3,
            prompt_tokens: a.timings.prompt_tokens,
            cached_doc_tokens: a.timings.cached_doc_tokens,
            computed_doc_tokens: a.timings.computed_doc_tokens,
            generated_tokens: a.tokens.len(),
            first_token: first,
            kl_vs_full: None,
            first_token_agree: None,
            answer_identical: None,
            gold_docs: rec.gold_documents(),
            documents: rec.context.len(),
        };
        if mode == Mode::Full {
            full = Some((a.first_logits, a.tokens, a.text));
        } else if let Some((fl, ftoks, ftext)) = &full {
            r.kl_vs_full = Some(kl_divergence(fl, &a.first_logits));
            r.first_token_agree = Some(argmax(fl) == first);
            r.answer_identical = Some(if ftoks.is_empty() {
                *ftext == a.text
            } else {
                *ftoks == a.tokens
            });
        }
        out.push(r);
    }
    Ok(out)
}

/// The JSONL results file: one [`QaRecord`] per line, appended to; existing lines mark
/// (id, mode) pairs as done.
pub struct ResultsFile {
    pub path: PathBuf,
    /// Records already in the file, by (id, mode); the last line wins for a repeated key.
    pub records: RecordMap,
}

/// Eval records by (question id, mode).
pub type RecordMap = HashMap<(String, String), QaRecord>;

/// The records of a results file's text by (id, mode), the last line winning for a
/// repeated key, and the length of the text they fill: a truncated last line (an
/// interrupted write) is left out; any other line that is not a record is an error.
pub(crate) fn parse_records(path: &Path, text: &str) -> Result<(RecordMap, usize)> {
    let mut records = HashMap::new();
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut valid_len = 0usize;
    for (i, line) in lines.iter().enumerate() {
        let last = i + 1 == lines.len();
        if line.trim().is_empty() {
            valid_len += line.len() + 1;
            continue;
        }
        match serde_json::from_str::<QaRecord>(line) {
            Ok(r) => {
                records.insert(r.key(), r);
                valid_len += line.len() + 1;
            }
            Err(_) if last && !complete => break,
            Err(e) => {
                return Err(Error::Input(format!(
                    "{}: line {} is not an eval record: {e}",
                    path.display(),
                    i + 1
                )))
            }
        }
    }
    Ok((records, valid_len))
}

impl ResultsFile {
    /// Open (or start) a results file. A line that is not a record gives an error naming
    /// the line, except a truncated last line (an interrupted write), which is ignored
    /// and overwritten by the next append.
    pub fn open(path: &Path) -> Result<ResultsFile> {
        let mut records = HashMap::new();
        if path.exists() {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let complete = text.ends_with('\n');
            let valid_len;
            (records, valid_len) = parse_records(path, &text)?;
            if !complete && valid_len < text.len() {
                // Drop the partial last line so the next append starts on a fresh line.
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| Error::io(path, e))?;
                f.set_len(valid_len.min(text.len()) as u64)
                    .map_err(|e| Error::io(path, e))?;
            }
        }
        Ok(ResultsFile {
            path: path.to_path_buf(),
            records,
        })
    }

    pub fn done(&self) -> HashSet<(String, String)> {
        self.records.keys().cloned().collect()
    }

    /// Append records (one line each) and flush, then remember them.
    pub fn append(&mut self, recs: &[QaRecord]) -> Result<()> {
        if recs.is_empty() {
            return Ok(());
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let mut buf = String::new();
        for r in recs {
            buf.push_str(&serde_json::to_string(r).expect("record serializes"));
            buf.push('\n');
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        f.write_all(buf.as_bytes())
            .and_then(|_| f.flush())
            .map_err(|e| Error::io(&self.path, e))?;
        for r in recs {
            self.records.insert(r.key(), r.clone());
        }
        Ok(())
    }
}

/// Per-mode summary of QA records.
#[derive(Clone, Debug, Serialize)]
pub struct ModeSummary {
    pub mode: String,
    pub questions: usize,
    /// Mean best subspan EM.
    pub em: f64,
    /// Mean KL(full || mode) of the first-token distributions (None for `full` or
    /// without `full`).
    pub mean_kl: Option<f64>,
    pub first_token_agreement: Option<f64>,
    pub identical_answer_rate: Option<f64>,
    pub median_ttft_ms: f64,
    pub mean_ttft_ms: f64,
    pub mean_prompt_tokens: f64,
    pub mean_cached_doc_tokens: f64,
    pub mean_computed_doc_tokens: f64,
}

/// Summarise `records` per mode, in the order of `modes`.
pub fn summarize<'a>(
    records: impl IntoIterator<Item = &'a QaRecord>,
    modes: &[Mode],
) -> Vec<ModeSummary> {
    let mut by: HashMap<String, Vec<&QaRecord>> = HashMap::new();
    for r in records {
        by.entry(r.mode.clone()).or_default().push(r);
    }
    let mean = |v: &[f64]| {
        if v.is_empty() {
            None
        } else {
            Some(v.iter().sum::<f64>() / v.len() as f64)
        }
    };
    modes
        .iter()
        .map(|m| {
            let name = m.to_string();
            let rs = by.get(&name).cloned().unwrap_or_default();
            let f = |g: &dyn Fn(&QaRecord) -> f64| rs.iter().map(|r| g(r)).collect::<Vec<f64>>();
            let opt = |g: &dyn Fn(&QaRecord) -> Option<f64>| {
                mean(&rs.iter().filter_map(|r| g(r)).collect::<Vec<f64>>())
            };
            let mut ttft = f(&|r| r.ttft_ms);
            ttft.sort_by(|a, b| a.total_cmp(b));
            let median = if ttft.is_empty() {
                0.0
            } else if ttft.len() % 2 == 1 {
                ttft[ttft.len() / 2]
            } else {
                (ttft[ttft.len() / 2 - 1] + ttft[ttft.len() / 2]) / 2.0
            };
            let b = |x: Option<bool>| x.map(|v| if v { 1.0 } else { 0.0 });
            ModeSummary {
                mode: name,
                questions: rs.len(),
                em: mean(&f(&|r| r.score)).unwrap_or(0.0),
                mean_kl: opt(&|r| r.kl_vs_full),
                first_token_agreement: opt(&|r| b(r.first_token_agree)),
                identical_answer_rate: opt(&|r| b(r.answer_identical)),
                median_ttft_ms: median,
                mean_ttft_ms: mean(&ttft).unwrap_or(0.0),
                mean_prompt_tokens: mean(&f(&|r| r.prompt_tokens as f64)).unwrap_or(0.0),
                mean_cached_doc_tokens: mean(&f(&|r| r.cached_doc_tokens as f64)).unwrap_or(0.0),
                mean_computed_doc_tokens: mean(&f(&|r| r.computed_doc_tokens as f64))
                    .unwrap_or(0.0),
            }
        })
        .collect()
}
