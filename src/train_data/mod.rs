//! Training samples for KVLink fine-tuning (`kvlink train-data`; the trainer is
//! `train/`). Every sample is laid out by the code inference uses: RAG prompts go
//! through [`crate::engine::tokenize_request`] and [`PromptPlan::build`], so a document,
//! its link tokens, the markers and the question sit in training exactly where the engine
//! puts them when serving (KVLINK.md §1, §6.1).
//!
//! A sample is token ids, a segment id per token (0 = sees everything before it; j > 0 =
//! sees only earlier tokens of segment j), positions (0..L-1) and a loss mask (1 = the
//! token is a prediction target). Components, as in the paper's mixture:
//!
//! | component | layout | loss on |
//! |---|---|---|
//! | `qa_mem` | system + S + ten documents, each + k link tokens + E + question | answer + end of turn |
//! | `qa` | the same prompt, plain causal (no markers, no links, all segment 0) | answer + end of turn |
//! | `sft_mem` | system + S + each earlier exchange as a memory + links + E + last user turn | last answer + end of turn |
//! | `sft` | the conversation as is | every assistant turn |
//! | `text_mem` | S + the first 500-1500 tokens of a text cut into 5-40 chunks, each + links + E + the continuation | the continuation |
//! | `text` | a window of text | every token |

pub mod sources;

use crate::engine::tokenize_request;
use crate::error::{Error, Result};
use crate::eval::HotpotRecord;
use crate::link::{LinkConfig, Mode, PromptPlan};
use crate::model::{ChatMessage, RenderedChat, Tokenizer};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;

/// Format tag of the samples file.
pub const FORMAT: &str = "kvlink-train-samples/1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    QaMem,
    Qa,
    SftMem,
    Sft,
    TextMem,
    Text,
}

impl Component {
    pub const ALL: [Component; 6] = [
        Component::QaMem,
        Component::Qa,
        Component::SftMem,
        Component::Sft,
        Component::TextMem,
        Component::Text,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Component::QaMem => "qa_mem",
            Component::Qa => "qa",
            Component::SftMem => "sft_mem",
            Component::Sft => "sft",
            Component::TextMem => "text_mem",
            Component::Text => "text",
        }
    }
    pub fn parse(s: &str) -> Result<Component> {
        Component::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                Error::Input(format!(
                    "unknown component {s:?} (known: qa_mem, qa, sft_mem, sft, text_mem, text)"
                ))
            })
    }
    /// Whether the component uses the KVLink layout (memories, links, markers).
    pub fn memory(self) -> bool {
        matches!(
            self,
            Component::QaMem | Component::SftMem | Component::TextMem
        )
    }
}

/// Default mixture (shares of the token budget). The paper's (text 20, SFT 30, SFT with
/// memories 25, QA 10, QA with memories 10, summarization 5) leans towards QA here, the
/// task the tuned model is evaluated on.
pub const DEFAULT_MIX: &str = "qa_mem=30,qa=15,sft_mem=15,sft=10,text_mem=20,text=10";

/// Parse "qa_mem=30,qa=15,..." into normalised shares.
pub fn parse_mix(s: &str) -> Result<Vec<(Component, f64)>> {
    let mut out: Vec<(Component, f64)> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, w) = part
            .split_once('=')
            .ok_or_else(|| Error::Input(format!("mixture entry {part:?} is not name=weight")))?;
        let c = Component::parse(name.trim())?;
        let w: f64 = w
            .trim()
            .parse()
            .map_err(|_| Error::Input(format!("mixture weight {w:?} is not a number")))?;
        if !(w >= 0.0 && w.is_finite()) {
            return Err(Error::Input(format!("mixture weight {w} must be >= 0")));
        }
        if out.iter().any(|(x, _)| *x == c) {
            return Err(Error::Input(format!("{name} appears twice in the mixture")));
        }
        out.push((c, w));
    }
    let total: f64 = out.iter().map(|(_, w)| w).sum();
    if total <= 0.0 {
        return Err(Error::Input("the mixture has no positive weight".into()));
    }
    Ok(out.into_iter().map(|(c, w)| (c, w / total)).collect())
}

