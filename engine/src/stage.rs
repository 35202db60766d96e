//! The stage interface plugins implement.
//!
//! A plugin is a *kind* of stage (`dataset`, `prompt`, ...). It declares its config type (serde +
//! JSON Schema), its typed input ports and its output type, and builds a runtime [`Stage`] from a
//! validated config. The engine binds a stage's `needs` to ports by artifact type, fingerprints
//! the config, digests the files the stage referenced while building, and memoizes per item.
//!
//! Work is split in two: [`Stage::items`] lists independent items (e.g. sample × model × prompt),
//! each with a JSON input that fully determines its result; [`Stage::run_item`] computes one item
//! and is memoized on (stage fingerprint without upstream digests, item input). [`Stage::finish`]
//! assembles the stage's output artifact from the inputs and the item results. A stage with no
//! per-item work returns no items and does everything in `finish`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::diag::{Diagnostic, SourceFile};

/// Named things a stage runs (a model id), each with its pinned facts (`weights_sha256`: `…`).
pub type Pins = BTreeMap<String, BTreeMap<String, String>>;

/// Port type accepting any artifact, any number of times; each is named by its upstream stage id.
pub const ANY: &str = "*";

/// What the engine reads from a stage's output, and nothing else: `metrics`, named numbers that
/// `[targets]` checks, among them [`Reported::IMPROVED`], the progress `[iterate] patience`
/// watches on the feedback stage. Everything else in an artifact is between the stages.
#[derive(Debug, Default, Deserialize)]
pub struct Reported {
    #[serde(default)]
    metrics: BTreeMap<String, Value>,
}

impl Reported {
    /// `metrics.improved`: 0 when the feedback stage made no progress this iteration.
    pub const IMPROVED: &'static str = "improved";

    /// The contract part of an output (none when it has no `metrics` object).
    pub fn of(output: &Value) -> Reported {
        Reported::deserialize(output).unwrap_or_default()
    }

    /// The metrics that are numbers (a metric without a value, such as an interval not
    /// computed, is left out).
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        self.metrics.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect()
    }

    pub fn improved(&self) -> Option<f64> {
        self.metrics.get(Self::IMPROVED).and_then(Value::as_f64)
    }
}

/// A named, typed input of a stage kind. `needs` entries are bound to ports by artifact type.
#[derive(Debug, Clone, Copy)]
pub struct Port {
    pub name: &'static str,
    /// Artifact type accepted, e.g. `dataset`.
    pub ty: &'static str,
    /// The stage works without it (e.g. `infer` takes its models from a `license_filter` stage
    /// when one is in `needs`, else from its config).
    pub optional: bool,
}

impl Port {
    pub const fn new(name: &'static str, ty: &'static str) -> Port {
        Port { name, ty, optional: false }
    }

    pub const fn optional(name: &'static str, ty: &'static str) -> Port {
        Port { name, ty, optional: true }
    }
}

/// A kind of stage, implemented by a plugin crate and registered by the binary.
pub trait StagePlugin: Send + Sync + 'static {
    /// The fields of `[stages.<id>]` besides `kind` and `needs`.
    type Config: DeserializeOwned + Serialize + JsonSchema;
    const KIND: &'static str;
    /// Bump when the same config and inputs would now give a different output.
    const VERSION: u32;
    /// One line for `--help` and error messages.
    const SUMMARY: &'static str;
    const INPUTS: &'static [Port];
    /// Artifact type produced.
    const OUTPUT: &'static str;

    /// Validate and build. Report every problem found, located (see [`BuildContext`]).
    fn build(config: Self::Config, cx: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>>;
}

/// A runtime stage.
#[async_trait::async_trait]
pub trait Stage: Send + Sync {
    /// The independent items of work for these inputs. Must be deterministic and cheap.
    fn items(&self, _input: &StageInput) -> Result<Vec<Item>, StageError> {
        Ok(Vec::new())
    }

    /// Compute one item. Its result must depend only on `item.input`, the referenced files and the
    /// seed: it is memoized on exactly those (not on the stage config — put the settings an item
    /// depends on into its input).
    async fn run_item(&self, item: &Item, _cx: &ItemContext) -> Result<Value, StageError> {
        Err(StageError::new(format!("stage has no per-item work (item `{}`)", item.id)))
    }

    /// What `plan` should tell about how this stage computes, beyond what runs and why (e.g. that
    /// repeats of a greedy answer are computed once). Whatever its state.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }

