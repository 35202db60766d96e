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
//!
//! With `reviser`, a model writes the rules instead (the reflective step of GEPA): it is shown the
//! system message, the template, the rules so far, and each targeted failure mode with its
//! description, its fix (the rubric's, for a rubric judgement) and a dev example with the answer
//! the model gave, and replies with the rules section anew. One memoized call per revision; its
//! revision is accepted or rejected on held-out samples exactly as a rule-based one. A reply that
//! cannot be read falls back to the rule-based rules, and says so.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use artifacts::facts::{DatasetFacts, RenderFacts};
use artifacts::{Accepted, Artifact, Clusters, Dataset, FailureMode, Judgement, Message, Parent, Prompt, Rendered, Revision, RevisionCheck, Sample, Split};
use engine::diag::{Diagnostic, SourceFile};
use engine::{BuildContext, Item, ItemContext, Port, Stage, StageError, StageInput, StagePlugin};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use toml::Spanned;

pub struct Revise;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReviseConfig {
    /// The sample field shown as each example's text. Without it, an example is the sample as
    /// the model saw it: its rendered user message, less the text every sample's message shares
    /// (the template's own words) — the `render` stage must then be in `needs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_field: Option<String>,
    /// Failure modes targeted per revision (largest first).
    #[serde(default = "default_max_clusters")]
    pub max_clusters: usize,
    /// Significance level of the acceptance test.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Net held-out passes gained (discordant wins minus losses) a revision needs.
    #[serde(default = "default_min_gain")]
    pub min_gain: u32,
    /// A model that writes each revision's rules from the failure modes and their examples
    /// (rule-based rules otherwise): `reviser = { catalog = "...", model = "..." }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reviser: Option<ReviserConfig>,
}

/// The model that writes a revision's rules; one memoized call per revision.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReviserConfig {
    /// Model catalog, relative to the pipeline file.
    #[schemars(with = "String")]
    pub catalog: Spanned<String>,
    /// A model id of the catalog.
    #[schemars(with = "String")]
    pub model: Spanned<String>,
    /// Convert its GGUF weights to Q8_0 first (as in `infer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepare: Option<infer::Prepare>,
    /// Most tokens of its reply (the rules as JSON).
    #[serde(default = "default_reviser_tokens")]
    pub max_tokens: usize,
    #[serde(default)]
    pub http: infer::http::HttpSettings,
}

fn default_reviser_tokens() -> usize {
    320
}

/// The longest rules section a reviser may write.
const MAX_RULES_CHARS: usize = 1200;

/// What the reviser must reply: the rules as a string short enough to be closed within
/// `max_tokens` (two characters a token at the least, less the JSON around it), so a reply that
/// runs long still ends as the JSON asked for.
fn rules_schema(max_tokens: usize) -> Value {
    let longest = (2 * max_tokens).saturating_sub(16).clamp(1, MAX_RULES_CHARS);
    json!({
        "type": "object",
        "properties": {"rules": {"type": "string", "minLength": 1, "maxLength": longest}},
        "required": ["rules"],
        "additionalProperties": false,
    })
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
        Port::new("prompt", Prompt::TYPE),
        Port::new("clusters", Clusters::TYPE),
        Port::new("judgement", Judgement::TYPE),
        Port::new("dataset", Dataset::TYPE),
        Port::optional("rendered", Rendered::TYPE),
    ];
    const OUTPUT: &'static str = Prompt::TYPE;

    fn build(config: ReviseConfig, cx: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        let mut errors = Vec::new();
        if !(config.alpha > 0.0 && config.alpha < 1.0) {
            errors.push(cx.error_at(cx.key("alpha"), format!("`alpha` must be between 0 and 1, not {}", config.alpha), ""));
        }
        if config.max_clusters == 0 || config.max_clusters > 20 {
            errors.push(cx.error_at(cx.key("max_clusters"), format!("`max_clusters` must be 1 to 20, not {}", config.max_clusters), ""));
        }
        let reviser = match &config.reviser {
            None => None,
            Some(r) => {
                if !(16..=4096).contains(&r.max_tokens) {
                    errors.push(cx.error_at(cx.key("reviser"), format!("`reviser.max_tokens` must be 16 to 4096, not {}", r.max_tokens), ""));
                }
                let sampler = infer::Sampler { max_tokens: r.max_tokens, ..Default::default() };
                match infer::CalledModel::build(infer::ModelCall { catalog: &r.catalog, model: &r.model, schema: rules_schema(r.max_tokens), sampler, prepare: r.prepare, http: &r.http }, cx) {
                    Ok(model) => Some(model),
                    Err(e) => {
                        errors.extend(e);
                        None
                    }
                }
            }
        };
        let field_span = cx.key("input_field").unwrap_or_else(|| cx.stage_span());
        if errors.is_empty() { Ok(Arc::new(ReviseStage(config, field_span, reviser))) } else { Err(errors) }
    }
}

