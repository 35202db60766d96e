//! Pipeline files: TOML → validated [`Pipeline`].
//!
//! The file is parsed into toml's spanned document tree, then walked by hand so that every
//! problem is collected with its location instead of stopping at the first. A stage table is
//! dispatched on its `kind` *before* its other fields are deserialized into the plugin's config
//! type; unknown keys are found by comparing against the plugin's JSON Schema, so they are all
//! reported, each at its own key. Graph checks (dangling `needs`, port types, cycles, feedback)
//! run only over stages that parsed.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::diag::{Diagnostic, SourceFile, did_you_mean, one_of};
use crate::registry::Registry;
use crate::stage::{BuildContext, Stage};

/// A validated pipeline: ids resolved, ports bound, files found, stages in topological order.
pub struct Pipeline {
    pub file: SourceFile,
    /// Directory that relative paths in the file are resolved against.
    pub base_dir: PathBuf,
    /// The file stem; names the lockfile and the pipeline's records in the store.
    pub name: String,
    pub description: Option<String>,
    pub seed: u64,
    pub targets: Option<Targets>,
    pub iterate: Option<Iterate>,
    /// Topological order (ties broken by file order).
    pub stages: Vec<StageNode>,
}

pub struct StageNode {
    pub id: String,
    pub kind: &'static str,
    pub version: u32,
    pub output_ty: &'static str,
    /// (input name, index into `Pipeline::stages`) for every `needs` entry. The input name is the
    /// port's name, or the upstream stage id for a port that takes any artifact ([`crate::stage::ANY`]).
    pub inputs: Vec<(String, usize)>,
    pub stage: Arc<dyn Stage>,
    /// Canonical config (serialized plugin config), fingerprinted and diffed.
    pub config: Value,
    /// Referenced files: (path as written, resolved path).
    pub files: Vec<(String, PathBuf)>,
}

pub struct Targets {
    /// Index of the stage whose output's `metrics` are checked.
    pub from: usize,
    pub bounds: BTreeMap<String, Bound>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Bound {
    /// The metric must be at least this.
    pub min: Option<f64>,
    /// The metric must be at most this.
    pub max: Option<f64>,
}

impl Bound {
    pub fn admits(&self, value: f64) -> bool {
        self.min.is_none_or(|m| value >= m) && self.max.is_none_or(|m| value <= m)
    }
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.min, self.max) {
            (Some(a), Some(b)) => write!(f, "in [{a}, {b}]"),
            (Some(a), None) => write!(f, "≥ {a}"),
            (None, Some(b)) => write!(f, "≤ {b}"),
            (None, None) => f.write_str("anything"),
        }
    }
}

pub struct Iterate {
    pub max_iterations: u32,
    /// Stop after this many iterations in a row whose feedback stage reports no progress.
    pub patience: Option<u32>,
    /// Start no iteration once the run has computed this many items.
    pub max_items: Option<u64>,
    /// Index of the stage whose output feeds back.
    pub from: usize,
    /// Index of the stage whose output it replaces in the next iteration.
    pub to: usize,
}

/// `[iterate]` as written.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IterateConfig {
    /// Upper bound on loop iterations (the first run counts as iteration 1).
    #[schemars(range(min = 1))]
    pub max_iterations: u32,
    /// Stop after this many iterations in a row without progress: the feedback stage reports
    /// `metrics.improved = 0` (`revise`: its last revision was rejected).
    #[schemars(range(min = 1))]
    pub patience: Option<u32>,
    /// A budget of items computed (model calls, renderings; not those taken from the memo) over
    /// the whole run: no iteration starts once it is spent.
    #[schemars(range(min = 1))]
    pub max_items: Option<u64>,
    /// The feedback edge: `from`'s output replaces `to`'s output in the next iteration.
    pub feedback: FeedbackConfig,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedbackConfig {
    #[schemars(with = "String")]
    pub from: Spanned<String>,
    #[schemars(with = "String")]
    pub to: Spanned<String>,
}

