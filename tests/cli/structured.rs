//! Structured answers judged by value (`judge` with `normalize = "json"`), on the real model:
//! the shipped `extract.toml` (hours and minutes out of a short note, the answer constrained to a
//! JSON Schema), its verdicts checked against a comparison of values made here, independently.

use serde_json::Value;

use crate::{Project, text};

/// The model's answer and the reference, both parsed here: is each field equal as a number?
fn fields_right(answer: &Value, reference: &Value) -> (bool, bool) {
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
    let right = |k: &str| num(answer, k).is_some() && num(answer, k) == num(reference, k);
    (right("hours"), right("minutes"))
}

#[test]
fn json_answers_are_judged_by_value_field_by_field() {
    let p = Project::new();
    // Four notes of each form (two held out per form).
    let notes: Vec<Value> = p.read("data/durations.jsonl").lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let kept: String = ["spelled", "short", "minutes_only", "words"]
        .iter()
        .flat_map(|form| notes.iter().filter(move |n| n["form"] == *form).take(4))
        .map(|n| format!("{n}\n"))
        .collect();
    p.write("data/durations.jsonl", &kept);
    let out = p.run(&["run", "extract.toml"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let show = |stage: &str| -> Value { serde_json::from_slice(&p.run(&["show", "extract.toml", stage]).stdout).unwrap() };
    let answers = show("answers");
    let judge = show("judge");
    assert_eq!(judge["normalize"], "json");
    let model = &judge["models"]["smollm2-135m-instruct"];
    let verdicts = model["verdicts"].as_array().unwrap();
    assert_eq!(verdicts.len(), 16);
    let reference_of = |id: &str| -> Value { notes.iter().find(|n| n["id"] == id).unwrap()["expected"].clone() };
    let (mut passed_across_key_order, mut failed) = (0, 0);
    for v in verdicts {
        let id = v["id"].as_str().unwrap();
        let answer_text = answers["models"]["smollm2-135m-instruct"]["answers"].as_array().unwrap().iter().find(|a| a["id"] == id).unwrap()["text"].as_str().unwrap().to_string();
        assert_eq!(v["answer"], answer_text.as_str());
        // Constrained to the schema: every answer is JSON with both fields.
        let answer: Value = serde_json::from_str(&answer_text).unwrap_or_else(|e| panic!("not JSON ({e}): {answer_text}"));
        let reference = reference_of(id);
        let (hours, minutes) = fields_right(&answer, &reference);
        assert_eq!(v["pass"], hours && minutes, "{v:#}");
        if hours && minutes {
            assert!(v["failure_mode"].is_null(), "{v:#}");
            // The case: a string comparison fails when the keys come in another order.
            let first_key = |v: &Value| v.as_object().unwrap().keys().next().unwrap().clone();
            if first_key(&answer) != first_key(&reference) {
                passed_across_key_order += 1;
            }
        } else {
            failed += 1;
            let wrong: Vec<&str> = [("hours", hours), ("minutes", minutes)].iter().filter(|(_, r)| !r).map(|(k, _)| *k).collect();
            let mode = format!("{}_wrong", wrong.join("+"));
            assert_eq!(v["failure_mode"], mode.as_str(), "{v:#}");
            assert!(judge["failure_modes"][&mode]["description"].as_str().unwrap().contains(&format!("`{}`", wrong[0])), "{judge:#}");
        }
    }
    // Per split: the pass rate and each field's accuracy are the shares counted here.
    for split in ["dev", "heldout"] {
        let mine: Vec<&Value> = verdicts.iter().filter(|v| v["split"] == split).collect();
        let s = &model["splits"][split];
        let share = |f: &dyn Fn(&Value) -> bool| ((mine.iter().filter(|v| f(v)).count() as f64 / mine.len() as f64) * 1e6).round() / 1e6;
        assert_eq!(s["accuracy"]["value"].as_f64().unwrap(), share(&|v| v["pass"] == true), "{s:#}");
        assert_eq!(s["unparsed"], 0);
        for (field, k) in [("hours", 0), ("minutes", 1)] {
            let right = |v: &Value| {
                let r = fields_right(&serde_json::from_str(v["answer"].as_str().unwrap()).unwrap(), &reference_of(v["id"].as_str().unwrap()));
                if k == 0 { r.0 } else { r.1 }
            };
            assert_eq!(s["fields"][field]["accuracy"]["value"].as_f64().unwrap(), share(&right), "{field} in {split}: {s:#}");
            let [lo, hi] = [0, 1].map(|i| s["fields"][field]["accuracy"]["ci95"][i].as_f64().unwrap());
            assert!(lo <= s["fields"][field]["accuracy"]["value"].as_f64().unwrap() && s["fields"][field]["accuracy"]["value"].as_f64().unwrap() <= hi, "{s:#}");
        }
        assert_eq!((s["fields"]["hours"]["match"].as_str(), s["fields"]["minutes"]["match"].as_str()), (Some("exact"), Some("numeric")));
    }
    assert!(passed_across_key_order > 0, "no right answer had its keys in another order than its reference: {verdicts:#?}");
    assert_eq!(judge["metrics"]["accuracy"], model["splits"]["heldout"]["accuracy"]["value"]);
    // `cluster` files the failed dev answers under the fields they got wrong.
    let clusters = show("failures");
    let dev_failed = verdicts.iter().filter(|v| v["split"] == "dev" && v["pass"] == false).count();
    let modes = clusters["models"]["smollm2-135m-instruct"]["clusters"].as_array().unwrap();
    assert_eq!(modes.iter().map(|m| m["size"].as_u64().unwrap() as usize).sum::<usize>(), dev_failed, "{clusters:#}");
    assert!(modes.iter().all(|m| m["name"].as_str().unwrap().ends_with(" wrong")), "{clusters:#}");
    // The report has each field's accuracy.
    let report = p.read(".pipeline/reports/extract/report.md");
    let hours = &model["splits"]["heldout"]["fields"]["hours"]["accuracy"]["value"].as_f64().unwrap();
    assert!(report.contains(&format!("| smollm2-135m-instruct | heldout | `hours` | exact | {hours:.3} [")), "{report}");
    println!("{failed} of 16 answers failed; {passed_across_key_order} right with the keys in another order");
}

/// A field as CSV / TSV quotes it: always quoted, quotes doubled.
fn quoted(v: &str) -> String {
    format!("\"{}\"", v.replace('"', "\"\""))
}

/// Six tickets answered by SmolLM2 and judged, for a golden set written another way to be
/// compared with: the project, and the dataset and judgement as `show` prints them.
fn answered_tickets() -> (Project, Vec<u8>, Vec<u8>) {
    let p = Project::new();
    p.keep_tickets(6);
    p.write(
        "select.toml",
        &(p.read("select.toml")
            + "\n[stages.answers]\nkind = \"infer\"\nneeds = [\"rendered\"]\ncatalog = \"../catalogs/open-models.toml\"\nmodels = [\"smollm2-135m-instruct\"]\nsampler = { max_tokens = 6, stop = [\"\\n\"] }\n"
            + "\n[stages.judge]\nkind = \"judge\"\nneeds = [\"tickets\", \"answers\"]\nbootstrap = 50\n"),
    );
    let (code, _, out) = p.run_logged(&[]);
    assert_eq!(code, 0, "{}{}", text(&out.stdout), text(&out.stderr));
    let dataset = p.run(&["show", "select.toml", "tickets"]).stdout;
    let judged = p.run(&["show", "select.toml", "judge"]).stdout;
    (p, dataset, judged)
}

/// The same golden set as CSV and as TSV is the same dataset: the `dataset` stage reruns on the
/// new file and its output is byte for byte the JSON lines' one, so nothing after it reruns — the
/// real model's answers stay memoized.
#[test]
fn csv_and_tsv_golden_sets_are_the_same_dataset_as_json_lines() {
    let (p, dataset, judged) = answered_tickets();
    let tickets: Vec<Value> = p.read("data/tickets.jsonl").lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // A header row; a byte-order mark and Windows line ends on the CSV, as a spreadsheet writes it.
    let row = |t: &Value, sep: &str| ["id", "text", "intent"].map(|k| quoted(t[k].as_str().unwrap())).join(sep);
    let csv: String = std::iter::once("\u{feff}id,text,intent".to_string()).chain(tickets.iter().map(|t| row(t, ","))).map(|l| l + "\r\n").collect();
    let tsv: String = std::iter::once("id\ttext\tintent".to_string()).chain(tickets.iter().map(|t| row(t, "\t"))).map(|l| l + "\n").collect();
    p.write("data/tickets.csv", &csv);
    p.write("data/tickets.tsv", &tsv);
    for file in ["data/tickets.csv", "data/tickets.tsv"] {
        p.write("select.toml", &p.read("select.toml").replace("data/tickets.jsonl", file).replace("data/tickets.csv", file));
        let (code, events, out) = p.run_logged(&[]);
        assert_eq!(code, 0, "{file}: {}{}", text(&out.stdout), text(&out.stderr));
        assert_eq!(crate::started(&events), ["tickets"], "{file}: only the dataset reruns");
        assert_eq!(p.run(&["show", "select.toml", "tickets"]).stdout, dataset, "{file}");
        assert_eq!(p.run(&["show", "select.toml", "judge"]).stdout, judged, "{file}");
    }
    // A row with a value too few is located like a bad JSON line.
    p.write("data/tickets.tsv", &(tsv + "t999\tonly two values\n"));
    let out = p.run(&["validate", "select.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("line 8 has 2 values; the header row names 3 columns") && stderr.contains("data/tickets.tsv:8:1"), "{stderr}");
}

/// The same golden set as Hugging Face `datasets` writes it — Parquet (`to_parquet`, Snappy),
/// Parquet with Zstandard, and the Arrow IPC stream shard of `save_to_disk` (fixtures made by
/// `tests/cli/fixtures/make_tables.py`) — is the same dataset as the JSON lines: only the
/// `dataset` stage reruns, and the real model's answers stay memoized. A row without an id is
/// named by its row.
#[test]
fn parquet_and_arrow_golden_sets_from_datasets_are_the_same_dataset_as_json_lines() {
    let (p, dataset, judged) = answered_tickets();
    let fixtures = crate::root().join("tests/cli/fixtures");
    let mut current = "data/tickets.jsonl".to_string();
    for file in ["tickets.parquet", "tickets.zstd.parquet", "tickets.arrow"] {
        std::fs::copy(fixtures.join(file), p.path(&format!("data/{file}"))).unwrap();
        let next = format!("data/{file}");
        p.write("select.toml", &p.read("select.toml").replace(&current, &next));
        current = next;
        let out = p.run(&["validate", "select.toml"]);
        assert!(out.status.success(), "{file}: {}", text(&out.stderr));
        let (code, events, out) = p.run_logged(&[]);
        assert_eq!(code, 0, "{file}: {}{}", text(&out.stdout), text(&out.stderr));
        assert_eq!(crate::started(&events), ["tickets"], "{file}: only the dataset reruns");
        assert_eq!(p.run(&["show", "select.toml", "tickets"]).stdout, dataset, "{file}");
        assert_eq!(p.run(&["show", "select.toml", "judge"]).stdout, judged, "{file}");
    }
    std::fs::copy(fixtures.join("no_id.parquet"), p.path("data/no_id.parquet")).unwrap();
    p.write("select.toml", &p.read("select.toml").replace(&current, "data/no_id.parquet"));
    let out = p.run(&["validate", "select.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("bad sample in `data/no_id.parquet`: row 3: id field `id` must be a string or number, found null"), "{stderr}");
    // Not a Parquet file at all: said so, at validate.
    p.write("data/no_id.parquet", "id,text\n");
    let stderr = text(&p.run(&["validate", "select.toml"]).stderr);
    assert!(stderr.contains("the file cannot be read as Parquet"), "{stderr}");
}
