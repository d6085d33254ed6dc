//! Compare evaluation records (`kvlink eval compare`): EM per mode, what reuse costs
//! (full - kvlink, paired over questions), and paired differences between models run on
//! the same questions, each with its standard error, so the claims in EVAL.md come from a
//! command rather than from hand computation.

use super::{parse_records, QaRecord};
use crate::error::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Modes in the order tables show them; others follow in name order.
const ORDER: [&str; 4] = ["full", "kvlink", "naive", "masked"];

/// The mean of per-question values and its standard error (sample standard deviation
/// over the square root of the count; 0 for a single question).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct MeanSe {
    pub n: usize,
    pub mean: f64,
    pub se: f64,
}

impl MeanSe {
    pub fn of(values: &[f64]) -> Option<MeanSe> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let se = if n > 1 {
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            (var / n as f64).sqrt()
        } else {
            0.0
        };
        Some(MeanSe { n, mean, se })
    }
}

impl std::fmt::Display for MeanSe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:+.3} ± {:.3}", self.mean, self.se)
    }
}

/// One records file: score per (question id, mode).
pub struct Records {
    pub name: String,
    scores: HashMap<String, BTreeMap<String, f64>>,
    agree: HashMap<String, f64>,
}

impl Records {
    /// Read a records file (`kvlink eval --out`) without changing it: a truncated last
    /// line (an interrupted run) is left out; any other line that is not a record is an
    /// error naming it.
    pub fn load(path: &Path, name: Option<&str>) -> Result<Records> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let (records, _) = parse_records(path, &text)?;
        if records.is_empty() {
            return Err(Error::Input(format!(
                "{}: no eval records in it",
                path.display()
            )));
        }
        let name = name.map(str::to_string).unwrap_or_else(|| {
            path.file_stem().map_or_else(
                || path.display().to_string(),
                |s| s.to_string_lossy().into(),
            )
        });
        Ok(Records::from_records(name, records.values()))
    }

    pub fn from_records<'a>(name: String, recs: impl IntoIterator<Item = &'a QaRecord>) -> Records {
        let mut scores: HashMap<String, BTreeMap<String, f64>> = HashMap::new();
        let mut agree = HashMap::new();
        for r in recs {
            scores
                .entry(r.id.clone())
                .or_default()
                .insert(r.mode.clone(), r.score);
            if r.mode == "kvlink" {
                if let Some(a) = r.first_token_agree {
                    agree.insert(r.id.clone(), if a { 1.0 } else { 0.0 });
                }
            }
        }
        Records {
            name,
            scores,
            agree,
        }
    }

    /// The modes present, in table order.
    pub fn modes(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .scores
            .values()
            .flat_map(|m| m.keys().cloned())
            .collect();
        sort_modes(&mut all);
        all
    }

    /// EM of `mode` over the questions that have it.
    pub fn em(&self, mode: &str) -> Option<MeanSe> {
        let v: Vec<f64> = self
            .scores
            .values()
            .filter_map(|m| m.get(mode).copied())
            .collect();
        MeanSe::of(&v)
    }

    /// Per question that has both: score of `a` minus score of `b`.
    pub fn cost(&self, a: &str, b: &str) -> Option<MeanSe> {
        let v: Vec<f64> = self
            .scores
            .values()
            .filter_map(|m| Some(m.get(a)? - m.get(b)?))
            .collect();
        MeanSe::of(&v)
    }

    /// Share of questions whose kvlink first token equals full's.
    pub fn first_token_agreement(&self) -> Option<f64> {
        MeanSe::of(&self.agree.values().copied().collect::<Vec<_>>()).map(|m| m.mean)
    }

    /// Per question in both files: this file's `mode` minus `base`'s `base_mode`.
    pub fn minus(&self, mode: &str, base: &Records, base_mode: &str) -> Option<MeanSe> {
        let v: Vec<f64> = self
            .scores
            .iter()
            .filter_map(|(id, m)| Some(m.get(mode)? - base.scores.get(id)?.get(base_mode)?))
            .collect();
        MeanSe::of(&v)
    }
}

