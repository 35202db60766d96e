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
use engine::hash::canonical_json;
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
        // The chunks of lines a check cut the file into, when it ran now.
        let mut listed = None;
        let (facts, digest) = cx.checked_bytes(&config.path.clone(), &on, |path, bytes| {
            if config.format().is_table() {
                let display = display.display().to_string();
                let samples = table_samples(bytes, &config).map_err(|errors| errors.into_iter().map(|e| e.at_row(&display)).collect::<Vec<_>>())?;
                let fields = samples.iter().flat_map(|s| s.fields.keys().cloned()).collect();
                let labels_not_json = samples.iter().filter(|s| s.label.as_deref().is_some_and(|l| serde_json::from_str::<Value>(l).is_err())).count();
                return Ok(DatasetFacts { fields, labels_not_json, labels_not_json_first: Vec::new() });
            }
            if config.format() == Format::Jsonl {
                let remembered = engine::cache::dir("checks").join(format!("{}.chunks", engine::Digest::of_json(&serde_json::json!({"build": engine::cache::build_identity(), "on": &on})).hex()));
                if let Some((facts, chunks)) = check_jsonl_by_chunks(bytes, &config, &display, &remembered) {
                    listed = Some(chunks);
                    return Ok(facts);
                }
            }
            check_text(path, bytes.to_vec(), &config, &display)
        })?;
        let checked = listed.zip(digest).map(|(chunks, file)| CheckedChunks { file, chunks });
        Ok(Arc::new(DatasetStage { config, facts, checked }))
    }
}

/// A text golden set (JSON lines, CSV, TSV) checked whole: its facts, or every problem located.
fn check_text(path: &std::path::Path, bytes: Vec<u8>, config: &DatasetConfig, display: &std::path::Path) -> Result<DatasetFacts, Vec<Diagnostic>> {
    let file = SourceFile::from_bytes(path, bytes, "dataset").map_err(|d| vec![d])?;
    let file = SourceFile::new(display, file.text);
    // Sample by sample, no sample held (the text is: diagnostics point into it).
    let mut facts = no_facts();
    let mut keep = |sample: Sample, _| note_facts(&mut facts, &sample, &file);
    let errors = match config.format() {
        Format::Jsonl => check_each(jsonl_records(&file.text), config, "line", Some(&file.text), &mut keep),
        Format::Csv => delimited_records(&file.text, b',').map_or_else(|e| e, |r| check_each(r, config, "line", Some(&file.text), &mut keep)),
        Format::Tsv => delimited_records(&file.text, b'\t').map_or_else(|e| e, |r| check_each(r, config, "line", Some(&file.text), &mut keep)),
        Format::Parquet | Format::Arrow => unreachable!("tables are checked whole as tables"),
    };
    if !errors.is_empty() {
        return Err(errors.into_iter().map(|e| e.diagnostic(&file)).collect());
    }
    Ok(facts)
}

fn no_facts() -> DatasetFacts {
    DatasetFacts { fields: Default::default(), labels_not_json: 0, labels_not_json_first: Vec::new() }
}

/// A sample's part of the facts: the fields it has, its reference if that is not JSON (located
/// in `file`, for the first few).
fn note_facts(facts: &mut DatasetFacts, sample: &Sample, file: &SourceFile) {
    for field in sample.fields.keys() {
        if !facts.fields.contains(field) {
            facts.fields.insert(field.clone());
        }
    }
    if let Some(e) = label_not_json(sample) {
        facts.labels_not_json += 1;
        if facts.labels_not_json_first.len() < 5 {
            facts.labels_not_json_first.push(located(file, sample, e));
        }
    }
}

/// The strata a split is made within, numbered as first seen: by name, and one for the samples
/// without one.
#[derive(Default)]
struct Strata {
    named: HashMap<String, u32>,
    unnamed: Option<u32>,
}

impl Strata {
    fn index(&mut self, name: Option<&str>) -> u32 {
        let next = self.len() as u32;
        match name {
            None => *self.unnamed.get_or_insert(next),
            Some(name) => match self.named.get(name) {
                Some(&at) => at,
                None => *self.named.entry(name.to_string()).or_insert(next),
            },
        }
    }

    fn len(&self) -> usize {
        self.named.len() + usize::from(self.unnamed.is_some())
    }
}

/// A chunk of lines checked: its samples' ids ([`seen_as`], 16 bytes each, little-endian), and
/// the chunk's facts (its references that are not JSON located by their line in the chunk).
struct ChunkCheck {
    ids: Vec<u8>,
    facts: DatasetFacts,
}

