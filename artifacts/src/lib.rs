//! The artifacts stages exchange: one definition each, the API between stages.
//!
//! The engine moves artifacts as canonical JSON and digests them; it never looks inside (besides
//! the `metrics` contract of `engine::stage`). Plugins read their inputs as these types and write
//! their outputs as them, so a producer and its consumers cannot drift apart, and the rules that
//! read an artifact ("held-out, else dev", "the main quality figure") live beside its definition.
//!
//! Every type serializes to exactly the JSON its producer wrote before it had a type: a field that
//! was left out is skipped when empty, a field that was written as `null` is an `Option` that is
//! not skipped. Digests and lockfiles depend on it.

use std::collections::{BTreeMap, BTreeSet};

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

mod capacity;
mod judgement;

pub use capacity::*;
pub use judgement::*;

/// An artifact: a type that crosses a stage boundary, with the name ports declare it by.
pub trait Artifact: Serialize + DeserializeOwned {
    /// The artifact type name (`[stages.x] needs` binds ports by it).
    const TYPE: &'static str;

    /// Read from an upstream stage's output.
    fn read(value: &Value) -> Result<Self, String> {
        Self::deserialize(value).map_err(|e| format!("not a `{}` artifact: {e}", Self::TYPE))
    }

    /// The JSON the engine stores.
    fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("artifacts serialize to JSON")
    }
}

/// The artifact types that sum their stage's result up in a top-level `summary` (printed after a
/// run), by name; a user command's `json` may too. Only these are read for one: the others can
/// be a million samples long.
pub const SUMMARIZED: &[&str] = &[Prompt::TYPE, Judgement::TYPE, Candidates::TYPE, Decision::TYPE, TrainingSet::TYPE, FineTuned::TYPE, "json"];

/// Which part of the dataset a sample is in: `dev` (what a prompt may learn from) or `heldout`
/// (what decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Dev,
    Heldout,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Dev => "dev",
            Split::Heldout => "heldout",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `dataset`: the golden set, each sample assigned to a split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Dataset {
    /// The field the reference labels were read from.
    pub label_field: Option<String>,
    pub counts: SplitCounts,
    pub samples: Vec<Sample>,
}

impl Artifact for Dataset {
    const TYPE: &'static str = "dataset";
}

impl Dataset {
    /// Samples by id.
    pub fn by_id(&self) -> BTreeMap<&str, &Sample> {
        self.samples.iter().map(|s| (s.id.as_str(), s)).collect()
    }

    /// Each of a candidate's answers with the sample it answers, in answer order: the one place
    /// answers meet the dataset. An answer to no sample of the dataset is an error.
    pub fn join<'a>(&'a self, model: &str, answers: &'a ModelAnswers) -> Result<Vec<(&'a Answer, &'a Sample)>, String> {
        let by_id = self.by_id();
        answers
            .answers
            .iter()
            .map(|a| by_id.get(a.id.as_str()).map(|s| (a, *s)).ok_or_else(|| format!("answer for `{}` ({model}) has no sample in the dataset", a.id)))
            .collect()
    }

    /// The samples of one split, in dataset order.
    pub fn split(&self, split: Split) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(move |s| s.split == split)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SplitCounts {
    pub dev: usize,
    pub heldout: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Sample {
    pub id: String,
    pub split: Split,
    /// The reference label, when the dataset names a label field.
    pub label: Option<String>,
    /// Every field of the sample's record (the id and label fields included).
    pub fields: Map<String, Value>,
}

/// `prompt`: a prompt version — the `prompt` stage's, or a revision `revise` wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Prompt {
    /// The template file it started from.
    pub source: String,
    /// The system message's template.
    pub system: Option<String>,
    /// The user message's template.
    pub template: String,
    /// `improved`: whether the revision judged last was accepted (`[iterate] patience`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<BTreeMap<String, f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<Revision>,
    /// The quality of the version in force: this one's, or its parent's when this revision was
    /// rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted: Option<Accepted>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
}