pub(crate) const TOP_LEVEL_KEYS: &[&str] = &["description", "seed", "targets", "iterate", "stages"];
const STAGE_COMMON_KEYS: &[&str] = &["kind", "needs"];

/// Read and validate a pipeline file. `Err` holds every problem found.
pub fn load(path: &Path, registry: &Registry) -> Result<Pipeline, Vec<Diagnostic>> {
    parse(SourceFile::read(path, "pipeline file").map_err(|d| vec![d])?, registry)
}

struct RawStage {
    id: String,
    id_span: Range<usize>,
    kind: &'static str,
    ports: &'static [crate::stage::Port],
    needs: Vec<Spanned<String>>,
    /// `needs` was written but could not be read: do not report missing inputs on top.
    needs_invalid: bool,
    node: Option<StageNode>,
}

pub fn parse(file: SourceFile, registry: &Registry) -> Result<Pipeline, Vec<Diagnostic>> {
    let text = file.text.clone();
    let (root, syntax) = DeTable::parse_recoverable(&text);
    if !syntax.is_empty() {
        return Err(syntax
            .into_iter()
            .map(|e| {
                let span = e.span().unwrap_or(0..0);
                Diagnostic::error(format!("invalid TOML: {}", e.message().trim_end())).at(&file, span, "here")
            })
            .collect());
    }
    let base_dir = file.path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base_dir = if base_dir.as_os_str().is_empty() { PathBuf::from(".") } else { base_dir };
    let name = file.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "pipeline".into());

    let mut diags = Vec::new();
    let mut seed = 0u64;
    let mut description = None;
    let mut raw_targets = None;
    let mut raw_iterate = None;
    let mut stages = Vec::new();
    let mut saw_stages = false;

    for (key, value) in root.get_ref().iter() {
        match key.get_ref().as_ref() {
            "seed" => seed = typed(&file, value, "`seed`", &mut diags).unwrap_or(0),
            "description" => description = typed(&file, value, "`description`", &mut diags),
            "targets" => raw_targets = parse_targets(&file, value, &mut diags),
            "iterate" => {
                raw_iterate = typed::<IterateConfig>(&file, value, "`iterate`", &mut diags).map(|c| (c, value.span()))
            }
            "stages" => {
                saw_stages = true;
                stages = parse_stages(&file, &base_dir, value, registry, &mut diags);
            }
            other => {
                let mut d = Diagnostic::error(format!("unknown top-level key `{other}`")).at(&file, key.span(), "unknown key");
                d = match did_you_mean(other, TOP_LEVEL_KEYS.iter().copied()) {
                    Some(s) => d.help(format!("did you mean `{s}`?")),
                    None => d.help(format!("valid top-level keys are: {}", one_of(TOP_LEVEL_KEYS))),
                };
                diags.push(d);
            }
        }
    }
    if !saw_stages {
        diags.push(
            Diagnostic::error("the pipeline has no `[stages]`")
                .at(&file, 0..0, "expected at least one `[stages.<id>]` table")
                .help(format!("add e.g. `[stages.data]` with `kind = ...`; valid kinds are: {}", one_of(&registry.kind_names()))),
        );
    }

    let order = check_graph(&file, &mut stages, &mut diags);

    let index: HashMap<&str, usize> = stages.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
    let find = |name: &Spanned<String>, what: &str, diags: &mut Vec<Diagnostic>| -> Option<usize> {
        let found = index.get(name.get_ref().as_str()).copied();
        if found.is_none() {
            let mut d = Diagnostic::error(format!("{what} names unknown stage `{}`", name.get_ref()))
                .at(&file, name.span(), "no such stage");
            if let Some(s) = did_you_mean(name.get_ref(), stages.iter().map(|s| s.id.as_str())) {
                d = d.help(format!("did you mean `{s}`?"));
            }
            diags.push(d);
        }
        found
    };

    let targets = raw_targets.and_then(|(from, bounds, names)| {
        let from = find(&from, "`targets.from`", &mut diags)?;
        check_target_names(&file, &stages[from], &names, &mut diags);
        Some((from, bounds))
    });

    let iterate = raw_iterate.and_then(|(cfg, span)| {
        let from = find(&cfg.feedback.from, "`iterate.feedback.from`", &mut diags);
        let to = find(&cfg.feedback.to, "`iterate.feedback.to`", &mut diags);
        let (from, to) = (from?, to?);
        if cfg.max_iterations == 0 {
            diags.push(Diagnostic::error("`iterate.max_iterations` must be at least 1").at(&file, span.clone(), "here"));
        }
        if cfg.patience == Some(0) || cfg.max_items == Some(0) {
            diags.push(Diagnostic::error("`iterate.patience` and `iterate.max_items` must be at least 1 when set").at(&file, span.clone(), "here"));
        }
        let (f, t) = (&stages[from], &stages[to]);
        if let (Some(fnode), Some(tnode)) = (&f.node, &t.node) {
            if fnode.output_ty != tnode.output_ty {
                diags.push(
                    Diagnostic::error(format!(
                        "feedback from `{}` (produces `{}`) cannot replace `{}` (produces `{}`)",
                        f.id, fnode.output_ty, t.id, tnode.output_ty
                    ))
                    .at(&file, cfg.feedback.from.span(), "output types differ"),
                );
            }
        }
        if order.is_some() && !depends_on(&stages, &index, from, to) {
            diags.push(
                Diagnostic::error(format!("feedback from `{}` to `{}` is not a loop: `{}` does not depend on `{}`", f.id, t.id, f.id, t.id))
                    .at(&file, cfg.feedback.from.span(), "not downstream of `to`")
                    .help("the feedback source must be downstream of the stage whose output it replaces"),
            );
        }
        Some((cfg.max_iterations.max(1), cfg.patience, cfg.max_items, from, to))
    });

    // Each stage against what its inputs will hold (a template's variables against the dataset's
    // fields), from the facts their stages know at build time.
    let facts: Vec<Value> = stages.iter().map(|s| s.node.as_ref().map_or(Value::Null, |n| n.stage.facts())).collect();
    for stage in &stages {
        let Some(node) = &stage.node else { continue };
        let inputs: BTreeMap<String, Value> = node.inputs.iter().map(|(port, up)| (port.clone(), facts[*up].clone())).collect();
        diags.extend(node.stage.check_inputs(&file, &inputs));
    }

    if !diags.is_empty() {
        return Err(diags);
    }
    let order = order.expect("graph checks passed");
    // Renumber stages into topological order.
    let mut new_index = vec![0; stages.len()];
    for (pos, &old) in order.iter().enumerate() {
        new_index[old] = pos;
    }
    let mut slots: Vec<Option<StageNode>> = stages.into_iter().map(|s| s.node).collect();
    let mut nodes = Vec::with_capacity(slots.len());
    for &old in &order {
        let mut node = slots[old].take().expect("every stage built");
        for (_, up) in &mut node.inputs {
            *up = new_index[*up];
        }
        nodes.push(node);
    }
    Ok(Pipeline {
        file,
        base_dir,
        name,
        description,
        seed,
        targets: targets.map(|(from, bounds)| Targets { from: new_index[from], bounds }),
        iterate: iterate.map(|(max_iterations, patience, max_items, from, to)| Iterate {
            max_iterations,
            patience,
            max_items,
            from: new_index[from],
            to: new_index[to],
        }),
        stages: nodes,
    })
}

