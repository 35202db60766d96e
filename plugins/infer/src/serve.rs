//! `pipeline serve`: one embedded model, pinned by its weights digest, behind the OpenAI chat
//! completions API, so other tools (or another `pipeline` with an `openai_compatible` source) use
//! exactly the model a pipeline measured.
//!
//! `stream: true` answers with server-sent events as OpenAI's API does (with
//! `stream_options.include_usage`, a last chunk with the usage); the streamed text is exactly the
//! text of the same request unstreamed.
//!
//! Requests run concurrently and mistral.rs batches them, as in the `infer` stage; an answer does
//! not depend on what else is in flight (`embedded`'s tests). Decoding is greedy unless a request sets `temperature` above 0. The
//! response's `system_fingerprint` is the weights digest (and preparation), so a client can record
//! what answered.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use catalog::Catalog;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::embedded::Piece;
use crate::{DeviceSpec, Message, OutputConstraint, Prepare, Sampler, embedded};

/// What to serve, and where.
pub struct ServeConfig<'a> {
    pub catalog: &'a Path,
    pub model: &'a str,
    pub prepare: Option<Prepare>,
    pub device: DeviceSpec,
    pub listen: SocketAddr,
}

struct Served {
    id: String,
    fingerprint: String,
    runner: Arc<embedded::Runner>,
}

/// Loads the model, binds, calls `ready` with the bound address, and serves until `shutdown`.
pub async fn serve(
    config: ServeConfig<'_>,
    ready: impl FnOnce(SocketAddr, &str),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let catalog = Catalog::load(config.catalog).map_err(|d| d.iter().map(|d| d.render(false)).collect::<Vec<_>>().join("\n"))?;
    let model = catalog.get(config.model).ok_or_else(|| format!("model `{}` is not in `{}` (it has: {})", config.model, config.catalog.display(), catalog.ids().join(", ")))?;
    let (source, sha256) = match model.runnable_source() {
        Some(s) if let Some(sha256) = s.weights_sha256() => (s.clone(), sha256),
        _ => return Err(format!("model `{}` has no weights to run in-process (a `python_package`, `local_file` or `local_dir` source, or a pinned `hugging_face` one)", config.model)),
    };
    let base = config.catalog.parent().unwrap_or(Path::new("."));
    let runner = embedded::load(&source, &sha256, base, config.prepare, config.device).await?;
    let fingerprint = fingerprint(&sha256, config.prepare);
    let app = router(Served { id: model.id.clone(), fingerprint: fingerprint.clone(), runner });
    let listener = tokio::net::TcpListener::bind(config.listen).await.map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    ready(addr, &fingerprint);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await.map_err(|e| e.to_string())
}

/// What a response's `system_fingerprint` says answered: the weights digest and preparation.
fn fingerprint(sha256: &str, prepare: Option<Prepare>) -> String {
    format!("sha256:{sha256}{}", prepare.map_or_else(String::new, |p| format!("+{}", p.spelling())))
}

fn router(served: Served) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/health", get(|| async { "ok" }))
        .with_state(Arc::new(served))
}

