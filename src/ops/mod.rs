//! One Rust function per kernel: checks shapes, binds, records the dispatch into a
//! [`Step`]. Shape errors that user input can cause come back as `Error::Input`.

use crate::error::{Error, Result};
use crate::gpu::{grid_1d, DType, Gpu, Kernel, Step, Tensor};

pub mod coop;

macro_rules! kernel {
    ($name:ident, $file:literal, $entry:literal) => {
        pub const $name: Kernel = Kernel {
            name: concat!($file, "::", $entry),
            source: include_str!(concat!("../../shaders/", $file)),
            entry: $entry,
        };
    };
}

pub mod kernels {
    use super::*;
    kernel!(MATMUL, "matmul.wgsl", "matmul");
    kernel!(MATMUL_BLOCKS, "matmul.wgsl", "matmul_blocks");
    kernel!(MATVEC, "matvec.wgsl", "matvec");
    kernel!(MATVEC_ROWS, "matvec.wgsl", "matvec_rows");
    kernel!(ROPE_KV, "rope_kv.wgsl", "rope_kv");
    kernel!(SILU_MUL_SPLIT, "elementwise.wgsl", "silu_mul_split");
    kernel!(RMS_NORM, "norm.wgsl", "rms_norm");
    kernel!(ROPE, "rope.wgsl", "rope");
    kernel!(ROTATE_KEYS, "rope.wgsl", "rotate_keys");
    kernel!(ASSEMBLE_KV, "assemble.wgsl", "assemble_kv");
    kernel!(KV_WRITE, "kv.wgsl", "kv_write");
    kernel!(ATTENTION, "attention.wgsl", "attention");
    kernel!(EMBED, "embed.wgsl", "embed");
    kernel!(ATTENTION_MASS, "attention_mass.wgsl", "attention_mass");
    kernel!(ADD, "elementwise.wgsl", "add");
    kernel!(SILU_MUL, "elementwise.wgsl", "silu_mul");
    kernel!(ARGMAX, "sample.wgsl", "argmax");
    kernel!(MATMUL_REDUCE, "matmul_reduce.wgsl", "matmul_reduce");
    kernel!(MATMUL_SKINNY, "matmul_skinny.wgsl", "matmul_skinny");
    kernel!(
        ATTENTION_COMBINE,
        "attention_combine.wgsl",
        "attention_combine"
    );

    /// Flash attention specialised for one head size (the host fixes `D` and the rows
    /// per workgroup `BR` so the tiles fit 32 KiB of workgroup memory).
    macro_rules! flash {
        ($name:ident, $d:literal, $br:literal) => {
            pub const $name: Kernel = Kernel {
                name: concat!("flash_attention.wgsl::flash_attention_d", $d),
                source: concat!(
                    "const D: u32 = ",
                    $d,
                    "u;\nconst BR: u32 = ",
                    $br,
                    "u;\n",
                    include_str!("../../shaders/flash_attention.wgsl")
                ),
                entry: "flash_attention",
            };
        };
    }
    /// The vec4 GEMV with `RPW` output rows per 32-lane group.
    macro_rules! gemv {
        ($name:ident, $rows:literal) => {
            pub const $name: Kernel = Kernel {
                name: concat!("matvec_vec4.wgsl::matvec_vec4_r", $rows),
                source: concat!(
                    "const RPW: u32 = ",
                    $rows,
                    "u;\n",
                    include_str!("../../shaders/matvec_vec4.wgsl")
                ),
                entry: "matvec_vec4",
            };
        };
    }
    gemv!(MATVEC_VEC4, 1);
    gemv!(MATVEC_VEC4_R2, 2);
    gemv!(MATVEC_VEC4_R4, 4);

    flash!(FLASH_D32, 32, 32);
    flash!(FLASH_D64, 64, 32);
    flash!(FLASH_D128, 128, 16);

