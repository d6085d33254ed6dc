// Fused decode/prefill step after the QKV projection: rotate Q and K at their positions,
// store Q (f32, contiguous [T, heads, head_dim], what attention reads) and K, V (f16
// pairs) into the KV cache at their slots. One dispatch instead of rope(q), rope(k) and
// kv_write.
// QKV: f32 [T, q_dim + 2 kv_dim] (one row per token: q heads, then k heads, then v).
// idx: u32 [2T]: cache slot of each token, then its RoPE position (i32 bits).
// One thread per (token, head, quarter of head_dim): two rotation pairs, which for the
// f16 cache are two whole words. Pairing as in rope.wgsl (NEOX unless `interleaved`).

struct Params {
    T: u32,
    heads: u32,      // query heads
    kv_heads: u32,
    head_dim: u32,
    interleaved: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> QKV: array<f32>;
@group(0) @binding(2) var<storage, read> idx: array<u32>;
@group(0) @binding(3) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(4) var<storage, read_write> Q: array<f32>;
@group(0) @binding(5) var<storage, read_write> Kc: array<u32>;
@group(0) @binding(6) var<storage, read_write> Vc: array<u32>;

fn turn(x0: f32, x1: f32, c: f32, s: f32) -> vec2<f32> {
    return vec2<f32>(x0 * c - x1 * s, x0 * s + x1 * c);
}

@compute @workgroup_size(256)
fn rope_kv(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let hd = p.head_dim;
    let half = hd / 2u;
    let quarter = hd / 4u;
    let all_heads = p.heads + 2u * p.kv_heads;
    let id = gid.x + gid.y * nwg.x * 256u;
    if (id >= p.T * all_heads * quarter) { return; }
    let j = id % quarter;
    let th = id / quarter;
    let h = th % all_heads;
    let t = th / all_heads;
    let row = t * all_heads * hd;        // QKV row of token t
    let src = row + h * hd;              // this head in that row
    let kvd = p.kv_heads * hd;
    let pos = f32(bitcast<i32>(idx[p.T + t]));
    // Dims this thread owns: NEOX (i, i+1) paired with (i+half, i+1+half), i = 2j;
    // interleaved (4j, 4j+1) and (4j+2, 4j+3).
    var d0 = 2u * j;
    var d1 = 2u * j + 1u;
    var e0 = d0 + half;
    var e1 = d1 + half;
    var f0 = 2u * j;       // inv_freq index of the first pair
    if (p.interleaved != 0u) {
        d0 = 4u * j; e0 = d0 + 1u; d1 = d0 + 2u; e1 = d0 + 3u;
    }
    if (h >= p.heads + p.kv_heads) {
        // V: copy dims 4j .. 4j+3 (two words), unrotated.
        let vh = h - p.heads - p.kv_heads;
        let w = (slot_base(t) + vh * hd) / 2u + 2u * j;
        let b = src + 4u * j;
        Vc[w] = pack2x16float(vec2<f32>(QKV[b], QKV[b + 1u]));
        Vc[w + 1u] = pack2x16float(vec2<f32>(QKV[b + 2u], QKV[b + 3u]));
        return;
    }
    let a0 = pos * inv_freq[f0];
    let a1 = pos * inv_freq[f0 + 1u];
    let r0 = turn(QKV[src + d0], QKV[src + e0], cos(a0), sin(a0));
    let r1 = turn(QKV[src + d1], QKV[src + e1], cos(a1), sin(a1));
    if (h < p.heads) {
        let q = (t * p.heads + h) * hd;
        Q[q + d0] = r0.x;
        Q[q + e0] = r0.y;
        Q[q + d1] = r1.x;
        Q[q + e1] = r1.y;
    } else {
        let w = (slot_base(t) + (h - p.heads) * hd) / 2u;
        if (p.interleaved != 0u) {
            Kc[w + d0 / 2u] = pack2x16float(r0);
            Kc[w + d1 / 2u] = pack2x16float(r1);
        } else {
            Kc[w + d0 / 2u] = pack2x16float(vec2<f32>(r0.x, r1.x));
            Kc[w + e0 / 2u] = pack2x16float(vec2<f32>(r0.y, r1.y));
        }
    }
}

// First element of token t's row in the [slots, kv_dim] cache.
fn slot_base(t: u32) -> u32 {
    return idx[t] * p.kv_heads * p.head_dim;
}
