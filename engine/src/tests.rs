//! Engine tests over small deterministic stage kinds. They assert on the event log: which stages
//! and which items executed, as cargo's freshness tests do.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::events::{Event, Observer, Recorder};
use crate::exec::{PlanStatus, RunOptions, StopReason};
use crate::lockfile::Lockfile;
use crate::stage::*;
use crate::{Diagnostic, Registry, Store};

/// `numbers`: one integer per line of a file.
struct Numbers;
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct NumbersConfig {
    path: FileRef,
}
struct NumbersStage(FileRef);

impl StagePlugin for Numbers {
    type Config = NumbersConfig;
    const KIND: &'static str = "numbers";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "integers from a file";
    const INPUTS: &'static [Port] = &[];
    const OUTPUT: &'static str = "numbers";
    fn build(c: NumbersConfig, cx: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        cx.file(&c.path).map_err(|d| vec![d])?;
        Ok(Arc::new(NumbersStage(c.path)))
    }
}

impl Stage for NumbersStage {
    fn finish(&self, input: &StageInput, _: Vec<(Item, Value)>) -> Result<Value, StageError> {
        let text = String::from_utf8_lossy(input.file(&self.0)?).into_owned();
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: i64 = line.trim().parse().map_err(|_| StageError::new(format!("line {}: not an integer", n + 1)))?;
            out.push(json!({"id": format!("n{}", n + 1), "value": v}));
        }
        Ok(json!({ "values": out }))
    }
}

/// `constant`: a parameter.
struct Constant;
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ConstantConfig {
    value: i64,
}
struct ConstantStage(i64);
impl StagePlugin for Constant {
    type Config = ConstantConfig;
    const KIND: &'static str = "constant";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "a parameter";
    const INPUTS: &'static [Port] = &[];
    const OUTPUT: &'static str = "param";
    fn build(c: ConstantConfig, _: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        Ok(Arc::new(ConstantStage(c.value)))
    }
}
impl Stage for ConstantStage {
    /// What it "runs", as a model-running stage names its models.
    fn pins(&self) -> crate::Pins {
        [("the constant".to_string(), [("value".to_string(), self.0.to_string())].into())].into()
    }

    fn finish(&self, _: &StageInput, _: Vec<(Item, Value)>) -> Result<Value, StageError> {
        Ok(json!({"value": self.0}))
    }
}

/// `shift`: per item, value + add (+ param when given). `label` does not affect the output.
struct Shift;
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ShiftConfig {
    #[serde(default)]
    add: i64,
    label: Option<String>,
}
struct ShiftStage(ShiftConfig);
impl StagePlugin for Shift {
    type Config = ShiftConfig;
    const KIND: &'static str = "shift";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "add to each number";
    const INPUTS: &'static [Port] = &[Port::new("numbers", "numbers"), Port::new("param", "param")];
    const OUTPUT: &'static str = "numbers";
    fn build(c: ShiftConfig, _: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        Ok(Arc::new(ShiftStage(c)))
    }
}
#[async_trait::async_trait]
impl Stage for ShiftStage {
    fn items(&self, input: &StageInput) -> Result<Vec<Item>, StageError> {
        let param = input.input("param")?["value"].as_i64().unwrap_or(0);
        Ok(input.input("numbers")?["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| Item { id: v["id"].as_str().unwrap().into(), input: json!({"value": v["value"], "param": param, "add": self.0.add}) })
            .collect())
    }
    async fn run_item(&self, item: &Item, _: &ItemContext) -> Result<Value, StageError> {
        if item.input["value"] == 13 {
            return Err(StageError::new("unlucky number"));
        }
        Ok(json!(item.input["value"].as_i64().unwrap() + item.input["param"].as_i64().unwrap() + item.input["add"].as_i64().unwrap()))
    }
    fn finish(&self, _: &StageInput, results: Vec<(Item, Value)>) -> Result<Value, StageError> {
        Ok(json!({"values": results.into_iter().map(|(it, v)| json!({"id": it.id, "value": v})).collect::<Vec<_>>()}))
    }
}

/// `sum`: metrics.total.
struct Sum;
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Empty {}
struct SumStage;
impl StagePlugin for Sum {
    type Config = Empty;
    const KIND: &'static str = "sum";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "sum of numbers";
    const INPUTS: &'static [Port] = &[Port::new("numbers", "numbers")];
    const OUTPUT: &'static str = "score";
    fn build(_: Empty, _: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        Ok(Arc::new(SumStage))
    }
}
impl Stage for SumStage {
    fn metrics(&self) -> Option<&'static [&'static str]> {
        Some(&["total"])
    }
    fn finish(&self, input: &StageInput, _: Vec<(Item, Value)>) -> Result<Value, StageError> {
        let total: i64 = input.input("numbers")?["values"].as_array().unwrap().iter().map(|v| v["value"].as_i64().unwrap()).sum();
        Ok(json!({"metrics": {"total": total}}))
    }
}

/// `improve`: next param = param + 1, at most 3 (the feedback source); it reports progress
/// (`metrics.improved`) only for its first step.
struct Improve;
struct ImproveStage;
impl StagePlugin for Improve {
    type Config = Empty;
    const KIND: &'static str = "improve";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "raise the parameter";
    const INPUTS: &'static [Port] = &[Port::new("param", "param"), Port::new("score", "score")];
    const OUTPUT: &'static str = "param";
    fn build(_: Empty, _: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        Ok(Arc::new(ImproveStage))
    }
}
impl Stage for ImproveStage {
    fn metrics(&self) -> Option<&'static [&'static str]> {
        Some(&["improved"])
    }
    fn finish(&self, input: &StageInput, _: Vec<(Item, Value)>) -> Result<Value, StageError> {
        let next = input.input("param")?["value"].as_i64().unwrap() + 1;
        Ok(json!({"value": next.min(3), "metrics": {"improved": if next <= 1 { 1.0 } else { 0.0 }}}))
    }
}

