//! A real SentencePiece vocabulary: Llama 2's. kvlink rebuilds SentencePiece tokenizers
//! from what a GGUF carries (pieces, scores, types: `tokenizer.ggml.*`); here those come
//! from Llama 2's `tokenizer.model`, and the ids must equal what the HF `tokenizers`
//! library gives with Llama 2's own `tokenizer.json` (the independent reference).
//! Files: scripts/fetch-test-tokenizers.sh (run by scripts/setup.sh).

use kvlink::model::tokenizer::GgufTokenizerMeta;
use kvlink::model::Tokenizer;
use std::path::PathBuf;

fn llama2_dir() -> PathBuf {
    let d = kvlink::model::paths::cache_dir().join("tokenizers/llama2");
    assert!(
        d.join("tokenizer.model").is_file() && d.join("tokenizer.json").is_file(),
        "Llama 2's tokenizer files are missing in {}: run scripts/fetch-test-tokenizers.sh",
        d.display()
    );
    d
}

/// A protobuf varint at `*i`.
fn varint(b: &[u8], i: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = b[*i];
        *i += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            break;
        }
    }
    v
}

/// The fields of one protobuf message: (field number, wire type, payload bytes or the
/// varint's value as bytes).
fn fields(b: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let key = varint(b, &mut i);
        let (field, wire) = (key >> 3, key & 7);
        let payload = match wire {
            0 => varint(b, &mut i).to_le_bytes().to_vec(),
            1 => {
                i += 8;
                b[i - 8..i].to_vec()
            }
            2 => {
                let n = varint(b, &mut i) as usize;
                i += n;
                b[i - n..i].to_vec()
            }
            5 => {
                i += 4;
                b[i - 4..i].to_vec()
            }
            w => panic!("unexpected protobuf wire type {w}"),
        };
        out.push((field, wire, payload));
    }
    out
}

/// `tokenizer.model` (a SentencePiece ModelProto: repeated pieces = 1, each {piece = 1,
/// score = 2, type = 3}) as the GGUF tokenizer metadata llama.cpp writes for it.
fn gguf_meta_from_sentencepiece(model: &[u8]) -> GgufTokenizerMeta {
    let (mut tokens, mut scores, mut types) = (Vec::new(), Vec::new(), Vec::new());
    for (field, wire, piece) in fields(model) {
        if field != 1 || wire != 2 {
            continue;
        }
        let (mut text, mut score, mut ty) = (String::new(), 0f32, 1i32); // type NORMAL
        for (f, w, v) in fields(&piece) {
            match (f, w) {
                (1, 2) => text = String::from_utf8(v).unwrap(),
                (2, 5) => score = f32::from_le_bytes(v.try_into().unwrap()),
                (3, 0) => ty = u64::from_le_bytes(v.try_into().unwrap()) as i32,
                _ => {}
            }
        }
        tokens.push(text);
        scores.push(score);
        types.push(ty);
    }
    GgufTokenizerMeta {
        model: "llama".into(),
        tokens,
        scores,
        token_types: types,
        bos_id: Some(1),
        eos_id: Some(2),
        unk_id: Some(0),
        add_bos: Some(true),
        ..Default::default()
    }
}

const TEXTS: &[&str] = &[
    "Hello world",
    "The Eiffel Tower is 330 metres tall and was completed in 1889.",
    " leading space, double  space and trailing space ",
    "line one\nline two\n\n\tindented",
    "numbers 1234567890 3.14159 -42 1e-9",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 🙂🚀 and rare characters ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "code: fn main() { println!(\"{}\", x[0] >> 2); } // ok",
    "HTML <div class=\"a\">&amp;</div> and <s> text",
    "",
    "a",
    "▁already▁marked",
];

#[test]
fn llama2_sentencepiece_ids_match_the_tokenizers_library() {
    let dir = llama2_dir();
    let meta = gguf_meta_from_sentencepiece(&std::fs::read(dir.join("tokenizer.model")).unwrap());
    assert_eq!(meta.tokens.len(), 32000);
    assert_eq!(meta.tokens[1], "<s>");
    assert_eq!(meta.token_types[3], 6, "<0x00> is a byte piece");
    let ours = Tokenizer::from_gguf_meta(&meta).unwrap();
    let reference = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let mut checked = 0;
    for text in TEXTS {
        let want = reference.encode(*text, true).unwrap().get_ids().to_vec();
        let got = ours.encode(text, true).unwrap();
        assert_eq!(got, want, "{text:?}");
        // Decoding (without the BOS) as the library decodes.
        assert_eq!(
            ours.decode(&got[1..]).unwrap(),
            reference.decode(&want[1..], false).unwrap(),
            "{text:?} decodes"
        );
        checked += want.len();
    }
    assert!(checked > 150, "{checked} ids compared");
}
