//! `judge`: every candidate's answers scored against the dataset's reference labels.
//!
//! An answer is first mapped to a label (`normalize`): a small model rarely answers with the bare
//! label, and how its text is read is part of what is measured, so the rule is explicit and every
//! verdict shows the label it was read as. An answer that cannot be read as any label is
//! `unparsed`: it counts as wrong for accuracy and is reported apart, never silently dropped.
//!
//! Per candidate and split (dev, held-out): accuracy, per-class precision / recall / F1, macro and
//! micro F1, the confusion matrix, and a percentile bootstrap confidence interval for accuracy and
//! macro F1 (resampling samples, seeded by the pipeline seed, so reruns give the same interval).
//! `metrics` (what `[targets]` reads) holds the held-out figures of the best candidate.
//!
//! With `normalize = "json"`, answers and references are structured values compared by value,
//! field by field (`structured`).

mod structured;

use std::collections::BTreeMap;
use std::sync::Arc;

use artifacts::{
    Agreement, AgreementConfusion, Answers, Artifact, ClassScores, Dataset, Estimate, JudgedModel, Judgement, LABEL_METRICS, LABEL_TARGETS, PAIRWISE_METRICS, RANKING_METRICS, RANKING_TARGETS, REPEAT_METRICS,
    RUBRIC_METRICS, RepeatScores, Split, SplitScores, Task, Verdict,
};
use engine::diag::{Diagnostic, SourceFile};
use engine::{BuildContext, Item, Port, Stage, StageError, StageInput, StagePlugin};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub struct Judge;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JudgeConfig {
    /// How an answer's text is read as a label.
    #[serde(default)]
    pub normalize: Normalize,
    /// Bootstrap resamples for confidence intervals (0: no intervals).
    #[serde(default = "default_bootstrap")]
    pub bootstrap: u32,
    /// Ranking tasks: the sample field holding relevance grades by document id
    /// (`{"A": 2, "B": 0}`). Answers are then read as rankings of those ids (in order of first
    /// mention) and scored by nDCG@k instead of label accuracy.
    pub relevance: Option<String>,
    /// Cutoff of nDCG@k.
    #[serde(default = "default_k")]
    pub k: usize,
    /// A ranking passes (for failure clustering) when its nDCG@k is at least this.
    #[serde(default = "default_pass_ndcg")]
    pub pass_ndcg: f64,
    /// `normalize = "json"`: how fields of the answer are compared with the reference's, by dotted
    /// path: `fields = { hours = { match = "exact" }, minutes = { match = "numeric", tolerance = 1 },
    /// tags = { match = "f1" } }`. An answer passes when every one is right. Without it, an
    /// answer passes when it equals the reference as a value, and an object reference's top-level
    /// fields are each scored exactly.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, structured::FieldRule>,
    /// Tool calls (`normalize = "json"`, answers `{"name", "arguments"}`): the sample field holding
    /// the functions offered (as `render`'s `tools`). Each split then scores `arguments_valid`,
    /// the share of calls whose arguments are valid against the named function's parameter
    /// schema; the answer passes by `fields` as any JSON answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<String>,
}

fn default_k() -> usize {
    3
}

fn default_pass_ndcg() -> f64 {
    0.9
}

fn default_bootstrap() -> u32 {
    1000
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// The label whose name appears first in the answer, as a whole word, ignoring case
    /// ("Label: Billing." → `billing`).
    #[default]
    FirstLabel,
    /// The whole answer, trimmed and lowercased, must equal a label.
    Lowercase,
    /// The whole answer, trimmed, must equal a label exactly.
    Exact,
    /// The answer is a JSON value (alone, in a code fence, or the first object or list in its
    /// text), compared by value with the reference (the label field: a JSON object or list, or a
    /// string of JSON text) — key order, whitespace and how a number is spelled never decide; see
    /// `fields`.
    Json,
}

impl Normalize {
    /// As written in a config.
    pub fn as_str(self) -> &'static str {
        match self {
            Normalize::FirstLabel => "first_label",
            Normalize::Lowercase => "lowercase",
            Normalize::Exact => "exact",
            Normalize::Json => "json",
        }
    }
}

impl StagePlugin for Judge {
    type Config = JudgeConfig;
    const KIND: &'static str = "judge";
    const VERSION: u32 = 2;
    const SUMMARY: &'static str = "answers scored against references: accuracy, precision / recall / F1 for labels, nDCG@k for rankings, bootstrap intervals";
    const INPUTS: &'static [Port] = &[Port::new("dataset", Dataset::TYPE), Port::new("answers", Answers::TYPE)];
    const OUTPUT: &'static str = Judgement::TYPE;

