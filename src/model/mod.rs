//! Models: configuration, weight sources (GGUF, HF folders, random), tokenizer, and the
//! Llama-family forward pass.

pub mod config;
pub mod convert;
pub mod fetch;
pub mod fingerprint;
pub mod gguf;
pub mod hf;
#[cfg(not(target_arch = "wasm32"))]
pub mod hub;
pub mod link_config;
pub mod llama;
pub mod lora;
pub mod open;
pub mod paths;
pub mod random;
pub mod source;
pub mod tokenizer;

pub use config::{Arch, ModelConfig, RopeScaling};
pub use gguf::GgufModel;
pub use link_config::LinkConfig;
pub use lora::{LoraAdapter, LoraModel};
pub use open::open_model;
pub use paths::default_model_path;
pub use source::{HostTensor, WeightSource};
pub use tokenizer::{ChatMessage, ChatRun, RenderedChat, Tokenizer};
