//! `judgement`: candidates' answers scored — against reference labels (`judge`), as rankings by
//! nDCG (`judge` with `relevance`), or by a judge model and a rubric (`llm_judge`). One shape for
//! all three, so whatever reads a judgement (clustering, revision, the decision, the report) needs
//! no edit for a new kind of judge.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Artifact, Split};

/// A task's main quality figure, by kind of judgement (labels, rankings, rubric): the first of
/// these a judgement reports.
pub const MAIN_METRICS: [&str; 4] = ["accuracy", "ndcg", "pass_rate", "win_rate"];

/// The `metrics` of a label judgement (the best candidate's, on its reported split).
pub const LABEL_METRICS: &[&str] = &["accuracy", "accuracy_ci_low", "accuracy_ci_high", "macro_f1", "unparsed_rate"];
/// The `metrics` of a ranking judgement.
pub const RANKING_METRICS: &[&str] = &["ndcg", "ndcg_ci_low", "ndcg_ci_high", "unparsed_rate"];
/// The `metrics` of a rubric judgement.
pub const RUBRIC_METRICS: &[&str] = &["pass_rate", "pass_rate_ci_low", "pass_rate_ci_high", "unscored_rate"];

/// The `metrics` a judgement of several answers per sample (`infer`'s `repeats`) adds: the mean
/// pass rate over every answer drawn with its interval, pass@n (one of the n passes), pass^n
/// (all n pass) and the share of samples whose answers both passed and failed.
pub const REPEAT_METRICS: &[&str] = &["repeat_mean", "repeat_mean_ci_low", "repeat_mean_ci_high", "pass_at_n", "pass_hat_n", "flaky_rate"];

/// The `metrics` of a pairwise judgement: the win rate against the other answer with its
/// interval, and the share of samples left unscored.
pub const PAIRWISE_METRICS: &[&str] = &["win_rate", "win_rate_ci_low", "win_rate_ci_high", "unscored_rate"];

/// What `[targets]` may name from a label judgement, repeats or not (validated at build).
pub const LABEL_TARGETS: &[&str] =
    &["accuracy", "accuracy_ci_low", "accuracy_ci_high", "macro_f1", "unparsed_rate", "repeat_mean", "repeat_mean_ci_low", "repeat_mean_ci_high", "pass_at_n", "pass_hat_n", "flaky_rate"];
/// What `[targets]` may name from a ranking judgement.
pub const RANKING_TARGETS: &[&str] =
    &["ndcg", "ndcg_ci_low", "ndcg_ci_high", "unparsed_rate", "repeat_mean", "repeat_mean_ci_low", "repeat_mean_ci_high", "pass_at_n", "pass_hat_n", "flaky_rate"];
/// What `[targets]` may name from a rubric judgement.
pub const RUBRIC_TARGETS: &[&str] =
    &["pass_rate", "pass_rate_ci_low", "pass_rate_ci_high", "unscored_rate", "repeat_mean", "repeat_mean_ci_low", "repeat_mean_ci_high", "pass_at_n", "pass_hat_n", "flaky_rate"];