    fn build(config: JudgeConfig, cx: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        if config.k == 0 || !(0.0..=1.0).contains(&config.pass_ndcg) {
            return Err(vec![cx.error_at(cx.key("k").or(cx.key("pass_ndcg")), format!("`k` must be at least 1 and `pass_ndcg` within 0 to 1 (got {} and {})", config.k, config.pass_ndcg), "")]);
        }
        if config.bootstrap > 100_000 {
            return Err(vec![cx.error_at(cx.key("bootstrap"), format!("`bootstrap` is {}: at most 100000 resamples", config.bootstrap), "")]);
        }
        let json = config.normalize == Normalize::Json;
        let mut errors = Vec::new();
        if json && config.relevance.is_some() {
            errors.push(cx.error_at(cx.key("relevance"), "`relevance` (rankings) and `normalize = \"json\"` (structured answers) are two kinds of judging: choose one", ""));
        }
        if config.tools.is_some() && !json {
            errors.push(cx.error_at(cx.key("tools"), "`tools` checks tool calls' arguments, which are read as JSON: it needs `normalize = \"json\"`", ""));
        }
        if !config.fields.is_empty() && !json {
            errors.push(
                cx.error_at(cx.key("fields"), "`fields` compares fields of structured answers: it needs `normalize = \"json\"`", "")
                    .help("set `normalize = \"json\"`, or remove `fields`"),
            );
        }
        for problem in structured::check_fields(&config.fields) {
            errors.push(cx.error_at(cx.key("fields"), problem, "in these fields"));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let at = cx.key("normalize");
        Ok(Arc::new(JudgeStage(config, at)))
    }
}

/// The config, and where `normalize` is in the pipeline file.
struct JudgeStage(JudgeConfig, Option<std::ops::Range<usize>>);

#[async_trait::async_trait]
impl Stage for JudgeStage {
    fn metrics(&self) -> Option<&'static [&'static str]> {
        Some(if self.0.relevance.is_some() { RANKING_TARGETS } else { LABEL_TARGETS })
    }

    /// References a JSON reading cannot read are known from the dataset at `validate`.
    fn check_inputs(&self, pipeline: &SourceFile, facts: &BTreeMap<String, Value>) -> Vec<Diagnostic> {
        let Some(dataset) = artifacts::facts::read::<artifacts::facts::DatasetFacts>(facts.get("dataset")) else { return Vec::new() };
        if self.0.normalize != Normalize::Json || dataset.labels_not_json == 0 {
            return Vec::new();
        }
        let first = &dataset.labels_not_json_first;
        let mut d = Diagnostic::error(format!(
            "`normalize = \"json\"` reads each reference as JSON, and {} of the dataset's do not parse; the first: {}",
            dataset.labels_not_json,
            first.iter().map(|n| format!("{}:{}:{}: sample `{}`: {}", n.file, n.line, n.column, n.id, n.message)).collect::<Vec<_>>().join("; ")
        ));
        if let Some(at) = &self.1 {
            d = d.at(pipeline, at.clone(), "answers and references read as JSON");
        }
        vec![d.help("write each reference as a JSON object or list in the dataset (`\"expected\": {\"hours\": 2}`), or as a string of JSON text")]
    }

    fn finish(&self, input: &StageInput, _: Vec<(Item, Value)>) -> Result<Value, StageError> {
        let dataset: Dataset = input.read("dataset")?;
        let answers: Answers = input.read("answers")?;
        let judge = |answers: &Answers| match (&self.0.relevance, self.0.normalize) {
            (Some(field), _) => self.rankings(&dataset, answers, field, input.seed),
            (None, Normalize::Json) => structured::judge(&dataset, answers, &self.0.fields, self.0.tools.as_deref(), self.0.bootstrap, input.seed),
            (None, _) => self.labels(&dataset, answers, input.seed),
        };
        let mut judgement = judge(&answers)?;
        if let Some(n) = answers.repeats.filter(|&n| n > 1) {
            // Each later answer judged as the first is; what they show together is added.
            let later = (1..n).map(|r| judge(&answers.repeat(r))).collect::<Result<Vec<_>, _>>()?;
            add_repeats(&mut judgement, &later, n, self.0.bootstrap, input.seed);
        }
        Ok(judgement.to_json())
    }
}

