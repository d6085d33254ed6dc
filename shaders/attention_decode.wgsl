// Decode attention: the few queries of a decode step (rows = queries x grouped heads
// <= RMAX per workgroup) over the KV cache, with flash_attention.wgsl's inputs, mask and
// split-K output. Query slot t sees key slot s iff start(t) <= s <= t and (seg[s] ==
// seg[t] or seg[t] == 0); start(t) = seg[cap + t] is the first slot of t's document, or
// for a segment-0 query the first slot of its sequence (0 in a cache of one request).
//
// The host prepends `const D: u32` (head_dim: 32, 64 or 128). A row is one (query,
// head) pair; a workgroup takes all rows of one KV head and the keys of one split.
// Flash tiles 32 rows, which at decode are mostly padding; here a thread takes a key
// instead: it reads its K and V rows straight from global memory (8 halves per load),
// scores every row against K (Q staged in workgroup memory) and parks V for the P.V
// pass. Per chunk of C keys: scores -> per-row max by NQ threads a row -> exp and sums
// -> P.V with threads over (row, 8-dim column); three barriers, online softmax across
// the chunks of a split.
// Grid: x = KV heads, y = key splits, z = groups of TQ queries (one group: the queries
// of one sequence share their K and V reads; a batch of sequences side by side in one
// cache takes a group per query, so each reads only its own keys). Split z owns the chunks
// [base + z * per, base + (z + 1) * per), counted from base = the chunk of the group's
// first visible slot (0 for a sequence alone in its cache), and the last split also
// everything after (so no key is ever left out, whatever `per`): with `per` fixed by the
// cache size or by the caller, a row's result does not depend on the other rows of its
// batch; only chunks that meet the rows' visible range [first slot of the earliest
// segment, last query slot] are read. One split writes O; more write unnormalised
// outputs and (max, sum) to `part` in the layout attention_combine.wgsl merges (an idle
// split writes only (max, sum) = (-3.4e38, 0)).
// Q: f32 [T, heads, D] (RoPE applied, scaled here). Kc, Vc: f16 pairs [slots, kv_heads, D].

struct Params {
    T: u32, heads: u32, kv_heads: u32, cap: u32,
    scale: f32, splits: u32, tq: u32, per: u32, // tq: queries per group (tq * G <= RMAX); per: chunks per split
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> Q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> Kc: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> Vc: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> qslot: array<u32>;
@group(0) @binding(5) var<storage, read> seg: array<u32>;
@group(0) @binding(6) var<storage, read_write> O: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> part: array<vec4<f32>>;

const NT: u32 = 64u;        // threads
const C: u32 = 64u;         // keys per chunk: one per thread
const RMAX: u32 = 16u;      // rows per workgroup at most
const NQ: u32 = 4u;         // threads per row for the softmax statistics (NT / RMAX)
const KQ: u32 = C / NQ;     // keys each of them covers
const D4: u32 = D / 4u;     // vec4 per head vector
const D8: u32 = D / 8u;     // vec4<u32> (8 halves) per cached head vector
const IT: u32 = (RMAX * D8 + NT - 1u) / NT; // (row, column) items per thread at most
const NEG: f32 = -3.4e38;

var<workgroup> Qs: array<vec4<f32>, RMAX * D4>;
var<workgroup> S: array<f32, RMAX * C>;    // scores, then probabilities, of the chunk
var<workgroup> Vs: array<vec4<u32>, C * D8>; // the chunk's V rows (f16 pairs)
var<workgroup> red: array<f32, RMAX * NQ>; // per (row, quarter): chunk max; at the end: sum
var<workgroup> rts: array<u32, RMAX>;      // each row's query slot
var<workgroup> rsg: array<u32, RMAX>;      // each row's segment
var<workgroup> rst: array<u32, RMAX>;      // each row's first visible slot
var<workgroup> span: array<u32, 4>;        // chunks [span0, span1); keys [span2, span3]

fn unpack8(w: vec4<u32>) -> array<vec4<f32>, 2> {
    return array<vec4<f32>, 2>(vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)),
                               vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w)));
}

