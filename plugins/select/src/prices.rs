//! The price table: what an hour of each serving machine costs, and which machine serves which
//! model. A candidate's cost per million tokens is its machine's hourly price over the tokens it
//! processed per hour as measured — so the table should name the machine the answers were
//! measured on (the embedded models: this machine; an endpoint: the machines behind it).

use std::collections::BTreeMap;

use engine::diag::{Diagnostic, SourceFile};
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    /// Machines by name.
    pub machines: BTreeMap<String, Machine>,
    /// Model id (or `default`) → machine name.
    #[serde(default)]
    pub serving: BTreeMap<String, Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// What it is, for people: "1× NVIDIA H100 80GB", "2 vCPU".
    pub hardware: String,
    /// GPU type, if any (e.g. "H100").
    pub gpu: Option<String>,
    pub usd_per_hour: f64,
}

impl Prices {
    pub fn parse(file: &SourceFile, stage: &str) -> Result<Prices, Vec<Diagnostic>> {
        let error = |message: String| Diagnostic::error(format!("stage `{stage}`: price table: {message}"));
        let prices: Prices = toml::from_str(&file.text).map_err(|e| {
            let d = error(e.message().trim_end().to_string());
            vec![match e.span() {
                Some(span) => d.at(file, span, "here"),
                None => d,
            }]
        })?;
        let mut problems = Vec::new();
        for (name, m) in &prices.machines {
            if !(m.usd_per_hour.is_finite() && m.usd_per_hour > 0.0) {
                problems.push(error(format!("machine `{name}`: `usd_per_hour` must be a positive price, not {}", m.usd_per_hour)));
            }
        }
        for (model, machine) in &prices.serving {
            if !prices.machines.contains_key(machine.get_ref()) {
                let names: Vec<&str> = prices.machines.keys().map(String::as_str).collect();
                problems.push(
                    error(format!("`{model}` is served on `{}`, which is not in `[machines]`", machine.get_ref()))
                        .at(file, machine.span(), "unknown machine")
                        .help(format!("machines: {}", engine::diag::one_of(&names))),
                );
            }
        }
        if problems.is_empty() { Ok(prices) } else { Err(problems) }
    }

    /// The machine serving `model`: its own entry, else `default`.
    pub fn machine(&self, model: &str) -> Option<(&str, &Machine)> {
        let name = self.serving.get(model).or_else(|| self.serving.get("default"))?;
        self.machines.get_key_value(name.get_ref()).map(|(n, m)| (n.as_str(), m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = r#"
[machines.cpu]
hardware = "2 vCPU"
usd_per_hour = 0.08

[machines.h100]
hardware = "1× NVIDIA H100 80GB"
gpu = "H100"
usd_per_hour = 2.5

[serving]
default = "cpu"
"big-model" = "h100"
"#;

    #[test]
    fn models_get_their_machine_or_the_default() {
        let p = Prices::parse(&SourceFile::new("prices.toml", TABLE), "decision").unwrap();
        assert_eq!(p.machine("big-model").unwrap().0, "h100");
        assert_eq!(p.machine("small").unwrap().1.usd_per_hour, 0.08);
        let e = Prices::parse(&SourceFile::new("prices.toml", TABLE.replace("\"big-model\" = \"h100\"", "\"big-model\" = \"h200\"")), "decision").unwrap_err();
        let text = e[0].render(false);
        assert!(text.contains("`big-model` is served on `h200`, which is not in `[machines]`") && text.contains("prices.toml:13:15"), "{text}");
        let e = Prices::parse(&SourceFile::new("prices.toml", TABLE.replace("2.5", "-1.0")), "decision").unwrap_err();
        assert!(e[0].render(false).contains("positive price"));
    }
}
