//! `training_data` and `finetune` on the real SmolLM2 with the real trainer (PyTorch +
//! transformers + peft, installed on first use): a few LoRA steps on the dev split, merged, run
//! embedded through mistral.rs as a candidate beside its base; the same merged model read back as
//! a `local_dir` catalog source and from a Hugging Face cache laid out as the hub's client lays it
//! out; the set exported for hosted fine-tuning; DPO on the base's failed answers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::{Project, items, started, text};

const INTENTS: [&str; 6] = ["billing", "refund", "technical", "account", "shipping", "cancel"];

/// The cut `select.toml` (dataset, prompt, render) with `training_data` and `finetune` stages and
/// an `infer` stage that runs the base and the trained model.
fn pipeline(p: &Project) -> String {
    p.read("select.toml")
        + r#"
[stages.train_data]
kind = "training_data"
needs = ["tickets", "rendered"]

[stages.tuned]
kind = "finetune"
needs = ["train_data"]
catalog = "../catalogs/open-models.toml"
base = "smollm2-135m-instruct"
max_steps = 10
learning_rate = 1e-3

[stages.answers]
kind = "infer"
needs = ["rendered", "tuned"]
catalog = "../catalogs/open-models.toml"
models = ["smollm2-135m-instruct"]
sampler = { max_tokens = 8, stop = ["\n"] }
"#
}

fn answers_of(p: &Project, model: &str) -> Vec<String> {
    stage_answers_of(p, "answers", model)
}

/// A model's answers (trimmed) in an `infer` stage's output.
fn stage_answers_of(p: &Project, stage: &str, model: &str) -> Vec<String> {
    let answers: Value = serde_json::from_slice(&p.run(&["show", "select.toml", stage]).stdout).unwrap();
    answers["models"][model]["answers"].as_array().unwrap_or_else(|| panic!("no answers of `{model}`: {answers}")).iter().map(|a| a["text"].as_str().unwrap().trim().to_string()).collect()
}

fn exact_labels(answers: &[String]) -> usize {
    answers.iter().filter(|a| INTENTS.contains(&a.as_str())).count()
}

