//! The fetch scripts check what they fetch, and what is already there, against pinned
//! sha256 sums: a damaged or substituted model or data file is refused, not used.
//! (Present files only: no download is needed.)

mod common;

use common::tempdir::tempdir;
use std::path::Path;
use std::process::Command;

fn run(script: &str, cache: &Path) -> (bool, String) {
    let out = Command::new("bash")
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("scripts")
                .join(script),
        )
        .env("KVLINK_CACHE", cache)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn a_damaged_model_is_refused_and_the_pinned_one_accepted() {
    let real = kvlink::model::default_model_path();
    assert!(
        real.is_file(),
        "run scripts/fetch-model.sh ({})",
        real.display()
    );
    let name = real.file_name().unwrap();
    let dir = tempdir("fetch-model");
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();

    // The real file with one byte changed.
    let mut bytes = std::fs::read(&real).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(models.join(name), &bytes).unwrap();
    let (ok, text) = run("fetch-model.sh", dir.path());
    assert!(!ok, "a damaged model passed: {text}");
    assert!(text.contains("sha256 mismatch"), "{text}");

    // The pinned file itself.
    bytes[mid] ^= 1;
    std::fs::write(models.join(name), &bytes).unwrap();
    let (ok, text) = run("fetch-model.sh", dir.path());
    assert!(ok, "{text}");
    assert!(text.contains("model present"), "{text}");
}

#[test]
fn damaged_eval_data_is_refused() {
    let dir = tempdir("fetch-data");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("hotpotqa.json"), b"[]").unwrap();
    let (ok, text) = run("fetch-eval-data.sh", dir.path());
    assert!(!ok, "damaged HotpotQA data passed: {text}");
    assert!(
        text.contains("sha256 mismatch") && text.contains("hotpotqa.json"),
        "{text}"
    );
}
