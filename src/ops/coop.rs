//! The tensor-core GEMM (`shaders/matmul_coop.wgsl`): cooperative-matrix products where
//! the device runs them ([`crate::gpu::CoopShape`]), the portable GEMMs elsewhere.
//!
//! The kernel's tile layout is fixed at compile time: the host prepends the fragment size
//! and the subgroup arrangement, so each (shape, layout) is its own pipeline. Two layouts:
//! `Wide` for many rows (a prompt), `Skinny` for a few (the KVLink question), both with
//! matmul.wgsl's split-K when the tiles alone would leave the GPU idle.

use super::{gemm_words, need, u32_of};
use crate::error::Result;
use crate::gpu::{CoopShape, Kernel, Step, Tensor};
use std::sync::Mutex;

/// A tile layout: subgroups along M and N, fragments per subgroup along M and N.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// 2 x 4 subgroups of 4 x 2 fragments: 128 x 128 outputs at T = 16.
    Wide,
    /// 1 x 8 subgroups of 2 x 1 fragments: 32 x 128 outputs at T = 16.
    Skinny,
}

impl Layout {
    /// (SGM, SGN, FM, FN).
    fn dims(self) -> (u32, u32, u32, u32) {
        match self {
            Layout::Wide => (2, 4, 4, 2),
            Layout::Skinny => (1, 8, 2, 1),
        }
    }

    /// Rows and columns of Y per workgroup at fragment size `t`.
    pub fn tile(self, t: u32) -> (usize, usize) {
        let (sgm, sgn, fm, fn_) = self.dims();
        ((sgm * fm * t) as usize, (sgn * fn_ * t) as usize)
    }

    /// The layout for a product of `m` rows.
    pub fn for_rows(m: usize, t: u32) -> Layout {
        if m <= Layout::Skinny.tile(t).0 {
            Layout::Skinny
        } else {
            Layout::Wide
        }
    }
}

/// The kernel for `shape` and `layout` (compiled source generated once per process).
pub fn kernel(shape: CoopShape, layout: Layout) -> Kernel {
    static KERNELS: Mutex<Vec<((CoopShape, Layout), Kernel)>> = Mutex::new(Vec::new());
    let mut ks = KERNELS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, k)) = ks.iter().find(|(key, _)| *key == (shape, layout)) {
        return *k;
    }
    let (sgm, sgn, fm, fn_) = layout.dims();
    let t = shape.t;
    let head = format!(
        "const T: u32 = {t}u;\nconst SG: u32 = {}u;\nconst SGM: u32 = {sgm}u;\n\
         const SGN: u32 = {sgn}u;\nconst FM: u32 = {fm}u;\nconst FN: u32 = {fn_}u;\n",
        shape.subgroup
    );
    // WGSL names the fragment types by size (coop_mat16x16), so the size is spliced in.
    let body = include_str!("../../shaders/matmul_coop.wgsl").replace("{T}", &t.to_string());
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    // The enable directives must come first, before the constants.
    let (enables, rest) = split_enables(&body);
    let k = Kernel {
        name: leak(format!(
            "matmul_coop.wgsl::matmul_coop t{t} sg{} {layout:?}",
            shape.subgroup
        )),
        source: leak(format!("{enables}{head}{rest}")),
        entry: "matmul_coop",
    };
    ks.push(((shape, layout), k));
    k
}

/// The leading `enable ...;` lines of a WGSL source, and the rest.
fn split_enables(src: &str) -> (String, String) {
    let (mut en, mut rest) = (String::new(), String::new());
    for line in src.lines() {
        if line.starts_with("enable ") {
            en.push_str(line);
            en.push('\n');
        } else {
            rest.push_str(line);
            rest.push('\n');
        }
    }
    (en, rest)
}

/// Every kernel variant the adapter shapes can ask for (for validation tests).
pub fn all_kernels() -> Vec<Kernel> {
    let mut v = Vec::new();
    for (t, subgroup) in [(16, 32), (8, 8)] {
        for layout in [Layout::Wide, Layout::Skinny] {
            v.push(kernel(CoopShape { t, subgroup }, layout));
        }
    }
    v
}

/// Whether the tensor-core GEMM can take a product: a device with a cooperative-matrix
/// shape, K % 4 == 0 and X rows at a multiple of 4 (vec4 reads). `KVLINK_COOPMAT=off`
/// keeps it off at device creation.
pub fn usable(step: &Step, k: usize, x_off: usize) -> Option<CoopShape> {
    step.gpu()
        .coop
        .filter(|_| step.coop() && k.is_multiple_of(4) && x_off.is_multiple_of(4))
}

/// Split-K factor: enough workgroups for a large GPU (~2 per SM of 132) when the tiles
/// alone are fewer, K chunks of at least 256 (whole BK steps).
fn splits(tiles: usize, k: usize) -> usize {
    if tiles >= 256 {
        return 1;
    }
    512usize.div_ceil(tiles).min(k / 256).clamp(1, 32)
}

/// `Y (+)= X W^T (+ bias)` on cooperative matrices with matmul.wgsl's 8 parameter words
/// (`params`) and bindings; `splits` None picks the split-K factor. Public for tests.
pub fn matmul(
    step: &mut Step,
    shape: CoopShape,
    layout: Layout,
    params: &[u32; 8],
    splits_override: Option<usize>,
    bufs: [&Tensor; 4],
) -> Result<()> {
    let [m, pn, k] = [params[0] as usize, params[1] as usize, params[2] as usize];
    need(k.is_multiple_of(4) && params[3].is_multiple_of(4), || {
        "matmul_coop: K % 4 and x offset % 4 must be 0".into()
    })?;
    let (bm, bn) = layout.tile(shape.t);
    let gx = u32_of(pn.div_ceil(bn), "matmul_coop column tiles")?;
    let gy = u32_of(m.div_ceil(bm), "matmul_coop row tiles")?;
    need(gx <= 65535 && gy <= 65535, || {
        format!("matmul_coop too large: {m}x{pn}")
    })?;
    let bk = 2 * shape.t as usize;
    let s = splits_override.unwrap_or_else(|| splits(gx as usize * gy as usize, k));
    let kern = kernel(shape, layout);
    if s <= 1 {
        step.dispatch(kern, &gemm_words(params, k, 0), &bufs, [gx, gy, 1]);
        return Ok(());
    }
    let kc = k.div_ceil(s).div_ceil(bk) * bk;
    let s = k.div_ceil(kc);
    super::split_k(step, kern, params, kc, s, [gx, gy], bufs)
}
