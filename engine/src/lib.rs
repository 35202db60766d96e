//! The pipeline engine: config → plan → cache → exec.
//!
//! It knows nothing about models, prompts or datasets: stage kinds are plugins (see
//! [`stage::StagePlugin`]) registered by the binary in a [`registry::Registry`].

pub mod atomic;
pub mod cache;
pub mod config;
pub mod diag;
pub mod events;
pub mod exec;
pub mod fingerprint;
pub mod hash;
pub mod lockfile;
pub mod registry;
pub mod schema;
pub mod stage;
pub mod store;
pub mod stream;

pub use config::{Bound, Pipeline, load};
pub use diag::Diagnostic;
pub use events::{Event, ItemGroup, Observer, item_group};
pub use exec::{PlanReport, RunError, RunOptions, RunReport, plan, run};
pub use hash::Digest;
pub use registry::Registry;
pub use stage::{BuildContext, Cancel, ElementItems, FileRef, Item, ItemContext, ItemProgress, Kept, Pins, Port, Reported, Stage, StageError, StageInput, StagePlugin};
pub use store::Store;

#[cfg(test)]
mod tests;
