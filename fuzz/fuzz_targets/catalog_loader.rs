//! Any bytes as a model catalog: `Catalog::parse` returns a catalog or located diagnostics
//! (rendered), never panics; every model of a catalog it accepts has a size tier.
#![no_main]

use engine::diag::SourceFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match catalog::Catalog::parse(&SourceFile::new("fuzzed.toml", text.to_string())) {
        Ok(c) => {
            for id in c.ids() {
                let m = c.get(id).expect("listed ids are present");
                let _ = (m.tier(), m.runnable_source());
            }
        }
        Err(diags) => {
            assert!(!diags.is_empty());
            for d in &diags {
                let _ = d.render(false);
            }
        }
    }
});