/// The config, where `input_field` is written (the stage's header when it is the default), and
/// the model that writes rules, resolved.
struct ReviseStage(ReviseConfig, std::ops::Range<usize>, Option<infer::CalledModel>);

/// A revision made: the new prompt, and the conversation a reviser is (or would be) sent for it.
struct Revised {
    prompt: Prompt,
    call: Option<Vec<Message>>,
}

#[async_trait::async_trait]
impl Stage for ReviseStage {
    /// `input_field` is a field some sample of the dataset has; without it, rendered prompts of
    /// the dev split are an input.
    fn check_inputs(&self, pipeline: &SourceFile, facts: &BTreeMap<String, Value>) -> Vec<Diagnostic> {
        let dataset = artifacts::facts::read::<DatasetFacts>(facts.get("dataset"));
        let fields: Vec<&str> = dataset.iter().flat_map(|d| &d.fields).map(String::as_str).collect();
        let Some(field) = self.0.input_field.as_deref() else {
            let error = match artifacts::facts::read::<RenderFacts>(facts.get("rendered")) {
                None => "examples are shown as the model saw them (there is no `input_field`), but no `render` stage is in `needs`",
                Some(r) if r.split == Some(Split::Heldout) => "the rendered prompts in `needs` are of held-out samples only, and examples come from the dev split",
                Some(_) => return Vec::new(),
            };
            let d = Diagnostic::error(error).at(pipeline, self.1.clone(), "this stage");
            let field_hint = if fields.is_empty() { String::new() } else { format!(", or set `input_field` to the field to show ({})", engine::diag::one_of(&fields)) };
            return vec![d.help(format!("add the `render` stage of the dev samples to `needs`{field_hint}"))];
        };
        if dataset.is_none() || fields.contains(&field) {
            return Vec::new();
        }
        let d = Diagnostic::error(format!("`input_field = \"{field}\"`: no sample of the dataset has that field, so revisions would show no examples"))
            .at(pipeline, self.1.clone(), "examples are shown from this field");
        vec![d.suggest(field, &fields, "the samples have")]
    }

    fn metrics(&self) -> Option<&'static [&'static str]> {
        Some(&["improved"])
    }

    /// The reviser, for the lockfile.
    fn pins(&self) -> engine::Pins {
        self.2.as_ref().map(infer::CalledModel::pins).unwrap_or_default()
    }

    /// With a reviser: one call, when there is a failure mode to target.
    fn items(&self, input: &StageInput) -> Result<Vec<Item>, StageError> {
        let Some(reviser) = &self.2 else { return Ok(Vec::new()) };
        let revised = self.revise(input, None)?;
        Ok(revised.call.map(|messages| Item { id: "rules".into(), input: reviser.item_input(messages, input.seed) }).into_iter().collect())
    }

    async fn run_item(&self, item: &Item, cx: &ItemContext) -> Result<Value, StageError> {
        let reviser = self.2.as_ref().ok_or_else(|| StageError::new("no `reviser` to run"))?;
        reviser.run(item, cx).await
    }

    fn item_concurrency(&self) -> usize {
        self.2.as_ref().map_or(1, |r| r.concurrency)
    }

    fn volatile_keys(&self) -> &'static [&'static str] {
        &["timing", "transport"]
    }

    fn finish(&self, input: &StageInput, results: Vec<(Item, Value)>) -> Result<Value, StageError> {
        let reply = results.first().map(|(_, reply)| reply.get("text").and_then(Value::as_str).unwrap_or_default().to_string());
        Ok(self.revise(input, reply.as_deref())?.prompt.to_json())
    }
}

