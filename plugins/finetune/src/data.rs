//! `training_data`: what a model is taught, built from the **dev split only**.
//!
//! Supervised examples: each dev sample as rendered, answered with its gold answer (its label, or
//! `answer_field`), or, for a sample without one, with an answer a person labeled as passing.
//! Preference pairs: an answer that failed (a candidate's, from `cluster`'s failure modes, or one a
//! person labeled as failing) against the wanted one. Held-out samples are never read: they decide
//! whether a trained model learned the task. `finetune` trains on the set; `pipeline export`
//! writes it as JSONL for hosted fine-tuning.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;

use artifacts::facts::DatasetFacts;
use artifacts::{AnswerSource, Answers, Artifact, Clusters, Dataset, Message, PreferencePair, Rendered, SftExample, Split, TrainingSet};
use engine::diag::{Diagnostic, SourceFile};
use engine::{BuildContext, FileRef, Item, Port, Stage, StageError, StageInput, StagePlugin};
use llm_judge::Label;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub struct TrainingData;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainingDataConfig {
    /// The sample field holding the wanted answer (default: the dataset's label).
    pub answer_field: Option<String>,
    /// People's pass/fail labels (JSONL, as `pipeline review` writes them): a passing answer
    /// teaches a dev sample that has no gold answer; a failing one is the rejected side of a
    /// preference pair.
    #[schemars(with = "Option<String>")]
    pub labels: Option<FileRef>,
    /// Preference pairs from these candidates' failed answers only (default: every candidate in
    /// the `cluster` stage's failure modes).
    pub rejected_from: Option<Vec<String>>,
}

struct TrainingDataStage {
    config: TrainingDataConfig,
    /// The labels file as read at build time (checked line by line there).
    labels: Option<(FileRef, String)>,
    /// Where `answer_field` is written (for `validate`'s error).
    at: Range<usize>,
}

impl StagePlugin for TrainingData {
    type Config = TrainingDataConfig;
    const KIND: &'static str = "training_data";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "supervised examples and preference pairs from the dev split (gold answers, people's labels, failed answers), for finetune and `pipeline export`";
    const INPUTS: &'static [Port] = &[
        Port::new("dataset", Dataset::TYPE),
        Port::new("rendered", Rendered::TYPE),
        Port::optional("answers", Answers::TYPE),
        Port::optional("failures", Clusters::TYPE),
    ];
    const OUTPUT: &'static str = TrainingSet::TYPE;

    fn build(config: TrainingDataConfig, cx: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        let labels = match &config.labels {
            None => None,
            Some(file) => {
                let source = llm_judge::read_source(cx, file)?;
                llm_judge::read_labels(&source, &format!("stage `{}`", cx.stage_id))?;
                Some((file.clone(), cx.display_path(file).to_string_lossy().into_owned()))
            }
        };
        if config.rejected_from.as_ref().is_some_and(Vec::is_empty) {
            return Err(vec![cx.error_at(cx.key("rejected_from"), "`rejected_from` is empty: name the candidates whose failed answers become preference pairs, or leave it out for all", "empty")]);
        }
        let at = cx.key("answer_field").unwrap_or_else(|| cx.stage_span());
        Ok(Arc::new(TrainingDataStage { config, labels, at }))
    }
}

impl Stage for TrainingDataStage {
    fn check_inputs(&self, pipeline: &SourceFile, facts: &BTreeMap<String, Value>) -> Vec<Diagnostic> {
        let (Some(field), Some(dataset)) = (self.config.answer_field.as_deref(), artifacts::facts::read::<DatasetFacts>(facts.get("dataset"))) else {
            return Vec::new();
        };
        if dataset.fields.contains(field) {
            return Vec::new();
        }
        let fields: Vec<&str> = dataset.fields.iter().map(String::as_str).collect();
        let d = Diagnostic::error(format!("`answer_field = \"{field}\"`: no sample of the dataset has that field, so there is no answer to teach"))
            .at(pipeline, self.at.clone(), "no sample has it");
        vec![d.suggest(field, &fields, "the samples have")]
    }

