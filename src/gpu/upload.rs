//! Uploads of tensors filled from the host in pieces (e.g. as a file is read), through
//! staging buffers that are kept and reused.
//!
//! `create_buffer_init` and `Queue::write_buffer(_with)` allocate fresh staging memory for
//! every upload and free it after; for a disk-cache hit of hundreds of MB per request
//! that allocation (pinned or BAR memory on a discrete GPU, freshly faulted pages on a CPU
//! adapter) is a large part of the cost. Here one staging buffer serves a whole batch of
//! tensors, and once the GPU has copied out of it, it is mapped again and goes back to a
//! small pool for the next upload.

use super::{DType, Gpu, Tensor};
use crate::error::{Error, Result};
use std::sync::Arc;

/// Idle staging memory kept for later uploads, at most this much.
const POOL_BYTES: u64 = 512 << 20;
/// New staging buffers are rounded up to this, so that documents of similar length
/// share buffers.
const GRANULE: u64 = 1 << 20;

/// Idle staging buffers, each mapped for writing.
#[derive(Default)]
pub(crate) struct StagingPool {
    idle: Vec<wgpu::Buffer>,
}

impl StagingPool {
    /// The smallest idle buffer of at least `size` bytes.
    fn take(&mut self, size: u64) -> Option<wgpu::Buffer> {
        let i = (0..self.idle.len())
            .filter(|&i| self.idle[i].size() >= size)
            .min_by_key(|&i| self.idle[i].size())?;
        Some(self.idle.swap_remove(i))
    }

    fn give_back(&mut self, buf: wgpu::Buffer) {
        let held: u64 = self.idle.iter().map(|b| b.size()).sum();
        if held + buf.size() <= POOL_BYTES {
            self.idle.push(buf);
        }
    }
}

/// `n` f16 tensors of one shape, filled from the host and uploaded together; see
/// [`Gpu::upload_f16`].
pub struct TensorUpload {
    gpu: Arc<Gpu>,
    staging: wgpu::Buffer,
    /// The mapped staging range; `None` once finished.
    view: Option<wgpu::BufferViewMut>,
    tensors: Vec<Tensor>,
    /// Where in each tensor the bytes go.
    offsets: Vec<u64>,
    /// Element bytes of one tensor.
    bytes: usize,
    /// Staging bytes per tensor (whole words).
    stride: usize,
    /// Bytes copied into each tensor.
    copy: u64,
}

impl Gpu {
    /// Start an upload of `n` f16 tensors of `shape` (see the module docs): write their
    /// bytes with [`TensorUpload::write`], then [`TensorUpload::finish`] queues the copies.
    /// Dropped unfinished, the staging buffer goes back to the pool unused.
    pub fn upload_f16(
        self: &Arc<Self>,
        n: usize,
        shape: &[usize],
        label: &str,
    ) -> Result<TensorUpload> {
        let tensors = (0..n)
            .map(|_| Tensor::zeros(self, shape, DType::F16, label))
            .collect::<Result<Vec<_>>>()?;
        let stride = tensors.first().map_or(4, |t| t.buf.size() as usize);
        let bytes = shape.iter().product::<usize>() * DType::F16.size();
        let dests = tensors.into_iter().map(|t| (t, 0)).collect();
        self.start_upload(dests, bytes, stride, stride as u64, label)
    }

    /// Start an upload of `bytes` bytes into each of `dests`: tensor `i` from byte
    /// offset `dests[i].1` (e.g. rows of a larger buffer). `bytes` and the offsets must
    /// be multiples of 4; the bytes around each range are left as they are.
    pub fn upload_into(
        self: &Arc<Self>,
        dests: Vec<(Tensor, u64)>,
        bytes: usize,
        label: &str,
    ) -> Result<TensorUpload> {
        for (t, off) in &dests {
            if !bytes.is_multiple_of(4) || off % 4 != 0 || off + bytes as u64 > t.buf.size() {
                return Err(Error::Input(format!(
                    "{label}: {bytes} bytes at offset {off} do not fit a {}-byte buffer in \
                     whole words",
                    t.buf.size()
                )));
            }
        }
        self.start_upload(dests, bytes, bytes, bytes as u64, label)
    }

    /// `stride`: staging bytes per tensor (`bytes` and zero padding); `copy`: bytes
    /// copied into each destination.
    fn start_upload(
        self: &Arc<Self>,
        dests: Vec<(Tensor, u64)>,
        bytes: usize,
        stride: usize,
        copy: u64,
        label: &str,
    ) -> Result<TensorUpload> {
        let n = dests.len();
        let size = ((n * stride) as u64).max(4);
        let pooled = self
            .staging
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(size);
        let staging = pooled.unwrap_or_else(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("upload staging"),
                size: size.div_ceil(GRANULE) * GRANULE,
                usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: true,
            })
        });
        let view = staging
            .get_mapped_range_mut(..size)
            .map_err(|e| Error::Gpu(format!("{label}: staging memory not mapped: {e}")))?;
        let (tensors, offsets) = dests.into_iter().unzip();
        Ok(TensorUpload {
            gpu: self.clone(),
            staging,
            view: Some(view),
            tensors,
            offsets,
            bytes,
            stride,
            copy,
        })
    }
}

impl TensorUpload {
    /// Element bytes `offset..offset + bytes.len()` of tensor `i` (little-endian f16).
    /// Panics if that range is outside the tensor.
    pub fn write(&mut self, i: usize, offset: usize, bytes: &[u8]) {
        assert!(
            i < self.tensors.len() && offset + bytes.len() <= self.bytes,
            "write past the tensor"
        );
        let at = i * self.stride + offset;
        if let Some(v) = &mut self.view {
            v.slice(at..at + bytes.len()).copy_from_slice(bytes);
        }
    }

    /// Queue the copies into the tensors (submitted now, so they start at once) and
    /// return them. Bytes never written are undefined.
    pub fn finish(mut self) -> Vec<Tensor> {
        let pad = self.stride - self.bytes;
        if let Some(mut view) = self.view.take() {
            for i in 0..self.tensors.len() {
                let at = i * self.stride + self.bytes;
                view.slice(at..at + pad).copy_from_slice(&[0u8; 4][..pad]);
            }
        }
        let staging = self.staging.clone();
        staging.unmap();
        let g = &self.gpu;
        let mut enc = g
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("upload"),
            });
        for (i, (t, off)) in self.tensors.iter().zip(&self.offsets).enumerate() {
            let at = (i * self.stride) as u64;
            enc.copy_buffer_to_buffer(&staging, at, &t.buf, *off, self.copy);
        }
        g.queue.submit([enc.finish()]);
        // Mapped again once the copies have run (seen by the next poll: any wait or read
        // back), then reusable.
        let pool = g.staging.clone();
        let buf = staging.clone();
        staging.map_async(wgpu::MapMode::Write, .., move |r| {
            if r.is_ok() {
                pool.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .give_back(buf);
            }
        });
        std::mem::take(&mut self.tensors)
    }
}

impl Drop for TensorUpload {
    fn drop(&mut self) {
        // Unfinished: nothing was queued and the buffer is still mapped; keep it.
        if self.view.take().is_some() {
            self.gpu
                .staging
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .give_back(self.staging.clone());
        }
    }
}