impl ReviseStage {
    /// The next prompt version: the acceptance check of this one, then rules for the largest
    /// untried failure modes — a reviser's (`reply`, its reply to `call`) or the rule-based ones.
    fn revise(&self, input: &StageInput, reply: Option<&str>) -> Result<Revised, StageError> {
        let prompt: Prompt = input.read("prompt")?;
        let clusters: Clusters = input.read("clusters")?;
        let judgement: Judgement = input.read("judgement")?;
        let dataset: Dataset = input.read("dataset")?;
        let (model, judged) = judgement.best_model().ok_or_else(|| StageError::new("the judgement names no best candidate"))?;
        let heldout: BTreeMap<String, bool> = judged.verdicts_in(Split::Heldout).filter_map(|v| Some((v.id.clone(), v.pass?))).collect();
        let revision = prompt.revision.as_ref();
        let version = revision.map_or(1, |r| r.version);
        let mut tried: BTreeSet<String> = revision.map_or_else(BTreeSet::new, |r| r.tried.clone());
        let mut history: Vec<RevisionCheck> = revision.map_or_else(Vec::new, |r| r.history.clone());
        let parent = revision.and_then(|r| r.parent.as_ref());

        // Judge the revision this prompt is, if it is one.
        let (mut base, mut check) = ((prompt.system.clone(), prompt.template.clone()), None);
        if let Some(parent) = parent {
            let test = mcnemar(&parent.heldout, &heldout);
            let accepted = test.wins > test.losses && test.wins - test.losses >= self.0.min_gain as usize && test.p_value < self.0.alpha;
            let pairs: Vec<(bool, bool)> = heldout.iter().filter_map(|(id, after)| Some((*parent.heldout.get(id)?, *after))).collect();
            // How far the held-out accuracy moved, with a paired bootstrap interval.
            let moved = judge::paired_difference(&pairs, 1000, input.seed);
            let c = RevisionCheck {
                version,
                accepted,
                wins: test.wins,
                losses: test.losses,
                p_value: judge::round(test.p_value),
                heldout_delta: moved.value,
                heldout_delta_ci95: moved.ci95,
            };
            history.push(c.clone());
            if !accepted {
                base = (parent.system.clone(), parent.template.clone());
            }
            check = Some(c);
        }
        let rejected = check.as_ref().is_some_and(|c| !c.accepted);
        // The version in force (what `select` should decide on): this one, unless it was just
        // rejected; its held-out verdicts and quality.
        let (accepted_heldout, accepted) = match parent {
            Some(parent) if rejected => (parent.heldout.clone(), parent.accepted.clone()),
            _ => (heldout, Accepted { version, models: judgement.models.iter().map(|(id, j)| (id.clone(), names(j.quality().1))).collect() }),
        };

        let dev: Vec<&Sample> = dataset.split(Split::Dev).collect();
        let rendered: Option<Rendered> = input.read_optional("rendered")?;
        let texts = match (&self.0.input_field, &rendered) {
            (Some(field), _) => {
                if let Some(first) = dev.first()
                    && dev.iter().all(|s| !s.fields.contains_key(field))
                {
                    let present: BTreeSet<&str> = first.fields.keys().map(String::as_str).collect();
                    return Err(StageError::new(format!(
                        "no dev sample has the field `{field}` that examples are shown from (`input_field`); the samples have {}",
                        present.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ")
                    )));
                }
                dev.iter().filter_map(|s| Some((s.id.clone(), s.fields.get(field)?.as_str()?.to_string()))).collect()
            }
            (None, Some(rendered)) => as_seen(rendered, &dev),
            (None, None) => return Err(StageError::new("examples are shown as the model saw them: put the `render` stage in `needs`, or set `input_field`")),
        };
        let modes: Vec<&FailureMode> =
            clusters.models.get(model).map_or(Vec::new(), |c| c.clusters.iter().filter(|c| !tried.contains(&c.id)).take(self.0.max_clusters).collect());
        let (system, template) = base;
        let mut out = Prompt {
            source: prompt.source.clone(),
            system,
            template,
            // Progress for `[iterate] patience`: whether the revision judged here was accepted.
            metrics: check.as_ref().map(|c| [("improved".to_string(), if c.accepted { 1.0 } else { 0.0 })].into()),
            revision: None,
            accepted: Some(accepted.clone()),
            summary: None,
        };
        if modes.is_empty() {
            // Nothing left to try: the prompt stays as it is, and the loop converges.
            out.revision = Some(Revision { version, for_model: model.to_string(), targeted: None, tried, history, parent: None, revised_by: None });
            out.summary = Some(match &check {
                None => "no failure mode left to target; the prompt stays".to_string(),
                Some(c) => format!("{}; no failure mode left to target, the prompt stays", verdict_text(c)),
            });
            return Ok(Revised { prompt: out, call: None });
        }
        // One rule per distinct instruction (the parts of a mode split by embeddings share one),
        // each with the examples of every mode it came from.
        let mut grouped: Vec<(String, Vec<String>)> = Vec::new();
        for mode in &modes {
            let instruction = rule(mode, &clusters.labels);
            let at = grouped.iter().position(|(r, _)| *r == instruction).unwrap_or_else(|| {
                grouped.push((instruction, Vec::new()));
                grouped.len() - 1
            });
            if let Some(example) = mode.examples.first() {
                let label = example.label.as_deref().unwrap_or_default();
                if let Some(text) = texts.get(example.id.as_str()) {
                    grouped[at].1.push(format!("  Example: \"{}\" → {label}\n", clean(text)));
                    grouped[at].1.push(format!("  Wrong: answering \"{}\" to it; the answer is {label}.\n", clean(&example.answer)));
                }
            }
            tried.insert(mode.id.clone());
        }
        let mut rules = String::new();
        for (instruction, examples) in grouped {
            rules.push_str(&format!("- {instruction}\n"));
            rules.extend(examples);
        }
        let current = out.system.as_deref();
        let base_system = current.unwrap_or_default().split(RULES_OPEN).next().unwrap_or_default().trim_end().to_string();
        let previous_rules = current.and_then(|s| s.split_once(&format!("{RULES_OPEN}\n"))).map(|(_, r)| r.trim_end_matches("{% endraw %}").to_string()).unwrap_or_default();
        let call = self.2.as_ref().map(|_| reviser_messages(&base_system, &out.template, &previous_rules, &modes, &clusters.labels, &texts));
        // A reviser writes the rules section anew (earlier rules included); otherwise the new
        // rules go before the earlier ones.
        let (all_rules, note) = match (&self.2, reply) {
            (Some(reviser), Some(reply)) => match read_rules(reply) {
                Some(written) => (written, format!(" (rules written by `{}`)", reviser.candidate.id)),
                None => (format!("{rules}{previous_rules}"), format!(" (`{}` replied {:?}, which is not the rules asked for: rule-based rules used)", reviser.candidate.id, clean(reply))),
            },
            _ => (format!("{rules}{previous_rules}"), String::new()),
        };
        let all_rules = format!("Rules learned from mistakes:\n{all_rules}");
        let system = if base_system.is_empty() { format!("{{% raw %}}{all_rules}{{% endraw %}}") } else { format!("{base_system}\n\n{{% raw %}}{all_rules}{{% endraw %}}") };
        let targeted: Vec<String> = modes.iter().map(|m| format!("{} ({})", m.id, m.size)).collect();
        out.summary = Some(match &check {
            None => format!("revision {} targets {}{note}", version + 1, targeted.join(", ")),
            Some(c) => format!("{}; revision {} targets {}{note}", verdict_text(c), version + 1, targeted.join(", ")),
        });
        out.revision = Some(Revision {
            version: version + 1,
            for_model: model.to_string(),
            targeted: Some(modes.iter().map(|m| m.id.clone()).collect()),
            tried,
            history,
            parent: Some(Parent { system: out.system.clone(), template: out.template.clone(), heldout: accepted_heldout, accepted }),
            revised_by: match (&self.2, reply.and_then(read_rules)) {
                (Some(reviser), Some(_)) => Some(reviser.candidate.id.clone()),
                _ => None,
            },
        });
        out.system = Some(system);
        Ok(Revised { prompt: out, call })
    }
}

