//! `finetune`: LoRA supervised fine-tuning of a catalog model on the dev split, merged into a
//! model directory that `infer` runs as one more candidate.
//!
//! The trainer is PyTorch + transformers + peft (`train.py`, pinned versions in [`PACKAGES`]),
//! installed into a virtual environment on first use. One item: the training run. Its input is
//! everything the trained weights depend on: the base weights' digest, every training example
//! as sent, the hyperparameters, the trainer's packages, its script and the kernels it is pinned
//! to. So a rerun with nothing changed trains nothing, and `run --locked` never silently trains
//! into another model: training is deterministic (one thread, deterministic algorithms, seeded;
//! two runs give the same bytes, which the test suite checks), and the CPU kernels are pinned
//! to AVX2 so that another CPU generation computes the same numbers.
//!
//! With `adapter`, nothing is trained: a LoRA adapter trained elsewhere (a PEFT directory) is
//! merged into the base the same way, and the merged model is a candidate like a trained one.
//! A trained adapter is kept beside its merged model (`adapter/`), and merging it again gives
//! the same bytes as the trained model (tested).
//!
//! Training data is a `training_data` stage's set ([`data`]): dev samples only, never held-out.
//! `method = "sft"` learns its supervised examples; `"dpo"` its preference pairs (direct
//! preference optimization, the reference being the base: the adapter switched off). The merged model is
//! written into a temporary directory and moved into this machine's model cache under the
//! digest of its files only once complete, so a killed run leaves nothing that could become a
//! candidate; its item is not memoized, and the rerun trains again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use artifacts::{Artifact, FineTuned, Message, TrainTiming, TrainingSet, TunedModel};
use catalog::{Catalog, Source, WeightsFormat};
use engine::diag::Diagnostic;
use engine::{BuildContext, Item, ItemContext, Port, Stage, StageError, StageInput, StagePlugin};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncBufReadExt;
use toml::Spanned;

pub mod data;

pub use data::TrainingData;

pub struct Finetune;

/// The trainer's packages, pinned; the environment is rebuilt when this changes.
pub const PACKAGES: &[&str] = &["torch==2.15.0", "transformers==5.23.0", "peft==0.21.2", "gguf==0.19.0", "safetensors==0.8.0", "accelerate==1.15.0"];

/// Every package those pull in, pinned too (pip constraints, from `pip freeze`): an unpinned
/// tokenizers, numpy or jinja2 resolved later on another machine could train other bytes.
const CONSTRAINTS: &str = include_str!("constraints.txt");

/// The training script, in every item's key by digest.
const TRAIN_PY: &str = include_str!("train.py");

/// The CPU kernels training is pinned to (environment of the trainer): AVX2 in PyTorch's own
/// kernels and in MKL's (conditional numerical reproducibility), one thread; without the pin a CPU
/// with AVX-512 picks other kernels. MKL honours the AVX2 branch on Intel's CPUs only: on AMD's,
/// `MKL_VERBOSE=1` shows `CNR:AUTO`, its default path (AMD EPYCs have trained the same bytes as an
/// earlier Intel machine under the AVX2 branch). Machines of one kind train the same bytes; Intel
/// Sapphire Rapids VMs train other bytes than those (BENCHMARKS.md), and `scripts/train_kernels`
/// finds where.
const KERNELS: &[(&str, &str)] = &[("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_CBWR", "AVX2"), ("OMP_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1")];

/// Fewer dev examples than this cannot teach a model a task.
pub const MIN_EXAMPLES: usize = 8;

/// `method` of a model merged from an adapter trained elsewhere.
const IMPORT: &str = "lora-import";

