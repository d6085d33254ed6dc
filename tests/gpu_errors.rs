//! GPU errors surface as errors of the call whose work failed, never as wrong output:
//! a validation error is reported by the next wait or read (and only once); an
//! allocation beyond what the adapter can hold is refused before anything is
//! allocated; a lost device makes every later call fail, with a message that says so.

mod common;

use kvlink::gpu::{AdapterChoice, DType, Gpu, Tensor};

fn fresh_gpu() -> std::sync::Arc<Gpu> {
    common::gpu(); // sets up the environment the way every test binary does
    Gpu::new(&AdapterChoice::from_env()).unwrap()
}

#[test]
fn a_validation_error_fails_the_next_wait_once() {
    let g = fresh_gpu();
    g.wait().unwrap();
    // A buffer with no usage is invalid.
    let _bad = g.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("invalid"),
        size: 16,
        usage: wgpu::BufferUsages::empty(),
        mapped_at_creation: false,
    });
    let err = g
        .wait()
        .expect_err("the invalid buffer's error is reported");
    let msg = err.to_string();
    assert!(msg.contains("GPU error"), "{msg}");
    assert!(!g.is_lost());
    // Reported once: later work on the device goes on.
    g.wait().unwrap();
    let t = Tensor::from_f32(&g, &[4], &[1.0, 2.0, 3.0, 4.0], "t").unwrap();
    assert_eq!(g.read_f32(&t).unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn an_allocation_beyond_the_adapter_is_refused() {
    let g = fresh_gpu();
    let words = (g.max_buffer_bytes() / 4 + 1) as usize;
    let err = Tensor::zeros(&g, &[words], DType::F32, "huge").expect_err("too big");
    assert!(err.to_string().contains("exceeds"), "{err}");
    g.wait().unwrap();
}

#[test]
fn a_context_beyond_the_adapter_is_an_error_not_an_abort() {
    let g = fresh_gpu();
    let src = common::model::source();
    let r = kvlink::Engine::load(g.clone(), src.as_ref(), 1 << 30, &mut |_, _| {});
    let msg = r
        .err()
        .expect("a 2^30-token context cannot fit")
        .to_string();
    assert!(msg.contains("bytes") || msg.contains("context"), "{msg}");
}

#[test]
fn a_lost_device_fails_every_later_call() {
    let g = fresh_gpu();
    let src = common::model::source();
    let e = kvlink::Engine::load(g.clone(), src.as_ref(), 256, &mut |_, _| {}).unwrap();
    let ids = e
        .tokenizer()
        .encode("The capital of France is", true)
        .unwrap();
    let before = e.next_logits(&ids).unwrap();
    assert!(before.iter().all(|x| x.is_finite()));
    g.device.destroy();
    for _ in 0..2 {
        let err = e
            .next_logits(&ids)
            .expect_err("no logits from a lost device");
        assert!(err.to_string().contains("lost"), "{err}");
    }
    assert!(g.is_lost());
}

/// The kernel knobs are the device's, given at creation, not read from the environment
/// later: two devices opened side by side with different knobs choose differently.
#[test]
fn tuning_is_per_device_and_not_from_the_environment() {
    use kvlink::gpu::{KernelFamily, Step, Tuning};
    common::gpu();
    let open = |t: Tuning| Gpu::with_tuning(&AdapterChoice::from_env(), t).unwrap();
    let gpu_family = open(Tuning {
        kernels: KernelFamily::Gpu,
        ..Tuning::default()
    });
    let cpu_family = open(Tuning {
        kernels: KernelFamily::Cpu,
        coopmat: false,
        ..Tuning::default()
    });
    assert!(!gpu_family.prefers_serial_kernels() && !Step::new(&gpu_family).serial());
    assert!(cpu_family.prefers_serial_kernels() && Step::new(&cpu_family).serial());
    assert!(cpu_family.coop.is_none());
    assert_eq!(gpu_family.tuning.kernels, KernelFamily::Gpu);
}
