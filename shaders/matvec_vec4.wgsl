// Decode GEMV for GPUs, K % 8 == 0: same contract as matvec.wgsl (flags 1 accumulate,
// 2 bias, 4 SwiGLU pairs), bandwidth-oriented. Flag 8 applies RMSNorm to X first
// (X / sqrt(mean(X^2) + eps) * NW, each workgroup reducing X itself), which saves the
// norm's own dispatch before a projection. W is read as vec4<u32> (8 f16 per load,
// 16 bytes per thread, 512 contiguous bytes per 32 threads), X as vec4<f32>.
// 256 threads in 8 groups of 32 lanes; a group computes RPW output rows (the host
// prepends `const RPW: u32`, 1, 2 or 4), so each X value a lane loads serves RPW rows
// (2 RPW weight rows with SwiGLU pairs); each lane keeps 8 (16) weight loads in flight.
// Tree reduction over the 32 lanes.

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

const LANES: u32 = 32u;
const ROWS: u32 = 8u * RPW;  // output rows per workgroup
const NA: u32 = 2u * RPW;    // accumulators per lane: RPW rows, then their SwiGLU up rows
const U: u32 = 8u / RPW;     // K steps per unrolled iteration
var<workgroup> part: array<f32, 256u * NA>;

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

@compute @workgroup_size(256)
fn matvec_vec4(@builtin(workgroup_id) wg: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let lane = li % LANES;
    let grp = li / LANES;
    let row0 = (wg.x + wg.y * nwg.x) * ROWS + grp * RPW;
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
    let k8 = p.K / 8u;
    // Word offset of each weight row; rows past N read row N - 1 and are not written.
    var base: array<u32, NA>;
    for (var r = 0u; r < RPW; r++) {
        let row = min(row0 + r, p.N - 1u);
        base[r] = row * k8;
        base[RPW + r] = (row + p.N) * k8;
    }
    var acc: array<f32, NA>;
    for (var a = 0u; a < NA; a++) { acc[a] = 0.0; }
    // U K steps per iteration, unrolled, so each lane has 8 (SwiGLU: 16) independent
    // weight loads in flight: the short matrices of a layer are latency-bound otherwise.
    // Two copies of the loop keep the SwiGLU test out of the unrolled body.
    var k = lane;
    if (swiglu) {
        for (; k + (U - 1u) * LANES < k8; k += U * LANES) {
            for (var u = 0u; u < U; u++) {
                let kk = k + u * LANES;
                let x0 = xv(2u * kk, inv);
                let x1 = xv(2u * kk + 1u, inv);
                for (var r = 0u; r < NA; r++) { acc[r] += dot8(W[base[r] + kk], x0, x1); }
            }
        }
        for (; k < k8; k += LANES) {
            let x0 = xv(2u * k, inv);
            let x1 = xv(2u * k + 1u, inv);
            for (var r = 0u; r < NA; r++) { acc[r] += dot8(W[base[r] + k], x0, x1); }
        }
    } else {
        for (; k + (U - 1u) * LANES < k8; k += U * LANES) {
            for (var u = 0u; u < U; u++) {
                let kk = k + u * LANES;
                let x0 = xv(2u * kk, inv);
                let x1 = xv(2u * kk + 1u, inv);
                for (var r = 0u; r < RPW; r++) { acc[r] += dot8(W[base[r] + kk], x0, x1); }
            }
        }
        for (; k < k8; k += LANES) {
            let x0 = xv(2u * k, inv);
            let x1 = xv(2u * k + 1u, inv);
            for (var r = 0u; r < RPW; r++) { acc[r] += dot8(W[base[r] + k], x0, x1); }
        }
    }
    for (var a = 0u; a < NA; a++) { part[a * 256u + li] = acc[a]; }
    workgroupBarrier();
    for (var s = LANES / 2u; s > 0u; s >>= 1u) {
        if (lane < s) {
            for (var a = 0u; a < NA; a++) { part[a * 256u + li] += part[a * 256u + li + s]; }
        }
        workgroupBarrier();
    }
    // Lane r of each group writes the group's row r.
    let row = row0 + lane;
    if (lane < RPW && row < p.N) {
        var v = part[lane * 256u + grp * LANES];
        var u = part[(RPW + lane) * 256u + grp * LANES];
        if ((p.flags & 2u) != 0u) {
            v += B[p.n0 + row];
            if (swiglu) { u += B[p.n0 + p.N + row]; }
        }
        if (swiglu) { v = v / (1.0 + exp(-v)) * u; }
        let idx = p.y_off + p.n0 + row;
        if ((p.flags & 1u) != 0u) { v += Y[idx]; }
        Y[idx] = v;
    }
}
