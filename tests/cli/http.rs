//! The HTTP backend against a real, independent OpenAI-compatible server: llama.cpp's, from
//! `llama-cpp-python[server]` (installed by `scripts/test`), serving the same SmolLM2 GGUF on
//! loopback. Nothing is mocked.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Project, items, text};

const CANARY: &str = "sk-canary-7f3a9c1e-never-print-me";

/// A llama.cpp server process, killed on drop.
pub(crate) struct LlamaServer {
    child: Child,
    port: u16,
}

impl LlamaServer {
    pub(crate) fn start(api_key: &str) -> LlamaServer {
        LlamaServer::start_with(api_key, &[])
    }

    /// A server started with more arguments (`--chat_format chatml-function-calling`).
    pub(crate) fn start_with(api_key: &str, extra: &[&str]) -> LlamaServer {
        let python = std::env::var("PIPELINE_LLAMA_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/pipeline-llamacpp-venv/bin/python"));
        assert!(python.exists(), "{} is missing: run the tests through scripts/test, which installs llama-cpp-python[server]", python.display());
        let port = free_port();
        let child = Command::new(python)
            .args(["-m", "llama_cpp.server", "--host", "127.0.0.1", "--n_threads", "1", "--n_ctx", "2048", "--model_alias", "smollm2"])
            .args(["--model", smollm2().to_str().unwrap(), "--port", &port.to_string(), "--api_key", api_key])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start llama_cpp.server");
        let server = LlamaServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(120);
        while get(port, "/v1/models", api_key).is_none_or(|s| !s.starts_with("HTTP/1.1 200")) {
            assert!(Instant::now() < deadline, "llama_cpp.server did not come up on port {port}");
            std::thread::sleep(Duration::from_millis(200));
        }
        server
    }

    pub(crate) fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn get(port: u16, path: &str, key: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    Some(response)
}

/// The SmolLM2 GGUF, fetched and verified through the catalog as the embedded backend does.
pub fn smollm2() -> PathBuf {
    let root = crate::root();
    let catalog = catalog::Catalog::load(&root.join("catalogs/open-models.toml")).unwrap_or_else(|d| panic!("{}", d[0].render(false)));
    let source = catalog.get("smollm2-135m-instruct").unwrap().runnable_source().unwrap().clone();
    catalog::fetch::resolve(&source, &root.join("catalogs")).expect("fetch SmolLM2").path
}

/// A project whose catalog serves SmolLM2 from `base_urls`, on the first `samples` tickets.
fn served_project(base_urls: &[String], samples: usize, http: &str) -> Project {
    let p = Project::new();
    p.keep_tickets(samples);
    write_catalog(&p, base_urls);
    let toml = p.read("select.toml")
        + "\n[stages.answers]\nkind = \"infer\"\nneeds = [\"rendered\"]\ncatalog = \"served.toml\"\nmodels = [\"smollm2-served\"]\nsampler = { max_tokens = 6, stop = [\"\\n\"] }\n"
        + &format!("http = {{ {http} }}\n");
    p.write("select.toml", &toml);
    p
}

pub(crate) fn write_catalog(p: &Project, base_urls: &[String]) {
    write_catalog_with(p, base_urls, "");
}

fn write_catalog_with(p: &Project, base_urls: &[String], extra: &str) {
    let urls: Vec<String> = base_urls.iter().map(|u| format!("\"{u}\"")).collect();
    p.write(
        "served.toml",
        &format!(
            "[[model]]\nid = \"smollm2-served\"\nfamily = \"SmolLM2\"\ndeveloper = \"Hugging Face\"\norigin = \"US\"\nparams_total_b = 0.135\nparams_active_b = 0.135\nlicense = \"Apache-2.0\"\n\n[[model.source]]\nkind = \"openai_compatible\"\nbase_urls = [{}]\nmodel = \"smollm2\"\napi_key_env = \"PIPELINE_TEST_API_KEY\"\n{extra}",
            urls.join(", ")
        ),
    );
}

