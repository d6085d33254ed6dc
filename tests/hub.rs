//! `--model org/name` downloads from a Hugging Face Hub (`kvlink::model::hub`), tested
//! against a tiny HTTP server in this process (no internet needed): a full download, a
//! cached second run with the server gone, a sharded repository, and clear one-line
//! errors for a missing config.json, HTTP 500, a dropped connection, a cut-short body,
//! 401 without HF_TOKEN, and bad repository names.

use kvlink::model::hub::looks_like_repo;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, OnceLock};

/// A scratch folder of this test run.
fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("hub-test-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The served repositories: `<root>/org/tiny` (the random "tiny" model as an HF folder)
/// and `<root>/org/sharded` (the same weights in two shards plus an index).
fn repo_root() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = scratch("served");
        let tiny = root.join("org").join("tiny");
        let src = kvlink::model::random::RandomModel::new("tiny", 1).unwrap();
        kvlink::model::convert::write_hf_folder(&src, &tiny, |_, _| {}).unwrap();

        let sharded = root.join("org").join("sharded");
        std::fs::create_dir_all(&sharded).unwrap();
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            if tiny.join(f).exists() {
                std::fs::copy(tiny.join(f), sharded.join(f)).unwrap();
            }
        }
        let bytes = std::fs::read(tiny.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors = st.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let half = tensors.len() / 2;
        let mut weight_map = serde_json::Map::new();
        for (i, part) in [&tensors[..half], &tensors[half..]].into_iter().enumerate() {
            let name = format!("model-{:05}-of-00002.safetensors", i + 1);
            for (t, _) in part {
                weight_map.insert(t.clone(), name.clone().into());
            }
            let data =
                safetensors::serialize(part.iter().map(|(n, v)| (n.clone(), v)), None).unwrap();
            std::fs::write(sharded.join(&name), data).unwrap();
        }
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(
            sharded.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index).unwrap(),
        )
        .unwrap();
        root
    })
}

/// A minimal HTTP/1.1 server for `GET /{org}/{name}/resolve/main/{file}` over
/// [`repo_root`], with special repositories: `org/broken` (HTTP 500), `org/hangup`
/// (closes the connection without answering), `org/truncated` (tiny, but the weights
/// are cut off halfway through), `org/gated` (tiny, 401 unless
/// `Authorization: Bearer secret`). Returns the base URL and the request log.
fn serve() -> (String, Arc<Mutex<Vec<String>>>) {
    let root = repo_root().clone();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let root = root.clone();
            let log = log2.clone();
            std::thread::spawn(move || {
                let _ = handle(conn, &root, &log);
            });
        }
    });
    (base, log)
}

fn respond(s: &mut TcpStream, status: &str, body: &[u8]) -> std::io::Result<()> {
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    s.flush()
}

fn handle(mut s: TcpStream, root: &Path, log: &Mutex<Vec<String>>) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            return Ok(());
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
    log.lock().unwrap().push(path.clone());
    let authorized = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("authorization: bearer secret"));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let [org, name, "resolve", "main", file] = parts[..] else {
        return respond(&mut s, "404 Not Found", b"not found");
    };
    let serve_dir = |n: &str| root.join(org).join(n).join(file);
    match name {
        "broken" => respond(&mut s, "500 Internal Server Error", b"oops"),
        "hangup" => Ok(()), // dropped without a response
        "gated" if !authorized => respond(&mut s, "401 Unauthorized", b"no"),
        "truncated" if file == "model.safetensors" => {
            let data = std::fs::read(serve_dir("tiny"))?;
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                data.len()
            )?;
            s.write_all(&data[..data.len() / 2])?;
            s.flush()
        }
        _ => {
            let n = if matches!(name, "gated" | "truncated") {
                "tiny"
            } else {
                name
            };
            match std::fs::read(serve_dir(n)) {
                Ok(data) => respond(&mut s, "200 OK", &data),
                Err(_) => respond(&mut s, "404 Not Found", b"Entry not found"),
            }
        }
    }
}

