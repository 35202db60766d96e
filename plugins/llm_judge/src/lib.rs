//! `llm_judge`: a judge model grades every answer against a rubric.
//!
//! The rubric (a TOML file) says what passes and what fails, names the failure modes a failing
//! answer is filed under, and holds the judge's user message as a template and worked examples
//! (given to the judge as earlier turns of the conversation). The judge answers with a JSON verdict
//! `{"reasoning", "pass", "failure_mode"}`, constrained to that schema by the backend where it can
//! (llguidance for embedded models, structured outputs over HTTP). A verdict that still cannot be
//! read is *unscored*: counted and shown, never a pass or a fail.
//!
//! One item per (candidate × answer), run by the same code as `infer`. An item's input is the judge
//! model, its sampler and the messages — the rubric as rendered for that answer — so a changed
//! rubric re-judges, while the candidates' answers (another stage) stay. Two candidates giving the
//! same answer share one judge call.
//!
//! With human labels (`labels`, JSONL: `{"id", "model", "answer", "pass"}`, the last label of an
//! answer wins), the judge's agreement with people is reported: Cohen's κ, TPR and TNR over the
//! labeled answers whose text is still the text that was labeled. Labels enter no item: editing
//! them recomputes only the figures — unless `label_examples` turns some of them (dev split only)
//! into worked examples, which the judge then sees in every conversation; those are left out of
//! the agreement figures. `pipeline review` writes this file.
//!
//! The output has the `judgement` shape of `judge` (per candidate: `splits`, `verdicts`; `metrics`
//! of the best candidate on the held-out split), read by `cluster`, `revise` and `select`.

mod pairwise;

use std::collections::BTreeMap;
use std::sync::Arc;

use artifacts::{
    Agreement, Answers, Artifact, Dataset, Estimate, JudgedModel, Judgement, Message, ModelAnswers, PAIRWISE_METRICS, RUBRIC_METRICS, RUBRIC_TARGETS, RubricMode, Sample, Split, SplitScores,
    Task,
};
use engine::diag::{Diagnostic, SourceFile};
use engine::{BuildContext, FileRef, Item, ItemContext, Port, Stage, StageError, StageInput, StagePlugin};
use infer::{CalledModel, ModelCall, Prepare, Sampler};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use toml::Spanned;

pub struct LlmJudge;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmJudgeConfig {
    /// Model catalog, relative to the pipeline file.
    #[schemars(with = "String")]
    pub catalog: Spanned<String>,
    /// The judge: a model id of the catalog.
    #[schemars(with = "String")]
    pub model: Spanned<String>,
    /// The rubric (TOML: `task`, `pass`, `fail`, `failure_modes`, `template`, `examples`).
    pub rubric: FileRef,
    /// People's pass/fail labels (JSONL), to measure the judge against.
    pub labels: Option<FileRef>,
    /// Up to this many labeled dev-split answers join the rubric's worked examples (people's
    /// fails and passes in turn, noted ones first; the note is the example's reasoning). They are
    /// left out of the agreement figures, and a change to them re-judges every answer.
    #[serde(default)]
    pub label_examples: usize,
    /// The judge's decoding settings.
    #[serde(default = "judge_sampler")]
    pub sampler: Sampler,
    /// Convert the judge's GGUF weights to Q8_0 first (as in `infer`).
    pub prepare: Option<Prepare>,
    /// How a judge served over HTTP is called.
    #[serde(default)]
    pub http: infer::http::HttpSettings,
    /// Bootstrap resamples for the pass rate's confidence interval (0: none).
    #[serde(default = "default_bootstrap")]
    pub bootstrap: u32,
    /// Compare answers in pairs instead of grading each: `{ against = "reference" }` (each
    /// candidate's answer against the sample's reference answer) or `{ against = "MODEL" }`
    /// (against that candidate's answer). Each pair is judged in both orders; a verdict that
    /// changes with the order is a tie, counted apart. Reports the win rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairwise: Option<PairwiseConfig>,
    /// Verdicts to draw per answer (default 1, at most 100), each from a seed of its own, at the
    /// judge sampler's temperature: the answer's verdict is their majority (a tie fails), and
    /// each verdict keeps the votes (`judge_votes`). Greedy judging draws one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<usize>", range(min = 1, max = 100))]
    pub repeats: Option<Spanned<usize>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PairwiseConfig {
    /// `reference`, or the candidate whose answers the others are compared with.
    #[schemars(with = "String")]
    pub against: Spanned<String>,
}

/// `pairwise.against` naming the samples' reference answers.
const REFERENCE: &str = "reference";

/// Greedy, and room for a short reasoning plus the verdict.
fn judge_sampler() -> Sampler {
    Sampler { max_tokens: 96, ..Sampler::default() }
}

fn default_bootstrap() -> u32 {
    1000
}

/// A rubric file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rubric {
    /// What the answers are for.
    task: String,
    /// Conditions an answer must meet to pass.
    pass: Vec<String>,
    /// Conditions that fail an answer.
    #[serde(default)]
    fail: Vec<String>,
    /// Failure modes a failing answer is filed under, by id.
    failure_modes: BTreeMap<String, Mode>,
    /// The judge's user message for one answer (minijinja): `input` (the sample's fields),
    /// `reference` (the sample's label, if any) and `answer`.
    template: Spanned<String>,
    /// Graded answers shown to the judge before the one it grades.
    #[serde(default)]
    examples: Vec<Spanned<Example>>,
    /// Longest reasoning the judge may write, in characters.
    #[serde(default = "default_reasoning_chars")]
    max_reasoning_chars: usize,
}

