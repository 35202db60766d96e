//! `pipeline review`: a local page for reading a run's traces and labeling them pass or fail.
//!
//! The traces (input, output, reference, the judge's verdict and reasoning, the failure modes an
//! answer was filed under) are read once from the store, never written: the page only reads the
//! run. Labels go to a JSONL file beside the pipeline (the `labels` of its `llm_judge` stage, or
//! `labels/<pipeline>.jsonl`), one line per answer in the format `llm_judge` reads, so the next run
//! measures the judge against them. A label replaces that answer's line in place (new ones are
//! appended) and the file is replaced atomically: a diff in git shows exactly what was labeled, and
//! a crash leaves the old file or the new one.
//!
//! The server binds 127.0.0.1 only. It answers three routes and serves no file: nothing outside
//! the run can be read through it. Requests whose `Host` is not the loopback address (DNS
//! rebinding) and label writes from another origin are refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use artifacts::{Clusters, Dataset, Judgement, Message, Rendered, RenderedSample, RubricMode, Split};
use engine::diag::SourceFile;
use engine::{Pipeline, RunReport, Store};
use llm_judge::Label;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::found::artifact;

const PAGE: &str = include_str!("review.html");

/// One answer to review.
#[derive(Serialize)]
struct Trace {
    id: String,
    model: String,
    split: Split,
    /// The dataset sample's fields.
    fields: Option<serde_json::Map<String, Value>>,
    /// The messages the model was sent.
    messages: Option<Vec<Message>>,
    answer: String,
    reference: Option<String>,
    verdict: TraceVerdict,
    /// Failure modes this answer was filed under.
    clusters: Vec<TraceMode>,
}

/// `pass` (true, false, or null: unscored), and whichever of the rest the judge gave.
#[derive(Serialize)]
struct TraceVerdict {
    pass: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    predicted: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unscored: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    judge_reply: Option<String>,
}

#[derive(Serialize)]
struct TraceMode {
    id: String,
    name: String,
}

/// A run's traces and where their labels go.
pub struct Review {
    pipeline: String,
    iteration: u32,
    judge: String,
    /// The rubric's failure modes (`llm_judge`), by id: a fail label may be filed under one.
    failure_modes: BTreeMap<String, RubricMode>,
    traces: Vec<Trace>,
    by_key: BTreeMap<(String, String), usize>,
    labels: PathBuf,
}

