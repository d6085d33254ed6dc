//! LoRA adapters (`--lora`): a random adapter written by the test (PEFT layout,
//! f16/bf16/f32, q/k/v/o + MLP, extra input-only embedding rows, kvlink.json) merged
//! into a random tiny model, against the CPU reference forward on weights the test
//! merges itself in f64; the tied lm_head keeps `vocab` rows; link tokens from the
//! adapter's kvlink.json; no adapter and a zero-B adapter give the base logits; the
//! fingerprint follows the adapter; every malformed adapter is refused with an error
//! that names the problem. One test runs the real SmolLM2 (GGUF Q4_1, Q/K rows
//! permuted by the loader) with a SmolLM2-shaped adapter.

mod common;

use common::reference::RefModel;
use common::tempdir::tempdir;
use common::Rng;
use kvlink::model::llama::{Batch, Logits};
use kvlink::model::lora::{LoraAdapter, LoraModel};
use kvlink::model::random::RandomModel;
use kvlink::model::source::names;
use kvlink::model::{HostTensor, ModelConfig, Tokenizer, WeightSource};
use kvlink::{Engine, Mode, Request};
use safetensors::Dtype;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

const ALL: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn parent(module: &str) -> &'static str {
    if matches!(module, "gate_proj" | "up_proj" | "down_proj") {
        "mlp"
    } else {
        "self_attn"
    }
}

/// `[out, in]` of a module's weight.
fn shape_of(c: &ModelConfig, module: &str) -> (usize, usize) {
    let (h, q, kv, ff) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    match module {
        "q_proj" => (q, h),
        "k_proj" | "v_proj" => (kv, h),
        "o_proj" => (h, q),
        "gate_proj" | "up_proj" => (ff, h),
        _ => (h, ff),
    }
}

/// A base model with its lm_head tied to the embedding (the random shapes are untied).
struct Tied<S: WeightSource>(S, ModelConfig);

fn tied<S: WeightSource>(s: S) -> Tied<S> {
    let mut c = s.config().clone();
    c.tie_word_embeddings = true;
    Tied(s, c)
}

impl<S: WeightSource> WeightSource for Tied<S> {
    fn config(&self) -> &ModelConfig {
        &self.1
    }
    fn describe(&self) -> String {
        format!("{} (tied)", self.0.describe())
    }
    fn dtype(&self) -> String {
        self.0.dtype()
    }
    fn has(&self, name: &str) -> bool {
        name != names::LM_HEAD && self.0.has(name)
    }
    fn load(&self, name: &str) -> kvlink::Result<HostTensor> {
        self.0.load(name)
    }
    fn tokenizer(&self) -> kvlink::Result<Tokenizer> {
        self.0.tokenizer()
    }
    fn fingerprint(&self) -> String {
        format!("{}-tied", self.0.fingerprint())
    }
}

/// Weights held in memory (the test's own merge), for the CPU reference.
struct Merged {
    cfg: ModelConfig,
    t: HashMap<String, HostTensor>,
}

impl WeightSource for Merged {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn describe(&self) -> String {
        "merged by the test".into()
    }
    fn dtype(&self) -> String {
        "f32".into()
    }
    fn has(&self, name: &str) -> bool {
        self.t.contains_key(name)
    }
    fn load(&self, name: &str) -> kvlink::Result<HostTensor> {
        Ok(self.t[name].clone())
    }
    fn tokenizer(&self) -> kvlink::Result<Tokenizer> {
        kvlink::model::random::random_tokenizer()
    }
    fn fingerprint(&self) -> String {
        "merged".into()
    }
}

/// What adapter to write.
#[derive(Clone)]
struct Spec {
    r: usize,
    alpha: f64,
    rslora: bool,
    dtype: Dtype,
    modules: Vec<&'static str>,
    extra: usize,
    /// kvlink.json (None: no file).
    link: Option<serde_json::Value>,
    zero_b: bool,
}

impl Spec {
    fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// One tensor of the adapter, its values as stored (rounded to the file's dtype).
struct T {
    name: String,
    shape: Vec<usize>,
    data: Vec<f32>,
}

fn round(dtype: Dtype, v: f32) -> f32 {
    match dtype {
        Dtype::F16 => half::f16::from_f32(v).to_f32(),
        Dtype::BF16 => half::bf16::from_f32(v).to_f32(),
        _ => v,
    }
}

fn lora_name(layer: usize, module: &str, ab: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{module}.lora_{ab}.weight",
        parent(module)
    )
}

