#![allow(clippy::needless_range_loop)]
//! Every WGSL kernel against a plain f32 CPU reference, on fresh random inputs, with
//! output buffers poisoned (NaN) so elements a kernel forgets to write fail the check.
//! Sizes are chosen to hit partial tiles (non-multiples of 64/16/256).

mod common;

use common::{gpu, rand_vec, Rng};
use half::f16;
use kvlink::gpu::{DType, Step, Tensor};
use kvlink::ops::{self, Matrix};

fn f16r(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

fn nan_tensor(n: usize) -> Tensor {
    Tensor::from_f32(gpu(), &[n], &vec![f32::NAN; n], "poison").unwrap()
}

fn assert_close(got: &[f32], want: &[f32], atol: f32, rtol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = atol + rtol * w.abs();
        assert!(
            (g - w).abs() <= tol,
            "{what}: element {i}: got {g}, want {w} (tol {tol})"
        );
    }
}

fn run(f: impl FnOnce(&mut Step)) {
    let g = gpu();
    let mut s = Step::new(g);
    f(&mut s);
    s.submit();
    g.wait().unwrap();
}

/// Run with an explicit kernel variant (GPU-style or the CPU-adapter serial one).
fn run_variant(serial: bool, f: impl FnOnce(&mut Step)) {
    let g = gpu();
    let mut s = Step::new(g);
    s.set_serial(serial);
    f(&mut s);
    s.submit();
    g.wait().unwrap();
}

/// The GEMM variants to check: the GPU-style kernels with the tensor cores on (where the
/// adapter has them) and off, and the CPU-adapter serial kernels. (serial, coop)
fn gemm_variants() -> Vec<(bool, bool)> {
    let mut v = vec![(false, true), (true, false)];
    if gpu().coop.is_some() {
        v.push((false, false));
    }
    v
}

/// X as the GEMM computes with it: rounded to f16 where the tensor-core kernel takes an
/// `m x k` product (GPU kernels, coop on, more than one row, K % 8 == 0), else as is.
fn x_as_used(x: &[f32], serial: bool, coop: bool, m: usize, k: usize) -> Vec<f32> {
    if !serial && coop && gpu().coop.is_some() && m > 1 && k.is_multiple_of(8) {
        x.iter().map(|&v| f16r(v)).collect()
    } else {
        x.to_vec()
    }
}

/// Run `f` with the serial kernels on or off and the tensor cores allowed or not.
fn run_gemm(serial: bool, coop: bool, f: impl FnOnce(&mut Step)) {
    run_variant(serial, |s| {
        s.set_coop(coop);
        f(s)
    })
}

/// [`run_variant`] with the GEMV variant forced: the vec4 GEMV's rows per group, and the
/// subgroup GEMV (`sub`) or the workgroup-reduction one.
fn run_gemv(serial: bool, rows: usize, sub: bool, f: impl FnOnce(&mut Step)) {
    run_variant(serial, |s| {
        s.set_gemv_rows(Some(rows));
        s.set_subgroup_gemv(sub);
        f(s)
    })
}

/// The GEMV variants to check: every rows-per-group count on the GPU kernels, with the
/// subgroup GEMV where the adapter has fixed-size subgroups and without.
fn gemv_rows_for(serial: bool) -> Vec<(usize, bool)> {
    if serial {
        return vec![(1, false)];
    }
    let mut v: Vec<(usize, bool)> = [1, 2, 4].iter().map(|&r| (r, false)).collect();
    if gpu().subgroup_size().is_some() {
        v.extend([1, 2, 4].iter().map(|&r| (r, true)));
    }
    v
}

#[test]
fn shaders_validate_with_naga() {
    for k in ops::kernels::ALL {
        let module = naga::front::wgsl::parse_str(k.source)
            .unwrap_or_else(|e| panic!("{}: {}", k.name, e.emit_to_string(k.source)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32,
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}: {e:?}", k.name));
        assert!(
            module.entry_points.iter().any(|e| e.name == k.entry),
            "{}: no entry point {}",
            k.name,
            k.entry
        );
    }
}

#[test]
fn coop_shaders_validate_with_naga() {
    for k in ops::coop::all_kernels()
        .into_iter()
        .chain(ops::subgroup_gemv_kernels())
        .chain(ops::gemv_batch_kernels())
    {
        let module = naga::front::wgsl::parse_str(k.source)
            .unwrap_or_else(|e| panic!("{}: {}", k.name, e.emit_to_string(k.source)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}: {e:?}", k.name));
    }
}

fn cpu_matmul(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f64;
            for l in 0..k {
                acc += x[i * k + l] as f64 * w[j * k + l] as f64;
            }
            y[i * n + j] = acc as f32;
        }
    }
    y
}

#[test]
fn matmul_and_matvec_match_cpu() {
    let g = gpu();
    let mut rng = Rng::new();
    // (m, n, k, max_rows_per_part): m = 1 takes the GEMV kernel.
    for &(m, n, k, split) in &[
        (1, 67, 38, 1000),
        (1, 300, 130, 128),
        (3, 5, 16, 1000),
        (70, 67, 38, 1000),
        (65, 130, 66, 50),
        (129, 64, 96, 1000),
        (1300, 70, 576, 1000),
    ] {
        for (case, &(bias, acc)) in [(false, false), (true, false), (false, true), (true, true)]
            .iter()
            .enumerate()
        {
            let variants = gemm_variants();
            let (serial, coop) = variants[case % variants.len()];
            let x0 = 2; // row offset into x and y
            let x = rand_vec(&mut rng, (x0 + m) * k, 1.0);
            let w: Vec<f32> = rand_vec(&mut rng, n * k, 1.0)
                .into_iter()
                .map(f16r)
                .collect();
            let b = rand_vec(&mut rng, n, 1.0);
            let y_init = rand_vec(&mut rng, (x0 + m) * n, 1.0);
            let xt = Tensor::from_f32(g, &[x0 + m, k], &x, "x").unwrap();
            let wm = Matrix::upload_split(g, n, k, &w, split, "w").unwrap();
            assert_eq!(wm.parts.len(), n.div_ceil(split));
            let bt = Tensor::from_f32(g, &[n], &b, "b").unwrap();
            let mut init = y_init.clone();
            if !acc {
                init[x0 * n..].iter_mut().for_each(|v| *v = f32::NAN);
            }
            let yt = Tensor::from_f32(g, &[x0 + m, n], &init, "y").unwrap();
            run_gemm(serial, coop, |s| {
                ops::matmul(s, &xt, x0, m, &wm, bias.then_some(&bt), &yt, x0, acc).unwrap()
            });
            let got = g.read_f32(&yt).unwrap();
            let xu = x_as_used(&x[x0 * k..], serial, coop, m, k);
            let mut want = cpu_matmul(&xu, &w, m, n, k);
            for i in 0..m {
                for j in 0..n {
                    if bias {
                        want[i * n + j] += b[j];
                    }
                    if acc {
                        want[i * n + j] += y_init[(x0 + i) * n + j];
                    }
                }
            }
            let what = format!(
                "matmul m={m} n={n} k={k} bias={bias} acc={acc} serial={serial} coop={coop}"
            );
            assert_close(&got[x0 * n..], &want, 1e-3, 1e-4, &what);
            // rows before the offset are untouched
            assert_eq!(
                &got[..x0 * n],
                &init[..x0 * n],
                "{what}: wrote outside its rows"
            );
        }
    }
}

#[test]
fn rms_norm_matches_cpu() {
    let g = gpu();
    let mut rng = Rng::new();
    for &(rows, dim) in &[(1, 576), (5, 100), (3, 1000)] {
        let x = rand_vec(&mut rng, (rows + 1) * dim, 2.0);
        let w = rand_vec(&mut rng, dim, 1.0);
        let xt = Tensor::from_f32(g, &[rows + 1, dim], &x, "x").unwrap();
        let wt = Tensor::from_f32(g, &[dim], &w, "w").unwrap();
        let yt = nan_tensor(rows * dim);
        run(|s| ops::rms_norm(s, &xt, 1, rows, &wt, &yt, 0, 1e-5).unwrap());
        let got = g.read_f32(&yt).unwrap();
        let mut want = vec![0.0; rows * dim];
        for r in 0..rows {
            let row = &x[(r + 1) * dim..(r + 2) * dim];
            let ms = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            for i in 0..dim {
                want[r * dim + i] = row[i] * inv * w[i];
            }
        }
        assert_close(&got, &want, 1e-4, 1e-4, &format!("rms_norm {rows}x{dim}"));
    }
}

fn inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// CPU RoPE of one head vector at position `pos`.
fn cpu_rope(x: &mut [f32], pos: f32, inv: &[f32], interleaved: bool) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let ang = pos * inv[i];
        let (s, c) = ang.sin_cos();
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0 * c - x1 * s;
        x[b] = x0 * s + x1 * c;
    }
}

#[test]
fn rope_matches_cpu_both_pairings() {
    let g = gpu();
    let mut rng = Rng::new();
    for &interleaved in &[false, true] {
        for &(t, heads, hd) in &[(7, 3, 64), (2, 5, 32), (1, 1, 128)] {
            let x = rand_vec(&mut rng, t * heads * hd, 1.0);
            let pos: Vec<i32> = (0..t).map(|_| rng.below(5000) as i32).collect();
            let inv = inv_freq(hd, 10000.0);
            let xt = Tensor::from_f32(g, &[t, heads, hd], &x, "x").unwrap();
            let pt = Tensor::from_u32(g, &[t], bytemuck::cast_slice(&pos), "pos").unwrap();
            let it = Tensor::from_f32(g, &[hd / 2], &inv, "inv").unwrap();
            run(|s| ops::rope(s, &xt, t, heads, hd, &pt, &it, interleaved).unwrap());
            let got = g.read_f32(&xt).unwrap();
            let mut want = x.clone();
            for ti in 0..t {
                for h in 0..heads {
                    let o = (ti * heads + h) * hd;
                    cpu_rope(&mut want[o..o + hd], pos[ti] as f32, &inv, interleaved);
                }
            }
            assert_close(
                &got,
                &want,
                2e-3,
                1e-3,
                &format!("rope t={t} h={heads} hd={hd} il={interleaved}"),
            );
        }
    }
}

