//! OpenAI-compatible endpoints (vLLM, SGLang, llama.cpp's server, hosted APIs) over HTTP.
//!
//! One [`Endpoint`] per candidate: its replicas are used in turn, and a failed attempt moves to
//! the next replica. Requests in flight are bounded by an additive-increase / multiplicative-
//! decrease limit ([`Limiter`]): it starts at the configured maximum, halves when the server says
//! it is overloaded (429, 503, a timeout) and grows back by one per window of successes. Failed
//! attempts are retried with exponential backoff and full jitter, or after the server's
//! `Retry-After`. What cannot succeed (400, 401, 404: a wrong request, key or model name) fails at
//! once. A replica that cannot be reached rests for a while. An item that still fails is an error for the engine, which keeps every finished item, so
//! the next run retries only the failed ones.
//!
//! The API key is read from the environment variable the catalog names, at request time, and is
//! only ever written into the `Authorization` header: errors quote response bodies with any
//! occurrence of the key masked.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use engine::Cancel;
use reqwest::StatusCode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Notify;

use catalog::ResponseFormat;

use crate::{Answer, Message, OutputConstraint, Sampler, Timing};

/// How long a replica that could not be reached is passed over.
const REPLICA_REST: Duration = Duration::from_secs(10);

/// How HTTP candidates are called. Transport settings: they do not change answers, so they are
/// not part of any item's memo key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Most requests in flight per candidate (the adaptive limit never exceeds it).
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: Concurrency,
    /// Seconds one attempt may take, connection included.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: Seconds,
    /// Attempts after the first one, for errors that may pass (5xx, 429, timeouts, dropped connections, malformed bodies).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First backoff, in seconds; doubles per attempt, up to `max_backoff_s`.
    #[serde(default = "default_backoff_s")]
    pub backoff_s: Seconds,
    #[serde(default = "default_max_backoff_s")]
    pub max_backoff_s: Seconds,
}

/// Requests in flight: 1 to 1024.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, JsonSchema)]
pub struct Concurrency(#[schemars(range(min = 1, max = 1024))] pub usize);

impl<'de> Deserialize<'de> for Concurrency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match i64::deserialize(d)? {
            n @ 1..=1024 => Ok(Concurrency(n as usize)),
            n => Err(serde::de::Error::custom(format!("must be 1 to 1024 requests, not {n}"))),
        }
    }
}

/// A positive duration in seconds, at most a day.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, JsonSchema)]
pub struct Seconds(#[schemars(range(min = 0.001, max = 86400.0))] pub f64);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let x = f64::deserialize(d)?;
        if x.is_finite() && (0.001..=86_400.0).contains(&x) {
            Ok(Seconds(x))
        } else {
            Err(serde::de::Error::custom(format!("must be a positive number of seconds (0.001 to 86400), not {x}")))
        }
    }
}

fn default_max_concurrency() -> Concurrency {
    Concurrency(8)
}
fn default_timeout_s() -> Seconds {
    Seconds(120.0)
}
fn default_retries() -> u32 {
    6
}
fn default_backoff_s() -> Seconds {
    Seconds(0.5)
}
fn default_max_backoff_s() -> Seconds {
    Seconds(30.0)
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            max_concurrency: default_max_concurrency(),
            timeout_s: default_timeout_s(),
            retries: default_retries(),
            backoff_s: default_backoff_s(),
            max_backoff_s: default_max_backoff_s(),
        }
    }
}

pub struct Endpoint {
    pub candidate: String,
    base_urls: Vec<String>,
    /// The model name the server expects.
    pub model: String,
    api_key_env: Option<String>,
    response_format: ResponseFormat,
    settings: HttpSettings,
    client: reqwest::Client,
    next_replica: AtomicUsize,
    /// Per replica: when it may be tried again after it refused a connection or timed out.
    resting: Vec<Mutex<Option<Instant>>>,
    limiter: Limiter,
}

