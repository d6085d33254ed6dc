//! GGUF (v2/v3) reader over a memory map, dequantization to f32, and [`GgufModel`], a
//! [`WeightSource`] that hands out tensors under HF names in HF layout.
//!
//! Every malformed input gives `Error::BadModel` naming the file; nothing here indexes the
//! file with an unchecked, file-derived offset, and no allocation is sized from an
//! untrusted count without first checking it against the bytes actually present.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::model::config::{Arch, ModelConfig, RopeScaling};
use crate::model::source::{names, HostTensor, WeightSource};
use crate::model::tokenizer::{GgufTokenizerMeta, Tokenizer};

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Nesting limit for arrays of arrays in metadata.
const MAX_ARRAY_DEPTH: usize = 4;
/// Dimension limit for a tensor (ggml has 4).
const MAX_DIMS: u32 = 8;
/// Array elements, summed over all metadata, that a file may hold. Each element costs
/// a 32-byte [`MetaValue`] in memory however small it is in the file, so the bytes
/// present do not bound memory well enough alone; real files hold well under a million
/// (token list, merges, scores, token types), 2^24 bounds the parse to ~512 MiB.
pub const MAX_META_ARRAY_ELEMENTS: u64 = 1 << 24;

// ---------------------------------------------------------------------------------------
// ggml tensor types
// ---------------------------------------------------------------------------------------

/// ggml tensor element types (ids as in ggml.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    IQ2XXS,
    IQ2XS,
    IQ3XXS,
    IQ1S,
    IQ4NL,
    IQ3S,
    IQ2S,
    IQ4XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            16 => IQ2XXS,
            17 => IQ2XS,
            18 => IQ3XXS,
            19 => IQ1S,
            20 => IQ4NL,
            21 => IQ3S,
            22 => IQ2S,
            23 => IQ4XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Q8K => 15,
            IQ2XXS => 16,
            IQ2XS => 17,
            IQ3XXS => 18,
            IQ1S => 19,
            IQ4NL => 20,
            IQ3S => 21,
            IQ2S => 22,
            IQ4XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
        }
    }

    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            IQ2XXS => "IQ2_XXS",
            IQ2XS => "IQ2_XS",
            IQ3XXS => "IQ3_XXS",
            IQ1S => "IQ1_S",
            IQ4NL => "IQ4_NL",
            IQ3S => "IQ3_S",
            IQ2S => "IQ2_S",
            IQ4XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
        }
    }

    /// (elements per block, bytes per block), as in ggml's type traits.
    pub fn block_layout(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 => (1, 4),
            F16 => (1, 2),
            BF16 => (1, 2),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2K => (256, 84),
            Q3K => (256, 110),
            Q4K => (256, 144),
            Q5K => (256, 176),
            Q6K => (256, 210),
            Q8K => (256, 292),
            IQ2XXS => (256, 66),
            IQ2XS => (256, 74),
            IQ3XXS => (256, 98),
            IQ1S => (256, 50),
            IQ4NL => (32, 18),
            IQ3S => (256, 110),
            IQ2S => (256, 82),
            IQ4XS => (256, 136),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 => (1, 8),
            F64 => (1, 8),
            IQ1M => (256, 56),
            TQ1_0 => (256, 54),
            TQ2_0 => (256, 66),
            MXFP4 => (32, 17),
        }
    }

    /// Whether [`dequantize`] handles this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16
                | BF16
                | Q4_0
                | Q4_1
                | Q5_0
                | Q5_1
                | Q8_0
                | Q4K
                | Q5K
                | Q6K
                | F64
                | I8
                | I16
                | I32
        )
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------------------
// dequantization
// ---------------------------------------------------------------------------------------

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