/// `timed`: like `shift` with add 0, plus a measured field that differs on every run.
struct Timed;
struct TimedStage;
impl StagePlugin for Timed {
    type Config = Empty;
    const KIND: &'static str = "timed";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "copy numbers, measuring each";
    const INPUTS: &'static [Port] = &[Port::new("numbers", "numbers")];
    const OUTPUT: &'static str = "numbers";
    fn build(_: Empty, _: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        Ok(Arc::new(TimedStage))
    }
}
#[async_trait::async_trait]
impl Stage for TimedStage {
    fn items(&self, input: &StageInput) -> Result<Vec<Item>, StageError> {
        Ok(input.input("numbers")?["values"].as_array().unwrap().iter().map(|v| Item { id: v["id"].as_str().unwrap().into(), input: v.clone() }).collect())
    }
    async fn run_item(&self, item: &Item, _: &ItemContext) -> Result<Value, StageError> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        Ok(json!({"id": item.input["id"], "value": item.input["value"], "timing": {"elapsed_ns": nanos}}))
    }
    fn volatile_keys(&self) -> &'static [&'static str] {
        &["timing"]
    }
    fn finish(&self, _: &StageInput, results: Vec<(Item, Value)>) -> Result<Value, StageError> {
        Ok(json!({"values": results.into_iter().map(|(_, v)| v).collect::<Vec<_>>()}))
    }
}

/// `drift`: a stage that is not reproducible, as a training on another kind of CPU is not: each
/// execution outputs the next value of `DRIFT`, and names it (and a part that never changes) from
/// its output, as a finetune stage names its model's files.
struct Drift;
struct DriftStage;
static DRIFT: AtomicUsize = AtomicUsize::new(0);
impl StagePlugin for Drift {
    type Config = Empty;
    const KIND: &'static str = "drift";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "another value each time it runs";
    const INPUTS: &'static [Port] = &[];
    const OUTPUT: &'static str = "param";
    fn build(_: Empty, _: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        Ok(Arc::new(DriftStage))
    }
}
impl Stage for DriftStage {
    fn finish(&self, _: &StageInput, _: Vec<(Item, Value)>) -> Result<Value, StageError> {
        Ok(json!({"value": DRIFT.fetch_add(1, Ordering::SeqCst)}))
    }
    fn output_pins(&self, output: &dyn Fn() -> Option<Value>) -> crate::Pins {
        let value = output().map(|o| o["value"].to_string()).unwrap_or_default();
        [("the drift".to_string(), [("value".to_string(), value), ("unit".to_string(), "none".to_string())].into())].into()
    }
}

/// `busy`: like `timed` without the measurement, each item taking 30 ms and noting in `BUSY` what
/// ran beside it; with `alone = true` it asks to run with no other stage.
struct Busy;
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct BusyConfig {
    #[serde(default)]
    alone: bool,
    /// Part of each item's input, so that stages' items are not memoized for one another.
    label: String,
}
struct BusyStage(BusyConfig);
impl StagePlugin for Busy {
    type Config = BusyConfig;
    const KIND: &'static str = "busy";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "copy numbers, slowly";
    const INPUTS: &'static [Port] = &[Port::new("numbers", "numbers")];
    const OUTPUT: &'static str = "numbers";
    fn build(config: BusyConfig, _: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        Ok(Arc::new(BusyStage(config)))
    }
}
/// Items of `busy` stages running now, of those the ones asking to run alone, the most that ran at
/// once, and whether an item asking to run alone ever had company.
struct BusyLog {
    now: AtomicUsize,
    alone_now: AtomicUsize,
    most: AtomicUsize,
    company: AtomicBool,
}
static BUSY: BusyLog = BusyLog { now: AtomicUsize::new(0), alone_now: AtomicUsize::new(0), most: AtomicUsize::new(0), company: AtomicBool::new(false) };
impl BusyLog {
    fn check(&self, alone: bool) {
        let (now, alone_now) = (self.now.load(Ordering::SeqCst), self.alone_now.load(Ordering::SeqCst));
        if (alone && now > 1) || (!alone && alone_now > 0) {
            self.company.store(true, Ordering::SeqCst);
        }
    }
}
#[async_trait::async_trait]
impl Stage for BusyStage {
    fn items(&self, input: &StageInput) -> Result<Vec<Item>, StageError> {
        let values = input.input("numbers")?["values"].as_array().unwrap();
        Ok(values.iter().map(|v| Item { id: v["id"].as_str().unwrap().into(), input: json!({"value": v, "label": self.0.label}) }).collect())
    }
    async fn run_item(&self, item: &Item, _: &ItemContext) -> Result<Value, StageError> {
        let alone = self.0.alone;
        let now = BUSY.now.fetch_add(1, Ordering::SeqCst) + 1;
        BUSY.most.fetch_max(now, Ordering::SeqCst);
        if alone {
            BUSY.alone_now.fetch_add(1, Ordering::SeqCst);
        }
        BUSY.check(alone);
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        BUSY.check(alone);
        if alone {
            BUSY.alone_now.fetch_sub(1, Ordering::SeqCst);
        }
        BUSY.now.fetch_sub(1, Ordering::SeqCst);
        Ok(item.input["value"].clone())
    }
    fn runs_alone(&self) -> bool {
        self.0.alone
    }
    fn finish(&self, _: &StageInput, results: Vec<(Item, Value)>) -> Result<Value, StageError> {
        Ok(json!({"values": results.into_iter().map(|(_, v)| v).collect::<Vec<_>>()}))
    }
}

