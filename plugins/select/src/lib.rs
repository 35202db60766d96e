//! `select`: the decision. Every candidate's held-out quality (from `judge`) and measured speed
//! (from `infer`) are checked against the stage's targets; the selected model is the smallest
//! that meets all of them — fewest active parameters, then fewest total, then the better
//! accuracy. If none meets them, nothing is selected and the closest candidate is named (the one
//! missing its targets by the least, relative to each target). Every other candidate says why it
//! lost.
//!
//! `prompt` is the prompt in force: the `prompt` stage's output, or in a revision loop `revise`'s,
//! whose `accepted` figures (the version in force, when the one just judged was rejected) replace
//! the judgement's.
//!
//! Quality figures are results (reproducible under greedy decoding); latency and throughput are
//! measurements under `timing`, which the lockfile leaves out. A target on a measurement makes the
//! decision itself depend on the machine, and `--locked` will say so if it changes.

use std::collections::BTreeMap;
use std::sync::Arc;

use catalog::Catalog;
use engine::diag::{Diagnostic, SourceFile};
use engine::{BuildContext, Bound, FileRef, Item, Port, Stage, StageError, StageInput, StagePlugin};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use toml::Spanned;

mod prices;

pub struct Select;

/// Metrics a target may name: quality from `judge` (held-out), speed from `infer`.
const QUALITY: [&str; 12] = [
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "macro_f1",
    "ndcg",
    "ndcg_ci_low",
    "ndcg_ci_high",
    "pass_rate",
    "pass_rate_ci_low",
    "pass_rate_ci_high",
    "unparsed_rate",
    "unscored_rate",
];
/// Cohen's κ from which a judge counts as agreeing with people ("substantial", Landis & Koch).
const TRUSTED_KAPPA: f64 = 0.6;

const SPEED: [&str; 4] = ["latency_p50_ms", "latency_p95_ms", "tokens_per_s", "usd_per_mtok"];

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SelectConfig {
    /// The catalog the candidates come from (for their size and license).
    #[schemars(with = "String")]
    pub catalog: Spanned<String>,
    /// What a candidate must achieve, by metric: `accuracy = { min = 0.8 }`,
    /// `latency_p95_ms = { max = 2000 }`. Quality metrics: accuracy, accuracy_ci_low,
    /// accuracy_ci_high, macro_f1, ndcg, ndcg_ci_low, ndcg_ci_high, pass_rate, pass_rate_ci_low,
    /// pass_rate_ci_high (an `llm_judge`), unparsed_rate, unscored_rate (held-out); speed: latency_p50_ms,
    /// latency_p95_ms, tokens_per_s, usd_per_mtok (needs `prices` or `usd_per_hour`).
    #[schemars(with = "BTreeMap<String, Bound>")]
    pub targets: Spanned<BTreeMap<String, Bound>>,
    /// What an hour of the machine that served the candidates costs, in US dollars (a cloud
    /// instance's price, say). With it, each candidate's measured cost per million tokens
    /// processed (prompt and completion, as served one request at a time) is reported as
    /// `usd_per_mtok`, and may be a target.
    pub usd_per_hour: Option<f64>,
    /// A price table (TOML): `[machines.NAME]` with `hardware`, `gpu` and `usd_per_hour`, and
    /// `[serving]` mapping model ids (or `default`) to machines. Each candidate's cost per million
    /// tokens uses its own machine's price. Instead of `usd_per_hour`.
    pub prices: Option<FileRef>,
}

impl StagePlugin for Select {
    type Config = SelectConfig;
    const KIND: &'static str = "select";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "the decision: the smallest candidate meeting every target, and why each other one lost";
    const INPUTS: &'static [Port] =
        &[Port::new("judgement", "judgement"), Port::new("answers", "answers"), Port::new("prompt", "prompt"), Port::optional("candidates", "candidates")];
    const OUTPUT: &'static str = "decision";