/// How an answer was obtained (volatile: differs from run to run).
#[derive(Debug, Serialize)]
pub struct Transport {
    pub attempts: u32,
    pub replica: usize,
}

/// One failed attempt, and whether another may pass.
struct Failure {
    message: String,
    retry: bool,
    /// The server asked for less load.
    overload: bool,
    /// No connection (refused, timed out): let the replica rest.
    unreachable: bool,
    retry_after: Option<Duration>,
}

impl Endpoint {
    pub fn new(
        candidate: &str,
        base_urls: &[String],
        model: &str,
        api_key_env: Option<&str>,
        response_format: ResponseFormat,
        settings: &HttpSettings,
    ) -> Result<Endpoint, String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs_f64(settings.timeout_s.0))
            .connect_timeout(Duration::from_secs_f64(settings.timeout_s.0.min(10.0)))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Endpoint {
            candidate: candidate.to_string(),
            base_urls: base_urls.iter().map(|u| u.trim_end_matches('/').to_string()).collect(),
            model: model.to_string(),
            api_key_env: api_key_env.map(str::to_string),
            response_format,
            settings: settings.clone(),
            client,
            next_replica: AtomicUsize::new(0),
            resting: base_urls.iter().map(|_| Mutex::new(None)).collect(),
            limiter: Limiter::new(settings.max_concurrency.0),
        })
    }

    pub async fn chat(
        &self,
        messages: &[Message],
        sampler: &Sampler,
        output: Option<&OutputConstraint>,
        seed: u64,
        tools: Option<(&[Value], crate::ToolChoice)>,
        cancel: &Cancel,
    ) -> Result<(Answer, Transport), String> {
        let key = match &self.api_key_env {
            None => None,
            Some(var) => Some(std::env::var(var).map_err(|_| {
                format!("model `{}`: environment variable `{var}` (its `api_key_env`) is not set", self.candidate)
            })?),
        };
        let mut body = json!({
            "model": self.model,
            "messages": messages,
            "max_tokens": sampler.max_tokens,
            "temperature": sampler.temperature,
            "seed": seed,
        });
        if !sampler.stop.is_empty() {
            body["stop"] = json!(sampler.stop);
        }
        if let Some((tools, choice)) = tools {
            body["tools"] = json!(tools);
            body["tool_choice"] = match (choice, tools) {
                (crate::ToolChoice::Auto, _) => json!("auto"),
                // One function: named, which every server with tools takes (not all take `required`).
                (crate::ToolChoice::Required, [one]) => json!({"type": "function", "function": {"name": one["function"]["name"]}}),
                (crate::ToolChoice::Required, _) => json!("required"),
            };
        }
        let schema = match output {
            None => None,
            Some(OutputConstraint::JsonSchema(schema)) => Some(schema.clone()),
            // A choice is a JSON string from an enum; the answer is that string, unquoted.
            Some(OutputConstraint::Choice(choices)) => Some(json!({"type": "string", "enum": choices})),
            Some(OutputConstraint::Regex(_) | OutputConstraint::Lark(_)) => return Err("regex and grammar constraints are not available over HTTP".into()),
        };
        if let Some(schema) = schema {
            body["response_format"] = match self.response_format {
                ResponseFormat::JsonSchema => json!({"type": "json_schema", "json_schema": {"name": "output", "strict": true, "schema": schema}}),
                ResponseFormat::JsonObject => json!({"type": "json_object", "schema": schema}),
            };
        }
        let mut attempt = 0u32;
        loop {
            let replica = self.pick_replica();
            let url = format!("{}/chat/completions", self.base_urls[replica]);
            let permit = self.limiter.acquire().await;
            let started = Instant::now();
            let outcome = self.attempt(&url, &body, key.as_deref()).await;
            let latency = started.elapsed();
            drop(permit);
            let failure = match outcome {
                Ok(mut answer) => {
                    self.limiter.succeeded();
                    if let Some(OutputConstraint::Choice(_)) = output {
                        // `"billing"` → `billing`; anything else is kept as the server sent it.
                        if let Ok(Value::String(choice)) = serde_json::from_str(answer.text.trim()) {
                            answer.text = choice;
                        }
                    }
                    answer.timing.latency_ms = latency.as_secs_f64() * 1000.0;
                    return Ok((answer, Transport { attempts: attempt + 1, replica }));
                }
                Err(f) => f,
            };
            let message = match &key {
                Some(k) if !k.is_empty() => failure.message.replace(k.as_str(), "[api key]"),
                _ => failure.message,
            };
            if failure.overload {
                self.limiter.overloaded();
            }
            if failure.unreachable && self.base_urls.len() > 1 {
                *self.resting[replica].lock().expect("replica lock") = Some(Instant::now() + REPLICA_REST);
            }
            if !failure.retry || attempt >= self.settings.retries || cancel.is_set() {
                let tries = if attempt == 0 { String::new() } else { format!(" (after {} attempts)", attempt + 1) };
                return Err(format!("{url}: {message}{tries}"));
            }
            let wait = failure.retry_after.map_or_else(|| self.backoff(attempt), |d| d.min(Duration::from_secs(300)));
            tracing::warn!(model = %self.candidate, %url, attempt = attempt + 1, wait_ms = wait.as_millis() as u64, "{message}; retrying");
            sleep_unless_cancelled(wait, cancel).await;
            attempt += 1;
        }
    }

    async fn attempt(&self, url: &str, body: &Value, key: Option<&str>) -> Result<Answer, Failure> {
        let mut request = self.client.post(url).json(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| Failure {
            message: describe(&e),
            retry: true,
            overload: e.is_timeout(),
            unreachable: e.is_connect() || e.is_timeout(),
            retry_after: None,
        })?;
        let status = response.status();
        let retry_after = response.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        let bytes = response.bytes().await.map_err(|e| Failure { message: format!("reading the response: {}", describe(&e)), retry: true, overload: false, unreachable: false, retry_after: None })?;
        if !status.is_success() {
            let retry = status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
            let overload = status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE;
            return Err(Failure { message: format!("HTTP {status}: {}", excerpt(&bytes)), retry, overload, unreachable: false, retry_after });
        }
        parse_completion(&bytes).map_err(|e| Failure { message: format!("malformed response ({e}): {}", excerpt(&bytes)), retry: true, overload: false, unreachable: false, retry_after: None })
    }

    /// The next replica in turn, passing over those resting after a failed connection (unless
    /// all are).
    fn pick_replica(&self) -> usize {
        let n = self.base_urls.len();
        let start = self.next_replica.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&r| self.resting[r].lock().expect("replica lock").is_none_or(|until| until <= now))
            .unwrap_or(start % n)
    }

    /// Full jitter: uniform in [0, min(max, base · 2^attempt)].
    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = (self.settings.backoff_s.0 * 2f64.powi(attempt.min(30) as i32)).min(self.settings.max_backoff_s.0);
        Duration::from_secs_f64(ceiling * fastrand::f64())
    }

    /// The replicas' base URLs.
    pub fn base_urls(&self) -> &[String] {
        &self.base_urls
    }

    /// The environment variable holding the API key, if the endpoint takes one.
    pub fn api_key_env(&self) -> Option<&str> {
        self.api_key_env.as_deref()
    }

    /// The current adaptive limit on requests in flight.
    pub fn concurrency_limit(&self) -> usize {
        self.limiter.limit()
    }
}

fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_body() || e.is_decode() {
        "the response body broke off"
    } else {
        "request failed"
    };
    // reqwest's own message names the URL, which the caller already shows; the root cause says why.
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    format!("{kind}: {cause}")
}

/// A short, single-line quote of a response body for error messages.
fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.is_empty() {
        return "(empty body)".into();
    }
    match line.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line,
    }
}

fn parse_completion(bytes: &[u8]) -> Result<Answer, String> {
    #[derive(Deserialize)]
    struct Completion {
        choices: Vec<Choice>,
        usage: Option<Usage>,
    }
    #[derive(Deserialize)]
    struct Choice {
        message: ChoiceMessage,
        finish_reason: Option<String>,
    }
    #[derive(Deserialize)]
    struct ChoiceMessage {
        content: Option<String>,
        /// A server that parses a reasoning model's thinking sends it apart (vLLM, llama.cpp).
        #[serde(default)]
        reasoning_content: Option<String>,
        #[serde(default)]
        tool_calls: Option<Vec<Call>>,
    }
    #[derive(Deserialize)]
    struct Call {
        function: Function,
    }
    #[derive(Deserialize)]
    struct Function {
        name: String,
        /// JSON text, as OpenAI's API sends it.
        arguments: Value,
    }
    #[derive(Deserialize)]
    struct Usage {
        prompt_tokens: usize,
        completion_tokens: usize,
        #[serde(default)]
        completion_tokens_details: Option<Details>,
    }
    #[derive(Deserialize)]
    struct Details {
        #[serde(default)]
        reasoning_tokens: Option<usize>,
    }
    let c: Completion = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let choice = c.choices.into_iter().next().ok_or("no choices")?;
    let usage = c.usage.ok_or("no usage")?;
    let tool_calls: Option<Vec<artifacts::ToolCall>> = choice.message.tool_calls.filter(|c| !c.is_empty()).map(|calls| {
        calls
            .into_iter()
            .map(|c| {
                let arguments = match c.function.arguments {
                    Value::String(text) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
                    other => other,
                };
                artifacts::ToolCall { name: c.function.name, arguments }
            })
            .collect()
    });
    // A call is what is judged: the first, as JSON.
    let text = match &tool_calls {
        Some(calls) => calls[0].as_json().to_string(),
        None => choice.message.content.unwrap_or_default(),
    };
    Ok(Answer {
        text,
        tool_calls,
        finish_reason: choice.finish_reason.unwrap_or_default(),
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        reasoning: choice.message.reasoning_content,
        reasoning_tokens: usage.completion_tokens_details.and_then(|d| d.reasoning_tokens),
        redone_alone: false,
        timing: Timing { latency_ms: 0.0, prefill_ms: None, decode_ms: None },
    })
}

