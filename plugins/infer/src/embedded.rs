//! mistral.rs in-process: one loaded model per weights digest per process, shared by every stage
//! and by `pipeline serve`, with many requests in flight.
//!
//! Requests overlap freely: mistral.rs schedules them (continuous batching; on CPU the vendored
//! copy decodes sequences of any lengths together for GGUF Llama-architecture models, and
//! prefills prompts together at equal length, the rest one step each). The vendored mistral.rs
//! (vendor/README.md) fixes what made 0.8.1 mix answers up under load, and the tests below prove
//! that greedy answers do not depend on how many requests are in flight.
//!
//! On a GPU requests still run one at a time: batched greedy outputs on CUDA are not yet proven
//! equal to one at a time (0.8.1 changed them with load on an H200, and no GPU was at hand to test
//! the vendored fixes there), and the load must never change a result.
//!
//! So do the requests to a model mistral.rs cannot decode together at different lengths (any but
//! a Llama-architecture GGUF on CPU: a safetensors model, a GGUF of another architecture): it would
//! batch only sequences of equal length, and each step of the others would stream all the weights
//! for one row while the rest wait: so, at 8 in flight, the main job ran at 0.90× the speed of
//! one at a time (BENCHMARKS.md, before mixed-length decoding).
//!
//! A failed request is redone once, alone (the others wait for it), so a failure that load may
//! cause is never recorded as an answer; [`Answer::redone_alone`] counts it.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use catalog::Source;
use mistralrs::core::TokenSource;
use mistralrs::{Constraint, Device, GgufModelBuilder, IsqType, Model, ModelDType, RequestBuilder, SamplingParams, StopTokens, TextMessageRole, TextModelBuilder};
use mistralrs::core::Response;
use tokio::sync::{Mutex, RwLock, mpsc};

use crate::{Answer, DeviceSpec, Message, OutputConstraint, Prepare, Sampler, Timing};

/// The names llguidance (toktrie_hf_tokenizers 1.9) takes for end of sequence.
const LLGUIDANCE_EOS: [&str; 5] = ["</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<｜end▁of▁sentence｜>"];

/// Sequences one model runs at once (mistral.rs' `max_num_seqs`); requests past it wait inside
/// mistral.rs. Stages bound what they send with their own `max_in_flight`.
pub const MAX_SEQS: usize = 64;

pub struct Runner {
    model: Model,
    /// Shared by requests in flight; a request redone alone holds it exclusively.
    alone: RwLock<()>,
    /// Every request runs alone (a GPU, or a model that does not decode mixed lengths together:
    /// see the module docs).
    one_at_a_time: bool,
}

/// How a model is loaded, besides its weights and device.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// mistral.rs reuses the KV cache of an earlier prompt with the same prefix (a shared system
    /// prompt is computed once). Answers are the same either way (tested below).
    pub prefix_cache: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { prefix_cache: true }
    }
}

/// Each loaded model, with the sources (and the directories they are relative to) whose files
/// were verified for it in this process.
static LOADED: OnceLock<Mutex<HashMap<String, (Arc<Runner>, HashSet<String>)>>> = OnceLock::new();

/// The runner for these weights, fetching, verifying and loading them on first use.
pub async fn load(source: &Source, sha256: &str, base: &Path, prepare: Option<Prepare>, device: DeviceSpec) -> Result<Arc<Runner>, String> {
    load_with(source, sha256, base, prepare, device, LoadOptions::default()).await
}