impl Review {
    /// The traces of `pipeline`'s last run at `iteration` (1-based; the last by default). Labels go
    /// to `labels`, or the `llm_judge` stage's labels file, or `labels/<pipeline>.jsonl`.
    pub fn load(pipeline: &Pipeline, store: &Store, iteration: Option<u32>, labels: Option<PathBuf>) -> Result<Review, String> {
        let report: RunReport = store.get_run(&pipeline.name).ok_or_else(|| format!("`{}` has not been run yet (no run record in {})", pipeline.name, store.root().display()))?;
        let it = match iteration {
            Some(k) => report.iterations.iter().find(|it| it.iteration + 1 == k).ok_or_else(|| format!("the last run of `{}` has {} iteration(s)", pipeline.name, report.iterations.len()))?,
            None => report.iterations.last().ok_or_else(|| format!("the last run of `{}` has no iteration", pipeline.name))?,
        };
        let (judge, judgement) =
            artifact::<Judgement>(it, store).ok_or_else(|| format!("the last run of `{}` has no judged answers to review (no judgement in it)", pipeline.name))?;
        let dataset = artifact::<Dataset>(it, store).map(|(_, d)| d);
        let rendered = artifact::<Rendered>(it, store).map(|(_, r)| r);
        let samples = dataset.as_ref().map_or_else(BTreeMap::new, Dataset::by_id);
        let rendered: BTreeMap<&str, &RenderedSample> = rendered.iter().flat_map(|r| &r.samples).map(|s| (s.id.as_str(), s)).collect();
        let mut modes: BTreeMap<(String, String), Vec<TraceMode>> = BTreeMap::new();
        if let Some((_, clusters)) = artifact::<Clusters>(it, store) {
            for (model, m) in &clusters.models {
                for c in &m.clusters {
                    for id in &c.members {
                        modes.entry((model.clone(), id.clone())).or_default().push(TraceMode { id: c.id.clone(), name: c.name.clone() });
                    }
                }
            }
        }
        let mut traces = Vec::new();
        for (model, m) in &judgement.models {
            for v in &m.verdicts {
                let verdict = TraceVerdict {
                    pass: v.pass,
                    failure_mode: v.failure_mode().map(str::to_string),
                    reasoning: v.reasoning.clone(),
                    predicted: v.predicted().map(str::to_string),
                    unscored: v.unscored.clone(),
                    judge_reply: v.judge_reply.clone(),
                };
                traces.push(Trace {
                    id: v.id.clone(),
                    model: model.clone(),
                    split: v.split,
                    fields: samples.get(v.id.as_str()).map(|s| s.fields.clone()),
                    messages: rendered.get(v.id.as_str()).map(|r| r.messages.clone()),
                    answer: v.answer.clone(),
                    reference: v.label.clone(),
                    verdict,
                    clusters: modes.remove(&(model.clone(), v.id.clone())).unwrap_or_default(),
                });
            }
        }
        let by_key = traces.iter().enumerate().map(|(i, t)| ((t.id.clone(), t.model.clone()), i)).collect();
        let labels = labels.unwrap_or_else(|| {
            pipeline
                .stages
                .iter()
                .filter(|s| s.kind == "llm_judge" && s.config["labels"].is_string())
                .find_map(|s| s.files.iter().find(|(written, _)| s.config["labels"] == written.as_str()).map(|(_, path)| path.clone()))
                .unwrap_or_else(|| pipeline.base_dir.join("labels").join(format!("{}.jsonl", pipeline.name)))
        });
        let failure_modes = judgement.failure_modes.unwrap_or_default();
        let review = Review { pipeline: pipeline.name.clone(), iteration: it.iteration + 1, judge, failure_modes, traces, by_key, labels };
        review.read_labels()?;
        Ok(review)
    }

    pub fn labels_path(&self) -> &Path {
        &self.labels
    }

    pub fn len(&self) -> usize {
        self.traces.len()
    }

    /// The labels file's text and labels (none when it does not exist yet).
    fn read_labels(&self) -> Result<(String, Vec<Label>), String> {
        let text = match std::fs::read_to_string(&self.labels) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", self.labels.display())),
        };
        let file = SourceFile::new(self.labels.display().to_string(), text.as_str());
        let labels = llm_judge::read_labels(&file, "labels file").map_err(|d| d.iter().map(|d| d.render(false)).collect::<Vec<_>>().join("\n"))?;
        Ok((text, labels))
    }

    /// The current label of every answer of this run: `{id, model, pass, note, stale}` (stale: it
    /// was given to a different answer text).
    fn labels_json(&self) -> Result<Vec<Value>, String> {
        let (_, labels) = self.read_labels()?;
        let mut last: BTreeMap<(String, String), Label> = BTreeMap::new();
        for l in labels {
            last.insert((l.id.clone(), l.model.clone()), l);
        }
        Ok(last
            .into_iter()
            .filter_map(|(key, l)| {
                let t = &self.traces[*self.by_key.get(&key)?];
                Some(json!({"id": l.id, "model": l.model, "pass": l.pass, "failure_mode": l.failure_mode, "note": l.note, "stale": l.answer != t.answer}))
            })
            .collect())
    }

    /// Record a label: the answer's last line in the file is replaced, or a line appended.
    fn save(&self, id: &str, model: &str, pass: bool, failure_mode: Option<String>, note: Option<String>) -> Result<(), LabelError> {
        let &i = self.by_key.get(&(id.to_string(), model.to_string())).ok_or(LabelError::NoTrace)?;
        let failure_mode = failure_mode.filter(|m| !pass && !m.is_empty());
        if let Some(m) = &failure_mode
            && !self.failure_modes.contains_key(m)
        {
            let known: Vec<&str> = self.failure_modes.keys().map(String::as_str).collect();
            return Err(LabelError::Invalid(format!("no failure mode `{m}` in the rubric; it has: {}", if known.is_empty() { "none".into() } else { known.join(", ") })));
        }
        let note = note.filter(|n| !n.trim().is_empty());
        let label = Label { id: id.to_string(), model: model.to_string(), answer: self.traces[i].answer.clone(), pass, failure_mode, note };
        let (text, _) = self.read_labels().map_err(LabelError::File)?;
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        // Every line parsed above, so this finds the answer's lines exactly.
        let mine = |line: &String| serde_json::from_str::<Label>(line).is_ok_and(|l| l.id == label.id && l.model == label.model);
        match lines.iter().rposition(mine) {
            Some(at) => lines[at] = llm_judge::label_line(&label),
            None => lines.push(llm_judge::label_line(&label)),
        }
        let mut out = lines.join("\n");
        out.push('\n');
        engine::atomic::write(&self.labels, out.as_bytes()).map_err(|e| LabelError::File(format!("cannot write {}: {e}", self.labels.display())))
    }
}

