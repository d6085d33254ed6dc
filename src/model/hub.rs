//! Downloading a model repository from the Hugging Face Hub (`--model org/name`).
//!
//! Files go to `<cache>/hub/org--name/` (see [`cache_dir`]): `config.json`, the
//! safetensors weights (`model.safetensors`, or `model.safetensors.index.json` and every
//! shard it names), `tokenizer.json`, and the optional `tokenizer_config.json`,
//! `generation_config.json`, `chat_template.jinja` and `kvlink.json`. Each file is
//! streamed to `FILE.part` and renamed when complete, so an interrupted download never
//! leaves a truncated file under its real name, and a rerun fetches only the files that
//! are still missing. A `.complete` marker is written last; once it exists the folder is
//! used without any network access.
//!
//! Environment: `KVLINK_HUB_URL` (default `https://huggingface.co`),
//! `KVLINK_HUB_REVISION` (default `main`), `HF_TOKEN` (sent as a bearer token, for
//! private and gated repositories). Proxies are taken from the usual `HTTPS_PROXY` /
//! `HTTP_PROXY` / `ALL_PROXY` / `NO_PROXY` variables.

use crate::error::{Error, Result};
use crate::model::paths::cache_dir;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default Hub address.
pub const DEFAULT_HUB_URL: &str = "https://huggingface.co";
/// Name of the marker written after a complete download.
pub const COMPLETE_MARKER: &str = ".complete";

const OPTIONAL_FILES: [&str; 4] = [
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "kvlink.json",
];

/// Files larger than this get a byte progress bar.
const BAR_MIN_BYTES: u64 = 1 << 20;

/// Whether `s` has the shape of a Hub repository id (`org/name`): exactly one `/`, not
/// starting with `.` or `/`. Says nothing about whether the name is valid (see
/// [`download`]) or exists.
pub fn looks_like_repo(s: &str) -> bool {
    s.matches('/').count() == 1 && !s.starts_with('.') && !s.starts_with('/')
}

/// Check a repository id: `org/name`, each part non-empty and made of ASCII letters,
/// digits, `-`, `_` and `.`, not starting or ending with `-` or `.`, without `..` or
/// `--` (the Hub's own rules; `--` also keeps the cache folder names unambiguous).
fn validate_repo(repo: &str) -> Result<(&str, &str)> {
    let bad = |why: &str| {
        Err(Error::Input(format!(
            "invalid Hugging Face repository name {repo:?}: {why} (expected org/name, e.g. \
             HuggingFaceTB/SmolLM2-135M-Instruct)"
        )))
    };
    let Some((org, name)) = repo.split_once('/') else {
        return bad("no '/'");
    };
    if name.contains('/') {
        return bad("more than one '/'");
    }
    for part in [org, name] {
        if part.is_empty() {
            return bad("empty organisation or name");
        }
        if part.len() > 96 {
            return bad("longer than 96 characters");
        }
        if let Some(c) = part
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return bad(&format!("character {c:?} is not allowed"));
        }
        if part.contains("..") || part.contains("--") {
            return bad("'..' and '--' are not allowed");
        }
        if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
            return bad("a part may not start or end with '-' or '.'");
        }
    }
    Ok((org, name))
}

/// A file name from the repository (a shard named in the index) that is safe to join to
/// the local folder and to put in a URL.
fn safe_file_name(f: &str) -> bool {
    !f.is_empty()
        && !f.starts_with('.')
        && !f.contains("..")
        && f.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The local folder a repository downloads to: `<cache>/hub/org--name`.
pub fn local_dir(repo: &str) -> Result<PathBuf> {
    let (org, name) = validate_repo(repo)?;
    Ok(cache_dir().join("hub").join(format!("{org}--{name}")))
}

fn env_nonempty(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.trim().is_empty())
}

struct Hub<'a> {
    repo: &'a str,
    base: String,
    revision: String,
    token: Option<String>,
    agent: ureq::Agent,
    dir: PathBuf,
    progress: bool,
}

/// What a request for one file gave.
enum Fetched {
    Done,
    NotFound,
}

