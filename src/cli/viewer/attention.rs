//! Attention mass across prompt segments: the capture's shape, the call into the
//! engine, and the aggregations the heatmaps show.
//!
//! The engine records, while decoding, for every generated token, layer and head, how
//! much of the softmax weight falls on each prompt segment ("prefix", "doc 1".., "links",
//! "question", "answer"); each (token, layer, head) row sums to 1.

use anyhow::Result;
use kvlink::{AskStats, Engine, GenerateParams, Request};

pub use kvlink::engine::AttentionCapture;

/// Whether the capture comes from the engine (true) or is synthesized by the viewer.
pub const CAPTURE_IS_REAL: bool = true;

/// Answer `req`, capturing attention mass per segment during decode (the engine's
/// `ask_with_attention`).
pub fn ask_with_attention(
    engine: &Engine,
    req: &Request,
    params: &GenerateParams,
    on_token: impl FnMut(u32) -> bool,
) -> Result<(AskStats, AttentionCapture)> {
    Ok(engine.ask_with_attention(req, params, on_token)?)
}

/// Read-only views of a capture.
pub trait CaptureExt {
    fn n_tokens(&self) -> usize;
    fn groups_len(&self) -> usize;
    /// `[group]` mass of one (token, layer, head).
    fn row(&self, token: usize, layer: usize, head: usize) -> &[f32];
    /// `[layer][group]` mean over the chosen head (None: all heads) and token (None:
    /// all generated tokens).
    fn layer_group(&self, head: Option<usize>, token: Option<usize>) -> Vec<Vec<f32>>;
    /// `[group]` mean over layers and the chosen head (None: all heads) for one token.
    fn token_groups(&self, token: usize, head: Option<usize>) -> Vec<f32>;
}

impl CaptureExt for AttentionCapture {
    fn n_tokens(&self) -> usize {
        let per = self.layers * self.heads * self.groups.len();
        self.mass.len().checked_div(per).unwrap_or(0)
    }

    fn groups_len(&self) -> usize {
        self.groups.len()
    }

    fn row(&self, token: usize, layer: usize, head: usize) -> &[f32] {
        let g = self.groups.len();
        let i = ((token * self.layers + layer) * self.heads + head) * g;
        &self.mass[i..i + g]
    }

    fn layer_group(&self, head: Option<usize>, token: Option<usize>) -> Vec<Vec<f32>> {
        let g = self.groups.len();
        let nt = self.n_tokens();
        let toks: Vec<usize> = match token {
            Some(t) if t < nt => vec![t],
            Some(_) => vec![],
            None => (0..nt).collect(),
        };
        let heads: Vec<usize> = match head {
            Some(h) if h < self.heads => vec![h],
            _ => (0..self.heads).collect(),
        };
        let n = (toks.len() * heads.len()).max(1) as f32;
        (0..self.layers)
            .map(|l| {
                let mut acc = vec![0f32; g];
                for &t in &toks {
                    for &h in &heads {
                        for (a, m) in acc.iter_mut().zip(self.row(t, l, h)) {
                            *a += m;
                        }
                    }
                }
                acc.iter().map(|a| a / n).collect()
            })
            .collect()
    }

    fn token_groups(&self, token: usize, head: Option<usize>) -> Vec<f32> {
        let lg = self.layer_group(head, Some(token));
        let g = self.groups.len();
        let mut acc = vec![0f32; g];
        for row in &lg {
            for (a, m) in acc.iter_mut().zip(row) {
                *a += m;
            }
        }
        let n = lg.len().max(1) as f32;
        acc.iter().map(|a| a / n).collect()
    }
}