/// One training sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub component: Component,
    pub tokens: Vec<u32>,
    pub segments: Vec<u32>,
    pub positions: Vec<i32>,
    /// 1 where the token is a prediction target.
    pub loss: Vec<u8>,
}

impl Sample {
    /// The plan's tokens with no loss; `causal` puts every token in segment 0 (the plain
    /// layout of `qa`, `sft`, `text`).
    fn from_plan(component: Component, plan: PromptPlan, causal: bool) -> Sample {
        let n = plan.len();
        let segments = if causal { vec![0; n] } else { plan.segments };
        Sample {
            component,
            tokens: plan.tokens,
            segments,
            positions: plan.positions,
            loss: vec![0; n],
        }
    }

    /// Append segment-0 tokens, as targets or not.
    fn push(&mut self, ids: &[u32], target: bool) {
        for &id in ids {
            self.positions.push(self.tokens.len() as i32);
            self.tokens.push(id);
            self.segments.push(0);
            self.loss.push(target as u8);
        }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    pub fn targets(&self) -> usize {
        self.loss.iter().filter(|&&l| l == 1).count()
    }
}

/// The link configuration for a model with `base_vocab` ids: `k` link tokens for each
/// of `slots` document slots at ids `base_vocab..`, then KV-START and KV-END: input-only
/// rows appended to the embedding (the adapter's `kvlink.extra_embeddings`).
pub fn extra_token_link(base_vocab: usize, k: usize, slots: usize) -> LinkConfig {
    let base = base_vocab as u32;
    let links = (k * slots) as u32;
    LinkConfig {
        k,
        link_base: Some(base),
        kv_start: Some(base + links),
        kv_end: Some(base + links + 1),
        max_slots: slots,
    }
}

/// Rows the configuration adds after the base vocabulary.
pub fn extra_tokens(link: &LinkConfig) -> usize {
    (link.k * link.max_slots) + link.kv_start.is_some() as usize + link.kv_end.is_some() as usize
}

/// Builds samples with one tokenizer and link configuration.
pub struct Builder<'a> {
    pub tok: &'a Tokenizer,
    pub link: LinkConfig,
    /// Samples longer than this are not produced (QA, SFT) or cut (text).
    pub max_len: usize,
}

/// A conversation turn (ShareGPT "human" is "user", "gpt" is "assistant").
pub type Turn = ChatMessage;

/// System message of the conversation samples (ShareGPT has none).
pub const SFT_SYSTEM: &str = "You are a helpful AI assistant.";

