//! Tool calls as samples: each sample offers functions (OpenAI `tools`), the model answers with a
//! call, and the judge scores it — the right function, arguments valid against its schema,
//! arguments equal to the reference's. Embedded SmolLM2 calls through a constrained reply (it has
//! no tool format of its own); over HTTP, llama-cpp-python's server is sent `tools` and answers
//! with its `tool_calls`. On a task of its own: a small household assistant's functions.

use serde_json::{Value, json};

use crate::{Project, text};

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "set_timer", "description": "Start a kitchen timer", "parameters": {"type": "object", "properties": {"minutes": {"type": "integer", "minimum": 1, "maximum": 120}}, "required": ["minutes"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "add_to_list", "description": "Add an item to the shopping list", "parameters": {"type": "object", "properties": {"item": {"type": "string"}}, "required": ["item"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "play_music", "description": "Play music by an artist", "parameters": {"type": "object", "properties": {"artist": {"type": "string"}}, "required": ["artist"], "additionalProperties": false}}},
    ])
}

/// The samples; `single`: each offers only the function it should call (the simple kind of
/// tool-calling eval, where arguments are what is tested).
fn samples_with(single: bool) -> String {
    let rows = [
        ("h1", "Set a timer for 10 minutes.", json!({"name": "set_timer", "arguments": {"minutes": 10}})),
        ("h2", "Put milk on the shopping list.", json!({"name": "add_to_list", "arguments": {"item": "milk"}})),
        ("h3", "Play some music by Queen.", json!({"name": "play_music", "arguments": {"artist": "Queen"}})),
        ("h4", "Start a 25 minute timer please.", json!({"name": "set_timer", "arguments": {"minutes": 25}})),
        ("h5", "We are out of eggs, add them to the list.", json!({"name": "add_to_list", "arguments": {"item": "eggs"}})),
        ("h6", "I want to hear Abba.", json!({"name": "play_music", "arguments": {"artist": "Abba"}})),
    ];
    rows.iter()
        .map(|(id, request, call)| {
            let offered: Vec<Value> = tools().as_array().unwrap().iter().filter(|t| !single || t["function"]["name"] == call["name"]).cloned().collect();
            format!("{}\n", json!({"id": id, "request": request, "call": call, "tools": offered}))
        })
        .collect()
}

fn samples() -> String {
    samples_with(false)
}

fn pipeline(catalog: &str, model: &str) -> String {
    format!(
        r#"description = "A household assistant: which function, with which arguments"
seed = 4

[stages.requests]
kind = "dataset"
path = "requests.jsonl"
label = "call"
heldout = 0.5

[stages.prompt]
kind = "prompt"
template = "request.j2"

[stages.rendered]
kind = "render"
needs = ["requests", "prompt"]
tools = "tools"

[stages.answers]
kind = "infer"
needs = ["rendered"]
catalog = "{catalog}"
models = ["{model}"]
sampler = {{ max_tokens = 40 }}

[stages.judge]
kind = "judge"
needs = ["requests", "answers"]
normalize = "json"
fields = {{ name = {{ match = "exact" }}, arguments = {{ match = "exact" }} }}
tools = "tools"
bootstrap = 50
"#
    )
}

