//! `capacity`: the highest request rate each candidate sustains within a latency SLO — the
//! figure that sizes a deployment, beside quality and cost.
//!
//! For each candidate, one memoized item: the golden set's rendered prompts (their real lengths)
//! are sent as streamed chat completions, so the time to the first token and between tokens is
//! measured, to the candidate's OpenAI-compatible endpoint (every replica in turn) or, for weights,
//! to the model served on loopback by `pipeline serve`'s own code. The search follows vLLM's SLA
//! sweep and GuideLLM's sweep: a synchronous anchor (one request at a time), a saturating anchor
//! (`max_concurrency` in flight), then Poisson arrival rates between them, bisected to the highest
//! rate at which at least `attainment` of the requests meet the SLO and the server completes them
//! as fast as they arrive. Every load is bounded in seconds and requests, the search in loads and
//! seconds; a load that can no longer pass stops as soon as that is certain.
//!
//! Everything measured sits under `timing` (volatile: the lockfile pins the SLO and what each
//! candidate was, never the figures). Loads of one stage never overlap: its items run one at a
//! time. Measure on a machine that does nothing else meanwhile.

mod load;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use artifacts::{Artifact, Capacity, CapacityTiming, Candidates, FineTuned, Load, Message, ModelCapacity, Rendered, Slo};
use catalog::Catalog;
use engine::diag::Diagnostic;
use engine::{BuildContext, Item, ItemContext, Port, Stage, StageError, StageInput, StagePlugin};
use infer::{DeviceSpec, Prepare, Roster, RunSettings, Sampler};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use toml::Spanned;

pub struct CapacityPlugin;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CapacityConfig {
    /// Model catalog, relative to the pipeline file.
    #[schemars(with = "String")]
    pub catalog: Spanned<String>,
    /// Catalog ids of the models to measure. Leave out to measure the models a `license_filter`
    /// stage in `needs` lets through (and a `finetune` stage's).
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub models: Vec<Spanned<String>>,
    /// What each request asks for (`max_tokens`, `temperature`, `stop`), as the candidates will be
    /// called in production.
    #[serde(default)]
    pub sampler: Sampler,
    /// Embedded models: convert GGUF weights before serving them (as in `infer`).
    pub prepare: Option<Prepare>,
    /// What a request must achieve: `slo = { ttft_ms = 1000, e2e_ms = 5000 }`, optionally
    /// `tpot_ms`, and `attainment` (the share of requests that must, default 0.99).
    pub slo: SloConfig,
    /// Seconds each load runs (default 30, 2 to 3600). An anchor whose requests outlast it runs on
    /// until each request in flight has had a measured successor; a rate too low for it still sends
    /// one measured arrival.
    #[serde(default = "default_seconds")]
    pub seconds_per_load: f64,
    /// Requests each load sends at most (default 1000).
    #[serde(default = "default_max_requests")]
    #[schemars(range(min = 10, max = 100000))]
    pub max_requests_per_load: usize,
    /// Loads measured per candidate at most, the two anchors included (default 9, 3 to 30).
    #[serde(default = "default_max_loads")]
    #[schemars(range(min = 3, max = 30))]
    pub max_loads: usize,
    /// Seconds one candidate's search may take at most (default 900): no load starts that would
    /// end after it.
    #[serde(default = "default_max_seconds")]
    pub max_seconds: f64,
    /// Requests in flight in the saturating anchor, and at most in any load (default 32).
    #[serde(default = "default_max_concurrency")]
    #[schemars(range(min = 2, max = 1024))]
    pub max_concurrency: usize,
    /// The first part of each load (a fraction of its seconds) is sent but not measured (default 0.1).
    #[serde(default = "default_warmup")]
    pub warmup: f64,
    /// Bisection stops once the highest sustained and the lowest failed rate are this close,
    /// relative to the failed one (default 0.05).
    #[serde(default = "default_precision")]
    pub precision: f64,
    /// Seconds one request may take before it counts as failed (default: three times `e2e_ms`, at
    /// least 10).
    pub timeout_s: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SloConfig {
    /// Time to the first token, in milliseconds.
    pub ttft_ms: f64,
    /// Time to the last token, in milliseconds.
    pub e2e_ms: f64,
    /// Mean time per output token after the first, in milliseconds.
    pub tpot_ms: Option<f64>,
    /// Share of requests that must meet the SLO (default 0.99).
    #[serde(default = "default_attainment")]
    pub attainment: f64,
}

fn default_seconds() -> f64 {
    30.0
}
fn default_max_requests() -> usize {
    1000
}
fn default_max_loads() -> usize {
    9
}
fn default_max_seconds() -> f64 {
    900.0
}
fn default_max_concurrency() -> usize {
    32
}
fn default_warmup() -> f64 {
    0.1
}
fn default_precision() -> f64 {
    0.05
}
fn default_attainment() -> f64 {
    0.99
}

/// The search's settings, as an item's input holds them.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Search {
    seconds_per_load: f64,
    max_requests_per_load: usize,
    max_loads: usize,
    max_seconds: f64,
    max_concurrency: usize,
    warmup: f64,
    precision: f64,
    timeout_s: f64,
}