fn typed<T: DeserializeOwned>(file: &SourceFile, value: &Spanned<DeValue<'_>>, what: &str, diags: &mut Vec<Diagnostic>) -> Option<T> {
    match T::deserialize(ValueDeserializer::from(value.clone())) {
        Ok(v) => Some(v),
        Err(e) => {
            let span = e.span().unwrap_or(value.span());
            diags.push(Diagnostic::error(format!("{what}: {}", e.message().trim_end())).at(file, span, "here"));
            None
        }
    }
}

/// Each target names a metric the `from` stage reports (when its kind can tell at build time).
fn check_target_names(file: &SourceFile, from: &RawStage, names: &[(String, Range<usize>)], diags: &mut Vec<Diagnostic>) {
    let Some(node) = &from.node else { return };
    let Some(reported) = node.stage.metrics() else { return };
    for (name, span) in names {
        if reported.contains(&name.as_str()) {
            continue;
        }
        let mut d = Diagnostic::error(format!("target `{name}`: stage `{}` (kind `{}`) reports no such metric", from.id, node.kind))
            .at(file, span.clone(), "not reported by `targets.from`");
        d = if reported.is_empty() {
            d.help(format!("`{}` reports no metrics; point `targets.from` at a stage that judges or decides", from.id))
        } else {
            d.suggest(name, reported, "it reports")
        };
        diags.push(d);
    }
}

