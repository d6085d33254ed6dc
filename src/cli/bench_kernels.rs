//! `kvlink bench kernels`: the model's GEMM / GEMV shapes, one kernel variant at a time,
//! each checked against a CPU dot product on sampled outputs before it is timed.
//!
//! For tuning on a new GPU: every variant of one shape runs in the same process, so the
//! numbers compare directly. Timing: `--repeats` dispatches recorded into one submit,
//! wall time over the count after a warm-up submit (for these kernels launch gaps are
//! small next to the work, and they are the cost a forward pass pays too). Weights rotate
//! over enough copies to exceed a large L2 (~200 MB), so memory-bound shapes are timed
//! from device memory, not the cache.

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
    /// Dispatches per timed submit.
    #[arg(long, default_value_t = 20)]
    pub repeats: usize,
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
    Coop(Tile),
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Variant::Portable => write!(f, "portable"),
            Variant::Default => write!(f, "default"),
            Variant::Coop(t) => write!(f, "coop {t}"),
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
    let mut tiles = vec![Tile::wide(), Tile::skinny()];
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
                variants.extend(
                    tiles
                        .iter()
                        .filter(|t| t.fits(g, shape))
                        .map(|&t| Variant::Coop(t)),
                );
            }
            for v in variants {
                let record = |s: &mut Step, w: &Matrix| -> kvlink::Result<()> {
                    match v {
                        Variant::Default => ops::matmul(s, &xt, 0, m, w, None, &yt, 0, false),
                        Variant::Portable => {
                            s.set_coop(false);
                            ops::matmul(s, &xt, 0, m, w, None, &yt, 0, false)
                        }
                        Variant::Coop(tile) => {
                            let shape = g.coop.expect("coop variants need a shape");
                            let (_, part) = &w.parts[0];
                            let params = [m as u32, n as u32, k as u32, 0, 0, n as u32, 0, 0];
                            ops::coop::matmul(
                                s,
                                shape,
                                tile,
                                &params,
                                None,
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
                let coop = matches!(v, Variant::Coop(_))
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
                let sec = time_once(a.repeats.max(1))?;
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
    if bad > 0 {
        bail!("{bad} kernel variant(s) gave wrong results (max err >= 1e-3 of the sum of |x w|)");
    }
    Ok(())
}
