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
use crate::stage::{Cancel, Item, ItemContext, StageInput};
use crate::store::{Outputs, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read `{path}`: {source}")]
    File { path: String, source: std::io::Error },
    /// `--locked` and the run would not match the lockfile.
    #[error("{0}")]
    LockMismatch(String),
}

pub struct RunOptions {
    /// Stages running at once.
    pub jobs: usize,
    /// Enforce this lockfile (and never write one).
    pub locked: Option<Lockfile>,
    pub observer: Arc<dyn Observer>,
    /// Set to stop: no new item or stage starts; finished work is kept.
    pub cancel: Arc<AtomicBool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Fresh,
    Executed,
    Fed,
    Failed,
    Skipped,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageResult {
    pub id: String,
    pub kind: String,
    pub status: Status,
    pub fingerprint: Option<Fingerprint>,
    pub output: Option<Digest>,
    /// Digest of the output without its measured fields (see [`Stage::volatile_keys`]): what the
    /// lockfile pins.
    #[serde(default)]
    pub stable: Option<Digest>,
    /// Upstream inputs by their stable digests (the lockfile's view of the fingerprint).
    #[serde(default)]
    pub stable_inputs: BTreeMap<String, Digest>,
    /// Items computed / taken from the memo (executed stages only).
    pub items_run: usize,
    pub items_cached: usize,
    /// Failure message, or why it was skipped.
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IterationReport {
    pub iteration: u32,
    pub stages: Vec<StageResult>,
    pub metrics: BTreeMap<String, f64>,
    /// Per target: (value if reported, met).
    pub targets: BTreeMap<String, TargetResult>,
    pub targets_met: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetResult {
    pub bound: String,
    pub value: Option<f64>,
    pub met: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// No `[iterate]`: one pass.
    Done,
    TargetsMet,
    /// The feedback output equals what it would replace: another iteration changes nothing.
    Converged,
    MaxIterations,
    /// `patience` iterations in a row without progress (the feedback stage's `metrics.improved`).
    NoProgress,
    /// `max_items` items computed: no further iteration starts.
    BudgetSpent,
    Failed,
    Interrupted,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub pipeline: String,
    pub iterations: Vec<IterationReport>,
    pub stop: StopReason,
}

impl RunReport {
    pub fn failures(&self) -> impl Iterator<Item = (u32, &StageResult)> {
        self.iterations.iter().flat_map(|it| it.stages.iter().filter(|s| s.status == Status::Failed).map(move |s| (it.iteration, s)))
    }

    pub fn succeeded(&self) -> bool {
        !matches!(self.stop, StopReason::Failed | StopReason::Interrupted)
    }

    /// Output of a stage in an iteration (the last one when `None`).
    pub fn output(&self, stage: &str, iteration: Option<u32>) -> Option<Digest> {
        let it = match iteration {
            Some(k) => self.iterations.iter().find(|it| it.iteration == k)?,
            None => self.iterations.last()?,
        };
        it.stages.iter().find(|s| s.id == stage)?.output
    }

    pub fn lockfile(&self, pipeline: &Pipeline, files: &BTreeMap<String, Digest>) -> Lockfile {
        Lockfile {
            version: LOCK_VERSION,
            engine: ENGINE_VERSION.to_string(),
            seed: pipeline.seed,
            iterations: self.iterations.len() as u32,
            files: files.clone(),
            stages: self
                .iterations
                .iter()
                .flat_map(|it| {
                    it.stages.iter().filter_map(move |s| {
                        let fp = Fingerprint { inputs: s.stable_inputs.clone(), ..s.fingerprint.clone()? };
                        Some(LockedStage::new(&s.id, it.iteration, &fp, s.stable?))
                    })
                })
                .collect(),
        }
    }
}

/// Last fingerprint and output of a stage, kept to explain staleness and detect early cutoff.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub fingerprint: Fingerprint,
    pub output: Digest,
}

/// Referenced files, read once per run: the bytes digested are the bytes the stages get.
pub struct Files(BTreeMap<String, (Arc<[u8]>, Digest)>);

impl Files {
    pub fn read(pipeline: &Pipeline) -> Result<Files, RunError> {
        let mut map = BTreeMap::new();
        for node in &pipeline.stages {
            for (written, resolved) in &node.files {
                if map.contains_key(written) {
                    continue;
                }
                let bytes = std::fs::read(resolved).map_err(|source| RunError::File { path: written.clone(), source })?;
                let digest = Digest::of_bytes(&bytes);
                map.insert(written.clone(), (Arc::from(bytes), digest));
            }
        }
        Ok(Files(map))
    }

    pub fn digests(&self) -> BTreeMap<String, Digest> {
        self.0.iter().map(|(k, (_, d))| (k.clone(), *d)).collect()
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
        files: node.files.iter().map(|(w, _)| (w.clone(), files.0[w].1)).collect(),
        seed: pipeline.seed,
    }
}

/// Upstream artifacts by input name, from the store. `Err` names the first one missing.
fn load_inputs(store: &Store, inputs: &BTreeMap<String, Digest>) -> Result<BTreeMap<String, Arc<Value>>, String> {
    inputs
        .iter()
        .map(|(port, d)| {
            let v = store.get_object(d).ok_or_else(|| format!("input `{port}` ({}) is missing from the store", d.short()))?;
            Ok((port.clone(), Arc::new(v)))
        })
        .collect()
}

fn stage_input(pipeline: &Pipeline, files: &Files, i: usize, inputs: BTreeMap<String, Arc<Value>>, cancel: Cancel) -> StageInput {
    StageInput {
        cancel,
        inputs,
        files: pipeline.stages[i].files.iter().map(|(w, _)| (w.clone(), files.0[w].0.clone())).collect(),
        seed: pipeline.seed,
    }
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
        let improved = fed.and_then(|(digest, _)| ctx.store.get_object(&digest)).and_then(|o| o["metrics"]["improved"].as_f64());
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
        let lock = report.lockfile(&pipeline, &ctx.files.digests());
        let path = crate::lockfile::path_for(&pipeline);
        let text = lock.render();
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            write_beside(&path, text.as_bytes()).map_err(|source| RunError::File { path: path.display().to_string(), source })?;
        }
    }
    Ok(report)
}