    fn build(config: SelectConfig, cx: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        let (catalog, _) = Catalog::load_for_stage(&config.catalog, cx)?;
        let mut errors = Vec::new();
        if config.targets.get_ref().is_empty() {
            errors.push(cx.error_at(Some(config.targets.span()), "`targets` is empty: say what good enough means", "no targets"));
        }
        for (name, bound) in config.targets.get_ref() {
            if !QUALITY.contains(&name.as_str()) && !SPEED.contains(&name.as_str()) {
                errors.push(
                    cx.error_at(Some(config.targets.span()), format!("unknown target metric `{name}`"), "in these targets")
                        .help(match engine::diag::did_you_mean(name, QUALITY.iter().chain(&SPEED).copied()) {
                            Some(s) => format!("did you mean `{s}`?"),
                            None => format!("valid metrics: {}", QUALITY.iter().chain(&SPEED).map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", ")),
                        }),
                );
            }
            if bound.min.is_none() && bound.max.is_none() {
                errors.push(cx.error_at(Some(config.targets.span()), format!("target `{name}` has neither `min` nor `max`"), "in these targets"));
            }
        }
        if let Some(price) = config.usd_per_hour
            && !(price.is_finite() && price > 0.0)
        {
            errors.push(cx.error_at(cx.key("usd_per_hour"), format!("`usd_per_hour` must be a positive price, not {price}"), ""));
        }
        if config.usd_per_hour.is_none() && config.prices.is_none() && config.targets.get_ref().contains_key("usd_per_mtok") {
            errors.push(
                cx.error_at(Some(config.targets.span()), "a `usd_per_mtok` target needs `prices` or `usd_per_hour`", "in these targets")
                    .help("set `prices` to a price table, or `usd_per_hour` to what an hour of the serving machine costs"),
            );
        }
        let mut prices = None;
        if let Some(file) = &config.prices {
            if config.usd_per_hour.is_some() {
                errors.push(cx.error_at(file.span.clone(), "set `prices` or `usd_per_hour`, not both", "a price table").help("`usd_per_hour` is one price for every candidate's machine; the table has one per machine"));
            }
            match cx.file(file) {
                Err(d) => errors.push(d),
                Ok(path) => match std::fs::read_to_string(&path) {
                    Err(e) => errors.push(cx.error_at(file.span.clone(), format!("cannot read `{}`: {e}", file.path), "here")),
                    Ok(text) => match prices::Prices::parse(&SourceFile::new(cx.display_path(file), text), cx.stage_id) {
                        Ok(p) => prices = Some(p),
                        Err(e) => errors.extend(e),
                    },
                },
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Arc::new(SelectStage { catalog, targets: config.targets.into_inner(), usd_per_hour: config.usd_per_hour, prices }))
    }
}

struct SelectStage {
    catalog: Catalog,
    targets: BTreeMap<String, Bound>,
    usd_per_hour: Option<f64>,
    /// Parsed when built (the file is digested into the fingerprint).
    prices: Option<prices::Prices>,
}

