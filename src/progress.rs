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
            Event::Started { stage, items, cached_items, reasons, groups, .. } => {
                tracing::info!(stage, ?reasons, items, cached_items, "running stage");
                // One bar per group of items (e.g. per candidate model), else one for the stage.
                let counts: Vec<(String, usize, usize)> = if groups.is_empty() {
                    vec![(stage.clone(), *items, *cached_items)]
                } else {
                    groups.iter().map(|g| (format!("{stage} {}", g.name), g.items, g.cached_items)).collect()
                };
                for (name, items, cached) in counts {
                    if items == cached {
                        continue; // nothing to count: a whole-stage step, or every item memoized
                    }
                    let bar = self.multi.add(ProgressBar::new((items - cached) as u64));
                    bar.set_style(
                        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({per_sec}, {eta})").expect("valid template").progress_chars("=> "),
                    );
                    bar.set_prefix(name.clone());
                    if cached > 0 {
                        bar.set_message(format!("+{cached} cached"));
                    }
                    bars.insert(name, bar);
                }
            }
            Event::ItemProgress { stage, item, done, total, message, .. } => {
                // A long item (a training run): a bar of its own steps, gone when it is done.
                let name = format!("{stage} {item}");
                let bar = bars.entry(name.clone()).or_insert_with(|| {
                    let bar = self.multi.add(ProgressBar::new(*total));
                    bar.set_style(ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({elapsed}, {eta})").expect("valid template").progress_chars("=> "));
                    bar.set_prefix(name);
                    bar
                });
                bar.set_length(*total);
                bar.set_position(*done);
                bar.set_message(message.clone());
            }
            Event::Item { stage, item, .. } => {
                let name = match engine::item_group(item) {
                    Some(group) if !bars.contains_key(stage) => format!("{stage} {group}"),
                    _ => stage.clone(),
                };
                if let Some(bar) = bars.get(&name) {
                    bar.inc(1);
                }
            }
            Event::Finished { stage, .. } | Event::Failed { stage, .. } => {
                let prefix = format!("{stage} ");
                bars.retain(|name, bar| {
                    let ours = name == stage || name.starts_with(&prefix);
                    if ours {
                        bar.finish_and_clear();
                    }
                    !ours
                });
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