/// Where the rules section of a revised system message begins.
const RULES_OPEN: &str = "{% raw %}Rules learned from mistakes:";

/// The reviser's conversation: what the model is told, the rules so far, and each failure mode
/// to fix with its description, fix and a dev example (the input, the reference, the answer).
fn reviser_messages(system: &str, template: &str, rules: &str, modes: &[&FailureMode], labels: &[String], texts: &BTreeMap<String, String>) -> Vec<Message> {
    let or_none = |t: &str| if t.trim().is_empty() { "(none)".to_string() } else { t.trim().to_string() };
    let mut user = format!(
        "The model's system message:\n{}\n\nIts user message (a template; {{{{ }}}} marks a sample's fields):\n{}\n\nRules it is given now:\n{}\n",
        or_none(system),
        template.trim(),
        or_none(rules)
    );
    if !labels.is_empty() {
        user.push_str(&format!("\nEvery answer must be one of these labels: {}.\n", labels.join(", ")));
    }
    user.push_str("\nIts failures on development samples, largest first:\n");
    for (i, mode) in modes.iter().enumerate() {
        user.push_str(&format!("{}. {} ({} samples): {} Possible fix: {}\n", i + 1, mode.name, mode.size, mode.description, mode.fix_hypothesis));
        for example in mode.examples.iter().take(2) {
            if let Some(text) = texts.get(example.id.as_str()) {
                let label = example.label.as_deref().unwrap_or("(none)");
                user.push_str(&format!("   Sample: \"{}\" Expected: {label}. The model answered: \"{}\"\n", clean(text), clean(&example.answer)));
            }
        }
    }
    user.push_str("\nWrite the rules section anew: keep the rules that still apply, and add a short instruction for each failure above. One rule per line, each starting with \"- \".");
    vec![
        Message::new(
            "system",
            "You improve the instructions a language model follows for a task, from the mistakes it made. Reply with JSON only: {\"rules\": \"<the rules, one per line, each starting with - >\"}",
        ),
        Message::new("user", user),
    ]
}

