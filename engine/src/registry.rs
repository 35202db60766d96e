//! The set of stage kinds a binary knows. The engine has none built in.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;

use schemars::generate::SchemaSettings;
use serde::Deserialize;
use serde_json::Value;
use toml::de::{DeValue, ValueDeserializer};

use crate::diag::Diagnostic;
use crate::stage::{BuildContext, Port, Stage, StagePlugin};

#[derive(Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Box<dyn ErasedPlugin>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register<P: StagePlugin>(&mut self) -> &mut Self {
        let previous = self.kinds.insert(P::KIND, Box::new(Erased::<P>(PhantomData)));
        assert!(previous.is_none(), "stage kind `{}` registered twice", P::KIND);
        self
    }

    pub fn kinds(&self) -> impl Iterator<Item = &dyn ErasedPlugin> {
        self.kinds.values().map(|b| &**b)
    }

    pub fn kind_names(&self) -> Vec<&'static str> {
        self.kinds.keys().copied().collect()
    }

    pub fn get(&self, kind: &str) -> Option<&dyn ErasedPlugin> {
        self.kinds.get(kind).map(|b| &**b)
    }
}

/// A [`StagePlugin`] without its config type, so kinds can live in one table.
pub trait ErasedPlugin: Send + Sync {
    fn kind(&self) -> &'static str;
    fn version(&self) -> u32;
    fn summary(&self) -> &'static str;
    fn inputs(&self) -> &'static [Port];
    fn output(&self) -> &'static str;
    /// JSON Schema (draft-07, self-contained) of the config fields.
    fn config_schema(&self) -> Value;
    /// Deserialize the config (spans point into the pipeline file), then build.
    /// Returns the stage and its canonical config.
    fn build(
        &self,
        table: toml::Spanned<DeValue<'_>>,
        cx: &mut BuildContext,
    ) -> Result<(Arc<dyn Stage>, Value), Vec<Diagnostic>>;
}

struct Erased<P>(PhantomData<fn() -> P>);

pub(crate) fn schema_settings() -> SchemaSettings {
    SchemaSettings::draft07().with(|s| s.inline_subschemas = true)
}

impl<P: StagePlugin> ErasedPlugin for Erased<P> {
    fn kind(&self) -> &'static str {
        P::KIND
    }
    fn version(&self) -> u32 {
        P::VERSION
    }
    fn summary(&self) -> &'static str {
        P::SUMMARY
    }
    fn inputs(&self) -> &'static [Port] {
        P::INPUTS
    }
    fn output(&self) -> &'static str {
        P::OUTPUT
    }
    fn config_schema(&self) -> Value {
        schema_settings().into_generator().into_root_schema_for::<P::Config>().to_value()
    }
    fn build(
        &self,
        table: toml::Spanned<DeValue<'_>>,
        cx: &mut BuildContext,
    ) -> Result<(Arc<dyn Stage>, Value), Vec<Diagnostic>> {
        let whole = table.span();
        let config = P::Config::deserialize(ValueDeserializer::from(table)).map_err(|e| {
            let span = e.span().unwrap_or(whole);
            vec![Diagnostic::error(format!("stage `{}`: {}", cx.stage_id, e.message().trim_end()))
                .at(cx.pipeline, span, "here")]
        })?;
        let mut canonical = serde_json::to_value(&config).expect("stage configs serialize to JSON");
        // An unset option is the same as a key not written: a plugin that gains an optional
        // field leaves existing fingerprints as they were.
        drop_null_keys(&mut canonical);
        let stage = P::build(config, cx)?;
        if let (Some(resolved), Some(map)) = (stage.resolved(), canonical.as_object_mut()) {
            map.insert("@resolved".into(), resolved);
        }
        Ok((stage, canonical))
    }
}

/// Removes object keys whose value is null, at any depth. (TOML has no null: a null in a config
/// can only be an unset `Option`.)
fn drop_null_keys(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(drop_null_keys);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_null_keys),
        _ => {}
    }
}