fn default_reasoning_chars() -> usize {
    160
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Mode {
    description: String,
    /// What a prompt revision should try against it.
    fix: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Example {
    input: serde_json::Map<String, Value>,
    reference: Option<String>,
    answer: String,
    pass: bool,
    failure_mode: Option<String>,
    reasoning: String,
}

impl Example {
    /// A person's label as a worked example, for the sample it labels; none when the label
    /// cannot be one (a fail filed under no failure mode of the rubric).
    fn from_label(label: &Label, sample: &Sample, rubric: &Rubric) -> Option<Example> {
        let failure_mode = match (&label.failure_mode, label.pass) {
            (_, true) => None,
            (Some(m), false) if rubric.failure_modes.contains_key(m) => Some(m.clone()),
            _ => return None,
        };
        let note = label.note.as_deref().map(str::trim).filter(|n| !n.is_empty());
        let reasoning = note.map_or_else(|| format!("People judged this answer a {}.", if label.pass { "pass" } else { "fail" }), str::to_string);
        Some(Example {
            input: sample.fields.clone(),
            reference: sample.label.clone(),
            answer: label.answer.clone(),
            pass: label.pass,
            failure_mode,
            reasoning: reasoning.chars().take(rubric.max_reasoning_chars).collect(),
        })
    }
}

/// The rubric's failure mode for an answer that passes.
const NONE: &str = "none";

impl Rubric {
    /// `stage`: the stage reading it, for messages.
    fn parse(file: &SourceFile, stage: &str) -> Result<Rubric, Vec<Diagnostic>> {
        let located = |span: Option<std::ops::Range<usize>>, message: String, label: &str| {
            let d = Diagnostic::error(format!("stage `{stage}`: invalid rubric: {message}"));
            match span {
                Some(span) => d.at(file, span, label),
                None => d,
            }
        };
        let rubric: Rubric = toml::from_str(&file.text).map_err(|e| vec![located(e.span(), e.message().trim_end().to_string(), "here")])?;
        let mut problems = Vec::new();
        if rubric.pass.is_empty() {
            problems.push(located(None, "`pass` is empty: list at least one condition an answer must meet".into(), ""));
        }
        if rubric.failure_modes.is_empty() {
            problems.push(located(None, "`failure_modes` is empty: name at least one way an answer can fail".into(), "").help(
                "e.g. [failure_modes.wrong_fact]\ndescription = \"states a different fact than the reference\"\nfix = \"...\"",
            ));
        }
        if rubric.failure_modes.contains_key(NONE) {
            problems.push(located(None, format!("failure mode `{NONE}` is reserved for answers that pass"), ""));
        }
        if rubric.max_reasoning_chars == 0 {
            problems.push(located(None, "`max_reasoning_chars` must be at least 1".into(), ""));
        }
        let env = environment();
        if let Err(e) = env.template_from_str(rubric.template.get_ref()) {
            problems.push(located(Some(rubric.template.span()), format!("template: {e}"), "this template"));
        } else {
            for example in &rubric.examples {
                let ex = example.get_ref();
                if let Err(e) = rubric.user_message(&ex.input, ex.reference.as_deref(), &ex.answer) {
                    problems.push(located(Some(example.span()), format!("the template cannot render this example: {e}"), "this example"));
                }
                match (&ex.failure_mode, ex.pass) {
                    (Some(m), false) if !rubric.failure_modes.contains_key(m) => problems.push(located(
                        Some(example.span()),
                        format!("example's failure mode `{m}` is not one of `failure_modes`: {}", rubric.failure_modes.keys().cloned().collect::<Vec<_>>().join(", ")),
                        "this example",
                    )),
                    (None, false) => problems.push(located(Some(example.span()), "a failing example needs its `failure_mode`".into(), "this example")),
                    _ => {}
                }
            }
        }
        if problems.is_empty() { Ok(rubric) } else { Err(problems) }
    }

    /// The JSON Schema a verdict is constrained to. Keys in this order: reasoning comes before
    /// the verdict it supports.
    fn verdict_schema(&self) -> Value {
        let modes: Vec<&str> = std::iter::once(NONE).chain(self.failure_modes.keys().map(String::as_str)).collect();
        json!({
            "type": "object",
            "properties": {
                "reasoning": {"type": "string", "maxLength": self.max_reasoning_chars},
                "pass": {"type": "boolean"},
                "failure_mode": {"type": "string", "enum": modes},
            },
            "required": ["reasoning", "pass", "failure_mode"],
            "additionalProperties": false,
        })
    }

    fn system_message(&self) -> String {
        let mut s = format!("You grade answers. {}\n\nAn answer passes only if:\n", self.task.trim());
        for p in &self.pass {
            s.push_str(&format!("- {p}\n"));
        }
        if !self.fail.is_empty() {
            s.push_str("\nAn answer fails if:\n");
            for f in &self.fail {
                s.push_str(&format!("- {f}\n"));
            }
        }
        s.push_str("\nFailure modes (for a failing answer):\n");
        for (id, m) in &self.failure_modes {
            s.push_str(&format!("- {id}: {}\n", m.description));
        }
        s.push_str(&format!(
            "\nReply with JSON only: {{\"reasoning\": \"<one short sentence>\", \"pass\": true or false, \"failure_mode\": \"{NONE}\" if it passes, else one of the failure modes}}."
        ));
        s
    }

    fn user_message(&self, input: &serde_json::Map<String, Value>, reference: Option<&str>, answer: &str) -> Result<String, minijinja::Error> {
        environment().render_str(self.template.get_ref(), minijinja::Value::from(minijinja::value::Serde(json!({"input": input, "reference": reference, "answer": answer}))))
    }

    /// The judge's conversation for one answer: rubric, worked examples (the rubric's, then
    /// `more`), the answer.
    fn messages(&self, more: &[Example], input: &serde_json::Map<String, Value>, reference: Option<&str>, answer: &str) -> Result<Vec<Message>, minijinja::Error> {
        let mut messages = vec![Message::new("system", self.system_message())];
        for ex in self.examples.iter().map(Spanned::get_ref).chain(more) {
            messages.push(Message::new("user", self.user_message(&ex.input, ex.reference.as_deref(), &ex.answer)?));
            // Keys in this order (reasoning before the verdict it supports), as the schema has them.
            let verdict = json!({"reasoning": ex.reasoning, "pass": ex.pass, "failure_mode": if ex.pass { NONE } else { ex.failure_mode.as_deref().unwrap_or(NONE) }});
            messages.push(Message::new("assistant", verdict.to_string()));
        }
        messages.push(Message::new("user", self.user_message(input, reference, answer)?));
        Ok(messages)
    }

    /// A judge's reply read as a verdict, or why it cannot be.
    fn read_verdict(&self, text: &str) -> Result<Verdict, String> {
        // Unconstrained judges (some HTTP servers) wrap JSON in a code fence.
        let body = text.trim().trim_start_matches("```json").trim_start_matches("```").trim_end_matches("```").trim();
        let value: Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
        let pass = value["pass"].as_bool().ok_or("no boolean `pass`")?;
        let reasoning = value["reasoning"].as_str().unwrap_or_default().to_string();
        let failure_mode = match value["failure_mode"].as_str() {
            _ if pass => None,
            Some(m) if self.failure_modes.contains_key(m) => Some(m.to_string()),
            // A fail filed under no known mode is still a fail.
            _ => Some("unspecified".to_string()),
        };
        Ok(Verdict { pass, reasoning, failure_mode })
    }
}

#[derive(Debug)]
struct Verdict {
    pass: bool,
    reasoning: String,
    failure_mode: Option<String>,
}

/// The rubric's template renders in the same sandbox as prompts (no files, no environment, bounded
/// work).
fn environment() -> minijinja::Environment<'static> {
    prompt::environment()
}

/// One person's verdict on one answer.
/// One person's verdict on one answer: a line of the labels file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Label {
    pub id: String,
    pub model: String,
    /// The answer's text when it was labeled: a label of an answer that has since changed is stale.
    pub answer: String,
    pub pass: bool,
    /// For a fail: the rubric's failure mode it is filed under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_mode: Option<String>,
    /// Why: for people, and the reasoning of the worked example a label becomes
    /// (`label_examples`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Labels by (sample, model); the last line for an answer wins.
fn parse_labels(file: &SourceFile, stage: &str) -> Result<BTreeMap<(String, String), Label>, Vec<Diagnostic>> {
    Ok(read_labels(file, &format!("stage `{stage}`"))?.into_iter().map(|l| ((l.id.clone(), l.model.clone()), l)).collect())
}

/// Every line of a labels file, in file order; errors name the line and column. `stage` names
/// who reads the file in the messages.
pub fn read_labels(file: &SourceFile, stage: &str) -> Result<Vec<Label>, Vec<Diagnostic>> {
    let mut labels = Vec::new();
    let mut problems = Vec::new();
    let mut offset = 0;
    for line in file.text.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let text = line.trim_end();
        if text.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Label>(text) {
            Ok(l) => labels.push(l),
            Err(e) => {
                // serde_json counts columns from 1 within the line.
                let at = start + e.column().saturating_sub(1).min(text.len());
                // The location is drawn below; serde_json's own " at line 1 column N" says less.
                let message = e.to_string();
                let message = message.rsplit_once(" at line ").map_or(message.as_str(), |(m, _)| m);
                problems.push(
                    Diagnostic::error(format!("{stage}: invalid label: {message}"))
                        .at(file, at..(at + 1).min(start + text.len()).max(at), "here")
                        .help(r#"each line is {"id": "<sample id>", "model": "<candidate>", "answer": "<the answer's text>", "pass": true|false, "failure_mode": "<for a fail>", "note": "..."}"#),
                );
            }
        }
    }
    if problems.is_empty() { Ok(labels) } else { Err(problems) }
}

/// A label as one line of the labels file, in the file's style (`{"id": "t001", ...}`).
pub fn label_line(l: &Label) -> String {
    let s = |v: &str| serde_json::to_string(v).expect("a string serializes");
    let mut line = format!("{{\"id\": {}, \"model\": {}, \"answer\": {}, \"pass\": {}", s(&l.id), s(&l.model), s(&l.answer), l.pass);
    if let Some(m) = l.failure_mode.as_deref().filter(|_| !l.pass) {
        line.push_str(&format!(", \"failure_mode\": {}", s(m)));
    }
    if let Some(n) = l.note.as_deref().filter(|n| !n.is_empty()) {
        line.push_str(&format!(", \"note\": {}", s(n)));
    }
    line.push('}');
    line
}

/// A file a stage declares and reads at build time, as a [`SourceFile`] for located errors.
pub fn read_source(cx: &mut BuildContext, file: &FileRef) -> Result<SourceFile, Vec<Diagnostic>> {
    let path = cx.file(file).map_err(|d| vec![d])?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| vec![cx.error_at(file.span.clone(), format!("cannot read `{}`: {e}", file.path), "this file")])?;
    Ok(SourceFile::new(cx.display_path(file), text))
}