impl JudgeStage {
    /// Label tasks: each answer read as a label, scored per split.
    fn labels(&self, dataset: &Dataset, answers: &Answers, seed: u64) -> Result<Judgement, StageError> {
        let mut labels: Vec<&str> = Vec::new();
        for s in &dataset.samples {
            let label = s.label.as_deref().ok_or_else(|| {
                StageError::new(format!("sample `{}` has no label: set `label` on the dataset stage to the field holding the reference", s.id))
            })?;
            labels.push(label);
        }
        labels.sort_unstable();
        labels.dedup();

        let mut models = BTreeMap::new();
        for (model, m) in &answers.models {
            let mut verdicts = Vec::new();
            let mut by_split: BTreeMap<Split, Vec<(usize, Option<usize>)>> = BTreeMap::new();
            for (a, sample) in dataset.join(model, m).map_err(StageError::new)? {
                let (label, split) = (sample.label.as_deref().expect("every sample has a label"), sample.split);
                let predicted = read_label(&a.text, &labels, self.0.normalize);
                let gold = labels.iter().position(|l| *l == label).expect("labels come from the references");
                by_split.entry(split).or_default().push((gold, predicted));
                verdicts.push(Verdict {
                    predicted: Some(predicted.map(|p| labels[p].to_string())),
                    pass: Some(predicted == Some(gold)),
                    ..verdict(&a.id, split, Some(label), &a.text)
                });
            }
            let seed = model_seed(seed, model);
            let splits = by_split.iter().map(|(split, pairs)| (*split, scores(pairs, &labels, self.0.bootstrap, seed))).collect();
            models.insert(model.clone(), JudgedModel { splits, verdicts, agreement: None });
        }
        Ok(Judgement {
            labels: Some(labels.iter().map(|l| l.to_string()).collect()),
            normalize: Some(self.0.normalize.as_str().to_string()),
            ..judgement(models, LABEL_METRICS)
        })
    }

    /// Ranking tasks: nDCG@k per sample, its mean per split with a bootstrap interval.
    fn rankings(&self, dataset: &Dataset, answers: &Answers, field: &str, seed: u64) -> Result<Judgement, StageError> {
        let mut grades_of: BTreeMap<&str, BTreeMap<&str, f64>> = BTreeMap::new();
        for s in &dataset.samples {
            let grades = s.fields.get(field).and_then(Value::as_object).ok_or_else(|| {
                StageError::new(format!("sample `{}` has no `{field}` object of relevance grades (`{{\"A\": 2, \"B\": 0}}`)", s.id))
            })?;
            grades_of.insert(&s.id, grades.iter().filter_map(|(d, g)| Some((d.as_str(), g.as_f64()?))).collect());
        }
        let mut models = BTreeMap::new();
        for (model, m) in &answers.models {
            let mut verdicts = Vec::new();
            let mut by_split: BTreeMap<Split, Vec<(f64, bool)>> = BTreeMap::new();
            for (a, sample) in dataset.join(model, m).map_err(StageError::new)? {
                let (grades, split) = (&grades_of[sample.id.as_str()], &sample.split);
                let ranking = read_ranking(&a.text, &grades.keys().copied().collect::<Vec<_>>());
                let score = ndcg(&ranking, grades, self.0.k);
                let ideal_top = grades.iter().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(a.0))).map(|(d, _)| *d);
                by_split.entry(*split).or_default().push((score, ranking.is_empty()));
                verdicts.push(Verdict {
                    predicted: Some(ranking.first().map(|d| d.to_string())),
                    pass: Some(score >= self.0.pass_ndcg),
                    ndcg: Some(round(score)),
                    ranking: Some(ranking.iter().map(|d| d.to_string()).collect()),
                    ..verdict(&a.id, *split, ideal_top, &a.text)
                });
            }
            let seed = model_seed(seed, model);
            let splits = by_split
                .iter()
                .map(|(split, scores)| {
                    let values: Vec<f64> = scores.iter().map(|(s, _)| *s).collect();
                    let unparsed = scores.iter().filter(|(_, u)| *u).count();
                    let ndcg = mean_with_interval(&values, self.0.bootstrap, seed);
                    (*split, SplitScores { unparsed: Some(unparsed), ndcg: Some(ndcg), ..SplitScores::of(values.len()) })
                })
                .collect();
            models.insert(model.clone(), JudgedModel { splits, verdicts, agreement: None });
        }
        Ok(Judgement { task: Some(Task::Ranking), k: Some(self.0.k), ..judgement(models, RANKING_METRICS) })
    }
}

/// A verdict with the fields every kind of judgement sets; the rest unset (`pass` too).
pub fn verdict(id: &str, split: Split, label: Option<&str>, answer: &str) -> Verdict {
    Verdict {
        id: id.to_string(),
        split,
        label: label.map(str::to_string),
        answer: answer.to_string(),
        pass: None,
        predicted: None,
        ranking: None,
        ndcg: None,
        failure_mode: None,
        reasoning: None,
        unscored: None,
        judge_reply: None,
        judge_finish_reason: None,
        human: None,
        label_example: None,
        repeat_passes: None,
        pairwise: None,
        judge_votes: None,
    }
}