enum LabelError {
    NoTrace,
    Invalid(String),
    File(String),
}

struct App {
    review: Review,
    /// One label write at a time (each rewrites the file).
    writing: tokio::sync::Mutex<()>,
    /// `Host` values this server answers to.
    hosts: [String; 2],
}

/// Serve the review page on 127.0.0.1:`port` (0: a free one) until `shutdown`; `ready` gets the
/// page's address.
pub async fn serve(review: Review, port: u16, ready: impl FnOnce(SocketAddr), shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.map_err(|e| format!("cannot listen on 127.0.0.1:{port}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let app = Arc::new(App { review, writing: tokio::sync::Mutex::new(()), hosts: [format!("127.0.0.1:{}", addr.port()), format!("localhost:{}", addr.port())] });
    let router = Router::new()
        .route("/", get(page))
        .route("/api/traces", get(traces))
        .route("/api/label", post(label))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found: this server serves the review page and its API, no files\n") })
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app);
    ready(addr);
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await.map_err(|e| e.to_string())
}

/// Refuse requests addressed to another host name (a page elsewhere that rebinds its name to
/// 127.0.0.1) and writes from other origins; mark every response not to be cached, framed or
/// sniffed, and the page to load nothing from anywhere.
async fn guard(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if let Some(refusal) = refuse(&app, &request) {
        return (StatusCode::FORBIDDEN, refusal).into_response();
    }
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'; form-action 'none'; base-uri 'none'"),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

fn refuse(app: &App, request: &Request) -> Option<&'static str> {
    let header = |name: header::HeaderName| request.headers().get(name).and_then(|v| v.to_str().ok());
    if !header(header::HOST).is_some_and(|h| app.hosts.iter().any(|x| x == h)) {
        return Some("this server answers only to 127.0.0.1 and localhost\n");
    }
    if request.method() != axum::http::Method::GET {
        let same_origin = |o: &str| app.hosts.iter().any(|h| o.strip_prefix("http://") == Some(h.as_str()));
        let site = header(header::HeaderName::from_static("sec-fetch-site"));
        if header(header::ORIGIN).is_some_and(|o| !same_origin(o)) || site.is_some_and(|s| s == "cross-site" || s == "same-site") {
            return Some("labels are written from the review page only\n");
        }
    }
    None
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn traces(State(app): State<Arc<App>>) -> Response {
    let r = &app.review;
    match r.labels_json() {
        Ok(labels) => Json(json!({
            "pipeline": r.pipeline,
            "iteration": r.iteration,
            "judge": r.judge,
            "failure_modes": r.failure_modes,
            "labels_file": r.labels.display().to_string(),
            "traces": r.traces,
            "labels": labels,
        }))
        .into_response(),
        Err(e) => (StatusCode::CONFLICT, Json(json!({"error": e}))).into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelRequest {
    id: String,
    model: String,
    pass: bool,
    #[serde(default)]
    failure_mode: Option<String>,
    #[serde(default)]
    note: Option<String>,
}

async fn label(State(app): State<Arc<App>>, Json(req): Json<LabelRequest>) -> Response {
    let _writing = app.writing.lock().await;
    let r = &app.review;
    match r.save(&req.id, &req.model, req.pass, req.failure_mode, req.note) {
        Ok(()) => {
            tracing::info!(id = req.id, model = req.model, pass = req.pass, "labeled");
            match r.labels_json() {
                Ok(labels) => Json(json!({"ok": true, "labels": labels})).into_response(),
                Err(e) => (StatusCode::CONFLICT, Json(json!({"error": e}))).into_response(),
            }
        }
        Err(LabelError::Invalid(e)) => (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"error": e}))).into_response(),
        Err(LabelError::NoTrace) => (StatusCode::NOT_FOUND, Json(json!({"error": format!("no answer of `{}` to `{}` in this run", req.model, req.id)}))).into_response(),
        // The file changed under us into something that is not a labels file: leave it be.
        Err(LabelError::File(e)) => (StatusCode::CONFLICT, Json(json!({"error": e}))).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_replaces_its_line_in_place_and_keeps_the_others_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels").join("x.jsonl");
        let trace = |id: &str, answer: &str| Trace {
            id: id.into(),
            model: "m".into(),
            split: Split::Dev,
            fields: None,
            messages: None,
            answer: answer.into(),
            reference: None,
            verdict: TraceVerdict { pass: Some(true), failure_mode: None, reasoning: None, predicted: None, unscored: None, judge_reply: None },
            clusters: vec![],
        };
        let traces = vec![trace("a", "Paris."), trace("b", "Lyon \"city\".")];
        let by_key = traces.iter().enumerate().map(|(i, t)| ((t.id.clone(), t.model.clone()), i)).collect();
        let failure_modes = [("wrong_fact".to_string(), RubricMode { description: String::new(), fix: String::new() })].into();
        let r = Review { pipeline: "x".into(), iteration: 1, judge: "llm_judge".into(), failure_modes, traces, by_key, labels: path.clone() };
        // No file yet: it is created, with its directory.
        assert!(matches!(r.save("b", "m", false, Some("wrong_city".into()), None), Err(LabelError::Invalid(_))));
        assert!(!path.exists());
        assert!(r.save("b", "m", false, Some("wrong_fact".into()), Some("wrong city".into())).is_ok());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"id\": \"b\", \"model\": \"m\", \"answer\": \"Lyon \\\"city\\\".\", \"pass\": false, \"failure_mode\": \"wrong_fact\", \"note\": \"wrong city\"}\n");
        // A hand-written line for another model stays byte for byte; the answer's line is replaced.
        let other = "{\"id\":\"a\",\"model\":\"other\",\"answer\":\"x\",\"pass\":true}";
        std::fs::write(&path, format!("{other}\n{}", std::fs::read_to_string(&path).unwrap())).unwrap();
        assert!(r.save("b", "m", true, Some("wrong_fact".into()), Some("  ".into())).is_ok());
        assert!(r.save("a", "m", true, None, None).is_ok());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{other}\n{{\"id\": \"b\", \"model\": \"m\", \"answer\": \"Lyon \\\"city\\\".\", \"pass\": true}}\n{{\"id\": \"a\", \"model\": \"m\", \"answer\": \"Paris.\", \"pass\": true}}\n")
        );
        let labels = r.labels_json().unwrap();
        assert_eq!(labels.len(), 2, "the other model's label is not this run's");
        assert!(matches!(r.save("zz", "m", true, None, None), Err(LabelError::NoTrace)));
        // A broken labels file is reported and left as it is.
        std::fs::write(&path, "{\"id\": \"a\"\n").unwrap();
        let Err(LabelError::File(e)) = r.save("a", "m", false, None, None) else { panic!("saved over a broken file") };
        assert!(e.contains("x.jsonl:1:"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"id\": \"a\"\n");
    }
}
