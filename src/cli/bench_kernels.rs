//! `kvlink bench kernels`: the model's GEMM / GEMV shapes, one kernel variant at a time,
//! each checked against a CPU dot product on sampled outputs before it is timed.
//!
//! For tuning on a new GPU: every variant of one shape runs in the same process, so the
//! numbers compare directly. Timing: the GPU is first kept busy for ~0.5 s (clocks up);
//! then per variant, the best of 3 submits of `--repeats` dispatches each, wall time over
//! the count (launch gaps are small next to these kernels, and a forward pass pays them
//! too). Weights rotate over enough copies to exceed a large L2 (~200 MB), so
//! memory-bound shapes are timed from device memory, not the cache. Attention cases
//! (`--attention QxK`) time Q queries over a cache of K keys, causal, the model's heads.

use anyhow::{bail, Result};
use clap::Args;
use kvlink::gpu::{AdapterChoice, DType, Gpu, Step, Tensor};
use kvlink::model::random::random_config;
use kvlink::ops::coop::Tile;
use kvlink::ops::{self, Matrix};
use std::time::Instant;

#[derive(Args)]
pub struct KernelArgs {
    /// Model shape whose projections are timed (smollm2-135m, llama-3.2-1b, tiny, ...).
    #[arg(long, default_value = "llama-3.2-1b")]
    pub shape: String,
    /// Rows (tokens) per product; 1 times the decode GEMVs.
    #[arg(long, value_delimiter = ',', default_value = "1,32,512,2048")]
    pub rows: Vec<usize>,
    /// Extra tensor-core tiles to try, "SGM,SGN,FM,FN" separated by ';' (the defaults,
    /// wide and skinny, always run).
    #[arg(long, value_delimiter = ';')]
    pub coop_tiles: Vec<String>,
    /// Split-K factors to try with each tensor-core tile besides the one the engine picks
    /// (e.g. 1,4,8,16,32: the K chunks each workgroup sums before the reduction).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..=256))]
    pub splits: Vec<u16>,
    /// Dispatches per timed submit.
    #[arg(long, default_value_t = 20)]
    pub repeats: usize,
    /// Attention cases QUERIESxKEYS: the queries are the last QUERIES slots of a causal
    /// cache of KEYS slots (512x2048: a prefill chunk; 32x10240: a KVLink question).
    #[arg(long, value_delimiter = ',', default_value = "512x2048,32x10240")]
    pub attention: Vec<String>,
    /// Print results as JSON lines.
    #[arg(long)]
    pub json: bool,
}

/// One way to run a product.
#[derive(Clone, Copy)]
enum Variant {
    /// What `ops::matmul` picks with the tensor cores off (tiled / skinny / GEMV).
    Portable,
    /// What `ops::matmul` picks by default.
    Default,
    Coop(Tile, Option<usize>),
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Variant::Portable => write!(f, "portable"),
            Variant::Default => write!(f, "default"),
            Variant::Coop(t, None) => write!(f, "coop {t}"),
            Variant::Coop(t, Some(s)) => write!(f, "coop {t} split {s}"),
        }
    }
}