#[test]
fn finetune_trains_a_candidate_that_answers_as_taught() {
    let p = Project::new();
    p.keep_tickets(40);
    p.write("select.toml", &pipeline(&p));

    // Killed in the middle of training (kill -9): the trainer does not live on, nothing
    // half-written becomes a model, and the rerun trains again.
    let root = model_cache().join("finetuned");
    let mut run = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", "select.toml"])
        .current_dir(&p.dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let prefix = format!(".tmp-{}-", run.id());
    let tmp = wait_for(Duration::from_secs(300), || {
        std::fs::read_dir(&root).ok()?.flatten().map(|e| e.path()).find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)))
    })
    .expect("the run starts training");
    std::thread::sleep(Duration::from_secs(8));
    run.kill().unwrap();
    run.wait().unwrap();
    let trainer_alive = || std::fs::read_dir("/proc").unwrap().flatten().any(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*tmp.to_string_lossy())));
    assert!(wait_for(Duration::from_secs(30), || (!trainer_alive()).then_some(())).is_some(), "the trainer exits with the run that started it");

    let (code, events, out) = p.run_logged(&[]);
    assert_eq!(code, 0, "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(items(&events).iter().filter(|i| i.starts_with("tuned/")).count(), 1, "one training run");
    // Each training step is reported as it happens (a progress bar on a terminal).
    let steps: Vec<(u64, u64)> = events.iter().filter(|e| e["event"] == "item_progress" && e["stage"] == "tuned").map(|e| (e["done"].as_u64().unwrap(), e["total"].as_u64().unwrap())).collect();
    assert_eq!(steps, (0..=10).map(|done| (done, 10)).collect::<Vec<_>>(), "progress: {steps:?}");
    assert!(!tmp.exists(), "the killed training's files are cleared");

    let tuned: Value = serde_json::from_slice(&p.run(&["show", "select.toml", "tuned"]).stdout).unwrap();
    let model = &tuned["models"][0];
    assert_eq!(model["id"], "smollm2-135m-instruct+lora");
    assert_eq!(model["base"], "smollm2-135m-instruct");
    assert_eq!(model["license"], "Apache-2.0");
    assert_eq!(model["steps"], 10);
    // Trained on the dev split only: 40 tickets, 30% held out.
    let dataset: Value = serde_json::from_slice(&p.run(&["show", "select.toml", "tickets"]).stdout).unwrap();
    assert_eq!(model["examples"], dataset["counts"]["dev"]);
    assert_eq!(model["method"], "lora-sft");
    let files = model["files"].as_object().unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(files.contains_key(f), "{f} in {files:?}");
    }
    // The adapter is kept beside the merged model, in the layout peft and vLLM load.
    let adapter = model["adapter"].as_object().unwrap();
    assert_eq!(adapter.keys().collect::<Vec<_>>(), ["adapter_config.json", "adapter_model.safetensors"], "{adapter:?}");

    // The training data says: answer with the label alone. The base rambles; the trained model
    // answers more tickets with a bare label than its base does.
    let base = answers_of(&p, "smollm2-135m-instruct");
    let trained = answers_of(&p, "smollm2-135m-instruct+lora");
    assert_eq!((base.len(), trained.len()), (40, 40));
    assert_ne!(base, trained);
    assert!(exact_labels(&trained) >= 20 && exact_labels(&trained) > exact_labels(&base), "base {base:?}\ntrained {trained:?}");

    // Nothing changed: nothing trains, nothing answers.
    let (code, events, _) = p.run_logged(&[]);
    assert_eq!(code, 0);
    assert_eq!(started(&events), Vec::<String>::new());

    // From an empty store the training runs again and gives the same bytes: the lockfile holds.
    std::fs::remove_dir_all(p.path(".pipeline")).unwrap();
    let (code, events, out) = p.run_logged(&["--locked"]);
    assert_eq!(code, 0, "retraining reproduces the model: {}\n{}", text(&out.stdout), text(&out.stderr));
    assert!(started(&events).contains(&"tuned".to_string()));

    // The merged model as a catalog model in Hugging Face form: a local directory, and a pinned
    // repository in a Hugging Face cache. Same weights, same answers.
    let trained_dir = catalog_dir_of(model);
    let local = p.path("../models/tuned");
    std::fs::create_dir_all(&local).unwrap();
    for name in files.keys() {
        std::fs::copy(trained_dir.join(name), local.join(name)).unwrap();
    }
    // A file the catalog does not pin is not read: this one would break the chat template.
    std::fs::write(local.join("chat_template.json"), r#"{"chat_template": "{{ broken"}"#).unwrap();
    let hub = p.path("../hf-cache");
    let revision = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = hub.join("models--someone--smol-tuned/snapshots").join(revision);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(hub.join("models--someone--smol-tuned/blobs")).unwrap();
    for (name, sha) in files {
        let blob = hub.join("models--someone--smol-tuned/blobs").join(sha.as_str().unwrap());
        std::fs::copy(trained_dir.join(name), &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snapshot.join(name)).unwrap();
    }
    let pins: String = files.iter().map(|(k, v)| format!("\"{k}\" = \"{}\"\n", v.as_str().unwrap())).collect();
    let catalog = format!(
        "{}\n[[model]]\nid = \"tuned-dir\"\nfamily = \"SmolLM2\"\ndeveloper = \"us\"\norigin = \"US\"\nparams_total_b = 0.135\nparams_active_b = 0.135\nlicense = \"Apache-2.0\"\n\
         [[model.source]]\nkind = \"local_dir\"\npath = \"../models/tuned\"\n[model.source.files]\n{pins}\n\
         [[model]]\nid = \"tuned-hub\"\nfamily = \"SmolLM2\"\ndeveloper = \"us\"\norigin = \"US\"\nparams_total_b = 0.135\nparams_active_b = 0.135\nlicense = \"Apache-2.0\"\n\
         [[model.source]]\nkind = \"hugging_face\"\nrepo = \"someone/smol-tuned\"\nrevision = \"{revision}\"\n[model.source.files]\n{pins}",
        p.read("../catalogs/open-models.toml")
    );
    p.write("../catalogs/open-models.toml", &catalog);
    let toml = p.read("select.toml").replace("models = [\"smollm2-135m-instruct\"]", "models = [\"tuned-dir\", \"tuned-hub\"]").replace("needs = [\"rendered\", \"tuned\"]", "needs = [\"rendered\"]");
    p.write("select.toml", &toml);
    let run_with_cache = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
            .args(["run", "select.toml"])
            .current_dir(&p.dir)
            .env("HF_HUB_CACHE", &hub)
            .env("HF_HUB_OFFLINE", "1")
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    };
    // A pinned file that changed is refused, never run.
    let generation = local.join("generation_config.json");
    let pinned = std::fs::read(&generation).unwrap();
    std::fs::write(&generation, r#"{"eos_token_id": 5}"#).unwrap();
    let out = run_with_cache();
    assert!(!out.status.success() && text(&out.stdout).contains("sha256 mismatch for") && text(&out.stdout).contains("generation_config.json"), "{}", text(&out.stdout));
    std::fs::write(&generation, pinned).unwrap();
    let out = run_with_cache();
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(answers_of(&p, "tuned-dir"), trained, "the local directory answers as the trained candidate");
    assert_eq!(answers_of(&p, "tuned-hub"), trained, "the Hugging Face cache answers as the trained candidate");
    let lock = p.read("select.lock");
    assert!(lock.contains("file model.safetensors"), "{lock}");
    assert!(lock.contains(&format!("Hugging Face someone/smol-tuned at {revision}")), "{lock}");

    // The adapter, brought back as one trained elsewhere: merged into the base, it is the
    // trained model, byte for byte, and answers as it does.
    let copied = p.path("../adapters/elsewhere");
    std::fs::create_dir_all(&copied).unwrap();
    for name in adapter.keys() {
        std::fs::copy(trained_dir.join("adapter").join(name), copied.join(name)).unwrap();
    }
    let toml = p.read("select.toml").replace("needs = [\"rendered\"]", "needs = [\"rendered\", \"imported\"]")
        + "\n[stages.imported]\nkind = \"finetune\"\ncatalog = \"../catalogs/open-models.toml\"\nbase = \"smollm2-135m-instruct\"\nid = \"imported\"\nadapter = \"../adapters/elsewhere\"\n";
    p.write("select.toml", &toml);
    let out = run_with_cache();
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
    let imported: Value = serde_json::from_slice(&p.run(&["show", "select.toml", "imported"]).stdout).unwrap();
    let imported = &imported["models"][0];
    assert_eq!((imported["method"].as_str(), imported["steps"].as_u64()), (Some("lora-import"), Some(0)));
    assert_eq!(imported["weights_sha256"], model["weights_sha256"], "merging the saved adapter gives the trained model");
    assert_eq!(&imported["adapter"], &model["adapter"]);
    assert_eq!(answers_of(&p, "imported"), trained);
    assert!(p.read("select.lock").contains("a LoRA adapter trained elsewhere into smollm2-135m-instruct"));
    // A changed adapter is a changed candidate: merged again.
    let config = copied.join("adapter_config.json");
    let mut changed: Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    changed["lora_alpha"] = (changed["lora_alpha"].as_f64().unwrap() / 2.0).into();
    std::fs::write(&config, serde_json::to_vec(&changed).unwrap()).unwrap();
    let out = run_with_cache();
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
    let again: Value = serde_json::from_slice(&p.run(&["show", "select.toml", "imported"]).stdout).unwrap();
    assert_ne!(again["models"][0]["weights_sha256"], model["weights_sha256"], "half the scale, other weights");
}

