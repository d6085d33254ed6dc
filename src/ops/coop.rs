//! The tensor-core GEMM (`shaders/matmul_coop.wgsl`): cooperative-matrix products where
//! the device runs them ([`crate::gpu::CoopShape`]), the portable GEMMs elsewhere.
//!
//! The kernel's tile layout is fixed at compile time: the host prepends the fragment size
//! and the subgroup arrangement ([`Tile`]), so each (shape, tile) is its own pipeline.
//! Two tiles are used: [`Tile::wide`] for many rows (a prompt) and [`Tile::skinny`] for a
//! few (the KVLink question), both with matmul.wgsl's split-K when the tiles alone would
//! leave the GPU idle.

use super::{gemm_words, need, u32_of};
use crate::error::Result;
use crate::gpu::{CoopDiag, CoopShape, Gpu, Kernel, Step, Tensor, Tuning};
use std::sync::Mutex;

pub use crate::gpu::tuning::Tile;

impl Tile {
    /// For many rows: 2 x 2 subgroups of 4 x 4 fragments (128 x 128 outputs at T = 16);
    /// [`crate::gpu::Tuning::coop_wide`] (`KVLINK_COOP_WIDE=SGM,SGN,FM,FN`) overrides it
    /// (tuning on a new GPU).
    pub fn wide(gpu: &Gpu) -> Tile {
        gpu.tuning.coop_wide
    }

    /// For a few rows: 1 x 8 subgroups of 2 x 1 fragments (32 x 128 outputs at T = 16);
    /// [`crate::gpu::Tuning::coop_skinny`] (`KVLINK_COOP_SKINNY`) overrides it.
    pub fn skinny(gpu: &Gpu) -> Tile {
        gpu.tuning.coop_skinny
    }

    /// Rows and columns of Y per workgroup at fragment size `t`.
    pub fn outputs(self, t: u32) -> (usize, usize) {
        (
            (self.sgm * self.fm * t) as usize,
            (self.sgn * self.fn_ * t) as usize,
        )
    }

    /// Whether the kernel fits the device: workgroup memory (both staged tiles with
    /// their row pad, plus a T x T f32 patch per subgroup) and invocations.
    pub fn fits(self, gpu: &Gpu, shape: CoopShape) -> bool {
        let t = shape.t;
        let bkp = self.kf * t + 8;
        let b_rows = if self.b_direct {
            0
        } else {
            self.sgn * self.fn_
        };
        let bytes = (self.sgm * self.fm + b_rows) * t * bkp * 2 + self.sgm * self.sgn * t * t * 4;
        bytes <= gpu.limits.max_compute_workgroup_storage_size
            && self.sgm * self.sgn * shape.subgroup
                <= gpu.limits.max_compute_invocations_per_workgroup
    }

    /// A product of `m` rows is few enough for the skinny tile.
    pub fn few_rows(gpu: &Gpu, m: usize, t: u32) -> bool {
        m <= Tile::skinny(gpu).outputs(t).0
    }

    /// The tile for a product of `m` rows.
    pub fn for_rows(gpu: &Gpu, m: usize, t: u32) -> Tile {
        if Tile::few_rows(gpu, m, t) {
            Tile::skinny(gpu)
        } else {
            Tile::wide(gpu)
        }
    }
}

/// The kernel for `shape` and `tile` (source generated once per process); `diag`
/// ([`crate::gpu::Tuning::coop_diag`]) makes the diagnostic variants.
pub fn kernel(shape: CoopShape, tile: Tile, diag: CoopDiag) -> Kernel {
    type Key = (CoopShape, Tile, CoopDiag);
    static KERNELS: Mutex<Vec<(Key, Kernel)>> = Mutex::new(Vec::new());
    Kernel::generated(&KERNELS, (shape, tile, diag), "matmul_coop", || {
        let d = match diag {
            CoopDiag::Off => "",
            CoopDiag::Compute => " diag-compute",
            CoopDiag::Load => " diag-load",
        };
        let name = format!(
            "matmul_coop.wgsl::matmul_coop t{} sg{} {tile}{d}",
            shape.t, shape.subgroup
        );
        (name, source(shape, tile, diag))
    })
}

