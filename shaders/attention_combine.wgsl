// Merge the key splits of flash_attention.wgsl and attention_decode.wgsl: for each output
// row, the splits' unnormalised outputs and (max, sum) pairs combine by the log-sum-exp
// rule.
// part: [splits, R, D/4] vec4 outputs, then [splits, R] vec4 (max, sum, -, -).
// Flash (group = 0): split z covers the key slots [z * span, (z + 1) * span). Decode
// (group = its queries per workgroup group): split z covers `span` slots (whole chunks of
// `chunk`) from the chunk of the group's first visible slot, the last split also the
// rest. A row reads only the splits that meet its visible keys [start(query slot) =
// seg[cap + slot] (its document's first slot, or for segment 0 its sequence's), query
// slot] (the others hold no key of it), so a decode step over a long cache with few keys
// used merges a few splits, not all of them.

struct Params { R: u32, d4: u32, splits: u32, span: u32, heads: u32, cap: u32, group: u32, chunk: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> part: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> O: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> qslot: array<u32>;
@group(0) @binding(4) var<storage, read> seg: array<u32>;

@compute @workgroup_size(64)
fn attention_combine(@builtin(global_invocation_id) gid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p.R * p.d4) { return; }
    let r = i / p.d4;
    let c = i % p.d4;
    let q = r / p.heads;
    let ts = qslot[q];
    let first = seg[p.cap + ts];
    var z0 = first / p.span;
    var z1 = min(ts / p.span + 1u, p.splits);
    if (p.group > 0u) {
        // the group's base chunk: that of its earliest visible slot
        let g0 = q / p.group * p.group;
        var lo = first;
        for (var k = g0; k < min(g0 + p.group, p.R / p.heads); k++) {
            lo = min(lo, seg[p.cap + qslot[k]]);
        }
        let per = p.span / p.chunk;
        let base = lo / p.chunk;
        z0 = min((first / p.chunk - base) / per, p.splits - 1u);
        z1 = min((ts / p.chunk - base) / per + 1u, p.splits);
    }
    let ml = p.splits * p.R * p.d4;
    var m = -3.4e38;
    for (var z = z0; z < z1; z++) { m = max(m, part[ml + z * p.R + r].x); }
    var l = 0.0;
    var o = vec4<f32>(0.0);
    for (var z = z0; z < z1; z++) {
        let s = part[ml + z * p.R + r];
        if (s.y > 0.0) { // a split that saw no key of this row may leave its output unwritten
            let w = exp(s.x - m);
            l += s.y * w;
            o += part[(z * p.R + r) * p.d4 + c] * w;
        }
    }
    O[i] = o / l;
}
