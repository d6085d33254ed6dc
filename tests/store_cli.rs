//! The document store from the command line: `kvlink store stats|prune`, a store that
//! cannot be used (a warning; the question is still answered), and several `kvlink ask`
//! processes sharing one store at once. Each `ask` loads the real model (seconds on
//! lavapipe), so there are few of them.

mod common;

use common::tempdir::tempdir;
use kvlink::kv::{DiskStore, DocKey, DocKv};
use std::path::Path;
use std::process::{Command, Output};

fn kvlink(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvlink"));
    cmd.args(args);
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let d = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("xdg-runtime");
        std::fs::create_dir_all(&d).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        cmd.env("XDG_RUNTIME_DIR", d);
    }
    cmd
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok(o: Output) -> (String, String) {
    let (out, err) = text(&o);
    assert!(o.status.success(), "failed ({}):\n{out}\n{err}", o.status);
    assert!(!err.contains("panicked"), "{err}");
    (out, err)
}

fn docs(dir: &Path) -> Vec<String> {
    let a = dir.join("a.txt");
    let b = dir.join("b.txt");
    std::fs::write(&a, "The Eiffel Tower was completed in 1889 in Paris.\n").unwrap();
    std::fs::write(&b, "Marie Curie discovered radium in 1898.\n").unwrap();
    vec![a.display().to_string(), b.display().to_string()]
}

fn ask_args<'a>(model: &'a str, store: &'a str, d: &'a [String]) -> Vec<&'a str> {
    vec![
        "ask",
        "--model",
        model,
        "--store",
        store,
        "-d",
        &d[0],
        "-d",
        &d[1],
        "-q",
        "When was the tower completed?",
        "-n",
        "6",
        "--json",
    ]
}

fn answer(stdout: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    v["answer"].as_str().unwrap().to_string()
}

#[test]
fn store_stats_and_prune_commands() {
    let td = tempdir("store-cmd");
    let store = DiskStore::open(td.path()).unwrap();
    let mut total = 0;
    for i in 0..3u32 {
        let t = vec![i, 7, 9];
        let key = DocKey::new("m", "t", &t);
        store
            .put(&key, "m", "t", &t, &DocKv::zeros(3, 2, 32))
            .unwrap();
        total += std::fs::metadata(store.path_for(&key)).unwrap().len();
    }
    let dir = td.path().display().to_string();
    let (out, _) = ok(kvlink(&["store", "stats", "--store", &dir, "--json"])
        .output()
        .unwrap());
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["entries"], 3);
    assert_eq!(v["entry_bytes"], total);
    assert_eq!(v["q8_entries"], 0);
    // Rewritten as q8 in place, then counted as such.
    let (out, _) = ok(
        kvlink(&["store", "convert", "--store", &dir, "--to", "q8", "--json"])
            .output()
            .unwrap(),
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (v["converted"].as_u64(), v["skipped"].as_u64()),
        (Some(3), Some(0)),
        "{v}"
    );
    assert_eq!(v["bytes_before"], total);
    let (out, _) = ok(kvlink(&["store", "stats", "--store", &dir, "--json"])
        .output()
        .unwrap());
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["q8_entries"], 3);
    assert!(v["entry_bytes"].as_u64().unwrap() < total, "{v}");
    for bad in [
        &["--to", "q4"][..],
        &["--to", "q8", "--store", "/nonexistent/kv"][..],
    ] {
        let mut args = vec!["store", "convert"];
        if !bad.contains(&"--store") {
            args.extend(["--store", &dir]);
        }
        args.extend(bad);
        let o = kvlink(&args).output().unwrap();
        let (_, err) = text(&o);
        assert!(
            !o.status.success() && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    let (out, _) = ok(kvlink(&[
        "store",
        "prune",
        "--store",
        &dir,
        "--store-max-gb",
        "0",
        "--json",
    ])
    .output()
    .unwrap());
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["removed_entries"], 3);
    assert_eq!(v["remaining_bytes"], 0);
    assert!(store.entries().unwrap().is_empty());
    let o = kvlink(&["store", "prune", "--store", &dir, "--store-max-gb", "-1"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let (_, help) = ok(kvlink(&["store", "--help"]).output().unwrap());
    let _ = help;
    let (help, _) = ok(kvlink(&["ask", "--help"]).output().unwrap());
    assert!(help.contains("--store-max-gb"), "{help}");
}

#[test]
fn concurrent_asks_share_one_store_and_an_unusable_store_is_a_warning() {
    let model = common::model::model_path().display().to_string();
    let td = tempdir("ask-store");
    let d = docs(td.path());

    // A store path that is a file: warned about, and the question is answered.
    let file = td.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let file = file.display().to_string();
    let (out, err) = ok(kvlink(&ask_args(&model, &file, &d)).output().unwrap());
    assert!(
        err.contains("warning") && err.contains("not a directory"),
        "{err}"
    );
    let want = answer(&out);
    assert!(!want.is_empty());

    // Three processes at once on one (empty) store: all answer the same; then a fourth
    // reads both documents from the disk store and answers the same again.
    let store = td.path().join("kv");
    let store = store.display().to_string();
    let kids: Vec<_> = (0..3)
        .map(|_| {
            kvlink(&ask_args(&model, &store, &d))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for k in kids {
        let (out, err) = ok(k.wait_with_output().unwrap());
        assert!(
            !err.contains("warning") && !err.contains("corrupt"),
            "{err}"
        );
        assert_eq!(answer(&out), want);
    }
    let (out, _) = ok(kvlink(&ask_args(&model, &store, &d)).output().unwrap());
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(answer(&out), want);
    assert_eq!(v["timings_ms"]["disk_docs"], 2, "{v}");
    let st = DiskStore::inspect(&store).stats().unwrap();
    assert_eq!(
        (st.entries, st.tmp_files, st.corrupt_files),
        (3, 0, 0),
        "{st:?}"
    );
}