/// Every quality figure a judged candidate may have (see [`SplitScores::quality`]).
pub const QUALITY_METRICS: &[&str] = &[
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
    "repeat_mean",
    "repeat_mean_ci_low",
    "repeat_mean_ci_high",
    "pass_at_n",
    "pass_hat_n",
    "flaky_rate",
    "win_rate",
    "win_rate_ci_low",
    "win_rate_ci_high",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Ranking,
    Rubric,
    /// Answers compared in pairs by a judge model (`llm_judge`'s `pairwise`).
    Pairwise,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Judgement {
    /// Absent for label tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Task>,
    /// The reference labels (label tasks; empty for rubrics, absent for rankings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    /// How answers were read as labels (label tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize: Option<String>,
    /// The nDCG cutoff (rankings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k: Option<usize>,
    /// The judge model (rubrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<String>,
    /// The rubric's failure modes, by id (rubrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_modes: Option<BTreeMap<String, RubricMode>>,
    /// By candidate id.
    pub models: BTreeMap<String, JudgedModel>,
    /// The candidate with the best main figure on its reported split ([`best_candidate`]).
    pub best: Option<String>,
    /// The best candidate's figures: what `[targets]` reads.
    pub metrics: BTreeMap<String, Option<f64>>,
    /// How the judge agrees with people, over every candidate (rubrics; null without labels).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::present")]
    #[schemars(with = "Option<Agreement>")]
    pub agreement: Option<Option<Agreement>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
}

impl Artifact for Judgement {
    const TYPE: &'static str = "judgement";
}

impl Judgement {
    /// The labels answers were read as (none for rankings and rubrics).
    pub fn labels(&self) -> &[String] {
        self.labels.as_deref().unwrap_or_default()
    }

    /// How the judge agrees with people, when labels were given.
    pub fn agreement(&self) -> Option<&Agreement> {
        self.agreement.as_ref().and_then(Option::as_ref)
    }

    /// The best candidate's judged answers.
    pub fn best_model(&self) -> Option<(&str, &JudgedModel)> {
        let id = self.best.as_deref()?;
        Some((id, self.models.get(id)?))
    }
}

/// The candidate whose reported split has the highest main figure; ties go to the first by id.
pub fn best_candidate(models: &BTreeMap<String, JudgedModel>) -> Option<&str> {
    let mut best: Option<(&str, f64)> = None;
    for (id, m) in models {
        if let Some((_, s)) = m.reported() {
            let v = s.main().map_or(0.0, |(_, v)| v);
            if best.is_none_or(|(_, b)| v > b) {
                best = Some((id, v));
            }
        }
    }
    best.map(|(id, _)| id)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RubricMode {
    pub description: String,
    /// What a prompt revision should try against it.
    pub fix: String,
}

/// One candidate's verdicts and scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JudgedModel {
    pub splits: BTreeMap<Split, SplitScores>,
    pub verdicts: Vec<Verdict>,
    /// How the judge agrees with people on this candidate's labeled answers (rubrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<Agreement>,
}

impl JudgedModel {
    /// The split quality is reported on: held-out, else dev (when nothing is held out).
    pub fn reported(&self) -> Option<(Split, &SplitScores)> {
        [Split::Heldout, Split::Dev].into_iter().find_map(|s| Some((s, self.splits.get(&s)?)))
    }

    /// The quality figures on the reported split, and which split that is.
    pub fn quality(&self) -> (Split, BTreeMap<&'static str, f64>) {
        match self.reported() {
            Some((split, s)) => (split, s.quality()),
            None => (Split::Dev, BTreeMap::new()),
        }
    }

    /// The verdicts of one split.
    pub fn verdicts_in(&self, split: Split) -> impl Iterator<Item = &Verdict> {
        self.verdicts.iter().filter(move |v| v.split == split)
    }
}

/// Scores of one candidate on one split. Which fields are set depends on the kind of judgement:
/// labels (`accuracy`, `macro_f1`, ...), rankings (`ndcg`) or a rubric (`pass_rate`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SplitScores {
    pub n: usize,
    /// Answers read as no label or no ranking (labels, rankings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unparsed: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<Estimate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<Estimate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_f1: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_class: Option<BTreeMap<String, ClassScores>>,
    /// Reference label → label read (or `(unparsed)`) → count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confusion: Option<BTreeMap<String, BTreeMap<String, usize>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ndcg: Option<Estimate>,
    /// Verdicts the judge model gave (rubrics), those it did not, and the passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scored: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unscored: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passes: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass_rate: Option<Estimate>,
    /// Answers read as JSON: each compared field's scores, by path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<BTreeMap<String, FieldScores>>,
    /// Several answers drawn per sample (`repeats`): how they passed together. The figures
    /// above are the first answer's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeats: Option<RepeatScores>,
    /// Compared in pairs (`llm_judge`'s `pairwise`): wins, losses and ties against the other
    /// answer, and the win rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairwise: Option<PairwiseScores>,
}

/// How a candidate's answers fared against another answer to the same samples, each pair judged
/// in both orders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PairwiseScores {
    /// What it was compared with: `reference` (the samples' reference answers) or a candidate.
    pub against: String,
    /// Samples where both orders preferred it, and where both preferred the other.
    pub wins: usize,
    pub losses: usize,
    /// Samples judged equal in both orders, or answered with the same text.
    pub ties: usize,
    /// Samples whose verdict changed with the order (position bias): ties, counted apart.
    pub inconsistent: usize,
    /// Samples with a reply that could not be read (left out of the win rate).
    pub unscored: usize,
    /// (wins + (ties + inconsistent) / 2) / scored samples, with a bootstrap interval.
    pub win_rate: Estimate,
}

