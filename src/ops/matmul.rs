//! Matrix products: tiled and tensor-core GEMMs, split-K, skinny and GEMV paths for
//! few rows, and the fused norm + GEMV (+ SwiGLU, + RoPE) decode kernels.

use super::kernels::*;
use super::{coop, need, need_dtype, need_len, rms_norm, u32_of, Matrix};
use crate::error::Result;
use crate::gpu::{grid_1d, DType, Kernel, Step, Tensor};

/// `y[y_row0 + i, :] (+)= x[x_row0 + i, :] @ w^T (+ bias)` for i < m.
/// x: f32 `[*, w.cols]`, y: f32 `[*, w.rows]`, bias: f32 `[w.rows]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    step: &mut Step,
    x: &Tensor,
    x_row0: usize,
    m: usize,
    w: &Matrix,
    bias: Option<&Tensor>,
    y: &Tensor,
    y_row0: usize,
    accumulate: bool,
) -> Result<()> {
    let (n, k) = (w.rows, w.cols);
    need_dtype(x, DType::F32, "matmul x")?;
    need_dtype(y, DType::F32, "matmul y")?;
    need_len(x, (x_row0 + m) * k, "matmul x")?;
    need_len(y, (y_row0 + m) * n, "matmul y")?;
    if let Some(b) = bias {
        need_len(b, n, "matmul bias")?;
    }
    if m == 0 {
        return Ok(());
    }
    let dummy;
    let b = match bias {
        Some(b) => b,
        None => {
            dummy = step.gpu().dummy();
            &dummy
        }
    };
    let flags = accumulate as u32 | if bias.is_some() { 2 } else { 0 };
    for (r0, part) in &w.parts {
        let pn = part.shape[0];
        let params = [
            u32_of(m, "rows")?,
            pn as u32,
            k as u32,
            u32_of(x_row0 * k, "x offset")?,
            u32_of(y_row0 * n, "y offset")?,
            n as u32,
            *r0 as u32,
            flags,
        ];
        if m == 1 {
            matvec(step, &params, pn, k, [x, part, b, y], None);
        } else if let Some(sgs) = gemv_batch_fits(step, m, k, x_row0 * k) {
            gemv_batch(step, sgs, &params, pn, [x, part, b, y]);
        } else if step.serial() {
            let blocks = pn.div_ceil(4) * m.div_ceil(4);
            let groups = grid_1d(u32_of(blocks.div_ceil(64), "matmul blocks")?);
            let p10 = gemm_words(&params, k, 0);
            step.dispatch(MATMUL_BLOCKS, &p10, &[x, part, b, y], groups);
        } else if let Some(shape) = coop::usable(step, k, x_row0 * k) {
            let tile = coop::Tile::for_rows(step.gpu(), m, shape.t);
            coop::matmul(step, shape, tile, &params, None, [x, part, b, y])?;
        } else if skinny_ok(step, m, k, x_row0 * k) {
            skinny_matmul(step, &params, [x, part, b, y])?;
        } else {
            let splits = matmul_splits(m, pn, k);
            tiled_matmul(step, &params, splits, [x, part, b, y])?;
        }
    }
    Ok(())
}

/// X rows per pass of the batch GEMV (matmul_gemv_rows.wgsl's `MR`).
const GEMV_BATCH_PASS: u32 = 8;

/// The subgroup size when the batch GEMV takes a product of `m` rows: on
/// ([`crate::gpu::Tuning::gemv_batch`] >= m), fixed-size subgroups, K % 8 == 0, aligned X.
fn gemv_batch_fits(step: &Step, m: usize, k: usize, x_off: usize) -> Option<u32> {
    if m > step.gpu().tuning.gemv_batch || !vec4_gemv(step, k, x_off) {
        return None;
    }
    step.gpu().subgroup_size().filter(|_| step.subgroup_gemv())
}

