//! SQuAD v2 dev as a ten-document RAG task, and its train/test split by article.
//!
//! Each answerable question becomes a [`HotpotRecord`]: its gold paragraph plus nine
//! other paragraphs of the same article (fewer only if the article has fewer), in an
//! order drawn from a generator seeded by the question id, so the record is the same on
//! every machine and in every run. Documents are formatted like HotpotQA's
//! (`Document [j](Title: T) text\n`, the article title with `_` shown as spaces).
//!
//! **Split**: the [`HELD_OUT`] articles with the fewest answerable questions (ties broken
//! by title) are the test set (`kvlink eval squad`); every other article may be used for
//! training (`kvlink train-data`). Whole articles are held out, so no test paragraph is
//! ever seen in training.

use super::hotpotqa::HotpotRecord;
use crate::error::{Error, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use std::path::Path;

/// Articles held out as the test set.
pub const HELD_OUT: usize = 5;
/// Paragraphs per question: the gold one and up to nine distractors.
pub const DOCS_PER_QUESTION: usize = 10;

#[derive(Debug, Deserialize)]
struct SquadFile {
    data: Vec<Article>,
}

#[derive(Debug, Deserialize)]
pub struct Article {
    pub title: String,
    pub paragraphs: Vec<Paragraph>,
}

#[derive(Debug, Deserialize)]
pub struct Paragraph {
    pub context: String,
    pub qas: Vec<Question>,
}

#[derive(Debug, Deserialize)]
pub struct Question {
    pub id: String,
    pub question: String,
    #[serde(default)]
    pub answers: Vec<AnswerSpan>,
    #[serde(default)]
    pub is_impossible: bool,
}

#[derive(Debug, Deserialize)]
pub struct AnswerSpan {
    pub text: String,
}

impl Question {
    fn answerable(&self) -> bool {
        !self.is_impossible && self.answers.iter().any(|a| !a.text.trim().is_empty())
    }
}

/// The articles of a SQuAD (v1 or v2) JSON file.
pub fn parse(text: &str, what: &str) -> Result<Vec<Article>> {
    let f: SquadFile = serde_json::from_str(text).map_err(|e| {
        Error::Input(format!(
            "{what}: not a SQuAD file (expected {{\"data\": [articles]}}): {e}"
        ))
    })?;
    if f.data.is_empty() {
        return Err(Error::Input(format!("{what}: no articles")));
    }
    Ok(f.data)
}

pub fn load(path: &Path) -> Result<Vec<Article>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse(&text, &path.display().to_string())
}

/// `<cache dir>/data/squad-v2-dev.json`, where `scripts/fetch-train-data.sh` puts it.
pub fn default_path() -> std::path::PathBuf {
    crate::model::paths::cache_dir()
        .join("data")
        .join("squad-v2-dev.json")
}

fn answerable_count(a: &Article) -> usize {
    a.paragraphs
        .iter()
        .flat_map(|p| &p.qas)
        .filter(|q| q.answerable())
        .count()
}

/// Titles of the held-out (test) articles.
pub fn held_out_titles(articles: &[Article]) -> Vec<String> {
    let mut order: Vec<(usize, &str)> = articles
        .iter()
        .map(|a| (answerable_count(a), a.title.as_str()))
        .collect();
    order.sort();
    order
        .into_iter()
        .take(HELD_OUT)
        .map(|(_, t)| t.to_string())
        .collect()
}

/// Which part of the split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Test,
    Train,
}

/// The answerable questions of one part of the split as ten-document records, in file
/// order.
pub fn records(articles: &[Article], part: Part) -> Vec<HotpotRecord> {
    let held = held_out_titles(articles);
    let mut out = Vec::new();
    for a in articles {
        if held.contains(&a.title) != (part == Part::Test) {
            continue;
        }
        let title = a.title.replace('_', " ");
        for (pi, p) in a.paragraphs.iter().enumerate() {
            for q in p.qas.iter().filter(|q| q.answerable()) {
                out.push(record(a, &title, pi, q));
            }
        }
    }
    out
}