/// `stream_shift`: `shift` with `add = 1` and no parameter, its input read one element at a time
/// and its output written as it is assembled.
struct StreamShift;
struct StreamShiftStage;
impl StagePlugin for StreamShift {
    type Config = Empty;
    const KIND: &'static str = "stream_shift";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "add one to each number, streamed";
    const INPUTS: &'static [Port] = &[Port::new("numbers", "numbers")];
    const OUTPUT: &'static str = "numbers";
    fn build(_: Empty, _: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        Ok(Arc::new(StreamShiftStage))
    }
}
#[async_trait::async_trait]
impl Stage for StreamShiftStage {
    fn each_item(&self, input: &StageInput, f: &mut dyn FnMut(Item) -> Result<(), StageError>) -> Result<(), StageError> {
        input.each("numbers", "values", |v: Value| f(Item { id: v["id"].as_str().unwrap().into(), input: json!({"value": v["value"], "param": 0, "add": 1}) }))
    }
    async fn run_item(&self, item: &Item, cx: &ItemContext) -> Result<Value, StageError> {
        ShiftStage(ShiftConfig { add: 1, label: None }).run_item(item, cx).await
    }
    fn streams_output(&self) -> bool {
        true
    }
    fn write_output(&self, _: &StageInput, results: &mut dyn Iterator<Item = Result<(Item, Value), StageError>>, out: &mut crate::stream::OutputWriter) -> Result<(), StageError> {
        out.elements("values", results.map(|r| r.map(|(it, v)| json!({"id": it.id, "value": v}))))
    }
    fn finish(&self, _: &StageInput, _: Vec<(Item, Value)>) -> Result<Value, StageError> {
        Err(StageError::new("streamed: never built whole"))
    }
}

/// `stream_results`: `stream_shift` whose items' results are the output's elements as they are
/// ([`Stage::output_holds_results`]): its output is written from the store alone.
struct StreamResults;
struct StreamResultsStage;
impl StagePlugin for StreamResults {
    type Config = Empty;
    const KIND: &'static str = "stream_results";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "add one to each number, its output written from the results as kept";
    const INPUTS: &'static [Port] = &[Port::new("numbers", "numbers")];
    const OUTPUT: &'static str = "numbers";
    fn build(_: Empty, _: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        Ok(Arc::new(StreamResultsStage))
    }
}
#[async_trait::async_trait]
impl Stage for StreamResultsStage {
    fn each_item(&self, input: &StageInput, f: &mut dyn FnMut(Item) -> Result<(), StageError>) -> Result<(), StageError> {
        input.each("numbers", "values", |v: Value| f(Item { id: v["id"].as_str().unwrap().into(), input: json!({"id": v["id"], "value": v["value"], "param": 0, "add": 1}) }))
    }
    async fn run_item(&self, item: &Item, cx: &ItemContext) -> Result<Value, StageError> {
        let value = ShiftStage(ShiftConfig { add: 1, label: None }).run_item(item, cx).await?;
        Ok(json!({"id": item.input["id"], "value": value}))
    }
    fn streams_output(&self) -> bool {
        true
    }
    fn output_holds_results(&self) -> bool {
        true
    }
    fn write_output(&self, _: &StageInput, results: &mut dyn Iterator<Item = Result<(Item, Value), StageError>>, out: &mut crate::stream::OutputWriter) -> Result<(), StageError> {
        assert!(results.next().is_none(), "a stage whose output holds its results is not given its items again");
        out.item_values("values")
    }
    fn finish(&self, _: &StageInput, _: Vec<(Item, Value)>) -> Result<Value, StageError> {
        Err(StageError::new("streamed: never built whole"))
    }
}

/// `element_results`: `stream_results` whose items are made from the numbers' elements
/// ([`Stage::items_of_elements`]), adding `add`; numbers equal to `skip` make none. Counts the
/// elements it parses.
struct ElementResults;
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ElementResultsConfig {
    add: i64,
    #[serde(default)]
    skip: Option<i64>,
}
struct ElementResultsStage(ElementResultsConfig);
static ELEMENTS_PARSED: AtomicUsize = AtomicUsize::new(0);
impl StagePlugin for ElementResults {
    type Config = ElementResultsConfig;
    const KIND: &'static str = "element_results";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "add to each number, its items made from the numbers' elements";
    const INPUTS: &'static [Port] = &[Port::new("numbers", "numbers")];
    const OUTPUT: &'static str = "numbers";
    fn build(config: ElementResultsConfig, _: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        Ok(Arc::new(ElementResultsStage(config)))
    }
}
#[async_trait::async_trait]
impl Stage for ElementResultsStage {
    fn items_of_elements(&self) -> Option<(&'static str, &'static str)> {
        Some(("numbers", "values"))
    }
    fn element_items<'a>(&'a self, _: &'a StageInput) -> Result<ElementItems<'a>, StageError> {
        Ok(Box::new(|element| {
            ELEMENTS_PARSED.fetch_add(1, Ordering::SeqCst);
            let v: Value = serde_json::from_slice(element).map_err(|e| StageError::new(e.to_string()))?;
            if self.0.skip.is_some_and(|skip| v["value"] == skip) {
                return Ok(None);
            }
            Ok(Some(Item { id: v["id"].as_str().unwrap().into(), input: json!({"id": v["id"], "value": v["value"], "param": 0, "add": self.0.add}) }))
        }))
    }
    async fn run_item(&self, item: &Item, cx: &ItemContext) -> Result<Value, StageError> {
        let value = ShiftStage(ShiftConfig { add: self.0.add, label: None }).run_item(item, cx).await?;
        Ok(json!({"id": item.input["id"], "value": value}))
    }
    fn streams_output(&self) -> bool {
        true
    }
    fn output_holds_results(&self) -> bool {
        true
    }
    fn write_output(&self, _: &StageInput, _: &mut dyn Iterator<Item = Result<(Item, Value), StageError>>, out: &mut crate::stream::OutputWriter) -> Result<(), StageError> {
        out.item_values("values")
    }
    fn finish(&self, _: &StageInput, _: Vec<(Item, Value)>) -> Result<Value, StageError> {
        Err(StageError::new("streamed: never built whole"))
    }
}

fn registry() -> Registry {
    let mut r = Registry::new();
    r.register::<Numbers>().register::<Constant>().register::<Shift>().register::<Sum>().register::<Improve>().register::<Timed>().register::<StreamShift>().register::<StreamResults>();
    r.register::<ElementResults>().register::<Busy>().register::<Drift>();
    r
}

struct Project {
    dir: tempfile::TempDir,
}

