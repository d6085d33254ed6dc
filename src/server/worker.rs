//! The engine thread: one loop that owns the GPU work. HTTP handlers queue jobs to it
//! (a channel) and read results from per-job channels; a job whose client went away
//! (its channel closed) is skipped or stopped at the next token.

use super::api::ApiError;
use super::State;
use crate::engine::StartOptions;
use crate::link::batch::{BatchPipe, DecodeBatch, SeqId};
use crate::link::Timings;
use crate::model::llama::{DecodePipe, KvCache, PendingToken};
use crate::model::tokenizer::TextStream;
use crate::sampling::Sampler;
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
pub(crate) struct Ticket(Arc<State>, bool);

impl Ticket {
    fn new(state: &Arc<State>) -> Ticket {
        Ticket(state.clone(), false)
    }

    pub fn release(&mut self) {
        if !self.1 {
            self.1 = true;
            self.0.queue.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.release();
    }
}

/// Run jobs until every sender is gone. With `max_batch` > 1 generations decode
/// together ([`Decoder`]); with 1, one after another with the pipelined one-sequence
/// decoder (the lowest latency for a single user).
pub(crate) fn run(engine: Arc<Engine>, state: Arc<State>, rx: std::sync::mpsc::Receiver<Job>) {
    if state.cfg.max_batch <= 1 {
        while let Ok(job) = rx.recv() {
            let mut ticket = Ticket::new(&state);
            guarded(|| match job {
                Job::Generate(g) => generate(&engine, &state, g, &mut ticket),
                Job::AddDocument { text, reply } => add_document_job(&engine, text, reply, ticket),
            });
        }
        return;
    }
    let mut dec = Decoder {
        engine: &engine,
        state: &state,
        batch: None,
        pipe: None,
        inflight: None,
        active: Vec::new(),
        waiting: std::collections::VecDeque::new(),
    };
    loop {
        // Take a job while there is room to decode it; wait for one when idle.
        let busy = dec.active.len() + dec.waiting.len();
        let job = if busy == 0 {
            match rx.recv() {
                Ok(j) => Some(j),
                Err(_) => return,
            }
        } else if busy < state.cfg.max_batch {
            rx.try_recv().ok()
        } else {
            None
        };
        let took = job.is_some();
        if let Some(job) = job {
            let ticket = Ticket::new(&state);
            match job {
                Job::Generate(g) => {
                    if let Some(a) = guarded(|| dec.start(g, ticket)).flatten() {
                        dec.waiting.push_back(a);
                    }
                }
                Job::AddDocument { text, reply } => {
                    guarded(|| add_document_job(&engine, text, reply, ticket));
                }
            }
        }
        if dec.lone() {
            // One greedy generation and nothing else: it decodes on its own cache with
            // the pipelined decoder, a few tokens at a time while the queue stays empty,
            // and joins the arena once another generation comes.
            if !took && guarded(|| dec.solo()).is_none() {
                dec.waiting.clear(); // its channel dropped: a 500
            }
        } else {
            dec.join_waiting();
            if !dec.active.is_empty() && guarded(|| dec.step()).is_none() {
                dec.fail_all(ApiError::internal("the decode step panicked"));
            }
        }
        state.decoding.store(dec.active.len(), Ordering::SeqCst);
    }
}

/// Run `f`; a panic fails its own work (channels drop: a 500), not the server.
fn guarded<T>(f: impl FnOnce() -> T) -> Option<T> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    if r.is_err() {
        eprintln!("kvlink serve: a request panicked in the engine; going on");
    }
    r.ok()
}

fn add_document_job(
    engine: &Engine,
    text: String,
    reply: oneshot::Sender<Result<Encoded, ApiError>>,
    mut ticket: Ticket,
) {
    let r = (!reply.is_closed()).then(|| add_document(engine, &text));
    ticket.release();
    if let Some(r) = r {
        let _ = reply.send(r);
    }
}

