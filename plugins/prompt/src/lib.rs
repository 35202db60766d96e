//! `prompt` and `render`: prompt templates as versioned artifacts, and their rendering per sample.
//!
//! A `prompt` artifact is the template text itself (not a path), so a revised prompt produced by a
//! later stage and fed back through `[iterate]` is the same kind of value as one read from a file.
//! `render` turns (sample × prompt) into chat messages, one memoized item per sample: editing a
//! template re-renders, adding samples renders only the new ones.
//!
//! Templates are minijinja with strict undefined values, no loader and no globals beyond the
//! sample: a template cannot read files or the environment.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;

use artifacts::facts::{self, DatasetFacts, PromptFacts, RenderFacts, TemplateFile, TemplateVariable, VariableIn};
use artifacts::{Artifact, Dataset, Message, Rendered, RenderedSample};
use engine::diag::{Diagnostic, SourceFile};
use engine::stream::OutputWriter;
use engine::{BuildContext, ElementItems, FileRef, Item, ItemContext, Port, Stage, StageError, StageInput, StagePlugin};
use minijinja::{Environment, UndefinedBehavior};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub struct Prompt;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PromptConfig {
    /// minijinja template of the user message, relative to the pipeline file. Sample fields are
    /// variables (`{{ text }}`); `id` is the sample id.
    pub template: FileRef,
    /// System message (also a template).
    pub system: Option<String>,
}

impl StagePlugin for Prompt {
    type Config = PromptConfig;
    const KIND: &'static str = "prompt";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "a prompt template (user message from a minijinja file, optional system message)";
    const INPUTS: &'static [Port] = &[];
    const OUTPUT: &'static str = artifacts::Prompt::TYPE;

    fn build(config: PromptConfig, cx: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        let path = cx.file(&config.template).map_err(|d| vec![d])?;
        let text = std::fs::read_to_string(&path)
            .map_err(|e| vec![cx.error_at(config.template.span.clone(), format!("cannot read template: {e}"), "here")])?;
        let mut errors = Vec::new();
        let file = SourceFile::new(cx.display_path(&config.template), text.as_str());
        if let Err(e) = check_syntax(&text) {
            errors.push(template_diagnostic(&file, &e));
        }
        if let Some(system) = &config.system
            && let Err(e) = check_syntax(system)
        {
            errors.push(cx.error_at(cx.key("system"), format!("`system` is not a valid template: {e}"), ""));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        // The variables each template reads, located, for `render` to check against the dataset.
        let mut variables: Vec<TemplateVariable> =
            variables(&text).into_iter().map(|(name, span)| TemplateVariable { name, read_in: VariableIn::Template, span: [span.start, span.end] }).collect();
        if let Some(system) = &config.system {
            let at = cx.key("system").unwrap_or(0..0);
            variables.extend(variables_of(system).into_iter().map(|name| TemplateVariable { name, read_in: VariableIn::System, span: [at.start, at.end] }));
        }
        let facts = PromptFacts { template: TemplateFile { file: file.path.display().to_string(), text }, variables };
        Ok(Arc::new(PromptStage { config, facts }))
    }
}

/// The names a template reads from its context (a sample's fields and `id`), each with where it
/// is first read in `source` (whole template when it cannot be found by its spelling).
fn variables(source: &str) -> Vec<(String, Range<usize>)> {
    variables_of(source).into_iter().map(|name| {
        let span = first_use(source, &name).unwrap_or(0..source.len());
        (name, span)
    }).collect()
}

fn variables_of(source: &str) -> BTreeSet<String> {
    let env = environment();
    let Ok(template) = env.template_from_str(source) else { return BTreeSet::new() };
    let globals: BTreeSet<&str> = env.globals().map(|(name, _)| name).collect();
    template.undeclared_variables(false).into_iter().filter(|n| !globals.contains(n.as_str())).collect()
}

/// The first place `name` is written as a whole word inside a `{{ }}` or `{% %}` tag.
fn first_use(source: &str, name: &str) -> Option<Range<usize>> {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    source.match_indices(name).map(|(at, _)| at..at + name.len()).find(|r| {
        let before = source[..r.start].chars().next_back();
        let after = source[r.end..].chars().next();
        let opened = source[..r.start].rfind("{{").max(source[..r.start].rfind("{%"));
        let closed = source[..r.start].rfind("}}").max(source[..r.start].rfind("%}"));
        !before.is_some_and(word) && !after.is_some_and(word) && opened.is_some() && opened > closed
    })
}

fn check_syntax(source: &str) -> Result<(), minijinja::Error> {
    environment().template_from_str(source).map(|_| ())
}

fn template_diagnostic(file: &SourceFile, e: &minijinja::Error) -> Diagnostic {
    let span = e.range().or_else(|| {
        let line = e.line()?;
        let start: usize = file.text.split_inclusive('\n').take(line - 1).map(str::len).sum();
        let len = file.text[start..].find('\n').unwrap_or(file.text.len() - start);
        Some(start..start + len)
    });
    let d = Diagnostic::error(format!("template error: {}", e.detail().unwrap_or(&e.kind().to_string())));
    match span {
        Some(span) => d.at(file, span, e.kind().to_string()),
        None => d,
    }
}

struct PromptStage {
    config: PromptConfig,
    /// Each variable a template reads, in the template file or the `system` message.
    facts: PromptFacts,
}

impl Stage for PromptStage {
    /// What the templates read, for `render` to check at `validate`.
    fn facts(&self) -> Value {
        serde_json::to_value(&self.facts).expect("facts serialize")
    }

