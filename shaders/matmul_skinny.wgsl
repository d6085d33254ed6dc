// GEMM for a few rows of X (the KVLink question, a short prompt): Y[m, n0 + n] (+)=
// X[m, :] . W[n, :] (+ B[n0 + n]), the parameters and flags of matmul.wgsl.
// The 64x64-tiled kernel leaves most of a large GPU idle here and each of its few tiles
// walks all of K alone. In this one a thread owns one row of X (up to 32 per workgroup,
// staged through workgroup memory in chunks of K) and RPW weight rows; the 32 threads of
// a row group read the same weight words (one broadcast load), so every weight is read
// once per 32 rows of X and no cross-thread reduction is needed.
// Needs K % 8 == 0 and x_off % 4 == 0. Grid: x = ceil(N / 32), y = ceil(M / 32).

struct Params {
    M: u32, N: u32, K: u32, x_off: u32,
    y_off: u32, ldy: u32, n0: u32, flags: u32, // 1 = accumulate into Y, 2 = add bias
    kc: u32, split_stride: u32,                // unused here (split-K of matmul.wgsl)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> X: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> W: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> B: array<f32>;
@group(0) @binding(4) var<storage, read_write> Y: array<f32>;

const MB: u32 = 32u;        // rows of X per workgroup (one per thread of a group)
const RPW: u32 = 4u;        // weight rows per group of 32 threads
const RW: u32 = 32u;        // weight rows per workgroup (8 groups)
const KC: u32 = 128u;       // K per chunk
const XS: u32 = KC / 4u + 1u; // vec4 stride of a staged X row (padded: no bank conflicts)

var<workgroup> xs: array<vec4<f32>, MB * XS>;

@compute @workgroup_size(256)
fn matmul_skinny(@builtin(workgroup_id) wg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let g = li / 32u;
    let t = li % 32u;
    let m0 = wg.y * MB;
    let k8 = p.K / 8u;
    let k4 = p.K / 4u;
    let xb = p.x_off / 4u;
    let nb = wg.x * RW + g * RPW;
    var w_row: array<u32, RPW>;
    for (var r = 0u; r < RPW; r++) { w_row[r] = min(nb + r, p.N - 1u) * k8; }
    var acc = vec4<f32>(0.0); // rows nb .. nb + 3 (RPW = 4)
    for (var k0 = 0u; k0 < p.K; k0 += KC) {
        workgroupBarrier();
        for (var i = li; i < MB * (KC / 4u); i += 256u) {
            let mm = i / (KC / 4u);
            let c = i % (KC / 4u);
            var v = vec4<f32>(0.0);
            if (m0 + mm < p.M && k0 + 4u * c < p.K) { v = X[xb + (m0 + mm) * k4 + k0 / 4u + c]; }
            xs[mm * XS + c] = v;
        }
        workgroupBarrier();
        let steps = min(KC, p.K - k0) / 8u;
        let kw = k0 / 8u;
        for (var j = 0u; j < steps; j++) {
            let x0 = xs[t * XS + 2u * j];
            let x1 = xs[t * XS + 2u * j + 1u];
            let w0 = W[w_row[0] + kw + j];
            let w1 = W[w_row[1] + kw + j];
            let w2 = W[w_row[2] + kw + j];
            let w3 = W[w_row[3] + kw + j];
            acc += vec4<f32>(
                dot(x0, vec4<f32>(unpack2x16float(w0.x), unpack2x16float(w0.y)))
                    + dot(x1, vec4<f32>(unpack2x16float(w0.z), unpack2x16float(w0.w))),
                dot(x0, vec4<f32>(unpack2x16float(w1.x), unpack2x16float(w1.y)))
                    + dot(x1, vec4<f32>(unpack2x16float(w1.z), unpack2x16float(w1.w))),
                dot(x0, vec4<f32>(unpack2x16float(w2.x), unpack2x16float(w2.y)))
                    + dot(x1, vec4<f32>(unpack2x16float(w2.z), unpack2x16float(w2.w))),
                dot(x0, vec4<f32>(unpack2x16float(w3.x), unpack2x16float(w3.y)))
                    + dot(x1, vec4<f32>(unpack2x16float(w3.z), unpack2x16float(w3.w))));
        }
    }
    let m = m0 + t;
    if (m >= p.M) { return; }
    for (var r = 0u; r < RPW; r++) {
        let n = nb + r;
        if (n < p.N) {
            var v = acc[r];
            if ((p.flags & 2u) != 0u) { v += B[p.n0 + n]; }
            let idx = p.y_off + m * p.ldy + p.n0 + n;
            if ((p.flags & 1u) != 0u) { v += Y[idx]; }
            Y[idx] = v;
        }
    }
}
