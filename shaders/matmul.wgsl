// Prefill GEMM: Y[m, n0 + n] (+)= sum_k X[m, k] * W[n, k] (+ B[n0 + n])
// X: f32 [M, K] at element offset x_off (row stride K). W: f16 pairs [N, K] (one part
// of a possibly split weight, rows n0..n0+N of the whole). Y: f32, row stride ldy.
// Tiles of 64 x 64 outputs, K in steps of 16, 256 threads each computing 4 x 4.

struct Params {
    M: u32, N: u32, K: u32, x_off: u32,
    y_off: u32, ldy: u32, n0: u32, flags: u32, // flags: 1 = accumulate into Y, 2 = add bias
    // Split-K (`matmul` only; few rows leave the GPU idle otherwise): workgroup z sums
    // k in [z * kc, (z + 1) * kc) and, when split_stride > 0, writes its raw partial
    // sums to Y[z * split_stride + m * N + n]; matmul_reduce.wgsl adds them up.
    kc: u32, split_stride: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> W: array<u32>;
@group(0) @binding(3) var<storage, read> B: array<f32>;
@group(0) @binding(4) var<storage, read_write> Y: array<f32>;

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> xs: array<f32, 1024>; // [TK][TM]
var<workgroup> ws: array<f32, 1024>; // [TK][TN]

@compute @workgroup_size(16, 16)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let m_base = wg.y * TM;
    let n_base = wg.x * TN;
    // Thread (x, y) owns rows y + 16i and columns x + 16j, i, j < 4. Accumulators are
    // named vectors, not an indexed array, so they stay in registers.
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    let kw = p.K / 2u; // words per weight row (K is even)
    let kb = wg.z * p.kc;
    let ke = min(p.K, kb + p.kc);
    for (var k0 = kb; k0 < ke; k0 += TK) {
        for (var i = 0u; i < 4u; i++) {
            let e = li + 256u * i;
            let r = e / TK;
            let kk = e % TK;
            let gm = m_base + r;
            let gk = k0 + kk;
            var v = 0.0;
            if (gm < p.M && gk < ke) { v = X[p.x_off + gm * p.K + gk]; }
            xs[kk * TM + r] = v;
        }
        for (var i = 0u; i < 2u; i++) {
            let e = li + 256u * i;
            let r = e / 8u;
            let kp = e % 8u;
            let gn = n_base + r;
            let gk = k0 + kp * 2u;
            var v = vec2<f32>(0.0, 0.0);
            if (gn < p.N && gk < ke) { v = unpack2x16float(W[gn * kw + gk / 2u]); }
            ws[(kp * 2u) * TN + r] = v.x;
            ws[(kp * 2u + 1u) * TN + r] = v.y;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let xo = kk * TM + lid.y;
            let wo = kk * TN + lid.x;
            let b = vec4<f32>(ws[wo], ws[wo + 16u], ws[wo + 32u], ws[wo + 48u]);
            c0 = fma(vec4<f32>(xs[xo]), b, c0);
            c1 = fma(vec4<f32>(xs[xo + 16u]), b, c1);
            c2 = fma(vec4<f32>(xs[xo + 32u]), b, c2);
            c3 = fma(vec4<f32>(xs[xo + 48u]), b, c3);
        }
        workgroupBarrier();
    }
    if (p.split_stride > 0u) {
        store_part(wg.z, m_base + lid.y, n_base + lid.x, c0);
        store_part(wg.z, m_base + lid.y + 16u, n_base + lid.x, c1);
        store_part(wg.z, m_base + lid.y + 32u, n_base + lid.x, c2);
        store_part(wg.z, m_base + lid.y + 48u, n_base + lid.x, c3);
        return;
    }
    store_row(m_base + lid.y, n_base + lid.x, c0);
    store_row(m_base + lid.y + 16u, n_base + lid.x, c1);
    store_row(m_base + lid.y + 32u, n_base + lid.x, c2);
    store_row(m_base + lid.y + 48u, n_base + lid.x, c3);
}

// Split-K partial sums of row gm (columns gn + 16j) of split z.
fn store_part(z: u32, gm: u32, gn: u32, c: vec4<f32>) {
    if (gm >= p.M) { return; }
    for (var j = 0u; j < 4u; j++) {
        let n = gn + 16u * j;
        if (n < p.N) { Y[z * p.split_stride + gm * p.N + n] = c[j]; }
    }
}

// Write one thread's 4 outputs of row gm (columns gn, gn + 16, gn + 32, gn + 48).
fn store_row(gm: u32, gn: u32, c: vec4<f32>) {
    if (gm >= p.M) { return; }
    for (var j = 0u; j < 4u; j++) {
        let n = gn + 16u * j;
        if (n >= p.N) { continue; }
        var v = c[j];
        if ((p.flags & 2u) != 0u) { v += B[p.n0 + n]; }
        let idx = p.y_off + gm * p.ldy + p.n0 + n;
        if ((p.flags & 1u) != 0u) { v += Y[idx]; }
        Y[idx] = v;
    }
}

// Variant for CPU adapters (lavapipe/llvmpipe): no workgroup memory or barriers; each
// invocation computes a 4 x 4 block of outputs straight from memory (the CPU's caches
// do the tiling). Neighbouring invocations take neighbouring column blocks.
@compute @workgroup_size(64)
fn matmul_blocks(@builtin(global_invocation_id) gid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let nb = (p.N + 3u) / 4u;
    let id = gid.x + gid.y * nwg.x * 64u;
    let mb = (p.M + 3u) / 4u;
    if (id >= nb * mb) { return; }
    let n_base = (id % nb) * 4u;
    let m_base = (id / nb) * 4u;
    let kw = p.K / 2u;
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) { acc[i] = 0.0; }
    // rows / cols past the edge read row 0 / col 0 and are never written
    var xr: array<u32, 4>;
    var wr: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) {
        xr[i] = p.x_off + select(0u, (m_base + i) * p.K, m_base + i < p.M);
        wr[i] = select(0u, (n_base + i) * kw, n_base + i < p.N);
    }
    for (var kp = 0u; kp < kw; kp++) {
        var w: array<vec2<f32>, 4>;
        for (var j = 0u; j < 4u; j++) { w[j] = unpack2x16float(W[wr[j] + kp]); }
        for (var i = 0u; i < 4u; i++) {
            let x0 = X[xr[i] + 2u * kp];
            let x1 = X[xr[i] + 2u * kp + 1u];
            for (var j = 0u; j < 4u; j++) {
                acc[i * 4u + j] = fma(x0, w[j].x, fma(x1, w[j].y, acc[i * 4u + j]));
            }
        }
    }
    for (var i = 0u; i < 4u; i++) {
        let gm = m_base + i;
        if (gm >= p.M) { continue; }
        for (var j = 0u; j < 4u; j++) {
            let gn = n_base + j;
            if (gn >= p.N) { continue; }
            var v = acc[i * 4u + j];
            if ((p.flags & 2u) != 0u) { v += B[p.n0 + gn]; }
            let idx = p.y_off + gm * p.ldy + p.n0 + gn;
            if ((p.flags & 1u) != 0u) { v += Y[idx]; }
            Y[idx] = v;
        }
    }
}
