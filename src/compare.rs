//! `pipeline compare A B`: what moved between two runs — per candidate, the held-out quality and
//! its change with a paired bootstrap interval over the samples both judged; per failure mode,
//! its size on each side. A run is a pipeline file's last run, or one iteration of it
//! (`select.toml@2`).

use std::collections::{BTreeMap, BTreeSet};

use engine::{RunReport, Store};
use serde_json::{Value, json};

/// One side: the judgement and the failure modes of the chosen iteration.
pub struct Side {
    pub name: String,
    pub judgement: Value,
    pub clusters: Option<Value>,
}

impl Side {
    /// The run of `pipeline` recorded in `store`, at `iteration` (1-based; the last by default).
    pub fn load(label: &str, pipeline: &engine::Pipeline, store: &Store, iteration: Option<u32>) -> Result<Side, String> {
        let report: RunReport = store.get_run(&pipeline.name).ok_or_else(|| format!("`{label}` has not been run yet"))?;
        let it = match iteration {
            Some(k) => report.iterations.iter().find(|it| it.iteration + 1 == k).ok_or_else(|| format!("`{label}`: its last run has {} iteration(s)", report.iterations.len()))?,
            None => report.iterations.last().ok_or_else(|| format!("`{label}`: its last run has no iteration"))?,
        };
        let of_kind = |kinds: &[&str]| it.stages.iter().filter(|s| kinds.contains(&s.kind.as_str())).find_map(|s| store.get_object(&s.output?));
        let judgement = of_kind(&["judge", "llm_judge"]).ok_or_else(|| format!("`{label}` has no judged answers to compare (no `judge` or `llm_judge` output)"))?;
        Ok(Side { name: label.to_string(), judgement, clusters: of_kind(&["cluster"]) })
    }
}

/// The comparison, as JSON (what `--json` prints and the text rendering reads).
pub fn compare(a: &Side, b: &Side, seed: u64) -> Value {
    let models = |s: &Side| -> BTreeSet<String> { s.judgement["models"].as_object().map_or(BTreeSet::new(), |m| m.keys().cloned().collect()) };
    let mut candidates = Vec::new();
    for model in models(a).union(&models(b)) {
        let (ja, jb) = (&a.judgement["models"][model], &b.judgement["models"][model]);
        let quality = |j: &Value| -> Option<(String, f64, Value)> {
            let (split, figures) = judge::quality(j);
            let name = judge::MAIN_METRICS.into_iter().find(|k| figures.contains_key(k))?;
            let ci = json!([figures.get(format!("{name}_ci_low").as_str()), figures.get(format!("{name}_ci_high").as_str())]);
            Some((format!("{name} ({split})"), figures[name], ci))
        };
        let heldout = |j: &Value| -> BTreeMap<String, bool> {
            j["verdicts"]
                .as_array()
                .map_or(BTreeMap::new(), |v| v.iter().filter(|v| v["split"] == "heldout").filter_map(|v| Some((v["id"].as_str()?.to_string(), v["pass"].as_bool()?))).collect())
        };
        let (ha, hb) = (heldout(ja), heldout(jb));
        let pairs: Vec<(bool, bool)> = ha.iter().filter_map(|(id, before)| Some((*before, *hb.get(id)?))).collect();
        let mut entry = json!({"model": model, "a": quality(ja).map(|q| json!({"metric": q.0, "value": q.1, "ci95": q.2})), "b": quality(jb).map(|q| json!({"metric": q.0, "value": q.1, "ci95": q.2}))});
        if !pairs.is_empty() {
            let d = judge::paired_difference(&pairs, 1000, seed);
            entry["pass_rate_change"] = json!({
                "paired_samples": pairs.len(),
                "value": d["value"],
                "ci95": d["ci95"],
                "fixed": pairs.iter().filter(|(x, y)| !x && *y).count(),
                "broken": pairs.iter().filter(|(x, y)| *x && !y).count(),
            });
        }
        candidates.push(entry);
    }
    let sizes = |s: &Side| -> BTreeMap<(String, String), (u64, String)> {
        let mut out = BTreeMap::new();
        for (model, m) in s.clusters.as_ref().and_then(|c| c["models"].as_object()).into_iter().flatten() {
            for c in m["clusters"].as_array().map_or(&[][..], Vec::as_slice) {
                out.insert((model.clone(), c["id"].as_str().unwrap_or_default().to_string()), (c["size"].as_u64().unwrap_or(0), c["name"].as_str().unwrap_or_default().to_string()));
            }
        }
        out
    };
    let (sa, sb) = (sizes(a), sizes(b));
    let keys: BTreeSet<&(String, String)> = sa.keys().chain(sb.keys()).collect();
    let mut clusters: Vec<Value> = keys
        .into_iter()
        .map(|k| {
            let (na, nb) = (sa.get(k).map_or(0, |x| x.0), sb.get(k).map_or(0, |x| x.0));
            let name = sb.get(k).or(sa.get(k)).map(|x| x.1.clone()).unwrap_or_default();
            json!({"model": k.0, "id": k.1, "name": name, "a": na, "b": nb, "change": nb as i64 - na as i64})
        })
        .collect();
    clusters.sort_by_key(|c| std::cmp::Reverse(c["change"].as_i64().unwrap_or(0).abs()));
    json!({"a": a.name, "b": b.name, "candidates": candidates, "failure_modes": clusters})
}

/// The comparison for people.
pub fn render(c: &Value) -> String {
    let mut s = format!("compare {} → {}\n\ncandidates (held-out):\n", c["a"].as_str().unwrap_or_default(), c["b"].as_str().unwrap_or_default());
    let side = |v: &Value| -> String {
        if v.is_null() {
            return "–".into();
        }
        let ci = &v["ci95"];
        format!("{} {:.3} [{}, {}]", v["metric"].as_str().unwrap_or_default(), v["value"].as_f64().unwrap_or(0.0), fmt(&ci[0]), fmt(&ci[1]))
    };
    for m in c["candidates"].as_array().map_or(&[][..], Vec::as_slice) {
        s.push_str(&format!("  {}: {} → {}", m["model"].as_str().unwrap_or_default(), side(&m["a"]), side(&m["b"])));
        let d = &m["pass_rate_change"];
        if d.is_object() {
            s.push_str(&format!(
                "; change {:+.3} (paired 95% CI {:+.3} to {:+.3}; {} fixed, {} broken of {})",
                d["value"].as_f64().unwrap_or(0.0),
                d["ci95"][0].as_f64().unwrap_or(0.0),
                d["ci95"][1].as_f64().unwrap_or(0.0),
                d["fixed"],
                d["broken"],
                d["paired_samples"]
            ));
        }
        s.push('\n');
    }
    let modes = c["failure_modes"].as_array().map_or(&[][..], Vec::as_slice);
    if !modes.is_empty() {
        s.push_str("\nfailure modes (dev split, size a → b):\n");
        for m in modes {
            s.push_str(&format!("  {:>4} → {:<4} {:+}  {} `{}` ({})\n", m["a"], m["b"], m["change"].as_i64().unwrap_or(0), m["model"].as_str().unwrap_or_default(), m["id"].as_str().unwrap_or_default(), m["name"].as_str().unwrap_or_default()));
        }
    }
    s
}

fn fmt(v: &Value) -> String {
    v.as_f64().map_or("–".into(), |x| format!("{x:.3}"))
}
