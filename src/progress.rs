//! Engine events → indicatif progress bars (on a terminal) and an optional JSONL event log.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use engine::{Event, Observer};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Progress {
    pub fn new(enabled: bool) -> Self {
        let target = if enabled && std::io::stderr().is_terminal() { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        Progress { multi: MultiProgress::with_draw_target(target), bars: Mutex::new(HashMap::new()) }
    }
}

impl Observer for Progress {
    fn event(&self, event: &Event) {
        let mut bars = self.bars.lock().unwrap();
        match event {
            Event::Started { stage, items, cached_items, reasons, .. } => {
                tracing::info!(stage, ?reasons, items, cached_items, "running stage");
                if items == cached_items {
                    return; // nothing to count: a whole-stage step, or every item memoized
                }
                let bar = self.multi.add(ProgressBar::new((*items - *cached_items) as u64));
                bar.set_style(
                    ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({eta})").expect("valid template").progress_chars("=> "),
                );
                bar.set_prefix(stage.clone());
                if *cached_items > 0 {
                    bar.set_message(format!("+{cached_items} cached"));
                }
                bars.insert(stage.clone(), bar);
            }
            Event::Item { stage, .. } => {
                if let Some(bar) = bars.get(stage) {
                    bar.inc(1);
                }
            }
            Event::Finished { stage, .. } | Event::Failed { stage, .. } => {
                if let Some(bar) = bars.remove(stage) {
                    bar.finish_and_clear();
                }
                if let Event::Failed { stage, error, .. } = event {
                    tracing::debug!(stage, error, "stage failed");
                }
            }
            Event::Fresh { stage, .. } => tracing::debug!(stage, "fresh"),
            _ => {}
        }
    }
}

/// `--events FILE`: one JSON object per line, flushed as it happens.
pub struct EventLog(Mutex<std::fs::File>);

impl EventLog {
    pub fn create(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(EventLog(Mutex::new(std::fs::File::options().create(true).append(true).open(path)?)))
    }
}

impl Observer for EventLog {
    fn event(&self, event: &Event) {
        let mut line = serde_json::to_vec(event).expect("events serialize");
        line.push(b'\n');
        if let Err(e) = self.0.lock().unwrap().write_all(&line) {
            tracing::warn!("event log: {e}");
        }
    }
}
