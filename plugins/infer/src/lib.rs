//! `infer`: every candidate model answers every rendered sample.
//!
//! One item per (sample × model). An item's input is exactly what its answer depends on: the
//! model's weights digest, the rendered messages and the sampler. So adding a sample or a model
//! computes only the new items, and a changed prompt recomputes only samples whose rendering
//! changed.
//!
//! A candidate runs on the first source in its catalog entry that this build can run: weights
//! (a Python package or a local file) run embedded in mistral.rs, an `openai_compatible` source
//! over HTTP ([`http`]).
//!
//! Embedded: one model is loaded once per process and shared by every stage that uses it. Up to
//! `max_in_flight` items of a stage are in flight at once and mistral.rs batches them; the load
//! never changes an answer (the vendored mistral.rs fixes what did, and `embedded`'s tests prove
//! greedy answers at 2, 8 and 32 in flight bitwise equal to one at a time), so `max_in_flight` is
//! not part of any memo key.
//!
//! HTTP: requests run concurrently up to `http.max_concurrency`; the memo key holds the served
//! model name, never the URLs (replicas serve the same model) nor the key.
//!
//! Timings and retries are measurements, not results: they sit under `timing` and `transport`
//! keys, which the lockfile leaves out.

mod convert;
mod embedded;
pub mod tools;
pub mod http;
mod hub;
pub mod serve;

pub use convert::to_q8_0 as prepare_q8_0;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use artifacts::{Answers, Artifact, Candidates, FineTuned, ModelAnswers, ModelTiming, Pin, Rendered, TunedModel};
use catalog::{Catalog, Source};
use engine::diag::Diagnostic;
use engine::{BuildContext, Item, ItemContext, Port, Stage, StageError, StageInput, StagePlugin};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use toml::Spanned;

pub struct Infer;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InferConfig {
    /// Model catalog, relative to the pipeline file.
    #[schemars(with = "String")]
    pub catalog: Spanned<String>,
    /// Catalog ids of the models to run. Leave out to run the models a `license_filter` stage in
    /// `needs` lets through.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub models: Vec<Spanned<String>>,
    #[serde(default)]
    pub sampler: Sampler,
    /// Most items of this stage in flight at once for embedded models (default 8, at most 64):
    /// mistral.rs batches them. Answers do not depend on it. On CPU, sequences of any lengths
    /// decode together (GGUF Llama-architecture models; any other model runs its requests one
    /// at a time) and prompts prefill together only at equal token length: it pays most for long
    /// answers (BENCHMARKS.md).
    #[schemars(with = "Option<usize>", range(min = 1, max = 64))]
    pub max_in_flight: Option<Spanned<usize>>,
    /// Convert GGUF weights to this quantization before running (cached per machine). `q8_0`
    /// runs on candle's AVX2 kernels where the shipped Q4_1 runs on scalar code.
    pub prepare: Option<Prepare>,
    /// Where embedded models run: `cpu` (the default), `cuda` or `cuda:N` (a build with the `cuda`
    /// feature). Answers computed on a GPU are memoized apart from CPU answers.
    #[serde(default = "cpu", skip_serializing_if = "is_cpu")]
    #[schemars(with = "String")]
    pub device: Spanned<DeviceSpec>,
    /// How candidates served over HTTP are called.
    #[serde(default)]
    pub http: http::HttpSettings,
    /// Constrain what the model may generate (embedded: llguidance in mistral.rs; HTTP: the
    /// server's structured outputs). Part of every item's memo key.
    #[schemars(with = "Option<OutputConstraint>")]
    pub output: Option<Spanned<OutputConstraint>>,
    /// Reasoning models: the tag their reasoning is written in (`think` for `<think>…</think>`).
    /// It is taken out of each answer before anything judges it, kept as the answer's
    /// `reasoning`, and its tokens counted apart (`reasoning_tokens`). Part of the memo key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub think: Option<Spanned<String>>,
    /// Answers to draw per sample and model (default 1, at most 100), each with a seed of its
    /// own (in its memo key: raising `repeats` computes only the new ones); `judge` reports their
    /// mean, pass@k, pass^k and the flaky samples. Needs `temperature` above 0: greedy decoding
    /// draws one answer, so repeats of it are computed once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<usize>", range(min = 1, max = 100))]
    pub repeats: Option<Spanned<usize>>,
    /// Samples with tools (`render`'s `tools`), over HTTP: `auto` (the default) lets the model
    /// answer in text or call, `required` makes it call (sent as OpenAI's `required`, or as the
    /// function itself when the sample offers one). Embedded models always call: their reply is
    /// constrained to a call. Part of the memo key of samples with tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
}

/// Whether a model offered tools must call one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    Auto,
    Required,
}

/// The most answers `repeats` may draw per sample and model.
pub const MAX_REPEATS: usize = 100;

/// The seed of a sample's `repeat`-th answer (from 0) under the pipeline's `seed`: the first is
/// the pipeline's seed itself (what a single answer was always drawn with), each later one a
/// splitmix64 mix of the two, so repeats are independent streams.
pub fn repeat_seed(seed: u64, repeat: usize) -> u64 {
    if repeat == 0 {
        return seed;
    }
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    mix(seed ^ mix(repeat as u64))
}

/// What the model may generate. One of:
/// `{ choice = ["billing", "refund"] }`, `{ regex = "[0-9]+" }`, `{ json_schema = { ... } }`,
/// `{ lark = "start: ..." }` (a llguidance Lark grammar).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", try_from = "RawOutput")]
pub enum OutputConstraint {
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// Text matching this regular expression (whole output).
    Regex(String),
    /// JSON valid against this schema.
    JsonSchema(Value),
    /// A Lark grammar, as llguidance reads it (embedded only).
    Lark(String),
}

