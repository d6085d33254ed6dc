// Greedy sampling on the GPU: out[r] = argmax over logits[off + r n .. off + (r + 1) n]
// (lowest index on ties), one workgroup per row r, so only token ids cross to the host.

struct Params { n: u32, off: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

var<workgroup> best_v: array<f32, 256>;
var<workgroup> best_i: array<u32, 256>;

@compute @workgroup_size(256)
fn argmax(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let row0 = p.off + wg.x * p.n;
    var bv = -3.4e38;
    var bi = 0xffffffffu;
    for (var i = li; i < p.n; i += 256u) {
        let v = logits[row0 + i];
        if (v > bv) { bv = v; bi = i; } // strided ascending: first max wins
    }
    best_v[li] = bv;
    best_i[li] = bi;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (li < s) {
            let ov = best_v[li + s];
            let oi = best_i[li + s];
            if (ov > best_v[li] || (ov == best_v[li] && oi < best_i[li])) {
                best_v[li] = ov;
                best_i[li] = oi;
            }
        }
        workgroupBarrier();
    }
    if (li == 0u) { out[wg.x] = best_i[0]; }
}
