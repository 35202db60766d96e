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

use artifacts::{Answers, Artifact, Candidates, Capacity, Decision, DecisionMetrics, DecisionRow, FineTuned, Judgement, MAIN_METRICS, Prompt, QUALITY_METRICS, Serving, Split, Task, VsBase};
use catalog::Catalog;
use engine::diag::{Diagnostic, SourceFile};
use engine::{BuildContext, Bound, FileRef, Item, Port, Stage, StageError, StageInput, StagePlugin};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use toml::Spanned;

mod prices;

pub struct Select;

/// Metrics a target may name: quality from the judgement (held-out, [`QUALITY_METRICS`]), speed
/// from `infer`.
/// Cohen's κ from which a judge counts as agreeing with people ("substantial", Landis & Koch).
const TRUSTED_KAPPA: f64 = 0.6;

const SPEED: [&str; 7] = ["latency_p50_ms", "latency_p95_ms", "tokens_per_s", "usd_per_mtok", "max_rps", "goodput_rps", "usd_per_mtok_at_max_rps"];

/// Speed metrics a `capacity` stage measures.
const LOAD: [&str; 3] = ["max_rps", "goodput_rps", "usd_per_mtok_at_max_rps"];

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
    /// latency_p95_ms, tokens_per_s, usd_per_mtok (needs `prices` or `usd_per_hour`); load (needs a
    /// `capacity` stage in `needs`): max_rps, goodput_rps, usd_per_mtok_at_max_rps (the cost per
    /// million tokens at that load; needs `prices` or `usd_per_hour`).
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
        &[
            Port::new("judgement", Judgement::TYPE),
            Port::new("answers", Answers::TYPE),
            Port::new("prompt", Prompt::TYPE),
            Port::optional("candidates", Candidates::TYPE),
            Port::optional("finetuned", FineTuned::TYPE),
            Port::optional("capacity", Capacity::TYPE),
        ];
    const OUTPUT: &'static str = Decision::TYPE;

    fn build(config: SelectConfig, cx: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        let (catalog, _) = Catalog::load_for_stage(&config.catalog, cx)?;
        let mut errors = Vec::new();
        if config.targets.get_ref().is_empty() {
            errors.push(cx.error_at(Some(config.targets.span()), "`targets` is empty: say what good enough means", "no targets"));
        }
        for (name, bound) in config.targets.get_ref() {
            if !QUALITY_METRICS.contains(&name.as_str()) && !SPEED.contains(&name.as_str()) {
                errors.push(
                    cx.error_at(Some(config.targets.span()), format!("unknown target metric `{name}`"), "in these targets")
                        .suggest(name, &QUALITY_METRICS.iter().chain(&SPEED).copied().collect::<Vec<_>>(), "valid metrics:"),
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
        for cost in ["usd_per_mtok", "usd_per_mtok_at_max_rps"] {
            if config.usd_per_hour.is_none() && config.prices.is_none() && config.targets.get_ref().contains_key(cost) {
                errors.push(
                    cx.error_at(Some(config.targets.span()), format!("a `{cost}` target needs `prices` or `usd_per_hour`"), "in these targets")
                        .help("set `prices` to a price table, or `usd_per_hour` to what an hour of the serving machine costs"),
                );
            }
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
        let id = cx.stage_id.to_string();
        let targets_at = config.targets.span();
        Ok(Arc::new(SelectStage { id, catalog, targets: config.targets.into_inner(), targets_at, usd_per_hour: config.usd_per_hour, prices }))
    }
}

/// What the decision needs to know of a model besides its figures.
struct Facts {
    active: f64,
    total: f64,
    license: String,
    /// Fine-tuned from this catalog model.
    base: Option<String>,
}

struct SelectStage {
    id: String,
    catalog: Catalog,
    targets: BTreeMap<String, Bound>,
    /// Where `targets` is, in the pipeline file.
    targets_at: std::ops::Range<usize>,
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

    fn check_inputs(&self, pipeline: &SourceFile, facts: &BTreeMap<String, Value>) -> Vec<Diagnostic> {
        if facts.contains_key("capacity") {
            return Vec::new();
        }
        self.targets
            .keys()
            .filter(|k| LOAD.contains(&k.as_str()))
            .map(|k| {
                Diagnostic::error(format!("stage `{}`: target `{k}` is measured by a `capacity` stage, and none is in `needs`", self.id))
                    .at(pipeline, self.targets_at.clone(), "in these targets")
                    .help("add a `capacity` stage (the highest request rate each candidate sustains within a latency SLO) and name it in `needs`")
            })
            .collect()
    }

    fn finish(&self, input: &StageInput, _: Vec<(Item, Value)>) -> Result<Value, StageError> {
        let judgement: Judgement = input.read("judgement")?;
        let answers: Answers = input.read("answers")?;
        let prompt: Prompt = input.read("prompt")?;
        let version = prompt.version_in_force();
        let tuned: Option<FineTuned> = input.read_optional("finetuned")?;
        let capacity: Option<Capacity> = input.read_optional("capacity")?;
        let mut rows = Vec::new();
        for (id, j) in &judgement.models {
            // A catalog model, or one a `finetune` stage trained (the base's size and license).
            let model = match (self.catalog.get(id), tuned.iter().flat_map(|t| &t.models).find(|m| &m.id == id)) {
                (Some(m), _) => Facts { active: m.params_active_b, total: m.params_total_b, license: m.license.clone(), base: None },
                (None, Some(m)) => Facts { active: m.params_active_b, total: m.params_total_b, license: m.license.clone(), base: Some(m.base.clone()) },
                (None, None) => {
                    return Err(StageError::new(format!("model `{id}` was judged but is not in the select stage's catalog (nor a `finetune` stage in `needs`)")));
                }
            };
            let (split, mut values) = j.quality();
            // In a revision loop, the prompt version in force may be an earlier one than the
            // version just judged (a rejected revision): decide on its figures.
            let mut earlier = false;
            if let Some(figures) = prompt.accepted.as_ref().and_then(|a| a.models.get(id)) {
                let accepted: BTreeMap<&str, f64> = QUALITY_METRICS.iter().filter_map(|k| Some((*k, *figures.get(*k)?))).collect();
                earlier = accepted.iter().any(|(k, v)| values.get(k) != Some(v));
                values = accepted;
            }
            let answered = answers.models.get(id);
            let timing = answered.map(|a| &a.timing);
            let processed = answered.map_or(0, |a| a.prompt_tokens() + a.completion_tokens()) as f64;
            let busy_s = timing.and_then(|t| t.busy_s).unwrap_or(0.0);
            let machine = self.prices.as_ref().and_then(|p| p.machine(id));
            let usd_per_hour = machine.map(|(_, m)| m.usd_per_hour).or(self.usd_per_hour);
            let speed = [
                ("latency_p50_ms", timing.map(|t| t.latency_p50_ms)),
                ("latency_p95_ms", timing.map(|t| t.latency_p95_ms)),
                ("tokens_per_s", timing.and_then(|t| t.tokens_per_s)),
                ("usd_per_mtok", usd_per_hour.filter(|_| processed > 0.0 && busy_s > 0.0).map(|p| p * busy_s / 3600.0 / processed * 1e6)),
            ];
            // Under load: the highest rate sustained within the SLO, and what a token costs there.
            let load = capacity.as_ref().and_then(|c| c.models.get(id)).map(|m| &m.timing);
            let at_max_rps = load.filter(|l| l.max_rps > 0.0).and_then(|l| Some(usd_per_hour? / (l.tokens_per_s.filter(|t| *t > 0.0)? * 3600.0) * 1e6));
            let speed = speed.into_iter().chain([("max_rps", load.map(|l| l.max_rps)), ("goodput_rps", load.map(|l| l.goodput_rps)), ("usd_per_mtok_at_max_rps", at_max_rps)]);
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
            let serving = machine.map(|(name, m)| Serving { machine: name.to_string(), hardware: m.hardware.clone(), gpu: m.gpu.clone(), usd_per_hour: m.usd_per_hour });
            rows.push(Row { id: id.clone(), split, active: model.active, total: model.total, values, misses, shortfall, license: model.license, base: model.base, earlier, serving });
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
        let targets: BTreeMap<String, String> = self.targets.iter().map(|(k, b)| (k.clone(), b.to_string())).collect();
        // A fine-tuned candidate against its base, when both were judged on the version in force
        // (not when an earlier version's figures stand in for a rejected revision's).
        let earlier = |id: &str| rows.iter().any(|r| r.id == id && r.earlier);
        let vs_base = |r: &Row| -> Option<VsBase> {
            let base = r.base.as_ref()?;
            if earlier(&r.id) || earlier(base) {
                return None;
            }
            let passes = |id: &str| -> Option<BTreeMap<&str, bool>> {
                Some(judgement.models.get(id)?.verdicts_in(Split::Heldout).filter_map(|v| Some((v.id.as_str(), v.pass?))).collect())
            };
            let (before, after) = (passes(base)?, passes(&r.id)?);
            let pairs: Vec<(bool, bool)> = after.iter().filter_map(|(id, a)| Some((*before.get(id)?, *a))).collect();
            let fixed = pairs.iter().filter(|(b, a)| !b && *a).count();
            let broken = pairs.iter().filter(|(b, a)| *b && !a).count();
            Some(VsBase {
                base: base.clone(),
                samples: pairs.len(),
                fixed,
                broken,
                change: judge::paired_difference(&pairs, 1000, input.seed),
                p_value: judge::mcnemar_p(fixed, broken),
            })
        };
        let mut candidates: Vec<DecisionRow> = rows
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
                let vs_base = vs_base(r);
                let verdict = match &vs_base {
                    Some(v) => format!(
                        "{verdict}; against its base `{}` on {} held-out samples: {:+.3} (paired 95% CI {}), {} fixed, {} broken, McNemar p {}",
                        v.base,
                        v.samples,
                        v.change.value,
                        v.change.ci95.map_or("n/a".into(), |[lo, hi]| format!("{lo:+.3} to {hi:+.3}")),
                        v.fixed,
                        v.broken,
                        if v.p_value < 0.001 { "< 0.001".to_string() } else { format!("= {:.3}", v.p_value) }
                    ),
                    None => verdict,
                };
                let of = |names: &[&str]| -> BTreeMap<String, f64> { r.values.iter().filter(|(k, _)| names.contains(k)).map(|(k, v)| (k.to_string(), *v)).collect() };
                DecisionRow {
                    model: r.id.clone(),
                    params_active_b: r.active,
                    params_total_b: r.total,
                    license: r.license.clone(),
                    base: r.base.clone(),
                    split: Some(r.split),
                    quality: Some(of(QUALITY_METRICS)),
                    timing: Some(of(&SPEED)),
                    meets_targets: r.misses.is_empty(),
                    verdict,
                    serving: r.serving.clone(),
                    vs_base,
                }
            })
            .collect();
        // Models the policy kept out never ran; they lost before any target.
        let policy: Option<Candidates> = input.read_optional("candidates")?;
        candidates.extend(policy.iter().flat_map(|p| &p.excluded).map(|m| DecisionRow {
            model: m.id.clone(),
            params_active_b: m.params_active_b,
            params_total_b: m.params_total_b,
            license: m.license.clone(),
            base: None,
            split: None,
            quality: None,
            timing: None,
            meets_targets: false,
            verdict: format!("excluded by policy: {}", m.reasons.as_deref().unwrap_or_default().join("; ")),
            serving: None,
            vs_base: None,
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
        let agreement = judgement.agreement();
        let summary = match (judgement.task, agreement.map(|a| (a.kappa, a.n))) {
            (Some(Task::Rubric), Some((Some(k), n))) if k < TRUSTED_KAPPA => {
                format!("{summary}; caution: the judge agrees with people at only κ {k:.2} ({n} labeled answers)")
            }
            (Some(Task::Rubric), None | Some((None, _))) => format!("{summary}; caution: the judge is not checked against human labels"),
            _ => summary,
        };
        let best = rows.iter().find(|r| Some(&r.id) == selected.as_ref().or(closest.as_ref())).expect("a selected or closest row");
        let decision = Decision {
            targets,
            prompt_version: version,
            selected: selected.clone(),
            closest,
            summary,
            candidates,
            metrics: DecisionMetrics { targets_met: if selected.is_some() { 1.0 } else { 0.0 }, accuracy: best.values.get("accuracy").copied() },
            judge_agreement: agreement.cloned(),
        };
        Ok(decision.to_json())
    }
}

struct Row {
    id: String,
    /// Its machine in the price table, when there is one.
    serving: Option<Serving>,
    split: Split,
    active: f64,
    total: f64,
    values: BTreeMap<&'static str, f64>,
    misses: Vec<String>,
    shortfall: f64,
    license: String,
    base: Option<String>,
    /// Its quality figures are an earlier prompt version's (a revision was rejected).
    earlier: bool,
}

impl Row {
    /// The task's main quality figure: accuracy, nDCG or rubric pass rate.
    fn quality(&self) -> f64 {
        MAIN_METRICS.iter().find_map(|k| self.values.get(k).copied()).unwrap_or(0.0)
    }
}

fn short(v: f64) -> String {
    if v.fract() == 0.0 || v.abs() >= 100.0 { format!("{v:.0}") } else { format!("{v:.3}") }
}

fn targets_text(targets: &BTreeMap<String, String>) -> String {
    targets.iter().map(|(k, b)| format!("{k} {b}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use artifacts::{Accepted, Answer, AnswerTiming, Estimate, JudgedModel, ModelAnswers, ModelTiming, Revision, SplitScores};

    fn stage(targets: &str) -> SelectStage {
        let catalog = Catalog::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../catalogs/open-models.toml")).unwrap();
        SelectStage { id: "decision".into(), catalog, targets: toml::from_str(targets).unwrap(), targets_at: 0..0, usd_per_hour: None, prices: None }
    }

    /// Candidates with held-out accuracy, unparsed count (of 100) and p95 latency.
    fn input(candidates: &[(&str, f64, u32, f64)]) -> StageInput {
        let judged = candidates
            .iter()
            .map(|(id, acc, unparsed, _)| {
                let split = SplitScores {
                    unparsed: Some(*unparsed as usize),
                    accuracy: Some(Estimate { value: *acc, ci95: Some([acc - 0.05, acc + 0.05]) }),
                    macro_f1: Some(Estimate { value: *acc, ci95: None }),
                    ..SplitScores::of(100)
                };
                (id.to_string(), JudgedModel { splits: [(Split::Heldout, split)].into(), verdicts: Vec::new(), agreement: None })
            })
            .collect();
        let models = candidates.iter().map(|(id, _, _, p95)| (id.to_string(), answered(&[], *p95))).collect();
        let answers = Answers { sampler: Value::Null, prepare: Value::Null, models, output: None, repeats: None };
        let prompt = Prompt { source: "p.j2".into(), system: None, template: "{{ text }}".into(), metrics: None, revision: None, accepted: None, summary: None };
        StageInput::new(
            [
                ("judgement".to_string(), Arc::new(judge::judgement(judged, &[]).to_json())),
                ("answers".to_string(), Arc::new(answers.to_json())),
                ("prompt".to_string(), Arc::new(prompt.to_json())),
            ]
            .into(),
            Default::default(),
            0,
        )
    }

    /// A candidate's answers, as `infer` summarizes them, with this p95 latency.
    fn answered(answers: &[Answer], p95: f64) -> ModelAnswers {
        let busy_s = answers.iter().map(|a| a.timing.latency_ms).sum::<f64>() / 1000.0;
        let completion: usize = answers.iter().map(|a| a.completion_tokens).sum();
        let timing = ModelTiming {
            latency_p50_ms: p95 / 2.0,
            latency_p95_ms: p95,
            decode_tokens_per_s: None,
            busy_s: Some(busy_s),
            tokens_per_s: (busy_s > 0.0).then(|| completion as f64 / busy_s),
        };
        ModelAnswers { pin: Default::default(), answers: answers.to_vec(), timing, transport: None, reasoning: None, repeats: Vec::new() }
    }

    /// 100 requests, 200 prompt + 10 completion tokens each, 0.5 s each.
    fn hundred_answers() -> Vec<Answer> {
        let timing = AnswerTiming { latency_ms: 500.0, prefill_ms: None, decode_ms: None };
        (0..100)
            .map(|i| Answer { id: format!("s{i}"), text: String::new(), finish_reason: "stop".into(), prompt_tokens: 200, completion_tokens: 10, timing: timing.clone(), transport: None, reasoning: None, reasoning_tokens: None, tool_calls: None })
            .collect()
    }

    fn run(s: &SelectStage, input: &StageInput) -> Decision {
        Decision::read(&s.finish(input, vec![]).unwrap()).unwrap()
    }

    fn verdicts(out: &Decision) -> Vec<(String, String)> {
        out.candidates.iter().map(|c| (c.model.clone(), c.verdict.clone())).collect()
    }

    #[test]
    fn the_smallest_candidate_meeting_every_target_wins() {
        let s = stage("accuracy = { min = 0.8 }\nlatency_p95_ms = { max = 1000 }");
        let out = run(
            &s,
            &input(&[
                ("smollm2-135m-instruct", 0.62, 3, 300.0),
                ("smollm2-360m-instruct", 0.83, 1, 500.0),
                ("qwen3-4b", 0.91, 0, 900.0),
                ("qwen3-30b-a3b", 0.95, 0, 1500.0),
            ]),
        );
        assert_eq!(out.selected.as_deref(), Some("smollm2-360m-instruct"));
        assert_eq!(out.metrics.targets_met, 1.0);
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
        let out = run(&s, &input(&[("smollm2-135m-instruct", 0.30, 50, 300.0), ("smollm2-360m-instruct", 0.85, 2, 500.0)]));
        assert_eq!((out.selected.as_deref(), out.closest.as_deref()), (None, Some("smollm2-360m-instruct")));
        assert_eq!((out.metrics.targets_met, out.metrics.accuracy), (0.0, Some(0.85)));
        assert!(out.summary.starts_with("no candidate meets every target (accuracy ≥ 0.9, unparsed_rate ≤ 0.05); closest: `smollm2-360m-instruct` with prompt version 1"), "{}", out.summary);
    }

    #[test]
    fn in_a_loop_the_prompt_version_in_force_is_judged_not_a_rejected_revision() {
        let s = stage("accuracy = { min = 0.8 }");
        let mut input = input(&[("smollm2-135m-instruct", 0.5, 0, 300.0)]);
        let accepted = Accepted { version: 2, models: [("smollm2-135m-instruct".into(), [("accuracy".into(), 0.85), ("unparsed_rate".into(), 0.0)].into())].into() };
        let revision = Revision { version: 3, for_model: "smollm2-135m-instruct".into(), targeted: None, tried: Default::default(), history: Vec::new(), parent: None, revised_by: None };
        let prompt = Prompt { source: "p.j2".into(), system: None, template: "t".into(), metrics: None, revision: Some(revision), accepted: Some(accepted), summary: None };
        input.inputs.insert("prompt".into(), Arc::new(prompt.to_json()));
        let out = run(&s, &input);
        assert_eq!((out.selected.as_deref(), out.prompt_version), (Some("smollm2-135m-instruct"), 2));
        assert_eq!(out.candidates[0].quality.as_ref().unwrap()["accuracy"], 0.85);
    }

    #[test]
    fn cost_per_million_tokens_follows_the_hourly_price_and_the_measured_time() {
        let mut s = stage("usd_per_mtok = { max = 0.5 }");
        s.usd_per_hour = Some(0.36);
        let mut input = input(&[("smollm2-135m-instruct", 0.9, 0, 300.0)]);
        // 21,000 tokens in 50 s.
        let models = [("smollm2-135m-instruct".to_string(), answered(&hundred_answers(), 300.0))].into();
        input.inputs.insert("answers".into(), Arc::new(Answers { sampler: Value::Null, prepare: Value::Null, models, output: None, repeats: None }.to_json()));
        let out = run(&s, &input);
        // $0.36/h × 50 s = $0.005 for 21,000 tokens → $0.238095 per million.
        let cost = out.candidates[0].timing.as_ref().unwrap()["usd_per_mtok"];
        assert!((cost - 0.238095).abs() < 1e-6, "{cost}");
        assert_eq!(out.selected.as_deref(), Some("smollm2-135m-instruct"));
    }

    #[test]
    fn each_candidate_is_priced_on_its_own_machine() {
        let mut s = stage("usd_per_mtok = { max = 0.5 }");
        let table = "[machines.cpu]\nhardware = \"2 vCPU\"\nusd_per_hour = 0.36\n\n[machines.h100]\nhardware = \"1× H100\"\ngpu = \"H100\"\nusd_per_hour = 3.6\n\n[serving]\ndefault = \"cpu\"\n\"smollm2-360m-instruct\" = \"h100\"\n";
        s.prices = Some(prices::Prices::parse(&SourceFile::new("prices.toml", table), "decision").unwrap());
        let mut input = input(&[("smollm2-135m-instruct", 0.9, 0, 300.0), ("smollm2-360m-instruct", 0.9, 0, 300.0)]);
        let entry = answered(&hundred_answers(), 300.0);
        let models = [("smollm2-135m-instruct".to_string(), entry.clone()), ("smollm2-360m-instruct".to_string(), entry)].into();
        input.inputs.insert("answers".into(), Arc::new(Answers { sampler: Value::Null, prepare: Value::Null, models, output: None, repeats: None }.to_json()));
        let out = run(&s, &input);
        let row = |id: &str| out.candidates.iter().find(|c| c.model == id).unwrap().clone();
        let cost = |id: &str| row(id).timing.unwrap()["usd_per_mtok"];
        // The same measured time on a machine ten times the price: ten times the cost.
        assert!((cost("smollm2-135m-instruct") - 0.238095).abs() < 1e-6);
        assert!((cost("smollm2-360m-instruct") - 2.380952).abs() < 1e-6);
        let pricier = row("smollm2-360m-instruct");
        assert_eq!(pricier.serving.unwrap().gpu.as_deref(), Some("H100"));
        assert!(pricier.verdict.starts_with("misses usd_per_mtok 2.381"), "{}", pricier.verdict);
        assert_eq!(out.selected.as_deref(), Some("smollm2-135m-instruct"));
    }

    /// A capacity stage's figures for one candidate: `max_rps` sustained, at `tokens_per_s`.
    fn measured(max_rps: f64, tokens_per_s: f64) -> artifacts::ModelCapacity {
        artifacts::ModelCapacity {
            pin: Default::default(),
            timing: artifacts::CapacityTiming { max_rps, goodput_rps: max_rps * 0.99, tokens_per_s: Some(tokens_per_s), found: String::new(), loads: Vec::new(), search_s: 1.0 },
        }
    }

    #[test]
    fn a_max_load_target_decides_on_the_capacity_stages_figures() {
        let mut s = stage("accuracy = { min = 0.8 }\nmax_rps = { min = 10 }");
        s.usd_per_hour = Some(3.6);
        let mut input = input(&[("smollm2-135m-instruct", 0.85, 0, 300.0), ("smollm2-360m-instruct", 0.9, 0, 300.0), ("qwen3-4b", 0.95, 0, 300.0)]);
        // The smallest is good enough but sustains 4 req/s; the next sustains 12; the third was not measured.
        let models = [("smollm2-135m-instruct".to_string(), measured(4.0, 1000.0)), ("smollm2-360m-instruct".to_string(), measured(12.0, 2000.0))].into();
        let capacity = Capacity { slo: artifacts::Slo { ttft_ms: 500.0, e2e_ms: 2000.0, tpot_ms: None, attainment: 0.99 }, models };
        input.inputs.insert("capacity".into(), Arc::new(capacity.to_json()));
        let out = run(&s, &input);
        assert_eq!(out.selected.as_deref(), Some("smollm2-360m-instruct"));
        let verdict = |id: &str| out.candidates.iter().find(|c| c.model == id).unwrap().verdict.clone();
        assert_eq!(verdict("smollm2-135m-instruct"), "misses max_rps 4 (target ≥ 10)");
        assert_eq!(verdict("qwen3-4b"), "misses max_rps not measured");
        // $3.6 an hour at 2,000 tokens a second: $0.50 per million.
        let timing = out.candidates.iter().find(|c| c.model == "smollm2-360m-instruct").unwrap().timing.clone().unwrap();
        assert_eq!((timing["max_rps"], timing["goodput_rps"]), (12.0, 12.0 * 0.99));
        assert!((timing["usd_per_mtok_at_max_rps"] - 0.5).abs() < 1e-9, "{}", timing["usd_per_mtok_at_max_rps"]);
    }
}