/// Random factors for every layer and module of `spec`, plus the extra rows.
fn make_tensors(cfg: &ModelConfig, spec: &Spec, rng: &mut Rng) -> Vec<T> {
    let mut out = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        for m in &spec.modules {
            let (o, i) = shape_of(cfg, m);
            let mut gen = |n: usize, s: f32| -> Vec<f32> {
                (0..n).map(|_| round(spec.dtype, rng.unit() * s)).collect()
            };
            let a = gen(spec.r * i, 0.1);
            let b = if spec.zero_b {
                vec![0.0; o * spec.r]
            } else {
                gen(o * spec.r, 0.05)
            };
            out.push(T {
                name: lora_name(l, m, "A"),
                shape: vec![spec.r, i],
                data: a,
            });
            out.push(T {
                name: lora_name(l, m, "B"),
                shape: vec![o, spec.r],
                data: b,
            });
        }
    }
    if spec.extra > 0 {
        let d = cfg.hidden_size;
        out.push(T {
            name: "kvlink.extra_embeddings".into(),
            shape: vec![spec.extra, d],
            data: (0..spec.extra * d)
                .map(|_| round(spec.dtype, rng.unit() * 0.05))
                .collect(),
        });
    }
    out
}

fn encode(dtype: Dtype, data: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F16 => data
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::BF16 => data
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        _ => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

fn write_safetensors(path: &Path, dtype: Dtype, tensors: &[T]) {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| encode(dtype, &t.data)).collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            (
                t.name.clone(),
                safetensors::tensor::TensorView::new(dtype, t.shape.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn peft_config(spec: &Spec) -> serde_json::Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "random tiny",
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": spec.modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": spec.rslora,
        "use_dora": false,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {}
    })
}

/// Write the adapter folder `dir`; returns the tensors as written.
fn write_adapter(dir: &Path, cfg: &ModelConfig, spec: &Spec, rng: &mut Rng) -> Vec<T> {
    std::fs::create_dir_all(dir).unwrap();
    let tensors = make_tensors(cfg, spec, rng);
    write_safetensors(&dir.join("adapter_model.safetensors"), spec.dtype, &tensors);
    std::fs::write(
        dir.join("adapter_config.json"),
        peft_config(spec).to_string(),
    )
    .unwrap();
    if let Some(l) = &spec.link {
        std::fs::write(dir.join("kvlink.json"), l.to_string()).unwrap();
    }
    tensors
}

/// The kvlink.json of a tiny adapter: k link tokens for `slots` documents, then the
/// two markers, all in the extra rows.
fn tiny_link(cfg: &ModelConfig, k: usize, slots: usize) -> (serde_json::Value, usize) {
    let v = cfg.vocab_size;
    let extra = k * slots + 2;
    let j = json!({
        "k": k, "link_base": v, "max_slots": slots,
        "kv_start": v + k * slots, "kv_end": v + k * slots + 1,
        "base_vocab": v, "extra_tokens": extra,
        "base_model": {"name": "random tiny", "hidden_size": cfg.hidden_size,
                       "num_hidden_layers": cfg.num_hidden_layers, "vocab_size": v}
    });
    (j, extra)
}

/// The base weights with the adapter merged by the test (f64 products), for the CPU
/// reference: `W + scale * B @ A`, extra rows appended to the embedding.
fn merge_by_hand(base: &dyn WeightSource, spec: &Spec, tensors: &[T]) -> Merged {
    let mut cfg = base.config().clone();
    let by: HashMap<&str, &T> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut t = HashMap::new();
    let mut all = vec![names::EMBED.to_string(), names::FINAL_NORM.to_string()];
    if base.has(names::LM_HEAD) {
        all.push(names::LM_HEAD.to_string());
    }
    for l in 0..cfg.num_hidden_layers {
        for n in [
            names::ATTN_NORM,
            names::FFN_NORM,
            names::Q,
            names::K,
            names::V,
            names::O,
            names::GATE,
            names::UP,
            names::DOWN,
            names::Q_BIAS,
            names::K_BIAS,
            names::V_BIAS,
        ] {
            let name = names::layer(l, n);
            if base.has(&name) {
                all.push(name);
            }
        }
    }
    let scale = spec.scale();
    for name in all {
        let mut w = base.load(&name).unwrap();
        let m = ALL.iter().find(|m| name.ends_with(&format!(".{m}.weight")));
        let layer = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        if let (Some(m), Some(l)) = (m, layer) {
            if let (Some(a), Some(b)) = (
                by.get(lora_name(l, m, "A").as_str()),
                by.get(lora_name(l, m, "B").as_str()),
            ) {
                let (o, i, r) = (b.shape[0], a.shape[1], a.shape[0]);
                for oo in 0..o {
                    for ii in 0..i {
                        let d: f64 = (0..r)
                            .map(|j| b.data[oo * r + j] as f64 * a.data[j * i + ii] as f64)
                            .sum();
                        let x = &mut w.data[oo * i + ii];
                        *x = (*x as f64 + scale * d) as f32;
                    }
                }
            }
        }
        if name == names::EMBED {
            if let Some(x) = by.get("kvlink.extra_embeddings") {
                w.data.extend_from_slice(&x.data);
                w.shape[0] += x.shape[0];
                cfg.extra_vocab = x.shape[0];
            }
        }
        t.insert(name, w);
    }
    Merged { cfg, t }
}