/// The rules in a reviser's reply (`rules_schema`), safe inside the system message's raw block;
/// `None` when the reply is not that.
fn read_rules(reply: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Reply {
        rules: String,
    }
    let rules = serde_json::from_str::<Reply>(reply.trim()).ok()?.rules;
    let rules = rules.replace("{%", "{ %").replace("%}", "% }");
    let rules: String = rules.lines().map(str::trim_end).filter(|l| !l.trim().is_empty()).map(|l| format!("{l}\n")).collect();
    (!rules.is_empty()).then_some(rules)
}

/// Each dev sample's rendered user message (its last), less the text that every one of them
/// shares at its start and end — the template's own words — so an example shows what varies:
/// the sample as the model saw it. Cut at whitespace, so no word is split.
fn as_seen(rendered: &Rendered, dev: &[&Sample]) -> BTreeMap<String, String> {
    let dev: BTreeSet<&str> = dev.iter().map(|s| s.id.as_str()).collect();
    let messages: Vec<(&str, &str)> = rendered
        .samples
        .iter()
        .filter(|s| dev.contains(s.id.as_str()))
        .filter_map(|s| Some((s.id.as_str(), s.messages.iter().rev().find(|m| m.role == "user")?.content.as_str())))
        .collect();
    let (mut prefix, mut suffix) = (usize::MAX, usize::MAX);
    if messages.len() > 1 {
        let first = messages[0].1;
        for (_, m) in &messages[1..] {
            prefix = prefix.min(first.bytes().zip(m.bytes()).take_while(|(a, b)| a == b).count());
            suffix = suffix.min(first.bytes().rev().zip(m.bytes().rev()).take_while(|(a, b)| a == b).count());
        }
    } else {
        (prefix, suffix) = (0, 0);
    }
    messages
        .into_iter()
        .map(|(id, m)| {
            // Widened to whitespace on both sides, so a word the samples share a part of is whole.
            let mut start = prefix.min(m.len());
            while !m.is_char_boundary(start) {
                start -= 1;
            }
            let start = m[..start].rfind(char::is_whitespace).map_or(0, |at| at + 1);
            let mut end = m.len() - suffix.min(m.len() - start);
            while !m.is_char_boundary(end) {
                end += 1;
            }
            let end = m[end..].find(char::is_whitespace).map_or(m.len(), |at| end + at);
            let varying = m[start..end].trim();
            (id.to_string(), if varying.is_empty() { m.trim().to_string() } else { varying.to_string() })
        })
        .collect()
}