#[inline]
fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Dequantize `n` elements of type `ty` stored in `bytes` (exactly `n / block * bytes_per_block`
/// bytes) to f32. Errors (as `Error::Unsupported` / `Error::Input`) on unsupported types or
/// inconsistent sizes; never panics.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let (bs, bb) = ty.block_layout();
    if !n.is_multiple_of(bs) {
        return Err(Error::Input(format!(
            "{n} elements is not a multiple of the {ty} block size {bs}"
        )));
    }
    let nblocks = n / bs;
    let need = nblocks
        .checked_mul(bb)
        .ok_or_else(|| Error::Input("tensor size overflows".into()))?;
    if bytes.len() != need {
        return Err(Error::Input(format!(
            "{ty} data for {n} elements must be {need} bytes, got {}",
            bytes.len()
        )));
    }
    if !ty.can_dequantize() {
        return Err(Error::Unsupported(format!(
            "ggml type {ty} cannot be dequantized"
        )));
    }
    let mut out = Vec::with_capacity(n);
    use GgmlType::*;
    match ty {
        F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        F64 => {
            out.extend(bytes.chunks_exact(8).map(|c| {
                f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
            }))
        }
        F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        I8 => out.extend(bytes.iter().map(|&b| b as i8 as f32)),
        I16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as f32),
        ),
        I32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32),
        ),
        Q4_0 => {
            for b in bytes.chunks_exact(bb) {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                let mut y = [0f32; 32];
                for j in 0..16 {
                    y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
                    y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
                out.extend_from_slice(&y);
            }
        }
        Q4_1 => {
            for b in bytes.chunks_exact(bb) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qs = &b[4..20];
                let mut y = [0f32; 32];
                for j in 0..16 {
                    y[j] = (qs[j] & 0xF) as f32 * d + m;
                    y[j + 16] = (qs[j] >> 4) as f32 * d + m;
                }
                out.extend_from_slice(&y);
            }
        }
        Q5_0 => {
            for b in bytes.chunks_exact(bb) {
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let qs = &b[6..22];
                let mut y = [0f32; 32];
                for j in 0..16 {
                    let xh0 = (((qh >> j) << 4) & 0x10) as u8;
                    let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
                    y[j] = (((qs[j] & 0xF) | xh0) as i32 - 16) as f32 * d;
                    y[j + 16] = (((qs[j] >> 4) | xh1) as i32 - 16) as f32 * d;
                }
                out.extend_from_slice(&y);
            }
        }
        Q5_1 => {
            for b in bytes.chunks_exact(bb) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                let qs = &b[8..24];
                let mut y = [0f32; 32];
                for j in 0..16 {
                    let xh0 = (((qh >> j) << 4) & 0x10) as u8;
                    let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
                    y[j] = ((qs[j] & 0xF) | xh0) as f32 * d + m;
                    y[j + 16] = ((qs[j] >> 4) | xh1) as f32 * d + m;
                }
                out.extend_from_slice(&y);
            }
        }
        Q8_0 => {
            for b in bytes.chunks_exact(bb) {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        Q4K => {
            for b in bytes.chunks_exact(bb) {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales = &b[4..16];
                let qs = &b[16..144];
                let mut is = 0;
                for q in qs.chunks_exact(32) {
                    let (sc, m) = get_scale_min_k4(is, scales);
                    let (d1, m1) = (d * sc as f32, dmin * m as f32);
                    let (sc, m) = get_scale_min_k4(is + 1, scales);
                    let (d2, m2) = (d * sc as f32, dmin * m as f32);
                    out.extend(q.iter().map(|&x| d1 * (x & 0xF) as f32 - m1));
                    out.extend(q.iter().map(|&x| d2 * (x >> 4) as f32 - m2));
                    is += 2;
                }
            }
        }
        Q5K => {
            for b in bytes.chunks_exact(bb) {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales = &b[4..16];
                let qh = &b[16..48];
                let ql = &b[48..176];
                let mut is = 0;
                let (mut u1, mut u2) = (1u8, 2u8);
                for q in ql.chunks_exact(32) {
                    let (sc, m) = get_scale_min_k4(is, scales);
                    let (d1, m1) = (d * sc as f32, dmin * m as f32);
                    let (sc, m) = get_scale_min_k4(is + 1, scales);
                    let (d2, m2) = (d * sc as f32, dmin * m as f32);
                    for l in 0..32 {
                        let h = if qh[l] & u1 != 0 { 16 } else { 0 };
                        out.push(d1 * ((q[l] & 0xF) + h) as f32 - m1);
                    }
                    for l in 0..32 {
                        let h = if qh[l] & u2 != 0 { 16 } else { 0 };
                        out.push(d2 * ((q[l] >> 4) + h) as f32 - m2);
                    }
                    is += 2;
                    u1 = u1.wrapping_shl(2);
                    u2 = u2.wrapping_shl(2);
                }
            }
        }
        Q6K => {
            for b in bytes.chunks_exact(bb) {
                let ql_all = &b[0..128];
                let qh_all = &b[128..192];
                let sc_all = &b[192..208];
                let d = f16_at(b, 208);
                for half in 0..2 {
                    let ql = &ql_all[half * 64..half * 64 + 64];
                    let qh = &qh_all[half * 32..half * 32 + 32];
                    let sc = &sc_all[half * 8..half * 8 + 8];
                    let mut y = [0f32; 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                    out.extend_from_slice(&y);
                }
            }
        }
        _ => unreachable!("checked by can_dequantize"),
    }
    debug_assert_eq!(out.len(), n);
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Q/K row permutation (llama.cpp's converter, arch "llama")
// ---------------------------------------------------------------------------------------

/// The permutation llama.cpp's `convert_hf_to_gguf.py` applies to Q/K rows (HF -> GGUF):
/// rows reshaped `(n_head, 2, head_dim/2)`, inner axes swapped to `(n_head, head_dim/2, 2)`.
/// `data` is row-major `[rows, cols]` (a bias is `cols == 1`). Panics if the sizes are
/// inconsistent (callers check).
pub fn permute_qk_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let hf = h * hd + j * half + i;
                let gg = h * hd + i * 2 + j;
                out[gg * cols..(gg + 1) * cols].copy_from_slice(&data[hf * cols..(hf + 1) * cols]);
            }
        }
    }
    out
}