/// matmul_coop.wgsl with its constants and its `//@` lines expanded (see the shader).
fn source(shape: CoopShape, tile: Tile, diag: CoopDiag) -> String {
    let Tile {
        sgm,
        sgn,
        fm,
        fn_,
        b_direct,
        vec_tiles,
        kf,
    } = tile;
    let (t, sg) = (shape.t, shape.subgroup);
    // Diagnostics (wrong results): `Compute` stages only the first K step's tiles (times
    // the tensor-core loop alone), `Load` skips the products.
    let wg = sgm * sgn * sg;
    let bk = kf * t;
    // vec4 loads per invocation per K step (the last may be partly idle).
    let nxv = (sgm * fm * t * bk / 4).div_ceil(wg);
    let nwv = if b_direct {
        0
    } else {
        (sgn * fn_ * t * bk / 8).div_ceil(wg)
    };
    let mut skip = false;
    let mat = format!("coop_mat{t}x{t}");
    let frags = || (0..fm).flat_map(move |i| (0..fn_).map(move |j| (i, j)));
    let head = format!(
        "const T: u32 = {t}u;\nconst SG: u32 = {sg}u;\nconst SGM: u32 = {sgm}u;\n\
         const SGN: u32 = {sgn}u;\nconst FM: u32 = {fm}u;\nconst FN: u32 = {fn_}u;\n\
         const KF: u32 = {kf}u;\n"
    );
    let template = include_str!("../../shaders/matmul_coop.wgsl");
    expand(template, t, head, |line| {
        match line.trim() {
            "//@ begin w staging" => skip = b_direct,
            "//@ end w staging" => skip = false,
            _ => {}
        }
        if skip {
            return String::new();
        }
        match line.trim() {
            "//@ begin w staging" | "//@ end w staging" => String::new(),
            "//@ w binding" if b_direct => "@group(0) @binding(2) var<storage, read> W: array<f16>;\n".into(),
            "//@ w binding" => "@group(0) @binding(2) var<storage, read> W: array<vec4<u32>>;\n".into(),
            "//@ tiles" => tiles_decl(b_direct, vec_tiles),
            "//@ acc" => frags()
                .map(|(i, j)| format!("    var c{i}{j} = {mat}<f32, C>();\n"))
                .collect(),
            "//@ load_next" if diag == CoopDiag::Compute => String::new(),
            "//@ load_init" | "//@ load_next" => {
                let (decl, k0) = if line.trim() == "//@ load_init" {
                    ("var ", "kb")
                } else {
                    ("", "k0 + BK")
                };
                let mut c = String::new();
                for i in 0..nxv {
                    c += &format!("    {decl}xv{i} = load_x(li + {}u, m_base, {k0}, ke);\n", i * wg);
                }
                for i in 0..nwv {
                    c += &format!("    {decl}wv{i} = load_w(li + {}u, n_base, {k0}, ke);\n", i * wg);
                }
                c
            }
            "//@ store" => {
                let mut c = String::new();
                if diag == CoopDiag::Compute {
                    c += "        if (k0 == kb) {\n";
                }
                for i in 0..nxv {
                    c += &format!("        store_x(li + {}u, xv{i});\n", i * wg);
                }
                for i in 0..nwv {
                    c += &format!("        store_w(li + {}u, wv{i});\n", i * wg);
                }
                if diag == CoopDiag::Compute {
                    c += "        }\n";
                }
                c
            }
            "//@ compute" if diag == CoopDiag::Load => String::new(),
            "//@ compute" => {
                let mut c = String::new();
                for kk in (0..kf).map(|f| f * t) {
                    c += "        {\n";
                    for j in 0..fn_ {
                        c += &if b_direct {
                            format!(
                                "            let b{j} = coopLoad<{mat}<f16, B>>(&W[wbg + {}u * p.K + k0 + {kk}u], p.K);\n",
                                j * t
                            )
                        } else {
                            let (o, st) = smem(vec_tiles, "wb", j * t * (bk + 8) + kk);
                            format!("            let b{j} = coopLoad<{mat}<f16, B>>(&ws[{o}], {st});\n")
                        };
                    }
                    for i in 0..fm {
                        let (o, st) = smem(vec_tiles, "xa", i * t * (bk + 8) + kk);
                        c += &format!("            let a{i} = coopLoadT<{mat}<f16, A>>(&xs[{o}], {st});\n");
                        for j in 0..fn_ {
                            c += &format!("            c{i}{j} = coopMultiplyAdd(a{i}, b{j}, c{i}{j});\n");
                        }
                    }
                    c += "        }\n";
                }
                c
            }
            "//@ epilogue" => frags()
                .map(|(i, j)| {
                    format!(
                        "    coopStoreT(c{i}{j}, &cs[pat], T);\n    workgroupBarrier();\n    \
                         store_patch(pat, lane, r0 + {}u, c0 + {}u, wg.z);\n    workgroupBarrier();\n",
                        i * t,
                        j * t
                    )
                })
                .collect(),
            l if l.starts_with("//@") => panic!("matmul_coop.wgsl: unknown directive {l}"),
            _ => format!("{line}\n"),
        }
    })
}

