//! kvlink: a wgpu/WGSL inference engine for Llama-family models that makes RAG fast by
//! reusing per-document KV caches (KVLink, arXiv 2502.16002).

pub mod error;
pub mod model;

pub use error::{Error, Result};
pub mod engine;
pub mod gpu;
pub mod ops;
pub mod sampling;

pub use engine::{Engine, GenerateParams, GenerateStats};