/// The build-time check of a JSON lines file a chunk of lines at a time ([`line_chunks`]): a
/// chunk that passed the last check of this file under these settings (by this build, in the
/// file `remembered`) gives its ids and facts without a parse, so a file that grew by a line
/// costs the parse of one chunk. `None` when a line has a problem (not UTF-8, not a sample, an id
/// seen before): the whole file's check then locates every problem. With the facts, where each
/// chunk is.
fn check_jsonl_by_chunks(bytes: &[u8], config: &DatasetConfig, display: &std::path::Path, remembered: &std::path::Path) -> Option<(DatasetFacts, Vec<ChunkAt>)> {
    let mut before = read_chunk_checks(remembered).unwrap_or_default();
    let mut facts = no_facts();
    // Every id, sorted at the end to find one given twice (their first 64 bits: a million in 8 MB).
    let (mut ids, mut now, mut at) = (Vec::new(), Vec::new(), Vec::new());
    for chunk in line_chunks(bytes) {
        let chunk = chunk.ok()?;
        let key = lines_key(&chunk);
        at.push(ChunkAt::of(&chunk, key));
        let check = match before.remove(&key) {
            Some(check) => check,
            None => check_chunk(&chunk, config, display)?,
        };
        // An id's first 64 bits: two alike (an id twice, or by a chance near 3 in 10^8 at a
        // million) send the file to the whole check, which tells which.
        ids.extend(check.ids.as_chunks::<16>().0.iter().map(|id| u64::from_le_bytes(id[..8].try_into().expect("8 bytes"))));
        facts.fields.extend(check.facts.fields.iter().cloned());
        facts.labels_not_json += check.facts.labels_not_json;
        for mut located in check.facts.labels_not_json_first.iter().cloned() {
            if facts.labels_not_json_first.len() < 5 {
                located.line += chunk.first;
                facts.labels_not_json_first.push(located);
            }
        }
        now.push((key, check));
    }
    drop(before);
    ids.sort_unstable();
    if ids.is_empty() || ids.windows(2).any(|pair| pair[0] == pair[1]) {
        return None;
    }
    drop(ids);
    // Only a cache: a write that fails costs the next check its parse.
    let staging = remembered.parent().unwrap_or(std::path::Path::new("."));
    if let Err(e) = engine::atomic::write_staged(remembered, staging, |file| write_chunk_checks(&now, &mut std::io::BufWriter::new(file))) {
        tracing::debug!("could not remember the chunks checked in {}: {e}", remembered.display());
    }
    Some((facts, at))
}

/// A chunk of lines by its content (the bytes, and whether they start the file: a byte-order
/// mark is read past there only): what the build's check remembers it by, and what the stage's
/// key for what it keeps of the chunk is made from.
fn lines_key(chunk: &LineChunk) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&[u8::from(chunk.first == 0)]);
    h.update(&chunk.bytes);
    *h.finalize().as_bytes()
}

/// Where a chunk of lines is in its file: its first line (0-based), its bytes, its
/// [`lines_key`].
#[derive(Clone, Copy)]
struct ChunkAt {
    first: usize,
    offset: usize,
    len: usize,
    key: [u8; 32],
}

impl ChunkAt {
    fn of(chunk: &LineChunk, key: [u8; 32]) -> ChunkAt {
        ChunkAt { first: chunk.first, offset: chunk.offset, len: chunk.bytes.len(), key }
    }
}

/// The chunks of lines the build's check cut a JSON lines file into, and the file's digest: a
/// run of the stage on that file reads back what it kept of each chunk by its key without
/// reading the file, and reads only a chunk it kept nothing of (checked against its key).
struct CheckedChunks {
    file: engine::Digest,
    chunks: Vec<ChunkAt>,
}

/// One chunk's lines checked as the whole file's check checks them, or `None` at a problem.
fn check_chunk(chunk: &LineChunk, config: &DatasetConfig, display: &std::path::Path) -> Option<ChunkCheck> {
    // Located in the chunk's own text: a line of it is `chunk.first` lines into the file.
    let file = SourceFile::new(display, std::str::from_utf8(&chunk.bytes).ok()?.to_string());
    let (mut check, mut seen) = (ChunkCheck { ids: Vec::new(), facts: no_facts() }, Seen::default());
    for (index, (start, raw)) in chunk.lines().enumerate() {
        let n = chunk.first + index;
        let raw = std::str::from_utf8(raw).ok()?;
        let (raw, bom) = if n == 0 { after_bom(raw) } else { (raw, 0) };
        let Some(record) = jsonl_record(n, start - chunk.offset + bom, raw) else { continue };
        let sample = sample_of(record.line, record.whole, record.fields, config, Some(&file.text), "line", &mut seen).ok()?;
        check.ids.extend_from_slice(&seen_as(&sample.id).to_le_bytes());
        note_facts(&mut check.facts, &sample, &file);
    }
    Some(check)
}

/// The chunks checked, as remembered: each one's key, its ids, its facts as JSON (each of the
/// two after its length); then the BLAKE3 of all that, checked when read.
fn write_chunk_checks(checks: &[([u8; 32], ChunkCheck)], out: &mut impl std::io::Write) -> std::io::Result<()> {
    let mut h = blake3::Hasher::new();
    let mut put = |bytes: &[u8]| -> std::io::Result<()> {
        h.update(bytes);
        out.write_all(bytes)
    };
    for (key, check) in checks {
        let facts = serde_json::to_vec(&check.facts).expect("facts serialize");
        for part in [&key[..], &(check.ids.len() as u32).to_le_bytes(), &check.ids, &(facts.len() as u32).to_le_bytes(), &facts] {
            put(part)?;
        }
    }
    out.write_all(h.finalize().as_bytes())?;
    out.flush()
}

