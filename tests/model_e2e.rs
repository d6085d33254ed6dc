//! End to end on the real SmolLM2-135M-Instruct: the engine's logits against the
//! independent CPU f32 reference, and greedy output with a known answer.

mod common;

use common::model::{engine, source};
use common::reference::RefModel;
use kvlink::GenerateParams;
use std::sync::OnceLock;

fn reference() -> &'static RefModel {
    static R: OnceLock<RefModel> = OnceLock::new();
    R.get_or_init(|| RefModel::load(source().as_ref()))
}

use common::top10_diff as compare;

#[test]
fn logits_match_cpu_reference() {
    let e = engine();
    let r = reference();
    let prompts = [
        ("The capital of France is", true),
        ("def fibonacci(n):\n    ", true),
        ("What is 12 + 30? Answer briefly.", false),
    ];
    for (text, raw) in prompts {
        let ids = e.encode_prompt(text, None, raw).unwrap();
        let got = e.next_logits(&ids).unwrap();
        let pos: Vec<i32> = (0..ids.len() as i32).collect();
        let want = &r.forward(&ids, &pos, &vec![0; ids.len()], true)[0];
        let (worst, same) = compare(&got, want);
        eprintln!(
            "{text:?} ({} tokens): max |dlogprob| top-10 = {worst:.4}",
            ids.len()
        );
        assert!(same, "{text:?}: argmax differs from the CPU reference");
        assert!(
            worst < common::LOGPROB_TOL,
            "{text:?}: top-10 logprobs differ by {worst}"
        );
    }
}

#[test]
fn greedy_capital_of_france_is_paris() {
    let e = engine();
    let ids = e
        .encode_prompt("The capital of France is", None, true)
        .unwrap();
    let mut out = Vec::new();
    let p = GenerateParams {
        max_tokens: 4,
        ..Default::default()
    };
    e.generate(&ids, &p, |t| {
        out.push(t);
        true
    })
    .unwrap();
    let text = e.tokenizer().decode(&out).unwrap();
    assert!(text.starts_with(" Paris"), "continuation was {text:?}");
}

#[test]
fn prompt_longer_than_context_is_an_error() {
    let e = engine();
    let ids = vec![1u32; e.context() + 5];
    let err = e.next_logits(&ids).unwrap_err().to_string();
    assert!(err.contains("context"), "{err}");
    let bad = vec![u32::MAX];
    assert!(e
        .next_logits(&bad)
        .unwrap_err()
        .to_string()
        .contains("vocabulary"));
}
