//! The GPU layer: adapter selection, device with explicit features and limits, typed
//! buffers, a pipeline cache, and [`Step`], which records one forward step's dispatches
//! and copies into a single command encoder. No model knowledge lives here.

/// The browser's deferred GPU reads (a WebGPU map completes only in the event loop).
#[cfg(all(target_arch = "wasm32", feature = "web"))]
pub mod readback;
mod step;
mod tensor;
pub mod tuning;
mod upload;

pub use step::{grid_1d, Binding, Step, StepStats};
pub use tensor::{DType, Tensor};
pub use tuning::{CoopDiag, KernelFamily, Profile, ShaderChecks, Tuning};
pub use upload::TensorUpload;

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How to pick an adapter: an index into `kvlink devices`' list, or a case-insensitive
/// substring of the adapter's name / backend / driver.
#[derive(Clone, Debug, Default)]
pub enum AdapterChoice {
    #[default]
    Auto,
    Index(usize),
    Name(String),
}

impl AdapterChoice {
    /// Parse `--adapter` / `KVLINK_ADAPTER`: a number is an index, anything else a name.
    pub fn parse(s: &str) -> AdapterChoice {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("auto") {
            AdapterChoice::Auto
        } else if let Ok(i) = s.parse::<usize>() {
            AdapterChoice::Index(i)
        } else {
            AdapterChoice::Name(s.to_string())
        }
    }
    /// From the `KVLINK_ADAPTER` environment variable, else `Auto`.
    pub fn from_env() -> AdapterChoice {
        std::env::var("KVLINK_ADAPTER")
            .map(|s| AdapterChoice::parse(&s))
            .unwrap_or_default()
    }
}

/// One adapter as listed by `kvlink devices`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterReport {
    pub index: usize,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub shader_f16: bool,
    pub subgroups: bool,
    pub timestamps: bool,
    pub cooperative_matrix: bool,
    /// The cooperative-matrix shapes the adapter runs, as "MxNxK AB->CR" (e.g.
    /// "16x16x16 f16->f32"); empty without the feature.
    pub cooperative_matrix_configs: Vec<String>,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_compute_workgroup_storage_size: u32,
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

fn report(index: usize, a: &wgpu::Adapter) -> AdapterReport {
    let info = a.get_info();
    let f = a.features();
    let l = a.limits();
    AdapterReport {
        index,
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
        shader_f16: f.contains(wgpu::Features::SHADER_F16),
        subgroups: f.contains(wgpu::Features::SUBGROUP),
        timestamps: f.contains(wgpu::Features::TIMESTAMP_QUERY),
        cooperative_matrix: f.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
        cooperative_matrix_configs: if f.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            a.cooperative_matrix_properties()
                .iter()
                .map(|p| {
                    let t = |t: wgpu::CooperativeScalarType| format!("{t:?}").to_lowercase();
                    format!(
                        "{}x{}x{} {}->{}",
                        p.m_size,
                        p.n_size,
                        p.k_size,
                        t(p.ab_type),
                        t(p.cr_type)
                    )
                })
                .collect()
        } else {
            Vec::new()
        },
        subgroup_min_size: info.subgroup_min_size,
        subgroup_max_size: info.subgroup_max_size,
        max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
        max_buffer_size: l.max_buffer_size,
        max_compute_workgroup_storage_size: l.max_compute_workgroup_storage_size,
    }
}

/// All adapters wgpu can see, in a stable order (discrete GPUs first).
pub fn list_adapters() -> Vec<AdapterReport> {
    sorted_adapters(&instance())
        .iter()
        .enumerate()
        .map(|(i, a)| report(i, a))
        .collect()
}

fn sorted_adapters(inst: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    // Vulkan/Metal/DX12 first; GL only when none of those exists (probing GL on a
    // headless Linux box makes Mesa print errors). WGPU_BACKEND overrides.
    let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
    let mut v = pollster::block_on(inst.enumerate_adapters(backends));
    if v.is_empty() && std::env::var_os("WGPU_BACKEND").is_none() {
        v = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::SECONDARY));
    }
    let rank = |a: &wgpu::Adapter| match a.get_info().device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    v.sort_by_key(|a| (rank(a), a.get_info().backend != wgpu::Backend::Vulkan));
    v
}