fn add_document(engine: &Engine, text: &str) -> Result<Encoded, ApiError> {
    let tokens = engine
        .tokenizer()
        .encode_data(text)
        .map_err(ApiError::internal)?;
    if tokens.is_empty() {
        return Err(ApiError::invalid("the document is empty", Some("text")));
    }
    if tokens.len() >= engine.context() {
        return Err(ApiError::invalid(
            format!(
                "the document is {} tokens, longer than the context ({})",
                tokens.len(),
                engine.context()
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

/// A generation's streamed text: tokens become text, stop sequences cut it, and what
/// could still start a stop sequence is held back.
struct TextOut<'e> {
    ts: TextStream<'e>,
    text: String,
    sent: usize,
    /// A stop sequence was found.
    stopped: bool,
    /// Tokens that became text (not a final end-of-turn token).
    n: usize,
}

impl<'e> TextOut<'e> {
    fn new(engine: &'e Engine) -> TextOut<'e> {
        TextOut {
            ts: TextStream::new(engine.tokenizer()),
            text: String::new(),
            sent: 0,
            stopped: false,
            n: 0,
        }
    }

    fn push(&mut self, t: u32, g: &GenJob) {
        self.n += 1;
        if let Ok(s) = self.ts.push(t) {
            self.text.push_str(&s);
        }
        self.emit(g, false);
    }

    /// Send what is known to be final; with `last`, everything.
    fn emit(&mut self, g: &GenJob, last: bool) {
        let stops = &g.stops;
        let end = if let Some(p) = first_stop(&self.text, stops) {
            self.text.truncate(p);
            self.stopped = true;
            p
        } else if last {
            self.text.len()
        } else {
            self.text.len() - held_back(&self.text, stops)
        };
        if end > self.sent {
            let _ =
                g.tx.send(GenEvent::Text(self.text[self.sent..end].to_string()));
            self.sent = end;
        }
    }

    /// The end of the stream; the finish reason.
    fn finish(&mut self, g: &GenJob, eos: bool) -> &'static str {
        if !self.stopped {
            if let Ok(rest) = self.ts.finish() {
                self.text.push_str(&rest);
            }
        }
        self.emit(g, true);
        if self.stopped || eos {
            "stop"
        } else {
            "length"
        }
    }
}

/// One generation alone: prefill, then the engine's own decode loop.
fn generate(engine: &Engine, state: &State, g: GenJob, ticket: &mut Ticket) {
    if g.tx.is_closed() {
        state.metrics.cancelled();
        return;
    }
    let queue_ms = g.queued.elapsed().as_secs_f64() * 1e3;
    let mut out = TextOut::new(engine);
    let mut cancelled = false;
    let r = engine.ask(&g.req, &g.params, |t| {
        if g.tx.is_closed() {
            cancelled = true;
            return false;
        }
        if g.params.stop_at_eos && engine.tokenizer().is_stop(t) {
            return true;
        }
        out.push(t, &g);
        !out.stopped
    });
    let stats = match r {
        Ok(s) => s,
        Err(e) => return fail(ticket, &g, ApiError::from_engine(e)),
    };
    count_cache_hits(state, &stats.timings);
    let n = out.n;
    let decode = (n > 1).then(|| stats.generation.decode.as_secs_f64() / (n - 1) as f64);
    state.metrics.generation(
        stats.timings.ttft.as_secs_f64(),
        decode,
        stats.generation.generated_tokens,
    );
    if cancelled {
        state.metrics.cancelled();
        return;
    }
    let finish_reason = out.finish(&g, stats.generation.stop == "eos");
    ticket.release();
    let _ = g.tx.send(GenEvent::Done(Box::new(GenSummary {
        finish_reason,
        prompt_tokens: stats.generation.prompt_tokens,
        completion_tokens: n,
        timings: stats.timings.clone(),
        queue_ms,
        decode_tok_s: stats.generation.decode_tok_s(),
    })));
}

/// A generation fails: its queue place goes back, then the error goes to its client.
fn fail(ticket: &mut Ticket, g: &GenJob, err: ApiError) {
    ticket.release();
    let _ = g.tx.send(GenEvent::Error(err));
}

fn count_cache_hits(state: &State, t: &Timings) {
    state.metrics.cache(
        t.cached_docs - t.disk_docs - t.shared_docs,
        t.disk_docs,
        t.shared_docs,
        t.computed_docs,
    );
}

/// Why a generation ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum End {
    /// The client went away.
    Cancelled,
    /// An error already sent to the client.
    Failed,
    /// An end-of-turn token (not part of the text).
    Eos,
    /// A stop sequence, max_tokens or the context: [`TextOut::finish`] tells which.
    Done,
}

/// A generation in the batch decoder: prefilled, with its first token out.
struct Active<'e> {
    g: GenJob,
    ticket: Ticket,
    /// Its place in the batch; None while it waits for room in the arena.
    id: Option<SeqId>,
    /// Its prefilled cache until it joins, and the slots it may fill in all.
    cache: Option<KvCache>,
    room: usize,
    /// Slots of its own cache filled (the prompt, then tokens decoded alone).
    filled: usize,
    /// The token to feed next.
    next: u32,
    /// Its pipelined decoder's buffers while it decodes alone (made on first use).
    pipe: Option<DecodePipe>,
    sampler: Sampler,
    greedy: bool,
    out: TextOut<'e>,
    timings: Timings,
    prompt_tokens: usize,
    queue_ms: f64,
    /// Tokens generated (the first included, and a final end-of-turn token).
    generated: usize,
    decode_from: Instant,
}

impl Active<'_> {
    /// Take token `t`: stream it; why to stop after it, if so (the rules of
    /// `Engine::ask` with the server's stop sequences).
    fn push(&mut self, t: u32, engine: &Engine) -> Option<End> {
        self.generated += 1;
        if self.g.tx.is_closed() {
            return Some(End::Cancelled);
        }
        if self.g.params.stop_at_eos && engine.tokenizer().is_stop(t) {
            return Some(End::Eos);
        }
        self.out.push(t, &self.g);
        self.next = t;
        (self.out.stopped || self.generated >= self.g.params.max_tokens).then_some(End::Done)
    }
}

/// Tokens a lone generation decodes before the worker looks at its queue again.
const SOLO_STEPS: usize = 16;

/// Up to [`SOLO_STEPS`] greedy steps of `a` on its own cache, pipelined as
/// `Engine::generate` decodes: each step takes the previous step's token on the GPU and
/// is queued before that token is read back. Why it ended, if it did (a step queued
/// past the end writes only a slot of its own cache, within its room).
fn solo_steps(engine: &Engine, a: &mut Active) -> crate::Result<Option<End>> {
    let model = engine.model();
    let mut cache = a.cache.take().expect("a waiting generation has its cache");
    let mut pipe = match a.pipe.take() {
        Some(p) => p,
        None => model.decode_pipe()?,
    };
    let base = a.filled;
    let steps = SOLO_STEPS.min(a.room.saturating_sub(base));
    let mut end = None;
    model.decode_greedy(&mut pipe, &mut cache, base, a.next, steps, &mut |t| {
        a.filled += 1;
        let full = a.filled >= a.room;
        end = a.push(t, engine).or(full.then_some(End::Done));
        end.is_none()
    })?;
    a.cache = Some(cache);
    a.pipe = Some(pipe);
    Ok(end)
}

/// Generations decoding together: each is prefilled alone when it arrives, then moves
/// into the shared arena of a [`DecodeBatch`]; every step feeds all of them at once.
struct Decoder<'e> {
    engine: &'e Engine,
    state: &'e State,
    batch: Option<DecodeBatch>,
    /// The batch's pipelined decoder (made on first use) and the greedy step queued on
    /// it whose tokens are not read yet, with its sequences in row order.
    pipe: Option<BatchPipe>,
    inflight: Option<(PendingToken, Vec<SeqId>)>,
    active: Vec<Active<'e>>,
    /// Prefilled, waiting for room in the arena (first come, first served).
    waiting: std::collections::VecDeque<Active<'e>>,
}