impl StagePlugin for LlmJudge {
    type Config = LlmJudgeConfig;
    const KIND: &'static str = "llm_judge";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "a judge model grades every answer against a rubric (JSON verdicts, constrained); pass rate with bootstrap intervals, agreement with human labels";
    const INPUTS: &'static [Port] = &[Port::new("dataset", Dataset::TYPE), Port::new("answers", Answers::TYPE)];
    const OUTPUT: &'static str = Judgement::TYPE;

    fn build(config: LlmJudgeConfig, cx: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        let mut errors = Vec::new();
        let rubric = match read_source(cx, &config.rubric).and_then(|f| Rubric::parse(&f, cx.stage_id)) {
            Ok(r) => Some(r),
            Err(e) => {
                errors.extend(e);
                None
            }
        };
        if let Some(labels) = &config.labels
            && let Err(e) = read_source(cx, labels).and_then(|f| parse_labels(&f, cx.stage_id))
        {
            errors.extend(e);
        }
        if config.label_examples > 0 && config.labels.is_none() {
            errors.push(cx.error_at(cx.key("label_examples"), format!("`label_examples` is {}, but there is no `labels` file to take them from", config.label_examples), ""));
        }
        if config.bootstrap > 100_000 {
            errors.push(cx.error_at(cx.key("bootstrap"), format!("`bootstrap` is {}: at most 100000 resamples", config.bootstrap), ""));
        }
        if let Some(n) = &config.repeats
            && !(1..=infer::MAX_REPEATS).contains(n.get_ref())
        {
            errors.push(cx.error_at(Some(n.span()), format!("`repeats` is {}: it must be 1 to {}", n.get_ref(), infer::MAX_REPEATS), "out of range"));
        }
        if config.pairwise.is_some() && config.repeats.is_some() {
            errors.push(cx.error_at(cx.key("repeats"), "`repeats` draws several verdicts on one answer; a pairwise judge already judges each pair twice", "").help("remove `repeats`, or `pairwise`"));
        }
        if let Some(p) = &config.pairwise {
            if config.labels.is_some() {
                errors.push(cx.error_at(cx.key("labels"), "`labels` are people's pass/fail verdicts on single answers: a pairwise judge has no pass/fail to compare them with", "").help("remove `labels`, or `pairwise`"));
            }
            if p.against.get_ref().trim().is_empty() {
                errors.push(cx.error_at(Some(p.against.span()), "`pairwise.against` is empty: name `reference` or a candidate", ""));
            }
        }
        let Some(rubric) = rubric else { return Err(errors) };
        let schema = if config.pairwise.is_some() { pairwise::schema(&rubric) } else { rubric.verdict_schema() };
        let call = ModelCall { catalog: &config.catalog, model: &config.model, schema, sampler: config.sampler.clone(), prepare: config.prepare, http: &config.http };
        let judge = CalledModel::build(call, cx);
        match judge {
            Ok(judge) if errors.is_empty() => Ok(Arc::new(LlmJudgeStage { stage: cx.stage_id.to_string(), config, judge })),
            Ok(_) => Err(errors),
            Err(e) => {
                errors.extend(e);
                Err(errors)
            }
        }
    }
}