/// Modes in table order ([`ORDER`], then by name), each once.
fn sort_modes(modes: &mut Vec<String>) {
    modes.sort_by_key(|m| {
        (
            ORDER.iter().position(|o| o == m).unwrap_or(ORDER.len()),
            m.clone(),
        )
    });
    modes.dedup();
}

/// A markdown table's header: "records", then `cols` (right-aligned).
fn table_head(cols: &[String]) -> String {
    let head: String = cols.iter().map(|c| format!(" {c} |")).collect();
    format!("| records |{head}\n|---|{}\n", "---:|".repeat(cols.len()))
}

/// The comparison of `files` (the first is the reference of the paired table) as
/// markdown tables and as JSON.
pub fn compare(files: &[Records]) -> (String, serde_json::Value) {
    let mut modes: Vec<String> = files.iter().flat_map(|f| f.modes()).collect();
    sort_modes(&mut modes);
    let has = |m: &str| modes.iter().any(|x| x == m);
    let reuse = has("full") && has("kvlink");
    let mut cols = vec!["questions".to_string()];
    cols.extend(modes.iter().map(|m| format!("{m} EM")));
    if reuse {
        cols.extend(["reuse cost (full - kvlink)", "1st-token agreement"].map(String::from));
    }
    let mut md = table_head(&cols);
    let mut json_files = Vec::new();
    for f in files {
        let mut row = format!("| {} | {} |", f.name, f.scores.len());
        let mut em = serde_json::Map::new();
        for m in &modes {
            let e = f.em(m);
            row += &match e {
                Some(e) => format!(" {:.3} |", e.mean),
                None => " - |".into(),
            };
            em.insert(m.clone(), serde_json::json!(e));
        }
        let cost = f.cost("full", "kvlink");
        let agree = f.first_token_agreement();
        if reuse {
            row += &format!(
                " {} | {} |",
                cost.map_or("-".into(), |c| format!("{:.3} ± {:.3}", c.mean, c.se)),
                agree.map_or("-".into(), |a| format!("{a:.3}"))
            );
        }
        md += &format!("{row}\n");
        json_files.push(serde_json::json!({
            "name": f.name,
            "questions": f.scores.len(),
            "em": em,
            "reuse_cost": cost,
            "first_token_agreement": agree,
        }));
    }
    let mut paired = Vec::new();
    if let Some((base, rest)) = files.split_first().filter(|(_, r)| !r.is_empty()) {
        md += &format!(
            "\nPaired over the questions in both, each minus {} (mean ± standard error):\n\n",
            base.name
        );
        let mut cols = modes.clone();
        if reuse {
            cols.push(format!("kvlink - {}'s full", base.name));
        }
        md += &table_head(&cols);
        for f in rest {
            let mut row = format!("| {} |", f.name);
            let mut by = serde_json::Map::new();
            for m in &modes {
                let d = f.minus(m, base, m);
                row += &format!(" {} |", d.map_or("-".into(), |d| d.to_string()));
                by.insert(m.clone(), serde_json::json!(d));
            }
            let vs_full = f.minus("kvlink", base, "full");
            if reuse {
                row += &format!(" {} |", vs_full.map_or("-".into(), |d| d.to_string()));
            }
            md += &format!("{row}\n");
            paired.push(serde_json::json!({
                "name": f.name,
                "minus": base.name,
                "same_mode": by,
                "kvlink_minus_base_full": vs_full,
            }));
        }
    }
    let json = serde_json::json!({ "files": json_files, "paired": paired });
    (md, json)
}

#[cfg(test)]
mod tests {
    use super::MeanSe;

    #[test]
    fn mean_and_standard_error() {
        // 1,0,1,1: mean 3/4; squared deviations 3 x 1/16 + 9/16 = 3/4; sample variance
        // 3/4 / 3 = 1/4; standard error sqrt(1/4 / 4) = 1/4
        let m = MeanSe::of(&[1.0, 0.0, 1.0, 1.0]).unwrap();
        assert_eq!((m.n, m.mean, m.se), (4, 0.75, 0.25));
        assert_eq!(m.to_string(), "+0.750 ± 0.250");
        assert_eq!(
            MeanSe::of(&[-0.5]).map(|m| (m.mean, m.se)),
            Some((-0.5, 0.0))
        );
        assert!(MeanSe::of(&[]).is_none());
    }
}