/// A loaded model served as `pipeline serve` serves it, on a free port of 127.0.0.1, until
/// dropped: how the `capacity` stage loads an embedded candidate through the server code users
/// deploy.
pub struct Loopback {
    /// `http://127.0.0.1:PORT/v1`.
    pub base_url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Loopback {
    pub(crate) async fn start(id: &str, runner: Arc<embedded::Runner>, sha256: &str, prepare: Option<Prepare>) -> Result<Loopback, String> {
        let app = router(Served { id: id.to_string(), fingerprint: fingerprint(sha256, prepare), runner });
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.map_err(|e| format!("cannot listen on 127.0.0.1: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(async move { rx.await.unwrap_or(()) }).await {
                tracing::error!("loopback server on {addr}: {e}");
            }
        });
        Ok(Loopback { base_url: format!("http://{addr}/v1"), shutdown: Some(tx) })
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

async fn models(State(s): State<Arc<Served>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": s.id, "object": "model", "owned_by": "pipeline"}]}))
}

fn invalid(message: impl Into<String>) -> Response {
    let body = json!({"error": {"message": message.into(), "type": "invalid_request_error"}});
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

/// The legacy text-completions API is not served: say so, and where to go instead.
async fn completions() -> Response {
    let message = "only the chat API is served here: POST /v1/chat/completions with `messages`";
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "code": "unknown_url"}});
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

async fn chat(State(s): State<Arc<Served>>, body: axum::body::Bytes) -> Response {
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return invalid("the body must be a JSON object"),
        Err(e) => return invalid(format!("the body is not JSON: {e}")),
    };
    let stream = match request.get("stream") {
        None | Some(Value::Null) => false,
        Some(v) => match v.as_bool() {
            Some(b) => b,
            None => return invalid("`stream` must be true or false"),
        },
    };
    let include_usage = match request.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(_) if !stream => return invalid("`stream_options` is only allowed when `stream` is true"),
        Some(o) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return invalid("`stream_options.include_usage` must be true or false"),
        },
    };
    match request.get("model").and_then(Value::as_str) {
        Some(m) if m != s.id => {
            let body = json!({"error": {"message": format!("model `{m}` is not served here; this server serves `{}`", s.id), "type": "invalid_request_error", "code": "model_not_found"}});
            return (StatusCode::NOT_FOUND, Json(body)).into_response();
        }
        _ => {}
    }
    let messages: Vec<Message> = match request.get("messages").cloned().map(serde_json::from_value) {
        Some(Ok(m)) => m,
        Some(Err(e)) => return invalid(format!("`messages`: {e} (each needs a `role` and a string `content`)")),
        None => return invalid("`messages` is required"),
    };
    if messages.is_empty() {
        return invalid("`messages` is empty");
    }
    if let Some(m) = messages.iter().find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant")) {
        return invalid(format!("unknown message role `{}`: use `system`, `user` or `assistant`", m.role));
    }
    let max_tokens = match request.get("max_tokens").or_else(|| request.get("max_completion_tokens")) {
        None | Some(Value::Null) => 256,
        Some(v) => match v.as_u64() {
            Some(n @ 1..=32768) => n as usize,
            _ => return invalid("`max_tokens` must be an integer from 1 to 32768"),
        },
    };
    let temperature = match request.get("temperature") {
        None | Some(Value::Null) => 0.0,
        Some(v) => match v.as_f64() {
            Some(t) if (0.0..=2.0).contains(&t) => t,
            _ => return invalid("`temperature` must be a number from 0 to 2"),
        },
    };
    let stop = match request.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect(),
        Some(_) => return invalid("`stop` must be a string or an array of strings"),
    };
    let output = match request.get("response_format") {
        None | Some(Value::Null) => None,
        Some(f) => match (f["type"].as_str(), &f["json_schema"]["schema"], &f["schema"]) {
            (Some("text"), _, _) => None,
            (Some("json_schema"), schema @ Value::Object(_), _) | (Some("json_object"), _, schema @ Value::Object(_)) => {
                Some(OutputConstraint::JsonSchema(schema.clone()))
            }
            (Some("json_object"), _, _) => Some(OutputConstraint::JsonSchema(json!({"type": "object"}))),
            _ => return invalid("`response_format` must be `text`, `json_schema` with `json_schema.schema`, or `json_object`"),
        },
    };
    // OpenAI's `seed`: a sampled answer drawn from its own stream, the same for the same seed
    // whatever else is in flight.
    let seed = match request.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64().or_else(|| v.as_i64().map(|i| i as u64)) {
            Some(seed) => Some(seed),
            None => return invalid("`seed` must be an integer"),
        },
    };
    let sampler = Sampler { max_tokens, temperature, stop };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let (id, created) = (format!("chatcmpl-{}", now.as_nanos()), now.as_secs());
    if stream {
        return streamed(&s, id, created, include_usage, s.runner.stream(messages, sampler, output, seed)).await;
    }
    match s.runner.chat(&messages, &sampler, output.as_ref(), seed).await {
        Ok(answer) => Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": s.id,
            "system_fingerprint": s.fingerprint,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text}, "finish_reason": answer.finish_reason}],
            "usage": usage(&answer),
        }))
        .into_response(),
        Err(e) => failed(e),
    }
}

