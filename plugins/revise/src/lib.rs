//! `revise`: a new prompt version aimed at the largest failure modes, accepted only when the
//! held-out split says it helped.
//!
//! Revision is deterministic: for each of the largest failure modes of the candidate being
//! improved (the judge's best), the rules section of the system message gains an instruction
//! (for a confusion: do not answer the wrong label for samples like the example; for answers
//! naming no label: answer with exactly one label), a positive example (a dev sample of the mode
//! with its gold answer) and a negative
//! one (the model's actual wrong answer, and what it should have been). Examples come from the dev
//! split only, never from held-out samples.
//!
//! Acceptance: the revised prompt is fed back (`[iterate]`), runs, is judged, and comes back here
//! carrying its parent's held-out verdicts. An exact one-sided McNemar test on the held-out pairs
//! (parent passed / revision passed) must reject "no improvement" at `alpha`, with at least
//! `min_gain` more passes than failures among the discordant pairs. Otherwise the parent prompt is
//! restored and the modes it targeted are not tried again; when no untried mode is left, the
//! prompt stops changing and the loop ends as converged. `accepted` in the output holds the
//! held-out quality of the version in force, which `select` decides on; `metrics.improved` (1 or 0,
//! once a revision has been judged) is what `[iterate] patience` counts.
//!
//! For an `llm_judge` judgement the rule for a failure mode is the rubric's own fix for it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use engine::diag::{Diagnostic, SourceFile};
use engine::{BuildContext, Item, Port, Stage, StageError, StageInput, StagePlugin};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub struct Revise;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReviseConfig {
    /// Dataset field holding the text shown in examples.
    #[serde(default = "default_input_field")]
    pub input_field: String,
    /// Failure modes targeted per revision (largest first).
    #[serde(default = "default_max_clusters")]
    pub max_clusters: usize,
    /// Significance level of the acceptance test.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Net held-out passes gained (discordant wins minus losses) a revision needs.
    #[serde(default = "default_min_gain")]
    pub min_gain: u32,
}

fn default_input_field() -> String {
    "text".into()
}
fn default_max_clusters() -> usize {
    3
}
fn default_alpha() -> f64 {
    0.05
}
fn default_min_gain() -> u32 {
    1
}

impl StagePlugin for Revise {
    type Config = ReviseConfig;
    const KIND: &'static str = "revise";
    const VERSION: u32 = 6;
    const SUMMARY: &'static str = "a new prompt version aimed at the largest failure modes (dev examples), kept only if held-out quality improves (McNemar)";
    const INPUTS: &'static [Port] = &[
        Port::new("prompt", "prompt"),
        Port::new("clusters", "clusters"),
        Port::new("judgement", "judgement"),
        Port::new("dataset", "dataset"),
    ];
    const OUTPUT: &'static str = "prompt";

    fn build(config: ReviseConfig, cx: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        let mut errors = Vec::new();
        if !(config.alpha > 0.0 && config.alpha < 1.0) {
            errors.push(cx.error_at(cx.key("alpha"), format!("`alpha` must be between 0 and 1, not {}", config.alpha), ""));
        }
        if config.max_clusters == 0 || config.max_clusters > 20 {
            errors.push(cx.error_at(cx.key("max_clusters"), format!("`max_clusters` must be 1 to 20, not {}", config.max_clusters), ""));
        }
        let field_span = cx.key("input_field").unwrap_or_else(|| cx.stage_span());
        if errors.is_empty() { Ok(Arc::new(ReviseStage(config, field_span))) } else { Err(errors) }
    }
}

/// The config, and where `input_field` is written (the stage's header when it is the default).
struct ReviseStage(ReviseConfig, std::ops::Range<usize>);