    fn finish(&self, input: &StageInput, _: Vec<(Item, Value)>) -> Result<Value, StageError> {
        let dataset: Dataset = input.read("dataset")?;
        let rendered: Rendered = input.read("rendered")?;
        let answers: Option<Answers> = input.read_optional("answers")?;
        let failures: Option<Clusters> = input.read_optional("failures")?;
        let labels = match &self.labels {
            None => Vec::new(),
            Some((file, shown)) => {
                let text = String::from_utf8_lossy(input.file(file)?).into_owned();
                llm_judge::read_labels(&SourceFile::new(shown.as_str(), text), "labels").map_err(|_| StageError::new(format!("`{shown}` changed since it was checked")))?
            }
        };
        if failures.is_some() && answers.is_none() {
            return Err(StageError::new("failure modes are in `needs` but no `answers`: the failed answers' texts come from the `infer` stage; add it to `needs`"));
        }
        let set = build_set(&dataset, &rendered, self.config.answer_field.as_deref(), &labels, failures.as_ref().zip(answers.as_ref()), self.config.rejected_from.as_deref())
            .map_err(StageError::new)?;
        Ok(set.to_json())
    }
}

/// The set from its sources. Only dev samples are read, whatever the inputs hold.
pub fn build_set(
    dataset: &Dataset,
    rendered: &Rendered,
    answer_field: Option<&str>,
    labels: &[Label],
    failed: Option<(&Clusters, &Answers)>,
    rejected_from: Option<&[String]>,
) -> Result<TrainingSet, String> {
    let messages: BTreeMap<&str, &Vec<Message>> = rendered.samples.iter().map(|s| (s.id.as_str(), &s.messages)).collect();
    let dev: Vec<_> = dataset.split(Split::Dev).collect();
    let is_dev: BTreeSet<&str> = dev.iter().map(|s| s.id.as_str()).collect();
    let gold = |sample: &artifacts::Sample| -> Option<String> {
        match answer_field {
            None => sample.label.clone(),
            Some(field) => sample.fields.get(field).map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            }),
        }
    };
    // People's labels of dev samples; the last label of an answer wins (as in `llm_judge`).
    let mut by_answer: BTreeMap<(&str, &str, &str), &Label> = BTreeMap::new();
    for l in labels.iter().filter(|l| is_dev.contains(l.id.as_str())) {
        by_answer.insert((&l.id, &l.model, &l.answer), l);
    }
    let passing: BTreeMap<&str, &str> = by_answer.values().filter(|l| l.pass).map(|l| (l.id.as_str(), l.answer.as_str())).collect();

    let mut sft = Vec::new();
    let mut wanted: BTreeMap<&str, (String, AnswerSource)> = BTreeMap::new();
    let mut unanswered = 0;
    for sample in &dev {
        let Some(messages) = messages.get(sample.id.as_str()) else {
            return Err(format!("dev sample `{}` is not rendered: the `render` stage in `needs` must render the dev split", sample.id));
        };
        let (answer, source) = match (gold(sample), passing.get(sample.id.as_str())) {
            (Some(g), _) => (g, AnswerSource::Gold),
            (None, Some(p)) => (p.to_string(), AnswerSource::Label),
            (None, None) => {
                unanswered += 1;
                continue;
            }
        };
        wanted.insert(&sample.id, (answer.clone(), source));
        sft.push(SftExample { id: sample.id.clone(), messages: (*messages).clone(), answer, source });
    }
    if sft.is_empty() {
        return Err(match answer_field {
            Some(field) => format!("no dev sample has a `{field}` to learn, and no person labeled an answer of one as passing"),
            None => "no dev sample has a label to learn (set the dataset's `label`, or `answer_field`), and no person labeled an answer of one as passing".into(),
        });
    }

    let mut dpo = Vec::new();
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    let mut pair = |id: &str, model: &str, rejected: &str, failure_mode: Option<String>, dpo: &mut Vec<PreferencePair>| {
        let Some((chosen, chosen_source)) = wanted.get(id) else { return };
        if rejected.trim() == chosen.trim() || !seen.insert((id.to_string(), rejected.to_string())) {
            return;
        }
        dpo.push(PreferencePair {
            id: id.to_string(),
            messages: messages[id].clone(),
            chosen: chosen.clone(),
            chosen_source: *chosen_source,
            rejected: rejected.to_string(),
            model: model.to_string(),
            failure_mode,
        });
    };
    if let Some((clusters, answers)) = failed {
        for (model, modes) in &clusters.models {
            if rejected_from.is_some_and(|only| !only.contains(model)) {
                continue;
            }
            let Some(model_answers) = answers.models.get(model) else {
                return Err(format!("candidate `{model}` has failure modes but no answers in the `answers` input"));
            };
            let text: BTreeMap<&str, &str> = model_answers.answers.iter().map(|a| (a.id.as_str(), a.text.as_str())).collect();
            for mode in &modes.clusters {
                for id in mode.members.iter().filter(|id| is_dev.contains(id.as_str())) {
                    if let Some(rejected) = text.get(id.as_str()) {
                        pair(id, model, rejected, Some(mode.id.clone()), &mut dpo);
                    }
                }
            }
        }
        if let Some(only) = rejected_from
            && let Some(missing) = only.iter().find(|m| !clusters.models.contains_key(*m))
        {
            let known: Vec<&str> = clusters.models.keys().map(String::as_str).collect();
            return Err(format!("`rejected_from` names `{missing}`, which has no failure modes here (candidates: {})", known.join(", ")));
        }
    }
    for l in by_answer.values().filter(|l| !l.pass) {
        pair(&l.id, &l.model, &l.answer, l.failure_mode.clone(), &mut dpo);
    }
    dpo.sort_by(|a, b| (a.id.as_str(), a.model.as_str(), a.rejected.as_str()).cmp(&(b.id.as_str(), b.model.as_str(), b.rejected.as_str())));

    let from_labels = sft.iter().filter(|e| e.source == AnswerSource::Label).count();
    let mut summary = format!("{} supervised examples from {} dev samples", sft.len(), dev.len());
    if from_labels > 0 {
        summary += &format!(" ({from_labels} answered by people's passing labels)");
    }
    if unanswered > 0 {
        summary += &format!(", {unanswered} without an answer to learn");
    }
    summary += &format!("; {} preference pairs", dpo.len());
    Ok(TrainingSet { sft, dpo, summary })
}