/// The workgroup tiles and their store helpers (see matmul_coop.wgsl).
fn tiles_decl(b_direct: bool, vec_tiles: bool) -> String {
    let mut c = String::new();
    if vec_tiles {
        c += "var<workgroup> xs: array<vec4<f16>, BM * BKP / 4u>;\n";
        c += "fn put_x4(o: u32, h: vec4<f16>) { xs[o / 4u] = h; }\n";
        if !b_direct {
            c += "var<workgroup> ws: array<vec4<f16>, BN * BKP / 4u>;\n";
            c += "fn put_w8(o: u32, a: vec4<f16>, b: vec4<f16>) { ws[o / 4u] = a; ws[o / 4u + 1u] = b; }\n";
        }
    } else {
        c += "var<workgroup> xs: array<f16, BM * BKP>;\n";
        c += "fn put_x4(o: u32, h: vec4<f16>) {\n";
        for (i, f) in ["x", "y", "z", "w"].iter().enumerate() {
            c += &format!("    xs[o + {i}u] = h.{f};\n");
        }
        c += "}\n";
        if !b_direct {
            c += "var<workgroup> ws: array<f16, BN * BKP>;\n";
            c += "fn put_w8(o: u32, a: vec4<f16>, b: vec4<f16>) {\n";
            for (i, f) in ["x", "y", "z", "w"].iter().enumerate() {
                c += &format!(
                    "    ws[o + {i}u] = a.{f};\n    ws[o + {}u] = b.{f};\n",
                    i + 4
                );
            }
            c += "}\n";
        }
    }
    c
}

/// A fragment's address in a workgroup tile, base variable `var` plus `off` halves, and
/// the row stride: in halves, or in vec4s for vector tiles.
fn smem(vec_tiles: bool, var: &str, off: u32) -> (String, &'static str) {
    if vec_tiles {
        (format!("({var} + {off}u) / 4u"), "BKP / 4u")
    } else {
        (format!("{var} + {off}u"), "BKP")
    }
}

/// The default kernels for every adapter shape the engine knows (for validation tests).
pub fn all_kernels() -> Vec<Kernel> {
    let mut v = Vec::new();
    for (t, subgroup) in [(16, 32), (8, 8)] {
        let shape = CoopShape { t, subgroup };
        for tile in [Tile::WIDE, Tile::SKINNY] {
            v.push(kernel(shape, tile, CoopDiag::Off));
        }
        let tuning = crate::gpu::Tuning::default();
        v.extend(
            [32, 64, 128]
                .iter()
                .filter_map(|&d| flash_kernel(shape, d, &tuning)),
        );
    }
    v
}

/// Whether the tensor-core GEMM takes a product: a device with a cooperative-matrix
/// shape (`Tuning::coopmat` off leaves it out at device creation), the step allowing it,
/// K % 8 == 0 (W read 8 halves at a time) and X rows at a multiple of 4 (vec4 reads), and
/// both tiles fitting the device (an override of their dims may not).
pub fn usable(step: &Step, k: usize, x_off: usize) -> Option<CoopShape> {
    let gpu = step.gpu();
    gpu.coop.filter(|&shape| {
        step.coop()
            && k.is_multiple_of(8)
            && x_off.is_multiple_of(4)
            && Tile::wide(gpu).fits(gpu, shape)
            && Tile::skinny(gpu).fits(gpu, shape)
    })
}