impl Artifact for Prompt {
    const TYPE: &'static str = "prompt";
}

impl Prompt {
    /// Which version is in force: the accepted one, else this one's, else 1.
    pub fn version_in_force(&self) -> u64 {
        self.accepted.as_ref().map(|a| a.version).or(self.revision.as_ref().map(|r| r.version)).unwrap_or(1)
    }
}

/// Where a revised prompt stands in the revision loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Revision {
    pub version: u64,
    /// The candidate whose failures it targets.
    pub for_model: String,
    /// Failure modes this revision targets (absent when nothing was left to target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targeted: Option<Vec<String>>,
    /// Every failure mode targeted so far.
    pub tried: BTreeSet<String>,
    /// Each revision's held-out check, in order.
    pub history: Vec<RevisionCheck>,
    /// The version this one revises, to judge it against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Parent>,
    /// The model that wrote its rules (`revise`'s `reviser`); absent for rule-based rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revised_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Parent {
    pub system: Option<String>,
    pub template: String,
    /// Its held-out verdicts (pass or not), by sample id.
    pub heldout: BTreeMap<String, bool>,
    pub accepted: Accepted,
}

/// A prompt version's quality figures per candidate (see [`SplitScores::quality`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Accepted {
    pub version: u64,
    pub models: BTreeMap<String, BTreeMap<String, f64>>,
}

/// A revision judged against its parent on the held-out split (McNemar).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RevisionCheck {
    pub version: u64,
    pub accepted: bool,
    /// Held-out samples it fixed, and broke.
    pub wins: usize,
    pub losses: usize,
    pub p_value: f64,
    /// Held-out accuracy after minus before, with a paired bootstrap interval.
    pub heldout_delta: f64,
    pub heldout_delta_ci95: Option<[f64; 2]>,
}

/// A chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Message {
        Message { role: role.to_string(), content: content.into() }
    }
}

/// `rendered`: each sample's chat messages under one prompt version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Rendered {
    /// The prompt's source file.
    pub prompt: String,
    pub samples: Vec<RenderedSample>,
}

impl Artifact for Rendered {
    const TYPE: &'static str = "rendered";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RenderedSample {
    pub id: String,
    pub messages: Vec<Message>,
    /// Functions the model may call (OpenAI's `tools`: `{"type": "function", "function":
    /// {"name", "description", "parameters"}}`), from the sample (`render`'s `tools`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
}

/// A function call a model made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ToolCall {
    pub name: String,
    /// Its arguments as JSON (a server's argument text that is not JSON stays a string).
    pub arguments: Value,
}

impl ToolCall {
    /// As an answer's text holds it, to be judged: `{"name": ..., "arguments": ...}`.
    pub fn as_json(&self) -> Value {
        serde_json::json!({"name": self.name, "arguments": self.arguments})
    }
}

/// `answers`: every candidate's answer to every rendered sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Answers {
    /// The sampler settings, as configured.
    pub sampler: Value,
    /// The weights conversion, if any.
    pub prepare: Value,
    /// By candidate id.
    pub models: BTreeMap<String, ModelAnswers>,
    /// The output constraint, when one is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Answers drawn per sample (`repeats`, when more than one): the first in each model's
    /// `answers`, the others in its `repeats`. Greedy decoding draws one: every repeat is it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeats: Option<usize>,
}

impl Answers {
    /// Each model's answers to the samples, one list per repeat (the first is `answers`): as
    /// many lists as `repeats` says, a greedy model's one list standing for every repeat.
    pub fn runs<'a>(&self, model: &'a ModelAnswers) -> Vec<&'a [Answer]> {
        let n = self.repeats.unwrap_or(1).max(1);
        let drawn: Vec<&[Answer]> = std::iter::once(model.answers.as_slice()).chain(model.repeats.iter().map(Vec::as_slice)).collect();
        if drawn.len() == 1 { vec![drawn[0]; n] } else { drawn }
    }

    /// The `r`-th answers drawn (from 0) as answers of their own: each model's `answers` are its
    /// `r`-th run ([`Answers::runs`]), nothing repeated.
    pub fn repeat(&self, r: usize) -> Answers {
        let models = self
            .models
            .iter()
            .map(|(id, m)| {
                let answers = self.runs(m).get(r).map_or_else(Vec::new, |run| run.to_vec());
                (id.clone(), ModelAnswers { answers, repeats: Vec::new(), ..m.clone() })
            })
            .collect();
        Answers { models, repeats: None, ..self.clone() }
    }
}

