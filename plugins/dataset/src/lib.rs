//! `dataset`: a golden set — JSON lines, CSV / TSV with a header row, or a table in a Parquet or
//! Arrow IPC file (as the Hugging Face hub and `datasets`' `save_to_disk` write them) — checked
//! line by line (row by row), split into dev / held-out.
//!
//! The split is deterministic and stratified: within each label (or over all samples when there
//! is no label field), samples are ordered by BLAKE3(seed, id) and the first `heldout` fraction is
//! held out. Ordering by a hash of the id, not by file position, keeps most samples in their split
//! when rows are added or reordered.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use artifacts::facts::DatasetFacts;
use artifacts::{Artifact, Split, SplitCounts};
use engine::diag::{Diagnostic, SourceFile};
use engine::stream::OutputWriter;
use engine::{BuildContext, FileRef, Item, Port, Stage, StageError, StageInput, StagePlugin};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub struct Dataset;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// The samples, relative to the pipeline file: JSON lines (one object per line), CSV / TSV
    /// with a header row naming each column (every value is text), or a Parquet or Arrow IPC file
    /// (one sample per row, columns as typed values: a struct column is an object).
    pub path: FileRef,
    /// How the file is written: `jsonl`, `csv`, `tsv`, `parquet` or `arrow` (Arrow IPC, stream or
    /// file: a `datasets` `save_to_disk` shard). Default: by its extension (`.csv`, `.tsv`,
    /// `.parquet`, `.arrow`; anything else is JSON lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    /// Field holding each sample's unique id.
    #[serde(default = "default_id")]
    pub id: String,
    /// Field holding the reference label (or reference answer); stratifies the split when set,
    /// unless `stratify` names another field.
    pub label: Option<String>,
    /// Field whose values stratify the split, when the reference is free text (a reference answer
    /// is unique per sample, which makes every stratum a single sample).
    pub stratify: Option<String>,
    /// Fraction of samples held out for the final quality figure (0 to 1).
    #[serde(default = "default_heldout")]
    pub heldout: Fraction,
}