#[async_trait::async_trait]
impl Stage for SelectStage {
    fn metrics(&self) -> Option<&'static [&'static str]> {
        Some(&["targets_met", "accuracy"])
    }

    fn volatile_keys(&self) -> &'static [&'static str] {
        &["timing"]
    }

    fn finish(&self, input: &StageInput, _: Vec<(Item, Value)>) -> Result<Value, StageError> {
        let judgement = input.input("judgement")?;
        let answers = input.input("answers")?;
        let judged = judgement["models"].as_object().ok_or_else(|| StageError::new("the judgement has no `models`"))?;
        let prompt = input.input("prompt")?;
        let accepted = &prompt["accepted"];
        let version = accepted["version"].as_u64().or_else(|| prompt["revision"]["version"].as_u64()).unwrap_or(1);
        let mut rows = Vec::new();
        for (id, j) in judged {
            let model = self.catalog.get(id).ok_or_else(|| StageError::new(format!("model `{id}` was judged but is not in the select stage's catalog")))?;
            let (split, mut values) = judge::quality(j);
            // In a revision loop, the prompt version in force may be an earlier one than the
            // version just judged (a rejected revision): decide on its figures.
            if let Some(figures) = accepted["models"][id].as_object() {
                values = QUALITY.iter().filter_map(|k| Some((*k, figures.get(*k)?.as_f64()?))).collect();
            }
            let timing = &answers["models"][id]["timing"];
            let completion: f64 = answers["models"][id]["answers"].as_array().map_or(0.0, |a| a.iter().filter_map(|x| x["completion_tokens"].as_f64()).sum());
            let latency_s: f64 = answers["models"][id]["answers"].as_array().map_or(0.0, |a| a.iter().filter_map(|x| x["timing"]["latency_ms"].as_f64()).sum::<f64>() / 1000.0);
            let prompt_tokens: f64 = answers["models"][id]["answers"].as_array().map_or(0.0, |a| a.iter().filter_map(|x| x["prompt_tokens"].as_f64()).sum());
            let processed = prompt_tokens + completion;
            let machine = self.prices.as_ref().and_then(|p| p.machine(id));
            let usd_per_hour = machine.map(|(_, m)| m.usd_per_hour).or(self.usd_per_hour);
            let speed = [
                ("latency_p50_ms", timing["latency_p50_ms"].as_f64()),
                ("latency_p95_ms", timing["latency_p95_ms"].as_f64()),
                ("tokens_per_s", (latency_s > 0.0).then(|| completion / latency_s)),
                ("usd_per_mtok", usd_per_hour.filter(|_| processed > 0.0 && latency_s > 0.0).map(|p| p * latency_s / 3600.0 / processed * 1e6)),
            ];
            for (name, v) in speed {
                if let Some(v) = v {
                    values.insert(name, v);
                }
            }
            // How far each target is missed, relative to the target (0 when met).
            let mut misses = Vec::new();
            let mut shortfall = 0.0;
            for (name, bound) in &self.targets {
                match values.get(name.as_str()) {
                    None => {
                        misses.push(format!("{name} not measured"));
                        shortfall += 1.0;
                    }
                    Some(&v) if !bound.admits(v) => {
                        misses.push(format!("{name} {} (target {bound})", short(v)));
                        let edge = bound.min.filter(|m| v < *m).or(bound.max).unwrap_or(v);
                        shortfall += (v - edge).abs() / edge.abs().max(1e-9);
                    }
                    Some(_) => {}
                }
            }
            let serving = machine.map(|(name, m)| json!({"machine": name, "hardware": m.hardware, "gpu": m.gpu, "usd_per_hour": m.usd_per_hour}));
            rows.push(Row { id: id.clone(), split, active: model.params_active_b, total: model.params_total_b, values, misses, shortfall, license: model.license.clone(), serving });
        }
        if rows.is_empty() {
            return Err(StageError::new("no candidates were judged"));
        }
        // Smallest first: the order of the report, independent of how maps iterate.
        rows.sort_by(|a, b| a.active.total_cmp(&b.active).then(a.total.total_cmp(&b.total)).then(a.id.cmp(&b.id)));
        let mut meeting: Vec<&Row> = rows.iter().filter(|r| r.misses.is_empty()).collect();
        meeting.sort_by(|a, b| {
            a.active.total_cmp(&b.active).then(a.total.total_cmp(&b.total)).then(b.quality().total_cmp(&a.quality())).then(a.id.cmp(&b.id))
        });
        let selected = meeting.first().map(|r| r.id.clone());
        let closest = if selected.is_none() {
            rows.iter().min_by(|a, b| a.shortfall.total_cmp(&b.shortfall).then(a.active.total_cmp(&b.active)).then(a.id.cmp(&b.id))).map(|r| r.id.clone())
        } else {
            None
        };
        let targets: BTreeMap<&str, String> = self.targets.iter().map(|(k, b)| (k.as_str(), b.to_string())).collect();
        // Models the policy kept out never ran; they lost before any target.
        let excluded: Vec<Value> = input.inputs.get("candidates").and_then(|c| c["excluded"].as_array().cloned()).unwrap_or_default();
        let mut candidates: Vec<Value> = rows
            .iter()
            .map(|r| {
                let verdict = if Some(&r.id) == selected.as_ref() {
                    format!("selected: the smallest of {} candidate(s) meeting every target", meeting.len())
                } else if !r.misses.is_empty() {
                    format!("misses {}", r.misses.join(", "))
                } else {
                    let winner = meeting[0];
                    format!("meets every target but is larger than `{}` ({}B active vs {}B)", winner.id, r.active, winner.active)
                };
                let quality: BTreeMap<&str, f64> = r.values.iter().filter(|(k, _)| QUALITY.contains(k)).map(|(k, v)| (*k, *v)).collect();
                let timing: BTreeMap<&str, f64> = r.values.iter().filter(|(k, _)| SPEED.contains(k)).map(|(k, v)| (*k, *v)).collect();
                let mut row = json!({
                    "model": r.id,
                    "params_active_b": r.active,
                    "params_total_b": r.total,
                    "license": r.license,
                    "split": r.split,
                    "quality": quality,
                    "timing": timing,
                    "meets_targets": r.misses.is_empty(),
                    "verdict": verdict,
                });
                if let Some(serving) = &r.serving {
                    row["serving"] = serving.clone();
                }
                row
            })
            .collect();
        candidates.extend(excluded.iter().map(|m| {
            json!({
                "model": m["id"],
                "params_active_b": m["params_active_b"],
                "params_total_b": m["params_total_b"],
                "license": m["license"],
                "meets_targets": false,
                "verdict": format!("excluded by policy: {}", m["reasons"].as_array().map_or(String::new(), |r| r.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("; "))),
            })
        }));
        let summary = match (&selected, &closest) {
            (Some(m), _) => format!("selected `{m}` with prompt version {version}: the smallest candidate meeting every target ({})", targets_text(&targets)),
            (None, Some(c)) => {
                let row = rows.iter().find(|r| &r.id == c).expect("closest is a row");
                format!("no candidate meets every target ({}); closest: `{c}` with prompt version {version}, which misses {}", targets_text(&targets), row.misses.join(", "))
            }
            (None, None) => unreachable!("rows is not empty"),
        };
        // Quality from an LLM judge is only as good as the judge: say when people disagree with it.
        let summary = match (judgement["task"].as_str(), judgement["agreement"]["kappa"].as_f64()) {
            (Some("rubric"), Some(k)) if k < TRUSTED_KAPPA => {
                format!("{summary}; caution: the judge agrees with people at only κ {k:.2} ({} labeled answers)", judgement["agreement"]["n"])
            }
            (Some("rubric"), None) => format!("{summary}; caution: the judge is not checked against human labels"),
            _ => summary,
        };
        let best = rows.iter().find(|r| Some(&r.id) == selected.as_ref().or(closest.as_ref())).expect("a selected or closest row");
        let mut decision = json!({
            "targets": targets,
            "prompt_version": version,
            "selected": selected,
            "closest": closest,
            "summary": summary,
            "candidates": candidates,
            "metrics": {
                "targets_met": if selected.is_some() { 1.0 } else { 0.0 },
                "accuracy": best.values.get("accuracy"),
            },
        });
        if judgement["agreement"].is_object() {
            decision["judge_agreement"] = judgement["agreement"].clone();
        }
        Ok(decision)
    }
}