struct LlmJudgeStage {
    stage: String,
    config: LlmJudgeConfig,
    judge: CalledModel,
}

impl LlmJudgeStage {
    /// The rubric as digested into this run (not as it may be on disk now).
    fn rubric(&self, input: &StageInput) -> Result<Rubric, StageError> {
        let text = std::str::from_utf8(input.file(&self.config.rubric)?).map_err(|_| StageError::new("the rubric is not UTF-8"))?;
        Rubric::parse(&SourceFile::new(&self.config.rubric.path, text), &self.stage).map_err(|d| StageError::new(d[0].render(false)))
    }

    /// People's labels, by (sample, model); none without a labels file.
    fn labels(&self, input: &StageInput) -> Result<BTreeMap<(String, String), Label>, StageError> {
        let Some(file) = &self.config.labels else { return Ok(BTreeMap::new()) };
        let text = std::str::from_utf8(input.file(file)?).map_err(|_| StageError::new("the labels file is not UTF-8"))?;
        parse_labels(&SourceFile::new(&file.path, text), &self.stage).map_err(|d| StageError::new(d[0].render(false)))
    }

    /// The labels that become worked examples (`label_examples`), and their (sample, model) keys.
    /// Dev-split samples only; fails and passes in turn, noted labels first, then by key.
    #[allow(clippy::type_complexity)]
    fn label_examples(&self, input: &StageInput, rubric: &Rubric, samples: &BTreeMap<&str, &Sample>) -> Result<(Vec<Example>, Vec<(String, String)>), StageError> {
        if self.config.label_examples == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let labels = self.labels(input)?;
        let mut usable: [Vec<(&(String, String), Example)>; 2] = [Vec::new(), Vec::new()];
        for (key, label) in &labels {
            let Some(sample) = samples.get(key.0.as_str()).filter(|s| s.split == Split::Dev) else { continue };
            if let Some(ex) = Example::from_label(label, sample, rubric) {
                usable[usize::from(label.pass)].push((key, ex));
            }
        }
        for list in &mut usable {
            // Stable: among noted and among unnoted labels, the key order stays.
            list.sort_by_key(|(key, _)| labels[*key].note.as_deref().is_none_or(|n| n.trim().is_empty()));
        }
        let [fails, passes] = usable;
        let (mut fails, mut passes) = (fails.into_iter(), passes.into_iter());
        let (mut examples, mut keys) = (Vec::new(), Vec::new());
        while examples.len() < self.config.label_examples {
            let Some((key, ex)) = (if examples.len() % 2 == 0 { fails.next().or_else(|| passes.next()) } else { passes.next().or_else(|| fails.next()) }) else { break };
            keys.push(key.clone());
            examples.push(ex);
        }
        Ok((examples, keys))
    }
}

