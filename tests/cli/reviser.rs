//! A model that revises (`revise`'s `reviser`): SmolLM2 writes the rules of the next prompt
//! version from the failure modes and their dev examples, and the revision is accepted or
//! rejected on held-out samples as a rule-based one is. On a task of its own: is a number even or
//! odd?

use serde_json::Value;

use crate::{Project, items, text};

fn pipeline() -> String {
    r#"description = "Parity: is a number even or odd?"
seed = 3

[stages.numbers]
kind = "dataset"
path = "numbers.jsonl"
label = "parity"
heldout = 0.5

[stages.prompt]
kind = "prompt"
template = "number.j2"
system = "You answer questions about numbers."

[stages.rendered]
kind = "render"
needs = ["numbers", "prompt"]

[stages.answers]
kind = "infer"
needs = ["rendered"]
catalog = "../catalogs/open-models.toml"
models = ["smollm2-135m-instruct"]
sampler = { max_tokens = 6, stop = ["\n"] }

[stages.judge]
kind = "judge"
needs = ["numbers", "answers"]
bootstrap = 100

[stages.failures]
kind = "cluster"
needs = ["judge", "answers"]

[stages.revise]
kind = "revise"
needs = ["prompt", "failures", "judge", "numbers", "rendered"]
reviser = { catalog = "../catalogs/open-models.toml", model = "smollm2-135m-instruct", max_tokens = 96 }

[iterate]
max_iterations = 2
feedback = { from = "revise", to = "prompt" }
"#
    .to_string()
}

#[test]
fn a_model_writes_the_rules_and_the_held_out_check_decides() {
    let p = Project::new();
    let data: String = [17, 42, 9, 130, 77, 58, 3, 96, 21, 64, 35, 88, 11, 250, 49, 6, 73, 14, 105, 32]
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{{\"id\": \"n{i:02}\", \"number\": {n}, \"parity\": \"{}\"}}\n", if n % 2 == 0 { "even" } else { "odd" }))
        .collect();
    p.write("numbers.jsonl", &data);
    p.write("number.j2", "Is {{ number }} even or odd?");
    p.write("parity.toml", &pipeline());
    let (code, events, out) = p.run_logged_on("parity.toml", &[]);
    assert_eq!(code, 0, "{}{}", text(&out.stdout), text(&out.stderr));
    let ran = items(&events);
    // One call in the first iteration; the second calls again only if a mode is left untried.
    let calls = ran.iter().filter(|i| i.starts_with("revise/")).count();
    assert!((1..=2).contains(&calls), "at most one reviser call per iteration: {ran:?}");
    let show = |stage: &str, it: u32| -> Value { serde_json::from_slice(&p.run(&["show", "parity.toml", stage, "--iteration", &it.to_string()]).stdout).unwrap() };

    // The reviser's rules are the revised prompt's, inside the raw block after the system message.
    let revised = show("revise", 1);
    let revision = &revised["revision"];
    let system = revised["system"].as_str().unwrap();
    assert!(system.starts_with("You answer questions about numbers.\n\n{% raw %}Rules learned from mistakes:\n") && system.ends_with("{% endraw %}"), "{system}");
    // Its reply is constrained to JSON whose rules fit `max_tokens`, so it is read.
    let summary = revised["summary"].as_str().unwrap();
    assert_eq!(revision["revised_by"], "smollm2-135m-instruct", "{summary}");
    assert!(summary.contains("(rules written by `smollm2-135m-instruct`)"), "{summary}");
    assert!(!system.contains("A sample like the example below"), "the rule-based rules were used: {system}");
    let targeted = revision["targeted"].as_array().unwrap();
    assert!(!targeted.is_empty(), "{revision:#}");

    // The second iteration judged the revision on held-out samples (McNemar), whoever wrote it.
    let check = &show("revise", 2)["revision"]["history"][0];
    assert_eq!(check["version"], 2, "{check:#}");
    assert!(check["p_value"].is_number() && check["accepted"].is_boolean(), "{check:#}");

    // Memoized: a rerun calls nothing, and a fresh store reproduces the lockfile.
    let (code, events, _) = p.run_logged_on("parity.toml", &[]);
    assert_eq!(code, 0);
    assert!(items(&events).is_empty(), "a rerun computes nothing");
    std::fs::remove_dir_all(p.path(".pipeline")).unwrap();
    let (code, _, out) = p.run_logged_on("parity.toml", &["--locked"]);
    assert_eq!(code, 0, "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(p.read("parity.lock").contains("smollm2-135m-instruct"), "the reviser is pinned");
}