#[test]
fn kv_write_and_rotate_keys_match_cpu() {
    let g = gpu();
    let mut rng = Rng::new();
    for &interleaved in &[false, true] {
        let (slots, kvh, hd) = (37, 3, 64);
        let kv_dim = kvh * hd;
        let t = 9;
        let k = rand_vec(&mut rng, t * kv_dim, 1.0);
        let v = rand_vec(&mut rng, t * kv_dim, 1.0);
        // distinct slots in random order
        let mut all: Vec<u32> = (0..slots as u32).collect();
        rng.shuffle(&mut all);
        let sl: Vec<u32> = all[..t].to_vec();
        let kt = Tensor::from_f32(g, &[t, kv_dim], &k, "k").unwrap();
        let vt = Tensor::from_f32(g, &[t, kv_dim], &v, "v").unwrap();
        let st = Tensor::from_u32(g, &[t], &sl, "slots").unwrap();
        let poison = vec![f16::NAN; slots * kv_dim];
        let kc =
            Tensor::from_f32_as_f16(g, &[slots, kv_dim], &vec![f32::NAN; slots * kv_dim], "kc")
                .unwrap();
        let vc =
            Tensor::from_f32_as_f16(g, &[slots, kv_dim], &vec![f32::NAN; slots * kv_dim], "vc")
                .unwrap();
        run(|s| ops::kv_write(s, &kt, &vt, t, &st, &kc, &vc, kv_dim).unwrap());
        let gk = g.read_f32(&kc).unwrap();
        let gv = g.read_f32(&vc).unwrap();
        let mut want_k: Vec<f32> = poison.iter().map(|x| x.to_f32()).collect();
        let mut want_v = want_k.clone();
        for (i, &s) in sl.iter().enumerate() {
            for d in 0..kv_dim {
                want_k[s as usize * kv_dim + d] = f16r(k[i * kv_dim + d]);
                want_v[s as usize * kv_dim + d] = f16r(v[i * kv_dim + d]);
            }
        }
        for (a, b) in gk.iter().zip(&want_k).chain(gv.iter().zip(&want_v)) {
            assert!(
                a == b || (a.is_nan() && b.is_nan()),
                "kv_write: got {a}, want {b}"
            );
        }

        // rotate slots 4..4+n by per-slot deltas (some zero: left untouched)
        let (slot0, n) = (4usize, 20usize);
        let cache: Vec<f32> = rand_vec(&mut rng, slots * kv_dim, 1.0)
            .into_iter()
            .map(f16r)
            .collect();
        let kc = Tensor::from_f32_as_f16(g, &[slots, kv_dim], &cache, "kc").unwrap();
        let deltas: Vec<i32> = (0..n)
            .map(|i| {
                if i % 5 == 0 {
                    0
                } else {
                    rng.below(3000) as i32 - 500
                }
            })
            .collect();
        let dt = Tensor::from_u32(g, &[n], bytemuck::cast_slice(&deltas), "d").unwrap();
        let inv = inv_freq(hd, 10000.0);
        let it = Tensor::from_f32(g, &[hd / 2], &inv, "inv").unwrap();
        run(|s| ops::rotate_keys(s, &kc, slot0, n, kvh, hd, &dt, &it, interleaved).unwrap());
        let got = g.read_f32(&kc).unwrap();
        let mut want = cache.clone();
        for s in 0..n {
            for h in 0..kvh {
                let o = (slot0 + s) * kv_dim + h * hd;
                cpu_rope(&mut want[o..o + hd], deltas[s] as f32, &inv, interleaved);
            }
        }
        assert_close(
            &got,
            &want,
            2e-3,
            2e-3,
            &format!("rotate_keys il={interleaved}"),
        );
    }
}

#[test]
fn assemble_kv_gathers_and_rotates_like_copy_then_rotate() {
    let g = gpu();
    let mut rng = Rng::new();
    for &interleaved in &[false, true] {
        let (rows, slots, kvh, hd) = (29, 43, 3, 64);
        let kv_dim = kvh * hd;
        let slab_k: Vec<f32> = rand_vec(&mut rng, rows * kv_dim, 1.0)
            .into_iter()
            .map(f16r)
            .collect();
        let slab_v: Vec<f32> = rand_vec(&mut rng, rows * kv_dim, 1.0)
            .into_iter()
            .map(f16r)
            .collect();
        let ks = Tensor::from_f32_as_f16(g, &[rows, kv_dim], &slab_k, "ks").unwrap();
        let vs = Tensor::from_f32_as_f16(g, &[rows, kv_dim], &slab_v, "vs").unwrap();
        // slots 5 .. 5 + n: some not this slab's (untouched), some copied (delta 0),
        // the rest turned by deltas of either sign
        let (slot0, n) = (5usize, 31usize);
        let mut table = vec![0u32; 2 * n];
        for s in 0..n {
            let (row, d) = match rng.below(4) {
                0 => (u32::MAX, 0),
                1 => (rng.below(rows as u32), 0),
                _ => (rng.below(rows as u32), rng.below(4000) as i32 - 1000),
            };
            table[2 * s] = row;
            table[2 * s + 1] = d as u32;
        }
        let tt = Tensor::from_u32(g, &[2 * n], &table, "table").unwrap();
        let poison = vec![f32::NAN; slots * kv_dim];
        let kc = Tensor::from_f32_as_f16(g, &[slots, kv_dim], &poison, "kc").unwrap();
        let vc = Tensor::from_f32_as_f16(g, &[slots, kv_dim], &poison, "vc").unwrap();
        let inv = inv_freq(hd, 10000.0);
        let it = Tensor::from_f32(g, &[hd / 2], &inv, "inv").unwrap();
        run(|s| {
            ops::assemble_kv(
                s,
                &ks,
                &vs,
                &tt,
                &kc,
                &vc,
                slot0,
                n,
                kvh,
                hd,
                &it,
                interleaved,
            )
            .unwrap()
        });
        let gk = g.read_f32(&kc).unwrap();
        let gv = g.read_f32(&vc).unwrap();
        let what = format!("assemble_kv il={interleaved}");
        for slot in 0..slots {
            let o = slot * kv_dim;
            let entry = (slot >= slot0 && slot < slot0 + n).then(|| table[2 * (slot - slot0)]);
            match entry {
                None | Some(u32::MAX) => {
                    assert!(
                        gk[o..o + kv_dim]
                            .iter()
                            .chain(&gv[o..o + kv_dim])
                            .all(|x| x.is_nan()),
                        "{what}: slot {slot} is not the table's and must stay untouched"
                    );
                }
                Some(row) => {
                    let d = table[2 * (slot - slot0) + 1] as i32;
                    let r = row as usize * kv_dim;
                    assert_eq!(
                        &gv[o..o + kv_dim],
                        &slab_v[r..r + kv_dim],
                        "{what}: V slot {slot}"
                    );
                    let mut want = slab_k[r..r + kv_dim].to_vec();
                    if d == 0 {
                        assert_eq!(&gk[o..o + kv_dim], &want[..], "{what}: K copied at {slot}");
                        continue;
                    }
                    for h in 0..kvh {
                        cpu_rope(&mut want[h * hd..(h + 1) * hd], d as f32, &inv, interleaved);
                    }
                    assert_close(
                        &gk[o..o + kv_dim],
                        &want,
                        2e-3,
                        2e-3,
                        &format!("{what}: K slot {slot}"),
                    );
                }
            }
        }
        // a table longer than the cache, or a slab of the wrong width, is refused
        let mut s = Step::new(g);
        for (at, heads) in [(slots - 3, kvh), (slot0, kvh + 1)] {
            let r = ops::assemble_kv(
                &mut s,
                &ks,
                &vs,
                &tt,
                &kc,
                &vc,
                at,
                n,
                heads,
                hd,
                &it,
                interleaved,
            );
            assert!(r.is_err(), "{what}: slot0 {at}, {heads} heads accepted");
        }
    }
}

#[test]
fn rotating_by_delta_equals_encoding_at_shifted_position() {
    // KVLINK.md §3: keys encoded at p, then rotated by d, equal keys encoded at p + d.
    let g = gpu();
    let mut rng = Rng::new();
    let (t, kvh, hd) = (6, 2, 64);
    let kv_dim = kvh * hd;
    let raw = rand_vec(&mut rng, t * kv_dim, 1.0);
    let inv = inv_freq(hd, 100000.0);
    let it = Tensor::from_f32(g, &[hd / 2], &inv, "inv").unwrap();
    let p: Vec<i32> = (0..t as i32).collect();
    let d = 777;
    let pd: Vec<i32> = p.iter().map(|x| x + d).collect();
    let slots: Vec<u32> = (0..t as u32).collect();
    let st = Tensor::from_u32(g, &[t], &slots, "slots").unwrap();
    let encode = |pos: &[i32]| {
        let x = Tensor::from_f32(g, &[t, kv_dim], &raw, "k").unwrap();
        let pt = Tensor::from_u32(g, &[t], bytemuck::cast_slice(pos), "p").unwrap();
        let kc = Tensor::zeros(g, &[t, kv_dim], DType::F16, "kc").unwrap();
        let vc = Tensor::zeros(g, &[t, kv_dim], DType::F16, "vc").unwrap();
        run(|s| {
            ops::rope(s, &x, t, kvh, hd, &pt, &it, false).unwrap();
            ops::kv_write(s, &x, &x, t, &st, &kc, &vc, kv_dim).unwrap();
        });
        kc
    };
    let at_p = encode(&p);
    let at_pd = encode(&pd);
    let dt = Tensor::from_u32(g, &[t], bytemuck::cast_slice(&vec![d; t]), "d").unwrap();
    run(|s| ops::rotate_keys(s, &at_p, 0, t, kvh, hd, &dt, &it, false).unwrap());
    let a = g.read_f32(&at_p).unwrap();
    let b = g.read_f32(&at_pd).unwrap();
    assert_close(&a, &b, 4e-3, 4e-3, "rotate(p) by d vs encode at p+d");
}

