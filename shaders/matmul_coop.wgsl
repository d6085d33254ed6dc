// Prefill GEMM on cooperative matrices (tensor cores): Y[m, n0 + n] (+)= sum_k X[m, k] *
// W[n, k] (+ Bias[n0 + n]), the parameters, flags and split-K of matmul.wgsl.
//
// The host prepends the shape constants (see `ops::coop`):
//   T         the fragment size: T x T x T f16 products with f32 accumulators
//             (16 on NVIDIA, 8 on lavapipe);
//   SG        the subgroup size (the workgroup is SGM * SGN subgroups);
//   SGM, SGN  subgroups along M and N; FM, FN fragments per subgroup along M and N.
// A workgroup computes BM x BN outputs, BM = SGM * FM * T, BN = SGN * FN * T, walking K in
// steps of BK = 2T: it stages the X tile (f32 -> f16) and the W tile (f16 pairs) in
// workgroup memory, row-major with BKP = BK + 8 halves per row (a 16-byte pad against
// bank conflicts), then each subgroup multiplies its FM x FN fragments from there.
// X rows are read as vec4 (K % 4 == 0, x_off % 4 == 0), W rows as pairs (K % 2 == 0).
// Results leave through a T x T f32 patch per subgroup in workgroup memory, so the
// store can apply bounds, bias and accumulate per element.
// X values are rounded to f16 for the product (clamped to the f16 range); the sums
// are f32.

enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    M: u32, N: u32, K: u32, x_off: u32,
    y_off: u32, ldy: u32, n0: u32, flags: u32, // 1 = accumulate into Y, 2 = add bias
    kc: u32, split_stride: u32,                // split-K, as in matmul.wgsl
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> X: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> W: array<u32>;
@group(0) @binding(3) var<storage, read> Bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> Y: array<f32>;

const WG: u32 = SG * SGM * SGN;
const BM: u32 = SGM * FM * T;
const BN: u32 = SGN * FN * T;
const BK: u32 = 2u * T;
const BKP: u32 = BK + 8u;
const NF: u32 = FM * FN;

var<workgroup> xs: array<f16, BM * BKP>;  // [BM][BKP]: X rows, k along the row
var<workgroup> ws: array<f16, BN * BKP>;  // [BN][BKP]: W rows, k along the row
var<workgroup> cs: array<f32, SGM * SGN * T * T>; // one T x T result patch per subgroup

@compute @workgroup_size(WG)
fn matmul_coop(@builtin(workgroup_id) wg: vec3<u32>,
               @builtin(local_invocation_index) li: u32,
               @builtin(subgroup_id) sg: u32,
               @builtin(subgroup_invocation_id) lane: u32) {
    let m_base = wg.y * BM;
    let n_base = wg.x * BN;
    let sm = sg / SGN; // this subgroup's block: rows sm * FM * T, columns sn * FN * T
    let sn = sg % SGN;
    var acc: array<coop_mat{T}x{T}<f32, C>, NF>;
    for (var f = 0u; f < NF; f++) { acc[f] = coop_mat{T}x{T}<f32, C>(); }
    let k4 = p.K / 4u;
    let xb = p.x_off / 4u;
    let kw = p.K / 2u;
    let kb = wg.z * p.kc;
    let ke = min(p.K, kb + p.kc);
    for (var k0 = kb; k0 < ke; k0 += BK) {
        // X tile: BM x BK floats as BM * BK / 4 vec4, rounded to f16.
        for (var e = li; e < BM * BK / 4u; e += WG) {
            let r = e / (BK / 4u);
            let c = e % (BK / 4u);
            let gm = m_base + r;
            let gk = k0 + 4u * c;
            var v = vec4<f32>(0.0);
            if (gm < p.M && gk < ke) { v = X[xb + gm * k4 + gk / 4u]; }
            let h = vec4<f16>(clamp(v, vec4<f32>(-65504.0), vec4<f32>(65504.0)));
            let o = r * BKP + 4u * c;
            xs[o] = h.x;
            xs[o + 1u] = h.y;
            xs[o + 2u] = h.z;
            xs[o + 3u] = h.w;
        }
        // W tile: BN x BK halves as BN * BK / 2 words.
        for (var e = li; e < BN * BK / 2u; e += WG) {
            let r = e / (BK / 2u);
            let c = e % (BK / 2u);
            let gn = n_base + r;
            let gk = k0 + 2u * c;
            var v = 0u;
            if (gn < p.N && gk < ke) { v = W[gn * kw + gk / 2u]; }
            let h = vec2<f16>(unpack2x16float(v));
            let o = r * BKP + 2u * c;
            ws[o] = h.x;
            ws[o + 1u] = h.y;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk += T) {
            var b: array<coop_mat{T}x{T}<f16, B>, FN>;
            for (var j = 0u; j < FN; j++) {
                // B[k][n] = W[n][k]: column n of B is row n of the tile (column-major).
                let n = (sn * FN + j) * T;
                b[j] = coopLoad<coop_mat{T}x{T}<f16, B>>(&ws[n * BKP + kk], BKP);
            }
            for (var i = 0u; i < FM; i++) {
                let m = (sm * FM + i) * T;
                let a = coopLoadT<coop_mat{T}x{T}<f16, A>>(&xs[m * BKP + kk], BKP);
                for (var j = 0u; j < FN; j++) {
                    acc[i * FN + j] = coopMultiplyAdd(a, b[j], acc[i * FN + j]);
                }
            }
        }
        workgroupBarrier();
    }
    let pat = sg * T * T;
    for (var f = 0u; f < NF; f++) {
        coopStoreT(acc[f], &cs[pat], T);
        workgroupBarrier();
        let m0 = m_base + (sm * FM + f / FN) * T;
        let c0 = n_base + (sn * FN + f % FN) * T;
        for (var e = lane; e < T * T; e += SG) {
            let gm = m0 + e / T;
            let gn = c0 + e % T;
            if (gm < p.M && gn < p.N) {
                var v = cs[pat + e];
                if (p.split_stride > 0u) {
                    Y[wg.z * p.split_stride + gm * p.N + gn] = v;
                } else {
                    if ((p.flags & 2u) != 0u) { v += Bias[p.n0 + gn]; }
                    let idx = p.y_off + gm * p.ldy + p.n0 + gn;
                    if ((p.flags & 1u) != 0u) { v += Y[idx]; }
                    Y[idx] = v;
                }
            }
        }
        workgroupBarrier();
    }
}
