//! HF folder loading, conversion and random weights.

mod common;

use common::tempdir::{tempdir, TempDir};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kvlink::model::convert::write_hf_folder;
use kvlink::model::hf::{canonical_tensors, parse_config, HfModel};
use kvlink::model::open::open_model;
use kvlink::model::random::{RandomModel, RANDOM_SHAPES};
use kvlink::model::source::names;
use kvlink::model::{HostTensor, ModelConfig, Tokenizer, WeightSource};
use kvlink::Error;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}
fn bf16_round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Convert a random model into `<tmp>/model` and return (tmp, model dir).
fn converted(shape: &str, seed: u64) -> (TempDir, PathBuf, RandomModel) {
    let tmp = tempdir(shape);
    let out = tmp.path().join("model");
    let src = RandomModel::new(shape, seed).unwrap();
    let mut calls = Vec::new();
    write_hf_folder(&src, &out, |d, t| calls.push((d, t))).unwrap();
    let n = canonical_tensors(src.config()).len();
    assert_eq!(calls.len(), n, "progress called once per tensor");
    assert_eq!(calls.last(), Some(&(n, n)));
    (tmp, out, src)
}

fn assert_tensors_match(
    src: &dyn WeightSource,
    got: &dyn WeightSource,
    round: impl Fn(f32) -> f32,
) {
    for (name, shape) in canonical_tensors(src.config()) {
        assert!(got.has(&name), "missing {name}");
        let a = src.load(&name).unwrap();
        let b = got.load(&name).unwrap();
        assert_eq!(b.shape, shape, "{name}");
        assert_eq!(a.data.len(), b.data.len(), "{name}");
        for (i, (x, y)) in a.data.iter().zip(&b.data).enumerate() {
            assert_eq!(round(*x), *y, "{name}[{i}]");
        }
    }
}

#[test]
fn roundtrip_tiny_through_hf_folder() {
    let (_tmp, dir, src) = converted("tiny", 7);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} written");
    }
    let m = open_model(&dir).unwrap();
    assert_eq!(m.config(), src.config());
    assert_eq!(m.dtype(), "f16");
    assert!(
        m.describe().contains("LlamaForCausalLM"),
        "{}",
        m.describe()
    );
    assert_tensors_match(&src, m.as_ref(), f16_round);

    // Tokenizer survives the trip.
    let t0 = src.tokenizer().unwrap();
    let t1 = m.tokenizer().unwrap();
    let text = "<|im_start|>user\nhello wörld<|im_end|>";
    assert_eq!(
        t0.encode(text, true).unwrap(),
        t1.encode(text, true).unwrap()
    );
    assert_eq!(t1.decode(&t1.encode(text, false).unwrap()).unwrap(), text);
    assert_eq!(t0.eos_token, t1.eos_token);
    assert_eq!(t0.bos_token, t1.bos_token);
    assert!(t1.is_stop(t0.eos_token.as_ref().unwrap().0));
    assert_eq!(t0.chat_template, t1.chat_template);

    // Fingerprint: stable, hex, differs for a different seed.
    let fp = m.fingerprint();
    assert_eq!(fp.len(), 32);
    assert!(fp.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(HfModel::open(&dir).unwrap().fingerprint(), fp);
    let (_tmp2, dir2, _) = converted("tiny", 8);
    assert_ne!(HfModel::open(&dir2).unwrap().fingerprint(), fp);
}

#[test]
fn roundtrip_tiny_qwen2_with_biases() {
    let (_tmp, dir, src) = converted("tiny-qwen2", 1);
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(text.contains("Qwen2ForCausalLM"));
    let m = open_model(&dir).unwrap();
    assert_eq!(m.config(), src.config());
    assert!(m.config().attention_bias);
    assert!(m.has(&names::layer(1, names::K_BIAS)));
    assert_tensors_match(&src, m.as_ref(), f16_round);
}