/// Quality figures keyed by owned names, as an artifact holds them.
fn names(figures: BTreeMap<&'static str, f64>) -> BTreeMap<String, f64> {
    figures.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// The instruction to the model for a failure mode (the mode's `fix_hypothesis` is written for
/// people; this is its imperative form).
fn rule(mode: &FailureMode, labels: &[String]) -> String {
    if mode.id.starts_with("judge:") || labels.is_empty() {
        // A rubric's failure mode: the rubric's own fix, already an instruction.
        return mode.fix_hypothesis.clone();
    }
    // A mode split by what its answers say (`SIGNATURE~MEDOID`) names its signature as `parent`.
    match mode.signature().strip_prefix("confused:").and_then(|cell| cell.split_once('→')) {
        Some((gold, predicted)) => format!("A sample like the example below is `{gold}`: do not answer `{predicted}` for it."),
        None => format!("Answer with one word only, exactly one of: {}.", labels.join(", ")),
    }
}

fn verdict_text(check: &RevisionCheck) -> String {
    let [low, high] = check.heldout_delta_ci95.unwrap_or([0.0, 0.0]);
    format!(
        "revision {} {} (held-out: {} fixed, {} broken, accuracy {:+.3} [{:+.3}, {:+.3}], McNemar p = {:.3})",
        check.version,
        if check.accepted { "accepted" } else { "rejected, previous prompt restored" },
        check.wins,
        check.losses,
        check.heldout_delta,
        low,
        high,
        check.p_value
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
    McNemar { wins, losses, p_value: judge::mcnemar_p(wins, losses) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use artifacts::{FailureExample, JudgedModel, Message, ModelClusters, RenderedSample};

    fn stage() -> ReviseStage {
        ReviseStage(ReviseConfig { input_field: Some("text".into()), max_clusters: 3, alpha: 0.05, min_gain: 1, reviser: None }, 0..0, None)
    }

    /// A first prompt, one confusion mode of candidate `m` on the dev split, over `samples`.
    fn input(samples: Value) -> StageInput {
        let example = FailureExample { id: "s1".into(), label: Some("even".into()), answer: "odd".into() };
        let prompt = Prompt { source: "p.j2".into(), system: None, template: "{{ question }}".into(), metrics: None, revision: None, accepted: None, summary: None };
        let mode = FailureMode { examples: vec![example], ..mode("confused:even→odd", None) };
        let clusters = Clusters {
            split: Split::Dev,
            labels: vec!["even".into(), "odd".into()],
            models: [("m".to_string(), ModelClusters { dev_samples: 1, dev_failures: 1, clusters: vec![mode] })].into(),
            embeddings: None,
            named_by: None,
        };
        let models = [("m".to_string(), JudgedModel { splits: Default::default(), verdicts: Vec::new(), agreement: None })].into();
        let judgement = Judgement { best: Some("m".into()), ..judge::judgement(models, &[]) };
        let dataset = Dataset { label_field: None, counts: artifacts::SplitCounts { dev: 1, heldout: 0 }, samples: serde_json::from_value(samples).unwrap() };
        StageInput::new(
            [
                ("prompt".to_string(), Arc::new(prompt.to_json())),
                ("clusters".to_string(), Arc::new(clusters.to_json())),
                ("judgement".to_string(), Arc::new(judgement.to_json())),
                ("dataset".to_string(), Arc::new(dataset.to_json())),
            ]
            .into(),
            Default::default(),
            0,
        )
    }

    /// A failure mode with nothing but its id and signature.
    fn mode(id: &str, parent: Option<&str>) -> FailureMode {
        FailureMode {
            id: id.into(),
            name: String::new(),
            description: String::new(),
            fix_hypothesis: String::new(),
            size: 1,
            members: Vec::new(),
            examples: Vec::new(),
            parent: parent.map(str::to_string),
            silhouette: None,
            named_by: None,
            signature_name: None,
            llm_fix_hypothesis: None,
            naming: None,
        }
    }

    #[test]
    fn rules_speak_of_samples_and_show_the_example() {
        let samples = json!([{"id": "s1", "split": "dev", "label": "even", "fields": {"text": "Is 4 even or odd?"}}]);
        let out = Prompt::read(&stage().finish(&input(samples), Vec::new()).unwrap()).unwrap();
        let system = out.system.unwrap();
        assert!(system.contains("A sample like the example below is `even`: do not answer `odd` for it."), "{system}");
        assert!(system.contains("Example: \"Is 4 even or odd?\" → even"), "{system}");
    }

    #[test]
    fn a_split_mode_is_ruled_on_by_its_signature_not_its_id() {
        let mode = mode("confused:technical→refund~t024", Some("confused:technical→refund"));
        assert_eq!(rule(&mode, &["refund".into(), "technical".into()]), "A sample like the example below is `technical`: do not answer `refund` for it.");
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
    fn examples_show_the_sample_as_the_model_saw_it_without_the_template() {
        let sample = |id: &str| Sample { id: id.into(), split: Split::Dev, label: None, fields: Default::default() };
        let message = |id: &str, text: &str| RenderedSample {
            id: id.into(),
            tools: None,
            messages: vec![Message::new("system", "Be brief."), Message::new("user", format!("Classify the review.\nReview: {text}\n\nAnswer with one word."))],
        };
        let rendered = Rendered {
            prompt: "p.j2".into(),
            samples: vec![message("a", "Really great café, ok."), message("b", "Reviewed badly."), message("c", "Read it twice."), message("held", "Not shown.")],
        };
        let dev = [sample("a"), sample("b"), sample("c")];
        let seen = as_seen(&rendered, &dev.iter().collect::<Vec<_>>());
        // `Re` and `.` are shared by every review but belong to its words: they stay.
        assert_eq!(seen.get("a").map(String::as_str), Some("Really great café, ok."));
        assert_eq!(seen.get("b").map(String::as_str), Some("Reviewed badly."));
        assert_eq!(seen.get("c").map(String::as_str), Some("Read it twice."));
        assert!(!seen.contains_key("held"), "held-out samples are never shown");
        // One sample: nothing to tell the template from the sample by, so all of it.
        let one = as_seen(&rendered, &[&dev[0]]);
        assert_eq!(one["a"], "Classify the review.\nReview: Really great café, ok.\n\nAnswer with one word.");
    }

    #[test]
    fn examples_cannot_break_out_of_the_raw_block() {
        assert_eq!(clean("a {% endraw %}{{ x }}\n\"b\""), "a { % endraw % }{{ x }} 'b'");
    }

    #[test]
    fn a_reviser_sees_the_modes_with_their_examples_and_its_rules_stay_in_the_raw_block() {
        let example = FailureExample { id: "s1".into(), label: Some("even".into()), answer: "odd, I think".into() };
        let m = FailureMode { examples: vec![example], name: "even read as odd".into(), description: "Even numbers answered odd.".into(), fix_hypothesis: "Check the last digit.".into(), size: 4, ..mode("confused:even→odd", None) };
        let texts: BTreeMap<String, String> = [("s1".to_string(), "Is 4 even or odd?".to_string())].into();
        let call = reviser_messages("Be brief.", "{{ question }}", "- Answer with one word.\n", &[&m], &["even".into(), "odd".into()], &texts);
        let user = &call[1].content;
        for part in ["Be brief.", "{{ question }}", "- Answer with one word.", "even, odd", "1. even read as odd (4 samples): Even numbers answered odd. Possible fix: Check the last digit.", "Sample: \"Is 4 even or odd?\" Expected: even. The model answered: \"odd, I think\""] {
            assert!(user.contains(part), "{part:?} not in {user}");
        }
        assert_eq!(read_rules("{\"rules\": \"- Look at the last digit.\\n\\n- Never say {% endraw %}.\"}").as_deref(), Some("- Look at the last digit.\n- Never say { % endraw % }.\n"));
        assert_eq!(read_rules("Sure! Here are the rules: ..."), None);
        assert_eq!(read_rules("{\"rules\": \"  \"}"), None);
    }
}