/// The device and everything derived from it. Cheap to share (`Arc<Gpu>`).
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub report: AdapterReport,
    pub limits: wgpu::Limits,
    /// The tensor-core GEMM's fragment shape when the device runs it (see [`CoopShape`]).
    pub coop: Option<CoopShape>,
    /// The kernel knobs this device was opened with (read once: [`Tuning`]).
    pub tuning: Tuning,
    pipelines: Mutex<HashMap<&'static str, Arc<Pipeline>>>,
    /// The steps' parameter buffer and bind group cache (see `step.rs`).
    steps: Mutex<step::StepState>,
    dummy: std::sync::OnceLock<Tensor>,
    /// Named scratch buffers reused across steps (e.g. attention split partials).
    scratch: Mutex<HashMap<&'static str, Tensor>>,
    profiling: bool,
    /// Per-kernel (dispatch count, GPU nanoseconds) when profiling.
    pub(crate) profile: Mutex<HashMap<&'static str, (u64, f64)>>,
    /// Idle staging buffers for [`Gpu::upload_f16`].
    staging: Arc<Mutex<upload::StagingPool>>,
    /// The first GPU error (validation, out of memory) or device loss not yet reported
    /// to a caller: [`Gpu::check`] turns it into an error of the call that waits on or
    /// reads the GPU's work, so a failed dispatch never shows up as wrong output.
    fault: FaultSlot,
}

/// Where the device's error handlers leave the first GPU error not yet reported (see
/// [`Gpu::check`]); shared with the browser's deferred reads.
#[derive(Clone, Default)]
pub(crate) struct FaultSlot(Arc<Mutex<Option<Fault>>>);

#[derive(Clone, Debug)]
struct Fault {
    msg: String,
    /// The device is lost: every later call fails too.
    lost: bool,
}

impl FaultSlot {
    fn record(&self, msg: String, lost: bool) {
        let mut f = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if lost || f.is_none() {
            *f = Some(Fault { msg, lost });
        }
    }

    /// Take the pending error (a device loss stays).
    pub(crate) fn check(&self) -> Result<()> {
        let mut f = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match f.as_ref() {
            None => Ok(()),
            Some(x) => {
                let msg = x.msg.clone();
                if !x.lost {
                    *f = None;
                }
                Err(Error::Gpu(format!("GPU error: {msg}")))
            }
        }
    }

    fn is_lost(&self) -> bool {
        let f = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f.as_ref().is_some_and(|x| x.lost)
    }
}

/// How the cooperative-matrix (tensor core) GEMM runs on this device: square `t` x `t` x
/// `t` f16 products into f32 (16 on NVIDIA, 8 on lavapipe) on subgroups of exactly
/// `subgroup` invocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopShape {
    pub t: u32,
    pub subgroup: u32,
}

/// The cooperative-matrix shape the engine uses on `adapter`, if any: it needs shader-f16,
/// subgroups of one fixed size (the kernel lays its tiles out by subgroup) and square
/// 16x16x16 (preferred) or 8x8x8 f16 -> f32 products. [`Tuning::coopmat`] off disables it.
fn coop_shape(adapter: &wgpu::Adapter, rep: &AdapterReport, tuning: &Tuning) -> Option<CoopShape> {
    if !tuning.coopmat {
        return None;
    }
    let need = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
        | wgpu::Features::SHADER_F16
        | wgpu::Features::SUBGROUP;
    if !adapter.features().contains(need) || rep.subgroup_min_size != rep.subgroup_max_size {
        return None;
    }
    let props = adapter.cooperative_matrix_properties();
    let has = |t: u32| {
        props.iter().any(|p| {
            p.m_size == t
                && p.n_size == t
                && p.k_size == t
                && p.ab_type == wgpu::CooperativeScalarType::F16
                && p.cr_type == wgpu::CooperativeScalarType::F32
        })
    };
    let t = [16, 8].into_iter().find(|&t| has(t))?;
    Some(CoopShape {
        t,
        subgroup: rep.subgroup_min_size,
    })
}

