//! `license_filter`: a catalog filtered by a team's policy — allowed licenses, origins, size tiers,
//! and whether this build can run the model (weights to load, or an endpoint). Every excluded
//! model is listed with every reason it is out. The catalog file is digested, so editing it reruns
//! the stage; a policy that leaves nothing is an error at validation, located at the policy.

use std::sync::Arc;

use catalog::{Catalog, Model, Tier};
use artifacts::{Artifact, CandidateModel, Candidates};
use engine::diag::Diagnostic;
use engine::{BuildContext, FileRef, Item, Port, Stage, StageError, StageInput, StagePlugin};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub struct LicenseFilter;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LicenseFilterConfig {
    /// The model catalog, relative to the pipeline file.
    pub catalog: FileRef,
    /// Allowed licenses (SPDX ids or the catalog's license names); absent: any.
    pub licenses: Option<Vec<String>>,
    /// Allowed developer origins (ISO 3166 codes); absent: any.
    pub origins: Option<Vec<String>>,
    /// Allowed size tiers (`low` < 32B, `medium` 32–300B, `high` ≥ 300B total parameters); absent: any.
    pub tiers: Option<Vec<Tier>>,
    /// Keep only models this build can run (weights or an endpoint in the catalog).
    #[serde(default = "yes")]
    pub runnable: bool,
}

fn yes() -> bool {
    true
}

impl StagePlugin for LicenseFilter {
    type Config = LicenseFilterConfig;
    const KIND: &'static str = "license_filter";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "the catalog's models a policy allows (license, origin, size tier, runnable), each excluded one with its reasons";
    const INPUTS: &'static [Port] = &[];
    const OUTPUT: &'static str = Candidates::TYPE;

    fn build(config: LicenseFilterConfig, cx: &mut BuildContext) -> Result<Arc<dyn Stage>, Vec<Diagnostic>> {
        let path = cx.file(&config.catalog).map_err(|d| vec![d])?;
        let catalog = Catalog::load(&path)?;
        let (included, _) = apply(&catalog, &config);
        if included.is_empty() {
            return Err(vec![
                cx.error_at(config.catalog.span.clone(), format!("the policy excludes every model in `{}`", config.catalog.path), "this catalog")
                    .help("widen `licenses`, `origins` or `tiers`, or add a runnable source to a model; `pipeline show` on a wider policy lists each model's reasons"),
            ]);
        }
        Ok(Arc::new(LicenseFilterStage(config)))
    }
}

/// (included, excluded with reasons)
fn apply<'a>(catalog: &'a Catalog, policy: &LicenseFilterConfig) -> (Vec<&'a Model>, Vec<(&'a Model, Vec<String>)>) {
    let mut included = Vec::new();
    let mut excluded = Vec::new();
    for m in &catalog.models {
        let mut reasons = Vec::new();
        if let Some(allowed) = &policy.licenses
            && !allowed.iter().any(|l| l.eq_ignore_ascii_case(&m.license))
        {
            reasons.push(format!("license {} is not allowed", m.license));
        }
        if let Some(allowed) = &policy.origins
            && !allowed.iter().any(|o| o.eq_ignore_ascii_case(&m.origin))
        {
            reasons.push(format!("origin {} is not allowed", m.origin));
        }
        if let Some(allowed) = &policy.tiers
            && !allowed.contains(&m.tier())
        {
            reasons.push(format!("size tier {} ({}B total) is not allowed", tier_name(m.tier()), m.params_total_b));
        }
        if policy.runnable && m.runnable_source().is_none() {
            reasons.push("no source this build can run (weights or an endpoint)".to_string());
        }
        if reasons.is_empty() { included.push(m) } else { excluded.push((m, reasons)) }
    }
    (included, excluded)
}

fn tier_name(t: Tier) -> &'static str {
    match t {
        Tier::Low => "low",
        Tier::Medium => "medium",
        Tier::High => "high",
    }
}

struct LicenseFilterStage(LicenseFilterConfig);

#[async_trait::async_trait]
impl Stage for LicenseFilterStage {
    fn finish(&self, input: &StageInput, _: Vec<(Item, Value)>) -> Result<Value, StageError> {
        let text = std::str::from_utf8(input.file(&self.0.catalog)?).map_err(|_| StageError::new("the catalog is not UTF-8"))?;
        let catalog = Catalog::parse(&engine::diag::SourceFile::new(&self.0.catalog.path, text)).map_err(|d| StageError::new(d[0].render(false)))?;
        let (included, excluded) = apply(&catalog, &self.0);
        let row = |m: &Model, reasons: Option<Vec<String>>| CandidateModel {
            id: m.id.clone(),
            family: m.family.clone(),
            license: m.license.clone(),
            origin: m.origin.clone(),
            params_total_b: m.params_total_b,
            params_active_b: m.params_active_b,
            tier: m.tier().as_str().to_string(),
            reasons,
        };
        let candidates = Candidates {
            catalog: self.0.catalog.path.clone(),
            included: included.iter().map(|m| row(m, None)).collect(),
            excluded: excluded.iter().map(|(m, reasons)| row(m, Some(reasons.iter().map(|r| r.to_string()).collect()))).collect(),
            summary: format!(
                "{} of {} catalog models pass the policy: {}",
                included.len(),
                catalog.models.len(),
                included.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(", ")
            ),
        };
        Ok(candidates.to_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_excluded_model_has_every_reason() {
        let catalog = Catalog::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../catalogs/open-models.toml")).unwrap();
        let policy = LicenseFilterConfig {
            catalog: FileRef { path: String::new(), span: None },
            licenses: Some(vec!["apache-2.0".into(), "MIT".into()]),
            origins: None,
            tiers: Some(vec![Tier::Low]),
            runnable: true,
        };
        let (included, excluded) = apply(&catalog, &policy);
        assert_eq!(included.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["smollm2-135m-instruct"]);
        let reasons = |id: &str| excluded.iter().find(|(m, _)| m.id == id).map(|(_, r)| r.clone()).unwrap();
        assert_eq!(reasons("smollm2-360m-instruct"), ["no source this build can run (weights or an endpoint)"]);
        let big = reasons("deepseek-v3.2");
        assert!(big.iter().any(|r| r.starts_with("size tier high")), "{big:?}");
        assert_eq!(excluded.len() + included.len(), catalog.models.len());
        let without_runnable = LicenseFilterConfig { runnable: false, tiers: None, ..policy };
        let (included, _) = apply(&catalog, &without_runnable);
        assert!(included.iter().all(|m| ["Apache-2.0", "MIT"].contains(&m.license.as_str())));
        assert!(included.len() > 3);
    }
}