struct Row {
    id: String,
    /// Its machine in the price table, when there is one.
    serving: Option<Value>,
    split: &'static str,
    active: f64,
    total: f64,
    values: BTreeMap<&'static str, f64>,
    misses: Vec<String>,
    shortfall: f64,
    license: String,
}

impl Row {
    /// The task's main quality figure: accuracy, nDCG or rubric pass rate.
    fn quality(&self) -> f64 {
        judge::MAIN_METRICS.iter().find_map(|k| self.values.get(k).copied()).unwrap_or(0.0)
    }
}

fn short(v: f64) -> String {
    if v.fract() == 0.0 || v.abs() >= 100.0 { format!("{v:.0}") } else { format!("{v:.3}") }
}

fn targets_text(targets: &BTreeMap<&str, String>) -> String {
    targets.iter().map(|(k, b)| format!("{k} {b}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(targets: &str) -> SelectStage {
        let catalog = Catalog::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../catalogs/open-models.toml")).unwrap();
        SelectStage { catalog, targets: toml::from_str(targets).unwrap(), usd_per_hour: None, prices: None }
    }

    /// Candidates with held-out accuracy, unparsed count (of 100) and p95 latency.
    fn input(candidates: &[(&str, f64, u32, f64)]) -> StageInput {
        let judged: serde_json::Map<String, Value> = candidates
            .iter()
            .map(|(id, acc, unparsed, _)| {
                let split = json!({"n": 100, "unparsed": unparsed, "accuracy": {"value": acc, "ci95": [acc - 0.05, acc + 0.05]}, "macro_f1": {"value": acc}});
                (id.to_string(), json!({"splits": {"heldout": split}}))
            })
            .collect();
        let answers: serde_json::Map<String, Value> =
            candidates.iter().map(|(id, _, _, p95)| (id.to_string(), json!({"answers": [], "timing": {"latency_p50_ms": p95 / 2.0, "latency_p95_ms": p95}}))).collect();
        StageInput {
            inputs: [
                ("judgement".to_string(), Arc::new(json!({"models": judged}))),
                ("answers".to_string(), Arc::new(json!({"models": answers}))),
                ("prompt".to_string(), Arc::new(json!({"template": "{{ text }}"}))),
            ]
            .into(),
            files: Default::default(),
            seed: 0,
            cancel: Default::default(),
        }
    }

    fn verdicts(out: &Value) -> Vec<(String, String)> {
        out["candidates"].as_array().unwrap().iter().map(|c| (c["model"].as_str().unwrap().to_string(), c["verdict"].as_str().unwrap().to_string())).collect()
    }

    #[test]
    fn the_smallest_candidate_meeting_every_target_wins() {
        let s = stage("accuracy = { min = 0.8 }\nlatency_p95_ms = { max = 1000 }");
        let out = s
            .finish(
                &input(&[
                    ("smollm2-135m-instruct", 0.62, 3, 300.0),
                    ("smollm2-360m-instruct", 0.83, 1, 500.0),
                    ("qwen3-4b", 0.91, 0, 900.0),
                    ("qwen3-30b-a3b", 0.95, 0, 1500.0),
                ]),
                vec![],
            )
            .unwrap();
        assert_eq!(out["selected"], "smollm2-360m-instruct");
        assert_eq!(out["metrics"]["targets_met"], 1.0);
        assert_eq!(
            verdicts(&out),
            [
                ("smollm2-135m-instruct".into(), "misses accuracy 0.620 (target ≥ 0.8)".into()),
                ("smollm2-360m-instruct".into(), "selected: the smallest of 2 candidate(s) meeting every target".into()),
                ("qwen3-30b-a3b".into(), "misses latency_p95_ms 1500 (target ≤ 1000)".into()),
                ("qwen3-4b".into(), "meets every target but is larger than `smollm2-360m-instruct` (4B active vs 0.36B)".into()),
            ]
        );
    }

    #[test]
    fn with_no_candidate_meeting_the_targets_the_closest_is_named() {
        let s = stage("accuracy = { min = 0.9 }\nunparsed_rate = { max = 0.05 }");
        let out = s.finish(&input(&[("smollm2-135m-instruct", 0.30, 50, 300.0), ("smollm2-360m-instruct", 0.85, 2, 500.0)]), vec![]).unwrap();
        assert_eq!(out["selected"], Value::Null);
        assert_eq!(out["closest"], "smollm2-360m-instruct");
        assert_eq!(out["metrics"]["targets_met"], 0.0);
        assert_eq!(out["metrics"]["accuracy"], 0.85);
        assert!(out["summary"].as_str().unwrap().starts_with("no candidate meets every target (accuracy ≥ 0.9, unparsed_rate ≤ 0.05); closest: `smollm2-360m-instruct` with prompt version 1"), "{}", out["summary"]);
    }

    #[test]
    fn in_a_loop_the_prompt_version_in_force_is_judged_not_a_rejected_revision() {
        let s = stage("accuracy = { min = 0.8 }");
        let mut input = input(&[("smollm2-135m-instruct", 0.5, 0, 300.0)]);
        let accepted = json!({"version": 2, "models": {"smollm2-135m-instruct": {"accuracy": 0.85, "unparsed_rate": 0.0}}});
        input.inputs.insert("prompt".into(), Arc::new(json!({"template": "t", "revision": {"version": 3}, "accepted": accepted})));
        let out = s.finish(&input, vec![]).unwrap();
        assert_eq!(out["selected"], "smollm2-135m-instruct");
        assert_eq!(out["prompt_version"], 2);
        assert_eq!(out["candidates"][0]["quality"]["accuracy"], 0.85);
    }

    #[test]
    fn cost_per_million_tokens_follows_the_hourly_price_and_the_measured_time() {
        let mut s = stage("usd_per_mtok = { max = 0.5 }");
        s.usd_per_hour = Some(0.36);
        let mut input = input(&[("smollm2-135m-instruct", 0.9, 0, 300.0)]);
        // 100 requests, 200 prompt + 10 completion tokens each, 0.5 s each: 21,000 tokens in 50 s.
        let answers: Vec<Value> = (0..100).map(|_| json!({"prompt_tokens": 200, "completion_tokens": 10, "timing": {"latency_ms": 500.0}})).collect();
        input.inputs.insert("answers".into(), Arc::new(json!({"models": {"smollm2-135m-instruct": {"answers": answers, "timing": {}}}})));
        let out = s.finish(&input, vec![]).unwrap();
        // $0.36/h × 50 s = $0.005 for 21,000 tokens → $0.238095 per million.
        let cost = out["candidates"][0]["timing"]["usd_per_mtok"].as_f64().unwrap();
        assert!((cost - 0.238095).abs() < 1e-6, "{cost}");
        assert_eq!(out["selected"], "smollm2-135m-instruct");
    }

    #[test]
    fn each_candidate_is_priced_on_its_own_machine() {
        let mut s = stage("usd_per_mtok = { max = 0.5 }");
        let table = "[machines.cpu]\nhardware = \"2 vCPU\"\nusd_per_hour = 0.36\n\n[machines.h100]\nhardware = \"1× H100\"\ngpu = \"H100\"\nusd_per_hour = 3.6\n\n[serving]\ndefault = \"cpu\"\n\"smollm2-360m-instruct\" = \"h100\"\n";
        s.prices = Some(prices::Prices::parse(&SourceFile::new("prices.toml", table), "decision").unwrap());
        let mut input = input(&[("smollm2-135m-instruct", 0.9, 0, 300.0), ("smollm2-360m-instruct", 0.9, 0, 300.0)]);
        let answers: Vec<Value> = (0..100).map(|_| json!({"prompt_tokens": 200, "completion_tokens": 10, "timing": {"latency_ms": 500.0}})).collect();
        let entry = json!({"answers": answers, "timing": {}});
        input.inputs.insert("answers".into(), Arc::new(json!({"models": {"smollm2-135m-instruct": entry.clone(), "smollm2-360m-instruct": entry}})));
        let out = s.finish(&input, vec![]).unwrap();
        let row = |id: &str| out["candidates"].as_array().unwrap().iter().find(|c| c["model"] == id).unwrap().clone();
        // The same measured time on a machine ten times the price: ten times the cost.
        assert!((row("smollm2-135m-instruct")["timing"]["usd_per_mtok"].as_f64().unwrap() - 0.238095).abs() < 1e-6);
        assert!((row("smollm2-360m-instruct")["timing"]["usd_per_mtok"].as_f64().unwrap() - 2.380952).abs() < 1e-6);
        assert_eq!(row("smollm2-360m-instruct")["serving"]["gpu"], "H100");
        assert!(row("smollm2-360m-instruct")["verdict"].as_str().unwrap().starts_with("misses usd_per_mtok 2.381"), "{}", row("smollm2-360m-instruct")["verdict"]);
        assert_eq!(out["selected"], "smollm2-135m-instruct");
    }
}