/// A judgement of `models`: the best candidate, and its figures named `metrics` as the
/// judgement's metrics. Kind-specific fields unset.
pub fn judgement(models: BTreeMap<String, JudgedModel>, metrics: &[&str]) -> Judgement {
    let best = artifacts::best_candidate(&models).map(str::to_string);
    let metrics = best.as_ref().and_then(|b| models[b].reported()).map_or_else(BTreeMap::new, |(_, s)| s.metrics(metrics));
    Judgement { task: None, labels: None, normalize: None, k: None, judge: None, failure_modes: None, models, best, metrics, agreement: None, summary: None }
}

/// Adds to `judgement` (of the first answer drawn per sample) what all `n` show together: each
/// verdict's count of passing answers, each split's [`RepeatScores`], and the best candidate's
/// repeat figures to `metrics`. `later` are the judgements of the second to n-th answers.
pub fn add_repeats(judgement: &mut Judgement, later: &[Judgement], n: usize, bootstrap: u32, seed: u64) {
    for (model, judged) in &mut judgement.models {
        let passed: Vec<BTreeMap<&str, bool>> =
            later.iter().map(|j| j.models.get(model).map_or_else(BTreeMap::new, |m| m.verdicts.iter().map(|v| (v.id.as_str(), v.passed())).collect())).collect();
        for v in &mut judged.verdicts {
            v.repeat_passes = Some(usize::from(v.passed()) + passed.iter().filter(|p| p.get(v.id.as_str()) == Some(&true)).count());
        }
        let seed = model_seed(seed, model) ^ 0x7265_7065_6174;
        for (split, scores) in &mut judged.splits {
            let counts: Vec<usize> = judged.verdicts.iter().filter(|v| v.split == *split).filter_map(|v| v.repeat_passes).collect();
            scores.repeats = Some(repeat_scores(&counts, n, bootstrap, seed));
        }
    }
    let names: Vec<&str> = match judgement.task {
        None => LABEL_METRICS,
        Some(Task::Ranking) => RANKING_METRICS,
        Some(Task::Rubric) => RUBRIC_METRICS,
        Some(Task::Pairwise) => PAIRWISE_METRICS,
    }
    .iter()
    .chain(REPEAT_METRICS)
    .copied()
    .collect();
    if let Some((_, s)) = judgement.best_model().and_then(|(_, m)| m.reported()) {
        judgement.metrics = s.metrics(&names);
    }
}

/// How samples with `counts[i]` of `n` answers passing did over a split: the mean pass rate
/// with a bootstrap interval over samples, unbiased pass@k and pass^k for k = 1, 2, 4, … and n,
/// and the flaky samples (some passed, some failed).
pub fn repeat_scores(counts: &[usize], n: usize, bootstrap: u32, seed: u64) -> RepeatScores {
    let rates: Vec<f64> = counts.iter().map(|&c| c as f64 / n.max(1) as f64).collect();
    // C(a, k) / C(n, k) as a product of k ratios (0 when a < k).
    let ratio = |a: usize, k: usize| (0..k).fold(1.0, |acc, i| if a < k { 0.0 } else { acc * (a - i) as f64 / (n - i) as f64 });
    let mean_over = |f: &dyn Fn(usize) -> f64| round(counts.iter().map(|&c| f(c)).sum::<f64>() / counts.len().max(1) as f64);
    let ks: Vec<usize> = std::iter::successors(Some(1usize), |k| Some(k * 2)).take_while(|&k| k < n).chain(std::iter::once(n)).collect();
    let flaky = counts.iter().filter(|&&c| c > 0 && c < n).count();
    RepeatScores {
        n,
        mean: mean_with_interval(&rates, bootstrap, seed),
        pass_at_k: ks.iter().map(|&k| (k.to_string(), mean_over(&|c| 1.0 - ratio(n - c, k)))).collect(),
        pass_hat_k: ks.iter().map(|&k| (k.to_string(), mean_over(&|c| ratio(c, k)))).collect(),
        flaky,
        flaky_rate: round(flaky as f64 / counts.len().max(1) as f64),
    }
}

/// Document ids in the order the answer first mentions them (whole words; any case, except
/// one-letter ids).
fn read_ranking<'a>(text: &str, ids: &[&'a str]) -> Vec<&'a str> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    let mut words = Vec::new();
    let mut start = None;
    for (at, c) in text.char_indices().chain(std::iter::once((text.len(), ' '))) {
        match (is_word(c), start) {
            (true, None) => start = Some(at),
            (false, Some(s)) => {
                words.push(&text[s..at]);
                start = None;
            }
            _ => {}
        }
    }
    let mut ranking: Vec<&str> = Vec::new();
    for word in words {
        // One-letter ids match in their own case only: "a" is an article, not `A`.
        let hit = ids.iter().find(|id| if id.len() == 1 { word == **id } else { word.eq_ignore_ascii_case(id) });
        if let Some(id) = hit
            && !ranking.contains(id)
        {
            ranking.push(id);
        }
    }
    ranking
}