pub async fn load_with(
    source: &Source,
    sha256: &str,
    base: &Path,
    prepare: Option<Prepare>,
    device: DeviceSpec,
    options: LoadOptions,
) -> Result<Arc<Runner>, String> {
    let key = format!("{sha256}{}:{device:?}:{options:?}", prepare.map_or_else(String::new, |p| format!(":{}", p.spelling())));
    let mut loaded = LOADED.get_or_init(Default::default).lock().await;
    let verified_as = format!("{source:?} from {}", base.display());
    if let Some((runner, verified)) = loaded.get_mut(&key) {
        // The same weights, loaded from another source (a model directory and a pinned repository
        // of one model): this source's files are verified too, once, before it shares them.
        if !verified.contains(&verified_as) {
            weights_of(source, base, prepare).await?;
            verified.insert(verified_as);
        }
        return Ok(runner.clone());
    }
    let weights = weights_of(source, base, prepare).await?;
    tracing::info!(weights = %weights.path.display(), "loading model");
    let started = Instant::now();
    let model = match weights.format {
        catalog::WeightsFormat::Gguf => {
            let dir = weights.path.parent().ok_or("weights have no directory")?.to_string_lossy().into_owned();
            let file = weights.path.file_name().ok_or("weights have no file name")?.to_string_lossy().into_owned();
            // A local directory as the model id: nothing is fetched from a hub. Tokenizer and chat
            // template come from the GGUF file.
            let builder = GgufModelBuilder::new(dir, vec![file]).with_max_num_seqs(MAX_SEQS);
            let builder = if options.prefix_cache { builder } else { builder.with_prefix_cache_n(None) };
            let builder = match device {
                DeviceSpec::Cpu => builder.with_force_cpu(),
                DeviceSpec::Cuda(n) => builder.with_device(Device::new_cuda(n).map_err(|e| format!("CUDA device {n}: {e}"))?),
            };
            builder.build().await
        }
        catalog::WeightsFormat::Safetensors => {
            // A Hugging Face model directory (the pinned files only: `catalog::fetch`), read by
            // mistral.rs' plain text-model loader: weights in float32, or quantized in place
            // (ISQ) where `prepare` asks.
            let builder = TextModelBuilder::new(weights.path.to_string_lossy())
                .with_max_num_seqs(MAX_SEQS)
                .with_token_source(TokenSource::None)
                .with_dtype(ModelDType::F32);
            let builder = if options.prefix_cache { builder } else { builder.with_prefix_cache_n(None) };
            let builder = match prepare {
                Some(Prepare::Q8_0) => builder.with_isq(IsqType::Q8_0),
                None => builder,
            };
            let builder = match device {
                DeviceSpec::Cpu => builder.with_force_cpu(),
                DeviceSpec::Cuda(n) => builder.with_device(Device::new_cuda(n).map_err(|e| format!("CUDA device {n}: {e}"))?),
            };
            builder.build().await
        }
    }
    .map_err(|e| format!("loading {}: {e}", weights.path.display()))?;
    // Whether the vendored mistral.rs decodes this model's sequences of different lengths in one
    // pass (vendor/README.md, mistralrs-core 10).
    let decodes_mixed_lengths = model.config().map_err(|e| format!("mistral.rs: {e}"))?.decodes_mixed_lengths;
    tracing::info!(seconds = started.elapsed().as_secs_f64(), decodes_mixed_lengths, "model loaded");
    let one_at_a_time = matches!(device, DeviceSpec::Cuda(_)) || !decodes_mixed_lengths;
    let runner = Arc::new(Runner { model, alone: RwLock::new(()), one_at_a_time });
    loaded.insert(key, (runner.clone(), HashSet::from([verified_as])));
    Ok(runner)
}

/// The weights of `source`, fetched where missing, verified, and prepared.
async fn weights_of(source: &Source, base: &Path, prepare: Option<Prepare>) -> Result<catalog::fetch::Weights, String> {
    let (source, base) = (source.clone(), base.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let weights = match catalog::fetch::resolve(&source, &base) {
            Err(catalog::fetch::FetchError::NotInHfCache { .. }) => {
                crate::hub::download(&source)?;
                catalog::fetch::resolve(&source, &base)
            }
            other => other,
        }
        .map_err(|e| e.to_string())?;
        match (prepare, &weights.format) {
            (Some(Prepare::Q8_0), catalog::WeightsFormat::Gguf) => Ok(catalog::fetch::Weights { path: crate::convert::to_q8_0(&weights.path)?, ..weights }),
            _ => Ok::<_, String>(weights),
        }
    })
    .await
    .map_err(|e| format!("preparing weights: {e}"))?
}

impl Runner {
    /// The model's answer to `messages`. A failed request is redone once, alone (the others in
    /// flight wait); if it fails again, that is the error.
    /// How many tokens the model's tokenizer makes of `text` (no special tokens added).
    pub async fn count_tokens(&self, text: &str) -> Result<usize, String> {
        let tokens = self.model.tokenize(either::Either::Right(text.to_string()), None, false, false, None).await.map_err(|e| format!("mistral.rs: tokenizing: {e}"))?;
        Ok(tokens.len())
    }