impl Builder<'_> {
    fn check_len(&self, s: Sample) -> Option<Sample> {
        (s.len() <= self.max_len).then_some(s)
    }

    /// Token ids of the assistant's reply `text` after `before` (ending on a user
    /// turn): what the chat template renders after the generation prompt, split after
    /// the first stop token into (reply with its end of turn: the targets, the rest of
    /// the rendering such as a line break: context).
    fn reply_ids(&self, before: &[ChatMessage], text: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let prompt = self.tok.render_chat(before, true)?;
        let mut all = before.to_vec();
        all.push(ChatMessage::new("assistant", text));
        let full = self.tok.render_chat(&all, false)?;
        let reply = full.strip_prefix(&prompt).ok_or_else(|| {
            Error::Template("the chat template does not extend the prompt with the reply".into())
        })?;
        let mut ids = self.tok.encode_chat(&reply)?;
        let rest = match ids.iter().position(|&t| self.tok.is_stop(t)) {
            Some(i) => ids.split_off(i + 1),
            None => Vec::new(),
        };
        Ok((ids, rest))
    }

    /// `qa_mem` (memory = true) or `qa`: the request [`HotpotRecord::request`] builds
    /// (the evaluation's layout), then the gold answer.
    pub fn qa(&self, rec: &HotpotRecord, memory: bool) -> Result<Option<Sample>> {
        let req = rec.request(Mode::Kvlink);
        let (prefix, docs, tail) = tokenize_request(self.tok, &req)?;
        let plain = LinkConfig::default();
        let link = if memory { &self.link } else { &plain };
        let refs: Vec<&[u32]> = docs.iter().map(Vec::as_slice).collect();
        let plan = PromptPlan::build(&prefix, &refs, &tail, link)?;
        let component = if memory {
            Component::QaMem
        } else {
            Component::Qa
        };
        let mut s = Sample::from_plan(component, plan, !memory);
        let mut before = Vec::new();
        if let Some(sys) = &req.system {
            before.push(ChatMessage::new("system", sys.as_str()));
        }
        before.push(ChatMessage::new("user", rec.question.as_str()));
        s.push(&self.reply_ids(&before, &rec.answer)?.0, true);
        Ok(self.check_len(s))
    }

    /// The rendering of `msgs[..1]` (no generation prompt) and what each later message
    /// adds to it: `pieces[i]` is what message i + 1 adds. The template must render a
    /// conversation as the concatenation of its turns (true of ChatML and Llama-3's).
    /// Message contents stay data ([`Tokenizer::encode_chat`]).
    fn turn_pieces(&self, msgs: &[ChatMessage]) -> Result<(RenderedChat, Vec<RenderedChat>)> {
        let head = self.tok.render_chat(&msgs[..1], false)?;
        let mut prev = head.clone();
        let mut pieces = Vec::new();
        for i in 2..=msgs.len() {
            let r = self.tok.render_chat(&msgs[..i], false)?;
            let piece = r.strip_prefix(&prev).ok_or_else(|| {
                Error::Template("the chat template does not render turn by turn".into())
            })?;
            pieces.push(piece);
            prev = r;
        }
        Ok((head, pieces))
    }

    /// The tokens of what the generation prompt adds after `before` (the assistant's
    /// header), empty where the template adds none.
    fn header_ids(&self, before: &[ChatMessage]) -> Result<Vec<u32>> {
        let with = self.tok.render_chat(before, true)?;
        match with.strip_prefix(&self.tok.render_chat(before, false)?) {
            Some(h) => self.tok.encode_chat(&h),
            None => Ok(Vec::new()),
        }
    }

    /// Check a conversation: user/assistant turns alternating from a user turn, ending
    /// on an assistant turn, no empty turn.
    fn check_conversation(turns: &[Turn]) -> bool {
        turns.len() >= 2
            && turns.len().is_multiple_of(2)
            && turns.iter().enumerate().all(|(i, t)| {
                t.role == if i % 2 == 0 { "user" } else { "assistant" }
                    && !t.content.trim().is_empty()
            })
    }

    /// `sft`: the conversation as is, loss on every assistant reply.
    pub fn sft(&self, turns: &[Turn]) -> Result<Option<Sample>> {
        if !Self::check_conversation(turns) {
            return Ok(None);
        }
        let mut msgs = vec![ChatMessage::new("system", SFT_SYSTEM)];
        msgs.extend_from_slice(turns);
        let (head, pieces) = self.turn_pieces(&msgs)?;
        let mut s = Sample {
            component: Component::Sft,
            tokens: Vec::new(),
            segments: Vec::new(),
            positions: Vec::new(),
            loss: Vec::new(),
        };
        s.push(&self.tok.encode_chat(&head)?, false);
        for (i, piece) in pieces.iter().enumerate() {
            let before = &msgs[..i + 1];
            if turns[i].role == "assistant" {
                // The generation prompt (assistant header) is context, the reply is target.
                s.push(&self.header_ids(before)?, false);
                let (reply, rest) = self.reply_ids(before, &turns[i].content)?;
                s.push(&reply, true);
                s.push(&rest, false);
            } else {
                s.push(&self.tok.encode_chat(piece)?, false);
            }
            if s.len() > self.max_len {
                break;
            }
        }
        s.tokens.truncate(self.max_len);
        s.segments.truncate(self.max_len);
        s.positions.truncate(self.max_len);
        s.loss.truncate(self.max_len);
        Ok((s.targets() > 0).then_some(s))
    }

    /// `sft_mem`: each earlier (user, assistant) exchange as one memory segment with its
    /// slot's link tokens, then the last user turn; loss on the last reply. Exchanges
    /// beyond the model's slots (or the length limit) are dropped from the front.
    pub fn sft_mem(&self, turns: &[Turn]) -> Result<Option<Sample>> {
        if !Self::check_conversation(turns) || turns.len() < 4 {
            return Ok(None);
        }
        let mut msgs = vec![ChatMessage::new("system", SFT_SYSTEM)];
        msgs.extend_from_slice(turns);
        let (head, pieces) = self.turn_pieces(&msgs)?;
        let n = turns.len();
        let prefix = self.tok.encode_chat(&head)?;
        let mut memories: Vec<Vec<u32>> = (0..(n - 2) / 2)
            .map(|e| {
                let runs = [&pieces[2 * e].runs[..], &pieces[2 * e + 1].runs[..]].concat();
                self.tok.encode_chat(&RenderedChat { runs })
            })
            .collect::<Result<_>>()?;
        let before = &msgs[..n];
        let with_header = self.tok.render_chat(before, true)?;
        let last_user = with_header
            .strip_prefix(&self.tok.render_chat(&msgs[..n - 1], false)?)
            .ok_or_else(|| {
                Error::Template("the chat template does not render turn by turn".into())
            })?;
        let tail = self.tok.encode_chat(&last_user)?;
        let reply = self.reply_ids(before, &turns[n - 1].content)?.0;
        let slots = if self.link.max_slots > 0 {
            self.link.max_slots
        } else {
            usize::MAX
        };
        let fixed = prefix.len() + tail.len() + reply.len() + 2;
        while !memories.is_empty()
            && (memories.len() > slots
                || fixed
                    + memories
                        .iter()
                        .map(|m| m.len() + self.link.k)
                        .sum::<usize>()
                    > self.max_len)
        {
            memories.remove(0);
        }
        if memories.is_empty() {
            return Ok(None);
        }
        let refs: Vec<&[u32]> = memories.iter().map(Vec::as_slice).collect();
        let plan = PromptPlan::build(&prefix, &refs, &tail, &self.link)?;
        let mut s = Sample::from_plan(Component::SftMem, plan, false);
        s.push(&reply, true);
        Ok(self.check_len(s))
    }

    /// `text_mem`: the first `mem_len` tokens of `ids` cut at random points into `chunks`
    /// memory segments (each with its links), then the continuation as the target.
    pub fn text_mem(
        &self,
        ids: &[u32],
        mem_len: usize,
        chunks: usize,
        rng: &mut impl Rng,
    ) -> Result<Option<Sample>> {
        let chunks = chunks.min(if self.link.max_slots > 0 {
            self.link.max_slots
        } else {
            chunks
        });
        if chunks == 0 || mem_len < chunks || ids.len() <= mem_len + 1 {
            return Ok(None);
        }
        let prefix = self.tok.encode("", true)?;
        let overhead = prefix.len() + chunks * self.link.k + 2;
        if mem_len + overhead >= self.max_len {
            return Ok(None);
        }
        let cont_len = (ids.len() - mem_len).min(self.max_len - mem_len - overhead);
        let mut cuts: Vec<usize> = (1..mem_len).collect();
        cuts.shuffle(rng);
        cuts.truncate(chunks - 1);
        cuts.sort_unstable();
        let mut bounds = vec![0];
        bounds.extend(cuts);
        bounds.push(mem_len);
        let refs: Vec<&[u32]> = bounds.windows(2).map(|w| &ids[w[0]..w[1]]).collect();
        let plan = PromptPlan::build(&prefix, &refs, &[], &self.link)?;
        let mut s = Sample::from_plan(Component::TextMem, plan, false);
        s.push(&ids[mem_len..mem_len + cont_len], true);
        Ok(self.check_len(s))
    }

    /// `text`: a window of text, every token a target (but the first, which nothing
    /// predicts).
    pub fn text(&self, ids: &[u32]) -> Option<Sample> {
        let prefix = self.tok.encode("", true).ok()?;
        let n = ids.len().min(self.max_len.saturating_sub(prefix.len()));
        if n < 2 {
            return None;
        }
        let mut s = Sample {
            component: Component::Text,
            tokens: Vec::new(),
            segments: Vec::new(),
            positions: Vec::new(),
            loss: Vec::new(),
        };
        s.push(&prefix, false);
        s.push(&ids[..1], false);
        s.push(&ids[1..n], true);
        Some(s)
    }
}