/// The API's `usage` of an answer.
fn usage(answer: &crate::Answer) -> Value {
    json!({"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens, "total_tokens": answer.prompt_tokens + answer.completion_tokens})
}

fn failed(e: String) -> Response {
    // A prompt longer than the model's context is the request's fault, as OpenAI's API says it.
    if let Some(rest) = e.split_once("Prompt sequence length is greater than ").map(|(_, rest)| rest) {
        let context: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let message = format!("the messages are longer than the model's context of {context} tokens: shorten them");
        let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}});
        return (StatusCode::BAD_REQUEST, Json(body)).into_response();
    }
    tracing::error!("inference failed: {e}");
    let body = json!({"error": {"message": e, "type": "server_error"}});
    (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
}

/// What every chunk of one streamed completion says besides its choice.
struct Chunks {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
}

impl Chunks {
    fn event(&self, choices: Value, usage: Option<Value>) -> Event {
        let mut chunk = json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint, "choices": choices});
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        Event::default().data(chunk.to_string())
    }

    fn delta(&self, delta: Value, finish_reason: Option<&str>) -> Event {
        self.event(json!([{"index": 0, "delta": delta, "finish_reason": finish_reason}]), None)
    }
}

/// A streamed completion as server-sent events, the way OpenAI's API sends them: a first chunk
/// with the role, one per piece of text, one with the finish reason, with `include_usage` one
/// with no choices and the usage, then `[DONE]`. A request that fails before its first token is an
/// error response; one that fails later ends the stream with an `error` event.
async fn streamed(s: &Served, id: String, created: u64, include_usage: bool, mut pieces: mpsc::Receiver<Result<Piece, String>>) -> Response {
    let first = match pieces.recv().await {
        Some(Ok(piece)) => piece,
        Some(Err(e)) => return failed(e),
        None => return failed("the model's stream ended before it began".to_string()),
    };
    let chunks = Arc::new(Chunks { id, created, model: s.id.clone(), fingerprint: s.fingerprint.clone() });
    let role = chunks.delta(json!({"role": "assistant", "content": ""}), None);
    // The events of one piece, and whether it was the last.
    let events = move |piece: Result<Piece, String>| -> (Vec<Event>, bool) {
        match piece {
            Ok(Piece::Text(text)) => (vec![chunks.delta(json!({"content": text}), None)], false),
            Ok(Piece::Done(answer)) => {
                let mut events = vec![chunks.delta(json!({}), Some(&answer.finish_reason))];
                if include_usage {
                    events.push(chunks.event(json!([]), Some(usage(&answer))));
                }
                events.push(Event::default().data("[DONE]"));
                (events, true)
            }
            Err(e) => {
                tracing::error!("inference failed mid-stream: {e}");
                (vec![Event::default().data(json!({"error": {"message": e, "type": "server_error"}}).to_string())], true)
            }
        }
    };
    let (mut head, done) = events(Ok(first));
    head.insert(0, role);
    // The first batch (the role and the first piece) is ready; then one batch per piece, until
    // the last, after which the receiver is dropped and nothing more is read.
    let stream = futures::stream::unfold((Some(pieces), Some((head, done))), move |(pieces, ready)| {
        let events = events.clone();
        async move {
            let mut pieces = pieces?;
            let (batch, done) = match ready {
                Some(ready) => ready,
                None => events(pieces.recv().await?),
            };
            Some((batch, (if done { None } else { Some(pieces) }, None)))
        }
    });
    Sse::new(stream.flat_map(|batch| futures::stream::iter(batch.into_iter().map(Ok::<_, Infallible>)))).into_response()
}