fn load_engine(src: &dyn WeightSource) -> Engine {
    Engine::load(common::gpu().clone(), src, 256, &mut |_, _| {}).unwrap()
}

/// Logits of every row of a causal prefill of `ids`.
fn all_rows(e: &Engine, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = e.model().new_cache(64).unwrap();
    let pos: Vec<i32> = (0..ids.len() as i32).collect();
    let slots: Vec<u32> = (0..ids.len() as u32).collect();
    let out = e
        .model()
        .forward(
            &mut cache,
            &Batch {
                tokens: ids,
                positions: &pos,
                slots: &slots,
            },
            Logits::All,
            false,
        )
        .unwrap();
    let v = e.config().vocab_size;
    assert_eq!(
        out.logits.len(),
        ids.len() * v,
        "one row of vocab logits each"
    );
    out.logits.chunks(v).map(|r| r.to_vec()).collect()
}

/// The fused-forward test's tolerance: 2e-3 relative to the largest logit.
fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1.0);
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= 2e-3 * scale,
        "{what}: max |diff| {worst} > {}",
        2e-3 * scale
    );
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn spec(dtype: Dtype, link: Option<(serde_json::Value, usize)>) -> Spec {
    let (link, extra) = match link {
        Some((l, e)) => (Some(l), e),
        None => (None, 0),
    };
    Spec {
        r: 4,
        alpha: 8.0,
        rslora: false,
        dtype,
        modules: ALL.to_vec(),
        extra,
        link,
        zero_b: false,
    }
}

/// Prefill over a prompt holding extra-row ids (every row's logits), then decode
/// steps that feed extra ids, against the reference on the test's own merge.
fn check_against_reference(base: &'static dyn WeightSource, spec: &Spec, seed_tag: &str) {
    let mut rng = Rng::new();
    let tmp = tempdir(seed_tag);
    let dir = tmp.path().join("adapter");
    let tensors = write_adapter(&dir, base.config(), spec, &mut rng);
    let lora = LoraModel::open(Box::new(ForwardTo(base)), &dir).unwrap();
    let c = lora.config().clone();
    assert_eq!(c.vocab_size, base.config().vocab_size);
    assert_eq!(c.extra_vocab, spec.extra);
    let e = load_engine(&lora);
    let merged = merge_by_hand(base, spec, &tensors);
    let r = RefModel::load(&merged);
    let base_ref = RefModel::load(base);

    let v = c.vocab_size as u32;
    let mut ids: Vec<u32> = (0..9).map(|_| rng.below(v)).collect();
    if spec.extra > 0 {
        ids[2] = v; // the first extra row
        ids[5] = v + spec.extra as u32 - 1; // the last
        ids[7] = v + rng.below(spec.extra as u32);
    }
    let pos: Vec<i32> = (0..ids.len() as i32).collect();
    let got = all_rows(&e, &ids);
    let want = r.forward(&ids, &pos, &vec![0; ids.len()], false);
    for (row, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_close(g, w, &format!("{seed_tag}: prefill row {row}"));
    }
    // The adapter really changes the logits (so the comparison above can fail).
    if spec.extra == 0 {
        let b = base_ref.forward(&ids, &pos, &vec![0; ids.len()], true);
        let d = max_diff(&want[ids.len() - 1], &b[0]);
        eprintln!("{seed_tag}: adapter moves the last logits by up to {d}");
        assert!(d > 0.05, "the adapter barely changes the logits ({d})");
    }
    // Decode: one token at a time, extra ids included (the fused decode path).
    let mut cache = e.model().new_cache(64).unwrap();
    let mut seq = ids[..4].to_vec();
    let p4: Vec<i32> = (0..4).collect();
    let s4: Vec<u32> = (0..4).collect();
    let batch = Batch {
        tokens: &seq,
        positions: &p4,
        slots: &s4,
    };
    e.model()
        .forward(&mut cache, &batch, Logits::None, false)
        .unwrap();
    let next = [if spec.extra > 0 { v + 1 } else { 3 }, rng.below(v)];
    for tok in next {
        let p = seq.len();
        seq.push(tok);
        let out = e
            .model()
            .forward(
                &mut cache,
                &Batch {
                    tokens: &[tok],
                    positions: &[p as i32],
                    slots: &[p as u32],
                },
                Logits::Last,
                true,
            )
            .unwrap();
        assert!(
            out.token.unwrap() < v,
            "argmax stays in the output vocabulary"
        );
        let pos: Vec<i32> = (0..seq.len() as i32).collect();
        let want = r.forward(&seq, &pos, &vec![0; seq.len()], true);
        assert_close(&out.logits, &want[0], &format!("{seed_tag}: decode {p}"));
    }
    // Ids past the grown vocabulary are refused, not read out of bounds.
    let bad = c.input_vocab() as u32;
    let err = e
        .model()
        .forward(
            &mut cache,
            &Batch {
                tokens: &[bad],
                positions: &[0],
                slots: &[0],
            },
            Logits::Last,
            false,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside the model's vocabulary"), "{err}");
}

/// Borrow a source as a boxed one (LoraModel owns its base).
struct ForwardTo<'a>(&'a dyn WeightSource);