/// Inverse of [`permute_qk_rows`]: GGUF row order -> HF row order.
pub fn unpermute_qk_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let hf = h * hd + j * half + i;
                let gg = h * hd + i * 2 + j;
                out[hf * cols..(hf + 1) * cols].copy_from_slice(&data[gg * cols..(gg + 1) * cols]);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// metadata
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        use MetaValue::*;
        match *self {
            U8(v) => Some(v as u64),
            U16(v) => Some(v as u64),
            U32(v) => Some(v as u64),
            U64(v) => Some(v),
            I8(v) if v >= 0 => Some(v as u64),
            I16(v) if v >= 0 => Some(v as u64),
            I32(v) if v >= 0 => Some(v as u64),
            I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        use MetaValue::*;
        match *self {
            U8(v) => Some(v as i64),
            U16(v) => Some(v as i64),
            U32(v) => Some(v as i64),
            U64(v) => i64::try_from(v).ok(),
            I8(v) => Some(v as i64),
            I16(v) => Some(v as i64),
            I32(v) => Some(v as i64),
            I64(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => self.as_u64().map(|v| v != 0),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
    /// Short description for debugging (arrays summarized).
    pub fn summary(&self) -> String {
        match self {
            MetaValue::Str(s) if s.len() > 60 => format!(
                "{:?}... ({} bytes)",
                &s[..s.floor_char_boundary_compat(60)],
                s.len()
            ),
            MetaValue::Array(a) => format!("[array of {}]", a.len()),
            v => format!("{v:?}"),
        }
    }
}

trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}
impl FloorCharBoundary for str {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        if i >= self.len() {
            return self.len();
        }
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

/// One tensor's header entry.
#[derive(Clone, Debug)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset relative to the start of the data section.
    pub offset: u64,
    /// Absolute byte range in the file (checked to lie inside it).
    pub start: usize,
    pub nbytes: usize,
    pub n_elements: usize,
}

impl GgufTensorInfo {
    /// HF/row-major shape (ggml dims reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// Byte cursor over the file with bounds-checked reads.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Metadata array elements still allowed (see [`MAX_META_ARRAY_ELEMENTS`]).
    array_budget: u64,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::bad_model(self.path, msg)
    }
    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(format!(
                "truncated file: reading {what} at byte {} needs {n} bytes, only {} left (file is {} bytes)",
                self.pos,
                self.remaining(),
                self.data.len()
            ))),
        }
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(self.err(format!(
                "truncated or corrupt file: {what} at byte {} claims length {len}, only {} bytes left",
                self.pos,
                self.remaining()
            )));
        }
        let bytes = self.take(len as usize, what)?;
        // Token strings are sometimes not valid UTF-8 (partial byte pieces); keep them lossy.
        Ok(match std::str::from_utf8(bytes) {
            Ok(s) => s.to_owned(),
            Err(_) => String::from_utf8_lossy(bytes).into_owned(),
        })
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.arr::<1>(key)?[0]),
            1 => MetaValue::I8(self.arr::<1>(key)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.arr(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.arr(key)?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.arr(key)?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.arr(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.arr(key)?)),
            7 => {
                let b = self.arr::<1>(key)?[0];
                if b > 1 {
                    return Err(self.err(format!("metadata {key:?}: bool value {b} is not 0 or 1")));
                }
                MetaValue::Bool(b == 1)
            }
            8 => MetaValue::Str(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!("metadata {key:?}: arrays nested too deeply")));
                }
                let ety = self.u32(key)?;
                let n = self.u64(key)?;
                let min_size: u64 = match ety {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10 | 11 | 12 | 8 => 8,
                    9 => 12,
                    _ => {
                        return Err(self.err(format!(
                            "metadata {key:?}: unknown array element type {ety}"
                        )))
                    }
                };
                if n.checked_mul(min_size)
                    .is_none_or(|b| b > self.remaining() as u64)
                {
                    return Err(self.err(format!(
                        "truncated or corrupt file: metadata {key:?} claims {n} array elements, only {} bytes left",
                        self.remaining()
                    )));
                }
                if n > self.array_budget {
                    return Err(self.err(format!(
                        "metadata {key:?} claims {n} array elements: more than the {} \
                         this reader accepts in one file (corrupt file?)",
                        MAX_META_ARRAY_ELEMENTS
                    )));
                }
                self.array_budget -= n;
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ety, key, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(u64::from_le_bytes(self.arr(key)?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.arr(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.arr(key)?)),
            t => return Err(self.err(format!("metadata {key:?}: unknown value type {t}"))),
        })
    }
}