/// See [`write_chunk_checks`]; `None` if the file is missing or not what it wrote.
fn read_chunk_checks(path: &std::path::Path) -> Option<HashMap<[u8; 32], ChunkCheck>> {
    let bytes = std::fs::read(path).ok()?;
    let (mut rest, digest) = bytes.split_last_chunk::<32>()?;
    if blake3::hash(rest).as_bytes() != digest {
        return None;
    }
    let mut checks = HashMap::new();
    let part = |rest: &mut &[u8]| -> Option<Vec<u8>> {
        let (len, after) = rest.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        let part = after.get(..len)?.to_vec();
        *rest = &after[len..];
        Some(part)
    };
    while !rest.is_empty() {
        let (key, after) = rest.split_first_chunk::<32>()?;
        rest = after;
        let ids = part(&mut rest)?;
        let facts = serde_json::from_slice(&part(&mut rest)?).ok()?;
        (ids.len() % 16 == 0).then_some(())?;
        checks.insert(*key, ChunkCheck { ids, facts });
    }
    Some(checks)
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
    /// When the build's check read the file (it changed since one passed): its chunks.
    checked: Option<CheckedChunks>,
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

    /// JSON lines are read as they come, never held: once to check every line and order each
    /// stratum (a million samples cost their line numbers, strata and orders), then each sample
    /// is written from what the first pass kept of its chunk.
    fn write_output(&self, input: &StageInput, _: &mut dyn Iterator<Item = Result<(Item, Value), StageError>>, out: &mut OutputWriter) -> Result<(), StageError> {
        let whole = |out: &mut OutputWriter| {
            let dataset = self.whole(input.file(&self.config.path)?, input.seed)?;
            out.field("counts", &dataset.counts)?;
            out.field("label_field", &dataset.label_field)?;
            out.elements("samples", dataset.samples.into_iter().map(Ok))
        };
        if self.config.format() != Format::Jsonl {
            return whole(out);
        }
        let unreadable = |e: std::io::Error| StageError::new(format!("{}: {e}", self.config.path.path));
        // First pass: every line checked, chunk by chunk; a chunk kept by an earlier run gives its
        // samples' ids and strata without a parse. Each sample's line, stratum and place in its
        // stratum's order; each chunk's key and number of samples.
        let kept_before = input.kept();
        let mut kept: Vec<(usize, u32, u128)> = Vec::new();
        let mut chunks: Vec<(engine::Digest, usize)> = Vec::new();
        let mut strata = Strata::default();
        let mut errors = Vec::new();
        let mut read_back = 0;
        // The chunks the build's check found, if it read this file; else the file, read through.
        // Each with its bytes if they were read.
        let listed = self.checked.as_ref().filter(|checked| input.file_digest(&self.config.path) == Some(checked.file));
        let found: Box<dyn Iterator<Item = Result<(ChunkAt, Option<LineChunk>), StageError>>> = match listed {
            Some(checked) => Box::new(checked.chunks.iter().map(|at| Ok((*at, None)))),
            None => Box::new(line_chunks(std::io::BufReader::with_capacity(1 << 16, input.file_reader(&self.config.path)?)).map(|chunk| {
                let chunk = chunk.map_err(unreadable)?;
                Ok((ChunkAt::of(&chunk, lines_key(&chunk)), Some(chunk)))
            })),
        };
        for found in found {
            let (at, chunk) = found?;
            let key = self.chunk_key(&at.key, input.seed);
            let before = kept.len();
            let records_before = kept_before.get(&key);
            let from_before = records_before.as_ref().and_then(|records| records.iter().map(|r| KeptLine::read(r)).collect::<Option<Vec<_>>>());
            if let Some(lines) = from_before {
                read_back += 1;
                for line in lines {
                    kept.push((at.first + line.index as usize + 1, strata.index(line.stratum), line.order));
                }
            } else {
                let chunk = match chunk {
                    Some(chunk) => chunk,
                    None => self.read_chunk(input, &at)?,
                };
                let (mut records, mut samples) = (Vec::new(), Vec::new());
                let errors_before = errors.len();
                // Ids twice within the chunk are found here, located; across chunks, below.
                let mut seen = Seen::default();
                for (index, (start, raw)) in chunk.lines().enumerate() {
                    let n = chunk.first + index;
                    let text = String::from_utf8_lossy(raw);
                    let (raw, bom) = if n == 0 { after_bom(&text) } else { (&text[..], 0) };
                    let Some(record) = jsonl_record(n, start + bom, raw) else { continue };
                    match sample_of(record.line, record.whole, record.fields, &self.config, None, "line", &mut seen) {
                        Ok(s) => {
                            let stratum = stratum_of(&s, &self.config);
                            let order = order_prefix(input.seed, &s.id);
                            kept.push((n + 1, strata.index(stratum.as_deref()), order));
                            records.push(KeptLine::write(index as u32, stratum.as_deref(), order));
                            samples.push(kept_sample(s)?);
                        }
                        Err(e) => errors.push(e),
                    }
                }
                if errors.len() == errors_before {
                    // The samples first: lines found kept mean their samples are.
                    kept_before.put(&samples_key(&key), &samples);
                    kept_before.put(&key, &records);
                }
            }
            chunks.push((key, kept.len() - before));
        }
        drop(kept_before);
        tracing::debug!(file = %self.config.path.path, "{} chunk(s) of lines, {read_back} read back as kept, the others parsed", chunks.len());
        if kept.is_empty() && errors.is_empty() {
            errors.push(LineError { span: 0..0, message: "the dataset has no samples".into() });
        }
        if let Some(first) = errors.first() {
            // Located as a whole read locates them (rare: `validate` checked the file).
            self.whole(input.file(&self.config.path)?, input.seed)?;
            return Err(StageError::new(format!("{}: {} ({} problem(s) in all)", self.config.path.path, first.message, errors.len())));
        }
        // An id given twice has one order twice: sorted by their first 64 bits, two alike are an
        // id given twice, which the whole read locates, or (a chance near 3 in 10^8 at a million
        // samples) two orders that only start alike, which the whole read splits as well. Past
        // here, the orders' first 128 bits are distinct, so they order the samples as the whole.
        let mut orders: Vec<u64> = kept.iter().map(|(_, _, order)| (order >> 64) as u64).collect();
        orders.sort_unstable();
        if orders.windows(2).any(|pair| pair[0] == pair[1]) {
            return whole(out);
        }
        drop(orders);
        // Each stratum's first `take` in its order: those below the order in place `take`,
        // found without ordering the rest (the orders are distinct).
        let mut orders: Vec<Vec<u128>> = vec![Vec::new(); strata.len()];
        for (_, stratum, order) in &kept {
            orders[*stratum as usize].push(*order);
        }
        // (`None`: the whole stratum is taken.)
        let below: Vec<Option<u128>> = orders
            .into_iter()
            .map(|mut orders| {
                let take = (orders.len() as f64 * self.config.heldout.0).round() as usize;
                (take < orders.len()).then(|| *orders.select_nth_unstable(take).1)
            })
            .collect();
        let heldout: Vec<bool> = kept.iter().map(|(_, stratum, order)| below[*stratum as usize].is_none_or(|below| *order < below)).collect();
        let n_heldout = heldout.iter().filter(|h| **h).count();
        out.field("counts", &SplitCounts { dev: kept.len() - n_heldout, heldout: n_heldout })?;
        out.field("label_field", &self.config.label)?;
        // Second pass: each sample's canonical JSON, from the chunks just kept (the file is read
        // again only for a chunk that could not be: a full disk, no store).
        let kept_now = input.kept();
        let mut file: Option<Box<dyn Iterator<Item = std::io::Result<Record>> + '_>> = None;
        let (mut chunks, mut next) = (chunks.into_iter(), 0);
        let (mut pending, mut from_file) = (Vec::<Vec<u8>>::new().into_iter(), 0usize);
        let samples = std::iter::from_fn(|| {
            loop {
                let split = |next: usize| if heldout[next] { Split::Heldout } else { Split::Dev };
                if let Some(mut bytes) = pending.next() {
                    serde_json::to_writer(&mut bytes, split(next).as_str()).expect("writing to a Vec cannot fail");
                    bytes.push(b'}');
                    next += 1;
                    return Some(Ok(bytes));
                }
                if from_file > 0 {
                    from_file -= 1;
                    let (line, _, _) = kept[next];
                    let h = split(next);
                    next += 1;
                    if file.is_none() {
                        match input.file_reader(&self.config.path) {
                            Ok(reader) => file = Some(Box::new(jsonl_lines(std::io::BufReader::with_capacity(1 << 16, reader)))),
                            Err(e) => return Some(Err(e)),
                        }
                    }
                    let records = file.as_mut().expect("opened above");
                    loop {
                        match records.next() {
                            None => return Some(Err(StageError::new(format!("{}: ended before line {line}", self.config.path.path)))),
                            Some(Err(e)) => return Some(Err(unreadable(e))),
                            Some(Ok(record)) if record.line == line => {
                                // Checked above: the same line gives the same sample.
                                let s = match sample_of(line, record.whole, record.fields, &self.config, None, "line", &mut Seen::default()) {
                                    Ok(s) => s,
                                    Err(e) => return Some(Err(StageError::new(e.message))),
                                };
                                let sample = artifacts::Sample { id: s.id, split: h, label: s.label, fields: s.fields };
                                return Some(Ok(canonical_json(&serde_json::to_value(&sample).expect("a sample serializes"))));
                            }
                            Some(Ok(_)) => continue,
                        }
                    }
                }
                let (key, n) = chunks.next()?;
                match kept_now.get(&samples_key(&key)).filter(|records| records.len() == n) {
                    Some(records) => pending = records.into_iter(),
                    None => from_file = n,
                }
            }
        });
        out.canonical_elements("samples", samples)?;
        // A file read again is read to its end: checked against its digest there.
        if let Some(records) = file {
            for record in records {
                record.map_err(unreadable)?;
            }
        }
        Ok(())
    }

    fn finish(&self, input: &StageInput, _: Vec<(Item, Value)>) -> Result<Value, StageError> {
        Ok(self.whole(input.file(&self.config.path)?, input.seed)?.to_json())
    }
}