/// matmul_gemv_rows.wgsl for `rows` weight rows per subgroup of `sgs` invocations.
fn gemv_batch_kernel(rows: u32, sgs: u32) -> Kernel {
    static KERNELS: std::sync::Mutex<Vec<((u32, u32), Kernel)>> = std::sync::Mutex::new(Vec::new());
    Kernel::generated(&KERNELS, (rows, sgs), "matmul_gemv_rows", || {
        let name = format!("matmul_gemv_rows.wgsl::matmul_gemv_rows r{rows} sg{sgs}");
        let src = format!(
            "const RPW: u32 = {rows}u;\nconst SGS: u32 = {sgs}u;\nconst MR: u32 = {GEMV_BATCH_PASS}u;\n{}",
            include_str!("../../shaders/matmul_gemv_rows.wgsl")
        );
        (name, src)
    })
}

/// The batch GEMV over `outputs` weight rows (matmul.wgsl's parameters; callers check
/// [`gemv_batch_fits`], or the tests: subgroups of `sgs`, K % 8 == 0, aligned X).
pub fn gemv_batch(
    step: &mut Step,
    sgs: u32,
    params: &[u32; 8],
    outputs: usize,
    bufs: [&Tensor; 4],
) {
    let per_wg = 256 / sgs as usize;
    let rows = step
        .gemv_rows()
        .unwrap_or_else(|| gemv_rows(outputs, per_wg));
    let groups = grid_1d(outputs.div_ceil(per_wg * rows) as u32);
    step.dispatch(gemv_batch_kernel(rows as u32, sgs), params, &bufs, groups);
}

/// The batch GEMV's variants for validation tests (rows 1, 2, 4 at subgroup sizes 8
/// and 32).
pub fn gemv_batch_kernels() -> Vec<Kernel> {
    [8, 32]
        .iter()
        .flat_map(|&s| [1, 2, 4].map(|r| gemv_batch_kernel(r, s)))
        .collect()
}

/// Whether the skinny GEMM takes a product of `m` rows: GPU adapters with 32 KiB of
/// workgroup memory, a few rows (up to 32: two blocks of 16), K % 8 == 0, aligned X.
/// [`crate::gpu::Tuning::skinny_gemm`] off (`KVLINK_SKINNY=off`) sends them to the
/// split-K tiled GEMM instead (for benchmarking).
fn skinny_ok(step: &Step, m: usize, k: usize, x_off: usize) -> bool {
    !step.serial()
        && step.gpu().tuning.skinny_gemm
        && m <= 32
        && k.is_multiple_of(8)
        && x_off.is_multiple_of(4)
        && step.gpu().limits.max_compute_workgroup_storage_size >= 32 << 10
}

/// The skinny GEMM (matmul_skinny.wgsl) with matmul.wgsl's parameters; callers check
/// [`skinny_ok`]. Public for the kernel tests.
pub fn skinny_matmul(step: &mut Step, params: &[u32; 8], bufs: [&Tensor; 4]) -> Result<()> {
    let (m, pn) = (params[0] as usize, params[1] as usize);
    need(
        params[2].is_multiple_of(8) && params[3].is_multiple_of(4),
        || "matmul_skinny: K % 8 and x offset % 4 must be 0".into(),
    )?;
    let gx = u32_of(pn.div_ceil(32), "matmul_skinny row groups")?;
    need(gx <= 65535, || {
        format!("matmul_skinny too large: {pn} rows")
    })?;
    let p10 = gemm_words(params, params[2] as usize, 0);
    step.dispatch(MATMUL_SKINNY, &p10, &bufs, [gx, m.div_ceil(16) as u32, 1]);
    Ok(())
}

/// matmul.wgsl's parameter words: the 8 of `params`, then the K chunk per workgroup z and
/// the split-K partials' stride (0: write Y).
pub(super) fn gemm_words(params: &[u32; 8], kc: usize, split_stride: u32) -> [u32; 10] {
    let mut w = [0u32; 10];
    w[..8].copy_from_slice(params);
    w[8] = kc as u32;
    w[9] = split_stride;
    w
}

