//! Multi-turn samples (`render`'s `conversation`): each sample holds a conversation and the model
//! answers its last user turn, with the earlier turns as context. On a task of its own: counting
//! things over a short conversation.

use serde_json::{Value, json};

use crate::{Project, text};

fn pipeline(conversation: &str) -> String {
    format!(
        r#"description = "Counting over a conversation"
seed = 2

[stages.chats]
kind = "dataset"
path = "chats.jsonl"
label = "count"
heldout = 0.5

[stages.prompt]
kind = "prompt"
template = "turn.j2"
system = "You keep count of things. Answer with a number only."

[stages.rendered]
kind = "render"
needs = ["chats", "prompt"]
conversation = "{conversation}"

[stages.answers]
kind = "infer"
needs = ["rendered"]
catalog = "../catalogs/open-models.toml"
models = ["smollm2-135m-instruct"]
sampler = {{ max_tokens = 4, stop = ["\n"] }}

[stages.judge]
kind = "judge"
needs = ["chats", "answers"]
bootstrap = 50
"#
    )
}

fn chat(id: &str, have: u32, more: u32) -> Value {
    json!({
        "id": id,
        "count": (have + more).to_string(),
        "turns": [
            {"role": "user", "content": format!("I have {have} apples.")},
            {"role": "assistant", "content": format!("You have {have} apples.")},
            {"role": "user", "content": format!("I buy {more} more apples. How many apples do I have now?")},
        ],
    })
}

#[test]
fn the_model_answers_the_last_turn_of_each_conversation() {
    let p = Project::new();
    let chats = [chat("c1", 2, 1), chat("c2", 3, 3), chat("c3", 1, 4), chat("c4", 5, 2), chat("c5", 4, 4), chat("c6", 6, 1)];
    p.write("chats.jsonl", &chats.iter().map(|c| format!("{c}\n")).collect::<String>());
    p.write("turn.j2", "{{ prompt }} Answer with a number.");
    p.write("chats.toml", &pipeline("turns"));
    let (code, _, out) = p.run_logged_on("chats.toml", &[]);
    assert_eq!(code, 0, "{}{}", text(&out.stdout), text(&out.stderr));
    let show = |stage: &str| -> Value { serde_json::from_slice(&p.run(&["show", "chats.toml", stage]).stdout).unwrap() };
    let rendered = show("rendered");
    let first = &rendered["samples"][0];
    assert_eq!(
        first["messages"],
        json!([
            {"role": "system", "content": "You keep count of things. Answer with a number only."},
            {"role": "user", "content": "I have 2 apples."},
            {"role": "assistant", "content": "You have 2 apples."},
            {"role": "user", "content": "I buy 1 more apples. How many apples do I have now? Answer with a number."},
        ]),
        "{first:#}"
    );
    // The model answered the last turn (a number or words, read against the references).
    let answers = show("answers");
    let all = answers["models"]["smollm2-135m-instruct"]["answers"].as_array().unwrap();
    assert_eq!(all.len(), 6);
    assert!(all.iter().all(|a| a["prompt_tokens"].as_u64().unwrap() > 40), "the earlier turns reach the model: {all:#?}");
    assert!(show("judge")["models"]["smollm2-135m-instruct"]["splits"]["heldout"]["accuracy"]["value"].is_number());

    // A conversation that does not end with a user turn is an error naming it.
    let mut bad = chats.to_vec();
    bad[0]["turns"].as_array_mut().unwrap().pop();
    p.write("chats.jsonl", &bad.iter().map(|c| format!("{c}\n")).collect::<String>());
    let (code, _, out) = p.run_logged_on("chats.toml", &[]);
    assert_eq!(code, 1);
    let said = text(&out.stdout) + &text(&out.stderr);
    assert!(said.contains("the last turn of `turns` is `assistant`'s: a conversation ends with the user turn the model answers"), "{said}");

    // A field no sample has is caught at validate.
    p.write("chats.toml", &pipeline("turnz"));
    let out = p.run(&["validate", "chats.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("`conversation = \"turnz\"`: no sample of the dataset has that field") && stderr.contains("did you mean `turns`?"), "{stderr}");
}
