// Decode QKV projection with RoPE and the KV-cache write fused in (one token): the
// subgroup GEMV of matvec_subgroup.wgsl over W = [Wq; Wk; Wv] (flags 2 bias, 8 RMSNorm of
// X first), where each subgroup computes four output rows that belong together:
//   Q and K heads: dims (2j, 2j+1) and their NEOX rotation partners (2j+half,
//   2j+1+half), rotated at position `pos` and stored (Q as f32 [heads, head_dim], K as two
//   f16 words into the cache row `slot`), which is what rope_kv.wgsl does after a plain
//   projection;
//   V heads: dims 4j .. 4j+3, stored unrotated (two f16 words).
// One dispatch instead of two per layer in decode. The host prepends gemv_subgroup.wgsl
// (with RPW = 4 and SGS, the subgroup size); a workgroup is 256 / SGS subgroups.

struct Params {
    N: u32, K: u32, flags: u32, eps: f32,
    heads: u32, kv_heads: u32, head_dim: u32, slot: u32,
    pos: f32, x_off: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> X: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> W: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> B: array<f32>;
@group(0) @binding(4) var<storage, read> NW: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(6) var<storage, read_write> Q: array<f32>;
@group(0) @binding(7) var<storage, read_write> Kc: array<u32>;
@group(0) @binding(8) var<storage, read_write> Vc: array<u32>;

const SUBGROUPS: u32 = 256u / SGS;

fn turn(x0: f32, x1: f32, a: f32) -> vec2<f32> {
    let c = cos(a);
    let s = sin(a);
    return vec2<f32>(x0 * c - x1 * s, x0 * s + x1 * c);
}

@compute @workgroup_size(256)
fn matvec_qkv_rope(@builtin(workgroup_id) wg: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(subgroup_id) sg: u32,
                   @builtin(subgroup_invocation_id) lane: u32) {
    let hd = p.head_dim;
    let quad = (wg.x + wg.y * nwg.x) * SUBGROUPS + sg; // four output rows
    if (4u * quad >= p.N) { return; } // whole subgroups only: no barrier follows
    let h = quad / (hd / 4u);        // head among q, k, v heads
    let j = quad % (hd / 4u);
    let half = hd / 2u;
    let rotated = h < p.heads + p.kv_heads;
    var dims = vec4<u32>(4u * j, 4u * j + 1u, 4u * j + 2u, 4u * j + 3u);
    if (rotated) { dims = vec4<u32>(2u * j, 2u * j + 1u, 2u * j + half, 2u * j + 1u + half); }
    let rows = vec4<u32>(h * hd) + dims;
    let inv = x_inv_rms(lane, p.eps);
    let g = rows * (p.K / 8u);
    let sums = gemv_rows(g, g, false, lane, inv);
    var y = sums[0];
    if (lane != 0u) { return; }
    if ((p.flags & 2u) != 0u) {
        y += vec4<f32>(B[rows.x], B[rows.y], B[rows.z], B[rows.w]);
    }
    let kvd = p.kv_heads * hd;
    if (!rotated) {
        // V head h - heads - kv_heads: dims 4j .. 4j+3, two words of the cache row.
        let w = (p.slot * kvd + (h - p.heads - p.kv_heads) * hd + 4u * j) / 2u;
        Vc[w] = pack2x16float(y.xy);
        Vc[w + 1u] = pack2x16float(y.zw);
        return;
    }
    let r0 = turn(y.x, y.z, p.pos * inv_freq[2u * j]);      // dims 2j and 2j + half
    let r1 = turn(y.y, y.w, p.pos * inv_freq[2u * j + 1u]); // dims 2j+1 and 2j+1+half
    if (h < p.heads) {
        let q = h * hd;
        Q[q + 2u * j] = r0.x;
        Q[q + 2u * j + 1u] = r1.x;
        Q[q + 2u * j + half] = r0.y;
        Q[q + 2u * j + 1u + half] = r1.y;
    } else {
        let w = (p.slot * kvd + (h - p.heads) * hd) / 2u;
        Kc[w + j] = pack2x16float(vec2<f32>(r0.x, r1.x));
        Kc[w + (2u * j + half) / 2u] = pack2x16float(vec2<f32>(r0.y, r1.y));
    }
}
