//! `pipeline serve`: one embedded model, pinned by its weights digest, behind the OpenAI chat
//! completions API, so other tools (or another `pipeline` with an `openai_compatible` source) use
//! exactly the model a pipeline measured.
//!
//! Requests run concurrently and mistral.rs batches them, as in the `infer` stage; an answer does
//! not depend on what else is in flight (`embedded`'s tests). Decoding is greedy unless a request sets `temperature` above 0. The
//! response's `system_fingerprint` is the weights digest (and preparation), so a client can record
//! what answered.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use catalog::Catalog;
use serde_json::{Value, json};

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
    let fingerprint = format!("sha256:{sha256}{}", config.prepare.map_or_else(String::new, |p| format!("+{}", p.spelling())));
    let state = Arc::new(Served { id: model.id.clone(), fingerprint: fingerprint.clone(), runner });
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/health", get(|| async { "ok" }))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(config.listen).await.map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    ready(addr, &fingerprint);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await.map_err(|e| e.to_string())
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
    // Refused, not ignored: a client that asked for events and got a plain body would read an
    // empty answer (the OpenAI SDK does).
    if request.get("stream").is_some_and(|v| v.as_bool() == Some(true)) {
        return invalid("`stream` is not supported: this server answers when the whole completion is ready; send `stream: false` (or leave it out)");
    }
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
    let sampler = Sampler { max_tokens, temperature, stop };
    match s.runner.chat(&messages, &sampler, output.as_ref()).await {
        Ok(answer) => Json(json!({
            "id": format!("chatcmpl-{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())),
            "object": "chat.completion",
            "created": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            "model": s.id,
            "system_fingerprint": s.fingerprint,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text}, "finish_reason": answer.finish_reason}],
            "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens, "total_tokens": answer.prompt_tokens + answer.completion_tokens},
        }))
        .into_response(),
        Err(e) => {
            tracing::error!("inference failed: {e}");
            let body = json!({"error": {"message": e, "type": "server_error"}});
            (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
        }
    }
}
