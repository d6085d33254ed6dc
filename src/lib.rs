//! kvlink: a wgpu/WGSL inference engine for Llama-family models that makes RAG fast by
//! reusing per-document KV caches (KVLink, arXiv 2502.16002).

// On wasm32 wgpu's handles are neither Send nor Sync (one thread) and std::fs::File is a
// stub without Drop: the Arcs and the explicit drops are there for native threads, file
// handles and locks.
#![cfg_attr(
    target_arch = "wasm32",
    allow(clippy::arc_with_non_send_sync, clippy::drop_non_drop)
)]

pub mod error;
pub mod model;

pub use error::{Error, Result};
pub mod engine;
pub mod eval;
/// The parsers' fuzz harnesses (fuzz/ and tests/fuzz_corpus.rs; FUZZING.md).
#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub mod fuzz;
pub mod gpu;
pub mod kv;
pub mod link;
pub mod ops;
pub mod par;
pub mod paths;
pub mod sampling;
#[cfg(not(target_arch = "wasm32"))]
pub mod server;
#[cfg(not(target_arch = "wasm32"))]
pub mod setup;
#[cfg(not(target_arch = "wasm32"))]
pub mod train_data;
#[cfg(all(target_arch = "wasm32", feature = "web"))]
pub mod web;

pub use engine::{AskStats, Engine, GenerateParams, GenerateStats, Request};
pub use link::{Mode, PromptPlan};
