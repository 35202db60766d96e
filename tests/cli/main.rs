//! The `pipeline` binary against real pipeline files: diagnostics, incrementality through the
//! event log, the lockfile, the store lock, the schema.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod browser;
mod capacity;
mod concurrency;
mod conversation;
mod crash;
mod disk;
mod finetune;
mod gate;
mod http;
mod pairwise;
mod reasoning;
mod repeats;
mod reviser;
mod review;
mod structured;
mod tools;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn pipeline(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(args)
        .current_dir(dir)
        .env_remove("PIPELINE_STORE")
        .env("NO_COLOR", "1")
        .output()
        .expect("run pipeline")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A copy of `pipelines/` (and `catalogs/`) in a temp dir. `select.toml` is cut before its
/// inference stage: these tests are about the engine, and `infer_*` tests run the real model on a
/// few samples instead of all 240.
struct Project {
    _top: tempfile::TempDir,
    /// The copy of `pipelines/`, where commands run.
    dir: PathBuf,
    _machine: Machine,
}

/// The tests share the machine (cargo runs them side by side), except those measuring speed: a
/// [`Project`] holds a share of it for its life, a measuring one ([`Project::measuring`]) all of
/// it, so that no other test's model runs on the cores it measures. A measuring test waiting for
/// the machine lets no new test take a share (a test already holding one may take more: some
/// keep two projects).
enum Machine {
    Share,
    Whole,
}

struct Shares {
    held: usize,
    measuring: bool,
    waiting: usize,
}

static SHARES: std::sync::Mutex<Shares> = std::sync::Mutex::new(Shares { held: 0, measuring: false, waiting: 0 });
static SHARES_CHANGED: std::sync::Condvar = std::sync::Condvar::new();
thread_local! {
    /// Shares held by this thread's test.
    static HELD_HERE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl Machine {
    fn lock() -> std::sync::MutexGuard<'static, Shares> {
        SHARES.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn wait(shares: std::sync::MutexGuard<'static, Shares>) -> std::sync::MutexGuard<'static, Shares> {
        SHARES_CHANGED.wait(shares).unwrap_or_else(|e| e.into_inner())
    }
    fn share() -> Machine {
        let here = HELD_HERE.get();
        let mut shares = Machine::lock();
        while shares.measuring || (shares.waiting > 0 && here == 0) {
            shares = Machine::wait(shares);
        }
        shares.held += 1;
        HELD_HERE.set(here + 1);
        Machine::Share
    }
    fn whole() -> Machine {
        let mut shares = Machine::lock();
        shares.waiting += 1;
        while shares.measuring || shares.held > 0 {
            shares = Machine::wait(shares);
        }
        shares.waiting -= 1;
        shares.measuring = true;
        Machine::Whole
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let mut shares = Machine::lock();
        match self {
            Machine::Share => {
                shares.held -= 1;
                HELD_HERE.set(HELD_HERE.get() - 1);
            }
            Machine::Whole => shares.measuring = false,
        }
        SHARES_CHANGED.notify_all();
    }
}

impl Project {
    fn new() -> Project {
        Project::with(Machine::share())
    }
    /// A project whose test measures speed: it waits until no other test runs, and none starts
    /// until it is dropped.
    fn measuring() -> Project {
        Project::with(Machine::whole())
    }
    fn with(machine: Machine) -> Project {
        let top = tempfile::tempdir().unwrap();
        copy_dir(&root().join("catalogs"), &top.path().join("catalogs"));
        let dir = top.path().join("pipelines");
        copy_dir(&root().join("pipelines"), &dir);
        let select = std::fs::read_to_string(dir.join("select.toml")).unwrap();
        let cut = select.find("\n[stages.answers]").expect("select.toml has an `answers` stage");
        std::fs::write(dir.join("select.toml"), &select[..cut + 1]).unwrap();
        let _ = std::fs::remove_dir_all(dir.join(".pipeline"));
        for lock in std::fs::read_dir(&dir).unwrap().flatten().filter(|e| e.path().extension().is_some_and(|x| x == "lock")) {
            std::fs::remove_file(lock.path()).unwrap();
        }
        Project { _top: top, dir, _machine: machine }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
    fn run(&self, args: &[&str]) -> Output {
        pipeline(&self.dir, args)
    }
    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap()
    }
    fn write(&self, rel: &str, text: &str) {
        std::fs::write(self.path(rel), text).unwrap();
    }
    /// Cut `data/tickets.jsonl` to its first `n` tickets (tests that run the model keep few).
    fn keep_tickets(&self, n: usize) {
        let data: String = self.read("data/tickets.jsonl").lines().take(n).map(|l| format!("{l}\n")).collect();
        self.write("data/tickets.jsonl", &data);
    }
    /// `run` with an event log; returns (exit code, events).
    fn run_logged(&self, extra: &[&str]) -> (i32, Vec<Value>, Output) {
        self.run_logged_on("select.toml", extra)
    }
    /// `run_logged` on another pipeline file.
    fn run_logged_on(&self, file: &str, extra: &[&str]) -> (i32, Vec<Value>, Output) {
        let log = self.path("events.jsonl");
        let _ = std::fs::remove_file(&log);
        let mut args = vec!["run", file, "--events", log.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        let events = std::fs::read_to_string(&log).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        (out.status.code().unwrap(), events, out)
    }
}

/// The quality loop after `select.toml`'s `rendered`: SmolLM2 answers (8 tokens), `judge`,
/// `select` (an unreachable target, so the loop runs), `cluster` (with an LLM namer if `namer`),
/// `revise`, fed back to the prompt. `iterate` holds the `[iterate]` settings besides `feedback`.
fn loop_stages(namer: bool, iterate: &str) -> String {
    let namer = if namer { "namer = { catalog = \"../catalogs/open-models.toml\", model = \"smollm2-135m-instruct\" }\n" } else { "" };
    format!(
        r#"
[stages.answers]
kind = "infer"
needs = ["rendered"]
catalog = "../catalogs/open-models.toml"
models = ["smollm2-135m-instruct"]
sampler = {{ max_tokens = 8, stop = ["\n"] }}

[stages.judge]
kind = "judge"
needs = ["tickets", "answers"]
bootstrap = 100

[stages.decision]
kind = "select"
needs = ["judge", "answers", "revise"]
catalog = "../catalogs/open-models.toml"
targets = {{ accuracy = {{ min = 0.99 }} }}

[stages.failures]
kind = "cluster"
needs = ["judge", "answers"]
{namer}
[stages.revise]
kind = "revise"
# No `input_field`: examples show each ticket as the model saw it (its rendered message).
needs = ["prompt", "failures", "judge", "tickets", "rendered"]

[targets]
from = "decision"
targets_met = {{ min = 1 }}

[iterate]
{iterate}
feedback = {{ from = "revise", to = "prompt" }}
"#
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn started(events: &[Value]) -> Vec<String> {
    events.iter().filter(|e| e["event"] == "started").map(|e| e["stage"].as_str().unwrap().to_string()).collect()
}

fn items(events: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = events.iter().filter(|e| e["event"] == "item").map(|e| format!("{}/{}", e["stage"].as_str().unwrap(), e["item"].as_str().unwrap())).collect();
    v.sort();
    v
}

#[test]
fn invalid_pipelines_are_reported_like_a_compiler() {
    let dir = root().join("tests/cli/invalid");
    insta::glob!("invalid/*.toml", |path| {
        let name = path.file_name().unwrap().to_str().unwrap();
        let out = pipeline(&dir, &["validate", name]);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", text(&out.stderr));
        assert!(out.stdout.is_empty());
        insta::assert_snapshot!(text(&out.stderr));
        // `run` refuses the same file before touching the store.
        let out = pipeline(&dir, &["run", name]);
        assert_eq!(out.status.code(), Some(2));
        assert!(!dir.join(".pipeline").exists(), "{name}: the store was created for an invalid pipeline");
    });
}

#[test]
fn diagnostics_as_json_carry_line_and_column() {
    let out = pipeline(&root().join("tests/cli/invalid"), &["validate", "--json", "dangling_needs.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    insta::assert_json_snapshot!(v);
}

#[test]
fn every_shipped_pipeline_validates() {
    let mut n = 0;
    for entry in std::fs::read_dir(root().join("pipelines")).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|x| x == "toml") {
            n += 1;
            let out = pipeline(&root(), &["validate", path.to_str().unwrap()]);
            assert!(out.status.success(), "{}: {}", path.display(), text(&out.stderr));
            let first = std::fs::read_to_string(&path).unwrap();
            assert!(first.starts_with("#:schema ../schemas/pipeline.schema.json"), "{} lacks the #:schema line", path.display());
        }
    }
    assert!(n >= 1);
}

#[test]
fn checked_in_schemas_match_the_config_types() {
    for of in ["pipeline", "catalog"] {
        let out = pipeline(&root(), &["schema", of]);
        assert!(out.status.success());
        let generated = text(&out.stdout);
        let path = root().join(format!("schemas/{of}.schema.json"));
        if std::env::var_os("UPDATE_SCHEMAS").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(generated == checked_in, "{} is stale: run `UPDATE_SCHEMAS=1 cargo test --test cli checked_in_schemas`", path.display());
    }
}

/// taplo (the TOML language server's CLI) checks every shipped pipeline against the schema named
/// by its `#:schema` line, as an editor would.
#[test]
fn shipped_pipelines_validate_in_taplo() {
    let taplo = std::env::var_os("TAPLO").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        home.join(".cache/pipeline-taplo/node_modules/.bin/taplo")
    });
    assert!(taplo.exists(), "taplo not found at {}: install it with `npm install --prefix ~/.cache/pipeline-taplo @taplo/cli@0.7.0` or set TAPLO", taplo.display());
    let out = Command::new(&taplo).args(["check", "pipelines/*.toml", "catalogs/*.toml"]).current_dir(root()).env("RUST_LOG", "warn").output().unwrap();
    assert!(out.status.success(), "taplo: {}{}", text(&out.stdout), text(&out.stderr));
    // And it does reject a schema violation (so the check above can fail).
    let dir = tempfile::tempdir().unwrap();
    let schema = root().join("schemas/pipeline.schema.json");
    std::fs::write(
        dir.path().join("bad.toml"),
        format!("#:schema {}\n[stages.a]\nkind = \"dataset\"\npath = 3\n", schema.display()),
    )
    .unwrap();
    let out = Command::new(&taplo).args(["check", "bad.toml"]).current_dir(dir.path()).output().unwrap();
    assert!(!out.status.success(), "taplo accepted a schema violation");
}

#[test]
fn rerun_executes_nothing_and_plan_predicts_the_run() {
    let p = Project::new();
    let plan: Value = serde_json::from_slice(&p.run(&["plan", "--json", "select.toml"]).stdout).unwrap();
    let mut predicted: Vec<String> =
        plan["stages"].as_array().unwrap().iter().filter(|s| s["status"] != "fresh").map(|s| s["id"].as_str().unwrap().to_string()).collect();
    predicted.sort();
    let (code, events, _) = p.run_logged(&[]);
    assert_eq!(code, 0);
    let mut ran = started(&events);
    ran.sort();
    assert_eq!(ran, predicted);
    assert_eq!(items(&events).len(), 240, "one render item per sample");
    assert!(p.path("select.lock").exists());

    let out = p.run(&["plan", "select.toml"]);
    assert!(text(&out.stdout).contains("nothing to run: every stage is fresh"), "{}", text(&out.stdout));
    let lock = p.read("select.lock");
    let (code, events, out) = p.run_logged(&[]);
    assert_eq!(code, 0);
    assert_eq!(started(&events), Vec::<String>::new(), "{}", text(&out.stdout));
    assert_eq!(p.read("select.lock"), lock);
}

#[test]
fn new_rows_render_only_new_items() {
    let p = Project::new();
    assert_eq!(p.run_logged(&[]).0, 0);
    let mut data = p.read("data/tickets.jsonl");
    data.push_str("{\"id\": \"n1\", \"text\": \"My parcel is lost\", \"intent\": \"shipping\"}\n");
    data.push_str("{\"id\": \"n2\", \"text\": \"Refund my second charge\", \"intent\": \"refund\"}\n");
    p.write("data/tickets.jsonl", &data);
    let plan = text(&p.run(&["plan", "select.toml"]).stdout);
    assert!(plan.contains("dirty    tickets   dataset: file `data/tickets.jsonl` changed"), "{plan}");
    assert!(plan.contains("pending  rendered  render: upstream `tickets` will run"), "{plan}");
    let (code, events, _) = p.run_logged(&[]);
    assert_eq!(code, 0);
    assert_eq!(started(&events), ["tickets", "rendered"]);
    assert_eq!(items(&events), ["rendered/n1", "rendered/n2"]);
}

#[test]
fn template_change_is_explained_and_reruns_only_downstream() {
    let p = Project::new();
    assert_eq!(p.run_logged(&[]).0, 0);
    let template = p.read("prompts/classify.j2").replace("Answer with the intent only.", "Answer with one word.");
    p.write("prompts/classify.j2", &template);
    let toml = p.read("select.toml").replace("seed = 42", "seed = 42\n");
    p.write("select.toml", &toml);
    let plan = text(&p.run(&["plan", "select.toml"]).stdout);
    insta::assert_snapshot!(plan);
    let (code, events, _) = p.run_logged(&[]);
    assert_eq!(code, 0);
    assert_eq!(started(&events), ["prompt", "rendered"]);
    assert_eq!(items(&events).len(), 240);
}

#[test]
fn config_change_names_the_field() {
    let p = Project::new();
    assert_eq!(p.run_logged(&[]).0, 0);
    p.write("select.toml", &p.read("select.toml").replace("heldout = 0.3", "heldout = 0.25"));
    let plan = text(&p.run(&["plan", "select.toml"]).stdout);
    assert!(plan.contains("dirty    tickets   dataset: config changed: heldout 0.3 → 0.25"), "{plan}");
    // The split changed, but rendering does not depend on it: `rendered` is cut off.
    let (code, events, _) = p.run_logged(&[]);
    assert_eq!(code, 0);
    assert_eq!(started(&events), ["tickets", "rendered"]);
    assert_eq!(items(&events), Vec::<String>::new(), "every render item is memoized");
}

#[test]
fn locked_run_names_the_difference_and_leaves_the_lockfile() {
    let p = Project::new();
    let out = p.run(&["run", "--locked", "select.toml"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(text(&out.stderr).contains("there is no lockfile"), "{}", text(&out.stderr));
    assert_eq!(p.run_logged(&[]).0, 0);
    let lock = p.read("select.lock");
    assert_eq!(p.run(&["run", "--locked", "select.toml"]).status.code(), Some(0));
    p.write("select.toml", &p.read("select.toml").replace("seed = 42", "seed = 43"));
    let out = p.run(&["run", "--locked", "select.toml"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(text(&out.stderr).contains("seed 43 (locked: 42)"), "{}", text(&out.stderr));
    assert_eq!(p.read("select.lock"), lock);
}

#[test]
fn a_second_run_on_the_same_store_is_refused() {
    let p = Project::new();
    std::fs::create_dir_all(p.path(".pipeline")).unwrap();
    let held = std::fs::File::create(p.path(".pipeline/lock")).unwrap();
    held.try_lock().unwrap();
    let out = p.run(&["run", "select.toml"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("another `pipeline run` is using the store"), "{}", text(&out.stderr));
    drop(held);
    assert_eq!(p.run(&["run", "select.toml"]).status.code(), Some(0));
}

#[test]
fn graph_and_show() {
    let p = Project::new();
    insta::assert_snapshot!("mermaid", text(&p.run(&["graph", "select.toml"]).stdout));
    insta::assert_snapshot!("dot", text(&p.run(&["graph", "select.toml", "--format", "dot"]).stdout));
    let out = p.run(&["show", "select.toml", "rendered"]);
    assert_eq!(out.status.code(), Some(3), "nothing to show before a run");
    assert_eq!(p.run_logged(&[]).0, 0);
    let out = p.run(&["show", "select.toml", "tickets"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["counts"]["dev"].as_u64().unwrap() + v["counts"]["heldout"].as_u64().unwrap(), 240);
    let out = p.run(&["show", "select.toml", "nope"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn run_json_summary() {
    let p = Project::new();
    let out = p.run(&["run", "--json", "select.toml"]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["stop"], "done");
    let stages: Vec<(&str, &str)> =
        v["iterations"][0]["stages"].as_array().unwrap().iter().map(|s| (s["id"].as_str().unwrap(), s["status"].as_str().unwrap())).collect();
    assert_eq!(stages, [("tickets", "executed"), ("prompt", "executed"), ("rendered", "executed")]);
    // A report is written even without a decision to show.
    let report = PathBuf::from(v["report"].as_str().unwrap());
    assert!(p.dir.join(&report).is_file() || report.is_file(), "{}", report.display());
}

#[test]
fn command_stage_runs_a_users_program_and_reruns_when_its_script_changes() {
    let p = Project::new();
    p.write("count.py", "import json, sys\nd = json.load(sys.stdin)\nprint(json.dumps({'metrics': {'samples': len(d['inputs']['rendered']['samples'])}}))\n");
    let toml = p.read("select.toml")
        + "\n[stages.count]\nkind = \"command\"\nneeds = [\"rendered\"]\nrun = [\"python3\", \"count.py\"]\nfiles = [\"count.py\"]\n\n[targets]\nfrom = \"count\"\nsamples = { min = 200 }\n";
    p.write("select.toml", &toml);
    let out = p.run(&["run", "select.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("target   samples = 240.0000 (wanted ≥ 200) met"), "{}", text(&out.stdout));
    p.write("count.py", &p.read("count.py").replace("'samples': len(", "'samples': 0 + len("));
    let plan = text(&p.run(&["plan", "select.toml"]).stdout);
    assert!(plan.contains("dirty    count     command: file `count.py` changed"), "{plan}");
    let (code, events, _) = p.run_logged(&[]);
    assert_eq!(code, 0);
    assert_eq!(started(&events), ["count"]);
}

#[test]
fn a_failing_stage_is_reported_and_exits_1() {
    let p = Project::new();
    let toml = p.read("select.toml")
        + "\n[stages.broken]\nkind = \"command\"\nneeds = [\"tickets\"]\nrun = [\"python3\", \"-c\", \"import sys; sys.exit('no such column: intent2')\"]\n\n[stages.after]\nkind = \"command\"\nneeds = [\"broken\"]\nrun = [\"python3\", \"-c\", \"print(1)\"]\n";
    p.write("select.toml", &toml);
    let out = p.run(&["run", "select.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("FAILED   broken"), "{stdout}");
    assert!(stdout.contains("no such column: intent2"), "{stdout}");
    assert!(stdout.contains("skipped  after     command  upstream `broken` failed"), "{stdout}");
    // The independent branch finished and is kept.
    assert!(stdout.contains("ran      rendered"), "{stdout}");
    assert!(!p.path("select.lock").exists());
}

/// Ctrl-C in a terminal signals the whole process group: `pipeline` and the programs it runs.
#[test]
fn ctrl_c_stops_cleanly_and_keeps_finished_work() {
    use std::os::unix::process::CommandExt;
    let p = Project::new();
    let toml = p.read("select.toml")
        + "\n[stages.slow]\nkind = \"command\"\nneeds = [\"rendered\"]\nrun = [\"python3\", \"-c\", \"import time; time.sleep(60)\"]\n";
    p.write("select.toml", &toml);
    let log = p.path("events.jsonl");
    let child = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", "select.toml", "--events", log.to_str().unwrap()])
        .current_dir(&p.dir)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("\"stage\":\"slow\"") {
        assert!(std::time::Instant::now() < deadline, "the slow stage never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let started = std::time::Instant::now();
    let kill = Command::new("kill").args(["-INT", "--", &format!("-{}", child.id())]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "did not stop promptly");
    assert_eq!(out.status.code(), Some(130), "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("skipped  slow"), "{}", text(&out.stdout));
    assert!(!p.path("select.lock").exists(), "an interrupted run writes no lockfile");
    // Finished stages were kept: only `slow` is left to run.
    let plan = text(&p.run(&["plan", "select.toml"]).stdout);
    assert!(plan.contains("fresh    rendered") && plan.contains("dirty    slow"), "{plan}");
}

/// The real SmolLM2 through embedded mistral.rs, on the first 4 tickets: answers are produced,
/// a rerun computes nothing, and from an empty store greedy decoding reproduces the lockfile.
#[test]
fn infer_runs_smollm2_offline_and_reproduces() {
    let p = Project::new();
    p.keep_tickets(4);
    let toml = p.read("select.toml")
        + "\n[stages.answers]\nkind = \"infer\"\nneeds = [\"rendered\"]\ncatalog = \"../catalogs/open-models.toml\"\nmodels = [\"smollm2-135m-instruct\"]\nsampler = { max_tokens = 6, stop = [\"\\n\"] }\n";
    p.write("select.toml", &toml);
    let (code, events, out) = p.run_logged(&[]);
    assert_eq!(code, 0, "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(items(&events).iter().filter(|i| i.starts_with("answers/")).count(), 4);
    let start = events.iter().find(|e| e["event"] == "started" && e["stage"] == "answers").unwrap();
    assert_eq!(start["groups"], serde_json::json!([{"name": "smollm2-135m-instruct", "items": 4, "cached_items": 0}]), "progress per candidate");
    let answers: Value = serde_json::from_slice(&p.run(&["show", "select.toml", "answers"]).stdout).unwrap();
    let model = &answers["models"]["smollm2-135m-instruct"];
    assert_eq!(model["weights_sha256"], "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53");
    let list = model["answers"].as_array().unwrap();
    assert_eq!(list.len(), 4);
    for a in list {
        assert!(a["completion_tokens"].as_u64().unwrap() >= 1, "{a}");
        assert!(a["prompt_tokens"].as_u64().unwrap() > 50, "{a}");
        assert!(!a["text"].as_str().unwrap().trim().is_empty(), "{a}");
        assert!(a["timing"]["latency_ms"].as_f64().unwrap() > 0.0, "{a}");
    }
    let (code, events, _) = p.run_logged(&[]);
    assert_eq!(code, 0);
    assert_eq!(started(&events), Vec::<String>::new(), "a rerun recomputes nothing");
    // From an empty store: every answer is recomputed and must match the lockfile.
    std::fs::remove_dir_all(p.path(".pipeline")).unwrap();
    let (code, events, out) = p.run_logged(&["--locked"]);
    assert_eq!(code, 0, "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(items(&events).iter().filter(|i| i.starts_with("answers/")).count(), 4);

    // The same weights converted to Q8_0: a separate, cached preparation with answers of its own.
    p.write("select.toml", &(p.read("select.toml") + "prepare = \"q8_0\"\n"));
    let plan = text(&p.run(&["plan", "select.toml"]).stdout);
    assert!(plan.contains("config changed: prepare added (\"q8_0\"); 4 new item(s), 0 cached"), "{plan}");
    let (code, events, out) = p.run_logged(&[]);
    assert_eq!(code, 0, "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(items(&events).iter().filter(|i| i.starts_with("answers/")).count(), 4);
    let answers: Value = serde_json::from_slice(&p.run(&["show", "select.toml", "answers"]).stdout).unwrap();
    assert_eq!(answers["prepare"], "q8_0");
    assert_eq!(answers["models"]["smollm2-135m-instruct"]["answers"].as_array().unwrap().len(), 4);
    std::fs::remove_dir_all(p.path(".pipeline")).unwrap();
    let (code, _, out) = p.run_logged(&["--locked"]);
    assert_eq!(code, 0, "the converted weights reproduce: {}\n{}", text(&out.stdout), text(&out.stderr));
}


const INTENTS: [&str; 6] = ["billing", "refund", "technical", "account", "shipping", "cancel"];

/// Constrained decoding (llguidance inside mistral.rs) on the real model: a choice yields one of
/// the choices and stops right after it; a JSON schema yields JSON valid against it.
#[test]
fn infer_output_is_constrained() {
    let p = Project::new();
    p.keep_tickets(4);
    let stage = "\n[stages.answers]\nkind = \"infer\"\nneeds = [\"rendered\"]\ncatalog = \"../catalogs/open-models.toml\"\nmodels = [\"smollm2-135m-instruct\"]\n";
    let base = p.read("select.toml") + stage;
    p.write("select.toml", &(base.clone() + "sampler = { max_tokens = 12 }\noutput = { choice = [\"billing\", \"refund\", \"technical\", \"account\", \"shipping\", \"cancel\"] }\n"));
    let (code, _, out) = p.run_logged(&[]);
    assert_eq!(code, 0, "{}\n{}", text(&out.stdout), text(&out.stderr));
    let answers: Value = serde_json::from_slice(&p.run(&["show", "select.toml", "answers"]).stdout).unwrap();
    assert_eq!(answers["output"]["choice"].as_array().unwrap().len(), 6);
    for a in answers["models"]["smollm2-135m-instruct"]["answers"].as_array().unwrap() {
        assert!(INTENTS.contains(&a["text"].as_str().unwrap()), "{a}");
        assert_eq!(a["finish_reason"], "stop", "generation ends once the choice is complete: {a}");
        assert!(a["completion_tokens"].as_u64().unwrap() < 12, "{a}");
    }

    let schema = "output = { json_schema = { type = \"object\", properties = { intent = { enum = [\"billing\", \"refund\", \"technical\", \"account\", \"shipping\", \"cancel\"] }, urgent = { type = \"boolean\" } }, required = [\"intent\", \"urgent\"], additionalProperties = false } }\n";
    p.write("select.toml", &(base + "sampler = { max_tokens = 40 }\n" + schema));
    let (code, _, out) = p.run_logged(&[]);
    assert_eq!(code, 0, "{}\n{}", text(&out.stdout), text(&out.stderr));
    let answers: Value = serde_json::from_slice(&p.run(&["show", "select.toml", "answers"]).stdout).unwrap();
    for a in answers["models"]["smollm2-135m-instruct"]["answers"].as_array().unwrap() {
        let v: Value = serde_json::from_str(a["text"].as_str().unwrap()).unwrap_or_else(|e| panic!("not JSON ({e}): {a}"));
        assert!(INTENTS.contains(&v["intent"].as_str().unwrap_or_default()), "{a}");
        assert!(v["urgent"].is_boolean(), "{a}");
        assert_eq!(v.as_object().unwrap().len(), 2, "{a}");
    }
}

/// `judge` on the real model's answers: every answer gets a verdict, accuracy is the share of
/// passes, and a change to how answers are read reruns the judge alone.
#[test]
fn judge_scores_real_answers_and_a_judge_change_reruns_only_the_judge() {
    let p = Project::new();
    p.keep_tickets(6);
    let toml = p.read("select.toml")
        + "\n[stages.answers]\nkind = \"infer\"\nneeds = [\"rendered\"]\ncatalog = \"../catalogs/open-models.toml\"\nmodels = [\"smollm2-135m-instruct\"]\nsampler = { max_tokens = 8, stop = [\"\\n\"] }\n"
        + "\n[stages.judge]\nkind = \"judge\"\nneeds = [\"tickets\", \"answers\"]\nbootstrap = 200\n";
    p.write("select.toml", &toml);
    let (code, _, out) = p.run_logged(&[]);
    assert_eq!(code, 0, "{}\n{}", text(&out.stdout), text(&out.stderr));
    let judge: Value = serde_json::from_slice(&p.run(&["show", "select.toml", "judge"]).stdout).unwrap();
    let m = &judge["models"]["smollm2-135m-instruct"];
    let verdicts = m["verdicts"].as_array().unwrap();
    assert_eq!(verdicts.len(), 6);
    for split in ["dev", "heldout"] {
        let s = &m["splits"][split];
        let mine: Vec<&Value> = verdicts.iter().filter(|v| v["split"] == split).collect();
        let passes = mine.iter().filter(|v| v["pass"] == true).count();
        assert_eq!(s["n"], mine.len());
        assert_eq!(s["accuracy"]["value"].as_f64().unwrap(), ((passes as f64 / mine.len() as f64) * 1e6).round() / 1e6);
        assert_eq!(s["unparsed"], mine.iter().filter(|v| v["predicted"].is_null()).count());
    }
    assert_eq!(judge["best"], "smollm2-135m-instruct");
    assert_eq!(judge["metrics"]["accuracy"], m["splits"]["heldout"]["accuracy"]["value"]);

    p.write("select.toml", &p.read("select.toml").replace("bootstrap = 200", "bootstrap = 200\nnormalize = \"exact\""));
    let (code, events, _) = p.run_logged(&[]);
    assert_eq!(code, 0);
    assert_eq!(started(&events), ["judge"], "only the judge reruns");
    let judge: Value = serde_json::from_slice(&p.run(&["show", "select.toml", "judge"]).stdout).unwrap();
    assert_eq!(judge["normalize"], "exact");
}

/// `llm_judge` on the real model, judging its own answers to six questions of `qa.toml` against
/// the shipped rubric: every verdict is read or unscored (never silently either), the figures
/// add up from the verdicts, agreement with the shipped human labels is recomputed here; an edited
/// rubric re-judges without re-answering, edited labels re-judge nothing, a new row computes only
/// its own items, a changed prompt reruns inference onward, and a judge cut off before its JSON
/// ends leaves every answer unscored — not failed.
#[test]
fn rubric_judge_grades_real_answers_and_reruns_only_what_changed() {
    let p = Project::new();
    let keep = ["t001", "t002", "t011", "t014", "t024", "t028"];
    let filter = |file: &str| -> String { p.read(file).lines().filter(|l| keep.iter().any(|k| l.contains(&format!("\"id\": \"{k}\"")))).map(|l| format!("{l}\n")).collect() };
    let (data, labels) = (filter("data/trivia.jsonl"), filter("labels/qa.jsonl"));
    p.write("data/trivia.jsonl", &data);
    p.write("labels/qa.jsonl", &labels);
    let (code, events, out) = p.run_logged_on("qa.toml", &[]);
    assert_eq!(code, 0, "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(items(&events).iter().filter(|i| i.starts_with("judge/")).count(), 6);
    let judge: Value = serde_json::from_slice(&p.run(&["show", "qa.toml", "judge"]).stdout).unwrap();
    let m = &judge["models"]["smollm2-135m-instruct"];
    let verdicts = m["verdicts"].as_array().unwrap();
    assert_eq!(verdicts.len(), 6);
    let modes = ["wrong_fact", "no_answer", "rambling", "unspecified"];
    for v in verdicts {
        match v["pass"].as_bool() {
            Some(true) => assert!(v["failure_mode"].is_null(), "{v}"),
            Some(false) => assert!(modes.contains(&v["failure_mode"].as_str().unwrap()), "{v}"),
            None => assert!(v["unscored"].is_string() && v["judge_reply"].is_string(), "{v}"),
        }
    }
    for split in ["dev", "heldout"] {
        let s = &m["splits"][split];
        let mine: Vec<&Value> = verdicts.iter().filter(|v| v["split"] == split).collect();
        let scored: Vec<bool> = mine.iter().filter_map(|v| v["pass"].as_bool()).collect();
        assert_eq!(s["n"], mine.len());
        assert_eq!(s["unscored"], mine.len() - scored.len());
        assert_eq!(s["passes"], scored.iter().filter(|p| **p).count());
    }
    // Agreement over the labeled answers (the labels were written for exactly these answers).
    let pairs: Vec<(bool, bool)> = verdicts.iter().filter_map(|v| Some((v["human"].as_bool()?, v["pass"].as_bool()?))).collect();
    assert_eq!(verdicts.iter().filter(|v| v["human"].is_boolean()).count(), 6, "every answer is labeled");
    let a = &judge["agreement"];
    assert_eq!(a["n"], pairs.len());
    assert_eq!(a["stale"], 0);
    let agree = pairs.iter().filter(|(h, j)| h == j).count() as f64 / pairs.len() as f64;
    assert!((a["agreement"].as_f64().unwrap() - agree).abs() < 1e-6, "{a}");
    let decision: Value = serde_json::from_slice(&p.run(&["show", "qa.toml", "decision"]).stdout).unwrap();
    assert_eq!(decision["judge_agreement"], *a);
    report_opens_offline_in_chromium(&p.path(".pipeline/reports/qa"), decision["summary"].as_str().unwrap());

    // A rubric edit re-judges every answer; the answers stay.
    p.write("rubrics/qa.toml", &p.read("rubrics/qa.toml").replace("the answer repeats itself or rambles", "the answer repeats itself, rambles or hedges"));
    let (code, events, _) = p.run_logged_on("qa.toml", &[]);
    assert_eq!(code, 0);
    assert_eq!(started(&events), ["judge", "decision"]);
    assert_eq!(items(&events).len(), 6);
    assert!(items(&events).iter().all(|i| i.starts_with("judge/")), "{:?}", items(&events));
    let judge: Value = serde_json::from_slice(&p.run(&["show", "qa.toml", "judge"]).stdout).unwrap();
    let agree = judge["agreement"]["agreement"].as_f64().unwrap();

    // Flipped labels: new agreement figures, no judge call.
    let flipped = p.read("labels/qa.jsonl").replace("\"pass\": true", "\"pass\": T").replace("\"pass\": false", "\"pass\": true").replace("\"pass\": T", "\"pass\": false");
    p.write("labels/qa.jsonl", &flipped);
    let (code, events, _) = p.run_logged_on("qa.toml", &[]);
    assert_eq!(code, 0);
    assert_eq!(started(&events), ["judge", "decision"]);
    assert!(items(&events).is_empty(), "{:?}", items(&events));
    let judge: Value = serde_json::from_slice(&p.run(&["show", "qa.toml", "judge"]).stdout).unwrap();
    let flipped_agree = judge["agreement"]["agreement"].as_f64().unwrap();
    assert!((flipped_agree - (1.0 - agree)).abs() < 1e-6, "{}", judge["agreement"]);

    // One new row: only its items, in every stage that has items.
    p.write("data/trivia.jsonl", &(p.read("data/trivia.jsonl") + "{\"id\": \"n01\", \"topic\": \"science\", \"question\": \"What is the boiling point of water in Celsius?\", \"reference\": \"100 degrees Celsius\"}\n"));
    let (code, events, _) = p.run_logged_on("qa.toml", &[]);
    assert_eq!(code, 0);
    assert_eq!(started(&events), ["questions", "rendered", "answers", "judge", "decision"]);
    assert_eq!(items(&events), ["answers/smollm2-135m-instruct/n01", "judge/smollm2-135m-instruct/n01", "rendered/n01"]);

    // A changed prompt: inference onward, every item; the dataset stays.
    p.write("prompts/qa.j2", &p.read("prompts/qa.j2").replace("one short sentence", "one sentence"));
    let (code, events, _) = p.run_logged_on("qa.toml", &[]);
    assert_eq!(code, 0);
    assert_eq!(started(&events), ["prompt", "rendered", "answers", "judge", "decision"]);
    assert_eq!(items(&events).iter().filter(|i| i.starts_with("answers/")).count(), 7);

    // A judge cut off mid-JSON: every answer unscored, none counted as a fail or a pass.
    p.write("qa.toml", &p.read("qa.toml").replace("sampler = { max_tokens = 64 }", "sampler = { max_tokens = 3 }"));
    let (code, _, out) = p.run_logged_on("qa.toml", &[]);
    assert_eq!(code, 0, "{}", text(&out.stderr));
    let judge: Value = serde_json::from_slice(&p.run(&["show", "qa.toml", "judge"]).stdout).unwrap();
    let m = &judge["models"]["smollm2-135m-instruct"];
    assert!(m["verdicts"].as_array().unwrap().iter().all(|v| v["pass"].is_null() && v["unscored"].as_str().unwrap().starts_with("not JSON")));
    assert_eq!(m["splits"]["heldout"]["scored"], 0);
    assert_eq!(judge["metrics"]["unscored_rate"], 1.0);
    assert!(text(&out.stdout).contains("misses"), "{}", text(&out.stdout));
}

/// The run report: self-contained (nothing to fetch), and in headless Chromium with the network
/// cut off its plots render (the screenshot has the plot's blue) and the decision is on the page.
/// The screenshot is kept under the target dir for CI (`report.png`).
fn report_opens_offline_in_chromium(dir: &Path, decision: &str) {
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains(decision), "report.md has the decision");
    assert!(html.contains("<svg") && html.contains("class=\"point\""), "report.html has plots");
    for fetch in ["src=", "href=", "@import", "url("] {
        assert!(!html.contains(fetch), "report.html would fetch something ({fetch})");
    }
    let (dom, shot) = open_offline_in_chromium(&dir.join("report.html"), "report.png");
    assert!(dom.contains("<circle class=\"point\""), "the plots are in the rendered page");
    assert!(dom.contains(&decision.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")), "the decision is on the page");
    // The plot colour (#3465a4) is on screen: the SVG was painted, not just parsed.
    let blue = pixels_of(&shot, [0x34, 0x65, 0xa4]);
    assert!(blue > 50, "{blue} plot-coloured pixels in {}", shot.display());
    println!("report screenshot: {}", shot.display());
}

/// `page` in headless Chromium with the network cut off: the DOM it rendered, and a screenshot
/// (kept under the target dir as `shot`, for CI).
pub(crate) fn open_offline_in_chromium(page: &Path, shot: &str) -> (String, PathBuf) {
    let chromium = std::env::var("PIPELINE_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(shot);
    let _ = std::fs::remove_file(&shot);
    let url = format!("file://{}", page.display());
    // No network: every host resolves to nothing and every proxy is a closed port.
    let offline = ["--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND"];
    let out = Command::new(&chromium).args(offline).args(["--window-size=1200,2400", &format!("--screenshot={}", shot.display()), &url]).output();
    let out = out.unwrap_or_else(|e| panic!("cannot run {chromium} (scripts/test installs it): {e}"));
    assert!(shot.exists(), "no screenshot: {}", text(&out.stderr));
    let dom = Command::new(&chromium).args(offline).args(["--dump-dom", &url]).output().unwrap();
    (text(&dom.stdout), shot)
}

/// How many pixels of a PNG are exactly `rgb`.
pub(crate) fn pixels_of(png: &Path, rgb: [u8; 3]) -> usize {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    buf[..info.buffer_size()].chunks(channels).filter(|p| p[..3] == rgb).count()
}

/// The quality loop on the real model: iteration 1 judges and clusters the failures, `revise`
/// writes rules and dev-split examples into the prompt, iteration 2 runs the revision and the
/// held-out McNemar check decides whether it stays. The figures it reports are recomputed here
/// from the two iterations' verdicts, no held-out sample is used as an example, and a locked run
/// from an empty store reproduces every iteration.
#[test]
fn the_loop_revises_the_prompt_from_dev_failures_and_checks_it_on_held_out() {
    let p = Project::new();
    p.keep_tickets(30);
    let loop_stages = loop_stages(true, "max_iterations = 3\npatience = 1");
    p.write("select.toml", &(p.read("select.toml") + &loop_stages));
    let out = p.run(&["run", "--json", "select.toml"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();

    let show = |stage: &str, it: u32| -> Value {
        serde_json::from_slice(&p.run(&["show", "select.toml", stage, "--iteration", &it.to_string()]).stdout).unwrap()
    };
    let split_of: std::collections::BTreeMap<String, String> = show("tickets", 1)["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_string(), s["split"].as_str().unwrap().to_string()))
        .collect();
    let revised = show("prompt", 2);
    assert_eq!(revised["revision"]["version"], 2);
    // Diffable against its parent.
    let diff = p.run(&["show", "select.toml", "prompt", "--iteration", "2", "--diff"]);
    let diff = text(&diff.stdout);
    assert!(diff.starts_with("prompt version 2, revised from version 1 for: "), "{diff}");
    assert!(diff.contains("--- version 1\n+++ version 2\n") && diff.contains("\n+{% raw %}Rules learned from mistakes:\n"), "{diff}");
    assert_eq!(p.run(&["show", "select.toml", "judge", "--diff"]).status.code(), Some(2), "only a revised prompt has a parent to diff against");
    let system = revised["system"].as_str().unwrap();
    assert!(system.contains("Rules learned from mistakes"), "{system}");
    let clusters = show("failures", 1);
    let modes = clusters["models"]["smollm2-135m-instruct"]["clusters"].as_array().unwrap();
    // Every mode was put to the namer: named by it, or its unreadable reply shown.
    for mode in modes {
        assert_eq!(mode["named_by"], "smollm2-135m-instruct", "{mode}");
        assert!(mode["signature_name"].is_string() && mode["llm_fix_hypothesis"].is_string() || mode["naming"].is_string(), "{mode}");
    }
    let text_of: std::collections::BTreeMap<String, String> = show("tickets", 1)["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_string(), s["fields"]["text"].as_str().unwrap().to_string()))
        .collect();
    for targeted in revised["revision"]["targeted"].as_array().unwrap() {
        let mode = modes.iter().find(|m| &m["id"] == targeted).expect("a targeted mode exists");
        for example in mode["examples"].as_array().unwrap() {
            assert_eq!(split_of[example["id"].as_str().unwrap()], "dev", "examples come from the dev split only");
        }
        // Shown as the model saw it, less the template's words: the ticket itself.
        let first = mode["examples"][0]["id"].as_str().unwrap();
        let shown: String = text_of[first].split_whitespace().collect::<Vec<_>>().join(" ").replace('"', "'").chars().take(40).collect();
        assert!(system.contains(&format!("Example: \"{shown}")), "example `{first}` is not shown as its ticket's text:\n{system}");
    }

    // The acceptance check, recomputed from the verdicts of both iterations.
    let heldout = |it: u32| -> std::collections::BTreeMap<String, bool> {
        show("judge", it)["models"]["smollm2-135m-instruct"]["verdicts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["split"] == "heldout")
            .map(|v| (v["id"].as_str().unwrap().to_string(), v["pass"].as_bool().unwrap()))
            .collect()
    };
    let (before, after) = (heldout(1), heldout(2));
    let wins = before.iter().filter(|(id, pass)| !**pass && after[*id]).count();
    let losses = before.iter().filter(|(id, pass)| **pass && !after[*id]).count();
    let check = &show("revise", 2)["revision"]["history"][0];
    assert_eq!((check["wins"].as_u64().unwrap() as usize, check["losses"].as_u64().unwrap() as usize), (wins, losses), "{check}");
    assert_eq!(check["accepted"], json_bool(wins > losses && check["p_value"].as_f64().unwrap() < 0.05));
    let moved = (wins as f64 - losses as f64) / before.len() as f64;
    assert!((check["heldout_delta"].as_f64().unwrap() - moved).abs() < 1e-6, "{check}");
    // `pipeline compare` between the two iterations says the same, with the same interval.
    let out = p.run(&["compare", "select.toml@1", "select.toml@2", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let compared: Value = serde_json::from_slice(&out.stdout).unwrap();
    let change = &compared["candidates"][0]["pass_rate_change"];
    assert_eq!((change["fixed"].as_u64().unwrap() as usize, change["broken"].as_u64().unwrap() as usize), (wins, losses));
    assert_eq!((&change["value"], &change["ci95"]), (&check["heldout_delta"], &check["heldout_delta_ci95"]), "{change} vs {check}");
    assert!(compared["failure_modes"].as_array().unwrap().iter().all(|m| m["change"] == m["b"].as_i64().unwrap() - m["a"].as_i64().unwrap()));
    assert_eq!(p.run(&["compare", "select.toml@1", "select.toml@9"]).status.code(), Some(3), "no such iteration");
    // `patience = 1`: a rejected revision ends the loop; an accepted one earns a third iteration.
    let n = report["iterations"].as_array().unwrap().len();
    if check["accepted"] == false {
        assert_eq!((n, report["stop"].as_str().unwrap()), (2, "no_progress"), "{}", report["stop"]);
        assert_eq!(show("revise", 2)["metrics"]["improved"], 0.0);
    } else {
        assert_eq!(n, 3, "{}", report["stop"]);
    }

    let (code, events, _) = p.run_logged(&[]);
    assert_eq!(code, 0);
    assert!(items(&events).is_empty(), "a rerun computes nothing");
    std::fs::remove_dir_all(p.path(".pipeline")).unwrap();
    let (code, _, out) = p.run_logged(&["--locked"]);
    assert_eq!(code, 0, "both iterations reproduce: {}\n{}", text(&out.stdout), text(&out.stderr));
}

fn json_bool(b: bool) -> Value {
    Value::Bool(b)
}