@compute @workgroup_size(64)
fn attention_decode(@builtin(workgroup_id) wg: vec3<u32>,
                    @builtin(local_invocation_index) li: u32) {
    let kvh = wg.x;
    let z = wg.y;
    let G = p.heads / p.kv_heads;
    let t0 = wg.z * p.tq;            // this group's first query
    let nq = min(p.tq, p.T - t0);
    let R = nq * G;                   // its rows: (query, grouped head) pairs

    for (var i = li; i < R * D4; i += NT) {
        let j = i / D4;
        Qs[i] = Q[((t0 + j / G) * p.heads + kvh * G + j % G) * D4 + i % D4] * p.scale;
    }
    if (li < R) {
        let ts = qslot[t0 + li / G];
        rts[li] = ts;
        rsg[li] = seg[ts];
        rst[li] = seg[p.cap + ts];
    }
    if (li == 0u) {
        var lo = 0xffffffffu;
        var hi = 0u;
        for (var t = t0; t < t0 + nq; t++) {
            let ts = qslot[t];
            let first = seg[p.cap + ts];
            lo = min(lo, first);
            hi = max(hi, ts);
        }
        let base = lo / C;
        let a = base + z * p.per;
        var b = hi / C + 1u;
        if (z + 1u < p.splits) { b = min(b, base + (z + 1u) * p.per); }
        span[0] = a;
        span[1] = max(a, b);
        span[2] = lo;
        span[3] = hi;
    }
    let c0 = workgroupUniformLoad(&span[0]); // also the barrier for Qs, rts, rsg
    let c1 = workgroupUniformLoad(&span[1]);
    let lo = span[2];
    let hi = span[3];
    let Rt = p.T * p.heads; // output rows in total
    let ml = p.splits * Rt * D4; // where part's (max, sum) pairs start

    if (c0 == c1) { // an idle split (never with one split: a query sees itself)
        if (li < R) {
            let o = (t0 + li / G) * p.heads + kvh * G + li % G;
            part[ml + z * Rt + o] = vec4<f32>(NEG, 0.0, 0.0, 0.0);
        }
        return;
    }

    // Softmax statistics role: row li / NQ, keys (li % NQ) * KQ.. of each chunk.
    let sr = li / NQ;
    let sq = li % NQ;
    var m_run = NEG;
    var l_run = 0.0;
    // P.V role: items li + i * NT = (row, 8-dim column).
    var acc: array<vec4<f32>, 2 * IT>;
    var m_it: array<f32, IT>;
    for (var i = 0u; i < IT; i++) {
        acc[2u * i] = vec4<f32>(0.0);
        acc[2u * i + 1u] = vec4<f32>(0.0);
        m_it[i] = NEG;
    }

    for (var ci = c0; ci < c1; ci++) {
        if (ci != c0) { workgroupBarrier(); } // the previous chunk's S, Vs, red are read
        // Scores: key s0 + li against every row.
        let s = ci * C + li;
        var sc: array<f32, RMAX>;
        for (var r = 0u; r < RMAX; r++) { sc[r] = 0.0; }
        var sk = 0u;
        let live = s >= lo && s <= hi && s < p.cap;
        if (live) {
            sk = seg[s];
            let base = (s * p.kv_heads + kvh) * D8;
            for (var c = 0u; c < D8; c++) {
                let kw = unpack8(Kc[base + c]);
                Vs[li * D8 + c] = Vc[base + c];
                for (var r = 0u; r < RMAX; r++) {
                    if (r < R) {
                        sc[r] += dot(Qs[r * D4 + 2u * c], kw[0]) + dot(Qs[r * D4 + 2u * c + 1u], kw[1]);
                    }
                }
            }
        } else {
            for (var c = 0u; c < D8; c++) { Vs[li * D8 + c] = vec4<u32>(0u); }
        }
        for (var r = 0u; r < RMAX; r++) {
            if (r < R) {
                let sg = rsg[r];
                let vis = live && s >= rst[r] && s <= rts[r] && (sg == 0u || sk == sg);
                S[r * C + li] = select(NEG, sc[r], vis);
            }
        }
        workgroupBarrier();
        if (sr < R) {
            var mx = NEG;
            for (var k = sq * KQ; k < (sq + 1u) * KQ; k++) { mx = max(mx, S[sr * C + k]); }
            red[li] = mx;
        }
        workgroupBarrier();
        if (sr < R) {
            var m_new = m_run;
            for (var q = 0u; q < NQ; q++) { m_new = max(m_new, red[sr * NQ + q]); }
            var sum = 0.0;
            for (var k = sq * KQ; k < (sq + 1u) * KQ; k++) {
                let sv = S[sr * C + k];
                var e = 0.0;
                if (sv > -1.0e38) { e = exp(sv - m_new); }
                S[sr * C + k] = e;
                sum += e;
            }
            l_run = l_run * exp(m_run - m_new) + sum; // exp(0) = 1 while nothing seen
            m_run = m_new;
        }
        workgroupBarrier();
        for (var i = 0u; i < IT; i++) {
            let it = li + i * NT;
            let r = it / D8;
            let c = it % D8;
            if (r < R) {
                var m_new = m_it[i];
                for (var q = 0u; q < NQ; q++) { m_new = max(m_new, red[r * NQ + q]); }
                let alpha = exp(m_it[i] - m_new);
                m_it[i] = m_new;
                var a0 = acc[2u * i] * alpha;
                var a1 = acc[2u * i + 1u] * alpha;
                for (var k = 0u; k < C; k++) {
                    let pk = vec4<f32>(S[r * C + k]);
                    let v = unpack8(Vs[k * D8 + c]);
                    a0 = fma(pk, v[0], a0);
                    a1 = fma(pk, v[1], a1);
                }
                acc[2u * i] = a0;
                acc[2u * i + 1u] = a1;
            }
        }
    }
    workgroupBarrier();
    if (sr < R) { red[li] = l_run; }
    workgroupBarrier();
    for (var i = 0u; i < IT; i++) {
        let it = li + i * NT;
        let r = it / D8;
        let c = it % D8;
        if (r < R) {
            var l = 0.0;
            for (var q = 0u; q < NQ; q++) { l += red[r * NQ + q]; }
            let o = (t0 + r / G) * p.heads + kvh * G + r % G;
            if (p.splits == 1u) {
                let inv = 1.0 / l;
                O[o * D4 + 2u * c] = acc[2u * i] * inv;
                O[o * D4 + 2u * c + 1u] = acc[2u * i + 1u] * inv;
            } else {
                let b = z * Rt + o;
                part[b * D4 + 2u * c] = acc[2u * i];
                part[b * D4 + 2u * c + 1u] = acc[2u * i + 1u];
                if (c == 0u) { part[ml + b] = vec4<f32>(m_it[i], l, 0.0, 0.0); }
            }
        }
    }
}
