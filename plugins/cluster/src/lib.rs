//! `cluster`: one candidate's failures grouped into failure modes, cheapest signal first.
//!
//! Every failed verdict gets one signature, checked in this order: `empty` (no text),
//! `repetition` (a word sequence looping), `truncated` (cut at `max_tokens` without naming a
//! label), `no_label` (names no label), and otherwise the confusion cell `confused:GOLD→PREDICTED`
//! — or, for an `llm_judge` judgement, `judge:MODE`, the rubric's failure mode the judge chose
//! (named, described and given a fix hypothesis by the rubric).
//! A failure mode is the set of failures sharing a signature, so its id is the signature itself
//! and stays the same across iterations. Each mode is named and described for people, with a fix
//! hypothesis the `revise` stage acts on, and a few member examples. Modes are ordered by size.
//!
//! Only the dev split is clustered: the held-out split stays unseen by revision.

use std::collections::BTreeMap;
use std::sync::Arc;

use engine::diag::Diagnostic;
use engine::{BuildContext, Item, Port, Stage, StageError, StageInput, StagePlugin};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub struct Cluster;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Examples kept per failure mode.
    #[serde(default = "default_examples")]
    pub examples: usize,
}

fn default_examples() -> usize {
    3
}

impl StagePlugin for Cluster {
    type Config = ClusterConfig;
    const KIND: &'static str = "cluster";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "failures on the dev split grouped into named failure modes (empty, repetition, truncated, no label, confusions)";
    const INPUTS: &'static [Port] = &[Port::new("judgement", "judgement"), Port::new("answers", "answers")];
    const OUTPUT: &'static str = "clusters";

    fn build(config: ClusterConfig, cx: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        if config.examples == 0 || config.examples > 50 {
            return Err(vec![cx.error_at(None, format!("`examples` must be 1 to 50, not {}", config.examples), "")]);
        }
        Ok(Arc::new(ClusterStage(config)))
    }
}

struct ClusterStage(ClusterConfig);

#[async_trait::async_trait]
impl Stage for ClusterStage {
    fn finish(&self, input: &StageInput, _: Vec<(Item, Value)>) -> Result<Value, StageError> {
        let judgement = input.input("judgement")?;
        let answers = input.input("answers")?;
        let labels: Vec<&str> = judgement["labels"].as_array().map_or(Vec::new(), |l| l.iter().filter_map(Value::as_str).collect());
        let mut models = serde_json::Map::new();
        for (model, j) in judgement["models"].as_object().ok_or_else(|| StageError::new("the judgement has no `models`"))? {
            let finish: BTreeMap<&str, &str> = answers["models"][model]["answers"]
                .as_array()
                .map_or(BTreeMap::new(), |a| a.iter().filter_map(|x| Some((x["id"].as_str()?, x["finish_reason"].as_str().unwrap_or_default()))).collect());
            let mut modes: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
            let dev: Vec<&Value> = j["verdicts"].as_array().map_or(Vec::new(), |v| v.iter().filter(|v| v["split"] == "dev").collect());
            for v in dev.iter().filter(|v| v["pass"] == false) {
                let id = v["id"].as_str().unwrap_or_default();
                modes.entry(signature(v, finish.get(id).copied().unwrap_or_default())).or_default().push(v);
            }
            let mut list: Vec<Value> = modes
                .into_iter()
                .map(|(sig, members)| {
                    let (name, description, fix) = match sig.strip_prefix("judge:") {
                        Some(mode) => {
                            let m = &judgement["failure_modes"][mode];
                            let text = |k: &str| m[k].as_str().map_or_else(|| format!("failures the judge filed under `{mode}`"), str::to_string);
                            (mode.replace('_', " "), text("description"), text("fix"))
                        }
                        None => describe(&sig, &labels),
                    };
                    json!({
                        "id": sig,
                        "name": name,
                        "description": description,
                        "fix_hypothesis": fix,
                        "size": members.len(),
                        "members": members.iter().map(|m| &m["id"]).collect::<Vec<_>>(),
                        "examples": members.iter().take(self.0.examples).map(|m| json!({"id": m["id"], "label": m["label"], "answer": m["answer"]})).collect::<Vec<_>>(),
                    })
                })
                .collect();
            list.sort_by(|a, b| b["size"].as_u64().cmp(&a["size"].as_u64()).then_with(|| a["id"].as_str().cmp(&b["id"].as_str())));
            let failed: usize = list.iter().filter_map(|c| c["size"].as_u64()).sum::<u64>() as usize;
            models.insert(model.clone(), json!({"dev_samples": dev.len(), "dev_failures": failed, "clusters": list}));
        }
        Ok(json!({"split": "dev", "labels": labels, "models": models}))
    }
}