#[async_trait::async_trait]
impl Stage for LlmJudgeStage {
    fn metrics(&self) -> Option<&'static [&'static str]> {
        Some(if self.config.pairwise.is_some() { PAIRWISE_METRICS } else { RUBRIC_TARGETS })
    }

    fn notes(&self) -> Vec<String> {
        match &self.config.repeats {
            Some(n) if *n.get_ref() > 1 && !self.config.sampler.samples() => vec![format!(
                "repeats = {}: the judge's temperature is 0, and greedy decoding gives the same verdict every time, so one verdict per answer is drawn",
                n.get_ref()
            )],
            _ => Vec::new(),
        }
    }

    fn resolved(&self) -> Option<Value> {
        Some(json!({"judge": self.judge.candidate.pin()}))
    }

    fn pins(&self) -> engine::Pins {
        self.judge.pins()
    }

    fn items(&self, input: &StageInput) -> Result<Vec<Item>, StageError> {
        if self.config.pairwise.is_some() {
            return Ok(self.pairs(input)?.into_iter().flat_map(|p| p.items).collect());
        }
        let rubric = self.rubric(input)?;
        let (dataset, answers): (Dataset, Answers) = (input.read("dataset")?, input.read("answers")?);
        let samples = dataset.by_id();
        let (more, _) = self.label_examples(input, &rubric, &samples)?;
        let mut items = Vec::new();
        for (model, m) in &answers.models {
            // The first answers, then each later repeat's (`infer`'s `repeats`, when sampled).
            for (r, run) in later_runs(&answers, m).enumerate() {
                for (a, sample) in dataset.join(model, &run).map_err(StageError::new)? {
                    let id = &a.id;
                    let messages = rubric
                        .messages(&more, &sample.fields, sample.label.as_deref(), &a.text)
                        .map_err(|e| StageError::new(format!("rendering the rubric's template for `{id}`: {e}")))?;
                    let id = if r == 0 { format!("{model}/{id}") } else { format!("{model}/{id}#{}", r + 1) };
                    for v in 0..self.votes() {
                        let id = if v == 0 { id.clone() } else { format!("{id}~{}", v + 1) };
                        items.push(Item { id, input: self.judge.item_input(messages.clone(), infer::repeat_seed(input.seed, v)) });
                    }
                }
            }
        }
        Ok(items)
    }

    async fn run_item(&self, item: &Item, cx: &ItemContext) -> Result<Value, StageError> {
        self.judge.run(item, cx).await
    }

    fn item_concurrency(&self) -> usize {
        self.judge.concurrency
    }

    fn volatile_keys(&self) -> &'static [&'static str] {
        &["timing", "transport"]
    }

    fn finish(&self, input: &StageInput, results: Vec<(Item, Value)>) -> Result<Value, StageError> {
        if self.config.pairwise.is_some() {
            return self.pairwise_judgement(input, results);
        }
        let rubric = self.rubric(input)?;
        let (dataset, answers): (Dataset, Answers) = (input.read("dataset")?, input.read("answers")?);
        let samples = dataset.by_id();
        let labels = self.labels(input)?;
        let (_, examples) = self.label_examples(input, &rubric, &samples)?;
        let mut results = results.into_iter();
        let mut models = BTreeMap::new();
        let mut all_pairs = Vec::new();
        let mut stale = 0usize;
        let mut unscored_labeled = 0usize;
        // Verdicts on each later repeat's answers, by repeat (the second answer drawn first).
        let repeats = answers.repeats.filter(|&n| n > 1);
        let mut later: Vec<BTreeMap<String, JudgedModel>> = vec![BTreeMap::new(); repeats.map_or(0, |n| n - 1)];
        for (model, m) in &answers.models {
            let mut verdicts = Vec::new();
            let mut by_split: BTreeMap<Split, Vec<Option<bool>>> = BTreeMap::new();
            let mut pairs = Vec::new();
            for (a, sample) in dataset.join(model, m).map_err(StageError::new)? {
                let (reply, read, votes) = self.voted(&rubric, &mut results, &format!("{model}/{}", a.id))?;
                let split = sample.split;
                let mut verdict = judge::verdict(&a.id, split, sample.label.as_deref(), &a.text);
                verdict.judge_votes = votes;
                match &read {
                    Ok(v) => {
                        verdict.pass = Some(v.pass);
                        verdict.failure_mode = Some(v.failure_mode.clone());
                        verdict.reasoning = Some(v.reasoning.clone());
                    }
                    Err(why) => {
                        verdict.unscored = Some(why.clone());
                        verdict.judge_reply = Some(reply.text.clone());
                        verdict.judge_finish_reason = Some(reply.finish_reason.clone());
                    }
                }
                by_split.entry(split).or_default().push(read.as_ref().ok().map(|v| v.pass));
                let key = (a.id.clone(), model.clone());
                if let Some(label) = labels.get(&key) {
                    verdict.human = Some(label.pass);
                    match (&read, label.answer == a.text) {
                        // The judge was shown this very label: agreeing with it proves nothing.
                        _ if examples.contains(&key) => verdict.label_example = Some(true),
                        (_, false) => stale += 1,
                        (Ok(v), true) => pairs.push((label.pass, v.pass)),
                        (Err(_), true) => unscored_labeled += 1,
                    }
                }
                verdicts.push(verdict);
            }
            let seed = judge::model_seed(input.seed, model);
            let splits = by_split
                .iter()
                .map(|(split, verdicts)| {
                    let scored: Vec<bool> = verdicts.iter().flatten().copied().collect();
                    let scores = SplitScores {
                        scored: Some(scored.len()),
                        unscored: Some(verdicts.len() - scored.len()),
                        passes: Some(scored.iter().filter(|&&p| p).count()),
                        pass_rate: Some(judge::proportion(&scored, self.config.bootstrap, seed)),
                        ..SplitScores::of(verdicts.len())
                    };
                    (*split, scores)
                })
                .collect();
            let agreement = (!pairs.is_empty()).then(|| judge::agreement(&pairs));
            all_pairs.extend(pairs);
            models.insert(model.clone(), JudgedModel { splits, verdicts, agreement });
            for (r, run) in later_runs(&answers, m).enumerate().skip(1) {
                let mut verdicts = Vec::new();
                for (a, sample) in dataset.join(model, &run).map_err(StageError::new)? {
                    let (_, read, _) = self.voted(&rubric, &mut results, &format!("{model}/{}#{}", a.id, r + 1))?;
                    let pass = read.ok().map(|v| v.pass);
                    verdicts.push(artifacts::Verdict { pass, ..judge::verdict(&a.id, sample.split, sample.label.as_deref(), &a.text) });
                }
                later[r - 1].insert(model.clone(), JudgedModel { splits: BTreeMap::new(), verdicts, agreement: None });
            }
        }
        let agreement = (!labels.is_empty()).then(|| Agreement {
            labels: Some(labels.len()),
            // Labels of answers that have changed since they were labeled, and labeled answers the
            // judge left unscored: neither counts toward agreement.
            stale: Some(stale),
            unscored: Some(unscored_labeled),
            // Labels shown to the judge as worked examples (`label_examples`).
            examples: Some(examples.len()),
            ..judge::agreement(&all_pairs)
        });
        let mut judgement = judge::judgement(models, RUBRIC_METRICS);
        let best = judgement.best_model().and_then(|(id, m)| Some((id, m.reported()?.1)));
        let summary = summary(best, agreement.as_ref(), self.judge.candidate.id.as_str());
        judgement.task = Some(Task::Rubric);
        judgement.judge = Some(self.judge.candidate.id.clone());
        judgement.labels = Some(Vec::new());
        judgement.failure_modes = Some(rubric.failure_modes.into_iter().map(|(id, m)| (id, RubricMode { description: m.description, fix: m.fix })).collect());
        judgement.agreement = Some(agreement);
        judgement.summary = Some(summary);
        if let Some(n) = repeats {
            let later: Vec<Judgement> = later.into_iter().map(|models| judge::judgement(models, RUBRIC_METRICS)).collect();
            judge::add_repeats(&mut judgement, &later, n, self.config.bootstrap, input.seed);
        }
        Ok(judgement.to_json())
    }
}

