//! The JSON Schema of pipeline files, generated from the config types and the registered kinds.
//! Checked in under `schemas/` (a test fails when it drifts) so editors (taplo, VS Code's Even
//! Better TOML) complete and check pipeline files through a `#:schema` line.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde_json::{Value, json};

use crate::config::{Bound, IterateConfig};
use crate::registry::{Registry, schema_settings};

/// A pipeline file: a DAG of stages. See README.md.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields, title = "pipeline")]
#[allow(dead_code)]
struct PipelineSchema {
    /// What this pipeline is for.
    description: Option<String>,
    /// Seed handed to every stage; part of every fingerprint.
    seed: Option<u64>,
    /// Quality targets, checked after each iteration against the `metrics` of a stage's output.
    targets: Option<TargetsSchema>,
    /// Loop: rerun the DAG with a feedback edge until the targets are met.
    iterate: Option<IterateConfig>,
    /// The stages, by id. Each has a `kind`, optional `needs`, and the kind's own fields.
    stages: BTreeMap<String, Value>,
}

/// `from` names the stage whose output `metrics` are checked; every other key is a metric bound.
#[derive(JsonSchema)]
#[allow(dead_code)]
struct TargetsSchema {
    /// Stage whose output has a `metrics` object.
    from: String,
    #[serde(flatten)]
    metrics: BTreeMap<String, Bound>,
}

pub fn pipeline_schema(registry: &Registry) -> Value {
    let mut root = schema_settings().into_generator().into_root_schema_for::<PipelineSchema>().to_value();
    let kinds: Vec<Value> = registry
        .kinds()
        .map(|k| {
            let mut s = k.config_schema();
            let obj = s.as_object_mut().expect("config schemas are objects");
            obj.remove("$schema");
            obj.insert("title".into(), json!(k.kind()));
            obj.insert("description".into(), json!(k.summary()));
            obj.insert("additionalProperties".into(), json!(false));
            let props = obj.entry("properties").or_insert_with(|| json!({})).as_object_mut().unwrap();
            props.insert("kind".into(), json!({"const": k.kind(), "description": k.summary()}));
            let takes: Vec<String> = k.inputs().iter().map(|p| format!("`{}` (a `{}`)", p.name, p.ty)).collect();
            props.insert(
                "needs".into(),
                json!({
                    "type": "array",
                    "items": {"type": "string"},
                    "description": if takes.is_empty() { "Takes no inputs.".to_string() } else { format!("Upstream stages, bound to inputs by type: {}.", takes.join(", ")) },
                }),
            );
            let required = obj.entry("required").or_insert_with(|| json!([])).as_array_mut().unwrap();
            required.insert(0, json!("kind"));
            s
        })
        .collect();
    let stages = &mut root["properties"]["stages"];
    stages["propertyNames"] = json!({"pattern": "^[A-Za-z][A-Za-z0-9_-]*$"});
    stages["additionalProperties"] = json!({"oneOf": kinds});
    root
}

pub fn render(schema: &Value) -> String {
    let mut s = serde_json::to_string_pretty(schema).expect("schema serializes");
    s.push('\n');
    s
}
