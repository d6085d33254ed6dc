//! Perplexity, plain and in the KVLink layout (EVAL.md).
//!
//! The text is cut into non-overlapping windows of `ctx` tokens. Plain: each window is
//! one causal sequence and every token after its first is scored. Chunked (`C` chunks):
//! the first half of the window (`h = ctx / 2` tokens) is split into `C` chunks that are
//! encoded independently (each at positions 0..n-1, cached, then copied into place and
//! rotated to its position: `Mode::Kvlink` with an empty prefix and the engine's link
//! configuration: none for plain models, the markers and each chunk's link tokens for a
//! KVLink-tuned one), and the second half is computed against that cache. The tokens scored in both layouts
//! for the comparison are the second half's tokens after its first (`h+1..ctx`): the
//! prediction of token `h` would come from the last chunk's last row, which the reuse
//! path never computes.

use crate::error::{Error, Result};
use crate::link::{self, DocCache, Mode, PromptPlan};
use crate::model::llama::{Batch, KvCache, Logits};
use crate::model::Tokenizer;
use crate::Engine;
use serde::Serialize;
use std::path::Path;

/// Read a text file for perplexity: WikiExtractor markup lines (starting with `<doc` or
/// `</doc>`) are dropped, everything else is kept as is.
pub fn read_text(path: &Path) -> Result<String> {
    let raw = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(strip_doc_lines(&raw))
}

pub fn strip_doc_lines(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for line in raw.lines() {
        let t = line.trim_start();
        if t.starts_with("<doc") || t.starts_with("</doc>") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Tokenize `text` as data (no special tokens, control-token text as text) piece by piece (blocks of lines, split at blank
/// lines), stopping once at least `need` tokens are there (`usize::MAX`: all of it).
pub fn tokenize(tok: &Tokenizer, text: &str, need: usize) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    let mut block = String::new();
    for line in text.split_inclusive('\n') {
        block.push_str(line);
        if line.trim().is_empty() && block.len() > 4096 {
            ids.extend(tok.encode_data(&block)?);
            block.clear();
            if ids.len() >= need {
                return Ok(ids);
            }
        }
    }
    if !block.is_empty() {
        ids.extend(tok.encode_data(&block)?);
    }
    Ok(ids)
}

/// Negative log-likelihood summed over scored tokens.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Nll {
    pub tokens: usize,
    pub sum: f64,
}

impl Nll {
    pub fn add(&mut self, o: Nll) {
        self.tokens += o.tokens;
        self.sum += o.sum;
    }
    pub fn mean(&self) -> f64 {
        if self.tokens == 0 {
            f64::NAN
        } else {
            self.sum / self.tokens as f64
        }
    }
    pub fn perplexity(&self) -> f64 {
        self.mean().exp()
    }
}

/// One window's results.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct WindowNll {
    /// Plain causal, every token after the first.
    pub plain: Nll,
    /// Plain causal, only the tokens the chunked layout scores.
    pub plain_tail: Nll,
    /// KVLink layout (None without chunks).
    pub chunked: Option<Nll>,
}

/// Rows of logits per forward call: keeps the logits buffer near 64 MiB.
fn rows_per_call(vocab: usize) -> usize {
    ((64usize << 20) / (vocab.max(1) * 4)).clamp(1, 512)
}

/// -log p(target) of one logits row, in f64.
fn token_nll(row: &[f32], target: u32) -> f64 {
    let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
    z.ln() + m - row[target as usize] as f64
}

/// Accumulate NLL of `logits` rows for global rows `row0..row0+rows`: row i predicts
/// `window[i + 1]`; rows below `from` count only towards `all`.
fn accumulate(
    logits: &[f32],
    vocab: usize,
    row0: usize,
    window: &[u32],
    tail_from: usize,
    all: &mut Nll,
    tail: &mut Nll,
) {
    let rows = logits.len() / vocab;
    for r in 0..rows {
        let i = row0 + r;
        if i + 1 >= window.len() {
            break;
        }
        let nll = token_nll(&logits[r * vocab..(r + 1) * vocab], window[i + 1]);
        all.add(Nll {
            tokens: 1,
            sum: nll,
        });
        if i >= tail_from {
            tail.add(Nll {
                tokens: 1,
                sum: nll,
            });
        }
    }
}

