// Flash attention (tiled, online softmax) of T new queries over the KV cache, with the
// KVLink mask of attention.wgsl: query slot t sees key slot s iff s <= t and
// (seg[s] == seg[t] or seg[t] == 0); seg[cap + t] is the first slot of t's segment.
//
// The host prepends `const D: u32` (head_dim, a multiple of 32) and `const BR: u32`
// (rows per workgroup: 32, or 16 for D = 128 to fit 32 KiB of workgroup memory).
// A row is one (query, head) pair; a workgroup takes BR rows that share one KV head
// (grouped-query heads of consecutive queries), so each K/V tile it loads serves all of
// them. Keys go through workgroup memory in tiles of BK; scores never leave the tile.
// Grid: x = row tiles, y = KV heads, z = key splits (split-K for few queries over a long
// cache). With one split the kernel writes O; with more, each split writes its
// unnormalised output and (max, sum) to `part` and attention_combine.wgsl merges them.
// Q: f32 [T, heads, D] (RoPE applied). Kc, Vc: f16 pairs [slots, kv_heads, D].

struct Params {
    T: u32, heads: u32, kv_heads: u32, cap: u32,
    scale: f32, splits: u32, rows: u32, per: u32, // per: key tiles per split
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> Q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> Kc: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> Vc: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> qslot: array<u32>;
@group(0) @binding(5) var<storage, read> seg: array<u32>;
@group(0) @binding(6) var<storage, read_write> O: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> part: array<vec4<f32>>;

const BK: u32 = 32u;        // keys per tile
const NT: u32 = 64u;        // threads
const D4: u32 = D / 4u;     // vec4 per head vector
const D8: u32 = D / 8u;     // vec4<u32> (8 halves) per cached head vector
const RS: u32 = BR / 8u;    // rows per thread (8 row groups)
const DV: u32 = D / 32u;    // output vec4 per row per thread (8 dim groups)
const NEG: f32 = -3.4e38;
const NONE: u32 = 0xffffffffu;

var<workgroup> Qs: array<vec4<f32>, BR * D4>;
var<workgroup> KV: array<vec4<f32>, BK * D4>;
var<workgroup> Ss: array<f32, BR * BK>;
var<workgroup> sk: array<u32, BK>;   // segment id of each key in the tile
var<workgroup> rts: array<u32, BR>;  // each row's query slot
var<workgroup> rsg: array<u32, BR>;  // each row's segment (NONE: padding row)
var<workgroup> rm: array<f32, BR>;   // running max
var<workgroup> rl: array<f32, BR>;   // running sum
var<workgroup> ra: array<f32, BR>;   // rescale factor of this tile
var<workgroup> span: array<u32, 2>;  // this split's key tiles [span0, span1)

fn load_tile(src: u32, s0: u32, kvh: u32, li: u32, first: u32, stride: u32) {
    for (var i = li - first; i < BK * D8; i += stride) {
        let k = i / D8;
        let c = i % D8;
        let s = s0 + k;
        var a = vec4<f32>(0.0);
        var b = vec4<f32>(0.0);
        if (s < p.cap) {
            let at = (s * p.kv_heads + kvh) * D8 + c;
            var w: vec4<u32>;
            if (src == 0u) { w = Kc[at]; } else { w = Vc[at]; }
            a = vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
            b = vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w));
        }
        KV[k * D4 + 2u * c] = a;
        KV[k * D4 + 2u * c + 1u] = b;
    }
}

