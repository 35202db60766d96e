//! Tool calls for models without a native tool-calling format (every embedded model here): the
//! model is told the functions it may call, and its reply is constrained to one call,
//! `{"name": ..., "arguments": {...}}`, its arguments to the function's own parameter schema —
//! what llama.cpp's server does for chat templates without tool support ("generic" tool calls).
//! Over HTTP the server is sent OpenAI's `tools` and answers with its own `tool_calls`.

use artifacts::{Message, ToolCall};
use serde_json::{Value, json};

/// A sample's tools checked: each `{"type": "function", "function": {"name", "parameters"?}}`,
/// names unique. The error says which is wrong and how.
pub fn check(tools: &[Value]) -> Result<(), String> {
    if tools.is_empty() {
        return Err("the list of tools is empty".into());
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, tool) in tools.iter().enumerate() {
        let function = match (tool.get("type").and_then(Value::as_str), tool.get("function")) {
            (Some("function"), Some(f @ Value::Object(_))) => f,
            _ => return Err(format!("tool {} is not `{{\"type\": \"function\", \"function\": {{\"name\": ..., \"parameters\": {{...}}}}}}`", i + 1)),
        };
        let Some(name) = function.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()) else {
            return Err(format!("tool {} has no `function.name`", i + 1));
        };
        if !names.insert(name) {
            return Err(format!("two tools are named `{name}`"));
        }
        if let Some(p) = function.get("parameters")
            && !p.is_object()
        {
            return Err(format!("tool `{name}`: `parameters` must be a JSON Schema object"));
        }
    }
    Ok(())
}

/// Each function: its name, and its parameters' schema (an object of any fields when it has none).
fn functions(tools: &[Value]) -> Vec<(&str, Value)> {
    tools
        .iter()
        .filter_map(|t| {
            let f = t.get("function")?;
            Some((f.get("name")?.as_str()?, f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"}))))
        })
        .collect()
}

/// The messages with the functions described in the system message (added first when there is
/// none), and how to call one.
pub fn instructed(messages: &[Message], tools: &[Value]) -> Vec<Message> {
    let described: Vec<Value> = tools.iter().filter_map(|t| t.get("function").cloned()).collect();
    let text = format!(
        "You can call these functions:\n{}\nCall exactly one: reply with JSON only, {{\"name\": \"<function name>\", \"arguments\": {{<its arguments>}}}}.",
        serde_json::to_string_pretty(&described).expect("JSON")
    );
    let mut out = messages.to_vec();
    match out.first_mut() {
        Some(m) if m.role == "system" => m.content = format!("{}\n\n{text}", m.content),
        _ => out.insert(0, Message::new("system", text)),
    }
    out
}

/// The output constraint of one call of one of `tools`: the name one of theirs, the arguments
/// valid against that function's parameters.
pub fn call_constraint(tools: &[Value]) -> Result<crate::OutputConstraint, String> {
    check(tools)?;
    let calls: Vec<Value> = functions(tools)
        .into_iter()
        .map(|(name, parameters)| {
            json!({
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    Ok(crate::OutputConstraint::JsonSchema(if calls.len() == 1 { calls[0].clone() } else { json!({"anyOf": calls}) }))
}

/// The call in a constrained reply, if it is one (a reply cut off by `max_tokens` is not).
pub fn read_call(text: &str) -> Option<ToolCall> {
    let value: Value = serde_json::from_str(text.trim()).ok()?;
    Some(ToolCall { name: value.get("name")?.as_str()?.to_string(), arguments: value.get("arguments")?.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}),
            json!({"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}),
        ]
    }

    #[test]
    fn tools_are_described_and_a_call_is_constrained_to_one_of_them() {
        let tools = weather();
        check(&tools).unwrap();
        let messages = instructed(&[Message::new("user", "Weather in Oslo?")], &tools);
        assert_eq!(messages[0].role, "system");
        assert!(messages[0].content.contains("\"get_weather\"") && messages[0].content.contains("Call exactly one"), "{}", messages[0].content);
        let with_system = instructed(&[Message::new("system", "Be brief."), Message::new("user", "?")], &tools);
        assert!(with_system[0].content.starts_with("Be brief.\n\nYou can call these functions:"), "{}", with_system[0].content);
        let crate::OutputConstraint::JsonSchema(schema) = call_constraint(&tools).unwrap() else { panic!("a JSON Schema") };
        assert_eq!(schema["anyOf"][0]["properties"]["name"]["const"], "get_weather");
        assert_eq!(schema["anyOf"][1]["properties"]["arguments"]["properties"]["zone"]["type"], "string");
        assert_eq!(read_call("{\"name\": \"get_time\", \"arguments\": {\"zone\": \"UTC\"}}").unwrap().arguments, json!({"zone": "UTC"}));
        assert!(read_call("{\"name\": \"get_ti").is_none());
        assert!(check(&[json!({"type": "function", "function": {"name": "a"}}), json!({"type": "function", "function": {"name": "a"}})]).unwrap_err().contains("two tools are named `a`"));
        assert!(check(&[json!({"name": "a"})]).unwrap_err().contains("tool 1 is not"));
    }
}
