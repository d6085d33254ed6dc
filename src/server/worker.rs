//! The engine thread: one loop that owns the GPU work. HTTP handlers queue jobs to it
//! (a channel) and read results from per-job channels; a job whose client went away
//! (its channel closed) is skipped or stopped at the next token.

use super::api::ApiError;
use super::State;
use crate::link::Timings;
use crate::model::tokenizer::TextStream;
use crate::{Engine, GenerateParams, Request};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use web_time::Instant;

pub(crate) enum Job {
    Generate(GenJob),
    /// Encode a document (already normalized text) and store its cache.
    AddDocument {
        text: String,
        reply: oneshot::Sender<Result<Encoded, ApiError>>,
    },
}

/// A registered document's token count, cache key and where its cache came from.
pub(crate) type Encoded = (usize, crate::kv::DocKey, crate::engine::CacheSource);

pub(crate) struct GenJob {
    pub req: Request,
    pub params: GenerateParams,
    /// Stop sequences: the text ends before the first one found.
    pub stops: Vec<String>,
    pub queued: Instant,
    pub tx: mpsc::UnboundedSender<GenEvent>,
}

pub(crate) enum GenEvent {
    Text(String),
    Done(Box<GenSummary>),
    Error(ApiError),
}

#[derive(Clone, Debug)]
pub(crate) struct GenSummary {
    /// "stop" (end of turn or a stop sequence) or "length".
    pub finish_reason: &'static str,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub timings: Timings,
    pub queue_ms: f64,
    pub decode_tok_s: f64,
}

/// A job's place in the queue, given back before its result goes out (so a client that
/// has its answer can queue the next request at once) or, at the latest, when dropped.
pub(crate) struct Slot<'a>(&'a std::sync::atomic::AtomicUsize, bool);

impl Slot<'_> {
    pub fn release(&mut self) {
        if !self.1 {
            self.1 = true;
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// Run jobs until every sender is gone.
pub(crate) fn run(engine: Arc<Engine>, state: Arc<State>, rx: std::sync::mpsc::Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        let mut slot = Slot(&state.queue, false);
        // A panic fails its own request (its channel drops: a 500), not the server.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match job {
            Job::Generate(g) => generate(&engine, &state, g, &mut slot),
            Job::AddDocument { text, reply } => {
                let r = (!reply.is_closed()).then(|| add_document(&engine, &text));
                slot.release();
                if let Some(r) = r {
                    let _ = reply.send(r);
                }
            }
        }));
        if r.is_err() {
            eprintln!("kvlink serve: a request panicked in the engine; going on");
        }
    }
}

fn add_document(engine: &Engine, text: &str) -> Result<Encoded, ApiError> {
    let tokens = engine
        .tokenizer
        .encode_data(text)
        .map_err(ApiError::internal)?;
    if tokens.is_empty() {
        return Err(ApiError::invalid("the document is empty", Some("text")));
    }
    if tokens.len() >= engine.context {
        return Err(ApiError::invalid(
            format!(
                "the document is {} tokens, longer than the context ({})",
                tokens.len(),
                engine.context
            ),
            Some("text"),
        )
        .code("context_length_exceeded"));
    }
    let (_, from) = engine
        .precompute_from(&tokens)
        .map_err(ApiError::from_engine)?;
    Ok((tokens.len(), engine.doc_key(&tokens), from))
}

/// The longest suffix of `text` that is a proper prefix of a stop sequence (held back
/// from the stream until it is known not to start a stop).
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (i, _) in text.char_indices().rev().take(s.chars().count()) {
            let tail = &text[i..];
            if tail.len() < s.len() && s.starts_with(tail) {
                best = best.max(tail.len());
            }
        }
    }
    best
}

fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

fn generate(engine: &Engine, state: &State, g: GenJob, slot: &mut Slot) {
    if g.tx.is_closed() {
        state.metrics.cancelled();
        return;
    }
    let queue_ms = g.queued.elapsed().as_secs_f64() * 1e3;
    let mut ts = TextStream::new(&engine.tokenizer);
    let mut text = String::new();
    let mut sent = 0usize;
    let (mut stopped, mut cancelled, mut n) = (false, false, 0usize);
    let tx = &g.tx;
    let stops = &g.stops;
    let emit = |text: &mut String, sent: &mut usize, stopped: &mut bool, last: bool| {
        let end = if let Some(p) = first_stop(text, stops) {
            text.truncate(p);
            *stopped = true;
            p
        } else if last {
            text.len()
        } else {
            text.len() - held_back(text, stops)
        };
        if end > *sent {
            let _ = tx.send(GenEvent::Text(text[*sent..end].to_string()));
            *sent = end;
        }
    };
    let r = engine.ask(&g.req, &g.params, |t| {
        if tx.is_closed() {
            cancelled = true;
            return false;
        }
        if g.params.stop_at_eos && engine.tokenizer.is_stop(t) {
            return true;
        }
        n += 1;
        if let Ok(s) = ts.push(t) {
            text.push_str(&s);
        }
        emit(&mut text, &mut sent, &mut stopped, false);
        !stopped
    });
    let stats = match r {
        Ok(s) => s,
        Err(e) => {
            slot.release();
            let _ = tx.send(GenEvent::Error(ApiError::from_engine(e)));
            return;
        }
    };
    let t = &stats.timings;
    state.metrics.cache(
        t.cached_docs - t.disk_docs - t.shared_docs,
        t.disk_docs,
        t.shared_docs,
        t.computed_docs,
    );
    let decode = (n > 1).then(|| stats.generation.decode.as_secs_f64() / (n - 1) as f64);
    state.metrics.generation(
        t.ttft.as_secs_f64(),
        decode,
        stats.generation.generated_tokens,
    );
    if cancelled {
        state.metrics.cancelled();
        return;
    }
    if !stopped {
        if let Ok(rest) = ts.finish() {
            text.push_str(&rest);
        }
    }
    emit(&mut text, &mut sent, &mut stopped, true);
    let finish_reason = if stopped || stats.generation.stop == "eos" {
        "stop"
    } else {
        "length"
    };
    slot.release();
    let _ = tx.send(GenEvent::Done(Box::new(GenSummary {
        finish_reason,
        prompt_tokens: stats.generation.prompt_tokens,
        completion_tokens: n,
        timings: stats.timings.clone(),
        queue_ms,
        decode_tok_s: stats.generation.decode_tok_s(),
    })));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_sequences_hold_back_partial_matches() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(held_back("abc\n", &stops), 1);
        assert_eq!(held_back("abcEN", &stops), 2);
        assert_eq!(held_back("abc", &stops), 0);
        assert_eq!(held_back("héE", &stops), 1);
        assert_eq!(first_stop("a END b\n\n", &stops), Some(2));
        assert_eq!(first_stop("a b", &stops), None);
    }
}