impl LlmJudgeStage {
    /// Verdicts drawn per answer: `repeats` when the judge samples, else one.
    fn votes(&self) -> usize {
        match &self.config.repeats {
            Some(n) if self.config.sampler.samples() => *n.get_ref(),
            _ => 1,
        }
    }

    /// The next answer's verdict from its replies (one per vote): the first reply, the verdict
    /// (the majority of the readable ones, a tie a fail, filed under the failure mode most of its
    /// fails name; or why none could be read), and the votes (passes, readable) when there were
    /// several.
    #[allow(clippy::type_complexity)]
    fn voted(&self, rubric: &Rubric, results: &mut impl Iterator<Item = (Item, Value)>, what: &str) -> Result<(artifacts::Answer, Result<Verdict, String>, Option<[usize; 2]>), StageError> {
        let mut replies = Vec::new();
        for _ in 0..self.votes() {
            let (_, reply) = results.next().ok_or_else(|| StageError::new("fewer verdicts than answers"))?;
            let reply: artifacts::Answer = serde_json::from_value(reply).map_err(|e| StageError::new(format!("the judge's reply to `{what}` is malformed: {e}")))?;
            replies.push(reply);
        }
        let reads: Vec<Result<Verdict, String>> = replies.iter().map(|r| rubric.read_verdict(&r.text)).collect();
        let first = replies.swap_remove(0);
        if reads.len() == 1 {
            return Ok((first, reads.into_iter().next().expect("one read"), None));
        }
        let scored: Vec<&Verdict> = reads.iter().filter_map(|r| r.as_ref().ok()).collect();
        let passes = scored.iter().filter(|v| v.pass).count();
        let votes = Some([passes, scored.len()]);
        if scored.is_empty() {
            return Ok((first, Err(reads.into_iter().next().expect("one read").expect_err("none scored")), votes));
        }
        let pass = passes * 2 > scored.len();
        let mut modes: BTreeMap<&str, usize> = BTreeMap::new();
        for v in scored.iter().filter(|v| !v.pass) {
            *modes.entry(v.failure_mode.as_deref().unwrap_or("unspecified")).or_default() += 1;
        }
        let failure_mode = (!pass).then(|| modes.iter().max_by_key(|(_, n)| **n).map(|(m, _)| m.to_string()).unwrap_or_else(|| "unspecified".into()));
        // The reasoning of the first vote that agrees with the majority.
        let reasoning = scored.iter().find(|v| v.pass == pass).map(|v| v.reasoning.clone()).unwrap_or_default();
        Ok((first, Ok(Verdict { pass, reasoning, failure_mode }), votes))
    }
}

/// One candidate's answer to one sample, set against the other answer: the two judge calls (none
/// when both are the same text).
struct Pair {
    model: String,
    verdict: artifacts::Verdict,
    items: Vec<Item>,
}

