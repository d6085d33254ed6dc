// KV assembly from a pool of document caches (KVLink §1-4 in one pass per layer): gather
// cached K/V rows from a pool slab into a request's KV cache, turning each key by its
// slot's RoPE delta on the way (moving a key from position q to q + d is one more rotation
// by d * theta_i). Replaces one copy per document and layer plus an in-place rotation.
// Ks, Vs: the slab's f16 pairs [rows, kv_heads, head_dim]; Kc, Vc: the request's cache.
// table: u32 [2n]: for slot slot0 + s, the slab row to read (0xffffffff: not this slab's,
// left untouched), then its delta (i32 bits; 0: copied exactly).
// One thread per (slot, head, quarter of head_dim): two rotation pairs, which for f16 are
// two whole words, and the same two words of V. Pairing as in rope.wgsl (NEOX unless
// `interleaved`); angles f32(delta) * inv_freq[i] as rotate_keys computes them.

struct Params {
    n: u32,          // slots in the table
    kv_heads: u32,
    head_dim: u32,
    slot0: u32,      // first slot the table covers
    interleaved: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> Ks: array<u32>;
@group(0) @binding(2) var<storage, read> Vs: array<u32>;
@group(0) @binding(3) var<storage, read> table: array<u32>;
@group(0) @binding(4) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(5) var<storage, read_write> Kc: array<u32>;
@group(0) @binding(6) var<storage, read_write> Vc: array<u32>;

fn turn(x0: f32, x1: f32, c: f32, s: f32) -> vec2<f32> {
    return vec2<f32>(x0 * c - x1 * s, x0 * s + x1 * c);
}

@compute @workgroup_size(256)
fn assemble_kv(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let half = p.head_dim / 2u;
    let quarter = half / 2u;
    let idx = gid.x + gid.y * nwg.x * 256u;
    if (idx >= p.n * p.kv_heads * quarter) { return; }
    let j = idx % quarter;
    let sh = idx / quarter;          // slot-local index * kv_heads + head
    let s = sh / p.kv_heads;
    let row = table[2u * s];
    if (row == 0xffffffffu) { return; }
    let d = bitcast<i32>(table[2u * s + 1u]);
    let h = sh % p.kv_heads;
    let src = (row * p.kv_heads + h) * p.head_dim / 2u;             // word of the head
    let dst = ((p.slot0 + s) * p.kv_heads + h) * p.head_dim / 2u;
    let i = 2u * j;
    // The two words this thread owns: interleaved (2i, 2i+1), (2i+2, 2i+3) are words
    // i and i + 1 of the head; NEOX (i, i+1) and (i+half, i+1+half) are words j and
    // j + quarter.
    var w0 = i;
    var w1 = i + 1u;
    if (p.interleaved == 0u) { w0 = j; w1 = j + quarter; }
    Vc[dst + w0] = Vs[src + w0];
    Vc[dst + w1] = Vs[src + w1];
    if (d == 0) {
        Kc[dst + w0] = Ks[src + w0];
        Kc[dst + w1] = Ks[src + w1];
        return;
    }
    let a0 = f32(d) * inv_freq[i];
    let a1 = f32(d) * inv_freq[i + 1u];
    let x0 = unpack2x16float(Ks[src + w0]);
    let x1 = unpack2x16float(Ks[src + w1]);
    if (p.interleaved != 0u) {
        Kc[dst + w0] = pack2x16float(turn(x0.x, x0.y, cos(a0), sin(a0)));
        Kc[dst + w1] = pack2x16float(turn(x1.x, x1.y, cos(a1), sin(a1)));
    } else {
        let r0 = turn(x0.x, x1.x, cos(a0), sin(a0));
        let r1 = turn(x0.y, x1.y, cos(a1), sin(a1));
        Kc[dst + w0] = pack2x16float(vec2<f32>(r0.x, r1.x));
        Kc[dst + w1] = pack2x16float(vec2<f32>(r0.y, r1.y));
    }
}
