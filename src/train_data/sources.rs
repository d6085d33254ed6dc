//! The data the training samples are built from (`scripts/fetch-train-data.sh` puts it
//! in `<cache dir>/data/`), and the rules that keep evaluation questions out of it.

use super::Turn;
use crate::error::{Error, Result};
use crate::eval::{hotpotqa, squad, HotpotRecord};
use crate::model::ChatMessage;
use std::collections::HashSet;
use std::io::BufRead;
use std::path::Path;

/// HotpotQA questions 0..TEST are the test set, TEST..VALIDATION the validation set.
pub const HOTPOT_TEST: usize = 500;
pub const HOTPOT_VALIDATION: usize = 1000;

/// The HotpotQA questions training may use: index >= 1000, and none of whose paragraph
/// titles occurs in any of questions 0-999 (so no test or validation paragraph is ever
/// trained on).
pub fn hotpot_train(all: &[HotpotRecord]) -> Vec<HotpotRecord> {
    let held: HashSet<&str> = all
        .iter()
        .take(HOTPOT_VALIDATION)
        .flat_map(|r| r.context.iter().map(|(t, _)| t.as_str()))
        .collect();
    all.iter()
        .skip(HOTPOT_VALIDATION)
        .filter(|r| r.context.iter().all(|(t, _)| !held.contains(t.as_str())))
        .cloned()
        .collect()
}

/// The QA pool: HotpotQA's training part and SQuAD's training articles.
pub fn qa_pool(hotpot: &Path, squad_path: &Path) -> Result<Vec<HotpotRecord>> {
    let mut out = hotpot_train(&hotpotqa::load(hotpot)?);
    out.extend(squad::records(
        &squad::load(squad_path)?,
        squad::Part::Train,
    ));
    Ok(out)
}

/// Conversations from a ShareGPT-style JSON Lines file (one record per line:
/// `{"conversations": [{"from": "human"|"gpt", "value": "..."}, ...]}`), turned into
/// user/assistant turns. Records whose turns do not alternate from a user turn are cut
/// at the first turn that breaks the pattern; a trailing user turn is dropped; records
/// left with no exchange are skipped. At most `limit` conversations are read.
pub fn conversations(path: &Path, limit: usize) -> Result<Vec<Vec<Turn>>> {
    #[derive(serde::Deserialize)]
    struct Msg {
        from: String,
        value: String,
    }
    #[derive(serde::Deserialize)]
    struct Rec {
        conversations: Vec<Msg>,
    }
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        if out.len() >= limit {
            break;
        }
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: Rec = serde_json::from_str(&line)
            .map_err(|e| Error::Input(format!("{}: line {}: {e}", path.display(), i + 1)))?;
        let mut turns: Vec<Turn> = Vec::new();
        for m in r.conversations {
            let role = match m.from.as_str() {
                "human" | "user" => "user",
                "gpt" | "assistant" | "chatgpt" => "assistant",
                _ => break,
            };
            let want = if turns.len().is_multiple_of(2) {
                "user"
            } else {
                "assistant"
            };
            if role != want || m.value.trim().is_empty() {
                break;
            }
            turns.push(ChatMessage::new(role, m.value.trim()));
        }
        if turns.len() % 2 == 1 {
            turns.pop();
        }
        if !turns.is_empty() {
            out.push(turns);
        }
    }
    Ok(out)
}

/// Texts: the articles of a WikiExtractor file (`<doc ...>` ... `</doc>`), or a JSON
/// file `{"text": "..."}` (the essays), cut into pieces of at most `max_chars` at
/// paragraph breaks. Pieces shorter than `min_chars` are dropped.
pub fn texts(path: &Path, min_chars: usize, max_chars: usize) -> Result<Vec<String>> {
    let raw = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let docs: Vec<String> = if raw.trim_start().starts_with('{') {
        #[derive(serde::Deserialize)]
        struct T {
            text: String,
        }
        let t: T = serde_json::from_str(&raw).map_err(|e| {
            Error::Input(format!(
                "{}: expected {{\"text\": ...}}: {e}",
                path.display()
            ))
        })?;
        vec![t.text]
    } else {
        let mut docs = Vec::new();
        let mut cur = String::new();
        for line in raw.lines() {
            let t = line.trim_start();
            if t.starts_with("<doc") || t.starts_with("</doc>") {
                if !cur.trim().is_empty() {
                    docs.push(std::mem::take(&mut cur));
                }
                cur.clear();
                continue;
            }
            cur.push_str(line);
            cur.push('\n');
        }
        if !cur.trim().is_empty() {
            docs.push(cur);
        }
        docs
    };
    let mut out = Vec::new();
    for d in docs {
        let mut piece = String::new();
        for para in d.split("\n\n") {
            if !piece.is_empty() && piece.len() + para.len() > max_chars {
                out.push(std::mem::take(&mut piece));
            }
            if !piece.is_empty() {
                piece.push_str("\n\n");
            }
            piece.push_str(para);
        }
        out.push(piece);
    }
    out.retain(|p| p.trim().len() >= min_chars);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, titles: &[&str]) -> HotpotRecord {
        HotpotRecord {
            id: id.into(),
            question: "q".into(),
            answer: "a".into(),
            context: titles
                .iter()
                .map(|t| (t.to_string(), vec!["s".to_string()]))
                .collect(),
            other_answers: Vec::new(),
            supporting_facts: Vec::new(),
            gold_docs: Vec::new(),
        }
    }

    #[test]
    fn hotpot_training_part_excludes_test_and_validation_paragraphs() {
        let mut all: Vec<HotpotRecord> = (0..HOTPOT_VALIDATION)
            .map(|i| rec(&format!("e{i}"), &[&format!("T{i}"), "Shared"]))
            .collect();
        all.push(rec("ok", &["New1", "New2"]));
        all.push(rec("leak-test", &["New3", "T3"]));
        all.push(rec("leak-val", &["T999", "New4"]));
        all.push(rec("leak-shared", &["Shared"]));
        let train = hotpot_train(&all);
        let ids: Vec<&str> = train.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["ok"]);
    }

    #[test]
    fn conversations_are_cut_to_alternating_exchanges() {
        let dir = std::env::temp_dir().join(format!("kvlink-conv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.jsonl");
        std::fs::write(
            &p,
            concat!(
                r#"{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}, {"from": "human", "value": "more"}]}"#, "\n",
                r#"{"conversations": [{"from": "gpt", "value": "starts wrong"}]}"#, "\n",
                "\n",
                r#"{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "gpt", "value": "c"}]}"#, "\n",
            ),
        )
        .unwrap();
        let c = conversations(&p, 10).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].len(), 2);
        assert_eq!(c[0][1].content, "hello");
        assert_eq!(c[1].len(), 2);
        assert_eq!(conversations(&p, 1).unwrap().len(), 1);
        std::fs::write(&p, "{not json\n").unwrap();
        let e = conversations(&p, 10).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
