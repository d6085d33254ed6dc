//! The browser build, inside a real WebGPU implementation (headless Chromium; on a
//! CPU-only machine its SwiftShader adapter): kernels against CPU references, and the
//! real model's next-token log-probabilities against the native engine's.
//!
//! Run with `scripts/web-test.sh` (it installs the browser driver and wasm-bindgen's
//! test runner, and writes the native reference with `kvlink logits --json` first).
//! The runner serves the repository root, so the test fetches
//! `target/tmp/web/model.gguf` and `target/tmp/web/native-logits.json` from it.
#![cfg(all(target_arch = "wasm32", feature = "web"))]

use kvlink::gpu::{DType, Gpu, Step, Tensor};
use kvlink::ops::{self, Matrix};
use kvlink::web::{self, readback};
use std::sync::Arc;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

async fn gpu() -> Arc<Gpu> {
    web::open_gpu().await.expect("WebGPU adapter")
}

/// Deterministic inputs (the seed is fixed: a failure reproduces as is).
struct Rng(u64);
impl Rng {
    fn unit(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.unit() * scale).collect()
    }
}

fn f16r(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

fn assert_close(got: &[f32], want: &[f32], rtol: f32, atol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{what}: element {i}: got {g}, want {w}"
        );
    }
}

fn run(g: &Gpu, serial: bool, f: impl FnOnce(&mut Step)) {
    let mut st = Step::new(g);
    st.set_serial(serial);
    f(&mut st);
    st.submit();
}

#[wasm_bindgen_test]
async fn adapter_is_browser_webgpu() {
    let g = gpu().await;
    let r = &g.report;
    web_sys::console::log_1(&format!("adapter: {r:?}").into());
    assert_eq!(r.backend, "BrowserWebGpu");
    // The engine must not depend on shader-f16 (the CPU fallback adapter lacks it).
    assert!(g.max_buffer_bytes() >= 128 << 20);
}

#[wasm_bindgen_test]
async fn matmul_and_matvec_match_cpu() {
    let g = gpu().await;
    let mut rng = Rng(7);
    // (m, n, k): m = 1 takes the GEMV kernel; both kernel families (serial for CPU
    // adapters, workgroup-tiled for GPUs) are checked.
    for &(m, n, k) in &[(1, 67, 38), (1, 130, 576), (5, 33, 64), (70, 67, 38)] {
        for serial in [true, false] {
            let x = rng.vec(m * k, 1.0);
            let w: Vec<f32> = rng.vec(n * k, 1.0).into_iter().map(f16r).collect();
            let b = rng.vec(n, 1.0);
            let xt = Tensor::from_f32(&g, &[m, k], &x, "x").unwrap();
            let wm = Matrix::upload(&g, n, k, &w, "w").unwrap();
            let bt = Tensor::from_f32(&g, &[n], &b, "b").unwrap();
            let yt = Tensor::from_f32(&g, &[m, n], &vec![f32::NAN; m * n], "y").unwrap();
            run(&g, serial, |s| {
                ops::matmul(s, &xt, 0, m, &wm, Some(&bt), &yt, 0, false).unwrap()
            });
            let got = readback::read_f32(&g, &yt).await.unwrap();
            let mut want = vec![0.0f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    let mut acc = b[j] as f64;
                    for l in 0..k {
                        acc += x[i * k + l] as f64 * w[j * k + l] as f64;
                    }
                    want[i * n + j] = acc as f32;
                }
            }
            assert_close(
                &got,
                &want,
                1e-3,
                1e-3,
                &format!("matmul m={m} n={n} k={k} serial={serial}"),
            );
        }
    }
}

#[wasm_bindgen_test]
async fn rms_norm_silu_argmax_match_cpu() {
    let g = gpu().await;
    let mut rng = Rng(11);
    let (rows, dim) = (3, 576);
    let x = rng.vec(rows * dim, 2.0);
    let w = rng.vec(dim, 1.0);
    let xt = Tensor::from_f32(&g, &[rows, dim], &x, "x").unwrap();
    let wt = Tensor::from_f32(&g, &[dim], &w, "w").unwrap();
    let yt = Tensor::from_f32(&g, &[rows, dim], &vec![f32::NAN; rows * dim], "y").unwrap();
    // silu(a) * b, and the argmax of a row with a unique maximum
    let n = 1000;
    let a = rng.vec(n, 4.0);
    let bv = rng.vec(n, 1.0);
    let at = Tensor::from_f32(&g, &[n], &a, "a").unwrap();
    let bt = Tensor::from_f32(&g, &[n], &bv, "b").unwrap();
    let mut logits = rng.vec(5000, 3.0);
    logits[4321] = 10.0;
    let lt = Tensor::from_f32(&g, &[5000], &logits, "logits").unwrap();
    let out = Tensor::zeros(&g, &[4], DType::U32, "out").unwrap();
    run(&g, true, |s| {
        ops::rms_norm(s, &xt, 0, rows, &wt, &yt, 0, 1e-5).unwrap();
        ops::silu_mul(s, &at, &bt, n).unwrap();
        ops::argmax(s, &lt, 0, 5000, &out).unwrap();
    });
    let got = readback::read_f32(&g, &yt).await.unwrap();
    let mut want = vec![0.0; rows * dim];
    for r in 0..rows {
        let row = &x[r * dim..(r + 1) * dim];
        let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / dim as f32 + 1e-5).sqrt();
        for i in 0..dim {
            want[r * dim + i] = row[i] * inv * w[i];
        }
    }
    assert_close(&got, &want, 1e-4, 1e-4, "rms_norm");
    let got = readback::read_f32(&g, &bt).await.unwrap();
    let want: Vec<f32> = a
        .iter()
        .zip(&bv)
        .map(|(a, b)| a / (1.0 + (-a).exp()) * b)
        .collect();
    assert_close(&got, &want, 1e-4, 1e-5, "silu_mul");
    let id = readback::read_words(&g, &out).await.unwrap()[0];
    assert_eq!(id, 4321, "argmax");
}

