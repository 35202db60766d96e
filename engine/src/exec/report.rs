//! What a run reports: per iteration, each stage's status, fingerprint and output, and the
//! targets; the errors that stop a run.

use super::*;

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

    /// The lockfile of this run; `output` reads a stage output back (for [`crate::Stage::output_pins`]).
    pub fn lockfile(&self, pipeline: &Pipeline, files: &BTreeMap<String, Digest>, output: impl Fn(&Digest) -> Option<serde_json::Value>) -> Lockfile {
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
                    let output = &output;
                    it.stages.iter().filter_map(move |s| {
                        let fp = Fingerprint { inputs: s.stable_inputs.clone(), ..s.fingerprint.clone()? };
                        let node = pipeline.stages.iter().find(|n| n.id == s.id);
                        let mut pins = node.map(|n| n.stage.pins()).unwrap_or_default();
                        if let Some(n) = node {
                            for (name, more) in n.stage.output_pins(&|| s.output.as_ref().and_then(output)) {
                                pins.entry(name).or_default().extend(more);
                            }
                        }
                        Some(LockedStage { pins, ..LockedStage::new(&s.id, it.iteration, &fp, s.stable?) })
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

