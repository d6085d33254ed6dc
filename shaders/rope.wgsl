// Rotary position embedding.
//  rope:        rotate Q or K activations (f32 [T, heads, head_dim]) in place at explicit
//               positions pos[t].
//  rotate_keys: rotate cached keys (f16 pairs [slots, kv_heads, head_dim]) in place by a
//               per-slot delta: slot slot0 + s is turned by delta[s] (KVLink, §3: moving a
//               key from position q to q + d is one more rotation by d * theta_i).
// Pairing: NEOX/HF (dim i with i + head_dim/2) unless `interleaved` (dims 2i, 2i+1).
// Angles are computed as f32(pos) * inv_freq[i], as HF transformers does.

struct Params {
    n: u32,          // rope: tokens T; rotate_keys: slots
    heads: u32,
    head_dim: u32,
    off: u32,        // rope: element offset of X; rotate_keys: first slot
    interleaved: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> X: array<u32>; // f32 bits (rope) or f16 pairs (rotate_keys)
@group(0) @binding(2) var<storage, read> pos: array<i32>;
@group(0) @binding(3) var<storage, read> inv_freq: array<f32>;

fn turn(x0: f32, x1: f32, c: f32, s: f32) -> vec2<f32> {
    return vec2<f32>(x0 * c - x1 * s, x0 * s + x1 * c);
}

@compute @workgroup_size(256)
fn rope(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let half = p.head_dim / 2u;
    let idx = gid.x + gid.y * nwg.x * 256u;
    if (idx >= p.n * p.heads * half) { return; }
    let i = idx % half;
    let th = idx / half;
    let t = th / p.heads;
    let base = p.off + th * p.head_dim;
    var a = base + i;
    var b = base + i + half;
    if (p.interleaved != 0u) { a = base + 2u * i; b = a + 1u; }
    let ang = f32(pos[t]) * inv_freq[i];
    let r = turn(bitcast<f32>(X[a]), bitcast<f32>(X[b]), cos(ang), sin(ang));
    X[a] = bitcast<u32>(r.x);
    X[b] = bitcast<u32>(r.y);
}

// One thread per f16 word pair: two rotation pairs (i, i+1) at once, since they share words.
@compute @workgroup_size(256)
fn rotate_keys(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let half = p.head_dim / 2u;
    let quarter = half / 2u;
    let idx = gid.x + gid.y * nwg.x * 256u;
    if (idx >= p.n * p.heads * quarter) { return; }
    let j = idx % quarter;
    let sh = idx / quarter;          // slot-local index * heads + head
    let s = sh / p.heads;
    let d = pos[s];
    if (d == 0) { return; }
    let base = ((p.off + s) * p.heads + sh % p.heads) * p.head_dim;
    let i = 2u * j;
    if (p.interleaved != 0u) {
        // dims (2i, 2i+1) and (2i+2, 2i+3): words (base+2i)/2 and that + 1
        let w0 = (base + 2u * i) / 2u;
        let v0 = unpack2x16float(X[w0]);
        let v1 = unpack2x16float(X[w0 + 1u]);
        let a0 = f32(d) * inv_freq[i];
        let a1 = f32(d) * inv_freq[i + 1u];
        X[w0] = pack2x16float(turn(v0.x, v0.y, cos(a0), sin(a0)));
        X[w0 + 1u] = pack2x16float(turn(v1.x, v1.y, cos(a1), sin(a1)));
    } else {
        // dims (i, i+half) and (i+1, i+1+half): words (base+i)/2 and (base+i+half)/2
        let wa = (base + i) / 2u;
        let wb = (base + i + half) / 2u;
        let lo = unpack2x16float(X[wa]);
        let hi = unpack2x16float(X[wb]);
        let a0 = f32(d) * inv_freq[i];
        let a1 = f32(d) * inv_freq[i + 1u];
        let r0 = turn(lo.x, hi.x, cos(a0), sin(a0));
        let r1 = turn(lo.y, hi.y, cos(a1), sin(a1));
        X[wa] = pack2x16float(vec2<f32>(r0.x, r1.x));
        X[wb] = pack2x16float(vec2<f32>(r0.y, r1.y));
    }
}
