//! GGUF -> HF conversion preserves the model: the real SmolLM2 GGUF and the HF folder
//! written from it by `write_hf_folder` (f16 safetensors) tokenize identically and give
//! (near) identical next-token logits. Both paths upload f16 weights, so the logits
//! should agree to rounding.

mod common;

use common::tempdir::tempdir;

use kvlink::model::open_model;
use kvlink::sampling::{argmax, log_softmax};
use kvlink::Engine;

const PROMPTS: &[&str] = &[
    "The capital of France is",
    "Marie Curie discovered radium in 1898 and won two Nobel prizes. She was born in",
];

/// Tokenization only (no forward pass): whitespace, digits, Unicode, code, special-token
/// text.
const TOKENIZER_TEXTS: &[&str] = &[
    "  Héllo,\twörld!  12345 678\n\nNaïve café — “quotes” 🤖🚀 日本語のテキスト",
    "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
];

/// (max |Δ logprob| over the top-10 of `a`, argmax a, argmax b).
fn compare(a: &[f32], b: &[f32]) -> (f32, u32, u32) {
    assert_eq!(a.len(), b.len(), "vocab sizes differ");
    let (la, lb) = (log_softmax(a), log_softmax(b));
    let mut idx: Vec<usize> = (0..la.len()).collect();
    idx.sort_by(|&x, &y| la[y].total_cmp(&la[x]));
    let d = idx[..10]
        .iter()
        .map(|&i| (la[i] - lb[i]).abs())
        .fold(0.0f32, f32::max);
    (d, argmax(a), argmax(b))
}

#[test]
fn converted_hf_folder_matches_gguf() {
    let gguf = common::model::source();
    let tmp = tempdir("hf");
    let out = tmp.path().join("model");
    kvlink::model::convert::write_hf_folder(gguf.as_ref(), &out, |_, _| {})
        .expect("convert the GGUF to an HF folder");
    let hf = open_model(&out).expect("open the converted folder");
    assert_eq!(gguf.config().hidden_size, hf.config().hidden_size);
    assert_eq!(gguf.config().vocab_size, hf.config().vocab_size);
    assert_eq!(hf.dtype(), "f16");

    let gpu = common::gpu();
    let e_gguf = Engine::load(gpu.clone(), gguf.as_ref(), 512, &mut |_, _| {}).expect("load GGUF");
    let e_hf = Engine::load(gpu.clone(), hf.as_ref(), 512, &mut |_, _| {}).expect("load HF");

    // Tokenizers and chat templates agree.
    let (ta, tb) = (&e_gguf.tokenizer(), &e_hf.tokenizer());
    assert_eq!(ta.vocab_size(), tb.vocab_size());
    assert_eq!(ta.bos_token, tb.bos_token);
    assert_eq!(ta.eos_token, tb.eos_token);
    assert_eq!(ta.stop_ids, tb.stop_ids);
    assert_eq!(ta.add_bos, tb.add_bos);
    assert_eq!(ta.chat_template, tb.chat_template);
    for text in PROMPTS.iter().chain(TOKENIZER_TEXTS) {
        for raw in [true, false] {
            let a = e_gguf.encode_prompt(text, None, raw).unwrap();
            let b = e_hf.encode_prompt(text, None, raw).unwrap();
            assert_eq!(a, b, "token ids differ for {text:?} (raw: {raw})");
            if raw {
                // Round trip through decode on both sides.
                assert_eq!(ta.decode(&a).unwrap(), tb.decode(&b).unwrap(), "{text:?}");
            }
        }
        let a = e_gguf
            .encode_prompt(text, Some("Be brief."), false)
            .unwrap();
        let b = e_hf.encode_prompt(text, Some("Be brief."), false).unwrap();
        assert_eq!(a, b, "token ids differ for {text:?} with a system prompt");
    }

    // Next-token logits agree, raw and through the chat template.
    let mut worst = 0.0f32;
    for text in PROMPTS {
        for raw in [true, false] {
            let ids = e_gguf.encode_prompt(text, None, raw).unwrap();
            let a = e_gguf.next_logits(&ids).unwrap();
            let b = e_hf.next_logits(&ids).unwrap();
            assert!(
                a.iter().chain(&b).all(|x| x.is_finite()),
                "non-finite logits"
            );
            let (d, am_a, am_b) = compare(&a, &b);
            eprintln!(
                "{text:?} raw={raw}: {} tokens, argmax {am_a} ({:?}) vs {am_b}, max |Δ logprob| top-10 = {d:e}",
                ids.len(),
                ta.token_piece(am_a)
            );
            assert_eq!(am_a, am_b, "argmax differs for {text:?} (raw: {raw})");
            assert!(
                d < 1e-3,
                "max |Δ logprob| over the top-10 is {d} for {text:?} (raw: {raw})"
            );
            worst = worst.max(d);
        }
    }
    eprintln!("worst max |Δ logprob| over the top-10: {worst:e}");
    // The first prompt continues with " Paris" on both.
    let ids = e_hf.encode_prompt(PROMPTS[0], None, true).unwrap();
    assert_eq!(
        tb.token_piece(argmax(&e_hf.next_logits(&ids).unwrap())),
        " Paris"
    );
}
