// Decode GEMV: Y[n0 + n] (+)= sum_k X[k] * W[n, k] (+ B[n0 + n]), for one row of X.
// Same parameters and bindings as matmul.wgsl (M must be 1).
// flags: 1 = accumulate into Y, 2 = add bias, 4 = SwiGLU pairs: W holds 2N rows (gate
// rows 0..N, then up rows N..2N) and Y[n] = silu(gate_n) * up_n (biases B[n], B[N + n]).
// This file: any even K. matvec_vec4.wgsl is the faster kernel for K % 8 == 0.

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
var<workgroup> part_up: array<f32, 256>;

fn dot_row(row: u32, lane: u32, stride: u32) -> f32 {
    let kw = p.K / 2u;
    let base = row * kw;
    var acc = 0.0;
    for (var kp = lane; kp < kw; kp += stride) {
        let w = unpack2x16float(W[base + kp]);
        let xi = p.x_off + kp * 2u;
        acc = fma(X[xi], w.x, acc);
        acc = fma(X[xi + 1u], w.y, acc);
    }
    return acc;
}

// The output of row `row` (< N) from its dot product(s): bias, SwiGLU, accumulate.
fn store(row: u32, gate: f32, up: f32) {
    var v = gate;
    var u = up;
    if ((p.flags & 2u) != 0u) {
        v += B[p.n0 + row];
        if ((p.flags & 4u) != 0u) { u += B[p.n0 + p.N + row]; }
    }
    if ((p.flags & 4u) != 0u) { v = v / (1.0 + exp(-v)) * u; }
    let idx = p.y_off + p.n0 + row;
    if ((p.flags & 1u) != 0u) { v += Y[idx]; }
    Y[idx] = v;
}

// 4 rows per workgroup, 64 threads per row striding over K; tree reduction in
// workgroup memory.
@compute @workgroup_size(64, 4)
fn matvec(@builtin(workgroup_id) wg: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = (wg.x + wg.y * nwg.x) * ROWS + lid.y;
    let lane = lid.x;
    let swiglu = (p.flags & 4u) != 0u;
    var acc = 0.0;
    var acc_up = 0.0;
    if (row < p.N) {
        acc = dot_row(row, lane, LANES);
        if (swiglu) { acc_up = dot_row(row + p.N, lane, LANES); }
    }
    let slot = lid.y * LANES + lane;
    part[slot] = acc;
    part_up[slot] = acc_up;
    workgroupBarrier();
    for (var s = LANES / 2u; s > 0u; s >>= 1u) {
        if (lane < s) {
            part[slot] += part[slot + s];
            part_up[slot] += part_up[slot + s];
        }
        workgroupBarrier();
    }
    if (lane == 0u && row < p.N) {
        store(row, part[slot], part_up[slot]);
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
    if ((p.flags & 4u) == 0u) {
        for (var kp = 0u; kp < kw; kp++) {
            let w = unpack2x16float(W[base + kp]);
            let xi = p.x_off + kp * 2u;
            a0 = fma(X[xi], w.x, a0);
            a1 = fma(X[xi + 1u], w.y, a1);
        }
        store(row, a0 + a1, 0.0);
        return;
    }
    // SwiGLU: the gate and up rows in one pass over X.
    let base_up = (row + p.N) * kw;
    var u0 = 0.0;
    var u1 = 0.0;
    for (var kp = 0u; kp < kw; kp++) {
        let w = unpack2x16float(W[base + kp]);
        let wu = unpack2x16float(W[base_up + kp]);
        let xi = p.x_off + kp * 2u;
        let x0 = X[xi];
        let x1 = X[xi + 1u];
        a0 = fma(x0, w.x, a0);
        a1 = fma(x1, w.y, a1);
        u0 = fma(x0, wu.x, u0);
        u1 = fma(x1, wu.y, u1);
    }
    store(row, a0 + a1, u0 + u1);
}
