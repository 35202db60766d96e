//! `normalize = "json"`: structured answers judged by value. Both sides are parsed — the answer
//! (its first JSON value, code fences and text around it aside) and the reference (the sample's
//! label: a JSON object or list in the dataset, or a string of JSON text) — and compared as
//! values: key order and whitespace never decide, and numbers compare as numbers (`15` is `15.0`).
//!
//! Without `fields`, an answer passes when it equals the reference; an object reference's every
//! top-level field is scored besides. With `fields`, each named field (a dotted path into
//! objects) is compared by its own rule — `exact`, `numeric` within a tolerance, or `f1` over a
//! list's items as a set — and an answer passes when every one is right. Each split gets the pass
//! rate (`accuracy`) and every field's accuracy, with bootstrap intervals; a failed answer is
//! filed under the fields it got wrong (`minutes_wrong`), so `cluster` names failure modes by
//! field.

use std::collections::{BTreeMap, BTreeSet};

use artifacts::{Answers, Dataset, FieldScores, JudgedModel, Judgement, LABEL_METRICS, RubricMode, Split, SplitScores, Verdict};
use engine::StageError;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{judgement, mean_with_interval, model_seed, proportion, verdict};

/// How one field of a structured answer is compared with the reference's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FieldRule {
    /// `exact`: equal by value (numbers as numbers, objects whatever their key order); `numeric`:
    /// both numbers, at most `tolerance` apart; `f1`: both lists, scored by the F1 of the answer's
    /// items against the reference's as sets (right when it is 1).
    #[serde(rename = "match", default)]
    pub rule: Match,
    /// `numeric`: the largest difference that is still right (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Match {
    #[default]
    Exact,
    Numeric,
    F1,
}

impl Match {
    fn as_str(self) -> &'static str {
        match self {
            Match::Exact => "exact",
            Match::Numeric => "numeric",
            Match::F1 => "f1",
        }
    }
}

/// Problems with `fields` as written, each a message (the caller locates them).
pub fn check_fields(fields: &BTreeMap<String, FieldRule>) -> Vec<String> {
    let mut problems = Vec::new();
    for (path, rule) in fields {
        if path.is_empty() || path.split('.').any(str::is_empty) {
            problems.push(format!("field path `{path}` is not a dotted path of field names (`minutes`, `time.minutes`)"));
        }
        match (rule.rule, rule.tolerance) {
            (Match::Numeric, Some(t)) if !(t.is_finite() && t >= 0.0) => problems.push(format!("field `{path}`: `tolerance` must be a number of at least 0, not {t}")),
            (Match::Exact | Match::F1, Some(_)) => {
                problems.push(format!("field `{path}`: `tolerance` applies to `match = \"numeric\"` only, not `{}`", rule.rule.as_str()))
            }
            _ => {}
        }
    }
    problems
}

/// The JSON value an answer holds: the whole text, or inside a Markdown code fence, or else the
/// first object or list in it. `None` when there is none.
pub fn read_json(text: &str) -> Option<Value> {
    let trimmed = text.trim();
    if let Ok(v) = serde_json::from_str(trimmed) {
        return Some(v);
    }
    let unfenced = trimmed.strip_prefix("```").map(|rest| rest.trim_start_matches(|c: char| c.is_ascii_alphanumeric()).trim_end().trim_end_matches("```"));
    if let Some(inner) = unfenced
        && let Ok(v) = serde_json::from_str(inner.trim())
    {
        return Some(v);
    }
    // The first `{` or `[` that begins a whole value (text around it is the model's chatter).
    trimmed.char_indices().filter(|(_, c)| matches!(c, '{' | '[')).find_map(|(at, _)| {
        let mut values = serde_json::Deserializer::from_str(&trimmed[at..]).into_iter::<Value>();
        values.next()?.ok()
    })
}

/// Equal as values: numbers by their value, objects by their fields whatever the order.
pub fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
            (Some(x), Some(y), _, _) => x == y,
            (_, _, Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b)),
        (Value::Object(x), Value::Object(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w))),
        _ => a == b,
    }
}