/// A number in [0, 1], checked while deserializing so the error points at the value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, JsonSchema)]
#[serde(transparent)]
pub struct Fraction(#[schemars(range(min = 0.0, max = 1.0))] pub f64);

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let x = f64::deserialize(d)?;
        if (0.0..=1.0).contains(&x) {
            Ok(Fraction(x))
        } else {
            Err(serde::de::Error::custom(format!("must be a fraction between 0 and 1, not {x}")))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jsonl,
    Csv,
    Tsv,
    Parquet,
    Arrow,
}

impl Format {
    /// A table of typed columns (a binary file), not text: problems are located by row.
    fn is_table(self) -> bool {
        matches!(self, Format::Parquet | Format::Arrow)
    }
}

impl DatasetConfig {
    /// The format written, else the one the file's extension names.
    pub fn format(&self) -> Format {
        self.format.unwrap_or_else(|| {
            let lower = self.path.path.to_ascii_lowercase();
            if lower.ends_with(".csv") {
                Format::Csv
            } else if lower.ends_with(".tsv") || lower.ends_with(".tab") {
                Format::Tsv
            } else if lower.ends_with(".parquet") {
                Format::Parquet
            } else if lower.ends_with(".arrow") || lower.ends_with(".feather") || lower.ends_with(".ipc") {
                Format::Arrow
            } else {
                Format::Jsonl
            }
        })
    }
}

fn default_id() -> String {
    "id".into()
}

fn default_heldout() -> Fraction {
    Fraction(0.3)
}

impl StagePlugin for Dataset {
    type Config = DatasetConfig;
    const KIND: &'static str = "dataset";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "a golden set (JSON lines, CSV, TSV, Parquet, Arrow), validated and split into dev / held-out by seed";
    const INPUTS: &'static [Port] = &[];
    const OUTPUT: &'static str = artifacts::Dataset::TYPE;

    fn build(config: DatasetConfig, cx: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        if config.heldout.0 >= 1.0 {
            return Err(vec![cx.error_at(
                cx.key("heldout"),
                format!("`heldout = {:?}` leaves no dev split: failure modes and prompt revisions learn from dev samples only", config.heldout.0),
                "no dev samples",
            )
            .help("use a fraction below 1; with 0 every sample is dev, and the judge reports on dev")]);
        }
        // Every line (row) is checked now, so that `pipeline validate` reports them all with their
        // locations; a file that passed is not parsed again until it changes.
        let display = cx.display_path(&config.path);
        let on = serde_json::json!({"kind": Dataset::KIND, "config": &config, "display": display});
        let facts = cx.checked(&config.path.clone(), &on, |path, bytes| {
            if config.format().is_table() {
                let display = display.display().to_string();
                let samples = table_samples(&bytes, &config).map_err(|errors| errors.into_iter().map(|e| e.at_row(&display)).collect::<Vec<_>>())?;
                let fields = samples.iter().flat_map(|s| s.fields.keys().cloned()).collect();
                let labels_not_json = samples.iter().filter(|s| s.label.as_deref().is_some_and(|l| serde_json::from_str::<Value>(l).is_err())).count();
                return Ok(DatasetFacts { fields, labels_not_json, labels_not_json_first: Vec::new() });
            }
            let file = SourceFile::from_bytes(path, bytes, "dataset").map_err(|d| vec![d])?;
            let file = SourceFile::new(display.clone(), file.text);
            // Sample by sample, no sample held (the text is: diagnostics point into it): the
            // fields seen, the references that are not JSON.
            let mut facts = DatasetFacts { fields: Default::default(), labels_not_json: 0, labels_not_json_first: Vec::new() };
            let mut keep = |sample: Sample, _| {
                for field in sample.fields.keys() {
                    if !facts.fields.contains(field) {
                        facts.fields.insert(field.clone());
                    }
                }
                if let Some(e) = label_not_json(&sample) {
                    facts.labels_not_json += 1;
                    if facts.labels_not_json_first.len() < 5 {
                        facts.labels_not_json_first.push(located(&file, &sample, e));
                    }
                }
            };
            let errors = match config.format() {
                Format::Jsonl => check_each(jsonl_records(&file.text), &config, "line", Some(&file.text), &mut keep),
                Format::Csv => delimited_records(&file.text, b',').map_or_else(|e| e, |r| check_each(r, &config, "line", Some(&file.text), &mut keep)),
                Format::Tsv => delimited_records(&file.text, b'\t').map_or_else(|e| e, |r| check_each(r, &config, "line", Some(&file.text), &mut keep)),
                Format::Parquet | Format::Arrow => unreachable!("tables are checked above"),
            };
            if !errors.is_empty() {
                return Err(errors.into_iter().map(|e| e.diagnostic(&file)).collect());
            }
            Ok(facts)
        })?;
        Ok(Arc::new(DatasetStage { config, facts }))
    }
}

/// Read a JSONL golden set as the stage does: the dataset artifact (samples split into dev and
/// held-out by `seed`), or every bad line as a located diagnostic. The fuzz target
/// `dataset_reader` drives this.
pub fn read(file: &SourceFile, config: &DatasetConfig, seed: u64) -> Result<artifacts::Dataset, Vec<Diagnostic>> {
    let samples = parse_samples(file, config).map_err(|errors| errors.into_iter().map(|e| e.diagnostic(file)).collect::<Vec<_>>())?;
    Ok(split(samples, config, seed))
}

struct DatasetStage {
    config: DatasetConfig,
    /// Every field name some sample has, and the references that do not parse as JSON (how
    /// many, the first few): found at build time.
    facts: DatasetFacts,
}

/// Why a sample's located reference (label) is not JSON, for a judge that reads it as JSON.
fn label_not_json(s: &Sample) -> Option<serde_json::Error> {
    let (Some(label), Some(_)) = (&s.label, s.label_at) else { return None };
    serde_json::from_str::<Value>(label).err()
}

/// That reference, located in the file (a scan of the text before it: for the first few only).
fn located(file: &SourceFile, s: &Sample, e: serde_json::Error) -> artifacts::facts::NotJson {
    let (line, column) = file.line_col(s.label_at.unwrap_or(0));
    let label = s.label.as_deref().unwrap_or_default();
    let message = format!("the reference {} is not JSON ({e})", serde_json::to_string(label).expect("a string serializes"));
    artifacts::facts::NotJson { file: file.path.display().to_string(), line, column, id: s.id.clone(), message }
}

impl Stage for DatasetStage {
    /// `{"fields": [...]}`: the field names some sample has, for templates and stages that name
    /// fields to be checked against at `validate`.
    fn facts(&self) -> Value {
        serde_json::to_value(&self.facts).expect("facts serialize")
    }

    fn streams_output(&self) -> bool {
        true
    }

    /// JSON lines are read twice as they come, never held: once to check every line and order
    /// each stratum (a million samples cost their line numbers, strata and orders, and the ids
    /// seen), once more to write each sample.
    fn write_output(&self, input: &StageInput, _: &mut dyn Iterator<Item = Result<(Item, Value), StageError>>, out: &mut OutputWriter) -> Result<(), StageError> {
        if self.config.format() != Format::Jsonl {
            let dataset = self.whole(input.file(&self.config.path)?, input.seed)?;
            out.field("counts", &dataset.counts)?;
            out.field("label_field", &dataset.label_field)?;
            return out.elements("samples", dataset.samples.into_iter().map(Ok));
        }
        let unreadable = |e: std::io::Error| StageError::new(format!("{}: {e}", self.config.path.path));
        let lines = |only: Option<Vec<String>>| -> Result<_, StageError> { Ok(jsonl_lines(std::io::BufReader::with_capacity(1 << 16, input.file_reader(&self.config.path)?), only)) };
        // The first pass needs each sample's id and stratum: its other fields are read past.
        let needed = [Some(&self.config.id), self.config.label.as_ref(), self.config.stratify.as_ref()].into_iter().flatten().cloned().collect();
        // Each sample's line, stratum and place in its stratum's order.
        let mut kept: Vec<(usize, u32, [u8; 32])> = Vec::new();
        let mut strata: HashMap<Option<String>, u32> = HashMap::new();
        let mut failed = None;
        let records = lines(Some(needed))?.map_while(|r| r.map_err(|e| failed = Some(e)).ok());
        let errors = check_each(records, &self.config, "line", None, &mut |s, line| {
            let next = strata.len() as u32;
            let stratum = *strata.entry(stratum_of(&s, &self.config)).or_insert(next);
            kept.push((line, stratum, split_order(input.seed, &s.id)));
        });
        if let Some(e) = failed {
            return Err(unreadable(e));
        }
        if let Some(first) = errors.first() {
            // Located as a whole read locates them (rare: `validate` checked the file).
            self.whole(input.file(&self.config.path)?, input.seed)?;
            return Err(StageError::new(format!("{}: {} ({} problem(s) in all)", self.config.path.path, first.message, errors.len())));
        }
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); strata.len()];
        for (i, (_, stratum, _)) in kept.iter().enumerate() {
            members[*stratum as usize].push(i as u32);
        }
        let mut heldout = vec![false; kept.len()];
        for stratum in &mut members {
            stratum.sort_unstable_by_key(|&i| kept[i as usize].2);
            let take = (stratum.len() as f64 * self.config.heldout.0).round() as usize;
            for &i in stratum.iter().take(take) {
                heldout[i as usize] = true;
            }
        }
        drop(members);
        let n_heldout = heldout.iter().filter(|h| **h).count();
        out.field("counts", &SplitCounts { dev: kept.len() - n_heldout, heldout: n_heldout })?;
        out.field("label_field", &self.config.label)?;
        let mut records = lines(None)?;
        let mut next = 0;
        let mut seen = Seen::default();
        let samples = std::iter::from_fn(|| {
            let &(line, _, _) = kept.get(next)?;
            let h = heldout[next];
            next += 1;
            loop {
                match records.next() {
                    None => return Some(Err(StageError::new(format!("{}: ended before line {line}", self.config.path.path)))),
                    Some(Err(e)) => return Some(Err(unreadable(e))),
                    Some(Ok(record)) if record.line == line => {
                        // Checked above: the same line gives the same sample.
                        seen.clear();
                        let s = sample_of(line, record.whole, record.fields, &self.config, None, "line", &mut seen);
                        return Some(s.map_err(|e| StageError::new(e.message)).map(|s| artifacts::Sample { id: s.id, split: if h { Split::Heldout } else { Split::Dev }, label: s.label, fields: s.fields }));
                    }
                    Some(Ok(_)) => continue,
                }
            }
        });
        out.elements("samples", samples)?;
        // Read to the end: the file is checked against its digest there.
        for record in records {
            record.map_err(unreadable)?;
        }
        Ok(())
    }

    fn finish(&self, input: &StageInput, _: Vec<(Item, Value)>) -> Result<Value, StageError> {
        Ok(self.whole(input.file(&self.config.path)?, input.seed)?.to_json())
    }
}

