//! `dataset`: a JSONL golden set, checked line by line, split into dev / held-out.
//!
//! The split is deterministic and stratified: within each label (or over all samples when there
//! is no label field), samples are ordered by BLAKE3(seed, id) and the first `heldout` fraction is
//! held out. Ordering by a hash of the id, not by file position, keeps most samples in their split
//! when rows are added or reordered.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use artifacts::{Artifact, Split, SplitCounts};
use engine::diag::{Diagnostic, SourceFile};
use engine::{BuildContext, FileRef, Item, Port, Stage, StageError, StageInput, StagePlugin};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub struct Dataset;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// JSONL file, one JSON object per line, relative to the pipeline file.
    pub path: FileRef,
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
    const SUMMARY: &'static str = "a JSONL golden set, validated and split into dev / held-out by seed";
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
        let path = cx.file(&config.path).map_err(|d| vec![d])?;
        // Check every line now, so `pipeline validate` reports them all with their locations.
        let file = SourceFile::read(&path, "dataset").map_err(|d| vec![d])?;
        let file = SourceFile::new(cx.display_path(&config.path), file.text);
        let samples = parse_samples(&file, &config).map_err(|errors| errors.into_iter().map(|e| e.diagnostic(&file)).collect::<Vec<_>>())?;
        let fields = samples.iter().flat_map(|s| s.fields.keys().cloned()).collect();
        Ok(Arc::new(DatasetStage { config, fields }))
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
    /// Every field name some sample has (at build time).
    fields: std::collections::BTreeSet<String>,
}

impl Stage for DatasetStage {
    /// `{"fields": [...]}`: the field names some sample has, for templates and stages that name
    /// fields to be checked against at `validate`.
    fn facts(&self) -> Value {
        serde_json::to_value(artifacts::facts::DatasetFacts { fields: self.fields.clone() }).expect("facts serialize")
    }

    fn finish(&self, input: &StageInput, _: Vec<(Item, Value)>) -> Result<Value, StageError> {
        let bytes = input.file(&self.config.path)?;
        let file = SourceFile::new(&self.config.path.path, String::from_utf8_lossy(bytes).into_owned());
        let samples = parse_samples(&file, &self.config).map_err(|errors| {
            let first = &errors[0];
            let (line, col) = file.line_col(first.span.start);
            StageError::new(format!("{}:{line}:{col}: {} ({} problem(s) in all)", self.config.path.path, first.message, errors.len()))
        })?;
        Ok(split(samples, &self.config, input.seed).to_json())
    }
}

struct Sample {
    id: String,
    label: Option<String>,
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
}

fn parse_samples(file: &SourceFile, config: &DatasetConfig) -> Result<Vec<Sample>, Vec<LineError>> {
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut offset = 0;
    for (n, raw) in file.text.split_inclusive('\n').enumerate() {
        let mut start = offset;
        offset += raw.len();
        let mut line = raw.trim_end_matches(['\n', '\r']);
        // A UTF-8 byte-order mark (as some editors and spreadsheet exports write) is not part of
        // the first sample.
        if n == 0 && let Some(rest) = line.strip_prefix('\u{feff}') {
            line = rest;
            start += '\u{feff}'.len_utf8();
        }
        if line.trim().is_empty() {
            continue;
        }
        let whole = start..start + line.len();
        let value: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                let at = start + line.char_indices().nth(e.column().saturating_sub(1)).map_or(line.len(), |(i, _)| i);
                errors.push(LineError { span: at..at + 1, message: format!("line {} is not valid JSON: {e}", n + 1) });
                continue;
            }
        };
        let Value::Object(fields) = value else {
            errors.push(LineError { span: whole, message: format!("line {} is not a JSON object", n + 1) });
            continue;
        };
        let id = match fields.get(&config.id) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(x)) => x.to_string(),
            Some(other) => {
                errors.push(LineError { span: whole, message: format!("line {}: id field `{}` must be a string or number, found {other}", n + 1, config.id) });
                continue;
            }
            None => {
                errors.push(LineError { span: whole, message: format!("line {} has no id field `{}`", n + 1, config.id) });
                continue;
            }
        };
        if let Some(first) = seen.insert(id.clone(), n + 1) {
            errors.push(LineError { span: whole, message: format!("duplicate id `{id}` on line {} (first on line {first})", n + 1) });
            continue;
        }
        let label = match &config.label {
            None => None,
            Some(field) => match fields.get(field) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => Some(v.to_string()),
                _ => {
                    errors.push(LineError { span: whole, message: format!("line {}: label field `{field}` is missing or not a string", n + 1) });
                    continue;
                }
            },
        };
        if let Some(field) = &config.stratify
            && !fields.contains_key(field)
        {
            errors.push(LineError { span: whole, message: format!("line {}: has no field `{field}` (named by `stratify`)", n + 1) });
            continue;
        }
        samples.push(Sample { id, label, fields });
    }
    if samples.is_empty() && errors.is_empty() {
        errors.push(LineError { span: 0..0, message: "the dataset has no samples".into() });
    }
    if errors.is_empty() { Ok(samples) } else { Err(errors) }
}

fn split(samples: Vec<Sample>, config: &DatasetConfig, seed: u64) -> artifacts::Dataset {
    let mut strata: BTreeMap<Option<String>, Vec<usize>> = BTreeMap::new();
    for (i, s) in samples.iter().enumerate() {
        let stratum = match &config.stratify {
            Some(field) => s.fields.get(field).map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string)),
            None => s.label.clone(),
        };
        strata.entry(stratum).or_default().push(i);
    }
    let mut heldout = vec![false; samples.len()];
    for members in strata.values_mut() {
        members.sort_by_cached_key(|&i| {
            let mut h = blake3::Hasher::new();
            h.update(&seed.to_le_bytes());
            h.update(samples[i].id.as_bytes());
            *h.finalize().as_bytes()
        });
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
        DatasetConfig { path: FileRef { path: "d.jsonl".into(), span: None }, id: "id".into(), label: Some("y".into()), stratify: None, heldout: Fraction(heldout) }
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
