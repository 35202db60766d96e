//! Any bytes as a pipeline file: `engine::parse` must return a pipeline or located diagnostics
//! (rendered, so their spans are checked against the text), never panic. The registry holds every
//! stage kind that builds without a model runtime (`infer`, `llm_judge` and `cluster` link
//! mistral.rs or candle); their configs go through the same loader code.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use engine::Registry;
use engine::diag::SourceFile;
use libfuzzer_sys::fuzz_target;

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| {
        let mut r = Registry::new();
        r.register::<command::Command>()
            .register::<dataset::Dataset>()
            .register::<judge::Judge>()
            .register::<license_filter::LicenseFilter>()
            .register::<prompt::Prompt>()
            .register::<prompt::Render>()
            .register::<revise::Revise>()
            .register::<select::Select>();
        r
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Relative files resolve against the corpus of real pipelines, so a fuzzed file that names
    // `data/tickets.jsonl` reaches the stage builders' checks of real files.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/fuzzed.toml");
    match engine::config::parse(SourceFile::new(path, text.to_string()), registry()) {
        Ok(p) => assert!(!p.stages.is_empty()),
        Err(diags) => {
            assert!(!diags.is_empty());
            for d in &diags {
                let _ = d.render(false);
            }
        }
    }
});