@compute @workgroup_size(64)
fn flash_attention(@builtin(workgroup_id) wg: vec3<u32>,
                   @builtin(local_invocation_index) li: u32) {
    let rt = wg.x;
    let kvh = wg.y;
    let z = wg.z;
    let G = p.heads / p.kv_heads;
    let ty = li / 8u;
    let tx = li % 8u;

    for (var i = li; i < BR * D4; i += NT) {
        let row = rt * BR + i / D4;
        var v = vec4<f32>(0.0);
        if (row < p.rows) {
            let h = kvh * G + row % G;
            v = Q[((row / G) * p.heads + h) * D4 + i % D4] * p.scale;
        }
        Qs[i] = v;
    }
    if (li < BR) {
        let row = rt * BR + li;
        var ts = 0u;
        var sg = NONE;
        if (row < p.rows) {
            ts = qslot[row / G];
            sg = seg[ts];
        }
        rts[li] = ts;
        rsg[li] = sg;
        rm[li] = NEG;
        rl[li] = 0.0;
    }
    workgroupBarrier();
    if (li == 0u) {
        var lo = NONE;
        var hi = 0u;
        for (var r = 0u; r < BR; r++) {
            if (rsg[r] != NONE) {
                var first = 0u;
                if (rsg[r] != 0u) { first = seg[p.cap + rts[r]]; }
                lo = min(lo, first);
                hi = max(hi, rts[r]);
            }
        }
        // Split z owns the absolute key tiles [z * per, (z + 1) * per): a row's result
        // then depends on its own keys only, not on which rows share its workgroup
        // (a document's cache is the same whether it was encoded alone or in a batch).
        let t0 = lo / BK;
        let t1 = hi / BK + 1u;
        var a = max(t0, z * p.per);
        var b = min(t1, (z + 1u) * p.per);
        if (p.splits == 1u) { a = t0; b = t1; }
        span[0] = a;
        span[1] = max(a, b);
    }
    let tile0 = workgroupUniformLoad(&span[0]);
    let tile1 = workgroupUniformLoad(&span[1]);

    var acc: array<vec4<f32>, RS * DV>;
    for (var i = 0u; i < RS * DV; i++) { acc[i] = vec4<f32>(0.0); }

    for (var tile = tile0; tile < tile1; tile++) {
        let s0 = tile * BK;
        workgroupBarrier(); // the previous tile's V is no longer read
        load_tile(0u, s0, kvh, li, 0u, NT);
        if (li < BK) {
            var sv = NONE;
            if (s0 + li < p.cap) { sv = seg[s0 + li]; }
            sk[li] = sv;
        }
        workgroupBarrier();
        // Scores: rows ty*RS.., keys tx*4..tx*4+3.
        var sc: array<vec4<f32>, RS>;
        for (var i = 0u; i < RS; i++) { sc[i] = vec4<f32>(0.0); }
        for (var d = 0u; d < D4; d++) {
            let k0 = KV[(tx * 4u) * D4 + d];
            let k1 = KV[(tx * 4u + 1u) * D4 + d];
            let k2 = KV[(tx * 4u + 2u) * D4 + d];
            let k3 = KV[(tx * 4u + 3u) * D4 + d];
            for (var i = 0u; i < RS; i++) {
                let q = Qs[(ty * RS + i) * D4 + d];
                sc[i] += vec4<f32>(dot(q, k0), dot(q, k1), dot(q, k2), dot(q, k3));
            }
        }
        for (var i = 0u; i < RS; i++) {
            let r = ty * RS + i;
            let ts = rts[r];
            let sg = rsg[r];
            for (var j = 0u; j < 4u; j++) {
                let key = tx * 4u + j;
                let s = s0 + key;
                let vis = sg != NONE && s <= ts && (sg == 0u || sk[key] == sg);
                Ss[r * BK + key] = select(NEG, sc[i][j], vis);
            }
        }
        workgroupBarrier();
        if (li < BR) {
            var mx = NEG;
            for (var k = 0u; k < BK; k++) { mx = max(mx, Ss[li * BK + k]); }
            let m_old = rm[li];
            let m_new = max(m_old, mx);
            var sum = 0.0;
            for (var k = 0u; k < BK; k++) {
                let sv = Ss[li * BK + k];
                var e = 0.0;
                if (sv > -1.0e38) { e = exp(sv - m_new); }
                Ss[li * BK + k] = e;
                sum += e;
            }
            let alpha = exp(m_old - m_new); // 1 while nothing seen, 0 after the first key
            rl[li] = rl[li] * alpha + sum;
            rm[li] = m_new;
            ra[li] = alpha;
        } else {
            load_tile(1u, s0, kvh, li, BR, NT - BR);
        }
        workgroupBarrier();
        for (var i = 0u; i < RS; i++) {
            let a = ra[ty * RS + i];
            for (var v = 0u; v < DV; v++) { acc[i * DV + v] *= a; }
        }
        for (var k = 0u; k < BK; k++) {
            for (var i = 0u; i < RS; i++) {
                let pk = Ss[(ty * RS + i) * BK + k];
                for (var v = 0u; v < DV; v++) {
                    acc[i * DV + v] = fma(vec4<f32>(pk), KV[k * D4 + tx * DV + v], acc[i * DV + v]);
                }
            }
        }
    }
    workgroupBarrier();
    let R = p.T * p.heads; // output rows in total
    for (var i = 0u; i < RS; i++) {
        let r = ty * RS + i;
        let row = rt * BR + r;
        if (row < p.rows) {
            let o = (row / G) * p.heads + kvh * G + row % G;
            if (p.splits == 1u) {
                let inv = 1.0 / rl[r];
                for (var v = 0u; v < DV; v++) { O[o * D4 + tx * DV + v] = acc[i * DV + v] * inv; }
            } else {
                let b = z * R + o;
                for (var v = 0u; v < DV; v++) { part[b * D4 + tx * DV + v] = acc[i * DV + v]; }
                if (tx == 0u) { part[p.splits * R * D4 + b] = vec4<f32>(rm[r], rl[r], 0.0, 0.0); }
            }
        }
    }
}