/// Every answer is a call of one of the offered functions, and the judge's scores follow from
/// the calls.
fn check_calls_are_judged(p: &Project, file: &str, model: &str) {
    let show = |stage: &str| -> Value { serde_json::from_slice(&p.run(&["show", file, stage]).stdout).unwrap() };
    let rendered = show("rendered");
    let first: Value = serde_json::from_str(p.read("requests.jsonl").lines().next().unwrap()).unwrap();
    assert_eq!(rendered["samples"][0]["tools"], first["tools"], "the sample's tools go with its messages");
    let answers = show("answers");
    let all = answers["models"][model]["answers"].as_array().unwrap().clone();
    let names = ["set_timer", "add_to_list", "play_music"];
    let mut called = 0;
    for a in &all {
        match a["tool_calls"].as_array() {
            Some(calls) => {
                called += 1;
                let call = &calls[0];
                assert!(names.contains(&call["name"].as_str().unwrap()), "{a:#}");
                // The first call is the text the judge reads.
                assert_eq!(serde_json::from_str::<Value>(a["text"].as_str().unwrap()).unwrap(), json!({"name": call["name"], "arguments": call["arguments"]}), "{a:#}");
            }
            None => panic!("a call was required: {a:#}"),
        }
    }
    assert_eq!(called, 6, "{all:#?}");
    let judged = show("judge");
    let references: Vec<Value> = samples().lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["call"].clone()).collect();
    for (split, scores) in judged["models"][model]["splits"].as_object().unwrap() {
        let fields = &scores["fields"];
        assert_eq!(fields["arguments_valid"]["match"], "schema", "{split}: {fields:#}");
        for key in ["name", "arguments", "arguments_valid"] {
            assert!(fields[key]["accuracy"]["value"].is_number(), "{split}: {key}: {fields:#}");
        }
    }
    for v in judged["models"][model]["verdicts"].as_array().unwrap() {
        let i: usize = v["id"].as_str().unwrap()[1..].parse::<usize>().unwrap() - 1;
        let answer = all.iter().find(|a| a["id"] == v["id"]).unwrap();
        let right = answer["tool_calls"][0]["name"] == references[i]["name"] && answer["tool_calls"][0]["arguments"] == references[i]["arguments"];
        assert_eq!(v["pass"], Value::Bool(right), "{v:#} for {answer:#}");
    }
}

#[test]
fn embedded_calls_are_constrained_to_the_offered_functions_and_judged() {
    let p = Project::new();
    p.write("requests.jsonl", &samples());
    p.write("request.j2", "{{ request }}");
    p.write("tools.toml", &pipeline("../catalogs/open-models.toml", "smollm2-135m-instruct"));
    let (code, _, out) = p.run_logged_on("tools.toml", &[]);
    assert_eq!(code, 0, "{}{}", text(&out.stdout), text(&out.stderr));
    check_calls_are_judged(&p, "tools.toml", "smollm2-135m-instruct");
    // Tools and an output constraint: the constraint would fight the call's; said so.
    p.write("tools.toml", &p.read("tools.toml").replace("sampler = { max_tokens = 40 }", "sampler = { max_tokens = 40 }\noutput = { choice = [\"yes\"] }"));
    let (code, _, out) = p.run_logged_on("tools.toml", &[]);
    assert_eq!(code, 1);
    assert!((text(&out.stdout) + &text(&out.stderr)).contains("this sample offers tools to call, and the stage constrains `output`"), "{}", text(&out.stderr));
    // A tools field no sample has is caught at validate.
    p.write("tools.toml", &pipeline("../catalogs/open-models.toml", "smollm2-135m-instruct").replace("tools = \"tools\"\n\n[stages.answers]", "tools = \"tool\"\n\n[stages.answers]"));
    let out = p.run(&["validate", "tools.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`tools = \"tool\"`: no sample of the dataset has that field"), "{}", text(&out.stderr));
}

/// Over HTTP: llama-cpp-python's server, with its ChatML function-calling handler (SmolLM2's
/// template is ChatML), is sent the sample's `tools`; with `tool_choice = "required"` and one
/// function offered it must call it (left to choose, SmolLM2 answered every request in text), and
/// its `tool_calls` are the answer, judged as the embedded ones.
#[test]
fn calls_over_http_come_back_as_tool_calls_and_are_judged() {
    let server = crate::http::LlamaServer::start_with("tools-key", &["--chat_format", "chatml-function-calling"]);
    let p = Project::new();
    crate::http::write_catalog(&p, &[server.base_url()]);
    p.write("requests.jsonl", &samples_with(true));
    p.write("request.j2", "{{ request }}");
    let served = pipeline("served.toml", "smollm2-served").replace("sampler = { max_tokens = 40 }", "sampler = { max_tokens = 40 }\nhttp = { max_concurrency = 1 }\ntool_choice = \"required\"");
    p.write("tools.toml", &served);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline")).current_dir(p.path("")).env("PIPELINE_TEST_API_KEY", "tools-key").args(["run", "tools.toml"]).output().unwrap();
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    check_calls_are_judged(&p, "tools.toml", "smollm2-served");
}
