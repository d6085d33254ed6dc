//! Row-wise and element-wise kernels: RMSNorm, embedding lookup, add, SiLU * mul and
//! the GPU argmax.

use super::kernels::*;
use super::{need, need_dtype, need_len, u32_of, Matrix};
use crate::error::Result;
use crate::gpu::{grid_1d, DType, Kernel, Step, Tensor};

/// RMSNorm of `rows` rows of length `dim`: y[y_row0 + r] = norm(x[x_row0 + r]) * w.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm(
    step: &mut Step,
    x: &Tensor,
    x_row0: usize,
    rows: usize,
    w: &Tensor,
    y: &Tensor,
    y_row0: usize,
    eps: f32,
) -> Result<()> {
    let dim = w.numel();
    need_dtype(w, DType::F32, "rms_norm weight")?;
    need_len(x, (x_row0 + rows) * dim, "rms_norm x")?;
    need_len(y, (y_row0 + rows) * dim, "rms_norm y")?;
    if rows == 0 {
        return Ok(());
    }
    let params = [
        rows as u32,
        dim as u32,
        u32_of(x_row0 * dim, "x offset")?,
        u32_of(y_row0 * dim, "y offset")?,
        eps.to_bits(),
    ];
    step.dispatch(RMS_NORM, &params, &[x, w, y], grid_1d(rows as u32));
    Ok(())
}

/// x[i, :] = table[tokens[i], :] for i < t.
pub fn embed(step: &mut Step, tokens: &Tensor, t: usize, table: &Matrix, x: &Tensor) -> Result<()> {
    need_len(tokens, t, "embed tokens")?;
    need_len(x, t * table.cols, "embed x")?;
    let n = t * table.cols / 2;
    if n == 0 {
        return Ok(());
    }
    for (r0, part) in &table.parts {
        let params = [
            t as u32,
            table.cols as u32,
            *r0 as u32,
            part.shape[0] as u32,
        ];
        step.dispatch(
            EMBED,
            &params,
            &[tokens, part, x],
            grid_1d(n.div_ceil(256) as u32),
        );
    }
    Ok(())
}

/// b[i] += a[i] for i < n.
pub fn add(step: &mut Step, a: &Tensor, b: &Tensor, n: usize) -> Result<()> {
    elementwise(step, ADD, a, b, n)
}

/// u[i] = silu(g[i]) * u[i] for i < n.
pub fn silu_mul(step: &mut Step, g: &Tensor, u: &Tensor, n: usize) -> Result<()> {
    elementwise(step, SILU_MUL, g, u, n)
}

fn elementwise(step: &mut Step, k: Kernel, a: &Tensor, b: &Tensor, n: usize) -> Result<()> {
    need_len(a, n, k.name)?;
    need_len(b, n, k.name)?;
    if n == 0 {
        return Ok(());
    }
    step.dispatch(k, &[n as u32], &[a, b], grid_1d(n.div_ceil(256) as u32));
    Ok(())
}

/// out[0] = argmax(logits[off .. off + n]).
pub fn argmax(step: &mut Step, logits: &Tensor, off: usize, n: usize, out: &Tensor) -> Result<()> {
    argmax_rows(step, logits, off, n, 1, out)
}

/// `out[r]` = the argmax of row `r` of the `rows` rows of `n` logits from `off` (lowest
/// index on ties); one workgroup per row.
pub fn argmax_rows(
    step: &mut Step,
    logits: &Tensor,
    off: usize,
    n: usize,
    rows: usize,
    out: &Tensor,
) -> Result<()> {
    need_len(logits, off + n * rows, "argmax logits")?;
    need_len(out, rows, "argmax out")?;
    need(n > 0 && rows > 0, || "argmax over nothing".into())?;
    let params = [u32_of(n, "argmax row")?, u32_of(off, "argmax offset")?];
    let groups = [u32_of(rows, "argmax rows")?, 1, 1];
    step.dispatch(ARGMAX, &params, &[logits, out], groups);
    Ok(())
}