#[async_trait::async_trait]
impl Stage for ReviseStage {
    /// `input_field` is a field some sample of the dataset has.
    fn check_inputs(&self, pipeline: &SourceFile, facts: &BTreeMap<String, Value>) -> Vec<Diagnostic> {
        let Some(fields) = facts.get("dataset").and_then(|f| f["fields"].as_array()) else { return Vec::new() };
        let fields: Vec<&str> = fields.iter().filter_map(Value::as_str).collect();
        let field = self.0.input_field.as_str();
        if fields.contains(&field) {
            return Vec::new();
        }
        let d = Diagnostic::error(format!("`input_field = \"{field}\"`: no sample of the dataset has that field, so revisions would show no examples"))
            .at(pipeline, self.1.clone(), "examples are shown from this field");
        vec![match engine::diag::did_you_mean(field, fields.iter().copied()) {
            Some(s) => d.help(format!("did you mean `{s}`? the samples have {}", engine::diag::one_of(&fields))),
            None => d.help(format!("set `input_field` to one of {}", engine::diag::one_of(&fields))),
        }]
    }

    fn metrics(&self) -> Option<&'static [&'static str]> {
        Some(&["improved"])
    }

    fn finish(&self, input: &StageInput, _: Vec<(Item, Value)>) -> Result<Value, StageError> {
        let prompt = input.input("prompt")?;
        let clusters = input.input("clusters")?;
        let judgement = input.input("judgement")?;
        let dataset = input.input("dataset")?;
        let model = judgement["best"].as_str().ok_or_else(|| StageError::new("the judgement names no best candidate"))?;
        let heldout: BTreeMap<String, bool> = judgement["models"][model]["verdicts"]
            .as_array()
            .map_or(BTreeMap::new(), |v| v.iter().filter(|v| v["split"] == "heldout").filter_map(|v| Some((v["id"].as_str()?.to_string(), v["pass"].as_bool()?))).collect());
        let revision = &prompt["revision"];
        let version = revision["version"].as_u64().unwrap_or(1);
        let mut tried: BTreeSet<String> = revision["tried"].as_array().map_or(BTreeSet::new(), |t| t.iter().filter_map(|s| s.as_str().map(str::to_string)).collect());
        let mut history: Vec<Value> = revision["history"].as_array().cloned().unwrap_or_default();

        // Judge the revision this prompt is, if it is one.
        let (mut base, mut accepted_check) = ((prompt["system"].clone(), prompt["template"].clone()), Value::Null);
        if let Some(parent) = revision["parent"].as_object() {
            let test = mcnemar(&parent_verdicts(parent), &heldout);
            let accepted = test.wins > test.losses && test.wins - test.losses >= self.0.min_gain as usize && test.p_value < self.0.alpha;
            let parent_heldout = parent_verdicts(parent);
            let pairs: Vec<(bool, bool)> = heldout.iter().filter_map(|(id, after)| Some((*parent_heldout.get(id)?, *after))).collect();
            // How far the held-out accuracy moved, with a paired bootstrap interval.
            let moved = judge::paired_difference(&pairs, 1000, input.seed);
            accepted_check = json!({
                "version": version,
                "accepted": accepted,
                "wins": test.wins,
                "losses": test.losses,
                "p_value": judge::round(test.p_value),
                "heldout_delta": moved["value"],
                "heldout_delta_ci95": moved["ci95"],
            });
            history.push(accepted_check.clone());
            if !accepted {
                base = (parent["system"].clone(), parent["template"].clone());
            }
        }
        let rejected = accepted_check["accepted"] == false;
        let accepted_heldout = if rejected { parent_verdicts(revision["parent"].as_object().expect("checked above")) } else { heldout.clone() };
        // The quality of the prompt version in force (what `select` should decide on): this
        // one's, unless it was just rejected.
        let accepted = if rejected {
            revision["parent"]["accepted"].clone()
        } else {
            let models: serde_json::Map<String, Value> = judgement["models"]
                .as_object()
                .map_or(serde_json::Map::new(), |m| m.iter().map(|(id, j)| (id.clone(), json!(judge::quality(j).1))).collect());
            json!({"version": version, "models": models})
        };

        let dev: Vec<&Value> = dataset["samples"].as_array().map_or(Vec::new(), |s| s.iter().filter(|s| s["split"] == "dev").collect());
        let field = &self.0.input_field;
        if let Some(first) = dev.first()
            && dev.iter().all(|s| s["fields"].get(field).is_none())
        {
            let present: BTreeSet<&str> = first["fields"].as_object().map_or(BTreeSet::new(), |f| f.keys().map(String::as_str).collect());
            return Err(StageError::new(format!(
                "no dev sample has the field `{field}` that examples are shown from (`input_field`); the samples have {}",
                present.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ")
            )));
        }
        let texts: BTreeMap<&str, &str> = dev.iter().filter_map(|s| Some((s["id"].as_str()?, s["fields"][field].as_str()?))).collect();
        let modes: Vec<&Value> = clusters["models"][model]["clusters"]
            .as_array()
            .map_or(Vec::new(), |c| c.iter().filter(|c| !tried.contains(c["id"].as_str().unwrap_or_default())).take(self.0.max_clusters).collect());
        let (system, template) = base;
        let mut out = json!({"source": prompt["source"], "system": system, "template": template});
        // Progress for `[iterate] patience`: whether the revision judged here was accepted.
        if let Some(accepted) = accepted_check["accepted"].as_bool() {
            out["metrics"] = json!({"improved": if accepted { 1.0 } else { 0.0 }});
        }
        if modes.is_empty() {
            // Nothing left to try: the prompt stays as it is, and the loop converges.
            out["revision"] = json!({"version": version, "tried": tried, "history": history, "for_model": model});
            out["accepted"] = accepted;
            out["summary"] = json!(match &accepted_check {
                Value::Null => "no failure mode left to target; the prompt stays".to_string(),
                c => format!("{}; no failure mode left to target, the prompt stays", verdict_text(c)),
            });
            return Ok(out);
        }
        let labels: Vec<&str> = clusters["labels"].as_array().map_or(Vec::new(), |l| l.iter().filter_map(Value::as_str).collect());
        // One rule per distinct instruction (the parts of a mode split by embeddings share one),
        // each with the examples of every mode it came from.
        let mut grouped: Vec<(String, Vec<String>)> = Vec::new();
        for mode in &modes {
            let instruction = rule(mode, &labels);
            let at = grouped.iter().position(|(r, _)| *r == instruction).unwrap_or_else(|| {
                grouped.push((instruction, Vec::new()));
                grouped.len() - 1
            });
            if let Some(example) = mode["examples"].as_array().and_then(|e| e.first()) {
                let id = example["id"].as_str().unwrap_or_default();
                let label = example["label"].as_str().unwrap_or_default();
                if let Some(text) = texts.get(id) {
                    grouped[at].1.push(format!("  Example: \"{}\" → {label}\n", clean(text)));
                    grouped[at].1.push(format!("  Wrong: answering \"{}\" to it; the answer is {label}.\n", clean(example["answer"].as_str().unwrap_or_default())));
                }
            }
            tried.insert(mode["id"].as_str().unwrap_or_default().to_string());
        }
        let mut rules = String::from("Rules learned from mistakes:\n");
        for (instruction, examples) in grouped {
            rules.push_str(&format!("- {instruction}\n"));
            rules.extend(examples);
        }
        let base_system = out["system"].as_str().unwrap_or_default().split("{% raw %}Rules learned from mistakes:").next().unwrap_or_default().trim_end().to_string();
        let previous_rules = out["system"].as_str().and_then(|s| s.split_once("{% raw %}Rules learned from mistakes:\n")).map(|(_, r)| r.trim_end_matches("{% endraw %}").to_string()).unwrap_or_default();
        let all_rules = format!("{rules}{previous_rules}");
        let system = if base_system.is_empty() { format!("{{% raw %}}{all_rules}{{% endraw %}}") } else { format!("{base_system}\n\n{{% raw %}}{all_rules}{{% endraw %}}") };
        let targeted: Vec<String> = modes.iter().map(|m| format!("{} ({})", m["id"].as_str().unwrap_or_default(), m["size"])).collect();
        out["summary"] = json!(match &accepted_check {
            Value::Null => format!("revision {} targets {}", version + 1, targeted.join(", ")),
            c => format!("{}; revision {} targets {}", verdict_text(c), version + 1, targeted.join(", ")),
        });
        out["revision"] = json!({
            "version": version + 1,
            "for_model": model,
            "targeted": modes.iter().map(|m| &m["id"]).collect::<Vec<_>>(),
            "tried": tried,
            "history": history,
            "parent": {"system": out["system"], "template": out["template"], "heldout": accepted_heldout, "accepted": accepted},
        });
        out["accepted"] = accepted;
        out["system"] = json!(system);
        Ok(out)
    }
}