impl Artifact for Answers {
    const TYPE: &'static str = "answers";
}

/// What a candidate's answers depend on besides the messages and the sampler: one of the two.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Pin {
    /// Embedded: the weights' digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_sha256: Option<String>,
    /// Over HTTP: the model the server serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_model: Option<String>,
}

/// One candidate's answers, what they depend on, and how fast they came.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ModelAnswers {
    #[serde(flatten)]
    pub pin: Pin,
    /// In the rendered samples' order.
    pub answers: Vec<Answer>,
    /// Measured (volatile).
    pub timing: ModelTiming,
    /// Retries and requests redone alone (volatile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Value>,
    /// What reasoning cost, apart from the answers (a `think` setting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<ReasoningCost>,
    /// The second and later answers drawn per sample (`repeats`), one list per repeat, each in
    /// the samples' order. Empty when one answer per sample was drawn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repeats: Vec<Vec<Answer>>,
}

/// A reasoning model's thinking, counted apart from its answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReasoningCost {
    /// Answers that reasoned (had the tag).
    pub answers: usize,
    /// Their reasoning tokens, where counted (`counted` of them), and every other completion token.
    pub reasoning_tokens: usize,
    pub counted: usize,
    pub answer_tokens: usize,
}

impl ModelAnswers {
    pub fn prompt_tokens(&self) -> usize {
        self.answers.iter().map(|a| a.prompt_tokens).sum()
    }

    pub fn completion_tokens(&self) -> usize {
        self.answers.iter().map(|a| a.completion_tokens).sum()
    }
}

/// How fast one candidate answered (measured; the lockfile leaves it out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ModelTiming {
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    /// Embedded only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_tokens_per_s: Option<f64>,
    /// The requests' latencies summed, in seconds: the time they took as served one at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy_s: Option<f64>,
    /// Completion tokens over `busy_s` (none when no time was measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
}

/// One candidate's answer to one sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Answer {
    /// The sample's id (set when answers are assembled; an answer alone has none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    pub text: String,
    /// `stop` or `length`.
    pub finish_reason: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Measured (volatile).
    pub timing: AnswerTiming,
    /// How it was fetched: attempts over HTTP, `redone_alone` embedded (volatile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Value>,
    /// The reasoning a `think` setting took out of the text (what was between its tags), kept
    /// for the trace; `text` is what is judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// Its tokens, part of `completion_tokens` (the model's tokenizer counts them; a server says
    /// how many, or they are unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<usize>,
    /// The functions it called, for a sample with `tools` (its `text` is then the first call as
    /// JSON, what a judge reads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// Splits a reasoning model's text at `tag`: the reasoning (between `<tag>` and `</tag>`; from the
/// start when only the closing tag is there, as when the chat template opened it; to the end when
/// the generation stopped before closing it) and the rest, trimmed. `None` when neither tag is in
/// the text.
pub fn split_reasoning(text: &str, tag: &str) -> Option<(String, String)> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let (before, inside, after) = match (text.find(&open), text.find(&close)) {
        (Some(o), Some(c)) if o < c => (&text[..o], &text[o + open.len()..c], &text[c + close.len()..]),
        (Some(o), _) => (&text[..o], &text[o + open.len()..], ""),
        (None, Some(c)) => ("", &text[..c], &text[c + close.len()..]),
        (None, None) => return None,
    };
    let answer: Vec<&str> = [before.trim(), after.trim()].into_iter().filter(|s| !s.is_empty()).collect();
    Some((inside.trim().to_string(), answer.join(" ")))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AnswerTiming {
    pub latency_ms: f64,
    /// Prompt processing, most of the time to the first token (embedded only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_ms: Option<f64>,
    /// Generation after the first token (embedded only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_ms: Option<f64>,
}

