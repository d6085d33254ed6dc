//! The `kvlink` binary end to end: help texts, `devices`, `info`, `logits --json`,
//! greedy and seeded generation, chat-template prompts, and bad `--adapter` values.
//! Each `logits`/`generate` run loads the real model once (seconds on lavapipe), so the
//! number of such runs is kept small.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

const PROMPT: &str = "The capital of France is";

/// Mesa's EGL (probed when wgpu enumerates the GL backend) prints
/// "error: XDG_RUNTIME_DIR is invalid or not set" on headless machines; give child
/// processes a private runtime dir so their stderr holds only kvlink's own output.
fn runtime_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("xdg-runtime");
        std::fs::create_dir_all(&d).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        d
    })
}

fn kvlink(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvlink"));
    // KVLINK_ADAPTER (the tests' adapter choice, as common::gpu() uses) is inherited;
    // an explicit --adapter overrides it.
    cmd.args(args);
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        cmd.env("XDG_RUNTIME_DIR", runtime_dir());
    }
    cmd.output().expect("run the kvlink binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Run and require success; returns stdout.
fn ok(args: &[&str]) -> String {
    let o = kvlink(args);
    assert!(
        o.status.success(),
        "kvlink {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    assert!(
        !stderr(&o).contains("panicked"),
        "kvlink {args:?} panicked:\n{}",
        stderr(&o)
    );
    stdout(&o)
}

fn model() -> String {
    common::model::model_path().to_string_lossy().into_owned()
}

#[test]
fn help_texts_mention_key_flags() {
    let top = ok(&["--help"]);
    for w in [
        "devices",
        "info",
        "generate",
        "chat",
        "logits",
        "convert",
        "fetch-model",
        "--adapter",
    ] {
        assert!(
            top.contains(w),
            "`kvlink --help` does not mention {w}:\n{top}"
        );
    }
    let cases: &[(&str, &[&str])] = &[
        ("devices", &["--json"]),
        ("info", &["--model", "--json", "--ctx"]),
        (
            "generate",
            &[
                "--model",
                "--prompt",
                "--raw",
                "--system",
                "--max-tokens",
                "--temperature",
                "--top-k",
                "--top-p",
                "--seed",
                "--ignore-eos",
                "--ctx",
                "--stats",
                "--adapter",
            ],
        ),
        (
            "chat",
            &[
                "--model",
                "--system",
                "--temperature",
                "--max-tokens",
                "--seed",
            ],
        ),
        (
            "logits",
            &["--model", "--prompt", "--raw", "--top", "--json"],
        ),
        ("convert", &["--model", "--out"]),
        ("fetch-model", &[]),
    ];
    for (sub, flags) in cases {
        let h = ok(&[sub, "--help"]);
        assert!(
            h.contains("Usage"),
            "`kvlink {sub} --help` has no usage line:\n{h}"
        );
        for f in *flags {
            assert!(
                h.contains(f),
                "`kvlink {sub} --help` does not mention {f}:\n{h}"
            );
        }
    }
    // `help <sub>` works too.
    let h = ok(&["help", "generate"]);
    assert!(h.contains("--prompt"), "{h}");
}

#[test]
fn devices_lists_an_adapter() {
    let text = ok(&["devices"]);
    assert!(
        text.lines().any(|l| l.starts_with("[0] ")),
        "`kvlink devices` lists no adapter:\n{text}"
    );
    let json = ok(&["devices", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("`kvlink devices --json` is not JSON ({e}):\n{json}"));
    let list = v.as_array().expect("devices --json is an array");
    assert!(!list.is_empty(), "no adapters in {json}");
    for (i, a) in list.iter().enumerate() {
        assert_eq!(a["index"].as_u64(), Some(i as u64), "{a}");
        assert!(a["name"].as_str().is_some_and(|s| !s.is_empty()), "{a}");
        assert!(a["backend"].is_string(), "{a}");
        assert!(
            a["max_storage_buffer_binding_size"].as_u64().is_some(),
            "{a}"
        );
    }
}

/// `bench batch` end to end on a tiny random model: one row per stream count, each
/// with a positive rate, and bad counts refused with one line.
#[test]
fn bench_batch_reports_every_stream_count() {
    let args = [
        "bench",
        "batch",
        "--random-model",
        "tiny",
        "--prompt-len",
        "16",
    ];
    let json = ok(&[&args[..], &["--streams", "1,3", "--decode", "4", "--json"]].concat());
    let v: serde_json::Value = serde_json::from_str(&json).expect("bench batch --json");
    let rows = v["results"].as_array().expect("results");
    let streams: Vec<u64> = rows.iter().filter_map(|r| r["streams"].as_u64()).collect();
    assert_eq!(streams, [1, 3], "{json}");
    for r in rows {
        assert!(r["tok_s"].as_f64().is_some_and(|x| x > 0.0), "{r}");
        assert!(r["waited_tok_s"].as_f64().is_some_and(|x| x > 0.0), "{r}");
    }
    assert!(v["alone_tok_s"].as_f64().is_some_and(|x| x > 0.0), "{json}");
    let bad = kvlink(&[&args[..], &["--streams", "0"]].concat());
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("--streams"), "{}", stderr(&bad));
}

/// `bench ttft` end to end on a tiny random model: every measure positive, and the disk
/// runs' breakdowns name the documents they read from the store (not recomputed).
#[test]
fn bench_ttft_reports_each_path_with_its_breakdown() {
    let json = ok(&[
        "bench",
        "ttft",
        "--random-model",
        "tiny",
        "--docs",
        "3",
        "--doc-len",
        "16",
        "--question-len",
        "4",
        "--repeats",
        "1",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("bench ttft --json");
    for k in [
        "full_ms",
        "kvlink_gpu_ms",
        "kvlink_disk_ms",
        "kvlink_disk_q8_ms",
        "kvlink_cold_ms",
    ] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k}: {json}");
    }
    let gpu = &v["kvlink_breakdown_ms"];
    assert_eq!(gpu["cached_docs"], 3, "{json}");
    assert_eq!(gpu["disk_docs"], 0, "{json}");
    for k in ["kvlink_disk_breakdown_ms", "kvlink_disk_q8_breakdown_ms"] {
        let b = &v[k];
        assert_eq!(b["disk_docs"], 3, "{k}: {json}");
        assert_eq!(b["computed_docs"], 0, "{k}: {json}");
        assert!(b["lookup"].as_f64().is_some_and(|x| x > 0.0), "{k}: {json}");
        // where the reads went: the 3 documents and the prompt's prefix, read from disk
        let r = &b["disk_reads"];
        assert_eq!(r["entries"], 4, "{k}: {json}");
        assert!(r["wall"].as_f64().is_some_and(|x| x > 0.0), "{k}: {json}");
    }
    assert!(gpu["disk_reads"].is_null(), "{json}");
    let bytes = |k: &str| v[k]["disk_reads"]["bytes"].as_u64().unwrap_or(0);
    let (f16, q8) = (
        bytes("kvlink_disk_breakdown_ms"),
        bytes("kvlink_disk_q8_breakdown_ms"),
    );
    assert!(
        q8 > 0 && q8 < f16,
        "q8 entries are smaller: {q8} vs {f16} bytes"
    );
}

/// `bench kernels` on a tiny shape: every projection at every row count, and each
/// attention case, checked against the CPU (none wrong); with tensor cores, each forced
/// split-K factor is its own variant.
#[test]
fn bench_kernels_checks_every_shape_it_times() {
    let json = ok(&[
        "bench",
        "kernels",
        "--shape",
        "tiny",
        "--rows",
        "1,5",
        "--attention",
        "3x16",
        "--splits",
        "2",
        "--repeats",
        "1",
        "--json",
    ]);
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect();
    let gemms: Vec<&serde_json::Value> = lines.iter().filter(|v| v["rows"].is_u64()).collect();
    for rows in [1, 5] {
        for p in ["qkv", "wo", "gate_up", "down"] {
            assert!(
                gemms
                    .iter()
                    .any(|v| v["rows"] == rows && v["projection"] == p),
                "{p} at {rows} rows missing: {json}"
            );
        }
    }
    for v in &gemms {
        assert_eq!(v["ok"], true, "{v}");
        assert!(v["us"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    }
    let coop = gemms
        .iter()
        .filter(|v| v["variant"].as_str().unwrap().starts_with("coop"));
    let (n_coop, n_split) = coop.fold((0, 0), |(c, s), v| {
        let split = v["variant"].as_str().unwrap().ends_with("split 2");
        (c + 1, s + split as usize)
    });
    assert_eq!(
        n_split * 2,
        n_coop,
        "each tile once by default, once split 2: {json}"
    );
    // Under scripts/lavapipe-coop.sh the tensor-core variants must be there.
    if std::env::var("KVLINK_REQUIRE").is_ok_and(|r| r.contains("coop")) {
        assert!(n_coop > 0, "no tensor-core variant: {json}");
    }
    let attention: Vec<_> = lines.iter().filter(|v| v["attention"] == "3x16").collect();
    assert!(!attention.is_empty(), "{json}");
    assert!(attention.iter().all(|v| v["ok"] == true), "{json}");
    let bad = kvlink(&["bench", "kernels", "--shape", "tiny", "--splits", "0"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("--splits"), "{}", stderr(&bad));
}

/// A reader that hangs up early (`kvlink devices | grep -q x`) ends the command quietly:
/// no "failed printing to stdout" panic, and on Unix the SIGPIPE death of any filter.
#[test]
fn closed_stdout_is_not_a_panic() {
    use std::process::Stdio;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvlink"));
    cmd.arg("devices")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        cmd.env("XDG_RUNTIME_DIR", runtime_dir());
    }
    let mut child = cmd.spawn().expect("run the kvlink binary");
    drop(child.stdout.take()); // the reader is gone before anything is printed
    let out = child.wait_with_output().expect("wait for kvlink");
    let err = stderr(&out);
    assert!(
        !err.contains("panicked"),
        "kvlink panicked on a closed stdout:\n{err}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{:?}\n{err}",
            out.status
        );
    }
}

#[test]
fn info_json_describes_smollm2() {
    let m = model();
    let json = ok(&["info", "--model", &m, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("`kvlink info --json` is not JSON ({e}):\n{json}"));
    let c = &v["config"];
    assert_eq!(c["hidden_size"], 576, "{json}");
    assert_eq!(c["num_hidden_layers"], 30, "{json}");
    assert_eq!(c["num_attention_heads"], 9, "{json}");
    assert_eq!(c["num_key_value_heads"], 3, "{json}");
    assert_eq!(c["head_dim"], 64, "{json}");
    assert_eq!(c["intermediate_size"], 1536, "{json}");
    assert_eq!(c["vocab_size"], 49152, "{json}");
    assert_eq!(c["max_position_embeddings"], 8192, "{json}");
    assert_eq!(c["tie_word_embeddings"], true, "{json}");
    assert_eq!(v["dtype"], "Q4_1", "{json}");
    assert_eq!(v["tokenizer"]["vocab_size"], 49152, "{json}");
    assert_eq!(v["tokenizer"]["eos"], "<|im_end|>", "{json}");
    let p = v["parameters"].as_u64().expect("parameters");
    assert!((130_000_000..140_000_000).contains(&p), "parameters {p}");
    assert!(
        v["chat_template"]
            .as_str()
            .is_some_and(|t| t.contains("<|im_start|>")),
        "{json}"
    );
    // The plain-text form works too and names the architecture.
    let text = ok(&["info", "--model", &m]);
    assert!(text.contains("Llama") && text.contains("576"), "{text}");
}

#[test]
fn logits_json_top5_is_paris() {
    let m = model();
    let out = ok(&[
        "logits", "--model", &m, "--prompt", PROMPT, "--raw", "--top", "5", "--json",
    ]);
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one JSON line, got:\n{out}"
    );
    let v: serde_json::Value = serde_json::from_str(lines[0])
        .unwrap_or_else(|e| panic!("logits --json is not JSON ({e}):\n{out}"));
    assert!(v.is_object(), "{out}");
    let tokens = v["tokens"].as_array().expect("\"tokens\" array");
    assert!(!tokens.is_empty(), "{out}");
    for t in tokens {
        let id = t
            .as_u64()
            .unwrap_or_else(|| panic!("token {t} is not an integer"));
        assert!(id < 49152 && u32::try_from(id).is_ok(), "token id {id}");
    }
    let top = v["top"].as_array().expect("\"top\" array");
    assert_eq!(top.len(), 5, "{out}");
    let mut prev = f64::INFINITY;
    for e in top {
        let id = e["id"].as_u64().unwrap_or_else(|| panic!("bad id in {e}"));
        assert!(id < 49152, "{e}");
        assert!(e["token"].is_string(), "{e}");
        let lp = e["logprob"]
            .as_f64()
            .unwrap_or_else(|| panic!("bad logprob in {e}"));
        assert!(lp.is_finite() && lp <= 0.0, "logprob {lp} in {e}");
        assert!(lp <= prev, "logprobs not descending: {out}");
        prev = lp;
    }
    assert_eq!(top[0]["token"], " Paris", "{out}");
    let ids: std::collections::HashSet<u64> =
        top.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), 5, "duplicate ids in {out}");
}