/// The files of a PEFT LoRA adapter directory that `adapter` merges.
const ADAPTER_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// The settings that only training reads (an error beside `adapter`).
const TRAINING_KEYS: [&str; 7] = ["method", "beta", "lora", "epochs", "max_steps", "learning_rate", "batch_size"];

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// Model catalog, relative to the pipeline file.
    #[schemars(with = "String")]
    pub catalog: Spanned<String>,
    /// The catalog model to train from (weights that run in-process: GGUF or a Hugging Face
    /// model directory).
    #[schemars(with = "String")]
    pub base: Spanned<String>,
    /// The trained model's candidate id (default: the base's id with `+lora`).
    pub id: Option<String>,
    /// Merge this LoRA adapter, trained elsewhere, into `base` instead of training one: a PEFT
    /// adapter directory (`adapter_config.json`, `adapter_model.safetensors`), relative to the
    /// pipeline file, both files pinned by content. Takes no training data and no training settings.
    #[schemars(with = "Option<String>")]
    pub adapter: Option<Spanned<String>>,
    /// What the model learns: `sft`, the supervised examples' answers; `dpo`, to prefer the
    /// wanted answer of each preference pair over the failed one.
    #[serde(default)]
    pub method: Method,
    /// DPO only: how far the model may move from its base (the loss's β; smaller, further).
    #[serde(default = "default_beta")]
    pub beta: f64,
    #[serde(default)]
    pub lora: Lora,
    /// Passes over the training examples.
    #[serde(default = "default_epochs")]
    #[schemars(range(min = 1))]
    pub epochs: u32,
    /// Stop after this many optimizer steps (default: every epoch).
    #[schemars(range(min = 1))]
    pub max_steps: Option<u32>,
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    /// Examples per optimizer step.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1))]
    pub batch_size: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    #[default]
    Sft,
    Dpo,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Sft => "lora-sft",
            Method::Dpo => "lora-dpo",
        }
    }
}

/// The LoRA adapter: rank, scale, dropout, and the modules it adapts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Lora {
    #[serde(default = "default_rank")]
    #[schemars(range(min = 1))]
    pub rank: u32,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    /// Linear layers adapted (the names in the model's Hugging Face implementation).
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
}

impl Default for Lora {
    fn default() -> Self {
        Lora { rank: default_rank(), alpha: default_alpha(), dropout: 0.0, target_modules: default_targets() }
    }
}

fn default_epochs() -> u32 {
    3
}
fn default_learning_rate() -> f64 {
    2e-4
}
fn default_batch_size() -> u32 {
    8
}
fn default_beta() -> f64 {
    0.1
}
fn default_rank() -> u32 {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_targets() -> Vec<String> {
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].map(String::from).to_vec()
}

/// One supervised example as the trainer gets it: the messages, and the answer to learn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub messages: Vec<Message>,
    pub answer: String,
}

/// One preference pair as the trainer gets it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    pub messages: Vec<Message>,
    pub chosen: String,
    pub rejected: String,
}

struct FinetuneStage {
    id: String,
    base: String,
    source: Source,
    base_sha256: String,
    catalog_dir: PathBuf,
    /// The base's catalog facts, carried into the trained model.
    license: String,
    family: String,
    origin: String,
    params: (f64, f64),
    context_tokens: Option<u32>,
    method: Method,
    hyperparameters: Value,
    /// `adapter`: as written, its files' paths as declared to the engine and on disk.
    adapter: Option<Adapter>,
    /// The stage's id and where it is written, for the checks of its inputs.
    stage_id: String,
    at: std::ops::Range<usize>,
}

struct Adapter {
    written: String,
    span: std::ops::Range<usize>,
    files: Vec<(String, String, PathBuf)>,
}

impl StagePlugin for Finetune {
    type Config = FinetuneConfig;
    const KIND: &'static str = "finetune";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "LoRA fine-tuning (SFT or DPO) of a catalog model on a training_data set (PyTorch + peft), or an adapter trained elsewhere, merged into a model infer runs as a candidate";
    const INPUTS: &'static [Port] = &[Port::optional("data", TrainingSet::TYPE)];
    const OUTPUT: &'static str = FineTuned::TYPE;

