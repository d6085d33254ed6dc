// Embedding gather: X[t, :] = table[tokens[t] - row0, :] for tokens in this part of a
// (possibly split) f16 table; rows outside [row0, row0 + rows) are left alone.

struct Params { T: u32, dim: u32, row0: u32, rows: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> tokens: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<u32>;
@group(0) @binding(3) var<storage, read_write> X: array<f32>;

@compute @workgroup_size(256)
fn embed(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let words = p.dim / 2u;
    let idx = gid.x + gid.y * nwg.x * 256u;
    if (idx >= p.T * words) { return; }
    let t = idx / words;
    let j = idx % words;
    let tok = tokens[t];
    if (tok < p.row0 || tok >= p.row0 + p.rows) { return; }
    let v = unpack2x16float(table[(tok - p.row0) * words + j]);
    X[t * p.dim + 2u * j] = v.x;
    X[t * p.dim + 2u * j + 1u] = v.y;
}
