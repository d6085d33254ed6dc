//! Headless export of an attention capture: JSON for scripts, a PNG heatmap
//! (layers x segments, mean over heads and generated tokens) for people and CI.

use super::attention::{AttentionCapture, CaptureExt, CAPTURE_IS_REAL};
use anyhow::{Context, Result};
use std::path::Path;

/// The capture as JSON: `{groups, layers, heads, tokens: [{id, text}], mass,
/// mass_shape: [tokens, layers, heads, groups], mean_layer_group, mean_group, synthetic}`.
pub fn capture_json(cap: &AttentionCapture, piece: &dyn Fn(u32) -> String) -> serde_json::Value {
    let tokens: Vec<serde_json::Value> = cap
        .tokens
        .iter()
        .map(|&id| serde_json::json!({"id": id, "text": piece(id)}))
        .collect();
    let mean = cap.layer_group(None, None);
    let g = cap.groups.len();
    let mut mean_group = vec![0f32; g];
    for row in &mean {
        for (a, m) in mean_group.iter_mut().zip(row) {
            *a += m / mean.len().max(1) as f32;
        }
    }
    serde_json::json!({
        "groups": cap.groups,
        "layers": cap.layers,
        "heads": cap.heads,
        "tokens": tokens,
        "mass_shape": [cap.n_tokens(), cap.layers, cap.heads, g],
        "mass": cap.mass,
        "mean_layer_group": mean,
        "mean_group": mean_group,
        "synthetic": !CAPTURE_IS_REAL,
    })
}

pub fn write_json(
    cap: &AttentionCapture,
    piece: &dyn Fn(u32) -> String,
    path: &Path,
) -> Result<()> {
    let v = capture_json(cap, piece);
    std::fs::write(path, serde_json::to_string(&v)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// An RGB canvas.
pub struct Canvas {
    pub w: usize,
    pub h: usize,
    pub px: Vec<[u8; 3]>,
}

impl Canvas {
    pub fn new(w: usize, h: usize, bg: [u8; 3]) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![bg; w * h],
        }
    }

    pub fn rect(&mut self, x: usize, y: usize, w: usize, h: usize, c: [u8; 3]) {
        for yy in y..(y + h).min(self.h) {
            for xx in x..(x + w).min(self.w) {
                self.px[yy * self.w + xx] = c;
            }
        }
    }

    pub fn frame(&mut self, x: usize, y: usize, w: usize, h: usize, c: [u8; 3]) {
        self.rect(x, y, w, 1, c);
        self.rect(x, y + h.saturating_sub(1), w, 1, c);
        self.rect(x, y, 1, h, c);
        self.rect(x + w.saturating_sub(1), y, 1, h, c);
    }

    /// Draw `s` with the 8x8 font at `scale` (advance GLYPH*scale per character).
    pub fn text(&mut self, x: usize, y: usize, s: &str, scale: usize, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            let x0 = x + i * GLYPH * scale;
            for (row, bits) in g.iter().enumerate() {
                for col in 0..GLYPH {
                    if bits & (1 << col) != 0 {
                        self.rect(x0 + col * scale, y + row * scale, scale, scale, c);
                    }
                }
            }
        }
    }

    pub fn write_png(&self, path: &Path) -> Result<()> {
        let f = std::fs::File::create(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(f), self.w as u32, self.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header()?;
        w.write_image_data(bytemuck::cast_slice(&self.px))?;
        w.finish()?;
        Ok(())
    }
}

pub fn text_width(s: &str, scale: usize) -> usize {
    s.chars().count() * GLYPH * scale
}

/// Glyph cell size in pixels at scale 1 (width = advance = height).
const GLYPH: usize = 8;

/// A perceptual color scale (viridis, 5 stops) for `t` in 0..=1.
pub fn colormap(t: f32) -> [u8; 3] {
    const STOPS: [[f32; 3]; 5] = [
        [68.0, 1.0, 84.0],
        [59.0, 82.0, 139.0],
        [33.0, 145.0, 140.0],
        [94.0, 201.0, 98.0],
        [253.0, 231.0, 37.0],
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * (STOPS.len() - 1) as f32;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f32;
    let mut c = [0u8; 3];
    for k in 0..3 {
        c[k] = (STOPS[i][k] * (1.0 - f) + STOPS[i + 1][k] * f).round() as u8;
    }
    c
}

/// Render a `[layer][group]` matrix as a heatmap with labels, values in the cells and
/// a color bar. Colors scale from 0 to the matrix maximum.
pub fn heatmap(title: &str, groups: &[String], m: &[Vec<f32>]) -> Canvas {
    const S: usize = 2; // font scale: 16x16 px glyph cells
    const CH: usize = GLYPH * S + 6; // cell height
    let label = |g: &str| -> String { g.chars().take(10).collect() };
    let cw = groups
        .iter()
        .map(|g| text_width(&label(g), S))
        .max()
        .unwrap_or(0)
        .max(text_width("0.000", S))
        + 12;
    let left = text_width("L00", S) + 16;
    let top = 2 * GLYPH * S + 16 + GLYPH * S + 12;
    let bar_w = 24;
    let right = 16 + bar_w + 8 + text_width("0.000", S) + 16;
    let grid_w = cw * groups.len();
    let grid_h = CH * m.len();
    let w = (left + grid_w + right).max(text_width(title, S) + 32);
    let h = top + grid_h + 16 + GLYPH * S + 16;
    let white = [255, 255, 255];
    let black = [20, 20, 20];
    let grey = [110, 110, 110];
    let mut c = Canvas::new(w, h, white);
    c.text(16, 12, title, S, black);
    let max = m
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0f32, f32::max)
        .max(1e-6);
    // Column labels.
    for (j, g) in groups.iter().enumerate() {
        let l = label(g);
        let x = left + j * cw + (cw - text_width(&l, S)) / 2;
        c.text(x, top - GLYPH * S - 6, &l, S, black);
    }
    for (l, row) in m.iter().enumerate() {
        let y = top + l * CH;
        let lab = format!("L{l}");
        c.text(left - 8 - text_width(&lab, S), y + 3, &lab, S, black);
        for (j, v) in row.iter().enumerate() {
            let x = left + j * cw;
            let col = colormap(v / max);
            c.rect(x, y, cw, CH, col);
            let lum = 0.299 * col[0] as f32 + 0.587 * col[1] as f32 + 0.114 * col[2] as f32;
            let fg = if lum > 140.0 { black } else { white };
            let s = format!("{v:.3}");
            c.text(x + (cw - text_width(&s, S)) / 2, y + 3, &s, S, fg);
            c.frame(x, y, cw + 1, CH + 1, grey);
        }
    }
    c.frame(left, top, grid_w + 1, grid_h + 1, black);
    // Color bar: max at the top, 0 at the bottom.
    let bx = left + grid_w + 16;
    for yy in 0..grid_h {
        let t = 1.0 - yy as f32 / grid_h.max(1) as f32;
        c.rect(bx, top + yy, bar_w, 1, colormap(t));
    }
    c.frame(bx, top, bar_w, grid_h.max(1), black);
    c.text(bx + bar_w + 8, top, &format!("{max:.3}"), S, black);
    c.text(
        bx + bar_w + 8,
        top + grid_h.saturating_sub(GLYPH * S),
        "0",
        S,
        black,
    );
    c.text(
        16,
        top + grid_h + 16,
        "rows: layers   columns: segments   cell: mean attention mass",
        S,
        grey,
    );
    c
}