    fn build(config: FinetuneConfig, cx: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        let (catalog, path) = Catalog::load_for_stage(&config.catalog, cx)?;
        let mut errors = Vec::new();
        let id = config.base.get_ref();
        let Some(model) = catalog.get(id) else {
            return Err(vec![cx.error_at(Some(config.base.span()), format!("model `{id}` is not in `{}`", config.catalog.get_ref()), "unknown model").suggest(id, &catalog.ids(), "the catalog has")]);
        };
        let source = model.runnable_source().filter(|s| s.weights_sha256().is_some());
        let Some(source) = source else {
            return Err(vec![cx
                .error_at(Some(config.base.span()), format!("model `{id}` has no weights on this machine to train"), "no weights")
                .help("the trainer needs the weights in-process: a `python_package`, `local_file` or `local_dir` source, or a `hugging_face` one that pins a commit `revision` and its `files` (a model served over HTTP cannot be fine-tuned here)")]);
        };
        if !(config.learning_rate.is_finite() && config.learning_rate > 0.0 && config.learning_rate < 1.0) {
            errors.push(cx.error_at(cx.key("learning_rate"), format!("`learning_rate` is {}: it must be above 0 and below 1", config.learning_rate), "out of range"));
        }
        if config.method == Method::Dpo && !(config.beta.is_finite() && config.beta > 0.0) {
            errors.push(cx.error_at(cx.key("beta"), format!("`beta` is {}: it must be above 0", config.beta), "out of range"));
        }
        if config.epochs == 0 {
            errors.push(cx.error_at(cx.key("epochs"), "`epochs` is 0: train at least one", "out of range"));
        }
        if config.batch_size == 0 || config.max_steps == Some(0) {
            errors.push(cx.error_at(cx.key(if config.batch_size == 0 { "batch_size" } else { "max_steps" }), "must be at least 1", "out of range"));
        }
        let lora = &config.lora;
        if lora.rank == 0 || !(lora.alpha.is_finite() && lora.alpha > 0.0) || !(0.0..1.0).contains(&lora.dropout) || lora.target_modules.is_empty() {
            errors.push(cx.error_at(cx.key("lora"), "LoRA needs `rank` ≥ 1, `alpha` > 0, `dropout` in [0, 1) and at least one of `target_modules`", "these settings"));
        }
        if let Some(new_id) = &config.id
            && (new_id.is_empty() || new_id.contains(['/', ' ']) || catalog.get(new_id).is_some())
        {
            errors.push(cx.error_at(cx.key("id"), format!("`{new_id}` cannot name the trained model: use a new id without `/` or spaces, unlike any catalog model"), "this id"));
        }
        let adapter = match &config.adapter {
            None => None,
            Some(dir) => {
                for key in TRAINING_KEYS {
                    if let Some(span) = cx.key(key) {
                        errors.push(cx.error_at(Some(span), format!("`{key}` is a training setting, and with `adapter` nothing is trained"), "not with `adapter`").help("remove it, or remove `adapter` to train"));
                    }
                }
                match load_adapter(dir, cx) {
                    Ok(adapter) => Some(adapter),
                    Err(e) => {
                        errors.push(e);
                        None
                    }
                }
            }
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut hyperparameters = json!({
            "lora": config.lora,
            "epochs": config.epochs,
            "max_steps": config.max_steps,
            "learning_rate": config.learning_rate,
            "batch_size": config.batch_size,
        });
        if config.method == Method::Dpo {
            hyperparameters["beta"] = json!(config.beta);
        }
        Ok(Arc::new(FinetuneStage {
            id: config.id.clone().unwrap_or_else(|| format!("{id}+lora")),
            base: id.clone(),
            base_sha256: source.weights_sha256().expect("checked above"),
            source: source.clone(),
            catalog_dir: path.parent().map(PathBuf::from).unwrap_or_default(),
            license: model.license.clone(),
            family: model.family.clone(),
            origin: model.origin.clone(),
            params: (model.params_total_b, model.params_active_b),
            context_tokens: model.context_tokens,
            method: config.method,
            hyperparameters,
            adapter,
            stage_id: cx.stage_id.to_string(),
            at: cx.stage_span(),
        }))
    }
}

/// The adapter directory's files, declared to the engine (digested into the fingerprint), and its
/// config checked to be a LoRA adapter.
fn load_adapter(dir: &Spanned<String>, cx: &mut BuildContext) -> Result<Adapter, Diagnostic> {
    let mut files = Vec::new();
    for name in ADAPTER_FILES {
        let written = Path::new(dir.get_ref()).join(name).to_string_lossy().into_owned();
        let path = cx.file(&engine::FileRef { path: written.clone(), span: Some(dir.span()) }).map_err(|d| d.help(format!("a PEFT LoRA adapter directory holds {} (what peft's `save_pretrained` writes)", ADAPTER_FILES.join(" and "))))?;
        files.push((name.to_string(), written, path));
    }
    let config = std::fs::read(&files[0].2).map_err(|e| cx.error_at(Some(dir.span()), format!("{}: {e}", files[0].1), "cannot read"))?;
    let peft_type = serde_json::from_slice::<Value>(&config).ok().and_then(|c| c.get("peft_type").and_then(Value::as_str).map(String::from));
    if peft_type.as_deref() != Some("LORA") {
        let found = peft_type.map_or("no `peft_type`".to_string(), |t| format!("`peft_type` {t}"));
        return Err(cx.error_at(Some(dir.span()), format!("`{}` is not a LoRA adapter's config: {found}", files[0].1), "not a LoRA adapter").help("only LoRA adapters (`\"peft_type\": \"LORA\"`) are merged"));
    }
    Ok(Adapter { written: dir.get_ref().clone(), span: dir.span(), files })
}

/// What a training run depends on: its memo key.
#[derive(Serialize, Deserialize)]
struct TrainInput {
    base: String,
    base_weights_sha256: String,
    method: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    examples: Vec<Example>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pairs: Vec<Pair>,
    hyperparameters: Value,
    trainer: BTreeMap<String, String>,
}

/// The trainer as it enters every key and the artifact.
fn trainer_pins() -> BTreeMap<String, String> {
    let mut pins = BTreeMap::new();
    pins.insert("packages".into(), PACKAGES.join(" "));
    pins.insert("constraints_sha256".into(), sha256_hex(CONSTRAINTS.as_bytes()));
    pins.insert("script_sha256".into(), sha256_hex(TRAIN_PY.as_bytes()));
    pins.insert("kernels".into(), KERNELS.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "));
    pins
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[async_trait::async_trait]
impl Stage for FinetuneStage {
    fn resolved(&self) -> Option<Value> {
        Some(json!({"base_weights_sha256": self.base_sha256, "trainer": trainer_pins()}))
    }

    fn pins(&self) -> engine::Pins {
        let mut pins = trainer_pins();
        pins.insert("base_weights_sha256".into(), self.base_sha256.clone());
        [(self.id.clone(), pins)].into()
    }

    fn check_inputs(&self, pipeline: &engine::diag::SourceFile, facts: &BTreeMap<String, Value>) -> Vec<Diagnostic> {
        match (&self.adapter, facts.contains_key("data")) {
            (Some(adapter), true) => vec![Diagnostic::error(format!("stage `{}`: an adapter is merged, not trained, but `needs` hands this stage a training set", self.stage_id)).at(pipeline, adapter.span.clone(), "merged, not trained").help("take the `training_data` stage out of `needs`, or remove `adapter` to train")],
            (None, false) => vec![Diagnostic::error(format!("stage `{}`: nothing to train on: `needs` has no `training_data` stage", self.stage_id)).at(pipeline, self.at.clone(), "this stage").help("put a `training_data` stage in `needs`, or set `adapter` to merge one trained elsewhere")],
            _ => Vec::new(),
        }
    }

    fn output_pins(&self, output: &dyn Fn() -> Option<Value>) -> engine::Pins {
        let Some(Ok(tuned)) = output().map(|v| FineTuned::read(&v)) else { return engine::Pins::new() };
        tuned
            .models
            .iter()
            .map(|m| {
                let mut pins: BTreeMap<String, String> = m.files.iter().map(|(name, sha)| (format!("file {name}"), sha.clone())).collect();
                pins.insert("weights_sha256".into(), m.weights_sha256.clone());
                pins.extend(m.adapter.iter().map(|(name, sha)| (format!("adapter {name}"), sha.clone())));
                if m.method == IMPORT {
                    // Trained on nothing here: no training data to name.
                    pins.insert("merged".into(), format!("a LoRA adapter trained elsewhere into {}", m.base));
                } else {
                    pins.insert("data_sha256".into(), m.data_sha256.clone());
                    pins.insert("trained".into(), format!("{} from {} on {} examples, {} steps", m.method, m.base, m.examples, m.steps));
                }
                (m.id.clone(), pins)
            })
            .collect()
    }

    fn items(&self, input: &StageInput) -> Result<Vec<Item>, StageError> {
        if let Some(adapter) = &self.adapter {
            let files: BTreeMap<&str, String> = adapter.files.iter().map(|(name, written, _)| Ok((name.as_str(), sha256_hex(input.file(&engine::FileRef { path: written.clone(), span: None })?)))).collect::<Result<_, StageError>>()?;
            let merge = TrainInput {
                base: self.base.clone(),
                base_weights_sha256: self.base_sha256.clone(),
                method: IMPORT.into(),
                examples: Vec::new(),
                pairs: Vec::new(),
                hyperparameters: json!({"adapter": files}),
                trainer: trainer_pins(),
            };
            return Ok(vec![Item { id: self.id.clone(), input: serde_json::to_value(merge).expect("merge inputs serialize") }]);
        }
        let set: TrainingSet = input.read("data")?;
        let (examples, pairs) = match self.method {
            Method::Sft => (set.sft.into_iter().map(|e| Example { messages: e.messages, answer: e.answer }).collect::<Vec<_>>(), Vec::new()),
            Method::Dpo => (Vec::new(), set.dpo.into_iter().map(|p| Pair { messages: p.messages, chosen: p.chosen, rejected: p.rejected }).collect::<Vec<_>>()),
        };
        let count = examples.len() + pairs.len();
        if count < MIN_EXAMPLES {
            let what = match self.method {
                Method::Sft => "supervised examples (dev samples with an answer to learn)",
                Method::Dpo => "preference pairs (failed dev answers: put the `cluster` and `infer` stages in the `training_data` stage's `needs`, or label answers as failing)",
            };
            return Err(StageError::new(format!("{count} {what}: fine-tuning needs at least {MIN_EXAMPLES}")));
        }
        let train = TrainInput {
            base: self.base.clone(),
            base_weights_sha256: self.base_sha256.clone(),
            method: self.method.name().into(),
            examples,
            pairs,
            hyperparameters: self.hyperparameters.clone(),
            trainer: trainer_pins(),
        };
        Ok(vec![Item { id: self.id.clone(), input: serde_json::to_value(train).expect("training inputs serialize") }])
    }

    async fn run_item(&self, item: &Item, cx: &ItemContext) -> Result<Value, StageError> {
        let train = TrainInput::deserialize(&item.input).map_err(|e| StageError::new(format!("the input of item `{}` is malformed: {e}", item.id)))?;
        let (source, base) = (self.source.clone(), self.catalog_dir.clone());
        let weights = tokio::task::spawn_blocking(move || catalog::fetch::resolve(&source, &base))
            .await
            .map_err(|e| StageError::new(e.to_string()))?
            .map_err(|e| StageError::new(format!("the base model `{}`: {e}", self.base)))?;
        let python = trainer::ensure().await.map_err(StageError::new)?;
        let trained = trainer::run(&python, &weights, &train, self.adapter.as_ref(), cx).await.map_err(StageError::new)?;
        let adapter = match &self.adapter {
            // The adapter merged: its files as the key pins them.
            Some(_) => train.hyperparameters["adapter"].as_object().into_iter().flatten().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect(),
            None => trained.adapter,
        };
        let data = if train.pairs.is_empty() { serde_json::to_vec(&train.examples) } else { serde_json::to_vec(&train.pairs) }.expect("examples serialize");
        let model = TunedModel {
            id: item.id.clone(),
            base: self.base.clone(),
            base_weights_sha256: self.base_sha256.clone(),
            license: self.license.clone(),
            family: self.family.clone(),
            origin: self.origin.clone(),
            params_total_b: self.params.0,
            params_active_b: self.params.1,
            context_tokens: self.context_tokens,
            method: train.method.clone(),
            weights_sha256: catalog::files_digest(&trained.files),
            files: trained.files,
            adapter,
            examples: train.examples.len() + train.pairs.len(),
            data_sha256: sha256_hex(&data),
            hyperparameters: train.hyperparameters.clone(),
            trainer: train.trainer.clone(),
            steps: trained.steps,
            final_loss: trained.final_loss,
            timing: Some(TrainTiming { train_s: trained.seconds }),
        };
        Ok(serde_json::to_value(model).expect("models serialize"))
    }

    fn volatile_keys(&self) -> &'static [&'static str] {
        &["timing"]
    }

    fn finish(&self, _input: &StageInput, results: Vec<(Item, Value)>) -> Result<Value, StageError> {
        let models: Vec<TunedModel> = results
            .into_iter()
            .map(|(item, v)| TunedModel::deserialize(&v).map_err(|e| StageError::new(format!("the result of `{}` is malformed: {e}", item.id))))
            .collect::<Result<_, _>>()?;
        let summary = models
            .iter()
            .map(|m| match m.method.as_str() {
                IMPORT => format!("{} merged from {} and an adapter trained elsewhere", m.id, m.base),
                _ => format!("{} trained from {} on {} dev examples ({} steps, final loss {})", m.id, m.base, m.examples, m.steps, m.final_loss.map_or("n/a".into(), |l| format!("{l:.3}"))),
            })
            .collect::<Vec<_>>()
            .join("; ");
        Ok(FineTuned { models, summary }.to_json())
    }
}

mod trainer {
    use super::*;

    pub struct Trained {
        pub files: BTreeMap<String, String>,
        /// The adapter's files (`adapter/` in the model directory), for a trained one.
        pub adapter: BTreeMap<String, String>,
        pub steps: u64,
        pub final_loss: Option<f64>,
        pub seconds: f64,
    }

    /// The virtual environment: `$PIPELINE_TRAIN_VENV`, else `~/.cache/pipeline-train-venv`.
    fn venv() -> PathBuf {
        if let Some(dir) = std::env::var_os("PIPELINE_TRAIN_VENV") {
            return PathBuf::from(dir);
        }
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into())).join(".cache/pipeline-train-venv")
    }

