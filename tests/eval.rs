//! Evaluation tools: the scorer, the HotpotQA reader, perplexity helpers, and a
//! 5-question end-to-end eval on the real model (plumbing, not accuracy).

mod common;

use kvlink::eval::hotpotqa::{self, format_document, HotpotRecord, SYSTEM_PROMPT};
use kvlink::eval::score::{best_subspan_em, normalize_answer};
use kvlink::eval::{self, perplexity, QaOptions, ResultsFile};
use kvlink::kv::{DiskStore, KvFormat};
use kvlink::link::Mode;
use kvlink::GenerateParams;
use std::collections::HashSet;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "kvlink-eval-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

// ---------------------------------------------------------------- scorer

#[test]
fn normalization_lowercases_and_collapses_whitespace() {
    assert_eq!(normalize_answer("  Barack   OBAMA\n\t"), "barack obama");
    assert_eq!(normalize_answer(""), "");
    assert_eq!(normalize_answer("Émile Zola"), "émile zola");
}

#[test]
fn normalization_drops_articles_as_whole_words_only() {
    assert_eq!(normalize_answer("The Beatles"), "beatles");
    assert_eq!(normalize_answer("a cat and an owl"), "cat and owl");
    assert_eq!(normalize_answer("THE END"), "end");
    // Not inside words.
    assert_eq!(
        normalize_answer("theatre anthem banana"),
        "theatre anthem banana"
    );
    assert_eq!(normalize_answer("Theo"), "theo");
    // Punctuation goes first, so "the," and "(a)" are articles too.
    assert_eq!(normalize_answer("the, (a) thing"), "thing");
    // "_" is punctuation (Python's string.punctuation), removed before articles.
    assert_eq!(normalize_answer("the_a"), "thea");
}

#[test]
fn normalization_drops_ascii_punctuation() {
    assert_eq!(normalize_answer("U.S.A."), "usa");
    assert_eq!(normalize_answer("rock-'n'-roll!"), "rocknroll");
    assert_eq!(normalize_answer("\"1,000\" (approx.)"), "1000 approx");
    // Non-ASCII punctuation is kept (Python's string.punctuation is ASCII only).
    assert_eq!(normalize_answer("“quoted”"), "“quoted”");
}

#[test]
fn best_subspan_em_is_a_normalized_substring_test() {
    assert_eq!(
        best_subspan_em("The answer is Paris, France.", &["paris"]),
        1.0
    );
    assert_eq!(best_subspan_em("It was the Beatles", &["Beatles"]), 1.0);
    assert_eq!(best_subspan_em("It was the Beatles", &["The Beatles"]), 1.0);
    assert_eq!(best_subspan_em("yes", &["Yes"]), 1.0);
    assert_eq!(best_subspan_em("no", &["yes"]), 0.0);
    // Substring of the normalised text, not of words: "1887" inside "18870" counts.
    assert_eq!(best_subspan_em("founded in 18870", &["1887"]), 1.0);
    // The gold must be inside the prediction, not the other way round.
    assert_eq!(best_subspan_em("Anna", &["Anna Berg"]), 0.0);
    assert_eq!(
        best_subspan_em("written by Anna  Berg.", &["Anna Berg"]),
        1.0
    );
    // Any of several golds.
    assert_eq!(
        best_subspan_em("the colour was blue", &["red", "blue"]),
        1.0
    );
    assert_eq!(best_subspan_em("anything", &[]), 0.0);
}

#[test]
fn empty_gold_answers_never_match_but_article_only_golds_match_raw() {
    assert_eq!(best_subspan_em("anything", &[""]), 0.0);
    assert_eq!(best_subspan_em("", &["   "]), 0.0);
    assert_eq!(best_subspan_em("", &["The The"]), 0.0);
    // "The The" and "!!!" (HotpotQA answers) normalise to "": matched on raw text.
    assert_eq!(
        best_subspan_em("It is the band The  The.", &["The The"]),
        1.0
    );
    assert_eq!(best_subspan_em("It is The Who.", &["The The"]), 0.0);
    assert_eq!(best_subspan_em("the band !!! (chk chk chk)", &["!!!"]), 1.0);
    assert_eq!(best_subspan_em("no idea", &["!!!"]), 0.0);
}

