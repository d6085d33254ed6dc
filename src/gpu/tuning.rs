//! Kernel tuning knobs: one typed struct, read once per device (from the environment by
//! default, or given by a library user), instead of environment variables read deep
//! inside the kernels. `kvlink devices --verbose` prints it.

use crate::{Error, Result};

/// Which kernel family runs: the barrier-free "cpu" variants suit CPU adapters
/// (lavapipe), the "gpu" variants real GPUs. `Auto` picks by the adapter's device type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelFamily {
    #[default]
    Auto,
    Gpu,
    Cpu,
}

/// Runtime checks wgpu compiles into the kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShaderChecks {
    /// None (the kernels are our own and tested against the CPU reference).
    #[default]
    None,
    /// Bounds clamps only.
    Bounds,
    /// wgpu's default: bounds clamps, loop-bounding counters, guarded integer division
    /// (on the H100 it cost 40% of prefill and 33% of decode throughput).
    All,
}

/// GPU timestamps per dispatch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    #[default]
    Off,
    /// Time per kernel.
    Kernels,
    /// Time per kernel, grid and first parameter words (shapes).
    Shapes,
}

/// Diagnostics of the tensor-core GEMM (wrong results: for timing its parts only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CoopDiag {
    #[default]
    Off,
    /// Stage only the first K step's tiles (times the tensor-core loop alone).
    Compute,
    /// Skip the products (times the loads alone).
    Load,
}

/// The tensor-core GEMM's workgroup tile (see `ops::coop`): defined here so the knobs
/// can hold one; its kernel-side methods live with the kernel.
/// A workgroup's layout: `sgm` x `sgn` subgroups, each computing `fm` x `fn_` fragments
/// of T x T outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tile {
    pub sgm: u32,
    pub sgn: u32,
    pub fm: u32,
    pub fn_: u32,
    /// B fragments straight from W in device memory instead of staged in workgroup
    /// memory (only where the tile lies inside N and K % BK == 0).
    pub b_direct: bool,
    /// Workgroup tiles of vec4<f16> (vector stores and loads) instead of f16.
    pub vec_tiles: bool,
    /// K fragments per staged step (BK = kf T): 2, or 4 for half the barriers per FLOP.
    pub kf: u32,
}