const PIPELINE: &str = r#"
seed = 1
[stages.nums]
kind = "numbers"
path = "nums.txt"
[stages.param]
kind = "constant"
value = 0
[stages.shifted]
kind = "shift"
needs = ["nums", "param"]
add = 1
[stages.total]
kind = "sum"
needs = ["shifted"]
"#;

impl Project {
    fn new(pipeline: &str, nums: &str) -> Project {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.toml"), pipeline).unwrap();
        std::fs::write(dir.path().join("nums.txt"), nums).unwrap();
        Project { dir }
    }
    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.path(name), text).unwrap();
    }
    fn edit(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(self.path("p.toml")).unwrap();
        assert!(text.contains(from), "{from:?} not in pipeline");
        self.write("p.toml", &text.replacen(from, to, 1));
    }
    fn store(&self) -> Store {
        Store::new(self.path(".pipeline"))
    }
    fn pipeline(&self) -> crate::Pipeline {
        crate::load(&self.path("p.toml"), &registry()).unwrap_or_else(|d| panic!("{}", d[0].render(false)))
    }
    fn run_with(&self, locked: Option<Lockfile>, cancel_after: Option<usize>) -> (Result<crate::RunReport, crate::RunError>, Vec<String>) {
        let recorder = Arc::new(Recorder::default());
        let cancel = Arc::new(AtomicBool::new(false));
        struct CancelAfter(Arc<AtomicBool>, AtomicUsize, usize);
        impl Observer for CancelAfter {
            fn event(&self, e: &Event) {
                if matches!(e, Event::Item { .. }) && self.1.fetch_add(1, Ordering::SeqCst) + 1 >= self.2 {
                    self.0.store(true, Ordering::SeqCst);
                }
            }
        }
        let mut observers: Vec<Arc<dyn Observer>> = vec![recorder.clone()];
        if let Some(n) = cancel_after {
            observers.push(Arc::new(CancelAfter(cancel.clone(), AtomicUsize::new(0), n)));
        }
        let opts = RunOptions { jobs: 4, locked, observer: Arc::new(crate::events::Tee(observers)), cancel };
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let result = rt.block_on(crate::run(Arc::new(self.pipeline()), self.store(), opts));
        (result, log(recorder.take()))
    }
    fn run(&self) -> Vec<String> {
        let (r, log) = self.run_with(None, None);
        r.unwrap();
        log
    }
}

/// Events as compact strings, sorted within an iteration so concurrency does not matter.
fn log(events: Vec<Event>) -> Vec<String> {
    let mut out: Vec<String> = events
        .into_iter()
        .filter_map(|e| {
            Some(match e {
                Event::Fresh { iteration, stage } => format!("{iteration} {stage} fresh"),
                Event::Fed { iteration, stage, from } => format!("{iteration} {stage} fed from {from}"),
                Event::Started { iteration, stage, items, cached_items, .. } => {
                    format!("{iteration} {stage} run ({} of {items} items)", items - cached_items)
                }
                Event::Item { iteration, stage, item } => format!("{iteration} {stage}/{item}"),
                Event::Finished { iteration, stage, unchanged: true, .. } => format!("{iteration} {stage} unchanged"),
                Event::Finished { .. } | Event::ItemProgress { .. } => return None,
                Event::Failed { iteration, stage, error } => format!("{iteration} {stage} failed: {error}"),
                Event::Skipped { iteration, stage, because } => format!("{iteration} {stage} skipped: {because}"),
                Event::IterationDone { iteration, targets_met } => format!("{iteration} done, targets met: {targets_met:?}"),
            })
        })
        .collect();
    out.sort_by(|a, b| a.split(' ').next().cmp(&b.split(' ').next()).then(a.cmp(b)));
    out
}

#[test]
fn first_run_executes_everything_and_second_nothing() {
    let p = Project::new(PIPELINE, "1\n2\n3\n");
    assert_eq!(
        p.run(),
        [
            "0 done, targets met: None",
            "0 nums run (0 of 0 items)",
            "0 param run (0 of 0 items)",
            "0 shifted run (3 of 3 items)",
            "0 shifted/n1",
            "0 shifted/n2",
            "0 shifted/n3",
            "0 total run (0 of 0 items)",
        ]
    );
    assert_eq!(p.run(), ["0 done, targets met: None", "0 nums fresh", "0 param fresh", "0 shifted fresh", "0 total fresh"]);
}

#[test]
fn a_stage_that_runs_alone_waits_for_the_others_and_none_start_beside_it() {
    // `a` and `b` run side by side; `alone`, next in line, waits for them, and `d` waits for it.
    let pipeline = "[stages.nums]\nkind = \"numbers\"\npath = \"nums.txt\"\n\
        [stages.a]\nkind = \"busy\"\nneeds = [\"nums\"]\nlabel = \"a\"\n[stages.b]\nkind = \"busy\"\nneeds = [\"nums\"]\nlabel = \"b\"\n\
        [stages.alone]\nkind = \"busy\"\nneeds = [\"nums\"]\nlabel = \"alone\"\nalone = true\n\
        [stages.d]\nkind = \"busy\"\nneeds = [\"nums\"]\nlabel = \"d\"\n";
    let p = Project::new(pipeline, "1\n2\n3\n");
    let log = p.run();
    for stage in ["a", "b", "alone", "d"] {
        assert!(log.contains(&format!("0 {stage} run (3 of 3 items)")), "{log:?}");
    }
    assert_eq!(BUSY.most.load(Ordering::SeqCst), 2, "the stages that may share the machine share it");
    assert!(!BUSY.company.load(Ordering::SeqCst), "a stage asking to run alone had company");
}