/// A GGUF file's bytes: memory-mapped from disk, or owned (the browser build, where
/// they come from a fetch or a file picker).
enum FileBytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: header, metadata, tensor table, and the memory map.
pub struct GgufFile {
    path: PathBuf,
    mmap: FileBytes,
    pub version: u32,
    pub alignment: u64,
    /// Absolute offset of the tensor data section.
    pub data_offset: usize,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only; as with every mmap-based loader, the file must not be
        // truncated by another process while it is mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        Self::parse(path, FileBytes::Mapped(mmap))
    }

    /// Parse a GGUF file held in memory; `name` stands in for its path in messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<GgufFile> {
        Self::parse(name.into(), FileBytes::Owned(bytes))
    }

    fn parse(path: PathBuf, mmap: FileBytes) -> Result<GgufFile> {
        let (version, alignment, data_offset, metadata, tensors) = {
            let mut c = Cursor {
                data: &mmap[..],
                pos: 0,
                path: &path,
                array_budget: MAX_META_ARRAY_ELEMENTS,
            };
            if c.data.len() < 4 {
                return Err(c.err(format!("not a GGUF file: only {} bytes long", c.data.len())));
            }
            let magic = c.arr::<4>("magic")?;
            if magic != GGUF_MAGIC {
                return Err(c.err(format!(
                    "not a GGUF file: bad magic {:?} (expected \"GGUF\")",
                    String::from_utf8_lossy(&magic)
                )));
            }
            let version = c.u32("version")?;
            if version != 2 && version != 3 {
                return Err(c.err(format!(
                    "unsupported GGUF version {version} (supported: 2, 3)"
                )));
            }
            let n_tensors = c.u64("tensor count")?;
            let n_kv = c.u64("metadata count")?;
            // Each metadata entry takes at least 8 (key len) + 4 (type) + 1 bytes, each tensor
            // info at least 8 + 4 + 4 + 8 bytes.
            if n_kv
                .checked_mul(13)
                .is_none_or(|b| b > c.remaining() as u64)
            {
                return Err(c.err(format!(
                    "corrupt or truncated header: {n_kv} metadata entries cannot fit in {} bytes",
                    c.remaining()
                )));
            }
            if n_tensors
                .checked_mul(24)
                .is_none_or(|b| b > c.remaining() as u64)
            {
                return Err(c.err(format!(
                    "corrupt or truncated header: {n_tensors} tensor infos cannot fit in {} bytes",
                    c.remaining()
                )));
            }
            let mut metadata = Vec::with_capacity(n_kv as usize);
            for i in 0..n_kv {
                let key = c.string(&format!("metadata key #{i}"))?;
                let ty = c.u32(&key)?;
                let v = c.value(ty, &key, 0)?;
                metadata.push((key, v));
            }
            let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
                None => DEFAULT_ALIGNMENT,
                Some((_, v)) => match v.as_u64() {
                    Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                    _ => {
                        return Err(c.err(format!(
                            "general.alignment {} is not a power of two",
                            v.summary()
                        )))
                    }
                },
            };
            let mut raw = Vec::with_capacity(n_tensors as usize);
            for i in 0..n_tensors {
                let name = c.string(&format!("tensor #{i} name"))?;
                let nd = c.u32(&name)?;
                if nd == 0 || nd > MAX_DIMS {
                    return Err(c.err(format!("tensor {name:?}: bad number of dimensions {nd}")));
                }
                let mut dims = Vec::with_capacity(nd as usize);
                for _ in 0..nd {
                    dims.push(c.u64(&name)?);
                }
                let tid = c.u32(&name)?;
                let ty = GgmlType::from_id(tid)
                    .ok_or_else(|| c.err(format!("tensor {name:?}: unknown ggml type id {tid}")))?;
                let offset = c.u64(&name)?;
                raw.push((name, dims, ty, offset));
            }
            let end_of_header = c.pos as u64;
            let data_offset = end_of_header.div_ceil(alignment) * alignment;
            let file_len = c.data.len() as u64;
            if data_offset > file_len && !raw.is_empty() {
                return Err(c.err(format!(
                    "truncated file: tensor data section would start at byte {data_offset}, file is {file_len} bytes"
                )));
            }
            let mut tensors = Vec::with_capacity(raw.len());
            for (name, dims, ty, offset) in raw {
                let mut n: u64 = 1;
                for &d in &dims {
                    n = n.checked_mul(d).ok_or_else(|| {
                        c.err(format!("tensor {name:?}: dimensions {dims:?} overflow"))
                    })?;
                }
                let (bs, bb) = ty.block_layout();
                if dims[0] % bs as u64 != 0 {
                    return Err(c.err(format!(
                        "tensor {name:?}: first dimension {} is not a multiple of the {ty} block size {bs}",
                        dims[0]
                    )));
                }
                let nbytes = (n / bs as u64)
                    .checked_mul(bb as u64)
                    .ok_or_else(|| c.err(format!("tensor {name:?}: size overflows")))?;
                if offset % alignment != 0 {
                    return Err(c.err(format!(
                        "tensor {name:?}: offset {offset} is not a multiple of the alignment {alignment}"
                    )));
                }
                let start = data_offset.checked_add(offset);
                let end = start.and_then(|s| s.checked_add(nbytes));
                match (start, end) {
                    (Some(s), Some(e)) if e <= file_len => tensors.push(GgufTensorInfo {
                        name,
                        dims,
                        ty,
                        offset,
                        start: s as usize,
                        nbytes: nbytes as usize,
                        n_elements: n as usize,
                    }),
                    _ => {
                        return Err(c.err(format!(
                            "truncated or corrupt file: tensor {name:?} ({ty}, {nbytes} bytes at data offset {offset}) extends past the end of the file ({file_len} bytes)"
                        )))
                    }
                }
            }
            (version, alignment, data_offset as usize, metadata, tensors)
        };
        let mut meta_index = HashMap::with_capacity(metadata.len());
        for (i, (k, _)) in metadata.iter().enumerate() {
            if meta_index.insert(k.clone(), i).is_some() {
                return Err(Error::bad_model(
                    &path,
                    format!("duplicate metadata key {k:?}"),
                ));
            }
        }
        let mut tensor_index = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if tensor_index.insert(t.name.clone(), i).is_some() {
                return Err(Error::bad_model(
                    &path,
                    format!("duplicate tensor {:?}", t.name),
                ));
            }
        }
        Ok(GgufFile {
            path,
            mmap,
            version,
            alignment,
            data_offset,
            metadata,
            meta_index,
            tensors,
            tensor_index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn file_len(&self) -> usize {
        self.mmap.len()
    }
    /// All metadata, in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| v.as_str())
    }
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.as_u64())
    }
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(|v| v.as_f64())
    }
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(|v| v.as_bool())
    }
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }
    pub fn tensor(&self, gguf_name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(gguf_name).map(|&i| &self.tensors[i])
    }
    /// Raw bytes of a tensor (bounds were checked at open).
    pub fn tensor_bytes(&self, t: &GgufTensorInfo) -> &[u8] {
        self.mmap.get(t.start..t.start + t.nbytes).unwrap_or(&[])
    }
    /// The whole file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap[..]
    }
    /// Dequantize a tensor (by GGUF name) to f32, in ggml element order.
    pub fn dequantize(&self, gguf_name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(gguf_name).ok_or_else(|| {
            Error::bad_model(&self.path, format!("no tensor named {gguf_name:?}"))
        })?;
        self.dequantize_info(t)
    }
    fn dequantize_info(&self, t: &GgufTensorInfo) -> Result<Vec<f32>> {
        if !t.ty.can_dequantize() {
            return Err(Error::Unsupported(format!(
                "tensor {:?} in {} has ggml type {}, which this engine cannot dequantize (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)",
                t.name,
                self.path.display(),
                t.ty
            )));
        }
        dequantize(t.ty, self.tensor_bytes(t), t.n_elements)
            .map_err(|e| Error::bad_model(&self.path, format!("tensor {:?}: {e}", t.name)))
    }
}

