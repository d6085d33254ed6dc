//! One Rust function per kernel: checks shapes, binds, records the dispatch into a
//! [`crate::gpu::Step`]. Shape errors that user input can cause come back as `Error::Input`.

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Kernel, Tensor};

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

mod attention;
mod elementwise;
mod matmul;
mod position;
use attention::tiled_attention;
pub use attention::*;
pub use elementwise::*;
pub use matmul::*;
use matmul::{gemm_words, split_k};
pub use position::*;
