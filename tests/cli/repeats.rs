//! Repeats (`infer`'s `repeats`): several answers drawn per sample at a temperature, each from a
//! seed of its own in its memo key, judged together (mean, pass@k, pass^k, flaky samples). On a
//! task of its own: is a thing an animal or a vehicle? SmolLM2 at temperature 1 answers some
//! samples one way, then the other.

use serde_json::Value;

use crate::{Project, items, text};

const THINGS: [(&str, &str); 10] = [
    ("a horse", "animal"),
    ("a bicycle", "vehicle"),
    ("a sparrow", "animal"),
    ("a tractor", "vehicle"),
    ("a goldfish", "animal"),
    ("a canoe", "vehicle"),
    ("an elephant", "animal"),
    ("a scooter", "vehicle"),
    ("a rabbit", "animal"),
    ("a tram", "vehicle"),
];

fn pipeline(repeats: usize, temperature: f64, in_flight: usize) -> String {
    format!(
        r#"description = "Animal or vehicle, several answers per thing"
seed = 5

[stages.things]
kind = "dataset"
path = "things.jsonl"
label = "kind"
heldout = 0.5

[stages.prompt]
kind = "prompt"
template = "thing.j2"
system = "Answer with one word: animal or vehicle."

[stages.rendered]
kind = "render"
needs = ["things", "prompt"]

[stages.answers]
kind = "infer"
needs = ["rendered"]
catalog = "../catalogs/open-models.toml"
models = ["smollm2-135m-instruct"]
sampler = {{ max_tokens = 4, temperature = {temperature} }}
max_in_flight = {in_flight}
repeats = {repeats}

[stages.judge]
kind = "judge"
needs = ["things", "answers"]
bootstrap = 100

[targets]
from = "judge"
pass_at_n = {{ min = 0 }}
"#
    )
}