/// Atomic write next to the target (same directory, so the rename cannot cross filesystems).
fn write_beside(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("lock.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
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

    loop {
        while running.len() < jobs && fatal.is_none() && !ctx.cancel.load(Ordering::SeqCst) {
            let Some(i) = ready.pop_first() else { break };
            let node = &pipeline.stages[i];
            if let (Some((to, from)), Some((output, stable))) = (feed_to, fed)
                && to == i
            {
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
    let metrics: BTreeMap<String, f64> = output
        .as_ref()
        .and_then(|o| o.get("metrics"))
        .and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect())
        .unwrap_or_default();
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

async fn run_stage(
    ctx: &Arc<Ctx>,
    iteration: u32,
    i: usize,
    inputs: BTreeMap<String, Digest>,
    stable_inputs: BTreeMap<String, Digest>,
) -> Result<StageDone, StageFail> {
    let pipeline = &ctx.pipeline;
    let node = &pipeline.stages[i];
    let fp = fingerprint(pipeline, &ctx.files, i, &inputs);
    let digest = fp.digest();
    if let Some(lock) = &ctx.locked {
        // The lockfile pins fingerprints over stable upstream digests: measurements may differ.
        let fp = Fingerprint { inputs: stable_inputs.clone(), ..fp.clone() };
        let digest = fp.digest();
        match lock.stage(&node.id, iteration) {
            None => {
                return Err(StageFail::Fatal(RunError::LockMismatch(format!(
                    "stage `{}` (iteration {}) is not in the lockfile",
                    node.id,
                    iteration + 1
                ))));
            }
            Some(locked) if locked.fingerprint != digest => {
                return Err(StageFail::Fatal(RunError::LockMismatch(format!(
                    "stage `{}` (iteration {}) differs from the lockfile: {}",
                    node.id,
                    iteration + 1,
                    locked.differences(&fp).join(", ")
                ))));
            }
            Some(_) => {}
        }
    }
    let previous: Option<Record> = ctx.store.get_record(&pipeline.name, &node.id);
    if let Some(output) = ctx.store.get_done(&digest) {
        ctx.emit(Event::Fresh { iteration, stage: node.id.clone() });
        if previous.as_ref().is_none_or(|r| r.fingerprint != fp || r.output != output.full) {
            ctx.store.put_record(&pipeline.name, &node.id, &Record { fingerprint: fp.clone(), output: output.full })?;
        }
        check_locked_output(ctx, iteration, &node.id, &output)?;
        return Ok(StageDone { fingerprint: fp, stable_inputs, output, executed: false, items_run: 0, items_cached: 0 });
    }
    let reasons = dirty_reasons(&fp, previous.as_ref());

    let values = load_inputs(&ctx.store, &inputs).map_err(StageFail::Error)?;
    let input = Arc::new(stage_input(pipeline, &ctx.files, i, values, Cancel(ctx.cancel.clone())));
    let items = node.stage.items(&input).map_err(|e| StageFail::Error(e.message))?;
    let keys: Vec<Digest> = items.iter().map(|it| fp.item_key(&it.input)).collect();
    let mut outputs: Vec<Option<Value>> = keys.iter().map(|k| ctx.store.get_item(k)).collect();
    let cached = outputs.iter().filter(|o| o.is_some()).count();
    let mut groups: Vec<ItemGroup> = Vec::new();
    for (item, output) in items.iter().zip(&outputs) {
        let Some(name) = item_group(&item.id) else { continue };
        let at = match groups.iter().position(|g| g.name == name) {
            Some(at) => at,
            None => {
                groups.push(ItemGroup { name: name.to_string(), items: 0, cached_items: 0 });
                groups.len() - 1
            }
        };
        groups[at].items += 1;
        groups[at].cached_items += usize::from(output.is_some());
    }
    ctx.emit(Event::Started { iteration, stage: node.id.clone(), reasons, items: items.len(), cached_items: cached, groups });

    let items = Arc::new(items);
    let mut pending = (0..items.len()).filter(|&k| outputs[k].is_none()).collect::<Vec<_>>().into_iter();
    let limit = node.stage.item_concurrency().max(1);
    let mut running: JoinSet<(usize, Result<Value, crate::stage::StageError>)> = JoinSet::new();
    // A failed item does not stop the others: everything that succeeds is kept, and a rerun
    // retries only what failed. Failures in a row (a server down, a systematic bug) stop the
    // stage early instead of failing every item one by one.
    let give_up_after = limit.max(5);
    let (mut failures, mut failed_in_a_row) = (Vec::<String>::new(), 0);
    let mut interrupted = false;
    let mut ran = 0;
    loop {
        while running.len() < limit && failed_in_a_row < give_up_after {
            if ctx.cancel.load(Ordering::SeqCst) {
                interrupted = true;
                break;
            }
            let Some(k) = pending.next() else { break };
            let (stage, items, cx) = (node.stage.clone(), items.clone(), ItemContext { seed: pipeline.seed, cancel: Cancel(ctx.cancel.clone()) });
            running.spawn(async move { (k, stage.run_item(&items[k], &cx).await) });
        }
        let Some(joined) = running.join_next().await else { break };
        let (k, result) = match joined {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        match result {
            Ok(value) => {
                // Memoize at once: a kill after this point never loses the item.
                ctx.store.put_item(&keys[k], &value)?;
                ran += 1;
                ctx.emit(Event::Item { iteration, stage: node.id.clone(), item: items[k].id.clone() });
                outputs[k] = Some(value);
                failed_in_a_row = 0;
            }
            Err(e) => {
                tracing::warn!(stage = node.id, item = items[k].id, "item failed: {}", e.message);
                failures.push(format!("item `{}`: {}", items[k].id, e.message));
                failed_in_a_row += 1;
            }
        }
    }
    if let Some(first) = failures.first() {
        let n = failures.len();
        return Err(StageFail::Error(if failed_in_a_row >= give_up_after {
            format!("stopped after {failed_in_a_row} items failed in a row ({} not started); finished items are kept. First: {first}", pending.len())
        } else if n == 1 {
            first.clone()
        } else {
            format!("{n} items failed; finished items are kept and a rerun retries only the failed ones. First: {first}")
        }));
    }
    if interrupted {
        return Err(StageFail::Interrupted);
    }
    let results: Vec<(Item, Value)> = items.iter().cloned().zip(outputs.into_iter().map(|o| o.expect("every item computed"))).collect();
    let stage = node.stage.clone();
    let finish_input = input.clone();
    let value = tokio::task::spawn_blocking(move || stage.finish(&finish_input, results))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        .map_err(|e| StageFail::Error(e.message))?;
    let full = ctx.store.put_object(&value)?;
    let volatile = node.stage.volatile_keys();
    let stable = if volatile.is_empty() { full } else { Digest::of_json(&without_keys(&value, volatile)) };
    let output = Outputs { full, stable };
    ctx.store.put_done(&digest, &output)?;
    let unchanged = previous.as_ref().is_some_and(|r| r.output == full);
    ctx.store.put_record(&pipeline.name, &node.id, &Record { fingerprint: fp.clone(), output: full })?;
    ctx.emit(Event::Finished { iteration, stage: node.id.clone(), output: full, unchanged });
    check_locked_output(ctx, iteration, &node.id, &output)?;
    Ok(StageDone { fingerprint: fp, stable_inputs, output, executed: true, items_run: ran, items_cached: cached })
}

fn check_locked_output(ctx: &Ctx, iteration: u32, id: &str, output: &Outputs) -> Result<(), StageFail> {
    match ctx.locked.as_ref().and_then(|l| l.stage(id, iteration)) {
        Some(locked) if locked.output != output.stable => Err(StageFail::Fatal(RunError::LockMismatch(format!(
            "stage `{id}` (iteration {}) produced {} but the lockfile records {}: the stage is not reproducible",
            iteration + 1,
            output.stable.short(),
            locked.output.short()
        )))),
        _ => Ok(()),
    }
}

/// `value` with every object key in `keys` removed, at any depth.
fn without_keys(value: &Value, keys: &[&str]) -> Value {
    match value {
        Value::Object(map) => Value::Object(map.iter().filter(|(k, _)| !keys.contains(&k.as_str())).map(|(k, v)| (k.clone(), without_keys(v, keys))).collect()),
        Value::Array(items) => Value::Array(items.iter().map(|v| without_keys(v, keys)).collect()),
        other => other.clone(),
    }
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

// ---------------------------------------------------------------------------------------------
// Planning

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
        let mut entry = PlanStage { id: node.id.clone(), kind: node.kind.to_string(), status: PlanStatus::Pending, reasons: Vec::new(), items: None, cached_items: None };
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
            let input = stage_input(pipeline, &files, i, values, Cancel::default());
            if let Ok(items) = node.stage.items(&input)
                && !items.is_empty()
            {
                let cached = items.iter().filter(|it| store.has_item(&fp.item_key(&it.input))).count();
                if cached > 0 || previous.is_some() {
                    entry.reasons.push(format!("{} new item(s), {} cached", items.len() - cached, cached));
                }
                entry.items = Some(items.len());
                entry.cached_items = Some(cached);
            }
        }
        stages.push(entry);
    }
    Ok(PlanReport { pipeline: pipeline.name.clone(), stages, max_iterations: pipeline.iterate.as_ref().map(|i| i.max_iterations) })
}