fn run(p: &Project, key: Option<&str>, extra: &[&str]) -> (i32, Vec<Value>, Output) {
    let log = p.path("events.jsonl");
    let _ = std::fs::remove_file(&log);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pipeline"));
    cmd.args(["run", "select.toml", "--events", log.to_str().unwrap()]).args(extra).current_dir(&p.dir);
    cmd.env("NO_COLOR", "1").env("RUST_LOG", "trace").env_remove("PIPELINE_STORE").env_remove("PIPELINE_TEST_API_KEY");
    if let Some(key) = key {
        cmd.env("PIPELINE_TEST_API_KEY", key);
    }
    let out = cmd.output().unwrap();
    let events = std::fs::read_to_string(&log).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    (out.status.code().unwrap(), events, out)
}

fn answers(p: &Project) -> Vec<Value> {
    let out = crate::pipeline(&p.dir, &["show", "select.toml", "answers"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out.stderr)));
    v["models"]["smollm2-served"]["answers"].as_array().unwrap().clone()
}

/// Every file under `dir`, and everything printed, is free of `secret`.
fn assert_never_written(dir: &Path, printed: &[&Output], secret: &str) {
    for out in printed {
        assert!(!text(&out.stdout).contains(secret) && !text(&out.stderr).contains(secret), "the key was printed");
    }
    let mut stack = vec![dir.to_path_buf()];
    let mut files = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                files += 1;
                let bytes = std::fs::read(e.path()).unwrap();
                assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "the key is in {}", e.path().display());
            }
        }
    }
    assert!(files > 10, "the store was searched ({files} files)");
}

/// Two replicas of llama.cpp's server behind one catalog model, four requests in flight: every
/// sample is answered, both replicas serve, answers equal one-at-a-time answers from a single
/// replica, a rerun computes nothing, and the API key is sent (the server requires it) but never
/// written or printed.
#[test]
fn infer_over_http_against_llama_cpp_server() {
    let (a, b) = (LlamaServer::start(CANARY), LlamaServer::start(CANARY));
    let p = served_project(&[a.base_url(), b.base_url()], 12, "max_concurrency = 4");
    let (code, events, first) = run(&p, Some(CANARY), &[]);
    assert_eq!(code, 0, "{}\n{}", text(&first.stdout), text(&first.stderr));
    assert_eq!(items(&events).iter().filter(|i| i.starts_with("answers/")).count(), 12);
    let concurrent = answers(&p);
    assert_eq!(concurrent.len(), 12);
    for a in &concurrent {
        assert!(a["prompt_tokens"].as_u64().unwrap() > 50, "{a}");
        assert!(a["completion_tokens"].as_u64().unwrap() >= 1, "{a}");
        assert!(a["timing"]["latency_ms"].as_f64().unwrap() > 0.0, "{a}");
    }
    let replicas: std::collections::BTreeSet<u64> = concurrent.iter().map(|a| a["transport"]["replica"].as_u64().unwrap()).collect();
    assert_eq!(replicas, [0, 1].into(), "requests are spread over both replicas");

    let (code, events, rerun) = run(&p, Some(CANARY), &[]);
    assert_eq!(code, 0);
    assert!(items(&events).is_empty(), "a rerun computes nothing");

    // One replica, one request at a time, from an empty store: the same answers.
    std::fs::remove_dir_all(p.path(".pipeline")).unwrap();
    write_catalog(&p, &[a.base_url()]);
    p.write("select.toml", &p.read("select.toml").replace("max_concurrency = 4", "max_concurrency = 1"));
    let (code, _, sequential) = run(&p, Some(CANARY), &[]);
    assert_eq!(code, 0, "{}", text(&sequential.stderr));
    let texts = |v: &[Value]| v.iter().map(|a| (a["id"].clone(), a["text"].clone(), a["completion_tokens"].clone())).collect::<Vec<_>>();
    assert_eq!(texts(&answers(&p)), texts(&concurrent), "greedy answers do not depend on concurrency or replica");
    assert_never_written(&p.dir, &[&first, &rerun, &sequential], CANARY);
}

