//! The prompt plan (KVLINK.md §1): the token sequence of a RAG request with a segment id
//! and a global position per token.
//!
//! ```text
//! [prefix ....][S][doc 1 ...][L1 x k][doc 2 ...][L2 x k] ... [E][question ...][assistant header]
//!  seg 0        0  seg 1     seg 0   seg 2     seg 0          0  seg 0         seg 0
//! ```

use crate::error::{Error, Result};
use serde::Serialize;

pub use crate::model::link_config::{LinkConfig, MAX_LINK_TOKENS, MAX_SLOTS};

/// Where a document sits in the plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DocSpan {
    /// First global position (= cache slot) of the document.
    pub start: usize,
    pub len: usize,
    /// Segment id (j + 1 for document slot j).
    pub seg: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PromptPlan {
    pub tokens: Vec<u32>,
    pub segments: Vec<u32>,
    pub positions: Vec<i32>,
    pub prefix_len: usize,
    pub docs: Vec<DocSpan>,
    /// Where the tail (question + assistant header) starts.
    pub tail_start: usize,
}

impl PromptPlan {
    /// Lay out prefix, documents (each with its link tokens), markers and tail.
    pub fn build(
        prefix: &[u32],
        docs: &[&[u32]],
        tail: &[u32],
        link: &LinkConfig,
    ) -> Result<PromptPlan> {
        link.check_bounds()
            .map_err(|m| Error::Input(format!("link tokens: {m}")))?;
        if let Some(j) = docs.iter().position(|d| d.is_empty()) {
            return Err(Error::Input(format!("document {} is empty", j + 1)));
        }
        let mut tokens = prefix.to_vec();
        let mut segments = vec![0u32; prefix.len()];
        let mut spans = Vec::with_capacity(docs.len());
        let push = |t: &mut Vec<u32>, s: &mut Vec<u32>, id: u32, seg: u32| {
            t.push(id);
            s.push(seg);
        };
        if !docs.is_empty() {
            if let Some(sid) = link.kv_start {
                push(&mut tokens, &mut segments, sid, 0);
            }
        }
        for (j, d) in docs.iter().enumerate() {
            let seg = j as u32 + 1;
            spans.push(DocSpan {
                start: tokens.len(),
                len: d.len(),
                seg,
            });
            for &id in d.iter() {
                push(&mut tokens, &mut segments, id, seg);
            }
            for i in 0..link.k {
                let id = link.try_link_id(j, i).ok_or_else(|| {
                    Error::Input(format!(
                        "link token {i} of document {} overflows a token id (link_base {:?}, \
                         k {})",
                        j + 1,
                        link.link_base,
                        link.k
                    ))
                })?;
                push(&mut tokens, &mut segments, id, 0);
            }
        }
        if !docs.is_empty() {
            if let Some(eid) = link.kv_end {
                push(&mut tokens, &mut segments, eid, 0);
            }
        }
        let tail_start = tokens.len();
        for &id in tail {
            push(&mut tokens, &mut segments, id, 0);
        }
        let positions = (0..tokens.len() as i32).collect();
        Ok(PromptPlan {
            tokens,
            segments,
            positions,
            prefix_len: prefix.len(),
            docs: spans,
            tail_start,
        })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// For inspection: a group per token (0 prefix, 1..=D documents, D+1 link tokens and
    /// markers, D+2 the tail) and the group names, plus "answer" (D+3) for generated
    /// tokens.
    pub fn groups(&self) -> (Vec<u32>, Vec<String>) {
        let d = self.docs.len() as u32;
        let mut g = vec![d + 1; self.len()];
        g[..self.prefix_len].fill(0);
        for (j, span) in self.docs.iter().enumerate() {
            g[span.start..span.start + span.len].fill(j as u32 + 1);
        }
        g[self.tail_start..].fill(d + 2);
        let mut names = vec!["prefix".to_string()];
        names.extend((1..=d).map(|j| format!("doc {j}")));
        names.extend([
            "links".to_string(),
            "question".to_string(),
            "answer".to_string(),
        ]);
        (g, names)
    }

    /// Indices of the seg-0 tokens after the prefix: what the reuse path computes.
    pub fn new_token_indices(&self) -> Vec<usize> {
        (self.prefix_len..self.len())
            .filter(|&i| self.segments[i] == 0)
            .collect()
    }

    pub fn doc_tokens(&self, j: usize) -> &[u32] {
        let d = &self.docs[j];
        &self.tokens[d.start..d.start + d.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn kvlink_json_with_absurd_counts_is_an_error() {
        let p = Path::new("kvlink.json");
        let ok = LinkConfig::parse(br#"{"k": 5, "link_base": 100, "max_slots": 40}"#, p).unwrap();
        assert_eq!((ok.k, ok.link_base, ok.max_slots), (5, Some(100), 40));
        for (json, needle) in [
            (
                r#"{"k": 18446744073709551615, "link_base": 1}"#,
                "link tokens per document",
            ),
            (
                r#"{"k": 5, "link_base": 1, "max_slots": 4000000000}"#,
                "max_slots",
            ),
            (r#"{"k": -1}"#, "invalid kvlink.json"),
            (r#"{"link_base": 4294967296}"#, "invalid kvlink.json"),
            ("[", "invalid kvlink.json"),
        ] {
            match LinkConfig::parse(json.as_bytes(), p) {
                Err(Error::BadModel { msg, .. }) => {
                    assert!(msg.contains(needle), "{json}: {msg:?} lacks {needle:?}")
                }
                other => panic!("{json}: expected BadModel, got {other:?}"),
            }
        }
    }

    #[test]
    fn link_id_overflow_is_an_error_not_a_panic() {
        // Ids past u32::MAX: validate and build must report, not overflow.
        let link = LinkConfig {
            k: 200,
            link_base: Some(u32::MAX - 10),
            max_slots: 60000,
            ..Default::default()
        };
        assert!(matches!(
            link.validate(usize::MAX, 60000),
            Err(Error::Input(_))
        ));
        assert_eq!(link.try_link_id(0, 11), None);
        assert_eq!(link.link_id(0, 11), u32::MAX);
        let e = PromptPlan::build(&[], &[&[1]], &[], &link).unwrap_err();
        assert!(e.to_string().contains("overflows a token id"), "{e}");
        // k * n_docs overflowing usize in validate (unchecked before).
        let huge = LinkConfig {
            k: usize::MAX / 2,
            link_base: Some(0),
            ..Default::default()
        };
        assert!(matches!(huge.validate(1000, 4), Err(Error::Input(_))));
        assert!(PromptPlan::build(&[], &[&[1]], &[], &huge).is_err());
    }

    #[test]
    fn layout_matches_kvlink_md_section_1() {
        let link = LinkConfig {
            k: 2,
            link_base: Some(100),
            kv_start: Some(90),
            kv_end: Some(91),
            max_slots: 40,
        };
        let p = PromptPlan::build(&[1, 2], &[&[10, 11, 12], &[20]], &[30, 31], &link).unwrap();
        assert_eq!(
            p.tokens,
            vec![1, 2, 90, 10, 11, 12, 100, 101, 20, 102, 103, 91, 30, 31]
        );
        assert_eq!(p.segments, vec![0, 0, 0, 1, 1, 1, 0, 0, 2, 0, 0, 0, 0, 0]);
        assert_eq!(p.positions, (0..14).collect::<Vec<i32>>());
        assert_eq!(
            p.docs[0],
            DocSpan {
                start: 3,
                len: 3,
                seg: 1
            }
        );
        assert_eq!(
            p.docs[1],
            DocSpan {
                start: 8,
                len: 1,
                seg: 2
            }
        );
        assert_eq!(p.new_token_indices(), vec![2, 6, 7, 9, 10, 11, 12, 13]);
        assert_eq!(p.doc_tokens(0), &[10, 11, 12]);
        assert_eq!(p.tail_start, 12);
        let (g, names) = p.groups();
        assert_eq!(g, vec![0, 0, 3, 1, 1, 1, 3, 3, 2, 3, 3, 3, 4, 4]);
        assert_eq!(
            names,
            ["prefix", "doc 1", "doc 2", "links", "question", "answer"]
        );
    }

    #[test]
    fn plain_models_have_no_markers_and_bad_configs_are_refused() {
        let p = PromptPlan::build(&[], &[&[5, 6]], &[7], &LinkConfig::default()).unwrap();
        assert_eq!(p.tokens, vec![5, 6, 7]);
        assert_eq!(p.segments, vec![1, 1, 0]);
        assert!(PromptPlan::build(&[], &[&[]], &[7], &LinkConfig::default()).is_err());
        let link = LinkConfig {
            k: 5,
            link_base: Some(995),
            ..Default::default()
        };
        assert!(link.validate(1000, 1).is_ok());
        assert!(link.validate(1000, 2).is_err());
        let bad = LinkConfig {
            kv_start: Some(5000),
            ..Default::default()
        };
        assert!(bad.validate(1000, 1).is_err());
    }
}