#[test]
fn repeats_draw_seeded_answers_judged_together_and_more_compute_only_the_new_ones() {
    let p = Project::new();
    let data: String = THINGS.iter().enumerate().map(|(i, (thing, kind))| format!("{{\"id\": \"t{i}\", \"thing\": \"{thing}\", \"kind\": \"{kind}\"}}\n")).collect();
    p.write("things.jsonl", &data);
    p.write("thing.j2", "Is {{ thing }} an animal or a vehicle?");
    p.write("things.toml", &pipeline(3, 1.0, 1));
    let (code, events, out) = p.run_logged_on("things.toml", &[]);
    assert_eq!(code, 0, "{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(items(&events).iter().filter(|i| i.starts_with("answers/")).count(), 30, "3 answers for each of 10 things");
    let show = |stage: &str| -> Value { serde_json::from_slice(&p.run(&["show", "things.toml", stage]).stdout).unwrap() };
    let answers = show("answers");
    let m = &answers["models"]["smollm2-135m-instruct"];
    assert_eq!(answers["repeats"], 3);
    assert_eq!((m["answers"].as_array().unwrap().len(), m["repeats"].as_array().unwrap().len()), (10, 2));
    let texts = |run: &Value| -> Vec<String> { run.as_array().unwrap().iter().map(|a| a["text"].as_str().unwrap().to_string()).collect() };
    let runs: Vec<Vec<String>> = std::iter::once(texts(&m["answers"])).chain(m["repeats"].as_array().unwrap().iter().map(texts)).collect();
    let varied = (0..10).filter(|&i| runs.iter().any(|r| r[i] != runs[0][i])).count();
    assert!(varied >= 2, "temperature 1 drew the same answer three times for nearly every thing: {runs:?}");

    let judged = show("judge");
    let model = &judged["models"]["smollm2-135m-instruct"];
    for (split, scores) in model["splits"].as_object().unwrap() {
        let r = &scores["repeats"];
        assert_eq!(r["n"], 3, "{split}: {r:#}");
        let (mean, at_n, hat_n) = (r["mean"]["value"].as_f64().unwrap(), r["pass_at_k"]["3"].as_f64().unwrap(), r["pass_hat_k"]["3"].as_f64().unwrap());
        assert!(hat_n <= mean && mean <= at_n, "{split}: pass^3 {hat_n} ≤ mean {mean} ≤ pass@3 {at_n}");
        assert_eq!(r["pass_at_k"]["1"], r["mean"]["value"], "{split}: pass@1 is the mean");
    }
    // Each verdict counts its sample's passing answers; a flaky sample passed and failed.
    let verdicts = model["verdicts"].as_array().unwrap();
    let labels: Vec<&str> = THINGS.iter().map(|t| t.1).collect();
    let mut flaky = 0;
    for (i, v) in verdicts.iter().enumerate() {
        let passes = runs.iter().filter(|r| r[i].trim().to_lowercase().split(|c: char| !c.is_alphabetic()).find(|w| labels.contains(w)) == Some(labels[i])).count();
        assert_eq!(v["repeat_passes"].as_u64().unwrap() as usize, passes, "{v:#} in {:?}", runs.iter().map(|r| &r[i]).collect::<Vec<_>>());
        flaky += usize::from(passes > 0 && passes < 3);
    }
    let counted: u64 = model["splits"].as_object().unwrap().values().map(|s| s["repeats"]["flaky"].as_u64().unwrap()).sum();
    assert_eq!(counted as usize, flaky);
    assert!(judged["metrics"]["pass_at_n"].is_number() && judged["metrics"]["flaky_rate"].is_number(), "{:#}", judged["metrics"]);

    // Two more repeats compute only the new ones; the first three are the same answers.
    p.write("things.toml", &pipeline(5, 1.0, 1));
    let (code, events, out) = p.run_logged_on("things.toml", &[]);
    assert_eq!(code, 0, "{}{}", text(&out.stdout), text(&out.stderr));
    let ran: Vec<String> = items(&events).into_iter().filter(|i| i.starts_with("answers/")).collect();
    assert_eq!(ran.len(), 20, "only repeats 4 and 5 run: {ran:?}");
    assert!(ran.iter().all(|i| i.ends_with("#4") || i.ends_with("#5")), "{ran:?}");
    let five = show("answers");
    assert_eq!(five["models"]["smollm2-135m-instruct"]["repeats"][1], m["repeats"][1]);

    // Drawn from a fresh store with four in flight: the same answers (each from its own seed).
    std::fs::remove_dir_all(p.path(".pipeline")).unwrap();
    p.write("things.toml", &pipeline(5, 1.0, 4));
    let (code, _, out) = p.run_logged_on("things.toml", &[]);
    assert_eq!(code, 0, "{}{}", text(&out.stdout), text(&out.stderr));
    let again = show("answers");
    let strip = |v: &Value| -> Vec<Vec<(String, u64)>> {
        let m = &v["models"]["smollm2-135m-instruct"];
        std::iter::once(&m["answers"]).chain(m["repeats"].as_array().unwrap()).map(|run| run.as_array().unwrap().iter().map(|a| (a["text"].as_str().unwrap().to_string(), a["completion_tokens"].as_u64().unwrap())).collect()).collect()
    };
    assert_eq!(strip(&again), strip(&five), "answers drawn again, four in flight, differ");

    // Greedy: one answer per sample counts for every repeat, and `plan` says so.
    p.write("things.toml", &pipeline(5, 0.0, 1));
    let plan = text(&p.run(&["plan", "things.toml"]).stdout);
    assert!(plan.contains("greedy decoding draws the same answer every time"), "{plan}");
    assert!(plan.contains("10 new item(s)") || plan.contains("never run"), "{plan}");
    let (code, events, out) = p.run_logged_on("things.toml", &[]);
    assert_eq!(code, 0, "{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(items(&events).iter().filter(|i| i.starts_with("answers/")).count(), 10);
    let greedy = show("judge");
    let r = &greedy["models"]["smollm2-135m-instruct"]["splits"]["heldout"]["repeats"];
    assert_eq!((r["flaky"].as_u64(), r["pass_at_k"]["5"].clone()), (Some(0), r["pass_hat_k"]["5"].clone()), "{r:#}");

    // Out of range is refused at validate.
    p.write("things.toml", &pipeline(0, 1.0, 1));
    let out = p.run(&["validate", "things.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("`repeats` is 0: it must be 1 to 100"), "{}", text(&out.stderr));
}

/// `llm_judge`'s `repeats`: three verdicts drawn per answer at temperature 0.8 (each its own
/// seed), the answer's verdict their majority, the votes kept; greedy judging draws one, and
/// `plan` says so.
#[test]
fn a_judge_draws_several_verdicts_and_the_majority_decides() {
    let p = Project::new();
    crate::pairwise::write_definitions(&p);
    let judged = |temperature: f64| {
        format!(
            r#"seed = 8

{stages}
[stages.graded]
kind = "llm_judge"
needs = ["words", "answers"]
catalog = "../catalogs/open-models.toml"
model = "smollm2-135m-instruct"
rubric = "definitions.toml"
sampler = {{ max_tokens = 64, temperature = {temperature} }}
repeats = 3
bootstrap = 50
"#,
            stages = crate::pairwise::WORD_STAGES
        )
    };
    p.write("graded.toml", &judged(0.8));
    let (code, events, out) = p.run_logged_on("graded.toml", &[]);
    assert_eq!(code, 0, "{}{}", text(&out.stdout), text(&out.stderr));
    let calls: Vec<String> = items(&events).into_iter().filter(|i| i.starts_with("graded/")).collect();
    assert_eq!(calls.len(), 18, "three verdicts for each of six answers: {calls:?}");
    let graded: Value = serde_json::from_slice(&p.run(&["show", "graded.toml", "graded"]).stdout).unwrap();
    for v in graded["models"]["smollm2-135m-instruct"]["verdicts"].as_array().unwrap() {
        let votes = v["judge_votes"].as_array().unwrap_or_else(|| panic!("{v:#}"));
        let (passes, scored) = (votes[0].as_u64().unwrap(), votes[1].as_u64().unwrap());
        assert!(passes <= scored && scored <= 3, "{v:#}");
        if scored > 0 {
            assert_eq!(v["pass"], Value::Bool(passes * 2 > scored), "the majority decides: {v:#}");
        } else {
            assert!(v["pass"].is_null() && v["unscored"].is_string(), "{v:#}");
        }
    }
    // Greedy: one verdict each, said by `plan`.
    p.write("graded.toml", &judged(0.0));
    let plan = text(&p.run(&["plan", "graded.toml"]).stdout);
    assert!(plan.contains("greedy decoding gives the same verdict every time"), "{plan}");
    let (code, events, _) = p.run_logged_on("graded.toml", &[]);
    assert_eq!(code, 0);
    assert_eq!(items(&events).iter().filter(|i| i.starts_with("graded/")).count(), 6);
}