// ---------------------------------------------------------------- reader

#[test]
fn hotpotqa_reader_reads_the_official_format() {
    let recs = hotpotqa::load(&fixture("hotpot_mini.json")).unwrap();
    assert_eq!(recs.len(), 5);
    let r = &recs[0];
    assert_eq!(r.id, "mini0001");
    assert_eq!(r.answer, "Paris");
    assert_eq!(r.question, "In which city is the Tower of Lumen?");
    assert_eq!(r.context.len(), 3);
    let docs = r.documents();
    assert_eq!(docs.len(), 3);
    // Sentences joined with no separator, 1-based document numbers, newline at the end.
    assert_eq!(
        docs[0],
        "Document [1](Title: Tower of Lumen) The Tower of Lumen is a glass tower in Paris. It \
         opened in 1999.\n"
    );
    assert_eq!(
        docs[2],
        "Document [3](Title: Red Bridge) The Red Bridge crosses the river Tam.\n"
    );
    assert_eq!(
        format_document(7, "T", &["a".into(), "b".into()]),
        "Document [7](Title: T) ab\n"
    );
    // The supporting facts' titles name the gold documents (1-based, in order).
    let gold: Vec<Vec<usize>> = recs.iter().map(|r| r.gold_documents()).collect();
    assert_eq!(gold, [vec![1], vec![1], vec![1], vec![1, 2], vec![1]]);
    let req = r.request(Mode::Naive);
    assert_eq!(req.mode, Mode::Naive);
    assert_eq!(req.system.as_deref(), Some(SYSTEM_PROMPT));
    assert_eq!(req.documents, docs);
    assert_eq!(req.question, r.question);
    assert!(!req.raw);
}

