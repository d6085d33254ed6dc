//! Llama-3 RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`, Llama 3.1/3.2)
//! against the published rule, worked out here for Llama-3.2's numbers (theta 500000,
//! head_dim 64, factor 32, low_freq_factor 1, high_freq_factor 4, original context 8192).
//!
//! Pair i has wavelength 2*pi * 500000^(i/32). It is kept where the wavelength is below
//! 8192/4 = 2048 (500000^(i/32) < 325.95, i.e. i/32 < ln 325.95 / ln 500000 = 0.4410:
//! i <= 14), divided by the factor where it is above 8192/1 (500000^(i/32) > 1303.8,
//! i/32 > 0.5466: i >= 18), and blended in between (i = 15, 16, 17) with
//! smooth = (8192 / wavelength - 1) / (4 - 1): f' = (1 - smooth) f / 32 + smooth f.

use kvlink::model::config::ModelConfig;

/// Llama 3.2 1B's shape (the random-weights model of that shape, `--random-model
/// llama-3.2-1b`), with its rope numbers checked here.
fn llama32() -> ModelConfig {
    let c = kvlink::model::random::random_config("llama-3.2-1b").unwrap();
    assert_eq!((c.rope_theta, c.head_dim), (500000.0, 64));
    let s = c.rope_scaling.expect("llama3 rope scaling");
    assert_eq!(
        (s.factor, s.low_freq_factor, s.high_freq_factor),
        (32.0, 1.0, 4.0)
    );
    assert_eq!(s.original_max_position_embeddings, 8192);
    c
}

#[test]
fn llama3_scaling_keeps_high_scales_low_and_blends_the_middle() {
    let cfg = llama32();
    let got = cfg.rope_inv_freq();
    assert_eq!(got.len(), 32);
    let plain: Vec<f64> = (0..32)
        .map(|i| 500000f64.powf(-(i as f64) / 32.0))
        .collect();
    for (i, (&g, &f)) in got.iter().zip(&plain).enumerate() {
        let want = match i {
            0..=14 => f,
            18..=31 => f / 32.0,
            15..=17 => {
                let wavelength = 2.0 * std::f64::consts::PI / f;
                let smooth = (8192.0 / wavelength - 1.0) / 3.0;
                assert!(
                    smooth > 0.0 && smooth < 1.0,
                    "pair {i} is in the blend band"
                );
                (1.0 - smooth) * f / 32.0 + smooth * f
            }
            _ => unreachable!(),
        };
        let rel = ((g as f64 - want) / want).abs();
        assert!(rel < 1e-6, "pair {i}: {g} vs {want} (rel {rel:e})");
    }
    assert_eq!(
        got[0], 1.0,
        "the fastest pair turns one radian per position"
    );
    // Without scaling every pair keeps its frequency.
    let plain_cfg = ModelConfig {
        rope_scaling: None,
        ..cfg
    };
    for (g, f) in plain_cfg.rope_inv_freq().iter().zip(&plain) {
        assert!(((*g as f64 - f) / f).abs() < 1e-6);
    }
}