impl Hub<'_> {
    fn url(&self, file: &str) -> String {
        // A revision like `refs/pr/1` is one path segment in the URL.
        let rev = self.revision.replace('/', "%2F");
        format!("{}/{}/resolve/{rev}/{file}", self.base, self.repo)
    }

    fn network_error(&self, reason: impl std::fmt::Display) -> Error {
        Error::Input(format!(
            "cannot download {} from {}: {reason} (no internet? download the repository \
             yourself and pass --model DIR)",
            self.repo, self.base
        ))
    }

    fn status_error(&self, file: &str, status: u16) -> Error {
        let text = match status {
            401 | 403 => {
                let hint = if self.token.is_some() {
                    "the token in HF_TOKEN has no access to it"
                } else {
                    "set HF_TOKEN to a Hugging Face access token that has access (accept \
                     the model's license on its Hub page first if it is gated)"
                };
                format!(
                    "cannot download {} from {}: HTTP {status} for {file}: the repository \
                     does not exist, or is private or gated; {hint}",
                    self.repo, self.base
                )
            }
            429 => format!(
                "cannot download {} from {}: HTTP 429 for {file}: too many requests; wait \
                 and try again (setting HF_TOKEN raises the limit)",
                self.repo, self.base
            ),
            s if s >= 500 => format!(
                "cannot download {} from {}: HTTP {s} for {file} (server error; try again \
                 later, or download the repository yourself and pass --model DIR)",
                self.repo, self.base
            ),
            s => format!(
                "cannot download {} from {}: unexpected HTTP {s} for {file}",
                self.repo, self.base
            ),
        };
        Error::Input(text)
    }

    /// Download `file` into the folder unless it is already there. A 404 gives
    /// `NotFound`; everything else that is not a success is an error.
    fn fetch(&self, file: &str) -> Result<Fetched> {
        let dest = self.dir.join(file);
        if dest.is_file() {
            return Ok(Fetched::Done);
        }
        let mut req = self.agent.get(&self.url(file));
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut resp = req.call().map_err(|e| self.network_error(e))?;
        let status = resp.status().as_u16();
        if status == 404 {
            return Ok(Fetched::NotFound);
        }
        if !(200..300).contains(&status) {
            return Err(self.status_error(file, status));
        }
        let len = resp.body().content_length();
        let part = self.dir.join(format!("{file}.part"));
        let r = self.stream(resp.body_mut().as_reader(), &part, file, len);
        if let Err(e) = r {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
        std::fs::rename(&part, &dest).map_err(|e| Error::io(&dest, e))?;
        Ok(Fetched::Done)
    }

    fn stream(&self, mut body: impl Read, part: &Path, file: &str, len: Option<u64>) -> Result<()> {
        let mut out = std::fs::File::create(part).map_err(|e| Error::io(part, e))?;
        let pb = if self.progress && len.is_none_or(|l| l >= BAR_MIN_BYTES) {
            let pb = ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr());
            let style = match len {
                Some(_) => ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                )
                .map(|s| s.progress_chars("=> ")),
                None => ProgressStyle::with_template("{msg} {spinner} {bytes} ({bytes_per_sec})"),
            };
            if let Ok(s) = style {
                pb.set_style(s);
            }
            pb.set_message(file.to_string());
            pb
        } else {
            ProgressBar::hidden()
        };
        let mut buf = vec![0u8; 1 << 16];
        let mut done: u64 = 0;
        let result = loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    break Err(self
                        .network_error(format!("connection lost while downloading {file}: {e}")))
                }
            };
            if let Err(e) = out.write_all(&buf[..n]) {
                break Err(Error::io(part, e));
            }
            done += n as u64;
            pb.set_position(done);
        };
        pb.finish_and_clear();
        result?;
        if let Some(l) = len {
            if done != l {
                return Err(
                    self.network_error(format!("{file} was cut short ({done} of {l} bytes)"))
                );
            }
        }
        out.sync_all().map_err(|e| Error::io(part, e))?;
        Ok(())
    }

    fn required(&self, file: &str, missing: impl FnOnce() -> String) -> Result<()> {
        match self.fetch(file)? {
            Fetched::Done => Ok(()),
            Fetched::NotFound => Err(Error::Input(missing())),
        }
    }

    fn run(&self) -> Result<()> {
        let repo = self.repo;
        let rev = &self.revision;
        let at_rev = if rev == "main" {
            String::new()
        } else {
            format!(" at revision {rev}")
        };
        self.required("config.json", || {
            format!("{repo} has no config.json{at_rev} (is it a model repository?)")
        })?;
        match self.fetch("model.safetensors")? {
            Fetched::Done => {}
            Fetched::NotFound => {
                let index = "model.safetensors.index.json";
                self.required(index, || {
                    format!(
                        "{repo} has neither model.safetensors nor {index}{at_rev}; kvlink \
                         reads safetensors weights (or a GGUF file passed with --model FILE)"
                    )
                })?;
                for shard in self.shards(&self.dir.join(index))? {
                    self.required(&shard, || {
                        format!("{repo}: {index} names {shard}, which is not in the repository")
                    })?;
                }
            }
        }
        self.required("tokenizer.json", || {
            format!(
                "{repo} has no tokenizer.json{at_rev}; kvlink needs the Hugging Face \
                 tokenizer file"
            )
        })?;
        for f in OPTIONAL_FILES {
            self.fetch(f)?;
        }
        Ok(())
    }

    /// The shard file names in a safetensors index (`weight_map` values), deduplicated.
    fn shards(&self, index: &Path) -> Result<BTreeSet<String>> {
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let bad = |msg: String| {
            // Drop it so a rerun fetches it again rather than trusting a broken file.
            let _ = std::fs::remove_file(index);
            Error::bad_model(index, msg)
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no weight_map object".into()))?;
        let mut out = BTreeSet::new();
        for f in map.values() {
            let f = f
                .as_str()
                .ok_or_else(|| bad("weight_map values must be file names".into()))?;
            if !safe_file_name(f) {
                return Err(bad(format!("unsupported shard file name {f:?}")));
            }
            out.insert(f.to_string());
        }
        if out.is_empty() {
            return Err(bad("weight_map is empty".into()));
        }
        Ok(out)
    }
}