async fn fetch_bytes(url: &str) -> Option<Vec<u8>> {
    let win = web_sys::window()?;
    let resp: web_sys::Response = JsFuture::from(win.fetch_with_str(url))
        .await
        .ok()?
        .dyn_into()
        .ok()?;
    if !resp.ok() {
        return None;
    }
    let buf = JsFuture::from(resp.array_buffer().ok()?).await.ok()?;
    Some(js_sys::Uint8Array::new(&buf).to_vec())
}

/// The real model in the browser against the native engine on the same prompt: same
/// prompt tokens, same argmax, native top-10 log-probabilities within f16 tolerance.
#[wasm_bindgen_test]
async fn real_model_logits_match_native() {
    let native = fetch_bytes("/target/tmp/web/native-logits.json")
        .await
        .expect("target/tmp/web/native-logits.json (run scripts/web-test.sh)");
    let native: serde_json::Value = serde_json::from_slice(&native).unwrap();
    let prompt = native["prompt"].as_str().expect("prompt in the fixture");
    let model = fetch_bytes("/target/tmp/web/model.gguf")
        .await
        .expect("target/tmp/web/model.gguf (run scripts/web-test.sh)");
    let k = kvlink::web::api::Kvlink::create().await.unwrap();
    k.load_model(model, "model.gguf".into(), 256).unwrap();
    let got = k.logits(prompt.into(), true, 50).await.unwrap();
    let got: serde_json::Value =
        serde_json::from_str(&String::from(js_sys::JSON::stringify(&got).unwrap())).unwrap();
    web_sys::console::log_1(
        &format!(
            "web top 3: {}",
            &got["top"].as_array().unwrap()[..3]
                .iter()
                .map(|t| t["token"].to_string())
                .collect::<Vec<_>>()
                .join(" ")
        )
        .into(),
    );
    assert_eq!(got["tokens"], native["tokens"], "prompt token ids");
    let web_top = got["top"].as_array().unwrap();
    let native_top = native["top"].as_array().unwrap();
    assert_eq!(web_top[0]["id"], native_top[0]["id"], "argmax");
    let mut worst = 0.0f64;
    for t in native_top.iter().take(10) {
        let w = web_top
            .iter()
            .find(|x| x["id"] == t["id"])
            .unwrap_or_else(|| panic!("native top-10 token {} not in the web top-50", t["id"]));
        let d = (w["logprob"].as_f64().unwrap() - t["logprob"].as_f64().unwrap()).abs();
        worst = worst.max(d);
    }
    web_sys::console::log_1(&format!("max |dlogprob| over native top-10: {worst:.5}").into());
    // Observed 0.0017 (Chromium's WebGPU on the CPU vs native lavapipe).
    assert!(worst < 0.005, "top-10 logprobs differ by {worst}");
}

fn js_json(v: &wasm_bindgen::JsValue) -> serde_json::Value {
    serde_json::from_str(&String::from(js_sys::JSON::stringify(v).unwrap())).unwrap()
}