impl DatasetStage {
    /// The dataset built whole (a table's rows are read at once).
    fn whole(&self, bytes: &[u8], seed: u64) -> Result<artifacts::Dataset, StageError> {
        if self.config.format().is_table() {
            let samples = table_samples(bytes, &self.config).map_err(|errors| {
                StageError::new(format!("{}: {} ({} problem(s) in all)", self.config.path.path, errors[0].message, errors.len()))
            })?;
            return Ok(split(samples, &self.config, seed));
        }
        let file = SourceFile::new(&self.config.path.path, String::from_utf8_lossy(bytes).into_owned());
        let samples = parse_samples(&file, &self.config).map_err(|errors| {
            let first = &errors[0];
            let (line, col) = file.line_col(first.span.start);
            StageError::new(format!("{}:{line}:{col}: {} ({} problem(s) in all)", self.config.path.path, first.message, errors.len()))
        })?;
        Ok(split(samples, &self.config, seed))
    }
}

/// The stratum a sample is split within: its `stratify` field's value, else its label.
fn stratum_of(s: &Sample, config: &DatasetConfig) -> Option<String> {
    match &config.stratify {
        Some(field) => s.fields.get(field).map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string)),
        None => s.label.clone(),
    }
}

/// A sample's place in its stratum's order: BLAKE3(seed, id).
fn split_order(seed: u64, id: &str) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(id.as_bytes());
    *h.finalize().as_bytes()
}