impl StagePlugin for CapacityPlugin {
    type Config = CapacityConfig;
    const KIND: &'static str = "capacity";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "the highest request rate each candidate sustains within a latency SLO (streamed requests, Poisson arrivals, bisected)";
    const INPUTS: &'static [Port] =
        &[Port::new("rendered", Rendered::TYPE), Port::optional("candidates", Candidates::TYPE), Port::optional("finetuned", FineTuned::TYPE)];
    const OUTPUT: &'static str = Capacity::TYPE;

    fn build(config: CapacityConfig, cx: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        let (catalog, catalog_path) = Catalog::load_for_stage(&config.catalog, cx)?;
        let mut errors = Vec::new();
        let mut bad = |key: &str, message: String| errors.push(cx.error_at(cx.key(key), message, "out of range"));
        let slo = &config.slo;
        for (name, v) in [("ttft_ms", Some(slo.ttft_ms)), ("e2e_ms", Some(slo.e2e_ms)), ("tpot_ms", slo.tpot_ms)] {
            if let Some(v) = v
                && !(v.is_finite() && v > 0.0)
            {
                bad("slo", format!("`slo.{name}` must be a positive number of milliseconds, not {v}"));
            }
        }
        if !(slo.attainment > 0.0 && slo.attainment <= 1.0) {
            bad("slo", format!("`slo.attainment` is {}: it must be above 0 and at most 1 (0.99: 99% of requests)", slo.attainment));
        }
        if slo.ttft_ms > slo.e2e_ms {
            bad("slo", format!("`slo.ttft_ms` ({}) is above `slo.e2e_ms` ({}): the first token cannot come after the last", slo.ttft_ms, slo.e2e_ms));
        }
        if !(2.0..=3600.0).contains(&config.seconds_per_load) {
            bad("seconds_per_load", format!("`seconds_per_load` is {}: it must be 2 to 3600", config.seconds_per_load));
        }
        if !(10..=100_000).contains(&config.max_requests_per_load) {
            bad("max_requests_per_load", format!("`max_requests_per_load` is {}: it must be 10 to 100000", config.max_requests_per_load));
        }
        if !(3..=30).contains(&config.max_loads) {
            bad("max_loads", format!("`max_loads` is {}: it must be 3 to 30 (two anchors and at least one rate)", config.max_loads));
        }
        if !(config.max_seconds.is_finite() && config.max_seconds >= 3.0 * config.seconds_per_load) {
            bad("max_seconds", format!("`max_seconds` is {}: it must leave room for three loads of `seconds_per_load` ({} s)", config.max_seconds, 3.0 * config.seconds_per_load));
        }
        if !(2..=1024).contains(&config.max_concurrency) {
            bad("max_concurrency", format!("`max_concurrency` is {}: it must be 2 to 1024", config.max_concurrency));
        }
        if !(0.0..=0.5).contains(&config.warmup) {
            bad("warmup", format!("`warmup` is {}: it must be 0 to 0.5 (a fraction of each load)", config.warmup));
        }
        if !(config.precision > 0.0 && config.precision < 1.0) {
            bad("precision", format!("`precision` is {}: it must be above 0 and below 1", config.precision));
        }
        if let Some(t) = config.timeout_s
            && !(t.is_finite() && t > 0.0 && t <= 3600.0)
        {
            bad("timeout_s", format!("`timeout_s` is {t}: it must be a positive number of seconds, at most 3600"));
        }
        if let Err(e) = config.sampler.check() {
            errors.push(cx.error_at(cx.key("sampler"), e, "these settings"));
        }
        let http = infer::http::HttpSettings::default();
        let roster = Roster::build(&catalog, &config.catalog, &config.models, None, &http, &config.sampler, cx, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        let catalog_dir = catalog_path.parent().map(PathBuf::from).unwrap_or_default();
        let settings = RunSettings { sampler: config.sampler.clone(), prepare: config.prepare, output: None, think: None, repeats: 1, tool_choice: None, device: DeviceSpec::Cpu, catalog_dir };
        let slo = Slo { ttft_ms: slo.ttft_ms, e2e_ms: slo.e2e_ms, tpot_ms: slo.tpot_ms, attainment: slo.attainment };
        let search = Search {
            seconds_per_load: config.seconds_per_load,
            max_requests_per_load: config.max_requests_per_load,
            max_loads: config.max_loads,
            max_seconds: config.max_seconds,
            max_concurrency: config.max_concurrency,
            warmup: config.warmup,
            precision: config.precision,
            timeout_s: config.timeout_s.unwrap_or((3.0 * slo.e2e_ms / 1000.0).max(10.0)),
        };
        Ok(Arc::new(CapacityStage { settings, roster, slo, search }))
    }
}

struct CapacityStage {
    settings: RunSettings,
    roster: Roster,
    slo: Slo,
    search: Search,
}

/// An item's input: what the measurement depends on.
#[derive(Serialize, Deserialize)]
struct ItemInput {
    /// The candidate as `infer` keys it (weights or served model, engine, sampler), its messages
    /// empty.
    candidate: Value,
    model: String,
    /// Servers answering for it.
    replicas: usize,
    slo: Slo,
    search: Search,
    prompts: Vec<Vec<Message>>,
}

#[async_trait::async_trait]
impl Stage for CapacityStage {
    fn pins(&self) -> engine::Pins {
        self.roster.configured().iter().map(|c| (c.id.clone(), c.pins(&self.settings))).collect()
    }

