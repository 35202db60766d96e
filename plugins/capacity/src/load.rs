//! The load generator: streamed chat completions sent at a pace, each timed to its first and
//! last piece of text, and one measured load summarized ([`artifacts::Load`]).
//!
//! Requests go out on a schedule fixed before the load starts (Poisson arrivals, seeded) or as
//! fast as `concurrency` requests in flight allow. Requests sent during the warm-up part of a load
//! are served but not measured. A request is timed from just before it is sent to each piece of
//! text in its stream; the server's `usage` gives its token counts (when the server sends none,
//! the pieces are counted). A load that can no longer pass is stopped as soon as that is known.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use artifacts::{Load, Message, Percentiles, Slo};
use engine::Cancel;
use serde_json::{Value, json};
use tokio::task::JoinSet;

/// Completed within this share of the offered rate counts as keeping up.
pub const RATE_TOLERANCE: f64 = 0.05;

/// Streams chat completions from one model's replicas, in turn.
pub struct Client {
    http: reqwest::Client,
    urls: Vec<String>,
    model: String,
    key: Option<String>,
    next: AtomicUsize,
    max_tokens: usize,
    temperature: f64,
    stop: Vec<String>,
}

impl Client {
    pub fn new(base_urls: &[String], model: &str, key: Option<String>, sampler: &infer::Sampler, timeout: Duration) -> Result<Client, String> {
        let http = reqwest::Client::builder().timeout(timeout).connect_timeout(timeout.min(Duration::from_secs(10))).build().map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Client {
            http,
            urls: base_urls.iter().map(|u| format!("{}/chat/completions", u.trim_end_matches('/'))).collect(),
            model: model.to_string(),
            key,
            next: AtomicUsize::new(0),
            max_tokens: sampler.max_tokens,
            temperature: sampler.temperature,
            stop: sampler.stop.clone(),
        })
    }

    fn body(&self, messages: &[Message], max_tokens: usize) -> Value {
        let mut body = json!({
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if !self.stop.is_empty() {
            body["stop"] = json!(self.stop);
        }
        body
    }

    /// One request, unmeasured, waited for: the warm-up, and a barrier between loads (it is
    /// answered once what a load left queued is gone).
    pub async fn settle(&self, messages: &[Message]) -> Result<(), String> {
        let url = &self.urls[self.next.fetch_add(1, Ordering::Relaxed) % self.urls.len()];
        let mut request = self.http.post(url).json(&self.body(messages, 1));
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| self.describe(format!("{url}: {}", root(&e))))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| self.describe(format!("{url}: {}", root(&e))))?;
        if !status.is_success() {
            return Err(self.describe(format!("{url}: HTTP {status}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(300)]))));
        }
        Ok(())
    }

    /// An error message with the key masked.
    fn describe(&self, message: String) -> String {
        match &self.key {
            Some(k) if !k.is_empty() => message.replace(k.as_str(), "[api key]"),
            _ => message,
        }
    }
}

fn root(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// How requests are sent.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// This many in flight, each sent when one finishes (1: synchronous).
    Concurrent(usize),
    /// Arrivals at this mean rate, exponential gaps drawn from the seed.
    Poisson { rate: f64, seed: u64 },
}

/// One load to measure.
pub struct Plan<'a> {
    pub pace: Pace,
    pub seconds: f64,
    pub max_requests: usize,
    /// The first part of the load (a fraction of `seconds`) that is sent but not measured.
    pub warmup: f64,
    /// Requests in flight at most (a Poisson arrival waits for room, and is late).
    pub max_in_flight: usize,
    pub slo: &'a Slo,
    /// The prompts, sent in turn.
    pub prompts: &'a [Vec<Message>],
}

/// One request as it went.
#[derive(Debug, Clone, Default)]
struct Outcome {
    /// Seconds from the load's start: when it was due, when there was room for it, sent, first
    /// text, done.
    due: f64,
    ready: f64,
    sent: f64,
    first: Option<f64>,
    done: Option<f64>,
    /// When each piece of text came.
    pieces: Vec<f64>,
    prompt_tokens: Option<usize>,
    completion_tokens: Option<usize>,
    error: Option<String>,
    /// It waited for room in flight.
    queued: bool,
    /// Abandoned when the load was stopped early.
    cut_off: bool,
}

impl Outcome {
    fn tokens(&self) -> usize {
        self.completion_tokens.unwrap_or(self.pieces.len())
    }

    /// From its arrival (`due`: a request that waited for room, or left late, waited as a user's
    /// would — no coordinated omission) to the first piece of text; for an answer with none (a
    /// stop string at once, or no tokens), to its end: the client had all of it then.
    fn ttft_ms(&self) -> Option<f64> {
        Some((self.first.or(self.done)? - self.due) * 1000.0)
    }

    /// From its arrival to its last piece.
    fn e2e_ms(&self) -> Option<f64> {
        Some((self.done? - self.due) * 1000.0)
    }

    fn tpot_ms(&self) -> Option<f64> {
        let n = self.tokens();
        (n >= 2).then(|| Some((self.done? - self.first?) * 1000.0 / (n - 1) as f64)).flatten()
    }

    fn meets(&self, slo: &Slo) -> bool {
        self.error.is_none()
            && !self.cut_off
            && self.ttft_ms().is_some_and(|t| t <= slo.ttft_ms)
            && self.e2e_ms().is_some_and(|t| t <= slo.e2e_ms)
            && slo.tpot_ms.is_none_or(|max| self.tpot_ms().is_none_or(|t| t <= max))
    }
}

/// Shared by a load's requests: misses known so far among measured requests, and whether the
/// load was stopped.
struct Tally {
    missed: AtomicUsize,
    allowed: usize,
    stop: AtomicBool,
}

impl Tally {
    fn miss(&self) {
        if self.missed.fetch_add(1, Ordering::SeqCst) + 1 > self.allowed {
            self.stop.store(true, Ordering::SeqCst);
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Arrival times in `[0, seconds)` at `rate` per second: exactly `rate × warm_until` of them in the
/// warm-up and `rate × (seconds − warm_until)` after it, at least one (so a short load offers the
/// rate it says, and measures something however low the rate), each part placed as a Poisson
/// process given that count places them (sorted uniform draws: the gaps are as bursty as
/// exponential ones).
pub fn poisson(rate: f64, seed: u64, warm_until: f64, seconds: f64) -> Vec<f64> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let warm = (rate * warm_until).round() as usize;
    let measured = ((rate * (seconds - warm_until)).round() as usize).max(1);
    let mut times: Vec<f64> = (0..warm).map(|_| rng.f64() * warm_until).collect();
    times.extend((0..measured).map(|_| warm_until + rng.f64() * (seconds - warm_until)));
    times.sort_by(f64::total_cmp);
    times
}

/// Runs one load and summarizes it. `Err` only when interrupted.
pub async fn measure(client: &Arc<Client>, plan: &Plan<'_>, cancel: &Cancel) -> Result<Load, String> {
    let start = Instant::now();
    // A load of arrivals is shortened to send at most `max_requests`.
    let mut seconds = match plan.pace {
        Pace::Poisson { rate, .. } => plan.seconds.min(plan.max_requests as f64 / rate),
        Pace::Concurrent(_) => plan.seconds,
    };
    let warm_until = plan.warmup * seconds;
    let schedule = match plan.pace {
        Pace::Poisson { rate, seed } => Some(poisson(rate, seed, warm_until, seconds)),
        Pace::Concurrent(_) => None,
    };
    // A load with a fixed schedule fails once more of its measured requests missed than may.
    let allowed = match &schedule {
        Some(times) => ((1.0 - plan.slo.attainment) * times.iter().filter(|&&t| t >= warm_until).count() as f64 + 1e-9).floor() as usize,
        None => usize::MAX,
    };
    let tally = Arc::new(Tally { missed: AtomicUsize::new(0), allowed, stop: AtomicBool::new(false) });
    let outcomes: Arc<Mutex<BTreeMap<usize, Outcome>>> = Default::default();
    let slo = Arc::new(plan.slo.clone());
    let prompts: Arc<Vec<Vec<Message>>> = Arc::new(plan.prompts.to_vec());
    let mut tasks = JoinSet::new();
    // A request holds its room in flight (a Poisson load's) until it ends.
    let spawn_one = |tasks: &mut JoinSet<()>, i: usize, due: f64, ready: f64, room: Option<(tokio::sync::OwnedSemaphorePermit, bool)>| {
        let (client, tally, outcomes, slo, prompts) = (client.clone(), tally.clone(), outcomes.clone(), slo.clone(), prompts.clone());
        let sent = start.elapsed().as_secs_f64();
        let queued = room.as_ref().is_some_and(|(_, queued)| *queued);
        let at = Outcome { due, ready, sent, queued, ..Outcome::default() };
        // Until it finishes, a request is one the load's end would cut off.
        outcomes.lock().expect("not poisoned").insert(i, Outcome { cut_off: true, ..at.clone() });
        tasks.spawn(async move {
            let _room = room;
            let measured = due >= warm_until;
            let finished = one(&client, &prompts[i % prompts.len()], start, at, &slo, measured.then_some(&*tally)).await;
            if measured && !finished.reported && !finished.outcome.meets(&slo) {
                tally.miss();
            }
            outcomes.lock().expect("not poisoned").insert(i, finished.outcome);
        });
    };
    let interrupted = || cancel.is_set();
    match (&schedule, plan.pace) {
        (Some(times), _) => {
            let room = Arc::new(tokio::sync::Semaphore::new(plan.max_in_flight));
            for (i, &due) in times.iter().enumerate() {
                tokio::time::sleep_until((start + Duration::from_secs_f64(due)).into()).await;
                if tally.stopped() || interrupted() {
                    break;
                }
                // With no room, the arrival waits, and its latency counts from when it was due.
                let permit = match room.clone().try_acquire_owned() {
                    Ok(permit) => (permit, false),
                    Err(_) => (room.clone().acquire_owned().await.expect("never closed"), true),
                };
                let ready = if permit.1 { start.elapsed().as_secs_f64() } else { due };
                while tasks.try_join_next().is_some() {}
                spawn_one(&mut tasks, i, due, ready, Some(permit));
            }
        }
        (None, Pace::Concurrent(n)) => {
            let (mut next, mut measured) = (0, 0);
            while next < n.min(plan.max_requests) {
                let now = start.elapsed().as_secs_f64();
                spawn_one(&mut tasks, next, now, now, None);
                next += 1;
                measured += usize::from(now >= warm_until);
            }
            while tasks.join_next().await.is_some() {
                if interrupted() {
                    tasks.abort_all();
                }
                // The load runs its seconds, and on until every slot has sent a measured request:
                // requests slower than the load is long still measure its throughput and latency.
                let now = start.elapsed().as_secs_f64();
                if interrupted() || (now >= seconds && measured >= n) || next >= plan.max_requests {
                    continue;
                }
                spawn_one(&mut tasks, next, now, now, None);
                next += 1;
                measured += usize::from(now >= warm_until);
                // The measured part ends with the last send: with every request sent, or with
                // the last slot's first measured one after the load's seconds.
                if next >= plan.max_requests || now >= seconds {
                    seconds = now.max(warm_until + 1e-3);
                }
            }
        }
        (None, Pace::Poisson { .. }) => unreachable!("a Poisson load has a schedule"),
    }
    // The rest finish (each within the client's timeout), unless the load was stopped.
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { break },
            _ = tick.tick() => if tally.stopped() || interrupted() { tasks.abort_all() },
        }
    }
    if interrupted() {
        return Err("interrupted".into());
    }
    let outcomes = std::mem::take(&mut *outcomes.lock().expect("not poisoned"));
    Ok(summarize(plan, warm_until, seconds, outcomes.into_values().collect(), tally.stopped()))
}

struct Finished {
    outcome: Outcome,
    /// Its miss was already counted while it ran.
    reported: bool,
}

/// Sends one streamed request and times it. With `tally`, a miss is counted the moment it is
/// certain (no first text by the TTFT bound, not done by the end-to-end bound).
async fn one(client: &Client, messages: &[Message], start: Instant, mut outcome: Outcome, slo: &Slo, tally: Option<&Tally>) -> Finished {
    let mut reported = false;
    // Latency counts from when the request was due (it may have waited for room).
    let at = |s: f64| start + Duration::from_secs_f64(s);
    let first_by = at(outcome.due + slo.ttft_ms / 1000.0);
    let done_by = at(outcome.due + slo.e2e_ms / 1000.0);
    let url = &client.urls[client.next.fetch_add(1, Ordering::Relaxed) % client.urls.len()];
    let body = client.body(messages, client.max_tokens);
    let request = || {
        let request = client.http.post(url).json(&body);
        match &client.key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    };
    let result: Result<(), String> = async {
        // A server may close a kept-alive connection just as the next request goes out on it
        // (llama.cpp's closes one after a few requests): no answer came, so it is sent once more,
        // on a new connection, its time still counted from the first send.
        let mut response = match request().send().await {
            Ok(response) => response,
            Err(e) if e.is_request() || e.is_connect() => request().send().await.map_err(|e| root(&e))?,
            Err(e) => return Err(root(&e)),
        };
        let status = response.status();
        if !status.is_success() {
            let body = response.bytes().await.unwrap_or_default();
            return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body[..body.len().min(300)])));
        }
        let mut buffer: Vec<u8> = Vec::new();
        loop {
            let deadline = if outcome.first.is_none() { first_by.min(done_by) } else { done_by };
            let chunk = tokio::select! {
                chunk = response.chunk() => chunk.map_err(|e| root(&e))?,
                _ = tokio::time::sleep_until(deadline.into()), if !reported && tally.is_some() => {
                    reported = true;
                    if let Some(t) = tally { t.miss() }
                    continue;
                }
            };
            let Some(chunk) = chunk else { return Err("the stream ended without [DONE]".into()) };
            let now = start.elapsed().as_secs_f64();
            buffer.extend_from_slice(&chunk);
            while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let Some(data) = line.trim().strip_prefix("data:") else { continue };
                let data = data.trim();
                if data == "[DONE]" {
                    outcome.done = Some(outcome.done.unwrap_or(now));
                    return Ok(());
                }
                let event: Value = serde_json::from_str(data).map_err(|e| format!("a malformed event ({e}): {data}"))?;
                if let Some(error) = event.get("error") {
                    return Err(format!("the server: {}", error.get("message").and_then(Value::as_str).unwrap_or(&error.to_string())));
                }
                let choice = &event["choices"][0];
                if choice["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()) {
                    outcome.first.get_or_insert(now);
                    outcome.pieces.push(now);
                }
                if choice["finish_reason"].is_string() {
                    outcome.done = Some(now);
                }
                if let Some(usage) = event.get("usage").filter(|u| u.is_object()) {
                    outcome.prompt_tokens = usage["prompt_tokens"].as_u64().map(|n| n as usize);
                    outcome.completion_tokens = usage["completion_tokens"].as_u64().map(|n| n as usize);
                }
            }
        }
    }
    .await;
    if let Err(e) = result {
        outcome.error = Some(client.describe(format!("{url}: {e}")));
    }
    Finished { outcome, reported }
}