    /// `seed`: what a sampled answer (temperature above 0) is drawn with, whatever else is in
    /// flight; `None` draws from the engine's shared stream (not reproducible).
    pub async fn chat(&self, messages: &[Message], sampler: &Sampler, output: Option<&OutputConstraint>, seed: Option<u64>) -> Result<Answer, String> {
        if self.one_at_a_time {
            let _alone = self.alone.write().await;
            return self.send(messages, sampler, output, seed).await;
        }
        let first = {
            let _shared = self.alone.read().await;
            self.send(messages, sampler, output, seed).await
        };
        match first {
            Ok(answer) => Ok(answer),
            Err(e) => {
                tracing::warn!("embedded request failed with others in flight, redoing it alone: {e}");
                let _alone = self.alone.write().await;
                let mut answer = self.send(messages, sampler, output, seed).await?;
                answer.redone_alone = true;
                Ok(answer)
            }
        }
    }

    async fn send(&self, messages: &[Message], sampler: &Sampler, output: Option<&OutputConstraint>, seed: Option<u64>) -> Result<Answer, String> {
        let request = request(messages, sampler, output, seed)?;
        let started = Instant::now();
        let response = self.model.send_chat_request(request).await.map_err(|e| format!("mistral.rs: {e}"))?;
        let latency = started.elapsed();
        let choice = response.choices.first().ok_or("mistral.rs returned no choice")?;
        check_finish(&choice.finish_reason)?;
        let text = choice.message.content.clone().unwrap_or_default();
        Ok(answer(text, choice.finish_reason.clone(), &response.usage, latency))
    }

