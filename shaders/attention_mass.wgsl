// Attention mass per prompt segment (for the viewer; run only when asked): for query row
// `row` of the batch and each head, the softmax weights of the visible keys (same mask
// as attention.wgsl) summed by group[slot]. One invocation per head.
// out[out_off + head * n_groups + g] = sum over visible keys s with group[s] == g.

struct Params {
    row: u32, heads: u32, kv_heads: u32, head_dim: u32,
    scale: f32, cap: u32, n_groups: u32, out_off: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> Q: array<f32>;
@group(0) @binding(2) var<storage, read> Kc: array<u32>;
@group(0) @binding(3) var<storage, read> qslot: array<u32>;
@group(0) @binding(4) var<storage, read> seg: array<u32>;
@group(0) @binding(5) var<storage, read> group: array<u32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

fn score(qb: u32, kb: u32) -> f32 {
    var dot = 0.0;
    for (var j = 0u; j < p.head_dim / 2u; j++) {
        let k2 = unpack2x16float(Kc[kb + j]);
        dot = fma(Q[qb + 2u * j], k2.x, dot);
        dot = fma(Q[qb + 2u * j + 1u], k2.y, dot);
    }
    return dot * p.scale;
}

@compute @workgroup_size(32)
fn attention_mass(@builtin(global_invocation_id) gid: vec3<u32>) {
    let h = gid.x;
    if (h >= p.heads) { return; }
    let kvh = h / (p.heads / p.kv_heads);
    let kv_stride = p.kv_heads * p.head_dim;
    let qb = (p.row * p.heads + h) * p.head_dim;
    let ts = qslot[p.row];
    let tseg = seg[ts];
    let first = seg[p.cap + ts];
    var m = -3.4e38;
    var l = 0.0;
    for (var s = first; s <= ts; s++) {
        if (tseg != 0u && seg[s] != tseg) { continue; }
        let x = score(qb, (s * kv_stride + kvh * p.head_dim) / 2u);
        let m_new = max(m, x);
        l = l * exp(m - m_new) + exp(x - m_new);
        m = m_new;
    }
    let ob = p.out_off + h * p.n_groups;
    for (var g = 0u; g < p.n_groups; g++) { out[ob + g] = 0.0; }
    for (var s = first; s <= ts; s++) {
        if (tseg != 0u && seg[s] != tseg) { continue; }
        let x = score(qb, (s * kv_stride + kvh * p.head_dim) / 2u);
        let g = min(group[s], p.n_groups - 1u);
        out[ob + g] += exp(x - m) / l;
    }
}