// ---------------------------------------------------------------------------------------
// name mapping
// ---------------------------------------------------------------------------------------

/// GGUF tensor name -> canonical HF name, for the tensors this engine uses.
pub fn gguf_to_hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some(names::EMBED.into()),
        "output_norm.weight" => return Some(names::FINAL_NORM.into()),
        "output.weight" => return Some(names::LM_HEAD.into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (idx, rest) = rest.split_once('.')?;
    let i: usize = idx.parse().ok()?;
    let (base, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf = match base {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(names::layer(i, &format!("{hf}.{suffix}")))
}

// ---------------------------------------------------------------------------------------
// the model
// ---------------------------------------------------------------------------------------

/// A GGUF model file as a [`WeightSource`].
pub struct GgufModel {
    file: GgufFile,
    config: ModelConfig,
    /// canonical HF name -> index into `file.tensors`
    canonical: HashMap<String, usize>,
    /// Q/K rows are in llama.cpp's interleaved order and must be unpermuted.
    permuted_qk: bool,
    fingerprint: String,
}

impl std::fmt::Debug for GgufModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufModel")
            .field("file", &self.file)
            .field("config", &self.config)
            .finish()
    }
}

impl GgufModel {
    pub fn open(path: impl AsRef<Path>) -> Result<GgufModel> {
        let file = GgufFile::open(path)?;
        Self::from_file(file)
    }

