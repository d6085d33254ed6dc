//! Tokenizer + chat template. Wraps `tokenizers::Tokenizer`, built either from an HF
//! `tokenizer.json` or rebuilt from GGUF `tokenizer.ggml.*` metadata.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip as DecoderStrip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Clone)]
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    /// Jinja chat template, if the model ships one.
    pub chat_template: Option<String>,
    pub bos_token: Option<(u32, String)>,
    pub eos_token: Option<(u32, String)>,
    /// All ids that end generation (eos, eot, `<|im_end|>`, `<|eot_id|>`, ...).
    pub stop_ids: Vec<u32>,
    /// Whether `encode(.., add_special=true)` prepends BOS.
    pub add_bos: bool,
    /// `inner` with control-token text encoded as plain text ([`Tokenizer::encode_data`]),
    /// made on first use.
    pub data_inner: std::sync::OnceLock<tokenizers::Tokenizer>,
    /// The control (special) token strings, gathered on first use
    /// ([`Tokenizer::has_control_text`] runs for every document and message).
    pub control_texts: std::sync::OnceLock<Vec<String>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("stop_ids", &self.stop_ids)
            .field("add_bos", &self.add_bos)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// Token strings that end a turn/generation in common chat models.
pub const STOP_TOKEN_STRINGS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "</s>",
];

/// GPT-2 pre-tokenizer regex (what `ByteLevel(use_regex=true)` uses).
pub const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama-3 pre-tokenizer regex (`tokenizer.ggml.pre == "llama-bpe"`).
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2 pre-tokenizer regex (`tokenizer.ggml.pre == "qwen2"`).
pub const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Most tokens a GGUF vocabulary may hold (as [`crate::model::config::limits::MAX_VOCAB`]).
const MAX_VOCAB: usize = crate::model::config::limits::MAX_VOCAB;
/// Longest token string accepted. SentencePiece merge recovery looks up every split of
/// every piece (quadratic in its length); real vocabularies stay under a few hundred bytes.
pub const MAX_TOKEN_BYTES: usize = 4096;
/// Most BPE merges accepted (real files: about one per token).
const MAX_MERGES: usize = 1 << 24;

