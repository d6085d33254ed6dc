//! [`Step`]: one forward step recorded into one command encoder and one submit.
//!
//! Ops append dispatches (kernel, a few words of parameters, storage buffers) and copies.
//! All parameters of the step go into one uniform buffer that lives as long as the
//! device ([`StepState`]), at aligned offsets, written with `queue.write_buffer` right
//! before the submit; each dispatch binds its slot at binding 0 and its storage buffers
//! at 1..=n.
//!
//! Bind groups are cached across steps, keyed by (pipeline, parameter slot, buffers):
//! a decode step records the same dispatches in the same order as the one before it, so
//! in steady state no bind group and no buffer is created per step. Why this is safe:
//! - `write_buffer` is ordered on the queue timeline: its copy runs after every earlier
//!   submit and before the commands of the next one, so rewriting the parameters for
//!   step n+1 cannot change what step n reads, even while step n still runs. The write
//!   and the submit happen under one lock, so two threads' steps cannot interleave.
//! - Buffers are keyed by the address of their `Arc`; each cache entry holds a `Weak`
//!   to every buffer it binds, which keeps that address from being reused while the
//!   entry exists. Entries whose buffers were dropped are swept before every submit
//!   (a bind group holds its buffers' GPU memory, so a dropped KV cache must not
//!   linger), and the cache is bounded.

use super::{Gpu, Kernel, Pipeline, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Weak};

/// A storage buffer bound to a dispatch (whole buffer).
pub type Binding = Arc<wgpu::Buffer>;

/// Most storage buffers a cached bind group may have (more: created per step).
const MAX_KEY_BUFFERS: usize = 8;
/// Bind groups kept at most; past this, entries unused for a few steps go first.
const MAX_CACHED: usize = 4096;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct BindKey {
    pipeline: usize,
    param_offset: u32,
    param_size: u32,
    n: u8,
    buffers: [usize; MAX_KEY_BUFFERS],
}

struct CachedGroup {
    group: wgpu::BindGroup,
    buffers: Vec<Weak<wgpu::Buffer>>,
    last_used: u64,
}

/// Per-device state shared by all steps: the parameter buffer and the bind group cache.
#[derive(Default)]
pub struct StepState {
    params: Option<wgpu::Buffer>,
    params_size: u64,
    groups: HashMap<BindKey, CachedGroup>,
    submits: u64,
    dispatches: u64,
    /// Bind groups created since the device was opened (tests and profiling read it).
    created: u64,
}

impl StepState {
    /// Make the parameter buffer hold `bytes`; a new buffer drops every cached group
    /// (they bind the old one).
    fn reserve_params(&mut self, dev: &wgpu::Device, bytes: u64) {
        if self.params.is_some() && self.params_size >= bytes {
            return;
        }
        let size = bytes.next_power_of_two().max(64 * 1024);
        self.params = Some(dev.create_buffer(&wgpu::BufferDescriptor {
            label: Some("step params"),
            size,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }));
        self.params_size = size;
        self.groups.clear();
    }

    /// Drop groups whose buffers are gone; bound the cache.
    fn sweep(&mut self) {
        self.groups
            .retain(|_, g| g.buffers.iter().all(|w| w.strong_count() > 0));
        if self.groups.len() > MAX_CACHED {
            let recent = self.submits.saturating_sub(4);
            self.groups.retain(|_, g| g.last_used >= recent);
            if self.groups.len() > MAX_CACHED {
                self.groups.clear();
            }
        }
    }
}

/// Counters over the device's lifetime, for tests and profiling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepStats {
    pub submits: u64,
    pub dispatches: u64,
    pub bind_groups_created: u64,
}

impl Gpu {
    /// Steps submitted, dispatches recorded in them and bind groups created so far.
    pub fn step_stats(&self) -> StepStats {
        let s = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        StepStats {
            submits: s.submits,
            dispatches: s.dispatches,
            bind_groups_created: s.created,
        }
    }
}

enum Cmd {
    Dispatch {
        name: &'static str,
        pipeline: Arc<Pipeline>,
        param_offset: u64,
        param_size: u64,
        buffers: Vec<Binding>,
        groups: [u32; 3],
    },
    Copy {
        src: Binding,
        src_offset: u64,
        dst: Binding,
        dst_offset: u64,
        size: u64,
    },
}

