// Prefill GEMM on cooperative matrices (tensor cores): Y[m, n0 + n] (+)= sum_k X[m, k] *
// W[n, k] (+ Bias[n0 + n]), the parameters, flags and split-K of matmul.wgsl.
//
// A template: `ops::coop` prepends the shape constants and expands the `//@` lines into
// straight-line code (named accumulators and fragments, no arrays or loops over them, so
// they stay in registers whatever the driver unrolls):
//   T         the fragment size: T x T x T f16 products with f32 sums (16 on NVIDIA, 8 on
//             lavapipe), spliced into the type names `coop_mat{T}x{T}`;
//   SG        the subgroup size; the workgroup is SGM x SGN subgroups;
//   FM, FN    fragments per subgroup along M and N;
//   KF        fragments of K per staged step.
// A workgroup computes BM x BN outputs (BM = SGM FM T, BN = SGN FN T), walking K in steps
// of BK = KF T (KF = 2, or 4). Each step's X tile (f32, rounded to f16) and W tile (f16) are staged in
// workgroup memory, row-major with BKP = BK + 8 halves per row (a 16-byte pad against
// bank conflicts); the next step's tiles are fetched into registers while the tensor
// cores work on this one. X is read as vec4<f32> (K % 4 == 0, x_off % 4 == 0), W as
// vec4<u32> = 8 halves (K % 8 == 0). Variant "vector tiles": xs and ws hold vec4<f16>
// (4-half stores, fragments loaded through vec4 pointers with the stride in vec4s).
// Variant "direct B" (the tile's rows all inside N,
// K % BK == 0): W is bound as f16 and the B fragments are loaded from it directly (column
// n of B is row n of W, stride K), no W staging. Results leave through a T x T f32 patch per subgroup
// in workgroup memory so the store can apply bounds, bias and accumulate per element.
// X values are clamped to the f16 range before rounding.

enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    M: u32, N: u32, K: u32, x_off: u32,
    y_off: u32, ldy: u32, n0: u32, flags: u32, // 1 = accumulate into Y, 2 = add bias
    kc: u32, split_stride: u32,                // split-K, as in matmul.wgsl
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> X: array<vec4<f32>>;
//@ w binding
@group(0) @binding(3) var<storage, read> Bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> Y: array<f32>;

const WG: u32 = SG * SGM * SGN;
const BM: u32 = SGM * FM * T;
const BN: u32 = SGN * FN * T;
const BK: u32 = KF * T;
const BKP: u32 = BK + 8u;
const XV: u32 = BM * BK / 4u; // vec4 of X per K step
const WV: u32 = BN * BK / 8u; // vec4<u32> of W per K step

// xs [BM][BKP]: X rows, k along the row; ws [BN][BKP]: W rows (not with direct B).
// put_x4(o, h) stores 4 halves at element o, put_w8 8 halves (o % 8 == 0).
//@ tiles
var<workgroup> cs: array<f32, SGM * SGN * T * T>; // one T x T result patch per subgroup

// X tile element e (vec4 e of the BM x BK tile at k0), zero outside M and the K chunk.
fn load_x(e: u32, m_base: u32, k0: u32, ke: u32) -> vec4<f32> {
    let gm = m_base + e / (BK / 4u);
    let gk = k0 + 4u * (e % (BK / 4u));
    if (e < XV && gm < p.M && gk < ke) {
        return X[p.x_off / 4u + gm * (p.K / 4u) + gk / 4u];
    }
    return vec4<f32>(0.0);
}

fn store_x(e: u32, v: vec4<f32>) {
    if (e >= XV) { return; }
    let h = vec4<f16>(clamp(v, vec4<f32>(-65504.0), vec4<f32>(65504.0)));
    put_x4((e / (BK / 4u)) * BKP + 4u * (e % (BK / 4u)), h);
}

//@ begin w staging
// W tile element e: 8 halves of row n_base + e / (BK / 8).
fn load_w(e: u32, n_base: u32, k0: u32, ke: u32) -> vec4<u32> {
    let gn = n_base + e / (BK / 8u);
    let gk = k0 + 8u * (e % (BK / 8u));
    if (e < WV && gn < p.N && gk < ke) {
        return W[gn * (p.K / 8u) + gk / 8u];
    }
    return vec4<u32>(0u);
}

fn store_w(e: u32, v: vec4<u32>) {
    if (e >= WV) { return; }
    let o = (e / (BK / 8u)) * BKP + 8u * (e % (BK / 8u));
    let a = vec2<f16>(unpack2x16float(v.x));
    let b = vec2<f16>(unpack2x16float(v.y));
    let c = vec2<f16>(unpack2x16float(v.z));
    let d = vec2<f16>(unpack2x16float(v.w));
    put_w8(o, vec4<f16>(a, b), vec4<f16>(c, d));
}
//@ end w staging

// Fragment (row r0, column c0) of this subgroup: bounds, then bias / accumulate / split-K.
fn store_patch(pat: u32, lane: u32, r0: u32, c0: u32, z: u32) {
    for (var e = lane; e < T * T; e += SG) {
        let gm = r0 + e / T;
        let gn = c0 + e % T;
        if (gm < p.M && gn < p.N) {
            var v = cs[pat + e];
            if (p.split_stride > 0u) {
                Y[z * p.split_stride + gm * p.N + gn] = v;
            } else {
                if ((p.flags & 2u) != 0u) { v += Bias[p.n0 + gn]; }
                let idx = p.y_off + gm * p.ldy + p.n0 + gn;
                if ((p.flags & 1u) != 0u) { v += Y[idx]; }
                Y[idx] = v;
            }
        }
    }
}

@compute @workgroup_size(WG)
fn matmul_coop(@builtin(workgroup_id) wg: vec3<u32>,
               @builtin(local_invocation_index) li: u32,
               @builtin(subgroup_id) sg: u32,
               @builtin(subgroup_invocation_id) lane: u32) {
    let m_base = wg.y * BM;
    let n_base = wg.x * BN;
    let xa = (sg / SGN) * FM * T * BKP; // this subgroup's first A row in xs
    let wb = (sg % SGN) * FN * T * BKP; // and first B column (a W row) in ws
    let wbg = (n_base + (sg % SGN) * FN * T) * p.K; // or in W (direct B)
    let kb = wg.z * p.kc;
    let ke = min(p.K, kb + p.kc);
//@ acc
    // This step's tiles, fetched one step ahead.
//@ load_init
    for (var k0 = kb; k0 < ke; k0 += BK) {
        workgroupBarrier();
//@ store
        workgroupBarrier();
        if (k0 + BK < ke) {
//@ load_next
        }
//@ compute
    }
    let pat = sg * T * T;
    let r0 = m_base + (sg / SGN) * FM * T;
    let c0 = n_base + (sg % SGN) * FN * T;
//@ epilogue
}