    fn resolved(&self) -> Option<Value> {
        Some(json!(self.roster.configured().iter().map(|c| (c.id.clone(), json!(c.pin()))).collect::<BTreeMap<_, _>>()))
    }

    fn items(&self, input: &StageInput) -> Result<Vec<Item>, StageError> {
        let rendered: Rendered = input.read("rendered")?;
        if rendered.samples.is_empty() {
            return Err(StageError::new("no rendered samples to send"));
        }
        let prompts: Vec<Vec<Message>> = rendered.samples.into_iter().map(|s| s.messages).collect();
        Ok(self
            .roster
            .active(input)?
            .iter()
            .map(|c| {
                let item = ItemInput {
                    candidate: c.item_input(&self.settings, Vec::new(), input.seed),
                    model: c.id.clone(),
                    replicas: c.replicas(),
                    slo: self.slo.clone(),
                    search: self.search.clone(),
                    prompts: prompts.clone(),
                };
                Item { id: c.id.clone(), input: serde_json::to_value(item).expect("inputs serialize") }
            })
            .collect())
    }

    async fn run_item(&self, item: &Item, cx: &ItemContext) -> Result<Value, StageError> {
        let input = ItemInput::deserialize(&item.input).map_err(|e| StageError::new(format!("the input of item `{}` is malformed: {e}", item.id)))?;
        let candidate = self.roster.candidate(&input.model).ok_or_else(|| StageError::new(format!("unknown model `{}`", input.model)))?;
        let target = candidate.load_target(&self.settings).await.map_err(StageError::new)?;
        let key = match &target.api_key_env {
            None => None,
            Some(var) => Some(std::env::var(var).map_err(|_| StageError::new(format!("model `{}`: environment variable `{var}` (its `api_key_env`) is not set", candidate.id)))?),
        };
        let client = load::Client::new(&target.base_urls, &target.model, key, &self.settings.sampler, Duration::from_secs_f64(input.search.timeout_s)).map_err(StageError::new)?;
        let timing = search(&Arc::new(client), &input, cx).await.map_err(StageError::new)?;
        drop(target);
        Ok(serde_json::to_value(ModelCapacity { pin: candidate.pin(), timing }).expect("capacity serializes"))
    }

    fn item_concurrency(&self) -> usize {
        // Loads must not overlap: each would measure the other.
        1
    }

    fn runs_alone(&self) -> bool {
        // Nor may another stage's work (an `infer` stage answering on the same cores).
        true
    }

    fn volatile_keys(&self) -> &'static [&'static str] {
        &["timing"]
    }

    fn finish(&self, _input: &StageInput, results: Vec<(Item, Value)>) -> Result<Value, StageError> {
        let mut models = BTreeMap::new();
        for (item, value) in results {
            let m = ModelCapacity::deserialize(&value).map_err(|e| StageError::new(format!("the capacity of `{}` is malformed: {e}", item.id)))?;
            models.insert(item.id, m);
        }
        Ok(Capacity { slo: self.slo.clone(), models }.to_json())
    }
}

