//! Planning: what `run` would do in its first iteration, and why. Reads the store; writes nothing.

use super::*;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanStatus {
    Fresh,
    Dirty,
    /// An upstream stage will run; this one runs unless that output comes out unchanged.
    Pending,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanStage {
    pub id: String,
    pub kind: String,
    pub status: PlanStatus,
    pub reasons: Vec<String>,
    /// For dirty stages with known inputs: items in total and already memoized.
    pub items: Option<usize>,
    pub cached_items: Option<usize>,
    /// What the stage says about how it computes ([`crate::Stage::notes`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    pub pipeline: String,
    pub stages: Vec<PlanStage>,
    /// Set when the pipeline iterates: only the first iteration can be planned.
    pub max_iterations: Option<u32>,
}

/// What `run` would do in its first iteration, and why. Reads the store; writes nothing.
pub fn plan(pipeline: &Pipeline, store: &Store) -> Result<PlanReport, RunError> {
    let files = Files::read(pipeline)?;
    let mut outputs: Vec<Option<Digest>> = vec![None; pipeline.stages.len()];
    let mut stages = Vec::new();
    for (i, node) in pipeline.stages.iter().enumerate() {
        let mut inputs = BTreeMap::new();
        let mut unknown = Vec::new();
        for (port, up) in &node.inputs {
            match outputs[*up] {
                Some(d) => {
                    inputs.insert(port.clone(), d);
                }
                None => unknown.push(pipeline.stages[*up].id.clone()),
            }
        }
        let mut entry = PlanStage { id: node.id.clone(), kind: node.kind.to_string(), status: PlanStatus::Pending, reasons: Vec::new(), items: None, cached_items: None, notes: node.stage.notes() };
        if !unknown.is_empty() {
            unknown.dedup();
            entry.reasons = unknown.iter().map(|u| format!("upstream `{u}` will run (this reruns unless its output is unchanged)")).collect();
            stages.push(entry);
            continue;
        }
        let fp = fingerprint(pipeline, &files, i, &inputs);
        if let Some(out) = store.get_done(&fp.digest()) {
            outputs[i] = Some(out.full);
            entry.status = PlanStatus::Fresh;
            stages.push(entry);
            continue;
        }
        entry.status = PlanStatus::Dirty;
        let previous: Option<Record> = store.get_record(&pipeline.name, &node.id);
        entry.reasons = dirty_reasons(&fp, previous.as_ref());
        // Count the items that would run.
        if let Ok(values) = load_inputs(store, &inputs) {
            let input = stage_input(pipeline, &files, i, values, Cancel::default(), store);
            let (mut items, mut cached) = (0, 0);
            let reader = store.item_reader();
            let counted = node.stage.each_item(&input, &mut |it| {
                items += 1;
                cached += usize::from(reader.has(&fp.item_key(&it.input)));
                Ok(())
            });
            if counted.is_ok() && items > 0 {
                if cached > 0 || previous.is_some() {
                    entry.reasons.push(format!("{} new item(s), {} cached", items - cached, cached));
                }
                entry.items = Some(items);
                entry.cached_items = Some(cached);
            }
        }
        stages.push(entry);
    }
    Ok(PlanReport { pipeline: pipeline.name.clone(), stages, max_iterations: pipeline.iterate.as_ref().map(|i| i.max_iterations) })
}
