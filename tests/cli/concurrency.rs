//! Two things at once: two runs of one pipeline, and two inference stages on one embedded model.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Project, started, text};

/// Two inference stages on the same embedded model, with different token limits (so neither reuses
/// the other's memoized answers): with `--jobs 2` they run at the same time.
fn two_inference_stages() -> Project {
    let p = Project::new();
    p.keep_tickets(6);
    let stage = |id: &str, tokens: u32| {
        format!("\n[stages.{id}]\nkind = \"infer\"\nneeds = [\"rendered\"]\ncatalog = \"../catalogs/open-models.toml\"\nmodels = [\"smollm2-135m-instruct\"]\nsampler = {{ max_tokens = {tokens}, stop = [\"\\n\"] }}\n")
    };
    p.write("select.toml", &(p.read("select.toml") + &stage("answers_a", 12) + &stage("answers_b", 13)));
    p
}

fn texts(p: &Project, stage: &str) -> Vec<(String, String)> {
    let out: Value = serde_json::from_slice(&p.run(&["show", "select.toml", stage]).stdout).unwrap();
    out["models"]["smollm2-135m-instruct"]["answers"].as_array().unwrap().iter().map(|a| (a["id"].as_str().unwrap().to_string(), a["text"].as_str().unwrap().to_string())).collect()
}

/// Stages running at once send their requests to one embedded model together (mistral.rs batches
/// them), and get exactly what they get one after the other.
#[test]
fn inference_stages_running_at_once_answer_as_they_do_one_after_the_other() {
    let together = two_inference_stages();
    let (code, events, out) = together.run_logged(&["--jobs", "2"]);
    assert_eq!(code, 0, "{}", text(&out.stderr));
    // They did overlap: both started before either finished.
    let order: Vec<(String, String)> = events.iter().filter(|e| e["stage"].as_str().is_some_and(|s| s.starts_with("answers_"))).filter_map(|e| Some((e["event"].as_str()?.to_string(), e["stage"].as_str()?.to_string()))).collect();
    let first_finish = order.iter().position(|(e, _)| e == "finished").unwrap();
    assert_eq!(order[..first_finish].iter().filter(|(e, _)| e == "started").count(), 2, "the stages did not overlap: {order:?}");

    let alone = two_inference_stages();
    let (code, _, _) = alone.run_logged(&["--jobs", "1"]);
    assert_eq!(code, 0);
    for stage in ["answers_a", "answers_b"] {
        assert_eq!(texts(&together, stage), texts(&alone, stage), "{stage}: answers depend on what ran beside them");
    }
}

/// Two `pipeline run`s of one pipeline at once: the second refuses at once, naming why, and
/// leaves the first to finish; the store is then complete and consistent.
#[test]
fn a_second_run_while_one_is_running_is_refused_and_the_first_finishes() {
    let p = two_inference_stages();
    let log = p.path("first.jsonl");
    let first = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", "select.toml", "--jobs", "1", "--events", log.to_str().unwrap()])
        .current_dir(&p.dir)
        .env_remove("PIPELINE_STORE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("\"stage\":\"answers_a\"") {
        assert!(Instant::now() < deadline, "the first run never reached inference");
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = p.run(&["run", "select.toml"]);
    assert_eq!(second.status.code(), Some(3), "{}", text(&second.stderr));
    assert!(text(&second.stderr).contains("another `pipeline run` is using the store"), "{}", text(&second.stderr));
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success(), "the first run was disturbed: {}", text(&out.stderr));
    let lock = p.read("select.lock");
    let (code, events, _) = p.run_logged(&[]);
    assert_eq!(code, 0);
    assert!(started(&events).is_empty(), "the store was left incomplete: {:?}", started(&events));
    assert_eq!(p.read("select.lock"), lock);
}