    /// The trainer's Python, installing [`PACKAGES`] into the environment first if it lacks them
    /// (about 3 GB from the package index; minutes).
    pub async fn ensure() -> Result<PathBuf, String> {
        let dir = venv();
        let python = dir.join("bin/python");
        let marker = dir.join(".pipeline-trainer");
        let wanted = format!("{}\n{CONSTRAINTS}", PACKAGES.join("\n"));
        if python.is_file() && std::fs::read_to_string(&marker).is_ok_and(|m| m == wanted) {
            return Ok(python);
        }
        tracing::warn!(venv = %dir.display(), "installing the trainer (PyTorch, transformers, peft: about 3 GB, a few minutes)");
        let started = Instant::now();
        async fn run(dir: &Path, program: &Path, args: &[String]) -> Result<(), String> {
            let out = tokio::process::Command::new(program).args(args).stdin(Stdio::null()).output().await.map_err(|e| format!("cannot run {}: {e}", program.display()))?;
            if out.status.success() {
                return Ok(());
            }
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect();
            Err(format!("installing the trainer into {} failed ({} {}):\n{}", dir.display(), program.display(), args.join(" "), tail.join("\n")))
        }
        if !python.is_file() {
            let system = std::env::var("PIPELINE_PYTHON").unwrap_or_else(|_| "python3".into());
            run(&dir, Path::new(&system), &["-m".into(), "venv".into(), dir.to_string_lossy().into_owned()]).await?;
        }
        let mut args: Vec<String> = ["-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-cache-dir"].map(String::from).to_vec();
        let constraints = dir.join("constraints.txt");
        std::fs::write(&constraints, CONSTRAINTS).map_err(|e| format!("{}: {e}", constraints.display()))?;
        args.extend(["-c".to_string(), constraints.to_string_lossy().into_owned()]);
        args.extend(PACKAGES.iter().map(|p| p.to_string()));
        run(&dir, &python, &args).await?;
        std::fs::write(&marker, wanted).map_err(|e| format!("{}: {e}", marker.display()))?;
        tracing::warn!(seconds = started.elapsed().as_secs(), "trainer installed");
        Ok(python)
    }

