// Decode GEMV for GPUs, K % 8 == 0: same contract as matvec.wgsl (flags 1 accumulate,
// 2 bias, 4 SwiGLU pairs), bandwidth-oriented. Flag 8 applies RMSNorm to X first
// (X / sqrt(mean(X^2) + eps) * NW, each workgroup reducing X itself), which saves the
// norm's own dispatch before a projection. W is read as vec4<u32> (8 f16 per load,
// 16 bytes per thread, 512 contiguous bytes per 32 threads), X as vec4<f32>.
// 8 rows per workgroup of 256 threads, 32 threads per row; tree reduction over the 32.

struct Params {
    M: u32, N: u32, K: u32, x_off: u32,
    y_off: u32, ldy: u32, n0: u32, flags: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> X: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> W: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> B: array<f32>;
@group(0) @binding(4) var<storage, read_write> Y: array<f32>;
@group(0) @binding(5) var<storage, read> NW: array<vec4<f32>>;

const ROWS: u32 = 8u;
const LANES: u32 = 32u;
var<workgroup> part: array<f32, 256>;
var<workgroup> part_up: array<f32, 256>;

fn dot8(w: vec4<u32>, x0: vec4<f32>, x1: vec4<f32>) -> f32 {
    let a = unpack2x16float(w.x);
    let b = unpack2x16float(w.y);
    let c = unpack2x16float(w.z);
    let d = unpack2x16float(w.w);
    return dot(vec4<f32>(a, b), x0) + dot(vec4<f32>(c, d), x1);
}

// X as 4 values (index in vec4 units from the row start), normalized when flag 8 is set.
fn xv(i: u32, inv: f32) -> vec4<f32> {
    let v = X[p.x_off / 4u + i];
    if ((p.flags & 8u) != 0u) { return v * inv * NW[i]; }
    return v;
}

fn dot_row(row: u32, lane: u32, inv: f32) -> f32 {
    let k8 = p.K / 8u;
    let base = row * k8;
    var acc0 = 0.0;
    var acc1 = 0.0;
    var k = lane;
    // Two loads in flight per thread.
    for (; k + LANES < k8; k += 2u * LANES) {
        let w0 = W[base + k];
        let w1 = W[base + k + LANES];
        acc0 += dot8(w0, xv(2u * k, inv), xv(2u * k + 1u, inv));
        let k1 = k + LANES;
        acc1 += dot8(w1, xv(2u * k1, inv), xv(2u * k1 + 1u, inv));
    }
    if (k < k8) {
        acc0 += dot8(W[base + k], xv(2u * k, inv), xv(2u * k + 1u, inv));
    }
    return acc0 + acc1;
}

@compute @workgroup_size(256)
fn matvec_vec4(@builtin(workgroup_id) wg: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let lane = li % LANES;
    let r = li / LANES;
    let row = (wg.x + wg.y * nwg.x) * ROWS + r;
    let swiglu = (p.flags & 4u) != 0u;
    var inv = 1.0;
    if ((p.flags & 8u) != 0u) {
        // RMSNorm statistics of X, by the whole workgroup.
        var ss = 0.0;
        for (var i = li; i < p.K / 4u; i += 256u) {
            let v = X[p.x_off / 4u + i];
            ss += dot(v, v);
        }
        part[li] = ss;
        workgroupBarrier();
        for (var s = 128u; s > 0u; s >>= 1u) {
            if (li < s) { part[li] += part[li + s]; }
            workgroupBarrier();
        }
        inv = inverseSqrt(part[0] / f32(p.K) + p.eps);
        workgroupBarrier();
    }
    var acc = 0.0;
    var acc_up = 0.0;
    if (row < p.N) {
        acc = dot_row(row, lane, inv);
        if (swiglu) { acc_up = dot_row(row + p.N, lane, inv); }
    }
    part[li] = acc;
    part_up[li] = acc_up;
    workgroupBarrier();
    for (var s = LANES / 2u; s > 0u; s >>= 1u) {
        if (lane < s) {
            part[li] += part[li + s];
            part_up[li] += part_up[li + s];
        }
        workgroupBarrier();
    }
    if (lane == 0u && row < p.N) {
        var v = part[li];
        var u = part_up[li];
        if ((p.flags & 2u) != 0u) {
            v += B[p.n0 + row];
            if ((p.flags & 4u) != 0u) { u += B[p.n0 + p.N + row]; }
        }
        if (swiglu) { v = v / (1.0 + exp(-v)) * u; }
        let idx = p.y_off + p.n0 + row;
        if ((p.flags & 1u) != 0u) { v += Y[idx]; }
        Y[idx] = v;
    }
}