/// What cannot succeed fails at once with a message that says why and never shows the key; what
/// may pass is retried, then reported; nothing half-done is kept as a result.
#[test]
fn http_failures_are_reported_without_the_key() {
    let server = LlamaServer::start(CANARY);
    let p = served_project(&[server.base_url()], 3, "retries = 2, backoff_s = 0.05");

    let (code, _, out) = run(&p, None, &[]);
    assert_eq!(code, 1);
    let err = text(&out.stderr);
    assert!(err.contains("environment variable `PIPELINE_TEST_API_KEY` (its `api_key_env`) is not set"), "{err}");

    let wrong = "sk-wrong-key-0a1b2c3d";
    let (code, events, out) = run(&p, Some(wrong), &[]);
    assert_eq!(code, 1);
    let err = text(&out.stderr);
    assert!(err.contains("HTTP 401"), "{err}");
    assert!(!err.contains("after 2 attempts"), "401 is not retried: {err}");
    assert!(items(&events).is_empty());
    assert_never_written(&p.dir, &[&out], wrong);

    // Nothing listens here: connection errors are retried, then every item fails and is reported.
    let down = format!("http://127.0.0.1:{}/v1", free_port());
    write_catalog(&p, &[down]);
    let (code, _, out) = run(&p, Some(CANARY), &[]);
    assert_eq!(code, 1);
    let err = text(&out.stderr);
    assert!(err.contains("3 items failed") && err.contains("cannot connect") && err.contains("(after 3 attempts)"), "{err}");
    assert!(err.contains("retrying"), "retries are logged: {err}");

    // Back up: the rerun computes exactly the items that failed.
    write_catalog(&p, &[server.base_url()]);
    let (code, events, out) = run(&p, Some(CANARY), &[]);
    assert_eq!(code, 0, "{}", text(&out.stderr));
    assert_eq!(items(&events).len(), 3);
    assert_never_written(&p.dir, &[&out], CANARY);
}

/// Structured output over HTTP, in the form llama-cpp-python's server takes it
/// (`response_format = "json_object"`): a choice comes back as the bare choice, a JSON schema as
/// JSON valid against it.
#[test]
fn http_output_is_constrained() {
    let server = LlamaServer::start(CANARY);
    let p = served_project(&[server.base_url()], 4, "max_concurrency = 2");
    write_catalog_with(&p, &[server.base_url()], "response_format = \"json_object\"\n");
    let toml = p.read("select.toml").replace("max_tokens = 6, stop = [\"\\n\"]", "max_tokens = 40");
    let choice = "output = { choice = [\"billing\", \"refund\", \"technical\", \"account\", \"shipping\", \"cancel\"] }\n";
    p.write("select.toml", &(toml.clone() + choice));
    let (code, _, out) = run(&p, Some(CANARY), &[]);
    assert_eq!(code, 0, "{}", text(&out.stderr));
    for a in answers(&p) {
        assert!(crate::INTENTS.contains(&a["text"].as_str().unwrap()), "{a}");
    }
    let schema = "output = { json_schema = { type = \"object\", properties = { intent = { enum = [\"billing\", \"refund\", \"technical\", \"account\", \"shipping\", \"cancel\"] } }, required = [\"intent\"] } }\n";
    p.write("select.toml", &(toml + schema));
    let (code, _, out) = run(&p, Some(CANARY), &[]);
    assert_eq!(code, 0, "{}", text(&out.stderr));
    for a in answers(&p) {
        let v: Value = serde_json::from_str(a["text"].as_str().unwrap()).unwrap_or_else(|e| panic!("not JSON ({e}): {a}"));
        assert!(crate::INTENTS.contains(&v["intent"].as_str().unwrap_or_default()), "{a}");
    }
}