impl DatasetStage {
    /// Under what a chunk of lines is kept: its content ([`lines_key`]), the fields that make a
    /// line a sample, the seed (the lines' orders follow it), and the code's.
    fn chunk_key(&self, lines_key: &[u8; 32], seed: u64) -> engine::Digest {
        let mut h = blake3::Hasher::new();
        h.update(b"dataset lines\0");
        h.update(&Dataset::VERSION.to_le_bytes());
        h.update(&KEPT_FORMAT.to_le_bytes());
        h.update(&seed.to_le_bytes());
        let fields = serde_json::to_vec(&(&self.config.id, &self.config.label, &self.config.stratify)).expect("names serialize");
        h.update(&(fields.len() as u64).to_le_bytes());
        h.update(&fields);
        h.update(lines_key);
        engine::Digest(*h.finalize().as_bytes())
    }

    /// A chunk the build's check found, read from its place in the file and checked against
    /// its key (the file may have changed since).
    fn read_chunk(&self, input: &StageInput, at: &ChunkAt) -> Result<LineChunk, StageError> {
        let bytes = input.file_range(&self.config.path, at.offset as u64, at.len)?;
        let mut ends: Vec<usize> = bytes.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i + 1).collect();
        if ends.last() != Some(&bytes.len()) {
            ends.push(bytes.len());
        }
        let chunk = LineChunk { first: at.first, offset: at.offset, bytes, ends };
        if lines_key(&chunk) != at.key {
            return Err(StageError::new(format!("file `{}` changed while the pipeline ran; run it again", self.config.path.path)));
        }
        Ok(chunk)
    }

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