/// GGUF token types (llama.cpp `llama_token_type`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// Tokenizer-related GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
/// Filled by `GgufTokenizerMeta::from_gguf` (in `gguf/tokenizer_meta.rs`) or by hand in tests.
#[derive(Clone, Debug, Default)]
pub struct GgufTokenizerMeta {
    /// File it came from (for error messages).
    pub source: PathBuf,
    /// `tokenizer.ggml.model`: "gpt2" (byte-level BPE) or "llama" (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// "a b" strings.
    pub merges: Vec<String>,
    pub token_types: Vec<i32>,
    pub scores: Vec<f32>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub eot_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_space_prefix: Option<bool>,
    pub chat_template: Option<String>,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// The pre-tokenizer llama.cpp uses for a `tokenizer.ggml.pre` value (byte-level BPE).
fn pre_tokenizer_for(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level_regex = || ByteLevel::new(false, true, true);
    let byte_level_plain = || ByteLevel::new(false, true, false);
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Ok(Split::new(
            SplitPattern::Regex(re.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tok_err)?
        .into())
    };
    Ok(match pre {
        // llama.cpp: "\p{N}" then the GPT-2 regex.
        "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone" | "minerva-7b" => {
            PreSequence::new(vec![Digits::new(true).into(), byte_level_regex().into()]).into()
        }
        "gpt2" | "default" | "gpt-2" => byte_level_regex().into(),
        "llama-bpe" | "llama3" | "llama-v3" => {
            PreSequence::new(vec![split(LLAMA3_REGEX)?, byte_level_plain().into()]).into()
        }
        "qwen2" | "deepseek-r1-qwen" => {
            PreSequence::new(vec![split(QWEN2_REGEX)?, byte_level_plain().into()]).into()
        }
        other => {
            eprintln!(
                "warning: unknown GGUF tokenizer pre-tokenizer {other:?}; falling back to the GPT-2 pre-tokenizer (tokenization may differ from llama.cpp)"
            );
            byte_level_regex().into()
        }
    })
}

impl Tokenizer {
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.add_bos {
            if let Some((b, _)) = &self.bos_token {
                ids.push(*b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Tokenize text that is data (a document, a question, a message): control-token
    /// text in it such as `<|im_start|>` is encoded as the plain text it is, never as the
    /// control token, so a document cannot open a turn of its own. Text without any is
    /// encoded exactly as [`Tokenizer::encode`] encodes it.
    pub fn encode_data(&self, text: &str) -> Result<Vec<u32>> {
        if !self.has_control_text(text) {
            return self.encode(text, false);
        }
        let data = self.data_inner.get_or_init(|| {
            let mut t = self.inner.clone();
            t.set_encode_special_tokens(true);
            t
        });
        let enc = data.encode(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Whether `text` holds the text of a control (special) token of this vocabulary.
    pub fn has_control_text(&self, text: &str) -> bool {
        self.control_texts
            .get_or_init(|| {
                self.inner
                    .get_added_tokens_decoder()
                    .into_values()
                    .filter(|t| t.special && !t.content.is_empty())
                    .map(|t| t.content)
                    .collect()
            })
            .iter()
            .any(|c| text.contains(c.as_str()))
    }

    /// Tokenize a rendered chat: the template's own text with control tokens parsed,
    /// the messages' contents as data ([`Tokenizer::encode_data`]). When no content
    /// holds control-token text, this is the plain encoding of the whole text.
    pub fn encode_chat(&self, chat: &RenderedChat) -> Result<Vec<u32>> {
        if !chat
            .runs
            .iter()
            .any(|r| r.data && self.has_control_text(&r.text))
        {
            return self.encode(&chat.text(), false);
        }
        let mut ids = Vec::new();
        for r in &chat.runs {
            ids.extend(if r.data {
                self.encode_data(&r.text)?
            } else {
                self.encode(&r.text, false)?
            });
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    /// Id of a token string (vocab or added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// A single token decoded for display (lossy for partial UTF-8 byte tokens).
    pub fn token_piece(&self, id: u32) -> String {
        match self.inner.decode(&[id], false) {
            Ok(s) => s,
            Err(_) => self
                .inner
                .id_to_token(id)
                .unwrap_or_else(|| format!("<id {id}>")),
        }
    }

    // -----------------------------------------------------------------------------------
    // construction: GGUF
    // -----------------------------------------------------------------------------------

    /// Rebuild the tokenizer from GGUF metadata.
    pub fn from_gguf_meta(m: &GgufTokenizerMeta) -> Result<Tokenizer> {
        let bad = |msg: String| Error::bad_model(&m.source, msg);
        if m.tokens.is_empty() {
            return Err(bad("tokenizer.ggml.tokens is empty".into()));
        }
        if m.tokens.len() > MAX_VOCAB {
            return Err(bad(format!(
                "tokenizer.ggml.tokens has {} entries, more than the {MAX_VOCAB} this engine \
                 accepts (corrupt file?)",
                m.tokens.len()
            )));
        }
        if let Some((i, t)) = m
            .tokens
            .iter()
            .enumerate()
            .find(|(_, t)| t.len() > MAX_TOKEN_BYTES)
        {
            return Err(bad(format!(
                "tokenizer.ggml.tokens[{i}] is {} bytes long, more than {MAX_TOKEN_BYTES} \
                 (corrupt file?)",
                t.len()
            )));
        }
        if m.merges.len() > MAX_MERGES {
            return Err(bad(format!(
                "tokenizer.ggml.merges has {} entries, more than {MAX_MERGES} (corrupt file?)",
                m.merges.len()
            )));
        }
        if !m.token_types.is_empty() && m.token_types.len() != m.tokens.len() {
            return Err(bad(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                m.token_types.len(),
                m.tokens.len()
            )));
        }
        let mut inner = match m.model.as_str() {
            "gpt2" => Self::build_gpt2(m)?,
            "llama" => Self::build_spm(m)?,
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: GGUF tokenizer model {other:?} (supported: gpt2 byte-level BPE, llama SentencePiece)",
                    m.source.display()
                )))
            }
        };

        // Control and user-defined tokens become special added tokens, so that e.g.
        // "<|im_start|>" in a prompt encodes to its single id.
        let specials: Vec<AddedToken> = m
            .tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                matches!(
                    m.token_types.get(*i).copied(),
                    Some(token_type::CONTROL) | Some(token_type::USER_DEFINED)
                )
            })
            .filter(|(_, t)| !t.is_empty())
            .map(|(_, t)| AddedToken::from(t.clone(), true))
            .collect();
        inner.add_special_tokens(&specials);

        let tok =
            |id: Option<u32>| id.and_then(|i| m.tokens.get(i as usize).map(|t| (i, t.clone())));
        let bos_token = tok(m.bos_id);
        let eos_token = tok(m.eos_id);
        let add_bos = m.add_bos.unwrap_or(m.model == "llama") && bos_token.is_some();

        let mut stop_ids = Vec::new();
        if let Some((e, _)) = &eos_token {
            stop_ids.push(*e);
        }
        if let Some(e) = m.eot_id {
            stop_ids.push(e);
        }
        let index: HashMap<&str, u32> = STOP_TOKEN_STRINGS
            .iter()
            .filter_map(|s| m.tokens.iter().position(|t| t == s).map(|i| (*s, i as u32)))
            .collect();
        for s in STOP_TOKEN_STRINGS {
            if let Some(&i) = index.get(s) {
                stop_ids.push(i);
            }
        }
        dedup_keep_order(&mut stop_ids);

        Ok(Tokenizer {
            inner,
            chat_template: m.chat_template.clone().filter(|t| !t.trim().is_empty()),
            bos_token,
            eos_token,
            stop_ids,
            add_bos,
            data_inner: Default::default(),
            control_texts: Default::default(),
        })
    }