/// `clusters`: each candidate's failed dev answers grouped into failure modes, largest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Clusters {
    /// Always `dev`: modes are learned from, and shown as, dev samples only.
    pub split: Split,
    /// The judgement's labels (empty for rankings and rubrics).
    pub labels: Vec<String>,
    pub models: BTreeMap<String, ModelClusters>,
    /// The embedding model modes were split by, when they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embeddings: Option<String>,
    /// The model that named the modes, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub named_by: Option<String>,
}

impl Artifact for Clusters {
    const TYPE: &'static str = "clusters";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ModelClusters {
    pub dev_samples: usize,
    pub dev_failures: usize,
    pub clusters: Vec<FailureMode>,
}

/// One way a candidate fails.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FailureMode {
    /// Its signature (`confused:a→b`, `no_label`, `judge:MODE`, ...), or `SIGNATURE~MEDOID` for a
    /// part of one split by what its answers say.
    pub id: String,
    pub name: String,
    pub description: String,
    /// For people: what might prevent it.
    pub fix_hypothesis: String,
    pub size: usize,
    /// Sample ids.
    pub members: Vec<String>,
    pub examples: Vec<FailureExample>,
    /// The signature a split mode came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silhouette: Option<f64>,
    /// Set by a namer model: who named it, the rule-based name it replaced, its own fix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub named_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm_fix_hypothesis: Option<String>,
    /// Why the namer's name was not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub naming: Option<String>,
}

impl FailureMode {
    /// The signature it is a mode of: its own id, or the one it was split from.
    pub fn signature(&self) -> &str {
        self.parent.as_deref().unwrap_or(&self.id)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FailureExample {
    pub id: String,
    pub label: Option<String>,
    pub answer: String,
}

/// `candidates`: the catalog models a policy lets through, and those it keeps out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Candidates {
    pub catalog: String,
    pub included: Vec<CandidateModel>,
    pub excluded: Vec<CandidateModel>,
    pub summary: String,
}

impl Artifact for Candidates {
    const TYPE: &'static str = "candidates";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CandidateModel {
    pub id: String,
    pub family: String,
    pub license: String,
    pub origin: String,
    pub params_total_b: f64,
    pub params_active_b: f64,
    pub tier: String,
    /// Why the policy keeps it out (excluded models only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasons: Option<Vec<String>>,
}

/// `decision`: the smallest candidate meeting every target, and why each other one lost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Decision {
    /// Each target, as written (`≥ 0.8`).
    pub targets: BTreeMap<String, String>,
    pub prompt_version: u64,
    pub selected: Option<String>,
    /// When none is selected: the one that misses by least.
    pub closest: Option<String>,
    pub summary: String,
    /// Judged candidates smallest first, then those the policy excluded.
    pub candidates: Vec<DecisionRow>,
    pub metrics: DecisionMetrics,
    /// How the judge agrees with people (an LLM judge with labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_agreement: Option<Agreement>,
}

impl Artifact for Decision {
    const TYPE: &'static str = "decision";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DecisionMetrics {
    pub targets_met: f64,
    pub accuracy: Option<f64>,
}

/// One candidate in a decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DecisionRow {
    pub model: String,
    pub params_active_b: f64,
    pub params_total_b: f64,
    pub license: String,
    /// A fine-tuned model: the catalog model it was trained from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Judged candidates: the split the figures are from, the figures, the timing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<BTreeMap<String, f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<BTreeMap<String, f64>>,
    pub meets_targets: bool,
    pub verdict: String,
    /// Its machine in the price table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<Serving>,
    /// A fine-tuned candidate against its base, paired on the held-out samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_base: Option<VsBase>,
}