impl WeightSource for ForwardTo<'_> {
    fn config(&self) -> &ModelConfig {
        self.0.config()
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn dtype(&self) -> String {
        self.0.dtype()
    }
    fn has(&self, name: &str) -> bool {
        self.0.has(name)
    }
    fn load(&self, name: &str) -> kvlink::Result<HostTensor> {
        self.0.load(name)
    }
    fn tokenizer(&self) -> kvlink::Result<Tokenizer> {
        self.0.tokenizer()
    }
    fn fingerprint(&self) -> String {
        self.0.fingerprint()
    }
}

// `ForwardTo` holds a reference, but LoraModel::open takes a `Box<dyn WeightSource>`
// ('static): leak the test's base sources (a few small structs per test binary).
fn leak<S: WeightSource + 'static>(s: S) -> &'static dyn WeightSource {
    Box::leak(Box::new(s))
}

#[test]
fn f16_adapter_with_extra_rows_on_tied_model_matches_reference() {
    let base = leak(tied(RandomModel::new("tiny", 11).unwrap()));
    let link = tiny_link(base.config(), 2, 4);
    check_against_reference(base, &spec(Dtype::F16, Some(link)), "f16-tied");
}

#[test]
fn f32_adapter_on_untied_model_matches_reference() {
    let base = leak(RandomModel::new("tiny", 12).unwrap());
    let link = tiny_link(base.config(), 2, 4);
    check_against_reference(base, &spec(Dtype::F32, Some(link)), "f32-untied");
    // Without extra rows (and with rsLoRA on a Qwen2 base, q/k/v biases): the adapter
    // alone moves the logits.
    let base = leak(RandomModel::new("tiny-qwen2", 13).unwrap());
    let mut s = spec(Dtype::BF16, None);
    s.rslora = true;
    check_against_reference(base, &s, "bf16-rslora");
}

/// The adapter's kvlink.json configures the engine's link tokens (ids in the extra
/// rows); a KVLink request over them equals the masked pass and the CPU reference.
#[test]
fn adapter_link_tokens_drive_kvlink_requests() {
    let mut rng = Rng::new();
    let base = leak(tied(RandomModel::new("tiny", 14).unwrap()));
    let (link, extra) = tiny_link(base.config(), 2, 4);
    let s = spec(Dtype::F16, Some((link, extra)));
    let tmp = tempdir("link");
    let dir = tmp.path().join("adapter");
    let tensors = write_adapter(&dir, base.config(), &s, &mut rng);
    let lora = LoraModel::open(Box::new(ForwardTo(base)), &dir).unwrap();
    let e = load_engine(&lora);
    let v = base.config().vocab_size as u32;
    assert_eq!(e.link().k, 2);
    assert_eq!(e.link().link_base, Some(v));
    assert_eq!(e.link().kv_start, Some(v + 8));
    assert_eq!(e.link().kv_end, Some(v + 9));
    let mut req = Request::new(
        vec!["alpha beta gamma\n".into(), "delta epsilon\n".into()],
        "which?",
    );
    req.mode = Mode::Masked;
    let (plan, masked, _) = e.request_logits(&req).unwrap();
    for id in [v, v + 1, v + 2, v + 3, v + 8, v + 9] {
        assert!(plan.tokens.contains(&id), "plan holds extra id {id}");
    }
    req.mode = Mode::Kvlink;
    let (plan2, kv, _) = e.request_logits(&req).unwrap();
    assert_eq!(plan, plan2);
    let r = RefModel::load(&merge_by_hand(base, &s, &tensors));
    let want = &r.forward(&plan.tokens, &plan.positions, &plan.segments, true)[0];
    assert_close(&masked, want, "masked vs reference");
    let (d, same) = common::top10_diff(&kv, &masked);
    assert!(same && d < common::LOGPROB_TOL, "kvlink vs masked: {d}");
    // More documents than the adapter's link slots are refused.
    let many = Request::new(vec!["x\n".into(); 5], "q");
    let err = e.plan(&many).unwrap_err().to_string();
    assert!(err.contains("at most 4 slots"), "{err}");
    // The tokenizer never has to decode the extra ids: no panic, empty text.
    for id in [v, v + 9] {
        assert_eq!(e.tokenizer().decode(&[id]).unwrap_or_default(), "");
        let _ = e.tokenizer().token_piece(id);
    }
}

