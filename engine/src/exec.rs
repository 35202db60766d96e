//! Planning and running: the DAG is walked in topological order on tokio, independent stages
//! concurrently (bounded by `jobs`), each stage either fresh (its fingerprint has a complete
//! result in the store) or executed item by item with per-item memoization.
//!
//! Iterations: with `[iterate]`, iteration k > 0 replaces the output of `feedback.to` with the
//! output of `feedback.from` from iteration k-1 and walks the DAG again. Fingerprints do the rest:
//! only stages downstream of the replaced output can be dirty. The loop stops when the targets are
//! met, when the feedback no longer changes anything (converged), after `patience` iterations in a
//! row whose feedback stage reports `metrics.improved = 0`, once `max_items` items have been
//! computed, at `max_iterations`, or on a failure or interruption.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::task::JoinSet;

use crate::config::Pipeline;
use crate::events::{Event, ItemGroup, Observer, item_group};
use crate::fingerprint::{FORMAT_VERSION, Fingerprint};
use crate::hash::Digest;
use crate::lockfile::{ENGINE_VERSION, LOCK_VERSION, LockedStage, Lockfile};
use crate::stage::{Cancel, Item, ItemContext, ItemProgress, Reported, Stage, StageError, StageInput};
use crate::stream::OutputWriter;
use crate::store::{Outputs, Store, StoreError};
use crate::stream::{Lazy, StoredInput};

mod plan;
mod report;
mod stage;

pub use plan::{PlanReport, PlanStage, PlanStatus, plan};
pub use report::{IterationReport, Record, RunError, RunOptions, RunReport, StageResult, Status, StopReason, TargetResult};
use stage::run_stage;

/// Referenced files, digested once per run. A small file's bytes are kept: the bytes digested are
/// the bytes the stages get. A large one (a dataset of a million lines) is hashed as it is read
/// and read again, verified, only by the stage that needs it while it runs.
pub struct Files(BTreeMap<String, FileData>);

struct FileData {
    path: std::path::PathBuf,
    digest: Digest,
    /// `None`: a large file, left on disk.
    bytes: Option<Arc<[u8]>>,
}

/// Files above this size are not held for the whole run.
const HELD_FILE_BYTES: u64 = 8 << 20;

impl Files {
    pub fn read(pipeline: &Pipeline) -> Result<Files, RunError> {
        let mut map = BTreeMap::new();
        for node in &pipeline.stages {
            for (written, resolved) in &node.files {
                if map.contains_key(written) {
                    continue;
                }
                let failed = |source| RunError::File { path: written.clone(), source };
                let large = std::fs::metadata(resolved).map_err(failed)?.len() > HELD_FILE_BYTES;
                let (digest, bytes) = if large {
                    (Digest::of_file(resolved).map_err(failed)?, None)
                } else {
                    let bytes = std::fs::read(resolved).map_err(failed)?;
                    (Digest::of_bytes(&bytes), Some(Arc::from(bytes)))
                };
                map.insert(written.clone(), FileData { path: resolved.clone(), digest, bytes });
            }
        }
        Ok(Files(map))
    }

    pub fn digests(&self) -> BTreeMap<String, Digest> {
        self.0.iter().map(|(k, f)| (k.clone(), f.digest)).collect()
    }
}

struct Ctx {
    pipeline: Arc<Pipeline>,
    store: Store,
    files: Files,
    observer: Arc<dyn Observer>,
    cancel: Arc<AtomicBool>,
    locked: Option<Lockfile>,
}

fn fingerprint(pipeline: &Pipeline, files: &Files, i: usize, inputs: &BTreeMap<String, Digest>) -> Fingerprint {
    let node = &pipeline.stages[i];
    Fingerprint {
        format: FORMAT_VERSION,
        kind: node.kind.to_string(),
        plugin_version: node.version,
        config: node.config.clone(),
        inputs: inputs.clone(),
        files: node.files.iter().map(|(w, _)| (w.clone(), files.0[w].digest)).collect(),
        seed: pipeline.seed,
    }
}

