//! The CI gate on the real model: `run --gate` exits 5 when the targets are missed, and `check`
//! exits 6 only when a candidate's held-out quality dropped by more than chance explains — here a
//! prompt edit that drops the list of labels, checked against the base run's lockfile as the
//! GitHub Actions example does.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::{Project, text};

const MODEL: &str = "smollm2-135m-instruct";

/// Held-out pass or fail per sample of a judgement.
fn heldout(judge: &Value) -> BTreeMap<String, bool> {
    judge["models"][MODEL]["verdicts"].as_array().unwrap().iter().filter(|v| v["split"] == "heldout").map(|v| (v["id"].as_str().unwrap().to_string(), v["pass"] == true)).collect()
}

#[test]
fn the_gate_fails_on_missed_targets_and_on_a_significant_regression_only() {
    let p = Project::new();
    p.keep_tickets(100);
    let stages = "\n[stages.answers]\nkind = \"infer\"\nneeds = [\"rendered\"]\ncatalog = \"../catalogs/open-models.toml\"\nmodels = [\"smollm2-135m-instruct\"]\nprepare = \"q8_0\"\nsampler = { max_tokens = 8, stop = [\"\\n\"] }\n\
         \n[stages.judge]\nkind = \"judge\"\nneeds = [\"tickets\", \"answers\"]\nbootstrap = 200\n\
         \n[targets]\nfrom = \"judge\"\naccuracy = { min = 0.99 }\n";
    p.write("select.toml", &(p.read("select.toml") + stages));
    let run = |args: &[&str]| p.run(args);
    // Missed targets: 5 with --gate, 0 without (memoized: nothing reruns).
    let out = run(&["run", "--gate", "select.toml"]);
    assert_eq!(out.status.code(), Some(5), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stderr).contains("--gate: the targets were not met"), "{}", text(&out.stderr));
    assert_eq!(run(&["run", "select.toml"]).status.code(), Some(0));
    let before: Value = serde_json::from_slice(&run(&["show", "select.toml", "judge"]).stdout).unwrap();
    std::fs::copy(p.path("select.lock"), p.path("base.lock")).unwrap();

    // Against itself: nothing fixed, nothing broken.
    let check = |args: &[&str]| -> (i32, Value) {
        let mut all = vec!["check", "select.toml", "--json"];
        all.extend_from_slice(args);
        let out = run(&all);
        (out.status.code().unwrap(), serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}{}", text(&out.stdout), text(&out.stderr))))
    };
    let (code, same) = check(&["--baseline", "base.lock"]);
    assert_eq!(code, 0, "{same:#}");
    let c = &same["candidates"][0];
    assert_eq!((c["fixed"].as_u64(), c["broken"].as_u64(), c["verdict"].as_str()), (Some(0), Some(0), Some("improved or unchanged")), "{same:#}");
    assert_eq!(c["paired_samples"].as_u64().unwrap() as usize, heldout(&before).len());

    // The regression: a template edit that no longer lists the labels.
    p.write("prompts/classify.j2", "Ticket: {{ text }}\n\nThank the customer for writing in.\n");
    assert_eq!(run(&["run", "select.toml"]).status.code(), Some(0));
    let after: Value = serde_json::from_slice(&run(&["show", "select.toml", "judge"]).stdout).unwrap();
    let (b, a) = (heldout(&before), heldout(&after));
    let fixed = b.iter().filter(|(id, pass)| !**pass && a[*id]).count();
    let broken = b.iter().filter(|(id, pass)| **pass && !a[*id]).count();
    // The one-sided exact McNemar test, computed here: P(X ≥ broken), X ~ Binomial(fixed + broken, 1/2).
    let n = fixed + broken;
    let choose = |n: usize, k: usize| (0..k).fold(1.0f64, |acc, i| acc * (n - i) as f64 / (i + 1) as f64);
    let p_value = (broken..=n).map(|k| choose(n, k)).sum::<f64>() / 2f64.powi(n as i32);
    let (code, checked) = check(&["--baseline", "base.lock"]);
    let c = &checked["candidates"][0];
    assert_eq!((c["fixed"].as_u64(), c["broken"].as_u64()), (Some(fixed as u64), Some(broken as u64)), "{checked:#}");
    assert!((c["p_value"].as_f64().unwrap() - p_value).abs() < 1e-12, "{checked:#}");
    println!("{broken} broken, {fixed} fixed of {}: p = {p_value:.2e}", a.len());
    assert!(broken > fixed && p_value < 0.05, "the prompt edit must be a significant regression for this test: {broken} broken, {fixed} fixed, p = {p_value}");
    assert_eq!((code, c["verdict"].as_str(), checked["regressed"].as_bool()), (6, Some("regressed"), Some(true)), "{checked:#}");
    // The same drop at a stricter level is not a regression: a test, not a threshold on the figure.
    let (code, strict) = check(&["--baseline", "base.lock", "--alpha", &format!("{}", p_value / 2.0)]);
    assert_eq!((code, strict["candidates"][0]["verdict"].as_str()), (0, Some("not significant")), "{strict:#}");
    // The text a pull request's comment shows.
    let out = run(&["check", "select.toml", "--baseline", "base.lock"]);
    assert_eq!(out.status.code(), Some(6));
    let said = text(&out.stdout);
    assert!(said.contains(&format!("{broken} broken of {}", a.len())) && said.contains(": regressed") && said.contains("quality regressed"), "{said}");
    // A baseline whose judgement the store lacks (another machine's run) is refused, and says how
    // to get it.
    let lock = p.read("base.lock");
    let at = lock.find("id = \"judge\"").unwrap();
    let digest = lock[at..].split("output = \"").nth(1).unwrap()[..64].to_string();
    p.write("elsewhere.lock", &lock.replace(&digest, &"0".repeat(64)));
    let out = run(&["check", "select.toml", "--baseline", "elsewhere.lock"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("which is not in the store") && text(&out.stderr).contains("run --locked"), "{}", text(&out.stderr));
    let out = run(&["check", "select.toml", "--baseline", "base.lock", "--alpha", "2"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}
