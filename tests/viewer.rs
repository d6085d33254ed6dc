//! The desktop viewer under Xvfb (lavapipe): drive `kvlink view` through its test mode
//! (KVLINK_VIEW_SCRIPT) to load the default model, add two documents, ask in compare
//! mode, save a screenshot and a summary; check both. Run with
//! `scripts/viewer-test.sh` (installs Xvfb) or `cargo test --features viewer --test viewer`.
#![cfg(feature = "viewer")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

fn read_png(p: &Path) -> (usize, usize, Vec<[u8; 4]>) {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgba, "screenshot is RGBA");
    let px = buf[..info.buffer_size()]
        .chunks_exact(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect();
    (info.width as usize, info.height as usize, px)
}

#[test]
fn viewer_compare_screenshot_under_xvfb() {
    if !on_path("Xvfb") || !on_path("xvfb-run") {
        common::skip(
            "xvfb",
            "viewer_compare_screenshot_under_xvfb",
            "Xvfb is not installed (apt-get install xvfb, or run scripts/viewer-test.sh)",
        );
        return;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("viewer");
    std::fs::create_dir_all(&dir).unwrap();
    let shot = dir.join("screenshot.png");
    let summary = dir.join("summary.json");
    let _ = std::fs::remove_file(&shot);
    let _ = std::fs::remove_file(&summary);
    let script = serde_json::json!({
        "docs": [
            {"name": "eiffel.txt", "text": "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was designed by Gustave Eiffel's company and completed in 1889 for the World's Fair. It is 330 metres tall."},
            {"name": "rhine.txt", "text": "The Rhine is a river that flows from the Swiss Alps through Germany and the Netherlands to the North Sea. It is about 1,230 kilometres long."}
        ],
        "question": "When was the Eiffel Tower completed?",
        "mode": "compare",
        "max_tokens": 16,
        "screenshot": shot,
        "summary": summary,
        "timeout_s": 840,
    });
    let script_path = dir.join("script.json");
    std::fs::write(&script_path, script.to_string()).unwrap();
    // A private cache store so the "missing -> GPU" states are deterministic.
    let store = dir.join("store");
    let _ = std::fs::remove_dir_all(&store);
    let mut child = Command::new("xvfb-run")
        .args(["-a", "-s", "-screen 0 1400x960x24"])
        .arg(env!("CARGO_BIN_EXE_kvlink"))
        .args(["view", "--store-max-gb", "2", "--store"])
        .arg(&store)
        .env("KVLINK_VIEW_SCRIPT", &script_path)
        .stdin(Stdio::null())
        .spawn()
        .expect("run xvfb-run");
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(900) {
            let _ = child.kill();
            panic!("the viewer did not finish in 900 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "kvlink view exited with {status}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).expect("summary written")).unwrap();
    eprintln!(
        "viewer summary: {}",
        serde_json::to_string_pretty(&v).unwrap()
    );
    assert_eq!(v["errors"], serde_json::json!([]), "errors in the UI");
    assert_eq!(v["ok"], true);
    assert_eq!(v["ttft_bars"], 2, "both TTFT bars (full, kvlink) drawn");
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["mode"], "full");
    assert_eq!(runs[1]["mode"], "kvlink");
    for r in runs {
        assert!(r["ttft_ms"].as_f64().unwrap() > 0.0);
        assert!(r["capture_tokens"].as_u64().unwrap() > 0);
        assert!(!r["answer"].as_str().unwrap().trim().is_empty());
    }
    let (w, h, px) = read_png(&shot);
    assert!(w >= 800 && h >= 500, "screenshot {w}x{h}");
    // Not blank: luminance variance, and many distinct colors (text, plots, heatmap).
    let lum: Vec<f64> = px
        .iter()
        .map(|p| 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64)
        .collect();
    let mean = lum.iter().sum::<f64>() / lum.len() as f64;
    let var = lum.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / lum.len() as f64;
    let mut colors: Vec<u32> = px
        .iter()
        .map(|p| u32::from_le_bytes([p[0] & 0xF0, p[1] & 0xF0, p[2] & 0xF0, 0]))
        .collect();
    colors.sort_unstable();
    colors.dedup();
    eprintln!(
        "viewer screenshot: {} ({w}x{h}, luminance variance {var:.1}, {} colors)",
        shot.display(),
        colors.len()
    );
    assert!(var > 50.0, "screenshot looks blank (variance {var})");
    assert!(
        colors.len() > 20,
        "screenshot has only {} colors",
        colors.len()
    );
}

/// `view` takes `--store-max-gb` as `ask` does (no window needed: a bad value is refused
/// before the app starts).
#[test]
fn view_takes_store_max_gb_like_ask() {
    let kvlink = || Command::new(env!("CARGO_BIN_EXE_kvlink"));
    let help = kvlink().args(["view", "--help"]).output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--store-max-gb"), "{help}");
    for bad in ["0", "-1", "nan"] {
        let o = kvlink()
            .args(["view", &format!("--store-max-gb={bad}")])
            .env_remove("DISPLAY")
            .env_remove("WAYLAND_DISPLAY")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "--store-max-gb {bad} accepted");
        assert!(
            err.contains("--store-max-gb must be a positive number of GB"),
            "--store-max-gb {bad}: {err}"
        );
    }
}
