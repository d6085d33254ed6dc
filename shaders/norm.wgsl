// RMSNorm: Y[r, :] = X[r, :] / sqrt(mean(X[r, :]^2) + eps) * w. One workgroup per row.

struct Params { rows: u32, dim: u32, x_off: u32, y_off: u32, eps: f32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read> Wt: array<f32>;
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;

var<workgroup> part: array<f32, 256>;

@compute @workgroup_size(256)
fn rms_norm(@builtin(workgroup_id) wg: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let r = wg.x + wg.y * nwg.x;
    if (r >= p.rows) { return; } // uniform per workgroup
    let xb = p.x_off + r * p.dim;
    var ss = 0.0;
    for (var i = li; i < p.dim; i += 256u) {
        let v = X[xb + i];
        ss = fma(v, v, ss);
    }
    part[li] = ss;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (li < s) { part[li] += part[li + s]; }
        workgroupBarrier();
    }
    let inv = inverseSqrt(part[0] / f32(p.dim) + p.eps);
    let yb = p.y_off + r * p.dim;
    for (var i = li; i < p.dim; i += 256u) {
        Y[yb + i] = X[xb + i] * inv * Wt[i];
    }
}
