//! Dequantization of ggml blocks to f32, and the Q/K row permutation of llama.cpp's
//! converter.

#[allow(unused_imports)]
use super::*;
// ---------------------------------------------------------------------------------------
// dequantization
// ---------------------------------------------------------------------------------------

#[inline]
pub(super) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

#[inline]
pub(super) fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
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
    move_qk_rows(data, rows, cols, n_head, |hf, gg| (hf, gg))
}

/// Inverse of [`permute_qk_rows`]: GGUF row order -> HF row order.
pub fn unpermute_qk_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    move_qk_rows(data, rows, cols, n_head, |hf, gg| (gg, hf))
}

/// Copy row `from` to row `to` for every (HF row, GGUF row) pair mapped by `dir`.
fn move_qk_rows(
    data: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
    dir: impl Fn(usize, usize) -> (usize, usize),
) -> Vec<f32> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let (from, to) = dir(h * hd + j * half + i, h * hd + i * 2 + j);
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&data[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}