/// `Retry-After`: delay-seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or_default())
}

async fn sleep_unless_cancelled(wait: Duration, cancel: &Cancel) {
    let until = Instant::now() + wait;
    while Instant::now() < until && !cancel.is_set() {
        tokio::time::sleep((until - Instant::now()).min(Duration::from_millis(100))).await;
    }
}

/// Additive-increase / multiplicative-decrease bound on requests in flight.
struct Limiter {
    max: usize,
    state: Mutex<LimiterState>,
    changed: Notify,
}

struct LimiterState {
    limit: f64,
    in_flight: usize,
}

struct Permit<'a>(&'a Limiter);

impl Limiter {
    fn new(max: usize) -> Limiter {
        Limiter { max, state: Mutex::new(LimiterState { limit: max as f64, in_flight: 0 }), changed: Notify::new() }
    }

    async fn acquire(&self) -> Permit<'_> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut s = self.state.lock().expect("limiter lock");
                if s.in_flight < s.limit as usize {
                    s.in_flight += 1;
                    return Permit(self);
                }
            }
            changed.await;
        }
    }

    fn succeeded(&self) {
        let mut s = self.state.lock().expect("limiter lock");
        s.limit = (s.limit + 1.0 / s.limit).min(self.max as f64);
        drop(s);
        self.changed.notify_waiters();
    }

    fn overloaded(&self) {
        let mut s = self.state.lock().expect("limiter lock");
        s.limit = (s.limit / 2.0).max(1.0);
    }

    fn limit(&self) -> usize {
        self.state.lock().expect("limiter lock").limit as usize
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.state.lock().expect("limiter lock").in_flight -= 1;
        self.0.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("soon"), None);
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        let d = parse_retry_after(&later).unwrap();
        assert!(d > Duration::from_secs(28) && d <= Duration::from_secs(30), "{d:?}");
        assert_eq!(parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT"), Some(Duration::ZERO));
    }

    #[test]
    fn backoff_is_jittered_below_a_doubling_ceiling() {
        let settings = HttpSettings { backoff_s: Seconds(0.5), max_backoff_s: Seconds(3.0), ..HttpSettings::default() };
        let e = Endpoint::new("m", &["http://127.0.0.1:1/v1".into()], "m", None, ResponseFormat::JsonSchema, &settings).unwrap();
        for (attempt, ceiling) in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 3.0), (10, 3.0), (40, 3.0)] {
            let waits: Vec<f64> = (0..200).map(|_| e.backoff(attempt).as_secs_f64()).collect();
            assert!(waits.iter().all(|&w| (0.0..=ceiling).contains(&w)), "attempt {attempt}");
            assert!(waits.iter().any(|&w| w > ceiling / 2.0) && waits.iter().any(|&w| w < ceiling / 2.0), "attempt {attempt}: jittered");
        }
    }

    #[tokio::test]
    async fn limiter_halves_on_overload_and_grows_back_by_one_per_window() {
        let l = Limiter::new(8);
        assert_eq!(l.limit(), 8);
        l.overloaded();
        l.overloaded();
        assert_eq!(l.limit(), 2);
        let (a, b) = (l.acquire().await, l.acquire().await);
        let third = tokio::time::timeout(Duration::from_millis(50), l.acquire()).await;
        assert!(third.is_err(), "a third request waits while the limit is 2");
        drop((a, b));
        for _ in 0..2 {
            l.succeeded();
        }
        assert_eq!(l.limit(), 2, "2 + 1/2 + 1/2.5 = 2.9 after two successes");
        l.succeeded();
        assert_eq!(l.limit(), 3, "one more per window of about `limit` successes");
        for _ in 0..100 {
            l.succeeded();
        }
        assert_eq!(l.limit(), 8, "never above the configured maximum");
        for _ in 0..10 {
            l.overloaded();
        }
        assert_eq!(l.limit(), 1, "never below one");
    }

    #[tokio::test]
    async fn a_waiting_request_starts_when_one_finishes() {
        let l = std::sync::Arc::new(Limiter::new(1));
        let first = l.acquire().await;
        let l2 = l.clone();
        let waiter = tokio::spawn(async move {
            let _p = l2.acquire().await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), waiter).await.unwrap().unwrap();
    }

    #[test]
    fn completions_parse_and_broken_ones_say_why() {
        let a = parse_completion(br#"{"choices":[{"message":{"role":"assistant","content":"billing"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#).unwrap();
        assert_eq!((a.text.as_str(), a.finish_reason.as_str(), a.prompt_tokens, a.completion_tokens), ("billing", "stop", 9, 2));
        assert!(parse_completion(br#"{"choices":[{"message":{"con"#).unwrap_err().contains("EOF"));
        assert_eq!(parse_completion(br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#).unwrap_err(), "no choices");
        // A server that parses a reasoning model's thinking (vLLM, llama.cpp) sends it apart, and
        // may say how many of the completion's tokens it took.
        let a = parse_completion(br#"{"choices":[{"message":{"content":"billing","reasoning_content":"a charge twice"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":7,"completion_tokens_details":{"reasoning_tokens":5}}}"#).unwrap();
        assert_eq!((a.text.as_str(), a.reasoning.as_deref(), a.reasoning_tokens), ("billing", Some("a charge twice"), Some(5)));
        assert_eq!(excerpt(b"  \n"), "(empty body)");
        assert_eq!(excerpt("x".repeat(300).as_bytes()).chars().count(), 201);
    }
}
