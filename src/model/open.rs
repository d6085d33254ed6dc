//! Open a model from a path: an HF folder or a GGUF file.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::hf::HfModel;
use crate::model::source::WeightSource;

/// Open whatever `path` points at: a directory -> HF safetensors folder; a `.gguf` file
/// (or any file starting with the GGUF magic) -> GGUF model. A `config.json` or
/// `*.safetensors` file inside an HF folder opens that folder.
pub fn open_model(path: &Path) -> Result<Box<dyn WeightSource>> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("model not found: {}", path.display()),
                ),
            ))
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    if meta.is_dir() {
        return Ok(Box::new(HfModel::open(path)?));
    }
    let mut magic = [0u8; 4];
    let got_magic = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok();
    let is_gguf_ext = path
        .extension()
        .map(|e| e.eq_ignore_ascii_case("gguf"))
        .unwrap_or(false);
    if (got_magic && &magic == b"GGUF") || is_gguf_ext {
        return open_gguf(path);
    }
    let fname = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if fname == "config.json" || fname.ends_with(".safetensors") || fname.ends_with(".index.json") {
        if let Some(dir) = path.parent().filter(|d| d.join("config.json").is_file()) {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            return Ok(Box::new(HfModel::open(dir)?));
        }
    }
    Err(Error::bad_model(
        path,
        "not a GGUF file or HF model folder (expected a .gguf file or a directory with \
         config.json and model.safetensors)",
    ))
}

fn open_gguf(path: &Path) -> Result<Box<dyn WeightSource>> {
    Ok(Box::new(crate::model::gguf::GgufModel::open(path)?))
}