#[test]
fn hotpotqa_reader_names_the_bad_record() {
    let good = r#"{"_id":"ok1","question":"q?","answer":"a","context":[["T",["s."]]]}"#;
    // Missing answer, in record 1 with an _id.
    let text = format!(r#"[{good},{{"_id":"bad7","question":"q?","context":[["T",["s"]]]}}]"#);
    let e = hotpotqa::parse(&text, "x.json").unwrap_err().to_string();
    assert!(
        e.contains("x.json") && e.contains("record 1") && e.contains("bad7"),
        "{e}"
    );
    assert!(e.contains("answer"), "{e}");
    // Wrong paragraph shape: a title without sentences.
    let text =
        format!(r#"[{good},{good},{{"_id":"p","question":"q","answer":"a","context":[["T"]]}}]"#);
    let e = hotpotqa::parse(&text, "x.json").unwrap_err().to_string();
    assert!(e.contains("record 2") && e.contains("(_id p)"), "{e}");
    // No _id at all.
    let text = r#"[{"question":"q","answer":"a","context":[]}]"#;
    let e = hotpotqa::parse(text, "x.json").unwrap_err().to_string();
    assert!(e.contains("record 0") && e.contains("_id"), "{e}");
    // No paragraphs.
    let text = r#"[{"_id":"e","question":"q","answer":"a","context":[]}]"#;
    let e = hotpotqa::parse(text, "x.json").unwrap_err().to_string();
    assert!(
        e.contains("record 0 (_id e)") && e.contains("no paragraphs"),
        "{e}"
    );
    // Not a list; truncated file.
    let e = hotpotqa::parse(r#"{"_id":"x"}"#, "x.json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("x.json") && e.contains("JSON list"), "{e}");
    let dir = temp_dir("bad");
    let p = dir.join("truncated.json");
    std::fs::write(&p, &good[..20]).unwrap();
    let e = hotpotqa::load(&p).unwrap_err().to_string();
    assert!(e.contains("truncated.json"), "{e}");
    // Missing file.
    let e = hotpotqa::load(&dir.join("nope.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.json"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------- helpers

#[test]
fn kl_divergence_and_modes() {
    let p = [1.0f32, 2.0, 3.0];
    assert!(eval::kl_divergence(&p, &p).abs() < 1e-12);
    // Shifting logits does not change the distribution.
    assert!(eval::kl_divergence(&p, &[11.0, 12.0, 13.0]).abs() < 1e-12);
    let q = [3.0f32, 2.0, 1.0];
    let kl = eval::kl_divergence(&p, &q);
    // KL = sum p (lp - lq) with lp - lq = [-2, 0, 2]: (p3 - p1) * 2.
    let z: f64 = [1.0f64, 2.0, 3.0].iter().map(|x| x.exp()).sum();
    let want = 2.0 * ((3.0f64).exp() - (1.0f64).exp()) / z;
    assert!((kl - want).abs() < 1e-9, "{kl} vs {want}");
    assert_eq!(
        eval::parse_modes("full, kvlink,naive,full").unwrap(),
        vec![Mode::Full, Mode::Kvlink, Mode::Naive]
    );
    assert!(eval::parse_modes("full,bogus").is_err());
    assert!(eval::parse_modes(" , ").is_err());
}

#[test]
fn perplexity_text_and_chunks() {
    let raw = "<doc id=\"1\" title=\"A\">\nA\n\nText one.\n</doc>\n<doc id=\"2\">\nB\n</doc>\n";
    assert_eq!(perplexity::strip_doc_lines(raw), "A\n\nText one.\nB\n");
    let t: Vec<u32> = (0..10).collect();
    let c = perplexity::split_chunks(&t, 4);
    assert_eq!(
        c.iter().map(|x| x.len()).collect::<Vec<_>>(),
        vec![3, 3, 2, 2]
    );
    assert_eq!(c.concat(), t);
    assert_eq!(perplexity::split_chunks(&t, 1), vec![&t[..]]);
}

/// With one chunk at position 0 and no prefix, the KVLink layout is plain causal
/// attention: the chunked NLL must equal the plain one on the same tokens.
#[test]
fn chunked_perplexity_with_one_chunk_equals_plain() {
    let engine = common::model::engine();
    let ids = engine
        .tokenizer()
        .encode(
            "The river flows through the old town and past the mill, where the baker \
             buys his flour every morning before the market opens.",
            false,
        )
        .unwrap();
    let w = &ids[..ids.len().min(24)];
    let one = perplexity::score_window(engine, w, Some(1)).unwrap();
    let c1 = one.chunked.unwrap();
    assert_eq!(c1.tokens, one.plain_tail.tokens);
    assert_eq!(c1.tokens, w.len() - w.len() / 2 - 1);
    assert_eq!(one.plain.tokens, w.len() - 1);
    assert!(
        (c1.mean() - one.plain_tail.mean()).abs() < 0.02,
        "{} vs {}",
        c1.mean(),
        one.plain_tail.mean()
    );
    let four = perplexity::score_window(engine, w, Some(4)).unwrap();
    assert!((four.plain.mean() - one.plain.mean()).abs() < 1e-6);
    assert!(four.chunked.unwrap().mean().is_finite());
}

// ---------------------------------------------------------------- end to end

/// Five questions x {full, kvlink, naive} on the real model: every mode answers, `full`
/// equals a plain `generate` on the same prompt tokens, records are written, and a
/// resumed run does not duplicate them.
#[test]
fn hotpotqa_end_to_end_and_resume() {
    let engine = common::model::engine();
    let recs: Vec<HotpotRecord> = hotpotqa::load(&fixture("hotpot_mini.json")).unwrap();
    let opts = QaOptions {
        modes: vec![Mode::Full, Mode::Kvlink, Mode::Naive],
        max_new_tokens: 8,
        warm_docs: true,
        ..Default::default()
    };
    let dir = temp_dir("e2e");
    let out = dir.join("results.jsonl");

    // First run, "interrupted" after 3 questions.
    let mut rf = ResultsFile::open(&out).unwrap();
    let mut all = Vec::new();
    for (i, r) in recs.iter().enumerate().take(3) {
        let got = eval::run_question(engine, r, i, &opts, &rf.done(), None).unwrap();
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|q| q.gold_docs == r.gold_documents()));
        rf.append(&got).unwrap();
        all.extend(got);
    }
    // `full` equals a plain generate over the Mode::Full plan's tokens.
    for (i, r) in recs.iter().enumerate().take(2) {
        let plan = engine.plan(&r.request(Mode::Full)).unwrap();
        let mut toks = Vec::new();
        engine
            .generate(
                &plan.tokens,
                &GenerateParams {
                    max_tokens: 8,
                    ..Default::default()
                },
                |t| {
                    toks.push(t);
                    true
                },
            )
            .unwrap();
        let body: Vec<u32> = toks
            .iter()
            .copied()
            .filter(|&t| !engine.tokenizer().is_stop(t))
            .collect();
        let text = engine.tokenizer().decode(&body).unwrap();
        let rec = all
            .iter()
            .find(|x| x.id == r.id && x.mode == "full")
            .unwrap();
        eprintln!(
            "{} full: {:?} (gold {:?}), TTFT {:.0} ms",
            r.id, rec.prediction, r.answer, rec.ttft_ms
        );
        assert_eq!(
            rec.prediction,
            text.trim(),
            "question {i}: full answer differs from generate"
        );
        assert_eq!(rec.first_token, toks[0]);
        assert_eq!(rec.generated_tokens, toks.len());
        assert_eq!(rec.prompt_tokens, plan.len());
    }

    // Resume over all five: only the last two questions run.
    let mut rf = ResultsFile::open(&out).unwrap();
    assert_eq!(rf.records.len(), 9);
    for (i, r) in recs.iter().enumerate() {
        let prior_full = rf.records.get(&(r.id.clone(), "full".into())).cloned();
        let got = eval::run_question(engine, r, i, &opts, &rf.done(), prior_full.as_ref()).unwrap();
        assert_eq!(got.len(), if i < 3 { 0 } else { 3 }, "question {i}");
        rf.append(&got).unwrap();
        all.extend(got);
    }
    // A third run computes nothing.
    let rf = ResultsFile::open(&out).unwrap();
    for (i, r) in recs.iter().enumerate() {
        assert!(eval::run_question(engine, r, i, &opts, &rf.done(), None)
            .unwrap()
            .is_empty());
    }
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        15,
        "one line per question x mode, no duplicates"
    );
    let keys: HashSet<(String, String)> = lines
        .iter()
        .map(|l| {
            let r: eval::QaRecord = serde_json::from_str(l).unwrap();
            (r.id, r.mode)
        })
        .collect();
    assert_eq!(keys.len(), 15);

    for r in &all {
        assert!(r.generated_tokens >= 1 && r.generated_tokens <= 8, "{r:?}");
        assert!(r.ttft_ms > 0.0);
        assert!(r.score == 0.0 || r.score == 1.0);
        let gold = &recs.iter().find(|x| x.id == r.id).unwrap().answer;
        assert_eq!(&r.gold, gold);
        match r.mode.as_str() {
            "full" => {
                assert!(r.kl_vs_full.is_none() && r.first_token_agree.is_none());
                assert_eq!(r.cached_doc_tokens + r.computed_doc_tokens, 0);
                assert!(!r.prediction.is_empty(), "{r:?}");
            }
            _ => {
                let kl = r.kl_vs_full.unwrap();
                assert!(kl.is_finite() && kl >= 0.0, "{r:?}");
                assert!(r.first_token_agree.is_some() && r.answer_identical.is_some());
                // Caches were precomputed before the timed request.
                assert!(
                    r.cached_doc_tokens > 0 && r.computed_doc_tokens == 0,
                    "{r:?}"
                );
            }
        }
    }
    let s = eval::summarize(rf.records.values(), &opts.modes);
    assert_eq!(s.len(), 3);
    for m in &s {
        assert_eq!(m.questions, 5);
        assert!(m.median_ttft_ms > 0.0);
    }
    assert!(s[0].mean_kl.is_none() && s[1].mean_kl.is_some());

    // A truncated last line (interrupted write) is dropped, not fatal.
    let cut = &text[..text.len() - 10];
    std::fs::write(&out, cut).unwrap();
    let rf = ResultsFile::open(&out).unwrap();
    assert_eq!(rf.records.len(), 14);
    assert!(std::fs::read_to_string(&out).unwrap().ends_with('\n'));
    // Garbage in the middle is an error naming the line.
    std::fs::write(&out, format!("{}\nnot json\n{}\n", lines[0], lines[1])).unwrap();
    let e = ResultsFile::open(&out).err().unwrap().to_string();
    assert!(e.contains("line 2"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// SQuAD held-out records run through the same evaluation: ten documents per question
/// (the gold paragraph among them), scored against every accepted answer.
#[test]
fn squad_held_out_question_end_to_end() {
    use kvlink::eval::squad;
    let engine = common::model::engine();
    // Six articles of twelve one-line paragraphs; article a has a + 1 questions, so
    // articles 0-4 are held out. Each question accepts two answers.
    let arts: Vec<serde_json::Value> = (0..6)
        .map(|a| {
            let paras: Vec<serde_json::Value> = (0..12)
                .map(|p| {
                    let qas: Vec<serde_json::Value> = (0..=a)
                        .filter(|_| p == 3)
                        .map(|k| {
                            serde_json::json!({"id": format!("q{a}-{k}"),
                                "question": format!("What colour is door {a}?"),
                                "answers": [{"text": "azure"}, {"text": "blue"}]})
                        })
                        .collect();
                    serde_json::json!({"context": format!("Door {a}.{p} is painted {}.",
                        if p == 3 { "blue" } else { "grey" }), "qas": qas})
                })
                .collect();
            serde_json::json!({"title": format!("Doors_{a}"), "paragraphs": paras})
        })
        .collect();
    let text = serde_json::json!({"data": arts}).to_string();
    let articles = squad::parse(&text, "fixture").unwrap();
    let test = squad::records(&articles, squad::Part::Test);
    assert_eq!(test.len(), 1 + 2 + 3 + 4 + 5);
    let r = &test[0];
    assert_eq!(r.golds(), ["azure", "blue"]);
    assert_eq!(r.context.len(), squad::DOCS_PER_QUESTION);
    let docs = r.documents();
    assert!(docs.iter().any(|d| d.contains("Door 0.3 is painted blue.")));
    assert!(docs.iter().all(|d| d.contains("(Title: Doors 0)")));
    let opts = QaOptions {
        modes: vec![Mode::Full, Mode::Kvlink],
        max_new_tokens: 8,
        warm_docs: true,
        ..Default::default()
    };
    let got = eval::run_question(engine, r, 0, &opts, &HashSet::new(), None).unwrap();
    assert_eq!(got.len(), 2);
    for g in &got {
        assert_eq!(g.gold, "azure");
        assert_eq!(g.score, best_subspan_em(&g.prediction, &["azure", "blue"]));
    }
}

/// `docs_from_store`: the reusing modes take the documents back from the engine's store
/// (here q8), and without a store the run says so instead of measuring the GPU caches.
#[test]
fn documents_can_come_back_from_a_q8_store() {
    // An engine of its own: the shared one's caches must not come from this store.
    let engine = kvlink::Engine::load(
        common::gpu().clone(),
        common::model::source().as_ref(),
        2048,
        &mut |_, _| {},
    )
    .unwrap();
    let recs: Vec<HotpotRecord> = hotpotqa::load(&fixture("hotpot_mini.json")).unwrap();
    let opts = QaOptions {
        modes: vec![Mode::Full, Mode::Kvlink],
        max_new_tokens: 4,
        warm_docs: true,
        docs_from_store: true,
    };
    let err = eval::run_question(&engine, &recs[0], 0, &opts, &HashSet::new(), None)
        .expect_err("no store: the documents cannot come back from it");
    assert!(err.to_string().contains("not from the store"), "{err}");
    let dir = temp_dir("q8-store");
    let store = DiskStore::open(&dir).unwrap();
    engine.set_store(Some(store.clone()));
    engine.set_store_format(KvFormat::Q8);
    engine.clear_doc_caches();
    let got = eval::run_question(&engine, &recs[1], 1, &opts, &HashSet::new(), None).unwrap();
    let kv = got
        .iter()
        .find(|r| r.mode == "kvlink")
        .expect("kvlink record");
    assert_eq!(kv.computed_doc_tokens, 0);
    assert!(kv.cached_doc_tokens > 0);
    let plan = engine.plan(&recs[1].request(Mode::Kvlink)).unwrap();
    for j in 0..plan.docs.len() {
        assert!(
            store.contains(&engine.doc_key(plan.doc_tokens(j))),
            "document {j}"
        );
    }
    for e in &store.entries().unwrap() {
        let raw = std::fs::read(&e.path).unwrap();
        assert_eq!(raw[4..8], kvlink::kv::store::Q8_ENTRY_VERSION.to_le_bytes());
    }
    engine.set_store(None);
    std::fs::remove_dir_all(&dir).ok();
}