/// Upstream artifacts by input name, left in the store until a stage reads them. `Err` names the
/// first one missing.
fn load_inputs(store: &Store, inputs: &BTreeMap<String, Digest>) -> Result<BTreeMap<String, StoredInput>, String> {
    inputs
        .iter()
        .map(|(port, d)| {
            if !store.has_object(d) {
                return Err(format!("input `{port}` ({}) is missing from the store", d.short()));
            }
            Ok((port.clone(), StoredInput::new(store.object_path(d), *d)))
        })
        .collect()
}

fn stage_input(pipeline: &Pipeline, files: &Files, i: usize, stored: BTreeMap<String, StoredInput>, cancel: Cancel, store: &Store) -> StageInput {
    let mut input = StageInput::new(BTreeMap::new(), BTreeMap::new(), pipeline.seed);
    input.cancel = cancel;
    input.stored = stored;
    input.store = Some(store.clone());
    for (written, _) in &pipeline.stages[i].files {
        let file = &files.0[written];
        match &file.bytes {
            Some(bytes) => {
                input.files.insert(written.clone(), bytes.clone());
            }
            None => {
                input.large_files.insert(written.clone(), Lazy::new(file.path.clone(), file.digest, format!("file `{written}`")));
            }
        }
    }
    input
}

impl Ctx {

    fn emit(&self, e: Event) {
        self.observer.event(&e);
    }
}

struct StageDone {
    fingerprint: Fingerprint,
    stable_inputs: BTreeMap<String, Digest>,
    output: Outputs,
    executed: bool,
    items_run: usize,
    items_cached: usize,
}

enum StageFail {
    Error(String),
    Interrupted,
    Fatal(RunError),
}

impl From<StoreError> for StageFail {
    fn from(e: StoreError) -> Self {
        StageFail::Fatal(e.into())
    }
}

/// Run the pipeline: takes the store lock, executes what is stale, records the run, and (unless
/// `locked`) writes the lockfile after a successful run.
pub async fn run(pipeline: Arc<Pipeline>, store: Store, opts: RunOptions) -> Result<RunReport, RunError> {
    let _lock = store.lock()?;
    let files = Files::read(&pipeline)?;
    if let Some(lock) = &opts.locked {
        precheck_lock(lock, &pipeline, &files)?;
    }
    let ctx = Arc::new(Ctx {
        pipeline: pipeline.clone(),
        store: store.clone(),
        files,
        observer: opts.observer,
        cancel: opts.cancel,
        locked: opts.locked,
    });
    let max = pipeline.iterate.as_ref().map_or(1, |i| i.max_iterations);
    let mut iterations = Vec::new();
    let mut fed = None;
    let mut stop = StopReason::Done;
    let (mut computed, mut stalled) = (0u64, 0u32);
    for iteration in 0..max {
        let report = run_iteration(&ctx, iteration, fed, opts.jobs.max(1)).await?;
        let failed = report.stages.iter().any(|s| s.status == Status::Failed);
        let interrupted = ctx.cancel.load(Ordering::SeqCst);
        let met = report.targets_met;
        ctx.emit(Event::IterationDone { iteration, targets_met: met });
        let outputs: HashMap<&str, Option<(Digest, Digest)>> = report.stages.iter().map(|s| (s.id.as_str(), s.output.zip(s.stable))).collect();
        let next = pipeline.iterate.as_ref().map(|it| {
            let from = outputs[pipeline.stages[it.from].id.as_str()];
            let to = outputs[pipeline.stages[it.to].id.as_str()];
            (from, from.map(|f| f.0) == to.map(|t| t.0))
        });
        iterations.push(report);
        if failed {
            stop = StopReason::Failed;
            break;
        }
        if interrupted {
            stop = StopReason::Interrupted;
            break;
        }
        if met == Some(true) {
            stop = StopReason::TargetsMet;
            break;
        }
        match next {
            None => break,
            Some((_, true)) => {
                stop = StopReason::Converged;
                break;
            }
            Some((from, false)) => {
                fed = from;
                stop = StopReason::MaxIterations;
            }
        }
        let it = pipeline.iterate.as_ref().expect("a feedback edge means `[iterate]`");
        // Progress as the feedback stage reports it; a stage that reports none never stalls.
        let improved = fed.and_then(|(digest, _)| ctx.store.get_object(&digest)).and_then(|o| Reported::of(&o).improved());
        stalled = if improved == Some(0.0) { stalled + 1 } else { 0 };
        if it.patience.is_some_and(|p| stalled >= p) {
            stop = StopReason::NoProgress;
            break;
        }
        computed += iterations.last().map_or(0, |r: &IterationReport| r.stages.iter().map(|s| s.items_run as u64).sum());
        if iteration + 1 < max && it.max_items.is_some_and(|m| computed >= m) {
            stop = StopReason::BudgetSpent;
            break;
        }
    }
    let report = RunReport { pipeline: pipeline.name.clone(), iterations, stop };
    store.put_run(&pipeline.name, &report)?;
    if let Some(lock) = &ctx.locked {
        if report.succeeded() && lock.iterations != report.iterations.len() as u32 {
            return Err(RunError::LockMismatch(format!(
                "the run took {} iteration(s); the lockfile records {}",
                report.iterations.len(),
                lock.iterations
            )));
        }
    } else if report.succeeded() {
        let lock = report.lockfile(&pipeline, &ctx.files.digests(), |d| store.get_object(d));
        let path = crate::lockfile::path_for(&pipeline);
        let text = lock.render();
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            crate::atomic::write(&path, text.as_bytes()).map_err(|source| RunError::File { path: path.display().to_string(), source })?;
        }
    }
    Ok(report)
}