    /// Decode attention (few rows per KV head) specialised for one head size.
    macro_rules! decode {
        ($name:ident, $d:literal) => {
            pub const $name: Kernel = Kernel {
                name: concat!("attention_decode.wgsl::attention_decode_d", $d),
                source: concat!(
                    "const D: u32 = ",
                    $d,
                    "u;\n",
                    include_str!("../../shaders/attention_decode.wgsl")
                ),
                entry: "attention_decode",
            };
        };
    }
    decode!(DECODE_D32, 32);
    decode!(DECODE_D64, 64);
    decode!(DECODE_D128, 128);

    /// Every kernel, for validation tests.
    pub const ALL: &[Kernel] = &[
        MATMUL,
        MATMUL_BLOCKS,
        MATVEC,
        MATVEC_ROWS,
        MATVEC_VEC4,
        MATVEC_VEC4_R2,
        MATVEC_VEC4_R4,
        ROPE_KV,
        SILU_MUL_SPLIT,
        RMS_NORM,
        ROPE,
        ROTATE_KEYS,
        ASSEMBLE_KV,
        KV_WRITE,
        ATTENTION,
        ATTENTION_MASS,
        EMBED,
        ADD,
        SILU_MUL,
        ARGMAX,
        ATTENTION_COMBINE,
        MATMUL_REDUCE,
        MATMUL_SKINNY,
        FLASH_D32,
        FLASH_D64,
        FLASH_D128,
        DECODE_D32,
        DECODE_D64,
        DECODE_D128,
    ];
}
use kernels::*;

fn need(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Input(msg()))
    }
}

fn need_dtype(t: &Tensor, d: DType, what: &str) -> Result<()> {
    need(t.dtype == d, || {
        format!("{what}: expected {d:?}, got {:?}", t.dtype)
    })
}

fn need_len(t: &Tensor, n: usize, what: &str) -> Result<()> {
    need(t.numel() >= n, || {
        format!(
            "{what}: needs {n} elements, tensor {:?} has {}",
            t.shape,
            t.numel()
        )
    })
}

fn u32_of(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| Error::Input(format!("{what} = {x} is too large")))
}

/// A weight matrix `[rows, cols]` in f16, split by rows over as many buffers as the
/// adapter's largest storage binding requires.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    /// (first row, tensor `[rows_in_part, cols]`)
    pub parts: Vec<(usize, Tensor)>,
}

impl Matrix {
    pub fn upload(
        gpu: &Gpu,
        rows: usize,
        cols: usize,
        data: &[f32],
        label: &str,
    ) -> Result<Matrix> {
        let max_rows = (gpu.max_buffer_bytes() as usize / (cols.max(1) * 2)).max(1);
        Self::upload_split(gpu, rows, cols, data, max_rows, label)
    }

    /// Like [`Matrix::upload`] with at most `max_rows` rows per buffer (tests use it to
    /// exercise splitting at small sizes).
    pub fn upload_split(
        gpu: &Gpu,
        rows: usize,
        cols: usize,
        data: &[f32],
        max_rows: usize,
        label: &str,
    ) -> Result<Matrix> {
        need(data.len() == rows * cols, || {
            format!("{label}: expected {rows}x{cols} values, got {}", data.len())
        })?;
        need(cols.is_multiple_of(2) && cols > 0, || {
            format!("{label}: column count {cols} must be even")
        })?;
        let max_rows = max_rows.max(1);
        let mut parts = Vec::new();
        let mut r0 = 0;
        while r0 < rows {
            let n = max_rows.min(rows - r0);
            let t =
                Tensor::from_f32_as_f16(gpu, &[n, cols], &data[r0 * cols..(r0 + n) * cols], label)?;
            parts.push((r0, t));
            r0 += n;
        }
        Ok(Matrix { rows, cols, parts })
    }