/// nDCG@k with graded relevance: Σ (2^rel − 1) / log2(rank + 1), over the ideal ordering's.
fn ndcg(ranking: &[&str], grades: &BTreeMap<&str, f64>, k: usize) -> f64 {
    let gain = |rel: f64, rank: usize| (2f64.powf(rel) - 1.0) / ((rank + 2) as f64).log2();
    let dcg: f64 = ranking.iter().take(k).enumerate().map(|(i, d)| gain(grades.get(d).copied().unwrap_or(0.0), i)).sum();
    let mut ideal: Vec<f64> = grades.values().copied().collect();
    ideal.sort_by(|a, b| b.total_cmp(a));
    let idcg: f64 = ideal.iter().take(k).enumerate().map(|(i, r)| gain(*r, i)).sum();
    if idcg > 0.0 { dcg / idcg } else { 0.0 }
}

/// The label an answer is read as, by index into `labels`.
fn read_label(text: &str, labels: &[&str], normalize: Normalize) -> Option<usize> {
    let trimmed = text.trim();
    match normalize {
        Normalize::Exact => labels.iter().position(|l| *l == trimmed),
        // Read by `structured`, never as a label.
        Normalize::Json => None,
        Normalize::Lowercase => labels.iter().position(|l| l.to_lowercase() == trimmed.to_lowercase()),
        Normalize::FirstLabel => {
            let lower = trimmed.to_lowercase();
            let is_word = |b: Option<char>| b.is_none_or(|c| !c.is_alphanumeric() && c != '_');
            labels
                .iter()
                .enumerate()
                .filter_map(|(i, l)| {
                    let needle = l.to_lowercase();
                    lower
                        .match_indices(&needle)
                        .find(|(at, _)| is_word(lower[..*at].chars().next_back()) && is_word(lower[at + needle.len()..].chars().next()))
                        .map(|(at, _)| (at, std::cmp::Reverse(needle.len()), i))
                })
                .min()
                .map(|(_, _, i)| i)
        }
    }
}

/// Scores for one split: `pairs` are (gold, predicted) label indices.
fn scores(pairs: &[(usize, Option<usize>)], labels: &[&str], bootstrap: u32, seed: u64) -> SplitScores {
    let n = pairs.len();
    let accuracy = |p: &[(usize, Option<usize>)]| p.iter().filter(|(g, q)| Some(*g) == *q).count() as f64 / p.len().max(1) as f64;
    let per_class = |p: &[(usize, Option<usize>)]| -> Vec<(f64, f64, f64, usize)> {
        (0..labels.len())
            .map(|c| {
                let tp = p.iter().filter(|(g, q)| *g == c && *q == Some(c)).count() as f64;
                let predicted = p.iter().filter(|(_, q)| *q == Some(c)).count() as f64;
                let support = p.iter().filter(|(g, _)| *g == c).count();
                let precision = if predicted > 0.0 { tp / predicted } else { 0.0 };
                let recall = if support > 0 { tp / support as f64 } else { 0.0 };
                let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
                (precision, recall, f1, support)
            })
            .collect()
    };
    // Macro F1 over the classes present in this split's references.
    let macro_f1 = |p: &[(usize, Option<usize>)]| {
        let classes = per_class(p);
        let present: Vec<f64> = classes.iter().filter(|c| c.3 > 0).map(|c| c.2).collect();
        present.iter().sum::<f64>() / present.len().max(1) as f64
    };
    let classes = per_class(pairs);
    // Micro F1: every prediction of a label is a positive; an unparsed answer is a false negative only.
    let tp = pairs.iter().filter(|(g, q)| Some(*g) == *q).count() as f64;
    let predicted = pairs.iter().filter(|(_, q)| q.is_some()).count() as f64;
    let micro_p = if predicted > 0.0 { tp / predicted } else { 0.0 };
    let micro_r = tp / n.max(1) as f64;
    let micro_f1 = if micro_p + micro_r > 0.0 { 2.0 * micro_p * micro_r / (micro_p + micro_r) } else { 0.0 };
    let mut confusion: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
    for (g, q) in pairs {
        *confusion.entry(labels[*g]).or_default().entry(q.map_or("(unparsed)", |q| labels[q])).or_default() += 1;
    }
    let (acc_ci, f1_ci) = if bootstrap > 0 && n > 0 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut accs = Vec::with_capacity(bootstrap as usize);
        let mut f1s = Vec::with_capacity(bootstrap as usize);
        let mut sample = Vec::with_capacity(n);
        for _ in 0..bootstrap {
            sample.clear();
            sample.extend((0..n).map(|_| pairs[rng.usize(..n)]));
            accs.push(accuracy(&sample));
            f1s.push(macro_f1(&sample));
        }
        (Some(interval(&mut accs)), Some(interval(&mut f1s)))
    } else {
        (None, None)
    };
    SplitScores {
        unparsed: Some(pairs.iter().filter(|(_, q)| q.is_none()).count()),
        accuracy: Some(Estimate { value: round(accuracy(pairs)), ci95: acc_ci }),
        macro_f1: Some(Estimate { value: round(macro_f1(pairs)), ci95: f1_ci }),
        micro_f1: Some(round(micro_f1)),
        per_class: Some(
            labels
                .iter()
                .zip(&classes)
                .map(|(l, (p, r, f, s))| (l.to_string(), ClassScores { precision: round(*p), recall: round(*r), f1: round(*f), support: *s }))
                .collect(),
        ),
        confusion: Some(confusion.into_iter().map(|(g, row)| (g.to_string(), row.into_iter().map(|(q, c)| (q.to_string(), c)).collect())).collect()),
        ..SplitScores::of(n)
    }
}