/// Split-K factor for the tiled GEMM: a few rows (the KVLink seg-0 prefill, a short
/// prompt) give too few 64x64 tiles to fill a large GPU, and each tile would walk all of
/// K alone; splitting K over ~512 workgroups keeps every SM busy. Chunks of >= 256.
fn matmul_splits(m: usize, n: usize, k: usize) -> usize {
    let tiles = n.div_ceil(64) * m.div_ceil(64);
    if tiles >= 256 {
        return 1;
    }
    512usize.div_ceil(tiles).min(k / 256).clamp(1, 64)
}

/// The tiled GEMM over `splits` slices of K (> 1: partial sums in a scratch buffer, then
/// matmul_reduce applies bias / accumulate). `params` are matmul.wgsl's first 8 words.
pub fn tiled_matmul(
    step: &mut Step,
    params: &[u32; 8],
    splits: usize,
    bufs: [&Tensor; 4],
) -> Result<()> {
    let [m, pn, k] = [params[0] as usize, params[1] as usize, params[2] as usize];
    let gx = pn.div_ceil(64) as u32;
    let gy = m.div_ceil(64) as u32;
    need(gy <= 65535 && gx <= 65535, || {
        format!("matmul too large: {m}x{pn}")
    })?;
    if splits <= 1 {
        step.dispatch(MATMUL, &gemm_words(params, k, 0), &bufs, [gx, gy, 1]);
        return Ok(());
    }
    let kc = k.div_ceil(splits).div_ceil(16) * 16;
    let splits = k.div_ceil(kc);
    split_k(step, MATMUL, params, kc, splits, [gx, gy], bufs)
}

/// A GEMM kernel with matmul.wgsl's parameters over `splits` chunks of `kc` of K (grid z):
/// partial sums into a scratch buffer, then matmul_reduce adds them up and applies bias
/// and accumulate.
pub(super) fn split_k(
    step: &mut Step,
    kernel: Kernel,
    params: &[u32; 8],
    kc: usize,
    splits: usize,
    [gx, gy]: [u32; 2],
    bufs: [&Tensor; 4],
) -> Result<()> {
    let (m, pn) = (params[0] as usize, params[1] as usize);
    let part = step.gpu().scratch("matmul split-K", splits * m * pn)?;
    let p10 = gemm_words(params, kc, u32_of(m * pn, "matmul split stride")?);
    let [x, w, b, y] = bufs;
    step.dispatch(kernel, &p10, &[x, w, b, &part], [gx, gy, splits as u32]);
    let red = [
        params[0],
        params[1],
        splits as u32,
        params[4],
        params[5],
        params[6],
        params[7],
        0,
    ];
    let groups = grid_1d(u32_of((m * pn).div_ceil(256), "matmul reduce")?);
    step.dispatch(MATMUL_REDUCE, &red, &[&part, b, y], groups);
    Ok(())
}

/// Whether the vec4 GEMV runs this projection (GPU adapters, K % 8 == 0).
fn vec4_gemv(step: &Step, k: usize, x_off: usize) -> bool {
    !step.serial() && k.is_multiple_of(8) && x_off.is_multiple_of(4)
}

/// Rows per lane group of the GEMV (`groups` lane groups per workgroup): more rows share
/// each X load (fewer loads per weight byte) but make fewer workgroups, so only matrices
/// tall enough to keep ~256 workgroups of 256 threads (two per SM of a large GPU) take
/// them.
fn gemv_rows(outputs: usize, groups: usize) -> usize {
    match outputs {
        o if o >= 4 * groups * 256 => 4,
        o if o >= 2 * groups * 256 => 2,
        _ => 1,
    }
}

/// matvec_subgroup.wgsl for `rows` rows per subgroup of `sgs` invocations.
fn subgroup_gemv_kernel(rows: u32, sgs: u32) -> Kernel {
    static KERNELS: std::sync::Mutex<Vec<((u32, u32), Kernel)>> = std::sync::Mutex::new(Vec::new());
    Kernel::generated(&KERNELS, (rows, sgs), "matvec_subgroup", || {
        let name = format!("matvec_subgroup.wgsl::matvec_subgroup r{rows} sg{sgs}");
        let src = format!(
            "const RPW: u32 = {rows}u;\nconst SGS: u32 = {sgs}u;\n{}\n{}",
            include_str!("../../shaders/gemv_subgroup.wgsl"),
            include_str!("../../shaders/matvec_subgroup.wgsl")
        );
        (name, src)
    })
}