#[test]
fn no_adapter_is_unchanged_and_zero_b_gives_the_base_logits() {
    let mut rng = Rng::new();
    let base = leak(RandomModel::new("tiny", 15).unwrap());
    let plain = load_engine(base);
    let ids: Vec<u32> = (0..7).map(|_| rng.below(512)).collect();
    let pos: Vec<i32> = (0..7).collect();
    let want = RefModel::load(base).forward(&ids, &pos, &[0; 7], false);
    let got = all_rows(&plain, &ids);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_close(g, w, &format!("no adapter, row {i}"));
    }
    assert_eq!(plain.config().extra_vocab, 0);
    assert!(*plain.link() == kvlink::link::LinkConfig::default());

    let tmp = tempdir("zero-b");
    let dir = tmp.path().join("adapter");
    let mut s = spec(Dtype::F16, Some(tiny_link(base.config(), 2, 4)));
    s.zero_b = true;
    write_adapter(&dir, base.config(), &s, &mut rng);
    let lora = LoraModel::open(Box::new(ForwardTo(base)), &dir).unwrap();
    let e = load_engine(&lora);
    let zero = all_rows(&e, &ids);
    for (i, (a, b)) in zero.iter().zip(&got).enumerate() {
        let d = max_diff(a, b);
        assert!(
            d < 1e-5,
            "zero-B adapter row {i} differs from the base by {d}"
        );
    }
    assert_ne!(e.fingerprint(), plain.fingerprint());
}

#[test]
fn fingerprint_follows_the_adapter() {
    let mut rng = Rng::new();
    let base = leak(RandomModel::new("tiny", 16).unwrap());
    let tmp = tempdir("fp");
    let (d1, d2) = (tmp.path().join("a1"), tmp.path().join("a2"));
    let s = spec(Dtype::F16, None);
    write_adapter(&d1, base.config(), &s, &mut rng);
    write_adapter(&d2, base.config(), &s, &mut rng);
    let fp = |d: &Path| {
        LoraModel::open(Box::new(ForwardTo(base)), d)
            .unwrap()
            .fingerprint()
    };
    let (f1, f2) = (fp(&d1), fp(&d2));
    assert_ne!(f1, base.fingerprint(), "with vs without the adapter");
    assert!(f1.starts_with(&base.fingerprint()));
    assert_ne!(f1, f2, "two adapters");
    assert_eq!(f1, fp(&d1), "stable");
    // One weight bit: the fingerprint covers every byte of the file.
    let w = d2.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let i = bytes.len() - 2;
    bytes[i] ^= 1;
    std::fs::write(&w, &bytes).unwrap();
    assert_ne!(fp(&d2), f2, "one weight bit");
    bytes[i] ^= 1;
    std::fs::write(&w, &bytes).unwrap();
    assert_eq!(fp(&d2), f2);
    // The config alone changes it too (same tensors, another alpha).
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d1.join("adapter_config.json")).unwrap()).unwrap();
    cfg["lora_alpha"] = json!(16.0);
    std::fs::write(d1.join("adapter_config.json"), cfg.to_string()).unwrap();
    assert_ne!(fp(&d1), f1, "another lora_alpha");
    // Adding a kvlink.json changes it as well.
    std::fs::write(d2.join("kvlink.json"), r#"{"k": 0}"#).unwrap();
    assert_ne!(fp(&d2), f2, "with a kvlink.json");
}