struct Sample {
    id: String,
    label: Option<String>,
    /// Where the label's value starts in the file (as far as the line's text shows it).
    label_at: Option<usize>,
    fields: Map<String, Value>,
}

struct LineError {
    span: std::ops::Range<usize>,
    message: String,
}

impl LineError {
    fn diagnostic(&self, file: &SourceFile) -> Diagnostic {
        Diagnostic::error(format!("bad sample: {}", self.message)).at(file, self.span.clone(), "here")
    }

    /// A problem of a table's row: no text to point into, so the file and row are in the message.
    fn at_row(&self, file: &str) -> Diagnostic {
        Diagnostic::error(format!("bad sample in `{file}`: {}", self.message))
    }
}

/// One sample as the file has it: its 1-based line, its span in the file, and its fields (or why
/// they could not be read).
struct Record {
    line: usize,
    whole: std::ops::Range<usize>,
    fields: Result<Map<String, Value>, LineError>,
}

/// A UTF-8 byte-order mark (as some editors and spreadsheet exports write) is not part of the
/// first sample: the text after it, and its length.
fn after_bom(text: &str) -> (&str, usize) {
    match text.strip_prefix('\u{feff}') {
        Some(rest) => (rest, '\u{feff}'.len_utf8()),
        None => (text, 0),
    }
}

/// JSON lines: each non-blank line one object.
fn jsonl_records(text: &str) -> impl Iterator<Item = Record> + '_ {
    let (text, bom) = after_bom(text);
    let mut offset = bom;
    text.split_inclusive('\n').enumerate().filter_map(move |(n, raw)| {
        let start = offset;
        offset += raw.len();
        jsonl_record(n, start, raw)
    })
}

/// JSON lines read as they come from `reader` (as [`jsonl_records`] reads a whole text), or
/// the error reading stopped at; bytes that are not UTF-8 are replaced, as in the whole text.
/// With `only`, each record holds only the fields it names ([`jsonl_record_only`]).
fn jsonl_lines(mut reader: impl std::io::BufRead, only: Option<Vec<String>>) -> impl Iterator<Item = std::io::Result<Record>> {
    let (mut n, mut offset, mut line) = (0usize, 0usize, Vec::new());
    std::iter::from_fn(move || {
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Err(e) => return Some(Err(e)),
                Ok(0) => return None,
                Ok(read) => {
                    let text = String::from_utf8_lossy(&line);
                    let (raw, bom) = if n == 0 { after_bom(&text) } else { (&text[..], 0) };
                    let record = match &only {
                        Some(only) => jsonl_record_only(n, offset + bom, raw, only).or_else(|| jsonl_record(n, offset + bom, raw)),
                        None => jsonl_record(n, offset + bom, raw),
                    };
                    n += 1;
                    offset += read;
                    if let Some(record) = record {
                        return Some(Ok(record));
                    }
                }
            }
        }
    })
}

/// Line `n` (0-based) of a JSON lines file, starting at byte `start`: its record, unless blank.
fn jsonl_record(n: usize, start: usize, raw: &str) -> Option<Record> {
    let line = raw.trim_end_matches(['\n', '\r']);
    if line.trim().is_empty() {
        return None;
    }
    let whole = start..start + line.len();
    let fields = match serde_json::from_str(line) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err(LineError { span: whole.clone(), message: format!("line {} is not a JSON object", n + 1) }),
        Err(e) => {
            let at = start + line.char_indices().nth(e.column().saturating_sub(1)).map_or(line.len(), |(i, _)| i);
            Err(LineError { span: at..at + 1, message: format!("line {} is not valid JSON: {e}", n + 1) })
        }
    };
    Some(Record { line: n + 1, whole, fields })
}

/// Line `n` as [`jsonl_record`] reads it, its fields only those named in `only`: the others are
/// read past as JSON, not built. `None` where the line is blank or not read this way (not a JSON
/// object, or not JSON): [`jsonl_record`] says what it is. Reading past a value checks less than
/// building it (a lone UTF-16 surrogate escape passes), so this is for a file already checked
/// whole (as `build` checks a dataset's file).
fn jsonl_record_only(n: usize, start: usize, raw: &str, only: &[String]) -> Option<Record> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
    /// An object's fields named in the list; the others read past.
    struct Only<'a>(&'a [String]);
    /// A field's name: where it is in the list, if it is.
    struct Name<'a>(&'a [String]);
    impl<'de> DeserializeSeed<'de> for Name<'_> {
        type Value = Option<usize>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }
    }
    impl<'de> Visitor<'de> for Name<'_> {
        type Value = Option<usize>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a field name")
        }
        fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Self::Value, E> {
            Ok(self.0.iter().position(|f| f == name))
        }
    }
    impl<'de> Visitor<'de> for Only<'_> {
        type Value = Map<String, Value>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut fields = Map::new();
            while let Some(at) = map.next_key_seed(Name(self.0))? {
                // A name given twice: the last value, as a whole read keeps.
                if let Some(at) = at {
                    fields.insert(self.0[at].clone(), map.next_value()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(fields)
        }
    }
    let line = raw.trim_end_matches(['\n', '\r']);
    if line.trim().is_empty() {
        return None;
    }
    let mut reader = serde_json::Deserializer::from_str(line);
    let fields = reader.deserialize_map(Only(only)).ok()?;
    reader.end().ok()?;
    Some(Record { line: n + 1, whole: start..start + line.len(), fields: Ok(fields) })
}

