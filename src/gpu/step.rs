//! [`Step`]: one forward step recorded into one command encoder and one submit.
//!
//! Ops append dispatches (kernel, a few words of parameters, storage buffers) and copies.
//! All parameters of the step go into one uniform buffer (256-byte slots), written once;
//! each dispatch binds its slot at binding 0 and its storage buffers at 1..=n.

use super::{Gpu, Kernel, Pipeline, Tensor};
use std::sync::Arc;

/// A storage buffer bound to a dispatch (whole buffer).
pub type Binding = Arc<wgpu::Buffer>;

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
    params: Vec<u8>,
    cmds: Vec<Cmd>,
}

const SLOT: usize = 256;

impl<'g> Step<'g> {
    pub fn new(gpu: &'g Gpu) -> Step<'g> {
        Step {
            gpu,
            serial: gpu.prefers_serial_kernels(),
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

    /// Record a dispatch. `params` are the kernel's uniform words (u32 or f32 bits).
    pub fn dispatch(&mut self, k: Kernel, params: &[u32], bufs: &[&Tensor], groups: [u32; 3]) {
        debug_assert!(params.len() * 4 <= SLOT);
        let off = self.params.len();
        let mut words = params.to_vec();
        words.resize(params.len().div_ceil(4).max(1) * 4, 0);
        self.params.extend_from_slice(bytemuck::cast_slice(&words));
        self.params.resize(off + SLOT, 0);
        self.cmds.push(Cmd::Dispatch {
            name: k.name,
            pipeline: self.gpu.pipeline(k),
            param_offset: off as u64,
            param_size: (words.len() * 4) as u64,
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

    pub fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }

    /// Encode everything into one command buffer and submit it.
    pub fn submit(self) {
        if self.cmds.is_empty() {
            return;
        }
        let dev = &self.gpu.device;
        let ubuf = (!self.params.is_empty()).then(|| {
            use wgpu::util::DeviceExt;
            dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("step params"),
                contents: &self.params,
                usage: wgpu::BufferUsages::UNIFORM,
            })
        });
        // Bind groups first: they must outlive the pass that uses them.
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
                } => {
                    let mut entries = vec![wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: ubuf.as_ref().expect("params present"),
                            offset: *param_offset,
                            size: wgpu::BufferSize::new(*param_size),
                        }),
                    }];
                    for (i, b) in buffers.iter().enumerate() {
                        entries.push(wgpu::BindGroupEntry {
                            binding: i as u32 + 1,
                            resource: b.as_entire_binding(),
                        });
                    }
                    Some(dev.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: None,
                        layout: &pipeline.layout,
                        entries: &entries,
                    }))
                }
                Cmd::Copy { .. } => None,
            })
            .collect();
        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("step"),
        });
        if self.gpu.profiling() {
            self.submit_profiled(enc, &groups);
            return;
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
        self.gpu.queue.submit([enc.finish()]);
    }
}

impl Step<'_> {
    /// Profiling (KVLINK_PROFILE=1): every dispatch in its own pass between two GPU
    /// timestamps; the durations are added to the device's per-kernel totals.
    fn submit_profiled(&self, mut enc: wgpu::CommandEncoder, groups: &[Option<wgpu::BindGroup>]) {
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
        self.gpu.queue.submit([enc.finish()]);
        if names.is_empty() {
            return;
        }
        read.map_async(wgpu::MapMode::Read, .., |_| {});
        if self.gpu.wait().is_err() {
            return;
        }
        let Ok(view) = read.get_mapped_range(..) else {
            return;
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