fn parse_targets(
    file: &SourceFile,
    value: &Spanned<DeValue<'_>>,
    diags: &mut Vec<Diagnostic>,
) -> Option<(Spanned<String>, BTreeMap<String, Bound>, Vec<(String, Range<usize>)>)> {
    let Some(table) = value.get_ref().as_table() else {
        diags.push(Diagnostic::error("`targets` must be a table").at(file, value.span(), format!("found {}", value.get_ref().type_str())));
        return None;
    };
    let mut from = None;
    let mut bounds = BTreeMap::new();
    let mut names = Vec::new();
    for (key, v) in table.iter() {
        let name = key.get_ref().as_ref();
        if name == "from" {
            from = typed::<Spanned<String>>(file, v, "`targets.from`", diags);
            continue;
        }
        if let Some(bound) = typed::<Bound>(file, v, &format!("target `{name}`"), diags) {
            if bound.min.is_none() && bound.max.is_none() {
                diags.push(
                    Diagnostic::error(format!("target `{name}` sets no bound"))
                        .at(file, v.span(), "empty")
                        .help("write e.g. `{ min = 0.8 }` or `{ max = 2000 }`"),
                );
            }
            bounds.insert(name.to_string(), bound);
            names.push((name.to_string(), key.span()));
        }
    }
    match from {
        Some(from) if !bounds.is_empty() => Some((from, bounds, names)),
        Some(_) => {
            diags.push(
                Diagnostic::error("`targets` names no metric")
                    .at(file, value.span(), "here")
                    .help("add e.g. `accuracy = { min = 0.8 }`"),
            );
            None
        }
        None => {
            diags.push(
                Diagnostic::error("`targets` needs `from`: the stage whose output `metrics` are checked")
                    .at(file, value.span(), "missing `from`"),
            );
            None
        }
    }
}