/// The failure mode of one failed verdict.
fn signature(verdict: &Value, finish_reason: &str) -> String {
    let answer = verdict["answer"].as_str().unwrap_or_default().trim();
    let predicted = verdict["predicted"].as_str();
    if answer.is_empty() {
        return "empty".into();
    }
    if repeats(answer) {
        return "repetition".into();
    }
    // An LLM judge filed it under one of its rubric's failure modes.
    if let Some(mode) = verdict["failure_mode"].as_str() {
        return format!("judge:{mode}");
    }
    match predicted {
        None if finish_reason == "length" => "truncated".into(),
        None => "no_label".into(),
        Some(p) => format!("confused:{}→{p}", verdict["label"].as_str().unwrap_or_default()),
    }
}

/// A sequence of 1 to 4 words repeated at least three times in a row.
fn repeats(text: &str) -> bool {
    let words: Vec<&str> = text.split_whitespace().collect();
    (1..=4).any(|n| {
        words.len() >= 3 * n && (0..=words.len() - 3 * n).any(|i| (1..3).all(|k| words[i..i + n] == words[i + k * n..i + (k + 1) * n]))
    })
}

/// Name, description and fix hypothesis of a failure mode.
fn describe(signature: &str, labels: &[&str]) -> (String, String, String) {
    let options = labels.iter().map(|l| format!("`{l}`")).collect::<Vec<_>>().join(", ");
    match signature {
        "empty" => ("empty answer".into(), "The model answered nothing.".into(), format!("Say that the answer must be exactly one of {options}.")),
        "repetition" => (
            "repetition loop".into(),
            "The answer repeats the same words over and over.".into(),
            format!("Ask for a single word from {options} and nothing else."),
        ),
        "truncated" => (
            "rambling, cut off".into(),
            "The model wrote prose and ran out of tokens before naming a label.".into(),
            format!("Ask for the label first and alone: one word from {options}."),
        ),
        "no_label" => (
            "names no label".into(),
            "The answer does not name any of the labels.".into(),
            format!("List the labels and require the answer to be exactly one of {options}."),
        ),
        other => {
            let cell = other.trim_start_matches("confused:");
            let (gold, predicted) = cell.split_once('→').unwrap_or((cell, ""));
            (
                format!("{gold} read as {predicted}"),
                format!("Tickets whose intent is `{gold}` were labeled `{predicted}`."),
                format!("State what distinguishes `{gold}` from `{predicted}`, with an example of each."),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_gets_one_signature() {
        let v = |answer: &str, label: &str, predicted: Option<&str>| json!({"answer": answer, "label": label, "predicted": predicted});
        assert_eq!(signature(&v("  ", "billing", None), "stop"), "empty");
        assert_eq!(signature(&v("the the the the", "billing", None), "length"), "repetition");
        assert_eq!(signature(&v("refund please refund please refund please", "billing", Some("refund")), "stop"), "repetition");
        assert_eq!(signature(&v("The intent of this ticket is", "billing", None), "length"), "truncated");
        assert_eq!(signature(&v("I am not sure.", "billing", None), "stop"), "no_label");
        assert_eq!(signature(&v("refund", "billing", Some("refund")), "stop"), "confused:billing→refund");
        let judged = json!({"answer": "Lyon is the capital.", "label": "Paris", "failure_mode": "wrong_fact"});
        assert_eq!(signature(&judged, "stop"), "judge:wrong_fact");
        assert!(!repeats("a b a b c"));
        assert!(repeats("go go go"));
    }
}