#[test]
fn generate_greedy_raw_says_paris() {
    let m = model();
    let out = ok(&["generate", "--model", &m, "-p", PROMPT, "--raw", "-n", "3"]);
    assert!(out.starts_with(" Paris"), "greedy continuation: {out:?}");
}

#[test]
fn generate_with_chat_template() {
    let m = model();
    let out = ok(&["generate", "--model", &m, "-p", PROMPT, "-n", "8"]);
    assert!(
        !out.trim().is_empty(),
        "no output with the chat template: {out:?}"
    );
    assert!(
        !out.contains("<|im_start|>"),
        "template markup leaked: {out:?}"
    );
}

#[test]
fn seeded_sampling_is_reproducible() {
    let m = model();
    let args = [
        "generate",
        "--model",
        &m,
        "-p",
        PROMPT,
        "--raw",
        "-t",
        "0.9",
        "--seed",
        "5",
        "-n",
        "8",
        "--ignore-eos",
    ];
    let a = ok(&args);
    let b = ok(&args);
    assert!(!a.trim().is_empty(), "no sampled output");
    assert_eq!(a, b, "same seed, different output");
}

fn assert_adapter_error(adapter: &str, want: &str) {
    let m = model();
    let o = kvlink(&[
        "generate",
        "--model",
        &m,
        "-p",
        PROMPT,
        "--raw",
        "-n",
        "1",
        "--adapter",
        adapter,
    ]);
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "--adapter {adapter} succeeded: {}",
        stdout(&o)
    );
    assert!(
        !err.contains("panicked"),
        "--adapter {adapter} panicked:\n{err}"
    );
    let errs: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errs.len(), 1, "--adapter {adapter}: stderr:\n{err}");
    assert!(
        errs[0].contains("adapter") && errs[0].contains(want),
        "--adapter {adapter}: message does not name the adapter: {}",
        errs[0]
    );
}