    /// Train (or take `adapter`), merge and move the model into the cache; its files' digests.
    pub async fn run(python: &Path, weights: &catalog::fetch::Weights, train: &TrainInput, adapter: Option<&Adapter>, cx: &ItemContext) -> Result<Trained, String> {
        let root = catalog::fetch::cache_dir().join("finetuned");
        std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        clear_abandoned(&root);
        let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
        let tmp = root.join(format!(".tmp-{}-{nonce}", std::process::id()));
        std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let result = train_into(python, weights, train, adapter, &tmp, cx).await;
        let outcome = match result {
            Ok((steps, final_loss, seconds)) => finalize(&root, &tmp).map(|(files, adapter)| Trained { files, adapter, steps, final_loss, seconds }),
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_dir_all(&tmp);
        outcome
    }

    /// Temporary directories of trainings whose process is gone (killed): never a model.
    fn clear_abandoned(root: &Path) {
        let Ok(entries) = std::fs::read_dir(root) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(".tmp-").and_then(|rest| rest.split('-').next()) else { continue };
            if !Path::new("/proc").join(pid).exists() {
                tracing::info!(dir = %entry.path().display(), "removing an interrupted training's files");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    async fn train_into(python: &Path, weights: &catalog::fetch::Weights, train: &TrainInput, adapter: Option<&Adapter>, tmp: &Path, cx: &ItemContext) -> Result<(u64, Option<f64>, f64), String> {
        let base = match weights.format {
            WeightsFormat::Gguf => json!({"gguf": weights.path}),
            WeightsFormat::Safetensors => json!({"dir": weights.path}),
        };
        let h = &train.hyperparameters;
        let mut job = json!({
            "base": base,
            "method": train.method,
            "examples": train.examples,
            "pairs": train.pairs,
            "beta": h.get("beta"),
            "lora": h["lora"],
            "epochs": h["epochs"],
            "max_steps": h["max_steps"],
            "learning_rate": h["learning_rate"],
            "batch_size": h["batch_size"],
            "seed": cx.seed,
            "base_name": train.base,
        });
        if let Some(adapter) = adapter {
            // The adapter's bytes as the key pins them, copied beside the job.
            let dir = tmp.join("adapter");
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            for (name, _, path) in &adapter.files {
                let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                if train.hyperparameters["adapter"][name].as_str() != Some(sha256_hex(&bytes).as_str()) {
                    return Err(format!("{} changed while the run went on; run again", path.display()));
                }
                std::fs::write(dir.join(name), bytes).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            tracing::info!(adapter = adapter.written, "merging an adapter trained elsewhere");
            job["adapter"] = json!(dir);
        }
        let job_path = tmp.join("job.json");
        std::fs::write(&job_path, serde_json::to_vec(&job).expect("jobs serialize")).map_err(|e| format!("{}: {e}", job_path.display()))?;
        let out_dir = tmp.join("model");
        let mut command = tokio::process::Command::new(python);
        command
            .arg("-c")
            .arg(TRAIN_PY)
            .arg(&job_path)
            .arg(&out_dir)
            .envs(KERNELS.iter().copied())
            .env("PYTHONHASHSEED", "0")
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            .env("TQDM_DISABLE", "1")
            .env("TOKENIZERS_PARALLELISM", "false")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let started = Instant::now();
        let mut child = command.spawn().map_err(|e| format!("cannot run the trainer {}: {e}", python.display()))?;
        let stderr = child.stderr.take().expect("piped");
        let errors = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            let mut tail = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(target: "finetune::trainer", "{line}");
                tail.push(line);
                if tail.len() > 20 {
                    tail.remove(0);
                }
            }
            tail
        });
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut done = None;
        loop {
            let line = tokio::select! {
                line = lines.next_line() => line.map_err(|e| format!("reading the trainer's output: {e}"))?,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if cx.cancel.is_set() {
                        let _ = child.kill().await;
                        return Err("interrupted".into());
                    }
                    continue;
                }
            };
            let Some(line) = line else { break };
            let Ok(event) = serde_json::from_str::<Value>(&line) else { continue };
            match event["event"].as_str() {
                Some("step") => {
                    tracing::info!(step = %event["step"], steps = %event["steps"], loss = %event["loss"], "training");
                    cx.progress.report(event["step"].as_u64().unwrap_or(0), event["steps"].as_u64().unwrap_or(0), format!("loss {}", event["loss"]));
                }
                Some("start") => {
                    tracing::info!(examples = %event["examples"], steps = %event["steps"], "training started");
                    cx.progress.report(0, event["steps"].as_u64().unwrap_or(0), "training");
                }
                Some("done") => done = Some(event),
                _ => {}
            }
        }
        let status = child.wait().await.map_err(|e| format!("waiting for the trainer: {e}"))?;
        let tail = errors.await.unwrap_or_default();
        match (status.success(), done) {
            (true, Some(done)) => Ok((done["steps"].as_u64().unwrap_or(0), done["final_loss"].as_f64(), started.elapsed().as_secs_f64())),
            _ => {
                // The trainer's own message is its last lines (a Python traceback ends with it).
                let why = tail.iter().rev().find(|l| !l.trim().is_empty()).cloned().unwrap_or_else(|| format!("exit status {status}"));
                Err(format!("the trainer failed: {why}"))
            }
        }
    }