#[test]
fn config_change_reruns_exactly_the_stage_and_its_dependents() {
    let p = Project::new(PIPELINE, "1\n2\n");
    p.run();
    p.edit("add = 1", "add = 2");
    let plan = crate::plan(&p.pipeline(), &p.store()).unwrap();
    let summary: Vec<String> = plan.stages.iter().map(|s| format!("{} {:?}: {}", s.id, s.status, s.reasons.join("; "))).collect();
    assert_eq!(
        summary,
        [
            "nums Fresh: ",
            "param Fresh: ",
            "shifted Dirty: config changed: add 1 → 2; 2 new item(s), 0 cached",
            "total Pending: upstream `shifted` will run (this reruns unless its output is unchanged)",
        ]
    );
    assert_eq!(
        p.run(),
        [
            "0 done, targets met: None",
            "0 nums fresh",
            "0 param fresh",
            "0 shifted run (2 of 2 items)",
            "0 shifted/n1",
            "0 shifted/n2",
            "0 total run (0 of 0 items)",
        ]
    );
}

#[test]
fn new_rows_compute_only_new_items() {
    let p = Project::new(PIPELINE, "1\n2\n");
    p.run();
    p.write("nums.txt", "1\n2\n5\n");
    let plan = crate::plan(&p.pipeline(), &p.store()).unwrap();
    assert!(matches!(plan.stages[0].status, PlanStatus::Dirty));
    assert_eq!(plan.stages[0].reasons, ["file `nums.txt` changed"]);
    assert_eq!(
        p.run(),
        ["0 done, targets met: None", "0 nums run (0 of 0 items)", "0 param fresh", "0 shifted run (1 of 3 items)", "0 shifted/n3", "0 total run (0 of 0 items)"]
    );
}

#[test]
fn unchanged_output_stops_the_cascade() {
    let p = Project::new(PIPELINE, "1\n2\n");
    p.run();
    // `label` changes the config (so `shifted` reruns) but neither its items (they do not depend
    // on it) nor its output: `total` stays fresh.
    p.edit("add = 1", "add = 1\nlabel = \"x\"");
    assert_eq!(p.run(), ["0 done, targets met: None", "0 nums fresh", "0 param fresh", "0 shifted run (0 of 2 items)", "0 shifted unchanged", "0 total fresh"]);
}

#[test]
fn several_failures_are_counted_and_failures_in_a_row_stop_the_stage() {
    let p = Project::new(PIPELINE, "13\n1\n13\n");
    let (_, log) = p.run_with(None, None);
    assert!(log.contains(&"0 shifted failed: 2 items failed; finished items are kept and a rerun retries only the failed ones. First: item `n1`: unlucky number".to_string()), "{log:#?}");
    let p = Project::new(PIPELINE, &"13\n".repeat(7));
    let (_, log) = p.run_with(None, None);
    let failed: Vec<_> = log.iter().filter(|l| l.contains("shifted failed")).collect();
    assert_eq!(failed, ["0 shifted failed: stopped after 5 items failed in a row (2 not started); finished items are kept. First: item `n1`: unlucky number"]);
}

#[test]
fn failure_stops_dependents_keeps_finished_items_and_reruns_only_the_rest() {
    let p = Project::new(PIPELINE, "1\n13\n3\n");
    let (r, log) = p.run_with(None, None);
    assert_eq!(r.unwrap().stop, StopReason::Failed);
    assert_eq!(
        log,
        [
            "0 done, targets met: None",
            "0 nums run (0 of 0 items)",
            "0 param run (0 of 0 items)",
            "0 shifted failed: item `n2`: unlucky number",
            "0 shifted run (3 of 3 items)",
            "0 shifted/n1",
            "0 shifted/n3",
            "0 total skipped: upstream `shifted` failed",
        ],
        "the other items run and are kept"
    );
    assert!(!p.path("p.lock").exists(), "no lockfile after a failed run");
    p.write("nums.txt", "1\n2\n3\n");
    assert_eq!(
        p.run(),
        [
            "0 done, targets met: None",
            "0 nums run (0 of 0 items)",
            "0 param fresh",
            "0 shifted run (1 of 3 items)",
            "0 shifted/n2",
            "0 total run (0 of 0 items)",
        ]
    );
}

#[test]
fn interrupt_keeps_finished_items() {
    let p = Project::new(PIPELINE, "1\n2\n3\n4\n");
    let (r, log) = p.run_with(None, Some(2));
    assert_eq!(r.unwrap().stop, StopReason::Interrupted);
    assert!(log.contains(&"0 total skipped: interrupted".to_string()), "{log:?}");
    // The rerun computes only the two items that had not finished.
    assert_eq!(
        p.run(),
        [
            "0 done, targets met: None",
            "0 nums fresh",
            "0 param fresh",
            "0 shifted run (2 of 4 items)",
            "0 shifted/n3",
            "0 shifted/n4",
            "0 total run (0 of 0 items)",
        ]
    );
}

#[test]
fn iterates_through_the_feedback_edge_until_targets_are_met() {
    let pipeline = format!(
        "{PIPELINE}\n[stages.next]\nkind = \"improve\"\nneeds = [\"param\", \"total\"]\n\n[targets]\nfrom = \"total\"\ntotal = {{ min = 9 }}\n\n[iterate]\nmax_iterations = 5\nfeedback = {{ from = \"next\", to = \"param\" }}\n"
    );
    // nums 1,2 + add 1 → total 5 at param 0, 7 at param 1, 9 at param 2.
    let p = Project::new(&pipeline, "1\n2\n");
    let (r, log) = p.run_with(None, None);
    let report = r.unwrap();
    assert_eq!(report.stop, StopReason::TargetsMet);
    assert_eq!(report.iterations.len(), 3);
    let totals: Vec<f64> = report.iterations.iter().map(|it| it.metrics["total"]).collect();
    assert_eq!(totals, [5.0, 7.0, 9.0]);
    assert!(log.contains(&"1 param fed from next".to_string()));
    assert!(log.contains(&"1 nums fresh".to_string()), "only stages downstream of the feedback rerun: {log:?}");
    assert!(log.contains(&"2 done, targets met: Some(true)".to_string()));
    // Each iteration's artifacts stay addressable.
    for (k, total) in [(0, 5), (1, 7), (2, 9)] {
        let d = report.output("total", Some(k)).unwrap();
        assert_eq!(p.store().get_object(&d).unwrap()["metrics"]["total"], total);
    }
    // A second run replays all three iterations from the store.
    let (r, log) = p.run_with(None, None);
    assert_eq!(r.unwrap().iterations.len(), 3);
    assert!(log.iter().all(|l| !l.contains(" run (")), "{log:?}");
}

