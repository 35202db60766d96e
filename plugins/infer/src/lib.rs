//! `infer`: every candidate model answers every rendered sample.
//!
//! One item per (sample × model). An item's input is exactly what its answer depends on: the
//! model's weights digest, the rendered messages and the sampler. So adding a sample or a model
//! computes only the new items, and a changed prompt recomputes only samples whose rendering
//! changed.
//!
//! The embedded backend is mistral.rs. One model is loaded once per process and shared by every
//! stage that uses it. Requests to a model run one at a time: mistral.rs 0.8.1 was seen returning
//! one request's answer to another when requests overlapped on CPU, and changing greedy outputs
//! with load on GPU. Timings are measurements, not results: they sit under `timing` keys, which the
//! lockfile leaves out.

mod convert;
mod embedded;

use std::path::PathBuf;
use std::sync::Arc;

use catalog::{Catalog, Source};
use engine::diag::{Diagnostic, did_you_mean, one_of};
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
    /// Catalog ids of the models to run.
    #[schemars(with = "Vec<String>")]
    pub models: Vec<Spanned<String>>,
    #[serde(default)]
    pub sampler: Sampler,
    /// Convert GGUF weights to this quantization before running (cached per machine). `q8_0`
    /// runs on candle's AVX2 kernels where the shipped Q4_1 runs on scalar code.
    pub prepare: Option<Prepare>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Prepare {
    Q8_0,
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

impl Default for Sampler {
    fn default() -> Self {
        Sampler { max_tokens: default_max_tokens(), temperature: 0.0, stop: Vec::new() }
    }
}

/// A model as the stage runs it: its catalog entry resolved to verified-on-load weights.
#[derive(Debug, Clone)]
struct Candidate {
    id: String,
    source: Source,
    sha256: String,
}

impl StagePlugin for Infer {
    type Config = InferConfig;
    const KIND: &'static str = "infer";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "candidate models answer every rendered sample (embedded mistral.rs; one memoized item per sample × model)";
    const INPUTS: &'static [Port] = &[Port { name: "rendered", ty: "rendered" }];
    const OUTPUT: &'static str = "answers";

    fn build(config: InferConfig, cx: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        let catalog_path = cx.base_dir.join(config.catalog.get_ref());
        if !catalog_path.is_file() {
            return Err(vec![cx.error_at(Some(config.catalog.span()), format!("catalog `{}` does not exist", config.catalog.get_ref()), "no such file")
                .help("paths are relative to the pipeline file")]);
        }
        let catalog = Catalog::load(&catalog_path)?;
        let mut errors = Vec::new();
        let mut candidates = Vec::new();
        if config.models.is_empty() {
            errors.push(cx.error_at(None, "`models` is empty: name at least one catalog model", ""));
        }
        for spanned in &config.models {
            let (id, span) = (spanned.get_ref(), Some(spanned.span()));
            let Some(model) = catalog.get(id) else {
                let hint = match did_you_mean(id, catalog.ids()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("the catalog has: {}", one_of(&catalog.ids())),
                };
                errors.push(cx.error_at(span, format!("model `{id}` is not in `{}`", config.catalog.get_ref()), "unknown model").help(hint));
                continue;
            };
            match model.embedded_source() {
                Some(source @ (Source::PythonPackage { sha256, .. } | Source::LocalFile { sha256, .. })) => {
                    candidates.push(Candidate { id: id.clone(), source: source.clone(), sha256: sha256.clone() })
                }
                _ => errors.push(
                    cx.error_at(span, format!("model `{id}` has no source that runs in-process here"), "no local weights")
                        .help("add a `python_package` or `local_file` source with its sha256 to the catalog"),
                ),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let catalog_dir = catalog_path.parent().map(PathBuf::from).unwrap_or_default();
        Ok(Arc::new(InferStage { sampler: config.sampler, prepare: config.prepare, candidates, catalog_dir }))
    }
}

struct InferStage {
    sampler: Sampler,
    prepare: Option<Prepare>,
    candidates: Vec<Candidate>,
    catalog_dir: PathBuf,
}

#[async_trait::async_trait]
impl Stage for InferStage {
    fn resolved(&self) -> Option<Value> {
        Some(json!({"weights": self.candidates.iter().map(|c| (c.id.clone(), json!(c.sha256))).collect::<serde_json::Map<_, _>>()}))
    }

    fn items(&self, input: &StageInput) -> Result<Vec<Item>, StageError> {
        let samples = input.input("rendered")?["samples"].as_array().ok_or_else(|| StageError::new("rendered prompts have no `samples`"))?;
        let mut items = Vec::with_capacity(samples.len() * self.candidates.len());
        for c in &self.candidates {
            for s in samples {
                items.push(Item {
                    id: format!("{}/{}", c.id, s["id"].as_str().unwrap_or_default()),
                    input: json!({
                        "model": c.id,
                        "weights_sha256": c.sha256,
                        "prepare": self.prepare.map(|_| format!("q8_0-v{}", convert::CONVERTER_VERSION)),
                        "messages": s["messages"],
                        "sampler": self.sampler,
                    }),
                });
            }
        }
        Ok(items)
    }

    async fn run_item(&self, item: &Item, _cx: &ItemContext) -> Result<Value, StageError> {
        let model = item.input["model"].as_str().unwrap_or_default();
        let candidate = self.candidates.iter().find(|c| c.id == model).ok_or_else(|| StageError::new(format!("unknown model `{model}`")))?;
        let messages: Vec<embedded::Message> = serde_json::from_value(item.input["messages"].clone())
            .map_err(|e| StageError::new(format!("rendered messages are malformed: {e}")))?;
        let runner = embedded::load(&candidate.source, &candidate.sha256, &self.catalog_dir, self.prepare).await.map_err(StageError::new)?;
        let answer = runner.chat(&messages, &self.sampler).await.map_err(StageError::new)?;
        Ok(serde_json::to_value(answer).expect("answers serialize"))
    }

    fn volatile_keys(&self) -> &'static [&'static str] {
        &["timing"]
    }

    fn finish(&self, input: &StageInput, results: Vec<(Item, Value)>) -> Result<Value, StageError> {
        let samples = input.input("rendered")?["samples"].as_array().map_or(&[][..], Vec::as_slice);
        let mut models = serde_json::Map::new();
        // `items` is model-major in sample order, and results come back in `items` order.
        let n = samples.len();
        if results.len() != n * self.candidates.len() {
            return Err(StageError::new(format!("expected {} answers, got {}", n * self.candidates.len(), results.len())));
        }
        for (i, c) in self.candidates.iter().enumerate() {
            let answers: Vec<Value> = samples
                .iter()
                .zip(&results[i * n..(i + 1) * n])
                .map(|(sample, (_, answer))| {
                    let mut a = answer.clone();
                    a["id"] = sample["id"].clone();
                    a
                })
                .collect();
            let latencies: Vec<f64> = answers.iter().filter_map(|a| a["timing"]["latency_ms"].as_f64()).collect();
            let completion: u64 = answers.iter().filter_map(|a| a["completion_tokens"].as_u64()).sum();
            let decode_s: f64 = answers.iter().filter_map(|a| a["timing"]["decode_ms"].as_f64()).sum::<f64>() / 1000.0;
            models.insert(
                c.id.clone(),
                json!({
                    "weights_sha256": c.sha256,
                    "answers": answers,
                    "timing": {
                        "latency_p50_ms": percentile(&latencies, 0.50),
                        "latency_p95_ms": percentile(&latencies, 0.95),
                        "decode_tokens_per_s": if decode_s > 0.0 { completion as f64 / decode_s } else { 0.0 },
                    },
                }),
            );
        }
        Ok(json!({"sampler": self.sampler, "prepare": self.prepare, "models": models}))
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