/// The value at a dotted path into objects.
fn at<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |v, key| v.as_object()?.get(key))
}

/// A value's canonical text (sorted keys, numbers as written), for sets of list items.
fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, String> = m.iter().map(|(k, v)| (k, canonical(v))).collect();
            format!("{{{}}}", sorted.iter().map(|(k, v)| format!("{}:{v}", serde_json::to_string(k).expect("a string serializes"))).collect::<Vec<_>>().join(","))
        }
        Value::Array(items) => format!("[{}]", items.iter().map(canonical).collect::<Vec<_>>().join(",")),
        Value::Number(n) => n.as_f64().map_or_else(|| n.to_string(), |f| if f.fract() == 0.0 && f.abs() < 1e15 { format!("{}", f as i64) } else { f.to_string() }),
        other => other.to_string(),
    }
}

/// One field of one answer: right or not, and its F1 for `f1` fields.
fn score_field(rule: &FieldRule, answer: Option<&Value>, reference: &Value) -> (bool, Option<f64>) {
    let Some(answer) = answer else { return (false, (rule.rule == Match::F1).then_some(0.0)) };
    match rule.rule {
        Match::Exact => (same(answer, reference), None),
        Match::Numeric => match (answer.as_f64(), reference.as_f64()) {
            (Some(a), Some(r)) => ((a - r).abs() <= rule.tolerance.unwrap_or(0.0) + 1e-12 * r.abs().max(1.0), None),
            _ => (false, None),
        },
        Match::F1 => {
            let set = |v: &Value| -> Option<BTreeSet<String>> { Some(v.as_array()?.iter().map(canonical).collect()) };
            let (Some(got), Some(want)) = (set(answer), set(reference)) else { return (false, Some(0.0)) };
            let hits = got.intersection(&want).count() as f64;
            let f1 = if got.is_empty() && want.is_empty() { 1.0 } else { 2.0 * hits / (got.len() + want.len()) as f64 };
            (f1 == 1.0, Some(f1))
        }
    }
}

/// What the judge does for each answer: the fields it compares, by path, and whether the whole
/// value must also be equal.
struct Plan {
    fields: Vec<(String, FieldRule)>,
    whole: bool,
}

impl Plan {
    fn for_reference(configured: &BTreeMap<String, FieldRule>, reference: &Value) -> Plan {
        if !configured.is_empty() {
            return Plan { fields: configured.iter().map(|(k, r)| (k.clone(), r.clone())).collect(), whole: false };
        }
        let fields = reference.as_object().map_or_else(Vec::new, |m| m.keys().map(|k| (k.clone(), FieldRule { rule: Match::Exact, tolerance: None })).collect());
        Plan { fields, whole: true }
    }
}