    pub fn bytes(&self) -> u64 {
        (self.rows * self.cols * 2) as u64
    }
}

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
fn gemm_words(params: &[u32; 8], kc: usize, split_stride: u32) -> [u32; 10] {
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
fn split_k(
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

/// After the fused QKV projection (`qkv`: f32 `[t, q_dim + 2 kv_dim]`), rotate Q and K
/// at their positions and store them: Q to `q` (f32 `[t, heads, head_dim]`), K and V to
/// the f16 caches. `idx` holds `[t]` cache slots followed by `[t]` positions (i32).
#[allow(clippy::too_many_arguments)]
pub fn rope_kv(
    step: &mut Step,
    qkv: &Tensor,
    t: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    idx: &Tensor,
    inv_freq: &Tensor,
    interleaved: bool,
    q: &Tensor,
    kc: &Tensor,
    vc: &Tensor,
) -> Result<()> {
    let all = heads + 2 * kv_heads;
    need(head_dim.is_multiple_of(4) && head_dim > 0, || {
        format!("rope_kv: head_dim {head_dim} must be a multiple of 4")
    })?;
    need_dtype(qkv, DType::F32, "rope_kv qkv")?;
    need_dtype(q, DType::F32, "rope_kv q")?;
    need_dtype(kc, DType::F16, "rope_kv k cache")?;
    need_dtype(vc, DType::F16, "rope_kv v cache")?;
    need_len(qkv, t * all * head_dim, "rope_kv qkv")?;
    need_len(q, t * heads * head_dim, "rope_kv q")?;
    need_len(idx, 2 * t, "rope_kv slots and positions")?;
    need_len(inv_freq, head_dim / 2, "rope_kv inv_freq")?;
    need(
        kc.numel() == vc.numel() && kc.numel().is_multiple_of(kv_heads * head_dim),
        || "rope_kv: K and V caches must both be [slots, kv_dim]".into(),
    )?;
    let threads = t * all * head_dim / 4;
    if threads == 0 {
        return Ok(());
    }
    let params = [
        t as u32,
        heads as u32,
        kv_heads as u32,
        head_dim as u32,
        interleaved as u32,
    ];
    step.dispatch(
        ROPE_KV,
        &params,
        &[qkv, idx, inv_freq, q, kc, vc],
        grid_1d(u32_of(threads.div_ceil(256), "rope_kv size")?),
    );
    Ok(())
}

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

/// Rotate `t` rows of `heads` heads (f32 `[t, heads, head_dim]`) in place at `pos[i]`.
#[allow(clippy::too_many_arguments)]
pub fn rope(
    step: &mut Step,
    x: &Tensor,
    t: usize,
    heads: usize,
    head_dim: usize,
    pos: &Tensor,
    inv_freq: &Tensor,
    interleaved: bool,
) -> Result<()> {
    need_dtype(x, DType::F32, "rope x")?;
    need_len(x, t * heads * head_dim, "rope x")?;
    need_len(pos, t, "rope positions")?;
    need_len(inv_freq, head_dim / 2, "rope inv_freq")?;
    need(head_dim.is_multiple_of(2), || {
        format!("rope: head_dim {head_dim} must be even")
    })?;
    let n = t * heads * head_dim / 2;
    if n == 0 {
        return Ok(());
    }
    let params = [
        t as u32,
        heads as u32,
        head_dim as u32,
        0,
        interleaved as u32,
    ];
    step.dispatch(
        ROPE,
        &params,
        &[x, pos, inv_freq],
        grid_1d(n.div_ceil(256) as u32),
    );
    Ok(())
}

/// Rotate cached keys of slots `slot0 .. slot0 + n` in place, slot `slot0 + s` by
/// `deltas[s]` positions (0 = untouched). kc: f16 `[slots, kv_heads, head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn rotate_keys(
    step: &mut Step,
    kc: &Tensor,
    slot0: usize,
    n: usize,
    kv_heads: usize,
    head_dim: usize,
    deltas: &Tensor,
    inv_freq: &Tensor,
    interleaved: bool,
) -> Result<()> {
    need_dtype(kc, DType::F16, "rotate_keys cache")?;
    need_len(kc, (slot0 + n) * kv_heads * head_dim, "rotate_keys cache")?;
    need_len(deltas, n, "rotate_keys deltas")?;
    let shape = [n, kv_heads, head_dim, slot0, interleaved as usize];
    key_turn(step, ROTATE_KEYS, shape, &[kc, deltas, inv_freq])
}

/// The dispatch of the key-rotating kernels (rotate_keys, assemble_kv): one thread per
/// (slot, head, quarter of head_dim); `shape` is their parameters
/// `[slots, kv_heads, head_dim, slot0, interleaved]`.
fn key_turn(step: &mut Step, k: Kernel, shape: [usize; 5], bufs: &[&Tensor]) -> Result<()> {
    let [n, kv_heads, head_dim, ..] = shape;
    need(head_dim.is_multiple_of(4), || {
        format!("{}: head_dim {head_dim} must be a multiple of 4", k.entry)
    })?;
    let threads = n * kv_heads * head_dim / 4;
    if threads == 0 {
        return Ok(());
    }
    let params = shape.map(|x| x as u32);
    step.dispatch(k, &params, bufs, grid_1d(threads.div_ceil(256) as u32));
    Ok(())
}

/// Gather K/V rows of a document-cache pool slab into a request's cache, turning keys
/// by their deltas on the way: slot `slot0 + s` gets slab row `table[2s]` (`u32::MAX`:
/// left untouched) with its key rotated by `table[2s + 1]` positions (i32 bits; 0: copied
/// exactly). `ks`/`vs` f16 `[rows, kv_heads, head_dim]`, `kc`/`vc` f16 `[slots, ..]`.
/// The host checks every row against the slab (the kernel does not).
#[allow(clippy::too_many_arguments)]
pub fn assemble_kv(
    step: &mut Step,
    ks: &Tensor,
    vs: &Tensor,
    table: &Tensor,
    kc: &Tensor,
    vc: &Tensor,
    slot0: usize,
    n: usize,
    kv_heads: usize,
    head_dim: usize,
    inv_freq: &Tensor,
    interleaved: bool,
) -> Result<()> {
    let kvd = kv_heads * head_dim;
    for (t, what) in [
        (ks, "slab k"),
        (vs, "slab v"),
        (kc, "cache k"),
        (vc, "cache v"),
    ] {
        need_dtype(t, DType::F16, &format!("assemble_kv {what}"))?;
    }
    need(
        ks.numel() == vs.numel() && ks.numel().is_multiple_of(kvd.max(1)),
        || {
            format!(
                "assemble_kv: slab k/v of {} and {} elements for kv_dim {kvd}",
                ks.numel(),
                vs.numel()
            )
        },
    )?;
    need_len(kc, (slot0 + n) * kvd, "assemble_kv cache k")?;
    need_len(vc, (slot0 + n) * kvd, "assemble_kv cache v")?;
    need_len(table, 2 * n, "assemble_kv table")?;
    need_len(inv_freq, head_dim / 2, "assemble_kv inv_freq")?;
    let shape = [n, kv_heads, head_dim, slot0, interleaved as usize];
    key_turn(step, ASSEMBLE_KV, shape, &[ks, vs, table, inv_freq, kc, vc])
}

/// Store `t` new keys/values (f32 `[t, kv_dim]`) into the f16 cache at `slots[i]`.
#[allow(clippy::too_many_arguments)]
pub fn kv_write(
    step: &mut Step,
    k: &Tensor,
    v: &Tensor,
    t: usize,
    slots: &Tensor,
    kc: &Tensor,
    vc: &Tensor,
    kv_dim: usize,
) -> Result<()> {
    need_len(k, t * kv_dim, "kv_write k")?;
    need_len(v, t * kv_dim, "kv_write v")?;
    need_len(slots, t, "kv_write slots")?;
    need_dtype(kc, DType::F16, "kv_write cache")?;
    let n = t * kv_dim / 2;
    if n == 0 {
        return Ok(());
    }
    step.dispatch(
        KV_WRITE,
        &[t as u32, kv_dim as u32],
        &[k, v, slots, kc, vc],
        grid_1d(n.div_ceil(256) as u32),
    );
    Ok(())
}

/// The attention kernels' segment buffer for `segs` in a cache of `capacity` slots:
/// `capacity` segment ids (0 past `segs`), then for each slot the first slot where its
/// segment id occurs (0 for segment 0), where a document query starts scanning keys.
pub fn segment_words(segs: &[u32], capacity: usize) -> Vec<u32> {
    let mut words = vec![0u32; 2 * capacity];
    let (ids, starts) = words.split_at_mut(capacity);
    sequence_segments(segs, 0, &mut ids[..segs.len()], &mut starts[..segs.len()]);
    words
}

/// The segment ids and starts of one sequence whose slots begin at `base` of a cache
/// that holds several side by side ([`attention_sequences`]): `ids[i] = segs[i]`, and
/// `starts[i]` is `base` plus the first index of `segs[i]` for a document, `base` for
/// segment 0 (a segment-0 query sees its own sequence from its start, nothing below).
pub fn sequence_segments(segs: &[u32], base: u32, ids: &mut [u32], starts: &mut [u32]) {
    ids.copy_from_slice(segs);
    let mut first = std::collections::HashMap::new();
    for (i, &s) in segs.iter().enumerate() {
        starts[i] = if s != 0 {
            base + *first.entry(s).or_insert(i as u32)
        } else {
            base
        };
    }
}

/// The shape checks every attention entry point shares.
#[allow(clippy::too_many_arguments)]
fn check_attention(
    q: &Tensor,
    t: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    qslot: &Tensor,
    seg: &Tensor,
    out: &Tensor,
) -> Result<()> {
    need(heads.is_multiple_of(kv_heads), || {
        format!("attention: {heads} heads not a multiple of {kv_heads} kv heads")
    })?;
    need(head_dim <= 256 && head_dim.is_multiple_of(2), || {
        format!("attention: head_dim {head_dim} must be even and <= 256")
    })?;
    need_len(q, t * heads * head_dim, "attention q")?;
    need_len(out, t * heads * head_dim, "attention out")?;
    need_len(qslot, t, "attention qslot")?;
    need(seg.numel().is_multiple_of(2) && seg.numel() >= 2, || {
        "attention: the segment buffer holds ids then starts (2 x slots)".into()
    })
}

/// Attention of `t` queries (f32 `[t, heads, head_dim]`, in cache slots `qslot`) over the
/// cache with the KVLink segment mask (`seg` per cache slot; all zeros = causal).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    step: &mut Step,
    q: &Tensor,
    t: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    kc: &Tensor,
    vc: &Tensor,
    qslot: &Tensor,
    seg: &Tensor,
    out: &Tensor,
) -> Result<()> {
    check_attention(q, t, heads, kv_heads, head_dim, qslot, seg, out)?;
    if t == 0 {
        return Ok(());
    }
    let cap = seg.numel() / 2;
    let big_wg_memory = step.gpu().limits.max_compute_workgroup_storage_size >= 32 << 10;
    let rows = t * (heads / kv_heads);
    if big_wg_memory && rows <= DECODE_ROWS && decode_kernel(head_dim).is_some() {
        let splits = if step.serial() {
            1
        } else {
            decode_splits(t, heads, cap, head_dim, step.gpu().tuning.decode_splits)
        };
        return decode_attention(
            step, q, t, heads, kv_heads, head_dim, kc, vc, qslot, seg, out, splits,
        );
    }
    if let Some((shape, br, bc)) = coop::flash_usable(step, head_dim) {
        let row_tiles = (t * heads / kv_heads).div_ceil(br);
        let forced = step.gpu().tuning.flash_splits;
        let mut splits = coop::flash_splits(row_tiles, kv_heads, cap, bc, forced);
        // Keep the partials (splits x rows x (head_dim + 4) floats) under 64 MiB.
        while splits > 1 && splits * t * heads * (head_dim + 4) * 4 > 64 << 20 {
            splits = splits.div_ceil(2);
        }
        let bufs = [q, kc, vc, qslot, seg, out];
        return coop::flash(step, shape, t, heads, kv_heads, head_dim, bufs, splits);
    }
    let flash = flash_kernel(head_dim).filter(|_| big_wg_memory);
    if let Some((k, br)) = flash {
        let splits = if step.serial() {
            1
        } else {
            attention_splits(t, heads, kv_heads, cap, head_dim, br, 32)
        };
        return flash_attention(
            step, q, t, heads, kv_heads, head_dim, kc, vc, qslot, seg, out, k, br, splits,
        );
    }
    // Head sizes without a flash variant: one workgroup per (query, head). (A
    // barrier-free one-invocation-per-(query, head) variant gave NaNs on llvmpipe past
    // ~1k keys, so CPU adapters run this one too.)
    row_attention(
        step,
        [q, kc, vc, qslot, seg, out],
        t,
        heads,
        kv_heads,
        head_dim,
    )
}

