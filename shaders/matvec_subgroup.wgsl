// Decode GEMV on subgroups: the contract of matvec_vec4.wgsl (flags 1 accumulate, 2 bias,
// 4 SwiGLU pairs, 8 RMSNorm of X first; K % 8 == 0) without workgroup memory or barriers,
// for adapters with subgroup operations of one fixed size.
// Each subgroup computes RPW output rows (the host prepends `const RPW: u32`, 1, 2 or 4,
// and `const SGS: u32`, the subgroup size): its lanes walk K in vec4<u32> steps (8 halves,
// 16-byte loads), four steps unrolled so each lane has 4 RPW (SwiGLU: 8 RPW) weight loads
// in flight, the RPW sums in the lanes of one vec4, then one subgroupAdd. With flag 8 each
// subgroup reduces X's squares itself (a subgroupAdd, no barrier). A workgroup is 256
// invocations = 256 / SGS subgroups.


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

const SUBGROUPS: u32 = 256u / SGS;
const ROWS: u32 = SUBGROUPS * RPW; // output rows per workgroup

fn dot8(w: vec4<u32>, x0: vec4<f32>, x1: vec4<f32>) -> f32 {
    let a = unpack2x16float(w.x);
    let b = unpack2x16float(w.y);
    let c = unpack2x16float(w.z);
    let d = unpack2x16float(w.w);
    return dot(vec4<f32>(a, b), x0) + dot(vec4<f32>(c, d), x1);
}

// The RPW rows (r0 + i, clamped to the matrix) against X's 8 values at vec4<u32> step k.
fn step4(r: vec4<u32>, k: u32, x0: vec4<f32>, x1: vec4<f32>) -> vec4<f32> {
    var s = vec4<f32>(0.0);
    s.x = dot8(W[r.x + k], x0, x1);
    if (RPW > 1u) { s.y = dot8(W[r.y + k], x0, x1); }
    if (RPW > 2u) {
        s.z = dot8(W[r.z + k], x0, x1);
        s.w = dot8(W[r.w + k], x0, x1);
    }
    return s;
}

fn xv(i: u32, inv: f32) -> vec4<f32> {
    let v = X[p.x_off / 4u + i];
    if ((p.flags & 8u) != 0u) { return v * inv * NW[i]; }
    return v;
}

@compute @workgroup_size(256)
fn matvec_subgroup(@builtin(workgroup_id) wg: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(subgroup_id) sg: u32,
                   @builtin(subgroup_invocation_id) lane: u32) {
    let row0 = (wg.x + wg.y * nwg.x) * ROWS + sg * RPW;
    if (row0 >= p.N) { return; } // whole subgroups only: no barrier follows
    let swiglu = (p.flags & 4u) != 0u;
    var inv = 1.0;
    if ((p.flags & 8u) != 0u) {
        var ss = 0.0;
        for (var i = lane; i < p.K / 4u; i += SGS) {
            let v = X[p.x_off / 4u + i];
            ss += dot(v, v);
        }
        inv = inverseSqrt(subgroupAdd(ss) / f32(p.K) + p.eps);
    }
    let k8 = p.K / 8u;
    // Word offsets of the rows (rows past N read row N - 1 and are not written).
    let last = p.N - 1u;
    let g = vec4<u32>(min(row0, last), min(row0 + 1u, last), min(row0 + 2u, last), min(row0 + 3u, last)) * k8;
    let u = g + vec4<u32>(p.N * k8); // the SwiGLU up rows
    var acc = vec4<f32>(0.0);
    var acu = vec4<f32>(0.0);
    var k = lane;
    for (; k + 3u * SGS < k8; k += 4u * SGS) {
        let xa = xv(2u * k, inv);
        let xb = xv(2u * k + 1u, inv);
        let xc = xv(2u * (k + SGS), inv);
        let xd = xv(2u * (k + SGS) + 1u, inv);
        let xe = xv(2u * (k + 2u * SGS), inv);
        let xf = xv(2u * (k + 2u * SGS) + 1u, inv);
        let xg = xv(2u * (k + 3u * SGS), inv);
        let xh = xv(2u * (k + 3u * SGS) + 1u, inv);
        acc += step4(g, k, xa, xb) + step4(g, k + SGS, xc, xd)
             + step4(g, k + 2u * SGS, xe, xf) + step4(g, k + 3u * SGS, xg, xh);
        if (swiglu) {
            acu += step4(u, k, xa, xb) + step4(u, k + SGS, xc, xd)
                 + step4(u, k + 2u * SGS, xe, xf) + step4(u, k + 3u * SGS, xg, xh);
        }
    }
    for (; k < k8; k += SGS) {
        let x0 = xv(2u * k, inv);
        let x1 = xv(2u * k + 1u, inv);
        acc += step4(g, k, x0, x1);
        if (swiglu) { acu += step4(u, k, x0, x1); }
    }
    let tot = subgroupAdd(acc);
    let tup = subgroupAdd(acu);
    // Lane i writes row row0 + i.
    let row = row0 + lane;
    if (lane < RPW && row < p.N) {
        var v = tot[lane];
        var w = tup[lane];
        if ((p.flags & 2u) != 0u) {
            v += B[p.n0 + row];
            if (swiglu) { w += B[p.n0 + p.N + row]; }
        }
        if (swiglu) { v = v / (1.0 + exp(-v)) * w; }
        let idx = p.y_off + p.n0 + row;
        if ((p.flags & 1u) != 0u) { v += Y[idx]; }
        Y[idx] = v;
    }
}