struct Rng(u64);
impl Rng {
    fn unit(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

pub fn run(adapter: &AdapterChoice, a: &KernelArgs) -> Result<()> {
    let cfg = random_config(&a.shape)?;
    let gpu = Gpu::new(adapter)?;
    let g = &*gpu;
    let (d, q, kv, ff) = (
        cfg.hidden_size,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.intermediate_size,
    );
    let projections = [
        ("qkv", q + 2 * kv, d),
        ("wo", d, q),
        ("gate_up", 2 * ff, d),
        ("down", d, ff),
    ];
    let mut tiles = vec![Tile::wide(g), Tile::skinny(g)];
    for s in &a.coop_tiles {
        tiles.push(s.parse().map_err(anyhow::Error::msg)?);
    }
    eprintln!(
        "bench kernels: {} projections on {} (tensor cores: {})",
        a.shape,
        g.report.name,
        g.coop.map_or("none".into(), |c| format!(
            "{}x{} f16->f32, subgroup {}",
            c.t, c.t, c.subgroup
        ))
    );
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut bad = 0;
    warm_up(g)?;
    if !a.json {
        println!(
            "| rows | projection | N x K | variant | us | TFLOP/s | GB/s (weights) | max err |"
        );
        println!("|---:|---|---|---|---:|---:|---:|---:|");
    }
    for &(name, n, k) in &projections {
        let wdata: Vec<f32> = (0..n * k).map(|_| rng.unit() * 0.05).collect();
        let wbytes = (n * k * 2) as f64;
        let copies = ((200e6 / wbytes).ceil() as usize).clamp(1, 8);
        let ws: Vec<Matrix> = (0..copies)
            .map(|_| Matrix::upload(g, n, k, &wdata, name))
            .collect::<kvlink::Result<_>>()?;
        for &m in &a.rows {
            let x: Vec<f32> = (0..m * k).map(|_| rng.unit()).collect();
            let xt = Tensor::from_f32(g, &[m, k], &x, "x")?;
            let yt = Tensor::zeros(g, &[m, n], DType::F32, "y")?;
            let mut variants = vec![Variant::Default, Variant::Portable];
            if let Some(shape) = g.coop.filter(|_| m > 1) {
                variants.extend(tiles.iter().filter(|t| t.fits(g, shape)).flat_map(|&t| {
                    let forced = a.splits.iter().map(|&s| Some(s as usize));
                    std::iter::once(None)
                        .chain(forced)
                        .map(move |s| Variant::Coop(t, s))
                }));
            }
            for v in variants {
                let record = |s: &mut Step, w: &Matrix| -> kvlink::Result<()> {
                    match v {
                        Variant::Default => ops::matmul(s, &xt, 0, m, w, None, &yt, 0, false),
                        Variant::Portable => {
                            s.set_coop(false);
                            ops::matmul(s, &xt, 0, m, w, None, &yt, 0, false)
                        }
                        Variant::Coop(tile, splits) => {
                            let shape = g.coop.expect("coop variants need a shape");
                            let (_, part) = &w.parts[0];
                            let params = [m as u32, n as u32, k as u32, 0, 0, n as u32, 0, 0];
                            ops::coop::matmul(
                                s,
                                shape,
                                tile,
                                &params,
                                splits,
                                [&xt, part, &g.dummy(), &yt],
                            )
                        }
                    }
                };
                // Check first: Y poisoned, one product, sampled outputs against the CPU.
                yt.write_f32(g, &vec![f32::NAN; m * n]);
                let mut s = Step::new(g);
                record(&mut s, &ws[0])?;
                s.submit();
                let y = g.read_f32(&yt)?;
                let coop = matches!(v, Variant::Coop(..))
                    || (matches!(v, Variant::Default) && g.coop.is_some() && m > 1);
                let mut err = 0.0f64;
                for i in 0..256usize {
                    let (r, c) = ((i * 7919) % m, (i * 104_729) % n);
                    let (mut want, mut mag) = (0.0f64, 0.0f64);
                    for j in 0..k {
                        let mut xv = x[r * k + j];
                        if coop {
                            xv = half::f16::from_f32(xv).to_f32();
                        }
                        let wv = half::f16::from_f32(wdata[c * k + j]).to_f32();
                        want += xv as f64 * wv as f64;
                        mag += (xv as f64 * wv as f64).abs();
                    }
                    let e = (y[r * n + c] as f64 - want).abs() / mag.max(1e-6);
                    err = if e.is_nan() {
                        f64::INFINITY
                    } else {
                        err.max(e)
                    };
                }
                let ok = err < 1e-3;
                // Time: warm-up submit, then `repeats` products in one submit.
                let time_once = |reps: usize| -> Result<f64> {
                    let mut s = Step::new(g);
                    for i in 0..reps {
                        record(&mut s, &ws[i % copies])?;
                    }
                    let t0 = Instant::now();
                    s.submit();
                    g.wait()?;
                    Ok(t0.elapsed().as_secs_f64() / reps as f64)
                };
                time_once(a.repeats.min(4))?;
                let mut sec = f64::INFINITY;
                for _ in 0..3 {
                    sec = sec.min(time_once(a.repeats.max(1))?);
                }
                let tflops = 2.0 * (m * n * k) as f64 / sec / 1e12;
                let gbs = wbytes / sec / 1e9;
                if !ok {
                    bad += 1;
                }
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({"rows": m, "projection": name, "n": n, "k": k,
                            "variant": v.to_string(), "us": sec * 1e6, "tflops": tflops,
                            "weight_gbs": gbs, "max_rel_err": err, "ok": ok})
                    );
                } else {
                    println!(
                        "| {m} | {name} | {n} x {k} | {v} | {:.1} | {tflops:.1} | {gbs:.0} | {err:.1e}{} |",
                        sec * 1e6,
                        if ok { "" } else { " WRONG" }
                    );
                }
            }
        }
    }
    bad += attention_cases(g, &cfg, a, &mut rng)?;
    if bad > 0 {
        bail!("{bad} kernel variant(s) gave wrong results (the WRONG rows above)");
    }
    Ok(())
}

/// Keep the GPU busy for about half a second so its clocks are up before timing.
fn warm_up(g: &Gpu) -> Result<()> {
    let (m, n, k) = (1024, 4096, 1024);
    let w = Matrix::upload(g, n, k, &vec![0.01; n * k], "warm w")?;
    let x = Tensor::from_f32(g, &[m, k], &vec![0.5; m * k], "warm x")?;
    let y = Tensor::zeros(g, &[m, n], DType::F32, "warm y")?;
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < 0.5 {
        let mut s = Step::new(g);
        for _ in 0..8 {
            ops::matmul(&mut s, &x, 0, m, &w, None, &y, 0, false)?;
        }
        s.submit();
        g.wait()?;
    }
    Ok(())
}