    fn build_gpt2(m: &GgufTokenizerMeta) -> Result<tokenizers::Tokenizer> {
        let bad = |msg: String| Error::bad_model(&m.source, msg);
        let mut vocab: Vocab = Vocab::default();
        for (i, t) in m.tokens.iter().enumerate() {
            // First occurrence wins (duplicates are rare and harmless).
            vocab.entry(t.clone()).or_insert(i as u32);
        }
        let mut merges: Merges = Vec::with_capacity(m.merges.len());
        for (i, mg) in m.merges.iter().enumerate() {
            let (a, b) = mg.split_once(' ').ok_or_else(|| {
                bad(format!(
                    "tokenizer.ggml.merges[{i}] = {mg:?} is not \"a b\""
                ))
            })?;
            merges.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| bad(format!("cannot build BPE tokenizer: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = m.pre.as_deref().unwrap_or("default");
        inner.with_pre_tokenizer(Some(pre_tokenizer_for(pre)?));
        inner.with_decoder(Some(ByteLevel::new(false, true, true)));
        Ok(inner)
    }

    /// SentencePiece (llama/mistral/tinyllama) as HF does it: BPE with byte fallback and
    /// merges recovered from the vocab scores.
    fn build_spm(m: &GgufTokenizerMeta) -> Result<tokenizers::Tokenizer> {
        let bad = |msg: String| Error::bad_model(&m.source, msg);
        if m.scores.len() != m.tokens.len() {
            return Err(bad(format!(
                "SentencePiece tokenizer needs tokenizer.ggml.scores for every token ({} scores, {} tokens)",
                m.scores.len(),
                m.tokens.len()
            )));
        }
        let mut vocab: Vocab = Vocab::default();
        for (i, t) in m.tokens.iter().enumerate() {
            vocab.entry(t.clone()).or_insert(i as u32);
        }
        // A piece's score as a sort key: NaN ranks last, -0.0 ties with 0.0.
        let score = |s: f32| {
            if s.is_nan() {
                f32::NEG_INFINITY
            } else {
                s + 0.0
            }
        };
        // Merges: HF's SentencePieceExtractor. Only NORMAL (or untyped) pieces take part.
        let mut merges: Vec<(u32, u32, f32)> = Vec::new();
        for (i, piece) in m.tokens.iter().enumerate() {
            let ty = m.token_types.get(i).copied().unwrap_or(token_type::NORMAL);
            if ty != token_type::NORMAL && ty != token_type::USER_DEFINED {
                continue;
            }
            let mut local = Vec::new();
            for (k, _) in piece.char_indices().skip(1) {
                let (l, r) = piece.split_at(k);
                if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                    local.push((li, ri, score(m.scores[i])));
                }
            }
            local.sort_by_key(|&(l, r, _)| (l, r));
            merges.extend(local);
        }
        // Stable sort by score, highest first. `score` made the order total (a NaN
        // that compared "equal" to everything could make the sort panic).
        merges.sort_by(|a, b| b.2.total_cmp(&a.2));
        let merges: Merges = merges
            .into_iter()
            .map(|(l, r, _)| (m.tokens[l as usize].clone(), m.tokens[r as usize].clone()))
            .collect();
        let unk = m
            .unk_id
            .and_then(|u| m.tokens.get(u as usize).cloned())
            .unwrap_or_else(|| "<unk>".into());
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(unk)
            .fuse_unk(true)
            .byte_fallback(true)
            .build()
            .map_err(|e| bad(format!("cannot build SentencePiece-BPE tokenizer: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let add_prefix = m.add_space_prefix.unwrap_or(true);
        let mut norms: Vec<NormalizerWrapper> = Vec::new();
        if add_prefix {
            norms.push(Prepend::new("\u{2581}".into()).into());
        }
        norms.push(Replace::new(" ", "\u{2581}").map_err(tok_err)?.into());
        inner.with_normalizer(Some(tokenizers::normalizers::Sequence::new(norms)));
        let mut decs: Vec<DecoderWrapper> = vec![
            tokenizers::normalizers::Replace::new("\u{2581}", " ")
                .map_err(tok_err)?
                .into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if add_prefix {
            decs.push(DecoderStrip::new(' ', 1, 0).into());
        }
        inner.with_decoder(Some(DecoderSequence::new(decs)));
        Ok(inner)
    }

    // -----------------------------------------------------------------------------------
    // construction: HF folder
    // -----------------------------------------------------------------------------------

    /// Load from an HF model folder's files. `config_eos_ids` are the `eos_token_id`(s) of
    /// `config.json` / `generation_config.json`; they become stop ids too.
    pub fn from_hf_files(
        tokenizer_json: &Path,
        tokenizer_config_json: Option<&Path>,
        chat_template_jinja: Option<&Path>,
        config_eos_ids: &[u32],
    ) -> Result<Tokenizer> {
        let text =
            std::fs::read_to_string(tokenizer_json).map_err(|e| Error::io(tokenizer_json, e))?;
        let inner: tokenizers::Tokenizer = text.parse().map_err(|e| {
            Error::bad_model(tokenizer_json, format!("invalid tokenizer.json: {e}"))
        })?;

        let cfg: serde_json::Value = match tokenizer_config_json {
            Some(p) => {
                let t = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
                serde_json::from_str(&t)
                    .map_err(|e| Error::bad_model(p, format!("invalid JSON: {e}")))?
            }
            None => serde_json::Value::Null,
        };
        let token_field = |key: &str| -> Option<String> {
            match cfg.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
                _ => None,
            }
        };
        let with_id = |s: Option<String>| s.and_then(|s| inner.token_to_id(&s).map(|id| (id, s)));
        let bos_token = with_id(token_field("bos_token"));
        let mut eos_token = with_id(token_field("eos_token"));
        if eos_token.is_none() {
            eos_token = config_eos_ids
                .first()
                .and_then(|&id| inner.id_to_token(id).map(|t| (id, t)));
        }
        let add_bos = match cfg.get("add_bos_token").and_then(|v| v.as_bool()) {
            Some(b) => b && bos_token.is_some(),
            None => match (&bos_token, inner.encode("a", true)) {
                // The post-processor (e.g. Llama-3's TemplateProcessing) adds BOS.
                (Some((b, _)), Ok(enc)) => enc.get_ids().first() == Some(b),
                _ => false,
            },
        };
        let mut chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|e| e.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_owned),
            _ => None,
        };
        if chat_template.is_none() {
            if let Some(p) = chat_template_jinja {
                if p.exists() {
                    chat_template = Some(std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?);
                }
            }
        }
        let mut stop_ids: Vec<u32> = Vec::new();
        if let Some((e, _)) = &eos_token {
            stop_ids.push(*e);
        }
        stop_ids.extend_from_slice(config_eos_ids);
        for s in STOP_TOKEN_STRINGS {
            if let Some(id) = inner.token_to_id(s) {
                stop_ids.push(id);
            }
        }
        dedup_keep_order(&mut stop_ids);
        Ok(Tokenizer {
            inner,
            chat_template: chat_template.filter(|t| !t.trim().is_empty()),
            bos_token,
            eos_token,
            stop_ids,
            add_bos,
            data_inner: Default::default(),
            control_texts: Default::default(),
        })
    }

    /// The `tokenizer.json` text (for writing HF folders).
    pub fn to_hf_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(tok_err)
    }

    /// A `tokenizer_config.json` for this tokenizer (bos/eos/add_bos/chat_template).
    pub fn tokenizer_config_json(&self) -> serde_json::Value {
        let mut o = serde_json::Map::new();
        o.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        o.insert("clean_up_tokenization_spaces".into(), false.into());
        o.insert("add_bos_token".into(), self.add_bos.into());
        o.insert("add_eos_token".into(), false.into());
        o.insert(
            "bos_token".into(),
            self.bos_token.as_ref().map(|(_, s)| s.clone()).into(),
        );
        o.insert(
            "eos_token".into(),
            self.eos_token.as_ref().map(|(_, s)| s.clone()).into(),
        );
        if let Some(t) = &self.chat_template {
            o.insert("chat_template".into(), t.clone().into());
        }
        serde_json::Value::Object(o)
    }

    // -----------------------------------------------------------------------------------
    // chat template
    // -----------------------------------------------------------------------------------

    /// Render the model's chat template (HF semantics: trim_blocks + lstrip_blocks,
    /// `bos_token`, `eos_token`, `messages`, `add_generation_prompt`, `raise_exception`).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tpl = self.chat_template.as_deref().ok_or_else(|| {
            Error::Template(
                "this model has no chat template; use --raw to pass the prompt as-is".into(),
            )
        })?;
        render_chat_template(
            tpl,
            messages,
            add_generation_prompt,
            self.bos_token
                .as_ref()
                .map(|(_, s)| s.as_str())
                .unwrap_or(""),
            self.eos_token
                .as_ref()
                .map(|(_, s)| s.as_str())
                .unwrap_or(""),
        )
    }
}