impl serde::Serialize for Tile {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::fmt::Display for Tile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}x{}", self.sgm, self.sgn, self.fm, self.fn_)?;
        if self.b_direct {
            write!(f, "d")?;
        }
        if self.vec_tiles {
            write!(f, "v")?;
        }
        if self.kf == 4 {
            write!(f, "w")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Tile {
    type Err = String;
    /// "SGM,SGN,FM,FN" (or with x between them), then any of "d" (direct B loads), "v"
    /// (vector tiles), "w" (K steps of 4 fragments).
    fn from_str(s: &str) -> std::result::Result<Tile, String> {
        let s = s.trim();
        let nums = s.trim_end_matches(['d', 'v', 'w']);
        let flags = &s[nums.len()..];
        let (b_direct, vec_tiles) = (flags.contains('d'), flags.contains('v'));
        let kf = if flags.contains('w') { 4 } else { 2 };
        let v: Vec<u32> = nums
            .split([',', 'x'])
            .map(|x| x.trim().parse::<u32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| format!("tile {s:?}: expected four numbers SGM,SGN,FM,FN"))?;
        match v[..] {
            [sgm, sgn, fm, fn_]
                if (1..=16).contains(&(sgm * sgn)) && (1..=16).contains(&(fm * fn_)) =>
            {
                Ok(Tile {
                    sgm,
                    sgn,
                    fm,
                    fn_,
                    b_direct,
                    vec_tiles,
                    kf,
                })
            }
            _ => Err(format!(
                "tile {s:?}: expected SGM,SGN,FM,FN with 1..=16 subgroups and 1..=16 fragments each"
            )),
        }
    }
}

impl Tile {
    // Defaults from `kvlink bench kernels` on the H200 (Llama-3.2-1B shapes): 2 x 2
    // subgroups of 4 x 4 fragments with vector tiles led at 512 and 2048 rows (100-133
    // TFLOP/s on gate_up and down); for 32 rows, 1 x 8 of 2 x 1 with vector tiles and
    // 4-fragment K steps.
    pub const WIDE: Tile = Tile {
        sgm: 2,
        sgn: 2,
        fm: 4,
        fn_: 4,
        b_direct: false,
        vec_tiles: true,
        kf: 2,
    };
    pub const SKINNY: Tile = Tile {
        sgm: 1,
        sgn: 8,
        fm: 2,
        fn_: 1,
        b_direct: false,
        vec_tiles: true,
        kf: 4,
    };
}

/// Every knob, with the environment variable that sets it (see [`Tuning::from_env`]).
/// The defaults are what the engine is tested and benchmarked with.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Tuning {
    /// `KVLINK_KERNELS=auto|gpu|cpu`.
    pub kernels: KernelFamily,
    /// Tensor-core (cooperative matrix) kernels where the adapter has them
    /// (`KVLINK_COOPMAT=off` turns them off).
    pub coopmat: bool,
    /// Subgroup operations where the adapter has them (`KVLINK_SUBGROUPS=off`).
    pub subgroups: bool,
    /// `KVLINK_SHADER_CHECKS=none|bounds|all`.
    pub shader_checks: ShaderChecks,
    /// Zero-initialise workgroup memory as WGSL requires (`KVLINK_ZERO_WG=0` skips it).
    pub zero_workgroup_memory: bool,
    /// `KVLINK_PROFILE=0|1|2` (1: per kernel, 2: per kernel and shape).
    pub profile: Profile,
    /// The skinny GEMM for a few rows (`KVLINK_SKINNY=off` sends them to the tiled GEMM).
    pub skinny_gemm: bool,
    /// Force the vec4 GEMV variant: 1, 2 or 4 rows per thread (`KVLINK_GEMV_ROWS`).
    pub gemv_rows: Option<usize>,
    /// Products of 2..=N rows (a batch decode step, a short question) on the subgroup
    /// GEMV that reads each weight once for all rows, instead of a GEMM; 0 (the default
    /// until it is timed against the tensor-core GEMM) keeps the GEMMs
    /// (`KVLINK_GEMV_BATCH=N`, 0..=64).
    pub gemv_batch: usize,
    /// Most key splits of the decode attention, 1..=64 (`KVLINK_DECODE_SPLITS`).
    pub decode_splits: usize,
    /// Tensor-core flash attention where usable (`KVLINK_COOP_FLASH=off`).
    pub coop_flash: bool,
    /// Most split-K chunks of the tensor-core GEMM, 1..=32 (`KVLINK_COOP_SPLITS`): fewer
    /// means longer K loops and a smaller reduction.
    pub coop_splits: usize,
    /// Its layout (subgroups, key-tile fragments), each 1..=8, instead of the per-head-size
    /// default (`KVLINK_FLASH_LAYOUT=NSG,BCF`).
    pub flash_layout: Option<(u32, u32)>,
    /// Force its key splits, 1..=256 (`KVLINK_FLASH_SPLITS`).
    pub flash_splits: Option<usize>,
    /// Stage its K/V tiles as vec4<f16> (the default) or scalar f16
    /// (`KVLINK_FLASH_VARIANT=b`, diagnostics on a new driver).
    pub flash_vec_tiles: bool,
    /// The tensor-core GEMM tile for many rows (`KVLINK_COOP_WIDE=SGM,SGN,FM,FN`).
    pub coop_wide: Tile,
    /// The tensor-core GEMM tile for a few rows (`KVLINK_COOP_SKINNY=SGM,SGN,FM,FN`).
    pub coop_skinny: Tile,
    /// `KVLINK_COOP_DIAG=compute|load` (diagnostics: wrong results).
    pub coop_diag: CoopDiag,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            kernels: KernelFamily::Auto,
            coopmat: true,
            subgroups: true,
            shader_checks: ShaderChecks::None,
            zero_workgroup_memory: true,
            profile: Profile::Off,
            skinny_gemm: true,
            gemv_rows: None,
            gemv_batch: 0,
            decode_splits: 64,
            coop_flash: true,
            coop_splits: 32,
            flash_layout: None,
            flash_splits: None,
            flash_vec_tiles: true,
            coop_wide: Tile::WIDE,
            coop_skinny: Tile::SKINNY,
            coop_diag: CoopDiag::Off,
        }
    }
}

/// The environment variables [`Tuning::from_env`] reads.
pub const ENV_VARS: [&str; 18] = [
    "KVLINK_KERNELS",
    "KVLINK_COOPMAT",
    "KVLINK_SUBGROUPS",
    "KVLINK_SHADER_CHECKS",
    "KVLINK_ZERO_WG",
    "KVLINK_PROFILE",
    "KVLINK_SKINNY",
    "KVLINK_GEMV_ROWS",
    "KVLINK_GEMV_BATCH",
    "KVLINK_DECODE_SPLITS",
    "KVLINK_COOP_FLASH",
    "KVLINK_COOP_SPLITS",
    "KVLINK_FLASH_LAYOUT",
    "KVLINK_FLASH_SPLITS",
    "KVLINK_FLASH_VARIANT",
    "KVLINK_COOP_WIDE",
    "KVLINK_COOP_SKINNY",
    "KVLINK_COOP_DIAG",
];