impl<'e> Decoder<'e> {
    /// Prefill a generation and stream its first token; it then waits to join the
    /// batch (None if it is already over).
    fn start(&mut self, g: GenJob, mut ticket: Ticket) -> Option<Active<'e>> {
        let (engine, state) = (self.engine, self.state);
        if g.tx.is_closed() {
            state.metrics.cancelled();
            return None;
        }
        let queue_ms = g.queued.elapsed().as_secs_f64() * 1e3;
        let max = g.params.max_tokens;
        let prefill = || -> crate::Result<_> {
            let mut sampler = Sampler::new(g.params.sampling.clone())?;
            let greedy = sampler.params().is_greedy();
            let s = engine.start_request(&g.req, StartOptions::generate(max, greedy))?;
            let first = match s.out.token {
                Some(t) => t,
                None => sampler.sample(&s.out.logits)?,
            };
            Ok((sampler, greedy, s, first))
        };
        let (sampler, greedy, started, first) = match prefill() {
            Ok(r) => r,
            Err(e) => {
                fail(&mut ticket, &g, ApiError::from_engine(e));
                return None;
            }
        };
        let crate::engine::Started {
            plan,
            cache,
            timings: mut tm,
            ..
        } = started;
        tm.ttft = tm.ttft.max(tm.lookup + tm.assemble + tm.prefill);
        count_cache_hits(state, &tm);
        let len = plan.len();
        // Slots it may fill: the tokens still to feed, within its cache (the context).
        let room = (len + max.saturating_sub(1)).min(cache.capacity);
        let mut a = Active {
            g,
            ticket,
            id: None,
            cache: Some(cache),
            room,
            filled: len,
            next: first,
            pipe: None,
            sampler,
            greedy,
            out: TextOut::new(engine),
            timings: tm,
            prompt_tokens: len,
            queue_ms,
            generated: 0,
            decode_from: Instant::now(),
        };
        if max == 0 {
            self.finish(a, End::Done);
            return None;
        }
        if let Some(end) = a.push(first, engine) {
            self.finish(a, end);
            return None;
        }
        if room <= len {
            self.finish(a, End::Done); // no slot left to decode into: the context is full
            return None;
        }
        Some(a)
    }

    /// Whether the one generation there is greedy and alone (nothing decoding, nothing
    /// else waiting): it then decodes on its own ([`Decoder::solo`]).
    fn lone(&self) -> bool {
        self.active.is_empty() && self.waiting.len() == 1 && self.waiting[0].greedy
    }

    /// Up to [`SOLO_STEPS`] tokens of the lone generation on its own cache with the
    /// pipelined decoder (a batch step of one row costs more), then back to the queue.
    fn solo(&mut self) {
        let Some(mut a) = self.waiting.pop_front() else {
            return;
        };
        if a.g.tx.is_closed() {
            return self.finish(a, End::Cancelled);
        }
        match solo_steps(self.engine, &mut a) {
            Ok(Some(end)) => self.finish(a, end),
            Ok(None) => self.waiting.push_front(a),
            Err(e) => fail(&mut a.ticket, &a.g, ApiError::from_engine(e)),
        }
    }

    /// Move waiting generations into the arena while it has room.
    fn join_waiting(&mut self) {
        let engine = self.engine;
        while let Some(mut a) = self.waiting.pop_front() {
            if a.g.tx.is_closed() {
                self.finish(a, End::Cancelled);
                continue;
            }
            let batch = match self.arena() {
                Ok(b) => b,
                Err(e) => {
                    fail(&mut a.ticket, &a.g, ApiError::from_engine(e));
                    continue;
                }
            };
            let cache = a
                .cache
                .as_ref()
                .expect("a waiting generation has its cache");
            match batch.join(engine.model(), cache, a.filled, a.room) {
                Ok(Some(id)) => {
                    a.id = Some(id);
                    a.cache = None; // its slots now live in the arena
                    a.pipe = None;
                    self.active.push(a);
                }
                Ok(None) => {
                    self.waiting.push_front(a);
                    return;
                }
                Err(e) => fail(&mut a.ticket, &a.g, ApiError::from_engine(e)),
            }
        }
    }

    /// The arena, made on first use: `--batch-slots`, at least one full context.
    fn arena(&mut self) -> crate::Result<&mut DecodeBatch> {
        if self.batch.is_none() {
            let slots = self.state.cfg.batch_slots.max(self.engine.context());
            self.batch = Some(DecodeBatch::new(self.engine.model(), slots)?);
        }
        Ok(self.batch.as_mut().expect("made above"))
    }

    /// One decode step for every active generation; those that end leave the batch.
    /// Greedy steps are pipelined: the step queued last (its tokens unread) feeds the
    /// next one on the GPU, which is queued before those tokens are read, so the GPU
    /// computes while the host streams. What changes the rows (a join, a leave, a
    /// sampling generation, a sequence at the end of its room) drains the queued step
    /// first.
    fn step(&mut self) {
        if self.inflight.is_some() && !self.can_follow() {
            let (p, ids) = self.inflight.take().expect("checked above");
            self.read(p, &ids);
        }
        if self.active.is_empty() {
            return;
        }
        if !self.active.iter().all(|a| a.greedy) {
            return self.step_now();
        }
        let model = self.engine.model();
        let ids: Vec<SeqId> = self
            .active
            .iter()
            .map(|a| a.id.expect("active generations are in the batch"))
            .collect();
        let tokens: Option<Vec<u32>> = self
            .inflight
            .is_none()
            .then(|| self.active.iter().map(|a| a.next).collect());
        let batch = self
            .batch
            .as_mut()
            .expect("the arena exists while any is active");
        let queued = match &mut self.pipe {
            Some(p) => Ok(p),
            None => batch.pipe(model).map(|p| self.pipe.insert(p)),
        }
        .and_then(|pipe| batch.step_async(model, pipe, &ids, tokens.as_deref()));
        let p = match queued {
            Ok(p) => p,
            Err(e) => return self.fail_all(ApiError::from_engine(e)),
        };
        self.state.metrics.decode_step(ids.len());
        if let Some((older, older_ids)) = self.inflight.replace((p, ids)) {
            self.read(older, &older_ids);
        }
    }

    /// Whether the next greedy step can take its tokens from the queued one on the GPU:
    /// the same generations in the same order, all greedy, each with a slot left.
    fn can_follow(&self) -> bool {
        let (Some((_, ids)), Some(batch)) = (&self.inflight, &self.batch) else {
            return false;
        };
        ids.len() == self.active.len()
            && self.active.iter().zip(ids).all(|(a, &id)| {
                a.greedy && a.id == Some(id) && batch.seq_room_left(id).is_some_and(|r| r > 0)
            })
    }

    /// Wait for a queued greedy step of the sequences `ids` and hand each generation
    /// still active its token (a generation that ended since has left: its token goes).
    fn read(&mut self, p: PendingToken, ids: &[SeqId]) {
        let engine = self.engine;
        let tokens = match engine.model().read_tokens(p) {
            Ok(t) => t,
            Err(e) => return self.fail_all(ApiError::from_engine(e)),
        };
        let batch = self
            .batch
            .as_ref()
            .expect("the arena exists while any is active");
        // A row is at the end of its room when it has no slot left and no later step of
        // it is queued (one queued means it had a slot left after this one).
        let queued: &[SeqId] = self.inflight.as_ref().map_or(&[], |(_, q)| q);
        let mut ended = Vec::new();
        for (i, a) in self.active.iter_mut().enumerate() {
            let id = a.id.expect("active generations are in the batch");
            let Some(row) = ids.iter().position(|&x| x == id) else {
                continue; // joined after this step
            };
            let full = batch.seq_room_left(id) == Some(0) && !queued.contains(&id);
            if let Some(end) = a.push(tokens[row], engine).or(full.then_some(End::Done)) {
                ended.push((i, end));
            }
        }
        self.finish_ended(ended);
    }

    /// Generations that ended (index into `active`, why) leave, last index first.
    fn finish_ended(&mut self, ended: Vec<(usize, End)>) {
        for (i, end) in ended.into_iter().rev() {
            let a = self.active.swap_remove(i);
            self.finish(a, end);
        }
    }

    /// One decode step, waited for: every row's logits come back and each generation
    /// samples its own token (some of the batch do not decode greedily).
    fn step_now(&mut self) {
        let engine = self.engine;
        let inputs: Vec<(SeqId, u32)> = self
            .active
            .iter()
            .map(|a| (a.id.expect("active generations are in the batch"), a.next))
            .collect();
        let batch = self
            .batch
            .as_mut()
            .expect("the arena exists while any is active");
        let out = match batch.step(engine.model(), &inputs, false) {
            Ok(o) => o,
            Err(e) => return self.fail_all(ApiError::from_engine(e)),
        };
        self.state.metrics.decode_step(inputs.len());
        let vocab = engine.config().vocab_size;
        let mut ended = Vec::new();
        for (i, a) in self.active.iter_mut().enumerate() {
            let id = a.id.expect("active generations are in the batch");
            let full = batch.seq_room_left(id) == Some(0);
            let end = match a.sampler.sample(&out.logits[i * vocab..(i + 1) * vocab]) {
                Ok(t) => a.push(t, engine).or(full.then_some(End::Done)),
                Err(e) => {
                    fail(&mut a.ticket, &a.g, ApiError::from_engine(e));
                    Some(End::Failed)
                }
            };
            if let Some(end) = end {
                ended.push((i, end));
            }
        }
        self.finish_ended(ended);
    }

    /// Every active generation fails with `err` (a GPU error: the arena goes too).
    fn fail_all(&mut self, err: ApiError) {
        for mut a in self.active.drain(..) {
            fail(&mut a.ticket, &a.g, err.clone());
        }
        self.batch = None;
        self.pipe = None;
        self.inflight = None;
    }

    /// A generation ends: out of the batch, metrics, the summary to its client.
    fn finish(&mut self, mut a: Active<'e>, end: End) {
        if let (Some(id), Some(b)) = (a.id, self.batch.as_mut()) {
            b.leave(id);
        }
        if end == End::Failed {
            return;
        }
        let state = self.state;
        let n = a.out.n;
        let decode = a.decode_from.elapsed().as_secs_f64();
        let per_token = (n > 1).then(|| decode / (n - 1) as f64);
        state
            .metrics
            .generation(a.timings.ttft.as_secs_f64(), per_token, a.generated);
        if end == End::Cancelled {
            state.metrics.cancelled();
            return;
        }
        let finish_reason = a.out.finish(&a.g, end == End::Eos);
        a.ticket.release();
        // The gauge before the reply: a client that reads /metrics once its generation
        // is done must not still count it.
        state.decoding.store(self.active.len(), Ordering::SeqCst);
        let _ = a.g.tx.send(GenEvent::Done(Box::new(GenSummary {
            finish_reason,
            prompt_tokens: a.prompt_tokens,
            completion_tokens: n,
            timings: a.timings.clone(),
            queue_ms: a.queue_ms,
            decode_tok_s: a.generated.saturating_sub(1) as f64 / decode.max(1e-9),
        })));
    }
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
