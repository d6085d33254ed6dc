//! `kvlink train-data`: samples are laid out exactly as the engine lays out the same
//! request when serving (the engine's own plan on a loaded model), the loss covers only
//! what the model must produce, and the samples file round-trips. Real SmolLM2 tokenizer
//! (scripts/fetch-model.sh), HotpotQA fixture.

mod common;

use kvlink::eval::hotpotqa;
use kvlink::link::LinkConfig;
use kvlink::link::Mode;
use kvlink::model::{ChatMessage, Tokenizer, WeightSource};
use kvlink::train_data::{self, Builder, Component, Sample, Sources};
use std::path::PathBuf;

fn model() -> Box<dyn WeightSource> {
    let p = kvlink::model::default_model_path();
    assert!(p.is_file(), "run scripts/fetch-model.sh ({})", p.display());
    kvlink::model::open_model(&p).unwrap()
}

/// The model's tokenizer, base vocabulary and the SmolLM2 link layout (5 x 40 slots).
fn setup() -> (Box<dyn WeightSource>, Tokenizer, usize, LinkConfig) {
    let src = model();
    let tok = src.tokenizer().unwrap();
    let vocab = src.config().vocab_size;
    let link = train_data::extra_token_link(vocab, 5, 40);
    (src, tok, vocab, link)
}

fn builder(tok: &Tokenizer, link: LinkConfig, max_len: usize) -> Builder<'_> {
    Builder { tok, link, max_len }
}

fn fixture() -> Vec<hotpotqa::HotpotRecord> {
    hotpotqa::load(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hotpot_mini.json"),
    )
    .unwrap()
}

fn targets(s: &Sample) -> Vec<u32> {
    (0..s.len())
        .filter(|&i| s.loss[i] == 1)
        .map(|i| s.tokens[i])
        .collect()
}

#[test]
fn qa_samples_are_the_engines_serving_layout_plus_the_answer() {
    let (src, tok, vocab, link) = setup();
    let b = builder(&tok, link.clone(), 4096);
    // The engine that serves the tuned model: same link configuration, its own plan.
    let mut engine =
        kvlink::Engine::load(common::gpu().clone(), src.as_ref(), 4096, &mut |_, _| {}).unwrap();
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    for rec in fixture() {
        let s = b.qa(&rec, true).unwrap().expect("fits");
        assert_eq!(s.component, Component::QaMem);
        // The engine would reject link ids beyond its vocabulary; the plan's layout does
        // not depend on that check, so compare against the plan built the engine's way.
        engine.set_link(LinkConfig::default()).unwrap();
        let plain_plan = engine.plan(&rec.request(Mode::Kvlink)).unwrap();
        let (prefix, docs, tail) = engine.tokenize_request(&rec.request(Mode::Kvlink)).unwrap();
        let refs: Vec<&[u32]> = docs.iter().map(Vec::as_slice).collect();
        let plan = kvlink::PromptPlan::build(&prefix, &refs, &tail, &link).unwrap();
        let n = plan.len();
        assert_eq!(s.tokens[..n], plan.tokens[..]);
        assert_eq!(s.segments[..n], plan.segments[..]);
        assert_eq!(s.positions, (0..s.len() as i32).collect::<Vec<_>>());
        assert!(s.loss[..n].iter().all(|&l| l == 0), "no loss on the prompt");
        // Markers and one block of 5 link tokens per document, at the slot's ids.
        assert_eq!(s.tokens[prefix.len()], link.kv_start.unwrap());
        for (j, d) in plan.docs.iter().enumerate() {
            let after = &s.tokens[d.start + d.len..d.start + d.len + 5];
            assert_eq!(
                after,
                (0..5).map(|i| link.link_id(j, i)).collect::<Vec<_>>()
            );
            assert!(s.segments[d.start..d.start + d.len]
                .iter()
                .all(|&g| g == j as u32 + 1));
        }
        // The targets: the answer, then the end of turn, and nothing after it.
        let t = targets(&s);
        assert_eq!(*t.last().unwrap(), im_end);
        assert_eq!(tok.decode(&t[..t.len() - 1]).unwrap(), rec.answer);
        assert_eq!(s.loss[n..].iter().filter(|&&l| l == 0).count(), 0);
        // The plain layout of the same question: the engine's `full` prompt, all seg 0.
        let q = b.qa(&rec, false).unwrap().unwrap();
        assert_eq!(q.tokens[..plain_plan.len()], plain_plan.tokens[..]);
        assert!(q.segments.iter().all(|&g| g == 0));
        assert!(q.tokens.iter().all(|&id| (id as usize) < vocab));
        assert_eq!(targets(&q), t);
    }
}