pub struct Step<'g> {
    gpu: &'g Gpu,
    serial: bool,
    coop: bool,
    subgroup_gemv: bool,
    gemv_rows: Option<usize>,
    params: Vec<u8>,
    cmds: Vec<Cmd>,
}

/// Largest parameter block of one dispatch, in bytes.
const MAX_PARAMS: usize = 256;

impl<'g> Step<'g> {
    pub fn new(gpu: &'g Gpu) -> Step<'g> {
        Step {
            gpu,
            serial: gpu.prefers_serial_kernels(),
            coop: true,
            subgroup_gemv: true,
            gemv_rows: gpu.tuning.gemv_rows,
            params: Vec::new(),
            cmds: Vec::new(),
        }
    }

    pub fn gpu(&self) -> &'g Gpu {
        self.gpu
    }

    /// Whether ops pick their barrier-free (CPU-adapter) kernel variants.
    pub fn serial(&self) -> bool {
        self.serial
    }

    /// Override the kernel variant choice for this step (tests check both).
    pub fn set_serial(&mut self, serial: bool) {
        self.serial = serial;
    }

    /// Whether GEMMs may take the tensor-core kernel where the device has one (on by
    /// default; tests turn it off to check the portable kernels on such a device).
    pub fn coop(&self) -> bool {
        self.coop && !self.serial
    }

    pub fn set_coop(&mut self, on: bool) {
        self.coop = on;
    }

    /// Whether GEMVs may take the subgroup kernel where the device has fixed-size
    /// subgroups (on by default; tests check both).
    pub fn subgroup_gemv(&self) -> bool {
        self.subgroup_gemv && !self.serial
    }

    pub fn set_subgroup_gemv(&mut self, on: bool) {
        self.subgroup_gemv = on;
    }

    /// Rows per 32-lane group of the vec4 GEMV forced for this step (1, 2 or 4), or
    /// `None` to let the op choose by the matrix's size. Tests check every variant;
    /// [`super::Tuning::gemv_rows`] (`KVLINK_GEMV_ROWS`) sets it for a whole run (for
    /// benchmarking the variants).
    pub fn gemv_rows(&self) -> Option<usize> {
        self.gemv_rows
    }

    /// Force the vec4 GEMV's rows per group (see [`Step::gemv_rows`]).
    pub fn set_gemv_rows(&mut self, rows: Option<usize>) {
        self.gemv_rows = rows;
    }

    /// Dispatches recorded so far.
    pub fn dispatch_count(&self) -> usize {
        self.cmds
            .iter()
            .filter(|c| matches!(c, Cmd::Dispatch { .. }))
            .count()
    }

    /// Record a dispatch. `params` are the kernel's uniform words (u32 or f32 bits).
    pub fn dispatch(&mut self, k: Kernel, params: &[u32], bufs: &[&Tensor], groups: [u32; 3]) {
        debug_assert!(params.len() * 4 <= MAX_PARAMS);
        let align = (self.gpu.limits.min_uniform_buffer_offset_alignment as usize).max(16);
        let off = self.params.len().div_ceil(align) * align;
        // Uniform structs are sized in 16-byte units; at least one unit.
        let size = (params.len() * 4).div_ceil(16).max(1) * 16;
        self.params.resize(off, 0);
        self.params.extend_from_slice(bytemuck::cast_slice(params));
        self.params.resize(off + size, 0);
        let name = if self.gpu.profiling() && self.gpu.tuning.profile == super::Profile::Shapes {
            profile_key(k.name, params, groups)
        } else {
            k.name
        };
        self.cmds.push(Cmd::Dispatch {
            name,
            pipeline: self.gpu.pipeline(k),
            param_offset: off as u64,
            param_size: size as u64,
            buffers: bufs.iter().map(|t| t.buf.clone()).collect(),
            groups,
        });
    }

    /// Record a buffer-to-buffer copy (byte offsets, multiples of 4).
    pub fn copy(
        &mut self,
        src: &Tensor,
        src_offset: u64,
        dst: &Tensor,
        dst_offset: u64,
        size: u64,
    ) {
        self.cmds.push(Cmd::Copy {
            src: src.buf.clone(),
            src_offset,
            dst: dst.buf.clone(),
            dst_offset,
            size,
        });
    }