/// A pass rate with its percentile-bootstrap 95% interval (no interval when `bootstrap` is 0 or
/// there is nothing to resample).
pub fn proportion(passes: &[bool], bootstrap: u32, seed: u64) -> Estimate {
    mean_with_interval(&passes.iter().map(|&p| f64::from(u8::from(p))).collect::<Vec<_>>(), bootstrap, seed)
}

/// A mean with its percentile-bootstrap 95% interval: the resamples every interval here is drawn
/// from, seeded so reruns give the same interval.
pub fn mean_with_interval(values: &[f64], bootstrap: u32, seed: u64) -> Estimate {
    let mean = |v: &mut dyn Iterator<Item = f64>, n: usize| v.sum::<f64>() / n.max(1) as f64;
    let n = values.len();
    let ci95 = (bootstrap > 0 && n > 0).then(|| {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut means: Vec<f64> = (0..bootstrap).map(|_| mean(&mut (0..n).map(|_| values[rng.usize(..n)]), n)).collect();
        interval(&mut means)
    });
    Estimate { value: round(mean(&mut values.iter().copied(), n)), ci95 }
}

/// How much a pass rate moved between two versions judged on the same samples: the mean of
/// (after − before) over `(before, after)` pairs, with a paired percentile-bootstrap 95%
/// interval (samples resampled together, so the interval reflects the pairing).
pub fn paired_difference(pairs: &[(bool, bool)], bootstrap: u32, seed: u64) -> Estimate {
    let deltas: Vec<f64> = pairs.iter().map(|(b, a)| f64::from(u8::from(*a)) - f64::from(u8::from(*b))).collect();
    mean_with_interval(&deltas, bootstrap, seed)
}

/// Exact one-sided McNemar test: P(X ≥ wins), X ~ Binomial(wins + losses, 1/2) — how likely at
/// least `wins` of the discordant pairs favour the change if it did nothing.
pub fn mcnemar_p(wins: usize, losses: usize) -> f64 {
    let n = wins + losses;
    let binomial = |n: usize, k: usize| (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64);
    if n == 0 { 1.0 } else { ((wins..=n).map(|k| binomial(n, k)).sum::<f64>() / 2f64.powi(n as i32)).min(1.0) }
}

/// How a judge agrees with people, from `(human, judge)` pass/fail pairs: raw agreement, Cohen's
/// κ, TPR (of the answers people passed, the share the judge passed) and TNR (likewise for
/// fails). A figure with no denominator is null.
pub fn agreement(pairs: &[(bool, bool)]) -> Agreement {
    let n = pairs.len() as f64;
    let count = |h: bool, j: bool| pairs.iter().filter(|p| **p == (h, j)).count() as f64;
    let (tp, fn_, fp, tn) = (count(true, true), count(true, false), count(false, true), count(false, false));
    let ratio = |a: f64, b: f64| (b > 0.0).then(|| round(a / b));
    let observed = (tp + tn) / n.max(1.0);
    // Chance agreement from each rater's own pass rate.
    let expected = ((tp + fn_) * (tp + fp) + (fp + tn) * (fn_ + tn)) / (n * n).max(1.0);
    Agreement {
        n: pairs.len(),
        agreement: ratio(tp + tn, n),
        kappa: (n > 0.0 && expected < 1.0).then(|| round((observed - expected) / (1.0 - expected))),
        tpr: ratio(tp, tp + fn_),
        tnr: ratio(tn, tn + fp),
        human_pass_rate: ratio(tp + fn_, n),
        judge_pass_rate: ratio(tp + fp, n),
        confusion: AgreementConfusion {
            human_pass_judge_pass: tp as u64,
            human_pass_judge_fail: fn_ as u64,
            human_fail_judge_pass: fp as u64,
            human_fail_judge_fail: tn as u64,
        },
        labels: None,
        stale: None,
        unscored: None,
        examples: None,
    }
}

