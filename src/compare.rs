//! `pipeline compare A B`: what moved between two runs — per candidate, the held-out quality and
//! its change with a paired bootstrap interval over the samples both judged; per failure mode,
//! its size on each side. A run is a pipeline file's last run, or one iteration of it
//! (`select.toml@2`).

use std::collections::{BTreeMap, BTreeSet};

use artifacts::{Artifact, Clusters, JudgedModel, Judgement, Split, main_figure};
use engine::{RunReport, Store};
use serde::Serialize;

use crate::found::artifact;

/// One side: the judgement and the failure modes of the chosen iteration.
pub struct Side {
    pub name: String,
    pub judgement: Judgement,
    pub clusters: Option<Clusters>,
}

impl Side {
    /// The run of `pipeline` recorded in `store`, at `iteration` (1-based; the last by default).
    pub fn load(label: &str, pipeline: &engine::Pipeline, store: &Store, iteration: Option<u32>) -> Result<Side, String> {
        let report: RunReport = store.get_run(&pipeline.name).ok_or_else(|| format!("`{label}` has not been run yet"))?;
        let it = match iteration {
            Some(k) => report.iterations.iter().find(|it| it.iteration + 1 == k).ok_or_else(|| format!("`{label}`: its last run has {} iteration(s)", report.iterations.len()))?,
            None => report.iterations.last().ok_or_else(|| format!("`{label}`: its last run has no iteration"))?,
        };
        let (_, judgement) = artifact(it, store).ok_or_else(|| format!("`{label}` has no judged answers to compare (no judgement in its run)"))?;
        Ok(Side { name: label.to_string(), judgement, clusters: artifact(it, store).map(|(_, c)| c) })
    }

    /// The run a lockfile pins: its last iteration's judgement (of `pipeline`'s first judging
    /// stage), read from `store` by the digest the lockfile names.
    pub fn from_lock(label: &str, lock: &engine::lockfile::Lockfile, pipeline: &engine::Pipeline, store: &Store) -> Result<Side, String> {
        let judging: Vec<&str> = pipeline.stages.iter().filter(|s| s.output_ty == Judgement::TYPE).map(|s| s.id.as_str()).collect();
        let locked = judging
            .iter()
            .find_map(|id| lock.stages.iter().filter(|s| s.id == *id).max_by_key(|s| s.iteration))
            .ok_or_else(|| format!("`{label}` pins no judgement of a stage of `{}` ({})", pipeline.name, if judging.is_empty() { "it has no judging stage".to_string() } else { judging.join(", ") }))?;
        // A judgement with volatile keys (an LLM judge's timing) is pinned by its stable digest.
        let value = store.find_by_stable(&locked.output).and_then(|full| store.get_object(&full)).ok_or_else(|| {
            format!(
                "`{label}` pins stage `{}` (iteration {}) to {}, which is not in the store {}: run the baseline with this store first (check out its commit and `pipeline run --locked`), or name its run instead (a pipeline file, or FILE@N)",
                locked.id,
                locked.iteration + 1,
                locked.output.short(),
                store.root().display()
            )
        })?;
        let judgement = Judgement::read(&value).map_err(|e| format!("`{label}`: stage `{}`'s output is not a judgement: {e}", locked.id))?;
        Ok(Side { name: label.to_string(), judgement, clusters: None })
    }
}

/// What moved between two runs (what `--json` prints and the text rendering reads).
#[derive(Serialize)]
pub struct Comparison {
    a: String,
    b: String,
    candidates: Vec<CandidateChange>,
    failure_modes: Vec<ModeChange>,
}

#[derive(Serialize)]
struct CandidateChange {
    model: String,
    a: Option<Quality>,
    b: Option<Quality>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pass_rate_change: Option<PassRateChange>,
}

/// A side's main quality figure, on its reported split.
#[derive(Serialize)]
struct Quality {
    /// `accuracy (heldout)`.
    metric: String,
    value: f64,
    ci95: [Option<f64>; 2],
}

/// Held-out passes after minus before, over the samples both sides judged.
#[derive(Serialize)]
struct PassRateChange {
    paired_samples: usize,
    value: f64,
    ci95: Option<[f64; 2]>,
    fixed: usize,
    broken: usize,
}