/// Judges every candidate's answers as JSON against the references.
pub fn judge(dataset: &Dataset, answers: &Answers, fields: &BTreeMap<String, FieldRule>, tools: Option<&str>, bootstrap: u32, seed: u64) -> Result<Judgement, StageError> {
    let mut references: BTreeMap<&str, Value> = BTreeMap::new();
    for s in &dataset.samples {
        let label = s.label.as_deref().ok_or_else(|| StageError::new(format!("sample `{}` has no reference: set `label` on the dataset stage to the field holding it", s.id)))?;
        let reference: Value = serde_json::from_str(label).map_err(|e| StageError::new(format!("sample `{}`: the reference {label:?} is not JSON ({e})", s.id)))?;
        for path in fields.keys() {
            if at(&reference, path).is_none() {
                return Err(StageError::new(format!("sample `{}`: the reference has no field `{path}` (named in `fields`): {label}", s.id)));
            }
        }
        references.insert(&s.id, reference);
    }
    let mut models = BTreeMap::new();
    let mut modes: BTreeMap<String, RubricMode> = BTreeMap::new();
    for (model, m) in &answers.models {
        let mut verdicts = Vec::new();
        // Per split: each answer's pass, and each field's (right, F1, missing).
        type FieldTally = BTreeMap<String, (&'static str, Vec<bool>, Vec<f64>, usize)>;
        let mut by_split: BTreeMap<Split, (Vec<bool>, usize, FieldTally)> = BTreeMap::new();
        for (a, sample) in dataset.join(model, m).map_err(StageError::new)? {
            let reference = &references[sample.id.as_str()];
            let plan = Plan::for_reference(fields, reference);
            let parsed = read_json(&a.text);
            let (tally_pass, unparsed, tally_fields) = by_split.entry(sample.split).or_default();
            let mut wrong = Vec::new();
            for (path, rule) in &plan.fields {
                let got = parsed.as_ref().and_then(|p| at(p, path));
                let (right, f1) = score_field(rule, got, at(reference, path).expect("checked above"));
                let entry = tally_fields.entry(path.clone()).or_insert((rule.rule.as_str(), Vec::new(), Vec::new(), 0));
                entry.1.push(right);
                entry.2.extend(f1);
                entry.3 += usize::from(parsed.is_some() && got.is_none());
                if !right {
                    wrong.push(path.as_str());
                }
            }
            let pass = match &parsed {
                None => false,
                Some(p) if plan.whole => same(p, reference),
                Some(_) => wrong.is_empty(),
            };
            if let Some(field) = tools {
                // A tool call's arguments against the schema of the function it names.
                let valid = parsed.as_ref().is_some_and(|call| {
                    let named = call.get("name").and_then(Value::as_str);
                    let function = sample.fields.get(field).and_then(Value::as_array).into_iter().flatten().filter_map(|t| t.get("function")).find(|f| f.get("name").and_then(Value::as_str) == named);
                    match (function, call.get("arguments")) {
                        (Some(f), Some(arguments)) => f.get("parameters").is_none_or(|schema| valid_against(schema, arguments)),
                        _ => false,
                    }
                });
                let entry = tally_fields.entry(VALID_ARGUMENTS.to_string()).or_insert(("schema", Vec::new(), Vec::new(), 0));
                entry.1.push(valid);
            }
            tally_pass.push(pass);
            *unparsed += usize::from(parsed.is_none());
            let mode = (!pass).then(|| failure_mode(parsed.is_some(), &wrong, &mut modes));
            let shown = canonical(reference);
            verdicts.push(Verdict {
                predicted: Some(parsed.as_ref().map(canonical)),
                pass: Some(pass),
                failure_mode: Some(mode),
                ..verdict(&a.id, sample.split, Some(shown.as_str()), &a.text)
            });
        }
        let seed = model_seed(seed, model);
        let splits = by_split
            .into_iter()
            .map(|(split, (passes, unparsed, tally))| {
                let fields = tally
                    .into_iter()
                    .map(|(path, (rule, right, f1, missing))| {
                        let f1 = (!f1.is_empty()).then(|| mean_with_interval(&f1, bootstrap, seed));
                        (path, FieldScores { rule: rule.to_string(), accuracy: proportion(&right, bootstrap, seed), mean_f1: f1, missing })
                    })
                    .collect();
                let scores = SplitScores { unparsed: Some(unparsed), accuracy: Some(proportion(&passes, bootstrap, seed)), fields: Some(fields), ..SplitScores::of(passes.len()) };
                (split, scores)
            })
            .collect();
        models.insert(model.clone(), JudgedModel { splits, verdicts, agreement: None });
    }
    Ok(Judgement { normalize: Some("json".into()), failure_modes: (!modes.is_empty()).then_some(modes), ..judgement(models, LABEL_METRICS) })
}

/// The per-field score of tool calls whose arguments are valid against the schema of the
/// function they name (`tools`).
pub const VALID_ARGUMENTS: &str = "arguments_valid";

/// Whether `value` is valid against `schema`, for the JSON Schema that function parameters use:
/// `type` (one or a list), `enum`, `const`, `properties`, `required`, `additionalProperties`
/// (`false` or a schema), `items`, `minimum` / `maximum`, `minLength` / `maxLength`, `anyOf` /
/// `oneOf` / `allOf`. Other keywords are not checked.
pub fn valid_against(schema: &Value, value: &Value) -> bool {
    let Some(schema) = schema.as_object() else { return schema.as_bool().unwrap_or(true) };
    let is_type = |t: &str| match t {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "number" => value.is_number(),
        "integer" => value.as_f64().is_some_and(|x| x.fract() == 0.0),
        _ => true,
    };
    let typed = match schema.get("type") {
        Some(Value::String(t)) => is_type(t),
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).any(is_type),
        _ => true,
    };
    let in_enum = schema.get("enum").and_then(Value::as_array).is_none_or(|e| e.iter().any(|x| same(x, value)));
    let constant = schema.get("const").is_none_or(|c| same(c, value));
    let number = value.as_f64().is_none_or(|x| {
        schema.get("minimum").and_then(Value::as_f64).is_none_or(|m| x >= m) && schema.get("maximum").and_then(Value::as_f64).is_none_or(|m| x <= m)
    });
    let length = value.as_str().is_none_or(|s| {
        let n = s.chars().count() as u64;
        schema.get("minLength").and_then(Value::as_u64).is_none_or(|m| n >= m) && schema.get("maxLength").and_then(Value::as_u64).is_none_or(|m| n <= m)
    });
    let object = value.as_object().is_none_or(|o| {
        let properties = schema.get("properties").and_then(Value::as_object);
        let required = schema.get("required").and_then(Value::as_array).is_none_or(|r| r.iter().filter_map(Value::as_str).all(|k| o.contains_key(k)));
        let each = o.iter().all(|(k, v)| match properties.and_then(|p| p.get(k)) {
            Some(s) => valid_against(s, v),
            None => schema.get("additionalProperties").is_none_or(|extra| valid_against(extra, v)),
        });
        required && each
    });
    let array = value.as_array().is_none_or(|a| schema.get("items").is_none_or(|s| a.iter().all(|v| valid_against(s, v))));
    let any = |key: &str| schema.get(key).and_then(Value::as_array).is_none_or(|s| s.iter().any(|s| valid_against(s, value)));
    let all = schema.get("allOf").and_then(Value::as_array).is_none_or(|s| s.iter().all(|s| valid_against(s, value)));
    typed && in_enum && constant && number && length && object && array && any("anyOf") && any("oneOf") && all
}

