//! `capacity`: how many requests per second each candidate serves within a latency SLO.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Artifact, Pin};

/// `capacity`: per candidate, the highest offered request rate at which it met the SLO, and every
/// load it was measured at. All of it is measured (under `timing`, volatile) but the SLO and what
/// each candidate was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Capacity {
    pub slo: Slo,
    /// By candidate id.
    pub models: BTreeMap<String, ModelCapacity>,
}

impl Artifact for Capacity {
    const TYPE: &'static str = "capacity";
}

/// What a request must achieve, and how many must. A request meets the SLO when it succeeded and
/// each of its latencies is within its bound; a load is sustained when at least `attainment` of
/// its requests do and the server completes them as fast as they arrive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Slo {
    /// Time to the first token, in milliseconds.
    pub ttft_ms: f64,
    /// Time to the last token, in milliseconds.
    pub e2e_ms: f64,
    /// Mean time per output token after the first, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpot_ms: Option<f64>,
    /// Share of requests that must meet the SLO (0.99: the 99th percentile is within it).
    pub attainment: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ModelCapacity {
    #[serde(flatten)]
    pub pin: Pin,
    /// Measured (volatile).
    pub timing: CapacityTiming,
}

/// One candidate's search for its highest sustained rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CapacityTiming {
    /// The highest offered rate (requests per second) that was sustained within the SLO; 0 when
    /// none was, not even one request at a time.
    pub max_rps: f64,
    /// At that rate: requests meeting the SLO per second.
    pub goodput_rps: f64,
    /// At that rate: prompt and completion tokens processed per second; absent when the server
    /// reports no prompt token counts in its stream (then no cost per token is given either).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// Why the search ended where it did, in a sentence.
    pub found: String,
    /// Every load it was measured at, in the order run.
    pub loads: Vec<Load>,
    /// The search's wall time, warm-up included.
    pub search_s: f64,
}

/// One measured load: a fixed rate of arrivals, or a fixed number of requests in flight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Load {
    /// `synchronous` (one request at a time), `throughput` (`concurrency` in flight, as many as
    /// the server takes) or `poisson` (arrivals at `rate_rps` on average, independent of answers).
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_rps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    /// Requests measured (sent after the warm-up part of the load).
    pub requests: usize,
    pub completed: usize,
    /// Failed (an HTTP error, a broken stream, a timeout).
    pub errors: usize,
    /// The first few distinct errors, as the client saw them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub error_examples: Vec<String>,
    /// Still in flight when the load was stopped early, and abandoned.
    pub cut_off: usize,
    /// Arrivals that found `max_concurrency` requests in flight and waited for room (their
    /// latencies count from when they were due, as a user's would).
    pub queued: usize,
    pub met_slo: usize,
    /// `met_slo / requests`.
    pub attainment: f64,
    /// Measured requests per second of the measured part of the load.
    pub offered_rps: f64,
    /// Completions per second: for arrivals, the measured requests completed over the time from
    /// the measured part's start to the last completion (at least to the load's end), so a server
    /// that falls behind shows here; with a fixed number in flight, completions within the
    /// measured part per second of it.
    pub achieved_rps: f64,
    /// Of those, the ones meeting the SLO, per second.
    pub goodput_rps: f64,
    pub ttft_ms: Percentiles,
    /// Between streamed pieces of text.
    pub itl_ms: Percentiles,
    pub tpot_ms: Percentiles,
    pub e2e_ms: Percentiles,
    /// As the server counted them (`usage`); absent when it reports none in its stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_mean: Option<f64>,
    /// As the server counted them, or the streamed pieces when it reports no counts.
    pub completion_tokens_mean: f64,
    /// How late requests left against their schedule, not counting a wait for room (Poisson): a
    /// load generator that falls behind offers less than it says.
    pub send_lag_p99_ms: f64,
    /// The load generator fell behind its schedule (`send_lag_p99_ms` over a tenth of the mean gap
    /// between arrivals, and over 10 ms).
    pub client_behind: bool,
    /// Stopped before its time: so many requests had missed the SLO that it could no longer pass.
    pub stopped_early: bool,
    /// Within the SLO, and completed as fast as offered.
    pub sustained: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

impl CapacityTiming {
    /// The load the maximum was found at.
    pub fn at_max(&self) -> Option<&Load> {
        self.loads.iter().filter(|l| l.sustained && l.kind == "poisson").max_by(|a, b| a.rate_rps.unwrap_or(0.0).total_cmp(&b.rate_rps.unwrap_or(0.0)))
    }
}