/// The search for one candidate's highest sustained rate.
async fn search(client: &Arc<load::Client>, input: &ItemInput, cx: &ItemContext) -> Result<CapacityTiming, String> {
    let s = &input.search;
    let started = Instant::now();
    // Prompts in a seeded order: every load sends the same ones.
    let mut prompts = input.prompts.clone();
    fastrand::Rng::with_seed(cx.seed).shuffle(&mut prompts);
    // Warm-up: the model loaded and every code path run once, unmeasured.
    client.settle(&prompts[0]).await.map_err(|e| format!("the warm-up request failed: {e}"))?;
    let mut loads: Vec<Load> = Vec::new();
    let plan = |pace| load::Plan {
        pace,
        seconds: s.seconds_per_load,
        max_requests: s.max_requests_per_load,
        warmup: s.warmup,
        max_in_flight: s.max_concurrency,
        slo: &input.slo,
        prompts: &prompts,
    };
    let run = async |loads: &mut Vec<Load>, pace| -> Result<Load, String> {
        let load = load::measure(client, &plan(pace), &cx.cancel).await?;
        // What the load left queued is served before the next one starts.
        client.settle(&prompts[0]).await.map_err(|e| format!("after a load, the server failed: {e}"))?;
        let what = match pace {
            load::Pace::Concurrent(1) => "synchronous".to_string(),
            load::Pace::Concurrent(n) => format!("{n} in flight"),
            load::Pace::Poisson { rate, .. } => format!("{rate:.2} req/s"),
        };
        tracing::info!(load = %what, attainment = load.attainment, offered = load.offered_rps, achieved = load.achieved_rps, sustained = load.sustained, "load measured");
        loads.push(load.clone());
        cx.progress.report(loads.len() as u64, s.max_loads as u64, format!("{what}: {:.0}% within the SLO, {:.2} of {:.2} req/s", load.attainment * 100.0, load.achieved_rps, load.offered_rps));
        Ok(load)
    };
    let sync = run(&mut loads, load::Pace::Concurrent(1)).await?;
    let done = |loads: Vec<Load>, max_rps: f64, found: String| {
        let at = loads.iter().filter(|l| l.kind == "poisson" && l.sustained && l.rate_rps == Some(max_rps)).last();
        CapacityTiming {
            max_rps,
            goodput_rps: at.map_or(0.0, |l| l.goodput_rps),
            tokens_per_s: at.and_then(|l| Some(l.achieved_rps * (l.prompt_tokens_mean? + l.completion_tokens_mean))),
            found,
            loads,
            search_s: started.elapsed().as_secs_f64(),
        }
    };
    if !sync.sustained {
        let found = format!("misses the SLO one request at a time: {:.1}% of {} requests within it", sync.attainment * 100.0, sync.requests);
        return Ok(done(loads, 0.0, found));
    }
    let saturated = run(&mut loads, load::Pace::Concurrent(s.max_concurrency)).await?;
    // The most the server completed in either anchor: no rate above it can be sustained.
    let ceiling = saturated.achieved_rps.max(sync.achieved_rps);
    if ceiling <= 0.0 {
        return Ok(done(loads, 0.0, format!("no request completed within a load of {} s", s.seconds_per_load)));
    }
    // Bisection between a sustained rate (`lo`; none yet) and a failed one (`hi`), starting at the
    // saturating throughput, then the synchronous rate, then midpoints.
    let (mut lo, mut hi) = (0.0f64, f64::INFINITY);
    let mut rate = ceiling;
    let mut found = None;
    let mut k = 0u64;
    while loads.len() < s.max_loads {
        if started.elapsed().as_secs_f64() + s.seconds_per_load > s.max_seconds {
            found = Some(format!("stopped at `max_seconds` ({} s)", s.max_seconds));
            break;
        }
        k += 1;
        let load = run(&mut loads, load::Pace::Poisson { rate, seed: cx.seed.wrapping_add(k) }).await?;
        if load.sustained {
            lo = rate;
            if rate >= ceiling {
                found = Some(format!("sustained the most either anchor completed ({ceiling:.2} req/s)"));
                break;
            }
        } else {
            hi = rate;
        }
        if hi.is_finite() && lo > 0.0 && hi - lo <= s.precision * hi {
            found = Some(format!("between {lo:.2} (sustained) and {hi:.2} req/s (not), within `precision`"));
            break;
        }
        let sync_rate = sync.achieved_rps;
        rate = if lo == 0.0 && k == 1 && sync_rate > 0.0 && sync_rate < hi * (1.0 - s.precision) { sync_rate } else if lo == 0.0 { hi / 2.0 } else { (lo + hi) / 2.0 };
    }
    let found = found.unwrap_or_else(|| {
        if lo > 0.0 {
            format!("between {lo:.2} (sustained) and {hi:.2} req/s (not) after `max_loads` ({})", s.max_loads)
        } else {
            format!("no Poisson rate was sustained, down to {hi:.2} req/s, within `max_loads` ({})", s.max_loads)
        }
    });
    Ok(done(loads, lo, found))
}
