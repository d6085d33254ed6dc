//! [`Step`]: one forward step recorded into one command encoder and one submit.
//!
//! Ops append dispatches (kernel, a few words of parameters, storage buffers) and copies.
//! All parameters of the step go into one uniform buffer (256-byte slots), written once;
//! each dispatch binds its slot at binding 0 and its storage buffers at 1..=n.

use super::{Gpu, Kernel, Tensor};
use std::sync::Arc;

/// A storage buffer bound to a dispatch (whole buffer).
pub type Binding = Arc<wgpu::Buffer>;

enum Cmd {
    Dispatch {
        pipeline: Arc<wgpu::ComputePipeline>,
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
                        layout: &pipeline.get_bind_group_layout(0),
                        entries: &entries,
                    }))
                }
                Cmd::Copy { .. } => None,
            })
            .collect();
        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("step"),
        });
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
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, groups[i].as_ref(), &[]);
                pass.dispatch_workgroups(g[0], g[1], g[2]);
                i += 1;
            }
        }
        self.gpu.queue.submit([enc.finish()]);
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
