// GEMM for a few rows of X (the KVLink question, a short prompt): Y[m, n0 + n] (+)=
// X[m, :] . W[n, :] (+ B[n0 + n]), the parameters and flags of matmul.wgsl.
// The 64x64-tiled kernel leaves most of a large GPU idle here and each of its few tiles
// walks all of K alone. In this one a group of 32 threads takes RPW weight rows and
// splits K between its threads (16-byte weight loads, each f16 unpacked once and used for
// all MB rows of X); the MB rows of X are staged through workgroup memory in chunks of
// 256 and shared by the 8 groups; the 32 partial sums of each output are added through
// workgroup memory at the end (no subgroup operations).
// Needs K % 8 == 0 and x_off % 4 == 0. Grid: x = ceil(N / 32), y = ceil(M / MB).

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

const MB: u32 = 16u;          // rows of X per workgroup
const RPW: u32 = 4u;          // weight rows per group of 32 threads
const RW: u32 = 32u;          // weight rows per workgroup (8 groups)
const KC4: u32 = 64u;         // vec4 of K per chunk (256 values: 8 per thread)
const LS: u32 = 33u;          // padded thread stride of the reduction
// One buffer, two uses: the staged X chunk (MB x KC4 vec4), then the reduction
// (8 groups x MB x LS floats = 1056 vec4).
var<workgroup> sh: array<vec4<f32>, 1056>;

fn red_set(i: u32, v: f32) { sh[i / 4u][i % 4u] = v; }
fn red_get(i: u32) -> f32 { return sh[i / 4u][i % 4u]; }

@compute @workgroup_size(256)
fn matmul_skinny(@builtin(workgroup_id) wg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let g = li / 32u;
    let l = li % 32u;
    let m0 = wg.y * MB;
    let k8 = p.K / 8u;
    let k4 = p.K / 4u;
    let xb = p.x_off / 4u;
    let nb = wg.x * RW + g * RPW;
    let r0 = min(nb, p.N - 1u) * k8;
    let r1 = min(nb + 1u, p.N - 1u) * k8;
    let r2 = min(nb + 2u, p.N - 1u) * k8;
    let r3 = min(nb + 3u, p.N - 1u) * k8;
    var acc: array<vec4<f32>, MB>; // acc[t]: rows nb .. nb + 3 for row m0 + t of X
    for (var t = 0u; t < MB; t++) { acc[t] = vec4<f32>(0.0); }
    for (var c0 = 0u; c0 < k4; c0 += KC4) {
        workgroupBarrier();
        for (var i = li; i < MB * KC4; i += 256u) {
            let mm = i / KC4;
            let c = i % KC4;
            var v = vec4<f32>(0.0);
            if (m0 + mm < p.M && c0 + c < k4) { v = X[xb + (m0 + mm) * k4 + c0 + c]; }
            sh[i] = v;
        }
        workgroupBarrier();
        let kv = c0 / 2u + l; // this thread's 8 weights of the chunk
        if (kv < k8) {
            let w0 = W[r0 + kv];
            let w1 = W[r1 + kv];
            let w2 = W[r2 + kv];
            let w3 = W[r3 + kv];
            let a0 = vec4<f32>(unpack2x16float(w0.x), unpack2x16float(w0.y));
            let b0 = vec4<f32>(unpack2x16float(w0.z), unpack2x16float(w0.w));
            let a1 = vec4<f32>(unpack2x16float(w1.x), unpack2x16float(w1.y));
            let b1 = vec4<f32>(unpack2x16float(w1.z), unpack2x16float(w1.w));
            let a2 = vec4<f32>(unpack2x16float(w2.x), unpack2x16float(w2.y));
            let b2 = vec4<f32>(unpack2x16float(w2.z), unpack2x16float(w2.w));
            let a3 = vec4<f32>(unpack2x16float(w3.x), unpack2x16float(w3.y));
            let b3 = vec4<f32>(unpack2x16float(w3.z), unpack2x16float(w3.w));
            for (var t = 0u; t < MB; t++) {
                let x0 = sh[t * KC4 + 2u * l];
                let x1 = sh[t * KC4 + 2u * l + 1u];
                acc[t] += vec4<f32>(dot(x0, a0) + dot(x1, b0), dot(x0, a1) + dot(x1, b1),
                                    dot(x0, a2) + dot(x1, b2), dot(x0, a3) + dot(x1, b3));
            }
        }
    }
    finish(&acc, wg.x, m0, li);
}

// The 32 partial sums of each output, added through workgroup memory; bias, accumulate
// and the store.
fn finish(acc: ptr<function, array<vec4<f32>, MB>>, wx: u32, m0: u32, li: u32) {
    let g = li / 32u;
    let l = li % 32u;
    for (var r = 0u; r < RPW; r++) {
        workgroupBarrier();
        // Component r by selects: a dynamic vector index in this loop (not unrolled,
        // it has barriers) could push the accumulators out of registers.
        for (var t = 0u; t < MB; t++) {
            let a = (*acc)[t];
            red_set((g * MB + t) * LS + l, select(select(select(a.x, a.y, r == 1u), a.z, r == 2u), a.w, r == 3u));
        }
        workgroupBarrier();
        if (li < 8u * MB) {
            let gg = li / MB;
            let t = li % MB;
            var v = 0.0;
            for (var j = 0u; j < 32u; j++) { v += red_get((gg * MB + t) * LS + j); }
            let n = wx * RW + gg * RPW + r;
            let m = m0 + t;
            if (n < p.N && m < p.M) {
                if ((p.flags & 2u) != 0u) { v += B[p.n0 + n]; }
                let idx = p.y_off + m * p.ldy + p.n0 + n;
                if ((p.flags & 1u) != 0u) { v += Y[idx]; }
                Y[idx] = v;
            }
        }
    }
}