/// CPU attention with the KVLink mask over an f16 cache.
#[allow(clippy::too_many_arguments)]
fn cpu_attention(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    qslot: &[u32],
    seg: &[u32],
    heads: usize,
    kvh: usize,
    hd: usize,
) -> Vec<f32> {
    let t = qslot.len();
    let mut out = vec![0.0; t * heads * hd];
    let kv_dim = kvh * hd;
    for ti in 0..t {
        let ts = qslot[ti] as usize;
        for h in 0..heads {
            let kh = h / (heads / kvh);
            let qv = &q[(ti * heads + h) * hd..][..hd];
            let mut scores = vec![f32::NEG_INFINITY; ts + 1];
            for (s, sc) in scores.iter_mut().enumerate() {
                if seg[ts] == 0 || seg[s] == seg[ts] {
                    let kv = &kc[s * kv_dim + kh * hd..][..hd];
                    *sc = qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt();
                }
            }
            let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f32 = e.iter().sum();
            for d in 0..hd {
                let mut acc = 0.0;
                for s in 0..=ts {
                    acc += e[s] * vc[s * kv_dim + kh * hd + d];
                }
                out[(ti * heads + h) * hd + d] = acc / z;
            }
        }
    }
    out
}

/// The flash-attention kernels' cases (slots, heads, kv heads, head size, queries,
/// segmented): decode-like (one query), KVLink-like (a few queries over a long segmented
/// cache), prefill-like (every slot a query, several row tiles) and many queries over a
/// partly visible cache.
const FLASH_CASES: &[(usize, usize, usize, usize, usize, bool)] = &[
    (300, 4, 1, 64, 1, false),
    (333, 9, 3, 64, 5, true),
    (97, 2, 2, 32, 97, false),
    (140, 4, 2, 128, 9, true),
    (70, 14, 2, 64, 70, true),
    (200, 8, 2, 64, 50, true),
];

/// `nq` query slots of a cache of `slots`: every slot when `nq == slots` (prefill), else
/// the last and the middle one, then random ones.
fn query_slots(rng: &mut Rng, slots: usize, nq: usize) -> Vec<u32> {
    if nq == slots {
        return (0..slots as u32).collect();
    }
    let mut v = vec![(slots - 1) as u32, (slots / 2) as u32];
    while v.len() < nq {
        v.push(rng.below(slots as u32));
    }
    v.truncate(nq);
    v
}

/// A random attention problem over an f16 cache with the KVLink segment layout
/// (prefix 0, documents 1..3, then 0 again, as in KVLINK.md §1) and its CPU answer.
struct AttnCase {
    t: usize,
    q: Tensor,
    kc: Tensor,
    vc: Tensor,
    qslot: Tensor,
    seg: Tensor,
    want: Vec<f32>,
}

