// Shared by the subgroup GEMVs (matvec_subgroup.wgsl, matvec_qkv_rope.wgsl; the host
// prepends this file and `const RPW: u32` (rows per subgroup, 1, 2 or 4) and
// `const SGS: u32` (the subgroup size)). The including shader declares `p` (with K,
// x_off, flags), X: array<vec4<f32>>, W: array<vec4<u32>> and NW: array<vec4<f32>>.

fn dot8(w: vec4<u32>, x0: vec4<f32>, x1: vec4<f32>) -> f32 {
    let a = unpack2x16float(w.x);
    let b = unpack2x16float(w.y);
    let c = unpack2x16float(w.z);
    let d = unpack2x16float(w.w);
    return dot(vec4<f32>(a, b), x0) + dot(vec4<f32>(c, d), x1);
}

// The RPW rows at word offsets r against X's 8 values at vec4<u32> step k.
fn step4(r: vec4<u32>, k: u32, x0: vec4<f32>, x1: vec4<f32>) -> vec4<f32> {
    var s = vec4<f32>(0.0);
    s.x = dot8(W[r.x + k], x0, x1);
    if (RPW > 1u) { s.y = dot8(W[r.y + k], x0, x1); }
    if (RPW > 2u) {
        s.z = dot8(W[r.z + k], x0, x1);
        s.w = dot8(W[r.w + k], x0, x1);
    }
    return s;
}

// X as 4 values (index in vec4 units from the row start), normalized when flag 8 is set.
fn xv(i: u32, inv: f32) -> vec4<f32> {
    let v = X[p.x_off / 4u + i];
    if ((p.flags & 8u) != 0u) { return v * inv * NW[i]; }
    return v;
}

// 1 / RMS of X (flag 8; the subgroup reduces it alone, no barrier), else 1.
fn x_inv_rms(lane: u32, eps: f32) -> f32 {
    if ((p.flags & 8u) == 0u) { return 1.0; }
    var ss = 0.0;
    for (var i = lane; i < p.K / 4u; i += SGS) {
        let v = X[p.x_off / 4u + i];
        ss += dot(v, v);
    }
    return inverseSqrt(subgroupAdd(ss) / f32(p.K) + eps);
}

// The subgroup's RPW row sums (rows at word offsets g), and with `two` also those of the
// rows at u (SwiGLU's up rows), summed over the subgroup: the lanes walk K in vec4<u32>
// steps, four steps unrolled so each lane has 4 RPW (8 RPW) weight loads in flight.
fn gemv_rows(g: vec4<u32>, u: vec4<u32>, two: bool, lane: u32, inv: f32) -> array<vec4<f32>, 2> {
    let k8 = p.K / 8u;
    var acc = vec4<f32>(0.0);
    var acu = vec4<f32>(0.0);
    var k = lane;
    for (; k + 3u * SGS < k8; k += 4u * SGS) {
        let xa = xv(2u * k, inv);
        let xb = xv(2u * k + 1u, inv);
        let xc = xv(2u * (k + SGS), inv);
        let xd = xv(2u * (k + SGS) + 1u, inv);
        let xe = xv(2u * (k + 2u * SGS), inv);
        let xf = xv(2u * (k + 2u * SGS) + 1u, inv);
        let xg = xv(2u * (k + 3u * SGS), inv);
        let xh = xv(2u * (k + 3u * SGS) + 1u, inv);
        acc += step4(g, k, xa, xb) + step4(g, k + SGS, xc, xd)
             + step4(g, k + 2u * SGS, xe, xf) + step4(g, k + 3u * SGS, xg, xh);
        if (two) {
            acu += step4(u, k, xa, xb) + step4(u, k + SGS, xc, xd)
                 + step4(u, k + 2u * SGS, xe, xf) + step4(u, k + 3u * SGS, xg, xh);
        }
    }
    for (; k < k8; k += SGS) {
        let x0 = xv(2u * k, inv);
        let x1 = xv(2u * k + 1u, inv);
        acc += step4(g, k, x0, x1);
        if (two) { acu += step4(u, k, x0, x1); }
    }
    return array<vec4<f32>, 2>(subgroupAdd(acc), subgroupAdd(acu));
}
