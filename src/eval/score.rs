//! The paper's answer metric, "best subspan EM" (KVLINK.md §6; the reference evaluation
//! scripts use SQuAD's normalisation): lower-case, drop ASCII punctuation, drop the
//! articles a/an/the, collapse whitespace; a response is correct if some normalised gold
//! answer is a substring of the normalised response.

/// SQuAD answer normalisation, in the reference's order: lower-case, remove punctuation
/// (Python's `string.punctuation`, i.e. ASCII), replace the whole words "a", "an", "the"
/// by a space (`\b(a|an|the)\b`), then collapse runs of whitespace into single spaces and
/// trim.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    // Remove articles: a maximal run of word characters equal to a/an/the is exactly
    // what `\b(a|an|the)\b` matches.
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut no_articles = String::with_capacity(no_punct.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if matches!(word.as_str(), "a" | "an" | "the") {
            out.push(' ');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in no_punct.chars() {
        if is_word(c) {
            word.push(c);
        } else {
            flush(&mut word, &mut no_articles);
            no_articles.push(c);
        }
    }
    flush(&mut word, &mut no_articles);
    no_articles.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// 1.0 if any gold answer, normalised, occurs inside the normalised prediction, else 0.0.
///
/// Deviation from the reference script, for gold answers that normalise to the empty
/// string (HotpotQA dev has two: the bands "The The" and "!!!"): the reference scores
/// them 1.0 for every response, which measures nothing. Here such a gold answer is
/// matched on the lower-cased, whitespace-collapsed text instead (punctuation and
/// articles kept); a gold answer that is empty or only whitespace never matches.
pub fn best_subspan_em(prediction: &str, golds: &[&str]) -> f64 {
    let pred = normalize_answer(prediction);
    let mut pred_raw: Option<String> = None;
    let hit = golds.iter().any(|g| {
        let n = normalize_answer(g);
        if !n.is_empty() {
            return pred.contains(&n);
        }
        let raw = collapse_lower(g);
        if raw.is_empty() {
            return false;
        }
        pred_raw
            .get_or_insert_with(|| collapse_lower(prediction))
            .contains(&raw)
    });
    if hit {
        1.0
    } else {
        0.0
    }
}

fn collapse_lower(s: &str) -> String {
    s.to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}