/// Download the Hub repository `repo` (`org/name`) into `<cache>/hub/org--name/` and
/// return that folder. If the folder holds a `.complete` marker it is returned at once,
/// without network access. `progress` shows byte progress bars (for large files) and a
/// line or two on stderr.
pub fn download(repo: &str, progress: bool) -> Result<PathBuf> {
    let dir = local_dir(repo)?;
    if dir.join(COMPLETE_MARKER).is_file() {
        return Ok(dir);
    }
    let base = env_nonempty("KVLINK_HUB_URL")
        .unwrap_or_else(|| DEFAULT_HUB_URL.to_string())
        .trim()
        .trim_end_matches('/')
        .to_string();
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(Error::Input(format!(
            "KVLINK_HUB_URL must start with http:// or https:// (got {base:?})"
        )));
    }
    let revision = env_nonempty("KVLINK_HUB_REVISION").unwrap_or_else(|| "main".to_string());
    let token = env_nonempty("HF_TOKEN").map(|t| t.trim().to_string());
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .user_agent(concat!("kvlink/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    if progress {
        eprintln!("downloading {repo} from {base} into {}", dir.display());
    }
    let hub = Hub {
        repo,
        base,
        revision,
        token,
        agent,
        dir: dir.clone(),
        progress,
    };
    if let Err(e) = hub.run() {
        // Leave no empty folder behind (a repository that does not exist, say).
        let _ = std::fs::remove_dir(&dir);
        return Err(e);
    }
    let marker = dir.join(COMPLETE_MARKER);
    let note = format!("{repo}@{}\n", hub.revision);
    std::fs::write(&marker, note).map_err(|e| Error::io(&marker, e))?;
    if progress {
        eprintln!("downloaded {repo}");
    }
    Ok(dir)
}