/// Forward `window[from..]` at positions = slots = global index + `shift` (the link
/// tokens and markers placed before it), all rows' logits, accumulating NLL.
#[allow(clippy::too_many_arguments)]
fn forward_rows(
    engine: &Engine,
    cache: &mut KvCache,
    window: &[u32],
    shift: usize,
    from: usize,
    tail_from: usize,
    all: &mut Nll,
    tail: &mut Nll,
) -> Result<()> {
    let vocab = engine.config().vocab_size;
    let step = rows_per_call(vocab);
    let mut i = from;
    while i < window.len() {
        let end = (i + step).min(window.len());
        let pos: Vec<i32> = ((i + shift) as i32..(end + shift) as i32).collect();
        let slots: Vec<u32> = ((i + shift) as u32..(end + shift) as u32).collect();
        let batch = Batch {
            tokens: &window[i..end],
            positions: &pos,
            slots: &slots,
        };
        let out = engine.model().forward(cache, &batch, Logits::All, false)?;
        accumulate(&out.logits, vocab, i, window, tail_from, all, tail);
        i = end;
    }
    Ok(())
}

/// Split `tokens` into `c` contiguous chunks of near-equal length (the first ones one
/// longer).
pub fn split_chunks(tokens: &[u32], c: usize) -> Vec<&[u32]> {
    let c = c.clamp(1, tokens.len().max(1));
    let base = tokens.len() / c;
    let extra = tokens.len() % c;
    let mut out = Vec::with_capacity(c);
    let mut s = 0;
    for j in 0..c {
        let n = base + usize::from(j < extra);
        out.push(&tokens[s..s + n]);
        s += n;
    }
    out
}

/// Score one window plainly and, with `chunks`, in the KVLink layout (module docs).
pub fn score_window(engine: &Engine, window: &[u32], chunks: Option<usize>) -> Result<WindowNll> {
    let n = window.len();
    if n < 4 {
        return Err(Error::Input(format!(
            "a perplexity window needs at least 4 tokens, got {n}"
        )));
    }
    let h = n / 2;
    let mut res = WindowNll::default();
    // Plain causal.
    let mut cache = engine.model().new_cache(n)?;
    forward_rows(
        engine,
        &mut cache,
        window,
        0,
        0,
        h,
        &mut res.plain,
        &mut res.plain_tail,
    )?;
    drop(cache);
    // KVLink layout.
    if let Some(c) = chunks {
        if c == 0 || c > h {
            return Err(Error::Input(format!(
                "--chunks must be between 1 and half the window ({h}), got {c}"
            )));
        }
        let docs = split_chunks(&window[..h], c);
        let (caches, _) = engine.doc_caches(&docs)?;
        let refs: Vec<&DocCache> = caches.iter().map(|c| c.as_ref()).collect();
        let vocab = engine.config().vocab_size;
        // The engine's link configuration: a KVLink-tuned model gets its markers and
        // link tokens after the chunks, as in its training (`text_mem`); they take
        // `shift` positions before the second half.
        engine
            .link()
            .validate(engine.config().input_vocab(), docs.len())?;
        let shift = PromptPlan::build(&[], &docs, &[], engine.link())?.len() - h;
        // One forward pass computes every new token (links, markers and the first tail
        // rows), so the logits of all of them come back together.
        let first = rows_per_call(vocab).saturating_sub(shift).clamp(1, n - h);
        let plan = PromptPlan::build(&[], &docs, &window[h..h + first], engine.link())?;
        debug_assert_eq!(plan.len(), h + shift + first);
        let (mut cache, out, _, _) = link::assemble_and_prefill(
            engine.model(),
            &plan,
            None,
            &refs,
            Mode::Kvlink,
            n - h - first,
            shift + first,
            Logits::All,
            false,
        )?;
        // Rows of every new (segment-0) token: links and markers, then the tail.
        let tail_logits = &out.logits[out.logits.len() - first * vocab..];
        let mut ignored = Nll::default();
        let mut tail = Nll::default();
        accumulate(tail_logits, vocab, h, window, h, &mut ignored, &mut tail);
        forward_rows(
            engine,
            &mut cache,
            window,
            shift,
            h + first,
            h,
            &mut ignored,
            &mut tail,
        )?;
        res.chunked = Some(tail);
    }
    Ok(res)
}