/// `output` as written: exactly one of its keys may be set (serde's own message for an enum
/// table with two keys does not say which keys are valid).
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
struct RawOutput {
    /// Exactly one of these strings.
    choice: Option<Vec<String>>,
    /// Text matching this regular expression (whole output).
    regex: Option<String>,
    /// JSON valid against this schema.
    json_schema: Option<Value>,
    /// A Lark grammar, as llguidance reads it (embedded only).
    lark: Option<String>,
}

impl TryFrom<RawOutput> for OutputConstraint {
    type Error = String;

    fn try_from(raw: RawOutput) -> Result<Self, String> {
        let set: Vec<OutputConstraint> = [
            raw.choice.map(OutputConstraint::Choice),
            raw.regex.map(OutputConstraint::Regex),
            raw.json_schema.map(OutputConstraint::JsonSchema),
            raw.lark.map(OutputConstraint::Lark),
        ]
        .into_iter()
        .flatten()
        .collect();
        match <[OutputConstraint; 1]>::try_from(set) {
            Ok([one]) => Ok(one),
            Err(set) => Err(format!(
                "set exactly one of `choice`, `regex`, `json_schema`, `lark` (found {})",
                if set.is_empty() { "none".to_string() } else { set.iter().map(|c| format!("`{}`", c.key())).collect::<Vec<_>>().join(", ") }
            )),
        }
    }
}

impl OutputConstraint {
    fn key(&self) -> &'static str {
        match self {
            OutputConstraint::Choice(_) => "choice",
            OutputConstraint::Regex(_) => "regex",
            OutputConstraint::JsonSchema(_) => "json_schema",
            OutputConstraint::Lark(_) => "lark",
        }
    }

    fn check(&self) -> Result<(), String> {
        match self {
            OutputConstraint::Choice(choices) if choices.is_empty() => Err("`choice` is empty: list the allowed outputs".into()),
            OutputConstraint::Choice(choices) if choices.iter().any(String::is_empty) => Err("`choice` has an empty string".into()),
            OutputConstraint::Regex(r) => regex_syntax::Parser::new().parse(r).map(|_| ()).map_err(|e| {
                // The parser's message draws the pattern over several lines; its last says why.
                let text = e.to_string();
                format!("invalid `regex`: {}", text.lines().last().unwrap_or_default().trim().trim_start_matches("error: "))
            }),
            OutputConstraint::JsonSchema(v) if !v.is_object() => Err("`json_schema` must be a table (a JSON Schema object)".into()),
            _ => Ok(()),
        }
    }

    /// A choice as the regular expression it stands for.
    fn choice_regex(choices: &[String]) -> String {
        format!("({})", choices.iter().map(|c| regex_syntax::escape(c)).collect::<Vec<_>>().join("|"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Prepare {
    Q8_0,
}

impl Prepare {
    /// What the weights become, with the converter's version (`q8_0-v1`): how every key and
    /// banner that depends on the conversion spells it, and the converted file's suffix.
    pub fn spelling(self) -> String {
        match self {
            Prepare::Q8_0 => format!("q8_0-v{}", convert::CONVERTER_VERSION),
        }
    }
}

fn cpu() -> Spanned<DeviceSpec> {
    Spanned::new(0..0, DeviceSpec::Cpu)
}

/// Left out of the canonical config, so CPU stages keep the fingerprints they had.
fn is_cpu(device: &Spanned<DeviceSpec>) -> bool {
    *device.get_ref() == DeviceSpec::Cpu
}

/// Where an embedded model runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            DeviceSpec::Cpu => s.serialize_str("cpu"),
            DeviceSpec::Cuda(n) => s.serialize_str(&format!("cuda:{n}")),
        }
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| serde::de::Error::custom(format!("unknown device `{other}`: expected `cpu`, `cuda` or `cuda:N`"))),
        }
    }
}

/// Decoding settings. Part of every item's memo key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Sampler {
    /// Most tokens to generate.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// 0 decodes greedily (reproducible); above 0 samples.
    #[serde(default)]
    pub temperature: f64,
    /// Stop generating at any of these strings.
    #[serde(default)]
    pub stop: Vec<String>,
}

fn default_max_tokens() -> usize {
    64
}

impl Sampler {
    /// Whether answers are sampled (temperature above 0), not decoded greedily.
    pub fn samples(&self) -> bool {
        self.temperature > 0.0
    }

    /// Why these settings cannot decode, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.max_tokens == 0 {
            return Err("`max_tokens` is 0: at least 1 token must be generated".into());
        }
        if !(self.temperature.is_finite() && (0.0..=2.0).contains(&self.temperature)) {
            return Err(format!("`temperature` is {}: it must be 0 (greedy) to 2", self.temperature));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err("`stop` holds an empty string, which would stop before the first token".into());
        }
        Ok(())
    }

    /// `max_tokens` fits the context window of `candidate` (when the catalog gives one), with
    /// room left for a prompt.
    pub fn check_context(&self, candidate: &Candidate) -> Result<(), String> {
        match candidate.context_tokens {
            Some(context) if self.max_tokens >= context as usize => Err(format!(
                "`max_tokens` is {}, but `{}` has a context of {context} tokens, prompt and answer together",
                self.max_tokens, candidate.id
            )),
            _ => Ok(()),
        }
    }
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler { max_tokens: default_max_tokens(), temperature: 0.0, stop: Vec::new() }
    }
}

pub use artifacts::Message;