fn parse_stages(
    file: &SourceFile,
    base_dir: &Path,
    value: &Spanned<DeValue<'_>>,
    registry: &Registry,
    diags: &mut Vec<Diagnostic>,
) -> Vec<RawStage> {
    let Some(table) = value.get_ref().as_table() else {
        diags.push(Diagnostic::error("`stages` must be a table of stage tables").at(file, value.span(), format!("found {}", value.get_ref().type_str())));
        return Vec::new();
    };
    let kinds = registry.kind_names();
    let mut out = Vec::new();
    for (key, value) in table.iter() {
        let id = key.get_ref().to_string();
        if !valid_id(&id) {
            diags.push(
                Diagnostic::error(format!("invalid stage id `{id}`"))
                    .at(file, key.span(), "invalid id")
                    .help("stage ids are letters, digits, `_` and `-`, starting with a letter"),
            );
            continue;
        }
        let Some(stage) = value.get_ref().as_table() else {
            diags.push(
                Diagnostic::error(format!("stage `{id}` must be a table"))
                    .at(file, value.span(), format!("found {}", value.get_ref().type_str())),
            );
            continue;
        };
        // Dispatch on `kind` first.
        let Some(kind_value) = stage.get("kind") else {
            diags.push(
                Diagnostic::error(format!("stage `{id}` has no `kind`"))
                    .at(file, key.span(), "missing `kind`")
                    .help(format!("valid kinds are: {}", one_of(&kinds))),
            );
            continue;
        };
        let Some(kind_name) = kind_value.get_ref().as_str() else {
            diags.push(
                Diagnostic::error(format!("stage `{id}`: `kind` must be a string"))
                    .at(file, kind_value.span(), format!("found {}", kind_value.get_ref().type_str()))
                    .help(format!("valid kinds are: {}", one_of(&kinds))),
            );
            continue;
        };
        let Some(plugin) = registry.get(kind_name) else {
            let mut d = Diagnostic::error(format!("stage `{id}`: unknown kind `{kind_name}`")).at(file, kind_value.span(), "unknown kind");
            d = match did_you_mean(kind_name, kinds.iter().copied()) {
                Some(s) => d.help(format!("did you mean `{s}`? valid kinds are: {}", one_of(&kinds))),
                None => d.help(format!("valid kinds are: {}", one_of(&kinds))),
            };
            diags.push(d);
            continue;
        };

        let (needs, needs_invalid) = match stage.get("needs") {
            None => (Vec::new(), false),
            Some(v) => match typed::<Vec<Spanned<String>>>(file, v, &format!("stage `{id}`: `needs`"), diags) {
                Some(needs) => (needs, false),
                None => (Vec::new(), true),
            },
        };

        let schema = plugin.config_schema();
        let allowed: Vec<&str> = STAGE_COMMON_KEYS
            .iter()
            .copied()
            .chain(schema.get("properties").and_then(Value::as_object).into_iter().flat_map(|p| p.keys().map(String::as_str)))
            .collect();
        let mut config = DeTable::new();
        let mut unknown = false;
        for (k, v) in stage.iter() {
            let name = k.get_ref().as_ref();
            if STAGE_COMMON_KEYS.contains(&name) {
                continue;
            }
            if !allowed.contains(&name) {
                unknown = true;
                let mut d = Diagnostic::error(format!("stage `{id}`: unknown key `{name}` for kind `{kind_name}`")).at(file, k.span(), "unknown key");
                d = match did_you_mean(name, allowed.iter().copied()) {
                    Some(s) => d.help(format!("did you mean `{s}`?")),
                    None => d.help(format!("valid keys for `{kind_name}` are: {}", one_of(&allowed))),
                };
                diags.push(d);
                continue;
            }
            config.insert(k.clone(), v.clone());
        }
        let node = if unknown {
            None
        } else {
            let key_spans = config.iter().map(|(k, v)| (k.get_ref().to_string(), v.span())).collect();
            let mut cx = BuildContext { pipeline: file, base_dir, stage_id: &id, files: Vec::new(), stage_span: key.span(), key_spans };
            match plugin.build(Spanned::new(value.span(), DeValue::Table(config)), &mut cx) {
                Ok((stage, config)) => Some(StageNode {
                    id: id.clone(),
                    kind: plugin.kind(),
                    version: plugin.version(),
                    output_ty: plugin.output(),
                    inputs: Vec::new(),
                    stage,
                    config,
                    files: cx.files.into_iter().map(|(f, p)| (f.path, p)).collect(),
                }),
                Err(mut ds) => {
                    diags.append(&mut ds);
                    None
                }
            }
        };
        out.push(RawStage { id, id_span: key.span(), kind: plugin.kind(), ports: plugin.inputs(), needs, needs_invalid, node });
    }
    out
}

