// Flash attention on cooperative matrices (tensor cores): the function, mask, grid,
// splits and partial outputs of flash_attention.wgsl (attention_combine.wgsl merges the
// splits), with S = Q K^T and O = P V as T x T x T f16 products summed in f32.
//
// A template: `ops::coop` prepends the constants and expands the `//@` lines into
// straight-line code:
//   T    fragment size (16 on NVIDIA, 8 on lavapipe); SG subgroup size;
//   NSG  subgroups per workgroup, each owning T rows (BR = NSG T rows per workgroup);
//   D    head size; BC keys per tile; LPR = SG / T lanes per row.
// A row is one (query, head) pair; a workgroup's rows share one KV head. Per key tile:
// K and V (f16) are staged in workgroup memory (the next tile fetched into registers
// meanwhile); each subgroup computes its T x BC scores from its Q fragments (loaded once,
// pre-scaled, f16) and stores them to its patch of `ss`; each row's LPR lanes apply the
// mask and the online softmax (combining the row's lanes by subgroup shuffles), write P
// (f16) to `ps` and keep the row's running max and sum; the subgroup computes P V into fresh fragments, stores them to its patch, and each
// lane folds its D / LPR output values into registers (rescaled by exp(m_old - m_new)).
// The sum divides by the same f16-rounded P that multiplies V.

enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    T_: u32, heads: u32, kv_heads: u32, cap: u32,
    scale: f32, splits: u32, rows: u32, per: u32, // per: key tiles (of BC) per split
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> Q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> Kc: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> Vc: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> qslot: array<u32>;
@group(0) @binding(5) var<storage, read> seg: array<u32>;
@group(0) @binding(6) var<storage, read_write> O: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> part: array<vec4<f32>>;

const WG: u32 = SG * NSG;
const BR: u32 = NSG * T;
const LPR: u32 = SG / T;
const DP: u32 = D + 8u;      // row pitch of the K / V / Q tiles, halves (16-byte pad)
const BCP: u32 = BC + 8u;    // row pitch of P, halves
const SP: u32 = max(BC, D);  // row pitch of a subgroup's f32 patch
const KL: u32 = BC / LPR;    // keys per lane in the softmax
const DL: u32 = D / LPR;     // output values per lane
const D8: u32 = D / 8u;      // vec4<u32> (8 halves) per cached head vector
const KVV: u32 = BC * D8;    // vec4<u32> per K (or V) tile
const QR: u32 = max(BR, BC); // rows of ks (it stages Q first)
const NEG: f32 = -3.4e38;
const NONE: u32 = 0xffffffffu;

// ks: K tile [BC][DP] (Q [BR][DP] at start); vs: V tile [BC][DP]; put_k4 / put_v4 store
// 4 halves at half offset o (o % 4 == 0).
//@ kv tiles
var<workgroup> ss: array<f32, NSG * T * SP>;        // per subgroup: S [T][BC], then PV [T][D]
var<workgroup> ps: array<f16, NSG * T * BCP>;       // per subgroup: P [T][BCP]

fn load_kv(src: u32, e: u32, tile: u32, kvh: u32) -> vec4<u32> {
    let s = tile * BC + e / D8;
    if (e < KVV && s < p.cap) {
        let at = (s * p.kv_heads + kvh) * D8 + e % D8;
        if (src == 0u) { return Kc[at]; }
        return Vc[at];
    }
    return vec4<u32>(0u);
}

fn halves(w: vec4<u32>) -> array<vec4<f16>, 2> {
    let a = vec2<f16>(unpack2x16float(w.x));
    let b = vec2<f16>(unpack2x16float(w.y));
    let c = vec2<f16>(unpack2x16float(w.z));
    let d = vec2<f16>(unpack2x16float(w.w));
    return array<vec4<f16>, 2>(vec4<f16>(a, b), vec4<f16>(c, d));
}

fn store_kv(src: u32, e: u32, w: vec4<u32>) {
    if (e >= KVV) { return; }
    let o = (e / D8) * DP + (e % D8) * 8u;
    let h = halves(w);
    if (src == 0u) {
        put_k4(o, h[0]);
        put_k4(o + 4u, h[1]);
    } else {
        put_v4(o, h[0]);
        put_v4(o + 4u, h[1]);
    }
}