/// CSV or TSV (`delimiter`): a header row naming the columns, then one sample per row (quoted
/// values may span lines); every value is text. A row with more or fewer values than the header,
/// and a header with an empty or repeated name, are errors where they are.
fn delimited_records(text: &str, delimiter: u8) -> Result<Vec<Record>, Vec<LineError>> {
    let (body, bom) = after_bom(text);
    let mut reader = csv::ReaderBuilder::new().delimiter(delimiter).has_headers(false).flexible(true).from_reader(body.as_bytes());
    // The end of the line a record starts on, for its span.
    let line_end = |start: usize| text[start..].find(['\n', '\r']).map_or(text.len(), |i| start + i);
    let mut rows = reader.records();
    let header = match rows.next() {
        None => return Ok(Vec::new()),
        Some(Err(e)) => return Err(vec![LineError { span: bom..line_end(bom), message: format!("line 1, the header row, cannot be read: {e}") }]),
        Some(Ok(h)) => h,
    };
    let names: Vec<String> = header.iter().map(str::to_string).collect();
    let mut errors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, name) in names.iter().enumerate() {
        if name.trim().is_empty() || !seen.insert(name.as_str()) {
            let what = if name.trim().is_empty() { "is empty".to_string() } else { format!("`{name}` repeats an earlier column's") };
            errors.push(LineError { span: bom..line_end(bom), message: format!("line 1, the header row: the name of column {} {what} (each column needs its own name)", i + 1) });
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut records = Vec::new();
    for row in rows {
        let row = match row {
            Ok(row) => row,
            Err(e) => {
                let (line, at) = e.position().map_or((0, text.len()), |p| (p.line() as usize, bom + p.byte() as usize));
                records.push(Record { line, whole: at..line_end(at), fields: Err(LineError { span: at..line_end(at), message: format!("line {line} cannot be read: {e}") }) });
                continue;
            }
        };
        let position = row.position().expect("a record read from a reader has a position");
        let (line, start) = (position.line() as usize, bom + position.byte() as usize);
        let whole = start..line_end(start);
        // A blank line is no sample (as in JSON lines).
        if row.len() == 1 && row[0].trim().is_empty() {
            continue;
        }
        let fields = if row.len() == names.len() {
            Ok(names.iter().zip(row.iter()).map(|(k, v)| (k.clone(), Value::String(v.to_string()))).collect())
        } else {
            Err(LineError { span: whole.clone(), message: format!("line {line} has {} values; the header row names {} columns", row.len(), names.len()) })
        };
        records.push(Record { line, whole, fields });
    }
    Ok(records)
}

/// A Parquet or Arrow IPC table's rows, each as the object Arrow's JSON writer makes of it
/// (a null column is a null value; struct columns objects, list columns arrays): `line` is the
/// 1-based row, and there is no text to span.
fn table_records(bytes: &[u8], format: Format) -> Result<Vec<Record>, Vec<LineError>> {
    let unreadable = |what: &str, e: &dyn std::fmt::Display| vec![LineError { span: 0..0, message: format!("the file cannot be read as {what}: {e}") }];
    let batches: Vec<arrow_array::RecordBatch> = match format {
        Format::Parquet => {
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::copy_from_slice(bytes))
                .and_then(|b| b.build())
                .map_err(|e| unreadable("Parquet", &e))?;
            reader.collect::<Result<_, _>>().map_err(|e| unreadable("Parquet", &e))?
        }
        // `datasets` writes the IPC stream format; the file format starts with its magic.
        _ if bytes.starts_with(b"ARROW1") => {
            arrow_ipc::reader::FileReader::try_new(std::io::Cursor::new(bytes), None).map_err(|e| unreadable("an Arrow IPC file", &e))?.collect::<Result<_, _>>().map_err(|e| unreadable("an Arrow IPC file", &e))?
        }
        _ => arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None).map_err(|e| unreadable("an Arrow IPC stream", &e))?.collect::<Result<_, _>>().map_err(|e| unreadable("an Arrow IPC stream", &e))?,
    };
    let mut records = Vec::new();
    for batch in &batches {
        let mut writer = arrow_json::WriterBuilder::new().with_explicit_nulls(true).build::<_, arrow_json::writer::JsonArray>(Vec::new());
        writer.write(batch).and_then(|_| writer.finish()).map_err(|e| unreadable("JSON rows", &e))?;
        let rows: Vec<Map<String, Value>> = serde_json::from_slice(&writer.into_inner()).map_err(|e| unreadable("JSON rows", &e))?;
        for fields in rows {
            records.push(Record { line: records.len() + 1, whole: 0..0, fields: Ok(fields) });
        }
    }
    Ok(records)
}