    /// Record a copy into a buffer that is not a tensor (e.g. a mappable readback buffer).
    pub fn copy_to_buffer(&mut self, src: &Tensor, dst: &Binding, size: u64) {
        self.cmds.push(Cmd::Copy {
            src: src.buf.clone(),
            src_offset: 0,
            dst: dst.clone(),
            dst_offset: 0,
            size,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }

    /// Encode everything into one command buffer and submit it; the submission's index
    /// (None when there was nothing to submit).
    pub fn submit(self) -> Option<wgpu::SubmissionIndex> {
        if self.cmds.is_empty() {
            return None;
        }
        let dev = &self.gpu.device;
        // Held from the parameter write to the submit (see the module docs).
        let mut state = self.gpu.steps.lock().unwrap_or_else(|e| e.into_inner());
        state.submits += 1;
        state.sweep();
        if !self.params.is_empty() {
            state.reserve_params(dev, self.params.len() as u64);
            let pbuf = state.params.as_ref().expect("params buffer reserved");
            self.gpu.queue.write_buffer(pbuf, 0, &self.params);
        }
        let groups: Vec<Option<wgpu::BindGroup>> = self
            .cmds
            .iter()
            .map(|c| match c {
                Cmd::Dispatch {
                    pipeline,
                    param_offset,
                    param_size,
                    buffers,
                    ..
                } => Some(state.bind_group(dev, pipeline, *param_offset, *param_size, buffers)),
                Cmd::Copy { .. } => None,
            })
            .collect();
        state.dispatches += groups.iter().filter(|g| g.is_some()).count() as u64;
        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("step"),
        });
        if self.gpu.profiling() {
            return self.submit_profiled(enc, &groups);
        }
        let mut i = 0;
        while i < self.cmds.len() {
            if let Cmd::Copy {
                src,
                src_offset,
                dst,
                dst_offset,
                size,
            } = &self.cmds[i]
            {
                enc.copy_buffer_to_buffer(src, *src_offset, dst, *dst_offset, *size);
                i += 1;
                continue;
            }
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: None,
            });
            while i < self.cmds.len() {
                let Cmd::Dispatch {
                    pipeline,
                    groups: g,
                    ..
                } = &self.cmds[i]
                else {
                    break;
                };
                pass.set_pipeline(&pipeline.pipeline);
                pass.set_bind_group(0, groups[i].as_ref(), &[]);
                pass.dispatch_workgroups(g[0], g[1], g[2]);
                i += 1;
            }
        }
        let index = self.gpu.queue.submit([enc.finish()]);
        drop(state);
        Some(index)
    }
}

impl StepState {
    /// The bind group of one dispatch: from the cache, else created (and cached when
    /// its key fits).
    fn bind_group(
        &mut self,
        dev: &wgpu::Device,
        pipeline: &Arc<Pipeline>,
        param_offset: u64,
        param_size: u64,
        buffers: &[Binding],
    ) -> wgpu::BindGroup {
        let key = (buffers.len() <= MAX_KEY_BUFFERS).then(|| {
            let mut k = BindKey {
                pipeline: Arc::as_ptr(pipeline) as usize,
                param_offset: param_offset as u32,
                param_size: param_size as u32,
                n: buffers.len() as u8,
                buffers: [0; MAX_KEY_BUFFERS],
            };
            for (slot, b) in k.buffers.iter_mut().zip(buffers) {
                *slot = Arc::as_ptr(b) as usize;
            }
            k
        });
        let now = self.submits;
        if let Some(c) = key.as_ref().and_then(|k| self.groups.get_mut(k)) {
            c.last_used = now;
            return c.group.clone();
        }
        let mut entries = Vec::with_capacity(buffers.len() + 1);
        if let Some(pbuf) = &self.params {
            entries.push(wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: pbuf,
                    offset: param_offset,
                    size: wgpu::BufferSize::new(param_size),
                }),
            });
        }
        for (i, b) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: b.as_entire_binding(),
            });
        }
        let group = dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.layout,
            entries: &entries,
        });
        self.created += 1;
        if let Some(k) = key {
            self.groups.insert(
                k,
                CachedGroup {
                    group: group.clone(),
                    buffers: buffers.iter().map(Arc::downgrade).collect(),
                    last_used: now,
                },
            );
        }
        group
    }
}