    fn finish(&self, input: &StageInput, _: Vec<(Item, Value)>) -> Result<Value, StageError> {
        let template = std::str::from_utf8(input.file(&self.config.template)?)
            .map_err(|_| StageError::new(format!("template `{}` is not UTF-8", self.config.template.path)))?;
        let prompt = artifacts::Prompt {
            source: self.config.template.path.clone(),
            system: self.config.system.clone(),
            template: template.to_string(),
            metrics: None,
            revision: None,
            accepted: None,
            summary: None,
        };
        Ok(prompt.to_json())
    }
}

/// The environment every template of a pipeline renders in (prompts here, rubrics in
/// `llm_judge`): a sandbox. It has no loader, so `include`, `import` and `extends` reach no file;
/// no function reads the environment, the clock or the disk; a template sees only the context it
/// is given (a sample's fields and id). Undefined names are errors, and fuel bounds the work one
/// rendering may do, so a runaway loop fails instead of hanging the run.
pub fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // Errors name the undefined expression (`input.question` is undefined). minijinja turns this
    // on only where it is itself built with debug assertions, which our dependencies are not
    // (`Cargo.toml`). It was on before they were; it costs only where a value is undefined.
    env.set_debug(true);
    env.set_fuel(Some(TEMPLATE_FUEL));
    env
}

/// The name [`compiled`] gives its template: `render_str`'s, so errors and auto-escaping (chosen
/// by name: none) are what rendering the source directly gives.
const COMPILED_NAME: &str = "<string>";

/// Distinct templates [`compiled`] keeps before it starts over (a stage renders one or two; a
/// long `serve` or a revising loop sees a new one per revision).
const COMPILED_KEPT: usize = 64;

/// An [`environment`] holding `source` compiled, as [`COMPILED_NAME`]. A `render` stage renders
/// the same one or two templates for every sample; compiling them once per sample was 5% of a
/// 200,000-sample first run (`perf`). Compiled once per process and source; the rendering of a
/// compiled template is the one `render_str` does after compiling, so no output changes.
fn compiled(source: &str) -> Result<Arc<Environment<'static>>, minijinja::Error> {
    static CACHE: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, Arc<Environment<'static>>>>> =
        std::sync::LazyLock::new(Default::default);
    if let Some(env) = CACHE.lock().unwrap_or_else(|e| e.into_inner()).get(source) {
        return Ok(env.clone());
    }
    let mut env = environment();
    env.add_template_owned(COMPILED_NAME, source.to_string())?;
    let env = Arc::new(env);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() >= COMPILED_KEPT {
        cache.clear();
    }
    cache.insert(source.to_string(), env.clone());
    Ok(env)
}