/// Split-K factor: enough workgroups for a large GPU when the tiles alone are fewer, K
/// chunks of at least 256, at most `max` ([`crate::gpu::Tuning::coop_splits`]). `target`
/// workgroups: 512 for the wide tile (~4 per SM of 132); 128 for the skinny tile of a few
/// rows, whose 8-subgroup workgroups fill an SM sooner and whose partials the reduction
/// reads again (`kvlink bench kernels --rows 32 --splits`, H100, 1B shapes: the down
/// projection 37 us with 8 splits against 45-57 with 32, gate/up 51-60 us unsplit against
/// 74-81 with 4).
fn splits(tiles: usize, k: usize, max: usize, target: usize) -> usize {
    if tiles >= target / 2 {
        return 1;
    }
    target.div_ceil(tiles).min(k / 256).clamp(1, max.max(1))
}

/// `Y (+)= X W^T (+ bias)` on cooperative matrices with matmul.wgsl's 8 parameter words
/// (`params`) and bindings; `splits_override` None picks the split-K factor.
pub fn matmul(
    step: &mut Step,
    shape: CoopShape,
    tile: Tile,
    params: &[u32; 8],
    splits_override: Option<usize>,
    bufs: [&Tensor; 4],
) -> Result<()> {
    let [m, pn, k] = [params[0] as usize, params[1] as usize, params[2] as usize];
    need(k.is_multiple_of(8) && params[3].is_multiple_of(4), || {
        "matmul_coop: K % 8 and x offset % 4 must be 0".into()
    })?;
    let (bm, bn) = tile.outputs(shape.t);
    let bk = (tile.kf * shape.t) as usize;
    // Direct B loads read whole fragments of W: every tile inside N, whole K steps.
    let tile = Tile {
        b_direct: tile.b_direct && pn.is_multiple_of(bn) && k.is_multiple_of(bk),
        ..tile
    };
    let gx = u32_of(pn.div_ceil(bn), "matmul_coop column tiles")?;
    let gy = u32_of(m.div_ceil(bm), "matmul_coop row tiles")?;
    need(gx <= 65535 && gy <= 65535, || {
        format!("matmul_coop too large: {m}x{pn}")
    })?;
    let gpu = step.gpu();
    let target = if Tile::few_rows(gpu, m, shape.t) {
        128
    } else {
        512
    };
    let max = gpu.tuning.coop_splits;
    let s = splits_override.unwrap_or_else(|| splits(gx as usize * gy as usize, k, max, target));
    let kern = kernel(shape, tile, gpu.tuning.coop_diag);
    if s <= 1 {
        step.dispatch(kern, &gemm_words(params, k, 0), &bufs, [gx, gy, 1]);
        return Ok(());
    }
    let kc = k.div_ceil(s).div_ceil(bk) * bk;
    let s = k.div_ceil(kc);
    super::split_k(step, kern, params, kc, s, [gx, gy], bufs)
}

/// The tensor-core flash attention's layout for a head size: (subgroups, keys per tile
/// in fragments). Each subgroup owns T rows; D = 128 takes 2 subgroups and 2-fragment
/// key tiles so its tiles fit 48 KiB (and lavapipe's 32 KiB at T = 8).
/// [`crate::gpu::Tuning::flash_layout`] (`KVLINK_FLASH_LAYOUT=NSG,BCF`) overrides it
/// (tuning; checked against the limits).
fn flash_layout(d: usize, tuning: &Tuning) -> Option<(u32, u32)> {
    match d {
        32 | 64 => Some(tuning.flash_layout.unwrap_or((4, 4))),
        128 => Some(tuning.flash_layout.unwrap_or((2, 2))),
        _ => None,
    }
}