/// The default heatmap of a capture: mean over heads and over generated tokens.
pub fn capture_heatmap(cap: &AttentionCapture, what: &str) -> Canvas {
    let m = cap.layer_group(None, None);
    let title = format!(
        "{what}attention mass per layer and segment, mean over {} heads and {} tokens{}",
        cap.heads,
        cap.n_tokens(),
        if CAPTURE_IS_REAL { "" } else { " (SYNTHETIC)" }
    );
    heatmap(&title, &cap.groups, &m)
}

pub fn write_png(cap: &AttentionCapture, what: &str, path: &Path) -> Result<()> {
    capture_heatmap(cap, what).write_png(path)
}

/// The 8x8 glyph of `ch` (font8x8's public-domain basic Latin set: one byte per row, bit 0
/// = leftmost column); characters outside it are drawn as a box.
fn glyph(ch: char) -> [u8; 8] {
    const BOX: [u8; 8] = [0x7F, 0x41, 0x41, 0x41, 0x41, 0x41, 0x7F, 0];
    match u8::try_from(ch) {
        Ok(b) if b.is_ascii_graphic() || b == b' ' => font8x8::legacy::BASIC_LEGACY[b as usize],
        _ => BOX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap() -> AttentionCapture {
        let (layers, heads, t) = (3, 2, 2);
        let mut mass = Vec::new();
        for i in 0..t * layers * heads {
            let row = [0.1, 0.2 + (i % 3) as f32 * 0.1, 0.3, 0.0];
            let s: f32 = row.iter().sum();
            mass.extend(row.iter().map(|v| v / s));
        }
        AttentionCapture {
            layers,
            heads,
            groups: ["prefix", "doc 1", "question", "answer"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            tokens: vec![5, 6],
            mass,
        }
    }

    #[test]
    fn means_sum_to_one() {
        let c = cap();
        for row in c.layer_group(None, None) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        assert!((c.token_groups(1, Some(0)).iter().sum::<f32>() - 1.0).abs() < 1e-5);
        let v = capture_json(&c, &|id| format!("t{id}"));
        assert_eq!(v["mass_shape"], serde_json::json!([2, 3, 2, 4]));
        assert_eq!(v["tokens"][1]["text"], "t6");
    }

    #[test]
    fn text_stays_in_its_box_and_letters_differ() {
        let draw = |s: &str| {
            let mut c = Canvas::new(40, 20, [0; 3]);
            c.text(2, 3, s, 1, [255; 3]);
            c
        };
        let ink = |c: &Canvas| {
            let mut v = vec![];
            for y in 0..c.h {
                for x in 0..c.w {
                    if c.px[y * c.w + x] != [0; 3] {
                        v.push((x, y));
                    }
                }
            }
            v
        };
        for s in ["Ab", "0.5", "L12", "é"] {
            let p = ink(&draw(s));
            assert!(!p.is_empty(), "{s} draws nothing");
            let w = text_width(s, 1);
            assert!(p
                .iter()
                .all(|&(x, y)| (2..2 + w).contains(&x) && (3..3 + GLYPH).contains(&y)));
        }
        assert_eq!(ink(&draw(" ")), vec![]);
        assert_ne!(ink(&draw("a")), ink(&draw("A")));
        assert_ne!(ink(&draw("0")), ink(&draw("8")));
        // scale 2 doubles every pixel
        let mut c2 = Canvas::new(80, 40, [0; 3]);
        c2.text(0, 0, "K", 2, [255; 3]);
        let one = ink(&draw("K"));
        assert_eq!(ink(&c2).len(), 4 * one.len());
    }

    #[test]
    fn png_renders() {
        let c = capture_heatmap(&cap(), "");
        assert!(c.w > 100 && c.h > 50);
        let p = std::env::temp_dir().join(format!("kvlink-heatmap-{}.png", std::process::id()));
        c.write_png(&p).unwrap();
        assert!(std::fs::metadata(&p).unwrap().len() > 100);
        let _ = std::fs::remove_file(&p);
    }
}