/// A table's samples, or its bad rows.
fn table_samples(bytes: &[u8], config: &DatasetConfig) -> Result<Vec<Sample>, Vec<LineError>> {
    samples_of(table_records(bytes, config.format())?, config, None)
}

fn parse_samples(file: &SourceFile, config: &DatasetConfig) -> Result<Vec<Sample>, Vec<LineError>> {
    let records = match config.format() {
        Format::Jsonl => return samples_of(jsonl_records(&file.text), config, Some(&file.text)),
        Format::Csv => delimited_records(&file.text, b',')?,
        Format::Tsv => delimited_records(&file.text, b'\t')?,
        Format::Parquet | Format::Arrow => table_records(file.text.as_bytes(), config.format())?,
    };
    samples_of(records, config, Some(&file.text))
}

/// Every sample checked, each handed to `keep` as it is read (with its span), none held: a
/// JSON lines file of a million samples costs the memory of one and of the ids seen. The problems
/// found, in file order (none when `keep` was handed every sample).
fn check_each(records: impl IntoIterator<Item = Record>, config: &DatasetConfig, unit: &str, text: Option<&str>, keep: &mut dyn FnMut(Sample, usize)) -> Vec<LineError> {
    let mut errors = Vec::new();
    let mut seen = Seen::default();
    let mut kept = 0usize;
    for Record { line, whole, fields } in records {
        match sample_of(line, whole, fields, config, text, unit, &mut seen) {
            Ok(sample) => {
                kept += 1;
                keep(sample, line);
            }
            Err(e) => errors.push(e),
        }
    }
    if kept == 0 && errors.is_empty() {
        errors.push(LineError { span: 0..0, message: "the dataset has no samples".into() });
    }
    errors
}

/// Samples from records, each checked (an id, unique; a label where one is named): `text` is the
/// file's, where records are lines of it (`None` for a table, whose records are rows).
fn samples_of(records: impl IntoIterator<Item = Record>, config: &DatasetConfig, text: Option<&str>) -> Result<Vec<Sample>, Vec<LineError>> {
    let mut samples = Vec::new();
    let unit = if text.is_some() { "line" } else { "row" };
    let errors = check_each(records, config, unit, text, &mut |sample, _| samples.push(sample));
    if errors.is_empty() { Ok(samples) } else { Err(errors) }
}

/// The ids seen, by the first 128 bits of their BLAKE3, and the line of each: a digest already,
/// so its bits are the table's hash as they are.
type Seen = HashMap<u128, usize, std::hash::BuildHasherDefault<Prehashed>>;

/// The hash of a key that is a digest's bits: the key.
#[derive(Default)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// One record checked: its sample, or what is wrong with it. `seen` holds the ids before it, by
/// the first 128 bits of their BLAKE3 (a million ids in a few tens of MB; two ids that differ
/// share them with a probability near 10^-27) and the line each was on.
fn sample_of(
    line: usize,
    whole: std::ops::Range<usize>,
    fields: Result<Map<String, Value>, LineError>,
    config: &DatasetConfig,
    text: Option<&str>,
    unit: &str,
    seen: &mut Seen,
) -> Result<Sample, LineError> {
    let n = line - 1;
    let fields = fields?;
    let id = match fields.get(&config.id) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(x)) => x.to_string(),
        Some(other) => return Err(LineError { span: whole, message: format!("{unit} {}: id field `{}` must be a string or number, found {other}", n + 1, config.id) }),
        None => return Err(LineError { span: whole, message: format!("{unit} {} has no id field `{}`", n + 1, config.id) }),
    };
    let seen_as = u128::from_le_bytes(blake3::hash(id.as_bytes()).as_bytes()[..16].try_into().expect("16 bytes"));
    if let Some(first) = seen.get(&seen_as) {
        return Err(LineError { span: whole, message: format!("duplicate id `{id}` on {unit} {} (first on {unit} {first})", n + 1) });
    }
    seen.insert(seen_as, n + 1);
    let label = match &config.label {
        None => None,
        Some(field) => match fields.get(field) {
            Some(Value::String(s)) => Some(s.clone()),
            // A structured reference (for a judge reading answers as JSON) as its JSON text.
            Some(v @ (Value::Number(_) | Value::Bool(_) | Value::Object(_) | Value::Array(_))) => Some(v.to_string()),
            _ => {
                return Err(LineError { span: whole, message: format!("{unit} {}: label field `{field}` is missing or null (a reference is text, a number, true or false, or an object or list for a judge reading JSON)", n + 1) });
            }
        },
    };
    if let Some(field) = &config.stratify
        && !fields.contains_key(field)
    {
        return Err(LineError { span: whole, message: format!("{unit} {}: has no field `{field}` (named by `stratify`)", n + 1) });
    }
    let label_at = text.and_then(|text| Some(whole.start + value_offset(&text[whole.clone()], config.label.as_deref()?)));
    Ok(Sample { id, label, label_at, fields })
}