/// A compiled kernel with its bind group layout (fetched once, not per dispatch).
pub struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

/// Runtime checks that wgpu compiles into our kernels ([`Tuning::shader_checks`]):
/// none (the default), bounds clamps only, or all (wgpu's default: bounds clamps, a
/// loop-bounding counter in every loop and guarded integer division). On the H100 `all`
/// cost 40% of prefill and 33% of decode throughput (the loop counters also stop the
/// driver from unrolling inner loops); the kernels are our own and tested, so they run
/// unchecked unless asked. `None` means wgpu's default path.
fn shader_checks(tuning: &Tuning) -> Option<wgpu::ShaderRuntimeChecks> {
    match tuning.shader_checks {
        ShaderChecks::All => None,
        ShaderChecks::Bounds => {
            let mut c = wgpu::ShaderRuntimeChecks::unchecked();
            c.bounds_checks = true;
            Some(c)
        }
        ShaderChecks::None => Some(wgpu::ShaderRuntimeChecks::unchecked()),
    }
}

/// A compute kernel: a WGSL source and an entry point. Kernels are compiled once per
/// device and cached under `name`.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    pub name: &'static str,
    pub source: &'static str,
    pub entry: &'static str,
}

impl Kernel {
    /// A kernel whose source is generated at run time (a template given its host
    /// constants), built once per process and `key`: `make` returns its name and source,
    /// which live for the rest of the process (a handful per adapter).
    pub fn generated<K: PartialEq>(
        cache: &Mutex<Vec<(K, Kernel)>>,
        key: K,
        entry: &'static str,
        make: impl FnOnce() -> (String, String),
    ) -> Kernel {
        let mut ks = cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, k)) = ks.iter().find(|(k, _)| *k == key) {
            return *k;
        }
        let (name, source) = make();
        let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        let k = Kernel {
            name: leak(name),
            source: leak(source),
            entry,
        };
        ks.push((key, k));
        k
    }
}

impl Gpu {
    /// Open the chosen adapter with the features and limits the engine uses, tuned by the
    /// `KVLINK_*` environment variables ([`Tuning::from_env`]; a bad value is an error).
    pub fn new(choice: &AdapterChoice) -> Result<Arc<Gpu>> {
        Self::with_tuning(choice, Tuning::from_env()?)
    }

    /// [`Gpu::new`] with explicit kernel knobs (the environment is not read).
    pub fn with_tuning(choice: &AdapterChoice, tuning: Tuning) -> Result<Arc<Gpu>> {
        let inst = instance();
        let adapters = sorted_adapters(&inst);
        if adapters.is_empty() {
            return Err(Error::Gpu(
                "no GPU adapter found. On Linux without a GPU driver install Mesa's lavapipe \
                 (`apt-get install mesa-vulkan-drivers`)"
                    .into(),
            ));
        }
        let idx = match choice {
            AdapterChoice::Auto => 0,
            AdapterChoice::Index(i) => {
                if *i >= adapters.len() {
                    return Err(Error::Gpu(format!(
                        "adapter index {i} out of range: {} adapter(s) found (see `kvlink devices`)",
                        adapters.len()
                    )));
                }
                *i
            }
            AdapterChoice::Name(n) => {
                let n = n.to_lowercase();
                adapters
                    .iter()
                    .position(|a| {
                        let r = report(0, a);
                        r.name.to_lowercase().contains(&n)
                            || r.backend.to_lowercase().contains(&n)
                            || r.driver.to_lowercase().contains(&n)
                    })
                    .ok_or_else(|| {
                        Error::Gpu(format!(
                            "no adapter matches {n:?} (see `kvlink devices` for the list)"
                        ))
                    })?
            }
        };
        pollster::block_on(Self::from_adapter(&adapters[idx], idx, tuning))
    }

