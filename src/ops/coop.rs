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
use crate::gpu::{CoopShape, Gpu, Kernel, Step, Tensor};
use std::sync::Mutex;

/// A workgroup's layout: `sgm` x `sgn` subgroups, each computing `fm` x `fn_` fragments
/// of T x T outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tile {
    pub sgm: u32,
    pub sgn: u32,
    pub fm: u32,
    pub fn_: u32,
}

impl std::fmt::Display for Tile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}x{}", self.sgm, self.sgn, self.fm, self.fn_)
    }
}

impl std::str::FromStr for Tile {
    type Err = String;
    /// "SGM,SGN,FM,FN" (or with x between them).
    fn from_str(s: &str) -> std::result::Result<Tile, String> {
        let v: Vec<u32> = s
            .split([',', 'x'])
            .map(|x| x.trim().parse::<u32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| format!("tile {s:?}: expected four numbers SGM,SGN,FM,FN"))?;
        match v[..] {
            [sgm, sgn, fm, fn_]
                if (1..=16).contains(&(sgm * sgn)) && (1..=16).contains(&(fm * fn_)) =>
            {
                Ok(Tile { sgm, sgn, fm, fn_ })
            }
            _ => Err(format!(
                "tile {s:?}: expected SGM,SGN,FM,FN with 1..=16 subgroups and 1..=16 fragments each"
            )),
        }
    }
}

impl Tile {
    const WIDE: Tile = Tile {
        sgm: 2,
        sgn: 4,
        fm: 4,
        fn_: 2,
    };
    const SKINNY: Tile = Tile {
        sgm: 1,
        sgn: 8,
        fm: 2,
        fn_: 1,
    };

    /// For many rows: 2 x 4 subgroups of 4 x 2 fragments (128 x 128 outputs at T = 16).
    /// `KVLINK_COOP_WIDE=SGM,SGN,FM,FN` overrides it (tuning on a new GPU).
    pub fn wide() -> Tile {
        Self::from_env("KVLINK_COOP_WIDE", Self::WIDE)
    }

    /// For a few rows: 1 x 8 subgroups of 2 x 1 fragments (32 x 128 outputs at T = 16).
    /// `KVLINK_COOP_SKINNY` overrides it.
    pub fn skinny() -> Tile {
        Self::from_env("KVLINK_COOP_SKINNY", Self::SKINNY)
    }

    fn from_env(var: &'static str, default: Tile) -> Tile {
        static SEEN: Mutex<Vec<(&'static str, Tile)>> = Mutex::new(Vec::new());
        let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, t)) = seen.iter().find(|(v, _)| *v == var) {
            return *t;
        }
        let t = match std::env::var(var) {
            Ok(s) => s.parse().unwrap_or_else(|e| {
                eprintln!("kvlink: ignoring {var}: {e}");
                default
            }),
            Err(_) => default,
        };
        seen.push((var, t));
        t
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
        let bkp = 2 * t + 8;
        let bytes = (self.sgm * self.fm + self.sgn * self.fn_) * t * bkp * 2
            + self.sgm * self.sgn * t * t * 4;
        bytes <= gpu.limits.max_compute_workgroup_storage_size
            && self.sgm * self.sgn * shape.subgroup
                <= gpu.limits.max_compute_invocations_per_workgroup
    }

    /// The tile for a product of `m` rows.
    pub fn for_rows(m: usize, t: u32) -> Tile {
        let skinny = Tile::skinny();
        if m <= skinny.outputs(t).0 {
            skinny
        } else {
            Tile::wide()
        }
    }
}

/// The kernel for `shape` and `tile` (source generated once per process).
pub fn kernel(shape: CoopShape, tile: Tile) -> Kernel {
    static KERNELS: Mutex<Vec<((CoopShape, Tile), Kernel)>> = Mutex::new(Vec::new());
    let mut ks = KERNELS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, k)) = ks.iter().find(|(key, _)| *key == (shape, tile)) {
        return *k;
    }
    let Tile { sgm, sgn, fm, fn_ } = tile;
    let t = shape.t;
    let head = format!(
        "const T: u32 = {t}u;\nconst SG: u32 = {}u;\nconst SGM: u32 = {sgm}u;\n\
         const SGN: u32 = {sgn}u;\nconst FM: u32 = {fm}u;\nconst FN: u32 = {fn_}u;\n",
        shape.subgroup
    );
    // WGSL names the fragment types by size (coop_mat16x16), so the size is spliced in;
    // the enable directives must stay ahead of the constants.
    let body = include_str!("../../shaders/matmul_coop.wgsl").replace("{T}", &t.to_string());
    let (enables, rest): (Vec<&str>, Vec<&str>) =
        body.lines().partition(|l| l.starts_with("enable "));
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let k = Kernel {
        name: leak(format!(
            "matmul_coop.wgsl::matmul_coop t{t} sg{} {tile}",
            shape.subgroup
        )),
        source: leak(format!(
            "{}\n{head}{}\n",
            enables.join("\n"),
            rest.join("\n")
        )),
        entry: "matmul_coop",
    };
    ks.push(((shape, tile), k));
    k
}

/// The default kernels for every adapter shape the engine knows (for validation tests).
pub fn all_kernels() -> Vec<Kernel> {
    let mut v = Vec::new();
    for (t, subgroup) in [(16, 32), (8, 8)] {
        for tile in [Tile::WIDE, Tile::SKINNY] {
            v.push(kernel(CoopShape { t, subgroup }, tile));
        }
    }
    v
}

/// Whether the tensor-core GEMM takes a product: a device with a cooperative-matrix
/// shape (`KVLINK_COOPMAT=off` leaves it out at device creation), the step allowing it,
/// K % 4 == 0 and X rows at a multiple of 4 (vec4 reads), and both tiles fitting the
/// device (an override of their dims may not).
pub fn usable(step: &Step, k: usize, x_off: usize) -> Option<CoopShape> {
    let gpu = step.gpu();
    gpu.coop.filter(|&shape| {
        step.coop()
            && k.is_multiple_of(4)
            && x_off.is_multiple_of(4)
            && Tile::wide().fits(gpu, shape)
            && Tile::skinny().fits(gpu, shape)
    })
}

/// Split-K factor: enough workgroups for a large GPU (~2 per SM of 132) when the tiles
/// alone are fewer, K chunks of at least 256.
fn splits(tiles: usize, k: usize) -> usize {
    if tiles >= 256 {
        return 1;
    }
    512usize.div_ceil(tiles).min(k / 256).clamp(1, 32)
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
    need(k.is_multiple_of(4) && params[3].is_multiple_of(4), || {
        "matmul_coop: K % 4 and x offset % 4 must be 0".into()
    })?;
    let (bm, bn) = tile.outputs(shape.t);
    let gx = u32_of(pn.div_ceil(bn), "matmul_coop column tiles")?;
    let gy = u32_of(m.div_ceil(bm), "matmul_coop row tiles")?;
    need(gx <= 65535 && gy <= 65535, || {
        format!("matmul_coop too large: {m}x{pn}")
    })?;
    let bk = 2 * shape.t as usize;
    let s = splits_override.unwrap_or_else(|| splits(gx as usize * gy as usize, k));
    let kern = kernel(shape, tile);
    if s <= 1 {
        step.dispatch(kern, &gemm_words(params, k, 0), &bufs, [gx, gy, 1]);
        return Ok(());
    }
    let kc = k.div_ceil(s).div_ceil(bk) * bk;
    let s = k.div_ceil(kc);
    super::split_k(step, kern, params, kc, s, [gx, gy], bufs)
}