/// [`attention`] for queries of several sequences that share one cache, each in its own
/// slot range: a segment-0 query sees the slots from its sequence's start
/// ([`sequence_segments`]) to itself, so rows of different requests decode together.
/// One workgroup per (query, head), each scanning only its own keys. (The tiled
/// kernels bound a workgroup's keys by all of its rows and take segment-0 starts as 0:
/// they serve one sequence per cache.)
#[allow(clippy::too_many_arguments)]
pub fn attention_sequences(
    step: &mut Step,
    q: &Tensor,
    t: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    kc: &Tensor,
    vc: &Tensor,
    qslot: &Tensor,
    seg: &Tensor,
    out: &Tensor,
) -> Result<()> {
    check_attention(q, t, heads, kv_heads, head_dim, qslot, seg, out)?;
    if t == 0 {
        return Ok(());
    }
    row_attention(
        step,
        [q, kc, vc, qslot, seg, out],
        t,
        heads,
        kv_heads,
        head_dim,
    )
}

/// attention.wgsl: one workgroup per (query, head).
fn row_attention(
    step: &mut Step,
    bufs: [&Tensor; 6],
    t: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<()> {
    let scale = 1.0 / (head_dim as f32).sqrt();
    let cap = bufs[4].numel() / 2;
    let params = [
        t as u32,
        heads as u32,
        kv_heads as u32,
        head_dim as u32,
        scale.to_bits(),
        u32_of(cap, "attention cache slots")?,
    ];
    let groups = u32_of(t * heads, "attention rows")?;
    step.dispatch(ATTENTION, &params, &bufs, grid_1d(groups));
    Ok(())
}

/// The flash-attention kernel for a head size and its rows per workgroup.
fn flash_kernel(head_dim: usize) -> Option<(Kernel, usize)> {
    match head_dim {
        32 => Some((FLASH_D32, 32)),
        64 => Some((FLASH_D64, 32)),
        128 => Some((FLASH_D128, 16)),
        _ => None,
    }
}

/// Key splits for a GPU. Split z covers the key tiles [z * per, (z + 1) * per) of the
/// cache, fixed by the cache size alone, so a row's result does not depend on the other
/// queries of the batch. Splitting pays when the queries alone leave a large GPU idle
/// (fewer than ~256 workgroups); at most 64 splits. [`flash_attention`] derives the tiles
/// per split from the count.
#[allow(clippy::too_many_arguments)]
fn attention_splits(
    t: usize,
    heads: usize,
    kv_heads: usize,
    cap: usize,
    head_dim: usize,
    br: usize,
    bc: usize,
) -> usize {
    let base = (t * heads / kv_heads).div_ceil(br) * kv_heads;
    let tiles = cap.div_ceil(bc).max(1);
    if base >= 256 || tiles < 4 {
        return 1;
    }
    let mut per = tiles.div_ceil(64).max(2);
    // Keep the partials (splits x rows x (head_dim + 4) floats) under 64 MiB.
    while tiles.div_ceil(per) * t * heads * (head_dim + 4) * 4 > 64 << 20 {
        per *= 2;
    }
    tiles.div_ceil(per)
}

/// Rows per KV head (queries x grouped heads) up to which [`attention`] takes the decode
/// kernel: its limit (RMAX in attention_decode.wgsl). Flash tiles 32 rows (16 at D = 128),
/// so below 16 rows its tile is over half padding; per key and thread flash does 64 FMAs
/// whatever the rows, the decode kernel at 16 rows 32 (D = 64) or 64 (D = 128), fewer
/// with fewer rows; and flash spends 4 barriers and a serial 32-key softmax per 32 keys
/// against the decode kernel's 3 barriers and 4-threads-a-row statistics per 64 keys.
pub const DECODE_ROWS: usize = 16;

/// Keys per chunk of the decode kernel (one per thread).
const DECODE_CHUNK: usize = 64;

/// The decode-attention kernel for a head size.
fn decode_kernel(head_dim: usize) -> Option<Kernel> {
    match head_dim {
        32 => Some(DECODE_D32),
        64 => Some(DECODE_D64),
        128 => Some(DECODE_D128),
        _ => None,
    }
}

/// Key splits of the decode kernel on a GPU: one per chunk of 64 cache slots, at most 64
/// (past 4096 slots a split takes several chunks), fixed by the cache size so a row's
/// result does not depend on the other rows of its batch; fewer where the partials
/// (splits x rows x (head_dim + 4) floats) would pass 64 MiB.
/// `KVLINK_DECODE_SPLITS=N` caps the count (fewer splits: fewer workgroups, and with one
/// split no combine dispatch; for tuning).
fn decode_splits(t: usize, heads: usize, cap: usize, head_dim: usize, max: usize) -> usize {
    let mut splits = cap.div_ceil(DECODE_CHUNK).clamp(1, max.min(64));
    while splits > 1 && splits * t * heads * (head_dim + 4) * 4 > 64 << 20 {
        splits = splits.div_ceil(2);
    }
    splits
}

/// [`attention`] with the decode kernel (at most [`DECODE_ROWS`] rows per KV head; head
/// sizes 32, 64, 128) and an explicit number of key splits (> 1 adds the combine pass).
/// Public so tests can check every split count.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    step: &mut Step,
    q: &Tensor,
    t: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    kc: &Tensor,
    vc: &Tensor,
    qslot: &Tensor,
    seg: &Tensor,
    out: &Tensor,
    splits: usize,
) -> Result<()> {
    let kernel = decode_kernel(head_dim).ok_or_else(|| {
        Error::Input(format!(
            "decode attention: head_dim {head_dim} is not 32, 64 or 128"
        ))
    })?;
    need(heads.is_multiple_of(kv_heads), || {
        format!("decode attention: {heads} heads not a multiple of {kv_heads} kv heads")
    })?;
    let rows = t * (heads / kv_heads);
    need(rows <= DECODE_ROWS, || {
        format!("decode attention: {rows} rows per kv head, at most {DECODE_ROWS}")
    })?;
    need((1..=1024).contains(&splits), || {
        format!("decode attention: {splits} key splits")
    })?;
    need_len(q, t * heads * head_dim, "attention q")?;
    need_len(out, t * heads * head_dim, "attention out")?;
    need_len(qslot, t, "attention qslot")?;
    if t == 0 {
        return Ok(());
    }
    let cap = seg.numel() / 2;
    let per = cap.div_ceil(DECODE_CHUNK).div_ceil(splits).max(1);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let params = [
        t as u32,
        heads as u32,
        kv_heads as u32,
        u32_of(cap, "attention cache slots")?,
        scale.to_bits(),
        splits as u32,
        rows as u32,
        per as u32,
    ];
    let groups = [kv_heads as u32, splits as u32, 1];
    let bufs = [q, kc, vc, qslot, seg, out];
    let span = DECODE_CHUNK * per;
    split_attention(
        step, kernel, &params, groups, bufs, t, heads, head_dim, splits, span,
    )
}

