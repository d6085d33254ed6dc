// Element-wise ops over n f32 values (A read, B read-write):
//  add:      B[i] = B[i] + A[i]                    (residual add)
//  silu_mul: B[i] = silu(A[i]) * B[i]              (SwiGLU: A = gate, B = up)
//  silu_mul_split: B[r, j] = silu(A[r, j]) * A[r, ff + j] for rows r of ff values
//            (SwiGLU after the fused gate|up projection: A = [rows, 2 ff])

struct Params { n: u32, ff: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> A: array<f32>;
@group(0) @binding(2) var<storage, read_write> B: array<f32>;

@compute @workgroup_size(256)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) { return; }
    B[i] = B[i] + A[i];
}

@compute @workgroup_size(256)
fn silu_mul(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) { return; }
    let g = A[i];
    B[i] = g / (1.0 + exp(-g)) * B[i];
}

@compute @workgroup_size(256)
fn silu_mul_split(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) { return; }
    let r = i / p.ff;
    let a = r * 2u * p.ff + (i - r * p.ff);
    let g = A[a];
    B[i] = g / (1.0 + exp(-g)) * A[a + p.ff];
}
