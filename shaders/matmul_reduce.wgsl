// Second pass of a split-K GEMM (matmul.wgsl): Y[m, n0 + n] (+)= sum_z P[z, m, n]
// (+ B[n0 + n]), with matmul's offsets and flags (1 = accumulate, 2 = add bias).

struct Params {
    M: u32, N: u32, splits: u32, y_off: u32,
    ldy: u32, n0: u32, flags: u32, _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> P: array<f32>;
@group(0) @binding(2) var<storage, read> B: array<f32>;
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;

@compute @workgroup_size(256)
fn matmul_reduce(@builtin(global_invocation_id) gid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.M * p.N) { return; }
    let m = i / p.N;
    let n = i % p.N;
    var v = 0.0;
    for (var z = 0u; z < p.splits; z++) { v += P[z * p.M * p.N + i]; }
    if ((p.flags & 2u) != 0u) { v += B[p.n0 + n]; }
    let idx = p.y_off + m * p.ldy + p.n0 + n;
    if ((p.flags & 1u) != 0u) { v += Y[idx]; }
    Y[idx] = v;
}