/// matvec_qkv_rope.wgsl for subgroups of `sgs` invocations.
fn qkv_rope_kernel(sgs: u32) -> Kernel {
    static KERNELS: std::sync::Mutex<Vec<(u32, Kernel)>> = std::sync::Mutex::new(Vec::new());
    Kernel::generated(&KERNELS, sgs, "matvec_qkv_rope", || {
        let name = format!("matvec_qkv_rope.wgsl::matvec_qkv_rope sg{sgs}");
        let src = format!(
            "const RPW: u32 = 4u;\nconst SGS: u32 = {sgs}u;\n{}\n{}",
            include_str!("../../shaders/gemv_subgroup.wgsl"),
            include_str!("../../shaders/matvec_qkv_rope.wgsl")
        );
        (name, src)
    })
}

/// Decode (one token, in row 0 of `x`): RMSNorm, the stacked QKV projection `w` (+
/// bias), RoPE at `pos` (NEOX pairing) and the K/V write into cache row `slot`, in one
/// dispatch: what [`rms_norm_matvec`] then [`rope_kv`] do. Takes it where the subgroup
/// GEMV runs (fixed-size subgroups), K % 8 == 0, head_dim % 4 == 0, `w` in one part and
/// 8 storage buffers per stage; returns false otherwise (the caller runs the two ops).
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope_matvec(
    step: &mut Step,
    x: &Tensor,
    nw: &Tensor,
    eps: f32,
    w: &Matrix,
    bias: Option<&Tensor>,
    [heads, kv_heads, head_dim]: [usize; 3],
    inv_freq: &Tensor,
    (slot, pos): (u32, i32),
    [q, kc, vc]: [&Tensor; 3],
) -> Result<bool> {
    let k = w.cols;
    let n = (heads + 2 * kv_heads) * head_dim;
    let Some(sgs) = step.gpu().subgroup_size().filter(|_| step.subgroup_gemv()) else {
        return Ok(false);
    };
    if !vec4_gemv(step, k, 0)
        || !head_dim.is_multiple_of(4)
        || w.parts.len() != 1
        || w.rows != n
        || step.gpu().limits.max_storage_buffers_per_shader_stage < 8
    {
        return Ok(false);
    }
    need(nw.numel() == k, || {
        format!(
            "qkv_rope_matvec: norm weight {:?} for {k} columns",
            nw.shape
        )
    })?;
    need_len(x, k, "qkv_rope_matvec x")?;
    need_len(q, heads * head_dim, "qkv_rope_matvec q")?;
    need_len(inv_freq, head_dim / 2, "qkv_rope_matvec inv_freq")?;
    let kvd = kv_heads * head_dim;
    need(
        kc.numel() == vc.numel() && kc.numel() >= (slot as usize + 1) * kvd,
        || format!("qkv_rope_matvec: slot {slot} outside the K/V caches"),
    )?;
    if let Some(b) = bias {
        need_len(b, n, "qkv_rope_matvec bias")?;
    }
    let dummy = step.gpu().dummy();
    let params = [
        n as u32,
        k as u32,
        8 | if bias.is_some() { 2 } else { 0 },
        eps.to_bits(),
        heads as u32,
        kv_heads as u32,
        head_dim as u32,
        slot,
        (pos as f32).to_bits(),
    ];
    let groups = grid_1d(u32_of(
        (n / 4).div_ceil(256 / sgs as usize),
        "qkv_rope_matvec",
    )?);
    let bufs = [
        x,
        &w.parts[0].1,
        bias.unwrap_or(&dummy),
        nw,
        inv_freq,
        q,
        kc,
        vc,
    ];
    step.dispatch(qkv_rope_kernel(sgs), &params, &bufs, groups);
    Ok(true)
}

