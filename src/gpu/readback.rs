//! GPU reads in the browser. A WebGPU buffer map completes only after control returns
//! to the browser's event loop, so nothing can block on it: reads are awaited.
//!
//! The engine's forward pass reads its result (the argmax token or the logits) right
//! after submitting. To reuse it unchanged, [`deferred`] runs a synchronous engine call
//! with reads *deferred*: each [`Gpu::read_words`] inside it records a copy of the
//! tensor into a staging buffer and returns zeros; when the call returns, the staging
//! buffers are mapped and awaited, and their words handed back in read order. Outside
//! [`deferred`] a synchronous read in the browser is an error, never silent zeros.

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

struct Staged {
    buf: wgpu::Buffer,
    bytes: u64,
    /// The device's pending GPU error, checked once the read completes.
    fault: crate::gpu::FaultSlot,
}

thread_local! {
    /// Some while [`deferred`] runs: the reads recorded so far.
    static DEFERRED: RefCell<Option<Vec<Staged>>> = const { RefCell::new(None) };
}

/// Copy `t` into a fresh mappable buffer (submitted now, after all earlier work).
fn stage(gpu: &Gpu, t: &Tensor) -> Staged {
    let bytes = t.byte_len();
    let fault = gpu.fault_slot();
    let buf = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size: bytes.max(4),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = gpu
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
    enc.copy_buffer_to_buffer(&t.buf, 0, &buf, 0, bytes);
    gpu.queue.submit([enc.finish()]);
    Staged { buf, bytes, fault }
}

/// `Gpu::read_words` on the web: record the read if [`deferred`] is running.
pub(crate) fn defer(gpu: &Gpu, t: &Tensor) -> Result<Vec<u32>> {
    DEFERRED.with(|d| match d.borrow_mut().as_mut() {
        Some(list) => {
            let s = stage(gpu, t);
            let words = (s.bytes / 4) as usize;
            list.push(s);
            Ok(vec![0u32; words])
        }
        None => Err(Error::Gpu(
            "a synchronous GPU read cannot complete in a browser; use the async API \
             (kvlink::gpu::readback)"
                .into(),
        )),
    })
}

/// A one-shot slot a map callback fills and a future waits on.
type Slot = Rc<
    RefCell<(
        Option<std::result::Result<(), wgpu::BufferAsyncError>>,
        Option<Waker>,
    )>,
>;

struct MapDone(Slot);

impl Future for MapDone {
    type Output = std::result::Result<(), wgpu::BufferAsyncError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = self.0.borrow_mut();
        match s.0.take() {
            Some(r) => Poll::Ready(r),
            None => {
                s.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

async fn finish(s: Staged) -> Result<Vec<u32>> {
    let slot: Slot = Rc::new(RefCell::new((None, None)));
    let cb = slot.clone();
    s.buf.map_async(wgpu::MapMode::Read, .., move |r| {
        let mut c = cb.borrow_mut();
        c.0 = Some(r);
        if let Some(w) = c.1.take() {
            w.wake();
        }
    });
    MapDone(slot)
        .await
        .map_err(|e| Error::Gpu(format!("readback failed: {e}")))?;
    // The work this read follows failed: its output is not a result.
    s.fault.check()?;
    let data = s
        .buf
        .get_mapped_range(..)
        .map_err(|e| Error::Gpu(format!("readback map failed: {e}")))?;
    let words = bytemuck::cast_slice::<u8, u32>(&data[..s.bytes as usize]).to_vec();
    drop(data);
    s.buf.unmap();
    Ok(words)
}

/// Run `f` (synchronous engine work) with GPU reads deferred; then await them. Returns
/// `f`'s result and the words of every read it made, in order. Not reentrant.
pub async fn deferred<R>(f: impl FnOnce() -> Result<R>) -> Result<(R, Vec<Vec<u32>>)> {
    DEFERRED.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_some() {
            return Err(Error::Gpu("deferred GPU reads do not nest".into()));
        }
        *d = Some(Vec::new());
        Ok(())
    })?;
    let r = f();
    let staged = DEFERRED.with(|d| d.borrow_mut().take()).unwrap_or_default();
    let r = r?;
    let mut out = Vec::with_capacity(staged.len());
    for s in staged {
        out.push(finish(s).await?);
    }
    Ok((r, out))
}

/// Read a whole tensor back as its raw 32-bit words.
pub async fn read_words(gpu: &Gpu, t: &Tensor) -> Result<Vec<u32>> {
    finish(stage(gpu, t)).await
}

/// Read a tensor back as f32 (f16 tensors are widened).
pub async fn read_f32(gpu: &Gpu, t: &Tensor) -> Result<Vec<f32>> {
    let w = read_words(gpu, t).await?;
    Ok(words_to_f32(&w, t.dtype, t.numel()))
}

/// Interpret read-back words as `n` f32 values of a tensor of `dtype`.
pub fn words_to_f32(w: &[u32], dtype: DType, n: usize) -> Vec<f32> {
    match dtype {
        DType::F32 | DType::U32 => bytemuck::cast_slice::<u32, f32>(w)[..n.min(w.len())].to_vec(),
        DType::F16 => {
            let h: &[half::f16] = bytemuck::cast_slice(w);
            h[..n].iter().map(|x| x.to_f32()).collect()
        }
    }
}

/// Resolves once all GPU work submitted so far has finished (a 16-byte read after it).
pub async fn gpu_idle(gpu: &Gpu) -> Result<()> {
    finish(stage(gpu, &gpu.dummy())).await.map(|_| ())
}
