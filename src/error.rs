//! Library error type. Every failure that user input can cause ends here, with a message
//! that says what was wrong and, where possible, what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file (GGUF, safetensors, config.json, tokenizer) is missing, truncated,
    /// corrupt or inconsistent.
    #[error("bad model file {path}: {msg}")]
    BadModel { path: PathBuf, msg: String },
    /// The model is valid but uses something this engine does not support.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A LoRA adapter folder is missing, corrupt, unsupported or does not fit the model.
    #[error("LoRA adapter {path}: {msg}")]
    Lora { path: PathBuf, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    /// GPU adapter/device problems (no adapter, missing limits, failed submit).
    #[error("GPU: {0}")]
    Gpu(String),
    /// Bad request input: prompt too long, bad sampling parameters, shape mismatch.
    #[error("{0}")]
    Input(String),
}

impl Error {
    pub fn bad_model(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::BadModel {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