impl Tuning {
    /// The defaults with every `KVLINK_*` variable of [`ENV_VARS`] that is set applied;
    /// a value that does not parse is an error naming the variable and what it takes.
    pub fn from_env() -> Result<Tuning> {
        Tuning::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Tuning::from_env`] over any lookup (tests use a map).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Tuning> {
        let mut t = Tuning::default();
        for var in ENV_VARS {
            let Some(raw) = get(var) else { continue };
            let v = raw.trim();
            let bad = |takes: &str| Error::Input(format!("{var}={raw:?}: expected {takes}"));
            let off_on = |v: &str| match v {
                "off" | "0" => Ok(false),
                "on" | "1" => Ok(true),
                _ => Err(bad("on or off")),
            };
            match var {
                "KVLINK_KERNELS" => {
                    t.kernels = match v {
                        "auto" | "" => KernelFamily::Auto,
                        "gpu" => KernelFamily::Gpu,
                        "cpu" => KernelFamily::Cpu,
                        _ => return Err(bad("auto, gpu or cpu")),
                    }
                }
                "KVLINK_COOPMAT" => t.coopmat = off_on(v)?,
                "KVLINK_SUBGROUPS" => t.subgroups = off_on(v)?,
                "KVLINK_SHADER_CHECKS" => {
                    t.shader_checks = match v {
                        "none" | "" => ShaderChecks::None,
                        "bounds" => ShaderChecks::Bounds,
                        "all" => ShaderChecks::All,
                        _ => return Err(bad("none, bounds or all")),
                    }
                }
                "KVLINK_ZERO_WG" => t.zero_workgroup_memory = off_on(v)?,
                "KVLINK_PROFILE" => {
                    t.profile = match v {
                        "0" | "" | "off" => Profile::Off,
                        "1" | "on" => Profile::Kernels,
                        "2" => Profile::Shapes,
                        _ => return Err(bad("0, 1 (per kernel) or 2 (per kernel and shape)")),
                    }
                }
                "KVLINK_SKINNY" => t.skinny_gemm = off_on(v)?,
                "KVLINK_GEMV_ROWS" => {
                    t.gemv_rows = match v.parse() {
                        Ok(r @ (1 | 2 | 4)) => Some(r),
                        _ => return Err(bad("1, 2 or 4")),
                    }
                }
                "KVLINK_GEMV_BATCH" => {
                    t.gemv_batch = match v.parse() {
                        Ok(n @ 0..=64) => n,
                        _ => return Err(bad("the most rows from 0 (off) to 64")),
                    }
                }
                "KVLINK_DECODE_SPLITS" => {
                    t.decode_splits = match v.parse() {
                        Ok(n @ 1..=64) => n,
                        _ => return Err(bad("a number of splits from 1 to 64")),
                    }
                }
                "KVLINK_COOP_FLASH" => t.coop_flash = off_on(v)?,
                "KVLINK_COOP_SPLITS" => {
                    t.coop_splits = match v.parse() {
                        Ok(n @ 1..=32) => n,
                        _ => return Err(bad("a number of splits from 1 to 32")),
                    }
                }
                "KVLINK_FLASH_LAYOUT" => {
                    let p: Vec<Option<u32>> = v.split(',').map(|x| x.trim().parse().ok()).collect();
                    t.flash_layout = match p[..] {
                        [Some(nsg @ 1..=8), Some(bcf @ 1..=8)] => Some((nsg, bcf)),
                        _ => return Err(bad("NSG,BCF, each from 1 to 8")),
                    }
                }
                "KVLINK_FLASH_SPLITS" => {
                    t.flash_splits = match v.parse() {
                        Ok(n @ 1..=256) => Some(n),
                        _ => return Err(bad("a number of splits from 1 to 256")),
                    }
                }
                "KVLINK_FLASH_VARIANT" => {
                    t.flash_vec_tiles = match v {
                        "a" | "" => true,
                        "b" => false,
                        _ => return Err(bad("a (vec4 tiles) or b (scalar tiles)")),
                    }
                }
                "KVLINK_COOP_WIDE" => {
                    t.coop_wide = v
                        .parse()
                        .map_err(|e| bad(&format!("SGM,SGN,FM,FN ({e})")))?
                }
                "KVLINK_COOP_SKINNY" => {
                    t.coop_skinny = v
                        .parse()
                        .map_err(|e| bad(&format!("SGM,SGN,FM,FN ({e})")))?
                }
                "KVLINK_COOP_DIAG" => {
                    t.coop_diag = match v {
                        "" | "off" => CoopDiag::Off,
                        "compute" => CoopDiag::Compute,
                        "load" => CoopDiag::Load,
                        _ => return Err(bad("compute or load")),
                    }
                }
                _ => unreachable!("every name of ENV_VARS is handled"),
            }
        }
        Ok(t)
    }

    /// The knobs that differ from the defaults, as `name=value` (empty: all defaults).
    pub fn changed(&self) -> Vec<String> {
        let d = serde_json::to_value(Tuning::default()).unwrap_or_default();
        let s = serde_json::to_value(self).unwrap_or_default();
        let (Some(d), Some(s)) = (d.as_object(), s.as_object()) else {
            return Vec::new();
        };
        s.iter()
            .filter(|(k, v)| d.get(*k) != Some(v))
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<Tuning> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Tuning::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_and_every_variable() {
        assert_eq!(parse(&[]).unwrap(), Tuning::default());
        assert!(Tuning::default().changed().is_empty());
        let t = parse(&[
            ("KVLINK_KERNELS", "cpu"),
            ("KVLINK_COOPMAT", "off"),
            ("KVLINK_SUBGROUPS", "off"),
            ("KVLINK_SHADER_CHECKS", "bounds"),
            ("KVLINK_ZERO_WG", "0"),
            ("KVLINK_PROFILE", "2"),
            ("KVLINK_SKINNY", "off"),
            ("KVLINK_GEMV_ROWS", "4"),
            ("KVLINK_GEMV_BATCH", "16"),
            ("KVLINK_DECODE_SPLITS", "8"),
            ("KVLINK_COOP_FLASH", "off"),
            ("KVLINK_COOP_SPLITS", "4"),
            ("KVLINK_FLASH_LAYOUT", "2, 3"),
            ("KVLINK_FLASH_SPLITS", "16"),
            ("KVLINK_FLASH_VARIANT", "b"),
            ("KVLINK_COOP_WIDE", "2,2,2,2d"),
            ("KVLINK_COOP_SKINNY", "1x2x2x1"),
            ("KVLINK_COOP_DIAG", "load"),
        ])
        .unwrap();
        assert_eq!(t.kernels, KernelFamily::Cpu);
        assert!(!t.coopmat && !t.subgroups && !t.zero_workgroup_memory && !t.skinny_gemm);
        assert_eq!(t.shader_checks, ShaderChecks::Bounds);
        assert_eq!(t.profile, Profile::Shapes);
        assert_eq!(
            (t.gemv_rows, t.gemv_batch, t.decode_splits),
            (Some(4), 16, 8)
        );
        assert!(!t.coop_flash && !t.flash_vec_tiles);
        assert_eq!(t.coop_splits, 4);
        assert_eq!((t.flash_layout, t.flash_splits), (Some((2, 3)), Some(16)));
        assert_eq!(t.coop_wide, "2,2,2,2d".parse().unwrap());
        assert_eq!(t.coop_skinny, "1,2,2,1".parse().unwrap());
        assert_eq!(t.coop_diag, CoopDiag::Load);
        // every knob was moved off its default, and `changed` names each once
        assert_eq!(t.changed().len(), ENV_VARS.len());
        let c = parse(&[("KVLINK_KERNELS", "gpu")]).unwrap().changed();
        assert_eq!(c, vec!["kernels=\"gpu\"".to_string()]);
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (k, v) in [
            ("KVLINK_KERNELS", "fast"),
            ("KVLINK_COOPMAT", "no"),
            ("KVLINK_GEMV_ROWS", "3"),
            ("KVLINK_GEMV_BATCH", "65"),
            ("KVLINK_DECODE_SPLITS", "0"),
            ("KVLINK_DECODE_SPLITS", "65"),
            ("KVLINK_FLASH_LAYOUT", "9,1"),
            ("KVLINK_FLASH_LAYOUT", "2"),
            ("KVLINK_FLASH_SPLITS", "257"),
            ("KVLINK_COOP_SPLITS", "0"),
            ("KVLINK_COOP_SPLITS", "33"),
            ("KVLINK_FLASH_VARIANT", "c"),
            ("KVLINK_COOP_WIDE", "1,2,3"),
            ("KVLINK_PROFILE", "3"),
            ("KVLINK_SHADER_CHECKS", "some"),
            ("KVLINK_COOP_DIAG", "x"),
        ] {
            let e = parse(&[(k, v)]).unwrap_err().to_string();
            assert!(e.contains(k) && e.contains("expected"), "{k}={v}: {e}");
        }
    }
}