    /// How many items may run at once. Defaults to one at a time.
    fn item_concurrency(&self) -> usize {
        1
    }

    /// What the stage resolved while building that its results depend on but its config does not
    /// spell out (e.g. the weights digest of each model named in the config, from a catalog). It is
    /// fingerprinted with the config, so a change to it reruns the stage.
    fn resolved(&self) -> Option<Value> {
        None
    }

    /// What the stage runs, named for whoever reads the lockfile: per model (or other pinned
    /// thing) by name, its weights' digests, prepared form, engine — as strings. The fingerprint
    /// already covers all of it (through the config and [`Stage::resolved`]); the lockfile lists
    /// it so that a changed model shows in a diff, not only a changed digest.
    fn pins(&self) -> Pins {
        Pins::new()
    }

    /// What the lockfile should name that only the stage's output knows (a trained model's
    /// weights and training data): added to [`Stage::pins`]. The output is already pinned by its
    /// digest; this makes a changed model show in a diff. `output` reads the output back from the
    /// store: only a stage that needs it pays for parsing it (a no-op rerun writes the lockfile).
    fn output_pins(&self, _output: &dyn Fn() -> Option<Value>) -> Pins {
        Pins::new()
    }

    /// What this stage knows at build time about the output it will produce, for the stages that
    /// read it to check themselves at `validate` (a dataset's field names, a template's variables).
    /// Null: nothing. Never stored: facts are not part of any key.
    fn facts(&self) -> Value {
        Value::Null
    }

    /// Problems this stage has with what its inputs will hold, from their [`Stage::facts`] by port
    /// name (Null where the upstream stage knows none; an optional port nothing feeds is absent),
    /// found at `validate`.
    fn check_inputs(&self, _pipeline: &SourceFile, _facts: &BTreeMap<String, Value>) -> Vec<Diagnostic> {
        Vec::new()
    }

    /// The names under `metrics` in this stage's output, as far as its config tells at build time:
    /// `[targets]` naming another is an error at `validate`. `None`: the stage cannot tell (a user
    /// command may write any). Stages that report no metrics keep the default.
    fn metrics(&self) -> Option<&'static [&'static str]> {
        Some(&[])
    }

    /// Object keys of the output that hold measurements (latency, throughput): they differ from
    /// run to run, so the lockfile pins the output without them, at any depth.
    fn volatile_keys(&self) -> &'static [&'static str] {
        &[]
    }

    /// Assemble the output artifact. `results` are in `items` order.
    fn finish(&self, input: &StageInput, results: Vec<(Item, Value)>) -> Result<Value, StageError>;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// Human-readable identity (e.g. a sample id), unique within the stage.
    pub id: String,
    /// Everything the item's result depends on (besides referenced files and the seed).
    pub input: Value,
}

pub struct ItemContext {
    pub seed: u64,
    /// Set on Ctrl-C: long items may stop early (their result is then discarded).
    pub cancel: Cancel,
    /// How far a long item has got (steps of a training run), shown as it goes.
    pub progress: ItemProgress,
}

/// Reports the progress of one running item to the run's observers ([`Event::ItemProgress`]);
/// the default reports to nobody.
#[derive(Clone, Default)]
pub struct ItemProgress(pub(crate) Option<(Arc<dyn crate::Observer>, u32, String, String)>);

impl ItemProgress {
    /// `done` of `total` steps; `message` says what the last one was (e.g. its loss).
    pub fn report(&self, done: u64, total: u64, message: impl Into<String>) {
        if let Some((observer, iteration, stage, item)) = &self.0 {
            observer.event(&crate::Event::ItemProgress { iteration: *iteration, stage: stage.clone(), item: item.clone(), done, total, message: message.into() });
        }
    }
}

/// The run's interrupt flag, for work that can stop early.
#[derive(Clone, Default)]
pub struct Cancel(pub(crate) Arc<std::sync::atomic::AtomicBool>);