    /// Open `adapter` (number `idx` in the list) with the features and limits the engine
    /// uses. Async: the browser build awaits it (no blocking on the web).
    pub async fn from_adapter(
        adapter: &wgpu::Adapter,
        idx: usize,
        tuning: Tuning,
    ) -> Result<Arc<Gpu>> {
        let rep = report(idx, adapter);
        let al = adapter.limits();
        // Compute-only engine: ask for what the adapter offers on the limits we depend on.
        let mut limits = wgpu::Limits::downlevel_defaults();
        limits.max_storage_buffer_binding_size = al.max_storage_buffer_binding_size;
        limits.max_buffer_size = al.max_buffer_size;
        limits.max_storage_buffers_per_shader_stage =
            al.max_storage_buffers_per_shader_stage.min(16);
        limits.max_compute_workgroup_storage_size = al.max_compute_workgroup_storage_size;
        limits.max_compute_invocations_per_workgroup = al.max_compute_invocations_per_workgroup;
        limits.max_compute_workgroup_size_x = al.max_compute_workgroup_size_x;
        limits.max_compute_workgroup_size_y = al.max_compute_workgroup_size_y;
        limits.max_compute_workgroups_per_dimension = al.max_compute_workgroups_per_dimension;
        limits.max_bind_groups = al.max_bind_groups.min(4);
        // Step parameters are packed at this alignment (64 on NVIDIA, 256 by default).
        limits.min_uniform_buffer_offset_alignment = al.min_uniform_buffer_offset_alignment;
        if limits.max_compute_invocations_per_workgroup < 256
            || limits.max_compute_workgroup_storage_size < 16384
            || limits.max_storage_buffers_per_shader_stage < 6
        {
            return Err(Error::Gpu(format!(
                "adapter {:?} cannot run the kernels: needs 256 invocations per workgroup, \
                 16 KiB workgroup memory and 6 storage buffers per stage (has {}, {}, {})",
                rep.name,
                al.max_compute_invocations_per_workgroup,
                al.max_compute_workgroup_storage_size,
                al.max_storage_buffers_per_shader_stage
            )));
        }
        let mut features = wgpu::Features::empty();
        for f in [wgpu::Features::SHADER_F16, wgpu::Features::TIMESTAMP_QUERY] {
            if adapter.features().contains(f) {
                features |= f;
            }
        }
        let coop = coop_shape(adapter, &rep, &tuning);
        // Subgroup operations where the adapter has them (the subgroup GEMV needs one
        // fixed size; `Tuning::subgroups` off leaves them out).
        let subgroups = adapter.features().contains(wgpu::Features::SUBGROUP) && tuning.subgroups;
        if subgroups {
            features |= wgpu::Features::SUBGROUP;
        }
        let mut experimental = wgpu::ExperimentalFeatures::disabled();
        if coop.is_some() {
            features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
                | wgpu::Features::SHADER_F16
                | wgpu::Features::SUBGROUP;
            // SAFETY: the only experimental feature requested is cooperative matrices, used
            // by one kernel (matmul_coop.wgsl) that is tested against the CPU reference on
            // the adapters that take it; `Tuning::coopmat` off leaves it out.
            experimental = unsafe { wgpu::ExperimentalFeatures::enabled() };
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("kvlink"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features: experimental,
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::Gpu(format!("cannot open adapter {:?}: {e}", rep.name)))?;
        let fault = FaultSlot::default();
        let f = fault.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            f.record(first_line(&e.to_string()), false);
        }));
        let f = fault.clone();
        device.set_device_lost_callback(move |reason, msg| {
            f.record(format!("the GPU device was lost ({reason:?}): {msg}"), true);
        });
        let profiling =
            tuning.profile != Profile::Off && features.contains(wgpu::Features::TIMESTAMP_QUERY);
        Ok(Arc::new(Gpu {
            device,
            queue,
            report: rep,
            limits,
            coop,
            tuning,
            pipelines: Mutex::new(HashMap::new()),
            steps: Mutex::new(step::StepState::default()),
            dummy: std::sync::OnceLock::new(),
            scratch: Mutex::new(HashMap::new()),
            profiling,
            profile: Mutex::new(HashMap::new()),
            staging: Arc::default(),
            fault,
        }))
    }

    /// An error for the GPU error (validation, out of memory) or device loss that
    /// happened since the last check, if any. A device loss stays: every later check
    /// fails too. [`Gpu::wait`] and every readback check, so a call whose GPU work
    /// failed returns this error instead of what the failed work left behind.
    pub fn check(&self) -> Result<()> {
        self.fault.check()
    }

    /// Whether the device is lost (then nothing more can run on it).
    pub fn is_lost(&self) -> bool {
        self.fault.is_lost()
    }

    /// The slot the error handlers fill (the browser's reads check it).
    #[cfg_attr(not(all(target_arch = "wasm32", feature = "web")), allow(dead_code))]
    pub(crate) fn fault_slot(&self) -> FaultSlot {
        self.fault.clone()
    }

    /// Run `make` (a buffer or texture creation) in an out-of-memory error scope: a
    /// failed allocation becomes an error of this call. (The browser cannot block on the
    /// scope: there an allocation failure shows up at the next [`Gpu::check`].)
    pub(crate) fn allocating<T>(
        &self,
        what: &str,
        bytes: u64,
        make: impl FnOnce() -> T,
    ) -> Result<T> {
        self.check_alive()?;
        #[cfg(not(target_arch = "wasm32"))]
        {
            let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
            let out = make();
            if let Some(e) = pollster::block_on(scope.pop()) {
                return Err(Error::Gpu(format!(
                    "{what}: cannot allocate {bytes} bytes on the GPU: {}",
                    first_line(&e.to_string())
                )));
            }
            Ok(out)
        }
        #[cfg(target_arch = "wasm32")]
        {
            let _ = (what, bytes);
            Ok(make())
        }
    }

    /// An error if the device is lost.
    fn check_alive(&self) -> Result<()> {
        if self.is_lost() {
            return self.check();
        }
        Ok(())
    }

    /// Largest buffer we create: the storage binding limit (so any buffer can be bound
    /// whole) and the buffer size limit, whichever is smaller.
    pub fn max_buffer_bytes(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// CPU adapters (lavapipe, SwiftShader) run barrier-free variants of some kernels:
    /// there, workgroup barriers cost more than the parallelism they buy.
    /// [`Tuning::kernels`] (`KVLINK_KERNELS=gpu|cpu`) overrides the choice (tests use it
    /// to check both).
    pub fn prefers_serial_kernels(&self) -> bool {
        match self.tuning.kernels {
            KernelFamily::Gpu => false,
            KernelFamily::Cpu => true,
            KernelFamily::Auto => self.report.device_type == "Cpu",
        }
    }

    /// The subgroup size when the device runs subgroup operations and its subgroups have
    /// one fixed size (kernels that lay work out by subgroup need it).
    pub fn subgroup_size(&self) -> Option<u32> {
        let r = &self.report;
        (self.device.features().contains(wgpu::Features::SUBGROUP)
            && r.subgroup_min_size == r.subgroup_max_size
            && r.subgroup_min_size >= 4)
            .then_some(r.subgroup_min_size)
    }

    /// Whether GPU timestamps are taken per dispatch (`KVLINK_PROFILE=1`).
    pub fn profiling(&self) -> bool {
        self.profiling
    }

    /// Per-kernel GPU time since the last call, most expensive first:
    /// (kernel, dispatches, milliseconds). Empty unless profiling.
    pub fn take_profile(&self) -> Vec<(&'static str, u64, f64)> {
        let mut p = self.profile.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = p.drain().map(|(k, (n, ns))| (k, n, ns / 1e6)).collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    }

    /// A small zero buffer bound where a kernel's optional input is absent.
    pub fn dummy(&self) -> Tensor {
        self.dummy
            .get_or_init(|| {
                let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("dummy"),
                    size: 16,
                    // COPY_SRC: the browser's `gpu_idle` reads it back to wait for the GPU
                    // (a copy that was invalid, unseen, until GPU errors were checked).
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                });
                Tensor {
                    buf: Arc::new(buf),
                    shape: vec![4],
                    dtype: DType::F32,
                }
            })
            .clone()
    }

    /// A scratch f32 buffer of at least `words` elements, kept under `name` and grown
    /// when needed. Work on one queue runs in order, so steps may share it as long as
    /// each dispatch that reads it follows the one that wrote it.
    pub fn scratch(&self, name: &'static str, words: usize) -> Result<Tensor> {
        let mut cache = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(name) {
            if t.numel() >= words {
                return Ok(t.clone());
            }
        }
        let n = words.max(4).next_power_of_two();
        let t = Tensor::zeros(self, &[n], DType::F32, name)?;
        cache.insert(name, t.clone());
        Ok(t)
    }

    pub fn pipeline(&self, k: Kernel) -> Arc<Pipeline> {
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = cache.get(k.name) {
            return p.clone();
        }
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(k.name),
            source: wgpu::ShaderSource::Wgsl(k.source.into()),
        };
        let module = match shader_checks(&self.tuning) {
            None => self.device.create_shader_module(desc),
            // SAFETY: only the engine's own kernels come through here; every one is tested
            // against a CPU reference with poisoned outputs at edge sizes, its loops are
            // bounded by their parameters and its divisors are non-zero constants or
            // validated sizes. See `shader_checks` for what each level drops.
            Some(checks) => unsafe { self.device.create_shader_module_trusted(desc, checks) },
        };
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(k.name),
                layout: None,
                module: &module,
                entry_point: Some(k.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    zero_initialize_workgroup_memory: self.tuning.zero_workgroup_memory,
                    ..Default::default()
                },
                cache: None,
            });
        let layout = pipeline.get_bind_group_layout(0);
        let p = Arc::new(Pipeline { pipeline, layout });
        cache.insert(k.name, p.clone());
        p
    }

    /// Wait for all submitted work.
    pub fn wait(&self) -> Result<()> {
        self.check_alive()?;
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::Gpu(format!("waiting for the GPU failed: {e}")))?;
        self.check()
    }

    /// Read a whole tensor back to the host as its raw 32-bit words.
    #[cfg_attr(all(target_arch = "wasm32", feature = "web"), allow(unreachable_code))]
    pub fn read_words(&self, t: &Tensor) -> Result<Vec<u32>> {
        // The browser cannot block on a map: there the read is deferred (`readback`).
        #[cfg(all(target_arch = "wasm32", feature = "web"))]
        return readback::defer(self, t);
        let bytes = t.byte_len();
        self.check_alive()?;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        enc.copy_buffer_to_buffer(&t.buf, 0, &staging, 0, bytes);
        self.queue.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| Error::Gpu("readback callback never ran".into()))?
            .map_err(|e| Error::Gpu(format!("readback failed: {e}")))?;
        let data = staging
            .get_mapped_range(..)
            .map_err(|e| Error::Gpu(format!("readback map failed: {e}")))?;
        let words = bytemuck::cast_slice::<u8, u32>(&data[..bytes as usize]).to_vec();
        drop(data);
        staging.unmap();
        Ok(words)
    }

    /// Read an f32 tensor back to the host.
    pub fn read_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        let w = self.read_words(t)?;
        Ok(match t.dtype {
            DType::F32 | DType::U32 => bytemuck::cast_slice(&w).to_vec(),
            DType::F16 => {
                let h: &[half::f16] = bytemuck::cast_slice(&w);
                h[..t.numel()].iter().map(|x| x.to_f32()).collect()
            }
        })
    }

    pub fn read_u32(&self, t: &Tensor) -> Result<Vec<u32>> {
        self.read_words(t)
    }
}

/// The first line of a wgpu error's text (the rest repeats the call's details).
fn first_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