/// [`attention`] with its flash kernel and an explicit number of key splits (> 1 adds
/// a combine pass over a scratch buffer). Public so tests can check every split count.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention(
    step: &mut Step,
    q: &Tensor,
    t: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    kc: &Tensor,
    vc: &Tensor,
    qslot: &Tensor,
    seg: &Tensor,
    out: &Tensor,
    kernel: Kernel,
    br: usize,
    splits: usize,
) -> Result<()> {
    need((1..=1024).contains(&splits), || {
        format!("attention: {splits} key splits")
    })?;
    let cap = seg.numel() / 2;
    let per = cap.div_ceil(32).div_ceil(splits).max(1);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let rows = t * (heads / kv_heads);
    let params = [
        t as u32,
        heads as u32,
        kv_heads as u32,
        cap as u32,
        scale.to_bits(),
        splits as u32,
        u32_of(rows, "attention rows")?,
        per as u32,
    ];
    let groups = [
        u32_of(rows.div_ceil(br), "attention row tiles")?,
        kv_heads as u32,
        splits as u32,
    ];
    let bufs = [q, kc, vc, qslot, seg, out];
    split_attention(
        step,
        kernel,
        &params,
        groups,
        bufs,
        t,
        heads,
        head_dim,
        splits,
        32 * per,
    )
}