/// Instructions one rendering may run: ample for any prompt (a loop over a few thousand list
/// items), far short of a loop that would not end.
pub const TEMPLATE_FUEL: u64 = 5_000_000;

pub struct Render;

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    #[default]
    All,
    Dev,
    Heldout,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RenderConfig {
    /// Which samples to render.
    #[serde(default)]
    pub split: Split,
    /// Multi-turn samples: the field holding each sample's conversation, a list of
    /// `{"role": "system" | "user" | "assistant", "content": "..."}` turns ending with the user
    /// turn the model answers. The prompt's `system` message comes first (unless it has none and
    /// the conversation begins with its own), the earlier turns follow as they are, and the last
    /// user turn is the template rendered with the sample's fields and `prompt`, that turn's text
    /// (a template of `{{ prompt }}` passes it through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<String>,
    /// Tool calling: the field holding the functions each sample offers the model, a list of
    /// OpenAI tools (`{"type": "function", "function": {"name", "description", "parameters"}}`).
    /// `infer` sends them with the sample, and the model answers with a call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<String>,
}

/// The variable a conversation's last user turn is given to the template as.
const LAST_TURN: &str = "prompt";

impl StagePlugin for Render {
    type Config = RenderConfig;
    const KIND: &'static str = "render";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "render a prompt for every sample into chat messages (one memoized item per sample)";
    const INPUTS: &'static [Port] = &[Port::new("dataset", Dataset::TYPE), Port::new("prompt", artifacts::Prompt::TYPE)];
    const OUTPUT: &'static str = Rendered::TYPE;

    fn build(config: RenderConfig, cx: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        let (at, tools_at) = (cx.key("conversation"), cx.key("tools"));
        Ok(Arc::new(RenderStage(config, at, tools_at)))
    }
}

/// The config, and where `conversation` and `tools` are written.
struct RenderStage(RenderConfig, Option<std::ops::Range<usize>>, Option<std::ops::Range<usize>>);

#[async_trait::async_trait]
impl Stage for RenderStage {
    /// Which samples are rendered, for stages that read rendered prompts to check at `validate`.
    fn facts(&self) -> Value {
        let split = match self.0.split {
            Split::All => None,
            Split::Dev => Some(artifacts::Split::Dev),
            Split::Heldout => Some(artifacts::Split::Heldout),
        };
        serde_json::to_value(RenderFacts { split }).expect("facts serialize")
    }

