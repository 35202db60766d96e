//! Any bytes as a JSONL golden set (lossily decoded, as the stage reads it): `dataset::read`
//! returns the split samples or one located diagnostic per bad line (rendered), never panics; a
//! read it accepts splits every sample exactly once.
#![no_main]

use dataset::{DatasetConfig, Fraction};
use engine::FileRef;
use engine::diag::SourceFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, rest)) = data.split_first() else { return };
    let config = DatasetConfig {
        path: FileRef { path: "fuzzed.jsonl".into(), span: None },
        id: "id".into(),
        label: (knobs & 1 == 1).then(|| "label".into()),
        stratify: (knobs & 2 == 2).then(|| "topic".into()),
        heldout: Fraction(f64::from(knobs >> 2) / 63.0),
    };
    let file = SourceFile::new("fuzzed.jsonl", String::from_utf8_lossy(rest).into_owned());
    match dataset::read(&file, &config, u64::from(knobs)) {
        Ok(out) => {
            assert_eq!(out.counts.dev + out.counts.heldout, out.samples.len());
        }
        Err(diags) => {
            assert!(!diags.is_empty());
            for d in &diags {
                let _ = d.render(false);
            }
        }
    }
});