/// `pipeline serve` puts the embedded model behind the OpenAI API: a pipeline reaching it over
/// HTTP gets exactly the answers the same model gives in-process, and the server names the
/// weights it runs.
#[test]
fn serve_answers_as_the_embedded_model_does() {
    use std::io::BufRead;
    let mut server = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["serve", "--catalog", crate::root().join("catalogs/open-models.toml").to_str().unwrap()])
        .args(["--model", "smollm2-135m-instruct", "--prepare", "q8_0", "--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(server.stderr.take().unwrap()).lines();
    let banner = lines.next().expect("a banner").unwrap();
    std::thread::spawn(move || lines.for_each(drop));
    let url = banner.split_whitespace().find(|w| w.starts_with("http://")).unwrap_or_else(|| panic!("{banner}")).to_string();
    assert!(banner.contains("sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53+q8_0-v1"), "{banner}");

    let over_http = served_project(&[url.clone()], 6, "max_concurrency = 3");
    over_http.write("served.toml", &over_http.read("served.toml").replace("model = \"smollm2\"", "model = \"smollm2-135m-instruct\""));
    let (code, _, out) = run(&over_http, Some(CANARY), &[]);
    assert_eq!(code, 0, "{}", text(&out.stderr));

    let in_process = Project::new();
    in_process.write("data/tickets.jsonl", &over_http.read("data/tickets.jsonl"));
    in_process.write(
        "select.toml",
        &(in_process.read("select.toml")
            + "\n[stages.answers]\nkind = \"infer\"\nneeds = [\"rendered\"]\ncatalog = \"../catalogs/open-models.toml\"\nmodels = [\"smollm2-135m-instruct\"]\nsampler = { max_tokens = 6, stop = [\"\\n\"] }\nprepare = \"q8_0\"\n"),
    );
    let out = crate::pipeline(&in_process.dir, &["run", "select.toml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let embedded: Value = serde_json::from_slice(&crate::pipeline(&in_process.dir, &["show", "select.toml", "answers"]).stdout).unwrap();
    let pick = |v: &[Value]| v.iter().map(|a| (a["id"].clone(), a["text"].clone(), a["completion_tokens"].clone(), a["prompt_tokens"].clone())).collect::<Vec<_>>();
    assert_eq!(pick(&answers(&over_http)), pick(embedded["models"]["smollm2-135m-instruct"]["answers"].as_array().unwrap()));

    // The API's errors are the API's: a wrong model name is a 404 naming the served one.
    let port: u16 = url.trim_end_matches("/v1").rsplit(':').next().unwrap().parse().unwrap();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let body = r#"{"model":"gpt-4","messages":[{"role":"user","content":"hi"}]}"#;
    write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 404") && response.contains("this server serves `smollm2-135m-instruct`"), "{response}");
    let request = |path: &str, body: &str| -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        response
    };
    let malformed = request("/v1/chat/completions", r#"{"messages": [{"role": "user", "content": "hi"}"#);
    assert!(malformed.starts_with("HTTP/1.1 400") && malformed.contains("the body is not JSON"), "{malformed}");
    let legacy = request("/v1/completions", r#"{"prompt":"hi"}"#);
    assert!(legacy.starts_with("HTTP/1.1 404") && legacy.contains("POST /v1/chat/completions"), "{legacy}");
    let streamed = request("/v1/chat/completions", r#"{"messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":2}"#);
    assert!(streamed.starts_with("HTTP/1.1 200") && streamed.to_ascii_lowercase().contains("content-type: text/event-stream") && streamed.contains("data: [DONE]"), "{streamed}");

    // The official OpenAI SDK, as a user would drive it: streamed answers are exactly the
    // unstreamed ones (a stop string, a length cut, a JSON schema), usage comes when asked for,
    // and errors are the SDK's errors, with the server up after them.
    let python = std::env::var("PIPELINE_CLIENT_PYTHON").expect("PIPELINE_CLIENT_PYTHON: run the tests through scripts/test, which installs the OpenAI SDK");
    let out = Command::new(python).arg(crate::root().join("tests/cli/openai_client.py")).args([url.as_str(), "smollm2-135m-instruct"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["models"], serde_json::json!(["smollm2-135m-instruct"]));
    for name in ["stop", "length", "json_schema"] {
        let (whole, streamed) = (&seen[name]["whole"], &seen[name]["streamed"]);
        assert_eq!(streamed["text"], whole["text"], "{name}: {}", seen[name]);
        assert_eq!(streamed["finish_reason"], serde_json::json!([whole["finish_reason"]]), "{name}: {}", seen[name]);
        assert_eq!(streamed["usage"], serde_json::json!([whole["usage"]]), "{name}: {}", seen[name]);
        assert_eq!(seen[name]["role"], "assistant");
        assert!(seen[name]["fingerprint"].as_str().unwrap().starts_with("sha256:b179c952"), "{}", seen[name]);
        assert!(!whole["text"].as_str().unwrap().is_empty(), "{name}: {}", seen[name]);
    }
    assert_eq!(seen["length"]["whole"]["finish_reason"], "length");
    assert!(seen["length"]["chunks"].as_u64().unwrap() >= 7, "one chunk per token or so: {}", seen["length"]);
    serde_json::from_str::<Value>(seen["json_schema"]["whole"]["text"].as_str().unwrap()).expect("the JSON schema's answer is JSON");
    assert!(seen["no_usage"]["usage"].as_array().unwrap().iter().all(|u| u == false), "{}", seen["no_usage"]);
    let errors = &seen["errors"];
    for (name, status, says) in [
        ("unknown_model", 404, "this server serves `smollm2-135m-instruct`"),
        ("max_tokens_0", 400, "`max_tokens` must be an integer from 1"),
        ("no_messages", 400, "`messages` is empty"),
        ("stream_options_unstreamed", 400, "only allowed when `stream` is true"),
        ("completions", 404, "only the chat API is served"),
        ("oversized", 400, "longer than the model's context of 8192 tokens"),
    ] {
        assert_eq!(errors[name]["status"], status, "{name}: {}", errors[name]);
        assert!(errors[name]["message"].as_str().unwrap_or_default().contains(says), "{name}: {}", errors[name]);
    }
    assert!(seen["after_errors"].is_string(), "{seen}");
    server.kill().unwrap();
    server.wait().unwrap();
}

/// What the fault-injecting proxy does to the request with this index.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    None,
    ServerError,
    TooMany,
    Drop,
    Truncated,
    Malformed,
    /// No answer within the client's timeout. (The timeout is 15 s, far above a real answer even
    /// on a loaded machine, so no unplanned timeout adds a retry.)
    Slow,
}

/// Three requests in ten fail (the 2nd, 5th and 9th of each ten), cycling through six faults:
/// 500, 429 with `Retry-After`, a dropped connection, a body cut off mid-JSON, malformed JSON, and
/// no answer before the client's timeout.
fn fault_for(index: usize) -> Fault {
    const KINDS: [Fault; 6] = [Fault::ServerError, Fault::TooMany, Fault::Drop, Fault::Truncated, Fault::Malformed, Fault::Slow];
    let slot = match index % 10 {
        1 => 0,
        4 => 1,
        8 => 2,
        _ => return Fault::None,
    };
    KINDS[(3 * (index / 10) + slot) % KINDS.len()]
}

/// A loopback proxy in front of `upstream` that injects faults; counts what it injected.
struct FaultProxy {
    port: u16,
    injected: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl FaultProxy {
    fn start(upstream: u16) -> FaultProxy {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let injected = std::sync::Arc::new(AtomicUsize::new(0));
        let requests = std::sync::Arc::new(AtomicUsize::new(0));
        let (count, seen) = (injected.clone(), requests.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (count, seen) = (count.clone(), seen.clone());
                std::thread::spawn(move || {
                    let Some(request) = read_request(&client) else { return };
                    let fault = fault_for(seen.fetch_add(1, Ordering::SeqCst));
                    if fault != Fault::None {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    let mut client = client;
                    let reply = |client: &mut TcpStream, status: &str, extra: &str, body: &str| {
                        let _ = write!(client, "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}", body.len());
                    };
                    match fault {
                        Fault::ServerError => reply(&mut client, "500 Internal Server Error", "", r#"{"error":"injected"}"#),
                        Fault::TooMany => reply(&mut client, "429 Too Many Requests", "Retry-After: 0\r\n", r#"{"error":"slow down"}"#),
                        Fault::Drop => drop(client),
                        Fault::Slow => {
                            std::thread::sleep(Duration::from_secs(17));
                            drop(client);
                        }
                        Fault::Malformed => reply(&mut client, "200 OK", "", r#"{"choices": [{"message": {"content": "#),
                        Fault::None | Fault::Truncated => {
                            let mut up = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                            up.write_all(&request).unwrap();
                            let mut response = Vec::new();
                            let _ = up.read_to_end(&mut response);
                            if fault == Fault::Truncated {
                                // Headers promise the whole body; half of it arrives.
                                let body_at = response.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |p| p + 4);
                                response.truncate(body_at + (response.len() - body_at) / 2);
                            }
                            let _ = client.write_all(&response);
                        }
                    }
                });
            }
        });
        FaultProxy { port, injected, seen: requests }
    }
}

/// One HTTP/1.1 request, re-headed with `Connection: close` so the upstream closes after replying.
fn read_request(mut client: &TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let n = client.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length: usize = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))).unwrap_or(0);
    while buf.len() < head_end + 4 + length {
        let n = client.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let headers: Vec<&str> = head.lines().filter(|l| !l.to_ascii_lowercase().starts_with("connection:")).collect();
    let mut request = format!("{}\r\nConnection: close\r\n\r\n", headers.join("\r\n")).into_bytes();
    request.extend_from_slice(&buf[head_end + 4..head_end + 4 + length]);
    Some(request)
}

/// 30% of requests fail in six ways (500, 429 + Retry-After, dropped connection, truncated and
/// malformed JSON, timeout): the run completes with exactly the answers of a fault-free run, and the
/// retries it reports equal the faults injected.
#[test]
fn http_faults_are_retried_to_the_same_answers() {
    let server = LlamaServer::start(CANARY);
    let proxy = FaultProxy::start(server.port);
    let faulty = served_project(&[format!("http://127.0.0.1:{}/v1", proxy.port)], 20, "max_concurrency = 2, retries = 8, backoff_s = 0.02, timeout_s = 15");
    let (code, _, faulty_out) = run(&faulty, Some(CANARY), &[]);
    assert_eq!(code, 0, "{}", text(&faulty_out.stderr));
    let injected = proxy.injected.load(std::sync::atomic::Ordering::SeqCst);
    assert!(injected >= 6, "faults were injected ({injected})");
    println!("{injected} faults injected over {} requests", proxy.seen.load(std::sync::atomic::Ordering::SeqCst));
    let shown: Value = serde_json::from_slice(&crate::pipeline(&faulty.dir, &["show", "select.toml", "answers"]).stdout).unwrap();
    assert_eq!(shown["models"]["smollm2-served"]["transport"]["retries"].as_u64().unwrap() as usize, injected, "every fault cost one retry, and was reported");

    let clean = served_project(&[server.base_url()], 20, "max_concurrency = 2");
    let (code, _, out) = run(&clean, Some(CANARY), &[]);
    assert_eq!(code, 0, "{}", text(&out.stderr));
    let pick = |v: &[Value]| v.iter().map(|a| (a["id"].clone(), a["text"].clone(), a["completion_tokens"].clone())).collect::<Vec<_>>();
    assert_eq!(pick(&answers(&faulty)), pick(&answers(&clean)), "faults change nothing in the results");
    // Retries, timeouts and malformed bodies are logged (at trace level here): never with the key.
    assert_never_written(&faulty.dir, &[&faulty_out, &out], CANARY);
}
