//! `capacity` against real servers: llama.cpp's (`llama-cpp-python[server]`, one request at a
//! time) over HTTP, and the embedded SmolLM2 served on loopback by `pipeline serve`'s code. Loads
//! are short (4 s) so the tests stay bounded; the figures are real measurements all the same, so
//! the checks are on what must hold whatever the machine: the search's shape, the bisection's
//! verdicts, and that select decides on them. Each has the machine to itself
//! ([`Project::measuring`]): no other test's model runs on the cores it measures.

use serde_json::Value;

use crate::http::{LlamaServer, write_catalog};
use crate::{Project, open_offline_in_chromium, pixels_of, text};

const KEY: &str = "sk-capacity-test";

/// The capacity stage measuring `model` from `catalog` on the rendered tickets (`extra`: more
/// settings).
fn capacity_stage(catalog: &str, model: &str, extra: &str) -> String {
    format!(
        r#"
[stages.load]
kind = "capacity"
needs = ["rendered"]
catalog = "{catalog}"
models = ["{model}"]
sampler = {{ max_tokens = 6, stop = ["\n"] }}
slo = {{ ttft_ms = 3000, e2e_ms = 6000 }}
seconds_per_load = 4
max_loads = 6
max_concurrency = 2
{extra}
"#
    )
}

/// The quality loop's plain part on `model` (answers, judge) and a decision needing `max_rps`
/// of at least `min_rps`, at 0.36 $ an hour.
fn decided_stages(catalog: &str, model: &str, min_rps: f64) -> String {
    format!(
        "\n[stages.answers]\nkind = \"infer\"\nneeds = [\"rendered\"]\ncatalog = \"{catalog}\"\nmodels = [\"{model}\"]\nsampler = {{ max_tokens = 6, stop = [\"\\n\"] }}\n\
         \n[stages.judge]\nkind = \"judge\"\nneeds = [\"tickets\", \"answers\"]\nbootstrap = 50\n\
         \n[stages.decision]\nkind = \"select\"\nneeds = [\"judge\", \"answers\", \"prompt\", \"load\"]\ncatalog = \"{catalog}\"\nusd_per_hour = 0.36\ntargets = {{ accuracy = {{ min = 0 }}, max_rps = {{ min = {min_rps} }} }}\n"
    )
}

/// `max_rps` as the report's table writes it (three decimals at most, trailing zeros cut).
fn max_rps_cell(max_rps: f64) -> String {
    if max_rps.fract() == 0.0 { format!("{max_rps:.0}") } else { format!("{max_rps:.3}").trim_end_matches('0').trim_end_matches('.').to_string() }
}