#[test]
fn iteration_stops_after_patience_iterations_without_progress() {
    let pipeline = format!(
        "{PIPELINE}\n[stages.next]\nkind = \"improve\"\nneeds = [\"param\", \"total\"]\n\n[iterate]\nmax_iterations = 10\npatience = 2\nfeedback = {{ from = \"next\", to = \"param\" }}\n"
    );
    let p = Project::new(&pipeline, "1\n");
    let report = p.run_with(None, None).0.unwrap();
    // improved: 1 (param 0 → 1), 0 (1 → 2), 0 (2 → 3): two in a row without progress.
    assert_eq!(report.stop, StopReason::NoProgress);
    assert_eq!(report.iterations.len(), 3);
}

#[test]
fn iteration_stops_when_the_item_budget_is_spent() {
    let pipeline = format!(
        "{PIPELINE}\n[stages.next]\nkind = \"improve\"\nneeds = [\"param\", \"total\"]\n\n[iterate]\nmax_iterations = 10\nmax_items = 3\nfeedback = {{ from = \"next\", to = \"param\" }}\n"
    );
    // Two numbers: `shift` computes 2 items per iteration; after the second, 4 ≥ 3.
    let p = Project::new(&pipeline, "1\n2\n");
    let report = p.run_with(None, None).0.unwrap();
    assert_eq!(report.stop, StopReason::BudgetSpent);
    assert_eq!(report.iterations.len(), 2);
    // A rerun computes nothing (everything is memoized), so it replays further before the budget
    // is spent: the budget counts work done, not work replayed.
    let report = p.run_with(None, None).0.unwrap();
    assert_eq!(report.stop, StopReason::Converged);
}

#[test]
fn iteration_stops_when_feedback_converges() {
    let pipeline = format!(
        "{PIPELINE}\n[stages.next]\nkind = \"improve\"\nneeds = [\"param\", \"total\"]\n\n[iterate]\nmax_iterations = 10\nfeedback = {{ from = \"next\", to = \"param\" }}\n"
    );
    let p = Project::new(&pipeline, "1\n");
    let report = p.run_with(None, None).0.unwrap();
    // param 0 → 1 → 2 → 3 → 3 (improve caps at 3): the fifth iteration changes nothing.
    assert_eq!(report.stop, StopReason::Converged);
    assert_eq!(report.iterations.len(), 4);
}

#[test]
fn locked_run_refuses_a_changed_pipeline_and_leaves_the_lockfile() {
    let p = Project::new(PIPELINE, "1\n2\n");
    p.run();
    let lock_text = std::fs::read_to_string(p.path("p.lock")).unwrap();
    // What a stage runs is named in its entry (for a reviewer of the lockfile's diff).
    assert!(lock_text.contains("id = \"param\"") && lock_text.contains("[stage.pins.\"the constant\"]\nvalue = \"0\"\n"), "{lock_text}");
    let lock = Lockfile::read(&p.path("p.lock")).unwrap().unwrap();
    // Unchanged: a locked run passes, and even from an empty store it reproduces the lock.
    assert!(p.run_with(Some(lock.clone()), None).0.is_ok());
    std::fs::remove_dir_all(p.path(".pipeline")).unwrap();
    assert!(p.run_with(Some(lock.clone()), None).0.is_ok());
    p.edit("add = 1", "add = 3");
    let err = p.run_with(Some(lock.clone()), None).0.unwrap_err().to_string();
    assert_eq!(err, "stage `shifted` (iteration 1) differs from the lockfile: config differs");
    p.edit("add = 3", "add = 1");
    p.write("nums.txt", "1\n2\n3\n");
    let err = p.run_with(Some(lock), None).0.unwrap_err().to_string();
    assert_eq!(err, "file `nums.txt` changed");
    assert_eq!(std::fs::read_to_string(p.path("p.lock")).unwrap(), lock_text);
}

#[test]
fn a_locked_run_names_what_an_irreproducible_stage_pins_differently() {
    let p = Project::new("[stages.d]\nkind = \"drift\"\n", "");
    p.run();
    let lock = Lockfile::read(&p.path("p.lock")).unwrap().unwrap();
    let was = lock.stage("d", 0).unwrap().pins["the drift"]["value"].clone();
    std::fs::remove_dir_all(p.path(".pipeline")).unwrap();
    let err = p.run_with(Some(lock), None).0.unwrap_err().to_string();
    let now: usize = was.parse::<usize>().unwrap() + 1;
    assert!(err.starts_with("stage `d` (iteration 1) produced "), "{err}");
    // The pin that moved, with both values; not the one that held.
    assert!(err.ends_with(&format!(": the stage is not reproducible (the drift: value {now} here, {was} locked)")), "{err}");
}

#[test]
fn lockfile_pins_outputs_without_their_measurements() {
    let pipeline = "[stages.nums]\nkind = \"numbers\"\npath = \"nums.txt\"\n[stages.timed]\nkind = \"timed\"\nneeds = [\"nums\"]\n[stages.total]\nkind = \"sum\"\nneeds = [\"timed\"]\n";
    let p = Project::new(pipeline, "1\n2\n");
    p.run();
    let lock = Lockfile::read(&p.path("p.lock")).unwrap().unwrap();
    // From an empty store everything reruns and the timings differ, yet the run matches the lock.
    std::fs::remove_dir_all(p.path(".pipeline")).unwrap();
    let (r, log) = p.run_with(Some(lock.clone()), None);
    r.unwrap();
    assert!(log.contains(&"0 timed run (2 of 2 items)".to_string()), "{log:?}");
    assert!(log.contains(&"0 total run (0 of 0 items)".to_string()), "{log:?}");
    // A real change still fails the locked run.
    p.write("nums.txt", "1\n3\n");
    std::fs::remove_dir_all(p.path(".pipeline")).unwrap();
    let err = p.run_with(Some(lock), None).0.unwrap_err().to_string();
    assert_eq!(err, "file `nums.txt` changed");
}

