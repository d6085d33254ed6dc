//! The compact cache format: 8-bit K/V with one f16 scale per block of [`Q8_BLOCK`]
//! values (symmetric, absmax / 127), about 53% of the f16 bytes. Used by the disk store
//! (and the shared tier, which holds its entry bytes) when asked for
//! ([`KvFormat::Q8`]); [`dequantize`] turns a part back into f16 (on a disk hit, in the
//! reading thread as the part arrives, before the GPU upload).
//!
//! One part (the K or the V of one layer, `n` values, `n` a multiple of [`Q8_BLOCK`]):
//! ```text
//! n signed bytes (the quantized values, in order) | n / Q8_BLOCK f16 scales (LE) | 0-2 zero bytes to a whole word
//! ```
//! Value `i` is `q[i] * scale[i / Q8_BLOCK]`, `scale` = the block's absmax / 127
//! rounded to f16. Quantizing rounds `x / scale` to nearest (ties to even; the division
//! as a multiplication by the inverse), so each value is off by at most half a step:
//! `scale / 2`, i.e. `absmax / 254` of its block (plus the f16 roundings of the scale
//! and of the product).

use crate::{Error, Result};
use half::f16;
use half::slice::HalfFloatSliceExt;
use std::fmt;
use std::str::FromStr;

/// Values per scale.
pub const Q8_BLOCK: usize = 32;

/// How document caches are stored: f16 as computed, or the 8-bit format of this module.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvFormat {
    #[default]
    F16,
    Q8,
}

impl KvFormat {
    /// The entry header's `dtype`.
    pub fn dtype(self) -> &'static str {
        match self {
            KvFormat::F16 => "f16",
            KvFormat::Q8 => "q8",
        }
    }

    /// The format of an entry header's `dtype`, if known.
    pub fn from_dtype(dtype: &str) -> Option<KvFormat> {
        match dtype {
            "f16" => Some(KvFormat::F16),
            "q8" => Some(KvFormat::Q8),
            _ => None,
        }
    }

    /// Bytes of one stored part of `n` values.
    pub fn part_bytes(self, n: usize) -> usize {
        match self {
            KvFormat::F16 => n * 2,
            KvFormat::Q8 => n + (n / Q8_BLOCK * 2).next_multiple_of(4),
        }
    }

    /// Whether parts of `kv_dim`-wide rows can be stored this way (q8: whole blocks).
    pub fn fits(self, kv_dim: usize) -> bool {
        match self {
            KvFormat::F16 => true,
            KvFormat::Q8 => kv_dim.is_multiple_of(Q8_BLOCK),
        }
    }
}

impl fmt::Display for KvFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.dtype())
    }
}

impl FromStr for KvFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<KvFormat> {
        KvFormat::from_dtype(s).ok_or_else(|| {
            Error::Input(format!(
                "unknown cache format {s:?}: f16 (as computed) or q8 (8-bit, half the bytes)"
            ))
        })
    }
}

/// Quantize one part: `f16_bytes` (little-endian f16, a multiple of [`Q8_BLOCK`]
/// values) into `out` (cleared first), laid out as the module docs say. Fails on a value
/// that is not finite (a cache holding one is broken; better not to store it).
pub fn quantize(f16_bytes: &[u8], out: &mut Vec<u8>) -> Result<()> {
    let n = f16_bytes.len() / 2;
    if !f16_bytes.len().is_multiple_of(2) || !n.is_multiple_of(Q8_BLOCK) {
        return Err(Error::Input(format!(
            "q8: {} bytes are not whole blocks of {Q8_BLOCK} f16 values",
            f16_bytes.len()
        )));
    }
    out.clear();
    out.resize(KvFormat::Q8.part_bytes(n), 0);
    let (q, scales) = out.split_at_mut(n);
    // A few blocks at a time, each step over whole arrays (so that it vectorizes; the
    // f16 conversions use the hardware's where there is one).
    const CHUNK: usize = 64 * Q8_BLOCK;
    const BLOCKS: usize = CHUNK / Q8_BLOCK;
    let mut h = [f16::ZERO; CHUNK];
    let mut x = [0f32; CHUNK];
    let mut sf = [0f32; BLOCKS];
    let mut sh = [f16::ZERO; BLOCKS];
    for (c, (src, dst)) in f16_bytes
        .chunks(2 * CHUNK)
        .zip(q.chunks_mut(CHUNK))
        .enumerate()
    {
        let (m, nb) = (src.len() / 2, src.len() / 2 / Q8_BLOCK);
        let h = &mut h[..m];
        let mut special = false;
        for (hv, b) in h.iter_mut().zip(src.chunks_exact(2)) {
            let bits = u16::from_le_bytes([b[0], b[1]]);
            special |= bits & 0x7c00 == 0x7c00;
            *hv = f16::from_bits(bits);
        }
        if special {
            return Err(Error::Input(format!(
                "q8: values {}..{} hold one that is not finite",
                c * CHUNK,
                c * CHUNK + m
            )));
        }
        let x = &mut x[..m];
        h.convert_to_f32_slice(x);
        // Scales: absmax / 127, rounded to f16 (as stored; quantizing divides by that).
        for (s, xb) in sf.iter_mut().zip(x.chunks_exact(Q8_BLOCK)) {
            *s = xb
                .iter()
                .fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m })
                / 127.0;
        }
        sh[..nb].convert_from_f32_slice(&sf[..nb]);
        sh[..nb].convert_to_f32_slice(&mut sf[..nb]);
        for (j, (xb, qb)) in x
            .chunks_exact(Q8_BLOCK)
            .zip(dst.chunks_exact_mut(Q8_BLOCK))
            .enumerate()
        {
            let inv = if sf[j] > 0.0 { 1.0 / sf[j] } else { 0.0 };
            for (d, &v) in qb.iter_mut().zip(xb) {
                // Round to nearest (ties to even) by the 1.5 * 2^23 trick: the integer
                // lands in the low mantissa bits, so no float-to-int conversion.
                let y = (v * inv).clamp(-127.0, 127.0) + ROUND;
                *d = (y.to_bits() as i32 - ROUND.to_bits() as i32) as i8 as u8;
            }
            let b = c * BLOCKS + j;
            scales[2 * b..2 * b + 2].copy_from_slice(&sh[j].to_bits().to_le_bytes());
        }
    }
    Ok(())
}