impl LlmJudgeStage {
    /// Every candidate's answers paired with the other side's (`pairwise.against`), in order.
    fn pairs(&self, input: &StageInput) -> Result<Vec<Pair>, StageError> {
        let against = self.config.pairwise.as_ref().expect("pairwise").against.get_ref().as_str();
        let rubric = self.rubric(input)?;
        let (dataset, answers): (Dataset, Answers) = (input.read("dataset")?, input.read("answers")?);
        let other: Option<BTreeMap<&str, &str>> = match against {
            REFERENCE => None,
            model => Some(
                answers
                    .models
                    .get(model)
                    .ok_or_else(|| StageError::new(format!("`pairwise.against = \"{model}\"`: no such candidate in the answers (they are {}; or `reference`)", answers.models.keys().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "))))?
                    .answers
                    .iter()
                    .map(|a| (a.id.as_str(), a.text.as_str()))
                    .collect(),
            ),
        };
        let mut pairs = Vec::new();
        for (model, m) in answers.models.iter().filter(|(id, _)| id.as_str() != against) {
            for (a, sample) in dataset.join(model, m).map_err(StageError::new)? {
                let theirs = match &other {
                    None => sample.label.as_deref().ok_or_else(|| StageError::new(format!("sample `{}` has no reference answer to compare with (`pairwise.against = \"reference\"` reads the dataset's `label` field)", a.id)))?,
                    Some(other) => other.get(a.id.as_str()).copied().ok_or_else(|| StageError::new(format!("`{against}` has no answer to sample `{}`", a.id)))?,
                };
                let verdict = judge::verdict(&a.id, sample.split, sample.label.as_deref(), &a.text);
                let mut items = Vec::new();
                if a.text.trim() != theirs.trim() {
                    for (order, (first, second)) in [(1, (a.text.as_str(), theirs)), (2, (theirs, a.text.as_str()))] {
                        let messages = pairwise::messages(&rubric, &sample.fields, sample.label.as_deref(), first, second)
                            .map_err(|e| StageError::new(format!("rendering the rubric's template for `{}`: {e}", a.id)))?;
                        items.push(Item { id: format!("{model}/{}/{order}", a.id), input: self.judge.item_input(messages, input.seed) });
                    }
                }
                pairs.push(Pair { model: model.clone(), verdict, items });
            }
        }
        Ok(pairs)
    }

    /// The pairwise judgement: per candidate and split, wins, losses, ties and the win rate.
    fn pairwise_judgement(&self, input: &StageInput, results: Vec<(Item, Value)>) -> Result<Value, StageError> {
        let against = self.config.pairwise.as_ref().expect("pairwise").against.get_ref().clone();
        let replies: BTreeMap<String, String> =
            results.into_iter().map(|(item, reply)| (item.id, reply.get("text").and_then(Value::as_str).unwrap_or_default().to_string())).collect();
        let lost = format!("worse_than_{against}");
        let mut by_model: BTreeMap<String, Vec<artifacts::Verdict>> = BTreeMap::new();
        for pair in self.pairs(input)? {
            let mut v = pair.verdict;
            let said: Vec<Option<pairwise::Better>> = pair.items.iter().map(|i| replies.get(&i.id).and_then(|r| pairwise::read(r))).collect();
            let outcome = match said.as_slice() {
                [] => pairwise::Outcome::Tie,
                [first, second] => pairwise::combine(*first, *second),
                _ => unreachable!("a pair is judged in two orders or not at all"),
            };
            let name = match outcome {
                pairwise::Outcome::Win => "win",
                pairwise::Outcome::Loss => "loss",
                pairwise::Outcome::Tie => "tie",
                pairwise::Outcome::Inconsistent => "inconsistent",
                pairwise::Outcome::Unscored => "unscored",
            };
            v.pass = match outcome {
                pairwise::Outcome::Win => Some(true),
                pairwise::Outcome::Loss => Some(false),
                _ => None,
            };
            v.failure_mode = match outcome {
                pairwise::Outcome::Loss => Some(Some(lost.clone())),
                pairwise::Outcome::Win => Some(None),
                _ => None,
            };
            if outcome == pairwise::Outcome::Unscored {
                let unread: Vec<&str> = pair.items.iter().filter_map(|i| replies.get(&i.id)).filter(|r| pairwise::read(r).is_none()).map(String::as_str).collect();
                v.unscored = Some("a reply is not a pairwise verdict".into());
                v.judge_reply = unread.first().map(|r| r.to_string());
            }
            let text = |b: &Option<pairwise::Better>| b.map(|b| b.as_str().to_string());
            v.pairwise = Some(artifacts::PairVerdict { outcome: name.into(), first: said.first().and_then(text), second: said.get(1).and_then(text) });
            by_model.entry(pair.model).or_default().push(v);
        }
        let mut models = BTreeMap::new();
        for (model, verdicts) in by_model {
            let seed = judge::model_seed(input.seed, &model);
            let mut splits = BTreeMap::new();
            for split in [Split::Dev, Split::Heldout] {
                let outcomes: Vec<&str> = verdicts.iter().filter(|v| v.split == split).filter_map(|v| Some(v.pairwise.as_ref()?.outcome.as_str())).collect();
                if outcomes.is_empty() {
                    continue;
                }
                let count = |o: &str| outcomes.iter().filter(|x| **x == o).count();
                let values: Vec<f64> = outcomes.iter().filter_map(|o| match *o {
                    "win" => Some(1.0),
                    "loss" => Some(0.0),
                    "tie" | "inconsistent" => Some(0.5),
                    _ => None,
                }).collect();
                let scores = artifacts::PairwiseScores {
                    against: against.clone(),
                    wins: count("win"),
                    losses: count("loss"),
                    ties: count("tie"),
                    inconsistent: count("inconsistent"),
                    unscored: count("unscored"),
                    win_rate: judge::mean_with_interval(&values, self.config.bootstrap, seed),
                };
                splits.insert(split, SplitScores { unscored: Some(scores.unscored), pairwise: Some(scores), ..SplitScores::of(outcomes.len()) });
            }
            models.insert(model, JudgedModel { splits, verdicts, agreement: None });
        }
        let mut judgement = judge::judgement(models, PAIRWISE_METRICS);
        judgement.task = Some(Task::Pairwise);
        judgement.judge = Some(self.judge.candidate.id.clone());
        let whose = if against == REFERENCE { "the reference answer".to_string() } else { format!("`{against}`'s answer") };
        judgement.failure_modes = Some(
            [(lost, RubricMode { description: format!("the judge preferred {whose} in both orders"), fix: format!("answer at least as well as {whose} by the rubric's conditions") })].into(),
        );
        judgement.summary = Some(match judgement.best_model().and_then(|(id, m)| Some((id, m.reported()?.1.pairwise.clone()?))) {
            Some((id, p)) => format!(
                "judged in pairs by `{}` against {whose}: best `{id}` wins {} ({} wins, {} losses, {} ties, {} of them inconsistent, {} unscored)",
                self.judge.candidate.id,
                number(p.win_rate.value),
                p.wins,
                p.losses,
                p.ties + p.inconsistent,
                p.inconsistent,
                p.unscored
            ),
            None => format!("judged in pairs by `{}`: no answers", self.judge.candidate.id),
        });
        Ok(judgement.to_json())
    }
}

/// A model's answers per repeat judged (the first, then each later one drawn): one run when
/// answers were not repeated, or were decoded greedily (every repeat the same answer).
fn later_runs<'a>(answers: &'a Answers, m: &'a ModelAnswers) -> impl Iterator<Item = ModelAnswers> + 'a {
    let runs = if m.repeats.is_empty() { 1 } else { answers.runs(m).len() };
    (0..runs).map(move |r| if r == 0 { m.clone() } else { ModelAnswers { answers: answers.runs(m)[r].to_vec(), repeats: Vec::new(), ..m.clone() } })
}

fn summary(best: Option<(&str, &SplitScores)>, agreement: Option<&Agreement>, judge: &str) -> String {
    let Some((model, s)) = best else { return format!("judged by `{judge}`: no answers") };
    let rate = s.pass_rate.unwrap_or(Estimate { value: 0.0, ci95: None });
    let (low, high) = rate.ci95.map_or(("null".to_string(), "null".to_string()), |[l, h]| (number(l), number(h)));
    let count = |c: Option<usize>| c.unwrap_or_default();
    let mut line = format!(
        "judged by `{judge}`: best `{model}` passes {} [{low}, {high}] ({} of {} scored, {} unscored)",
        number(rate.value),
        count(s.passes),
        count(s.scored),
        count(s.unscored)
    );
    if let Some(a) = agreement {
        let f = |x: Option<f64>| x.map_or("n/a".to_string(), |x| format!("{x:.2}"));
        line.push_str(&format!(
            "; on {} human-labeled answers people pass {}, the judge {}: κ {}, TPR {}, TNR {}",
            a.n,
            f(a.human_pass_rate),
            f(a.judge_pass_rate),
            f(a.kappa),
            f(a.tpr),
            f(a.tnr)
        ));
    }
    line
}

/// A figure as JSON writes it (`1.0`, `0.25`), as summaries always showed it.
fn number(x: f64) -> String {
    serde_json::Number::from_f64(x).map_or_else(|| "null".to_string(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUBRIC: &str = r#"
task = "Answer a general-knowledge question in one short sentence."
pass = ["states the same fact as the reference"]
fail = ["states another fact", "answers nothing"]
template = """Question: {{ input.question }}
Reference: {{ reference }}
Answer: {{ answer }}"""

[failure_modes.wrong_fact]
description = "states a different fact than the reference"
fix = "..."

[failure_modes.no_answer]
description = "gives no answer"
fix = "..."

[[examples]]
input = { question = "What is the capital of France?" }
reference = "Paris"
answer = "Lyon."
pass = false
failure_mode = "wrong_fact"
reasoning = "Lyon is not Paris."
"#;

    fn rubric(text: &str) -> Result<Rubric, Vec<Diagnostic>> {
        Rubric::parse(&SourceFile::new("r.toml", text), "judge")
    }

    #[test]
    fn verdicts_are_read_or_unscored() {
        let r = rubric(RUBRIC).unwrap();
        let v = r.read_verdict(r#"{"reasoning": "same", "pass": true, "failure_mode": "none"}"#).unwrap();
        assert!(v.pass && v.failure_mode.is_none());
        let v = r.read_verdict("```json\n{\"reasoning\": \"\", \"pass\": false, \"failure_mode\": \"wrong_fact\"}\n```").unwrap();
        assert_eq!(v.failure_mode.as_deref(), Some("wrong_fact"));
        assert_eq!(r.read_verdict(r#"{"reasoning": "", "pass": false, "failure_mode": "other"}"#).unwrap().failure_mode.as_deref(), Some("unspecified"));
        assert!(r.read_verdict(r#"{"reasoning": "cut off"#).unwrap_err().starts_with("not JSON"));
        assert_eq!(r.read_verdict(r#"{"reasoning": "", "pass": "yes"}"#).unwrap_err(), "no boolean `pass`");
    }

    #[test]
    fn messages_hold_rubric_examples_and_the_answer() {
        let r = rubric(RUBRIC).unwrap();
        let input = json!({"question": "What is 2 + 2?"}).as_object().unwrap().clone();
        let m = r.messages(&[], &input, Some("4"), "Four.").unwrap();
        assert_eq!(m.len(), 4);
        assert!(m[0].content.contains("- wrong_fact: states a different fact"));
        assert_eq!(m[2].content, r#"{"reasoning":"Lyon is not Paris.","pass":false,"failure_mode":"wrong_fact"}"#);
        assert_eq!(m[3].content, "Question: What is 2 + 2?\nReference: 4\nAnswer: Four.");
        let schema = r.verdict_schema();
        assert_eq!(schema["properties"]["failure_mode"]["enum"], json!(["none", "no_answer", "wrong_fact"]));
    }

    #[test]
    fn rubric_problems_are_located() {
        let bad = RUBRIC.replace("failure_mode = \"wrong_fact\"", "failure_mode = \"wrong\"");
        let e = rubric(&bad).unwrap_err();
        assert!(e[0].render(false).contains("`wrong` is not one of `failure_modes`: no_answer, wrong_fact"), "{}", e[0].render(false));
        let e = rubric(&RUBRIC.replace("input.question", "input.question | nosuchfilter")).unwrap_err();
        assert!(e[0].render(false).contains("template"), "{}", e[0].render(false));
        let e = rubric(&RUBRIC.replace("Question: {{ input.question }}", "Q: {{ input.topic }}")).unwrap_err();
        assert!(e[0].render(false).contains("cannot render this example"), "{}", e[0].render(false));
        let e = rubric("task = 3").unwrap_err();
        assert!(e[0].render(false).contains("r.toml:1:8"), "{}", e[0].render(false));
    }

    #[test]
    fn a_label_becomes_an_example_only_with_a_rubric_failure_mode() {
        let r = rubric(RUBRIC).unwrap();
        let sample: Sample = serde_json::from_value(json!({"id": "q1", "split": "dev", "label": "Paris", "fields": {"question": "Capital of France?"}})).unwrap();
        let label = |pass: bool, mode: Option<&str>, note: Option<&str>| Label {
            id: "q1".into(),
            model: "m".into(),
            answer: "Lyon.".into(),
            pass,
            failure_mode: mode.map(str::to_string),
            note: note.map(str::to_string),
        };
        let ex = Example::from_label(&label(false, Some("wrong_fact"), Some(&"x".repeat(500))), &sample, &r).unwrap();
        assert_eq!((ex.pass, ex.failure_mode.as_deref(), ex.reasoning.len()), (false, Some("wrong_fact"), 160));
        assert_eq!((ex.reference.as_deref(), &ex.input["question"]), (Some("Paris"), &json!("Capital of France?")));
        assert!(Example::from_label(&label(false, None, None), &sample, &r).is_none(), "a fail with no mode");
        assert!(Example::from_label(&label(false, Some("other"), None), &sample, &r).is_none(), "a mode the rubric lacks");
        let ex = Example::from_label(&label(true, Some("wrong_fact"), None), &sample, &r).unwrap();
        assert_eq!((ex.failure_mode.as_deref(), ex.reasoning.as_str()), (None, "People judged this answer a pass."));
        let m = r.messages(&[ex], &sample.fields, Some("Paris"), "Paris.").unwrap();
        assert_eq!(m.len(), 6, "system, the rubric's example, the label's example, the answer");
        assert_eq!(m[3].content, "Question: Capital of France?\nReference: Paris\nAnswer: Lyon.");
    }

    #[test]
    fn labels_are_read_with_line_numbers() {
        let ok = "{\"id\": \"q1\", \"model\": \"m\", \"answer\": \"Paris\", \"pass\": true}\n\n{\"id\": \"q1\", \"model\": \"m\", \"answer\": \"Paris\", \"pass\": false, \"note\": \"second look\"}\n";
        let labels = parse_labels(&SourceFile::new("l.jsonl", ok), "judge").unwrap();
        assert_eq!(labels.len(), 1);
        assert!(!labels[&("q1".to_string(), "m".to_string())].pass);
        let e = parse_labels(&SourceFile::new("l.jsonl", "{\"id\": \"q1\"}\n{\"id\": \"q2\", \"model\": \"m\", \"answer\": \"x\", \"pass\": \"no\"}\n"), "judge").unwrap_err();
        assert_eq!(e.len(), 2);
        assert!(e[1].render(false).contains("l.jsonl:2:"), "{}", e[1].render(false));
    }
}