/// A run of a rendered chat: template text, or (data) a message's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatRun {
    pub text: String,
    /// A message's content (encoded as data), not the template's own text.
    pub data: bool,
    /// The index of the message whose content this is (data runs).
    pub message: usize,
}

/// A chat template rendered as runs of template text and message contents, so that the
/// contents can be tokenized as data ([`Tokenizer::encode_chat`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RenderedChat {
    pub runs: Vec<ChatRun>,
}

impl RenderedChat {
    /// The rendered text.
    pub fn text(&self) -> String {
        self.runs.iter().map(|r| r.text.as_str()).collect()
    }

    /// The runs before message `i`'s content, and the rest (from that content on), or
    /// `None` if the template did not render that content.
    pub fn split_at_message(&self, i: usize) -> Option<(RenderedChat, RenderedChat)> {
        let at = self.runs.iter().position(|r| r.data && r.message == i)?;
        Some((
            RenderedChat {
                runs: self.runs[..at].to_vec(),
            },
            RenderedChat {
                runs: self.runs[at..].to_vec(),
            },
        ))
    }

    /// What this rendering adds after `prefix` (a rendering of fewer messages, or the
    /// same ones without the generation prompt), or `None` if it does not extend it.
    pub fn strip_prefix(&self, prefix: &RenderedChat) -> Option<RenderedChat> {
        let n = prefix.runs.len();
        if n == 0 {
            return Some(self.clone());
        }
        if self.runs.len() < n || self.runs[..n - 1] != prefix.runs[..n - 1] {
            return None;
        }
        let (mine, theirs) = (&self.runs[n - 1], &prefix.runs[n - 1]);
        if mine.data != theirs.data || mine.message != theirs.message {
            return None;
        }
        let rest = mine.text.strip_prefix(theirs.text.as_str())?;
        let mut runs = Vec::new();
        if !rest.is_empty() {
            if mine.data {
                return None; // a content cut in two is not a prefix
            }
            runs.push(ChatRun {
                text: rest.to_string(),
                ..mine.clone()
            });
        }
        runs.extend_from_slice(&self.runs[n..]);
        Some(RenderedChat { runs })
    }
}