impl Step<'_> {
    /// Profiling (KVLINK_PROFILE=1): every dispatch in its own pass between two GPU
    /// timestamps; the durations are added to the device's per-kernel totals.
    fn submit_profiled(
        &self,
        mut enc: wgpu::CommandEncoder,
        groups: &[Option<wgpu::BindGroup>],
    ) -> Option<wgpu::SubmissionIndex> {
        let dev = &self.gpu.device;
        let n = self
            .cmds
            .iter()
            .filter(|c| matches!(c, Cmd::Dispatch { .. }))
            .count()
            .min(4000);
        let qs = dev.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count: (2 * n).max(2) as u32,
        });
        let mut names = Vec::with_capacity(n);
        for (i, c) in self.cmds.iter().enumerate() {
            match c {
                Cmd::Copy {
                    src,
                    src_offset,
                    dst,
                    dst_offset,
                    size,
                } => enc.copy_buffer_to_buffer(src, *src_offset, dst, *dst_offset, *size),
                Cmd::Dispatch {
                    name,
                    pipeline,
                    groups: g,
                    ..
                } => {
                    let q = names.len() as u32;
                    let tw = (names.len() < n).then(|| wgpu::ComputePassTimestampWrites {
                        query_set: &qs,
                        beginning_of_pass_write_index: Some(2 * q),
                        end_of_pass_write_index: Some(2 * q + 1),
                    });
                    if tw.is_some() {
                        names.push(*name);
                    }
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: None,
                        timestamp_writes: tw,
                    });
                    pass.set_pipeline(&pipeline.pipeline);
                    pass.set_bind_group(0, groups[i].as_ref(), &[]);
                    pass.dispatch_workgroups(g[0], g[1], g[2]);
                }
            }
        }
        let bytes = (16 * n.max(1)) as u64;
        let resolve = dev.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile resolve"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let read = dev.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile read"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if !names.is_empty() {
            enc.resolve_query_set(&qs, 0..2 * names.len() as u32, &resolve, 0);
            enc.copy_buffer_to_buffer(&resolve, 0, &read, 0, bytes);
        }
        let index = self.gpu.queue.submit([enc.finish()]);
        if names.is_empty() {
            return Some(index);
        }
        read.map_async(wgpu::MapMode::Read, .., |_| {});
        if self.gpu.wait().is_err() {
            return Some(index);
        }
        let Ok(view) = read.get_mapped_range(..) else {
            return Some(index);
        };
        let ticks: &[u64] = bytemuck::cast_slice(&view);
        let period = self.gpu.queue.get_timestamp_period() as f64;
        let mut prof = self.gpu.profile.lock().unwrap_or_else(|e| e.into_inner());
        for (i, name) in names.iter().enumerate() {
            let ns = ticks[2 * i + 1].saturating_sub(ticks[2 * i]) as f64 * period;
            let e = prof.entry(name).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += ns;
        }
        Some(index)
    }
}

/// Split a 1-D workgroup count over x and y so neither exceeds the per-dimension limit.
/// Kernels rebuild the linear index as `wg.x + wg.y * nwg.x`.
pub fn grid_1d(groups: u32) -> [u32; 3] {
    const MAX: u32 = 65535;
    if groups <= MAX {
        [groups.max(1), 1, 1]
    } else {
        [MAX, groups.div_ceil(MAX), 1]
    }
}

/// An interned "kernel grid params" key (a few hundred distinct ones per model).
fn profile_key(name: &'static str, params: &[u32], groups: [u32; 3]) -> &'static str {
    static KEYS: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let n = params.len().min(3);
    let key = format!("{name} {groups:?} {:?}", &params[..n]);
    let mut keys = KEYS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(k) = keys.iter().find(|k| **k == key) {
        return k;
    }
    let k: &'static str = Box::leak(key.into_boxed_str());
    keys.push(k);
    k
}