    pub fn from_file(file: GgufFile) -> Result<GgufModel> {
        let path = file.path.clone();
        let bad = |msg: String| Error::bad_model(&path, msg);
        let arch_name = file
            .get_str("general.architecture")
            .ok_or_else(|| bad("missing metadata general.architecture".into()))?
            .to_string();
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: architecture {other:?} (supported: llama, qwen2)",
                    path.display()
                )))
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let req_usize = |k: &str| -> Result<usize> {
            let full = key(k);
            match file.get(&full) {
                None => Err(bad(format!("missing metadata {full}"))),
                Some(v) => v
                    .as_u64()
                    .filter(|&x| x <= (1u64 << 32))
                    .map(|x| x as usize)
                    .ok_or_else(|| {
                        bad(format!(
                            "metadata {full} = {} is not a valid count",
                            v.summary()
                        ))
                    }),
            }
        };
        let opt_usize = |k: &str| -> Result<Option<usize>> {
            match file.get(&key(k)) {
                None => Ok(None),
                Some(_) => req_usize(k).map(Some),
            }
        };
        let opt_f32 = |k: &str| -> Result<Option<f32>> {
            let full = key(k);
            match file.get(&full) {
                None => Ok(None),
                Some(v) => v.as_f64().map(|x| Some(x as f32)).ok_or_else(|| {
                    bad(format!("metadata {full} = {} is not a number", v.summary()))
                }),
            }
        };

        let hidden = req_usize("embedding_length")?;
        let layers = req_usize("block_count")?;
        let ffn = req_usize("feed_forward_length")?;
        let heads = req_usize("attention.head_count")?;
        let kv_heads = opt_usize("attention.head_count_kv")?.unwrap_or(heads);
        let eps = opt_f32("attention.layer_norm_rms_epsilon")?.ok_or_else(|| {
            bad(format!(
                "missing metadata {}",
                key("attention.layer_norm_rms_epsilon")
            ))
        })?;
        let theta = opt_f32("rope.freq_base")?.unwrap_or(10000.0);
        let ctx = opt_usize("context_length")?.unwrap_or(2048);
        let head_dim = match (
            opt_usize("attention.key_length")?,
            opt_usize("rope.dimension_count")?,
        ) {
            (Some(k), _) => k,
            (None, Some(r)) => r,
            (None, None) => hidden.checked_div(heads).unwrap_or(0),
        };
        // vocab size: token list, else embedding/output tensor shape.
        let vocab_from_tokens = file
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map(|a| a.len());
        let embd = file.tensor("token_embd.weight");
        let vocab_from_tensor = file
            .tensor("output.weight")
            .or(embd)
            .and_then(|t| t.dims.get(1).copied())
            .map(|d| d as usize);
        let vocab_size = match (vocab_from_tensor, vocab_from_tokens) {
            (Some(v), _) => v,
            (None, Some(v)) => v,
            (None, None) => {
                return Err(bad(
                    "cannot determine vocab size: no token list and no token_embd.weight".into(),
                ))
            }
        };
        let rope_scaling = match file.get_str(&key("rope.scaling.type")) {
            Some("llama3") => Some(RopeScaling {
                factor: opt_f32("rope.scaling.factor")?.unwrap_or(8.0),
                low_freq_factor: opt_f32("rope.scaling.low_freq_factor")?.unwrap_or(1.0),
                high_freq_factor: opt_f32("rope.scaling.high_freq_factor")?.unwrap_or(4.0),
                original_max_position_embeddings: opt_usize(
                    "rope.scaling.original_context_length",
                )?
                .unwrap_or(8192),
            }),
            Some("none") | None => None,
            Some(other) => {
                return Err(Error::Unsupported(format!(
                    "{}: rope scaling type {other:?} (supported: llama3)",
                    path.display()
                )))
            }
        };
        let config = ModelConfig {
            arch,
            vocab_size,
            hidden_size: hidden,
            intermediate_size: ffn,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: eps,
            rope_theta: theta,
            rope_scaling,
            max_position_embeddings: ctx,
            tie_word_embeddings: file.tensor("output.weight").is_none(),
            attention_bias: file.tensor("blk.0.attn_q.bias").is_some(),
            extra_vocab: 0,
        };
        config
            .validate()
            .map_err(|m| bad(format!("inconsistent model config from GGUF metadata: {m}")))?;

        let mut canonical = HashMap::new();
        for (i, t) in file.tensors.iter().enumerate() {
            if let Some(hf) = gguf_to_hf_name(&t.name) {
                canonical.insert(hf, i);
            }
        }
        if embd.is_none() {
            return Err(bad("missing tensor token_embd.weight".into()));
        }

        // Fingerprint: every byte of the file (metadata, tensor table, all weights).
        // A mapped file's hash is remembered by path, size and mtime; bytes held in
        // memory (no file behind the name) are always hashed.
        let bytes = file.bytes();
        let h = match &file.mmap {
            FileBytes::Mapped(_) => super::fingerprint::file_hash(&path, bytes),
            FileBytes::Owned(_) => xxhash_rust::xxh3::xxh3_128(bytes),
        };
        let fingerprint = format!("{h:032x}");

        Ok(GgufModel {
            permuted_qk: arch == Arch::Llama,
            file,
            config,
            canonical,
            fingerprint,
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }
    pub fn path(&self) -> &Path {
        &self.file.path
    }
}

