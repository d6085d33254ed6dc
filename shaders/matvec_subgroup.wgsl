// Decode GEMV on subgroups: the contract of matvec_vec4.wgsl (flags 1 accumulate, 2 bias,
// 4 SwiGLU pairs, 8 RMSNorm of X first; K % 8 == 0) without workgroup memory or barriers,
// for adapters with subgroup operations of one fixed size.
// Each subgroup computes RPW output rows (gemv_subgroup.wgsl, which the host prepends with
// `const RPW: u32`, 1, 2 or 4, and `const SGS: u32`, the subgroup size): its lanes walk K
// in 16-byte steps with several weight loads in flight, the RPW sums in the lanes of one
// vec4, then one subgroupAdd. With flag 8 each subgroup reduces X's squares itself (a
// subgroupAdd, no barrier). A workgroup is 256 invocations = 256 / SGS subgroups.


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

@compute @workgroup_size(256)
fn matvec_subgroup(@builtin(workgroup_id) wg: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(subgroup_id) sg: u32,
                   @builtin(subgroup_invocation_id) lane: u32) {
    let row0 = (wg.x + wg.y * nwg.x) * ROWS + sg * RPW;
    if (row0 >= p.N) { return; } // whole subgroups only: no barrier follows
    let swiglu = (p.flags & 4u) != 0u;
    let inv = x_inv_rms(lane, p.eps);
    let k8 = p.K / 8u;
    // Word offsets of the rows (rows past N read row N - 1 and are not written).
    let last = p.N - 1u;
    let g = vec4<u32>(min(row0, last), min(row0 + 1u, last), min(row0 + 2u, last), min(row0 + 3u, last)) * k8;
    let u = g + vec4<u32>(p.N * k8); // the SwiGLU up rows
    let sums = gemv_rows(g, u, swiglu, lane, inv);
    let tot = sums[0];
    let tup = sums[1];
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