/// The browser's document store and the native one share keys and format: an entry
/// `kvlink precompute` wrote is a hit in the browser, and the entry the browser writes
/// for the same document decodes to the same K/V (within f16 rounding of two GPUs).
#[wasm_bindgen_test]
async fn document_store_matches_native() {
    use kvlink::kv::store::decode_entry;
    use kvlink::kv::Lookup;
    use kvlink::web::api::Kvlink;
    use kvlink::web::store::OpfsStore;
    let text = fetch_bytes("/target/tmp/web/doc.txt")
        .await
        .expect("target/tmp/web/doc.txt (run scripts/web-test.sh)");
    // As the command line reads documents: trailing whitespace becomes one newline.
    let text = format!("{}\n", String::from_utf8(text).unwrap().trim_end());
    let model = fetch_bytes("/target/tmp/web/model.gguf").await.unwrap();

    let k = Kvlink::create().await.unwrap();
    k.load_model(model.clone(), "model.gguf".into(), 512)
        .unwrap();
    let (key, tokens, mfp, tfp) = {
        let gpu = web::open_gpu().await.unwrap();
        let src = kvlink::model::GgufModel::from_file(
            kvlink::model::gguf::GgufFile::from_bytes("m", model.clone()).unwrap(),
        )
        .unwrap();
        let e = kvlink::Engine::load(gpu, &src, 512, &mut |_, _| {}).unwrap();
        let tokens = e.tokenizer().encode(&text, false).unwrap();
        (
            e.doc_key(&tokens),
            tokens,
            e.fingerprint().to_string(),
            e.tokenizer_fingerprint().to_string(),
        )
    };
    let ks = key.to_string();
    let native = fetch_bytes(&format!("/target/tmp/web/store/{}/{ks}.kvc", &ks[..2]))
        .await
        .expect("the native store has the document under the same key");
    let Lookup::Hit(native_kv) = decode_entry(&native, &mfp, &tfp, &tokens) else {
        panic!("the native entry does not decode in the browser");
    };

    // native -> browser: the imported entry is used instead of encoding the document
    let store = OpfsStore::open().await.unwrap();
    store.put_bytes(&key, &native).await.unwrap();
    assert!(k.use_store(true).await.unwrap());
    let d = js_json(&k.add_document(text.clone()).await.unwrap());
    assert_eq!(d["source"], "store", "{d}");
    assert_eq!(d["tokens"], tokens.len());

    // browser -> native format: a fresh engine computes the document and writes it
    store.remove(&key).await.unwrap();
    let k2 = Kvlink::create().await.unwrap();
    let model_q8 = model.clone();
    k2.load_model(model, "model.gguf".into(), 512).unwrap();
    assert!(k2.use_store(true).await.unwrap());
    let text_q8 = text.clone();
    let d = js_json(&k2.add_document(text).await.unwrap());
    assert_eq!(d["source"], "computed", "{d}");
    let written = store.get_bytes(&key).await.unwrap().expect("written");
    let Lookup::Hit(web_kv) = decode_entry(&written, &mfp, &tfp, &tokens) else {
        panic!("the browser's entry does not decode");
    };
    assert_eq!(
        (web_kv.n_tokens, web_kv.n_layers, web_kv.kv_dim),
        (native_kv.n_tokens, native_kv.n_layers, native_kv.kv_dim)
    );
    let f = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()
    };
    let mut worst = 0.0f32;
    for (a, b) in web_kv
        .k
        .iter()
        .zip(&native_kv.k)
        .chain(web_kv.v.iter().zip(&native_kv.v))
    {
        for (x, y) in f(a).iter().zip(f(b).iter()) {
            worst = worst.max((x - y).abs() / (1.0 + y.abs()));
        }
    }
    web_sys::console::log_1(&format!("browser vs native K/V: max rel diff {worst:.5}").into());
    assert!(worst < 0.02, "browser and native K/V differ by {worst}");

    // The q8 format: written as a version-2 entry, each value within half a
    // quantization step (its block's largest magnitude / 254) of the native cache, on top
    // of the two GPUs' difference above.
    store.remove(&key).await.unwrap();
    let k3 = Kvlink::create().await.unwrap();
    k3.load_model(model_q8, "model.gguf".into(), 512).unwrap();
    assert!(k3.set_store_format("q4").is_err());
    k3.set_store_format("q8").unwrap();
    assert!(k3.use_store(true).await.unwrap());
    let d = js_json(&k3.add_document(text_q8).await.unwrap());
    assert_eq!(d["source"], "computed", "{d}");
    let written = store.get_bytes(&key).await.unwrap().expect("written");
    assert_eq!(
        written[4..8],
        kvlink::kv::store::Q8_ENTRY_VERSION.to_le_bytes()
    );
    let Lookup::Hit(q8_kv) = decode_entry(&written, &mfp, &tfp, &tokens) else {
        panic!("the browser's q8 entry does not decode");
    };
    let mut worst = 0.0f32;
    for (a, b) in q8_kv
        .k
        .iter()
        .zip(&native_kv.k)
        .chain(q8_kv.v.iter().zip(&native_kv.v))
    {
        for (xs, ys) in f(a).chunks(32).zip(f(b).chunks(32)) {
            let step = ys.iter().fold(0f32, |m, y| m.max(y.abs())) / 254.0;
            for (x, y) in xs.iter().zip(ys) {
                let excess = ((x - y).abs() - step * 1.02).max(0.0);
                worst = worst.max(excess / (1.0 + y.abs()));
            }
        }
    }
    web_sys::console::log_1(&format!("browser q8 vs native K/V: max excess {worst:.5}").into());
    assert!(
        worst < 0.02,
        "browser q8 and native K/V differ by {worst} beyond q8"
    );
    store.remove(&key).await.unwrap();
}