fn valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic()) && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Resolve `needs`, bind ports, find cycles. Returns a topological order when the graph is sound.
fn check_graph(file: &SourceFile, stages_mut: &mut [RawStage], diags: &mut Vec<Diagnostic>) -> Option<Vec<usize>> {
    let stages: &[RawStage] = stages_mut;
    let before = diags.len();
    let index: HashMap<&str, usize> = stages.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
    let mut graph = DiGraph::<usize, Range<usize>>::new();
    let nodes: Vec<NodeIndex> = (0..stages.len()).map(|i| graph.add_node(i)).collect();
    let mut bindings: Vec<Vec<(String, usize)>> = vec![Vec::new(); stages.len()];

    for (i, s) in stages.iter().enumerate() {
        for need in &s.needs {
            let name = need.get_ref();
            let Some(&up) = index.get(name.as_str()) else {
                let mut d = Diagnostic::error(format!("stage `{}` needs unknown stage `{name}`", s.id)).at(file, need.span(), "no such stage");
                if let Some(sug) = did_you_mean(name, stages.iter().map(|s| s.id.as_str())) {
                    d = d.help(format!("did you mean `{sug}`?"));
                }
                diags.push(d);
                continue;
            };
            if up == i {
                diags.push(Diagnostic::error(format!("stage `{}` needs itself", s.id)).at(file, need.span(), "self-dependency"));
                continue;
            }
            graph.add_edge(nodes[up], nodes[i], need.span());
            // Bind to a port by artifact type (only when both stages built).
            let (Some(_), Some(upnode)) = (&s.node, &stages[up].node) else { continue };
            let ports = s.ports;
            let port = ports.iter().find(|p| p.ty == upnode.output_ty).or_else(|| ports.iter().find(|p| p.ty == crate::stage::ANY));
            match port {
                None => diags.push(
                    Diagnostic::error(format!(
                        "stage `{}` (kind `{}`) cannot take `{name}`: it produces `{}`",
                        s.id, s.kind, upnode.output_ty
                    ))
                    .at(file, need.span(), format!("a `{}`", upnode.output_ty))
                    .help(if ports.is_empty() {
                        format!("kind `{}` takes no inputs", s.kind)
                    } else {
                        format!("kind `{}` takes: {}", s.kind, describe_ports(ports))
                    }),
                ),
                Some(port) if port.ty == crate::stage::ANY => bindings[i].push((name.clone(), up)),
                Some(port) => {
                    if let Some((_, other)) = bindings[i].iter().find(|(p, _)| p == port.name) {
                        diags.push(
                            Diagnostic::error(format!(
                                "stage `{}` gets two inputs for port `{}` (`{}` and `{name}`)",
                                s.id, port.name, stages[*other].id
                            ))
                            .at(file, need.span(), "second input of the same type"),
                        );
                    } else {
                        bindings[i].push((port.name.to_string(), up));
                    }
                }
            }
        }
    }
    // Missing inputs.
    for (i, s) in stages.iter().enumerate() {
        if s.node.is_none() || s.needs_invalid || s.needs.iter().any(|n| !index.contains_key(n.get_ref().as_str()) || stages[index[n.get_ref().as_str()]].node.is_none()) {
            continue;
        }
        for port in s.ports.iter().filter(|p| p.ty != crate::stage::ANY && !p.optional) {
            if !bindings[i].iter().any(|(p, _)| p == port.name) {
                diags.push(
                    Diagnostic::error(format!("stage `{}` (kind `{}`) is missing its `{}` input (a `{}`)", s.id, s.kind, port.name, port.ty))
                        .at(file, s.id_span.clone(), format!("add a stage producing `{}` to `needs`", port.ty)),
                );
            }
        }
    }
    // Cycles, each named.
    for scc in tarjan_scc(&graph) {
        if scc.len() < 2 {
            continue;
        }
        let mut members: Vec<usize> = scc.iter().map(|n| graph[*n]).collect();
        members.sort_unstable();
        let cycle = find_cycle(&graph, &nodes, &members);
        let names: Vec<&str> = cycle.iter().map(|&i| stages[i].id.as_str()).chain(std::iter::once(stages[cycle[0]].id.as_str())).collect();
        let edge_span = |a: usize, b: usize| graph.find_edge(nodes[a], nodes[b]).map(|e| graph[e].clone()).unwrap_or(0..0);
        let mut d = Diagnostic::error(format!("dependency cycle: {}", names.join(" → ")))
            .at(file, edge_span(cycle[cycle.len() - 1], cycle[0]), format!("`{}` needs `{}`", stages[cycle[0]].id, stages[cycle[cycle.len() - 1]].id));
        for w in cycle.windows(2) {
            d = d.also(file, edge_span(w[0], w[1]), format!("`{}` needs `{}`", stages[w[1]].id, stages[w[0]].id));
        }
        diags.push(d.help("a pipeline is a DAG; to loop, declare a feedback edge in `[iterate]`"));
    }
    if diags.len() > before || stages.iter().any(|s| s.node.is_none()) {
        return None;
    }
    // Topological order, ties by file order (stable, so output is predictable).
    let mut indegree: Vec<usize> = (0..stages.len()).map(|i| graph.neighbors_directed(nodes[i], petgraph::Incoming).count()).collect();
    let mut order = Vec::with_capacity(stages.len());
    let mut ready: std::collections::BTreeSet<usize> = (0..stages.len()).filter(|&i| indegree[i] == 0).collect();
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for n in graph.neighbors_directed(nodes[i], petgraph::Outgoing) {
            let j = graph[n];
            indegree[j] -= 1;
            if indegree[j] == 0 {
                ready.insert(j);
            }
        }
    }
    debug_assert_eq!(order.len(), stages.len());
    // Hand the bindings to the nodes (still in file numbering; `parse` renumbers).
    for (s, b) in stages_mut.iter_mut().zip(bindings) {
        if let Some(node) = &mut s.node {
            node.inputs = b;
        }
    }
    Some(order)
}