/// The subgroup GEMV's variants for validation tests (rows 1, 2, 4 at subgroup sizes
/// 8 and 32).
pub fn subgroup_gemv_kernels() -> Vec<Kernel> {
    [8, 32]
        .iter()
        .flat_map(|&s| [1, 2, 4].map(|r| subgroup_gemv_kernel(r, s)))
        .chain([8, 32].map(qkv_rope_kernel))
        .collect()
}

/// One GEMV dispatch over `outputs` rows (matmul.wgsl's parameters): the barrier-free
/// kernel on CPU adapters, else the vec4 kernel where K allows it. `norm` (RMSNorm
/// weight, eps) normalizes X inside the vec4 kernel; callers check [`vec4_gemv`].
fn matvec(
    step: &mut Step,
    params: &[u32; 8],
    outputs: usize,
    k: usize,
    bufs: [&Tensor; 4],
    norm: Option<(&Tensor, f32)>,
) {
    if vec4_gemv(step, k, params[3] as usize) {
        let mut p9 = [0u32; 9];
        p9[..8].copy_from_slice(params);
        let dummy = step.gpu().dummy();
        let nw = match norm {
            Some((w, eps)) => {
                p9[7] |= 8;
                p9[8] = eps.to_bits();
                w
            }
            None => &dummy,
        };
        let sgs = step.gpu().subgroup_size().filter(|_| step.subgroup_gemv());
        let per_wg = sgs.map_or(8, |s| 256 / s as usize);
        let rows = step
            .gemv_rows()
            .unwrap_or_else(|| gemv_rows(outputs, per_wg));
        let kernel = match sgs {
            Some(s) => subgroup_gemv_kernel(rows as u32, s),
            None => match rows {
                4 => MATVEC_VEC4_R4,
                2 => MATVEC_VEC4_R2,
                _ => MATVEC_VEC4,
            },
        };
        let groups = grid_1d(outputs.div_ceil(per_wg * rows) as u32);
        let [x, w, b, y] = bufs;
        step.dispatch(kernel, &p9, &[x, w, b, y, nw], groups);
        return;
    }
    debug_assert!(norm.is_none(), "fused RMSNorm needs the vec4 GEMV");
    if step.serial() {
        let groups = grid_1d(outputs.div_ceil(64) as u32);
        step.dispatch(MATVEC_ROWS, params, &bufs, groups);
    } else {
        let groups = grid_1d(outputs.div_ceil(4) as u32);
        step.dispatch(MATVEC, params, &bufs, groups);
    }
}

/// SwiGLU feed-forward input: `act[i, :] = silu(x_i @ Wg^T) * (x_i @ Wu^T)` for i < m,
/// where `w` is the fused `[gate; up]` matrix (`[2 ff, k]`: gate rows, then up rows).
/// Decode (m = 1, `w` in one part) is one fused GEMV; otherwise the projection goes to
/// `gu` (f32 `[m, 2 ff]`) and one element-wise pass forms `act` (f32 `[m, ff]`).
pub fn matmul_swiglu(
    step: &mut Step,
    x: &Tensor,
    m: usize,
    w: &Matrix,
    gu: &Tensor,
    act: &Tensor,
) -> Result<()> {
    need(w.rows.is_multiple_of(2), || {
        format!("matmul_swiglu: {} rows is not gate + up", w.rows)
    })?;
    let (ff, k) = (w.rows / 2, w.cols);
    need_dtype(x, DType::F32, "matmul_swiglu x")?;
    need_dtype(act, DType::F32, "matmul_swiglu act")?;
    need_len(x, m * k, "matmul_swiglu x")?;
    need_len(act, m * ff, "matmul_swiglu act")?;
    if m == 0 {
        return Ok(());
    }
    if m == 1 && w.parts.len() == 1 {
        let params = [1, ff as u32, k as u32, 0, 0, ff as u32, 0, 4];
        let dummy = step.gpu().dummy();
        matvec(step, &params, ff, k, [x, &w.parts[0].1, &dummy, act], None);
        return Ok(());
    }
    need_len(gu, m * 2 * ff, "matmul_swiglu gu")?;
    matmul(step, x, 0, m, w, None, gu, 0, false)?;
    let n = m * ff;
    step.dispatch(
        SILU_MUL_SPLIT,
        &[u32_of(n, "matmul_swiglu size")?, ff as u32],
        &[gu, act],
        grid_1d(n.div_ceil(256) as u32),
    );
    Ok(())
}