/// 1.5 * 2^23: adding it to an f32 of magnitude below 2^22 rounds it to an integer.
const ROUND: f32 = 12_582_912.0;

/// The f16 values of one quantized part of `n` values, into `out` (`2 n` bytes,
/// little-endian). On the disk-read path of every q8 hit, so it works a few blocks at a
/// time, each step over whole arrays (it vectorizes; the f16 conversion uses the
/// hardware's where there is one).
pub fn dequantize(part: &[u8], n: usize, out: &mut [u8]) -> Result<()> {
    if part.len() != KvFormat::Q8.part_bytes(n) || out.len() != 2 * n || !n.is_multiple_of(Q8_BLOCK)
    {
        return Err(Error::Input(format!(
            "q8: a part of {} bytes into {} bytes is not {n} values",
            part.len(),
            out.len()
        )));
    }
    let (q, scales) = part.split_at(n);
    const CHUNK: usize = 64 * Q8_BLOCK;
    const BLOCKS: usize = CHUNK / Q8_BLOCK;
    let mut x = [0f32; CHUNK];
    let mut h = [f16::ZERO; CHUNK];
    for (c, (src, dst)) in q.chunks(CHUNK).zip(out.chunks_mut(2 * CHUNK)).enumerate() {
        let m = src.len();
        for (j, (xb, qb)) in x[..m]
            .chunks_exact_mut(Q8_BLOCK)
            .zip(src.chunks_exact(Q8_BLOCK))
            .enumerate()
        {
            let b = 2 * (c * BLOCKS + j);
            let s = f16::from_bits(u16::from_le_bytes([scales[b], scales[b + 1]])).to_f32();
            for (v, &q) in xb.iter_mut().zip(qb) {
                *v = (q as i8) as f32 * s;
            }
        }
        let h = &mut h[..m];
        h.convert_from_f32_slice(&x[..m]);
        if cfg!(target_endian = "little") {
            dst.copy_from_slice(bytemuck::cast_slice(h));
        } else {
            for (d, v) in dst.chunks_exact_mut(2).zip(h.iter()) {
                d.copy_from_slice(&v.to_bits().to_le_bytes());
            }
        }
    }
    Ok(())
}

/// A stored q8 part that arrives in pieces (a disk read's chunks), turned into f16 once
/// its last byte is in: a part's scales follow its values, so nothing can be turned
/// before that. Reused part after part; allocates once.
pub struct PartDequantizer {
    values: usize,
    part_bytes: usize,
    /// The current part's bytes so far, where it arrives in more than one piece.
    part: Vec<u8>,
    /// One part's f16 values (little-endian).
    f16: Vec<u8>,
}

impl PartDequantizer {
    /// For parts of `values` values (a multiple of [`Q8_BLOCK`]).
    pub fn new(values: usize) -> PartDequantizer {
        PartDequantizer {
            values,
            part_bytes: KvFormat::Q8.part_bytes(values),
            part: Vec::new(),
            f16: vec![0; 2 * values],
        }
    }

    /// The next `bytes` of the current part, `offset` bytes into it (pieces in order, a
    /// new part at offset 0). Once the part is whole, its f16 values; before, `None`.
    pub fn push(&mut self, offset: usize, bytes: &[u8]) -> Option<Result<&[u8]>> {
        let whole = if offset == 0 && bytes.len() == self.part_bytes {
            bytes // the whole part in one piece: no gathering
        } else {
            if offset == 0 {
                self.part.clear();
            }
            if offset != self.part.len() || offset + bytes.len() > self.part_bytes {
                return Some(Err(Error::Input(format!(
                    "q8: {} bytes at offset {offset} of a {}-byte part that has {}",
                    bytes.len(),
                    self.part_bytes,
                    self.part.len()
                ))));
            }
            self.part.extend_from_slice(bytes);
            if self.part.len() < self.part_bytes {
                return None;
            }
            &self.part
        };
        Some(dequantize(whole, self.values, &mut self.f16).map(|()| &self.f16[..]))
    }
}