/// Every malformed or mismatched adapter: the error names the problem; nothing panics.
#[test]
fn bad_adapters_are_refused_with_clear_errors() {
    let mut rng = Rng::new();
    let base = leak(RandomModel::new("tiny", 17).unwrap());
    let cfg = base.config().clone();
    let tmp = tempdir("bad");
    let good = spec(Dtype::F16, Some(tiny_link(&cfg, 2, 4)));
    let mut n = 0;
    // Write a good adapter, let `edit` break it, and return the error's message.
    let mut case = |edit: &dyn Fn(&Path, &mut Vec<T>) -> Option<Spec>| -> String {
        n += 1;
        let dir = tmp.path().join(format!("case{n}"));
        let mut tensors = write_adapter(&dir, &cfg, &good, &mut rng);
        if let Some(s) = edit(&dir, &mut tensors) {
            write_safetensors(&dir.join("adapter_model.safetensors"), s.dtype, &tensors);
        }
        match LoraModel::open(Box::new(ForwardTo(base)), &dir) {
            Ok(_) => panic!("case {n}: the adapter was accepted"),
            Err(e) => {
                let m = e.to_string();
                assert!(!m.contains('\n'), "one line: {m}");
                m
            }
        }
    };
    let json_edit = |file: &'static str, f: fn(&mut serde_json::Value)| {
        move |d: &Path, _: &mut Vec<T>| {
            let p = d.join(file);
            let mut v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            f(&mut v);
            std::fs::write(&p, v.to_string()).unwrap();
            None
        }
    };
    let has = |m: String, parts: &[&str]| {
        eprintln!("{m}");
        assert!(m.starts_with("LoRA adapter "), "{m}");
        for p in parts {
            assert!(m.contains(p), "error {m:?} does not mention {p:?}");
        }
    };

    // Files and folders.
    let gone = tmp.path().join("does-not-exist");
    let m = LoraAdapter::open(&gone).err().unwrap().to_string();
    has(m, &["does-not-exist", "folder not found"]);
    let file = tmp.path().join("file.txt");
    std::fs::write(&file, "x").unwrap();
    has(
        LoraAdapter::open(&file).err().unwrap().to_string(),
        &["not a folder"],
    );
    has(
        case(&|d, _| {
            std::fs::remove_file(d.join("adapter_config.json")).unwrap();
            None
        }),
        &["adapter_config.json is missing"],
    );
    has(
        case(&|d, _| {
            std::fs::remove_file(d.join("adapter_model.safetensors")).unwrap();
            None
        }),
        &["adapter_model.safetensors is missing"],
    );
    has(
        case(&|d, _| {
            std::fs::write(d.join("adapter_config.json"), "{\"r\": 4,").unwrap();
            None
        }),
        &["invalid adapter_config.json"],
    );
    has(
        case(&|d, _| {
            std::fs::write(d.join("kvlink.json"), "[1, 2").unwrap();
            None
        }),
        &["invalid kvlink.json"],
    );
    has(
        case(&|d, _| {
            std::fs::write(d.join("adapter_model.safetensors"), b"\x10\0\0\0\0\0\0\0{}").unwrap();
            None
        }),
        &["adapter_model.safetensors"],
    );

    // Unsupported configurations.
    has(
        case(&json_edit("adapter_config.json", |v| {
            v["peft_type"] = json!("PREFIX_TUNING")
        })),
        &["peft_type", "PREFIX_TUNING"],
    );
    has(
        case(&json_edit("adapter_config.json", |v| {
            v["fan_in_fan_out"] = json!(true)
        })),
        &["fan_in_fan_out"],
    );
    has(
        case(&json_edit("adapter_config.json", |v| {
            v["bias"] = json!("all")
        })),
        &["bias", "\"all\""],
    );
    has(
        case(&json_edit("adapter_config.json", |v| {
            v["use_dora"] = json!(true)
        })),
        &["DoRA"],
    );
    has(
        case(&json_edit("adapter_config.json", |v| {
            v["target_modules"] = json!(["q_proj", "c_attn"])
        })),
        &["target module \"c_attn\"", "not a module of this model"],
    );
    has(
        case(&json_edit("adapter_config.json", |v| {
            v["target_modules"] = json!(["q_proj", "k_proj"])
        })),
        &["adapts down_proj", "target_modules", "(q_proj, k_proj)"],
    );
    has(
        case(&json_edit("adapter_config.json", |v| v["r"] = json!(8))),
        &["r mismatch", "r = 8"],
    );

    // Tensors the model does not have, or of the wrong shape.
    has(
        case(&|_, t| {
            t[0].name = t[0].name.replace("q_proj", "qkv_proj");
            Some(good.clone())
        }),
        &["qkv_proj", "not a LoRA weight"],
    );
    has(
        case(&|_, t| {
            for x in t.iter_mut() {
                x.name = x.name.replace("layers.1.", "layers.7.");
            }
            Some(good.clone())
        }),
        &["layer index 7", "beyond the model's 2 layers"],
    );
    has(
        case(&|_, t| {
            let a = t
                .iter_mut()
                .find(|x| x.name.contains("k_proj.lora_A"))
                .unwrap();
            a.shape = vec![4, 64];
            a.data.truncate(4 * 64);
            Some(good.clone())
        }),
        &["k_proj.lora_A has shape [4, 64]", "[r, in] = [4, 128]"],
    );
    has(
        case(&|_, t| {
            let b = t
                .iter_mut()
                .find(|x| x.name.contains("k_proj.lora_B"))
                .unwrap();
            b.shape = vec![128, 4]; // k's out is kv_dim 64
            b.data = vec![0.0; 128 * 4];
            Some(good.clone())
        }),
        &["k_proj.lora_B has shape [128, 4]", "[out, r] = [64, 4]"],
    );
    has(
        case(&|_, t| {
            t.retain(|x| !x.name.contains("layers.0.mlp.up_proj.lora_B"));
            Some(good.clone())
        }),
        &["layer 0 mlp.up_proj", "lora_B is missing"],
    );
    has(
        case(&|_, t| {
            let x = t
                .iter_mut()
                .find(|x| x.name.starts_with("kvlink."))
                .unwrap();
            x.shape = vec![10, 64];
            x.data.truncate(640);
            Some(good.clone())
        }),
        &[
            "kvlink.extra_embeddings has shape [10, 64]",
            "hidden size is 128",
        ],
    );

    // The wrong base model, extra-token counts, link ids.
    has(
        case(&json_edit("kvlink.json", |v| {
            v["base_model"] = json!({"name": "Smollm2 135M", "hidden_size": 576,
                                     "num_hidden_layers": 30, "vocab_size": 49152})
        })),
        &[
            "wrong base model",
            "Smollm2 135M",
            "hidden_size 576",
            "num_hidden_layers 30",
            "hidden_size 128",
            "num_hidden_layers 2",
            "vocab_size 512",
        ],
    );
    has(
        case(&json_edit("kvlink.json", |v| {
            v["base_vocab"] = json!(49152)
        })),
        &["base_vocab 49152", "vocab_size 512"],
    );
    has(
        case(&json_edit("kvlink.json", |v| {
            v["extra_tokens"] = json!(202)
        })),
        &["extra_tokens 202", "10 extra embedding rows"],
    );
    has(
        case(&json_edit("kvlink.json", |v| v["kv_end"] = json!(600))),
        &["kvlink.json", "KV-END id 600", "522"],
    );
    has(
        case(&json_edit("kvlink.json", |v| v["max_slots"] = json!(6))),
        &["kvlink.json", "link token ids 512..=523", "(522)"],
    );

    // Absurd numbers: refused by name, never an overflow panic or a huge allocation
    // (k * max_slots overflowed usize before the bounds check).
    has(
        case(&json_edit("kvlink.json", |v| {
            v["max_slots"] = json!(1u64 << 63)
        })),
        &["kvlink.json", "max_slots 9223372036854775808"],
    );
    has(
        case(&json_edit("kvlink.json", |v| v["k"] = json!(u64::MAX))),
        &["kvlink.json", "link tokens per document"],
    );
    has(
        case(&json_edit("adapter_config.json", |v| {
            v["r"] = json!(1u64 << 40)
        })),
        &["adapter_config.json", "r = 1099511627776"],
    );
}