/// Dispatch an attention kernel (flash or decode: bindings Q, K, V, query slots,
/// segments, O, partials) over `splits` key splits of `span` cache slots each: with one
/// split it writes O itself; with more it writes partials to a scratch buffer and
/// attention_combine.wgsl merges them into O.
#[allow(clippy::too_many_arguments)]
fn split_attention(
    step: &mut Step,
    kernel: Kernel,
    params: &[u32; 8],
    groups: [u32; 3],
    [q, kc, vc, qslot, seg, out]: [&Tensor; 6],
    t: usize,
    heads: usize,
    head_dim: usize,
    splits: usize,
    span: usize,
) -> Result<()> {
    if splits == 1 {
        let dummy = step.gpu().dummy();
        step.dispatch(
            kernel,
            params,
            &[q, kc, vc, qslot, seg, out, &dummy],
            groups,
        );
        return Ok(());
    }
    let r = t * heads;
    let part = step
        .gpu()
        .scratch("attention splits", splits * r * (head_dim + 4))?;
    step.dispatch(kernel, params, &[q, kc, vc, qslot, seg, out, &part], groups);
    combine_splits(
        step, &part, out, qslot, seg, t, heads, head_dim, splits, span,
    )
}

/// attention_combine.wgsl: merge the key splits (each `span` cache slots) of the
/// attention partials in `part` into `out`.
#[allow(clippy::too_many_arguments)]
fn combine_splits(
    step: &mut Step,
    part: &Tensor,
    out: &Tensor,
    qslot: &Tensor,
    seg: &Tensor,
    t: usize,
    heads: usize,
    head_dim: usize,
    splits: usize,
    span: usize,
) -> Result<()> {
    let (r, d4) = (t * heads, head_dim / 4);
    let params = [
        u32_of(r, "attention rows")?,
        d4 as u32,
        splits as u32,
        u32_of(span, "attention split span")?,
        heads as u32,
        u32_of(seg.numel() / 2, "attention cache slots")?,
    ];
    step.dispatch(
        ATTENTION_COMBINE,
        &params,
        &[part, out, qslot, seg],
        grid_1d(u32_of((r * d4).div_ceil(64), "attention combine")?),
    );
    Ok(())
}