    /// The model's answer to `messages`, streamed: its text as it is decoded (each piece a
    /// continuation of the ones before), then the whole answer, the same one [`Runner::chat`]
    /// gives. Dropping the receiver cancels the request. Nothing is redone: a failure is the
    /// stream's last item.
    pub fn stream(self: &Arc<Self>, messages: Vec<Message>, sampler: Sampler, output: Option<OutputConstraint>, seed: Option<u64>) -> mpsc::Receiver<Result<Piece, String>> {
        let (tx, rx) = mpsc::channel(16);
        let runner = self.clone();
        tokio::spawn(async move {
            if let Err(e) = runner.stream_into(&messages, &sampler, output.as_ref(), seed, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        rx
    }

    async fn stream_into(&self, messages: &[Message], sampler: &Sampler, output: Option<&OutputConstraint>, seed: Option<u64>, tx: &mpsc::Sender<Result<Piece, String>>) -> Result<(), String> {
        let (_alone, _shared) = if self.one_at_a_time { (Some(self.alone.write().await), None) } else { (None, Some(self.alone.read().await)) };
        let request = request(messages, sampler, output, seed)?;
        let mut text = StreamedText::new(stop_strings(sampler, output));
        let started = Instant::now();
        let mut stream = self.model.stream_chat_request(request).await.map_err(|e| format!("mistral.rs: {e}"))?;
        while let Some(response) = stream.next().await {
            let chunk = match response {
                Response::Chunk(chunk) => chunk,
                Response::ModelError(e, _) => return Err(format!("mistral.rs: {e}")),
                Response::InternalError(e) | Response::ValidationError(e) => return Err(format!("mistral.rs: {e}")),
                _ => return Err("mistral.rs answered a streamed chat with something else than chunks".to_string()),
            };
            let Some(choice) = chunk.choices.first() else { continue };
            let piece = text.push(choice.delta.content.as_deref().unwrap_or_default());
            if let Some(reason) = &choice.finish_reason {
                check_finish(reason)?;
                let usage = chunk.usage.as_ref().ok_or("mistral.rs sent its last chunk without usage")?;
                let (piece, whole) = text.finish(piece);
                // A client that went away is not an error: the request is over either way.
                if !piece.is_empty() && tx.send(Ok(Piece::Text(piece))).await.is_err() {
                    return Ok(());
                }
                let _ = tx.send(Ok(Piece::Done(answer(whole, reason.clone(), usage, started.elapsed())))).await;
                return Ok(());
            }
            if !piece.is_empty() && tx.send(Ok(Piece::Text(piece))).await.is_err() {
                // Dropping mistral.rs' stream cancels the sequence.
                return Ok(());
            }
        }
        Err("mistral.rs ended the stream without a finish reason".to_string())
    }
}

/// What a streamed request yields.
#[derive(Debug)]
pub enum Piece {
    /// More of the answer's text.
    Text(String),
    /// The whole answer (its text is the pieces' concatenation).
    Done(Answer),
}

fn check_finish(reason: &str) -> Result<(), String> {
    match reason {
        "stop" | "length" => Ok(()),
        other => Err(format!("mistral.rs finished with `{other}`")),
    }
}

fn answer(text: String, finish_reason: String, usage: &mistralrs::Usage, latency: std::time::Duration) -> Answer {
    Answer {
        text,
        finish_reason,
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        reasoning: None,
        reasoning_tokens: None,
        tool_calls: None,
        redone_alone: false,
        timing: Timing {
            latency_ms: latency.as_secs_f64() * 1000.0,
            prefill_ms: Some(f64::from(usage.total_prompt_time_sec) * 1000.0),
            decode_ms: Some(f64::from(usage.total_completion_time_sec) * 1000.0),
        },
    }
}

/// The stop strings mistral.rs is given for a request.
fn stop_strings(sampler: &Sampler, output: Option<&OutputConstraint>) -> Vec<String> {
    let mut stop = sampler.stop.clone();
    if output.is_some() {
        // mistral.rs 0.8.1 builds llguidance's token environment without the model's EOS:
        // llguidance picks its own by name (`<|endoftext|>` for SmolLM2, whose chat turns end
        // with `<|im_end|>`), so once the constraint is satisfied it forces a token mistral.rs
        // does not stop on, until `max_tokens`. A single-token stop string becomes a stop token.
        stop.extend(LLGUIDANCE_EOS.iter().map(|s| s.to_string()));
    }
    stop
}

/// The request mistral.rs is sent.
fn request(messages: &[Message], sampler: &Sampler, output: Option<&OutputConstraint>, seed: Option<u64>) -> Result<RequestBuilder, String> {
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
    request = if sampler.samples() {
        // From every token by its probability at this temperature (no top-k, top-p or min-p),
        // from the request's own stream when seeded (vendored mistral.rs, `vendor/README.md`).
        // Not the builder's temperature setter: it keeps the deterministic sampler's top-k of 1,
        // which decodes greedily whatever the temperature.
        request.set_sampling(SamplingParams { temperature: Some(sampler.temperature), seed, ..SamplingParams::neutral() })
    } else {
        request.set_deterministic_sampler()
    };
    request = request.set_sampler_max_len(sampler.max_tokens);
    let stop = stop_strings(sampler, output);
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
    Ok(request)
}

/// A streamed answer's text, as mistral.rs' pieces come in, made the text the whole answer would
/// have: leading whitespace trimmed and the text cut before a stop string, as mistral.rs does for
/// a whole answer, while its streamed pieces carry both. Text that may yet turn out to begin a stop
/// string is held back until it cannot.
struct StreamedText {
    stop: Vec<String>,
    raw: String,
    /// Bytes of the answer's text already given out.
    given: usize,
}

impl StreamedText {
    fn new(stop: Vec<String>) -> StreamedText {
        StreamedText { stop, raw: String::new(), given: 0 }
    }

    /// Adds mistral.rs' next piece; returns what can now be given out.
    fn push(&mut self, piece: &str) -> String {
        self.raw.push_str(piece);
        // Only the last bytes, as many as the longest stop string has, can begin one.
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        let from = (0..=self.raw.len().saturating_sub(longest)).rev().find(|&i| self.raw.is_char_boundary(i)).unwrap_or(0);
        let held = (from..self.raw.len()).filter(|&i| self.raw.is_char_boundary(i)).find(|&i| self.stop.iter().any(|s| s.len() > self.raw.len() - i && s.starts_with(&self.raw[i..]))).unwrap_or(self.raw.len());
        let safe = cut(&self.raw, &self.stop).unwrap_or(&self.raw[..held]);
        let safe = safe.trim_start();
        // What is given out only grows: a stop string found cuts the text, never before `given`.
        let new = safe.get(self.given..).unwrap_or_default().to_string();
        self.given = self.given.max(safe.len());
        new
    }

    /// The rest of the text once the answer is finished (`last` is what `push` just returned),
    /// and the whole text.
    fn finish(self, last: String) -> (String, String) {
        let whole = cut(&self.raw, &self.stop).unwrap_or(&self.raw).trim_start().to_string();
        let rest = last + whole.get(self.given..).unwrap_or_default();
        (rest, whole)
    }
}

/// `text` before the first stop string in it.
fn cut<'a>(text: &'a str, stop: &[String]) -> Option<&'a str> {
    stop.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min().map(|at| &text[..at])
}

#[cfg(test)]
mod tests;
