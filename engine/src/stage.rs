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
use crate::stream::{Lazy, OutputWriter, StoredInput};

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

/// See [`Stage::element_items`].
pub type ElementItems<'a> = Box<dyn FnMut(&[u8]) -> Result<Option<Item>, StageError> + 'a>;

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

    /// The items one at a time, in [`Stage::items`]' order: what the engine calls, so that a stage
    /// over a million samples never lists them all at once (it reads its input with
    /// [`StageInput::each`]). Defaults to the items of [`Stage::items_of_elements`], else `items`.
    fn each_item(&self, input: &StageInput, f: &mut dyn FnMut(Item) -> Result<(), StageError>) -> Result<(), StageError> {
        if let Some((port, key)) = self.items_of_elements() {
            let mut make = self.element_items(input)?;
            return input.each_element(port, key, |element| match make(element)? {
                Some(item) => f(item),
                None => Ok(()),
            });
        }
        for item in self.items(input)? {
            f(item)?;
        }
        Ok(())
    }

    /// For a stage whose items are made one from each element of a list in one input (at most
    /// one each, in its order: `render`'s, a sample each of the dataset's `samples`): that input's
    /// port and the list's key. The engine then remembers which items a run of elements made,
    /// under their bytes, and a rerun after a few elements changed makes items only for the
    /// chunks they are in ([`crate::store::chunks`]). An item must depend on nothing of that input
    /// but its element: its other inputs, config, files and seed are in what the engine
    /// remembers it under. Its items are made by [`Stage::element_items`].
    fn items_of_elements(&self) -> Option<(&'static str, &'static str)> {
        None
    }

    /// The item of an element (its canonical JSON), or none (an element the stage leaves out),
    /// for a stage with [`Stage::items_of_elements`]: prepared once for a listing (it may read the
    /// other inputs then).
    fn element_items<'a>(&'a self, _input: &'a StageInput) -> Result<ElementItems<'a>, StageError> {
        Err(StageError::new("this stage does not make its items from elements"))
    }

    /// Whether the output is written as it is assembled ([`Stage::write_output`]) rather than
    /// built whole ([`Stage::finish`]). Such a stage has no [`Stage::volatile_keys`].
    fn streams_output(&self) -> bool {
        false
    }

    /// Writes the output, for a stage that [`Stage::streams_output`]: `results` are the items
    /// (from [`Stage::each_item`] again) with their memoized results, in order, read from the
    /// store one at a time.
    fn write_output(&self, _input: &StageInput, _results: &mut dyn Iterator<Item = Result<(Item, Value), StageError>>, _out: &mut OutputWriter) -> Result<(), StageError> {
        Err(StageError::new("this stage does not stream its output"))
    }

    /// Whether each item's result is, as memoized, an element of the streamed output (an array of
    /// them in item order, which [`Stage::write_output`] writes with [`OutputWriter::item_values`]).
    /// The engine then writes that array from the store alone, each result's canonical bytes as
    /// they are kept: the items are not listed again, nor their results parsed. `results` is then
    /// empty.
    fn output_holds_results(&self) -> bool {
        false
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

    /// Whether the stage must have the machine to itself: no other stage of the pipeline runs
    /// while it does (it waits for those running to finish, and none starts before it ends). For
    /// a stage that measures speed, which another stage's work on the same cores would be in.
    fn runs_alone(&self) -> bool {
        false
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
    /// Upstream artifacts at hand, by port name (the engine leaves them in the store:
    /// `stored`).
    pub inputs: BTreeMap<String, Arc<Value>>,
    /// Referenced files by their path as written in the pipeline; the exact bytes that were digested.
    pub files: BTreeMap<String, Arc<[u8]>>,
    pub seed: u64,
    /// Set on Ctrl-C: long-running `finish` work may stop early and return an error.
    pub cancel: Cancel,
    /// Upstream artifacts in the store, parsed when a stage asks for one (whole, or element by
    /// element: [`Self::each`]).
    pub(crate) stored: BTreeMap<String, StoredInput>,
    /// Large referenced files, read when a stage asks (not held for the whole run).
    pub(crate) large_files: BTreeMap<String, Lazy>,
    /// Where [`Self::kept`] records are (none in a stage's own tests).
    pub(crate) store: Option<crate::Store>,
}

impl StageInput {
    /// Inputs and files at hand (a stage's own tests).
    pub fn new(inputs: BTreeMap<String, Arc<Value>>, files: BTreeMap<String, Arc<[u8]>>, seed: u64) -> StageInput {
        StageInput { inputs, files, seed, cancel: Cancel::default(), stored: BTreeMap::new(), large_files: BTreeMap::new(), store: None }
    }

    /// The same input, keeping records ([`Self::kept`]) in `store`: for a stage's own tests (a
    /// run gives every stage the pipeline's store).
    pub fn with_store(mut self, store: crate::Store) -> StageInput {
        self.store = Some(store);
        self
    }

    /// Whether an artifact is bound to `port`.
    pub fn has(&self, port: &str) -> bool {
        self.inputs.contains_key(port) || self.stored.contains_key(port)
    }

    /// The ports bound, in order.
    pub fn ports(&self) -> Vec<&str> {
        let mut ports: Vec<&str> = self.inputs.keys().chain(self.stored.keys()).map(String::as_str).collect();
        ports.sort_unstable();
        ports
    }

    pub fn input(&self, port: &str) -> Result<&Value, StageError> {
        if let Some(v) = self.inputs.get(port) {
            return Ok(v);
        }
        self.stored.get(port).ok_or_else(|| StageError::new(format!("missing input `{port}`")))?.value(port)
    }

    /// The artifact at `port`, read as the type the stage declares for it.
    pub fn read<T: DeserializeOwned>(&self, port: &str) -> Result<T, StageError> {
        T::deserialize(self.input(port)?).map_err(|e| StageError::new(format!("input `{port}` is not what this stage reads: {e}")))
    }

    /// Like [`Self::read`], for an optional port: `None` when nothing is bound to it.
    pub fn read_optional<T: DeserializeOwned>(&self, port: &str) -> Result<Option<T>, StageError> {
        if self.has(port) { self.read(port).map(Some) } else { Ok(None) }
    }

    /// Visits the elements of the list at `key` in the artifact at `port`, one at a time, without
    /// holding the artifact (a million samples are read in the memory of one). `f` stops the
    /// visit by returning an error, which is returned.
    pub fn each<T: DeserializeOwned>(&self, port: &str, key: &str, mut f: impl FnMut(T) -> Result<(), StageError>) -> Result<(), StageError> {
        if let Some(v) = self.inputs.get(port) {
            return crate::stream::each_in_value(v, port, key, &mut f);
        }
        self.stored.get(port).ok_or_else(|| StageError::new(format!("missing input `{port}`")))?.each(port, key, &mut f)
    }

    /// As [`Self::each`], each element given as its canonical JSON, unparsed.
    pub fn each_element(&self, port: &str, key: &str, mut f: impl FnMut(&[u8]) -> Result<(), StageError>) -> Result<(), StageError> {
        if let Some(v) = self.inputs.get(port) {
            return crate::stream::each_element_in_value(v, port, key, &mut f);
        }
        self.stored.get(port).ok_or_else(|| StageError::new(format!("missing input `{port}`")))?.each_element(port, key, &mut f)
    }

    /// As [`Self::each_element`], the artifact verified as it is read ([`StoredInput::scan_elements`]):
    /// for the engine's listing, which a damaged artifact fails at its end.
    pub(crate) fn scan_elements(&self, port: &str, key: &str, mut f: impl FnMut(&[u8]) -> Result<(), StageError>) -> Result<(), StageError> {
        if let Some(v) = self.inputs.get(port) {
            return crate::stream::each_element_in_value(v, port, key, &mut f);
        }
        self.stored.get(port).ok_or_else(|| StageError::new(format!("missing input `{port}`")))?.scan_elements(port, key, &mut f)
    }

    /// Whether the artifact at `port` is read from the store (as a run reads every input).
    pub(crate) fn is_stored(&self, port: &str) -> bool {
        self.stored.contains_key(port)
    }

    /// Writes the artifact at `port` to `out` as JSON, straight from the store when it is there
    /// (checked against its digest as it is copied; a damaged one never reaches `out` whole): a
    /// program gets a million samples without them being parsed here.
    pub fn write_json(&self, port: &str, out: &mut dyn std::io::Write) -> Result<(), StageError> {
        let failed = |e: std::io::Error| StageError::new(format!("writing input `{port}`: {e}"));
        if let Some(v) = self.inputs.get(port) {
            return serde_json::to_writer(out, &**v).map_err(|e| failed(e.into()));
        }
        self.stored.get(port).ok_or_else(|| StageError::new(format!("missing input `{port}`")))?.copy_to(port, out)
    }

    /// A declared file read from its start without holding it; once read to its end, a large
    /// file is checked against the digest its run started with (the read that reaches the end
    /// fails if the file changed since).
    pub fn file_reader(&self, file: &FileRef) -> Result<Box<dyn std::io::Read + Send + '_>, StageError> {
        if let Some(bytes) = self.files.get(&file.path) {
            return Ok(Box::new(&bytes[..]));
        }
        self.large_files.get(&file.path).ok_or_else(|| StageError::new(format!("file `{}` was not declared", file.path)))?.reader()
    }

    /// The digest of a declared file's bytes, as the run read them when it started (what a
    /// large one's [`Self::file_reader`] verifies); `None` if it was not declared.
    pub fn file_digest(&self, file: &FileRef) -> Option<crate::Digest> {
        match self.files.get(&file.path) {
            Some(bytes) => Some(crate::Digest::of_bytes(bytes)),
            None => self.large_files.get(&file.path).map(|lazy| lazy.digest),
        }
    }

    /// `len` bytes of a declared file from `offset`, read where they are, not verified: for a
    /// stage that knows what they must be (a digest of its own of that part, taken from bytes
    /// that were) and checks them itself.
    pub fn file_range(&self, file: &FileRef, offset: u64, len: usize) -> Result<Vec<u8>, StageError> {
        let short = || StageError::new(format!("file `{}` is shorter than when the pipeline started; run it again", file.path));
        if let Some(bytes) = self.files.get(&file.path) {
            let start = usize::try_from(offset).map_err(|_| short())?;
            return bytes.get(start..start.checked_add(len).ok_or_else(short)?).map(<[u8]>::to_vec).ok_or_else(short);
        }
        let lazy = self.large_files.get(&file.path).ok_or_else(|| StageError::new(format!("file `{}` was not declared", file.path)))?;
        let unreadable = |e: std::io::Error| StageError::new(format!("cannot read {}: {e}", lazy.what));
        let mut bytes = vec![0; len];
        let opened = std::fs::File::open(&lazy.path).map_err(unreadable)?;
        std::os::unix::fs::FileExt::read_exact_at(&opened, &mut bytes, offset).map_err(|e| if e.kind() == std::io::ErrorKind::UnexpectedEof { short() } else { unreadable(e) })?;
        Ok(bytes)
    }

    pub fn file(&self, file: &FileRef) -> Result<&[u8], StageError> {
        if let Some(bytes) = self.files.get(&file.path) {
            return Ok(bytes);
        }
        self.large_files.get(&file.path).ok_or_else(|| StageError::new(format!("file `{}` was not declared", file.path)))?.bytes()
    }

    /// Records this stage keeps in the store between runs: what it derived from part of an input
    /// (a thousand lines of a file, parsed), read back by a later run instead of derived again.
    /// Reads see what was kept before this call.
    pub fn kept(&self) -> Kept<'_> {
        Kept { store: self.store.as_ref().map(|store| (store, store.item_reader())) }
    }
}