/// Key splits of the tensor-core flash attention: a workgroup's fixed work (staging Q,
/// finding its keys) wants several key tiles per split, the GPU ~256 workgroups in all
/// (2 per SM of a 132-SM H200: 16 splits of a 32 x 10240 KVLink question took 101 us
/// against 160 us with 64 splits); so splits give at least 8 tiles each and stop once
/// the grid reaches ~256 workgroups.
/// Fixed by the cache size and the row tiles, not by which rows share a workgroup.
/// `forced` ([`crate::gpu::Tuning::flash_splits`], `KVLINK_FLASH_SPLITS=N`) forces N
/// (tuning).
pub fn flash_splits(
    row_tiles: usize,
    kv_heads: usize,
    cap: usize,
    bc: usize,
    forced: Option<usize>,
) -> usize {
    let tiles = cap.div_ceil(bc).max(1);
    let base = (row_tiles * kv_heads).max(1);
    let splits = forced.unwrap_or_else(|| 256usize.div_ceil(base).min(tiles / 8).clamp(1, 64));
    splits.min(tiles)
}

/// Rows per workgroup and keys per tile of the tensor-core flash attention, if it runs
/// head size `d` on this device.
/// [`crate::gpu::Tuning::coop_flash`] off (`KVLINK_COOP_FLASH=off`) keeps attention on
/// the portable kernels.
pub fn flash_usable(step: &Step, d: usize) -> Option<(CoopShape, usize, usize)> {
    let gpu = step.gpu();
    if !gpu.tuning.coop_flash {
        return None;
    }
    let shape = gpu.coop.filter(|_| step.coop())?;
    let (nsg, bcf) = flash_layout(d, &gpu.tuning)?;
    let (t, d32) = (shape.t, d as u32);
    if d32 % t != 0 || shape.subgroup % t != 0 || shape.subgroup / t > 4 {
        return None;
    }
    let (br, bc) = (nsg * t, bcf * t);
    let dp = d32 + 8;
    let bytes =
        br.max(bc) * dp * 2 + bc * dp * 2 + nsg * t * bc.max(d32) * 4 + nsg * t * (bc + 8) * 2;
    let fits = bytes <= gpu.limits.max_compute_workgroup_storage_size
        && nsg * shape.subgroup <= gpu.limits.max_compute_invocations_per_workgroup;
    fits.then_some((shape, br as usize, bc as usize))
}

/// The tensor-core flash-attention kernel for a shape and head size.
pub fn flash_kernel(shape: CoopShape, d: usize, tuning: &Tuning) -> Option<Kernel> {
    type Key = (CoopShape, usize, (u32, u32), bool);
    static KERNELS: Mutex<Vec<(Key, Kernel)>> = Mutex::new(Vec::new());
    let (nsg, bcf) = flash_layout(d, tuning)?;
    let vec_tiles = tuning.flash_vec_tiles;
    Some(Kernel::generated(
        &KERNELS,
        (shape, d, (nsg, bcf), vec_tiles),
        "flash_coop",
        || {
            let name = format!(
                "flash_coop.wgsl::flash_coop t{} sg{} d{d} l{nsg},{bcf}{}",
                shape.t,
                shape.subgroup,
                if vec_tiles { "" } else { " b" }
            );
            let src = flash_source(shape, d as u32, nsg, bcf * shape.t, vec_tiles);
            (name, src)
        },
    ))
}