/// One candidate's answer to one sample.
#[derive(Debug, Serialize)]
pub struct Answer {
    pub text: String,
    pub finish_reason: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Reasoning a server sent apart from the text (`reasoning_content`), and the count of its
    /// tokens it reported (HTTP).
    #[serde(skip)]
    pub reasoning: Option<String>,
    #[serde(skip)]
    pub reasoning_tokens: Option<usize>,
    /// The functions it called (a sample with tools).
    #[serde(skip)]
    pub tool_calls: Option<Vec<artifacts::ToolCall>>,
    /// Failed with other requests in flight and was redone alone (embedded; reported under the
    /// volatile `transport` key).
    #[serde(skip)]
    pub redone_alone: bool,
    /// Measurements (volatile: left out of the lockfile).
    pub timing: Timing,
}

/// The embedded inference code, in every embedded item's key: renamed whenever a change to the
/// vendored crates changes an answer (`vendor/README.md`), so no answer of an older build is
/// reused. Changes proven bitwise neutral (candle's tiled matmul) keep it.
pub const EMBEDDED_ENGINE: &str = "mistral.rs 0.8.1 + vendor: gguf pre-tokenizer by tokenizer.ggml.pre";

/// Embedded items of one stage in flight at once, unless `max_in_flight` says otherwise. Eight:
/// the vendored mistral.rs decodes a Llama-architecture GGUF's sequences of any lengths together
/// on CPU (vendor/README.md, mistralrs-core 10), and the main job's 240 samples on SmolLM2 took
/// 26–28 s at 8 in flight against 28–32 s at 1, every answer the same (BENCHMARKS.md). A model it cannot
/// decode so runs its requests one at a time whatever this says (`embedded`'s module docs).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;

pub use artifacts::AnswerTiming as Timing;

impl Answer {
    /// As the `answers` artifact holds it (its sample id set when answers are assembled).
    pub fn into_artifact(self, transport: Option<Value>) -> artifacts::Answer {
        artifacts::Answer {
            id: String::new(),
            text: self.text,
            finish_reason: self.finish_reason,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            timing: self.timing,
            transport,
            reasoning: self.reasoning,
            reasoning_tokens: None,
            tool_calls: self.tool_calls,
        }
    }
}

/// A catalog model resolved to something this build runs: weights verified when loaded, or an
/// endpoint. Also what other stages (`llm_judge`) call models through.
pub struct Candidate {
    pub id: String,
    /// Its context window, as the catalog gives it.
    pub context_tokens: Option<u32>,
    backend: Backend,
}

enum Backend {
    Embedded { source: Source, sha256: String },
    Http(http::Endpoint),
}

/// Where to send a candidate's requests ([`Candidate::load_target`]); an embedded candidate's
/// server runs while this is held.
pub struct LoadTarget {
    /// Each replica's base URL (`…/v1`).
    pub base_urls: Vec<String>,
    /// The model name requests carry.
    pub model: String,
    /// The environment variable holding the API key, if the endpoint takes one.
    pub api_key_env: Option<String>,
    _server: Option<serve::Loopback>,
}

/// How a stage runs its models: everything an answer depends on but the model and the messages.
pub struct RunSettings {
    pub sampler: Sampler,
    pub prepare: Option<Prepare>,
    pub output: Option<OutputConstraint>,
    /// The tag a reasoning model thinks in, taken out of its answers.
    pub think: Option<String>,
    /// Answers drawn per sample (1 unless `repeats` says more; greedy draws 1 whatever it says).
    pub repeats: usize,
    /// Whether a sample's tools must be called (HTTP; embedded models always call).
    pub tool_choice: Option<ToolChoice>,
    pub device: DeviceSpec,
    /// Where the catalog is (its relative paths are relative to it).
    pub catalog_dir: PathBuf,
}

/// A model a stage names: which catalog, which id, where it is written, and what its answers
/// must be.
pub struct ModelRef<'a> {
    pub catalog: &'a Catalog,
    /// The catalog as the pipeline names it, for messages.
    pub catalog_name: &'a str,
    pub id: &'a str,
    /// Where the id is written, for errors.
    pub span: Option<std::ops::Range<usize>>,
    /// The output constraint, and where it is set.
    pub output: Option<&'a (OutputConstraint, std::ops::Range<usize>)>,
    pub http: &'a http::HttpSettings,
}

impl Candidate {
    /// The model `r` names, checked against what its output constraint asks.
    pub fn resolve(r: ModelRef, cx: &BuildContext) -> Result<Candidate, Diagnostic> {
        let ModelRef { catalog, catalog_name, id, span, output, http: settings } = r;
        let Some(model) = catalog.get(id) else {
            return Err(cx.error_at(span, format!("model `{id}` is not in `{catalog_name}`"), "unknown model").suggest(id, &catalog.ids(), "the catalog has"));
        };
        let context_tokens = model.context_tokens;
        match model.runnable_source() {
            Some(source) if let Some(sha256) = source.weights_sha256() => {
                Ok(Candidate { id: id.to_string(), context_tokens, backend: Backend::Embedded { source: source.clone(), sha256 } })
            }
            Some(Source::OpenaiCompatible { base_urls, model, api_key_env, response_format }) => {
                if let Some((OutputConstraint::Regex(_) | OutputConstraint::Lark(_), span)) = output {
                    return Err(cx
                        .error_at(Some(span.clone()), format!("model `{id}` is served over HTTP, where output can be constrained by `json_schema` or `choice` only"), "not over HTTP")
                        .help("the OpenAI API has no standard regex or grammar constraint"));
                }
                match http::Endpoint::new(id, base_urls, model, api_key_env.as_deref(), *response_format, settings) {
                    Ok(endpoint) => Ok(Candidate { id: id.to_string(), context_tokens, backend: Backend::Http(endpoint) }),
                    Err(e) => Err(cx.error_at(span, format!("model `{id}`: {e}"), "")),
                }
            }
            _ => Err(cx
                .error_at(span, format!("model `{id}` has no source this build can run"), "no weights or endpoint")
                .help("add a `python_package`, `local_file` or `local_dir` source with its sha256s, a `hugging_face` source pinned by `revision` and `files`, or an `openai_compatible` endpoint, to the catalog")),
        }
    }