impl WeightSource for GgufModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn describe(&self) -> String {
        format!("{} (GGUF v{})", self.file.path.display(), self.file.version)
    }

    fn dtype(&self) -> String {
        // Dominant type by bytes over the 2-D weights.
        let mut by: HashMap<GgmlType, usize> = HashMap::new();
        for t in &self.file.tensors {
            if t.dims.len() >= 2 {
                *by.entry(t.ty).or_default() += t.nbytes;
            }
        }
        by.into_iter()
            .max_by_key(|&(ty, n)| (n, std::cmp::Reverse(ty.id())))
            .map(|(ty, _)| ty.name().to_string())
            .unwrap_or_else(|| "unknown".into())
    }

    fn has(&self, name: &str) -> bool {
        self.canonical.contains_key(name)
    }

    fn load(&self, name: &str) -> Result<HostTensor> {
        let &idx = self.canonical.get(name).ok_or_else(|| {
            Error::bad_model(&self.file.path, format!("no tensor {name:?} in this GGUF"))
        })?;
        let t = &self.file.tensors[idx];
        let mut data = self.file.dequantize_info(t)?;
        let shape = t.shape();
        if self.permuted_qk {
            let is_q = name.ends_with(".self_attn.q_proj.weight")
                || name.ends_with(".self_attn.q_proj.bias");
            let is_k = name.ends_with(".self_attn.k_proj.weight")
                || name.ends_with(".self_attn.k_proj.bias");
            if is_q || is_k {
                let n_head = if is_q {
                    self.config.num_attention_heads
                } else {
                    self.config.num_key_value_heads
                };
                let rows = shape[0];
                let cols: usize = shape[1..].iter().product();
                if !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
                    return Err(Error::bad_model(
                        &self.file.path,
                        format!("tensor {:?}: {rows} rows do not split into {n_head} heads of even size", t.name),
                    ));
                }
                data = unpermute_qk_rows(&data, rows, cols, n_head);
            }
        }
        Ok(HostTensor { shape, data })
    }

    fn tokenizer(&self) -> Result<Tokenizer> {
        let meta = GgufTokenizerMeta::from_gguf(&self.file)?;
        Tokenizer::from_gguf_meta(&meta)
    }

    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }
}

