//! The browser build (feature `web`, target `wasm32-unknown-unknown`): the same engine,
//! kernels and KVLink path on the browser's WebGPU.
//!
//! What differs from native is only how the host waits:
//! - the adapter and device are requested with `await` ([`open_gpu`]);
//! - a buffer map cannot be waited for synchronously in a browser, so GPU reads are
//!   awaited ([`readback`]): the engine's synchronous calls run inside
//!   [`readback::deferred`], which turns each read into a copy to a staging buffer
//!   that is mapped and awaited afterwards;
//! - model bytes come from JS (a `fetch` or a file picker), not a file;
//! - document caches live in the browser's origin-private file system ([`store`]), in
//!   the native disk store's file format.
//!
//! [`api`] is the JS surface (`Kvlink`, `AskStream`); `examples/web/kvlink.js` wraps it
//! into `init`, `loadModel`, `addDocument` and `ask` (an async iterator of tokens).

pub mod api;
pub mod store;
/// The deferred and awaited GPU reads (they live in [`crate::gpu`]).
pub use crate::gpu::readback;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use std::sync::Arc;

/// Request the browser's WebGPU adapter and open it with the engine's features and the
/// adapter's own limits (the engine asks for what the adapter offers; no shader-f16).
pub async fn open_gpu() -> Result<Arc<Gpu>> {
    let inst = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::BROWSER_WEBGPU,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let adapter = inst
        .request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            ..Default::default()
        })
        .await
        .map_err(|e| {
            Error::Gpu(format!(
                "no WebGPU adapter ({e}); in Chromium on Linux start it with \
                 --enable-unsafe-webgpu"
            ))
        })?;
    Gpu::from_adapter(&adapter, 0, crate::gpu::Tuning::default()).await
}