    /// Hash the merged model's files (and its adapter's, in `adapter/`) and move the directory
    /// into the cache under the merged files' digest.
    fn finalize(root: &Path, tmp: &Path) -> Result<(BTreeMap<String, String>, BTreeMap<String, String>), String> {
        let dir = tmp.join("model");
        let files = synced_digests(&dir)?;
        let adapter = if dir.join("adapter").is_dir() { synced_digests(&dir.join("adapter"))? } else { BTreeMap::new() };
        let target = catalog::fetch::trained_dir(&catalog::files_digest(&files));
        if target.is_dir() {
            // Trained before (the same bytes: the digest says so).
            return Ok((files, adapter));
        }
        std::fs::rename(&dir, &target).map_err(|e| format!("moving the trained model to {}: {e}", target.display()))?;
        if let Ok(d) = std::fs::File::open(root) {
            let _ = d.sync_all();
        }
        tracing::info!(dir = %target.display(), "fine-tuned model saved");
        Ok((files, adapter))
    }

    /// The sha256 of each file in `dir` (not below it), each synced to disk first.
    fn synced_digests(dir: &Path) -> Result<BTreeMap<String, String>, String> {
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            let entry = entry.map_err(|e| e.to_string())?;
            if entry.path().is_file() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let f = std::fs::File::open(entry.path()).map_err(|e| format!("{}: {e}", entry.path().display()))?;
                f.sync_all().map_err(|e| format!("{}: {e}", entry.path().display()))?;
                files.insert(name, catalog::fetch::sha256_file(&entry.path()).map_err(|e| e.to_string())?);
            }
        }
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_names_the_trainer() {
        let pins = trainer_pins();
        assert!(pins["packages"].contains("torch==2.15.0"));
        assert_eq!(pins["kernels"], "ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1");
        assert_eq!(pins["script_sha256"], sha256_hex(TRAIN_PY.as_bytes()));
        assert_eq!(pins["constraints_sha256"], sha256_hex(CONSTRAINTS.as_bytes()));
    }

    #[test]
    fn the_constraints_pin_every_package_at_the_version_asked_for() {
        let pinned: BTreeMap<&str, &str> = CONSTRAINTS.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).map(|l| l.split_once("==").expect("name==version")).collect();
        for package in PACKAGES {
            let (name, version) = package.split_once("==").unwrap();
            assert_eq!(pinned.get(name), Some(&version), "{package}");
        }
        assert!(pinned.contains_key("tokenizers") && pinned.contains_key("numpy"), "what the packages pull in is pinned too");
    }
}