/// RMSNorm feeding a projection: `y[y_row0] (+)= (norm(x[x_row0]) * nw) @ w^T (+ bias)`
/// for one row. On GPU adapters with K % 8 == 0 the GEMV normalizes X itself (one
/// dispatch); otherwise the normalized row goes through `h` (f32 `[1, k]`).
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_matvec(
    step: &mut Step,
    x: &Tensor,
    x_row0: usize,
    nw: &Tensor,
    eps: f32,
    h: &Tensor,
    w: &Matrix,
    bias: Option<&Tensor>,
    y: &Tensor,
    y_row0: usize,
    accumulate: bool,
) -> Result<()> {
    let k = w.cols;
    need(nw.numel() == k, || {
        format!(
            "rms_norm_matvec: norm weight {:?} for {k} columns",
            nw.shape
        )
    })?;
    if !vec4_gemv(step, k, x_row0 * k) {
        rms_norm(step, x, x_row0, 1, nw, h, 0, eps)?;
        return matmul(step, h, 0, 1, w, bias, y, y_row0, accumulate);
    }
    need_dtype(x, DType::F32, "rms_norm_matvec x")?;
    need_dtype(nw, DType::F32, "rms_norm_matvec norm weight")?;
    need_dtype(y, DType::F32, "rms_norm_matvec y")?;
    need_len(x, (x_row0 + 1) * k, "rms_norm_matvec x")?;
    need_len(y, (y_row0 + 1) * w.rows, "rms_norm_matvec y")?;
    if let Some(b) = bias {
        need_len(b, w.rows, "rms_norm_matvec bias")?;
    }
    let dummy = step.gpu().dummy();
    let b = bias.unwrap_or(&dummy);
    let flags = accumulate as u32 | if bias.is_some() { 2 } else { 0 };
    for (r0, part) in &w.parts {
        let pn = part.shape[0];
        let params = [
            1,
            pn as u32,
            k as u32,
            u32_of(x_row0 * k, "x offset")?,
            u32_of(y_row0 * w.rows, "y offset")?,
            w.rows as u32,
            *r0 as u32,
            flags,
        ];
        matvec(step, &params, pn, k, [x, part, b, y], Some((nw, eps)));
    }
    Ok(())
}

/// RMSNorm feeding the SwiGLU projection, for one row (see [`matmul_swiglu`]); one
/// dispatch where the vec4 GEMV applies, else through `h`.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_matvec_swiglu(
    step: &mut Step,
    x: &Tensor,
    nw: &Tensor,
    eps: f32,
    h: &Tensor,
    w: &Matrix,
    gu: &Tensor,
    act: &Tensor,
) -> Result<()> {
    let k = w.cols;
    need(nw.numel() == k && w.rows.is_multiple_of(2), || {
        format!(
            "rms_norm_matvec_swiglu: norm weight {:?}, matrix {}x{k}",
            nw.shape, w.rows
        )
    })?;
    if !vec4_gemv(step, k, 0) || w.parts.len() != 1 {
        rms_norm(step, x, 0, 1, nw, h, 0, eps)?;
        return matmul_swiglu(step, h, 1, w, gu, act);
    }
    let ff = w.rows / 2;
    need_dtype(x, DType::F32, "rms_norm_matvec_swiglu x")?;
    need_dtype(act, DType::F32, "rms_norm_matvec_swiglu act")?;
    need_len(x, k, "rms_norm_matvec_swiglu x")?;
    need_len(act, ff, "rms_norm_matvec_swiglu act")?;
    let params = [1, ff as u32, k as u32, 0, 0, ff as u32, 0, 4];
    let dummy = step.gpu().dummy();
    let bufs = [x, &w.parts[0].1, &dummy, act];
    matvec(step, &params, ff, k, bufs, Some((nw, eps)));
    Ok(())
}