#[test]
fn store_lock_refuses_a_second_run() {
    let p = Project::new(PIPELINE, "1\n");
    let _held = p.store().lock().unwrap();
    let err = p.run_with(None, None).0.unwrap_err().to_string();
    assert!(err.starts_with("another `pipeline run` is using the store"), "{err}");
}

#[test]
fn lockfile_pins_fingerprints() {
    let p = Project::new(PIPELINE, "1\n2\n");
    p.run();
    let lock = std::fs::read_to_string(p.path("p.lock")).unwrap();
    insta::assert_snapshot!(lock);
}

fn diagnostics(pipeline: &str, files: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let path = dir.path().join("p.toml");
    std::fs::write(&path, pipeline).unwrap();
    let file = crate::diag::SourceFile::new(Path::new("p.toml"), std::fs::read_to_string(&path).unwrap());
    // Parse with the temp dir as base by loading from the real path, then re-render relative.
    match crate::load(&path, &registry()) {
        Ok(_) => "ok".into(),
        Err(ds) => ds
            .iter()
            .map(|d| {
                let mut d = d.clone();
                if let Some(p) = &mut d.primary {
                    p.file = file.clone();
                }
                for s in &mut d.secondary {
                    s.file = file.clone();
                }
                d.help = d.help.map(|h| h.replace(&dir.path().display().to_string(), "$DIR"));
                d.render(false)
            })
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

#[test]
fn cycle_is_named_with_every_edge() {
    let out = diagnostics(
        r#"
[stages.a]
kind = "shift"
needs = ["c", "p"]
[stages.b]
kind = "shift"
needs = ["a", "p"]
[stages.c]
kind = "shift"
needs = ["b", "p"]
[stages.p]
kind = "constant"
value = 1
"#,
        &[],
    );
    insta::assert_snapshot!(out);
}

#[test]
fn feedback_must_close_a_loop_of_one_type() {
    let out = diagnostics(
        &format!("{PIPELINE}\n[iterate]\nmax_iterations = 2\nfeedback = {{ from = \"total\", to = \"param\" }}\n"),
        &[("nums.txt", "1\n")],
    );
    insta::assert_snapshot!(out);
}

#[test]
fn item_progress_reaches_the_observers() {
    let recorder = Arc::new(Recorder::default());
    let progress = crate::ItemProgress(Some((recorder.clone(), 2, "train".into(), "m".into())));
    progress.report(3, 10, "loss 0.5");
    crate::ItemProgress::default().report(1, 1, "to nobody");
    assert_eq!(recorder.take(), [Event::ItemProgress { iteration: 2, stage: "train".into(), item: "m".into(), done: 3, total: 10, message: "loss 0.5".into() }]);
}

const BOTH_WAYS: &str = r#"
[stages.nums]
kind = "numbers"
path = "nums.txt"
[stages.param]
kind = "constant"
value = 0
[stages.shifted]
kind = "shift"
needs = ["nums", "param"]
add = 1
[stages.streamed]
kind = "stream_shift"
needs = ["nums"]
[stages.held]
kind = "stream_results"
needs = ["nums"]
"#;

/// The outputs of `shifted` and `streamed` in the last run (`held`'s checked to be `streamed`'s).
fn both_outputs(p: &Project) -> (crate::Digest, crate::Digest) {
    let report: crate::RunReport = p.store().get_run("p").unwrap();
    let output = |id: &str| report.iterations[0].stages.iter().find(|s| s.id == id).unwrap().output.unwrap();
    assert_eq!(output("held"), output("streamed"), "written from the results as kept, the same bytes as from the items listed again");
    (output("shifted"), output("streamed"))
}

#[test]
fn a_streamed_output_is_the_artifact_built_whole_and_follows_new_rows() {
    // More items than the engine keeps from its listing: the rest are listed again as they run.
    let rows: String = (0..5000).map(|n| format!("{}\n", n + 20)).collect();
    let p = Project::new(BOTH_WAYS, &rows);
    let log = p.run();
    assert!(log.contains(&"0 streamed run (5000 of 5000 items)".to_string()), "{log:?}");
    let (whole, streamed) = both_outputs(&p);
    assert_eq!(whole, streamed, "the same bytes, whichever way they were assembled");
    assert_eq!(p.store().get_object(&streamed).unwrap()["values"][4999], json!({"id": "n5000", "value": 5020}));
    p.write("nums.txt", &format!("{rows}7\n"));
    let log = p.run();
    assert!(log.contains(&"0 streamed run (1 of 5001 items)".to_string()) && log.contains(&"0 streamed/n5001".to_string()), "{log:?}");
    assert!(log.contains(&"0 held run (1 of 5001 items)".to_string()), "{log:?}");
    let (whole, streamed) = both_outputs(&p);
    assert_eq!(whole, streamed);
}

#[test]
fn a_damaged_chunk_is_read_item_by_item_and_a_kept_one_stands_for_its_items() {
    let rows: String = (0..5000).map(|n| format!("{}\n", n + 20)).collect();
    let p = Project::new(BOTH_WAYS, &rows);
    p.run();
    let db = rusqlite::Connection::open(p.path(".pipeline/items.db")).unwrap();
    let chunks = |db: &rusqlite::Connection| -> Vec<(Vec<u8>, Vec<u8>)> {
        db.prepare("SELECT digest, value FROM chunks").unwrap().query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
    };
    let kept = chunks(&db).len();
    assert!((2..=20).contains(&kept), "5000 results of `held` in chunks of about a thousand: {kept}");
    // Every chunk damaged: each one's items are read one by one, and the chunk is kept again.
    db.execute("UPDATE chunks SET value = substr(value, 1, length(value) - 1)", []).unwrap();
    p.write("nums.txt", &format!("{rows}7\n"));
    let log = p.run();
    assert!(log.contains(&"0 held run (1 of 5001 items)".to_string()), "{log:?}");
    let (whole, streamed) = both_outputs(&p);
    assert_eq!(whole, streamed);
    let intact = chunks(&db).iter().filter(|(digest, value)| digest[..] == crate::Digest::of_bytes(value).0).count();
    assert!(intact >= kept - 1, "{intact} of the {kept} chunks kept again");
    // Every item's own row gone, every stage to run again: the chunks still hold every result.
    let before = p.store().get_object(&both_outputs(&p).1).unwrap();
    db.execute("DELETE FROM items", []).unwrap();
    std::fs::remove_dir_all(p.path(".pipeline/done")).unwrap();
    let log = p.run();
    assert!(log.contains(&"0 held run (0 of 5001 items)".to_string()) && log.contains(&"0 streamed run (5001 of 5001 items)".to_string()), "{log:?}");
    let (whole, streamed) = both_outputs(&p);
    assert_eq!(whole, streamed);
    assert_eq!(p.store().get_object(&streamed).unwrap(), before);
}

#[test]
fn a_stage_listed_by_elements_parses_only_the_chunks_that_changed_and_writes_what_the_items_make() {
    let pipeline = |add: i64, skip: &str| format!("[stages.nums]\nkind = \"numbers\"\npath = \"nums.txt\"\n[stages.held]\nkind = \"stream_results\"\nneeds = [\"nums\"]\n[stages.elements]\nkind = \"element_results\"\nneeds = [\"nums\"]\nadd = {add}\n{skip}");
    let rows: String = (0..20_000).map(|n| format!("{}\n", n + 20)).collect();
    let p = Project::new(&pipeline(1, ""), &rows);
    let parsed = || ELEMENTS_PARSED.swap(0, Ordering::SeqCst);
    let outputs = |p: &Project| {
        let report: crate::RunReport = p.store().get_run("p").unwrap();
        let output = |id: &str| report.iterations[0].stages.iter().find(|s| s.id == id).unwrap().output.unwrap();
        (output("held"), output("elements"))
    };
    parsed();
    let log = p.run();
    assert!(log.contains(&"0 elements run (20000 of 20000 items)".to_string()), "{log:?}");
    assert!(parsed() >= 20_000);
    let (held, elements) = outputs(&p);
    assert_eq!(held, elements, "the same items, results and output as a stage that lists them itself");
    // One row changed, one appended: the chunks they are in are parsed, the others read back.
    p.write("nums.txt", &format!("{}7\n", rows.replace("\n10020\n", "\n99\n")));
    let log = p.run();
    assert!(log.contains(&"0 elements run (2 of 20001 items)".to_string()), "{log:?}");
    let after = parsed();
    assert!((2..10_000).contains(&after), "{after} of 20001 elements parsed");
    let (held, elements) = outputs(&p);
    assert_eq!(held, elements);
    // Nothing kept but the items' own rows: every chunk parsed, nothing run, the same output.
    let db = rusqlite::Connection::open(p.path(".pipeline/items.db")).unwrap();
    db.execute("DELETE FROM chunks", []).unwrap();
    std::fs::remove_dir_all(p.path(".pipeline/done")).unwrap();
    let log = p.run();
    assert!(log.contains(&"0 elements run (0 of 20001 items)".to_string()), "{log:?}");
    assert!(parsed() >= 20_001);
    assert_eq!(outputs(&p), (held, elements));
    // The stage changed: what its chunks listed before is not theirs now.
    p.write("p.toml", &pipeline(2, "skip = 30\n"));
    let log = p.run();
    assert!(log.contains(&"0 elements run (20000 of 20000 items)".to_string()), "{log:?}");
    let shifted: Value = p.store().get_object(&outputs(&p).1).unwrap();
    assert_eq!(shifted["values"].as_array().unwrap().len(), 20_000);
    assert_eq!(shifted["values"][0], json!({"id": "n1", "value": 22}));
    assert_eq!(shifted["values"][10], json!({"id": "n12", "value": 33}), "the number 30 (`n11`) made no item");
    // The numbers damaged in the store: the listing, which verifies them as it reads, fails.
    let report: crate::RunReport = p.store().get_run("p").unwrap();
    let nums = report.iterations[0].stages.iter().find(|s| s.id == "nums").unwrap().output.unwrap();
    let object = p.store().object_path(&nums);
    let mut bytes = crate::store::read_object(&object).unwrap();
    let at = bytes.len() / 2;
    bytes[at] = if bytes[at] == b'1' { b'2' } else { b'1' };
    std::fs::write(&object, bytes).unwrap();
    p.write("p.toml", &pipeline(3, ""));
    let (result, _) = p.run_with(None, None);
    let failed = format!("{:?}", result.unwrap().iterations[0].stages.iter().find(|s| s.id == "elements").unwrap());
    assert!(failed.contains("is damaged in the store"), "{failed}");
}

#[test]
fn a_streamed_stage_keeps_finished_items_when_one_fails_and_writes_no_output() {
    let rows: String = (0..6000).map(|n| if n == 4500 { "13\n".to_string() } else { format!("{}\n", n + 20) }).collect();
    let p = Project::new(BOTH_WAYS, &rows);
    let (result, log) = p.run_with(None, None);
    assert!(result.is_ok_and(|r| !r.succeeded()));
    assert!(log.contains(&"0 streamed failed: item `n4501`: unlucky number".to_string()), "{log:?}");
    assert!(log.contains(&"0 held failed: item `n4501`: unlucky number".to_string()), "{log:?}");
    let objects = |p: &Project| walk(&p.path(".pipeline/objects"));
    let before = objects(&p);
    p.write("nums.txt", &rows.replace("\n13\n", "\n14\n"));
    let log = p.run();
    assert!(log.contains(&"0 streamed run (1 of 6000 items)".to_string()), "{log:?}");
    let (whole, streamed) = both_outputs(&p);
    assert_eq!(whole, streamed);
    assert_eq!(objects(&p).len(), before.len() + 2, "the new numbers and the shifted output all three stages wrote, nothing half-written");
    assert!(walk(&p.path(".pipeline/tmp")).is_empty());
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.path().is_dir() { files.extend(walk(&entry.path())) } else { files.push(entry.path()) }
    }
    files
}