#[test]
fn config_json_roundtrips_llama3_rope_scaling_and_tied() {
    // Only config.json is checked here (the weights would be 2.5 GB).
    let src = RandomModel::new("llama-3.2-1b", 0).unwrap();
    let v = kvlink::model::convert::hf_config_json(src.config(), Some(1), &[2, 3]);
    let text = serde_json::to_string(&v).unwrap();
    let hf = parse_config(&text, Path::new("config.json")).unwrap();
    assert_eq!(&hf.config, src.config());
    assert_eq!(hf.bos_token_id, Some(1));
    assert_eq!(hf.eos_token_ids, vec![2, 3]);
    let s = RandomModel::new("smollm2-135m", 0).unwrap();
    let v = kvlink::model::convert::hf_config_json(s.config(), None, &[2]);
    let hf = parse_config(&v.to_string(), Path::new("config.json")).unwrap();
    assert_eq!(&hf.config, s.config());
}

/// Write a safetensors file with every canonical tensor of `src` (plus `extra`) in `dtype`.
fn write_st(
    path: &Path,
    src: &dyn WeightSource,
    names_: &[String],
    dtype: Dtype,
    extra: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
) {
    let shapes: HashMap<String, Vec<usize>> = canonical_tensors(src.config()).into_iter().collect();
    let mut bufs: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = Vec::new();
    for name in names_ {
        let t = src.load(name).unwrap();
        assert_eq!(&t.shape, &shapes[name]);
        let bytes: Vec<u8> = match dtype {
            Dtype::F32 => t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Dtype::BF16 => t
                .data
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
                .collect(),
            Dtype::F16 => t
                .data
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes())
                .collect(),
            _ => unreachable!(),
        };
        bufs.push((name.clone(), t.shape, dtype, bytes));
    }
    for (n, d, s, b) in extra {
        bufs.push((n.to_string(), s.clone(), *d, b.clone()));
    }
    let views: Vec<(String, TensorView)> = bufs
        .iter()
        .map(|(n, s, d, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A folder with config.json + tokenizer files from a converted tiny model, no weights.
fn folder_without_weights(shape: &str) -> (TempDir, PathBuf, RandomModel) {
    let (tmp, dir, src) = converted(shape, 3);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    (tmp, dir, src)
}

fn all_names(src: &dyn WeightSource) -> Vec<String> {
    canonical_tensors(src.config())
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

#[test]
fn loads_bf16_and_f32_weights() {
    for (dtype, round, label) in [
        (Dtype::BF16, bf16_round as fn(f32) -> f32, "bf16"),
        (Dtype::F32, (|x| x) as fn(f32) -> f32, "f32"),
    ] {
        let (_tmp, dir, src) = folder_without_weights("tiny");
        write_st(
            &dir.join("model.safetensors"),
            &src,
            &all_names(&src),
            dtype,
            &[],
        );
        let m = HfModel::open(&dir).unwrap();
        assert_eq!(m.dtype(), label);
        assert_eq!(m.config(), src.config());
        assert_tensors_match(&src, &m, round);
    }
}

#[test]
fn loads_sharded_weights() {
    let (_tmp, dir, src) = folder_without_weights("tiny-qwen2");
    let names_ = all_names(&src);
    let (a, b) = names_.split_at(names_.len() / 2);
    let f1 = "model-00001-of-00002.safetensors";
    let f2 = "model-00002-of-00002.safetensors";
    write_st(&dir.join(f1), &src, a, Dtype::F32, &[]);
    write_st(&dir.join(f2), &src, b, Dtype::BF16, &[]);
    let mut map = serde_json::Map::new();
    for n in a {
        map.insert(n.clone(), f1.into());
    }
    for n in b {
        map.insert(n.clone(), f2.into());
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let m = open_model(&dir).unwrap();
    assert_eq!(m.config(), src.config());
    assert!(
        m.describe().contains("2 safetensors files"),
        "{}",
        m.describe()
    );
    let dt = m.dtype();
    assert!(dt.contains("f32") && dt.contains("bf16"), "{dt}");
    for n in a {
        assert_eq!(m.load(n).unwrap().data, src.load(n).unwrap().data, "{n}");
    }
    for n in b {
        let want: Vec<f32> = src
            .load(n)
            .unwrap()
            .data
            .iter()
            .map(|x| bf16_round(*x))
            .collect();
        assert_eq!(m.load(n).unwrap().data, want, "{n}");
    }

    // Missing shard -> BadModel naming it.
    std::fs::remove_file(dir.join(f2)).unwrap();
    let e = open_model(&dir).err().expect("missing shard must fail");
    assert!(matches!(e, Error::BadModel { .. }), "{e}");
    assert!(e.to_string().contains(f2), "{e}");
}

#[test]
fn untied_without_lm_head_is_treated_as_tied() {
    let (_tmp, dir, src) = folder_without_weights("tiny");
    assert!(!src.config().tie_word_embeddings);
    let names_: Vec<String> = all_names(&src)
        .into_iter()
        .filter(|n| n != names::LM_HEAD)
        .collect();
    write_st(
        &dir.join("model.safetensors"),
        &src,
        &names_,
        Dtype::F32,
        &[],
    );
    let m = HfModel::open(&dir).unwrap();
    assert!(m.config().tie_word_embeddings);
    assert!(!m.has(names::LM_HEAD));
}

fn err_of(r: kvlink::Result<Box<dyn WeightSource>>) -> Error {
    match r {
        Ok(m) => panic!("expected an error, loaded {}", m.describe()),
        Err(e) => e,
    }
}

#[test]
fn missing_config_json() {
    let (_tmp, dir, _src) = converted("tiny", 1);
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let e = err_of(open_model(&dir));
    assert!(matches!(e, Error::BadModel { .. }), "{e}");
    assert!(e.to_string().contains("config.json"), "{e}");
}

#[test]
fn unknown_architecture() {
    let (_tmp, dir, _src) = converted("tiny", 1);
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("LlamaForCausalLM", "GPT2LMHeadModel");
    std::fs::write(&p, text).unwrap();
    let e = err_of(open_model(&dir));
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    assert!(e.to_string().contains("GPT2LMHeadModel"), "{e}");
}

#[test]
fn truncated_and_garbage_safetensors() {
    let (_tmp, dir, _src) = converted("tiny", 1);
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    for cut in [bytes.len() - 1, bytes.len() / 2, 100, 5, 0] {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = err_of(open_model(&dir));
        assert!(matches!(e, Error::BadModel { .. }), "cut {cut}: {e}");
        assert!(
            e.to_string().contains("model.safetensors"),
            "cut {cut}: {e}"
        );
    }
    // Header length pointing past the end / random bytes.
    let mut junk = vec![0xffu8; 64];
    junk[..8].copy_from_slice(&1000u64.to_le_bytes());
    std::fs::write(&p, &junk).unwrap();
    let e = err_of(open_model(&dir));
    assert!(matches!(e, Error::BadModel { .. }), "{e}");
    // Missing weights entirely.
    std::fs::remove_file(&p).unwrap();
    let e = err_of(open_model(&dir));
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn unsupported_dtype_names_tensor() {
    let tiny = RandomModel::new("tiny", 0).unwrap();
    let qname = names::layer(0, names::Q);
    let shape = canonical_tensors(tiny.config())
        .into_iter()
        .find(|(n, _)| *n == qname)
        .unwrap()
        .1;
    let numel: usize = shape.iter().product();

    // A required tensor stored as I64: open fails naming it.
    let (_tmp, dir, src) = folder_without_weights("tiny");
    let names_: Vec<String> = all_names(&src)
        .into_iter()
        .filter(|n| *n != qname)
        .collect();
    let extra = [(
        qname.as_str(),
        Dtype::I64,
        shape.clone(),
        vec![0u8; numel * 8],
    )];
    write_st(
        &dir.join("model.safetensors"),
        &src,
        &names_,
        Dtype::F32,
        &extra,
    );
    let e = err_of(open_model(&dir));
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    assert!(e.to_string().contains(&qname), "{e}");

    // An extra non-canonical I64 tensor: the model opens, loading that tensor fails.
    let (_tmp2, dir2, src2) = folder_without_weights("tiny");
    let extra = [("model.extra_counter", Dtype::I64, vec![4], vec![0u8; 32])];
    write_st(
        &dir2.join("model.safetensors"),
        &src2,
        &all_names(&src2),
        Dtype::F32,
        &extra,
    );
    let m = open_model(&dir2).unwrap();
    assert!(m.has("model.extra_counter"));
    let e = m.load("model.extra_counter").unwrap_err();
    assert!(e.to_string().contains("model.extra_counter"), "{e}");
    assert!(e.to_string().contains("I64"), "{e}");
    let e = m.load("no.such.tensor").unwrap_err();
    assert!(e.to_string().contains("no.such.tensor"), "{e}");
}

#[test]
fn wrong_shape_and_missing_tensor() {
    let (_tmp, dir, src) = folder_without_weights("tiny");
    let down = names::layer(1, names::DOWN);
    let names_: Vec<String> = all_names(&src).into_iter().filter(|n| *n != down).collect();
    write_st(
        &dir.join("model.safetensors"),
        &src,
        &names_,
        Dtype::F32,
        &[],
    );
    let e = err_of(open_model(&dir));
    assert!(
        matches!(e, Error::BadModel { .. }) && e.to_string().contains(&down),
        "{e}"
    );

    let extra = [(down.as_str(), Dtype::F32, vec![1, 4], vec![0u8; 16])];
    write_st(
        &dir.join("model.safetensors"),
        &src,
        &names_,
        Dtype::F32,
        &extra,
    );
    let e = err_of(open_model(&dir));
    assert!(
        e.to_string().contains(&down) && e.to_string().contains("shape"),
        "{e}"
    );
}

#[test]
fn missing_tokenizer_json() {
    let (_tmp, dir, _src) = converted("tiny", 1);
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let m = open_model(&dir).unwrap();
    let e = m.tokenizer().unwrap_err();
    assert!(matches!(e, Error::BadModel { .. }), "{e}");
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
}

#[test]
fn open_model_paths() {
    let tmp = tempdir("paths");
    let missing = tmp.path().join("nope");
    let e = err_of(open_model(&missing));
    assert!(e.to_string().contains("model not found"), "{e}");
    assert!(e.to_string().contains("nope"), "{e}");

    let junk = tmp.path().join("weights.bin");
    std::fs::write(&junk, b"hello world").unwrap();
    let e = err_of(open_model(&junk));
    assert!(
        e.to_string().contains("not a GGUF file or HF model folder"),
        "{e}"
    );

    // A config.json path opens its folder.
    let (_t, dir, src) = converted("tiny", 2);
    let m = open_model(&dir.join("config.json")).unwrap();
    assert_eq!(m.config(), src.config());
}

fn cfg_text(extra: &str) -> String {
    format!(
        r#"{{"architectures": ["MistralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "max_position_embeddings": 32768
        {extra}}}"#
    )
}

#[test]
fn absurd_config_json_values_are_refused() {
    let p = Path::new("x/config.json");
    // `cfg_text` with one field's value replaced.
    let with = |field: &str, value: &str, extra: &str| {
        let t = cfg_text(extra);
        let start = t.find(&format!("\"{field}\": ")).unwrap() + field.len() + 4;
        let end = start + t[start..].find([',', '\n']).unwrap();
        format!("{}{value}{}", &t[..start], &t[end..])
    };
    let refused = |text: String, needle: &str| {
        let e = parse_config(&text, p).unwrap_err();
        assert!(
            matches!(e, Error::BadModel { .. }) && e.to_string().contains(needle),
            "{text}: {e}"
        );
    };
    // The untouched config parses.
    parse_config(&with("num_hidden_layers", "32", ""), p).unwrap();
    // 4e9 layers: canonical_tensors would build 9 names per layer before any check.
    refused(
        with("num_hidden_layers", "4000000000", ""),
        "num_hidden_layers 4000000000",
    );
    refused(with("vocab_size", "4294967296", ""), "vocab_size");
    refused(with("hidden_size", "1048576", ""), "hidden_size");
    refused(
        with("num_attention_heads", "4096", ""),
        "num_attention_heads",
    );
    refused(
        with("max_position_embeddings", "1099511627776", ""),
        "max_position_embeddings",
    );
    refused(
        with("intermediate_size", "18446744073709551615", ""),
        "intermediate_size",
    );
    // f64 values that overflow f32, and non-positive ones.
    refused(cfg_text(r#", "rope_theta": 1e300"#), "rope_theta");
    refused(cfg_text(r#", "rope_theta": -10000.0"#), "rope_theta");
    refused(with("rms_norm_eps", "1e300", ""), "rms_norm_eps");
    // Llama-3 scaling: equal or reversed factors, zero or negative original context.
    let llama3 = |low: &str, high: &str, orig: &str| {
        cfg_text(&format!(
            r#", "rope_scaling": {{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": {low},
            "high_freq_factor": {high}, "original_max_position_embeddings": {orig}}}"#
        ))
    };
    parse_config(&llama3("1.0", "4.0", "8192"), p).unwrap();
    refused(llama3("2.0", "2.0", "8192"), "low_freq_factor");
    refused(llama3("4.0", "1.0", "8192"), "low_freq_factor");
    refused(
        llama3("1.0", "4.0", "0"),
        "original_max_position_embeddings",
    );
    refused(
        llama3("1.0", "4.0", "-5"),
        "original_max_position_embeddings",
    );
    refused(llama3("1.0", "1e40", "8192"), "high_freq_factor");
}

#[test]
fn config_parsing_rules() {
    let p = Path::new("x/config.json");
    let hf = parse_config(
        &cfg_text(r#", "sliding_window": null, "eos_token_id": [2, 32000]"#),
        p,
    )
    .unwrap();
    let c: &ModelConfig = &hf.config;
    assert_eq!(c.head_dim, 128);
    assert_eq!(c.rope_theta, 10000.0);
    assert!(!c.tie_word_embeddings && !c.attention_bias);
    assert_eq!(hf.eos_token_ids, vec![2, 32000]);

    let e = parse_config(&cfg_text(r#", "sliding_window": 4096"#), p).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    assert!(e.to_string().contains("sliding_window"), "{e}");
    parse_config(&cfg_text(r#", "sliding_window": 32768"#), p).unwrap();

    let e = parse_config(
        &cfg_text(r#", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#),
        p,
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::Unsupported(_)) && e.to_string().contains("yarn"),
        "{e}"
    );
    let hf = parse_config(&cfg_text(r#", "rope_scaling": {"type": "default"}"#), p).unwrap();
    assert!(hf.config.rope_scaling.is_none());
    let hf = parse_config(
        &cfg_text(
            r#", "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "eos_token_id": 7, "head_dim": 64"#,
        ),
        p,
    )
    .unwrap();
    assert_eq!(hf.config.rope_scaling.unwrap().factor, 8.0);
    assert_eq!(hf.config.head_dim, 64);
    assert_eq!(hf.eos_token_ids, vec![7]);

    let e = parse_config(
        r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 8}"#,
        p,
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::BadModel { .. }) && e.to_string().contains("missing"),
        "{e}"
    );
    let e = parse_config("{not json", p).unwrap_err();
    assert!(e.to_string().contains("config.json"), "{e}");
    let e = parse_config(
        &cfg_text(r#", "num_key_value_heads": 5"#).replace(r#""num_key_value_heads": 8,"#, ""),
        p,
    )
    .unwrap_err();
    assert!(e.to_string().contains("num_key_value_heads"), "{e}");

    // Qwen2: biases always on; sliding window only matters when enabled.
    let q = r#"{"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "max_position_embeddings": 32768, "sliding_window": 32768, "use_sliding_window": false,
        "max_window_layers": 21, "tie_word_embeddings": true, "eos_token_id": 151645}"#;
    let hf = parse_config(q, p).unwrap();
    assert!(hf.config.attention_bias);
    assert_eq!(hf.config.arch, kvlink::model::Arch::Qwen2);
    assert_eq!(hf.config.head_dim, 64);
}

#[test]
fn random_model_shapes_and_determinism() {
    let e = RandomModel::new("gpt-5", 0).err().unwrap();
    assert!(matches!(e, Error::Input(_)), "{e}");
    for s in RANDOM_SHAPES {
        assert!(e.to_string().contains(s), "{e}");
        let m = RandomModel::new(s, 0).unwrap();
        m.config().validate().unwrap();
        assert_eq!(m.fingerprint(), format!("random-{s}-0"));
    }
    let a = RandomModel::new("smollm2-135m", 5).unwrap();
    let b = RandomModel::new("smollm2-135m", 5).unwrap();
    let c = RandomModel::new("smollm2-135m", 6).unwrap();
    assert!(a.config().tie_word_embeddings && !a.has(names::LM_HEAD));
    let name = names::layer(3, names::GATE);
    let ta: HostTensor = a.load(&name).unwrap();
    assert_eq!(ta.shape, vec![1536, 576]);
    assert_eq!(ta.data, b.load(&name).unwrap().data);
    assert_ne!(ta.data, c.load(&name).unwrap().data);
    assert_ne!(ta.data, a.load(&names::layer(3, names::UP)).unwrap().data);
    let stats = |d: &[f32]| {
        let n = d.len() as f64;
        let mean = d.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = d.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    };
    let (m, s) = stats(&ta.data);
    assert!(
        m.abs() < 1e-3 && (s - 0.02).abs() < 1e-3,
        "mean {m} std {s}"
    );
    let (m, s) = stats(&a.load(&names::layer(0, names::ATTN_NORM)).unwrap().data);
    assert!(
        (m - 1.0).abs() < 0.02 && (s - 0.1).abs() < 0.02,
        "mean {m} std {s}"
    );

    let l = RandomModel::new("llama-3.2-1b", 0).unwrap();
    assert_eq!(l.config().rope_scaling.unwrap().factor, 32.0);
    assert_eq!(l.config().max_position_embeddings, 131072);

    // Tokenizer: bytes + specials, ChatML.
    let t: Tokenizer = a.tokenizer().unwrap();
    assert!(t.vocab_size() <= a.config().vocab_size);
    let ids = t.encode("<|im_start|>hi é<|im_end|>", false).unwrap();
    assert_eq!(ids.len(), 1 + 2 + 1 + 2 + 1, "{ids:?}");
    assert!(t.is_stop(*ids.last().unwrap()));
    assert_eq!(t.decode(&ids).unwrap(), "<|im_start|>hi é<|im_end|>");
    let msgs = [kvlink::model::ChatMessage::new("user", "hi")];
    let s = t.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
}

/// A source whose one tensor fails to load.
struct Broken(RandomModel);

impl WeightSource for Broken {
    fn config(&self) -> &ModelConfig {
        self.0.config()
    }
    fn describe(&self) -> String {
        "broken".into()
    }
    fn dtype(&self) -> String {
        self.0.dtype()
    }
    fn has(&self, name: &str) -> bool {
        self.0.has(name)
    }
    fn load(&self, name: &str) -> kvlink::Result<HostTensor> {
        if name == names::FINAL_NORM {
            return Err(Error::bad_model("broken", "boom"));
        }
        self.0.load(name)
    }
    fn tokenizer(&self) -> kvlink::Result<Tokenizer> {
        self.0.tokenizer()
    }
    fn fingerprint(&self) -> String {
        "broken".into()
    }
}

#[test]
fn failed_convert_leaves_nothing() {
    let tmp = tempdir("broken");
    let out = tmp.path().join("model");
    let e = write_hf_folder(
        &Broken(RandomModel::new("tiny", 0).unwrap()),
        &out,
        |_, _| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("boom"), "{e}");
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "temp dir cleaned up"
    );

    // Existing non-empty output is refused; an empty directory is fine.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("x"), b"x").unwrap();
    let src = RandomModel::new("tiny", 0).unwrap();
    let e = write_hf_folder(&src, &out, |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    std::fs::remove_file(out.join("x")).unwrap();
    write_hf_folder(&src, &out, |_, _| {}).unwrap();
    HfModel::open(&out).unwrap();
}