fn show(p: &Project, file: &str, stage: &str) -> Value {
    let out = p.run(&["show", file, stage]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The search's shape and verdicts, whatever the figures: anchors first, then arrivals; every load
/// sustained is within the SLO and kept up; the maximum is the highest rate sustained.
fn check_search(timing: &Value) -> f64 {
    let loads = timing["loads"].as_array().unwrap();
    assert!(loads.len() >= 3 && loads.len() <= 6, "{timing:#}");
    assert_eq!((loads[0]["kind"].as_str(), loads[0]["concurrency"].as_u64()), (Some("synchronous"), Some(1)), "{timing:#}");
    assert_eq!((loads[1]["kind"].as_str(), loads[1]["concurrency"].as_u64()), (Some("throughput"), Some(2)), "{timing:#}");
    assert!(loads[2..].iter().all(|l| l["kind"] == "poisson" && l["rate_rps"].as_f64().unwrap() > 0.0), "{timing:#}");
    for l in loads {
        assert!(l["requests"].as_u64().unwrap() > 0 && l["errors"] == 0, "{l:#}");
        // A load stopped early may have completed nothing (its requests cut off, or waiting for room).
        if l["completed"] != 0 {
            assert!(l["ttft_ms"]["p50"].as_f64().unwrap() > 0.0 && l["e2e_ms"]["p95"].as_f64().unwrap() >= l["ttft_ms"]["p95"].as_f64().unwrap(), "{l:#}");
        } else {
            assert!(l["stopped_early"] == true && l["sustained"] == false, "{l:#}");
        }
        if l["sustained"] == true {
            assert!(l["attainment"].as_f64().unwrap() >= 0.99 && l["achieved_rps"].as_f64().unwrap() >= 0.95 * l["offered_rps"].as_f64().unwrap(), "{l:#}");
            assert!(l["stopped_early"] == false && l["client_behind"] == false, "{l:#}");
        }
    }
    let max_rps = timing["max_rps"].as_f64().unwrap();
    let best = loads[2..].iter().filter(|l| l["sustained"] == true).map(|l| l["rate_rps"].as_f64().unwrap()).fold(0.0, f64::max);
    assert_eq!(max_rps, best, "{timing:#}");
    assert!(max_rps > 0.0, "one request at a time within 3 s / 6 s, some arrival rate is sustained: {timing:#}");
    // Nothing above what either anchor completed is offered.
    let ceiling = loads[0]["achieved_rps"].as_f64().unwrap().max(loads[1]["achieved_rps"].as_f64().unwrap());
    assert!(loads[2..].iter().all(|l| l["rate_rps"].as_f64().unwrap() <= ceiling + 1e-9), "{timing:#}");
    assert!(timing["goodput_rps"].as_f64().unwrap() > 0.0, "{timing:#}");
    max_rps
}

fn floats_in(value: &toml::Value) -> Vec<f64> {
    match value {
        toml::Value::Float(x) => vec![*x],
        toml::Value::Array(items) => items.iter().flat_map(floats_in).collect(),
        toml::Value::Table(table) => table.values().flat_map(floats_in).collect(),
        _ => Vec::new(),
    }
}

#[test]
fn capacity_against_llama_cpp_finds_a_max_rate_and_select_decides_on_it() {
    let p = Project::measuring();
    let server = LlamaServer::start(KEY);
    p.keep_tickets(12);
    write_catalog(&p, &[server.base_url()]);
    let pipeline = |min_rps: f64| p.read("select.toml") + &capacity_stage("served.toml", "smollm2-served", "") + &decided_stages("served.toml", "smollm2-served", min_rps);
    std::fs::write(p.path("load.toml"), pipeline(0.05)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", "load.toml"])
        .current_dir(&p.dir)
        .env("PIPELINE_TEST_API_KEY", KEY)
        .env("NO_COLOR", "1")
        .env_remove("PIPELINE_STORE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let load = show(&p, "load.toml", "load");
    assert_eq!((load["slo"]["ttft_ms"].as_f64(), load["slo"]["attainment"].as_f64()), (Some(3000.0), Some(0.99)));
    let max_rps = check_search(&load["models"]["smollm2-served"]["timing"]);
    let decision = show(&p, "load.toml", "decision");
    assert_eq!(decision["selected"], "smollm2-served", "{decision:#}");
    let row = &decision["candidates"][0];
    assert_eq!(row["timing"]["max_rps"].as_f64(), Some(max_rps));
    // llama-cpp-python streams no `usage`: the prompt's tokens are unknown, and so is a token's cost.
    let loads = load["models"]["smollm2-served"]["timing"]["loads"].as_array().unwrap();
    assert!(loads.iter().all(|l| l.get("prompt_tokens_mean").is_none()), "{loads:#?}");
    assert!(row["timing"].get("usd_per_mtok_at_max_rps").is_none_or(Value::is_null), "{row:#}");
    // The measurement is volatile: the lockfile pins the SLO and the model, never the figures.
    let lock = p.read("load.lock");
    // (No figure is a float anywhere in it; a text search for the figure would also match digits of a hash.)
    assert!(!lock.contains("rps"), "{lock}");
    assert_eq!(floats_in(&toml::Value::Table(toml::from_str(&lock).unwrap())), Vec::<f64>::new(), "{lock}");
    // A target out of reach: only the decision reruns (the measurement is memoized), and says why.
    std::fs::write(p.path("load.toml"), pipeline(1e6)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline")).args(["run", "load.toml", "--json"]).current_dir(&p.dir).env("PIPELINE_TEST_API_KEY", KEY).env_remove("PIPELINE_STORE").output().unwrap();
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out.stderr)));
    let ran: Vec<&str> = summary["iterations"][0]["stages"].as_array().unwrap().iter().filter(|s| s["status"] == "executed").map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ran, ["decision"], "{summary:#}");
    let decision = show(&p, "load.toml", "decision");
    assert!(decision["selected"].is_null(), "{decision:#}");
    assert!(decision["candidates"][0]["verdict"].as_str().unwrap().starts_with("misses max_rps"), "{decision:#}");
}

#[test]
fn capacity_measures_the_embedded_model_served_on_loopback() {
    let p = Project::measuring();
    p.keep_tickets(12);
    let (catalog, model) = ("../catalogs/open-models.toml", "smollm2-135m-instruct");
    p.write("load.toml", &(p.read("select.toml") + &capacity_stage(catalog, model, "prepare = \"q8_0\"") + &decided_stages(catalog, model, 0.05)));
    let out = p.run(&["run", "load.toml"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let load = show(&p, "load.toml", "load");
    let measured = &load["models"][model];
    assert_eq!(measured["weights_sha256"], "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "{measured:#}");
    let max_rps = check_search(&measured["timing"]);
    // `pipeline serve` counts the tokens (its `usage`, the stop string's token too): what a token
    // costs at that load is known. (Over llama-cpp-python, an answer stopped at once streams no
    // text, and no count comes.)
    for l in measured["timing"]["loads"].as_array().unwrap().iter().filter(|l| l["completed"] != 0) {
        assert!(l["prompt_tokens_mean"].as_f64().unwrap() > 20.0 && l["completion_tokens_mean"].as_f64().unwrap() >= 1.0, "{l:#}");
    }
    let tokens_per_s = measured["timing"]["tokens_per_s"].as_f64().unwrap();
    let decision = show(&p, "load.toml", "decision");
    assert_eq!(decision["selected"], model, "{decision:#}");
    let cost = decision["candidates"][0]["timing"]["usd_per_mtok_at_max_rps"].as_f64().unwrap();
    assert!((cost - 0.36 / (tokens_per_s * 3600.0) * 1e6).abs() < 1e-9 * cost, "{cost} at {max_rps} req/s, {tokens_per_s} tokens/s");
    // The report plots latency against the offered load, with the SLO: painted in Chromium (the
    // TTFT series' orange is on screen), and the table has the max load.
    let report = p.path(".pipeline/reports/load/report.html");
    let html = std::fs::read_to_string(&report).unwrap();
    let loads = measured["timing"]["loads"].as_array().unwrap().len();
    let drawn = html.matches("class=\"load-point\"").count() + html.matches("class=\"anchor\"").count();
    assert_eq!(drawn, 2 * loads, "both series, every load");
    assert!(html.contains("class=\"slo\"") && html.contains("max load (req/s within the SLO)"));
    let (dom, shot) = open_offline_in_chromium(&report, "load-report.png");
    assert!(dom.contains("class=\"load-point\"") && dom.contains(&format!("<td>{}</td>", max_rps_cell(max_rps))), "{dom}");
    let orange = pixels_of(&shot, [0xf5, 0x79, 0x00]);
    assert!(orange > 30, "{orange} TTFT-coloured pixels in {}", shot.display());
    // Memoized: a rerun measures nothing.
    let out = p.run(&["run", "load.toml", "--json"]);
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out.stderr)));
    assert!(summary["iterations"][0]["stages"].as_array().unwrap().iter().all(|s| s["status"] != "executed"), "{summary:#}");
}