/// How often each text may be drawn (at other random places each time).
pub const TEXT_PASSES: usize = 4;

/// How the components draw from their sources.
#[derive(Clone, Copy, Debug)]
pub struct Draw {
    /// Token budget over all components.
    pub budget: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// How often each QA record may be drawn: the first time with its documents in the
    /// record's order, each later time in a new random order (so the gold paragraphs sit
    /// at other places of the context, its edges included). 1: each record once.
    pub qa_passes: usize,
}

/// Where the samples come from (see [`sources`]).
pub struct Sources {
    /// QA records for training (HotpotQA train part and SQuAD train articles).
    pub qa: Vec<HotpotRecord>,
    pub conversations: Vec<Vec<Turn>>,
    /// Plain texts (Wikipedia articles, essays).
    pub texts: Vec<String>,
}

/// What [`build`] made.
#[derive(Debug, Default)]
pub struct Stats {
    /// Per component: (samples, tokens, target tokens).
    pub per_component: Vec<(Component, usize, usize, usize)>,
}

/// Build samples under a token budget split by `mix`, deterministically from the seed.
/// Each component draws from its sources in a seeded random order until its share of
/// the budget is reached or its source runs out (texts [`TEXT_PASSES`] times, QA
/// records `qa_passes` times). `progress(done, budget)` is called as tokens accumulate.
pub fn build(
    b: &Builder,
    src: &Sources,
    mix: &[(Component, f64)],
    draw: Draw,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<Sample>, Stats)> {
    let Draw {
        budget,
        seed,
        qa_passes,
    } = draw;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut samples = Vec::new();
    let mut stats = Stats::default();
    let mut done_total = 0usize;
    // Texts are tokenized once and shared by text and text_mem.
    let mut text_ids: HashMap<usize, Vec<u32>> = HashMap::new();
    for &(c, share) in mix {
        let want = (share * budget as f64) as usize;
        let (mut n, mut toks, mut tgt) = (0usize, 0usize, 0usize);
        let order = |len: usize, rng: &mut rand::rngs::StdRng| {
            let mut o: Vec<usize> = (0..len).collect();
            o.shuffle(rng);
            o
        };
        let pool = match c {
            Component::QaMem | Component::Qa => src.qa.len(),
            Component::SftMem | Component::Sft => src.conversations.len(),
            Component::TextMem | Component::Text => src.texts.len(),
        };
        // Texts are cut at random places each time, so they may be drawn several times;
        // QA records too where asked, their documents in a new order after the first.
        let passes = match c {
            Component::TextMem | Component::Text => TEXT_PASSES,
            Component::QaMem | Component::Qa => qa_passes.max(1),
            Component::SftMem | Component::Sft => 1,
        };
        let mut it = (0..passes)
            .flat_map(|p| order(pool, &mut rng).into_iter().map(move |i| (p, i)))
            .collect::<Vec<_>>()
            .into_iter();
        while toks < want {
            let Some((pass, i)) = it.next() else { break };
            let s = match c {
                Component::QaMem | Component::Qa if pass > 0 => {
                    let mut rec = src.qa[i].clone();
                    rec.context.shuffle(&mut rng);
                    b.qa(&rec, c == Component::QaMem)?
                }
                Component::QaMem | Component::Qa => b.qa(&src.qa[i], c == Component::QaMem)?,
                Component::SftMem => b.sft_mem(&src.conversations[i])?,
                Component::Sft => b.sft(&src.conversations[i])?,
                Component::TextMem | Component::Text => {
                    let ids = match text_ids.get(&i) {
                        Some(v) => v,
                        None => {
                            let v = b.tok.encode_data(&src.texts[i])?;
                            text_ids.entry(i).or_insert(v)
                        }
                    };
                    if c == Component::Text {
                        let start = if ids.len() > b.max_len {
                            rng.random_range(0..ids.len() - b.max_len)
                        } else {
                            0
                        };
                        b.text(&ids[start..])
                    } else {
                        let mem = rng.random_range(500..=1500).min(ids.len() / 2);
                        let chunks = rng.random_range(5..=40);
                        b.text_mem(ids, mem, chunks, &mut rng)?
                    }
                }
            };
            if let Some(s) = s {
                n += 1;
                toks += s.len();
                tgt += s.targets();
                done_total += s.len();
                progress(done_total, budget);
                samples.push(s);
            }
        }
        stats.per_component.push((c, n, toks, tgt));
    }
    samples.shuffle(&mut rng);
    Ok((samples, stats))
}