/// One line of a hosted fine-tuning API's supervised format: the conversation, answered.
pub fn sft_line(e: &SftExample) -> Value {
    let mut messages: Vec<Value> = e.messages.iter().map(message).collect();
    messages.push(serde_json::json!({"role": "assistant", "content": e.answer}));
    serde_json::json!({ "messages": messages })
}

/// One line of a hosted fine-tuning API's preference (DPO) format.
pub fn dpo_line(p: &PreferencePair) -> Value {
    serde_json::json!({
        "input": { "messages": p.messages.iter().map(message).collect::<Vec<_>>() },
        "preferred_output": [{"role": "assistant", "content": p.chosen}],
        "non_preferred_output": [{"role": "assistant", "content": p.rejected}],
    })
}

fn message(m: &Message) -> Value {
    serde_json::json!({"role": m.role, "content": m.content})
}

#[cfg(test)]
mod tests {
    use super::*;
    use artifacts::{Answer, AnswerTiming, FailureMode, ModelAnswers, ModelClusters, ModelTiming, Pin, RenderedSample, Sample, SplitCounts};
    use serde_json::json;

    fn sample(id: &str, split: Split, label: Option<&str>) -> Sample {
        Sample { id: id.into(), split, label: label.map(String::from), fields: serde_json::Map::from_iter([("text".to_string(), json!(format!("text of {id}")))]) }
    }

    fn fixture() -> (Dataset, Rendered) {
        let dataset = Dataset {
            label_field: Some("label".into()),
            counts: SplitCounts { dev: 3, heldout: 2 },
            samples: vec![
                sample("a", Split::Dev, Some("x")),
                sample("b", Split::Heldout, Some("y")),
                sample("c", Split::Dev, Some("z")),
                sample("d", Split::Heldout, Some("w")),
                sample("e", Split::Dev, None),
            ],
        };
        let rendered = Rendered {
            prompt: "p".into(),
            samples: ["a", "b", "c", "d", "e"].iter().map(|id| RenderedSample { id: id.to_string(), messages: vec![Message::new("user", format!("say {id}"))], tools: None }).collect(),
        };
        (dataset, rendered)
    }

    fn label(id: &str, answer: &str, pass: bool) -> Label {
        Label { id: id.into(), model: "m".into(), answer: answer.into(), pass, failure_mode: None, note: None }
    }