/// How the answers drawn per sample (`infer`'s `repeats`) passed, over a split. pass@k and pass^k
/// are the unbiased estimates from n answers per sample (Chen et al. 2021; Yao et al. 2024's
/// τ-bench): with c of n passing, pass@k = 1 − C(n−c, k)/C(n, k) and pass^k = C(c, k)/C(n, k),
/// averaged over samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RepeatScores {
    /// Answers drawn per sample.
    pub n: usize,
    /// The share of every answer drawn that passed (each sample's c/n, averaged), with a
    /// bootstrap interval over samples.
    pub mean: Estimate,
    /// The chance that at least one of k answers passes, by k (1, 2, 4, … and n).
    pub pass_at_k: BTreeMap<String, f64>,
    /// The chance that all k answers pass, by k.
    pub pass_hat_k: BTreeMap<String, f64>,
    /// Samples whose answers both passed and failed, and their share.
    pub flaky: usize,
    pub flaky_rate: f64,
}

/// How one field of structured (JSON) answers scored against the references' over a split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FieldScores {
    /// How it was compared: `exact`, `numeric` (within a tolerance) or `f1` (lists as sets).
    #[serde(rename = "match")]
    pub rule: String,
    /// The share of answers whose field was right (of all answers: an answer that is not JSON,
    /// or lacks the field, has it wrong).
    pub accuracy: Estimate,
    /// `f1`: the mean F1 of the answers' items against the references'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_f1: Option<Estimate>,
    /// Answers that are JSON but lack the field.
    pub missing: usize,
}

impl SplitScores {
    /// Scores of `n` verdicts, no figure set yet.
    pub fn of(n: usize) -> SplitScores {
        SplitScores {
            n,
            unparsed: None,
            accuracy: None,
            macro_f1: None,
            micro_f1: None,
            per_class: None,
            confusion: None,
            ndcg: None,
            scored: None,
            unscored: None,
            passes: None,
            pass_rate: None,
            fields: None,
            repeats: None,
            pairwise: None,
        }
    }

    /// The main quality figure: accuracy, nDCG or pass rate, whichever this judgement has.
    pub fn main(&self) -> Option<(&'static str, f64)> {
        let [accuracy, ndcg, pass_rate, win_rate] = MAIN_METRICS;
        let wins = self.pairwise.as_ref().map(|p| p.win_rate);
        [(accuracy, &self.accuracy), (ndcg, &self.ndcg), (pass_rate, &self.pass_rate), (win_rate, &wins)].into_iter().find_map(|(k, e)| Some((k, e.as_ref()?.value)))
    }

    /// Every figure as a `[targets]` name (`accuracy`, `accuracy_ci_low`, ..., `unparsed_rate`),
    /// `None` where an interval was not computed. In [`QUALITY_METRICS`] order.
    pub fn figures(&self) -> Vec<(&'static str, Option<f64>)> {
        let n = self.n.max(1) as f64;
        let estimate = |names: [&'static str; 3], e: &Option<Estimate>| -> Vec<(&'static str, Option<f64>)> {
            e.iter().flat_map(|e| [(names[0], Some(e.value)), (names[1], e.ci95.map(|c| c[0])), (names[2], e.ci95.map(|c| c[1]))]).collect()
        };
        let mut out = estimate(["accuracy", "accuracy_ci_low", "accuracy_ci_high"], &self.accuracy);
        out.extend(self.macro_f1.map(|f1| ("macro_f1", Some(f1.value))));
        out.extend(estimate(["ndcg", "ndcg_ci_low", "ndcg_ci_high"], &self.ndcg));
        out.extend(estimate(["pass_rate", "pass_rate_ci_low", "pass_rate_ci_high"], &self.pass_rate));
        out.extend(self.unparsed.map(|u| ("unparsed_rate", Some(u as f64 / n))));
        out.extend(self.unscored.map(|u| ("unscored_rate", Some(u as f64 / n))));
        if let Some(r) = &self.repeats {
            out.extend(estimate(["repeat_mean", "repeat_mean_ci_low", "repeat_mean_ci_high"], &Some(r.mean)));
            let at_n = |m: &BTreeMap<String, f64>| m.get(&r.n.to_string()).copied();
            out.extend([("pass_at_n", at_n(&r.pass_at_k)), ("pass_hat_n", at_n(&r.pass_hat_k)), ("flaky_rate", Some(r.flaky_rate))]);
        }
        if let Some(p) = &self.pairwise {
            out.extend(estimate(["win_rate", "win_rate_ci_low", "win_rate_ci_high"], &Some(p.win_rate)));
        }
        out
    }

