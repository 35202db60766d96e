//! Everything the binary prints: human text on a terminal, or one JSON document with `--json`.

use std::io::IsTerminal;
use std::path::Path;

use engine::exec::{PlanStatus, Status, StopReason};
use engine::{Diagnostic, Pipeline, PlanReport, Registry, RunReport};
use serde_json::json;

use crate::GraphFormat;

pub fn color() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Write to stdout; a closed pipe (`pipeline show ... | head`) ends the program quietly.
pub fn stdout(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(3);
    }
}

pub fn diagnostics(diags: &[Diagnostic], json: bool) {
    if json {
        let list: Vec<_> = diags.iter().map(Diagnostic::to_json).collect();
        println!("{}", json!({"ok": false, "exit_code": 2, "diagnostics": list}));
        return;
    }
    let color = color();
    for d in diags {
        eprintln!("{}\n", d.render(color));
    }
    let n = diags.len();
    eprintln!("error: {n} problem{} found; nothing was run", if n == 1 { "" } else { "s" });
}

pub fn valid(p: &Pipeline, json: bool) {
    if json {
        let stages: Vec<_> = p.stages.iter().map(|s| json!({"id": s.id, "kind": s.kind, "output": s.output_ty})).collect();
        println!("{}", json!({"ok": true, "pipeline": p.name, "stages": stages}));
    } else {
        let order: Vec<&str> = p.stages.iter().map(|s| s.id.as_str()).collect();
        println!("ok: {} is valid ({} stages: {})", p.file.path.display(), order.len(), order.join(", "));
    }
}

pub fn kinds(registry: &Registry, json: bool) {
    if json {
        let list: Vec<_> = registry
            .kinds()
            .map(|k| json!({"kind": k.kind(), "summary": k.summary(), "output": k.output(), "inputs": k.inputs().iter().map(|p| json!({"name": p.name, "type": p.ty, "optional": p.optional})).collect::<Vec<_>>()}))
            .collect();
        println!("{}", json!(list));
        return;
    }
    for k in registry.kinds() {
        let takes: Vec<String> = k.inputs().iter().map(|p| format!("{}: {}{}", p.name, p.ty, if p.optional { " (optional)" } else { "" })).collect();
        println!("{:<10} ({}) -> {}\n           {}", k.kind(), takes.join(", "), k.output(), k.summary());
    }
}

pub fn plan(plan: &PlanReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string(plan).expect("JSON"));
        return;
    }
    let width = plan.stages.iter().map(|s| s.id.len()).max().unwrap_or(0);
    for s in &plan.stages {
        let status = match s.status {
            PlanStatus::Fresh => "fresh",
            PlanStatus::Dirty => "dirty",
            PlanStatus::Pending => "pending",
        };
        let why = if s.reasons.is_empty() { String::new() } else { format!(": {}", s.reasons.join("; ")) };
        println!("{status:<8} {:<width$}  {}{why}", s.id, s.kind);
        for note in &s.notes {
            println!("{:<8} {:<width$}  note: {note}", "", "");
        }
    }
    let dirty: Vec<&str> = plan.stages.iter().filter(|s| matches!(s.status, PlanStatus::Dirty)).map(|s| s.id.as_str()).collect();
    let pending: Vec<&str> = plan.stages.iter().filter(|s| matches!(s.status, PlanStatus::Pending)).map(|s| s.id.as_str()).collect();
    if dirty.is_empty() {
        println!("\nnothing to run: every stage is fresh");
    } else {
        print!("\nwill run: {}", dirty.join(", "));
        if !pending.is_empty() {
            print!("; then, unless their inputs come out unchanged: {}", pending.join(", "));
        }
        println!();
    }
    if let Some(n) = plan.max_iterations {
        println!("this plan is for iteration 1; the loop may run up to {n} iterations");
    }
}

pub fn run(pipeline: &Pipeline, report: &RunReport, summaries: &[(String, String)], lock: &Path, html: Option<&Path>, json: bool) {
    if json {
        println!(
            "{}",
            json!({
                "ok": report.succeeded(),
                "pipeline": report.pipeline,
                "stop": report.stop,
                "iterations": report.iterations,
                "summaries": summaries.iter().map(|(id, s)| (id.clone(), json!(s))).collect::<serde_json::Map<_, _>>(),
                "lockfile": lock.display().to_string(),
                "report": html.map(|h| h.display().to_string()),
            })
        );
        return;
    }
    let width = pipeline.stages.iter().map(|s| s.id.len()).max().unwrap_or(0);
    let many = report.iterations.len() > 1;
    for it in &report.iterations {
        if many {
            println!("iteration {}", it.iteration + 1);
        }
        for s in &it.stages {
            let (status, detail) = match s.status {
                Status::Fresh => ("fresh", String::new()),
                Status::Fed => ("fed", s.note.clone().unwrap_or_default()),
                Status::Executed if s.items_run + s.items_cached > 0 => {
                    ("ran", format!("{} item(s) run, {} cached", s.items_run, s.items_cached))
                }
                Status::Executed => ("ran", String::new()),
                Status::Failed => ("FAILED", s.note.clone().unwrap_or_default()),
                Status::Skipped => ("skipped", s.note.clone().unwrap_or_default()),
            };
            println!("  {status:<8} {:<width$}  {:<8} {detail}", s.id, s.kind);
        }
        for (name, t) in &it.targets {
            let value = t.value.map_or("missing".to_string(), |v| format!("{v:.4}"));
            println!("  target   {name} = {value} (wanted {}) {}", t.bound, if t.met { "met" } else { "NOT met" });
        }
    }
    let executed: usize = report.iterations.iter().flat_map(|i| &i.stages).filter(|s| s.status == Status::Executed).count();
    let stop = stop_text(report);
    for (id, summary) in summaries {
        println!("{id}: {summary}");
    }
    println!("{stop} ({executed} stage run(s) executed)");
    if report.succeeded() {
        println!("lockfile: {}", lock.display());
    }
    if let Some(html) = html {
        println!("report: {} (and report.md beside it)", html.display());
    }
}