impl AttnCase {
    /// Its operands for an attention call writing `out`.
    fn attn<'a>(&'a self, heads: usize, kvh: usize, hd: usize, out: &'a Tensor) -> ops::Attn<'a> {
        ops::Attn {
            q: &self.q,
            t: self.t,
            heads,
            kv_heads: kvh,
            head_dim: hd,
            kc: &self.kc,
            vc: &self.vc,
            qslot: &self.qslot,
            seg: &self.seg,
            out,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        rng: &mut Rng,
        slots: usize,
        heads: usize,
        kvh: usize,
        hd: usize,
        segmented: bool,
        qslot: &[u32],
    ) -> AttnCase {
        let g = gpu();
        let kv_dim = kvh * hd;
        let kc: Vec<f32> = rand_vec(rng, slots * kv_dim, 1.0)
            .into_iter()
            .map(f16r)
            .collect();
        let vc: Vec<f32> = rand_vec(rng, slots * kv_dim, 1.0)
            .into_iter()
            .map(f16r)
            .collect();
        let seg: Vec<u32> = (0..slots)
            .map(|s| {
                if !segmented || s < slots / 5 || s >= slots * 4 / 5 {
                    0
                } else {
                    1 + (s * 3 / slots) as u32
                }
            })
            .collect();
        let t = qslot.len();
        let q = rand_vec(rng, t * heads * hd, 1.0);
        let words = ops::segment_words(&seg, slots);
        AttnCase {
            t,
            q: Tensor::from_f32(g, &[t, heads, hd], &q, "q").unwrap(),
            kc: Tensor::from_f32_as_f16(g, &[slots, kv_dim], &kc, "kc").unwrap(),
            vc: Tensor::from_f32_as_f16(g, &[slots, kv_dim], &vc, "vc").unwrap(),
            qslot: Tensor::from_u32(g, &[t], qslot, "qslot").unwrap(),
            seg: Tensor::from_u32(g, &[2 * slots], &words, "seg").unwrap(),
            want: cpu_attention(&q, &kc, &vc, qslot, &seg, heads, kvh, hd),
        }
    }
}

#[test]
fn attention_matches_cpu_with_segment_mask() {
    let g = gpu();
    let mut rng = Rng::new();
    for &(slots, heads, kvh, hd, segmented) in &[
        (70, 4, 2, 64, false),
        (150, 3, 1, 32, true),
        (5, 2, 2, 128, true),
        (130, 9, 3, 64, true),
        (1300, 9, 3, 64, false),
    ] {
        // queries: a few slots including the first, the last and doc-internal ones
        let mut qslot: Vec<u32> = vec![0, (slots - 1) as u32, (slots / 2) as u32];
        for _ in 0..4 {
            qslot.push(rng.below(slots as u32));
        }
        let c = AttnCase::new(&mut rng, slots, heads, kvh, hd, segmented, &qslot);
        // With the tensor cores (where the adapter has them) Q and P are rounded to f16.
        for coop in [false, true] {
            if coop && g.coop.is_none() {
                continue;
            }
            let out = nan_tensor(c.t * heads * hd);
            run_gemm(g.prefers_serial_kernels() && !coop, coop, |s| {
                ops::attention(s, &c.attn(heads, kvh, hd, &out)).unwrap()
            });
            let got = g.read_f32(&out).unwrap();
            let what = format!("attention slots={slots} h={heads}/{kvh} hd={hd} coop={coop}");
            let atol = if coop { 4e-3 } else { 1e-4 };
            assert_close(&got, &c.want, atol, 1e-3, &what);
        }
    }
}

/// Several sequences side by side in one cache (the batch decoder's layout), each with
/// its own prefix, documents (the same ids in every sequence) and question, and free
/// slots between them holding other keys: `attention_sequences` must give every query
/// exactly what attention over its own sequence alone gives (the CPU reference run on
/// that sequence's slots only).
#[test]
fn attention_sequences_keeps_sequences_apart() {
    let g = gpu();
    let mut rng = Rng::new();
    for &(heads, kvh, hd) in &[(9, 3, 64), (4, 2, 32), (2, 1, 128)] {
        let kv_dim = kvh * hd;
        let lens = [70usize, 131, 1, 45];
        let gap = 13;
        let slots: usize = lens.iter().sum::<usize>() + gap * (lens.len() + 1);
        let kc: Vec<f32> = rand_vec(&mut rng, slots * kv_dim, 1.0)
            .into_iter()
            .map(f16r)
            .collect();
        let vc: Vec<f32> = rand_vec(&mut rng, slots * kv_dim, 1.0)
            .into_iter()
            .map(f16r)
            .collect();
        // Gaps: segment 0 with start 0, what a stale or foreign slot could look like.
        let mut ids = vec![0u32; slots];
        let mut starts = vec![0u32; slots];
        let (mut qslot, mut want_rows) = (Vec::new(), Vec::new());
        let mut q_all = Vec::new();
        let mut base = gap;
        for &n in &lens {
            let segs: Vec<u32> = (0..n)
                .map(|s| {
                    if s < n / 5 || s >= n * 4 / 5 {
                        0
                    } else {
                        1 + (s * 3 / n) as u32
                    }
                })
                .collect();
            ops::sequence_segments(
                &segs,
                base as u32,
                &mut ids[base..base + n],
                &mut starts[base..base + n],
            );
            // Queries: the last slot (a question), the middle (a document) and a random one.
            let local: Vec<u32> = vec![(n - 1) as u32, (n / 2) as u32, rng.below(n as u32)];
            let q = rand_vec(&mut rng, local.len() * heads * hd, 1.0);
            let sub = |c: &[f32]| c[base * kv_dim..(base + n) * kv_dim].to_vec();
            want_rows.extend(cpu_attention(
                &q,
                &sub(&kc),
                &sub(&vc),
                &local,
                &segs,
                heads,
                kvh,
                hd,
            ));
            qslot.extend(local.iter().map(|&l| base as u32 + l));
            q_all.extend(q);
            base += n + gap;
        }
        let t = qslot.len();
        let words: Vec<u32> = ids.iter().chain(&starts).copied().collect();
        let qt = Tensor::from_f32(g, &[t, heads, hd], &q_all, "q").unwrap();
        let kct = Tensor::from_f32_as_f16(g, &[slots, kv_dim], &kc, "kc").unwrap();
        let vct = Tensor::from_f32_as_f16(g, &[slots, kv_dim], &vc, "vc").unwrap();
        let qs = Tensor::from_u32(g, &[t], &qslot, "qslot").unwrap();
        let seg = Tensor::from_u32(g, &[2 * slots], &words, "seg").unwrap();
        // What the batch decoder runs, then each kernel it may take: the decode kernel
        // with a group per query at several key splits, and the row kernel; last the
        // decode kernel with as many queries of different sequences in one workgroup as
        // fit (each row bounded by its own start); and the batch decoder's call with a
        // hint of the longest sequence far too small (its last split takes the rest).
        let full = ops::DECODE_ROWS / (heads / kvh);
        let longest = *lens.iter().max().unwrap();
        let kernels: [(&str, usize, usize); 8] = [
            (
                "attention_sequences (GPU variant: splits from each start)",
                0,
                0,
            ),
            ("decode_attention group 1, splits 1", 1, 1),
            ("decode_attention group 1, splits 3", 3, 1),
            ("decode_attention group 1, splits 16", 16, 1),
            ("attention_rows", 0, 0),
            ("decode_attention full groups, splits 3", 3, full),
            ("attention_sequences, longest 1", 0, 0),
            ("attention_sequences (serial variant: one split)", 0, 0),
        ];
        for (i, (name, splits, group)) in kernels.iter().enumerate() {
            let out = nan_tensor(t * heads * hd);
            run_variant(i == 7, |s| {
                let a = ops::Attn {
                    q: &qt,
                    t,
                    heads,
                    kv_heads: kvh,
                    head_dim: hd,
                    kc: &kct,
                    vc: &vct,
                    qslot: &qs,
                    seg: &seg,
                    out: &out,
                };
                match i {
                    0 | 7 => ops::attention_sequences(s, &a, longest),
                    6 => ops::attention_sequences(s, &a, 1),
                    4 => ops::attention_rows(s, &a),
                    _ => ops::decode_attention(s, &a, *splits, *group),
                }
                .unwrap()
            });
            let got = g.read_f32(&out).unwrap();
            let what = format!("{name} h={heads}/{kvh} hd={hd}");
            assert_close(&got, &want_rows, 1e-4, 1e-3, &what);
        }
    }
}

#[test]
fn embed_gathers_rows_across_split_table() {
    let g = gpu();
    let mut rng = Rng::new();
    let (vocab, dim) = (101, 36);
    let table: Vec<f32> = rand_vec(&mut rng, vocab * dim, 1.0)
        .into_iter()
        .map(f16r)
        .collect();
    let m = Matrix::upload_split(g, vocab, dim, &table, 40, "emb").unwrap();
    assert_eq!(m.parts.len(), 3);
    let tokens: Vec<u32> = vec![0, 100, 39, 40, 41, 79, 80, 7, 7];
    let tt = Tensor::from_u32(g, &[tokens.len()], &tokens, "tok").unwrap();
    let x = nan_tensor(tokens.len() * dim);
    run(|s| ops::embed(s, &tt, tokens.len(), &m, &x).unwrap());
    let got = g.read_f32(&x).unwrap();
    let want: Vec<f32> = tokens
        .iter()
        .flat_map(|&t| table[t as usize * dim..(t as usize + 1) * dim].to_vec())
        .collect();
    assert_close(&got, &want, 0.0, 0.0, "embed");
}

#[test]
fn add_and_silu_mul_match_cpu() {
    let g = gpu();
    let mut rng = Rng::new();
    let n = 1000;
    let a = rand_vec(&mut rng, n, 3.0);
    let b = rand_vec(&mut rng, n, 3.0);
    let at = Tensor::from_f32(g, &[n], &a, "a").unwrap();
    let bt = Tensor::from_f32(g, &[n], &b, "b").unwrap();
    run(|s| ops::add(s, &at, &bt, n).unwrap());
    let got = g.read_f32(&bt).unwrap();
    let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_close(&got, &want, 1e-6, 1e-6, "add");

    let bt = Tensor::from_f32(g, &[n], &b, "b").unwrap();
    run(|s| ops::silu_mul(s, &at, &bt, n).unwrap());
    let got = g.read_f32(&bt).unwrap();
    let want: Vec<f32> = a
        .iter()
        .zip(&b)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect();
    assert_close(&got, &want, 1e-5, 1e-5, "silu_mul");
}

#[test]
fn argmax_finds_first_maximum() {
    let g = gpu();
    let mut rng = Rng::new();
    for &n in &[1usize, 255, 1000, 49152] {
        let mut x = rand_vec(&mut rng, n + 3, 5.0);
        let j = rng.below(n as u32) as usize;
        x[3 + j] = 100.0;
        if j + 7 < n {
            x[3 + j + 7] = 100.0; // a tie later on: the first one wins
        }
        let xt = Tensor::from_f32(g, &[n + 3], &x, "x").unwrap();
        let out = Tensor::from_u32(g, &[1], &[0xdead], "out").unwrap();
        run(|s| ops::argmax(s, &xt, 3, n, &out).unwrap());
        assert_eq!(g.read_u32(&out).unwrap()[0], j as u32, "argmax n={n}");
    }
}

/// Row-wise argmax (the batch decoder's greedy step): each row's first maximum, found
/// independently of the other rows (a larger value in a neighbouring row never leaks).
#[test]
fn argmax_rows_finds_each_rows_first_maximum() {
    let g = gpu();
    let mut rng = Rng::new();
    for &(n, rows) in &[(1usize, 3usize), (300, 5), (49152, 4)] {
        let off = 5;
        let mut x = rand_vec(&mut rng, off + n * rows, 5.0);
        let mut want = Vec::new();
        for r in 0..rows {
            let j = rng.below(n as u32) as usize;
            x[off + r * n + j] = 10.0 + r as f32; // later rows hold larger maxima
            if j + 3 < n {
                x[off + r * n + j + 3] = 10.0 + r as f32; // a tie: the first wins
            }
            want.push(j as u32);
        }
        let xt = Tensor::from_f32(g, &[x.len()], &x, "x").unwrap();
        let out = Tensor::from_u32(g, &[rows], &vec![0xdead; rows], "out").unwrap();
        run(|s| ops::argmax_rows(s, &xt, off, n, rows, &out).unwrap());
        assert_eq!(
            g.read_u32(&out).unwrap(),
            want,
            "argmax_rows n={n} rows={rows}"
        );
    }
}

#[test]
fn ops_reject_bad_shapes() {
    let g = gpu();
    let x = Tensor::from_f32(g, &[2, 8], &[0.0; 16], "x").unwrap();
    let w = Matrix::upload(g, 4, 8, &[0.0; 32], "w").unwrap();
    let y = Tensor::from_f32(g, &[1, 4], &[0.0; 4], "y").unwrap();
    let mut s = Step::new(g);
    assert!(ops::matmul(&mut s, &x, 0, 2, &w, None, &y, 0, false).is_err());
    assert!(Matrix::upload(g, 4, 7, &[0.0; 28], "odd").is_err());
}

#[test]
fn attention_mass_matches_cpu_and_rows_sum_to_one() {
    let g = gpu();
    let mut rng = Rng::new();
    let (slots, heads, kvh, hd, n_groups) = (90usize, 6usize, 2usize, 64usize, 5usize);
    let kv_dim = kvh * hd;
    let kc: Vec<f32> = rand_vec(&mut rng, slots * kv_dim, 1.0)
        .into_iter()
        .map(f16r)
        .collect();
    let seg: Vec<u32> = (0..slots)
        .map(|s| {
            if (20..60).contains(&s) {
                1 + (s as u32 - 20) / 20
            } else {
                0
            }
        })
        .collect();
    let group: Vec<u32> = (0..slots as u32).map(|s| s % n_groups as u32).collect();
    let t = 3;
    let qslot: Vec<u32> = vec![35, 89, 10]; // a document query, the last slot, a prefix query
    let q = rand_vec(&mut rng, t * heads * hd, 1.0);
    let qt = Tensor::from_f32(g, &[t, heads, hd], &q, "q").unwrap();
    let kt = Tensor::from_f32_as_f16(g, &[slots, kv_dim], &kc, "kc").unwrap();
    let qs = Tensor::from_u32(g, &[t], &qslot, "qslot").unwrap();
    let sg = Tensor::from_u32(g, &[2 * slots], &ops::segment_words(&seg, slots), "seg").unwrap();
    let gr = Tensor::from_u32(g, &[slots], &group, "group").unwrap();
    let out = nan_tensor(t * heads * n_groups);
    run(|s| {
        for row in 0..t {
            ops::attention_mass(
                s,
                &qt,
                row,
                heads,
                kvh,
                hd,
                &kt,
                &qs,
                &sg,
                &gr,
                n_groups,
                &out,
                row * heads * n_groups,
            )
            .unwrap();
        }
    });
    let got = g.read_f32(&out).unwrap();
    let mut want = vec![0.0f32; t * heads * n_groups];
    for (row, &ts) in qslot.iter().enumerate() {
        let ts = ts as usize;
        for h in 0..heads {
            let kh = h / (heads / kvh);
            let qv = &q[(row * heads + h) * hd..][..hd];
            let vis: Vec<usize> = (0..=ts)
                .filter(|&s| seg[ts] == 0 || seg[s] == seg[ts])
                .collect();
            let sc: Vec<f32> = vis
                .iter()
                .map(|&s| {
                    qv.iter()
                        .zip(&kc[s * kv_dim + kh * hd..][..hd])
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
                        / (hd as f32).sqrt()
                })
                .collect();
            let m = sc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = sc.iter().map(|x| (x - m).exp()).sum();
            for (&s, x) in vis.iter().zip(&sc) {
                want[(row * heads + h) * n_groups + group[s] as usize] += (x - m).exp() / z;
            }
            let total: f32 = got[(row * heads + h) * n_groups..][..n_groups].iter().sum();
            assert!(
                (total - 1.0).abs() < 1e-4,
                "row {row} head {h} sums to {total}"
            );
        }
    }
    assert_close(&got, &want, 1e-5, 1e-4, "attention_mass");
}

// ---- Step bind-group cache and the fused decode kernels ----

/// Steps with the same dispatches over the same buffers reuse their bind groups (no
/// per-step creation) and still see each step's own parameters; buffers dropped and
/// reallocated between steps never hit a stale bind group.
#[test]
fn step_cache_reuses_bind_groups_with_fresh_params() {
    // A device of its own, so other tests' steps do not move the counters.
    let g = kvlink::gpu::Gpu::new(&kvlink::gpu::AdapterChoice::from_env()).unwrap();
    let g = &*g;
    let mut rng = Rng::new();
    let (n, k) = (37usize, 24usize);
    let w: Vec<f32> = rand_vec(&mut rng, n * k, 1.0)
        .into_iter()
        .map(f16r)
        .collect();
    let wm = Matrix::upload(g, n, k, &w, "w").unwrap();
    let x = rand_vec(&mut rng, 3 * k, 1.0);
    let xt = Tensor::from_f32(g, &[3, k], &x, "x").unwrap();
    let yt = Tensor::from_f32(g, &[3, n], &vec![f32::NAN; 3 * n], "y").unwrap();
    let mut created = Vec::new();
    for round in 0..6 {
        for serial in [false, true] {
            // The row (a parameter) changes every step; the buffers do not.
            let row = round % 3;
            let mut s = Step::new(g);
            s.set_serial(serial);
            ops::matmul(&mut s, &xt, row, 1, &wm, None, &yt, row, false).unwrap();
            ops::add(&mut s, &xt, &xt, 0).unwrap();
            assert_eq!(s.dispatch_count(), 1);
            s.submit();
            let got = g.read_f32(&yt).unwrap();
            let want = cpu_matmul(&x[row * k..(row + 1) * k], &w, 1, n, k);
            assert_close(
                &got[row * n..(row + 1) * n],
                &want,
                1e-3,
                1e-4,
                &format!("round {round} serial {serial}"),
            );
        }
        created.push(g.step_stats().bind_groups_created);
    }
    // Two kernels (serial and not), created in the first round only.
    assert_eq!(created[0], 2, "{created:?}");
    assert!(created.iter().all(|&c| c == 2), "{created:?}");
    let st = g.step_stats();
    assert_eq!(st.dispatches, 12);

    // Fresh buffers each round (the old ones dropped): results stay right.
    for round in 0..5 {
        let x = rand_vec(&mut rng, k, 1.0);
        let xt = Tensor::from_f32(g, &[1, k], &x, "x").unwrap();
        let yt = Tensor::from_f32(g, &[1, n], &vec![f32::NAN; n], "y").unwrap();
        let mut s = Step::new(g);
        ops::matmul(&mut s, &xt, 0, 1, &wm, None, &yt, 0, false).unwrap();
        s.submit();
        let got = g.read_f32(&yt).unwrap();
        assert_close(
            &got,
            &cpu_matmul(&x, &w, 1, n, k),
            1e-3,
            1e-4,
            &format!("fresh {round}"),
        );
    }
}

/// The GEMV kernels one by one (the generic one for any even K, the vec4 one for
/// K % 8 == 0, the serial one), at odd row counts, with bias / accumulate / row offsets
/// and split matrices.
#[test]
fn matvec_variants_match_cpu() {
    let g = gpu();
    let mut rng = Rng::new();
    // (n, k, max rows per part)
    for &(n, k, split) in &[
        (1, 8, 1000),
        (7, 40, 1000),
        (67, 576, 1000),
        (9, 2056, 4),
        (130, 64, 33),
        (33, 1030, 1000),
    ] {
        for &(bias, acc, serial) in &[
            (false, false, false),
            (true, true, false),
            (true, false, true),
            (false, true, true),
        ] {
            for (rows, sub) in gemv_rows_for(serial) {
                let x0 = 3;
                let x = rand_vec(&mut rng, (x0 + 1) * k, 1.0);
                let w: Vec<f32> = rand_vec(&mut rng, n * k, 1.0)
                    .into_iter()
                    .map(f16r)
                    .collect();
                let b = rand_vec(&mut rng, n, 1.0);
                let y_init = rand_vec(&mut rng, (x0 + 1) * n, 1.0);
                let mut init = y_init.clone();
                if !acc {
                    init[x0 * n..].iter_mut().for_each(|v| *v = f32::NAN);
                }
                let xt = Tensor::from_f32(g, &[x0 + 1, k], &x, "x").unwrap();
                let wm = Matrix::upload_split(g, n, k, &w, split, "w").unwrap();
                let bt = Tensor::from_f32(g, &[n], &b, "b").unwrap();
                let yt = Tensor::from_f32(g, &[x0 + 1, n], &init, "y").unwrap();
                run_gemv(serial, rows, sub, |s| {
                    ops::matmul(s, &xt, x0, 1, &wm, bias.then_some(&bt), &yt, x0, acc).unwrap()
                });
                let got = g.read_f32(&yt).unwrap();
                let mut want = cpu_matmul(&x[x0 * k..], &w, 1, n, k);
                for j in 0..n {
                    want[j] +=
                        if bias { b[j] } else { 0.0 } + if acc { y_init[x0 * n + j] } else { 0.0 };
                }
                let what =
                format!("matvec n={n} k={k} split={split} bias={bias} acc={acc} serial={serial} rows={rows} sub={sub}");
                assert_close(&got[x0 * n..], &want, 2e-3, 1e-4, &what);
                assert_eq!(
                    &got[..x0 * n],
                    &init[..x0 * n],
                    "{what}: wrote outside its row"
                );
            }
        }
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Gate|up projection with SwiGLU: the fused GEMV (both kernels and the serial one),
/// the prefill path (GEMM + silu_mul_split) and the split-matrix fallback.
#[test]
fn matmul_swiglu_matches_cpu() {
    let g = gpu();
    let mut rng = Rng::new();
    // (m, ff, k, max rows per part of the [2 ff, k] matrix)
    for &(m, ff, k, split) in &[
        (1, 1, 8, 1000),
        (1, 37, 64, 1000),
        (1, 29, 38, 1000),
        (1, 300, 576, 1000),
        (1, 21, 40, 16),
        (5, 37, 64, 1000),
        (67, 45, 38, 1000),
        (3, 21, 40, 16),
    ] {
        for (serial, coop) in gemm_variants() {
            let x = rand_vec(&mut rng, m * k, 1.0);
            let w: Vec<f32> = rand_vec(&mut rng, 2 * ff * k, 1.0)
                .into_iter()
                .map(f16r)
                .collect();
            let xt = Tensor::from_f32(g, &[m, k], &x, "x").unwrap();
            let wm = Matrix::upload_split(g, 2 * ff, k, &w, split, "w").unwrap();
            let gu = nan_tensor(m * 2 * ff);
            let act = nan_tensor(m * ff + 3);
            run_gemm(serial, coop, |s| {
                ops::matmul_swiglu(s, &xt, m, &wm, &gu, &act).unwrap()
            });
            let got = g.read_f32(&act).unwrap();
            let proj = cpu_matmul(&x_as_used(&x, serial, coop, m, k), &w, m, 2 * ff, k);
            let want: Vec<f32> = (0..m * ff)
                .map(|i| {
                    let (r, j) = (i / ff, i % ff);
                    silu(proj[r * 2 * ff + j]) * proj[r * 2 * ff + ff + j]
                })
                .collect();
            let what =
                format!("swiglu m={m} ff={ff} k={k} split={split} serial={serial} coop={coop}");
            assert_close(&got[..m * ff], &want, 2e-3, 1e-3, &what);
            assert!(
                got[m * ff..].iter().all(|v| v.is_nan()),
                "{what}: wrote past act"
            );
        }
    }
}

/// Fused RoPE + KV write: Q rotated into its own buffer, K rotated and V copied into
/// the f16 caches at the given slots, other slots untouched; both pairings.
#[test]
fn rope_kv_matches_cpu() {
    let g = gpu();
    let mut rng = Rng::new();
    for &interleaved in &[false, true] {
        for &(t, nh, nkv, hd, slots) in &[(1, 9, 3, 64, 20), (5, 4, 2, 32, 11), (3, 2, 1, 128, 4)] {
            let (qd, kvd) = (nh * hd, nkv * hd);
            let row = qd + 2 * kvd;
            let qkv = rand_vec(&mut rng, t * row, 1.0);
            let mut perm: Vec<u32> = (0..slots as u32).collect();
            rng.shuffle(&mut perm);
            let slot_of = &perm[..t];
            let pos: Vec<i32> = (0..t).map(|_| rng.below(9000) as i32).collect();
            let mut idx = slot_of.to_vec();
            idx.extend(pos.iter().map(|&p| p as u32));
            let inv = inv_freq(hd, 10000.0);
            let qkv_t = Tensor::from_f32(g, &[t, row], &qkv, "qkv").unwrap();
            let idx_t = Tensor::from_u32(g, &[2 * t], &idx, "idx").unwrap();
            let inv_t = Tensor::from_f32(g, &[hd / 2], &inv, "inv").unwrap();
            let q = nan_tensor(t * qd);
            let nan16 = vec![f32::NAN; slots * kvd];
            let kc = Tensor::from_f32_as_f16(g, &[slots, kvd], &nan16, "kc").unwrap();
            let vc = Tensor::from_f32_as_f16(g, &[slots, kvd], &nan16, "vc").unwrap();
            run(|s| {
                ops::rope_kv(
                    s,
                    &qkv_t,
                    t,
                    nh,
                    nkv,
                    hd,
                    &idx_t,
                    &inv_t,
                    interleaved,
                    &q,
                    &kc,
                    &vc,
                )
                .unwrap()
            });
            let got_q = g.read_f32(&q).unwrap();
            let got_k = g.read_f32(&kc).unwrap();
            let got_v = g.read_f32(&vc).unwrap();
            let mut want_q = vec![0.0; t * qd];
            let mut want_k = vec![f32::NAN; slots * kvd];
            let mut want_v = vec![f32::NAN; slots * kvd];
            for ti in 0..t {
                let r = &qkv[ti * row..(ti + 1) * row];
                for h in 0..nh {
                    let mut v = r[h * hd..(h + 1) * hd].to_vec();
                    cpu_rope(&mut v, pos[ti] as f32, &inv, interleaved);
                    want_q[(ti * nh + h) * hd..][..hd].copy_from_slice(&v);
                }
                let sl = slot_of[ti] as usize;
                for h in 0..nkv {
                    let mut v = r[qd + h * hd..qd + (h + 1) * hd].to_vec();
                    cpu_rope(&mut v, pos[ti] as f32, &inv, interleaved);
                    for (d, x) in v.iter().enumerate() {
                        want_k[sl * kvd + h * hd + d] = f16r(*x);
                    }
                }
                for d in 0..kvd {
                    want_v[sl * kvd + d] = f16r(r[qd + kvd + d]);
                }
            }
            let what = format!("rope_kv t={t} nh={nh} nkv={nkv} hd={hd} il={interleaved}");
            assert_close(&got_q, &want_q, 2e-3, 1e-3, &format!("{what} q"));
            for (name, got, want) in [("k", &got_k, &want_k), ("v", &got_v, &want_v)] {
                for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
                    if b.is_nan() {
                        assert!(a.is_nan(), "{what} {name}: element {i} written ({a})");
                    } else {
                        assert!(
                            (a - b).abs() <= 4e-3 + 2e-3 * b.abs(),
                            "{what} {name}: element {i}: got {a}, want {b}"
                        );
                    }
                }
            }
        }
    }
}

fn cpu_rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ss: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    let inv = 1.0 / (ss / x.len() as f64 + eps as f64).sqrt();
    x.iter()
        .zip(w)
        .map(|(&v, &g)| (v as f64 * inv) as f32 * g)
        .collect()
}

/// RMSNorm fused into the GEMV (vec4 kernel, K % 8 == 0) and its two-dispatch fallback
/// (other K, the serial kernels), plain and SwiGLU, with bias / accumulate / offsets.
#[test]
fn rms_norm_matvec_matches_cpu() {
    let g = gpu();
    let mut rng = Rng::new();
    let eps = 1e-5;
    // (n, k, max rows per part)
    for &(n, k, split) in &[
        (1, 8, 100),
        (67, 576, 1000),
        (45, 40, 16),
        (21, 38, 1000),
        (300, 2048, 1000),
    ] {
        for &(bias, acc, serial) in &[
            (false, false, false),
            (true, true, false),
            (true, false, true),
            (false, true, true),
        ] {
            for (rows, sub) in gemv_rows_for(serial) {
                let x0 = 2;
                let x = rand_vec(&mut rng, (x0 + 1) * k, 2.0);
                let nw: Vec<f32> = rand_vec(&mut rng, k, 0.5).iter().map(|v| 1.0 + v).collect();
                let w: Vec<f32> = rand_vec(&mut rng, 2 * n * k, 1.0)
                    .into_iter()
                    .map(f16r)
                    .collect();
                let b = rand_vec(&mut rng, n, 1.0);
                let y_init = rand_vec(&mut rng, (x0 + 1) * n, 1.0);
                let mut init = y_init.clone();
                if !acc {
                    init[x0 * n..].iter_mut().for_each(|v| *v = f32::NAN);
                }
                let xt = Tensor::from_f32(g, &[x0 + 1, k], &x, "x").unwrap();
                let nwt = Tensor::from_f32(g, &[k], &nw, "nw").unwrap();
                let wm = Matrix::upload_split(g, n, k, &w[..n * k], split, "w").unwrap();
                let bt = Tensor::from_f32(g, &[n], &b, "b").unwrap();
                let yt = Tensor::from_f32(g, &[x0 + 1, n], &init, "y").unwrap();
                let h = nan_tensor(k);
                run_gemv(serial, rows, sub, |s| {
                    let bias = bias.then_some(&bt);
                    ops::rms_norm_matvec(s, &xt, x0, &nwt, eps, &h, &wm, bias, &yt, x0, acc)
                        .unwrap()
                });
                let got = g.read_f32(&yt).unwrap();
                let xn = cpu_rms_norm(&x[x0 * k..], &nw, eps);
                let mut want = cpu_matmul(&xn, &w[..n * k], 1, n, k);
                for j in 0..n {
                    want[j] +=
                        if bias { b[j] } else { 0.0 } + if acc { y_init[x0 * n + j] } else { 0.0 };
                }
                let what = format!(
                "rms_norm_matvec n={n} k={k} split={split} bias={bias} acc={acc} serial={serial} rows={rows} sub={sub}"
            );
                assert_close(&got[x0 * n..], &want, 3e-3, 1e-3, &what);
                assert_eq!(
                    &got[..x0 * n],
                    &init[..x0 * n],
                    "{what}: wrote outside its row"
                );

                // SwiGLU: W = [gate; up], 2n rows.
                let wm = Matrix::upload_split(g, 2 * n, k, &w, split.max(2 * n), "w").unwrap();
                let xt = Tensor::from_f32(g, &[k], &x[x0 * k..], "x").unwrap();
                let gu = nan_tensor(2 * n);
                let act = nan_tensor(n + 1);
                run_gemv(serial, rows, sub, |s| {
                    ops::rms_norm_matvec_swiglu(s, &xt, &nwt, eps, &h, &wm, &gu, &act).unwrap()
                });
                let got = g.read_f32(&act).unwrap();
                let proj = cpu_matmul(&xn, &w, 1, 2 * n, k);
                let want: Vec<f32> = (0..n).map(|j| silu(proj[j]) * proj[n + j]).collect();
                assert_close(&got[..n], &want, 3e-3, 1e-3, &format!("{what} swiglu"));
                assert!(got[n].is_nan(), "{what} swiglu: wrote past act");
            }
        }
    }
}

/// The fused model path (stacked Q|K|V with Qwen2 biases, rope_kv, SwiGLU GEMV, the
/// norms fused into decode GEMVs) against the CPU reference forward on a random
/// tiny-qwen2: a prefill with logits for every row, then two decode steps.
#[test]
fn fused_forward_with_qkv_biases_matches_cpu_reference() {
    use kvlink::model::llama::{Batch, Llama, Logits};
    use kvlink::model::random::RandomModel;
    use kvlink::model::WeightSource;
    let g = gpu();
    let src = RandomModel::new("tiny-qwen2", 3).unwrap();
    assert!(src.config().attention_bias);
    let model = Llama::load(g.clone(), &src, &mut |_, _| {}).unwrap();
    let reference = common::reference::RefModel::load(&src);
    let mut rng = Rng::new();
    let vocab = src.config().vocab_size as u32;
    let tokens: Vec<u32> = (0..9).map(|_| rng.below(vocab)).collect();
    let positions: Vec<i32> = (0..9).collect();
    let mut cache = model.new_cache(32).unwrap();
    let check = |got: &[f32], want: &[f32], what: &str| {
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert_close(got, want, 2e-3 * scale.max(1.0), 2e-3, what);
    };
    // Prefill 7 tokens (all rows' logits), then decode the rest one by one.
    let slots: Vec<u32> = (0..7).collect();
    let batch = Batch {
        tokens: &tokens[..7],
        positions: &positions[..7],
        slots: &slots,
    };
    let out = model
        .forward(&mut cache, &batch, Logits::All, false)
        .unwrap();
    let want = reference.forward(&tokens[..7], &positions[..7], &[0; 7], false);
    let v = vocab as usize;
    for r in 0..7 {
        check(
            &out.logits[r * v..(r + 1) * v],
            &want[r],
            &format!("prefill row {r}"),
        );
    }
    for i in 7..9 {
        let batch = Batch {
            tokens: &tokens[i..i + 1],
            positions: &positions[i..i + 1],
            slots: &[i as u32],
        };
        let out = model
            .forward(&mut cache, &batch, Logits::Last, true)
            .unwrap();
        let want = reference.forward(&tokens[..=i], &positions[..=i], &vec![0; i + 1], true);
        check(&out.logits, &want[0], &format!("decode token {i}"));
    }
}

/// The flash-attention kernel with several key splits (split-K plus the combine pass)
/// against the CPU reference: decode-like (one query), KVLink-like (a few queries over a
/// long segmented cache) and prefill-like (every slot a query, several row tiles).
#[test]
fn flash_attention_splits_match_cpu() {
    let g = gpu();
    let mut rng = Rng::new();
    for &(slots, heads, kvh, hd, nq, segmented) in FLASH_CASES {
        let qslot = query_slots(&mut rng, slots, nq);
        let c = AttnCase::new(&mut rng, slots, heads, kvh, hd, segmented, &qslot);
        let t = c.t;
        let (k, br) = match hd {
            32 => (ops::kernels::FLASH_D32, 32),
            64 => (ops::kernels::FLASH_D64, 32),
            _ => (ops::kernels::FLASH_D128, 16),
        };
        for splits in [1, 3, 16] {
            let out = nan_tensor(t * heads * hd);
            run(|s| ops::flash_attention(s, &c.attn(heads, kvh, hd, &out), k, br, splits).unwrap());
            let got = g.read_f32(&out).unwrap();
            let what = format!("flash slots={slots} h={heads}/{kvh} hd={hd} t={t} splits={splits}");
            assert_close(&got, &c.want, 1e-4, 1e-3, &what);
        }
    }
}

/// The tensor-core flash attention (flash_coop.wgsl) against the CPU: head sizes 32, 64,
/// 128, grouped heads, causal and KVLink masks, many queries (several row tiles) and
/// few, caches not a multiple of the key tile, 1 to 16 key splits. Q and P are rounded
/// to f16, so the tolerance is f16's. Runs where the adapter has cooperative matrices.
#[test]
fn coop_flash_attention_matches_cpu() {
    let g = gpu();
    let Some(shape) = g.coop else {
        common::skip(
            "coop",
            "coop_flash_attention_matches_cpu",
            "no cooperative matrices",
        );
        return;
    };
    let mut rng = Rng::new();
    for &(slots, heads, kvh, hd, nq, segmented) in FLASH_CASES {
        let qslot = query_slots(&mut rng, slots, nq);
        let c = AttnCase::new(&mut rng, slots, heads, kvh, hd, segmented, &qslot);
        let t = c.t;
        for splits in [1, 3, 16] {
            let out = nan_tensor(t * heads * hd);
            run_gemm(false, true, |s| {
                ops::coop::flash(s, shape, &c.attn(heads, kvh, hd, &out), splits).unwrap()
            });
            let got = g.read_f32(&out).unwrap();
            let what =
                format!("coop flash slots={slots} h={heads}/{kvh} hd={hd} t={t} splits={splits}");
            assert_close(&got, &c.want, 4e-3, 1e-3, &what);
        }
    }
}

/// A random GEMM problem for the kernels that take matmul.wgsl's parameters directly:
/// `m` rows of X after one offset row, W (`n x k`, f16 values) split in parts of at most
/// `split` rows, a bias, and Y poisoned in its rows unless `acc` (accumulate into it).
struct GemmCase {
    m: usize,
    n: usize,
    k: usize,
    bias: bool,
    acc: bool,
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    y_init: Vec<f32>,
    xt: Tensor,
    wm: Matrix,
    bt: Tensor,
    yt: Tensor,
}

/// The offset rows of X and Y in a [`GemmCase`].
const X0: usize = 1;

impl GemmCase {
    fn new(
        rng: &mut Rng,
        (m, n, k): (usize, usize, usize),
        split: usize,
        bias: bool,
        acc: bool,
    ) -> GemmCase {
        let g = gpu();
        let x = rand_vec(rng, (X0 + m) * k, 1.0);
        let w: Vec<f32> = rand_vec(rng, n * k, 1.0).into_iter().map(f16r).collect();
        let b = rand_vec(rng, n, 1.0);
        let y_init = rand_vec(rng, (X0 + m) * n, 1.0);
        let mut init = y_init.clone();
        if !acc {
            init[X0 * n..].iter_mut().for_each(|v| *v = f32::NAN);
        }
        GemmCase {
            m,
            n,
            k,
            bias,
            acc,
            xt: Tensor::from_f32(g, &[X0 + m, k], &x, "x").unwrap(),
            wm: Matrix::upload_split(g, n, k, &w, split, "w").unwrap(),
            bt: Tensor::from_f32(g, &[n], &b, "b").unwrap(),
            yt: Tensor::from_f32(g, &[X0 + m, n], &init, "y").unwrap(),
            x,
            w,
            b,
            y_init,
        }
    }

