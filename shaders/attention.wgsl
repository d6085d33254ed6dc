// Attention of T new queries over the KV cache, grouped-query heads, KVLink mask (§2):
// the query in cache slot t attends key slot s iff start(t) <= s <= t and
// (seg[s] == seg[t] or seg[t] == 0). Plain causal attention is the case seg == 0.
// start(t) = seg[cap + t]: the first slot of t's document, or for a segment-0 query the
// first slot of its sequence (0 in a cache of one request; a batch's sequences side by
// side in one cache each start at their own base, so this kernel serves them together).
// One workgroup per (query, head); keys in chunks of 64 (one score per thread), online
// softmax across chunks; each thread accumulates head_dim / 64 output dims.
// Q: f32 [T, heads, head_dim] (RoPE applied). Kc, Vc: f16 pairs [slots, kv_heads, head_dim].

struct Params {
    T: u32, heads: u32, kv_heads: u32, head_dim: u32,
    scale: f32,
    cap: u32,        // slots in the cache; seg holds [cap] ids then [cap] starts
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> Q: array<f32>;
@group(0) @binding(2) var<storage, read> Kc: array<u32>;
@group(0) @binding(3) var<storage, read> Vc: array<u32>;
@group(0) @binding(4) var<storage, read> qslot: array<u32>;
@group(0) @binding(5) var<storage, read> seg: array<u32>;
@group(0) @binding(6) var<storage, read_write> O: array<f32>;

const C: u32 = 64u;
var<workgroup> q: array<f32, 256>;
var<workgroup> sc: array<f32, 64>;
var<workgroup> red: array<f32, 64>;
var<workgroup> wts: u32;
var<workgroup> wstart: u32;

@compute @workgroup_size(64)
fn attention(@builtin(workgroup_id) wg: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) li: u32) {
    let qh = wg.x + wg.y * nwg.x;
    if (qh >= p.T * p.heads) { return; } // uniform per workgroup
    let t = qh / p.heads;
    let h = qh % p.heads;
    let kvh = h / (p.heads / p.kv_heads);
    let hd = p.head_dim;
    let kv_stride = p.kv_heads * hd;   // elements per cache slot
    let qb = qh * hd;
    for (var d = li; d < hd; d += C) { q[d] = Q[qb + d]; }
    if (li == 0u) {
        wts = qslot[t];
        wstart = seg[p.cap + qslot[t]]; // first slot t may see
    }
    let ts = workgroupUniformLoad(&wts); // uniform: it bounds a loop with barriers
    let tseg = seg[ts];
    let start = workgroupUniformLoad(&wstart);
    let first = start / C;

    var m = -3.4e38;
    var l = 0.0;
    var acc: array<f32, 4>;  // dims li, li + 64, li + 128, li + 192
    for (var i = 0u; i < 4u; i++) { acc[i] = 0.0; }
    let nchunks = ts / C + 1u;
    for (var c = first; c < nchunks; c++) {
        let s = c * C + li;
        var score = -3.4e38;
        if (s >= start && s <= ts && (tseg == 0u || seg[s] == tseg)) {
            let kb = (s * kv_stride + kvh * hd) / 2u;
            var dot = 0.0;
            for (var j = 0u; j < hd / 2u; j++) {
                let k2 = unpack2x16float(Kc[kb + j]);
                dot = fma(q[2u * j], k2.x, dot);
                dot = fma(q[2u * j + 1u], k2.y, dot);
            }
            score = dot * p.scale;
        }
        red[li] = score;
        workgroupBarrier();
        for (var st = C / 2u; st > 0u; st >>= 1u) {
            if (li < st) { red[li] = max(red[li], red[li + st]); }
            workgroupBarrier();
        }
        let cmax = workgroupUniformLoad(&red[0]);
        workgroupBarrier();
        if (cmax > -1.0e38) { // some key of this chunk is visible (uniform)
            let m_new = max(m, cmax);
            var e = 0.0;
            if (score > -1.0e38) { e = exp(score - m_new); }
            sc[li] = e;
            red[li] = e;
            workgroupBarrier();
            for (var st = C / 2u; st > 0u; st >>= 1u) {
                if (li < st) { red[li] += red[li + st]; }
                workgroupBarrier();
            }
            let alpha = exp(m - m_new);
            l = l * alpha + red[0];
            m = m_new;
            let n_in = min(C, ts + 1u - c * C);
            for (var i = 0u; i < 4u; i++) {
                let d = li + i * C;
                if (d < hd) {
                    var a = acc[i] * alpha;
                    for (var k = 0u; k < n_in; k++) {
                        let pk = sc[k];
                        if (pk != 0.0) {
                            let w = ((c * C + k) * kv_stride + kvh * hd + d);
                            let v2 = unpack2x16float(Vc[w / 2u]);
                            a = fma(pk, select(v2.x, v2.y, (w & 1u) == 1u), a);
                        }
                    }
                    acc[i] = a;
                }
            }
            workgroupBarrier();
        }
    }
    for (var i = 0u; i < 4u; i++) {
        let d = li + i * C;
        if (d < hd) { O[qb + d] = acc[i] / l; }
    }
}