/// The seed of one model's resamples: the run's seed offset by the model id, so candidates do not
/// share resamples.
pub fn model_seed(seed: u64, model: &str) -> u64 {
    seed ^ fnv(model)
}

/// The 2.5th and 97.5th percentiles.
fn interval(values: &mut [f64]) -> [f64; 2] {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    [round(at(0.025)), round(at(0.975))]
}

/// Six decimals: stable digests across platforms' last-bit float differences in sums.
pub fn round(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// A stable per-model seed offset (FNV-1a), so candidates do not share resamples.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LABELS: [&str; 4] = ["account", "billing", "refund", "technical"];

    fn check(text: &str, labels: &[&str], normalize: Normalize) -> Option<String> {
        read_label(text, labels, normalize).map(|i| labels[i].to_string())
    }

    #[test]
    fn answers_are_read_as_labels() {
        let cases = [
            ("billing", Normalize::FirstLabel, Some("billing")),
            ("Label: Billing.", Normalize::FirstLabel, Some("billing")),
            ("refund, not billing", Normalize::FirstLabel, Some("refund")),
            ("rebilling", Normalize::FirstLabel, None),
            ("technical_issue", Normalize::FirstLabel, None),
            ("I cannot tell", Normalize::FirstLabel, None),
            ("", Normalize::FirstLabel, None),
            (" Billing ", Normalize::Lowercase, Some("billing")),
            ("Billing.", Normalize::Lowercase, None),
            ("Billing", Normalize::Exact, None),
            (" billing\n", Normalize::Exact, Some("billing")),
        ];
        for (text, normalize, want) in cases {
            assert_eq!(check(text, &LABELS, normalize).as_deref(), want, "{text:?} with {normalize:?}");
        }
    }

    #[test]
    fn scores_match_hand_computed_values() {
        // gold:      a a b b c
        // predicted: a b b - c   (one wrong, one unparsed)
        let labels = ["a", "b", "c"];
        let pairs = [(0, Some(0)), (0, Some(1)), (1, Some(1)), (1, None), (2, Some(2))];
        let s = scores(&pairs, &labels, 0, 1);
        let accuracy = s.accuracy.unwrap();
        assert_eq!((accuracy.value, s.unparsed), (0.6, Some(1)));
        // a: p 1, r .5, f1 .666667; b: p .5, r .5, f1 .5; c: 1, 1, 1 → macro .722222
        let per_class = s.per_class.as_ref().unwrap();
        assert_eq!((per_class["a"].f1, per_class["b"].precision), (0.666667, 0.5));
        assert_eq!(s.macro_f1.unwrap().value, 0.722222);
        // micro: tp 3, predicted 4, n 5 → p .75, r .6, f1 .666667
        assert_eq!(s.micro_f1, Some(0.666667));
        assert_eq!(s.confusion.as_ref().unwrap()["b"]["(unparsed)"], 1);
        assert_eq!(accuracy.ci95, None);
    }

    #[test]
    fn bootstrap_intervals_are_seeded_and_bracket_the_value() {
        let labels = ["a", "b"];
        let pairs: Vec<_> = (0..200).map(|i| (i % 2, if i % 5 == 0 { Some(1 - i % 2) } else { Some(i % 2) })).collect();
        let s = scores(&pairs, &labels, 2000, 42);
        let accuracy = s.accuracy.unwrap();
        let [lo, hi] = accuracy.ci95.unwrap();
        assert_eq!(accuracy.value, 0.8);
        assert!(lo < 0.8 && 0.8 < hi, "{lo} {hi}");
        // Binomial standard error at n = 200, p = .8 is .028: a 95% interval spans about ±.055.
        assert!((0.09..0.14).contains(&(hi - lo)), "{lo} {hi}");
        assert_eq!(scores(&pairs, &labels, 2000, 42), s, "same seed, same interval");
        assert_ne!(scores(&pairs, &labels, 2000, 43).accuracy.unwrap().ci95, accuracy.ci95);
    }

    #[test]
    fn rankings_are_read_in_order_and_scored_by_ndcg() {
        let ids = ["A", "B", "C", "D"];
        assert_eq!(read_ranking("B, A, D, C", &ids), ["B", "A", "D", "C"]);
        assert_eq!(read_ranking("The best is C. Then A; B.", &ids), ["C", "A", "B"]);
        assert_eq!(read_ranking("D is a start, then B", &ids), ["D", "B"], "`a` is an article, not `A`; `start` is not A");
        assert_eq!(read_ranking("doc-b then doc-a", &["doc-a", "doc-b"]), ["doc-b", "doc-a"]);
        assert!(read_ranking("none of them", &ids).is_empty());
        let grades: BTreeMap<&str, f64> = [("A", 1.0), ("B", 2.0), ("C", 0.0), ("D", 0.0)].into();
        assert_eq!(ndcg(&["B", "A", "C"], &grades, 3), 1.0);
        // A first: (1/1 + 3/log2 3) / (3/1 + 1/log2 3) = 2.892789 / 3.630930
        assert!((ndcg(&["A", "B"], &grades, 3) - 0.796708).abs() < 1e-6, "{}", ndcg(&["A", "B"], &grades, 3));
        assert_eq!(ndcg(&[], &grades, 3), 0.0);
        assert_eq!(ndcg(&["C", "D"], &grades, 2), 0.0);
    }

    #[test]
    fn agreement_matches_hand_computed_kappa() {
        // 10 pairs: 4 both pass, 1 human pass/judge fail, 2 human fail/judge pass, 3 both fail.
        let mut pairs = vec![(true, true); 4];
        pairs.push((true, false));
        pairs.extend([(false, true); 2]);
        pairs.extend([(false, false); 3]);
        let a = agreement(&pairs);
        // po = 0.7; pe = 0.5·0.6 + 0.5·0.4 = 0.5; κ = 0.2 / 0.5 = 0.4.
        assert_eq!((a.kappa, a.tpr, a.tnr, a.agreement), (Some(0.4), Some(0.8), Some(0.6), Some(0.7)));
        // One rater constant and the other agreeing: chance agreement is 1, κ undefined.
        assert_eq!(agreement(&[(true, true), (true, true)]).kappa, None);
        assert_eq!(agreement(&[(true, true)]).tnr, None);
    }

    #[test]
    fn paired_difference_brackets_the_shift() {
        // 20 pairs: 6 fixed, 2 broken, 12 unchanged → +0.2.
        let mut pairs = vec![(false, true); 6];
        pairs.extend([(true, false); 2]);
        pairs.extend([(true, true); 6]);
        pairs.extend([(false, false); 6]);
        let d = paired_difference(&pairs, 1000, 3);
        assert_eq!(d.value, 0.2);
        let ci = d.ci95.unwrap();
        assert!(ci[0] < 0.2 && 0.2 < ci[1] && ci[0] > -0.2, "{ci:?}");
        assert_eq!(paired_difference(&[(true, true); 5], 100, 3).ci95, Some([0.0, 0.0]));
    }

    #[test]
    fn proportion_interval_is_seeded() {
        let passes: Vec<bool> = (0..40).map(|i| i % 4 != 0).collect();
        let a = proportion(&passes, 500, 9);
        assert_eq!(a.value, 0.75);
        assert_eq!(a, proportion(&passes, 500, 9));
        let ci = a.ci95.unwrap();
        assert!(ci[0] < 0.75 && 0.75 < ci[1], "{ci:?}");
        assert_eq!(proportion(&[], 500, 9).ci95, None);
    }
}

