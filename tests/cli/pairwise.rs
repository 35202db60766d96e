//! Pairwise judging (`llm_judge`'s `pairwise`): SmolLM2 as the judge compares each answer with
//! the sample's reference answer, in both orders; a verdict that changes with the order is a tie,
//! counted apart. On a task of its own: define a word in one sentence.

use serde_json::Value;

use crate::{Project, items, text};

const WORDS: [(&str, &str); 6] = [
    ("kettle", "A kettle is a pot with a spout and a handle for boiling water."),
    ("harbor", "A harbor is a sheltered stretch of water where ships can anchor."),
    ("glacier", "A glacier is a slow-moving mass of ice formed from packed snow."),
    ("orchard", "An orchard is a piece of land planted with fruit trees."),
    ("compass", "A compass is an instrument whose needle points north."),
    ("pebble", "A pebble is a small stone made smooth by water."),
];

const RUBRIC: &str = r#"task = "Each answer defines a word in one sentence."
pass = ["the definition is correct", "it is one sentence"]
fail = ["the definition is wrong or about another word", "it rambles"]
template = """Word: {{ input.word }}
{{ answer }}"""
max_reasoning_chars = 100

[failure_modes.wrong]
description = "defines the word wrongly"
fix = "Ask for the word's common meaning."
"#;

/// The definitions task up to SmolLM2's answers, as stages of a pipeline file.
pub(crate) const WORD_STAGES: &str = r#"[stages.words]
kind = "dataset"
path = "words.jsonl"
label = "definition"
heldout = 0.5

[stages.prompt]
kind = "prompt"
template = "word.j2"

[stages.rendered]
kind = "render"
needs = ["words", "prompt"]

[stages.answers]
kind = "infer"
needs = ["rendered"]
catalog = "../catalogs/open-models.toml"
models = ["smollm2-135m-instruct"]
sampler = { max_tokens = 24, stop = ["\n"] }
"#;

/// Writes the definitions task's files (the words, the template, the rubric) into `p`; its
/// stages are [`WORD_STAGES`].
pub(crate) fn write_definitions(p: &Project) {
    let data: String = WORDS.iter().enumerate().map(|(i, (word, def))| format!("{{\"id\": \"w{i}\", \"word\": \"{word}\", \"definition\": \"{def}\"}}\n")).collect();
    p.write("words.jsonl", &data);
    p.write("word.j2", "Define the word \"{{ word }}\" in one sentence.");
    p.write("definitions.toml", RUBRIC);
}

fn pipeline(against: &str) -> String {
    format!(
        r#"description = "Definitions, compared in pairs with reference definitions"
seed = 11

{WORD_STAGES}
[stages.compared]
kind = "llm_judge"
needs = ["words", "answers"]
catalog = "../catalogs/open-models.toml"
model = "smollm2-135m-instruct"
rubric = "definitions.toml"
sampler = {{ max_tokens = 64 }}
bootstrap = 100
pairwise = {{ against = "{against}" }}

[targets]
from = "compared"
win_rate = {{ min = 0 }}
"#
    )
}

#[test]
fn pairs_are_judged_in_both_orders_and_a_flip_is_a_tie() {
    let p = Project::new();
    write_definitions(&p);
    p.write("words.toml", &pipeline("reference"));
    let (code, events, out) = p.run_logged_on("words.toml", &[]);
    assert_eq!(code, 0, "{}{}", text(&out.stdout), text(&out.stderr));
    let show = |stage: &str| -> Value { serde_json::from_slice(&p.run(&["show", "words.toml", stage]).stdout).unwrap() };
    let answers = show("answers");
    let texts: Vec<&str> = answers["models"]["smollm2-135m-instruct"]["answers"].as_array().unwrap().iter().map(|a| a["text"].as_str().unwrap()).collect();
    let differing = texts.iter().zip(WORDS).filter(|(t, (_, def))| t.trim() != *def).count();
    // Two calls per pair whose texts differ, one in each order.
    let calls = items(&events).into_iter().filter(|i| i.starts_with("compared/")).collect::<Vec<_>>();
    assert_eq!(calls.len(), 2 * differing, "{calls:?}");
    assert!(calls.iter().all(|c| c.ends_with("/1") || c.ends_with("/2")), "{calls:?}");

    let judged = show("compared");
    assert_eq!(judged["task"], "pairwise");
    let model = &judged["models"]["smollm2-135m-instruct"];
    let mut seen = 0;
    for (split, scores) in model["splits"].as_object().unwrap() {
        let s = &scores["pairwise"];
        assert_eq!(s["against"], "reference");
        let count = |k: &str| s[k].as_u64().unwrap() as usize;
        assert_eq!(count("wins") + count("losses") + count("ties") + count("inconsistent") + count("unscored"), scores["n"].as_u64().unwrap() as usize, "{split}: {s:#}");
        let scored = (count("wins") + count("losses") + count("ties") + count("inconsistent")) as f64;
        let rate = (count("wins") as f64 + (count("ties") + count("inconsistent")) as f64 / 2.0) / scored;
        assert!((s["win_rate"]["value"].as_f64().unwrap() - rate).abs() < 1e-3, "{split}: {s:#}");
        seen += scores["n"].as_u64().unwrap();
    }
    assert_eq!(seen, 6);
    // Each verdict's outcome follows from what the judge said in each order (the candidate's
    // answer is `A` in the first, `B` in the second).
    for v in model["verdicts"].as_array().unwrap() {
        let pair = &v["pairwise"];
        let expected = match (pair["first"].as_str(), pair["second"].as_str()) {
            (None, None) if v["unscored"].is_null() => "tie",
            (Some("A"), Some("B")) => "win",
            (Some("B"), Some("A")) => "loss",
            (Some("tie"), Some("tie")) => "tie",
            (Some(_), Some(_)) => "inconsistent",
            _ => "unscored",
        };
        assert_eq!(pair["outcome"], expected, "{v:#}");
        assert_eq!(v["pass"], match expected { "win" => Value::Bool(true), "loss" => Value::Bool(false), _ => Value::Null }, "{v:#}");
    }
    assert!(judged["metrics"]["win_rate"].is_number(), "{:#}", judged["metrics"]);

    // Against a candidate that is not in the answers: a clear error at run time.
    p.write("words.toml", &pipeline("tinyllama"));
    let (code, _, out) = p.run_logged_on("words.toml", &[]);
    assert_eq!(code, 1);
    let said = text(&out.stdout) + &text(&out.stderr);
    assert!(said.contains("`pairwise.against = \"tinyllama\"`: no such candidate in the answers (they are `smollm2-135m-instruct`; or `reference`)"), "{said}");
}