/// The real SmolLM2 (GGUF Q4_1, tied embeddings, Q/K rows permuted back to HF order by
/// the loader) with a SmolLM2-shaped adapter (q/k/v/o, 202 extra rows, the fine-tune's
/// kvlink.json): the engine equals the CPU reference on the test's own merge.
#[test]
fn smollm2_gguf_with_adapter_matches_reference() {
    let mut rng = Rng::new();
    let base = common::model::source().as_ref();
    let c = base.config().clone();
    assert!(c.tie_word_embeddings && c.vocab_size == 49152);
    let link = json!({
        "k": 5, "link_base": 49152, "max_slots": 40, "kv_start": 49352, "kv_end": 49353,
        "base_vocab": 49152, "extra_tokens": 202,
        "base_model": {"name": "Smollm2 135M 8k Lc100K Mix1 Ep2", "hidden_size": 576,
                       "num_hidden_layers": 30, "vocab_size": 49152}
    });
    let mut s = spec(Dtype::F16, Some((link, 202)));
    s.modules = vec!["q_proj", "k_proj", "v_proj", "o_proj"];
    s.r = 8;
    s.alpha = 16.0;
    let tmp = tempdir("smollm2");
    let dir = tmp.path().join("adapter");
    let tensors = write_adapter(&dir, &c, &s, &mut rng);
    let lora = LoraModel::open(Box::new(ForwardTo(base)), &dir).unwrap();
    let e = load_engine(&lora);
    assert_eq!(e.link().kv_end, Some(49353));
    // The GGUF tokenizer has no text for the extra ids: decoding them gives "" (or an
    // error), never a panic.
    for id in [49152u32, 49353] {
        assert_eq!(e.tokenizer().decode(&[id]).unwrap_or_default(), "");
        let _ = e.tokenizer().token_piece(id);
    }
    let ids: Vec<u32> = vec![1, 504, 3458, 49152, 260, 49156, 28, 49353, 1345, 30];
    let pos: Vec<i32> = (0..ids.len() as i32).collect();
    let got = e.next_logits(&ids).unwrap();
    assert_eq!(got.len(), 49152);
    let r = RefModel::load(&merge_by_hand(base, &s, &tensors));
    let want = &r.forward(&ids, &pos, &vec![0; ids.len()], true)[0];
    let (d, same) = common::top10_diff(&got, want);
    eprintln!("SmolLM2 + adapter vs CPU reference: max |dlogprob| top-10 = {d:.4}");
    assert!(
        same && d < common::LOGPROB_TOL,
        "vs reference: {d}, same argmax: {same}"
    );
    // ... and the adapter changes the logits (on base ids only).
    let plain = RefModel::load(base).forward(&ids[..3], &pos[..3], &[0; 3], true);
    let with = e.next_logits(&ids[..3]).unwrap();
    let d = max_diff(&plain[0], &with);
    eprintln!("the adapter moves SmolLM2's logits by up to {d}");
    assert!(d > 0.05);
}

