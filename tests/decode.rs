//! The pipelined greedy decode loop (each step takes the previous step's token on the
//! GPU and is queued before that token is read back) against one synchronous forward
//! call per token, and its stop rules (max tokens, callback, context), on a small random
//! model so it runs in seconds on lavapipe.

mod common;

use kvlink::model::llama::{Batch, Logits};
use kvlink::model::random::RandomModel;
use kvlink::{Engine, GenerateParams};

fn tiny_engine(context: usize) -> Engine {
    let src = RandomModel::new("tiny", 7).unwrap();
    Engine::load(common::gpu().clone(), &src, context, &mut |_, _| {}).unwrap()
}

fn generate(
    e: &Engine,
    ids: &[u32],
    max_tokens: usize,
    stop_after: usize,
) -> (Vec<u32>, &'static str) {
    let p = GenerateParams {
        max_tokens,
        stop_at_eos: false,
        ..Default::default()
    };
    let mut out = Vec::new();
    let st = e
        .generate(ids, &p, |t| {
            out.push(t);
            out.len() < stop_after
        })
        .unwrap();
    assert_eq!(st.generated_tokens, out.len());
    (out, st.stop)
}

/// Greedy tokens one synchronous forward call at a time (no pipelining).
fn stepwise(e: &Engine, ids: &[u32], n: usize) -> Vec<u32> {
    let mut cache = e.model().new_cache(e.context()).unwrap();
    let pos: Vec<i32> = (0..ids.len() as i32).collect();
    let slots: Vec<u32> = (0..ids.len() as u32).collect();
    let batch = Batch {
        tokens: ids,
        positions: &pos,
        slots: &slots,
    };
    let mut tok = e
        .model()
        .forward(&mut cache, &batch, Logits::None, true)
        .unwrap()
        .token
        .unwrap();
    let mut out = vec![tok];
    while out.len() < n {
        let p = (ids.len() + out.len() - 1) as u32;
        let batch = Batch {
            tokens: &[tok],
            positions: &[p as i32],
            slots: &[p],
        };
        tok = e
            .model()
            .forward(&mut cache, &batch, Logits::None, true)
            .unwrap()
            .token
            .unwrap();
        out.push(tok);
    }
    out
}

#[test]
fn pipelined_decode_equals_stepwise_forward() {
    let e = tiny_engine(64);
    let ids: Vec<u32> = (0..9).map(|i| 10 + 37 * i % 400).collect();
    let want = stepwise(&e, &ids, 20);
    let (got, stop) = generate(&e, &ids, 20, usize::MAX);
    assert_eq!(stop, "max_tokens");
    assert_eq!(
        got, want,
        "pipelined greedy decode differs from stepwise forward calls"
    );
    // The tokens must not all be one (a loop that ignored the GPU-fed token would repeat).
    assert!(
        want.iter().any(|&t| t != want[0]),
        "degenerate test: {want:?}"
    );
}

#[test]
fn pipelined_decode_stop_rules() {
    let e = tiny_engine(12);
    let ids: Vec<u32> = (0..8).map(|i| 20 + 11 * i).collect();
    // One token: the prefill's.
    let (one, stop) = generate(&e, &ids, 1, usize::MAX);
    assert_eq!((one.len(), stop), (1, "max_tokens"));
    // The callback stops after 3 tokens.
    let (three, stop) = generate(&e, &ids, 10, 3);
    assert_eq!((three.len(), stop), (3, "callback"));
    // Context 12, prompt 8: the first token plus one per free slot (8..11), then stop.
    let (all, stop) = generate(&e, &ids, 100, usize::MAX);
    assert_eq!((all.len(), stop), (5, "context"));
    assert_eq!(&all[..3], &three[..], "a stop changed the tokens before it");
    assert_eq!(all, stepwise(&e, &ids, 5));
}