#[test]
fn bad_adapter_index_is_an_error() {
    assert_adapter_error("99", "99");
}

#[test]
fn bad_adapter_name_is_an_error() {
    assert_adapter_error("nosuchgpu", "nosuchgpu");
}

/// Mean and standard error (sample standard deviation / sqrt(n)) of a list of values.
fn mean_se(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0);
    (m, (var / n).sqrt())
}

/// `eval compare` on two small records files: EM per mode, the reuse cost, the paired
/// differences over the shared questions, all against values computed here from the
/// scores written; a truncated last line is left out and the file left as it was.
#[test]
fn eval_compare_pairs_records_over_shared_questions() {
    let td = common::tempdir::tempdir("compare");
    let line = |id: usize, mode: &str, score: f64, agree: Option<bool>| {
        serde_json::json!({
            "id": format!("q{id}"), "index": id, "mode": mode, "prediction": "p", "gold": "g",
            "score": score, "ttft_ms": 1.0, "prompt_tokens": 10, "cached_doc_tokens": 0,
            "computed_doc_tokens": 0, "generated_tokens": 1, "first_token": 5,
            "kl_vs_full": agree.map(|_| 0.1), "first_token_agree": agree,
            "answer_identical": agree,
        })
        .to_string()
            + "\n"
    };
    let write = |name: &str, full: &[f64], kv: &[f64], agree: &[bool], tail: &str| {
        let mut s = String::new();
        for i in 0..full.len() {
            s += &line(i, "full", full[i], None);
            s += &line(i, "kvlink", kv[i], Some(agree[i]));
        }
        s += tail;
        let p = td.path().join(name);
        std::fs::write(&p, &s).unwrap();
        (p.to_string_lossy().into_owned(), s)
    };
    let (a_full, a_kv) = ([1., 0., 1., 1., 0., 0.], [1., 0., 0., 1., 0., 0.]);
    let (b_full, b_kv) = ([1., 1., 1., 1., 0., 0., 1.], [1., 1., 0., 1., 0., 1., 0.]);
    let agree = [true, false, true, true, false, true, true];
    let (a, a_text) = write(
        "a.jsonl",
        &a_full,
        &a_kv,
        &agree[..6],
        "{\"id\": \"q9\", \"mo",
    );
    let (b, _) = write("b.jsonl", &b_full, &b_kv, &agree, "");
    let json = ok(&["eval", "compare", &a, &b, "--names", "base,tuned", "--json"]);
    assert_eq!(
        std::fs::read_to_string(&a).unwrap(),
        a_text,
        "compare changed a file"
    );
    let v: serde_json::Value = serde_json::from_str(&json).expect("compare --json");
    let near = |got: &serde_json::Value, (m, se): (f64, f64), what: &str| {
        let (gm, gs) = (got["mean"].as_f64(), got["se"].as_f64());
        assert!(
            gm.is_some_and(|g| (g - m).abs() < 1e-12) && gs.is_some_and(|g| (g - se).abs() < 1e-12),
            "{what}: got {got}, want {m} ± {se}"
        );
    };
    let f = &v["files"];
    assert_eq!(
        (f[0]["name"].as_str(), f[0]["questions"].as_u64()),
        (Some("base"), Some(6))
    );
    assert_eq!(f[1]["questions"], 7, "{json}");
    near(&f[0]["em"]["full"], mean_se(&a_full), "base full EM");
    near(&f[1]["em"]["kvlink"], mean_se(&b_kv), "tuned kvlink EM");
    let cost: Vec<f64> = a_full.iter().zip(&a_kv).map(|(x, y)| x - y).collect();
    near(&f[0]["reuse_cost"], mean_se(&cost), "base reuse cost");
    let agreed = agree[..6].iter().filter(|x| **x).count() as f64 / 6.0;
    assert_eq!(
        f[0]["first_token_agreement"].as_f64(),
        Some(agreed),
        "{json}"
    );
    // paired over q0..q5 (q6 is only in b)
    let p = &v["paired"][0];
    let diff = |x: &[f64], y: &[f64]| -> Vec<f64> { (0..6).map(|i| x[i] - y[i]).collect() };
    near(
        &p["same_mode"]["full"],
        mean_se(&diff(&b_full, &a_full)),
        "full, paired",
    );
    near(
        &p["same_mode"]["kvlink"],
        mean_se(&diff(&b_kv, &a_kv)),
        "kvlink, paired",
    );
    near(
        &p["kvlink_minus_base_full"],
        mean_se(&diff(&b_kv, &a_full)),
        "kvlink - base full",
    );
    // the markdown tables say the same
    let md = ok(&["eval", "compare", &a, &b]);
    assert!(md.contains("| a | 6 | 0.500 | 0.333 |"), "{md}");
    assert!(md.contains("each minus a"), "{md}");

    // bad input: clear errors, no panic
    let bad = td.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        line(0, "full", 1.0, None) + "not a record\n" + &line(1, "full", 0.0, None),
    )
    .unwrap();
    let bad = bad.to_string_lossy().into_owned();
    let missing = td
        .path()
        .join("missing.jsonl")
        .to_string_lossy()
        .into_owned();
    for (args, want) in [
        (
            vec![a.as_str(), bad.as_str()],
            "line 2 is not an eval record",
        ),
        (vec![a.as_str(), missing.as_str()], "missing.jsonl"),
        (
            vec![a.as_str(), b.as_str(), "--names", "x"],
            "1 names for 2 files",
        ),
    ] {
        let o = kvlink(&[&["eval", "compare"], &args[..]].concat());
        let err = stderr(&o);
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