/// Run the `kvlink` binary (KVLINK_LORA cleared unless `env_lora` is given).
fn kvlink_cli(args: &[&str], env_lora: Option<&Path>) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kvlink"));
    cmd.args(args).env_remove("KVLINK_LORA");
    if let Some(d) = env_lora {
        cmd.env("KVLINK_LORA", d);
    }
    cmd.output().expect("run the kvlink binary")
}

fn cli_ok(args: &[&str], env_lora: Option<&Path>) -> serde_json::Value {
    let o = kvlink_cli(args, env_lora);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "kvlink {args:?} failed: {err}");
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("kvlink {args:?}: {e}"))
}

/// `--lora` / KVLINK_LORA on the command line: `info` shows the extra rows and another
/// fingerprint; `logits --doc` lays out the adapter's link tokens (its kvlink.json wins
/// over one next to the model; flags still override); a bad folder is one error line.
#[test]
fn cli_lora_flag() {
    let mut rng = Rng::new();
    let tmp = tempdir("cli");
    let model = tmp.path().join("model");
    let base = RandomModel::new("tiny", 18).unwrap();
    kvlink::model::convert::write_hf_folder(&base, &model, |_, _| {}).unwrap();
    std::fs::write(model.join("kvlink.json"), r#"{"k": 1, "link_base": 300}"#).unwrap();
    let adapter = tmp.path().join("adapter");
    let s = spec(Dtype::F16, Some(tiny_link(base.config(), 2, 4)));
    write_adapter(&adapter, base.config(), &s, &mut rng);
    let doc = tmp.path().join("doc.txt");
    std::fs::write(&doc, "some document text").unwrap();
    let (m, a, d) = (
        model.to_str().unwrap(),
        adapter.to_str().unwrap(),
        doc.to_str().unwrap(),
    );

    let plain = cli_ok(&["info", "--model", m, "--json"], None);
    let with = cli_ok(&["info", "--model", m, "--lora", a, "--json"], None);
    assert_ne!(plain["fingerprint"], with["fingerprint"]);
    assert_eq!(with["config"]["extra_vocab"], 10);
    assert_eq!(with["config"]["vocab_size"], 512);
    let by_env = cli_ok(&["info", "--model", m, "--json"], Some(&adapter));
    assert_eq!(by_env["fingerprint"], with["fingerprint"], "KVLINK_LORA");

    let ids = |v: &serde_json::Value| -> Vec<u64> {
        v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    let q = [
        "logits",
        "--model",
        m,
        "--doc",
        d,
        "-p",
        "q?",
        "--raw",
        "--json",
        "--no-store",
    ];
    // Without the adapter: the model's own kvlink.json (one link token, id 300).
    let t = ids(&cli_ok(&q, None));
    assert!(t.contains(&300) && !t.contains(&512), "{t:?}");
    // With it: the adapter's (k = 2 from id 512, markers 520 and 521).
    let mut qa = q.to_vec();
    qa.extend(["--lora", a]);
    let t = ids(&cli_ok(&qa, None));
    for id in [520, 512, 513, 521] {
        assert!(t.contains(&id), "{id} missing from {t:?}");
    }
    assert!(!t.contains(&300));
    // Flags still override.
    qa.extend(["--link-tokens", "1"]);
    let t = ids(&cli_ok(&qa, None));
    assert!(t.contains(&512) && !t.contains(&513), "{t:?}");

    // An adapter without a kvlink.json leaves the model's in charge.
    std::fs::remove_file(adapter.join("kvlink.json")).unwrap();
    let t = ids(&cli_ok(&qa[..qa.len() - 2], None));
    assert!(t.contains(&300) && !t.contains(&512), "{t:?}");

    let missing = tmp.path().join("no-such-adapter");
    let o = kvlink_cli(
        &["info", "--model", m, "--lora", missing.to_str().unwrap()],
        None,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(!err.contains("panicked"), "{err}");
    let line = err.lines().find(|l| l.starts_with("error:")).unwrap();
    assert!(
        line.contains("LoRA adapter")
            && line.contains("no-such-adapter")
            && line.contains("folder not found"),
        "{err}"
    );
}