/// The first 128 bits of a sample's [`split_order`], as a number that orders as they do.
fn order_prefix(seed: u64, id: &str) -> u128 {
    u128::from_be_bytes(split_order(seed, id)[..16].try_into().expect("16 bytes"))
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
fn jsonl_lines(mut reader: impl std::io::BufRead) -> impl Iterator<Item = std::io::Result<Record>> {
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
                    let record = jsonl_record(n, offset + bom, raw);
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

/// Consecutive lines of a JSON lines file, as read: the 0-based number of the first, its byte
/// offset, the lines' bytes and where each ends.
struct LineChunk {
    first: usize,
    offset: usize,
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl LineChunk {
    /// Each line's offset in the file and its bytes (its line break included).
    fn lines(&self) -> impl Iterator<Item = (usize, &[u8])> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(&self.ends).map(|(start, &end)| (self.offset + start, &self.bytes[start..end]))
    }
}

/// Lines per chunk at most (about a thousand on average: [`line_ends_chunk`]); a chunk also ends
/// once it holds this many bytes.
const CHUNK_MOST_LINES: usize = engine::store::chunks::LONGEST;
const CHUNK_MOST_BYTES: usize = 8 << 20;

/// A JSON lines file read in chunks of lines cut by their content (as content-defined chunking
/// cuts a file): a chunk ends after a line that [`line_ends_chunk`], or at [`CHUNK_MOST_LINES`]
/// lines or [`CHUNK_MOST_BYTES`] bytes. A line added, changed or removed changes the chunk it is
/// in (and, at most, the one after it), not the others.
fn line_chunks(mut reader: impl std::io::BufRead) -> impl Iterator<Item = std::io::Result<LineChunk>> {
    let (mut first, mut offset, mut done) = (0usize, 0usize, false);
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let mut chunk = LineChunk { first, offset, bytes: Vec::new(), ends: Vec::new() };
        loop {
            let start = chunk.bytes.len();
            match reader.read_until(b'\n', &mut chunk.bytes) {
                Err(e) => {
                    done = true;
                    return Some(Err(e));
                }
                Ok(0) => {
                    done = true;
                    break;
                }
                Ok(_) => {
                    chunk.ends.push(chunk.bytes.len());
                    if line_ends_chunk(&chunk.bytes[start..]) || chunk.ends.len() >= CHUNK_MOST_LINES || chunk.bytes.len() >= CHUNK_MOST_BYTES {
                        break;
                    }
                }
            }
        }
        first += chunk.ends.len();
        offset += chunk.bytes.len();
        (!chunk.ends.is_empty()).then_some(Ok(chunk))
    })
}