/// A fine-tuned candidate against the model it was trained from, on the held-out samples both
/// were judged on (the prompt version in force for both).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VsBase {
    pub base: String,
    pub samples: usize,
    /// Samples the base failed and the fine-tuned model passes.
    pub fixed: usize,
    /// Samples the base passed and the fine-tuned model fails.
    pub broken: usize,
    /// Pass rate after minus before, with a paired bootstrap 95% interval.
    pub change: Estimate,
    /// Exact one-sided McNemar p-value of "no better than its base".
    pub p_value: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Serving {
    pub machine: String,
    pub hardware: String,
    pub gpu: Option<String>,
    pub usd_per_hour: f64,
}

/// A field written even when empty (`null`) but absent from some shapes: `None` skips it,
/// `Some(None)` writes `null`. Use with `default` and `skip_serializing_if = "Option::is_none"`.
pub mod present {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, T: Serialize>(value: &Option<Option<T>>, s: S) -> Result<S::Ok, S::Error> {
        value.as_ref().expect("skipped when None").serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

/// What stages know at build time about the artifacts they will produce (`Stage::facts`), for the
/// stages that read them to check themselves at `validate`. Never stored.
pub mod facts {
    use std::collections::BTreeSet;

    use serde::{Deserialize, Serialize};

    /// A `dataset` stage's: the field names some sample has, and which references are not JSON
    /// (for a judge that reads them as JSON).
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct DatasetFacts {
        pub fields: BTreeSet<String>,
        /// How many samples' references (`label`) do not parse as JSON.
        #[serde(default)]
        pub labels_not_json: usize,
        /// The first few of them, located.
        #[serde(default)]
        pub labels_not_json_first: Vec<NotJson>,
    }

    /// A reference that is not JSON: where it is in the dataset file, and why.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct NotJson {
        /// The dataset file as shown to the user.
        pub file: String,
        pub line: usize,
        pub column: usize,
        pub id: String,
        pub message: String,
    }

    /// A `render` stage's: which samples it renders.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct RenderFacts {
        /// `None`: every sample.
        pub split: Option<crate::Split>,
    }

    /// A `prompt` stage's: its template, and each variable a template reads.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct PromptFacts {
        pub template: TemplateFile,
        pub variables: Vec<TemplateVariable>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct TemplateFile {
        /// As shown to the user.
        pub file: String,
        pub text: String,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct TemplateVariable {
        pub name: String,
        /// Read by the template file, or by the `system` message.
        #[serde(rename = "in")]
        pub read_in: VariableIn,
        /// Where: in the template file, or the `system` key's value in the pipeline file.
        pub span: [usize; 2],
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum VariableIn {
        Template,
        System,
    }

    /// Facts of type `T` from an upstream's facts (`None` when it has none, or others).
    pub fn read<T: serde::de::DeserializeOwned>(facts: Option<&serde_json::Value>) -> Option<T> {
        T::deserialize(facts?).ok()
    }
}

/// `training_data`: what a model is taught, from the dev split only (held-out samples decide
/// whether it learned). Exported for hosted fine-tuning by `pipeline export`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TrainingSet {
    /// Supervised examples: the messages a model sees, and the answer it should give.
    pub sft: Vec<SftExample>,
    /// Preference pairs: an answer a candidate gave that failed, and the one wanted instead.
    pub dpo: Vec<PreferencePair>,
    pub summary: String,
}

impl Artifact for TrainingSet {
    const TYPE: &'static str = "training_set";
}

/// Where a wanted answer comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AnswerSource {
    /// The sample's gold answer (its label, or the configured field).
    Gold,
    /// An answer a person labeled as passing.
    Label,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SftExample {
    /// The sample it is made from.
    pub id: String,
    pub messages: Vec<Message>,
    pub answer: String,
    pub source: AnswerSource,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PreferencePair {
    pub id: String,
    pub messages: Vec<Message>,
    pub chosen: String,
    pub chosen_source: AnswerSource,
    pub rejected: String,
    /// The candidate whose answer was rejected, and the failure mode it fell into (a person's
    /// failing label has none unless they filed it under one).
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_mode: Option<String>,
}

/// `finetune`: models trained from a catalog model on the dev split, each a candidate `infer`
/// runs like a catalog model (its weights in this machine's model cache, by digest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FineTuned {
    pub models: Vec<TunedModel>,
    pub summary: String,
}

impl Artifact for FineTuned {
    const TYPE: &'static str = "finetuned";
}

/// One trained model: what it was trained from, on what, how, and its files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TunedModel {
    /// Its candidate id (`smollm2-135m-instruct+lora`).
    pub id: String,
    /// The catalog model it was trained from; its size and license are the base's.
    pub base: String,
    pub base_weights_sha256: String,
    /// The base's license, size and context window, as its catalog gives them.
    pub license: String,
    pub family: String,
    pub origin: String,
    pub params_total_b: f64,
    pub params_active_b: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_tokens: Option<u32>,
    /// `lora-sft` (a LoRA adapter trained on the answers), `lora-dpo` (on preference pairs) or
    /// `lora-import` (an adapter trained elsewhere), merged into the base weights.
    pub method: String,
    /// The merged model directory (Hugging Face layout): each file's sha256.
    pub files: BTreeMap<String, String>,
    /// The LoRA adapter itself (PEFT layout, kept in the model directory's `adapter/` folder, for
    /// servers that load adapters beside a base): each file's sha256.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub adapter: BTreeMap<String, String>,
    /// The digest of `files` (`sha256sum` lines in name order): what pins its answers.
    pub weights_sha256: String,
    /// Training examples (dev samples only), and the sha256 of the training data as sent.
    pub examples: usize,
    pub data_sha256: String,
    pub hyperparameters: Value,
    /// The trainer's packages and versions, and the kernels it was pinned to.
    pub trainer: BTreeMap<String, String>,
    pub steps: u64,
    pub final_loss: Option<f64>,
    /// Measurements (volatile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<TrainTiming>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TrainTiming {
    pub train_s: f64,
}