    /// Every variable a template reads is a field some sample has, or `id`.
    fn check_inputs(&self, pipeline: &SourceFile, facts: &BTreeMap<String, Value>) -> Vec<Diagnostic> {
        let (Some(dataset), Some(prompt)) = (facts::read::<DatasetFacts>(facts.get("dataset")), facts::read::<PromptFacts>(facts.get("prompt"))) else {
            return Vec::new();
        };
        let template = SourceFile::new(prompt.template.file, prompt.template.text);
        let conversation = self.0.conversation.as_deref();
        let known: BTreeSet<&str> = dataset.fields.iter().map(String::as_str).chain(["id"]).chain(conversation.map(|_| LAST_TURN)).collect();
        let known: Vec<&str> = known.into_iter().collect();
        let mut errors = Vec::new();
        if let Some(field) = &self.0.tools
            && !dataset.fields.contains(field)
        {
            let fields: Vec<&str> = dataset.fields.iter().map(String::as_str).collect();
            let d = Diagnostic::error(format!("`tools = \"{field}\"`: no sample of the dataset has that field"));
            let d = match &self.2 {
                Some(at) => d.at(pipeline, at.clone(), "each sample's tools are read from this field"),
                None => d,
            };
            errors.push(d.suggest(field, &fields, "the samples have"));
        }
        if let Some(field) = conversation
            && !dataset.fields.contains(field)
        {
            let fields: Vec<&str> = dataset.fields.iter().map(String::as_str).collect();
            let d = Diagnostic::error(format!("`conversation = \"{field}\"`: no sample of the dataset has that field"));
            let d = match &self.1 {
                Some(at) => d.at(pipeline, at.clone(), "each sample's conversation is read from this field"),
                None => d,
            };
            errors.push(d.suggest(field, &fields, "the samples have"));
        }
        for v in &prompt.variables {
            let name = v.name.as_str();
            if known.contains(&name) {
                continue;
            }
            let span = v.span[0]..v.span[1];
            let d = Diagnostic::error(format!("the prompt reads `{name}`, which no sample of the dataset has"));
            let d = match v.read_in {
                VariableIn::Template => d.at(&template, span, "not a sample field"),
                VariableIn::System => d.at(pipeline, span, "this `system` template reads it"),
            };
            errors.push(d.suggest(name, &known, "the samples have"));
        }
        errors
    }

    fn items(&self, input: &StageInput) -> Result<Vec<Item>, StageError> {
        let mut items = Vec::new();
        self.each_item(input, &mut |item| {
            items.push(item);
            Ok(())
        })?;
        Ok(items)
    }

    /// An item per sample of the dataset, one at a time (a million are rendered in the memory of
    /// one); a rerun makes items only from the samples that changed.
    fn items_of_elements(&self) -> Option<(&'static str, &'static str)> {
        Some(("dataset", "samples"))
    }

    /// A sample's item: what its rendering depends on (not its split, not its label), unless the
    /// stage renders the other split.
    fn element_items<'a>(&'a self, input: &'a StageInput) -> Result<ElementItems<'a>, StageError> {
        let prompt: artifacts::Prompt = input.read("prompt")?;
        Ok(Box::new(move |element| {
            let s: artifacts::Sample = engine::stream::parse_element(element, "dataset", "samples")?;
            let wanted = match self.0.split {
                Split::All => true,
                Split::Dev => s.split == artifacts::Split::Dev,
                Split::Heldout => s.split == artifacts::Split::Heldout,
            };
            if !wanted {
                return Ok(None);
            }
            let input = RenderInput {
                id: s.id.clone(),
                fields: s.fields,
                system: prompt.system.clone(),
                template: prompt.template.clone(),
                conversation: self.0.conversation.clone(),
                tools: self.0.tools.clone(),
                result: RESULT_IS_THE_SAMPLE,
            };
            Ok(Some(Item { id: s.id, input: input.into_value() }))
        }))
    }

    fn streams_output(&self) -> bool {
        true
    }

    /// Rendering is cheap and pure: many at once, so that they finish, and are memoized, many
    /// per commit.
    fn item_concurrency(&self) -> usize {
        64
    }

    /// Each item's result is its sample as rendered: the output's `samples` are the results as
    /// they are kept.
    fn output_holds_results(&self) -> bool {
        true
    }

    fn write_output(&self, input: &StageInput, _: &mut dyn Iterator<Item = Result<(Item, Value), StageError>>, out: &mut OutputWriter) -> Result<(), StageError> {
        let prompt: artifacts::Prompt = input.read("prompt")?;
        out.field("prompt", &prompt.source)?;
        out.item_values("samples")
    }