    /// A model a `finetune` stage trained: its directory in this machine's model cache, every
    /// file pinned, run embedded like a catalog model.
    pub fn tuned(model: &TunedModel) -> Candidate {
        let path = catalog::fetch::trained_dir(&model.weights_sha256).to_string_lossy().into_owned();
        Candidate {
            id: model.id.clone(),
            context_tokens: model.context_tokens,
            backend: Backend::Embedded { source: Source::LocalDir { path, files: model.files.clone() }, sha256: model.weights_sha256.clone() },
        }
    }

    /// What the answers depend on besides messages and sampler: the weights, or the served model.
    pub fn pin(&self) -> Pin {
        match &self.backend {
            Backend::Embedded { sha256, .. } => Pin { weights_sha256: Some(sha256.clone()), served_model: None },
            Backend::Http(e) => Pin { weights_sha256: None, served_model: Some(e.model.clone()) },
        }
    }

    /// What this candidate is, for the lockfile ([`engine::Stage::pins`]).
    pub fn pins(&self, settings: &RunSettings) -> BTreeMap<String, String> {
        let mut pins = BTreeMap::new();
        match &self.backend {
            Backend::Embedded { source, sha256 } => {
                pins.insert("weights_sha256".into(), sha256.clone());
                match source {
                    Source::PythonPackage { package, version, file, .. } => {
                        pins.insert("weights".into(), format!("{file} in Python package {package}=={version}"));
                    }
                    Source::LocalFile { path, .. } => {
                        pins.insert("weights".into(), path.clone());
                    }
                    Source::LocalDir { path, files } | Source::HuggingFace { repo: path, files: Some(files), .. } => {
                        pins.insert("weights".into(), match source {
                            Source::HuggingFace { revision: Some(revision), .. } => format!("Hugging Face {path} at {revision}"),
                            _ => path.clone(),
                        });
                        for (name, sha256) in files {
                            pins.insert(format!("file {name}"), sha256.clone());
                        }
                    }
                    _ => {}
                }
                pins.insert("prepared".into(), settings.prepare.map_or_else(|| "as shipped".into(), Prepare::spelling));
                pins.insert("engine".into(), EMBEDDED_ENGINE.into());
                if let DeviceSpec::Cuda(_) = settings.device {
                    pins.insert("device".into(), "cuda".into());
                }
            }
            Backend::Http(e) => {
                pins.insert("served_model".into(), e.model.clone());
            }
        }
        pins
    }

    /// Where a load generator sends this candidate's requests: an endpoint's replicas, or, for
    /// weights, the model loaded and served on loopback by `pipeline serve`'s code.
    pub async fn load_target(&self, settings: &RunSettings) -> Result<LoadTarget, String> {
        match &self.backend {
            Backend::Embedded { source, sha256 } => {
                let runner = embedded::load(source, sha256, &settings.catalog_dir, settings.prepare, settings.device).await?;
                let server = serve::Loopback::start(&self.id, runner, sha256, settings.prepare).await?;
                Ok(LoadTarget { base_urls: vec![server.base_url.clone()], model: self.id.clone(), api_key_env: None, _server: Some(server) })
            }
            Backend::Http(e) => Ok(LoadTarget { base_urls: e.base_urls().to_vec(), model: e.model.clone(), api_key_env: e.api_key_env().map(str::to_string), _server: None }),
        }
    }

    /// How many servers answer for it: an endpoint's replicas, or one.
    pub fn replicas(&self) -> usize {
        match &self.backend {
            Backend::Embedded { .. } => 1,
            Backend::Http(e) => e.base_urls().len(),
        }
    }

    pub fn is_http(&self) -> bool {
        matches!(self.backend, Backend::Http(_))
    }

    /// An item's input for this model and these messages: the model, its pin, and every setting
    /// the answer depends on (its memo key). `seed` is what a sampled answer (temperature above
    /// 0) is drawn with: in the key then, and only then.
    pub fn item_input(&self, settings: &RunSettings, messages: Vec<Message>, seed: u64) -> Value {
        self.item_input_with_tools(settings, messages, None, seed)
    }

    /// [`Candidate::item_input`] for a sample that offers the model `tools` to call.
    pub fn item_input_with_tools(&self, settings: &RunSettings, messages: Vec<Message>, tools: Option<Vec<Value>>, seed: u64) -> Value {
        let embedded = matches!(self.backend, Backend::Embedded { .. });
        let input = ItemInput {
            model: self.id.clone(),
            pin: self.pin(),
            engine: embedded.then(|| EMBEDDED_ENGINE.to_string()),
            prepare: embedded.then(|| settings.prepare.map(Prepare::spelling)),
            // GPU kernels round differently: their answers are memoized apart. (Only when set,
            // so CPU items keep their keys; which GPU does not enter the key.)
            device: (embedded && matches!(settings.device, DeviceSpec::Cuda(_))).then(|| "cuda".to_string()),
            sampler: serde_json::to_value(&settings.sampler).expect("samplers serialize"),
            // Only when set: unconstrained items keep the keys they always had.
            output: settings.output.as_ref().map(|o| serde_json::to_value(o).expect("constraints serialize")),
            think: settings.think.clone(),
            seed: settings.sampler.samples().then_some(seed),
            tool_choice: settings.tool_choice.filter(|_| tools.is_some()),
            tools,
            messages,
        };
        serde_json::to_value(input).expect("item inputs serialize")
    }