@compute @workgroup_size(WG)
fn flash_coop(@builtin(workgroup_id) wg: vec3<u32>,
              @builtin(local_invocation_index) li: u32,
              @builtin(subgroup_id) sgid: u32,
              @builtin(subgroup_invocation_id) lane: u32) {
    let rt = wg.x;
    let kvh = wg.y;
    let z = wg.z;
    let G = p.heads / p.kv_heads;
    // Q tile, scaled and rounded to f16, staged in ks.
    for (var e = li; e < BR * D / 4u; e += WG) {
        let row = rt * BR + e / (D / 4u);
        var v = vec4<f32>(0.0);
        if (row < p.rows) {
            let h = kvh * G + row % G;
            v = Q[((row / G) * p.heads + h) * (D / 4u) + e % (D / 4u)] * p.scale;
        }
        put_k4((e / (D / 4u)) * DP + (e % (D / 4u)) * 4u, vec4<f16>(v));
    }
    // This lane's row and its share of the keys and of the output.
    let r = sgid * T + lane / LPR;   // row within the workgroup
    let hl = lane % LPR;
    let row = rt * BR + r;
    var ts = 0u;
    var sg = NONE;
    if (row < p.rows) {
        ts = qslot[row / G];
        sg = seg[ts];
    }
    workgroupBarrier();
    let qa = sgid * T * DP; // this subgroup's first Q row in ks (halves)
//@ qfrags
    let zc = coop_mat{T}x{T}<f32, C>();
    // The key tiles any row of the workgroup sees, computed by every invocation from the
    // (read-only) inputs: values passed between invocations through workgroup memory by
    // plain loads and stores are not ordered by barriers in SPIR-V under the Vulkan
    // memory model (which cooperative matrices bring), so only the tiles go through it.
    // Over the workgroup's queries (rows r0..r1 hold queries r0 / G ..= (r1 - 1) / G).
    var lo = NONE;
    var hi = 0u;
    let r1 = min(rt * BR + BR, p.rows);
    for (var qi = (rt * BR) / G; qi * G < r1; qi++) {
        let qs = qslot[qi];
        var first = 0u;
        if (seg[qs] != 0u) { first = seg[p.cap + qs]; }
        lo = min(lo, first);
        hi = max(hi, qs);
    }
    // Split z owns the absolute key tiles [z * per, (z + 1) * per), so a row's result
    // depends on its own keys only (see flash_attention.wgsl).
    var tile0 = 0u;
    var tile1 = 0u;
    if (lo != NONE) {
        tile0 = lo / BC;
        tile1 = hi / BC + 1u;
        if (p.splits > 1u) {
            tile0 = max(tile0, z * p.per);
            tile1 = max(tile0, min(tile1, (z + 1u) * p.per));
        }
    }
    var m = NEG;
    var l = 0.0;
//@ oacc
    let sp = sgid * T * SP;           // this subgroup's f32 patch
    let pp = sgid * T * BCP;          // and P rows
    let rs = sp + (lane / LPR) * SP;  // this lane's row in the patch
    let rp = pp + (lane / LPR) * BCP; // and in P
//@ prefetch_init
    for (var tile = tile0; tile < tile1; tile++) {
        workgroupBarrier(); // the previous tile (and the Q staging) is no longer read
//@ store
        workgroupBarrier();
        if (tile + 1u < tile1) {
//@ prefetch_next
        }
//@ scores
        workgroupBarrier();
        // Softmax of this lane's KL keys of row r (straight-line: the scores stay in
        // registers), the row's max and sum over its lanes.
        let k0 = hl * KL;
        let key0 = tile * BC + k0;
        // Every key of this lane's chunk is visible: a segment-0 row past the chunk.
        let all_vis = sg == 0u && key0 + KL - 1u <= ts;
//@ softmax
        let alpha = exp(m - m_new); // 1 while nothing was seen, 0 after the first key
        l = l * alpha + sum;
        m = m_new;
        workgroupBarrier();
//@ pv
        workgroupBarrier();
//@ fold
    }
    // Output: this lane's DL values of row `row`.
    if (row < p.rows) {
        let o = (row / G) * p.heads + kvh * G + row % G;
        let ob = o * (D / 4u) + hl * (DL / 4u);
        if (p.splits == 1u) {
            let inv = 1.0 / l;
//@ out_o
        } else {
            let R = p.T_ * p.heads;
            let pb = (z * R + o) * (D / 4u) + hl * (DL / 4u);
//@ out_part
            if (hl == 0u) { part[p.splits * R * (D / 4u) + z * R + o] = vec4<f32>(m, l, 0.0, 0.0); }
        }
    }
}