#[test]
fn training_sets_export_and_teach_preferences() {
    let p = Project::new();
    p.keep_tickets(40);
    // The base answers; its failed dev answers, clustered, become the rejected side of pairs.
    let toml = p.read("select.toml")
        + r#"
[stages.answers]
kind = "infer"
needs = ["rendered"]
catalog = "../catalogs/open-models.toml"
models = ["smollm2-135m-instruct"]
sampler = { max_tokens = 8, stop = ["\n"] }

[stages.judged]
kind = "judge"
needs = ["tickets", "answers"]
normalize = "first_label"

[stages.failures]
kind = "cluster"
needs = ["judged", "answers"]

[stages.pairs]
kind = "training_data"
needs = ["tickets", "rendered", "answers", "failures"]

[stages.preferred]
kind = "finetune"
needs = ["pairs"]
catalog = "../catalogs/open-models.toml"
base = "smollm2-135m-instruct"
method = "dpo"
max_steps = 4
learning_rate = 1e-3

[stages.preferred_answers]
kind = "infer"
needs = ["rendered", "preferred"]
catalog = "../catalogs/open-models.toml"
sampler = { max_tokens = 8, stop = ["\n"] }
"#;
    p.write("select.toml", &toml);
    let (code, _, out) = p.run_logged(&[]);
    assert_eq!(code, 0, "{}\n{}", text(&out.stdout), text(&out.stderr));

    let set: Value = serde_json::from_slice(&p.run(&["show", "select.toml", "pairs"]).stdout).unwrap();
    let dataset: Value = serde_json::from_slice(&p.run(&["show", "select.toml", "tickets"]).stdout).unwrap();
    let dev: Vec<&Value> = dataset["samples"].as_array().unwrap().iter().filter(|s| s["split"] == "dev").collect();
    let (sft, dpo) = (set["sft"].as_array().unwrap(), set["dpo"].as_array().unwrap());
    assert_eq!(sft.len(), dev.len());
    assert!(dpo.len() >= 8, "the base fails most dev tickets: {set}");
    for pair in dpo {
        let sample = dev.iter().find(|s| s["id"] == pair["id"]).expect("pairs are of dev samples");
        assert_eq!(pair["chosen"], sample["label"]);
        assert_ne!(pair["rejected"], pair["chosen"]);
    }

    // Exports in the hosted APIs' shapes, one line per example.
    for (format, n) in [("sft", sft.len()), ("dpo", dpo.len())] {
        let path = p.path(&format!("{format}.jsonl"));
        let out = p.run(&["export", "select.toml", "pairs", "--format", format, "-o", path.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let lines: Vec<Value> = std::fs::read_to_string(&path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), n);
        if format == "sft" {
            let last = lines[0]["messages"].as_array().unwrap().last().unwrap();
            assert_eq!((last["role"].as_str(), last["content"].as_str()), (Some("assistant"), dev[0]["label"].as_str()));
        } else {
            assert_eq!(lines[0]["preferred_output"][0]["content"], dpo[0]["chosen"]);
            assert_eq!(lines[0]["non_preferred_output"][0]["content"], dpo[0]["rejected"]);
            assert!(lines[0]["input"]["messages"].as_array().is_some_and(|m| !m.is_empty()));
        }
    }
    let out = p.run(&["export", "select.toml", "answers", "--format", "sft"]);
    assert!(!out.status.success() && text(&out.stderr).contains("is not a `training_data` stage"), "{}", text(&out.stderr));

    // DPO moved the model away from its failed answers.
    let tuned: Value = serde_json::from_slice(&p.run(&["show", "select.toml", "preferred"]).stdout).unwrap();
    let model = &tuned["models"][0];
    assert_eq!((model["method"].as_str(), model["steps"].as_u64()), (Some("lora-dpo"), Some(4)));
    assert_eq!(model["examples"].as_u64(), Some(dpo.len() as u64));
    let base = answers_of(&p, "smollm2-135m-instruct");
    let preferred = stage_answers_of(&p, "preferred_answers", "smollm2-135m-instruct+lora");
    assert_eq!(preferred.len(), base.len());
    assert_ne!(preferred, base);
}

/// This machine's model cache.
fn model_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("PIPELINE_MODEL_CACHE") {
        return PathBuf::from(dir);
    }
    std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| Path::new(&std::env::var("HOME").unwrap()).join(".cache")).join("pipeline/models")
}

/// Where the trained model of a `finetune` output lives on this machine.
fn catalog_dir_of(model: &Value) -> PathBuf {
    model_cache().join("finetuned").join(model["weights_sha256"].as_str().unwrap())
}

/// Polls `f` until it gives something, or `limit` passes.
fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}