/// flash_coop.wgsl with its constants and `//@` lines expanded (see the shader).
/// Without `vec_tiles` ([`crate::gpu::Tuning::flash_vec_tiles`], `KVLINK_FLASH_VARIANT=b`:
/// diagnostics on a new driver) it stages K/V in scalar f16 tiles instead of vec4<f16>.
fn flash_source(shape: CoopShape, d: u32, nsg: u32, bc: u32, vec_tiles: bool) -> String {
    let (t, sg) = (shape.t, shape.subgroup);
    let wg = nsg * sg;
    let lpr = sg / t;
    let mat = format!("coop_mat{t}x{t}");
    let nkv = (bc * d / 8).div_ceil(wg); // vec4<u32> of K (and of V) per invocation
    let dl4 = d / lpr / 4; // vec4 of output per lane
    let dp = d + 8;
    // A fragment in a K/V/Q tile: (pointer, stride) for the element at half offset `off`.
    let kv = |tile: &str, off: String| -> String {
        if vec_tiles {
            format!("&{tile}[({off}) / 4u], DP / 4u")
        } else {
            format!("&{tile}[{off}], DP")
        }
    };
    let head = format!(
        "const T: u32 = {t}u;\nconst SG: u32 = {sg}u;\nconst NSG: u32 = {nsg}u;\n\
         const D: u32 = {d}u;\nconst BC: u32 = {bc}u;\n"
    );
    // Combine a row's LPR lanes (adjacent lanes) by subgroup shuffles: `max` or `+`.
    let combine = |var: &str, max: bool| -> String {
        let mut c = String::new();
        let mut off = 1;
        while off < lpr {
            let other = format!("subgroupShuffleXor({var}, {off}u)");
            c += &if max {
                format!("        {var} = max({var}, {other});\n")
            } else {
                format!("        {var} += {other};\n")
            };
            off *= 2;
        }
        c
    };
    // `var name` = a sum of products, the first one added to the zero fragment `zc`.
    let mma_sum = |name: &str, prods: Vec<(String, String)>| -> String {
        let mut c = String::new();
        for (i, (a, b)) in prods.iter().enumerate() {
            c += &if i == 0 {
                format!("        var {name} = coopMultiplyAdd({a}, {b}, zc);\n")
            } else {
                format!("        {name} = coopMultiplyAdd({a}, {b}, {name});\n")
            };
        }
        c
    };
    let template = include_str!("../../shaders/flash_coop.wgsl");
    expand(template, t, head, |line| {
        match line.trim() {
            "//@ kv tiles" => {
                let mut c = String::new();
                for (tile, rows) in [("ks", "QR"), ("vs", "BC")] {
                    let put = if tile == "ks" { "put_k4" } else { "put_v4" };
                    if vec_tiles {
                        c += &format!("var<workgroup> {tile}: array<vec4<f16>, {rows} * DP / 4u>;\n");
                        c += &format!("fn {put}(o: u32, h: vec4<f16>) {{ {tile}[o / 4u] = h; }}\n");
                    } else {
                        c += &format!("var<workgroup> {tile}: array<f16, {rows} * DP>;\n");
                        c += &format!(
                            "fn {put}(o: u32, h: vec4<f16>) {{ {tile}[o] = h.x; {tile}[o + 1u] = h.y; \
                             {tile}[o + 2u] = h.z; {tile}[o + 3u] = h.w; }}\n"
                        );
                    }
                }
                c
            }
            "//@ qfrags" => (0..d / t)
                .map(|i| {
                    format!(
                        "    let q{i} = coopLoadT<{mat}<f16, A>>({});\n",
                        kv("ks", format!("qa + {}u", i * t))
                    )
                })
                .collect(),
            "//@ oacc" => (0..dl4)
                .map(|i| format!("    var oa{i} = vec4<f32>(0.0);\n"))
                .collect(),
            "//@ prefetch_init" | "//@ prefetch_next" => {
                let (decl, tile) = if line.trim() == "//@ prefetch_init" {
                    ("var ", "tile0")
                } else {
                    ("", "tile + 1u")
                };
                (0..nkv)
                    .map(|i| {
                        format!(
                            "    {decl}kr{i} = load_kv(0u, li + {o}u, {tile}, kvh);\n    \
                             {decl}vr{i} = load_kv(1u, li + {o}u, {tile}, kvh);\n",
                            o = i * wg
                        )
                    })
                    .collect()
            }
            "//@ store" => (0..nkv)
                .map(|i| {
                    format!(
                        "        store_kv(0u, li + {o}u, kr{i});\n        store_kv(1u, li + {o}u, vr{i});\n",
                        o = i * wg
                    )
                })
                .collect(),
            "//@ scores" => {
                let mut c = String::new();
                for j in 0..bc / t {
                    let prods = (0..d / t)
                        .map(|i| {
                            let b = format!("coopLoad<{mat}<f16, B>>({})", kv("ks", format!("{}u", j * t * dp + i * t)));
                            (format!("q{i}"), b)
                        })
                        .collect();
                    c += &mma_sum(&format!("s{j}"), prods);
                    c += &format!("        coopStoreT(s{j}, &ss[sp + {}u], SP);\n", j * t);
                }
                c
            }
            "//@ softmax" => {
                let kl = bc / lpr;
                let mut c = String::new();
                for j in 0..kl {
                    c += &format!("        var v{j} = ss[rs + k0 + {j}u];\n");
                }
                c += "        if (!all_vis) {\n";
                for j in 0..kl {
                    c += &format!(
                        "            v{j} = select(NEG, v{j}, sg != NONE && key0 + {j}u <= ts && (sg == 0u || seg[key0 + {j}u] == sg));\n"
                    );
                }
                c += "        }\n";
                // Max as a tree over the registers.
                let mut level: Vec<String> = (0..kl).map(|j| format!("v{j}")).collect();
                let mut n = 0;
                while level.len() > 1 {
                    let mut next = Vec::new();
                    for pair in level.chunks(2) {
                        if let [a, b] = pair {
                            c += &format!("        let mx{n} = max({a}, {b});\n");
                            next.push(format!("mx{n}"));
                            n += 1;
                        } else {
                            next.push(pair[0].clone());
                        }
                    }
                    level = next;
                }
                c += &format!("        var mx = {};\n", level[0]);
                c += &combine("mx", true);
                c += "        let m_new = max(m, mx);\n        var sum = 0.0;\n";
                for j in 0..kl {
                    c += &format!(
                        "        let e{j} = select(f16(0.0), f16(exp(v{j} - m_new)), v{j} > -1.0e38);\n        \
                         ps[rp + k0 + {j}u] = e{j};\n        sum += f32(e{j});\n"
                    );
                }
                c += &combine("sum", false);
                c
            }
            "//@ pv" => {
                let mut c = String::new();
                for j in 0..d / t {
                    let prods = (0..bc / t)
                        .map(|k| {
                            let a = format!("coopLoadT<{mat}<f16, A>>(&ps[pp + {}u], BCP)", k * t);
                            let b = format!("coopLoadT<{mat}<f16, B>>({})", kv("vs", format!("{}u", k * t * dp + j * t)));
                            (a, b)
                        })
                        .collect();
                    c += &mma_sum(&format!("o{j}"), prods);
                    c += &format!("        coopStoreT(o{j}, &ss[sp + {}u], SP);\n", j * t);
                }
                c
            }
            "//@ fold" => (0..dl4)
                .map(|i| {
                    let b = format!("rs + hl * DL + {}u", 4 * i);
                    format!(
                        "        oa{i} = oa{i} * alpha + vec4<f32>(ss[{b}], ss[{b} + 1u], ss[{b} + 2u], ss[{b} + 3u]);\n"
                    )
                })
                .collect(),
            "//@ out_o" => (0..dl4)
                .map(|i| format!("            O[ob + {i}u] = oa{i} * inv;\n"))
                .collect(),
            "//@ out_part" => (0..dl4)
                .map(|i| format!("            part[pb + {i}u] = oa{i};\n"))
                .collect(),
            l if l.starts_with("//@") => panic!("flash_coop.wgsl: unknown directive {l}"),
            _ => format!("{line}\n"),
        }
    })
}