#[derive(Serialize)]
struct ModeChange {
    model: String,
    id: String,
    name: String,
    a: usize,
    b: usize,
    change: i64,
}

/// The comparison of two sides; intervals are resampled with `seed`.
pub fn compare(a: &Side, b: &Side, seed: u64) -> Comparison {
    let models: BTreeSet<&String> = a.judgement.models.keys().chain(b.judgement.models.keys()).collect();
    let mut candidates = Vec::new();
    for model in models {
        let (ja, jb) = (a.judgement.models.get(model), b.judgement.models.get(model));
        let quality = |j: Option<&JudgedModel>| -> Option<Quality> {
            let (split, figures) = j?.quality();
            let (name, value, _) = main_figure(|k| figures.get(k).copied())?;
            let ci95 = [figures.get(format!("{name}_ci_low").as_str()).copied(), figures.get(format!("{name}_ci_high").as_str()).copied()];
            Some(Quality { metric: format!("{name} ({split})"), value, ci95 })
        };
        fn heldout(j: Option<&JudgedModel>) -> BTreeMap<&str, bool> {
            j.map_or(BTreeMap::new(), |j| j.verdicts_in(Split::Heldout).filter_map(|v| Some((v.id.as_str(), v.pass?))).collect())
        }
        let (ha, hb) = (heldout(ja), heldout(jb));
        let pairs: Vec<(bool, bool)> = ha.iter().filter_map(|(id, before)| Some((*before, *hb.get(id)?))).collect();
        let pass_rate_change = (!pairs.is_empty()).then(|| {
            let d = judge::paired_difference(&pairs, 1000, seed);
            PassRateChange {
                paired_samples: pairs.len(),
                value: d.value,
                ci95: d.ci95,
                fixed: pairs.iter().filter(|(x, y)| !x && *y).count(),
                broken: pairs.iter().filter(|(x, y)| *x && !y).count(),
            }
        });
        candidates.push(CandidateChange { model: model.clone(), a: quality(ja), b: quality(jb), pass_rate_change });
    }
    let sizes = |s: &Side| -> BTreeMap<(String, String), (usize, String)> {
        let mut out = BTreeMap::new();
        for (model, m) in s.clusters.iter().flat_map(|c| &c.models) {
            for c in &m.clusters {
                out.insert((model.clone(), c.id.clone()), (c.size, c.name.clone()));
            }
        }
        out
    };
    let (sa, sb) = (sizes(a), sizes(b));
    let keys: BTreeSet<&(String, String)> = sa.keys().chain(sb.keys()).collect();
    let mut failure_modes: Vec<ModeChange> = keys
        .into_iter()
        .map(|k| {
            let (na, nb) = (sa.get(k).map_or(0, |x| x.0), sb.get(k).map_or(0, |x| x.0));
            let name = sb.get(k).or(sa.get(k)).map(|x| x.1.clone()).unwrap_or_default();
            ModeChange { model: k.0.clone(), id: k.1.clone(), name, a: na, b: nb, change: nb as i64 - na as i64 }
        })
        .collect();
    failure_modes.sort_by_key(|c| std::cmp::Reverse(c.change.abs()));
    Comparison { a: a.name.clone(), b: b.name.clone(), candidates, failure_modes }
}

/// The comparison for people.
pub fn render(c: &Comparison) -> String {
    let mut s = format!("compare {} → {}\n\ncandidates (held-out):\n", c.a, c.b);
    let side = |q: &Option<Quality>| -> String {
        let Some(q) = q else { return "–".into() };
        format!("{} {:.3} [{}, {}]", q.metric, q.value, fmt(q.ci95[0]), fmt(q.ci95[1]))
    };
    for m in &c.candidates {
        s.push_str(&format!("  {}: {} → {}", m.model, side(&m.a), side(&m.b)));
        if let Some(d) = &m.pass_rate_change {
            let [low, high] = d.ci95.unwrap_or([0.0, 0.0]);
            s.push_str(&format!(
                "; change {:+.3} (paired 95% CI {low:+.3} to {high:+.3}; {} fixed, {} broken of {})",
                d.value, d.fixed, d.broken, d.paired_samples
            ));
        }
        s.push('\n');
    }
    if !c.failure_modes.is_empty() {
        s.push_str("\nfailure modes (dev split, size a → b):\n");
        for m in &c.failure_modes {
            s.push_str(&format!("  {:>4} → {:<4} {:+}  {} `{}` ({})\n", m.a, m.b, m.change, m.model, m.id, m.name));
        }
    }
    s
}