#[test]
fn conversation_and_text_samples_label_only_what_the_model_must_produce() {
    let (_src, tok, vocab, link) = setup();
    let b = builder(&tok, link.clone(), 2048);
    let turns = vec![
        ChatMessage::new("user", "Name a colour."),
        ChatMessage::new("assistant", "Blue."),
        ChatMessage::new("user", "Another one?"),
        ChatMessage::new("assistant", "Green."),
        ChatMessage::new("user", "And a third?"),
        ChatMessage::new("assistant", "Red."),
    ];
    // sft: every reply (with its end of turn) is a target, nothing else.
    let s = b.sft(&turns).unwrap().unwrap();
    let text = tok.decode(&targets(&s)).unwrap();
    assert_eq!(text, "Blue.<|im_end|>Green.<|im_end|>Red.<|im_end|>");
    // The whole sample is the chat template's rendering of the conversation.
    let mut msgs = vec![ChatMessage::new("system", train_data::SFT_SYSTEM)];
    msgs.extend(turns.iter().cloned());
    let rendered = tok.apply_chat_template(&msgs, false).unwrap();
    assert_eq!(tok.decode(&s.tokens).unwrap(), rendered);
    // sft_mem: the two earlier exchanges are memories (segments 1, 2, each followed by
    // its links), the last reply is the only target.
    let m = b.sft_mem(&turns).unwrap().unwrap();
    assert_eq!(tok.decode(&targets(&m)).unwrap(), "Red.<|im_end|>");
    assert_eq!(*m.segments.iter().max().unwrap(), 2);
    let seg1: Vec<u32> = (0..m.len())
        .filter(|&i| m.segments[i] == 1)
        .map(|i| m.tokens[i])
        .collect();
    assert!(tok.decode(&seg1).unwrap().contains("Name a colour."));
    assert!(tok.decode(&seg1).unwrap().contains("Blue."));
    assert_eq!(
        m.tokens
            .iter()
            .filter(|&&t| t == link.kv_start.unwrap())
            .count(),
        1
    );
    assert_eq!(
        m.tokens.iter().filter(|&&t| t as usize >= vocab).count(),
        2 * 5 + 2
    );
    // text_mem: 6 chunks of the first 60 tokens, each with its links; the continuation
    // is the target.
    let ids: Vec<u32> = tok
        .encode(
            &"The quick brown fox jumps over the lazy dog. ".repeat(20),
            false,
        )
        .unwrap();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    let t = b.text_mem(&ids, 60, 6, &mut rng).unwrap().unwrap();
    assert_eq!(*t.segments.iter().max().unwrap(), 6);
    let mem: Vec<u32> = (0..t.len())
        .filter(|&i| t.segments[i] > 0)
        .map(|i| t.tokens[i])
        .collect();
    assert_eq!(mem, ids[..60]);
    assert_eq!(targets(&t), ids[60..]);
    // text: every token but the first is a target.
    let x = b.text(&ids[..100]).unwrap();
    assert_eq!(targets(&x), ids[1..100]);
}