/// Expand a kernel template: each line (with `{T}` replaced by the fragment size `t`)
/// becomes what `line_code` makes of it (the `//@` directives become code), the `enable`
/// directives first, then `head` (the host's constants), then the rest.
fn expand(
    template: &str,
    t: u32,
    head: String,
    mut line_code: impl FnMut(&str) -> String,
) -> String {
    let (mut enables, mut body) = (String::new(), head);
    for line in template.lines() {
        let line = line.replace("{T}", &t.to_string());
        let code = line_code(&line);
        if line.starts_with("enable ") {
            enables += &code;
        } else {
            body += &code;
        }
    }
    enables + &body
}

/// [`super::attention`] on the tensor-core flash kernel (callers check [`flash_usable`])
/// with an explicit number of key splits (> 1 adds the combine pass). Bindings as
/// flash_attention.wgsl: Q, K cache, V cache, query slots, segments, O.
pub fn flash(step: &mut Step, shape: CoopShape, a: &super::Attn, splits: usize) -> Result<()> {
    let head_dim = a.head_dim;
    let (_, br, bc) = flash_usable(step, head_dim).ok_or_else(|| {
        crate::Error::Input(format!(
            "tensor-core attention cannot take head_dim {head_dim}"
        ))
    })?;
    let kern = flash_kernel(shape, head_dim, &step.gpu().tuning)
        .expect("flash_usable checked the head size");
    super::tiled_attention(step, a, kern, br, bc, splits)
}