impl Tokenizer {
    /// Render the chat template as [`RenderedChat`] runs: each message's content is
    /// rendered as a placeholder, then put back, so it can be told apart from the
    /// template's text. Templates that trim contents are handled; one that rewrites
    /// them otherwise gives an error when a content holds control-token text (and
    /// else one template run, the plain rendering).
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<RenderedChat> {
        let reference = self.apply_chat_template(messages, add_generation_prompt)?;
        let mark = |i: usize| format!("\u{1}KVLINK-CONTENT-{i}\u{1}");
        let marked: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| ChatMessage::new(m.role.as_str(), mark(i)))
            .collect();
        let rendered = self.apply_chat_template(&marked, add_generation_prompt)?;
        for trim in [false, true] {
            let mut runs = Vec::new();
            let mut rest = rendered.as_str();
            'scan: while !rest.is_empty() {
                if let Some(start) = rest.find("\u{1}KVLINK-CONTENT-") {
                    let after = &rest[start + "\u{1}KVLINK-CONTENT-".len()..];
                    if let Some(end) = after.find('\u{1}') {
                        if let Ok(i) = after[..end].parse::<usize>() {
                            if let Some(m) = messages.get(i) {
                                if start > 0 {
                                    runs.push(ChatRun {
                                        text: rest[..start].to_string(),
                                        data: false,
                                        message: 0,
                                    });
                                }
                                let content = if trim { m.content.trim() } else { &m.content };
                                if !content.is_empty() {
                                    runs.push(ChatRun {
                                        text: content.to_string(),
                                        data: true,
                                        message: i,
                                    });
                                }
                                rest = &after[end + 1..];
                                continue 'scan;
                            }
                        }
                    }
                }
                runs.push(ChatRun {
                    text: rest.to_string(),
                    data: false,
                    message: 0,
                });
                break;
            }
            let chat = RenderedChat { runs };
            if chat.text() == reference {
                return Ok(chat);
            }
        }
        if messages.iter().any(|m| self.has_control_text(&m.content)) {
            return Err(Error::Template(
                "a message holds control-token text and the chat template rewrites message \
                 text, so kvlink cannot keep that text apart from the template's own tokens; \
                 remove the control-token text from the message"
                    .into(),
            ));
        }
        Ok(RenderedChat {
            runs: vec![ChatRun {
                text: reference,
                data: false,
                message: 0,
            }],
        })
    }
}