#[test]
fn samples_file_round_trips_and_mixture_is_honoured() {
    let (_src, tok, vocab, link) = setup();
    let b = builder(&tok, link, 4096);
    let sources = Sources {
        qa: fixture(),
        conversations: Vec::new(),
        texts: vec!["Some text about rivers and mountains. ".repeat(200)],
    };
    let mix = train_data::parse_mix("qa_mem=1,qa=1,text=1").unwrap();
    let draw = train_data::Draw {
        budget: 12_000,
        seed: 7,
        qa_passes: 1,
    };
    let (samples, stats) = train_data::build(&b, &sources, &mix, draw, &mut |_, _| {}).unwrap();
    assert_eq!(stats.per_component.len(), 3);
    assert!(samples.iter().any(|s| s.component == Component::QaMem));
    assert!(samples.iter().any(|s| s.component == Component::Text));
    let dir = std::env::temp_dir().join(format!("kvlink-train-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.safetensors");
    train_data::write(&path, &samples, vocab, "{\"k\":5}", "{\"args\":[\"x\"]}").unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["format"], train_data::FORMAT);
    assert_eq!(meta["components"], "qa_mem,qa,sft_mem,sft,text_mem,text");
    assert_eq!(meta["base_vocab"], vocab.to_string());
    assert_eq!(meta["recipe"], "{\"args\":[\"x\"]}");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let offsets: Vec<i64> = bytemuck::pod_collect_to_vec(st.tensor("offsets").unwrap().data());
    let tokens: Vec<u32> = bytemuck::pod_collect_to_vec(st.tensor("tokens").unwrap().data());
    let loss = st.tensor("loss").unwrap().data().to_vec();
    assert_eq!(offsets.len(), samples.len() + 1);
    for (i, s) in samples.iter().enumerate() {
        let (a, z) = (offsets[i] as usize, offsets[i + 1] as usize);
        assert_eq!(tokens[a..z], s.tokens[..]);
        assert_eq!(loss[a..z], s.loss[..]);
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(train_data::parse_mix("qa=1,bogus=2").is_err());
    assert!(train_data::parse_mix("qa=0").is_err());
}

/// `--qa-passes 3`: each QA record is drawn three times; every sample is the record's
/// serving layout with its documents in some order (the first pass: the record's own),
/// and the later passes reorder them.
#[test]
fn qa_passes_draw_each_record_again_with_its_documents_reordered() {
    let (_src, tok, _vocab, link) = setup();
    let b = builder(&tok, link, 4096);
    let recs = fixture();
    assert!(recs.iter().all(|r| r.context.len() == 3));
    let sources = Sources {
        qa: recs.clone(),
        conversations: Vec::new(),
        texts: Vec::new(),
    };
    let mix = train_data::parse_mix("qa_mem=1").unwrap();
    let build = |qa_passes| {
        let draw = train_data::Draw {
            budget: 10_000_000,
            seed: 3,
            qa_passes,
        };
        train_data::build(&b, &sources, &mix, draw, &mut |_, _| {})
            .unwrap()
            .0
    };
    let (one, three) = (build(1), build(3));
    assert_eq!(one.len(), recs.len());
    assert_eq!(three.len(), 3 * recs.len());
    // Every record's sample for every order of its three documents.
    let perms = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    let mut layouts = Vec::new();
    for (r, rec) in recs.iter().enumerate() {
        for p in perms {
            let mut x = rec.clone();
            x.context = p.iter().map(|&k| rec.context[k].clone()).collect();
            layouts.push((r, p, b.qa(&x, true).unwrap().expect("fits")));
        }
    }
    for s in &one {
        let hit = layouts
            .iter()
            .find(|(_, _, l)| l == s)
            .expect("a record's layout");
        assert_eq!(hit.1, [0, 1, 2], "one pass keeps the record's order");
        assert!(three.contains(s), "the first pass is the one-pass draw");
    }
    let mut per_record = vec![0; recs.len()];
    let mut reordered = 0;
    for s in &three {
        let (r, p, _) = layouts
            .iter()
            .find(|(_, _, l)| l == s)
            .expect("each sample is a record with its documents in some order");
        per_record[*r] += 1;
        reordered += usize::from(*p != [0, 1, 2]);
    }
    assert_eq!(per_record, vec![3; recs.len()]);
    // 10 later draws, each the record's own order with probability 1/6 (seed fixed).
    assert!(
        reordered >= recs.len(),
        "only {reordered} samples reordered"
    );
}