/// Run `kvlink info --model REPO --json` with the given hub URL and cache folder.
fn info(repo: &str, base: &str, cache: &Path, token: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvlink"));
    cmd.args(["info", "--model", repo, "--json"])
        .env("KVLINK_HUB_URL", base)
        .env("KVLINK_CACHE", cache)
        .env_remove("KVLINK_HUB_REVISION")
        .env_remove("HF_TOKEN");
    for p in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(p);
    }
    if let Some(t) = token {
        cmd.env("HF_TOKEN", t);
    }
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        cmd.env("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    cmd.output().expect("run the kvlink binary")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn assert_tiny(o: &Output) {
    assert!(o.status.success(), "kvlink info failed: {}", stderr(o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("info --json output");
    assert_eq!(v["config"]["hidden_size"], 128, "{v}");
    assert_eq!(v["config"]["num_hidden_layers"], 2, "{v}");
}

/// A failed run: non-zero exit, one `error:` line that contains every `needle`, no
/// panic.
fn assert_error(o: &Output, needles: &[&str]) -> String {
    let e = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {e}");
    assert!(!e.contains("panicked"), "panic: {e}");
    let line = e
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {e}"))
        .to_string();
    for n in needles {
        assert!(line.contains(n), "{n:?} not in {line:?}");
    }
    line
}

/// A base URL where nothing listens (a bound-then-dropped port).
fn dead_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    url
}

#[test]
fn repo_shape() {
    assert!(looks_like_repo("HuggingFaceTB/SmolLM2-135M-Instruct"));
    assert!(looks_like_repo("org/name"));
    assert!(!looks_like_repo("model.gguf"));
    assert!(!looks_like_repo("./org/name"));
    assert!(!looks_like_repo("/abs/path"));
    assert!(!looks_like_repo("a/b/c"));
}

#[test]
fn downloads_then_uses_the_cache_offline() {
    let (base, log) = serve();
    let cache = scratch("cache-full");
    let o = info("org/tiny", &base, &cache, None);
    assert_tiny(&o);
    let dir = cache.join("hub").join("org--tiny");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        ".complete",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing in {}", dir.display());
    }
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let requests = log.lock().unwrap().clone();
    assert!(
        requests.contains(&"/org/tiny/resolve/main/config.json".to_string()),
        "{requests:?}"
    );
    assert!(
        !requests.iter().any(|r| r.ends_with("index.json")),
        "no index needed: {requests:?}"
    );

    // Second run: nothing listens at the hub URL any more; the cache is used.
    let o = info("org/tiny", &dead_url(), &cache, None);
    assert_tiny(&o);
}

#[test]
fn sharded_repository() {
    let (base, log) = serve();
    let cache = scratch("cache-sharded");
    let o = info("org/sharded", &base, &cache, None);
    assert_tiny(&o);
    let dir = cache.join("hub").join("org--sharded");
    for f in [
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    assert!(!dir.join("model.safetensors").exists());
    let requests = log.lock().unwrap().clone();
    assert!(
        requests.iter().any(|r| r.ends_with("/model.safetensors")),
        "{requests:?}"
    );
}

#[test]
fn missing_config_is_a_clear_error() {
    let (base, _) = serve();
    let cache = scratch("cache-missing");
    let o = info("org/nothing", &base, &cache, None);
    assert_error(&o, &["org/nothing has no config.json", "model repository"]);
    assert!(!cache.join("hub").join("org--nothing").exists());
}

#[test]
fn server_errors_are_clear() {
    let (base, _) = serve();
    let cache = scratch("cache-errors");
    let o = info("org/broken", &base, &cache, None);
    assert_error(&o, &["cannot download org/broken", "500"]);

    let o = info("org/hangup", &base, &cache, None);
    assert_error(&o, &["cannot download org/hangup", &base, "no internet?"]);

    let o = info("org/tiny", &dead_url(), &cache, None);
    assert_error(
        &o,
        &["cannot download org/tiny", "no internet?", "--model DIR"],
    );

    // Weights cut off halfway: an error, and neither the weights nor a .part file nor
    // the .complete marker are left behind; config.json (complete) is kept.
    let o = info("org/truncated", &base, &cache, None);
    assert_error(&o, &["cannot download org/truncated"]);
    let dir = cache.join("hub").join("org--truncated");
    assert!(dir.join("config.json").is_file());
    for f in ["model.safetensors", "model.safetensors.part", ".complete"] {
        assert!(!dir.join(f).exists(), "{f} left behind");
    }
}

#[test]
fn gated_repository_needs_a_token() {
    let (base, _) = serve();
    let cache = scratch("cache-gated");
    let o = info("org/gated", &base, &cache, None);
    assert_error(&o, &["401", "HF_TOKEN"]);
    let o = info("org/gated", &base, &cache, Some("wrong"));
    assert_error(&o, &["401", "HF_TOKEN"]);
    let o = info("org/gated", &base, &cache, Some("secret"));
    assert_tiny(&o);
}

#[test]
fn bad_repository_names() {
    let cache = scratch("cache-names");
    let url = dead_url();
    for repo in ["org/na me", "org/a..b", "org/-x", "org/"] {
        let o = info(repo, &url, &cache, None);
        assert_error(&o, &["invalid Hugging Face repository name"]);
    }
    // Not repository-shaped: the plain "not found" error, no download attempt.
    let o = info("a/b/c", &url, &cache, None);
    assert_error(&o, &["model not found"]);
}