/// The instruction to the model for a failure mode (the mode's `fix_hypothesis` is written for
/// people; this is its imperative form).
fn rule(mode: &Value, labels: &[&str]) -> String {
    let id = mode["id"].as_str().unwrap_or_default();
    if id.starts_with("judge:") || labels.is_empty() {
        // A rubric's failure mode: the rubric's own fix, already an instruction.
        return mode["fix_hypothesis"].as_str().unwrap_or("Answer the question directly.").to_string();
    }
    // A mode split by what its answers say (`SIGNATURE~MEDOID`) names its signature as `parent`.
    let signature = mode["parent"].as_str().unwrap_or(id);
    match signature.strip_prefix("confused:").and_then(|cell| cell.split_once('→')) {
        Some((gold, predicted)) => format!("A sample like the example below is `{gold}`: do not answer `{predicted}` for it."),
        None => format!("Answer with one word only, exactly one of: {}.", labels.join(", ")),
    }
}

fn parent_verdicts(parent: &serde_json::Map<String, Value>) -> BTreeMap<String, bool> {
    parent.get("heldout").and_then(Value::as_object).map_or(BTreeMap::new(), |m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_bool()?))).collect())
}

fn verdict_text(check: &Value) -> String {
    let ci = &check["heldout_delta_ci95"];
    format!(
        "revision {} {} (held-out: {} fixed, {} broken, accuracy {:+.3} [{:+.3}, {:+.3}], McNemar p = {:.3})",
        check["version"],
        if check["accepted"] == true { "accepted" } else { "rejected, previous prompt restored" },
        check["wins"],
        check["losses"],
        check["heldout_delta"].as_f64().unwrap_or(0.0),
        ci[0].as_f64().unwrap_or(0.0),
        ci[1].as_f64().unwrap_or(0.0),
        check["p_value"].as_f64().unwrap_or(1.0)
    )
}

