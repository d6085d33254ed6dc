//! Bad input through the `kvlink` binary: each case must exit non-zero with exactly one
//! line starting with "error:" on stderr that names the problem, and never panic. The
//! model-file cases are also checked at the library level: `open_model` (or, for
//! tokenizer files, which are read lazily, `WeightSource::tokenizer`) returns Err.

mod common;

use common::tempdir::tempdir;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use kvlink::model::open_model;

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
    cmd.args(args);
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        cmd.env("XDG_RUNTIME_DIR", runtime_dir());
    }
    cmd.output().expect("run the kvlink binary")
}

fn model() -> String {
    common::model::model_path().to_string_lossy().into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// Run `kvlink args`; require failure, exactly one "error:" line naming every string in
/// `want` (case-insensitive), and no panic. Returns the error line.
fn expect_error(args: &[&str], want: &[&str]) -> String {
    let o = kvlink(args);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "kvlink {args:?} succeeded but should fail:\nstdout: {out}\nstderr: {err}"
    );
    assert!(
        !err.contains("panicked"),
        "kvlink {args:?} panicked:\n{err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        lines.len(),
        1,
        "kvlink {args:?}: expected exactly one \"error:\" line, stderr:\n{err}"
    );
    let line = lines[0].to_string();
    let lower = line.to_lowercase();
    for w in want {
        assert!(
            lower.contains(&w.to_lowercase()),
            "kvlink {args:?}: error line does not mention {w:?}: {line}"
        );
    }
    line
}

/// Library level: opening `path` (and reading its tokenizer) fails with an error that
/// mentions every string in `want`, without panicking.
fn expect_lib_error(path: &Path, want: &[&str]) {
    let r = std::panic::catch_unwind(|| match open_model(path) {
        Err(e) => Err(e.to_string()),
        Ok(src) => match src.tokenizer() {
            Err(e) => Err(e.to_string()),
            Ok(_) => Ok(()),
        },
    });
    let msg = match r {
        Err(_) => panic!("open_model({}) panicked", path.display()),
        Ok(Ok(())) => panic!("open_model({}) succeeded but should fail", path.display()),
        Ok(Err(m)) => m,
    };
    for w in want {
        assert!(
            msg.to_lowercase().contains(&w.to_lowercase()),
            "open_model({}): error does not mention {w:?}: {msg}",
            path.display()
        );
    }
}

/// A model path through both the CLI (`info` and `generate`) and the library.
fn expect_bad_model(path: &Path, want: &[&str]) {
    expect_error(&["info", "--model", s(path)], want);
    expect_error(
        &[
            "generate",
            "--model",
            s(path),
            "-p",
            "hi",
            "--raw",
            "-n",
            "1",
        ],
        want,
    );
    expect_lib_error(path, want);
}

// ---------------------------------------------------------------- model files

#[test]
fn missing_model_path() {
    let tmp = tempdir("missing");
    let p = tmp.path().join("no-such-model.gguf");
    expect_bad_model(&p, &["not found", "no-such-model.gguf"]);
    // A path that looks like a Hub name gets a hint about downloading it first.
    let line = expect_error(
        &["info", "--model", "nosuchorg/nosuchmodel"],
        &["nosuchorg/nosuchmodel"],
    );
    assert!(line.contains("--model DIR"), "{line}");
}

#[test]
fn directory_without_config_json() {
    let tmp = tempdir("noconfig");
    std::fs::write(tmp.path().join("README.md"), "not a model").unwrap();
    expect_bad_model(tmp.path(), &["config.json"]);
}

#[test]
fn truncated_gguf() {
    let tmp = tempdir("trunc");
    let bytes = std::fs::read(common::model::model_path()).unwrap();
    // Cut inside the metadata (the tokenizer arrays)...
    let p = tmp.path().join("model.gguf");
    std::fs::write(&p, &bytes[..1 << 20]).unwrap();
    expect_bad_model(&p, &["model.gguf", "truncated"]);
    // ...and inside the tensor data (the header parses, a tensor runs past the end).
    let p = tmp.path().join("half.gguf");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    expect_bad_model(&p, &["half.gguf", "truncated"]);
}