    /// The figures that were computed (no missing intervals), by name.
    pub fn quality(&self) -> BTreeMap<&'static str, f64> {
        self.figures().into_iter().filter_map(|(k, v)| Some((k, v?))).collect()
    }

    /// The judgement's `metrics` when this is the best candidate's reported split: the figures of
    /// `names`, a missing interval as `None`.
    pub fn metrics(&self, names: &[&str]) -> BTreeMap<String, Option<f64>> {
        let figures = self.figures();
        names.iter().map(|n| (n.to_string(), figures.iter().find(|(k, _)| k == n).and_then(|(_, v)| *v))).collect()
    }
}

/// A figure with its percentile-bootstrap 95% interval (none when not resampled).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Estimate {
    pub value: f64,
    pub ci95: Option<[f64; 2]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClassScores {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

/// The verdict on one answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Verdict {
    pub id: String,
    pub split: Split,
    /// The reference: the sample's label; for rankings, the document graded highest.
    pub label: Option<String>,
    pub answer: String,
    /// `None`: a judge model's reply could not be read (rubrics; see `unscored`).
    pub pass: Option<bool>,
    /// The label (or top document) the answer was read as; `Some(None)`: none (labels, rankings).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::present")]
    #[schemars(with = "Option<String>")]
    pub predicted: Option<Option<String>>,
    /// Document ids in the order the answer mentions them (rankings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranking: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ndcg: Option<f64>,
    /// The rubric's failure mode a fail is filed under; `Some(None)` for a pass (rubrics, scored).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::present")]
    #[schemars(with = "Option<String>")]
    pub failure_mode: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// Why the judge model's reply was not a verdict, the reply, and how it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unscored: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_reply: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_finish_reason: Option<String>,
    /// A person's verdict on the same answer, from the labels file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub human: Option<bool>,
    /// That label was shown to the judge as a worked example.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_example: Option<bool>,
    /// Several answers drawn per sample (`repeats`): how many of them passed (this verdict is
    /// the first answer's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_passes: Option<usize>,
    /// Compared in pairs: the outcome, and what the judge said in each order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairwise: Option<PairVerdict>,
    /// Several verdicts drawn on the answer (`llm_judge`'s `repeats`): how many passed it, of
    /// those that could be read. Its `pass` is their majority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_votes: Option<[usize; 2]>,
}

/// A pairwise verdict on one sample: `A` is the answer shown first; the candidate's answer is
/// shown first in `first`, second in `second`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PairVerdict {
    /// `win`, `loss`, `tie`, `inconsistent` or `unscored`.
    pub outcome: String,
    /// The judge's `better` (`A`, `B` or `tie`) in each order; absent where the reply could not be
    /// read, or no call was made (the same text on both sides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub second: Option<String>,
}

impl Verdict {
    /// Judged and failed (an unscored verdict is neither a pass nor a fail).
    pub fn failed(&self) -> bool {
        self.pass == Some(false)
    }

    pub fn passed(&self) -> bool {
        self.pass == Some(true)
    }

    /// What the answer was read as, if anything.
    pub fn predicted(&self) -> Option<&str> {
        self.predicted.as_ref().and_then(|p| p.as_deref())
    }

    /// The rubric's failure mode it is filed under.
    pub fn failure_mode(&self) -> Option<&str> {
        self.failure_mode.as_ref().and_then(|m| m.as_deref())
    }
}

/// How a judge agrees with people, from pass/fail pairs. A figure with no denominator is null.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Agreement {
    pub n: usize,
    pub agreement: Option<f64>,
    /// Cohen's κ.
    pub kappa: Option<f64>,
    /// Of the answers people passed, the share the judge passed; `tnr` likewise for fails.
    pub tpr: Option<f64>,
    pub tnr: Option<f64>,
    pub human_pass_rate: Option<f64>,
    pub judge_pass_rate: Option<f64>,
    pub confusion: AgreementConfusion,
    /// Over every candidate: labels given, stale ones (the answer changed), labeled answers the
    /// judge left unscored, labels shown to the judge as examples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unscored: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub examples: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgreementConfusion {
    pub human_pass_judge_pass: u64,
    pub human_pass_judge_fail: u64,
    pub human_fail_judge_pass: u64,
    pub human_fail_judge_fail: u64,
}

/// The main quality figure (see [`MAIN_METRICS`]) among figures looked up by name — a
/// judgement's `metrics`, a decision row's `quality` — with its 95% interval when both ends are
/// there.
pub fn main_figure(figure: impl Fn(&str) -> Option<f64>) -> Option<(&'static str, f64, Option<(f64, f64)>)> {
    MAIN_METRICS.iter().find_map(|&k| {
        let ci = figure(&format!("{k}_ci_low")).zip(figure(&format!("{k}_ci_high")));
        figure(k).map(|v| (k, v, ci))
    })
}