fn record(a: &Article, title: &str, gold: usize, q: &Question) -> HotpotRecord {
    let mut rng = rand::rngs::StdRng::seed_from_u64(crate::kv::fnv1a64(q.id.as_bytes()));
    let mut others: Vec<usize> = (0..a.paragraphs.len()).filter(|&i| i != gold).collect();
    others.shuffle(&mut rng);
    let mut chosen: Vec<usize> = others.into_iter().take(DOCS_PER_QUESTION - 1).collect();
    let at = rng.random_range(0..=chosen.len());
    chosen.insert(at, gold);
    let mut golds: Vec<String> = Vec::new();
    for s in q.answers.iter().map(|a| a.text.trim()) {
        if !s.is_empty() && !golds.iter().any(|g| g == s) {
            golds.push(s.to_string());
        }
    }
    let answer = golds.remove(0);
    HotpotRecord {
        id: q.id.clone(),
        question: q.question.trim().to_string(),
        answer,
        context: chosen
            .into_iter()
            .map(|i| {
                (
                    title.to_string(),
                    vec![a.paragraphs[i].context.trim().to_string()],
                )
            })
            .collect(),
        other_answers: golds,
        supporting_facts: Vec::new(),
        gold_docs: vec![at + 1],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(n_articles: usize, paras: usize, qs: usize) -> String {
        let arts: Vec<serde_json::Value> = (0..n_articles)
            .map(|a| {
                let ps: Vec<serde_json::Value> = (0..paras)
                    .map(|p| {
                        // article a has a + 1 answerable questions per paragraph (so the
                        // smallest articles are the first ones), plus one impossible one.
                        let mut q: Vec<serde_json::Value> = (0..qs + a)
                            .map(|k| {
                                serde_json::json!({"id": format!("a{a}p{p}q{k}"),
                                "question": format!("Q {a} {p} {k}?"),
                                "answers": [{"text": format!("ans{k}"), "answer_start": 0},
                                            {"text": format!("ans{k}"), "answer_start": 0},
                                            {"text": "other", "answer_start": 0}]})
                            })
                            .collect();
                        q.push(serde_json::json!({"id": format!("a{a}p{p}x"),
                            "question": "?", "answers": [], "is_impossible": true}));
                        serde_json::json!({"context": format!("Paragraph {a}.{p}."), "qas": q})
                    })
                    .collect();
                serde_json::json!({"title": format!("Art_{a:02}"), "paragraphs": ps})
            })
            .collect();
        serde_json::json!({"version": "v2.0", "data": arts}).to_string()
    }

    #[test]
    fn split_holds_out_whole_smallest_articles_and_records_are_stable() {
        let arts = parse(&file(8, 12, 1), "t").unwrap();
        let held = held_out_titles(&arts);
        assert_eq!(held, ["Art_00", "Art_01", "Art_02", "Art_03", "Art_04"]);
        let test = records(&arts, Part::Test);
        let train = records(&arts, Part::Train);
        // 12 paragraphs x (a + 1) answerable questions, a = 0..4 for test, 5..7 for train.
        assert_eq!(test.len(), 12 * (1 + 2 + 3 + 4 + 5));
        assert_eq!(train.len(), 12 * (6 + 7 + 8));
        // "a{a}p{p}q{k}" -> the gold paragraph's text "Paragraph {a}.{p}."
        let gold_of = |id: &str| {
            let (a, rest) = id[1..].split_once('p').unwrap();
            let p = rest.split_once('q').unwrap().0;
            (a.to_string(), format!("Paragraph {a}.{p}."))
        };
        let mut slots = std::collections::HashSet::new();
        for r in &test {
            assert_eq!(r.context.len(), DOCS_PER_QUESTION);
            let (art, gold) = gold_of(&r.id);
            let at: Vec<usize> = (0..r.context.len())
                .filter(|&i| r.context[i].1[0] == gold)
                .collect();
            assert_eq!(at.len(), 1, "the gold paragraph once");
            assert_eq!(r.gold_documents(), [at[0] + 1], "the record names it");
            slots.insert(at[0]);
            let title = format!("Art {art:0>2}");
            let prefix = format!("Paragraph {art}.");
            assert!(r
                .context
                .iter()
                .all(|(t, s)| *t == title && s[0].starts_with(&prefix)));
            assert_eq!(r.golds().len(), 2, "duplicates dropped, both texts kept");
        }
        let test_ids: std::collections::HashSet<_> = test.iter().map(|r| &r.id).collect();
        assert!(train.iter().all(|r| !test_ids.contains(&r.id)));
        assert_eq!(records(&arts, Part::Test), test, "same records every time");
        // The gold paragraph does not always sit in the same slot.
        assert!(slots.len() > 3);
    }

    #[test]
    fn malformed_files_are_named() {
        let e = parse("[1,2]", "x.json").unwrap_err().to_string();
        assert!(e.contains("x.json") && e.contains("SQuAD"), "{e}");
        assert!(parse("{\"data\": []}", "y").is_err());
    }
}