/// Attention mass per group of key slots for query `row` of a batch, per head:
/// `out[out_off + h * n_groups + g]` = softmax weight (KVLink mask as in `attention`)
/// summed over visible keys s with `group[s] == g`. For inspection, not the hot path.
#[allow(clippy::too_many_arguments)]
pub fn attention_mass(
    step: &mut Step,
    q: &Tensor,
    row: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    kc: &Tensor,
    qslot: &Tensor,
    seg: &Tensor,
    group: &Tensor,
    n_groups: usize,
    out: &Tensor,
    out_off: usize,
) -> Result<()> {
    need(n_groups > 0, || "attention_mass: no groups".into())?;
    need_len(q, (row + 1) * heads * head_dim, "attention_mass q")?;
    need_len(qslot, row + 1, "attention_mass qslot")?;
    need_len(out, out_off + heads * n_groups, "attention_mass out")?;
    need(group.numel() * 2 >= seg.numel(), || {
        "attention_mass: group per slot".into()
    })?;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let params = [
        row as u32,
        heads as u32,
        kv_heads as u32,
        head_dim as u32,
        scale.to_bits(),
        (seg.numel() / 2) as u32,
        n_groups as u32,
        out_off as u32,
    ];
    let groups = [heads.div_ceil(32) as u32, 1, 1];
    step.dispatch(
        ATTENTION_MASS,
        &params,
        &[q, kc, qslot, seg, group, out],
        groups,
    );
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