/// Example text safe inside a raw block and on one line.
fn clean(text: &str) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    one_line.replace("{%", "{ %").replace("%}", "% }").replace('"', "'").chars().take(200).collect()
}

struct McNemar {
    /// Held-out samples the revision fixed (parent failed, revision passed).
    wins: usize,
    /// Held-out samples the revision broke.
    losses: usize,
    /// One-sided exact p-value of "the revision is no better".
    p_value: f64,
}

/// Exact one-sided McNemar test over the samples both sides judged.
fn mcnemar(parent: &BTreeMap<String, bool>, child: &BTreeMap<String, bool>) -> McNemar {
    let (mut wins, mut losses) = (0, 0);
    for (id, &after) in child {
        match parent.get(id) {
            Some(false) if after => wins += 1,
            Some(true) if !after => losses += 1,
            _ => {}
        }
    }
    // P(X ≥ wins), X ~ Binomial(wins + losses, 1/2).
    let n = wins + losses;
    let p_value = if n == 0 { 1.0 } else { (wins..=n).map(|k| binomial(n, k)).sum::<f64>() / 2f64.powi(n as i32) };
    McNemar { wins, losses, p_value: p_value.min(1.0) }
}

fn binomial(n: usize, k: usize) -> f64 {
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage() -> ReviseStage {
        ReviseStage(ReviseConfig { input_field: default_input_field(), max_clusters: 3, alpha: 0.05, min_gain: 1 }, 0..0)
    }

    /// A first prompt, one confusion mode of candidate `m` on the dev split, over `samples`.
    fn input(samples: Value) -> StageInput {
        let example = json!({"id": "s1", "label": "even", "answer": "odd"});
        StageInput {
            inputs: [
                ("prompt".to_string(), Arc::new(json!({"source": "p.j2", "system": null, "template": "{{ question }}"}))),
                ("clusters".to_string(), Arc::new(json!({"labels": ["even", "odd"], "models": {"m": {"clusters": [{"id": "confused:even→odd", "size": 1, "examples": [example]}]}}}))),
                ("judgement".to_string(), Arc::new(json!({"best": "m", "models": {"m": {"verdicts": [], "splits": {}}}}))),
                ("dataset".to_string(), Arc::new(json!({"samples": samples}))),
            ]
            .into(),
            files: Default::default(),
            seed: 0,
            cancel: Default::default(),
        }
    }

    #[test]
    fn rules_speak_of_samples_and_show_the_example() {
        let samples = json!([{"id": "s1", "split": "dev", "label": "even", "fields": {"text": "Is 4 even or odd?"}}]);
        let out = stage().finish(&input(samples), Vec::new()).unwrap();
        let system = out["system"].as_str().unwrap();
        assert!(system.contains("A sample like the example below is `even`: do not answer `odd` for it."), "{system}");
        assert!(system.contains("Example: \"Is 4 even or odd?\" → even"), "{system}");
    }

    #[test]
    fn a_split_mode_is_ruled_on_by_its_signature_not_its_id() {
        let mode = json!({"id": "confused:technical→refund~t024", "parent": "confused:technical→refund"});
        assert_eq!(rule(&mode, &["refund", "technical"]), "A sample like the example below is `technical`: do not answer `refund` for it.");
    }

    #[test]
    fn a_field_no_dev_sample_has_is_an_error_naming_those_it_has() {
        let samples = json!([{"id": "s1", "split": "dev", "label": "even", "fields": {"question": "Is 4 even or odd?", "id": "s1"}}]);
        let err = stage().finish(&input(samples), Vec::new()).unwrap_err().to_string();
        assert_eq!(err, "no dev sample has the field `text` that examples are shown from (`input_field`); the samples have `id`, `question`");
    }

    #[test]
    fn mcnemar_counts_discordant_pairs_and_gives_the_exact_tail() {
        let map = |v: &[(&str, bool)]| v.iter().map(|(k, b)| (k.to_string(), *b)).collect::<BTreeMap<_, _>>();
        let parent = map(&[("a", false), ("b", false), ("c", false), ("d", true), ("e", true), ("f", false)]);
        let child = map(&[("a", true), ("b", true), ("c", true), ("d", false), ("e", true), ("f", false)]);
        let t = mcnemar(&parent, &child);
        assert_eq!((t.wins, t.losses), (3, 1));
        // P(X ≥ 3 | n = 4) = (4 + 1) / 16
        assert!((t.p_value - 5.0 / 16.0).abs() < 1e-12);
        let t = mcnemar(&map(&[("a", false); 1]), &map(&[("a", false)]));
        assert_eq!(t.p_value, 1.0);
        // Ten fixed, none broken: p = 1/1024.
        let parent: BTreeMap<_, _> = (0..10).map(|i| (i.to_string(), false)).collect();
        let child: BTreeMap<_, _> = (0..10).map(|i| (i.to_string(), true)).collect();
        assert!((mcnemar(&parent, &child).p_value - 1.0 / 1024.0).abs() < 1e-12);
    }

    #[test]
    fn examples_cannot_break_out_of_the_raw_block() {
        assert_eq!(clean("a {% endraw %}{{ x }}\n\"b\""), "a { % endraw % }{{ x }} 'b'");
    }
}