fn precheck_lock(lock: &Lockfile, pipeline: &Pipeline, files: &Files) -> Result<(), RunError> {
    let mut diffs = Vec::new();
    if lock.engine != ENGINE_VERSION {
        diffs.push(format!("engine version {ENGINE_VERSION} (locked: {})", lock.engine));
    }
    if lock.seed != pipeline.seed {
        diffs.push(format!("seed {} (locked: {})", pipeline.seed, lock.seed));
    }
    let now = files.digests();
    for (path, d) in &now {
        match lock.files.get(path) {
            Some(l) if l == d => {}
            Some(_) => diffs.push(format!("file `{path}` changed")),
            None => diffs.push(format!("file `{path}` is not in the lockfile")),
        }
    }
    for path in lock.files.keys().filter(|p| !now.contains_key(*p)) {
        diffs.push(format!("file `{path}` is locked but no longer used"));
    }
    let ids: BTreeSet<&str> = pipeline.stages.iter().map(|s| s.id.as_str()).collect();
    let locked_ids: BTreeSet<&str> = lock.stages.iter().map(|s| s.id.as_str()).collect();
    for id in ids.difference(&locked_ids) {
        diffs.push(format!("stage `{id}` is not in the lockfile"));
    }
    for id in locked_ids.difference(&ids) {
        diffs.push(format!("stage `{id}` is locked but no longer in the pipeline"));
    }
    if diffs.is_empty() { Ok(()) } else { Err(RunError::LockMismatch(diffs.join("\n"))) }
}

fn unique_upstreams(pipeline: &Pipeline, i: usize) -> BTreeSet<usize> {
    pipeline.stages[i].inputs.iter().map(|(_, up)| *up).collect()
}