#[cfg(test)]
mod repeat_tests {
    use super::repeat_scores;

    /// pass@k and pass^k are the chances over every k-subset of the n answers: checked against
    /// counting the subsets.
    #[test]
    fn pass_at_k_and_pass_hat_k_count_subsets() {
        let n = 5;
        let counts = [0, 1, 2, 5, 3, 4];
        let s = repeat_scores(&counts, n, 0, 1);
        for k in [1usize, 2, 4, 5] {
            let (mut any, mut all) = (0.0, 0.0);
            for &c in &counts {
                // Answers 0..c pass; every k-subset of 0..n, as a bit mask.
                let subsets: Vec<u32> = (0u32..1 << n).filter(|m| m.count_ones() as usize == k).collect();
                let pass = |m: &u32| (0..c).filter(|i| m & (1 << i) != 0).count();
                any += subsets.iter().filter(|m| pass(m) > 0).count() as f64 / subsets.len() as f64;
                all += subsets.iter().filter(|m| pass(m) == k).count() as f64 / subsets.len() as f64;
            }
            let m = counts.len() as f64;
            assert!((s.pass_at_k[&k.to_string()] - any / m).abs() < 1e-4, "pass@{k}");
            assert!((s.pass_hat_k[&k.to_string()] - all / m).abs() < 1e-4, "pass^{k}");
        }
        assert_eq!(s.pass_at_k.keys().collect::<Vec<_>>(), ["1", "2", "4", "5"]);
        // pass@1 and pass^1 are both the mean pass rate.
        assert!((s.pass_at_k["1"] - s.mean.value).abs() < 1e-4 && (s.pass_hat_k["1"] - s.mean.value).abs() < 1e-4);
        assert_eq!((s.flaky, s.n), (4, 5));
        assert!((s.flaky_rate - 4.0 / 6.0).abs() < 1e-3);
    }
}
