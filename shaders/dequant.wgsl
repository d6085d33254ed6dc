// Dequantize a document cache's q8 K and V parts (src/kv/quant.rs: n signed bytes, then
// n / 32 f16 scales) into the f16 cache (two per word) as they arrive from the disk
// store: value i = q[i] * scale[i / 32]. One thread per 4 values (a source word); the K
// and V parts of one layer in one dispatch.

struct Params {
    n: u32,      // values per part (a multiple of 32)
    k_src: u32,  // word offset of the K part in Ks
    v_src: u32,  // word offset of the V part in Vs
    dst: u32,    // word offset (value offset / 2) in Kd and Vd
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> Ks: array<u32>;
@group(0) @binding(2) var<storage, read> Vs: array<u32>;
@group(0) @binding(3) var<storage, read_write> Kd: array<u32>;
@group(0) @binding(4) var<storage, read_write> Vd: array<u32>;

// Sign-extended byte b of word w, as f32.
fn byte_at(w: u32, b: u32) -> f32 {
    return f32(bitcast<i32>(w << (24u - 8u * b)) >> 24u);
}

fn dequant_word(w: u32, scale: f32) -> vec2<u32> {
    let lo = vec2<f32>(byte_at(w, 0u), byte_at(w, 1u)) * scale;
    let hi = vec2<f32>(byte_at(w, 2u), byte_at(w, 3u)) * scale;
    return vec2<u32>(pack2x16float(lo), pack2x16float(hi));
}

@compute @workgroup_size(256)
fn dequant_q8(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n / 4u) { return; }
    // Block i / 8 (8 words of 4 values); its scale is half (block % 2) of scale word
    // block / 2, after the n / 4 words of values.
    let block = i / 8u;
    let sw = p.n / 4u + block / 2u;
    let half = block % 2u;
    let ks = unpack2x16float(Ks[p.k_src + sw])[half];
    let vs = unpack2x16float(Vs[p.v_src + sw])[half];
    let k = dequant_word(Ks[p.k_src + i], ks);
    let v = dequant_word(Vs[p.v_src + i], vs);
    Kd[p.dst + 2u * i] = k.x;
    Kd[p.dst + 2u * i + 1u] = k.y;
    Vd[p.dst + 2u * i] = v.x;
    Vd[p.dst + 2u * i + 1u] = v.y;
}