async fn run_iteration(ctx: &Arc<Ctx>, iteration: u32, fed: Option<(Digest, Digest)>, jobs: usize) -> Result<IterationReport, RunError> {
    let pipeline = &ctx.pipeline;
    let n = pipeline.stages.len();
    let mut dependents = vec![Vec::new(); n];
    let mut waiting: Vec<usize> = Vec::with_capacity(n);
    for i in 0..n {
        let ups = unique_upstreams(pipeline, i);
        for &up in &ups {
            dependents[up].push(i);
        }
        waiting.push(ups.len());
    }
    let mut results: Vec<Option<StageResult>> = vec![None; n];
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| waiting[i] == 0).collect();
    let mut running: JoinSet<(usize, Result<StageDone, StageFail>)> = JoinSet::new();
    let mut fatal = None;
    let feed_to = pipeline.iterate.as_ref().filter(|_| iteration > 0).map(|it| (it.to, it.from));
    // The stage running with nothing beside it ([`Stage::runs_alone`]), if one is.
    let mut alone: Option<usize> = None;

    loop {
        while running.len() < jobs && alone.is_none() && fatal.is_none() && !ctx.cancel.load(Ordering::SeqCst) {
            let Some(&i) = ready.first() else { break };
            let node = &pipeline.stages[i];
            // The output the loop feeds this stage, if it is the one fed: it is not run.
            let fed_here = feed_to.filter(|&(to, _)| to == i).zip(fed);
            let runs_alone = node.stage.runs_alone() && fed_here.is_none();
            if runs_alone && !running.is_empty() {
                // It starts once what runs has finished, and nothing else starts before it.
                tracing::debug!(stage = node.id, running = running.len(), "waits to run alone");
                break;
            }
            ready.pop_first();
            if let Some(((_, from), (output, stable))) = fed_here {
                ctx.emit(Event::Fed { iteration, stage: node.id.clone(), from: pipeline.stages[from].id.clone() });
                results[i] = Some(StageResult {
                    id: node.id.clone(),
                    kind: node.kind.to_string(),
                    status: Status::Fed,
                    fingerprint: None,
                    output: Some(output),
                    stable: Some(stable),
                    stable_inputs: BTreeMap::new(),
                    items_run: 0,
                    items_cached: 0,
                    note: Some(format!("output of `{}` from iteration {}", pipeline.stages[from].id, iteration)),
                });
                release(i, &dependents, &mut waiting, &mut ready);
                continue;
            }
            let upstream = |f: fn(&StageResult) -> Option<Digest>| -> BTreeMap<String, Digest> {
                node.inputs.iter().map(|(port, up)| (port.clone(), results[*up].as_ref().and_then(f).expect("upstream finished"))).collect()
            };
            let inputs = upstream(|r| r.output);
            let stable_inputs = upstream(|r| r.stable);
            let ctx = ctx.clone();
            if runs_alone {
                alone = Some(i);
            }
            running.spawn(async move {
                let result = run_stage(&ctx, iteration, i, inputs, stable_inputs).await;
                (i, result)
            });
        }
        let Some(joined) = running.join_next().await else { break };
        let (i, outcome) = match joined {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        if alone == Some(i) {
            alone = None;
        }
        let node = &pipeline.stages[i];
        let mut result = StageResult {
            id: node.id.clone(),
            kind: node.kind.to_string(),
            status: Status::Failed,
            fingerprint: None,
            output: None,
            stable: None,
            stable_inputs: BTreeMap::new(),
            items_run: 0,
            items_cached: 0,
            note: None,
        };
        match outcome {
            Ok(done) => {
                result.status = if done.executed { Status::Executed } else { Status::Fresh };
                result.fingerprint = Some(done.fingerprint);
                result.output = Some(done.output.full);
                result.stable = Some(done.output.stable);
                result.stable_inputs = done.stable_inputs;
                result.items_run = done.items_run;
                result.items_cached = done.items_cached;
                results[i] = Some(result);
                release(i, &dependents, &mut waiting, &mut ready);
            }
            // A stage failing after Ctrl-C most likely lost its child processes to the same signal.
            Err(StageFail::Error(message)) if ctx.cancel.load(Ordering::SeqCst) => {
                tracing::debug!(stage = node.id, message, "failed while interrupted");
                result.status = Status::Skipped;
                result.note = Some("interrupted".into());
                ctx.emit(Event::Skipped { iteration, stage: node.id.clone(), because: "interrupted".into() });
                results[i] = Some(result);
            }
            Err(StageFail::Error(message)) => {
                ctx.emit(Event::Failed { iteration, stage: node.id.clone(), error: message.clone() });
                result.note = Some(message);
                results[i] = Some(result);
            }
            Err(StageFail::Interrupted) => {
                result.status = Status::Skipped;
                result.note = Some("interrupted".into());
                results[i] = Some(result);
            }
            Err(StageFail::Fatal(e)) => {
                fatal.get_or_insert(e);
            }
        }
    }
    if let Some(e) = fatal {
        return Err(e);
    }
    // Whatever did not run: say why.
    let stages: Vec<StageResult> = (0..n)
        .map(|i| {
            results[i].clone().unwrap_or_else(|| {
                let node = &pipeline.stages[i];
                let because = node
                    .inputs
                    .iter()
                    .find_map(|(_, up)| {
                        let up_id = &pipeline.stages[*up].id;
                        results_status(&results, *up).filter(|s| *s == Status::Failed).map(|_| format!("upstream `{up_id}` failed"))
                    })
                    .unwrap_or_else(|| {
                        if ctx.cancel.load(Ordering::SeqCst) { "interrupted".to_string() } else { "an upstream stage did not finish".to_string() }
                    });
                ctx.emit(Event::Skipped { iteration, stage: node.id.clone(), because: because.clone() });
                let r = StageResult {
                    id: node.id.clone(),
                    kind: node.kind.to_string(),
                    status: Status::Skipped,
                    fingerprint: None,
                    output: None,
                    stable: None,
                    stable_inputs: BTreeMap::new(),
                    items_run: 0,
                    items_cached: 0,
                    note: Some(because),
                };
                results[i] = Some(r.clone());
                r
            })
        })
        .collect();
    let (metrics, targets, targets_met) = check_targets(ctx, &stages);
    Ok(IterationReport { iteration, stages, metrics, targets, targets_met })
}