    /// Run `f` (matmul.wgsl's 8 parameter words for a part of W, and the bindings X, W's
    /// part, bias, Y) on every part in one step, then compare Y with the CPU, X rounded to
    /// f16 first where the kernel does that (`x_f16`), and check the offset row is intact.
    fn check(&self, x_f16: bool, what: &str, f: impl Fn(&mut Step, &[u32; 8], [&Tensor; 4])) {
        let (m, n, k) = (self.m, self.n, self.k);
        run_variant(false, |s| {
            for (r0, part) in &self.wm.parts {
                let flags = self.acc as u32 | if self.bias { 2 } else { 0 };
                let params = [
                    m as u32,
                    part.shape[0] as u32,
                    k as u32,
                    (X0 * k) as u32,
                    (X0 * n) as u32,
                    n as u32,
                    *r0 as u32,
                    flags,
                ];
                f(s, &params, [&self.xt, part, &self.bt, &self.yt]);
            }
        });
        let got = gpu().read_f32(&self.yt).unwrap();
        let xs: Vec<f32> = self.x[X0 * k..]
            .iter()
            .map(|&v| if x_f16 { f16r(v) } else { v })
            .collect();
        let mut want = cpu_matmul(&xs, &self.w, m, n, k);
        for i in 0..m {
            for j in 0..n {
                if self.bias {
                    want[i * n + j] += self.b[j];
                }
                if self.acc {
                    want[i * n + j] += self.y_init[(X0 + i) * n + j];
                }
            }
        }
        assert_close(&got[X0 * n..], &want, 1e-3, 1e-3, what);
        assert_eq!(
            &got[..X0 * n],
            &self.y_init[..X0 * n],
            "{what}: wrote outside its rows"
        );
    }
}

/// The tiled GEMM with K split over workgroups (partial sums, then matmul_reduce with
/// bias / accumulate / row offsets / a part of a split matrix) and the skinny GEMM for
/// a few rows, against the CPU.
#[test]
fn matmul_split_k_matches_cpu() {
    let mut rng = Rng::new();
    // (m, n, k, max rows per part)
    // splits = 0: the skinny kernel (m <= 32) instead of the tiled one
    for &(m, n, k, split) in &[
        (3, 70, 600, 1000),
        (48, 130, 1000, 50),
        (65, 64, 272, 1000),
        (2, 37, 64, 1000),
        (17, 130, 1000, 50),
        (32, 9, 2056, 1000),
    ] {
        for splits in [0, 1, 2, 5, 17] {
            let skinny = splits == 0;
            if skinny && m > 32 {
                continue;
            }
            // the skinny kernel with bias and with accumulation; the others alternate
            let flags = if skinny {
                vec![(true, false), (false, true)]
            } else {
                vec![(splits % 2 == 1, splits > 2)]
            };
            for (bias, acc) in flags {
                let c = GemmCase::new(&mut rng, (m, n, k), split, bias, acc);
                let what = format!("split-K matmul {m}x{n}x{k} splits={splits}");
                c.check(false, &what, |s, params, bufs| {
                    if skinny {
                        ops::skinny_matmul(s, params, bufs).unwrap();
                    } else {
                        ops::tiled_matmul(s, params, splits, bufs).unwrap();
                    }
                });
            }
        }
    }
}

/// The batch GEMV (matmul_gemv_rows.wgsl: a few rows, each weight read once for all)
/// against the CPU: 2 to 19 rows (more than one pass of 8), 1, 2 and 4 weight rows per
/// subgroup, parts of a split matrix, bias and accumulate, N not a multiple of a
/// workgroup's rows.
#[test]
fn gemv_batch_matches_cpu() {
    let g = gpu();
    let Some(sgs) = g.subgroup_size() else {
        common::skip(
            "subgroups",
            "gemv_batch_matches_cpu",
            "no fixed-size subgroups",
        );
        return;
    };
    let mut rng = Rng::new();
    for &(m, n, k, split) in &[
        (2, 70, 64, 1000),
        (8, 130, 200, 50),
        (9, 33, 1000, 1000),
        (19, 257, 136, 100),
    ] {
        for rows in [1, 2, 4] {
            let (bias, acc) = (rows != 2, rows == 4);
            let c = GemmCase::new(&mut rng, (m, n, k), split, bias, acc);
            let what = format!("batch GEMV {m}x{n}x{k} rows per subgroup {rows}");
            c.check(false, &what, |s, params, bufs| {
                s.set_gemv_rows(Some(rows));
                ops::gemv_batch(s, sgs, params, params[1] as usize, bufs);
            });
        }
    }
}

/// The decode-attention kernel (few rows per KV head) against the CPU reference: grouped
/// heads G = 1, 3, 4, 7, head sizes 32, 64, 128, one and two queries, causal and KVLink
/// masks (a query inside a document whose keys start mid-cache, a query in segment 0
/// after the documents), caches that are not a multiple of the 64-key chunk, queries
/// that leave the tail of the cache unseen (idle splits), 1 to 16 key splits.
#[test]
fn decode_attention_matches_cpu() {
    let g = gpu();
    let mut rng = Rng::new();
    // (slots, heads, kv heads, head_dim, segmented, query slots as fractions of slots)
    let doc = |n: usize| (n * 7 / 10) as u32; // inside document 3, which starts at 2n/3
    for &(slots, heads, kvh, hd, segmented, ref qs) in &[
        (100, 2, 2, 64, false, vec![99]),
        (130, 2, 2, 32, false, vec![60, 129]),
        (333, 9, 3, 64, true, vec![doc(333)]),
        (333, 9, 3, 64, true, vec![332, doc(333)]),
        (300, 8, 2, 128, true, vec![doc(300)]),
        (300, 8, 2, 128, false, vec![150, 299]),
        (200, 14, 2, 64, true, vec![199, doc(200)]),
        (70, 14, 2, 128, false, vec![69]),
        (129, 12, 3, 32, true, vec![128, doc(129)]),
        (150, 7, 1, 32, true, vec![doc(150)]),
        (1000, 4, 1, 64, true, vec![999, 640]),
    ] {
        let c = AttnCase::new(&mut rng, slots, heads, kvh, hd, segmented, qs);
        let t = c.t;
        for splits in [1, 2, 5, 16] {
            let out = nan_tensor(t * heads * hd);
            run(|s| ops::decode_attention(s, &c.attn(heads, kvh, hd, &out), splits, t).unwrap());
            let got = g.read_f32(&out).unwrap();
            let what =
                format!("decode slots={slots} h={heads}/{kvh} hd={hd} q={qs:?} splits={splits}");
            assert_close(&got, &c.want, 1e-4, 1e-3, &what);
        }
    }
}

/// A row's decode-attention result does not depend on the other queries of its batch:
/// query slot 200 alone and next to query slot 299 give the same bits, at any split count.
#[test]
fn decode_attention_row_is_independent_of_batch() {
    let g = gpu();
    let mut rng = Rng::new();
    let (slots, heads, kvh, hd) = (300, 8, 2, 64);
    let c = AttnCase::new(&mut rng, slots, heads, kvh, hd, true, &[200, 299]);
    let q1 = Tensor::from_f32(
        g,
        &[1, heads, hd],
        &g.read_f32(&c.q).unwrap()[..heads * hd],
        "q1",
    )
    .unwrap();
    let qslot1 = Tensor::from_u32(g, &[1], &[200], "qslot1").unwrap();
    for splits in [1, 3] {
        let two = nan_tensor(2 * heads * hd);
        let one = nan_tensor(heads * hd);
        run(|s| {
            ops::decode_attention(s, &c.attn(heads, kvh, hd, &two), splits, 2).unwrap();
            let alone = ops::Attn {
                q: &q1,
                t: 1,
                qslot: &qslot1,
                ..c.attn(heads, kvh, hd, &one)
            };
            ops::decode_attention(s, &alone, splits, 1).unwrap();
        });
        let two = g.read_f32(&two).unwrap();
        let one = g.read_f32(&one).unwrap();
        assert_eq!(
            one.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            two[..heads * hd]
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>(),
            "splits={splits}"
        );
    }
}

/// The tensor-core GEMM (matmul_coop.wgsl, both tile layouts) against the CPU, with X
/// rounded to f16 as the kernel does: edge tiles in M, N and K (K not a multiple of the
/// K step), row offsets, bias, accumulate, a part of a split matrix, split-K.
/// Runs where the adapter has cooperative matrices (the H100; lavapipe from Mesa 26).
#[test]
fn coop_matmul_matches_cpu() {
    use ops::coop::Tile;
    let g = gpu();
    let Some(shape) = g.coop else {
        common::skip(
            "coop",
            "coop_matmul_matches_cpu",
            "the adapter has no cooperative matrices",
        );
        return;
    };
    eprintln!("coop shape {shape:?}");
    let mut rng = Rng::new();
    // (m, n, k, max rows per part)
    for &(m, n, k, split) in &[
        (1, 70, 600, 1000),
        (17, 130, 1000, 50),
        (33, 129, 264, 1000),
        (130, 200, 520, 1000),
        (300, 64, 72, 1000),
        (40, 128, 256, 1000), // whole tiles in N and K: the direct-B variants take it
        (70, 96, 192, 64),
    ] {
        for tile in [
            Tile::skinny(g),
            Tile::wide(g),
            "1,2,1,3".parse().unwrap(),
            "2,2,2,2d".parse().unwrap(),
            "1,2,2,1dv".parse().unwrap(),
            "2,1,1,2v".parse().unwrap(),
            "2,2,2,2vw".parse().unwrap(),
            "1,2,2,1dw".parse().unwrap(),
        ] {
            for splits in [Some(1), Some(3), None] {
                let (bias, acc) = match splits {
                    Some(1) => (true, false),
                    Some(_) => (false, true),
                    None => (true, true),
                };
                let c = GemmCase::new(&mut rng, (m, n, k), split, bias, acc);
                let what = format!("coop matmul {m}x{n}x{k} tile {tile} splits={splits:?}");
                c.check(true, &what, |s, params, bufs| {
                    ops::coop::matmul(s, shape, tile, params, splits, bufs).unwrap()
                });
            }
        }
    }
}

/// The fused decode QKV GEMV (matvec_qkv_rope.wgsl: RMSNorm, projection + bias, NEOX
/// RoPE at a position, Q stored, K/V written into one cache row) against the CPU, with
/// every other cache row left as it was (poisoned). Where the adapter has fixed-size
/// subgroups; the op must then take the product (it returns whether it did).
#[test]
fn qkv_rope_matvec_matches_cpu() {
    let g = gpu();
    if g.subgroup_size().is_none() {
        common::skip(
            "subgroups",
            "qkv_rope_matvec_matches_cpu",
            "no fixed-size subgroups",
        );
        return;
    }
    let mut rng = Rng::new();
    for &(nh, nkv, hd, k, bias) in &[
        (9, 3, 64, 576, false),
        (4, 2, 32, 136, true),
        (2, 1, 128, 256, true),
    ] {
        let (qd, kvd) = (nh * hd, nkv * hd);
        let n = qd + 2 * kvd;
        let slots = 7;
        let (slot, pos) = (1 + rng.below(slots as u32 - 1), rng.below(9000) as i32);
        let x = rand_vec(&mut rng, k, 1.0);
        let nw: Vec<f32> = rand_vec(&mut rng, k, 0.5).iter().map(|v| 1.0 + v).collect();
        let w: Vec<f32> = rand_vec(&mut rng, n * k, 0.1)
            .into_iter()
            .map(f16r)
            .collect();
        let b = rand_vec(&mut rng, n, 1.0);
        let inv = inv_freq(hd, 10000.0);
        let eps = 1e-5;
        let xt = Tensor::from_f32(g, &[1, k], &x, "x").unwrap();
        let nwt = Tensor::from_f32(g, &[k], &nw, "nw").unwrap();
        let wm = Matrix::upload(g, n, k, &w, "w").unwrap();
        let bt = Tensor::from_f32(g, &[n], &b, "b").unwrap();
        let inv_t = Tensor::from_f32(g, &[hd / 2], &inv, "inv").unwrap();
        let q = nan_tensor(qd);
        let nan16 = vec![f32::NAN; slots * kvd];
        let kc = Tensor::from_f32_as_f16(g, &[slots, kvd], &nan16, "kc").unwrap();
        let vc = Tensor::from_f32_as_f16(g, &[slots, kvd], &nan16, "vc").unwrap();
        let mut took = false;
        run_variant(false, |s| {
            took = ops::qkv_rope_matvec(
                s,
                &xt,
                &nwt,
                eps,
                &wm,
                bias.then_some(&bt),
                [nh, nkv, hd],
                &inv_t,
                (slot, pos),
                [&q, &kc, &vc],
            )
            .unwrap();
        });
        assert!(
            took,
            "the fused QKV GEMV did not take a product it supports"
        );
        // CPU: normalize, project, rotate.
        let ms = x.iter().map(|v| v * v).sum::<f32>() / k as f32;
        let inv_rms = 1.0 / (ms + eps).sqrt();
        let h: Vec<f32> = x.iter().zip(&nw).map(|(v, w)| v * inv_rms * w).collect();
        let mut y = cpu_matmul(&h, &w, 1, n, k);
        if bias {
            y.iter_mut().zip(&b).for_each(|(v, b)| *v += b);
        }
        let mut want_q = vec![0.0; qd];
        let mut want_k = vec![f32::NAN; slots * kvd];
        let mut want_v = vec![f32::NAN; slots * kvd];
        let sl = slot as usize;
        for hh in 0..nh {
            let mut v = y[hh * hd..(hh + 1) * hd].to_vec();
            cpu_rope(&mut v, pos as f32, &inv, false);
            want_q[hh * hd..][..hd].copy_from_slice(&v);
        }
        for hh in 0..nkv {
            let mut v = y[qd + hh * hd..qd + (hh + 1) * hd].to_vec();
            cpu_rope(&mut v, pos as f32, &inv, false);
            for (d, e) in v.iter().enumerate() {
                want_k[sl * kvd + hh * hd + d] = f16r(*e);
            }
        }
        for d in 0..kvd {
            want_v[sl * kvd + d] = f16r(y[qd + kvd + d]);
        }
        let what = format!("qkv_rope nh={nh} nkv={nkv} hd={hd} k={k} bias={bias}");
        assert_close(
            &g.read_f32(&q).unwrap(),
            &want_q,
            2e-3,
            1e-3,
            &format!("{what} q"),
        );
        for (name, t, want) in [("k", &kc, &want_k), ("v", &vc, &want_v)] {
            let got = g.read_f32(t).unwrap();
            for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
                if b.is_nan() {
                    assert!(a.is_nan(), "{what} {name}: element {i} written ({a})");
                } else {
                    assert!(
                        (a - b).abs() <= 4e-3 + 2e-3 * b.abs(),
                        "{what} {name}: element {i}: got {a}, want {b}"
                    );
                }
            }
        }
    }
}
