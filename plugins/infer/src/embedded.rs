//! mistral.rs in-process: one loaded model per weights digest per process, one request at a time.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use catalog::Source;
use mistralrs::{Constraint, Device, GgufModelBuilder, Model, RequestBuilder, StopTokens, TextMessageRole};
use tokio::sync::Mutex;

use crate::{Answer, DeviceSpec, Message, OutputConstraint, Prepare, Sampler, Timing};

/// The names llguidance (toktrie_hf_tokenizers 1.9) takes for end of sequence.
const LLGUIDANCE_EOS: [&str; 5] = ["</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<｜end▁of▁sentence｜>"];

pub struct Runner {
    model: Model,
    /// Requests to one model never overlap (see the crate docs).
    turn: Mutex<()>,
}

static LOADED: OnceLock<Mutex<HashMap<String, Arc<Runner>>>> = OnceLock::new();

/// The runner for these weights, fetching, verifying and loading them on first use.
pub async fn load(source: &Source, sha256: &str, base: &Path, prepare: Option<Prepare>, device: DeviceSpec) -> Result<Arc<Runner>, String> {
    let key = format!("{sha256}{}:{device:?}", if prepare.is_some() { ":q8_0" } else { "" });
    let mut loaded = LOADED.get_or_init(Default::default).lock().await;
    if let Some(runner) = loaded.get(&key) {
        return Ok(runner.clone());
    }
    let (source, base) = (source.clone(), base.to_path_buf());
    let path = tokio::task::spawn_blocking(move || {
        let weights = catalog::fetch::resolve(&source, &base).map_err(|e| e.to_string())?;
        match prepare {
            None => Ok(weights.path),
            Some(Prepare::Q8_0) => crate::convert::to_q8_0(&weights.path),
        }
    })
    .await
    .map_err(|e| format!("preparing weights: {e}"))??;
    let weights = catalog::fetch::Weights { path, sha256: sha256.to_string(), format: catalog::WeightsFormat::Gguf };
    let dir = weights.path.parent().ok_or("weights have no directory")?.to_string_lossy().into_owned();
    let file = weights.path.file_name().ok_or("weights have no file name")?.to_string_lossy().into_owned();
    tracing::info!(weights = %weights.path.display(), "loading model");
    let started = Instant::now();
    // A local directory as the model id: nothing is fetched from a hub. Tokenizer and chat
    // template come from the GGUF file.
    let builder = GgufModelBuilder::new(dir, vec![file]).with_max_num_seqs(1);
    let builder = match device {
        DeviceSpec::Cpu => builder.with_force_cpu(),
        DeviceSpec::Cuda(n) => builder.with_device(Device::new_cuda(n).map_err(|e| format!("CUDA device {n}: {e}"))?),
    };
    let model = builder
        .build()
        .await
        .map_err(|e| format!("loading {}: {e}", weights.path.display()))?;
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "model loaded");
    let runner = Arc::new(Runner { model, turn: Mutex::new(()) });
    loaded.insert(key, runner.clone());
    Ok(runner)
}

impl Runner {
    pub async fn chat(&self, messages: &[Message], sampler: &Sampler, output: Option<&OutputConstraint>) -> Result<Answer, String> {
        let mut request = RequestBuilder::new();
        for m in messages {
            let role = match m.role.as_str() {
                "system" => TextMessageRole::System,
                "user" => TextMessageRole::User,
                "assistant" => TextMessageRole::Assistant,
                other => return Err(format!("unknown message role `{other}`")),
            };
            request = request.add_message(role, &m.content);
        }
        request = if sampler.temperature == 0.0 { request.set_deterministic_sampler() } else { request.set_sampler_temperature(sampler.temperature) };
        request = request.set_sampler_max_len(sampler.max_tokens);
        let mut stop = sampler.stop.clone();
        if output.is_some() {
            // mistral.rs 0.8.1 builds llguidance's token environment without the model's EOS:
            // llguidance picks its own by name (`<|endoftext|>` for SmolLM2, whose chat turns end
            // with `<|im_end|>`), so once the constraint is satisfied it forces a token mistral.rs
            // does not stop on, until `max_tokens`. A single-token stop string becomes a stop token.
            stop.extend(LLGUIDANCE_EOS.iter().map(|s| s.to_string()));
        }
        if !stop.is_empty() {
            request = request.set_sampler_stop_toks(StopTokens::Seqs(stop));
        }
        if let Some(output) = output {
            // llguidance, inside mistral.rs: tokens that cannot continue a valid output are masked.
            request = request.set_constraint(match output {
                OutputConstraint::Choice(choices) => Constraint::Regex(OutputConstraint::choice_regex(choices)),
                OutputConstraint::Regex(r) => Constraint::Regex(r.clone()),
                OutputConstraint::JsonSchema(schema) => Constraint::JsonSchema(schema.clone()),
                OutputConstraint::Lark(grammar) => Constraint::Lark(grammar.clone()),
            });
        }
        let _turn = self.turn.lock().await;
        let started = Instant::now();
        let response = self.model.send_chat_request(request).await.map_err(|e| format!("mistral.rs: {e}"))?;
        let latency = started.elapsed();
        let choice = response.choices.first().ok_or("mistral.rs returned no choice")?;
        let text = choice.message.content.clone().unwrap_or_default();
        let usage = &response.usage;
        Ok(Answer {
            text,
            finish_reason: choice.finish_reason.clone(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            timing: Timing {
                latency_ms: latency.as_secs_f64() * 1000.0,
                prefill_ms: Some(f64::from(usage.total_prompt_time_sec) * 1000.0),
                decode_ms: Some(f64::from(usage.total_completion_time_sec) * 1000.0),
            },
        })
    }
}