impl Cancel {
    pub fn is_set(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// What a stage sees when it runs.
pub struct StageInput {
    /// Upstream artifacts by port name.
    pub inputs: BTreeMap<String, Arc<Value>>,
    /// Referenced files by their path as written in the pipeline; the exact bytes that were digested.
    pub files: BTreeMap<String, Arc<[u8]>>,
    pub seed: u64,
    /// Set on Ctrl-C: long-running `finish` work may stop early and return an error.
    pub cancel: Cancel,
}

impl StageInput {
    pub fn input(&self, port: &str) -> Result<&Value, StageError> {
        self.inputs.get(port).map(|v| &**v).ok_or_else(|| StageError::new(format!("missing input `{port}`")))
    }

    /// The artifact at `port`, read as the type the stage declares for it.
    pub fn read<T: DeserializeOwned>(&self, port: &str) -> Result<T, StageError> {
        T::deserialize(self.input(port)?).map_err(|e| StageError::new(format!("input `{port}` is not what this stage reads: {e}")))
    }

    /// Like [`Self::read`], for an optional port: `None` when nothing is bound to it.
    pub fn read_optional<T: DeserializeOwned>(&self, port: &str) -> Result<Option<T>, StageError> {
        if self.inputs.contains_key(port) { self.read(port).map(Some) } else { Ok(None) }
    }

    pub fn file(&self, file: &FileRef) -> Result<&[u8], StageError> {
        self.files.get(&file.path).map(|b| &**b).ok_or_else(|| StageError::new(format!("file `{}` was not declared", file.path)))
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct StageError {
    pub message: String,
}

impl StageError {
    pub fn new(message: impl Into<String>) -> Self {
        StageError { message: message.into() }
    }
}

/// A path to a file, as written in the pipeline (relative to the pipeline file), with its location
/// in the pipeline file for diagnostics. Serializes as the path string: absolute paths never enter
/// fingerprints unless the user wrote one.
#[derive(Debug, Clone)]
pub struct FileRef {
    pub path: String,
    pub span: Option<Range<usize>>,
}

impl<'de> Deserialize<'de> for FileRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = toml::Spanned::<String>::deserialize(d)?;
        let span = spanned.span();
        Ok(FileRef { path: spanned.into_inner(), span: Some(span) })
    }
}

impl Serialize for FileRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.path)
    }
}

impl JsonSchema for FileRef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "FileRef".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "Path to a file, relative to the pipeline file. Its contents are digested into the fingerprint."
        })
    }
}

/// Handed to [`StagePlugin::build`]: resolves and records referenced files.
pub struct BuildContext<'a> {
    pub pipeline: &'a SourceFile,
    pub base_dir: &'a Path,
    pub stage_id: &'a str,
    pub(crate) files: Vec<(FileRef, PathBuf)>,
    /// Where the stage's id is written (its table header), and each of its keys' values.
    pub(crate) stage_span: Range<usize>,
    pub(crate) key_spans: Vec<(String, Range<usize>)>,
}

impl BuildContext<'_> {
    /// Declare a file the stage reads: checked to exist now, digested into the fingerprint, and
    /// its bytes handed to the stage at run time. Returns its resolved path.
    pub fn file(&mut self, file: &FileRef) -> Result<PathBuf, Diagnostic> {
        let resolved = self.base_dir.join(&file.path);
        if !resolved.is_file() {
            let what = if resolved.exists() { "is not a file" } else { "does not exist" };
            let mut d = Diagnostic::error(format!("stage `{}`: file `{}` {what}", self.stage_id, file.path))
                .help(format!("paths are relative to the pipeline file; this one resolves to {}", self.display_path(file).display()));
            if let Some(span) = &file.span {
                d = d.at(self.pipeline, span.clone(), what);
            }
            return Err(d);
        }
        if !self.files.iter().any(|(f, _)| f.path == file.path) {
            self.files.push((file.clone(), resolved.clone()));
        }
        Ok(resolved)
    }

    /// How to show a referenced file's path to the user (relative to where they are).
    pub fn display_path(&self, file: &FileRef) -> PathBuf {
        if self.base_dir == Path::new(".") { PathBuf::from(&file.path) } else { self.base_dir.join(&file.path) }
    }

    /// Where the stage's table header is written.
    pub fn stage_span(&self) -> Range<usize> {
        self.stage_span.clone()
    }

    /// Where the value of the stage's key `name` is written, if it is.
    pub fn key(&self, name: &str) -> Option<Range<usize>> {
        self.key_spans.iter().find(|(k, _)| k == name).map(|(_, span)| span.clone())
    }

    /// A diagnostic located at a config field (see [`Self::key`]); without one, at the stage.
    pub fn error_at(&self, span: Option<Range<usize>>, message: impl Into<String>, label: impl Into<String>) -> Diagnostic {
        let d = Diagnostic::error(format!("stage `{}`: {}", self.stage_id, message.into()));
        match span {
            Some(span) => d.at(self.pipeline, span, label),
            None => d.at(self.pipeline, self.stage_span.clone(), "in this stage"),
        }
    }
}
