//! What the engine did, as events: the CLI turns them into progress bars and an optional JSONL
//! event log; tests assert on them (which stages and items executed), like cargo's freshness tests.

use std::sync::Mutex;

use serde::Serialize;

use crate::hash::Digest;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The stage's result for this fingerprint exists; nothing ran.
    Fresh { iteration: u32, stage: String },
    /// The stage's output was replaced by the feedback source's output of the previous iteration.
    Fed { iteration: u32, stage: String, from: String },
    /// The stage is executing, and why. `groups` counts items per group (an item id `group/rest`
    /// is in `group`, e.g. a candidate model), for progress per group.
    Started {
        iteration: u32,
        stage: String,
        reasons: Vec<String>,
        items: usize,
        cached_items: usize,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        groups: Vec<ItemGroup>,
    },
    /// A long item's progress (steps of a training run), as the stage reports it.
    ItemProgress { iteration: u32, stage: String, item: String, done: u64, total: u64, message: String },
    /// One item was computed (cached items emit nothing; see `Started::cached_items`).
    Item { iteration: u32, stage: String, item: String },
    /// The stage produced `output`; `unchanged` when byte-identical to its previous output, so its
    /// dependents stay fresh (early cutoff).
    Finished { iteration: u32, stage: String, output: Digest, unchanged: bool },
    Failed { iteration: u32, stage: String, error: String },
    /// Not run because an upstream stage failed or the run was interrupted.
    Skipped { iteration: u32, stage: String, because: String },
    IterationDone { iteration: u32, targets_met: Option<bool> },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ItemGroup {
    pub name: String,
    pub items: usize,
    pub cached_items: usize,
}

/// The group of an item id: what comes before its first `/`.
pub fn item_group(id: &str) -> Option<&str> {
    id.split_once('/').map(|(group, _)| group)
}

pub trait Observer: Send + Sync {
    fn event(&self, event: &Event);
}

/// Collects events in memory.
#[derive(Default)]
pub struct Recorder(Mutex<Vec<Event>>);

impl Recorder {
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

impl Observer for Recorder {
    fn event(&self, event: &Event) {
        self.0.lock().unwrap().push(event.clone());
    }
}

/// Fans events out to several observers.
pub struct Tee(pub Vec<std::sync::Arc<dyn Observer>>);

impl Observer for Tee {
    fn event(&self, event: &Event) {
        for o in &self.0 {
            o.event(event);
        }
    }
}
