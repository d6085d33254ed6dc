// Write new keys and values (f32 [T, kv_dim]) into the f16 KV cache ([slots, kv_dim],
// two per word) at cache slots slot[t].

struct Params { T: u32, kv_dim: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> K: array<f32>;
@group(0) @binding(2) var<storage, read> V: array<f32>;
@group(0) @binding(3) var<storage, read> slot: array<u32>;
@group(0) @binding(4) var<storage, read_write> Kc: array<u32>;
@group(0) @binding(5) var<storage, read_write> Vc: array<u32>;

@compute @workgroup_size(256)
fn kv_write(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let words = p.kv_dim / 2u;
    let idx = gid.x + gid.y * nwg.x * 256u;
    if (idx >= p.T * words) { return; }
    let t = idx / words;
    let j = idx % words;
    let src = t * p.kv_dim + 2u * j;
    let dst = slot[t] * words + j;
    Kc[dst] = pack2x16float(vec2<f32>(K[src], K[src + 1u]));
    Vc[dst] = pack2x16float(vec2<f32>(V[src], V[src + 1u]));
}