    fn failed_answers(ids: &[&str]) -> (Clusters, Answers) {
        let mode = FailureMode {
            id: "no_label".into(),
            name: "n".into(),
            description: String::new(),
            fix_hypothesis: String::new(),
            size: ids.len(),
            members: ids.iter().map(|s| s.to_string()).collect(),
            examples: Vec::new(),
            parent: None,
            silhouette: None,
            named_by: None,
            signature_name: None,
            llm_fix_hypothesis: None,
            naming: None,
        };
        let clusters = Clusters {
            split: Split::Dev,
            labels: Vec::new(),
            models: BTreeMap::from([("m".to_string(), ModelClusters { dev_samples: 3, dev_failures: ids.len(), clusters: vec![mode] })]),
            embeddings: None,
            named_by: None,
        };
        let answers = ids
            .iter()
            .map(|id| Answer {
                id: id.to_string(),
                text: format!("wrong {id}"),
                finish_reason: "stop".into(),
                prompt_tokens: 1,
                completion_tokens: 1,
                timing: AnswerTiming { latency_ms: 1.0, prefill_ms: None, decode_ms: None },
                transport: None,
                reasoning: None,
                reasoning_tokens: None,
                tool_calls: None,
            })
            .collect();
        let timing = ModelTiming { latency_p50_ms: 1.0, latency_p95_ms: 1.0, decode_tokens_per_s: None, busy_s: None, tokens_per_s: None };
        let answers = Answers {
            sampler: Value::Null,
            prepare: Value::Null,
            models: BTreeMap::from([("m".to_string(), ModelAnswers { pin: Pin::default(), answers, timing, transport: None, reasoning: None, repeats: Vec::new() })]),
            output: None,
            repeats: None,
        };
        (clusters, answers)
    }

    #[test]
    fn held_out_samples_never_train() {
        let (dataset, rendered) = fixture();
        // Every source names held-out samples too: labels, failure modes, answers.
        let labels = [label("b", "y", true), label("d", "nope", false), label("e", "taught", true), label("a", "bad a", false)];
        let (clusters, answers) = failed_answers(&["a", "b", "d"]);
        let set = build_set(&dataset, &rendered, None, &labels, Some((&clusters, &answers)), None).unwrap();
        let ids = |v: Vec<&str>| v.into_iter().map(String::from).collect::<Vec<_>>();
        assert_eq!(set.sft.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), ids(vec!["a", "c", "e"]));
        assert_eq!(set.sft.iter().map(|e| (e.answer.as_str(), e.source)).collect::<Vec<_>>(), [("x", AnswerSource::Gold), ("z", AnswerSource::Gold), ("taught", AnswerSource::Label)]);
        assert_eq!(set.sft[0].messages[0].content, "say a");
        assert_eq!(set.dpo.iter().map(|p| (p.id.as_str(), p.chosen.as_str(), p.rejected.as_str())).collect::<Vec<_>>(), [("a", "x", "bad a"), ("a", "x", "wrong a")]);
        assert!(set.dpo.iter().chain([]).all(|p| dataset.by_id()[p.id.as_str()].split == Split::Dev));
        assert_eq!(set.summary, "3 supervised examples from 3 dev samples (1 answered by people's passing labels); 2 preference pairs");

        // By another field; rendering only the held-out split leaves nothing to train on: an
        // error, not a silent switch to the held-out samples.
        let by_field = build_set(&dataset, &rendered, Some("text"), &[], None, None).unwrap();
        assert_eq!(by_field.sft[1].answer, "text of c");
        let heldout_only = Rendered { prompt: "p".into(), samples: rendered.samples[1..2].to_vec() };
        assert!(build_set(&dataset, &heldout_only, None, &[], None, None).unwrap_err().contains("dev sample `a` is not rendered"));
        assert!(build_set(&dataset, &rendered, Some("nope"), &[], None, None).unwrap_err().contains("no dev sample has a `nope`"));
        assert!(build_set(&dataset, &rendered, None, &[], Some((&clusters, &answers)), Some(&["other".to_string()])).unwrap_err().contains("`other`"));
    }

    #[test]
    fn exports_take_the_hosted_apis_shapes() {
        let (dataset, rendered) = fixture();
        let (clusters, answers) = failed_answers(&["c"]);
        let set = build_set(&dataset, &rendered, None, &[], Some((&clusters, &answers)), None).unwrap();
        assert_eq!(sft_line(&set.sft[0]), json!({"messages": [{"role": "user", "content": "say a"}, {"role": "assistant", "content": "x"}]}));
        assert_eq!(
            dpo_line(&set.dpo[0]),
            json!({
                "input": {"messages": [{"role": "user", "content": "say c"}]},
                "preferred_output": [{"role": "assistant", "content": "z"}],
                "non_preferred_output": [{"role": "assistant", "content": "wrong c"}],
            })
        );
    }
}