fn results_status(results: &[Option<StageResult>], i: usize) -> Option<Status> {
    results[i].as_ref().map(|r| r.status)
}

fn release(i: usize, dependents: &[Vec<usize>], waiting: &mut [usize], ready: &mut BTreeSet<usize>) {
    for &d in &dependents[i] {
        waiting[d] -= 1;
        if waiting[d] == 0 {
            ready.insert(d);
        }
    }
}

type TargetCheck = (BTreeMap<String, f64>, BTreeMap<String, TargetResult>, Option<bool>);

fn check_targets(ctx: &Ctx, stages: &[StageResult]) -> TargetCheck {
    let Some(targets) = &ctx.pipeline.targets else { return Default::default() };
    let output = stages[targets.from].output.and_then(|d| ctx.store.get_object(&d));
    let metrics = output.as_ref().map(|o| Reported::of(o).metrics()).unwrap_or_default();
    if output.is_none() {
        return (metrics, BTreeMap::new(), None);
    }
    let results: BTreeMap<String, TargetResult> = targets
        .bounds
        .iter()
        .map(|(name, bound)| {
            let value = metrics.get(name).copied();
            (name.clone(), TargetResult { bound: bound.to_string(), value, met: value.is_some_and(|v| bound.admits(v)) })
        })
        .collect();
    let met = results.values().all(|r| r.met);
    (metrics, results, Some(met))
}

fn dirty_reasons(fp: &Fingerprint, previous: Option<&Record>) -> Vec<String> {
    match previous {
        None => vec!["never run".to_string()],
        Some(r) => {
            let why = fp.explain(&r.fingerprint);
            if why.is_empty() { vec!["its previous run did not finish".to_string()] } else { why }
        }
    }
}