/// The failure mode a failed answer is filed under, added to `modes` with what it means: not
/// JSON, the fields it got wrong, or (every field right, the value not) other fields besides.
fn failure_mode(parsed: bool, wrong: &[&str], modes: &mut BTreeMap<String, RubricMode>) -> String {
    let (id, description, fix) = if !parsed {
        ("not_json".to_string(), "the answer holds no JSON value".to_string(), "answer with the JSON value alone, as the schema asks, and nothing around it".to_string())
    } else if wrong.is_empty() {
        (
            "other_fields".to_string(),
            "every field of the reference is right, but the answer has fields the reference does not".to_string(),
            "answer with the reference's fields only".to_string(),
        )
    } else {
        let list = wrong.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ");
        (
            format!("{}_wrong", wrong.join("+")),
            format!("{list} differ{} from the reference", if wrong.len() == 1 { "s" } else { "" }),
            format!("state how to read {list} from the input, with an example"),
        )
    };
    modes.entry(id.clone()).or_insert(RubricMode { description, fix });
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_are_read_as_json_around_chatter_and_fences() {
        assert_eq!(read_json(" {\"a\": 1} "), Some(json!({"a": 1})));
        assert_eq!(read_json("```json\n{\"a\": 1}\n```"), Some(json!({"a": 1})));
        assert_eq!(read_json("Here it is: {\"a\": [1, 2]} — done."), Some(json!({"a": [1, 2]})));
        assert_eq!(read_json("[3, 4] and {\"b\": 2}"), Some(json!([3, 4])));
        assert_eq!(read_json("two hours"), None);
        assert_eq!(read_json("{\"a\": 1"), None);
        assert_eq!(read_json("\"a string\""), Some(json!("a string")));
    }

    #[test]
    fn values_compare_whatever_the_key_order_and_number_spelling() {
        assert!(same(&json!({"h": 2, "m": 15}), &serde_json::from_str(r#"{"m":15.0,"h":2}"#).unwrap()));
        assert!(!same(&json!({"h": 2, "m": 15}), &json!({"h": 2, "m": 16})));
        assert!(!same(&json!({"h": 2}), &json!({"h": 2, "m": 0})), "a field more is another value");
        assert!(!same(&json!([1, 2]), &json!([2, 1])), "lists keep their order unless compared by F1");
        assert!(!same(&json!("2"), &json!(2)));
        assert_eq!(canonical(&serde_json::from_str(r#"{"b": 1.0, "a": [2, "x"]}"#).unwrap()), r#"{"a":[2,"x"],"b":1}"#);
    }

    #[test]
    fn fields_score_by_their_rule() {
        let exact = FieldRule { rule: Match::Exact, tolerance: None };
        let near = FieldRule { rule: Match::Numeric, tolerance: Some(1.0) };
        let f1 = FieldRule { rule: Match::F1, tolerance: None };
        assert_eq!(score_field(&exact, Some(&json!(15.0)), &json!(15)), (true, None));
        assert_eq!(score_field(&near, Some(&json!(16)), &json!(15)), (true, None));
        assert_eq!(score_field(&near, Some(&json!(17)), &json!(15)), (false, None));
        assert_eq!(score_field(&near, Some(&json!("15")), &json!(15)), (false, None));
        assert_eq!(score_field(&f1, Some(&json!(["b", "a"])), &json!(["a", "b"])), (true, Some(1.0)));
        // {a, c} against {a, b}: one hit, 2·1 / (2 + 2).
        assert_eq!(score_field(&f1, Some(&json!(["a", "c"])), &json!(["a", "b"])), (false, Some(0.5)));
        assert_eq!(score_field(&f1, None, &json!(["a"])), (false, Some(0.0)));
        assert_eq!(score_field(&exact, None, &json!(1)), (false, None));
    }

    #[test]
    fn bad_field_rules_are_named() {
        let rules: BTreeMap<String, FieldRule> = [
            ("a..b".to_string(), FieldRule { rule: Match::Exact, tolerance: None }),
            ("n".to_string(), FieldRule { rule: Match::Numeric, tolerance: Some(-1.0) }),
            ("t".to_string(), FieldRule { rule: Match::F1, tolerance: Some(1.0) }),
            ("ok.path".to_string(), FieldRule { rule: Match::Numeric, tolerance: Some(0.5) }),
        ]
        .into();
        let problems = check_fields(&rules);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("`a..b`") && problems[1].contains("`tolerance` must be") && problems[2].contains("numeric"), "{problems:?}");
    }

    #[test]
    fn tool_arguments_are_checked_against_the_function_schema() {
        use super::valid_against;
        use serde_json::json;
        let schema = json!({"type": "object", "properties": {"city": {"type": "string", "minLength": 2}, "days": {"type": "integer", "minimum": 1, "maximum": 7}, "unit": {"enum": ["c", "f"]}}, "required": ["city"], "additionalProperties": false});
        assert!(valid_against(&schema, &json!({"city": "Oslo"})));
        assert!(valid_against(&schema, &json!({"city": "Oslo", "days": 3, "unit": "c"})));
        for bad in [json!({}), json!({"city": 3}), json!({"city": "O"}), json!({"city": "Oslo", "days": 9}), json!({"city": "Oslo", "days": 1.5}), json!({"city": "Oslo", "unit": "k"}), json!({"city": "Oslo", "wind": true}), json!("Oslo")] {
            assert!(!valid_against(&schema, &bad), "{bad} passed");
        }
        assert!(valid_against(&json!({"anyOf": [{"type": "string"}, {"type": "null"}]}), &json!(null)));
        assert!(valid_against(&json!({"type": "array", "items": {"type": "number"}}), &json!([1, 2.5])));
        assert!(!valid_against(&json!({"type": "array", "items": {"type": "number"}}), &json!([1, "2"])));
    }
}