/// Render a Jinja chat template the way HF transformers does.
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_function("strftime_now", |fmt: String| -> String {
        // No date/time dependency: templates use this for "Today Date" lines only.
        let _ = fmt;
        "26 Jul 2024".to_string()
    });
    let render_err = |e: minijinja::Error| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        Error::Template(msg)
    };
    env.add_template_owned("chat", template.to_string())
        .map_err(render_err)?;
    let t = env.get_template("chat").map_err(render_err)?;
    t.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(render_err)
}

fn dedup_keep_order(v: &mut Vec<u32>) {
    let mut seen = std::collections::HashSet::new();
    v.retain(|x| seen.insert(*x));
}

// ---------------------------------------------------------------------------------------
// streaming decode
// ---------------------------------------------------------------------------------------

/// Incremental detokenizer: feed ids one at a time, get back the newly completed text.
/// Text is held back while the decoded tail is an incomplete UTF-8 sequence (U+FFFD).
pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the window that is re-decoded for context.
    prefix_offset: usize,
    /// End of the ids whose text has been emitted.
    read_offset: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        TextStream {
            tok,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = self
            .tok
            .decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let out = if full.starts_with(&prefix) {
                full[prefix.len()..].to_string()
            } else {
                // Decoding changed the earlier text (should not happen with byte-level
                // decoders); emit from the first differing char.
                let common = full
                    .char_indices()
                    .zip(prefix.chars())
                    .take_while(|((_, a), b)| a == b)
                    .last()
                    .map(|((i, c), _)| i + c.len_utf8())
                    .unwrap_or(0);
                full[common..].to_string()
            };
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(out)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever text is still held back (possibly with U+FFFD for a cut-off character).
    pub fn finish(&mut self) -> Result<String> {
        if self.read_offset >= self.ids.len() {
            return Ok(String::new());
        }
        let prefix = self
            .tok
            .decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.tok.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(match full.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.to_string(),
            None => full,
        })
    }
}