    async fn run_item(&self, item: &Item, _: &ItemContext) -> Result<Value, StageError> {
        let input = RenderInput::deserialize(&item.input).map_err(|e| StageError::new(format!("render item `{}` is malformed: {e}", item.id)))?;
        // A sample's tools go with its messages as they are (`infer` checks them).
        let tools = match &input.tools {
            None => None,
            Some(field) => match input.fields.get(field) {
                Some(Value::Array(tools)) => Some(tools.clone()),
                Some(other) => return Err(StageError::new(format!("sample `{}`: `{field}` holds {other}, not a list of tools", item.id))),
                None => return Err(StageError::new(format!("sample `{}` has no `{field}` field holding its tools", item.id))),
            },
        };
        let mut context = input.fields;
        context.insert("id".into(), Value::String(input.id));
        // A conversation's earlier turns go as they are; its last is the template's `prompt`.
        let earlier = match &input.conversation {
            None => Vec::new(),
            Some(field) => {
                let mut turns = conversation(context.get(field), field)?;
                let last = turns.pop().expect("a conversation has a last turn");
                if input.system.is_some() && turns.first().is_some_and(|t| t.role == "system") {
                    return Err(StageError::new(format!(
                        "the conversation in `{field}` begins with a system turn, and the prompt has a `system` message too: keep one (the prompt's is the one `revise` can change)"
                    )));
                }
                context.insert(LAST_TURN.into(), Value::String(last.content));
                turns
            }
        };
        let render = |source: &str| {
            compiled(source)
                .and_then(|env| env.get_template(COMPILED_NAME)?.render(minijinja::Value::from(minijinja::value::Serde(&context))))
                .map_err(|e| {
                    let at = e.line().map(|l| format!(" (template line {l})")).unwrap_or_default();
                    StageError::new(format!("{}{at}", e.detail().map(str::to_string).unwrap_or_else(|| e.to_string())))
                })
        };
        let mut messages = Vec::new();
        if let Some(system) = &input.system {
            messages.push(Message::new("system", render(system)?));
        }
        messages.extend(earlier);
        messages.push(Message::new("user", render(&input.template)?));
        Ok(serde_json::to_value(RenderedSample { id: item.id.clone(), messages, tools }).expect("a rendered sample serializes"))
    }

    fn finish(&self, input: &StageInput, results: Vec<(Item, Value)>) -> Result<Value, StageError> {
        let prompt: artifacts::Prompt = input.read("prompt")?;
        let samples = results
            .into_iter()
            .map(|(item, sample)| RenderedSample::deserialize(&sample).map_err(|e| StageError::new(format!("the rendered sample `{}` is malformed: {e}", item.id))))
            .collect::<Result<_, StageError>>()?;
        Ok(Rendered { prompt: prompt.source, samples }.to_json())
    }
}

/// One rendering's memoized input: the sample, and the prompt's templates.
#[derive(Serialize, Deserialize)]
struct RenderInput {
    id: String,
    fields: serde_json::Map<String, Value>,
    system: Option<String>,
    template: String,
    /// The field holding a multi-turn sample's conversation (only when set: single-turn items
    /// keep their keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    conversation: Option<String>,
    /// The field holding a sample's tools (only when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tools: Option<String>,
    /// What the result is: [`RESULT_IS_THE_SAMPLE`]. Results memoized by earlier builds were the
    /// messages alone, under keys without this.
    result: u32,
}

impl RenderInput {
    /// The input as a JSON value, as `serde_json::to_value` makes it, the sample's fields moved
    /// rather than copied (a million samples' fields were each copied once more).
    fn into_value(self) -> Value {
        let RenderInput { id, fields, system, template, conversation, tools, result } = self;
        let mut value = serde_json::Map::new();
        value.insert("id".into(), Value::String(id));
        value.insert("fields".into(), Value::Object(fields));
        value.insert("system".into(), system.map_or(Value::Null, Value::String));
        value.insert("template".into(), Value::String(template));
        if let Some(conversation) = conversation {
            value.insert("conversation".into(), Value::String(conversation));
        }
        if let Some(tools) = tools {
            value.insert("tools".into(), Value::String(tools));
        }
        value.insert("result".into(), Value::from(result));
        Value::Object(value)
    }
}