/// Whether a chunk of lines ends after this one: cut by its content, its line break left out
/// ([`engine::store::chunks::content_ends_chunk`]: one line in about a thousand).
fn line_ends_chunk(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    engine::store::chunks::content_ends_chunk(line.strip_suffix(b"\r").unwrap_or(line))
}

/// What [`DatasetStage`] keeps of each line of a chunk ([`StageInput::kept`]), so that a rerun
/// reads a chunk it has seen without parsing it: the line's place in the chunk, its stratum and
/// its id. Its sample is kept apart ([`kept_sample`], under [`samples_key`]), read only to write
/// the output.
struct KeptLine<'a> {
    index: u32,
    stratum: Option<&'a str>,
    /// The sample's [`order_prefix`] (under the seed its chunk is kept by).
    order: u128,
}

/// Bump when what [`KeptLine`] and [`kept_sample`] hold, or how a line becomes a sample, changes:
/// chunks kept before are then not read.
const KEPT_FORMAT: u32 = 3;

impl<'a> KeptLine<'a> {
    fn write(index: u32, stratum: Option<&str>, order: u128) -> Vec<u8> {
        let stratum_len = stratum.map_or(0, str::len);
        let mut out = Vec::with_capacity(stratum_len + 25);
        out.extend_from_slice(&index.to_le_bytes());
        out.extend_from_slice(&order.to_le_bytes());
        out.push(u8::from(stratum.is_some()));
        out.extend_from_slice(&(stratum_len as u32).to_le_bytes());
        out.extend_from_slice(stratum.unwrap_or_default().as_bytes());
        out
    }

