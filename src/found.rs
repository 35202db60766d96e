//! A run's artifacts, found by their type: whichever stage kind produced a judgement (`judge`,
//! `llm_judge`, or one added later), the report, `compare` and `review` read it the same way.

use artifacts::Artifact;
use engine::Store;
use engine::exec::IterationReport;

/// The first artifact of type `T` an iteration produced, in run order, with its stage's kind.
pub fn artifact<T: Artifact>(it: &IterationReport, store: &Store) -> Option<(String, T)> {
    let registry = crate::registry();
    it.stages.iter().filter(|s| registry.get(&s.kind).is_some_and(|k| k.output() == T::TYPE)).find_map(|s| {
        let value = store.get_object(&s.output?)?;
        Some((s.kind.clone(), T::read(&value).ok()?))
    })
}
