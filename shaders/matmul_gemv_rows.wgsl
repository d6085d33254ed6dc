// A GEMM of a few rows (a batch decode step, a short question) as a GEMV that reads each
// weight once for all of them: Y[m, n0 + n] (+)= X[m, :] . W[n, :] (+ B[n0 + n]) for
// m < M, matmul.wgsl's parameters and flags (1 accumulate, 2 bias; K % 8 == 0, X rows
// 16-byte aligned). The host prepends gemv_subgroup.wgsl's `const RPW: u32` (weight rows
// per subgroup: 1, 2 or 4) and `const SGS: u32` (the fixed subgroup size), and
// `const MR: u32` (X rows per pass, at most 8).
// Each subgroup takes RPW weight rows; its lanes walk K in 16-byte steps, unpack the RPW
// weight vectors once per step and dot them with MR rows of X (reads that all subgroups
// share through the cache), then one subgroupAdd per X row. More than MR rows: further
// passes over the same weights (from L2). No workgroup memory, no barriers.

struct Params {
    M: u32, N: u32, K: u32, x_off: u32,
    y_off: u32, ldy: u32, n0: u32, flags: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> X: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> W: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> B: array<f32>;
@group(0) @binding(4) var<storage, read_write> Y: array<f32>;

const SUBGROUPS: u32 = 256u / SGS;
const ROWS: u32 = SUBGROUPS * RPW; // weight rows per workgroup

fn unpack8(w: vec4<u32>) -> array<vec4<f32>, 2> {
    return array<vec4<f32>, 2>(vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)),
                               vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w)));
}

@compute @workgroup_size(256)
fn matmul_gemv_rows(@builtin(workgroup_id) wg: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(subgroup_id) sg: u32,
                    @builtin(subgroup_invocation_id) lane: u32) {
    let row0 = (wg.x + wg.y * nwg.x) * ROWS + sg * RPW;
    if (row0 >= p.N) { return; } // whole subgroups only: no barrier follows
    let k8 = p.K / 8u;
    let k4 = p.K / 4u;
    // Word offsets of the rows (rows past N read row N - 1 and are not written).
    let last = p.N - 1u;
    let g = vec4<u32>(min(row0, last), min(row0 + 1u, last), min(row0 + 2u, last),
                      min(row0 + 3u, last)) * k8;
    for (var m0 = 0u; m0 < p.M; m0 += MR) {
        let nm = min(MR, p.M - m0); // uniform
        var acc: array<vec4<f32>, MR>;
        for (var m = 0u; m < MR; m++) { acc[m] = vec4<f32>(0.0); }
        for (var k = lane; k < k8; k += SGS) {
            let a = unpack8(W[g.x + k]);
            var b = a;
            var c = a;
            var d = a;
            if (RPW > 1u) { b = unpack8(W[g.y + k]); }
            if (RPW > 2u) {
                c = unpack8(W[g.z + k]);
                d = unpack8(W[g.w + k]);
            }
            for (var m = 0u; m < MR; m++) {
                if (m < nm) {
                    let xi = p.x_off / 4u + (m0 + m) * k4 + 2u * k;
                    let x0 = X[xi];
                    let x1 = X[xi + 1u];
                    var s = vec4<f32>(0.0);
                    s.x = dot(a[0], x0) + dot(a[1], x1);
                    if (RPW > 1u) { s.y = dot(b[0], x0) + dot(b[1], x1); }
                    if (RPW > 2u) {
                        s.z = dot(c[0], x0) + dot(c[1], x1);
                        s.w = dot(d[0], x0) + dot(d[1], x1);
                    }
                    acc[m] += s;
                }
            }
        }
        for (var m = 0u; m < MR; m++) {
            if (m < nm) {
                let tot = subgroupAdd(acc[m]);
                // Lane i writes weight row row0 + i of X row m0 + m.
                let row = row0 + lane;
                if (lane < RPW && row < p.N) {
                    var v = tot[lane];
                    if ((p.flags & 2u) != 0u) { v += B[p.n0 + row]; }
                    let idx = p.y_off + (m0 + m) * p.ldy + p.n0 + row;
                    if ((p.flags & 1u) != 0u) { v += Y[idx]; }
                    Y[idx] = v;
                }
            }
        }
    }
}