/// See [`StageInput::kept`]. The key is the stage's to make, from everything the records depend
/// on (the bytes they were derived from, the settings and the code that derived them: the engine
/// cannot know these). Kept records are verified when read; a stage reads them back only to skip
/// work, so one that is missing or damaged costs that work, never a result.
pub struct Kept<'a> {
    store: Option<(&'a crate::Store, crate::store::ItemReader<'a>)>,
}

impl Kept<'_> {
    /// The records kept under `key`, as they were kept; `None` when none are (never kept,
    /// damaged, or no store).
    pub fn get(&self, key: &crate::Digest) -> Option<Vec<Vec<u8>>> {
        self.store.as_ref()?.1.get_kept(key)
    }

    /// Keeps `records` under `key` (committed when this returns). A failure (a full disk) is
    /// logged and otherwise ignored: it costs a later run the work.
    pub fn put(&self, key: &crate::Digest, records: &[Vec<u8>]) {
        if let Some((store, _)) = &self.store
            && let Err(e) = store.put_kept(key, records)
        {
            tracing::debug!("could not keep records under {}: {e}", key.short());
        }
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

    /// Declare a file (as [`Self::file`]) and check its whole contents with `check`, whose outcome
    /// must depend only on the file's bytes and on `on` (the settings it reads, and what names the
    /// check: its kind). A check that passed is remembered on this machine (the cache's
    /// `checks/`, keyed by the bytes' BLAKE3, `on` and this build of the program), so that
    /// validating an unchanged file of a million lines again costs hashing it, not parsing it.
    /// A failed check is not remembered: its problems are found and shown every time.
    pub fn checked<T: Serialize + DeserializeOwned>(
        &mut self,
        file: &FileRef,
        on: &impl Serialize,
        check: impl FnOnce(&Path, &[u8]) -> Result<T, Vec<Diagnostic>>,
    ) -> Result<T, Vec<Diagnostic>> {
        self.checked_bytes(file, on, check).map(|(found, _)| found)
    }

    /// As [`Self::checked`], with the digest of the bytes `check` was given, when it ran on
    /// bytes that are the file's (not when the file changed while it was read): what `check`
    /// noted of their parts meanwhile is known to be of the file with that digest.
    pub fn checked_bytes<T: Serialize + DeserializeOwned>(
        &mut self,
        file: &FileRef,
        on: &impl Serialize,
        check: impl FnOnce(&Path, &[u8]) -> Result<T, Vec<Diagnostic>>,
    ) -> Result<(T, Option<crate::Digest>), Vec<Diagnostic>> {
        let path = self.file(file).map_err(|d| vec![d])?;
        let unreadable = |e: std::io::Error| vec![self.error_at(file.span.clone(), format!("cannot read `{}`: {e}", self.display_path(file).display()), "this file")];
        // Hashed as it is read: a remembered check of a large file never holds it.
        let digest = crate::Digest::of_file(&path).map_err(unreadable)?;
        let key = crate::Digest::of_json(&serde_json::json!({
            "build": crate::cache::build_identity(),
            "on": serde_json::to_value(on).expect("check settings serialize"),
            "file": digest.hex(),
        }));
        let remembered = crate::cache::dir("checks").join(key.hex());
        if let Some(found) = std::fs::read(&remembered).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
            return Ok((found, None));
        }
        let bytes = std::fs::read(&path).map_err(unreadable)?;
        // The bytes checked are hashed while they are, on another core.
        let (found, read) = std::thread::scope(|s| {
            let hashing = s.spawn(|| crate::Digest::of_bytes(&bytes));
            (check(&path, &bytes), hashing.join().expect("hashing does not panic"))
        });
        let found = found?;
        if read != digest {
            // Changed between the hashing and the reading: checked, but not remembered.
            return Ok((found, None));
        }
        // Only a cache: a write that fails costs the next validation a parse, nothing more.
        if let Err(e) = crate::atomic::write(&remembered, &serde_json::to_vec(&found).expect("check results serialize")) {
            tracing::debug!("could not remember a passed check in {}: {e}", remembered.display());
        }
        Ok((found, Some(digest)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passed_check_is_remembered_until_the_file_changes_and_a_failed_one_never() {
        let dir = tempfile::tempdir().unwrap();
        // The only test of this crate that reads the cache's location.
        unsafe { std::env::set_var("PIPELINE_CACHE_DIR", dir.path().join("cache")) };
        std::fs::write(dir.path().join("data.txt"), "one\ntwo\n").unwrap();
        let pipeline = SourceFile::new("p.toml", "[stages.s]\n".to_string());
        let mut cx = BuildContext { pipeline: &pipeline, base_dir: dir.path(), stage_id: "s", files: Vec::new(), stage_span: 0..0, key_spans: Vec::new() };
        let file = FileRef { path: "data.txt".into(), span: None };
        let runs = std::cell::Cell::new(0);
        let lines = |cx: &mut BuildContext, on: &str| -> Result<usize, Vec<Diagnostic>> {
            cx.checked(&file, &on, |_, bytes| {
                runs.set(runs.get() + 1);
                let text = std::str::from_utf8(bytes).unwrap();
                if text.contains("bad") { Err(vec![Diagnostic::error("a bad line")]) } else { Ok(text.lines().count()) }
            })
        };
        assert_eq!(lines(&mut cx, "count").unwrap(), 2);
        assert_eq!(lines(&mut cx, "count").unwrap(), 2);
        assert_eq!(runs.get(), 1, "the second check was remembered");
        assert_eq!(cx.files.len(), 1, "the file is declared once");
        assert_eq!(lines(&mut cx, "count again").unwrap(), 2);
        assert_eq!(runs.get(), 2, "other settings check again");
        std::fs::write(dir.path().join("data.txt"), "one\ntwo\nthree\n").unwrap();
        assert_eq!(lines(&mut cx, "count").unwrap(), 3);
        std::fs::write(dir.path().join("data.txt"), "bad\n").unwrap();
        assert!(lines(&mut cx, "count").is_err());
        assert!(lines(&mut cx, "count").is_err());
        assert_eq!(runs.get(), 5, "a failure is found again each time");
    }
}