    /// This model's answer to `messages`, drawn with `seed` when it samples, with how it was
    /// fetched (`transport`).
    pub async fn chat(&self, messages: &[Message], settings: &RunSettings, seed: u64, tools: Option<&[Value]>, cx: &ItemContext) -> Result<artifacts::Answer, String> {
        if tools.is_some() && settings.output.is_some() {
            return Err("this sample offers tools to call, and the stage constrains `output`: a call is constrained by the tools' schemas, so remove `output`".into());
        }
        match &self.backend {
            Backend::Embedded { source, sha256 } => {
                let runner = embedded::load(source, sha256, &settings.catalog_dir, settings.prepare, settings.device).await?;
                // Tools: the model is told them and its reply constrained to a call of one
                // (llama.cpp's generic tool calling, for models without a native format).
                let (called, constraint) = match tools {
                    Some(tools) => (tools::instructed(messages, tools), Some(tools::call_constraint(tools)?)),
                    None => (messages.to_vec(), None),
                };
                let mut answer = runner.chat(&called, &settings.sampler, constraint.as_ref().or(settings.output.as_ref()), Some(seed)).await?;
                if tools.is_some()
                    && let Some(call) = tools::read_call(&answer.text)
                {
                    answer.text = call.as_json().to_string();
                    answer.tool_calls = Some(vec![call]);
                }
                let transport = answer.redone_alone.then(|| json!({"redone_alone": true}));
                let mut answer = answer.into_artifact(transport);
                if let Some(tag) = &settings.think
                    && let Some((reasoning, text)) = artifacts::split_reasoning(&answer.text, tag)
                {
                    answer.reasoning_tokens = Some(runner.count_tokens(&reasoning).await?);
                    (answer.text, answer.reasoning) = (text, Some(reasoning));
                }
                Ok(answer)
            }
            Backend::Http(endpoint) => {
                let offered = tools.map(|t| (t, settings.tool_choice.unwrap_or(ToolChoice::Auto)));
                let (answer, transport) = endpoint.chat(messages, &settings.sampler, settings.output.as_ref(), seed, offered, &cx.cancel).await?;
                let reported = answer.reasoning_tokens;
                let mut answer = answer.into_artifact(Some(serde_json::to_value(transport).expect("transport serializes")));
                if let Some(tag) = &settings.think {
                    // A server that parses reasoning itself sends it apart; else it is in the text.
                    if let Some(reasoning) = answer.reasoning.take().filter(|r| !r.is_empty()) {
                        (answer.reasoning, answer.reasoning_tokens) = (Some(reasoning), reported);
                    } else if let Some((reasoning, text)) = artifacts::split_reasoning(&answer.text, tag) {
                        (answer.text, answer.reasoning, answer.reasoning_tokens) = (text, Some(reasoning), reported);
                    }
                } else {
                    answer.reasoning = None;
                }
                Ok(answer)
            }
        }
    }
}

/// A model another stage calls, as its config names it.
pub struct ModelCall<'a> {
    /// The catalog, relative to the pipeline file.
    pub catalog: &'a Spanned<String>,
    pub model: &'a Spanned<String>,
    /// The JSON Schema its replies are constrained to.
    pub schema: Value,
    pub sampler: Sampler,
    pub prepare: Option<Prepare>,
    pub http: &'a http::HttpSettings,
}

/// A catalog model another stage calls (a judge, a namer): resolved at build, its output
/// constrained to a JSON Schema, run on CPU (embedded) or over HTTP, one memoized item per call.
pub struct CalledModel {
    pub candidate: Candidate,
    pub settings: RunSettings,
    /// Items in flight: `http.max_concurrency` over HTTP, else [`DEFAULT_MAX_IN_FLIGHT`].
    pub concurrency: usize,
}

impl CalledModel {
    /// The model `call` names, resolved; its replies must match `call.schema`.
    pub fn build(call: ModelCall, cx: &BuildContext) -> Result<CalledModel, Vec<Diagnostic>> {
        let ModelCall { catalog, model, schema, sampler, prepare, http } = call;
        let (loaded, path) = Catalog::load_for_stage(catalog, cx)?;
        sampler.check().map_err(|e| vec![cx.error_at(cx.key("sampler"), e, "these settings")])?;
        let output = (OutputConstraint::JsonSchema(schema), model.span());
        let r = ModelRef { catalog: &loaded, catalog_name: catalog.get_ref(), id: model.get_ref(), span: Some(model.span()), output: Some(&output), http };
        let candidate = Candidate::resolve(r, cx).map_err(|d| vec![d])?;
        sampler.check_context(&candidate).map_err(|e| vec![cx.error_at(cx.key("sampler"), e, "these settings")])?;
        let concurrency = if candidate.is_http() { http.max_concurrency.0 } else { DEFAULT_MAX_IN_FLIGHT };
        let catalog_dir = path.parent().map(PathBuf::from).unwrap_or_default();
        let settings = RunSettings { sampler, prepare, output: Some(output.0), think: None, repeats: 1, tool_choice: None, device: DeviceSpec::Cpu, catalog_dir };
        Ok(CalledModel { candidate, settings, concurrency })
    }

    /// What the called model is, for the lockfile.
    pub fn pins(&self) -> engine::Pins {
        [(self.candidate.id.clone(), self.candidate.pins(&self.settings))].into()
    }

    /// An item's input for a call with these chat messages, under the pipeline's `seed`.
    pub fn item_input(&self, messages: Vec<Message>, seed: u64) -> Value {
        self.candidate.item_input(&self.settings, messages, seed)
    }

    /// Run an item made by [`CalledModel::item_input`]: the reply, an [`artifacts::Answer`].
    pub async fn run(&self, item: &Item, cx: &ItemContext) -> Result<Value, StageError> {
        let input = ItemInput::read(item)?;
        let answer = self.candidate.chat(&input.messages, &self.settings, input.seed.unwrap_or(cx.seed), None, cx).await.map_err(StageError::new)?;
        Ok(serde_json::to_value(answer).expect("answers serialize"))
    }
}