    /// `None` if the bytes are not what [`Self::write`] writes.
    fn read(bytes: &'a [u8]) -> Option<KeptLine<'a>> {
        let (index, rest) = bytes.split_first_chunk::<4>()?;
        let (order, rest) = rest.split_first_chunk::<16>()?;
        let (&has_stratum, rest) = rest.split_first()?;
        let (len, rest) = rest.split_first_chunk::<4>()?;
        let stratum = std::str::from_utf8(rest).ok().filter(|s| s.len() == u32::from_le_bytes(*len) as usize)?;
        Some(KeptLine { index: u32::from_le_bytes(*index), stratum: (has_stratum == 1).then_some(stratum), order: u128::from_le_bytes(*order) })
    }
}

/// A sample's canonical JSON up to the value of `split`, its last key (the split is decided over
/// the whole file, after the chunks are read).
fn kept_sample(s: Sample) -> Result<Vec<u8>, StageError> {
    let sample = artifacts::Sample { id: s.id, split: Split::Dev, label: s.label, fields: s.fields };
    let mut json = canonical_json(&serde_json::to_value(&sample).map_err(|e| StageError::new(format!("sample `{}` does not serialize: {e}", sample.id)))?);
    if !json.ends_with(br#""split":"dev"}"#) {
        return Err(StageError::new("a sample's canonical JSON does not end with its split"));
    }
    json.truncate(json.len() - br#""dev"}"#.len());
    Ok(json)
}

/// Where a chunk's samples are kept, beside its lines (under `key`).
fn samples_key(key: &engine::Digest) -> engine::Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"dataset samples\0");
    h.update(&key.0);
    engine::Digest(*h.finalize().as_bytes())
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
    seen_first(seen, &id, n + 1, whole.clone(), unit)?;
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

/// What an id is remembered by in [`Seen`]: the first 128 bits of its BLAKE3.
fn seen_as(id: &str) -> u128 {
    u128::from_le_bytes(blake3::hash(id.as_bytes()).as_bytes()[..16].try_into().expect("16 bytes"))
}

/// Records that `id` is on line (row) `line`, unless an earlier one had it.
fn seen_first(seen: &mut Seen, id: &str, line: usize, span: std::ops::Range<usize>, unit: &str) -> Result<(), LineError> {
    let seen_as = seen_as(id);
    if let Some(first) = seen.get(&seen_as) {
        return Err(LineError { span, message: format!("duplicate id `{id}` on {unit} {line} (first on {unit} {first})") });
    }
    seen.insert(seen_as, line);
    Ok(())
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

    /// Lines of a golden set: ids, four labels, text with characters JSON escapes.
    fn golden_line(i: usize) -> String {
        format!("{{\"text\": \"row {i}: caf\u{e9} \\\"q\\\" {}\", \"y\": \"{}\", \"id\": \"r{i}\"}}\n", i * 7919 % 10007, ["a", "b", "c", "d"][i % 4])
    }

    #[test]
    fn lines_are_cut_into_chunks_by_their_content_so_one_line_changed_changes_one_chunk() {
        let lines: Vec<String> = (0..20_000).map(golden_line).collect();
        let cut = |lines: &[String]| -> Vec<LineChunk> { line_chunks(lines.concat().as_bytes()).map(Result::unwrap).collect() };
        let before = cut(&lines);
        assert!((8..=60).contains(&before.len()), "about one line in a thousand cuts: {} chunks", before.len());
        assert_eq!(before.iter().map(|c| c.bytes.clone()).collect::<Vec<_>>().concat(), lines.concat().into_bytes());
        assert_eq!(before.iter().map(|c| c.ends.len()).sum::<usize>(), lines.len());
        for pair in before.windows(2) {
            assert_eq!((pair[1].first, pair[1].offset), (pair[0].first + pair[0].ends.len(), pair[0].offset + pair[0].bytes.len()));
        }
        let mut after = lines.clone();
        after[10_000] = golden_line(10_000).replace("row", "ROW");
        after.insert(15_000, golden_line(99_999));
        let bytes = |chunks: Vec<LineChunk>| chunks.into_iter().map(|c| c.bytes).collect::<std::collections::HashSet<_>>();
        let (old, new) = (bytes(before), bytes(cut(&after)));
        assert!(new.difference(&old).count() <= 4, "{} of {} chunks changed", new.difference(&old).count(), new.len());
        // A line that never cuts: chunks of the most lines.
        let never: Vec<String> = (0..).map(golden_line).filter(|l| !line_ends_chunk(l.as_bytes())).take(CHUNK_MOST_LINES + 3).collect();
        assert_eq!(cut(&never).iter().map(|c| c.ends.len()).collect::<Vec<_>>(), [CHUNK_MOST_LINES, 3]);
    }

    /// 6,000 golden lines with what a reader can trip on: a byte-order mark, a blank line, a CRLF
    /// line, a numeric id and a JSON label with a field no other line has.
    fn awkward_lines() -> Vec<String> {
        let mut lines: Vec<String> = (0..6000).map(golden_line).collect();
        lines[0] = format!("\u{feff}{}", lines[0]);
        lines[17] = "  \n".into();
        lines[2500] = lines[2500].replace('\n', "\r\n");
        lines[3000] = r#"{"id": 3000, "y": {"b": [1, 2.50]}, "z": null}"#.to_string() + "\n";
        lines
    }

    #[test]
    fn a_streamed_dataset_is_the_whole_one_with_or_without_kept_chunks() {
        let mut lines = awkward_lines();
        let stage = |heldout| DatasetStage { config: config(heldout), facts: no_facts(), checked: None };
        let input = |lines: &[String]| StageInput::new(Default::default(), [("d.jsonl".to_string(), Arc::from(lines.concat().into_bytes()))].into(), 7);
        let whole = |lines: &[String], heldout| canonical_json(&stage(heldout).whole(lines.concat().as_bytes(), 7).ok().unwrap().to_json());
        let store = tempfile::tempdir().unwrap();
        let streamed = |lines: &[String], heldout, kept: bool| {
            let input = if kept { input(lines).with_store(engine::Store::new(store.path())) } else { input(lines) };
            engine::stream::streamed_output(&stage(heldout), &input).ok().unwrap()
        };
        assert_eq!(streamed(&lines, 0.3, false), whole(&lines, 0.3));
        // Kept as read, then read back.
        assert_eq!(streamed(&lines, 0.3, true), whole(&lines, 0.3));
        let kept = input(&lines).with_store(engine::Store::new(store.path()));
        let chunks: Vec<LineChunk> = line_chunks(lines.concat().as_bytes()).map(Result::unwrap).collect();
        assert!(chunks.len() > 2 && chunks.iter().all(|c| kept.kept().get(&stage(0.3).chunk_key(&lines_key(c), 7)).is_some()));
        assert_eq!(streamed(&lines, 0.3, true), whole(&lines, 0.3));
        // The samples written are the ones kept, not parsed again: a chunk's, kept changed, are
        // what the output holds; put back, the output is the whole read's again.
        let samples_at = samples_key(&stage(0.3).chunk_key(&lines_key(&chunks[0]), 7));
        let samples = kept.kept().get(&samples_at).unwrap();
        let changed: Vec<Vec<u8>> = samples.iter().map(|s| String::from_utf8(s.clone()).unwrap().replace("row ", "kept row ").into_bytes()).collect();
        kept.kept().put(&samples_at, &changed);
        let out = String::from_utf8(streamed(&lines, 0.3, true)).unwrap();
        assert_eq!(out.matches("kept row ").count(), samples.len());
        assert_eq!(out.replace("kept row ", "row "), String::from_utf8(whole(&lines, 0.3)).unwrap());
        kept.kept().put(&samples_at, &samples);
        assert_eq!(streamed(&lines, 0.3, true), whole(&lines, 0.3));
        // Lines changed, removed and added: the chunks kept before are read back, the split
        // decided anew over the whole file.
        lines[4000] = golden_line(4000).replace("row", "ROW");
        lines.remove(5000);
        lines.extend((7000..7500).map(golden_line));
        assert_eq!(streamed(&lines, 0.3, true), whole(&lines, 0.3));
        assert_eq!(streamed(&lines, 0.5, true), whole(&lines, 0.5));
        // A duplicate id in a new line of an id in a chunk read back.
        lines.push(golden_line(5));
        let twice = engine::stream::streamed_output(&stage(0.3), &input(&lines).with_store(engine::Store::new(store.path())));
        assert!(twice.err().unwrap().message.contains("duplicate id `r5`"));
    }

    #[test]
    fn a_dataset_whose_chunks_the_check_found_is_read_by_them_and_only_a_chunk_not_kept_is_read() {
        let mut lines = awkward_lines();
        let dir = tempfile::tempdir().unwrap();
        let checked = |lines: &[String]| {
            let bytes = lines.concat().into_bytes();
            let (_, chunks) = check_jsonl_by_chunks(&bytes, &config(0.3), std::path::Path::new("d.jsonl"), &dir.path().join("d.chunks")).unwrap();
            CheckedChunks { file: engine::Digest::of_bytes(&bytes), chunks }
        };
        let stage = |checked| DatasetStage { config: config(0.3), facts: no_facts(), checked: Some(checked) };
        let input = |lines: &[String]| StageInput::new(Default::default(), [("d.jsonl".to_string(), Arc::from(lines.concat().into_bytes()))].into(), 7);
        let whole = |lines: &[String]| canonical_json(&stage(checked(lines)).whole(lines.concat().as_bytes(), 7).ok().unwrap().to_json());
        let store = tempfile::tempdir().unwrap();
        let streamed = |checked, lines: &[String]| engine::stream::streamed_output(&stage(checked), &input(lines).with_store(engine::Store::new(store.path())));
        // Nothing kept: every chunk read from its place; then every chunk read back.
        assert_eq!(streamed(checked(&lines), &lines).ok().unwrap(), whole(&lines));
        assert_eq!(streamed(checked(&lines), &lines).ok().unwrap(), whole(&lines));
        // A line added and one changed: their chunks are read, checked against what was found.
        lines.push(golden_line(6000));
        lines[2000] = golden_line(2000).replace("row", "ROW");
        assert_eq!(streamed(checked(&lines), &lines).ok().unwrap(), whole(&lines));
        // Chunks found in other bytes than the file's: the file is read through, as without them.
        let before = checked(&lines);
        lines[4000] = golden_line(4000).replace("row", "ROW");
        assert_eq!(streamed(before, &lines).ok().unwrap(), whole(&lines));
        // A chunk read from its place is checked against what was found there: the file changed
        // on disk since the run hashed it.
        let found = checked(&lines);
        let at = found.chunks[found.chunks.partition_point(|at| at.first <= 5000) - 1];
        assert!(stage(checked(&lines)).read_chunk(&input(&lines), &at).is_ok());
        lines[5000] = golden_line(5000).replace("row", "RAW");
        assert!(stage(found).read_chunk(&input(&lines), &at).err().unwrap().message.contains("changed while the pipeline ran"));
    }

    #[test]
    fn a_file_checked_a_chunk_at_a_time_has_the_facts_of_a_whole_check() {
        let mut lines = awkward_lines();
        let dir = tempfile::tempdir().unwrap();
        let remembered = dir.path().join("d.chunks");
        let (config, display) = (config(0.3), std::path::Path::new("data/d.jsonl"));
        let whole = |lines: &[String]| check_text(display, lines.concat().into_bytes(), &config, display).ok().unwrap();
        let chunked = |bytes: &[u8]| check_jsonl_by_chunks(bytes, &config, display, &remembered).map(|(facts, _)| facts);
        let facts = whole(&lines);
        assert_eq!((facts.fields.len(), facts.labels_not_json, facts.labels_not_json_first.len()), (4, 5998, 5));
        // Nothing remembered, then every chunk.
        assert_eq!(chunked(lines.concat().as_bytes()), Some(facts.clone()));
        assert!(read_chunk_checks(&remembered).is_some_and(|checks| checks.len() > 2));
        assert_eq!(chunked(lines.concat().as_bytes()), Some(facts));
        // Lines changed (the first references not JSON move), removed, added.
        lines[1] = r#"{"id": "r1", "y": "\"quoted\"", "w": 1}"#.to_string() + "\n";
        lines.remove(5000);
        lines.extend((7000..7100).map(golden_line));
        assert_eq!(chunked(lines.concat().as_bytes()), Some(whole(&lines)));
        // A problem anywhere, in a chunk remembered or not: the whole check is what locates it.
        let mut twice = lines.clone();
        twice.push(golden_line(5));
        assert_eq!(chunked(twice.concat().as_bytes()), None);
        let mut broken = lines.clone();
        broken[4500] = "{\"id\": \"x\"\n".into();
        assert_eq!(chunked(broken.concat().as_bytes()), None);
        let mut not_utf8 = lines.concat().into_bytes();
        not_utf8[300_000] = 0xff;
        assert_eq!(chunked(&not_utf8), None);
        assert_eq!(chunked(b"\n\n"), None);
        // A damaged record of them is not read.
        let mut damaged = std::fs::read(&remembered).unwrap();
        damaged[40] ^= 1;
        std::fs::write(&remembered, damaged).unwrap();
        assert!(read_chunk_checks(&remembered).is_none());
        assert_eq!(chunked(lines.concat().as_bytes()), Some(whole(&lines)));
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
