//! Attention across prompt segments and the viewer.
//!
//! - `attention`: the engine's per-segment attention capture and its aggregations.
//! - `export`: headless JSON / PNG heatmap export (`kvlink ask --attention-out/-png`).
//! - `app` (cargo feature `viewer`): the desktop app `kvlink view` (eframe, wgpu).
//!
//! Compiled into the `kvlink` binary (included from `src/cli/mod.rs`).
#![allow(dead_code)]

pub mod attention;
pub mod export;

#[cfg(feature = "viewer")]
pub mod app;

use anyhow::Result;
use attention::AttentionCapture;
use kvlink::Engine;
use std::path::Path;

/// Write the capture of `kvlink ask` as JSON and/or a PNG heatmap.
pub fn export_ask(
    engine: &Engine,
    cap: &AttentionCapture,
    mode: kvlink::Mode,
    json: Option<&Path>,
    png: Option<&Path>,
) -> Result<()> {
    let piece = |id: u32| engine.tokenizer().decode(&[id]).unwrap_or_default();
    if let Some(p) = json {
        export::write_json(cap, &piece, p)?;
        eprintln!("attention: {}", p.display());
    }
    if let Some(p) = png {
        export::write_png(cap, &format!("[{mode}] "), p)?;
        eprintln!("attention heatmap: {}", p.display());
    }
    Ok(())
}