/// A model call's memoized input ([`Candidate::item_input`]): every key but `model`,
/// `sampler` and `messages` is left out where it does not apply, so the keys of items that
/// predate it stay as they were.
#[derive(Serialize, Deserialize)]
struct ItemInput {
    model: String,
    #[serde(flatten)]
    pin: Pin,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    engine: Option<String>,
    /// Embedded only, and written as `null` when the weights are used as they are.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "artifacts::present")]
    prepare: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    /// The settings as configured (read back by nothing: the stage has them).
    sampler: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    think: Option<String>,
    /// What a sampled answer is drawn with (only when it samples).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    /// Functions the model may call (only for a sample that has them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tools: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tool_choice: Option<ToolChoice>,
    messages: Vec<Message>,
}

impl ItemInput {
    fn read(item: &Item) -> Result<ItemInput, StageError> {
        ItemInput::deserialize(&item.input).map_err(|e| StageError::new(format!("the input of item `{}` is malformed: {e}", item.id)))
    }
}

impl StagePlugin for Infer {
    type Config = InferConfig;
    const KIND: &'static str = "infer";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "candidate models answer every rendered sample (embedded mistral.rs; one memoized item per sample × model)";
    const INPUTS: &'static [Port] =
        &[Port::new("rendered", Rendered::TYPE), Port::optional("candidates", Candidates::TYPE), Port::optional("finetuned", FineTuned::TYPE)];
    const OUTPUT: &'static str = Answers::TYPE;

