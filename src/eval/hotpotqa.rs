//! HotpotQA (dev, distractor setting) in the official `hotpot_dev_distractor_v1.json`
//! format: a JSON list of records
//! `{"_id", "question", "answer", "context": [[title, [sentence, ...]], ...], ...}`
//! (`supporting_facts` names the gold paragraphs; other fields such as `type`, `level`
//! are ignored).
//!
//! Prompt layout of the KVLink reference evaluation (`hqa_eval.py`): the system text
//! [`SYSTEM_PROMPT`], then one document per context paragraph,
//! `Document [j](Title: T) text\n` with j counted from 1 in the record's order and the
//! paragraph's sentences joined with no separator, then the question text as is, inside
//! the model's chat template.

use crate::error::{Error, Result};
use crate::link::Mode;
use crate::Request;
use serde::Deserialize;
use std::path::Path;

/// The system message of the reference evaluation (typo included, as in the paper's code).
pub const SYSTEM_PROMPT: &str = "You are a intelligent AI assistant. Please answer questions \
     based on the user's instruction. Below are some reference documents that may help you \
     in answering the user's question.";

/// One question with its paragraphs.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct HotpotRecord {
    #[serde(rename = "_id")]
    pub id: String,
    pub question: String,
    pub answer: String,
    /// `[title, sentences]` per paragraph.
    pub context: Vec<(String, Vec<String>)>,
    /// Further accepted answers besides `answer` (SQuAD lists several; HotpotQA none).
    #[serde(default)]
    pub other_answers: Vec<String>,
    /// HotpotQA's `[title, sentence]` pairs of the facts the answer needs.
    #[serde(default)]
    pub supporting_facts: Vec<(String, serde_json::Value)>,
    /// Documents (1-based) holding the answer where no `supporting_facts` say it (SQuAD's
    /// gold paragraph).
    #[serde(default)]
    pub gold_docs: Vec<usize>,
}

/// The text of document `j` (1-based) as the reference formats it.
pub fn format_document(j: usize, title: &str, sentences: &[String]) -> String {
    format!("Document [{j}](Title: {title}) {}\n", sentences.concat())
}

impl HotpotRecord {
    /// The formatted documents, in the record's paragraph order.
    pub fn documents(&self) -> Vec<String> {
        self.context
            .iter()
            .enumerate()
            .map(|(i, (t, s))| format_document(i + 1, t, s))
            .collect()
    }

    /// The documents (1-based, in order) that hold what the answer needs: `gold_docs`, or
    /// those whose title a supporting fact names; empty where the record says neither.
    pub fn gold_documents(&self) -> Vec<usize> {
        if !self.gold_docs.is_empty() {
            return self.gold_docs.clone();
        }
        let titles: Vec<&str> = self.supporting_facts.iter().map(|f| f.0.as_str()).collect();
        (self.context.iter().enumerate())
            .filter(|(_, (t, _))| titles.contains(&t.as_str()))
            .map(|(i, _)| i + 1)
            .collect()
    }

    /// Every accepted answer: `answer`, then `other_answers`.
    pub fn golds(&self) -> Vec<&str> {
        std::iter::once(self.answer.as_str())
            .chain(self.other_answers.iter().map(String::as_str))
            .collect()
    }

    /// The RAG request of this question (chat template, the reference system prompt).
    pub fn request(&self, mode: Mode) -> Request {
        Request {
            system: Some(SYSTEM_PROMPT.to_string()),
            history: Vec::new(),
            documents: self.documents(),
            question: self.question.clone(),
            raw: false,
            mode,
        }
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.id.trim().is_empty() {
            return Err("empty \"_id\"".into());
        }
        if self.question.trim().is_empty() {
            return Err("empty \"question\"".into());
        }
        if self.context.is_empty() {
            return Err("\"context\" has no paragraphs".into());
        }
        Ok(())
    }
}

/// Parse a HotpotQA file's text; `what` names it in errors. A malformed record gives an
/// error naming its index (0-based) and `_id` (when it has one) and what is wrong.
pub fn parse(text: &str, what: &str) -> Result<Vec<HotpotRecord>> {
    let values: Vec<serde_json::Value> = serde_json::from_str(text).map_err(|e| {
        Error::Input(format!(
            "{what}: not a HotpotQA file (expected a JSON list of records): {e}"
        ))
    })?;
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let id = v
                .get("_id")
                .and_then(|x| x.as_str())
                .map(|s| format!(" (_id {s})"))
                .unwrap_or_default();
            let bad = |msg: String| Error::Input(format!("{what}: record {i}{id}: {msg}"));
            let r = HotpotRecord::deserialize(v).map_err(|e| bad(e.to_string()))?;
            r.check().map_err(bad)?;
            Ok(r)
        })
        .collect()
}

/// Read a HotpotQA file (see [`parse`]).
pub fn load(path: &Path) -> Result<Vec<HotpotRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse(&text, &path.display().to_string())
}

/// `<cache dir>/data/hotpotqa.json`, where `scripts/fetch-eval-data.sh` puts it.
pub fn default_path() -> std::path::PathBuf {
    crate::model::paths::cache_dir()
        .join("data")
        .join("hotpotqa.json")
}