/// Why the run stopped, in words.
pub fn stop_text(report: &RunReport) -> String {
    let n = report.iterations.len();
    match report.stop {
        StopReason::Done => "done".to_string(),
        StopReason::TargetsMet => format!("targets met after {n} iteration(s)"),
        StopReason::Converged => format!("converged after {n} iteration(s): the feedback no longer changes anything"),
        StopReason::MaxIterations => format!("stopped at max_iterations ({n}) without meeting the targets"),
        StopReason::NoProgress => format!("stopped after {n} iteration(s): no progress for `patience` iterations in a row (revisions rejected)"),
        StopReason::BudgetSpent => format!("stopped after {n} iteration(s): the item budget (`max_items`) is spent"),
        StopReason::Failed => "FAILED: see the failed stage above; finished work was kept, rerun to retry".to_string(),
        StopReason::Interrupted => "interrupted: finished work was kept; rerun to continue".to_string(),
    }
}

pub fn graph(p: &Pipeline, format: GraphFormat) -> String {
    let feedback = p.iterate.as_ref().map(|it| (&p.stages[it.from].id, &p.stages[it.to].id));
    let mut out = String::new();
    match format {
        GraphFormat::Mermaid => {
            out.push_str("flowchart LR\n");
            for s in &p.stages {
                out.push_str(&format!("  {}[\"{}<br/><small>{}</small>\"]\n", s.id, s.id, s.kind));
            }
            for s in &p.stages {
                for (port, up) in &s.inputs {
                    out.push_str(&format!("  {} -->|{}| {}\n", p.stages[*up].id, port, s.id));
                }
            }
            if let Some((from, to)) = feedback {
                out.push_str(&format!("  {from} -. feedback .-> {to}\n"));
            }
        }
        GraphFormat::Dot => {
            out.push_str(&format!("digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box];\n", p.name));
            for s in &p.stages {
                out.push_str(&format!("  \"{}\" [label=\"{}\\n{}\"];\n", s.id, s.id, s.kind));
            }
            for s in &p.stages {
                for (port, up) in &s.inputs {
                    out.push_str(&format!("  \"{}\" -> \"{}\" [label=\"{}\"];\n", p.stages[*up].id, s.id, port));
                }
            }
            if let Some((from, to)) = feedback {
                out.push_str(&format!("  \"{from}\" -> \"{to}\" [style=dashed, label=\"feedback\"];\n"));
            }
            out.push_str("}\n");
        }
        GraphFormat::Json => {
            let nodes: Vec<_> = p.stages.iter().map(|s| json!({"id": s.id, "kind": s.kind, "output": s.output_ty})).collect();
            let edges: Vec<_> = p
                .stages
                .iter()
                .flat_map(|s| s.inputs.iter().map(|(port, up)| json!({"from": p.stages[*up].id, "to": s.id, "port": port})))
                .collect();
            let fb = feedback.map(|(from, to)| json!({"from": from, "to": to}));
            out = format!("{}\n", json!({"nodes": nodes, "edges": edges, "feedback": fb}));
        }
    }
    out
}

/// A revised prompt against its parent, as a unified diff of the system message and template
/// (`None` when the artifact is not a revision).
pub fn prompt_diff(prompt: &artifacts::Prompt) -> Option<String> {
    let revision = prompt.revision.as_ref()?;
    let parent = revision.parent.as_ref()?;
    let text = |system: &Option<String>, template: &str| format!("{}\n--- template ---\n{template}\n", system.as_deref().unwrap_or_default());
    let (old, new) = (text(&parent.system, &parent.template), text(&prompt.system, &prompt.template));
    let version = revision.version;
    let targeted = revision.targeted.as_deref().unwrap_or_default();
    // The parent is the version in force when it was revised (after a rejection, an older one).
    let from = parent.accepted.version;
    let mut out = format!("prompt version {version}, revised from version {from} for: {}\n", targeted.join(", "));
    out.push_str(
        &similar::TextDiff::from_lines(&old, &new)
            .unified_diff()
            .context_radius(3)
            .header(&format!("version {from}"), &format!("version {version}"))
            .to_string(),
    );
    Some(out)
}