/// The CI gate: did any candidate's held-out quality drop significantly from `baseline` to
/// `current`? Per candidate judged on both sides, over the held-out samples both judged: the
/// exact one-sided McNemar test of the broken passes against the fixed ones (the same test
/// `revise` accepts a prompt by), a regression when its p-value is below `alpha`. A raw drop that
/// chance explains is not one.
#[derive(Serialize)]
pub struct Check {
    pub baseline: String,
    pub current: String,
    pub alpha: f64,
    pub candidates: Vec<CandidateCheck>,
    pub regressed: bool,
}

#[derive(Serialize)]
pub struct CandidateCheck {
    pub model: String,
    /// Its main held-out figure on each side.
    pub baseline: Option<f64>,
    pub current: Option<f64>,
    pub paired_samples: usize,
    pub fixed: usize,
    pub broken: usize,
    /// The pass-rate change with its paired bootstrap 95% interval.
    pub change: Option<f64>,
    pub change_ci95: Option<[f64; 2]>,
    /// P(at least `broken` of the discordant pairs go against the current run by chance).
    pub p_value: Option<f64>,
    /// `regressed`, `not significant`, `improved or unchanged`, or why it was not compared.
    pub verdict: String,
}

pub fn check(baseline: &Side, current: &Side, alpha: f64, seed: u64) -> Check {
    let c = compare(baseline, current, seed);
    let candidates: Vec<CandidateCheck> = c
        .candidates
        .into_iter()
        .map(|m| {
            let (fixed, broken, n) = m.pass_rate_change.as_ref().map_or((0, 0, 0), |d| (d.fixed, d.broken, d.paired_samples));
            let p_value = (n > 0).then(|| judge::mcnemar_p(broken, fixed));
            let verdict = match (&m.a, &m.b, p_value) {
                (None, _, _) => "new: not in the baseline".to_string(),
                (_, None, _) => "not judged in this run".to_string(),
                (_, _, None) => "no held-out sample judged on both sides".to_string(),
                (_, _, Some(_)) if broken <= fixed => "improved or unchanged".to_string(),
                (_, _, Some(p)) if p < alpha => "regressed".to_string(),
                (_, _, Some(_)) => "not significant".to_string(),
            };
            CandidateCheck {
                model: m.model,
                baseline: m.a.as_ref().map(|q| q.value),
                current: m.b.as_ref().map(|q| q.value),
                paired_samples: n,
                fixed,
                broken,
                change: m.pass_rate_change.as_ref().map(|d| d.value),
                change_ci95: m.pass_rate_change.as_ref().and_then(|d| d.ci95),
                p_value,
                verdict,
            }
        })
        .collect();
    let regressed = candidates.iter().any(|c| c.verdict == "regressed");
    Check { baseline: c.a, current: c.b, alpha, candidates, regressed }
}

/// The gate's verdict for people.
pub fn render_check(c: &Check) -> String {
    let mut s = format!("check {} against {} (held-out, paired; a regression is McNemar p < {}):
", c.current, c.baseline, c.alpha);
    for m in &c.candidates {
        let figures = format!("{} → {}", fmt(m.baseline), fmt(m.current));
        let detail = match (m.change, m.p_value) {
            (Some(d), Some(p)) => {
                let [low, high] = m.change_ci95.unwrap_or([d, d]);
                format!("; change {d:+.3} (95% CI {low:+.3} to {high:+.3}), {} fixed, {} broken of {}, p = {}", m.fixed, m.broken, m.paired_samples, p_text(p))
            }
            _ => String::new(),
        };
        s.push_str(&format!("  {}: {figures}{detail}: {}\n", m.model, m.verdict));
    }
    s.push_str(if c.regressed { "quality regressed\n" } else { "no significant regression\n" });
    s
}

fn p_text(p: f64) -> String {
    if p < 0.001 { "< 0.001".to_string() } else { format!("{p:.3}") }
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{x:.3}"))
}