fn describe_ports(ports: &[crate::stage::Port]) -> String {
    ports.iter().map(|p| format!("`{}` (a `{}`)", p.name, p.ty)).collect::<Vec<_>>().join(", ")
}

/// A shortest cycle through the smallest member of a strongly connected component.
fn find_cycle(graph: &DiGraph<usize, Range<usize>>, nodes: &[NodeIndex], members: &[usize]) -> Vec<usize> {
    let start = members[0];
    let successors = |i: usize| {
        let mut next: Vec<usize> = graph.neighbors_directed(nodes[i], petgraph::Outgoing).map(|n| graph[n]).filter(|j| members.contains(j)).collect();
        next.sort_unstable();
        next
    };
    let mut parent: HashMap<usize, usize> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(cur) = queue.pop_front() {
        for next in successors(cur) {
            if next == start {
                let mut path = vec![cur];
                while let Some(&p) = parent.get(path.last().unwrap()) {
                    path.push(p);
                }
                path.reverse();
                return path;
            }
            if next != start && !parent.contains_key(&next) {
                parent.insert(next, cur);
                queue.push_back(next);
            }
        }
    }
    members.to_vec()
}

fn depends_on(stages: &[RawStage], index: &HashMap<&str, usize>, from: usize, to: usize) -> bool {
    let mut stack = vec![from];
    let mut seen = vec![false; stages.len()];
    while let Some(i) = stack.pop() {
        if i == to {
            return true;
        }
        if std::mem::replace(&mut seen[i], true) {
            continue;
        }
        stack.extend(stages[i].needs.iter().filter_map(|n| index.get(n.get_ref().as_str()).copied()));
    }
    false
}