#[cfg(test)]
mod reasoning_tests {
    use super::split_reasoning;

    #[test]
    fn reasoning_is_split_from_the_answer_at_its_tag() {
        let split = |t: &str| split_reasoning(t, "think");
        assert_eq!(split("<think> two charges, so a refund </think>\nrefund"), Some(("two charges, so a refund".into(), "refund".into())));
        // The chat template opened the tag: only its end is in the generation.
        assert_eq!(split("the user wants money back</think> refund"), Some(("the user wants money back".into(), "refund".into())));
        // Cut off while thinking: no answer.
        assert_eq!(split("<think>the user wants"), Some(("the user wants".into(), String::new())));
        assert_eq!(split("Answer: <think>hm</think> refund"), Some(("hm".into(), "Answer: refund".into())));
        assert_eq!(split("refund"), None);
        assert_eq!(split_reasoning("<reasoning>x</reasoning>y", "reasoning"), Some(("x".into(), "y".into())));
    }
}

#[cfg(test)]
mod summary_tests {
    use super::*;

    /// Whether a type's JSON has a top-level `summary`.
    fn has_summary<T: JsonSchema + Artifact>() -> (&'static str, bool) {
        let schema = serde_json::to_value(schemars::schema_for!(T)).unwrap();
        (T::TYPE, schema["properties"].get("summary").is_some())
    }

    #[test]
    fn exactly_the_summarized_types_have_a_summary() {
        let all = [
            has_summary::<Dataset>(),
            has_summary::<Prompt>(),
            has_summary::<Rendered>(),
            has_summary::<Answers>(),
            has_summary::<Judgement>(),
            has_summary::<Clusters>(),
            has_summary::<Candidates>(),
            has_summary::<Decision>(),
            has_summary::<TrainingSet>(),
            has_summary::<FineTuned>(),
            has_summary::<Capacity>(),
        ];
        for (ty, has) in all {
            assert_eq!(SUMMARIZED.contains(&ty), has, "`{ty}`: in SUMMARIZED exactly when it has a summary");
        }
    }
}
