// Decode GEMV: Y[n0 + n] (+)= sum_k X[k] * W[n, k] (+ B[n0 + n]), for one row of X.
// Same parameters and bindings as matmul.wgsl (M must be 1). 4 rows per workgroup,
// 64 threads per row striding over K; tree reduction in workgroup memory.

struct Params {
    M: u32, N: u32, K: u32, x_off: u32,
    y_off: u32, ldy: u32, n0: u32, flags: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> W: array<u32>;
@group(0) @binding(3) var<storage, read> B: array<f32>;
@group(0) @binding(4) var<storage, read_write> Y: array<f32>;

const ROWS: u32 = 4u;
const LANES: u32 = 64u;
var<workgroup> part: array<f32, 256>;

@compute @workgroup_size(64, 4)
fn matvec(@builtin(workgroup_id) wg: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = (wg.x + wg.y * nwg.x) * ROWS + lid.y;
    let lane = lid.x;
    let kw = p.K / 2u;
    var acc = 0.0;
    if (row < p.N) {
        let base = row * kw;
        for (var kp = lane; kp < kw; kp += LANES) {
            let w = unpack2x16float(W[base + kp]);
            let xi = p.x_off + kp * 2u;
            acc = fma(X[xi], w.x, acc);
            acc = fma(X[xi + 1u], w.y, acc);
        }
    }
    let slot = lid.y * LANES + lane;
    part[slot] = acc;
    workgroupBarrier();
    for (var s = LANES / 2u; s > 0u; s >>= 1u) {
        if (lane < s) { part[slot] += part[slot + s]; }
        workgroupBarrier();
    }
    if (lane == 0u && row < p.N) {
        var v = part[slot];
        if ((p.flags & 2u) != 0u) { v += B[p.n0 + row]; }
        let idx = p.y_off + p.n0 + row;
        if ((p.flags & 1u) != 0u) { v += Y[idx]; }
        Y[idx] = v;
    }
}

// Variant for CPU adapters (lavapipe/llvmpipe), where workgroup barriers are costly:
// one invocation per output row, no shared memory.
@compute @workgroup_size(64)
fn matvec_rows(@builtin(global_invocation_id) gid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * nwg.x * 64u;
    if (row >= p.N) { return; }
    let kw = p.K / 2u;
    let base = row * kw;
    var a0 = 0.0;
    var a1 = 0.0;
    for (var kp = 0u; kp < kw; kp++) {
        let w = unpack2x16float(W[base + kp]);
        let xi = p.x_off + kp * 2u;
        a0 = fma(X[xi], w.x, a0);
        a1 = fma(X[xi + 1u], w.y, a1);
    }
    var v = a0 + a1;
    if ((p.flags & 2u) != 0u) { v += B[p.n0 + row]; }
    let idx = p.y_off + p.n0 + row;
    if ((p.flags & 1u) != 0u) { v += Y[idx]; }
    Y[idx] = v;
}