/// Where the value of `"field":` starts in a JSON object's line (the line's start if the key is
/// not written plainly).
fn value_offset(line: &str, field: &str) -> usize {
    let key = serde_json::to_string(field).expect("a string serializes");
    let Some(at) = line.find(&key) else { return 0 };
    let rest = &line[at + key.len()..];
    let after_colon = rest.trim_start().strip_prefix(':').map_or(rest, str::trim_start);
    line.len() - after_colon.len()
}

fn split(samples: Vec<Sample>, config: &DatasetConfig, seed: u64) -> artifacts::Dataset {
    let mut strata: BTreeMap<Option<String>, Vec<usize>> = BTreeMap::new();
    for (i, s) in samples.iter().enumerate() {
        strata.entry(stratum_of(s, config)).or_default().push(i);
    }
    let mut heldout = vec![false; samples.len()];
    for members in strata.values_mut() {
        members.sort_by_cached_key(|&i| split_order(seed, &samples[i].id));
        let take = (members.len() as f64 * config.heldout.0).round() as usize;
        for &i in members.iter().take(take) {
            heldout[i] = true;
        }
    }
    let n_heldout = heldout.iter().filter(|h| **h).count();
    let samples: Vec<artifacts::Sample> = samples
        .into_iter()
        .zip(heldout)
        .map(|(s, h)| artifacts::Sample { id: s.id, split: if h { Split::Heldout } else { Split::Dev }, label: s.label, fields: s.fields })
        .collect();
    artifacts::Dataset { label_field: config.label.clone(), counts: SplitCounts { dev: samples.len() - n_heldout, heldout: n_heldout }, samples }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(heldout: f64) -> DatasetConfig {
        DatasetConfig { path: FileRef { path: "d.jsonl".into(), span: None }, format: None, id: "id".into(), label: Some("y".into()), stratify: None, heldout: Fraction(heldout) }
    }

    #[test]
    fn a_line_read_for_some_fields_holds_them_as_a_whole_read_does() {
        let only = ["id".to_string(), "y".to_string(), "k\"q".to_string()];
        let lines = [
            r#"{"id": "a", "y": "x", "text": "long text", "n": [1, {"z": null}]}"#,
            r#"{"text": "before", "y": 3.50, "id": 7}"#,
            r#"{"id": "a", "y": "first", "y": {"b": 1, "a": [true]}}"#,
            r#"{"i\u0064": "escaped name", "k\"q": "\u00e9\n"}"#,
            r#"{"id": "b", "y": null}"#,
            "{}\r\n",
        ];
        for line in lines {
            let whole = jsonl_record(0, 10, line).unwrap();
            let some = jsonl_record_only(0, 10, line, &only).unwrap();
            let kept: Map<String, Value> = whole.fields.ok().unwrap().into_iter().filter(|(k, _)| only.contains(k)).collect();
            assert_eq!(some.fields.ok().unwrap(), kept, "{line}");
            assert_eq!((some.line, some.whole), (1, 10..10 + line.trim_end().len()));
        }
        // Not read this way: the whole read says what is wrong.
        for line in ["[1]", r#"{"id": "a"} x"#, r#"{"id": "a""#, "\"s\"", "  \n"] {
            assert!(jsonl_record_only(0, 0, line, &only).is_none(), "{line}");
        }
    }

    /// Samples (`id=label`) or located errors of a delimited file.
    fn check_as(text: &str, format: Format) -> Vec<String> {
        let file = SourceFile::new("d.csv", text);
        match parse_samples(&file, &DatasetConfig { format: Some(format), ..config(0.5) }) {
            Ok(s) => s.iter().map(|s| format!("{}={}", s.id, s.label.as_deref().unwrap_or("-"))).collect(),
            Err(es) => es.iter().map(|e| format!("{}:{} {}", file.line_col(e.span.start).0, file.line_col(e.span.start).1, e.message)).collect(),
        }
    }

    #[test]
    fn csv_and_tsv_rows_are_samples_and_bad_rows_are_located() {
        // Quoted values with commas, quotes and a line break; a blank line; a byte-order mark.
        let csv = "\u{feff}id,text,y\r\na,\"one, two\",x\r\n\r\nb,\"say \"\"hi\"\"\nthere\",z\r\nc,plain,x\r\n";
        assert_eq!(check_as(csv, Format::Csv), ["a=x", "b=z", "c=x"]);
        let file = SourceFile::new("d.csv", csv);
        let b = parse_samples(&file, &DatasetConfig { format: Some(Format::Csv), ..config(0.5) }).ok().unwrap().remove(1);
        assert_eq!(b.fields["text"], "say \"hi\"\nthere");
        assert_eq!(check_as("id\ty\na\tx\nb\ty\n", Format::Tsv), ["a=x", "b=y"]);
        // A row short of a value, one with a value more, a repeated id, a missing id: each where it is.
        let bad = "id,text,y\na,t,x\nb,t\nc,t,x,extra\na,t,z\n,t,x\n";
        assert_eq!(
            check_as(bad, Format::Csv),
            [
                "3:1 line 3 has 2 values; the header row names 3 columns",
                "4:1 line 4 has 4 values; the header row names 3 columns",
                "5:1 duplicate id `a` on line 5 (first on line 2)",
                "6:1 line 6: id field `id` must be a string or number, found \"\"",
            ]
        );
        assert_eq!(check_as("id,y,y\na,b,c\n", Format::Csv), ["1:1 line 1, the header row: the name of column 3 `y` repeats an earlier column's (each column needs its own name)"]);
        assert_eq!(check_as("id,y\n", Format::Csv), ["1:1 the dataset has no samples"]);
    }

    #[test]
    fn the_format_follows_the_extension_unless_written() {
        let with = |path: &str, format: Option<Format>| DatasetConfig { path: FileRef { path: path.into(), span: None }, format, ..config(0.5) }.format();
        assert_eq!([with("a.csv", None), with("A.TSV", None), with("a.jsonl", None), with("a.txt", None)], [Format::Csv, Format::Tsv, Format::Jsonl, Format::Jsonl]);
        assert_eq!(with("a.txt", Some(Format::Csv)), Format::Csv);
    }

    fn check(text: &str) -> Vec<String> {
        let file = SourceFile::new("d.jsonl", text);
        match parse_samples(&file, &config(0.5)) {
            Ok(s) => s.iter().map(|s| format!("{}={}", s.id, s.label.as_deref().unwrap_or("-"))).collect(),
            Err(es) => es
                .iter()
                .map(|e| {
                    let (l, c) = file.line_col(e.span.start);
                    format!("{l}:{c} {}", e.message)
                })
                .collect(),
        }
    }

    #[test]
    fn reports_every_bad_line_with_its_position() {
        let text = "{\"id\": \"a\", \"y\": \"x\"}\n\n{\"id\": \"b\" \"y\": \"x\"}\n[1]\n{\"y\": \"x\"}\n{\"id\": \"a\", \"y\": \"z\"}\n{\"id\": 7, \"y\": true}\n";
        assert_eq!(
            check(text),
            [
                "3:12 line 3 is not valid JSON: expected `,` or `}` at line 1 column 12",
                "4:1 line 4 is not a JSON object",
                "5:1 line 5 has no id field `id`",
                "6:1 duplicate id `a` on line 6 (first on line 1)",
            ]
        );
        assert_eq!(check("{\"id\": 7, \"y\": true}"), ["7=true"]);
    }

    #[test]
    fn a_byte_order_mark_before_the_first_sample_is_not_part_of_it() {
        assert_eq!(check("\u{feff}{\"id\": \"a\", \"y\": \"x\"}\n{\"id\": \"b\", \"y\": \"z\"}\n"), ["a=x", "b=z"]);
        // Positions after it still point at the right column; a mark elsewhere is text.
        assert_eq!(check("\u{feff}{\"id\": \"a\" \"y\": \"x\"}\n"), ["1:12 line 1 is not valid JSON: expected `,` or `}` at line 1 column 12"]);
        assert_eq!(check("{\"id\": \"a\", \"y\": \"x\"}\n\u{feff}{\"id\": \"b\", \"y\": \"z\"}\n")[0], "2:1 line 2 is not valid JSON: expected value at line 1 column 1");
    }

    #[test]
    fn split_is_stratified_deterministic_and_seeded() {
        let text: String = (0..40).map(|i| format!("{{\"id\": \"s{i}\", \"y\": \"{}\"}}\n", if i % 4 == 0 { "rare" } else { "common" })).collect();
        let file = SourceFile::new("d.jsonl", text.as_str());
        let out = |seed| split(parse_samples(&file, &config(0.3)).ok().unwrap(), &config(0.3), seed);
        let a = out(1);
        assert_eq!(a, out(1));
        assert_ne!(a, out(2));
        let held = |label: &str| a.split(Split::Heldout).filter(|s| s.label.as_deref() == Some(label)).count();
        assert_eq!((held("rare"), held("common")), (3, 9)); // 30% of 10 and of 30
        assert_eq!(a.counts, SplitCounts { dev: 28, heldout: 12 });
    }
}