/// Write samples as a safetensors file: `tokens` U32, `segments` U8, `positions` I32,
/// `loss` U8 (all `[total tokens]`), `offsets` I64 `[n + 1]`, `component` U8 `[n]`;
/// metadata `format`, `components` (names by index), `base_vocab`, `kvlink_json` (the
/// link configuration the adapter ships with) and `recipe` (how the file was made, JSON,
/// for the trainer's log and the model card).
pub fn write(
    path: &Path,
    samples: &[Sample],
    base_vocab: usize,
    kvlink_json: &str,
    recipe: &str,
) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let mut tokens = Vec::new();
    let mut segments = Vec::new();
    let mut positions = Vec::new();
    let mut loss = Vec::new();
    let mut offsets: Vec<i64> = vec![0];
    let mut comp = Vec::new();
    for s in samples {
        if s.segments.iter().any(|&g| g > u8::MAX as u32) {
            return Err(Error::Input("a sample has more than 255 segments".into()));
        }
        tokens.extend_from_slice(&s.tokens);
        segments.extend(s.segments.iter().map(|&g| g as u8));
        positions.extend_from_slice(&s.positions);
        loss.extend_from_slice(&s.loss);
        offsets.push(tokens.len() as i64);
        comp.push(
            Component::ALL
                .iter()
                .position(|c| *c == s.component)
                .unwrap_or(0) as u8,
        );
    }
    let n = tokens.len();
    let bad = |e: safetensors::SafeTensorError| Error::Input(format!("samples file: {e}"));
    let views = vec![
        (
            "tokens",
            TensorView::new(Dtype::U32, vec![n], bytemuck::cast_slice(&tokens)).map_err(bad)?,
        ),
        (
            "segments",
            TensorView::new(Dtype::U8, vec![n], &segments).map_err(bad)?,
        ),
        (
            "positions",
            TensorView::new(Dtype::I32, vec![n], bytemuck::cast_slice(&positions)).map_err(bad)?,
        ),
        (
            "loss",
            TensorView::new(Dtype::U8, vec![n], &loss).map_err(bad)?,
        ),
        (
            "offsets",
            TensorView::new(
                Dtype::I64,
                vec![offsets.len()],
                bytemuck::cast_slice(&offsets),
            )
            .map_err(bad)?,
        ),
        (
            "component",
            TensorView::new(Dtype::U8, vec![comp.len()], &comp).map_err(bad)?,
        ),
    ];
    let names: Vec<&str> = Component::ALL.iter().map(|c| c.name()).collect();
    let meta: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("components", names.join(",")),
        ("base_vocab", base_vocab.to_string()),
        ("kvlink_json", kvlink_json.to_string()),
        ("recipe", recipe.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let tmp = path.with_extension("part");
    safetensors::tensor::serialize_to_file(views, Some(meta), &tmp).map_err(bad)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(())
}