/// The `--attention` cases under the default kernel and with the tensor cores off; each
/// checked on sampled rows against a CPU softmax, then timed. Returns the wrong ones.
fn attention_cases(
    g: &Gpu,
    cfg: &kvlink::model::ModelConfig,
    a: &KernelArgs,
    rng: &mut Rng,
) -> Result<usize> {
    let (heads, kvh, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let kv_dim = kvh * hd;
    let mut bad = 0;
    if !a.json && a.attention.iter().any(|c| !c.trim().is_empty()) {
        println!();
        println!("| queries | keys | variant | us | TFLOP/s | max err |");
        println!("|---:|---:|---|---:|---:|---:|");
    }
    for case in a.attention.iter().filter(|c| !c.trim().is_empty()) {
        let (t, cap) = case
            .split_once('x')
            .and_then(|(q, k)| Some((q.parse::<usize>().ok()?, k.parse::<usize>().ok()?)))
            .filter(|&(q, k)| q >= 1 && q <= k)
            .ok_or_else(|| {
                anyhow::anyhow!("--attention {case:?}: expected QUERIESxKEYS, queries <= keys")
            })?;
        let kc: Vec<f32> = (0..cap * kv_dim)
            .map(|_| half::f16::from_f32(rng.unit()).to_f32())
            .collect();
        let vc: Vec<f32> = (0..cap * kv_dim)
            .map(|_| half::f16::from_f32(rng.unit()).to_f32())
            .collect();
        let q: Vec<f32> = (0..t * heads * hd).map(|_| rng.unit()).collect();
        let slots: Vec<u32> = ((cap - t) as u32..cap as u32).collect();
        let qt = Tensor::from_f32(g, &[t, heads, hd], &q, "q")?;
        let kt = Tensor::from_f32_as_f16(g, &[cap, kv_dim], &kc, "k")?;
        let vt = Tensor::from_f32_as_f16(g, &[cap, kv_dim], &vc, "v")?;
        let st = Tensor::from_u32(g, &[t], &slots, "slots")?;
        let seg = Tensor::from_u32(g, &[2 * cap], &ops::segment_words(&[], cap), "seg")?;
        let out = Tensor::zeros(g, &[t * heads * hd], DType::F32, "o")?;
        // Causal: query i (slot cap - t + i) sees keys 0..=its slot.
        let keys: f64 = slots.iter().map(|&s| s as f64 + 1.0).sum();
        let flops = 4.0 * keys * (heads * hd) as f64;
        for coop in [true, false] {
            if !coop && g.coop.is_none() {
                continue;
            }
            let record = |s: &mut Step| -> kvlink::Result<()> {
                s.set_coop(coop);
                let a = ops::Attn {
                    q: &qt,
                    t,
                    heads,
                    kv_heads: kvh,
                    head_dim: hd,
                    kc: &kt,
                    vc: &vt,
                    qslot: &st,
                    seg: &seg,
                    out: &out,
                };
                ops::attention(s, &a)
            };
            out.write_f32(g, &vec![f32::NAN; t * heads * hd]);
            let mut s = Step::new(g);
            record(&mut s)?;
            s.submit();
            let got = g.read_f32(&out)?;
            let mut err = 0.0f32;
            for i in 0..8usize {
                let (ti, h) = ((i * 7919) % t, (i * 31) % heads);
                let kh = h / (heads / kvh);
                let ts = slots[ti] as usize;
                let qv = &q[(ti * heads + h) * hd..][..hd];
                let sc: Vec<f32> = (0..=ts)
                    .map(|s| {
                        let kv = &kc[s * kv_dim + kh * hd..][..hd];
                        qv.iter().zip(kv).map(|(x, y)| x * y).sum::<f32>() / (hd as f32).sqrt()
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = sc.iter().map(|v| (v - mx).exp()).collect();
                let z: f32 = e.iter().sum();
                for d in 0..hd {
                    let want: f32 = (0..=ts)
                        .map(|s| e[s] * vc[s * kv_dim + kh * hd + d])
                        .sum::<f32>()
                        / z;
                    let e = (got[(ti * heads + h) * hd + d] - want).abs();
                    err = if e.is_nan() {
                        f32::INFINITY
                    } else {
                        err.max(e)
                    };
                }
            }
            let ok = err < 5e-3;
            bad += usize::from(!ok);
            let time_once = |reps: usize| -> Result<f64> {
                let mut s = Step::new(g);
                for _ in 0..reps {
                    record(&mut s)?;
                }
                let t0 = Instant::now();
                s.submit();
                g.wait()?;
                Ok(t0.elapsed().as_secs_f64() / reps as f64)
            };
            time_once(2)?;
            let mut sec = f64::INFINITY;
            for _ in 0..3 {
                sec = sec.min(time_once(a.repeats.max(1))?);
            }
            let variant = if coop { "default" } else { "portable" };
            let tflops = flops / sec / 1e12;
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"attention": case, "variant": variant, "us": sec * 1e6,
                        "tflops": tflops, "max_abs_err": err, "ok": ok})
                );
            } else {
                println!(
                    "| {t} | {cap} | {variant} | {:.1} | {tflops:.1} | {err:.1e}{} |",
                    sec * 1e6,
                    if ok { "" } else { " WRONG" }
                );
            }
        }
    }
    Ok(bad)
}