    fn build(config: InferConfig, cx: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        let (catalog, catalog_path) = Catalog::load_for_stage(&config.catalog, cx)?;
        let mut errors = Vec::new();
        let output = config.output.as_ref().map(|o| (o.get_ref().clone(), o.span()));
        if let Some((constraint, span)) = &output
            && let Err(e) = constraint.check()
        {
            errors.push(cx.error_at(Some(span.clone()), e, "this constraint"));
        }
        if let Err(e) = config.sampler.check() {
            errors.push(cx.error_at(cx.key("sampler"), e, "these settings"));
        }
        let max_in_flight = match &config.max_in_flight {
            None => DEFAULT_MAX_IN_FLIGHT,
            Some(n) if (1..=embedded::MAX_SEQS).contains(n.get_ref()) => *n.get_ref(),
            Some(n) => {
                errors.push(cx.error_at(Some(n.span()), format!("`max_in_flight` is {}: it must be 1 to {}", n.get_ref(), embedded::MAX_SEQS), "out of range"));
                DEFAULT_MAX_IN_FLIGHT
            }
        };
        if let Some(tag) = &config.think
            && (tag.get_ref().is_empty() || !tag.get_ref().chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        {
            errors.push(
                cx.error_at(Some(tag.span()), format!("`think = {:?}` is not a tag name: letters, digits, `_` and `-` (`think` reads `<think>…</think>`)", tag.get_ref()), "not a tag")
                    .help("write the tag's name without its brackets: `think = \"think\"`"),
            );
        }
        let repeats = match &config.repeats {
            None => 1,
            Some(n) if (1..=MAX_REPEATS).contains(n.get_ref()) => *n.get_ref(),
            Some(n) => {
                errors.push(cx.error_at(Some(n.span()), format!("`repeats` is {}: it must be 1 to {MAX_REPEATS}", n.get_ref()), "out of range"));
                1
            }
        };
        let device = *config.device.get_ref();
        if device != DeviceSpec::Cpu && !cfg!(feature = "cuda") {
            errors.push(
                cx.error_at(Some(config.device.span()), "this build of `pipeline` has no CUDA support", "needs the `cuda` feature")
                    .help("build with `cargo build --release --features cuda` (README: GPU), or use `device = \"cpu\"`"),
            );
        }
        let roster = Roster::build(&catalog, &config.catalog, &config.models, output.as_ref(), &config.http, &config.sampler, cx, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        let catalog_dir = catalog_path.parent().map(PathBuf::from).unwrap_or_default();
        // Items of all candidates share one limit: enough for each backend's own.
        let concurrency = roster
            .candidates
            .iter()
            .map(|c| if c.is_http() { config.http.max_concurrency.0 } else { max_in_flight })
            .max()
            .unwrap_or(1);
        let think = config.think.as_ref().map(|t| t.get_ref().clone());
        // Greedy decoding draws the same answer every time: one is computed.
        let drawn = if config.sampler.samples() { repeats } else { 1 };
        let settings = RunSettings { sampler: config.sampler, prepare: config.prepare, output: output.map(|(c, _)| c), think, repeats: drawn, tool_choice: config.tool_choice, device, catalog_dir };
        Ok(Arc::new(InferStage { settings, roster, concurrency, repeats }))
    }
}

struct InferStage {
    settings: RunSettings,
    roster: Roster,
    /// Items the engine keeps in flight.
    concurrency: usize,
    /// `repeats` as configured (`settings.repeats` is how many are drawn).
    repeats: usize,
}

/// The candidates of a stage that runs models (`infer`, `capacity`): those its `models` name, or
/// those a `license_filter` input lets through; and those a `finetune` input trained.
pub struct Roster {
    candidates: Vec<Arc<Candidate>>,
    /// Models a `finetune` input trained, known once it runs.
    tuned: std::sync::Mutex<Vec<Arc<Candidate>>>,
    /// `models` was set; otherwise a `candidates` input must say which run.
    models_from_config: bool,
}

impl Roster {
    /// The models `models` names (without it, every runnable model of the catalog, for a
    /// `license_filter` input to choose from), each problem pushed to `errors`.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        catalog: &Catalog,
        catalog_name: &Spanned<String>,
        models: &[Spanned<String>],
        output: Option<&(OutputConstraint, std::ops::Range<usize>)>,
        http: &http::HttpSettings,
        sampler: &Sampler,
        cx: &BuildContext,
        errors: &mut Vec<Diagnostic>,
    ) -> Roster {
        let mut candidates = Vec::new();
        // Without `models`, every runnable catalog model is prepared, and a `license_filter` stage
        // in `needs` says which ones run (checked when the stage runs).
        let wanted: Vec<(&String, Option<std::ops::Range<usize>>)> = if models.is_empty() {
            catalog.models.iter().filter(|m| m.runnable_source().is_some()).map(|m| (&m.id, None)).collect()
        } else {
            models.iter().map(|m| (m.get_ref(), Some(m.span()))).collect()
        };
        for (id, span) in wanted {
            match Candidate::resolve(ModelRef { catalog, catalog_name: catalog_name.get_ref(), id, span, output, http }, cx) {
                Ok(c) => {
                    if let Err(e) = sampler.check_context(&c) {
                        errors.push(cx.error_at(cx.key("sampler"), e, "these settings"));
                    }
                    candidates.push(Arc::new(c));
                }
                Err(e) => errors.push(e),
            }
        }
        Roster { candidates, tuned: Default::default(), models_from_config: !models.is_empty() }
    }

    /// Every candidate the config names (or the catalog has), fine-tuned ones aside.
    pub fn configured(&self) -> &[Arc<Candidate>] {
        &self.candidates
    }

    /// The candidates that run: those a `license_filter` input lets through, else `models`; then
    /// those a `finetune` input trained.
    pub fn active(&self, input: &StageInput) -> Result<Vec<Arc<Candidate>>, StageError> {
        let tuned: Vec<Arc<Candidate>> = match input.read_optional::<FineTuned>("finetuned")? {
            Some(f) => f.models.iter().map(|m| Arc::new(Candidate::tuned(m))).collect(),
            None => Vec::new(),
        };
        *self.tuned.lock().expect("not poisoned") = tuned.clone();
        let mut active: Vec<Arc<Candidate>> = match input.has("candidates").then(|| input.input("candidates")).transpose()? {
            None if !self.models_from_config && tuned.is_empty() => {
                return Err(StageError::new("no models to run: set `models`, or put a `license_filter` or `finetune` stage in `needs`"));
            }
            None => self.candidates.iter().filter(|_| self.models_from_config).cloned().collect(),
            Some(policy) => {
                let policy = Candidates::read(policy).map_err(StageError::new)?;
                policy
                    .included
                    .iter()
                    .map(|m| {
                        let id = &m.id;
                        self.candidates.iter().find(|c| c.id == *id).cloned().ok_or_else(|| {
                            StageError::new(format!("model `{id}` passed the policy but is not a runnable model of this stage's catalog (or not in its `models`)"))
                        })
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        for t in tuned {
            if active.iter().any(|c| c.id == t.id) {
                return Err(StageError::new(format!("the fine-tuned model `{}` has the id of a candidate already: give it another (`id` in its stage)", t.id)));
            }
            active.push(t);
        }
        Ok(active)
    }

    /// A candidate by id, fine-tuned ones included (once [`Roster::active`] has seen them).
    pub fn candidate(&self, id: &str) -> Option<Arc<Candidate>> {
        self.candidates.iter().find(|c| c.id == id).cloned().or_else(|| self.tuned.lock().expect("not poisoned").iter().find(|c| c.id == id).cloned())
    }
}

#[async_trait::async_trait]
impl Stage for InferStage {
    fn pins(&self) -> engine::Pins {
        self.roster.candidates.iter().map(|c| (c.id.clone(), c.pins(&self.settings))).collect()
    }

    /// Models known only at run time (a `finetune` stage's): their weights' digest, from the
    /// answers (the `finetune` stage's own pins list their files).
    fn output_pins(&self, output: &dyn Fn() -> Option<Value>) -> engine::Pins {
        let Some(Ok(answers)) = output().map(|v| Answers::read(&v)) else { return engine::Pins::new() };
        answers
            .models
            .iter()
            .filter(|(id, _)| !self.roster.candidates.iter().any(|c| &c.id == *id))
            .filter_map(|(id, m)| Some((id.clone(), [("weights_sha256".to_string(), m.pin.weights_sha256.clone()?)].into())))
            .collect()
    }

    fn resolved(&self) -> Option<Value> {
        let pins = |embedded: bool| -> serde_json::Map<String, Value> {
            self.roster
                .candidates
                .iter()
                .filter_map(|c| match (&c.backend, embedded) {
                    (Backend::Embedded { sha256, .. }, true) => Some((c.id.clone(), json!(sha256))),
                    (Backend::Http(e), false) => Some((c.id.clone(), json!(e.model))),
                    _ => None,
                })
                .collect()
        };
        let (weights, served) = (pins(true), pins(false));
        // Embedded-only stages resolve as they always did, so their fingerprints stay put.
        Some(if served.is_empty() { json!({"weights": weights}) } else { json!({"weights": weights, "served_models": served}) })
    }

    fn items(&self, input: &StageInput) -> Result<Vec<Item>, StageError> {
        let rendered: Rendered = input.read("rendered")?;
        let mut items = Vec::with_capacity(rendered.samples.len() * self.roster.candidates.len());
        // Sample-major: with candidates on different backends, each has items in flight at once.
        let active = self.roster.active(input)?;
        for s in &rendered.samples {
            for c in &active {
                for r in 0..self.settings.repeats {
                    // The first answer keeps the id a single answer always had.
                    let id = if r == 0 { format!("{}/{}", c.id, s.id) } else { format!("{}/{}#{}", c.id, s.id, r + 1) };
                    items.push(Item { id, input: c.item_input_with_tools(&self.settings, s.messages.clone(), s.tools.clone(), repeat_seed(input.seed, r)) });
                }
            }
        }
        Ok(items)
    }

    async fn run_item(&self, item: &Item, cx: &ItemContext) -> Result<Value, StageError> {
        let input = ItemInput::read(item)?;
        let candidate = self.roster.candidate(&input.model).ok_or_else(|| StageError::new(format!("unknown model `{}`", input.model)))?;
        let answer = candidate.chat(&input.messages, &self.settings, input.seed.unwrap_or(cx.seed), input.tools.as_deref(), cx).await.map_err(StageError::new)?;
        Ok(serde_json::to_value(answer).expect("answers serialize"))
    }

    fn item_concurrency(&self) -> usize {
        self.concurrency
    }

    fn notes(&self) -> Vec<String> {
        if self.repeats > 1 && !self.settings.sampler.samples() {
            vec![format!(
                "repeats = {}: temperature is 0, and greedy decoding draws the same answer every time, so one answer per sample and model is computed and counts for all {}",
                self.repeats, self.repeats
            )]
        } else {
            Vec::new()
        }
    }

    fn volatile_keys(&self) -> &'static [&'static str] {
        &["timing", "transport"]
    }

    fn finish(&self, input: &StageInput, results: Vec<(Item, Value)>) -> Result<Value, StageError> {
        let rendered: Rendered = input.read("rendered")?;
        let mut models = BTreeMap::new();
        // `items` is sample-major, then candidate, then repeat; results come back in `items` order.
        let active = self.roster.active(input)?;
        let (k, n) = (active.len(), self.settings.repeats);
        if results.len() != rendered.samples.len() * k * n {
            return Err(StageError::new(format!("expected {} answers, got {}", rendered.samples.len() * k * n, results.len())));
        }
        for (i, c) in active.iter().enumerate() {
            let mut runs: Vec<Vec<artifacts::Answer>> = (0..n)
                .map(|r| {
                    rendered
                        .samples
                        .iter()
                        .zip(results.iter().skip(i * n + r).step_by(k * n))
                        .map(|(sample, (item, answer))| {
                            let answer = artifacts::Answer::deserialize(answer).map_err(|e| StageError::new(format!("the answer of `{}` is malformed: {e}", item.id)))?;
                            Ok(artifacts::Answer { id: sample.id.clone(), ..answer })
                        })
                        .collect::<Result<Vec<_>, StageError>>()
                })
                .collect::<Result<_, StageError>>()?;
            let answers = runs.remove(0);
            // Timing and reasoning cost over every answer drawn.
            let all: Vec<&artifacts::Answer> = answers.iter().chain(runs.iter().flatten()).collect();
            let latencies: Vec<f64> = all.iter().map(|a| a.timing.latency_ms).collect();
            let completion: usize = all.iter().map(|a| a.completion_tokens).sum();
            let transport = |a: &artifacts::Answer, key: &str| a.transport.as_ref().and_then(|t| t.get(key)).cloned();
            let redone = all.iter().filter(|a| transport(a, "redone_alone") == Some(Value::Bool(true))).count();
            let busy_s = latencies.iter().sum::<f64>() / 1000.0;
            let mut timing = ModelTiming {
                latency_p50_ms: percentile(&latencies, 0.50),
                latency_p95_ms: percentile(&latencies, 0.95),
                decode_tokens_per_s: None,
                busy_s: Some(busy_s),
                tokens_per_s: (busy_s > 0.0).then(|| completion as f64 / busy_s),
            };
            let reasoned: Vec<&artifacts::Answer> = all.iter().copied().filter(|a| a.reasoning.is_some()).collect();
            let reasoning = self.settings.think.as_ref().map(|_| {
                let reasoning_tokens: usize = reasoned.iter().filter_map(|a| a.reasoning_tokens).sum();
                artifacts::ReasoningCost {
                    answers: reasoned.len(),
                    reasoning_tokens,
                    counted: reasoned.iter().filter(|a| a.reasoning_tokens.is_some()).count(),
                    answer_tokens: completion.saturating_sub(reasoning_tokens),
                }
            });
            let mut entry = ModelAnswers { pin: c.pin(), answers: Vec::new(), timing: timing.clone(), transport: None, reasoning, repeats: Vec::new() };
            match &c.backend {
                Backend::Embedded { .. } => {
                    let decode_s: f64 = all.iter().filter_map(|a| a.timing.decode_ms).sum::<f64>() / 1000.0;
                    timing.decode_tokens_per_s = Some(if decode_s > 0.0 { completion as f64 / decode_s } else { 0.0 });
                    if redone > 0 {
                        // Failed with others in flight, answered alone (volatile, like all of `transport`).
                        entry.transport = Some(json!({"redone_alone": redone}));
                    }
                }
                Backend::Http(endpoint) => {
                    // Retries of items computed in this run (cached answers keep their own count).
                    let attempts: Vec<u64> = all.iter().filter_map(|a| transport(a, "attempts")?.as_u64()).collect();
                    entry.transport = Some(json!({
                        "retries": attempts.iter().map(|a| a.saturating_sub(1)).sum::<u64>(),
                        "items_retried": attempts.iter().filter(|&&a| a > 1).count(),
                        "concurrency_limit_at_end": endpoint.concurrency_limit(),
                    }));
                }
            }
            entry.timing = timing;
            entry.answers = answers;
            entry.repeats = runs;
            models.insert(c.id.clone(), entry);
        }
        let answers = Answers {
            sampler: serde_json::to_value(&self.settings.sampler).expect("sampler serializes"),
            prepare: serde_json::to_value(self.settings.prepare).expect("prepare serializes"),
            models,
            output: self.settings.output.as_ref().map(|o| serde_json::to_value(o).expect("constraints serialize")),
            repeats: (self.repeats > 1).then_some(self.repeats),
        };
        Ok(answers.to_json())
    }
}

fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}
