//! A GPU tensor: a buffer region with a shape and a dtype.

use super::Gpu;
use crate::error::{Error, Result};
use std::sync::Arc;
use wgpu::util::DeviceExt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    /// f16, two per 32-bit word (little-endian: element 2i in the low half). Readable
    /// with `unpack2x16float` on any adapter, or as `vec2<f16>` with `shader-f16`.
    F16,
    U32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 => 2,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Tensor {
    pub buf: Arc<wgpu::Buffer>,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl Tensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes the elements occupy, rounded up to whole 32-bit words.
    pub fn byte_len(&self) -> u64 {
        ((self.numel() * self.dtype.size()) as u64).div_ceil(4) * 4
    }

    fn check_size(gpu: &Gpu, bytes: u64, what: &str) -> Result<()> {
        if bytes > gpu.max_buffer_bytes() {
            return Err(Error::Gpu(format!(
                "{what}: {bytes} bytes exceeds the adapter's largest storage binding ({} bytes)",
                gpu.max_buffer_bytes()
            )));
        }
        Ok(())
    }

    /// A zero-filled tensor.
    pub fn zeros(gpu: &Gpu, shape: &[usize], dtype: DType, label: &str) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let bytes = (((n * dtype.size()) as u64).div_ceil(4) * 4).max(4);
        Self::check_size(gpu, bytes, label)?;
        let buf = gpu.allocating(label, bytes, || {
            gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage: USAGE,
                mapped_at_creation: false,
            })
        })?;
        Ok(Tensor {
            buf: Arc::new(buf),
            shape: shape.to_vec(),
            dtype,
        })
    }

    fn from_bytes(
        gpu: &Gpu,
        shape: &[usize],
        dtype: DType,
        bytes: &[u8],
        label: &str,
    ) -> Result<Tensor> {
        let owned;
        let data = if !bytes.len().is_multiple_of(4) || bytes.is_empty() {
            let mut v = bytes.to_vec();
            v.resize((bytes.len().div_ceil(4) * 4).max(4), 0);
            owned = v;
            &owned[..]
        } else {
            bytes
        };
        Self::check_size(gpu, data.len() as u64, label)?;
        let buf = gpu.allocating(label, data.len() as u64, || {
            gpu.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: data,
                    usage: USAGE,
                })
        })?;
        Ok(Tensor {
            buf: Arc::new(buf),
            shape: shape.to_vec(),
            dtype,
        })
    }

    pub fn from_f32(gpu: &Gpu, shape: &[usize], data: &[f32], label: &str) -> Result<Tensor> {
        Self::check_len(shape, data.len(), label)?;
        Self::from_bytes(gpu, shape, DType::F32, bytemuck::cast_slice(data), label)
    }

    /// Upload f32 values rounded to f16 (packed two per word).
    pub fn from_f32_as_f16(
        gpu: &Gpu,
        shape: &[usize],
        data: &[f32],
        label: &str,
    ) -> Result<Tensor> {
        Self::check_len(shape, data.len(), label)?;
        let h: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
        Self::from_bytes(gpu, shape, DType::F16, bytemuck::cast_slice(&h), label)
    }

    /// Upload raw little-endian f16 bytes.
    pub fn from_f16_bytes(gpu: &Gpu, shape: &[usize], bytes: &[u8], label: &str) -> Result<Tensor> {
        Self::check_len(shape, bytes.len() / 2, label)?;
        Self::from_bytes(gpu, shape, DType::F16, bytes, label)
    }

    pub fn from_u32(gpu: &Gpu, shape: &[usize], data: &[u32], label: &str) -> Result<Tensor> {
        Self::check_len(shape, data.len(), label)?;
        Self::from_bytes(gpu, shape, DType::U32, bytemuck::cast_slice(data), label)
    }

    fn check_len(shape: &[usize], n: usize, label: &str) -> Result<()> {
        let want: usize = shape.iter().product();
        if want != n {
            return Err(Error::Input(format!(
                "{label}: shape {shape:?} needs {want} values, got {n}"
            )));
        }
        Ok(())
    }

    /// Overwrite the contents from the host (queued; ordered before the next submit).
    pub fn write_u32(&self, gpu: &Gpu, data: &[u32]) {
        gpu.queue
            .write_buffer(&self.buf, 0, bytemuck::cast_slice(data));
    }
    /// Overwrite `data.len()` words from word `at` (queued like [`Tensor::write_u32`]).
    pub fn write_u32_at(&self, gpu: &Gpu, at: usize, data: &[u32]) {
        gpu.queue
            .write_buffer(&self.buf, (at * 4) as u64, bytemuck::cast_slice(data));
    }
    pub fn write_f32(&self, gpu: &Gpu, data: &[f32]) {
        gpu.queue
            .write_buffer(&self.buf, 0, bytemuck::cast_slice(data));
    }
}
