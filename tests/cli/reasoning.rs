//! Reasoning models (`infer`'s `think`): the reasoning is taken out of each answer before it is
//! judged, kept beside it, and its tokens counted apart. SmolLM2 does not reason by itself, so a
//! regular expression makes it write `<think>…</think>` before its label: the real model's
//! tokens, in the shape a reasoning model's answers have.

use serde_json::Value;

use crate::{INTENTS, Project, text};

#[test]
fn reasoning_is_kept_apart_from_the_judged_answer_and_counted() {
    let p = Project::new();
    p.keep_tickets(6);
    let regex = format!("<think>[a-z ]{{8,60}}</think>({})", INTENTS.join("|"));
    let answers = format!(
        "\n[stages.answers]\nkind = \"infer\"\nneeds = [\"rendered\"]\ncatalog = \"../catalogs/open-models.toml\"\nmodels = [\"smollm2-135m-instruct\"]\nsampler = {{ max_tokens = 48 }}\noutput = {{ regex = \"{regex}\" }}\n"
    );
    let judge = "\n[stages.judge]\nkind = \"judge\"\nneeds = [\"tickets\", \"answers\"]\nnormalize = \"exact\"\nbootstrap = 50\n";
    // First without `think`: the whole text, tags and all, is the answer, and no label reads it exactly.
    p.write("select.toml", &(p.read("select.toml") + &answers + judge));
    let (code, _, out) = p.run_logged(&[]);
    assert_eq!(code, 0, "{}{}", text(&out.stdout), text(&out.stderr));
    let show = |stage: &str| -> Value { serde_json::from_slice(&p.run(&["show", "select.toml", stage]).stdout).unwrap() };
    let raw = show("answers");
    let whole: Vec<String> = raw["models"]["smollm2-135m-instruct"]["answers"].as_array().unwrap().iter().map(|a| a["text"].as_str().unwrap().to_string()).collect();
    assert!(whole.iter().all(|t| t.starts_with("<think>") && t.contains("</think>")), "{whole:?}");
    assert_eq!(show("judge")["models"]["smollm2-135m-instruct"]["splits"]["dev"]["unparsed"], show("judge")["models"]["smollm2-135m-instruct"]["splits"]["dev"]["n"]);

    // With `think`: the same generations (a new key, the same tokens), the label judged alone.
    p.write("select.toml", &p.read("select.toml").replace("sampler = { max_tokens = 48 }", "sampler = { max_tokens = 48 }\nthink = \"think\""));
    let (code, _, out) = p.run_logged(&[]);
    assert_eq!(code, 0, "{}{}", text(&out.stdout), text(&out.stderr));
    let answers = show("answers");
    let m = &answers["models"]["smollm2-135m-instruct"];
    let mut reasoning_total = 0;
    for (a, before) in m["answers"].as_array().unwrap().iter().zip(&whole) {
        let (text, reasoning) = (a["text"].as_str().unwrap(), a["reasoning"].as_str().unwrap());
        assert!(INTENTS.contains(&text), "{a:#}");
        let before = before.trim();
        assert!(before.starts_with("<think>") && before.contains(reasoning) && before.ends_with(&format!("</think>{text}")), "the text and its reasoning are the generation, split: {a:#} from {before:?}");
        // Counted by the model's tokenizer: about a token per short word, never more than all.
        let tokens = a["reasoning_tokens"].as_u64().unwrap() as usize;
        let words = reasoning.split_whitespace().count();
        assert!(tokens >= words.div_ceil(3) && tokens < a["completion_tokens"].as_u64().unwrap() as usize, "{tokens} tokens for {words} words: {a:#}");
        reasoning_total += tokens;
    }
    let completion: u64 = m["answers"].as_array().unwrap().iter().map(|a| a["completion_tokens"].as_u64().unwrap()).sum();
    assert_eq!(m["reasoning"]["answers"], 6);
    assert_eq!(m["reasoning"]["reasoning_tokens"].as_u64().unwrap() as usize, reasoning_total);
    assert_eq!(m["reasoning"]["answer_tokens"].as_u64().unwrap(), completion - reasoning_total as u64);
    let judge = show("judge");
    // Each stripped answer is read exactly as the label it is (unparsed only where the label is
    // none of the references').
    let labels: Vec<&str> = judge["labels"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    for v in judge["models"]["smollm2-135m-instruct"]["verdicts"].as_array().unwrap() {
        let answer = v["answer"].as_str().unwrap();
        assert!(!answer.contains("<think>"), "the judge saw the reasoning: {v:#}");
        let read = if labels.contains(&answer) { Value::from(answer) } else { Value::Null };
        assert_eq!(v["predicted"], read, "{v:#}");
    }
    // A tag that is not a name is refused at validate.
    p.write("select.toml", &p.read("select.toml").replace("think = \"think\"", "think = \"<think>\""));
    let out = p.run(&["validate", "select.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("is not a tag name"), "{}", text(&out.stderr));
}