#[test]
fn random_bytes_named_gguf() {
    let tmp = tempdir("random");
    let mut rng = common::Rng::new();
    let mut bytes: Vec<u8> = (0..100_000).map(|_| rng.next_u64() as u8).collect();
    if &bytes[..4] == b"GGUF" {
        bytes[0] = 0;
    }
    let p = tmp.path().join("x.gguf");
    std::fs::write(&p, &bytes).unwrap();
    expect_bad_model(&p, &["x.gguf", "not a GGUF file"]);
    // An empty file, and one that only has the magic.
    let p = tmp.path().join("empty.gguf");
    std::fs::write(&p, b"").unwrap();
    expect_bad_model(&p, &["empty.gguf"]);
    let p = tmp.path().join("magic.gguf");
    std::fs::write(&p, b"GGUF").unwrap();
    expect_bad_model(&p, &["magic.gguf"]);
    // Not a GGUF by name or magic, and not in an HF folder.
    let p = tmp.path().join("weights.bin");
    std::fs::write(&p, &bytes).unwrap();
    expect_bad_model(&p, &["weights.bin"]);
}

// ---------------------------------------------------------------- HF folders

/// Hard-link (or copy) every file of `from` into a fresh `to`.
fn link_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if std::fs::hard_link(e.path(), &dst).is_err() {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

/// Replace a file that may be a hard link to the pristine folder with new contents.
fn rewrite(p: &Path, bytes: &[u8]) {
    let _ = std::fs::remove_file(p);
    std::fs::write(p, bytes).unwrap();
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    rewrite(&p, serde_json::to_string_pretty(&v).unwrap().as_bytes());
}

/// model.safetensors with the dtype of tensor `name` replaced by `dtype` (same length).
fn retype(dir: &Path, name: &str, dtype: &str) {
    let p = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let key = format!("\"{name}\":{{\"dtype\":\"");
    let at = header
        .find(&key)
        .unwrap_or_else(|| panic!("{key} not in header"))
        + key.len();
    let old_end = at + header[at..].find('"').unwrap();
    assert_eq!(old_end - at, dtype.len(), "dtype lengths differ");
    bytes[8 + at..8 + old_end].copy_from_slice(dtype.as_bytes());
    rewrite(&p, &bytes);
}

#[test]
fn corrupt_hf_folders() {
    let tmp = tempdir("hf");
    let good = tmp.path().join("good");
    let o = kvlink(&["convert", "--model", &model(), "--out", s(&good)]);
    assert!(
        o.status.success(),
        "kvlink convert failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(good.join("config.json").is_file() && good.join("model.safetensors").is_file());
    // The pristine folder opens (so the failures below are due to the corruption).
    let src = open_model(&good).expect("open the converted folder");
    src.tokenizer().expect("converted tokenizer");
    drop(src);

    let st_len = std::fs::metadata(good.join("model.safetensors"))
        .unwrap()
        .len() as usize;
    let mut n = 0;
    let mut case = |tag: &str, want: &[&str], corrupt: &dyn Fn(&Path)| {
        n += 1;
        let dir = tmp.path().join(format!("{n}-{tag}"));
        link_folder(&good, &dir);
        corrupt(&dir);
        eprintln!("case {tag}");
        expect_bad_model(&dir, want);
        // Also when pointed at a file inside the folder.
        if dir.join("config.json").is_file() {
            expect_error(&["info", "--model", s(&dir.join("config.json"))], want);
        }
        let _ = std::fs::remove_dir_all(&dir);
    };

    case("truncated-safetensors", &["model.safetensors"], &|d| {
        let p = d.join("model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        rewrite(&p, &bytes[..st_len / 3]);
    });
    case("safetensors-header-garbage", &["model.safetensors"], &|d| {
        let p = d.join("model.safetensors");
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        rewrite(&p, &bytes);
    });
    case(
        "safetensors-header-not-json",
        &["model.safetensors"],
        &|d| {
            let p = d.join("model.safetensors");
            let mut bytes = std::fs::read(&p).unwrap();
            for b in &mut bytes[8..40] {
                *b = b'#';
            }
            rewrite(&p, &bytes);
        },
    );
    case("empty-safetensors", &["model.safetensors"], &|d| {
        rewrite(&d.join("model.safetensors"), b"");
    });
    case("dtype-i64", &["model.safetensors"], &|d| {
        // I64 makes the byte size disagree with the data offsets.
        retype(d, "model.layers.0.input_layernorm.weight", "I64");
    });
    case(
        "dtype-i16",
        &["I16", "model.layers.0.input_layernorm.weight"],
        &|d| {
            // I16 has the same size as F16: a valid file with an unsupported dtype.
            retype(d, "model.layers.0.input_layernorm.weight", "I16");
        },
    );
    case("tokenizer-garbage", &["tokenizer.json"], &|d| {
        rewrite(&d.join("tokenizer.json"), b"garbage {{ not json");
    });
    case("tokenizer-wrong-json", &["tokenizer.json"], &|d| {
        rewrite(&d.join("tokenizer.json"), br#"{"model": 42}"#);
    });
    case("missing-tokenizer", &["tokenizer.json"], &|d| {
        std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    });
    case("missing-safetensors", &["model.safetensors"], &|d| {
        std::fs::remove_file(d.join("model.safetensors")).unwrap();
    });
    case("config-not-json", &["config.json"], &|d| {
        rewrite(&d.join("config.json"), b"{not json");
    });
    case("unknown-architecture", &["GPTBogusForCausalLM"], &|d| {
        edit_config(d, |v| {
            v["architectures"] = serde_json::json!(["GPTBogusForCausalLM"]);
            v["model_type"] = serde_json::json!("gpt_bogus");
        });
    });
    // A config that disagrees with the tensor shapes is caught when the folder opens.
    case("shape-mismatch", &["gate_proj", "1024"], &|d| {
        edit_config(d, |v| v["intermediate_size"] = serde_json::json!(1024));
    });
    case("vocab-mismatch", &["embed_tokens", "40000"], &|d| {
        edit_config(d, |v| v["vocab_size"] = serde_json::json!(40000));
    });
    case("missing-layer", &["model.layers.30"], &|d| {
        edit_config(d, |v| v["num_hidden_layers"] = serde_json::json!(31));
    });
    case("bad-head-count", &["num_key_value_heads"], &|d| {
        edit_config(d, |v| v["num_key_value_heads"] = serde_json::json!(2));
    });
}

// ---------------------------------------------------------------- requests

#[test]
fn prompt_longer_than_context() {
    let m = model();
    let long = "hello world ".repeat(100);
    let line = expect_error(
        &[
            "generate", "--model", &m, "--ctx", "64", "-p", &long, "--raw", "-n", "2",
        ],
        &["prompt", "context", "64"],
    );
    assert!(line.contains("--ctx"), "no hint to raise --ctx: {line}");
}

#[test]
fn context_above_model_maximum() {
    let m = model();
    expect_error(
        &[
            "generate", "--model", &m, "--ctx", "100000", "-p", "hi", "--raw", "-n", "1",
        ],
        &["100000", "8192"],
    );
    expect_error(
        &[
            "logits", "--model", &m, "--ctx", "100000", "-p", "hi", "--raw",
        ],
        &["100000", "8192"],
    );
    // Library level: refused before any weight is uploaded.
    let src = common::model::source();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        kvlink::Engine::load(common::gpu().clone(), src.as_ref(), 100_000, &mut |_, _| {}).err()
    }));
    match r {
        Err(_) => panic!("Engine::load panicked"),
        Ok(None) => panic!("Engine::load accepted a context above the model maximum"),
        Ok(Some(e)) => assert!(e.to_string().contains("8192"), "{e}"),
    }
}

#[test]
fn bad_sampling_parameters() {
    let m = model();
    let base = [
        "generate",
        "--model",
        m.as_str(),
        "-p",
        "hi",
        "--raw",
        "-n",
        "1",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |extra: &[&str], want: &[&str]| {
        let args = with(extra);
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        expect_error(&args, want);
    };
    run(&["--temperature", "-1"], &["temperature", "-1"]);
    run(&["--temperature=-1"], &["temperature", "-1"]);
    run(&["-t", "-0.5"], &["temperature"]);
    run(&["--temperature", "NaN"], &["temperature"]);
    run(&["--top-p", "0"], &["top-p", "0"]);
    run(&["--top-p", "1.5"], &["top-p", "1.5"]);
    run(&["--top-p", "-0.5"], &["top-p", "-0.5"]);
    run(&["--top-k", "many"], &["many", "top-k"]);
    // chat validates too (before reading stdin).
    expect_error(
        &["chat", "--model", &m, "--temperature", "-1"],
        &["temperature"],
    );
}

#[test]
fn empty_prompt() {
    let m = model();
    expect_error(
        &["generate", "--model", &m, "-p", "", "--raw", "-n", "1"],
        &["prompt", "empty"],
    );
}