fn percentiles(mut values: Vec<f64>) -> Percentiles {
    if values.is_empty() {
        return Percentiles::default();
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    Percentiles { p50: at(0.50), p95: at(0.95), p99: at(0.99) }
}

/// Summarizes a load whose measured part ran from `warm_until` to `seconds` (its last send).
fn summarize(plan: &Plan, warm_until: f64, seconds: f64, outcomes: Vec<Outcome>, stopped_early: bool) -> Load {
    let measured: Vec<&Outcome> = outcomes.iter().filter(|o| o.due >= warm_until).collect();
    let completed: Vec<&Outcome> = measured.iter().copied().filter(|o| o.error.is_none() && o.done.is_some()).collect();
    let met = measured.iter().filter(|o| o.meets(plan.slo)).count();
    let requests = measured.len();
    let attainment = if requests == 0 { 0.0 } else { met as f64 / requests as f64 };
    let window = seconds - warm_until;
    let offered_rps = requests as f64 / window;
    let e2e = percentiles(completed.iter().filter_map(|o| o.e2e_ms()).collect());
    let (achieved_rps, goodput_rps) = match plan.pace {
        // A server that keeps up completes the last arrival about one typical latency after it
        // came; what it completes later than that is a backlog, and lowers the rate.
        Pace::Poisson { .. } => {
            let last = completed.iter().filter_map(|o| o.done).fold(f64::NEG_INFINITY, f64::max) - e2e.p50 / 1000.0;
            let span = last.max(seconds) - warm_until;
            (completed.len() as f64 / span, met as f64 / span)
        }
        Pace::Concurrent(_) => {
            let within: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_none() && o.done.is_some_and(|t| (warm_until..=seconds).contains(&t))).collect();
            (within.len() as f64 / window, within.iter().filter(|o| o.meets(plan.slo)).count() as f64 / window)
        }
    };
    // Over the completed requests that have the count; none when none has it.
    let mean = |f: &dyn Fn(&Outcome) -> Option<usize>| -> Option<f64> {
        let v: Vec<usize> = completed.iter().filter_map(|o| f(o)).collect();
        (!v.is_empty()).then(|| v.iter().sum::<usize>() as f64 / v.len() as f64)
    };
    let lag = percentiles(measured.iter().map(|o| (o.sent - o.ready).max(0.0) * 1000.0).collect());
    let (kind, rate_rps, concurrency) = match plan.pace {
        Pace::Concurrent(1) => ("synchronous", None, Some(1)),
        Pace::Concurrent(n) => ("throughput", None, Some(n)),
        Pace::Poisson { rate, .. } => ("poisson", Some(rate), None),
    };
    let client_behind = match rate_rps {
        Some(r) => lag.p99 > 10.0f64.max(100.0 / r),
        None => false,
    };
    let keeps_up = match rate_rps {
        Some(_) => achieved_rps >= (1.0 - RATE_TOLERANCE) * offered_rps,
        None => true,
    };
    let sustained = requests > 0 && !stopped_early && attainment >= plan.slo.attainment && keeps_up;
    Load {
        kind: kind.to_string(),
        rate_rps,
        concurrency,
        requests,
        completed: completed.len(),
        errors: measured.iter().filter(|o| o.error.is_some()).count(),
        error_examples: measured.iter().filter_map(|o| o.error.clone()).fold(Vec::new(), |mut seen, e| {
            if seen.len() < 3 && !seen.contains(&e) {
                seen.push(e);
            }
            seen
        }),
        cut_off: measured.iter().filter(|o| o.cut_off).count(),
        queued: measured.iter().filter(|o| o.queued).count(),
        met_slo: met,
        attainment,
        offered_rps,
        achieved_rps,
        goodput_rps,
        ttft_ms: percentiles(completed.iter().filter_map(|o| o.ttft_ms()).collect()),
        itl_ms: percentiles(completed.iter().flat_map(|o| o.pieces.windows(2).map(|w| (w[1] - w[0]) * 1000.0)).collect()),
        tpot_ms: percentiles(completed.iter().filter_map(|o| o.tpot_ms()).collect()),
        e2e_ms: e2e,
        prompt_tokens_mean: mean(&|o| o.prompt_tokens),
        completion_tokens_mean: mean(&|o| Some(o.tokens())).unwrap_or(0.0),
        send_lag_p99_ms: lag.p99,
        client_behind,
        stopped_early,
        sustained,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slo() -> Slo {
        Slo { ttft_ms: 500.0, e2e_ms: 1000.0, tpot_ms: None, attainment: 0.9 }
    }

    fn plan<'a>(pace: Pace, slo: &'a Slo) -> Plan<'a> {
        Plan { pace, seconds: 10.0, max_requests: 1000, warmup: 0.1, max_in_flight: 8, slo, prompts: &[] }
    }

    /// A request sent at `at` that took `latency` seconds, its first text after a tenth of it.
    fn served(at: f64, latency: f64) -> Outcome {
        Outcome { due: at, ready: at, sent: at, first: Some(at + latency / 10.0), done: Some(at + latency), pieces: vec![at + latency / 10.0, at + latency], ..Outcome::default() }
    }

    #[test]
    fn arrivals_offer_exactly_the_rate_they_say_and_are_seeded() {
        let times = poisson(4.0, 7, 1.0, 10.0);
        assert_eq!(times.len(), 40);
        assert!(times.windows(2).all(|w| w[0] <= w[1]) && times.iter().all(|&t| (0.0..10.0).contains(&t)));
        assert_eq!(times, poisson(4.0, 7, 1.0, 10.0));
        assert_ne!(times, poisson(4.0, 8, 1.0, 10.0));
    }

    #[test]
    fn a_server_that_keeps_up_is_sustained_and_a_growing_backlog_is_not() {
        let slo = slo();
        let plan = plan(Pace::Poisson { rate: 4.0, seed: 1 }, &slo);
        // Four a second over ten seconds, each answered in 0.3 s.
        let steady: Vec<Outcome> = (0..40).map(|i| served(i as f64 * 0.25, 0.3)).collect();
        let load = summarize(&plan, 1.0, 10.0, steady, false);
        assert_eq!((load.requests, load.completed, load.met_slo), (36, 36, 36));
        assert!((load.offered_rps - 4.0).abs() < 1e-9, "{}", load.offered_rps);
        assert!(load.achieved_rps >= 0.95 * load.offered_rps, "{} of {}", load.achieved_rps, load.offered_rps);
        assert!(load.sustained);
        // The same arrivals served one after another at 0.3 s each: the backlog grows, every
        // latency is still within a lenient SLO, and the rate gives it away.
        let lenient = Slo { ttft_ms: 1e6, e2e_ms: 1e6, tpot_ms: None, attainment: 0.9 };
        let plan = Plan { slo: &lenient, ..plan };
        let mut free = 0.0f64;
        let backlog: Vec<Outcome> = (0..40)
            .map(|i| {
                let at = i as f64 * 0.25;
                free = free.max(at) + 0.3;
                served(at, free - at)
            })
            .collect();
        let load = summarize(&plan, 1.0, 10.0, backlog, false);
        assert_eq!(load.met_slo, load.requests);
        assert!(load.achieved_rps < 0.95 * load.offered_rps, "{} of {}", load.achieved_rps, load.offered_rps);
        assert!(!load.sustained);
    }

    #[test]
    fn misses_errors_cut_off_requests_and_long_waits_for_room_count_against_attainment() {
        let slo = slo();
        let plan = plan(Pace::Poisson { rate: 2.0, seed: 1 }, &slo);
        let mut outcomes: Vec<Outcome> = (0..20).map(|i| served(i as f64 * 0.5, 0.2)).collect();
        outcomes[5] = served(2.5, 1.5); // too slow
        outcomes[6].error = Some("HTTP 500".into());
        // Due at 3.5 s, it waited 0.9 s for room: 1.1 s from its arrival, a miss.
        outcomes[7] = Outcome { due: 3.5, queued: true, ..served(4.4, 0.2) };
        // Waited 0.1 s: within the SLO all the same.
        outcomes[9] = Outcome { due: 4.4, queued: true, ..served(4.5, 0.2) };
        outcomes[8] = Outcome { cut_off: true, done: None, ..outcomes[8].clone() };
        outcomes[0] = served(0.0, 5.0); // in the warm-up: not measured
        let load = summarize(&plan, 1.0, 10.0, outcomes, false);
        assert_eq!(load.requests, 18);
        assert_eq!((load.errors, load.cut_off, load.queued, load.met_slo), (1, 1, 2, 14));
        assert_eq!(load.error_examples, vec!["HTTP 500".to_string()]);
        assert!((load.attainment - 14.0 / 18.0).abs() < 1e-9);
        assert!(!load.sustained);
    }

    /// A server on loopback that answers every chat completion with one streamed piece after
    /// `delay`: requests take exactly as long as it says.
    async fn slow_server(delay: Duration) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    // The head, then as much body as it says.
                    loop {
                        let n = socket.read(&mut buf).await.unwrap();
                        request.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&request).to_string();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let length = text.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap())).unwrap_or(0);
                            if request.len() >= end + 4 + length {
                                break;
                            }
                        }
                        if n == 0 {
                            return;
                        }
                    }
                    tokio::time::sleep(delay).await;
                    let piece = json!({"choices": [{"delta": {"content": "a"}, "finish_reason": null}]});
                    let finish = json!({"choices": [{"delta": {}, "finish_reason": "stop"}]});
                    let body = format!("data: {piece}\n\ndata: {finish}\n\ndata: [DONE]\n\n");
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
                    let _ = socket.write_all(format!("{head}{body}").as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        url
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_slower_than_the_load_is_long_are_still_measured() {
        let url = slow_server(Duration::from_millis(700)).await;
        let client = Arc::new(Client::new(&[url], "m", None, &infer::Sampler::default(), Duration::from_secs(10)).unwrap());
        let lenient = Slo { ttft_ms: 5000.0, e2e_ms: 5000.0, tpot_ms: None, attainment: 0.9 };
        let prompts = vec![vec![Message { role: "user".into(), content: "hi".into() }]];
        // A 0.5 s load (0.05 s of warm-up) whose every request takes 0.7 s: those sent at its
        // start are warm-up, and it runs on until each of the two slots has sent a measured one.
        let plan = Plan { pace: Pace::Concurrent(2), seconds: 0.5, max_requests: 1000, warmup: 0.1, max_in_flight: 2, slo: &lenient, prompts: &prompts };
        let load = measure(&client, &plan, &Cancel::default()).await.unwrap();
        assert_eq!((load.requests, load.completed, load.met_slo, load.errors), (2, 2, 2, 0), "{load:#?}");
        // Two completed (the warm-up's) within the 0.05..0.7 s it measured.
        assert!((load.achieved_rps - 2.0 / 0.65).abs() < 0.5, "{load:#?}");
        assert!(load.e2e_ms.p50 >= 700.0 && load.e2e_ms.p50 < 1500.0, "{load:#?}");
        // Arrivals at a rate too low for the load's length still measure one.
        let plan = Plan { pace: Pace::Poisson { rate: 0.1, seed: 3 }, ..plan };
        let load = measure(&client, &plan, &Cancel::default()).await.unwrap();
        assert_eq!((load.requests, load.completed, load.met_slo), (1, 1, 1), "{load:#?}");
    }

    #[test]
    fn the_load_generator_reports_falling_behind_its_schedule() {
        let slo = slo();
        let plan = plan(Pace::Poisson { rate: 10.0, seed: 1 }, &slo);
        let on_time: Vec<Outcome> = (0..100).map(|i| served(i as f64 * 0.1, 0.1)).collect();
        assert!(!summarize(&plan, 1.0, 10.0, on_time.clone(), false).client_behind);
        let late: Vec<Outcome> = on_time.into_iter().map(|o| Outcome { sent: o.due + 0.05, ..o }).collect();
        let load = summarize(&plan, 1.0, 10.0, late, false);
        assert!(load.client_behind && load.send_lag_p99_ms > 49.0);
    }
}