// ---------------------------------------------------------------------------------------
// tokenizer metadata
// ---------------------------------------------------------------------------------------

impl GgufTokenizerMeta {
    /// Collect the `tokenizer.ggml.*` / `tokenizer.chat_template` metadata of a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<GgufTokenizerMeta> {
        let path = file.path();
        let bad = |msg: String| Error::bad_model(path, msg);
        let model = file
            .get_str("tokenizer.ggml.model")
            .ok_or_else(|| {
                bad("missing metadata tokenizer.ggml.model (no tokenizer in this GGUF)".into())
            })?
            .to_string();
        let str_array = |key: &str| -> Result<Option<Vec<String>>> {
            match file.get(key) {
                None => Ok(None),
                Some(v) => {
                    let a = v
                        .as_array()
                        .ok_or_else(|| bad(format!("metadata {key} is not an array")))?;
                    a.iter()
                        .map(|x| {
                            x.as_str().map(str::to_owned).ok_or_else(|| {
                                bad(format!("metadata {key} is not an array of strings"))
                            })
                        })
                        .collect::<Result<Vec<_>>>()
                        .map(Some)
                }
            }
        };
        let tokens = str_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| bad("missing metadata tokenizer.ggml.tokens".into()))?;
        let merges = str_array("tokenizer.ggml.merges")?.unwrap_or_default();
        let token_types = match file.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .ok_or_else(|| bad("metadata tokenizer.ggml.token_type is not an array".into()))?
                .iter()
                .map(|x| x.as_i64().map(|t| t as i32).unwrap_or(1))
                .collect(),
        };
        let scores = match file.get("tokenizer.ggml.scores") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .ok_or_else(|| bad("metadata tokenizer.ggml.scores is not an array".into()))?
                .iter()
                .map(|x| x.as_f64().unwrap_or(0.0) as f32)
                .collect(),
        };
        let id = |key: &str| -> Option<u32> {
            file.get_u64(key)
                .filter(|&v| (v as usize) < tokens.len())
                .map(|v| v as u32)
        };
        Ok(GgufTokenizerMeta {
            source: path.to_path_buf(),
            model,
            pre: file.get_str("tokenizer.ggml.pre").map(str::to_owned),
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_id: id("tokenizer.ggml.eos_token_id"),
            eot_id: id("tokenizer.ggml.eot_token_id"),
            pad_id: id("tokenizer.ggml.padding_token_id"),
            unk_id: id("tokenizer.ggml.unknown_token_id"),
            add_bos: file.get_bool("tokenizer.ggml.add_bos_token"),
            add_space_prefix: file.get_bool("tokenizer.ggml.add_space_prefix"),
            chat_template: file.get_str("tokenizer.chat_template").map(str::to_owned),
            tokens,
            merges,
            token_types,
            scores,
        })
    }
}