/// An item's result is the whole rendered sample (its id, messages and tools), an element of the
/// output as it is.
const RESULT_IS_THE_SAMPLE: u32 = 2;

/// A sample's conversation read from its `field`: turns with a known role and text, the last a
/// user turn (the one the model answers), a system turn only first.
fn conversation(value: Option<&Value>, field: &str) -> Result<Vec<Message>, StageError> {
    let value = value.ok_or_else(|| StageError::new(format!("the sample has no `{field}` field holding its conversation")))?;
    let turns: Vec<Message> = serde_json::from_value(value.clone())
        .map_err(|e| StageError::new(format!("`{field}` is not a conversation (a list of {{\"role\": \"user\", \"content\": \"...\"}} turns): {e}")))?;
    for (i, turn) in turns.iter().enumerate() {
        match turn.role.as_str() {
            "user" | "assistant" => {}
            "system" if i == 0 => {}
            "system" => return Err(StageError::new(format!("`{field}`: turn {} is a system turn; only the first may be", i + 1))),
            other => return Err(StageError::new(format!("`{field}`: turn {} has role `{other}`: use `system`, `user` or `assistant`", i + 1))),
        }
    }
    match turns.last() {
        Some(t) if t.role == "user" => Ok(turns),
        Some(t) => Err(StageError::new(format!("the last turn of `{field}` is `{}`'s: a conversation ends with the user turn the model answers", t.role))),
        None => Err(StageError::new(format!("`{field}` is an empty conversation: it needs at least the user turn the model answers"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_render_input_is_the_value_serde_makes_of_it() {
        let fields: serde_json::Map<String, Value> = serde_json::from_str(r#"{"text": "hi", "n": [1, {"b": null}]}"#).unwrap();
        for (system, conversation, tools) in [(None, None, None), (Some("be brief"), Some("turns"), Some("tools"))] {
            let input = || RenderInput {
                id: "s1".into(),
                fields: fields.clone(),
                system: system.map(Into::into),
                template: "{{ text }}".into(),
                conversation: conversation.map(Into::into),
                tools: tools.map(Into::into),
                result: RESULT_IS_THE_SAMPLE,
            };
            let (moved, made) = (input().into_value(), serde_json::to_value(input()).unwrap());
            assert_eq!(moved, made);
            assert_eq!(serde_json::to_string(&moved).unwrap(), serde_json::to_string(&made).unwrap(), "the same keys in the same order");
        }
    }
    use serde_json::json;

    fn render(template: &str, fields: Value) -> Result<Value, StageError> {
        let item = Item { id: "s1".into(), input: json!({"id": "s1", "fields": fields, "system": "Be brief.", "template": template, "result": RESULT_IS_THE_SAMPLE}) };
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let sample = rt.block_on(RenderStage(RenderConfig { split: Split::All, conversation: None, tools: None }, None, None).run_item(&item, &ItemContext { seed: 0, cancel: Default::default(), progress: Default::default() }))?;
        assert_eq!(sample["id"], "s1", "the result is the whole sample");
        Ok(sample["messages"].clone())
    }

    #[test]
    fn finds_what_a_template_reads_and_where() {
        let source = "{# text in a comment #}Sample text: {{ text }}\n{% for d in docs %}{{ d }} {{ loop.index }}{% endfor %}{{ range(3) | list }}{{ id }}";
        let found: Vec<(String, &str)> = variables(source).into_iter().map(|(n, r)| (n, &source[r])).collect();
        assert_eq!(found, [("docs".to_string(), "docs"), ("id".into(), "id"), ("text".into(), "text")]);
        // `text` is located inside the tag, not in the comment or the prose before it.
        assert_eq!(first_use(source, "text"), Some(39..43));
        assert_eq!(first_use("{{ texts }} {{ text }}", "text"), Some(15..19));
        assert!(variables("{{ unclosed").is_empty());
    }

    #[test]
    fn renders_sample_fields_into_messages() {
        assert_eq!(
            render("Sample {{ id }}: {{ text | upper }}", json!({"text": "refund please"})).unwrap(),
            json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sample s1: REFUND PLEASE"}])
        );
    }

    #[test]
    fn templates_cannot_reach_files_the_environment_or_unbounded_work() {
        unsafe { std::env::set_var("PIPELINE_TEMPLATE_CANARY", "canary-8b1f") };
        let fields = json!({"text": "hello"});
        for (template, why) in [
            ("{% include '/etc/passwd' %}", "include"),
            ("{% include 'Cargo.toml' %}", "include"),
            ("{% import '/etc/hostname' as h %}{{ h }}", "import"),
            ("{% extends '/etc/passwd' %}", "extends"),
            ("{{ env.PIPELINE_TEMPLATE_CANARY }}", "env"),
            ("{{ environ }}", "environ"),
            ("{{ os.environ }}", "os"),
            ("{{ self }}", "self"),
            ("{{ config }}", "config"),
            ("{{ lookup('PIPELINE_TEMPLATE_CANARY') }}", "lookup"),
            ("{{ open('/etc/passwd') }}", "open"),
            ("{{ now() }}", "clock"),
            ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "runaway loop"),
            ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "unbounded recursion"),
            ("{{ 'x' * 4000000000 }}", "a 4 GB string"),
        ] {
            let started = std::time::Instant::now();
            let out = render(template, fields.clone());
            assert!(out.is_err(), "{why}: `{template}` rendered {out:?}");
            let e = out.unwrap_err().message;
            assert!(!e.contains("root:") && !e.contains("canary-8b1f") && !e.contains("[workspace]"), "{why}: {e}");
            assert!(started.elapsed() < std::time::Duration::from_secs(5), "{why} took {:?}", started.elapsed());
        }
        // What a template does see: the sample (and `debug()` shows nothing more).
        let seen = render("{{ debug() }}", fields).unwrap()[1]["content"].as_str().unwrap().to_string();
        assert!(seen.contains("hello") && seen.contains("s1") && !seen.contains("canary-8b1f"), "{seen}");
        // A realistic prompt stays well inside the fuel.
        let examples: Vec<Value> = (0..2000).map(|i| json!({"q": format!("question {i}"), "a": "answer"})).collect();
        assert!(render("{% for e in examples %}Q: {{ e.q }}\nA: {{ e.a }}\n{% endfor %}", json!({"examples": examples})).is_ok());
    }

    /// Templates are compiled once per source (`compiled`): each rendering still gets the whole
    /// fuel, and a template that fails to compile fails every time, as it did compiled per sample.
    #[test]
    fn a_template_compiled_once_renders_each_sample_afresh() {
        // A million iterations: more than half the fuel, less than all of it.
        let loop_ = "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}";
        let (long, twice) = (format!("{loop_}{{{{ text }}}}"), format!("{loop_}{loop_}{{{{ text }}}}"));
        let e = render(&twice, json!({"text": "x"})).unwrap_err().message;
        assert!(e.contains("fuel"), "the loop should take more than half the fuel: {e}");
        for text in ["a", "b", "c"] {
            assert_eq!(render(&long, json!({"text": text})).unwrap()[1]["content"], text);
        }
        for _ in 0..2 {
            assert!(render("{% for %}", json!({"text": "x"})).unwrap_err().message.contains("template line 1"));
        }
    }

    #[test]
    fn undefined_variables_are_errors_that_name_the_line() {
        let e = render("line one\n{{ txt }}", json!({"text": "x"})).unwrap_err();
        assert_eq!(e.message, "`txt` is undefined (template line 2)");
    }

    #[test]
    fn templates_cannot_reach_files_or_environment() {
        assert!(render("{% include 'secret.txt' %}", json!({})).is_err());
        assert!(render("{{ env.HOME }}", json!({})).is_err());
    }
}
